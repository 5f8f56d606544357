-- Failed attempts to apply an event, shared by every consumer thread and process and kept
-- across restarts, so "dead-letter after N attempts" holds however the work is spread.
-- Rows of dead-lettered events stay as a record of why.
CREATE TABLE event_failures (
    message_key  TEXT PRIMARY KEY,
    attempts     INTEGER NOT NULL CHECK (attempts > 0),
    last_error   TEXT NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consumer_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON event_failures TO consumer_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'query_app') THEN
        GRANT SELECT ON event_failures TO query_app;
    END IF;
END
$$;
