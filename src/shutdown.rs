//! Shutdown coordination. A `Trigger` owns the only sender of a crossbeam channel; dropping
//! it disconnects every `Shutdown` receiver at once, so any thread can `select!` on shutdown
//! beside its own work channel. SIGINT and SIGTERM drop the trigger that `main` waits on;
//! `app::Running::stop` then fires the others in order, one stage at a time (HTTP, then
//! the publishers, then the consumers): the same mechanism for every stage.

use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::error::Result;

/// Fires shutdown when dropped.
pub struct Trigger {
    _tx: Sender<()>,
}

/// A cloneable view of the shutdown state.
#[derive(Clone)]
pub struct Shutdown {
    rx: Receiver<()>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = crossbeam_channel::bounded(0);
    (Trigger { _tx: tx }, Shutdown { rx })
}

impl Shutdown {
    /// The receiver to put in a `select!`: it becomes ready (disconnected) at shutdown.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.rx
    }

    pub fn is_triggered(&self) -> bool {
        matches!(self.rx.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Sleeps up to `d`; returns true if shutdown was triggered meanwhile.
    pub fn sleep(&self, d: Duration) -> bool {
        matches!(self.rx.recv_timeout(d), Err(RecvTimeoutError::Disconnected))
    }

    /// Blocks until shutdown.
    pub fn wait(&self) {
        let _ = self.rx.recv();
    }
}

/// Joins `thread`; if it panicked, logs the panic's message instead of dropping it.
pub fn join_logged(thread: JoinHandle<()>) {
    let name = thread.thread().name().unwrap_or("unnamed").to_string();
    if let Err(payload) = thread.join() {
        error!(
            "thread {name} had panicked: {}",
            crate::error::panic_message(&*payload)
        );
    }
}

/// A thread that fires `trigger` on the first SIGINT or SIGTERM.
pub struct SignalThread {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl SignalThread {
    pub fn start(trigger: Trigger) -> Result<SignalThread> {
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    info!("received signal {sig}; shutting down");
                }
                drop(trigger);
            })
            .expect("spawning the signal thread");
        Ok(SignalThread { handle, thread })
    }

    pub fn join(self) {
        self.handle.close();
        join_logged(self.thread);
    }
}
