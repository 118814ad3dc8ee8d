//! `toolgate policy replay` against stores filled by the real gateway (static identities on
//! 127.0.0.2–4, the sample upstream, the shipped policies, a SQLite audit store), replayed
//! under the same policies (nothing changes) and under a changed set (exactly the expected
//! changes). With `audit.arguments: digest`, a row needs its arguments exactly when the
//! candidate's consulted rules read them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::{Value, json};
use toolgate::config::Config;
use toolgate::{daemon, demo, sample};

/// (who, ip, server, tool, arguments)
const CALLS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "alice",
        "127.0.0.2",
        "github",
        "create_issue",
        r#"{"owner":"example","repo":"t","title":"ok"}"#,
    ),
    (
        "alice",
        "127.0.0.2",
        "github",
        "create_issue",
        r#"{"owner":"evil-corp","repo":"x","title":"no"}"#,
    ),
    (
        "alice",
        "127.0.0.2",
        "github",
        "get_issue",
        r#"{"owner":"example","repo":"t","number":1}"#,
    ),
    (
        "bob",
        "127.0.0.3",
        "github",
        "create_issue",
        r#"{"owner":"example","repo":"t","title":"x"}"#,
    ),
    (
        "bob",
        "127.0.0.3",
        "files",
        "read_file",
        r#"{"path":"/srv/work/notes.md"}"#,
    ),
    (
        "ci",
        "127.0.0.4",
        "github",
        "search_repositories",
        r#"{"query":"toolgate"}"#,
    ),
    ("ci", "127.0.0.4", "github", "get_issue", "{}"),
];

/// Runs the real gateway with `arguments` mode over the shipped policies, makes [`CALLS`], and
/// returns the store and each call's decision id.
async fn fill(dir: &Path, arguments: &str) -> (PathBuf, Vec<String>) {
    let counters = Arc::new(sample::Counters::default());
    let upstream = sample::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), counters)
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config_path = demo::write_files(dir, port, upstream).unwrap();
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(text.contains("arguments: redacted"));
    std::fs::write(
        &config_path,
        text.replace("arguments: redacted", &format!("arguments: {arguments}")),
    )
    .unwrap();
    let cfg = Config::load(&config_path).unwrap();
    let listen = daemon::resolve_listen(&cfg, &[]).unwrap();
    let identify = daemon::static_provider(&cfg, &listen).unwrap();
    let db = cfg.audit.sqlite.clone();
    let built = daemon::build(cfg, identify, &daemon::NodeInfo::default(), listen, None).unwrap();
    let audit = built.audit.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(daemon::run(built, stop_rx));
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway never answered"
        );
        tokio::task::yield_now().await;
    }
    let mut ids = Vec::new();
    for (i, (_, ip, server, tool, args)) in CALLS.iter().enumerate() {
        let ip: IpAddr = ip.parse().unwrap();
        let client = reqwest::Client::builder()
            .local_address(ip)
            .build()
            .unwrap();
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "replay-test", "version": "1"}}});
        support::mcp_client::rpc(&client, &base, server, init).await;
        let args: Value = serde_json::from_str(args).unwrap();
        let body = json!({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": {"name": tool, "arguments": args}});
        let id = support::mcp_client::rpc(&client, &base, server, body).await;
        assert!(!id.is_empty(), "call {i} has a decision id");
        ids.push(id);
    }
    audit.flush().await.unwrap();
    stop_tx.send(true).unwrap();
    server.await.unwrap().unwrap();
    (dir.join(db), ids)
}

/// `policy replay` in `format`, checked against the same replay without the memo (every row
/// evaluated): the reports are identical but for the timing.
fn replay(db: &Path, policies: &Path, format: &str) -> (i32, String) {
    let (code, out) = replay_once(db, policies, format, false);
    let (code_all, out_all) = replay_once(db, policies, format, true);
    assert_eq!(
        (code, comparable(format, &out)),
        (code_all, comparable(format, &out_all)),
        "the memo changes the report"
    );
    (code, out)
}

fn replay_once(db: &Path, policies: &Path, format: &str, no_memo: bool) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["policy", "replay", "--db"])
        .arg(db)
        .arg("--policies")
        .arg(policies)
        .args(["--format", format])
        .args(if no_memo { &["--no-memo"][..] } else { &[] })
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() != Some(3), "replay failed: {stderr}");
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// A report without what differs between runs (the elapsed time).
fn comparable(format: &str, out: &str) -> String {
    let strip = |mut v: Value| {
        if let Some(o) = v.as_object_mut() {
            o.remove("elapsed_ms");
            if let Some(s) = o.get_mut("summary").and_then(Value::as_object_mut) {
                s.remove("elapsed_ms");
            }
        }
        v.to_string()
    };
    match format {
        "table" => out.lines().skip(1).collect::<Vec<_>>().join("\n"),
        "json" => strip(serde_json::from_str(out).unwrap()),
        _ => out
            .lines()
            .map(|l| strip(serde_json::from_str(l).unwrap()))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn lines(out: &str) -> (Vec<Value>, Value) {
    let mut v: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = v.pop().unwrap()["summary"].clone();
    (v, summary)
}

/// (status, decision id) of every reported row.
fn reported(rows: &[Value]) -> BTreeSet<(String, String)> {
    rows.iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn want(ids: &[String], which: &[(&str, usize)]) -> BTreeSet<(String, String)> {
    which
        .iter()
        .map(|(s, i)| (s.to_string(), ids[*i].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reports_exactly_the_changes_of_a_policy_edit() {
    let dir = tempfile::tempdir().unwrap();
    let (db, ids) = fill(dir.path(), "redacted").await;
    let policies = dir.path().join("policies");
    let next = dir.path().join("next");
    support::candidate::candidate(&policies, &next);

    // The same policies: every replayable row decides as recorded.
    let (code, out) = replay(&db, &policies, "jsonl");
    let (rows, s) = lines(&out);
    assert_eq!(code, 0, "{out}");
    assert!(rows.is_empty(), "{out}");
    assert_eq!(s["changed"], 0);
    assert_eq!(s["needs_arguments"], 0);
    // Every tools/call row and its initialize row are replayed.
    assert!(
        s["replayed"].as_u64().unwrap() >= 2 * CALLS.len() as u64,
        "{s}"
    );

    // The candidate: exactly these changes, and nothing needs arguments (redacted arguments
    // without secrets are the arguments as sent: their digest is the recorded one).
    let (code, out) = replay(&db, &next, "jsonl");
    assert_eq!(code, 1, "{out}");
    let (rows, s) = lines(&out);
    assert_eq!(
        reported(&rows),
        want(
            &ids,
            &[
                ("allow_to_deny", 0),
                ("deny_to_allow", 3),
                ("allow_to_deny", 5),
                ("allow_to_deny", 6),
            ]
        ),
        "{out}"
    );
    assert_eq!(
        (s["changed"].as_u64(), s["needs_arguments"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(s["allow_to_deny"], 3);
    assert_eq!(s["deny_to_allow"], 1);
    let bob = rows.iter().find(|r| r["id"] == ids[3].as_str()).unwrap();
    assert_eq!(bob["now"]["rule"], "bob_may_file_issues");
    assert_eq!(bob["principal"], "bob@example.com");
    assert_eq!(bob["tool"], "create_issue");

    // The grouped report: by direction, principal, tool and the rule that now decides.
    let (code, out) = replay(&db, &next, "json");
    assert_eq!(code, 1);
    let r: Value = serde_json::from_str(&out).unwrap();
    let groups = r["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 4, "{out}");
    assert_eq!(groups[0]["direction"], "deny_to_allow", "deny→allow first");
    let ci: Vec<&Value> = groups
        .iter()
        .filter(|g| g["principal"] == "ci-runner.example.ts.net")
        .collect();
    assert_eq!(ci.len(), 2, "search_repositories and get_issue: {out}");
    assert!(
        ci.iter()
            .all(|g| g["count"] == 1 && g["direction"] == "allow_to_deny")
    );
    let (code, table) = replay(&db, &next, "table");
    assert_eq!(code, 1);
    assert!(
        table.contains("deny→allow") && table.contains("bob_may_file_issues"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_mode_needs_arguments_exactly_where_the_rules_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let (db, ids) = fill(dir.path(), "digest").await;
    let policies = dir.path().join("policies");
    let next = dir.path().join("next");
    support::candidate::candidate(&policies, &next);

    // The same policies: alice's create_issue calls (github_write_own_org reads the owner) and
    // bob's read_file (files_in_workspace reads the path) need their arguments; the rest
    // replays as recorded, ci's get_issue too (its `{}` matches the recorded digest).
    let (code, out) = replay(&db, &policies, "jsonl");
    let (rows, s) = lines(&out);
    assert_eq!(code, 0, "{out}");
    let needs = want(
        &ids,
        &[
            ("needs_arguments", 0),
            ("needs_arguments", 1),
            ("needs_arguments", 4),
        ],
    );
    assert_eq!(reported(&rows), needs, "{out}");
    assert_eq!(s["changed"], 0);

    // The candidate: the changes that do not depend on arguments are reported as changes
    // (CI loses reads, bob may file issues); alice's own-org issue, whose change comes from
    // the renamed organisation compared with her arguments, needs them.
    let (code, out) = replay(&db, &next, "jsonl");
    assert_eq!(code, 1, "{out}");
    let (rows, s) = lines(&out);
    let mut expected = needs;
    expected.extend(want(
        &ids,
        &[
            ("deny_to_allow", 3),
            ("allow_to_deny", 5),
            ("allow_to_deny", 6),
        ],
    ));
    assert_eq!(reported(&rows), expected, "{out}");
    assert_eq!(s["needs_arguments"], 3);
    assert_eq!(s["changed"], 3);
}

fn toolgate(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// `audit export --since T --out FILE` of a real store, then `audit verify` on the file.
fn export(db: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let key = db.parent().unwrap().join("audit.key");
    let mut args = vec![
        os("audit"),
        os("export"),
        os("--db"),
        db.as_os_str(),
        os("--key"),
        key.as_os_str(),
        os("--out"),
        out.as_os_str(),
    ];
    args.extend(extra.iter().map(|s| os(s)));
    toolgate(&args)
}

fn verify(db: &Path, key: &Path) -> (i32, String, String) {
    toolgate(&[
        os("audit"),
        os("verify"),
        os("--db"),
        db.as_os_str(),
        os("--key"),
        key.as_os_str(),
    ])
}

/// `policy replay ... --since T --format json` with the run-dependent fields dropped.
fn replay_since(db: &Path, policies: &Path, since: &str) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["policy", "replay", "--db"])
        .arg(db)
        .arg("--policies")
        .arg(policies)
        .args(["--since", since, "--format", "jsonl"])
        .output()
        .unwrap();
    assert!(
        out.status.code() != Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (rows, mut s) = lines(&text);
    for k in ["db", "elapsed_ms"] {
        s.as_object_mut().unwrap().remove(k);
    }
    (
        out.status.code().unwrap(),
        json!({"summary": s, "rows": rows}),
        text,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_slice_verifies_and_replays_like_its_window_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (db, ids) = fill(dir.path(), "redacted").await;
    let key = dir.path().join("audit.key");
    let policies = dir.path().join("policies");
    let next = dir.path().join("next");
    support::candidate::candidate(&policies, &next);
    // The window starts at the third call: the slice does not start at the chain's genesis.
    let (code, row, err) = toolgate(&[
        os("audit"),
        os("query"),
        os("--db"),
        db.as_os_str(),
        os("--id"),
        os(&ids[2]),
        os("--format"),
        os("jsonl"),
    ]);
    assert_eq!(code, 0, "{err}");
    let row: Value = serde_json::from_str(row.trim()).unwrap();
    let since = row["time"].as_str().unwrap().to_string();
    assert!(row["seq"].as_i64().unwrap() > 1, "{row}");

    let out = dir.path().join("slice.db");
    let (code, said, err) = export(&db, &out, &["--since", &since, "--arguments", "redacted"]);
    assert_eq!(code, 0, "{said}{err}");
    assert!(said.contains("every row keeps its source hash"), "{said}");
    let (code, said, err) = verify(&out, &key);
    assert_eq!(code, 0, "{said}{err}");
    assert!(
        said.contains("chain intact") && said.contains("anchored"),
        "{said}"
    );

    // The same report from the slice as from the store over the same window, with exactly the
    // changes of the calls in it.
    let (code_src, from_store, text) = replay_since(&db, &next, &since);
    assert_eq!(code_src, 1, "{text}");
    let (code_out, from_slice, text) = replay_since(&out, &next, &since);
    assert_eq!(code_out, 1, "{text}");
    assert_eq!(from_store, from_slice);
    let (rows, _) = lines(&text);
    assert_eq!(
        reported(&rows),
        want(
            &ids,
            &[
                ("deny_to_allow", 3),
                ("allow_to_deny", 5),
                ("allow_to_deny", 6),
            ]
        ),
        "{text}"
    );
    // Without --since the slice holds nothing earlier than the window.
    let (_, all, _) = replay_since(&out, &next, "2000-01-01");
    assert_eq!(
        all["summary"]["decisions"],
        from_slice["summary"]["decisions"]
    );

    // An existing file is not replaced without --force; bad windows are usage errors.
    let (code, _, err) = export(&db, &out, &["--since", &since]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--force"), "{err}");
    let (code, _, err) = export(&db, &dir.path().join("x.db"), &["--since", "7x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--since"), "{err}");
    let (code, _, err) = export(&db, &dir.path().join("x.db"), &["--since", "2099-01-01"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no decisions in the window"), "{err}");
    assert!(!dir.path().join("x.db").exists());

    // Stricter redaction (digest: no arguments) re-links the chain with the key: the file still
    // verifies, and replay reports what now needs arguments.
    let (code, said, err) = export(
        &db,
        &out,
        &["--since", &since, "--arguments", "digest", "--force"],
    );
    assert_eq!(code, 0, "{said}{err}");
    assert!(said.contains("redacted further than stored"), "{said}");
    let (code, said, err) = verify(&out, &key);
    assert_eq!(code, 0, "{said}{err}");
    let c = rusqlite::Connection::open(&out).unwrap();
    let kept: i64 = c
        .query_row(
            "SELECT count(*) FROM decisions WHERE arguments IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept, 0);

    // A tampered export fails verify.
    c.execute_batch(
        "DROP TRIGGER decisions_no_update; UPDATE decisions SET effect = 1 - effect WHERE seq = (SELECT max(seq) FROM decisions);",
    )
    .unwrap();
    drop(c);
    let (code, said, _) = verify(&out, &key);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("BROKEN"), "{said}");

    // A tampered store is refused, never re-signed into a clean export.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "DROP TRIGGER decisions_no_update; UPDATE decisions SET effect = 1 - effect WHERE seq = (SELECT max(seq) FROM decisions);",
    )
    .unwrap();
    drop(c);
    let bad = dir.path().join("bad.db");
    let (code, _, err) = export(&db, &bad, &["--since", &since]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("source chain breaks"), "{err}");
    assert!(!bad.exists());
}

/// A candidate whose answer depends on the time: every decision is evaluated at its recorded
/// time, so identical inputs at different times get different answers (the memo never reuses
/// an answer that read the clock; `replay` checks the memo-less run gives the same report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_reading_candidate_replays_each_decision_at_its_recorded_time() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = fill(dir.path(), "redacted").await;
    // The initialize rows (alice's three share one input), oldest first: (id, time).
    let c = rusqlite::Connection::open(&db).unwrap();
    let mut st = c
        .prepare(
            "SELECT d.id, d.time, p.text FROM decisions d JOIN names a ON a.id = d.action \
             JOIN names p ON p.id = d.principal WHERE a.text = 'initialize' ORDER BY d.seq",
        )
        .unwrap();
    let rows: Vec<(String, i64, String)> = st
        .query_map([], |r| {
            let id: Vec<u8> = r.get(0)?;
            Ok((
                uuid::Uuid::from_slice(&id)
                    .unwrap()
                    .hyphenated()
                    .to_string(),
                r.get(1)?,
                r.get(2)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    drop(st);
    // Alice's three share the memo's key (inputs, action, arguments digest): only the time
    // tells them apart.
    let keys: BTreeSet<(i64, i64, Option<Vec<u8>>)> = c
        .prepare(
            "SELECT d.principal_input, d.resource_input, d.args_digest FROM decisions d \
             JOIN names a ON a.id = d.action JOIN names p ON p.id = d.principal \
             WHERE a.text = 'initialize' AND p.text LIKE 'alice%'",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    drop(c);
    let alice: Vec<&(String, i64, String)> =
        rows.iter().filter(|r| r.2.starts_with("alice")).collect();
    assert_eq!(alice.len(), 3, "{rows:?}");
    // Sessions may be opened until alice's second one: it and every later one now deny.
    let cut = alice[1].1;
    assert!(alice[0].1 < cut, "{rows:?}");
    let at = chrono::DateTime::from_timestamp_micros(cut)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let policies = dir.path().join("policies");
    let timed = dir.path().join("timed");
    support::candidate::candidate(&policies, &timed);
    let p = timed.join("mcp_server.yaml");
    let t = std::fs::read_to_string(&p).unwrap();
    assert!(t.contains("actions: [initialize, ping,"));
    let t = t.replacen("actions: [initialize, ping,", "actions: [ping,", 1).replacen(
        "  rules:\n",
        &format!(
            "  rules:\n    - name: sessions_until\n      actions: [initialize]\n      effect: EFFECT_ALLOW\n      roles: [user, tagged]\n      condition:\n        match:\n          expr: now() < timestamp(\"{at}\")\n"
        ),
        1,
    );
    std::fs::write(&p, t).unwrap();

    let (code, out) = replay(&db, &timed, "jsonl");
    assert_eq!(code, 1, "{out}");
    let (changed, _) = lines(&out);
    let initialize: BTreeSet<(String, String)> = reported(&changed)
        .into_iter()
        .filter(|(_, id)| rows.iter().any(|r| &r.0 == id))
        .collect();
    let expected: BTreeSet<(String, String)> = rows
        .iter()
        .filter(|r| r.1 >= cut)
        .map(|r| ("allow_to_deny".to_string(), r.0.clone()))
        .collect();
    assert_eq!(initialize, expected, "{out}");
    assert!(expected.contains(&("allow_to_deny".to_string(), alice[2].0.clone())));
    assert!(!initialize.iter().any(|(_, id)| id == &alice[0].0));
    let (code, out) = replay(&db, &timed, "json");
    assert_eq!(code, 1, "{out}");
}
