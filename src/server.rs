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
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use crate::gateway::{Caller, Conn, Gateway};
use crate::identity::{StaticIdentities, normalize_ip};
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

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let policies = !gw.store.current().is_empty();
    let body = serde_json::json!({"policies_loaded": policies});
    let status = if policies {
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
        if !host_allowed(&gw.allowed_hosts, host) {
            return forbidden(&format!("Host {host:?} is not this node"));
        }
        if let Some(origin) = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
        {
            let origin_host = origin.split("://").nth(1).unwrap_or("");
            if !host_allowed(&gw.allowed_hosts, origin_host) {
                return forbidden(&format!("Origin {origin:?} is not this node"));
            }
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
pub async fn serve_listener(
    listener: TcpListener,
    app: Router,
    identify: Arc<dyn Identify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let app = app.clone();
        let identify = identify.clone();
        let mut conn_shutdown = shutdown.clone();
        tasks.spawn(async move {
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
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(conn.clone());
                    app.clone().oneshot(req.map(Body::new))
                },
            );
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .header_read_timeout(HEADER_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new());
            let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(served);
            tokio::select! {
                r = served.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = conn_shutdown.changed() => {
                    served.as_mut().graceful_shutdown();
                    let _ = served.await;
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
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
}
