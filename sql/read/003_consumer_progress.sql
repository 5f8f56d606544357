-- What each consumer process holds right now: deliveries taken from the broker and not yet
-- applied (its batch and its prefetch window). A stuck consumer holds them unacked, where a
-- passive queue declare cannot see them; this row lets sync-status count them and age the
-- oldest. Written every half second by the process's reporter thread, outside the apply
-- transactions, so it stays current while an apply is blocked; a row not updated for a
-- while belongs to a process that is gone (its deliveries went back to the queue).
CREATE TABLE consumer_progress (
    instance_id           UUID PRIMARY KEY,
    held_messages         INTEGER NOT NULL CHECK (held_messages >= 0),
    oldest_held_event_at  TIMESTAMPTZ,
    stalled_reason        TEXT,
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consumer_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON consumer_progress TO consumer_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'query_app') THEN
        GRANT SELECT ON consumer_progress TO query_app;
    END IF;
END
$$;
