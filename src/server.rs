//! The composition root of `toolgate serve`: listeners, per-connection identity, the router.
//!
//! Identity is resolved once per connection, at accept (DESIGN.md §1 step 2), and rides in
//! every request's extensions as a [`Conn`]. Before any route runs, `Host` and `Origin` are
//! checked against this node's names (invariant I7).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::gateway::{Caller, Conn, Gateway};
use crate::identity::{
    StaticIdentities, from_serve_headers, normalize_ip, strip_tailscale_headers,
};
use crate::mcp::jsonrpc::{self, code};
use crate::mcp::proxy;

/// How many connections one listener serves at once; more wait in the accept backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// A connection that sends no complete request header within this time is closed (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Turns a peer address into a caller, or says why not.
pub trait Identify: Send + Sync + 'static {
    fn identify(
        &self,
        peer: SocketAddr,
    ) -> futures_util::future::BoxFuture<'_, Result<Caller, String>>;
}

/// The static provider (dev, tests, the demo): source IP → identity fixture.
pub struct StaticProvider {
    pub identities: StaticIdentities,
    pub mappings: crate::config::RoleMappings,
}

impl Identify for StaticProvider {
    fn identify(
        &self,
        peer: SocketAddr,
    ) -> futures_util::future::BoxFuture<'_, Result<Caller, String>> {
        let found = self.identities.lookup(normalize_ip(peer.ip())).cloned();
        Box::pin(async move {
            let identity = found.ok_or_else(|| format!("no static identity for {}", peer.ip()))?;
            let principal = identity.principal(&self.mappings);
            Ok(Caller {
                identity,
                principal,
            })
        })
    }
}

/// The HTTP surface: every route, behind the Host/Origin check.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/mcp/{server}",
            post(proxy::post)
                .get(proxy::session_request)
                .delete(proxy::session_request),
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
        .route("/_cerbos/health", get(cerbos_health))
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

/// `GET /api/audit?principal=..&since=2h&limit=50`: the audit query as JSON, itself
/// authorized row by row (resource kind `toolgate_audit`, action `read`, `R.attr.principal` =
/// the row's principal), so "users see their own rows, admins see all" is one policy.
async fn api_audit(
    State(gw): State<Arc<Gateway>>,
    axum::extract::Extension(conn): axum::extract::Extension<Conn>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let Some(caller) = conn.caller.clone() else {
        return forbidden("no verified tailnet identity");
    };
    let pairs = query_pairs(query.as_deref().unwrap_or(""));
    let filter = match crate::audit::query::Filter::from_pairs(pairs) {
        Ok(f) => f,
        Err(e) => {
            let body = serde_json::json!({"error": e}).to_string();
            return (
                StatusCode::BAD_REQUEST,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response();
        }
    };
    let db = gw.config.audit.sqlite.clone();
    let principal = caller.principal.clone();
    let gw2 = gw.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let mut allowed = 0usize;
        let mut denied = 0usize;
        let rows = crate::audit::query::query_authorized(&db, &filter, &mut |row| {
            let mut attr = serde_json::Map::new();
            attr.insert("principal".into(), row.principal.clone().into());
            attr.insert("node".into(), row.node.clone().into());
            attr.insert("server".into(), row.server.clone().into());
            let resource = crate::policy::input::Resource {
                kind: "toolgate_audit".into(),
                id: row.id.clone(),
                attr,
                ..Default::default()
            };
            let ok = gw2
                .decide(&principal, resource, vec!["read".into()])
                .effect("read")
                == crate::policy::model::Effect::Allow;
            if ok {
                allowed += 1;
            } else {
                denied += 1;
            }
            ok
        });
        (rows, allowed, denied)
    })
    .await;
    let (rows, allowed, denied) = match rows {
        Ok(r) => r,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            let body = serde_json::json!({"error": e.to_string()}).to_string();
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response();
        }
    };
    let mut row = crate::gateway::AuditRow::new("check", &conn);
    row.method = "GET /api/audit".into();
    row.action = "read".into();
    row.effect = crate::policy::model::Effect::Allow;
    row.outcome = "answered".into();
    row.reason =
        format!("{allowed} row(s) readable, {denied} withheld by policy toolgate_audit/read");
    row.policy_hash = gw.store.current().hash.clone();
    if gw.submit(row).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "audit unavailable").into_response();
    }
    let body = serde_json::json!({"rows": rows, "withheld": denied}).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `application/x-www-form-urlencoded` query pairs, decoded by the WHATWG URL standard's
/// parser (the `url` crate's): `+` is a space, `%XX` a byte, and a `%` not followed by two hex
/// digits stays literal (`%+A` is `%`, ` `, `A`, never a byte made from `+A`).
fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The router of the optional loopback metrics listener (`metrics.listen`): no identity.
pub fn metrics_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(gw): State<Arc<Gateway>>| async move { metrics_text(&gw) }),
        )
        .with_state(gw)
}

async fn cerbos_health() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"SERVING\"}",
    )
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

fn forbidden(msg: &str) -> Response {
    let body = jsonrpc::error_body(None, code::UNIDENTIFIED, &format!("forbidden: {msg}"), None);
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves one listener until `shutdown` turns true; waits for open connections to finish.
///
/// Identity is resolved once per connection from the TCP peer, before anything else (and
/// before the TLS handshake when `tls` is given: [`crate::tailnet::tls::acceptor`]). Every
/// request then carries that [`Conn`]; `Tailscale-*` headers sent by the client are removed
/// before routing (headers never create identity on this listener, invariant I1).
pub async fn serve_listener(
    listener: TcpListener,
    app: Router,
    identify: Arc<dyn Identify>,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) {
    let conn_shutdown = shutdown.clone();
    accept_loop(
        listener,
        shutdown,
        move |stream: TcpStream, peer, permit| {
            let app = app.clone();
            let identify = identify.clone();
            let tls = tls.clone();
            let shutdown = conn_shutdown.clone();
            async move {
                let _permit = permit;
                let _ = stream.set_nodelay(true);
                let conn = match identify.identify(peer).await {
                    Ok(caller) => Conn {
                        peer,
                        caller: Some(Arc::new(caller)),
                        unidentified: None,
                    },
                    Err(why) => {
                        tracing::info!(%peer, "unidentified connection: {why}");
                        Conn {
                            peer,
                            caller: None,
                            unidentified: Some(why),
                        }
                    }
                };
                let source = RequestIdentity::Fixed(conn);
                match tls {
                    None => serve_io(stream, peer, source, app, shutdown).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(tls_stream)) => {
                                serve_io(tls_stream, peer, source, app, shutdown).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
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
        Ok(Caller {
            identity,
            principal,
        })
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
                serve_io(stream, peer, source, app, shutdown).await;
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
        move |stream: UnixStream, peer, permit| {
            let app = app.clone();
            let source = RequestIdentity::Serve {
                provider: provider.clone(),
                tcp: false,
            };
            let shutdown = conn_shutdown.clone();
            async move {
                let _permit = permit;
                serve_io(stream, peer, source, app, shutdown).await;
            }
        },
    )
    .await;
}

/// How a connection's requests get their [`Conn`].
enum RequestIdentity {
    /// Resolved once at accept (tailnet listeners).
    Fixed(Conn),
    /// From each request's `tailscale serve` headers (serve listeners only).
    Serve {
        provider: Arc<ServeHeaderProvider>,
        tcp: bool,
    },
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

/// Accepts until `shutdown` (at most [`MAX_CONNECTIONS`] at once), handing each connection
/// to `handle`; then waits for every connection task to finish.
async fn accept_loop<L, F, Fut>(listener: L, mut shutdown: watch::Receiver<bool>, handle: F)
where
    L: Accept,
    F: Fn(L::Io, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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

/// Serves HTTP/1 and HTTP/2 on one connection until it ends or `shutdown` (graceful).
async fn serve_io<I>(
    io: I,
    peer: SocketAddr,
    source: RequestIdentity,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let conn = match &source {
                RequestIdentity::Fixed(conn) => conn.clone(),
                RequestIdentity::Serve { provider, tcp } => {
                    provider.conn(peer, *tcp, req.headers())
                }
            };
            // Invariant I1: client-sent Tailscale-* headers never reach a route.
            strip_tailscale_headers(req.headers_mut());
            req.extensions_mut().insert(conn);
            app.clone().oneshot(req.map(Body::new))
        });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(HEADER_TIMEOUT)
        .timer(hyper_util::rt::TokioTimer::new());
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    tokio::select! {
        r = served.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
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
