-- The checks an order paid for without needing them (issue 13).
--
-- PostgreSQL 15 rebuilds every CHECK constraint of a table from its stored text
-- (stringToNode, then expression compilation) at each execution of a statement that
-- writes the table, and an UPDATE evaluates them all, whatever columns it changes. An
-- order writes four tables, so its nine CHECKs were rebuilt at every order:
-- benches/pg-callgrind.sh counted 1,319,535 instructions of PostgreSQL's per place_order
-- call with them and 1,086,202 with only `stock >= 0` left (-17.7 %;
-- benches/HISTORY.md, eighth pass).
--
-- * products: name, category and price are rules of the catalogue, for any writer. They
--   move to a trigger that fires only when a row is inserted or one of those columns is
--   named in an UPDATE, so the order's stock update never runs it. `stock >= 0` stays a
--   CHECK: it is the last guard against an oversell, checked at every decrement.
-- * orders (customer_id > 0, total > 0), order_items (quantity 1 to 10,000, price > 0) and
--   outbox (topic): these rows are written only by place_order and the product insert of
--   src/write/command.rs. The service refuses a customer id or a quantity out of range
--   with a 400 before the database is touched; total and price are the catalogue's prices
--   (guarded above) times such quantities; the topic is a literal in the SQL. The
--   constraints repeated those guarantees and are dropped.
CREATE FUNCTION products_valid() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF char_length(NEW.name) NOT BETWEEN 1 AND 200 THEN
        RAISE check_violation USING MESSAGE = 'a product name has 1 to 200 characters',
            TABLE = 'products', COLUMN = 'name';
    END IF;
    IF char_length(NEW.category) NOT BETWEEN 1 AND 200 THEN
        RAISE check_violation USING MESSAGE = 'a product category has 1 to 200 characters',
            TABLE = 'products', COLUMN = 'category';
    END IF;
    IF NOT (NEW.price > 0 AND NEW.price < 1000000000) THEN
        RAISE check_violation USING MESSAGE = 'a product price is above 0 and below 1000000000',
            TABLE = 'products', COLUMN = 'price';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER products_valid BEFORE INSERT OR UPDATE OF name, category, price ON products
    FOR EACH ROW EXECUTE FUNCTION products_valid();

ALTER TABLE products
    DROP CONSTRAINT IF EXISTS products_name_check,
    DROP CONSTRAINT IF EXISTS products_category_check,
    DROP CONSTRAINT IF EXISTS products_price_check;
ALTER TABLE orders
    DROP CONSTRAINT IF EXISTS orders_customer_id_check,
    DROP CONSTRAINT IF EXISTS orders_total_check;
ALTER TABLE order_items
    DROP CONSTRAINT IF EXISTS order_items_quantity_check,
    DROP CONSTRAINT IF EXISTS order_items_price_check;
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_topic_check;
