//! One way to run a background thread: a supervisor loop that runs a worker's session,
//! and after a failure waits (exponential backoff) and runs a new one, until shutdown.
//! The outbox publishers and the consumers are such workers; `Backoff` is also the one
//! backoff of every other retry loop (the consumer's database retries, migrations).
//!
//! `run` is the single place where a worker's body is run and re-run: supervision
//! policy (what counts as healthy, what is logged, what is counted) lives here only.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;

use crate::error::Result;
use crate::shutdown::Shutdown;

/// Waits that start at `initial` and double up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
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
    make: impl Fn(usize) -> S,
) -> Vec<JoinHandle<()>>
where
    S: FnMut(&Shutdown) -> Result<()> + Send + 'static,
{
    (0..count)
        .map(|i| {
            let session = make(i);
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name(format!("{role}-{i}"))
                .spawn(move || run(role, &shutdown, backoff_max, session))
                .unwrap_or_else(|e| panic!("spawning thread {role}-{i}: {e}"))
        })
        .collect()
}

/// Runs `session` until it returns Ok (a clean stop, at shutdown) or shutdown is
/// triggered. After an error, waits with backoff (100 ms doubling up to `backoff_max`,
/// starting over after a session that ran for a while) and runs a new session.
pub fn run(
    role: &str,
    shutdown: &Shutdown,
    backoff_max: Duration,
    mut session: impl FnMut(&Shutdown) -> Result<()>,
) {
    let mut backoff = Backoff::new(SESSION_BACKOFF_INITIAL, backoff_max);
    while !shutdown.is_triggered() {
        let started = Instant::now();
        let Err(e) = session(shutdown) else {
            return;
        };
        if started.elapsed() > HEALTHY_SESSION {
            backoff.reset();
        }
        let wait = backoff.next_wait();
        warn!("{role}: {e}; retrying in {} ms", wait.as_millis());
        if shutdown.sleep(wait) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
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
}
