//! Audit store benchmarks: `cargo bench --bench audit`.
//!
//! 1. Sustained insert rate through [`AuditLog`] (async mode, batched, `normal` and `full`).
//! 2. The wait an allowed call sees in `sync` mode (submit → commit resolved), p50/p99, at a
//!    paced 1,000 and 10,000 decisions/s (durability `full`, the default, and `normal`).
//! 3. Filtered query latency over 1,000,000 decisions (p50/p99 per query, then criterion).
//!
//! The 1M-row database is built once under the cargo target tmp dir and reused.
//! `TOOLGATE_BENCH_QUICK=1` shrinks every size for a smoke run.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "bench code"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::Criterion;

/// The daemon's allocator (src/main.rs), so the writer is measured as it runs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use toolgate::audit::query::{Filter, Reader, parse_time_bound};
use toolgate::audit::record::format_time;
use toolgate::audit::{AuditLog, Effect, Kind, Record, Settings};
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
    r.args_digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into();
    r.outcome = if effect == Effect::Allow {
        "pending".into()
    } else {
        "denied".into()
    };
    r.policy_hash = "3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b".into();
    r.explain = serde_json::json!({"policies": ["resource.mcp_server.vdefault"], "steps": [{"rule": "allow_developers", "outcome": "matched"}]});
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

fn settings(path: &Path, mode: AuditMode, durability: Durability) -> Settings {
    let mut s = Settings::for_path(path);
    s.mode = mode;
    s.durability = durability;
    s.gateway = "bench".into();
    s.batch_rows = 1024;
    s.queue = 8192;
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

/// CPU seconds used so far by this process's threads named `name` (from /proc; Linux).
fn thread_cpu(name: &str) -> f64 {
    let mut ticks = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After "pid (comm)": state is field 3, utime 14, stime 15.
            ticks += f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            ticks += f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks as f64 / 100.0
}

fn insert_rate(durability: Durability, principals: u64) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db, AuditMode::Async, durability)).unwrap();
    let n: u64 = if quick() { 20_000 } else { 300_000 };
    // Warm-up.
    let mut full = 0;
    for i in 0..5_000 {
        submit_retrying(&log, decision(i, principals, None), &mut full);
    }
    log.flush_blocking().unwrap();
    let records: Vec<Record> = (0..n).map(|i| decision(i, principals, None)).collect();
    let t0 = Instant::now();
    let cpu0 = thread_cpu("audit-writer");
    let mut full = 0;
    for r in records {
        submit_retrying(&log, r, &mut full);
    }
    log.flush_blocking().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu("audit-writer") - cpu0;
    let m = log.metrics();
    println!(
        "  writer thread CPU: {:.2} µs/row, i.e. a ceiling of {:.0} rows/s for one uncontended core",
        cpu * 1e6 / n as f64,
        n as f64 / cpu.max(1e-9)
    );
    println!(
        "audit insert rate ({durability:?}, async, batch ≤1024, {principals} principals): {n} rows in {secs:.2} s = {:.0} rows/s ({} transactions, {:.0} rows/txn, writer in transactions {:.2} µs/row, producer waited on a full queue {full} times)",
        n as f64 / secs,
        m.commits,
        m.committed_rows as f64 / m.commits.max(1) as f64,
        m.commit_time_us as f64 / m.committed_rows.max(1) as f64,
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

fn big_db() -> PathBuf {
    let n = if quick() { 50_000 } else { BIG };
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("audit-bench-v5-{n}.db"));
    if let Ok(r) = Reader::open(&path) {
        let have: i64 = r
            .connection()
            .query_row("SELECT count(*) FROM decisions", [], |x| x.get(0))
            .unwrap_or(0);
        if have as u64 == n {
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
        let r = decision(i, 2000, Some(format_time(t)));
        let id = r.id.clone();
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
            log.record_outcome_at(&id, o, Some(latency), at).unwrap();
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
    path
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

/// `TOOLGATE_BENCH_ONLY=insert|wait|query` runs one part.
/// Where the writer's time per row goes: the bench's decision rows inserted straight into
/// SQLite on this thread (no queue, no channel), 1,024 rows per transaction, with the writer's
/// pragmas, under variants of the shipped schema. Each variant removes one cost, so the
/// differences are what that cost is; "table only" is the floor any schema with this row pays.
fn insert_floor() {
    use toolgate::audit::migrate::SQLITE;
    use toolgate::audit::record::{COLUMNS, StoredRow};

    let n: u64 = if quick() { 20_480 } else { 204_800 };
    let shipped: String = SQLITE
        .iter()
        .map(|(_, sql)| *sql)
        .collect::<Vec<_>>()
        .join("\n");
    let no_secondary = {
        let mut s = String::new();
        for stmt in shipped.split_inclusive(';') {
            if !stmt.contains("CREATE INDEX") {
                s.push_str(stmt);
            }
        }
        s.replace("NOT NULL UNIQUE", "NOT NULL")
    };
    let time_only = format!(
        "{no_secondary}\nCREATE INDEX events_time ON events (time) WHERE event = 'decision';"
    );
    let variants: [(&str, String, bool); 4] = [
        ("shipped schema: rowid + 6 indexes", shipped.clone(), true),
        ("shipped schema, chain hash not computed", shipped, false),
        ("table + time index only", time_only, true),
        ("table only (rowid b-tree)", no_secondary, true),
    ];
    let rows: Vec<(StoredRow, String)> = (0..n)
        .map(|i| {
            let r = StoredRow::from_record(decision(i, 50, None), "bench");
            let c = r.content();
            (r, c)
        })
        .collect();
    let cols = COLUMNS.join(", ");
    let marks = (1..=COLUMNS.len())
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let insert = format!("INSERT INTO events ({cols}) VALUES ({marks})");
    // Three interleaved rounds, medians reported: this machine's noise is ±10 % run to run.
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _round in 0..3 {
        for (v, (_, schema, hashing)) in variants.iter().enumerate() {
            times[v].push(floor_run(&rows, &insert, schema, *hashing));
        }
    }
    for ((name, _, _), mut t) in variants.iter().zip(times) {
        t.sort_by(f64::total_cmp);
        println!(
            "audit insert floor ({name}): median {:.2} µs/row = {:.0} rows/s on one thread (rounds {})",
            t[1] * 1e6,
            1.0 / t[1],
            t.iter()
                .map(|x| format!("{:.2}", x * 1e6))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
}

/// One timed pass of [`insert_floor`]: seconds per row, checkpoints excluded.
fn floor_run(
    rows: &[(toolgate::audit::record::StoredRow, String)],
    insert: &str,
    schema: &str,
    hashing: bool,
) -> f64 {
    use rusqlite::params_from_iter;
    use toolgate::audit::chain::legacy_row_hash as row_hash;

    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("floor.db")).unwrap();
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -8192; PRAGMA wal_autocheckpoint = 32768;").unwrap();
    conn.execute_batch(schema).unwrap();
    let mut prev = "0".repeat(64);
    let mut checkpoints = Duration::ZERO;
    let t0 = Instant::now();
    for (b, chunk) in rows.chunks(1024).enumerate() {
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut st = tx.prepare_cached(insert).unwrap();
            for (j, (r, content)) in chunk.iter().enumerate() {
                let seq = (b * 1024 + j + 1) as i64;
                let hash = if hashing {
                    row_hash(&prev, seq, content)
                } else {
                    r.args_digest.clone()
                };
                let v: [&dyn rusqlite::ToSql; 29] = [
                    &seq,
                    &r.event,
                    &r.id,
                    &r.decision_id,
                    &r.gateway,
                    &r.time,
                    &r.kind,
                    &r.principal,
                    &r.login,
                    &r.node,
                    &r.node_id,
                    &r.tags,
                    &r.ip,
                    &r.server,
                    &r.method,
                    &r.tool,
                    &r.action,
                    &r.effect,
                    &r.policy,
                    &r.rule,
                    &r.reason,
                    &r.args_digest,
                    &r.outcome,
                    &r.latency_us,
                    &r.policy_hash,
                    &r.explain,
                    &r.arguments,
                    &hash,
                    &prev,
                ];
                st.execute(params_from_iter(v)).unwrap();
                prev = hash;
            }
        }
        tx.commit().unwrap();
        // The daemon's checkpoint thread does this off the writer: not the writer's cost.
        if b % 16 == 15 {
            let t = Instant::now();
            conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)")
                .unwrap();
            checkpoints += t.elapsed();
        }
    }
    (t0.elapsed() - checkpoints).as_secs_f64() / rows.len() as f64
}

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
    if part("insert") {
        insert_rate(Durability::Normal, 50);
        insert_rate(Durability::Normal, 1000);
        insert_rate(Durability::Full, 50);
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
