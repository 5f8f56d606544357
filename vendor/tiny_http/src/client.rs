use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufRead, BufReader, BufWriter, ErrorKind};

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{HTTPVersion, Method};
use crate::util::refined_tcp_stream::ReadDeadline;
use crate::util::RefinedTcpStream;
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    /// PATCHED: the deadline of the reads of this connection, the timeouts that set it,
    /// and whether a byte of the current request has arrived (a connection that times out
    /// before that is closed without an answer; one that stalls within a head gets 408).
    deadline: Arc<ReadDeadline>,
    head_timeout: Duration,
    idle_timeout: Duration,
    head_started: bool,

    /// PATCHED: the server's counts, where a refused request is counted.
    stats: Arc<crate::ConnectionStats>,
}

/// PATCHED: the most headers a request may have.
const HEADERS_LIMIT: usize = 128;

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    /// PATCHED: the request line is longer than the line limit.
    UriTooLong,
    WrongHeader(HTTPVersion),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    /// PATCHED: a version other than HTTP/1.0 and HTTP/1.1.
    UnsupportedVersion,
    /// PATCHED: a request the server refuses with this status and message, then closes
    /// (a body whose length it cannot trust).
    Refused(HTTPVersion, u16, &'static str),
    ReadIoError(IoError),
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    /// PATCHED: a request head must arrive whole within `limits.head_timeout` of its first
    /// byte. That first byte must come within `head_timeout` of the connection thread's
    /// first read (not of the accept: on a busy machine a new thread may start late, and
    /// the request already waiting in the socket must not count as late), and for later
    /// requests within `idle_timeout` of the previous response.
    pub fn new(
        write_socket: RefinedTcpStream,
        read_socket: RefinedTcpStream,
        limits: &crate::Limits,
        stats: Arc<crate::ConnectionStats>,
    ) -> ClientConnection {
        let head_timeout = limits.head_timeout;
        let idle_timeout = limits.idle_timeout;
        let deadline = ReadDeadline::idle(head_timeout, limits.read_timeout);
        let mut read_socket = read_socket.with_deadline(deadline.clone());
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            deadline,
            head_timeout,
            idle_timeout,
            head_started: false,
            stats,
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Reads the next line from self.next_header_source.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line.
    fn read_next_line(&mut self) -> IoResult<AsciiString> {
        let mut buf = Vec::new();
        // PATCHED: upstream buffered a line until CRLF, however long.
        const LINE_LIMIT: usize = 8 * 1024;
        // PATCHED: scans the buffered bytes for the line's end instead of reading them one
        // `read` call at a time; never consumes past the LF, so the body stays unread.
        loop {
            let available = match self.next_header_source.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Err(IoError::new(ErrorKind::ConnectionAborted, "Unexpected EOF"));
            }
            // PATCHED: a request's head deadline counts from its first byte.
            if !self.head_started {
                self.head_started = true;
                self.deadline.set_head(Instant::now() + self.head_timeout);
            }
            let (taken, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            // The limit as upstream counted: bytes before the line's last one.
            let room = LINE_LIMIT + 1 - buf.len().min(LINE_LIMIT + 1);
            if taken > room || (!done && taken == room) {
                return Err(IoError::new(ErrorKind::InvalidData, "Header line too long"));
            }
            buf.extend_from_slice(&available[..taken]);
            self.next_header_source.consume(taken);
            if done && buf.len() >= 2 && buf[buf.len() - 2] == b'\r' {
                buf.truncate(buf.len() - 2); // removing the CRLF
                return AsciiString::from_ascii(buf)
                    .map_err(|_| IoError::new(ErrorKind::InvalidInput, "Header is not in ASCII"));
            }
        }
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        let (method, path, version, headers) = {
            // reading the request line
            let (method, path, version) = {
                let line = self.read_next_line().map_err(|e| match e.kind() {
                    ErrorKind::InvalidData => ReadError::UriTooLong, // PATCHED
                    _ => ReadError::ReadIoError(e),
                })?;

                parse_request_line(
                    line.as_str().trim(), // TODO: remove this conversion
                )?
            };
            // PATCHED: refused before a writer is taken. Upstream checked the version of the
            // built request and then waited for a second writer while the request held the
            // first: no answer, and the connection's thread and slot were never freed.
            if version != HTTPVersion(1, 0) && version != HTTPVersion(1, 1) {
                return Err(ReadError::UnsupportedVersion);
            }

            // getting all headers
            let headers = {
                let mut headers = Vec::new();
                loop {
                    let line = self.read_next_line().map_err(ReadError::ReadIoError)?;
                    // PATCHED: at most HEADERS_LIMIT headers.
                    if headers.len() >= HEADERS_LIMIT {
                        return Err(ReadError::ReadIoError(IoError::new(
                            ErrorKind::InvalidData,
                            "Too many headers",
                        )));
                    }

                    if line.is_empty() {
                        break;
                    };
                    headers.push(match FromStr::from_str(line.as_str().trim()) {
                        // TODO: remove this conversion
                        Ok(h) => h,
                        _ => return Err(ReadError::WrongHeader(version)),
                    });
                }

                headers
            };

            (method, path, version, headers)
        };

        // building the writer for the request
        let writer = self.sink.next().unwrap();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            *self.remote_addr.as_ref().unwrap(),
            data_source,
            writer,
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
                request::RequestCreationError::Refused(status, message) => {
                    ReadError::Refused(version, status, message)
                }
            }
        })?;

        // PATCHED: the head (and the buffered body) is in; now the connection may idle.
        self.deadline.set_idle(self.idle_timeout);
        self.head_started = false;

        // return the request
        Ok(request)
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        let rq = match self.read() {
            // PATCHED: every rejection carries a JSON body, {"error": "..."}, so that
            // clients of a JSON API always get JSON (upstream sent empty bodies, and no
            // response at all for the cases marked new).
            Err(ReadError::WrongRequestLine) => {
                // we don't know where the next request would start, so we have to close
                return self.reject(400, HTTPVersion(1, 1), "malformed request line");
            }

            Err(ReadError::UriTooLong) => {
                return self.reject(414, HTTPVersion(1, 1), "request line too long");
            }

            Err(ReadError::WrongHeader(ver)) => {
                return self.reject(400, ver, "malformed header");
            }

            // new: a head that is too large
            Err(ReadError::ReadIoError(ref err)) if err.kind() == ErrorKind::InvalidData => {
                return self.reject(431, HTTPVersion(1, 1), "request head too large");
            }

            // new: a head that is not ASCII
            Err(ReadError::ReadIoError(ref err)) if err.kind() == ErrorKind::InvalidInput => {
                return self.reject(400, HTTPVersion(1, 1), "request head is not ASCII");
            }

            // a socket read timeout (SO_RCVTIMEO) is WouldBlock on Unix
            Err(ReadError::ReadIoError(ref err))
                if err.kind() == ErrorKind::TimedOut || err.kind() == ErrorKind::WouldBlock =>
            {
                // PATCHED: an idle connection (no byte of a request yet) is closed
                // silently, as keep-alive clients expect; a stalled request gets 408.
                if !self.head_started {
                    return None;
                }
                return self.reject(408, HTTPVersion(1, 1), "request timed out");
            }

            Err(ReadError::ExpectationFailed(ver)) => {
                // TODO: should be recoverable, but needs handling in case of body
                return self.reject(417, ver, "unsupported Expect header");
            }

            // PATCHED: new.
            Err(ReadError::UnsupportedVersion) => {
                let message = "only HTTP/1.0 and HTTP/1.1 are supported";
                return self.reject(505, HTTPVersion(1, 1), message);
            }

            // PATCHED: new.
            Err(ReadError::Refused(ver, status, message)) => {
                return self.reject(status, ver, message);
            }

            Err(ReadError::ReadIoError(_)) => return None,

            Ok(rq) => rq,
        };

        // updating the status of the connection
        let connection_header = rq
            .headers()
            .iter()
            .find(|h| h.field.equiv("Connection"))
            .map(|h| h.value.as_str());

        let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

        match lowercase {
            Some(ref val) if val.contains("close") => self.no_more_requests = true,
            // PATCHED: upstream ended the connection at `Connection: upgrade`; this server
            // upgrades to nothing and ignores it (RFC 9110 7.8), see request.rs.
            Some(ref val)
                if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
            {
                self.no_more_requests = true
            }
            None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
            _ => (),
        };

        // returning the request
        Some(rq)
    }
}

impl ClientConnection {
    /// PATCHED: answers `status` with a JSON error body; the connection then closes.
    fn reject(&mut self, status: u16, version: HTTPVersion, message: &str) -> Option<Request> {
        self.stats.refused(status);
        let writer = self.sink.next().unwrap();
        json_error(status, message)
            .raw_print(writer, version, &[], false, None)
            .ok();
        None
    }
}

/// PATCHED: `{"error": message}` as an application/json response.
fn json_error(status: u16, message: &str) -> crate::Response<std::io::Cursor<Vec<u8>>> {
    use crate::{Header, Response, StatusCode};
    let body = format!("{{\"error\":\"{}\"}}", message.replace('"', "'"));
    Response::from_string(body)
        .with_status_code(StatusCode(status))
        .with_header(
            Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                .expect("static header"),
        )
        .with_header(Header::from_bytes(&b"Connection"[..], &b"close"[..]).expect("static header"))
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
    }
}
