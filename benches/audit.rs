//! Audit store benchmarks (placeholder while the audit module is built).
fn main() {}
