//! Policy engine benchmarks: one tool-call decision over 10, 100 and 1,000 resource policies,
//! and compiling 1,000 policies. `cargo bench --bench policy`.
//! After criterion, a latency pass prints p50/p90/p99 of single decisions (criterion reports
//! means and medians of batches, not tails).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test and bench code"
)]

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion};
use toolgate::policy::{eval, input::Params, model::Effect, store};

#[path = "fixtures.rs"]
mod fixtures;

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("check_one_tool_call");
    for n in [10usize, 100, 1000] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        fixtures::write_set(dir.path(), n);
        let set = store::load_dir(dir.path()).unwrap_or_else(|e| panic!("compile: {e:?}"));
        let input = fixtures::tool_call(n);
        let params = Params::default();
        assert_eq!(
            eval::check(&set, &input, &params).actions[0].effect,
            Effect::Allow
        );
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| eval::check(black_box(&set), black_box(&input), &params))
        });
    }
    group.finish();
}

fn compile(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    fixtures::write_set(dir.path(), 1000);
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("1000_policies", |b| {
        b.iter(|| store::load_dir(black_box(dir.path())).map(|s| s.len()))
    });
    group.finish();
}

fn percentiles() {
    for n in [10usize, 100, 1000] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        fixtures::write_set(dir.path(), n);
        let set = store::load_dir(dir.path()).unwrap_or_else(|e| panic!("compile: {e:?}"));
        let input = fixtures::tool_call(n);
        let params = Params::default();
        let rounds = if cfg!(debug_assertions) { 200 } else { 200_000 };
        for _ in 0..rounds / 10 {
            black_box(eval::check(&set, &input, &params));
        }
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            black_box(eval::check(&set, &input, &params));
            samples.push(t.elapsed().as_nanos() as u64);
        }
        samples.sort_unstable();
        let q = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
        println!(
            "latency check_one_tool_call/{n}: p50 {:.2} µs  p90 {:.2} µs  p99 {:.2} µs  ({rounds} decisions)",
            q(0.50),
            q(0.90),
            q(0.99)
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    decision(&mut c);
    compile(&mut c);
    c.final_summary();
    // `cargo test --benches` and nextest run bench binaries without `--bench`: criterion then
    // runs each benchmark once as a smoke test; skip the long latency pass too.
    if std::env::args().any(|a| a == "--bench") {
        percentiles();
    }
}
