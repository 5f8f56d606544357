//! A bug of ours (a panic) is contained: a panicking request handler answers 500
//! `{"error":"internal error"}`, counts in `http_panics_total`, and the worker lives on.
//!
//! How the panic is triggered: the test serves the real `CommandService` through the real
//! HTTP layer (`HttpServer::start`, as `app::start` does) wrapped in a `Service` of its own
//! that panics on one path and hands every other request to the real service. Production
//! code has no test route, flag or hook for this: the wrapper exists only in this file.

use std::sync::Arc;

use cqrs_analytics::command::CommandService;
use cqrs_analytics::db;
use cqrs_analytics::error::Result;
use cqrs_analytics::http::{HttpServer, Limits, Request, Response, Service};
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
