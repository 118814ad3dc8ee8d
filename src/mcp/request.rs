//! The request path of `/mcp/<server>`, top to bottom. Read [`post`], then each step below it,
//! in the order they run:
//!
//! 1. [`identify`]: the verified caller and the named upstream (invariant I1: no caller,
//!    nothing forwarded).
//! 2. [`read`]: the body, bounded in type, encoding, size, time and the daemon-wide
//!    in-flight budget (I5).
//! 3. [`parse`]: one strict JSON-RPC message, its envelope, protocol revision and mirrored
//!    headers (I4); then [`session`]: the session is this caller's, one request per id on it.
//! 4. [`map`]: what policy is asked: a client's answer to a server request, a list (filtered
//!    item by item on the way back), or a check of one action on one resource.
//! 5. [`decide`]: policy's verdict; a deny becomes [`Refusal::Denied`].
//! 6. [`record`]: the decision row committed before anything leaves (I2).
//! 7. [`forward`]: the canonical message to the upstream.
//! 8. [`record_outcome`]: the answer checked, lists filtered, the outcome recorded.
//!
//! Steps 1–5 return what the next step needs, or a [`Refusal`]: one typed value that says the
//! HTTP status, the JSON-RPC code, the outcome recorded and the message. A refusal is audited
//! and answered by [`Refusal::answer`]; nothing is forwarded for it. From step 6 on, a caller
//! who hangs up still gets an outcome recorded ([`Hangup`]). `GET` and `DELETE`
//! ([`session_request`]) take the identify, record and forward steps of their own.
//!
//! Denials (DESIGN.md §4): a tool the caller cannot even see answers `-32602 Unknown tool`;
//! a visible tool denied for these arguments answers an `isError` result naming the decision
//! id and reason. Every response carries `Toolgate-Decision-Id`. The answer side (SSE
//! streams, list filtering, the shapes of errors) is [`super::proxy`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::jsonrpc::{self, Kind, Limits, Message, code};
use super::mapping::{self, Check};
use super::payload::{self, Payload, Slot};
use super::proxy::{
    self, InFlightGuard, MAX_RESPONSE_BYTES, MODERN, NotForwarded, SESSION_HEADER, header_str,
};
use super::transport::{self, Failure, Reply};
use crate::audit::record::outcome;
use crate::budget::Reservation;
use crate::gateway::{AuditRow, AuditUnavailable, Caller, Conn, Gateway, SessionCheck, Upstream};
use crate::policy::model::Effect;

/// The whole request body must arrive within this time (slow-body attacks; invariant I5).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The oldest protocol revision we speak (`MCP-Protocol-Version` values are `YYYY-MM-DD`).
const OLDEST: &str = "2024-11-05";

/// `POST /mcp/<server>`: steps 1–5 ([`admit`]), then 6–8 ([`deliver`]).
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
    match admit(&gw, &server, &conn, &headers, body, &mut row).await {
        Ok(call) => deliver(&gw, &headers, call, row, started).await,
        Err(refusal) => refusal.answer(&gw, row).await,
    }
}

/// A request that passed steps 1–5: allowed, and ready to record and forward.
struct Call {
    caller: Arc<Caller>,
    upstream: Arc<Upstream>,
    msg: Message,
    /// The arguments (or params), put back into the message once the row is built.
    payload: Option<Payload>,
    /// The request's id, taken on its session until its answer passed.
    in_flight: Option<InFlightGuard>,
    /// The request's share of the in-flight budget, held until it is answered.
    _held: Reservation,
    /// A client's answer to this server request (its canonical id): expected again when it
    /// could not be delivered.
    answering: Option<String>,
}

/// Steps 1–5, each refusing with a [`Refusal`]; `row` learns what each step found.
async fn admit(
    gw: &Arc<Gateway>,
    server: &str,
    conn: &Conn,
    headers: &HeaderMap,
    body: Body,
    row: &mut AuditRow,
) -> Result<Call, Refusal> {
    let (caller, upstream) = identify(gw, conn, server, row)?;
    let (bytes, held) = read(gw, &upstream, headers, body).await?;
    let (mut msg, payload, held) = parse(&bytes, held, &upstream, headers, row)?;
    drop(bytes);
    let in_flight = session(gw, &caller, server, headers, &msg)?;
    let route = map(gw, &caller, &upstream, &msg, &payload, row)?;
    let answering = match &route {
        Route::Answer(id) => Some(id.clone()),
        _ => None,
    };
    let payload = decide(
        gw, &caller, &upstream, headers, &mut msg, payload, route, row,
    )?;
    Ok(Call {
        caller,
        upstream,
        msg,
        payload,
        in_flight,
        _held: held,
        answering,
    })
}

/// Steps 6–8: record, forward, record the outcome. Every way this ends records the call's
/// outcome, a caller that hangs up included.
async fn deliver(
    gw: &Arc<Gateway>,
    headers: &HeaderMap,
    call: Call,
    row: AuditRow,
    started: Instant,
) -> Response {
    let Call {
        caller,
        upstream,
        mut msg,
        payload,
        in_flight,
        _held,
        answering,
    } = call;
    let decision = row.id.clone();
    let mut hangup = Hangup {
        gw: gw.clone(),
        decision: decision.clone(),
        started,
        sent: false.into(),
        armed: true,
    };
    let r = match record(gw, row, &mut msg, payload).await {
        Err(e) => proxy::audit_unavailable(&decision, msg.id.as_ref(), &e.0),
        Ok(()) => {
            hangup.sent();
            let reply = forward(gw, &upstream, headers, &msg, &caller).await;
            // Sent: only the method and id are needed from here on (the answer may take long).
            msg.value = Value::Null;
            match reply {
                Err(f) => proxy::failed(gw, &decision, &msg, started, f),
                Ok(reply) => {
                    let at = Answered {
                        gw,
                        upstream: &upstream,
                        headers,
                        msg: &msg,
                        decision: &decision,
                        started,
                        caller: &caller,
                    };
                    record_outcome(at, reply, in_flight).await
                }
            }
        }
    };
    // Finished (not dropped at an await): the outcome is recorded.
    hangup.armed = false;
    if let Some(id) = answering {
        if r.extensions().get::<NotForwarded>().is_some() {
            // Not delivered (the audit store could not take its row): the request still waits
            // for this answer, and the client may retry it.
            gw.server_requests
                .expect(&caller.principal.id, &upstream.target.server, &id);
        }
    }
    r
}

/// Why a request is not forwarded. Steps 1–5 return one; [`Refusal::answer`] audits it and
/// answers the caller.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Refused before any forward; audited as a deny with `outcome`.
    Refused {
        status: StatusCode,
        code: i64,
        outcome: &'static str,
        message: String,
        /// The request's id, once it is known (echoed in the error).
        id: Option<Value>,
    },
    /// The daemon-wide in-flight budget is full: 503 with `Retry-After`, audited `overloaded`.
    Overloaded { id: Option<Value> },
    /// The audit queue cannot take the row: 503, nothing recorded, nothing forwarded.
    AuditUnavailable { id: Option<Value>, why: String },
    /// Denied by policy: recorded as decided, answered as DESIGN.md §4 says.
    Denied(Denial),
}

impl Refusal {
    fn new(status: StatusCode, code: i64, outcome: &'static str, message: String) -> Refusal {
        Refusal::Refused {
            status,
            code,
            outcome,
            message,
            id: None,
        }
    }

    /// A malformed request (outcome `invalid`).
    fn invalid(status: StatusCode, code: i64, message: impl Into<String>) -> Refusal {
        Refusal::new(status, code, "invalid", message.into())
    }

    /// The same refusal, answered with the request's id.
    fn to(mut self, msg: &Message) -> Refusal {
        if let Refusal::Refused { id, .. } | Refusal::Overloaded { id } = &mut self {
            *id = msg.id.clone();
        }
        self
    }

    /// Audits the refusal (a refusal never waits for its row: nothing runs) and answers it.
    pub(crate) async fn answer(self, gw: &Gateway, mut row: AuditRow) -> Response {
        match self {
            Refusal::Refused {
                status,
                code,
                outcome,
                message,
                id,
            } => {
                row.outcome = outcome.into();
                proxy::refuse(gw, row, status, id.as_ref(), code, &message).await
            }
            Refusal::Overloaded { id } => proxy::overloaded(gw, row, id.as_ref()).await,
            Refusal::AuditUnavailable { id, why } => {
                proxy::audit_unavailable(&row.id, id.as_ref(), &why)
            }
            Refusal::Denied(d) => d.answer(gw, row),
        }
    }
}

/// A call policy denied, with what its answer says.
#[derive(Debug)]
pub(crate) struct Denial {
    method: String,
    kind: Kind,
    id: Option<Value>,
    /// The tool (prompt, resource) named.
    name: String,
    /// Whether the caller may see it at all (only then does the answer say it was denied).
    visible: bool,
    /// The policy's own words for the model (rules' `output`).
    said: Vec<String>,
    /// The caller speaks the stateless era (its results carry `resultType`).
    modern: bool,
}

impl Denial {
    fn answer(self, gw: &Gateway, mut row: AuditRow) -> Response {
        row.outcome = "denied".into();
        let decision = row.id.clone();
        let reason = if self.said.is_empty() {
            row.reason.clone()
        } else {
            format!("{} ({})", self.said.join("; "), row.reason)
        };
        if let Err(e) = gw.submit(row) {
            tracing::warn!(error = %e, "audit row for a denial was not stored");
        }
        if self.kind == Kind::Notification {
            return proxy::respond(
                StatusCode::BAD_REQUEST,
                &decision,
                "application/json",
                Vec::new(),
            );
        }
        let id = self.id.as_ref();
        match (self.method.as_str(), self.visible) {
            ("tools/call", true) => {
                let text = format!("Denied by policy (decision {decision}): {reason}");
                let mut result =
                    json!({"content": [{"type": "text", "text": text}], "isError": true});
                if self.modern {
                    result["resultType"] = json!("complete");
                }
                proxy::respond(
                    StatusCode::OK,
                    &decision,
                    "application/json",
                    jsonrpc::result_body(id, result),
                )
            }
            // A name-level deny keeps the tool (prompt, resource) hidden, as in the filtered list.
            ("tools/call" | "prompts/get" | "resources/read", _) => {
                let what = match self.method.as_str() {
                    "tools/call" => "tool",
                    "prompts/get" => "prompt",
                    _ => "resource",
                };
                proxy::rpc_error(
                    StatusCode::OK,
                    &decision,
                    id,
                    code::INVALID_PARAMS,
                    &format!("Unknown {what}: {}", self.name),
                    None,
                )
            }
            _ => proxy::rpc_error(
                StatusCode::OK,
                &decision,
                id,
                code::DENIED,
                &format!("denied by policy: {}", self.method),
                Some(json!({"decisionId": decision, "reason": reason})),
            ),
        }
    }
}

/// Step 1. The caller and the upstream of a request, or why it is refused (identity first: I1).
fn identify(
    gw: &Gateway,
    conn: &Conn,
    server: &str,
    row: &mut AuditRow,
) -> Result<(Arc<Caller>, Arc<Upstream>), Refusal> {
    let Some(caller) = conn.caller.clone() else {
        row.kind = "identity";
        let why = conn
            .unidentified
            .as_deref()
            .unwrap_or("no verified tailnet identity");
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            code::UNIDENTIFIED,
            "unidentified",
            format!("forbidden: {why}"),
        ));
    };
    let Some(upstream) = gw.upstreams.get(server).cloned() else {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            code::INVALID_REQUEST,
            "refused",
            format!("no MCP server named {server:?}"),
        ));
    };
    Ok((caller, upstream))
}

/// Step 2. The request body: JSON, identity-encoded, within the server's size limit and the
/// daemon-wide budget (held before a byte is read), arriving within [`BODY_TIMEOUT`].
async fn read(
    gw: &Gateway,
    upstream: &Upstream,
    headers: &HeaderMap,
    body: Body,
) -> Result<(axum::body::Bytes, Reservation), Refusal> {
    let ctype = header_str(headers, header::CONTENT_TYPE).unwrap_or("");
    if !ctype.to_ascii_lowercase().starts_with("application/json") {
        return Err(Refusal::invalid(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code::INVALID_REQUEST,
            "Content-Type must be application/json",
        ));
    }
    let accept = header_str(headers, header::ACCEPT)
        .unwrap_or("*/*")
        .to_ascii_lowercase();
    if !(accept.contains("application/json")
        || accept.contains("text/event-stream")
        || accept.contains("*/*"))
    {
        return Err(Refusal::invalid(
            StatusCode::NOT_ACCEPTABLE,
            code::INVALID_REQUEST,
            "Accept must allow application/json or text/event-stream",
        ));
    }
    // Identity encoding only: a compressed body would be one message to us and maybe another
    // to an upstream that decodes it (security.md RPC-8).
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(Refusal::invalid(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code::INVALID_REQUEST,
            "Content-Encoding must be identity",
        ));
    }
    let max = upstream.max_body;
    // A declared length over the limit is refused before anything is read (HTTP-2).
    let declared = header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > max as u64) {
        return Err(Refusal::invalid(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::INVALID_REQUEST,
            format!("request body of {len} bytes refused; the limit is {max}"),
        ));
    }
    // The daemon-wide budget (invariant I5): the declared length, or the most this server
    // takes, is held before a byte is read.
    let want = declared
        .and_then(|l| usize::try_from(l).ok())
        .unwrap_or(max);
    let Some(held) = gw.budget.reserve(want) else {
        return Err(Refusal::Overloaded { id: None });
    };
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => Ok((bytes, held)),
        Err(_) => Err(Refusal::invalid(
            StatusCode::REQUEST_TIMEOUT,
            code::INVALID_REQUEST,
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )),
        Ok(Err(e)) => Err(Refusal::invalid(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::INVALID_REQUEST,
            format!("request body refused: {e}"),
        )),
    }
}

/// Step 3. One strict JSON-RPC message (the arguments detached, shared by the row and lent to
/// the check), its envelope, protocol revision and the headers that mirror it.
fn parse(
    bytes: &[u8],
    mut held: Reservation,
    upstream: &Upstream,
    headers: &HeaderMap,
    row: &mut AuditRow,
) -> Result<(Message, Option<Payload>, Reservation), Refusal> {
    let limits = Limits {
        max_bytes: upstream.max_body,
        max_nodes: upstream.max_nodes,
        ..Limits::default()
    };
    let (mut msg, size) = jsonrpc::parse_sized(bytes, limits).map_err(|e| {
        let status = match e {
            jsonrpc::ParseError::TooLarge { .. } | jsonrpc::ParseError::TooManyValues { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Refusal::invalid(status, e.code(), e.to_string())
    })?;
    row.method = msg.method.clone();
    // Held from here: the parsed value, and the canonical copy that is forwarded.
    let len = bytes.len();
    if !held.resize(size.parsed_bytes(len).saturating_add(len)) {
        return Err(Refusal::Overloaded { id: None }.to(&msg));
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
        return Err(Refusal::invalid(StatusCode::BAD_REQUEST, e.code(), e.to_string()).to(&msg));
    }
    // An unknown or malformed protocol revision is refused (security.md RPC-10): we could not
    // know which header rules apply to it.
    if let Some(v) = headers.get(proxy::VERSION) {
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
            return Err(Refusal::invalid(
                StatusCode::BAD_REQUEST,
                code::UNSUPPORTED_VERSION,
                format!("unsupported MCP-Protocol-Version {v:?}"),
            )
            .to(&msg));
        }
    }
    // A request method without an id would run upstream unanswered and unchecked by the
    // caller: only `notifications/*` may come without an id (security.md RPC-5).
    if msg.kind == Kind::Notification && !msg.method.starts_with("notifications/") {
        return Err(Refusal::invalid(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            format!("{} is a request: it needs an \"id\"", msg.method),
        ));
    }
    // The stateless era mirrors the method and name in headers: they must match the body.
    if let Err(m) = check_mirrored_headers(headers, &msg) {
        return Err(Refusal::invalid(StatusCode::BAD_REQUEST, code::HEADER_MISMATCH, m).to(&msg));
    }
    Ok((msg, payload, held))
}

fn check_mirrored_headers(h: &HeaderMap, msg: &Message) -> Result<(), String> {
    let version = header_str(h, proxy::VERSION).unwrap_or("");
    let modern = version >= MODERN;
    match header_str(h, proxy::MCP_METHOD) {
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
    match (header_str(h, proxy::MCP_NAME), body_name) {
        (Some(hn), Some(bn)) if hn != bn => {
            Err(format!("Mcp-Name {hn:?} does not match the body's {bn:?}"))
        }
        (Some(hn), None) => Err(format!("Mcp-Name {hn:?} given, but the body names nothing")),
        (None, Some(_)) if modern => Err("Mcp-Name header is required".into()),
        _ => Ok(()),
    }
}

/// Step 3, continued. A session belongs to the identity that opened it, and is initialized
/// once: a second `initialize` would renegotiate capabilities (say, claim sampling)
/// mid-session. The TypeScript SDK's server refuses it the same way ("Server already
/// initialized"). A session this gateway never saw opened (made up, ended, or from before a
/// restart) is unknown: 404, as the MCP transport says a server answers for one, so the client
/// opens a new session; forwarding it would let any identity use a session no one bound.
///
/// One request per id is in flight on a session (the upstream matches answers by id alone):
/// the returned guard holds the id until the answer passed.
fn session(
    gw: &Arc<Gateway>,
    caller: &Caller,
    server: &str,
    headers: &HeaderMap,
    msg: &Message,
) -> Result<Option<InFlightGuard>, Refusal> {
    let Some(sid) = header_str(headers, proxy::SESSION) else {
        return Ok(None);
    };
    let refusal = match gw.sessions.check(sid, &caller.principal.id, server) {
        SessionCheck::Unknown => Some(Refusal::new(
            StatusCode::NOT_FOUND,
            code::INVALID_REQUEST,
            "unknown_session",
            "unknown session: initialize a new one (send initialize without Mcp-Session-Id)".into(),
        )),
        SessionCheck::Foreign => Some(Refusal::new(
            StatusCode::FORBIDDEN,
            code::UNIDENTIFIED,
            "session_refused",
            "this session belongs to another identity".into(),
        )),
        SessionCheck::Own if msg.method == "initialize" => Some(Refusal::invalid(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            "Invalid Request: this session is already initialized (send initialize without Mcp-Session-Id to open a new one)",
        )),
        SessionCheck::Own => None,
    };
    if let Some(r) = refusal {
        return Err(r.to(msg));
    }
    let (Kind::Request, Some(id)) = (msg.kind, msg.id.as_ref()) else {
        return Ok(None);
    };
    let key = (
        server.to_string(),
        sid.to_string(),
        jsonrpc::canonical_id(id),
    );
    if !gw.in_flight.begin(&key) {
        let why = format!(
            "Invalid Request: request id {} is already in flight on this session; use another id",
            key.2
        );
        return Err(Refusal::invalid(StatusCode::BAD_REQUEST, code::INVALID_REQUEST, why).to(msg));
    }
    Ok(Some(InFlightGuard::new(gw.clone(), key)))
}

/// What policy is asked about a message.
enum Route {
    /// A client's answer to a server request (sampling, elicitation, roots): its canonical id.
    Answer(String),
    /// A list: forwarded for every identified caller and filtered item by item.
    List,
    /// One action on one resource.
    Check(Check),
}

/// Step 4. What policy is asked about this message, or why it is refused outright.
fn map(
    gw: &Gateway,
    caller: &Caller,
    upstream: &Upstream,
    msg: &Message,
    payload: &Option<Payload>,
    row: &mut AuditRow,
) -> Result<Route, Refusal> {
    if msg.kind == Kind::Response {
        // Forwarded only when that request was delivered to this caller and is still
        // unanswered.
        let id = msg
            .id
            .as_ref()
            .map(jsonrpc::canonical_id)
            .unwrap_or_default();
        row.action = "response".into();
        if !gw
            .server_requests
            .answer(&caller.principal.id, &upstream.target.server, &id)
        {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                "refused",
                format!("no request {id} from this server is waiting for your answer"),
            )
            .to(msg));
        }
        return Ok(Route::Answer(id));
    }
    if upstream.deny_unknown && !mapping::is_known_method(&msg.method) {
        return Err(Refusal::new(
            StatusCode::OK,
            code::METHOD_NOT_FOUND,
            "refused",
            format!(
                "Method not found: {} (unknown methods are refused on this server)",
                msg.method
            ),
        )
        .to(msg));
    }
    let sent_arguments = payload
        .as_ref()
        .filter(|p| p.slot() == Slot::Arguments)
        .map(Payload::value);
    let check = mapping::check_for(msg, sent_arguments)
        .map_err(|e| Refusal::invalid(StatusCode::OK, code::INVALID_PARAMS, e).to(msg))?;
    row.action = check.action.clone();
    row.tool = check.name.clone().unwrap_or_default();
    if row.arguments.is_none() && check.takes_arguments {
        // `{}` for a call that sent none (otherwise the row already holds what was sent).
        row.arguments = Some(Arc::new(Value::Object(Map::new())));
    }
    if mapping::list_key(&msg.method).is_some() {
        return Ok(Route::List);
    }
    Ok(Route::Check(check))
}

/// Step 5. Policy's verdict on the route; the payload comes back for the forward.
#[allow(clippy::too_many_arguments, reason = "one request's whole context")]
fn decide(
    gw: &Gateway,
    caller: &Caller,
    upstream: &Upstream,
    headers: &HeaderMap,
    msg: &mut Message,
    mut payload: Option<Payload>,
    route: Route,
    row: &mut AuditRow,
) -> Result<Option<Payload>, Refusal> {
    let check = match route {
        Route::Answer(_) => {
            row.effect = Effect::Allow;
            row.reason = "a client's answer to a server request".into();
            return Ok(payload);
        }
        Route::List => {
            row.effect = Effect::Allow;
            row.rule = "list_filter".into();
            row.reason = "lists are filtered per caller".into();
            return Ok(payload);
        }
        Route::Check(c) => c,
    };
    if gw.audit.saturated() {
        // Overload: the row could not be queued, so neither an allow nor a deny could be
        // recorded. Answer at once (security.md §3.5: 503 within 50 ms); nothing is forwarded.
        gw.metrics
            .audit_refusals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(Refusal::AuditUnavailable {
            id: msg.id.clone(),
            why: "the audit queue is full".into(),
        });
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
    let (d, mut resource) = gw.decide_caller(caller, resource, vec![check.action.clone()]);
    row.set_decision(&d, &check.action);
    // A denied tool call also asks whether the tool is visible at all: a hidden tool stays
    // hidden. An allowed call runs whatever the list says, so it costs one evaluation, not two.
    let list_action = match (row.effect, msg.method.as_str()) {
        (Effect::Allow, _) => None,
        (_, "tools/call") => check.name.as_ref().map(|n| format!("tools/list::{n}")),
        (_, "prompts/get") => check.name.as_ref().map(|n| format!("prompts/list::{n}")),
        (_, "resources/read") => check.name.as_ref().map(|n| format!("resources/list::{n}")),
        _ => None,
    };
    let visible = list_action.is_some_and(|a| {
        let (v, back) = gw.decide_caller(caller, std::mem::take(&mut resource), vec![a.clone()]);
        resource = back;
        v.effect(&a) == Effect::Allow
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
        return Ok(payload);
    }
    // The policy's own words for the model (a rule's `output`), then the engine's reason.
    let said = d
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
    Err(Refusal::Denied(Denial {
        method: std::mem::take(&mut msg.method),
        kind: msg.kind,
        id: msg.id.take(),
        name: check.name.unwrap_or_default(),
        visible,
        said,
        modern: header_str(headers, proxy::VERSION).is_some_and(|v| v >= MODERN),
    }))
}

/// Step 6. Commits the decision row (INVARIANT I2: nothing reaches the upstream before its
/// decision row is committed: requests of every method, notifications, and answers to server
/// requests alike; any of them can act upstream). The row was built (digested, redacted) at
/// submit and let go of the arguments: they go back into the message without a copy.
async fn record(
    gw: &Gateway,
    mut row: AuditRow,
    msg: &mut Message,
    payload: Option<Payload>,
) -> Result<(), AuditUnavailable> {
    row.outcome = outcome::PENDING.into();
    let commit = gw.submit(row)?;
    if let Some(p) = payload {
        p.attach(msg);
    }
    commit.await
}

/// Step 7. Sends the canonical message upstream.
async fn forward(
    gw: &Gateway,
    upstream: &Upstream,
    headers: &HeaderMap,
    msg: &Message,
    caller: &Caller,
) -> Result<Reply, Failure> {
    transport::post(&gw.http, upstream, headers, msg, &caller.principal.id).await
}

/// What step 8 knows about the call it answers.
struct Answered<'a> {
    gw: &'a Arc<Gateway>,
    upstream: &'a Upstream,
    headers: &'a HeaderMap,
    /// Method and id only: the value was dropped once sent.
    msg: &'a Message,
    decision: &'a str,
    started: Instant,
    caller: &'a Arc<Caller>,
}

/// Step 8. Checks the upstream's answer, binds a new session to its caller, filters lists
/// (streams are filtered event by event), answers, and records the outcome.
async fn record_outcome(
    at: Answered<'_>,
    reply: Reply,
    in_flight: Option<InFlightGuard>,
) -> Response {
    let Answered {
        gw,
        upstream,
        headers,
        msg,
        decision,
        started,
        caller,
    } = at;
    let status = reply.status;
    let out_headers = reply.headers;
    if msg.method == "initialize" && status.is_success() {
        if let Some(sid) = header_str(&out_headers, proxy::SESSION) {
            gw.sessions
                .bind(sid, &caller.principal.id, &upstream.target.server);
        }
    }
    if status.is_server_error() {
        let body = proxy::read_limited(reply.body, 200)
            .await
            .unwrap_or_default();
        let snippet = String::from_utf8_lossy(&body).to_string();
        let why = format!("upstream answered {status}: {snippet}");
        return proxy::upstream_failed(gw, decision, msg, started, &why);
    }
    if msg.kind != Kind::Request {
        // Notifications and responses: 202 with no body is the expected answer.
        gw.outcome(decision, outcome::FORWARDED, started.elapsed());
        let mut r = proxy::respond(
            StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::ACCEPTED),
            decision,
            "application/json",
            Vec::new(),
        );
        proxy::merge_headers(&mut r, out_headers);
        return r;
    }
    let is_sse = header_str(&out_headers, header::CONTENT_TYPE)
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("text/event-stream"));
    if is_sse {
        return proxy::stream_sse(
            gw.clone(),
            proxy::with_session(upstream, headers),
            msg.clone(),
            decision.to_string(),
            reply.body,
            out_headers,
            started,
            caller.clone(),
            None,
            in_flight,
        );
    }
    let body = match proxy::read_limited(reply.body, MAX_RESPONSE_BYTES).await {
        Ok(b) => b,
        Err(e) => return proxy::upstream_failed(gw, decision, msg, started, &e),
    };
    let body = match proxy::inspect_response(gw, &upstream.target.server, msg, body, caller) {
        Ok(b) => b,
        Err(e) => return proxy::upstream_failed(gw, decision, msg, started, &e),
    };
    gw.outcome(decision, outcome::FORWARDED, started.elapsed());
    let mut r = proxy::respond(
        StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::OK),
        decision,
        "application/json",
        body,
    );
    proxy::merge_headers(&mut r, out_headers);
    r
}

/// Records how a forwarded call ended when the caller hangs up first. hyper drops a request's
/// future when its connection closes; without this the call's row would stay `pending`.
pub(crate) struct Hangup {
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

/// `GET /mcp/<server>` (the handshake era's server stream) and `DELETE` (end a session):
/// identify, check the session is the caller's, record, forward.
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
    let (caller, upstream) = match identify(&gw, &conn, &server, &mut row) {
        Ok(x) => x,
        Err(refusal) => return refusal.answer(&gw, row).await,
    };
    let Some(sid) = header_str(&headers, SESSION_HEADER).map(str::to_string) else {
        let r = Refusal::new(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            "refused",
            "Mcp-Session-Id is required".into(),
        );
        return r.answer(&gw, row).await;
    };
    let refusal = match gw.sessions.check(&sid, &caller.principal.id, &server) {
        SessionCheck::Own => None,
        SessionCheck::Unknown => Some(Refusal::new(
            StatusCode::NOT_FOUND,
            code::INVALID_REQUEST,
            "unknown_session",
            "unknown session: initialize a new one".into(),
        )),
        SessionCheck::Foreign => Some(Refusal::new(
            StatusCode::FORBIDDEN,
            code::UNIDENTIFIED,
            "session_refused",
            "this session belongs to another identity".into(),
        )),
    };
    if let Some(r) = refusal {
        return r.answer(&gw, row).await;
    }
    row.effect = Effect::Allow;
    row.reason = "the session's owner".into();
    row.outcome = outcome::FORWARDED.into();
    let decision = row.id.clone();
    let none = proxy::dummy();
    // I2: a GET opens a stream for server requests, a DELETE ends upstream state; neither
    // reaches the upstream before its row is committed.
    let commit = match gw.submit(row) {
        Ok(c) => c,
        Err(e) => return proxy::audit_unavailable(&decision, none.id.as_ref(), &e.0),
    };
    if let Err(e) = commit.await {
        return proxy::audit_unavailable(&decision, none.id.as_ref(), &e.0);
    }
    let reply = match transport::session(&gw.http, &upstream, &method, &headers).await {
        Ok(r) => r,
        Err(f) => return proxy::failed(&gw, &decision, &none, started, f),
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
    let is_sse = header_str(&out_headers, header::CONTENT_TYPE)
        .is_some_and(|c| c.starts_with("text/event-stream"));
    if is_sse && status.is_success() {
        // No request of ours is pending on this stream, so it delivers no response at all.
        // Policy changes that alter this caller's tools are announced on it.
        let inject = gw.watch_tool_list(&caller.principal, &upstream.target.server);
        let mut r = proxy::stream_sse(
            gw.clone(),
            proxy::with_session(&upstream, &headers),
            none,
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
    let body = proxy::read_limited(reply.body, MAX_RESPONSE_BYTES)
        .await
        .unwrap_or_default();
    let mut r = proxy::respond(status, &decision, "application/json", body);
    proxy::merge_headers(&mut r, out_headers);
    r
}
