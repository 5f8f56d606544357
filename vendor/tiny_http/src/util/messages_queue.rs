use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

enum Control<T> {
    Elem(T),
    Unblock,
}

pub struct MessagesQueue<T>
where
    T: Send,
{
    queue: Mutex<Queue<T>>,
    condvar: Condvar,
}

/// PATCHED: the queue and how many threads wait on it. std's `Condvar::notify_one` is a
/// `futex` system call even with no thread to wake; under load every worker is busy when
/// a request is pushed, so pushes wake only when someone waits.
struct Queue<T> {
    items: VecDeque<Control<T>>,
    waiting: usize,
    /// PATCHED: set by `close`: `pop` no longer waits.
    closed: bool,
}

impl<T> Queue<T> {
    fn pop_front(&mut self) -> Option<Control<T>> {
        self.items.pop_front()
    }
}

impl<T> MessagesQueue<T>
where
    T: Send,
{
    pub fn with_capacity(capacity: usize) -> Arc<MessagesQueue<T>> {
        Arc::new(MessagesQueue {
            queue: Mutex::new(Queue {
                items: VecDeque::with_capacity(capacity),
                waiting: 0,
                closed: false,
            }),
            condvar: Condvar::new(),
        })
    }

    /// Pushes an element to the queue.
    pub fn push(&self, value: T) {
        self.push_control(Control::Elem(value));
    }

    /// Unblock one thread stuck in pop loop.
    pub fn unblock(&self) {
        self.push_control(Control::Unblock);
    }

    /// PATCHED: from now on `pop` returns None instead of waiting, in every thread at once
    /// (`pop_timeout` still waits for elements until its timeout). One `unblock` per
    /// waiting thread could be taken by a thread looping on `pop_timeout`, which left the
    /// others waiting until someone unblocked them again.
    pub fn close(&self) {
        self.queue.lock().unwrap().closed = true;
        self.condvar.notify_all();
    }

    fn push_control(&self, control: Control<T>) {
        let mut queue = self.queue.lock().unwrap();
        queue.items.push_back(control);
        let waiting = queue.waiting > 0;
        drop(queue);
        if waiting {
            self.condvar.notify_one();
        }
    }

    /// Pops an element. Blocks until one is available.
    /// Returns None in case unblock() was issued.
    pub fn pop(&self) -> Option<T> {
        let mut queue = self.queue.lock().unwrap();

        loop {
            match queue.pop_front() {
                Some(Control::Elem(value)) => return Some(value),
                Some(Control::Unblock) => return None,
                None if queue.closed => return None,
                None => (),
            }

            queue.waiting += 1;
            queue = self.condvar.wait(queue).unwrap();
            queue.waiting -= 1;
        }
    }

    /// Tries to pop an element without blocking.
    pub fn try_pop(&self) -> Option<T> {
        let mut queue = self.queue.lock().unwrap();
        match queue.pop_front() {
            Some(Control::Elem(value)) => Some(value),
            Some(Control::Unblock) | None => None,
        }
    }

    /// Tries to pop an element without blocking
    /// more than the specified timeout duration
    /// or unblock() was issued
    pub fn pop_timeout(&self, timeout: Duration) -> Option<T> {
        let mut queue = self.queue.lock().unwrap();
        let mut duration = timeout;
        loop {
            match queue.pop_front() {
                Some(Control::Elem(value)) => return Some(value),
                Some(Control::Unblock) => return None,
                None => (),
            }
            let now = Instant::now();
            queue.waiting += 1;
            // PATCHED: waits what is left of the timeout (upstream waited all of it again
            // after every wake-up that found nothing).
            let (_queue, result) = self.condvar.wait_timeout(queue, duration).unwrap();
            queue = _queue;
            queue.waiting -= 1;
            let sleep_time = now.elapsed();
            duration = if duration > sleep_time {
                duration - sleep_time
            } else {
                Duration::from_millis(0)
            };
            if result.timed_out()
                || (duration.as_secs() == 0 && duration.subsec_nanos() < 1_000_000)
            {
                return None;
            }
        }
    }
}
