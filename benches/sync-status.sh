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
# shellcheck source=benches/scratch-all.sh
. "$(dirname "$0")/scratch-all.sh"
scratch_start "$BIN" "syncbench_$TAG" 18180
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
rm -f "$LUA"
scratch_stop
