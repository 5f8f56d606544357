//! Bounded connections (issue 9): a cap on open connections answered with 503 beyond it,
//! a total deadline for a request head however slowly it trickles, idle keep-alive
//! connections closed, and the process's threads bounded by the cap whatever clients do.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use cqrs_analytics::app::Role;

use crate::harness::*;

/// A request head that a trickler never finishes within the head deadline.
const SLOW_HEAD: &[u8] = b"GET /api/analytics/sync-status HTTP/1.1\r\nHost: flood\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";

/// One trickling socket: how much of the head it has sent, what it has read back.
struct Trickler {
    stream: TcpStream,
    sent: usize,
    reply: Vec<u8>,
    opened: Instant,
}

/// What the flood saw: answers by their first line, and the longest time a trickler that
/// was answered 408 had been open.
#[derive(Default)]
struct FloodLog {
    answers: BTreeMap<String, usize>,
    closed_408_after_max: Duration,
    sample_503: Option<String>,
}

/// `sockets` connections to `addr`, each sending one byte of `SLOW_HEAD` per `tick`; one
/// that is answered or closed is opened again, until `stop` is set.
fn flood(addr: SocketAddr, sockets: usize, tick: Duration, stop: &AtomicBool) -> FloodLog {
    let mut log = FloodLog::default();
    let open = || -> Option<Trickler> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_nonblocking(true).ok()?;
        Some(Trickler {
            stream,
            sent: 0,
            reply: Vec::new(),
            opened: Instant::now(),
        })
    };
    let mut all: Vec<Option<Trickler>> = (0..sockets).map(|_| open()).collect();
    while !stop.load(Ordering::SeqCst) {
        for slot in all.iter_mut() {
            let done = match slot {
                Some(t) => tick_one(t),
                None => true,
            };
            if done {
                if let Some(t) = slot.take() {
                    record(&mut log, &t);
                }
                *slot = open();
            }
        }
        thread::sleep(tick);
    }
    log
}

/// Reads what arrived and sends one more byte; true when the server has closed.
fn tick_one(t: &mut Trickler) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match t.stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => t.reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return true,
        }
    }
    if t.sent < SLOW_HEAD.len() {
        match t.stream.write(&SLOW_HEAD[t.sent..t.sent + 1]) {
            Ok(n) => t.sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}

fn record(log: &mut FloodLog, t: &Trickler) {
    let text = String::from_utf8_lossy(&t.reply).to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or("closed without an answer")
        .to_string();
    if first.contains(" 408 ") {
        log.closed_408_after_max = log.closed_408_after_max.max(t.opened.elapsed());
    }
    if first.contains(" 503 ") && log.sample_503.is_none() {
        log.sample_503 = Some(text);
    }
    *log.answers.entry(first).or_default() += 1;
}

/// Whole response on a keep-alive connection: head, then `Content-Length` bytes.
fn read_response(s: &mut TcpStream) -> Option<(u16, String)> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((
        head[9..12].parse().ok()?,
        String::from_utf8_lossy(&body).into(),
    ))
}

#[test]
fn a_connection_flood_gets_503s_and_408s_while_threads_stay_bounded() {
    let env = TestEnv::new();
    let cap: u64 = 16;
    let head_timeout = Duration::from_millis(1500);
    let mut cmd = env.binary("query-service");
    cmd.env("QUERY_SERVICE_PORT", "0")
        .env("QUERY_HTTP_WORKERS", "2")
        .env("READ_POOL_SIZE", "2")
        .env("HTTP_MAX_CONNECTIONS", cap.to_string())
        .env("HTTP_HEAD_TIMEOUT_MS", head_timeout.as_millis().to_string());
    let service = ChildService::spawn(&mut cmd, "query-service", &format!("conn-flood-{}", env.id));
    let addr = service.addr;
    let threads_before = service.proc_status("Threads");

    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        thread::spawn(move || flood(addr, 150, Duration::from_millis(100), &stop))
    };
    // Real requests meanwhile: each on a fresh connection, so each competes for a slot.
    let mut statuses = BTreeMap::new();
    let mut threads_max = 0;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let r = get(addr, "/api/analytics/sync-status");
        *statuses.entry(r.status).or_insert(0) += 1;
        threads_max = threads_max.max(service.proc_status("Threads"));
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let log = flooder.join().unwrap();

    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "real requests during the flood: {statuses:?}"
    );
    assert!(
        threads_max <= threads_before + cap + 4,
        "threads: {threads_before} before, {threads_max} during the flood (cap {cap})"
    );
    let answers = format!("{:?}", log.answers);
    let refused = log
        .sample_503
        .as_deref()
        .unwrap_or_else(|| panic!("no 503: {answers}"));
    assert!(
        refused.contains("Connection: close")
            && refused.ends_with(r#"{"error":"too many connections"}"#),
        "{refused}"
    );
    assert!(answers.contains(" 408 "), "no head deadline hit: {answers}");
    // Each trickler sent a byte every 100 ms, so no single read ever timed out: only the
    // total head deadline can have closed it (the bound is generous, for a busy machine).
    assert!(
        log.closed_408_after_max < head_timeout * 3,
        "a trickler was answered 408 only after {:?}",
        log.closed_408_after_max
    );
    // Back to normal once the flood stops, and the metrics saw it.
    wait_until(
        "the service to answer again",
        Duration::from_secs(10),
        || (get(addr, "/health").status == 200).then_some(()),
    );
    let metrics = get(addr, "/metrics").body;
    let rejected = metrics
        .lines()
        .find_map(|l| l.strip_prefix("http_connections_rejected_total{service=\"query-service\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(rejected > 0, "{metrics}");
    assert!(
        metrics.contains("http_connections_open{service=\"query-service\"} "),
        "{metrics}"
    );
    eprintln!(
        "flood: real requests {statuses:?}, threads {threads_before} -> {threads_max}, flood answers {answers}, rejected {rejected}"
    );
}

#[test]
fn an_idle_keepalive_connection_is_closed_without_an_answer() {
    let env = TestEnv::new();
    let app = env.start_with(Role::Query, |c| {
        c.http_keepalive_timeout = Duration::from_millis(400);
    });
    let mut s = TcpStream::connect(app.query()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Two requests on one connection, idling less than the timeout in between.
    for _ in 0..2 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let reply = read_response(&mut s);
        assert_eq!(reply.map(|r| r.0), Some(200));
        thread::sleep(Duration::from_millis(100));
    }
    // Then idle: the server closes the connection, and says nothing on it.
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        idle_from.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        idle_from.elapsed()
    );
}

/// HTTP/1.1 pipelining: requests sent in one write are handled by several workers at once,
/// and each response waits for the one before it (the vendored tiny_http's one-shot hand-off
/// between a connection's response writers, which wakes a writer only if it waits).
#[test]
fn pipelined_requests_are_answered_in_order() {
    let env = TestEnv::new();
    let app = env.start(Role::Query);
    let mut s = TcpStream::connect(app.query()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for round in 0..5 {
        let ids: Vec<u64> = (1..=40).map(|i| round * 1000 + i).collect();
        let burst: String = ids
            .iter()
            .map(|id| format!("GET /api/analytics/products/{id}/sales HTTP/1.1\r\nHost: t\r\n\r\n"))
            .collect();
        s.write_all(burst.as_bytes()).unwrap();
        for id in &ids {
            let (status, body) = read_response(&mut s).expect("a response for each request");
            assert_eq!(status, 404, "{body}");
            assert!(
                body.contains(&format!("product {id} has")),
                "the answer to product {id} came out of order: {body}"
            );
        }
    }
}

/// Out of file descriptors, the server drops the connections it cannot take and goes on
/// listening. The accept thread unwrapped the socket's clone: when `accept` got the last
/// descriptor and the clone found none (EMFILE), it panicked and the port closed for good
/// while the process lived on. A connection takes two descriptors, so whether `accept` or
/// the clone runs out depends on the parity of those already open: both limits are tried.
#[test]
fn running_out_of_file_descriptors_does_not_stop_the_listener() {
    let env = TestEnv::new();
    for limit in [200, 201] {
        let mut cmd = env.binary("command-service");
        cmd.env("COMMAND_SERVICE_PORT", "0");
        let mut service = ChildService::spawn(
            &mut cmd,
            "command-service",
            &format!("emfile-{limit}-{}", env.id),
        );
        let pid = service.child.id().to_string();
        let nofile = format!("--nofile={limit}:{limit}");
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &nofile])
            .status()
            .expect("prlimit (util-linux)");
        assert!(status.success());
        let flood: Vec<TcpStream> = (0..300)
            .filter_map(|_| TcpStream::connect_timeout(&service.addr, Duration::from_secs(2)).ok())
            .collect();
        thread::sleep(Duration::from_millis(500));
        drop(flood);
        let answered = wait_until(
            "the server to answer again once the descriptors are free",
            Duration::from_secs(20),
            || {
                TcpStream::connect_timeout(&service.addr, Duration::from_secs(1))
                    .ok()
                    .and_then(|_| try_request(service.addr, "GET", "/health", &[], b"").ok())
                    .filter(|r| r.status == 200)
            },
        );
        assert_eq!(answered.status, 200);
        // (The postgres crate may panic too, building a connection's runtime without a
        // descriptor, in a pool worker that r2d2 replaces: not the listener.)
        let log = service.log();
        assert!(!log.contains("refined_tcp_stream"), "limit {limit}:\n{log}");
        service.terminate(Duration::from_secs(20));
    }
}
