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
        let (p50, p90, p99) = quantiles(samples);
        println!(
            "latency check_one_tool_call/{n}: p50 {p50:.2} µs  p90 {p90:.2} µs  p99 {p99:.2} µs  ({rounds} decisions)"
        );
    }
}

/// A minimal keep-alive HTTP/1.1 client for the side-by-side run (no extra dependencies).
struct Http {
    stream: std::net::TcpStream,
}

impl Http {
    fn connect(addr: &str) -> std::io::Result<Http> {
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Http { stream })
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(req.as_bytes())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return Ok(text[end + 4..end + 4 + len].to_string());
                }
            }
        }
    }
}

fn quantiles(mut samples: Vec<u64>) -> (f64, f64, f64) {
    samples.sort_unstable();
    let q = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    (q(0.5), q(0.9), q(0.99))
}

/// The same generated policies through the real Cerbos PDP's check API (`CERBOS_BIN`).
fn cerbos_side_by_side() {
    let Ok(bin) = std::env::var("CERBOS_BIN") else {
        println!(
            "cerbos side-by-side: skipped (set CERBOS_BIN, e.g. CERBOS_BIN=$(scripts/peers cerbos))"
        );
        return;
    };
    for n in [10usize, 100, 1000] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let policies = dir.path().join("policies");
        fixtures::write_set(&policies, n);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(3592);
        let grpc = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(3593);
        let conf = dir.path().join("conf.yaml");
        let _ = std::fs::write(
            &conf,
            format!(
                "server:\n  httpListenAddr: 127.0.0.1:{port}\n  grpcListenAddr: 127.0.0.1:{grpc}\nstorage:\n  driver: disk\n  disk:\n    directory: {}\n    watchForChanges: false\naudit:\n  enabled: false\ntelemetry:\n  disabled: true\n",
                policies.display()
            ),
        );
        let mut child = match std::process::Command::new(&bin)
            .args(["server", "--config", &conf.display().to_string()])
            .env("CERBOS_NO_TELEMETRY", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                println!("cerbos side-by-side: cannot start {bin}: {e}");
                return;
            }
        };
        let addr = format!("127.0.0.1:{port}");
        let mut client = None;
        // Loading 1,000 policies takes Cerbos a while on a busy 2-core machine.
        for _ in 0..1200 {
            if let Ok(mut c) = Http::connect(&addr) {
                if c.request("GET", "/_cerbos/health", "")
                    .is_ok_and(|b| b.contains("SERVING"))
                {
                    client = Some(c);
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let Some(mut c) = client else {
            let _ = child.kill();
            println!("cerbos side-by-side: cerbos did not become healthy");
            return;
        };
        let input = fixtures::tool_call(n);
        let body = serde_json::json!({
            "requestId": "bench",
            "principal": input.principal,
            "resources": [{"resource": input.resource, "actions": input.actions}],
        })
        .to_string();
        let first = c
            .request("POST", "/api/check/resources", &body)
            .unwrap_or_default();
        assert!(first.contains("EFFECT_ALLOW"), "cerbos answered {first}");
        let rounds = 5_000;
        let mut check = Vec::with_capacity(rounds);
        let mut health = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let _ = black_box(c.request("POST", "/api/check/resources", &body));
            check.push(t.elapsed().as_nanos() as u64);
            let t = Instant::now();
            let _ = black_box(c.request("GET", "/_cerbos/health", ""));
            health.push(t.elapsed().as_nanos() as u64);
        }
        let _ = child.kill();
        let _ = child.wait();
        let (c50, c90, c99) = quantiles(check);
        let (h50, _, h99) = quantiles(health);
        println!(
            "cerbos 0.55.0 check API /{n}: p50 {c50:.1} µs  p90 {c90:.1} µs  p99 {c99:.1} µs  (GET /_cerbos/health on the same connection: p50 {h50:.1} µs, p99 {h99:.1} µs; {rounds} sequential requests)"
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
        cerbos_side_by_side();
    }
}
