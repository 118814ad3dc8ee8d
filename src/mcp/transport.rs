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

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;

use super::jsonrpc::{Kind, Message};
use super::mapping::Target;
use crate::config::Server;
use crate::stdio::{self, Answer, CallError, OpenError};

pub const SESSION_HEADER: &str = "mcp-session-id";
pub(crate) const VERSION_HEADER: &str = "mcp-protocol-version";
/// The MCP headers, parsed once: a `&str` name is parsed again on every lookup.
pub(crate) const SESSION: HeaderName = HeaderName::from_static(SESSION_HEADER);
pub(crate) const VERSION: HeaderName = HeaderName::from_static(VERSION_HEADER);
/// The stateless era's headers that mirror the body.
pub(crate) const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
pub(crate) const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");

/// Request headers passed to an HTTP upstream (everything else, identity headers included,
/// is dropped).
const FORWARDED_HEADERS: [HeaderName; 6] = [
    header::ACCEPT,
    VERSION,
    SESSION,
    MCP_METHOD,
    MCP_NAME,
    HeaderName::from_static("last-event-id"),
];

/// The upstream's answer headers passed back to the caller.
const ANSWER_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, SESSION, VERSION];

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
    /// The URL as a hyper `Uri` when [`Client`] may POST to it on the plain pool: `http://`
    /// without user info (reqwest turns that into basic auth). Parsed once, here.
    pub plain: Option<Uri>,
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
            plain: match &c.transport {
                crate::config::Transport::Http(url) => plain_uri(url),
                crate::config::Transport::Stdio(_) => None,
            },
        })
    }
}

/// `url` as a hyper `Uri`, if the plain pool can serve it (see [`Upstream::plain`]).
fn plain_uri(url: &reqwest::Url) -> Option<Uri> {
    if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    url.as_str().parse().ok()
}

/// Plain `http://` POSTs on hyper's pooled HTTP/1.1 client (the request path's hop).
type Plain = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// Says whether a host is dialed through a proxy (then the plain pool never serves it).
pub type Proxied = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The client for HTTP upstreams. A tool call to a plain `http://` upstream goes through
/// hyper's pooled HTTP/1.1 client: reqwest's request builder, header map copies and body
/// wrapper cost ~43k instructions per call, hyper's ~half of that (docs/benchmarks.md).
/// Everything else keeps reqwest: `https://` (rustls), URLs with user info, tailnet hosts
/// dialed through tailscaled's SOCKS5 listener, session streams (GET/DELETE) and the
/// gateway's own answers to server requests. Both follow no redirects, keep idle connections
/// 90 s (256 per host), disable Nagle, and bound a request's whole life (headers and body) by
/// the upstream's `timeout`.
#[derive(Clone)]
pub struct Client {
    pub reqwest: reqwest::Client,
    plain: Plain,
    /// Hosts that must go through the SOCKS5 proxy (reqwest has it configured).
    proxied: Option<Proxied>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("proxied", &self.proxied.is_some())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// `reqwest` for what the plain pool does not serve; `proxied` names the hosts that
    /// reqwest dials through a proxy (those never use the plain pool).
    pub fn new(reqwest: reqwest::Client, proxied: Option<Proxied>) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let plain = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        Client {
            reqwest,
            plain,
            proxied,
        }
    }

    /// The plain pool's URI for `upstream`, when it serves it.
    fn plain_for<'a>(&self, upstream: &'a Upstream) -> Option<&'a Uri> {
        let uri = upstream.plain.as_ref()?;
        match (&self.proxied, uri.host()) {
            (Some(via), Some(host)) if via(host) => None,
            _ => Some(uri),
        }
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

/// A header's value as text. Pass a parsed name ([`header::CONTENT_TYPE`], [`VERSION`]) on the
/// request path: a `&str` name is parsed again on every lookup.
pub(crate) fn header_str(h: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// POSTs one authorized message (`msg`, sent as its canonical bytes) for `principal`.
pub async fn post(
    http: &Client,
    upstream: &Upstream,
    client: &HeaderMap,
    msg: &Message,
    principal: &str,
) -> Result<Reply, Failure> {
    if let Some(uri) = http.plain_for(upstream) {
        return plain_post(&http.plain, upstream, uri, client, msg.canonical()).await;
    }
    match &upstream.transport {
        Transport::Http(url) => {
            let http = &http.reqwest;
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
    http: &Client,
    upstream: &Upstream,
    method: &Method,
    client: &HeaderMap,
) -> Result<Reply, Failure> {
    match &upstream.transport {
        Transport::Http(url) => {
            let http = &http.reqwest;
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
pub fn answer(http: &Client, upstream: &Upstream, principal: &str, body: Vec<u8>) {
    match &upstream.transport {
        Transport::Http(url) => {
            let mut req = http
                .reqwest
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
        if let Some(v) = client.get(&name) {
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
    for name in ANSWER_HEADERS {
        if let Some(v) = resp.headers().get(&name) {
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

/// One POST on the plain pool: the same headers as [`http_request`] (forwarded, then
/// configured), `content-type: application/json`, and the same bound: `upstream.timeout`
/// from the send to the body's last byte (reqwest's `timeout` bounds both, too).
async fn plain_post(
    plain: &Plain,
    upstream: &Upstream,
    uri: &Uri,
    client: &HeaderMap,
    body: Vec<u8>,
) -> Result<Reply, Failure> {
    let deadline = tokio::time::Instant::now() + upstream.timeout;
    let mut req = hyper::Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri.clone();
    let h = req.headers_mut();
    for name in FORWARDED_HEADERS {
        if let Some(v) = client.get(&name) {
            h.append(name, v.clone());
        }
    }
    for (k, v) in client.iter() {
        if k.as_str().starts_with("mcp-param-") {
            h.append(k.clone(), v.clone());
        }
    }
    for (k, v) in &upstream.headers {
        // Checked at config load (config.rs); a value that stopped parsing is dropped.
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if !h.contains_key(axum::http::header::ACCEPT) {
        // What reqwest sends when the caller gave none.
        h.insert(axum::http::header::ACCEPT, HeaderValue::from_static("*/*"));
    }
    let resp = match tokio::time::timeout_at(deadline, plain.request(req)).await {
        Err(_) => return Err(Failure::Upstream("upstream timed out: timeout".into())),
        Ok(Err(e)) => {
            let why = if e.is_connect() {
                "connection failed"
            } else {
                "request failed"
            };
            return Err(Failure::Upstream(format!("upstream unreachable: {why}")));
        }
        Ok(Ok(r)) => r,
    };
    let (parts, incoming) = resp.into_parts();
    let mut headers = HeaderMap::new();
    for name in ANSWER_HEADERS {
        if let Some(v) = parts.headers.get(&name) {
            headers.insert(name, v.clone());
        }
    }
    // The body's frames until the deadline; then one error (as reqwest's body timeout).
    let body = futures_util::stream::unfold(Some(incoming), move |state| async move {
        let mut incoming = state?;
        loop {
            match tokio::time::timeout_at(deadline, incoming.frame()).await {
                Err(_) => {
                    let e = std::io::Error::other("upstream body: timeout");
                    return Some((Err(e), None));
                }
                Ok(None) => return None,
                Ok(Some(Err(_))) => {
                    let e = std::io::Error::other("upstream body: bad response body");
                    return Some((Err(e), None));
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Some((Ok(data), Some(incoming)));
                    }
                    // Trailers: nothing to pass on.
                }
            }
        }
    })
    .boxed();
    Ok(Reply {
        status: parts.status,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn upstream(url: &str, timeout: Duration) -> Upstream {
        let url: reqwest::Url = url.parse().unwrap();
        Upstream {
            target: Target {
                server: "s".into(),
                resource_kind: "mcp_server".into(),
                scope: String::new(),
            },
            plain: plain_uri(&url),
            transport: Transport::Http(url),
            timeout,
            headers: vec![("authorization".into(), "Bearer k".into())],
            deny_unknown: false,
            max_stream: Duration::from_secs(5),
            max_body: 1 << 20,
            max_nodes: 10_000,
        }
    }

    fn client() -> Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Client::new(reqwest::Client::new(), None)
    }

    fn call() -> Message {
        super::super::jsonrpc::parse(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#,
            super::super::jsonrpc::Limits {
                max_bytes: 1 << 20,
                max_depth: 64,
                max_nodes: 1000,
            },
        )
        .unwrap()
    }

    /// A one-connection server: reads one request's head and body, then writes `answer` (in
    /// two parts, `pause` apart); returns what it read.
    async fn serve_once(
        answer: (&'static [u8], &'static [u8]),
        pause: Duration,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("\"method\"") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let _ = s.write_all(answer.0).await;
            tokio::time::sleep(pause).await;
            let _ = s.write_all(answer.1).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            String::from_utf8_lossy(&got).into_owned()
        });
        (url, task)
    }

    async fn read_all(mut body: BodyStream) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(c) = body.next().await {
            out.extend_from_slice(&c.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    #[test]
    fn only_plain_http_without_user_info_goes_to_the_pool() {
        let p = |u: &str| plain_uri(&u.parse().unwrap()).map(|u| u.to_string());
        assert_eq!(
            p("http://127.0.0.1:9/mcp?x=1").as_deref(),
            Some("http://127.0.0.1:9/mcp?x=1")
        );
        assert_eq!(p("https://example.com/mcp"), None);
        assert_eq!(p("http://u:pw@example.com/mcp"), None);
        assert_eq!(p("http://u@example.com/mcp"), None);
    }

    #[tokio::test]
    async fn proxied_hosts_stay_on_reqwest() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let c = Client::new(
            reqwest::Client::new(),
            Some(Arc::new(|h: &str| h.ends_with(".ts.net"))),
        );
        let t = Duration::from_secs(1);
        assert!(
            c.plain_for(&upstream("http://a.tail1.ts.net/mcp", t))
                .is_none()
        );
        assert!(c.plain_for(&upstream("http://127.0.0.1/mcp", t)).is_some());
    }

    #[tokio::test]
    async fn a_plain_post_sends_the_forwarded_and_configured_headers() {
        let (url, seen) = serve_once(
            (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s1\r\nX-Other: no\r\nContent-Length: 2\r\n\r\n",
                b"{}",
            ),
            Duration::ZERO,
        )
        .await;
        let up = upstream(&url, Duration::from_secs(5));
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("application/json"));
        h.insert("mcp-param-region", HeaderValue::from_static("eu"));
        h.insert("tailscale-user-login", HeaderValue::from_static("evil"));
        let reply = post(&client(), &up, &h, &call(), "p").await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(header_str(&reply.headers, SESSION_HEADER), Some("s1"));
        assert!(reply.headers.get("x-other").is_none());
        assert_eq!(read_all(reply.body).await.unwrap(), b"{}");
        let seen = seen.await.unwrap().to_ascii_lowercase();
        assert!(seen.starts_with("post /mcp http/1.1\r\n"), "{seen}");
        for line in [
            "accept: application/json",
            "mcp-param-region: eu",
            "authorization: bearer k",
            "content-type: application/json",
            "host: 127.0.0.1:",
        ] {
            assert!(seen.contains(line), "{line} missing in {seen}");
        }
        assert!(!seen.contains("tailscale-user-login"), "{seen}");
    }

    #[tokio::test]
    async fn a_plain_post_is_bounded_from_send_to_the_last_byte() {
        // No answer at all.
        let (url, _seen) = serve_once((b"", b""), Duration::from_secs(3)).await;
        let up = upstream(&url, Duration::from_millis(200));
        let e = post(&client(), &up, &HeaderMap::new(), &call(), "p")
            .await
            .unwrap_err();
        assert_eq!(e, Failure::Upstream("upstream timed out: timeout".into()));
        // Headers in time, the body too late.
        let (url, _seen) = serve_once(
            (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{",
                b"}",
            ),
            Duration::from_secs(3),
        )
        .await;
        let up = upstream(&url, Duration::from_millis(300));
        let reply = post(&client(), &up, &HeaderMap::new(), &call(), "p")
            .await
            .unwrap();
        let e = read_all(reply.body).await.unwrap_err();
        assert_eq!(e, "upstream body: timeout");
    }

    #[tokio::test]
    async fn a_plain_post_to_nothing_fails_without_the_url() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let up = upstream(
            &format!("http://127.0.0.1:{port}/mcp?token=secret"),
            Duration::from_secs(2),
        );
        let e = post(&client(), &up, &HeaderMap::new(), &call(), "p")
            .await
            .unwrap_err();
        assert_eq!(
            e,
            Failure::Upstream("upstream unreachable: connection failed".into())
        );
    }

    #[tokio::test]
    async fn a_cut_body_is_an_error() {
        let (url, _seen) = serve_once(
            (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{",
                b"",
            ),
            Duration::ZERO,
        )
        .await;
        let up = upstream(&url, Duration::from_secs(5));
        let reply = post(&client(), &up, &HeaderMap::new(), &call(), "p")
            .await
            .unwrap();
        let e = read_all(reply.body).await.unwrap_err();
        assert_eq!(e, "upstream body: bad response body");
    }
}
