//! The aggregated endpoint `/mcp` over several servers (stdio fixtures here; real SDK peers,
//! HTTP and stdio mixed, in tests/stdio_peers.rs): prefixed names, routing, merged pages that
//! lose nothing, a down server left out, URI routing with ambiguity refused, a cancel routed to
//! the server of the call in flight, `logging/setLevel` audited and refused when no server
//! takes it, and list changes (from servers and from policy reloads) told once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

#[path = "peers/harness.rs"]
mod harness;

use std::path::Path;
use std::time::Duration;

use harness::{ALICE, BOB, Gateway, client_from, repo_root};
use serde_json::{Value, json};

fn fixture(name: &str, modes: &str, fixture_name: &str) -> String {
    format!(
        "  {name}:\n    command: [python3, \"{}\", \"{modes}\"]\n    env: {{FIXTURE_NAME: {fixture_name}}}\n    timeout: 5s\n",
        repo_root().join("tests/peers/stdio_fixture.py").display()
    )
}

async fn start_in(policies: &Path, servers: &str) -> Gateway {
    Gateway::start_with(
        policies,
        servers,
        "audit:\n  sqlite: audit.db\n  mode: sync\n  durability: normal\n  arguments: full\n",
    )
    .await
}

async fn start(servers: &str) -> Gateway {
    start_in(&repo_root().join("tests/peers/stdio_policies"), servers).await
}

/// A client of `/mcp` from one source address.
struct Client {
    base: String,
    http: reqwest::Client,
    sid: String,
    next: i64,
}

struct Answer {
    status: u16,
    decision: String,
    json: Value,
}

impl Client {
    async fn open(gw: &Gateway, from: &str) -> Client {
        let http = client_from(from);
        let base = format!("{}/mcp", gw.base());
        let r = http
            .post(&base)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let sid = r.headers()["mcp-session-id"].to_str().unwrap().to_string();
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v["result"]["serverInfo"]["name"], json!("toolgate"));
        Client {
            base,
            http,
            sid,
            next: 1,
        }
    }

    /// A POST of `body` on this client's session.
    fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(&self.base)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .header("mcp-session-id", &self.sid)
            .header("mcp-protocol-version", "2025-11-25")
            .body(serde_json::to_vec(body).unwrap())
    }

    async fn rpc(&mut self, method: &str, params: Value) -> Answer {
        self.next += 1;
        let body = json!({"jsonrpc": "2.0", "id": self.next, "method": method, "params": params});
        let r = self.post(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let decision = r
            .headers()
            .get("toolgate-decision-id")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = r.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}));
        Answer {
            status,
            decision,
            json,
        }
    }

    /// Every item of a list method, following the aggregate cursor; and the page count.
    async fn list_all(&mut self, method: &str, key: &str) -> (Vec<Value>, usize) {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let a = self.rpc(method, params).await;
            assert_eq!(a.status, 200, "{}", a.json);
            items.extend(a.json["result"][key].as_array().unwrap().iter().cloned());
            pages += 1;
            match a.json["result"]["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return (items, pages),
            }
            assert!(pages < 20, "runaway pagination");
        }
    }
}

fn names(items: &[Value], key: &str) -> Vec<String> {
    let mut v: Vec<String> = items
        .iter()
        .map(|i| i[key].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_across_two_servers_lose_nothing() {
    let gw = start(
        &[
            fixture("alpha", "pages", "alpha"),
            fixture("beta", "pages", "beta"),
        ]
        .concat(),
    )
    .await;
    let mut c = Client::open(&gw, ALICE).await;
    let (tools, pages) = c.list_all("tools/list", "tools").await;
    let mut want = Vec::new();
    for s in ["alpha", "beta"] {
        for k in 0..6 {
            want.push(format!("{s}__{s}_tool_{k}"));
        }
    }
    want.sort();
    assert_eq!(names(&tools, "name"), want);
    assert_eq!(
        pages, 3,
        "each server has three pages; they are walked side by side"
    );
    let (prompts, _) = c.list_all("prompts/list", "prompts").await;
    assert_eq!(prompts.len(), 12);
    // Resources keep their URIs (alice may list them).
    let (resources, _) = c.list_all("resources/list", "resources").await;
    assert!(names(&resources, "uri").contains(&"fixture://beta/5".to_string()));
    // A cursor we did not issue is refused.
    let bad = c.rpc("tools/list", json!({"cursor": "bogus"})).await;
    assert_eq!(bad.json["error"]["code"], json!(-32602), "{}", bad.json);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_routed_and_authorized_as_on_the_server_route() {
    let gw = start(
        &[
            fixture("alpha", "echo", "alpha"),
            fixture("beta", "echo", "beta"),
        ]
        .concat(),
    )
    .await;
    let mut c = Client::open(&gw, BOB).await;
    let (tools, _) = c.list_all("tools/list", "tools").await;
    let tools = names(&tools, "name");
    assert!(
        tools.contains(&"alpha__echo".to_string()) && tools.contains(&"beta__get_sum".to_string())
    );
    assert!(!tools.iter().any(|t| t.ends_with("__secret")), "{tools:?}");
    let a = c
        .rpc(
            "tools/call",
            json!({"name": "beta__echo", "arguments": {"v": 1}}),
        )
        .await;
    assert_eq!(
        a.json["result"]["content"][0]["text"],
        json!("{\"v\": 1}"),
        "{}",
        a.json
    );
    let row = gw.row(&a.decision).await.unwrap();
    assert_eq!(
        (
            row.server.as_str(),
            row.tool.as_str(),
            row.effect.as_str(),
            row.outcome.as_str()
        ),
        ("beta", "echo", "allow", "forwarded")
    );
    // The argument rule holds here as on /mcp/beta.
    let big = c
        .rpc(
            "tools/call",
            json!({"name": "beta__get_sum", "arguments": {"a": 99, "b": 2}}),
        )
        .await;
    assert_eq!(big.json["result"]["isError"], json!(true), "{}", big.json);
    assert_eq!(gw.row(&big.decision).await.unwrap().effect, "deny");
    // Hidden, unknown and unprefixed names are all "unknown".
    for name in ["alpha__secret", "gamma__echo", "echo"] {
        let a = c
            .rpc("tools/call", json!({"name": name, "arguments": {}}))
            .await;
        assert_eq!(a.json["error"]["code"], json!(-32602), "{name}: {}", a.json);
    }
    // Prompts are routed by name too.
    let p = c
        .rpc("prompts/get", json!({"name": "alpha__alpha_prompt_1"}))
        .await;
    assert_eq!(
        p.json["result"]["messages"][0]["content"]["text"],
        json!("alpha: alpha_prompt_1"),
        "{}",
        p.json
    );
    gw.stop().await;
}

/// The endpoint's own requests on a server's session (its `initialize`, its list pages) share
/// that session with the client's calls, one in flight per id. They used ids 0 and 1, so a
/// client call with id 1 still running upstream made the next list refuse the endpoint's own
/// page and leave that server out (found by an attacker's read, stop 31).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_in_flight_never_collides_with_the_endpoints_own() {
    let gw = start(&fixture("alpha", "echo,hang", "alpha")).await;
    let mut c = Client::open(&gw, ALICE).await;
    let (tools, _) = c.list_all("tools/list", "tools").await;
    assert!(names(&tools, "name").contains(&"alpha__echo".to_string()));
    // Calls with ids 0 and 1 that alpha never answers (its `hang` tool), left in flight.
    for id in [0, 1] {
        let req = c.post(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                                 "params": {"name": "alpha__hang", "arguments": {}}}));
        tokio::spawn(req.send());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (tools, _) = c.list_all("tools/list", "tools").await;
    assert!(
        names(&tools, "name").contains(&"alpha__echo".to_string()),
        "alpha was left out of the list: {tools:?}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_server_of_the_call_in_flight() {
    // A long call timeout: on timing out, alpha's route cancels the call itself, and that
    // cancel must not stand in for the client's.
    let server =
        fixture("alpha", "echo,hang,cancels", "alpha").replace("timeout: 5s", "timeout: 120s");
    let gw = start(&server).await;
    let mut c = Client::open(&gw, ALICE).await;
    // What alpha has seen: the ids of the `hang` calls it holds, and of the cancels it heard
    // (or, while that answer is not a text, the answer itself).
    async fn seen(c: &mut Client) -> Value {
        let a = c
            .rpc(
                "tools/call",
                json!({"name": "alpha__echo", "arguments": {}}),
            )
            .await;
        a.json["result"]["content"][0]["text"]
            .as_str()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or(a.json)
    }
    async fn until(c: &mut Client, key: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..100 {
            last = seen(c).await;
            if last[key].as_array().is_some_and(|a| !a.is_empty()) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("alpha never saw a {key} request: {last}");
    }
    // A call alpha never answers, in flight when the client cancels it.
    let req = c.post(
        &json!({"jsonrpc": "2.0", "id": "slow-7", "method": "tools/call",
                             "params": {"name": "alpha__hang", "arguments": {}}}),
    );
    let pending = tokio::spawn(req.send());
    let hung = until(&mut c, "hung").await["hung"][0].clone();
    let r = c
        .post(
            &json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                      "params": {"requestId": "slow-7", "reason": "the user gave up"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // alpha hears the cancel under the id it knows the call by (its route renumbers the ids of
    // a stdio session), and only that one.
    let v = until(&mut c, "cancelled").await;
    assert_eq!(v["cancelled"], json!([hung]), "{v}");
    pending.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_level_is_audited_and_refused_when_no_server_takes_it() {
    let gw = start(&fixture("alpha", "echo", "alpha")).await;
    let mut c = Client::open(&gw, ALICE).await;
    // No server session open yet: `{}`, with a row of its own.
    let a = c.rpc("logging/setLevel", json!({"level": "debug"})).await;
    assert_eq!(a.json["result"], json!({}), "{}", a.json);
    assert!(!a.decision.is_empty(), "no decision id");
    assert_eq!(
        gw.row(&a.decision).await.unwrap().method,
        "logging/setLevel"
    );
    // A list opens alpha's session. alpha has no logging (-32601): the client hears that,
    // naming alpha, not `{}`.
    c.list_all("tools/list", "tools").await;
    let a = c.rpc("logging/setLevel", json!({"level": "debug"})).await;
    assert_eq!(a.json["error"]["code"], json!(-32601), "{}", a.json);
    let why = a.json["error"]["message"].as_str().unwrap();
    assert!(why.contains("no server took the level: alpha: "), "{why}");
    assert!(gw.row(&a.decision).await.is_some(), "{}", a.decision);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_server_is_left_out_of_lists() {
    let servers = [
        fixture("alpha", "echo", "alpha"),
        "  broken:\n    command: [/nonexistent/mcp-server]\n    timeout: 5s\n".to_string(),
    ]
    .concat();
    let gw = start(&servers).await;
    let mut c = Client::open(&gw, ALICE).await;
    let (tools, _) = c.list_all("tools/list", "tools").await;
    let tools = names(&tools, "name");
    assert!(tools.contains(&"alpha__echo".to_string()), "{tools:?}");
    assert!(!tools.iter().any(|t| t.starts_with("broken__")));
    let a = c
        .rpc(
            "tools/call",
            json!({"name": "broken__echo", "arguments": {}}),
        )
        .await;
    assert!(a.json["error"].is_object(), "{}", a.json);
    // Refused before broken's route decided anything: audited on the endpoint itself.
    let row = gw
        .row(&a.decision)
        .await
        .expect("no audit row for the refusal");
    assert_eq!((row.effect, row.server), ("deny".into(), "broken".into()));
    assert_eq!(row.outcome, "upstream_error:unavailable");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_route_by_uri_and_ambiguity_is_refused() {
    let servers = [
        fixture("alpha", "pages", "alpha"),
        fixture("twin1", "pages", "twin"),
        fixture("twin2", "pages", "twin"),
    ]
    .concat();
    let gw = start(&servers).await;
    let mut c = Client::open(&gw, ALICE).await;
    // Read before any list: the endpoint learns the URIs itself.
    let r = c
        .rpc("resources/read", json!({"uri": "fixture://alpha/3"}))
        .await;
    assert_eq!(
        r.json["result"]["contents"][0]["text"],
        json!("alpha says hi"),
        "{}",
        r.json
    );
    assert_eq!(gw.row(&r.decision).await.unwrap().server, "alpha");
    let amb = c
        .rpc("resources/read", json!({"uri": "fixture://twin/0"}))
        .await;
    let msg = amb.json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("ambiguous") && msg.contains("twin1") && msg.contains("twin2"),
        "{}",
        amb.json
    );
    let unknown = c
        .rpc("resources/read", json!({"uri": "fixture://nowhere/0"}))
        .await;
    assert!(
        unknown.json["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown resource"),
        "{}",
        unknown.json
    );
    // Learning lists every server's resources: more unknown URIs right after buy no more
    // upstream lists (they are refused on what was learned).
    let lists = |rows: &[toolgate::audit::Row]| {
        rows.iter()
            .filter(|r| r.method.starts_with("resources/"))
            .filter(|r| r.method.ends_with("list"))
            .count()
    };
    let before = lists(&gw.rows().await);
    for i in 1..4 {
        let again = c
            .rpc(
                "resources/read",
                json!({"uri": format!("fixture://nowhere/{i}")}),
            )
            .await;
        assert!(again.json["error"].is_object(), "{}", again.json);
    }
    assert_eq!(
        lists(&gw.rows().await),
        before,
        "unknown URIs made the endpoint list again"
    );
    // Refusals are audited.
    let rows = gw.rows().await;
    assert!(
        rows.iter()
            .any(|r| r.id == amb.decision && r.effect == "deny")
    );
    gw.stop().await;
}

/// Reads SSE `data:` payloads from `resp` until `done` says stop (bounded).
async fn read_events(
    resp: &mut reqwest::Response,
    within: Duration,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while !done(&out) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Ok(Some(chunk))) = tokio::time::timeout(left, resp.chunk()).await else {
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            for line in ev.lines() {
                if let Some(d) = line.strip_prefix("data: ") {
                    if let Ok(v) = serde_json::from_str(d) {
                        out.push(v);
                    }
                }
            }
        }
    }
    out
}

fn count(events: &[Value], method: &str) -> usize {
    events
        .iter()
        .filter(|e| e["method"] == json!(method))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_changes_reach_the_client_once() {
    let dir = tempfile::tempdir().unwrap();
    let policy = repo_root().join("tests/peers/stdio_policies/stdio.yaml");
    std::fs::copy(&policy, dir.path().join("stdio.yaml")).unwrap();
    let gw = start_in(
        dir.path(),
        &[
            fixture("alpha", "notify", "alpha"),
            fixture("beta", "notify", "beta"),
        ]
        .concat(),
    )
    .await;
    let mut c = Client::open(&gw, BOB).await;
    c.list_all("tools/list", "tools").await;
    let mut stream = c
        .http
        .get(&c.base)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &c.sid)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Both servers' streams are relayed once their children have a listener.
    let streams = |s: &str| match &gw.gateway.upstreams[s].transport {
        toolgate::mcp::transport::Transport::Stdio(x) => x.streams(),
        toolgate::mcp::transport::Transport::Http(_) => 0,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while streams("alpha") == 0 || streams("beta") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server streams did not open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both servers announce a change after each call: the client hears it once.
    for s in ["alpha", "beta", "alpha"] {
        let a = c
            .rpc(
                "tools/call",
                json!({"name": format!("{s}__echo"), "arguments": {}}),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.json);
    }
    let ev = read_events(&mut stream, Duration::from_secs(3), |_| false).await;
    assert_eq!(count(&ev, "notifications/tools/list_changed"), 1, "{ev:?}");
    // Listing again re-arms it.
    c.list_all("tools/list", "tools").await;
    c.rpc("tools/call", json!({"name": "beta__echo", "arguments": {}}))
        .await;
    let ev = read_events(&mut stream, Duration::from_secs(5), |e| {
        count(e, "notifications/tools/list_changed") >= 1
    })
    .await;
    assert_eq!(count(&ev, "notifications/tools/list_changed"), 1, "{ev:?}");
    // A policy reload that hides echo on both servers: one notification again.
    c.list_all("tools/list", "tools").await;
    let text = std::fs::read_to_string(dir.path().join("stdio.yaml")).unwrap();
    std::fs::write(
        dir.path().join("stdio.yaml"),
        text.replace("\"tools/list::echo\", ", ""),
    )
    .unwrap();
    gw.gateway.store.reload().unwrap();
    assert!(
        gw.gateway.policies_changed() >= 2,
        "both server streams are told"
    );
    let ev = read_events(&mut stream, Duration::from_secs(3), |_| false).await;
    assert_eq!(count(&ev, "notifications/tools/list_changed"), 1, "{ev:?}");
    drop(stream);
    gw.stop().await;
}
