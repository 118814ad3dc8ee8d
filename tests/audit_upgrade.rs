//! A schema-v2 store written by the previous code (tests/fixtures/audit/v2.db) upgrades in place
//! to v3 and then v4 (replay inputs): every logical row survives (the `audit query` keys, byte for byte, but the re-keyed
//! hashes), the retention anchor still accounts for the pruned rows, the keyed chain verifies,
//! and a broken v2 chain is refused rather than re-keyed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use serde_json::Value;
use toolgate::audit::query::{Filter, Reader};
use toolgate::audit::{AuditLog, Settings};
use toolgate::config::Durability;

/// The schema version every upgrade lands on.
const LATEST: i64 = toolgate::audit::migrate::SQLITE.len() as i64;

fn fixture(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audit/v2.db");
    let db = dir.join("audit.db");
    std::fs::copy(src, &db).unwrap();
    db
}

fn settings(db: &Path) -> Settings {
    let mut s = Settings::for_path(db);
    s.durability = Durability::Normal;
    s.gateway = "gw-fixture".into();
    s
}

/// Whether the store's schema has a table, index or trigger called `name`.
fn exists(c: &Connection, name: &str) -> bool {
    c.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .unwrap()
        > 0
}

fn version(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_v2_store_upgrades_in_place_and_keeps_every_logical_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path());
    assert_eq!(version(&db), 2);
    // Before the upgrade, readers say what to do.
    let e = Reader::open(&db).unwrap_err().to_string();
    assert!(e.contains("start toolgate"), "{e}");

    let log = AuditLog::open(settings(&db)).unwrap();
    log.flush_blocking().unwrap();
    drop(log);
    assert_eq!(version(&db), LATEST);
    let c = Connection::open(&db).unwrap();
    assert!(!exists(&c, "events"), "the old table is gone");
    let v2_head: String = c
        .query_row("SELECT value FROM meta WHERE key = 'v2_head'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(v2_head.starts_with("25:"), "{v2_head}");

    let reader = Reader::open(&db).unwrap();
    let rep = reader.verify().unwrap();
    assert!(rep.keyed);
    assert!(rep.broken.is_none(), "{:?}", rep.broken);
    assert_eq!(rep.anchor.as_ref().unwrap().pruned_through_seq, 5);

    let want: Vec<Value> = include_str!("fixtures/audit/v2.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<Value> = reader
        .query(&Filter::default())
        .unwrap()
        .into_iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        let (mut g, mut w) = (
            g.as_object().unwrap().clone(),
            w.as_object().unwrap().clone(),
        );
        for k in ["hash", "prev_hash"] {
            assert_eq!(g[k].as_str().unwrap().len(), 64, "{k}");
            g.remove(k);
            w.remove(k);
        }
        // The call left pending in the fixture was marked at the first start.
        if w["outcome"] == "pending" {
            assert_eq!(g["outcome"], "unknown", "{}", w["id"]);
            g.remove("outcome");
            w.remove("outcome");
        }
        assert_eq!(g, w);
    }
    // Filters work on the upgraded store.
    let f = Filter {
        outcome: Some("upstream_error".into()),
        ..Filter::default()
    };
    let n = want
        .iter()
        .filter(|w| w["outcome"].as_str().unwrap().starts_with("upstream_error"))
        .count();
    assert!(n > 0);
    assert_eq!(reader.query(&f).unwrap().len(), n);
    let f = Filter {
        tag: Some("tag:ci".into()),
        ..Filter::default()
    };
    let n = want
        .iter()
        .filter(|w| w["tags"].as_array().unwrap().iter().any(|t| t == "tag:ci"))
        .count();
    assert_eq!(reader.query(&f).unwrap().len(), n);

    // The upgraded store goes on: new rows chain on after the re-keyed ones.
    let log = AuditLog::open(settings(&db)).unwrap();
    let mut r =
        toolgate::audit::Record::new(toolgate::audit::Kind::Mcp, toolgate::audit::Effect::Deny);
    r.principal = "after@example.com".into();
    log.submit(r).unwrap().wait_blocking().unwrap();
    drop(log);
    let rep = Reader::open(&db).unwrap().verify().unwrap();
    assert!(rep.broken.is_none(), "{:?}", rep.broken);

    // A tampered lookup row after the upgrade breaks the chain.
    let c = Connection::open(&db).unwrap();
    c.execute_batch(
        "DROP TRIGGER names_no_update; UPDATE names SET text = 'mallory@example.com' WHERE text = 'bob@example.com';",
    )
    .unwrap();
    drop(c);
    let rep = Reader::open(&db).unwrap().verify().unwrap();
    assert!(
        rep.broken.is_some(),
        "a renamed principal must break the chain"
    );
}

/// A v3 store (made here by taking v4's additions back out of a fresh store) upgrades to v4 in
/// place: its rows keep their chain, they read as not replayable (no inputs), and new rows
/// carry deduplicated replay inputs.
#[test]
fn a_v3_store_upgrades_to_v4_with_replay_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    for i in 0..3 {
        let mut r = toolgate::audit::Record::new(
            toolgate::audit::Kind::Mcp,
            toolgate::audit::Effect::Allow,
        );
        r.principal = format!("v3-{i}@example.com");
        log.submit(r).unwrap().wait_blocking().unwrap();
    }
    drop(log);
    let c = Connection::open(&db).unwrap();
    c.execute_batch(
        "DROP TRIGGER inputs_no_update; DROP TRIGGER inputs_no_delete; DROP TABLE inputs;
         ALTER TABLE decisions DROP COLUMN principal_input; ALTER TABLE decisions DROP COLUMN resource_input;
         ALTER TABLE decisions DROP COLUMN shadows;
         DROP TABLE rollups; DROP TABLE node_principals;
         PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(c);
    assert_eq!(version(&db), 3);
    let e = Reader::open(&db).unwrap_err().to_string();
    assert!(e.contains("start toolgate"), "{e}");

    let log = AuditLog::open(settings(&db)).unwrap();
    assert_eq!(version(&db), LATEST);
    let rolled: i64 = Connection::open(&db)
        .unwrap()
        .query_row("SELECT sum(calls) FROM rollups", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        rolled, 3,
        "the upgrade built the rollups of the rows it found"
    );
    for i in 0..4 {
        let mut r =
            toolgate::audit::Record::new(toolgate::audit::Kind::Mcp, toolgate::audit::Effect::Deny);
        r.principal = "v4@example.com".into();
        r.inputs = Some(toolgate::audit::record::ReplayInputs {
            principal: r#"{"id":"v4@example.com","roles":["user"]}"#.into(),
            resource: format!(
                r#"{{"id":"gh","kind":"mcp_server","attr":{{"n":{}}}}}"#,
                i % 2
            ),
        });
        log.submit(r).unwrap().wait_blocking().unwrap();
    }
    drop(log);
    let rep = Reader::open(&db).unwrap().verify().unwrap();
    assert!(rep.broken.is_none(), "{:?}", rep.broken);
    let c = Connection::open(&db).unwrap();
    let (old, new): (i64, i64) = c
        .query_row(
            "SELECT count(*) FILTER (WHERE principal_input IS NULL), count(*) FILTER (WHERE principal_input IS NOT NULL) FROM decisions",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((old, new), (3, 4));
    let inputs: i64 = c
        .query_row("SELECT count(*) FROM inputs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        inputs, 3,
        "one principal and two resources, stored once each"
    );
    assert!(
        c.execute("UPDATE inputs SET text = '{}'", []).is_err(),
        "inputs are insert-only"
    );
}

#[test]
fn a_broken_v2_chain_is_refused_not_re_keyed() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path());
    let c = Connection::open(&db).unwrap();
    c.execute_batch(
        "DROP TRIGGER events_no_update; UPDATE events SET principal = 'mallory' WHERE seq = 10;",
    )
    .unwrap();
    drop(c);
    let e = AuditLog::open(settings(&db)).unwrap_err().to_string();
    assert!(e.contains("broken") && e.contains("refusing"), "{e}");
    assert_eq!(version(&db), 2, "the evidence is left as it was");
}

/// A v4 store (v5's column taken back out) upgrades to v5 in place: its rows keep their chain
/// and read with no `decision_id`; a shadow row written after links its decision, and the chain
/// (which hashes the link) verifies; editing the link breaks it.
#[test]
fn a_v4_store_upgrades_to_v5_with_shadow_links() {
    use toolgate::audit::{Effect, Kind, Record};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    let mut live = Record::new(Kind::Mcp, Effect::Allow);
    live.principal = "v4@example.com".into();
    log.submit(live.clone()).unwrap().wait_blocking().unwrap();
    drop(log);
    let c = Connection::open(&db).unwrap();
    c.execute_batch(
        "ALTER TABLE decisions DROP COLUMN shadows; DROP TABLE rollups; DROP TABLE node_principals; PRAGMA user_version = 4;",
    )
    .unwrap();
    drop(c);
    assert_eq!(version(&db), 4);

    let log = AuditLog::open(settings(&db)).unwrap();
    assert_eq!(version(&db), LATEST);
    let mut shadow = Record::new(Kind::Shadow, Effect::Deny);
    shadow.principal = live.principal.clone();
    shadow.decision_id = live.id.clone();
    log.submit(shadow.clone()).unwrap().wait_blocking().unwrap();
    drop(log);
    let r = Reader::open(&db).unwrap();
    assert!(r.verify().unwrap().broken.is_none());
    let rows = r.query(&Filter::default()).unwrap();
    let links: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r.id.as_str(), r.kind.as_str(), r.decision_id.as_str()))
        .collect();
    assert_eq!(
        links,
        [
            (live.id.as_str(), "mcp", ""),
            (shadow.id.as_str(), "shadow", live.id.as_str())
        ]
    );
    drop(r);
    let c = Connection::open(&db).unwrap();
    c.execute_batch(
        "DROP TRIGGER decisions_no_update; UPDATE decisions SET shadows = randomblob(16) WHERE shadows IS NOT NULL;",
    )
    .unwrap();
    drop(c);
    assert!(
        Reader::open(&db)
            .unwrap()
            .verify()
            .unwrap()
            .broken
            .is_some(),
        "the link is part of the chained row"
    );
}

/// A v7 store (its `(node, time)` index back in, v8's `node_principals` taken out) upgrades to
/// v8 in place: the index is dropped, the pairs are built from the rows already there, the
/// writer adds new pairs, `--node` queries read the principal index (or, for a node with
/// several principals, the time index), and the chain still verifies.
#[test]
fn a_v7_store_upgrades_to_v8_with_node_principals() {
    use toolgate::audit::{Effect, Kind, Record};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = AuditLog::open(settings(&db)).unwrap();
    for i in 0..6 {
        let mut r = Record::new(Kind::Mcp, Effect::Allow);
        r.principal = format!("v7-{}@example.com", i % 2);
        r.node = format!("host{}.example.ts.net", i % 2);
        log.submit(r).unwrap().wait_blocking().unwrap();
    }
    drop(log);
    let c = Connection::open(&db).unwrap();
    c.execute_batch(
        "DROP TABLE node_principals; CREATE INDEX decisions_node ON decisions (node, time); PRAGMA user_version = 7;",
    )
    .unwrap();
    drop(c);
    assert_eq!(version(&db), 7);
    let e = Reader::open(&db).unwrap_err().to_string();
    assert!(e.contains("start toolgate"), "{e}");

    let log = AuditLog::open(settings(&db)).unwrap();
    assert_eq!(version(&db), 8);
    // host1 now carries a second principal (as a decision-API caller would); host2 is new.
    for (p, n) in [
        ("asserted@example.com", "host1.example.ts.net"),
        ("v7-0@example.com", "host2.example.ts.net"),
    ] {
        let mut r = Record::new(Kind::Mcp, Effect::Deny);
        r.principal = p.into();
        r.node = n.into();
        log.submit(r).unwrap().wait_blocking().unwrap();
    }
    drop(log);
    let c = Connection::open(&db).unwrap();
    let pairs: Vec<(String, String)> = c
        .prepare(
            "SELECT n.text, p.text FROM node_principals x JOIN names n ON n.id = x.node JOIN names p ON p.id = x.principal ORDER BY 1, 2",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let want = [
        ("host0.example.ts.net", "v7-0@example.com"),
        ("host1.example.ts.net", "asserted@example.com"),
        ("host1.example.ts.net", "v7-1@example.com"),
        ("host2.example.ts.net", "v7-0@example.com"),
    ];
    assert_eq!(
        pairs,
        want.map(|(a, b)| (a.to_string(), b.to_string())),
        "the old rows' pairs and the new ones"
    );
    assert!(!exists(&c, "decisions_node"), "v7's node index is gone");
    assert!(
        exists(&c, "node_principals_no_delete"),
        "the pairs' trigger is there"
    );
    assert!(
        c.execute("DELETE FROM node_principals", []).is_err(),
        "the pairs are insert-only"
    );
    drop(c);
    let reader = Reader::open(&db).unwrap();
    assert!(reader.verify().unwrap().broken.is_none());
    for (node, principal, rows) in [
        ("host0.example.ts.net", None, 3),
        ("host1.example.ts.net", None, 4),
        ("host1.example.ts.net", Some("v7-1@example.com"), 3),
        ("host1.example.ts.net", Some("v7-0@example.com"), 0),
        ("host2.example.ts.net", None, 1),
        ("host2.example.ts.net", Some("v7-1@example.com"), 0),
        ("host9.example.ts.net", None, 0),
    ] {
        let f = Filter {
            node: Some(node.into()),
            principal: principal.map(Into::into),
            ..Filter::default()
        };
        let got = reader.query(&f).unwrap();
        assert_eq!(got.len(), rows, "{node} {principal:?}");
        assert!(got.iter().all(|r| r.node == node));
    }
}
