//! PostgreSQL access: r2d2 pools of connections that cache their prepared statements, the
//! session timeouts every connection carries, and the migrations embedded from `sql/`.
//!
//! We use our own small r2d2 manager instead of `r2d2_postgres` because a pooled
//! connection must carry its statement cache: a cached statement is one round trip per
//! query, an unnamed one is two, and every request runs one or two of them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write;
use std::time::Duration;

use log::{info, warn};
use postgres::{Client, NoTls, Statement};

use crate::config::DbTimeouts;
use crate::error::{classify_postgres, Error, PostgresFailure, Result};

/// A pooled connection: the client and the statements prepared on it so far.
pub struct Conn {
    pub client: Client,
    statements: HashMap<Cow<'static, str>, Statement>,
    /// The statements of `prepared`, by the address and length of their static SQL: found
    /// without hashing the text (a few hundred instructions per query otherwise).
    by_address: Vec<((usize, usize), Statement)>,
    /// Statements prepared with SQL `PREPARE`, by name, for `begin_execute`.
    named: Vec<&'static str>,
    /// The server process behind this connection, read when it was made: what `fence`
    /// needs once the connection is lost.
    backend: Option<Backend>,
}

/// A server process: its pid and its start (microseconds since the epoch), so that a pid
/// the server has since given to another session is not taken for it.
#[derive(Clone, Copy, Debug)]
pub struct Backend {
    pid: i32,
    started_us: i64,
}

/// Whether the server process of a lost connection is known to have ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// It has ended: whatever it was running has committed or never will.
    Ended,
    /// Not known: it could not be asked, or did not end in time.
    Unknown,
}

/// An array literal of SQL, `'{a,b,c}'`, for the arguments of `Conn::begin_execute` and
/// `Tx::execute_and_commit`. Only for values we vouch for: numbers, UUIDs, names of ours,
/// elements quoted by the caller; nothing that holds a quote, backslash, comma or brace.
pub fn array_literal<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut out = String::from("'{");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{item}");
    }
    out.push_str("}'");
    out
}

impl Conn {
    /// Wraps a connection made elsewhere (e.g. a long-lived session of an operator command).
    pub fn new(client: Client) -> Conn {
        Conn {
            client,
            statements: HashMap::new(),
            by_address: Vec::new(),
            named: Vec::new(),
            backend: None,
        }
    }

    /// The server process behind this connection, if it was read when the connection was
    /// made.
    pub fn backend(&self) -> Option<Backend> {
        self.backend
    }

    /// Returns the prepared statement for `sql`, preparing it on first use on this connection.
    pub fn prepared(&mut self, sql: &'static str) -> Result<Statement> {
        Ok(self.prepared_or_lost(sql)?)
    }

    /// `prepared`, with the database's error as it came (`connection_lost` tells it apart).
    pub fn prepared_or_lost(
        &mut self,
        sql: &'static str,
    ) -> std::result::Result<Statement, postgres::Error> {
        let key = (sql.as_ptr() as usize, sql.len());
        if let Some((_, s)) = self.by_address.iter().find(|(k, _)| *k == key) {
            return Ok(s.clone());
        }
        let s = self.prepared_cow(Cow::Borrowed(sql))?;
        self.by_address.push((key, s.clone()));
        Ok(s)
    }

    /// Begins a transaction and executes `sql` in it with the arguments `args`, in one round
    /// trip: `BEGIN; EXECUTE name args` as one simple query, `sql` prepared under `name` with
    /// SQL `PREPARE` at its first use on this connection (so it is planned once, not at every
    /// call). `args` is SQL the caller builds from values it vouches for: "" for none, else a
    /// parenthesised list of literals. Returns the rows, as text. After an error the
    /// connection may be in a failed transaction: the caller rolls back.
    pub fn begin_execute(
        &mut self,
        name: &'static str,
        sql: &str,
        args: &str,
    ) -> std::result::Result<Vec<postgres::SimpleQueryRow>, postgres::Error> {
        self.prepare_named(name, sql)?;
        let messages = self
            .client
            .simple_query(&format!("BEGIN; EXECUTE {name}{args}"))?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .collect())
    }

    /// Prepares `sql` under `name` with SQL `PREPARE`, unless this connection has already.
    fn prepare_named(
        &mut self,
        name: &'static str,
        sql: &str,
    ) -> std::result::Result<(), postgres::Error> {
        if !self.named.contains(&name) {
            self.client
                .batch_execute(&format!("PREPARE {name} AS {sql}"))?;
            self.named.push(name);
        }
        Ok(())
    }

    /// Like `prepared`, for SQL built at run time (e.g. with a literal the planner must see).
    pub fn prepared_owned(&mut self, sql: &str) -> Result<Statement> {
        match self.statements.get(sql) {
            Some(s) => Ok(s.clone()),
            None => Ok(self.prepared_cow(Cow::Owned(sql.to_string()))?),
        }
    }

    fn prepared_cow(
        &mut self,
        sql: Cow<'static, str>,
    ) -> std::result::Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql.as_ref()) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&sql)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

/// What a pool's sessions set beyond the timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// PostgreSQL's defaults.
    Plain,
    /// Every transaction read only (the query service).
    ReadOnly,
    /// The consumer's. Prepared statements keep one generic plan: its statements take a
    /// batch as arrays, and a plan for arrays of known length always looks cheaper than one
    /// for arrays of unknown length, so by default every batch planned its statements anew.
    /// Its statements are inserts and upserts by key, the same plan whatever the sizes.
    /// And commits return before the WAL is flushed, so a batch is visible to readers at
    /// once; `projection::apply_batch` then waits for the flush (`FLUSH_BARRIER`) before it
    /// returns, so nothing is acked that a crash of the database could lose.
    Consumer,
    /// The outbox publisher's. Commits return before the WAL is flushed: a "published"
    /// mark lost in a crash republishes the row, and the consumer drops the duplicate by
    /// its event id. And the claim walks the partial index of unpublished rows in id order
    /// (no bitmap or sequential scan): an index scan marks the entries of rows published
    /// since the last vacuum as dead as it passes them, so the next claim skips them,
    /// where a bitmap scan visited every one of them again. Measured after 15 s of orders
    /// with autovacuum off: a bitmap claim read 1,533 pages (6 ms) each time, the index
    /// scan 12,724 once (8 ms), then 37 (0.4 ms). Its prepared statements keep one generic
    /// plan: by default the mark (`id = ANY($1)`) was planned anew at most executions.
    Publisher,
}

impl Session {
    fn options(self) -> &'static str {
        match self {
            Session::Plain => "",
            Session::ReadOnly => " -c default_transaction_read_only=on",
            Session::Consumer => " -c plan_cache_mode=force_generic_plan -c synchronous_commit=off",
            Session::Publisher => {
                " -c synchronous_commit=off -c enable_bitmapscan=off -c enable_seqscan=off -c plan_cache_mode=force_generic_plan"
            }
        }
    }
}

/// The r2d2 manager: connects with the session timeouts applied.
pub struct Manager {
    config: postgres::Config,
}

impl Manager {
    pub fn new(
        target: &postgres::Config,
        timeouts: &DbTimeouts,
        application_name: &str,
        session: Session,
    ) -> Manager {
        let mut config = target.clone();
        // The server finds a vanished client the same way, and in the same time, as the
        // client finds a vanished server (below): with its defaults (two hours of silence
        // before the first probe) the process of a client cut off by a partition stayed,
        // holding a connection slot, for hours.
        let mut options = format!(
            "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={} \
             -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=4 \
             -c tcp_user_timeout=30000",
            timeouts.statement.as_millis(),
            timeouts.lock.as_millis(),
            timeouts.idle_in_transaction.as_millis()
        );
        options.push_str(session.options());
        config
            .options(&options)
            .application_name(application_name)
            .connect_timeout(timeouts.connect)
            // A peer that vanished (a partition, a host that died without closing) is found
            // by the kernel: probes after 10 s of silence, 5 s apart, and no connection
            // survives 30 s with its data or probes unacknowledged. With the system's probe
            // defaults that took about 11 minutes, during which a consumer or a health check
            // waited on a read that never ended. (A proxy in between that keeps the TCP
            // connection alive and forwards nothing is not found this way.)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(4)
            .tcp_user_timeout(Duration::from_secs(30));
        Manager { config }
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> std::result::Result<Conn, postgres::Error> {
        let mut conn = Conn::new(self.config.connect(NoTls)?);
        conn.backend = read_backend(&mut conn.client)?;
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut Conn) -> std::result::Result<(), postgres::Error> {
        conn.client.simple_query("").map(|_| ())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.client.is_closed()
    }
}

pub type Pool = r2d2::Pool<Manager>;

/// A pooled connection.
pub type Pooled = r2d2::PooledConnection<Manager>;

/// A transaction that owns its pooled connection and rolls back on drop unless committed.
pub struct Tx {
    conn: Option<Pooled>,
}

/// Runs `f` in a transaction whose lock waits give up after 100 ms: for `/metrics`, which
/// must not wait on a lock a rebuild's switch or a `LOCK TABLE` holds (a scrape took the
/// session's lock timeout, seconds, then left the figures out).
pub fn with_short_lock_wait<T>(pool: &Pool, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
    let mut tx = Tx::begin(pool, pool.get()?)?;
    tx.conn()
        .client
        .batch_execute("SET LOCAL lock_timeout = '100ms'")?;
    let value = f(tx.conn())?;
    tx.commit()?;
    Ok(value)
}

impl Tx {
    /// Begins a transaction on `conn`. A pooled connection may have died while it sat in the
    /// pool (the server was restarted, or `pg_terminate_backend`); that shows on `BEGIN`,
    /// before anything could commit, so the transaction begins once more on a fresh
    /// connection instead of failing the request.
    pub fn begin(pool: &Pool, conn: Pooled) -> Result<Tx> {
        let (conn, begun) = on_live_connection(pool, conn, |c| c.client.batch_execute("BEGIN"))?;
        begun?;
        Ok(Tx { conn: Some(conn) })
    }

    /// Begins a transaction and runs the statement `sql` (no parameters) in it, in one round
    /// trip: `BEGIN; EXECUTE name` as one simple query, the statement prepared under `name`
    /// with SQL `PREPARE` at its first use on the connection (so it is planned once, not at
    /// every call). Returns its rows, as text. Like `begin`, starts over once on a fresh
    /// connection if the pooled one turns out dead.
    pub fn begin_with(
        pool: &Pool,
        conn: Pooled,
        name: &'static str,
        sql: &str,
    ) -> Result<(Tx, Vec<postgres::SimpleQueryRow>)> {
        let (conn, rows) =
            on_live_connection(pool, conn, |conn| conn.begin_execute(name, sql, ""))?;
        // From here on the connection may be in a transaction: dropping the Tx rolls back.
        let tx = Tx { conn: Some(conn) };
        Ok((tx, rows?))
    }

    pub fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a Tx holds its connection until it ends")
    }

    pub fn commit(mut self) -> Result<()> {
        let mut conn = self
            .conn
            .take()
            .expect("a Tx holds its connection until it ends");
        conn.client.batch_execute("COMMIT")?;
        Ok(())
    }

    /// Executes `sql` with the arguments `args` and commits, in one round trip: `EXECUTE
    /// name args; COMMIT` as one simple query (`sql` prepared under `name` as by
    /// `Conn::begin_execute`, whose rules `args` follows). An error stops the statements
    /// after it: a failed statement commits nothing, and the transaction rolls back on drop.
    pub fn execute_and_commit(mut self, name: &'static str, sql: &str, args: &str) -> Result<()> {
        let conn = self.conn();
        conn.prepare_named(name, sql)?;
        conn.client
            .batch_execute(&format!("EXECUTE {name}{args}; COMMIT"))?;
        self.conn = None;
        Ok(())
    }

    /// Rolls back and hands the connection back for more work.
    pub fn rollback(mut self) -> Result<Pooled> {
        let mut conn = self
            .conn
            .take()
            .expect("a Tx holds its connection until it ends");
        conn.client.batch_execute("ROLLBACK")?;
        Ok(conn)
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            let _ = conn.client.batch_execute("ROLLBACK");
        }
    }
}

/// Runs `first` (the first statements of a transaction, or a statement that changes nothing)
/// on `conn`; if the connection turns out dead (it died while it sat in the pool), runs it
/// again on another one. Every idle connection may have died at once (the server restarted,
/// or ended them all), and the pool hands them out until each has been found dead, so this
/// tries up to the pool's size of them, then one more. Returns the connection it ran on and
/// what the run gave.
pub fn on_live_connection<T>(
    pool: &Pool,
    mut conn: Pooled,
    first: impl Fn(&mut Conn) -> std::result::Result<T, postgres::Error>,
) -> Result<(Pooled, std::result::Result<T, postgres::Error>)> {
    for _ in 0..pool.max_size() {
        match first(&mut conn) {
            Err(e) if connection_lost(&e) => {
                drop(conn); // `has_broken` sees it closed: the pool discards it
                conn = pool.get()?;
            }
            other => return Ok((conn, other)),
        }
    }
    let last = first(&mut conn);
    Ok((conn, last))
}

/// True when `e` means the connection itself is gone (closed socket, or the server ended
/// the session), as opposed to an error in a statement.
pub fn connection_lost(e: &postgres::Error) -> bool {
    classify_postgres(e) == PostgresFailure::ConnectionLost
}

/// A server process's start in `pg_stat_activity`, as `Backend::started_us`.
const BACKEND_STARTED_US: &str = "(extract(epoch FROM backend_start) * 1000000)::int8";

/// This session's server process (one round trip, when a connection is made).
fn read_backend(client: &mut Client) -> std::result::Result<Option<Backend>, postgres::Error> {
    let messages = client.simple_query(&format!(
        "SELECT pid, {BACKEND_STARTED_US} FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    ))?;
    Ok(messages.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(row) => Some(Backend {
            pid: row.get(0)?.parse().ok()?,
            started_us: row.get(1)?.parse().ok()?,
        }),
        _ => None,
    }))
}

/// How long `fence` waits for the server process of a lost connection to end.
const FENCE_WAIT_MS: i64 = 2000;

/// Ends the server process of a lost connection and waits until it has ended, asking on
/// another connection of `pool`, which it returns. A statement sent on the lost connection
/// may still be running there (waiting for a lock, say) and commit later; once its process
/// has ended, it has committed or never will. The process is known by its pid and its start, so a pid
/// the server has given to a newer session is left alone, and one that is no longer there
/// has ended. `Unknown` when the server could not be asked (the application role may end
/// its own sessions; PostgreSQL before 14 has no wait) or the process did not end within
/// `FENCE_WAIT_MS`.
pub fn fence(pool: &Pool, backend: Option<Backend>) -> Result<(Pooled, Fenced)> {
    let Some(b) = backend else {
        return Ok((pool.get()?, Fenced::Unknown));
    };
    let sql = format!(
        "SELECT pg_terminate_backend(pid, {FENCE_WAIT_MS}) FROM pg_stat_activity \
         WHERE pid = {} AND {BACKEND_STARTED_US} = {}",
        b.pid, b.started_us
    );
    let (conn, answered) = on_live_connection(pool, pool.get()?, |c| c.client.simple_query(&sql))?;
    let fenced = match answered {
        // No row: that process is gone. A row: `pg_terminate_backend` says whether it ended.
        Ok(messages)
            if messages.iter().all(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => row.get(0) == Some("t"),
                _ => true,
            }) =>
        {
            Fenced::Ended
        }
        Ok(_) => Fenced::Unknown,
        Err(e) => {
            warn!(
                "could not end the server process {} of a lost connection: {e}",
                b.pid
            );
            Fenced::Unknown
        }
    };
    Ok((conn, fenced))
}

/// Builds a pool without connecting: connections are made on demand, so a service starts
/// (and answers /health with 503) while its database is still coming up.
pub fn pool(
    target: &postgres::Config,
    size: u32,
    timeouts: &DbTimeouts,
    application_name: &str,
    session: Session,
) -> Pool {
    let manager = Manager::new(target, timeouts, application_name, session);
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(timeouts.pool_checkout)
        // A checkout test costs a round trip per request; a broken connection is detected by
        // `has_broken` and the failed request answers 503 instead.
        .test_on_check_out(false)
        .idle_timeout(Some(Duration::from_secs(300)))
        .error_handler(Box::new(r2d2::NopErrorHandler))
        .build_unchecked(manager)
}

/// Answers whether the pool's database responds, for /health.
///
/// Gives up after the pool's checkout timeout plus a second, on a thread of its own: a
/// connection whose peer takes the bytes and never answers (a proxy in front of a server
/// that is gone) would otherwise hold the health check, and the HTTP worker running it,
/// until TCP gives up, which it never does while the proxy acknowledges. The thread waits
/// on with its connection; at most the pool's connections can be held so.
pub fn ping(pool: &Pool) -> Result<()> {
    let deadline = pool.connection_timeout() + Duration::from_secs(1);
    let (answer, answered) = crossbeam_channel::bounded(1);
    let pool = pool.clone();
    std::thread::Builder::new()
        .name("db-ping".into())
        .spawn(move || {
            let pinged = pool.get().map_err(Error::from).and_then(|mut conn| {
                conn.client.simple_query("SELECT 1")?;
                Ok(())
            });
            let _ = answer.send(pinged);
        })?;
    answered.recv_timeout(deadline).unwrap_or_else(|_| {
        Err(Error::unavailable(format!(
            "no answer within {} ms",
            deadline.as_millis()
        )))
    })
}

/// One migration: a version, a name and the SQL it runs.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const WRITE_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "write_schema",
        sql: include_str!("../sql/write/001_schema.sql"),
    },
    Migration {
        version: 2,
        name: "retention",
        sql: include_str!("../sql/write/002_retention.sql"),
    },
    Migration {
        version: 3,
        name: "place_order",
        sql: include_str!("../sql/write/003_place_order.sql"),
    },
    Migration {
        version: 5,
        name: "event_ids",
        sql: include_str!("../sql/write/005_event_ids.sql"),
    },
    Migration {
        version: 6,
        name: "place_order_generic_plans",
        sql: include_str!("../sql/write/006_place_order_generic_plans.sql"),
    },
    Migration {
        version: 7,
        name: "checks_off_the_order_path",
        sql: include_str!("../sql/write/007_checks_off_the_order_path.sql"),
    },
    Migration {
        version: 8,
        name: "place_order_in_two_statements",
        sql: include_str!("../sql/write/008_place_order_in_two_statements.sql"),
    },
    Migration {
        version: 9,
        name: "prune_outbox",
        sql: include_str!("../sql/write/009_prune_outbox.sql"),
    },
];

pub const READ_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "read_schema",
        sql: include_str!("../sql/read/001_schema.sql"),
    },
    Migration {
        version: 2,
        name: "event_failures",
        sql: include_str!("../sql/read/002_event_failures.sql"),
    },
    Migration {
        version: 3,
        name: "consumer_progress",
        sql: include_str!("../sql/read/003_consumer_progress.sql"),
    },
    Migration {
        version: 5,
        name: "retention",
        sql: include_str!("../sql/read/005_retention.sql"),
    },
    Migration {
        version: 6,
        name: "sharded_counters",
        sql: include_str!("../sql/read/006_sharded_counters.sql"),
    },
    Migration {
        version: 8,
        name: "list_indexes",
        sql: include_str!("../sql/read/008_list_indexes.sql"),
    },
    Migration {
        version: 9,
        name: "pending_deltas",
        sql: include_str!("../sql/read/009_pending_deltas.sql"),
    },
    Migration {
        version: 10,
        name: "flush_barrier",
        sql: include_str!("../sql/read/010_flush_barrier.sql"),
    },
    Migration {
        version: 11,
        name: "batch_at_once",
        sql: include_str!("../sql/read/011_batch_at_once.sql"),
    },
    Migration {
        version: 12,
        name: "consumer_counts",
        sql: include_str!("../sql/read/012_consumer_counts.sql"),
    },
    Migration {
        version: 13,
        name: "prune_processed_events",
        sql: include_str!("../sql/read/013_prune_processed_events.sql"),
    },
];

/// An arbitrary constant that serialises concurrent migrators of one database.
const MIGRATION_LOCK_KEY: i64 = 0x6371_7273_6d69_6772;

/// What `migrate` did to one database: the `migrate` subcommand prints one per database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The database's name and server, e.g. `write_db at db:5432`.
    pub database: String,
    /// Versions this run applied, in order (empty when the schema was up to date).
    pub applied: Vec<i32>,
    /// The highest version recorded in the database afterwards.
    pub version: i32,
    /// The highest version this binary knows.
    pub known: i32,
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.version > self.known {
            return write!(
                f,
                "{}: schema version {} is newer than this binary's ({}): nothing applied; \
                 running with it (a newer binary migrated it, e.g. in a rolling upgrade)",
                self.database, self.version, self.known
            );
        }
        if self.applied.is_empty() {
            return write!(
                f,
                "{}: up to date (schema version {})",
                self.database, self.version
            );
        }
        let applied: Vec<String> = self.applied.iter().map(i32::to_string).collect();
        write!(
            f,
            "{}: applied {} (schema version {})",
            self.database,
            applied.join(", "),
            self.version
        )
    }
}

/// Applies the migrations not yet applied, each in its own transaction, under an advisory
/// lock so that several instances starting at once apply each migration exactly once.
pub fn migrate(
    target: &postgres::Config,
    migrations: &[Migration],
    connect_timeout: Duration,
) -> Result<MigrationReport> {
    let mut config = target.clone();
    config
        .connect_timeout(connect_timeout)
        .application_name("cqrs-analytics-migrate");
    let database = describe(&config);
    let mut client = config.connect(NoTls)?;
    client.batch_execute("SET client_min_messages = warning")?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])?;
    let result = apply_pending(&mut client, migrations);
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]);
    let applied = result.map_err(|e| match e.is_config() {
        true => Error::config(format!("{database}: {}", e.message())),
        false => e,
    })?;
    if !applied.is_empty() {
        // A migration may change what the read model answers (`read::cache`).
        client.batch_execute(crate::read::cache::NOTIFY)?;
    }
    let version: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])?
        .get(0);
    let report = MigrationReport {
        database,
        applied,
        version: version.unwrap_or(0),
        known: migrations.last().map_or(0, |m| m.version),
    };
    if report.version > report.known {
        warn!("{report}");
    }
    Ok(report)
}

/// `host:port`, comma-separated for a multi-host URL (`localhost:5432` when it names none),
/// for reports and logs; never credentials.
pub fn endpoints(config: &postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            }
        })
        .collect();
    if hosts.is_empty() {
        "localhost:5432".to_string()
    } else {
        hosts.join(",")
    }
}

/// `dbname at host:port` (every host of a multi-host URL), for reports; never credentials.
fn describe(config: &postgres::Config) -> String {
    let hosts = endpoints(config);
    format!(
        "{} at {hosts}",
        config.get_dbname().unwrap_or("(default database)")
    )
}

fn apply_pending(client: &mut Client, migrations: &[Migration]) -> Result<Vec<i32>> {
    let mut applied = Vec::new();
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )?;
    // The first migration names the model (write_schema, read_schema): a database whose
    // ledger starts with the other one is the other model's. `check_together` refuses two
    // URLs naming one database only when they spell it alike; under two names of one
    // server (a host alias), read migrations were applied to the write database.
    if let Some(first) = migrations.first() {
        let recorded: Option<String> = client
            .query_opt(
                "SELECT name FROM schema_migrations WHERE version = $1",
                &[&first.version],
            )?
            .map(|r| r.get(0));
        if let Some(other) = recorded.filter(|name| name != first.name) {
            return Err(Error::config(format!(
                "this database holds the other model ({other}, not {}): do DATABASE_URL and \
                 READ_DATABASE_URL name one database under two host names?",
                first.name
            )));
        }
    }
    for m in migrations {
        let done = client
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&m.version],
            )?
            .is_some();
        if done {
            continue;
        }
        let mut tx = client.transaction()?;
        tx.batch_execute(m.sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )?;
        tx.commit()?;
        info!("applied migration {} {}", m.version, m.name);
        applied.push(m.version);
    }
    Ok(applied)
}

/// Creates the database named in `target` when it does not exist, connecting to the server's
/// `postgres` database with the same credentials. Used by `all` so a fresh machine works.
/// A database that exists is not looked up there: an owner who may not connect to the
/// maintenance database (as the compose roles may not) can still run `migrate`.
pub fn ensure_database(target: &postgres::Config, connect_timeout: Duration) -> Result<()> {
    let mut target = target.clone();
    target.connect_timeout(connect_timeout);
    let name = target
        .get_dbname()
        .ok_or_else(|| Error::config("the database URL names no database"))?
        .to_string();
    match target.connect(NoTls) {
        Ok(_) => return Ok(()),
        Err(e) if e.code() == Some(&postgres::error::SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(e.into()),
    }
    let mut admin = target.clone();
    admin.dbname("postgres").connect_timeout(connect_timeout);
    let mut client = admin.connect(NoTls)?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match client.batch_execute(&format!("CREATE DATABASE {quoted}")) {
            Ok(()) => info!("created database {name}"),
            // Another instance created it between our check and our CREATE: "already
            // exists", or, when the two CREATEs race, a unique violation in pg_database.
            Err(e)
                if e.code() == Some(&postgres::error::SqlState::DUPLICATE_DATABASE)
                    || e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
