//! `toolgate whois ADDR` and `toolgate doctor`: what an address maps to, and whether this
//! machine is ready to run the gateway.
//!
//! `doctor` prints one line per check, `OK`, `WARN`, `FAIL` or `SKIP`, each with its reason
//! and, on failure, what to do; it exits non-zero when any essential check fails (tailscaled
//! reachable and `Running`, HTTPS certificates with `tls: auto`, every `${NAME}` the config
//! references set, policies present and compiling, audit store usable, every upstream
//! reachable and speaking MCP: [`probe`]). Policies whose resource kind no server uses, and
//! servers no policy covers, are warnings.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::config::{Config, IdentityConfig, IdentityProvider, TlsMode, UnsetVar};
use crate::tailnet::localapi::{LocalApi, LocalApiError};
use crate::tailnet::tls::{LocalApiCerts, TlsSettings};
use crate::tailnet::types::{BackendState, Status};
use crate::tailnet::whois::{WhoisResolver, WhoisSettings};

#[path = "doctor/probe.rs"]
pub mod probe;

/// Where `serve` and `doctor` look for the config by default.
pub const DEFAULT_CONFIG: &str = "/etc/toolgate/config.yaml";

/// `toolgate whois ADDR`.
#[derive(Debug, Args)]
pub struct WhoisArgs {
    /// The peer address: `IP:PORT` (`[v6]:PORT`) as a connection would show it, or a bare IP.
    pub addr: String,
    /// Take the socket, capability, role mappings and timeout from this config file.
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// tailscaled's LocalAPI socket (default: /var/run/tailscale/tailscaled.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The app capability whose grants become roles and `attr.caps`
    /// (default: toolgate.dev/cap/toolgate).
    #[arg(long)]
    pub capability: Option<String>,
}

/// `toolgate doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The config file (default: /etc/toolgate/config.yaml when it exists, else built-in
    /// defaults).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Parses `IP:PORT`, `[v6]:PORT` or a bare IP (port 0: any connection of that node).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| format!("{s:?} is not an address (want IP, IP:PORT or [IPv6]:PORT)"))
}

/// `toolgate whois ADDR`: prints the principal (JSON) the address maps to; exit 1 when it
/// maps to none (the reason on stderr), 2 on usage errors, 5 on config errors.
pub fn whois_cmd(args: &WhoisArgs) -> ExitCode {
    let addr = match parse_addr(&args.addr) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(crate::exit::USAGE);
        }
    };
    let mut identity = match &args.config {
        Some(path) => match crate::config::load_identity(path) {
            Ok(identity) => identity,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(crate::exit::CONFIG);
            }
        },
        None => IdentityConfig::default(),
    };
    if let Some(s) = &args.socket {
        identity.socket = s.clone();
    }
    if let Some(c) = &args.capability {
        identity.capability = c.clone();
    }
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            match identity.provider {
                // The static provider answers from its fixture file: tailscaled is not asked.
                IdentityProvider::Static => {
                    use crate::caller::Identify;
                    let path = identity
                        .r#static
                        .as_ref()
                        .ok_or("identity.provider static needs identity.static (a fixture file)")?;
                    let provider = crate::caller::StaticProvider {
                        identities: crate::identity::StaticIdentities::load(path)?,
                        mappings: identity.role_mappings.clone(),
                    };
                    provider.identify(addr).await.map(std::sync::Arc::new)
                }
                IdentityProvider::Tailscale => {
                    let resolver = WhoisResolver::from_config(&identity, None);
                    resolver.resolve(addr).await
                }
            }
        })
    });
    match result {
        Ok(caller) => match serde_json::to_string_pretty(&caller.principal) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(why) => {
            eprintln!("error: {why}");
            ExitCode::FAILURE
        }
    }
}

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, but deserves attention; never fails the run.
    Warn,
    /// Essential and broken: `doctor` exits non-zero.
    Fail,
    /// Does not apply to this configuration.
    Skip,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so the report's `{:<5}` column width applies.
        f.pad(match self {
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub verdict: Verdict,
    /// What was checked (`tailscaled`, `backend`, `https`, …).
    pub what: &'static str,
    pub detail: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<5} {:<10} {}", self.verdict, self.what, self.detail)
    }
}

fn check(verdict: Verdict, what: &'static str, detail: impl Into<String>) -> Check {
    Check {
        verdict,
        what,
        detail: detail.into(),
    }
}

/// `toolgate doctor`.
pub fn doctor_cmd(args: &DoctorArgs) -> ExitCode {
    let (cfg, unset, first) = match load_config(args.config.as_deref()) {
        Ok(x) => x,
        Err(c) => {
            println!("{c}");
            return ExitCode::from(crate::exit::CONFIG);
        }
    };
    let checks = match runtime() {
        Ok(rt) => rt.block_on(run_checks_with(&cfg, &unset)),
        Err(e) => vec![check(Verdict::Fail, "runtime", e)],
    };
    println!("{first}");
    let mut failed = 0;
    for c in &checks {
        println!("{c}");
        if c.verdict == Verdict::Fail {
            failed += 1;
        }
    }
    if failed == 0 {
        println!("ready: every essential check passed");
        ExitCode::SUCCESS
    } else {
        println!("not ready: {failed} essential check(s) failed");
        ExitCode::FAILURE
    }
}

/// The config to check, the `${NAME}` references it makes that are unset, and the report
/// line about it.
fn load_config(path: Option<&Path>) -> Result<(Config, Vec<UnsetVar>, Check), Check> {
    let (path, explicit) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    if !explicit && !path.exists() {
        let cfg = Config::parse("<built-in defaults>", b"{}", Path::new("."))
            .map_err(|e| check(Verdict::Fail, "config", e.to_string()))?;
        return Ok((
            cfg,
            Vec::new(),
            check(
                Verdict::Warn,
                "config",
                format!("no --config and no {DEFAULT_CONFIG}: checking the built-in defaults"),
            ),
        ));
    }
    match Config::load_recording(&path) {
        Ok((cfg, unset)) => Ok((
            cfg,
            unset,
            check(Verdict::Ok, "config", format!("{} parses", path.display())),
        )),
        Err(e) => Err(check(Verdict::Fail, "config", e.to_string())),
    }
}

/// Every check for `cfg`, in report order (the config line excluded).
pub async fn run_checks(cfg: &Config) -> Vec<Check> {
    run_checks_with(cfg, &[]).await
}

/// [`run_checks`] for a config loaded with `unset` variables
/// ([`Config::load_recording`]): each is a failure, and the upstreams that need one are not
/// probed.
pub async fn run_checks_with(cfg: &Config, unset: &[UnsetVar]) -> Vec<Check> {
    let mut out = env_checks(unset);
    match cfg.identity.provider {
        IdentityProvider::Tailscale => tailnet_checks(cfg, &mut out).await,
        IdentityProvider::Static => {
            out.push(check(
                Verdict::Skip,
                "tailscaled",
                "identity.provider is static (development only): tailscaled is not used",
            ));
            match &cfg.identity.r#static {
                Some(p) => match crate::identity::StaticIdentities::load(p) {
                    Ok(ids) => out.push(check(
                        Verdict::Ok,
                        "identity",
                        format!("{} static identities from {}", ids.len(), p.display()),
                    )),
                    Err(e) => out.push(check(Verdict::Fail, "identity", e)),
                },
                None => out.push(check(
                    Verdict::Fail,
                    "identity",
                    "identity.provider static needs identity.static (a fixture file)",
                )),
            }
        }
    }
    let (policies, set) = policy_check(&cfg.policies.dir);
    out.push(policies);
    if let Some(set) = set {
        out.extend(coverage_checks(cfg, &set));
    }
    out.push(audit_check(&cfg.audit.sqlite));
    let stdio = stdio_checks(cfg);
    let runnable: Vec<String> = stdio
        .iter()
        .filter(|(_, c)| c.verdict == Verdict::Ok)
        .filter_map(|(name, _)| name.clone())
        .collect();
    out.extend(stdio.into_iter().map(|(_, c)| c));
    out.extend(upstream_checks(cfg, unset, &runnable).await);
    out
}

/// One FAIL per unset variable, naming every place that uses it.
fn env_checks(unset: &[UnsetVar]) -> Vec<Check> {
    let mut by_name: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for u in unset {
        let places = by_name.entry(&u.name).or_default();
        if !places.contains(&u.at.as_str()) {
            places.push(&u.at);
        }
    }
    by_name
        .into_iter()
        .map(|(name, places)| {
            check(
                Verdict::Fail,
                "env",
                format!(
                    "${{{name}}} is not set (used by {}): set {name} in toolgate's environment \
                     (the unit reads /etc/toolgate/toolgate.env; to check as the service would, \
                     `set -a; . /etc/toolgate/toolgate.env; set +a` before `toolgate doctor`)",
                    places.join(", ")
                ),
            )
        })
        .collect()
}

/// The servers whose configuration uses an unset variable.
fn needs_unset(name: &str, unset: &[UnsetVar]) -> Vec<String> {
    let prefix = format!("$.servers.{name}.");
    let mut names: Vec<String> = unset
        .iter()
        .filter(|u| u.at.starts_with(&prefix))
        .map(|u| format!("${{{}}}", u.name))
        .collect();
    names.dedup();
    names
}

/// Probes every configured upstream ([`probe`]), all at once: one line each, in name order.
/// `runnable`: the stdio servers whose command was found.
async fn upstream_checks(cfg: &Config, unset: &[UnsetVar], runnable: &[String]) -> Vec<Check> {
    let client = crate::gateway::http_client_via(cfg.tailnet.socks5_addr().map(|socks5| {
        crate::gateway::TailnetProxy {
            socks5,
            magic_dns_suffix: None,
        }
    }));
    let launcher = match &cfg.stdio.launcher {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find toolgate's own binary (the launcher): {e}")),
    };
    let probes = cfg.servers.iter().map(|(name, server)| {
        let (client, launcher) = (&client, &launcher);
        async move { upstream_check(cfg, name, server, unset, runnable, client, launcher).await }
    });
    futures_util::future::join_all(probes).await
}

/// The report line of one upstream.
async fn upstream_check(
    cfg: &Config,
    name: &str,
    server: &crate::config::Server,
    unset: &[UnsetVar],
    runnable: &[String],
    client: &Result<reqwest::Client, String>,
    launcher: &Result<PathBuf, String>,
) -> Check {
    let missing = needs_unset(name, unset);
    if !missing.is_empty() {
        return check(
            Verdict::Skip,
            "upstream",
            format!(
                "servers.{name}: not probed, it needs {} (unset, see above)",
                missing.join(", ")
            ),
        );
    }
    let (target, result) = match &server.transport {
        crate::config::Transport::Http(url) => {
            let result = match client {
                Ok(c) => probe::http(c, url, &server.headers, server.timeout).await,
                Err(e) => Err(e.clone()),
            };
            (shown_url(url), result)
        }
        crate::config::Transport::Stdio(cmd) => {
            let shown = format!("`{}`", cmd.command.join(" "));
            if !runnable.iter().any(|r| r == name) {
                return check(
                    Verdict::Skip,
                    "upstream",
                    format!("servers.{name}: {shown} not started (see the stdio line above)"),
                );
            }
            let result = match launcher {
                Ok(l) => probe::stdio(name, server, cmd, &cfg.stdio, l).await,
                Err(e) => Err(e.clone()),
            };
            (shown, result)
        }
    };
    match result {
        Ok(answer) => check(
            Verdict::Ok,
            "upstream",
            format!("servers.{name}: {target} speaks MCP: {answer}"),
        ),
        Err(why) => check(
            Verdict::Fail,
            "upstream",
            format!(
                "servers.{name}: {target}: {why}; calls to it will fail until it answers \
                 (is it running? is servers.{name} right?)"
            ),
        ),
    }
}

/// An upstream URL as the report shows it: without credentials or query.
fn shown_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}

/// Kinds the gateway checks itself, whatever the servers are.
const BUILT_IN_KINDS: [&str; 2] = ["toolgate_metrics", "toolgate_audit"];

/// Resource policies whose kind no server (or hook, or the gateway itself) uses, and servers
/// whose kind no policy covers (every call to them is denied).
fn coverage_checks(cfg: &Config, set: &crate::policy::compile::PolicySet) -> Vec<Check> {
    let mut used: Vec<&str> = BUILT_IN_KINDS.to_vec();
    used.extend(cfg.servers.values().map(|s| s.resource_kind.as_str()));
    if let Some(a) = &cfg.hooks.aperture {
        used.push(&a.resource_kind);
    }
    let mut out = Vec::new();
    let mut unused: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
        Default::default();
    for ((kind, _), by_scope) in &set.resources {
        if !used.contains(&kind.as_str()) {
            let files = unused.entry(kind).or_default();
            files.extend(by_scope.values().map(|p| p.file.as_str()));
        }
    }
    for (kind, files) in unused {
        let hint = if kind == crate::config::hooks::DEFAULT_RESOURCE_KIND {
            "it is used only by hooks.aperture, which is not configured".to_string()
        } else {
            "no servers.<name>.resource_kind is this: a typo in the policy's `resource:` or in \
             the server's resource_kind?"
                .to_string()
        };
        out.push(check(
            Verdict::Warn,
            "coverage",
            format!(
                "policies for resource kind {kind:?} ({}) match no configured server: {hint}",
                files.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    // A kind is covered by its resource policies, or by a principal or role policy rule whose
    // resource pattern matches it.
    let covered = |kind: &str| {
        set.resources.keys().any(|(k, _)| k == kind)
            || set.all.iter().any(|p| {
                p.rules
                    .iter()
                    .any(|r| r.resource.as_ref().is_some_and(|g| g.matches(kind)))
            })
    };
    for (name, s) in &cfg.servers {
        if !covered(&s.resource_kind) {
            out.push(check(
                Verdict::Warn,
                "coverage",
                format!(
                    "servers.{name}: no policy covers its resource kind {:?}: every call to it \
                     is denied; add a resource policy for it (start from policies/mcp_server.yaml)",
                    s.resource_kind
                ),
            ));
        }
    }
    out
}

/// Every stdio server's command exists and is executable, as its child would look it up
/// (the child's `PATH`, its `cwd`); and the launcher binary is there. Each line comes with
/// the server it is about (`None`: the launcher's).
fn stdio_checks(cfg: &Config) -> Vec<(Option<String>, Check)> {
    let mut out = Vec::new();
    for (name, s) in &cfg.servers {
        let Some(cmd) = s.stdio() else { continue };
        let env = crate::stdio::Settings::child_env(std::env::vars(), &cmd.env);
        let line = match crate::stdio::resolve_program(&cmd.command, &env, cmd.cwd.as_deref()) {
            Ok(p) => check(
                Verdict::Ok,
                "stdio",
                format!("servers.{name}: {} is executable", p.display()),
            ),
            Err(e) => check(Verdict::Fail, "stdio", format!("servers.{name}: {e}")),
        };
        out.push((Some(name.clone()), line));
    }
    if !out.is_empty() {
        if let Some(l) = &cfg.stdio.launcher {
            if !l.is_file() {
                // No child can start: no stdio server is runnable.
                for (name, _) in out.iter_mut() {
                    *name = None;
                }
                out.push((
                    None,
                    check(
                        Verdict::Fail,
                        "stdio",
                        format!("stdio.launcher {} is not a file", l.display()),
                    ),
                ));
            }
        }
    }
    out
}

async fn tailnet_checks(cfg: &Config, out: &mut Vec<Check>) {
    let api = LocalApi::unix(&cfg.identity.socket);
    let transport = api.config().transport.to_string();
    let status = match api.status().await {
        Ok(s) => s,
        Err(e) => {
            let hint = match &e {
                LocalApiError::AccessDenied { .. } => {
                    "this user may not read tailscaled's socket; run as root or a permitted user"
                }
                _ => {
                    "is tailscaled running (`systemctl status tailscaled`), and is \
                     identity.socket its --socket?"
                }
            };
            out.push(check(
                Verdict::Fail,
                "tailscaled",
                format!("not reachable at {transport}: {e}; {hint}"),
            ));
            out.push(check(Verdict::Skip, "https", "needs tailscaled"));
            return;
        }
    };
    out.push(check(
        Verdict::Ok,
        "tailscaled",
        format!("reachable at {transport}, version {}", status.version),
    ));
    out.push(backend_check(&status));
    if status.is_running() {
        let ips: Vec<String> = status.tailscale_ips.iter().map(IpAddr::to_string).collect();
        let name = status.self_dns_name().unwrap_or("");
        let tailnet = status.tailnet_name().unwrap_or("");
        let verdict = if name.is_empty() || ips.is_empty() {
            Verdict::Warn
        } else {
            Verdict::Ok
        };
        out.push(check(
            verdict,
            "node",
            format!(
                "{} ({}), tailnet {}",
                if name.is_empty() {
                    "<no MagicDNS name>"
                } else {
                    name
                },
                if ips.is_empty() {
                    "no IPs".to_owned()
                } else {
                    ips.join(", ")
                },
                if tailnet.is_empty() {
                    "<unknown>"
                } else {
                    tailnet
                }
            ),
        ));
        out.push(mode_check(cfg, &status));
        out.push(whois_self_check(cfg, &api, &status).await);
    }
    out.push(https_check(cfg, &api, &status).await);
}

fn backend_check(s: &Status) -> Check {
    let state = &s.backend_state;
    let todo = match state {
        BackendState::Running => return check(Verdict::Ok, "backend", "Running"),
        BackendState::NeedsLogin if !s.auth_url.is_empty() => {
            format!("log in at {}", s.auth_url)
        }
        BackendState::NeedsLogin => {
            "run `tailscale up` (or `tailscale up --authkey=tskey-...`) on this machine".to_owned()
        }
        BackendState::Stopped => "run `tailscale up` to start it".to_owned(),
        BackendState::NeedsMachineAuth => {
            "approve this machine in the tailnet admin console".to_owned()
        }
        BackendState::Starting | BackendState::NoState => {
            "tailscaled is still starting; try again in a moment".to_owned()
        }
        other => format!("unexpected state {other}"),
    };
    check(Verdict::Fail, "backend", format!("{state}: {todo}"))
}

fn mode_check(cfg: &Config, s: &Status) -> Check {
    if s.tun {
        return check(
            Verdict::Ok,
            "mode",
            "TUN device: tailnet peers arrive on this node's tailnet IPs",
        );
    }
    let tailnet_listen = cfg
        .listen
        .iter()
        .any(|l| matches!(l, crate::config::Listen::Tailnet(_)));
    let listen = if tailnet_listen {
        " `listen: [tailnet:PORT]` cannot bind in this mode (the tailnet IPs are not local \
         addresses): listen on 127.0.0.1:PORT instead."
    } else {
        ""
    };
    check(
        Verdict::Warn,
        "mode",
        format!(
            "userspace networking: tailnet peers arrive from 127.0.0.1 and are identified by \
             their exact ip:port. Every loopback port of this machine is reachable from the \
             tailnet where the ACL allows it: let the ACL open only toolgate's port, so upstream \
             MCP servers on loopback cannot be reached around the gateway.{listen}"
        ),
    )
}

/// A WhoIs of this node's own address: proves read access and the mapping.
async fn whois_self_check(cfg: &Config, api: &LocalApi, s: &Status) -> Check {
    let Some(ip) = s.tailscale_ips.first() else {
        return check(Verdict::Skip, "whois", "this node has no tailnet IP");
    };
    let mut settings = WhoisSettings::from_config(&cfg.identity);
    settings.tailnet = s.tailnet_name().map(str::to_owned);
    let resolver = WhoisResolver::new(api.clone(), settings);
    match resolver.resolve(SocketAddr::new(*ip, 0)).await {
        Ok(c) => check(
            Verdict::Ok,
            "whois",
            format!(
                "WhoIs works: this node ({ip}) maps to principal {:?} with roles {}",
                c.principal.id,
                c.principal.roles.join(", ")
            ),
        ),
        Err(e) => check(
            Verdict::Warn,
            "whois",
            format!("WhoIs of this node failed: {e}"),
        ),
    }
}

async fn https_check(cfg: &Config, api: &LocalApi, s: &Status) -> Check {
    let needed = cfg.tls == TlsMode::Auto;
    let fail = if needed { Verdict::Fail } else { Verdict::Warn };
    if !needed && s.cert_domains.is_empty() {
        return check(
            Verdict::Skip,
            "https",
            "tls: off (and the tailnet offers no certificates)",
        );
    }
    match LocalApiCerts::load(api, TlsSettings::default()).await {
        Ok(certs) => {
            let now = chrono::Utc::now();
            let held: Vec<String> = certs
                .info()
                .iter()
                .map(|i| {
                    format!(
                        "{} valid until {} ({} days)",
                        i.domain,
                        i.not_after.format("%Y-%m-%d %H:%M UTC"),
                        (i.not_after - now).num_days()
                    )
                })
                .collect();
            let note = if needed { "" } else { " (not used: tls: off)" };
            check(
                Verdict::Ok,
                "https",
                format!("certificate for {}{note}", held.join("; ")),
            )
        }
        Err(e) => check(fail, "https", e),
    }
}

/// The policy directory: present, not empty, compiling (the set, when it compiles).
fn policy_check(dir: &Path) -> (Check, Option<crate::policy::compile::PolicySet>) {
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        return (
            check(
                Verdict::Fail,
                "policies",
                format!(
                    "policies.dir {} {what}: `serve` refuses to start without policies; put your \
                     policies there (start from the repository's policies/) or fix policies.dir",
                    dir.display()
                ),
            ),
            None,
        );
    }
    match crate::policy::store::load_dir(dir) {
        Ok(set) if set.is_empty() => (
            check(
                Verdict::Fail,
                "policies",
                format!(
                    "policies.dir {} holds no policies (*.yaml, *.yml or *.json outside testdata/ \
                     and *_test files): `serve` refuses to start, it would deny every call; put \
                     your policies there (start from the repository's policies/)",
                    dir.display()
                ),
            ),
            None,
        ),
        Ok(set) => (
            check(
                Verdict::Ok,
                "policies",
                format!(
                    "{} policies compile from {} (snapshot {})",
                    set.len(),
                    dir.display(),
                    set.hash.get(..12).unwrap_or(&set.hash)
                ),
            ),
            Some(set),
        ),
        Err(errors) => {
            let mut detail = format!(
                "{} error(s) in {} (every call is denied until they compile; see `toolgate \
                 policy check`)",
                errors.len(),
                dir.display()
            );
            for e in errors.iter().take(5) {
                detail.push_str(&format!("\n                 {e}"));
            }
            (check(Verdict::Fail, "policies", detail), None)
        }
    }
}

fn audit_check(path: &Path) -> Check {
    if path.exists() {
        return match crate::audit::query::Reader::open(path) {
            Ok(reader) => {
                let rows = reader
                    .head_seq()
                    .map(|n| format!(", {n} rows"))
                    .unwrap_or_default();
                check(
                    Verdict::Ok,
                    "audit",
                    format!("{} opens{rows}", path.display()),
                )
            }
            Err(e) => check(Verdict::Fail, "audit", e.to_string()),
        };
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return check(
            Verdict::Fail,
            "audit",
            format!(
                "{} does not exist and neither does its directory {}",
                path.display(),
                dir.display()
            ),
        );
    }
    let probe = dir.join(format!(".toolgate-doctor-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            check(
                Verdict::Ok,
                "audit",
                format!(
                    "{} does not exist yet; it will be created at start ({} is writable)",
                    path.display(),
                    dir.display()
                ),
            )
        }
        Err(e) => check(
            Verdict::Fail,
            "audit",
            format!(
                "{} does not exist and {} is not writable for this user: {e}",
                path.display(),
                dir.display()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("100.64.0.1:443").unwrap(),
            "100.64.0.1:443".parse().unwrap()
        );
        assert_eq!(
            parse_addr("100.64.0.1").unwrap(),
            "100.64.0.1:0".parse().unwrap()
        );
        assert_eq!(
            parse_addr("[fd7a::1]:5").unwrap(),
            "[fd7a::1]:5".parse().unwrap()
        );
        assert_eq!(
            parse_addr("fd7a::1").unwrap(),
            "[fd7a::1]:0".parse().unwrap()
        );
        assert!(parse_addr("host.example").is_err());
    }

    #[test]
    fn backend_states_say_what_to_run() {
        let mut s = Status {
            backend_state: BackendState::NeedsLogin,
            ..Status::default()
        };
        let c = backend_check(&s);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.detail.contains("tailscale up"), "{}", c.detail);
        s.auth_url = "https://login.tailscale.com/a/x".into();
        assert!(backend_check(&s).detail.contains("log in at https://login"));
        s.backend_state = BackendState::Stopped;
        assert!(backend_check(&s).detail.contains("tailscale up"));
        s.backend_state = BackendState::Running;
        assert_eq!(backend_check(&s).verdict, Verdict::Ok);
        assert_eq!(
            format!("{}", check(Verdict::Ok, "audit", "x")),
            "OK    audit      x"
        );
    }
}
