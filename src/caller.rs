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
#[derive(Debug)]
pub struct Caller {
    pub identity: Identity,
    pub principal: Principal,
    /// The principal's replay input (canonical JSON), rendered at its first decision and
    /// shared by every later one on the connection (a connection's caller sits behind an
    /// `Arc` and never changes).
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

/// A copy renders its own replay input: whoever edits the copy's principal must not record
/// the original's.
impl Clone for Caller {
    fn clone(&self) -> Caller {
        Caller::new(self.identity.clone(), self.principal.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy starts without the original's rendered replay input, so a copy whose principal
    /// is then edited records its own.
    #[test]
    fn a_copy_renders_its_own_replay_input() {
        let principal = Principal {
            id: "alice@example.com".into(),
            ..Principal::default()
        };
        let original = Caller::new(Identity::default(), principal);
        original.replay.get_or_init(|| "rendered".into());
        let copy = original.clone();
        assert_eq!(copy.principal, original.principal);
        assert!(copy.replay.get().is_none());
        assert_eq!(original.replay.get().map(|s| &**s), Some("rendered"));
    }
}
