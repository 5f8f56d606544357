//! The outbox publisher: moves committed outbox rows to RabbitMQ without ever losing one.
//!
//! One pass claims a batch with `FOR UPDATE SKIP LOCKED` (so any number of publishers, in
//! any number of processes, never publish the same row at the same time), publishes every
//! row as a persistent, mandatory message, waits for the broker's confirms for the whole
//! batch at once (one confirm at a time would cap us at a few dozen messages per second),
//! and marks published only the rows the broker acked and did not return. Everything else
//! stays unpublished and is retried. A message may be published twice (a crash between
//! the confirm and our commit); the consumer's idempotency makes that harmless.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use amiquip::{AmqpProperties, Channel, Confirm, ConfirmSmoother, Publish, Return};
use crossbeam_channel::{select, Receiver, Sender};
use log::{debug, info, warn};
use uuid::Uuid;

use crate::broker::{self, Endpoints, LinkStatus};
use crate::config::Config;
use crate::db::{self, Pool, Tx};
use crate::error::{Error, Result};
use crate::metrics::{Counter, Histogram, BATCH_BOUNDS};
use crate::shutdown::Shutdown;
use crate::supervise::{self, Supervision};

pub struct OutboxMetrics {
    pub published: Counter,
    pub acked: Counter,
    pub nacked: Counter,
    pub returned: Counter,
    pub session_errors: Counter,
    pub batch_rows: Histogram,
}

impl OutboxMetrics {
    pub fn new() -> OutboxMetrics {
        OutboxMetrics {
            published: Counter::default(),
            acked: Counter::default(),
            nacked: Counter::default(),
            returned: Counter::default(),
            session_errors: Counter::default(),
            batch_rows: Histogram::new(BATCH_BOUNDS),
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
        self.batch_rows.render(out, "outbox_batch_rows");
    }
}

impl Default for OutboxMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How the command service tells the publishers of its process about its commits: the
/// event ids committed since a publisher last claimed, and a token that wakes one of them.
///
/// The ids spare a claim that would find nothing. A commit is visible to the database
/// before its thread gets the answer and sends the token; a claim that starts in between
/// takes the row, and the token then asked for a claim with nothing left to take (52–73 % of
/// all claims, under orders from 32 clients). A publisher that finds every id it was told
/// about among those it has claimed itself goes back to waiting; any other id, or ids
/// dropped because too many piled up, make it claim. Taking the ids just before a claim
/// is safe: their commits happened before it began, so it sees their rows.
pub struct Wake {
    committed: Mutex<Committed>,
    tx: Sender<()>,
    rx: Receiver<()>,
}

#[derive(Default)]
struct Committed {
    ids: Vec<Uuid>,
    /// More ids came than `COMMITTED_MAX` since the last claim: the next wake-up claims.
    overflow: bool,
}

/// Ids kept between two claims at most; more only make the next wake-up claim.
const COMMITTED_MAX: usize = 4096;

impl Wake {
    pub fn new() -> Arc<Wake> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        Arc::new(Wake {
            committed: Mutex::default(),
            tx,
            rx,
        })
    }

    /// Called after the commit of the outbox row of `event_id`. Never blocks for long.
    pub fn committed(&self, event_id: Uuid) {
        {
            let mut c = self.lock();
            if c.ids.len() < COMMITTED_MAX {
                c.ids.push(event_id);
            } else {
                c.overflow = true;
            }
        }
        let _ = self.tx.try_send(());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Committed> {
        self.committed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Just before a claim: every commit announced so far is visible to it.
    fn claiming(&self) {
        let mut c = self.lock();
        c.ids.clear();
        c.overflow = false;
    }

    /// After a wake-up: whether a commit announced since the last claim may have left a row
    /// that no claim in `claimed` (event ids this publisher took) has taken.
    fn needs_claim(&self, claimed: &HashSet<Uuid>) -> bool {
        let mut c = self.lock();
        let needed = c.overflow || c.ids.iter().any(|id| !claimed.contains(id));
        if !needed {
            c.ids.clear();
        }
        needed
    }
}

/// Event ids of its own claims a publisher remembers, for `Wake::needs_claim` (those of the
/// latest claims; forgetting one costs at most a claim that finds nothing).
const CLAIMED_REMEMBERED: usize = 4096;

/// Starts `config.outbox_publishers` publisher threads. `wake` tells them about each
/// commit in this process; the poll interval covers rows written by other processes.
pub fn start(
    config: &Config,
    pool: Pool,
    wake: Arc<Wake>,
    shutdown: &Shutdown,
    metrics: Arc<OutboxMetrics>,
    link: Arc<LinkStatus>,
    supervision: &Arc<Supervision>,
) -> Vec<JoinHandle<()>> {
    let backoff_max = config.broker_reconnect_max;
    supervise::spawn(
        "publisher",
        config.outbox_publishers,
        shutdown,
        backoff_max,
        supervision,
        |_| {
            let (config, pool, wake, metrics) =
                (config.clone(), pool.clone(), wake.clone(), metrics.clone());
            let mut endpoints = Endpoints::new(&config, link.clone());
            let supervision = supervision.clone();
            move |shutdown: &Shutdown| {
                Publisher::session(
                    &config,
                    &pool,
                    &wake,
                    shutdown,
                    &metrics,
                    &mut endpoints,
                    &supervision,
                )
                .inspect_err(|_| metrics.session_errors.inc())
            }
        },
    )
}

/// Batches one publisher keeps in flight: while the broker confirms one, the next is
/// already claimed and published, so the database's work hides behind the broker's.
/// A publisher holds one more connection: a confirmed batch is marked while the next one
/// is in flight.
pub const BATCHES_IN_FLIGHT: usize = 2;

/// One broker connection's worth of publishing.
pub struct Publisher<'a> {
    config: &'a Config,
    channel: Channel,
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
    smoother: ConfirmSmoother,
    next_tag: u64,
    /// Confirms received for tags whose batch is not complete yet: tag → acked.
    confirmed: HashMap<u64, bool>,
    /// Message ids the broker returned as unroutable, until their batch completes.
    returned: HashSet<String>,
    metrics: &'a OutboxMetrics,
    claim_sql: String,
    /// When the channel was opened, first published to, and last confirmed: for the logs,
    /// which say how long a fresh channel took to confirm anything (after a failover) and
    /// how long a stalled one had been silent.
    opened_at: Instant,
    first_published_at: Option<Instant>,
    last_confirm_at: Option<Instant>,
    /// The highest delivery tag confirmed so far (0: none).
    confirmed_up_to: u64,
    /// Event ids of this publisher's latest claims (`Wake::needs_claim`).
    claimed: HashSet<Uuid>,
}

/// A claimed and published batch, waiting for its confirms. Its rows stay locked by the
/// open transaction; dropping the batch unfinished rolls that back, so the rows are simply
/// claimed again later.
struct InFlight {
    tx: Tx,
    ids: Vec<i64>,
    event_ids: Vec<String>,
    first_tag: u64,
    /// When its first message was handed to the broker: its confirms are due
    /// `publish_confirm_timeout` after this, however often the publisher is woken meanwhile.
    published_at: Instant,
}

impl<'a> Publisher<'a> {
    fn session(
        config: &Config,
        pool: &Pool,
        wake: &Wake,
        shutdown: &Shutdown,
        metrics: &OutboxMetrics,
        endpoints: &mut Endpoints,
        supervision: &Supervision,
    ) -> Result<()> {
        let mut link = endpoints.connect(config)?;
        let mut publisher = link.within(
            config.broker_stall_timeout,
            "opening the publisher's channel",
            |connection| Publisher::new(config, connection.open_channel(None)?, metrics),
        )?;
        link.in_use();
        info!("outbox publisher publishing to {}", link.endpoint);
        let mut claim = true;
        let mut publish = || loop {
            supervision.checkpoint("publisher");
            if shutdown.is_triggered() {
                return publisher.drain_before_exit(pool, wake);
            }
            if claim {
                publisher.drain(pool, wake, &|| shutdown.is_triggered())?;
            }
            // Every confirm has arrived: the confirms channel only closes now, when the
            // connection is lost, which an idle publisher thus notices at once.
            claim = select! {
                recv(wake.rx) -> _ => wake.needs_claim(&publisher.claimed),
                recv(publisher.confirms) -> c => if c.is_err() {
                    return Err(Error::unavailable("broker connection lost"));
                } else {
                    false
                },
                recv(shutdown.receiver()) -> _ => true,
                default(config.outbox_poll_interval) => true,
            };
        };
        let result = publish();
        if result.is_err() {
            // The channel may be stuck on the broker: closing it would wait for an answer.
            link.cut();
        }
        result
    }

    /// At shutdown (which comes after the HTTP servers have finished their last requests):
    /// publishes what is still unpublished, until the outbox is empty or
    /// `SHUTDOWN_DRAIN_TIMEOUT_MS` has passed. What is left is published at the next start.
    fn drain_before_exit(&mut self, pool: &Pool, wake: &Wake) -> Result<()> {
        let deadline = Instant::now() + self.config.shutdown_drain_timeout;
        self.drain(pool, wake, &|| Instant::now() >= deadline)?;
        info!("outbox publisher: drained before exit");
        Ok(())
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
            confirmed: HashMap::new(),
            returned: HashSet::new(),
            metrics,
            claim_sql: claim_sql(config.outbox_batch_size_max),
            opened_at: Instant::now(),
            first_published_at: None,
            last_confirm_at: None,
            confirmed_up_to: 0,
            claimed: HashSet::new(),
        })
    }

    /// Publishes everything claimable now, up to `BATCHES_IN_FLIGHT` batches at a time, and
    /// returns when the outbox has no more claimable rows (or a batch came back with rows
    /// the broker refused: those wait for the next poll instead of being retried hot).
    /// A commit that wakes us while we wait for confirms is claimed at once if the window
    /// has room: a new order never waits for an earlier one's confirm.
    /// Claims no further batch once `stop_claiming` says so (the batches in flight finish).
    pub fn drain(
        &mut self,
        pool: &Pool,
        wake: &Wake,
        stop_claiming: &dyn Fn() -> bool,
    ) -> Result<()> {
        let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(BATCHES_IN_FLIGHT);
        let mut exhausted = false;
        loop {
            self.fill_window(pool, wake, &mut in_flight, &mut exhausted, stop_claiming)?;
            let Some(oldest) = in_flight.front() else {
                self.returned.clear();
                return Ok(());
            };
            let room = in_flight.len() < BATCHES_IN_FLIGHT;
            let woken = room.then_some(&wake.rx);
            if self.await_confirms(
                oldest.first_tag,
                oldest.ids.len(),
                oldest.published_at,
                woken,
            )? == Waited::Woken
            {
                exhausted &= !wake.needs_claim(&self.claimed);
                continue;
            }
            // The next batch goes to the broker before this one is marked, so the broker
            // has a full window while the database marks (the rows marked are still
            // locked: the claim skips them).
            let batch = in_flight.pop_front().expect("the oldest batch");
            if wake.rx.try_recv().is_ok() && wake.needs_claim(&self.claimed) {
                exhausted = false; // a commit since: its rows need not wait for the marking
            }
            self.fill_window(pool, wake, &mut in_flight, &mut exhausted, stop_claiming)?;
            let claimed = batch.ids.len();
            let published = self.complete(batch)?;
            if published < claimed {
                exhausted = true;
            }
        }
    }

    /// Claims and publishes batches until `BATCHES_IN_FLIGHT` are in flight or the outbox
    /// has nothing more to claim.
    fn fill_window(
        &mut self,
        pool: &Pool,
        wake: &Wake,
        in_flight: &mut VecDeque<InFlight>,
        exhausted: &mut bool,
        stop_claiming: &dyn Fn() -> bool,
    ) -> Result<()> {
        while !*exhausted && in_flight.len() < BATCHES_IN_FLIGHT && !stop_claiming() {
            wake.claiming();
            match self.claim_and_publish(pool)? {
                Some(batch) => {
                    *exhausted = batch.ids.len() < self.config.outbox_batch_size_max;
                    in_flight.push_back(batch);
                }
                None => *exhausted = true,
            }
        }
        Ok(())
    }

    /// Claims up to a batch of unpublished rows in a new transaction and publishes them.
    /// `BEGIN` and the claim go in one round trip: it is on the way of every event.
    fn claim_and_publish(&mut self, pool: &Pool) -> Result<Option<InFlight>> {
        let (tx, rows) = Tx::begin_with(pool, pool.get()?, "outbox_claim", &self.claim_sql)?;
        if rows.is_empty() {
            tx.commit()?;
            return Ok(None);
        }
        if self.claimed.len() + rows.len() > CLAIMED_REMEMBERED {
            self.claimed.clear();
        }
        let mut batch = InFlight {
            tx,
            ids: Vec::with_capacity(rows.len()),
            event_ids: Vec::with_capacity(rows.len()),
            first_tag: self.next_tag,
            published_at: Instant::now(),
        };
        self.first_published_at.get_or_insert(batch.published_at);
        for row in &rows {
            let claimed = Claimed::from_row(row)?;
            let properties = AmqpProperties::default()
                .with_message_id(claimed.event_id.to_owned())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_type_(claimed.event_type.to_owned())
                .with_timestamp(claimed.created_at);
            self.channel.basic_publish(
                self.config.broker.exchange.as_str(),
                Publish {
                    body: claimed.payload.as_bytes(),
                    routing_key: claimed.topic.into(),
                    mandatory: true,
                    immediate: false,
                    properties,
                },
            )?;
            self.next_tag += 1;
            batch.ids.push(claimed.id);
            batch.event_ids.push(claimed.event_id.to_owned());
            if let Ok(id) = Uuid::try_parse(claimed.event_id) {
                self.claimed.insert(id);
            }
        }
        Ok(Some(batch))
    }

    /// Waits for a batch's confirms, marks the rows the broker acked and did not return as
    /// published, and commits, the mark and the commit in one round trip. Returns how many
    /// were published.
    fn complete(&mut self, batch: InFlight) -> Result<usize> {
        let n = batch.ids.len();
        // `drain` waited for every confirm of this batch.
        let acked: Vec<bool> = (batch.first_tag..batch.first_tag + n as u64)
            .map(|t| self.confirmed.remove(&t).unwrap_or(false))
            .collect();
        // A returned message is followed by its ack, so every return of this batch has
        // arrived by the time its last confirm has.
        let returns: Vec<String> = self
            .returns
            .try_iter()
            .filter_map(|r| r.properties.message_id().clone())
            .collect();
        self.metrics.returned.add(returns.len() as u64);
        self.returned.extend(returns);
        let mut published_ids: Vec<i64> = Vec::with_capacity(n);
        let (mut nacked, mut returned) = (0, 0);
        for (i, id) in batch.ids.iter().enumerate() {
            if !acked[i] {
                nacked += 1;
            } else if self.returned.remove(&batch.event_ids[i]) {
                returned += 1;
            } else {
                published_ids.push(*id);
            }
        }
        if nacked + returned > 0 {
            warn!("outbox: the broker refused (nack) {nacked} and returned {returned} messages; they stay in the outbox");
        }
        let args = format!("({})", db::array_literal(&published_ids));
        batch.tx.execute_and_commit("outbox_mark", MARK, &args)?;
        self.metrics.published.add(published_ids.len() as u64);
        self.metrics.batch_rows.observe(n as f64);
        debug!("outbox: published {} of {n} rows", published_ids.len());
        Ok(published_ids.len())
    }

    /// Waits until the confirms of tags `first_tag..first_tag + n`, published at
    /// `published_at`, have all arrived (they are kept in `confirmed`, with those of later
    /// batches), or until `wake` has a token. Gives the channel up (its tags would be out of
    /// step; the rows stay unpublished) when the batch is not confirmed within
    /// `PUBLISH_CONFIRM_TIMEOUT_MS` of its publishing (however often we are woken
    /// meanwhile), or when no confirm at all has come for `BROKER_STALL_TIMEOUT_MS` while
    /// it waits: a slow broker keeps confirming something, a stuck channel nothing.
    fn await_confirms(
        &mut self,
        first_tag: u64,
        n: usize,
        published_at: Instant,
        wake: Option<&Receiver<()>>,
    ) -> Result<Waited> {
        let end = first_tag + n as u64;
        let due = published_at + self.config.publish_confirm_timeout;
        let never = crossbeam_channel::never();
        let wake = wake.unwrap_or(&never);
        while !(first_tag..end).all(|t| self.confirmed.contains_key(&t)) {
            let heard = self
                .last_confirm_at
                .map_or(published_at, |t| t.max(published_at));
            let stalled = heard + self.config.broker_stall_timeout;
            let raw = select! {
                recv(self.confirms) -> c => match c {
                    Ok(c) => c,
                    Err(_) => return Err(Error::unavailable(
                        "broker connection lost while awaiting confirms",
                    )),
                },
                recv(wake) -> _ => return Ok(Waited::Woken),
                default(due.min(stalled).saturating_duration_since(Instant::now())) => {
                    let what = if due <= stalled {
                        ("a batch unconfirmed", self.config.publish_confirm_timeout)
                    } else {
                        ("no confirm at all", self.config.broker_stall_timeout)
                    };
                    return Err(Error::unavailable(format!(
                        "{} for {} ms; {}",
                        what.0,
                        what.1.as_millis(),
                        self.confirms_so_far()
                    )));
                }
            };
            if let (None, Some(first)) = (self.last_confirm_at, self.first_published_at) {
                info!(
                    "outbox publisher: first confirm {} ms after the channel's first publish",
                    first.elapsed().as_millis()
                );
            }
            self.last_confirm_at = Some(Instant::now());
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
                self.confirmed.insert(payload.delivery_tag, ok);
                self.confirmed_up_to = self.confirmed_up_to.max(payload.delivery_tag);
            }
        }
        Ok(Waited::Confirmed)
    }

    /// What this channel has been confirmed so far, for the error that abandons it.
    fn confirms_so_far(&self) -> String {
        let opened_ms = self.opened_at.elapsed().as_millis();
        match self.last_confirm_at {
            None => format!(
                "the channel, opened {opened_ms} ms ago, has confirmed none of {} messages",
                self.next_tag - 1
            ),
            Some(t) => format!(
                "the channel, opened {opened_ms} ms ago, confirmed {} of {} messages, the last {} ms ago",
                self.confirmed_up_to,
                self.next_tag - 1,
                t.elapsed().as_millis()
            ),
        }
    }
}

/// Why `await_confirms` returned.
#[derive(Debug, PartialEq, Eq)]
enum Waited {
    Confirmed,
    Woken,
}

/// The claim query (`Tx::begin_with`: its rows come back as text). The batch size is a
/// literal, not a parameter: with `LIMIT $1` the generic plan PostgreSQL settled on after
/// five executions sorted the whole backlog (spilling to disk) instead of walking the
/// partial index, which made publishing a large backlog quadratic. Measured with
/// `cargo bench --bench pipeline`.
pub fn claim_sql(batch_size: usize) -> String {
    format!(
        "SELECT id, topic, payload::text, payload->>'eventId', payload->>'eventType',
                extract(epoch FROM created_at)::bigint
         FROM outbox WHERE published_at IS NULL
         ORDER BY id LIMIT {batch_size}
         FOR UPDATE SKIP LOCKED"
    )
}

/// One claimed row, read from the claim's text columns.
struct Claimed<'r> {
    id: i64,
    topic: &'r str,
    payload: &'r str,
    /// Empty for a row written before events carried ids (never, since write migration 1).
    event_id: &'r str,
    event_type: &'r str,
    /// Seconds since the epoch (0 for a time before it).
    created_at: u64,
}

impl<'r> Claimed<'r> {
    fn from_row(row: &'r postgres::SimpleQueryRow) -> Result<Claimed<'r>> {
        let text = |i: usize| -> Result<&'r str> {
            row.get(i)
                .ok_or_else(|| Error::internal(format!("outbox claim: column {i} is NULL")))
        };
        let parse = |i: usize| -> Result<i64> {
            text(i)?
                .parse()
                .map_err(|e| Error::internal(format!("outbox claim: column {i}: {e}")))
        };
        Ok(Claimed {
            id: parse(0)?,
            topic: text(1)?,
            payload: text(2)?,
            event_id: row.get(3).unwrap_or_default(),
            event_type: row.get(4).unwrap_or_default(),
            created_at: parse(5)?.max(0) as u64,
        })
    }
}

const MARK: &str = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_up_claims_only_for_commits_no_claim_of_ours_took() {
        let wake = Wake::new();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut claimed = HashSet::new();
        // A token with no id left: a claim since took the ids, and saw their rows.
        assert!(!wake.needs_claim(&claimed));
        wake.committed(a);
        assert!(wake.needs_claim(&claimed), "a commit no claim of ours took");
        assert!(
            wake.needs_claim(&claimed),
            "asking again does not forget it"
        );
        claimed.insert(a);
        assert!(!wake.needs_claim(&claimed), "its row was claimed already");
        wake.committed(a);
        wake.committed(b);
        assert!(wake.needs_claim(&claimed), "one of two ids is not claimed");
        wake.claiming();
        assert!(
            !wake.needs_claim(&HashSet::new()),
            "a claim covers every commit announced before it began"
        );
        for _ in 0..=COMMITTED_MAX {
            wake.committed(a);
        }
        assert!(
            wake.needs_claim(&claimed),
            "ids dropped because too many piled up: claim"
        );
        wake.claiming();
        assert!(!wake.needs_claim(&claimed));
    }
}
