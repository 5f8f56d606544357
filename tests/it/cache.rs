//! The query service's response cache (`src/read/cache.rs`): an answer is kept until the
//! read model says it changed (a consumer's batch, a rebuild's switch, a migration: each
//! sends `NOTIFY read_model_changed`), or sync-status was read, or the cache's listener
//! lost its connection. A change made by hand in SQL sends nothing: the tests use one to
//! see whether an answer came from the cache.

use cqrs_analytics::app::Role;

use crate::harness::*;

/// `totalQuantitySold` of the product as the query service answers it.
pub fn sold(addr: std::net::SocketAddr, product: i64) -> i64 {
    let r = get(addr, &format!("/api/analytics/products/{product}/sales"));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["totalQuantitySold"].as_i64().unwrap()
}

/// Sets the product's sold quantity in the read model, in SQL (which notifies nothing),
/// once no sums of it are pending (the consumer folds them into the view when idle).
pub fn set_sold(env: &TestEnv, product: i64, quantity: i64) {
    let mut read = env.read();
    wait_until(
        "no pending sums",
        std::time::Duration::from_secs(10),
        || {
            let pending: i64 = read
                .query_one(
                    "SELECT count(*) FROM product_sales_delta WHERE product_id = $1",
                    &[&product],
                )
                .unwrap()
                .get(0);
            (pending == 0).then_some(())
        },
    );
    read.execute(
        "UPDATE product_sales_view SET total_quantity_sold = $2 WHERE product_id = $1",
        &[&product, &quantity],
    )
    .unwrap();
}

pub fn wait_sold(addr: std::net::SocketAddr, product: i64, quantity: i64, what: &str) {
    let path = format!("/api/analytics/products/{product}/sales");
    wait_until(what, std::time::Duration::from_secs(10), || {
        let r = get(addr, &path);
        (r.status == 200 && r.json()["totalQuantitySold"] == quantity).then_some(())
    });
}

/// A new product, once the query service answers for it and, for a cache that is on, once
/// its listener has heard the batch that applied it: a notification heard later would end
/// what the test then reads into the cache (one clean-clone CI run saw that happen).
pub fn answered_product(app: &App, name: &str) -> i64 {
    let q = app.query();
    let cached = get(q, "/health").json()["responseCache"] != "off";
    if cached {
        wait_cache_on(q);
    }
    let heard = counter(q, "query_cache_changes_total");
    let product = create_product(app.command(), name, "Cache", 2.5, 100);
    wait_until("the product", std::time::Duration::from_secs(10), || {
        (get(q, &format!("/api/analytics/products/{product}/sales")).status == 200).then_some(())
    });
    if cached {
        wait_heard(q, heard);
    }
    product
}

/// Waits until the cache's listener has heard more than `heard` changes.
pub fn wait_heard(addr: std::net::SocketAddr, heard: u64) {
    wait_until(
        "the change heard",
        std::time::Duration::from_secs(10),
        || (counter(addr, "query_cache_changes_total") > heard).then_some(()),
    );
}

/// The listener listens from a moment after the service starts.
pub fn wait_cache_on(addr: std::net::SocketAddr) {
    wait_until("the cache on", std::time::Duration::from_secs(10), || {
        (get(addr, "/health").json()["responseCache"] == "on").then_some(())
    });
}

#[test]
fn an_answer_is_kept_until_the_read_model_says_it_changed() {
    let env = TestEnv::new();
    let app = env.start(Role::All);
    let (cmd, q) = (app.command(), app.query());
    let product = answered_product(&app, "Kept");
    let hits = counter(q, "query_cache_hits_total");
    assert_eq!(sold(q, product), 0);
    assert_eq!(sold(q, product), 0);
    assert!(counter(q, "query_cache_hits_total") > hits);

    // Changed behind the service's back: the cache does not know.
    set_sold(&env, product, 40);
    assert_eq!(sold(q, product), 0, "the answer is kept");
    // Anyone's notification on the channel ends it.
    env.read()
        .batch_execute("NOTIFY read_model_changed")
        .unwrap();
    wait_sold(q, product, 40, "the answer after a notification");

    // An order: the consumer's batch notifies (40 by hand + 3).
    let order = serde_json::json!({"customerId": 7, "items": [{"productId": product, "quantity": 3, "price": 2.5}]});
    let heard = counter(q, "query_cache_changes_total");
    assert_eq!(post_json(cmd, "/api/orders", &order).status, 201);
    wait_sold(q, product, 43, "the order in the answer");
    wait_heard(q, heard);

    // sync-status starts a new generation once it has read.
    set_sold(&env, product, 50);
    assert_eq!(sold(q, product), 43, "the answer is kept");
    assert_eq!(get(q, "/api/analytics/sync-status").status, 200);
    assert_eq!(sold(q, product), 50, "read after sync-status");
    assert!(counter(q, "query_cache_changes_total") >= 3);
    app.stop();
}

#[test]
fn query_cache_bytes_0_reads_the_database_every_time() {
    let env = TestEnv::new();
    let app = env.start_with(Role::All, |c| c.query_cache_bytes = 0);
    let q = app.query();
    assert_eq!(get(q, "/health").json()["responseCache"], "off");
    let product = answered_product(&app, "Uncached");
    set_sold(&env, product, 9);
    assert_eq!(sold(q, product), 9);
    assert_eq!(counter(q, "query_cache_hits_total"), 0);
    app.stop();
}

/// The listener's connection ended by the server: the cache steps aside at once, and is
/// back, with a new generation, once the listener listens again.
#[test]
fn a_listener_that_lost_its_connection_lets_requests_through_until_it_listens_again() {
    let env = TestEnv::new();
    let app = env.start(Role::All);
    let q = app.query();
    let product = answered_product(&app, "Listened");
    assert_eq!(sold(q, product), 0);
    set_sold(&env, product, 5);
    assert_eq!(sold(q, product), 0, "the answer is kept");
    let ended: i64 = env
        .read()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'query-service-cache'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(ended, 1);
    wait_sold(
        q,
        product,
        5,
        "the answer after the listener's connection ended",
    );
    wait_cache_on(q);
    assert_eq!(sold(q, product), 5);
    set_sold(&env, product, 6);
    assert_eq!(sold(q, product), 5, "the answer is kept again");
    app.stop();
}

/// The ranked lists read the views alone, so folding pending sums into them (what a
/// consumer does when idle) changes their answers: `fold_pending` notifies too.
#[test]
fn folding_pending_sums_ends_the_kept_lists() {
    use cqrs_analytics::db::{self, Session};
    let env = TestEnv::new();
    env.read()
        .batch_execute(
            "INSERT INTO product_sales_view (product_id, name, category, total_quantity_sold, total_revenue, order_count)
             VALUES (1, 'Folded', 'Cache', 5, 10.00, 1);
             INSERT INTO product_sales_delta (shard, product_id, name, category, quantity, revenue, orders)
             VALUES (3, 1, 'Folded', 'Cache', 7, 14.00, 1);",
        )
        .unwrap();
    let app = env.start(Role::Query);
    let q = app.query();
    wait_cache_on(q);
    let top = || {
        let r = get(q, "/api/analytics/products?sort=quantity");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["products"][0]["totalQuantitySold"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(top(), 5, "the view alone");
    assert_eq!(top(), 5);
    let config = env.config();
    let pool = db::pool(&config.read_db, 1, &config.db, "fold", Session::Consumer);
    let still = cqrs_analytics::read::projection::fold_pending(&mut pool.get().unwrap());
    assert!(!still.unwrap(), "nothing left pending");
    wait_until(
        "the folded sums in the list",
        std::time::Duration::from_secs(10),
        || (top() == 12).then_some(()),
    );
    app.stop();
}

/// `/health` says whether the cache answers; `openapi.json` (which schemathesis holds every
/// answer to, in CI) must list what it says: it did not at first.
#[test]
fn health_tells_the_cache_state_as_the_openapi_document_lists_it() {
    let doc: serde_json::Value = serde_json::from_str(cqrs_analytics::http::OPENAPI_JSON).unwrap();
    let schema = &doc["components"]["schemas"]["Healthy"]["properties"];
    let states = schema["responseCache"]["enum"].as_array().unwrap().clone();
    let env = TestEnv::new();
    for bytes in [4096, 0] {
        let app = env.start_with(Role::Query, |c| c.query_cache_bytes = bytes);
        let q = app.query();
        if bytes > 0 {
            wait_cache_on(q);
        }
        let health = get(q, "/health").json();
        for (key, value) in health.as_object().unwrap() {
            assert!(schema.get(key).is_some(), "{key} is not in openapi.json");
            if key == "responseCache" {
                assert!(states.contains(value), "{value} is not in openapi.json");
            }
        }
        let want = if bytes > 0 { "on" } else { "off" };
        assert_eq!(health["responseCache"], want);
        app.stop();
    }
}
