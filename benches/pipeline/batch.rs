//! Phase `batch`: what the consumer's database work costs one event, without the broker.
//! `projection::apply_batch` runs batches of one new order event on one consumer session
//! (`db::Session::Consumer`) of a fresh read database, as the consumer does when events
//! arrive one at a time: once as new events (one statement, then the flush barrier), once
//! with an event processed before in every batch, which sends the batch the long way
//! (`BEGIN` with the claim, the writes, `COMMIT` with the barrier). Latency per batch,
//! barrier included; the first batches of each way (preparing statements) are not counted.

use std::time::Instant;

use chrono::Utc;
use cqrs_analytics::db::{pool, Session};
use cqrs_analytics::event::{Event, OrderCreated, OrderItem};
use cqrs_analytics::read::projection::apply_batch;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::ceiling::Ceilings;
use crate::client::pct;
use crate::harness::TestEnv;
use crate::report::{Figures, Row};
use crate::{log, round, Settings};

/// Batches per way, after `WARM_UP`.
const BATCHES: usize = 1000;
const WARM_UP: usize = 50;

pub struct BatchFigures {
    /// Microseconds per batch, sorted: new events, then the long way.
    pub at_once_us: Vec<u64>,
    pub long_way_us: Vec<u64>,
    pub error: Option<String>,
}

fn order(n: i64) -> Event {
    Event::OrderCreated(OrderCreated {
        event_id: Uuid::new_v4(),
        timestamp: Utc::now(),
        order_id: n,
        customer_id: 1 + n % 500,
        items: vec![OrderItem {
            product_id: 1 + n % 200,
            product_name: format!("product {}", 1 + n % 200),
            category: format!("category {}", n % 8),
            quantity: 1 + n % 3,
            price_cents: 1999,
        }],
        total_cents: 1999 * (1 + n % 3),
    })
}

pub fn run(_: &Settings) -> BatchFigures {
    let env = TestEnv::new();
    let config = env.config();
    let consumers = pool(
        &config.read_db,
        1,
        &config.db,
        "bench-batch",
        Session::Consumer,
    );
    let mut f = BatchFigures {
        at_once_us: Vec::new(),
        long_way_us: Vec::new(),
        error: None,
    };
    log(format!(
        "batch: {BATCHES} one-event batches each way on one consumer session"
    ));
    let result = consumers
        .get()
        .map_err(|e| e.to_string())
        .and_then(|mut conn| {
            let seen = order(0);
            apply_batch(&mut conn, std::slice::from_ref(&seen)).map_err(|e| e.to_string())?;
            let mut n = 0;
            for (long_way, times) in [(false, &mut f.at_once_us), (true, &mut f.long_way_us)] {
                for i in 0..WARM_UP + BATCHES {
                    n += 1;
                    let mut batch = vec![order(n)];
                    if long_way {
                        batch.push(seen.clone());
                    }
                    let t = Instant::now();
                    let counts = apply_batch(&mut conn, &batch).map_err(|e| e.to_string())?;
                    let us = t.elapsed().as_micros() as u64;
                    if counts.applied != 1 {
                        return Err(format!("batch {n} applied {} events", counts.applied));
                    }
                    if i >= WARM_UP {
                        times.push(us);
                    }
                }
                times.sort_unstable();
            }
            Ok(())
        });
    f.error = result.err();
    log(format!(
        "batch: p50 {:.2} ms in one statement, {:.2} ms the long way",
        pct(&f.at_once_us, 50.0) / 1000.0,
        pct(&f.long_way_us, 50.0) / 1000.0
    ));
    f
}

impl Figures for BatchFigures {
    fn rows(&self, _: &Ceilings) -> Vec<Row> {
        let row = |figure: &str, v: &[u64], note: &str| {
            Row::info(figure, pct(v, 50.0) / 1000.0, "ms").detail(format!(
                "p99 {:.2} ms, {} batches, {note}",
                pct(v, 99.0) / 1000.0,
                v.len()
            ))
        };
        let mut rows = vec![
            row(
                "one-event batch, new: p50",
                &self.at_once_us,
                "flush barrier included",
            ),
            row(
                "one-event batch, the long way: p50",
                &self.long_way_us,
                "each with an event processed before",
            ),
        ];
        if let Some(e) = &self.error {
            rows.push(Row::info("batch failed", f64::NAN, "-").detail(e.clone()));
        }
        rows
    }

    fn json(&self) -> Value {
        let summary = |v: &[u64]| {
            json!({"batches": v.len(), "p50_ms": round(pct(v, 50.0) / 1000.0, 3),
                   "p99_ms": round(pct(v, 99.0) / 1000.0, 3)})
        };
        json!({"at_once": summary(&self.at_once_us), "long_way": summary(&self.long_way_us),
               "error": self.error})
    }
}
