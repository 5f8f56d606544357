#!/bin/bash
# Where an order's cost goes with the whole pipeline running, per process, and what it
# writes: CPU per process group (from /proc), commits per order on each database, WAL
# bytes and WAL flushes per order.
#
#     cargo build --release && benches/orders-cpu.sh target/release/cqrs-analytics base
#     benches/orders-cpu.sh target/release/cqrs-analytics alone OUTBOX_PUBLISHERS=0
#
# Starts BINARY `all` (with the VAR=VALUE settings given) on fresh databases and broker
# names (tagged TAG) of the local PostgreSQL and RabbitMQ, creates 200 products, then runs
# wrk with 32 connections for 12 s of orders of 1 to 3 lines, reading CPU over 8 s of it,
# and prints orders/s, cores per process group and the per-order figures. SQLW='...' runs
# that SQL on the write database before the load (a schema experiment). Drops what it made.
# Needs wrk, curl, psql, rabbitmqctl. Compare binaries or settings interleaved: one run's
# orders/s moves by some 5 % on this machine.
set -u
BIN=$1 TAG=$2
shift 2
# shellcheck source=benches/scratch-all.sh
. "$(dirname "$0")/scratch-all.sh"
scratch_start "$BIN" "ordcpu_$TAG" 18280 "$@"
for i in $(seq 1 200); do
    curl -s -o /dev/null -XPOST localhost:18280/api/products -H 'content-type: application/json' \
        -d "{\"name\":\"p$i\",\"category\":\"c$((i % 10))\",\"price\":$((i % 50 + 1)).99,\"stock\":100000000}"
done
[ -n "${SQLW:-}" ] && psql -q "$PG/$W" -c "$SQLW"
LUA=$(mktemp --suffix=.lua)
cat >"$LUA" <<'LUA'
math.randomseed(os.time())
request = function()
  local n = math.random(1, 3); local items = {}; local used = {}
  while #items < n do
    local k = math.random(1, 200)
    if not used[k] then
      used[k] = true
      table.insert(items, string.format('{"productId":%d,"quantity":%d}', k, math.random(1, 3)))
    end
  end
  return wrk.format("POST", "/api/orders", {["Content-Type"] = "application/json"},
    string.format('{"customerId":%d,"items":[%s]}', math.random(1, 20000), table.concat(items, ",")))
end
LUA
# Ticks of user and system time per process group, summed over every process.
cpu() {
    for s in /proc/[0-9]*/stat; do awk '{c=$2; gsub(/[()]/,"",c); print $1, c, $14+$15}' "$s" 2>/dev/null; done |
        awk -v ours="$PID" '{g="other"; if ($1 == ours) g="ours"; else if ($2 ~ /^postgres/) g="postgres";
              else if ($2 ~ /beam|epmd|erl_/) g="rabbitmq"; else if ($2 ~ /^wrk/) g="wrk";
              t[g]+=$3} END {for (k in t) print k, t[k]}' | sort
}
stats() {
    psql -Atq "$PG/postgres" -c "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = '$W'),
        (SELECT xact_commit FROM pg_stat_database WHERE datname = '$R'),
        wal_bytes, wal_sync FROM pg_stat_wal" | tr '|' ' '
}
orders() { psql -Atq "$PG/$W" -c "SELECT count(*) FROM orders"; }
OUT=$(mktemp)
o0=$(orders) s0=$(stats)
wrk -t2 -c32 -d12s -s "$LUA" http://127.0.0.1:18280 >"$OUT" &
sleep 2
c0=$(cpu) t0=$(date +%s.%N)
sleep 8
c1=$(cpu) t1=$(date +%s.%N)
wait %2 2>/dev/null
sleep 1
o1=$(orders) s1=$(stats)
echo "== $TAG: $(grep Requests/sec "$OUT" | tr -s ' ') $(grep -q Non-2xx "$OUT" && grep Non-2xx "$OUT")"
join <(echo "$c0") <(echo "$c1") | awk -v d="$(echo "$t1 - $t0" | bc)" \
    '{printf "%s %.3f cores  ", $1, ($3 - $2) / 100 / d} END {print ""}'
echo "$s0 $s1 $((o1 - o0))" | awk '{n = $9; printf "orders %d; per order: write commits %.2f, read commits %.3f, WAL bytes %.0f, WAL flushes %.3f\n",
    n, ($5 - $1) / n, ($6 - $2) / n, ($7 - $3) / n, ($8 - $4) / n}'
rm -f "$LUA" "$OUT"
scratch_stop
