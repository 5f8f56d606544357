//! Phase `lists` (issue 14): the ranked-list routes over a big read model, and what the
//! views' secondary indexes (the ones the lists read) cost the consumer.
//!
//! The read database is preloaded in SQL with `BENCH_LISTS_PRODUCTS` (100,000) products,
//! `BENCH_LISTS_CUSTOMERS` (1,000,000) customers and 50 categories, then analysed. Two
//! rounds drain the same queued backlog (`BENCH_LISTS_BACKLOG` events, 50,000) into such a
//! read model: one as migrated, one with every non-primary-key index of the views dropped.
//! In the first round the query service then serves each list route (every sort, limit
//! 10 or 100) to `BENCH_CLIENTS` clients for `BENCH_QUERY_SECONDS`: p50 and p99 per route.

use std::time::Duration;

use serde_json::{json, Value};

use crate::backlog::{consume, fill, publish, Drain};
use crate::ceiling::Ceilings;
use crate::client::{load, LoadResult, Until};
use crate::pipeline::load_json;
use crate::report::{Figures, Row};
use crate::services::{clone_database, wait_healthy, Stack};
use crate::{env_or, log, Settings};

/// Each list route and its sorts.
const ROUTES: &[(&str, &[&str])] = &[
    (
        "/api/analytics/products",
        &["revenue", "quantity", "orders"],
    ),
    ("/api/analytics/categories", &["revenue", "orders"]),
    ("/api/analytics/customers", &["spent", "orders"]),
];

const VIEWS: &str =
    "'product_sales_view', 'customer_ltv_view', 'category_metrics_view', 'hourly_sales_view'";

pub struct ListsFigures {
    pub products: i64,
    pub customers: i64,
    /// (route, load) with the indexes.
    pub routes: Vec<(&'static str, LoadResult)>,
    pub with_indexes: Drain,
    pub without_indexes: Drain,
    pub dropped: Vec<String>,
}

pub fn run(s: &Settings) -> ListsFigures {
    let products: i64 = env_or("BENCH_LISTS_PRODUCTS", 100_000);
    let customers: i64 = env_or("BENCH_LISTS_CUSTOMERS", 1_000_000);
    let events: i64 = env_or("BENCH_LISTS_BACKLOG", 50_000);
    let source = Stack::new();
    fill(s, &source, events - s.products as i64);
    let mut rounds = Vec::new();
    let mut routes = Vec::new();
    let mut dropped = Vec::new();
    for indexes in [true, false] {
        let stack = Stack::new();
        clone_database(&source.env.write_db, &stack.env.write_db);
        preload(&stack, products, customers);
        if !indexes {
            dropped = drop_view_indexes(&stack);
        }
        publish(s, &stack);
        let drain = consume(s, &stack, 1, false);
        log(format!(
            "lists: consumer with indexes {indexes}: {:?} events/s",
            drain.per_second.map(|e| e.round())
        ));
        if indexes {
            routes = serve_lists(s, &stack);
        }
        rounds.push(drain);
    }
    let without_indexes = rounds.pop().expect("two rounds");
    let with_indexes = rounds.pop().expect("two rounds");
    ListsFigures {
        products,
        customers,
        routes,
        with_indexes,
        without_indexes,
        dropped,
    }
}

/// A big read model, generated in SQL, then analysed.
fn preload(stack: &Stack, products: i64, customers: i64) {
    log(format!(
        "lists: preloading {products} products and {customers} customers"
    ));
    let mut read = stack.read();
    read.execute(
        "INSERT INTO product_sales_view (product_id, name, category, total_quantity_sold, total_revenue, order_count)
         SELECT 1000000 + g, 'list-product-' || g, 'List category ' || (g % 50),
                (random() * 10000)::bigint, round((random() * 1000000)::numeric, 2), (random() * 5000)::bigint
         FROM generate_series(1, $1::bigint) g",
        &[&products],
    )
    .expect("preloading products");
    read.execute(
        "INSERT INTO customer_ltv_view (customer_id, total_spent, order_count, last_order_date)
         SELECT 1000000 + g, round((random() * 100000)::numeric, 2), (random() * 200)::bigint,
                now() - random() * interval '365 days'
         FROM generate_series(1, $1::bigint) g",
        &[&customers],
    )
    .expect("preloading customers");
    read.batch_execute(
        "INSERT INTO category_metrics_view (category_name, total_revenue, total_orders)
         SELECT 'List category ' || g, round((random() * 10000000)::numeric, 2), (random() * 100000)::bigint
         FROM generate_series(0, 49) g;
         ANALYZE product_sales_view; ANALYZE customer_ltv_view; ANALYZE category_metrics_view",
    )
    .expect("preloading categories");
}

/// Drops every index of the views but their primary keys; returns their names.
fn drop_view_indexes(stack: &Stack) -> Vec<String> {
    let mut read = stack.read();
    let names: Vec<String> = read
        .query(
            &format!(
                "SELECT indexname FROM pg_indexes WHERE tablename IN ({VIEWS})
                 AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE contype = 'p')"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for n in &names {
        read.batch_execute(&format!("DROP INDEX {n}")).unwrap();
    }
    names
}

/// Each list route, every sort, limit 10 or 100, from `s.clients` clients.
fn serve_lists(s: &Settings, stack: &Stack) -> Vec<(&'static str, LoadResult)> {
    let query = stack.spawn("query-service", &[], &s.log_dir);
    wait_healthy(stack.query);
    let until = Until::Time(Duration::from_secs(s.query_seconds));
    let routes = ROUTES
        .iter()
        .map(|(route, sorts)| {
            let r = load(stack.query, s.clients, until, 200, |rng| {
                let sort = sorts[rng.below(sorts.len())];
                let limit = if rng.below(2) == 0 { 10 } else { 100 };
                (
                    "GET",
                    format!("{route}?sort={sort}&limit={limit}"),
                    None,
                    None,
                )
            });
            log(format!(
                "lists: {route}: {:.0}/s p50 {:.2} ms p99 {:.2} ms ({} non-200)",
                r.per_second(),
                r.pct_ms(50.0),
                r.pct_ms(99.0),
                r.other
            ));
            (*route, r)
        })
        .collect();
    query.stop();
    routes
}

impl Figures for ListsFigures {
    fn rows(&self, _: &Ceilings) -> Vec<Row> {
        let size = format!("{} products, {} customers", self.products, self.customers);
        let mut rows: Vec<Row> = self
            .routes
            .iter()
            .map(|(route, r)| {
                Row::at_most(format!("{route} p99"), r.pct_ms(99.0), "ms", 5.0).detail(format!(
                    "{:.0}/s, p50 {:.2} ms, {} non-200; {size}",
                    r.per_second(),
                    r.pct_ms(50.0),
                    r.other
                ))
            })
            .collect();
        let eps = |d: &Drain| d.per_second.unwrap_or(f64::NAN);
        rows.push(
            Row::info(
                "consumer events/s, view indexes",
                eps(&self.with_indexes),
                "ev/s",
            )
            .detail(size),
        );
        rows.push(
            Row::info(
                "consumer events/s, no view indexes",
                eps(&self.without_indexes),
                "ev/s",
            )
            .detail(format!("dropped: {}", self.dropped.join(", "))),
        );
        rows
    }

    fn json(&self) -> Value {
        json!({
            "products": self.products, "customers": self.customers,
            "routes": self.routes.iter().map(|(r, l)| json!({"route": r, "load": load_json(l)})).collect::<Vec<_>>(),
            "consumer_with_indexes": self.with_indexes.json(),
            "consumer_without_indexes": self.without_indexes.json(),
            "dropped_indexes": self.dropped,
        })
    }
}
