//! stdio servers behind the gate, over HTTP: `/mcp/<name>` with a command instead of a URL.
//!
//! toolgate runs in process (`daemon::build` + `daemon::run`, the harness of the peer tests);
//! its stdio children are started through the real launcher (the built `toolgate`). The
//! server is tests/peers/stdio_fixture.py; its misbehaviours (crash, hang, garbage on stdout,
//! a stderr flood) each end in a clear JSON-RPC error and an audit row. Real SDK peers over
//! stdio are in tests/stdio_peers.rs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

#[path = "peers/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{ALICE, BOB, Gateway, client_from, repo_root};
use serde_json::{Value, json};
use toolgate::stdio::procfs;

fn fixture_server(name: &str, modes: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    command: [python3, \"{}\", \"{modes}\"]\n    env: {{FIXTURE_NAME: {name}}}\n    timeout: 3s\n{extra}",
        repo_root().join("tests/peers/stdio_fixture.py").display()
    )
}

async fn start(servers: &str) -> Gateway {
    Gateway::start_with(
        &repo_root().join("tests/peers/stdio_policies"),
        servers,
        "audit:\n  sqlite: audit.db\n  mode: sync\n  durability: normal\n  arguments: full\n",
    )
    .await
}

/// One JSON-RPC POST; returns (status, headers, body as JSON or SSE text).
struct Answer {
    status: u16,
    session: Option<String>,
    decision: String,
    json: Value,
    text: String,
}

async fn post(
    gw: &Gateway,
    from: &str,
    server: &str,
    session: Option<&str>,
    accept: &str,
    body: Value,
) -> Answer {
    let mut req = client_from(from)
        .post(format!("{}/mcp/{server}", gw.base()))
        .header("content-type", "application/json")
        .header("accept", accept)
        .body(serde_json::to_vec(&body).unwrap());
    if let Some(s) = session {
        req = req.header("mcp-session-id", s);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let session = header("mcp-session-id");
    let decision = header("toolgate-decision-id").unwrap_or_default();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        session,
        decision,
        json,
        text,
    }
}

const JSON_ONLY: &str = "application/json";

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {"sampling": {}},
        "clientInfo": {"name": "test", "version": "1"}}})
}

fn call(id: i64, name: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": name, "arguments": args}})
}

/// Opens a session on `server` for `from`; returns its id.
async fn open(gw: &Gateway, from: &str, server: &str) -> String {
    let a = post(gw, from, server, None, JSON_ONLY, initialize()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.json["result"]["serverInfo"]["name"],
        json!(server),
        "{}",
        a.text
    );
    a.session.expect("a stdio session has an Mcp-Session-Id")
}

/// Processes below this test process that are not zombies.
fn running_below_me() -> Vec<procfs::Stat> {
    procfs::descendants(std::process::id())
        .into_iter()
        .filter(|s| !s.is_zombie())
        .collect()
}

async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stdio_running(gw: &Gateway, server: &str) -> usize {
    match &gw.gateway.upstreams[server].transport {
        toolgate::mcp::transport::Transport::Stdio(s) => s.running(),
        toolgate::mcp::transport::Transport::Http(_) => panic!("{server} is not stdio"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_a_child_of_its_own_and_policy_holds() {
    let gw = start(&fixture_server("files", "echo", "")).await;
    let sid = open(&gw, ALICE, "files").await;
    assert_eq!(stdio_running(&gw, "files"), 1);
    // Lists are filtered: `secret` is not in the policy.
    let list = post(
        &gw,
        ALICE,
        "files",
        Some(&sid),
        JSON_ONLY,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    let names: Vec<&str> = list.json["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"echo") && !names.contains(&"secret"),
        "{names:?}"
    );
    // An allowed call runs, with the caller's id back.
    let ok = post(
        &gw,
        ALICE,
        "files",
        Some(&sid),
        JSON_ONLY,
        call(7, "echo", json!({"x": 1})),
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json["id"], json!(7));
    assert_eq!(ok.json["result"]["content"][0]["text"], json!("{\"x\": 1}"));
    let row = gw.row(&ok.decision).await.unwrap();
    assert_eq!(
        (row.server.as_str(), row.tool.as_str(), row.effect.as_str()),
        ("files", "echo", "allow")
    );
    assert_eq!(row.outcome, "forwarded");
    // A hidden tool stays hidden; an argument-level deny names the decision.
    let hidden = post(
        &gw,
        ALICE,
        "files",
        Some(&sid),
        JSON_ONLY,
        call(8, "secret", json!({})),
    )
    .await;
    assert_eq!(
        hidden.json["error"]["code"],
        json!(-32602),
        "{}",
        hidden.text
    );
    let big = post(
        &gw,
        ALICE,
        "files",
        Some(&sid),
        JSON_ONLY,
        call(9, "get_sum", json!({"a": 70, "b": 50})),
    )
    .await;
    assert_eq!(big.json["result"]["isError"], json!(true), "{}", big.text);
    assert!(big.text.contains(&big.decision));
    // Another identity cannot use the session.
    let foreign = post(
        &gw,
        BOB,
        "files",
        Some(&sid),
        JSON_ONLY,
        call(1, "echo", json!({})),
    )
    .await;
    assert_eq!(foreign.status, 403, "{}", foreign.text);
    // DELETE ends the session and its child; the session is then unknown.
    let del = client_from(ALICE)
        .delete(format!("{}/mcp/files", gw.base()))
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success(), "{}", del.status());
    eventually("the child exits", Duration::from_secs(10), || {
        stdio_running(&gw, "files") == 0
    })
    .await;
    let after = post(
        &gw,
        ALICE,
        "files",
        Some(&sid),
        JSON_ONLY,
        call(10, "echo", json!({})),
    )
    .await;
    assert_eq!(after.status, 404, "{}", after.text);
    gw.stop().await;
    assert!(running_below_me().is_empty(), "{:?}", running_below_me());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_callers_get_one_child_per_identity() {
    let gw = start(&fixture_server("files", "echo", "")).await;
    let modern = |from: &'static str, id: i64| {
        let url = format!("{}/mcp/files", gw.base());
        async move {
            client_from(from)
                .post(url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/call")
                .header("mcp-name", "echo")
                .body(
                    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                        "params": {"name": "echo", "arguments": {"n": id},
                            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}}))
                    .unwrap(),
                )
                .send()
                .await
                .unwrap()
        }
    };
    for id in 1..=3 {
        let r = modern(ALICE, id).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains(&format!("{{\\\"n\\\": {id}}}")), "{text}");
    }
    assert_eq!(
        stdio_running(&gw, "files"),
        1,
        "alice's calls share one child"
    );
    let r = modern(BOB, 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(stdio_running(&gw, "files"), 2, "bob gets his own");
    gw.stop().await;
    assert!(running_below_me().is_empty(), "{:?}", running_below_me());
}

/// (status, JSON-RPC error message, the row's outcome) of one failing call.
async fn failing(gw: &Gateway, server: &str, tool: &str) -> (u16, String, String) {
    let sid = open(gw, ALICE, server).await;
    let a = post(
        gw,
        ALICE,
        server,
        Some(&sid),
        JSON_ONLY,
        call(1, tool, json!({})),
    )
    .await;
    let msg = a.json["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let row = gw.row(&a.decision).await.expect("a row for the call");
    (a.status, msg, row.outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_children_end_in_a_clear_error_and_a_row() {
    let servers = [
        fixture_server("crashy", "crash", ""),
        fixture_server("hangs", "hang", ""),
        fixture_server("noisy", "garbage", ""),
    ]
    .concat();
    let gw = start(&servers).await;
    let (status, msg, outcome) = failing(&gw, "crashy", "crash").await;
    assert_eq!((status, outcome.as_str()), (502, "upstream_error"), "{msg}");
    assert!(msg.contains("crashy exited (exit status 3)"), "{msg}");
    let (status, msg, outcome) = failing(&gw, "hangs", "hang").await;
    assert_eq!((status, outcome.as_str()), (502, "upstream_error"), "{msg}");
    assert!(msg.contains("did not answer within 3s"), "{msg}");
    let (status, msg, outcome) = failing(&gw, "noisy", "garbage").await;
    assert_eq!((status, outcome.as_str()), (502, "upstream_error"), "{msg}");
    assert!(msg.contains("not strict JSON"), "{msg}");
    // The crashed and the broken child are gone; the hung one lives on until its session ends.
    eventually(
        "crashed children are reaped",
        Duration::from_secs(10),
        || stdio_running(&gw, "crashy") == 0 && stdio_running(&gw, "noisy") == 0,
    )
    .await;
    gw.stop().await;
    assert!(running_below_me().is_empty(), "{:?}", running_below_me());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_flood_is_logged_not_fatal() {
    let gw = start(&fixture_server("flood", "flood", "")).await;
    let sid = open(&gw, ALICE, "flood").await;
    let a = post(
        &gw,
        ALICE,
        "flood",
        Some(&sid),
        JSON_ONLY,
        call(1, "echo", json!({"ok": 1})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(gw.row(&a.decision).await.unwrap().outcome, "forwarded");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_answers_503() {
    let gw = start(&fixture_server("one", "echo", "    max_children: 1\n")).await;
    let _sid = open(&gw, ALICE, "one").await;
    let a = post(&gw, BOB, "one", None, JSON_ONLY, initialize()).await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert!(a.text.contains("servers.one.max_children"), "{}", a.text);
    assert_eq!(stdio_running(&gw, "one"), 1);
    gw.stop().await;
}

/// A server request from the child (sampling) is decided and audited like any message: allowed
/// for alice (delivered on the call's stream, her answer goes back to the child), withheld for
/// bob (the child gets the gateway's error; bob never sees the request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_requests_from_the_child_pass_the_gate() {
    let gw = start(&fixture_server("asks", "echo", "")).await;
    let sse = "application/json, text/event-stream";
    // alice: the request arrives on the POST's stream; she answers; the call completes.
    let sid = open(&gw, ALICE, "asks").await;
    let url = format!("{}/mcp/asks", gw.base());
    let mut resp = client_from(ALICE)
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", sse)
        .header("mcp-session-id", &sid)
        .body(serde_json::to_vec(&call(5, "ask", json!({}))).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    while !seen.contains("sampling/createMessage") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .expect("the stream ended before the server request");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let answer = post(
        &gw,
        ALICE,
        "asks",
        Some(&sid),
        JSON_ONLY,
        json!({"jsonrpc": "2.0", "id": "s1", "result": {"role": "assistant",
            "content": {"type": "text", "text": "hello"}, "model": "m"}}),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    while !seen.contains("sampled: hello") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .expect("the stream ended before the result");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // bob: withheld; the child hears "denied" and says so in its result.
    let sid = open(&gw, BOB, "asks").await;
    let resp = client_from(BOB)
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", sse)
        .header("mcp-session-id", &sid)
        .body(serde_json::to_vec(&call(6, "ask", json!({}))).unwrap())
        .send()
        .await
        .unwrap();
    let text = tokio::time::timeout(Duration::from_secs(15), resp.text())
        .await
        .unwrap()
        .unwrap();
    assert!(
        !text.contains("\"method\":\"sampling/createMessage\""),
        "{text}"
    );
    assert!(
        text.contains("sampling refused: denied by policy"),
        "{text}"
    );
    let rows = gw.rows().await;
    let sampling: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.method == "sampling/createMessage")
        .map(|r| (r.principal.as_str(), r.effect.as_str()))
        .collect();
    assert_eq!(
        sampling,
        vec![("alice@example.com", "allow"), ("bob@example.com", "deny")]
    );
    gw.stop().await;
}

/// After toolgate stops, no child, grandchild or zombie of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_after_toolgate_stops() {
    let gw = start(
        &[
            fixture_server("a", "echo", ""),
            fixture_server("b", "echo", ""),
        ]
        .concat(),
    )
    .await;
    for s in ["a", "b"] {
        open(&gw, ALICE, s).await;
        open(&gw, BOB, s).await;
    }
    assert_eq!(stdio_running(&gw, "a") + stdio_running(&gw, "b"), 4);
    assert!(
        running_below_me().len() >= 8,
        "4 launchers and 4 servers: {:?}",
        running_below_me()
    );
    gw.stop().await;
    assert!(running_below_me().is_empty(), "{:?}", running_below_me());
    let zombies: Vec<_> = procfs::descendants(std::process::id())
        .into_iter()
        .filter(|s| s.is_zombie())
        .collect();
    assert!(zombies.is_empty(), "{zombies:?}");
}
