//! The outbox publisher: moves committed outbox rows to RabbitMQ without ever losing one.
//!
//! One pass claims a batch with `FOR UPDATE SKIP LOCKED` (so any number of publishers, in
//! any number of processes, never publish the same row at the same time), publishes every
//! row as a persistent, mandatory message, waits for the broker's confirms for the whole
//! batch at once (one confirm at a time would cap us at a few dozen messages per second),
//! and marks published only the rows the broker acked and did not return. Everything else
//! stays unpublished and is retried. A message may be published twice (a crash between
//! the confirm and our commit); the consumer's idempotency makes that harmless.

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use amiquip::{AmqpProperties, Channel, Confirm, ConfirmSmoother, Publish, Return};
use crossbeam_channel::{select, Receiver, RecvTimeoutError};
use log::{debug, info, warn};

use crate::broker;
use crate::config::Config;
use crate::db::Pool;
use crate::error::{Error, Result};
use crate::metrics::{Counter, Gauge, Histogram, BATCH_BOUNDS};
use crate::shutdown::Shutdown;

#[derive(Default)]
pub struct OutboxMetrics {
    pub published: Counter,
    pub acked: Counter,
    pub nacked: Counter,
    pub returned: Counter,
    pub session_errors: Counter,
    pub last_batch_rows: Gauge,
    pub batch_rows: Option<Histogram>,
}

impl OutboxMetrics {
    pub fn new() -> OutboxMetrics {
        OutboxMetrics {
            batch_rows: Some(Histogram::new(BATCH_BOUNDS)),
            ..Default::default()
        }
    }

    pub fn render(&self, out: &mut String) {
        self.published.render(out, "outbox_published_total", "");
        self.acked
            .render(out, "outbox_confirms_total", "result=\"ack\"");
        self.nacked
            .render(out, "outbox_confirms_total", "result=\"nack\"");
        self.returned.render(out, "outbox_returned_total", "");
        self.session_errors
            .render(out, "outbox_session_errors_total", "");
        if let Some(h) = &self.batch_rows {
            h.render(out, "outbox_batch_rows");
        }
    }
}

/// Starts `config.outbox_publishers` publisher threads. `wake` carries a token after each
/// commit in this process; the poll interval covers rows written by other processes.
pub fn start(
    config: &Config,
    pool: Pool,
    wake: Receiver<()>,
    shutdown: &Shutdown,
    metrics: Arc<OutboxMetrics>,
) -> Vec<JoinHandle<()>> {
    (0..config.outbox_publishers)
        .map(|i| {
            let config = config.clone();
            let pool = pool.clone();
            let wake = wake.clone();
            let shutdown = shutdown.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("outbox-{i}"))
                .spawn(move || {
                    broker::retry_forever(
                        "outbox publisher",
                        &shutdown,
                        config.broker_reconnect_max,
                        || metrics.session_errors.inc(),
                        || Publisher::session(&config, &pool, &wake, &shutdown, &metrics),
                    )
                })
                .expect("spawning an outbox publisher thread")
        })
        .collect()
}

/// One broker connection's worth of publishing.
pub struct Publisher<'a> {
    config: &'a Config,
    channel: Channel,
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
    smoother: ConfirmSmoother,
    next_tag: u64,
    metrics: &'a OutboxMetrics,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassOutcome {
    pub claimed: usize,
    pub published: usize,
}

impl<'a> Publisher<'a> {
    fn session(
        config: &Config,
        pool: &Pool,
        wake: &Receiver<()>,
        shutdown: &Shutdown,
        metrics: &OutboxMetrics,
    ) -> Result<()> {
        let mut connection = broker::connect(config)?;
        let channel = connection.open_channel(None)?;
        let mut publisher = Publisher::new(config, channel, metrics)?;
        info!("outbox publisher connected to the broker");
        let poll = config.outbox_poll_interval;
        loop {
            // Drain: keep going while passes come back full and clean.
            loop {
                if shutdown.is_triggered() {
                    return Ok(());
                }
                let outcome = publisher.pass(pool)?;
                if outcome.claimed < config.outbox_batch_size || outcome.published < outcome.claimed
                {
                    break;
                }
            }
            select! {
                recv(wake) -> _ => {}
                recv(shutdown.receiver()) -> _ => return Ok(()),
                default(poll) => {}
            }
        }
    }

    /// Prepares a channel for publishing: topology, confirms, returns.
    pub fn new(
        config: &'a Config,
        channel: Channel,
        metrics: &'a OutboxMetrics,
    ) -> Result<Publisher<'a>> {
        broker::declare_topology(&channel, &config.broker)?;
        channel.enable_publisher_confirms()?;
        let confirms = channel.listen_for_publisher_confirms()?;
        let returns = channel.listen_for_returns()?;
        Ok(Publisher {
            config,
            channel,
            confirms,
            returns,
            smoother: ConfirmSmoother::new(),
            next_tag: 1,
            metrics,
        })
    }

    /// Claims up to a batch of unpublished rows, publishes them, waits for their confirms
    /// and marks the confirmed ones published, all inside one write-DB transaction.
    pub fn pass(&mut self, pool: &Pool) -> Result<PassOutcome> {
        let mut conn = pool.get()?;
        let claim = conn.prepared(CLAIM)?;
        let mark = conn.prepared(MARK)?;
        let mut tx = conn.client.transaction()?;
        let rows = tx.query(&claim, &[&(self.config.outbox_batch_size as i64)])?;
        if rows.is_empty() {
            tx.commit()?;
            return Ok(PassOutcome::default());
        }
        let first_tag = self.next_tag;
        let mut event_ids: Vec<String> = Vec::with_capacity(rows.len());
        for row in &rows {
            let topic: &str = row.get(1);
            let payload: &str = row.get(2);
            let event_id: String = row.get::<_, Option<String>>(3).unwrap_or_default();
            let event_type: String = row.get::<_, Option<String>>(4).unwrap_or_default();
            let created_at: chrono::DateTime<chrono::Utc> = row.get(5);
            let properties = AmqpProperties::default()
                .with_message_id(event_id.clone())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_type_(event_type)
                .with_timestamp(created_at.timestamp().max(0) as u64);
            self.channel.basic_publish(
                self.config.broker.exchange.as_str(),
                Publish {
                    body: payload.as_bytes(),
                    routing_key: topic.into(),
                    mandatory: true,
                    immediate: false,
                    properties,
                },
            )?;
            self.next_tag += 1;
            event_ids.push(event_id);
        }
        let acked = self.await_confirms(first_tag, rows.len())?;
        // A returned message is followed by its ack, so every return of this batch has
        // arrived by the time its last confirm has.
        let returned: HashSet<String> = self
            .returns
            .try_iter()
            .filter_map(|r| r.properties.message_id().clone())
            .collect();
        self.metrics.returned.add(returned.len() as u64);
        let mut published_ids: Vec<i64> = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            if acked[i] && !returned.contains(&event_ids[i]) {
                published_ids.push(row.get(0));
            }
        }
        if !returned.is_empty() {
            warn!(
                "outbox: {} messages returned unroutable; they stay in the outbox",
                returned.len()
            );
        }
        tx.execute(&mark, &[&published_ids])?;
        tx.commit()?;
        self.metrics.published.add(published_ids.len() as u64);
        self.metrics.last_batch_rows.set(rows.len() as i64);
        if let Some(h) = &self.metrics.batch_rows {
            h.observe(rows.len() as f64);
        }
        debug!(
            "outbox: published {} of {} rows",
            published_ids.len(),
            rows.len()
        );
        Ok(PassOutcome {
            claimed: rows.len(),
            published: published_ids.len(),
        })
    }

    /// Waits for the confirms of tags `first_tag..first_tag + n`; returns acked per message.
    /// Failing to hear back within the timeout abandons the channel (its tags would be out
    /// of step) and leaves the rows unpublished.
    fn await_confirms(&mut self, first_tag: u64, n: usize) -> Result<Vec<bool>> {
        let mut acked = vec![false; n];
        let mut pending = n;
        let deadline = Instant::now() + self.config.publish_confirm_timeout;
        while pending > 0 {
            let raw = match self.confirms.recv_deadline(deadline) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::unavailable(format!(
                        "no publisher confirm within {} ms",
                        self.config.publish_confirm_timeout.as_millis()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::unavailable(
                        "broker connection lost while awaiting confirms",
                    ))
                }
            };
            for confirm in self.smoother.process(raw) {
                let (payload, ok) = match confirm {
                    Confirm::Ack(p) => (p, true),
                    Confirm::Nack(p) => (p, false),
                };
                if ok {
                    self.metrics.acked.inc();
                } else {
                    self.metrics.nacked.inc();
                }
                let Some(i) = payload
                    .delivery_tag
                    .checked_sub(first_tag)
                    .map(|i| i as usize)
                else {
                    continue;
                };
                if i < n {
                    acked[i] = ok;
                    pending -= 1;
                }
            }
        }
        Ok(acked)
    }
}

const CLAIM: &str = "
SELECT id, topic, payload::text, payload->>'eventId', payload->>'eventType', created_at
FROM outbox WHERE published_at IS NULL
ORDER BY id LIMIT $1
FOR UPDATE SKIP LOCKED";

const MARK: &str = "UPDATE outbox SET published_at = now() WHERE id = ANY($1)";
