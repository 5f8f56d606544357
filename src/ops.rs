//! Operations: the background jobs and commands that keep the system running for years
//! rather than serve a request. Retention keeps the bookkeeping tables bounded, the rebuild
//! recomputes the read model from the write model, and dead letters are listed and redriven.

pub mod dead_letters;
pub mod rebuild;
pub mod retention;
