//! The answer side of `/mcp/<server>` (the request path is [`super::request`]): the shapes of
//! answers and refusals, the upstream's answer checked and its lists filtered per caller, SSE
//! streams relayed event by event (server requests decided and audited on the way), and the
//! outcome recorded however a forwarded call ends.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value};

use super::jsonrpc::{self, Kind, Limits, Message, code};
use super::mapping::{self, Check};
use super::sse;
use super::transport::{self, Failure};
use crate::audit::record::outcome;
use crate::gateway::{AuditRow, Caller, Conn, Gateway, Upstream};
use crate::policy::model::Effect;

pub const DECISION_HEADER: &str = "toolgate-decision-id";
pub(crate) use super::transport::{
    MCP_METHOD, MCP_NAME, SESSION, SESSION_HEADER, VERSION, VERSION_HEADER, header_str,
};
/// The first protocol revision whose `Mcp-Method`/`Mcp-Name` headers must match the body.
pub(crate) const MODERN: &str = "2026-07-28";
/// The largest JSON response we inspect (lists, call results).
pub(crate) const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
const MAX_SSE_EVENT: usize = 8 * 1024 * 1024;

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

/// A request registered in [`crate::gateway::InFlight`]; ends its registration when dropped
/// (its answer delivered, its stream ended, or the caller gone).
pub(crate) struct InFlightGuard {
    gw: Arc<Gateway>,
    key: (String, String, String),
}

impl InFlightGuard {
    pub(crate) fn new(gw: Arc<Gateway>, key: (String, String, String)) -> InFlightGuard {
        InFlightGuard { gw, key }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.gw.in_flight.end(&self.key);
    }
}

pub(crate) fn merge_headers(r: &mut Response, h: HeaderMap) {
    for (k, v) in h.iter() {
        r.headers_mut().insert(k.clone(), v.clone());
    }
}

/// Reads a body up to `limit` bytes (an error beyond it).
pub(crate) async fn read_limited(
    mut body: transport::BodyStream,
    limit: usize,
) -> Result<Vec<u8>, String> {
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
pub(crate) struct NotForwarded;

/// Answers a transport failure; the decision row gets its outcome.
pub(crate) fn failed(
    gw: &Gateway,
    decision: &str,
    msg: &Message,
    started: Instant,
    f: Failure,
) -> Response {
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

pub(crate) fn audit_unavailable(decision: &str, id: Option<&Value>, why: &str) -> Response {
    let mut r = rpc_error(
        StatusCode::SERVICE_UNAVAILABLE,
        decision,
        id,
        code::AUDIT_UNAVAILABLE,
        &format!("audit unavailable, nothing was forwarded; retry later ({why})"),
        None,
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r.extensions_mut().insert(NotForwarded);
    r
}

pub(crate) fn upstream_failed(
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

/// Checks a JSON response (id, shape) and filters list results. Returns the bytes to send:
/// a list's filtered page re-serialized, any other answer the upstream's own bytes once they
/// passed the strict parse (nothing to change, so nothing is re-encoded, and nothing of it is
/// built but its envelope: [`jsonrpc::parse_head`]).
pub(crate) fn inspect_response(
    gw: &Gateway,
    server: &str,
    msg: &Message,
    body: Vec<u8>,
    caller: &Caller,
) -> Result<Vec<u8>, String> {
    let limits = Limits {
        max_bytes: MAX_RESPONSE_BYTES,
        max_depth: 128,
        max_nodes: jsonrpc::MAX_UPSTREAM_NODES,
    };
    let bad = |e: jsonrpc::ParseError| format!("upstream sent a bad response: {e}");
    if mapping::list_key(&msg.method).is_none() {
        answers(msg, &jsonrpc::parse_head(&body, limits).map_err(bad)?)?;
        return Ok(body);
    }
    let resp = jsonrpc::parse(&body, limits).map_err(bad)?;
    answers(msg, &resp)?;
    let mut value = resp.value;
    filter_list(gw, server, &msg.method, &mut value, caller);
    Ok(jsonrpc::canonical(&value))
}

/// Whether `resp` is a response to `msg`, the request it answers.
fn answers(msg: &Message, resp: &Message) -> Result<(), String> {
    if resp.kind != Kind::Response {
        return Err("upstream answered a request with something other than a response".into());
    }
    if resp.id != msg.id {
        return Err(format!(
            "upstream response id {:?} does not match request id {:?}",
            resp.id, msg.id
        ));
    }
    Ok(())
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
pub(crate) fn stream_sse(
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
    transport::answer(&gw.http, upstream, &caller.principal.id, answer);
    None
}

/// The upstream as seen from one client stream: its configured headers plus the client's
/// session and protocol version, for the answers the gateway itself sends on that stream
/// (a withheld server request's error).
pub(crate) fn with_session(upstream: &Upstream, client: &HeaderMap) -> Upstream {
    let mut up = upstream.clone();
    for name in [SESSION_HEADER, VERSION_HEADER] {
        if let Some(v) = header_str(client, name) {
            up.headers.push((name.to_string(), v.to_string()));
        }
    }
    up
}

/// A stand-in message for answers that have no request of their own (a GET stream).
pub(crate) fn dummy() -> Message {
    Message {
        kind: Kind::Notification,
        method: String::new(),
        id: Some(Value::String("\u{0}toolgate-none".into())),
        value: Value::Object(Map::new()),
    }
}
