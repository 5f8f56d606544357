#!/usr/bin/env bash
# Property-based API testing with schemathesis (PyPI) against the running services, using
# the repository's openapi.json (the same document the binary serves at /openapi.json).
#
# Starts `cqrs-analytics all` on two fresh databases, unique broker names and free ports,
# seeds a few products and orders so the read routes have data, then runs schemathesis
# against each service with only that service's operations (selected by tag). Fails if
# any check fails. The server is stopped and the databases and queues removed on exit.
#
# Environment (all optional):
#   ST_PG_URL          superuser URL without a database (postgresql://postgres@127.0.0.1:5432)
#   ST_BROKER_URL      AMQP URL of the broker (amqp://guest:guest@127.0.0.1:5672/%2f)
#   ST_MAX_EXAMPLES    test cases per operation and phase (default 100)
#   ST_SEED            schemathesis seed, to reproduce a run (default: random, printed)
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
PG_URL=${ST_PG_URL:-postgresql://postgres@127.0.0.1:5432}
BROKER_URL=${ST_BROKER_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-100}
SEED=${ST_SEED:-$RANDOM$RANDOM}
RUN_ID="st$$"
WRITE_DB="st_write"
READ_DB="st_read"
EXCHANGE="$RUN_ID.events"
PRODUCT_QUEUE="$RUN_ID.product-events"
ORDER_QUEUE="$RUN_ID.order-events"
DLX="$RUN_ID.dead-letter"
DLQ="$RUN_ID.dead-letter"

log() { printf '[schemathesis] %s\n' "$*" >&2; }

py=$(command -v python3 || command -v python)

# --- schemathesis --------------------------------------------------------------------------
installed=$("$py" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null || true)
if [ "$installed" != "$SCHEMATHESIS_VERSION" ]; then
    log "installing schemathesis==$SCHEMATHESIS_VERSION from PyPI"
    PIP_ROOT_USER_ACTION=ignore "$py" -m pip install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION"
fi
st() { "$py" -m schemathesis.cli "$@"; }
st --version >/dev/null

# --- the binary ------------------------------------------------------------------------------
cargo build --locked --quiet
BIN=target/debug/cqrs-analytics

# --- clean-up, whatever happens --------------------------------------------------------------
WORK=$(mktemp -d)
SERVER_PID=""
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 "$PG_URL/postgres" -c "$1" >/dev/null; }
drop_databases() {
    psql_admin "DROP DATABASE IF EXISTS $WRITE_DB WITH (FORCE)" || true
    psql_admin "DROP DATABASE IF EXISTS $READ_DB WITH (FORCE)" || true
}
delete_broker_objects() {
    # Best effort: this run's queues and exchanges, so repeated runs leave nothing behind
    # (rabbitmqctl has no delete_exchange; eval calls the broker's own function).
    command -v rabbitmqctl >/dev/null 2>&1 || return 0
    local q x
    for q in "$PRODUCT_QUEUE" "$ORDER_QUEUE" "$DLQ"; do
        rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
    done
    for x in "$EXCHANGE" "$DLX"; do
        rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"ci\">>)." >/dev/null 2>&1 || true
    done
}
cleanup() {
    local rc=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ -f "$WORK/server.log" ]; then
        log "server log (last 40 lines):"
        tail -n 40 "$WORK/server.log" >&2 || true
    fi
    drop_databases
    delete_broker_objects
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- databases, ports, server ------------------------------------------------------------------
drop_databases
psql_admin "CREATE DATABASE $WRITE_DB"
psql_admin "CREATE DATABASE $READ_DB"

# Three ports that are free now (the kernel picks them).
read -r CMD_PORT QRY_PORT CON_PORT < <("$py" - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)

log "starting $BIN all: command :$CMD_PORT, query :$QRY_PORT, consumer :$CON_PORT (seed $SEED)"
env DATABASE_URL="$PG_URL/$WRITE_DB" READ_DATABASE_URL="$PG_URL/$READ_DB" \
    BROKER_URL="$BROKER_URL" HTTP_BIND_ADDR=127.0.0.1 \
    COMMAND_SERVICE_PORT="$CMD_PORT" QUERY_SERVICE_PORT="$QRY_PORT" \
    CONSUMER_SERVICE_PORT="$CON_PORT" \
    BROKER_EXCHANGE="$EXCHANGE" BROKER_PRODUCT_QUEUE="$PRODUCT_QUEUE" \
    BROKER_ORDER_QUEUE="$ORDER_QUEUE" BROKER_DEAD_LETTER_EXCHANGE="$DLX" \
    BROKER_DEAD_LETTER_QUEUE="$DLQ" OUTBOX_POLL_INTERVAL_MS=100 \
    RUST_LOG="${RUST_LOG:-warn}" \
    "$BIN" all >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

for port in "$CMD_PORT" "$QRY_PORT" "$CON_PORT"; do
    for _ in $(seq 300); do
        curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { log "the server exited during start-up"; exit 1; }
        sleep 0.1
    done
    curl -fsS -o /dev/null "http://127.0.0.1:$port/health"
done

# --- seed data -------------------------------------------------------------------------------
post() { # path body -> prints the response body, fails unless 201
    curl -fsS -X POST -H 'Content-Type: application/json' --data "$2" \
        "http://127.0.0.1:$CMD_PORT$1"
}
for p in '{"name":"Gaming Laptop","category":"Electronics","price":1299.99,"stock":100000}' \
    '{"name":"Desk Lamp","category":"Home & Garden","price":24.5,"stock":100000}' \
    '{"name":"Coffee","category":"Food","price":9.99,"stock":100000}'; do
    post /api/products "$p" >/dev/null
done
post /api/orders '{"customerId":1,"items":[{"productId":1,"quantity":1,"price":1299.99},{"productId":2,"quantity":3}]}' >/dev/null
post /api/orders '{"customerId":2,"items":[{"productId":3,"quantity":2}]}' >/dev/null
post /api/orders '{"customerId":1,"items":[{"productId":2,"quantity":1}]}' >/dev/null
# Wait until the read model has applied them, so the read routes answer 200 as well as 404.
for _ in $(seq 200); do
    body=$(curl -fsS "http://127.0.0.1:$QRY_PORT/api/analytics/customers/1/lifetime-value" 2>/dev/null || true)
    case $body in *'"orderCount":2'*) break ;; esac
    sleep 0.1
done
case $body in
    *'"orderCount":2'*) log "seeded: 3 products, 3 orders, read model up to date" ;;
    *) log "the read model did not apply the seed orders: $body"; exit 1 ;;
esac

# --- schemathesis ----------------------------------------------------------------------------
# Checks, and why not `--checks all`:
#   not_a_server_error            no 5xx, ever (the contract: no client input yields a 5xx)
#   status_code_conformance       every status is one the document lists for the operation
#   content_type_conformance      the Content-Type is the documented one
#   response_schema_conformance   every body validates against the documented schema
#   response_headers_conformance  documented response headers are present and valid
#   negative_data_rejection       input the document forbids is rejected with a 4xx
# Left out:
#   positive_data_acceptance      would require schema-valid input to succeed, but validity
#                                 here also depends on state (unknown productId or stock -> 400,
#                                 price -> 409, reused Idempotency-Key -> 422) and on rules no JSON
#                                 Schema expresses (trimming, 2 decimals, unique productIds)
#   unsupported_method,           probe methods the document does not list (TRACE, DELETE...),
#   allow_header_conformance      so they test RFC 9110, not the document. The server answers
#                                 them 405 JSON but without the Allow header RFC 9110 requires:
#                                 a known gap, tracked separately; add these two checks once the
#                                 405 responses carry Allow
#   missing_required_header,      there are no required headers and no authentication
#   ignored_auth
#   use_after_free,               need DELETE operations or stateful links; the API has neither
#   ensure_resource_availability,
#   object_level_authorization
# A request the server answers with no response at all (connection closed) is reported by
# schemathesis as a network error and fails the run too. Phases: examples, coverage (the
# boundaries and violations of every constraint) and fuzzing; stateful needs OpenAPI links,
# which this API has none of.
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance
CHECKS+=,response_schema_conformance,response_headers_conformance,negative_data_rejection

failed=()
run_st() { # tag port
    local tag=$1 port=$2
    log "schemathesis: tag $tag against http://127.0.0.1:$port"
    # From $WORK, so that schemathesis' cache (.schemathesis/) stays out of the repository.
    if ! (cd "$WORK" && st run "$OLDPWD/openapi.json" \
        --url "http://127.0.0.1:$port" \
        --include-tag "$tag" \
        --checks "$CHECKS" \
        --phases examples,coverage,fuzzing \
        --max-examples "$MAX_EXAMPLES" \
        --seed "$SEED" \
        --workers 4 \
        --request-timeout 10 \
        --generation-database none \
        --suppress-health-check all \
        --no-color \
        --report junit --report-dir "${ST_REPORT_DIR:-$WORK/report}/$tag"); then
        failed+=("$tag")
    fi
}
run_st command "$CMD_PORT"
run_st query "$QRY_PORT"
run_st consumer "$CON_PORT"

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "the server died during the run"
    exit 1
fi
if [ "${#failed[@]}" -gt 0 ]; then
    log "FAILED: ${failed[*]} (seed $SEED; rerun with ST_SEED=$SEED)"
    exit 1
fi
log "OK: command, query and consumer conform to openapi.json (seed $SEED)"
