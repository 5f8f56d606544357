//! Assembles the services for a subcommand: pools, migrations, HTTP servers, publisher and
//! consumer threads, and stops them in order: HTTP first, so in-flight requests finish and
//! their events reach the outbox; then the publishers, which publish those events; then
//! the consumers and the other background threads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::broker::LinkStatus;
use crate::config::Config;
use crate::db::{self, Pool};
use crate::error::{Error, Result};
use crate::http::{HttpServer, Limits, Service};
use crate::ops::retention::{self, Job, RetentionMetrics, Table};
use crate::read::cache::{self, Cache};
use crate::read::consumer::{self, ConsumerHttp, ConsumerMetrics};
use crate::read::progress::Progress;
use crate::read::query::QueryService;
use crate::shutdown::{self, Shutdown, Trigger};
use crate::supervise::{Backoff, Supervised, Supervision};
use crate::write::command::CommandService;
use crate::write::outbox::{self, OutboxMetrics};

/// Which services a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Command,
    Consumer,
    Query,
    All,
}

impl Role {
    fn runs_command(self) -> bool {
        matches!(self, Role::Command | Role::All)
    }
    fn runs_consumer(self) -> bool {
        matches!(self, Role::Consumer | Role::All)
    }
    fn runs_query(self) -> bool {
        matches!(self, Role::Query | Role::All)
    }
}

/// The running services of one process.
pub struct Running {
    pub command_addr: Option<SocketAddr>,
    pub query_addr: Option<SocketAddr>,
    pub consumer_addr: Option<SocketAddr>,
    servers: Vec<HttpServer>,
    /// Stopped second: the publishers publish what the last requests committed.
    publishers: Stage,
    /// Stopped last: the consumers (after their current batch) and the other threads.
    background: Stage,
    /// Restarts and threads down of the supervised workers, for /health and /metrics.
    supervision: Arc<Supervision>,
    /// Every pool this process made: its database, size and name (`check_pool_sizes`).
    pools: Vec<(postgres::Config, u32, &'static str, Pool)>,
}

/// Threads that stop together when their trigger fires.
struct Stage {
    trigger: Option<Trigger>,
    shutdown: Shutdown,
    threads: Vec<JoinHandle<()>>,
}

impl Stage {
    fn new() -> Stage {
        let (trigger, shutdown) = shutdown::channel();
        Stage {
            trigger: Some(trigger),
            shutdown,
            threads: Vec::new(),
        }
    }

    fn stop(&mut self) {
        drop(self.trigger.take());
        for t in self.threads.drain(..) {
            shutdown::join_logged(t);
        }
    }
}

impl Running {
    /// A connection pool (`db::pool`), recorded for `check_pool_sizes`.
    fn pool(
        &mut self,
        target: &postgres::Config,
        size: u32,
        timeouts: &crate::config::DbTimeouts,
        name: &'static str,
        session: db::Session,
    ) -> Pool {
        let pool = db::pool(target, size, timeouts, name, session);
        self.pools.push((target.clone(), size, name, pool.clone()));
        pool
    }

    /// The supervision of this process's publishers and consumers.
    pub fn supervision(&self) -> &Arc<Supervision> {
        &self.supervision
    }

    /// Starts an HTTP server for `service` on `port` of the bind address; it is stopped
    /// first, in `stop`. `roles`: the supervised threads the service runs, whose restarts
    /// its /metrics shows.
    fn serve<S: Service>(
        &mut self,
        config: &Config,
        name: &'static str,
        port: u16,
        workers: usize,
        service: S,
        roles: &'static [&'static str],
    ) -> Result<SocketAddr> {
        let addr = SocketAddr::new(config.http_bind_addr, port);
        let limits = Limits::from_config(config, workers);
        let service = Supervised {
            inner: service,
            supervision: self.supervision.clone(),
            roles,
        };
        let server = HttpServer::start(name, addr, limits, Arc::new(service))?;
        let addr = server.addr;
        self.servers.push(server);
        Ok(addr)
    }

    /// Stops in the documented order: every listener closes; the requests in flight are
    /// answered; the publishers publish what those requests committed (at most
    /// `SHUTDOWN_DRAIN_TIMEOUT_MS`); the consumers finish their current batch (what they
    /// hold unacked is redelivered); every thread is joined.
    pub fn stop(mut self) {
        let started = Instant::now();
        for s in &mut self.servers {
            s.begin_stop();
        }
        for s in self.servers.drain(..) {
            s.stop();
        }
        info!("HTTP stopped after {} ms", started.elapsed().as_millis());
        self.publishers.stop();
        info!(
            "publishers stopped after {} ms",
            started.elapsed().as_millis()
        );
        self.background.stop();
        info!("stopped after {} ms", started.elapsed().as_millis());
    }
}

/// Applies the migrations of the databases `role` uses, waiting for each database to come
/// up for at most `wait`; says what it did, one report per database. A stop requested
/// through `stop` meanwhile ends the wait with [`Error::stopped`].
pub fn migrate(
    config: &Config,
    role: Role,
    wait: Duration,
    stop: Option<&Shutdown>,
) -> Result<Vec<db::MigrationReport>> {
    let retry = Retry { wait, stop };
    if role == Role::All {
        retry.run(|| db::ensure_database(&config.write_db, config.db.connect))?;
        retry.run(|| db::ensure_database(&config.read_db, config.db.connect))?;
    }
    let mut reports = Vec::new();
    if role.runs_command() {
        reports.push(
            retry.run(|| db::migrate(&config.write_db, db::WRITE_MIGRATIONS, config.db.connect))?,
        );
    }
    if role.runs_consumer() || role.runs_query() {
        reports.push(
            retry.run(|| db::migrate(&config.read_db, db::READ_MIGRATIONS, config.db.connect))?,
        );
    }
    Ok(reports)
}

/// How long to retry a database that is not up yet, and what ends the wait early.
struct Retry<'a> {
    wait: Duration,
    stop: Option<&'a Shutdown>,
}

impl Retry<'_> {
    /// Runs `f` until it succeeds, fails for good, `wait` has passed or a stop is
    /// requested, 500 ms apart.
    fn run<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let deadline = Instant::now() + self.wait;
        let mut backoff = Backoff::new(MIGRATE_RETRY_INTERVAL, MIGRATE_RETRY_INTERVAL);
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    warn!("{e}; retrying");
                    let pause = backoff.next_wait();
                    match self.stop {
                        Some(stop) if stop.sleep(pause) => {
                            return Err(Error::stopped("the database"))
                        }
                        Some(_) => {}
                        None => std::thread::sleep(pause),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

const MIGRATE_RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Starts the services of `role`. Ports come from `config` (0 picks a free port).
pub fn start(config: &Config, role: Role) -> Result<Running> {
    let mut running = Running {
        command_addr: None,
        query_addr: None,
        consumer_addr: None,
        servers: Vec::new(),
        publishers: Stage::new(),
        background: Stage::new(),
        supervision: Arc::default(),
        pools: Vec::new(),
    };
    if role.runs_command() {
        running.command_addr = Some(start_command(config, &mut running)?);
    }
    if role.runs_consumer() {
        running.consumer_addr = Some(start_consumer(config, &mut running)?);
    }
    if role.runs_query() {
        running.query_addr = Some(start_query(config, &mut running)?);
    }
    let pools = std::mem::take(&mut running.pools);
    // In the background: the database may still be coming up.
    let checked = std::thread::Builder::new()
        .name("pool-check".into())
        .spawn(move || check_pool_sizes(&pools));
    if let Err(e) = checked {
        warn!("could not start the pool size check: {e}");
    }
    Ok(running)
}

/// The write API and the outbox publishers it wakes after each commit.
fn start_command(config: &Config, running: &mut Running) -> Result<SocketAddr> {
    let pool = running.pool(
        &config.write_db,
        config.write_pool_size,
        &config.db,
        "command-service",
        db::Session::Plain,
    );
    let wake = outbox::Wake::new();
    let outbox_metrics = Arc::new(OutboxMetrics::new());
    let link = Arc::new(LinkStatus::new());
    // The publishers get their own small pool so HTTP load can never starve them.
    let publisher_pool = running.pool(
        &config.write_db,
        (config.outbox_publishers.max(1) * (outbox::BATCHES_IN_FLIGHT + 1)) as u32,
        &config.db,
        "outbox-publisher",
        db::Session::Publisher,
    );
    running.publishers.threads.extend(outbox::start(
        config,
        publisher_pool,
        wake.clone(),
        &running.publishers.shutdown,
        outbox_metrics.clone(),
        link.clone(),
        &running.supervision,
    ));
    let retention_metrics = Arc::new(RetentionMetrics::default());
    start_retention(
        config,
        running,
        &config.write_db,
        &[
            (Table::Outbox, config.retention.outbox),
            (Table::IdempotencyKeys, config.retention.idempotency_key_ttl),
        ],
        retention_metrics.clone(),
    );
    let wake = (config.outbox_publishers > 0).then_some(wake);
    let mut service = CommandService::new(pool, wake, Some(outbox_metrics))
        .with_retention(config.retention.idempotency_key_ttl, retention_metrics);
    if config.outbox_publishers > 0 {
        service = service.with_broker_link(link, config.broker_down_grace);
    } else {
        log::warn!(
            "OUTBOX_PUBLISHERS=0: this instance publishes nothing; orders and products stay \
             in the outbox until an instance with publishers runs"
        );
    }
    running.serve(
        config,
        "command-service",
        config.command_port,
        config.command_http_workers,
        service,
        &["publisher"],
    )
}

/// The consumer threads, and their HTTP face for /health and /metrics.
fn start_consumer(config: &Config, running: &mut Running) -> Result<SocketAddr> {
    // One connection per consumer thread, one for the progress reporter, one for /health.
    let pool = running.pool(
        &config.read_db,
        config.consumer_threads as u32 + 2,
        &config.db,
        "consumer-service",
        db::Session::Consumer,
    );
    let metrics = Arc::new(ConsumerMetrics::new());
    let progress = Progress::new(config.consumer_threads, config.consumer_stall);
    let link = Arc::new(LinkStatus::new());
    running.background.threads.extend(consumer::start(
        config,
        pool.clone(),
        &running.background.shutdown,
        metrics.clone(),
        progress.clone(),
        link.clone(),
        &running.supervision,
    ));
    let retention_metrics = Arc::new(RetentionMetrics::default());
    start_retention(
        config,
        running,
        &config.read_db,
        &[
            (Table::ProcessedEvents, config.retention.processed_events),
            (Table::EventFailures, config.retention.processed_events),
        ],
        retention_metrics.clone(),
    );
    let service = ConsumerHttp {
        retention: retention_metrics,
        ..ConsumerHttp::new(pool, metrics, progress, config, link)
    };
    let port = config.consumer_port;
    running.serve(config, "consumer-service", port, 2, service, &["consumer"])
}

/// The read API (its write pool only reads the outbox, for sync status).
fn start_query(config: &Config, running: &mut Running) -> Result<SocketAddr> {
    let read = running.pool(
        &config.read_db,
        config.read_pool_size,
        &config.db,
        "query-service",
        db::Session::ReadOnly,
    );
    let write = running.pool(
        &config.write_db,
        2,
        &config.db,
        "query-service-outbox",
        db::Session::ReadOnly,
    );
    let cache = Cache::new(config.query_cache_bytes);
    if config.query_cache_bytes > 0 {
        // One connection, held by the cache's listener (a pool, so it is counted).
        let listener = running.pool(
            &config.read_db,
            1,
            &config.db,
            "query-service-cache",
            db::Session::ReadOnly,
        );
        cache::start(cache.clone(), listener, &running.background.shutdown);
    }
    let service = QueryService::new(read, write, config.clone(), cache);
    running.serve(
        config,
        "query-service",
        config.query_port,
        config.query_http_workers,
        service,
        &[],
    )
}

/// Starts the pruner of the tables in `windows` whose window is set, on its own one-connection
/// pool (so request load never starves it, and it never takes more than one connection).
fn start_retention(
    config: &Config,
    running: &mut Running,
    db_config: &postgres::Config,
    windows: &[(Table, Option<Duration>)],
    metrics: Arc<RetentionMetrics>,
) {
    let jobs: Vec<Job> = windows
        .iter()
        .filter_map(|&(table, window)| window.map(|window| Job { table, window }))
        .collect();
    if jobs.is_empty() {
        return;
    }
    let pool = running.pool(db_config, 1, &config.db, "retention", db::Session::Plain);
    let shutdown = &running.background.shutdown;
    let pruner = retention::start(config, pool, jobs, shutdown, metrics);
    running.background.threads.extend(pruner);
}

/// Warns when the pools of this process together may open more connections to one
/// database server than it accepts from ordinary roles (`max_connections` less the
/// superuser reserve): under load, requests would then fail with "too many clients", far
/// from the cause. Other processes' connections are not known here; this catches one
/// process sized beyond the server on its own. Asked once; a server that cannot be asked
/// now is not asked again.
fn check_pool_sizes(pools: &[(postgres::Config, u32, &'static str, Pool)]) {
    let mut servers: Vec<(String, u32, Vec<String>, &Pool)> = Vec::new();
    for (target, size, name, pool) in pools {
        let server = db::endpoints(target);
        let entry = match servers.iter_mut().position(|s| s.0 == server) {
            Some(i) => &mut servers[i],
            None => {
                servers.push((server, 0, Vec::new(), pool));
                servers.last_mut().expect("just pushed")
            }
        };
        entry.1 += size;
        entry.2.push(format!("{name} {size}"));
    }
    for (server, total, parts, pool) in servers {
        let limit = pool.get().map_err(Error::from).and_then(|mut conn| {
            let row = conn.client.query_one(SERVER_LIMIT, &[])?;
            Ok((row.get::<_, i32>(0), row.get::<_, i32>(1)))
        });
        match limit {
            Ok((limit, max)) if i64::from(total) > i64::from(limit) => warn!(
                "the connection pools of this process may open {total} connections to the \
                 database server {server} ({}), more than the {limit} it accepts from \
                 ordinary roles (max_connections {max} less its reserve): under load \
                 requests will fail with \"too many clients\". Lower WRITE_POOL_SIZE, \
                 READ_POOL_SIZE or CONSUMER_THREADS, or raise max_connections",
                parts.join(", ")
            ),
            Ok((limit, _)) => info!(
                "the connection pools of this process may open {total} connections to the \
                 database server {server} ({}), of the {limit} it accepts from ordinary roles",
                parts.join(", ")
            ),
            Err(e) => debug!("pool size check of {server} skipped: {e}"),
        }
    }
}

/// Connections the server accepts from roles that are not superusers, and `max_connections`.
const SERVER_LIMIT: &str = "
SELECT current_setting('max_connections')::int
       - current_setting('superuser_reserved_connections')::int
       - coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0),
       current_setting('max_connections')::int";
