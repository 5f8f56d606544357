//! Operating the pipeline: a stalled consumer seen by `/health` and `sync-status`, dead
//! letters listed and replayed, the read model rebuilt from the write model while orders
//! flow. Real PostgreSQL, RabbitMQ and HTTP, as everywhere.

use std::time::{Duration, Instant};

use cqrs_analytics::app::Role;
use serde_json::{json, Value};

use crate::faults::converge;
use crate::harness::*;

fn sync_status(app: &App) -> Value {
    let r = get(app.query(), "/api/analytics/sync-status");
    assert_eq!(r.status, 200, "sync-status: {}", r.body);
    r.json()
}

fn order(app: &App, product: i64, customer: i64) {
    let r = post_json(
        app.command(),
        "/api/orders",
        &json!({"customerId": customer, "items": [{"productId": product, "quantity": 1}]}),
    );
    assert_eq!(r.status, 201, "order: {}", r.body);
}

/// A consumer blocked on a table lock held by another session: `lagSeconds` grows with the
/// age of the first blocked order, `/health` turns 503 within the stall window and
/// `consumerStalled` is true; once the lock goes, all of it recovers.
#[test]
fn a_consumer_blocked_on_a_lock_is_unhealthy_and_lag_tells_its_age() {
    let env = TestEnv::new();
    let stall = Duration::from_secs(3);
    let app = env.start_with(Role::All, |c| c.consumer_stall = stall);
    let product = create_product(app.command(), "Lamp", "Home", 12.50, 1_000);
    order(&app, product, 1);
    wait_until("the first events applied", Duration::from_secs(20), || {
        (sync_status(&app)["eventsApplied"] == json!(2)).then_some(())
    });
    assert_eq!(
        get(app.consumer(), "/health").status,
        200,
        "idle is healthy"
    );

    let mut locker = env.read();
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE product_sales_view IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let blocked_at = Instant::now();
    for customer in 2..7 {
        order(&app, product, customer);
    }
    // The orders are published and delivered, then held unacked by the blocked consumer:
    // the queue is empty, yet lag is the age of the oldest of them.
    let s = wait_until("lag to pass 2 s", Duration::from_secs(20), || {
        let s = sync_status(&app);
        (s["lagSeconds"].as_f64().unwrap() >= 2.0).then_some(s)
    });
    let lag = s["lagSeconds"].as_f64().unwrap();
    let age = blocked_at.elapsed().as_secs_f64();
    assert!(
        lag <= age + 0.5 && lag >= age - 1.5,
        "lag {lag} s, age {age} s: {s}"
    );
    assert_eq!(s["pendingConsumerMessages"], json!(5), "{s}");

    let unhealthy = wait_until("consumer /health 503", stall * 4, || {
        let r = get(app.consumer(), "/health");
        (r.status == 503).then_some(r)
    });
    assert!(unhealthy.body.contains("stalled"), "{}", unhealthy.body);
    assert!(
        blocked_at.elapsed() >= stall,
        "503 before the stall window ended: {}",
        unhealthy.body
    );
    let s = wait_until("consumerStalled", Duration::from_secs(5), || {
        let s = sync_status(&app);
        (s["consumerStalled"] == json!(true)).then_some(s)
    });
    let later = s["lagSeconds"].as_f64().unwrap();
    assert!(
        later > lag,
        "lag must keep growing during the stall: {lag} then {later}"
    );

    lock.rollback().unwrap();
    wait_until(
        "consumer /health 200 again",
        Duration::from_secs(20),
        || (get(app.consumer(), "/health").status == 200).then_some(()),
    );
    let s = wait_until("lag back to about 0", Duration::from_secs(20), || {
        let s = sync_status(&app);
        (s["lagSeconds"].as_f64().unwrap() < 1.0).then_some(s)
    });
    assert_eq!(s["consumerStalled"], json!(false), "{s}");
    assert_eq!(s["pendingConsumerMessages"], json!(0), "{s}");
    converge(&env);
}
