//! From a hook call to policy checks: the principal Aperture asserts, and the resource and
//! actions of each tool.
//!
//! The principal follows DESIGN.md §3 through [`crate::identity::Identity::principal`]: a user
//! is `metadata.login_name`; `metadata.grants` is the caller's capability map, read exactly as
//! a WhoIs `CapMap`. A tagged device arrives with the login `tagged-devices`, which names no
//! one: its principal is built from the tailscaled peer with the same stable node ID (its tags
//! and name), and without one the call is refused.

use serde_json::{Map, Value};

use super::call::Metadata;
use crate::identity::{Identity, TAGGED_DEVICES};
use crate::policy::input::Resource;
use crate::tailnet::types::PeerStatus;

/// `tools/call::<name>`.
pub fn call_action(tool: &str) -> String {
    format!("tools/call::{tool}")
}

/// `tools/list::<name>`.
pub fn list_action(tool: &str) -> String {
    format!("tools/list::{tool}")
}

/// What a tool is checked as: kind `resource_kind`, id = the tool name, attributes
/// `tool_name`, `arguments` (the params; `{}` for a listing), `model` and `provider`.
pub fn tool_resource(
    kind: &str,
    scope: &str,
    tool: &str,
    arguments: Option<&Map<String, Value>>,
    meta: &Metadata,
) -> Resource {
    tool_resource_owned(
        kind,
        scope,
        tool,
        arguments.cloned().unwrap_or_default(),
        meta,
    )
}

/// [`tool_resource`] taking the arguments by value (a call's params are moved into the check,
/// not copied).
pub fn tool_resource_owned(
    kind: &str,
    scope: &str,
    tool: &str,
    arguments: Map<String, Value>,
    meta: &Metadata,
) -> Resource {
    let mut attr = Map::new();
    attr.insert("tool_name".into(), Value::String(tool.to_string()));
    attr.insert("arguments".into(), Value::Object(arguments));
    attr.insert("model".into(), Value::String(meta.model.clone()));
    attr.insert("provider".into(), Value::String(meta.provider.clone()));
    Resource {
        kind: kind.to_string(),
        id: tool.to_string(),
        attr,
        policy_version: String::new(),
        scope: scope.to_string(),
    }
}

/// Is the login one that must be resolved through the node (`tagged-devices`)?
pub fn is_tagged_login(meta: &Metadata) -> bool {
    meta.login_name.trim() == TAGGED_DEVICES
}

/// The grant objects under `capability`, as [`crate::tailnet::whois::identity_from_whois`]
/// reads them from a WhoIs `CapMap`: in order, `null` entries dropped.
fn caps(meta: &Metadata, capability: &str) -> Vec<Value> {
    meta.grants
        .get(capability)
        .map(|g| g.iter().filter(|v| !v.is_null()).cloned().collect())
        .unwrap_or_default()
}

/// A person's identity from the metadata. The node behind the request is only known by its
/// stable ID. Refuses an empty login and `tagged-devices` (see [`tagged_identity`]).
pub fn user_identity(meta: &Metadata, capability: &str) -> Result<Identity, String> {
    let login = meta.login_name.trim();
    if login.is_empty() {
        return Err("metadata.login_name is empty: Aperture names no caller".into());
    }
    if login == TAGGED_DEVICES {
        return Err(format!(
            "the login {TAGGED_DEVICES:?} names no person; the node must be looked up"
        ));
    }
    Ok(Identity {
        login: login.to_string(),
        node_id: meta.stable_node_id.clone(),
        tailnet: meta.tailnet_name.clone(),
        caps: caps(meta, capability),
        ..Identity::default()
    })
}

/// A tagged device's identity from the local tailscaled's peer with the same stable node ID:
/// its tags, MagicDNS name, hostname, OS and first address. The peer must carry tags (a
/// `tagged-devices` login on an untagged node is refused) and a name.
pub fn tagged_identity(
    meta: &Metadata,
    capability: &str,
    peer: &PeerStatus,
) -> Result<Identity, String> {
    if peer.id != meta.stable_node_id {
        return Err(format!(
            "peer {:?} is not node {:?}",
            peer.id, meta.stable_node_id
        ));
    }
    if peer.tags.is_empty() {
        return Err(format!(
            "node {} ({}) has no tags in tailscaled's status, yet Aperture names it {TAGGED_DEVICES:?}",
            meta.stable_node_id,
            peer.dns_name_without_dot()
        ));
    }
    let node = peer.dns_name_without_dot();
    if node.is_empty() {
        return Err(format!(
            "tagged node {} has no MagicDNS name in tailscaled's status",
            meta.stable_node_id
        ));
    }
    let ip = peer
        .tailscale_ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| peer.tailscale_ips.first())
        .map(ToString::to_string)
        .unwrap_or_default();
    Ok(Identity {
        node: node.to_string(),
        node_id: peer.id.clone(),
        hostname: peer.host_name.clone(),
        os: peer.os.clone(),
        tags: peer.tags.clone(),
        ip,
        tailnet: meta.tailnet_name.clone(),
        caps: caps(meta, capability),
        ..Identity::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoleMappings;
    use serde_json::json;

    const CAP: &str = "toolgate.dev/cap/toolgate";

    fn meta(login: &str) -> Metadata {
        let mut m = Metadata {
            login_name: login.into(),
            stable_node_id: "nCI1".into(),
            tailnet_name: "example.ts.net".into(),
            model: "claude-sonnet-4".into(),
            provider: "anthropic".into(),
            ..Metadata::default()
        };
        m.grants.insert(
            CAP.into(),
            vec![
                json!({"roles": ["developer"]}),
                Value::Null,
                json!({"tier": 2}),
            ],
        );
        m.grants
            .insert("other/cap".into(), vec![json!({"roles": ["admin"]})]);
        m
    }

    #[test]
    fn a_user_principal_maps_grants_as_whois_does() {
        let id = user_identity(&meta("alice@example.com"), CAP).unwrap();
        let p = id.principal(&RoleMappings::default());
        assert_eq!(p.id, "alice@example.com");
        assert_eq!(p.roles, ["user", "developer"]);
        assert_eq!(
            p.attr["caps"],
            json!([{"roles": ["developer"]}, {"tier": 2}])
        );
        assert_eq!(p.attr["node_id"], "nCI1");
        assert_eq!(p.attr["tailnet"], "example.ts.net");
        assert!(user_identity(&meta(""), CAP).is_err());
        assert!(user_identity(&meta("tagged-devices"), CAP).is_err());
        assert!(is_tagged_login(&meta("tagged-devices")));
    }

    #[test]
    fn a_tagged_principal_comes_from_the_peer() {
        let peer: PeerStatus = serde_json::from_value(json!({
            "ID": "nCI1", "DNSName": "ci-runner.example.ts.net.", "HostName": "ci-runner", "OS": "linux",
            "TailscaleIPs": ["fd7a:115c:a1e0::5", "100.64.0.5"], "Tags": ["tag:ci"]
        }))
        .unwrap();
        let id = tagged_identity(&meta("tagged-devices"), CAP, &peer).unwrap();
        let p = id.principal(&RoleMappings::default());
        assert_eq!(p.id, "ci-runner.example.ts.net");
        assert_eq!(p.roles, ["tagged", "tag:ci", "developer"]);
        assert_eq!(p.attr["login"], "");
        assert_eq!(p.attr["ip"], "100.64.0.5");
        let mut untagged = peer.clone();
        untagged.tags.clear();
        assert!(
            tagged_identity(&meta("tagged-devices"), CAP, &untagged)
                .unwrap_err()
                .contains("no tags")
        );
        let mut other = peer;
        other.id = "nOTHER".into();
        assert!(tagged_identity(&meta("tagged-devices"), CAP, &other).is_err());
    }

    #[test]
    fn resources_carry_the_documented_attributes() {
        let mut args = Map::new();
        args.insert("cmd".into(), json!("ls"));
        let r = tool_resource("aperture_tool", "", "run_shell", Some(&args), &meta("a@b"));
        assert_eq!(r.kind, "aperture_tool");
        assert_eq!(r.id, "run_shell");
        assert_eq!(r.attr["arguments"], json!({"cmd": "ls"}));
        assert_eq!(r.attr["tool_name"], "run_shell");
        assert_eq!(r.attr["model"], "claude-sonnet-4");
        assert_eq!(r.attr["provider"], "anthropic");
        assert_eq!(call_action("x"), "tools/call::x");
        assert_eq!(list_action("x"), "tools/list::x");
    }
}
