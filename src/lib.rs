//! cqrs-analytics turns an e-commerce write model into live analytics. The command service
//! validates products and orders and writes them to PostgreSQL together with an outbox row
//! per event; the outbox publisher moves those rows to RabbitMQ with publisher confirms;
//! consumers fold the events into four denormalised views in a second database, each event
//! exactly once; the query service reads those views. Everything is synchronous threads
//! and channels.
//!
//! The modules shared by every side sit at the top; the rest is grouped by side: `write`
//! (command API, outbox publisher), `read` (consumers, projection, queries, dashboard) and
//! `ops` (retention, rebuild, dead letters). Reading order (the `mod` lines below are sorted
//! by rustfmt): `config`, `error`, `metrics`, `json`, `http`, `db`, `event`,
//! `write::command`, `broker`, `supervise`, `write::outbox`, `read::projection`,
//! `read::consumer`, `read::progress`, `read::query`, `shutdown`, `app`, `cli`, then `ops`;
//! ARCHITECTURE.md says what each is.

pub mod app;
pub mod broker;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod event;
pub mod http;
pub mod json;
pub mod metrics;
pub mod ops;
pub mod read;
pub mod shutdown;
pub mod supervise;
pub mod write;

pub use config::Config;
pub use error::{Error, Result};
