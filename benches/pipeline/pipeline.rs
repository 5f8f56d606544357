//! Phase `pipeline`: `all` on fresh databases. Products, then orders from a fixed number
//! of clients for a fixed time, the drain (end of the burst until the read model equals the
//! write model in SQL), outbox bytes per order, freshness (201 → visible in the query
//! service, sequential samples), queries (GET product sales for random products), and the
//! peak RSS of `all` (VmHWM).

use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ceiling::Ceilings;
use crate::client::{create_products, load, order_burst, pct, Http, LoadResult, Product, Until};
use crate::report::{Figures, Row};
use crate::sample::{cpu_delta, cpu_snapshot, WaitSampler};
use crate::services::{self, wait_healthy, Stack};
use crate::{log, round, Settings};

pub struct PipelineFigures {
    pub orders: LoadResult,
    pub orders_cpu: Value,
    pub orders_waits: Value,
    /// Seconds from the end of the burst until read == write; None: did not converge.
    pub drain: Option<f64>,
    /// `pg_total_relation_size('outbox')` / orders, right after the drain.
    pub outbox_bytes_per_order: f64,
    /// Average size of an order event as published (bytes), for the broker-alone phase.
    pub event_bytes: f64,
    /// Sorted, µs.
    pub fresh_us: Vec<u64>,
    pub fresh_timeouts: u32,
    /// From `all`, whose query service keeps its answers (`read::cache`).
    pub queries: LoadResult,
    pub queries_cpu: Value,
    /// From a query service with `QUERY_CACHE_BYTES=0`, after `all` stopped.
    pub queries_uncached: LoadResult,
    pub peak_rss_kib: u64,
    pub read_equals_write: bool,
}

pub fn run(s: &Settings) -> PipelineFigures {
    let stack = Stack::new();
    let all = stack.spawn("all", &[], &s.log_dir);
    for addr in [stack.command, stack.query, stack.consumer] {
        wait_healthy(addr);
    }
    log(format!("pipeline: creating {} products", s.products));
    let products = create_products(stack.command, s.products, &stack.env.id, None);
    settle(&stack, products.len());
    let mut f = burst(s, &stack, all.pid(), &products);
    let (bytes, event_bytes) = outbox_size(&stack, f.orders.ok);
    f.outbox_bytes_per_order = bytes;
    f.event_bytes = event_bytes;
    let (fresh_us, timeouts) = freshness(s, &stack);
    f.fresh_us = fresh_us;
    f.fresh_timeouts = timeouts;
    let ids: Vec<i64> = products.iter().map(|p| p.id).collect();
    let procs = [(all.pid(), "all")];
    let cpu0 = cpu_snapshot(&procs);
    f.queries = queries(s, &stack, &ids, "");
    f.queries_cpu = cpu_delta(&cpu0, &cpu_snapshot(&procs));
    f.peak_rss_kib = services::vm_hwm_kib(all.pid()).unwrap_or(0);
    f.read_equals_write = services::read_equals_write(&stack);
    all.stop();
    // The same queries from a query service that keeps nothing (`read::cache`): every one
    // a round trip to the read database.
    let extra = [("QUERY_CACHE_BYTES", "0".to_string())];
    let uncached = stack.spawn("query-service", &extra, &s.log_dir);
    wait_healthy(stack.query);
    f.queries_uncached = queries(s, &stack, &ids, ", the cache off");
    uncached.stop();
    log(format!(
        "pipeline: orders {:.0}/s, drain {:?} s, fresh p99 {:.1} ms, queries {:.0}/s, RSS {} KiB",
        f.orders.per_second(),
        f.drain,
        pct(&f.fresh_us, 99.0) / 1000.0,
        f.queries.per_second(),
        f.peak_rss_kib
    ));
    f
}

/// GET product sales for random products from `s.clients` clients for `s.query_seconds`.
fn queries(s: &Settings, stack: &Stack, ids: &[i64], what: &str) -> LoadResult {
    log(format!(
        "pipeline: queries{what}, {} clients for {} s",
        s.clients, s.query_seconds
    ));
    load(
        stack.query,
        s.clients,
        Until::Time(Duration::from_secs(s.query_seconds)),
        200,
        |rng| {
            let id = ids[rng.below(ids.len())];
            (
                "GET",
                format!("/api/analytics/products/{id}/sales"),
                None,
                None,
            )
        },
    )
}

/// Waits until the read model has every product (the ProductCreated events landed).
fn settle(stack: &Stack, n: usize) {
    let mut read = stack.read();
    crate::harness::wait_until(
        "products in the read model",
        Duration::from_secs(60),
        || {
            let have: i64 = read
                .query_one("SELECT count(*) FROM product_sales_view", &[])
                .unwrap()
                .get(0);
            (have as usize >= n).then_some(())
        },
    );
}

/// Orders from `s.clients` clients for `s.seconds`, then the drain.
fn burst(s: &Settings, stack: &Stack, pid: u32, products: &[Product]) -> PipelineFigures {
    log(format!(
        "pipeline: orders, {} clients for {} s",
        s.clients, s.seconds
    ));
    let procs = [(pid, "all")];
    services::checkpoint();
    let sampler = WaitSampler::start(&stack.env.write_db, Duration::from_millis(20));
    let cpu0 = cpu_snapshot(&procs);
    let orders = order_burst(stack.command, s.clients, s.seconds, products, s.customers);
    let burst_end = Instant::now();
    let cpu1 = cpu_snapshot(&procs);
    let waits = sampler.finish();
    let drain = services::wait_converged(stack, burst_end, s.drain_timeout);
    PipelineFigures {
        orders,
        orders_cpu: cpu_delta(&cpu0, &cpu1),
        orders_waits: waits.json(),
        drain,
        outbox_bytes_per_order: f64::NAN,
        event_bytes: f64::NAN,
        fresh_us: Vec::new(),
        fresh_timeouts: 0,
        queries: LoadResult::default(),
        queries_uncached: LoadResult::default(),
        queries_cpu: Value::Null,
        peak_rss_kib: 0,
        read_equals_write: false,
    }
}

/// (outbox bytes per order, average order event size in bytes).
fn outbox_size(stack: &Stack, orders: u64) -> (f64, f64) {
    let row = stack
        .write()
        .query_one(
            "SELECT pg_total_relation_size('outbox')::float8,
                    (SELECT avg(octet_length(payload::text))::float8 FROM outbox WHERE topic = 'order-events')",
            &[],
        )
        .unwrap();
    let bytes: f64 = row.get(0);
    let event: Option<f64> = row.get(1);
    (bytes / orders.max(1) as f64, event.unwrap_or(400.0))
}

/// One order at a time; polls the query service until it shows it. (sorted µs, timeouts)
fn freshness(s: &Settings, stack: &Stack) -> (Vec<u64>, u32) {
    let mut probe = Probe::new(stack);
    let mut fresh_us: Vec<u64> = Vec::with_capacity(s.fresh_samples);
    for _ in 0..s.fresh_samples {
        fresh_us.extend(probe.sample());
    }
    fresh_us.sort_unstable();
    let timeouts = s.fresh_samples - fresh_us.len();
    (fresh_us, timeouts as u32)
}

/// A product of its own, ordered one unit at a time to time an order from its 201 until
/// the query service shows it.
pub struct Probe {
    cmd: Http,
    qry: Http,
    path: String,
    order: String,
    ordered: i64,
}

impl Probe {
    pub fn new(stack: &Stack) -> Probe {
        let tag = format!("{}-probe", stack.env.id);
        let probe = create_products(stack.command, 1, &tag, Some("Probe"))
            .pop()
            .unwrap();
        let mut qry = Http::new(stack.query);
        let path = format!("/api/analytics/products/{}/sales", probe.id);
        crate::harness::wait_until("the probe product", Duration::from_secs(30), || {
            matches!(qry.request("GET", &path, None), Ok((200, _))).then_some(())
        });
        let order = format!(
            r#"{{"customerId":1,"items":[{{"productId":{},"quantity":1,"price":{}}}]}}"#,
            probe.id, probe.price
        );
        Probe {
            cmd: Http::new(stack.command),
            qry,
            path,
            order,
            ordered: 0,
        }
    }

    /// µs from the 201 until visible; None if not visible within 10 s.
    pub fn sample(&mut self) -> Option<u64> {
        let (status, reply) = self
            .cmd
            .request("POST", "/api/orders", Some(&self.order))
            .unwrap();
        let t1 = Instant::now();
        assert_eq!(status, 201, "freshness order: {reply}");
        self.ordered += 1;
        while t1.elapsed() < Duration::from_secs(10) {
            if let Ok((200, body)) = self.qry.request("GET", &self.path, None) {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                if v["totalQuantitySold"].as_i64().unwrap_or(0) >= self.ordered {
                    return Some(t1.elapsed().as_micros() as u64);
                }
            }
            thread::sleep(Duration::from_micros(500));
        }
        None
    }
}

impl PipelineFigures {
    /// The order rate against both references, then what an order cost.
    fn order_rows(&self, c: &Ceilings) -> Vec<Row> {
        let o = &self.orders;
        let orders_detail = format!(
            "p50 {:.1} ms, p99 {:.1} ms, {} non-201, {} errors",
            o.pct_ms(50.0),
            o.pct_ms(99.0),
            o.other,
            o.errors
        );
        let mut rows = vec![
            Row::ceiling(
                "orders/s (all)",
                o.per_second(),
                "/s",
                c,
                "order_tx_tps",
                0.9,
            )
            .detail(orders_detail.clone()),
            Row::ceiling(
                "orders/s vs one round trip",
                o.per_second(),
                "/s",
                c,
                "order_one_rt_tps",
                0.8,
            )
            .detail(orders_detail),
        ];
        rows.extend(self.order_budget_rows(c));
        rows
    }

    /// µs of CPU per order of each process group, and of each part of one (`group: part`),
    /// during the burst.
    fn cpu_per_order(&self) -> Vec<(String, f64)> {
        let rate = self.orders.per_second();
        let Some(groups) = self.orders_cpu.as_object().filter(|_| rate > 0.0) else {
            return Vec::new();
        };
        groups
            .iter()
            .filter(|(k, _)| !k.starts_with("machine"))
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0) * 1e6 / rate))
            .collect()
    }

    /// What an order cost the machine in this run, and how much of it the order targets
    /// leave for our process: at a target rate the machine's cores give each order a
    /// budget; PostgreSQL's cost of the same statement under pgbench (the ceiling phase),
    /// the broker's, the bench's and other processes' costs are taken from it, and what is
    /// left is all that our process and the rest of PostgreSQL's work (claims, marks, the
    /// projection, contention) may cost. Below zero, no code of ours reaches the target
    /// on this machine at this run's costs of the parts it does not run.
    fn order_budget_rows(&self, c: &Ceilings) -> Vec<Row> {
        let per_order = self.cpu_per_order();
        let us = |group: &str| {
            per_order
                .iter()
                .find(|(k, _)| k == group)
                .map_or(0.0, |(_, v)| *v)
        };
        let groups = per_order.iter().filter(|(k, _)| !k.contains(": "));
        let total: f64 = groups.clone().map(|(_, v)| v).sum();
        let parts: Vec<String> = groups.map(|(k, v)| format!("{k} {v:.0}")).collect();
        let mut rows =
            vec![Row::info("CPU per order", total, "us").detail(parts.join(", ") + " µs")];
        let cores = thread::available_parallelism().map_or(2, |n| n.get()) as f64;
        let Some(floor) = c.pg_us("order_one_rt_tps") else {
            return rows;
        };
        // The bench's own sessions (its wait sampler) set no application_name.
        let bench = us("bench client") + us("postgres: client backend");
        let (broker, other) = (us("rabbitmq"), us("other"));
        let pg_ours = us("postgres") - us("postgres: client backend") - floor;
        let ours = us("cqrs-analytics all") + pg_ours;
        rows.push(Row::info("ours per order", ours, "us").detail(format!(
            "our process {:.0} + PostgreSQL {pg_ours:.0} beyond the statement's {floor:.0} \
             under pgbench (the publisher's claims and marks, the projection, contention)",
            us("cqrs-analytics all"),
        )));
        for (key, share) in [("order_tx_tps", 0.9), ("order_one_rt_tps", 0.8)] {
            let Some(reference) = c.get(key) else {
                continue;
            };
            let budget = cores * 1e6 / (share * reference);
            let room = budget - floor - broker - bench - other;
            rows.push(
                Row::info(format!("room for ours at {share} x {key}"), room, "us").detail(format!(
                    "budget {budget:.0} = {cores} cores / {:.0} orders/s; less PostgreSQL's \
                         cost of the statement under pgbench {floor:.0}, RabbitMQ {broker:.0}, \
                         the bench {bench:.0}, other processes {other:.0} µs",
                    share * reference
                )),
            );
        }
        rows
    }
}

/// A load's summary as JSON.
pub fn load_json(r: &LoadResult) -> Value {
    json!({"per_second": round(r.per_second(), 1), "ok": r.ok, "other": r.other, "errors": r.errors,
           "seconds": round(r.seconds, 2), "p50_ms": round(r.pct_ms(50.0), 2), "p99_ms": round(r.pct_ms(99.0), 2),
           "max_ms": round(r.pct_ms(100.0), 2),
           "statuses": r.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()})
}

impl Figures for PipelineFigures {
    fn rows(&self, c: &Ceilings) -> Vec<Row> {
        let (q, u) = (&self.queries, &self.queries_uncached);
        let ms = |us: &[u64], p: f64| pct(us, p) / 1000.0;
        let fresh_ok = self.fresh_timeouts == 0;
        let mut rows = self.order_rows(c);
        rows.extend([
            Row::at_most(
                "drain after burst",
                self.drain.unwrap_or(f64::INFINITY),
                "s",
                0.25,
            ),
            Row::at_most("freshness p50", ms(&self.fresh_us, 50.0), "ms", 4.0).detail(format!(
                "{} samples, {} timeouts",
                self.fresh_us.len(),
                self.fresh_timeouts
            )),
            Row {
                met: Some(fresh_ok && ms(&self.fresh_us, 99.0) <= 10.0),
                ..Row::at_most("freshness p99", ms(&self.fresh_us, 99.0), "ms", 10.0)
            },
            Row::ceiling("queries/s", q.per_second(), "/s", c, "select_pk_tps", 0.8)
                .detail(format!("p50 {:.2} ms", q.pct_ms(50.0))),
            Row::at_most("query p99", q.pct_ms(99.0), "ms", 5.0),
            Row {
                ratio: c
                    .get("select_pk_tps")
                    .map(|r| ("select_pk_tps".into(), r, u.per_second() / r)),
                ..Row::info("queries/s, cache off", u.per_second(), "/s")
            }
            .detail(format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                u.pct_ms(50.0),
                u.pct_ms(99.0)
            )),
            Row::at_most(
                "peak RSS of all",
                self.peak_rss_kib as f64 / 1024.0,
                "MiB",
                32.0,
            ),
            Row::info(
                "outbox bytes per order after burst",
                self.outbox_bytes_per_order,
                "B",
            ),
            Row {
                met: Some(self.read_equals_write),
                ..Row::info(
                    "read == write in SQL",
                    f64::from(u8::from(self.read_equals_write)),
                    "bool",
                )
            },
        ]);
        rows
    }

    fn json(&self) -> Value {
        json!({
            "orders": load_json(&self.orders), "orders_cpu_cores": self.orders_cpu, "orders_pg_waits": self.orders_waits,
            "orders_cpu_us_per_order": self.cpu_per_order().into_iter().map(|(k, v)| (k, json!(round(v, 1)))).collect::<serde_json::Map<_, _>>(),
            "drain_seconds": self.drain.map(|d| round(d, 3)),
            "outbox_bytes_per_order": round(self.outbox_bytes_per_order, 0), "order_event_bytes": round(self.event_bytes, 0),
            "freshness": {"samples": self.fresh_us.len(), "timeouts": self.fresh_timeouts,
                          "p50_ms": round(pct(&self.fresh_us, 50.0) / 1000.0, 2), "p99_ms": round(pct(&self.fresh_us, 99.0) / 1000.0, 2),
                          "max_ms": round(pct(&self.fresh_us, 100.0) / 1000.0, 2)},
            "queries": load_json(&self.queries), "queries_cpu_cores": self.queries_cpu,
            "queries_cache_off": load_json(&self.queries_uncached),
            "peak_rss_mib": round(self.peak_rss_kib as f64 / 1024.0, 1),
            "read_equals_write": self.read_equals_write,
        })
    }
}
