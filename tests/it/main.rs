//! One integration-test binary (see matklad's "Delete Cargo Integration Tests"): every test
//! talks to the real PostgreSQL and RabbitMQ over real connections and to our services over
//! real HTTP on loopback. `harness` gives each test its own databases and broker names.

// Not every test module uses every helper.
#[allow(dead_code)]
mod harness;

mod cache;
mod connections;
mod dashboard;
mod deployment;
mod failover;
mod faults;
mod hostile;
mod lists;
mod metrics;
mod operations;
mod panics;
mod partition;
mod pipeline;
mod read_api;
mod retention;
mod stopping;
mod write_api;
