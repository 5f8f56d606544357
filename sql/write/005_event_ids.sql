-- Each product and order records the id and timestamp of the event that announced it, so
-- that `rebuild-read-model` can recompute the read model from these tables alone (the
-- outbox keeps only recent events) and know exactly which events a snapshot covers.
-- `created_at` becomes the event's timestamp (set by the command service, milliseconds),
-- so an order falls in the same hour here as in the read model.
ALTER TABLE products ADD COLUMN event_id UUID;
ALTER TABLE orders ADD COLUMN event_id UUID;

-- place_order (003) as it was, except that the order row now records its event's id and
-- timestamp (the one changed statement is marked). The signature and grants are unchanged.
CREATE OR REPLACE FUNCTION place_order(
    p_product_ids    bigint[],   -- the order's lines, in the request's order
    p_quantities     integer[],
    p_client_prices  bigint[],   -- cents; NULL where the client sent no price
    p_customer_id    bigint,
    p_event_id       uuid,
    p_timestamp      text,       -- the event's RFC 3339 timestamp, formatted by the service
    p_key            text,       -- the Idempotency-Key, NULL without one
    p_request        text,       -- the canonical request the key guards
    OUT r_outcome        text,
    OUT r_order_id       bigint,
    OUT r_product_id     bigint,
    OUT r_available      integer,
    OUT r_requested      integer,
    OUT r_price_cents    bigint,
    OUT r_key_request    text,
    OUT r_key_status     smallint,
    OUT r_key_body       text
) LANGUAGE plpgsql AS $$
DECLARE
    v_total  numeric;
    v_items  jsonb;
    v_key    idempotency_keys%ROWTYPE;
BEGIN
    PERFORM 1 FROM products WHERE id = ANY (p_product_ids) ORDER BY id FOR UPDATE;

    -- The first failing line in the request's order; per line: missing, price, stock.
    SELECT CASE WHEN p.id IS NULL THEN 'missing'
                WHEN u.cents IS NOT NULL AND u.cents <> (p.price * 100)::bigint THEN 'price'
                ELSE 'stock' END,
           u.id, p.stock, u.quantity, (p.price * 100)::bigint
      INTO r_outcome, r_product_id, r_available, r_requested, r_price_cents
      FROM unnest(p_product_ids, p_quantities, p_client_prices)
               WITH ORDINALITY AS u (id, quantity, cents, line)
      LEFT JOIN products p ON p.id = u.id
     WHERE p.id IS NULL
        OR (u.cents IS NOT NULL AND u.cents <> (p.price * 100)::bigint)
        OR p.stock < u.quantity
     ORDER BY u.line
     LIMIT 1;
    IF r_outcome IS NOT NULL THEN
        -- A retry that waited for our locks behind its twin answers as the twin did.
        IF p_key IS NOT NULL THEN
            SELECT * INTO v_key FROM idempotency_keys k WHERE k.key = p_key;
            IF FOUND THEN
                r_outcome := 'key';
                r_key_request := v_key.request;
                r_key_status := v_key.response_status;
                r_key_body := v_key.response_body;
            END IF;
        END IF;
        RETURN;
    END IF;

    r_order_id := nextval('orders_id_seq');
    IF p_key IS NOT NULL THEN
        INSERT INTO idempotency_keys (key, request, response_status, response_body)
        VALUES (p_key, p_request, 201, '{"orderId":' || r_order_id || '}')
        ON CONFLICT (key) DO NOTHING;
        IF NOT FOUND THEN
            -- Not found again (pruned meanwhile) leaves r_key_request NULL: the service
            -- answers 503 and the client retries.
            SELECT * INTO v_key FROM idempotency_keys k WHERE k.key = p_key;
            r_outcome := 'key';
            r_order_id := NULL;
            r_key_request := v_key.request;
            r_key_status := v_key.response_status;
            r_key_body := v_key.response_body;
            RETURN;
        END IF;
    END IF;

    SELECT sum(p.price * u.quantity),
           jsonb_agg(jsonb_build_object('productId', p.id, 'productName', p.name,
                     'category', p.category, 'quantity', u.quantity, 'price', p.price)
                     ORDER BY u.line)
      INTO v_total, v_items
      FROM unnest(p_product_ids, p_quantities) WITH ORDINALITY AS u (id, quantity, line)
      JOIN products p ON p.id = u.id;
    UPDATE products p SET stock = p.stock - u.quantity
      FROM unnest(p_product_ids, p_quantities) AS u (id, quantity)
     WHERE p.id = u.id;
    -- Changed in 005: the event's id and timestamp on the order row.
    INSERT INTO orders (id, customer_id, total, event_id, created_at)
    VALUES (r_order_id, p_customer_id, v_total, p_event_id, p_timestamp::timestamptz);
    INSERT INTO order_items (order_id, product_id, quantity, price)
    SELECT r_order_id, u.id, u.quantity, p.price
      FROM unnest(p_product_ids, p_quantities) AS u (id, quantity)
      JOIN products p ON p.id = u.id;
    INSERT INTO outbox (topic, payload)
    VALUES ('order-events', jsonb_build_object(
        'eventId', p_event_id, 'eventType', 'OrderCreated', 'timestamp', p_timestamp,
        'orderId', r_order_id, 'customerId', p_customer_id, 'items', v_items,
        'total', v_total));
    r_outcome := 'ok';
END
$$;

-- Rows written before this migration: from their outbox rows, where those still exist.
UPDATE products p
SET event_id = (x.payload->>'eventId')::uuid, created_at = (x.payload->>'timestamp')::timestamptz
FROM outbox x
WHERE x.topic = 'product-events' AND (x.payload->>'productId')::bigint = p.id;
UPDATE orders o
SET event_id = (x.payload->>'eventId')::uuid, created_at = (x.payload->>'timestamp')::timestamptz
FROM outbox x
WHERE x.topic = 'order-events' AND (x.payload->>'orderId')::bigint = o.id;

CREATE UNIQUE INDEX products_event_id ON products (event_id);
CREATE UNIQUE INDEX orders_event_id ON orders (event_id);
