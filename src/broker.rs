//! RabbitMQ connections and topology. Whoever connects first declares everything
//! (declarations are idempotent): a durable direct exchange, one durable queue per topic
//! bound by the topic name, and a dead-letter exchange and queue for events that cannot be
//! applied. amiquip does not reconnect, so callers run sessions under `supervise::run`.
//!
//! `BROKER_URL` may name several endpoints (the nodes of a cluster). Each publisher and
//! consumer thread keeps an [`Endpoints`] cursor: it starts at a random endpoint, so the
//! threads of all services spread over the nodes, connects to the first endpoint that
//! answers, and after losing a connection starts with the endpoint after the lost one, so a
//! dead node is tried last instead of waited for. [`LinkStatus`] tells `/health` how long
//! every connection of a service has been down.

use std::hash::{BuildHasher, Hasher};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amiquip::{
    AmqpValue, Auth, Channel, Connection, ConnectionOptions, ConnectionTuning,
    ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
};
use crossbeam_channel::RecvTimeoutError;
use log::{info, warn};

use crate::config::{AmqpTarget, BrokerNames, Config, QueueType};
use crate::error::{Error, Result};
use crate::event::{ORDER_TOPIC, PRODUCT_TOPIC};

/// Opens a connection to the first endpoint that answers, starting at a random one: for
/// short-lived connections (a status probe, the dead-letter tool).
pub fn connect(config: &Config) -> Result<Connection> {
    connect_from(config, random_index(config.broker_targets.len())).map(|(c, _, _)| c)
}

/// Tries every endpoint once, starting at `start`; returns the connection, its socket and
/// the index of the endpoint that answered, or the last endpoint's error.
fn connect_from(config: &Config, start: usize) -> Result<(Connection, TcpStream, usize)> {
    let targets = &config.broker_targets;
    let mut last_error = None;
    for k in 0..targets.len() {
        let i = (start + k) % targets.len();
        match connect_to(config, &targets[i]) {
            Ok((connection, socket)) => return Ok((connection, socket, i)),
            Err(e) => {
                if targets.len() > 1 {
                    warn!("broker {}: {e}", endpoint_name(&targets[i]));
                }
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::config("BROKER_URL names no endpoint")))
}

/// `host:port`, for logs (never the credentials).
pub fn endpoint_name(target: &AmqpTarget) -> String {
    if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    }
}

/// A random index below `n` (`n` > 0), from the standard library's randomly keyed hasher.
fn random_index(n: usize) -> usize {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() % n.max(1) as u64) as usize
}

/// One thread's way to the broker: the endpoint it tries first next time, and the
/// service-wide status its connections count in.
pub struct Endpoints {
    next: usize,
    status: Arc<LinkStatus>,
}

/// An open connection; once its session has set up its channels ([`Link::in_use`]), it
/// counts as "up" in its service's [`LinkStatus`] until dropped.
pub struct Link {
    pub connection: Connection,
    /// `host:port` of the endpoint, for logs.
    pub endpoint: String,
    /// The connection's socket (a duplicate of amiquip's), to cut it from outside: amiquip's
    /// calls wait for the broker's answer without a timeout, and closing a channel or the
    /// connection waits for the broker's close-ok.
    socket: TcpStream,
    status: Arc<LinkStatus>,
    up: Option<LinkUp>,
}

impl Link {
    /// Runs `f`, calls on this connection that the broker must answer, and cuts the
    /// connection if they have not returned within `limit` (the blocked call then fails).
    /// A cluster node whose channels wait on a peer that just died answers nothing for
    /// seconds (RabbitMQ's quorum-queue client blocks until the dead node's distribution
    /// connection times out); another node answers at once.
    pub fn within<T>(
        &mut self,
        limit: Duration,
        what: &str,
        f: impl FnOnce(&mut Connection) -> Result<T>,
    ) -> Result<T> {
        let Link {
            connection, socket, ..
        } = self;
        let (result, cut) = watched(socket, limit, || f(connection));
        if cut {
            return Err(Error::unavailable(format!(
                "the broker at {} did not answer {what} within {} ms; connection dropped",
                self.endpoint,
                limit.as_millis()
            )));
        }
        result
    }

    /// The session's channels are set up (topology declared, consuming or confirming): the
    /// connection counts as up. A connection alone did not say enough: a broker refusing
    /// the declares (`PRECONDITION_FAILED`, queues of another type) let sessions connect
    /// and fail in a loop while `/health` said the broker was connected.
    pub fn in_use(&mut self) {
        if self.up.is_none() {
            self.up = Some(LinkUp::new(self.status.clone()));
        }
    }

    /// Cuts the connection without the closing handshake, so that dropping its channels
    /// and itself does not wait for a broker that has stopped answering.
    pub fn cut(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

impl Endpoints {
    /// Starts at a random endpoint, so that threads spread over a cluster's nodes.
    pub fn new(config: &Config, status: Arc<LinkStatus>) -> Endpoints {
        Endpoints {
            next: random_index(config.broker_targets.len()),
            status,
        }
    }

    /// Connects to the first endpoint that answers, starting with the one after the
    /// endpoint of the previous connection: when that connection was lost, its node is
    /// tried last, after every other.
    pub fn connect(&mut self, config: &Config) -> Result<Link> {
        let (connection, socket, i) = connect_from(config, self.next)?;
        self.next = (i + 1) % config.broker_targets.len();
        let endpoint = endpoint_name(&config.broker_targets[i]);
        info!("connected to the broker at {endpoint}");
        Ok(Link {
            connection,
            endpoint,
            socket,
            status: self.status.clone(),
            up: None,
        })
    }
}

/// How many of a service's broker connections are open, and since when none is.
#[derive(Debug)]
pub struct LinkStatus {
    state: Mutex<(usize, Instant)>,
}

impl Default for LinkStatus {
    fn default() -> Self {
        LinkStatus::new()
    }
}

impl LinkStatus {
    /// No connection yet: down since now.
    pub fn new() -> LinkStatus {
        LinkStatus {
            state: Mutex::new((0, Instant::now())),
        }
    }

    /// How long every connection has been down; zero while one is open.
    pub fn down_for(&self) -> Duration {
        let (open, since) = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        if open > 0 {
            Duration::ZERO
        } else {
            since.elapsed()
        }
    }

    /// Whether the service counts as connected: some connection is open, or all have been
    /// down for less than `grace` (a failover to another node takes a moment).
    pub fn connected(&self, grace: Duration) -> bool {
        self.down_for() <= grace
    }
}

/// One open connection in a [`LinkStatus`].
struct LinkUp(Arc<LinkStatus>);

impl LinkUp {
    fn new(status: Arc<LinkStatus>) -> LinkUp {
        status.state.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        LinkUp(status)
    }
}

impl Drop for LinkUp {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            state.1 = Instant::now();
        }
    }
}

/// Opens a connection to one endpoint. We connect the socket ourselves, for one reason:
/// TCP_NODELAY. amiquip writes a publish as three frames in separate writes, and with
/// Nagle's algorithm on, the second waits for the broker to acknowledge the first, which a
/// delayed ACK can hold for 40 ms: that was the tail of our end-to-end latency (p99 about
/// 50 ms, p50 4 ms).
fn connect_to(config: &Config, target: &AmqpTarget) -> Result<(Connection, TcpStream)> {
    let timeout = target
        .connection_timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(config.broker_connect_timeout);
    let options = ConnectionOptions::<Auth>::default()
        .auth(Auth::Plain {
            username: target.username.clone(),
            password: target.password.clone(),
        })
        .virtual_host(target.vhost.clone())
        .heartbeat(
            target
                .heartbeat_secs
                .unwrap_or(config.broker_heartbeat_secs),
        )
        .connection_timeout(Some(timeout));
    let mut last_error = None;
    for addr in (target.host.as_str(), target.port).to_socket_addrs()? {
        let attempt = TcpStream::connect_timeout(&addr, timeout)
            .and_then(|s| s.set_nodelay(true).map(|()| s))
            .and_then(|s| Ok((s.try_clone()?, mio::net::TcpStream::from_stream(s)?)))
            .map_err(Error::from)
            .and_then(|(socket, s)| {
                let connection = Connection::insecure_open_stream(
                    s,
                    options.clone(),
                    ConnectionTuning::default(),
                )?;
                Ok((connection, socket))
            });
        match attempt {
            Ok(connection) => return Ok(connection),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error
        .unwrap_or_else(|| Error::unavailable(format!("{} resolves to no address", target.host))))
}

/// Declares the exchanges, queues and bindings; safe to call from every process.
pub fn declare_topology(channel: &Channel, names: &BrokerNames) -> Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.exchange_declare(
        ExchangeType::Direct,
        names.exchange.as_str(),
        durable.clone(),
    )?;
    channel.exchange_declare(
        ExchangeType::Fanout,
        names.dead_letter_exchange.as_str(),
        durable,
    )?;
    let mut dlq_args = FieldTable::new();
    queue_type_arg(&mut dlq_args, names.queue_type);
    declare_queue(channel, &names.dead_letter_queue, dlq_args, names)?;
    channel.queue_bind(
        names.dead_letter_queue.as_str(),
        names.dead_letter_exchange.as_str(),
        "",
        FieldTable::new(),
    )?;
    for (queue, topic) in [
        (&names.product_queue, PRODUCT_TOPIC),
        (&names.order_queue, ORDER_TOPIC),
    ] {
        let mut args = FieldTable::new();
        args.insert(
            "x-dead-letter-exchange".into(),
            AmqpValue::LongString(names.dead_letter_exchange.clone()),
        );
        queue_type_arg(&mut args, names.queue_type);
        declare_queue(channel, queue, args, names)?;
        channel.queue_bind(
            queue.as_str(),
            names.exchange.as_str(),
            topic,
            FieldTable::new(),
        )?;
    }
    Ok(())
}

/// Declares a durable queue. A queue of that name declared with other arguments is refused
/// by the broker (`PRECONDITION_FAILED`) on every attempt: the error says which queue and
/// which variable, where it used to say only "broker error".
fn declare_queue(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
    names: &BrokerNames,
) -> Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        arguments,
        ..Default::default()
    };
    match channel.queue_declare(queue, options) {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
            Err(Error::unavailable(inequivalent_queue(queue, names.queue_type)).with_cause(e))
        }
        Err(e) => Err(e.into()),
    }
}

fn inequivalent_queue(queue: &str, queue_type: QueueType) -> String {
    let declared = match queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    };
    format!(
        "the broker refuses to declare queue {queue:?}: it exists with other arguments \
         (another BROKER_QUEUE_TYPE than {declared}, or declared by something else); set \
         BROKER_QUEUE_TYPE to the existing queues' type, or delete them once drained"
    )
}

/// Runs `f` (calls on the connection whose socket is `socket`) and shuts the socket down if
/// they have not returned within `limit`, which makes the blocked call fail. Returns what
/// `f` returned and whether the socket was cut.
fn watched<T>(socket: &TcpStream, limit: Duration, f: impl FnOnce() -> T) -> (T, bool) {
    let (done, finished) = crossbeam_channel::bounded::<()>(1);
    let cut = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            if finished.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
                cut.store(true, Ordering::SeqCst);
                let _ = socket.shutdown(Shutdown::Both);
            }
        });
        let result = f();
        let _ = done.send(());
        result
    });
    (result, cut.load(Ordering::SeqCst))
}

/// A connection kept for asking the broker how many messages are ready in the two event
/// queues and the dead-letter queue (a passive declare). After a failed connection attempt
/// the broker is not asked again for a few seconds, so a status route stays fast while the
/// broker is down. Every call the broker must answer is given up after
/// `BROKER_STALL_TIMEOUT_MS` (the connection is cut): a node that keeps the connection alive
/// but leaves its channels unanswered would otherwise hold sync-status, the consumer's
/// `/health` and the outbox pruner, each queued behind the probe's lock, for as long as it
/// stays silent. After a cut it is asked again sooner (see [`ProbeState::cut`]).
#[derive(Default)]
pub struct QueueProbe {
    state: std::sync::Mutex<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    /// The connection, its channel, and its socket (to cut it).
    channel: Option<(Connection, Channel, TcpStream)>,
    failed_at: Option<std::time::Instant>,
    /// How long after `failed_at` the broker is not asked again.
    retry_after: Duration,
    /// Calls cut in a row since the last answer.
    cuts: u32,
}

impl ProbeState {
    /// The broker refused or failed: ask again in [`PROBE_RETRY_AFTER`].
    fn failed(&mut self) {
        self.channel = None;
        self.failed_at = Some(std::time::Instant::now());
        self.retry_after = PROBE_RETRY_AFTER;
    }

    /// The watchdog cut a call (a slow or silent broker): ask again after the stall timeout,
    /// doubled at each cut in a row, up to [`PROBE_RETRY_AFTER`]. A broker slow for a moment
    /// (a queue busy draining a backlog) is counted again within a second or so, not 5 to 10 s
    /// later; a silent one holds about one caller per 5 s for the stall timeout.
    fn cut(&mut self, stall: Duration) {
        self.failed();
        self.retry_after = stall
            .saturating_mul(1 << self.cuts.min(16))
            .min(PROBE_RETRY_AFTER);
        self.cuts += 1;
    }
}

/// Ready messages by kind, as [`QueueProbe::ready`] counts them.
pub struct Ready {
    /// Events waiting in the product and order queues.
    pub events: i64,
    /// Messages in the dead-letter queue.
    pub dead_letters: i64,
    /// Consumers subscribed to the event queues (each consumer thread subscribes to both).
    pub consumers: i64,
}

const PROBE_RETRY_AFTER: Duration = Duration::from_secs(5);

impl QueueProbe {
    /// Ready (not unacked) messages in the product and order queues and in the dead-letter
    /// queue (the consumer declares all three together), or None when the broker cannot be
    /// asked.
    pub fn ready(&self, config: &Config) -> Option<Ready> {
        let mut probe = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..2 {
            if probe.channel.is_none() {
                if probe
                    .failed_at
                    .is_some_and(|t| t.elapsed() < probe.retry_after)
                {
                    return None;
                }
                match open_probe(config) {
                    Ok(opened) => probe.channel = Some(opened),
                    Err(cut) => {
                        if cut {
                            probe.cut(config.broker_stall_timeout);
                        } else {
                            probe.failed();
                        }
                        return None;
                    }
                }
            }
            let (_, channel, socket) = probe.channel.as_ref().expect("just set");
            let depth = |q: &str| {
                channel.queue_declare_passive(q).map(|q| {
                    let consumers = i64::from(q.declared_consumer_count().unwrap_or(0));
                    (
                        i64::from(q.declared_message_count().unwrap_or(0)),
                        consumers,
                    )
                })
            };
            let (depths, cut) = watched(socket, config.broker_stall_timeout, || {
                (
                    depth(&config.broker.product_queue),
                    depth(&config.broker.order_queue),
                    depth(&config.broker.dead_letter_queue),
                )
            });
            if cut {
                probe.cut(config.broker_stall_timeout);
                return None;
            }
            match depths {
                (Ok(p), Ok(o), Ok(d)) => {
                    probe.cuts = 0;
                    return Some(Ready {
                        events: p.0 + o.0,
                        dead_letters: d.0,
                        consumers: p.1.max(o.1),
                    });
                }
                // A failed passive declare closes the channel (e.g. a queue deleted since),
                // and a broker restart closes the connection: start over once.
                _ => probe.channel = None,
            }
        }
        None
    }
}

/// The probe's connection and channel, with the topology declared: the queues asked about
/// exist from then on, also before a publisher or a consumer has declared them (a passive
/// declare of a missing queue fails, and the broker was reported unreachable). Err(true):
/// the watchdog cut it (the broker was slow or silent); Err(false): it failed.
fn open_probe(config: &Config) -> std::result::Result<(Connection, Channel, TcpStream), bool> {
    let start = random_index(config.broker_targets.len());
    let (mut conn, socket, _) = connect_from(config, start).map_err(|_| false)?;
    let open = || -> Result<Channel> {
        let channel = conn.open_channel(None)?;
        declare_topology(&channel, &config.broker)?;
        Ok(channel)
    };
    match watched(&socket, config.broker_stall_timeout, open) {
        (Ok(channel), false) => Ok((conn, channel, socket)),
        (_, cut) => Err(cut),
    }
}

fn queue_type_arg(args: &mut FieldTable, queue_type: QueueType) {
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AmqpValue::LongString("quorum".into()),
        );
    } else {
        // Classic queue storage v2 (RabbitMQ 3.10+; older brokers ignore the argument):
        // persistent messages are confirmed faster than with v1.
        args.insert("x-queue-version".into(), AmqpValue::LongInt(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_asks_again_after_the_stall_timeout_doubled_per_cut_and_5_s_after_a_failure() {
        let stall = Duration::from_millis(300);
        let mut probe = ProbeState::default();
        let waits: Vec<u128> = (0..6)
            .map(|_| {
                probe.cut(stall);
                probe.retry_after.as_millis()
            })
            .collect();
        assert_eq!(waits, [300, 600, 1200, 2400, 4800, 5000]);
        assert!(probe.failed_at.is_some() && probe.channel.is_none());
        probe.failed();
        assert_eq!(probe.retry_after, PROBE_RETRY_AFTER);
    }
}
