//! End to end with real MCP peers through the gateway (issue 5, part 8.1 and 8.2), loopback only:
//!
//! - 8.1: the official Python client (PyPI `mcp` 2.3.x, protocol 2026-07-28) against a Python
//!   `MCPServer` (tests/peers/py_server.py);
//! - 8.2: the official TypeScript client (npm `@modelcontextprotocol/sdk` 1.32.x, protocol
//!   2025-11-25 with sessions) against npm `@modelcontextprotocol/server-everything`, bound to
//!   127.0.0.1 by tests/peers/everything-shim.cjs.
//!
//! toolgate runs in process (`daemon::build` + `daemon::run`) with the static identity provider:
//! each client binds its own loopback source address, which is its identity (alice 127.0.0.2,
//! bob 127.0.0.3, ci 127.0.0.4, nobody 127.0.0.9). The fake LocalAPI is not used here: in the
//! userspace-networking model it reproduces, a loopback peer resolves only by its exact
//! ip:port, which a test cannot register before an SDK client picks its source port.
//!
//! Scenarios: an allowed call works; a denied tool is hidden from tools/list and refused with
//! `-32602 Unknown tool`; an argument-level deny answers an `isError` result naming the decision
//! id; tools/list is filtered per identity; an unknown caller gets 403; the audit rows are exact
//! (every response's decision id is a row, and every row is one of them); the upstream saw
//! exactly the allowed calls.
//!
//! - the aggregated endpoint `/mcp` in front of the Python server: a cancel for a call still
//!   streaming its answer reaches the server, which cancels the tool; a client asking for
//!   the stateless era still gets working calls;
//! - key smuggling (issue 13): a Go MCP server on `encoding/json` (tests/peers/go), the real
//!   case-insensitive decoder, behind toolgate (tests/peers/go_upstream.rs); and, with the
//!   same peer, that a full audit store forwards no message of any kind.
//!
//! The peers are installed by `scripts/peers-mcp`. Without them each test prints a SKIP line,
//! or fails when `TOOLGATE_REQUIRE_PEERS=1`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

#[path = "peers/go_upstream.rs"]
mod go_upstream;
#[path = "peers/harness.rs"]
mod harness;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{ALICE, BOB, CI, Gateway, NOBODY, Proc, principal_of, repo_root};
use serde_json::{Value, json};

const MCP_PY_VERSION: &str = "2.3.0";
const NODE_PEERS: &str = "mcp-node-1.32.2-2026.8.31";

struct Peers {
    python: PathBuf,
    node_modules: PathBuf,
}

/// The installed peers, or `None` after printing why this test is skipped.
fn peers(test: &str) -> Option<Peers> {
    let cache = std::env::var_os("TOOLGATE_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/toolgate-peers")
        });
    let python = std::env::var_os("TOOLGATE_MCP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join(format!("mcp-python-{MCP_PY_VERSION}/bin/python")));
    let node_modules = std::env::var_os("TOOLGATE_MCP_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join(NODE_PEERS).join("node_modules"));
    // The install script writes `.installed` last: without it an install is incomplete.
    let python_ok = python.exists()
        && python
            .parent()
            .and_then(Path::parent)
            .is_some_and(|d| d.join(".installed").exists());
    let node_ok = node_modules
        .join("@modelcontextprotocol/server-everything/dist/index.js")
        .exists()
        && node_modules
            .parent()
            .is_some_and(|d| d.join(".installed").exists());
    let node_bin = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if python_ok && node_ok && node_bin {
        return Some(Peers {
            python,
            node_modules,
        });
    }
    let why = format!(
        "MCP peers not installed (python {}: {python_ok}, node_modules {}: {node_ok}, node on PATH: {node_bin}); run scripts/peers-mcp",
        python.display(),
        node_modules.display()
    );
    if std::env::var("TOOLGATE_REQUIRE_PEERS").as_deref() == Ok("1") {
        panic!("{test}: {why} (TOOLGATE_REQUIRE_PEERS=1)");
    }
    // Straight to the process's stderr: libtest captures `eprintln!`, and a skip must show.
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: {why}; set TOOLGATE_REQUIRE_PEERS=1 to fail instead"
    );
    None
}

/// Local addresses listening on `port` (from /proc/net/tcp and tcp6), as `ip` text.
fn listening_on(port: u16) -> Vec<String> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // 0A = LISTEN
            if f.len() < 4 || f[3] != "0A" {
                continue;
            }
            let Some((ip_hex, port_hex)) = f[1].split_once(':') else {
                continue;
            };
            if u16::from_str_radix(port_hex, 16).ok() != Some(port) {
                continue;
            }
            let bytes: Vec<u8> = (0..ip_hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(&ip_hex[2 * i..2 * i + 2], 16).ok())
                .collect();
            // The kernel prints each 32-bit word in host (little-endian) order.
            let fixed: Vec<u8> = bytes
                .chunks(4)
                .flat_map(|w| w.iter().rev().copied().collect::<Vec<_>>())
                .collect();
            let ip = if v6 {
                let mut a = [0u8; 16];
                a.copy_from_slice(&fixed[..16]);
                std::net::Ipv6Addr::from(a).to_string()
            } else {
                std::net::Ipv4Addr::new(fixed[0], fixed[1], fixed[2], fixed[3]).to_string()
            };
            out.push(ip);
        }
    }
    out
}

/// Runs one peer client with `spec` and returns its JSON report.
async fn run_client(program: &Path, script: &str, spec: &Value, env: &[(&str, &Path)]) -> Value {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(repo_root().join("tests/peers").join(script))
        .arg(spec.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within 60 s"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON report ({e}); status {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The JSON lines of an upstream execution log, as (name, arguments).
fn executed(log: &Path) -> Vec<(String, Value)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["name"].as_str().unwrap().to_string(),
                v["arguments"].clone(),
            )
        })
        .collect()
}

fn tools(step: &Value) -> Vec<String> {
    step["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list step: {step}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn text(step: &Value) -> String {
    step["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text result: {step}"))
        .to_string()
}

fn assert_allowed(step: &Value, want_text: &str) {
    assert!(step.get("error").is_none(), "allowed call failed: {step}");
    assert_ne!(step["result"]["isError"], json!(true), "{step}");
    assert_eq!(text(step), want_text, "{step}");
}

fn assert_unknown_tool(step: &Value, tool: &str) {
    assert_eq!(step["error"]["code"], -32602, "{step}");
    assert_eq!(
        step["error"]["message"],
        format!("Unknown tool: {tool}"),
        "{step}"
    );
}

/// An argument-level deny: an isError result naming the decision id and the policy's reason.
/// Returns the decision id.
fn assert_argument_denied(step: &Value, reason: &str) -> String {
    assert_eq!(step["result"]["isError"], true, "{step}");
    let t = text(step);
    assert!(t.contains(reason), "{t}");
    let id = t
        .split("(decision ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no decision id in {t:?}"))
        .to_string();
    assert_eq!(id.len(), 36, "{t}");
    id
}

/// Every decision id in a client's report (one per HTTP response).
fn decisions(report: &Value) -> Vec<String> {
    report["http"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["decision"].as_str().unwrap().to_string())
        .collect()
}

/// What one audit row must say.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Want {
    principal: String,
    method: String,
    tool: String,
    effect: &'static str,
    rule: &'static str,
    outcome: &'static str,
    arguments: String,
}

fn want(
    ip: &str,
    method: &str,
    tool: &str,
    effect: &'static str,
    rule: &'static str,
    outcome: &'static str,
    arguments: Value,
) -> Want {
    Want {
        principal: principal_of(ip).to_string(),
        method: method.to_string(),
        tool: tool.to_string(),
        effect,
        rule,
        outcome,
        arguments: arguments.to_string(),
    }
}

/// The rows of `server` are exactly the decisions the clients were answered with, and say
/// exactly `expected` (as a multiset).
async fn assert_audit_exact(gw: &Gateway, server: &str, reports: &[&Value], expected: Vec<Want>) {
    let rows: Vec<_> = gw
        .rows()
        .await
        .into_iter()
        .filter(|r| r.server == server)
        .collect();
    let mut ids: Vec<String> = reports.iter().flat_map(|r| decisions(r)).collect();
    assert!(
        ids.iter().all(|i| !i.is_empty()),
        "a response without Toolgate-Decision-Id: {reports:?}"
    );
    ids.sort();
    let mut row_ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    row_ids.sort();
    assert_eq!(
        row_ids, ids,
        "audit rows of {server} and the decision ids the clients received differ"
    );
    let mut got: Vec<Want> = rows
        .iter()
        .map(|r| Want {
            principal: r.principal.clone(),
            method: r.method.clone(),
            tool: r.tool.clone(),
            effect: if r.effect == "allow" { "allow" } else { "deny" },
            rule: leak(&r.rule),
            outcome: leak(&r.outcome),
            arguments: r.arguments.to_string(),
        })
        .collect();
    got.sort();
    let mut expected = expected;
    expected.sort();
    if got != expected {
        let show = |v: &[Want]| {
            v.iter()
                .map(|w| format!("{w:?}"))
                .collect::<Vec<_>>()
                .join("\n  ")
        };
        panic!(
            "audit rows of {server}:\n  {}\nexpected:\n  {}",
            show(&got),
            show(&expected)
        );
    }
    // Identity fields of the caller, and the decision's bookkeeping, on every row.
    for r in &rows {
        assert_eq!(
            r.kind,
            if r.principal.is_empty() {
                "identity"
            } else {
                "mcp"
            }
        );
        if r.principal == principal_of(CI) {
            assert_eq!(r.tags, vec!["tag:ci".to_string()]);
            assert_eq!(r.node, "ci-runner.example.ts.net");
        }
        if r.principal == principal_of(ALICE) {
            assert_eq!(r.login, "alice@example.com");
            assert_eq!(r.node_id, "nALICE");
            assert_eq!(r.ip, ALICE);
        }
        // Every call, decided or refused before a decision, carries a digest and the snapshot.
        if r.method == "tools/call" {
            assert!(!r.args_digest.is_empty(), "{r:?}");
            assert!(!r.policy_hash.is_empty(), "{r:?}");
        }
    }
}

/// Interns a short string for the comparison struct (test-only, tiny).
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// tests/peers/py_server.py on a free loopback port, logging the tools it runs to `log`, its
/// output in `work`; once it listens.
async fn py_server(p: &Peers, work: &Path, log: &Path) -> (Proc, std::net::SocketAddr) {
    let port = harness::free_port();
    let mut server = Proc::spawn(
        "py_server",
        std::process::Command::new(&p.python)
            .arg(repo_root().join("tests/peers/py_server.py"))
            .arg(port.to_string())
            .arg(log)
            .stdout(std::fs::File::create(work.join("server.out")).unwrap())
            .stderr(std::fs::File::create(work.join("server.err")).unwrap()),
    );
    let up = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    if let Err(e) = harness::wait_port(up, Duration::from_secs(30)).await {
        panic!(
            "{e}; exited: {:?}; stderr: {}",
            server.exited(),
            std::fs::read_to_string(work.join("server.err")).unwrap_or_default()
        );
    }
    (server, up)
}

/// 8.1: Python `mcp` client (2026-07-28) → toolgate → Python `MCPServer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_client_and_server_through_the_gateway() {
    let Some(p) = peers("python_sdk_client_and_server_through_the_gateway") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("executed.jsonl");
    let (server, up) = py_server(&p, work.path(), &log).await;
    assert_eq!(listening_on(up.port()), vec!["127.0.0.1".to_string()]);
    let gw = Gateway::start(&[("pydemo", format!("http://{up}/mcp"))], "").await;
    let url = format!("{}/mcp/pydemo", gw.base());
    let py = |source: &str, steps: Value| json!({"url": url, "source": source, "steps": steps});

    // alice (developer): sees and may use echo, get_sum, write_file.
    let alice = run_client(
        &p.python,
        "py_client.py",
        &py(
            ALICE,
            json!([
                {"op": "list"},
                {"op": "call", "name": "echo", "arguments": {"message": "hi from alice"}},
                {"op": "call", "name": "read_env", "arguments": {}},
                {"op": "call", "name": "get_sum", "arguments": {"a": 70, "b": 50}},
                {"op": "call", "name": "get_sum", "arguments": {"a": 1, "b": 2}},
                {"op": "call", "name": "write_file", "arguments": {"path": "/tmp/toolgate-e2e.txt", "content": "hi"}},
                {"op": "call", "name": "write_file", "arguments": {"path": "/etc/passwd", "content": "x"}},
            ]),
        ),
        &[],
    )
    .await;
    assert_eq!(alice["connect_error"], Value::Null, "{alice}");
    assert_eq!(alice["protocol_version"], "2026-07-28", "{alice}");
    let s = alice["steps"].as_array().unwrap();
    assert_eq!(tools(&s[0]), ["echo", "get_sum", "write_file"]);
    assert_allowed(&s[1], "Echo: hi from alice");
    assert_unknown_tool(&s[2], "read_env");
    let big_sum = assert_argument_denied(&s[3], "sums above 100 are not allowed");
    assert_allowed(&s[4], "The sum of 1 and 2 is 3.");
    assert_allowed(&s[5], "would write 2 bytes to /tmp/toolgate-e2e.txt");
    let etc = assert_argument_denied(&s[6], "files may only be written under /tmp/");
    // Every answer is HTTP 200 and carries its decision id.
    assert!(
        alice["http"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["status"] == 200),
        "{alice}"
    );

    // bob (user): no write_file, not even by name.
    let bob = run_client(
        &p.python,
        "py_client.py",
        &py(
            BOB,
            json!([
                {"op": "list"},
                {"op": "call", "name": "write_file", "arguments": {"path": "/tmp/x", "content": "x"}},
            ]),
        ),
        &[],
    )
    .await;
    assert_eq!(bob["protocol_version"], "2026-07-28", "{bob}");
    let s = bob["steps"].as_array().unwrap();
    assert_eq!(tools(&s[0]), ["echo", "get_sum"]);
    assert_unknown_tool(&s[1], "write_file");

    // ci (tag:ci): the same list as bob; echo works.
    let ci = run_client(
        &p.python,
        "py_client.py",
        &py(
            CI,
            json!([
                {"op": "list"},
                {"op": "call", "name": "echo", "arguments": {"message": "ci"}},
            ]),
        ),
        &[],
    )
    .await;
    let s = ci["steps"].as_array().unwrap();
    assert_eq!(tools(&s[0]), ["echo", "get_sum"]);
    assert_allowed(&s[1], "Echo: ci");

    // nobody: no identity → 403 on the first request, nothing else.
    let nobody = run_client(
        &p.python,
        "py_client.py",
        &py(NOBODY, json!([{"op": "list"}])),
        &[],
    )
    .await;
    assert_ne!(nobody["connect_error"], Value::Null, "{nobody}");
    let http = nobody["http"].as_array().unwrap();
    assert!(!http.is_empty(), "{nobody}");
    assert!(http.iter().all(|h| h["status"] == 403), "{nobody}");

    // The upstream executed exactly the allowed calls.
    assert_eq!(
        executed(&log),
        vec![
            ("echo".to_string(), json!({"message": "hi from alice"})),
            ("get_sum".to_string(), json!({"a": 1, "b": 2})),
            (
                "write_file".to_string(),
                json!({"path": "/tmp/toolgate-e2e.txt", "content": "hi"})
            ),
            ("echo".to_string(), json!({"message": "ci"})),
        ]
    );

    // The audit trail, exactly.
    let mut expected = vec![
        want(
            ALICE,
            "server/discover",
            "",
            "allow",
            "protocol",
            "forwarded",
            Value::Null,
        ),
        want(
            ALICE,
            "tools/list",
            "",
            "allow",
            "list_filter",
            "forwarded",
            Value::Null,
        ),
        want(
            ALICE,
            "tools/call",
            "echo",
            "allow",
            "echo",
            "forwarded",
            json!({"message": "hi from alice"}),
        ),
        want(
            ALICE,
            "tools/call",
            "read_env",
            "deny",
            "",
            "denied",
            json!({}),
        ),
        want(
            ALICE,
            "tools/call",
            "get_sum",
            "deny",
            "",
            "denied",
            json!({"a": 70, "b": 50}),
        ),
        want(
            ALICE,
            "tools/call",
            "get_sum",
            "allow",
            "small_sums",
            "forwarded",
            json!({"a": 1, "b": 2}),
        ),
        want(
            ALICE,
            "tools/call",
            "write_file",
            "allow",
            "write_under_tmp",
            "forwarded",
            json!({"path": "/tmp/toolgate-e2e.txt", "content": "hi"}),
        ),
        want(
            ALICE,
            "tools/call",
            "write_file",
            "deny",
            "",
            "denied",
            json!({"path": "/etc/passwd", "content": "x"}),
        ),
        want(
            BOB,
            "server/discover",
            "",
            "allow",
            "protocol",
            "forwarded",
            Value::Null,
        ),
        want(
            BOB,
            "tools/list",
            "",
            "allow",
            "list_filter",
            "forwarded",
            Value::Null,
        ),
        want(
            BOB,
            "tools/call",
            "write_file",
            "deny",
            "",
            "denied",
            json!({"path": "/tmp/x", "content": "x"}),
        ),
        want(
            CI,
            "server/discover",
            "",
            "allow",
            "protocol",
            "forwarded",
            Value::Null,
        ),
        want(
            CI,
            "tools/list",
            "",
            "allow",
            "list_filter",
            "forwarded",
            Value::Null,
        ),
        want(
            CI,
            "tools/call",
            "echo",
            "allow",
            "echo",
            "forwarded",
            json!({"message": "ci"}),
        ),
    ];
    for _ in http {
        expected.push(Want {
            principal: String::new(),
            method: String::new(),
            tool: String::new(),
            effect: "deny",
            rule: "",
            outcome: "unidentified",
            arguments: "null".into(),
        });
    }
    // The refused requests of `nobody` are refused before the body is read: no method.
    assert_audit_exact(&gw, "pydemo", &[&alice, &bob, &ci, &nobody], expected).await;
    for id in [&big_sum, &etc] {
        let row = gw.row(id).await.unwrap();
        assert_eq!(row.effect, "deny");
        assert_eq!(row.outcome, "denied");
        assert!(!row.reason.is_empty());
    }
    gw.stop().await;
    drop(server);
}

/// 8.2: TypeScript SDK client (2025-11-25, sessions) → toolgate → server-everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_sdk_client_and_server_everything_through_the_gateway() {
    let Some(p) = peers("typescript_sdk_client_and_server_everything_through_the_gateway") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("received.jsonl");
    let port = harness::free_port();
    let _server = Proc::spawn(
        "server-everything",
        std::process::Command::new("node")
            .arg("-r")
            .arg(repo_root().join("tests/peers/everything-shim.cjs"))
            .arg(
                p.node_modules
                    .join("@modelcontextprotocol/server-everything/dist/index.js"),
            )
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .env("TOOLGATE_PEER_LOG", &log)
            .stdout(std::fs::File::create(work.path().join("server.out")).unwrap())
            .stderr(std::fs::File::create(work.path().join("server.err")).unwrap()),
    );
    let up = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    harness::wait_port(up, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}; stderr: {}",
                std::fs::read_to_string(work.path().join("server.err")).unwrap_or_default()
            )
        });
    // The shim keeps it on loopback: nothing else listens on its port.
    assert_eq!(listening_on(port), vec!["127.0.0.1".to_string()]);
    let gw = Gateway::start(&[("everything", format!("http://{up}/mcp"))], "").await;
    let url = format!("{}/mcp/everything", gw.base());
    let spec = |source: &str, steps: Value| json!({"url": url, "source": source, "steps": steps});
    let env = [("TOOLGATE_MCP_NODE_MODULES", p.node_modules.as_path())];
    let node = Path::new("node");

    let alice = run_client(
        node,
        "node_client.cjs",
        &spec(
            ALICE,
            json!([
                {"op": "list"},
                {"op": "call", "name": "echo", "arguments": {"message": "hi from alice"}},
                {"op": "call", "name": "get-env", "arguments": {}},
                {"op": "call", "name": "get-sum", "arguments": {"a": 70, "b": 50}},
                {"op": "call", "name": "get-sum", "arguments": {"a": 1, "b": 2}},
                {"op": "call", "name": "get-tiny-image", "arguments": {}},
                // Would fetch a URL from the internet: it must never reach the server.
                {"op": "call", "name": "gzip-file-as-resource", "arguments": {}},
                {"op": "terminate"},
            ]),
        ),
        &env,
    )
    .await;
    assert_eq!(alice["connect_error"], Value::Null, "{alice}");
    assert_eq!(alice["protocol_version"], "2025-11-25", "{alice}");
    assert!(
        alice["session_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{alice}"
    );
    let s = alice["steps"].as_array().unwrap();
    assert_eq!(tools(&s[0]), ["echo", "get-sum", "get-tiny-image"]);
    assert_allowed(&s[1], "Echo: hi from alice");
    assert_unknown_tool(&s[2], "get-env");
    let big_sum = assert_argument_denied(&s[3], "sums above 100 are not allowed");
    assert_allowed(&s[4], "The sum of 1 and 2 is 3.");
    assert_eq!(s[5]["result"]["content"][1]["type"], "image", "{}", s[5]);
    assert_unknown_tool(&s[6], "gzip-file-as-resource");
    assert_eq!(s[7]["ok"], true);

    let bob = run_client(
        node,
        "node_client.cjs",
        &spec(
            BOB,
            json!([
                {"op": "list"},
                {"op": "call", "name": "get-tiny-image", "arguments": {}},
                {"op": "call", "name": "get-sum", "arguments": {"a": 2, "b": 3}},
            ]),
        ),
        &env,
    )
    .await;
    assert_eq!(bob["protocol_version"], "2025-11-25", "{bob}");
    let bob_session = bob["session_id"].as_str().unwrap().to_string();
    let s = bob["steps"].as_array().unwrap();
    assert_eq!(tools(&s[0]), ["echo", "get-sum"]);
    assert_unknown_tool(&s[1], "get-tiny-image");
    assert_allowed(&s[2], "The sum of 2 and 3 is 5.");

    let nobody = run_client(
        node,
        "node_client.cjs",
        &spec(NOBODY, json!([{"op": "list"}])),
        &env,
    )
    .await;
    assert_ne!(nobody["connect_error"], Value::Null, "{nobody}");
    let http = nobody["http"].as_array().unwrap();
    assert_eq!(http.len(), 1, "{nobody}");
    assert_eq!(http[0]["status"], 403, "{nobody}");

    // Bob's session (still open: the SDK's close does not end it) presented by alice: refused.
    let hijack = harness::client_from(ALICE)
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &bob_session)
        .header("mcp-protocol-version", "2025-11-25")
        .body(
            json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": "as bob"}}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(hijack.status().as_u16(), 403);
    let hijack_id = hijack
        .headers()
        .get("toolgate-decision-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();

    // The upstream received exactly the allowed calls.
    assert_eq!(
        executed(&log),
        vec![
            ("echo".to_string(), json!({"message": "hi from alice"})),
            ("get-sum".to_string(), json!({"a": 1, "b": 2})),
            ("get-tiny-image".to_string(), json!({})),
            ("get-sum".to_string(), json!({"a": 2, "b": 3})),
        ]
    );

    // Alice's session ended upstream (her DELETE got a 2xx): toolgate forgot it, so the id
    // answers 404 (issue 13 item 8), and nothing reaches the server.
    let alice_session = alice["session_id"].as_str().unwrap().to_string();
    let ended = harness::client_from(ALICE)
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &alice_session)
        .header("mcp-protocol-version", "2025-11-25")
        .body(
            json!({"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": "after the end"}}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(ended.status().as_u16(), 404);
    let ended_id = ended
        .headers()
        .get("toolgate-decision-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();

    let hijack_report = json!({"http": [{"decision": hijack_id}, {"decision": ended_id}]});
    let mut expected = vec![
        want(
            ALICE,
            "initialize",
            "",
            "allow",
            "protocol",
            "forwarded",
            Value::Null,
        ),
        want(
            ALICE,
            "notifications/initialized",
            "",
            "allow",
            "protocol",
            "forwarded",
            Value::Null,
        ),
        want(ALICE, "GET", "", "allow", "", "forwarded", Value::Null),
        want(
            ALICE,
            "tools/list",
            "",
            "allow",
            "list_filter",
            "forwarded",
            Value::Null,
        ),
        want(
            ALICE,
            "tools/call",
            "echo",
            "allow",
            "echo",
            "forwarded",
            json!({"message": "hi from alice"}),
        ),
        want(
            ALICE,
            "tools/call",
            "get-env",
            "deny",
            "",
            "denied",
            json!({}),
        ),
        want(
            ALICE,
            "tools/call",
            "get-sum",
            "deny",
            "",
            "denied",
            json!({"a": 70, "b": 50}),
        ),
        want(
            ALICE,
            "tools/call",
            "get-sum",
            "allow",
            "small_sums",
            "forwarded",
            json!({"a": 1, "b": 2}),
        ),
        want(
            ALICE,
            "tools/call",
            "get-tiny-image",
            "allow",
            "tiny_image",
            "forwarded",
            json!({}),
        ),
        want(
            ALICE,
            "tools/call",
            "gzip-file-as-resource",
            "deny",
            "",
            "denied",
            json!({}),
        ),
        want(ALICE, "DELETE", "", "allow", "", "forwarded", Value::Null),
        want(
            BOB,
            "initialize",
            "",
            "allow",
            "protocol",
            "forwarded",
            Value::Null,
        ),
        want(
            BOB,
            "notifications/initialized",
            "",
            "allow",
            "protocol",
            "forwarded",
            Value::Null,
        ),
        want(BOB, "GET", "", "allow", "", "forwarded", Value::Null),
        want(
            BOB,
            "tools/list",
            "",
            "allow",
            "list_filter",
            "forwarded",
            Value::Null,
        ),
        want(
            BOB,
            "tools/call",
            "get-tiny-image",
            "deny",
            "",
            "denied",
            json!({}),
        ),
        want(
            BOB,
            "tools/call",
            "get-sum",
            "allow",
            "small_sums",
            "forwarded",
            json!({"a": 2, "b": 3}),
        ),
        want(
            ALICE,
            "tools/call",
            "",
            "deny",
            "",
            "session_refused",
            // Refused before any decision, but what was asked is still on record.
            json!({"message": "as bob"}),
        ),
        want(
            ALICE,
            "tools/call",
            "",
            "deny",
            "",
            "unknown_session",
            json!({"message": "after the end"}),
        ),
        Want {
            principal: String::new(),
            method: String::new(),
            tool: String::new(),
            effect: "deny",
            rule: "",
            outcome: "unidentified",
            arguments: "null".into(),
        },
    ];
    // The GET stream rows depend on whether the SDK opened its standalone stream in time:
    // keep only as many as the clients actually made.
    let gets = |r: &Value| {
        r["http"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["method"] == "GET")
            .count()
    };
    for (ip, report) in [(ALICE, &alice), (BOB, &bob)] {
        if gets(report) == 0 {
            let i = expected
                .iter()
                .position(|w| w.method == "GET" && w.principal == principal_of(ip))
                .unwrap();
            expected.remove(i);
        }
    }
    assert_audit_exact(
        &gw,
        "everything",
        &[&alice, &bob, &nobody, &hijack_report],
        expected,
    )
    .await;
    let row = gw.row(&big_sum).await.unwrap();
    assert_eq!(
        (row.effect.as_str(), row.outcome.as_str()),
        ("deny", "denied")
    );
    gw.stop().await;
}

/// Issue 13 item 1: no smuggled tool, argument or request runs on a case-insensitive upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_keys_never_execute_on_a_go_upstream() {
    go_upstream::smuggled_keys_never_execute().await;
}

/// Issue 13 item 1: every rune pair Go's encoding/json folds shares toolgate's fold key.
#[tokio::test]
async fn go_encoding_json_folds_are_refused_as_ambiguous() {
    go_upstream::go_folds_are_covered().await;
}

/// Issue 13 item 6: with the real audit store full, no message of any kind is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_store_forwards_no_message_to_a_go_upstream() {
    go_upstream::a_full_audit_store_forwards_nothing().await;
}

/// The Python SDK server behind toolgate as `pydemo`, and alice's session of the aggregated
/// endpoint `/mcp`, opened asking for protocol `version`.
struct Aggregated {
    gw: Gateway,
    http: reqwest::Client,
    url: String,
    sid: String,
    log: PathBuf,
    _server: Proc,
    _work: tempfile::TempDir,
}

impl Aggregated {
    async fn open(p: &Peers, version: &str) -> Aggregated {
        let work = tempfile::tempdir().unwrap();
        let log = work.path().join("executed.jsonl");
        let (server, up) = py_server(p, work.path(), &log).await;
        let gw = Gateway::start(&[("pydemo", format!("http://{up}/mcp"))], "").await;
        let mut a = Aggregated {
            url: format!("{}/mcp", gw.base()),
            gw,
            http: harness::client_from(ALICE),
            sid: String::new(),
            log,
            _server: server,
            _work: work,
        };
        let init = a
            .post(
                json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": version, "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"}}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(init.status(), 200);
        a.sid = init.headers()["mcp-session-id"]
            .to_str()
            .unwrap()
            .to_string();
        let done = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        assert_eq!(a.post(done).send().await.unwrap().status(), 202);
        a
    }

    /// A POST of `body` on the session (once it is open), accepting JSON or SSE.
    fn post(&self, body: Value) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25")
            .body(serde_json::to_vec(&body).unwrap());
        if !self.sid.is_empty() {
            r = r.header("mcp-session-id", &self.sid);
        }
        r
    }

    /// Has the server run a tool logged as `what`?
    fn ran(&self, what: &str) -> bool {
        executed(&self.log).iter().any(|(n, _)| n == what)
    }
}

/// The JSON-RPC answer in a body that is JSON, or SSE carrying it in a `data:` line.
fn answer_in(text: &str) -> Value {
    serde_json::from_str(text)
        .ok()
        .or_else(|| {
            text.lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
                .find(|v| v.get("id").is_some())
        })
        .unwrap_or_else(|| panic!("no JSON-RPC answer in {text:?}"))
}

/// A client asking `/mcp` for the stateless era (2026-07-28), which the endpoint does not
/// speak, still gets working calls from a server that speaks both eras. The endpoint replays
/// the client's `initialize` to the server, version included; an attacker's read of `/mcp`
/// feared the server would then answer 2026-07-28 and its own route refuse every call
/// without that era's `Mcp-Method` and `Mcp-Name` headers. The Python SDK answers an
/// `initialize` in the handshake era whatever it asks, so calls work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_era_client_of_the_aggregated_endpoint_gets_working_calls() {
    let Some(p) = peers("a_stateless_era_client_of_the_aggregated_endpoint_gets_working_calls")
    else {
        return;
    };
    let a = Aggregated::open(&p, "2026-07-28").await;
    let r = a
        .post(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "pydemo__echo", "arguments": {"message": "hi"}}}))
        .send()
        .await
        .unwrap();
    let v = answer_in(&r.text().await.unwrap());
    assert_eq!(v["result"]["content"][0]["text"], "Echo: hi", "{v}");
    assert!(a.ran("echo"));
    a.gw.stop().await;
}

/// A cancel sent to `/mcp` for a call whose answer is still streaming reaches the server that
/// runs it: the Python SDK server cancels the tool (tests/peers/py_server.py logs
/// `slow:cancelled`). The call's answer is SSE, so the server's route returns its headers long
/// before the answer; the endpoint must still know where the call went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_the_aggregated_endpoint_reaches_a_streaming_call() {
    let Some(p) = peers("a_cancel_on_the_aggregated_endpoint_reaches_a_streaming_call") else {
        return;
    };
    let a = Aggregated::open(&p, "2025-11-25").await;
    let call = a.post(
        json!({"jsonrpc": "2.0", "id": "slow-1", "method": "tools/call",
                             "params": {"name": "pydemo__slow", "arguments": {"seconds": 60}}}),
    );
    let pending = tokio::spawn(async move { call.send().await?.text().await });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !a.ran("slow") {
        assert!(
            std::time::Instant::now() < deadline && !pending.is_finished(),
            "the slow call never ran: {:?}",
            if pending.is_finished() {
                Some(pending.await)
            } else {
                None
            }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": "slow-1", "reason": "the user gave up"}});
    assert_eq!(a.post(cancel).send().await.unwrap().status(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !a.ran("slow:cancelled") {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never heard the cancel: {:?}",
            executed(&a.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pending.abort();
    a.gw.stop().await;
}
