use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

/// Manages a collection of threads.
///
/// A new thread is created every time all the existing threads are full.
/// Any idle thread will automatically die after a few seconds.
pub struct TaskPool {
    sharing: Arc<Sharing>,
    /// PATCHED: at most this many threads (upstream: no bound).
    max_threads: usize,
}

/// PATCHED: a thread that finds this many others idle when it finishes a task exits, so
/// the pool shrinks right after a burst. (Upstream waited 5 s idle, but a condvar wakes its
/// waiters in turn: a steady stream of tasks kept every thread of a burst alive.)
const IDLE_THREADS_KEPT: usize = 16;

struct Sharing {
    // list of the tasks to be done by worker threads
    todo: Mutex<VecDeque<Box<dyn FnMut() + Send>>>,

    // condvar that will be notified whenever a task is added to `todo`
    condvar: Condvar,

    // number of total worker threads running
    active_tasks: AtomicUsize,

    // number of idle worker threads
    waiting_tasks: AtomicUsize,
}

/// Minimum number of active threads.
static MIN_THREADS: usize = 4;

struct Registration<'a> {
    nb: &'a AtomicUsize,
}

impl<'a> Registration<'a> {
    fn new(nb: &'a AtomicUsize) -> Registration<'a> {
        nb.fetch_add(1, Ordering::Release);
        Registration { nb }
    }
}

/// PATCHED: an already counted registration, uncounted on drop.
struct Registered<'a> {
    nb: &'a AtomicUsize,
}

impl<'a> Drop for Registered<'a> {
    fn drop(&mut self) {
        self.nb.fetch_sub(1, Ordering::Release);
    }
}

impl<'a> Drop for Registration<'a> {
    fn drop(&mut self) {
        self.nb.fetch_sub(1, Ordering::Release);
    }
}

impl TaskPool {
    /// PATCHED: `max_threads` bounds the pool; a task beyond it waits in the queue for the
    /// next thread that finishes one.
    pub fn new(max_threads: usize) -> TaskPool {
        let pool = TaskPool {
            max_threads: max_threads.max(MIN_THREADS),
            sharing: Arc::new(Sharing {
                todo: Mutex::new(VecDeque::new()),
                condvar: Condvar::new(),
                active_tasks: AtomicUsize::new(0),
                waiting_tasks: AtomicUsize::new(0),
            }),
        };

        for _ in 0..MIN_THREADS {
            pool.add_thread(None)
        }

        pool
    }

    /// Executes a function in a thread.
    /// If no thread is available, spawns a new one.
    pub fn spawn(&self, code: Box<dyn FnMut() + Send>) {
        let mut queue = self.sharing.todo.lock().unwrap();

        // PATCHED: upstream queued the task whenever any thread was waiting, but a waiting
        // thread stays counted until it wakes up, so a burst of connections could all be
        // queued behind one idle thread and wait for busy ones (a client stalled in its
        // body held such a thread for the whole read timeout). Queue only when there is an
        // idle thread for every queued task, this one included; otherwise start a thread.
        if self.sharing.waiting_tasks.load(Ordering::Acquire) > queue.len()
            || self.sharing.active_tasks.load(Ordering::Acquire) >= self.max_threads
        {
            queue.push_back(code);
            self.sharing.condvar.notify_one();
        } else {
            self.add_thread(Some(code));
        }
    }

    fn add_thread(&self, initial_fn: Option<Box<dyn FnMut() + Send>>) {
        let sharing = self.sharing.clone();
        // PATCHED: counted before the thread starts, so that `spawn` sees it at once.
        sharing.active_tasks.fetch_add(1, Ordering::Release);

        thread::spawn(move || {
            let sharing = sharing;
            let _active_guard = Registered {
                nb: &sharing.active_tasks,
            };

            if let Some(mut f) = initial_fn {
                f();
            }

            loop {
                let mut task: Box<dyn FnMut() + Send> = {
                    let mut todo = sharing.todo.lock().unwrap();
                    // PATCHED: upstream restarted the 5 s idle wait at every wake-up, and
                    // with a steady stream of connections every idle thread is woken now
                    // and then (another takes the task), so after a burst none ever exited.
                    // Count the idle time from the last task.
                    let idle_since = std::time::Instant::now();

                    let task;
                    loop {
                        if let Some(poped_task) = todo.pop_front() {
                            task = poped_task;
                            break;
                        }
                        let _waiting_guard = Registration::new(&sharing.waiting_tasks);

                        let received =
                            if sharing.active_tasks.load(Ordering::Acquire) <= MIN_THREADS {
                                todo = sharing.condvar.wait(todo).unwrap();
                                true
                            } else {
                                let idle_max = Duration::from_millis(5000);
                                let left = idle_max.saturating_sub(idle_since.elapsed());
                                let (new_lock, waitres) =
                                    sharing.condvar.wait_timeout(todo, left).unwrap();
                                todo = new_lock;
                                !waitres.timed_out() && idle_since.elapsed() < idle_max
                            };

                        if !received && todo.is_empty() {
                            return;
                        }
                    }

                    task
                };

                task();
                drop(task);

                // PATCHED: shrink after a burst (see IDLE_THREADS_KEPT).
                if sharing.waiting_tasks.load(Ordering::Acquire) >= IDLE_THREADS_KEPT
                    && sharing.active_tasks.load(Ordering::Acquire) > MIN_THREADS
                {
                    return;
                }
            }
        });
    }
}

impl Drop for TaskPool {
    fn drop(&mut self) {
        self.sharing
            .active_tasks
            .store(999_999_999, Ordering::Release);
        self.sharing.condvar.notify_all();
    }
}
