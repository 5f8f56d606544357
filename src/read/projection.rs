//! Events to read-model rows. The projections are sums, counts and maxima, so a batch of
//! events can be folded in memory first (pure code, `fold`) and written with one upsert per
//! view (`apply_batch`), whatever order the events arrived in. The event ids go into
//! `processed_events` in the same transaction, and only the ids that were not there yet
//! are folded: a redelivered or duplicated event changes nothing.
//!
//! Concurrent batches never write the same row (sql/read/006 and 009): each holds a shard
//! of the counters every batch adds to, and only the batch holding the fold lock writes
//! the product and customer views; the others add to pending rows under their shard, which
//! the fold lock's next holder moves into the views (`fold_pending` when idle).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, Utc};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{GenericClient, Statement, Transaction};
use uuid::Uuid;

use crate::db::{array_literal, Conn};
use crate::error::{Error, Result};
use crate::event::Event;

#[derive(Debug, Default, PartialEq)]
pub struct ProductDelta {
    pub name: Option<String>,
    pub category: Option<String>,
    pub quantity: i64,
    pub revenue_cents: i64,
    pub orders: i64,
}

#[derive(Debug, Default, PartialEq)]
pub struct CategoryDelta {
    pub revenue_cents: i64,
    pub orders: i64,
}

#[derive(Debug, PartialEq)]
pub struct CustomerDelta {
    pub spent_cents: i64,
    pub orders: i64,
    pub last_order: DateTime<Utc>,
}

#[derive(Debug, Default, PartialEq)]
pub struct HourDelta {
    pub orders: i64,
    pub revenue_cents: i64,
}

/// A batch of events folded per key. BTreeMaps keep keys sorted, so every transaction
/// locks rows in the same order and concurrent consumers cannot deadlock.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub products: BTreeMap<i64, ProductDelta>,
    pub categories: BTreeMap<String, CategoryDelta>,
    pub customers: BTreeMap<i64, CustomerDelta>,
    pub hours: BTreeMap<DateTime<Utc>, HourDelta>,
    pub newest_event: Option<DateTime<Utc>>,
    pub events: i64,
}

fn overflow() -> Error {
    Error::bad_request("money overflow while folding a batch")
}

fn add(a: &mut i64, b: i64) -> Result<()> {
    *a = a.checked_add(b).ok_or_else(overflow)?;
    Ok(())
}

/// The UTC hour an instant falls in.
pub fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    let secs = t.timestamp();
    DateTime::from_timestamp(secs - secs.rem_euclid(3600), 0).unwrap_or(t)
}

/// Folds events into per-key deltas. Pure: no I/O, so it is tested directly.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> Result<Delta> {
    let mut d = Delta::default();
    for event in events {
        d.events += 1;
        d.newest_event = d.newest_event.max(Some(event.timestamp()));
        match event {
            Event::ProductCreated(p) => {
                let e = d.products.entry(p.product_id).or_default();
                e.name = Some(p.name.clone());
                e.category = Some(p.category.clone());
                d.categories.entry(p.category.clone()).or_default();
            }
            Event::OrderCreated(o) => {
                let mut by_category: BTreeMap<&str, i64> = BTreeMap::new();
                for item in &o.items {
                    let line = item
                        .price_cents
                        .checked_mul(item.quantity)
                        .ok_or_else(overflow)?;
                    let e = d.products.entry(item.product_id).or_default();
                    if e.name.is_none() {
                        e.name = Some(item.product_name.clone());
                        e.category = Some(item.category.clone());
                    }
                    add(&mut e.quantity, item.quantity)?;
                    add(&mut e.revenue_cents, line)?;
                    e.orders += 1;
                    add(by_category.entry(&item.category).or_default(), line)?;
                }
                for (category, revenue) in by_category {
                    let c = d.categories.entry(category.to_string()).or_default();
                    add(&mut c.revenue_cents, revenue)?;
                    c.orders += 1;
                }
                let c = d.customers.entry(o.customer_id).or_insert(CustomerDelta {
                    spent_cents: 0,
                    orders: 0,
                    last_order: o.timestamp,
                });
                add(&mut c.spent_cents, o.total_cents)?;
                c.orders += 1;
                c.last_order = c.last_order.max(o.timestamp);
                let h = d.hours.entry(hour_of(o.timestamp)).or_default();
                h.orders += 1;
                add(&mut h.revenue_cents, o.total_cents)?;
            }
        }
    }
    Ok(d)
}

/// What a batch did: events applied now, events dropped as already processed, and whether
/// it left product or customer sums pending (another batch held the fold lock).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchCounts {
    pub applied: usize,
    pub duplicates: usize,
    pub left_pending: bool,
    /// The ids applied, when some of the batch's were applied before (the long way); None
    /// when every distinct event of the batch was.
    pub fresh: Option<HashSet<Uuid>>,
}

/// Applies `events` in one read-DB transaction: records their ids, drops the ones already
/// processed, upserts the folded deltas, advances sync_status, commits. Then waits for
/// `FLUSH_BARRIER`: the consumer's sessions commit without waiting for the WAL flush
/// (`db::Session::Consumer`), so the batch is visible once it commits, and durable, ready
/// to ack, once this returns.
///
/// Usually two round trips: the batch in one statement (`apply_at_once`), then the barrier.
/// If some event was processed before, that statement undoes itself and the batch goes
/// the long way, in three more: `BEGIN` with the claim (`Conn::begin_execute`, the batch's
/// ids, types and timestamps as literals), the writes of the new events, then `COMMIT`
/// with the barrier.
///
/// On any error the connection goes back to the pool outside a transaction: a statement
/// that fails inside `BEGIN` (the long way, or the barrier's own transaction, e.g. its
/// `setval` past `lock_timeout`) leaves the transaction open and aborted, and every later
/// batch on that connection would fail with 25P02, a permanent error, and be dead-lettered.
pub fn apply_batch(conn: &mut Conn, events: &[Event]) -> Result<BatchCounts> {
    apply_batch_noting(conn, events, &mut 0)
}

/// [`apply_batch`], adding to `committed` the events it applied and committed before it
/// failed (its flush barrier failed after the commit): applied again, they are found
/// applied, and the caller counts them as applied, not as duplicates. (The long way's
/// `COMMIT` and barrier fail as one round trip, so there it cannot tell, and adds nothing.)
pub fn apply_batch_noting(
    conn: &mut Conn,
    events: &[Event],
    committed: &mut usize,
) -> Result<BatchCounts> {
    let result = apply(conn, events, committed);
    if result.is_err() {
        // Outside a transaction a ROLLBACK only warns; a lost connection fails here too,
        // and the pool discards it.
        let _ = conn.client.batch_execute("ROLLBACK");
    }
    result
}

fn apply(conn: &mut Conn, events: &[Event], committed: &mut usize) -> Result<BatchCounts> {
    let batch = Batch::new(events);
    if let Some(counts) = apply_at_once(conn, &batch)? {
        if let Err(e) = conn.client.batch_execute(FLUSH_BARRIER) {
            *committed += counts.applied;
            return Err(e.into());
        }
        return Ok(counts);
    }
    let statements = Statements::prepare(conn)?;
    let applied = conn
        .begin_execute("consumer_begin_batch", BEGIN_BATCH, &batch.literals())
        .map_err(Error::from)
        .and_then(|rows| {
            let row = rows
                .first()
                .ok_or_else(|| Error::internal("the batch's claim returned no row"))?;
            let (claim, fresh) = Claim::from_text(row)?;
            finish(&mut conn.client, &statements, &batch, &claim, &fresh)
        });
    let counts = applied?; // `apply_batch` rolls back
    conn.client.batch_execute(COMMIT_AND_FLUSH)?;
    Ok(counts)
}

/// The batch in one statement (`at_once_sql`), assuming every event is new: claims, records
/// the ids, writes what all of them add, and commits, unless some id was there before (then
/// it fails with CQ001, having changed nothing, and this returns None). None too if the
/// events do not fold (a money overflow): the long way folds only the new ones, and says
/// so if the new ones do not fold either. If the batch took the fold lock and found pending
/// sums, they are folded after it, in a transaction of their own (`fold_pending`).
fn apply_at_once(conn: &mut Conn, batch: &Batch) -> Result<Option<BatchCounts>> {
    let Ok(delta) = fold(batch.unique.values().copied()) else {
        return Ok(None);
    };
    let statement = conn.prepared(at_once_sql())?;
    let (ids, types, stamps) = batch.columns();
    let row = with_write_parameters(&delta, 0, |write| {
        let mut parameters = write.to_vec();
        parameters.extend_from_slice(&[
            &SHARD_LOCK_CLASS,
            &SHARDS,
            &FOLD_LOCK_CLASS,
            &false,
            &ids,
            &types,
            &stamps,
            &false,
        ]);
        conn.client.query_one(&statement, &parameters)
    });
    let (folder, pending): (bool, bool) = match row {
        Ok(row) => (row.get(1), row.get(2)),
        Err(e) if e.code().map(SqlState::code) == Some(NOT_AT_ONCE) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let wrote_views = !delta.products.is_empty() || !delta.customers.is_empty();
    let mut left_pending = wrote_views && !folder;
    if folder && pending {
        // The batch is applied; sums it could not fold wait for the next try.
        left_pending |= fold_pending(conn).unwrap_or_else(|e| {
            log::debug!("folding pending sums after a batch failed: {e}");
            true
        });
    }
    Ok(Some(BatchCounts {
        applied: batch.unique.len(),
        duplicates: batch.events - batch.unique.len(),
        left_pending,
        fresh: None,
    }))
}

/// The SQLSTATE of `consumer_batch_at_once` (read migration 011).
const NOT_AT_ONCE: &str = "CQ001";

/// Returns once the WAL is flushed past every commit this session made before: a
/// transaction commits synchronously (and flushing its commit record flushes all earlier
/// WAL) only if it wrote WAL and has an id, and `setval` does both (read migration 010;
/// `pg_current_xact_id()` alone gives an id but writes nothing, so its commit waits for
/// nothing). A commit with `synchronous_commit=off` may be lost in a crash of the database
/// for up to three times `wal_writer_delay`. Runs after the batch is visible: readers see a
/// batch a flush earlier (the consumer's transaction went from 2.2–2.6 to 1.7–1.9 ms,
/// median of 20 events each, on the 2-core machine). If the database crashes before the
/// flush, the batch is lost with its `processed_events` rows and nothing was acked, so it
/// is redelivered and applied again; a reader may have seen it in between.
macro_rules! flush_barrier {
    () => {
        "BEGIN; SET LOCAL synchronous_commit = on; SELECT setval('consumer_flush_barrier', 1); COMMIT"
    };
}

/// See `flush_barrier!`.
pub const FLUSH_BARRIER: &str = flush_barrier!();

/// A batch's `COMMIT` and the flush barrier, in one round trip, with the notification of
/// the change (`read::cache`). In one simple query, an error stops the statements after
/// it: no barrier runs for a failed commit.
const COMMIT_AND_FLUSH: &str = concat!("NOTIFY read_model_changed; COMMIT; ", flush_barrier!());

/// Moves pending product and customer rows into the views, in a transaction of its own, if
/// the fold lock is free (the consumers call it when idle while rows are pending). Returns
/// whether rows are still pending: under a shard a batch in flight holds, or all of them
/// when another transaction holds the fold lock (which may fold them, or not: its snapshot
/// may predate them), so the caller tries again a little later.
pub fn fold_pending(conn: &mut Conn) -> Result<bool> {
    let statements = Statements::prepare(conn)?;
    let mut tx = conn.client.transaction()?;
    let claim = claim(&mut tx, &statements)?;
    if !claim.folder {
        tx.rollback()?;
        return Ok(true);
    }
    if claim.pending {
        tx.execute(&statements.fold, &[&SHARD_LOCK_CLASS, &SHARDS])?;
        // The ranked lists read the views alone: folding changes their answers.
        tx.batch_execute(crate::read::cache::NOTIFY)?;
    }
    let still: bool = tx.query_one(&statements.pending, &[])?.get(0);
    tx.commit()?;
    Ok(still)
}

/// `apply_batch` inside a transaction the caller commits. `backdate` records the events as
/// processed at their own timestamps (the rebuild's snapshot: not a measure of latency, and
/// kept for the deduplication window counted from the event).
pub fn apply_in(
    tx: &mut Transaction,
    statements: &Statements,
    events: &[Event],
    backdate: bool,
) -> Result<BatchCounts> {
    let batch = Batch::new(events);
    let (ids, types, stamps) = batch.columns();
    // Round trip 1: the shard and fold locks, and the ids not processed before.
    let row = tx.query_one(
        &statements.begin,
        &[
            &SHARD_LOCK_CLASS,
            &SHARDS,
            &FOLD_LOCK_CLASS,
            &statements.exclusive,
            &ids,
            &types,
            &stamps,
            &backdate,
        ],
    )?;
    let fresh: HashSet<Uuid> = row
        .get::<_, Option<Vec<Uuid>>>(3)
        .unwrap_or_default()
        .into_iter()
        .collect();
    finish(tx, statements, &batch, &Claim::from_row(&row), &fresh)
}

/// A batch's events, sorted and distinct: duplicates inside one batch count once, and
/// concurrent batches insert overlapping ids in the same order (no deadlock on the
/// primary key).
struct Batch<'e> {
    events: usize,
    unique: BTreeMap<Uuid, &'e Event>,
}

impl<'e> Batch<'e> {
    fn new(events: &'e [Event]) -> Batch<'e> {
        let mut unique = BTreeMap::new();
        for e in events {
            unique.entry(e.event_id()).or_insert(e);
        }
        Batch {
            events: events.len(),
            unique,
        }
    }

    /// The ids, types and timestamps, as `BEGIN_BATCH`'s `$5` to `$7`.
    fn columns(&self) -> (Vec<Uuid>, Vec<&'static str>, Vec<DateTime<Utc>>) {
        let ids = self.unique.keys().copied().collect();
        let types = self.unique.values().map(|e| e.event_type()).collect();
        let stamps = self.unique.values().map(|e| e.timestamp()).collect();
        (ids, types, stamps)
    }

    /// `BEGIN_BATCH`'s arguments as SQL literals, for `Conn::begin_execute`, not backdated.
    /// No value comes from a client as text: numbers, UUIDs, the two event types and
    /// instants formatted here, none of which holds a quote, backslash, comma or brace.
    fn literals(&self) -> String {
        let ids = array_literal(self.unique.keys());
        let types = array_literal(self.unique.values().map(|e| e.event_type()));
        let stamps = array_literal(
            self.unique
                .values()
                .map(|e| timestamp_literal(e.timestamp())),
        );
        format!(
            "({SHARD_LOCK_CLASS}, {SHARDS}, {FOLD_LOCK_CLASS}, false, {ids}, {types}, {stamps}, false)"
        )
    }
}

/// An instant as an element of a `timestamptz[]` literal, to the microsecond: in double
/// quotes, for the space before the era. Every instant an RFC 3339 timestamp gives is one
/// PostgreSQL takes, from 2 BC (year -1 in UTC) to 10000 AD, as the binary protocol does.
fn timestamp_literal(t: DateTime<Utc>) -> String {
    let (year, era) = match t.year() {
        y if y <= 0 => (1 - y, " BC"),
        y => (y, ""),
    };
    format!("\"{year:04}-{}Z{era}\"", t.format("%m-%d %H:%M:%S%.6f"))
}

/// The rest of a batch once its claim is made: folds the fresh events, writes them, and
/// folds pending rows if this batch holds the fold lock.
fn finish(
    client: &mut impl GenericClient,
    statements: &Statements,
    batch: &Batch,
    claim: &Claim,
    fresh: &HashSet<Uuid>,
) -> Result<BatchCounts> {
    let delta = fold(
        batch
            .unique
            .values()
            .copied()
            .filter(|e| fresh.contains(&e.event_id())),
    )?;
    // Round trip 2: every write of the batch.
    write(client, statements, &delta, claim)?;
    if claim.folder && claim.pending {
        client.execute(&statements.fold, &[&SHARD_LOCK_CLASS, &SHARDS])?;
    }
    let applied = fresh.len();
    let wrote_views = !delta.products.is_empty() || !delta.customers.is_empty();
    Ok(BatchCounts {
        applied,
        duplicates: batch.events - applied,
        left_pending: wrote_views && !claim.folder,
        fresh: Some(fresh.clone()),
    })
}

/// Shards of the rows every batch adds to (categories, hours, sync counters): see
/// sql/read/006_sharded_counters.sql. More shards than concurrent consumer transactions.
const SHARDS: i32 = 16;

/// An arbitrary constant: the advisory-lock class of the shards.
const SHARD_LOCK_CLASS: i32 = 0x7368_6172;

/// An arbitrary constant: the advisory-lock class of the fold lock.
pub const FOLD_LOCK_CLASS: i32 = 0x666f_6c64;

/// What a batch's transaction holds until it ends.
struct Claim {
    /// A shard no concurrent batch holds. Each consumer starts its search at its own place
    /// (the backend's pid), so usually the first try wins. With more concurrent batches
    /// than shards, the last ones share shard 0 and take turns on its rows.
    shard: i16,
    /// The fold lock: this transaction is the only one writing the product and customer
    /// views now. Always true for a writer that has its tables to itself (the rebuild).
    folder: bool,
    /// Whether pending product or customer rows exist (some may be in flight still).
    pending: bool,
}

/// Takes a shard and, if it is free, the fold lock, for this transaction (advisory
/// try-locks: a batch never waits for another).
fn claim(tx: &mut Transaction, s: &Statements) -> Result<Claim> {
    let row = tx.query_one(
        &s.claim,
        &[&SHARD_LOCK_CLASS, &SHARDS, &FOLD_LOCK_CLASS, &s.exclusive],
    )?;
    Ok(Claim::from_row(&row))
}

impl Claim {
    /// The first three columns of `CLAIM` or `BEGIN_BATCH`.
    fn from_row(row: &postgres::Row) -> Claim {
        Claim {
            shard: row.get::<_, Option<i16>>(0).unwrap_or(0),
            folder: row.get(1),
            pending: row.get(2),
        }
    }

    /// `BEGIN_BATCH`'s row as text (`Conn::begin_execute`): the claim and the fresh ids.
    fn from_text(row: &postgres::SimpleQueryRow) -> Result<(Claim, HashSet<Uuid>)> {
        let bad = |what: &str| Error::internal(format!("the batch's claim: bad {what}"));
        let shard = match row.get(0) {
            None => 0,
            Some(s) => s.parse().map_err(|_| bad("shard"))?,
        };
        let flag = |i: usize| row.get(i) == Some("t");
        let mut fresh = HashSet::new();
        if let Some(array) = row.get(3) {
            let inner = array
                .strip_prefix('{')
                .and_then(|a| a.strip_suffix('}'))
                .ok_or_else(|| bad("id array"))?;
            for id in inner.split(',').filter(|id| !id.is_empty()) {
                fresh.insert(Uuid::parse_str(id).map_err(|_| bad("event id"))?);
            }
        }
        let claim = Claim {
            shard,
            folder: flag(1),
            pending: flag(2),
        };
        Ok((claim, fresh))
    }
}

/// The statements of `apply_batch`, prepared once per pooled connection.
pub struct Statements {
    /// The tables are this writer's alone: no fold lock, no pending rows (the rebuild's
    /// shadow tables).
    exclusive: bool,
    claim: Statement,
    begin: Statement,
    write_views: Statement,
    write_pending: Statement,
    fold: Statement,
    pending: Statement,
}

impl Statements {
    pub fn prepare(conn: &mut Conn) -> Result<Statements> {
        Ok(Statements {
            exclusive: false,
            claim: conn.prepared(CLAIM)?,
            begin: conn.prepared(BEGIN_BATCH)?,
            write_views: conn.prepared(WRITE_VIEWS)?,
            write_pending: conn.prepared(WRITE_PENDING)?,
            fold: conn.prepared(FOLD)?,
            pending: conn.prepared(ANY_PENDING)?,
        })
    }

    /// For a writer with the tables to itself: every batch writes the views directly.
    pub fn exclusive(self) -> Statements {
        Statements {
            exclusive: true,
            ..self
        }
    }
}

/// Writes `delta` in one statement: product and customer sums to the views if this batch
/// holds the fold lock, else to the pending rows of its shard; categories, hours and sync
/// counters to its shard's rows. Empty arrays write nothing.
fn write(
    client: &mut impl GenericClient,
    s: &Statements,
    delta: &Delta,
    claim: &Claim,
) -> Result<()> {
    let statement = if claim.folder {
        &s.write_views
    } else {
        &s.write_pending
    };
    with_write_parameters(delta, claim.shard, |p| client.execute(statement, p))?;
    Ok(())
}

/// Calls `f` with the parameters `$1` to `$19` of the writes (see `WRITE_VIEWS`).
fn with_write_parameters<R>(
    delta: &Delta,
    shard: i16,
    f: impl FnOnce(&[&(dyn ToSql + Sync)]) -> R,
) -> R {
    let c = &delta.customers;
    let customers: Vec<i64> = c.keys().copied().collect();
    let spent: Vec<i64> = c.values().map(|c| c.spent_cents).collect();
    let customer_orders: Vec<i64> = c.values().map(|c| c.orders).collect();
    let last: Vec<DateTime<Utc>> = c.values().map(|c| c.last_order).collect();
    let p = &delta.products;
    let products: Vec<i64> = p.keys().copied().collect();
    let names: Vec<Option<&str>> = p.values().map(|p| p.name.as_deref()).collect();
    let categories: Vec<Option<&str>> = p.values().map(|p| p.category.as_deref()).collect();
    let qty: Vec<i64> = p.values().map(|p| p.quantity).collect();
    let product_revenue: Vec<i64> = p.values().map(|p| p.revenue_cents).collect();
    let product_orders: Vec<i64> = p.values().map(|p| p.orders).collect();
    let k = &delta.categories;
    let category_names: Vec<&str> = k.keys().map(String::as_str).collect();
    let category_revenue: Vec<i64> = k.values().map(|c| c.revenue_cents).collect();
    let category_orders: Vec<i64> = k.values().map(|c| c.orders).collect();
    let h = &delta.hours;
    let hours: Vec<DateTime<Utc>> = h.keys().copied().collect();
    let hour_orders: Vec<i64> = h.values().map(|h| h.orders).collect();
    let hour_revenue: Vec<i64> = h.values().map(|h| h.revenue_cents).collect();
    f(&[
        &customers,
        &spent,
        &customer_orders,
        &last,
        &products,
        &names,
        &categories,
        &qty,
        &product_revenue,
        &product_orders,
        &category_names,
        &category_revenue,
        &category_orders,
        &hours,
        &hour_orders,
        &hour_revenue,
        &delta.newest_event,
        &shard,
        &delta.events,
    ])
}

/// The first free shard, searching from a place that differs per backend (evaluated row
/// by row, so the lock is taken on exactly one shard); the fold lock if it is free (or the
/// writer is exclusive); whether pending rows exist.
macro_rules! claim_columns {
    () => {
        "(SELECT s::smallint FROM generate_series(0, $2::int - 1) AS g(i),
            LATERAL (SELECT (i + pg_backend_pid()) % $2::int AS s) AS x
        WHERE pg_try_advisory_xact_lock($1::int, s)
        LIMIT 1) AS shard,
    CASE WHEN $4::bool THEN true ELSE pg_try_advisory_xact_lock($3::int, 0) END AS folder,
    EXISTS (SELECT 1 FROM product_sales_delta) OR EXISTS (SELECT 1 FROM customer_ltv_delta) AS pending"
    };
}

const CLAIM: &str = concat!("SELECT ", claim_columns!());

const ANY_PENDING: &str =
    "SELECT EXISTS (SELECT 1 FROM product_sales_delta) OR EXISTS (SELECT 1 FROM customer_ltv_delta)";

/// Moves the pending rows of every shard no batch in flight holds (a try-lock per shard
/// with rows: taken, the shard's rows are complete, committed and stay untouched until
/// this transaction ends) into the views, summed per key. Run by the fold lock's holder.
/// The CASE makes the try-lock come after the check for rows (PostgreSQL orders the terms
/// of an AND by cost, and would lock every free shard first, leaving none to claim).
/// How a row summed from a batch or from pending rows (`excluded`) adds to a product's row.
macro_rules! product_view_added {
    () => {
        "
    ON CONFLICT (product_id) DO UPDATE SET
        name = COALESCE(v.name, excluded.name),
        category = COALESCE(v.category, excluded.category),
        total_quantity_sold = v.total_quantity_sold + excluded.total_quantity_sold,
        total_revenue = v.total_revenue + excluded.total_revenue,
        order_count = v.order_count + excluded.order_count,
        last_updated = now()"
    };
}

/// How a row summed from a batch or from pending rows (`excluded`) adds to a customer's row.
macro_rules! customer_view_added {
    () => {
        "
    ON CONFLICT (customer_id) DO UPDATE SET
        total_spent = v.total_spent + excluded.total_spent,
        order_count = v.order_count + excluded.order_count,
        last_order_date = GREATEST(v.last_order_date, excluded.last_order_date),
        last_updated = now()"
    };
}

const FOLD: &str = concat!(
    "
WITH shards AS MATERIALIZED (
    SELECT g.s::smallint AS s FROM generate_series(0, $2::int - 1) AS g(s)
    WHERE CASE WHEN EXISTS (SELECT 1 FROM product_sales_delta d WHERE d.shard = g.s)
                 OR EXISTS (SELECT 1 FROM customer_ltv_delta d WHERE d.shard = g.s)
          THEN pg_try_advisory_xact_lock($1::int, g.s) ELSE false END
), products AS (
    DELETE FROM product_sales_delta d USING shards WHERE d.shard = shards.s
    RETURNING d.product_id, d.name, d.category, d.quantity, d.revenue, d.orders
), customers AS (
    DELETE FROM customer_ltv_delta d USING shards WHERE d.shard = shards.s
    RETURNING d.customer_id, d.spent, d.orders, d.last_order
), folded_products AS (
    INSERT INTO product_sales_view AS v (product_id, name, category, total_quantity_sold, total_revenue, order_count)
    SELECT product_id, max(name), max(category), sum(quantity), sum(revenue), sum(orders)
    FROM products GROUP BY product_id ORDER BY product_id
",
    product_view_added!(),
    "
)
INSERT INTO customer_ltv_view AS v (customer_id, total_spent, order_count, last_order_date)
SELECT customer_id, sum(spent), sum(orders), max(last_order)
FROM customers GROUP BY customer_id ORDER BY customer_id
",
    customer_view_added!()
);

/// The claim (`CLAIM`'s three columns) and the ids of `$5` not processed before, recorded
/// now with their types and timestamps (processed at their timestamps if `$8`, the
/// rebuild's snapshot), as two CTEs, `claim` and `fresh`.
macro_rules! claim_and_record {
    () => {
        concat!(
            "
WITH claim AS MATERIALIZED (SELECT ",
            claim_columns!(),
            "
), fresh AS (
    INSERT INTO processed_events (event_id, event_type, event_timestamp, processed_at)
    SELECT id, kind, ts, CASE WHEN $8::bool THEN ts ELSE clock_timestamp() END
    FROM unnest($5::uuid[], $6::text[], $7::timestamptz[]) AS u(id, kind, ts)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)"
        )
    };
}

/// Round trip 1 of a batch the long way: the claim, then the ids recorded now.
const BEGIN_BATCH: &str = concat!(
    claim_and_record!(),
    "
SELECT claim.shard, claim.folder, claim.pending, (SELECT array_agg(event_id) FROM fresh) FROM claim"
);

// Round trip 2 of a batch, `write`: one statement of data-modifying CTEs, each over arrays
// that may be empty. Parameters: customers $1-$4 (id, cents, orders, last order), products
// $5-$10 (id, name, category, quantity, cents, orders), categories $11-$13 (name, cents,
// orders), hours $14-$16 (hour, orders, cents), the newest event's timestamp $17 (NULL:
// none), the shard $18, the events applied $19. Products and customers go to the views
// (`WRITE_VIEWS`, the fold lock's holder) or to the shard's pending rows (`WRITE_PENDING`).
macro_rules! customers_to_view {
    ($when:literal) => {
        concat!(
            "INSERT INTO customer_ltv_view AS v (customer_id, total_spent, order_count, last_order_date)
    SELECT id, cents::numeric / 100, orders, last
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::timestamptz[]) AS u(id, cents, orders, last)",
            $when,
            customer_view_added!()
        )
    };
}

macro_rules! products_to_view {
    ($when:literal) => {
        concat!(
            "INSERT INTO product_sales_view AS v (product_id, name, category, total_quantity_sold, total_revenue, order_count)
    SELECT id, name, category, qty, cents::numeric / 100, orders
    FROM unnest($5::bigint[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[])
        AS u(id, name, category, qty, cents, orders)",
            $when,
            product_view_added!()
        )
    };
}

macro_rules! customers_to_pending {
    ($shard:literal, $when:literal) => {
        concat!("INSERT INTO customer_ltv_delta AS v (shard, customer_id, spent, orders, last_order)
    SELECT ", $shard, ", id, cents::numeric / 100, orders, last
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::timestamptz[]) AS u(id, cents, orders, last)",
    $when, "
    ON CONFLICT (shard, customer_id) DO UPDATE SET
        spent = v.spent + excluded.spent,
        orders = v.orders + excluded.orders,
        last_order = GREATEST(v.last_order, excluded.last_order)")
    };
}

macro_rules! products_to_pending {
    ($shard:literal, $when:literal) => {
        concat!("INSERT INTO product_sales_delta AS v (shard, product_id, name, category, quantity, revenue, orders)
    SELECT ", $shard, ", id, name, category, qty, cents::numeric / 100, orders
    FROM unnest($5::bigint[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[])
        AS u(id, name, category, qty, cents, orders)",
    $when, "
    ON CONFLICT (shard, product_id) DO UPDATE SET
        name = COALESCE(v.name, excluded.name),
        category = COALESCE(v.category, excluded.category),
        quantity = v.quantity + excluded.quantity,
        revenue = v.revenue + excluded.revenue,
        orders = v.orders + excluded.orders")
    };
}

/// The shard's counters: categories, hours and the sync status, as CTEs; `$shard` is the
/// shard's number.
macro_rules! counters_and_sync {
    ($shard:literal) => {
        concat!("categories AS (
    INSERT INTO category_metrics_view AS v (category_name, total_revenue, total_orders, shard)
    SELECT name, cents::numeric / 100, orders, ", $shard, "
    FROM unnest($11::text[], $12::bigint[], $13::bigint[]) AS u(name, cents, orders)
    ON CONFLICT (category_name, shard) DO UPDATE SET
        total_revenue = v.total_revenue + excluded.total_revenue,
        total_orders = v.total_orders + excluded.total_orders,
        last_updated = now()
), hours AS (
    INSERT INTO hourly_sales_view AS v (hour_timestamp, total_orders, total_revenue, shard)
    SELECT hour, orders, cents::numeric / 100, ", $shard, "
    FROM unnest($14::timestamptz[], $15::bigint[], $16::bigint[]) AS u(hour, orders, cents)
    ON CONFLICT (hour_timestamp, shard) DO UPDATE SET
        total_orders = v.total_orders + excluded.total_orders,
        total_revenue = v.total_revenue + excluded.total_revenue,
        last_updated = now()
), sync AS (
    INSERT INTO sync_status AS v (id, last_processed_event_timestamp, events_applied, last_applied_at)
    SELECT 1 + ", $shard, ", $17::timestamptz, $19::bigint, now() WHERE $17::timestamptz IS NOT NULL
    ON CONFLICT (id) DO UPDATE SET
        last_processed_event_timestamp = GREATEST(v.last_processed_event_timestamp, excluded.last_processed_event_timestamp),
        events_applied = v.events_applied + excluded.events_applied,
        last_applied_at = excluded.last_applied_at
)")
    };
}

const WRITE_VIEWS: &str = concat!(
    "WITH customers AS (",
    customers_to_view!(""),
    "), products AS (",
    products_to_view!(""),
    "), ",
    counters_and_sync!("$18::smallint"),
    "\nSELECT"
);

const WRITE_PENDING: &str = concat!(
    "WITH customers AS (",
    customers_to_pending!("$18::smallint", ""),
    "), products AS (",
    products_to_pending!("$18::smallint", ""),
    "), ",
    counters_and_sync!("$18::smallint"),
    "\nSELECT"
);

/// A batch in one statement, in an implicit transaction (`apply_at_once`): `claim_and_record!`
/// with its parameters after the write's ($20 to $27), then every write of the batch,
/// products and customers to the views or, without the fold lock, to the shard's pending
/// rows (`$18` is the shard when the claim found none free). The main query fails with
/// SQLSTATE CQ001 (read migration 011), undoing all of it, unless every event was new
/// (`$19` of them); else it returns the claim's fold lock and whether sums are pending.
fn at_once_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let writes = concat!(
            ", customers AS (",
            customers_to_view!(" WHERE (SELECT folder FROM claim)"),
            "), products AS (",
            products_to_view!(" WHERE (SELECT folder FROM claim)"),
            "), customers_pending AS (",
            customers_to_pending!(
                "COALESCE((SELECT shard FROM claim), $18::smallint)",
                " WHERE NOT (SELECT folder FROM claim)"
            ),
            "), products_pending AS (",
            products_to_pending!(
                "COALESCE((SELECT shard FROM claim), $18::smallint)",
                " WHERE NOT (SELECT folder FROM claim)"
            ),
            "), ",
            counters_and_sync!("COALESCE((SELECT shard FROM claim), $18::smallint)"),
            "
SELECT consumer_batch_at_once((SELECT count(*) FROM fresh) = $19), folder, pending,
       pg_notify('read_model_changed', '') FROM claim"
        );
        format!("{}{writes}", shift_parameters(claim_and_record!(), 19))
    })
}

/// `sql` with every parameter `$n` renumbered `$n+by`. Our statements hold no `$` but in
/// their parameters.
fn shift_parameters(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{OrderCreated, OrderItem};

    fn order(customer: i64, items: &[(i64, &str, i64, i64)]) -> Event {
        Event::OrderCreated(OrderCreated {
            event_id: Uuid::new_v4(),
            timestamp: crate::event::now_millis(),
            order_id: 1,
            customer_id: customer,
            total_cents: items.iter().map(|(_, _, q, p)| q * p).sum(),
            items: items
                .iter()
                .map(|(id, cat, q, p)| OrderItem {
                    product_id: *id,
                    product_name: format!("p{id}"),
                    category: cat.to_string(),
                    quantity: *q,
                    price_cents: *p,
                })
                .collect(),
        })
    }

    #[test]
    fn folds_sums_counts_and_categories_once_per_order() {
        let events = [
            order(1, &[(1, "A", 2, 150), (2, "A", 1, 100)]),
            order(1, &[(1, "B", 1, 150)]),
        ];
        let d = fold(&events).unwrap();
        assert_eq!(d.products[&1].quantity, 3);
        assert_eq!(d.products[&1].revenue_cents, 450);
        assert_eq!(d.products[&1].orders, 2);
        assert_eq!(
            d.categories["A"],
            CategoryDelta {
                revenue_cents: 400,
                orders: 1
            }
        );
        assert_eq!(d.customers[&1].spent_cents, 550);
        assert_eq!(d.customers[&1].orders, 2);
        assert_eq!(d.hours.values().map(|h| h.orders).sum::<i64>(), 2);
    }

    #[test]
    fn hours_truncate() {
        let t = DateTime::parse_from_rfc3339("2026-02-11T16:35:12.345Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(hour_of(t).to_rfc3339(), "2026-02-11T16:00:00+00:00");
    }

    #[test]
    fn both_ways_of_committing_a_batch_notify_the_query_caches() {
        let channel = crate::read::cache::CHANNEL;
        assert!(COMMIT_AND_FLUSH.starts_with(&format!("NOTIFY {channel}; COMMIT;")));
        assert!(at_once_sql().contains(&format!("pg_notify('{channel}', '') FROM claim")));
    }
}
