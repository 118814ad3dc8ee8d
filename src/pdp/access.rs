//! Who may ask the decision API, and for whom (`pdp.callers`, `pdp.self_only`).
//!
//! Cerbos trusts whatever principal a request names; on a tailnet the caller is itself known
//! (WhoIs). A caller whose own principal holds one of `pdp.callers` (`role:NAME`, or
//! `tag:NAME` among its node's tags) is a policy enforcement point and may assert any
//! principal. With `pdp.self_only`, any other identified caller may ask about itself only: its
//! WhoIs principal replaces whatever principal the body names. Everyone else is refused.

use crate::gateway::Caller;

/// How a caller may use the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Listed in `pdp.callers`: may assert any principal.
    Assert,
    /// `pdp.self_only`: asks only about its own WhoIs principal.
    SelfOnly,
    /// Neither: 403 `PERMISSION_DENIED`.
    Denied,
}

/// Whether `caller` holds one of `callers` (`role:R` or `tag:T` entries).
pub fn listed(callers: &[String], caller: &Caller) -> bool {
    callers.iter().any(|c| {
        if let Some(role) = c.strip_prefix("role:") {
            caller.principal.roles.iter().any(|r| r == role)
        } else if c.starts_with("tag:") {
            caller.identity.tags.iter().any(|t| t == c)
        } else {
            false
        }
    })
}

pub fn access(callers: &[String], self_only: bool, caller: &Caller) -> Access {
    if listed(callers, caller) {
        Access::Assert
    } else if self_only {
        Access::SelfOnly
    } else {
        Access::Denied
    }
}
