//! Hostile input at the HTTP boundary, over raw TCP where the harness' polite client cannot
//! say it: oversized and chunked bodies, Content-Length lies, slow and idle clients, huge
//! numbers, deep nesting, bytes that are not UTF-8, ids that overflow. Every answer must be
//! the documented 4xx (never a 5xx, never silence), nothing may be written, and the server
//! must stay up and keep answering everybody else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cqrs_analytics::app::Role;
use serde_json::json;

use crate::harness::*;

const JSON: &[(&str, &str)] = &[("Content-Type", "application/json")];

/// What came back on a raw connection: the status, if any response arrived, and the text.
struct Raw {
    status: Option<u16>,
    text: String,
    elapsed: Duration,
}

/// Writes `bytes` as they are (errors ignored: the server may answer and close early), then
/// reads until the server closes or `timeout` passes.
fn raw(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Raw {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    read_reply(&mut s, started)
}

fn read_reply(s: &mut TcpStream, started: Instant) -> Raw {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // One response is enough: stop once its declared body has arrived.
                if complete(&out) {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|t| t.parse().ok());
    Raw {
        status,
        text,
        elapsed: started.elapsed(),
    }
}

fn complete(out: &[u8]) -> bool {
    let text = String::from_utf8_lossy(out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    body.len() >= len
}

fn post_head(path: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}\r\n"
    )
}

fn assert_status(r: &Raw, want: u16, what: &str) {
    assert_eq!(r.status, Some(want), "{what}: got {:?}", r.text);
}

fn healthy(addr: SocketAddr) {
    let r = get(addr, "/health");
    assert_eq!(
        r.status, 200,
        "the server should still be healthy: {}",
        r.body
    );
}

fn product_body() -> String {
    json!({"name": "n", "category": "c", "price": 1.5, "stock": 5}).to_string()
}

/// Chunked transfer coding of `body` in chunks of `size` bytes.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[test]
fn bodies_over_64_kib_get_413_with_or_without_content_length() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let before = write_counts(&env);
    // A valid product padded with white space (still valid JSON) to just over the limit.
    let mut big = product_body().into_bytes();
    big.resize(64 * 1024 + 1, b' ');
    let mut at_limit = product_body().into_bytes();
    at_limit.resize(64 * 1024, b' ');
    let t = Duration::from_secs(10);
    for path in ["/api/products", "/api/orders"] {
        // Declared length over the limit: refused before the body is read.
        let mut req = post_head(path, &format!("Content-Length: {}\r\n", big.len())).into_bytes();
        req.extend_from_slice(&big);
        assert_status(&raw(a, &req, t), 413, "Content-Length over 64 KiB");
        // Chunked: no declared length, refused as soon as the count passes the limit.
        let mut req = post_head(path, "Transfer-Encoding: chunked\r\n").into_bytes();
        req.extend_from_slice(&chunked(&big, 4096));
        assert_status(&raw(a, &req, t), 413, "chunked body over 64 KiB");
        // A megabyte in one chunk.
        let mut req = post_head(path, "Transfer-Encoding: chunked\r\n").into_bytes();
        req.extend_from_slice(&chunked(&vec![b' '; 1 << 20], 1 << 20));
        assert_status(&raw(a, &req, t), 413, "one 1 MiB chunk");
    }
    assert_eq!(
        write_counts(&env),
        before,
        "an oversized body wrote something"
    );
    // Exactly 64 KiB is allowed, with or without a declared length.
    let mut req = post_head(
        "/api/products",
        &format!("Content-Length: {}\r\n", at_limit.len()),
    )
    .into_bytes();
    req.extend_from_slice(&at_limit);
    assert_status(&raw(a, &req, t), 201, "exactly 64 KiB");
    let mut req = post_head("/api/products", "Transfer-Encoding: chunked\r\n").into_bytes();
    req.extend_from_slice(&chunked(&at_limit, 1000));
    assert_status(&raw(a, &req, t), 201, "exactly 64 KiB, chunked");
    healthy(a);
}

#[test]
fn content_length_lies_get_4xx_and_write_nothing() {
    let env = TestEnv::new();
    let timeout = Duration::from_millis(300);
    let app = env.start_with(Role::Command, |c| c.http_read_timeout = timeout);
    let a = app.command();
    let before = write_counts(&env);
    let body = product_body();
    let t = Duration::from_secs(10);

    // Shorter than the body: the server reads a truncated document.
    let req = format!(
        "{}{body}",
        post_head("/api/products", "Content-Length: 10\r\n")
    );
    assert_status(
        &raw(a, req.as_bytes(), t),
        400,
        "Content-Length shorter than the body",
    );

    // Longer than the body, on a connection kept open: the read times out, small (tiny_http
    // buffers up to 1 KiB itself) and large (we read it).
    for declared in [500, 5000] {
        let req = format!(
            "{}{body}",
            post_head("/api/products", &format!("Content-Length: {declared}\r\n"))
        );
        let r = raw(a, req.as_bytes(), t);
        assert!(
            r.status.is_none_or(|s| (400..500).contains(&s)),
            "Content-Length {declared} > body: {:?}",
            r.text
        );
        assert!(
            r.elapsed < timeout * 4 + Duration::from_secs(1),
            "Content-Length {declared} > body held the connection for {:?}",
            r.elapsed
        );
    }

    // Not a number, negative, or in conflict with itself or with chunking.
    for extra in [
        "Content-Length: abc\r\n".to_string(),
        "Content-Length: -1\r\n".to_string(),
        "Content-Length: 99999999999999999999999999\r\n".to_string(),
        format!("Content-Length: 3\r\nContent-Length: {}\r\n", body.len()),
    ] {
        let req = format!("{}{body}", post_head("/api/products", &extra));
        let r = raw(a, req.as_bytes(), t);
        assert!(
            r.status.is_some_and(|s| (400..500).contains(&s)),
            "{extra:?}: {:?}",
            r.text
        );
    }
    // A chunk size that lies.
    let req = format!(
        "{}ffff\r\n{body}\r\n0\r\n\r\n",
        post_head("/api/products", "Transfer-Encoding: chunked\r\n")
    );
    let r = raw(a, req.as_bytes(), t);
    assert!(
        r.status.is_none_or(|s| (400..500).contains(&s)),
        "lying chunk size: {:?}",
        r.text
    );
    assert_eq!(
        write_counts(&env),
        before,
        "a lying request wrote something"
    );
    healthy(a);
}

/// The binary running `command-service` as a child process (killed on drop), so that a
/// crash shows as a failed assertion instead of taking the whole test binary down.
fn child_command_service(env: &TestEnv) -> ChildService {
    let mut cmd = env.binary("command-service");
    cmd.env("COMMAND_SERVICE_PORT", "0");
    ChildService::spawn(&mut cmd, "command-service", &format!("hostile-{}", env.id))
}

#[test]
fn a_huge_declared_content_length_does_not_crash_the_server() {
    // The server answers 413 from the declared length; what happens to the unread body
    // afterwards must not depend on the number the client made up.
    let env = TestEnv::new();
    let mut svc = child_command_service(&env);
    let before = write_counts(&env);
    for declared in ["100000000000000", "18446744073709551615"] {
        let req = format!(
            "{}{}",
            post_head("/api/products", &format!("Content-Length: {declared}\r\n")),
            product_body()
        );
        let r = raw(svc.addr, req.as_bytes(), Duration::from_secs(10));
        assert!(
            r.status.is_some_and(|s| (400..500).contains(&s)),
            "Content-Length: {declared}: {:?}",
            r.text
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            svc.alive(),
            "the server process died after a request declaring Content-Length: {declared}"
        );
        let status = cqrs_analytics::http::get_status(svc.addr, "/health", Duration::from_secs(5));
        assert_eq!(
            status.ok(),
            Some(200),
            "health after Content-Length: {declared}"
        );
    }
    assert_eq!(write_counts(&env), before);
}

#[test]
fn a_client_trickling_its_body_does_not_hold_a_worker() {
    // One worker, so a held worker is a dead server. The trickler declares a body larger than
    // tiny_http's 1 KiB pre-read and sends a byte every timeout/3, never stalling a read long
    // enough to time out. It must not hold the worker beyond about twice the read timeout.
    let env = TestEnv::new();
    let timeout = Duration::from_millis(300);
    let app = env.start_with(Role::Command, |c| {
        c.http_read_timeout = timeout;
        c.command_http_workers = 1;
    });
    let a = app.command();
    let before = write_counts(&env);
    let trickle_for = Duration::from_secs(6);
    let trickler = std::thread::spawn(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        s.write_all(post_head("/api/products", "Content-Length: 60000\r\n").as_bytes())
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while started.elapsed() < trickle_for {
            if s.write_all(b" ").is_err() {
                break; // the server closed the connection: fine
            }
            if let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            std::thread::sleep(timeout / 3);
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    std::thread::sleep(timeout / 2);
    // Meanwhile a real client must be served once the trickler's request was cut off.
    let started = Instant::now();
    let r = get(a, "/health");
    let waited = started.elapsed();
    let trickler_saw = trickler.join().unwrap();
    assert_eq!(r.status, 200);
    assert!(
        waited < timeout * 4 + Duration::from_secs(1),
        "a trickling client held the only worker: /health waited {waited:?} (read timeout {timeout:?})"
    );
    assert!(
        trickler_saw.is_empty() || trickler_saw.starts_with("HTTP/1.1 4"),
        "the trickler should get a 4xx or nothing: {trickler_saw:?}"
    );
    assert_eq!(write_counts(&env), before);
}

/// Opens `n` connections to `addr`, each sending `make(i)` and then nothing more.
fn idle_sockets(addr: SocketAddr, n: usize, make: impl Fn(usize) -> Vec<u8>) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&make(i));
            s
        })
        .collect()
}

/// Ten products created and ten health checks while `idle` sockets are open: each must be
/// answered within a generous deadline.
fn real_clients_are_served(a: SocketAddr, label: &str) {
    for i in 0..10 {
        let started = Instant::now();
        let r = post_json(
            a,
            "/api/products",
            &json!({"name": format!("{label}{i}"), "category": "c", "price": 1, "stock": 1}),
        );
        let took = started.elapsed();
        assert_eq!(r.status, 201, "{label}: {r:?} after {took:?}");
        assert!(
            took < Duration::from_secs(5),
            "{label}: a request took {took:?}"
        );
        let started = Instant::now();
        assert_eq!(get(a, "/health").status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{label}: /health"
        );
    }
}

#[test]
fn hundreds_of_idle_sockets_do_not_starve_real_clients() {
    let env = TestEnv::new();
    let app = env.start(Role::Command); // the default read timeout, as in production
    let a = app.command();
    // 300 sockets: a third say nothing, a third send half a request line, a third a whole
    // head with no body announced and then stay open (keep-alive).
    let idle = idle_sockets(a, 300, |i| match i % 3 {
        0 => Vec::new(),
        1 => b"POST /api/prod".to_vec(),
        _ => b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
    });
    real_clients_are_served(a, "idle");
    drop(idle);
    assert_eq!(write_counts(&env).0, 10);
}

#[test]
fn sockets_stalled_mid_body_do_not_starve_real_clients() {
    // The same with 100 sockets that announce a 2,000-byte body, send 9 bytes of it and
    // stall: each one is a request handed to a worker, which then waits for the body.
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let stalled = idle_sockets(a, 100, |_| {
        format!(
            "{}{{\"name\":",
            post_head("/api/products", "Content-Length: 2000\r\n")
        )
        .into_bytes()
    });
    real_clients_are_served(a, "stalled");
    drop(stalled);
    assert_eq!(write_counts(&env).0, 10);
}

#[test]
fn huge_numbers_get_400_and_write_nothing() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let pid = create_product(a, "p", "c", 2.0, 10);
    let before = write_counts(&env);
    let long_digits = "9".repeat(60_000);
    let huge = [
        "1e400",
        "-1e400",
        "1e-400",
        "123456789012345678901234567890",
        "1E99999999999999999999999",
        "1e-99999999999999999999999",
        "9223372036854775808",
        "18446744073709551616",
        "-9223372036854775809",
        "0.0000000000000000000000000001",
        long_digits.as_str(),
    ];
    for n in huge {
        let bodies = [
            (
                "/api/products",
                format!(r#"{{"name":"n","category":"c","price":{n},"stock":1}}"#),
            ),
            (
                "/api/products",
                format!(r#"{{"name":"n","category":"c","price":1,"stock":{n}}}"#),
            ),
            (
                "/api/orders",
                format!(r#"{{"customerId":{n},"items":[{{"productId":{pid},"quantity":1}}]}}"#),
            ),
            (
                "/api/orders",
                format!(r#"{{"customerId":1,"items":[{{"productId":{n},"quantity":1}}]}}"#),
            ),
            (
                "/api/orders",
                format!(r#"{{"customerId":1,"items":[{{"productId":{pid},"quantity":{n}}}]}}"#),
            ),
            (
                "/api/orders",
                format!(
                    r#"{{"customerId":1,"items":[{{"productId":{pid},"quantity":1,"price":{n}}}]}}"#
                ),
            ),
        ];
        for (path, body) in bodies {
            let r = request(a, "POST", path, JSON, body.as_bytes());
            assert_eq!(
                r.status,
                400,
                "{path} {}: {}",
                &body[..body.len().min(120)],
                r.body
            );
            assert!(r.json()["error"].is_string(), "{}", r.body);
        }
    }
    assert_eq!(write_counts(&env), before, "a huge number wrote something");
    healthy(a);
}

#[test]
fn deep_nesting_gets_400_and_does_not_crash() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let pid = create_product(a, "p", "c", 2.0, 10);
    let before = write_counts(&env);
    // As deep as 64 KiB allows, at the top level and inside every field we read.
    let depth = 30_000;
    let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(depth / 3), "}".repeat(depth / 3));
    for nest in [&arrays, &objects] {
        let bodies = [
            ("/api/products", nest.clone()),
            (
                "/api/products",
                format!(r#"{{"name":{nest},"category":"c","price":1,"stock":1}}"#),
            ),
            (
                "/api/products",
                format!(r#"{{"name":"n","category":"c","price":1,"stock":1,"extra":{nest}}}"#),
            ),
            (
                "/api/orders",
                format!(r#"{{"customerId":1,"items":{nest}}}"#),
            ),
            (
                "/api/orders",
                format!(
                    r#"{{"customerId":1,"items":[{{"productId":{pid},"quantity":1,"price":{nest}}}]}}"#
                ),
            ),
        ];
        for (path, body) in bodies {
            assert!(body.len() <= 64 * 1024, "{}", body.len());
            let r = request(a, "POST", path, JSON, body.as_bytes());
            assert_eq!(r.status, 400, "{path} nested {depth}: {}", r.body);
        }
    }
    assert_eq!(
        write_counts(&env),
        before,
        "a nested document wrote something"
    );
    healthy(a);
}

#[test]
fn bodies_that_are_not_utf8_get_400_and_write_nothing() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let before = write_counts(&env);
    let bodies: [&[u8]; 7] = [
        b"{\"name\":\"\xff\",\"category\":\"c\",\"price\":1,\"stock\":1}",
        b"{\"\xc3\":\"n\",\"category\":\"c\",\"price\":1,\"stock\":1}",
        // Overlong encoding of '/', and an encoded surrogate.
        b"{\"name\":\"\xc0\xaf\",\"category\":\"c\",\"price\":1,\"stock\":1}",
        b"{\"name\":\"\xed\xa0\x80\",\"category\":\"c\",\"price\":1,\"stock\":1}",
        // A lone surrogate escape is valid JSON text but no Unicode string.
        br#"{"name":"\ud800","category":"c","price":1,"stock":1}"#,
        // UTF-8 byte order mark, then UTF-16.
        b"\xef\xbb\xbf{\"name\":\"n\",\"category\":\"c\",\"price\":1,\"stock\":1}",
        b"\xff\xfe{\x00}\x00",
    ];
    for body in bodies {
        for path in ["/api/products", "/api/orders"] {
            let r = request(a, "POST", path, JSON, body);
            assert_eq!(r.status, 400, "{path} {body:?}: {}", r.body);
        }
    }
    assert_eq!(write_counts(&env), before);
    healthy(a);
}

#[test]
fn bytes_that_are_not_ascii_in_the_request_head_get_400() {
    // RFC 9110 allows obs-text (0x80-0xFF) in field values and a server must answer
    // something; silently closing the connection leaves the client guessing.
    let env = TestEnv::new();
    let app = env.start(Role::All);
    let before = write_counts(&env);
    let t = Duration::from_secs(10);
    let body = product_body();
    let heads: [(SocketAddr, Vec<u8>); 3] = [
        (
            app.command(),
            [
                post_head("/api/products", &format!("Content-Length: {}\r\n", body.len()))
                    .strip_suffix("\r\n")
                    .unwrap()
                    .as_bytes(),
                b"Idempotency-Key: \xd7\xf8\r\n\r\n",
                body.as_bytes(),
            ]
            .concat(),
        ),
        (
            app.query(),
            b"GET /api/analytics/categories/\xff/revenue HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            app.query(),
            b"GET /health HTTP/1.1\r\nHost: t\r\nX-Name: caf\xe9\r\nConnection: close\r\n\r\n".to_vec(),
        ),
    ];
    for (addr, req) in heads {
        let r = raw(addr, &req, t);
        assert!(
            r.status.is_some_and(|s| (200..500).contains(&s)),
            "{:?}: expected an answer (4xx, or 200 for /health), got {:?}",
            String::from_utf8_lossy(&req),
            r.text
        );
    }
    assert_eq!(write_counts(&env), before);
    healthy(app.command());
    healthy(app.query());
}

#[test]
fn a_request_head_cannot_grow_without_bound() {
    // tiny_http reads the request line and each header line into memory until CRLF. A
    // client that never sends one must be cut off long before it has sent 16 MiB.
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    for prefix in [&b"GET /"[..], &b"GET / HTTP/1.1\r\nX-Long: "[..]] {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(prefix).unwrap();
        let chunk = vec![b'a'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 16 << 20 {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break, // refused (reset) or no longer read: cut off
            }
        }
        assert!(
            sent < 16 << 20,
            "the server accepted {} MiB of one header line",
            sent >> 20
        );
    }
    healthy(a);
}

#[test]
fn path_ids_that_overflow_or_are_not_ids_get_400() {
    let env = TestEnv::new();
    let app = env.start(Role::Query);
    let q = app.query();
    // Longer than tiny_http's (patched) 8 KiB line limit: 414 before routing.
    let long = "9".repeat(10_000);
    for path in [
        format!("/api/analytics/products/{long}/sales"),
        format!("/api/analytics/categories/{long}/revenue"),
    ] {
        assert_eq!(request(q, "GET", &path, &[], b"").status, 414);
    }
    let bad = [
        "9223372036854775808",
        "18446744073709551616",
        "99999999999999999999999999999999999999",
        "0",
        "-1",
        "-9223372036854775809",
        "1e3",
        "1.0",
        "+1",
        "0x10",
        "%20",
        "1%00",
        "%ff",
        "%",
    ];
    for route in ["products/{}/sales", "customers/{}/lifetime-value"] {
        for id in bad {
            let path = format!("/api/analytics/{}", route.replace("{}", id));
            let r = get(q, &path);
            assert_eq!(r.status, 400, "{}: {}", &path[..path.len().min(80)], r.body);
            assert!(r.json()["error"].is_string());
        }
        // The largest id is an id: never seen, so 404.
        let path = format!(
            "/api/analytics/{}",
            route.replace("{}", "9223372036854775807")
        );
        assert_eq!(get(q, &path).status, 404, "{path}");
    }
    // Categories: bad percent-encoding or bytes that are not UTF-8 are 400, odd names 404.
    for (cat, want) in [
        ("%ff", 400),
        ("%c0%af", 400),
        ("%zz", 400),
        ("%", 400),
        ("%00", 0), // 0: any 4xx
        ("%E2%80%AE", 404),
        (&long[..1000], 404),
    ] {
        let path = format!("/api/analytics/categories/{cat}/revenue");
        let r = get(q, &path);
        let ok = if want == 0 {
            (400..500).contains(&r.status)
        } else {
            r.status == want
        };
        assert!(
            ok,
            "{}: want {want}, got {} {}",
            &path[..path.len().min(80)],
            r.status,
            r.body
        );
    }
    // Hourly bounds that are not timestamps, or that overflow.
    for query in [
        "from=%ff",
        "from=99999-01-01T00:00:00Z",
        "from=2026-13-01T00:00:00Z",
        "to=-1",
        "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
    ] {
        let r = get(q, &format!("/api/analytics/sales/hourly?{query}"));
        assert_eq!(r.status, 400, "{query}: {}", r.body);
    }
    healthy(q);
}

/// Sends `bytes` on one connection and reads until the server closes it or `timeout` passes:
/// every response the server sent, and whether it closed the connection.
fn raw_all(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    let (mut out, mut buf) = (Vec::new(), [0u8; 4096]);
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// A body whose length the server cannot be sure of is refused, and the connection closed:
/// the bytes after a misread body would otherwise be read as a second request (here a
/// whole product POST, which upstream tiny_http created after answering 400 to the first).
#[test]
fn a_body_of_uncertain_length_is_refused_and_nothing_after_it_runs() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let before = write_counts(&env);
    let body = product_body();
    let smuggled = format!(
        "POST /api/products HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let n = smuggled.len();
    for (framing, status) in [
        ("Content-Length: abc".to_string(), 400),
        ("Content-Length: -1".to_string(), 400),
        ("Content-Length: +5".to_string(), 400),
        ("Content-Length: 0x10".to_string(), 400),
        ("Content-Length: 1e2".to_string(), 400),
        ("Content-Length: 5 0".to_string(), 400),
        (format!("Content-Length: {n}, {n}"), 400),
        (format!("Content-Length: 0\r\nContent-Length: {n}"), 400),
        (
            format!("Content-Length: {n}\r\nTransfer-Encoding: chunked"),
            400,
        ),
        ("Transfer-Encoding: xchunked".to_string(), 501),
        ("Transfer-Encoding: gzip".to_string(), 501),
        ("Transfer-Encoding: gzip, chunked".to_string(), 501),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked".to_string(),
            501,
        ),
    ] {
        let req = format!(
            "POST /api/products HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{framing}\r\n\r\n{smuggled}"
        );
        let (text, closed) = raw_all(a, req.as_bytes(), Duration::from_secs(5));
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} ")),
            "{framing:?}: {text:?}"
        );
        assert_eq!(
            text.matches("HTTP/1.1 ").count(),
            1,
            "{framing:?}: one answer, then the connection closes: {text:?}"
        );
        assert!(text.contains("{\"error\":"), "{framing:?}: {text:?}");
        assert!(closed, "{framing:?}: the connection stays open");
        assert_eq!(write_counts(&env), before, "{framing:?} wrote something");
    }
    // What stays accepted: a length with leading zeros, chunked in any case, and a length
    // repeated in a second identical header.
    let padded = format!("Content-Length: 000{}", body.len());
    let repeated = format!("Content-Length: {0}\r\nContent-Length: {0}", body.len());
    for framing in [padded.as_str(), repeated.as_str()] {
        let req = format!(
            "{}{body}",
            post_head("/api/products", &format!("{framing}\r\n"))
        );
        assert_status(
            &raw(a, req.as_bytes(), Duration::from_secs(5)),
            201,
            framing,
        );
    }
    let mut req = post_head("/api/products", "Transfer-Encoding: Chunked\r\n").into_bytes();
    req.extend_from_slice(&chunked(body.as_bytes(), 7));
    assert_status(&raw(a, &req, Duration::from_secs(5)), 201, "Chunked");
    // A malformed chunked body (here a trailer field, which is not supported) is a 400
    // that says so, and the connection closes.
    let before = write_counts(&env);
    for tail in ["0\r\nX-Trailer: 1\r\n\r\n", "zz\r\n"] {
        let req = format!(
            "POST /api/products HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n{tail}{smuggled}",
            body.len()
        );
        let (text, closed) = raw_all(a, req.as_bytes(), Duration::from_secs(5));
        assert!(text.starts_with("HTTP/1.1 400 "), "{tail:?}: {text:?}");
        assert!(
            text.contains("malformed chunked body"),
            "{tail:?}: {text:?}"
        );
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{tail:?}: {text:?}");
        assert!(closed, "{tail:?}");
    }
    assert_eq!(
        write_counts(&env),
        before,
        "a malformed chunked body wrote something"
    );
    healthy(a);
}

/// HTTP/2 spoken without negotiation gets 505 and a closed connection. Upstream tiny_http
/// waited forever to write that 505, so each such connection kept its thread and its place
/// under `HTTP_MAX_CONNECTIONS` after the client left.
#[test]
fn http2_gets_505_and_leaves_no_connection_behind() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let open = || metric(a, "http_connections_open");
    let baseline = open();
    for _ in 0..10 {
        for req in [
            &b"GET /health HTTP/2.0\r\nHost: test\r\n\r\n"[..],
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            &b"GET /health HTTP/3.0\r\nHost: test\r\n\r\n"[..],
        ] {
            let (text, closed) = raw_all(a, req, Duration::from_secs(5));
            assert!(text.starts_with("HTTP/1.1 505 "), "{text:?}");
            assert!(text.contains("{\"error\":"), "{text:?}");
            assert!(closed, "the connection stays open after 505");
        }
    }
    wait_until(
        "the connections' count back where it was",
        Duration::from_secs(5),
        || (open() <= baseline).then_some(()),
    );
    healthy(a);
}

/// Requests tiny_http answers itself, before any route sees them, are counted by status in
/// `http_requests_refused_total`; they were in no counter.
#[test]
fn requests_refused_before_routing_are_counted() {
    let env = TestEnv::new();
    let app = env.start_with(Role::Command, |c| {
        c.http_head_timeout = Duration::from_millis(300);
    });
    let a = app.command();
    let refused = |status: u16| {
        metric(
            a,
            &format!(
                "http_requests_refused_total{{service=\"command-service\",status=\"{status}\"}}"
            ),
        )
    };
    let t = Duration::from_secs(5);
    for (request, status) in [
        (&b"NONSENSE\r\n\r\n"[..], 400),
        (&b"GET /health HTTP/2.0\r\nHost: test\r\n\r\n"[..], 505),
        (&b"GET /health HTTP/1.1\r\nHost: te"[..], 408),
        (
            &b"POST /api/products HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            501,
        ),
    ] {
        let before = refused(status);
        assert_status(
            &raw(a, request, t),
            status,
            &String::from_utf8_lossy(request),
        );
        assert_eq!(refused(status), before + 1.0, "{status}");
    }
    let routed = metric(a, "http_requests_total");
    assert_status(&raw(a, b"NONSENSE\r\n\r\n", t), 400, "again");
    // Routed requests are counted apart: only the scrapes in between were added.
    assert_eq!(metric(a, "http_requests_total"), routed + 1.0);
}

/// `Connection: Upgrade` (as `curl --http2` sends) is ignored: the request is answered at
/// once, over HTTP/1.1. Upstream tiny_http gave such a request the raw socket as its body,
/// so a worker read it until the read timeout and answered 400 to a valid body.
#[test]
fn an_upgrade_request_is_answered_as_plain_http_1_1() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let upgrade = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";
    let t = Duration::from_secs(10);
    let r = raw(
        a,
        format!("GET /health HTTP/1.1\r\nHost: test\r\n{upgrade}\r\n").as_bytes(),
        t,
    );
    assert_status(&r, 200, "GET with Upgrade");
    assert!(r.elapsed < Duration::from_secs(1), "took {:?}", r.elapsed);
    let body = product_body();
    let req = format!(
        "POST /api/products HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{upgrade}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = raw(a, req.as_bytes(), t);
    assert_status(&r, 201, "POST with Upgrade");
    assert!(r.elapsed < Duration::from_secs(1), "took {:?}", r.elapsed);
}

/// A request target in absolute form (RFC 9112 3.2.2: a server must accept it) is routed by
/// its path, and a 405 of the query service names every method it serves.
#[test]
fn absolute_form_targets_are_served_and_405_names_head() {
    let env = TestEnv::new();
    let app = env.start(Role::All);
    let (c, q) = (app.command(), app.query());
    let body = product_body();
    let req = format!(
        "POST http://{c}/api/products HTTP/1.1\r\nHost: {c}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_status(
        &raw(c, req.as_bytes(), Duration::from_secs(5)),
        201,
        "absolute form",
    );
    let req =
        format!("GET http://{q}/api/analytics/sync-status HTTP/1.1\r\nHost: {q}\r\nConnection: close\r\n\r\n");
    assert_status(
        &raw(q, req.as_bytes(), Duration::from_secs(5)),
        200,
        "absolute form",
    );
    let r = raw(
        q,
        b"DELETE /api/analytics/sync-status HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_status(&r, 405, "DELETE");
    assert!(
        r.text
            .to_ascii_lowercase()
            .contains("\r\nallow: get, head\r\n"),
        "{}",
        r.text
    );
}
