//! The MCP gateway end to end, in process: static identities on 127.0.0.2–4, the built-in
//! sample upstream, the shipped policies, and an in-memory audit sink that can be made to fail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use toolgate::config::{Config, RoleMappings};
use toolgate::gateway::{
    AuditRow, AuditSink, AuditUnavailable, Commit, Gateway, Sessions, Upstream,
};
use toolgate::identity::StaticIdentities;
use toolgate::policy::model::Effect;
use toolgate::policy::store::Store;
use toolgate::sample;
use toolgate::server::{self, StaticProvider};

#[derive(Default)]
struct MemorySink {
    rows: Mutex<Vec<AuditRow>>,
    outcomes: Mutex<Vec<(String, String)>>,
    fail: AtomicBool,
    /// Takes rows but never commits them (a full disk, a failing store): every commit fails.
    fail_commit: AtomicBool,
    /// Reports a full queue through `saturated` (overload shedding).
    saturated: AtomicBool,
}

impl AuditSink for MemorySink {
    fn submit(&self, row: AuditRow) -> Result<Commit, AuditUnavailable> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(AuditUnavailable("queue full".into()));
        }
        self.rows.lock().unwrap().push(row);
        if self.fail_commit.load(Ordering::SeqCst) {
            return Ok(Box::pin(async {
                Err(AuditUnavailable(
                    "disk full (database or disk is full)".into(),
                ))
            }));
        }
        Ok(Box::pin(async { Ok(()) }))
    }
    fn saturated(&self) -> bool {
        self.saturated.load(Ordering::SeqCst)
    }
    fn outcome(&self, id: &str, outcome: &str, _latency_us: u64) {
        self.outcomes
            .lock()
            .unwrap()
            .push((id.to_string(), outcome.to_string()));
    }
}

const IDENTITIES: &str = r#"
"127.0.0.2": {login: alice@example.com, display_name: Alice, node: alice-laptop.example.ts.net, node_id: nA, caps: [{roles: [developer]}]}
"127.0.0.3": {login: bob@example.com, display_name: Bob, node: bob-desktop.example.ts.net, node_id: nB}
"127.0.0.4": {node: ci-runner.example.ts.net, node_id: nCI, tags: ["tag:ci"]}
"#;

struct Harness {
    addr: SocketAddr,
    sink: Arc<MemorySink>,
    counters: Arc<sample::Counters>,
    /// Every HTTP request the upstream received, whatever its method.
    upstream_requests: Arc<std::sync::atomic::AtomicU64>,
    gw: Arc<Gateway>,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

async fn start() -> Harness {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    start_with(&root.join("policies"), "").await
}

/// Serves `app` on a free loopback port, as an upstream; returns its address.
async fn serve_upstream(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A gateway on the end-to-end fixture policies (`echo` is allowed on every server), with one
/// more server, `name`, at `upstream`.
async fn start_echo_beside(name: &str, upstream: SocketAddr) -> Harness {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    start_with(
        &root.join("tests/peers/policies"),
        &format!("  {name}: {{url: \"http://{upstream}/mcp\"}}\n"),
    )
    .await
}

async fn start_with(policies: &Path, extra_servers: &str) -> Harness {
    let counters = Arc::new(sample::Counters::default());
    let upstream_requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = upstream_requests.clone();
    let app = sample::router(counters.clone()).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { next.run(req).await }
        },
    ));
    let up = serve_upstream(app).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg_text = format!(
        "listen: [\"127.0.0.1:0\"]\ntls: off\nidentity: {{provider: static, static: ids.yaml}}\npolicies: {{dir: {}}}\nservers:\n  github: {{url: \"http://{up}/mcp\"}}\n  files: {{url: \"http://{up}/mcp\"}}\n  strict: {{url: \"http://{up}/mcp\", unknown_methods: deny}}\n{extra_servers}",
        policies.display()
    );
    let config = Config::parse("test.yaml", cfg_text.as_bytes(), root).unwrap();
    let (store, res) = Store::open(&config.policies.dir);
    res.unwrap();
    let upstreams = config
        .servers
        .iter()
        .map(|(n, c)| {
            (
                n.clone(),
                Arc::new(Upstream::from_config(n, c, None).unwrap()),
            )
        })
        .collect();
    let sink = Arc::new(MemorySink::default());
    let budget = toolgate::budget::Budget::new(config.limits.in_flight_bytes);
    let gw = Arc::new(Gateway {
        config,
        budget,
        shadow: None,
        store: Arc::new(store),
        upstreams,
        http: toolgate::gateway::upstream_client().unwrap(),
        sessions: Sessions::default(),
        server_requests: Default::default(),
        annotations: Default::default(),
        allowed_hosts: vec!["127.0.0.1".into(), "localhost".into()],
        audit: sink.clone(),
        metrics: Default::default(),
        localapi: None,
        whois: Default::default(),
        list_watchers: Default::default(),
        known_tools: Default::default(),
        in_flight: Default::default(),
        aggregate: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ids = StaticIdentities::parse("ids.yaml", IDENTITIES.as_bytes()).unwrap();
    let provider = Arc::new(StaticProvider {
        identities: ids,
        mappings: RoleMappings::default(),
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(server::serve_listener(
        listener,
        server::router(gw.clone()),
        provider,
        None,
        rx,
    ));
    Harness {
        addr,
        sink,
        counters,
        upstream_requests,
        gw,
        _shutdown: tx,
    }
}

fn client(from: &str) -> reqwest::Client {
    let _ = toolgate::gateway::http_client();
    reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// A POST of a JSON-RPC message from `from` to `server`'s route, as an MCP client sends it.
fn mcp_post(h: &Harness, from: &str, server: &str) -> reqwest::RequestBuilder {
    client(from)
        .post(format!("http://{}/mcp/{server}", h.addr))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
}

async fn rpc(h: &Harness, from: &str, server: &str, body: Value) -> (u16, Value, String) {
    rpc_with(h, from, server, body, &[]).await
}

/// [`rpc`] with extra request headers.
async fn rpc_with(
    h: &Harness,
    from: &str,
    server: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (u16, Value, String) {
    let (status, text, decision) = rpc_text(h, from, server, body, headers).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        decision,
    )
}

/// [`rpc_with`], the answer's body as the bytes the gateway sent.
async fn rpc_text(
    h: &Harness,
    from: &str,
    server: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = mcp_post(h, from, server);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.body(body.to_string()).send().await.unwrap();
    let status = r.status().as_u16();
    let decision = r
        .headers()
        .get("toolgate-decision-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, r.text().await.unwrap(), decision)
}

/// Opens a handshake-era session for `from` on `server`; returns its `Mcp-Session-Id`.
async fn initialize(h: &Harness, from: &str, server: &str) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let r = mcp_post(h, from, server)
        .body(init.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.headers()["mcp-session-id"].to_str().unwrap().to_string()
}

fn call(tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}})
}

#[tokio::test]
async fn lists_are_filtered_per_identity() {
    let h = start().await;
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
    let names = |v: &Value| -> Vec<String> {
        v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (s, alice, _) = rpc(&h, "127.0.0.2", "github", list.clone()).await;
    assert_eq!(s, 200);
    let (_, ci, _) = rpc(&h, "127.0.0.4", "github", list).await;
    assert_eq!(
        names(&alice),
        vec![
            "search_repositories",
            "get_issue",
            "create_issue",
            "read_file"
        ]
    );
    assert_eq!(names(&ci), vec!["search_repositories", "get_issue"]);
}

#[tokio::test]
async fn allowed_denied_and_argument_denied_calls() {
    let h = start().await;
    let (s, v, d) = rpc(
        &h,
        "127.0.0.2",
        "github",
        call(
            "create_issue",
            json!({"owner": "example", "repo": "r", "title": "t"}),
        ),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["result"]["isError"], false, "{v}");
    assert!(!d.is_empty());
    // Argument-level deny: a visible tool, wrong organisation → isError naming the decision.
    let (s, v, d2) = rpc(
        &h,
        "127.0.0.2",
        "github",
        call(
            "create_issue",
            json!({"owner": "evil", "repo": "r", "title": "t"}),
        ),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["result"]["isError"], true, "{v}");
    assert!(
        v["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains(&d2),
        "{v}"
    );
    // bob has no developer role: create_issue is hidden from him → Unknown tool.
    let (_, v, _) = rpc(
        &h,
        "127.0.0.3",
        "github",
        call("create_issue", json!({"owner": "example"})),
    )
    .await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    assert_eq!(
        h.counters.tool_calls.load(Ordering::Relaxed),
        1,
        "only the allowed call ran"
    );
    let rows = h.sink.rows.lock().unwrap().clone();
    let allowed: Vec<_> = rows
        .iter()
        .filter(|r| r.effect == Effect::Allow && r.action.starts_with("tools/call::"))
        .collect();
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0].id, d);
    assert_eq!(
        allowed[0].caller.as_ref().unwrap().principal.id,
        "alice@example.com"
    );
    assert_eq!(allowed[0].rule, "github_write_own_org");
    let outcomes = h.sink.outcomes.lock().unwrap().clone();
    assert!(outcomes.contains(&(d.clone(), "forwarded".into())));
}

#[tokio::test]
async fn unknown_caller_is_refused_and_audited() {
    let h = start().await;
    let (s, v, _) = rpc(
        &h,
        "127.0.0.9",
        "github",
        call("search_repositories", json!({})),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["code"], -31001);
    assert_eq!(h.counters.tool_calls.load(Ordering::Relaxed), 0);
    let rows = h.sink.rows.lock().unwrap().clone();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].kind, "identity");
    assert_eq!(rows[0].effect, Effect::Deny);
}

#[tokio::test]
async fn a_full_audit_queue_answers_503_and_forwards_nothing() {
    let h = start().await;
    h.sink.fail.store(true, Ordering::SeqCst);
    let r = client("127.0.0.2")
        .post(format!("http://{}/mcp/github", h.addr))
        .header("content-type", "application/json")
        .body(call("search_repositories", json!({})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(h.counters.tool_calls.load(Ordering::Relaxed), 0);
}

/// Sessions fail closed (issue 13 item 8): a session id this gateway never saw initialized
/// (made up, or from before a restart) answers 404 and reaches nothing; a DELETE the upstream
/// refuses leaves the session bound to its owner.
#[tokio::test]
async fn unknown_sessions_get_404_and_a_refused_delete_keeps_the_binding() {
    let h = start().await;
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let before = h.upstream_requests.load(Ordering::SeqCst);
    for sid in ["not-a-session", "00000000-0000-0000-0000-000000000000"] {
        let (s, v, d) = rpc_with(
            &h,
            "127.0.0.2",
            "github",
            list.clone(),
            &[("mcp-session-id", sid)],
        )
        .await;
        assert_eq!(s, 404, "{v}");
        assert_eq!(v["error"]["code"], -32600, "{v}");
        let rows = h.sink.rows.lock().unwrap();
        let row = rows.iter().find(|r| r.id == d).unwrap();
        assert_eq!(
            (row.effect, row.outcome.as_str()),
            (Effect::Deny, "unknown_session")
        );
    }
    assert_eq!(h.upstream_requests.load(Ordering::SeqCst), before);

    let sid = initialize(&h, "127.0.0.2", "github").await;
    let (s, v, _) = rpc_with(
        &h,
        "127.0.0.2",
        "github",
        list.clone(),
        &[("mcp-session-id", &sid)],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // The sample upstream has no DELETE (405): the session lives on upstream, and stays alice's.
    let r = client("127.0.0.2")
        .delete(format!("http://{}/mcp/github", h.addr))
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let (s, v, _) = rpc_with(
        &h,
        "127.0.0.3",
        "github",
        list.clone(),
        &[("mcp-session-id", &sid)],
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].clone()),
        (403, json!(-31001)),
        "bob takes over alice's session: {v}"
    );
    let (s, v, _) = rpc_with(
        &h,
        "127.0.0.2",
        "github",
        list.clone(),
        &[("mcp-session-id", &sid)],
    )
    .await;
    assert_eq!(s, 200, "{v}");

    // After a restart (a new gateway, same upstream session ids), every session is unknown.
    let again = start().await;
    let (s, v, _) = rpc_with(
        &again,
        "127.0.0.2",
        "github",
        list,
        &[("mcp-session-id", &sid)],
    )
    .await;
    assert_eq!(s, 404, "{v}");
}

/// An upstream that misbehaves on its streams: a POST stream carries another request's answer
/// (listing a hidden tool) before its own, and a second copy of its own; the GET stream
/// replays an old `tools/list` answer, as after `Last-Event-ID`.
async fn rogue_upstream() -> SocketAddr {
    async fn post(body: axum::body::Bytes) -> axum::response::Response {
        let m: Value = serde_json::from_slice(&body).unwrap();
        let id = m["id"].clone();
        match m["method"].as_str() {
            Some("initialize") => axum::response::Response::builder()
                .header("content-type", "application/json")
                .header("mcp-session-id", "rogue-session")
                .body(axum::body::Body::from(
                    json!({"jsonrpc": "2.0", "id": id, "result": {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "rogue", "version": "1"}}}).to_string(),
                ))
                .unwrap(),
            Some(_) if !id.is_null() => {
                let events = [
                    json!({"jsonrpc": "2.0", "id": 99, "result": {"tools": [{"name": "delete_repository"}]}}),
                    json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}}),
                    json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "own answer"}]}}),
                    json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "second copy"}]}}),
                ];
                let sse: String = events.iter().map(|e| format!("event: message\ndata: {e}\n\n")).collect();
                axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(axum::body::Body::from(sse))
                    .unwrap()
            }
            _ => axum::response::Response::builder()
                .status(202)
                .body(axum::body::Body::empty())
                .unwrap(),
        }
    }
    async fn get() -> axum::response::Response {
        let events = [
            json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "delete_repository"}, {"name": "search_repositories"}]}}),
            json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "still here"}}),
        ];
        let sse: String = events
            .iter()
            .enumerate()
            .map(|(i, e)| format!("id: {i}\nevent: message\ndata: {e}\n\n"))
            .collect();
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from(sse))
            .unwrap()
    }
    serve_upstream(axum::Router::new().route("/mcp", axum::routing::post(post).get(get))).await
}

/// Streams deliver only their own answer (issue 13 item 9): a POST stream passes the
/// response to its request once and drops other ids; the GET stream passes no response.
#[tokio::test]
async fn streams_deliver_only_their_own_answer() {
    let h = start_echo_beside("rogue", rogue_upstream().await).await;
    let sid = initialize(&h, "127.0.0.2", "rogue").await;
    let (s, v, _) = rpc_with(
        &h,
        "127.0.0.2",
        "rogue",
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": "x"}}}),
        &[("mcp-session-id", &sid)],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let got = sse_messages(&v);
    assert_eq!(got.len(), 2, "{v}");
    assert_eq!(got[0]["method"], "notifications/progress");
    assert_eq!(got[1]["id"], 7);
    assert_eq!(got[1]["result"]["content"][0]["text"], "own answer");

    let r = client("127.0.0.2")
        .get(format!("http://{}/mcp/rogue", h.addr))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &sid)
        .header("last-event-id", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let got = sse_messages(&Value::String(r.text().await.unwrap()));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["method"], "notifications/message");
}

/// An upstream that answers each call with the bytes its `arguments.message` spells.
async fn parrot_upstream() -> SocketAddr {
    async fn post(body: axum::body::Bytes) -> axum::response::Response {
        let m: Value = serde_json::from_slice(&body).unwrap();
        let answer = m["params"]["arguments"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        axum::response::Response::builder()
            .header("content-type", "application/json")
            .body(axum::body::Body::from(answer))
            .unwrap()
    }
    serve_upstream(axum::Router::new().route("/mcp", axum::routing::post(post))).await
}

/// A tool's answer passes to the client as the upstream's own bytes only when the whole answer
/// passed the strict parse: a case-folded twin or a duplicate key deep inside the result, a
/// nesting past the limit, or an answer that is not the call's response becomes a JSON-RPC
/// error and an `upstream_error` outcome, though only the envelope of a passing answer is
/// built (`jsonrpc::parse_head`).
#[tokio::test]
async fn an_answer_passes_as_sent_only_when_all_of_it_is_strict() {
    let h = start_echo_beside("parrot", parrot_upstream().await).await;
    let send = |answer: String| {
        let h = &h;
        async move {
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": answer}}});
            let (_, text, d) = rpc_text(h, "127.0.0.2", "parrot", body, &[]).await;
            assert!(!d.is_empty(), "no decision id for {text}");
            (d, text)
        }
    };
    let outcome = |d: &str| {
        h.sink
            .outcomes
            .lock()
            .unwrap()
            .iter()
            .find(|(id, _)| id == d)
            .map(|(_, o)| o.clone())
    };

    // Passes byte for byte: unsorted keys, whitespace, nested values of every kind.
    let good = "{ \"result\": {\"structuredContent\": {\"b\": [1, 2.5, true, null, \"\\u00e9\"], \"a\": {}},\n \"content\": [{\"type\": \"text\", \"text\": \"ok\"}]}, \"id\": 1, \"jsonrpc\": \"2.0\" }";
    let (d, text) = send(good.to_string()).await;
    assert_eq!(text, good);
    assert_eq!(outcome(&d).as_deref(), Some("forwarded"));

    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"result":{{"a":{}1{}}}}}"#,
        "[".repeat(130),
        "]".repeat(130)
    );
    let refused = [
        (
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"x","TEXT":"y"}]}}"#.to_string(),
            "case folding",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"structuredContent":{"status":"ok","ſtatus":"rm -rf"}}}"#.to_string(),
            "case folding",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"x","text":"y"}]}}"#.to_string(),
            "duplicate key",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"result":{},"ID":2}"#.to_string(),
            "case folding",
        ),
        (deep, "invalid JSON"),
        (
            r#"{"jsonrpc":"2.0","id":2,"result":{"content":[]}}"#.to_string(),
            "does not match",
        ),
        (
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}"#.to_string(),
            "something other than a response",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"text":"\ud800"}]}}"#.to_string(),
            "invalid JSON",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}} {}"#.to_string(),
            "invalid JSON",
        ),
    ];
    for (answer, why) in refused {
        let (d, text) = send(answer.clone()).await;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{answer}: {text}"));
        assert_eq!(v["error"]["code"], -31004, "{answer}: {text}");
        assert_eq!(v["id"], 1, "{answer}: {text}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(why),
            "{answer}: {text}"
        );
        assert_eq!(outcome(&d).as_deref(), Some("upstream_error"), "{answer}");
    }
}

/// A request whose id is in flight on the same session is refused (issue 13 item 9), so two
/// requests never receive each other's answers; other sessions, and the id once answered,
/// are free.
#[tokio::test]
async fn a_duplicate_in_flight_id_on_a_session_is_refused() {
    let h = start().await;
    let alice = initialize(&h, "127.0.0.2", "github").await;
    let bob = initialize(&h, "127.0.0.3", "github").await;
    let slow = call(
        "search_repositories",
        json!({"query": "x", "delay_ms": 3000}),
    );
    let first = {
        let (addr, sid, body) = (h.addr, alice.clone(), slow.clone());
        tokio::spawn(async move {
            client("127.0.0.2")
                .post(format!("http://{addr}/mcp/github"))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-session-id", &sid)
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    // The first call has reached the upstream (a signal, not a sleep).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.counters.started.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first call never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let quick = call("search_repositories", json!({"query": "y"}));
    let (s, v, _) = rpc_with(
        &h,
        "127.0.0.2",
        "github",
        quick.clone(),
        &[("mcp-session-id", &alice)],
    )
    .await;
    assert_eq!((s, v["error"]["code"].clone()), (400, json!(-32600)), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight"),
        "{v}"
    );
    assert_eq!(
        h.counters.started.load(Ordering::SeqCst),
        1,
        "the duplicate reached the upstream"
    );
    // The same id on another session, and another id on this one, are fine.
    let (s, v, _) = rpc_with(
        &h,
        "127.0.0.3",
        "github",
        quick.clone(),
        &[("mcp-session-id", &bob)],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let mut other = quick.clone();
    other["id"] = json!("1");
    let (s, v, _) = rpc_with(
        &h,
        "127.0.0.2",
        "github",
        other,
        &[("mcp-session-id", &alice)],
    )
    .await;
    assert_eq!(s, 200, "a string id \"1\" is not the number 1: {v}");
    assert_eq!(first.await.unwrap(), 200);
    // Answered: the id is free again.
    let (s, v, _) = rpc_with(
        &h,
        "127.0.0.2",
        "github",
        quick,
        &[("mcp-session-id", &alice)],
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

/// I2 for every message (issue 13 item 6): with a store that takes rows but cannot commit
/// them (disk full), no request of any method, no notification, no answer to a server request
/// and no session GET/DELETE reaches the upstream; each is answered 503 and may be retried.
#[tokio::test]
async fn a_failing_store_forwards_no_message_of_any_kind() {
    let h = start().await;
    // Before the fault: a session, and a sampling request delivered to alice.
    let sid = initialize(&h, "127.0.0.2", "github").await;
    let (s, v, _) = rpc(
        &h,
        "127.0.0.2",
        "github",
        call(
            "search_repositories",
            json!({"query": "x", "ask": ["sampling/createMessage"]}),
        ),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let asked = sse_messages(&v)
        .into_iter()
        .find(|m| m["method"] == "sampling/createMessage")
        .unwrap()["id"]
        .clone();

    h.sink.fail_commit.store(true, Ordering::SeqCst);
    let before = h.upstream_requests.load(Ordering::SeqCst);
    let answer = json!({"jsonrpc": "2.0", "id": asked, "result": {"role": "assistant", "content": {"type": "text", "text": "ok"}, "model": "m"}});
    let messages = [
        (
            "completion/complete",
            json!({"jsonrpc": "2.0", "id": 7, "method": "completion/complete", "params": {"ref": {"type": "ref/prompt", "name": "p"}, "argument": {"name": "a", "value": "b"}}}),
        ),
        (
            "a notification",
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        ),
        ("an answer to a server request", answer.clone()),
        (
            "tools/list",
            json!({"jsonrpc": "2.0", "id": 8, "method": "tools/list"}),
        ),
        (
            "tools/call",
            call("search_repositories", json!({"query": "x"})),
        ),
    ];
    for (what, body) in &messages {
        let (s, v, _) = rpc(&h, "127.0.0.2", "github", body.clone()).await;
        assert_eq!(s, 503, "{what}: {v}");
        assert_eq!(v["error"]["code"], -31003, "{what}: {v}");
    }
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let r = client("127.0.0.2")
            .request(method.clone(), format!("http://{}/mcp/github", h.addr))
            .header("accept", "text/event-stream")
            .header("mcp-session-id", &sid)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 503, "{method}");
    }
    assert_eq!(
        h.upstream_requests.load(Ordering::SeqCst),
        before,
        "a message reached the upstream without a committed row"
    );
    // Each was decided and handed to the store (which could not commit it).
    let rows = h.sink.rows.lock().unwrap().len();
    assert!(rows >= messages.len() + 2, "{rows} rows");

    // The store recovers: the answer was not used up by the failed attempt.
    h.sink.fail_commit.store(false, Ordering::SeqCst);
    let (s, v, _) = rpc(&h, "127.0.0.2", "github", answer).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(h.upstream_requests.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn an_overloaded_audit_queue_sheds_calls_before_deciding() {
    let h = start().await;
    h.sink.saturated.store(true, Ordering::SeqCst);
    let before = h.gw.metrics.render();
    let (s, v, _) = rpc(
        &h,
        "127.0.0.2",
        "github",
        call("search_repositories", json!({})),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("audit"),
        "{v}"
    );
    assert_eq!(h.counters.tool_calls.load(Ordering::Relaxed), 0);
    assert!(h.sink.rows.lock().unwrap().is_empty());
    // No policy decision was spent on it.
    let after = h.gw.metrics.render();
    let decisions = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("toolgate_decisions_total{"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(decisions(&before), decisions(&after));
    // Once the queue drains, the same call runs.
    h.sink.saturated.store(false, Ordering::SeqCst);
    let (s, v, _) = rpc(
        &h,
        "127.0.0.2",
        "github",
        call("search_repositories", json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h.counters.tool_calls.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn hidden_tools_answer_unknown_tool() {
    let h = start().await;
    for (tool, args) in [
        ("launch_missiles", json!({})),
        ("read_file", json!({"path": "/srv/work/a"})),
    ] {
        let (s, v, _) = rpc(&h, "127.0.0.4", "files", call(tool, args)).await;
        assert_eq!(s, 200);
        assert_eq!(v["error"]["code"], -32602, "{v}");
        assert_eq!(v["error"]["message"], format!("Unknown tool: {tool}"));
    }
    assert_eq!(h.counters.tool_calls.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_policy_change_announces_list_changed_on_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    let h = start_with(dir.path(), "").await;
    let c = client("127.0.0.2");
    let init = c
        .post(format!("http://{}/mcp/github", h.addr))
        .header("content-type", "application/json")
        .body(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}}).to_string())
        .send()
        .await
        .unwrap();
    let sid = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    rpc(
        &h,
        "127.0.0.2",
        "github",
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    let mut stream = c
        .get(format!("http://{}/mcp/github", h.addr))
        .header("mcp-session-id", &sid)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    // No change, no notice.
    assert_eq!(h.gw.policies_changed(), 0);
    // Developers lose create_issue in lists: alice's visible tools change.
    let p = dir.path().join("mcp_server.yaml");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace(r#""tools/list::create_issue", "#, "")).unwrap();
    h.gw.store.reload().unwrap();
    assert_eq!(h.gw.policies_changed(), 1);
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !seen.contains("notifications/tools/list_changed") {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .expect("no notice within 5 s")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn unknown_methods_go_to_policy_or_are_refused() {
    let h = start().await;
    let ext = json!({"jsonrpc": "2.0", "id": 9, "method": "acme/frobnicate", "params": {}});
    let (s, v, _) = rpc(&h, "127.0.0.2", "github", ext.clone()).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["error"]["code"], -31002,
        "policy decides (and has no rule for it): {v}"
    );
    let (s, v, d) = rpc(&h, "127.0.0.2", "strict", ext).await;
    assert_eq!(s, 200);
    assert_eq!(v["error"]["code"], -32601, "{v}");
    assert!(!d.is_empty());
    assert_eq!(h.counters.tool_calls.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_foreign_host_is_refused_and_audited() {
    let h = start().await;
    let r = client("127.0.0.2")
        .post(format!("http://{}/mcp/github", h.addr))
        .header("host", "evil.example.com")
        .header("content-type", "application/json")
        .body(call("search_repositories", json!({})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let id = r.headers()["toolgate-decision-id"]
        .to_str()
        .unwrap()
        .to_string();
    let rows = h.sink.rows.lock().unwrap().clone();
    assert!(
        rows.iter()
            .any(|x| x.id == id && x.outcome == "refused_host"),
        "{rows:?}"
    );
    assert_eq!(h.counters.tool_calls.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_upstream_stream_that_ends_unanswered_becomes_a_jsonrpc_error() {
    use axum::response::IntoResponse;
    // An upstream that answers with SSE, sends a progress notification, then hangs up.
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(|| async {
            let body = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\n\n";
            ([("content-type", "text/event-stream")], body).into_response()
        }),
    );
    let up = serve_upstream(app).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let h = start_with(
        &root.join("policies"),
        &format!("  github2: {{url: \"http://{up}/mcp\"}}\n"),
    )
    .await;
    let r = client("127.0.0.2")
        .post(format!("http://{}/mcp/github2", h.addr))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}}).to_string())
        .send()
        .await
        .unwrap();
    let d = r.headers()["toolgate-decision-id"]
        .to_str()
        .unwrap()
        .to_string();
    let text = tokio::time::timeout(std::time::Duration::from_secs(5), r.text())
        .await
        .unwrap()
        .unwrap();
    assert!(text.contains("notifications/progress"), "{text}");
    assert!(
        text.contains("\"id\":1") && text.contains("-31004"),
        "no JSON-RPC error for the request: {text}"
    );
    let outcomes = h.sink.outcomes.lock().unwrap().clone();
    assert!(
        outcomes.contains(&(d, "upstream_error".to_string())),
        "{outcomes:?}"
    );
}

/// The JSON messages of an SSE body.
fn sse_messages(v: &Value) -> Vec<Value> {
    v.as_str()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn server_requests_are_authorized_and_only_delivered_ones_can_be_answered() {
    let h = start().await;
    let ask = json!({"query": "x", "ask": ["sampling/createMessage", "roots/list"]});
    // alice (developer): both requests reach her, then the result.
    let (s, v, _) = rpc(
        &h,
        "127.0.0.2",
        "github",
        call("search_repositories", ask.clone()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let alice = sse_messages(&v);
    let methods: Vec<&str> = alice.iter().filter_map(|m| m["method"].as_str()).collect();
    assert_eq!(methods, ["sampling/createMessage", "roots/list"], "{v}");
    assert_eq!(alice.last().unwrap()["result"]["isError"], false, "{v}");
    // bob (no developer role): sampling is withheld and refused to the server (on bob's
    // session); roots reach him.
    let bob_session = initialize(&h, "127.0.0.3", "github").await;
    let (s, v, _) = rpc_with(
        &h,
        "127.0.0.3",
        "github",
        call("search_repositories", ask),
        &[("mcp-session-id", &bob_session)],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let bob = sse_messages(&v);
    let methods: Vec<&str> = bob.iter().filter_map(|m| m["method"].as_str()).collect();
    assert_eq!(methods, ["roots/list"], "{v}");
    let answer = |id: &str| json!({"jsonrpc": "2.0", "id": id, "result": {"ok": true}});
    let (s, v, _) = rpc(&h, "127.0.0.2", "github", answer("srv-1-0")).await;
    assert_eq!(s, 202, "alice answers her sampling request: {v}");
    for (from, id, why) in [
        ("127.0.0.2", "srv-1-0", "answered already"),
        ("127.0.0.3", "srv-1-0", "withheld from bob"),
        ("127.0.0.3", "srv-9-9", "never sent"),
        ("127.0.0.4", "srv-1-1", "sent to someone else"),
    ] {
        let (s, v, _) = rpc(&h, from, "github", answer(id)).await;
        assert_eq!(s, 400, "{why}: {v}");
        assert_eq!(v["error"]["code"], -32600, "{why}: {v}");
    }
    let (s, _, _) = rpc(&h, "127.0.0.3", "github", answer("srv-1-1")).await;
    assert_eq!(s, 202, "bob answers his roots request");
    // The server saw alice's and bob's real answers, and our refusal of bob's sampling request.
    // They reach it after the 202s (the gateway posts them on): poll, with a deadline, until
    // three answers have arrived and the audit rows are in, then check them exactly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let arrived = h.counters.answers.lock().unwrap().len();
        let audited = {
            let rows = h.sink.rows.lock().unwrap();
            rows.iter()
                .filter(|r| r.method == "sampling/createMessage")
                .count()
                >= 2
                && rows
                    .iter()
                    .filter(|r| r.action == "response" && r.outcome == "refused")
                    .count()
                    >= 4
        };
        if arrived >= 3 && audited {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream got {arrived} of 3 answers (audited: {audited})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let answers = h.counters.answers.lock().unwrap().clone();
    let ok: Vec<&str> = answers
        .iter()
        .filter(|a| a.get("result").is_some())
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(ok, ["srv-1-0", "srv-1-1"], "{answers:?}");
    let sessions = h.counters.answer_sessions.lock().unwrap().clone();
    let refusal = answers
        .iter()
        .position(|a| {
            a["id"] == "srv-1-0"
                && a["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("denied"))
        })
        .expect("the server is told its sampling request was denied");
    assert_eq!(sessions[refusal].as_deref(), Some(bob_session.as_str()));
    // Audited: each server request with its decision, each refused answer.
    let rows = h.sink.rows.lock().unwrap();
    let sampling: Vec<(String, Effect)> = rows
        .iter()
        .filter(|r| r.method == "sampling/createMessage")
        .map(|r| (r.caller.as_ref().unwrap().principal.id.clone(), r.effect))
        .collect();
    assert_eq!(
        sampling,
        [
            ("alice@example.com".to_string(), Effect::Allow),
            ("bob@example.com".to_string(), Effect::Deny)
        ]
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r.action == "response" && r.outcome == "refused")
            .count(),
        4
    );
}

/// Each decision row carries its own caller's replay input (the principal as policy saw it):
/// rendered at a connection's first call and reused by its later ones, never another
/// connection's. Two callers alternate, each over one kept-alive connection.
#[tokio::test]
async fn each_row_carries_its_own_callers_replay_input() {
    let h = start().await;
    let clients = [
        ("127.0.0.2", client("127.0.0.2")),
        ("127.0.0.3", client("127.0.0.3")),
    ];
    for _ in 0..3 {
        for (_, c) in &clients {
            let r = c
                .post(format!("http://{}/mcp/github", h.addr))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .body(
                    call(
                        "get_issue",
                        json!({"owner": "example", "repo": "r", "number": 1}),
                    )
                    .to_string(),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
    }
    let rows = h.sink.rows.lock().unwrap().clone();
    let calls: Vec<_> = rows
        .iter()
        .filter(|r| r.action == "tools/call::get_issue")
        .collect();
    assert_eq!(calls.len(), 6);
    let mut seen = std::collections::BTreeSet::new();
    for r in calls {
        let caller = r.caller.as_ref().unwrap();
        let want = toolgate::audit::record::canonical_json(
            &serde_json::to_value(&caller.principal).unwrap(),
        );
        assert_eq!(
            r.replay.as_ref().unwrap().principal,
            want,
            "{}",
            caller.principal.id
        );
        seen.insert(caller.principal.id.clone());
    }
    assert_eq!(seen.len(), 2, "both callers decided: {seen:?}");
}
