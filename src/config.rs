//! The daemon's configuration file (YAML; DESIGN.md §5). Unknown keys are errors that name
//! their path; every other problem names the key too. Defaults are the safe choice.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::policy::input::{Evaluation, SchemaEnforcement};
use crate::policy::parse;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `tailnet:PORT` (every tailnet IP of this node) or explicit `ip:port`.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Explicit non-loopback, non-tailnet binds need this; tailnet peers only even then.
    #[serde(default)]
    pub allow_non_tailnet: bool,
    #[serde(default)]
    pub tls: TlsMode,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub policies: PoliciesConfig,
    #[serde(default)]
    pub servers: BTreeMap<String, ServerConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub pdp: PdpConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How toolgate reaches the tailnet: the host's tailscaled, or its own (sidecar).
    #[serde(default)]
    pub tailnet: TailnetConfig,
}

/// `tailnet.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TailnetMode {
    /// The machine's tailscaled (`identity.socket`).
    #[default]
    Host,
    /// toolgate starts and supervises its own userspace-networking tailscaled and joins the
    /// tailnet as its own node (`tailnet.hostname`, `tailnet.tags`).
    Sidecar,
}

/// `tailnet:`: the sidecar node (ignored in `mode: host`, except `socks5`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailnetConfig {
    #[serde(default)]
    pub mode: TailnetMode,
    /// The tailscaled binary (sidecar mode).
    #[serde(default = "default_tailscaled")]
    pub tailscaled: PathBuf,
    /// The sidecar's state directory.
    #[serde(default = "default_tailnet_state_dir")]
    pub state_dir: PathBuf,
    /// The sidecar's LocalAPI socket; default `<state_dir>/tailscaled.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// The node's name on the tailnet.
    #[serde(default = "default_tailnet_hostname")]
    pub hostname: String,
    /// Tags the node advertises when it logs in with an auth key.
    #[serde(default = "default_tailnet_tags")]
    pub tags: Vec<String>,
    /// A self-hosted control server (`--login-server`); default: Tailscale's.
    #[serde(default)]
    pub control_url: Option<String>,
    /// A file holding the auth key (else the `TS_AUTHKEY` environment variable).
    #[serde(default)]
    pub authkey_file: Option<PathBuf>,
    /// Tailscale's log upload; `false` (default) runs tailscaled with `--no-logs-no-support`.
    #[serde(default)]
    pub logs: bool,
    /// tailscaled's SOCKS5 listener for dialing tailnet upstreams (`127.0.0.1:PORT`). Sidecar
    /// default: `127.0.0.1:1055`. In host mode, set it only if the host's tailscaled has one.
    #[serde(default)]
    pub socks5: Option<SocketAddr>,
}

fn default_tailscaled() -> PathBuf {
    PathBuf::from("tailscaled")
}
fn default_tailnet_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/toolgate/tailscale")
}
fn default_tailnet_hostname() -> String {
    "toolgate".to_string()
}
fn default_tailnet_tags() -> Vec<String> {
    vec!["tag:toolgate".to_string()]
}
/// The sidecar's SOCKS5 listener when `tailnet.socks5` is not set.
pub const DEFAULT_SIDECAR_SOCKS5: &str = "127.0.0.1:1055";

impl Default for TailnetConfig {
    fn default() -> Self {
        TailnetConfig {
            mode: TailnetMode::default(),
            tailscaled: default_tailscaled(),
            state_dir: default_tailnet_state_dir(),
            socket: None,
            hostname: default_tailnet_hostname(),
            tags: default_tailnet_tags(),
            control_url: None,
            authkey_file: None,
            logs: false,
            socks5: None,
        }
    }
}

impl TailnetConfig {
    /// The LocalAPI socket of the sidecar.
    pub fn sidecar_socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("tailscaled.sock"))
    }

    /// The SOCKS5 listener upstream requests to tailnet hosts go through, if any.
    pub fn socks5_addr(&self) -> Option<SocketAddr> {
        match self.mode {
            TailnetMode::Host => self.socks5,
            TailnetMode::Sidecar => self.socks5.or_else(|| DEFAULT_SIDECAR_SOCKS5.parse().ok()),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A separate loopback `ip:port` serving `/metrics` to anyone who can reach it. Without
    /// it, `/metrics` is served on the main listeners and gated by policy
    /// (resource kind `toolgate_metrics`, action `read`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

fn default_listen() -> Vec<String> {
    vec!["tailnet:443".to_string()]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// HTTPS with the LocalAPI certificate for the node's DNS name.
    #[default]
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityProvider {
    #[default]
    Tailscale,
    /// Dev and tests only; loopback listeners only.
    Static,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub provider: IdentityProvider,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_capability")]
    pub capability: String,
    /// `identity.provider: static`: source IP → identity fixture file.
    #[serde(default)]
    pub r#static: Option<PathBuf>,
    /// Extra roles by login, tag or group: `{login: {alice@x: [admin]}, tag: {tag:ci: [ci]}, group: {..}}`.
    #[serde(default)]
    pub role_mappings: RoleMappings,
    /// How long a WhoIs answer is reused for the same peer IP (netmap changes flush it).
    #[serde(default = "default_whois_ttl", with = "duration_text")]
    pub whois_ttl: Duration,
    /// The bound on one WhoIs call.
    #[serde(default = "default_whois_timeout", with = "duration_text")]
    pub whois_timeout: Duration,
    /// Opt-in listeners that take identity from `tailscale serve` headers (loopback/unix only).
    #[serde(default)]
    pub serve_listen: Vec<String>,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/var/run/tailscale/tailscaled.sock")
}
fn default_capability() -> String {
    "toolgate.dev/cap/toolgate".to_string()
}
fn default_whois_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_whois_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            provider: IdentityProvider::default(),
            socket: default_socket(),
            capability: default_capability(),
            r#static: None,
            role_mappings: RoleMappings::default(),
            whois_ttl: default_whois_ttl(),
            whois_timeout: default_whois_timeout(),
            serve_listen: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMappings {
    #[serde(default)]
    pub login: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub tag: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub group: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesConfig {
    #[serde(default = "default_policy_dir")]
    pub dir: PathBuf,
    #[serde(default)]
    pub evaluation: Evaluation,
    #[serde(default)]
    pub schema_enforcement: SchemaEnforcement,
    #[serde(default)]
    pub globals: Map<String, Value>,
    /// Watch the directory and reload on change (SIGHUP always reloads).
    #[serde(default = "yes")]
    pub watch: bool,
}

fn default_policy_dir() -> PathBuf {
    PathBuf::from("/etc/toolgate/policies")
}
fn yes() -> bool {
    true
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        PoliciesConfig {
            dir: default_policy_dir(),
            evaluation: Evaluation::Strict,
            schema_enforcement: SchemaEnforcement::None,
            globals: Map::new(),
            watch: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub url: String,
    #[serde(default = "default_resource_kind")]
    pub resource_kind: String,
    #[serde(default)]
    pub scope: String,
    #[serde(default = "default_upstream_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// Extra request headers; values may reference environment variables as `${NAME}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Methods the gateway does not know (extensions): `policy` (default) checks them like
    /// any other method (action = the method name); `deny` refuses them outright.
    #[serde(default)]
    pub unknown_methods: UnknownMethods,
    /// The longest a server→client stream (the handshake era's GET stream) stays open;
    /// clients reconnect after it. Request/response calls are bounded by `timeout`.
    #[serde(default = "default_max_stream", with = "duration_text")]
    pub max_stream: Duration,
}

fn default_max_stream() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownMethods {
    #[default]
    Policy,
    Deny,
}

fn default_resource_kind() -> String {
    "mcp_server".to_string()
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    #[serde(default = "default_audit_db")]
    pub sqlite: PathBuf,
    /// `sync` (default): an allowed call is forwarded only after its row is committed.
    /// `async`: forwarded once the row is queued; a crash or disk failure can lose the most recent
    /// rows of calls that did run (counted in `audit_async_rows_lost_total`).
    #[serde(default)]
    pub mode: AuditMode,
    /// `full` (default; `synchronous=FULL`, survives power loss) or `normal` (survives a crash).
    #[serde(default)]
    pub durability: Durability,
    /// What is stored of a call's arguments: none | digest (default) | redacted | full.
    #[serde(default)]
    pub arguments: ArgumentsMode,
    /// Extra secret key names for `redacted` mode (matched loosely, like the built-in ones).
    #[serde(default)]
    pub secret_keys: Vec<String>,
    /// Cap on the stored arguments JSON (`redacted`/`full`), in bytes.
    #[serde(default = "default_max_argument_bytes")]
    pub max_argument_bytes: usize,
    /// Rows older than this are pruned (e.g. `90d`); absent: kept forever.
    #[serde(default, with = "opt_duration_text")]
    pub retention: Option<Duration>,
    /// Rows per transaction at most.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// The longest a row waits for more rows to share its transaction (async mode; sync mode
    /// commits as soon as the queue is empty).
    #[serde(default = "default_batch_ms")]
    pub batch_ms: u64,
    /// Rows waiting for the writer at most; beyond it submissions fail (503 + Retry-After).
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
    /// Cap on the database size in bytes (`max_page_count`): the store fails closed before the disk fills.
    #[serde(default)]
    pub max_db_bytes: Option<u64>,
    /// This gateway's name in fleet rows; default: the host name.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Fleet sink: `postgres://user@host:5432/db`; `${NAME}` takes text (a password) from the environment.
    #[serde(default)]
    pub postgres: Option<String>,
    /// The Postgres schema holding the fleet tables.
    #[serde(default = "default_postgres_schema")]
    pub postgres_schema: String,
}

fn default_audit_db() -> PathBuf {
    PathBuf::from("/var/lib/toolgate/audit.db")
}
fn default_max_argument_bytes() -> usize {
    4096
}
fn default_batch_rows() -> usize {
    256
}
fn default_batch_ms() -> u64 {
    10
}
fn default_audit_queue() -> usize {
    4096
}
fn default_postgres_schema() -> String {
    "toolgate".to_string()
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            sqlite: default_audit_db(),
            mode: AuditMode::default(),
            durability: Durability::default(),
            arguments: ArgumentsMode::default(),
            secret_keys: Vec::new(),
            max_argument_bytes: default_max_argument_bytes(),
            retention: None,
            batch_rows: default_batch_rows(),
            batch_ms: default_batch_ms(),
            queue: default_audit_queue(),
            max_db_bytes: None,
            gateway: None,
            postgres: None,
            postgres_schema: default_postgres_schema(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditMode {
    #[default]
    Sync,
    Async,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Normal,
    #[default]
    Full,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgumentsMode {
    None,
    #[default]
    Digest,
    Redacted,
    Full,
}

/// An optional duration as text (`90d`); absent or null is `None`.
mod opt_duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::duration_text::parse(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PdpConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Who may assert principals: `role:NAME` or `tag:NAME` of the caller's own principal.
    #[serde(default = "default_pdp_callers")]
    pub callers: Vec<String>,
    #[serde(default)]
    pub request_limits: RequestLimits,
    #[serde(default)]
    pub jwt_keysets: Vec<Value>,
}

fn default_pdp_callers() -> Vec<String> {
    vec!["role:pdp".to_string()]
}

impl Default for PdpConfig {
    fn default() -> Self {
        PdpConfig {
            enabled: true,
            callers: default_pdp_callers(),
            request_limits: RequestLimits::default(),
            jwt_keysets: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimits {
    #[serde(default = "fifty")]
    pub max_actions_per_resource: usize,
    #[serde(default = "fifty")]
    pub max_resources_per_request: usize,
}

fn fifty() -> usize {
    50
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_actions_per_resource: 50,
            max_resources_per_request: 50,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human) or `json`; default: text on a terminal, json otherwise.
    #[serde(default)]
    pub format: Option<String>,
    /// A tracing filter, e.g. `info,toolgate=debug`.
    #[serde(default)]
    pub level: Option<String>,
}

/// Durations as text: `500ms`, `2s`, `5m`, `1h`, `90d`.
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// Parses `<number><unit>` with unit one of ms, s, m, h, d.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h, d)"))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {s:?}: {num:?} is not a number"))?;
        let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs);
        let d = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => secs(1),
            "m" => secs(60),
            "h" => secs(3600),
            "d" => secs(86_400),
            _ => {
                return Err(format!(
                    "duration {s:?}: unknown unit {unit:?} (ms, s, m, h, d)"
                ));
            }
        };
        d.ok_or_else(|| format!("duration {s:?} is too large"))
    }
}

/// A configuration problem, located.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

/// A listen entry, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// Every tailnet IP of this node, on this port.
    Tailnet(u16),
    Addr(SocketAddr),
}

pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(port) = s.strip_prefix("tailnet:") {
        return port
            .parse()
            .map(Listen::Tailnet)
            .map_err(|_| format!("listen {s:?}: {port:?} is not a port"));
    }
    s.parse()
        .map(Listen::Addr)
        .map_err(|_| format!("listen {s:?}: want \"tailnet:PORT\" or \"IP:PORT\""))
}

impl Config {
    /// Reads, parses and checks a config file. Relative paths are taken relative to its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&file, &bytes, path.parent().unwrap_or(Path::new(".")))
    }

    pub fn parse(file: &str, bytes: &[u8], base: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = parse::document(file, bytes).map_err(|e| ConfigError {
            file: file.to_string(),
            message: e.to_string(),
        })?;
        let err = |message: String| ConfigError {
            file: file.to_string(),
            message,
        };
        if cfg.listen.is_empty() {
            return Err(err("$.listen: at least one listen entry is needed".into()));
        }
        for (i, l) in cfg.listen.iter().enumerate() {
            parse_listen(l).map_err(|e| err(format!("$.listen[{i}]: {e}")))?;
        }
        for (name, s) in &cfg.servers {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(format!(
                    "$.servers.{name}: server names are letters, digits, - and _"
                )));
            }
            if !(s.url.starts_with("http://") || s.url.starts_with("https://")) {
                return Err(err(format!(
                    "$.servers.{name}.url: {:?} is not an http(s) URL",
                    s.url
                )));
            }
        }
        for c in &cfg.pdp.callers {
            if !(c.starts_with("role:") || c.starts_with("tag:")) {
                return Err(err(format!(
                    "$.pdp.callers: {c:?} must be role:NAME or tag:NAME"
                )));
            }
        }
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut cfg.policies.dir);
        rebase(&mut cfg.audit.sqlite);
        let a = &cfg.audit;
        if !(1..=100_000).contains(&a.batch_rows) {
            return Err(err("$.audit.batch_rows: between 1 and 100000".into()));
        }
        if !(1..=1_000_000).contains(&a.queue) {
            return Err(err("$.audit.queue: between 1 and 1000000".into()));
        }
        if a.batch_ms > 10_000 {
            return Err(err("$.audit.batch_ms: at most 10000".into()));
        }
        if a.max_argument_bytes < 64 {
            return Err(err("$.audit.max_argument_bytes: at least 64".into()));
        }
        if let Some(url) = &a.postgres
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(err("$.audit.postgres: want a postgres:// URL".into()));
        }
        if a.postgres_schema.is_empty()
            || a.postgres_schema.len() > 63
            || !a
                .postgres_schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            || a.postgres_schema.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(err(
                "$.audit.postgres_schema: lower-case letters, digits and _".into(),
            ));
        }
        if let Some(p) = cfg.identity.r#static.as_mut() {
            rebase(p);
        }
        if let Some(m) = cfg.metrics.listen {
            if !m.ip().is_loopback() {
                return Err(err(format!(
                    "$.metrics.listen: {m} must be a loopback address (it has no access control)"
                )));
            }
        }
        let t = &mut cfg.tailnet;
        rebase(&mut t.state_dir);
        if let Some(p) = t.socket.as_mut() {
            rebase(p);
        }
        if let Some(p) = t.authkey_file.as_mut() {
            rebase(p);
        }
        // A bare name (`tailscaled`) is looked up in PATH; a relative path is taken from the folder.
        if t.tailscaled.components().count() > 1 {
            rebase(&mut t.tailscaled);
        }
        if t.hostname.is_empty()
            || t.hostname.len() > 63
            || !t
                .hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(err(format!(
                "$.tailnet.hostname: {:?} must be a DNS label (letters, digits, -)",
                t.hostname
            )));
        }
        for tag in &t.tags {
            let name = tag.strip_prefix("tag:").unwrap_or_default();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(format!(
                    "$.tailnet.tags: {tag:?} must look like tag:NAME"
                )));
            }
        }
        if let Some(u) = &t.control_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(err(format!(
                "$.tailnet.control_url: {u:?} is not an http(s) URL"
            )));
        }
        if let Some(a) = t.socks5
            && !a.ip().is_loopback()
        {
            return Err(err(format!(
                "$.tailnet.socks5: {a} must be a loopback address (it has no access control)"
            )));
        }
        if cfg.identity.provider == IdentityProvider::Static && cfg.identity.r#static.is_none() {
            return Err(err(
                "$.identity.static: provider static needs a fixture file".into(),
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Config, ConfigError> {
        Config::parse("toolgate.yaml", s.as_bytes(), Path::new("/etc/toolgate"))
    }

    #[test]
    fn defaults_are_safe() {
        let c = parse_str("servers: {}\n").unwrap();
        assert_eq!(c.listen, vec!["tailnet:443"]);
        assert_eq!(c.tls, TlsMode::Auto);
        assert_eq!(c.identity.provider, IdentityProvider::Tailscale);
        assert_eq!(c.policies.evaluation, Evaluation::Strict);
        assert_eq!(c.pdp.callers, vec!["role:pdp"]);
    }

    #[test]
    fn the_design_example_parses() {
        let c = parse_str(
            r#"
listen: [tailnet:443, "127.0.0.1:8443"]
tls: auto
identity:
  provider: tailscale
  socket: /var/run/tailscale/tailscaled.sock
  capability: toolgate.dev/cap/toolgate
policies:
  dir: policies
  evaluation: strict
  schema_enforcement: none
  globals: {env: prod}
servers:
  github:
    url: http://127.0.0.1:9001/mcp
    resource_kind: mcp_server
    scope: ""
audit:
  sqlite: /var/lib/toolgate/audit.db
pdp:
  enabled: true
  callers: [role:pdp]
  request_limits: {max_actions_per_resource: 50, max_resources_per_request: 50}
  jwt_keysets: [{id: cerbos, local: {file: keys/verify.jwk}}]
"#,
        )
        .unwrap();
        assert_eq!(c.policies.dir, PathBuf::from("/etc/toolgate/policies"));
        assert_eq!(
            parse_listen(&c.listen[1]).unwrap(),
            Listen::Addr("127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(c.servers["github"].timeout, Duration::from_secs(60));
    }

    #[test]
    fn mistakes_name_their_key() {
        let e = parse_str("servers: {}\nlisen: [x]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = parse_str("identity: {provider: static}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("$.identity.static"), "{e}");
        let e = parse_str("listen: [\"tailnet:http\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("$.listen[0]"), "{e}");
        let e = parse_str("servers: {gh: {url: ftp://x}}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("$.servers.gh.url"), "{e}");
        let e = parse_str("identity: {whois_ttl: 5 minutes}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("identity.whois_ttl"), "{e}");
    }

    #[test]
    fn audit_settings() {
        let c = parse_str("servers: {}\n").unwrap();
        assert_eq!(c.audit.mode, AuditMode::Sync);
        assert_eq!(c.audit.durability, Durability::Full);
        assert_eq!(c.audit.arguments, ArgumentsMode::Digest);
        assert_eq!(c.audit.retention, None);
        let c = parse_str(
            "audit: {sqlite: a.db, mode: async, durability: normal, arguments: redacted, secret_keys: [x-internal],\n  retention: 90d, batch_rows: 500, batch_ms: 5, queue: 100, max_db_bytes: 1048576,\n  postgres: \"postgres://u@h/db\", postgres_schema: fleet, gateway: gw1, max_argument_bytes: 2048}\n",
        )
        .unwrap();
        assert_eq!(c.audit.sqlite, PathBuf::from("/etc/toolgate/a.db"));
        assert_eq!(c.audit.mode, AuditMode::Async);
        assert_eq!(c.audit.retention, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(c.audit.arguments, ArgumentsMode::Redacted);
        for (bad, key) in [
            ("audit: {retention: forever}\n", "audit.retention"),
            ("audit: {mode: later}\n", "audit.mode"),
            ("audit: {batch_rows: 0}\n", "$.audit.batch_rows"),
            ("audit: {postgres: \"mysql://x\"}\n", "$.audit.postgres"),
            (
                "audit: {postgres_schema: \"a;drop\"}\n",
                "$.audit.postgres_schema",
            ),
            ("audit: {sqllite: x}\n", "sqllite"),
        ] {
            let e = parse_str(bad).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/config.example.yaml");
        let bytes = std::fs::read(&path).unwrap();
        let c = Config::parse("config.example.yaml", &bytes, Path::new("/etc/toolgate")).unwrap();
        assert_eq!(
            c.servers["github"].headers["Authorization"],
            "Bearer ${GITHUB_MCP_TOKEN}"
        );
    }

    #[test]
    fn tailnet_section() {
        let c = parse_str("servers: {}\n").unwrap();
        assert_eq!(c.tailnet.mode, TailnetMode::Host);
        assert_eq!(c.tailnet.hostname, "toolgate");
        assert_eq!(c.tailnet.tags, vec!["tag:toolgate"]);
        assert!(!c.tailnet.logs);
        assert_eq!(c.tailnet.socks5_addr(), None);
        let c = parse_str(
            "tailnet: {mode: sidecar, state_dir: ts, tailscaled: bin/tailscaled, hostname: gw1,\n  tags: [tag:mcp], control_url: \"http://127.0.0.1:8080\", authkey_file: key, socks5: \"127.0.0.1:1081\"}\n",
        )
        .unwrap();
        assert_eq!(c.tailnet.mode, TailnetMode::Sidecar);
        assert_eq!(c.tailnet.state_dir, PathBuf::from("/etc/toolgate/ts"));
        assert_eq!(
            c.tailnet.sidecar_socket(),
            PathBuf::from("/etc/toolgate/ts/tailscaled.sock")
        );
        assert_eq!(
            c.tailnet.tailscaled,
            PathBuf::from("/etc/toolgate/bin/tailscaled")
        );
        assert_eq!(
            c.tailnet.authkey_file,
            Some(PathBuf::from("/etc/toolgate/key"))
        );
        assert_eq!(c.tailnet.socks5_addr(), "127.0.0.1:1081".parse().ok());
        let c = parse_str("tailnet: {mode: sidecar}\n").unwrap();
        assert_eq!(c.tailnet.tailscaled, PathBuf::from("tailscaled"));
        assert_eq!(c.tailnet.socks5_addr(), "127.0.0.1:1055".parse().ok());
        for (bad, key) in [
            ("tailnet: {mode: tun}\n", "tailnet.mode"),
            ("tailnet: {hostname: \"a b\"}\n", "$.tailnet.hostname"),
            ("tailnet: {tags: [ci]}\n", "$.tailnet.tags"),
            (
                "tailnet: {control_url: \"ftp://x\"}\n",
                "$.tailnet.control_url",
            ),
            ("tailnet: {socks5: \"0.0.0.0:1055\"}\n", "$.tailnet.socks5"),
            ("tailnet: {authkey: tskey-x}\n", "authkey"),
        ] {
            let e = parse_str(bad).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            duration_text::parse("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(
            duration_text::parse("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert!(duration_text::parse("5").is_err());
        assert!(duration_text::parse("5y").is_err());
    }
}
