//! Configuration from environment variables only. `Config::from_lookup` takes any lookup
//! function so tests can pass a closure instead of mutating the process environment.
//! Every variable has a default for a local machine; a malformed value is an error that
//! names the variable, and the binary turns it into one line on stderr and exit code 2.
//! URLs are parsed here, once, into the typed targets the connecting code uses.
//!
//! This module depends on nothing of ours but `error`. To add a variable: one entry in
//! `VARIABLES` (name, default, range), one field in `Config`, one line in `from_lookup`,
//! one line in `.env.example` and README's table.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::{Error, Result};

/// One environment variable: its name, its default, and for numbers the inclusive range.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub min: u64,
    pub max: u64,
}

/// A variable whose value is text (a URL, a name, an address): no range.
const fn text(name: &'static str, default: &'static str) -> Variable {
    Variable {
        name,
        default,
        min: 0,
        max: 0,
    }
}

/// A numeric variable (a count, a port, a duration in its unit) within `min..=max`.
const fn int(name: &'static str, default: &'static str, min: u64, max: u64) -> Variable {
    Variable {
        name,
        default,
        min,
        max,
    }
}

/// Every variable the binary reads, with its default and range. `.env.example` must list
/// each one (a test checks it), so this table is the single source of truth.
#[rustfmt::skip]
pub const VARIABLES: &[Variable] = &[
    text("DATABASE_URL", "postgresql://postgres@localhost:5432/write_db"),
    text("READ_DATABASE_URL", "postgresql://postgres@localhost:5432/read_db"),
    text("BROKER_URL", "amqp://guest:guest@localhost:5672/%2f"),
    text("HTTP_BIND_ADDR", "0.0.0.0"),
    int("COMMAND_SERVICE_PORT", "8080", 0, 65_535),
    int("QUERY_SERVICE_PORT", "8081", 0, 65_535),
    int("CONSUMER_SERVICE_PORT", "8082", 0, 65_535),
    text("MIGRATE_ON_START", "true"),
    int("COMMAND_HTTP_WORKERS", "16", 1, 1024),
    int("QUERY_HTTP_WORKERS", "8", 1, 1024),
    int("HTTP_READ_TIMEOUT_MS", "5000", 10, 600_000),
    int("HTTP_MAX_CONNECTIONS", "1024", 1, 65_536),
    int("HTTP_HEAD_TIMEOUT_MS", "5000", 10, 600_000),
    int("HTTP_KEEPALIVE_TIMEOUT_MS", "5000", 10, 3_600_000),
    int("WRITE_POOL_SIZE", "16", 1, 1024),
    int("READ_POOL_SIZE", "8", 1, 1024),
    int("QUERY_CACHE_BYTES", "4194304", 0, 1_073_741_824),
    int("DB_POOL_TIMEOUT_MS", "2000", 1, 600_000),
    int("DB_CONNECT_TIMEOUT_MS", "3000", 1, 600_000),
    int("DB_STATEMENT_TIMEOUT_MS", "5000", 100, 3_600_000),
    int("DB_LOCK_TIMEOUT_MS", "2000", 1, 3_600_000),
    int("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", "15000", 1, 3_600_000),
    int("DB_RETRY_MAX_MS", "5000", 10, 600_000),
    int("OUTBOX_PUBLISHERS", "1", 0, 64),
    int("OUTBOX_BATCH_SIZE", "500", 1, 10_000),
    int("OUTBOX_POLL_INTERVAL_MS", "500", 1, 600_000),
    int("PUBLISH_CONFIRM_TIMEOUT_MS", "5000", 1, 600_000),
    int("CONSUMER_THREADS", "1", 1, 64),
    int("CONSUMER_PREFETCH", "2000", 1, 65_535),
    int("CONSUMER_BATCH_SIZE", "1000", 1, 10_000),
    int("CONSUMER_BATCH_WAIT_MS", "0", 0, 10_000),
    int("CONSUMER_MAX_ATTEMPTS", "5", 1, 1000),
    int("CONSUMER_STALL_SECS", "30", 1, 86_400),
    int("BROKER_HEARTBEAT_SECS", "10", 0, 3600),
    int("BROKER_CONNECT_TIMEOUT_MS", "3000", 1, 600_000),
    int("BROKER_RECONNECT_MAX_MS", "5000", 10, 600_000),
    int("BROKER_STALL_TIMEOUT_MS", "1000", 10, 600_000),
    int("SHUTDOWN_DRAIN_TIMEOUT_MS", "5000", 0, 600_000),
    int("STOP_GRACE_PERIOD_SECS", "30", 0, 86_400),
    int("BROKER_DOWN_GRACE_SECS", "10", 0, 3600),
    text("BROKER_EXCHANGE", "analytics.events"),
    text("BROKER_PRODUCT_QUEUE", "analytics.product-events"),
    text("BROKER_ORDER_QUEUE", "analytics.order-events"),
    text("BROKER_DEAD_LETTER_EXCHANGE", "analytics.dead-letter"),
    text("BROKER_DEAD_LETTER_QUEUE", "analytics.dead-letter"),
    text("BROKER_QUEUE_TYPE", "classic"),
    int("OUTBOX_RETENTION_SECS", "3600", 0, RETENTION_MAX_SECS),
    int("PROCESSED_EVENTS_RETENTION_SECS", "604800", 0, RETENTION_MAX_SECS),
    int("IDEMPOTENCY_KEY_TTL_SECS", "86400", 0, RETENTION_MAX_SECS),
    int("RETENTION_INTERVAL_MS", "10000", 10, 3_600_000),
    int("RETENTION_BATCH_SIZE", "5000", 1, 10_000),
];

/// Ten years: the longest retention accepted.
const RETENTION_MAX_SECS: u64 = 315_360_000;

/// The shortest deduplication window accepted from the environment: a duplicate delivered
/// after the window is applied again, and a message may sit in the broker (or be redelivered
/// after an outage) for a long time. Tests that need windows of seconds set
/// `Config::retention` directly.
pub const DEDUP_WINDOW_MIN_SECS: u64 = 3600;

/// Whether the broker's queues are classic (one node) or quorum (replicated, for clusters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

/// Names of everything the system declares on the broker.
#[derive(Debug, Clone)]
pub struct BrokerNames {
    pub exchange: String,
    pub product_queue: String,
    pub order_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub queue_type: QueueType,
}

/// Database session settings shared by every pool.
#[derive(Debug, Clone)]
pub struct DbTimeouts {
    pub pool_checkout: Duration,
    pub connect: Duration,
    pub statement: Duration,
    pub lock: Duration,
    pub idle_in_transaction: Duration,
    /// The longest wait between two attempts at work the database refused for a transient
    /// reason (it is down, a deadlock, a lock timeout).
    pub retry_max: Duration,
}

/// One broker endpoint, from an `amqp://user:pass@host:port/vhost?heartbeat=N` URL. The
/// query parameters, when present, override `BROKER_HEARTBEAT_SECS` and
/// `BROKER_CONNECT_TIMEOUT_MS` for this endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpTarget {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub vhost: String,
    pub heartbeat_secs: Option<u16>,
    pub connection_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub write_db: postgres::Config,
    pub read_db: postgres::Config,
    /// `BROKER_URL`'s endpoints (one, or the nodes of a cluster), at most
    /// `BROKER_ENDPOINTS_MAX`, never empty.
    pub broker_targets: Vec<AmqpTarget>,
    pub http_bind_addr: IpAddr,
    pub command_port: u16,
    pub query_port: u16,
    pub consumer_port: u16,
    pub migrate_on_start: bool,
    pub command_http_workers: usize,
    pub query_http_workers: usize,
    pub http_read_timeout: Duration,
    pub http_max_connections: usize,
    pub http_head_timeout: Duration,
    pub http_keepalive_timeout: Duration,
    pub write_pool_size: u32,
    pub read_pool_size: u32,
    /// The query service's response cache (`read::cache`); 0: off.
    pub query_cache_bytes: usize,
    pub db: DbTimeouts,
    pub outbox_publishers: usize,
    pub outbox_batch_size_max: usize,
    pub outbox_poll_interval: Duration,
    pub publish_confirm_timeout: Duration,
    pub consumer_threads: usize,
    pub consumer_prefetch: u16,
    pub consumer_batch_size_max: usize,
    pub consumer_batch_wait: Duration,
    pub consumer_attempts_max: u32,
    /// A consumer holding deliveries this long without applying any is stalled (503).
    pub consumer_stall: Duration,
    pub broker_heartbeat_secs: u16,
    pub broker_connect_timeout: Duration,
    pub broker_reconnect_max: Duration,
    /// How long a broker channel may leave us waiting (a setup call unanswered, published
    /// messages without a single confirm) before its connection is abandoned for the next
    /// endpoint: a cluster node whose channels wait on a dead peer stalls them for seconds.
    pub broker_stall_timeout: Duration,
    /// At shutdown, how long the publishers may keep publishing what is committed.
    pub shutdown_drain_timeout: Duration,
    /// How long the supervisor (Docker, Kubernetes) waits after its SIGTERM before it kills
    /// the process; `None` when nothing will (the variable was 0).
    pub stop_grace_period: Option<Duration>,
    /// How long every broker connection of a service may be down before `/health` says so.
    pub broker_down_grace: Duration,
    pub broker: BrokerNames,
    pub retention: Retention,
}

/// How long bookkeeping rows are kept (src/ops/retention.rs). `None` keeps them forever (the
/// variable was 0).
#[derive(Debug, Clone)]
pub struct Retention {
    /// Published outbox rows older than this are deleted (unpublished rows never are).
    pub outbox: Option<Duration>,
    /// The deduplication window: `processed_events` rows older than this are deleted, and
    /// `event_failures` rows untouched for as long.
    pub processed_events: Option<Duration>,
    /// An Idempotency-Key older than this is forgotten: the lookup ignores it at once, the
    /// pruner deletes it later, and the key may be used for a new request.
    pub idempotency_key_ttl: Option<Duration>,
    /// How often the pruner runs.
    pub interval: Duration,
    /// Rows deleted per statement at most.
    pub batch_size_max: usize,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `lookup`; unset variables take their defaults, empty ones
    /// are refused.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let v = Values(&lookup);
        let config = Config {
            write_db: v.postgres("DATABASE_URL")?,
            read_db: v.postgres("READ_DATABASE_URL")?,
            broker_targets: v.amqp("BROKER_URL")?,
            http_bind_addr: v.ip("HTTP_BIND_ADDR")?,
            command_port: v.int("COMMAND_SERVICE_PORT")?,
            query_port: v.int("QUERY_SERVICE_PORT")?,
            consumer_port: v.int("CONSUMER_SERVICE_PORT")?,
            migrate_on_start: v.bool("MIGRATE_ON_START")?,
            command_http_workers: v.int("COMMAND_HTTP_WORKERS")?,
            query_http_workers: v.int("QUERY_HTTP_WORKERS")?,
            http_read_timeout: v.ms("HTTP_READ_TIMEOUT_MS")?,
            http_max_connections: v.int("HTTP_MAX_CONNECTIONS")?,
            http_head_timeout: v.ms("HTTP_HEAD_TIMEOUT_MS")?,
            http_keepalive_timeout: v.ms("HTTP_KEEPALIVE_TIMEOUT_MS")?,
            write_pool_size: v.int("WRITE_POOL_SIZE")?,
            read_pool_size: v.int("READ_POOL_SIZE")?,
            query_cache_bytes: v.int("QUERY_CACHE_BYTES")?,
            db: DbTimeouts {
                pool_checkout: v.ms("DB_POOL_TIMEOUT_MS")?,
                connect: v.ms("DB_CONNECT_TIMEOUT_MS")?,
                statement: v.ms("DB_STATEMENT_TIMEOUT_MS")?,
                lock: v.ms("DB_LOCK_TIMEOUT_MS")?,
                idle_in_transaction: v.ms("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS")?,
                retry_max: v.ms("DB_RETRY_MAX_MS")?,
            },
            outbox_publishers: v.int("OUTBOX_PUBLISHERS")?,
            outbox_batch_size_max: v.int("OUTBOX_BATCH_SIZE")?,
            outbox_poll_interval: v.ms("OUTBOX_POLL_INTERVAL_MS")?,
            publish_confirm_timeout: v.ms("PUBLISH_CONFIRM_TIMEOUT_MS")?,
            consumer_threads: v.int("CONSUMER_THREADS")?,
            consumer_prefetch: v.int("CONSUMER_PREFETCH")?,
            consumer_batch_size_max: v.int("CONSUMER_BATCH_SIZE")?,
            consumer_batch_wait: v.ms("CONSUMER_BATCH_WAIT_MS")?,
            consumer_attempts_max: v.int("CONSUMER_MAX_ATTEMPTS")?,
            consumer_stall: v.int("CONSUMER_STALL_SECS").map(Duration::from_secs)?,
            broker_down_grace: v.int("BROKER_DOWN_GRACE_SECS").map(Duration::from_secs)?,
            broker_heartbeat_secs: v.int("BROKER_HEARTBEAT_SECS")?,
            broker_connect_timeout: v.ms("BROKER_CONNECT_TIMEOUT_MS")?,
            broker_reconnect_max: v.ms("BROKER_RECONNECT_MAX_MS")?,
            broker_stall_timeout: v.ms("BROKER_STALL_TIMEOUT_MS")?,
            shutdown_drain_timeout: v.ms("SHUTDOWN_DRAIN_TIMEOUT_MS")?,
            stop_grace_period: v.secs_or_never("STOP_GRACE_PERIOD_SECS")?,
            broker: BrokerNames {
                exchange: v.broker_name("BROKER_EXCHANGE")?,
                product_queue: v.broker_name("BROKER_PRODUCT_QUEUE")?,
                order_queue: v.broker_name("BROKER_ORDER_QUEUE")?,
                dead_letter_exchange: v.broker_name("BROKER_DEAD_LETTER_EXCHANGE")?,
                dead_letter_queue: v.broker_name("BROKER_DEAD_LETTER_QUEUE")?,
                queue_type: v.queue_type("BROKER_QUEUE_TYPE")?,
            },
            retention: Retention {
                outbox: v.secs_or_never("OUTBOX_RETENTION_SECS")?,
                processed_events: v.dedup_window("PROCESSED_EVENTS_RETENTION_SECS")?,
                idempotency_key_ttl: v.secs_or_never("IDEMPOTENCY_KEY_TTL_SECS")?,
                interval: v.ms("RETENTION_INTERVAL_MS")?,
                batch_size_max: v.int("RETENTION_BATCH_SIZE")?,
            },
        };
        config.check_together()?;
        Ok(config)
    }

    /// The rules that tie variables together (each alone was checked as it was read).
    fn check_together(&self) -> Result<()> {
        if self.consumer_batch_size_max > usize::from(self.consumer_prefetch) {
            return Err(Error::config(format!(
                "CONSUMER_BATCH_SIZE ({}) must not exceed CONSUMER_PREFETCH ({})",
                self.consumer_batch_size_max, self.consumer_prefetch
            )));
        }
        if self.consumer_batch_wait >= self.consumer_stall {
            return Err(Error::config(format!(
                "CONSUMER_BATCH_WAIT_MS ({} ms) must be below CONSUMER_STALL_SECS ({} s): a \
                 consumer filling its batch would be reported stalled",
                self.consumer_batch_wait.as_millis(),
                self.consumer_stall.as_secs()
            )));
        }
        check_broker_names(&self.broker)?;
        if same_database(&self.write_db, &self.read_db) {
            return Err(Error::config(
                "DATABASE_URL and READ_DATABASE_URL name the same database; the write and read models need one each",
            ));
        }
        // A claimed batch's transaction stays open, idle, from its claim until its confirms
        // (at most PUBLISH_CONFIRM_TIMEOUT_MS after its publishing, which itself may wait on
        // a broker's flow control). If the database ended that transaction first, the mark
        // would fail and the same rows be published again at every attempt.
        if self.publish_confirm_timeout * 2 > self.db.idle_in_transaction {
            return Err(Error::config(format!(
                "PUBLISH_CONFIRM_TIMEOUT_MS ({}) must be at most half of DB_IDLE_IN_TRANSACTION_TIMEOUT_MS ({}): a claim's transaction waits for its confirms",
                self.publish_confirm_timeout.as_millis(),
                self.db.idle_in_transaction.as_millis()
            )));
        }
        Ok(())
    }

    /// The longest a stop may take after the signal: the publishers' drain, then
    /// `STOP_BEYOND_DRAIN` for the rest before the process ends itself.
    pub fn stop_deadline(&self) -> Duration {
        self.shutdown_drain_timeout + STOP_BEYOND_DRAIN
    }

    /// For a service (the one-shot commands have no drain): a supervisor that kills the
    /// process before its own stop deadline would cut the drain short without a word.
    /// Nothing is lost then (unpublished rows stay in the outbox, unacked deliveries are
    /// redelivered), but the drain the operator asked for never runs.
    pub fn check_stop_deadline(&self) -> Result<()> {
        match self.stop_grace_period {
            Some(grace) if self.stop_deadline() >= grace => Err(Error::config(format!(
                "SHUTDOWN_DRAIN_TIMEOUT_MS ({} ms) plus {} s for the rest of a stop must be below \
                 STOP_GRACE_PERIOD_SECS ({} s), after which the supervisor kills the process; \
                 raise STOP_GRACE_PERIOD_SECS with the supervisor's grace period (compose sets \
                 both from it), or set it to 0 if nothing kills the process",
                self.shutdown_drain_timeout.as_millis(),
                STOP_BEYOND_DRAIN.as_secs(),
                grace.as_secs()
            ))),
            _ => Ok(()),
        }
    }
}

/// How long a stop may take beyond `SHUTDOWN_DRAIN_TIMEOUT_MS` (src/cli.rs's watchdog).
pub const STOP_BEYOND_DRAIN: Duration = Duration::from_secs(5);

/// Broker names RabbitMQ would refuse, or that would collide: `amq.` is reserved, and the
/// two exchanges, like the three queues, need a name each.
fn check_broker_names(b: &BrokerNames) -> Result<()> {
    let exchanges = [
        ("BROKER_EXCHANGE", &b.exchange),
        ("BROKER_DEAD_LETTER_EXCHANGE", &b.dead_letter_exchange),
    ];
    let queues = [
        ("BROKER_PRODUCT_QUEUE", &b.product_queue),
        ("BROKER_ORDER_QUEUE", &b.order_queue),
        ("BROKER_DEAD_LETTER_QUEUE", &b.dead_letter_queue),
    ];
    for (kind, names) in [("exchange", &exchanges[..]), ("queue", &queues[..])] {
        for (i, (var, name)) in names.iter().enumerate() {
            // RabbitMQ refuses to declare names starting with `amq.` (ACCESS_REFUSED).
            if name.starts_with("amq.") {
                return Err(Error::config(format!(
                    "{var} may not start with amq. (reserved by RabbitMQ): {name:?}"
                )));
            }
            if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
                return Err(Error::config(format!(
                    "{other} and {var} name the same {kind}: {name:?}"
                )));
            }
        }
    }
    Ok(())
}

/// Whether two PostgreSQL URLs name one database (same name on a common host and port): the
/// two schemas would then share one migration ledger, and the read model's migrations be
/// taken as applied.
fn same_database(a: &postgres::Config, b: &postgres::Config) -> bool {
    fn endpoints(c: &postgres::Config) -> Vec<(String, u16)> {
        let ports = c.get_ports();
        c.get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    postgres::config::Host::Tcp(h) => h.to_ascii_lowercase(),
                    postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                (host, port)
            })
            .collect()
    }
    let local = |h: &str| matches!(h, "localhost" | "127.0.0.1" | "::1");
    let (ea, eb) = (endpoints(a), endpoints(b));
    a.get_dbname() == b.get_dbname()
        && ea.iter().any(|(ha, pa)| {
            eb.iter()
                .any(|(hb, pb)| pa == pb && (ha == hb || (local(ha) && local(hb))))
        })
}

/// The variables' values as `lookup` gives them, each parsed by the rule of its type.
struct Values<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Values<'_> {
    /// The value of `name` (trimmed; unset means the default) and its table entry. Set but
    /// empty is refused: it used to mean the default too, so `DATABASE_URL=` (a value lost
    /// on its way) made `migrate` create and migrate a database `write_db` on localhost.
    fn get(&self, name: &str) -> Result<(String, &'static Variable)> {
        let var = VARIABLES
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("{name} is read but not listed in VARIABLES"));
        match (self.0)(name) {
            Some(v) if v.trim().is_empty() => Err(Error::config(format!(
                "{name} is set but empty; unset it for the default ({:?})",
                var.default
            ))),
            Some(v) => Ok((v.trim().to_string(), var)),
            None => Ok((var.default.to_string(), var)),
        }
    }

    /// An integer within the variable's range, in the field's type.
    fn int<T: TryFrom<u64>>(&self, name: &str) -> Result<T> {
        let (value, var) = self.get(name)?;
        match digits(&value) {
            Some(n) if (var.min..=var.max).contains(&n) => T::try_from(n)
                .map_err(|_| Error::config(format!("{name} is out of range: {value:?}"))),
            _ => Err(Error::config(format!(
                "{name} must be an integer from {} to {}, got {value:?}",
                var.min, var.max
            ))),
        }
    }

    fn ms(&self, name: &str) -> Result<Duration> {
        self.int(name).map(Duration::from_millis)
    }

    /// Seconds, where 0 means "never" (None).
    fn secs_or_never(&self, name: &str) -> Result<Option<Duration>> {
        let n: u64 = self.int(name)?;
        Ok((n > 0).then(|| Duration::from_secs(n)))
    }

    /// The deduplication window: 0 (keep forever) or at least `DEDUP_WINDOW_MIN_SECS`.
    fn dedup_window(&self, name: &str) -> Result<Option<Duration>> {
        let window = self.secs_or_never(name)?;
        if window.is_some_and(|w| w.as_secs() < DEDUP_WINDOW_MIN_SECS) {
            return Err(Error::config(format!(
                "{name} must be 0 (keep forever) or at least {DEDUP_WINDOW_MIN_SECS}: a \
                 duplicate delivered after the deduplication window is applied again, got {:?}",
                self.get(name)?.0
            )));
        }
        Ok(window)
    }

    fn bool(&self, name: &str) -> Result<bool> {
        let (value, _) = self.get(name)?;
        match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(Error::config(format!(
                "{name} must be true or false, got {value:?}"
            ))),
        }
    }

    fn ip(&self, name: &str) -> Result<IpAddr> {
        let (value, _) = self.get(name)?;
        value
            .parse()
            .map_err(|_| Error::config(format!("{name} must be an IP address, got {value:?}")))
    }

    fn postgres(&self, name: &str) -> Result<postgres::Config> {
        let (value, _) = self.get(name)?;
        if !value.starts_with("postgres://") && !value.starts_with("postgresql://") {
            return Err(Error::config(format!(
                "{name} must start with postgres:// or postgresql://, got {:?}",
                redact(&value)
            )));
        }
        let config: postgres::Config = value.parse().map_err(|e| {
            Error::config(format!(
                "{name} is not a valid PostgreSQL URL ({e}): {:?}",
                redact(&value)
            ))
        })?;
        // What the URL parses to but can never connect with: said now, not after a minute
        // of retries that end in an error not naming the variable.
        let no_host = |h: &postgres::config::Host| matches!(h, postgres::config::Host::Tcp(h) if h.is_empty());
        let problem = if config.get_hosts().is_empty() || config.get_hosts().iter().any(no_host) {
            Some("names no host")
        } else if config.get_ports().contains(&0) {
            Some("names port 0")
        } else if config.get_dbname().is_none_or(str::is_empty) {
            Some("names no database")
        } else if config.get_ssl_mode() == postgres::config::SslMode::Require {
            Some("asks for TLS (sslmode=require), which this build does not have")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(Error::config(format!(
                "{name} {problem}: {:?}",
                redact(&value)
            ))),
            None => Ok(config),
        }
    }

    fn amqp(&self, name: &str) -> Result<Vec<AmqpTarget>> {
        let (value, _) = self.get(name)?;
        if !value.starts_with("amqp://") {
            return Err(Error::config(format!(
                "{name} must start with amqp://, got {:?}",
                redact(&value)
            )));
        }
        parse_amqp_urls(&value)
    }

    fn broker_name(&self, name: &str) -> Result<String> {
        let (value, _) = self.get(name)?;
        if value.len() > 255 || value.chars().any(|c| c.is_control()) {
            return Err(Error::config(format!(
                "{name} must be a broker name of at most 255 characters"
            )));
        }
        Ok(value)
    }

    fn queue_type(&self, name: &str) -> Result<QueueType> {
        match self.get(name)?.0.as_str() {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(Error::config(format!(
                "{name} must be `classic` or `quorum`, got {other:?}"
            ))),
        }
    }
}

/// The most broker endpoints `BROKER_URL` may name.
pub const BROKER_ENDPOINTS_MAX: usize = 16;

/// Parses `BROKER_URL`: one amqp:// URL; or several, comma-separated
/// (`amqp://u:p@a:5672/%2f,amqp://u:p@b:5672/%2f`); or one URL whose hosts share its
/// credentials, vhost and parameters (`amqp://u:p@a:5672,b:5672,c:5672/%2f`).
pub fn parse_amqp_urls(value: &str) -> Result<Vec<AmqpTarget>> {
    // A URL starts at the beginning and after every comma that `amqp://` follows.
    let starts: Vec<usize> = value
        .match_indices("amqp://")
        .map(|(i, _)| i)
        .filter(|&i| i == 0 || value[..i].trim_end().ends_with(','))
        .collect();
    let urls: Vec<String> = if starts.len() > 1 {
        let ends = starts.iter().skip(1).copied().chain([value.len()]);
        starts
            .iter()
            .zip(ends)
            .map(|(&a, b)| value[a..b].trim().trim_end_matches(',').trim().to_string())
            .collect()
    } else {
        expand_hosts(value)?
    };
    if urls.len() > BROKER_ENDPOINTS_MAX {
        return Err(Error::config(format!(
            "BROKER_URL names {} endpoints; at most {BROKER_ENDPOINTS_MAX}",
            urls.len()
        )));
    }
    urls.iter().map(|u| parse_amqp_url(u)).collect()
}

/// `amqp://u:p@a,b:5673/v` → `amqp://u:p@a/v`, `amqp://u:p@b:5673/v`.
fn expand_hosts(url: &str) -> Result<Vec<String>> {
    let Some(rest) = url.strip_prefix("amqp://") else {
        return Ok(vec![url.to_string()]); // parse_amqp_url names the problem
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    hosts
        .split(',')
        .map(|h| match h.trim() {
            "" => Err(Error::config("BROKER_URL has an empty host in its list")),
            h => Ok(format!("amqp://{userinfo}{h}{tail}")),
        })
        .collect()
}

/// Parses a broker URL the way RabbitMQ's URI spec reads it: guest/guest, port 5672 and
/// vhost `/` by default, percent-encoded parts decoded.
pub fn parse_amqp_url(url: &str) -> Result<AmqpTarget> {
    let bad = |why: &str| Error::config(format!("BROKER_URL is not a valid amqp:// URL: {why}"));
    let rest = url
        .strip_prefix("amqp://")
        .ok_or_else(|| bad("it must start with amqp://"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("", authority));
    let decode = |s: &str| percent_decode(s, false).map_err(|_| bad("bad percent-encoding"));
    let (username, password) = match userinfo.split_once(':') {
        _ if userinfo.is_empty() => ("guest".to_string(), "guest".to_string()),
        Some((u, p)) => (decode(u)?, decode(p)?),
        None => (decode(userinfo)?, String::new()),
    };
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            (h.to_string(), after.strip_prefix(':').unwrap_or(""))
        }
        None => match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (hostport.to_string(), ""),
        },
    };
    // `amqp://user@:5672/` used to mean localhost; `amqp://` alone still does (the URI
    // spec's defaults), an empty host before a port is a host lost on its way.
    if host.is_empty() && !port.is_empty() {
        return Err(bad("no host before the port"));
    }
    let host = if host.is_empty() {
        "localhost".into()
    } else {
        decode(&host)?
    };
    // A space or control character cannot be in a host name: a value pasted with one.
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("the host may not contain spaces or control characters"));
    }
    let mut target = AmqpTarget {
        host,
        port: if port.is_empty() {
            5672
        } else {
            match digits(port).map(u16::try_from) {
                Some(Ok(p)) if p > 0 => p,
                _ => return Err(bad("bad port")),
            }
        },
        username,
        password,
        vhost: if vhost.is_empty() {
            "/".into()
        } else if vhost.contains(['/', ',', '#']) {
            // A second URL glued on, a path or a fragment: not a vhost (a vhost with
            // these characters is written percent-encoded).
            return Err(bad(
                "the vhost may not contain /, , or # (percent-encode them)",
            ));
        } else {
            decode(vhost)?
        },
        heartbeat_secs: None,
        connection_timeout_ms: None,
    };
    apply_amqp_query(&mut target, query, bad)?;
    Ok(target)
}

/// A decimal number of ASCII digits only: Rust's `parse` also takes a leading `+`, which
/// no other reader of these values (a shell, Compose, a person) would count as part of it.
fn digits(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// The query parameters of a broker URL (`heartbeat`, `connection_timeout`), each within
/// the range of the variable it overrides; any other is refused.
fn apply_amqp_query(
    target: &mut AmqpTarget,
    query: &str,
    bad: impl Fn(&str) -> Error,
) -> Result<()> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("heartbeat", v)) => {
                // As BROKER_HEARTBEAT_SECS: 0 (none) to an hour.
                let secs = digits(v).ok_or_else(|| bad("bad heartbeat"))?;
                if secs > 3600 {
                    return Err(bad("heartbeat must be from 0 to 3600 s"));
                }
                if target.heartbeat_secs.replace(secs as u16).is_some() {
                    return Err(bad("heartbeat is given twice"));
                }
            }
            Some(("connection_timeout", v)) => {
                // As BROKER_CONNECT_TIMEOUT_MS: 1 ms to 10 minutes.
                let ms = digits(v).ok_or_else(|| bad("bad connection_timeout"))?;
                if !(1..=600_000).contains(&ms) {
                    return Err(bad("connection_timeout must be from 1 to 600000 ms"));
                }
                if target.connection_timeout_ms.replace(ms).is_some() {
                    return Err(bad("connection_timeout is given twice"));
                }
            }
            _ => return Err(bad(&format!("unsupported query parameter {pair:?}"))),
        }
    }
    Ok(())
}

/// Decodes `%XX` escapes (and `+` as space in query strings); the result must be UTF-8.
/// Used for URLs from the environment and from HTTP requests alike.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                match byte {
                    Some(b) => out.push(b),
                    None => {
                        return Err(Error::bad_request("malformed percent-encoding in the URL"))
                    }
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| Error::bad_request("the URL does not decode to UTF-8"))
}

/// Hides the password of a connection URL so it never reaches a log line.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.command_port, 8080);
        assert_eq!(c.broker.queue_type, QueueType::Classic);
    }

    #[test]
    fn malformed_value_names_the_variable() {
        let e =
            Config::from_lookup(|k| (k == "WRITE_POOL_SIZE").then(|| "many".into())).unwrap_err();
        assert!(e.message().contains("WRITE_POOL_SIZE"), "{e}");
        let e =
            Config::from_lookup(|k| (k == "BROKER_URL").then(|| "http://x".into())).unwrap_err();
        assert!(e.message().contains("BROKER_URL"), "{e}");
    }

    /// The configuration of an environment holding only `pairs`.
    fn with(pairs: &[(&str, &str)]) -> Result<Config> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |k| {
            pairs
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.clone())
        })
    }

    /// Found by an audit: each was accepted, and did what the message now refuses.
    #[test]
    fn empty_values_and_a_batch_wait_longer_than_a_stall_are_refused() {
        for (pairs, says) in [
            (&[("DATABASE_URL", "")][..], "DATABASE_URL is set but empty"),
            (
                &[("CONSUMER_PREFETCH", "  ")][..],
                "CONSUMER_PREFETCH is set but empty",
            ),
            (
                &[
                    ("CONSUMER_BATCH_WAIT_MS", "1000"),
                    ("CONSUMER_STALL_SECS", "1"),
                ][..],
                "must be below CONSUMER_STALL_SECS",
            ),
        ] {
            let e = with(pairs).unwrap_err();
            assert!(
                e.is_config() && e.message().contains(says),
                "{pairs:?}: {e}"
            );
        }
        assert!(with(&[
            ("CONSUMER_BATCH_WAIT_MS", "999"),
            ("CONSUMER_STALL_SECS", "1")
        ])
        .is_ok());
        // A statement timeout no write fits in (1 ms was accepted; /health stayed 200).
        let e = with(&[("DB_STATEMENT_TIMEOUT_MS", "99")]).unwrap_err();
        assert!(e.message().contains("from 100"), "{e}");
    }

    #[test]
    fn urls_that_can_never_work_are_refused_at_once() {
        for (var, value, says) in [
            ("DATABASE_URL", "postgresql:///w", "no host"),
            (
                "READ_DATABASE_URL",
                "postgresql://postgres@:5432/r",
                "no host",
            ),
            (
                "DATABASE_URL",
                "postgresql://postgres@h:5432/",
                "no database",
            ),
            ("DATABASE_URL", "postgresql://h/w?sslmode=require", "TLS"),
            (
                "BROKER_URL",
                "amqp://g:g@h:5672/%2f?connection_timeout=0",
                "connection_timeout",
            ),
            (
                "BROKER_URL",
                "amqp://g:g@h/%2f?heartbeat=65535",
                "heartbeat",
            ),
            ("BROKER_URL", "amqp://g:g@h/%2f,http://x", "vhost"),
            ("BROKER_URL", "amqp://g:g@h/%2f/extra", "vhost"),
            ("BROKER_URL", "amqp://g:g@h/%2f#frag", "vhost"),
            ("DATABASE_URL", "postgresql://postgres@h:0/w", "port 0"),
            ("BROKER_URL", "amqp://g:g@h:0/%2f", "bad port"),
            ("BROKER_URL", "amqp://g:g@:5672/%2f", "no host"),
            // Accepted before: a leading `+`, a space in the host, a parameter twice.
            ("BROKER_URL", "amqp://g:g@h:+5672/%2f", "bad port"),
            (
                "BROKER_URL",
                "amqp://g:g@h/%2f?heartbeat=+5",
                "bad heartbeat",
            ),
            ("BROKER_URL", "amqp://g:g@my host/%2f", "spaces"),
            ("BROKER_URL", "amqp://g:g@my%20host/%2f", "spaces"),
            (
                "BROKER_URL",
                "amqp://g:g@h/%2f?heartbeat=5&heartbeat=60",
                "heartbeat is given twice",
            ),
            (
                "BROKER_URL",
                "amqp://g:g@h/%2f?connection_timeout=5&connection_timeout=9",
                "given twice",
            ),
            ("CONSUMER_THREADS", "+2", "must be an integer"),
            ("HTTP_READ_TIMEOUT_MS", "+5000", "must be an integer"),
        ] {
            let e = with(&[(var, value)]).unwrap_err();
            assert!(
                e.message().contains(var) && e.message().contains(says),
                "{var}={value}: {e}"
            );
        }
        assert!(with(&[("BROKER_URL", "amqp://g:g@h/%2f?connection_timeout=600000")]).is_ok());
        assert!(with(&[("BROKER_URL", "amqp://g:g@h/a%2fb")]).is_ok());
    }

    #[test]
    fn names_and_databases_that_clash_are_refused_at_once() {
        for (pairs, says) in [
            (
                [
                    ("BROKER_EXCHANGE", "x"),
                    ("BROKER_DEAD_LETTER_EXCHANGE", "x"),
                ],
                "same exchange",
            ),
            (
                [
                    ("BROKER_ORDER_QUEUE", "q"),
                    ("BROKER_DEAD_LETTER_QUEUE", "q"),
                ],
                "same queue",
            ),
            ([("BROKER_EXCHANGE", "amq.x"), ("RUST_LOG", "info")], "amq."),
        ] {
            let e = with(&pairs).unwrap_err();
            assert!(e.message().contains(says), "{pairs:?}: {e}");
        }
        let same = with(&[
            ("DATABASE_URL", "postgresql://u@localhost:5432/one"),
            ("READ_DATABASE_URL", "postgresql://v@127.0.0.1/one"),
        ])
        .unwrap_err();
        assert!(same.message().contains("same database"), "{same}");
        assert!(with(&[
            ("DATABASE_URL", "postgresql://u@db:5432/one"),
            ("READ_DATABASE_URL", "postgresql://u@read_db:5432/one"),
        ])
        .is_ok());
    }

    #[test]
    fn a_claim_outlives_its_confirm_wait() {
        let c = |confirm, idle| {
            with(&[
                ("PUBLISH_CONFIRM_TIMEOUT_MS", confirm),
                ("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", idle),
            ])
        };
        assert!(c("7500", "15000").is_ok());
        let e = c("7501", "15000").unwrap_err();
        assert!(e.message().contains("PUBLISH_CONFIRM_TIMEOUT_MS"), "{e}");
        assert!(c("30000", "15000").is_err());
        assert!(c("30000", "60000").is_ok());
    }

    #[test]
    fn a_stop_ends_before_the_supervisor_kills_the_process() {
        let c = |drain, grace| {
            with(&[
                ("SHUTDOWN_DRAIN_TIMEOUT_MS", drain),
                ("STOP_GRACE_PERIOD_SECS", grace),
            ])
            .and_then(|c| c.check_stop_deadline())
        };
        let defaults = Config::from_lookup(|_| None).unwrap();
        assert_eq!(defaults.stop_grace_period, Some(Duration::from_secs(30)));
        assert_eq!(defaults.stop_deadline(), Duration::from_secs(10));
        assert!(c("24999", "30").is_ok());
        let e = c("25000", "30").unwrap_err();
        assert!(e.message().contains("STOP_GRACE_PERIOD_SECS (30 s)"), "{e}");
        assert!(
            e.message().contains("SHUTDOWN_DRAIN_TIMEOUT_MS (25000 ms)"),
            "{e}"
        );
        assert!(c("60000", "66").is_ok());
        assert!(
            c("600000", "0").is_ok(),
            "0: no supervisor's deadline to keep"
        );
    }

    #[test]
    fn retention_windows() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.retention.outbox, Some(Duration::from_secs(3600)));
        assert_eq!(
            c.retention.processed_events,
            Some(Duration::from_secs(604_800))
        );
        assert_eq!(
            c.retention.idempotency_key_ttl,
            Some(Duration::from_secs(86_400))
        );
        let zeros = [
            "OUTBOX_RETENTION_SECS",
            "PROCESSED_EVENTS_RETENTION_SECS",
            "IDEMPOTENCY_KEY_TTL_SECS",
        ];
        let c = Config::from_lookup(|k| zeros.contains(&k).then(|| "0".to_string())).unwrap();
        assert_eq!(c.retention.outbox, None);
        assert_eq!(c.retention.processed_events, None);
        assert_eq!(c.retention.idempotency_key_ttl, None);
        for (k, v) in [
            ("PROCESSED_EVENTS_RETENTION_SECS", "3599"),
            ("PROCESSED_EVENTS_RETENTION_SECS", "-1"),
            ("OUTBOX_RETENTION_SECS", "1h"),
            ("IDEMPOTENCY_KEY_TTL_SECS", "99999999999"),
            ("RETENTION_BATCH_SIZE", "10001"),
            ("RETENTION_INTERVAL_MS", "0"),
        ] {
            let e = Config::from_lookup(|x| (x == k).then(|| v.to_string())).unwrap_err();
            assert!(e.message().contains(k), "{k}={v}: {e}");
        }
        let c = Config::from_lookup(|k| {
            (k == "PROCESSED_EVENTS_RETENTION_SECS").then(|| "3600".to_string())
        })
        .unwrap();
        assert_eq!(
            c.retention.processed_events,
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgresql://u:secret@h/db"),
            "postgresql://u:***@h/db"
        );
        assert_eq!(redact("amqp://guest@h"), "amqp://guest@h");
    }

    #[test]
    fn urls_parse_like_rabbitmq_reads_them() {
        let t = parse_amqp_url("amqp://guest:guest@localhost:5672/%2f").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.vhost.as_str()),
            ("localhost", 5672, "/")
        );
        let t = parse_amqp_url("amqp://app:p%40ss@broker/prod?heartbeat=5&connection_timeout=2000")
            .unwrap();
        assert_eq!(
            (t.username.as_str(), t.password.as_str(), t.host.as_str()),
            ("app", "p@ss", "broker")
        );
        assert_eq!(
            (
                t.port,
                t.vhost.as_str(),
                t.heartbeat_secs,
                t.connection_timeout_ms
            ),
            (5672, "prod", Some(5), Some(2000))
        );
        let t = parse_amqp_url("amqp://[::1]:5673").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.username.as_str(),
                t.vhost.as_str()
            ),
            ("::1", 5673, "guest", "/")
        );
        for bad in [
            "http://x",
            "amqp://h:notaport",
            "amqp://h/?frame_max=1",
            "amqp://h/%zz",
        ] {
            assert!(parse_amqp_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn broker_url_lists_endpoints_in_either_form() {
        let hosts = |value: &str| -> Vec<(String, u16, String, String)> {
            parse_amqp_urls(value)
                .unwrap()
                .into_iter()
                .map(|t| (t.host, t.port, t.password, t.vhost))
                .collect()
        };
        let expected = vec![
            ("a".to_string(), 5672, "p,w".to_string(), "v".to_string()),
            ("b".to_string(), 5673, "p,w".to_string(), "v".to_string()),
            ("::1".to_string(), 5674, "p,w".to_string(), "v".to_string()),
        ];
        // One URL with a host list (a comma in the password is not a separator)...
        assert_eq!(hosts("amqp://u:p,w@a, b:5673,[::1]:5674/v"), expected);
        // ... or a list of URLs.
        assert_eq!(
            hosts("amqp://u:p,w@a/v, amqp://u:p,w@b:5673/v,amqp://u:p,w@[::1]:5674/v"),
            expected
        );
        let one = parse_amqp_urls("amqp://guest:guest@localhost:5672/%2f").unwrap();
        assert_eq!(
            one,
            vec![parse_amqp_url("amqp://guest:guest@localhost:5672/%2f").unwrap()]
        );
        let q = parse_amqp_urls("amqp://a,b?heartbeat=3").unwrap();
        assert!(q.iter().all(|t| t.heartbeat_secs == Some(3)), "{q:?}");
        let many = vec!["h"; BROKER_ENDPOINTS_MAX + 1].join(",");
        for bad in ["amqp://a,,b/", "amqp://a,b:x/", &format!("amqp://{many}")] {
            assert!(parse_amqp_urls(bad).is_err(), "{bad}");
        }
        let c =
            Config::from_lookup(|k| (k == "BROKER_URL").then(|| "amqp://a,b,c".into())).unwrap();
        assert_eq!(c.broker_targets.len(), 3);
    }
}
