//! Shutdown in the documented order (issue 9): SIGTERM closes the listeners, the requests
//! in flight are answered, the publishers publish what those requests committed, the
//! consumers stop after their batch, every thread is joined, and the process exits 0.

use std::time::Duration;

use crate::faults::{seed_products, Load, SLOW_MARK};
use crate::harness::*;

#[test]
fn sigterm_under_load_publishes_every_accepted_order_then_exits_0() {
    let env = TestEnv::new();
    // Marking rows published takes 300 ms per batch, so a backlog builds up under the load
    // and is still there at the signal: a process that stopped its publishers together
    // with HTTP would leave it unpublished.
    env.write().batch_execute(SLOW_MARK).unwrap();
    let mut cmd = env.binary("command-service");
    cmd.env("RUST_LOG", "info")
        .env("COMMAND_SERVICE_PORT", "0")
        .env("OUTBOX_BATCH_SIZE", "50")
        .env("SHUTDOWN_DRAIN_TIMEOUT_MS", "20000");
    let mut service =
        ChildService::spawn(&mut cmd, "command-service", &format!("stopping-{}", env.id));
    let products = seed_products(service.addr);
    let load = Load::start(service.addr, &products, 4);
    wait_until("orders under load", Duration::from_secs(30), || {
        (load.created() >= 200 && unpublished(&env) > 0).then_some(())
    });
    let backlog_at_signal = unpublished(&env);
    let status = service.terminate(Duration::from_secs(40));
    let log = service.log();
    let seen = load.stop();

    assert!(status.success(), "exit status {status}; log:\n{log}");
    let unexpected = seen.unexpected(&[201, 503], true);
    assert!(
        unexpected.is_empty(),
        "{unexpected:?} in {:?}",
        seen.summary()
    );
    let created = seen.count(|o| matches!(o, crate::faults::Outcome::Status(201, _)));
    let (products_n, orders, _, outbox, _) = write_counts(&env);
    assert_eq!(
        orders as usize, created,
        "orders in the DB vs 201s the clients got"
    );
    assert_eq!(
        unpublished(&env),
        0,
        "backlog at the signal {backlog_at_signal}; log:\n{log}"
    );
    // Everything published reached the queues, once.
    let depth = env.queue_depth(&env.broker.order_queue) as i64
        + env.queue_depth(&env.broker.product_queue) as i64;
    assert_eq!((depth, outbox), (orders + products_n, orders + products_n));
    // The stages stopped in order.
    let at = |what: &str| {
        log.find(what)
            .unwrap_or_else(|| panic!("no {what:?} in the log:\n{log}"))
    };
    assert!(at("HTTP stopped") < at("publishers stopped"), "{log}");
    assert!(at("publishers stopped") < at("app: stopped after"), "{log}");
    eprintln!(
        "stopping: {created} orders accepted, {backlog_at_signal} unpublished at the signal, 0 after; {:?}",
        seen.summary()
    );
}
