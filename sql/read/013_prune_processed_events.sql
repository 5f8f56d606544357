-- The retention pruner (src/ops/retention.rs) deletes processed_events rows through this
-- function, which runs with the rights of its owner, the role that migrates. consumer_app
-- loses DELETE on processed_events, the deduplication record: whatever the consumer
-- service is made to run, it cannot make a redelivered event apply twice by deleting the
-- record of a recent one. The function keeps at least the last minute (what sync-status's
-- latency figures read; the pruner never asks for less).
--
-- One batch, oldest first from `p_after`: rows older than the window, deleted by ctid.
-- Returns the rows removed and the newest `processed_at` deleted (the next cursor). The
-- batch size goes in as a literal, so that the planner always sees the LIMIT it runs with.
CREATE FUNCTION prune_processed_events(
    p_after timestamptz, p_window_secs float8, p_limit integer,
    OUT removed bigint, OUT newest timestamptz)
LANGUAGE plpgsql SECURITY DEFINER AS $fn$
BEGIN
    EXECUTE format($q$
        WITH gone AS (
            DELETE FROM processed_events WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM processed_events
                WHERE processed_at >= $1 AND processed_at < now() - make_interval(secs => $2)
                ORDER BY processed_at LIMIT %s))
            RETURNING processed_at
        )
        SELECT count(*), max(processed_at) FROM gone
        $q$, greatest(p_limit, 1))
    INTO removed, newest
    USING p_after, greatest(p_window_secs, 60);
END
$fn$;

-- A SECURITY DEFINER function resolves names in a fixed schema, not in its caller's path.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION prune_processed_events(timestamptz, float8, integer) SET search_path = %I, pg_temp',
                   current_schema());
END
$$;

REVOKE ALL ON FUNCTION prune_processed_events(timestamptz, float8, integer) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consumer_app') THEN
        GRANT EXECUTE ON FUNCTION prune_processed_events(timestamptz, float8, integer) TO consumer_app;
        REVOKE DELETE ON processed_events FROM consumer_app;
    END IF;
END
$$;
