use std::io::Result as IoResult;
use std::io::{Read, Write};

// PATCHED: each of these channels carries exactly one message (the reader handed on to the
// next request, or the signal that a response is written), so a one-shot slot does. The
// unbounded `mpsc::channel()` allocated and zeroed a block of 31 slots at its first send,
// two per request: 8% of a query's instructions (callgrind); a `sync_channel(1)` still
// cost 5% to create (cache-padded, aligned allocations). See `one_shot` below.
use self::one_shot::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use std::mem;

pub struct SequentialReaderBuilder<R>
where
    R: Read + Send,
{
    inner: SequentialReaderBuilderInner<R>,
}

enum SequentialReaderBuilderInner<R>
where
    R: Read + Send,
{
    First(R),
    NotFirst(Receiver<R>),
}

pub struct SequentialReader<R>
where
    R: Read + Send,
{
    inner: SequentialReaderInner<R>,
    next: Sender<R>,
}

enum SequentialReaderInner<R>
where
    R: Read + Send,
{
    MyTurn(R),
    Waiting(Receiver<R>),
    Empty,
}

pub struct SequentialWriterBuilder<W>
where
    W: Write + Send,
{
    writer: Arc<Mutex<W>>,
    next_trigger: Option<Receiver<()>>,
}

pub struct SequentialWriter<W>
where
    W: Write + Send,
{
    trigger: Option<Receiver<()>>,
    writer: Arc<Mutex<W>>,
    on_finish: Sender<()>,
}

impl<R: Read + Send> SequentialReaderBuilder<R> {
    pub fn new(reader: R) -> SequentialReaderBuilder<R> {
        SequentialReaderBuilder {
            inner: SequentialReaderBuilderInner::First(reader),
        }
    }
}

impl<W: Write + Send> SequentialWriterBuilder<W> {
    pub fn new(writer: W) -> SequentialWriterBuilder<W> {
        SequentialWriterBuilder {
            writer: Arc::new(Mutex::new(writer)),
            next_trigger: None,
        }
    }
}

impl<R: Read + Send> Iterator for SequentialReaderBuilder<R> {
    type Item = SequentialReader<R>;

    fn next(&mut self) -> Option<SequentialReader<R>> {
        let (tx, rx) = one_shot::channel();

        let inner = mem::replace(&mut self.inner, SequentialReaderBuilderInner::NotFirst(rx));

        match inner {
            SequentialReaderBuilderInner::First(reader) => Some(SequentialReader {
                inner: SequentialReaderInner::MyTurn(reader),
                next: tx,
            }),

            SequentialReaderBuilderInner::NotFirst(previous) => Some(SequentialReader {
                inner: SequentialReaderInner::Waiting(previous),
                next: tx,
            }),
        }
    }
}

impl<W: Write + Send> Iterator for SequentialWriterBuilder<W> {
    type Item = SequentialWriter<W>;
    fn next(&mut self) -> Option<SequentialWriter<W>> {
        let (tx, rx) = one_shot::channel();
        let mut next_next_trigger = Some(rx);
        ::std::mem::swap(&mut next_next_trigger, &mut self.next_trigger);

        Some(SequentialWriter {
            trigger: next_next_trigger,
            writer: self.writer.clone(),
            on_finish: tx,
        })
    }
}

// PATCHED: lets the head parser scan the connection's buffer a line at a time instead of
// calling `read` once per byte (about a quarter of a request's instructions, callgrind).
impl<R: std::io::BufRead + Send> std::io::BufRead for SequentialReader<R> {
    fn fill_buf(&mut self) -> IoResult<&[u8]> {
        if let SequentialReaderInner::Waiting(ref mut recv) = self.inner {
            let reader = recv.recv().unwrap();
            self.inner = SequentialReaderInner::MyTurn(reader);
        }
        match self.inner {
            SequentialReaderInner::MyTurn(ref mut reader) => reader.fill_buf(),
            _ => unreachable!(),
        }
    }

    fn consume(&mut self, amt: usize) {
        match self.inner {
            SequentialReaderInner::MyTurn(ref mut reader) => reader.consume(amt),
            _ => unreachable!(),
        }
    }
}

impl<R: Read + Send> Read for SequentialReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        let mut reader = match self.inner {
            SequentialReaderInner::MyTurn(ref mut reader) => return reader.read(buf),
            SequentialReaderInner::Waiting(ref mut recv) => recv.recv().unwrap(),
            SequentialReaderInner::Empty => unreachable!(),
        };

        let result = reader.read(buf);
        self.inner = SequentialReaderInner::MyTurn(reader);
        result
    }
}

impl<W: Write + Send> Write for SequentialWriter<W> {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        if let Some(v) = self.trigger.as_mut() {
            v.recv().unwrap()
        }
        self.trigger = None;

        self.writer.lock().unwrap().write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        if let Some(v) = self.trigger.as_mut() {
            v.recv().unwrap()
        }
        self.trigger = None;

        self.writer.lock().unwrap().flush()
    }
}

impl<R> Drop for SequentialReader<R>
where
    R: Read + Send,
{
    fn drop(&mut self) {
        let inner = mem::replace(&mut self.inner, SequentialReaderInner::Empty);

        match inner {
            SequentialReaderInner::MyTurn(reader) => {
                self.next.send(reader).ok();
            }
            SequentialReaderInner::Waiting(recv) => {
                let reader = recv.recv().unwrap();
                self.next.send(reader).ok();
            }
            SequentialReaderInner::Empty => (),
        }
    }
}

impl<W> Drop for SequentialWriter<W>
where
    W: Write + Send,
{
    fn drop(&mut self) {
        self.on_finish.send(()).ok();
    }
}

// PATCHED: a channel for exactly one message, one allocation (an `Arc` of a mutex and a
// condition variable, which allocate nothing themselves). As with `mpsc`, `recv` fails if
// the sender was dropped without sending. The sender wakes the receiver only if it waits:
// std's `Condvar::notify_one` is a `futex` system call even with no thread to wake, and
// most messages here arrive before anyone asks for them.
mod one_shot {
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};

    enum State<T> {
        Empty,
        Full(T),
        Done,
    }

    struct Inner<T> {
        state: State<T>,
        /// The receiver is blocked in `recv`.
        waiting: bool,
    }

    struct Slot<T> {
        inner: Mutex<Inner<T>>,
        changed: Condvar,
    }

    impl<T> Slot<T> {
        fn lock(&self) -> MutexGuard<'_, Inner<T>> {
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Sets the state, then wakes the receiver if it waits.
        fn set(&self, mut inner: MutexGuard<'_, Inner<T>>, state: State<T>) {
            inner.state = state;
            let waiting = inner.waiting;
            drop(inner);
            if waiting {
                self.changed.notify_one();
            }
        }
    }

    pub struct Sender<T>(Arc<Slot<T>>);
    pub struct Receiver<T>(Arc<Slot<T>>);

    #[derive(Debug)]
    pub struct Disconnected;

    pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
        let slot = Arc::new(Slot {
            inner: Mutex::new(Inner {
                state: State::Empty,
                waiting: false,
            }),
            changed: Condvar::new(),
        });
        (Sender(slot.clone()), Receiver(slot))
    }

    impl<T> Sender<T> {
        pub fn send(&self, value: T) -> Result<(), T> {
            let inner = self.0.lock();
            if !matches!(inner.state, State::Empty) {
                return Err(value);
            }
            self.0.set(inner, State::Full(value));
            Ok(())
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            let inner = self.0.lock();
            if matches!(inner.state, State::Empty) {
                self.0.set(inner, State::Done);
            }
        }
    }

    impl<T> Receiver<T> {
        pub fn recv(&self) -> Result<T, Disconnected> {
            let mut inner = self.0.lock();
            loop {
                match std::mem::replace(&mut inner.state, State::Done) {
                    State::Full(value) => return Ok(value),
                    State::Empty => {
                        inner.state = State::Empty;
                        inner.waiting = true;
                        inner = self.0.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
                        inner.waiting = false;
                    }
                    State::Done => return Err(Disconnected),
                }
            }
        }
    }
}
