-- The consumer's flush barrier (src/read/projection.rs, FLUSH_BARRIER). The consumer commits
-- its batches with synchronous_commit=off, so readers see a batch without waiting for the WAL
-- flush, and before it acks it commits one more transaction synchronously. That commit waits
-- for the flush only if the transaction wrote WAL and has an id; `setval` on a sequence does
-- both, always (a sequence is not transactional, so no consumer ever waits for another's
-- lock), and flushing its commit record flushes the batch's before it.
CREATE SEQUENCE consumer_flush_barrier;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consumer_app') THEN
        GRANT UPDATE ON SEQUENCE consumer_flush_barrier TO consumer_app;
    END IF;
END
$$;
