//! Who is calling: a tailnet identity (from WhoIs, a static fixture, or `tailscale serve`
//! headers) and its mapping to a policy principal, exactly as DESIGN.md §3 specifies.
//!
//! Tagged nodes are identified by their node name and tags, never by the login
//! `tagged-devices`. Roles come from the node kind, its tags, the app capability's grant
//! objects (`roles: [..]`) and the configured role mappings.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::RoleMappings;
use crate::policy::input::Principal;
use crate::policy::parse;

/// The login tailscaled reports for tagged nodes; it names no person and grants nothing.
pub const TAGGED_DEVICES: &str = "tagged-devices";

/// A caller, as the tailnet knows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// `UserProfile.LoginName` for user nodes; "" for tagged nodes.
    #[serde(default)]
    pub login: String,
    #[serde(default)]
    pub display_name: String,
    /// The node's MagicDNS name, without the trailing dot.
    #[serde(default)]
    pub node: String,
    /// `Node.StableID`.
    #[serde(default)]
    pub node_id: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub os: String,
    /// `Node.Tags`; non-empty means a tagged node.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The caller's tailnet IP, as text.
    #[serde(default)]
    pub ip: String,
    /// `CurrentTailnet.Name` of this node's tailnet.
    #[serde(default)]
    pub tailnet: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// The grant objects under the configured app capability (`CapMap[cap]`).
    #[serde(default)]
    pub caps: Vec<Value>,
    /// The node is shared into this tailnet from another one.
    #[serde(default)]
    pub shared: bool,
}

impl Identity {
    pub fn is_tagged(&self) -> bool {
        !self.tags.is_empty()
    }

    /// The principal id: the login for people, the node name for tagged nodes.
    pub fn principal_id(&self) -> &str {
        if self.is_tagged() {
            &self.node
        } else {
            &self.login
        }
    }

    /// Roles granted by the app capability: the union of every grant's `roles`, in order.
    pub fn capability_roles(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for grant in &self.caps {
            let Some(roles) = grant.get("roles").and_then(Value::as_array) else {
                continue;
            };
            for r in roles.iter().filter_map(Value::as_str) {
                if !r.is_empty() && !out.iter().any(|o| o == r) {
                    out.push(r.to_string());
                }
            }
        }
        out
    }

    /// The policy principal for this identity (DESIGN.md §3).
    pub fn principal(&self, mappings: &RoleMappings) -> Principal {
        let mut roles: Vec<String> = Vec::new();
        let mut add = |r: &str| {
            if !r.is_empty() && !roles.iter().any(|x| x == r) {
                roles.push(r.to_string());
            }
        };
        if self.is_tagged() {
            add("tagged");
            for t in &self.tags {
                add(t);
            }
        } else {
            add("user");
        }
        for r in self.capability_roles() {
            add(&r);
        }
        if self.is_tagged() {
            for t in &self.tags {
                mappings
                    .tag
                    .get(t)
                    .into_iter()
                    .flatten()
                    .for_each(|r| add(r));
            }
        } else {
            mappings
                .login
                .get(&self.login)
                .into_iter()
                .flatten()
                .for_each(|r| add(r));
            for g in &self.groups {
                mappings
                    .group
                    .get(g)
                    .into_iter()
                    .flatten()
                    .for_each(|r| add(r));
            }
        }
        let tagged = self.is_tagged();
        let text = |s: &str| Value::String(if tagged { String::new() } else { s.to_string() });
        let list = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let mut attr = Map::new();
        attr.insert("login".into(), text(&self.login));
        attr.insert("display_name".into(), text(&self.display_name));
        attr.insert("node".into(), Value::String(self.node.clone()));
        attr.insert("node_id".into(), Value::String(self.node_id.clone()));
        attr.insert("hostname".into(), Value::String(self.hostname.clone()));
        attr.insert("os".into(), Value::String(self.os.clone()));
        attr.insert("tags".into(), list(&self.tags));
        attr.insert("ip".into(), Value::String(self.ip.clone()));
        attr.insert("tailnet".into(), Value::String(self.tailnet.clone()));
        attr.insert(
            "groups".into(),
            list(if tagged { &[] } else { &self.groups }),
        );
        attr.insert("caps".into(), Value::Array(self.caps.clone()));
        attr.insert("shared".into(), Value::Bool(self.shared));
        Principal {
            id: self.principal_id().to_string(),
            roles,
            attr,
            policy_version: String::new(),
            scope: String::new(),
        }
    }
}

/// `identity.provider: static`: source IP → identity (dev and tests only).
#[derive(Debug, Clone, Default)]
pub struct StaticIdentities {
    by_ip: BTreeMap<IpAddr, Identity>,
}

impl StaticIdentities {
    pub fn load(path: &Path) -> Result<StaticIdentities, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        StaticIdentities::parse(&path.display().to_string(), &bytes)
    }

    pub fn parse(name: &str, bytes: &[u8]) -> Result<StaticIdentities, String> {
        let raw: BTreeMap<String, Identity> =
            parse::document(name, bytes).map_err(|e| format!("{name}: {e}"))?;
        let mut by_ip = BTreeMap::new();
        for (key, mut id) in raw {
            let ip: IpAddr = key
                .parse()
                .map_err(|_| format!("{name}: $.{key}: not an IP address"))?;
            if id.ip.is_empty() {
                id.ip = ip.to_string();
            }
            if id.login == TAGGED_DEVICES {
                id.login.clear();
            }
            if !id.is_tagged() && id.login.is_empty() {
                return Err(format!(
                    "{name}: $.{key}: a user identity needs a login (or give it tags)"
                ));
            }
            if id.is_tagged() && id.node.is_empty() {
                return Err(format!(
                    "{name}: $.{key}: a tagged identity needs a node name"
                ));
            }
            by_ip.insert(ip, id);
        }
        Ok(StaticIdentities { by_ip })
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&Identity> {
        self.by_ip.get(&normalize_ip(ip))
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// IPv4-mapped IPv6 (`::ffff:100.64.0.1`) → IPv4.
pub fn normalize_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alice() -> Identity {
        Identity {
            login: "alice@example.com".into(),
            display_name: "Alice".into(),
            node: "alice-laptop.example.ts.net".into(),
            node_id: "nALICE1".into(),
            ip: "100.64.0.2".into(),
            tailnet: "example.ts.net".into(),
            groups: vec!["group:eng".into()],
            caps: vec![
                json!({"roles": ["developer"]}),
                json!({"roles": ["oncall", "developer"], "max_calls": 5}),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn user_node_principal() {
        let mut m = RoleMappings::default();
        m.group.insert("group:eng".into(), vec!["engineer".into()]);
        m.login
            .insert("alice@example.com".into(), vec!["admin".into()]);
        let p = alice().principal(&m);
        assert_eq!(p.id, "alice@example.com");
        assert_eq!(
            p.roles,
            vec!["user", "developer", "oncall", "admin", "engineer"]
        );
        assert_eq!(p.attr["login"], "alice@example.com");
        assert_eq!(p.attr["tags"], json!([]));
        assert_eq!(p.attr["groups"], json!(["group:eng"]));
        assert_eq!(p.attr["caps"][1]["max_calls"], 5);
    }

    #[test]
    fn tagged_node_principal_never_uses_the_login() {
        let id = Identity {
            login: TAGGED_DEVICES.into(),
            display_name: "Tagged Devices".into(),
            node: "ci-runner.example.ts.net".into(),
            node_id: "nCI1".into(),
            tags: vec!["tag:ci".into()],
            groups: vec!["group:eng".into()],
            ..Default::default()
        };
        let mut m = RoleMappings::default();
        m.tag.insert("tag:ci".into(), vec!["ci".into()]);
        m.login.insert(TAGGED_DEVICES.into(), vec!["admin".into()]);
        m.group.insert("group:eng".into(), vec!["engineer".into()]);
        let p = id.principal(&m);
        assert_eq!(p.id, "ci-runner.example.ts.net");
        assert_eq!(p.roles, vec!["tagged", "tag:ci", "ci"]);
        assert_eq!(p.attr["login"], "");
        assert_eq!(p.attr["display_name"], "");
        assert_eq!(p.attr["groups"], json!([]));
    }

    #[test]
    fn static_fixture_of_the_design() {
        let src = r#"
"127.0.0.2":
  login: alice@example.com
  display_name: Alice
  node: alice-laptop.example.ts.net
  node_id: nALICE1
  tags: []
  caps: [{roles: [developer]}]
"127.0.0.4":
  node: ci-runner.example.ts.net
  node_id: nCI1
  tags: [tag:ci]
"#;
        let s = StaticIdentities::parse("ids.yaml", src.as_bytes()).unwrap();
        let a = s.lookup("127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(a.ip, "127.0.0.2");
        assert_eq!(
            a.principal(&RoleMappings::default()).roles,
            vec!["user", "developer"]
        );
        let mapped: IpAddr = "::ffff:127.0.0.4".parse().unwrap();
        assert!(s.lookup(mapped).unwrap().is_tagged());
        assert!(s.lookup("127.0.0.9".parse().unwrap()).is_none());
        let e = StaticIdentities::parse("ids.yaml", b"\"nope\": {login: a}\n").unwrap_err();
        assert!(e.contains("not an IP"), "{e}");
        let e = StaticIdentities::parse("ids.yaml", b"\"127.0.0.2\": {login: a, colour: red}\n")
            .unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e =
            StaticIdentities::parse("ids.yaml", b"\"127.0.0.2\": {display_name: a}\n").unwrap_err();
        assert!(e.contains("needs a login"), "{e}");
    }
}
