//! The HTTP layer shared by the three services: a bounded pool of worker threads on one
//! tiny_http `Server`, socket timeouts so slow or idle clients cannot hold a worker, a
//! 64 KiB body limit, and the one place where a handler's `Error` becomes a JSON response.
//! `/health`, `/metrics` and `/openapi.json` are answered here for every service.

use std::collections::BTreeMap;
use std::io::Read;
use std::mem::ManuallyDrop;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info};
use tiny_http::{Method, Server};

pub use crate::config::percent_decode;
use crate::error::{panic_message, Error, Result};
use crate::shutdown::{self, Shutdown, Trigger};

/// The largest request body accepted; larger ones get 413. The vendored tiny_http reads
/// bodies up to this size in the connection's thread, and drains at most this much of a
/// body nobody read: one constant for both sides.
pub const BODY_LIMIT_BYTES: usize = tiny_http::BODY_BUFFER_LIMIT;

/// The OpenAPI document of both HTTP APIs, served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Sent with every response of every service. The dashboard page needs them (it shows
/// strings clients wrote: the policy forbids inline script and style, so even markup that
/// slipped into the page could not run), and they cost an API response nothing: a browser
/// must not sniff JSON into HTML, and no response of ours loads anything from elsewhere.
const SECURITY_HEADERS: [(&str, &str); 2] = [
    ("Content-Security-Policy", "default-src 'self'"),
    ("X-Content-Type-Options", "nosniff"),
];

/// A request with its body already read (bounded) and the headers the handlers need.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    pub idempotency_key: Option<String>,
    pub body: Vec<u8>,
}

impl Request {
    /// Fails with 415 unless the body is declared as JSON (parameters such as charset allowed).
    pub fn require_json(&self) -> Result<()> {
        let is_json = self.content_type.as_deref().is_some_and(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
        if is_json {
            Ok(())
        } else {
            Err(Error::unsupported_media_type(
                "Content-Type must be application/json",
            ))
        }
    }
}

/// A response: a status and a JSON (or text) body.
#[derive(Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            body,
            content_type: "application/json",
        }
    }

    /// A static asset compiled into the binary (the dashboard's page, script, style).
    pub fn asset(content_type: &'static str, body: &'static str) -> Response {
        Response {
            status: 200,
            body: body.to_string(),
            content_type,
        }
    }

    pub fn text(status: u16, body: String) -> Response {
        Response {
            status,
            body,
            content_type: "text/plain; version=0.0.4",
        }
    }
}

/// A service behind the HTTP layer: its routes, its dependencies' health, its metrics.
pub trait Service: Send + Sync + 'static {
    /// Handles a request to one of the service's own routes. Returns the route's name (a
    /// metrics label) and the outcome; unknown paths return `not_found`.
    fn handle(&self, req: &Request) -> (&'static str, Result<Response>);
    /// Checks the service's dependencies; the error names the failing one.
    fn health(&self) -> Result<()>;
    /// Fields `/health` adds to its body either way, e.g. `brokerConnected`.
    fn health_details(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
    /// Appends the service's own metrics in Prometheus text format.
    fn metrics(&self, out: &mut String);
}

/// Builds the 404 every service answers for a path it does not know.
pub fn not_found() -> (&'static str, Result<Response>) {
    ("unmatched", Err(Error::not_found("no such route")))
}

/// Builds the 405 for a known path with another method.
pub fn method_not_allowed(route: &'static str, allowed: &str) -> (&'static str, Result<Response>) {
    (route, Err(Error::method_not_allowed(allowed)))
}

/// Request counts and latency sums by route and status.
/// (route, status) → (requests, seconds spent).
type RouteStats = BTreeMap<(&'static str, u16), (u64, f64)>;

#[derive(Default)]
pub struct HttpMetrics {
    by_route: Mutex<RouteStats>,
    panics: AtomicU64,
}

impl HttpMetrics {
    fn record(&self, route: &'static str, status: u16, seconds: f64) {
        let mut map = self.by_route.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry((route, status)).or_insert((0, 0.0));
        entry.0 += 1;
        entry.1 += seconds;
    }

    pub fn render(&self, service: &str, server: &Server, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(
            out,
            "# TYPE http_connections_open gauge\n\
             http_connections_open{{service=\"{service}\"}} {}\n\
             # TYPE http_connections_rejected_total counter\n\
             http_connections_rejected_total{{service=\"{service}\"}} {}\n\
             # TYPE http_panics_total counter\n\
             http_panics_total{{service=\"{service}\"}} {}\n",
            server.connections_open(),
            server.connections_rejected(),
            self.panics.load(Ordering::Relaxed),
        );
        // Requests tiny_http answered itself (malformed, timed out, ...): they never reach
        // a route, so `http_requests_total` does not see them.
        out.push_str("# TYPE http_requests_refused_total counter\n");
        for (status, count) in server.requests_refused() {
            let _ = writeln!(
                out,
                "http_requests_refused_total{{service=\"{service}\",status=\"{status}\"}} {count}"
            );
        }
        let map = self.by_route.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str("# TYPE http_requests_total counter\n");
        for ((route, status), (count, _)) in map.iter() {
            let _ = writeln!(
                out,
                "http_requests_total{{service=\"{service}\",route=\"{route}\",status=\"{status}\"}} {count}"
            );
        }
        // A summary without quantiles: the time spent, and the requests it was spent on.
        out.push_str("# TYPE http_request_duration_seconds summary\n");
        for ((route, status), (count, sum)) in map.iter() {
            let labels = format!("service=\"{service}\",route=\"{route}\",status=\"{status}\"");
            let _ = writeln!(
                out,
                "http_request_duration_seconds_sum{{{labels}}} {sum:.6}\nhttp_request_duration_seconds_count{{{labels}}} {count}"
            );
        }
    }
}

/// How one HTTP server bounds its work (see README, "Connections").
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request-handling threads.
    pub workers: usize,
    /// Each read of a request and each write of a response.
    pub read_timeout: Duration,
    /// Open connections, each with its thread; more are answered 503 and closed.
    pub max_connections: usize,
    /// A whole request head (and a body of up to 64 KiB), however slowly it trickles.
    pub head_timeout: Duration,
    /// An idle keep-alive connection between requests.
    pub keepalive_timeout: Duration,
}

impl Limits {
    /// The limits `config` sets, with `workers` request threads.
    pub fn from_config(config: &crate::Config, workers: usize) -> Limits {
        Limits {
            workers,
            read_timeout: config.http_read_timeout,
            max_connections: config.http_max_connections,
            head_timeout: config.http_head_timeout,
            keepalive_timeout: config.http_keepalive_timeout,
        }
    }
}

/// A running HTTP server: its address and its worker threads.
pub struct HttpServer {
    pub addr: SocketAddr,
    server: Arc<Server>,
    stop: Option<Trigger>,
    workers: Vec<JoinHandle<()>>,
}

/// What every worker of one server shares.
struct Shared<S> {
    name: &'static str,
    server: Arc<Server>,
    service: Arc<S>,
    metrics: HttpMetrics,
    stop: Shutdown,
    /// After the stop, the workers still answer what arrives, for at most this long.
    drain_max: Duration,
}

/// Stopping, a worker keeps answering for at least this long, and until no request has
/// come for this long (at most `drain_max`).
const STOP_QUIET: Duration = Duration::from_millis(100);

impl HttpServer {
    /// Binds `addr`, sets the socket timeouts that every accepted connection inherits, and
    /// starts `workers` threads that serve `service`.
    pub fn start<S: Service>(
        name: &'static str,
        addr: SocketAddr,
        limits: Limits,
        service: Arc<S>,
    ) -> Result<HttpServer> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::config(format!("{name}: cannot listen on {addr}")).with_cause(e))?;
        set_inherited_timeouts(&listener, limits.read_timeout)?;
        let addr = listener.local_addr()?;
        let tiny_limits = tiny_http::Limits {
            max_connections: limits.max_connections,
            head_timeout: limits.head_timeout,
            idle_timeout: limits.keepalive_timeout,
            read_timeout: limits.read_timeout,
        };
        let server = Arc::new(
            Server::from_listener_with_limits(listener, None, tiny_limits)
                .map_err(|e| Error::internal(format!("{name}: cannot start HTTP server: {e}")))?,
        );
        let (trigger, stop) = shutdown::channel();
        let shared = Arc::new(Shared {
            name,
            server: server.clone(),
            service,
            metrics: HttpMetrics::default(),
            stop,
            // A request whose head had begun to arrive at the stop is whole by then.
            drain_max: limits.head_timeout,
        });
        let workers = (0..limits.workers)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-http-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawning an HTTP worker thread")
            })
            .collect();
        info!("{name} listening on http://{addr}");
        Ok(HttpServer {
            addr,
            server,
            stop: Some(trigger),
            workers,
        })
    }

    /// Stops accepting and tells the workers to stop: they answer the requests in flight
    /// (with `Connection: close`) and what arrives until no request has come for
    /// `STOP_QUIET`, together. (`stop` does it too; calling this first on every server of
    /// a process stops them all at once.)
    pub fn begin_stop(&mut self) {
        self.server.stop_accepting();
        drop(self.stop.take());
        self.server.unblock_all();
    }

    /// `begin_stop`, then joins the workers.
    pub fn stop(mut self) {
        self.begin_stop();
        for w in self.workers {
            shutdown::join_logged(w);
        }
    }
}

/// Sets SO_RCVTIMEO/SO_SNDTIMEO and TCP_NODELAY on the listening socket. Linux copies them to every accepted
/// socket, which is the only way to bound reads in tiny_http, since it sets no timeouts
/// itself and accepts connections on its own thread. std has no setter on a listener, so we
/// borrow the descriptor as a `TcpStream` (never dropped, so never closed) to reach the same
/// `setsockopt` calls.
///
/// SO_RCVTIMEO also bounds `accept`; upstream tiny_http ended its accept thread on the first
/// error, so our vendored copy (vendor/tiny_http) keeps accepting instead.
fn set_inherited_timeouts(listener: &TcpListener, timeout: Duration) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: the descriptor is valid for the listener's lifetime and ManuallyDrop keeps the
    // borrowed stream from closing it.
    let borrowed = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(listener.as_raw_fd()) });
    borrowed.set_read_timeout(Some(timeout))?;
    borrowed.set_write_timeout(Some(timeout))?;
    // TCP_NODELAY is inherited the same way. tiny_http writes a response through a 1 KiB
    // buffer, so a larger one leaves in several writes; with Nagle's algorithm the last
    // waited for the client's delayed ACK: 44 ms for any response over about 1 KiB
    // (measured on the ranked lists, p50 44 ms → under 1 ms).
    borrowed.set_nodelay(true)?;
    Ok(())
}

fn worker<S: Service>(shared: &Shared<S>) {
    let mut stopping_since = None;
    loop {
        let rq = match stopping_since {
            None if shared.stop.is_triggered() => {
                stopping_since = Some(Instant::now());
                continue;
            }
            // Only `unblock_all()` (at stop) makes recv fail: our tiny_http never ends its
            // accept thread by itself.
            None => match shared.server.recv() {
                Ok(rq) => rq,
                Err(_) => continue,
            },
            // Stopping: answer what has arrived or is arriving, then exit.
            Some(since) => match shared.server.recv_timeout(STOP_QUIET) {
                Ok(Some(rq)) if since.elapsed() < shared.drain_max => rq,
                // A request whose head is still arriving gets at least STOP_QUIET.
                Ok(None) if since.elapsed() < STOP_QUIET => continue,
                _ => return,
            },
        };
        let closing = stopping_since.is_some();
        // serve_one contains a handler's panic itself; this catches one of our own HTTP
        // code (the client then gets tiny_http's empty 500) so the worker lives on anyway.
        let served = panic::catch_unwind(AssertUnwindSafe(|| serve_one(shared, rq, closing)));
        if let Err(payload) = served {
            shared.metrics.panics.fetch_add(1, Ordering::Relaxed);
            error!(
                "{}: panic outside a handler: {}",
                shared.name,
                panic_message(&*payload)
            );
        }
    }
}

/// Answers one request; `closing` (the server is stopping) adds `Connection: close`.
fn serve_one<S: Service>(shared: &Shared<S>, mut rq: tiny_http::Request, closing: bool) {
    let (name, metrics) = (shared.name, &shared.metrics);
    let started = Instant::now();
    let (route, result) = match read_request(&mut rq) {
        Ok(req) => dispatch_contained(name, &req, &shared.server, &*shared.service, metrics),
        Err(e) => ("unmatched", Err(e)),
    };
    let mut allow = None;
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status() >= 500 {
                error!("{name} {} {}: {e}", rq.method(), rq.url());
            }
            allow = e.allow().map(str::to_string);
            Response::json(e.status(), e.to_json())
        }
    };
    metrics.record(route, response.status, started.elapsed().as_secs_f64());
    let len = response.body.len();
    // Header lines as bytes (vendor/tiny_http's `with_raw_headers`): all ASCII, ours.
    let mut head = Vec::with_capacity(160);
    let mut line = |name: &str, value: &str| {
        for part in [name.as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            head.extend_from_slice(part);
        }
    };
    line("Content-Type", response.content_type);
    for (name, value) in SECURITY_HEADERS {
        line(name, value);
    }
    if let Some(allow) = &allow {
        line("Allow", allow);
    }
    if closing {
        line("Connection", "close");
    }
    let out = tiny_http::Response::new(
        response.status.into(),
        Vec::new(),
        std::io::Cursor::new(response.body.into_bytes()),
        Some(len),
        None,
    )
    .with_raw_headers(head);
    if let Err(e) = rq.respond(out) {
        log::debug!("{name}: client went away before the response: {e}");
    }
}

/// Runs the handler; a panic in it (a bug of ours) becomes a 500 `{"error":"internal
/// error"}`, a log line with the route and the panic's message, and a count in
/// `http_panics_total`, and the worker serves the next request. Handlers hold no lock
/// across a panic that others could see half-updated: pooled connections are returned
/// (r2d2 tests them on checkout) and our mutexes are read through poisoning.
fn dispatch_contained<S: Service>(
    name: &'static str,
    req: &Request,
    server: &Server,
    service: &S,
    metrics: &HttpMetrics,
) -> (&'static str, Result<Response>) {
    match panic::catch_unwind(AssertUnwindSafe(|| {
        dispatch(name, req, server, service, metrics)
    })) {
        Ok(outcome) => outcome,
        Err(payload) => {
            metrics.panics.fetch_add(1, Ordering::Relaxed);
            error!(
                "{name} {} {}: handler panicked: {}",
                req.method,
                req.path,
                panic_message(&*payload)
            );
            ("panicked", Err(Error::internal("handler panicked")))
        }
    }
}

fn dispatch<S: Service>(
    name: &'static str,
    req: &Request,
    server: &Server,
    service: &S,
    metrics: &HttpMetrics,
) -> (&'static str, Result<Response>) {
    match req.path.as_str() {
        "/health" => ("/health", only_get(req).and_then(|()| health(service))),
        "/metrics" => (
            "/metrics",
            only_get(req).map(|()| {
                let mut out = String::with_capacity(4096);
                metrics.render(name, server, &mut out);
                service.metrics(&mut out);
                Response::text(200, crate::metrics::exposition(&out))
            }),
        ),
        "/openapi.json" => (
            "/openapi.json",
            only_get(req).map(|()| Response::json(200, OPENAPI_JSON.to_string())),
        ),
        _ => service.handle(req),
    }
}

fn only_get(req: &Request) -> Result<()> {
    if req.method == Method::Get || req.method == Method::Head {
        Ok(())
    } else {
        Err(Error::method_not_allowed("GET, HEAD"))
    }
}

fn health<S: Service>(service: &S) -> Result<Response> {
    let mut body = serde_json::Map::new();
    let status = match service.health() {
        Ok(()) => {
            body.insert("status".into(), "healthy".into());
            200
        }
        Err(e) => {
            body.insert("status".into(), "unhealthy".into());
            body.insert("error".into(), e.message().into());
            503
        }
    };
    body.extend(service.health_details());
    Ok(Response::json(
        status,
        serde_json::Value::Object(body).to_string(),
    ))
}

/// The request target in origin form (`/path?query`). A server must accept the absolute
/// form too (`http://host/path`, RFC 9112 3.2.2): its scheme and authority are dropped.
fn origin_form(target: &str) -> &str {
    let scheme = ["http://", "https://"].into_iter().find(|s| {
        target
            .get(..s.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(s))
    });
    let Some(scheme) = scheme else {
        return target;
    };
    let rest = &target[scheme.len()..];
    match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => &rest[i..],
        // `http://host` or `http://host?q`: the path is `/`, which no route has.
        _ => "/",
    }
}

/// Reads the head fields we use and the body, enforcing the size limit. The body is already
/// in memory: our tiny_http reads bodies of up to 64 KiB (plus one byte, so a larger
/// chunked body is still seen as too large) in the connection's thread, bounded by the
/// socket timeout, so a slow client never holds this worker.
fn read_request(rq: &mut tiny_http::Request) -> Result<Request> {
    let url = origin_form(rq.url());
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (url.to_string(), None),
    };
    let header = |name: &'static str| {
        rq.headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().to_string())
    };
    let content_type = header("Content-Type");
    // Several lines are one comma-separated list (RFC 9110 5.3), which the command service
    // refuses: only the first line was read, and a retry with the second key wrote twice.
    let keys: Vec<&str> = rq
        .headers()
        .iter()
        .filter(|h| h.field.equiv("Idempotency-Key"))
        .map(|h| h.value.as_str())
        .collect();
    let idempotency_key = (!keys.is_empty()).then(|| keys.join(", "));
    if rq.body_length().is_some_and(|n| n > BODY_LIMIT_BYTES) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    rq.as_reader()
        .take(BODY_LIMIT_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| Error::bad_request("could not read the request body").with_cause(e))?;
    if body.len() > BODY_LIMIT_BYTES {
        return Err(too_large());
    }
    Ok(Request {
        method: rq.method().clone(),
        path,
        query,
        content_type,
        idempotency_key,
        body,
    })
}

fn too_large() -> Error {
    Error::payload_too_large(format!("request body exceeds {BODY_LIMIT_BYTES} bytes"))
}

/// Sends `GET path` and returns the status code: the health-check client, std only.
pub fn get_status(
    addr: impl std::net::ToSocketAddrs,
    path: &str,
    timeout: Duration,
) -> std::io::Result<u16> {
    use std::io::Write;
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed status line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_form_targets_are_routed_by_their_path() {
        assert_eq!(origin_form("/api/orders"), "/api/orders");
        assert_eq!(origin_form("http://host:8080/api/orders"), "/api/orders");
        assert_eq!(origin_form("HTTPS://h/a?b=c"), "/a?b=c");
        assert_eq!(origin_form("http://host"), "/");
        assert_eq!(origin_form("http://host?x=1"), "/");
        assert_eq!(origin_form("httpx://host/a"), "httpx://host/a");
        assert_eq!(origin_form("*"), "*");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("Home%20%26%20Garden", false).unwrap(),
            "Home & Garden"
        );
        assert_eq!(percent_decode("a+b", false).unwrap(), "a+b");
        assert_eq!(percent_decode("a+b", true).unwrap(), "a b");
        assert!(percent_decode("%zz", false).is_err());
        assert!(percent_decode("%ff", false).is_err());
    }
}
