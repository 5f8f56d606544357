//! cqrs-analytics turns an e-commerce write model into live analytics. The command service
//! validates products and orders and writes them to PostgreSQL together with an outbox row
//! per event; the outbox publisher moves those rows to RabbitMQ with publisher confirms;
//! consumers fold the events into four denormalised views in a second database, each event
//! exactly once; the query service reads those views. Everything is synchronous threads
//! and channels.
//!
//! Reading order (the `mod` lines below are sorted by rustfmt): `config`, `error`,
//! `metrics`, `json`, `http`, `db`, `event`, `command`, `broker`, `supervise`, `outbox`,
//! `projection`, `consumer`, `progress`, `query`, `shutdown`, `app`, `cli`; ARCHITECTURE.md
//! says what each is.

pub mod app;
pub mod broker;
pub mod cli;
pub mod command;
pub mod config;
pub mod consumer;
pub mod dashboard;
pub mod db;
pub mod dead_letters;
pub mod error;
pub mod event;
pub mod http;
pub mod json;
pub mod lists;
pub mod metrics;
pub mod outbox;
pub mod progress;
pub mod projection;
pub mod query;
pub mod rebuild;
pub mod retention;
pub mod shutdown;
pub mod supervise;

pub use config::Config;
pub use error::{Error, Result};
