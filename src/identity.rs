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

// --- `tailscale serve` identity headers (reference/tailscale.md §3.3) --------------------------

/// `tailscale serve`'s login header (RFC 2047 Q-encoded when not ASCII).
pub const HEADER_USER_LOGIN: &str = "tailscale-user-login";
/// The display name (RFC 2047 Q-encoded when not ASCII).
pub const HEADER_USER_NAME: &str = "tailscale-user-name";
/// The profile picture URL (not encoded).
pub const HEADER_USER_PROFILE_PIC: &str = "tailscale-user-profile-pic";
/// JSON of the caller's app capabilities, filtered to `--accept-app-caps`.
pub const HEADER_APP_CAPABILITIES: &str = "tailscale-app-capabilities";
/// `?1` on Funnel (public internet) requests.
pub const HEADER_FUNNEL_REQUEST: &str = "tailscale-funnel-request";
/// The source IP serve saw (serve overwrites it).
pub const HEADER_FORWARDED_FOR: &str = "x-forwarded-for";

/// The identity headers of one request proxied by `tailscale serve`, decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServeHeaders {
    pub login: String,
    pub display_name: String,
    pub profile_pic: String,
    /// The decoded `Tailscale-App-Capabilities` map (empty when absent).
    pub app_capabilities: Map<String, Value>,
    /// `X-Forwarded-For` as an address, when it is one.
    pub forwarded_for: Option<IpAddr>,
}

/// The single value of header `name`: absent → `None`; repeated or not visible ASCII → an
/// error (serve sets each of these exactly once, so anything else was not written by serve).
fn single_header<'a>(
    headers: &'a axum::http::HeaderMap,
    name: &str,
) -> Result<Option<&'a str>, String> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("header {name} appears more than once"));
    }
    v.to_str()
        .map(|s| Some(s.trim()))
        .map_err(|_| format!("header {name} is not ASCII (serve RFC 2047-encodes its values)"))
}

/// Decodes the `tailscale serve` identity headers. Fails closed: a Funnel request, a request
/// without `Tailscale-User-Login` (serve sends none for tagged nodes, Funnel or local
/// processes), the `tagged-devices` login, a repeated or undecodable header, or app
/// capabilities that are not a JSON object of arrays are all errors.
pub fn parse_serve_headers(headers: &axum::http::HeaderMap) -> Result<ServeHeaders, String> {
    if headers.contains_key(HEADER_FUNNEL_REQUEST) {
        return Err("a Funnel request from the public internet has no tailnet identity".into());
    }
    let login = match single_header(headers, HEADER_USER_LOGIN)? {
        Some(v) => decode_rfc2047(v).map_err(|e| format!("Tailscale-User-Login: {e}"))?,
        None => String::new(),
    };
    let login = login.trim().to_owned();
    if login.is_empty() {
        return Err(
            "no Tailscale-User-Login header: tailscale serve sends identity headers only \
                    for user nodes (not for tagged nodes, Funnel or local processes)"
                .into(),
        );
    }
    if login == TAGGED_DEVICES {
        return Err(format!("the login {TAGGED_DEVICES:?} names no person"));
    }
    let display_name = match single_header(headers, HEADER_USER_NAME)? {
        Some(v) => decode_rfc2047(v).map_err(|e| format!("Tailscale-User-Name: {e}"))?,
        None => String::new(),
    };
    let profile_pic = single_header(headers, HEADER_USER_PROFILE_PIC)?
        .unwrap_or_default()
        .to_owned();
    let app_capabilities = match single_header(headers, HEADER_APP_CAPABILITIES)? {
        None | Some("") => Map::new(),
        Some(v) => {
            let text = decode_rfc2047(v).map_err(|e| format!("Tailscale-App-Capabilities: {e}"))?;
            let map: Map<String, Value> = serde_json::from_str(&text)
                .map_err(|e| format!("Tailscale-App-Capabilities is not a JSON object: {e}"))?;
            for (cap, grants) in &map {
                if !(grants.is_array() || grants.is_null()) {
                    return Err(format!(
                        "Tailscale-App-Capabilities: {cap:?} is not a list of grant objects"
                    ));
                }
            }
            map
        }
    };
    let forwarded_for = single_header(headers, HEADER_FORWARDED_FOR)?
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<IpAddr>().ok())
        .map(normalize_ip);
    Ok(ServeHeaders {
        login,
        display_name,
        profile_pic,
        app_capabilities,
        forwarded_for,
    })
}

/// The identity `tailscale serve` asserts for one request: a user node's login and display
/// name, `caps` = the grant objects under `capability` in `Tailscale-App-Capabilities`
/// (serve forwards them only with `--accept-app-caps=<capability>`), `ip` from
/// `X-Forwarded-For`. Serve tells nothing about the node, so `node`, `node_id`, `hostname`
/// and `os` stay empty.
///
/// TRUST RULE (invariant I1): these headers create identity only on an explicitly configured
/// `identity.serve_listen` listener that only `tailscale serve` can reach (a unix socket, or
/// loopback when tailscaled is not in userspace-networking mode) and only for a loopback peer.
/// Every other listener strips them ([`strip_tailscale_headers`]) before routing.
pub fn from_serve_headers(
    headers: &axum::http::HeaderMap,
    tailnet: &str,
    capability: &str,
) -> Result<Identity, String> {
    let h = parse_serve_headers(headers)?;
    let caps = match h.app_capabilities.get(capability) {
        Some(Value::Array(grants)) => grants.iter().filter(|g| !g.is_null()).cloned().collect(),
        _ => Vec::new(),
    };
    Ok(Identity {
        login: h.login,
        display_name: h.display_name,
        ip: h.forwarded_for.map(|ip| ip.to_string()).unwrap_or_default(),
        tailnet: tailnet.to_owned(),
        caps,
        ..Identity::default()
    })
}

/// Removes every `Tailscale-*` header (identity headers are never taken from a client on a
/// tailnet listener). Returns how many values were removed. Cheap when there are none.
pub fn strip_tailscale_headers(headers: &mut axum::http::HeaderMap) -> usize {
    fn is_tailscale(name: &axum::http::HeaderName) -> bool {
        name.as_str()
            .get(..10)
            .is_some_and(|p| p.eq_ignore_ascii_case("tailscale-"))
    }
    if !headers.keys().any(is_tailscale) {
        return 0;
    }
    let names: Vec<axum::http::HeaderName> = headers
        .keys()
        .filter(|n| is_tailscale(n))
        .cloned()
        .collect();
    let mut removed = 0;
    for n in names {
        if let axum::http::header::Entry::Occupied(e) = headers.entry(n) {
            removed += e.remove_entry_mult().1.count();
        }
    }
    removed
}

/// Decodes RFC 2047 encoded-words (`=?utf-8?q?...?=`, `=?UTF-8?B?...?=`) in a header value,
/// as Go's `mime.WordDecoder.DecodeHeader`: text outside encoded-words is kept, whitespace
/// between adjacent encoded-words is dropped, and the decoded bytes must be UTF-8. Charsets:
/// UTF-8 and US-ASCII, and ISO-8859-1 (mapped to Unicode). A malformed encoded-word is an
/// error (fail closed), not kept literally.
pub fn decode_rfc2047(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    let mut prev_word = false;
    while !rest.is_empty() {
        let Some(start) = rest.find("=?") else {
            out.push_str(rest);
            break;
        };
        let (before, from) = rest.split_at(start);
        let Some((word_len, decoded)) = encoded_word(from)? else {
            // "=?" not starting an encoded-word: literal text.
            out.push_str(before);
            out.push_str("=?");
            rest = from.get(2..).unwrap_or("");
            prev_word = false;
            continue;
        };
        if !(prev_word && before.chars().all(|c| c == ' ' || c == '\t')) {
            out.push_str(before);
        }
        out.push_str(&decoded);
        rest = from.get(word_len..).unwrap_or("");
        prev_word = true;
    }
    Ok(out)
}

/// One `=?charset?enc?text?=` at the start of `s`: `Ok(None)` when it is not shaped like
/// one, its length and decoded text otherwise.
fn encoded_word(s: &str) -> Result<Option<(usize, String)>, String> {
    let Some(body) = s.strip_prefix("=?") else {
        return Ok(None);
    };
    let mut parts = body.splitn(3, '?');
    let (Some(charset), Some(enc), Some(tail)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(None);
    };
    let Some(end) = tail.find("?=") else {
        return Ok(None);
    };
    let text = tail.get(..end).unwrap_or("");
    if charset.is_empty() || enc.len() != 1 || text.contains(' ') {
        return Ok(None);
    }
    let len = 2 + charset.len() + 1 + enc.len() + 1 + end + 2;
    let bytes = match enc {
        "q" | "Q" => q_decode(text)?,
        "b" | "B" => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("bad base64 in an encoded-word: {e}"))?
        }
        other => return Err(format!("unknown encoded-word encoding {other:?}")),
    };
    // RFC 2231 language suffix: `utf-8*en`.
    let charset = charset.split('*').next().unwrap_or(charset);
    let decoded =
        if charset.eq_ignore_ascii_case("utf-8") || charset.eq_ignore_ascii_case("us-ascii") {
            String::from_utf8(bytes).map_err(|_| "an encoded-word is not valid UTF-8".to_owned())?
        } else if charset.eq_ignore_ascii_case("iso-8859-1") {
            bytes.iter().map(|b| char::from(*b)).collect()
        } else {
            return Err(format!(
                "unsupported charset {charset:?} in an encoded-word"
            ));
        };
    Ok(Some((len, decoded)))
}

/// RFC 2047 "Q": `_` is a space, `=XX` a byte, other printable ASCII itself.
fn q_decode(text: &str) -> Result<Vec<u8>, String> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'_' => out.push(b' '),
            b'=' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "bad =XX escape in a Q-encoded word".to_owned())?;
                out.push(hex);
                i += 2;
            }
            c if (0x21..0x7f).contains(&c) => out.push(c),
            _ => return Err("a control character in a Q-encoded word".into()),
        }
        i += 1;
    }
    Ok(out)
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

    fn headers(pairs: &[(&str, &str)]) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                axum::http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn rfc2047_decoding() {
        // ASCII passes through unchanged (what serve sends for ASCII names).
        assert_eq!(
            decode_rfc2047("alice@example.com").unwrap(),
            "alice@example.com"
        );
        // Go's mime.QEncoding.Encode("utf-8", "Zoë Ünal").
        assert_eq!(
            decode_rfc2047("=?utf-8?q?Zo=C3=AB_=C3=9Cnal?=").unwrap(),
            "Zoë Ünal"
        );
        assert_eq!(decode_rfc2047("=?UTF-8?Q?J=C3=B6rg?=").unwrap(), "Jörg");
        // B encoding.
        assert_eq!(
            decode_rfc2047("=?utf-8?b?Wm/DqyDDnG5hbA==?=").unwrap(),
            "Zoë Ünal"
        );
        // Whitespace between adjacent encoded-words is dropped (long values are split).
        assert_eq!(
            decode_rfc2047("=?utf-8?q?Zo=C3=AB?= =?utf-8?q?_=C3=9Cnal?=").unwrap(),
            "Zoë Ünal"
        );
        // Text around encoded-words is kept.
        assert_eq!(
            decode_rfc2047("Dr. =?utf-8?q?Zo=C3=AB?= (eng)").unwrap(),
            "Dr. Zoë (eng)"
        );
        assert_eq!(decode_rfc2047("=?iso-8859-1?q?Zo=EB?=").unwrap(), "Zoë");
        // Not an encoded-word: literal.
        assert_eq!(decode_rfc2047("a=?b").unwrap(), "a=?b");
        // Malformed or not UTF-8: refused, never kept literally.
        assert!(decode_rfc2047("=?utf-8?q?bad=ZZ?=").is_err());
        assert!(decode_rfc2047("=?utf-8?q?=FF=FE?=").is_err());
        assert!(decode_rfc2047("=?utf-8?x?abc?=").is_err());
        assert!(decode_rfc2047("=?koi8-r?q?abc?=").is_err());
        assert!(decode_rfc2047("=?utf-8?b?!!!?=").is_err());
    }

    #[test]
    fn serve_headers_user_identity() {
        let h = headers(&[
            ("Tailscale-User-Login", "=?utf-8?q?zo=C3=AB@example.com?="),
            ("Tailscale-User-Name", "=?utf-8?q?Zo=C3=AB_=C3=9Cnal?="),
            ("Tailscale-User-Profile-Pic", "https://example.com/z.png"),
            (
                "Tailscale-Headers-Info",
                "https://tailscale.com/s/serve-headers",
            ),
            (
                "Tailscale-App-Capabilities",
                r#"{"toolgate.dev/cap/toolgate":[{"roles":["developer"]},null,{"roles":["oncall"],"max":3}],"other/cap":[{"x":1}]}"#,
            ),
            ("X-Forwarded-For", "100.64.0.9"),
        ]);
        let parsed = parse_serve_headers(&h).unwrap();
        assert_eq!(parsed.profile_pic, "https://example.com/z.png");
        let id = from_serve_headers(&h, "example.com", "toolgate.dev/cap/toolgate").unwrap();
        assert_eq!(id.login, "zoë@example.com");
        assert_eq!(id.display_name, "Zoë Ünal");
        assert_eq!(id.ip, "100.64.0.9");
        assert_eq!(id.tailnet, "example.com");
        assert_eq!(id.caps.len(), 2);
        assert!(!id.is_tagged());
        let p = id.principal(&RoleMappings::default());
        assert_eq!(p.id, "zoë@example.com");
        assert_eq!(p.roles, vec!["user", "developer", "oncall"]);
        // Another capability name: no caps.
        let id = from_serve_headers(&h, "example.com", "nope/cap/x").unwrap();
        assert!(id.caps.is_empty());
    }

    #[test]
    fn serve_headers_fail_closed() {
        let cap = "toolgate.dev/cap/toolgate";
        let err =
            |pairs: &[(&str, &str)]| from_serve_headers(&headers(pairs), "t", cap).unwrap_err();
        // Tagged nodes, Funnel and local processes get no identity headers from serve.
        assert!(err(&[]).contains("no Tailscale-User-Login"));
        assert!(
            err(&[(
                "Tailscale-App-Capabilities",
                r#"{"toolgate.dev/cap/toolgate":[{}]}"#
            )])
            .contains("no Tailscale-User-Login")
        );
        assert!(
            err(&[
                ("Tailscale-User-Login", "a@b.c"),
                ("Tailscale-Funnel-Request", "?1")
            ])
            .contains("Funnel")
        );
        assert!(err(&[("Tailscale-User-Login", "tagged-devices")]).contains("names no person"));
        assert!(
            err(&[
                ("Tailscale-User-Login", "a@b.c"),
                ("Tailscale-User-Login", "b@b.c")
            ])
            .contains("more than once")
        );
        assert!(err(&[("Tailscale-User-Login", "=?utf-8?q?=FF?=")]).contains("UTF-8"));
        assert!(
            err(&[
                ("Tailscale-User-Login", "a@b.c"),
                ("Tailscale-App-Capabilities", "[1]")
            ])
            .contains("JSON object")
        );
        assert!(
            err(&[
                ("Tailscale-User-Login", "a@b.c"),
                (
                    "Tailscale-App-Capabilities",
                    r#"{"toolgate.dev/cap/toolgate":{"roles":["admin"]}}"#
                )
            ])
            .contains("list of grant objects")
        );
        // A null capability list is no caps, not an error.
        let id = from_serve_headers(
            &headers(&[
                ("Tailscale-User-Login", "a@b.c"),
                (
                    "Tailscale-App-Capabilities",
                    r#"{"toolgate.dev/cap/toolgate":null}"#,
                ),
            ]),
            "t",
            cap,
        )
        .unwrap();
        assert!(id.caps.is_empty());
        assert_eq!(id.ip, "");
    }

    #[test]
    fn stripping_removes_every_tailscale_header() {
        let mut h = headers(&[
            ("Tailscale-User-Login", "mallory@example.com"),
            ("tailscale-user-login", "second@example.com"),
            ("TAILSCALE-APP-CAPABILITIES", "{}"),
            ("Tailscale-Anything-New", "x"),
            ("Host", "toolgate"),
            ("X-Tailscale-Not-Ours", "kept"),
            ("Content-Type", "application/json"),
        ]);
        assert_eq!(strip_tailscale_headers(&mut h), 4);
        assert_eq!(h.len(), 3);
        assert!(h.keys().all(|k| !k.as_str().starts_with("tailscale-")));
        assert_eq!(strip_tailscale_headers(&mut h), 0);
    }
}
