-- Read model: four denormalised views the query service reads by primary key, the
-- processed-event ledger that makes the consumer idempotent, and the sync status.
-- Money is NUMERIC: exact to the cent in storage and in every sum.

CREATE TABLE product_sales_view (
    product_id           BIGINT PRIMARY KEY,
    name                 TEXT,
    category             TEXT,
    total_quantity_sold  BIGINT NOT NULL DEFAULT 0 CHECK (total_quantity_sold >= 0),
    total_revenue        NUMERIC(24, 2) NOT NULL DEFAULT 0 CHECK (total_revenue >= 0),
    order_count          BIGINT NOT NULL DEFAULT 0 CHECK (order_count >= 0),
    last_updated         TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE category_metrics_view (
    category_name  TEXT PRIMARY KEY,
    total_revenue  NUMERIC(24, 2) NOT NULL DEFAULT 0 CHECK (total_revenue >= 0),
    total_orders   BIGINT NOT NULL DEFAULT 0 CHECK (total_orders >= 0),
    last_updated   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE customer_ltv_view (
    customer_id      BIGINT PRIMARY KEY,
    total_spent      NUMERIC(24, 2) NOT NULL DEFAULT 0 CHECK (total_spent >= 0),
    order_count      BIGINT NOT NULL DEFAULT 0 CHECK (order_count >= 0),
    last_order_date  TIMESTAMPTZ,
    last_updated     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE hourly_sales_view (
    hour_timestamp  TIMESTAMPTZ PRIMARY KEY CHECK (date_trunc('hour', hour_timestamp) = hour_timestamp),
    total_orders    BIGINT NOT NULL DEFAULT 0 CHECK (total_orders >= 0),
    total_revenue   NUMERIC(24, 2) NOT NULL DEFAULT 0 CHECK (total_revenue >= 0),
    last_updated    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per applied event; inserting it is the idempotency check. `event_timestamp`
-- and `processed_at` give the end-to-end latency the sync-status route reports.
CREATE TABLE processed_events (
    event_id         UUID PRIMARY KEY,
    event_type       TEXT NOT NULL,
    event_timestamp  TIMESTAMPTZ NOT NULL,
    processed_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
-- BRIN: nearly free to maintain on an append-mostly table, enough for "the last minute".
CREATE INDEX processed_events_processed_at ON processed_events USING brin (processed_at);

CREATE TABLE sync_status (
    id                              INTEGER PRIMARY KEY CHECK (id = 1),
    last_processed_event_timestamp  TIMESTAMPTZ,
    events_applied                  BIGINT NOT NULL DEFAULT 0,
    last_applied_at                 TIMESTAMPTZ
);
INSERT INTO sync_status (id) VALUES (1);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consumer_app') THEN
        GRANT SELECT, INSERT, UPDATE ON product_sales_view, category_metrics_view, customer_ltv_view,
            hourly_sales_view, processed_events, sync_status TO consumer_app;
        GRANT SELECT ON schema_migrations TO consumer_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'query_app') THEN
        GRANT SELECT ON product_sales_view, category_metrics_view, customer_ltv_view,
            hourly_sales_view, processed_events, sync_status TO query_app;
    END IF;
END
$$;
