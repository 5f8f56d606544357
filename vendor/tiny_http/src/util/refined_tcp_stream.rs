use std::io::Result as IoResult;
use std::io::{Error as IoError, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::connection::Connection;
#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use crate::ssl::SslStream;

pub(crate) enum Stream {
    Http(Connection),
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    Https(SslStream),
}

impl Stream {
    /// PATCHED: was `Clone`, which unwrapped `try_clone`: out of file descriptors (EMFILE),
    /// the accept thread panicked and the server stopped listening for good.
    fn try_clone(&self) -> IoResult<Self> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.try_clone().map(Stream::Http),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => Ok(Stream::Https(ssl_stream.clone())),
        }
    }
}

impl From<Connection> for Stream {
    fn from(tcp_stream: Connection) -> Self {
        Stream::Http(tcp_stream)
    }
}

impl Stream {
    fn secure(&self) -> bool {
        match self {
            Stream::Http(_) => false,
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => true,
        }
    }

    fn peer_addr(&mut self) -> IoResult<Option<SocketAddr>> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.peer_addr(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.peer_addr(),
        }
    }

    fn set_read_timeout(&self, t: std::time::Duration) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.set_read_timeout(Some(t)),
            // PATCHED: the deadlines are not applied to TLS streams (we build without TLS).
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => Ok(()),
        }
    }

    fn shutdown(&mut self, how: Shutdown) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.shutdown(how),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.read(buf),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.write(buf),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.write(buf),
        }
    }

    fn flush(&mut self) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.flush(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.flush(),
        }
    }
}

pub struct RefinedTcpStream {
    stream: Stream,
    close_read: bool,
    close_write: bool,
    /// PATCHED: when set, every read is bounded by this deadline (see `ReadDeadline`).
    deadline: Option<Arc<ReadDeadline>>,
    /// PATCHED: the read timeout this stream last set on the socket. The idle wait before
    /// each keep-alive request asks for the same timeout every time: one `setsockopt` per
    /// request saved. Only this (reading) half sets it.
    timeout_set: Option<std::time::Duration>,
}

/// PATCHED: the deadline of the reads on one connection. Upstream only had the socket's
/// per-read timeout, which a client trickling one byte at a time never trips, so a request
/// head could take forever and hold its connection thread for as long. The connection
/// moves this between two phases: a request head (and the body the connection's thread
/// buffers) must arrive by an instant, each read also within `read_max`; between requests,
/// the idle keep-alive time starts at the first read after the previous response, not
/// when the phase is set.
pub(crate) struct ReadDeadline {
    phase: Mutex<Phase>,
    read_max: Duration,
}

#[derive(Clone, Copy)]
enum Phase {
    Head(Instant),
    IdleFor(Duration),
    IdleUntil(Instant),
}

impl ReadDeadline {
    /// Starts idle: the first byte must come within `idle` of the first read.
    pub(crate) fn idle(idle: Duration, read_max: Duration) -> Arc<ReadDeadline> {
        Arc::new(ReadDeadline {
            phase: Mutex::new(Phase::IdleFor(idle)),
            read_max,
        })
    }

    pub(crate) fn set_head(&self, deadline: Instant) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = Phase::Head(deadline);
    }

    pub(crate) fn set_idle(&self, idle: Duration) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = Phase::IdleFor(idle);
    }

    /// The time the next read may take, or `TimedOut` once the deadline has passed.
    fn remaining(&self) -> IoResult<Duration> {
        let now = Instant::now();
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if let Phase::IdleFor(idle) = *phase {
            *phase = Phase::IdleUntil(now + idle);
        }
        match *phase {
            Phase::Head(t) if t > now => Ok((t - now).min(self.read_max)),
            Phase::IdleUntil(t) if t > now => Ok(t - now),
            _ => Err(IoError::new(ErrorKind::TimedOut, "deadline passed")),
        }
    }
}

impl RefinedTcpStream {
    pub(crate) fn new<S>(stream: S) -> IoResult<(RefinedTcpStream, RefinedTcpStream)>
    where
        S: Into<Stream>,
    {
        let stream: Stream = stream.into();

        let (read, write) = (stream.try_clone()?, stream);

        let read = RefinedTcpStream {
            stream: read,
            close_read: true,
            close_write: false,
            deadline: None,
            timeout_set: None,
        };

        let write = RefinedTcpStream {
            stream: write,
            close_read: false,
            close_write: true,
            deadline: None,
            timeout_set: None,
        };

        Ok((read, write))
    }

    /// PATCHED: bounds every read by `deadline`.
    pub(crate) fn with_deadline(mut self, deadline: Arc<ReadDeadline>) -> RefinedTcpStream {
        self.deadline = Some(deadline);
        self
    }

    /// Returns true if this struct wraps around a secure connection.
    #[inline]
    pub(crate) fn secure(&self) -> bool {
        self.stream.secure()
    }

    pub(crate) fn peer_addr(&mut self) -> IoResult<Option<SocketAddr>> {
        self.stream.peer_addr()
    }
}

impl Drop for RefinedTcpStream {
    fn drop(&mut self) {
        if self.close_read {
            self.stream.shutdown(Shutdown::Read).ok();
        }

        if self.close_write {
            self.stream.shutdown(Shutdown::Write).ok();
        }
    }
}

impl Read for RefinedTcpStream {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        // PATCHED: the deadline's time left bounds each read syscall (the buffered reader
        // above makes few); `setsockopt` only when that differs from the timeout set last.
        if let Some(deadline) = &self.deadline {
            let timeout = deadline.remaining()?;
            if self.timeout_set != Some(timeout) {
                self.timeout_set = None;
                self.stream.set_read_timeout(timeout)?;
                self.timeout_set = Some(timeout);
            }
        }
        self.stream.read(buf)
    }
}

impl Write for RefinedTcpStream {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        self.stream.flush()
    }
}
