//! A bug of ours (a panic) is contained: a panicking request handler answers 500
//! `{"error":"internal error"}`, counts in `http_panics_total`, and the worker lives on.
//!
//! How the panic is triggered: the test serves the real `CommandService` through the real
//! HTTP layer (`HttpServer::start`, as `app::start` does) wrapped in a `Service` of its own
//! that panics on one path and hands every other request to the real service. Production
//! code has no test route, flag or hook for this: the wrapper exists only in this file.
//!
//! A publisher or consumer thread that panics is restarted by its supervisor with backoff,
//! counted, and `/health` says so meanwhile. There the panic comes from the one hook
//! production code has for it: `Supervision::inject_panic` (`#[doc(hidden)]`, per process,
//! never called outside tests), checked once per worker loop with one atomic load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_analytics::app::Role;
use cqrs_analytics::db;
use cqrs_analytics::error::Result;
use cqrs_analytics::http::{HttpServer, Limits, Request, Response, Service};
use cqrs_analytics::write::command::CommandService;
use serde_json::json;

use crate::harness::*;

/// The real service, except that `GET /panic` panics in the handler.
struct PanicsOnOnePath<S> {
    inner: S,
}

impl<S: Service> Service for PanicsOnOnePath<S> {
    fn handle(&self, req: &Request) -> (&'static str, Result<Response>) {
        if req.path == "/panic" {
            panic!("a bug, injected by the test");
        }
        self.inner.handle(req)
    }

    fn health(&self) -> Result<()> {
        self.inner.health()
    }

    fn health_details(&self) -> serde_json::Map<String, serde_json::Value> {
        self.inner.health_details()
    }

    fn metrics(&self, out: &mut String) {
        self.inner.metrics(out)
    }
}

#[test]
fn panicking_handlers_answer_500_and_the_workers_live_on() {
    let env = TestEnv::new();
    let config = env.config();
    let pool = db::pool(
        &config.write_db,
        2,
        &config.db,
        "it-panics",
        cqrs_analytics::db::Session::Plain,
    );
    let service = PanicsOnOnePath {
        inner: CommandService::new(pool, None, None),
    };
    let workers = 2;
    let server = HttpServer::start(
        "command-service",
        "127.0.0.1:0".parse().unwrap(),
        Limits::from_config(&config, workers),
        Arc::new(service),
    )
    .unwrap();
    let a = server.addr;
    // Ten times as many panics as workers: without containment every worker would be
    // dead after the first two.
    let panics = 10 * workers as u64;
    for i in 0..panics {
        let r = get(a, "/panic");
        assert_eq!(
            (r.status, r.json()),
            (500, json!({"error": "internal error"})),
            "panic #{i}"
        );
    }
    let id = create_product(a, "Still served", "Resilience", 1.5, 3);
    assert!(id > 0);
    assert_eq!(get(a, "/health").status, 200);
    let sample = "http_panics_total{service=\"command-service\"}";
    assert_eq!(counter(a, sample), panics);
    let routes = get(a, "/metrics").body;
    assert!(
        routes.contains(&format!(
            "http_requests_total{{service=\"command-service\",route=\"panicked\",status=\"500\"}} {panics}"
        )),
        "{routes}"
    );
    server.stop();
}

#[test]
fn panicking_publisher_and_consumer_threads_are_restarted_and_health_says_so() {
    let env = TestEnv::new();
    // Five panics in a row each, with the backoff capped at 2 s: the threads are down for
    // 100, 200, 400, 800 and 1600 ms, so even a /health answered slowly on a loaded machine
    // sees the last window.
    let app = env.start_with(Role::All, |c| {
        c.broker_reconnect_max = Duration::from_secs(2)
    });
    let (a, c) = (app.command(), app.consumer());
    let pid = create_product(a, "Restarted", "Resilience", 2.5, 100);
    let panics = 5;
    app.supervision().inject_panic("publisher", panics);
    app.supervision().inject_panic("consumer", panics);
    let r = post_json(
        a,
        "/api/orders",
        &json!({"customerId": 7, "items": [{"productId": pid, "quantity": 2}]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // Both threads are down at once and /health names one of them: either will do. Every
    // distinct answer seen is kept for the failure message.
    let mut seen: Vec<(u16, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = get(a, "/health");
        if h.status == 503 && h.body.contains("panicked") {
            assert!(
                h.body.contains("publisher") || h.body.contains("consumer"),
                "{}",
                h.body
            );
            break;
        }
        if !seen.iter().any(|(s, b)| *s == h.status && *b == h.body) {
            seen.push((h.status, h.body));
        }
        assert!(
            Instant::now() < deadline,
            "/health never said a thread panicked; it answered {seen:?}; down now: {:?}",
            app.supervision().down()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The order still makes it through both restarted threads into the read model.
    assert_converges(&env, Duration::from_secs(60));
    assert_eq!(unpublished(&env), 0);
    // Every injected panic happens (/health is 200 between two windows, while a restarted
    // thread connects, so health alone does not say the panics are over), then health is
    // back, and no thread restarted more often than it panicked.
    // Each role on its own service's port.
    let restarts = |role: &str| {
        let port = if role == "publisher" { a } else { c };
        counter(port, &format!("thread_restarts_total{{role=\"{role}\"}}"))
    };
    for role in ["publisher", "consumer"] {
        wait_until(
            &format!("{role} to restart {panics} times"),
            Duration::from_secs(30),
            || (restarts(role) >= u64::from(panics)).then_some(()),
        );
    }
    wait_until(
        "/health to be healthy again",
        Duration::from_secs(30),
        || (get(a, "/health").status == 200 && get(c, "/health").status == 200).then_some(()),
    );
    for role in ["publisher", "consumer"] {
        assert_eq!(restarts(role), u64::from(panics), "{role}");
    }
}
