//! Placeholder: the pipeline benchmark (see README "Performance").
fn main() {}
