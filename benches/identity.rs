//! Identity benchmarks (issue 3 part 9): `cargo bench --bench identity`.
//!
//! 1. The per-request identity cost on a kept-alive connection: what the accept loop does for
//!    every request (strip client `Tailscale-*` headers, clone the connection's `Conn` into
//!    the request's extensions) plus what a route does to read it (axum's `Extension<Conn>`
//!    clones it back out). Budget: ≤ 1 µs.
//! 2. A cache hit (a new connection from an IP seen within the TTL).
//! 3. A cold WhoIs through the resolver against the fake tailscaled (unix socket, pooled
//!    connection, JSON decode, mapping, principal), and the bare LocalAPI call.
//! 4. With `TAILSCALED_BIN` set: the real tailscaled 1.96.4, logged out (every WhoIs is a
//!    404): latency of the 404 for a tailnet address, a bare IP and a loopback `ip:port`,
//!    the resolver's loopback path (404, one retry), `status`, and what parallel unmapped
//!    loopback lookups do to a concurrent `status` (why loopback lookups are bounded).
//!
//! Run without `--bench` (`cargo test --benches`, nextest), criterion runs each benchmark once
//! and the real-tailscaled pass is skipped.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "bench code"
)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Request};
use std::hint::black_box;

use criterion::{BatchSize, Criterion};
use serde_json::json;
use support::fake_localapi::{FakeLocalApi, user_whois};
use toolgate::config::RoleMappings;
use toolgate::gateway::{Caller, Conn};
use toolgate::identity::strip_tailscale_headers;
use toolgate::tailnet::localapi::LocalApi;
use toolgate::tailnet::types::WhoIs;
use toolgate::tailnet::whois::{WhoisResolver, WhoisSettings, identity_from_whois};

const CAP: &str = "toolgate.dev/cap/toolgate";

fn settings() -> WhoisSettings {
    WhoisSettings {
        capability: CAP.into(),
        mappings: RoleMappings::default(),
        ttl: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
        max_concurrent: 32,
        max_concurrent_loopback: toolgate::tailnet::whois::DEFAULT_MAX_CONCURRENT_LOOPBACK,
        loopback_retry_delay: Duration::from_millis(20),
        cache_capacity: 16_384,
        tailnet: Some("example.com".into()),
    }
}

fn alice_whois(ip: &str) -> serde_json::Value {
    user_whois(
        ip,
        "alice-laptop",
        "alice@example.com",
        "Alice Example",
        json!({CAP: [{"roles": ["developer"]}, {"roles": ["oncall"], "max_calls": 5}]}),
    )
}

/// A realistic per-connection `Conn` (a user with two grants).
fn conn() -> Conn {
    let who: WhoIs = serde_json::from_value(alice_whois("100.64.0.1")).unwrap();
    let identity =
        identity_from_whois(&who, "100.64.0.1".parse().unwrap(), "example.com", CAP).unwrap();
    let principal = identity.principal(&RoleMappings::default());
    Conn {
        peer: "127.0.0.1:40000".parse().unwrap(),
        caller: Some(Arc::new(Caller::new(identity, principal))),
        unidentified: None,
    }
}

/// The headers of a typical MCP POST.
fn request() -> Request<()> {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "toolgate.example.ts.net"),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-session-id", "0b0f7a47-4d55-4e52-9a36-8f3f5a1f2c11"),
        ("mcp-protocol-version", "2025-11-25"),
        ("content-length", "187"),
        ("user-agent", "mcp-client/1.32"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    let mut r = Request::new(());
    *r.headers_mut() = h;
    r
}

fn per_request(c: &mut Criterion) {
    let conn = conn();
    let mut g = c.benchmark_group("identity/per_request");
    g.bench_function("attach_and_extract_conn", |b| {
        b.iter_batched(
            request,
            |mut req| {
                // The accept loop, per request (server::serve_io).
                strip_tailscale_headers(req.headers_mut());
                req.extensions_mut().insert(black_box(&conn).clone());
                // A route: `Extension<Conn>` clones it out of the extensions.
                let got = req.extensions().get::<Conn>().cloned();
                black_box((req, got))
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("request_only_baseline", |b| {
        b.iter_batched(request, black_box, BatchSize::SmallInput)
    });
    g.finish();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn against_fake(c: &mut Criterion) {
    let rt = runtime();
    let fake = rt.block_on(FakeLocalApi::start());
    fake.add_identity("100.64.0.1", alice_whois("100.64.0.1"));
    let mut g = c.benchmark_group("identity/fake_tailscaled");

    // A cache hit: a new connection from an IP resolved within the TTL.
    let cached = WhoisResolver::new(fake.client(), settings());
    let peer: SocketAddr = "100.64.0.1:40000".parse().unwrap();
    rt.block_on(cached.resolve(peer)).unwrap();
    g.bench_function("resolve_cache_hit", |b| {
        b.iter(|| rt.block_on(cached.resolve(black_box(peer))).unwrap())
    });

    // Cold: TTL 0, so every lookup asks tailscaled (over the pooled unix-socket connection).
    let mut s = settings();
    s.ttl = Duration::ZERO;
    let cold = WhoisResolver::new(fake.client(), s);
    g.bench_function("resolve_cold_whois", |b| {
        b.iter(|| rt.block_on(cold.resolve(black_box(peer))).unwrap())
    });
    let api: LocalApi = fake.client();
    g.bench_function("localapi_whois_only", |b| {
        b.iter(|| rt.block_on(api.whois(black_box(peer))).unwrap())
    });
    g.finish();
    // Only in a real bench run: `--list` (nextest) must print benchmark names and nothing else.
    if std::env::args().any(|a| a == "--bench") {
        let m = cold.snapshot();
        println!(
            "fake: cold resolver made {} LocalAPI calls, {} connections opened by the bare client",
            m.localapi_calls,
            api.connections_opened()
        );
    }
}

/// A logged-out real tailscaled (userspace, in-memory state, no network); killed on drop.
struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tailscaled(bin: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ts.sock");
    let child = Command::new(bin)
        .arg("--tun=userspace-networking")
        .arg("--state=mem:")
        .arg(format!("--statedir={}", dir.path().join("state").display()))
        .arg(format!("--socket={}", socket.display()))
        .arg("--port=0")
        .arg("--no-logs-no-support") // MANDATORY: no logtail, no bootstrap DNS to the internet
        .env("TS_NO_LOGS_NO_SUPPORT", "true")
        .env("TS_LOGS_DIR", dir.path().join("logs"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon {
        child,
        _dir: dir,
        socket,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "tailscaled socket did not appear"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name:<58} n={:<3} p50={:>9.3?} p90={:>9.3?} max={:>9.3?}",
        v.len(),
        q(0.5),
        q(0.9),
        q(1.0)
    );
}

async fn timed<F: std::future::Future>(f: F) -> Duration {
    let t = Instant::now();
    f.await;
    t.elapsed()
}

fn against_real_tailscaled(bin: &str) {
    let rt = runtime();
    let d = start_tailscaled(bin);
    let api = LocalApi::unix(&d.socket);
    rt.block_on(async {
        let st = api.status().await.unwrap();
        println!(
            "\nreal tailscaled {} ({}), logged out: every WhoIs is a 404",
            st.version, st.backend_state
        );
        let n = 20;
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(timed(api.status()).await);
        }
        stats("status (peers=false)", v);
        for (label, addr) in [
            (
                "whois 100.64.0.1:1234 (tailnet ip:port, 404)",
                "100.64.0.1:1234",
            ),
            ("whois 100.64.0.1 (bare tailnet IP, 404)", "100.64.0.1"),
            (
                "whois 127.0.0.1:1234 (unmapped loopback, 404)",
                "127.0.0.1:1234",
            ),
        ] {
            let mut v = Vec::new();
            for _ in 0..n {
                v.push(
                    timed(api.whois_addr(addr, Some(toolgate::tailnet::localapi::WhoIsProto::Tcp)))
                        .await,
                );
            }
            stats(label, v);
        }
        // The resolver's loopback path: the 404, 20 ms, one retry, the 404.
        let r = WhoisResolver::new(api.clone(), settings());
        let mut v = Vec::new();
        for i in 0..5 {
            let peer: SocketAddr = format!("127.0.0.1:{}", 45000 + i).parse().unwrap();
            let t = Instant::now();
            assert!(r.resolve(peer).await.is_err());
            v.push(t.elapsed());
        }
        stats("resolver: unmapped loopback peer (404, retry, 404)", v);
        let mut v = Vec::new();
        for i in 0..5 {
            let peer: SocketAddr = format!("100.64.0.1:{}", 45000 + i).parse().unwrap();
            let t = Instant::now();
            assert!(r.resolve(peer).await.is_err());
            v.push(t.elapsed());
        }
        stats("resolver: unknown tailnet peer (404, no retry)", v);

        // Parallel unmapped loopback lookups vs. a concurrent status call.
        for k in [1usize, 2, 4, 8] {
            let started = Instant::now();
            let jobs: Vec<_> = (0..k)
                .map(|i| {
                    let api = api.clone();
                    tokio::spawn(async move {
                        let a = format!("127.0.0.1:{}", 46000 + i);
                        let t = Instant::now();
                        let _ = api
                            .whois_addr(&a, Some(toolgate::tailnet::localapi::WhoIsProto::Tcp))
                            .await;
                        t.elapsed()
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(5)).await;
            let status = timed(api.status()).await;
            let mut slowest = Duration::ZERO;
            for j in jobs {
                slowest = slowest.max(j.await.unwrap());
            }
            println!(
                "{k} parallel unmapped loopback WhoIs: all done after {:>9.3?} (slowest \
                 {:>9.3?}); a status sent meanwhile took {:>9.3?}",
                started.elapsed(),
                slowest,
                status
            );
        }
    });
    drop(d);
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    per_request(&mut c);
    against_fake(&mut c);
    c.final_summary();
    if std::env::args().any(|a| a == "--bench") {
        match std::env::var("TAILSCALED_BIN") {
            Ok(bin) if !bin.is_empty() => against_real_tailscaled(&bin),
            _ => println!("\nTAILSCALED_BIN not set: real tailscaled measurements skipped"),
        }
    }
}
