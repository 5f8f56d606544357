-- The query side's ceiling: pgbench's built-in select-only script (`pgbench -S`), one
-- primary-key lookup per transaction on pgbench_accounts (`pgbench -i -s 10`).
\set aid random(1, 100000 * :scale)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
