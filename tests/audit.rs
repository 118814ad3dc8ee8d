//! The audit store end to end: commit-before-resolve, outcomes, backpressure, the single-instance
//! lock, query filters (against a brute-force model), stats, the hash chain against tampering,
//! retention anchors, disk-full fail-closed and recovery, redaction canaries, and the CLI.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde_json::{Value, json};
use toolgate::audit::query::{Filter, Reader};
use toolgate::audit::record::{CONTRACT_KEYS, format_time};
use toolgate::audit::{AuditError, AuditLog, Effect, Kind, Record, Settings};
use toolgate::config::{ArgumentsMode, AuditMode, Durability};

fn settings(path: &Path) -> Settings {
    let mut s = Settings::for_path(path);
    s.durability = Durability::Normal;
    s.gateway = "gw-test".into();
    s
}

fn rec(principal: &str, tool: &str, effect: Effect) -> Record {
    let mut r = Record::new(Kind::Mcp, effect);
    r.principal = principal.into();
    r.login = principal.into();
    r.node = format!("{principal}-laptop.example.ts.net");
    r.node_id = "nNODE1".into();
    r.ip = "100.64.0.1".into();
    r.server = "github".into();
    r.method = "tools/call".into();
    r.tool = tool.into();
    r.action = format!("tools/call::{tool}");
    r.policy = "resource.mcp_server.vdefault".into();
    r.rule = if effect == Effect::Allow {
        "allow_devs"
    } else {
        ""
    }
    .into();
    r.reason = "test".into();
    r.policy_hash = "abc123".into();
    r.outcome = if effect == Effect::Allow {
        "pending"
    } else {
        "denied"
    }
    .into();
    r
}

fn count_rows(path: &Path) -> i64 {
    let c = Connection::open(path).unwrap();
    c.query_row(
        "SELECT (SELECT count(*) FROM decisions) + (SELECT count(*) FROM outcomes) + (SELECT count(*) FROM anchors)",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

#[test]
fn sync_submit_resolves_after_commit_with_every_contract_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let mut r = rec("alice@example.com", "create_issue", Effect::Allow);
    r.tags = vec![];
    r.explain = json!({"steps": [{"rule": "allow_devs"}]});
    log.redactor()
        .apply_arguments(&mut r, &json!({"title": "x"}));
    let id = r.id.clone();
    let t = log.submit(r).unwrap();
    assert_eq!(t.id(), id);
    let c = t.wait_blocking().unwrap();
    assert_eq!(c.seq, Some(1));
    // Committed means visible to a separate read-only connection right away.
    let reader = Reader::open(&db).unwrap();
    let row = reader.get(&id).unwrap().expect("row committed");
    assert_eq!(row.principal, "alice@example.com");
    assert_eq!(row.effect, "allow");
    // SHA-256 of the canonical arguments `{"title":"x"}` (keys sorted by UTF-8 bytes, no
    // whitespace), computed outside toolgate: `printf '%s' '{"title":"x"}' | sha256sum`.
    assert_eq!(
        row.args_digest,
        "27503c8b55d6cdd9256053d7f84ead30d502467a1ed11f64071aa34c3a1d0e25"
    );
    assert_eq!(row.gateway, "gw-test");
    let v = serde_json::to_value(&row).unwrap();
    for k in CONTRACT_KEYS {
        assert!(v.get(k).is_some(), "missing contract key {k}");
    }
    assert!(reader.verify().unwrap().broken.is_none());
    let m = log.metrics();
    assert_eq!(m.committed_rows, 1);
    assert!(m.healthy);
    assert!(m.prometheus().contains("toolgate_audit_healthy 1"));
}

/// Polls `reader` until decision `id` shows `outcome`; the time that took, or `None` by `deadline`.
fn outcome_visible_within(
    reader: &Reader,
    id: &str,
    outcome: &str,
    deadline: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < deadline {
        if reader.get(id).unwrap().unwrap().outcome == outcome {
            return Some(t0.elapsed());
        }
        std::thread::yield_now();
    }
    None
}

#[test]
fn an_idle_gateway_commits_outcome_rows_within_100_ms() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let reader = Reader::open(&db).unwrap();
    // Nothing else is submitted and nothing flushes: only the writer's timer commits the row.
    // The bound is checked over three tries, so one scheduling hiccup on a loaded machine does
    // not fail it; a missing timer fails every try (the row stays pending for the whole 2 s).
    let mut seen = Vec::new();
    for i in 0..3 {
        let r = rec("alice@example.com", &format!("t{i}"), Effect::Allow);
        let id = r.id.clone();
        log.submit(r).unwrap().wait_blocking().unwrap();
        assert_eq!(reader.get(&id).unwrap().unwrap().outcome, "pending");
        log.record_outcome(&id, "forwarded", Some(7), "").unwrap();
        let took = outcome_visible_within(&reader, &id, "forwarded", Duration::from_secs(2))
            .unwrap_or_else(|| panic!("try {i}: the outcome row was not committed within 2 s"));
        seen.push(took);
        if took <= Duration::from_millis(100) {
            return;
        }
    }
    panic!("outcome rows took {seen:?} to commit on an idle gateway (want ≤ 100 ms)");
}

#[test]
fn outcome_rows_ride_with_the_next_decision_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let reader = Reader::open(&db).unwrap();
    let a = rec("alice@example.com", "create_issue", Effect::Allow);
    let a_id = a.id.clone();
    log.submit(a).unwrap().wait_blocking().unwrap();
    for _ in 0..3 {
        let commits = log.metrics().commits;
        log.record_outcome(&a_id, "forwarded", Some(9), "").unwrap();
        let b = rec("bob@example.com", "list_issues", Effect::Deny);
        let seq = log.submit(b).unwrap().wait_blocking().unwrap().seq.unwrap();
        // The decision's commit carried the outcome row queued before it: one transaction.
        assert_eq!(reader.get(&a_id).unwrap().unwrap().outcome, "forwarded");
        let m = log.metrics();
        assert_eq!(
            m.head_seq,
            seq + 1,
            "the buffered outcome row follows the decisions of its transaction"
        );
        if m.commits == commits + 1 {
            return;
        }
        // The writer's timer tick landed between the two submissions and committed the
        // outcome row on its own (a descheduled test thread): try again.
    }
    panic!("in three tries the outcome row never rode with the next decision's commit");
}

/// A tools/call is a decision (awaited) and an outcome (not): only the decision wakes the
/// writer thread; the outcome waits in the side buffer for the next transaction.
#[test]
fn outcome_rows_never_wake_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let reader = Reader::open(&db).unwrap();
    let w0 = log.writer_wakeups();
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = rec("alice@example.com", &format!("t{i}"), Effect::Allow);
        let id = r.id.clone();
        log.submit(r).unwrap().wait_blocking().unwrap();
        log.record_outcome(&id, "forwarded", Some(7), "").unwrap();
        assert_eq!(log.queue_depth(), 0, "the outcome row is not in the queue");
        ids.push(id);
    }
    assert_eq!(
        log.writer_wakeups() - w0,
        20,
        "one wake-up per call (its decision), none for outcome rows"
    );
    // No flush: the last outcome rides with nothing, so the tick commits it.
    let last = ids.last().unwrap();
    outcome_visible_within(&reader, last, "forwarded", Duration::from_secs(2))
        .expect("the tick committed the last outcome row");
    for id in &ids {
        assert_eq!(
            reader.get(id).unwrap().unwrap().outcome,
            "forwarded",
            "{id}"
        );
    }
    assert_eq!(log.outcomes_buffered(), 0);
    assert!(reader.verify().unwrap().broken.is_none());
    // Each outcome row follows its decision in the chain.
    let c = rusqlite::Connection::open(&db).unwrap();
    let out_of_order: i64 = c
        .query_row(
            "SELECT count(*) FROM outcomes o WHERE NOT EXISTS (SELECT 1 FROM decisions d WHERE d.id = o.decision AND d.seq < o.seq)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(out_of_order, 0);
}

#[test]
fn outcome_rows_merge_into_their_decision() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let r = rec("alice@example.com", "create_issue", Effect::Allow);
    let id = r.id.clone();
    log.submit(r).unwrap().wait_blocking().unwrap();
    let reader = Reader::open(&db).unwrap();
    assert_eq!(reader.get(&id).unwrap().unwrap().outcome, "pending");
    log.record_outcome(
        &id,
        "upstream_error:timeout",
        Some(2_000_000),
        "upstream timed out",
    )
    .unwrap();
    log.flush_blocking().unwrap();
    let row = reader.get(&id).unwrap().unwrap();
    assert_eq!(row.outcome, "upstream_error:timeout");
    assert_eq!(row.latency_us, Some(2_000_000));
    // A later outcome wins; the decision row itself is never updated.
    log.record_outcome(&id, "forwarded", Some(1234), "")
        .unwrap();
    log.flush_blocking().unwrap();
    let row = reader.get(&id).unwrap().unwrap();
    assert_eq!(
        (row.outcome.as_str(), row.latency_us),
        ("forwarded", Some(1234))
    );
    let f = Filter {
        outcome: Some("upstream_error".into()),
        ..Filter::default()
    };
    assert!(reader.query(&f).unwrap().is_empty());
    assert_eq!(count_rows(&db), 3);
    assert!(reader.verify().unwrap().broken.is_none());

    // An allowed call still pending when the gateway stops is marked unknown at the next start.
    let r = rec("alice@example.com", "delete_repo", Effect::Allow);
    let pending = r.id.clone();
    log.submit(r).unwrap().wait_blocking().unwrap();
    drop(log);
    let _log = AuditLog::open(settings(&db)).unwrap();
    let row = reader.get(&pending).unwrap().unwrap();
    assert_eq!(row.outcome, "unknown");
    assert_eq!(reader.get(&id).unwrap().unwrap().outcome, "forwarded");
    assert!(reader.verify().unwrap().broken.is_none());
}

#[test]
fn async_mode_resolves_at_enqueue_and_commits_soon() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let mut s = settings(&db);
    s.mode = AuditMode::Async;
    let log = AuditLog::open(s).unwrap();
    let mut ids = Vec::new();
    for i in 0..500 {
        let r = rec(&format!("p{i}"), "t", Effect::Deny);
        ids.push(r.id.clone());
        assert_eq!(log.submit(r).unwrap().wait_blocking().unwrap().seq, None);
    }
    log.flush_blocking().unwrap();
    assert_eq!(count_rows(&db), 500);
    drop(log);
    assert!(
        Reader::open(&db)
            .unwrap()
            .verify()
            .unwrap()
            .broken
            .is_none()
    );
}

#[test]
fn a_full_queue_is_an_error_never_a_silent_drop() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let mut s = settings(&db);
    s.queue = 2;
    s.durability = Durability::Full;
    let log = AuditLog::open(s).unwrap();
    let mut tickets = Vec::new();
    let mut full = 0;
    for i in 0..3000 {
        match log.submit(rec(&format!("p{i}"), "t", Effect::Allow)) {
            Ok(t) => tickets.push(t),
            Err(AuditError::QueueFull) => full += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        full > 0,
        "a 2-row queue under a 3000-row burst never filled"
    );
    assert_eq!(
        AuditError::QueueFull.retry_after(),
        Some(Duration::from_secs(1))
    );
    let accepted = tickets.len() as i64;
    for t in tickets {
        t.wait_blocking().unwrap();
    }
    assert_eq!(count_rows(&db), accepted);
    assert_eq!(log.metrics().rejected_queue_full, full);
}

#[test]
fn a_second_instance_on_the_same_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let e = AuditLog::open(settings(&db)).unwrap_err().to_string();
    assert!(e.contains("another toolgate"), "{e}");
    drop(log);
    AuditLog::open(settings(&db)).unwrap();
}

/// A varied set of decisions with known times, outcomes and tags.
fn populate(log: &AuditLog) -> Vec<Record> {
    let base = chrono::Utc::now() - chrono::Duration::hours(10);
    let principals = [
        "alice@example.com",
        "bob@example.com",
        "ci-runner.example.ts.net",
    ];
    let tools = ["create_issue", "delete_repo", "search"];
    let servers = ["github", "jira"];
    let mut out = Vec::new();
    for i in 0..120i64 {
        let p = principals[(i % 3) as usize];
        let effect = if i % 4 == 0 {
            Effect::Deny
        } else {
            Effect::Allow
        };
        let mut r = rec(p, tools[(i % 5 % 3) as usize], effect);
        r.server = servers[(i % 2) as usize].into();
        r.time = format_time(base + chrono::Duration::minutes(5 * i));
        if p.starts_with("ci-") {
            r.tags = vec!["tag:ci".into(), format!("tag:shard{}", i % 2)];
            r.node = p.into();
        }
        if i % 7 == 0 {
            r.kind = Kind::Check;
        }
        let t = log.submit(r.clone()).unwrap();
        t.wait_blocking().unwrap();
        if effect == Effect::Allow {
            let o = match i % 3 {
                0 => "forwarded",
                1 => "upstream_error:timeout",
                _ => "upstream_error:refused",
            };
            log.record_outcome(&r.id, o, Some(100 + i as u64), "")
                .unwrap();
            r.outcome = o.into();
            r.latency_us = Some(100 + i as u64);
        }
        out.push(r);
    }
    log.flush_blocking().unwrap();
    out
}

fn model(all: &[Record], f: &Filter) -> Vec<String> {
    let mut v: Vec<&Record> = all
        .iter()
        .filter(|r| f.since.as_ref().is_none_or(|s| r.time >= *s))
        .filter(|r| f.until.as_ref().is_none_or(|s| r.time < *s))
        .filter(|r| f.principal.as_ref().is_none_or(|x| &r.principal == x))
        .filter(|r| f.node.as_ref().is_none_or(|x| &r.node == x))
        .filter(|r| f.tag.as_ref().is_none_or(|x| r.tags.contains(x)))
        .filter(|r| f.server.as_ref().is_none_or(|x| &r.server == x))
        .filter(|r| f.tool.as_ref().is_none_or(|x| &r.tool == x))
        .filter(|r| f.effect.as_ref().is_none_or(|x| r.effect.as_str() == x))
        .filter(|r| f.kind.as_ref().is_none_or(|x| r.kind.as_str() == x))
        .filter(|r| {
            f.outcome
                .as_ref()
                .is_none_or(|x| r.outcome == *x || r.outcome.starts_with(&format!("{x}:")))
        })
        .collect();
    v.sort_by(|a, b| a.time.cmp(&b.time));
    if let Some(l) = f.limit {
        let n = v.len();
        v = v.split_off(n.saturating_sub(l));
    }
    v.into_iter().map(|r| r.id.clone()).collect()
}

#[test]
fn query_filters_match_a_brute_force_model() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let all = populate(&log);
    let reader = Reader::open(&db).unwrap();
    let now = chrono::Utc::now();
    let t = |h: i64| format_time(now - chrono::Duration::hours(h));
    let filters = vec![
        Filter::default(),
        Filter {
            principal: Some("alice@example.com".into()),
            ..Filter::default()
        },
        Filter {
            node: Some("ci-runner.example.ts.net".into()),
            ..Filter::default()
        },
        Filter {
            tag: Some("tag:ci".into()),
            ..Filter::default()
        },
        Filter {
            tag: Some("tag:shard1".into()),
            effect: Some("allow".into()),
            ..Filter::default()
        },
        Filter {
            server: Some("jira".into()),
            tool: Some("search".into()),
            ..Filter::default()
        },
        Filter {
            effect: Some("deny".into()),
            ..Filter::default()
        },
        Filter {
            outcome: Some("upstream_error".into()),
            ..Filter::default()
        },
        Filter {
            outcome: Some("upstream_error:refused".into()),
            ..Filter::default()
        },
        Filter {
            outcome: Some("forwarded".into()),
            principal: Some("bob@example.com".into()),
            ..Filter::default()
        },
        Filter {
            outcome: Some("denied".into()),
            ..Filter::default()
        },
        // Newest N by outcome: found in recent windows first (1 h holds ~12 rows here).
        Filter {
            outcome: Some("upstream_error".into()),
            limit: Some(3),
            ..Filter::default()
        },
        Filter {
            outcome: Some("forwarded".into()),
            limit: Some(30),
            ..Filter::default()
        },
        Filter {
            kind: Some("check".into()),
            ..Filter::default()
        },
        Filter {
            since: Some(t(5)),
            ..Filter::default()
        },
        Filter {
            since: Some(t(8)),
            until: Some(t(3)),
            tool: Some("delete_repo".into()),
            ..Filter::default()
        },
        Filter {
            limit: Some(7),
            ..Filter::default()
        },
        Filter {
            limit: Some(3),
            effect: Some("deny".into()),
            since: Some(t(6)),
            ..Filter::default()
        },
        Filter {
            principal: Some("nobody".into()),
            ..Filter::default()
        },
        Filter {
            tag: Some("tag:none".into()),
            ..Filter::default()
        },
    ];
    // Outcome filters run both ways: from the outcome index (rare outcomes) and along the
    // time index (common ones).
    let via_index = Reader::open(&db).unwrap().with_rare_outcome_rows(i64::MAX);
    let via_time = Reader::open(&db).unwrap().with_rare_outcome_rows(0);
    for f in &filters {
        let want = model(&all, f);
        for r in [&reader, &via_index, &via_time] {
            let got: Vec<String> = r.query(f).unwrap().into_iter().map(|r| r.id).collect();
            assert_eq!(got, want, "filter {f:?}");
        }
    }
    // Merged outcome and latency come through.
    let r = reader
        .query(&Filter {
            outcome: Some("upstream_error:timeout".into()),
            limit: Some(1),
            ..Filter::default()
        })
        .unwrap();
    assert!(r[0].latency_us.is_some());
    // Per-row authorization with a limit counts only kept rows.
    let kept = reader
        .query_where(
            &Filter {
                limit: Some(5),
                ..Filter::default()
            },
            &mut |r| r.principal == "bob@example.com",
        )
        .unwrap();
    assert_eq!(kept.len(), 5);
    assert!(kept.iter().all(|r| r.principal == "bob@example.com"));
    // The URL-parameter form gives the same answer.
    let f = Filter::from_pairs([("principal", "alice@example.com"), ("effect", "deny")]).unwrap();
    assert_eq!(reader.query(&f).unwrap().len(), model(&all, &f).len());
    // Stats over everything.
    let st = reader.stats(&Filter::default(), 10).unwrap();
    assert_eq!(st.decisions, 120);
    assert_eq!(st.denied, 30);
    assert_eq!(st.allowed, 90);
    assert_eq!(st.top_principals.len(), 3);
    assert_eq!(st.top_principals.iter().map(|c| c.count).sum::<u64>(), 120);
    let errors: u64 = st.error_outcomes.iter().map(|c| c.count).sum();
    assert_eq!(
        errors,
        all.iter()
            .filter(|r| r.outcome.starts_with("upstream_error"))
            .count() as u64
    );
    assert!(st.top_denials.iter().all(|d| d.count > 0));
}

fn tamper(db: &Path, sql: &str) -> PathBuf {
    let copy = db.with_extension(format!("t{}.db", rand_suffix()));
    {
        let c = Connection::open(db).unwrap();
        c.execute_batch(&format!("VACUUM INTO '{}'", copy.display()))
            .unwrap();
    }
    let c = Connection::open(&copy).unwrap();
    c.execute_batch(
        "DROP TRIGGER decisions_no_update; DROP TRIGGER decisions_no_delete; DROP TRIGGER names_no_update;",
    )
    .unwrap();
    c.execute_batch(sql).unwrap();
    copy
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn verify_cli(db: &Path) -> (i32, String) {
    verify_cli_with(db, &[])
}

fn verify_cli_with(db: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["audit", "verify", "--db"])
        .arg(db)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_chain_detects_edited_deleted_inserted_and_truncated_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = rec(&format!("p{i}"), "t", Effect::Allow);
        ids.push(r.id.clone());
        log.submit(r).unwrap().wait_blocking().unwrap();
    }
    drop(log);
    let (code, out) = verify_cli(&db);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("20 rows"), "{out}");

    // The tampered copies sit next to the original, so they find its key (audit.key).
    // Edited: one field of row 7.
    let t = tamper(&db, "UPDATE decisions SET effect = 0 WHERE seq = 7");
    let rep = Reader::open(&t).unwrap().verify().unwrap();
    assert!(rep.keyed);
    let b = rep.broken.unwrap();
    assert_eq!(
        (b.seq, b.id.as_str()),
        (7, ids[6].as_str()),
        "{}",
        b.problem
    );
    assert!(b.problem.contains("edited"), "{}", b.problem);
    let (code, out) = verify_cli(&t);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&ids[6]), "{out}");

    // A tampered lookup row: the principal of row 4 renamed in `names`.
    let t = tamper(&db, "UPDATE names SET text = 'mallory' WHERE text = 'p3'");
    let b = Reader::open(&t).unwrap().verify().unwrap().broken.unwrap();
    assert_eq!(b.seq, 4, "{b}");

    // A hash swapped for another row's: both links break.
    let t = tamper(
        &db,
        "UPDATE decisions SET hash = (SELECT hash FROM decisions WHERE seq = 3) WHERE seq = 9",
    );
    let b = Reader::open(&t).unwrap().verify().unwrap().broken.unwrap();
    assert_eq!(b.seq, 9, "{b}");

    // Deleted: row 12 (a middle row).
    let t = tamper(&db, "DELETE FROM decisions WHERE seq = 12");
    let b = Reader::open(&t).unwrap().verify().unwrap().broken.unwrap();
    assert_eq!(b.seq, 13, "{b}");
    assert!(b.problem.contains("missing"), "{b}");

    // Deleted from the oldest end without an anchor.
    let t = tamper(&db, "DELETE FROM decisions WHERE seq <= 3");
    let b = Reader::open(&t).unwrap().verify().unwrap().broken.unwrap();
    assert_eq!(b.seq, 4, "{b}");

    // Inserted: a forged row (a copy of row 5 with a new id) at the end, and the recorded head
    // moved along with it: the forged row's hash is not the key's.
    let t = tamper(
        &db,
        "INSERT INTO decisions SELECT 21, randomblob(16), time, gateway, kind, principal, login, node, node_id, tags, ip, server, method, tool, action, effect, policy, rule, reason, args_digest, outcome, latency_us, policy_hash, explain, arguments, hash, principal_input, resource_input, shadows FROM decisions WHERE seq = 5;
         UPDATE meta SET value = '21:' || lower(hex((SELECT hash FROM decisions WHERE seq = 5))) || ':00' WHERE key = 'head';",
    );
    let b = Reader::open(&t).unwrap().verify().unwrap().broken.unwrap();
    assert_eq!(b.seq, 21, "{b}");

    // Truncated at the newest end: caught against the recorded head.
    let t = tamper(&db, "DELETE FROM decisions WHERE seq > 17");
    let b = Reader::open(&t).unwrap().verify().unwrap().broken.unwrap();
    assert!(b.problem.contains("ends before the recorded head"), "{b}");

    // Truncated together with the head: a non-empty store without a head is a break.
    let t = tamper(
        &db,
        "DELETE FROM decisions WHERE seq > 17; DELETE FROM meta WHERE key = 'head';",
    );
    let b = Reader::open(&t).unwrap().verify().unwrap().broken.unwrap();
    assert!(b.problem.contains("no recorded chain head"), "{b}");

    // Truncated with the head rewritten to the new last row: its MAC needs the key.
    let t = tamper(
        &db,
        "DELETE FROM decisions WHERE seq > 17; UPDATE meta SET value = '17:' || lower(hex((SELECT hash FROM decisions WHERE seq = 17))) || ':00' WHERE key = 'head';",
    );
    let b = Reader::open(&t).unwrap().verify().unwrap().broken.unwrap();
    assert!(b.problem.contains("MAC"), "{b}");

    // ... and with an older head record replayed (seq 17's real one, saved earlier): only
    // --expect-head (or the Postgres copy) catches that.
    let head20 = Reader::open(&db).unwrap().verify().unwrap().head.unwrap();
    let (code, out) = verify_cli_with(&db, &["--expect-head", &head20]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = verify_cli_with(&db, &["--expect-head", &format!("20:{head20}")]);
    assert_eq!(code, 0, "{out}");
    let t = tamper(&db, "DELETE FROM decisions WHERE seq > 17");
    let (code, out) = verify_cli_with(&t, &["--expect-head", &head20]);
    assert_eq!(code, 1, "{out}");

    // Without the key: linkage still checked (a deletion is caught), content is not, and the
    // exit status says so.
    let nokey = dir.path().join("nokey");
    std::fs::create_dir(&nokey).unwrap();
    let moved = nokey.join("audit.db");
    std::fs::copy(&db, &moved).unwrap();
    let (code, out) = verify_cli(&moved);
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("NOT checked"), "{out}");
    let t = tamper(&moved, "UPDATE decisions SET effect = 0 WHERE seq = 7");
    let (code, _) = verify_cli(&t);
    assert_eq!(code, 6, "an edit is invisible without the key");
    let t = tamper(&moved, "DELETE FROM decisions WHERE seq = 12");
    let (code, out) = verify_cli(&t);
    assert_eq!(code, 1, "{out}");
    let (code, out) = verify_cli_with(
        &moved,
        &["--key", dir.path().join("audit.key").to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");

    // Updates are refused by the store itself.
    let c = Connection::open(&db).unwrap();
    assert!(
        c.execute("UPDATE decisions SET principal = 2 WHERE seq = 1", [])
            .is_err()
    );
    assert!(
        c.execute("DELETE FROM decisions WHERE seq = 1", [])
            .is_err()
    );
}

fn page_count(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn retention_prunes_the_oldest_rows_and_anchors_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let mut s = settings(&db);
    s.retention = Some(Duration::from_secs(90 * 86_400));
    let log = AuditLog::open(s.clone()).unwrap();
    let old = chrono::Utc::now() - chrono::Duration::days(100);
    for i in 0..50 {
        let mut r = rec(&format!("old{i}"), "t", Effect::Allow);
        r.time = format_time(old + chrono::Duration::seconds(i));
        log.submit(r).unwrap().wait_blocking().unwrap();
    }
    let mut keep = BTreeSet::new();
    for i in 0..30 {
        let r = rec(&format!("new{i}"), "t", Effect::Deny);
        keep.insert(r.id.clone());
        log.submit(r).unwrap().wait_blocking().unwrap();
    }
    let pages_before = page_count(&db);
    assert_eq!(log.prune_now_blocking().unwrap(), 50);
    assert_eq!(log.prune_now_blocking().unwrap(), 0);
    let reader = Reader::open(&db).unwrap();
    let rep = reader.verify().unwrap();
    assert!(rep.broken.is_none(), "{:?}", rep.broken);
    assert_eq!(rep.anchor.as_ref().unwrap().pruned_through_seq, 50);
    // The freed pages went back to the file system (incremental vacuum).
    let pages_after = page_count(&db);
    assert!(
        pages_after < pages_before,
        "{pages_after} !< {pages_before}"
    );
    let left: BTreeSet<String> = reader
        .query(&Filter::default())
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, keep);
    // New rows chain on after the anchor; a restart keeps it all verifiable.
    log.submit(rec("after", "t", Effect::Deny))
        .unwrap()
        .wait_blocking()
        .unwrap();
    drop(log);
    let log = AuditLog::open(s).unwrap();
    log.submit(rec("after-restart", "t", Effect::Deny))
        .unwrap()
        .wait_blocking()
        .unwrap();
    let rep = Reader::open(&db).unwrap().verify().unwrap();
    assert!(rep.broken.is_none(), "{:?}", rep.broken);
    assert_eq!(rep.rows, 30 + 1 + 1 + 1);
    assert_eq!(log.metrics().head_seq, 83);
}

#[test]
fn a_full_disk_fails_closed_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let mut s = settings(&db);
    s.max_db_bytes = Some(256 * 1024);
    let log = AuditLog::open(s).unwrap();
    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..20_000 {
        let mut r = rec(&format!("p{i}"), "t", Effect::Allow);
        r.reason = "x".repeat(200);
        let id = r.id.clone();
        match log.submit(r).unwrap().wait_blocking() {
            Ok(_) => acked.push(id),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let e = failure.expect("the size cap was never reached");
    assert!(matches!(e, AuditError::Unavailable(_)), "{e}");
    assert!(e.retry_after().is_some());
    assert!(e.to_string().contains("full"), "{e}");
    let h = log.health();
    assert!(!h.healthy);
    assert!(h.last_error.unwrap().contains("full"));
    // Every further allowed call fails too (nothing would be forwarded) ...
    for _ in 0..3 {
        let mut r = rec("x", "t", Effect::Allow);
        r.reason = "x".repeat(200);
        assert!(log.submit(r).unwrap().wait_blocking().is_err());
    }
    let m = log.metrics();
    assert!(!m.healthy && m.write_errors >= 4 && m.failed_rows >= 4);
    assert!(m.prometheus().contains("toolgate_audit_healthy 0"));
    // ... nothing is corrupted, every acknowledged row is there, the chain verifies.
    {
        let c = Connection::open(&db).unwrap();
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        let reader = Reader::open(&db).unwrap();
        assert!(reader.verify().unwrap().broken.is_none());
        for id in acked.iter().step_by(97) {
            assert!(reader.get(id).unwrap().is_some());
        }
        assert_eq!(count_rows(&db), acked.len() as i64);
    }
    // Space comes back: writes succeed again and health recovers on its own.
    log.set_max_db_bytes(None).unwrap();
    let r = rec("after", "t", Effect::Allow);
    log.submit(r).unwrap().wait_blocking().unwrap();
    assert!(log.health().healthy);
    drop(log);
    let reader = Reader::open(&db).unwrap();
    assert!(reader.verify().unwrap().broken.is_none());
    assert_eq!(count_rows(&db), acked.len() as i64 + 1);
}

const CANARIES: [&str; 10] = [
    "ghp_CANARY0123456789abcdefghijklmnop",
    "eyJhbGciOiJIUzI1NiJ9.eyJDQU5BUlkiOjJ9.CANARY2signature",
    "-----BEGIN PRIVATE KEY-----\nMIIEvCANARY3keymaterial\n-----END PRIVATE KEY-----",
    "hunter2-CANARY-4",
    "CANARY5-session-cookie-value",
    "Bearer CANARY6tokenvalue123456",
    "sk-CANARY7abcdefghijklmnopqrstu",
    "AKIACANARY8ABCDEFGHI",
    "plainvalue-CANARY9",
    "CANARY10x9Qm2Lr7Tz4Wv8Ks1Hd6Jf3Np5Bc0",
];

fn scan_files(dir: &Path) -> Vec<String> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let hay = String::from_utf8_lossy(&bytes);
        // Also catch any canary's distinctive part split by escaping.
        if hay.contains("CANARY") || hay.contains("hunter2") {
            let at = hay.find("CANARY").or_else(|| hay.find("hunter2")).unwrap();
            hits.push(format!(
                "{}: …{}…",
                p.display(),
                &hay[at.saturating_sub(40)..(at + 40).min(hay.len())]
            ));
        }
    }
    hits
}

/// `args_digest` is the SHA-256 of the canonical arguments: keys sorted by their UTF-8 bytes at
/// every depth, no whitespace, serde_json's string escapes, non-ASCII text as is. The expected
/// bytes are written out by hand here and hashed with the sha2 crate directly, so the check is
/// independent of toolgate's own canonicalisation and digest code; a second digest, of
/// `{"title":"x"}`, is pinned from `sha256sum` in the test above.
#[test]
fn args_digest_is_the_sha256_of_the_canonical_arguments() {
    use sha2::Digest as _;
    let cases = [
        (json!({"title": "x"}), r#"{"title":"x"}"#),
        (
            json!({"z": [3, {"b": null, "a": true}], "B": -1.5, "a": "é\n\"q\"\t\\", "é": {}, "A": []}),
            r#"{"A":[],"B":-1.5,"a":"é\n\"q\"\t\\","z":[3,{"a":true,"b":null}],"é":{}}"#,
        ),
        (
            json!({"ctl": "\u{1}\u{1f}", "n": 12345678901234_u64}),
            r#"{"ctl":"\u0001\u001f","n":12345678901234}"#,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let mut ids = Vec::new();
    for (args, _) in &cases {
        let mut r = rec("alice@example.com", "create_issue", Effect::Allow);
        log.redactor().apply_arguments(&mut r, args);
        ids.push(r.id.clone());
        log.submit(r).unwrap().wait_blocking().unwrap();
    }
    let reader = Reader::open(&db).unwrap();
    for ((_, canonical), id) in cases.iter().zip(&ids) {
        let want: String = sha2::Sha256::digest(canonical.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let row = reader.get(id).unwrap().expect("row committed");
        assert_eq!(row.args_digest, want, "the digest of {canonical}");
    }
    assert_eq!(
        ids.len(),
        3,
        "every case was written and read back from the store"
    );
}

fn canary_run(mode: ArgumentsMode) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let mut s = settings(&db);
    s.redactor = toolgate::audit::Redactor::new(mode, &[], 4096);
    let log = AuditLog::open(s).unwrap();
    let args = json!({
        "title": "harmless",
        "body": format!("deploy with {} and {}", CANARIES[5], CANARIES[0]),
        "github_token": CANARIES[0],
        "nested": {"jwt_text": format!("here: {}", CANARIES[1]), "list": [CANARIES[2], CANARIES[6], CANARIES[7]]},
        "password": CANARIES[3],
        "Cookie": CANARIES[4],
        "api_key": CANARIES[8],
        "blob": CANARIES[9],
        "headers": {"Authorization": CANARIES[5]},
    });
    for (i, effect) in [Effect::Allow, Effect::Deny].into_iter().enumerate() {
        let mut r = rec("alice@example.com", "create_issue", effect);
        r.reason = format!(
            "condition failed on password {} and {}",
            CANARIES[3], CANARIES[8]
        );
        r.explain = json!({
            "error": format!("no such key in {}", CANARIES[4]),
            "trace": [CANARIES[1], {"val": CANARIES[9]}],
        });
        log.redactor().apply_arguments(&mut r, &args);
        let id = r.id.clone();
        log.submit(r).unwrap().wait_blocking().unwrap();
        log.record_outcome(
            &id,
            "upstream_error:500",
            Some(10),
            &format!("upstream said: {} {}", CANARIES[5], CANARIES[1]),
        )
        .unwrap();
        // An identity row with a secret in its reason and no arguments at all.
        let mut r = Record::new(Kind::Identity, Effect::Deny);
        r.reason = format!("header carried {} ({i})", CANARIES[1]);
        log.submit(r).unwrap().wait_blocking().unwrap();
    }
    log.flush_blocking().unwrap();
    let hits = scan_files(dir.path());
    assert!(
        hits.is_empty(),
        "{mode:?}: canaries reached the store: {hits:#?}"
    );
    // The structure survives where allowed.
    let reader = Reader::open(&db).unwrap();
    let rows = reader
        .query(&Filter {
            kind: Some("mcp".into()),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].args_digest.len(), 64);
    if mode == ArgumentsMode::Redacted {
        assert_eq!(rows[0].arguments["title"], "harmless");
        assert_eq!(rows[0].arguments["password"], "[REDACTED:key]");
    } else {
        assert_eq!(rows[0].arguments, Value::Null);
    }
    drop(reader);
    drop(log);
    let hits = scan_files(dir.path());
    assert!(hits.is_empty(), "{mode:?} after close: {hits:#?}");
}

#[test]
fn redaction_keeps_every_canary_secret_out_of_the_store() {
    canary_run(ArgumentsMode::Redacted);
    canary_run(ArgumentsMode::Digest);
}

#[test]
fn full_mode_stores_arguments_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let mut s = settings(&db);
    s.redactor = toolgate::audit::Redactor::new(ArgumentsMode::Full, &[], 4096);
    let log = AuditLog::open(s).unwrap();
    let mut r = rec("a", "t", Effect::Allow);
    log.redactor()
        .apply_arguments(&mut r, &json!({"password": "shown-in-full-mode"}));
    let id = r.id.clone();
    log.submit(r).unwrap().wait_blocking().unwrap();
    let row = Reader::open(&db).unwrap().get(&id).unwrap().unwrap();
    assert_eq!(row.arguments["password"], "shown-in-full-mode");
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_queries_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let all = populate(&log);
    let mut evil = rec("eve\u{202e}@example.com", "t\nx", Effect::Deny);
    evil.reason = "\x1b[31mred".into();
    log.submit(evil).unwrap().wait_blocking().unwrap();
    let dbs = db.to_str().unwrap();

    let (code, out, err) = cli(&["audit", "query", "--db", dbs, "--format", "jsonl"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        all.len() + 1,
        "machine formats return every row"
    );
    for k in CONTRACT_KEYS {
        assert!(lines[0].get(k).is_some(), "jsonl lacks {k}");
    }

    let (_, out, _) = cli(&[
        "audit",
        "query",
        "--db",
        dbs,
        "--format",
        "json",
        "--effect",
        "deny",
        "--principal",
        "alice@example.com",
    ]);
    let arr: Vec<Value> = serde_json::from_str(&out).unwrap();
    let want = all
        .iter()
        .filter(|r| r.effect == Effect::Deny && r.principal == "alice@example.com")
        .count();
    assert_eq!(arr.len(), want);

    let (_, out, _) = cli(&[
        "audit", "query", "--db", dbs, "--format", "csv", "--limit", "5", "--tag", "tag:ci",
    ]);
    let mut l = out.lines();
    assert_eq!(l.next().unwrap(), CONTRACT_KEYS.join(","));
    assert_eq!(l.count(), 5);

    let (_, out, _) = cli(&[
        "audit",
        "query",
        "--db",
        dbs,
        "--format",
        "json",
        "--since",
        "3h",
        "--outcome",
        "upstream_error",
    ]);
    let arr: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(!arr.is_empty());
    assert!(arr.iter().all(|r| {
        r["outcome"]
            .as_str()
            .unwrap()
            .starts_with("upstream_error:")
    }));

    let (code, out, _) = cli(&[
        "audit", "query", "--db", dbs, "--format", "table", "--limit", "3",
    ]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("TIME") && lines[0].contains("PRINCIPAL"));
    // Terminal escapes from caller-controlled text are escaped, never printed raw.
    assert!(!out.contains('\u{202e}') && !out.contains('\x1b'), "{out}");
    assert!(out.contains("\\u{202e}"), "{out}");

    let (code, out, _) = cli(&[
        "audit", "stats", "--db", dbs, "--since", "30d", "--format", "json",
    ]);
    assert_eq!(code, 0);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["decisions"], all.len() as u64 + 1);
    let (code, out, err) = cli(&["audit", "stats", "--db", dbs, "--since", "30d"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("top principals") && out.contains("error outcomes"),
        "{out}"
    );

    let (code, _, err) = cli(&["audit", "query", "--db", dbs, "--since", "yesterday-ish"]);
    assert_eq!(code, 2);
    assert!(err.contains("--since"), "{err}");
    // A store that cannot be read is a runtime failure (1), not a usage error (README, exit codes).
    let (code, _, err) = cli(&["audit", "query", "--db", "/nonexistent/audit.db"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/audit.db"), "{err}");
}

#[test]
fn follow_prints_new_rows_as_they_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    log.submit(rec("before", "t", Effect::Deny))
        .unwrap()
        .wait_blocking()
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["audit", "query", "--follow", "--format", "jsonl", "--db"])
        .arg(&db)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Every line is read on a thread and sent here as it arrives.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |what: &str| -> String {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{what}: no line from audit query --follow ({e})"))
    };
    // Following has begun: the row that existed before has been printed. Only then are the
    // next rows written, so they can only arrive through the follow loop.
    let first: Value = serde_json::from_str(&next_line("the existing row")).unwrap();
    assert_eq!(first["principal"], "before");
    assert!(rx.try_recv().is_err(), "nothing else was committed yet");
    let allowed = rec("during", "t", Effect::Allow);
    let id = allowed.id.clone();
    log.submit(allowed).unwrap().wait_blocking().unwrap();
    log.record_outcome(&id, "forwarded", Some(5), "").unwrap();
    log.submit(rec("during2", "t", Effect::Deny))
        .unwrap()
        .wait_blocking()
        .unwrap();
    let rows: Vec<Value> = ["the allowed row", "the row after it"]
        .iter()
        .map(|what| serde_json::from_str(&next_line(what)).unwrap())
        .collect();
    assert!(
        child.try_wait().unwrap().is_none(),
        "--follow is still following"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(rows[0]["principal"], "during");
    assert_eq!(rows[0]["outcome"], "forwarded");
    assert_eq!(rows[1]["principal"], "during2");
}
