//! The dashboard: its assets over HTTP (types, security headers, nothing inline), the
//! dead-letter count it shows, and the page itself in a real browser (Debian's chromium,
//! driven by `tests/dashboard/check.py` over the DevTools protocol).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cqrs_analytics::app::Role;
use serde_json::{json, Value};

use crate::harness::*;

/// The value of response header `name` (case-insensitive), if present.
fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn check_security_headers(path: &str, reply: &Reply) {
    assert_eq!(
        header(reply, "Content-Security-Policy"),
        Some("default-src 'self'"),
        "GET {path}: {}",
        reply.headers
    );
    assert_eq!(
        header(reply, "X-Content-Type-Options"),
        Some("nosniff"),
        "GET {path}: {}",
        reply.headers
    );
}

#[test]
fn dashboard_assets_are_served_with_types_and_security_headers() {
    let env = TestEnv::new();
    let app = env.start(Role::Query);
    let q = app.query();
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/dashboard", "text/html; charset=utf-8"),
        ("/dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard.css", "text/css; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml"),
        ("/api/analytics/products", "application/json"),
        ("/nothing", "application/json"),
    ] {
        let r = get(q, path);
        assert_eq!(header(&r, "Content-Type"), Some(content_type), "GET {path}");
        check_security_headers(path, &r);
    }
    let page = get(q, "/").body;
    assert_eq!(page, get(q, "/dashboard").body);
    assert!(page.contains(r#"<script src="/dashboard.js" defer></script>"#));
    assert!(page.contains(r#"<link rel="stylesheet" href="/dashboard.css">"#));
    assert!(page.contains(r#"<link rel="icon" href="/favicon.svg" type="image/svg+xml">"#));
    assert!(get(q, "/favicon.svg").body.starts_with("<svg "));
    // Nothing inline: the policy would block it, and the page would silently lose it.
    for inline in [
        "style=",
        "<style",
        "onclick",
        "onload",
        "javascript:",
        "http://",
        "https://",
    ] {
        assert!(!page.contains(inline), "the page holds {inline:?}");
    }
    assert_eq!(
        page.matches("<script").count(),
        1,
        "one script, from /dashboard.js"
    );
    let script = get(q, "/dashboard.js").body;
    for risky in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!script.contains(risky), "the script uses {risky}");
    }
    let r = request(q, "POST", "/dashboard", &[], b"");
    assert_eq!(r.status, 405, "{}", r.body);
}

#[test]
fn sync_status_counts_dead_letters() {
    let env = TestEnv::new();
    let app = env.start(Role::Query);
    let q = app.query();
    let (_conn, channel) = env.amqp();
    let dlq = env.broker.dead_letter_queue.as_str();
    for i in 0..3 {
        let body = format!("not an event {i}");
        channel
            .basic_publish("", amiquip::Publish::new(body.as_bytes(), dlq))
            .unwrap();
    }
    let status = wait_until("sync-status to count 3 dead letters", DEADLINE, || {
        let b = get(q, "/api/analytics/sync-status").json();
        (b["deadLetterMessages"] == json!(3)).then_some(b)
    });
    assert_eq!(status["pendingBrokerMessages"], json!(0), "{status}");
}

const DEADLINE: Duration = Duration::from_secs(20);
/// The browser script's own waits are 30 s each; this bounds the whole run.
const BROWSER_DEADLINE: Duration = Duration::from_secs(240);
const HOSTILE_NAME: &str = "<img src=x onerror=alert(1)>";

/// Products, orders and 46 past hours the page must show, and what it must show for them.
/// A customer id that a JavaScript number cannot hold exactly.
const BIG_ID: i64 = 9_007_199_254_740_993;

fn seed(env: &TestEnv, c: SocketAddr, q: SocketAddr) -> Value {
    let laptop = create_product(c, "Gaming Laptop", "Electronics", 1299.99, 100);
    let hostile = create_product(c, HOSTILE_NAME, "<b>Hostile</b>", 6.66, 100);
    let lamp = create_product(c, "Desk Lamp", "Home & Garden", 24.50, 100);
    let coffee = create_product(c, "Coffee", "Grocery", 9.99, 100);
    for (customer, items) in [
        (100, vec![(laptop, 2), (lamp, 1)]),
        (200, vec![(hostile, 3)]),
        // 2^53 + 1: a double would show it as 9007199254740992.
        (BIG_ID, vec![(coffee, 10), (lamp, 2)]),
        (100, vec![(coffee, 1)]),
    ] {
        let items: Vec<Value> = items
            .iter()
            .map(|(id, n)| json!({"productId": id, "quantity": n}))
            .collect();
        let r = post_json(
            c,
            "/api/orders",
            &json!({"customerId": customer, "items": items}),
        );
        assert_eq!(r.status, 201, "order: {}", r.body);
    }
    // Hours 1 to 46 ago (46 so that the hour turning during the test keeps every seeded
    // hour inside the page's 48-hour window), straight into the read model: a full chart.
    let mut read = env.read();
    read.batch_execute(
        "INSERT INTO hourly_sales_view (hour_timestamp, total_orders, total_revenue)
         SELECT date_trunc('hour', now()) - h * interval '1 hour',
                10 + (h * 7) % 13, ((10 + (h * 7) % 13) * (8000 + (h * 2903) % 4100) + h) / 100.0
         FROM generate_series(1, 46) h",
    )
    .unwrap();
    let five_ago: String = read
        .query_one(
            "SELECT to_char(hour_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00')
             FROM hourly_sales_view WHERE (total_revenue * 100)::bigint = $1",
            &[&past_hour(5).1],
        )
        .unwrap()
        .get(0);
    let (past_orders, past_cents) = (1..=46)
        .map(past_hour)
        .fold((0, 0), |(o, c), (ho, hc)| (o + ho, c + hc));
    let (five_orders, five_cents) = past_hour(5);
    wait_until("the read model to apply the seed", DEADLINE, || {
        let b = get(q, "/api/analytics/sync-status").json();
        (b["eventsApplied"] == json!(8)).then_some(())
    });
    let last_order = |id: i64| -> String {
        let b = get(q, &format!("/api/analytics/customers/{id}/lifetime-value")).json();
        b["lastOrderDate"].as_str().unwrap()[..16].replace('T', " ")
    };
    json!({
        "hostile": HOSTILE_NAME,
        "products": [
            ["1", "Gaming Laptop", "Electronics", "2", "1", "2,599.98"],
            ["2", "Coffee", "Grocery", "11", "2", "109.89"],
            ["3", "Desk Lamp", "Home & Garden", "3", "2", "73.50"],
            ["4", HOSTILE_NAME, "<b>Hostile</b>", "3", "1", "19.98"],
        ],
        // Shares of 2,803.35.
        "categories": [
            ["Electronics", "1", "2,599.98", "92.7%"],
            ["Grocery", "2", "109.89", "3.9%"],
            ["Home & Garden", "2", "73.50", "2.6%"],
            ["<b>Hostile</b>", "1", "19.98", "0.7%"],
        ],
        "customers": [
            ["1", "100", "2", "2,634.47", last_order(100)],
            ["2", BIG_ID.to_string(), "1", "148.90", last_order(BIG_ID)],
            ["3", "200", "1", "19.98", last_order(200)],
        ],
        // The past hours and this hour's 4 orders of 2,803.35.
        "hourlyTotals": format!("{} orders, revenue {} in the last 48 hours",
            grouped(&(past_orders + 4).to_string()), money(past_cents + 280_335)),
        "hourTitle": format!("{five_ago} UTC: {five_orders} orders, revenue {}", money(five_cents)),
        "cards": {"lag": "0.0 s", "pending outbox": "0", "pending broker": "0",
                  "dead letters": "0", "events applied": "8"},
    })
}

/// Orders and revenue in cents of the seeded hour `h` hours ago (the SQL above, in Rust).
fn past_hour(h: i64) -> (i64, i64) {
    let orders = 10 + (h * 7) % 13;
    (orders, orders * (8000 + (h * 2903) % 4100) + h)
}

/// Digits grouped by thousands, as the page prints them: 1234567 → "1,234,567".
fn grouped(digits: &str) -> String {
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Cents as the page prints money: 11091416 → "110,914.16".
fn money(cents: i64) -> String {
    format!("{}.{:02}", grouped(&(cents / 100).to_string()), cents % 100)
}

/// Runs tests/dashboard/check.py with `args`; panics with its output unless it passes.
fn browser_check(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dashboard/check.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python3 (the browser check is a Python script)");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > BROWSER_DEADLINE {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "check.py {args:?} failed ({}):\n{text}",
        out.status
    );
}

/// The page in Debian's chromium: the seeded numbers after a refresh, the hostile name as
/// text, a new order appearing by itself, a phone-sized screen, the API unreachable and
/// back, and a dead letter turning the page red. Fails (never skips) without chromium.
#[test]
fn dashboard_in_a_real_browser() {
    let env = TestEnv::new();
    let app = env.start(Role::All);
    let (c, q) = (app.command(), app.query());
    browser_check(&["--url", &format!("http://{q}"), "--empty"]);
    let expect = seed(&env, c, q);
    let shots = env!("CARGO_TARGET_TMPDIR");
    let expect_path = format!("{shots}/dashboard-expect-{}.json", env.id);
    std::fs::write(&expect_path, expect.to_string()).unwrap();
    let (query_url, command_url) = (format!("http://{q}"), format!("http://{c}"));
    browser_check(&[
        "--url",
        &query_url,
        "--command-url",
        &command_url,
        "--expect",
        &expect_path,
        "--shots",
        shots,
    ]);
    let _ = std::fs::remove_file(&expect_path);

    let (_conn, channel) = env.amqp();
    let dlq = env.broker.dead_letter_queue.as_str();
    channel
        .basic_publish("", amiquip::Publish::new(b"poison", dlq))
        .unwrap();
    browser_check(&["--url", &query_url, "--problem", "dead letters"]);
}
