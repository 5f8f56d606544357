//! Several broker endpoints (`BROKER_URL` listing a cluster's nodes): connections go to the
//! first endpoint that answers, move on to the next when one dies in use, and `/health`
//! says when every connection has been down for longer than `BROKER_DOWN_GRACE_SECS`.
//! A dead endpoint is a closed port or a `TcpProxy` in front of the shared broker that the
//! test kills: the shared broker itself is never stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_analytics::app::Role;
use cqrs_analytics::broker::{endpoint_name, Endpoints, LinkStatus};
use cqrs_analytics::config::parse_amqp_urls;
use serde_json::json;

use crate::harness::{
    assert_converges, broker_host_port, broker_url, broker_url_via, counter, create_product,
    free_port, get, post_json, wait_until, App, ChildService, ProxyMode, TcpProxy, TestEnv,
};

fn order(addr: std::net::SocketAddr, product: i64, customer: i64) {
    let r = post_json(
        addr,
        "/api/orders",
        &json!({"customerId": customer, "items": [{"productId": product, "quantity": 1}]}),
    );
    assert_eq!(r.status, 201, "order: {}", r.body);
}

fn health(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let r = get(addr, "/health");
    (r.status, r.json())
}

/// `N` killable proxies in front of the local broker, and a `BROKER_URL` naming them all
/// (comma-separated URLs, in order).
fn proxied_endpoints<const N: usize>() -> ([TcpProxy; N], String) {
    let proxies: [TcpProxy; N] = std::array::from_fn(|_| TcpProxy::start(broker_host_port()));
    let url = proxies
        .iter()
        .map(|p| broker_url_via(p.port))
        .collect::<Vec<_>>()
        .join(",");
    (proxies, url)
}

#[test]
fn a_dead_first_endpoint_is_skipped() {
    let env = TestEnv::new();
    // Endpoint 0 is a closed port, endpoint 1 the broker (the URL-list form).
    let url = format!("{},{}", broker_url_via(free_port()), broker_url());
    let mut config = env.config();
    config.broker_targets = parse_amqp_urls(&url).unwrap();
    let live = endpoint_name(&config.broker_targets[1]);
    // Each connection after the first starts with the endpoint after the previous one, so
    // whatever the random start, the dead endpoint comes first at least every other time.
    let status = Arc::new(LinkStatus::new());
    let mut endpoints = Endpoints::new(&config, status.clone());
    for _ in 0..4 {
        let mut link = endpoints
            .connect(&config)
            .expect("the live endpoint answers");
        assert_eq!(link.endpoint, live);
        link.in_use();
        assert_eq!(status.down_for(), Duration::ZERO, "a connection is in use");
    }
    assert!(
        status.down_for() > Duration::ZERO,
        "every connection is closed"
    );

    let app = env.start_with(Role::All, |c| {
        c.broker_targets = config.broker_targets.clone()
    });
    let product = create_product(app.command(), "Desk", "Office", 120.0, 1000);
    for customer in 1..=20 {
        order(app.command(), product, customer);
    }
    assert_converges(&env, Duration::from_secs(30));
    let (status, body) = health(app.command());
    assert_eq!(
        (status, &body["brokerConnected"]),
        (200, &json!(true)),
        "{body}"
    );
}

#[test]
fn an_endpoint_that_dies_in_use_fails_over_and_loses_nothing() {
    let env = TestEnv::new();
    let (mut proxies, _) = proxied_endpoints::<2>();
    // The host-list form: one URL, two hosts sharing its credentials and vhost.
    let url = broker_url_via(proxies[0].port).replacen(
        "@127.0.0.1:",
        &format!("@127.0.0.1:{},127.0.0.1:", proxies[1].port),
        1,
    );
    let targets = parse_amqp_urls(&url).unwrap();
    assert_eq!(targets.len(), 2, "{url}");
    let app = env.start_with(Role::All, |c| c.broker_targets = targets);
    let product = create_product(app.command(), "Lamp", "Home", 15.5, 1_000_000);
    wait_until(
        "the publisher and the consumer to connect",
        Duration::from_secs(20),
        || (proxies[0].open_connections() + proxies[1].open_connections() >= 2).then_some(()),
    );
    let mut killed = None;
    for i in 0..300 {
        order(app.command(), product, 1 + i % 7);
        if i == 100 {
            // The endpoint carrying more connections dies while orders flow.
            let busier = usize::from(proxies[1].open_connections() > proxies[0].open_connections());
            let cut = proxies[busier].open_connections();
            assert!(cut >= 1, "no connection to cut");
            proxies[busier].kill();
            killed = Some((busier, cut));
        }
    }
    let (busier, cut) = killed.unwrap();
    let survivor = &proxies[1 - busier];
    wait_until(
        "the cut connections to fail over",
        Duration::from_secs(20),
        || (survivor.open_connections() >= 2).then_some(()),
    );
    assert_converges(&env, Duration::from_secs(60));
    let errors = counter(app.command(), "outbox_session_errors_total")
        + counter(app.consumer(), "consumer_session_errors_total");
    assert!(
        errors >= 1,
        "{cut} connections were cut but no session failed"
    );
    let (status, body) = health(app.command());
    assert_eq!(
        (status, &body["brokerConnected"]),
        (200, &json!(true)),
        "{body}"
    );
    assert_eq!(health(app.consumer()).0, 200);
}

#[test]
fn health_reports_a_broker_lost_for_longer_than_the_grace_period() {
    let env = TestEnv::new();
    let (mut proxies, url) = proxied_endpoints::<2>();
    let app = env.start_with(Role::All, |c| {
        c.broker_targets = parse_amqp_urls(&url).unwrap();
        c.broker_down_grace = Duration::from_secs(1);
    });
    wait_until(
        "both services to be connected",
        Duration::from_secs(20),
        || {
            let (command, body) = health(app.command());
            (command == 200
                && body["brokerConnected"] == json!(true)
                && health(app.consumer()).0 == 200)
                .then_some(())
        },
    );
    for p in &mut proxies {
        p.kill();
    }
    // The command service stays healthy (its outbox keeps the events) but says so; the
    // consumer service cannot work without the broker.
    wait_until(
        "the outage to show in /health",
        Duration::from_secs(20),
        || {
            let (command, body) = health(app.command());
            let (consumer, consumer_body) = health(app.consumer());
            (command == 200 && body["brokerConnected"] == json!(false) && consumer == 503)
                .then_some(consumer_body)
        },
    );
    let product = create_product(app.command(), "Chair", "Office", 40.0, 10);
    order(app.command(), product, 1);
}

/// A broker that accepts the connection but refuses the declares (here a queue of that name
/// was declared with other arguments, as by a build with another `BROKER_QUEUE_TYPE`):
/// sessions connect and fail in a loop, and `/health` says the broker is not usable. It
/// said `brokerConnected: true` (and the consumer service 200) for as long as it lasted:
/// a connection counted as up before its session had set up its channels.
#[test]
fn health_reports_a_broker_that_refuses_the_declares() {
    let env = TestEnv::new();
    {
        // The harness declared the test's topology: the order queue is declared again
        // without its dead-letter arguments.
        let (conn, ch) = env.amqp();
        ch.queue_delete(env.broker.order_queue.as_str(), Default::default())
            .unwrap();
        ch.queue_declare(
            env.broker.order_queue.as_str(),
            amiquip::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
        )
        .unwrap();
        drop(conn.close());
    }
    let app = env.start_with(Role::All, |c| {
        c.broker_down_grace = Duration::from_secs(1);
    });
    let (consumer_body, command_body) = wait_until(
        "/health to say the broker cannot be used",
        Duration::from_secs(20),
        || {
            let (command, body) = health(app.command());
            let (consumer, consumer_body) = health(app.consumer());
            (command == 200 && body["brokerConnected"] == json!(false) && consumer == 503)
                .then_some((consumer_body, body))
        },
    );
    assert_eq!(
        consumer_body["brokerConnected"],
        json!(false),
        "{consumer_body}"
    );
    assert_eq!(command_body["status"], json!("healthy"), "{command_body}");
    // Orders are still accepted; they wait in the outbox.
    let product = create_product(app.command(), "Lamp", "Office", 20.0, 10);
    assert!(product > 0);
    // The log names the queue and the variable (it said "broker error: ... PRECONDITION_FAILED").
    let mut cmd = env.binary("command-service");
    cmd.env("COMMAND_SERVICE_PORT", "0");
    let child = ChildService::spawn(&mut cmd, "command-service", &format!("refused-{}", env.id));
    let needle = format!(
        "the broker refuses to declare queue {:?}: it exists with other arguments (another BROKER_QUEUE_TYPE than classic",
        env.broker.order_queue
    );
    wait_until("the log to say why", Duration::from_secs(20), || {
        child.log().contains(&needle).then_some(())
    });
}

/// Orders placed from now on, every one applied: how long until the read model has them.
fn time_to_apply(env: &TestEnv, command: std::net::SocketAddr, product: i64, n: i64) -> Duration {
    let started = std::time::Instant::now();
    for customer in 1..=n {
        order(command, product, customer);
    }
    assert_converges(env, Duration::from_secs(30));
    started.elapsed()
}

/// A cluster node whose channels wait on a dead peer keeps its connections and heartbeats
/// but answers nothing on a channel: measured on a 3-node cluster, basic.consume on a
/// surviving node went unanswered for 7 s after the queue's leader was killed. The sessions
/// that fail over onto such a node must leave it after `BROKER_STALL_TIMEOUT_MS` for the
/// next endpoint, not wait there (amiquip's calls have no timeout).
#[test]
fn sessions_leave_a_node_whose_channels_do_not_answer() {
    let env = TestEnv::new();
    let (mut proxies, url) = proxied_endpoints::<3>();
    // Every connection starts on the first endpoint: the others refuse AMQP for now.
    proxies[1].set_mode(ProxyMode::Refuse);
    proxies[2].set_mode(ProxyMode::Refuse);
    let stall = Duration::from_millis(500);
    let app = env.start_with(Role::All, |c| {
        c.broker_targets = parse_amqp_urls(&url).unwrap();
        c.broker_stall_timeout = stall;
        c.publish_confirm_timeout = Duration::from_secs(60);
    });
    let product = create_product(app.command(), "Lamp", "Home", 15.5, 1_000_000);
    time_to_apply(&env, app.command(), product, 5);
    assert!(proxies[0].open_connections() >= 2, "publisher and consumer");

    // The first node dies; the next one in the list stalls every new channel; the third
    // works. Both sessions fail over onto the stalling node first.
    proxies[1].set_mode(ProxyMode::StallChannels);
    proxies[2].set_mode(ProxyMode::Forward);
    proxies[0].kill();
    let took = time_to_apply(&env, app.command(), product, 20);
    assert!(
        took < Duration::from_secs(5),
        "orders placed after the kill took {took:?} to be applied (stall timeout {stall:?})"
    );
    assert!(
        proxies[2].open_connections() >= 2,
        "publisher and consumer on the third endpoint"
    );
    let errors = counter(app.command(), "outbox_session_errors_total")
        + counter(app.consumer(), "consumer_session_errors_total");
    assert!(
        errors >= 2,
        "{errors} session errors: a session did not fail over"
    );
}

/// A publisher whose channel stops confirming (its queue's leader is gone and the channel
/// waits on it) gives the channel up after `BROKER_STALL_TIMEOUT_MS` without any confirm,
/// long before the batch's `PUBLISH_CONFIRM_TIMEOUT_MS`, and publishes on a new connection.
#[test]
fn a_publisher_without_confirms_moves_on_after_the_stall_timeout() {
    let env = TestEnv::new();
    let (proxies, url) = proxied_endpoints::<2>();
    let stall = Duration::from_millis(500);
    // The publisher through the proxies, the consumer straight to the broker.
    let command = env.start_with(Role::Command, |c| {
        c.broker_targets = parse_amqp_urls(&url).unwrap();
        c.broker_stall_timeout = stall;
        c.publish_confirm_timeout = Duration::from_secs(60);
    });
    let _consumer = env.start(Role::Consumer);
    let product = create_product(command.command(), "Desk", "Office", 120.0, 1_000_000);
    time_to_apply(&env, command.command(), product, 5);

    // The open connection's channel stops answering; a new connection works.
    for p in &proxies {
        p.stall_open_connections();
    }
    let took = time_to_apply(&env, command.command(), product, 20);
    assert!(
        took < Duration::from_secs(5),
        "orders placed after the stall took {took:?} to be applied (stall timeout {stall:?})"
    );
    assert!(counter(command.command(), "outbox_session_errors_total") >= 1);
}

/// A consumer straight to the broker (it declares the queues) and a query service whose
/// one broker endpoint is a proxy, with `stall` as its `BROKER_STALL_TIMEOUT_MS`.
fn a_query_service_behind_a_proxy(env: &TestEnv, stall: Duration) -> (TcpProxy, App, App) {
    let ([proxy], url) = proxied_endpoints::<1>();
    let consumer = env.start(Role::Consumer);
    let query = env.start_with(Role::Query, |c| {
        c.broker_targets = parse_amqp_urls(&url).unwrap();
        c.broker_stall_timeout = stall;
    });
    (proxy, consumer, query)
}

/// sync-status asks the broker for its queue depths over a connection it keeps. When that
/// connection's channels stop answering (a node waiting on a dead peer, while heartbeats
/// still pass), the question is given up after `BROKER_STALL_TIMEOUT_MS` and sync-status
/// answers without the broker's figures, instead of waiting (with every other caller of
/// the probe queued behind it) for as long as the node stays silent.
#[test]
fn sync_status_does_not_wait_for_a_broker_that_stopped_answering() {
    let env = TestEnv::new();
    let stall = Duration::from_millis(500);
    let (proxy, _consumer, query) = a_query_service_behind_a_proxy(&env, stall);
    let addr = query.query();
    let status = move || {
        let started = Instant::now();
        let r = get(addr, "/api/analytics/sync-status");
        assert_eq!(r.status, 200, "{}", r.body);
        (r.json(), started.elapsed())
    };
    wait_until(
        "sync-status to reach the broker",
        Duration::from_secs(10),
        || (status().0["brokerReachable"] == true).then_some(()),
    );
    proxy.stall_open_connections();
    let callers: Vec<_> = (0..3).map(|_| std::thread::spawn(status)).collect();
    for caller in callers {
        let (body, took) = caller.join().unwrap();
        assert!(
            took < Duration::from_secs(4),
            "sync-status took {took:?} with the broker silent (stall timeout {stall:?}): {body}"
        );
        assert_eq!(body["brokerReachable"], false, "{body}");
        assert_eq!(body["lagIsLowerBound"], true, "{body}");
    }
}

/// A broker slow to answer for a moment (a queue busy draining a large backlog answered the
/// probe's declares in over 300 ms here): sync-status counts its messages again within about
/// the stall timeout once it answers in time. A call the watchdog cut used to stop the probe
/// asking for 5 s, and its reopening's declares could be cut in turn: 5 to 11 s of null.
#[test]
fn sync_status_asks_a_broker_that_was_slow_again_soon() {
    let env = TestEnv::new();
    let stall = Duration::from_millis(300);
    let (proxy, _consumer, query) = a_query_service_behind_a_proxy(&env, stall);
    let addr = query.query();
    let status = move || {
        let r = get(addr, "/api/analytics/sync-status");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    wait_until(
        "sync-status to reach the broker",
        Duration::from_secs(10),
        || (status()["pendingBrokerMessages"].is_i64()).then_some(()),
    );
    // One call slower than the stall timeout: cut.
    proxy.delay_channels(stall * 2);
    let slow = status();
    proxy.delay_channels(Duration::ZERO);
    assert!(slow["pendingBrokerMessages"].is_null(), "{slow}");
    assert_eq!(slow["lagIsLowerBound"], true, "{slow}");
    let answering = Instant::now();
    let back = wait_until(
        "pendingBrokerMessages counted again",
        Duration::from_secs(10),
        || {
            let s = status();
            s["pendingBrokerMessages"]
                .is_i64()
                .then(|| answering.elapsed())
        },
    );
    assert!(
        back < Duration::from_secs(2),
        "sync-status counted the broker's messages again only {back:?} after it answered in time (stall timeout {stall:?})"
    );
}

/// A broker that stays down, with the shortest backoff allowed: each supervised thread
/// logs its failure once, then once every 30 s with how often it recurred, not at every
/// retry (it logged about 195 lines a second).
#[test]
fn a_broker_that_stays_down_is_logged_once_not_at_every_retry() {
    let env = TestEnv::new();
    let nowhere = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let mut cmd = env.binary("command-service");
    cmd.env("COMMAND_SERVICE_PORT", "0")
        .env("BROKER_URL", &nowhere)
        .env("OUTBOX_PUBLISHERS", "2")
        .env("BROKER_RECONNECT_MAX_MS", "10");
    let mut service = crate::harness::ChildService::spawn(
        &mut cmd,
        "command-service",
        &format!("flood-{}", env.id),
    );
    std::thread::sleep(Duration::from_secs(3));
    let log = service.log();
    service.terminate(Duration::from_secs(20));
    let failures = log.lines().filter(|l| l.contains("retrying in")).count();
    assert!(
        (1..=4).contains(&failures),
        "{failures} lines about the broker in 3 s:\n{}",
        log.lines().take(20).collect::<Vec<_>>().join("\n")
    );
}
