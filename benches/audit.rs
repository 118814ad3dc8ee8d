//! Audit store benchmarks: `cargo bench --bench audit` (or `scripts/bench-audit`).
//!
//! 1. Sustained decision rows through [`AuditLog`] (async mode, the shipped group-commit cap and
//!    queue, `audit.arguments: digest` computed by the producer, a typical explain trace handed
//!    over rendered as the gateway does; `normal` and `full`), timed with
//!    thread CPU (`/proc/.../schedstat`) as well as wall clock, since this machine is shared:
//!    the writer thread's CPU per row is the rate one uncontended core sustains.
//! 2. The wait an allowed call sees in `sync` mode (submit → commit resolved), p50/p99, at a
//!    paced 1,000 and 10,000 decisions/s (durability `full`, the default, and `normal`).
//! 3. Filtered query latency over 1,000,000 decisions (p50/p99 per query, then criterion).
//!
//! The 1M-row database is built once under the cargo target tmp dir and reused.
//! `TOOLGATE_BENCH_QUICK=1` shrinks every size for a smoke run; `TOOLGATE_BENCH_CACHE_KIB=N`
//! sets the writer's page cache (default: the shipped `WRITER_CACHE_KIB`);
//! `TOOLGATE_BENCH_BATCH_ROWS=N` another group-commit cap; `TOOLGATE_BENCH_INSERT=normal:1000`
//! (`normal:50`, `full:1000`) one insert run.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "bench code"
)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;

/// The daemon's allocator (src/main.rs), so the writer is measured as it runs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use toolgate::audit::query::{Filter, Reader, parse_time_bound};
use toolgate::audit::record::{RenderedExplain, format_time};
use toolgate::audit::{AuditError, AuditLog, Effect, Kind, Record, Settings};
use toolgate::config::{AuditMode, Durability};

fn quick() -> bool {
    std::env::var("TOOLGATE_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// A realistic decision: ~25 short fields, a small explain trace, digest-mode arguments.
fn decision(i: u64, principals: u64, time: Option<String>) -> Record {
    let effect = if i.is_multiple_of(5) {
        Effect::Deny
    } else {
        Effect::Allow
    };
    let mut r = Record::new(Kind::Mcp, effect);
    if let Some(t) = time {
        r.time = t;
    }
    let p = i % principals;
    r.principal = format!("user{p}@example.com");
    r.login = r.principal.clone();
    r.node = format!("host{p}.example.ts.net");
    r.node_id = format!("n{p:08}");
    if p.is_multiple_of(3) {
        r.tags = vec!["tag:ci".into()];
    }
    r.ip = format!("100.64.{}.{}", (p / 250) % 250, p % 250);
    r.server = ["github", "jira", "slack", "fs"][(i % 4) as usize].into();
    r.method = "tools/call".into();
    r.tool = format!("tool{}", (i / 3) % 50);
    r.action = format!("tools/call::{}", r.tool);
    r.policy = "resource.mcp_server.vdefault".into();
    r.rule = if effect == Effect::Allow {
        "allow_developers".into()
    } else {
        String::new()
    };
    r.reason = if effect == Effect::Allow {
        "rule allow_developers matched".into()
    } else {
        "no rule allowed it (default deny)".into()
    };
    r.outcome = if effect == Effect::Allow {
        "pending".into()
    } else {
        "denied".into()
    };
    r.policy_hash = "3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b".into();
    // The trace as the gateway hands it over: rendered (canonical, scrubbed, digested) once per
    // distinct trace and shared (`gateway::rendered_explain`), not a value scrubbed per row.
    r.explain_rendered = Some(rendered_trace(&r.action, effect == Effect::Allow));
    // Replay inputs (schema v4) as the gateway builds them; TOOLGATE_BENCH_NO_INPUTS=1 leaves
    // them out, to measure what they cost.
    if !std::env::var("TOOLGATE_BENCH_NO_INPUTS").is_ok_and(|v| v == "1") {
        r.inputs = Some(toolgate::audit::record::ReplayInputs {
            principal: format!(
                r#"{{"attr":{{"caps":[{{"roles":["developer"]}}],"display_name":"User {p}","groups":[],"hostname":"host{p}","ip":"{}","login":"{}","node":"{}","node_id":"{}","os":"linux","tags":{},"tailnet":"example.ts.net"}},"id":"{}","roles":["user","developer"]}}"#,
                r.ip,
                r.login,
                r.node,
                r.node_id,
                serde_json::to_string(&r.tags).unwrap_or_default(),
                r.principal
            ),
            resource: format!(
                r#"{{"attr":{{"arguments":null,"method":"tools/call","server":"{}","tool_name":"{}"}},"id":"{}","kind":"mcp_server"}}"#,
                r.server, r.tool, r.server
            ),
        });
    }
    r
}

/// [`typical_trace`] rendered once per (action, effect), as the gateway's cache does.
fn rendered_trace(action: &str, allow: bool) -> Arc<RenderedExplain> {
    thread_local! {
        static CACHE: RefCell<HashMap<(String, bool), Arc<RenderedExplain>>> = RefCell::default();
    }
    CACHE.with_borrow_mut(|c| {
        c.entry((action.to_string(), allow))
            .or_insert_with(|| {
                Arc::new(RenderedExplain::new(&typical_trace(action, allow)).unwrap())
            })
            .clone()
    })
}

/// A trace as the policy engine writes it (`policy::eval::Trace`): the policy consulted, one
/// derived role, and the resource-pass steps for this action (distinct per tool and effect, so
/// the store deduplicates it to a few hundred texts).
fn typical_trace(action: &str, allow: bool) -> serde_json::Value {
    serde_json::json!({
        "policies": ["resource.mcp_server.vdefault"],
        "derived_roles": [{"name": "owner", "scope": "", "active": false}],
        "steps": [
            {"action": action, "pass": "resource", "role": "developer",
             "policy": "resource.mcp_server.vdefault", "scope": "", "rule": "deny_prod_writes",
             "effect": "EFFECT_DENY", "outcome": if allow { "condition_false" } else { "matched" }},
            {"action": action, "pass": "resource", "role": "developer",
             "policy": "resource.mcp_server.vdefault", "scope": "", "rule": "allow_developers",
             "effect": "EFFECT_ALLOW", "outcome": if allow { "matched" } else { "not_reached" }},
        ],
    })
}

/// The call's arguments (hashed by the producer: `audit.arguments: digest`).
fn arguments(i: u64) -> serde_json::Value {
    serde_json::json!({"owner": "acme", "repo": format!("repo{}", i % 200), "title": format!("issue {i}"), "body": "steps to reproduce: ..."})
}

fn settings(path: &Path, mode: AuditMode, durability: Durability) -> Settings {
    let mut s = Settings::for_path(path);
    s.mode = mode;
    s.durability = durability;
    s.gateway = "bench".into();
    // The shipped group-commit cap and queue; `TOOLGATE_BENCH_BATCH_ROWS=N` measures another
    // cap (with a queue of two batches, as shipped).
    if let Ok(v) = std::env::var("TOOLGATE_BENCH_BATCH_ROWS") {
        let n = v
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| {
                panic!("TOOLGATE_BENCH_BATCH_ROWS={v:?}: expected a number of rows above 0")
            });
        s.batch_rows = n;
        s.queue = 2 * n;
    }
    // `TOOLGATE_BENCH_CACHE_KIB=8192` measures another writer page cache than the shipped one.
    if let Some(kib) = std::env::var("TOOLGATE_BENCH_CACHE_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        s.cache_kib = kib;
    }
    s
}

/// Submits after waiting (yielding) while the queue is full; counts the waits.
fn submit_retrying(log: &AuditLog, r: Record, full: &mut u64) -> toolgate::audit::Ticket {
    while log.queue_depth() + 1 >= log.queue_capacity() {
        *full += 1;
        // Sleep, not spin: on 2 cores a spinning producer steals the writer's CPU.
        std::thread::sleep(Duration::from_micros(200));
    }
    log.submit(r).unwrap()
}

/// Nanoseconds on CPU so far of the threads of this process named `name` (schedstat; Linux).
fn thread_cpu_named(name: &str) -> u64 {
    let mut ns = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            ns += schedstat(&t.path().join("schedstat"));
        }
    }
    ns
}

/// Nanoseconds on CPU so far of the calling thread.
fn own_cpu() -> u64 {
    schedstat(Path::new("/proc/thread-self/schedstat"))
}

fn schedstat(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

/// One round's figures, per decision row.
struct Round {
    wall_rows_s: f64,
    writer_us: f64,
    producer_us: f64,
    rows_per_txn: f64,
}

fn insert_round(durability: Durability, principals: u64, n: u64) -> Round {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db, AuditMode::Async, durability)).unwrap();
    // Warm-up: the lookups and explain traces of these principals and tools are cached.
    let mut full = 0;
    for i in 0..5_000 {
        let mut r = decision(i, principals, None);
        log.redactor().apply_arguments(&mut r, &arguments(i));
        submit_retrying(&log, r, &mut full);
    }
    log.flush_blocking().unwrap();
    let m0 = log.metrics();
    // The producer builds each record as the gateway hands it over (owned strings), then pays
    // what a request thread pays: the argument digest, scrubbing, the row's content digest and
    // packing. Record building is outside the timed CPU.
    let records: Vec<(Record, serde_json::Value)> = (0..n)
        .map(|i| (decision(i, principals, None), arguments(i)))
        .collect();
    let t0 = Instant::now();
    let w0 = thread_cpu_named("audit-writer");
    let p0 = own_cpu();
    let mut full = 0;
    for (mut r, args) in records {
        log.redactor().apply_arguments(&mut r, &args);
        submit_retrying(&log, r, &mut full);
    }
    let p1 = own_cpu();
    log.flush_blocking().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let w1 = thread_cpu_named("audit-writer");
    let m = log.metrics();
    Round {
        wall_rows_s: n as f64 / secs,
        writer_us: (w1 - w0) as f64 / 1e3 / n as f64,
        producer_us: (p1 - p0) as f64 / 1e3 / n as f64,
        rows_per_txn: (m.committed_rows - m0.committed_rows) as f64
            / (m.commits - m0.commits).max(1) as f64,
    }
}

/// "median (min..max)" of `v`.
fn spread(v: &mut [f64], digits: usize) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.d$} ({:.d$}..{:.d$})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1],
        d = digits
    )
}

fn insert_rate(durability: Durability, principals: u64) {
    let n: u64 = if quick() { 20_000 } else { 200_000 };
    let rounds: Vec<Round> = (0..3)
        .map(|_| insert_round(durability, principals, n))
        .collect();
    let mut ceiling: Vec<f64> = rounds.iter().map(|r| 1e6 / r.writer_us).collect();
    let mut writer: Vec<f64> = rounds.iter().map(|r| r.writer_us).collect();
    let mut producer: Vec<f64> = rounds.iter().map(|r| r.producer_us).collect();
    let mut wall: Vec<f64> = rounds.iter().map(|r| r.wall_rows_s).collect();
    let mut txn: Vec<f64> = rounds.iter().map(|r| r.rows_per_txn).collect();
    let batch = settings(Path::new("audit.db"), AuditMode::Async, durability).batch_rows;
    println!(
        "audit decision rows ({durability:?}, async, batch ≤{batch}, arguments digest, {principals} principals, {n} rows × 3 rounds, median (min..max)): \
writer thread CPU {} µs/row = {} rows/s on one core; producer (request thread) CPU {} µs/row; wall clock {} rows/s; {} rows/txn",
        spread(&mut writer, 2),
        spread(&mut ceiling, 0),
        spread(&mut producer, 2),
        spread(&mut wall, 0),
        spread(&mut txn, 0),
    );
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn commit_wait(rate: u64, durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let mut s = settings(&db, AuditMode::Sync, durability);
    s.batch_rows = 256;
    let log = AuditLog::open(s).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let secs = if quick() { 1 } else { 4 };
    let total = rate * secs;
    let lat = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Duration>>();
        let start = tokio::time::Instant::now();
        // Pace in 1 ms ticks: rate/1000 decisions per tick.
        let per_tick = (rate / 1000).max(1);
        let mut tick = tokio::time::interval(Duration::from_millis(1000 * per_tick / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = 0u64;
        while sent < total {
            tick.tick().await;
            for _ in 0..per_tick {
                let log = log.clone();
                let tx = tx.clone();
                let r = decision(sent, 1000, None);
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    // A refusal (full queue, failed commit) is what the gateway answers 503 to.
                    let ok = match log.submit(r) {
                        Ok(t) => t.wait().await.is_ok(),
                        Err(_) => false,
                    };
                    let _ = tx.send(ok.then(|| t0.elapsed()));
                });
                sent += 1;
            }
        }
        drop(tx);
        let mut v = Vec::with_capacity(total as usize);
        let mut refused = 0u64;
        while let Some(d) = rx.recv().await {
            match d {
                Some(d) => v.push(d),
                None => refused += 1,
            }
        }
        let took = start.elapsed();
        (v, took, refused)
    });
    let (mut v, took, refused) = lat;
    v.sort();
    let m = log.metrics();
    println!(
        "audit sync commit wait at {rate}/s ({durability:?}): n={} refused(503)={refused} achieved {:.0}/s p50 {:.3} ms p90 {:.3} ms p99 {:.3} ms max {:.3} ms ({:.1} rows/txn)",
        v.len(),
        v.len() as f64 / took.as_secs_f64(),
        pct(&v, 0.50).as_secs_f64() * 1e3,
        pct(&v, 0.90).as_secs_f64() * 1e3,
        pct(&v, 0.99).as_secs_f64() * 1e3,
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        m.committed_rows as f64 / m.commits.max(1) as f64,
    );
}

const BIG: u64 = 1_000_000;

fn big_db_path() -> PathBuf {
    let n = if quick() { 50_000 } else { BIG };
    // Named by schema version: a store built by an older layout is not measured as this one.
    let v = toolgate::audit::migrate::SQLITE.len();
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("audit-bench-v{v}-{n}.db"))
}

fn big_db() -> PathBuf {
    let n = if quick() { 50_000 } else { BIG };
    let path = big_db_path();
    if let Ok(r) = Reader::open(&path) {
        let have: i64 = r
            .connection()
            .query_row("SELECT count(*) FROM decisions", [], |x| x.get(0))
            .unwrap_or(0);
        if have as u64 == n {
            store_size(&path, n);
            return path;
        }
    }
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    let t0 = Instant::now();
    let log = AuditLog::open(settings(&path, AuditMode::Async, Durability::Normal)).unwrap();
    // 30 days of decisions, oldest first; 2,000 principals, 50 tools; most allows get an outcome.
    let span_us = 30 * 86_400 * 1_000_000i64;
    let start = chrono::Utc::now() - chrono::Duration::microseconds(span_us);
    let mut full = 0;
    for i in 0..n {
        let t = start + chrono::Duration::microseconds(span_us * i as i64 / n as i64);
        let mut r = decision(i, 2000, Some(format_time(t)));
        log.redactor().apply_arguments(&mut r, &arguments(i));
        let id = r.id.clone();
        if i == n / 2 {
            std::fs::write(path.with_extension("id"), &id).unwrap();
        }
        let allow = r.effect == Effect::Allow;
        submit_retrying(&log, r, &mut full);
        if allow && i % 10 != 1 {
            let o = if i % 97 == 0 {
                "upstream_error:timeout"
            } else {
                "forwarded"
            };
            while log.queue_depth() + 1 >= log.queue_capacity() {
                std::thread::sleep(Duration::from_micros(200));
            }
            // The outcome follows its decision by the call's latency, as in the gateway.
            let latency = 1000 + i % 5000;
            let at = format_time(t + chrono::Duration::microseconds(latency as i64));
            // Outcome rows have their own bounded buffer (not counted in `queue_depth`):
            // a full one is `QueueFull` at once, so wait for the writer's next drain.
            while let Err(e) = log.record_outcome_at(&id, o, Some(latency), at.clone()) {
                assert!(matches!(e, AuditError::QueueFull), "outcome row: {e}");
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    log.flush_blocking().unwrap();
    drop(log);
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "built {} with {n} decisions (+ outcomes) in {:.1} s, {:.0} MiB",
        path.display(),
        t0.elapsed().as_secs_f64(),
        size as f64 / 1048576.0
    );
    store_size(&path, n);
    path
}

/// Bytes on disk per decision (the file after the writer's last checkpoint, outcomes and
/// lookups included), and what the rows are.
fn store_size(path: &Path, n: u64) {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let r = Reader::open(path).unwrap();
    let c = r.connection();
    let count = |sql: &str| -> i64 { c.query_row(sql, [], |x| x.get(0)).unwrap() };
    println!(
        "audit store size: {:.1} MiB for {n} decisions = {:.0} bytes per decision ({} outcome rows, {} names, {} distinct explain traces, {} free pages)",
        size as f64 / 1048576.0,
        size as f64 / n as f64,
        count("SELECT count(*) FROM outcomes"),
        count("SELECT count(*) FROM names"),
        count("SELECT count(*) FROM explains"),
        count("PRAGMA freelist_count"),
    );
}

fn queries() -> Vec<(&'static str, Filter)> {
    let now = chrono::Utc::now();
    let since = |s: &str| Some(parse_time_bound(s, now).unwrap());
    vec![
        (
            "principal, newest 100",
            Filter {
                principal: Some("user42@example.com".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "principal + since 7d (all rows)",
            Filter {
                principal: Some("user42@example.com".into()),
                since: since("7d"),
                ..Filter::default()
            },
        ),
        (
            "tool + deny + since 24h, newest 100",
            Filter {
                tool: Some("tool8".into()),
                effect: Some("deny".into()),
                since: since("24h"),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "since 1h, newest 100",
            Filter {
                since: since("1h"),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "tag:ci, newest 100",
            Filter {
                tag: Some("tag:ci".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "outcome upstream_error + since 24h (all rows)",
            Filter {
                outcome: Some("upstream_error".into()),
                since: since("24h"),
                ..Filter::default()
            },
        ),
        (
            "outcome forwarded (common), newest 100",
            Filter {
                outcome: Some("forwarded".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "outcome upstream_error, newest 100",
            Filter {
                outcome: Some("upstream_error".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "node, newest 100",
            Filter {
                node: Some("host7.example.ts.net".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "server, newest 100",
            Filter {
                server: Some("jira".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "effect deny, newest 100",
            Filter {
                effect: Some("deny".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "kind mcp, newest 100",
            Filter {
                kind: Some("mcp".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "kind check (no such rows), newest 100",
            Filter {
                kind: Some("check".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "gateway, newest 100",
            Filter {
                gateway: Some("bench".into()),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "until 7d ago, newest 100",
            Filter {
                until: since("7d"),
                limit: Some(100),
                ..Filter::default()
            },
        ),
        (
            "one id",
            Filter {
                id: std::fs::read_to_string(big_db_path().with_extension("id")).ok(),
                ..Filter::default()
            },
        ),
        (
            "node + tool, newest 50",
            Filter {
                node: Some("host7.example.ts.net".into()),
                tool: Some("tool19".into()),
                limit: Some(50),
                ..Filter::default()
            },
        ),
    ]
}

fn query_latency(path: &Path, c: &mut Criterion) {
    let reader = Reader::open(path).unwrap();
    let runs = if quick() { 30 } else { 200 };
    for (name, f) in queries() {
        let mut v = Vec::with_capacity(runs);
        let mut rows = 0;
        for _ in 0..runs {
            let t0 = Instant::now();
            rows = reader.query(&f).unwrap().len();
            v.push(t0.elapsed());
        }
        v.sort();
        println!(
            "audit query over 1M ({name}): {rows} rows, p50 {:.3} ms p99 {:.3} ms",
            pct(&v, 0.5).as_secs_f64() * 1e3,
            pct(&v, 0.99).as_secs_f64() * 1e3
        );
    }
    let t0 = Instant::now();
    let st = reader
        .stats(
            &Filter {
                since: Some(parse_time_bound("24h", chrono::Utc::now()).unwrap()),
                ..Filter::default()
            },
            10,
        )
        .unwrap();
    println!(
        "audit stats over the last 24h ({} decisions): {:.1} ms",
        st.decisions,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let mut g = c.benchmark_group("audit_query_1m");
    g.sample_size(if quick() { 10 } else { 50 });
    for (name, f) in queries().into_iter().take(3) {
        g.bench_function(name, |b| b.iter(|| reader.query(&f).unwrap().len()));
    }
    g.finish();
}

/// Where a decision row's cost goes, each component alone on this thread, timed with thread
/// CPU, medians of 3 rounds: the request thread's share (building the logical row, its content
/// digest, packing), the writer's chain MAC, and SQLite inserts of a pre-resolved v3 row
/// (integer lookups, 1,024 rows per transaction, the writer's pragmas) into the v3 table alone,
/// with each index alone, and with every index.
fn insert_floor() {
    use toolgate::audit::chain::{content_digest, link};
    use toolgate::audit::compact::CompactRow;
    use toolgate::audit::key::ChainKey;
    use toolgate::audit::migrate::SQLITE;
    use toolgate::audit::record::StoredRow;
    use toolgate::audit::store::to_logical;

    let n: u64 = if quick() { 20_480 } else { 204_800 };
    let log_dir = tempfile::tempdir().unwrap();
    let redactor = AuditLog::open(settings(
        &log_dir.path().join("r.db"),
        AuditMode::Async,
        Durability::Normal,
    ))
    .unwrap()
    .redactor()
    .clone();
    let timed = |f: &mut dyn FnMut()| -> f64 {
        let c0 = own_cpu();
        f();
        (own_cpu() - c0) as f64 / 1e3 / n as f64
    };
    let report = |name: &str, mut v: Vec<f64>| {
        println!(
            "audit floor ({name}): {} µs/row, median (min..max) of 3",
            spread(&mut v, 2)
        );
    };
    // 1. The request thread: argument digest, scrub, logical row, content digest, packing.
    let mut build = Vec::new();
    let mut digests = Vec::new();
    for _ in 0..3 {
        let mut recs: Vec<(Record, serde_json::Value)> = (0..n)
            .map(|i| (decision(i, 1000, None), arguments(i)))
            .collect();
        let mut out = Vec::with_capacity(n as usize);
        build.push(timed(&mut || {
            for (mut r, a) in recs.drain(..) {
                redactor.apply_arguments(&mut r, &a);
                redactor.scrub_record(&mut r);
                let mut row = StoredRow::from_record(r, "bench");
                to_logical(&mut row);
                let d = content_digest(&row.content());
                out.push((CompactRow::new(&row).unwrap(), d));
            }
        }));
        digests = out.into_iter().map(|(_, d)| d).collect::<Vec<_>>();
    }
    report(
        "request thread: argument digest + scrub + logical row + content digest + pack",
        build,
    );
    // 2. The writer's chain MAC.
    let key = ChainKey::from_bytes(&[7u8; 32]);
    let mut macs = Vec::new();
    let mut hashes: Vec<[u8; 32]> = Vec::new();
    for _ in 0..3 {
        let mut prev = [0u8; 32];
        let mut v = Vec::with_capacity(n as usize);
        macs.push(timed(&mut || {
            for (i, d) in digests.iter().enumerate() {
                prev = link(&key, &prev, i as i64 + 1, d);
                v.push(prev);
            }
        }));
        hashes = v;
    }
    report("writer: HMAC chain link", macs);
    // 3. SQLite inserts of resolved rows.
    let ddl = SQLITE
        .iter()
        .find(|(name, _)| *name == "0003_v3")
        .map(|(_, sql)| sql.to_string())
        .unwrap();
    let mut table_only = String::new();
    let mut indexes = Vec::new();
    for stmt in ddl.split_inclusive(';') {
        if stmt.contains("CREATE INDEX") || stmt.contains("CREATE UNIQUE INDEX") {
            if stmt.contains("ON decisions") {
                indexes.push(stmt.trim().to_string());
            }
        } else {
            table_only.push_str(stmt);
        }
    }
    let mut variants: Vec<(String, String)> = vec![("table only".into(), table_only.clone())];
    for ix in &indexes {
        let name = ix
            .split_whitespace()
            .skip_while(|w| *w != "INDEX")
            .nth(1)
            .unwrap_or("?");
        variants.push((format!("table + {name}"), format!("{table_only}\n{ix}")));
    }
    variants.push(("table + every index (shipped)".into(), ddl.clone()));
    let ids: Vec<[u8; 16]> = (0..n).map(|_| *uuid::Uuid::now_v7().as_bytes()).collect();
    let t0 = chrono::Utc::now().timestamp_micros();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _round in 0..3 {
        for (v, (_, schema)) in variants.iter().enumerate() {
            times[v].push(floor_run(schema, &ids, &hashes, t0));
        }
    }
    for ((name, _), t) in variants.iter().zip(times) {
        report(&format!("SQLite insert, resolved row: {name}"), t);
    }
}

/// One pass of [`insert_floor`]'s inserts: thread CPU µs per row, checkpoints excluded.
fn floor_run(schema: &str, ids: &[[u8; 16]], hashes: &[[u8; 32]], t0: i64) -> f64 {
    use rusqlite::params;
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("floor.db")).unwrap();
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -8192; PRAGMA wal_autocheckpoint = 0;").unwrap();
    conn.execute_batch(schema).unwrap();
    let insert = "INSERT INTO decisions (seq, id, time, gateway, kind, principal, login, node, node_id, tags, ip, server, method, tool, action, effect, policy, rule, reason, args_digest, outcome, latency_us, policy_hash, explain, arguments, hash) VALUES (?1, ?2, ?3, 8, 7, ?4, ?4, ?5, ?6, 6, ?7, ?8, 9, ?9, ?10, ?11, 10, ?12, ?13, ?14, ?15, NULL, 11, ?16, NULL, ?17)";
    let mut cpu = 0u64;
    for (b, chunk) in ids.chunks(1024).enumerate() {
        let c0 = own_cpu();
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut st = tx.prepare_cached(insert).unwrap();
            for (j, id) in chunk.iter().enumerate() {
                let i = (b * 1024 + j) as i64;
                let p = 100 + i % 1000;
                let tool = 2000 + (i / 3) % 50;
                let allow = i % 5 != 0;
                st.execute(params![
                    i + 1,
                    &id[..],
                    t0 + i * 1000,
                    p,
                    p + 1000,
                    p + 3000,
                    p + 4000,
                    3000 + i % 4,
                    tool,
                    tool + 50,
                    i64::from(allow),
                    if allow { 12 } else { 1 },
                    if allow { 13 } else { 14 },
                    &hashes[i as usize][..],
                    if allow { 2 } else { 4 },
                    4000 + (i / 3) % 100,
                    &hashes[i as usize][..],
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
        cpu += own_cpu() - c0;
        // The daemon's checkpoint thread does this off the writer: not the writer's cost.
        if b % 16 == 15 {
            conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)")
                .unwrap();
        }
    }
    cpu as f64 / 1e3 / ids.len() as f64
}

/// `TOOLGATE_BENCH_ONLY=insert|floor|wait|query` runs one part.
fn part(name: &str) -> bool {
    std::env::var("TOOLGATE_BENCH_ONLY").map_or(true, |v| v == name)
}

fn main() {
    // `cargo test`/nextest run bench binaries without `--bench` (and list them with `--list`):
    // these benchmarks build large databases, so they run only as real benchmarks.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    // 50 principals: a gateway's agents; 1000: every row in a batch lands on a different page of
    // the principal index (the worst case for write volume).
    // `TOOLGATE_BENCH_INSERT=normal:1000` runs one of them.
    if part("insert") {
        let only = std::env::var("TOOLGATE_BENCH_INSERT").unwrap_or_default();
        let runs = [
            (Durability::Normal, "normal:50", 50),
            (Durability::Normal, "normal:1000", 1000),
            (Durability::Full, "full:1000", 1000),
        ];
        assert!(
            only.is_empty() || runs.iter().any(|r| r.1 == only),
            "TOOLGATE_BENCH_INSERT={only:?}: expected one of normal:50, normal:1000, full:1000"
        );
        for (d, name, principals) in runs {
            if only.is_empty() || only == name {
                insert_rate(d, principals);
            }
        }
    }
    if part("floor") {
        insert_floor();
    }
    if part("wait") {
        for rate in [1_000, 10_000] {
            commit_wait(rate, Durability::Full);
            commit_wait(rate, Durability::Normal);
        }
    }
    if part("query") {
        let db = big_db();
        query_latency(&db, &mut c);
    }
    c.final_summary();
}
