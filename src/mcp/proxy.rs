//! The MCP route `/mcp/<server>`: identify, parse strictly, authorize, audit, forward the
//! canonical message, stream the answer back (filtering lists), record the outcome.
//!
//! Denials (DESIGN.md §4): a tool the caller cannot even see answers `-32602 Unknown tool`;
//! a visible tool denied for these arguments answers an `isError` result naming the decision
//! id and reason. Every response carries `Toolgate-Decision-Id`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use super::jsonrpc::{self, Kind, Limits, Message, code};
use super::mapping::{self, Check};
use super::payload::{self, Payload, Slot};
use super::sse;
use super::transport::{self, Failure};
use crate::audit::record::outcome;
use crate::gateway::{AuditRow, Caller, Conn, Gateway, SessionCheck, Upstream};
use crate::policy::model::Effect;

pub const DECISION_HEADER: &str = "toolgate-decision-id";
const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
/// The first protocol revision whose `Mcp-Method`/`Mcp-Name` headers must match the body.
const MODERN: &str = "2026-07-28";
/// The largest JSON response we inspect (lists, call results).
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
const MAX_SSE_EVENT: usize = 8 * 1024 * 1024;
/// The whole request body must arrive within this time (slow-body attacks; invariant I5).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The oldest protocol revision we speak (`MCP-Protocol-Version` values are `YYYY-MM-DD`).
const OLDEST: &str = "2024-11-05";

pub(crate) fn respond(
    status: StatusCode,
    decision: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(decision) {
        r.headers_mut().insert(DECISION_HEADER, v);
    }
    r
}

pub(crate) fn rpc_error(
    status: StatusCode,
    decision: &str,
    id: Option<&Value>,
    code: i64,
    msg: &str,
    data: Option<Value>,
) -> Response {
    respond(
        status,
        decision,
        "application/json",
        jsonrpc::error_body(id, code, msg, data),
    )
}

/// Audits a refusal (nothing forwarded) and answers it.
pub(crate) async fn refuse(
    gw: &Gateway,
    mut row: AuditRow,
    status: StatusCode,
    id: Option<&Value>,
    code: i64,
    msg: &str,
) -> Response {
    row.effect = Effect::Deny;
    if row.policy_hash.is_empty() {
        // The policy in force when it was refused, as for a decision.
        row.policy_hash = gw.store.current().hash.clone();
    }
    if row.outcome.is_empty() {
        row.outcome = "refused".into();
    }
    if row.reason.is_empty() {
        row.reason = msg.to_string();
    }
    let decision = row.id.clone();
    // A refusal is audited but never waits: nothing runs, so nothing is at stake.
    if let Err(e) = gw.submit(row) {
        tracing::warn!(error = %e, "audit row for a refusal was not stored");
    }
    rpc_error(status, &decision, id, code, msg, None)
}

/// The daemon-wide in-flight budget is full (`limits.in_flight_bytes`): 503 before any
/// policy decision, audited (outcome `overloaded`) and counted, nothing forwarded.
pub(crate) async fn overloaded(gw: &Gateway, mut row: AuditRow, id: Option<&Value>) -> Response {
    row.outcome = "overloaded".into();
    let msg = format!(
        "overloaded: calls in flight hold the gateway's limit of {} bytes (limits.in_flight_bytes); nothing was forwarded; retry later",
        gw.budget.capacity()
    );
    let mut r = refuse(
        gw,
        row,
        StatusCode::SERVICE_UNAVAILABLE,
        id,
        code::OVERLOADED,
        &msg,
    )
    .await;
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r.extensions_mut().insert(NotForwarded);
    r
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A refusal before any decision: HTTP status, JSON-RPC code, message.
type Refusal = (StatusCode, i64, String);

/// The caller and the upstream of a request, or why it is refused (identity first: I1).
fn identified(
    gw: &Gateway,
    conn: &Conn,
    server: &str,
    row: &mut AuditRow,
) -> Result<(Arc<Caller>, Upstream), Refusal> {
    let Some(caller) = conn.caller.clone() else {
        row.kind = "identity";
        row.outcome = "unidentified".into();
        let why = conn
            .unidentified
            .as_deref()
            .unwrap_or("no verified tailnet identity");
        return Err((
            StatusCode::FORBIDDEN,
            code::UNIDENTIFIED,
            format!("forbidden: {why}"),
        ));
    };
    let Some(upstream) = gw.upstreams.get(server).cloned() else {
        return Err((
            StatusCode::NOT_FOUND,
            code::INVALID_REQUEST,
            format!("no MCP server named {server:?}"),
        ));
    };
    Ok((caller, upstream))
}

async fn refuse_with(gw: &Gateway, row: AuditRow, (status, code, msg): Refusal) -> Response {
    refuse(gw, row, status, None, code, &msg).await
}

/// `POST /mcp/<server>`.
pub async fn post(
    State(gw): State<Arc<Gateway>>,
    Path(server): Path<String>,
    Extension(conn): Extension<Conn>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut row = AuditRow::new("mcp", &conn);
    row.server = server.clone();
    let (caller, upstream) = match identified(&gw, &conn, &server, &mut row) {
        Ok(x) => x,
        Err(status_code_msg) => return refuse_with(&gw, row, status_code_msg).await,
    };
    let ctype = header_str(&headers, "content-type").unwrap_or("");
    if !ctype.to_ascii_lowercase().starts_with("application/json") {
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
    let accept = header_str(&headers, "accept")
        .unwrap_or("*/*")
        .to_ascii_lowercase();
    if !(accept.contains("application/json")
        || accept.contains("text/event-stream")
        || accept.contains("*/*"))
    {
        row.outcome = "invalid".into();
        return refuse(
            &gw,
            row,
            StatusCode::NOT_ACCEPTABLE,
            None,
            code::INVALID_REQUEST,
            "Accept must allow application/json or text/event-stream",
        )
        .await;
    }
    // Identity encoding only: a compressed body would be one message to us and maybe another
    // to an upstream that decodes it (security.md RPC-8).
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        row.outcome = "invalid".into();
        return refuse(
            &gw,
            row,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            code::INVALID_REQUEST,
            "Content-Encoding must be identity",
        )
        .await;
    }
    let limits = Limits {
        max_bytes: upstream.max_body,
        max_nodes: upstream.max_nodes,
        ..Limits::default()
    };
    // A declared length over the limit is refused before anything is read (HTTP-2).
    if let Some(len) = header_str(&headers, "content-length").and_then(|v| v.parse::<u64>().ok()) {
        if len > limits.max_bytes as u64 {
            row.outcome = "invalid".into();
            return refuse(
                &gw,
                row,
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                code::INVALID_REQUEST,
                &format!(
                    "request body of {len} bytes refused; the limit is {}",
                    limits.max_bytes
                ),
            )
            .await;
        }
    }
    // The daemon-wide budget (invariant I5): the declared length, or the most this server
    // takes, is held before a byte is read.
    let declared = header_str(&headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    let Some(mut held) = gw.budget.reserve(declared.unwrap_or(limits.max_bytes)) else {
        return overloaded(&gw, row, None).await;
    };
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limits.max_bytes));
    let bytes = match read.await {
        Ok(Ok(b)) => b,
        Err(_) => {
            row.outcome = "invalid".into();
            return refuse(
                &gw,
                row,
                StatusCode::REQUEST_TIMEOUT,
                None,
                code::INVALID_REQUEST,
                &format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            )
            .await;
        }
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
    };
    let parsed = jsonrpc::parse_sized(&bytes, limits);
    let len = bytes.len();
    // The raw bytes are not needed past here: what is checked and forwarded is the parsed value.
    drop(bytes);
    let (mut msg, size) = match parsed {
        Ok(m) => m,
        Err(e) => {
            row.outcome = "invalid".into();
            let status = match e {
                jsonrpc::ParseError::TooLarge { .. }
                | jsonrpc::ParseError::TooManyValues { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return refuse(&gw, row, status, None, e.code(), &e.to_string()).await;
        }
    };
    row.method = msg.method.clone();
    // Held from here: the parsed value, and the canonical copy that is forwarded.
    if !held.resize(size.parsed_bytes(len).saturating_add(len)) {
        return overloaded(&gw, row, msg.id.as_ref()).await;
    }
    // The arguments are held once, shared by the row, lent to the check and put back for the
    // forward. The row has them for the refusals below too (digested or redacted per
    // audit.arguments), and so the URI a `resources/read` names.
    let payload = payload::detach(&mut msg);
    row.arguments = payload.as_ref().map(Payload::shared);
    if msg.method == "resources/read" {
        row.uri = msg.param_str("uri").map(str::to_string);
    }
    // Only the envelope keys of its kind (I4): an extra `paramſ`, or a `METHOD` in an answer,
    // would be read by a case-insensitive upstream as what policy never saw.
    if let Err(e) = jsonrpc::check_envelope(&msg) {
        row.outcome = "invalid".into();
        return refuse(
            &gw,
            row,
            StatusCode::BAD_REQUEST,
            msg.id.as_ref(),
            e.code(),
            &e.to_string(),
        )
        .await;
    }
    // An unknown or malformed protocol revision is refused (security.md RPC-10): we could not
    // know which header rules apply to it.
    if let Some(v) = headers.get(VERSION_HEADER) {
        let v = v.to_str().unwrap_or("");
        let well_formed = v.len() == 10
            && v.bytes().enumerate().all(|(i, b)| {
                if i == 4 || i == 7 {
                    b == b'-'
                } else {
                    b.is_ascii_digit()
                }
            });
        if !well_formed || v < OLDEST {
            row.outcome = "invalid".into();
            return refuse(
                &gw,
                row,
                StatusCode::BAD_REQUEST,
                msg.id.as_ref(),
                code::UNSUPPORTED_VERSION,
                &format!("unsupported MCP-Protocol-Version {v:?}"),
            )
            .await;
        }
    }
    // A request method without an id would run upstream unanswered and unchecked by the
    // caller: only `notifications/*` may come without an id (security.md RPC-5).
    if msg.kind == Kind::Notification && !msg.method.starts_with("notifications/") {
        row.outcome = "invalid".into();
        return refuse(
            &gw,
            row,
            StatusCode::BAD_REQUEST,
            None,
            code::INVALID_REQUEST,
            &format!("{} is a request: it needs an \"id\"", msg.method),
        )
        .await;
    }
    // The stateless era mirrors the method and name in headers: they must match the body.
    if let Err(m) = check_mirrored_headers(&headers, &msg) {
        row.outcome = "invalid".into();
        return refuse(
            &gw,
            row,
            StatusCode::BAD_REQUEST,
            msg.id.as_ref(),
            code::HEADER_MISMATCH,
            &m,
        )
        .await;
    }
    // A session belongs to the identity that opened it, and is initialized once: a second
    // `initialize` would renegotiate capabilities (say, claim sampling) mid-session. The
    // TypeScript SDK's server refuses it the same way ("Server already initialized"). A
    // session this gateway never saw opened (made up, ended, or from before a restart) is
    // unknown: 404, as the MCP transport says a server answers for one, so the client opens a
    // new session; forwarding it would let any identity use a session no one bound.
    if let Some(sid) = header_str(&headers, SESSION_HEADER) {
        let refusal = match gw.sessions.check(sid, &caller.principal.id, &server) {
            SessionCheck::Unknown => Some((
                StatusCode::NOT_FOUND,
                code::INVALID_REQUEST,
                "unknown_session",
                "unknown session: initialize a new one (send initialize without Mcp-Session-Id)",
            )),
            SessionCheck::Foreign => Some((
                StatusCode::FORBIDDEN,
                code::UNIDENTIFIED,
                "session_refused",
                "this session belongs to another identity",
            )),
            SessionCheck::Own if msg.method == "initialize" => Some((
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                "invalid",
                "Invalid Request: this session is already initialized (send initialize without Mcp-Session-Id to open a new one)",
            )),
            SessionCheck::Own => None,
        };
        if let Some((status, code, outcome, why)) = refusal {
            row.outcome = outcome.into();
            return refuse(&gw, row, status, msg.id.as_ref(), code, why).await;
        }
    }
    // One request per id in flight on a session (the upstream matches answers by id alone).
    let mut in_flight = None;
    if let (Some(sid), Kind::Request, Some(id)) = (
        header_str(&headers, SESSION_HEADER),
        msg.kind,
        msg.id.as_ref(),
    ) {
        let key = (server.clone(), sid.to_string(), jsonrpc::canonical_id(id));
        if !gw.in_flight.begin(&key) {
            row.outcome = "invalid".into();
            let why = format!(
                "Invalid Request: request id {} is already in flight on this session; use another id",
                key.2
            );
            return refuse(
                &gw,
                row,
                StatusCode::BAD_REQUEST,
                msg.id.as_ref(),
                code::INVALID_REQUEST,
                &why,
            )
            .await;
        }
        in_flight = Some(InFlightGuard {
            gw: gw.clone(),
            key,
        });
    }
    if msg.kind == Kind::Response {
        // A client's answer to a server request (sampling, elicitation, roots): forwarded only
        // when that request was delivered to this caller and is still unanswered.
        let id = msg
            .id
            .as_ref()
            .map(jsonrpc::canonical_id)
            .unwrap_or_default();
        row.action = "response".into();
        if !gw
            .server_requests
            .answer(&caller.principal.id, &server, &id)
        {
            row.outcome = "refused".into();
            return refuse(
                &gw,
                row,
                StatusCode::BAD_REQUEST,
                msg.id.as_ref(),
                code::INVALID_REQUEST,
                &format!("no request {id} from this server is waiting for your answer"),
            )
            .await;
        }
        row.effect = Effect::Allow;
        row.reason = "a client's answer to a server request".into();
        let r = forward(
            &gw, &upstream, &headers, msg, payload, row, None, started, &caller,
        )
        .await;
        if r.extensions().get::<NotForwarded>().is_some() {
            // Not delivered (the audit store could not take its row): the request still waits
            // for this answer, and the client may retry it.
            gw.server_requests
                .expect(&caller.principal.id, &server, &id);
        }
        return r;
    }
    if upstream.deny_unknown && !mapping::is_known_method(&msg.method) {
        row.outcome = "refused".into();
        return refuse(
            &gw,
            row,
            StatusCode::OK,
            msg.id.as_ref(),
            code::METHOD_NOT_FOUND,
            &format!(
                "Method not found: {} (unknown methods are refused on this server)",
                msg.method
            ),
        )
        .await;
    }
    let sent_arguments = payload
        .as_ref()
        .filter(|p| p.slot() == Slot::Arguments)
        .map(Payload::value);
    let check = match mapping::check_for(&msg, sent_arguments) {
        Ok(c) => c,
        Err(e) => {
            row.outcome = "invalid".into();
            return refuse(
                &gw,
                row,
                StatusCode::OK,
                msg.id.as_ref(),
                code::INVALID_PARAMS,
                &e,
            )
            .await;
        }
    };
    row.action = check.action.clone();
    row.tool = check.name.clone().unwrap_or_default();
    if row.arguments.is_none() && check.takes_arguments {
        // `{}` for a call that sent none (otherwise the row already holds what was sent).
        row.arguments = Some(Arc::new(Value::Object(Map::new())));
    }
    if mapping::list_key(&msg.method).is_some() {
        // Lists are forwarded for every identified caller and filtered item by item.
        row.effect = Effect::Allow;
        row.rule = "list_filter".into();
        row.reason = "lists are filtered per caller".into();
        return forward(
            &gw, &upstream, &headers, msg, payload, row, in_flight, started, &caller,
        )
        .await;
    }
    authorize_and_forward(
        &gw, &upstream, &headers, msg, payload, check, row, in_flight, started, &caller,
    )
    .await
}

fn check_mirrored_headers(h: &HeaderMap, msg: &Message) -> Result<(), String> {
    let version = header_str(h, VERSION_HEADER).unwrap_or("");
    let modern = version >= MODERN;
    match header_str(h, "mcp-method") {
        Some(m) if m != msg.method => {
            return Err(format!(
                "Mcp-Method {m:?} does not match the body's method {:?}",
                msg.method
            ));
        }
        None if modern && msg.kind != Kind::Response => {
            return Err("Mcp-Method header is required".into());
        }
        _ => {}
    }
    let body_name = match msg.method.as_str() {
        "tools/call" | "prompts/get" => msg.param_str("name"),
        "resources/read" => msg.param_str("uri"),
        _ => None,
    };
    match (header_str(h, "mcp-name"), body_name) {
        (Some(hn), Some(bn)) if hn != bn => {
            Err(format!("Mcp-Name {hn:?} does not match the body's {bn:?}"))
        }
        (Some(hn), None) => Err(format!("Mcp-Name {hn:?} given, but the body names nothing")),
        (None, Some(_)) if modern => Err("Mcp-Name header is required".into()),
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments, reason = "one request's whole context")]
async fn authorize_and_forward(
    gw: &Arc<Gateway>,
    upstream: &Upstream,
    headers: &HeaderMap,
    msg: Message,
    mut payload: Option<Payload>,
    check: Check,
    mut row: AuditRow,
    in_flight: Option<InFlightGuard>,
    started: Instant,
    caller: &Arc<Caller>,
) -> Response {
    if gw.audit.saturated() {
        // Overload: the row could not be queued, so neither an allow nor a deny could be
        // recorded. Answer at once (security.md §3.5: 503 within 50 ms); nothing is forwarded.
        gw.metrics
            .audit_refusals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return audit_unavailable(&row.id, &msg, "the audit queue is full");
    }
    let annotations = check
        .name
        .as_ref()
        .and_then(|t| gw.annotations_for(&upstream.target.server, t));
    let mut resource =
        mapping::resource(&upstream.target, &msg.method, &check, annotations.as_ref());
    // The arguments are lent to the check (`R.attr.arguments`), not copied: the row lets go
    // of its share, the value moves into the resource and back out after the decisions.
    let sent = payload.is_some();
    if check.takes_arguments {
        row.arguments = None;
        mapping::lend_arguments(&mut resource, payload.take().map(Payload::into_value));
    }
    // For a tool call, also ask whether the tool is visible at all: a hidden tool stays hidden.
    let list_action = match msg.method.as_str() {
        "tools/call" => check.name.as_ref().map(|n| format!("tools/list::{n}")),
        "prompts/get" => check.name.as_ref().map(|n| format!("prompts/list::{n}")),
        "resources/read" => check.name.as_ref().map(|n| format!("resources/list::{n}")),
        _ => None,
    };
    let (d, mut resource) = gw.decide_lent(&caller.principal, resource, vec![check.action.clone()]);
    row = row.decided(&d, &check.action);
    // Only a denied call asks whether the tool is visible at all (an allowed call runs
    // whatever the list says), so most calls cost one evaluation, not two.
    let visible = row.effect != Effect::Allow
        && list_action.as_ref().is_some_and(|a| {
            let (v, back) = gw.decide_lent(
                &caller.principal,
                std::mem::take(&mut resource),
                vec![a.clone()],
            );
            resource = back;
            v.effect(a) == Effect::Allow
        });
    if check.takes_arguments {
        let back =
            mapping::return_arguments(&mut resource).unwrap_or_else(|| Value::Object(Map::new()));
        if sent {
            let p = Payload::new(back, Slot::Arguments);
            row.arguments = Some(p.shared());
            payload = Some(p);
        } else {
            row.arguments = Some(Arc::new(back));
        }
    }
    drop(resource);
    if row.effect == Effect::Allow {
        return forward(
            gw, upstream, headers, msg, payload, row, in_flight, started, caller,
        )
        .await;
    }
    row.outcome = "denied".into();
    let decision = row.id.clone();
    // The policy's own words for the model (a rule's `output`), then the engine's reason.
    let said: Vec<String> = d
        .output
        .outputs
        .iter()
        .filter(|o| o.action == check.action)
        .filter_map(|o| o.val.as_ref())
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
        .collect();
    let reason = if said.is_empty() {
        row.reason.clone()
    } else {
        format!("{} ({})", said.join("; "), row.reason)
    };
    if let Err(e) = gw.submit(row) {
        tracing::warn!(error = %e, "audit row for a denial was not stored");
    }
    if msg.kind == Kind::Notification {
        return respond(
            StatusCode::BAD_REQUEST,
            &decision,
            "application/json",
            Vec::new(),
        );
    }
    let name = check.name.clone().unwrap_or_default();
    match (msg.method.as_str(), visible) {
        ("tools/call", true) => {
            let text = format!("Denied by policy (decision {decision}): {reason}");
            let mut result = json!({"content": [{"type": "text", "text": text}], "isError": true});
            if header_str(headers, VERSION_HEADER).is_some_and(|v| v >= MODERN) {
                result["resultType"] = json!("complete");
            }
            respond(
                StatusCode::OK,
                &decision,
                "application/json",
                jsonrpc::result_body(msg.id.as_ref(), result),
            )
        }
        // A name-level deny keeps the tool (prompt, resource) hidden, as in the filtered list.
        ("tools/call" | "prompts/get" | "resources/read", _) => {
            let what = match msg.method.as_str() {
                "tools/call" => "tool",
                "prompts/get" => "prompt",
                _ => "resource",
            };
            rpc_error(
                StatusCode::OK,
                &decision,
                msg.id.as_ref(),
                code::INVALID_PARAMS,
                &format!("Unknown {what}: {name}"),
                None,
            )
        }
        _ => rpc_error(
            StatusCode::OK,
            &decision,
            msg.id.as_ref(),
            code::DENIED,
            &format!("denied by policy: {}", msg.method),
            Some(json!({"decisionId": decision, "reason": reason})),
        ),
    }
}

/// A request registered in [`crate::gateway::InFlight`]; ends its registration when dropped
/// (its answer delivered, its stream ended, or the caller gone).
struct InFlightGuard {
    gw: Arc<Gateway>,
    key: (String, String, String),
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.gw.in_flight.end(&self.key);
    }
}

/// Records how a forwarded call ended when the caller hangs up first. hyper drops a request's
/// future when its connection closes; without this the call's row would stay `pending`.
struct Hangup {
    gw: Arc<Gateway>,
    decision: String,
    started: Instant,
    /// The message is on its way to the upstream (it may act on it).
    sent: std::sync::atomic::AtomicBool,
    armed: bool,
}

impl Hangup {
    fn sent(&self) {
        self.sent.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Hangup {
    fn drop(&mut self) {
        if self.armed {
            let outcome = if self.sent.load(std::sync::atomic::Ordering::Relaxed) {
                outcome::CLIENT_DISCONNECTED
            } else {
                outcome::NOT_FORWARDED
            };
            self.gw
                .outcome(&self.decision, outcome, self.started.elapsed());
        }
    }
}

/// Commits the audit row (for calls that act), forwards the canonical message, and answers.
/// Every way this ends records the call's outcome, a caller that hangs up included.
#[allow(clippy::too_many_arguments, reason = "one request's whole context")]
async fn forward(
    gw: &Arc<Gateway>,
    upstream: &Upstream,
    headers: &HeaderMap,
    msg: Message,
    payload: Option<Payload>,
    row: AuditRow,
    in_flight: Option<InFlightGuard>,
    started: Instant,
    caller: &Arc<Caller>,
) -> Response {
    let mut hangup = Hangup {
        gw: gw.clone(),
        decision: row.id.clone(),
        started,
        sent: false.into(),
        armed: true,
    };
    let r = exchange(
        gw, upstream, headers, msg, payload, row, &hangup, in_flight, started, caller,
    )
    .await;
    // Finished (not dropped at an await): `exchange` recorded the outcome itself.
    hangup.armed = false;
    r
}

#[allow(clippy::too_many_arguments, reason = "one request's whole context")]
async fn exchange(
    gw: &Arc<Gateway>,
    upstream: &Upstream,
    headers: &HeaderMap,
    mut msg: Message,
    payload: Option<Payload>,
    mut row: AuditRow,
    hangup: &Hangup,
    in_flight: Option<InFlightGuard>,
    started: Instant,
    caller: &Arc<Caller>,
) -> Response {
    row.outcome = outcome::PENDING.into();
    let decision = row.id.clone();
    // INVARIANT (I2): nothing reaches the upstream before its decision row is committed:
    // requests of every method, notifications, and answers to server requests alike (any of
    // them can act upstream: a completion reads data, a notification cancels, an answer
    // feeds a sampling result back).
    let commit = match gw.submit(row) {
        Ok(c) => c,
        Err(e) => return audit_unavailable(&decision, &msg, &e.0),
    };
    // The row was built (digested, redacted) at submit and let go of the arguments: they go
    // back into the message without a copy.
    if let Some(p) = payload {
        p.attach(&mut msg);
    }
    if let Err(e) = commit.await {
        return audit_unavailable(&decision, &msg, &e.0);
    }
    hangup.sent();
    let reply = transport::post(gw, upstream, headers, &msg, &caller.principal.id).await;
    // Sent: only the method and id are needed from here on (the answer may take long).
    msg.value = Value::Null;
    let msg = &msg;
    let reply = match reply {
        Ok(r) => r,
        Err(f) => return failed(gw, &decision, msg, started, f),
    };
    let status = reply.status;
    let out_headers = reply.headers;
    if msg.method == "initialize" && status.is_success() {
        if let Some(sid) = header_str(&out_headers, SESSION_HEADER) {
            gw.sessions
                .bind(sid, &caller.principal.id, &upstream.target.server);
        }
    }
    let ctype = header_str(&out_headers, "content-type")
        .unwrap_or("")
        .to_ascii_lowercase();
    if status.is_server_error() {
        let body = read_limited(reply.body, 200).await.unwrap_or_default();
        let snippet = String::from_utf8_lossy(&body).to_string();
        return upstream_failed(
            gw,
            &decision,
            msg,
            started,
            &format!("upstream answered {status}: {snippet}"),
        );
    }
    if msg.kind != Kind::Request {
        // Notifications and responses: 202 with no body is the expected answer.
        gw.outcome(&decision, "forwarded", started.elapsed());
        let mut r = respond(
            StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::ACCEPTED),
            &decision,
            "application/json",
            Vec::new(),
        );
        merge_headers(&mut r, out_headers);
        return r;
    }
    if ctype.starts_with("text/event-stream") {
        return stream_sse(
            gw.clone(),
            with_session(upstream, headers),
            msg.clone(), // method and id only: the value was dropped once sent
            decision,
            reply.body,
            out_headers,
            started,
            caller.clone(),
            None,
            in_flight,
        );
    }
    let body = match read_limited(reply.body, MAX_RESPONSE_BYTES).await {
        Ok(b) => b,
        Err(e) => return upstream_failed(gw, &decision, msg, started, &e),
    };
    let body = match inspect_response(gw, &upstream.target.server, msg, &body, caller) {
        Ok(b) => b,
        Err(e) => return upstream_failed(gw, &decision, msg, started, &e),
    };
    gw.outcome(&decision, "forwarded", started.elapsed());
    let mut r = respond(
        StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::OK),
        &decision,
        "application/json",
        body,
    );
    merge_headers(&mut r, out_headers);
    r
}

fn merge_headers(r: &mut Response, h: HeaderMap) {
    for (k, v) in h.iter() {
        r.headers_mut().insert(k.clone(), v.clone());
    }
}

/// Reads a body up to `limit` bytes (an error beyond it).
async fn read_limited(mut body: transport::BodyStream, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if out.len() + chunk.len() > limit {
            return Err(format!("upstream response larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Marks a response whose message never reached the upstream.
#[derive(Debug, Clone, Copy)]
struct NotForwarded;

/// Answers a transport failure; the decision row gets its outcome.
fn failed(gw: &Gateway, decision: &str, msg: &Message, started: Instant, f: Failure) -> Response {
    let (status, why) = match f {
        Failure::Upstream(why) => return upstream_failed(gw, decision, msg, started, &why),
        Failure::Full(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
        Failure::NoSession(why) => (StatusCode::NOT_FOUND, why),
        Failure::Invalid(why) => (StatusCode::BAD_REQUEST, why),
    };
    gw.outcome(decision, outcome::NOT_FORWARDED, started.elapsed());
    tracing::info!(decision, method = %msg.method, "not forwarded: {why}");
    let code = if status == StatusCode::SERVICE_UNAVAILABLE {
        code::UPSTREAM
    } else {
        code::INVALID_REQUEST
    };
    let mut r = rpc_error(status, decision, msg.id.as_ref(), code, &why, None);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r.extensions_mut().insert(NotForwarded);
    r
}

fn audit_unavailable(decision: &str, msg: &Message, why: &str) -> Response {
    let mut r = rpc_error(
        StatusCode::SERVICE_UNAVAILABLE,
        decision,
        msg.id.as_ref(),
        code::AUDIT_UNAVAILABLE,
        &format!("audit unavailable, nothing was forwarded; retry later ({why})"),
        None,
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r.extensions_mut().insert(NotForwarded);
    r
}

fn upstream_failed(
    gw: &Gateway,
    decision: &str,
    msg: &Message,
    started: Instant,
    why: &str,
) -> Response {
    gw.outcome(decision, "upstream_error", started.elapsed());
    tracing::warn!(decision, method = %msg.method, "{why}");
    rpc_error(
        StatusCode::BAD_GATEWAY,
        decision,
        msg.id.as_ref(),
        code::UPSTREAM,
        why,
        None,
    )
}

/// Checks a JSON response (id, shape) and filters list results. Returns the bytes to send.
fn inspect_response(
    gw: &Gateway,
    server: &str,
    msg: &Message,
    body: &[u8],
    caller: &Caller,
) -> Result<Vec<u8>, String> {
    let value = jsonrpc::parse_value(
        body,
        Limits {
            max_bytes: MAX_RESPONSE_BYTES,
            max_depth: 128,
            max_nodes: jsonrpc::MAX_UPSTREAM_NODES,
        },
    )
    .map_err(|e| format!("upstream sent a bad response: {e}"))?;
    let resp = jsonrpc::message(value).map_err(|e| format!("upstream sent a bad response: {e}"))?;
    if resp.kind != Kind::Response {
        return Err("upstream answered a request with something other than a response".into());
    }
    if resp.id != msg.id {
        return Err(format!(
            "upstream response id {:?} does not match request id {:?}",
            resp.id, msg.id
        ));
    }
    let mut value = resp.value;
    filter_list(gw, server, &msg.method, &mut value, caller);
    Ok(jsonrpc::canonical(&value))
}

/// Removes list items the caller may not see; keeps `nextCursor`; marks the page private.
fn filter_list(gw: &Gateway, server: &str, method: &str, value: &mut Value, caller: &Caller) {
    let Some(key) = mapping::list_key(method) else {
        return;
    };
    let Some(result) = value.get_mut("result").and_then(Value::as_object_mut) else {
        return;
    };
    let Some(Value::Array(items)) = result.get_mut(key) else {
        return;
    };
    if method == "tools/list" {
        gw.remember_tools(server, items);
    }
    let Some(upstream) = gw.upstreams.get(server) else {
        return;
    };
    items.retain(|item| {
        let Some(action) = mapping::list_action(method, item) else {
            return false;
        };
        let name = item
            .get("name")
            .or_else(|| item.get("uri"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let check = Check {
            action: action.clone(),
            name,
            takes_arguments: false,
        };
        let resource = mapping::resource(&upstream.target, method, &check, item.get("annotations"));
        gw.decide(&caller.principal, resource, vec![action.clone()])
            .effect(&action)
            == Effect::Allow
    });
    if result.contains_key("ttlMs") {
        result.insert("ttlMs".into(), Value::from(0));
    }
    if result.contains_key("cacheScope") {
        result.insert("cacheScope".into(), Value::String("private".into()));
    }
}

/// Streams an SSE response event by event: filters list results, audits server requests,
/// records the outcome when the response event passes.
#[allow(clippy::too_many_arguments, reason = "one stream's whole context")]
fn stream_sse(
    gw: Arc<Gateway>,
    upstream: Upstream,
    msg: Message,
    decision: String,
    body: transport::BodyStream,
    headers: HeaderMap,
    started: Instant,
    caller: Arc<Caller>,
    inject: Option<tokio::sync::mpsc::Receiver<Bytes>>,
    in_flight: Option<InFlightGuard>,
) -> Response {
    struct St {
        gw: Arc<Gateway>,
        upstream: Upstream,
        msg: Message,
        decision: String,
        started: Instant,
        caller: Arc<Caller>,
        parser: sse::Parser,
        inner: transport::BodyStream,
        answered: bool,
        done: bool,
        /// Events of our own (e.g. `notifications/tools/list_changed`) merged into the stream.
        inject: Option<tokio::sync::mpsc::Receiver<Bytes>>,
        /// The request's id stays taken on its session until its answer passed.
        in_flight: Option<InFlightGuard>,
    }
    impl St {
        /// The stream ended on the upstream's side: nothing more to record when dropped.
        fn finish(&mut self) {
            self.done = true;
        }

        /// The upstream failed mid-stream: record it and, if our request is still unanswered,
        /// end the stream with a JSON-RPC error for it (never a silently dropped connection).
        fn fail(mut self, why: &str) -> Option<(Result<Bytes, std::io::Error>, St)> {
            self.gw
                .outcome(&self.decision, "upstream_error", self.started.elapsed());
            tracing::warn!(decision = %self.decision, "{why}");
            self.done = true;
            if self.answered || self.msg.method.is_empty() {
                return Some((Err(std::io::Error::other(why.to_string())), self));
            }
            self.answered = true;
            let body = jsonrpc::error_body(self.msg.id.as_ref(), code::UPSTREAM, why, None);
            let event = sse::Event {
                event: Some("message".into()),
                data: String::from_utf8_lossy(&body).into_owned(),
                ..Default::default()
            };
            Some((Ok(event.to_bytes()), self))
        }
    }
    impl Drop for St {
        /// The client went away before the answer: say so in the audit trail.
        fn drop(&mut self) {
            if !self.answered && !self.done && !self.msg.method.is_empty() {
                self.gw.outcome(
                    &self.decision,
                    outcome::CLIENT_DISCONNECTED,
                    self.started.elapsed(),
                );
            }
        }
    }
    let st = St {
        gw,
        upstream,
        msg,
        decision: decision.clone(),
        started,
        caller,
        parser: sse::Parser::new(MAX_SSE_EVENT),
        inner: body,
        answered: false,
        done: false,
        inject,
        in_flight,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let next = match st.inject.as_mut() {
                Some(rx) => tokio::select! {
                    n = st.inner.next() => n,
                    ours = rx.recv() => match ours {
                        Some(event) => return Some((Ok(event), st)),
                        None => {
                            st.inject = None;
                            continue;
                        }
                    },
                },
                None => st.inner.next().await,
            };
            match next {
                Some(Ok(chunk)) => {
                    let events = match st.parser.feed(&chunk) {
                        Ok(e) => e,
                        Err(e) => return st.fail(&format!("upstream stream: {e}")),
                    };
                    let mut out = Vec::new();
                    for ev in events {
                        if let Some(b) = on_event(
                            &mut st.answered,
                            &st.gw,
                            &st.upstream,
                            &st.msg,
                            &st.decision,
                            st.started,
                            &st.caller,
                            ev,
                        ) {
                            out.extend_from_slice(&b);
                        }
                    }
                    if st.answered {
                        st.in_flight = None;
                    }
                    if !out.is_empty() {
                        return Some((Ok(Bytes::from(out)), st));
                    }
                }
                Some(Err(e)) => return st.fail(&format!("upstream stream: {e}")),
                None => {
                    // A stream with no request pending (the GET stream) just ends; one that
                    // ends before answering our request gets a JSON-RPC error for it.
                    if !st.answered && !st.msg.method.is_empty() {
                        return st.fail("upstream ended the stream without an answer");
                    }
                    st.finish();
                    return None;
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = StatusCode::OK;
    merge_headers(&mut r, headers);
    if let Ok(v) = HeaderValue::from_str(&decision) {
        r.headers_mut().insert(DECISION_HEADER, v);
    }
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// One SSE event from the upstream: what to pass on (None drops it).
#[allow(clippy::too_many_arguments, reason = "one event's whole context")]
fn on_event(
    answered: &mut bool,
    gw: &Arc<Gateway>,
    upstream: &Upstream,
    msg: &Message,
    decision: &str,
    started: Instant,
    caller: &Arc<Caller>,
    ev: sse::Event,
) -> Option<Bytes> {
    if ev.data.trim().is_empty() {
        return Some(ev.to_bytes());
    }
    let Ok(value) = jsonrpc::parse_value(
        ev.data.as_bytes(),
        Limits {
            max_bytes: MAX_SSE_EVENT,
            max_depth: 128,
            max_nodes: jsonrpc::MAX_UPSTREAM_NODES,
        },
    ) else {
        // What we cannot parse we cannot filter or audit: it is dropped, never passed on.
        tracing::warn!(
            decision,
            "dropped an upstream SSE event that is not strict JSON"
        );
        return None;
    };
    let Ok(m) = jsonrpc::message(value) else {
        tracing::warn!(
            decision,
            "dropped an upstream SSE event that is not JSON-RPC"
        );
        return None;
    };
    match m.kind {
        // A stream delivers one response: the answer to its own request, once. The GET
        // stream has no request (its message has no method) and delivers none: a response
        // there (say, one replayed after `Last-Event-ID`) was never checked against this
        // caller's request, nor filtered for it.
        Kind::Response if !msg.method.is_empty() && !*answered && m.id == msg.id => {
            *answered = true;
            let mut v = m.value;
            filter_list(gw, &upstream.target.server, &msg.method, &mut v, caller);
            gw.outcome(decision, "forwarded", started.elapsed());
            let data = String::from_utf8(jsonrpc::canonical(&v)).unwrap_or_default();
            Some(sse::Event { data, ..ev }.to_bytes())
        }
        Kind::Request | Kind::Notification => server_message(gw, upstream, caller, m, ev),
        Kind::Response => {
            tracing::warn!(
                decision,
                id = ?m.id,
                "dropped an upstream response that answers no pending request of this stream"
            );
            None
        }
    }
}

/// A server→client message on a stream: audited; requests (sampling, elicitation, roots)
/// are authorized too, since sampling can carry data out.
fn server_message(
    gw: &Arc<Gateway>,
    upstream: &Upstream,
    caller: &Arc<Caller>,
    m: Message,
    ev: sse::Event,
) -> Option<Bytes> {
    let conn = Conn {
        peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        caller: Some(caller.clone()),
        unidentified: None,
    };
    let mut row = AuditRow::new("mcp", &conn);
    row.ip = caller.identity.ip.clone();
    row.server = upstream.target.server.clone();
    row.method = m.method.clone();
    row.action = m.method.clone();
    if m.kind == Kind::Notification {
        row.effect = Effect::Allow;
        row.outcome = "delivered".into();
        row.reason = "server notification".into();
        if let Err(e) = gw.submit(row) {
            tracing::warn!(error = %e, "audit row for a server notification was not stored");
        }
        return Some(ev.to_bytes());
    }
    let check = Check {
        action: m.method.clone(),
        name: None,
        takes_arguments: false,
    };
    let resource = mapping::resource(&upstream.target, &m.method, &check, None);
    let d = gw.decide(&caller.principal, resource, vec![m.method.clone()]);
    row = row.decided(&d, &m.method);
    let allowed = row.effect == Effect::Allow;
    row.outcome = if allowed {
        "delivered".into()
    } else {
        "denied".into()
    };
    if let Err(e) = gw.submit(row) {
        tracing::warn!(error = %e, "audit row for a server request was not stored");
        return None;
    }
    if allowed {
        if let Some(id) = m.id.as_ref() {
            gw.server_requests.expect(
                &caller.principal.id,
                &upstream.target.server,
                &jsonrpc::canonical_id(id),
            );
        }
        return Some(ev.to_bytes());
    }
    // Denied: the client never sees it; the server gets an error answer from us.
    let answer = jsonrpc::error_body(
        m.id.as_ref(),
        code::DENIED,
        &format!("denied by policy: {}", m.method),
        None,
    );
    transport::answer(gw, upstream, &caller.principal.id, answer);
    None
}

/// The upstream as seen from one client stream: its configured headers plus the client's
/// session and protocol version, for the answers the gateway itself sends on that stream
/// (a withheld server request's error).
fn with_session(upstream: &Upstream, client: &HeaderMap) -> Upstream {
    let mut up = upstream.clone();
    for name in [SESSION_HEADER, VERSION_HEADER] {
        if let Some(v) = header_str(client, name) {
            up.headers.push((name.to_string(), v.to_string()));
        }
    }
    up
}

/// `GET /mcp/<server>` (the handshake era's server stream) and `DELETE` (end a session).
pub async fn session_request(
    State(gw): State<Arc<Gateway>>,
    Path(server): Path<String>,
    Extension(conn): Extension<Conn>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let mut row = AuditRow::new("mcp", &conn);
    row.server = server.clone();
    row.method = format!("{method}");
    row.action = row.method.clone();
    let (caller, upstream) = match identified(&gw, &conn, &server, &mut row) {
        Ok(x) => x,
        Err(status_code_msg) => return refuse_with(&gw, row, status_code_msg).await,
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
    match gw.sessions.check(&sid, &caller.principal.id, &server) {
        SessionCheck::Own => {}
        SessionCheck::Unknown => {
            row.outcome = "unknown_session".into();
            return refuse(
                &gw,
                row,
                StatusCode::NOT_FOUND,
                None,
                code::INVALID_REQUEST,
                "unknown session: initialize a new one",
            )
            .await;
        }
        SessionCheck::Foreign => {
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
    }
    row.effect = Effect::Allow;
    row.reason = "the session's owner".into();
    row.outcome = "forwarded".into();
    let decision = row.id.clone();
    // I2: a GET opens a stream for server requests, a DELETE ends upstream state; neither
    // reaches the upstream before its row is committed.
    let commit = match gw.submit(row) {
        Ok(c) => c,
        Err(e) => return audit_unavailable(&decision, &dummy(), &e.0),
    };
    if let Err(e) = commit.await {
        return audit_unavailable(&decision, &dummy(), &e.0);
    }
    let reply = match transport::session(&gw, &upstream, &method, &headers).await {
        Ok(r) => r,
        Err(f) => return failed(&gw, &decision, &dummy(), started, f),
    };
    let status = reply.status;
    // Unbound only once the upstream ended the session: after a refused DELETE the session
    // lives on upstream, and must stay its owner's.
    if method == Method::DELETE && status.is_success() {
        gw.sessions.end(&sid);
    }
    let mut out_headers = HeaderMap::new();
    for name in ["content-type", SESSION_HEADER] {
        if let Some(v) = reply.headers.get(name) {
            out_headers.insert(name, v.clone());
        }
    }
    let is_sse = header_str(&out_headers, "content-type")
        .is_some_and(|c| c.starts_with("text/event-stream"));
    if is_sse && status.is_success() {
        // No request of ours is pending on this stream, so it delivers no response at all.
        // Policy changes that alter this caller's tools are announced on it.
        let inject = gw.watch_tool_list(&caller.principal, &upstream.target.server);
        let mut r = stream_sse(
            gw.clone(),
            with_session(&upstream, &headers),
            dummy(),
            decision,
            reply.body,
            out_headers,
            started,
            caller,
            Some(inject),
            None,
        );
        *r.status_mut() = status;
        return r;
    }
    let body = read_limited(reply.body, MAX_RESPONSE_BYTES)
        .await
        .unwrap_or_default();
    let mut r = respond(status, &decision, "application/json", body);
    merge_headers(&mut r, out_headers);
    r
}

fn dummy() -> Message {
    Message {
        kind: Kind::Notification,
        method: String::new(),
        id: Some(Value::String("\u{0}toolgate-none".into())),
        value: Value::Object(Map::new()),
    }
}
