//! One way to run a background thread: a supervisor loop that runs a worker's session,
//! and after a failure waits (exponential backoff) and runs a new one, until shutdown.
//! The outbox publishers and the consumers are such workers; `Backoff` is also the one
//! backoff of every other retry loop (the consumer's database retries, migrations).
//!
//! `run` is the single place where a worker's body is run and re-run: supervision
//! policy (what counts as healthy, what is logged, what is counted) lives here only.

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, warn};

use crate::error::{panic_message, Error, Result};
use crate::http::{Request, Response, Service};
use crate::shutdown::Shutdown;

/// Waits that start at `initial` and double up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A first wait above `max` is `max` (`BROKER_RECONNECT_MAX_MS` may be below the
    /// fixed first wait of 100 ms: the waits went 100 ms, then 10 ms).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.min(max);
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next attempt; each call doubles the one after, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Starts over from `initial` (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// What the supervisors of one process have seen, by role: restarts after a panic, and
/// threads down right now (panicked, waiting out the backoff before their next session).
/// The services' `/health` and `/metrics` read it (`Supervised`).
#[derive(Default)]
pub struct Supervision {
    roles: Mutex<BTreeMap<&'static str, RoleState>>,
    /// Panics a test asked for, by role (`inject_panic`); `injected_any` keeps the check
    /// in the workers' loops to one atomic load when there are none.
    injected: Mutex<BTreeMap<&'static str, u32>>,
    injected_any: AtomicBool,
}

#[derive(Default, Clone, Copy)]
struct RoleState {
    restarts: u64,
    down: usize,
}

impl Supervision {
    fn update(&self, role: &'static str, f: impl FnOnce(&mut RoleState)) {
        let mut roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        f(roles.entry(role).or_default());
    }

    /// The roles with a thread down now.
    pub fn down(&self) -> Vec<&'static str> {
        let roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        roles
            .iter()
            .filter(|(_, s)| s.down > 0)
            .map(|(r, _)| *r)
            .collect()
    }

    /// `thread_restarts_total{role=...}` for the supervised roles among `only`.
    pub fn render(&self, out: &mut String, only: &[&str]) {
        use std::fmt::Write;
        let roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str("# TYPE thread_restarts_total counter\n");
        for (role, state) in roles.iter().filter(|(role, _)| only.contains(role)) {
            let _ = writeln!(
                out,
                "thread_restarts_total{{role=\"{role}\"}} {}",
                state.restarts
            );
        }
    }

    /// For tests only: the next `times` calls of `checkpoint(role)` panic, as a bug in that
    /// worker would. Nothing else calls it; production code only ever checks.
    #[doc(hidden)]
    pub fn inject_panic(&self, role: &'static str, times: u32) {
        let mut injected = self.injected.lock().unwrap_or_else(|e| e.into_inner());
        *injected.entry(role).or_default() += times;
        self.injected_any.store(true, Ordering::SeqCst);
    }

    /// Called by a worker once per loop; panics if a test injected a panic for `role`.
    pub fn checkpoint(&self, role: &'static str) {
        if !self.injected_any.load(Ordering::Relaxed) {
            return;
        }
        let mut injected = self.injected.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = injected.get_mut(role).filter(|n| **n > 0) {
            *n -= 1;
            drop(injected);
            panic!("{role}: a panic injected by a test");
        }
    }
}

/// A service whose `/health` is 503 while a supervised thread of the process is down, and
/// whose `/metrics` add the restart counts.
pub struct Supervised<S> {
    pub inner: S,
    pub supervision: Arc<Supervision>,
    /// The roles whose threads this service runs, for its /metrics: in `all`, each port
    /// shows its own (the same process-wide counts on the three ports added up to three
    /// times the restarts).
    pub roles: &'static [&'static str],
}

impl<S: Service> Service for Supervised<S> {
    fn handle(&self, req: &Request) -> (&'static str, Result<Response>) {
        self.inner.handle(req)
    }

    fn health(&self) -> Result<()> {
        match self.supervision.down().first() {
            Some(role) => Err(Error::unavailable(format!(
                "a {role} thread panicked and is being restarted"
            ))),
            None => self.inner.health(),
        }
    }

    fn health_details(&self) -> serde_json::Map<String, serde_json::Value> {
        self.inner.health_details()
    }

    fn metrics(&self, out: &mut String) {
        self.inner.metrics(out);
        self.supervision.render(out, self.roles);
    }
}

/// A session that ran this long was healthy: the backoff starts over after it fails.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// The first wait after a failed session.
const SESSION_BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// Starts `count` threads named `{role}-{i}`; thread `i` runs the session `make(i)` returns
/// under [`run`], waiting at most `backoff_max` between sessions.
pub fn spawn<S>(
    role: &'static str,
    count: usize,
    shutdown: &Shutdown,
    backoff_max: Duration,
    supervision: &Arc<Supervision>,
    make: impl Fn(usize) -> S,
) -> Vec<JoinHandle<()>>
where
    S: FnMut(&Shutdown) -> Result<()> + Send + 'static,
{
    supervision.update(role, |_| {});
    (0..count)
        .map(|i| {
            let session = make(i);
            let shutdown = shutdown.clone();
            let supervision = supervision.clone();
            std::thread::Builder::new()
                .name(format!("{role}-{i}"))
                .spawn(move || run(role, &shutdown, backoff_max, &supervision, session))
                .unwrap_or_else(|e| panic!("spawning thread {role}-{i}: {e}"))
        })
        .collect()
}

/// Runs `session` until it returns Ok (a clean stop, at shutdown) or shutdown is
/// triggered. After an error or a panic (caught here, logged with its message, counted in
/// `thread_restarts_total`, and shown by `/health` until the next session starts), waits
/// with backoff (100 ms doubling up to `backoff_max`, starting over after a session that
/// ran for a while) and runs a new session.
pub fn run(
    role: &'static str,
    shutdown: &Shutdown,
    backoff_max: Duration,
    supervision: &Supervision,
    mut session: impl FnMut(&Shutdown) -> Result<()>,
) {
    let mut backoff = Backoff::new(SESSION_BACKOFF_INITIAL, backoff_max);
    let mut repeats = Repeats::default();
    while !shutdown.is_triggered() {
        let started = Instant::now();
        let failure = match panic::catch_unwind(AssertUnwindSafe(|| session(shutdown))) {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(payload) => {
                supervision.update(role, |s| {
                    s.restarts += 1;
                    s.down += 1;
                });
                format!("panicked: {}", panic_message(&*payload))
            }
        };
        let panicked = failure.starts_with("panicked: ");
        if started.elapsed() > HEALTHY_SESSION {
            backoff.reset();
        }
        let wait = backoff.next_wait();
        if panicked {
            error!("{role}: {failure}; restarting in {} ms", wait.as_millis());
        } else if let Some(again) = repeats.log(&failure, Instant::now()) {
            let again = match again {
                0 => String::new(),
                n => format!(" (it failed so {n} more times since this was last logged)"),
            };
            warn!(
                "{role}: {failure}; retrying in {} ms{again}",
                wait.as_millis()
            );
        }
        let stopping = shutdown.sleep(wait);
        if panicked {
            supervision.update(role, |s| s.down -= 1);
        }
        if stopping {
            return;
        }
    }
}

/// One thread's failures as logged: the same failure is logged again only after
/// `REPEAT_LOG_INTERVAL`, with how often it recurred meanwhile. With a broker down and a
/// short backoff, every retry was a line (about 195 a second).
#[derive(Default)]
struct Repeats {
    last: Option<(String, Instant)>,
    unlogged: u64,
}

const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(30);

impl Repeats {
    /// Whether to log `failure` now: Some(how many times it recurred unlogged), or None.
    fn log(&mut self, failure: &str, now: Instant) -> Option<u64> {
        match &self.last {
            Some((last, at)) if last == failure => {
                if now < *at + REPEAT_LOG_INTERVAL {
                    self.unlogged += 1;
                    return None;
                }
            }
            // Another failure: the count of the one before is not this one's.
            _ => self.unlogged = 0,
        }
        self.last = Some((failure.to_string(), now));
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_first_wait_above_the_cap_is_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(10));
        let waits: Vec<u128> = (0..3).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [10, 10, 10]);
    }

    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_starts_over() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let waits: Vec<_> = (0..5).map(|_| b.next_wait()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.next_wait(), ms(100));
    }

    #[test]
    fn a_repeated_failure_is_logged_again_only_after_the_interval() {
        let t0 = Instant::now();
        let after = |secs| t0 + Duration::from_secs(secs);
        let mut r = Repeats::default();
        assert_eq!(r.log("down", t0), Some(0));
        assert_eq!(r.log("down", after(1)), None);
        assert_eq!(r.log("down", after(29)), None);
        assert_eq!(r.log("down", after(30)), Some(2));
        assert_eq!(r.log("down", after(31)), None);
        // Another failure is logged at once, and so is the first one when it comes back.
        assert_eq!(r.log("refused", after(32)), Some(0));
        assert_eq!(r.log("down", after(33)), Some(0));
    }
}
