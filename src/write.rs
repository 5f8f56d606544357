//! The write side: the command service's API (validate, one statement with the outbox row)
//! and the outbox publisher that moves committed events to the broker. Nothing here reads
//! the read model.

pub mod command;
pub mod outbox;
