//! Tolerant serde types for the LocalAPI responses toolgate reads: `status`, `whois`, and the
//! `watch-ipn-bus` notifications (reference/tailscale.md §2.4–§2.6, tailscaled v1.96.4).
//!
//! Tolerance rules, applied to every type here:
//! - unknown fields are ignored (tailscaled adds fields in every release);
//! - every field may be absent (Go `omitzero`/`omitempty`) and every slice or map may be `null`
//!   (a nil Go slice or map): both read as empty / `None`;
//! - addresses are accepted as prefixes (`"100.64.0.1/32"`) or bare addresses (`"100.64.0.1"`);
//! - Go's zero time (`"0001-01-01T00:00:00Z"`) reads as `None`;
//! - names keep tailscaled's trailing dot; helpers such as [`Node::name_without_dot`] strip it.
//!
//! What stays strict, because identity depends on it: a successful `WhoIs` must carry a `Node`
//! and a `UserProfile` object, addresses must parse, and IDs must be integers (`i64`: old node
//! IDs exceed 2^53, so never `f64`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::de::{self, Deserializer, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An app-capability map (`tailcfg.PeerCapMap` / `NodeCapMap`): capability name → raw JSON
/// values, one per matching grant. `null` maps and `null` value lists read as empty.
pub type CapMap = BTreeMap<String, Vec<Value>>;

// --- addresses -----------------------------------------------------------------------------

/// An IP prefix as tailscaled writes `netip.Prefix` (`"100.64.0.1/32"`). A bare address
/// (`"100.64.0.1"`) is accepted too and gets the full length (32 or 128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    /// The address part (for node addresses: the node's tailnet IP).
    pub addr: IpAddr,
    /// The prefix length in bits.
    pub len: u8,
}

impl IpPrefix {
    /// True when the prefix names exactly one address (`/32` or `/128`).
    pub fn is_single_ip(&self) -> bool {
        self.len == max_prefix_len(self.addr)
    }
}

fn max_prefix_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The error for an address or prefix that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid IP address or prefix `{0}`")]
pub struct InvalidPrefix(pub String);

impl FromStr for IpPrefix {
    type Err = InvalidPrefix;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidPrefix(s.to_owned());
        match s.split_once('/') {
            None => {
                let addr = IpAddr::from_str(s).map_err(|_| bad())?;
                Ok(IpPrefix {
                    addr,
                    len: max_prefix_len(addr),
                })
            }
            Some((a, l)) => {
                let addr = IpAddr::from_str(a).map_err(|_| bad())?;
                let len = l.parse::<u8>().map_err(|_| bad())?;
                if len > max_prefix_len(addr) {
                    return Err(bad());
                }
                Ok(IpPrefix { addr, len })
            }
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        IpPrefix::from_str(&s).map_err(de::Error::custom)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// --- deserialisation helpers ---------------------------------------------------------------

/// `null` → `T::default()`; used with `#[serde(default)]` so absent and `null` read the same.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A list of addresses written bare (`Status.TailscaleIPs`) or as prefixes; `null` → empty.
fn ip_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    let v: Option<Vec<IpPrefix>> = Option::deserialize(d)?;
    Ok(v.unwrap_or_default().into_iter().map(|p| p.addr).collect())
}

/// A capability map where the map or any value list may be `null`.
fn cap_map<'de, D: Deserializer<'de>>(d: D) -> Result<CapMap, D::Error> {
    let v: Option<BTreeMap<String, Option<Vec<Value>>>> = Option::deserialize(d)?;
    Ok(v.unwrap_or_default()
        .into_iter()
        .map(|(k, vals)| (k, vals.unwrap_or_default()))
        .collect())
}

/// A Go `time.Time`: RFC 3339; the zero time and `null` read as `None`.
fn go_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let Some(s) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    if s.is_empty() || s.starts_with("0001-01-01T00:00:00") {
        return Ok(None);
    }
    DateTime::parse_from_rfc3339(&s)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|e| de::Error::custom(format!("invalid time `{s}`: {e}")))
}

/// Writes a time as RFC 3339 (UTC, `Z`), `None` as Go's zero time.
fn ser_go_time<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        None => s.serialize_str("0001-01-01T00:00:00Z"),
    }
}

/// Presence of a JSON value that is not `null` (used for `*empty.Message` and the netmap).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<IgnoredAny>::deserialize(d)?.is_some())
}

fn strip_dot(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

// --- WhoIs ---------------------------------------------------------------------------------

/// `apitype.WhoIsResponse`: who is behind a tailnet address. In a successful response `Node` and
/// `UserProfile` are always objects; a response without them does not decode (fail closed).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct WhoIs {
    /// The caller's node.
    #[serde(rename = "Node")]
    pub node: Node,
    /// The node's user; for tagged nodes the synthetic `tagged-devices` profile (never
    /// authorize by it).
    #[serde(rename = "UserProfile")]
    pub user_profile: UserProfile,
    /// App capabilities the caller's node has toward this node (`tailcfg.PeerCapMap`): the raw
    /// grant objects per capability name. `null` reads as empty.
    #[serde(rename = "CapMap", default, deserialize_with = "cap_map")]
    pub cap_map: CapMap,
}

impl WhoIs {
    /// The grant objects under capability `name` (`CapMap[name]`); empty when none apply.
    pub fn caps(&self, name: &str) -> &[Value] {
        self.cap_map.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// True for a tagged node (`Node.Tags` non-empty); its `UserProfile` is synthetic.
    pub fn is_tagged(&self) -> bool {
        self.node.is_tagged()
    }
}

/// `tailcfg.UserProfile`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct UserProfile {
    /// `tailcfg.UserID`. Do not key decisions on it (tagged-devices IDs differ per control).
    #[serde(rename = "ID", default)]
    pub id: i64,
    /// `alice@example.com`, or `tagged-devices` for tagged nodes.
    #[serde(rename = "LoginName", default, deserialize_with = "null_default")]
    pub login_name: String,
    /// `Alice Example`.
    #[serde(rename = "DisplayName", default, deserialize_with = "null_default")]
    pub display_name: String,
    /// Absent when empty (`omitzero`).
    #[serde(rename = "ProfilePicURL", default, deserialize_with = "null_default")]
    pub profile_pic_url: String,
    /// Groups the control server reports (tailscaled ≥ 1.98; absent before and when empty).
    #[serde(rename = "Groups", default, deserialize_with = "null_default")]
    pub groups: Vec<String>,
    /// Legacy (≤ 1.80): always `[]` on the wire; kept raw.
    #[serde(rename = "Roles", default, deserialize_with = "null_default")]
    pub roles: Vec<Value>,
}

/// `tailcfg.Node`, the fields toolgate may use (unknown fields are ignored).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Node {
    /// `tailcfg.NodeID` (int64).
    #[serde(rename = "ID")]
    pub id: i64,
    /// `tailcfg.StableNodeID`, e.g. `nAbCdEf1CNTRL`: the stable device key.
    #[serde(rename = "StableID", deserialize_with = "null_default")]
    pub stable_id: String,
    /// MagicDNS FQDN WITH the trailing dot (`host.tail1234.ts.net.`); see [`Node::name_without_dot`].
    #[serde(rename = "Name", deserialize_with = "null_default")]
    pub name: String,
    /// `tailcfg.UserID`; for tagged nodes not the ACL identity.
    #[serde(rename = "User")]
    pub user: i64,
    /// Set on nodes shared in from another tailnet.
    #[serde(rename = "Sharer")]
    pub sharer: i64,
    /// `nodekey:<hex>`.
    #[serde(rename = "Key", deserialize_with = "null_default")]
    pub key: String,
    /// Absent/zero when the key does not expire.
    #[serde(
        rename = "KeyExpiry",
        deserialize_with = "go_time",
        serialize_with = "ser_go_time"
    )]
    pub key_expiry: Option<DateTime<Utc>>,
    /// `mkey:<hex>`.
    #[serde(rename = "Machine", deserialize_with = "null_default")]
    pub machine: String,
    /// `discokey:<hex>`.
    #[serde(rename = "DiscoKey", deserialize_with = "null_default")]
    pub disco_key: String,
    /// The node's tailnet addresses, as prefixes (`100.101.102.103/32`, `fd7a:…/128`).
    #[serde(rename = "Addresses", deserialize_with = "null_default")]
    pub addresses: Vec<IpPrefix>,
    /// Routes the node may originate.
    #[serde(rename = "AllowedIPs", deserialize_with = "null_default")]
    pub allowed_ips: Vec<IpPrefix>,
    /// UDP endpoints (`ip:port`), kept as text.
    #[serde(rename = "Endpoints", deserialize_with = "null_default")]
    pub endpoints: Vec<String>,
    /// Home DERP region.
    #[serde(rename = "HomeDERP")]
    pub home_derp: i64,
    /// `Hostinfo` (absent when zero).
    #[serde(rename = "Hostinfo", deserialize_with = "null_default")]
    pub hostinfo: Hostinfo,
    /// Creation time.
    #[serde(
        rename = "Created",
        deserialize_with = "go_time",
        serialize_with = "ser_go_time"
    )]
    pub created: Option<DateTime<Utc>>,
    /// Capability version of the node's client.
    #[serde(rename = "Cap")]
    pub cap: i64,
    /// ACL tags (`tag:ci`); non-empty iff the node is tagged.
    #[serde(rename = "Tags", deserialize_with = "null_default")]
    pub tags: Vec<String>,
    /// Subnet routes this node is primary for.
    #[serde(rename = "PrimaryRoutes", deserialize_with = "null_default")]
    pub primary_routes: Vec<IpPrefix>,
    /// Last seen (only for offline nodes).
    #[serde(
        rename = "LastSeen",
        deserialize_with = "go_time",
        serialize_with = "ser_go_time"
    )]
    pub last_seen: Option<DateTime<Utc>>,
    /// Online status when known.
    #[serde(rename = "Online")]
    pub online: Option<bool>,
    /// Machine authorized by an admin.
    #[serde(rename = "MachineAuthorized")]
    pub machine_authorized: bool,
    /// Deprecated node capabilities.
    #[serde(rename = "Capabilities", deserialize_with = "null_default")]
    pub capabilities: Vec<String>,
    /// NODE attributes (not peer grants; those are [`WhoIs::cap_map`]).
    #[serde(rename = "CapMap", deserialize_with = "cap_map")]
    pub cap_map: CapMap,
    /// MagicDNS base name (`laptop`).
    #[serde(rename = "ComputedName", deserialize_with = "null_default")]
    pub computed_name: String,
    /// `ComputedName` with the host name when they differ.
    #[serde(rename = "ComputedNameWithHost", deserialize_with = "null_default")]
    pub computed_name_with_host: String,
    /// The node's key has expired.
    #[serde(rename = "Expired")]
    pub expired: bool,
    /// A WireGuard-only peer (not running Tailscale).
    #[serde(rename = "IsWireGuardOnly")]
    pub is_wire_guard_only: bool,
    /// A jailed node (may not initiate connections).
    #[serde(rename = "IsJailed")]
    pub is_jailed: bool,
}

impl Node {
    /// `Name` without the trailing dot (`laptop.tail1234.ts.net`), for display and audit.
    pub fn name_without_dot(&self) -> &str {
        strip_dot(&self.name)
    }

    /// True when `Tags` is non-empty (`Node.IsTagged()`).
    pub fn is_tagged(&self) -> bool {
        !self.tags.is_empty()
    }

    /// The node's tailnet IPs (the address part of each of `Addresses`).
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses.iter().map(|p| p.addr)
    }

    /// True when `ip` is one of the node's addresses.
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        self.ips().any(|a| a == ip)
    }
}

/// `tailcfg.Hostinfo`, the relevant subset (all fields may be absent).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Hostinfo {
    /// The client's version (`1.96.4-…`).
    #[serde(rename = "IPNVersion", deserialize_with = "null_default")]
    pub ipn_version: String,
    /// `linux`, `macOS`, `windows`, `iOS`, `android`, …
    #[serde(rename = "OS", deserialize_with = "null_default")]
    pub os: String,
    /// OS version text.
    #[serde(rename = "OSVersion", deserialize_with = "null_default")]
    pub os_version: String,
    /// Runs in a container (`opt.Bool`: true/false/absent).
    #[serde(rename = "Container")]
    pub container: Option<bool>,
    /// Environment (`kn`, `lm`, …).
    #[serde(rename = "Env", deserialize_with = "null_default")]
    pub env: String,
    /// Linux distribution.
    #[serde(rename = "Distro", deserialize_with = "null_default")]
    pub distro: String,
    /// Distribution version.
    #[serde(rename = "DistroVersion", deserialize_with = "null_default")]
    pub distro_version: String,
    /// Distribution code name.
    #[serde(rename = "DistroCodeName", deserialize_with = "null_default")]
    pub distro_code_name: String,
    /// tsnet app name (`golinks`, `k8s-operator`).
    #[serde(rename = "App", deserialize_with = "null_default")]
    pub app: String,
    /// A desktop machine (`opt.Bool`).
    #[serde(rename = "Desktop")]
    pub desktop: Option<bool>,
    /// Package type.
    #[serde(rename = "Package", deserialize_with = "null_default")]
    pub package: String,
    /// Device model.
    #[serde(rename = "DeviceModel", deserialize_with = "null_default")]
    pub device_model: String,
    /// The OS host name.
    #[serde(rename = "Hostname", deserialize_with = "null_default")]
    pub hostname: String,
    /// Blocks incoming connections.
    #[serde(rename = "ShieldsUp")]
    pub shields_up: bool,
    /// Shared in from another tailnet.
    #[serde(rename = "ShareeNode")]
    pub sharee_node: bool,
    /// Runs with `--no-logs-no-support`.
    #[serde(rename = "NoLogsNoSupport")]
    pub no_logs_no_support: bool,
    /// Machine type (`x86_64`).
    #[serde(rename = "Machine", deserialize_with = "null_default")]
    pub machine: String,
    /// `GOARCH`.
    #[serde(rename = "GoArch", deserialize_with = "null_default")]
    pub go_arch: String,
    /// Go version.
    #[serde(rename = "GoVersion", deserialize_with = "null_default")]
    pub go_version: String,
    /// Advertised subnet routes.
    #[serde(rename = "RoutableIPs", deserialize_with = "null_default")]
    pub routable_ips: Vec<IpPrefix>,
    /// Tags the node asked for.
    #[serde(rename = "RequestTags", deserialize_with = "null_default")]
    pub request_tags: Vec<String>,
    /// Userspace networking (`opt.Bool`).
    #[serde(rename = "Userspace")]
    pub userspace: Option<bool>,
    /// Exit node in use.
    #[serde(rename = "ExitNodeID", deserialize_with = "null_default")]
    pub exit_node_id: String,
}

// --- status --------------------------------------------------------------------------------

/// `ipn.State` / `Status.BackendState`. The bus sends it as an integer, `status` as a string.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// `NoState` (0).
    #[default]
    NoState,
    /// `InUseOtherUser` (1).
    InUseOtherUser,
    /// `NeedsLogin` (2).
    NeedsLogin,
    /// `NeedsMachineAuth` (3).
    NeedsMachineAuth,
    /// `Stopped` (4).
    Stopped,
    /// `Starting` (5).
    Starting,
    /// `Running` (6).
    Running,
    /// A state this version does not know, as sent.
    Other(String),
}

impl BackendState {
    /// From the `ipn.State` integer on the bus.
    pub fn from_code(code: i64) -> Self {
        match code {
            0 => Self::NoState,
            1 => Self::InUseOtherUser,
            2 => Self::NeedsLogin,
            3 => Self::NeedsMachineAuth,
            4 => Self::Stopped,
            5 => Self::Starting,
            6 => Self::Running,
            n => Self::Other(n.to_string()),
        }
    }

    /// The Go name (`Running`).
    pub fn as_str(&self) -> &str {
        match self {
            Self::NoState => "NoState",
            Self::InUseOtherUser => "InUseOtherUser",
            Self::NeedsLogin => "NeedsLogin",
            Self::NeedsMachineAuth => "NeedsMachineAuth",
            Self::Stopped => "Stopped",
            Self::Starting => "Starting",
            Self::Running => "Running",
            Self::Other(s) => s,
        }
    }
}

impl FromStr for BackendState {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "NoState" | "" => Self::NoState,
            "InUseOtherUser" => Self::InUseOtherUser,
            "NeedsLogin" => Self::NeedsLogin,
            "NeedsMachineAuth" => Self::NeedsMachineAuth,
            "Stopped" => Self::Stopped,
            "Starting" => Self::Starting,
            "Running" => Self::Running,
            other => Self::Other(other.to_owned()),
        })
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BackendState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Option::<Value>::deserialize(d)? {
            None => Ok(Self::NoState),
            Some(Value::String(s)) => Ok(s.parse().unwrap_or_default()),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Self::from_code)
                .ok_or_else(|| de::Error::custom(format!("invalid backend state {n}"))),
            Some(other) => Err(de::Error::custom(format!("invalid backend state {other}"))),
        }
    }
}

impl Serialize for BackendState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `ipnstate.Status` (`GET /localapi/v0/status`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Status {
    /// Daemon version (`1.96.4-t8cf541dfd-g62bc84ce7`).
    #[serde(rename = "Version", deserialize_with = "null_default")]
    pub version: String,
    /// false ⇒ userspace networking (inbound tailnet TCP arrives from 127.0.0.1).
    #[serde(rename = "TUN")]
    pub tun: bool,
    /// `Running`, `NeedsLogin`, …
    #[serde(rename = "BackendState")]
    pub backend_state: BackendState,
    /// The node has a node key.
    #[serde(rename = "HaveNodeKey")]
    pub have_node_key: bool,
    /// Interactive login URL, when one is pending.
    #[serde(rename = "AuthURL", deserialize_with = "null_default")]
    pub auth_url: String,
    /// This node's tailnet IPs (bare addresses); `null` when logged out.
    #[serde(rename = "TailscaleIPs", deserialize_with = "ip_list")]
    pub tailscale_ips: Vec<IpAddr>,
    /// This node.
    #[serde(rename = "Self")]
    pub self_: Option<PeerStatus>,
    /// Health warnings (text).
    #[serde(rename = "Health", deserialize_with = "null_default")]
    pub health: Vec<String>,
    /// Deprecated mirror of `CurrentTailnet.MagicDNSSuffix`.
    #[serde(rename = "MagicDNSSuffix", deserialize_with = "null_default")]
    pub magic_dns_suffix: String,
    /// `null` when not connected.
    #[serde(rename = "CurrentTailnet")]
    pub current_tailnet: Option<TailnetStatus>,
    /// FQDNs (no trailing dot) usable with `cert/`.
    #[serde(rename = "CertDomains", deserialize_with = "null_default")]
    pub cert_domains: Vec<String>,
    /// Peers by `nodekey:…` (`null`/absent with `peers=false`).
    #[serde(rename = "Peer", deserialize_with = "null_default")]
    pub peer: BTreeMap<String, PeerStatus>,
    /// User profiles by user ID (decimal string keys on the wire).
    #[serde(rename = "User", deserialize_with = "null_default")]
    pub user: BTreeMap<i64, UserProfile>,
}

impl Status {
    /// The tailnet name (`CurrentTailnet.Name`), when connected.
    pub fn tailnet_name(&self) -> Option<&str> {
        self.current_tailnet.as_ref().map(|t| t.name.as_str())
    }

    /// This node's MagicDNS name without the trailing dot, when it has one.
    pub fn self_dns_name(&self) -> Option<&str> {
        self.self_
            .as_ref()
            .map(PeerStatus::dns_name_without_dot)
            .filter(|n| !n.is_empty())
    }

    /// True when the backend is `Running`.
    pub fn is_running(&self) -> bool {
        self.backend_state == BackendState::Running
    }
}

/// `ipnstate.TailnetStatus`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct TailnetStatus {
    /// Tailnet name (`example.com`, `tail1234.ts.net`).
    #[serde(rename = "Name", deserialize_with = "null_default")]
    pub name: String,
    /// `tail1234.ts.net` (no dots around).
    #[serde(rename = "MagicDNSSuffix", deserialize_with = "null_default")]
    pub magic_dns_suffix: String,
    /// MagicDNS is on.
    #[serde(rename = "MagicDNSEnabled")]
    pub magic_dns_enabled: bool,
}

/// `ipnstate.PeerStatus` (also `Status.Self`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct PeerStatus {
    /// Stable node ID (a string here, unlike `Node.ID`).
    #[serde(rename = "ID", deserialize_with = "null_default")]
    pub id: String,
    /// `nodekey:<hex>`.
    #[serde(rename = "PublicKey", deserialize_with = "null_default")]
    pub public_key: String,
    /// `Hostinfo.Hostname`.
    #[serde(rename = "HostName", deserialize_with = "null_default")]
    pub host_name: String,
    /// FQDN with trailing dot (`host.tail1234.ts.net.`); empty when logged out.
    #[serde(rename = "DNSName", deserialize_with = "null_default")]
    pub dns_name: String,
    /// OS name.
    #[serde(rename = "OS", deserialize_with = "null_default")]
    pub os: String,
    /// `tailcfg.UserID`.
    #[serde(rename = "UserID")]
    pub user_id: i64,
    /// Tailnet IPs (bare addresses).
    #[serde(rename = "TailscaleIPs", deserialize_with = "ip_list")]
    pub tailscale_ips: Vec<IpAddr>,
    /// Allowed IPs (prefixes).
    #[serde(rename = "AllowedIPs", deserialize_with = "null_default")]
    pub allowed_ips: Vec<IpPrefix>,
    /// ACL tags.
    #[serde(rename = "Tags", deserialize_with = "null_default")]
    pub tags: Vec<String>,
    /// Primary subnet routes.
    #[serde(rename = "PrimaryRoutes", deserialize_with = "null_default")]
    pub primary_routes: Vec<IpPrefix>,
    /// Known endpoints.
    #[serde(rename = "Addrs", deserialize_with = "null_default")]
    pub addrs: Vec<String>,
    /// Current direct endpoint, if any.
    #[serde(rename = "CurAddr", deserialize_with = "null_default")]
    pub cur_addr: String,
    /// DERP region code in use.
    #[serde(rename = "Relay", deserialize_with = "null_default")]
    pub relay: String,
    /// Bytes received.
    #[serde(rename = "RxBytes")]
    pub rx_bytes: i64,
    /// Bytes sent.
    #[serde(rename = "TxBytes")]
    pub tx_bytes: i64,
    /// Creation time.
    #[serde(
        rename = "Created",
        deserialize_with = "go_time",
        serialize_with = "ser_go_time"
    )]
    pub created: Option<DateTime<Utc>>,
    /// Last seen.
    #[serde(
        rename = "LastSeen",
        deserialize_with = "go_time",
        serialize_with = "ser_go_time"
    )]
    pub last_seen: Option<DateTime<Utc>>,
    /// Online.
    #[serde(rename = "Online")]
    pub online: bool,
    /// Used as this node's exit node.
    #[serde(rename = "ExitNode")]
    pub exit_node: bool,
    /// Offers to be an exit node.
    #[serde(rename = "ExitNodeOption")]
    pub exit_node_option: bool,
    /// Active traffic.
    #[serde(rename = "Active")]
    pub active: bool,
    /// PeerAPI URLs.
    #[serde(rename = "PeerAPIURL", deserialize_with = "null_default")]
    pub peer_api_url: Vec<String>,
    /// Node capabilities (deprecated form).
    #[serde(rename = "Capabilities", deserialize_with = "null_default")]
    pub capabilities: Vec<String>,
    /// Node attributes.
    #[serde(rename = "CapMap", deserialize_with = "cap_map")]
    pub cap_map: CapMap,
    /// Shared in from another tailnet.
    #[serde(rename = "ShareeNode")]
    pub sharee_node: bool,
    /// Present in the network map.
    #[serde(rename = "InNetworkMap")]
    pub in_network_map: bool,
    /// Key expired.
    #[serde(rename = "Expired")]
    pub expired: bool,
    /// Key expiry.
    #[serde(
        rename = "KeyExpiry",
        deserialize_with = "go_time",
        serialize_with = "ser_go_time"
    )]
    pub key_expiry: Option<DateTime<Utc>>,
}

impl PeerStatus {
    /// `DNSName` without the trailing dot.
    pub fn dns_name_without_dot(&self) -> &str {
        strip_dot(&self.dns_name)
    }
}

// --- IPN bus -------------------------------------------------------------------------------

/// One `ipn.Notify` from `watch-ipn-bus` (one JSON object per line). Only what toolgate reacts
/// to is modelled; the netmap is recorded as present or not, never decoded.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Notify {
    /// Daemon version (on the first message of a session).
    #[serde(rename = "Version", deserialize_with = "null_default")]
    pub version: String,
    /// Watch session ID.
    #[serde(rename = "SessionID", deserialize_with = "null_default")]
    pub session_id: String,
    /// A backend error message.
    #[serde(rename = "ErrMessage")]
    pub err_message: Option<String>,
    /// An interactive login completed (`*empty.Message` present).
    #[serde(rename = "LoginFinished", deserialize_with = "present")]
    pub login_finished: bool,
    /// New backend state (the bus sends the `ipn.State` integer).
    #[serde(rename = "State")]
    pub state: Option<BackendState>,
    /// New preferences.
    #[serde(rename = "Prefs")]
    pub prefs: Option<Prefs>,
    /// A new network map was delivered (its contents are not decoded): the signal to
    /// invalidate anything derived from the netmap, such as cached WhoIs answers.
    #[serde(rename = "NetMap", deserialize_with = "present")]
    pub net_map: bool,
    /// Engine statistics (raw).
    #[serde(rename = "Engine")]
    pub engine: Option<Value>,
    /// A URL the user should open to log in.
    #[serde(rename = "BrowseToURL")]
    pub browse_to_url: Option<String>,
    /// Files are waiting (Taildrop).
    #[serde(rename = "FilesWaiting", deserialize_with = "present")]
    pub files_waiting: bool,
    /// The local TCP port (Windows).
    #[serde(rename = "LocalTCPPort")]
    pub local_tcp_port: Option<u16>,
    /// Client version info (raw).
    #[serde(rename = "ClientVersion")]
    pub client_version: Option<Value>,
    /// Health state (raw `health.State`).
    #[serde(rename = "Health")]
    pub health: Option<Value>,
    /// Suggested exit node.
    #[serde(rename = "SuggestedExitNode")]
    pub suggested_exit_node: Option<String>,
}

/// `ipn.Prefs`, the subset toolgate may look at.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Prefs {
    /// Control server URL (empty = the default).
    #[serde(rename = "ControlURL", deserialize_with = "null_default")]
    pub control_url: String,
    /// Accept subnet routes.
    #[serde(rename = "RouteAll")]
    pub route_all: bool,
    /// Use MagicDNS / tailnet DNS.
    #[serde(rename = "CorpDNS")]
    pub corp_dns: bool,
    /// Run Tailscale SSH.
    #[serde(rename = "RunSSH")]
    pub run_ssh: bool,
    /// The user wants the backend running.
    #[serde(rename = "WantRunning")]
    pub want_running: bool,
    /// Logged out.
    #[serde(rename = "LoggedOut")]
    pub logged_out: bool,
    /// Block incoming connections.
    #[serde(rename = "ShieldsUp")]
    pub shields_up: bool,
    /// Tags this node advertises.
    #[serde(rename = "AdvertiseTags", deserialize_with = "null_default")]
    pub advertise_tags: Vec<String>,
    /// Host name override.
    #[serde(rename = "Hostname", deserialize_with = "null_default")]
    pub hostname: String,
    /// Advertised routes.
    #[serde(rename = "AdvertiseRoutes", deserialize_with = "null_default")]
    pub advertise_routes: Vec<IpPrefix>,
}

/// The `mask` of `watch-ipn-bus` (`ipn.NotifyWatchOpt`). Combine with `|`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WatchMask(pub u64);

impl WatchMask {
    /// Nothing initial; only events as they happen.
    pub const NONE: Self = Self(0);
    /// Engine statistics updates.
    pub const ENGINE_UPDATES: Self = Self(1);
    /// Send the current state first.
    pub const INITIAL_STATE: Self = Self(2);
    /// Send the current prefs first.
    pub const INITIAL_PREFS: Self = Self(4);
    /// Send the current netmap first.
    pub const INITIAL_NET_MAP: Self = Self(8);
    /// No private keys (a no-op since 1.x; kept for completeness).
    pub const NO_PRIVATE_KEYS: Self = Self(16);
    /// Initial health state.
    pub const INITIAL_HEALTH_STATE: Self = Self(128);
    /// Rate-limit netmap updates.
    pub const RATE_LIMIT: Self = Self(256);

    /// The mask toolgate uses to follow the netmap: state, prefs, netmap, rate-limited.
    pub const NETMAP_WATCH: Self = Self(2 | 4 | 8 | 256);
}

impl std::ops::BitOr for WatchMask {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_forms() {
        let p: IpPrefix = "100.64.0.1/32".parse().unwrap();
        assert_eq!(p.addr, IpAddr::from([100, 64, 0, 1]));
        assert!(p.is_single_ip());
        let p: IpPrefix = "fd7a:115c:a1e0::1".parse().unwrap();
        assert_eq!(p.len, 128);
        assert!("100.64.0.1/33".parse::<IpPrefix>().is_err());
        assert!("nonsense".parse::<IpPrefix>().is_err());
        assert_eq!(p.to_string(), "fd7a:115c:a1e0::1/128");
    }

    #[test]
    fn backend_state_forms() {
        let s: BackendState = serde_json::from_str("6").unwrap();
        assert_eq!(s, BackendState::Running);
        let s: BackendState = serde_json::from_str("\"NeedsLogin\"").unwrap();
        assert_eq!(s, BackendState::NeedsLogin);
        let s: BackendState = serde_json::from_str("\"Whatever\"").unwrap();
        assert_eq!(s, BackendState::Other("Whatever".into()));
    }
}
