#!/bin/bash
# What a sync-status request costs once the pipeline has caught up (when it also looks up
# the newest published events by id, src/read/query.rs `unseen`).
#
#     cargo build --release && benches/sync-status.sh target/release/cqrs-analytics new
#
# Starts BINARY `all` on fresh databases and broker names (tagged TAG) of the local
# PostgreSQL and RabbitMQ, places orders for 3 s with wrk (8 connections), waits 2 s, then
# runs `wrk -t1 -c1 -d5s --latency` on sync-status three times and prints p50, p99 and
# requests/s of each; then drops what it made. Needs wrk, curl, psql and rabbitmqctl.
# To compare two commits, build the other in a worktree and run both, interleaved.
set -u
BIN=$1 TAG=$2
W=syncbench_${TAG}_w R=syncbench_${TAG}_r P=syncbench.$TAG
PG=${PG:-postgresql://postgres@localhost:5432}
psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $W" -c "DROP DATABASE IF EXISTS $R" 2>/dev/null
export DATABASE_URL=$PG/$W READ_DATABASE_URL=$PG/$R RUST_LOG=warn
export BROKER_EXCHANGE=$P.ex BROKER_PRODUCT_QUEUE=$P.p BROKER_ORDER_QUEUE=$P.o \
    BROKER_DEAD_LETTER_EXCHANGE=$P.dlx BROKER_DEAD_LETTER_QUEUE=$P.dlq
export COMMAND_SERVICE_PORT=18180 QUERY_SERVICE_PORT=18181 CONSUMER_SERVICE_PORT=18182
"$BIN" all >"/tmp/$P.log" 2>&1 &
PID=$!
for _ in $(seq 100); do curl -sf localhost:18181/health >/dev/null && break; sleep 0.2; done
ID=$(curl -s -XPOST localhost:18180/api/products -H 'content-type: application/json' \
    -d '{"name":"x","category":"c","price":1.5,"stock":1000000}' | sed 's/[^0-9]//g')
LUA=$(mktemp --suffix=.lua)
cat >"$LUA" <<LUA
wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"customerId": 1, "items": [{"productId": $ID, "quantity": 1}]}'
LUA
wrk -t2 -c8 -d3s -s "$LUA" http://localhost:18180/api/orders | grep Requests/sec
sleep 2
curl -s localhost:18181/api/analytics/sync-status; echo
for _ in 1 2 3; do
    wrk -t1 -c1 -d5s --latency http://localhost:18181/api/analytics/sync-status |
        grep -E "Requests/sec| 50%| 99%" | tr -s ' \n' ' '; echo
done
kill $PID; wait $PID
rm -f "$LUA"
psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $W" -c "DROP DATABASE IF EXISTS $R"
for q in $P.p $P.o $P.dlq; do rabbitmqctl delete_queue "$q" >/dev/null 2>&1; done
for e in $P.ex $P.dlx; do
    rabbitmqctl eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$e\">>), false, <<\"cli\">>)." >/dev/null 2>&1
done
