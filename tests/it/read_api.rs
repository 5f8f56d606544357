//! The read API against read tables seeded directly in SQL: exact money, timestamps,
//! 404/400 rules, percent-decoded categories, hourly ranges, sync status.

use cqrs_analytics::app::Role;
use serde_json::json;

use crate::harness::*;

fn seed(env: &TestEnv) {
    env.read()
        .batch_execute(
            "INSERT INTO product_sales_view (product_id, total_quantity_sold, total_revenue, order_count) VALUES (1, 5, 6499.95, 3), (2, 0, 0, 0);
             INSERT INTO category_metrics_view (category_name, total_revenue, total_orders) VALUES
                ('Electronics', 15999.80, 8), ('Home & Garden', 10.10, 1), ('A/B', 1, 1), ('Café', 2.5, 1);
             INSERT INTO customer_ltv_view (customer_id, total_spent, order_count, last_order_date) VALUES
                (100, 3899.97, 3, '2026-02-11T16:35:00Z');
             INSERT INTO hourly_sales_view (hour_timestamp, total_orders, total_revenue) VALUES
                ('2026-02-11T15:00:00Z', 2, 20.00), ('2026-02-11T16:00:00Z', 3, 30.50), ('2026-02-11T17:00:00Z', 1, 0.10);",
        )
        .unwrap();
}

fn check(addr: std::net::SocketAddr, path: &str, status: u16, body: serde_json::Value) {
    let r = get(addr, path);
    assert_eq!(r.status, status, "GET {path}: {}", r.body);
    assert_eq!(r.json(), body, "GET {path}");
}

#[test]
fn read_routes_return_exact_numbers() {
    let env = TestEnv::new();
    seed(&env);
    let app = env.start(Role::Query);
    let q = app.query();
    check(
        q,
        "/api/analytics/products/1/sales",
        200,
        json!({"productId": 1, "totalQuantitySold": 5, "totalRevenue": 6499.95, "orderCount": 3}),
    );
    check(
        q,
        "/api/analytics/products/2/sales",
        200,
        json!({"productId": 2, "totalQuantitySold": 0, "totalRevenue": 0.0, "orderCount": 0}),
    );
    let raw = get(q, "/api/analytics/categories/Electronics/revenue").body;
    assert_eq!(
        raw, r#"{"category":"Electronics","totalRevenue":15999.80,"totalOrders":8}"#,
        "money is a JSON number, exact"
    );
    check(
        q,
        "/api/analytics/categories/Home%20%26%20Garden/revenue",
        200,
        json!({"category": "Home & Garden", "totalRevenue": 10.1, "totalOrders": 1}),
    );
    check(
        q,
        "/api/analytics/categories/A%2FB/revenue",
        200,
        json!({"category": "A/B", "totalRevenue": 1.0, "totalOrders": 1}),
    );
    check(
        q,
        "/api/analytics/categories/Caf%C3%A9/revenue",
        200,
        json!({"category": "Café", "totalRevenue": 2.5, "totalOrders": 1}),
    );
    check(
        q,
        "/api/analytics/customers/100/lifetime-value",
        200,
        json!({"customerId": 100, "totalSpent": 3899.97, "orderCount": 3, "lastOrderDate": "2026-02-11T16:35:00.000Z"}),
    );
}

#[test]
fn read_routes_404_and_400() {
    let env = TestEnv::new();
    seed(&env);
    let app = env.start(Role::Query);
    let q = app.query();
    for path in [
        "/api/analytics/products/3/sales",
        "/api/analytics/customers/7/lifetime-value",
        "/api/analytics/categories/electronics/revenue",
        "/api/analytics/categories/Electronics%20/revenue",
        "/api/analytics/nothing",
        "/dashboard/",
        "/index.html",
    ] {
        let r = get(q, path);
        assert_eq!(r.status, 404, "GET {path}: {}", r.body);
        assert!(r.json()["error"].is_string());
    }
    for path in [
        "/api/analytics/products/0/sales",
        "/api/analytics/products/-1/sales",
        "/api/analytics/products/abc/sales",
        "/api/analytics/products/1.5/sales",
        "/api/analytics/products/99999999999999999999999/sales",
        "/api/analytics/customers/0/lifetime-value",
        "/api/analytics/customers/x/lifetime-value",
        "/api/analytics/categories/%ZZ/revenue",
        "/api/analytics/categories/%FF/revenue",
        "/api/analytics/sales/hourly?from=yesterday",
        "/api/analytics/sales/hourly?from=2026-02-11T17:00:00Z&to=2026-02-11T15:00:00Z",
    ] {
        let r = get(q, path);
        assert_eq!(r.status, 400, "GET {path}: {}", r.body);
        assert!(r.json()["error"].is_string());
    }
    // Hourly sales, like the lists, refuses a parameter it does not know (a typo would
    // otherwise return every hour) or one given twice, and names it.
    for (path, field) in [
        (
            "/api/analytics/sales/hourly?form=2026-02-11T16:00:00Z",
            "form",
        ),
        ("/api/analytics/sales/hourly?from=&from=", "from"),
        (
            "/api/analytics/sales/hourly?to=2026-02-11T16:00:00Z&limit=5",
            "limit",
        ),
    ] {
        let r = get(q, path);
        assert_eq!(r.status, 400, "GET {path}: {}", r.body);
        assert_eq!(r.json()["field"], field, "GET {path}: {}", r.body);
    }
    let r = request(q, "POST", "/api/analytics/sync-status", &[], b"");
    assert_eq!(r.status, 405);
}

#[test]
fn hourly_sales_filter_by_range() {
    let env = TestEnv::new();
    seed(&env);
    let app = env.start(Role::Query);
    let q = app.query();
    let all = get(q, "/api/analytics/sales/hourly").json();
    assert_eq!(all["hours"].as_array().unwrap().len(), 3);
    assert_eq!(
        all["hours"][0],
        json!({"hour": "2026-02-11T15:00:00.000Z", "totalOrders": 2, "totalRevenue": 20.00})
    );
    let some = get(
        q,
        "/api/analytics/sales/hourly?from=2026-02-11T16:00:00Z&to=2026-02-11T17:00:00Z",
    )
    .json();
    assert_eq!(
        some,
        json!({"hours": [{"hour": "2026-02-11T16:00:00.000Z", "totalOrders": 3, "totalRevenue": 30.5}]})
    );
    let offset = get(
        q,
        "/api/analytics/sales/hourly?from=2026-02-11T18:00:00%2B01:00",
    )
    .json();
    assert_eq!(
        offset["hours"].as_array().unwrap().len(),
        1,
        "18:00+01:00 is 17:00Z: {offset}"
    );
    let none = get(q, "/api/analytics/sales/hourly?from=2030-01-01T00:00:00Z").json();
    assert_eq!(none, json!({"hours": []}));
    // Bounds finer than PostgreSQL's microseconds: 16:00 starts before a `to` half a
    // microsecond later, and before a `from` a tenth of one later.
    let hours = |query: &str| -> Vec<String> {
        get(q, &format!("/api/analytics/sales/hourly?{query}")).json()["hours"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["hour"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        hours("to=2026-02-11T16:00:00.0000005Z"),
        ["2026-02-11T15:00:00.000Z", "2026-02-11T16:00:00.000Z"]
    );
    assert_eq!(
        hours("from=2026-02-11T16:00:00.0000001Z"),
        ["2026-02-11T17:00:00.000Z"]
    );
    assert_eq!(
        hours("from=2026-02-11T16:00:00.000000000Z&to=2026-02-11T17:00:00.000000001Z"),
        ["2026-02-11T16:00:00.000Z", "2026-02-11T17:00:00.000Z"]
    );
}

#[test]
fn sync_status_before_any_event() {
    let env = TestEnv::new();
    let app = env.start(Role::Query);
    let r = get(app.query(), "/api/analytics/sync-status");
    assert_eq!(r.status, 200, "{}", r.body);
    let b = r.json();
    assert_eq!(b["lastProcessedEventTimestamp"], serde_json::Value::Null);
    assert_eq!(b["lagSeconds"], json!(0.0));
    assert_eq!(b["pendingOutboxEvents"], json!(0));
}

/// With a side that cannot be asked, the lag is what the other sides show: a lower bound,
/// and sync-status says so (`lagIsLowerBound`), beside which side it could not reach. It
/// used to read 0.0 as if nothing waited.
#[test]
fn sync_status_says_when_its_lag_is_only_a_lower_bound() {
    let env = TestEnv::new();
    let reachable = env.start(Role::Query);
    let b = get(reachable.query(), "/api/analytics/sync-status").json();
    assert_eq!(b["lagIsLowerBound"], json!(false), "{b}");
    assert_eq!(b["writeSideReachable"], json!(true), "{b}");
    // No publisher or consumer has declared the queues: the query service does (their
    // passive declares failed, and the broker was said to be unreachable).
    assert_eq!(b["brokerReachable"], json!(true), "{b}");

    let nowhere = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port());
    let cut_off = env.start_with(Role::Query, |c| c.write_db = nowhere.parse().unwrap());
    let r = get(cut_off.query(), "/api/analytics/sync-status");
    assert_eq!(r.status, 200, "{}", r.body);
    let b = r.json();
    assert_eq!(b["writeSideReachable"], json!(false), "{b}");
    assert_eq!(b["pendingOutboxEvents"], json!(null), "{b}");
    assert_eq!(b["lagIsLowerBound"], json!(true), "{b}");
    assert_eq!(b["lagSeconds"], json!(0.0), "{b}");
}

#[test]
fn sync_status_lag_grows_only_while_events_wait() {
    let env = TestEnv::new();
    let app = env.start(Role::Query);
    // An event committed on the write side, never published: lag is its age.
    env.write()
        .batch_execute(
            "INSERT INTO outbox (topic, payload, created_at) VALUES ('order-events', '{}', now() - interval '30 seconds')",
        )
        .unwrap();
    let b = get(app.query(), "/api/analytics/sync-status").json();
    let lag = b["lagSeconds"].as_f64().unwrap();
    assert!((29.0..120.0).contains(&lag), "{b}");
    assert_eq!(b["pendingOutboxEvents"], json!(1));
    // Once published and applied, an idle system reports no lag however old the last event.
    env.write()
        .batch_execute("UPDATE outbox SET published_at = now()")
        .unwrap();
    env.read()
        .batch_execute(
            "UPDATE sync_status SET last_processed_event_timestamp = now() - interval '1 hour'",
        )
        .unwrap();
    let b = get(app.query(), "/api/analytics/sync-status").json();
    assert_eq!(b["lagSeconds"], json!(0.0), "{b}");
    assert!(b["lastProcessedEventTimestamp"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
}
