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
use std::time::Duration;

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
    let pool = db::pool(&config.write_db, 2, &config.db, "it-panics", false);
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
    let app = env.start(Role::All);
    let (a, c) = (app.command(), app.consumer());
    let pid = create_product(a, "Restarted", "Resilience", 2.5, 100);
    // Four panics in a row each: the backoff grows 100, 200, 400, 800 ms, so the threads
    // are down for about 1.5 s, long enough for /health to be seen saying so.
    let panics = 4;
    app.supervision().inject_panic("publisher", panics);
    app.supervision().inject_panic("consumer", panics);
    let r = post_json(
        a,
        "/api/orders",
        &json!({"customerId": 7, "items": [{"productId": pid, "quantity": 2}]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // Both threads are down at once and /health names one of them: either will do (waiting
    // for the publisher alone could miss its window while the consumer is the one named).
    let down = wait_until(
        "/health to name a restarting thread",
        Duration::from_secs(10),
        || {
            let h = get(a, "/health");
            (h.status == 503 && (h.body.contains("publisher") || h.body.contains("consumer")))
                .then_some(h.body)
        },
    );
    assert!(down.contains("panicked"), "{down}");
    // The order still makes it through both restarted threads into the read model.
    assert_converges(&env, Duration::from_secs(30));
    assert_eq!(unpublished(&env), 0);
    wait_until(
        "/health to be healthy again",
        Duration::from_secs(10),
        || (get(a, "/health").status == 200 && get(c, "/health").status == 200).then_some(()),
    );
    for role in ["publisher", "consumer"] {
        let sample = format!("thread_restarts_total{{role=\"{role}\"}}");
        assert_eq!(counter(a, &sample), u64::from(panics), "{role}");
    }
}
