//! Phase `backlog`: `command-service` with `OUTBOX_PUBLISHERS=0` takes N orders; then a
//! `command-service` with publishers and no consumer drains the outbox into the broker
//! (publisher events/s); then `consumer-service` drains the queues into the read model
//! (consumer events/s). Both are stated as ratios of the broker alone (phase `broker`).
//! `fill`, `publish` and `consume` are reused by the `consumers` phase.

use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ceiling::Ceilings;
use crate::client::{create_products, load, order_body, Http, LoadResult, Until};
use crate::harness::{free_port, QueueDepths};
use crate::pipeline::load_json;
use crate::report::{Figures, Row};
use crate::sample::{cpu_delta, cpu_snapshot, WaitSampler};
use crate::services::{self, metric, outbox_pending, wait_healthy, Stack};
use crate::{log, round, Settings};

/// How often a drain polls. The consumer drain polls the consumer's /metrics (each scrape
/// reports table sizes in SQL); at 10 ms that kept half a PostgreSQL backend busy during
/// the drain it measured. 50 ms bounds the error of a drain's end to 1 % of a 5 s drain.
/// The publisher drain polls the broker's queue depths instead: a /metrics scrape of the
/// command service also counts the pending outbox, and at 50 ms that still kept 0.22–0.24
/// of a backend busy (of the 0.53 cores PostgreSQL used in the phase) on the slower machine.
const POLL: Duration = Duration::from_millis(50);

/// One timed drain.
pub struct Drain {
    pub events: i64,
    /// None: did not finish within the drain timeout.
    pub per_second: Option<f64>,
    pub seconds: f64,
    pub cpu: Value,
    pub waits: Value,
    /// Share of sampled active backends waiting on `Lock:*`.
    pub lock_share: f64,
    pub peak_rss_kib: u64,
}

impl Drain {
    pub fn json(&self) -> Value {
        json!({"events": self.events, "events_per_second": self.per_second.map(|e| round(e, 0)),
               "seconds": round(self.seconds, 3), "cpu_cores": self.cpu, "pg_waits": self.waits,
               "lock_share": round(self.lock_share, 3), "peak_rss_mib": round(self.peak_rss_kib as f64 / 1024.0, 1)})
    }
}

pub struct BacklogFigures {
    pub fill: LoadResult,
    pub publisher: Drain,
    pub consumer: Drain,
    /// The broker alone in the same run: (confirms/s, delivers/s).
    pub broker: Option<(f64, f64)>,
}

pub fn run(s: &Settings) -> BacklogFigures {
    let stack = Stack::new();
    let fill = fill(s, &stack, s.backlog);
    let publisher = publish(s, &stack);
    log(format!(
        "backlog: publisher {:?} events/s",
        publisher.per_second.map(|e| e.round())
    ));
    let consumer = consume(s, &stack, 1, true);
    log(format!(
        "backlog: consumer {:?} events/s",
        consumer.per_second.map(|e| e.round())
    ));
    BacklogFigures {
        fill,
        publisher,
        consumer,
        broker: None,
    }
}

/// `orders` orders (and their products) into the outbox, none published.
pub fn fill(s: &Settings, stack: &Stack, orders: i64) -> LoadResult {
    log(format!("backlog: {orders} orders with OUTBOX_PUBLISHERS=0"));
    let cmd = stack.spawn(
        "command-service",
        &[("OUTBOX_PUBLISHERS", "0".into())],
        &s.log_dir,
    );
    wait_healthy(stack.command);
    let products = create_products(stack.command, s.products, &stack.env.id, None);
    let r = load(stack.command, s.clients, Until::Count(orders), 201, |rng| {
        (
            "POST",
            "/api/orders".into(),
            Some(order_body(rng, &products, s.customers)),
            None,
        )
    });
    cmd.stop();
    log(format!(
        "backlog: {} orders in {:.1} s ({:.0}/s without publishing)",
        r.ok,
        r.seconds,
        r.per_second()
    ));
    r
}

/// A `command-service` with publishers (no consumer) empties the outbox into the broker;
/// timed from the first published row until none is pending.
pub fn publish(s: &Settings, stack: &Stack) -> Drain {
    let mut write = stack.write();
    let n0 = outbox_pending(&mut write);
    services::checkpoint();
    let sampler = WaitSampler::start(&stack.env.write_db, Duration::from_millis(20));
    let spawned = Instant::now();
    let cmd = stack.spawn("command-service", &[], &s.log_dir);
    let procs = [(cmd.pid(), "command-service")];
    let c0 = cpu_snapshot(&procs);
    let mut depths = QueueDepths::open();
    let broker = &stack.env.broker;
    let queues = [broker.order_queue.as_str(), broker.product_queue.as_str()];
    let mut first: Option<(Instant, i64)> = None;
    let mut done = None;
    while spawned.elapsed() < s.drain_timeout {
        // Ready in the queues (nothing consumes them in this phase) = confirmed publishes.
        let published = depths.total(&queues);
        if first.is_none() && published > 0 {
            first = Some((Instant::now(), n0 - published));
        }
        // Done once every row is also marked published, checked in SQL only then.
        if published >= n0 && outbox_pending(&mut write) == 0 {
            done = Some(Instant::now());
            break;
        }
        thread::sleep(POLL);
    }
    let cpu = cpu_delta(&c0, &cpu_snapshot(&procs));
    let waits = sampler.finish();
    let rss = services::vm_hwm_kib(cmd.pid()).unwrap_or(0);
    cmd.stop();
    timed(n0, first, done, cpu, waits, rss)
}

fn timed(
    events: i64,
    first: Option<(Instant, i64)>,
    done: Option<Instant>,
    cpu: Value,
    waits: crate::sample::Waits,
    peak_rss_kib: u64,
) -> Drain {
    let (per_second, seconds) = match (first, done) {
        (Some((t0, n)), Some(t1)) => {
            let secs = t1.duration_since(t0).as_secs_f64().max(1e-6);
            (Some(n as f64 / secs), secs)
        }
        _ => (None, f64::NAN),
    };
    Drain {
        events,
        per_second,
        seconds,
        cpu,
        waits: waits.json(),
        lock_share: waits.lock_share,
        peak_rss_kib,
    }
}

/// `processes` consumer-service processes drain the queued events into the read model;
/// timed from the first applied event until the read model equals the write model (or,
/// with `exact` false, for a read model preloaded with more than the write model holds,
/// until every queued event was applied).
pub fn consume(s: &Settings, stack: &Stack, processes: usize, exact: bool) -> Drain {
    let queued = i64::from(stack.env.queue_depth(&stack.env.broker.order_queue))
        + i64::from(stack.env.queue_depth(&stack.env.broker.product_queue));
    services::checkpoint();
    let sampler = WaitSampler::start(&stack.env.read_db, Duration::from_millis(10));
    let spawned = Instant::now();
    let consumers: Vec<_> = (0..processes)
        .map(|_| {
            let port = free_port();
            let svc = stack.spawn(
                "consumer-service",
                &[("CONSUMER_SERVICE_PORT", port.to_string())],
                &s.log_dir,
            );
            (svc, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        })
        .collect();
    let procs: Vec<(u32, &str)> = consumers
        .iter()
        .map(|(c, _)| (c.pid(), "consumer-service"))
        .collect();
    let c0 = cpu_snapshot(&procs);
    let mut metrics: Vec<Http> = consumers.iter().map(|(_, a)| Http::new(*a)).collect();
    let mut read = stack.read();
    let want = crate::harness::write_totals(&mut stack.write());
    let (mut first, mut done) = (None, None);
    while spawned.elapsed() < s.drain_timeout {
        let applied: i64 = metrics
            .iter_mut()
            .map(|m| metric(m, "consumer_events_applied_total").unwrap_or(0.0) as i64)
            .sum();
        if first.is_none() && applied > 0 {
            first = Some((Instant::now(), queued - applied));
        }
        if applied >= queued && (!exact || crate::harness::read_totals(&mut read) == want) {
            done = Some(Instant::now());
            break;
        }
        thread::sleep(POLL);
    }
    let cpu = cpu_delta(&c0, &cpu_snapshot(&procs));
    let waits = sampler.finish();
    let rss = consumers
        .iter()
        .filter_map(|(c, _)| services::vm_hwm_kib(c.pid()))
        .max()
        .unwrap_or(0);
    for (c, _) in consumers {
        c.stop();
    }
    timed(queued, first, done, cpu, waits, rss)
}

impl Figures for BacklogFigures {
    fn rows(&self, _: &Ceilings) -> Vec<Row> {
        let (confirms, delivers) = self.broker.unzip();
        let eps = |d: &Drain| d.per_second.unwrap_or(f64::NAN);
        let detail = |d: &Drain| format!("{} events in {:.2} s", d.events, d.seconds);
        vec![
            Row::info(
                "orders/s filling the outbox (no publisher)",
                self.fill.per_second(),
                "/s",
            )
            .detail(format!("p99 {:.1} ms", self.fill.pct_ms(99.0))),
            Row::ratio(
                "publisher drain",
                eps(&self.publisher),
                "ev/s",
                "broker confirms/s",
                confirms,
                0.8,
            )
            .detail(detail(&self.publisher)),
            Row::ratio(
                "consumer drain",
                eps(&self.consumer),
                "ev/s",
                "broker delivers/s",
                delivers,
                0.8,
            )
            .detail(detail(&self.consumer)),
        ]
    }

    fn json(&self) -> Value {
        json!({"fill": load_json(&self.fill), "publisher": self.publisher.json(), "consumer": self.consumer.json()})
    }
}
