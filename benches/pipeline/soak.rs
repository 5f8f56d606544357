//! Phase `soak` (issue 11): steady order load with retention on, once on an empty database
//! and once over a preloaded history, in the same run.
//!
//! 1. On a fresh stack, a closed-loop burst (`BENCH_SECONDS`) gives the burst rate; the
//!    steady rate is `BENCH_SOAK_RATE_SHARE` (0.6) of it: below the maximum, so the two runs
//!    compare latency and flatness, not throughput.
//! 2. The retention windows of the outbox and of processed_events are set to
//!    W = history / rate (at least 1 hour): a system that has taken orders at this rate
//!    for W holds exactly `BENCH_SOAK_HISTORY` (10 M) rows in each, and retention removes
//!    them as fast as new ones come. `IDEMPOTENCY_KEY_TTL_SECS` is 120 and every soak order
//!    carries a key, so that table reaches its steady size within the first minutes.
//! 3. `empty`: `BENCH_SOAK_MINUTES` (5) of steady load on the burst's stack (no history).
//! 4. `history`: a second stack whose outbox and processed_events hold the history,
//!    generated in SQL (published rows spread evenly over the last W, time-ordered ids,
//!    then VACUUM ANALYZE), then the same steady load.
//!
//! Each minute (`BENCH_SOAK_SLICE_SECS`, 60, shorter for a smoke run): orders/s and p99 (paced clients), query p99 (a paced query load beside it),
//! freshness p99 (sequential probes); every 20 s the rows and bytes
//! (`pg_total_relation_size`) of each bookkeeping table; flatness is judged on rows. After each run: read == write in SQL.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::ceiling::Ceilings;
use crate::client::{
    create_products, load_paced, order_body, order_burst, pct, LoadResult, Product, Request, Until,
};
use crate::pipeline::{load_json, Probe};
use crate::report::{Figures, Row};
use crate::sample::{cpu_delta, cpu_snapshot};
use crate::services::{read_equals_write, wait_healthy, Service, Stack};
use crate::{env_or, log, round, Settings};

/// The bookkeeping tables and the side they live on (true: write database).
const TABLES: &[(&str, bool)] = &[
    ("outbox", true),
    ("idempotency_keys", true),
    ("processed_events", false),
    ("event_failures", false),
];

const ORDER_CLIENTS: usize = 16;
const QUERY_CLIENTS: usize = 4;
const QUERIES_PER_SECOND: f64 = 200.0;

pub struct Minute {
    pub orders: LoadResult,
    pub queries: LoadResult,
    pub fresh_us: Vec<u64>,
}

/// Rows and bytes (`pg_total_relation_size`) per table, in `TABLES` order.
pub struct Sizes {
    pub at_seconds: f64,
    pub rows: Vec<i64>,
    pub bytes: Vec<i64>,
}

pub struct SoakRun {
    pub minutes: Vec<Minute>,
    /// Every 20 s: rows and bytes of each table.
    pub sizes: Vec<Sizes>,
    pub read_equals_write: bool,
    pub cpu: Value,
}

pub struct SoakFigures {
    pub burst_rate: f64,
    pub rate: f64,
    pub window_secs: u64,
    pub history: i64,
    pub preload_secs: f64,
    pub empty: SoakRun,
    pub with_history: SoakRun,
}

pub fn run(s: &Settings) -> SoakFigures {
    let minutes: usize = env_or("BENCH_SOAK_MINUTES", 5);
    let history: i64 = env_or("BENCH_SOAK_HISTORY", 10_000_000);
    let share: f64 = env_or("BENCH_SOAK_RATE_SHARE", 0.6);
    let first = Stack::new();
    let (burst_rate, products) = {
        let all = first.spawn("all", &[], &s.log_dir);
        let products = start(&first, s);
        log(format!(
            "soak: burst, {} clients for {} s",
            s.clients, s.seconds
        ));
        let burst = order_burst(first.command, s.clients, s.seconds, &products, s.customers);
        all.stop();
        (burst.per_second(), products)
    };
    let rate = (burst_rate * share).max(1.0);
    let window_secs = ((history as f64 / rate) as u64).max(3600);
    let windows = retention_env(window_secs);
    log(format!(
        "soak: burst {burst_rate:.0}/s, steady {rate:.0}/s, windows {window_secs} s"
    ));
    let all = first.spawn("all", &windows, &s.log_dir);
    start_again(&first);
    let empty = steady(s, &first, &all, &products, rate, minutes);
    all.stop();
    drop(first);

    let second = Stack::new();
    let t = Instant::now();
    preload(&second, history, window_secs);
    let preload_secs = t.elapsed().as_secs_f64();
    // The history ends where the preload began: widen the windows by the preload's
    // duration so its oldest row expires just as the run starts, not minutes earlier.
    let windows = retention_env(window_secs + preload_secs.ceil() as u64);
    let all = second.spawn("all", &windows, &s.log_dir);
    let products = start(&second, s);
    let with_history = steady(s, &second, &all, &products, rate, minutes);
    all.stop();
    SoakFigures {
        burst_rate,
        rate,
        window_secs,
        history,
        preload_secs,
        empty,
        with_history,
    }
}

fn retention_env(window_secs: u64) -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_RETENTION_SECS", window_secs.to_string()),
        ("PROCESSED_EVENTS_RETENTION_SECS", window_secs.to_string()),
        ("IDEMPOTENCY_KEY_TTL_SECS", "120".into()),
    ]
}

/// Waits for the services and creates the products.
fn start(stack: &Stack, s: &Settings) -> Vec<Product> {
    start_again(stack);
    create_products(stack.command, s.products, &stack.env.id, None)
}

fn start_again(stack: &Stack) {
    for addr in [stack.command, stack.query, stack.consumer] {
        wait_healthy(addr);
    }
}

/// `minutes` minutes of paced orders (with Idempotency-Keys), paced queries and
/// freshness probes, one measurement per minute; table sizes every 20 s.
fn steady(
    s: &Settings,
    stack: &Stack,
    all: &Service,
    products: &[Product],
    rate: f64,
    minutes: usize,
) -> SoakRun {
    let mut probe = Probe::new(stack);
    let procs = [(all.pid(), "all")];
    let cpu0 = cpu_snapshot(&procs);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let ids: Vec<i64> = products.iter().map(|p| p.id).collect();
    let (minutes, sizes) = thread::scope(|sc| {
        let sizes = sc.spawn(|| sample_sizes(stack, started, &stop));
        let minutes: Vec<Minute> = (0..minutes)
            .map(|m| {
                let minute = one_minute(s, stack, &mut probe, products, &ids, rate);
                log(format!(
                    "soak: minute {}: orders {:.0}/s p99 {:.1} ms, query p99 {:.2} ms, fresh p99 {:.1} ms",
                    m + 1,
                    minute.orders.per_second(),
                    minute.orders.pct_ms(99.0),
                    minute.queries.pct_ms(99.0),
                    pct(&minute.fresh_us, 99.0) / 1000.0
                ));
                minute
            })
            .collect();
        stop.store(true, Ordering::Relaxed);
        (minutes, sizes.join().unwrap())
    });
    let cpu = cpu_delta(&cpu0, &cpu_snapshot(&procs));
    crate::services::wait_converged(stack, Instant::now(), s.drain_timeout);
    SoakRun {
        minutes,
        sizes,
        read_equals_write: read_equals_write(stack),
        cpu,
    }
}

fn one_minute(
    s: &Settings,
    stack: &Stack,
    probe: &mut Probe,
    products: &[Product],
    ids: &[i64],
    rate: f64,
) -> Minute {
    let slice = Duration::from_secs(env_or("BENCH_SOAK_SLICE_SECS", 60));
    let minute = Until::Time(slice);
    let per_client = Some(rate / ORDER_CLIENTS as f64);
    let key_base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    thread::scope(|sc| {
        let orders = sc.spawn(|| {
            load_paced(
                stack.command,
                ORDER_CLIENTS,
                minute,
                per_client,
                201,
                |rng| -> Request {
                    let key = format!("soak-{key_base:x}-{:x}", rng.next());
                    (
                        "POST",
                        "/api/orders".into(),
                        Some(order_body(rng, products, s.customers)),
                        Some(key),
                    )
                },
            )
        });
        let queries = sc.spawn(|| {
            let pace = Some(QUERIES_PER_SECOND / QUERY_CLIENTS as f64);
            load_paced(stack.query, QUERY_CLIENTS, minute, pace, 200, |rng| {
                let id = ids[rng.below(ids.len())];
                (
                    "GET",
                    format!("/api/analytics/products/{id}/sales"),
                    None,
                    None,
                )
            })
        });
        let mut fresh_us = Vec::new();
        let end = Instant::now() + slice;
        while Instant::now() < end {
            fresh_us.extend(probe.sample());
            thread::sleep(Duration::from_millis(200));
        }
        fresh_us.sort_unstable();
        Minute {
            orders: orders.join().unwrap(),
            queries: queries.join().unwrap(),
            fresh_us,
        }
    })
}

/// Rows and bytes of each bookkeeping table every 20 s until `stop`.
fn sample_sizes(stack: &Stack, started: Instant, stop: &AtomicBool) -> Vec<Sizes> {
    let (mut write, mut read) = (stack.write(), stack.read());
    let mut out = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            let mut sample = Sizes {
                at_seconds: started.elapsed().as_secs_f64(),
                rows: Vec::new(),
                bytes: Vec::new(),
            };
            for (t, w) in TABLES {
                let c = if *w { &mut write } else { &mut read };
                let sql = format!("SELECT count(*), pg_total_relation_size('{t}') FROM {t}");
                let (rows, bytes) = c
                    .query_one(sql.as_str(), &[])
                    .map(|r| (r.get(0), r.get(1)))
                    .unwrap_or((-1, -1));
                sample.rows.push(rows);
                sample.bytes.push(bytes);
            }
            out.push(sample);
            next += Duration::from_secs(20);
        }
        thread::sleep(Duration::from_millis(100));
    }
    out
}

/// `rows` published order events in the outbox and as many processed events, spread
/// evenly over the last `window_secs`, in chunks of a million rows (outbox and
/// processed_events in parallel), then VACUUM ANALYZE: a long-running system's history.
fn preload(stack: &Stack, rows: i64, window_secs: u64) {
    log(format!(
        "soak: preloading {rows} rows of history into outbox and processed_events"
    ));
    let base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let args = (base, window_secs as f64, rows as f64);
    // Chunks of both tables, taken in order by three workers; outbox ids are given
    // explicitly (row g has id g), so they follow time whatever order chunks commit in.
    let chunk = 500_000i64;
    let jobs: Vec<(&str, bool, i64, i64)> = (0..(rows + chunk - 1) / chunk)
        .flat_map(|k| {
            let (from, to) = (k * chunk + 1, ((k + 1) * chunk).min(rows));
            [
                (PRELOAD_OUTBOX, true, from, to),
                (PRELOAD_PROCESSED, false, from, to),
            ]
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    thread::scope(|sc| {
        for _ in 0..3 {
            sc.spawn(|| {
                let (mut write, mut read) = (stack.write(), stack.read());
                while let Some(&(sql, w, from, to)) = jobs.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    let c = if w { &mut write } else { &mut read };
                    c.execute(sql, &[&from, &to, &args.0, &args.1, &args.2])
                        .expect("preloading history");
                }
            });
        }
    });
    let mut write = stack.write();
    write
        .execute(
            "SELECT setval(pg_get_serial_sequence('outbox', 'id'), $1)",
            &[&rows],
        )
        .expect("moving the outbox id sequence past the history");
    thread::scope(|sc| {
        sc.spawn(|| {
            write
                .batch_execute("VACUUM ANALYZE outbox")
                .expect("vacuum")
        });
        sc.spawn(|| {
            stack
                .read()
                .batch_execute("VACUUM ANALYZE processed_events")
                .expect("vacuum")
        });
    });
    log("soak: history preloaded");
}

/// The time of history row g of n, spread over the window ending at $3 (epoch seconds):
/// `to_timestamp($3::float8 - $4::float8 + g * $4::float8 / $5::float8)`. Ids are UUID v7-shaped (time first), unique by g.
const PRELOAD_OUTBOX: &str = "
INSERT INTO outbox (id, topic, payload, created_at, published_at)
SELECT h.g, 'order-events',
       jsonb_build_object('eventId', h.id, 'eventType', 'OrderCreated',
           'timestamp', to_char(h.ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
           'orderId', h.g, 'customerId', 1 + h.g % 20000,
           'items', jsonb_build_array(
               jsonb_build_object('productId', 1 + h.g % 200, 'productName', 'history-' || (h.g % 200),
                                  'category', 'Electronics', 'quantity', 2, 'price', 123.45),
               jsonb_build_object('productId', 1 + (h.g + 7) % 200, 'productName', 'history-' || ((h.g + 7) % 200),
                                  'category', 'Books', 'quantity', 1, 'price', 67.89)),
           'total', 314.79),
       h.ts, h.ts + interval '5 milliseconds'
FROM (SELECT g, ts, (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7'
                     || lpad(to_hex(g % 4096), 3, '0') || '8' || lpad(to_hex(g), 15, '0'))::uuid AS id
      FROM (SELECT g, to_timestamp($3::float8 - $4::float8 + g * $4::float8 / $5::float8) AS ts
            FROM generate_series($1::bigint, $2::bigint) g) t) h
ORDER BY h.g";

const PRELOAD_PROCESSED: &str = "
INSERT INTO processed_events (event_id, event_type, event_timestamp, processed_at)
SELECT (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7'
        || lpad(to_hex(g % 4096), 3, '0') || '8' || lpad(to_hex(g), 15, '0'))::uuid,
       'OrderCreated', ts, ts + interval '5 milliseconds'
FROM (SELECT g, to_timestamp($3::float8 - $4::float8 + g * $4::float8 / $5::float8) AS ts
      FROM generate_series($1::bigint, $2::bigint) g) t";

impl SoakRun {
    fn first(&self) -> &Minute {
        self.minutes.first().expect("at least one minute")
    }
    fn last(&self) -> &Minute {
        self.minutes.last().expect("at least one minute")
    }
    fn orders_per_second(&self) -> f64 {
        let ok: u64 = self.minutes.iter().map(|m| m.orders.ok).sum();
        let secs: f64 = self.minutes.iter().map(|m| m.orders.seconds).sum();
        ok as f64 / secs
    }
    /// p99 over the whole run of a latency picked from each minute.
    fn p99(&self, pick: impl Fn(&Minute) -> &[u64]) -> f64 {
        let mut all: Vec<u64> = self
            .minutes
            .iter()
            .flat_map(|m| pick(m).iter().copied())
            .collect();
        all.sort_unstable();
        pct(&all, 99.0) / 1000.0
    }
    /// (max - min) / min of table `i`'s size over the last `secs` seconds.
    /// (max - min) / min of table `i`'s row count over the last `secs` seconds.
    fn growth(&self, i: usize, secs: f64) -> f64 {
        let end = self.sizes.last().map(|s| s.at_seconds).unwrap_or(0.0);
        let v: Vec<i64> = self
            .sizes
            .iter()
            .filter(|s| s.at_seconds >= end - secs)
            .map(|s| s.rows[i])
            .collect();
        let (min, max) = (
            v.iter().min().copied().unwrap_or(0),
            v.iter().max().copied().unwrap_or(0),
        );
        match (min, max) {
            (_, 0) => 0.0,
            (0, _) => f64::INFINITY,
            _ => (max - min) as f64 / min as f64,
        }
    }
    fn rows(&self, label: &str, judged: bool) -> Vec<Row> {
        let (f, l) = (self.first(), self.last());
        let mut rows = vec![
            Row::info(format!("{label}: orders/s"), self.orders_per_second(), "/s").detail(
                format!(
                    "first min {:.0}/s p99 {:.1} ms, last min {:.0}/s p99 {:.1} ms",
                    f.orders.per_second(),
                    f.orders.pct_ms(99.0),
                    l.orders.per_second(),
                    l.orders.pct_ms(99.0)
                ),
            ),
            Row::info(
                format!("{label}: query p99"),
                self.p99(|m| &m.queries.latencies_us),
                "ms",
            )
            .detail(format!(
                "first min {:.2} ms, last min {:.2} ms",
                f.queries.pct_ms(99.0),
                l.queries.pct_ms(99.0)
            )),
            Row::info(
                format!("{label}: freshness p99"),
                self.p99(|m| &m.fresh_us),
                "ms",
            )
            .detail(format!(
                "first min {:.1} ms, last min {:.1} ms",
                pct(&f.fresh_us, 99.0) / 1000.0,
                pct(&l.fresh_us, 99.0) / 1000.0
            )),
        ];
        let (first_sizes, last_sizes) = (self.sizes.first(), self.sizes.last());
        for (i, (t, _)) in TABLES.iter().enumerate() {
            let at = |s: Option<&Sizes>| {
                s.map(|s| {
                    format!(
                        "{} rows, {:.1} MiB",
                        s.rows[i],
                        s.bytes[i] as f64 / 1_048_576.0
                    )
                })
                .unwrap_or_default()
            };
            let figure = format!("{label}: {t} rows change, last 3 min");
            let growth = self.growth(i, 180.0);
            // Only the history run is in its steady state: the empty one fills its windows.
            let row = if judged {
                Row::at_most(figure, growth, "share", 0.10)
            } else {
                Row::info(figure, growth, "share")
            };
            rows.push(row.detail(format!("start {}; end {}", at(first_sizes), at(last_sizes))));
        }
        rows.push(Row {
            met: Some(self.read_equals_write),
            ..Row::info(
                format!("{label}: read == write in SQL"),
                f64::from(u8::from(self.read_equals_write)),
                "bool",
            )
        });
        rows
    }
    fn json(&self) -> Value {
        json!({
            "minutes": self.minutes.iter().map(|m| json!({
                "orders": load_json(&m.orders), "queries": load_json(&m.queries),
                "fresh_p50_ms": round(pct(&m.fresh_us, 50.0) / 1000.0, 2), "fresh_p99_ms": round(pct(&m.fresh_us, 99.0) / 1000.0, 2),
                "fresh_samples": m.fresh_us.len()})).collect::<Vec<_>>(),
            "sizes": self.sizes.iter().map(|z| {
                let mut o: BTreeMap<String, Value> = BTreeMap::new();
                for (i, (n, _)) in TABLES.iter().enumerate() {
                    o.insert(format!("{n}_rows"), json!(z.rows[i]));
                    o.insert(format!("{n}_bytes"), json!(z.bytes[i]));
                }
                o.insert("at_seconds".into(), json!(round(z.at_seconds, 1)));
                o
            }).collect::<Vec<_>>(),
            "read_equals_write": self.read_equals_write, "cpu_cores": self.cpu,
        })
    }
}

impl Figures for SoakFigures {
    fn rows(&self, _: &Ceilings) -> Vec<Row> {
        let (e, h) = (&self.empty, &self.with_history);
        let mut rows = vec![
            Row::info("steady rate (share of burst)", self.rate, "/s").detail(format!(
                "burst {:.0}/s; windows {} s; history {} rows preloaded in {:.0} s",
                self.burst_rate, self.window_secs, self.history, self.preload_secs
            )),
        ];
        rows.extend(e.rows("empty", false));
        rows.extend(h.rows("history", true));
        rows.push(Row::ratio(
            "orders/s with history",
            h.orders_per_second(),
            "/s",
            "empty-db orders/s",
            Some(e.orders_per_second()),
            0.9,
        ));
        let q = |r: &SoakRun| r.p99(|m| &m.queries.latencies_us);
        let fr = |r: &SoakRun| r.p99(|m| &m.fresh_us);
        rows.push(
            Row::at_most("query p99 history / empty", q(h) / q(e), "x", 1.2).detail(format!(
                "{:.2} ms / {:.2} ms",
                q(h),
                q(e)
            )),
        );
        rows.push(
            Row::at_most("freshness p99 history / empty", fr(h) / fr(e), "x", 1.2).detail(format!(
                "{:.1} ms / {:.1} ms",
                fr(h),
                fr(e)
            )),
        );
        rows
    }

    fn json(&self) -> Value {
        json!({"burst_orders_per_second": round(self.burst_rate, 0), "steady_orders_per_second": round(self.rate, 0),
               "window_secs": self.window_secs, "history_rows": self.history, "preload_seconds": round(self.preload_secs, 1),
               "empty": self.empty.json(), "history": self.with_history.json()})
    }
}
