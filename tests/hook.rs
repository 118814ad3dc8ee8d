//! The Aperture hook end to end, in process: static identities (127.0.0.5 is the Aperture
//! node, tagged `tag:aperture`; 127.0.0.2 is a person's laptop), the shipped policies
//! (`policies/aperture_tool.yaml`), an API key file, a fake tailscaled LocalAPI for
//! tagged-device lookups, and an in-memory audit sink. Bodies follow the recorded shape of
//! Aperture's `HookCallData` with Anthropic Messages and OpenAI Chat Completions requests.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use support::fake_localapi::{FakeLocalApi, default_status};
use toolgate::config::{Config, RoleMappings};
use toolgate::gateway::{AuditRow, AuditSink, AuditUnavailable, Commit, Gateway, Sessions};
use toolgate::identity::StaticIdentities;
use toolgate::policy::model::Effect;
use toolgate::policy::store::Store;
use toolgate::server::{self, StaticProvider};

#[derive(Default)]
struct MemorySink {
    rows: Mutex<Vec<AuditRow>>,
    fail: AtomicBool,
}

impl AuditSink for MemorySink {
    fn submit(&self, row: AuditRow) -> Result<Commit, AuditUnavailable> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(AuditUnavailable("queue full".into()));
        }
        self.rows.lock().unwrap().push(row);
        Ok(Box::pin(async { Ok(()) }))
    }
    fn outcome(&self, _id: &str, _outcome: &str, _latency_us: u64) {}
}

const IDENTITIES: &str = r#"
"127.0.0.2": {login: alice@example.com, node: alice-laptop.example.ts.net, node_id: nALICE1}
"127.0.0.5": {node: aperture.example.ts.net, node_id: nAPERTURE1, tags: ["tag:aperture"]}
"127.0.0.6": {node: other.example.ts.net, node_id: nOTHER1, tags: ["tag:ci"]}
"#;

const KEY: &str = "sk-aperture-hook-test-key";
const CAP: &str = "toolgate.dev/cap/toolgate";

struct Harness {
    addr: SocketAddr,
    sink: Arc<MemorySink>,
    _localapi: FakeLocalApi,
    _dir: tempfile::TempDir,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

async fn start() -> Harness {
    start_with("").await
}

/// As [`start`], with `extra` appended to the `hooks.aperture` block (4-space indented keys).
async fn start_with(extra: &str) -> Harness {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hook.key"), format!("{KEY}\n")).unwrap();
    let cfg_text = format!(
        "listen: [\"127.0.0.1:0\"]\ntls: off\nidentity: {{provider: static, static: ids.yaml}}\npolicies: {{dir: {}}}\nhooks:\n  aperture:\n    callers: [tag:aperture]\n    key_file: {}\n{extra}",
        root.join("policies").display(),
        dir.path().join("hook.key").display()
    );
    let config = Config::parse("test.yaml", cfg_text.as_bytes(), root).unwrap();
    toolgate::hook::http::check_config(&config).unwrap();
    let (store, res) = Store::open(&config.policies.dir);
    res.unwrap();
    // A tailscaled whose peers include the tagged CI runner nCI1.
    let localapi = FakeLocalApi::start().await;
    let mut status = default_status();
    status["Peer"]["nodekey:7777777777777777777777777777777777777777777777777777777777777777"] = json!({
        "ID": "nCI1", "PublicKey": "nodekey:7777777777777777777777777777777777777777777777777777777777777777",
        "HostName": "ci-runner", "DNSName": "ci-runner.example.ts.net.", "OS": "linux",
        "UserID": 1001, "TailscaleIPs": ["100.64.0.7"], "Tags": ["tag:ci"], "Online": true
    });
    localapi.set_status(status);
    let sink = Arc::new(MemorySink::default());
    let gw = Arc::new(Gateway {
        config,
        store: Arc::new(store),
        upstreams: Default::default(),
        http: toolgate::gateway::upstream_client().unwrap(),
        sessions: Sessions::default(),
        server_requests: Default::default(),
        annotations: Default::default(),
        allowed_hosts: vec!["127.0.0.1".into(), "localhost".into()],
        audit: sink.clone(),
        metrics: Default::default(),
        localapi: Some(localapi.client()),
        whois: Default::default(),
        list_watchers: Default::default(),
        known_tools: Default::default(),
        in_flight: Default::default(),
        aggregate: Default::default(),
        budget: toolgate::budget::Budget::new(64 << 20),
        shadow: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let provider = Arc::new(StaticProvider {
        identities: StaticIdentities::parse("ids.yaml", IDENTITIES.as_bytes()).unwrap(),
        mappings: RoleMappings::default(),
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(server::serve_listener(
        listener,
        server::router(gw),
        provider,
        None,
        rx,
    ));
    Harness {
        addr,
        sink,
        _localapi: localapi,
        _dir: dir,
        _shutdown: tx,
    }
}

/// POSTs `body` to `path` from `from` with `headers`; status, JSON answer, decision header.
async fn post(
    h: &Harness,
    from: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, Value, String) {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut req = client
        .post(format!("http://{}{path}", h.addr))
        .header("content-type", "application/json");
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
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        decision,
    )
}

const BEARER: (&str, &str) = ("authorization", "Bearer sk-aperture-hook-test-key");

/// From the Aperture node, with the key.
async fn aperture(h: &Harness, path: &str, body: &Value) -> (u16, Value, String) {
    post(h, "127.0.0.5", path, body, &[BEARER]).await
}

fn metadata(login: &str, grants: Value, provider: &str, model: &str) -> Value {
    json!({
        "login_name": login,
        "user_agent": "claude-code/1.0",
        "url": "https://aperture.example.ts.net/v1/messages",
        "model": model,
        "provider": provider,
        "tailnet_name": "example.ts.net",
        "stable_node_id": if login == "tagged-devices" { "nCI1" } else { "nALICE1" },
        "request_id": "req_abc123",
        "session_id": "sess_xyz789",
        "grants": grants
    })
}

fn developer() -> Value {
    json!({CAP: [{"roles": ["developer"]}], "tailscale.com/cap/aperture": [{"models": "**"}]})
}

/// An Anthropic Messages request whose last assistant turn used `uses` (name, input), offering
/// `tools`.
fn anthropic_body(uses: &[(&str, Value)], tools: &[&str]) -> Value {
    let blocks: Vec<Value> = uses
        .iter()
        .enumerate()
        .map(|(i, (n, input))| json!({"type": "tool_use", "id": format!("toolu_0{i}"), "name": n, "input": input}))
        .collect();
    let content: Vec<Value> = std::iter::once(json!({"type": "text", "text": "Looking."}))
        .chain(blocks)
        .collect();
    let results: Vec<Value> = (0..uses.len())
        .map(|i| json!({"type": "tool_result", "tool_use_id": format!("toolu_0{i}"), "content": "ok"}))
        .collect();
    json!({
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 1024,
        "system": "You are a coding agent.",
        "tools": tools.iter().map(|t| json!({"name": t, "description": "d", "input_schema": {"type": "object"}})).collect::<Vec<_>>(),
        "messages": [
            {"role": "user", "content": "tidy the repo"},
            {"role": "assistant", "content": content},
            {"role": "user", "content": results}
        ]
    })
}

fn hook_call(meta: Value, request_body: Value) -> Value {
    json!({"metadata": meta, "user_message": "tidy the repo", "request_body": request_body})
}

fn rows(h: &Harness) -> Vec<AuditRow> {
    h.sink.rows.lock().unwrap().clone()
}

fn row(h: &Harness, id: &str) -> AuditRow {
    rows(h).into_iter().find(|r| r.id == id).unwrap()
}

#[tokio::test]
async fn anthropic_pre_request_allowed_tool_uses_and_a_modify_that_hides_exactly_the_unlisted_tools()
 {
    let h = start().await;
    let body = anthropic_body(
        &[
            ("read_file", json!({"path": "src/main.rs"})),
            ("search_code", json!({"q": "unwrap"})),
            ("run_shell", json!({"command": "cargo fmt"})),
        ],
        &["read_file", "run_shell", "deploy_prod", "search_code"],
    );
    let call = hook_call(
        metadata(
            "alice@example.com",
            developer(),
            "anthropic",
            "claude-sonnet-4",
        ),
        body.clone(),
    );
    let (status, answer, decision) = aperture(&h, "/hooks/aperture/pre_request", &call).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["action"], "modify", "{answer}");
    // Exactly deploy_prod is gone; everything else is the request as sent.
    let mut want = body.clone();
    want["tools"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["name"] != "deploy_prod");
    assert_eq!(answer["request_body"], want);
    let all = rows(&h);
    assert_eq!(all.len(), 4, "three tool uses and the listing");
    for (r, tool) in all.iter().zip(["read_file", "search_code", "run_shell"]) {
        assert_eq!(r.kind, "hook");
        assert_eq!(r.tool, tool);
        assert_eq!(r.action, format!("tools/call::{tool}"));
        assert_eq!(r.effect, Effect::Allow);
        assert_eq!(r.method, "pre_request");
        assert_eq!(r.server, "anthropic");
        assert_eq!(r.outcome, "answered");
        let c = r.caller.as_ref().unwrap();
        assert_eq!(c.principal.id, "alice@example.com");
        assert_eq!(c.principal.roles, ["user", "developer"]);
        assert!(
            r.reason.contains("via Aperture aperture.example.ts.net"),
            "{}",
            r.reason
        );
    }
    assert_eq!(
        all[2].arguments,
        Some(Arc::new(json!({"command": "cargo fmt"})))
    );
    let list = &all[3];
    assert_eq!(list.id, decision);
    assert_eq!(list.action, "tools/list");
    assert_eq!(list.outcome, "modified");
    assert!(
        list.reason
            .contains("hidden (tools/list denied): deploy_prod;"),
        "{}",
        list.reason
    );
}

#[tokio::test]
async fn anthropic_pre_request_a_denied_tool_use_blocks_naming_the_tool_and_the_decision() {
    let h = start().await;
    // Alice is a developer, but sudo is not allowed.
    let call = hook_call(
        metadata(
            "alice@example.com",
            developer(),
            "anthropic",
            "claude-sonnet-4",
        ),
        anthropic_body(
            &[
                ("read_file", json!({"path": "/etc/hosts"})),
                ("run_shell", json!({"command": "sudo rm -rf /"})),
            ],
            &["read_file", "run_shell"],
        ),
    );
    let (status, answer, decision) = aperture(&h, "/hooks/aperture/pre_request", &call).await;
    assert_eq!(status, 200);
    assert_eq!(answer["action"], "block", "{answer}");
    assert_eq!(answer["status_code"], 403);
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("\"run_shell\""), "{message}");
    assert!(message.contains(&decision), "{message}");
    let denied = row(&h, &decision);
    assert_eq!(denied.tool, "run_shell");
    assert_eq!(denied.effect, Effect::Deny);
    assert_eq!(denied.outcome, "blocked");
    assert_eq!(
        denied.arguments,
        Some(Arc::new(json!({"command": "sudo rm -rf /"})))
    );
    // Without the developer grant the shell is denied too: grants decide.
    let call = hook_call(
        metadata(
            "alice@example.com",
            json!({}),
            "anthropic",
            "claude-sonnet-4",
        ),
        anthropic_body(&[("run_shell", json!({"command": "ls"}))], &[]),
    );
    let (_, answer, _) = aperture(&h, "/hooks/aperture/pre_request", &call).await;
    assert_eq!(answer["action"], "block", "{answer}");
}

fn openai_body(calls: &[(&str, &str)], tools: &[&str]) -> Value {
    let tool_calls: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(i, (n, args))| json!({"id": format!("call_{i}"), "type": "function", "function": {"name": n, "arguments": args}}))
        .collect();
    let mut messages = vec![
        json!({"role": "system", "content": "You are helpful."}),
        json!({"role": "user", "content": "what's in the readme"}),
    ];
    if !tool_calls.is_empty() {
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": tool_calls}));
        for i in 0..calls.len() {
            messages.push(
                json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": "..."}),
            );
        }
    }
    json!({
        "model": "gpt-5",
        "messages": messages,
        "tools": tools.iter().map(|t| json!({"type": "function", "function": {"name": t, "parameters": {"type": "object"}}})).collect::<Vec<_>>(),
        "tool_choice": "auto"
    })
}

#[tokio::test]
async fn openai_pre_request_allow_block_and_modify() {
    let h = start().await;
    let meta = metadata("alice@example.com", json!({}), "openai", "gpt-5");
    // Allow: a read tool used and only listed tools offered.
    let call = hook_call(
        meta.clone(),
        openai_body(&[("read_file", r#"{"path":"README.md"}"#)], &["read_file"]),
    );
    let (status, answer, decision) = aperture(&h, "/hooks/aperture/pre_request", &call).await;
    assert_eq!((status, &answer), (200, &json!({"action": "allow"})));
    assert_eq!(row(&h, &decision).effect, Effect::Allow);
    assert_eq!(
        rows(&h)[0].arguments,
        Some(Arc::new(json!({"path": "README.md"})))
    );
    // Block: the shell is not for plain users.
    let call = hook_call(
        meta.clone(),
        openai_body(&[("run_shell", r#"{"command":"ls"}"#)], &["read_file"]),
    );
    let (_, answer, decision) = aperture(&h, "/hooks/aperture/pre_request", &call).await;
    assert_eq!(answer["action"], "block");
    assert!(answer["message"].as_str().unwrap().contains(&decision));
    // Modify: the shell and the deploy tool are hidden, read_file stays.
    let body = openai_body(&[], &["run_shell", "read_file", "deploy_prod"]);
    let (_, answer, _) = aperture(
        &h,
        "/hooks/aperture/pre_request",
        &hook_call(meta.clone(), body.clone()),
    )
    .await;
    assert_eq!(answer["action"], "modify", "{answer}");
    assert_eq!(answer["request_body"]["tools"], json!([body["tools"][1]]));
    assert_eq!(answer["request_body"]["messages"], body["messages"]);
    // Everything hidden: tools and tool_choice go (providers refuse an empty list).
    let body = openai_body(&[], &["run_shell"]);
    let (_, answer, _) = aperture(
        &h,
        "/hooks/aperture/pre_request",
        &hook_call(meta.clone(), body),
    )
    .await;
    assert_eq!(answer["action"], "modify");
    assert!(answer["request_body"].get("tools").is_none());
    assert!(answer["request_body"].get("tool_choice").is_none());
    // A tool_choice that forces a hidden tool blocks.
    let mut body = openai_body(&[], &["run_shell", "read_file"]);
    body["tool_choice"] = json!({"type": "function", "function": {"name": "run_shell"}});
    let (_, answer, decision) =
        aperture(&h, "/hooks/aperture/pre_request", &hook_call(meta, body)).await;
    assert_eq!(answer["action"], "block", "{answer}");
    assert_eq!(row(&h, &decision).effect, Effect::Deny);
}

#[tokio::test]
async fn post_response_tool_calls_are_audited_as_observed() {
    let h = start().await;
    let call = json!({
        "metadata": metadata("alice@example.com", json!({}), "anthropic", "claude-sonnet-4"),
        "tool_calls": [
            {"name": "read_file", "params": {"path": "a"}},
            {"name": "run_shell", "params": {"command": "ls"}}
        ],
        "response_body": {"type": "message", "content": []}
    });
    let (status, answer, _) = aperture(&h, "/hooks/aperture/post_response", &call).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["observed"], 2);
    let all = rows(&h);
    assert_eq!(all.len(), 2);
    assert!(
        all.iter()
            .all(|r| r.outcome == "observed" && r.method == "post_response" && r.kind == "hook")
    );
    assert_eq!(
        (all[0].tool.as_str(), all[0].effect),
        ("read_file", Effect::Allow)
    );
    assert_eq!(
        (all[1].tool.as_str(), all[1].effect),
        ("run_shell", Effect::Deny)
    );
    // The shared URL infers the event: tool_calls → post-response (no GuardrailResponse).
    let (_, answer, _) = aperture(&h, "/hooks/aperture", &call).await;
    assert_eq!(answer["observed"], 2, "{answer}");
    assert_eq!(rows(&h).len(), 4);
    // Without tool_calls the response body is read (OpenAI shape).
    let call = json!({
        "metadata": metadata("alice@example.com", json!({}), "openai", "gpt-5"),
        "response_body": {"choices": [{"message": {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "deploy_prod", "arguments": "{}"}}]}}]}
    });
    let (_, answer, decision) = aperture(&h, "/hooks/aperture", &call).await;
    assert_eq!(answer["observed"], 1, "{answer}");
    let r = row(&h, &decision);
    assert_eq!(
        (r.tool.as_str(), r.effect, r.outcome.as_str()),
        ("deploy_prod", Effect::Deny, "observed")
    );
    // And a body without any of those fields on the shared URL is a pre_request.
    let call = hook_call(
        metadata(
            "alice@example.com",
            json!({}),
            "anthropic",
            "claude-sonnet-4",
        ),
        anthropic_body(&[], &["read_file"]),
    );
    let (_, answer, _) = aperture(&h, "/hooks/aperture", &call).await;
    assert_eq!(answer, json!({"action": "allow"}));
}

#[tokio::test]
async fn tagged_devices_are_resolved_through_the_node_or_refused() {
    let h = start().await;
    // nCI1 is a peer tagged tag:ci: it is the principal, never "tagged-devices".
    let call = hook_call(
        metadata("tagged-devices", json!({}), "anthropic", "claude-sonnet-4"),
        anthropic_body(&[("read_file", json!({"path": "x"}))], &[]),
    );
    let (_, answer, decision) = aperture(&h, "/hooks/aperture/pre_request", &call).await;
    assert_eq!(answer, json!({"action": "allow"}));
    let r = row(&h, &decision);
    let c = r.caller.as_ref().unwrap();
    assert_eq!(c.principal.id, "ci-runner.example.ts.net");
    assert_eq!(c.principal.roles, ["tagged", "tag:ci"]);
    assert_eq!(c.principal.attr["login"], "");
    // The same login with an unknown node: refused with a clear reason, audited.
    let mut call = call;
    call["metadata"]["stable_node_id"] = json!("nNOBODY");
    let (status, answer, decision) = aperture(&h, "/hooks/aperture/pre_request", &call).await;
    assert_eq!(status, 200);
    assert_eq!(answer["action"], "block");
    let m = answer["message"].as_str().unwrap();
    assert!(
        m.contains("tagged device nNOBODY is unknown") && m.contains(&decision),
        "{m}"
    );
    assert_eq!(row(&h, &decision).outcome, "refused");
}

#[tokio::test]
async fn only_the_aperture_node_with_its_key_may_call() {
    let h = start().await;
    let call = hook_call(
        metadata(
            "alice@example.com",
            developer(),
            "anthropic",
            "claude-sonnet-4",
        ),
        anthropic_body(&[("run_shell", json!({"command": "ls"}))], &[]),
    );
    // A person's node, even with the key.
    let (status, answer, decision) = post(
        &h,
        "127.0.0.2",
        "/hooks/aperture/pre_request",
        &call,
        &[BEARER],
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["action"], "block");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("not an Aperture node")
    );
    let r = row(&h, &decision);
    assert_eq!((r.kind, r.outcome.as_str()), ("hook", "refused"));
    assert_eq!(r.caller.as_ref().unwrap().principal.id, "alice@example.com");
    // Another tagged node.
    let (status, _, _) = post(
        &h,
        "127.0.0.6",
        "/hooks/aperture/pre_request",
        &call,
        &[BEARER],
    )
    .await;
    assert_eq!(status, 403);
    // The Aperture node without a key, with a wrong one, with a non-Bearer Authorization.
    for headers in [
        vec![],
        vec![("authorization", "Bearer sk-wrong")],
        vec![("x-api-key", "sk-aperture-hook-test-key-")],
        vec![("authorization", "Basic c2stYXBlcnR1cmU=")],
        vec![BEARER, ("x-api-key", "sk-wrong")],
    ] {
        let (status, answer, _) = post(
            &h,
            "127.0.0.5",
            "/hooks/aperture/pre_request",
            &call,
            &headers,
        )
        .await;
        assert_eq!(status, 401, "{headers:?}: {answer}");
        assert_eq!(answer["action"], "block");
    }
    // X-Api-Key works as well as Bearer.
    let (status, answer, _) = post(
        &h,
        "127.0.0.5",
        "/hooks/aperture/pre_request",
        &call,
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!((status, answer["action"].as_str()), (200, Some("allow")));
    assert!(rows(&h).iter().filter(|r| r.outcome == "refused").count() >= 7);
}

#[tokio::test]
async fn bad_input_blocks_with_a_clear_reason() {
    let h = start().await;
    let meta = metadata(
        "alice@example.com",
        developer(),
        "anthropic",
        "claude-sonnet-4",
    );
    let cases: Vec<(Value, &str)> = vec![
        // request_body in no known provider format.
        (
            hook_call(meta.clone(), json!({"model": "x", "prompt": "hello"})),
            "no known provider format",
        ),
        // Tool params that are not an object (Anthropic input, OpenAI arguments, tool_calls).
        (
            hook_call(
                meta.clone(),
                anthropic_body(&[("run_shell", json!("rm -rf /"))], &[]),
            ),
            "messages[1].content[1].input (run_shell): tool params must be a JSON object, not a string",
        ),
        (
            hook_call(meta.clone(), openai_body(&[("run_shell", "[\"ls\"]")], &[])),
            "tool_calls[0].function.arguments (run_shell)",
        ),
        (
            json!({"metadata": meta, "tool_calls": [{"name": "run_shell", "params": 7}]}),
            "$.tool_calls[0].params (run_shell): tool params must be a JSON object, not a number",
        ),
        (json!({"request_body": {}}), "$.metadata: missing"),
        (
            hook_call(json!({"login_name": ""}), json!({"messages": []})),
            "login_name is empty",
        ),
        (json!({"metadata": meta}), "no request_body"),
    ];
    for (body, want) in cases {
        let (status, answer, decision) = aperture(&h, "/hooks/aperture/pre_request", &body).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(answer["action"], "block", "{body}: {answer}");
        let m = answer["message"].as_str().unwrap();
        assert!(m.contains(want), "want {want:?} in {m:?}");
        assert_eq!(row(&h, &decision).outcome, "refused");
    }
    // Post-response bad input is refused too (Aperture ignores the answer; the row stays).
    let body = json!({"metadata": meta, "tool_calls": [{"name": "x", "params": "y"}]});
    let (_, answer, decision) = aperture(&h, "/hooks/aperture/post_response", &body).await;
    assert_eq!(answer["action"], "block");
    assert_eq!(row(&h, &decision).outcome, "refused");
    // Not JSON, duplicate keys, and an oversize body.
    for raw in [
        "{not json".to_string(),
        r#"{"metadata":{"login_name":"a@b.c","login_name":"admin@b.c"}}"#.to_string(),
    ] {
        let client = reqwest::Client::builder()
            .local_address("127.0.0.5".parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap();
        let r = client
            .post(format!("http://{}/hooks/aperture/pre_request", h.addr))
            .header("authorization", format!("Bearer {KEY}"))
            .body(raw)
            .send()
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["action"], "block", "{v}");
        assert!(
            v["message"].as_str().unwrap().contains("invalid JSON"),
            "{v}"
        );
    }
    // The audit store refusing: nothing is allowed.
    h.sink.fail.store(true, Ordering::SeqCst);
    let call = hook_call(
        meta.clone(),
        anthropic_body(&[("read_file", json!({}))], &[]),
    );
    let (_, answer, _) = aperture(&h, "/hooks/aperture/pre_request", &call).await;
    assert_eq!(answer["action"], "block", "{answer}");
    assert_eq!(answer["status_code"], 503);
}

#[tokio::test]
async fn an_oversize_body_is_blocked_with_the_documented_error_and_nothing_is_allowed() {
    // The smallest limit the config accepts, so the test body stays small.
    let h = start_with("    max_body: 1024\n").await;
    let meta = metadata(
        "alice@example.com",
        developer(),
        "anthropic",
        "claude-sonnet-4",
    );
    // A tool use the shipped policies allow for this developer, padded past the limit: were the
    // limit not enforced, this would be answered `allow`.
    let small = hook_call(
        meta.clone(),
        anthropic_body(&[("read_file", json!({"path": "README.md"}))], &[]),
    );
    let (status, answer, _) = aperture(&h, "/hooks/aperture/pre_request", &small).await;
    assert_eq!(
        (status, answer["action"].as_str()),
        (200, Some("allow")),
        "{answer}"
    );
    let padded = hook_call(
        meta.clone(),
        anthropic_body(
            &[(
                "read_file",
                json!({"path": "README.md", "pad": "x".repeat(2048)}),
            )],
            &[],
        ),
    );
    assert!(padded.to_string().len() > 1024);
    let before = rows(&h).len();
    for path in [
        "/hooks/aperture/pre_request",
        "/hooks/aperture",
        "/hooks/aperture/post_response",
    ] {
        let (status, answer, decision) = aperture(&h, path, &padded).await;
        assert_eq!(status, 200, "{path}: {answer}");
        assert_eq!(answer["action"], "block", "{path}: {answer}");
        assert_eq!(answer["status_code"], 413, "{path}: {answer}");
        let m = answer["message"].as_str().unwrap();
        assert!(
            m.contains("could not be read within hooks.aperture.max_body (1024 bytes)"),
            "{path}: {m}"
        );
        let r = row(&h, &decision);
        assert_eq!(r.outcome, "refused", "{path}");
        assert_ne!(r.effect, Effect::Allow, "{path}");
    }
    // Chunked (no Content-Length), so the limit is met while streaming, not from the header.
    let client = reqwest::Client::builder()
        .local_address("127.0.0.5".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let chunks: Vec<Result<String, std::io::Error>> = vec![
        Ok(padded.to_string()[..600].to_string()),
        Ok(padded.to_string()[600..].to_string()),
    ];
    let r = client
        .post(format!("http://{}/hooks/aperture/pre_request", h.addr))
        .header("authorization", format!("Bearer {KEY}"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(
        (v["action"].as_str(), v["status_code"].as_u64()),
        (Some("block"), Some(413)),
        "{v}"
    );
    // Four refusals, no allowed row among the new ones, and the server still answers.
    let new: Vec<AuditRow> = rows(&h).into_iter().skip(before).collect();
    assert_eq!(new.len(), 4, "{new:?}");
    assert!(
        new.iter()
            .all(|r| r.outcome == "refused" && r.effect != Effect::Allow)
    );
    let (status, answer, _) = aperture(&h, "/hooks/aperture/pre_request", &small).await;
    assert_eq!(
        (status, answer["action"].as_str()),
        (200, Some("allow")),
        "{answer}"
    );
}
