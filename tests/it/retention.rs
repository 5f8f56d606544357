//! Retention with windows of seconds: expired bookkeeping rows go, rows inside the window
//! and unpublished outbox rows stay, deduplication holds inside the window, an expired
//! Idempotency-Key can be used again, and the pruner keeps working across a restart and with
//! two instances on one database.

use std::time::Duration;

use cqrs_analytics::app::Role;
use serde_json::json;

use crate::harness::*;

const CONVERGE: Duration = Duration::from_secs(60);
const PRUNED: Duration = Duration::from_secs(30);

fn count(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// Inserts `n` outbox rows created `age_secs` ago, published or not.
fn insert_outbox_rows(env: &TestEnv, n: i64, age_secs: f64, published: bool) {
    env.write()
        .execute(
            "INSERT INTO outbox (topic, payload, created_at, published_at)
             SELECT 'order-events', jsonb_build_object('eventId', gen_random_uuid(), 'n', i),
                    now() - make_interval(secs => $2),
                    CASE WHEN $3 THEN now() - make_interval(secs => $2) END
             FROM generate_series(1, $1::bigint) i",
            &[&n, &age_secs, &published],
        )
        .unwrap();
}

fn fast_retention(c: &mut cqrs_analytics::Config) {
    c.retention.interval = Duration::from_millis(50);
    c.retention.batch_size_max = 1000;
}

#[test]
fn published_outbox_rows_past_the_window_go_and_the_rest_stay() {
    let env = TestEnv::new();
    // The pruner keeps rows whose events may wait in the queues: declare them (empty).
    let _topology = env.amqp();
    // No publisher: the rows the API writes stay unpublished.
    let app = env.start_with(Role::Command, |c| {
        fast_retention(c);
        c.outbox_publishers = 0;
        c.retention.outbox = Some(Duration::from_secs(5));
    });
    insert_outbox_rows(&env, 2500, 600.0, true);
    insert_outbox_rows(&env, 3, 86_400.0, false);
    let pid = create_product(app.command(), "p", "Retention", 2.5, 100);
    let r = post_json(
        app.command(),
        "/api/orders",
        &json!({"customerId": 1, "items": [{"productId": pid, "quantity": 1}]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // Two recent rows, published a moment ago: inside the window.
    insert_outbox_rows(&env, 2, 0.0, true);
    let mut w = env.write();
    wait_until("expired published rows to be removed", PRUNED, || {
        (count(
            &mut w,
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        ) == 2)
            .then_some(())
    });
    assert_eq!(
        count(
            &mut w,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        ),
        5,
        "the 3 old and 2 new unpublished rows stay"
    );
    let removed = metric(
        app.command(),
        "retention_rows_removed_total{table=\"outbox\"}",
    );
    assert_eq!(removed, 2500.0);
    assert!(metric(app.command(), "table_size_bytes{table=\"outbox\"}") > 0.0);
    // The recent published rows go once they are older than the window; unpublished never.
    wait_until("recent published rows to expire", PRUNED, || {
        (count(
            &mut w,
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        ) == 0)
            .then_some(())
    });
    assert_eq!(
        count(
            &mut w,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        ),
        5
    );
}

#[test]
fn an_expired_idempotency_key_can_be_used_again() {
    let env = TestEnv::new();
    // The pruner is slow here: the lookup itself must ignore the expired key.
    let app = env.start_with(Role::Command, |c| {
        c.outbox_publishers = 0;
        c.retention.interval = Duration::from_secs(3600);
        c.retention.idempotency_key_ttl = Some(Duration::from_secs(2));
    });
    let c = app.command();
    let send = |body: &serde_json::Value| {
        request(
            c,
            "POST",
            "/api/products",
            &[
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "k-1"),
            ],
            body.to_string().as_bytes(),
        )
    };
    let first = json!({"name": "a", "category": "Keys", "price": 1.0, "stock": 1});
    let second = json!({"name": "b", "category": "Keys", "price": 2.0, "stock": 2});
    let r1 = send(&first);
    assert_eq!(r1.status, 201, "{}", r1.body);
    assert_eq!(send(&first).body, r1.body, "a retry inside the TTL replays");
    // Another body under a live key is refused, until the key expires.
    let r2 = wait_until("the key to expire", Duration::from_secs(30), || {
        let r = send(&second);
        match r.status {
            422 => None,
            201 => Some(r),
            other => panic!("unexpected {other}: {}", r.body),
        }
    });
    assert_ne!(r2.body, r1.body, "a new product: {}", r2.body);
    assert_eq!(
        send(&second).body,
        r2.body,
        "the new request is now the key's"
    );
    assert_eq!(send(&first).status, 422);
    let mut w = env.write();
    assert_eq!(count(&mut w, "SELECT count(*) FROM products"), 2);
    assert_eq!(count(&mut w, "SELECT count(*) FROM idempotency_keys"), 1);
}

#[test]
fn the_pruner_deletes_expired_idempotency_keys() {
    let env = TestEnv::new();
    let app = env.start_with(Role::Command, |c| {
        fast_retention(c);
        c.outbox_publishers = 0;
        c.retention.idempotency_key_ttl = Some(Duration::from_secs(3));
    });
    env.write()
        .execute(
            "INSERT INTO idempotency_keys (key, request, response_status, response_body, created_at)
             SELECT 'old-' || i, 'POST /api/products', 201, '{}', now() - interval '1 hour'
             FROM generate_series(1, 2500) i",
            &[],
        )
        .unwrap();
    let r = request(
        app.command(),
        "POST",
        "/api/products",
        &[
            ("Content-Type", "application/json"),
            ("Idempotency-Key", "fresh"),
        ],
        json!({"name": "a", "category": "Keys", "price": 1.0, "stock": 1})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 201);
    let mut w = env.write();
    wait_until("expired keys to be deleted", PRUNED, || {
        (count(&mut w, "SELECT count(*) FROM idempotency_keys") == 1).then_some(())
    });
    let left: String = w
        .query_one("SELECT key FROM idempotency_keys", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, "fresh");
    wait_until("the fresh key to expire too", PRUNED, || {
        (count(&mut w, "SELECT count(*) FROM idempotency_keys") == 0).then_some(())
    });
    assert_eq!(
        metric(
            app.command(),
            "retention_rows_removed_total{table=\"idempotency_keys\"}"
        ),
        2501.0
    );
}

#[test]
fn duplicates_inside_the_dedup_window_are_dropped_and_expired_ledger_rows_go() {
    let env = TestEnv::new();
    // The pruner keeps processed_events rows for at least the minute the sync-status latency
    // figures read, so the ledger's window is a minute here whatever we ask; the test moves
    // the rows' clocks back instead of waiting.
    let app = env.start_with(Role::All, |c| {
        fast_retention(c);
        c.retention.processed_events = Some(Duration::from_secs(10));
        c.retention.outbox = Some(Duration::from_secs(60));
    });
    let c = app.command();
    let pid = create_product(c, "p", "Dedup", 1.25, 1000);
    for i in 0..20 {
        let r = post_json(
            c,
            "/api/orders",
            &json!({"customerId": 1 + i % 3, "items": [{"productId": pid, "quantity": 2}]}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    assert_converges(&env, CONVERGE);
    let mut w = env.write();
    let payloads: Vec<(String, String)> = w
        .query(
            "SELECT payload::text, payload->>'eventId' FROM outbox WHERE topic = 'order-events'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(payloads.len(), 20);
    // Inside the window: every duplicate is dropped.
    for (payload, id) in &payloads {
        publish_raw(&env, "order-events", id, payload.as_bytes());
    }
    let consumer = app.consumer();
    wait_until("the duplicates to be dropped", CONVERGE, || {
        (metric(consumer, "consumer_duplicates_dropped_total") >= 20.0).then_some(())
    });
    assert_converges(&env, CONVERGE);
    // An hour later the ledger and the outbox rows go.
    let mut r = env.read();
    r.execute(
        "UPDATE processed_events SET processed_at = processed_at - interval '1 hour'",
        &[],
    )
    .unwrap();
    w.execute(
        "UPDATE outbox SET created_at = created_at - interval '1 hour'",
        &[],
    )
    .unwrap();
    wait_until("expired processed_events rows to go", PRUNED, || {
        (count(&mut r, "SELECT count(*) FROM processed_events") == 0).then_some(())
    });
    wait_until("expired outbox rows to go", PRUNED, || {
        (count(&mut w, "SELECT count(*) FROM outbox") == 0).then_some(())
    });
    assert_eq!(
        metric(
            consumer,
            "retention_rows_removed_total{table=\"processed_events\"}"
        ),
        21.0
    );
    assert!(metric(consumer, "table_size_bytes{table=\"processed_events\"}") > 0.0);
    // The documented trade-off: a duplicate delivered after the window is applied again.
    let (payload, id) = &payloads[0];
    publish_raw(&env, "order-events", id, payload.as_bytes());
    wait_until("the late duplicate to be applied", CONVERGE, || {
        (count(&mut r, "SELECT count(*) FROM processed_events") == 1).then_some(())
    });
    let orders: i64 = count(
        &mut r,
        "SELECT sum(order_count)::bigint FROM customer_ltv_view",
    );
    assert_eq!(
        orders, 21,
        "applied again: the window must exceed any redelivery"
    );
}

#[test]
fn old_failure_records_go_after_the_dedup_window() {
    let env = TestEnv::new();
    let app = env.start_with(Role::Consumer, |c| {
        fast_retention(c);
        c.retention.processed_events = Some(Duration::from_secs(3));
    });
    let mut r = env.read();
    r.batch_execute(
        "INSERT INTO event_failures (message_key, attempts, last_error, updated_at)
         SELECT 'old-' || i, 5, 'boom', now() - interval '1 day' FROM generate_series(1, 1500) i;
         INSERT INTO event_failures (message_key, attempts, last_error) VALUES ('recent', 1, 'boom');",
    )
    .unwrap();
    wait_until("old failure records to go", PRUNED, || {
        (count(&mut r, "SELECT count(*) FROM event_failures") == 1).then_some(())
    });
    wait_until("the recent one too, later", PRUNED, || {
        (count(&mut r, "SELECT count(*) FROM event_failures") == 0).then_some(())
    });
    assert_eq!(
        metric(
            app.consumer(),
            "retention_rows_removed_total{table=\"event_failures\"}"
        ),
        1501.0
    );
}

#[test]
fn retention_works_with_two_instances_and_across_a_restart() {
    let env = TestEnv::new();
    let _topology = env.amqp();
    let start = || {
        env.start_with(Role::Command, |c| {
            c.retention.interval = Duration::from_millis(20);
            c.retention.batch_size_max = 500;
            c.outbox_publishers = 0;
            c.retention.outbox = Some(Duration::from_secs(60));
        })
    };
    let (a, b) = (start(), start());
    let removed = |apps: &[&App]| -> f64 {
        apps.iter()
            .map(|a| {
                metric(
                    a.command(),
                    "retention_rows_removed_total{table=\"outbox\"}",
                )
            })
            .sum()
    };
    let mut w = env.write();
    let published = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL";
    for round in 1..=3 {
        insert_outbox_rows(&env, 10_000, 3600.0, true);
        insert_outbox_rows(&env, 1, 3600.0, false);
        wait_until("both instances to prune the rows", PRUNED, || {
            (count(&mut w, published) == 0).then_some(())
        });
        // Every row is removed by exactly one of them.
        wait_until("the counters to add up", PRUNED, || {
            (removed(&[&a, &b]) == 10_000.0 * f64::from(round)).then_some(())
        });
    }
    assert_eq!(
        count(
            &mut w,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        ),
        3
    );
    // Both stop; a new instance starts from nothing and carries on.
    a.stop();
    b.stop();
    insert_outbox_rows(&env, 5000, 3600.0, true);
    let c = start();
    wait_until("the restarted instance to prune", PRUNED, || {
        (count(&mut w, published) == 0).then_some(())
    });
    assert_eq!(removed(&[&c]), 5000.0);
}

fn sync_status(query: std::net::SocketAddr) -> serde_json::Value {
    let r = get(query, "/api/analytics/sync-status");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn sync_status_stays_honest_when_old_rows_are_gone() {
    let env = TestEnv::new();
    let window = Duration::from_secs(2);
    let tweak = |c: &mut cqrs_analytics::Config| {
        fast_retention(c);
        c.retention.outbox = Some(window);
    };
    // No consumer yet: the events are published, then wait in the broker while retention
    // removes their outbox rows.
    let command = env.start_with(Role::Command, tweak);
    let query = env.start_with(Role::Query, tweak);
    let c = command.command();
    let pid = create_product(c, "p", "Honest", 3.0, 100);
    let first_order_at = std::time::Instant::now();
    for i in 0..5 {
        let r = post_json(
            c,
            "/api/orders",
            &json!({"customerId": 1 + i, "items": [{"productId": pid, "quantity": 1}]}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let mut w = env.write();
    wait_until("the events to be published", PRUNED, || {
        (count(
            &mut w,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
        ) == 0)
            .then_some(())
    });
    // Past the window the events still wait in the broker: their rows stay (so that the
    // oldest can still be dated), and the lag keeps growing instead of dropping to 0.
    let s = wait_until("the lag to pass the window", PRUNED, || {
        let s = sync_status(query.query());
        (s["lagSeconds"].as_f64().unwrap() >= window.as_secs_f64() + 1.0).then_some(s)
    });
    assert_eq!(s["pendingBrokerMessages"], 6, "{s}");
    assert_eq!(s["pendingOutboxEvents"], 0, "{s}");
    assert!(metric(c, "retention_runs_total") >= 2.0);
    assert_eq!(count(&mut w, "SELECT count(*) FROM outbox"), 6);
    let lag = s["lagSeconds"].as_f64().unwrap();
    wait_until("the lag to grow", PRUNED, || {
        let later = sync_status(query.query())["lagSeconds"].as_f64().unwrap();
        (later >= lag + 1.0).then_some(())
    });
    // A consumer applies them: lag 0, counts and percentiles from the events themselves.
    let consumer = env.start_with(Role::Consumer, tweak);
    assert_converges(&env, CONVERGE);
    let waited_ms = first_order_at.elapsed().as_millis() as f64;
    let s = wait_until("the lag to drop to 0", CONVERGE, || {
        let s = sync_status(query.query());
        (s["lagSeconds"].as_f64() == Some(0.0)).then_some(s)
    });
    assert_eq!(s["eventsApplied"], 6, "{s}");
    assert_eq!(s["pendingBrokerMessages"], 0, "{s}");
    // Applied: now their rows go.
    wait_until("the applied events' rows to be pruned", PRUNED, || {
        (count(&mut w, "SELECT count(*) FROM outbox") == 0).then_some(())
    });
    assert_eq!(s["endToEndLatencyMs"]["samples"], 6, "{s}");
    let p99 = s["endToEndLatencyMs"]["p99"].as_f64().unwrap();
    assert!(
        p99 >= 3000.0 && p99 <= waited_ms + 1000.0,
        "the events waited more than the window: {s}"
    );
    let last = s["lastProcessedEventTimestamp"].clone();
    // The ledger's rows go too (moved an hour back): the counters and the newest timestamp
    // come from sync_status, not from the rows, and stay.
    let mut r = env.read();
    r.execute(
        "UPDATE processed_events SET processed_at = processed_at - interval '1 hour'",
        &[],
    )
    .unwrap();
    drop(consumer);
    let consumer = env.start_with(Role::Consumer, |c| {
        tweak(c);
        c.retention.processed_events = Some(Duration::from_secs(60));
    });
    wait_until("the ledger to be pruned", PRUNED, || {
        (count(&mut r, "SELECT count(*) FROM processed_events") == 0).then_some(())
    });
    let s = sync_status(query.query());
    assert_eq!(s["eventsApplied"], 6, "{s}");
    assert_eq!(s["lastProcessedEventTimestamp"], last, "{s}");
    assert_eq!(s["lagSeconds"], 0.0, "{s}");
    assert_eq!(s["endToEndLatencyMs"]["samples"], 0, "{s}");
    drop(consumer);
}

/// Events a consumer held unacked while the pruner removed their outbox rows (it keeps as
/// many rows as messages are ready, and cannot count unacked ones), then back in the queue
/// when that consumer stopped: sync-status still reports a lag, at least the window,
/// instead of 0 (it found no row to date them by).
#[test]
fn events_back_in_the_queue_after_their_rows_went_still_show_a_lag() {
    let env = TestEnv::new();
    let window = Duration::from_secs(1);
    let tweak = |c: &mut cqrs_analytics::Config| {
        fast_retention(c);
        c.retention.outbox = Some(window);
    };
    let command = env.start_with(Role::Command, tweak);
    let query = env.start_with(Role::Query, tweak);
    let consumer = env.start_with(Role::Consumer, tweak);
    let c = command.command();
    let pid = create_product(c, "p", "Held", 3.0, 100);
    wait_until("the product applied", CONVERGE, || {
        (sync_status(query.query())["eventsApplied"] == 1).then_some(())
    });
    // The consumer takes the orders and cannot apply them.
    let mut blocker = env.read();
    let mut lock = blocker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE customer_ltv_view IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    for i in 0..3 {
        let r = post_json(
            c,
            "/api/orders",
            &json!({"customerId": 1 + i, "items": [{"productId": pid, "quantity": 1}]}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let mut w = env.write();
    wait_until("the held events' rows to be pruned", PRUNED, || {
        (count(&mut w, "SELECT count(*) FROM outbox") == 0).then_some(())
    });
    consumer.stop();
    lock.rollback().unwrap();
    let s = wait_until("the events back in the queue", PRUNED, || {
        let s = sync_status(query.query());
        (s["pendingBrokerMessages"] == 3).then_some(s)
    });
    assert!(
        s["lagSeconds"].as_f64().unwrap() >= window.as_secs_f64(),
        "three events wait in the queue: {s}"
    );
    assert_eq!(s["lagIsLowerBound"], true, "their rows are gone: {s}");
    let _consumer = env.start_with(Role::Consumer, tweak);
    assert_converges(&env, CONVERGE);
    let s = wait_until("the lag to drop to 0", CONVERGE, || {
        let s = sync_status(query.query());
        (s["lagSeconds"].as_f64() == Some(0.0)).then_some(s)
    });
    assert_eq!(s["eventsApplied"], 4, "{s}");
    assert_eq!(s["lagIsLowerBound"], false, "{s}");
}

/// `table_rows_estimate` follows the rows within seconds: it is the statistics' live-row
/// count. It was the planner's `reltuples`, which only VACUUM and ANALYZE update: 0 after
/// 50,000 events in a 20-minute audit run (autovacuum is off on this machine), and -1
/// (shown as 0) for a table never vacuumed.
#[test]
fn table_rows_estimate_follows_the_rows() {
    let env = TestEnv::new();
    let app = env.start(Role::All);
    let product = create_product(app.command(), "Clock", "Time", 3.0, 1_000);
    for customer in 1..=20 {
        let body = serde_json::json!({"customerId": customer, "items": [{"productId": product, "quantity": 1}]});
        assert_eq!(post_json(app.command(), "/api/orders", &body).status, 201);
    }
    assert_converges(&env, Duration::from_secs(30));
    // A backend flushes its statistics at most once a second, an idle one after 10 s.
    wait_until(
        "the estimates to count the rows",
        Duration::from_secs(40),
        || {
            let events = metric(
                app.consumer(),
                r#"table_rows_estimate{table="processed_events"}"#,
            );
            let outbox = metric(app.command(), r#"table_rows_estimate{table="outbox"}"#);
            (events >= 21.0 && outbox >= 21.0).then_some(())
        },
    );
}
