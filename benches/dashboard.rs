//! Dashboard paint speed (issue 16 part 5): `scripts/bench-dashboard` (or `cargo bench --bench
//! dashboard`). With 1,000,000 decisions in the audit store (100 principals: each owns 1%), the
//! daemon serves the page and a real headless Chromium (tests/browser/paint.cjs, the peers of
//! `scripts/peers-browser`) loads it; the figure is the time from navigation start to the
//! page's `toolgate:live-painted` mark (the frame that first painted the Live rows, which the
//! daemon renders into the page's HTML; the page reads that frame's time from Element Timing),
//! median over runs, for an admin and for a user owning 1% of the rows. Target: ≤ 200 ms.
//! Also: the page's HTML alone (request → last byte, rows included), the stream's backfill
//! alone (request → `backfilled` event; the page no longer waits for it) and, for the user,
//! what the backfill cost before it went to the (principal, time) index.
//!
//! The store is built once through the audit writer under the cargo target tmp dir and reused.
//! `TOOLGATE_BENCH_QUICK=1`: 20,000 rows and 5 runs (a smoke run). `TOOLGATE_BENCH_RUNS=N`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "bench code"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use toolgate::audit::query::{Filter, PAGE_SCAN_BUDGET, Reader};
use toolgate::audit::record::format_time;
use toolgate::audit::{AuditError, AuditLog, Effect, Kind, Record, Settings};
use toolgate::config::{AuditMode, Config, Durability};
use toolgate::{daemon, demo, sample};

/// The daemon's allocator (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PRINCIPALS: u64 = 100;
/// The user who owns 1% of the rows.
const USER: &str = "user7@example.com";

fn quick() -> bool {
    std::env::var("TOOLGATE_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn rows() -> u64 {
    if quick() { 20_000 } else { 1_000_000 }
}

/// A decision as the gateway writes one (the shape of benches/audit.rs's rows).
fn decision(i: u64, time: String) -> Record {
    let effect = if i.is_multiple_of(5) {
        Effect::Deny
    } else {
        Effect::Allow
    };
    let mut r = Record::new(Kind::Mcp, effect);
    r.time = time;
    let p = i % PRINCIPALS;
    r.principal = format!("user{p}@example.com");
    r.login = r.principal.clone();
    r.node = format!("host{p}.example.ts.net");
    r.node_id = format!("n{p:08}");
    r.ip = format!("100.64.0.{p}");
    r.server = ["github", "jira", "slack", "fs"][(i % 4) as usize].into();
    r.method = "tools/call".into();
    r.tool = format!("tool{}", (i / 3) % 50);
    r.action = format!("tools/call::{}", r.tool);
    r.policy = "resource.mcp_server.vdefault".into();
    let allow = effect == Effect::Allow;
    r.rule = if allow {
        "allow_developers".into()
    } else {
        String::new()
    };
    r.reason = if allow {
        "rule allow_developers matched".into()
    } else {
        "no rule allowed it (default deny)".into()
    };
    r.outcome = if allow { "pending" } else { "denied" }.into();
    r.policy_hash = "3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b".into();
    r.explain = json!({
        "policies": ["resource.mcp_server.vdefault"],
        "steps": [{"action": r.action, "pass": "resource", "role": "developer",
                   "policy": "resource.mcp_server.vdefault", "rule": "allow_developers",
                   "effect": "EFFECT_ALLOW", "outcome": if allow { "matched" } else { "not_reached" }}],
    });
    r
}

/// The 1M-row store: 30 days of decisions ending a minute ago, oldest first, through the
/// audit writer (async, durability normal), most allows with an outcome.
fn store(dir: &Path) -> PathBuf {
    let n = rows();
    // A folder per size: the chain key (audit.key) sits next to the database.
    let path = dir.join(format!("dashboard-bench-{n}")).join("audit.db");
    if let Ok(r) = Reader::open(&path) {
        let have: i64 = r
            .connection()
            .query_row("SELECT count(*) FROM decisions", [], |x| x.get(0))
            .unwrap_or(0);
        // Each page view adds its own stream's audit row: a store with more rows is reused.
        if have as u64 >= n && have as u64 <= n + 10_000 {
            return path;
        }
    }
    if let Some(d) = path.parent() {
        let _ = std::fs::remove_dir_all(d);
    }
    let t0 = Instant::now();
    let mut s = Settings::for_path(&path);
    s.mode = AuditMode::Async;
    s.durability = Durability::Normal;
    s.batch_rows = 1024;
    s.queue = 8192;
    let log = AuditLog::open(s).unwrap();
    let span_us = 30 * 86_400 * 1_000_000i64;
    let start = chrono::Utc::now() - chrono::Duration::microseconds(span_us + 60_000_000);
    for i in 0..n {
        let t = start + chrono::Duration::microseconds(span_us * i as i64 / n as i64);
        let r = decision(i, format_time(t));
        let id = r.id.clone();
        let allow = r.effect == Effect::Allow;
        while log.queue_depth() + 2 >= log.queue_capacity() {
            std::thread::sleep(Duration::from_micros(200));
        }
        log.submit(r).unwrap();
        if allow && i % 10 != 1 {
            let latency = 1000 + i % 5000;
            let at = format_time(t + chrono::Duration::microseconds(latency as i64));
            // Outcome rows have their own bounded buffer (not counted in `queue_depth`):
            // a full one is `QueueFull` at once, so wait for the writer's next drain.
            while let Err(e) = log.record_outcome_at(&id, "forwarded", Some(latency), at.clone()) {
                assert!(matches!(e, AuditError::QueueFull), "outcome row: {e}");
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    log.flush_blocking().unwrap();
    drop(log);
    println!(
        "built {} with {n} decisions in {:.1} s",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    path
}

fn viewer(login: &str, role: &str) -> String {
    format!(
        "\"127.0.0.1\":\n  login: {login}\n  node: viewer.example.ts.net\n  caps: [{{roles: [{role}]}}]\n"
    )
}

struct Running {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), String>>,
}

/// The demo's daemon, its audit store the big one, 127.0.0.1 mapped to `identity`.
async fn start(db: &Path, identity: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let up = sample::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(sample::Counters::default()),
    )
    .await
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg_path = demo::write_files(dir.path(), port, up).unwrap();
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("sqlite: audit.db", &format!("sqlite: {}", db.display()));
    std::fs::write(&cfg_path, cfg).unwrap();
    std::fs::write(dir.path().join("identities.yaml"), identity).unwrap();
    let cfg = Config::load(&cfg_path).unwrap();
    let listen = daemon::resolve_listen(&cfg, &[]).unwrap();
    let identify = daemon::static_provider(&cfg, &listen).unwrap();
    let built = daemon::build(cfg, identify, &daemon::NodeInfo::default(), listen, None).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(daemon::run(built, rx));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "the daemon never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Running {
        _dir: dir,
        addr,
        stop,
        server,
    }
}

/// The page's HTML alone (its rows rendered in): the request until its last byte, in ms, and
/// how many rows it holds.
async fn html_ms(addr: SocketAddr) -> (f64, usize) {
    let client = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 1]))
        .build()
        .unwrap();
    let t = Instant::now();
    let resp = client.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    (
        t.elapsed().as_secs_f64() * 1e3,
        text.matches("<tr data-id=").count(),
    )
}

/// The stream's backfill alone: the request until its `backfilled` event, in ms.
async fn backfill_ms(addr: SocketAddr) -> (f64, u64) {
    let client = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 1]))
        .build()
        .unwrap();
    let t = Instant::now();
    let mut resp = client
        .get(format!("http://{addr}/api/audit/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(at) = text.find("event: backfilled\ndata: ") {
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let rest = &text[at + 24..];
            let line = rest.lines().next().unwrap_or("");
            let n =
                serde_json::from_str::<Value>(line).map_or(0, |v| v["rows"].as_u64().unwrap_or(0));
            return (ms, n);
        }
    }
    panic!("the stream ended before its backfill");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn browser_peers() -> (String, String) {
    let chromium =
        std::env::var("TOOLGATE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let modules = std::env::var("TOOLGATE_PLAYWRIGHT_MODULES").unwrap_or_else(|_| {
        format!(
            "{}/.cache/toolgate-peers/playwright-core-1.65.1/node_modules",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    assert!(
        Path::new(&chromium).exists() && Path::new(&modules).join("playwright-core").exists(),
        "chromium or playwright-core is missing: run scripts/peers-browser"
    );
    (chromium, modules)
}

/// The old backfill for a user (before the (principal, time) narrowing): the newest rows of
/// everyone, newest first, each checked, until 100 are the user's or 10,000 were read.
fn unnarrowed_ms(db: &Path) -> (f64, usize, usize) {
    let reader = Reader::open(db).unwrap();
    let t = Instant::now();
    let mut shown = 0;
    let end = reader
        .page(
            &Filter::default(),
            100,
            PAGE_SCAN_BUDGET,
            &mut |r| r.principal == USER,
            &mut |_| {
                shown += 1;
                true
            },
        )
        .unwrap();
    (
        t.elapsed().as_secs_f64() * 1e3,
        shown,
        end.rows + end.withheld,
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let (chromium, modules) = browser_peers();
    let runs: usize = std::env::var("TOOLGATE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick() { 5 } else { 15 });
    let db = store(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/paint.cjs");
    println!(
        "dashboard paint: {} decisions, {PRINCIPALS} principals (1% each), chromium headless, {runs} page loads per viewer (first one a warm-up, not counted)",
        rows()
    );
    for (name, identity) in [
        ("admin", viewer("admin@example.com", "admin")),
        ("user (1% of rows)", viewer(USER, "developer")),
    ] {
        rt.block_on(async {
            let d = start(&db, &identity).await;
            let mut stream = Vec::new();
            let mut streamed = 0;
            let mut html = Vec::new();
            let mut rendered = 0;
            for _ in 0..runs {
                let (ms, n) = backfill_ms(d.addr).await;
                stream.push(ms);
                streamed = n;
                let (ms, n) = html_ms(d.addr).await;
                html.push(ms);
                rendered = n;
            }
            let spec = json!({"playwright": modules, "chromium": chromium,
                              "url": format!("http://{}/", d.addr), "runs": runs + 1});
            let out = tokio::process::Command::new("node")
                .arg(&script)
                .arg(spec.to_string())
                .kill_on_drop(true)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "paint.cjs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            let loads = report["runs"].as_array().unwrap();
            let pick = |k: &str| -> Vec<f64> {
                loads[1..].iter().map(|r| r[k].as_f64().unwrap_or(f64::NAN)).collect()
            };
            let mut painted = pick("painted_ms");
            let mut dcl = pick("dom_content_loaded_ms");
            let shown = loads[1]["rows"].as_u64().unwrap_or(0);
            let mut steps = String::new();
            for k in ["response_start_ms", "response_end_ms", "css_start_ms", "css_end_ms", "js_end_ms", "first_contentful_paint_ms", "first_row_paint_ms", "last_row_paint_ms", "stream_created_ms", "stream_open_ms"] {
                steps.push_str(&format!(" {} {:.1};", k.trim_end_matches("_ms"), median(&mut pick(k))));
            }
            let (lo, hi) = (
                painted.iter().cloned().fold(f64::MAX, f64::min),
                painted.iter().cloned().fold(0.0, f64::max),
            );
            println!(
                "  {name}: Live view painted {:.1} ms after navigation start (median; min {lo:.1}, max {hi:.1}; DOMContentLoaded {:.1};{steps}); {shown} rows shown; the page's HTML alone {:.1} ms ({rendered} rows in it); the stream's backfill alone {:.1} ms (median, {streamed} rows) -> target 200 ms {}",
                median(&mut painted),
                median(&mut dcl),
                median(&mut html),
                median(&mut stream),
                if median(&mut painted) <= 200.0 { "met" } else { "MISSED" }
            );
            d.stop.send(true).unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(30), d.server).await;
        });
    }
    let mut old = Vec::new();
    let mut seen = (0, 0);
    for _ in 0..runs {
        let (ms, shown, examined) = unnarrowed_ms(&db);
        old.push(ms);
        seen = (shown, examined);
    }
    println!(
        "  before the narrowing, the user's backfill read everyone's newest rows: {:.1} ms (median) to find {} of the user's rows among {} read",
        median(&mut old),
        seen.0,
        seen.1
    );
}
