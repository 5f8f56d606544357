-- Consumers that do not take turns (issue 15). Every batch adds to the same few rows: the
-- categories, the current hour and the sync counters. With one row per key, concurrent
-- consumer transactions queued on those rows' locks (`Lock:transactionid`) until the holder
-- committed. Each of these rows is now split into shards: a batch takes a shard that no
-- concurrent batch holds (a transaction-level advisory lock, `projection::claim_shard`) and
-- adds to that shard's rows only, so concurrent batches never touch the same row. Readers
-- sum the shards (a handful of rows per key: a category, an hour, the sync status).
-- Product rows stay one per product: the ranked lists read them through indexes in
-- revenue/quantity/order order (008), which a sum over shards could not use.
ALTER TABLE category_metrics_view ADD COLUMN shard SMALLINT NOT NULL DEFAULT 0 CHECK (shard BETWEEN 0 AND 63);
ALTER TABLE category_metrics_view DROP CONSTRAINT category_metrics_view_pkey;
ALTER TABLE category_metrics_view ADD PRIMARY KEY (category_name, shard);

ALTER TABLE hourly_sales_view ADD COLUMN shard SMALLINT NOT NULL DEFAULT 0 CHECK (shard BETWEEN 0 AND 63);
ALTER TABLE hourly_sales_view DROP CONSTRAINT hourly_sales_view_pkey;
ALTER TABLE hourly_sales_view ADD PRIMARY KEY (hour_timestamp, shard);

-- sync_status: row 1 + shard holds that shard's counters (row 1 is shard 0, as before).
ALTER TABLE sync_status DROP CONSTRAINT sync_status_id_check;
ALTER TABLE sync_status ADD CONSTRAINT sync_status_id_check CHECK (id BETWEEN 1 AND 64);
