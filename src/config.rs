//! Configuration from environment variables only. `Config::from_lookup` takes any lookup
//! function so tests can pass a closure instead of mutating the process environment.
//! Every variable has a default for a local machine; a malformed value is an error that
//! names the variable, and the binary turns it into one line on stderr and exit code 2.

use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// Every variable the binary reads, with its default. `.env.example` must list each one
/// (a test checks it), so this table is the single source of truth.
pub const VARIABLES: &[(&str, &str)] = &[
    (
        "DATABASE_URL",
        "postgresql://postgres@localhost:5432/write_db",
    ),
    (
        "READ_DATABASE_URL",
        "postgresql://postgres@localhost:5432/read_db",
    ),
    ("BROKER_URL", "amqp://guest:guest@localhost:5672/%2f"),
    ("HTTP_BIND_ADDR", "0.0.0.0"),
    ("COMMAND_SERVICE_PORT", "8080"),
    ("QUERY_SERVICE_PORT", "8081"),
    ("CONSUMER_SERVICE_PORT", "8082"),
    ("MIGRATE_ON_START", "true"),
    ("COMMAND_HTTP_WORKERS", "16"),
    ("QUERY_HTTP_WORKERS", "8"),
    ("HTTP_READ_TIMEOUT_MS", "5000"),
    ("WRITE_POOL_SIZE", "16"),
    ("READ_POOL_SIZE", "8"),
    ("DB_POOL_TIMEOUT_MS", "2000"),
    ("DB_CONNECT_TIMEOUT_MS", "3000"),
    ("DB_STATEMENT_TIMEOUT_MS", "5000"),
    ("DB_LOCK_TIMEOUT_MS", "2000"),
    ("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", "15000"),
    ("OUTBOX_PUBLISHERS", "1"),
    ("OUTBOX_BATCH_SIZE", "500"),
    ("OUTBOX_POLL_INTERVAL_MS", "500"),
    ("PUBLISH_CONFIRM_TIMEOUT_MS", "5000"),
    ("CONSUMER_THREADS", "1"),
    ("CONSUMER_PREFETCH", "2000"),
    ("CONSUMER_BATCH_SIZE", "1000"),
    ("CONSUMER_BATCH_WAIT_MS", "0"),
    ("CONSUMER_MAX_ATTEMPTS", "5"),
    ("BROKER_HEARTBEAT_SECS", "10"),
    ("BROKER_RECONNECT_MAX_MS", "5000"),
    ("BROKER_EXCHANGE", "analytics.events"),
    ("BROKER_PRODUCT_QUEUE", "analytics.product-events"),
    ("BROKER_ORDER_QUEUE", "analytics.order-events"),
    ("BROKER_DEAD_LETTER_EXCHANGE", "analytics.dead-letter"),
    ("BROKER_DEAD_LETTER_QUEUE", "analytics.dead-letter"),
    ("BROKER_QUEUE_TYPE", "classic"),
];

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
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub read_database_url: String,
    pub broker_url: String,
    pub http_bind_addr: String,
    pub command_port: u16,
    pub query_port: u16,
    pub consumer_port: u16,
    pub migrate_on_start: bool,
    pub command_http_workers: usize,
    pub query_http_workers: usize,
    pub http_read_timeout: Duration,
    pub write_pool_size: u32,
    pub read_pool_size: u32,
    pub db: DbTimeouts,
    pub outbox_publishers: usize,
    pub outbox_batch_size: usize,
    pub outbox_poll_interval: Duration,
    pub publish_confirm_timeout: Duration,
    pub consumer_threads: usize,
    pub consumer_prefetch: u16,
    pub consumer_batch_size: usize,
    pub consumer_batch_wait: Duration,
    pub consumer_max_attempts: u32,
    pub broker_heartbeat_secs: u16,
    pub broker_reconnect_max: Duration,
    pub broker: BrokerNames,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `lookup`; unset or empty variables take their defaults.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let get = |name: &str| -> String {
            match lookup(name) {
                Some(v) if !v.trim().is_empty() => v.trim().to_string(),
                _ => default_of(name).to_string(),
            }
        };
        let ms = |name: &str, min: u64, max: u64| -> Result<Duration> {
            parse_in(name, &get(name), min, max).map(Duration::from_millis)
        };
        let queue_type = match get("BROKER_QUEUE_TYPE").as_str() {
            "classic" => QueueType::Classic,
            "quorum" => QueueType::Quorum,
            other => {
                return Err(Error::config(format!(
                    "BROKER_QUEUE_TYPE must be `classic` or `quorum`, got {other:?}"
                )))
            }
        };
        let config = Config {
            database_url: url(&get, "DATABASE_URL", &["postgres://", "postgresql://"])?,
            read_database_url: url(&get, "READ_DATABASE_URL", &["postgres://", "postgresql://"])?,
            broker_url: {
                let v = url(&get, "BROKER_URL", &["amqp://"])?;
                crate::broker::parse_url(&v)?;
                v
            },
            http_bind_addr: {
                let v = get("HTTP_BIND_ADDR");
                v.parse::<std::net::IpAddr>().map_err(|_| {
                    Error::config(format!("HTTP_BIND_ADDR must be an IP address, got {v:?}"))
                })?;
                v
            },
            command_port: parse_in(
                "COMMAND_SERVICE_PORT",
                &get("COMMAND_SERVICE_PORT"),
                0,
                65535,
            )?,
            query_port: parse_in("QUERY_SERVICE_PORT", &get("QUERY_SERVICE_PORT"), 0, 65535)?,
            consumer_port: parse_in(
                "CONSUMER_SERVICE_PORT",
                &get("CONSUMER_SERVICE_PORT"),
                0,
                65535,
            )?,
            migrate_on_start: parse_bool("MIGRATE_ON_START", &get("MIGRATE_ON_START"))?,
            command_http_workers: parse_in(
                "COMMAND_HTTP_WORKERS",
                &get("COMMAND_HTTP_WORKERS"),
                1,
                1024,
            )?,
            query_http_workers: parse_in(
                "QUERY_HTTP_WORKERS",
                &get("QUERY_HTTP_WORKERS"),
                1,
                1024,
            )?,
            http_read_timeout: ms("HTTP_READ_TIMEOUT_MS", 10, 600_000)?,
            write_pool_size: parse_in("WRITE_POOL_SIZE", &get("WRITE_POOL_SIZE"), 1, 1024)?,
            read_pool_size: parse_in("READ_POOL_SIZE", &get("READ_POOL_SIZE"), 1, 1024)?,
            db: DbTimeouts {
                pool_checkout: ms("DB_POOL_TIMEOUT_MS", 1, 600_000)?,
                connect: ms("DB_CONNECT_TIMEOUT_MS", 1, 600_000)?,
                statement: ms("DB_STATEMENT_TIMEOUT_MS", 1, 3_600_000)?,
                lock: ms("DB_LOCK_TIMEOUT_MS", 1, 3_600_000)?,
                idle_in_transaction: ms("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", 1, 3_600_000)?,
            },
            outbox_publishers: parse_in("OUTBOX_PUBLISHERS", &get("OUTBOX_PUBLISHERS"), 0, 64)?,
            outbox_batch_size: parse_in("OUTBOX_BATCH_SIZE", &get("OUTBOX_BATCH_SIZE"), 1, 10_000)?,
            outbox_poll_interval: ms("OUTBOX_POLL_INTERVAL_MS", 1, 600_000)?,
            publish_confirm_timeout: ms("PUBLISH_CONFIRM_TIMEOUT_MS", 1, 600_000)?,
            consumer_threads: parse_in("CONSUMER_THREADS", &get("CONSUMER_THREADS"), 1, 64)?,
            consumer_prefetch: parse_in("CONSUMER_PREFETCH", &get("CONSUMER_PREFETCH"), 1, 65_535)?,
            consumer_batch_size: parse_in(
                "CONSUMER_BATCH_SIZE",
                &get("CONSUMER_BATCH_SIZE"),
                1,
                10_000,
            )?,
            consumer_batch_wait: ms("CONSUMER_BATCH_WAIT_MS", 0, 10_000)?,
            consumer_max_attempts: parse_in(
                "CONSUMER_MAX_ATTEMPTS",
                &get("CONSUMER_MAX_ATTEMPTS"),
                1,
                1000,
            )?,
            broker_heartbeat_secs: parse_in(
                "BROKER_HEARTBEAT_SECS",
                &get("BROKER_HEARTBEAT_SECS"),
                0,
                3600,
            )?,
            broker_reconnect_max: ms("BROKER_RECONNECT_MAX_MS", 10, 600_000)?,
            broker: BrokerNames {
                exchange: name(&get, "BROKER_EXCHANGE")?,
                product_queue: name(&get, "BROKER_PRODUCT_QUEUE")?,
                order_queue: name(&get, "BROKER_ORDER_QUEUE")?,
                dead_letter_exchange: name(&get, "BROKER_DEAD_LETTER_EXCHANGE")?,
                dead_letter_queue: name(&get, "BROKER_DEAD_LETTER_QUEUE")?,
                queue_type,
            },
        };
        if config.consumer_batch_size > usize::from(config.consumer_prefetch) {
            return Err(Error::config(format!(
                "CONSUMER_BATCH_SIZE ({}) must not exceed CONSUMER_PREFETCH ({})",
                config.consumer_batch_size, config.consumer_prefetch
            )));
        }
        Ok(config)
    }
}

fn default_of(name: &str) -> &'static str {
    VARIABLES
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| *v)
        .unwrap_or("")
}

fn parse_in<T>(name: &str, value: &str, min: u64, max: u64) -> Result<T>
where
    T: FromStr + TryFrom<u64>,
{
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => {
            T::try_from(n).map_err(|_| Error::config(format!("{name} is out of range: {value:?}")))
        }
        _ => Err(Error::config(format!(
            "{name} must be an integer from {min} to {max}, got {value:?}"
        ))),
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(Error::config(format!(
            "{name} must be true or false, got {value:?}"
        ))),
    }
}

fn url(get: &impl Fn(&str) -> String, name: &str, schemes: &[&str]) -> Result<String> {
    let v = get(name);
    if !schemes.iter().any(|s| v.starts_with(s)) {
        return Err(Error::config(format!(
            "{name} must start with {}, got {:?}",
            schemes.join(" or "),
            redact(&v)
        )));
    }
    if schemes[0].starts_with("postgres") {
        v.parse::<postgres::Config>().map_err(|e| {
            Error::config(format!(
                "{name} is not a valid PostgreSQL URL ({e}): {:?}",
                redact(&v)
            ))
        })?;
    }
    Ok(v)
}

fn name(get: &impl Fn(&str) -> String, var: &str) -> Result<String> {
    let v = get(var);
    if v.len() > 255 || v.chars().any(|c| c.is_control()) {
        return Err(Error::config(format!(
            "{var} must be a broker name of at most 255 characters"
        )));
    }
    Ok(v)
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

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgresql://u:secret@h/db"),
            "postgresql://u:***@h/db"
        );
        assert_eq!(redact("amqp://guest@h"), "amqp://guest@h");
    }
}
