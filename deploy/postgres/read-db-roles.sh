#!/usr/bin/env bash
# Read DB (read_db): least-privileged login roles for the services.
#
# Run once by the postgres image's entrypoint, from /docker-entrypoint-initdb.d,
# when the data volume is first initialised (`docker compose down -v` to rerun).
# It connects as the owner (POSTGRES_USER). It only creates the roles and lets
# them connect to this database only (not to the `postgres` and `template1`
# maintenance databases): table privileges are granted by the app's
# migrations (`cqrs-analytics migrate`, run as the owner), which GRANT to
# these roles when they exist.
#
#   consumer_app  the consumer service: reads/writes the *_view tables,
#                 processed_events and sync_status.
#   query_app     the query service: SELECT only.
set -euo pipefail

: "${POSTGRES_USER:?}"
: "${POSTGRES_DB:?}"

psql -v ON_ERROR_STOP=1 --no-psqlrc \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v db="$POSTGRES_DB" \
     -v consumer_pw="${CONSUMER_DB_PASSWORD:-consumer}" \
     -v query_pw="${QUERY_DB_PASSWORD:-query}" <<'SQL'
SELECT 'CREATE ROLE consumer_app'
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consumer_app') \gexec
SELECT 'CREATE ROLE query_app'
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'query_app') \gexec

ALTER ROLE consumer_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
      NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'consumer_pw';
ALTER ROLE query_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
      NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'query_pw';

-- The maintenance databases are the owner's. PUBLIC may connect to them by default,
-- so a leaked app password would open a session there too.
REVOKE CONNECT, TEMPORARY ON DATABASE postgres FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE template1 FROM PUBLIC;

-- Only the owner and these roles may connect to the application database.
REVOKE CONNECT, TEMPORARY ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO consumer_app, query_app;

-- No one but the owner creates objects in public (already so on PostgreSQL 15+).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO consumer_app, query_app;

-- query_app may only read, whatever a migration grants by mistake.
ALTER ROLE query_app SET default_transaction_read_only = on;
SQL
