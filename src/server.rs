//! The composition root of `toolgate serve`: listeners, per-connection identity, the router.
//!
//! Identity is resolved per connection, at accept (DESIGN.md §1 step 2), and again before a
//! request once the resolver's generation changed (a netmap or tag change) or the identity is
//! older than `identity.max_age`; it rides in every request's extensions as a [`Conn`]. Before
//! any route runs, `Host` and `Origin` are checked against this node's names (invariant I7).
//!
//! Connections are bounded before and after identity (invariant I5; [`ConnLimits`]): every
//! connection must finish its TLS handshake and send enough bytes to tell HTTP/1 from HTTP/2
//! within a first-byte deadline; connections whose WhoIs is still pending, and connections that
//! have no identity, each have a small cap of their own (over it they are closed at once); an
//! identified caller has a per-identity cap keyed on its WhoIs identity, never on the address
//! (in userspace mode every peer arrives from 127.0.0.1). A connection with no identity gets
//! its 403 and is then closed, and lives at most `unidentified_deadline` in all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

pub use crate::caller::{Identify, StaticProvider};
use crate::gateway::{Caller, Conn, Gateway};
use crate::identity::{from_serve_headers, normalize_ip, strip_tailscale_headers};
use crate::read_api::{forbidden, may_read, query_pairs};

/// How many connections one listener serves at once; more wait in the accept backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// A connection that sends no complete request header within this time is closed (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that have been accepted and are waiting for their WhoIs answer, at most.
pub const MAX_PENDING_IDENTITY: usize = 1024;
/// Connections with no identity (waiting to be told 403), at most.
pub const MAX_UNIDENTIFIED: usize = 64;
/// Connections of one identity (WhoIs node, else principal), at most.
pub const MAX_PER_IDENTITY: usize = 256;
/// A connection that has not finished its TLS handshake and sent enough bytes to tell HTTP/1
/// from HTTP/2 within this time is closed.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no identity is closed after this, whatever it is doing.
pub const UNIDENTIFIED_DEADLINE: Duration = Duration::from_secs(10);

/// The bounds on one listener's connections (invariant I5). [`ConnLimits::default`] holds
/// the constants above.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Connections served at once, all kinds; more wait in the accept backlog.
    pub max_connections: usize,
    /// Connections whose WhoIs is in flight; over it a new connection is closed at once.
    pub max_pending_identity: usize,
    /// Connections with no identity; over it such a connection is closed at once.
    pub max_unidentified: usize,
    /// Connections of one identity; over it a new one of that identity is closed at once.
    pub max_per_identity: usize,
    /// TLS handshake plus the first bytes of HTTP (protocol detection).
    pub first_byte_timeout: Duration,
    /// Request head (HTTP/1; hyper's header read timeout, also between kept-alive requests).
    pub header_timeout: Duration,
    /// Whole lifetime of a connection with no identity.
    pub unidentified_deadline: Duration,
    /// `identity.max_age`: re-resolve the caller of an open connection after this.
    pub identity_max_age: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: MAX_CONNECTIONS,
            max_pending_identity: MAX_PENDING_IDENTITY,
            max_unidentified: MAX_UNIDENTIFIED,
            max_per_identity: MAX_PER_IDENTITY,
            first_byte_timeout: FIRST_BYTE_TIMEOUT,
            header_timeout: HEADER_TIMEOUT,
            unidentified_deadline: UNIDENTIFIED_DEADLINE,
            identity_max_age: crate::config::DEFAULT_MAX_AGE,
        }
    }
}

/// Counters of a listener's admission decisions (for tests and logs).
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Closed at once: too many connections waiting for their WhoIs.
    pub refused_pending: AtomicU64,
    /// Closed at once: too many connections with no identity.
    pub refused_unidentified: AtomicU64,
    /// Closed at once: the identity already has `max_per_identity` connections.
    pub refused_per_identity: AtomicU64,
    /// Closed: no TLS handshake or no HTTP bytes within `first_byte_timeout`.
    pub first_byte_timeouts: AtomicU64,
    /// Closed: a connection with no identity outlived `unidentified_deadline`.
    pub unidentified_deadlines: AtomicU64,
    /// Callers re-resolved on an open connection (generation change or `max_age`).
    pub re_resolved: AtomicU64,
}

/// The HTTP surface: every route, behind the Host/Origin check.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/mcp/{server}",
            post(crate::mcp::request::post)
                .get(crate::mcp::request::session_request)
                .delete(crate::mcp::request::session_request),
        )
        .route(
            "/mcp",
            post(crate::mcp::multi::post)
                .get(crate::mcp::multi::session_request)
                .delete(crate::mcp::multi::session_request),
        )
        .route("/metrics", get(metrics))
        .route("/api/audit", get(api_audit))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(crate::pdp::http::routes())
        .merge(crate::hook::http::routes(&gw))
        .merge(crate::dashboard::routes())
        .layer(middleware::from_fn_with_state(gw.clone(), host_guard))
        .with_state(gw)
}

async fn healthz() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}",
    )
}

/// Ready: policies loaded, audit store writable, tailscaled reachable (when used).
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let policies = !gw.store.current().is_empty();
    let audit = gw.audit.writable();
    let tailscaled = match &gw.localapi {
        None => Ok(()),
        Some(api) => match tokio::time::timeout(Duration::from_secs(2), api.status()).await {
            Ok(Ok(s)) if s.is_running() => Ok(()),
            Ok(Ok(s)) => Err(format!("backend state {}", s.backend_state.as_str())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("status timed out".to_string()),
        },
    };
    let ready = policies && audit.is_ok() && tailscaled.is_ok();
    let body = serde_json::json!({
        "ready": ready,
        "policies_loaded": policies,
        "policy_snapshot": gw.store.current().hash.get(..12),
        "audit_writable": audit.is_ok(),
        "audit_error": audit.err(),
        "tailscaled_reachable": tailscaled.is_ok(),
        "tailscaled_error": tailscaled.err(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `/metrics` on a main listener: gated by policy (kind `toolgate_metrics`, action `read`).
async fn metrics(
    State(gw): State<Arc<Gateway>>,
    axum::extract::Extension(conn): axum::extract::Extension<Conn>,
) -> Response {
    let Some(caller) = conn.caller.clone() else {
        return forbidden("no verified tailnet identity");
    };
    let resource = crate::policy::input::Resource {
        kind: "toolgate_metrics".into(),
        id: "metrics".into(),
        ..Default::default()
    };
    let d = gw.decide(&caller.principal, resource, vec!["read".into()]);
    let mut row = crate::gateway::AuditRow::new("check", &conn).decided(&d, "read");
    row.method = "GET /metrics".into();
    let allowed = row.effect == crate::policy::model::Effect::Allow;
    row.outcome = if allowed {
        "answered".into()
    } else {
        "denied".into()
    };
    if gw.submit(row).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "audit unavailable").into_response();
    }
    if !allowed {
        return forbidden(
            "metrics are not readable by this identity (policy toolgate_metrics/read)",
        );
    }
    metrics_text(&gw)
}

fn metrics_text(gw: &Gateway) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.prometheus(),
    )
        .into_response()
}

/// `GET /api/audit?principal=..&since=2h&limit=50&cursor=..`: one page of the audit query as
/// JSON, itself authorized row by row (resource kind `toolgate_audit`, action `read`,
/// `R.attr.principal` = the row's principal), so "users see their own rows, admins see all" is
/// one policy.
///
/// Pages hold the newest matching rows first: `limit` rows (default
/// [`DEFAULT_PAGE_LIMIT`](crate::audit::query::DEFAULT_PAGE_LIMIT); above
/// [`MAX_PAGE_LIMIT`](crate::audit::query::MAX_PAGE_LIMIT) is a 400), and `next`, the cursor of
/// the following page (`null` once no row is left). The answer
/// `{"rows": [...], "withheld": N, "next": ...}` is streamed as rows are read, never built
/// whole, and a page examines at most `PAGE_SCAN_BUDGET` rows (a short page then still has a
/// `next`). The request is audited before any row is sent.
async fn api_audit(
    State(gw): State<Arc<Gateway>>,
    axum::extract::Extension(conn): axum::extract::Extension<Conn>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    use crate::audit::query::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, PAGE_SCAN_BUDGET};
    let Some(caller) = conn.caller.clone() else {
        return forbidden("no verified tailnet identity");
    };
    let bad_request = |e: String| {
        let body = serde_json::json!({"error": e}).to_string();
        (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    };
    let pairs = query_pairs(query.as_deref().unwrap_or(""));
    let mut filter = match crate::audit::query::Filter::from_pairs(pairs) {
        Ok(f) => f,
        Err(e) => return bad_request(e),
    };
    let limit = filter.limit.take().unwrap_or(DEFAULT_PAGE_LIMIT);
    if limit == 0 || limit > MAX_PAGE_LIMIT {
        return bad_request(format!(
            "limit: {limit} is outside 1..={MAX_PAGE_LIMIT}; read more rows by following `next`"
        ));
    }
    let db = gw.config.audit.sqlite.clone();
    let reader =
        match tokio::task::spawn_blocking(move || crate::audit::query::Reader::open(&db)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let body = serde_json::json!({"error": e.to_string()}).to_string();
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response();
            }
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        };
    let mut row = crate::gateway::AuditRow::new("check", &conn);
    row.method = "GET /api/audit".into();
    row.action = "read".into();
    row.effect = crate::policy::model::Effect::Allow;
    row.outcome = "answered".into();
    row.reason = format!(
        "a page of up to {limit} row(s){}, each authorized by policy toolgate_audit/read",
        if filter.before.is_some() {
            " after a cursor"
        } else {
            ""
        }
    );
    row.policy_hash = gw.store.current().hash.clone();
    if gw.submit(row).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "audit unavailable").into_response();
    }
    let principal = caller.principal.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        stream_page(
            &gw,
            &reader,
            &filter,
            &principal,
            limit,
            PAGE_SCAN_BUDGET,
            &tx,
        )
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Writes one `/api/audit` page to `tx` in chunks of about [`PAGE_CHUNK`] bytes. A store
/// error after the first byte cannot become a status any more: it ends the body with an
/// error, so the client sees a broken answer, never a short one that parses.
fn stream_page(
    gw: &Gateway,
    reader: &crate::audit::query::Reader,
    filter: &crate::audit::query::Filter,
    principal: &crate::policy::input::Principal,
    limit: usize,
    budget: usize,
    tx: &tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(PAGE_CHUNK + 4096);
    buf.extend_from_slice(b"{\"rows\":[");
    let mut first = true;
    let mut gone = false;
    let send = |buf: &mut Vec<u8>| -> bool {
        let chunk = bytes::Bytes::from(std::mem::take(buf));
        tx.blocking_send(Ok(chunk)).is_ok()
    };
    let mut keep = |row: &crate::audit::record::Row| may_read(gw, principal, row);
    let mut emit = |row: crate::audit::record::Row| {
        if !first {
            buf.push(b',');
        }
        first = false;
        let written = if filter.shadow_diff {
            match crate::audit::shadow::ShadowDiff::from_row(&row) {
                Some(d) => serde_json::to_writer(&mut buf, &d),
                None => serde_json::to_writer(&mut buf, &row),
            }
        } else {
            serde_json::to_writer(&mut buf, &row)
        };
        if written.is_err() {
            return false;
        }
        if buf.len() >= PAGE_CHUNK && !send(&mut buf) {
            gone = true;
            return false;
        }
        true
    };
    let end = reader.page(filter, limit, budget, &mut keep, &mut emit);
    if gone {
        return;
    }
    match end {
        Ok(end) => {
            let tail = serde_json::json!({
                "withheld": end.withheld,
                "next": end.next.map(|c| c.to_string()),
            });
            // `{"withheld":..,"next":..}` minus its opening brace closes the object.
            let tail = tail.to_string();
            buf.extend_from_slice(b"],");
            buf.extend_from_slice(tail.get(1..).unwrap_or("}").as_bytes());
            send(&mut buf);
        }
        Err(e) => {
            tracing::warn!(error = %e, "/api/audit: the store failed mid-answer");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    }
}

/// Bytes of `/api/audit` answer gathered before they are sent on.
const PAGE_CHUNK: usize = 64 * 1024;

/// The router of the optional loopback metrics listener (`metrics.listen`): no identity.
pub fn metrics_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(gw): State<Arc<Gateway>>| async move { metrics_text(&gw) }),
        )
        .with_state(gw)
}

/// Invariant I7: a `Host` that is not this node, or a foreign `Origin`, is refused first.
async fn host_guard(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    if !gw.allowed_hosts.is_empty() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        let why = if !host_allowed(&gw.allowed_hosts, host) {
            Some(format!("Host {host:?} is not this node"))
        } else {
            origin
                .filter(|o| !host_allowed(&gw.allowed_hosts, o.split("://").nth(1).unwrap_or("")))
                .map(|o| format!("Origin {o:?} is not this node"))
        };
        if let Some(why) = why {
            // Audited like every refusal; nothing else runs.
            let mut decision = String::new();
            if let Some(conn) = req.extensions().get::<Conn>() {
                let mut row = crate::gateway::AuditRow::new("mcp", conn);
                row.method = format!("{} {}", req.method(), req.uri().path());
                row.outcome = "refused_host".into();
                row.reason = format!("forbidden: {why}");
                decision = row.id.clone();
                let _ = gw.submit(row);
            }
            let mut r = forbidden(&why);
            if let Ok(v) = HeaderValue::from_str(&decision) {
                r.headers_mut()
                    .insert(crate::mcp::proxy::DECISION_HEADER, v);
            }
            return r;
        }
    }
    next.run(req).await
}

/// `host[:port]` against the allowed names (case-insensitive, port ignored).
pub fn host_allowed(allowed: &[String], host: &str) -> bool {
    let h = host.trim().to_ascii_lowercase();
    let name = if h.starts_with('[') {
        h.split(']')
            .next()
            .map(|s| format!("{s}]"))
            .unwrap_or_default()
    } else {
        h.rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map(|(n, _)| n.to_string())
            .unwrap_or(h.clone())
    };
    let name = name.trim_end_matches('.');
    !name.is_empty() && allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Serves one listener until `shutdown` turns true, with the default [`ConnLimits`].
pub async fn serve_listener(
    listener: TcpListener,
    app: Router,
    identify: Arc<dyn Identify>,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) {
    serve_listener_with(
        listener,
        app,
        identify,
        tls,
        ConnLimits::default(),
        Arc::new(ConnStats::default()),
        shutdown,
    )
    .await;
}

/// Serves one listener until `shutdown` turns true; waits for open connections to finish.
///
/// Identity is resolved per connection from the TCP peer, before anything else (and before
/// the TLS handshake when `tls` is given: [`crate::tailnet::tls::acceptor`]), then again
/// before a request when the resolver's generation changed or `limits.identity_max_age`
/// passed. Every request carries the current [`Conn`]; `Tailscale-*` headers sent by the
/// client are removed before routing (headers never create identity on this listener,
/// invariant I1). `limits` bounds connections before and after identity (module header).
pub async fn serve_listener_with(
    listener: TcpListener,
    app: Router,
    identify: Arc<dyn Identify>,
    tls: Option<TlsAcceptor>,
    limits: ConnLimits,
    stats: Arc<ConnStats>,
    shutdown: watch::Receiver<bool>,
) {
    let conn_shutdown = shutdown.clone();
    let admission = Arc::new(Admission::new(&limits, stats));
    let max_connections = limits.max_connections;
    let limits = Arc::new(limits);
    accept_loop(
        listener,
        shutdown,
        max_connections,
        move |stream: TcpStream, peer, permit| {
            let app = app.clone();
            let identify = identify.clone();
            let tls = tls.clone();
            let shutdown = conn_shutdown.clone();
            let admission = admission.clone();
            let limits = limits.clone();
            async move {
                let _permit = permit;
                admission.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                // Waiting for WhoIs: a small cap, over it closed at once (the lookup itself
                // is bounded in time and concurrency by the resolver).
                let Ok(pending) = admission.pending.clone().try_acquire_owned() else {
                    admission.stats.refused_pending.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "closed: too many connections waiting for identity");
                    return;
                };
                let generation = identify.generation();
                let resolved = identify.identify(peer).await;
                drop(pending);
                let (conn, slot) = match resolved {
                    Ok(caller) => {
                        let key = identity_key(&caller);
                        let Some(slot) = admission.enter(&key) else {
                            admission
                                .stats
                                .refused_per_identity
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                %peer,
                                identity = %key,
                                limit = limits.max_per_identity,
                                "closed: this identity has too many open connections"
                            );
                            return;
                        };
                        let conn = Conn {
                            peer,
                            caller: Some(Arc::new(caller)),
                            unidentified: None,
                        };
                        (
                            conn,
                            Slot {
                                _identity: Some(slot),
                                _unidentified: None,
                            },
                        )
                    }
                    Err(why) => {
                        let Ok(permit) = admission.unidentified.clone().try_acquire_owned() else {
                            admission
                                .stats
                                .refused_unidentified
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "closed: too many connections with no identity: {why}");
                            return;
                        };
                        tracing::info!(%peer, "unidentified connection: {why}");
                        let conn = Conn {
                            peer,
                            caller: None,
                            unidentified: Some(why),
                        };
                        (
                            conn,
                            Slot {
                                _identity: None,
                                _unidentified: Some(permit),
                            },
                        )
                    }
                };
                let unidentified = slot._unidentified.is_some();
                let source = RequestIdentity::Tailnet(Arc::new(TailnetIdentity {
                    identify,
                    peer,
                    max_age: limits.identity_max_age,
                    stats: admission.stats.clone(),
                    current: tokio::sync::Mutex::new(Resolved {
                        conn,
                        at: Instant::now(),
                        generation,
                    }),
                    close: Notify::new(),
                }));
                let serve = async {
                    // One deadline for the TLS handshake and the first HTTP bytes together.
                    let deadline = tokio::time::Instant::now() + limits.first_byte_timeout;
                    let served = match tls {
                        None => {
                            detect_and_serve(stream, deadline, peer, source, app, &limits, shutdown)
                                .await
                        }
                        Some(acceptor) => {
                            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                                Ok(Ok(tls_stream)) => {
                                    detect_and_serve(
                                        tls_stream, deadline, peer, source, app, &limits, shutdown,
                                    )
                                    .await
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    Ok(())
                                }
                                Err(_) => Err(FirstByteTimeout),
                            }
                        }
                    };
                    if served.is_err() {
                        admission
                            .stats
                            .first_byte_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            %peer,
                            "closed: no TLS handshake or HTTP bytes within the first-byte timeout"
                        );
                    }
                };
                if unidentified {
                    if tokio::time::timeout(limits.unidentified_deadline, serve)
                        .await
                        .is_err()
                    {
                        admission
                            .stats
                            .unidentified_deadlines
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "closed: a connection with no identity outlived its deadline");
                    }
                } else {
                    serve.await;
                }
                drop(slot);
            }
        },
    )
    .await;
}

/// The bound on a TLS handshake after accept.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = crate::tailnet::tls::HANDSHAKE_TIMEOUT;

/// `identity.serve_listen`: identity from `tailscale serve`'s headers, per request (serve's
/// reverse proxy reuses one backend connection for many callers). Used ONLY on an opt-in
/// listener that only `tailscale serve` reaches (reference/tailscale.md §3.3): a unix socket,
/// or a loopback TCP port when tailscaled runs with a TUN device ([`parse_serve_listen`]).
#[derive(Debug, Clone)]
pub struct ServeHeaderProvider {
    /// This node's tailnet name (`attr.tailnet`).
    pub tailnet: String,
    /// The app capability to read from `Tailscale-App-Capabilities`.
    pub capability: String,
    pub mappings: crate::config::RoleMappings,
}

impl ServeHeaderProvider {
    /// The caller one request's headers assert. `peer` is the TCP peer (`None` on a unix
    /// socket); a non-loopback TCP peer is refused whatever it sends.
    pub fn identify_request(
        &self,
        peer: Option<SocketAddr>,
        headers: &axum::http::HeaderMap,
    ) -> Result<Caller, String> {
        if let Some(p) = peer {
            if !normalize_ip(p.ip()).is_loopback() {
                return Err(format!(
                    "tailscale serve headers are trusted only from a loopback peer, not {p}"
                ));
            }
        }
        let identity = from_serve_headers(headers, &self.tailnet, &self.capability)?;
        let principal = identity.principal(&self.mappings);
        Ok(Caller::new(identity, principal))
    }

    fn conn(&self, peer: SocketAddr, tcp: bool, headers: &axum::http::HeaderMap) -> Conn {
        match self.identify_request(tcp.then_some(peer), headers) {
            Ok(caller) => Conn {
                peer,
                caller: Some(Arc::new(caller)),
                unidentified: None,
            },
            Err(why) => {
                tracing::info!(%peer, "unidentified request on the serve listener: {why}");
                Conn {
                    peer,
                    caller: None,
                    unidentified: Some(why),
                }
            }
        }
    }
}

/// Where an `identity.serve_listen` entry listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeListen {
    /// A loopback TCP address.
    Tcp(SocketAddr),
    /// A unix socket path (`unix:/run/toolgate/serve.sock`); point serve at it with
    /// `tailscale serve --https=443 unix:/run/toolgate/serve.sock`.
    Unix(std::path::PathBuf),
}

/// Parses an `identity.serve_listen` entry and applies the trust rule: unix sockets always;
/// TCP only on a loopback address and only when tailscaled has a TUN device (`tun` =
/// `Status.TUN`). In userspace-networking mode tailscaled forwards inbound tailnet
/// connections to `127.0.0.1:<port>` (reference/tailnet-lab.md finding 2), so any tailnet
/// peer the ACL lets in could reach a loopback serve listener directly and forge the headers.
pub fn parse_serve_listen(entry: &str, tun: bool) -> Result<ServeListen, String> {
    if let Some(path) = entry.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(format!(
                "identity.serve_listen {entry:?}: empty socket path"
            ));
        }
        return Ok(ServeListen::Unix(path.into()));
    }
    let addr: SocketAddr = entry.parse().map_err(|_| {
        format!("identity.serve_listen {entry:?}: expected `127.0.0.1:PORT`, `[::1]:PORT` or `unix:/path`")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "identity.serve_listen {entry:?}: tailscale serve headers are trusted only on a \
             loopback address or a unix socket"
        ));
    }
    if !tun {
        return Err(format!(
            "identity.serve_listen {entry:?}: tailscaled runs in userspace-networking mode, \
             where tailnet peers also arrive on 127.0.0.1 and could forge the serve headers; \
             use a unix socket (`unix:/path`) instead"
        ));
    }
    Ok(ServeListen::Tcp(addr))
}

/// Serves an `identity.serve_listen` TCP listener (loopback only, see [`parse_serve_listen`]):
/// every request's identity comes from its `tailscale serve` headers, then those headers are
/// removed before routing.
pub async fn serve_headers_listener(
    listener: TcpListener,
    app: Router,
    provider: Arc<ServeHeaderProvider>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if !local.ip().is_loopback() {
        return Err(format!(
            "refusing to take tailscale serve headers on {local}: not a loopback address"
        ));
    }
    let conn_shutdown = shutdown.clone();
    accept_loop(
        listener,
        shutdown,
        MAX_CONNECTIONS,
        move |stream: TcpStream, peer, permit| {
            let app = app.clone();
            let source = RequestIdentity::Serve {
                provider: provider.clone(),
                tcp: true,
            };
            let shutdown = conn_shutdown.clone();
            async move {
                let _permit = permit;
                let _ = stream.set_nodelay(true);
                serve_io(stream, peer, source, app, &ConnLimits::default(), shutdown).await;
            }
        },
    )
    .await;
    Ok(())
}

/// Serves an `identity.serve_listen` unix socket: like [`serve_headers_listener`]; the socket
/// file's permissions decide who may connect (make it reachable only by tailscaled's user).
pub async fn serve_headers_unix_listener(
    listener: UnixListener,
    app: Router,
    provider: Arc<ServeHeaderProvider>,
    shutdown: watch::Receiver<bool>,
) {
    let conn_shutdown = shutdown.clone();
    accept_loop(
        listener,
        shutdown,
        MAX_CONNECTIONS,
        move |stream: UnixStream, peer, permit| {
            let app = app.clone();
            let source = RequestIdentity::Serve {
                provider: provider.clone(),
                tcp: false,
            };
            let shutdown = conn_shutdown.clone();
            async move {
                let _permit = permit;
                serve_io(stream, peer, source, app, &ConnLimits::default(), shutdown).await;
            }
        },
    )
    .await;
}

/// How a connection's requests get their [`Conn`].
enum RequestIdentity {
    /// From the TCP peer's WhoIs, re-resolved when stale (tailnet listeners).
    Tailnet(Arc<TailnetIdentity>),
    /// From each request's `tailscale serve` headers (serve listeners only).
    Serve {
        provider: Arc<ServeHeaderProvider>,
        tcp: bool,
    },
}

/// A tailnet connection's caller, as last resolved.
struct TailnetIdentity {
    identify: Arc<dyn Identify>,
    peer: SocketAddr,
    max_age: Duration,
    stats: Arc<ConnStats>,
    /// Held across a re-resolution, so concurrent HTTP/2 streams resolve once.
    current: tokio::sync::Mutex<Resolved>,
    /// Signalled once a request was answered with no identity: the connection closes.
    close: Notify,
}

struct Resolved {
    conn: Conn,
    at: Instant,
    generation: u64,
}

impl TailnetIdentity {
    /// The caller for the next request: the last answer while it is fresh (same resolver
    /// generation, younger than `max_age`), else a new resolution through the resolver
    /// (whose cache a netmap change already flushed). A failed re-resolution leaves the
    /// connection with no identity.
    async fn conn(&self) -> Conn {
        let mut cur = self.current.lock().await;
        let generation = self.identify.generation();
        if generation == cur.generation && cur.at.elapsed() < self.max_age {
            return cur.conn.clone();
        }
        self.stats.re_resolved.fetch_add(1, Ordering::Relaxed);
        let conn = match self.identify.identify(self.peer).await {
            Ok(caller) => Conn {
                peer: self.peer,
                caller: Some(Arc::new(caller)),
                unidentified: None,
            },
            Err(why) => {
                tracing::info!(peer = %self.peer, "connection lost its identity: {why}");
                Conn {
                    peer: self.peer,
                    caller: None,
                    unidentified: Some(why),
                }
            }
        };
        *cur = Resolved {
            conn: conn.clone(),
            at: Instant::now(),
            generation,
        };
        conn
    }
}

/// What a connection holds while it is served (given back on drop).
struct Slot {
    _identity: Option<IdentitySlot>,
    _unidentified: Option<OwnedSemaphorePermit>,
}

/// Per-listener admission state: the pending and no-identity caps, per-identity counts.
struct Admission {
    pending: Arc<Semaphore>,
    unidentified: Arc<Semaphore>,
    per_identity: Arc<Mutex<HashMap<String, usize>>>,
    max_per_identity: usize,
    stats: Arc<ConnStats>,
}

impl Admission {
    fn new(limits: &ConnLimits, stats: Arc<ConnStats>) -> Admission {
        Admission {
            pending: Arc::new(Semaphore::new(limits.max_pending_identity)),
            unidentified: Arc::new(Semaphore::new(limits.max_unidentified)),
            per_identity: Arc::new(Mutex::new(HashMap::new())),
            max_per_identity: limits.max_per_identity,
            stats,
        }
    }

    /// One more connection of `key`, unless it already has `max_per_identity`.
    fn enter(&self, key: &str) -> Option<IdentitySlot> {
        let mut map = self
            .per_identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(key.to_owned()).or_insert(0);
        if *n >= self.max_per_identity {
            return None;
        }
        *n += 1;
        Some(IdentitySlot {
            map: self.per_identity.clone(),
            key: key.to_owned(),
        })
    }
}

/// One identity's connection count, given back on drop.
struct IdentitySlot {
    map: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// The key of the per-identity cap: the WhoIs node (its stable id), else the principal.
/// Never the address: in userspace mode every peer arrives from 127.0.0.1.
fn identity_key(caller: &Caller) -> String {
    if caller.identity.node_id.is_empty() {
        format!("principal:{}", caller.principal.id)
    } else {
        format!("node:{}", caller.identity.node_id)
    }
}

/// No TLS handshake, or not enough HTTP bytes to pick the protocol, before the deadline.
struct FirstByteTimeout;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the bytes tell HTTP/1 from HTTP/2 (they leave the HTTP/2 preface, or are all
/// of it), bounded by `deadline` (hyper's own detection has no timeout), then serves the
/// connection with those bytes put back in front. A peer that closes first is just dropped.
async fn detect_and_serve<I>(
    mut io: I,
    deadline: tokio::time::Instant,
    peer: SocketAddr,
    source: RequestIdentity,
    app: Router,
    limits: &ConnLimits,
    shutdown: watch::Receiver<bool>,
) -> Result<(), FirstByteTimeout>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let read = async {
        let mut buf = Vec::with_capacity(H2_PREFACE.len());
        loop {
            let mut chunk = [0u8; 24];
            let want = H2_PREFACE.len() - buf.len();
            let n = io.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(&buf) {
                return Ok(Some(buf));
            }
        }
    };
    let prefix = match tokio::time::timeout_at(deadline, read).await {
        Err(_) => return Err(FirstByteTimeout),
        Ok(Err(_)) | Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(prefix))) => prefix,
    };
    let io = Prefixed {
        prefix: bytes::Bytes::from(prefix),
        io,
    };
    serve_io(io, peer, source, app, limits, shutdown).await;
    Ok(())
}

/// An IO whose first reads return `prefix` (bytes already read for protocol detection).
struct Prefixed<I> {
    prefix: bytes::Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A listener the accept loop can take connections from.
trait Accept: Send + 'static {
    type Io: Send + 'static;
    fn accept_conn(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Io, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;
    async fn accept_conn(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        self.accept().await
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;
    async fn accept_conn(&self) -> std::io::Result<(UnixStream, SocketAddr)> {
        // A unix peer has no IP address; it is recorded as loopback port 0.
        let (s, _) = self.accept().await?;
        Ok((s, SocketAddr::from(([127, 0, 0, 1], 0))))
    }
}

/// Accepts until `shutdown` (at most `max_connections` at once), handing each connection
/// to `handle`; then waits for every connection task to finish.
async fn accept_loop<L, F, Fut>(
    listener: L,
    mut shutdown: watch::Receiver<bool>,
    max_connections: usize,
    handle: F,
) where
    L: Accept,
    F: Fn(L::Io, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (io, peer) = tokio::select! {
            r = listener.accept_conn() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        tasks.spawn(handle(io, peer, permit));
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Serves HTTP/1 and HTTP/2 on one connection until it ends or `shutdown` (graceful). A
/// request answered with no identity ends the connection once the answer is out.
async fn serve_io<I>(
    io: I,
    peer: SocketAddr,
    source: RequestIdentity,
    app: Router,
    limits: &ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let tailnet = match &source {
        RequestIdentity::Tailnet(t) => Some(t.clone()),
        RequestIdentity::Serve { .. } => None,
    };
    let source = Arc::new(source);
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let source = source.clone();
            let app = app.clone();
            async move {
                let conn = match &*source {
                    RequestIdentity::Tailnet(t) => t.conn().await,
                    RequestIdentity::Serve { provider, tcp } => {
                        provider.conn(peer, *tcp, req.headers())
                    }
                };
                let unidentified = conn.caller.is_none();
                // Invariant I1: client-sent Tailscale-* headers never reach a route.
                strip_tailscale_headers(req.headers_mut());
                req.extensions_mut().insert(conn);
                let resp = app.oneshot(req.map(Body::new)).await;
                if unidentified {
                    if let RequestIdentity::Tailnet(t) = &*source {
                        t.close.notify_one();
                    }
                }
                resp
            }
        });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(limits.header_timeout)
        .timer(hyper_util::rt::TokioTimer::new());
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    let closed = async {
        match &tailnet {
            Some(t) => t.close.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(closed);
    tokio::select! {
        r = served.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = shutdown.changed() => {}
        _ = closed.as_mut() => {
            tracing::debug!(%peer, "closing after answering a request with no identity");
        }
    }
    served.as_mut().graceful_shutdown();
    let _ = served.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let allowed = vec![
            "toolgate.example.ts.net".to_string(),
            "toolgate".into(),
            "100.64.0.1".into(),
            "[fd7a:115c:a1e0::1]".into(),
        ];
        assert!(host_allowed(&allowed, "toolgate.example.ts.net"));
        assert!(host_allowed(&allowed, "TOOLGATE.example.ts.net.:443"));
        assert!(host_allowed(&allowed, "toolgate:8443"));
        assert!(host_allowed(&allowed, "100.64.0.1:443"));
        assert!(host_allowed(&allowed, "[fd7a:115c:a1e0::1]:443"));
        assert!(!host_allowed(&allowed, "evil.example.com"));
        assert!(!host_allowed(&allowed, "toolgate.example.ts.net.evil.com"));
        assert!(!host_allowed(&allowed, ""));
    }

    #[test]
    fn query_strings_decode_by_the_form_rules() {
        let pairs = query_pairs("principal=a%+Ab&node=x%41y&server=a+b&tool=%zz&&effect=%2");
        assert_eq!(
            pairs,
            [
                // `%+A` is not an escape: `from_str_radix("+A", 16)` made it a newline before.
                ("principal".to_string(), "a% Ab".to_string()),
                ("node".into(), "xAy".into()),
                ("server".into(), "a b".into()),
                ("tool".into(), "%zz".into()),
                ("effect".into(), "%2".into()),
            ]
        );
    }
}
