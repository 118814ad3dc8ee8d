//! The daemon's configuration file (YAML; DESIGN.md §5), read in two steps.
//!
//! 1. The file is read once into [`RawConfig`]: plain serde types, unknown keys are errors that
//!    name their YAML path, durations are text (`1h30m`, `1.5h`, `90d`: [`duration_text`]).
//! 2. [`RawConfig::build`] checks every section (one function per section, every problem
//!    collected, not just the first) and produces the typed [`Config`] the daemon uses: listen
//!    entries parsed, upstream URLs parsed and `${ENV}` header values expanded, relative paths
//!    taken from the file's folder. Limits sit next to their section as named constants.
//!    [`RawConfig::build_recording`] (for `doctor`) records unset `${ENV}` references, with
//!    where each is used, instead of failing on them.
//!
//! Defaults are the safe choice. Tools that need one section (`audit query --config`,
//! `whois --config`) build only that section, so an upstream's secret need not be in their
//! environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

pub use crate::pdp::jwt::{JwtKeySetConfig, LocalKeySet};
use crate::policy::input::{Evaluation, SchemaEnforcement};
use crate::policy::parse;

#[path = "config/duration.rs"]
pub mod duration_text;
#[path = "config/hooks.rs"]
pub mod hooks;

/// `audit.retention` and other optional durations (`with = "opt_duration_text"`).
use duration_text::optional as opt_duration_text;

// ============================================================================================
// The file as written
// ============================================================================================

/// The config file as written: serde types only, checked by [`RawConfig::build`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
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
    /// Bounds and containment of stdio servers (`servers.<name>.command`).
    #[serde(default)]
    pub stdio: StdioConfig,
    /// The aggregated endpoint `/mcp`.
    #[serde(default)]
    pub aggregate: AggregateConfig,
    /// Daemon-wide bounds.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Webhooks for LLM gateways (`hooks.aperture`).
    #[serde(default)]
    pub hooks: hooks::HooksConfig,
}

/// The checked configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Parsed listen entries (at least one).
    pub listen: Vec<Listen>,
    pub allow_non_tailnet: bool,
    pub tls: TlsMode,
    pub identity: IdentityConfig,
    pub policies: PoliciesConfig,
    /// Upstream MCP servers by name: URL parsed, headers expanded.
    pub servers: BTreeMap<String, Server>,
    pub audit: AuditConfig,
    pub pdp: PdpConfig,
    pub log: Log,
    pub metrics: MetricsConfig,
    pub tailnet: TailnetConfig,
    pub stdio: StdioConfig,
    pub aggregate: AggregateConfig,
    pub limits: LimitsConfig,
    pub hooks: hooks::HooksConfig,
}

// ============================================================================================
// listen
// ============================================================================================

fn default_listen() -> Vec<String> {
    vec!["tailnet:443".to_string()]
}

/// A listen entry, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Every tailnet IP of this node, on this port.
    Tailnet(u16),
    Addr(SocketAddr),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tailnet(port) => write!(f, "tailnet:{port}"),
            Listen::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// Parses one listen entry: `tailnet:PORT` or `IP:PORT` (`[v6]:PORT`).
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

/// Is `ip` a tailnet address (100.64.0.0/10 or fd7a:115c:a1e0::/48)? IPv4-mapped IPv6
/// addresses count as their IPv4 address.
pub fn is_tailnet_ip(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 100 && (o[1] & 0xC0) == 64
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
        }
    }
}

// ============================================================================================
// tls
// ============================================================================================

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// HTTPS with the LocalAPI certificate for the node's DNS name.
    #[default]
    Auto,
    Off,
}

// ============================================================================================
// tailnet
// ============================================================================================

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
/// `tailnet.hostname` is one DNS label.
pub const MAX_DNS_LABEL: usize = 63;

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

// ============================================================================================
// metrics
// ============================================================================================

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A separate loopback `ip:port` serving `/metrics` to anyone who can reach it. Without
    /// it, `/metrics` is served on the main listeners and gated by policy
    /// (resource kind `toolgate_metrics`, action `read`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

// ============================================================================================
// identity
// ============================================================================================

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
    /// An open connection re-resolves its caller after this (and on every netmap change).
    #[serde(default = "default_max_age", with = "duration_text")]
    pub max_age: Duration,
    /// Opt-in listeners that take identity from `tailscale serve` headers (loopback/unix only).
    #[serde(default)]
    pub serve_listen: Vec<String>,
}

/// `identity.whois_ttl` default.
pub const DEFAULT_WHOIS_TTL: Duration = Duration::from_secs(30);
/// `identity.whois_timeout` default.
pub const DEFAULT_WHOIS_TIMEOUT: Duration = Duration::from_secs(2);
/// `identity.max_age` default: how long an open connection keeps its resolved caller.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);
/// `identity.whois_timeout` at most: a caller waits this long for its first byte.
pub const MAX_WHOIS_TIMEOUT: Duration = Duration::from_secs(60);

fn default_socket() -> PathBuf {
    PathBuf::from("/var/run/tailscale/tailscaled.sock")
}
fn default_capability() -> String {
    "toolgate.dev/cap/toolgate".to_string()
}
fn default_whois_ttl() -> Duration {
    DEFAULT_WHOIS_TTL
}
fn default_whois_timeout() -> Duration {
    DEFAULT_WHOIS_TIMEOUT
}
fn default_max_age() -> Duration {
    DEFAULT_MAX_AGE
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
            max_age: default_max_age(),
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

// ============================================================================================
// policies
// ============================================================================================

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesConfig {
    #[serde(default = "default_policy_dir")]
    pub dir: PathBuf,
    #[serde(default)]
    pub evaluation: Evaluation,
    #[serde(default)]
    pub schema_enforcement: SchemaEnforcement,
    /// Shared by every check (`Params::globals`), never copied per call.
    #[serde(default, deserialize_with = "shared_map")]
    pub globals: std::sync::Arc<Map<String, Value>>,
    /// Watch the directory and reload on change (SIGHUP always reloads).
    #[serde(default = "yes")]
    pub watch: bool,
    /// A second policy set evaluated beside the live one, off the request path, for every
    /// decision; differences become audit rows of kind `shadow` (see `crate::shadow`). Reloads
    /// like `dir`. A broken shadow set never changes a live decision.
    #[serde(default)]
    pub shadow: Option<PathBuf>,
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
            globals: Default::default(),
            watch: true,
            shadow: None,
        }
    }
}

// ============================================================================================
// servers
// ============================================================================================

/// `servers.<name>` as written: an HTTP upstream (`url`) or a stdio one (`command`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// An MCP server reached over Streamable HTTP.
    #[serde(default)]
    pub url: Option<String>,
    /// A stdio MCP server toolgate starts itself: argv (the program is looked up in the
    /// child's `PATH`). One child per MCP session; stateless callers get one per identity.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The stdio child's extra environment; values may reference toolgate's own environment
    /// as `${NAME}` (keep secrets out of the file). Only `PATH`, `HOME`, `LANG`, `LC_ALL`,
    /// `LC_CTYPE`, `TZ`, `TMPDIR`, `USER` and `LOGNAME` are passed on otherwise.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The stdio child's working directory (relative to the config file's folder).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// A stdio child with no call and no open stream for this long is stopped (default 5m).
    #[serde(default, with = "opt_duration_text")]
    pub idle_timeout: Option<Duration>,
    /// At most this many children of this stdio server at once (default 16); more: 503.
    #[serde(default)]
    pub max_children: Option<usize>,
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
    /// The largest client message, in bytes (default 1 MiB); larger bodies get 413.
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// The most JSON values in a client message (default 10,000): parsed, many small values
    /// cost far more memory than their bytes.
    #[serde(default = "default_max_nodes")]
    pub max_nodes: usize,
}

/// How toolgate reaches one upstream.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Streamable HTTP at this URL.
    Http(reqwest::Url),
    /// A child process toolgate starts.
    Stdio(StdioCommand),
}

/// `servers.<name>.command` and its companions, checked.
#[derive(Clone)]
pub struct StdioCommand {
    pub command: Vec<String>,
    /// The `env` entries, `${NAME}` expanded (secrets: never logged, see `Debug`).
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub idle_timeout: Duration,
    pub max_children: usize,
}

impl fmt::Debug for StdioCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("StdioCommand")
            .field("command", &self.command)
            .field("env (values withheld)", &env)
            .field("cwd", &self.cwd)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_children", &self.max_children)
            .finish()
    }
}

/// `servers.<name>.max_children` bounds.
pub const STDIO_MAX_CHILDREN: RangeInclusive<usize> = 1..=1024;

/// `servers.<name>`, checked: the URL parsed (or the command checked), header and env values
/// expanded from the environment.
#[derive(Clone)]
pub struct Server {
    pub transport: Transport,
    pub resource_kind: String,
    pub scope: String,
    pub timeout: Duration,
    /// Extra request headers, `${NAME}` expanded (secrets: never logged, see `Debug`).
    pub headers: Vec<(String, String)>,
    pub unknown_methods: UnknownMethods,
    pub max_stream: Duration,
    pub max_body: usize,
    pub max_nodes: usize,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Server")
            .field("transport", &self.transport)
            .field("resource_kind", &self.resource_kind)
            .field("scope", &self.scope)
            .field("timeout", &self.timeout)
            .field("headers (values withheld)", &headers)
            .field("unknown_methods", &self.unknown_methods)
            .field("max_stream", &self.max_stream)
            .field("max_body", &self.max_body)
            .field("max_nodes", &self.max_nodes)
            .finish()
    }
}

impl Server {
    /// The URL of an HTTP upstream.
    pub fn url(&self) -> Option<&reqwest::Url> {
        match &self.transport {
            Transport::Http(u) => Some(u),
            Transport::Stdio(_) => None,
        }
    }

    /// The command of a stdio upstream.
    pub fn stdio(&self) -> Option<&StdioCommand> {
        match &self.transport {
            Transport::Stdio(c) => Some(c),
            Transport::Http(_) => None,
        }
    }
}

/// `servers.<name>.timeout` default.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// `servers.<name>.max_stream` default.
pub const DEFAULT_MAX_STREAM: Duration = Duration::from_secs(3600);
/// Server names are letters, digits, `-` and `_`, at most this long (they appear in routes
/// and in `server__tool` names).
pub const MAX_SERVER_NAME: usize = 64;

fn default_max_stream() -> Duration {
    DEFAULT_MAX_STREAM
}
/// `servers.<name>.max_body` bounds: at least a small call, at most 64 MiB.
pub const MAX_BODY_RANGE: std::ops::RangeInclusive<usize> = 1024..=64 * 1024 * 1024;
/// `servers.<name>.max_nodes` bounds.
pub const MAX_NODES_RANGE: std::ops::RangeInclusive<usize> = 16..=1_000_000;
fn default_max_body() -> usize {
    crate::mcp::jsonrpc::DEFAULT_MAX_BYTES
}
fn default_max_nodes() -> usize {
    crate::mcp::jsonrpc::DEFAULT_MAX_NODES
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
    DEFAULT_UPSTREAM_TIMEOUT
}

// ============================================================================================
// audit
// ============================================================================================

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
    /// Milliseconds, or a duration (`5ms`, `0.5s`).
    #[serde(default = "default_batch_ms", with = "duration_text::millis")]
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
    /// Fleet sink: `postgres://user@host:5432/db`; `${NAME}` takes text (a password) from the
    /// environment when the shipper connects ([`expand_env`]).
    #[serde(default)]
    pub postgres: Option<String>,
    /// The Postgres schema holding the fleet tables.
    #[serde(default = "default_postgres_schema")]
    pub postgres_schema: String,
    /// The per-install HMAC key of the chain, created (mode 0600) on first start; default
    /// `audit.key` next to the database. Keep it out of the database's backups' reach.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `audit.batch_rows`: rows per transaction at most (default 8192). A commit takes what is
/// queued, so this only matters under a backlog; there, each commit writes every index page it
/// dirtied once, and with many distinct callers that is about one principal-index page per
/// caller whatever the batch holds: larger batches share those pages among more rows
/// (docs/benchmarks.md, "Group commit size").
pub const AUDIT_BATCH_ROWS: RangeInclusive<usize> = 1..=100_000;
pub const DEFAULT_AUDIT_BATCH_ROWS: usize = 8192;
/// `audit.queue`: rows waiting for the writer (default 16384: two full batches, so one can fill
/// while the other commits; about 1 KiB each when full).
pub const AUDIT_QUEUE: RangeInclusive<usize> = 1..=1_000_000;
pub const DEFAULT_AUDIT_QUEUE: usize = 16_384;
/// `audit.batch_ms`: at most 10 s (default 10 ms).
pub const MAX_AUDIT_BATCH_MS: u64 = 10_000;
pub const DEFAULT_AUDIT_BATCH_MS: u64 = 10;
/// `audit.max_argument_bytes`: at least 64 (default 4096).
pub const MIN_AUDIT_ARGUMENT_BYTES: usize = 64;
pub const DEFAULT_AUDIT_ARGUMENT_BYTES: usize = 4096;
/// `audit.postgres_schema`: a PostgreSQL identifier (NAMEDATALEN - 1).
pub const MAX_POSTGRES_SCHEMA: usize = 63;

fn default_audit_db() -> PathBuf {
    PathBuf::from("/var/lib/toolgate/audit.db")
}
fn default_max_argument_bytes() -> usize {
    DEFAULT_AUDIT_ARGUMENT_BYTES
}
fn default_batch_rows() -> usize {
    DEFAULT_AUDIT_BATCH_ROWS
}
fn default_batch_ms() -> u64 {
    DEFAULT_AUDIT_BATCH_MS
}
fn default_audit_queue() -> usize {
    DEFAULT_AUDIT_QUEUE
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
            key_file: None,
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

/// Is `s` a schema name we accept (lower-case letters, digits and `_`, not starting with a
/// digit)? Quoting is never needed for such a name.
pub fn valid_postgres_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_POSTGRES_SCHEMA
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

// ============================================================================================
// pdp
// ============================================================================================

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PdpConfig {
    /// Serve the Cerbos-compatible API (`/api/check/resources`, ...) on the listeners.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Who may assert principals: `role:NAME` or `tag:NAME` of the caller's own principal.
    #[serde(default = "default_pdp_callers")]
    pub callers: Vec<String>,
    /// Other identified callers may check for themselves only (their WhoIs principal replaces
    /// the body's); without it they get 403 `PERMISSION_DENIED`.
    #[serde(default)]
    pub self_only: bool,
    #[serde(default)]
    pub request_limits: RequestLimits,
    /// Key sets for `auxData.jwt` (Cerbos's `auxData.jwt.keySets`): `{id, local: {file}}` or
    /// `{id, local: {data: <base64 JWKS>}}`.
    #[serde(default)]
    pub jwt_keysets: Vec<JwtKeySetConfig>,
    /// The key sets, read when the daemon is built ([`crate::pdp::jwt::KeySets::load`]).
    #[serde(skip)]
    pub keysets: std::sync::Arc<crate::pdp::jwt::KeySets>,
}

fn shared_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::sync::Arc<Map<String, Value>>, D::Error> {
    Map::deserialize(d).map(std::sync::Arc::new)
}

fn default_pdp_callers() -> Vec<String> {
    vec!["role:pdp".to_string()]
}

impl Default for PdpConfig {
    fn default() -> Self {
        PdpConfig {
            enabled: true,
            callers: default_pdp_callers(),
            self_only: false,
            request_limits: RequestLimits::default(),
            jwt_keysets: Vec::new(),
            keysets: Default::default(),
        }
    }
}

/// `pdp.request_limits.*` default (Cerbos's).
pub const DEFAULT_PDP_REQUEST_LIMIT: usize = 50;
/// `pdp.request_limits.*` at most.
pub const MAX_PDP_REQUEST_LIMIT: usize = 10_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimits {
    #[serde(default = "default_pdp_request_limit")]
    pub max_actions_per_resource: usize,
    #[serde(default = "default_pdp_request_limit")]
    pub max_resources_per_request: usize,
}

fn default_pdp_request_limit() -> usize {
    DEFAULT_PDP_REQUEST_LIMIT
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_actions_per_resource: DEFAULT_PDP_REQUEST_LIMIT,
            max_resources_per_request: DEFAULT_PDP_REQUEST_LIMIT,
        }
    }
}

// ============================================================================================
// log
// ============================================================================================

/// `log:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human) or `json`. Default: text under journald (`JOURNAL_STREAM`) and on a
    /// terminal (ANSI colours only there), json otherwise.
    #[serde(default)]
    pub format: Option<LogFormat>,
    /// A tracing filter, e.g. `info,toolgate=debug`.
    #[serde(default)]
    pub level: Option<String>,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `log:`, checked: the level is a valid tracing filter.
#[derive(Debug, Clone, Default)]
pub struct Log {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
}

// ============================================================================================
// ${ENV} expansion
// ============================================================================================

/// Replaces every `${NAME}` in `text` with the environment variable NAME. A missing variable,
/// an empty or malformed name, or an unclosed `${` is an error naming it. One function for
/// upstream headers and the Postgres URL.
pub fn expand_env(text: &str) -> Result<String, String> {
    expand_with(text, |name| std::env::var(name).ok())
}

/// [`expand_env`] with an explicit lookup (tests, `doctor`).
pub fn expand_with(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unclosed \"${\" (want ${NAME})".to_string())?;
        let name = &after[..end];
        if !valid_env_name(name) {
            return Err(format!(
                "\"${{{name}}}\" is not an environment variable reference (letters, digits and _)"
            ));
        }
        let value =
            lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `${NAME}` references in `text`, in order (well-formed ones only).
pub fn env_refs(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else { break };
        let name = &after[..end];
        if valid_env_name(name) {
            out.push(name);
        }
        rest = &after[end + 1..];
    }
    out
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

// ============================================================================================
// Errors
// ============================================================================================

/// Every problem found in one config file, each with its YAML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// `$.audit.batch_rows: between 1 and 100000`, one per problem, in file order of sections.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    /// One line per problem, each starting with the file (as compilers do).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {p}", self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects problems while the sections are checked.
#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, path: impl fmt::Display, message: impl fmt::Display) {
        self.0.push(format!("{path}: {message}"));
    }
}

/// A `${NAME}` reference whose variable is not set, and where the config uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsetVar {
    /// The variable's name.
    pub name: String,
    /// The YAML path of the value that references it (`$.servers.github.headers.Authorization`).
    pub at: String,
}

/// What a section check needs besides its own section.
struct Cx<'a> {
    /// The config file's folder: relative paths are taken from it.
    base: &'a Path,
    /// Environment lookup for `${NAME}`.
    env: &'a dyn Fn(&str) -> Option<String>,
    /// When given, an unset `${NAME}` is recorded here and expands to the empty string instead
    /// of being a problem (`doctor` lists every one of them, not just the first).
    unset: Option<&'a std::cell::RefCell<Vec<UnsetVar>>>,
}

impl Cx<'_> {
    fn rebase(&self, p: &mut PathBuf) {
        if p.is_relative() {
            *p = self.base.join(&*p);
        }
    }

    /// Expands `${NAME}` in the value at YAML path `at`.
    fn expand(&self, at: &str, text: &str) -> Result<String, String> {
        let Some(unset) = self.unset else {
            return expand_with(text, self.env);
        };
        expand_with(text, |name| {
            (self.env)(name).or_else(|| {
                unset.borrow_mut().push(UnsetVar {
                    name: name.to_string(),
                    at: at.to_string(),
                });
                Some(String::new())
            })
        })
    }
}

// ============================================================================================
// Loading and checking
// ============================================================================================

impl RawConfig {
    /// Parses the YAML (unknown keys and type errors are reported with their path; serde stops
    /// at the first).
    pub fn parse(file: &str, bytes: &[u8]) -> Result<RawConfig, ConfigError> {
        parse::document(file, bytes).map_err(|e| ConfigError {
            file: file.to_string(),
            problems: vec![e.to_string()],
        })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![format!("cannot read: {e}")],
        })?;
        RawConfig::parse(&file, &bytes)
    }

    /// Checks every section and builds the typed config; relative paths are taken from
    /// `base`, `${NAME}` from `env`. Returns every problem found.
    pub fn build(
        self,
        file: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        self.build_in(
            file,
            &Cx {
                base,
                env,
                unset: None,
            },
        )
    }

    /// [`RawConfig::build`] for `doctor`: an unset `${NAME}` is not a problem but is returned,
    /// with every place that uses it (its value taken as empty), so all of them can be listed.
    /// `${NAME}` in `audit.postgres`, expanded only when the shipper connects, is looked up
    /// here too.
    pub fn build_recording(
        self,
        file: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Config, Vec<UnsetVar>), ConfigError> {
        let unset = std::cell::RefCell::new(Vec::new());
        let cfg = self.build_in(
            file,
            &Cx {
                base,
                env,
                unset: Some(&unset),
            },
        )?;
        if let Some(url) = &cfg.audit.postgres {
            for name in env_refs(url) {
                if env(name).is_none() {
                    unset.borrow_mut().push(UnsetVar {
                        name: name.to_string(),
                        at: "$.audit.postgres".to_string(),
                    });
                }
            }
        }
        Ok((cfg, unset.into_inner()))
    }

    fn build_in(self, file: &str, cx: &Cx<'_>) -> Result<Config, ConfigError> {
        let mut p = Problems::default();
        let listen = check_listen(&self.listen, self.allow_non_tailnet, &mut p);
        let identity = check_identity(self.identity, cx, &mut p);
        let policies = check_policies(self.policies, cx, &mut p);
        let aggregate = check_aggregate(self.aggregate, &self.servers, &mut p);
        let limits = check_limits(self.limits, &self.servers, &mut p);
        let servers = check_servers(self.servers, cx, &mut p);
        let stdio = check_stdio(self.stdio, cx, &mut p);
        let audit = check_audit(self.audit, cx, &mut p);
        let pdp = check_pdp(self.pdp, cx, &mut p);
        let log = check_log(self.log, &mut p);
        let metrics = check_metrics(self.metrics, &mut p);
        let tailnet = check_tailnet(self.tailnet, cx, &mut p);
        let hooks = hooks::check_hooks(self.hooks, cx, &mut p);
        check_sidecar_listen(&listen, &identity, &tailnet, &mut p);
        if !p.0.is_empty() {
            return Err(ConfigError {
                file: file.to_string(),
                problems: p.0,
            });
        }
        Ok(Config {
            listen,
            allow_non_tailnet: self.allow_non_tailnet,
            tls: self.tls,
            identity,
            policies,
            servers,
            audit,
            pdp,
            log,
            metrics,
            tailnet,
            stdio,
            aggregate,
            limits,
            hooks,
        })
    }
}

impl Config {
    /// Reads, parses and checks a config file. Relative paths are taken relative to its folder;
    /// `${NAME}` comes from this process's environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        RawConfig::load(path)?.build(&file, folder_of(path), &|n| std::env::var(n).ok())
    }

    /// [`Config::load`] for `doctor`: unset `${NAME}` references are returned, not errors
    /// ([`RawConfig::build_recording`]).
    pub fn load_recording(path: &Path) -> Result<(Config, Vec<UnsetVar>), ConfigError> {
        let file = path.display().to_string();
        RawConfig::load(path)?.build_recording(&file, folder_of(path), &|n| std::env::var(n).ok())
    }

    /// Parses and checks config text; relative paths are taken from `base`.
    pub fn parse(file: &str, bytes: &[u8], base: &Path) -> Result<Config, ConfigError> {
        RawConfig::parse(file, bytes)?.build(file, base, &|n| std::env::var(n).ok())
    }
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Only the `audit:` section of a config file, checked (for `toolgate audit … --config`: no
/// upstream secrets needed in the environment).
pub fn load_audit(path: &Path) -> Result<AuditConfig, ConfigError> {
    load_section(path, |raw, cx, p| check_audit(raw.audit, cx, p))
}

/// Only the `policies:` section of a config file, checked (`toolgate policy check --config`).
pub fn load_policies(path: &Path) -> Result<PoliciesConfig, ConfigError> {
    load_section(path, |raw, cx, p| check_policies(raw.policies, cx, p))
}

/// Only the `identity:` section of a config file, checked (`toolgate whois --config`).
pub fn load_identity(path: &Path) -> Result<IdentityConfig, ConfigError> {
    load_section(path, |raw, cx, p| check_identity(raw.identity, cx, p))
}

fn load_section<T>(
    path: &Path,
    section: impl FnOnce(RawConfig, &Cx<'_>, &mut Problems) -> T,
) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let raw = RawConfig::load(path)?;
    let env = |n: &str| std::env::var(n).ok();
    let cx = Cx {
        base: folder_of(path),
        env: &env,
        unset: None,
    };
    let mut p = Problems::default();
    let out = section(raw, &cx, &mut p);
    if p.0.is_empty() {
        Ok(out)
    } else {
        Err(ConfigError {
            file,
            problems: p.0,
        })
    }
}

// --- one check per section -------------------------------------------------------------------

fn check_listen(raw: &[String], allow_non_tailnet: bool, p: &mut Problems) -> Vec<Listen> {
    if raw.is_empty() {
        p.add("$.listen", "at least one listen entry is needed");
    }
    let mut out = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        match parse_listen(l) {
            Ok(Listen::Addr(a))
                if !(a.ip().is_loopback() || is_tailnet_ip(a.ip()) || allow_non_tailnet) =>
            {
                p.add(
                    format_args!("$.listen[{i}]"),
                    format_args!(
                        "{l:?} is neither loopback nor a tailnet address; set allow_non_tailnet: true to bind it (peers outside the tailnet are still refused)"
                    ),
                );
            }
            Ok(listen) => out.push(listen),
            Err(e) => p.add(format_args!("$.listen[{i}]"), e),
        }
    }
    out
}

fn check_identity(mut c: IdentityConfig, cx: &Cx<'_>, p: &mut Problems) -> IdentityConfig {
    if let Some(s) = c.r#static.as_mut() {
        cx.rebase(s);
    }
    if c.provider == IdentityProvider::Static && c.r#static.is_none() {
        p.add("$.identity.static", "provider static needs a fixture file");
    }
    if c.whois_timeout.is_zero() || c.whois_timeout > MAX_WHOIS_TIMEOUT {
        p.add(
            "$.identity.whois_timeout",
            format_args!("between 1ms and {}s", MAX_WHOIS_TIMEOUT.as_secs()),
        );
    }
    if c.max_age.is_zero() {
        p.add(
            "$.identity.max_age",
            "must be positive (the default is 60s); it bounds how long a revoked grant keeps \
             working on an open connection",
        );
    }
    if c.capability.is_empty() {
        p.add(
            "$.identity.capability",
            "empty (the default is toolgate.dev/cap/toolgate)",
        );
    }
    c
}

fn check_policies(mut c: PoliciesConfig, cx: &Cx<'_>, _p: &mut Problems) -> PoliciesConfig {
    cx.rebase(&mut c.dir);
    if let Some(d) = &mut c.shadow {
        cx.rebase(d);
    }
    c
}

fn check_servers(
    raw: BTreeMap<String, ServerConfig>,
    cx: &Cx<'_>,
    p: &mut Problems,
) -> BTreeMap<String, Server> {
    let mut out = BTreeMap::new();
    for (name, s) in raw {
        let at = format!("$.servers.{name}");
        let before = p.0.len();
        if name.is_empty()
            || name.len() > MAX_SERVER_NAME
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            p.add(
                &at,
                format_args!(
                    "server names are letters, digits, - and _ (at most {MAX_SERVER_NAME})"
                ),
            );
        }
        let transport = check_transport(&at, &s, cx, p);
        if s.timeout.is_zero() {
            p.add(format_args!("{at}.timeout"), "must be more than 0");
        }
        if s.max_stream.is_zero() {
            p.add(format_args!("{at}.max_stream"), "must be more than 0");
        }
        if !MAX_BODY_RANGE.contains(&s.max_body) {
            p.add(
                format_args!("{at}.max_body"),
                format_args!(
                    "between {} and {} bytes",
                    MAX_BODY_RANGE.start(),
                    MAX_BODY_RANGE.end()
                ),
            );
        }
        if !MAX_NODES_RANGE.contains(&s.max_nodes) {
            p.add(
                format_args!("{at}.max_nodes"),
                format_args!(
                    "between {} and {}",
                    MAX_NODES_RANGE.start(),
                    MAX_NODES_RANGE.end()
                ),
            );
        }
        let mut headers = Vec::new();
        for (k, v) in &s.headers {
            let hat = format!("{at}.headers.{k}");
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                p.add(&hat, "not a valid HTTP header name");
                continue;
            }
            match cx.expand(&hat, v) {
                Ok(value) => {
                    if reqwest::header::HeaderValue::from_str(&value).is_err() {
                        // The value may be a secret: name the problem, not the text.
                        p.add(
                            &hat,
                            "the value (after ${NAME} expansion) has characters a header cannot carry",
                        );
                    } else {
                        headers.push((k.clone(), value));
                    }
                }
                Err(e) => p.add(&hat, e),
            }
        }
        if let (Some(transport), true) = (transport, p.0.len() == before) {
            out.insert(
                name,
                Server {
                    transport,
                    resource_kind: s.resource_kind,
                    scope: s.scope,
                    timeout: s.timeout,
                    headers,
                    unknown_methods: s.unknown_methods,
                    max_stream: s.max_stream,
                    max_body: s.max_body,
                    max_nodes: s.max_nodes,
                },
            );
        }
    }
    out
}

/// `url` or `command` (exactly one), and the stdio keys only with `command`.
fn check_transport(at: &str, s: &ServerConfig, cx: &Cx<'_>, p: &mut Problems) -> Option<Transport> {
    let stdio_only = [
        ("env", !s.env.is_empty()),
        ("cwd", s.cwd.is_some()),
        ("idle_timeout", s.idle_timeout.is_some()),
        ("max_children", s.max_children.is_some()),
    ];
    match (&s.url, &s.command) {
        (Some(_), Some(_)) => {
            p.add(at, "give either url (HTTP) or command (stdio), not both");
            None
        }
        (None, None) => {
            p.add(
                at,
                "needs url (an HTTP MCP server) or command (a stdio one)",
            );
            None
        }
        (Some(url), None) => {
            for (key, set) in stdio_only {
                if set {
                    p.add(
                        format_args!("{at}.{key}"),
                        "only for stdio servers (command)",
                    );
                }
            }
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                    Some(Transport::Http(u))
                }
                Ok(_) => {
                    p.add(
                        format_args!("{at}.url"),
                        format_args!("{url:?} is not an http(s) URL"),
                    );
                    None
                }
                Err(e) => {
                    p.add(
                        format_args!("{at}.url"),
                        format_args!("{url:?} is not an http(s) URL: {e}"),
                    );
                    None
                }
            }
        }
        (None, Some(command)) => {
            let before = p.0.len();
            if !s.headers.is_empty() {
                p.add(
                    format_args!("{at}.headers"),
                    "only for HTTP servers (url); a stdio server takes env",
                );
            }
            match command.first() {
                None => p.add(format_args!("{at}.command"), "is empty"),
                Some(prog) if prog.is_empty() => p.add(format_args!("{at}.command[0]"), "is empty"),
                Some(_) => {}
            }
            if let Some(i) = command.iter().position(|a| a.contains('\0')) {
                p.add(format_args!("{at}.command[{i}]"), "contains a NUL byte");
            }
            let mut env = Vec::new();
            for (k, v) in &s.env {
                let eat = format!("{at}.env.{k}");
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    p.add(&eat, "not a valid environment variable name");
                    continue;
                }
                match cx.expand(&eat, v) {
                    Ok(value) if value.contains('\0') => p.add(
                        &eat,
                        "the value (after ${NAME} expansion) contains a NUL byte",
                    ),
                    Ok(value) => env.push((k.clone(), value)),
                    Err(e) => p.add(&eat, e),
                }
            }
            let mut cwd = s.cwd.clone();
            if let Some(d) = cwd.as_mut() {
                cx.rebase(d);
            }
            let idle_timeout = s.idle_timeout.unwrap_or(crate::stdio::DEFAULT_IDLE_TIMEOUT);
            if idle_timeout.is_zero() {
                p.add(format_args!("{at}.idle_timeout"), "must be more than 0");
            }
            let max_children = s.max_children.unwrap_or(crate::stdio::DEFAULT_MAX_CHILDREN);
            if !STDIO_MAX_CHILDREN.contains(&max_children) {
                p.add(
                    format_args!("{at}.max_children"),
                    format_args!(
                        "between {} and {}",
                        STDIO_MAX_CHILDREN.start(),
                        STDIO_MAX_CHILDREN.end()
                    ),
                );
            }
            (p.0.len() == before).then(|| {
                Transport::Stdio(StdioCommand {
                    command: command.clone(),
                    env,
                    cwd,
                    idle_timeout,
                    max_children,
                })
            })
        }
    }
}

// ============================================================================================
// stdio and aggregate
// ============================================================================================

/// `stdio:`: what holds for every stdio server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdioConfig {
    /// `auto` (default): a cgroup per child where toolgate may create cgroups (root, or
    /// systemd `Delegate=yes`), else a process group; `cgroup` or `process_group` to insist.
    #[serde(default)]
    pub isolation: crate::stdio::Isolation,
    /// All stdio children of this toolgate at most (default 64); more: 503.
    #[serde(default = "default_stdio_max_children")]
    pub max_children: usize,
    /// How long a child gets to exit after its stdin closes, and again after SIGTERM.
    #[serde(default = "default_stdio_grace", with = "duration_text")]
    pub grace: Duration,
    /// The longest line a child may write on stdout (default 8 MiB); longer: the child is
    /// stopped.
    #[serde(default = "default_stdio_max_line")]
    pub max_line: usize,
    /// The toolgate binary that runs as each child's launcher (`toolgate __stdio-launch`);
    /// default: this very binary.
    #[serde(default)]
    pub launcher: Option<PathBuf>,
}

fn default_stdio_max_children() -> usize {
    crate::stdio::DEFAULT_MAX_TOTAL
}
fn default_stdio_grace() -> Duration {
    crate::stdio::DEFAULT_GRACE
}
fn default_stdio_max_line() -> usize {
    crate::stdio::DEFAULT_MAX_LINE
}

impl Default for StdioConfig {
    fn default() -> Self {
        StdioConfig {
            isolation: crate::stdio::Isolation::default(),
            max_children: default_stdio_max_children(),
            grace: default_stdio_grace(),
            max_line: default_stdio_max_line(),
            launcher: None,
        }
    }
}

/// `stdio.max_children` bounds.
pub const STDIO_MAX_TOTAL: RangeInclusive<usize> = 1..=10_000;
/// `stdio.max_line` bounds.
pub const STDIO_MAX_LINE: RangeInclusive<usize> = 1024..=(256 * 1024 * 1024);

fn check_stdio(mut c: StdioConfig, cx: &Cx<'_>, p: &mut Problems) -> StdioConfig {
    if let Some(l) = c.launcher.as_mut() {
        cx.rebase(l);
    }
    if !STDIO_MAX_TOTAL.contains(&c.max_children) {
        p.add(
            "$.stdio.max_children",
            format_args!(
                "between {} and {}",
                STDIO_MAX_TOTAL.start(),
                STDIO_MAX_TOTAL.end()
            ),
        );
    }
    if !STDIO_MAX_LINE.contains(&c.max_line) {
        p.add(
            "$.stdio.max_line",
            format_args!(
                "between {} and {}",
                STDIO_MAX_LINE.start(),
                STDIO_MAX_LINE.end()
            ),
        );
    }
    if c.grace > Duration::from_secs(60) {
        p.add("$.stdio.grace", "at most 60s");
    }
    c
}

/// `limits:`: bounds over the whole daemon (per-server bounds are under `servers.<name>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Bytes held at once for client MCP messages in flight, across every caller and server
    /// (bodies being read, parsed values, forwarded copies). A call that does not fit is
    /// answered 503 with `Retry-After: 1` before any policy decision; nothing is forwarded.
    #[serde(default = "default_in_flight_bytes")]
    pub in_flight_bytes: usize,
}

fn default_in_flight_bytes() -> usize {
    crate::budget::DEFAULT_IN_FLIGHT_BYTES
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            in_flight_bytes: default_in_flight_bytes(),
        }
    }
}

/// `limits.in_flight_bytes` must hold the largest call of every server (else that server's
/// largest calls could never run), and at most 64 GiB.
fn check_limits(
    c: LimitsConfig,
    servers: &BTreeMap<String, ServerConfig>,
    p: &mut Problems,
) -> LimitsConfig {
    for (name, s) in servers {
        let need = crate::budget::largest_call(s.max_body, s.max_nodes);
        if c.in_flight_bytes < need {
            p.add(
                "$.limits.in_flight_bytes",
                format_args!(
                    "{} bytes cannot hold one call to servers.{name} (max_body {}, max_nodes {} need up to {need} bytes): raise it or lower those",
                    c.in_flight_bytes, s.max_body, s.max_nodes
                ),
            );
        }
    }
    if c.in_flight_bytes > 64 << 30 {
        p.add("$.limits.in_flight_bytes", "at most 64 GiB (68719476736)");
    }
    c
}

/// `aggregate:`: the endpoint `/mcp` over every server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Between a server's name and a tool's or prompt's (`github__create_issue`).
    #[serde(default = "default_separator")]
    pub separator: String,
}

fn default_separator() -> String {
    crate::mcp::aggregate::DEFAULT_SEPARATOR.to_string()
}

impl Default for AggregateConfig {
    fn default() -> Self {
        AggregateConfig {
            separator: default_separator(),
        }
    }
}

fn check_aggregate(
    c: AggregateConfig,
    servers: &BTreeMap<String, ServerConfig>,
    p: &mut Problems,
) -> AggregateConfig {
    if let Err(e) =
        crate::mcp::aggregate::Naming::new(&c.separator, servers.keys().map(String::as_str))
    {
        p.add("$.aggregate.separator", e);
    }
    c
}

fn check_audit(mut a: AuditConfig, cx: &Cx<'_>, p: &mut Problems) -> AuditConfig {
    cx.rebase(&mut a.sqlite);
    if let Some(k) = a.key_file.as_mut() {
        cx.rebase(k);
    }
    if !AUDIT_BATCH_ROWS.contains(&a.batch_rows) {
        p.add(
            "$.audit.batch_rows",
            format_args!(
                "between {} and {}",
                AUDIT_BATCH_ROWS.start(),
                AUDIT_BATCH_ROWS.end()
            ),
        );
    }
    if !AUDIT_QUEUE.contains(&a.queue) {
        p.add(
            "$.audit.queue",
            format_args!("between {} and {}", AUDIT_QUEUE.start(), AUDIT_QUEUE.end()),
        );
    }
    if a.batch_ms > MAX_AUDIT_BATCH_MS {
        p.add(
            "$.audit.batch_ms",
            format_args!("at most {MAX_AUDIT_BATCH_MS}"),
        );
    }
    if a.max_argument_bytes < MIN_AUDIT_ARGUMENT_BYTES {
        p.add(
            "$.audit.max_argument_bytes",
            format_args!("at least {MIN_AUDIT_ARGUMENT_BYTES}"),
        );
    }
    if let Some(url) = &a.postgres
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        p.add("$.audit.postgres", "want a postgres:// URL");
    }
    if !valid_postgres_schema(&a.postgres_schema) {
        p.add(
            "$.audit.postgres_schema",
            "lower-case letters, digits and _",
        );
    }
    if a.retention.is_some_and(|r| r.is_zero()) {
        p.add(
            "$.audit.retention",
            "0 would prune every row; leave it out to keep rows forever",
        );
    }
    a
}

fn check_pdp(mut c: PdpConfig, cx: &Cx, p: &mut Problems) -> PdpConfig {
    for (i, caller) in c.callers.iter().enumerate() {
        if !(caller.starts_with("role:") || caller.starts_with("tag:")) {
            p.add(
                format_args!("$.pdp.callers[{i}]"),
                format_args!("{caller:?} must be role:NAME or tag:NAME"),
            );
        }
    }
    let l = &c.request_limits;
    for (name, v) in [
        ("max_actions_per_resource", l.max_actions_per_resource),
        ("max_resources_per_request", l.max_resources_per_request),
    ] {
        if !(1..=MAX_PDP_REQUEST_LIMIT).contains(&v) {
            p.add(
                format_args!("$.pdp.request_limits.{name}"),
                format_args!("{v} is out of range 1..={MAX_PDP_REQUEST_LIMIT}"),
            );
        }
    }
    let mut ids = std::collections::BTreeSet::new();
    for (i, k) in c.jwt_keysets.iter_mut().enumerate() {
        let at = format!("$.pdp.jwt_keysets[{i}]");
        if k.id.is_empty() {
            p.add(format_args!("{at}.id"), "a key set needs an id");
        } else if !ids.insert(k.id.clone()) {
            p.add(
                format_args!("{at}.id"),
                format_args!("{:?} is used twice", k.id),
            );
        }
        if k.remote.is_some() {
            p.add(
                format_args!("{at}.remote"),
                "remote key sets are not supported (toolgate fetches nothing at run time); \
                 save the JWKS to a file and use local.file",
            );
            continue;
        }
        match &mut k.local {
            Some(LocalKeySet {
                file: Some(f),
                data: None,
            }) => cx.rebase(f),
            Some(LocalKeySet {
                file: None,
                data: Some(_),
            }) => {}
            _ => p.add(at, "needs local.file or local.data (exactly one)"),
        }
    }
    c
}

fn check_log(c: LogConfig, p: &mut Problems) -> Log {
    if let Some(level) = &c.level {
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(level) {
            p.add(
                "$.log.level",
                format_args!(
                    "{level:?} is not a log filter ({e}); for example info, debug or info,toolgate=debug"
                ),
            );
        }
    }
    Log {
        format: c.format,
        level: c.level,
    }
}

fn check_metrics(c: MetricsConfig, p: &mut Problems) -> MetricsConfig {
    if let Some(m) = c.listen
        && !m.ip().is_loopback()
    {
        p.add(
            "$.metrics.listen",
            format_args!("{m} must be a loopback address (it has no access control)"),
        );
    }
    c
}

fn check_tailnet(mut t: TailnetConfig, cx: &Cx<'_>, p: &mut Problems) -> TailnetConfig {
    cx.rebase(&mut t.state_dir);
    if let Some(s) = t.socket.as_mut() {
        cx.rebase(s);
    }
    if let Some(k) = t.authkey_file.as_mut() {
        cx.rebase(k);
    }
    // A bare name (`tailscaled`) is looked up in PATH; a relative path is taken from the folder.
    if t.tailscaled.components().count() > 1 {
        cx.rebase(&mut t.tailscaled);
    }
    if t.hostname.is_empty()
        || t.hostname.len() > MAX_DNS_LABEL
        || !t
            .hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        p.add(
            "$.tailnet.hostname",
            format_args!("{:?} must be a DNS label (letters, digits, -)", t.hostname),
        );
    }
    for (i, tag) in t.tags.iter().enumerate() {
        let name = tag.strip_prefix("tag:").unwrap_or_default();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            p.add(
                format_args!("$.tailnet.tags[{i}]"),
                format_args!("{tag:?} must look like tag:NAME"),
            );
        }
    }
    if let Some(u) = &t.control_url
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        p.add(
            "$.tailnet.control_url",
            format_args!("{u:?} is not an http(s) URL"),
        );
    }
    if let Some(a) = t.socks5
        && !a.ip().is_loopback()
    {
        p.add(
            "$.tailnet.socks5",
            format_args!("{a} must be a loopback address (it has no access control)"),
        );
    }
    t
}

/// `tailnet.mode: sidecar` with the tailscale provider: the listen entries must suit a
/// userspace-networking tailscaled.
///
/// Its tailnet IPs are not local addresses (binding them fails with EADDRNOTAVAIL), and its
/// netstack delivers inbound tailnet TCP for port P to `127.0.0.1:P`, where the proxymap WhoIs
/// names the real peer. So the listen entry for port P is `127.0.0.1:P` (the node is then
/// reached as `<hostname>.<tailnet>:P`).
fn check_sidecar_listen(
    listen: &[Listen],
    identity: &IdentityConfig,
    t: &TailnetConfig,
    p: &mut Problems,
) {
    if t.mode != TailnetMode::Sidecar || identity.provider != IdentityProvider::Tailscale {
        return;
    }
    let mut loopback_v4 = false;
    for (i, l) in listen.iter().enumerate() {
        match l {
            Listen::Tailnet(port) => p.add(
                format_args!("$.listen[{i}]"),
                format_args!(
                    "{l} cannot work with tailnet.mode: sidecar: the sidecar tailscaled runs in userspace-networking mode, so its tailnet IPs are not local addresses; listen on \"127.0.0.1:{port}\" instead (tailscaled forwards inbound tailnet TCP on port {port} to 127.0.0.1:{port})"
                ),
            ),
            Listen::Addr(a) if is_tailnet_ip(a.ip()) => p.add(
                format_args!("$.listen[{i}]"),
                format_args!(
                    "{l} cannot work with tailnet.mode: sidecar: tailnet IPs are not local addresses in userspace-networking mode; listen on \"127.0.0.1:{}\" instead",
                    a.port()
                ),
            ),
            Listen::Addr(a) if a.ip() == IpAddr::from([127, 0, 0, 1]) && a.port() != 0 => {
                loopback_v4 = true;
            }
            Listen::Addr(_) => {}
        }
    }
    if !loopback_v4 && !listen.is_empty() {
        p.add(
            "$.listen",
            "tailnet.mode: sidecar: tailnet peers arrive on 127.0.0.1:<port> (tailscaled's userspace netstack forwards them there); add a listen entry \"127.0.0.1:PORT\" with a fixed port",
        );
    }
    if let Some(s) = t.socks5_addr()
        && listen
            .iter()
            .any(|l| matches!(l, Listen::Addr(a) if a.port() == s.port()))
    {
        p.add(
            "$.tailnet.socks5",
            format_args!("{s} uses the same port as a listen entry; pick another port"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Config, ConfigError> {
        Config::parse("toolgate.yaml", s.as_bytes(), Path::new("/etc/toolgate"))
    }

    fn build_with_env(s: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let lookup = |n: &str| {
            env.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        };
        RawConfig::parse("toolgate.yaml", s.as_bytes())?.build(
            "toolgate.yaml",
            Path::new("/etc/toolgate"),
            &lookup,
        )
    }

    #[test]
    fn defaults_are_safe() {
        let c = parse_str("servers: {}\n").unwrap();
        assert_eq!(c.listen, vec![Listen::Tailnet(443)]);
        assert_eq!(c.tls, TlsMode::Auto);
        assert_eq!(c.identity.provider, IdentityProvider::Tailscale);
        assert_eq!(c.policies.evaluation, Evaluation::Strict);
        assert_eq!(c.pdp.callers, vec!["role:pdp"]);
        assert_eq!(c.log.format, None);
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
            c.listen,
            vec![
                Listen::Tailnet(443),
                Listen::Addr("127.0.0.1:8443".parse().unwrap())
            ]
        );
        let gh = &c.servers["github"];
        assert_eq!(gh.timeout, DEFAULT_UPSTREAM_TIMEOUT);
        assert_eq!(gh.url().unwrap().as_str(), "http://127.0.0.1:9001/mcp");
        assert_eq!(gh.url().unwrap().port(), Some(9001));
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
        let e = parse_str("servers: {gh: {url: \"http://\"}}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("$.servers.gh.url"), "{e}");
        let e = parse_str("identity: {whois_ttl: 5 minutes}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("identity.whois_ttl"), "{e}");
    }

    /// Every problem is reported at once, each with its file and path, one per line.
    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let e = parse_str(
            "listen: [\"tailnet:http\", \"0.0.0.0:443\"]\nservers: {gh: {url: ftp://x}, \"a b\": {url: \"http://h/\"}}\naudit: {batch_rows: 0, queue: 0}\npdp: {callers: [admins]}\nlog: {level: \"info,=[\"}\nmetrics: {listen: \"10.0.0.1:9090\"}\ntailnet: {hostname: \"a b\", tags: [ci]}\n",
        )
        .unwrap_err();
        let want = [
            "$.listen[0]",
            "$.listen[1]",
            "$.servers.a b",
            "$.servers.gh.url",
            "$.audit.batch_rows",
            "$.audit.queue",
            "$.pdp.callers[0]",
            "$.log.level",
            "$.metrics.listen",
            "$.tailnet.hostname",
            "$.tailnet.tags[0]",
        ];
        assert_eq!(e.problems.len(), want.len(), "{e}");
        for (p, w) in e.problems.iter().zip(want) {
            assert!(p.starts_with(w), "{p:?} should start with {w}");
        }
        let text = e.to_string();
        assert_eq!(text.lines().count(), want.len(), "{text}");
        assert!(
            text.lines().all(|l| l.starts_with("toolgate.yaml: $.")),
            "{text}"
        );
    }

    #[test]
    fn non_tailnet_binds_need_the_opt_in() {
        let e = parse_str("listen: [\"0.0.0.0:443\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow_non_tailnet"), "{e}");
        let c = parse_str("listen: [\"0.0.0.0:443\"]\nallow_non_tailnet: true\n").unwrap();
        assert_eq!(c.listen, vec![Listen::Addr("0.0.0.0:443".parse().unwrap())]);
        for ok in [
            "127.0.0.1:1",
            "[::1]:2",
            "100.64.0.7:443",
            "[fd7a:115c:a1e0::1]:443",
        ] {
            assert!(parse_str(&format!("listen: [\"{ok}\"]\n")).is_ok(), "{ok}");
        }
    }

    #[test]
    fn upstream_headers_are_expanded_once_and_never_shown() {
        let text = "servers:\n  gh:\n    url: \"https://api.example.com/mcp\"\n    headers: {Authorization: \"Bearer ${TOKEN}\", X-Team: \"${TEAM}-x\"}\n";
        let c = build_with_env(text, &[("TOKEN", "s3cret"), ("TEAM", "eng")]).unwrap();
        let gh = &c.servers["gh"];
        assert_eq!(
            gh.headers,
            vec![
                ("Authorization".to_string(), "Bearer s3cret".to_string()),
                ("X-Team".to_string(), "eng-x".to_string())
            ]
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("Authorization"), "{shown}");
        // Missing variables: each one named, with its header's path.
        let e = build_with_env(text, &[]).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(e.problems[0].contains("$.servers.gh.headers.Authorization"));
        assert!(e.problems[0].contains("TOKEN is not set"), "{e}");
        assert!(e.problems[1].contains("TEAM is not set"), "{e}");
        // A value that cannot be a header is refused without echoing it.
        let e = build_with_env(text, &[("TOKEN", "a\nb"), ("TEAM", "x")]).unwrap_err();
        assert!(e.to_string().contains("cannot carry"), "{e}");
        assert!(!e.to_string().contains("a\nb"), "{e}");
        let e = build_with_env(
            "servers: {gh: {url: \"http://h/\", headers: {\"bad name\": x}}}\n",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("header name"), "{e}");
    }

    #[test]
    fn doctor_loads_with_unset_variables_and_learns_every_one() {
        let text = "servers:\n  gh:\n    url: \"https://api.example.com/mcp\"\n    headers: {Authorization: \"Bearer ${TOKEN}\", X-Team: \"${TEAM}-${TOKEN}\"}\n  \
                    local:\n    command: [srv]\n    env: {KEY: \"${KEY}\", TEAM: \"${TEAM}\"}\n\
                    audit: {postgres: \"postgres://u:${PGPASS}@db/x\"}\n";
        let lookup = |n: &str| (n == "TEAM").then(|| "eng".to_string());
        let (c, unset) = RawConfig::parse("toolgate.yaml", text.as_bytes())
            .unwrap()
            .build_recording("toolgate.yaml", Path::new("/etc/toolgate"), &lookup)
            .unwrap();
        let found: Vec<(&str, &str)> = unset
            .iter()
            .map(|u| (u.name.as_str(), u.at.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![
                ("TOKEN", "$.servers.gh.headers.Authorization"),
                ("TOKEN", "$.servers.gh.headers.X-Team"),
                ("KEY", "$.servers.local.env.KEY"),
                ("PGPASS", "$.audit.postgres"),
            ]
        );
        // Unset values expand to nothing; set ones as usual.
        assert_eq!(c.servers["gh"].headers[1].1, "eng-");
        // Other problems are still problems.
        let e = RawConfig::parse("t.yaml", b"servers: {gh: {url: \"ftp://x/${A}\"}}\n")
            .unwrap()
            .build_recording("t.yaml", Path::new("/"), &lookup)
            .unwrap_err();
        assert!(e.to_string().contains("not an http(s) URL"), "{e}");
    }

    #[test]
    fn env_expansion() {
        let env = |n: &str| (n == "A").then(|| "1".to_string());
        assert_eq!(expand_with("x${A}y${A}", env).unwrap(), "x1y1");
        assert_eq!(expand_with("no refs", env).unwrap(), "no refs");
        assert!(
            expand_with("${B}", env)
                .unwrap_err()
                .contains("B is not set")
        );
        assert!(expand_with("${A", env).unwrap_err().contains("unclosed"));
        assert!(expand_with("${}", env).unwrap_err().contains("${}"));
        assert!(expand_with("${A-B}", env).is_err());
        assert_eq!(env_refs("a ${X} b ${Y_2} ${bad-} ${"), vec!["X", "Y_2"]);
    }

    #[test]
    fn durations_are_written_the_go_and_prometheus_way() {
        let c = parse_str(
            "identity: {whois_ttl: 1m30s, whois_timeout: 1.5s}\nservers: {gh: {url: \"http://h/\", timeout: 1m30s, max_stream: 1.5h}}\naudit: {retention: 90d}\n",
        )
        .unwrap();
        assert_eq!(c.identity.whois_ttl, Duration::from_secs(90));
        assert_eq!(c.identity.whois_timeout, Duration::from_millis(1500));
        assert_eq!(c.identity.max_age, Duration::from_secs(60), "the default");
        let aged = parse_str("identity: {max_age: 5m}\n").unwrap();
        assert_eq!(aged.identity.max_age, Duration::from_secs(300));
        let e = parse_str("identity: {max_age: 0s}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("$.identity.max_age"), "{e}");
        assert_eq!(c.servers["gh"].timeout, Duration::from_secs(90));
        assert_eq!(c.servers["gh"].max_stream, Duration::from_secs(5400));
        assert_eq!(c.audit.retention, Some(Duration::from_secs(90 * 86_400)));
        // `batch_ms`: the key's unit as a number, or any duration.
        for (text, ms) in [("5", 5), ("5ms", 5), ("0.5s", 500), ("1s", 1000)] {
            let c = parse_str(&format!("audit: {{batch_ms: {text}}}\n")).unwrap();
            assert_eq!(c.audit.batch_ms, ms, "{text}");
        }
        let e = parse_str("audit: {batch_ms: 5y}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("$.audit.batch_ms") && e.contains("5y"), "{e}");
        let e = parse_str("servers: {gh: {url: \"http://h/\", timeout: 0s}}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("$.servers.gh.timeout"), "{e}");
    }

    #[test]
    fn log_settings_are_checked() {
        let c = parse_str("log: {format: json, level: \"info,toolgate=debug\"}\n").unwrap();
        assert_eq!(c.log.format, Some(LogFormat::Json));
        assert_eq!(c.log.level.as_deref(), Some("info,toolgate=debug"));
        let e = parse_str("log: {format: xml}\n").unwrap_err().to_string();
        assert!(e.contains("log.format"), "{e}");
        let e = parse_str("log: {level: \"loud=[\"}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("$.log.level"), "{e}");
    }

    #[test]
    fn audit_settings() {
        let c = parse_str("servers: {}\n").unwrap();
        assert_eq!(c.audit.mode, AuditMode::Sync);
        assert_eq!(c.audit.durability, Durability::Full);
        assert_eq!(c.audit.arguments, ArgumentsMode::Digest);
        assert_eq!(c.audit.retention, None);
        assert_eq!(c.audit.batch_rows, DEFAULT_AUDIT_BATCH_ROWS);
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
            ("audit: {retention: 0}\n", "$.audit.retention"),
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

    /// `audit … --config` and `whois --config` read their section only: an upstream's secret
    /// need not be in the operator's shell.
    #[test]
    fn one_section_loads_without_the_others_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "servers: {gh: {url: \"http://h/\", headers: {A: \"${TOOLGATE_TEST_SURELY_UNSET}\"}}}\naudit: {sqlite: a.db}\nidentity: {socket: ts.sock}\n",
        )
        .unwrap();
        assert!(Config::load(&path).is_err());
        assert_eq!(load_audit(&path).unwrap().sqlite, dir.path().join("a.db"));
        assert_eq!(
            load_identity(&path).unwrap().socket,
            PathBuf::from("ts.sock")
        );
        std::fs::write(&path, "audit: {batch_rows: 0}\n").unwrap();
        assert!(
            load_audit(&path)
                .unwrap_err()
                .to_string()
                .contains("$.audit.batch_rows")
        );
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/config.example.yaml");
        let bytes = std::fs::read(&path).unwrap();
        let raw = RawConfig::parse("config.example.yaml", &bytes).unwrap();
        assert_eq!(
            raw.servers["github"].headers["Authorization"],
            "Bearer ${GITHUB_MCP_TOKEN}"
        );
        let c = raw
            .build(
                "config.example.yaml",
                Path::new("/etc/toolgate"),
                &|n: &str| (n == "GITHUB_MCP_TOKEN").then(|| "t".to_string()),
            )
            .unwrap();
        assert_eq!(c.servers["github"].headers[0].1, "Bearer t");
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
            "listen: [\"127.0.0.1:8443\"]\ntailnet: {mode: sidecar, state_dir: ts, tailscaled: bin/tailscaled, hostname: gw1,\n  tags: [tag:mcp], control_url: \"http://127.0.0.1:8080\", authkey_file: key, socks5: \"127.0.0.1:1081\"}\n",
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
        let c = parse_str("listen: [\"127.0.0.1:8443\"]\ntailnet: {mode: sidecar}\n").unwrap();
        assert_eq!(c.tailnet.tailscaled, PathBuf::from("tailscaled"));
        assert_eq!(c.tailnet.socks5_addr(), "127.0.0.1:1055".parse().ok());
        for (bad, key) in [
            ("tailnet: {mode: tun}\n", "tailnet.mode"),
            ("tailnet: {hostname: \"a b\"}\n", "$.tailnet.hostname"),
            ("tailnet: {tags: [ci]}\n", "$.tailnet.tags[0]"),
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
    fn sidecar_listen_rules() {
        let err = |s: &str| parse_str(s).unwrap_err().to_string();
        // Host mode: anything else the listen rules accept.
        assert!(parse_str("listen: [\"tailnet:443\"]\n").is_ok());
        let e = err("listen: [\"tailnet:443\"]\ntailnet: {mode: sidecar}\n");
        assert!(
            e.contains("127.0.0.1:443") && e.contains("userspace"),
            "{e}"
        );
        let e = err("listen: [\"100.64.0.7:443\"]\ntailnet: {mode: sidecar}\n");
        assert!(e.contains("127.0.0.1:443"), "{e}");
        let e = err("listen: [\"127.0.0.1:0\"]\ntailnet: {mode: sidecar}\n");
        assert!(e.contains("fixed port"), "{e}");
        let e = err("listen: [\"127.0.0.1:1055\"]\ntailnet: {mode: sidecar}\n");
        assert!(e.contains("socks5"), "{e}");
        assert!(parse_str("listen: [\"127.0.0.1:8100\"]\ntailnet: {mode: sidecar}\n").is_ok());
        // The static provider never starts the sidecar.
        assert!(
            parse_str(
                "listen: [\"127.0.0.1:0\"]\ntls: off\nidentity: {provider: static, static: ids.yaml}\ntailnet: {mode: sidecar}\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn tailnet_ranges() {
        for ip in [
            "100.64.0.1",
            "100.127.255.254",
            "fd7a:115c:a1e0::1",
            "::ffff:100.100.1.1",
        ] {
            assert!(is_tailnet_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "100.63.255.255",
            "100.128.0.1",
            "10.0.0.1",
            "127.0.0.1",
            "fd7a:115c:a1e1::1",
        ] {
            assert!(!is_tailnet_ip(ip.parse().unwrap()), "{ip}");
        }
    }
}
