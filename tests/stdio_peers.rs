//! Real MCP peers behind toolgate as **stdio** servers, driven by the real SDK clients through
//! both `/mcp/<name>` and the aggregated `/mcp`:
//!
//! - npm `@modelcontextprotocol/server-everything` in its stdio mode (`dist/index.js stdio`);
//! - a Python `mcp` SDK `MCPServer` over stdio (tests/peers/py_server.py `stdio`);
//! - the TypeScript SDK client (2025-11-25, sessions) and the Python SDK client (2026-07-28
//!   with its fallback to the handshake era).
//!
//! The peers are installed by `scripts/peers-mcp`. Without them each test prints a SKIP line,
//! or fails when `TOOLGATE_REQUIRE_PEERS=1`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

#[path = "peers/harness.rs"]
mod harness;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{ALICE, BOB, Gateway, repo_root};
use serde_json::{Value, json};
use toolgate::stdio::procfs;

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
    if python_ok && node_ok {
        return Some(Peers {
            python,
            node_modules,
        });
    }
    let why = format!(
        "MCP peers not installed (python {}: {python_ok}, node_modules {}: {node_ok}); run scripts/peers-mcp",
        python.display(),
        node_modules.display()
    );
    if std::env::var("TOOLGATE_REQUIRE_PEERS").as_deref() == Ok("1") {
        panic!("{test}: {why} (TOOLGATE_REQUIRE_PEERS=1)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: {why}; set TOOLGATE_REQUIRE_PEERS=1 to fail instead"
    );
    None
}

/// Both peers as stdio servers: `everything` (Node) and `py` (Python).
async fn start(p: &Peers, log: &Path) -> Gateway {
    let servers = format!(
        "  everything:\n    command: [node, \"{}\", stdio]\n    env: {{EVERYTHING_MARK: behind-toolgate}}\n    timeout: 20s\n\
         \x20 py:\n    command: [\"{}\", \"{}\", stdio, \"{}\"]\n    timeout: 20s\n",
        p.node_modules
            .join("@modelcontextprotocol/server-everything/dist/index.js")
            .display(),
        p.python.display(),
        repo_root().join("tests/peers/py_server.py").display(),
        log.display(),
    );
    Gateway::start_with(
        &repo_root().join("tests/peers/stdio_policies"),
        &servers,
        "audit:\n  sqlite: audit.db\n  mode: sync\n  arguments: full\n",
    )
    .await
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

async fn node(p: &Peers, url: String, source: &str, steps: Value) -> Value {
    let spec = json!({"url": url, "source": source, "steps": steps});
    let r = run_client(
        Path::new("node"),
        "node_client.cjs",
        &spec,
        &[("TOOLGATE_MCP_NODE_MODULES", &p.node_modules)],
    )
    .await;
    assert!(r["connect_error"].is_null(), "{r}");
    r
}

async fn python(p: &Peers, url: String, source: &str, steps: Value) -> Value {
    let spec = json!({"url": url, "source": source, "steps": steps});
    let r = run_client(&p.python, "py_client.py", &spec, &[]).await;
    assert!(r["connect_error"].is_null(), "{r}");
    r
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

fn running_below_me() -> Vec<procfs::Stat> {
    procfs::descendants(std::process::id())
        .into_iter()
        .filter(|s| !s.is_zombie())
        .collect()
}

fn list_call_steps(echo: &str, sum: &str, sum_args: Value) -> Value {
    json!([
        {"op": "list"},
        {"op": "call", "name": echo, "arguments": {"message": "hi"}},
        {"op": "call", "name": sum, "arguments": sum_args},
        {"op": "call", "name": sum, "arguments": {"a": 70, "b": 50}},
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_client_through_both_routes() {
    let Some(p) = peers("typescript_client_through_both_routes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("py-executed.jsonl");
    let gw = start(&p, &log).await;
    // /mcp/everything: server-everything over stdio, a session of its own.
    let r = node(
        &p,
        format!("{}/mcp/everything", gw.base()),
        ALICE,
        list_call_steps("echo", "get-sum", json!({"a": 2, "b": 3})),
    )
    .await;
    assert!(r["session_id"].is_string(), "{r}");
    let listed = tools(&r["steps"][0]);
    assert!(
        listed.contains(&"echo".into()) && listed.contains(&"get-sum".into()),
        "{listed:?}"
    );
    assert!(
        !listed.contains(&"gzip-file-as-resource".into()),
        "not in the policy: {listed:?}"
    );
    assert_eq!(text(&r["steps"][1]), "Echo: hi");
    assert!(text(&r["steps"][2]).contains('5'), "{}", r["steps"][2]);
    assert_eq!(
        r["steps"][3]["result"]["isError"],
        json!(true),
        "{}",
        r["steps"][3]
    );
    // /mcp: both servers in one endpoint, names prefixed; the Python server runs the sum.
    let r = node(
        &p,
        format!("{}/mcp", gw.base()),
        ALICE,
        list_call_steps("everything__echo", "py__get_sum", json!({"a": 1, "b": 2})),
    )
    .await;
    let listed = tools(&r["steps"][0]);
    for t in [
        "everything__echo",
        "everything__get-sum",
        "py__echo",
        "py__get_sum",
    ] {
        assert!(listed.contains(&t.to_string()), "{t}: {listed:?}");
    }
    assert!(
        !listed.iter().any(|t| t.ends_with("read_env")),
        "{listed:?}"
    );
    assert_eq!(text(&r["steps"][1]), "Echo: hi");
    assert_eq!(text(&r["steps"][2]), "The sum of 1 and 2 is 3.");
    assert_eq!(
        r["steps"][3]["result"]["isError"],
        json!(true),
        "{}",
        r["steps"][3]
    );
    let ran = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(ran.lines().count(), 1, "the denied sum never ran: {ran}");
    // Every call has its row, with its server.
    let rows = gw.rows().await;
    let calls: Vec<(&str, &str, &str)> = rows
        .iter()
        .filter(|r| r.method == "tools/call")
        .map(|r| (r.server.as_str(), r.tool.as_str(), r.effect.as_str()))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("everything", "echo", "allow"),
            ("everything", "get-sum", "allow"),
            ("everything", "get-sum", "deny"),
            ("everything", "echo", "allow"),
            ("py", "get_sum", "allow"),
            ("py", "get_sum", "deny"),
        ]
    );
    gw.stop().await;
    assert!(running_below_me().is_empty(), "{:?}", running_below_me());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_through_both_routes() {
    let Some(p) = peers("python_client_through_both_routes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("py-executed.jsonl");
    let gw = start(&p, &log).await;
    // /mcp/py: the Python client and the Python server over stdio.
    let r = python(
        &p,
        format!("{}/mcp/py", gw.base()),
        BOB,
        list_call_steps("echo", "get_sum", json!({"a": 2, "b": 3})),
    )
    .await;
    let listed = tools(&r["steps"][0]);
    assert!(
        listed.contains(&"echo".into()) && !listed.contains(&"read_env".into()),
        "{listed:?}"
    );
    assert_eq!(text(&r["steps"][1]), "Echo: hi");
    assert_eq!(text(&r["steps"][2]), "The sum of 2 and 3 is 5.");
    assert_eq!(
        r["steps"][3]["result"]["isError"],
        json!(true),
        "{}",
        r["steps"][3]
    );
    // The current revision: stateless, so one child serves bob's every call.
    assert_eq!(r["protocol_version"], json!("2026-07-28"), "{r}");
    let running = |s: &str| match &gw.gateway.upstreams[s].transport {
        toolgate::mcp::transport::Transport::Stdio(x) => x.running(),
        toolgate::mcp::transport::Transport::Http(_) => 0,
    };
    assert_eq!(running("py"), 1);
    // /mcp/everything: the Python client falls back to the handshake era.
    let r = python(
        &p,
        format!("{}/mcp/everything", gw.base()),
        BOB,
        json!([{"op": "call", "name": "echo", "arguments": {"message": "yo"}},
               {"op": "call", "name": "get-env", "arguments": {}}]),
    )
    .await;
    assert_eq!(r["protocol_version"], json!("2025-11-25"), "{r}");
    assert_eq!(text(&r["steps"][0]), "Echo: yo");
    // The child's environment is PATH & co. plus its `env`, never toolgate's own.
    let env = text(&r["steps"][1]);
    assert!(env.contains("behind-toolgate"), "{env}");
    assert!(
        !env.contains("CARGO_MANIFEST_DIR") && !env.contains("TOOLGATE_REQUIRE_PEERS"),
        "{env}"
    );
    // /mcp: both servers.
    let r = python(
        &p,
        format!("{}/mcp", gw.base()),
        BOB,
        list_call_steps("py__echo", "everything__get-sum", json!({"a": 4, "b": 5})),
    )
    .await;
    assert_eq!(r["protocol_version"], json!("2025-11-25"), "{r}");
    let listed = tools(&r["steps"][0]);
    assert!(
        listed.contains(&"py__echo".into()) && listed.contains(&"everything__echo".into()),
        "{listed:?}"
    );
    assert_eq!(text(&r["steps"][1]), "Echo: hi");
    assert!(text(&r["steps"][2]).contains('9'), "{}", r["steps"][2]);
    assert_eq!(
        r["steps"][3]["result"]["isError"],
        json!(true),
        "{}",
        r["steps"][3]
    );
    gw.stop().await;
    assert!(running_below_me().is_empty(), "{:?}", running_below_me());
}
