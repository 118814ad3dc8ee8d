//! Writes `tests/fixtures/audit/v2.db` (and the `audit query --format jsonl` view of it,
//! `v2.jsonl`) with the schema-v2 audit store: decisions of every shape, outcome rows, full-mode
//! arguments, tags, explain traces, a pending call, and a retention anchor. Run once, with the
//! code of the commit that adds it: `cargo run --example audit_v2_fixture`. The upgrade test
//! (tests/audit_upgrade.rs) opens a copy with today's code and checks every logical row survives.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "one-shot generator"
)]

use std::time::Duration;

use serde_json::json;
use toolgate::audit::query::{Filter, Reader};
use toolgate::audit::record::format_time;
use toolgate::audit::{AuditLog, Effect, Kind, Record, Redactor, Settings};
use toolgate::config::{ArgumentsMode, AuditMode, Durability};

fn rec(i: usize, kind: Kind, effect: Effect) -> Record {
    let mut r = Record::new(kind, effect);
    let who = [
        "alice@example.com",
        "bob@example.com",
        "ci-runner.example.ts.net",
    ][i % 3];
    r.principal = who.into();
    r.login = if i % 3 == 2 {
        String::new()
    } else {
        who.into()
    };
    r.node = format!("node{}.example.ts.net", i % 3);
    r.node_id = format!("nNODE{}", i % 3);
    if i % 3 == 2 {
        r.tags = vec!["tag:ci".into(), "tag:prod".into()];
    }
    r.ip = format!("100.64.0.{}", i % 3 + 1);
    r.server = ["github", "files"][i % 2].into();
    r.method = "tools/call".into();
    r.tool = ["create_issue", "read_file", "delete_repo"][i % 3].into();
    r.action = format!("tools/call::{}", r.tool);
    r.policy = "resource.mcp_server.vdefault".into();
    r.rule = if effect == Effect::Allow {
        "allow_devs".into()
    } else {
        String::new()
    };
    r.reason = if effect == Effect::Allow {
        "rule allow_devs matched".into()
    } else {
        "no rule allowed it (default deny)".into()
    };
    r.outcome = if effect == Effect::Allow {
        "pending"
    } else {
        "denied"
    }
    .into();
    r.policy_hash = "3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b".into();
    r.explain = json!({"policies": ["resource.mcp_server.vdefault"], "steps": [{"rule": "allow_devs", "outcome": if effect == Effect::Allow {"matched"} else {"no_match"}}]});
    r
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audit");
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("v2.db");
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let mut s = Settings::for_path(&db);
    s.durability = Durability::Normal;
    s.mode = AuditMode::Sync;
    s.gateway = "gw-fixture".into();
    s.retention = Some(Duration::from_secs(365 * 86_400));
    s.redactor = Redactor::new(ArgumentsMode::Full, &[], 4096);
    let log = AuditLog::open(s).unwrap();
    // Three old rows, pruned below: the store starts at an anchor.
    let old = chrono::Utc::now() - chrono::Duration::days(400);
    for i in 0..3 {
        let mut r = rec(i, Kind::Mcp, Effect::Allow);
        r.time = format_time(old + chrono::Duration::seconds(i as i64));
        let id = r.id.clone();
        log.submit(r).unwrap().wait_blocking().unwrap();
        let t = format_time(
            old + chrono::Duration::seconds(i as i64) + chrono::Duration::milliseconds(5),
        );
        log.record_outcome_at(&id, "forwarded", Some(900), t)
            .unwrap()
            .wait_blocking()
            .unwrap();
    }
    assert_eq!(log.prune_now_blocking().unwrap(), 5);
    for i in 0..12 {
        let effect = if i % 4 == 3 {
            Effect::Deny
        } else {
            Effect::Allow
        };
        let kind = if i == 5 {
            Kind::Check
        } else if i == 9 {
            Kind::Identity
        } else {
            Kind::Mcp
        };
        let mut r = rec(i, kind, effect);
        if i == 5 {
            r.outcome = "answered".into();
        }
        if i == 9 {
            r.outcome = "refused".into();
            r.explain = serde_json::Value::Null;
        }
        if i % 2 == 0 {
            log.redactor().apply_arguments(
                &mut r,
                &json!({"title": format!("issue {i}"), "body": "text"}),
            );
        } else {
            log.redactor()
                .apply_arguments(&mut r, &json!({"path": "/srv/x"}));
        }
        let id = r.id.clone();
        log.submit(r).unwrap().wait_blocking().unwrap();
        if effect == Effect::Allow && kind == Kind::Mcp && i != 10 {
            let (o, l, d) = match i % 3 {
                0 => ("forwarded", Some(1200), ""),
                1 => (
                    "upstream_error:timeout",
                    Some(30_000_000),
                    "upstream timed out",
                ),
                _ => ("client_disconnected", Some(55), "caller hung up"),
            };
            log.record_outcome(&id, o, l, d)
                .unwrap()
                .wait_blocking()
                .unwrap();
        }
    }
    log.flush_blocking().unwrap();
    drop(log);
    // Leave one allowed call pending (row 10): the next start marks it `unknown`.
    let rows = Reader::open(&db)
        .unwrap()
        .query(&Filter::default())
        .unwrap();
    let rep = Reader::open(&db).unwrap().verify().unwrap();
    assert!(rep.broken.is_none() && rep.anchor.is_some(), "{rep:?}");
    let mut out = String::new();
    for r in rows {
        out.push_str(&serde_json::to_string(&r).unwrap());
        out.push('\n');
    }
    std::fs::write(dir.join("v2.jsonl"), out).unwrap();
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode = DELETE;")
        .unwrap();
    drop(c);
    for suffix in ["-wal", "-shm", ".lock"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    println!("wrote {} ({} rows verified)", db.display(), rep.rows);
}
