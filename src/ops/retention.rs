//! Retention: keeps the bookkeeping tables bounded. Without it every order would leave its
//! outbox row, its `processed_events` row and any Idempotency-Key record behind forever.
//!
//! Each service prunes the tables it owns (the command service `outbox` and
//! `idempotency_keys`, the consumer service `processed_events` and `event_failures`) from one
//! background thread that wakes every `RETENTION_INTERVAL_MS`. A run deletes expired rows
//! oldest first in batches of at most `RETENTION_BATCH_SIZE` (≤ 10,000) rows, each batch its
//! own short transaction that locks only the rows it deletes, so orders and events keep
//! flowing while a backlog is cleared. Each batch first takes a transaction-level advisory
//! lock of its table: when several instances run, one prunes a table at a time and the others
//! skip it until their next run. Rows are found through an index on their age and a cursor
//! that moves forward within a run, so a batch never rescans what the previous one deleted.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use log::{debug, info, warn};

use crate::broker::QueueProbe;
use crate::config::Config;
use crate::db::{Pool, Tx};
use crate::error::Result;
use crate::metrics::Counter;
use crate::shutdown::Shutdown;

/// The tables retention prunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Outbox,
    IdempotencyKeys,
    ProcessedEvents,
    EventFailures,
}

/// The sync-status latency percentiles read the last minute of `processed_events`
/// (`query.rs`): the pruner never removes rows that young, whatever the window. (The window
/// from the environment is at least an hour; only tests set shorter ones.)
const LATENCY_WINDOW: Duration = Duration::from_secs(60);

/// Batches one run deletes at most (with 10,000-row batches, 100 million rows); whatever is
/// left waits for the next run.
const BATCHES_PER_RUN_MAX: u32 = 10_000;

impl Table {
    pub const ALL: [Table; 4] = [
        Table::Outbox,
        Table::IdempotencyKeys,
        Table::ProcessedEvents,
        Table::EventFailures,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Outbox => "outbox",
            Table::IdempotencyKeys => "idempotency_keys",
            Table::ProcessedEvents => "processed_events",
            Table::EventFailures => "event_failures",
        }
    }

    /// The advisory lock that lets one instance at a time prune this table (arbitrary
    /// constants, distinct from the migration lock).
    fn lock_key(self) -> i64 {
        0x7265_7465_6e74_0000 + self as i64
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters exported at /metrics by the service that runs the pruner.
#[derive(Default)]
pub struct RetentionMetrics {
    removed: [Counter; 4],
    runs: Counter,
    lock_busy: [Counter; 4],
    vacuums: [Counter; 4],
    errors: Counter,
    /// The last sizes read: (table, bytes, rows), shown while a lock holds the tables.
    sizes: std::sync::Mutex<Vec<(String, i64, i64)>>,
}

impl RetentionMetrics {
    pub fn removed(&self, table: Table) -> u64 {
        self.removed[table.index()].get()
    }

    /// Renders the counters of `tables`, and their sizes read now through `pool`.
    pub fn render(&self, out: &mut String, pool: &Pool, tables: &[Table]) {
        for t in tables {
            let label = format!("table=\"{}\"", t.name());
            self.removed[t.index()].render(out, "retention_rows_removed_total", &label);
            self.lock_busy[t.index()].render(out, "retention_lock_busy_total", &label);
            self.vacuums[t.index()].render(out, "retention_vacuums_total", &label);
        }
        self.runs.render(out, "retention_runs_total", "");
        self.errors.render(out, "retention_errors_total", "");
        let mut sizes = self.sizes.lock().unwrap_or_else(|e| e.into_inner());
        match read_sizes(pool, tables) {
            Ok(now) => *sizes = now,
            // Locked (a rebuild's switch, a `LOCK TABLE`) or unreachable: the last sizes read.
            Err(e) => debug!("table sizes unavailable, showing the last ones read: {e}"),
        }
        render_sizes(out, &sizes);
    }
}

/// `table_size_bytes` (heap, indexes and TOAST: `pg_total_relation_size`) and
/// `table_rows_estimate` (the statistics' live rows, `n_live_tup`, free to read and current
/// within seconds; the planner's `reltuples` moved only with VACUUM and ANALYZE,
/// and stayed 0 with autovacuum off) for each table.
fn read_sizes(pool: &Pool, tables: &[Table]) -> Result<Vec<(String, i64, i64)>> {
    let names: Vec<&str> = tables.iter().map(|t| t.name()).collect();
    // `pg_total_relation_size` waits behind an ACCESS EXCLUSIVE lock.
    let rows = crate::db::with_short_lock_wait(pool, |conn| {
        let stmt = conn.prepared(TABLE_SIZES)?;
        Ok(conn.client.query(&stmt, &[&names])?)
    })?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get(1), r.get::<_, i64>(2).max(0)))
        .collect())
}

fn render_sizes(out: &mut String, sizes: &[(String, i64, i64)]) {
    use std::fmt::Write;
    if sizes.is_empty() {
        return;
    }
    let _ = writeln!(out, "# TYPE table_size_bytes gauge");
    for (table, bytes, _) in sizes {
        let _ = writeln!(out, "table_size_bytes{{table=\"{table}\"}} {bytes}");
    }
    let _ = writeln!(out, "# TYPE table_rows_estimate gauge");
    for (table, _, rows) in sizes {
        let _ = writeln!(out, "table_rows_estimate{{table=\"{table}\"}} {rows}");
    }
}

const TABLE_SIZES: &str = "
SELECT c.relname::text, pg_total_relation_size(c.oid), coalesce(pg_stat_get_live_tuples(c.oid), 0)
FROM pg_class c
WHERE c.relname = ANY($1) AND c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace
ORDER BY c.relname";

/// One table to prune and how old its rows may get.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub table: Table,
    pub window: Duration,
}

/// Starts the pruner thread for `jobs` (the enabled ones), or nothing when there are none.
pub fn start(
    config: &Config,
    pool: Pool,
    jobs: Vec<Job>,
    shutdown: &Shutdown,
    metrics: Arc<RetentionMetrics>,
) -> Option<JoinHandle<()>> {
    if jobs.is_empty() {
        return None;
    }
    let pruner = Pruner {
        pool,
        jobs,
        batch_size: config.retention.batch_size_max,
        metrics,
        config: config.clone(),
        probe: QueueProbe::default(),
    };
    let interval = config.retention.interval;
    let shutdown = shutdown.clone();
    let handle = std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || {
            info!(
                "retention: pruning {} every {} ms",
                pruner.describe(),
                interval.as_millis()
            );
            loop {
                pruner.run(&shutdown);
                if shutdown.sleep(interval) {
                    return;
                }
            }
        })
        .expect("spawning the retention thread");
    Some(handle)
}

/// Deletes expired rows of its jobs' tables.
pub struct Pruner {
    pool: Pool,
    jobs: Vec<Job>,
    batch_size: usize,
    metrics: Arc<RetentionMetrics>,
    config: Config,
    /// Asks the broker how many messages wait, so that their outbox rows are kept.
    probe: QueueProbe,
}

/// Where a run has got to in a table: everything before it was examined. Outbox rows are
/// walked by id, the other tables by their timestamp.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    /// The last id examined, and the first id that may still wait in the broker.
    Id(i64, i64),
    Time(DateTime<Utc>),
}

/// What one batch did.
#[derive(Debug)]
enum Step {
    /// Another instance holds the table's lock.
    Busy,
    /// `removed` rows deleted; `more` if the batch was full (more may be expired).
    Done {
        removed: u64,
        more: bool,
        next: Cursor,
    },
}

impl Pruner {
    fn describe(&self) -> String {
        let parts: Vec<String> = self
            .jobs
            .iter()
            .map(|j| format!("{} after {} s", j.table.name(), j.window.as_secs_f64()))
            .collect();
        parts.join(", ")
    }

    /// One run: every table, until nothing expired is left (or shutdown). Errors are logged
    /// and counted; the next run tries again.
    pub fn run(&self, shutdown: &Shutdown) {
        self.metrics.runs.inc();
        for job in &self.jobs {
            let result = self
                .prune(job, shutdown)
                .and_then(|n| Ok((n, self.vacuum_if_due(job.table)?)));
            match result {
                Ok((0, false)) => {}
                Ok((n, vacuumed)) => debug!(
                    "retention: removed {n} rows from {}{}",
                    job.table.name(),
                    if vacuumed { ", then vacuumed it" } else { "" }
                ),
                Err(e) => {
                    self.metrics.errors.inc();
                    warn!("retention of {} failed: {e}", job.table.name());
                }
            }
        }
    }

    /// The smallest outbox id whose event may still wait in the broker: messages are queued
    /// in id order, so with `n` ready messages they are (at most) the `n` newest published
    /// rows. Their rows are kept whatever their age, so that sync-status can still date the
    /// oldest waiting event. The newest published id is read before the broker is asked, so
    /// rows published meanwhile only move the bound down. None when the broker cannot be
    /// asked: the outbox is then left alone until the next run.
    fn first_queued_id(&self) -> Result<Option<i64>> {
        let mut conn = self.pool.get()?;
        let newest = conn.prepared(NEWEST_PUBLISHED)?;
        let Some(newest) = conn.client.query_opt(&newest, &[])? else {
            return Ok(Some(0)); // nothing published: nothing to delete
        };
        let newest: i64 = newest.get(0);
        let Some(ready) = self.probe.ready(&self.config) else {
            return Ok(None);
        };
        let waiting = ready.events;
        if waiting == 0 {
            return Ok(Some(newest + 1));
        }
        let stmt = conn.prepared(NTH_NEWEST_PUBLISHED)?;
        let row = conn.client.query_opt(&stmt, &[&newest, &(waiting - 1)])?;
        Ok(Some(row.map_or(0, |r| r.get(0))))
    }

    /// Where autovacuum is off (as on some shared or tuned servers), nothing would make the
    /// space of deleted rows (and of the outbox's superseded versions) reusable, and the table
    /// would grow forever. Then the pruner vacuums its own tables once 2% of their rows are
    /// dead, the threshold the migrations give autovacuum. A plain VACUUM takes no lock that
    /// reads or writes wait for; `SKIP_LOCKED` skips a table another vacuum is working on.
    /// Without ownership of the table PostgreSQL skips it with a warning.
    fn vacuum_if_due(&self, table: Table) -> Result<bool> {
        let mut conn = self.pool.get()?;
        let stmt = conn.prepared(VACUUM_DUE)?;
        let due = conn
            .client
            .query_opt(&stmt, &[&table.name()])?
            .is_some_and(|r| r.get::<_, bool>(0));
        if !due {
            return Ok(false);
        }
        // A large table takes longer than the session's statement timeout.
        conn.client.batch_execute("SET statement_timeout = 0")?;
        let vacuumed = conn
            .client
            .batch_execute(&format!("VACUUM (SKIP_LOCKED) {}", table.name()));
        conn.client.batch_execute("RESET statement_timeout")?;
        vacuumed?;
        self.metrics.vacuums[table.index()].inc();
        Ok(true)
    }

    fn prune(&self, job: &Job, shutdown: &Shutdown) -> Result<u64> {
        let mut cursor = match job.table {
            Table::Outbox => match self.first_queued_id()? {
                Some(bound) => Cursor::Id(0, bound),
                None => return Ok(0),
            },
            _ => Cursor::Time(DateTime::<Utc>::UNIX_EPOCH),
        };
        let mut total = 0;
        for _ in 0..BATCHES_PER_RUN_MAX {
            if shutdown.is_triggered() {
                break;
            }
            match self.batch(job, cursor)? {
                Step::Busy => {
                    self.metrics.lock_busy[job.table.index()].inc();
                    break;
                }
                Step::Done {
                    removed,
                    more,
                    next,
                } => {
                    self.metrics.removed[job.table.index()].add(removed);
                    total += removed;
                    cursor = next;
                    if !more {
                        break;
                    }
                }
            }
        }
        Ok(total)
    }

    /// Deletes one batch in its own transaction, under the table's advisory lock.
    fn batch(&self, job: &Job, cursor: Cursor) -> Result<Step> {
        let mut tx = Tx::begin(&self.pool, self.pool.get()?)?;
        let lock = tx.conn().prepared(TRY_LOCK)?;
        let got: bool = tx
            .conn()
            .client
            .query_one(&lock, &[&job.table.lock_key()])?
            .get(0);
        if !got {
            tx.commit()?;
            return Ok(Step::Busy);
        }
        let window = match job.table {
            Table::ProcessedEvents => job.window.max(LATENCY_WINDOW),
            _ => job.window,
        };
        let window_secs = window.as_secs_f64();
        let n = self.batch_size;
        let stmt = tx.conn().prepared_owned(&delete_sql(job.table, n))?;
        let step = match cursor {
            Cursor::Id(after, bound) => {
                let row = tx
                    .conn()
                    .client
                    .query_one(&stmt, &[&after, &window_secs, &bound])?;
                let removed: i64 = row.get(0);
                let examined: i64 = row.get(1);
                Step::Done {
                    removed: removed as u64,
                    more: examined as usize >= n,
                    next: Cursor::Id(row.get::<_, Option<i64>>(2).unwrap_or(after), bound),
                }
            }
            Cursor::Time(after) => {
                let row = tx.conn().client.query_one(&stmt, &[&after, &window_secs])?;
                let removed: i64 = row.get(0);
                Step::Done {
                    removed: removed as u64,
                    more: removed as usize >= n,
                    next: Cursor::Time(row.get::<_, Option<DateTime<Utc>>>(1).unwrap_or(after)),
                }
            }
        };
        tx.commit()?;
        Ok(step)
    }
}

const TRY_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";

const NEWEST_PUBLISHED: &str =
    "SELECT id FROM outbox WHERE published_at IS NOT NULL ORDER BY id DESC LIMIT 1";

const NTH_NEWEST_PUBLISHED: &str = "
SELECT id FROM outbox WHERE published_at IS NOT NULL AND id <= $1 ORDER BY id DESC OFFSET $2 LIMIT 1";

const VACUUM_DUE: &str = "
SELECT NOT current_setting('autovacuum')::bool AND s.n_dead_tup > 1000 + 0.02 * s.n_live_tup
FROM pg_stat_user_tables s WHERE s.relid = to_regclass($1)";

/// The delete statement of one batch of `n` rows. `$1` is the cursor, `$2` the window in
/// seconds. The batch size is a literal (as in the outbox claim) so that the planner always
/// sees the LIMIT it will run with.
///
/// The outbox and `processed_events` are pruned by functions that run with their owner's
/// rights (write migration 009, read migration 013), so that the services' roles hold no
/// DELETE on them. The outbox is walked in id order from the cursor up to `$3` (the first
/// row that may still wait in the broker); only published rows of the expired prefix go,
/// whatever the age of an unpublished one. It returns the rows removed, the rows examined
/// and the last id examined.
///
/// The other tables are walked through the B-tree on their timestamp; the rows are deleted
/// by `ctid`, and the newest timestamp deleted becomes the next cursor.
fn delete_sql(table: Table, n: usize) -> String {
    match table {
        Table::Outbox => {
            format!("SELECT removed, examined, last_id FROM prune_outbox($1, $2, $3, {n})")
        }
        Table::ProcessedEvents => {
            format!("SELECT removed, newest FROM prune_processed_events($1, $2, {n})")
        }
        Table::IdempotencyKeys => by_time("idempotency_keys", "created_at", n),
        Table::EventFailures => by_time("event_failures", "updated_at", n),
    }
}

fn by_time(table: &str, column: &str, n: usize) -> String {
    format!(
        "WITH gone AS (
            DELETE FROM {table} WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM {table}
                WHERE {column} >= $1 AND {column} < now() - make_interval(secs => $2)
                ORDER BY {column} LIMIT {n}))
            RETURNING {column}
        )
        SELECT count(*), max({column}) FROM gone"
    )
}
