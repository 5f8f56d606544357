//! What the consumer threads of this process hold and when they last applied something:
//! the stall check behind the consumer service's `/health`, and the reporter thread that
//! writes the same facts to `consumer_progress` in the read DB for sync-status.
//!
//! A delivery is "held" from the moment a consumer thread takes it (or the broker pushes it
//! into the thread's prefetch buffer) until it is acked or nacked. Held deliveries are
//! unacked on the broker, where a passive queue declare does not count them: without this
//! record a consumer stuck on a lock looks idle (lag 0, healthy). The reporter writes
//! outside the apply transactions, so the row stays current while an apply is blocked.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::ConsumerMessage;
use chrono::{DateTime, Utc};
use crossbeam_channel::{select, Receiver, Sender};
use log::warn;
use uuid::Uuid;

use crate::db::Pool;
use crate::error::Result;
use crate::shutdown::Shutdown;

/// How often the reporter writes this process's row, at least,
pub const REPORT_INTERVAL: Duration = Duration::from_millis(500);
/// and how often at most.
const WRITE_SPACING: Duration = Duration::from_millis(2);
/// Rows older than this belong to processes that are gone; readers ignore them.
pub const ROW_FRESH_SECS: i64 = 10;
/// A process whose row is older than this has stopped writing (four missed intervals): if
/// the broker still counts its consumers, what they hold is not known.
pub const ROW_SILENT_SECS: f64 = 2.0;
/// Rows of processes gone this long are deleted by any reporter,
const ROW_EXPIRY_SECS: i64 = 86_400;
/// which looks for them this often.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// One consumer thread's state.
#[derive(Default)]
struct Slot {
    /// Deliveries taken into the current batch and not yet acked or nacked.
    held: usize,
    /// The oldest event timestamp in the current batch, kept after a batch that was not
    /// applied (its deliveries go back to the broker and come again, maybe into the
    /// buffers) until a batch is applied.
    oldest_event: Option<DateTime<Utc>>,
    /// Whether the current batch was applied (`applied`), so its age may be forgotten.
    applied: bool,
    /// When the thread last made progress: took a batch or applied events.
    progress_at: Option<Instant>,
    /// The thread's consumer receivers; their length is the prefetched, untaken deliveries.
    buffers: Vec<Receiver<ConsumerMessage>>,
}

/// A summary of the process's consumers at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Consumer threads subscribed to the queues (in a session).
    pub consumers: usize,
    pub held_messages: usize,
    pub oldest_held_event: Option<DateTime<Utc>>,
    /// Why the process is stalled, if it is.
    pub stalled: Option<String>,
}

pub struct Progress {
    pub instance_id: Uuid,
    stall: Duration,
    slots: Vec<Mutex<Slot>>,
    last_applied: Mutex<Option<Instant>>,
    /// Wakes the reporter when a thread goes from idle to holding or back, or attaches or
    /// detaches (see `start_reporter`).
    changed: (Sender<()>, Receiver<()>),
}

impl Progress {
    pub fn new(threads: usize, stall: Duration) -> Arc<Progress> {
        Arc::new(Progress {
            instance_id: Uuid::new_v4(),
            stall,
            slots: (0..threads).map(|_| Mutex::default()).collect(),
            last_applied: Mutex::new(None),
            changed: crossbeam_channel::bounded(1),
        })
    }

    /// Asks the reporter to write the row now (a wake already pending covers this one).
    fn changed(&self) {
        let _ = self.changed.0.try_send(());
    }

    fn slot(&self, thread: usize) -> std::sync::MutexGuard<'_, Slot> {
        self.slots[thread].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A consumer session started on `thread` with these receivers; the guard detaches them.
    pub fn attach(&self, thread: usize, buffers: Vec<Receiver<ConsumerMessage>>) -> Attached<'_> {
        self.slot(thread).buffers = buffers;
        self.changed();
        Attached(self, thread)
    }

    /// `thread` took `n` deliveries whose oldest event is `oldest`; the guard releases them.
    pub fn hold(&self, thread: usize, n: usize, oldest: Option<DateTime<Utc>>) -> Held<'_> {
        let mut s = self.slot(thread);
        let was_idle = s.held == 0;
        s.held = n;
        // A batch not applied before may be among these, unseen yet (`None` while filling).
        s.oldest_event = match (s.oldest_event, oldest) {
            (Some(kept), Some(t)) => Some(kept.min(t)),
            (kept, t) => kept.or(t),
        };
        s.applied = false;
        s.progress_at = Some(Instant::now());
        drop(s);
        // Only from idle to holding: a batch that replaces the one being filled is written
        // at the next interval (a draining consumer would otherwise write at every step).
        if was_idle {
            self.changed();
        }
        Held(self, thread)
    }

    /// `thread`'s batch being filled holds `n` deliveries (after `hold`, which woke the
    /// reporter; each further delivery does not).
    pub fn filling(&self, thread: usize, n: usize) {
        self.slot(thread).held = n;
    }

    /// `thread` committed a transaction that applied events.
    pub fn applied(&self, thread: usize) {
        let now = Instant::now();
        let mut s = self.slot(thread);
        s.progress_at = Some(now);
        s.applied = true;
        drop(s);
        *self.last_applied.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    }

    /// When any thread of this process last applied events.
    pub fn last_applied(&self) -> Option<Instant> {
        *self.last_applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stall(&self) -> Duration {
        self.stall
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot {
            consumers: 0,
            held_messages: 0,
            oldest_held_event: None,
            stalled: None,
        };
        for (i, slot) in self.slots.iter().enumerate() {
            let s = slot.lock().unwrap_or_else(|e| e.into_inner());
            let buffered: usize = s.buffers.iter().map(Receiver::len).sum();
            snap.consumers += usize::from(!s.buffers.is_empty());
            snap.held_messages += s.held + buffered;
            if s.held + buffered == 0 {
                continue;
            }
            // Between batches only the buffers hold anything: of their ages, what is known
            // is that of a batch not applied, which came back.
            if let Some(t) = s.oldest_event {
                snap.oldest_held_event = Some(snap.oldest_held_event.map_or(t, |o| o.min(t)));
            }
            if s.held == 0 {
                continue;
            }
            let idle = s.progress_at.map_or(Duration::ZERO, |t| t.elapsed());
            if idle >= self.stall && snap.stalled.is_none() {
                snap.stalled = Some(format!(
                    "consumer stalled: thread {i} has held {} deliveries for {} s without applying any",
                    s.held + buffered,
                    idle.as_secs()
                ));
            }
        }
        snap
    }
}

/// Detaches a session's receivers when the session ends.
pub struct Attached<'a>(&'a Progress, usize);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        let mut s = self.0.slot(self.1);
        s.buffers.clear();
        s.held = 0;
        s.oldest_event = None;
        drop(s);
        self.0.changed();
    }
}

/// Releases a batch's deliveries once they are acked or nacked (or the session ends).
pub struct Held<'a>(&'a Progress, usize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut s = self.0.slot(self.1);
        let was_holding = s.held > 0;
        s.held = 0;
        if s.applied {
            s.oldest_event = None;
        }
        drop(s);
        if was_holding {
            self.0.changed();
        }
    }
}

/// Starts the thread that writes this process's row when a consumer thread goes from idle
/// to holding a batch or back, and at least every `REPORT_INTERVAL`, and deletes it at
/// shutdown. Written only on the interval, the row missed what an idle consumer took and
/// applied between two writes: sync-status then said nothing was pending while those
/// events were unapplied (1 of 20 bursts of a burst-then-poll check, once its stages were
/// asked in order). Now the row trails that change by one write, and by up to
/// `WRITE_SPACING` when the last write was that recent: the time an event is in no stage,
/// since the broker stops counting a message as ready when it hands it to us. Sync-status
/// finds such events by id (`QueryService::unseen`).
pub fn start_reporter(pool: Pool, progress: Arc<Progress>, shutdown: &Shutdown) -> JoinHandle<()> {
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("consumer-progress".into())
        .spawn(move || {
            let mut expired_at: Option<Instant> = None;
            loop {
                let expire = expired_at.is_none_or(|t| t.elapsed() >= EXPIRE_EVERY);
                if expire {
                    expired_at = Some(Instant::now());
                }
                if let Err(e) = report(&pool, &progress, expire) {
                    warn!("could not record consumer progress: {e}");
                }
                // At most one write per WRITE_SPACING: a consumer whose batches are single
                // events goes idle and back hundreds of times a second. A change meanwhile
                // waits in the channel.
                if shutdown.sleep(WRITE_SPACING) {
                    break;
                }
                select! {
                    recv(progress.changed.1) -> _ => {}
                    recv(shutdown.receiver()) -> _ => break,
                    default(REPORT_INTERVAL) => {}
                }
            }
            if let Err(e) = forget(&pool, progress.instance_id) {
                warn!("could not delete this consumer's progress row: {e}");
            }
        })
        .expect("spawning the consumer progress thread")
}

fn report(pool: &Pool, progress: &Progress, expire: bool) -> Result<()> {
    let snap = progress.snapshot();
    let mut conn = pool.get()?;
    let held = i32::try_from(snap.held_messages).unwrap_or(i32::MAX);
    let consumers = i32::try_from(snap.consumers).unwrap_or(i32::MAX);
    let stmt = conn.prepared(UPSERT_PROGRESS)?;
    conn.client.execute(
        &stmt,
        &[
            &progress.instance_id,
            &held,
            &snap.oldest_held_event,
            &snap.stalled,
            &consumers,
        ],
    )?;
    if expire {
        let stmt = conn.prepared(EXPIRE_PROGRESS)?;
        conn.client.execute(&stmt, &[&(ROW_EXPIRY_SECS as f64)])?;
    }
    Ok(())
}

fn forget(pool: &Pool, instance_id: Uuid) -> Result<()> {
    let mut conn = pool.get()?;
    conn.client.execute(
        "DELETE FROM consumer_progress WHERE instance_id = $1",
        &[&instance_id],
    )?;
    Ok(())
}

const UPSERT_PROGRESS: &str = "
INSERT INTO consumer_progress AS p (instance_id, held_messages, oldest_held_event_at, stalled_reason, consumers, updated_at)
VALUES ($1, $2, $3, $4, $5, now())
ON CONFLICT (instance_id) DO UPDATE SET
    held_messages = excluded.held_messages,
    oldest_held_event_at = excluded.oldest_held_event_at,
    stalled_reason = excluded.stalled_reason,
    consumers = excluded.consumers,
    updated_at = excluded.updated_at";

const EXPIRE_PROGRESS: &str =
    "DELETE FROM consumer_progress WHERE updated_at < now() - make_interval(secs => $1)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_batch_without_progress_is_a_stall_and_idle_is_not() {
        let p = Progress::new(2, Duration::from_millis(20));
        assert_eq!(p.snapshot().stalled, None);
        let t = crate::event::now_millis();
        let held = p.hold(1, 3, Some(t));
        let s = p.snapshot();
        assert_eq!((s.held_messages, s.oldest_held_event), (3, Some(t)));
        assert_eq!(s.stalled, None);
        std::thread::sleep(Duration::from_millis(30));
        assert!(p.snapshot().stalled.unwrap().contains("thread 1"));
        p.applied(1);
        assert_eq!(p.snapshot().stalled, None);
        drop(held);
        let s = p.snapshot();
        assert_eq!((s.held_messages, s.stalled), (0, None));
    }

    /// A batch that was not applied goes back to the broker and comes again into the
    /// buffers: between batches they hold it, and its age stays the lag until a batch is
    /// applied. It was forgotten: sync-status showed 4 pending and a lag of 0.
    #[test]
    fn a_batch_not_applied_keeps_its_age_until_one_is() {
        let p = Progress::new(1, Duration::from_secs(60));
        let (tx, rx) = crossbeam_channel::unbounded();
        let _attached = p.attach(0, vec![rx]);
        let old = crate::event::now_millis() - chrono::Duration::seconds(5);
        drop(p.hold(0, 2, Some(old)));
        tx.send(ConsumerMessage::ClientCancelled).unwrap();
        tx.send(ConsumerMessage::ClientCancelled).unwrap();
        let s = p.snapshot();
        assert_eq!((s.held_messages, s.oldest_held_event), (2, Some(old)));
        // Taken again while filling (age not read yet), then with the batch's own ages.
        let filling = p.hold(0, 1, None);
        assert_eq!(p.snapshot().oldest_held_event, Some(old));
        let newer = crate::event::now_millis();
        let held = p.hold(0, 2, Some(newer));
        assert_eq!(p.snapshot().oldest_held_event, Some(old));
        p.applied(0);
        drop(held);
        drop(filling);
        p.slot(0).buffers[0].try_iter().for_each(drop); // taken into the applied batch
        assert_eq!(p.snapshot().oldest_held_event, None);
        // An applied batch leaves no age behind for what arrives next.
        let held = p.hold(0, 1, Some(newer));
        p.applied(0);
        drop(held);
        tx.send(ConsumerMessage::ClientCancelled).unwrap();
        assert_eq!(p.snapshot().oldest_held_event, None);
    }
}
