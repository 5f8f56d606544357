-- Ranked lists (GET /api/analytics/products, /customers): one btree per sort, in the
-- order of the list's ORDER BY, so a request reads `limit` index entries instead of
-- sorting the whole view. The price: an update that changes an indexed column cannot be
-- HOT, so each product or customer upsert also writes these index entries (README,
-- "Ranked lists", has the measured cost). category_metrics_view has a row per category,
-- few enough to sort on each request.
CREATE INDEX IF NOT EXISTS product_sales_by_revenue ON product_sales_view (total_revenue DESC, product_id);
CREATE INDEX IF NOT EXISTS product_sales_by_quantity ON product_sales_view (total_quantity_sold DESC, product_id);
CREATE INDEX IF NOT EXISTS product_sales_by_orders ON product_sales_view (order_count DESC, product_id);
CREATE INDEX IF NOT EXISTS customer_ltv_by_spent ON customer_ltv_view (total_spent DESC, customer_id);
CREATE INDEX IF NOT EXISTS customer_ltv_by_orders ON customer_ltv_view (order_count DESC, customer_id);
