#!/usr/bin/env bash
# PostgreSQL's own CPU per order, counted in instructions (callgrind): the server-side
# cost of one `place_order` call, which no profile of our process shows. Makes a scratch
# cluster (initdb, in a temporary directory, port 5499, stopped and removed at the end),
# migrates it with the release binary, loads 1,000 products, optionally runs SQL_FILE on
# the write database, then runs PostgreSQL in single-user mode under
# `valgrind --tool=callgrind` twice on fresh copies of that database: 500 and 2,500 calls
# of `place_order` (the two lines of benches/ceiling/order_one_rt.sql) in one PL/pgSQL
# loop, with a COMMIT after each. The difference over 2,000 calls is printed: start-up,
# catalogue loading and the loop's first plans cancel out. Commits are in the figure, the
# wire protocol and other sessions (lock waits, group commit) are not.
#
#   benches/pg-callgrind.sh [SQL_FILE]
#
# Needs valgrind, PostgreSQL's server binaries (PGBIN, default the newest
# /usr/lib/postgresql/*/bin), a release build (BIN, default target/release/cqrs-analytics);
# run it as root (it runs the server as the `postgres` user) or as that user. CG_KEEP=1
# copies the callgrind outputs to target/callgrind/ (pg-side: `callgrind_annotate`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
sql=${1:-}
bin=$(realpath "${BIN:-target/release/cqrs-analytics}")
pgbin=${PGBIN:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -1)}
port=5499
dir=$(mktemp -d /tmp/pg-callgrind.XXXXXX)
as_pg() { if [[ $(id -un) == postgres ]]; then "$@"; else runuser -u postgres -- "$@"; fi; }
chmod 755 "$dir"
[[ $(id -un) == postgres ]] || chown postgres "$dir"
cleanup() {
    as_pg "$pgbin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
as_pg "$pgbin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
as_pg "$pgbin/pg_ctl" -D "$dir/data" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" \
    -l "$dir/log" -w start >/dev/null
psql=(psql -qX -h "$dir" -p "$port" -U postgres)
"${psql[@]}" -d postgres -c "CREATE DATABASE cg" -c "CREATE DATABASE cg_read"
DATABASE_URL="postgresql://postgres@127.0.0.1:$port/cg" \
    READ_DATABASE_URL="postgresql://postgres@127.0.0.1:$port/cg_read" RUST_LOG=warn "$bin" migrate >/dev/null
"${psql[@]}" -d cg -c "INSERT INTO products (name, category, price, stock)
    SELECT 'p' || g, 'c' || (g % 10), 9.99, 1000000000 FROM generate_series(1, 1000) g"
[[ -z $sql ]] || "${psql[@]}" -d cg -v ON_ERROR_STOP=1 -f "$sql"
"${psql[@]}" -d cg -c "VACUUM ANALYZE"
for n in 500 2500; do
    "${psql[@]}" -d postgres -c "CREATE DATABASE cg_$n TEMPLATE cg"
    echo "DO \$\$ DECLARE r record; BEGIN FOR i IN 1..$n LOOP SELECT * INTO r FROM place_order(ARRAY[1 + (i % 500), 501 + (i % 500)]::bigint[], ARRAY[2, 1]::int[], ARRAY[999, NULL]::bigint[], i::bigint, gen_random_uuid(), '2026-11-26T06:00:00.000Z'::text, NULL::text, NULL::text); COMMIT; END LOOP; END \$\$;" >"$dir/loop_$n.sql"
done
as_pg "$pgbin/pg_ctl" -D "$dir/data" -w stop >/dev/null
declare -A total
for n in 500 2500; do
    total[$n]=$(as_pg sh -c "cd '$dir' && valgrind --tool=callgrind --callgrind-out-file='$dir/cg.%p' \
        '$pgbin/postgres' --single -D '$dir/data' cg_$n <'$dir/loop_$n.sql'" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p')
done
if [[ -n ${CG_KEEP:-} ]]; then
    mkdir -p target/callgrind && cp "$dir"/cg.* target/callgrind/
fi
echo "PostgreSQL instructions per place_order call: $(((total[2500] - total[500]) / 2000))" \
    "(500 calls: ${total[500]}, 2500 calls: ${total[2500]})"
