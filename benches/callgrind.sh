#!/usr/bin/env bash
# CPU per request, counted in instructions (callgrind): repeatable on a noisy shared machine,
# where wall-clock profiles are not. Runs the release binary under valgrind against fresh
# databases, warms up, zeroes the counters, sends N requests from 4 keep-alive clients,
# dumps the counters and prints instructions per request.
#
#   benches/callgrind.sh orders  [N]   # command-service, POST /api/orders (2 lines, prices)
#   benches/callgrind.sh queries [N]   # query-service, GET /api/analytics/products/{id}/sales
#
# The query service keeps its answers (`src/read/cache.rs`): `queries` counts cache hits;
# QUERY_CACHE_BYTES=0 in the environment counts the database path.
# N defaults to 2000. Needs valgrind, psql and a release build (`cargo build --release`).
# Environment: PG_URL (superuser, no database; default postgresql://postgres@127.0.0.1:5432),
# PORT (default 20501), BIN (default target/release/cqrs-analytics), CG_KEEP=1 keeps the
# callgrind output (for `callgrind_annotate`) in target/callgrind/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what=${1:?usage: callgrind.sh orders|queries [N]}
n=${2:-2000}
pg=${PG_URL:-postgresql://postgres@127.0.0.1:5432}
port=${PORT:-20501}
bin=${BIN:-target/release/cqrs-analytics}
tag="cg_$$"
out=target/callgrind
mkdir -p "$out"
export DATABASE_URL="$pg/${tag}_write" READ_DATABASE_URL="$pg/${tag}_read"
export OUTBOX_PUBLISHERS=0 RUST_LOG=warn COMMAND_SERVICE_PORT=$port QUERY_SERVICE_PORT=$port
for db in write read; do psql -qX "$pg/postgres" -c "CREATE DATABASE ${tag}_$db" >/dev/null; done
cleanup() {
    [[ -n ${pid:-} ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    for db in write read; do
        psql -qX "$pg/postgres" -c "DROP DATABASE IF EXISTS ${tag}_$db WITH (FORCE)" >/dev/null
    done
    [[ ${CG_KEEP:-0} == 1 ]] || rm -f "$out/$tag".*
}
trap cleanup EXIT
"$bin" migrate >/dev/null
psql -qX "$DATABASE_URL" -c "INSERT INTO products (name, category, price, stock)
    SELECT 'p' || i, 'c' || (i % 5), 9.99, 2000000000 FROM generate_series(1, 200) i" >/dev/null
psql -qX "$READ_DATABASE_URL" -c "INSERT INTO product_sales_view (product_id, name, category,
    total_quantity_sold, total_revenue, order_count)
    SELECT i, 'p' || i, 'c', i, i * 9.99, i FROM generate_series(1, 200) i" >/dev/null
case $what in
orders) service=command-service ;;
queries) service=query-service ;;
*) echo "unknown: $what" >&2; exit 2 ;;
esac
valgrind --tool=callgrind --callgrind-out-file="$out/$tag.%p" "$bin" $service 2>"$out/$tag.log" &
pid=$!
load() { # count
    python3 - "$what" "$1" "$port" <<'EOF'
import http.client, json, sys, threading
what, n, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def client(k):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(k, n, 4):
        if what == "orders":
            p = 1 + i % 100
            body = json.dumps({"customerId": 1 + i, "items": [
                {"productId": p, "quantity": 1, "price": 9.99},
                {"productId": p + 100, "quantity": 2, "price": 9.99}]})
            c.request("POST", "/api/orders", body, {"Content-Type": "application/json"})
            want = 201
        else:
            c.request("GET", f"/api/analytics/products/{1 + i % 200}/sales")
            want = 200
        r = c.getresponse(); r.read()
        assert r.status == want, (r.status, what)
threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
EOF
}
for _ in $(seq 1 300); do
    curl -sf "localhost:$port/health" >/dev/null && break
    sleep 0.2
done
load 400
callgrind_control -z "$pid" >/dev/null
load "$n"
callgrind_control -d "$pid" >/dev/null
dump=$(ls -t "$out/$tag".* | grep -v log | head -1)
ir=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$dump")
echo "$what: $n requests, $ir instructions, $((ir / n)) per request ($dump)"
