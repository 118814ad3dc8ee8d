//! A thin async client of tailscaled's LocalAPI (reference/tailscale.md §2): HTTP/1.1 over the
//! daemon's unix socket (Linux), or over TCP with a token (the macOS GUI variants).
//!
//! Conventions it keeps on every request: `Host: local-tailscaled.sock`; never a `Referer` or
//! `Origin` header (tailscaled answers those with 403); on TCP, HTTP Basic auth with an empty
//! user and the token as password, plus `Sec-Tailscale: localapi`.
//!
//! Connections are kept alive in a small pool (tailscaled does not close idle LocalAPI
//! connections); a request that fails on a reused connection before any response is retried once
//! on a fresh one (every call here is an idempotent GET). Every call is bounded by a timeout
//! (default 5 s; WhoIs 2 s) that covers connecting, sending and reading the whole body, and by a
//! body size limit. Non-200 answers become typed [`LocalApiError`]s; tailscaled's error bodies
//! are plain text.
//!
//! The client does not retry a WhoIs 404: tailscaled already retries unmapped loopback lookups
//! for ~181 ms while holding its main lock (reference/tailnet-lab.md finding 1), so retry
//! policy and concurrency bounds belong to the caller (the WhoIs cache).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, HOST, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::types::{Notify, Status, WatchMask, WhoIs};

/// tailscaled's default socket on Linux (`paths.DefaultTailscaledSocket`).
pub const DEFAULT_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";
/// The only `Host` tailscaled accepts (`apitype.LocalAPIHost`).
pub const LOCALAPI_HOST: &str = "local-tailscaled.sock";
/// Default bound of a LocalAPI call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound of a WhoIs call (an unmapped loopback lookup alone takes ~181 ms).
pub const DEFAULT_WHOIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Default cap on a response body (and on one line of the IPN bus).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default cap on a WhoIs answer. A real one is a few KiB (one node, one user profile, the
/// CapMap); WhoIs runs per connection, so a larger answer only costs memory on the
/// request path and is refused.
pub const DEFAULT_MAX_WHOIS_BODY_BYTES: usize = 1024 * 1024;
/// Default number of idle keep-alive connections kept.
pub const DEFAULT_MAX_IDLE_CONNECTIONS: usize = 4;

/// Longest error body text kept in a [`LocalApiError`].
const MAX_ERROR_TEXT: usize = 1024;

/// How to reach tailscaled.
#[derive(Clone, PartialEq, Eq)]
pub enum Transport {
    /// A unix socket (Linux, BSDs, open-source macOS daemon).
    Unix(PathBuf),
    /// `127.0.0.1:<port>` with a token (macOS GUI variants, tsnet loopback).
    Tcp {
        /// The LocalAPI listener.
        addr: SocketAddr,
        /// Sent as the Basic-auth password with an empty user; `None` sends no auth.
        token: Option<String>,
    },
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Unix(p) => write!(f, "unix:{}", p.display()),
            Transport::Tcp { addr, .. } => write!(f, "tcp:{addr}"),
        }
    }
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Unix(p) => f.debug_tuple("Unix").field(p).finish(),
            Transport::Tcp { addr, token } => f
                .debug_struct("Tcp")
                .field("addr", addr)
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

/// Client settings. Build with [`LocalApiConfig::unix`] or [`LocalApiConfig::tcp`], then adjust.
#[derive(Clone, Debug)]
pub struct LocalApiConfig {
    /// Where tailscaled listens.
    pub transport: Transport,
    /// Bound of every call except WhoIs (connect + send + whole body).
    pub timeout: Duration,
    /// Bound of a WhoIs call.
    pub whois_timeout: Duration,
    /// Largest response body accepted (also the longest IPN-bus line).
    pub max_body_bytes: usize,
    /// Largest WhoIs answer accepted (smaller than `max_body_bytes`: it is read per connection).
    pub max_whois_body_bytes: usize,
    /// Idle keep-alive connections kept for reuse.
    pub max_idle_connections: usize,
}

impl LocalApiConfig {
    /// Defaults over the unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::with_transport(Transport::Unix(path.into()))
    }

    /// Defaults over TCP with an optional token.
    pub fn tcp(addr: SocketAddr, token: Option<String>) -> Self {
        Self::with_transport(Transport::Tcp { addr, token })
    }

    fn with_transport(transport: Transport) -> Self {
        Self {
            transport,
            timeout: DEFAULT_TIMEOUT,
            whois_timeout: DEFAULT_WHOIS_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_whois_body_bytes: DEFAULT_MAX_WHOIS_BODY_BYTES,
            max_idle_connections: DEFAULT_MAX_IDLE_CONNECTIONS,
        }
    }
}

impl Default for LocalApiConfig {
    fn default() -> Self {
        Self::unix(DEFAULT_SOCKET)
    }
}

/// A LocalAPI failure. Every variant names the endpoint it happened on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalApiError {
    /// 404: for `whois`, no node has that address (`no match for IP:port`); else no such path.
    #[error("LocalAPI {endpoint}: not found (404): {body}")]
    NotFound {
        /// The endpoint (`whois`, `status`, `cert/<domain>`, …).
        endpoint: String,
        /// tailscaled's error text.
        body: String,
    },
    /// 403: wrong Host, browser headers, or missing permission (`cert access denied`).
    #[error("LocalAPI {endpoint}: access denied (403): {body}")]
    AccessDenied {
        /// The endpoint.
        endpoint: String,
        /// tailscaled's error text.
        body: String,
    },
    /// 400: a malformed request (`invalid 'addr' parameter`).
    #[error("LocalAPI {endpoint}: bad request (400): {body}")]
    BadRequest {
        /// The endpoint.
        endpoint: String,
        /// tailscaled's error text.
        body: String,
    },
    /// 412: preconditions failed.
    #[error("LocalAPI {endpoint}: precondition failed (412): {body}")]
    Precondition {
        /// The endpoint.
        endpoint: String,
        /// tailscaled's error text.
        body: String,
    },
    /// Any other non-200 status (`500 no netmap available`).
    #[error("LocalAPI {endpoint}: HTTP {code}: {body}")]
    Status {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status code.
        code: u16,
        /// tailscaled's error text.
        body: String,
    },
    /// Could not connect, or the connection failed mid-call.
    #[error("LocalAPI {endpoint}: transport error: {detail}")]
    Transport {
        /// The endpoint.
        endpoint: String,
        /// What failed, including the transport (`unix:/path`).
        detail: String,
    },
    /// No complete answer within the bound.
    #[error("LocalAPI {endpoint}: no answer within {}ms", timeout.as_millis())]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The bound that expired.
        timeout: Duration,
    },
    /// A 200 whose body is not what the endpoint promises.
    #[error("LocalAPI {endpoint}: cannot decode response: {detail}")]
    Decode {
        /// The endpoint.
        endpoint: String,
        /// The decoder's message.
        detail: String,
    },
}

impl LocalApiError {
    /// The endpoint the error happened on.
    pub fn endpoint(&self) -> &str {
        match self {
            Self::NotFound { endpoint, .. }
            | Self::AccessDenied { endpoint, .. }
            | Self::BadRequest { endpoint, .. }
            | Self::Precondition { endpoint, .. }
            | Self::Status { endpoint, .. }
            | Self::Transport { endpoint, .. }
            | Self::Timeout { endpoint, .. }
            | Self::Decode { endpoint, .. } => endpoint,
        }
    }

    /// True for a 404 (for WhoIs: the address belongs to no node).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// The HTTP status tailscaled answered with, when it answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Self::NotFound { .. } => Some(404),
            Self::AccessDenied { .. } => Some(403),
            Self::BadRequest { .. } => Some(400),
            Self::Precondition { .. } => Some(412),
            Self::Status { code, .. } => Some(*code),
            Self::Transport { .. } | Self::Timeout { .. } | Self::Decode { .. } => None,
        }
    }

    fn from_status(endpoint: &str, code: StatusCode, body: &[u8]) -> Self {
        let endpoint = endpoint.to_owned();
        let body = error_text(body);
        match code.as_u16() {
            404 => Self::NotFound { endpoint, body },
            403 => Self::AccessDenied { endpoint, body },
            400 => Self::BadRequest { endpoint, body },
            412 => Self::Precondition { endpoint, body },
            code => Self::Status {
                endpoint,
                code,
                body,
            },
        }
    }

    fn transport(endpoint: &str, detail: impl fmt::Display) -> Self {
        Self::Transport {
            endpoint: endpoint.to_owned(),
            detail: detail.to_string(),
        }
    }

    fn decode(endpoint: &str, detail: impl fmt::Display) -> Self {
        Self::Decode {
            endpoint: endpoint.to_owned(),
            detail: detail.to_string(),
        }
    }
}

/// tailscaled's error body as text: plain text (`http.Error`), or a JSON `{"error": "..."}`
/// which the Go client also accepts; trimmed and bounded.
fn error_text(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(s) = v
            .get("error")
            .or_else(|| v.get("Error"))
            .and_then(|e| e.as_str())
    {
        return truncate(s.trim());
    }
    truncate(String::from_utf8_lossy(body).trim())
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_ERROR_TEXT {
        return s.to_owned();
    }
    let mut end = MAX_ERROR_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s.get(..end).unwrap_or_default())
}

/// `whois` `proto=`: which proxymap table to consult (matters in userspace mode only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhoIsProto {
    /// `proto=tcp`.
    Tcp,
    /// `proto=udp`.
    Udp,
}

impl WhoIsProto {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A TLS key and certificate chain from `cert/<domain>?type=pair`, as PEM text.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPair {
    /// The private key PEM (tailscaled writes `EC PRIVATE KEY`, SEC1).
    pub key_pem: String,
    /// The certificate chain PEM, leaf first.
    pub cert_chain_pem: String,
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertPair")
            .field("key_pem", &"<redacted>")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .finish()
    }
}

impl CertPair {
    /// Splits a `type=pair` body the way the Go client does: at the first `--\n--` (the end of
    /// the key block and the start of the first certificate); the chain must hold no key.
    pub fn split(pem: &str) -> Result<Self, String> {
        let i = pem
            .find("--\n--")
            .ok_or_else(|| "unexpected cert pair: no delimiter between key and chain".to_owned())?;
        let (key, chain) = pem.split_at(i + "--\n".len());
        if !key.contains("PRIVATE KEY-----") {
            return Err("unexpected cert pair: the first block is not a private key".to_owned());
        }
        if chain.contains(" PRIVATE KEY-----") {
            return Err("unexpected cert pair: a key in the certificate chain".to_owned());
        }
        if !chain.contains("-----BEGIN CERTIFICATE-----") {
            return Err("unexpected cert pair: no certificate after the key".to_owned());
        }
        Ok(Self {
            key_pem: key.to_owned(),
            cert_chain_pem: chain.to_owned(),
        })
    }
}

/// The LocalAPI client. Cheap to clone (shares the connection pool).
#[derive(Clone)]
pub struct LocalApi {
    inner: Arc<Inner>,
}

struct Inner {
    config: LocalApiConfig,
    auth: Option<HeaderValue>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    connections_opened: AtomicU64,
}

impl fmt::Debug for LocalApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalApi")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl LocalApi {
    /// A client with `config`. Connects lazily.
    pub fn new(config: LocalApiConfig) -> Self {
        let auth = match &config.transport {
            Transport::Tcp {
                token: Some(token), ..
            } => {
                HeaderValue::from_str(&format!("Basic {}", base64(format!(":{token}").as_bytes())))
                    .ok()
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
            }
            _ => None,
        };
        Self {
            inner: Arc::new(Inner {
                config,
                auth,
                idle: Mutex::new(Vec::new()),
                connections_opened: AtomicU64::new(0),
            }),
        }
    }

    /// A client with defaults over the unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::new(LocalApiConfig::unix(path))
    }

    /// The settings.
    pub fn config(&self) -> &LocalApiConfig {
        &self.inner.config
    }

    /// How many connections this client has opened so far (pool effectiveness).
    pub fn connections_opened(&self) -> u64 {
        self.inner.connections_opened.load(Ordering::Relaxed)
    }

    /// `GET /localapi/v0/status?peers=false`: this node, its tailnet, cert domains; no peers.
    pub async fn status(&self) -> Result<Status, LocalApiError> {
        self.get_json(
            "status",
            "/localapi/v0/status?peers=false",
            self.inner.config.timeout,
        )
        .await
    }

    /// `GET /localapi/v0/status`: like [`LocalApi::status`] plus the peer map and user profiles.
    pub async fn status_with_peers(&self) -> Result<Status, LocalApiError> {
        self.get_json("status", "/localapi/v0/status", self.inner.config.timeout)
            .await
    }

    /// `GET /localapi/v0/whois?addr=IP:PORT&proto=tcp`: who is behind a TCP peer address.
    /// A 404 ([`LocalApiError::NotFound`]) means no node has that address.
    pub async fn whois(&self, addr: SocketAddr) -> Result<WhoIs, LocalApiError> {
        self.whois_addr(&addr.to_string(), Some(WhoIsProto::Tcp))
            .await
    }

    /// `whois` with `addr` as given: `ip:port` (`[v6]:port`), a bare IP, or `nodekey:<hex>`.
    pub async fn whois_addr(
        &self,
        addr: &str,
        proto: Option<WhoIsProto>,
    ) -> Result<WhoIs, LocalApiError> {
        let mut pq = format!("/localapi/v0/whois?addr={}", query_escape(addr));
        if let Some(p) = proto {
            pq.push_str("&proto=");
            pq.push_str(p.as_str());
        }
        let limit = self.inner.config.max_whois_body_bytes;
        let body = self
            .call("whois", &pq, self.inner.config.whois_timeout, limit)
            .await?;
        serde_json::from_slice(&body).map_err(|e| LocalApiError::decode("whois", e))
    }

    /// `GET /localapi/v0/cert/<domain>?type=pair[&min_validity=…]`: the node's TLS key and
    /// chain for `domain` (one of `Status.cert_domains`). `min_validity` forces a synchronous
    /// renewal when less validity remains. Needs write permission or `TS_PERMIT_CERT_UID`.
    pub async fn cert_pair(
        &self,
        domain: &str,
        min_validity: Option<Duration>,
    ) -> Result<CertPair, LocalApiError> {
        let endpoint = format!("cert/{domain}");
        let mut pq = format!("/localapi/v0/cert/{}?type=pair", path_escape(domain));
        if let Some(d) = min_validity {
            pq.push_str("&min_validity=");
            pq.push_str(&go_duration(d));
        }
        let body = self
            .call(
                &endpoint,
                &pq,
                self.inner.config.timeout,
                self.inner.config.max_body_bytes,
            )
            .await?;
        let text = std::str::from_utf8(&body)
            .map_err(|e| LocalApiError::decode(&endpoint, format!("PEM is not UTF-8: {e}")))?;
        CertPair::split(text).map_err(|e| LocalApiError::decode(&endpoint, e))
    }

    /// A raw `GET` of `path_and_query` (e.g. `/localapi/v0/prefs`); the 200 body as bytes.
    pub async fn get(&self, path_and_query: &str) -> Result<Bytes, LocalApiError> {
        let endpoint = endpoint_of(path_and_query);
        self.call(
            &endpoint,
            path_and_query,
            self.inner.config.timeout,
            self.inner.config.max_body_bytes,
        )
        .await
    }

    /// A `POST` of `body` (JSON when not empty) to `path_and_query` on a fresh connection (never
    /// retried: POSTs change state). 200 and 204 are success; the body is returned. Needs write
    /// permission. Used for `start`, `login-interactive` (what `tailscale up` calls).
    pub async fn post(&self, path_and_query: &str, body: Bytes) -> Result<Bytes, LocalApiError> {
        self.send_once(Method::POST, path_and_query, body).await
    }

    /// A `PATCH` of a JSON `body` (e.g. `ipn.MaskedPrefs` to `/localapi/v0/prefs`).
    pub async fn patch(&self, path_and_query: &str, body: Bytes) -> Result<Bytes, LocalApiError> {
        self.send_once(Method::PATCH, path_and_query, body).await
    }

    async fn send_once(
        &self,
        method: Method,
        pq: &str,
        body: Bytes,
    ) -> Result<Bytes, LocalApiError> {
        let endpoint = endpoint_of(pq);
        let timeout = self.inner.config.timeout;
        let call = async {
            let (mut sender, task) = self.connect(&endpoint).await?;
            let mut req = self.request(&endpoint, pq)?;
            *req.method_mut() = method;
            if !body.is_empty() {
                req.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            *req.body_mut() = Full::new(body);
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| LocalApiError::transport(&endpoint, format!("request failed: {e}")))?;
            let status = resp.status();
            let out = read_limited(
                &endpoint,
                resp.into_body(),
                self.inner.config.max_body_bytes,
            )
            .await;
            task.abort();
            let out = out?;
            if status != StatusCode::OK && status != StatusCode::NO_CONTENT {
                return Err(LocalApiError::from_status(&endpoint, status, &out));
            }
            Ok(out)
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(LocalApiError::Timeout { endpoint, timeout }),
        }
    }

    /// `GET /localapi/v0/watch-ipn-bus?mask=N`: a long-lived stream of [`Notify`], one JSON
    /// object per line, on a dedicated connection. The call's timeout bounds only the wait for
    /// the response head; the stream itself is unbounded in time.
    pub async fn watch_ipn_bus(&self, mask: WatchMask) -> Result<IpnBusWatcher, LocalApiError> {
        const EP: &str = "watch-ipn-bus";
        let pq = format!("/localapi/v0/watch-ipn-bus?mask={}", mask.0);
        let timeout = self.inner.config.timeout;
        let open = async {
            let (mut sender, conn_task) = self.connect(EP).await?;
            let req = self.request(EP, &pq)?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| LocalApiError::transport(EP, format!("request failed: {e}")))?;
            Ok::<_, LocalApiError>((resp, sender, conn_task))
        };
        let (resp, sender, conn_task) = match tokio::time::timeout(timeout, open).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(LocalApiError::Timeout {
                    endpoint: EP.to_owned(),
                    timeout,
                });
            }
        };
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let limit = MAX_ERROR_TEXT * 4;
            let body = tokio::time::timeout(timeout, read_limited(EP, resp.into_body(), limit))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            conn_task.abort();
            return Err(LocalApiError::from_status(EP, status, &body));
        }
        Ok(IpnBusWatcher {
            body: resp.into_body(),
            buf: BytesMut::new(),
            discarding: false,
            done: false,
            max_line: self.inner.config.max_body_bytes,
            _sender: sender,
            conn_task,
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: &str,
        pq: &str,
        timeout: Duration,
    ) -> Result<T, LocalApiError> {
        let body = self
            .call(endpoint, pq, timeout, self.inner.config.max_body_bytes)
            .await?;
        serde_json::from_slice(&body).map_err(|e| LocalApiError::decode(endpoint, e))
    }

    /// One bounded GET (in time and in body bytes): the 200 body, or the typed error.
    async fn call(
        &self,
        endpoint: &str,
        pq: &str,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Bytes, LocalApiError> {
        let start = Instant::now();
        let result = match tokio::time::timeout(
            timeout,
            self.call_unbounded(endpoint, pq, max_body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(LocalApiError::Timeout {
                endpoint: endpoint.to_owned(),
                timeout,
            }),
        };
        tracing::debug!(
            endpoint,
            elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
            ok = result.is_ok(),
            "localapi call"
        );
        result
    }

    async fn call_unbounded(
        &self,
        endpoint: &str,
        pq: &str,
        max_body: usize,
    ) -> Result<Bytes, LocalApiError> {
        let (resp, sender) = self.send(endpoint, pq).await?;
        let status = resp.status();
        // An over-long body is not read to its end, so this connection is dropped, not pooled.
        let body = read_limited(endpoint, resp.into_body(), max_body).await?;
        // The body is read to the end, so the connection is idle again and reusable.
        self.checkin(sender);
        if status != StatusCode::OK {
            return Err(LocalApiError::from_status(endpoint, status, &body));
        }
        Ok(body)
    }

    /// Sends on a pooled connection if one is alive, else on a fresh one. A failure on a reused
    /// connection before the response head is retried once on a fresh connection (GETs only).
    async fn send(
        &self,
        endpoint: &str,
        pq: &str,
    ) -> Result<(Response<Incoming>, SendRequest<Full<Bytes>>), LocalApiError> {
        while let Some(mut sender) = self.checkout() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.send_request(self.request(endpoint, pq)?).await {
                Ok(resp) => return Ok((resp, sender)),
                Err(e) => {
                    tracing::debug!(endpoint, error = %e, "reused LocalAPI connection failed; retrying on a new one");
                    break;
                }
            }
        }
        let (mut sender, _task) = self.connect(endpoint).await?;
        let resp = sender
            .send_request(self.request(endpoint, pq)?)
            .await
            .map_err(|e| LocalApiError::transport(endpoint, format!("request failed: {e}")))?;
        Ok((resp, sender))
    }

    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < self.inner.config.max_idle_connections {
            idle.push(sender);
        }
    }

    async fn connect(
        &self,
        endpoint: &str,
    ) -> Result<(SendRequest<Full<Bytes>>, JoinHandle<()>), LocalApiError> {
        let transport = &self.inner.config.transport;
        let fail = |e: &dyn fmt::Display| {
            LocalApiError::transport(endpoint, format!("cannot connect to {transport}: {e}"))
        };
        let handshake = |e: hyper::Error| {
            LocalApiError::transport(endpoint, format!("HTTP handshake with {transport}: {e}"))
        };
        let (sender, task) = match transport {
            Transport::Unix(path) => {
                let io = UnixStream::connect(path).await.map_err(|e| fail(&e))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(handshake)?;
                (sender, tokio::spawn(drive(conn)))
            }
            Transport::Tcp { addr, .. } => {
                let io = TcpStream::connect(addr).await.map_err(|e| fail(&e))?;
                // Best effort: small request/response exchanges; Nagle only adds latency.
                let _ = io.set_nodelay(true);
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(handshake)?;
                (sender, tokio::spawn(drive(conn)))
            }
        };
        self.inner
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        Ok((sender, task))
    }

    fn request(&self, endpoint: &str, pq: &str) -> Result<Request<Full<Bytes>>, LocalApiError> {
        let mut b = Request::builder()
            .method(Method::GET)
            .uri(pq)
            .header(HOST, HeaderValue::from_static(LOCALAPI_HOST));
        if let Transport::Tcp { .. } = self.inner.config.transport {
            b = b.header("Sec-Tailscale", HeaderValue::from_static("localapi"));
            if let Some(auth) = &self.inner.auth {
                b = b.header(AUTHORIZATION, auth.clone());
            }
        }
        // INVARIANT: no Referer or Origin header is ever added here.
        b.body(Full::new(Bytes::new()))
            .map_err(|e| LocalApiError::transport(endpoint, format!("invalid request `{pq}`: {e}")))
    }
}

async fn drive<C, E>(conn: C)
where
    C: std::future::Future<Output = Result<(), E>>,
    E: fmt::Display,
{
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "LocalAPI connection ended with an error");
    }
}

async fn read_limited(
    endpoint: &str,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, LocalApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(LocalApiError::decode(
                    endpoint,
                    format!("response body exceeds {limit} bytes"),
                ))
            } else {
                Err(LocalApiError::transport(
                    endpoint,
                    format!("reading the response body: {e}"),
                ))
            }
        }
    }
}

/// A live `watch-ipn-bus` subscription. Pull notifications with [`IpnBusWatcher::next`], or
/// hand the stream to a task with [`IpnBusWatcher::spawn`]. Dropping it closes the connection.
pub struct IpnBusWatcher {
    body: Incoming,
    buf: BytesMut,
    /// Skipping the rest of an over-long line.
    discarding: bool,
    done: bool,
    max_line: usize,
    _sender: SendRequest<Full<Bytes>>,
    conn_task: JoinHandle<()>,
}

impl fmt::Debug for IpnBusWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpnBusWatcher")
            .field("buffered", &self.buf.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Drop for IpnBusWatcher {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}

const BUS: &str = "watch-ipn-bus";

impl IpnBusWatcher {
    /// The next notification. `Some(Err(Decode))` reports a line that did not decode (or was
    /// longer than the limit); the stream goes on after it. `Some(Err(Transport))` reports a
    /// broken connection and is followed by `None`. `None`: the stream ended.
    pub async fn next(&mut self) -> Option<Result<Notify, LocalApiError>> {
        loop {
            if let Some(line) = self.take_line() {
                if line.len() > self.max_line {
                    return Some(Err(LocalApiError::decode(
                        BUS,
                        format!(
                            "a notification line exceeds {} bytes; skipped",
                            self.max_line
                        ),
                    )));
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(serde_json::from_slice::<Notify>(&line).map_err(|e| {
                    LocalApiError::decode(BUS, format!("{e} in line `{}`", preview(&line)))
                }));
            }
            if self.done {
                return None;
            }
            match self.body.frame().await {
                None => {
                    self.done = true;
                    if self.discarding || self.buf.iter().all(u8::is_ascii_whitespace) {
                        return None;
                    }
                    // A last line without its newline.
                    let line = self.buf.split().freeze();
                    return Some(serde_json::from_slice::<Notify>(&line).map_err(|e| {
                        LocalApiError::decode(
                            BUS,
                            format!("{e} in final line `{}`", preview(&line)),
                        )
                    }));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(LocalApiError::transport(
                        BUS,
                        format!("stream broken: {e}"),
                    )));
                }
                Some(Ok(frame)) => {
                    let Ok(mut data) = frame.into_data() else {
                        continue;
                    };
                    if self.discarding {
                        match data.iter().position(|b| *b == b'\n') {
                            Some(i) => {
                                data.advance(i + 1);
                                self.discarding = false;
                            }
                            None => continue,
                        }
                    }
                    self.buf.extend_from_slice(&data);
                    if self.buf.len() > self.max_line && !self.buf.contains(&b'\n') {
                        self.buf.clear();
                        self.discarding = true;
                        return Some(Err(LocalApiError::decode(
                            BUS,
                            format!(
                                "a notification line exceeds {} bytes; skipped",
                                self.max_line
                            ),
                        )));
                    }
                }
            }
        }
    }

    fn take_line(&mut self) -> Option<Bytes> {
        let i = self.buf.iter().position(|b| *b == b'\n')?;
        let mut line = self.buf.split_to(i + 1);
        line.truncate(i);
        Some(line.freeze())
    }

    /// Moves the stream into a task that forwards every item (errors included) into a bounded
    /// channel of `capacity`; the task ends when the stream ends or the receiver is dropped.
    pub fn spawn(mut self, capacity: usize) -> mpsc::Receiver<Result<Notify, LocalApiError>> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    () = tx.closed() => break,
                    item = self.next() => item,
                };
                let Some(item) = item else { break };
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        rx
    }
}

fn preview(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out: String = text.chars().take(80).collect();
    if text.chars().nth(80).is_some() {
        out.push('…');
    }
    out
}

/// The endpoint label of a path: `/localapi/v0/prefs?x` → `prefs`.
fn endpoint_of(pq: &str) -> String {
    let path = pq.split('?').next().unwrap_or(pq);
    path.strip_prefix("/localapi/v0/")
        .unwrap_or(path)
        .to_owned()
}

/// Go's `url.QueryEscape`: unreserved bytes stay, space becomes `+`, the rest `%XX`.
fn query_escape(s: &str) -> String {
    escape(s, true)
}

/// Go's `url.PathEscape` for one segment.
fn path_escape(s: &str) -> String {
    escape(s, false)
}

fn escape(s: &str, query: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            b' ' if query => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
    }
    out
}

/// A Go `time.ParseDuration` string: whole seconds when exact, else milliseconds.
fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Standard base64 with padding (only for the Basic-auth header).
fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b0 = chunk.first().copied().unwrap_or(0);
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let sextet = |shift: u32| char::from(TABLE[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_go() {
        assert_eq!(query_escape("100.64.0.1:1234"), "100.64.0.1%3A1234");
        assert_eq!(
            query_escape("[fd7a:115c:a1e0::1]:443"),
            "%5Bfd7a%3A115c%3Aa1e0%3A%3A1%5D%3A443"
        );
        assert_eq!(query_escape("a b&c"), "a+b%26c");
        assert_eq!(path_escape("host.example.ts.net"), "host.example.ts.net");
        assert_eq!(path_escape("a/b?c"), "a%2Fb%3Fc");
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b":token"), "OnRva2Vu");
    }

    #[test]
    fn durations_for_go() {
        assert_eq!(go_duration(Duration::from_secs(86400)), "86400s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            error_text(b"no match for IP:port\n"),
            "no match for IP:port"
        );
        assert_eq!(error_text(br#"{"error":"boom"}"#), "boom");
        let long = "x".repeat(5000);
        assert!(error_text(long.as_bytes()).len() < 1100);
    }

    #[test]
    fn endpoint_labels() {
        assert_eq!(endpoint_of("/localapi/v0/prefs"), "prefs");
        assert_eq!(endpoint_of("/localapi/v0/status?peers=false"), "status");
    }

    #[test]
    fn cert_pair_split() {
        let pem = "-----BEGIN EC PRIVATE KEY-----\nAAA\n-----END EC PRIVATE KEY-----\n\
                   -----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let p = CertPair::split(pem).unwrap();
        assert!(p.key_pem.ends_with("-----END EC PRIVATE KEY-----\n"));
        assert!(p.cert_chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(CertPair::split("garbage").is_err());
        assert!(!format!("{p:?}").contains("AAA"));
    }
}
