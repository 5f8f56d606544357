-- Retention of the read side's bookkeeping (src/retention.rs): processed_events rows older
-- than PROCESSED_EVENTS_RETENTION_SECS (the deduplication window) and event_failures rows
-- not touched for as long are deleted in small batches by the consumer service.

-- The pruner walks processed_events oldest first, and the sync-status latency query reads
-- the newest minute: a B-tree on processed_at serves both (the BRIN index it replaces
-- cannot return rows in order). processed_at only grows, so inserts land at its right edge.
DROP INDEX IF EXISTS processed_events_processed_at;
CREATE INDEX processed_events_processed_at ON processed_events (processed_at);
ALTER TABLE processed_events SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02
);

CREATE INDEX event_failures_updated_at ON event_failures (updated_at);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consumer_app') THEN
        GRANT DELETE ON processed_events TO consumer_app;
    END IF;
END
$$;
