//! The read side: consumers that fold broker deliveries into the read model (projection),
//! the record of what they hold (progress, for lag and the stall check), and the query
//! service with its ranked lists and dashboard. Only `consumer` and `projection` write the
//! read model; the query service never writes.

pub mod cache;
pub mod consumer;
pub mod dashboard;
pub mod lists;
pub mod progress;
pub mod projection;
pub mod query;
