#!/usr/bin/env python3
"""Runs `cargo bench --bench pipeline` N times and prints one markdown table of all runs.

    python3 benches/runs.py 4                  # four standard runs, back to back
    python3 benches/runs.py 4 -- consumers     # other sets, as after `--` of cargo bench
    python3 benches/runs.py --table target/bench-runs/*.json   # only the table, from saved runs

Each run's JSON (`target/bench-pipeline.json`) is kept as target/bench-runs/run-K.json.
The table has every figure of every run, the spread of each ratio (min–max) and how many
runs met each target: issue 13 asks for the ratios' spread over four runs.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

OUT = "target/bench-runs"


def fmt(v, unit):
    if v is None:
        return ""
    if unit in ("/s", "ev/s", "msg/s") or abs(v) >= 1000:
        return f"{v:,.0f} {unit}".strip()
    return f"{v:.2f} {unit}".strip()


def table(paths):
    runs = [json.load(open(p)) for p in paths]
    order, rows = [], {}
    for k, run in enumerate(runs):
        for r in run["table"]:
            key = (r["phase"], r["figure"])
            if key not in rows:
                order.append(key)
                rows[key] = {"target": r["target"], "unit": r["unit"], "cells": [None] * len(runs)}
            rows[key]["cells"][k] = r
    head = ["phase", "figure"] + [f"run {k + 1}" for k in range(len(runs))]
    head += ["ratio spread", "target", "met"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in order:
        row = rows[key]
        cells, ratios, met, judged = [], [], 0, 0
        for c in row["cells"]:
            if c is None:
                cells.append("")
                continue
            text = fmt(c["value"], c["unit"])
            if c.get("ratio") is not None:
                ratio = c["ratio"]["ratio"]
                ratios.append(ratio)
                text += f" (**{ratio:.2f}**)"
            cells.append(text)
            if c.get("met") is not None:
                judged += 1
                met += 1 if c["met"] else 0
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else ""
        target = "" if row["target"] in ("-", None) else row["target"]
        verdict = f"{met}/{judged}" if judged else ""
        print("| " + " | ".join([key[0], key[1]] + cells + [spread, target, verdict]) + " |")


def main():
    args = sys.argv[1:]
    if args and args[0] == "--table":
        table(args[1:])
        return
    n = int(args[0]) if args else 4
    extra = args[args.index("--") + 1:] if "--" in args else []
    os.makedirs(OUT, exist_ok=True)
    paths = []
    for k in range(1, n + 1):
        print(f"[runs] run {k} of {n}", file=sys.stderr, flush=True)
        cmd = ["cargo", "bench", "--bench", "pipeline"] + (["--"] + extra if extra else [])
        subprocess.run(cmd, check=True)
        path = f"{OUT}/run-{k}.json"
        shutil.copy("target/bench-pipeline.json", path)
        paths.append(path)
    table(paths)


if __name__ == "__main__":
    main()
