#!/usr/bin/env python3
"""Failover check of the three-node RabbitMQ cluster (docker-compose.cluster.yml).

Against a running stack:

    docker compose -f docker-compose.yml -f docker-compose.cluster.yml up --build -d
    python3 deploy/cluster-check/failover.py

it places about RATE orders/s (one product, one customer per scenario) and, while they
flow, acts on one node, starting it again 15 s later. The scenarios (--scenarios, all by
default): `stop` stops the publisher's node gracefully (`docker stop`); `kill-consumer`
kills (`docker kill`) the consumer's node; `kill-publisher` the publisher's node;
`kill-leader` first restarts the command service until its publisher is connected to the
order queue's leader, then kills that node; `kill-all` does the same with the consumer
service too, so that one kill takes the publisher, the consumer and the leader. Per
scenario it prints and records (JSON, --out): orders accepted, 5xx answers, events lost
and doubled (the write database against the read model once the pipeline has caught up),
the longest pipeline pause (the longest time in which the read model applied nothing while
accepted orders were waiting for it), where the time went (`stages`: the longest gaps in
the outbox's commit and claim times and in the read model's apply times around the
action, and the worst commit-to-apply latency of an event), the order queue's consumers
in the seconds after the action, and the apps' log lines of those seconds. Not for CI: it
needs Docker and takes a few minutes. Exit 1 if any scenario lost or doubled an event, got
a 5xx, or paused for PAUSE_MAX_S or more.

Environment: COMPOSE (the compose command, default the two files above), CMD_URL and
QRY_URL (default http://127.0.0.1:8080 and :8081), RATE (50), PAUSE_MAX_S (2),
POSTGRES_USER (user).
"""
import argparse, http.client, json, os, random, shlex, subprocess, sys, threading, time
import urllib.parse

COMPOSE = shlex.split(os.environ.get(
    "COMPOSE", "docker compose -f docker-compose.yml -f docker-compose.cluster.yml"))
CMD = os.environ.get("CMD_URL", "http://127.0.0.1:8080")
QRY = os.environ.get("QRY_URL", "http://127.0.0.1:8081")
RATE = float(os.environ.get("RATE", "50"))
PAUSE_MAX_S = float(os.environ.get("PAUSE_MAX_S", "2"))
OWNER = os.environ.get("POSTGRES_USER", "user")
NODES = ("broker", "broker-2", "broker-3")


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def sh(args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


class Client:
    """One keep-alive HTTP connection (reconnects after an error)."""

    def __init__(self, base):
        u = urllib.parse.urlsplit(base)
        self.host, self.port, self.conn = u.hostname, u.port, None

    def request(self, method, path, body=None):
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                data = json.dumps(body).encode() if body is not None else None
                headers = {"Content-Type": "application/json"} if data else {}
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                raw = r.read()
                return r.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw)
            except (OSError, http.client.HTTPException) as e:
                self.conn = None
                if attempt == 1:
                    return None, str(e)


def container(service):
    r = sh(COMPOSE + ["ps", "-a", "-q", service])
    ids = r.stdout.split()
    return ids[0] if ids else None


def container_ips():
    """{ip: service} for the app containers."""
    out = {}
    for svc in ("command-service", "consumer-service", "query-service"):
        for cid in sh(COMPOSE + ["ps", "-q", svc]).stdout.split():
            ips = sh(["docker", "inspect", "-f",
                      "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", cid]).stdout.split()
            for ip in ips:
                out[ip] = svc
    return out


def rabbitmqctl(node, *args):
    cid = container(node)
    return sh(["docker", "exec", cid, "rabbitmqctl", "-q", *args]) if cid else None


def any_running_node():
    for node in NODES:
        r = rabbitmqctl(node, "cluster_status", "--formatter", "json")
        if r is not None and r.returncode == 0:
            return node, json.loads(r.stdout)
    return None, None


def connections():
    """[(node, service)] for every AMQP connection the cluster has."""
    node, _ = any_running_node()
    if node is None:
        return []
    r = rabbitmqctl(node, "list_connections", "--no-table-headers", "pid", "peer_host")
    if r is None or r.returncode != 0:
        return []
    ips = container_ips()
    out = []
    for line in r.stdout.splitlines():
        # <rabbit@broker-2.1795674944.890.0>\t172.24.0.7
        pid, _, peer = line.partition("\t")
        owner = pid.strip("<>").split(".")[0].replace("rabbit@", "")
        out.append((owner, ips.get(peer.strip(), peer.strip())))
    return out


def queue_leaders():
    node, _ = any_running_node()
    r = rabbitmqctl(node, "list_queues", "name", "type", "leader", "members", "--formatter", "json")
    return json.loads(r.stdout) if r is not None and r.returncode == 0 else r.stderr if r else None


def wait_cluster(want=3, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        _, status = any_running_node()
        if status and len(status.get("running_nodes", [])) == want:
            return time.time() - t0
        time.sleep(1)
    raise SystemExit(f"the cluster did not get {want} running nodes within {timeout} s")


def psql(sql):
    r = sh(COMPOSE + ["exec", "-T", "db", "psql", f"postgresql://{OWNER}@/write_db", "-XAtq",
                      "-c", sql])
    return r.stdout.strip()


def psql_read(sql):
    r = sh(COMPOSE + ["exec", "-T", "read_db", "psql", f"postgresql://{OWNER}@/read_db", "-XAtq",
                      "-F", "\t", "-c", sql])
    return r.stdout.strip()


def longest_gap(times, t0, t1):
    """The longest stretch within [t0, t1] with none of `times`: (seconds, start)."""
    inside = sorted(t for t in times if t0 <= t <= t1)
    best, start, prev = 0.0, t0, t0
    for t in inside + [t1]:
        if t - prev > best:
            best, start = t - prev, prev
        prev = t
    return best, start


def where_the_time_went(t_start, t_end, t_act):
    """Splits a pause between the stages, from the databases' own timestamps: when each
    event of the scenario was committed (outbox.created_at), claimed by the publish that
    finally succeeded (outbox.published_at: the claiming transaction's start) and applied
    (processed_events.processed_at). The longest gap in each stage's timestamps around the
    action says which stage stopped."""
    written = {}
    out = sh(COMPOSE + ["exec", "-T", "db", "psql", f"postgresql://{OWNER}@/write_db", "-XAtq",
                        "-F", "\t", "-c",
                        "SELECT payload->>'eventId', extract(epoch FROM created_at), "
                        "extract(epoch FROM published_at) FROM outbox "
                        f"WHERE created_at BETWEEN to_timestamp({t_start}) AND to_timestamp({t_end})"]).stdout
    for line in out.splitlines():
        eid, created, published = line.split("\t")
        written[eid] = (float(created), float(published) if published else None)
    applied = {}
    for line in psql_read("SELECT event_id, extract(epoch FROM processed_at) FROM processed_events "
                          f"WHERE processed_at >= to_timestamp({t_start})").splitlines():
        eid, at = line.split("\t")
        applied[eid] = float(at)
    lo, hi = t_act - 2, t_act + 20
    stages = {
        "committed": [c for c, _ in written.values()],
        "claimed": [p for _, p in written.values() if p],
        "applied": [applied[e] for e in written if e in applied],
    }
    out = {}
    for stage, times in stages.items():
        gap, start = longest_gap(times, lo, hi)
        out[stage] = {"gap_s": round(gap, 2), "from_s": round(start - t_act, 2)}
    pub = [(p - c, c) for c, p in written.values() if p]
    app = [(applied[e] - p, p) for e, (c, p) in written.items() if p and e in applied]
    if pub:
        d, at = max(pub)
        out["worst_commit_to_claim_s"] = {"s": round(d, 2), "committed_at_s": round(at - t_act, 2)}
    if app:
        d, at = max(app)
        out["worst_claim_to_apply_s"] = {"s": round(d, 2), "claimed_at_s": round(at - t_act, 2)}
    total = [(applied[e] - c, c) for e, (c, _) in written.items() if e in applied]
    if total:
        d, at = max(total)
        out["worst_commit_to_apply_s"] = {"s": round(d, 2), "committed_at_s": round(at - t_act, 2),
                                          "events_over_2_s": sum(1 for x, _ in total if x >= 2)}
    return out


class Consumers(threading.Thread):
    """Lists the order queue's consumers on a surviving node, again and again for a while
    after the action: a channel stuck on the broker keeps its consumer registered."""

    def __init__(self, victim, seconds=10):
        super().__init__(daemon=True)
        self.victim, self.seconds, self.seen = victim, seconds, []

    def run(self):
        node = next(n for n in NODES if n != self.victim)
        t0 = time.time()
        while time.time() - t0 < self.seconds:
            r = rabbitmqctl(node, "list_consumers", "--no-table-headers", "queue_name",
                            "channel_pid", "prefetch_count")
            lines = [l for l in (r.stdout if r else "").splitlines() if "order-events" in l]
            self.seen.append((round(time.time() - t0, 1), lines))


def app_logs(since, until):
    """The apps' log lines between two times (for the record of a scenario)."""
    lines = []
    for svc in ("command-service", "consumer-service"):
        r = sh(COMPOSE + ["logs", "--no-color", "--since", str(int(since)), "--until",
                          str(int(until) + 1), svc])
        lines += [l for l in r.stdout.splitlines() if " DEBUG " not in l]
    return lines


class Load(threading.Thread):
    """Places orders at RATE per second until stopped; records every status."""

    def __init__(self, product, customer):
        super().__init__(daemon=True)
        self.product, self.customer = product, customer
        self.statuses, self.stop_at = [], None
        self.done = threading.Event()

    def run(self):
        client, period, next_at = Client(CMD), 1.0 / RATE, time.time()
        while not self.done.is_set():
            status, _ = client.request("POST", "/api/orders", {
                "customerId": self.customer,
                "items": [{"productId": self.product, "quantity": 1}]})
            self.statuses.append((time.time(), status))
            next_at += period
            time.sleep(max(0.0, next_at - time.time()))


class Watch(threading.Thread):
    """Samples the read model's order count for the customer every 50 ms."""

    def __init__(self, customer):
        super().__init__(daemon=True)
        self.customer, self.samples = customer, []
        self.done = threading.Event()

    def run(self):
        client = Client(QRY)
        while not self.done.is_set():
            status, body = client.request(
                "GET", f"/api/analytics/customers/{self.customer}/lifetime-value")
            count = body.get("orderCount", 0) if status == 200 and isinstance(body, dict) else 0
            self.samples.append((time.time(), count))
            time.sleep(0.05)


def longest_pause(load, watch):
    """Longest stretch without progress of the read model while accepted orders waited."""
    accepted = [t for t, s in load.statuses if s == 201]
    worst, since, last = 0.0, None, 0
    for t, count in watch.samples:
        waiting = sum(1 for a in accepted if a <= t - 0.05) > count
        if count > last or not waiting:
            since = None
        elif since is None:
            since = t
        else:
            worst = max(worst, t - since)
        last = max(last, count)
    return worst


def health(base):
    status, body = Client(base).request("GET", "/health")
    return status, body if isinstance(body, dict) else {}


def logged_node(service, marker):
    """The node named by the last log line of `service` that contains `marker`."""
    r = sh(COMPOSE + ["logs", "--no-color", service])
    lines = [l for l in r.stdout.splitlines() if marker in l]
    return lines[-1].split(marker)[1].split(":")[0].strip() if lines else None


def consumer_node():
    """The node the consumer thread consumes from, as the consumer service logs it."""
    return logged_node("consumer-service", "consumer consuming from ")


def publisher_node():
    """The node the outbox publisher publishes to, as the command service logs it (the
    service has a second connection, its queue probe, so the connection list is ambiguous)."""
    return logged_node("command-service", "outbox publisher publishing to ")


def order_queue_leader():
    for q in queue_leaders() or []:
        if isinstance(q, dict) and q.get("name", "").endswith("order-events"):
            return q.get("leader", "").replace("rabbit@", "")
    return None


def onto_order_leader(consumer_too=False, tries=12):
    """Restarts the command service (and the consumer service) until its publisher (and the
    consumer) connect to the node that leads the order queue (each start picks a random
    first endpoint): the scenario in which a kill takes the publisher's connection (and the
    consumer's) and the queue's leader."""
    for _ in range(tries):
        leader = order_queue_leader()
        conns = connections()
        publisher_there = publisher_node() == leader
        consumer_there = not consumer_too or consumer_node() == leader
        if leader and publisher_there and consumer_there:
            return leader, conns
        for svc, there, url in (("command-service", publisher_there, CMD),
                                ("consumer-service", consumer_there, None)):
            if not there:
                sh(COMPOSE + ["restart", svc])
                for _ in range(60):
                    if url is None or health(url)[0] == 200:
                        break
                    time.sleep(0.5)
        time.sleep(3)
    raise SystemExit(f"the publisher/consumer never connected to the order queue's leader ({leader})")


def scenario(name, action, product, victim, before_s=10.0, outage_s=15.0, after_s=15.0):
    customer = random.randint(10**8, 2 * 10**8)
    load, watch = Load(product, customer), Watch(customer)
    conns = connections()
    if victim == "publisher":
        target = publisher_node() or NODES[0]
    elif victim == "leader":
        target, conns = onto_order_leader()
    elif victim == "all":
        target, conns = onto_order_leader(consumer_too=True)
    else:
        target = consumer_node() or NODES[0]
    victim_node = target
    log(f"{name}: connections {conns}; acting on {target}, the {victim}'s node")
    t_start = time.time()
    load.start(), watch.start()
    time.sleep(before_s)
    t_act = time.time()
    consumers = Consumers(victim_node)
    r = sh(["docker", action, container(victim_node)])
    consumers.start()
    log(f"{name}: docker {action} {victim_node} rc={r.returncode} in {time.time() - t_act:.1f} s")
    time.sleep(outage_s / 2)
    during = {"command": health(CMD), "connections": connections(), "queues": queue_leaders()}
    log(f"{name}: during the outage: {during}")
    time.sleep(outage_s / 2)
    r = sh(["docker", "start", container(victim_node)])
    rejoined = wait_cluster()
    log(f"{name}: {victim_node} started again, cluster of 3 after {rejoined:.1f} s")
    time.sleep(after_s)
    load.done.set(), load.join()
    t_end = time.time()
    accepted = sum(1 for _, s in load.statuses if s == 201)
    written = int(psql(f"SELECT count(*) FROM orders WHERE customer_id = {customer}") or 0)
    read = 0
    while time.time() - t_end < 120:
        read = watch.samples[-1][1] if watch.samples else 0
        if read >= written:
            break
        time.sleep(0.2)
    time.sleep(2)  # a doubled event would show up late
    read = watch.samples[-1][1]
    watch.done.set(), watch.join()
    result = {
        "scenario": name, "node": victim_node,
        "orders": accepted, "written": written,
        "fivexx": sum(1 for _, s in load.statuses if s is not None and s >= 500),
        "no_answer": sum(1 for _, s in load.statuses if s is None),
        "other": sorted({s for _, s in load.statuses if s not in (201, None) and s < 500}),
        "lost": max(0, written - read), "doubled": max(0, read - written),
        "pause_s": round(longest_pause(load, watch), 2),
        "caught_up_after_s": round(time.time() - t_end, 1),
        "stages": where_the_time_went(t_start, t_end, t_act),
        "order_queue_consumers": consumers.seen,
        "logs": app_logs(t_act - 1, t_act + 15),
        "after": {"command": health(CMD), "connections": connections(), "queues": queue_leaders()},
    }
    log(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'logs'})}")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="cluster-failover.json")
    ap.add_argument("--scenarios", default="stop,kill-consumer,kill-publisher,kill-leader,kill-all",
                    help="comma-separated, of: stop, kill-consumer, kill-publisher, kill-leader, "
                         "kill-all")
    args = ap.parse_args()
    log(f"cluster of 3 after {wait_cluster():.1f} s; queues: {queue_leaders()}")
    status, body = Client(CMD).request("POST", "/api/products", {
        "name": "Failover probe", "category": f"Failover{random.randint(1000, 9999)}",
        "price": 9.99, "stock": 2_000_000_000})
    if status != 201:
        raise SystemExit(f"creating the product: {status} {body}")
    product = body["productId"]
    scenarios = {
        "stop": ("publisher's node stopped (docker stop)", "stop", "publisher"),
        "kill-consumer": ("consumer's node killed (docker kill)", "kill", "consumer"),
        "kill-publisher": ("publisher's node killed (docker kill)", "kill", "publisher"),
        "kill-leader": ("publisher's node, the order queue's leader, killed (docker kill)",
                        "kill", "leader"),
        "kill-all": ("publisher's and consumer's node, the order queue's leader, killed "
                     "(docker kill)", "kill", "all"),
    }
    results = []
    for key in args.scenarios.split(","):
        name, action, victim = scenarios[key]
        results.append(scenario(name, action, product, victim))
    json.dump(results, open(args.out, "w"), indent=2)
    print("\n| scenario | node | orders | 5xx | lost | doubled | pause | worst event |")
    print("|---|---|---|---|---|---|---|---|")
    bad = 0
    for r in results:
        worst = r["stages"].get("worst_commit_to_apply_s", {}).get("s", 0.0)
        print(f"| {r['scenario']} | {r['node']} | {r['orders']} | {r['fivexx']} | {r['lost']} "
              f"| {r['doubled']} | {r['pause_s']:.2f} s | {worst:.2f} s |")
        ok = (r["fivexx"] == 0 and r["lost"] == 0 and r["doubled"] == 0
              and r["pause_s"] < PAUSE_MAX_S and r["orders"] == r["written"])
        print(("PASS " if ok else "FAIL ") + r["scenario"])
        bad += not ok
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
