//! The audit join (issue 5, part 6), the invariant "nothing unaudited": under concurrent load,
//! the set of tool calls the upstream executed equals EXACTLY the set of allow rows whose
//! outcome is `forwarded`, matched by tool and arguments (stored in `full` mode).
//!
//! 500 calls from 3 identities (alice, bob, ci), 24 at a time, through the real gateway
//! (`daemon::build` + `daemon::run`) with the real SQLite audit store in sync mode, against the
//! built-in sample upstream, which records every call it executes. The mix: allowed calls,
//! name-level denies (hidden tools), argument-level denies, and list requests. Every argument set
//! is unique, so the comparison is a set comparison without ambiguity.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

#[path = "peers/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use harness::{ALICE, BOB, CI, CountingUpstream, Gateway, principal_of};
use serde_json::{Value, json};
use toolgate::audit::record::canonical_json;

const CALLS: usize = 500;
const CONCURRENCY: usize = 24;

/// What a call should come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Expect {
    /// Runs upstream.
    Allowed,
    /// `-32602 Unknown tool`: hidden from this caller.
    Hidden,
    /// An `isError` result naming the decision: visible tool, arguments denied.
    ArgumentDenied,
    /// A `tools/list`: forwarded, nothing executed.
    List,
}

/// Call `i`: who, what, and what it should come to.
fn plan(i: usize) -> (&'static str, Value, Expect) {
    let ip = [ALICE, BOB, CI][i % 3];
    let call = |tool: &str, args: Value| json!({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": args}});
    let n = format!("n{i}");
    match (i / 3) % 6 {
        0 | 1 => (
            ip,
            call("search_repositories", json!({"query": n})),
            Expect::Allowed,
        ),
        2 if ip == ALICE => (
            ip,
            call(
                "create_issue",
                json!({"owner": "example", "repo": "r", "title": n}),
            ),
            Expect::Allowed,
        ),
        2 => (
            ip,
            call(
                "create_issue",
                json!({"owner": "example", "repo": "r", "title": n}),
            ),
            Expect::Hidden,
        ),
        3 if ip == ALICE => (
            ip,
            call(
                "create_issue",
                json!({"owner": "evil", "repo": "r", "title": n}),
            ),
            Expect::ArgumentDenied,
        ),
        3 => (
            ip,
            call(
                "get_issue",
                json!({"owner": "example", "repo": n, "number": 1}),
            ),
            Expect::Allowed,
        ),
        4 => (
            ip,
            call("delete_repository", json!({"owner": "example", "repo": n})),
            Expect::Hidden,
        ),
        _ => (
            ip,
            json!({"jsonrpc": "2.0", "id": i, "method": "tools/list"}),
            Expect::List,
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executed_calls_equal_forwarded_allow_rows_exactly() {
    let up = CountingUpstream::start().await;
    let gw = Gateway::start(&[("sample", up.url())], "").await;
    assert_eq!(
        gw.gateway.config.audit.mode,
        toolgate::config::AuditMode::Sync
    );
    let url = format!("{}/mcp/sample", gw.base());
    let clients: BTreeMap<&str, reqwest::Client> = [ALICE, BOB, CI]
        .into_iter()
        .map(|ip| (ip, harness::client_from(ip)))
        .collect();
    let clients = Arc::new(clients);
    let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let (ip, body, expect) = plan(i);
        let clients = clients.clone();
        let limit = limit.clone();
        let url = url.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            let r = clients[ip]
                .post(&url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2025-11-25")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let decision = r
                .headers()
                .get("toolgate-decision-id")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (i, ip, body, expect, status, decision, v)
        });
    }
    let mut results = Vec::with_capacity(CALLS);
    let all = async {
        while let Some(r) = tasks.join_next().await {
            results.push(r.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(180), all)
        .await
        .expect("500 calls did not finish within 180 s");
    assert_eq!(results.len(), CALLS);

    // Every answer is what the policy says.
    let mut counts: BTreeMap<Expect, usize> = BTreeMap::new();
    for (i, _, _, expect, status, decision, v) in &results {
        *counts.entry(*expect).or_default() += 1;
        assert_eq!(*status, 200, "call {i}: {v}");
        assert_eq!(decision.len(), 36, "call {i}: no decision id");
        assert_eq!(v["id"], json!(i), "call {i}: {v}");
        match expect {
            Expect::Allowed => assert_eq!(v["result"]["isError"], false, "call {i}: {v}"),
            Expect::Hidden => assert_eq!(v["error"]["code"], -32602, "call {i}: {v}"),
            Expect::ArgumentDenied => {
                assert_eq!(v["result"]["isError"], true, "call {i}: {v}");
                let text = v["result"]["content"][0]["text"].as_str().unwrap();
                assert!(text.contains(decision.as_str()), "call {i}: {text}");
            }
            Expect::List => assert!(v["result"]["tools"].is_array(), "call {i}: {v}"),
        }
    }
    assert!(counts.values().all(|&n| n >= 20), "a thin mix: {counts:?}");

    // The audit trail, committed: one row per answer, and nothing else.
    let rows = gw.rows().await;
    let by_id: BTreeMap<&str, &toolgate::audit::Row> =
        rows.iter().map(|r| (r.id.as_str(), r)).collect();
    assert_eq!(rows.len(), CALLS, "rows: {}", rows.len());
    for &(i, ip, ref body, expect, _, ref decision, _) in &results {
        let row = by_id
            .get(decision.as_str())
            .unwrap_or_else(|| panic!("call {i}: no audit row {decision}"));
        assert_eq!(row.principal, principal_of(ip), "call {i}");
        assert_eq!(row.ip, ip, "call {i}");
        let (effect, outcome) = match expect {
            Expect::Allowed | Expect::List => ("allow", "forwarded"),
            Expect::Hidden | Expect::ArgumentDenied => ("deny", "denied"),
        };
        assert_eq!(
            (row.effect.as_str(), row.outcome.as_str()),
            (effect, outcome),
            "call {i}: {row:?}"
        );
        if expect != Expect::List {
            assert_eq!(
                row.tool,
                body["params"]["name"].as_str().unwrap(),
                "call {i}"
            );
            assert_eq!(row.arguments, body["params"]["arguments"], "call {i}");
        }
    }

    // THE INVARIANT: executed upstream == allow rows with outcome `forwarded`, exactly.
    let mut executed: Vec<(String, String)> = up
        .executed()
        .into_iter()
        .map(|(tool, args)| {
            let v: Value = serde_json::from_str(&args).unwrap();
            (tool, canonical_json(&v))
        })
        .collect();
    executed.sort();
    let mut forwarded: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r.effect == "allow" && r.outcome == "forwarded" && r.method == "tools/call")
        .map(|r| (r.tool.clone(), canonical_json(&r.arguments)))
        .collect();
    forwarded.sort();
    assert_eq!(
        executed.len(),
        counts[&Expect::Allowed],
        "the upstream executed {} calls for {} allowed",
        executed.len(),
        counts[&Expect::Allowed]
    );
    assert_eq!(
        executed, forwarded,
        "executed calls and forwarded allow rows differ"
    );
    // And nothing denied ran: no executed call matches a deny row's tool and arguments.
    let denied: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r.effect == "deny")
        .map(|r| (r.tool.clone(), canonical_json(&r.arguments)))
        .collect();
    assert!(denied.iter().all(|d| executed.binary_search(d).is_err()));
    // The chain over all of it verifies.
    let report = toolgate::audit::query::Reader::open(&gw.db)
        .unwrap()
        .verify()
        .unwrap();
    assert!(report.broken.is_none(), "{report:?}");
    eprintln!(
        "audit join: {CALLS} calls ({counts:?}); executed {} == forwarded allow rows {}",
        executed.len(),
        forwarded.len()
    );
    gw.stop().await;
}

/// How a call of the fault test goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    /// JSON answer; the client hangs up once the upstream has run the call.
    JsonAborted,
    /// SSE answer; the client hangs up after the first event (the call has run).
    SseAborted,
    /// JSON answer, read to the end.
    JsonDone,
    /// SSE answer, read to the end.
    SseDone,
    /// Hidden from this caller: denied, never forwarded.
    Denied,
}

const FAULT_CALLS: usize = 60;

/// Call `i` of the fault test: who, the body, and how it goes.
fn fault_plan(i: usize) -> (&'static str, Value, Fate) {
    let ip = [ALICE, BOB, CI][i % 3];
    let fate = [
        Fate::JsonAborted,
        Fate::SseAborted,
        Fate::JsonDone,
        Fate::SseDone,
        Fate::Denied,
    ][(i / 3) % 5];
    let n = format!("abort-{i}");
    let (tool, args) = match fate {
        // Held for 10 s (the sample's cap): the client is long gone when the answer would come.
        Fate::JsonAborted => (
            "search_repositories",
            json!({"query": n, "hold_ms": 10_000}),
        ),
        Fate::SseAborted => (
            "search_repositories",
            json!({"query": n, "hold_ms": 10_000, "stream": true}),
        ),
        Fate::JsonDone => ("search_repositories", json!({"query": n, "hold_ms": 50})),
        Fate::SseDone => (
            "search_repositories",
            json!({"query": n, "hold_ms": 50, "stream": true}),
        ),
        Fate::Denied => ("delete_repository", json!({"owner": "example", "repo": n})),
    };
    let body = json!({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": args}});
    (ip, body, fate)
}

/// Opens a connection from `ip` and writes one POST of `body` (kept open: no `Connection: close`).
async fn send_raw(to: std::net::SocketAddr, ip: &str, body: &Value) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    let mut s = sock.connect(to).await.unwrap();
    let body = body.to_string();
    let req = format!(
        "POST /mcp/sample HTTP/1.1\r\nHost: {to}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nMcp-Protocol-Version: 2025-11-25\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Polls `cond` every 10 ms until it holds, or fails with `what` after `within`.
async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Issue 20 item 6: clients that hang up mid-call, on the JSON path and on the SSE path, while
/// others complete. Every allowed call's row ends with a final outcome (`client_disconnected`
/// for the abandoned ones, `forwarded` for the others), never `pending`; and the calls the
/// upstream ran are exactly the allow rows of forwarded calls. Each abort waits for an explicit
/// signal that the upstream has run the call (its execution record, or the first SSE event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_calls_end_client_disconnected_and_the_join_still_holds() {
    use tokio::io::AsyncReadExt as _;
    let up = CountingUpstream::start().await;
    let gw = Gateway::start(&[("sample", up.url())], "").await;
    let to = gw.addr;
    let executed = up.counters.clone();
    let ran = move |query: &str| {
        executed
            .executed
            .lock()
            .unwrap()
            .iter()
            .any(|(_, a)| a.contains(&format!("\"{query}\"")))
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..FAULT_CALLS {
        let (ip, body, fate) = fault_plan(i);
        let ran = ran.clone();
        tasks.spawn(async move {
            let query = format!("abort-{i}");
            let mut s = send_raw(to, ip, &body).await;
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            match fate {
                Fate::JsonAborted => {
                    wait_until(Duration::from_secs(20), &format!("call {i} to run"), || {
                        ran(&query)
                    })
                    .await;
                    drop(s);
                }
                Fate::SseAborted => {
                    let first = tokio::time::timeout(Duration::from_secs(20), async {
                        while !String::from_utf8_lossy(&got).contains("notifications/progress") {
                            let n = s.read(&mut buf).await.unwrap();
                            assert!(n > 0, "call {i}: the stream ended early");
                            got.extend_from_slice(&buf[..n]);
                        }
                    })
                    .await;
                    assert!(first.is_ok(), "call {i}: no first SSE event within 20 s");
                    drop(s);
                }
                Fate::JsonDone | Fate::SseDone | Fate::Denied => {
                    let want: &[u8] = if fate == Fate::Denied {
                        b"Unknown tool"
                    } else {
                        b"ran with"
                    };
                    let done = tokio::time::timeout(Duration::from_secs(20), async {
                        while !got.windows(want.len()).any(|w| w == want) {
                            let n = s.read(&mut buf).await.unwrap();
                            assert!(n > 0, "call {i}: connection closed before the answer");
                            got.extend_from_slice(&buf[..n]);
                        }
                    })
                    .await;
                    assert!(done.is_ok(), "call {i}: no answer within 20 s");
                }
            }
            (i, fate)
        });
    }
    let mut fates = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (i, fate) = r.unwrap();
        fates.insert(format!("abort-{i}"), fate);
    }
    assert_eq!(fates.len(), FAULT_CALLS);

    // Every tools/call row reaches a final outcome (the writer may flush outcome rows on a
    // timer or with a later commit: poll against a deadline).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let rows = loop {
        let rows: Vec<toolgate::audit::Row> = gw
            .rows()
            .await
            .into_iter()
            .filter(|r| r.method == "tools/call")
            .collect();
        let pending: Vec<&str> = rows
            .iter()
            .filter(|r| r.outcome == "pending")
            .map(|r| r.arguments["query"].as_str().unwrap_or(&r.id))
            .collect();
        if pending.is_empty() && rows.len() == FAULT_CALLS {
            break rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 15 s, {} tools/call rows of {FAULT_CALLS}; still pending: {pending:?}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Each row's outcome is the one its fate names.
    let mut seen = BTreeMap::new();
    for r in &rows {
        let key = r.arguments["query"]
            .as_str()
            .or_else(|| r.arguments["repo"].as_str())
            .unwrap()
            .to_string();
        let fate = fates[&key];
        let want = match fate {
            Fate::JsonAborted | Fate::SseAborted => ("allow", "client_disconnected"),
            Fate::JsonDone | Fate::SseDone => ("allow", "forwarded"),
            Fate::Denied => ("deny", "denied"),
        };
        assert_eq!(
            (r.effect.as_str(), r.outcome.as_str()),
            want,
            "{key} ({fate:?}): {r:?}"
        );
        *seen.entry(fate).or_insert(0) += 1;
    }
    assert!(seen.values().all(|&n| n == FAULT_CALLS / 5), "{seen:?}");

    // THE INVARIANT under faults: what ran upstream == the allow rows of forwarded calls.
    let mut executed: Vec<(String, String)> = up
        .executed()
        .into_iter()
        .map(|(tool, args)| (tool, canonical_json(&serde_json::from_str(&args).unwrap())))
        .collect();
    executed.sort();
    let mut sent: Vec<(String, String)> = rows
        .iter()
        .filter(|r| {
            r.effect == "allow" && matches!(r.outcome.as_str(), "forwarded" | "client_disconnected")
        })
        .map(|r| (r.tool.clone(), canonical_json(&r.arguments)))
        .collect();
    sent.sort();
    assert_eq!(
        executed, sent,
        "executed calls and forwarded allow rows differ"
    );
    let report = toolgate::audit::query::Reader::open(&gw.db)
        .unwrap()
        .verify()
        .unwrap();
    assert!(report.broken.is_none(), "{report:?}");
    eprintln!(
        "audit join under aborts: {seen:?}; executed {} == forwarded allow rows",
        executed.len()
    );
    gw.stop().await;
}
