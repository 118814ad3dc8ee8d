//! Who is calling: the verified caller of a connection, what every request knows about its
//! connection, and the providers that turn a peer address into a caller.
//!
//! This sits below the gateway and the listeners: the tailnet resolver
//! ([`crate::tailnet::whois`]), the static fixtures and the request path all speak these types,
//! and none of them needs the others to do so.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::identity::{Identity, StaticIdentities, normalize_ip};
use crate::policy::input::Principal;

/// The verified caller of one connection.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub principal: Principal,
    /// The principal's replay input (canonical JSON), rendered at its first decision and
    /// shared by every later one on the connection: a caller never changes.
    pub(crate) replay: std::sync::OnceLock<Arc<str>>,
}

impl Caller {
    pub fn new(identity: Identity, principal: Principal) -> Caller {
        Caller {
            identity,
            principal,
            replay: Default::default(),
        }
    }
}

/// What the accept loop knows about a connection; inserted into every request's extensions.
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    /// `None`: no verified identity (invariant I1: nothing is forwarded for it).
    pub caller: Option<Arc<Caller>>,
    /// Why there is no caller, for the refusal and the audit row.
    pub unidentified: Option<String>,
}

/// Turns a peer address into a caller, or says why not.
pub trait Identify: Send + Sync + 'static {
    fn identify(&self, peer: SocketAddr) -> BoxFuture<'_, Result<Caller, String>>;

    /// A number that changes whenever identities may have changed (a new netmap, a tag
    /// change): an open connection re-resolves its caller when it differs from the one seen
    /// at its last resolution. Providers whose answers never change return a constant.
    fn generation(&self) -> u64 {
        0
    }
}

/// The static provider (dev, tests, the demo): source IP → identity fixture.
pub struct StaticProvider {
    pub identities: StaticIdentities,
    pub mappings: crate::config::RoleMappings,
}

impl Identify for StaticProvider {
    fn identify(&self, peer: SocketAddr) -> BoxFuture<'_, Result<Caller, String>> {
        let found = self.identities.lookup(normalize_ip(peer.ip())).cloned();
        Box::pin(async move {
            let identity = found.ok_or_else(|| format!("no static identity for {}", peer.ip()))?;
            let principal = identity.principal(&self.mappings);
            Ok(Caller::new(identity, principal))
        })
    }
}
