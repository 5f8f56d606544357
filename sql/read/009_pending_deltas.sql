-- Consumers that do not wait for each other on product and customer rows (issue 15).
-- One transaction at a time writes `product_sales_view` and `customer_ltv_view`: the one
-- holding the fold lock (`projection::claim`, a transaction-level advisory try-lock).
-- A concurrent batch that cannot take it adds its product and customer sums to these
-- tables instead, under the shard it holds (006), so no two transactions ever write the
-- same row. The fold lock's holder moves the pending rows of every shard no one holds into
-- the views in its own transaction, and an idle consumer folds what is left. Readers of
-- one product or customer add its pending rows (a few at most); the ranked lists read the
-- views, which trail the pending rows by at most one batch under load.
CREATE TABLE product_sales_delta (
    shard       SMALLINT NOT NULL CHECK (shard BETWEEN 0 AND 63),
    product_id  BIGINT NOT NULL,
    name        TEXT,
    category    TEXT,
    quantity    BIGINT NOT NULL,
    revenue     NUMERIC(24, 2) NOT NULL,
    orders      BIGINT NOT NULL,
    PRIMARY KEY (shard, product_id)
);
CREATE INDEX product_sales_delta_by_product ON product_sales_delta (product_id);

CREATE TABLE customer_ltv_delta (
    shard        SMALLINT NOT NULL CHECK (shard BETWEEN 0 AND 63),
    customer_id  BIGINT NOT NULL,
    spent        NUMERIC(24, 2) NOT NULL,
    orders       BIGINT NOT NULL,
    last_order   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (shard, customer_id)
);
CREATE INDEX customer_ltv_delta_by_customer ON customer_ltv_delta (customer_id);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consumer_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON product_sales_delta, customer_ltv_delta TO consumer_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'query_app') THEN
        GRANT SELECT ON product_sales_delta, customer_ltv_delta TO query_app;
    END IF;
END
$$;
