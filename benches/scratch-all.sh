# shellcheck shell=bash
# Sourced by the bench scripts that run the binary's `all` by hand (orders-cpu.sh,
# sync-status.sh): fresh databases and broker names on the local PostgreSQL and RabbitMQ,
# and their removal afterwards.
#
#     scratch_start BINARY NAME PORT [VAR=VALUE...]
#         drops and names databases NAME_w, NAME_r and broker names NAME.*, exports the
#         variables that point the binary at them (ports PORT, PORT+1, PORT+2 for the
#         command, query and consumer services), starts BINARY `all` with VAR=VALUE on top
#         (its log in /tmp/NAME.log) and waits until the three answer /health; sets W, R,
#         PG and PID
#     scratch_stop
#         stops it and drops the databases, queues and exchanges
# Needs curl, psql and rabbitmqctl.

scratch_start() {
    local bin=$1 name=$2 port=$3
    shift 3
    W=${name}_w R=${name}_r SCRATCH_NAME=$name
    PG=${PG:-postgresql://postgres@localhost:5432}
    psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $W" -c "DROP DATABASE IF EXISTS $R" 2>/dev/null
    export DATABASE_URL=$PG/$W READ_DATABASE_URL=$PG/$R RUST_LOG=warn
    export BROKER_EXCHANGE=$name.ex BROKER_PRODUCT_QUEUE=$name.p BROKER_ORDER_QUEUE=$name.o \
        BROKER_DEAD_LETTER_EXCHANGE=$name.dlx BROKER_DEAD_LETTER_QUEUE=$name.dlq
    export COMMAND_SERVICE_PORT=$port QUERY_SERVICE_PORT=$((port + 1)) \
        CONSUMER_SERVICE_PORT=$((port + 2))
    env "$@" "$bin" all >"/tmp/$name.log" 2>&1 &
    PID=$!
    local p
    for p in $port $((port + 1)) $((port + 2)); do
        for _ in $(seq 100); do curl -sf "localhost:$p/health" >/dev/null && break; sleep 0.2; done
    done
}

scratch_stop() {
    kill "$PID"
    wait "$PID"
    psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $W" -c "DROP DATABASE IF EXISTS $R"
    local q x
    for q in p o dlq; do rabbitmqctl delete_queue "$SCRATCH_NAME.$q" >/dev/null 2>&1; done
    for x in ex dlx; do
        rabbitmqctl eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$SCRATCH_NAME.$x\">>), false, <<\"cli\">>)." >/dev/null 2>&1
    done
}
