//! Phase `consumers` (issue 15): a queued backlog of `BENCH_CONSUMERS_BACKLOG` events
//! (100,000) drained by 1, 2, ... `BENCH_CONSUMERS_MAX` (3) `consumer-service` processes.
//! For each count: events/s and the share of sampled read-side backends (every 10 ms)
//! waiting on a heavyweight lock (`Lock:*`), the sign that consumers serialise on shared
//! rows. The outbox is filled once; each round clones that write database, publishes it
//! into fresh queues and drains them into a fresh read database.

use serde_json::{json, Value};

use crate::backlog::{consume, fill, publish, Drain};
use crate::ceiling::Ceilings;
use crate::client::LoadResult;
use crate::pipeline::load_json;
use crate::report::{Figures, Row};
use crate::services::{clone_database, read_equals_write, Stack};
use crate::{env_or, log, Settings};

pub struct ConsumersFigures {
    pub fill: LoadResult,
    /// (processes, publisher drain, consumer drain, read == write after).
    pub rounds: Vec<(usize, Drain, Drain, bool)>,
}

pub fn run(s: &Settings) -> ConsumersFigures {
    let events: i64 = env_or("BENCH_CONSUMERS_BACKLOG", 100_000);
    let max: usize = env_or("BENCH_CONSUMERS_MAX", 3);
    let source = Stack::new();
    // Every product is an event too.
    let fill = fill(s, &source, events - s.products as i64);
    let mut rounds = Vec::new();
    for processes in 1..=max {
        let stack = Stack::new();
        clone_database(&source.env.write_db, &stack.env.write_db);
        let publisher = publish(s, &stack);
        let drain = consume(s, &stack, processes, true);
        let same = read_equals_write(&stack);
        log(format!(
            "consumers: {processes} processes: {:?} events/s, Lock:* share {:.3}, read == write {same}",
            drain.per_second.map(|e| e.round()),
            drain.lock_share
        ));
        rounds.push((processes, publisher, drain, same));
    }
    ConsumersFigures { fill, rounds }
}

impl Figures for ConsumersFigures {
    fn rows(&self, _: &Ceilings) -> Vec<Row> {
        let mut rows = Vec::new();
        for (n, _, d, same) in &self.rounds {
            let eps = d.per_second.unwrap_or(f64::NAN);
            let detail = format!(
                "{} events in {:.2} s, read == write {same}",
                d.events, d.seconds
            );
            rows.push(
                Row::info(format!("{n} consumer processes: events/s"), eps, "ev/s").detail(detail),
            );
            let lock = format!("{n} consumer processes: Lock:* share");
            rows.push(if *n == self.rounds.len() && *n > 1 {
                Row::at_most(lock, d.lock_share, "share", 0.05)
            } else {
                Row::info(lock, d.lock_share, "share")
            });
        }
        rows
    }

    fn json(&self) -> Value {
        json!({
            "fill": load_json(&self.fill),
            "rounds": self.rounds.iter().map(|(n, p, d, same)| json!({
                "processes": n, "publisher": p.json(), "consumer": d.json(), "read_equals_write": same,
            })).collect::<Vec<_>>(),
        })
    }
}
