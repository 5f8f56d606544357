-- place_order's plans, fixed once per connection (issue 13).
--
-- Its statements take the order's lines as arrays. Under PostgreSQL's default plan cache
-- mode a plan for a known two-element array always looks cheaper than the generic plan
-- for an array of unknown length, so every statement was planned again on every call:
-- about 0.29 ms of planning per order (pgbench, one client, asynchronous commit: 1,889
-- calls/s before, 3,300-3,700 after; 16 clients: 2,041-2,201 before, 3,457-4,334 after).
--
-- A generic plan alone is not enough: it is made from the statistics of the moment, and
-- a catalogue that was never analysed (a fresh database, autovacuum off) made it join
-- the lines to a sequential scan of `products`, for every order until the connection
-- ends. Every statement here is driven by the order's product ids, so the right plan is
-- always the same, whatever the statistics: a nested loop over the lines with lookups on
-- `products_pkey`. The settings below pin that shape (they apply inside the function
-- only, including the foreign-key checks its inserts fire). A later CREATE OR REPLACE of
-- the function drops them: it must repeat them (the test
-- `place_order_looks_products_up_by_key_on_a_never_analysed_catalogue` would fail).
ALTER FUNCTION place_order(bigint[], integer[], bigint[], bigint, uuid, text, text, text)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION place_order(bigint[], integer[], bigint[], bigint, uuid, text, text, text)
    SET enable_seqscan = off;
ALTER FUNCTION place_order(bigint[], integer[], bigint[], bigint, uuid, text, text, text)
    SET enable_bitmapscan = off;
ALTER FUNCTION place_order(bigint[], integer[], bigint[], bigint, uuid, text, text, text)
    SET enable_hashjoin = off;
ALTER FUNCTION place_order(bigint[], integer[], bigint[], bigint, uuid, text, text, text)
    SET enable_mergejoin = off;
