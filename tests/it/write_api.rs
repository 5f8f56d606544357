//! The write API, rule by rule, at the HTTP boundary, with SQL checks that failures wrote
//! nothing and that concurrency never oversells or deadlocks.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use cqrs_analytics::app::Role;
use serde_json::json;

use crate::harness::*;

/// Sends `body` and checks the status, that the error names `needle`, and that nothing was written.
fn check_rejected(
    env: &TestEnv,
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    status: u16,
    needle: &str,
) {
    let before = write_counts(env);
    let r = request(addr, "POST", path, headers, body);
    assert_eq!(
        r.status,
        status,
        "sent {path} {:?}, got {} {}",
        String::from_utf8_lossy(&body[..body.len().min(200)]),
        r.status,
        r.body
    );
    let err = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains(needle),
        "error {err:?} should mention {needle:?}"
    );
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{}",
        r.headers
    );
    assert_eq!(
        write_counts(env),
        before,
        "a rejected request wrote something: {}",
        r.body
    );
}

const JSON: &[(&str, &str)] = &[("Content-Type", "application/json")];

#[test]
fn products_are_validated_field_by_field() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let ok =
        json!({"name": "Gaming Laptop", "category": "Electronics", "price": 1299.99, "stock": 50});
    let r = post_json(a, "/api/products", &ok);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json(), json!({"productId": 1}));
    let long = "x".repeat(201);
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (json!({"category": "E", "price": 1, "stock": 1}), "name"),
        (
            json!({"name": "  ", "category": "E", "price": 1, "stock": 1}),
            "name",
        ),
        (
            json!({"name": long, "category": "E", "price": 1, "stock": 1}),
            "name",
        ),
        (
            json!({"name": 5, "category": "E", "price": 1, "stock": 1}),
            "name",
        ),
        (
            json!({"name": "n", "category": "", "price": 1, "stock": 1}),
            "category",
        ),
        (
            json!({"name": "n", "category": "E", "price": 0, "stock": 1}),
            "price",
        ),
        (
            json!({"name": "n", "category": "E", "price": -1, "stock": 1}),
            "price",
        ),
        (
            json!({"name": "n", "category": "E", "price": 1.001, "stock": 1}),
            "price",
        ),
        (
            json!({"name": "n", "category": "E", "price": 1000000000, "stock": 1}),
            "price",
        ),
        (
            json!({"name": "n", "category": "E", "price": "1.00", "stock": 1}),
            "price",
        ),
        (
            json!({"name": "n", "category": "E", "price": 1, "stock": -1}),
            "stock",
        ),
        (
            json!({"name": "n", "category": "E", "price": 1, "stock": 1.5}),
            "stock",
        ),
        (
            json!({"name": "n", "category": "E", "price": 1, "stock": 2147483648i64}),
            "stock",
        ),
        (json!({"name": "n", "category": "E", "price": 1}), "stock"),
        (
            json!({"name": "n", "category": "E", "price": 1, "stock": 1, "color": "red"}),
            "color",
        ),
    ];
    for (body, field) in cases {
        check_rejected(
            &env,
            a,
            "/api/products",
            JSON,
            body.to_string().as_bytes(),
            400,
            field,
        );
    }
    // Bounds that are allowed.
    let edge = json!({"name": "x".repeat(200), "category": " Books ", "price": 999999999.99, "stock": 2147483647i64});
    assert_eq!(post_json(a, "/api/products", &edge).status, 201);
    let mut c = env.write();
    let row = c
        .query_one(
            "SELECT category, price::text FROM products WHERE id = 2",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Books", "names are trimmed");
    assert_eq!(row.get::<_, String>(1), "999999999.99");
}

#[test]
fn malformed_bodies_get_4xx_and_write_nothing() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let pid = create_product(a, "p", "c", 1.0, 10);
    for path in ["/api/products", "/api/orders"] {
        check_rejected(&env, a, path, JSON, b"{\"name\": ", 400, "JSON");
        check_rejected(&env, a, path, JSON, b"[1,2]", 400, "object");
        check_rejected(&env, a, path, JSON, b"", 400, "JSON");
        check_rejected(
            &env,
            a,
            path,
            JSON,
            b"{\"name\":\"\xff\xfe\"}",
            400,
            "UTF-8",
        );
        check_rejected(&env, a, path, JSON, &vec![b' '; 70 * 1024], 413, "exceeds");
        check_rejected(
            &env,
            a,
            path,
            &[("Content-Type", "text/plain")],
            b"{}",
            415,
            "application/json",
        );
        check_rejected(&env, a, path, &[], b"{}", 415, "application/json");
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        check_rejected(&env, a, path, JSON, deep.as_bytes(), 400, "");
        check_rejected(&env, a, path, JSON, b"{\"a\":1,\"a\":2}", 400, "duplicate");
    }
    check_rejected(
        &env,
        a,
        "/api/orders",
        JSON,
        br#"{"customerId": 1e400, "items": []}"#,
        400,
        "",
    );
    check_rejected(&env, a, "/api/orders", JSON, format!(r#"{{"customerId": 1, "items": [{{"productId": {pid}, "quantity": 99999999999999999999999}}]}}"#).as_bytes(), 400, "quantity");
    // Charset parameters are fine.
    let r = request(
        a,
        "POST",
        "/api/products",
        &[("Content-Type", "application/json; charset=utf-8")],
        br#"{"name":"n","category":"c","price":1,"stock":1}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn unknown_routes_and_methods_get_json_404_and_405() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let r = get(a, "/api/nothing");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let r = get(a, "/api/orders");
    assert_eq!(r.status, 405, "{}", r.body);
    assert!(r.headers.contains("Allow: POST"), "{}", r.headers);
    assert!(r.json()["error"].is_string());
    let r = request(a, "DELETE", "/api/products", &[], b"");
    assert_eq!(r.status, 405);
    let r = get(a, "/health");
    assert_eq!(
        (r.status, &r.json()["status"]),
        (200, &json!("healthy")),
        "{}",
        r.body
    );
    // Within BROKER_DOWN_GRACE_SECS of the start the publisher counts as connected.
    assert_eq!(r.json()["brokerConnected"], json!(true), "{}", r.body);
    let r = get(a, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("http_requests_total"), "{}", r.body);
}

#[test]
fn orders_are_validated_and_priced_from_the_catalogue() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let p1 = create_product(a, "Mouse", "Electronics", 29.99, 10);
    let p2 = create_product(a, "Book", "Books", 10.0, 1);
    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (
            json!({"items": [{"productId": p1, "quantity": 1}]}),
            400,
            "customerId",
        ),
        (
            json!({"customerId": 0, "items": [{"productId": p1, "quantity": 1}]}),
            400,
            "customerId",
        ),
        (
            json!({"customerId": "7", "items": [{"productId": p1, "quantity": 1}]}),
            400,
            "customerId",
        ),
        (json!({"customerId": 1, "items": []}), 400, "items"),
        (json!({"customerId": 1, "items": {}}), 400, "items"),
        (
            json!({"customerId": 1, "items": [{"productId": p1, "quantity": 0}]}),
            400,
            "quantity",
        ),
        (
            json!({"customerId": 1, "items": [{"productId": p1, "quantity": 10001}]}),
            400,
            "quantity",
        ),
        (
            json!({"customerId": 1, "items": [{"productId": p1, "quantity": 1.5}]}),
            400,
            "quantity",
        ),
        (
            json!({"customerId": 1, "items": [{"productId": p1}]}),
            400,
            "quantity",
        ),
        (
            json!({"customerId": 1, "items": [{"productId": -3, "quantity": 1}]}),
            400,
            "productId",
        ),
        (
            json!({"customerId": 1, "items": [{"productId": p1, "quantity": 1, "x": 1}]}),
            400,
            "x",
        ),
        (
            json!({"customerId": 1, "items": [{"productId": p1, "quantity": 1}], "note": "hi"}),
            400,
            "note",
        ),
        (
            json!({"customerId": 1, "items": [{"productId": p1, "quantity": 1}, {"productId": p1, "quantity": 2}]}),
            400,
            "more than once",
        ),
        (
            json!({"customerId": 1, "items": [{"productId": 999, "quantity": 1}]}),
            400,
            "999",
        ),
        (
            json!({"customerId": 1, "items": [{"productId": p1, "quantity": 1, "price": 0.001}]}),
            400,
            "price",
        ),
    ];
    for (body, status, needle) in cases {
        check_rejected(
            &env,
            a,
            "/api/orders",
            JSON,
            body.to_string().as_bytes(),
            status,
            needle,
        );
    }
    let many: Vec<_> = (0..101)
        .map(|i| json!({"productId": i + 1000, "quantity": 1}))
        .collect();
    check_rejected(
        &env,
        a,
        "/api/orders",
        JSON,
        json!({"customerId": 1, "items": many})
            .to_string()
            .as_bytes(),
        400,
        "items",
    );

    // A client price that differs from the catalogue: 409 naming the current price.
    let before = write_counts(&env);
    let r = post_json(
        a,
        "/api/orders",
        &json!({"customerId": 1, "items": [{"productId": p1, "quantity": 1, "price": 19.99}]}),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["currentPrice"], json!(29.99));
    assert_eq!(r.json()["productId"], json!(p1));
    assert_eq!(write_counts(&env), before);

    // Insufficient stock on the second line: 400 (as the original system answers) with
    // available/requested, nothing written.
    let r = post_json(
        a,
        "/api/orders",
        &json!({"customerId": 1, "items": [{"productId": p1, "quantity": 1}, {"productId": p2, "quantity": 2}]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({
            "error": format!("Insufficient stock for product {p2}: available 1, requested 2"),
            "productId": p2,
            "available": 1,
            "requested": 2
        })
    );
    assert_eq!(write_counts(&env), before);

    // Several failing lines: the answer names the first in the request's order (not the
    // lowest product id), whatever the others' faults.
    let r = post_json(
        a,
        "/api/orders",
        &json!({"customerId": 1, "items": [
            {"productId": p2, "quantity": 2},
            {"productId": 999, "quantity": 1},
            {"productId": p1, "quantity": 1, "price": 19.99}
        ]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        (r.json()["productId"].clone(), r.json()["requested"].clone()),
        (json!(p2), json!(2))
    );
    let r = post_json(
        a,
        "/api/orders",
        &json!({"customerId": 1, "items": [
            {"productId": 999, "quantity": 1},
            {"productId": p1, "quantity": 1, "price": 19.99}
        ]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("999"), "{}", r.body);
    let r = post_json(
        a,
        "/api/orders",
        &json!({"customerId": 1, "items": [
            {"productId": p2, "quantity": 1, "price": 1.0},
            {"productId": p1, "quantity": 11}
        ]}),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(
        (
            r.json()["productId"].clone(),
            r.json()["currentPrice"].clone()
        ),
        (json!(p2), json!(10.0))
    );
    assert_eq!(write_counts(&env), before);
    let mut c = env.write();
    let stock: i32 = c
        .query_one("SELECT stock FROM products WHERE id = $1", &[&p1])
        .unwrap()
        .get(0);
    assert_eq!(stock, 10, "stock untouched after a rejected order");

    // A good order: catalogue prices, one transaction with its outbox row.
    let r = post_json(
        a,
        "/api/orders",
        &json!({"customerId": 100, "items": [{"productId": p1, "quantity": 3, "price": 29.99}, {"productId": p2, "quantity": 1}]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let order_id = r.json()["orderId"].as_i64().unwrap();
    let row = c
        .query_one(
            "SELECT total::text, customer_id FROM orders WHERE id = $1",
            &[&order_id],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "99.97");
    let stock: Vec<i32> = c
        .query("SELECT stock FROM products ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stock, vec![7, 0]);
    let payload: serde_json::Value = serde_json::from_str(
        &c.query_one(
            "SELECT payload::text FROM outbox WHERE topic = 'order-events'",
            &[],
        )
        .unwrap()
        .get::<_, String>(0),
    )
    .unwrap();
    let mut keys: Vec<&str> = payload
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "customerId",
            "eventId",
            "eventType",
            "items",
            "orderId",
            "timestamp",
            "total"
        ],
        "the OrderCreated event's fields, no more"
    );
    assert_eq!(payload["eventType"], "OrderCreated");
    assert_eq!(payload["orderId"], json!(order_id));
    assert_eq!(payload["customerId"], json!(100));
    assert_eq!(payload["total"], json!(99.97));
    assert_eq!(
        payload["items"][0],
        json!({"productId": p1, "productName": "Mouse", "category": "Electronics", "quantity": 3, "price": 29.99})
    );
    let ts = payload["timestamp"].as_str().unwrap();
    assert!(
        ts.ends_with('Z') && ts.len() == 24,
        "RFC 3339 UTC with milliseconds: {ts}"
    );
    assert!(uuid::Uuid::parse_str(payload["eventId"].as_str().unwrap()).is_ok());
    let product_event: serde_json::Value = serde_json::from_str(
        &c.query_one(
            "SELECT payload::text FROM outbox WHERE topic = 'product-events' ORDER BY id LIMIT 1",
            &[],
        )
        .unwrap()
        .get::<_, String>(0),
    )
    .unwrap();
    assert_eq!(product_event["eventType"], "ProductCreated");
    assert_eq!(product_event["productId"], json!(p1));
    assert_eq!(product_event["price"], json!(29.99));
    assert_eq!(product_event["stock"], json!(10));
}

#[test]
fn concurrent_orders_never_oversell() {
    let env = TestEnv::new();
    let app = env.start_with(Role::Command, |c| {
        c.command_http_workers = 16;
        c.write_pool_size = 12;
    });
    let a = app.command();
    let pid = create_product(a, "Hot item", "Deals", 5.0, 30);
    let barrier = Arc::new(Barrier::new(120));
    let handles: Vec<_> = (0..120)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                post_json(
                    a,
                    "/api/orders",
                    &json!({"customerId": i + 1, "items": [{"productId": pid, "quantity": 1}]}),
                )
                .status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let created = statuses.iter().filter(|s| **s == 201).count();
    let out_of_stock = statuses.iter().filter(|s| **s == 400).count();
    assert_eq!((created, out_of_stock), (30, 90), "statuses: {statuses:?}");
    let mut c = env.write();
    let stock: i32 = c
        .query_one("SELECT stock FROM products WHERE id = $1", &[&pid])
        .unwrap()
        .get(0);
    assert_eq!(stock, 0);
    let outbox: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE topic = 'order-events'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(outbox, 30);
}

#[test]
fn concurrent_multi_item_orders_never_deadlock() {
    let env = TestEnv::new();
    let app = env.start_with(Role::Command, |c| {
        c.command_http_workers = 16;
        c.write_pool_size = 12;
    });
    let a = app.command();
    let ids: Vec<i64> = (0..6)
        .map(|i| create_product(a, &format!("p{i}"), "c", 1.0, 1_000_000))
        .collect();
    let barrier = Arc::new(Barrier::new(300));
    let handles: Vec<_> = (0..300u64)
        .map(|i| {
            let barrier = barrier.clone();
            let mut items: Vec<i64> = ids.clone();
            // A different item order per request (deterministic shuffle).
            let mut x = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            for k in (1..items.len()).rev() {
                x ^= x >> 33;
                x = x.wrapping_mul(0xff51afd7ed558ccd);
                items.swap(k, (x % (k as u64 + 1)) as usize);
            }
            thread::spawn(move || {
                let lines: Vec<_> = items
                    .iter()
                    .take(4)
                    .map(|p| json!({"productId": p, "quantity": 1}))
                    .collect();
                let body = json!({"customerId": 1, "items": lines}).to_string();
                let key = format!("deadlock-{i}");
                let headers = [
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", key.as_str()),
                ];
                barrier.wait();
                // 300 connections at once can overflow the listen queue of a loaded machine,
                // and a connection be reset before any answer: the client retries with its
                // Idempotency-Key, as a real one must, so an order is never counted twice.
                let mut last = Vec::new();
                for _ in 0..5 {
                    match try_request(a, "POST", "/api/orders", &headers, body.as_bytes()) {
                        Ok(r) => return r.status,
                        Err(raw) => last = raw,
                    }
                    thread::sleep(Duration::from_millis(200));
                }
                panic!(
                    "no answer in 5 attempts: {:?}",
                    String::from_utf8_lossy(&last)
                )
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| *s == 201),
        "statuses other than 201: {:?}",
        statuses.iter().filter(|s| **s != 201).collect::<Vec<_>>()
    );
    let mut c = env.write();
    let sold: i64 = c
        .query_one("SELECT sum(1000000 - stock)::bigint FROM products", &[])
        .unwrap()
        .get(0);
    assert_eq!(sold, 1200);
}

#[test]
fn idempotency_key_replays_the_first_response() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let pid = create_product(a, "p", "c", 2.5, 100);
    let body = json!({"customerId": 9, "items": [{"productId": pid, "quantity": 2}]}).to_string();
    let key = [
        ("Content-Type", "application/json"),
        ("Idempotency-Key", "order-abc-1"),
    ];
    let first = request(a, "POST", "/api/orders", &key, body.as_bytes());
    assert_eq!(first.status, 201, "{}", first.body);
    // Same key, same document (reformatted): the same response, nothing new written.
    let reformatted =
        json!({"items": [{"quantity": 2, "productId": pid}], "customerId": 9}).to_string();
    let again = request(a, "POST", "/api/orders", &key, reformatted.as_bytes());
    assert_eq!((again.status, again.json()), (201, first.json()));
    // Concurrent retries with one key write one order.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let body =
                json!({"customerId": 10, "items": [{"productId": pid, "quantity": 1}]}).to_string();
            thread::spawn(move || {
                request(
                    a,
                    "POST",
                    "/api/orders",
                    &[
                        ("Content-Type", "application/json"),
                        ("Idempotency-Key", "k2"),
                    ],
                    body.as_bytes(),
                )
            })
        })
        .collect();
    let replies: Vec<Reply> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        replies
            .iter()
            .all(|r| r.status == 201 && r.body == replies[0].body),
        "{replies:?}"
    );
    let mut c = env.write();
    let orders: i64 = c
        .query_one("SELECT count(*) FROM orders", &[])
        .unwrap()
        .get(0);
    assert_eq!(orders, 2);
    let stock: i32 = c
        .query_one("SELECT stock FROM products WHERE id = $1", &[&pid])
        .unwrap()
        .get(0);
    assert_eq!(stock, 97);
    // Same key, different body: 422, nothing written.
    let other = json!({"customerId": 9, "items": [{"productId": pid, "quantity": 3}]}).to_string();
    let r = request(a, "POST", "/api/orders", &key, other.as_bytes());
    assert_eq!(r.status, 422, "{}", r.body);
    // Products too.
    let pkey = [
        ("Content-Type", "application/json"),
        ("Idempotency-Key", "prod-1"),
    ];
    let pbody = br#"{"name":"n","category":"c","price":1,"stock":1}"#;
    let p1 = request(a, "POST", "/api/products", &pkey, pbody);
    let p2 = request(a, "POST", "/api/products", &pkey, pbody);
    assert_eq!((p1.status, &p1.body), (p2.status, &p2.body));
    let products: i64 = c
        .query_one("SELECT count(*) FROM products", &[])
        .unwrap()
        .get(0);
    assert_eq!(products, 2);
    // Malformed keys.
    let long = "k".repeat(256);
    for bad in ["", long.as_str(), "has space"] {
        let r = request(
            a,
            "POST",
            "/api/products",
            &[
                ("Content-Type", "application/json"),
                ("Idempotency-Key", bad),
            ],
            pbody,
        );
        assert_eq!(r.status, 400, "key {bad:?}: {}", r.body);
    }
}

/// Sends `body` to `path` from `n` threads at once, all with the Idempotency-Key `key`.
fn concurrent_retries(
    addr: std::net::SocketAddr,
    path: &'static str,
    key: &'static str,
    body: String,
    n: usize,
) -> Vec<Reply> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, body) = (barrier.clone(), body.clone());
            thread::spawn(move || {
                let headers = [
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", key),
                ];
                barrier.wait();
                request(addr, "POST", path, &headers, body.as_bytes())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Retries of one order that race for the last unit in stock: the retry that waited for
/// the row lock behind its twin gets the twin's 201, not "insufficient stock"; racing
/// retries of one product write one product.
#[test]
fn idempotent_retries_racing_for_the_last_unit_all_get_the_first_201() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let pid = create_product(a, "last", "c", 4.0, 1);
    let body = json!({"customerId": 3, "items": [{"productId": pid, "quantity": 1}]});
    let replies = concurrent_retries(a, "/api/orders", "last-unit", body.to_string(), 8);
    assert!(
        replies
            .iter()
            .all(|r| r.status == 201 && r.body == replies[0].body),
        "{replies:?}"
    );
    let product = json!({"name": "once", "category": "c", "price": 1, "stock": 1});
    let replies = concurrent_retries(a, "/api/products", "one-product", product.to_string(), 8);
    assert!(
        replies
            .iter()
            .all(|r| r.status == 201 && r.body == replies[0].body),
        "{replies:?}"
    );
    let mut c = env.write();
    let counts = c
        .query_one(
            "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM products),
                    (SELECT count(*) FROM outbox), (SELECT stock FROM products WHERE id = $1)",
            &[&pid],
        )
        .unwrap();
    let counts: (i64, i64, i64, i32) = (counts.get(0), counts.get(1), counts.get(2), counts.get(3));
    assert_eq!(
        counts,
        (1, 2, 3, 0),
        "(orders, products, outbox rows, stock)"
    );
    // Every answer but the first is a replay, also those that lost the race in the
    // database rather than finding the key before it (those were not counted).
    let counted = [
        "orders_created_total",
        "products_created_total",
        "idempotent_replays_total",
    ]
    .map(|name| counter(a, name));
    assert_eq!(counted, [1, 2, 14], "(orders, products, replays) counted");
}

#[test]
fn ten_orders_at_ten_cents_sum_to_exactly_one() {
    let env = TestEnv::new();
    let app = env.start(Role::All);
    let a = app.command();
    let pid = create_product(a, "Sweet", "Candy", 0.10, 100);
    for _ in 0..10 {
        let r = post_json(
            a,
            "/api/orders",
            &json!({"customerId": 5, "items": [{"productId": pid, "quantity": 1, "price": 0.1}]}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let mut c = env.write();
    let total: String = c
        .query_one("SELECT sum(total)::text FROM orders", &[])
        .unwrap()
        .get(0);
    assert_eq!(total, "1.00");
    let q = app.query();
    let body = wait_until(
        "ten orders in the read model",
        std::time::Duration::from_secs(20),
        || {
            let r = get(q, "/api/analytics/customers/5/lifetime-value");
            (r.status == 200 && r.json()["orderCount"] == json!(10)).then_some(r.body)
        },
    );
    assert!(body.contains("\"totalSpent\":1.00"), "{body}");
    let r = get(q, "/api/analytics/categories/Candy/revenue");
    assert!(r.body.contains("\"totalRevenue\":1.00"), "{}", r.body);
}

#[test]
fn database_down_gives_503_not_a_hang() {
    let env = TestEnv::new();
    let app = env.start_with(Role::Command, |c| {
        c.write_db = "postgresql://postgres@127.0.0.1:1/nowhere".parse().unwrap();
        c.db.connect = std::time::Duration::from_millis(300);
        c.db.pool_checkout = std::time::Duration::from_millis(500);
    });
    let started = std::time::Instant::now();
    let r = post_json(
        app.command(),
        "/api/products",
        &json!({"name": "n", "category": "c", "price": 1, "stock": 1}),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let r = get(app.command(), "/health");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("write database"), "{}", r.body);
}

#[test]
fn the_server_keeps_accepting_after_idling_longer_than_the_read_timeout() {
    // SO_RCVTIMEO, inherited by accepted sockets, also bounds accept(); tiny_http's accept
    // thread exits on its first error. Idle for several timeouts, then ask again.
    let env = TestEnv::new();
    let app = env.start_with(Role::Command, |c| {
        c.http_read_timeout = std::time::Duration::from_millis(100)
    });
    assert_eq!(get(app.command(), "/health").status, 200);
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(get(app.command(), "/health").status, 200);
}

/// `place_order` keeps one plan per statement, pinned to index lookups on `products`
/// (write migration 006). A generic plan made from the statistics of a catalogue never
/// analysed (a fresh database, autovacuum off, as here) scanned the whole table for every
/// order instead; this counts the scans of `products` while orders are placed.
#[test]
fn place_order_looks_products_up_by_key_on_a_never_analysed_catalogue() {
    let env = TestEnv::new();
    let mut db = env.write();
    db.batch_execute(
        "INSERT INTO products (name, category, price, stock)
         SELECT 'p' || g, 'c', 1, 1000 FROM generate_series(1, 500) g",
    )
    .unwrap();
    let analysed: Option<i64> = db
        .query_one(
            "SELECT reltuples::bigint FROM pg_class WHERE relname = 'products' AND reltuples >= 0",
            &[],
        )
        .map(|r| r.get(0))
        .ok();
    assert_eq!(
        analysed, None,
        "the catalogue must never have been analysed"
    );
    // Our own backend's counters, flushed at the end of the statement that asks for it.
    let mut scans = || -> (i64, i64) {
        db.batch_execute("SELECT pg_stat_force_next_flush()")
            .unwrap();
        let r = db
            .query_one(
                "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables
                 WHERE relname = 'products'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let before = scans();
    let mut place = env.write();
    for i in 0..12_i64 {
        let outcome: String = place
            .query_one(
                "SELECT r_outcome FROM place_order(ARRAY[$1::bigint, $1::bigint + 250], ARRAY[1, 2],
                 ARRAY[NULL, 100]::bigint[], 7, gen_random_uuid(), '2026-11-26T12:00:00.000Z',
                 NULL, NULL)",
                &[&(1 + i)],
            )
            .unwrap()
            .get(0);
        assert_eq!(outcome, "ok");
    }
    drop(place); // a backend flushes its counters when it ends
    let mut after = scans();
    for _ in 0..50 {
        if after.1 > before.1 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        after = scans();
    }
    assert!(
        after.1 > before.1,
        "no index scans counted: {before:?} → {after:?}"
    );
    assert_eq!(
        after.0, before.0,
        "place_order scanned the whole products table (seq_scan {before:?} → {after:?})"
    );
}

/// The catalogue's rules (name and category of 1 to 200 characters, a price above 0 and
/// below 1,000,000,000) hold for any writer of `products`, through the trigger of write
/// migration 007, while an order's stock decrement does not run it: before, they were
/// CHECK constraints, rebuilt from their stored text and evaluated at every order.
#[test]
fn the_catalogue_refuses_bad_products_from_any_writer_and_orders_do_not_run_its_checks() {
    let env = TestEnv::new();
    let mut db = env.write();
    let refused = |db: &mut postgres::Client, sql: &str| {
        let e = db.batch_execute(sql).expect_err(sql);
        assert_eq!(
            e.code(),
            Some(&postgres::error::SqlState::CHECK_VIOLATION),
            "{sql}: {e}"
        );
    };
    let long = "x".repeat(201);
    for (name, category, price) in [
        ("", "c", "1"),
        (long.as_str(), "c", "1"),
        ("n", "", "1"),
        ("n", long.as_str(), "1"),
        ("n", "c", "0"),
        ("n", "c", "-1"),
        ("n", "c", "1000000000"),
    ] {
        refused(
            &mut db,
            &format!(
                "INSERT INTO products (name, category, price, stock)
                 VALUES ('{name}', '{category}', {price}, 1)"
            ),
        );
    }
    let max = "y".repeat(200);
    let id: i64 = db
        .query_one(
            "INSERT INTO products (name, category, price, stock)
             VALUES ($1, $1, 999999999.99, 10) RETURNING id",
            &[&max],
        )
        .unwrap()
        .get(0);
    for set in ["name = ''", "category = ''", "price = 0"] {
        refused(
            &mut db,
            &format!("UPDATE products SET {set} WHERE id = {id}"),
        );
    }
    refused(
        &mut db,
        &format!("UPDATE products SET stock = -1 WHERE id = {id}"),
    );

    // Calls of the trigger's function within one transaction: none for an order, one for
    // an update that names a checked column.
    let mut tx = db.transaction().unwrap();
    tx.batch_execute("SET LOCAL track_functions = 'pl'")
        .unwrap();
    let calls = |tx: &mut postgres::Transaction| -> i64 {
        tx.query_opt(
            "SELECT calls FROM pg_stat_xact_user_functions WHERE funcname = 'products_valid'",
            &[],
        )
        .unwrap()
        .map_or(0, |r| r.get(0))
    };
    let outcome: String = tx
        .query_one(
            "SELECT r_outcome FROM place_order(ARRAY[$1::bigint], ARRAY[3], ARRAY[NULL]::bigint[],
             7, gen_random_uuid(), '2026-11-26T12:00:00.000Z', NULL, NULL)",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(outcome, "ok");
    let stock: i32 = tx
        .query_one("SELECT stock FROM products WHERE id = $1", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(stock, 7);
    assert_eq!(calls(&mut tx), 0, "the order's stock update ran the checks");
    tx.batch_execute(&format!(
        "UPDATE products SET price = price WHERE id = {id}"
    ))
    .unwrap();
    assert_eq!(
        calls(&mut tx),
        1,
        "an update of the price must run the checks"
    );
    tx.commit().unwrap();
}

/// A retry that writes a number differently (`5`, `5.00`, `5e0`; `100`, `1e2`) is the same
/// request: it replays the first response. Whole numbers written as decimals used to count
/// as another request (422), while `19.9` and `19.90` matched. Two `Idempotency-Key` lines
/// are refused (400), like two keys in one line: which one would guard the request?
#[test]
fn idempotency_keys_compare_numbers_by_value_and_come_once() {
    let env = TestEnv::new();
    let app = env.start(Role::Command);
    let a = app.command();
    let post = |key: &str, path: &str, body: &str| {
        let headers = [
            ("Content-Type", "application/json"),
            ("Idempotency-Key", key),
        ];
        request(a, "POST", path, &headers, body.as_bytes())
    };
    let first = post(
        "num-1",
        "/api/products",
        r#"{"name":"N","category":"C","price":100,"stock":10}"#,
    );
    assert_eq!(first.status, 201, "{}", first.body);
    for price in ["100.00", "1e2", "100.0", "1.00E2"] {
        let body = format!(r#"{{"name":"N","category":"C","price":{price},"stock":10}}"#);
        let again = post("num-1", "/api/products", &body);
        assert_eq!(
            (again.status, &again.body),
            (201, &first.body),
            "price {price}"
        );
    }
    let pid = first.json()["productId"].as_i64().unwrap();
    let order = |price: &str| {
        format!(
            r#"{{"customerId":9,"items":[{{"productId":{pid},"quantity":1,"price":{price}}}]}}"#
        )
    };
    let first = post("num-2", "/api/orders", &order("100"));
    assert_eq!(first.status, 201, "{}", first.body);
    let again = post("num-2", "/api/orders", &order("100.00"));
    assert_eq!((again.status, &again.body), (201, &first.body));
    // Another value is another request.
    let other = post("num-2", "/api/orders", &order("100.01"));
    assert_eq!(other.status, 422, "{}", other.body);

    let two_lines = request(
        a,
        "POST",
        "/api/products",
        &[
            ("Content-Type", "application/json"),
            ("Idempotency-Key", "one"),
            ("Idempotency-Key", "two"),
        ],
        br#"{"name":"M","category":"C","price":1,"stock":1}"#,
    );
    assert_eq!(two_lines.status, 400, "{}", two_lines.body);
    assert!(
        two_lines.body.contains("Idempotency-Key"),
        "{}",
        two_lines.body
    );
    let products: i64 = env
        .write()
        .query_one("SELECT count(*) FROM products", &[])
        .unwrap()
        .get(0);
    assert_eq!(products, 1, "the refused requests wrote nothing");
}
