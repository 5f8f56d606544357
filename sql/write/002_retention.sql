-- Retention of the write side's bookkeeping (src/retention.rs): published outbox rows older
-- than OUTBOX_RETENTION_SECS and Idempotency-Key records older than IDEMPOTENCY_KEY_TTL_SECS
-- are deleted in small batches by the command service.

-- The pruner walks idempotency keys oldest first.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- Marking a row published leaves its previous version behind (the partial index on
-- `published_at` rules out HOT updates), and retention deletes rows in bulk. Vacuum the
-- outbox after 2% of it changed instead of the default 20%, so that the dead versions are
-- reclaimed within a minute or two and new rows reuse their space instead of growing the file.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02
);
ALTER TABLE idempotency_keys SET (autovacuum_vacuum_scale_factor = 0.02);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'command_app') THEN
        GRANT DELETE ON outbox, idempotency_keys TO command_app;
    END IF;
END
$$;
