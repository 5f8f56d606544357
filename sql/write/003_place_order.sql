-- POST /api/orders in one round trip (issue 13). The command service calls this function as
-- one prepared statement in an implicit transaction: no BEGIN, no COMMIT, no separate
-- locking SELECT. It locks the order's product rows in id order (so concurrent orders
-- neither oversell nor deadlock), validates every line against the locked rows and only
-- then writes the order, its items, the stock decrements, the OrderCreated outbox row and
-- the Idempotency-Key record, so everything commits together or nothing is written.
--
-- A rejected order is not an exception: the function returns one row whose `r_outcome`
-- says what happened, and the service maps it to the HTTP answer in one place
-- (`command::order_rejected`):
--   'ok'       r_order_id is the new order
--   'missing'  r_product_id does not exist
--   'price'    r_product_id's catalogue price (r_price_cents) differs from the client's
--   'stock'    r_product_id has r_available units, the line asked for r_requested
--   'key'      the Idempotency-Key is already recorded (a concurrent request with the same
--              key committed first): r_key_request, r_key_status, r_key_body are its record
-- Only 'ok' writes anything; the other outcomes commit nothing but the row locks' release.
--
-- The OrderCreated payload is built here because the product names and categories are
-- only known under the lock; its fields are those of `event::OrderCreated` (src/event.rs).
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
    INSERT INTO orders (id, customer_id, total) VALUES (r_order_id, p_customer_id, v_total);
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

-- Least privilege: only the command service may place orders (the function runs with the
-- caller's rights, so command_app's table grants of 001 are what it uses).
REVOKE EXECUTE ON FUNCTION place_order(bigint[], integer[], bigint[], bigint, uuid, text, text, text)
    FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'command_app') THEN
        GRANT EXECUTE ON FUNCTION
            place_order(bigint[], integer[], bigint[], bigint, uuid, text, text, text)
            TO command_app;
    END IF;
END
$$;
