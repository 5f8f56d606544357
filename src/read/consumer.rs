//! The consumers: broker deliveries → batch → one read-model transaction → commit → ack.
//!
//! Each thread owns a connection and two channels, one consuming each queue with a
//! prefetch window. It takes the first delivery, then whatever else arrives within a few
//! milliseconds, up to a batch. Nothing is acked before the transaction that applied it
//! has committed; a crash in between leaves the messages unacked, the broker redelivers
//! them and `processed_events` turns the redelivery into a no-op. A batch is acked with
//! `multiple`, one ack per channel, which is exact only because each channel has a single
//! consumer: its deliveries reach us in delivery-tag order, so the batch holds every
//! unsettled delivery of that channel up to the one acked. (On one channel shared by both
//! queues, the last delivery of a batch of products also acked the orders with lower tags
//! still waiting in the other queue's buffer, and a stop lost them.) A batch that fails for a
//! reason other than a lost database is replayed one event at a time to isolate the bad
//! one, which is retried a bounded number of times and then dead-lettered.

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{Channel, ConsumerMessage, ConsumerOptions, Delivery};
use chrono::{DateTime, Utc};
use crossbeam_channel::{select, Receiver};
use log::{error, info, warn};

use crate::broker::{self, Endpoints, LinkStatus};
use crate::config::Config;
use crate::db::Pool;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::metrics::{Counter, Gauge, Histogram, BATCH_BOUNDS, LATENCY_BOUNDS_SECONDS};
use crate::read::progress::Progress;
use crate::read::projection;
use crate::shutdown::Shutdown;
use crate::supervise::{self, Backoff, Supervision};

pub struct ConsumerMetrics {
    pub deliveries: Counter,
    pub applied: Counter,
    pub duplicates: Counter,
    pub dead_lettered: Counter,
    pub requeued: Counter,
    pub batch_failures: Counter,
    pub session_errors: Counter,
    /// Consumer threads currently connected to the broker.
    pub connected: Gauge,
    pub batch_size: Histogram,
    pub end_to_end_seconds: Histogram,
}

impl ConsumerMetrics {
    pub fn new() -> ConsumerMetrics {
        ConsumerMetrics {
            deliveries: Counter::default(),
            applied: Counter::default(),
            duplicates: Counter::default(),
            dead_lettered: Counter::default(),
            requeued: Counter::default(),
            batch_failures: Counter::default(),
            session_errors: Counter::default(),
            connected: Gauge::default(),
            batch_size: Histogram::new(BATCH_BOUNDS),
            end_to_end_seconds: Histogram::new(LATENCY_BOUNDS_SECONDS),
        }
    }

    pub fn render(&self, out: &mut String) {
        self.deliveries.render(out, "consumer_deliveries_total", "");
        self.applied
            .render(out, "consumer_events_applied_total", "");
        self.duplicates
            .render(out, "consumer_duplicates_dropped_total", "");
        self.dead_lettered
            .render(out, "consumer_dead_lettered_total", "");
        self.requeued.render(out, "consumer_requeued_total", "");
        self.batch_failures
            .render(out, "consumer_batch_failures_total", "");
        self.session_errors
            .render(out, "consumer_session_errors_total", "");
        self.connected.render(out, "consumer_connected_threads", "");
        self.batch_size.render(out, "consumer_batch_size");
        self.end_to_end_seconds
            .render(out, "consumer_end_to_end_lag_seconds");
    }
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts `config.consumer_threads` consumer threads and the thread that reports what they
/// hold (`progress`, sized for that many threads).
pub fn start(
    config: &Config,
    pool: Pool,
    shutdown: &Shutdown,
    metrics: Arc<ConsumerMetrics>,
    progress: Arc<Progress>,
    link: Arc<LinkStatus>,
    supervision: &Arc<Supervision>,
) -> Vec<JoinHandle<()>> {
    let backoff_max = config.broker_reconnect_max;
    let mut threads = supervise::spawn(
        "consumer",
        config.consumer_threads,
        shutdown,
        backoff_max,
        supervision,
        |thread| {
            let (config, pool) = (config.clone(), pool.clone());
            let (metrics, progress) = (metrics.clone(), progress.clone());
            let mut endpoints = Endpoints::new(&config, link.clone());
            let supervision = supervision.clone();
            move |shutdown: &Shutdown| {
                let consumer = Consumer {
                    pending: Cell::new(true),
                    config: &config,
                    pool: &pool,
                    shutdown,
                    metrics: &metrics,
                    progress: &progress,
                    supervision: &supervision,
                    thread,
                };
                consumer
                    .session(&mut endpoints)
                    .inspect_err(|_| metrics.session_errors.inc())
            }
        },
    );
    threads.push(crate::read::progress::start_reporter(
        pool, progress, shutdown,
    ));
    threads
}

/// One consumer thread's work: its sessions on the broker, each applying batches, like
/// the outbox's `Publisher`.
struct Consumer<'a> {
    /// Whether product or customer sums may be pending (a batch of ours left some, or
    /// another consumer's may be left from before this session): folded when idle.
    pending: Cell<bool>,
    config: &'a Config,
    pool: &'a Pool,
    shutdown: &'a Shutdown,
    metrics: &'a ConsumerMetrics,
    progress: &'a Progress,
    supervision: &'a Supervision,
    thread: usize,
}

/// Records one more failed attempt at applying `key` in the read DB (`event_failures`,
/// shared by every consumer thread and process, kept across restarts) and returns the
/// attempts so far.
fn record_failure(pool: &Pool, key: &str, error: &Error) -> Result<u32> {
    let mut conn = pool.get()?;
    let stmt = conn.prepared(RECORD_FAILURE)?;
    let row = conn.client.query_one(&stmt, &[&key, &error.to_string()])?;
    Ok(row.get::<_, i32>(0).max(0) as u32)
}

/// Forgets the failures of an event that finally applied.
fn forget_failures(pool: &Pool, key: &str) -> Result<()> {
    let mut conn = pool.get()?;
    let stmt = conn.prepared(FORGET_FAILURES)?;
    conn.client.execute(&stmt, &[&key])?;
    Ok(())
}

const RECORD_FAILURE: &str = "
INSERT INTO event_failures AS f (message_key, attempts, last_error) VALUES ($1, 1, $2)
ON CONFLICT (message_key) DO UPDATE SET
    attempts = f.attempts + 1, last_error = excluded.last_error, updated_at = now()
RETURNING attempts";

const FORGET_FAILURES: &str = "DELETE FROM event_failures WHERE message_key = $1";

impl Consumer<'_> {
    fn session(&self, endpoints: &mut Endpoints) -> Result<()> {
        let (config, shutdown) = (self.config, self.shutdown);
        let mut link = endpoints.connect(config)?;
        let stall = config.broker_stall_timeout;
        let channels = link.within(stall, "opening the consumer's channels", |connection| {
            Ok([
                connection.open_channel(None)?,
                connection.open_channel(None)?,
            ])
        })?;
        // Each call waits for the broker's answer; a node whose queue client waits on a dead
        // peer leaves basic.consume unanswered for seconds (measured: 7 s).
        let (products, orders) = link.within(stall, "declaring and consuming", |_| {
            broker::declare_topology(&channels[0], &config.broker)?;
            let consume = |from: Source, queue: &str| {
                let channel = &channels[from as usize];
                channel.qos(0, config.consumer_prefetch, false)?;
                channel.basic_consume(queue, ConsumerOptions::default())
            };
            let products = consume(Source::Products, config.broker.product_queue.as_str())?;
            let orders = consume(Source::Orders, config.broker.order_queue.as_str())?;
            Ok((products, orders))
        })?;
        link.in_use();
        info!("consumer consuming from {}", link.endpoint);
        let _connected = ConnectedGuard::new(&self.metrics.connected);
        let (prx, orx) = (products.receiver(), orders.receiver());
        let _attached = self
            .progress
            .attach(self.thread, vec![prx.clone(), orx.clone()]);
        let never = crossbeam_channel::never();
        let consume = || loop {
            self.supervision.checkpoint("consumer");
            let idle = if self.pending.get() {
                crossbeam_channel::after(FOLD_WHEN_IDLE)
            } else {
                never.clone()
            };
            let first = select! {
                recv(prx) -> m => (Source::Products, m),
                recv(orx) -> m => (Source::Orders, m),
                recv(shutdown.receiver()) -> _ => return Ok(()), // unacked messages are redelivered
                recv(idle) -> _ => {
                    self.fold_when_idle();
                    continue;
                }
            };
            // Held from the first delivery taken, while the batch fills too: the broker no
            // longer counts these messages as ready (sync-status counted them nowhere
            // during CONSUMER_BATCH_WAIT_MS).
            let first = (first.0, delivery(first.1)?);
            let filling = self.progress.hold(self.thread, 1, Some(sent_by(&first.1)));
            let batch = self.fill_batch(first, prx, orx)?;
            self.process(&channels, batch)?;
            drop(filling);
        };
        let result = consume();
        if result.is_err() {
            // The channel may be stuck on the broker: cancelling and closing would wait.
            link.cut();
        } else {
            let stall = config.broker_stall_timeout;
            let _ = link.within(stall, "cancelling the consumers", |_| {
                cancel(&products)?;
                cancel(&orders)
            });
        }
        result
    }

    /// A batch from `first` and whatever else arrives: what is already here without
    /// waiting, then until `CONSUMER_BATCH_WAIT_MS` has passed or a stop is requested, up
    /// to the batch size.
    fn fill_batch(
        &self,
        first: (Source, Delivery),
        prx: &Receiver<ConsumerMessage>,
        orx: &Receiver<ConsumerMessage>,
    ) -> Result<Vec<(Source, Delivery)>> {
        let config = self.config;
        let mut batch = vec![first];
        let deadline = Instant::now() + config.consumer_batch_wait;
        while batch.len() < config.consumer_batch_size_max {
            let next = match prx.try_recv() {
                Ok(m) => (Source::Products, m),
                Err(_) => match orx.try_recv() {
                    Ok(m) => (Source::Orders, m),
                    Err(_) => select! {
                        recv(prx) -> m => (Source::Products, delivery_or_closed(m)?),
                        recv(orx) -> m => (Source::Orders, delivery_or_closed(m)?),
                        recv(self.shutdown.receiver()) -> _ => break,
                        default(deadline.saturating_duration_since(Instant::now())) => break,
                    },
                },
            };
            batch.push((next.0, delivery(Ok(next.1))?));
            self.progress.filling(self.thread, batch.len());
        }
        Ok(batch)
    }

    fn process(&self, channels: &[Channel; 2], batch: Vec<(Source, Delivery)>) -> Result<()> {
        let metrics = self.metrics;
        let held = batch.len();
        metrics.deliveries.add(batch.len() as u64);
        metrics.batch_size.observe(batch.len() as f64);
        // Messages that are not events at all can never succeed: dead-letter them at once.
        let mut good: Vec<((Source, Delivery), Event)> = Vec::with_capacity(batch.len());
        for (from, d) in batch {
            match Event::parse(&d.body) {
                Ok(e) => good.push(((from, d), e)),
                Err(e) => {
                    warn!(
                        "dead-lettering an unparseable message ({}): {e}",
                        message_key(&d)
                    );
                    metrics.dead_lettered.inc();
                    d.nack(&channels[from as usize], false)?;
                }
            }
        }
        if good.is_empty() {
            return Ok(());
        }
        let (deliveries, events): (Vec<(Source, Delivery)>, Vec<Event>) = good.into_iter().unzip();
        let oldest = events.iter().map(Event::timestamp).min();
        let _held = self.progress.hold(self.thread, held, oldest);
        match self.apply_with_retry(&events)? {
            Some(Ok(counts)) => {
                self.record_applied(&events, counts);
                // Each channel's last delivery in the batch, acked with `multiple` (module
                // doc); the unparseable ones nacked above are settled already.
                let mut last: [Option<Delivery>; 2] = [None, None];
                for (from, d) in deliveries {
                    last[from as usize] = Some(d);
                }
                for (d, channel) in last.into_iter().zip(channels) {
                    if let Some(d) = d {
                        d.ack_multiple(channel)?;
                    }
                }
                Ok(())
            }
            None => Err(Error::unavailable(
                "shutting down before the batch committed",
            )),
            Some(Err(e)) => {
                metrics.batch_failures.inc();
                warn!(
                    "a batch of {} events failed ({e}); applying them one at a time",
                    events.len()
                );
                for ((from, d), event) in deliveries.into_iter().zip(events) {
                    self.isolate(&channels[from as usize], d, event)?;
                }
                Ok(())
            }
        }
    }

    /// Applies one event alone; on a permanent failure, requeues it or, after
    /// `consumer_attempts_max` failures, dead-letters it.
    fn isolate(&self, channel: &Channel, d: Delivery, event: Event) -> Result<()> {
        let (pool, config, metrics) = (self.pool, self.config, self.metrics);
        let key = message_key(&d);
        // A redelivered message may have failed before (here or in another consumer).
        let maybe_failed_before = d.redelivered;
        let single = std::slice::from_ref(&event);
        match self.apply_with_retry(single)? {
            Some(Ok(counts)) => {
                self.record_applied(single, counts);
                d.ack(channel)?;
                if maybe_failed_before {
                    if let Err(e) = forget_failures(pool, &key) {
                        warn!("could not clear the failure record of {key}: {e}");
                    }
                }
            }
            None => return Err(Error::unavailable("shutting down")),
            Some(Err(e)) => {
                // If even the failure cannot be recorded, the database is gone: the session ends
                // and the message is redelivered, uncounted.
                let n = record_failure(pool, &key, &e)?;
                if n >= config.consumer_attempts_max {
                    error!("dead-lettering event {key} after {n} failed attempts: {e}");
                    metrics.dead_lettered.inc();
                    d.nack(channel, false)?;
                } else {
                    warn!(
                        "event {key} failed (attempt {n} of {}): {e}",
                        config.consumer_attempts_max
                    );
                    metrics.requeued.inc();
                    d.nack(channel, true)?;
                }
            }
        }
        Ok(())
    }

    /// Applies a batch, waiting out transient failures (database down, deadlock, timeout) with
    /// backoff. Returns None on shutdown, Some(Err) for a permanent failure.
    fn apply_with_retry(
        &self,
        events: &[Event],
    ) -> Result<Option<Result<projection::BatchCounts>>> {
        let mut backoff = Backoff::new(DB_RETRY_INITIAL, self.config.db.retry_max);
        // Events an attempt committed before its flush barrier failed: a later attempt
        // finds them applied, and they count as applied, not as duplicates.
        let mut committed = 0;
        loop {
            let result = self
                .pool
                .get()
                .map_err(Error::from)
                .and_then(|mut conn| {
                    projection::apply_batch_noting(&mut conn, events, &mut committed)
                })
                .map(|mut counts| {
                    let moved = committed.min(counts.duplicates);
                    counts.applied += moved;
                    counts.duplicates -= moved;
                    if moved > 0 {
                        // Only a batch applied whole commits before its barrier.
                        counts.fresh = None;
                    }
                    counts
                });
            match result {
                Err(e) if e.is_transient() => {
                    let wait = backoff.next_wait();
                    warn!(
                        "read database unavailable ({e}); retrying in {} ms",
                        wait.as_millis()
                    );
                    if self.shutdown.sleep(wait) {
                        return Ok(None);
                    }
                }
                other => return Ok(Some(other)),
            }
        }
    }

    /// No delivery for `FOLD_WHEN_IDLE` while sums may be pending: fold them, so that the
    /// views the ranked lists read catch up once the load stops.
    fn fold_when_idle(&self) {
        let folded = self
            .pool
            .get()
            .map_err(Error::from)
            .and_then(|mut conn| projection::fold_pending(&mut conn));
        match folded {
            Ok(still) => self.pending.set(still),
            // The next batch meets the same database and reports it; try again later.
            Err(e) => log::debug!("folding pending sums failed: {e}"),
        }
    }

    fn record_applied(&self, events: &[Event], counts: projection::BatchCounts) {
        if counts.left_pending {
            self.pending.set(true);
        }
        let metrics = self.metrics;
        self.progress.applied(self.thread);
        metrics.applied.add(counts.applied as u64);
        metrics.duplicates.add(counts.duplicates as u64);
        // The end-to-end lag of each event applied, once: not of a duplicate (it observed
        // redelivered events, whose lag can be hours, as if they had just arrived).
        let now = crate::event::now_millis();
        let mut observed = HashSet::new();
        for e in events {
            let id = e.event_id();
            let fresh = counts.fresh.as_ref().is_none_or(|f| f.contains(&id));
            if counts.applied == 0 || !fresh || (counts.duplicates > 0 && !observed.insert(id)) {
                continue;
            }
            let lag = (now - e.timestamp()).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
            metrics.end_to_end_seconds.observe(lag);
        }
    }
}

/// The queue a delivery came from, which is also the index of the channel that consumes it.
#[derive(Clone, Copy)]
enum Source {
    Products = 0,
    Orders = 1,
}

fn delivery_or_closed(
    m: std::result::Result<ConsumerMessage, crossbeam_channel::RecvError>,
) -> Result<ConsumerMessage> {
    m.map_err(|_| Error::unavailable("broker connection closed"))
}

/// A bound on a delivery's event time before its body is read, so that the age it gives is
/// never more than the event's: the earlier of now (the event was committed before it was
/// published and delivered) and the message's timestamp (whole seconds, rounded, of its
/// outbox row's creation, which follows the event's time) plus a second. Until the batch is
/// read, the lag while it fills: a progress row written then said it held deliveries of no
/// age, and sync-status showed them pending with a lag of 0; with the timestamp alone, up to
/// a second ahead of now, it still did for that second.
fn sent_by(d: &Delivery) -> DateTime<Utc> {
    let now = Utc::now();
    d.properties
        .timestamp()
        .and_then(|secs| i64::try_from(secs).ok()?.checked_add(1))
        .and_then(|secs| DateTime::from_timestamp(secs, 0))
        .map_or(now, |t| t.min(now))
}

fn delivery(
    m: std::result::Result<ConsumerMessage, crossbeam_channel::RecvError>,
) -> Result<Delivery> {
    match m {
        Ok(ConsumerMessage::Delivery(d)) => Ok(d),
        Ok(ConsumerMessage::ServerClosedChannel(e))
        | Ok(ConsumerMessage::ServerClosedConnection(e)) => Err(e.into()),
        Ok(other) => Err(Error::unavailable(format!("consumer stopped: {other:?}"))),
        Err(_) => Err(Error::unavailable("broker connection closed")),
    }
}

/// Cancels `consumer` and waits until amiquip has told its receiver so. amiquip answers
/// the cancel's call first and tells the receiver second: a consumer dropped in between
/// made its I/O thread log `internal error - channel client dropped without being
/// disconnected` and end the connection (1 in 8 stops of the consumer service). What the
/// receiver still holds is unacked, and redelivered.
fn cancel(consumer: &amiquip::Consumer<'_>) -> Result<()> {
    consumer.cancel()?;
    loop {
        match consumer.receiver().recv() {
            Ok(ConsumerMessage::Delivery(_)) => continue,
            _ => return Ok(()),
        }
    }
}

/// A key identifying a message across redeliveries: its message id, or its body.
fn message_key(d: &Delivery) -> String {
    d.properties
        .message_id()
        .clone()
        .unwrap_or_else(|| String::from_utf8_lossy(&d.body[..d.body.len().min(256)]).into_owned())
}

/// How long a consumer with pending sums waits for a delivery before it folds them itself.
const FOLD_WHEN_IDLE: Duration = Duration::from_millis(20);

/// The first wait when the read database refuses a batch for a transient reason.
const DB_RETRY_INITIAL: Duration = Duration::from_millis(50);

/// Counts a connected session for as long as it lives.
struct ConnectedGuard<'a>(&'a Gauge);

impl<'a> ConnectedGuard<'a> {
    fn new(g: &'a Gauge) -> Self {
        g.add(1);
        ConnectedGuard(g)
    }
}

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

/// The consumer service's HTTP face: health and metrics only.
pub struct ConsumerHttp {
    pub pool: Pool,
    pub metrics: Arc<ConsumerMetrics>,
    pub progress: Arc<Progress>,
    pub config: Config,
    pub probe: broker::QueueProbe,
    /// Since when the broker has been seen with ready messages while nothing was applied.
    pub ready_since: std::sync::Mutex<Option<Instant>>,
    /// The consumer threads' broker connections.
    pub link: Arc<LinkStatus>,
    pub retention: Arc<crate::ops::retention::RetentionMetrics>,
}

impl ConsumerHttp {
    pub fn new(
        pool: Pool,
        metrics: Arc<ConsumerMetrics>,
        progress: Arc<Progress>,
        config: &Config,
        link: Arc<LinkStatus>,
    ) -> Self {
        ConsumerHttp {
            link,
            pool,
            metrics,
            progress,
            config: config.clone(),
            probe: broker::QueueProbe::default(),
            ready_since: std::sync::Mutex::new(None),
            retention: Arc::default(),
        }
    }

    /// Stalled: a thread has held deliveries for `CONSUMER_STALL_SECS` without applying any,
    /// or messages have been ready in the queues that long while nothing was applied.
    fn stall_check(&self) -> Result<()> {
        let snap = self.progress.snapshot();
        if let Some(reason) = snap.stalled {
            return Err(Error::unavailable(reason));
        }
        let stall = self.progress.stall();
        let last_applied = self.progress.last_applied();
        let mut since = self.ready_since.lock().unwrap_or_else(|e| e.into_inner());
        if snap.held_messages > 0 || last_applied.is_some_and(|t| t.elapsed() < stall) {
            *since = None;
            return Ok(());
        }
        // Nothing held and nothing applied lately: idle, unless messages wait on the broker.
        let ready = self.probe.ready(&self.config).map_or(0, |r| r.events);
        if ready == 0 {
            *since = None;
            return Ok(());
        }
        let first = *since.get_or_insert_with(Instant::now);
        if first.elapsed() >= stall {
            return Err(Error::unavailable(format!(
                "consumer stalled: {ready} messages have been ready for {} s and none was applied",
                first.elapsed().as_secs()
            )));
        }
        Ok(())
    }
}

impl crate::http::Service for ConsumerHttp {
    fn handle(&self, _req: &crate::http::Request) -> (&'static str, Result<crate::http::Response>) {
        crate::http::not_found()
    }

    fn health(&self) -> Result<()> {
        crate::db::ping(&self.pool)
            .map_err(|e| Error::unavailable(format!("read database unreachable: {e}")))?;
        // A failover to another node takes a moment: only an outage longer than the grace
        // period makes the service unhealthy.
        let grace = self.config.broker_down_grace;
        if !self.link.connected(grace) {
            return Err(Error::unavailable(format!(
                "broker unreachable: no consumer has been connected for {} s",
                self.link.down_for().as_secs()
            )));
        }
        self.stall_check()
    }

    fn health_details(&self) -> serde_json::Map<String, serde_json::Value> {
        let connected = self.link.connected(self.config.broker_down_grace);
        serde_json::Map::from_iter([("brokerConnected".to_string(), connected.into())])
    }

    fn metrics(&self, out: &mut String) {
        self.metrics.render(out);
        let snap = self.progress.snapshot();
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# TYPE consumer_held_messages gauge\nconsumer_held_messages {}\n# TYPE consumer_stalled gauge\nconsumer_stalled {}",
            snap.held_messages,
            u8::from(snap.stalled.is_some())
        );
        crate::metrics::render_pool(out, "read", &self.pool);
        use crate::ops::retention::Table;
        self.retention.render(
            out,
            &self.pool,
            &[Table::ProcessedEvents, Table::EventFailures],
        );
    }
}
