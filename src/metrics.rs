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
        render_gauge(out, name, labels, self.get());
    }
}

/// Writes a gauge's value read elsewhere: `name{labels} value`, with its type line.
pub fn render_gauge(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# TYPE {name} gauge\n{name}{} {value}", braces(labels));
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
    /// One per bound, and one last for the values above every bound.
    buckets: Vec<AtomicU64>,
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
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// The buckets, `+Inf` and `_count` come from one reading of each bucket, so they agree
    /// however many observations land meanwhile (a separate count, read after the buckets,
    /// was once one below the last bucket under load).
    pub fn render(&self, out: &mut String, name: &str) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}"),
                None => writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}"),
            }
            .ok();
        }
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {cumulative}");
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

/// What each metric counts, for its `# HELP` line.
const HELP: &[(&str, &str)] = &[
    ("http_connections_open", "HTTP connections open now"),
    (
        "http_connections_rejected_total",
        "HTTP connections answered 503 and closed: HTTP_MAX_CONNECTIONS were open",
    ),
    (
        "http_panics_total",
        "Request handlers that panicked (answered 500)",
    ),
    (
        "http_requests_total",
        "HTTP requests answered, by route and status",
    ),
    (
        "http_requests_refused_total",
        "HTTP requests answered before routing (malformed, too large, timed out, unsupported), by status",
    ),
    (
        "http_request_duration_seconds",
        "Time spent answering HTTP requests, by route and status",
    ),
    (
        "thread_restarts_total",
        "Supervised worker threads restarted after a panic, by role",
    ),
    (
        "db_pool_connections",
        "Database pool connections, by pool and state",
    ),
    (
        "query_cache_hits_total",
        "Read requests answered from the response cache",
    ),
    (
        "query_cache_misses_total",
        "Read requests the response cache did not hold (read from the database, then kept)",
    ),
    (
        "query_cache_changes_total",
        "Read-model changes the response cache's listener heard (each empties the cache)",
    ),
    (
        "query_cache_bytes",
        "Bytes the response cache holds (keys, bodies and 96 per entry)",
    ),
    (
        "query_cache_on",
        "1 while the response cache answers (its listener trusted), else 0",
    ),
    ("products_created_total", "Products created (201)"),
    ("orders_created_total", "Orders created (201)"),
    (
        "orders_rejected_insufficient_stock_total",
        "Orders refused for insufficient stock (400)",
    ),
    (
        "idempotent_replays_total",
        "Requests answered with the stored response of their Idempotency-Key",
    ),
    (
        "outbox_published_total",
        "Outbox events published and confirmed by the broker",
    ),
    (
        "outbox_confirms_total",
        "Publisher confirms received, by result (returned messages are acked too)",
    ),
    (
        "outbox_returned_total",
        "Publishes the broker returned as unroutable (each attempt; the event stays in the outbox)",
    ),
    (
        "outbox_session_errors_total",
        "Publisher sessions ended by an error (the thread reconnects)",
    ),
    (
        "outbox_batch_rows",
        "Outbox rows claimed per publishing batch",
    ),
    ("outbox_backlog_events", "Outbox events not yet published"),
    (
        "consumer_deliveries_total",
        "Messages delivered to the consumers",
    ),
    (
        "consumer_events_applied_total",
        "Events applied to the read model",
    ),
    (
        "consumer_duplicates_dropped_total",
        "Events delivered again after being applied, dropped",
    ),
    (
        "consumer_dead_lettered_total",
        "Messages sent to the dead-letter queue",
    ),
    (
        "consumer_requeued_total",
        "Events requeued after a failed attempt",
    ),
    (
        "consumer_batch_failures_total",
        "Batches that failed and were applied one event at a time",
    ),
    (
        "consumer_session_errors_total",
        "Consumer sessions ended by an error (the thread reconnects)",
    ),
    (
        "consumer_connected_threads",
        "Consumer threads subscribed to the broker now",
    ),
    ("consumer_batch_size", "Events per applied batch"),
    (
        "consumer_end_to_end_lag_seconds",
        "Time from an event's commit on the write side to its application",
    ),
    (
        "consumer_held_messages",
        "Deliveries the consumers hold unacked now",
    ),
    (
        "consumer_stalled",
        "1 when deliveries have waited CONSUMER_STALL_SECS with nothing applied",
    ),
    (
        "retention_rows_removed_total",
        "Rows removed by the retention pruner, by table",
    ),
    (
        "retention_lock_busy_total",
        "Pruner runs that found a table's prune lock taken by another instance, by table",
    ),
    (
        "retention_vacuums_total",
        "VACUUMs the pruner ran after large deletes, by table",
    ),
    ("retention_runs_total", "Retention pruner runs"),
    (
        "retention_errors_total",
        "Retention pruner runs that failed",
    ),
    (
        "table_size_bytes",
        "Size of a bookkeeping table with its indexes and TOAST",
    ),
    (
        "table_rows_estimate",
        "Live rows of a bookkeeping table, from the statistics",
    ),
];

/// The metrics as Prometheus's text format wants them: each family's lines together,
/// under one `# HELP` and one `# TYPE` line. The services render series by series (a
/// counter per label value writes its own `# TYPE`), which strict parsers refuse.
pub fn exposition(raw: &str) -> String {
    // (family, type, samples), in the order the families first appear.
    let mut families: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for line in raw.lines().filter(|l| !l.trim().is_empty()) {
        let (family, kind) = match line.strip_prefix("# TYPE ") {
            Some(t) => match t.split_once(' ') {
                Some((name, kind)) => (name, kind),
                None => continue,
            },
            None if line.starts_with('#') => continue,
            None => (sample_family(line, &index, &families), ""),
        };
        let i = *index.entry(family).or_insert_with(|| {
            families.push((family, kind, Vec::new()));
            families.len() - 1
        });
        if kind.is_empty() {
            families[i].2.push(line);
        } else if families[i].1.is_empty() {
            families[i].1 = kind;
        }
    }
    let mut out = String::with_capacity(raw.len() + 64 * families.len());
    for (family, kind, samples) in families {
        if samples.is_empty() {
            continue;
        }
        if let Some((_, help)) = HELP.iter().find(|(name, _)| *name == family) {
            let _ = writeln!(out, "# HELP {family} {help}");
        }
        let _ = writeln!(
            out,
            "# TYPE {family} {}",
            if kind.is_empty() { "untyped" } else { kind }
        );
        for line in samples {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The family of a sample line: its name, less `_bucket`, `_sum` or `_count` when that
/// names a histogram or summary family already declared.
fn sample_family<'a>(
    line: &'a str,
    index: &std::collections::HashMap<&'a str, usize>,
    families: &[(&'a str, &'a str, Vec<&'a str>)],
) -> &'a str {
    let name = &line[..line.find(['{', ' ']).unwrap_or(line.len())];
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some(&i) = index.get(base) {
                if matches!(families[i].1, "histogram" | "summary") {
                    return base;
                }
            }
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_grouped_under_one_help_and_type_line() {
        let raw = "# TYPE outbox_confirms_total counter\noutbox_confirms_total{result=\"ack\"} 3\n\
                   # TYPE orders_created_total counter\norders_created_total 1\n\
                   # TYPE outbox_confirms_total counter\noutbox_confirms_total{result=\"nack\"} 0\n\
                   # TYPE http_request_duration_seconds summary\nhttp_request_duration_seconds_sum{route=\"/a\"} 0.5\n\
                   http_request_duration_seconds_count{route=\"/a\"} 2\n\
                   # TYPE thread_restarts_total counter\n";
        assert_eq!(
            exposition(raw),
            "# HELP outbox_confirms_total Publisher confirms received, by result (returned messages are acked too)\n\
             # TYPE outbox_confirms_total counter\n\
             outbox_confirms_total{result=\"ack\"} 3\noutbox_confirms_total{result=\"nack\"} 0\n\
             # HELP orders_created_total Orders created (201)\n# TYPE orders_created_total counter\n\
             orders_created_total 1\n\
             # HELP http_request_duration_seconds Time spent answering HTTP requests, by route and status\n\
             # TYPE http_request_duration_seconds summary\n\
             http_request_duration_seconds_sum{route=\"/a\"} 0.5\nhttp_request_duration_seconds_count{route=\"/a\"} 2\n"
        );
    }

    #[test]
    fn a_histograms_buckets_inf_and_count_agree() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.5, 7.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "h");
        assert_eq!(
            out,
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 3\nh_bucket{le=\"+Inf\"} 4\nh_sum 10.5\nh_count 4\n"
        );
    }
}
