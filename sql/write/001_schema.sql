-- Write model: the normalised catalogue and orders, the transactional outbox and the
-- idempotency keys. Constraints make the bad states impossible, whatever the code does.

CREATE TABLE products (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    category    TEXT NOT NULL CHECK (char_length(category) BETWEEN 1 AND 200),
    price       NUMERIC(12, 2) NOT NULL CHECK (price > 0 AND price < 1000000000),
    stock       INTEGER NOT NULL CHECK (stock >= 0),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id           BIGSERIAL PRIMARY KEY,
    customer_id  BIGINT NOT NULL CHECK (customer_id > 0),
    total        NUMERIC(18, 2) NOT NULL CHECK (total > 0),
    status       TEXT NOT NULL DEFAULT 'created',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE order_items (
    id          BIGSERIAL PRIMARY KEY,
    order_id    BIGINT NOT NULL REFERENCES orders (id),
    product_id  BIGINT NOT NULL REFERENCES products (id),
    quantity    INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 10000),
    price       NUMERIC(12, 2) NOT NULL CHECK (price > 0),
    UNIQUE (order_id, product_id)
);

-- The transactional outbox. Rows are never deleted by the application; the partial index
-- keeps the publisher's claim query proportional to the backlog, not to the history.
CREATE TABLE outbox (
    id            BIGSERIAL PRIMARY KEY,
    topic         TEXT NOT NULL CHECK (topic IN ('product-events', 'order-events')),
    payload       JSONB NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at  TIMESTAMPTZ
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Idempotency-Key records, written in the same transaction as the write they guard.
-- `request` is the route plus the canonical JSON of the body, compared on a retry.
CREATE TABLE idempotency_keys (
    key              TEXT PRIMARY KEY CHECK (char_length(key) BETWEEN 1 AND 255),
    request          TEXT NOT NULL,
    response_status  SMALLINT NOT NULL,
    response_body    TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Least privilege: when the deployment created the application roles, they get exactly
-- what they need and own nothing. Without the roles (a laptop) this does nothing.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'command_app') THEN
        GRANT SELECT, INSERT, UPDATE ON products, orders, order_items, outbox, idempotency_keys TO command_app;
        GRANT USAGE ON SEQUENCE products_id_seq, orders_id_seq, order_items_id_seq, outbox_id_seq TO command_app;
        GRANT SELECT ON schema_migrations TO command_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'query_app') THEN
        GRANT SELECT ON outbox TO query_app;
    END IF;
END
$$;
