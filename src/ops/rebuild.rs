//! `cqrs-analytics rebuild-read-model`: recomputes the read model from the write model (the
//! source of truth) while the services run, then switches to it in one short transaction.
//!
//! 1. Under an advisory lock on the read DB (a second rebuild refuses), empty copies of the
//!    read-model tables are created in the schema `rebuild_shadow`.
//! 2. `r0` = the read DB's clock. Then ONE snapshot of the write DB (REPEATABLE READ): every
//!    product and order visible in it is folded into the shadow tables by the consumer's own
//!    projection code, and its event id (stored on the row since write migration 005) goes
//!    into the shadow `processed_events`. The snapshot covers exactly those events.
//! 3. Catch-up: the consumers kept applying to the live tables meanwhile. Every event in the
//!    live `processed_events` since `r0` (minus a margin) that the shadow one lacks was
//!    committed after the snapshot; it is read back from the write DB by event id and applied
//!    to the shadow tables, keeping the time the consumers applied it. Repeated, each pass
//!    from where the previous one began (minus the margin), until little is left.
//! 4. The switch, one transaction: `ACCESS EXCLUSIVE` locks on the live tables (consumers
//!    and readers wait), a last catch-up pass over what came since the previous one, and
//!    `ALTER TABLE .. SET SCHEMA` moves the live tables out and the shadow ones in. Readers
//!    and consumers then resolve the names to the new tables (PostgreSQL re-plans their
//!    cached statements).
//!
//! Interrupted at any point before the switch commits, nothing has changed: the live tables
//! were only read, and the next run drops the leftovers. SIGINT or SIGTERM before the switch
//! stops it between two transactions: it drops its copy, says so and exits 1; once the
//! switch has begun, it finishes. ARCHITECTURE.md says why no event is lost or counted twice
//! across the switch.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use log::warn;
use postgres::error::SqlState;
use postgres::{Client, IsolationLevel, NoTls, Row, Transaction};
use uuid::Uuid;

use crate::app::{self, Role};
use crate::config::Config;
use crate::db::Conn;
use crate::error::{Error, Result};
use crate::event::{Event, OrderCreated, OrderItem, ProductCreated};
use crate::read::projection::{self, Statements};
use crate::shutdown::Shutdown;

/// Serialises rebuilds of one read DB (`pg_try_advisory_lock`).
pub const REBUILD_LOCK_KEY: i64 = 0x7265_6275_696c_6421;
const SHADOW: &str = "rebuild_shadow";
const RETIRED: &str = "rebuild_retired";
/// The tables switched, in the order the consumer's transaction touches them (the locks
/// are taken in this order, so the switch cannot deadlock with a consumer). The shadow's
/// pending tables stay empty (the rebuild writes the views directly); the live ones are
/// retired with the views, their rows being sums of events the shadow has applied too.
const TABLES: [&str; 8] = [
    "processed_events",
    "customer_ltv_view",
    "customer_ltv_delta",
    "product_sales_view",
    "product_sales_delta",
    "category_metrics_view",
    "hourly_sales_view",
    "sync_status",
];
/// Orders (or products, or caught-up events) read and applied per transaction.
const CHUNK: i64 = 5_000;
/// Slack on each catch-up pass's start: a read-DB clock that steps back, and a consumer's
/// transaction that commits, after the pass looked, rows it recorded before.
const CLOCK_MARGIN_SECS: f64 = 60.0;
/// Catch-up passes before the switch at most; the switch's own pass takes the rest.
const CATCH_UP_PASSES_MAX: usize = 10;
/// A pass that found fewer events than this is close enough for the switch.
const CATCH_UP_SMALL: usize = 500;
/// How long the switch waits for a lock before it lets go and tries again: readers queued
/// behind it wait at most this long for its locks (the services' own lock timeout is
/// longer), then for its last catch-up pass and the renames.
const SWITCH_LOCK_TIMEOUT_MS: u64 = 500;
const SWITCH_ATTEMPTS_MAX: u32 = 40;

/// Runs the rebuild. Ok(false): refused (another rebuild holds the lock, or the write
/// database is not a write model, or is empty beside a read model that is not), or stopped
/// by `stop` before the switch; message printed.
pub fn run(config: &Config, out: &mut dyn Write, stop: &Shutdown) -> Result<bool> {
    // The source must be there already: a mistyped DATABASE_URL must not become a new,
    // empty write model whose rebuild then empties the live read model.
    if let Some(refusal) = source_refusal(config)? {
        writeln!(out, "{refusal}; nothing was changed")?;
        return Ok(false);
    }
    match app::migrate(config, Role::All, Duration::from_secs(60), Some(stop)) {
        Err(e) if e.is_stopped() => {
            writeln!(out, "rebuild-read-model: {e}; nothing was changed")?;
            return Ok(false);
        }
        other => other?,
    };
    let mut read = connect(&config.read_db)?;
    let locked: bool = read
        .query_one("SELECT pg_try_advisory_lock($1)", &[&REBUILD_LOCK_KEY])?
        .get(0);
    if !locked {
        writeln!(
            out,
            "another rebuild-read-model is running on this read database; nothing was changed"
        )?;
        return Ok(false);
    }
    let live = live_schema(&mut read)?;
    if let Some(refusal) = empty_source_refusal(config, &mut read, &live)? {
        writeln!(out, "{refusal}; nothing was changed")?;
        return Ok(false);
    }
    prepare_shadow(&mut read, &live)?;
    let mut shadow = Conn::new(read);
    let mut progress = Progress::new(out);
    match build_and_switch(config, &mut shadow, &live, &mut progress, stop) {
        Ok(report) => {
            drop_retired(&mut shadow.client);
            writeln!(progress.out, "rebuild-read-model: {report}")?;
            Ok(true)
        }
        Err(e) if e.is_stopped() => {
            drop_retired(&mut shadow.client);
            writeln!(
                progress.out,
                "rebuild-read-model: stopped by a signal before the switch; its copy was \
                 dropped and the read model was not changed"
            )?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Builds the shadow tables from one snapshot, catches up and switches. Returns the report
/// line; Err(stopped) when `stop` fired before the switch began.
fn build_and_switch(
    config: &Config,
    shadow: &mut Conn,
    live: &str,
    progress: &mut Progress,
    stop: &Shutdown,
) -> Result<String> {
    let r0: DateTime<Utc> = shadow
        .client
        .query_one("SELECT clock_timestamp()", &[])?
        .get(0);
    shadow
        .client
        .batch_execute(&format!("SET search_path = {SHADOW}"))?;
    let stmts = Statements::prepare(shadow)?.exclusive();
    let mut write = connect(&config.write_db)?;
    let started = Instant::now();
    let (products, orders) = build(&mut write, &mut shadow.client, &stmts, progress, stop)?;
    let build_secs = started.elapsed().as_secs_f64();
    let (mut caught_up, since) =
        catch_up_passes(&mut shadow.client, &mut write, &stmts, live, r0, stop)?;
    let switched = match switch(&mut shadow.client, &mut write, &stmts, live, since, stop) {
        Ok(switched) => switched,
        Err(e) if e.is_stopped() => return Err(e),
        Err(e) => {
            // Nothing was switched: say who held the live tables, and drop the copy.
            let holders = lock_holders(&mut shadow.client, live);
            drop_retired(&mut shadow.client);
            return Err(Error::unavailable(format!(
                "the switch gave up ({e}); nothing was changed; sessions holding locks on the live tables: {holders}"
            )));
        }
    };
    caught_up += switched.caught_up;
    Ok(format!(
        "{products} products and {orders} orders from one snapshot in {build_secs:.1} s \
         ({:.0} orders/s); {caught_up} events applied meanwhile caught up; switched in {} ms \
         (readers blocked {} ms)",
        orders as f64 / build_secs.max(0.001),
        switched.total_ms,
        switched.readers_blocked_ms
    ))
}

/// Err(stopped) once `stop` has fired: checked between two transactions.
fn go_on(stop: &Shutdown) -> Result<()> {
    if stop.is_triggered() {
        return Err(Error::stopped("the rebuild"));
    }
    Ok(())
}

/// Catch-up passes until one finds little (at most `CATCH_UP_PASSES_MAX`), each in a
/// transaction of its own and looking at what the consumers recorded since the previous
/// pass began (less the margin), the first since `r0`. Returns the events applied and where
/// the switch's own pass starts.
fn catch_up_passes(
    shadow: &mut Client,
    write: &mut Client,
    stmts: &Statements,
    live: &str,
    r0: DateTime<Utc>,
    stop: &Shutdown,
) -> Result<(usize, DateTime<Utc>)> {
    let (mut caught_up, mut since) = (0, r0);
    for _ in 0..CATCH_UP_PASSES_MAX {
        go_on(stop)?;
        let mut tx = shadow.transaction()?;
        let (n, began) = catch_up(&mut tx, write, stmts, live, since)?;
        tx.commit()?;
        caught_up += n;
        since = began;
        if n < CATCH_UP_SMALL {
            break;
        }
    }
    Ok((caught_up, since))
}

/// Why `DATABASE_URL` cannot be the write model to rebuild from, if it cannot: its database
/// does not exist, or holds no `products` and `outbox` tables (say, the read database).
fn source_refusal(config: &Config) -> Result<Option<String>> {
    let name = config.write_db.get_dbname().unwrap_or("?");
    let mut write = config.write_db.clone();
    write.connect_timeout(config.db.connect);
    let mut write = match write.connect(NoTls) {
        Ok(client) => client,
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {
            return Ok(Some(format!(
                "the write database {name} (DATABASE_URL) does not exist"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let ours: bool = write
        .query_one(
            "SELECT to_regclass('products') IS NOT NULL AND to_regclass('outbox') IS NOT NULL",
            &[],
        )?
        .get(0);
    Ok((!ours).then(|| {
        format!("the database {name} (DATABASE_URL) holds no write model (no products and outbox tables)")
    }))
}

/// A write model with no product and no order beside a read model that has some is most
/// likely the wrong database, not a wish to empty the read model: refused.
fn empty_source_refusal(config: &Config, read: &mut Client, live: &str) -> Result<Option<String>> {
    let mut write = connect(&config.write_db)?;
    let empty: bool = write
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM products) AND NOT EXISTS (SELECT 1 FROM orders)",
            &[],
        )?
        .get(0);
    if !empty {
        return Ok(None);
    }
    let live = ident(live);
    let read_has_rows: bool = read
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {live}.product_sales_view)
                     OR EXISTS (SELECT 1 FROM {live}.customer_ltv_view)"
            ),
            &[],
        )?
        .get(0);
    let name = config.write_db.get_dbname().unwrap_or("?");
    Ok(read_has_rows.then(|| {
        format!(
            "the write database {name} (DATABASE_URL) has no product and no order, but the read \
             model has rows: check DATABASE_URL (to empty the read model, drop the read database)"
        )
    }))
}

fn connect(config: &postgres::Config) -> Result<Client> {
    let mut c = config.clone();
    c.application_name("cqrs-analytics-rebuild");
    Ok(c.connect(NoTls)?)
}

/// The schema the live read-model tables are in (where the migrations put them).
fn live_schema(read: &mut Client) -> Result<String> {
    let row = read.query_one(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass('product_sales_view')",
        &[],
    )?;
    Ok(row.get(0))
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Drops what an interrupted run left, creates empty shadow tables like the live ones
/// (columns, defaults, constraints, indexes) with the same grants, and sync_status's row.
fn prepare_shadow(read: &mut Client, live: &str) -> Result<()> {
    let live = ident(live);
    let mut sql = format!(
        "SET client_min_messages = warning;
         DROP SCHEMA IF EXISTS {SHADOW} CASCADE; DROP SCHEMA IF EXISTS {RETIRED} CASCADE;
         CREATE SCHEMA {SHADOW}; CREATE SCHEMA {RETIRED};"
    );
    for t in TABLES {
        sql.push_str(&format!(
            "CREATE TABLE {SHADOW}.{t} (LIKE {live}.{t} INCLUDING ALL EXCLUDING INDEXES);"
        ));
    }
    sql.push_str(&format!(
        "INSERT INTO {SHADOW}.sync_status (id) VALUES (1);"
    ));
    read.batch_execute(&sql)?;
    let names: Vec<String> = TABLES.iter().map(|t| format!("{live}.{t}")).collect();
    // The live tables' indexes and storage parameters, under their own names: `LIKE`
    // names copied indexes after their columns and drops the parameters, so after a
    // rebuild a migration that names an index (`DROP INDEX IF EXISTS ..`) would miss it,
    // and `processed_events` would lose its autovacuum settings (read migration 005).
    let copies = read.query(
        "SELECT CASE WHEN con.oid IS NOT NULL
                     THEN format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s', $2::text, c.relname,
                                 con.conname, pg_get_constraintdef(con.oid))
                     ELSE replace(pg_get_indexdef(i.indexrelid),
                                  format(' ON %I.%I ', n.nspname, c.relname),
                                  format(' ON %I.%I ', $2::text, c.relname))
                END
         FROM pg_index i
         JOIN pg_class c ON c.oid = i.indrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u', 'x')
         WHERE i.indrelid = ANY($1::text[]::regclass[])
         UNION ALL
         SELECT format('ALTER TABLE %I.%I SET (%s)', $2::text, c.relname, array_to_string(c.reloptions, ', '))
         FROM pg_class c
         WHERE c.oid = ANY($1::text[]::regclass[]) AND c.reloptions IS NOT NULL",
        &[&names, &SHADOW],
    )?;
    for copy in copies {
        read.batch_execute(copy.get::<_, &str>(0))?;
    }
    let grants = read.query(
        "SELECT format('GRANT %s ON %I.%I TO %s', a.privilege_type, $2::text, c.relname,
                CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END)
         FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
         WHERE c.oid = ANY($1::text[]::regclass[]) AND a.grantee <> c.relowner",
        &[&names, &SHADOW],
    )?;
    for g in grants {
        read.batch_execute(g.get::<_, &str>(0))?;
    }
    Ok(())
}

/// Folds every product and order of one write-DB snapshot into the shadow tables.
fn build(
    write: &mut Client,
    shadow: &mut Client,
    stmts: &Statements,
    progress: &mut Progress,
    stop: &Shutdown,
) -> Result<(i64, i64)> {
    let mut snap = write
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    let totals = snap.query_one(
        "SELECT (SELECT count(*) FROM products), count(*) FROM orders",
        &[],
    )?;
    let (products_total, orders_total): (i64, i64) = (totals.get(0), totals.get(1));
    let mut last = 0_i64;
    loop {
        go_on(stop)?;
        let rows = snap.query(PRODUCTS_AFTER, &[&last, &CHUNK])?;
        let Some(end) = rows.last() else { break };
        last = end.get(0);
        let events: Vec<Event> = rows.iter().map(product_event).collect();
        apply(shadow, stmts, &events, true)?;
    }
    let (mut last, mut done) = (0_i64, 0_i64);
    loop {
        go_on(stop)?;
        let rows = snap.query(ORDERS_AFTER, &[&last, &CHUNK])?;
        let Some(end) = rows.last() else { break };
        last = end.get(0);
        let events = order_events(&rows);
        apply(shadow, stmts, &events, true)?;
        done += events.len() as i64;
        progress.show(done, orders_total);
    }
    snap.commit()?;
    progress.finish(done, orders_total);
    Ok((products_total, done))
}

fn apply(shadow: &mut Client, stmts: &Statements, events: &[Event], backdate: bool) -> Result<()> {
    let mut tx = shadow.transaction()?;
    projection::apply_in(&mut tx, stmts, events, backdate)?;
    tx.commit()?;
    Ok(())
}

/// The id of an event that was never recorded on its row (rows written before write
/// migration 005 whose outbox row was gone): version-0 UUIDs, which no generator makes,
/// so it never matches a real event. `kind` 1 = product, 2 = order.
fn unrecorded_id(kind: u32, id: i64) -> Uuid {
    Uuid::from_fields(kind, 0, 0, &id.to_be_bytes())
}

fn product_event(r: &Row) -> Event {
    let id: i64 = r.get(0);
    Event::ProductCreated(ProductCreated {
        event_id: r
            .get::<_, Option<Uuid>>(4)
            .unwrap_or_else(|| unrecorded_id(1, id)),
        timestamp: r.get(3),
        product_id: id,
        name: r.get(1),
        category: r.get(2),
        price_cents: r.get(5),
        stock: i64::from(r.get::<_, i32>(6)),
    })
}

/// Groups item rows (ordered by order id) into OrderCreated events.
fn order_events(rows: &[Row]) -> Vec<Event> {
    let mut events: Vec<OrderCreated> = Vec::new();
    for r in rows {
        let id: i64 = r.get(0);
        if events.last().is_none_or(|o| o.order_id != id) {
            events.push(OrderCreated {
                event_id: r
                    .get::<_, Option<Uuid>>(4)
                    .unwrap_or_else(|| unrecorded_id(2, id)),
                timestamp: r.get(3),
                order_id: id,
                customer_id: r.get(1),
                items: Vec::new(),
                total_cents: r.get(2),
            });
        }
        let order = events.last_mut().expect("just pushed");
        order.items.push(OrderItem {
            product_id: r.get(5),
            quantity: i64::from(r.get::<_, i32>(6)),
            price_cents: r.get(7),
            product_name: r.get(8),
            category: r.get(9),
        });
    }
    events.into_iter().map(Event::OrderCreated).collect()
}

const PRODUCTS_AFTER: &str = "
SELECT id, name, category, created_at, event_id, (price * 100)::bigint, stock
FROM products WHERE id > $1 ORDER BY id LIMIT $2";

const ORDER_COLUMNS: &str =
    "o.id, o.customer_id, (o.total * 100)::bigint, o.created_at, o.event_id,
       i.product_id, i.quantity, (i.price * 100)::bigint, p.name, p.category";

const ORDERS_AFTER: &str = "
WITH o AS (SELECT * FROM orders WHERE id > $1 ORDER BY id LIMIT $2)
SELECT o.id, o.customer_id, (o.total * 100)::bigint, o.created_at, o.event_id,
       i.product_id, i.quantity, (i.price * 100)::bigint, p.name, p.category
FROM o JOIN order_items i ON i.order_id = o.id JOIN products p ON p.id = i.product_id
ORDER BY o.id";

/// Applies to the shadow tables (in `tx`) every event the live `processed_events` has
/// recorded since `since` (less `CLOCK_MARGIN_SECS`: a clock that steps back, and a
/// consumer's transaction that commits rows it recorded a while before) and the shadow one
/// lacks, read back from the write DB by event id. Each keeps the time the consumers
/// recorded for it, so sync-status's end-to-end latency stays theirs. Returns the events
/// applied and the read DB's clock when this pass began.
fn catch_up(
    tx: &mut Transaction,
    write: &mut Client,
    stmts: &Statements,
    live: &str,
    since: DateTime<Utc>,
) -> Result<(usize, DateTime<Utc>)> {
    let began: DateTime<Utc> = tx.query_one("SELECT clock_timestamp()", &[])?.get(0);
    let since = since - chrono::Duration::milliseconds((CLOCK_MARGIN_SECS * 1000.0) as i64);
    let rows = tx.query(
        &format!(
            "SELECT p.event_id, p.processed_at FROM {}.processed_events p
             WHERE p.processed_at >= $1
               AND NOT EXISTS (SELECT 1 FROM {SHADOW}.processed_events s WHERE s.event_id = p.event_id)",
            ident(live)
        ),
        &[&since],
    )?;
    let missing: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let applied_at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.get(1)).collect();
    let mut found = 0;
    for ids in missing.chunks(CHUNK as usize) {
        let mut events: Vec<Event> = write
            .query(PRODUCTS_BY_EVENT, &[&ids])?
            .iter()
            .map(product_event)
            .collect();
        events.extend(order_events(&write.query(
            &format!("SELECT {ORDER_COLUMNS} FROM orders o JOIN order_items i ON i.order_id = o.id
                      JOIN products p ON p.id = i.product_id WHERE o.event_id = ANY($1) ORDER BY o.id"),
            &[&ids],
        )?));
        found += events.len();
        projection::apply_in(tx, stmts, &events, false)?;
    }
    tx.execute(
        &format!(
            "UPDATE {SHADOW}.processed_events s SET processed_at = u.at
             FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, at) WHERE s.event_id = u.id"
        ),
        &[&missing, &applied_at],
    )?;
    if found < missing.len() {
        warn!(
            "{} events applied during the rebuild are not in the write model (not recorded \
             by event id); they were left out",
            missing.len() - found
        );
    }
    Ok((found, began))
}

const PRODUCTS_BY_EVENT: &str = "
SELECT id, name, category, created_at, event_id, (price * 100)::bigint, stock
FROM products WHERE event_id = ANY($1)";

/// What the switch did: the events of its catch-up pass, how long its transaction took and
/// how long of that readers were blocked (from the `ACCESS EXCLUSIVE` request to commit).
struct Switched {
    caught_up: usize,
    total_ms: u128,
    readers_blocked_ms: u128,
}

/// The switch, retried while a lock is not granted within `SWITCH_LOCK_TIMEOUT_MS`.
fn switch(
    read: &mut Client,
    write: &mut Client,
    stmts: &Statements,
    live: &str,
    since: DateTime<Utc>,
    stop: &Shutdown,
) -> Result<Switched> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        go_on(stop)?;
        match try_switch(read, write, stmts, live, since) {
            Ok(done) => return Ok(done),
            Err(e) if e.is_transient() && attempt < SWITCH_ATTEMPTS_MAX => {
                warn!("switch attempt {attempt} gave way to other sessions ({e}); retrying");
                stop.sleep(Duration::from_millis(100 * u64::from(attempt.min(10))));
            }
            Err(e) => return Err(e),
        }
    }
}

fn try_switch(
    read: &mut Client,
    write: &mut Client,
    stmts: &Statements,
    live: &str,
    since: DateTime<Utc>,
) -> Result<Switched> {
    let started = Instant::now();
    let live_q = ident(live);
    let tables: Vec<String> = TABLES.iter().map(|t| format!("{live_q}.{t}")).collect();
    let tables = tables.join(", ");
    let mut tx = read.transaction()?;
    // Every table at once, in ACCESS EXCLUSIVE mode, before the last catch-up: readers
    // wait for that pass too. Taking EXCLUSIVE first (consumers wait, readers do not) and
    // ACCESS EXCLUSIVE after the pass deadlocked with a consumer under steady load: its
    // statement, queued behind the EXCLUSIVE locks, already held ACCESS SHARE locks on
    // tables it reads, so every attempt timed out (test:
    // `operations::events_caught_up_by_a_rebuild_keep_when_they_were_applied`).
    let blocking = Instant::now();
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{SWITCH_LOCK_TIMEOUT_MS}ms';
         LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE"
    ))?;
    let (caught_up, _) = catch_up(&mut tx, write, stmts, live, since)?;
    let mut sql = String::new();
    for t in TABLES {
        sql.push_str(&format!(
            "ALTER TABLE {live_q}.{t} SET SCHEMA {RETIRED}; ALTER TABLE {SHADOW}.{t} SET SCHEMA {live_q};"
        ));
    }
    sql.push_str(crate::read::cache::NOTIFY);
    tx.batch_execute(&sql)?;
    tx.commit()?;
    Ok(Switched {
        caught_up,
        total_ms: started.elapsed().as_millis(),
        readers_blocked_ms: blocking.elapsed().as_millis(),
    })
}

/// The sessions holding locks on the live tables, for the message of a switch that gave
/// up: pid, application, state, and for how long their transaction has been open.
fn lock_holders(read: &mut Client, live: &str) -> String {
    let names: Vec<String> = TABLES
        .iter()
        .map(|t| format!("{}.{t}", ident(live)))
        .collect();
    let rows = read.query(
        "SELECT DISTINCT format('pid %s (%s, %s, transaction open %s s)', a.pid,
                CASE WHEN a.application_name = '' THEN '?' ELSE a.application_name END, a.state,
                round(extract(epoch FROM clock_timestamp() - a.xact_start)::numeric, 1))
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.granted AND l.relation = ANY($1::text[]::regclass[]) AND a.pid <> pg_backend_pid()",
        &[&names],
    );
    match rows {
        Ok(rows) if rows.is_empty() => "none now".into(),
        Ok(rows) => rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("unknown ({})", Error::from(e)),
    }
}

/// Drops the old tables; a failure only leaves them for the next run to drop.
fn drop_retired(read: &mut Client) {
    let sql = format!(
        "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {RETIRED} CASCADE; DROP SCHEMA IF EXISTS {SHADOW} CASCADE"
    );
    if let Err(e) = read.batch_execute(&sql) {
        // Through our Error, whose text has the SQLSTATE and message: postgres::Error's
        // own says only "db error".
        let e = Error::from(e);
        warn!("the old read-model tables stay in schema {RETIRED} until the next rebuild: {e}");
    }
}

/// Progress on stderr: rewritten in place on a terminal, a line every few seconds otherwise.
struct Progress<'a> {
    out: &'a mut dyn Write,
    tty: bool,
    started: Instant,
    shown: Instant,
}

impl<'a> Progress<'a> {
    fn new(out: &'a mut dyn Write) -> Progress<'a> {
        let now = Instant::now();
        Progress {
            out,
            tty: std::io::stderr().is_terminal(),
            started: now,
            shown: now,
        }
    }

    fn line(&self, done: i64, total: i64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let pct = if total > 0 { done * 100 / total } else { 100 };
        format!(
            "rebuild-read-model: orders {done}/{total} ({pct}%), {:.0} orders/s",
            done as f64 / secs
        )
    }

    fn show(&mut self, done: i64, total: i64) {
        let every = if self.tty { 200 } else { 2_000 };
        if self.shown.elapsed() < Duration::from_millis(every) {
            return;
        }
        self.shown = Instant::now();
        let line = self.line(done, total);
        let _ = if self.tty {
            write!(self.out, "\r{line}")
        } else {
            writeln!(self.out, "{line}")
        };
        let _ = self.out.flush();
    }

    fn finish(&mut self, done: i64, total: i64) {
        let line = self.line(done, total);
        let _ = if self.tty {
            writeln!(self.out, "\r{line}")
        } else {
            writeln!(self.out, "{line}")
        };
    }
}
