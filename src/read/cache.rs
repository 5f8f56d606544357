//! The query service's response cache. A read route's answer depends on the read model
//! alone, and only these transactions change what the read model answers: a consumer's
//! batch (either way) and its fold of pending sums into the views, a rebuild's switch, and
//! a migration. Each sends `NOTIFY read_model_changed`, which PostgreSQL delivers once it
//! commits (`src/read/projection.rs`, `src/ops/rebuild.rs`, `db::migrate`). A listener
//! thread, on a connection of its own, turns each notification into a new *generation*;
//! an entry answers only in the generation it was read in. So a response trails the read
//! database by at most the notification's way to the listener.
//!
//! Why an entry is never older than that: a request takes the generation *before* its
//! query. If a change committed before the query's snapshot, the entry holds it; if after,
//! its notification comes after the request took the generation, so the generation moves
//! on and the entry no longer answers. An entry stored after the generation moved is
//! refused. `sync-status` starts a new generation after it has read, so a client that saw
//! it caught up then reads the model it saw, from this process at least.
//!
//! The listener must hear every change. It is trusted only while it shows signs of life:
//! each notification, and a round trip after every `QUIET` without one. After `TRUSTED_FOR`
//! of neither (a connection cut off silently) every request reads the database again;
//! when its connection fails, the cache stops at once, the listener reconnects, and a new
//! generation begins once it listens again. It holds at most `QUERY_CACHE_BYTES` (keys,
//! bodies and `ENTRY_OVERHEAD` each); an answer that does not fit empties it first (so
//! keys a client makes up cannot keep others out for long). `QUERY_CACHE_BYTES=0` turns
//! it off (no listener).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use log::{info, warn};
use postgres::fallible_iterator::FallibleIterator;

use crate::db::Pool;
use crate::error::Result;
use crate::http::Response;
use crate::metrics::Counter;
use crate::shutdown::Shutdown;

/// The channel every read-model change notifies.
pub const CHANNEL: &str = "read_model_changed";
/// `NOTIFY` on it, for a transaction that changes the read model.
pub const NOTIFY: &str = "NOTIFY read_model_changed";
/// Without a notification for this long, the listener asks its connection for a round trip.
const QUIET: Duration = Duration::from_secs(1);
/// How long after its last sign of life the listener is trusted. A round trip on an idle
/// connection took up to 2.5 s on this 2-core machine with both cores saturated by
/// requests (a `psql` session and the listener alike: the server's process waits for a
/// core); with 2 s the trust lapsed under load and the requests fell through to the
/// database, whose pool first had to open its connections.
const TRUSTED_FOR: Duration = Duration::from_secs(10);
const RECONNECT_AFTER: Duration = Duration::from_millis(500);
/// Bytes an entry counts beyond its key and body (the map's slot, the strings' headers).
const ENTRY_OVERHEAD: usize = 96;

pub struct Cache {
    capacity: usize,
    epoch: Instant,
    generation: AtomicU64,
    /// Milliseconds after `epoch` until which the listener is trusted (0: not listening).
    trusted_until: AtomicU64,
    entries: RwLock<Entries>,
    pub hits: Counter,
    pub misses: Counter,
    /// Notifications heard.
    pub changes: Counter,
}

#[derive(Default)]
struct Entries {
    generation: u64,
    bytes: usize,
    map: HashMap<String, Response>,
}

impl Cache {
    pub fn new(capacity: usize) -> Arc<Cache> {
        Arc::new(Cache {
            capacity,
            epoch: Instant::now(),
            generation: AtomicU64::new(0),
            trusted_until: AtomicU64::new(0),
            entries: RwLock::default(),
            hits: Counter::default(),
            misses: Counter::default(),
            changes: Counter::default(),
        })
    }

    /// The answer for `key`: from the cache when it holds one of this generation, else from
    /// `read`, stored when it succeeded.
    pub fn through(
        &self,
        key: String,
        read: impl FnOnce() -> Result<Response>,
    ) -> Result<Response> {
        if !self.trusted() {
            return read();
        }
        let generation = self.generation.load(SeqCst);
        if let Some(hit) = self.get(&key, generation) {
            self.hits.inc();
            return Ok(hit);
        }
        self.misses.inc();
        let answer = read()?;
        self.put(key, generation, &answer);
        Ok(answer)
    }

    /// Whether the cache answers now: on, and its listener trusted.
    pub fn trusted(&self) -> bool {
        self.capacity > 0 && self.now_ms() < self.trusted_until.load(SeqCst)
    }

    /// Starts a new generation: every entry stored before stops answering.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, SeqCst);
    }

    /// Bytes held (entries of an old generation count until the next lookup drops them).
    pub fn bytes(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes
    }

    fn get(&self, key: &str, generation: u64) -> Option<Response> {
        {
            let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
            if entries.generation >= generation {
                return (entries.generation == generation)
                    .then(|| entries.map.get(key).cloned())
                    .flatten();
            }
        }
        let mut entries = self.lock();
        if entries.generation < generation {
            entries.map.clear();
            entries.bytes = 0;
            entries.generation = generation;
        }
        None
    }

    fn put(&self, key: String, generation: u64, answer: &Response) {
        let size = key.len() + answer.body.len() + ENTRY_OVERHEAD;
        let mut entries = self.lock();
        if entries.generation != generation
            || self.generation.load(SeqCst) != generation
            || size > self.capacity
        {
            return;
        }
        if entries.bytes + size > self.capacity {
            // Full: start over rather than keep what filled it (keys a client made up).
            entries.map.clear();
            entries.bytes = 0;
        }
        entries.bytes += size;
        entries.map.insert(key, answer.clone());
    }

    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn trust(&self) {
        let until = self.now_ms() + TRUSTED_FOR.as_millis() as u64;
        self.trusted_until.store(until, SeqCst);
    }

    fn distrust(&self) {
        self.trusted_until.store(0, SeqCst);
        self.invalidate();
    }
}

/// Starts the listener thread; the query service starts it (and opens its connection)
/// only when the cache is on. It ends at `shutdown` within `QUIET`, but nobody waits for
/// it: it holds nothing to hand over, and on a connection cut off silently its round trip
/// would hold a stop up until the kernel gives the connection up (30 s, `db::Manager`).
pub fn start(cache: Arc<Cache>, db: Pool, shutdown: &Shutdown) {
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("query-cache-listener".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                match listen(&cache, &db, &shutdown, &mut failing) {
                    Ok(()) => return,
                    Err(e) => {
                        cache.distrust();
                        if !failing {
                            warn!("query cache off until its listener reconnects: {e}");
                        }
                        failing = true;
                    }
                }
                if shutdown.sleep(RECONNECT_AFTER) {
                    return;
                }
            }
        })
        .expect("spawning the query cache's listener");
}

/// Listens until shutdown (Ok) or until its connection fails (Err).
fn listen(cache: &Cache, db: &Pool, shutdown: &Shutdown, failing: &mut bool) -> Result<()> {
    let mut conn = db.get()?;
    conn.client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    cache.invalidate();
    cache.trust();
    if std::mem::take(failing) {
        info!("query cache on again: its listener listens");
    }
    loop {
        let stop = {
            let mut notifications = conn.client.notifications();
            hear(cache, notifications.timeout_iter(QUIET), shutdown)?
        };
        if stop || shutdown.is_triggered() {
            return Ok(());
        }
        conn.client.simple_query("")?;
        // What came with the round trip's answer, then the listener is alive until now.
        let mut notifications = conn.client.notifications();
        hear(cache, notifications.iter(), shutdown)?;
        cache.trust();
    }
}

/// Starts a new generation for each notification `heard` yields; true when shutdown came.
fn hear<I>(cache: &Cache, mut heard: I, shutdown: &Shutdown) -> Result<bool>
where
    I: FallibleIterator<Item = postgres::Notification, Error = postgres::Error>,
{
    while heard.next()?.is_some() {
        cache.changes.inc();
        cache.invalidate();
        cache.trust();
        if shutdown.is_triggered() {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str) -> Result<Response> {
        Ok(Response::json(200, body.to_string()))
    }

    #[test]
    fn an_entry_answers_only_in_its_generation() {
        let cache = Cache::new(1 << 20);
        cache.trust();
        let body = |r: Result<Response>| r.unwrap().body;
        assert_eq!(body(cache.through("/a".into(), || answer("1"))), "1");
        assert_eq!(body(cache.through("/a".into(), || answer("2"))), "1");
        cache.invalidate();
        assert_eq!(body(cache.through("/a".into(), || answer("3"))), "3");
        // Read in one generation, stored after the next began: refused.
        let stale = cache.through("/b".into(), || {
            cache.invalidate();
            answer("old")
        });
        assert_eq!(body(stale), "old");
        assert_eq!(body(cache.through("/b".into(), || answer("new"))), "new");
        assert_eq!((cache.hits.get(), cache.misses.get()), (1, 4));
    }

    #[test]
    fn nothing_is_kept_untrusted_or_failed_and_a_full_cache_starts_over() {
        let cache = Cache::new(2 * ENTRY_OVERHEAD + 8);
        let body = |r: Result<Response>| r.unwrap().body;
        // Not listening yet: every request reads.
        assert_eq!(body(cache.through("/a".into(), || answer("1"))), "1");
        assert_eq!(body(cache.through("/a".into(), || answer("2"))), "2");
        cache.trust();
        assert!(cache
            .through("/e".into(), || Err(crate::error::Error::unavailable(
                "down"
            )))
            .is_err());
        assert_eq!(body(cache.through("/e".into(), || answer("up"))), "up");
        assert_eq!(body(cache.through("/a".into(), || answer("3"))), "3");
        assert_eq!(cache.bytes(), 2 * ENTRY_OVERHEAD + 7);
        // "/c" does not fit beside "/e" and "/a": they go, it stays.
        assert_eq!(body(cache.through("/c".into(), || answer("4"))), "4");
        assert_eq!(body(cache.through("/c".into(), || answer("5"))), "4");
        assert_eq!(body(cache.through("/a".into(), || answer("6"))), "6");
        assert_eq!(body(cache.through("/e".into(), || answer("7"))), "7");
        assert_eq!(cache.bytes(), ENTRY_OVERHEAD + 3);
        // Bigger than the whole cache: never kept.
        let big = "x".repeat(2 * ENTRY_OVERHEAD);
        assert_eq!(
            body(cache.through("/b".into(), || answer(&big))).len(),
            big.len()
        );
        assert_eq!(body(cache.through("/b".into(), || answer("8"))), "8");
        assert_eq!(body(cache.through("/e".into(), || answer("9"))), "7");
        cache.distrust();
        assert_eq!(body(cache.through("/e".into(), || answer("10"))), "10");
    }

    #[test]
    fn the_listener_is_trusted_for_a_while_after_its_last_sign_of_life() {
        let cache = Cache::new(1 << 20);
        assert!(!cache.trusted(), "not before it listens");
        cache.trust();
        assert!(cache.trusted());
        cache.trusted_until.store(cache.now_ms(), SeqCst);
        assert!(!cache.trusted(), "not after TRUSTED_FOR");
        assert!(!Cache::new(0).trusted(), "never when off");
    }
}
