//! `toolgate serve`: start-up, listeners, reloads, shutdown.
//!
//! Start-up order: policies (a missing or empty directory, or policies that do not compile,
//! fail the start: a gateway denying every call is not running), the audit store (no audit, no
//! start), the identity provider (tailscaled must be `Running`: we wait and say what to run),
//! then one listener per address; then `READY=1` to systemd (`systemd.rs`), whose `STATUS=`
//! line says what start-up is waiting for meanwhile. `tailnet:PORT` binds exactly this node's tailnet IPs and is
//! re-bound when they change (learned from the IPN bus). SIGHUP and policy-file changes reload
//! policies (a broken reload keeps the last good set). SIGTERM/SIGINT stop accepting, let
//! in-flight calls finish within a deadline, flush the audit writer and exit 0.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::audit::{self, AuditLog};
pub use crate::config::is_tailnet_ip;
use crate::config::{Config, IdentityProvider, Listen, TailnetMode};
use crate::gateway::{Caller, Gateway, Sessions, Upstream};
use crate::identity::StaticIdentities;
use crate::policy::store::Store;
use crate::server::{self, Identify, StaticProvider};
use crate::tailnet::localapi::LocalApi;
use crate::tailnet::types::Status;

/// How long in-flight calls may run after SIGTERM.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);
/// How often the policy directory is checked for changes.
pub const POLICY_POLL: Duration = Duration::from_secs(1);

/// Refuses peers outside the tailnet before any WhoIs (explicit non-tailnet binds).
struct TailnetPeersOnly(Arc<dyn Identify>);

impl Identify for TailnetPeersOnly {
    fn identify(
        &self,
        peer: SocketAddr,
    ) -> futures_util::future::BoxFuture<'_, Result<Caller, String>> {
        if is_tailnet_ip(peer.ip()) || peer.ip().is_loopback() {
            self.0.identify(peer)
        } else {
            Box::pin(async move { Err(format!("peer {} is outside the tailnet", peer.ip())) })
        }
    }

    fn generation(&self) -> u64 {
        self.0.generation()
    }
}

/// What the node learned from tailscaled.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub dns_name: String,
    pub ips: Vec<IpAddr>,
    pub tailnet: String,
    /// The MagicDNS suffix (`tail1234.ts.net`), to route upstream calls to tailnet hosts.
    pub magic_dns_suffix: String,
}

impl NodeInfo {
    fn from_status(s: &Status) -> NodeInfo {
        NodeInfo {
            dns_name: s.self_dns_name().unwrap_or_default().to_string(),
            ips: s.tailscale_ips.clone(),
            tailnet: s.tailnet_name().unwrap_or_default().to_string(),
            magic_dns_suffix: s
                .current_tailnet
                .as_ref()
                .map(|t| t.magic_dns_suffix.clone())
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| s.magic_dns_suffix.clone()),
        }
    }
}

/// Waits until tailscaled is `Running`, saying what the operator should do meanwhile.
pub async fn wait_running(
    api: &LocalApi,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Status, String> {
    let mut last = String::new();
    loop {
        match api.status().await {
            Ok(s) if s.is_running() => return Ok(s),
            Ok(s) => {
                let state = s.backend_state.as_str().to_string();
                if state != last {
                    let hint = match state.as_str() {
                        "NeedsLogin" => match s.auth_url.as_str() {
                            "" => "run `tailscale up` (or `tailscale up --authkey=...`) on this machine".to_string(),
                            url => format!("log in at {url}"),
                        },
                        "Stopped" => "run `tailscale up` to start it".to_string(),
                        "NeedsMachineAuth" => "approve this machine in the admin console".to_string(),
                        _ => "waiting".to_string(),
                    };
                    tracing::warn!(state = %state, "tailscaled is not running yet: {hint}");
                    crate::systemd::status(&format!(
                        "waiting for tailscaled: it is {state}; {hint}"
                    ));
                    last = state;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last {
                    tracing::warn!(
                        "tailscaled is not reachable ({msg}); is tailscaled running, and may this user read its socket?"
                    );
                    crate::systemd::status(&format!(
                        "waiting for tailscaled: not reachable ({msg}); is it running, and may this user read its socket?"
                    ));
                    last = msg;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Err("shutdown requested".into()),
        }
    }
}

/// Waits until tailscaled reports tailnet addresses for this node (needed by `tailnet:PORT`).
pub async fn wait_addresses(
    api: &LocalApi,
    mut status: Status,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Status, String> {
    let mut said = false;
    while status.tailscale_ips.is_empty() {
        if !said {
            tracing::warn!(
                "tailscaled is Running but reports no tailnet addresses for this node yet; waiting"
            );
            crate::systemd::status(
                "waiting for this node's tailnet addresses (tailscaled is Running but reports none yet)",
            );
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Err("shutdown requested".into()),
        }
        if let Ok(s) = api.status().await {
            status = s;
        }
    }
    Ok(status)
}

/// The addresses the listen entries resolve to, given this node's tailnet IPs. (Which entries
/// are allowed at all was checked with the config.)
pub fn resolve_listen(cfg: &Config, tailnet_ips: &[IpAddr]) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for l in &cfg.listen {
        match *l {
            Listen::Tailnet(port) => {
                if tailnet_ips.is_empty() {
                    return Err(format!(
                        "listen {l}: this node has no tailnet IPs (is tailscaled logged in?)"
                    ));
                }
                out.extend(tailnet_ips.iter().map(|ip| SocketAddr::new(*ip, port)));
            }
            Listen::Addr(a) => out.push(a),
        }
    }
    Ok(out)
}

/// A cheap fingerprint of a directory tree (names, sizes, mtimes) to notice edits.
fn dir_fingerprint(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut n = 0usize;
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            n += 1;
            if n > 200_000 {
                return h.finish();
            }
            let Ok(md) = e.metadata() else { continue };
            e.file_name().hash(&mut h);
            md.len().hash(&mut h);
            md.modified().unwrap_or(SystemTime::UNIX_EPOCH).hash(&mut h);
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    h.finish()
}

fn reload(gw: &Gateway, why: &str) {
    use std::sync::atomic::Ordering;
    crate::systemd::reloading(&format!("reloading policies ({why})"));
    // An emptied directory (a deploy half done, a wrong mount) would compile to a set that
    // denies every call: refuse it like a compile error and keep the last good set.
    let emptied = matches!(
        crate::policy::store::read_dir(gw.store.dir()),
        Ok(contents) if contents.policies.is_empty()
    );
    let result = if emptied {
        let e = vec![crate::policy::compile::CompileError {
            file: gw.store.dir().display().to_string(),
            path: "$".into(),
            line: None,
            column: None,
            message: "the directory holds no policies".into(),
        }];
        gw.store.failed(&e);
        Err(e)
    } else {
        gw.store.reload()
    };
    match result {
        Ok(set) => {
            gw.metrics.policy_reloads.fetch_add(1, Ordering::Relaxed);
            let told = gw.policies_changed();
            if told > 0 {
                tracing::info!(streams = told, "sent notifications/tools/list_changed");
            }
            tracing::info!(policies = set.len(), snapshot = %&set.hash[..12], "policies reloaded ({why})");
            crate::systemd::ready(&format!(
                "serving; {} policies reloaded ({why}), snapshot {}",
                set.len(),
                &set.hash[..12]
            ));
        }
        Err(errors) => {
            gw.metrics
                .policy_reload_failures
                .fetch_add(1, Ordering::Relaxed);
            for e in &errors {
                tracing::error!("policy error: {e}");
            }
            tracing::error!(
                errors = errors.len(),
                "policy reload failed ({why}); keeping the last good policies"
            );
            let kept = gw.store.current();
            crate::systemd::ready(&format!(
                "serving the last good policies (snapshot {}): the reload ({why}) failed with {} error(s), see the journal",
                &kept.hash[..12],
                errors.len()
            ));
        }
    }
}

/// Loads the policy directory for start-up. A missing or empty directory, or policies that do
/// not compile, stop the start: a gateway that would deny every call is not "running".
pub fn open_policies(dir: &Path) -> Result<Store, String> {
    crate::systemd::status(&format!("loading policies from {}", dir.display()));
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        return Err(format!(
            "policies.dir {} {what}: put your policies there (start from the repository's policies/) or fix policies.dir in the config; toolgate does not start without policies, it would deny every call",
            dir.display()
        ));
    }
    let (store, res) = Store::open(dir);
    if let Err(errors) = res {
        for e in &errors {
            tracing::error!("policy error: {e}");
        }
        return Err(format!(
            "{} policy error(s) in {}: toolgate does not start with policies that do not compile (it would deny every call); `toolgate policy check {}` lists them",
            errors.len(),
            dir.display(),
            dir.display()
        ));
    }
    let set = store.current();
    if set.is_empty() {
        return Err(format!(
            "policies.dir {} holds no policies (*.yaml, *.yml or *.json outside testdata/ and *_test files): toolgate does not start without policies, it would deny every call",
            dir.display()
        ));
    }
    tracing::info!(policies = set.len(), dir = %dir.display(), snapshot = %&set.hash[..12], "policies loaded");
    Ok(store)
}

/// Everything `serve` builds before it binds.
pub struct Built {
    pub gateway: Arc<Gateway>,
    pub audit: AuditLog,
    pub identify: Arc<dyn Identify>,
    pub listen: Vec<SocketAddr>,
    /// `tls: auto`: the LocalAPI certificate acceptor.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The stdio servers' children, stopped when `run` returns.
    pub stdio: Option<crate::stdio::Pool>,
}

/// Builds the gateway for `cfg`, with `identify` and the node's names; loads the policies
/// ([`open_policies`]).
pub fn build(
    cfg: Config,
    identify: Arc<dyn Identify>,
    node: &NodeInfo,
    listen: Vec<SocketAddr>,
    localapi: Option<LocalApi>,
) -> Result<Built, String> {
    let store = open_policies(&cfg.policies.dir)?;
    build_with(cfg, store, identify, node, listen, localapi)
}

/// [`build`] with policies already loaded.
pub fn build_with(
    mut cfg: Config,
    store: Store,
    identify: Arc<dyn Identify>,
    node: &NodeInfo,
    listen: Vec<SocketAddr>,
    localapi: Option<LocalApi>,
) -> Result<Built, String> {
    cfg.pdp.keysets = Arc::new(crate::pdp::jwt::KeySets::load(&cfg.pdp.jwt_keysets)?);
    crate::hook::http::check_config(&cfg)?;
    let audit =
        AuditLog::open(audit::Settings::from_config(&cfg.audit)).map_err(|e| e.to_string())?;
    let proxy = cfg
        .tailnet
        .socks5_addr()
        .map(|socks5| crate::gateway::TailnetProxy {
            socks5,
            magic_dns_suffix: Some(node.magic_dns_suffix.clone()).filter(|m| !m.is_empty()),
        });
    if let Some(p) = &proxy {
        tracing::info!(socks5 = %p.socks5, suffix = ?p.magic_dns_suffix, "upstream calls to tailnet hosts go through tailscaled's SOCKS5 listener");
    }
    let stdio = stdio_pool(&cfg)?;
    let mut upstreams = std::collections::BTreeMap::new();
    for (name, s) in &cfg.servers {
        let up = Upstream::from_config(name, s, stdio.as_ref().map(|p| (p, &cfg.stdio)))?;
        upstreams.insert(name.clone(), Arc::new(up));
    }
    let mut hosts: BTreeSet<String> = BTreeSet::new();
    if !node.dns_name.is_empty() {
        hosts.insert(node.dns_name.to_ascii_lowercase());
        if let Some(label) = node.dns_name.split('.').next() {
            hosts.insert(label.to_ascii_lowercase());
        }
    }
    for ip in &node.ips {
        hosts.insert(host_form(*ip));
    }
    for a in &listen {
        hosts.insert(host_form(a.ip()));
        if a.ip().is_loopback() {
            hosts.insert("localhost".into());
        }
    }
    let budget = crate::budget::Budget::new(cfg.limits.in_flight_bytes);
    let shadow = match &cfg.policies.shadow {
        Some(dir) => {
            let base = crate::policy::input::Params {
                globals: cfg.policies.globals.clone(),
                evaluation: cfg.policies.evaluation,
                schema_enforcement: cfg.policies.schema_enforcement,
                ..Default::default()
            };
            Some(Arc::new(crate::shadow::Shadow::start(dir, base)?))
        }
        None => None,
    };
    let gateway = Arc::new(Gateway {
        shadow,
        config: cfg,
        budget,
        store: Arc::new(store),
        upstreams,
        http: crate::gateway::upstream_client_via(proxy)?,
        sessions: Sessions::default(),
        server_requests: Default::default(),
        annotations: Default::default(),
        allowed_hosts: hosts.into_iter().collect(),
        audit: Arc::new(audit.clone()),
        metrics: Default::default(),
        localapi,
        whois: Default::default(),
        list_watchers: Default::default(),
        known_tools: Default::default(),
        in_flight: Default::default(),
        aggregate: Default::default(),
    });
    Ok(Built {
        gateway,
        audit,
        identify,
        listen,
        tls: None,
        stdio,
    })
}

/// The supervisor of stdio servers, when any is configured.
fn stdio_pool(cfg: &Config) -> Result<Option<crate::stdio::Pool>, String> {
    if !cfg.servers.values().any(|s| s.stdio().is_some()) {
        return Ok(None);
    }
    let launcher = match &cfg.stdio.launcher {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("stdio servers: cannot find toolgate's own binary: {e}"))?,
    };
    if !launcher.is_file() {
        return Err(format!(
            "stdio.launcher: {} is not a file",
            launcher.display()
        ));
    }
    crate::stdio::Pool::new(launcher, cfg.stdio.isolation, cfg.stdio.max_children).map(Some)
}

fn host_form(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// The static provider, refused on any non-loopback listener.
pub fn static_provider(cfg: &Config, listen: &[SocketAddr]) -> Result<Arc<dyn Identify>, String> {
    if let Some(a) = listen.iter().find(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "identity.provider static is for development only: it refuses to serve on {a}, which is not a loopback address"
        ));
    }
    let path: &PathBuf = cfg
        .identity
        .r#static
        .as_ref()
        .ok_or("identity.static: no fixture file")?;
    let identities = StaticIdentities::load(path)?;
    Ok(Arc::new(StaticProvider {
        identities,
        mappings: cfg.identity.role_mappings.clone(),
    }))
}

/// Binds `addrs` and serves them until `stop` turns true.
async fn spawn_listeners(
    built: &Built,
    app: &axum::Router,
    addrs: &[SocketAddr],
    stop: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), String> {
    for addr in addrs {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(%local, tls = built.tls.is_some(), "listening");
        let identify: Arc<dyn Identify> = if local.ip().is_loopback() || is_tailnet_ip(local.ip()) {
            built.identify.clone()
        } else {
            Arc::new(TailnetPeersOnly(built.identify.clone()))
        };
        let limits = server::ConnLimits {
            identity_max_age: built.gateway.config.identity.max_age,
            ..Default::default()
        };
        tasks.spawn(server::serve_listener_with(
            listener,
            app.clone(),
            identify,
            built.tls.clone(),
            limits,
            Arc::new(server::ConnStats::default()),
            stop.clone(),
        ));
    }
    Ok(())
}

/// A stop signal that follows `parent` and can also be fired on its own.
fn child_stop(parent: &watch::Receiver<bool>) -> (watch::Sender<bool>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(*parent.borrow());
    let mut parent = parent.clone();
    let forward = tx.clone();
    tokio::spawn(async move {
        let _ = parent.wait_for(|s| *s).await;
        let _ = forward.send(true);
    });
    (tx, rx)
}

/// Runs listeners until `shutdown`; returns when every connection has finished.
///
/// With a LocalAPI, `tailnet:PORT` entries follow the node's tailnet IPs: when the IPN bus
/// reports a new netmap and the IPs changed, those listeners are replaced (connections in
/// flight finish on the old ones).
pub async fn run(built: Built, shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let app = server::router(built.gateway.clone());
    let mut tasks = tokio::task::JoinSet::new();
    let cfg = &built.gateway.config;
    let tailnet_ports: Vec<u16> = cfg
        .listen
        .iter()
        .filter_map(|l| match l {
            Listen::Tailnet(p) => Some(*p),
            Listen::Addr(_) => None,
        })
        .collect();
    let follows = |a: &SocketAddr| tailnet_ports.contains(&a.port()) && is_tailnet_ip(a.ip());
    let fixed: Vec<SocketAddr> = built
        .listen
        .iter()
        .copied()
        .filter(|a| !follows(a))
        .collect();
    let mut current: Vec<SocketAddr> = built
        .listen
        .iter()
        .copied()
        .filter(|a| follows(a))
        .collect();
    spawn_listeners(&built, &app, &fixed, shutdown.clone(), &mut tasks).await?;
    let (mut gen_tx, gen_rx) = child_stop(&shutdown);
    spawn_listeners(&built, &app, &current, gen_rx, &mut tasks).await?;
    let mut bus = match (&built.gateway.localapi, tailnet_ports.is_empty()) {
        (Some(api), false) => Some(api.clone()),
        _ => None,
    };
    // Policy changes on disk apply to the next call.
    if built.gateway.config.policies.watch {
        let gw = built.gateway.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let dir = gw.store.dir().to_path_buf();
            let mut seen = dir_fingerprint(&dir);
            let shadow_dir = gw.shadow.as_ref().map(|s| s.dir().to_path_buf());
            let mut shadow_seen = shadow_dir.as_deref().map(dir_fingerprint);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(POLICY_POLL) => {}
                    _ = stop.changed() => return,
                }
                let now = dir_fingerprint(&dir);
                if now != seen {
                    seen = now;
                    reload(&gw, "files changed");
                }
                if let (Some(s), Some(d)) = (&gw.shadow, &shadow_dir) {
                    let now = Some(dir_fingerprint(d));
                    if now != shadow_seen {
                        shadow_seen = now;
                        s.reload("shadow files changed");
                    }
                }
            }
        });
    }
    if let Some(addr) = built.gateway.config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (metrics.listen): {e}"))?;
        tracing::info!(%addr, "metrics listening");
        let mut stop = shutdown.clone();
        let router = server::metrics_router(built.gateway.clone());
        tasks.spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        });
    }
    let set = built.gateway.store.current();
    let addrs: Vec<String> = fixed
        .iter()
        .chain(&current)
        .map(|a| a.to_string())
        .collect();
    crate::systemd::ready(&format!(
        "serving on {}; {} policies (snapshot {})",
        addrs.join(", "),
        set.len(),
        &set.hash[..12.min(set.hash.len())]
    ));
    drop(set);
    let mut stop = shutdown.clone();
    while let Some(api) = bus.take() {
        let mut watcher = tokio::select! {
            w = api.watch_ipn_bus(crate::tailnet::types::WatchMask::NETMAP_WATCH) => w,
            _ = stop.wait_for(|s| *s) => break,
        };
        let watcher = match watcher.as_mut() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the IPN bus; retrying in 5 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                bus = Some(api);
                continue;
            }
        };
        loop {
            let n = tokio::select! {
                n = watcher.next() => n,
                _ = stop.wait_for(|s| *s) => None,
            };
            match n {
                Some(Ok(notify)) if notify.net_map => {
                    let Ok(status) = api.status().await else {
                        continue;
                    };
                    let want: Vec<SocketAddr> = tailnet_ports
                        .iter()
                        .flat_map(|p| {
                            status
                                .tailscale_ips
                                .iter()
                                .map(move |ip| SocketAddr::new(*ip, *p))
                        })
                        .collect();
                    let (mut a, mut b) = (want.clone(), current.clone());
                    a.sort();
                    b.sort();
                    if a != b && !want.is_empty() {
                        tracing::info!(old = ?current, new = ?want, "tailnet addresses changed; re-binding");
                        let _ = gen_tx.send(true);
                        let (tx, rx) = child_stop(&shutdown);
                        gen_tx = tx;
                        if let Err(e) = spawn_listeners(&built, &app, &want, rx, &mut tasks).await {
                            tracing::error!("re-binding failed: {e}");
                        }
                        current = want;
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        if *stop.borrow() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        bus = Some(api);
    }
    while tasks.join_next().await.is_some() {}
    if let Some(pool) = &built.stdio {
        // Every stdio child goes with us: stdin closed, SIGTERM, SIGKILL (see stdio/launch.rs).
        let within = built.gateway.config.stdio.grace * 3 + Duration::from_secs(3);
        pool.shutdown(within).await;
    }
    Ok(())
}

/// Wires SIGHUP (reload) and SIGTERM/SIGINT (graceful stop).
/// SIGTERM/SIGINT: a graceful stop (also while still waiting for tailscaled at start-up).
pub fn stop_signals(stop: watch::Sender<bool>) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: no new connections; waiting for in-flight calls");
        crate::systemd::stopping(
            "shutting down: waiting for in-flight calls, then flushing the audit store",
        );
        let _ = stop.send(true);
    });
    Ok(())
}

/// SIGHUP: reload policies, and the shadow policies after them (a broken reload keeps the last
/// good set).
pub fn reload_signal(gw: Arc<Gateway>) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload(&gw, "SIGHUP");
            if let Some(s) = &gw.shadow {
                s.reload("SIGHUP");
            }
        }
    });
    Ok(())
}

/// `toolgate serve --config FILE`.
pub async fn serve(mut cfg: Config) -> Result<(), String> {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    stop_signals(stop_tx.clone())?;
    // Policies first: a wrong policies.dir fails the start at once, before any wait.
    let store = open_policies(&cfg.policies.dir)?;
    // `tailnet.mode: sidecar`: our own tailscaled, logged in through the LocalAPI; everything
    // below then talks to its socket. Kept alive (and stopped) with this function.
    let mut sidecar: Option<crate::tailnet::sidecar::Sidecar> = None;
    if cfg.identity.provider == IdentityProvider::Tailscale
        && cfg.tailnet.mode == TailnetMode::Sidecar
    {
        let join = crate::tailnet::join::JoinSettings::from_config(&cfg.tailnet)?;
        crate::systemd::status(&format!(
            "starting the sidecar tailscaled ({})",
            cfg.tailnet.tailscaled.display()
        ));
        let sc = crate::tailnet::sidecar::Sidecar::start(
            crate::tailnet::sidecar::SidecarSettings::from_config(&cfg.tailnet),
        )
        .await?;
        cfg.identity.socket = sc.settings().socket.clone();
        let api = sc.localapi();
        sidecar = Some(sc);
        // SIGTERM/SIGINT while joining: stop tailscaled by pid and exit cleanly (a signal's
        // default action would leave the child running).
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
            let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
            let early = stop_tx.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                let _ = early.send(true);
            });
        }
        crate::systemd::status(&format!(
            "waiting for the sidecar node {} to join the tailnet (see the log for a login URL)",
            cfg.tailnet.hostname
        ));
        if let Err(e) = crate::tailnet::join::ensure_joined(&api, &join, &mut stop_rx).await {
            if let Some(sc) = sidecar.take() {
                sc.stop().await;
            }
            if *stop_rx.borrow() {
                tracing::info!("shut down before the sidecar node joined the tailnet");
                return Ok(());
            }
            return Err(e);
        }
        crate::tailnet::join::spawn_rejoin(api, join, stop_rx.clone());
    }
    let mut localapi: Option<LocalApi> = None;
    let mut tls = None;
    let mut whois = None;
    let (identify, node, listen): (Arc<dyn Identify>, NodeInfo, Vec<SocketAddr>) = match cfg
        .identity
        .provider
    {
        IdentityProvider::Static => {
            if cfg.tls == crate::config::TlsMode::Auto {
                return Err("tls: auto needs tailscaled's certificates; with identity.provider static use tls: off".into());
            }
            let listen = resolve_listen(&cfg, &[])?;
            (static_provider(&cfg, &listen)?, NodeInfo::default(), listen)
        }
        IdentityProvider::Tailscale => {
            let api = LocalApi::unix(&cfg.identity.socket);
            crate::systemd::status(&format!(
                "waiting for tailscaled ({})",
                cfg.identity.socket.display()
            ));
            let mut status = match wait_running(&api, &mut stop_rx).await {
                Ok(s) => s,
                Err(_) if *stop_rx.borrow() => {
                    tracing::info!("shut down while waiting for tailscaled");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if cfg.listen.iter().any(|l| matches!(l, Listen::Tailnet(_))) {
                status = match wait_addresses(&api, status, &mut stop_rx).await {
                    Ok(s) => s,
                    Err(_) if *stop_rx.borrow() => {
                        tracing::info!("shut down while waiting for the node's addresses");
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
            }
            let node = NodeInfo::from_status(&status);
            tracing::info!(node = %node.dns_name, tailnet = %node.tailnet, ips = ?node.ips, version = %status.version, "tailscaled is running");
            if !status.tun && cfg.tailnet.mode == TailnetMode::Host {
                if let Some(l) = cfg.listen.iter().find(|l| matches!(l, Listen::Tailnet(_))) {
                    tracing::warn!(listen = %l, "tailscaled runs in userspace-networking mode: its tailnet IPs are not local addresses, so {l} cannot bind; listen on 127.0.0.1:PORT instead (inbound tailnet TCP is forwarded there)");
                }
            }
            let listen = resolve_listen(&cfg, &node.ips)?;
            localapi = Some(api.clone());
            if cfg.tls == crate::config::TlsMode::Auto {
                let (acceptor, certs) =
                    crate::tailnet::tls::acceptor(&api, Default::default()).await?;
                tracing::info!(domains = ?certs.domains(), "serving HTTPS with the LocalAPI certificate");
                tls = Some(acceptor);
            }
            let resolver = crate::tailnet::whois::WhoisResolver::from_config(
                &cfg.identity,
                Some(&node.tailnet),
            );
            resolver.spawn_netmap_watch();
            whois = Some(resolver.clone());
            (resolver as Arc<dyn Identify>, node, listen)
        }
    };
    crate::systemd::status("opening the audit store and binding the listeners");
    let mut built = build_with(cfg, store, identify, &node, listen, localapi)?;
    built.tls = tls;
    if let Some(w) = whois {
        built.gateway.set_whois(w);
    }
    let audit = built.audit.clone();
    reload_signal(built.gateway.clone())?;
    let deadline_rx = stop_rx.clone();
    let served = run(built, stop_rx);
    tokio::pin!(served);
    let mut deadline_rx = deadline_rx;
    tokio::select! {
        r = &mut served => r?,
        _ = async {
            let _ = deadline_rx.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_DEADLINE).await;
        } => tracing::warn!("in-flight calls did not finish within {:?}; exiting", SHUTDOWN_DEADLINE),
    }
    audit
        .flush()
        .await
        .map_err(|e| format!("flushing the audit store: {e}"))?;
    if let Some(sc) = sidecar {
        sc.stop().await;
    }
    tracing::info!("audit store flushed; bye");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(std::sync::atomic::AtomicUsize);
    impl Identify for Counting {
        fn identify(
            &self,
            _: SocketAddr,
        ) -> futures_util::future::BoxFuture<'_, Result<Caller, String>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Err("inner".to_string()) })
        }
    }

    #[tokio::test]
    async fn non_tailnet_peers_are_refused_before_whois() {
        let inner = Arc::new(Counting(Default::default()));
        let guard = TailnetPeersOnly(inner.clone());
        let outside = guard
            .identify(
                "10.1.2.3:5555"
                    .parse()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            )
            .await;
        assert!(
            outside
                .err()
                .unwrap_or_default()
                .contains("outside the tailnet")
        );
        assert_eq!(
            inner.0.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no WhoIs for an outsider"
        );
        let _ = guard
            .identify(
                "100.64.0.9:5555"
                    .parse()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            )
            .await;
        assert_eq!(inner.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn listen_resolves_tailnet_entries_to_the_nodes_ips() {
        let c = Config::parse(
            "t.yaml",
            b"listen: [\"tailnet:443\", \"127.0.0.1:8080\"]\n",
            Path::new("/"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ips: Vec<IpAddr> = vec![IpAddr::from([100, 64, 0, 7])];
        assert_eq!(
            resolve_listen(&c, &ips).unwrap_or_default(),
            vec![
                SocketAddr::from(([100, 64, 0, 7], 443)),
                SocketAddr::from(([127, 0, 0, 1], 8080))
            ]
        );
        assert!(resolve_listen(&c, &[]).is_err());
    }
}
