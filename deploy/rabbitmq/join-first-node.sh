#!/bin/sh
# Entrypoint wrapper of the joining nodes (broker-2, broker-3) of
# docker-compose.cluster.yml:
#
#   join-first-node.sh docker-entrypoint.sh rabbitmq-server
#
# A node with no data yet (its first start: no Mnesia directory) must not race
# the first node: it waits until rabbit@broker (CLUSTER_FIRST_NODE) runs, then
# starts and joins it (classic_config peer discovery). A node that has data
# starts at once: after a full stop the last node to stop must come back first,
# and Mnesia makes each node wait for the others' tables, so the three nodes
# must start together (README, "Beyond one machine").
set -eu

first_node=${CLUSTER_FIRST_NODE:-rabbit@broker}
mnesia_base=${RABBITMQ_MNESIA_BASE:-/var/lib/rabbitmq/mnesia}
attempts=${CLUSTER_JOIN_WAIT_ATTEMPTS:-60}

if [ -n "$(ls -A "$mnesia_base" 2>/dev/null)" ]; then
    echo "join-first-node: data in $mnesia_base: starting at once"
else
    echo "join-first-node: first start: waiting for $first_node (at most $attempts tries, 5 s apart)"
    i=0
    until rabbitmq-diagnostics -q -n "$first_node" -t 5 check_running >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge "$attempts" ]; then
            echo "join-first-node: $first_node not running after $i attempts: starting anyway" >&2
            break
        fi
        sleep 5
    done
    [ "$i" -lt "$attempts" ] && echo "join-first-node: $first_node is running: starting"
fi

exec "$@"
