//! `/metrics` in Prometheus's text format as strict parsers (promtool) read it: each family's
//! lines together under one `# HELP` and one `# TYPE` line; histograms cumulative, `+Inf`
//! equal to `_count`; in `all`, each port shows only its own service's threads.

use std::collections::HashSet;

use cqrs_analytics::app::Role;
use serde_json::json;

use crate::harness::*;

/// Checks one scrape; returns the families it holds.
fn check_exposition(what: &str, body: &str) -> HashSet<String> {
    let mut families: Vec<String> = Vec::new();
    let mut current: Option<(String, String)> = None;
    let mut helped: HashSet<String> = HashSet::new();
    let mut histogram: Vec<(String, f64)> = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(
                helped.insert(name.clone()),
                "{what}: a second HELP for {name}:\n{body}"
            );
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                !families.iter().any(|f| f == name),
                "{what}: a second TYPE for {name}:\n{body}"
            );
            assert!(helped.contains(name), "{what}: no HELP before TYPE {name}");
            families.push(name.to_string());
            current = Some((name.to_string(), kind.to_string()));
        } else {
            let (family, kind) = current
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: a sample before any TYPE: {line}"));
            let name = &line[..line.find(['{', ' ']).unwrap()];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|_| kind == "histogram" || kind == "summary")
                .unwrap_or(name);
            assert_eq!(base, family, "{what}: {line} is not under its own TYPE");
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "{what}: counter {name} without _total"
                );
            }
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            if kind == "histogram" && name.ends_with("_bucket") {
                if let Some((_, last)) = histogram.last().filter(|(f, _)| f == family) {
                    assert!(value >= *last, "{what}: {line} below the bucket before");
                }
                histogram.push((family.clone(), value));
            } else if kind == "histogram" && name.ends_with("_count") {
                let inf = histogram.iter().rev().find(|(f, _)| f == family).unwrap().1;
                assert_eq!(
                    value, inf,
                    "{what}: {family}: _count is not the +Inf bucket"
                );
            }
        }
    }
    families.into_iter().collect()
}

#[test]
fn every_scrape_is_strict_prometheus_text_with_help_and_one_type_per_family() {
    let env = TestEnv::new();
    let app = env.start(Role::All);
    let (a, q, c) = (app.command(), app.query(), app.consumer());
    // Traffic that fills every family: products, an order, a refusal, a replay, reads.
    let pid = create_product(a, "Metered", "Meters", 2.5, 5);
    let order = json!({"customerId": 1, "items": [{"productId": pid, "quantity": 1}]});
    let headers = [
        ("Content-Type", "application/json"),
        ("Idempotency-Key", "metered-1"),
    ];
    for _ in 0..2 {
        let r = request(
            a,
            "POST",
            "/api/orders",
            &headers,
            order.to_string().as_bytes(),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = post_json(
        a,
        "/api/orders",
        &json!({"customerId": 1, "items": [{"productId": pid, "quantity": 99}]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_converges(&env, std::time::Duration::from_secs(20));
    assert_eq!(
        get(q, &format!("/api/analytics/products/{pid}/sales")).status,
        200
    );
    let command = check_exposition("command", &get(a, "/metrics").body);
    let query = check_exposition("query", &get(q, "/metrics").body);
    let consumer = check_exposition("consumer", &get(c, "/metrics").body);
    for (service, families, wanted) in [
        (
            "command",
            &command,
            &[
                "http_request_duration_seconds",
                "outbox_confirms_total",
                "outbox_batch_rows",
                "retention_rows_removed_total",
                "thread_restarts_total",
            ][..],
        ),
        (
            "query",
            &query,
            &["db_pool_connections", "http_requests_total"][..],
        ),
        (
            "consumer",
            &consumer,
            &[
                "consumer_end_to_end_lag_seconds",
                "retention_vacuums_total",
                "thread_restarts_total",
            ][..],
        ),
    ] {
        for family in wanted {
            assert!(families.contains(*family), "{service}: no {family}");
        }
    }
    // Each port shows its own service's supervised threads, not the process's.
    let restarts = |addr| {
        get(addr, "/metrics")
            .body
            .lines()
            .filter(|l| l.starts_with("thread_restarts_total{"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(restarts(a), ["thread_restarts_total{role=\"publisher\"} 0"]);
    assert_eq!(restarts(c), ["thread_restarts_total{role=\"consumer\"} 0"]);
    assert!(restarts(q).is_empty() && !query.contains("thread_restarts_total"));
}

/// A table under an ACCESS EXCLUSIVE lock (a rebuild's switch, `LOCK TABLE`): a scrape
/// answers at once with the sizes last read. It waited the session's lock timeout (2 s
/// here) and then left `table_size_bytes` and `table_rows_estimate` out.
#[test]
fn a_locked_table_does_not_hold_up_a_scrape_or_drop_its_size() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    create_product(a, "Sized", "Sizes", 1.0, 1);
    let size = r#"table_size_bytes{table="outbox"}"#;
    let before = metric(a, size);
    assert!(before > 0.0);
    let mut locker = env.write();
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let started = std::time::Instant::now();
    let during = metric(a, size);
    let took = started.elapsed();
    lock.rollback().unwrap();
    assert_eq!(during, before);
    assert!(
        took < std::time::Duration::from_secs(1),
        "the scrape took {took:?}"
    );
}
