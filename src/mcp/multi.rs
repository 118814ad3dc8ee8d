//! The aggregated endpoint `/mcp`: every configured server, HTTP and stdio alike, behind one
//! MCP session. Names, routing and pagination are the pure functions of `aggregate.rs`; this
//! module does the calls.
//!
//! **Every call to a server goes through `/mcp/<server>`'s own handler** (`proxy::post`,
//! `proxy::session_request`), in process: the same identify → parse → decide → record →
//! forward path, the same list filtering, the same audit rows with the server's name. This
//! endpoint only renames, routes and merges; it cannot authorize differently.
//!
//! - **Sessions.** `/mcp` speaks the handshake era (2025-11-25 and earlier): `initialize`
//!   opens a session of ours (bound to the caller); each server gets a session of its own,
//!   opened on first use with the client's `initialize` parameters. A dual-era client that
//!   probes `server/discover` is told the server is not initialized, which makes it fall back
//!   to `initialize` (as server-everything answers).
//! - **Lists** are merged page by page (the aggregate cursor holds every server's); a server
//!   that fails is left out with a warning.
//! - **Server messages.** The GET stream merges every server session's stream. A server
//!   request's id becomes `<server><sep><its id as JSON>`, so the client's answer finds its
//!   way back. `notifications/*/list_changed` from any server, and the ones policy reloads
//!   inject, reach the client once until it lists again.
//! - **Cancels.** A client request stays in its session's in-flight map until its answer is
//!   done (for an SSE answer, until the stream ends), so `notifications/cancelled` goes to the
//!   server running it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use super::aggregate::{self, Naming, Page, RouteError};
use super::jsonrpc::{self, Kind, Limits, Message, code};
use super::proxy;
use super::sessions::Up;
pub use super::sessions::{AggSession, MAX_SESSIONS, SESSION_IDLE, Sessions};
use super::sse;
use super::transport::{SESSION_HEADER, VERSION_HEADER, header_str};
use crate::audit::record::outcome;
use crate::gateway::{AuditRow, Caller, Conn, Gateway};
use crate::policy::model::Effect;

/// The revision `/mcp` speaks when the client asks for one it does not know.
const LATEST: &str = "2025-11-25";
/// The `Accept` of the endpoint's own calls to a server's route: an answer as JSON or SSE.
const ACCEPT_BOTH: &str = "application/json, text/event-stream";
const SUPPORTED: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// Server messages kept for a client whose stream is not open.
const MAX_BACKLOG: usize = 256;
/// Pages followed per server when learning which server serves a URI.
const MAX_LEARN_PAGES: usize = 16;
const MAX_BODY: usize = 4 * 1024 * 1024;
const MAX_EVENT: usize = 8 * 1024 * 1024;
const MAX_RESPONSE: usize = 32 * 1024 * 1024;
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

fn naming(gw: &Gateway) -> Naming {
    Naming {
        separator: gw.config.aggregate.separator.clone(),
    }
}

fn servers(gw: &Gateway) -> Vec<String> {
    gw.upstreams.keys().cloned().collect()
}

/// A row for a message this endpoint answers itself (nothing reaches a server).
fn local_row(gw: &Gateway, conn: &Conn, method: &str, reason: &str) -> AuditRow {
    let mut row = AuditRow::new("mcp", conn);
    row.method = method.to_string();
    row.action = method.to_string();
    row.effect = Effect::Allow;
    row.rule = "aggregate".into();
    row.reason = reason.to_string();
    row.outcome = outcome::ANSWERED.into();
    row.policy_hash = gw.store.current().hash.clone();
    row
}

/// Audits a message answered here and returns its decision id.
fn record_local(gw: &Gateway, row: AuditRow) -> String {
    let id = row.id.clone();
    if let Err(e) = gw.submit(row) {
        tracing::warn!(error = %e, "audit row for the aggregated endpoint was not stored");
    }
    id
}

fn json_response(decision: &str, body: Vec<u8>) -> Response {
    proxy::respond(StatusCode::OK, decision, "application/json", body)
}

/// A refusal on `/mcp`, audited.
async fn refuse(
    gw: &Gateway,
    mut row: AuditRow,
    status: StatusCode,
    id: Option<&Value>,
    code: i64,
    msg: &str,
) -> Response {
    if row.method.is_empty() {
        row.method = "(unparsed)".into();
    }
    proxy::refuse(gw, row, status, id, code, msg).await
}

/// `POST /mcp`.
pub async fn post(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut row = AuditRow::new("mcp", &conn);
    let Some(caller) = conn.caller.clone() else {
        row.kind = "identity";
        row.outcome = "unidentified".into();
        let why = conn
            .unidentified
            .clone()
            .unwrap_or_else(|| "no verified tailnet identity".into());
        return refuse(
            &gw,
            row,
            StatusCode::FORBIDDEN,
            None,
            code::UNIDENTIFIED,
            &format!("forbidden: {why}"),
        )
        .await;
    };
    if !header_str(&headers, "content-type")
        .unwrap_or("")
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        row.outcome = "invalid".into();
        return refuse(
            &gw,
            row,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            code::INVALID_REQUEST,
            "Content-Type must be application/json",
        )
        .await;
    }
    // The daemon-wide in-flight budget, as on `/mcp/<server>` (whose handler this call then
    // goes through, holding its own share for the copy it gets).
    let declared = header_str(&headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    let Some(mut held) = gw
        .budget
        .reserve(declared.unwrap_or(MAX_BODY).min(MAX_BODY))
    else {
        return proxy::overloaded(&gw, row, None).await;
    };
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            row.outcome = "invalid".into();
            return refuse(
                &gw,
                row,
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                code::INVALID_REQUEST,
                &format!("request body refused: {e}"),
            )
            .await;
        }
        Err(_) => {
            row.outcome = "invalid".into();
            return refuse(
                &gw,
                row,
                StatusCode::REQUEST_TIMEOUT,
                None,
                code::INVALID_REQUEST,
                "the request body did not arrive in time",
            )
            .await;
        }
    };
    let parsed = jsonrpc::parse_sized(&bytes, Limits::default());
    let len = bytes.len();
    drop(bytes);
    let msg = match parsed {
        Ok((m, size)) => {
            if !held.resize(size.parsed_bytes(len).saturating_add(len)) {
                return proxy::overloaded(&gw, row, m.id.as_ref()).await;
            }
            m
        }
        Err(e) => {
            row.outcome = "invalid".into();
            return refuse(
                &gw,
                row,
                StatusCode::BAD_REQUEST,
                None,
                e.code(),
                &e.to_string(),
            )
            .await;
        }
    };
    row.method = msg.method.clone();
    let sid = header_str(&headers, SESSION_HEADER).map(str::to_string);
    let session = match &sid {
        Some(sid) => match gw.aggregate.get(sid) {
            Some(s) if s.principal == caller.principal.id => Some(s),
            Some(_) => {
                row.outcome = "session_refused".into();
                return refuse(
                    &gw,
                    row,
                    StatusCode::FORBIDDEN,
                    msg.id.as_ref(),
                    code::UNIDENTIFIED,
                    "this session belongs to another identity",
                )
                .await;
            }
            None => {
                row.outcome = "invalid".into();
                return refuse(
                    &gw,
                    row,
                    StatusCode::NOT_FOUND,
                    msg.id.as_ref(),
                    code::INVALID_REQUEST,
                    "unknown session",
                )
                .await;
            }
        },
        None => None,
    };
    let Some(session) = session else {
        return sessionless(&gw, &conn, &caller, msg, row).await;
    };
    match msg.kind {
        Kind::Request => request(&gw, &conn, &headers, &session, msg, row).await,
        Kind::Notification => notification(&gw, &conn, &session, msg).await,
        Kind::Response => answer(&gw, &conn, &session, msg, row).await,
    }
}

/// Without a session: `initialize` opens one; `server/discover` gets the answer that makes a
/// dual-era client fall back to `initialize`; anything else needs a session.
async fn sessionless(
    gw: &Arc<Gateway>,
    conn: &Conn,
    caller: &Arc<Caller>,
    msg: Message,
    row: AuditRow,
) -> Response {
    match (msg.kind, msg.method.as_str()) {
        (Kind::Request, "initialize") => {
            let params = msg
                .value
                .get("params")
                .cloned()
                .unwrap_or(Value::Object(Map::new()));
            let asked = params
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or(LATEST);
            let version = if SUPPORTED.contains(&asked) {
                asked.to_string()
            } else {
                LATEST.to_string()
            };
            let Some((sid, _)) = gw
                .aggregate
                .open(&caller.principal.id, params, version.clone())
            else {
                return refuse(
                    gw,
                    row,
                    StatusCode::SERVICE_UNAVAILABLE,
                    msg.id.as_ref(),
                    code::UPSTREAM,
                    "too many aggregated sessions; retry later",
                )
                .await;
            };
            let result = json!({
                "protocolVersion": version,
                "capabilities": {
                    "tools": {"listChanged": true},
                    "prompts": {"listChanged": true},
                    "resources": {"listChanged": true, "subscribe": true},
                    "completions": {},
                    "logging": {},
                },
                "serverInfo": {"name": "toolgate", "version": env!("CARGO_PKG_VERSION")},
                "instructions": format!(
                    "Every MCP server behind toolgate in one endpoint: tools and prompts are named <server>{}<name>; resources keep their URIs.",
                    gw.config.aggregate.separator
                ),
            });
            let decision = record_local(
                gw,
                local_row(gw, conn, "initialize", "aggregated session opened"),
            );
            let mut r = json_response(&decision, jsonrpc::result_body(msg.id.as_ref(), result));
            if let Ok(v) = HeaderValue::from_str(&sid) {
                r.headers_mut().insert(SESSION_HEADER, v);
            }
            r
        }
        (Kind::Request, "server/discover") => {
            let mut row = row;
            row.outcome = "invalid".into();
            refuse(gw, row, StatusCode::BAD_REQUEST, msg.id.as_ref(), -32000, "Bad Request: Server not initialized (this endpoint speaks the handshake era: send initialize)").await
        }
        _ => {
            refuse(
                gw,
                row,
                StatusCode::BAD_REQUEST,
                msg.id.as_ref(),
                code::INVALID_REQUEST,
                "Bad Request: Mcp-Session-Id is required (send initialize first)",
            )
            .await
        }
    }
}

/// What one internal call to `/mcp/<server>` answered.
struct Internal {
    status: StatusCode,
    decision: String,
    session: Option<String>,
    sse: bool,
    body: Body,
}

/// The id of a request the endpoint makes itself (`initialize`, list pages) on a server's
/// session, which the client's own requests share: one in flight per id (request.rs, step 3),
/// so a fixed id would collide with a client request that happens to use it, and drop that
/// server from a list or refuse the client's call.
fn internal_id() -> Value {
    Value::String(format!("toolgate-{}", uuid::Uuid::new_v4()))
}

/// Calls `/mcp/<server>`'s handler in process with `body`, on the server's session.
async fn call(
    gw: &Arc<Gateway>,
    conn: &Conn,
    server: &str,
    up: Option<&Up>,
    accept: &str,
    body: Vec<u8>,
) -> Internal {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(accept) {
        h.insert(header::ACCEPT, v);
    }
    if let Some(up) = up {
        if let Some(sid) = up
            .sid
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            h.insert(SESSION_HEADER, sid);
        }
        if let Ok(v) = HeaderValue::from_str(&up.version) {
            h.insert(VERSION_HEADER, v);
        }
    }
    let r = super::request::post(
        State(gw.clone()),
        Path(server.to_string()),
        Extension(conn.clone()),
        h,
        Body::from(body),
    )
    .await;
    internal(r)
}

fn internal(r: Response) -> Internal {
    let hs = r.headers();
    let get = |n: &str| hs.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let sse = get("content-type")
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("text/event-stream"));
    Internal {
        status: r.status(),
        decision: get(proxy::DECISION_HEADER).unwrap_or_default(),
        session: get(SESSION_HEADER),
        sse,
        body: r.into_body(),
    }
}

/// The JSON-RPC response with `id` in an internal answer (JSON, or the SSE stream's response
/// event); other events on the way are handed to `on_event`.
async fn response_of(
    i: Internal,
    id: Option<&Value>,
    mut on_event: impl FnMut(Value),
) -> Result<Value, String> {
    if !i.sse {
        let bytes = axum::body::to_bytes(i.body, MAX_RESPONSE)
            .await
            .map_err(|e| e.to_string())?;
        if bytes.is_empty() {
            return Err(format!("answered HTTP {} with no body", i.status));
        }
        return serde_json::from_slice(&bytes).map_err(|e| format!("bad JSON: {e}"));
    }
    let mut parser = sse::Parser::new(MAX_EVENT);
    let mut stream = i.body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        for ev in parser.feed(&chunk)? {
            if ev.data.trim().is_empty() {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                continue;
            };
            let is_response = v.get("method").is_none();
            if is_response && v.get("id") == id {
                return Ok(v);
            }
            on_event(v);
        }
    }
    Err("the stream ended without an answer".into())
}

impl AggSession {
    /// The slot of `server`'s session.
    fn slot(&self, server: &str) -> Arc<tokio::sync::Mutex<Option<Up>>> {
        self.ups
            .lock()
            .map(|mut m| m.entry(server.to_string()).or_default().clone())
            .unwrap_or_default()
    }

    /// Servers whose session is open.
    fn opened(&self) -> Vec<String> {
        self.ups
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Hands a server message (already decided and audited on the server's path) to the
    /// client: renamed, list changes coalesced, onto the open stream or the backlog.
    fn deliver(&self, gw: &Gateway, server: &str, mut v: Value) {
        let method = v
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if method == "notifications/resources/list_changed" {
            self.resources_changed();
        }
        if aggregate::is_list_changed(&method) {
            let first = self
                .coalesce
                .lock()
                .map(|mut c| c.note(&method))
                .unwrap_or(false);
            if !first {
                return;
            }
            v = json!({"jsonrpc": "2.0", "method": method});
        } else if let Some(id) = v.get("id").cloned() {
            if v.get("method").is_some() {
                // A server request: an id that names its server, for the client's answer.
                let ours = naming(gw).prefixed(server, &jsonrpc::canonical_id(&id));
                if let Some(o) = v.as_object_mut() {
                    o.insert("id".into(), Value::String(ours));
                }
            } else {
                return; // a response nobody here waits for
            }
        }
        let ev = sse::Event {
            event: Some("message".into()),
            data: String::from_utf8(jsonrpc::canonical(&v)).unwrap_or_default(),
            ..Default::default()
        }
        .to_bytes();
        let sent = self
            .outbox
            .lock()
            .ok()
            .and_then(|o| o.as_ref().map(|tx| tx.try_send(ev.clone()).is_ok()))
            .unwrap_or(false);
        if !sent {
            if let Ok(mut b) = self.backlog.lock() {
                if b.len() < MAX_BACKLOG {
                    b.push_back(ev);
                } else {
                    tracing::warn!(
                        server,
                        method,
                        "aggregated session: no client stream; a server message was dropped"
                    );
                }
            }
        }
    }
}

/// `server`'s session for this aggregated one, opened on first use with the client's
/// `initialize` (through `/mcp/<server>`, decided and audited there).
async fn upstream(
    gw: &Arc<Gateway>,
    conn: &Conn,
    s: &Arc<AggSession>,
    server: &str,
    fresh: bool,
) -> Result<Up, String> {
    let slot = s.slot(server);
    let mut g = slot.lock().await;
    if fresh {
        *g = None;
    }
    if let Some(up) = g.as_ref() {
        return Ok(up.clone());
    }
    let id = internal_id();
    let init = jsonrpc::canonical(
        &json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": s.init}),
    );
    let i = call(gw, conn, server, None, ACCEPT_BOTH, init).await;
    let status = i.status;
    let sid = i.session.clone();
    let resp = response_of(i, Some(&id), |_| {}).await?;
    if let Some(e) = resp.get("error") {
        return Err(format!(
            "initialize refused ({status}): {}",
            e.get("message").and_then(Value::as_str).unwrap_or_default()
        ));
    }
    let version = resp
        .pointer("/result/protocolVersion")
        .and_then(Value::as_str)
        .unwrap_or(&s.version)
        .to_string();
    let up = Up { sid, version };
    let done =
        jsonrpc::canonical(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    let _ = call(gw, conn, server, Some(&up), ACCEPT_BOTH, done).await;
    *g = Some(up.clone());
    drop(g);
    // A client stream already open gets this server's messages too.
    let open = s.outbox.lock().ok().and_then(|o| o.clone());
    if let Some(tx) = open {
        relay(
            gw.clone(),
            conn.clone(),
            s.clone(),
            server.to_string(),
            up.clone(),
            tx,
        );
    }
    Ok(up)
}

/// One server's page of a list, as `aggregate::Page`.
async fn page(
    gw: &Arc<Gateway>,
    conn: &Conn,
    s: &Arc<AggSession>,
    server: &str,
    method: &str,
    cursor: Option<String>,
) -> Page {
    let mut params = Map::new();
    if let Some(c) = cursor {
        params.insert("cursor".into(), Value::String(c));
    }
    let id = internal_id();
    let body = jsonrpc::canonical(
        &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
    );
    let mut retried = false;
    loop {
        let up = match upstream(gw, conn, s, server, retried).await {
            Ok(u) => u,
            Err(e) => return Page::Down(e),
        };
        let i = call(gw, conn, server, Some(&up), ACCEPT_BOTH, body.clone()).await;
        if i.status == StatusCode::NOT_FOUND && !retried {
            retried = true; // the server's session ended (idle, restarted): open a new one once
            continue;
        }
        let status = i.status;
        let resp = match response_of(i, Some(&id), |v| s.deliver(gw, server, v)).await {
            Ok(v) => v,
            Err(e) => return Page::Down(e),
        };
        if let Some(e) = resp.get("error") {
            return Page::Down(format!(
                "HTTP {status}: {}",
                e.get("message").and_then(Value::as_str).unwrap_or_default()
            ));
        }
        let key = aggregate::list_shape(method)
            .map(|(k, _)| k)
            .unwrap_or("items");
        let items = resp
            .pointer(&format!("/result/{key}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let next = resp
            .pointer("/result/nextCursor")
            .and_then(Value::as_str)
            .map(str::to_string);
        return Page::Items { items, next };
    }
}

/// One aggregate page of a list method.
async fn list(
    gw: &Arc<Gateway>,
    conn: &Conn,
    s: &Arc<AggSession>,
    msg: &Message,
) -> Result<Value, RouteError> {
    let cursor = msg.param_str("cursor");
    let asks = aggregate::plan(cursor, &servers(gw))?;
    let calls = asks.into_iter().map(|(server, cur)| async move {
        let p = page(gw, conn, s, &server, &msg.method, cur).await;
        (server, p)
    });
    let pages: Vec<(String, Page)> = futures_util::future::join_all(calls).await;
    if let Ok(mut ix) = s.uris.lock() {
        for (server, p) in &pages {
            if let Page::Items { items, .. } = p {
                match msg.method.as_str() {
                    "resources/list" => ix.add_resources(server, items),
                    "resources/templates/list" => ix.add_templates(server, items),
                    _ => {}
                }
            }
        }
    }
    let merged = aggregate::merge(&msg.method, &naming(gw), pages);
    for (server, why) in &merged.down {
        tracing::warn!(server, method = %msg.method, "left out of the aggregated list: {why}");
    }
    // The client is listing again: the next change is news.
    if let Ok(mut c) = s.coalesce.lock() {
        let changed = msg.method.replace("/list", "/list_changed");
        let changed = format!("notifications/{changed}");
        let rest: Vec<String> = c.take().into_iter().filter(|m| *m != changed).collect();
        for m in rest {
            c.note(&m);
        }
    }
    let (key, _) = aggregate::list_shape(&msg.method).unwrap_or(("items", false));
    let mut result = Map::new();
    result.insert(key.into(), Value::Array(merged.items));
    if let Some(c) = merged.next_cursor {
        result.insert("nextCursor".into(), Value::String(c));
    }
    Ok(Value::Object(result))
}

/// Learns which server serves which URI by listing every server's resources and templates.
async fn learn_uris(gw: &Arc<Gateway>, conn: &Conn, s: &Arc<AggSession>) {
    for method in ["resources/list", "resources/templates/list"] {
        for server in servers(gw) {
            let mut cursor = None;
            for _ in 0..MAX_LEARN_PAGES {
                match page(gw, conn, s, &server, method, cursor.take()).await {
                    Page::Items { items, next } => {
                        if let Ok(mut ix) = s.uris.lock() {
                            if method == "resources/list" {
                                ix.add_resources(&server, &items);
                            } else {
                                ix.add_templates(&server, &items);
                            }
                        }
                        match next {
                            Some(c) => cursor = Some(c),
                            None => break,
                        }
                    }
                    Page::Down(_) => break,
                }
            }
        }
    }
}

/// Where a request goes and what it becomes there.
fn route(
    gw: &Gateway,
    s: &AggSession,
    msg: &Message,
) -> Result<Option<(String, Value)>, RouteError> {
    let n = naming(gw);
    let known = |x: &str| gw.upstreams.contains_key(x);
    let mut v = msg.value.clone();
    let target = match msg.method.as_str() {
        "tools/call" | "prompts/get" => {
            let full = msg.param_str("name").unwrap_or_default();
            let (server, name) = n.split(full, known)?;
            if let Some(p) = v.get_mut("params").and_then(Value::as_object_mut) {
                p.insert("name".into(), Value::String(name.to_string()));
            }
            server.to_string()
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            let uri = msg.param_str("uri").unwrap_or_default();
            s.uris
                .lock()
                .map_err(|_| RouteError::UnknownUri(uri.into()))?
                .route(uri)?
        }
        "completion/complete" => {
            let r = msg
                .params()
                .and_then(|p| p.get("ref"))
                .cloned()
                .unwrap_or(Value::Null);
            match r.get("type").and_then(Value::as_str) {
                Some("ref/prompt") => {
                    let full = r.get("name").and_then(Value::as_str).unwrap_or_default();
                    let (server, name) = n.split(full, known)?;
                    if let Some(rf) = v.pointer_mut("/params/ref").and_then(Value::as_object_mut) {
                        rf.insert("name".into(), Value::String(name.to_string()));
                    }
                    server.to_string()
                }
                _ => {
                    let uri = r.get("uri").and_then(Value::as_str).unwrap_or_default();
                    s.uris
                        .lock()
                        .map_err(|_| RouteError::UnknownUri(uri.into()))?
                        .route(uri)?
                }
            }
        }
        _ => return Ok(None),
    };
    Ok(Some((target, v)))
}

fn needs_uri(method: &str) -> bool {
    matches!(
        method,
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" | "completion/complete"
    )
}

async fn request(
    gw: &Arc<Gateway>,
    conn: &Conn,
    headers: &HeaderMap,
    s: &Arc<AggSession>,
    msg: Message,
    mut row: AuditRow,
) -> Response {
    match msg.method.as_str() {
        "initialize" => {
            row.outcome = "invalid".into();
            return refuse(
                gw,
                row,
                StatusCode::BAD_REQUEST,
                msg.id.as_ref(),
                code::INVALID_REQUEST,
                "Invalid Request: this session is already initialized",
            )
            .await;
        }
        "ping" => {
            let d = record_local(
                gw,
                local_row(gw, conn, "ping", "answered by the aggregated endpoint"),
            );
            return json_response(&d, jsonrpc::result_body(msg.id.as_ref(), json!({})));
        }
        "logging/setLevel" => return set_level(gw, conn, s, &msg).await,
        m if aggregate::list_shape(m).is_some() => {
            return match list(gw, conn, s, &msg).await {
                Ok(result) => {
                    let mut row = local_row(
                        gw,
                        conn,
                        &msg.method,
                        "merged from every server's filtered list",
                    );
                    row.rule = "list_filter".into();
                    let d = record_local(gw, row);
                    json_response(&d, jsonrpc::result_body(msg.id.as_ref(), result))
                }
                Err(e) => {
                    row.outcome = "invalid".into();
                    refuse(
                        gw,
                        row,
                        StatusCode::OK,
                        msg.id.as_ref(),
                        code::INVALID_PARAMS,
                        &e.to_string(),
                    )
                    .await
                }
            };
        }
        _ => {}
    }
    let routed = match route(gw, s, &msg) {
        Err(RouteError::UnknownUri(_)) if needs_uri(&msg.method) && s.may_learn() => {
            learn_uris(gw, conn, s).await;
            route(gw, s, &msg)
        }
        other => other,
    };
    let (server, value) = match routed {
        Ok(Some(x)) => x,
        Ok(None) => {
            row.outcome = "refused".into();
            let why = format!(
                "Method not found: {} (not routable on the aggregated endpoint; use /mcp/<server>)",
                msg.method
            );
            return refuse(
                gw,
                row,
                StatusCode::OK,
                msg.id.as_ref(),
                code::METHOD_NOT_FOUND,
                &why,
            )
            .await;
        }
        Err(e) => {
            // Unknown and ambiguous names are refused like a name-level deny: -32602.
            row.outcome = "refused".into();
            return refuse(
                gw,
                row,
                StatusCode::OK,
                msg.id.as_ref(),
                code::INVALID_PARAMS,
                &e.to_string(),
            )
            .await;
        }
    };
    let accept = header_str(headers, "accept")
        .unwrap_or(ACCEPT_BOTH)
        .to_string();
    let id_key = msg
        .id
        .as_ref()
        .map(jsonrpc::canonical_id)
        .unwrap_or_default();
    let entry = InFlight::enter(s, id_key, &server);
    let body = jsonrpc::canonical(&value);
    let mut retried = false;
    loop {
        let up = match upstream(gw, conn, s, &server, retried).await {
            Ok(u) => u,
            Err(e) => {
                // Refused before any server route decided it: audited here, nothing forwarded.
                tracing::warn!(server, "cannot open a session: {e}");
                let why = format!("server {server} is unavailable: {e}");
                row.server = server.clone();
                row.outcome = format!("{}:unavailable", outcome::UPSTREAM_ERROR);
                let id = msg.id.as_ref();
                break refuse(gw, row, StatusCode::BAD_GATEWAY, id, code::UPSTREAM, &why).await;
            }
        };
        let i = call(gw, conn, &server, Some(&up), &accept, body.clone()).await;
        if i.status == StatusCode::NOT_FOUND && !retried {
            retried = true;
            continue;
        }
        break pass_through(gw, s, &server, i, Some(entry));
    }
}

/// `logging/setLevel`: to every server session open, each through its own route. The client
/// hears `{}` when at least one server took the level, or when none is open yet (audited here:
/// the level applies to none); when every open server refused it, the first refusal, naming
/// the servers and why.
async fn set_level(gw: &Arc<Gateway>, conn: &Conn, s: &Arc<AggSession>, msg: &Message) -> Response {
    let (mut last, mut took, mut refused) = (String::new(), 0, Vec::new());
    let mut code = code::UPSTREAM;
    for server in s.opened() {
        let up = match upstream(gw, conn, s, &server, false).await {
            Ok(up) => up,
            Err(e) => {
                refused.push(format!("{server}: {e}"));
                continue;
            }
        };
        let i = call(gw, conn, &server, Some(&up), ACCEPT_BOTH, msg.canonical()).await;
        last = i.decision.clone();
        match response_of(i, msg.id.as_ref(), |v| s.deliver(gw, &server, v)).await {
            Ok(v) => match v.get("error") {
                None => took += 1,
                Some(e) => {
                    if refused.is_empty() {
                        code = e.get("code").and_then(Value::as_i64).unwrap_or(code);
                    }
                    let why = e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("refused");
                    refused.push(format!("{server}: {why}"));
                }
            },
            Err(e) => refused.push(format!("{server}: {e}")),
        }
    }
    if took == 0 && !refused.is_empty() {
        let why = format!("no server took the level: {}", refused.join("; "));
        if last.is_empty() {
            // No server's route decided anything (no session could be opened): audited here.
            let mut row = local_row(gw, conn, &msg.method, &why);
            row.outcome = "refused".into();
            return refuse(gw, row, StatusCode::OK, msg.id.as_ref(), code, &why).await;
        }
        return proxy::rpc_error(StatusCode::OK, &last, msg.id.as_ref(), code, &why, None);
    }
    if last.is_empty() {
        let why = "no server session is open yet: the level applies to none";
        last = record_local(gw, local_row(gw, conn, &msg.method, why));
    }
    json_response(&last, jsonrpc::result_body(msg.id.as_ref(), json!({})))
}

/// A client request's entry in its session's in-flight map (which server a
/// `notifications/cancelled` for it goes to). It leaves the map when dropped: with the answer
/// when that is one JSON body, and only when the stream ends when it is SSE, so a call still
/// streaming can be cancelled.
struct InFlight {
    s: Arc<AggSession>,
    id: String,
}

impl InFlight {
    fn enter(s: &Arc<AggSession>, id: String, server: &str) -> InFlight {
        if let Ok(mut f) = s.inflight.lock() {
            f.insert(id.clone(), server.to_string());
        }
        InFlight { s: s.clone(), id }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut f) = self.s.inflight.lock() {
            f.remove(&self.id);
        }
    }
}

/// The server's answer, as the client should see it: the server's session id removed, SSE
/// events renamed and coalesced on the way.
fn pass_through(
    gw: &Arc<Gateway>,
    s: &Arc<AggSession>,
    server: &str,
    i: Internal,
    entry: Option<InFlight>,
) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = i.status;
    if let Ok(v) = HeaderValue::from_str(&i.decision) {
        r.headers_mut().insert(proxy::DECISION_HEADER, v);
    }
    let ctype = if i.sse {
        "text/event-stream"
    } else {
        "application/json"
    };
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if !i.sse {
        *r.body_mut() = i.body;
        return r;
    }
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    let gw = gw.clone();
    let s = s.clone();
    let server = server.to_string();
    let mut parser = sse::Parser::new(MAX_EVENT);
    let stream = i.body.into_data_stream().map(move |chunk| {
        let _in_flight = &entry;
        let chunk = chunk.map_err(std::io::Error::other)?;
        let mut out = Vec::new();
        for ev in parser.feed(&chunk).map_err(std::io::Error::other)? {
            match serde_json::from_str::<Value>(&ev.data) {
                Ok(v) if v.get("method").is_some() => {
                    // A server message on the call's stream: through the session's delivery
                    // (renamed, coalesced), then onto this stream if no other is open.
                    let before = s.backlog.lock().map(|b| b.len()).unwrap_or(0);
                    s.deliver(&gw, &server, v);
                    if let Ok(mut b) = s.backlog.lock() {
                        if b.len() > before {
                            if let Some(e) = b.pop_back() {
                                out.extend_from_slice(&e);
                            }
                        }
                    }
                }
                _ => out.extend_from_slice(&ev.to_bytes()),
            }
        }
        Ok::<Bytes, std::io::Error>(Bytes::from(out))
    });
    *r.body_mut() = Body::from_stream(stream);
    r
}

async fn notification(
    gw: &Arc<Gateway>,
    conn: &Conn,
    s: &Arc<AggSession>,
    msg: Message,
) -> Response {
    let targets: Vec<String> = match msg.method.as_str() {
        "notifications/initialized" => Vec::new(),
        "notifications/cancelled" => {
            let id = msg
                .params()
                .and_then(|p| p.get("requestId"))
                .map(jsonrpc::canonical_id)
                .unwrap_or_default();
            s.inflight
                .lock()
                .ok()
                .and_then(|f| f.get(&id).cloned())
                .into_iter()
                .collect()
        }
        _ => s.opened(),
    };
    let mut decision = String::new();
    for server in targets {
        if let Ok(up) = upstream(gw, conn, s, &server, false).await {
            decision = call(gw, conn, &server, Some(&up), ACCEPT_BOTH, msg.canonical())
                .await
                .decision;
        }
    }
    if decision.is_empty() {
        decision = record_local(
            gw,
            local_row(
                gw,
                conn,
                &msg.method,
                "a notification for the aggregated endpoint",
            ),
        );
    }
    proxy::respond(
        StatusCode::ACCEPTED,
        &decision,
        "application/json",
        Vec::new(),
    )
}

/// A client's answer to a server request: back to the server whose id it names.
async fn answer(
    gw: &Arc<Gateway>,
    conn: &Conn,
    s: &Arc<AggSession>,
    msg: Message,
    mut row: AuditRow,
) -> Response {
    let ours = msg.id.as_ref().and_then(Value::as_str).unwrap_or_default();
    let n = naming(gw);
    let routed = n
        .split(ours, |x| gw.upstreams.contains_key(x))
        .ok()
        .and_then(|(server, id)| {
            let id = jsonrpc::parse_value(id.as_bytes(), Limits::default()).ok()?;
            Some((server.to_string(), id))
        });
    let Some((server, id)) = routed else {
        row.outcome = "refused".into();
        return refuse(
            gw,
            row,
            StatusCode::BAD_REQUEST,
            msg.id.as_ref(),
            code::INVALID_REQUEST,
            "no server request with this id is waiting for your answer",
        )
        .await;
    };
    let mut v = msg.value.clone();
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), id);
    }
    let up = match upstream(gw, conn, s, &server, false).await {
        Ok(u) => u,
        Err(e) => {
            return proxy::rpc_error(
                StatusCode::BAD_GATEWAY,
                "",
                msg.id.as_ref(),
                code::UPSTREAM,
                &e,
                None,
            );
        }
    };
    let i = call(
        gw,
        conn,
        &server,
        Some(&up),
        ACCEPT_BOTH,
        jsonrpc::canonical(&v),
    )
    .await;
    pass_through(gw, s, &server, i, None)
}

/// Relays one server session's stream (GET `/mcp/<server>`) into the client's stream.
fn relay(
    gw: Arc<Gateway>,
    conn: Conn,
    s: Arc<AggSession>,
    server: String,
    up: Up,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    tokio::spawn(async move {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        if let Some(v) = up
            .sid
            .as_deref()
            .and_then(|x| HeaderValue::from_str(x).ok())
        {
            h.insert(SESSION_HEADER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&up.version) {
            h.insert(VERSION_HEADER, v);
        }
        let r = super::request::session_request(
            State(gw.clone()),
            Path(server.clone()),
            Extension(conn),
            Method::GET,
            h,
        )
        .await;
        if !r.status().is_success() {
            tracing::debug!(server, status = %r.status(), "no server stream for the aggregated session");
            return;
        }
        let mut parser = sse::Parser::new(MAX_EVENT);
        let mut body = r.into_body().into_data_stream();
        loop {
            let next = tokio::select! {
                n = body.next() => n,
                _ = tx.closed() => return,
            };
            let Some(Ok(chunk)) = next else { return };
            let Ok(events) = parser.feed(&chunk) else {
                return;
            };
            for ev in events {
                if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
                    s.deliver(&gw, &server, v);
                }
            }
        }
    });
}

/// `GET /mcp` (the merged stream of every server session) and `DELETE /mcp` (end them all).
pub async fn session_request(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let mut row = AuditRow::new("mcp", &conn);
    row.method = method.to_string();
    row.action = row.method.clone();
    let Some(caller) = conn.caller.clone() else {
        row.kind = "identity";
        row.outcome = "unidentified".into();
        return refuse(
            &gw,
            row,
            StatusCode::FORBIDDEN,
            None,
            code::UNIDENTIFIED,
            "forbidden: no verified tailnet identity",
        )
        .await;
    };
    let Some(sid) = header_str(&headers, SESSION_HEADER).map(str::to_string) else {
        return refuse(
            &gw,
            row,
            StatusCode::BAD_REQUEST,
            None,
            code::INVALID_REQUEST,
            "Mcp-Session-Id is required",
        )
        .await;
    };
    let s = match gw.aggregate.get(&sid) {
        Some(s) if s.principal == caller.principal.id => s,
        Some(_) => {
            row.outcome = "session_refused".into();
            return refuse(
                &gw,
                row,
                StatusCode::FORBIDDEN,
                None,
                code::UNIDENTIFIED,
                "this session belongs to another identity",
            )
            .await;
        }
        None => {
            return refuse(
                &gw,
                row,
                StatusCode::NOT_FOUND,
                None,
                code::INVALID_REQUEST,
                "unknown session",
            )
            .await;
        }
    };
    if method == Method::DELETE {
        gw.aggregate.end(&sid);
        let mut h = HeaderMap::new();
        for server in s.opened() {
            let slot = s.slot(&server);
            let up = slot.lock().await.take();
            if let Some(Up {
                sid: Some(usid),
                version,
            }) = up
            {
                h.clear();
                if let Ok(v) = HeaderValue::from_str(&usid) {
                    h.insert(SESSION_HEADER, v);
                }
                if let Ok(v) = HeaderValue::from_str(&version) {
                    h.insert(VERSION_HEADER, v);
                }
                let _ = super::request::session_request(
                    State(gw.clone()),
                    Path(server.clone()),
                    Extension(conn.clone()),
                    Method::DELETE,
                    h.clone(),
                )
                .await;
            }
        }
        let d = record_local(
            &gw,
            local_row(&gw, &conn, "DELETE", "aggregated session ended"),
        );
        return proxy::respond(StatusCode::OK, &d, "application/json", Vec::new());
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    if let Ok(mut b) = s.backlog.lock() {
        while let Some(ev) = b.pop_front() {
            if tx.try_send(ev.clone()).is_err() {
                b.push_front(ev);
                break;
            }
        }
    }
    if let Ok(mut o) = s.outbox.lock() {
        *o = Some(tx.clone());
    }
    for server in s.opened() {
        let slot = s.slot(&server);
        let up = slot.lock().await.clone();
        if let Some(up) = up {
            relay(gw.clone(), conn.clone(), s.clone(), server, up, tx.clone());
        }
    }
    drop(tx);
    let d = record_local(
        &gw,
        local_row(&gw, &conn, "GET", "aggregated stream opened"),
    );
    let max = gw
        .upstreams
        .values()
        .map(|u| u.max_stream)
        .max()
        .unwrap_or(Duration::from_secs(3600));
    let deadline = tokio::time::Instant::now() + max;
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .take_until(tokio::time::sleep_until(deadline))
        .map(Ok::<Bytes, std::io::Error>);
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(&d) {
        r.headers_mut().insert(proxy::DECISION_HEADER, v);
    }
    r
}

/// Keeps the list of open sessions' servers: for tests.
pub fn opened_servers(gw: &Gateway, sid: &str) -> BTreeMap<String, bool> {
    gw.aggregate
        .get(sid)
        .map(|s| {
            s.ups
                .lock()
                .map(|m| m.keys().map(|k| (k.clone(), true)).collect())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}
