-- The retention pruner (src/ops/retention.rs) deletes published outbox rows through this
-- function, which runs with the rights of its owner, the role that migrates. command_app
-- loses DELETE on the outbox: whatever the command service is made to run, it cannot
-- remove an event that has not been published. The function deletes only published rows.
--
-- One batch, in id order from `p_after` up to `p_bound` (the first row that may still wait
-- in the broker): the walk stops at the first row not expired yet (ids and creation times
-- rise together) and deletes the published rows of the expired prefix; an unpublished row
-- stays, whatever its age. Returns the rows removed, examined, and the last id examined.
-- The statement is the pruner's former one; the batch size goes in as a literal, so that
-- the planner always sees the LIMIT it runs with.
CREATE FUNCTION prune_outbox(
    p_after bigint, p_window_secs float8, p_bound bigint, p_limit integer,
    OUT removed bigint, OUT examined bigint, OUT last_id bigint)
LANGUAGE plpgsql SECURITY DEFINER AS $fn$
BEGIN
    EXECUTE format($q$
        WITH head AS (
            SELECT id, created_at, published_at FROM outbox
            WHERE id > $1 AND id < $3 ORDER BY id LIMIT %s
        ), expired AS (
            SELECT id, published_at FROM head
            WHERE id < coalesce(
                (SELECT min(id) FROM head WHERE created_at >= now() - make_interval(secs => $2)),
                9223372036854775807)
        ), gone AS (
            DELETE FROM outbox o USING expired e
            WHERE o.id = e.id AND e.published_at IS NOT NULL
            RETURNING o.id
        )
        SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM expired), (SELECT max(id) FROM expired)
        $q$, greatest(p_limit, 1))
    INTO removed, examined, last_id
    USING p_after, p_window_secs, p_bound;
END
$fn$;

-- A SECURITY DEFINER function resolves names in a fixed schema, not in its caller's path.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION prune_outbox(bigint, float8, bigint, integer) SET search_path = %I, pg_temp',
                   current_schema());
END
$$;

REVOKE ALL ON FUNCTION prune_outbox(bigint, float8, bigint, integer) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'command_app') THEN
        GRANT EXECUTE ON FUNCTION prune_outbox(bigint, float8, bigint, integer) TO command_app;
        REVOKE DELETE ON outbox FROM command_app;
    END IF;
END
$$;
