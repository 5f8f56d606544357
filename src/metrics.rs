//! Prometheus text-format metrics, hand-written: a counter, a gauge and a fixed-bucket
//! histogram are a few atomics each, which does not justify a dependency.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Writes `name{labels} value`; `labels` is empty or `key="value",...`.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let _ = writeln!(
            out,
            "# TYPE {name} counter\n{name}{} {}",
            braces(labels),
            self.get()
        );
    }
}

/// A value that goes up and down.
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let _ = writeln!(
            out,
            "# TYPE {name} gauge\n{name}{} {}",
            braces(labels),
            self.get()
        );
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// A histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths, so it can live in an integer atomic.
    sum_micro: AtomicU64,
}

/// Bucket bounds for latencies in seconds, 0.5 ms to 10 s.
pub const LATENCY_BOUNDS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Bucket bounds for batch sizes.
pub const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String, name: &str) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Connection-pool gauges.
pub fn render_pool(out: &mut String, pool_name: &str, pool: &crate::db::Pool) {
    let s = pool.state();
    let _ = writeln!(out, "# TYPE db_pool_connections gauge");
    let _ = writeln!(
        out,
        "db_pool_connections{{pool=\"{pool_name}\",state=\"open\"}} {}",
        s.connections
    );
    let _ = writeln!(
        out,
        "db_pool_connections{{pool=\"{pool_name}\",state=\"idle\"}} {}",
        s.idle_connections
    );
}
