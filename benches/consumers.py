#!/usr/bin/env python3
"""Do more consumer processes apply more events per second, and do they wait on each other?

    python3 benches/consumers.py PROCESSES [EVENTS]      # e.g. 3 100000

Builds a backlog of EVENTS OrderCreated events (default 100,000; 2 lines each over 200
products in 10 categories, 10,000 customers, all in the current hour) in fresh databases
with SQL, lets one `command-service` publish them into fresh queues, then starts PROCESSES
`consumer-service` processes (release binary) at once and times the drain from the first
applied event until every event is applied. Meanwhile a psql session samples
pg_stat_activity of the read database every ~10 ms. Prints one JSON line:
events/s, lock_share (sampled consumer backends waiting on Lock:* / sampled active
consumer backends), the waiting statements, CPU seconds per 1,000 events of the consumer
processes and of their PostgreSQL backends (/proc/PID/stat utime+stime), and whether the
read model equals the write model at the end (the tests' SQL totals).

Environment: PG_URL (superuser, no database; postgresql://postgres@127.0.0.1:5432),
BROKER_URL (amqp://guest:guest@127.0.0.1:5672/%2f), BIN (target/release/cqrs-analytics),
PORT_BASE (20520). Needs psql, curl, rabbitmqctl (to delete its queues).
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

PROCS = int(sys.argv[1])
EVENTS = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
PG = os.environ.get("PG_URL", "postgresql://postgres@127.0.0.1:5432")
BROKER = os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
BIN = os.environ.get("BIN", "target/release/cqrs-analytics")
PORT = int(os.environ.get("PORT_BASE", "20520"))
TAG = f"perfcons_{os.getpid()}"
TICKS = os.sysconf("SC_CLK_TCK")


def psql(db, sql):
    out = subprocess.run(["psql", "-XAtq", f"{PG}/{db}", "-c", sql], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def env():
    e = dict(os.environ)
    e.update({
        "DATABASE_URL": f"{PG}/{TAG}_w", "READ_DATABASE_URL": f"{PG}/{TAG}_r",
        "BROKER_URL": BROKER, "RUST_LOG": "warn",
        "BROKER_EXCHANGE": f"{TAG}.x", "BROKER_PRODUCT_QUEUE": f"{TAG}.p",
        "BROKER_ORDER_QUEUE": f"{TAG}.o", "BROKER_DEAD_LETTER_EXCHANGE": f"{TAG}.dlx",
        "BROKER_DEAD_LETTER_QUEUE": f"{TAG}.dlq",
    })
    return e


def spawn(role, port, **extra):
    e = env()
    e.update({k: str(v) for k, v in extra.items()})
    e["COMMAND_SERVICE_PORT" if role == "command-service" else "CONSUMER_SERVICE_PORT"] = str(port)
    return subprocess.Popen([BIN, role], env=e, stdout=subprocess.DEVNULL,
                            stderr=open(f"/tmp/{TAG}.{role}.{port}.log", "w"))


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)


def cpu_seconds(pid):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def applied(port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("consumer_events_applied_total"):
            return int(float(line.split()[-1]))
    return 0


GENERATE = """
INSERT INTO products (id, name, category, price, stock)
SELECT g, 'p' || g, 'c' || (g % 10), 9.99, 1000000000 FROM generate_series(1, 200) g;
INSERT INTO orders (id, customer_id, total)
SELECT g, 1 + (g * 7919) % 10000, 29.97 FROM generate_series(1, {n}) g;
INSERT INTO order_items (order_id, product_id, quantity, price)
SELECT g, 1 + g % 100, 2, 9.99 FROM generate_series(1, {n}) g
UNION ALL SELECT g, 101 + (g * 7) % 100, 1, 9.99 FROM generate_series(1, {n}) g;
INSERT INTO outbox (topic, payload)
SELECT 'order-events', jsonb_build_object(
    'eventId', gen_random_uuid(), 'eventType', 'OrderCreated',
    'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    'orderId', g, 'customerId', 1 + (g * 7919) % 10000,
    'items', jsonb_build_array(
        jsonb_build_object('productId', 1 + g % 100, 'productName', 'p' || (1 + g % 100),
            'category', 'c' || ((1 + g % 100) % 10), 'quantity', 2, 'price', 9.99),
        jsonb_build_object('productId', 101 + (g * 7) % 100, 'productName', 'p' || (101 + (g * 7) % 100),
            'category', 'c' || ((101 + (g * 7) % 100) % 10), 'quantity', 1, 'price', 9.99)),
    'total', 29.97)
FROM generate_series(1, {n}) g;
SELECT setval('orders_id_seq', {n}); SELECT setval('products_id_seq', 200);
"""

WRITE_TOTALS = """SELECT (SELECT count(*) FROM orders) || ' ' || (SELECT sum(quantity) FROM order_items)
 || ' ' || (SELECT sum(quantity * price)::numeric(24,2) FROM order_items) || ' ' || (SELECT sum(total)::numeric(24,2) FROM orders)"""
READ_TOTALS = """SELECT (SELECT sum(order_count) FROM customer_ltv_view) || ' ' || (SELECT sum(total_quantity_sold) FROM product_sales_view)
 || ' ' || (SELECT sum(total_revenue)::numeric(24,2) FROM product_sales_view) || ' ' || (SELECT sum(total_spent)::numeric(24,2) FROM customer_ltv_view)
 || ' ' || (SELECT sum(total_orders) FROM hourly_sales_view) || ' ' || (SELECT sum(total_revenue)::numeric(24,2) FROM category_metrics_view)"""

SAMPLE = f"""SELECT pid, coalesce(wait_event_type, '') || ':' || coalesce(wait_event, ''),
 left(regexp_replace(query, '\\s+', ' ', 'g'), 50) FROM pg_stat_activity
 WHERE datname = '{TAG}_r' AND state = 'active' AND pid <> pg_backend_pid()
 AND application_name NOT LIKE 'psql%';
SELECT 'END';
"""


def main():
    for db in ("w", "r"):
        psql("postgres", f"CREATE DATABASE {TAG}_{db}")
    procs, sampler = [], None
    try:
        subprocess.run([BIN, "migrate"], env=env(), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        psql(f"{TAG}_w", GENERATE.format(n=EVENTS))
        cmd = spawn("command-service", PORT, OUTBOX_PUBLISHERS=1)
        deadline = time.time() + 300
        while int(psql(f"{TAG}_w", "SELECT count(*) FROM outbox WHERE published_at IS NULL")) > 0:
            assert time.time() < deadline, "publishing took over 300 s"
            time.sleep(0.2)
        stop(cmd)
        sampler = subprocess.Popen(["psql", "-XAtq", f"{PG}/{TAG}_r"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, bufsize=1)
        ports = [PORT + 1 + i for i in range(PROCS)]
        procs = [spawn("consumer-service", p) for p in ports]
        samples, first, done, backends = [], None, None, set()
        deadline = time.time() + 300
        while done is None and time.time() < deadline:
            sampler.stdin.write(SAMPLE)
            rows = []
            for line in iter(sampler.stdout.readline, ""):
                if line.strip() == "END":
                    break
                pid, wait, query = line.rstrip("\n").split("|", 2)
                rows.append((wait, query))
                backends.add(int(pid))
            samples.append(rows)
            if len(samples) % 5 == 0:
                n = sum(applied(p) for p in ports)
                if first is None and n > 0:
                    first = (time.time(), n)
                if n >= EVENTS:
                    done = time.time()
            time.sleep(0.01)
        assert done, "the drain took over 300 s"
        cpu_consumers = sum(cpu_seconds(p.pid) for p in procs)
        cpu_backends = sum(cpu_seconds(b) for b in backends)
        active = sum(len(s) for s in samples)
        locked = [q for s in samples for (w, q) in s if w.startswith("Lock:")]
        waits = {}
        for s in samples:
            for (w, q) in s:
                if w.startswith("Lock:"):
                    key = f"{w} {q}"
                    waits[key] = waits.get(key, 0) + 1
        # Every event is applied; sums a batch left pending (read migration 009) reach the
        # views the totals read once an idle consumer folds them: wait for that, timed.
        want = psql(f"{TAG}_w", WRITE_TOTALS).split()
        deadline = time.time() + 10
        while True:
            converged = psql(f"{TAG}_r", READ_TOTALS).split()
            equal = (converged[:4] == want and converged[4] == want[0]
                     and converged[5] == want[2])
            if equal or time.time() > deadline:
                break
            time.sleep(0.005)
        views_complete_after = time.time() - done
        print(json.dumps({
            "processes": PROCS, "events": EVENTS,
            "events_per_s": round((EVENTS - first[1]) / (done - first[0])),
            "samples": len(samples), "active_backend_samples": active,
            "lock_share": round(len(locked) / active, 3) if active else 0.0,
            "lock_waits": dict(sorted(waits.items(), key=lambda kv: -kv[1])[:5]),
            "cpu_s_per_1000_events": {
                "consumers": round(1000 * cpu_consumers / EVENTS, 4),
                "postgres_backends": round(1000 * cpu_backends / EVENTS, 4)},
            "read_equals_write": equal,
            "views_complete_s_after_last_applied": round(views_complete_after, 3),
        }))
    finally:
        for p in procs:
            stop(p)
        if sampler:
            sampler.stdin.close()
            sampler.wait()
        for db in ("w", "r"):
            psql("postgres", f"DROP DATABASE IF EXISTS {TAG}_{db} WITH (FORCE)")
        for q in ("p", "o", "dlq"):
            subprocess.run(["rabbitmqctl", "-q", "delete_queue", f"{TAG}.{q}"],
                           capture_output=True)


if __name__ == "__main__":
    main()
