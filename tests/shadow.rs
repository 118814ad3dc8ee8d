//! Shadow policies (`policies.shadow`) on the real gateway (static identities on 127.0.0.2–4,
//! the sample upstream, the shipped policies, a SQLite audit store): a shadow set that does not
//! load, then is fixed on disk and hot-reloaded, records exactly the decisions the changed set
//! decides differently as chained `shadow` rows (`audit verify` passes; `--shadow-diff` and
//! `/api/audit?shadow=diff` list them, the latter filtered by the read policy); a shadow set
//! that errors on every evaluation leaves every live decision and row exactly as without it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use toolgate::audit::Row;
use toolgate::config::Config;
use toolgate::gateway::Gateway;
use toolgate::{daemon, demo, sample};

/// (ip, server, tool, arguments): the calls of tests/replay.rs.
const CALLS: &[(&str, &str, &str, &str)] = &[
    (
        "127.0.0.2",
        "github",
        "create_issue",
        r#"{"owner":"example","repo":"t","title":"ok"}"#,
    ),
    (
        "127.0.0.2",
        "github",
        "create_issue",
        r#"{"owner":"evil-corp","repo":"x","title":"no"}"#,
    ),
    (
        "127.0.0.2",
        "github",
        "get_issue",
        r#"{"owner":"example","repo":"t","number":1}"#,
    ),
    (
        "127.0.0.3",
        "github",
        "create_issue",
        r#"{"owner":"example","repo":"t","title":"x"}"#,
    ),
    (
        "127.0.0.3",
        "files",
        "read_file",
        r#"{"path":"/srv/work/notes.md"}"#,
    ),
    (
        "127.0.0.4",
        "github",
        "search_repositories",
        r#"{"query":"toolgate"}"#,
    ),
    ("127.0.0.4", "github", "get_issue", "{}"),
];

/// Decisions per round of [`CALLS`]: each call and its `initialize`.
const DECISIONS: u64 = 2 * CALLS.len() as u64;

struct Running {
    gw: Arc<Gateway>,
    audit: toolgate::audit::AuditLog,
    base: String,
    db: PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Running {
    async fn stop(self) {
        self.audit.flush().await.unwrap();
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }

    async fn rows(&self) -> Vec<Row> {
        self.audit.flush().await.unwrap();
        toolgate::audit::query::query(&self.db, &Default::default()).unwrap()
    }

    /// The value of one metric sample (0 when absent).
    fn metric(&self, sample: &str) -> u64 {
        let text = self.gw.prometheus();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `sample` reaches `want` (the shadow thread works off the request path).
    async fn wait_metric(&self, sample: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.metric(sample) < want {
            assert!(
                Instant::now() < deadline,
                "{sample} never reached {want}:\n{}",
                self.gw.prometheus()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(self.metric(sample), want, "{sample}");
    }

    /// Makes [`CALLS`] (each after an `initialize`); returns each call's decision id.
    async fn calls(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for (i, (ip, server, tool, args)) in CALLS.iter().enumerate() {
            let client = client(ip);
            let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "shadow-test", "version": "1"}}});
            support::mcp_client::rpc(&client, &self.base, server, init).await;
            let args: Value = serde_json::from_str(args).unwrap();
            let body = json!({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": {"name": tool, "arguments": args}});
            let id = support::mcp_client::rpc(&client, &self.base, server, body).await;
            assert!(!id.is_empty(), "call {i} has a decision id");
            ids.push(id);
        }
        ids
    }
}

fn client(ip: &str) -> reqwest::Client {
    let ip: IpAddr = ip.parse().unwrap();
    reqwest::Client::builder()
        .local_address(ip)
        .build()
        .unwrap()
}

/// Writes the demo's files into `dir` (with `policies.shadow: shadow` when `shadow`) and
/// starts the real gateway on them.
async fn start(dir: &Path, shadow: bool) -> Running {
    let upstream = sample::spawn(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Arc::new(sample::Counters::default()),
    )
    .await
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config_path = demo::write_files(dir, port, upstream).unwrap();
    if shadow {
        let text = std::fs::read_to_string(&config_path).unwrap();
        assert!(text.contains("  dir: policies\n"));
        std::fs::write(
            &config_path,
            text.replace("  dir: policies\n", "  dir: policies\n  shadow: shadow\n"),
        )
        .unwrap();
    }
    let cfg = Config::load(&config_path).unwrap();
    let listen = daemon::resolve_listen(&cfg, &[]).unwrap();
    let identify = daemon::static_provider(&cfg, &listen).unwrap();
    let db = dir.join(&cfg.audit.sqlite);
    let built = daemon::build(cfg, identify, &daemon::NodeInfo::default(), listen, None).unwrap();
    let audit = built.audit.clone();
    let gw = built.gateway.clone();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(daemon::run(built, stop_rx));
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Running {
        gw,
        audit,
        base,
        db,
        stop,
        task,
    }
}

/// A set whose one rule matches every action and role and errors on every evaluation.
const ERRORING: &str = r#"apiVersion: api.cerbos.dev/v1
resourcePolicy:
  resource: mcp_server
  version: default
  rules:
    - name: always_errors
      actions: ["*"]
      effect: EFFECT_ALLOW
      roles: ["*"]
      condition:
        match:
          expr: R.attr.no_such_attribute.deeper == 1
"#;

fn toolgate(args: &[&str], db: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// What a live row decided: (effect, policy, rule, reason, outcome).
fn decided(r: &Row) -> (String, String, String, String, String) {
    (
        r.effect.clone(),
        r.policy.clone(),
        r.rule.clone(),
        r.reason.clone(),
        r.outcome.clone(),
    )
}

fn by_id<'a>(rows: &'a [Row], id: &str) -> &'a Row {
    rows.iter().find(|r| r.id == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_rows_record_exactly_the_differences_and_follow_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let shadow = dir.path().join("shadow");
    std::fs::create_dir_all(&shadow).unwrap();
    std::fs::write(shadow.join("broken.yaml"), "apiVersion: [not a policy\n").unwrap();
    let gw = start(dir.path(), true).await;

    // A shadow set that does not load: the gateway serves, nothing is shadow-evaluated.
    assert_eq!(gw.metric("toolgate_shadow_loaded"), 0);
    let first = gw.calls().await;
    assert_eq!(
        gw.metric("toolgate_shadow_skipped_total{reason=\"not_loaded\"}"),
        DECISIONS
    );

    // Fixed on disk (swapped in whole): the watcher reloads it.
    let next = dir.path().join("next");
    support::candidate::candidate(&dir.path().join("policies"), &next);
    std::fs::remove_dir_all(&shadow).unwrap();
    std::fs::rename(&next, &shadow).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.metric("toolgate_shadow_loaded") != 1 {
        assert!(Instant::now() < deadline, "{}", gw.gw.prometheus());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids = gw.calls().await;
    gw.wait_metric("toolgate_shadow_evaluations_total{result=\"same\"}", 10)
        .await;
    gw.wait_metric("toolgate_shadow_evaluations_total{result=\"differs\"}", 4)
        .await;
    assert_eq!(
        gw.metric("toolgate_shadow_evaluations_total{result=\"error\"}"),
        0
    );
    let rows = gw.rows().await;

    // The live decisions did not change with the shadow set.
    for (a, b) in first.iter().zip(&ids) {
        assert_eq!(decided(by_id(&rows, a)), decided(by_id(&rows, b)));
    }

    // Exactly the four differences of tests/replay.rs, each linked to its decision, after it.
    let shadows: Vec<&Row> = rows.iter().filter(|r| r.kind == "shadow").collect();
    let mut got: Vec<(String, String, String, String)> = shadows
        .iter()
        .map(|s| {
            let live = by_id(&rows, &s.decision_id);
            assert!(live.seq < s.seq, "a shadow row follows its decision");
            assert_eq!(
                (&s.principal, &s.server, &s.tool, &s.action),
                (&live.principal, &live.server, &live.tool, &live.action)
            );
            assert_eq!(s.explain["live"]["effect"], live.effect.as_str());
            assert_eq!(s.explain["live"]["rule"], live.rule.as_str());
            assert_ne!(s.effect, live.effect);
            assert_ne!(
                s.policy_hash, live.policy_hash,
                "the shadow snapshot's hash"
            );
            (
                s.decision_id.clone(),
                live.effect.clone(),
                s.effect.clone(),
                s.rule.clone(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (ids[0].clone(), "allow".into(), "deny".into(), String::new()),
        (
            ids[3].clone(),
            "deny".into(),
            "allow".into(),
            "bob_may_file_issues".into(),
        ),
        (ids[5].clone(), "allow".into(), "deny".into(), String::new()),
        (ids[6].clone(), "allow".into(), "deny".into(), String::new()),
    ];
    want.sort();
    assert_eq!(got, want);

    // /api/audit?shadow=diff, as bob: only his own difference (the read policy), as a diff.
    let page = client("127.0.0.3")
        .get(format!("{}/api/audit?shadow=diff", gw.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let page: Value = serde_json::from_str(&page).unwrap();
    let bob = by_id(&rows, &ids[3]);
    assert_eq!(
        page["rows"],
        json!([{
            "decision_id": ids[3],
            "time": shadows.iter().find(|s| s.decision_id == ids[3]).unwrap().time,
            "principal": "bob@example.com",
            "server": "github",
            "tool": "create_issue",
            "action": "tools/call::create_issue",
            "live": {"effect": "deny", "policy": bob.policy, "rule": bob.rule},
            "shadow": {"effect": "allow", "policy": "resource.mcp_server.vdefault", "rule": "bob_may_file_issues"},
            "shadow_id": shadows.iter().find(|s| s.decision_id == ids[3]).unwrap().id,
            "shadow_policy_hash": shadows[0].policy_hash,
        }]),
        "{page}"
    );
    assert_eq!(page["withheld"], 3, "{page}");
    gw.stop().await;

    // The chain verifies with the shadow rows in it.
    let (code, out) = toolgate(&["audit", "verify"], &gw_db(dir.path()));
    assert_eq!(code, 0, "{out}");

    // `audit query --shadow-diff`, exactly.
    let (code, out) = toolgate(
        &["audit", "query", "--shadow-diff", "--format", "csv"],
        &gw_db(dir.path()),
    );
    assert_eq!(code, 0, "{out}");
    let mut expected = vec![
        "decision_id,time,principal,server,tool,action,live_effect,live_policy,live_rule,shadow_effect,shadow_policy,shadow_rule".to_string(),
    ];
    let mut in_order = shadows.clone();
    in_order.sort_by_key(|s| s.seq);
    for s in &in_order {
        let live = by_id(&rows, &s.decision_id);
        expected.push(format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            s.decision_id,
            s.time,
            live.principal,
            live.server,
            live.tool,
            live.action,
            live.effect,
            live.policy,
            live.rule,
            s.effect,
            s.policy,
            s.rule
        ));
    }
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "{out}");
    // The same as one JSON object per line.
    let (code, out) = toolgate(
        &["audit", "query", "--shadow-diff", "--format", "jsonl"],
        &gw_db(dir.path()),
    );
    assert_eq!(code, 0, "{out}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines.iter().any(|l| l["decision_id"] == ids[3].as_str()
        && l["shadow"]["rule"] == "bob_may_file_issues"
        && l["live"]["effect"] == "deny"));

    // Nor does `audit stats`, unless asked for them.
    let (code, out) = toolgate(&["audit", "stats", "--format", "json"], &gw_db(dir.path()));
    assert_eq!(code, 0, "{out}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["decisions"], 2 * DECISIONS + 1, "{out}");
    let (code, out) = toolgate(
        &["audit", "stats", "--kind", "shadow", "--format", "json"],
        &gw_db(dir.path()),
    );
    assert_eq!(code, 0, "{out}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["decisions"], 4, "{out}");

    // Replay does not count shadow rows as decisions: the same set changes nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["policy", "replay", "--format", "json", "--db"])
        .arg(gw_db(dir.path()))
        .arg("--policies")
        .arg(dir.path().join("policies"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Both rounds and the `/api/audit` request; the four shadow rows are not decisions.
    assert_eq!(report["decisions"], 2 * DECISIONS + 1, "{report}");
}

fn gw_db(dir: &Path) -> PathBuf {
    dir.join("audit.db")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_set_that_errors_on_every_evaluation_leaves_live_decisions_alone() {
    // Without a shadow set.
    let plain = tempfile::tempdir().unwrap();
    let gw = start(plain.path(), false).await;
    let ids = gw.calls().await;
    let without = gw.rows().await;
    gw.stop().await;

    // With a shadow set that loads and errors on every evaluation.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("shadow")).unwrap();
    std::fs::write(dir.path().join("shadow/errors.yaml"), ERRORING).unwrap();
    let gw = start(dir.path(), true).await;
    assert_eq!(gw.metric("toolgate_shadow_loaded"), 1);
    let shadowed = gw.calls().await;
    gw.wait_metric(
        "toolgate_shadow_evaluations_total{result=\"error\"}",
        DECISIONS,
    )
    .await;
    assert_eq!(
        gw.metric("toolgate_shadow_evaluations_total{result=\"differs\"}"),
        0
    );
    let with = gw.rows().await;
    gw.stop().await;

    // Same rows, same decisions, no shadow rows.
    assert_eq!(with.len(), without.len());
    assert!(with.iter().all(|r| r.kind != "shadow"));
    let shape = |rows: &[Row]| -> Vec<_> {
        rows.iter()
            .map(|r| (r.kind.clone(), r.action.clone(), decided(r)))
            .collect()
    };
    assert_eq!(shape(&with), shape(&without));
    for (a, b) in ids.iter().zip(&shadowed) {
        assert_eq!(decided(by_id(&without, a)), decided(by_id(&with, b)));
    }
    let (code, out) = toolgate(&["audit", "verify"], &gw_db(dir.path()));
    assert_eq!(code, 0, "{out}");
}
