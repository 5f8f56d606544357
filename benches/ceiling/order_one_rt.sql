-- POST /api/orders as the command service sends it since issue 13: ONE prepared statement
-- in an implicit transaction (no BEGIN/COMMIT), the call of place_order
-- (sql/write/003_place_order.sql), with the same two lines as order_tx.sql (2 + 1 units,
-- the first with the client's price). Runs against a database migrated by the service
-- with products 1..1000 in stock; pgbench -M prepared binds the variables as parameters.
\set p1 random(1, 500)
\set p2 random(501, 1000)
\set cid random(1, 100000)
SELECT r_outcome, r_order_id, r_product_id, r_available, r_requested,
    r_price_cents, r_key_request, r_key_status, r_key_body
FROM place_order(ARRAY[:p1, :p2]::bigint[], ARRAY[2, 1]::int[], ARRAY[999, NULL]::bigint[],
    :cid::bigint, gen_random_uuid(), '2026-11-26T06:00:00.000Z'::text, NULL::text, NULL::text);
