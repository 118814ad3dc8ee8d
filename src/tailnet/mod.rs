//! The tailnet side of toolgate: talking to the local `tailscaled`.
//!
//! - [`localapi`]: our own thin LocalAPI client (unix socket, or TCP + token on macOS GUI
//!   variants): `status`, `whois`, `cert` pairs and the `watch-ipn-bus` stream, with typed
//!   errors, per-call timeouts and a keep-alive connection pool.
//! - [`types`]: tolerant serde types of tailscaled's JSON (`Status`, `WhoIs`, `Notify`).
//! - [`whois`]: WhoIs → principal per connection: bounded, cached, fail-closed.
//! - [`tls`]: `tls: auto`, the node's LocalAPI certificate for rustls, renewed ahead of expiry.
//! - [`sidecar`]: `tailnet.mode: sidecar`, our own supervised userspace tailscaled.
//! - [`join`]: logging that node in through the LocalAPI (auth key, tags, control URL).
//!
//! Identity (DESIGN.md §1 step 2, §3) is built on [`localapi::LocalApi::whois`]: a caller
//! without a WhoIs answer gets no identity and nothing is forwarded.

pub mod join;
pub mod localapi;
pub mod sidecar;
pub mod tls;
pub mod types;
pub mod whois;

/// The WhoIs-backed identity provider for `identity.provider: tailscale`: a
/// [`whois::WhoisResolver`] over `api` (settings from `cfg`, the tailnet name from start-up),
/// with its IPN-bus watcher running (the cache is flushed on netmap changes). Keep the
/// resolver itself ([`whois::WhoisResolver::from_config`]) to read its metrics.
pub fn identify(
    api: localapi::LocalApi,
    cfg: &crate::config::IdentityConfig,
    tailnet: &str,
) -> std::sync::Arc<dyn crate::caller::Identify> {
    let mut settings = whois::WhoisSettings::from_config(cfg);
    settings.tailnet = Some(tailnet.to_owned()).filter(|t| !t.is_empty());
    // The WhoIs call's own bound follows `identity.whois_timeout` too.
    let mut api_config = api.config().clone();
    api_config.whois_timeout = cfg.whois_timeout;
    let resolver = whois::WhoisResolver::new(localapi::LocalApi::new(api_config), settings);
    resolver.spawn_netmap_watch();
    resolver
}
