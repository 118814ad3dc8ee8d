//! A small MCP server built in, for `toolgate demo`, the end-to-end tests and load runs.
//!
//! Streamable HTTP, handshake era (`initialize` with `Mcp-Session-Id`), JSON responses, and
//! the stateless 2026-07-28 era (it accepts requests without a session). Its tools pretend to
//! be GitHub, a file store and a shell; nothing touches the real world. It counts every tool
//! execution, so tests can compare "what ran" with "what the audit says was forwarded".
//! A tool call whose arguments carry `ask: ["sampling/createMessage", ...]` is answered as an
//! SSE stream that first sends those server→client requests; client answers are recorded.
//!
//! Test knobs in a call's arguments (all capped at 10 s):
//! - `delay_ms`: wait before running the tool (in-flight work that has not run yet);
//! - `hold_ms`: run the tool at once, then hold the answer back (work that has run, answer
//!   still in flight); with `stream: true` the answer is an SSE stream that sends a
//!   `notifications/progress` event at once and the result after `hold_ms`.
//!
//! Every call is counted in `started` when it arrives, before any delay: tests wait for that
//! signal instead of sleeping.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// What the sample server has done.
#[derive(Debug, Default)]
pub struct Counters {
    /// Known tool calls that arrived (counted before any `delay_ms`).
    pub started: AtomicU64,
    /// Tool calls that ran.
    pub tool_calls: AtomicU64,
    /// (tool, canonical arguments) of every executed call, in order.
    pub executed: Mutex<Vec<(String, String)>>,
    pub sessions: AtomicU64,
    /// Client answers (JSON-RPC responses) that reached the server, in order.
    pub answers: Mutex<Vec<Value>>,
    /// The `Mcp-Session-Id` each answer came with, in the same order.
    pub answer_sessions: Mutex<Vec<Option<String>>>,
}

/// The tools, with annotations as an MCP server would publish them.
pub fn tools() -> Value {
    json!([
        {"name": "search_repositories", "description": "Search GitHub repositories", "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}}}, "annotations": {"readOnlyHint": true}},
        {"name": "get_issue", "description": "Read an issue", "inputSchema": {"type": "object", "properties": {"owner": {"type": "string"}, "repo": {"type": "string"}, "number": {"type": "integer"}}}, "annotations": {"readOnlyHint": true}},
        {"name": "create_issue", "description": "Open an issue", "inputSchema": {"type": "object", "properties": {"owner": {"type": "string"}, "repo": {"type": "string"}, "title": {"type": "string"}}}, "annotations": {"readOnlyHint": false}},
        {"name": "delete_repository", "description": "Delete a repository", "inputSchema": {"type": "object", "properties": {"owner": {"type": "string"}, "repo": {"type": "string"}}}, "annotations": {"destructiveHint": true}},
        {"name": "read_file", "description": "Read a file", "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}}, "annotations": {"readOnlyHint": true}},
        {"name": "run_command", "description": "Run a shell command", "inputSchema": {"type": "object", "properties": {"command": {"type": "string"}}}, "annotations": {"destructiveHint": true}}
    ])
}

/// The sample server's router (mount it at any path; it answers POST).
pub fn router(counters: Arc<Counters>) -> Router {
    Router::new()
        .route("/mcp", post(handle).get(server_stream))
        .route("/mcp/{server}", post(handle).get(server_stream))
        .with_state(counters)
}

/// Binds and serves on `addr` (use port 0 for any); returns the bound address.
pub async fn spawn(addr: SocketAddr, counters: Arc<Counters>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(counters)).await;
    });
    Ok(bound)
}

/// The handshake era's GET stream: a priming event, then a keep-alive comment every second,
/// until the client goes away.
async fn server_stream() -> Response {
    let events = futures_util::stream::unfold(0u64, |n| async move {
        if n > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let chunk = if n == 0 {
            "id: 0\ndata: \n\n".to_string()
        } else {
            format!(": keep-alive {n}\n\n")
        };
        Some((
            Ok::<_, std::io::Error>(axum::body::Bytes::from(chunk)),
            n + 1,
        ))
    });
    let mut r = Response::new(axum::body::Body::from_stream(events));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// An SSE answer: a `notifications/progress` event at once, `result` after `hold`.
fn held_stream(id: &Value, result: Value, hold: std::time::Duration) -> Response {
    let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": id, "progress": 0, "message": "running"}});
    let first = format!("event: message\ndata: {progress}\n\n");
    let last = format!("event: message\ndata: {result}\n\n");
    let events = futures_util::stream::unfold(Some((first, last)), move |state| async move {
        let (first, last) = state?;
        if first.is_empty() {
            tokio::time::sleep(hold).await;
            return Some((Ok::<_, std::io::Error>(Bytes::from(last)), None));
        }
        Some((Ok(Bytes::from(first)), Some((String::new(), last))))
    });
    let mut r = Response::new(axum::body::Body::from_stream(events));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

fn json_response(status: StatusCode, body: Value, session: Option<String>) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Some(s) = session.and_then(|s| HeaderValue::from_str(&s).ok()) {
        r.headers_mut().insert("mcp-session-id", s);
    }
    r
}

async fn handle(State(c): State<Arc<Counters>>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "parse error"}}),
            None,
        );
    };
    let id = msg.get("id").cloned();
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    if msg.get("method").is_none() && (msg.get("result").is_some() || msg.get("error").is_some()) {
        if let (Ok(mut a), Ok(mut s)) = (c.answers.lock(), c.answer_sessions.lock()) {
            a.push(msg.clone());
            s.push(
                headers
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            );
        }
        return StatusCode::ACCEPTED.into_response();
    }
    let Some(id) = id else {
        // Notifications.
        return StatusCode::ACCEPTED.into_response();
    };
    let ok = |result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result});
    let modern = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v >= "2026-07-28");
    match method {
        "initialize" => {
            let n = c.sessions.fetch_add(1, Ordering::Relaxed);
            let version = msg
                .pointer("/params/protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or("2025-11-25");
            json_response(
                StatusCode::OK,
                ok(
                    json!({"protocolVersion": version, "capabilities": {"tools": {"listChanged": true}}, "serverInfo": {"name": "toolgate-sample", "version": env!("CARGO_PKG_VERSION")}}),
                ),
                Some(format!("sample-session-{n}")),
            )
        }
        "server/discover" => json_response(
            StatusCode::OK,
            ok(
                json!({"supportedVersions": ["2026-07-28", "2025-11-25"], "capabilities": {"tools": {}}, "serverInfo": {"name": "toolgate-sample", "version": env!("CARGO_PKG_VERSION")}}),
            ),
            None,
        ),
        "ping" => json_response(StatusCode::OK, ok(json!({})), None),
        "tools/list" => {
            let mut result = json!({"tools": tools()});
            if modern {
                result["ttlMs"] = json!(60000);
                result["cacheScope"] = json!("public");
            }
            json_response(StatusCode::OK, ok(result), None)
        }
        "tools/call" => {
            let name = msg
                .pointer("/params/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let args = msg
                .pointer("/params/arguments")
                .cloned()
                .unwrap_or(json!({}));
            let known = tools()
                .as_array()
                .is_some_and(|t| t.iter().any(|x| x["name"] == name.as_str()));
            if !known {
                return json_response(
                    StatusCode::OK,
                    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": format!("Unknown tool: {name}")}}),
                    None,
                );
            }
            c.started.fetch_add(1, Ordering::SeqCst);
            // Tests ask for slow calls with `delay_ms` (capped): in-flight work at shutdown.
            if let Some(ms) = args.get("delay_ms").and_then(Value::as_u64) {
                tokio::time::sleep(std::time::Duration::from_millis(ms.min(10_000))).await;
            }
            if let Ok(mut e) = c.executed.lock() {
                e.push((name.clone(), args.to_string()));
            }
            c.tool_calls.fetch_add(1, Ordering::SeqCst);
            let text = format!("{name} ran with {args}");
            let mut result = json!({"content": [{"type": "text", "text": text}], "isError": false});
            if modern {
                result["resultType"] = json!("complete");
            }
            // `hold_ms`: the tool has run; its answer is held back (a call a client may abandon).
            if let Some(ms) = args.get("hold_ms").and_then(Value::as_u64) {
                let hold = std::time::Duration::from_millis(ms.min(10_000));
                if args.get("stream") == Some(&json!(true)) {
                    return held_stream(&id, ok(result), hold);
                }
                tokio::time::sleep(hold).await;
            }
            // `ask: [method, ...]`: answer as an SSE stream that first sends those requests to
            // the client (sampling/createMessage, roots/list, ...), ids `srv-<call id>-<i>`.
            if let Some(ask) = args.get("ask").and_then(Value::as_array) {
                let mut body = String::new();
                for (i, m) in ask.iter().filter_map(Value::as_str).enumerate() {
                    let req = json!({"jsonrpc": "2.0", "id": format!("srv-{id}-{i}"), "method": m, "params": {}});
                    body.push_str(&format!("event: message\ndata: {req}\n\n"));
                }
                body.push_str(&format!("event: message\ndata: {}\n\n", ok(result)));
                return (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "text/event-stream")],
                    body,
                )
                    .into_response();
            }
            json_response(StatusCode::OK, ok(result), None)
        }
        _ => json_response(
            StatusCode::OK,
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": format!("Method not found: {method}")}}),
            None,
        ),
    }
}
