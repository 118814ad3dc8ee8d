//! The upstream behind the proxy, one shape for both kinds: Streamable HTTP (`url`) or a
//! stdio child (`command`). The proxy decides and records; this only carries an authorized
//! message there and the answer back as a status, headers and a body stream (JSON or SSE).
//!
//! A stdio server answers like a Streamable HTTP server of the handshake era would: a new
//! `Mcp-Session-Id` (random, ours) on `initialize`, 404 for a session whose child is gone,
//! a GET stream of the server's own messages, DELETE to end. Callers without a session (the
//! stateless 2026-07-28 era) share one child per identity.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::Value;

use super::jsonrpc::{Kind, Message};
use super::mapping::Target;
use crate::config::Server;
use crate::stdio::{self, Answer, CallError, OpenError};

pub const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";

/// Request headers passed to an HTTP upstream (everything else, identity headers included,
/// is dropped).
const FORWARDED_HEADERS: [&str; 6] = [
    "accept",
    VERSION_HEADER,
    SESSION_HEADER,
    "mcp-method",
    "mcp-name",
    "last-event-id",
];

/// How toolgate reaches one upstream.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Streamable HTTP at this URL (fixed by config; redirects are not followed).
    Http(reqwest::Url),
    /// A stdio server: its children.
    Stdio(Arc<stdio::Server>),
}

/// An upstream MCP server, as configured.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub target: Target,
    /// Streamable HTTP (the URL parsed once at start) or a stdio server's children.
    pub transport: Transport,
    pub timeout: Duration,
    /// Resolved extra headers (values may come from the environment; never logged).
    pub headers: Vec<(String, String)>,
    /// Refuse methods the gateway does not know instead of asking policy.
    pub deny_unknown: bool,
    /// Bound on a server→client stream.
    pub max_stream: Duration,
    /// Bound on a client message's bytes.
    pub max_body: usize,
    /// Bound on a client message's JSON values.
    pub max_nodes: usize,
}

impl Upstream {
    /// The upstream for a checked `servers.<name>` entry; a stdio server's children are
    /// started in `stdio` (needed only when the entry has a `command`).
    pub fn from_config(
        name: &str,
        c: &Server,
        stdio: Option<(&crate::stdio::Pool, &crate::config::StdioConfig)>,
    ) -> Result<Upstream, String> {
        let transport = match &c.transport {
            crate::config::Transport::Http(url) => Transport::Http(url.clone()),
            crate::config::Transport::Stdio(cmd) => {
                let (pool, all) = stdio.ok_or_else(|| {
                    format!("servers.{name}: a stdio server needs the stdio supervisor")
                })?;
                Transport::Stdio(pool.server(stdio_settings(name, c, cmd, all)))
            }
        };
        Ok(Upstream {
            target: Target {
                server: name.to_string(),
                resource_kind: c.resource_kind.clone(),
                scope: c.scope.clone(),
            },
            transport,
            timeout: c.timeout,
            headers: c.headers.clone(),
            deny_unknown: c.unknown_methods == crate::config::UnknownMethods::Deny,
            max_stream: c.max_stream,
            max_body: c.max_body,
            max_nodes: c.max_nodes,
        })
    }
}

/// A stdio server's settings from its config entry and the `stdio:` section.
fn stdio_settings(
    name: &str,
    c: &Server,
    cmd: &crate::config::StdioCommand,
    all: &crate::config::StdioConfig,
) -> crate::stdio::Settings {
    crate::stdio::Settings {
        name: name.to_string(),
        command: cmd.command.clone(),
        env: crate::stdio::Settings::child_env(std::env::vars(), &cmd.env),
        cwd: cmd.cwd.clone(),
        max_children: cmd.max_children,
        limits: crate::stdio::ChildLimits {
            max_line: all.max_line,
            call_timeout: c.timeout,
            grace: all.grace,
            idle_timeout: cmd.idle_timeout,
        },
    }
}

/// A body as it arrives (errors carry no URL: upstream URLs may hold secrets).
pub type BodyStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// What an upstream answered.
pub struct Reply {
    pub status: StatusCode,
    /// `content-type`, `mcp-session-id`, `mcp-protocol-version` when present.
    pub headers: HeaderMap,
    pub body: BodyStream,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish()
    }
}

/// Why nothing (or no answer) came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The upstream failed, timed out or went away: 502 and an `upstream_error` outcome.
    Upstream(String),
    /// A bound on stdio children is reached: 503, retry later.
    Full(String),
    /// The session is not (or no longer) there: 404, the client opens a new one.
    NoSession(String),
    /// The message cannot be sent as asked (say, an id already in flight): 400.
    Invalid(String),
}

impl Reply {
    fn empty(status: StatusCode) -> Reply {
        Reply {
            status,
            headers: HeaderMap::new(),
            body: futures_util::stream::empty().boxed(),
        }
    }

    fn json(bytes: Vec<u8>) -> Reply {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        Reply {
            status: StatusCode::OK,
            headers,
            body: futures_util::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed(),
        }
    }

    fn sse(body: BodyStream) -> Reply {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        Reply {
            status: StatusCode::OK,
            headers,
            body,
        }
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// POSTs one authorized message (`msg`, sent as its canonical bytes) for `principal`.
pub async fn post(
    http: &reqwest::Client,
    upstream: &Upstream,
    client: &HeaderMap,
    msg: &Message,
    principal: &str,
) -> Result<Reply, Failure> {
    match &upstream.transport {
        Transport::Http(url) => {
            let req = http_request(http, upstream, url, reqwest::Method::POST, client)
                .header("content-type", "application/json")
                .body(msg.canonical());
            http_send(req).await
        }
        Transport::Stdio(server) => stdio_post(server, client, msg, principal).await,
    }
}

/// GET (the session's stream of server messages) or DELETE (end the session).
pub async fn session(
    http: &reqwest::Client,
    upstream: &Upstream,
    method: &Method,
    client: &HeaderMap,
) -> Result<Reply, Failure> {
    match &upstream.transport {
        Transport::Http(url) => {
            let m = if method == Method::DELETE {
                reqwest::Method::DELETE
            } else {
                reqwest::Method::GET
            };
            let req = http_request(http, upstream, url, m, client).timeout(upstream.max_stream);
            http_send(req).await
        }
        Transport::Stdio(server) => {
            let Some(sid) = header_str(client, SESSION_HEADER) else {
                return Err(Failure::NoSession("Mcp-Session-Id is required".into()));
            };
            if method == Method::DELETE {
                return if server.end_session(sid) {
                    Ok(Reply::empty(StatusCode::OK))
                } else {
                    Err(Failure::NoSession("unknown session".into()))
                };
            }
            let child = server
                .session(sid)
                .ok_or_else(|| Failure::NoSession("the session has ended".into()))?;
            let (rx, busy) = child
                .listen()
                .map_err(|e| Failure::Upstream(e.to_string()))?;
            let deadline = tokio::time::sleep(upstream.max_stream);
            let events = tokio_stream_of(rx)
                .take_until(deadline)
                .map(move |ev| {
                    // The stream counts as activity (the child is not idle) while it is open.
                    let _keep = &busy;
                    ev.map_err(std::io::Error::other)
                })
                .boxed();
            Ok(Reply::sse(events))
        }
    }
}

/// Sends the gateway's own answer to a server request (one policy withheld) upstream, on the
/// session the request came from. Fire and forget: the server may have moved on.
pub fn answer(http: &reqwest::Client, upstream: &Upstream, principal: &str, body: Vec<u8>) {
    match &upstream.transport {
        Transport::Http(url) => {
            let mut req = http
                .post(url.clone())
                .timeout(upstream.timeout)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream");
            // The configured headers (upstream auth) and, on a session, the caller's session id.
            for (k, v) in &upstream.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            tokio::spawn(async move {
                let _ = req.body(body).send().await;
            });
        }
        Transport::Stdio(server) => {
            let sid = upstream
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(SESSION_HEADER))
                .map(|(_, v)| v.clone());
            let server = server.clone();
            let principal = principal.to_string();
            tokio::spawn(async move {
                let child = match sid {
                    Some(sid) => server.session(&sid),
                    None => server.for_identity(&principal).await.ok(),
                };
                if let Some(c) = child {
                    let _ = c.send(&body).await;
                }
            });
        }
    }
}

fn http_request(
    http: &reqwest::Client,
    upstream: &Upstream,
    url: &reqwest::Url,
    method: reqwest::Method,
    client: &HeaderMap,
) -> reqwest::RequestBuilder {
    let mut req = http.request(method, url.clone()).timeout(upstream.timeout);
    for name in FORWARDED_HEADERS {
        if let Some(v) = client.get(name) {
            req = req.header(name, v.as_bytes());
        }
    }
    for (k, v) in client.iter() {
        if k.as_str().starts_with("mcp-param-") {
            req = req.header(k.as_str(), v.as_bytes());
        }
    }
    for (k, v) in &upstream.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    req
}

async fn http_send(req: reqwest::RequestBuilder) -> Result<Reply, Failure> {
    let resp = req.send().await.map_err(|e| {
        let what = if e.is_timeout() {
            "timed out"
        } else {
            "unreachable"
        };
        Failure::Upstream(format!("upstream {what}: {}", without_url(&e)))
    })?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    for name in ["content-type", SESSION_HEADER, VERSION_HEADER] {
        if let Some(v) = resp.headers().get(name) {
            if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                headers.insert(name, v);
            }
        }
    }
    let body = resp
        .bytes_stream()
        .map(|r| {
            r.map_err(|e| std::io::Error::other(format!("upstream body: {}", without_url(&e))))
        })
        .boxed();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// reqwest errors print the URL; upstream URLs may carry secrets, so say only what happened.
pub fn without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else if e.is_body() || e.is_decode() {
        "bad response body".into()
    } else {
        "request failed".into()
    }
}

fn open_failed(e: OpenError) -> Failure {
    match e {
        OpenError::Full(m) => Failure::Full(m),
        OpenError::Spawn { .. } => Failure::Upstream(e.to_string()),
    }
}

fn call_failed(e: CallError) -> Failure {
    match e {
        CallError::DuplicateId(_) => Failure::Invalid(format!("Invalid Request: {e}")),
        CallError::Gone(_) | CallError::Timeout(_) => Failure::Upstream(e.to_string()),
    }
}

async fn stdio_post(
    server: &Arc<stdio::Server>,
    client: &HeaderMap,
    msg: &Message,
    principal: &str,
) -> Result<Reply, Failure> {
    let sid = header_str(client, SESSION_HEADER);
    let accepts_sse = header_str(client, "accept")
        .is_some_and(|a| a.to_ascii_lowercase().contains("text/event-stream"));
    let mut new_session = None;
    let child = match sid {
        Some(sid) => server
            .session(sid)
            .ok_or_else(|| Failure::NoSession("the session has ended; initialize again".into()))?,
        None if msg.method == "initialize" => {
            let (sid, child) = server.open_session().await.map_err(open_failed)?;
            new_session = Some(sid);
            child
        }
        None => server.for_identity(principal).await.map_err(open_failed)?,
    };
    let canonical = msg.canonical();
    match msg.kind {
        Kind::Request => {
            // Server messages go to the session's stream when one is open; else this
            // request's answer is a stream that carries them too.
            let stream = accepts_sse && !child.listening();
            let answer = child.request(msg, &canonical, stream).await;
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    if let Some(sid) = &new_session {
                        server.end_session(sid);
                    }
                    return Err(call_failed(e));
                }
            };
            let mut reply = match answer {
                Answer::Json(bytes) => {
                    if new_session.is_some() && is_error(&bytes) {
                        // A refused initialize opens no session.
                        if let Some(sid) = new_session.take() {
                            server.end_session(&sid);
                        }
                    }
                    Reply::json(bytes)
                }
                Answer::Stream(s) => {
                    let guard = s.guard;
                    let events = tokio_stream_of(s.rx)
                        .map(move |ev| {
                            let _pending = &guard;
                            ev.map_err(std::io::Error::other)
                        })
                        .boxed();
                    Reply::sse(events)
                }
            };
            if let Some(sid) = new_session {
                if let Ok(v) = HeaderValue::from_str(&sid) {
                    reply.headers.insert(SESSION_HEADER, v);
                }
            }
            Ok(reply)
        }
        Kind::Notification if msg.method == "notifications/cancelled" => {
            let id = msg
                .params()
                .and_then(|p| p.get("requestId"))
                .cloned()
                .unwrap_or(Value::Null);
            let reason = msg.param_str("reason").unwrap_or("cancelled by the client");
            child.cancel(&id, reason).await.map_err(call_failed)?;
            Ok(Reply::empty(StatusCode::ACCEPTED))
        }
        Kind::Notification | Kind::Response => {
            child.send(&canonical).await.map_err(call_failed)?;
            Ok(Reply::empty(StatusCode::ACCEPTED))
        }
    }
}

fn is_error(json: &[u8]) -> bool {
    serde_json::from_slice::<Value>(json)
        .map(|v| v.get("error").is_some())
        .unwrap_or(true)
}

/// An mpsc receiver as a stream.
fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> BoxStream<'static, T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
