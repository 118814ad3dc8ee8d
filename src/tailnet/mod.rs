//! The tailnet side of toolgate: talking to the local `tailscaled`.
//!
//! - [`localapi`]: our own thin LocalAPI client (unix socket, or TCP + token on macOS GUI
//!   variants): `status`, `whois`, `cert` pairs and the `watch-ipn-bus` stream, with typed
//!   errors, per-call timeouts and a keep-alive connection pool.
//! - [`types`]: tolerant serde types of tailscaled's JSON (`Status`, `WhoIs`, `Notify`).
//!
//! Identity (DESIGN.md §1 step 2, §3) is built on [`localapi::LocalApi::whois`]: a caller
//! without a WhoIs answer gets no identity and nothing is forwarded.

pub mod localapi;
pub mod types;

/// The WhoIs-backed identity provider for `identity.provider: tailscale`.
pub fn identify(
    api: localapi::LocalApi,
    cfg: &crate::config::IdentityConfig,
    tailnet: &str,
) -> std::sync::Arc<dyn crate::server::Identify> {
    let _ = (api, cfg, tailnet);
    std::sync::Arc::new(NoIdentity)
}

/// Placeholder until the WhoIs resolver lands: nobody is identified (fail closed).
struct NoIdentity;

impl crate::server::Identify for NoIdentity {
    fn identify(
        &self,
        peer: std::net::SocketAddr,
    ) -> futures_util::future::BoxFuture<'_, Result<crate::gateway::Caller, String>> {
        Box::pin(async move { Err(format!("no WhoIs resolver for {peer}")) })
    }
}
