#!/usr/bin/env python3
"""Connection flood against one service: the figures in README.md, "Connections".

SOCKETS connections each trickle one byte of a request head per second (one that is answered
or closed is opened again at the next second), for SECONDS. Meanwhile a separate process
sends real requests, each on a fresh connection (so each competes for a slot), and samples
the server's threads and RSS from /proc/PID/status. Then the flood stops and the prober
measures how long until the service answers at full speed again (a 250 ms window in which
every request is 200 at >= 90% of the request rate measured before the flood).

Standard library only. Needs `ulimit -n` above SOCKETS (it raises its soft limit to the hard
one). Usage:

    python3 tests/flood.py --port 8081 --pid "$(pgrep -f 'cqrs-analytics query-service')"
"""

import argparse
import errno
import multiprocessing
import resource
import socket
import time

PATH = "/api/analytics/sales/hourly"
SLOW_HEAD = (
    b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: flood\r\nUser-Agent: flood.py\r\n"
    b"X-Padding: " + b"a" * 64 + b"\r\n\r\n"
)


def proc_status(pid):
    """(threads, RSS in KiB) of process `pid`."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["Threads"][0]), int(fields["VmRSS"][0])


def real_request(host, port, timeout=30.0):
    """One GET on a fresh connection: (status or error name, seconds)."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"GET {PATH} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n".encode())
            raw = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                raw += chunk
        status = int(raw[9:12]) if raw.startswith(b"HTTP/1.") else "no answer"
    except OSError as e:
        status = type(e).__name__
    return status, time.monotonic() - started


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def run_for(host, port, seconds):
    """Real requests, back to back, for `seconds`: a list of (status, latency)."""
    out = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        out.append(real_request(host, port))
    return out


def prober(host, port, pid, flood_started, flood_stopped, results):
    """Runs in its own process, so the flood's loop never delays a real request."""
    before = run_for(host, port, 3.0)
    rate_before = len(before) / 3.0
    p99_before = percentile([l for _, l in before], 0.99)
    flood_started.wait()
    during, peak_threads, peak_rss = [], 0, 0
    next_sample = 0.0
    while not flood_stopped.is_set():
        during.append(real_request(host, port))
        if time.monotonic() >= next_sample:
            threads, rss = proc_status(pid)
            peak_threads, peak_rss = max(peak_threads, threads), max(peak_rss, rss)
            next_sample = time.monotonic() + 0.25
    stopped_at = time.monotonic()
    recovered_after = None
    while time.monotonic() - stopped_at < 60 and recovered_after is None:
        window_start = time.monotonic()
        window = run_for(host, port, 0.25)
        ok = all(s == 200 for s, _ in window)
        if ok and len(window) / 0.25 >= 0.9 * rate_before:
            recovered_after = window_start - stopped_at
    threads_after, rss_after = proc_status(pid)
    results.put(
        dict(
            rate_before=rate_before,
            p99_before=p99_before,
            during=during,
            peak_threads=peak_threads,
            peak_rss_kib=peak_rss,
            recovered_after=recovered_after,
            threads_after=threads_after,
            rss_after_kib=rss_after,
        )
    )


def flood(host, port, sockets, seconds):
    """The trickling sockets; returns how their connections ended."""
    answers = {}
    conns = [None] * sockets  # (socket, bytes sent, bytes read)

    def opened():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            answers[f"connect {errno.errorcode.get(err, err)}"] = (
                answers.get(f"connect {errno.errorcode.get(err, err)}", 0) + 1
            )
            return None
        return [s, 0, b""]

    def closed(c, how):
        c[0].close()
        first = c[2].split(b"\r\n", 1)[0].decode("latin-1") if c[2] else how
        answers[first] = answers.get(first, 0) + 1

    until = time.monotonic() + seconds
    while time.monotonic() < until:
        tick = time.monotonic()
        for i, c in enumerate(conns):
            if c is None:
                conns[i] = opened()
                continue
            try:
                while True:
                    data = c[0].recv(4096)
                    if not data:
                        closed(c, "closed without an answer")
                        conns[i] = None
                        break
                    c[2] += data
            except BlockingIOError:
                pass
            except OSError as e:
                closed(c, type(e).__name__)
                conns[i] = None
            if conns[i] is None or c[1] >= len(SLOW_HEAD):
                continue
            try:
                c[1] += c[0].send(SLOW_HEAD[c[1] : c[1] + 1])
            except (BlockingIOError, OSError) as e:
                if e.errno not in (errno.EAGAIN, errno.ENOTCONN, None):
                    closed(c, type(e).__name__)
                    conns[i] = None
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    for c in conns:
        if c is not None:
            c[0].close()
    return answers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="the service's process id")
    ap.add_argument("--sockets", type=int, default=12000)
    ap.add_argument("--seconds", type=float, default=60)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threads0, rss0 = proc_status(a.pid)
    started, stopped = multiprocessing.Event(), multiprocessing.Event()
    results = multiprocessing.Queue()
    p = multiprocessing.Process(
        target=prober, args=(a.host, a.port, a.pid, started, stopped, results)
    )
    p.start()
    time.sleep(3.2)  # the prober's baseline
    started.set()
    answers = flood(a.host, a.port, a.sockets, a.seconds)
    stopped.set()
    r = results.get()
    p.join()
    during = r["during"]
    statuses = {}
    for s, _ in during:
        statuses[s] = statuses.get(s, 0) + 1
    lat = [l for _, l in during]
    print(f"server before: {threads0} threads, RSS {rss0 / 1024:.1f} MiB")
    print(f"flood: {a.sockets} sockets x {a.seconds:.0f} s, how their connections ended: {answers}")
    print(
        f"real requests before: {r['rate_before']:.0f}/s, p99 {r['p99_before'] * 1000:.1f} ms"
    )
    print(
        f"real requests during: {len(during)}, statuses {statuses}, "
        f"p50 {percentile(lat, 0.5) * 1000:.1f} ms, p99 {percentile(lat, 0.99) * 1000:.1f} ms, "
        f"max {max(lat, default=0) * 1000:.1f} ms"
    )
    print(
        f"server during: peak {r['peak_threads']} threads, peak RSS {r['peak_rss_kib'] / 1024:.1f} MiB"
    )
    rec = r["recovered_after"]
    print(
        "full speed again "
        + (f"{rec * 1000:.0f} ms after the flood stopped" if rec is not None else "NOT within 60 s")
        + f"; then {r['threads_after']} threads, RSS {r['rss_after_kib'] / 1024:.1f} MiB"
    )


if __name__ == "__main__":
    main()
