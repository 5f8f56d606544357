//! Phase `lists` (issue 14): the ranked lists at scale, and what their indexes cost.
//!
//! A fresh read DB gets `BENCH_LISTS_PRODUCTS` (100,000) products in 50 categories and
//! `BENCH_LISTS_CUSTOMERS` (1,000,000) customers, generated in SQL. Then:
//! 1. p50/p99 of each list route (the release `query-service`, 4 (at most `BENCH_CLIENTS`) closed-loop
//!    clients for `BENCH_LISTS_SECONDS` (5) each), with the indexes of read migration 008,
//!    then with them dropped; a primary-key route is measured alongside for reference;
//! 2. the consumer's drain of `BENCH_LISTS_EVENTS` (100,000) `OrderCreated` events (2 items,
//!    random products and customers of the generated ones, written into the outbox in SQL),
//!    without the indexes and then with them (re-created from the migration's own SQL);
//! 3. the WAL and buffers one batch of 1,000 such events writes (the consumer's upserts in
//!    a rolled-back transaction right after a `CHECKPOINT`, `EXPLAIN (ANALYZE, WAL,
//!    BUFFERS)`), without and with: nearly deterministic, unlike a drain rate on a shared
//!    machine.

use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ceiling::Ceilings;
use crate::client::{load, Http, LoadResult, Until};
use crate::harness::free_port;
use crate::report::{Figures, Row};
use crate::services::{metric, wait_healthy, Stack};
use crate::{env_or, log, round, Settings};

/// The indexes of `sql/read/008_list_indexes.sql`, by name.
const INDEXES: [&str; 5] = [
    "product_sales_by_revenue",
    "product_sales_by_quantity",
    "product_sales_by_orders",
    "customer_ltv_by_spent",
    "customer_ltv_by_orders",
];
const CREATE_INDEXES: &str = include_str!("../../sql/read/008_list_indexes.sql");

/// The routes measured: the three lists, each sort, limits 10 and 100, and a primary-key
/// read for reference.
const ROUTES: [&str; 9] = [
    "/api/analytics/products/1/sales",
    "/api/analytics/products",
    "/api/analytics/products?sort=quantity&limit=100",
    "/api/analytics/products?sort=orders&limit=100",
    "/api/analytics/categories",
    "/api/analytics/customers",
    "/api/analytics/customers?limit=100",
    "/api/analytics/customers?sort=orders",
    "/api/analytics/customers?sort=orders&limit=100",
];

/// The read model at scale: products (`$1`) in 50 categories, with many ties and money in
/// cents, their categories, and customers (`$1`). Each statement takes one count.
const GENERATE: [(&str, Count); 3] = [
    (
        "INSERT INTO product_sales_view (product_id, name, category, total_quantity_sold, total_revenue, order_count)
         SELECT i, 'Product ' || i, 'Category ' || (i % 50), q, q * ((i % 997) + 0.99), (q + 1) / 2
         FROM (SELECT i, (hashint4(i::int)::bigint & 4095) AS q FROM generate_series(1, $1::bigint) i) s",
        Count::Products,
    ),
    (
        "INSERT INTO category_metrics_view (category_name, total_revenue, total_orders)
         SELECT category, sum(total_revenue), sum(order_count) FROM product_sales_view
         WHERE $1::bigint > 0 GROUP BY category",
        Count::Products,
    ),
    (
        "INSERT INTO customer_ltv_view (customer_id, total_spent, order_count, last_order_date)
         SELECT i, ((hashint4(i::int)::bigint & 1048575) / 100.0)::numeric(24,2),
                (hashint4(i::int + 7)::bigint & 63) + 1, now() - ((i % 100000) || ' minutes')::interval
         FROM generate_series(1, $1::bigint) i",
        Count::Customers,
    ),
];

#[derive(Clone, Copy)]
enum Count {
    Products,
    Customers,
}

/// `$1` OrderCreated outbox rows, 2 items each, over products `1..=$2` and customers `1..=$3`.
const OUTBOX: &str = "
INSERT INTO outbox (topic, payload)
SELECT 'order-events', jsonb_build_object(
    'eventId', gen_random_uuid(), 'eventType', 'OrderCreated',
    'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    'orderId', i, 'customerId', c,
    'items', jsonb_build_array(
        jsonb_build_object('productId', p1, 'productName', 'Product ' || p1, 'category', 'Category ' || (p1 % 50), 'quantity', 1, 'price', (p1 % 997) + 0.99),
        jsonb_build_object('productId', p2, 'productName', 'Product ' || p2, 'category', 'Category ' || (p2 % 50), 'quantity', 2, 'price', (p2 % 997) + 0.99)),
    'total', (p1 % 997) + 0.99 + 2 * ((p2 % 997) + 0.99))
FROM (SELECT i, 1 + (random() * ($3::bigint - 1))::bigint AS c,
             1 + (random() * ($2::bigint / 2 - 1))::bigint AS p1,
             $2::bigint / 2 + 1 + (random() * ($2::bigint / 2 - 1))::bigint AS p2
      FROM generate_series(1, $1::bigint) i) s";

/// One consumer batch of 1,000 events as `src/read/projection.rs` writes it (2,000 product and
/// 1,000 customer upserts on random keys), measured and rolled back.
const BATCH: [(&str, Count); 2] = [
    (
        "EXPLAIN (ANALYZE, WAL, BUFFERS, COSTS OFF, TIMING OFF)
     INSERT INTO product_sales_view AS v (product_id, name, category, total_quantity_sold, total_revenue, order_count)
     SELECT DISTINCT 1 + (random() * ($1::bigint - 1))::bigint, 'x', 'y', 1, 10.00::numeric, 1 FROM generate_series(1, 2000)
     ON CONFLICT (product_id) DO UPDATE SET
         total_quantity_sold = v.total_quantity_sold + excluded.total_quantity_sold,
         total_revenue = v.total_revenue + excluded.total_revenue,
         order_count = v.order_count + excluded.order_count, last_updated = now()",
        Count::Products,
    ),
    (
        "EXPLAIN (ANALYZE, WAL, BUFFERS, COSTS OFF, TIMING OFF)
     INSERT INTO customer_ltv_view AS v (customer_id, total_spent, order_count, last_order_date)
     SELECT DISTINCT 1 + (random() * ($1::bigint - 1))::bigint, 25.00::numeric, 1, now() FROM generate_series(1, 1000)
     ON CONFLICT (customer_id) DO UPDATE SET
         total_spent = v.total_spent + excluded.total_spent, order_count = v.order_count + excluded.order_count,
         last_order_date = GREATEST(v.last_order_date, excluded.last_order_date), last_updated = now()",
        Count::Customers,
    ),
];

/// p50/p99 of one route.
pub struct RouteLatency {
    pub path: &'static str,
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// WAL records, WAL bytes and buffers dirtied by one batch of 1,000 events.
#[derive(Default)]
pub struct BatchWrites {
    pub wal_records: i64,
    pub wal_bytes: i64,
    pub full_page_images: i64,
    pub dirtied: i64,
}

pub struct ListsFigures {
    pub products: i64,
    pub customers: i64,
    pub with_indexes: Vec<RouteLatency>,
    pub without_indexes: Vec<RouteLatency>,
    /// Consumer events/s: (without, with); None when a drain did not finish.
    pub drain: (Option<f64>, Option<f64>),
    pub events: i64,
    pub batch: (BatchWrites, BatchWrites),
}

pub fn run(s: &Settings) -> ListsFigures {
    let products: i64 = env_or("BENCH_LISTS_PRODUCTS", 100_000);
    let customers: i64 = env_or("BENCH_LISTS_CUSTOMERS", 1_000_000);
    let events: i64 = env_or("BENCH_LISTS_EVENTS", 100_000);
    let seconds: u64 = env_or("BENCH_LISTS_SECONDS", 5);
    let stack = Stack::new();
    generate(&stack, products, customers);
    // The cache off: these are the lists' database reads, with and without their indexes.
    let extra = [("QUERY_CACHE_BYTES", "0".to_string())];
    let query = stack.spawn("query-service", &extra, &s.log_dir);
    wait_healthy(stack.query);
    let with_indexes = latencies(s, &stack, seconds);
    set_indexes(&stack, false);
    let without_indexes = latencies(s, &stack, seconds);
    query.stop();
    let batch_without = batch_writes(&stack, products, customers);
    let drain_without = drain(s, &stack, events, products, customers);
    set_indexes(&stack, true);
    let batch_with = batch_writes(&stack, products, customers);
    let drain_with = drain(s, &stack, events, products, customers);
    log(format!(
        "lists: consumer {:?} events/s without the indexes, {:?} with",
        drain_without.map(f64::round),
        drain_with.map(f64::round)
    ));
    ListsFigures {
        products,
        customers,
        with_indexes,
        without_indexes,
        drain: (drain_without, drain_with),
        events,
        batch: (batch_without, batch_with),
    }
}

fn generate(stack: &Stack, products: i64, customers: i64) {
    log(format!(
        "lists: generating {products} products and {customers} customers in the read DB"
    ));
    let started = Instant::now();
    let mut read = stack.read();
    let mut tx = read.transaction().unwrap();
    for (sql, count) in GENERATE {
        let n = match count {
            Count::Products => products,
            Count::Customers => customers,
        };
        tx.execute(sql, &[&n]).expect("generating the read model");
    }
    tx.commit().unwrap();
    read.batch_execute("VACUUM ANALYZE").unwrap();
    log(format!(
        "lists: generated in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

fn latencies(s: &Settings, stack: &Stack, seconds: u64) -> Vec<RouteLatency> {
    ROUTES
        .iter()
        .map(|path| {
            let r: LoadResult = load(
                stack.query,
                s.clients.min(4),
                Until::Time(Duration::from_secs(seconds)),
                200,
                |_| ("GET", path.to_string(), None, None),
            );
            let l = RouteLatency {
                path,
                requests: r.ok,
                p50_ms: r.pct_ms(50.0),
                p99_ms: r.pct_ms(99.0),
            };
            log(format!(
                "lists: {path}: p50 {:.2} ms, p99 {:.2} ms ({} requests)",
                l.p50_ms, l.p99_ms, l.requests
            ));
            l
        })
        .collect()
}

/// Creates the migration's indexes (its own SQL) or drops them.
fn set_indexes(stack: &Stack, present: bool) {
    let mut read = stack.read();
    if present {
        read.batch_execute(CREATE_INDEXES)
            .expect("creating the list indexes");
    } else {
        read.batch_execute(&format!("DROP INDEX {}", INDEXES.join(", ")))
            .expect("dropping the list indexes");
    }
    read.batch_execute("VACUUM ANALYZE product_sales_view, customer_ltv_view")
        .unwrap();
}

fn batch_writes(stack: &Stack, products: i64, customers: i64) -> BatchWrites {
    let mut read = stack.read();
    // Both measurements start right after a checkpoint, so each page's first change is
    // logged in full in both (otherwise the count of full-page images is an accident of
    // when the server last checkpointed).
    read.batch_execute("CHECKPOINT")
        .expect("CHECKPOINT (the bench runs as a superuser)");
    let mut tx = read.transaction().unwrap();
    let mut total = BatchWrites::default();
    for (sql, count) in BATCH {
        let n = match count {
            Count::Products => products,
            Count::Customers => customers,
        };
        for row in tx.query(sql, &[&n]).unwrap() {
            let line: String = row.get(0);
            add_counters(&mut total, &line);
        }
    }
    tx.rollback().unwrap();
    total
}

/// Adds the counters of one EXPLAIN line ("WAL: records=.. fpi=.. bytes=..", "Buffers: ...
/// dirtied=..") to `total`; only the top node's lines (the Insert) are counted.
fn add_counters(total: &mut BatchWrites, line: &str) {
    let trimmed = line.trim_start();
    if line.len() - trimmed.len() > 3 {
        return;
    }
    let value = |key: &str| -> i64 {
        trimmed
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    if trimmed.starts_with("WAL:") {
        total.wal_records += value("records=");
        total.full_page_images += value("fpi=");
        total.wal_bytes += value("bytes=");
    } else if trimmed.starts_with("Buffers:") {
        total.dirtied += value("dirtied=");
    }
}

/// Fresh `events` OrderCreated rows into the outbox, published into the stack's queues,
/// then drained by one `consumer-service`: events/s from the first applied event to the last.
fn drain(s: &Settings, stack: &Stack, events: i64, products: i64, customers: i64) -> Option<f64> {
    let mut write = stack.write();
    write.batch_execute("TRUNCATE outbox").unwrap();
    write
        .execute(OUTBOX, &[&events, &products, &customers])
        .expect("filling the outbox");
    crate::backlog::publish(s, stack);
    let port = free_port();
    let consumer = stack.spawn(
        "consumer-service",
        &[("CONSUMER_SERVICE_PORT", port.to_string())],
        &s.log_dir,
    );
    let mut metrics = Http::new(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    let spawned = Instant::now();
    let mut first: Option<(Instant, i64)> = None;
    let mut rate = None;
    while spawned.elapsed() < s.drain_timeout {
        let applied = metric(&mut metrics, "consumer_events_applied_total").unwrap_or(0.0) as i64;
        if first.is_none() && applied > 0 {
            first = Some((Instant::now(), applied));
        }
        if applied >= events {
            let (t0, n0) = first.expect("set on the way");
            rate = Some((events - n0) as f64 / t0.elapsed().as_secs_f64().max(1e-6));
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    consumer.stop();
    rate
}

impl Figures for ListsFigures {
    fn rows(&self, _: &Ceilings) -> Vec<Row> {
        let mut rows = Vec::new();
        for (with, without) in self.with_indexes.iter().zip(&self.without_indexes) {
            rows.push(
                Row::info(format!("{} p99", with.path), with.p99_ms, "ms").detail(format!(
                    "p50 {:.2} ms; without the indexes p50 {:.1} ms, p99 {:.1} ms",
                    with.p50_ms, without.p50_ms, without.p99_ms
                )),
            );
        }
        let (without, with) = self.drain;
        let size = format!(
            "{} events over {} products / {} customers",
            self.events, self.products, self.customers
        );
        rows.push(
            Row::info(
                "consumer events/s, view indexes",
                with.unwrap_or(f64::NAN),
                "ev/s",
            )
            .detail(size.clone()),
        );
        rows.push(
            Row::info(
                "consumer events/s, no view indexes",
                without.unwrap_or(f64::NAN),
                "ev/s",
            )
            .detail(format!("{size}; dropped: {}", INDEXES.join(", "))),
        );
        let (b0, b1) = &self.batch;
        rows.push(
            Row::info("WAL per 1,000 events with the list indexes", b1.wal_bytes as f64 / 1e6, "MB").detail(format!(
                "{} records, {} full-page images, {} buffers dirtied; without: {:.1} MB, {} records, {} fpi, {} dirtied",
                b1.wal_records, b1.full_page_images, b1.dirtied,
                b0.wal_bytes as f64 / 1e6, b0.wal_records, b0.full_page_images, b0.dirtied
            )),
        );
        rows
    }

    fn json(&self) -> Value {
        let routes = |v: &[RouteLatency]| -> Value {
            v.iter()
                .map(|r| json!({"path": r.path, "requests": r.requests, "p50_ms": round(r.p50_ms, 3), "p99_ms": round(r.p99_ms, 3)}))
                .collect()
        };
        let batch = |b: &BatchWrites| {
            json!({"wal_records": b.wal_records, "wal_bytes": b.wal_bytes,
            "full_page_images": b.full_page_images, "buffers_dirtied": b.dirtied})
        };
        json!({
            "products": self.products, "customers": self.customers, "events": self.events,
            "with_indexes": routes(&self.with_indexes), "without_indexes": routes(&self.without_indexes),
            "consumer_events_per_second": {"without_indexes": self.drain.0.map(|e| round(e, 0)),
                                           "with_indexes": self.drain.1.map(|e| round(e, 0))},
            "batch_of_1000_events": {"without_indexes": batch(&self.batch.0), "with_indexes": batch(&self.batch.1)},
        })
    }
}
