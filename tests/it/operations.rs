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

/// Runs `cqrs-analytics dead-letters ARGS` (the real binary): exit code and stdout.
fn dead_letters(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let out = env.binary("dead-letters").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "dead-letters {args:?} -> {:?}\n{stdout}{stderr}",
        out.status
    );
    (out.status.code().unwrap_or(-1), stdout)
}

fn failed_attempts(env: &TestEnv, id: &str) -> Option<i32> {
    env.read()
        .query_opt(
            "SELECT attempts FROM event_failures WHERE message_key = $1",
            &[&id],
        )
        .unwrap()
        .map(|r| r.get(0))
}

/// Events the read model refuses (a constraint standing in for a bug) are dead-lettered
/// after the usual attempts; a replay before the fix sends them back there after the same
/// number of attempts (no loop); after the fix a replay applies each exactly once.
#[test]
fn dead_letters_are_listed_and_replayed_exactly_once_after_a_fix() {
    let env = TestEnv::new();
    let app = env.start_with(Role::All, |c| c.consumer_attempts_max = 3);
    let dlq = env.broker.dead_letter_queue.clone();
    let product = create_product(app.command(), "Kettle", "Kitchen", 30.00, 1_000);
    env.read()
        .batch_execute(
            "ALTER TABLE customer_ltv_view ADD CONSTRAINT it_bug CHECK (customer_id <> 4242)",
        )
        .unwrap();
    for customer in [1, 4242, 2, 4242, 3] {
        order(&app, product, customer);
    }
    let poison: Vec<String> = env
        .write()
        .query(
            "SELECT payload->>'eventId' FROM outbox WHERE payload->>'customerId' = '4242' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_until("two dead letters", Duration::from_secs(30), || {
        (env.queue_depth(&dlq) == 2).then_some(())
    });

    let (code, listed) = dead_letters(&env, &["list"]);
    assert_eq!(code, 0);
    for id in &poison {
        let line = listed.lines().find(|l| l.starts_with(id.as_str()));
        let line = line.unwrap_or_else(|| panic!("{id} not listed:\n{listed}"));
        assert!(line.contains("\tOrderCreated\t3\t"), "{line}");
    }
    assert_eq!(
        env.queue_depth(&dlq),
        2,
        "list must leave the messages where they were"
    );

    // Replayed before the fix: it fails again, three fresh attempts, back to the queue.
    let (code, out) = dead_letters(&env, &["replay", &poison[0]]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("replayed {}", poison[0])), "{out}");
    wait_until(
        "the replayed event back in the DLQ",
        Duration::from_secs(30),
        || {
            (env.queue_depth(&dlq) == 2 && failed_attempts(&env, &poison[0]) == Some(3))
                .then_some(())
        },
    );

    env.read()
        .batch_execute("ALTER TABLE customer_ltv_view DROP CONSTRAINT it_bug")
        .unwrap();
    let (code, out) = dead_letters(&env, &["replay", "--all"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("replayed ").count(), 2, "{out}");
    wait_until(
        "the dead-letter queue empty",
        Duration::from_secs(30),
        || (env.queue_depth(&dlq) == 0).then_some(()),
    );
    converge(&env);
    let ltv = get(app.query(), "/api/analytics/customers/4242/lifetime-value").json();
    assert_eq!(ltv["orderCount"], json!(2), "{ltv}");
    assert_eq!(
        failed_attempts(&env, &poison[1]),
        None,
        "forgotten once applied"
    );

    let (code, out) = dead_letters(&env, &["replay", &poison[0]]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("not in the dead-letter queue: {}", poison[0])),
        "{out}"
    );
    let (code, out) = dead_letters(&env, &["list"]);
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "ID\tTYPE\tATTEMPTS\tWHEN\tLAST ERROR\n0 dead-lettered message(s)"
        )
    );
}
