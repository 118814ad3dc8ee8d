//! Identity from tailscaled: a WhoIs per connection, turned into a principal (DESIGN.md §1
//! step 2, §3), with the bounds the real daemon needs.
//!
//! Facts this module is built around (reference/tailnet-lab.md finding 1, tailscale.md §3.4):
//!
//! - tailscaled 1.96.4 answers a WhoIs for an `ip:port` that no node owns only after ~181 ms
//!   (its internal proxymap retry, under its main lock), for any address. So concurrent WhoIs
//!   calls are bounded by a semaphore, and loopback peers by a second, smaller one: a purely
//!   local process hammering the listener must not stall identity (or `status`, or certs)
//!   for tailnet peers that arrive on their own 100.x/fd7a addresses.
//! - A loopback 404 is retried at most once, after a brief pause: the proxymap entry is
//!   registered just after netstack dials us, and tailscaled already retries internally.
//! - Positive answers are cached per peer IP with the configured TTL, but never for loopback
//!   peers: in userspace-networking mode 127.0.0.1 carries every tailnet peer, told apart only
//!   by the source port. The cache is flushed when the IPN bus reports a new netmap (or a state
//!   change, or the bus connection breaks), so a re-tagged or removed node loses its cached
//!   identity at once.
//! - Every failure (tailscaled down, slow, 403, 500, garbage, socket gone) denies within
//!   `timeout`, is counted by kind and logged (rate-limited). Nothing is sticky: the next
//!   connection simply asks again, so identity recovers as soon as tailscaled does.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::localapi::{LocalApi, LocalApiConfig, LocalApiError};
use super::types::{WatchMask, WhoIs};
use crate::caller::{Caller, Identify};
use crate::config::{IdentityConfig, RoleMappings};
use crate::identity::{Identity, TAGGED_DEVICES, normalize_ip};

/// Concurrent WhoIs calls in flight, all peers together.
pub const DEFAULT_MAX_CONCURRENT: usize = 32;
/// Concurrent WhoIs calls for loopback peers (a subset of the above). Measured on tailscaled
/// 1.96.4 (`cargo bench --bench identity`): unmapped `ip:port` lookups run one after another
/// under its main lock, ~181 ms each, and a `status` (or any other WhoIs) sent meanwhile waits
/// for all of them (k in parallel: k × 181 ms). Each unit of this bound is thus ~181 ms of
/// stall a local process can impose on everyone else; tailscaled gains nothing from more
/// parallel misses, so the bound is small.
pub const DEFAULT_MAX_CONCURRENT_LOOPBACK: usize = 2;
/// The pause before the single retry of a loopback 404.
pub const DEFAULT_LOOPBACK_RETRY_DELAY: Duration = Duration::from_millis(20);
/// Most peer IPs kept in the cache.
pub const DEFAULT_CACHE_CAPACITY: usize = 16_384;
/// First and longest pause before re-subscribing to the IPN bus after it broke.
const BUS_BACKOFF_MIN: Duration = Duration::from_millis(500);
const BUS_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// At most one warning per error kind per this interval (the rest go to debug).
const WARN_EVERY: Duration = Duration::from_secs(5);

/// How the resolver behaves. [`WhoisSettings::from_config`] fills it from `identity:`.
#[derive(Clone, Debug)]
pub struct WhoisSettings {
    /// The app capability whose grant objects become `attr.caps` (and roles).
    pub capability: String,
    /// Extra roles by login, tag or group.
    pub mappings: RoleMappings,
    /// How long a positive answer is reused for the same (non-loopback) peer IP.
    pub ttl: Duration,
    /// The bound on one whole lookup: waiting for a slot, the WhoIs call(s), the retry.
    pub timeout: Duration,
    /// Concurrent WhoIs calls, all peers.
    pub max_concurrent: usize,
    /// Concurrent WhoIs calls for loopback peers.
    pub max_concurrent_loopback: usize,
    /// Pause before retrying a loopback 404 (once).
    pub loopback_retry_delay: Duration,
    /// Most cached peer IPs.
    pub cache_capacity: usize,
    /// The tailnet name (`CurrentTailnet.Name`), when the caller already knows it; otherwise
    /// (and again after every netmap change) it is read from `status`.
    pub tailnet: Option<String>,
}

impl Default for WhoisSettings {
    fn default() -> Self {
        let cfg = IdentityConfig::default();
        WhoisSettings::from_config(&cfg)
    }
}

impl WhoisSettings {
    /// `identity.capability`, `role_mappings`, `whois_ttl`, `whois_timeout`; defaults for the rest.
    pub fn from_config(cfg: &IdentityConfig) -> WhoisSettings {
        WhoisSettings {
            capability: cfg.capability.clone(),
            mappings: cfg.role_mappings.clone(),
            ttl: cfg.whois_ttl,
            timeout: cfg.whois_timeout,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_concurrent_loopback: DEFAULT_MAX_CONCURRENT_LOOPBACK,
            loopback_retry_delay: DEFAULT_LOOPBACK_RETRY_DELAY,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            tailnet: None,
        }
    }
}

// --- the mapping (DESIGN.md §3) --------------------------------------------------------------

/// DESIGN.md §3: a WhoIs answer for the caller at `ip` (its tailnet IP) → [`Identity`].
///
/// - Tagged iff `Node.Tags` is non-empty. A tagged node has no login and no display name,
///   whatever `UserProfile` says (`tagged-devices` on SaaS, `<host>@local` on some control
///   servers): the login of a tagged node is never trusted.
/// - An untagged node needs a real login; `tagged-devices` (or an empty login) on an untagged
///   node is refused, and a tagged node needs a node name.
/// - `node` is `Node.Name` without the trailing dot; `node_id` is `Node.StableID`.
/// - `caps` is `CapMap[capability]`: one grant object per matching grant, in order (several
///   grants are merged by concatenation; roles are their union); `null` maps, lists and
///   `null` elements read as nothing.
/// - `groups` is `UserProfile.Groups` for user nodes (tailscaled ≥ 1.98), else `[]`.
/// - `shared`: the node is shared in from another tailnet (`Node.Sharer` set), or it is in our
///   netmap only because this node was shared out to its owner (`Hostinfo.ShareeNode`, what
///   pgproxy labels `external-device`).
pub fn identity_from_whois(
    who: &WhoIs,
    ip: IpAddr,
    tailnet: &str,
    capability: &str,
) -> Result<Identity, String> {
    let node = who.node.name_without_dot().to_owned();
    let tagged = who.node.is_tagged();
    let (login, display_name, groups) = if tagged {
        if node.is_empty() {
            return Err(format!(
                "tailscaled named a tagged node ({}) without a node name",
                who.node.tags.join(",")
            ));
        }
        (String::new(), String::new(), Vec::new())
    } else {
        let login = who.user_profile.login_name.trim();
        if login.is_empty() || login == TAGGED_DEVICES {
            return Err(format!(
                "tailscaled named an untagged node {node:?} with user {login:?}: not a person's \
                 identity"
            ));
        }
        (
            login.to_owned(),
            who.user_profile.display_name.clone(),
            who.user_profile.groups.clone(),
        )
    };
    let caps: Vec<Value> = who
        .caps(capability)
        .iter()
        .filter(|v| !v.is_null())
        .cloned()
        .collect();
    Ok(Identity {
        login,
        display_name,
        node,
        node_id: who.node.stable_id.clone(),
        hostname: who.node.hostinfo.hostname.clone(),
        os: who.node.hostinfo.os.clone(),
        tags: who.node.tags.clone(),
        ip: ip.to_string(),
        tailnet: tailnet.to_owned(),
        groups,
        caps,
        shared: who.node.sharer != 0 || who.node.hostinfo.sharee_node,
    })
}

/// The caller's tailnet IP: the peer address itself, unless it is loopback (userspace mode:
/// tailscaled proxied the connection), then the node's own address (IPv4 first, as
/// tailscaled's `PeerCaps(node.Addresses[0])`).
pub fn caller_ip(who: &WhoIs, peer_ip: IpAddr) -> IpAddr {
    let peer_ip = normalize_ip(peer_ip);
    if !peer_ip.is_loopback() {
        return peer_ip;
    }
    who.node
        .ips()
        .find(IpAddr::is_ipv4)
        .or_else(|| who.node.ips().next())
        .unwrap_or(peer_ip)
}

// --- metrics --------------------------------------------------------------------------------

/// Counters of the resolver (plain atomics; [`WhoisMetrics::snapshot`] for `/metrics`).
#[derive(Debug, Default)]
pub struct WhoisMetrics {
    /// Identity requests (one per connection).
    pub lookups: AtomicU64,
    /// Answered from the cache.
    pub cache_hits: AtomicU64,
    /// Non-loopback lookups that had to ask tailscaled.
    pub cache_misses: AtomicU64,
    /// Loopback lookups (never cached).
    pub loopback_lookups: AtomicU64,
    /// WhoIs calls sent to tailscaled (retries included).
    pub localapi_calls: AtomicU64,
    /// Loopback 404s retried.
    pub loopback_retries: AtomicU64,
    /// `status` calls made to learn the tailnet name.
    pub status_calls: AtomicU64,
    /// Lookups that produced an identity.
    pub identified: AtomicU64,
    /// Lookups that produced none (every reason below).
    pub denied: AtomicU64,
    /// 404: no node has the address.
    pub not_found: AtomicU64,
    /// 403 from tailscaled.
    pub err_access_denied: AtomicU64,
    /// 400 from tailscaled.
    pub err_bad_request: AtomicU64,
    /// Any other HTTP status (412, 500, …).
    pub err_http_status: AtomicU64,
    /// tailscaled unreachable or the connection broke (socket gone, daemon down).
    pub err_transport: AtomicU64,
    /// The LocalAPI call's own timeout.
    pub err_timeout: AtomicU64,
    /// A 200 that does not decode (garbage).
    pub err_decode: AtomicU64,
    /// A decoded answer that names no usable identity.
    pub err_invalid_identity: AtomicU64,
    /// The whole lookup exceeded `timeout` (waiting for a slot included).
    pub deadline_exceeded: AtomicU64,
    /// Cache flushes (netmap changes, bus reconnects, explicit).
    pub cache_flushes: AtomicU64,
    /// WhoIs calls in flight now (gauge).
    pub in_flight: AtomicU64,
    /// Of those, for loopback peers (gauge).
    pub in_flight_loopback: AtomicU64,
    /// The most WhoIs calls ever in flight at once.
    pub max_in_flight: AtomicU64,
}

/// A copy of [`WhoisMetrics`] at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WhoisMetricsSnapshot {
    pub lookups: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub loopback_lookups: u64,
    pub localapi_calls: u64,
    pub loopback_retries: u64,
    pub status_calls: u64,
    pub identified: u64,
    pub denied: u64,
    pub not_found: u64,
    pub err_access_denied: u64,
    pub err_bad_request: u64,
    pub err_http_status: u64,
    pub err_transport: u64,
    pub err_timeout: u64,
    pub err_decode: u64,
    pub err_invalid_identity: u64,
    pub deadline_exceeded: u64,
    pub cache_flushes: u64,
    pub in_flight: u64,
    pub in_flight_loopback: u64,
    pub max_in_flight: u64,
    /// Peer IPs in the cache now.
    pub cache_entries: u64,
}

impl WhoisMetrics {
    /// Every counter, read once (each read is relaxed; the set is not one atomic instant).
    pub fn snapshot(&self) -> WhoisMetricsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WhoisMetricsSnapshot {
            lookups: r(&self.lookups),
            cache_hits: r(&self.cache_hits),
            cache_misses: r(&self.cache_misses),
            loopback_lookups: r(&self.loopback_lookups),
            localapi_calls: r(&self.localapi_calls),
            loopback_retries: r(&self.loopback_retries),
            status_calls: r(&self.status_calls),
            identified: r(&self.identified),
            denied: r(&self.denied),
            not_found: r(&self.not_found),
            err_access_denied: r(&self.err_access_denied),
            err_bad_request: r(&self.err_bad_request),
            err_http_status: r(&self.err_http_status),
            err_transport: r(&self.err_transport),
            err_timeout: r(&self.err_timeout),
            err_decode: r(&self.err_decode),
            err_invalid_identity: r(&self.err_invalid_identity),
            deadline_exceeded: r(&self.deadline_exceeded),
            cache_flushes: r(&self.cache_flushes),
            in_flight: r(&self.in_flight),
            in_flight_loopback: r(&self.in_flight_loopback),
            max_in_flight: r(&self.max_in_flight),
            cache_entries: 0,
        }
    }

    fn counter(&self, e: &LocalApiError) -> &AtomicU64 {
        match e {
            LocalApiError::NotFound { .. } => &self.not_found,
            LocalApiError::AccessDenied { .. } => &self.err_access_denied,
            LocalApiError::BadRequest { .. } => &self.err_bad_request,
            LocalApiError::Precondition { .. } | LocalApiError::Status { .. } => {
                &self.err_http_status
            }
            LocalApiError::Transport { .. } => &self.err_transport,
            LocalApiError::Timeout { .. } => &self.err_timeout,
            LocalApiError::Decode { .. } => &self.err_decode,
        }
    }
}

impl WhoisMetricsSnapshot {
    /// Prometheus text exposition lines (`toolgate_whois_*`), for `/metrics`.
    pub fn prometheus(&self) -> String {
        use crate::metrics::{Exposition, Kind};
        let mut e = Exposition::new();
        let mut put = |name: &str, kind: Kind, help: &str, v: u64| {
            e.single(&format!("toolgate_whois_{name}"), kind, help, v);
        };
        put(
            "lookups_total",
            Kind::Counter,
            "Identity lookups (one per connection).",
            self.lookups,
        );
        put(
            "cache_hits_total",
            Kind::Counter,
            "Lookups answered from the WhoIs cache.",
            self.cache_hits,
        );
        put(
            "cache_misses_total",
            Kind::Counter,
            "Non-loopback lookups that asked tailscaled.",
            self.cache_misses,
        );
        put(
            "loopback_lookups_total",
            Kind::Counter,
            "Loopback lookups (never cached).",
            self.loopback_lookups,
        );
        put(
            "localapi_calls_total",
            Kind::Counter,
            "WhoIs calls sent to tailscaled.",
            self.localapi_calls,
        );
        put(
            "loopback_retries_total",
            Kind::Counter,
            "Loopback 404s retried once.",
            self.loopback_retries,
        );
        put(
            "identified_total",
            Kind::Counter,
            "Lookups that produced an identity.",
            self.identified,
        );
        put(
            "denied_total",
            Kind::Counter,
            "Lookups that produced no identity.",
            self.denied,
        );
        put(
            "cache_flushes_total",
            Kind::Counter,
            "WhoIs cache flushes.",
            self.cache_flushes,
        );
        put(
            "in_flight",
            Kind::Gauge,
            "WhoIs calls in flight.",
            self.in_flight,
        );
        put(
            "in_flight_loopback",
            Kind::Gauge,
            "Loopback WhoIs calls in flight.",
            self.in_flight_loopback,
        );
        put(
            "cache_entries",
            Kind::Gauge,
            "Peer IPs in the WhoIs cache.",
            self.cache_entries,
        );
        e.family(
            "toolgate_whois_errors_total",
            Kind::Counter,
            "Failed lookups by kind.",
        );
        for (kind, v) in [
            ("not_found", self.not_found),
            ("access_denied", self.err_access_denied),
            ("bad_request", self.err_bad_request),
            ("http_status", self.err_http_status),
            ("transport", self.err_transport),
            ("timeout", self.err_timeout),
            ("decode", self.err_decode),
            ("invalid_identity", self.err_invalid_identity),
            ("deadline", self.deadline_exceeded),
        ] {
            e.sample("toolgate_whois_errors_total", &[("kind", kind)], v);
        }
        e.finish()
    }
}

/// Counts one WhoIs call in flight for as long as it lives.
struct InFlight<'a> {
    m: &'a WhoisMetrics,
    loopback: bool,
}

impl<'a> InFlight<'a> {
    fn new(m: &'a WhoisMetrics, loopback: bool) -> Self {
        let now = m.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        m.max_in_flight.fetch_max(now, Ordering::Relaxed);
        if loopback {
            m.in_flight_loopback.fetch_add(1, Ordering::Relaxed);
        }
        InFlight { m, loopback }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.m.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.loopback {
            self.m.in_flight_loopback.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

// --- the resolver ---------------------------------------------------------------------------

struct Cached {
    caller: Arc<Caller>,
    at: Instant,
}

/// The WhoIs-backed [`Identify`] provider for `identity.provider: tailscale`.
pub struct WhoisResolver {
    api: LocalApi,
    settings: WhoisSettings,
    cache: Mutex<HashMap<IpAddr, Cached>>,
    /// Bumped by every flush: an answer fetched across a flush is returned but not cached.
    generation: AtomicU64,
    all: Semaphore,
    loopback: Semaphore,
    tailnet: Mutex<Option<String>>,
    tailnet_fetch: tokio::sync::Mutex<()>,
    metrics: WhoisMetrics,
    last_warn: Mutex<HashMap<&'static str, Instant>>,
    /// Dropped with the resolver: stops the bus watcher.
    _alive: watch::Sender<()>,
    alive_rx: watch::Receiver<()>,
}

impl std::fmt::Debug for WhoisResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhoisResolver")
            .field("api", &self.api)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl WhoisResolver {
    /// A resolver over `api`. Nothing is contacted until the first lookup; call
    /// [`WhoisResolver::spawn_netmap_watch`] to flush the cache on netmap changes.
    pub fn new(api: LocalApi, settings: WhoisSettings) -> Arc<WhoisResolver> {
        let (alive, alive_rx) = watch::channel(());
        let tailnet = settings.tailnet.clone();
        Arc::new(WhoisResolver {
            api,
            all: Semaphore::new(settings.max_concurrent.max(1)),
            loopback: Semaphore::new(
                settings
                    .max_concurrent_loopback
                    .clamp(1, settings.max_concurrent.max(1)),
            ),
            settings,
            cache: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            tailnet: Mutex::new(tailnet),
            tailnet_fetch: tokio::sync::Mutex::new(()),
            metrics: WhoisMetrics::default(),
            last_warn: Mutex::new(HashMap::new()),
            _alive: alive,
            alive_rx,
        })
    }

    /// A resolver for `identity:` (socket, whois_timeout, capability, mappings, TTL), with the
    /// tailnet name when already known.
    pub fn from_config(cfg: &IdentityConfig, tailnet: Option<&str>) -> Arc<WhoisResolver> {
        let mut api = LocalApiConfig::unix(&cfg.socket);
        api.whois_timeout = cfg.whois_timeout;
        let mut settings = WhoisSettings::from_config(cfg);
        settings.tailnet = tailnet.filter(|t| !t.is_empty()).map(str::to_owned);
        WhoisResolver::new(LocalApi::new(api), settings)
    }

    /// The LocalAPI client.
    pub fn api(&self) -> &LocalApi {
        &self.api
    }

    /// The settings.
    pub fn settings(&self) -> &WhoisSettings {
        &self.settings
    }

    /// The counters.
    pub fn metrics(&self) -> &WhoisMetrics {
        &self.metrics
    }

    /// The counters now, with the cache size.
    pub fn snapshot(&self) -> WhoisMetricsSnapshot {
        let mut s = self.metrics.snapshot();
        s.cache_entries = u64::try_from(self.lock_cache().len()).unwrap_or(u64::MAX);
        s
    }

    /// Forgets every cached answer and the tailnet name (a netmap change).
    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.lock_cache().clear();
        *self
            .tailnet
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.metrics.cache_flushes.fetch_add(1, Ordering::Relaxed);
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Cached>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The caller behind the TCP peer `peer`, or why there is none. Bounded by
    /// `settings.timeout`.
    pub async fn resolve(&self, peer: SocketAddr) -> Result<Arc<Caller>, String> {
        self.metrics.lookups.fetch_add(1, Ordering::Relaxed);
        let ip = normalize_ip(peer.ip());
        let peer = SocketAddr::new(ip, peer.port());
        let loopback = ip.is_loopback();
        if loopback {
            self.metrics
                .loopback_lookups
                .fetch_add(1, Ordering::Relaxed);
        } else if let Some(hit) = self.cached(ip) {
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.metrics.identified.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        } else {
            self.metrics.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let timeout = self.settings.timeout;
        let result = match tokio::time::timeout(timeout, self.lookup(peer, loopback)).await {
            Ok(r) => r,
            Err(_) => {
                self.metrics
                    .deadline_exceeded
                    .fetch_add(1, Ordering::Relaxed);
                self.warn(
                    "deadline",
                    &format!(
                        "identity lookup for {peer} did not finish within {} ms",
                        timeout.as_millis()
                    ),
                );
                Err(format!(
                    "identity lookup for {peer} did not finish within {} ms (tailscaled slow, \
                     or too many concurrent lookups)",
                    timeout.as_millis()
                ))
            }
        };
        match result {
            Ok(caller) => {
                self.metrics.identified.fetch_add(1, Ordering::Relaxed);
                if !loopback && self.generation.load(Ordering::SeqCst) == generation {
                    self.insert(ip, caller.clone());
                }
                Ok(caller)
            }
            Err(why) => {
                self.metrics.denied.fetch_add(1, Ordering::Relaxed);
                Err(why)
            }
        }
    }

    /// Like [`WhoisResolver::resolve`], the identity only (for `toolgate whois`).
    pub async fn identity(&self, peer: SocketAddr) -> Result<Identity, String> {
        self.resolve(peer).await.map(|c| c.identity.clone())
    }

    fn cached(&self, ip: IpAddr) -> Option<Arc<Caller>> {
        let mut cache = self.lock_cache();
        let entry = cache.get(&ip)?;
        if entry.at.elapsed() < self.settings.ttl {
            return Some(entry.caller.clone());
        }
        cache.remove(&ip);
        None
    }

    fn insert(&self, ip: IpAddr, caller: Arc<Caller>) {
        if self.settings.ttl.is_zero() || self.settings.cache_capacity == 0 {
            return;
        }
        let ttl = self.settings.ttl;
        let mut cache = self.lock_cache();
        if cache.len() >= self.settings.cache_capacity && !cache.contains_key(&ip) {
            cache.retain(|_, c| c.at.elapsed() < ttl);
            if cache.len() >= self.settings.cache_capacity {
                cache.clear();
            }
        }
        cache.insert(
            ip,
            Cached {
                caller,
                at: Instant::now(),
            },
        );
    }

    /// The uncached path: the WhoIs in a slot (a loopback 404 retried once, in a new slot:
    /// the pause holds none, so a flood of unmapped local connections does not multiply its
    /// cost by the pause), the mapping.
    async fn lookup(&self, peer: SocketAddr, loopback: bool) -> Result<Arc<Caller>, String> {
        let mut answer = self.call_in_slot(peer, loopback).await?;
        if loopback && matches!(&answer, Err(e) if e.is_not_found()) {
            // The proxymap entry may land just after netstack dialed us (tailscale#1616).
            self.metrics
                .loopback_retries
                .fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.settings.loopback_retry_delay).await;
            answer = self.call_in_slot(peer, loopback).await?;
        }
        let who = answer.map_err(|e| self.explain(peer, &e))?;
        let tailnet = self.tailnet_name().await?;
        let ip = caller_ip(&who, peer.ip());
        let identity =
            identity_from_whois(&who, ip, &tailnet, &self.settings.capability).map_err(|e| {
                self.metrics
                    .err_invalid_identity
                    .fetch_add(1, Ordering::Relaxed);
                self.warn("invalid_identity", &e);
                format!("no identity for {peer}: {e}")
            })?;
        let principal = identity.principal(&self.settings.mappings);
        Ok(Arc::new(Caller::new(identity, principal)))
    }

    /// One WhoIs holding a concurrency slot (and a loopback slot for loopback peers).
    async fn call_in_slot(
        &self,
        peer: SocketAddr,
        loopback: bool,
    ) -> Result<Result<WhoIs, LocalApiError>, String> {
        let _loopback_permit = if loopback {
            Some(
                self.loopback
                    .acquire()
                    .await
                    .map_err(|_| "identity lookups are shut down".to_owned())?,
            )
        } else {
            None
        };
        let _permit = self
            .all
            .acquire()
            .await
            .map_err(|_| "identity lookups are shut down".to_owned())?;
        Ok(self.call(peer, loopback).await)
    }

    async fn call(&self, peer: SocketAddr, loopback: bool) -> Result<WhoIs, LocalApiError> {
        let _in_flight = InFlight::new(&self.metrics, loopback);
        self.metrics.localapi_calls.fetch_add(1, Ordering::Relaxed);
        let r = self.api.whois(peer).await;
        if let Err(e) = &r {
            self.metrics.counter(e).fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// The deny reason for a failed WhoIs (and the log line for infrastructure failures).
    fn explain(&self, peer: SocketAddr, e: &LocalApiError) -> String {
        let why = match e {
            LocalApiError::NotFound { body, .. } if peer.ip().is_loopback() => {
                return format!(
                    "no tailnet identity for loopback peer {peer}: tailscaled maps no tailnet \
                     connection to it (a local process, not a peer proxied by tailscaled); \
                     tailscaled said {body:?} twice"
                );
            }
            LocalApiError::NotFound { body, .. } => {
                return format!(
                    "no tailnet node has address {peer} (tailscaled said {body:?}); peers \
                     behind a subnet router or outside the tailnet have no identity"
                );
            }
            LocalApiError::AccessDenied { body, .. } => format!(
                "tailscaled refused the WhoIs (403 {body:?}): this process may not read the \
                 LocalAPI at {}",
                self.api.config().transport
            ),
            LocalApiError::Transport { detail, .. } => {
                format!("tailscaled is unreachable ({detail})")
            }
            LocalApiError::Timeout { timeout, .. } => format!(
                "tailscaled did not answer the WhoIs within {} ms",
                timeout.as_millis()
            ),
            LocalApiError::Decode { detail, .. } if detail.contains("body exceeds") => format!(
                "tailscaled's WhoIs answer is too large ({detail}; the cap is \
                 localapi max_whois_body_bytes), refused unread"
            ),
            LocalApiError::Decode { detail, .. } => {
                format!("tailscaled's WhoIs answer does not decode ({detail})")
            }
            other => format!("tailscaled's WhoIs failed ({other})"),
        };
        let kind = match e {
            LocalApiError::AccessDenied { .. } => "access_denied",
            LocalApiError::Transport { .. } => "transport",
            LocalApiError::Timeout { .. } => "timeout",
            LocalApiError::Decode { .. } => "decode",
            _ => "http_status",
        };
        self.warn(kind, &why);
        format!("no identity for {peer}: {why}")
    }

    /// `CurrentTailnet.Name`, read once per netmap (single-flight).
    async fn tailnet_name(&self) -> Result<String, String> {
        if let Some(t) = self.known_tailnet() {
            return Ok(t);
        }
        let _guard = self.tailnet_fetch.lock().await;
        if let Some(t) = self.known_tailnet() {
            return Ok(t);
        }
        self.metrics.status_calls.fetch_add(1, Ordering::Relaxed);
        let status = self.api.status().await.map_err(|e| {
            self.metrics.counter(&e).fetch_add(1, Ordering::Relaxed);
            let why = format!("cannot read the tailnet name from tailscaled: {e}");
            self.warn("status", &why);
            why
        })?;
        let name = status
            .tailnet_name()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                format!(
                    "tailscaled reports no current tailnet (backend state {})",
                    status.backend_state
                )
            })?
            .to_owned();
        *self
            .tailnet
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(name.clone());
        Ok(name)
    }

    fn known_tailnet(&self) -> Option<String> {
        self.tailnet
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A warning, at most once per `WARN_EVERY` for each kind (debug otherwise).
    fn warn(&self, kind: &'static str, msg: &str) {
        let now = Instant::now();
        let loud = {
            let mut last = self
                .last_warn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match last.get(kind) {
                Some(t) if now.duration_since(*t) < WARN_EVERY => false,
                _ => {
                    last.insert(kind, now);
                    true
                }
            }
        };
        if loud {
            tracing::warn!(kind, "identity: {msg}");
        } else {
            tracing::debug!(kind, "identity: {msg}");
        }
    }

    /// Follows the IPN bus and flushes the cache on every new netmap or state change, and
    /// whenever the subscription (re)starts (changes may have been missed meanwhile).
    /// Re-subscribes with backoff while tailscaled is away. The task ends when the resolver
    /// is dropped.
    pub fn spawn_netmap_watch(self: &Arc<Self>) -> JoinHandle<()> {
        let weak: Weak<WhoisResolver> = Arc::downgrade(self);
        let mut alive = self.alive_rx.clone();
        tokio::spawn(async move {
            let mut backoff = BUS_BACKOFF_MIN;
            loop {
                let Some(me) = weak.upgrade() else { return };
                let api = me.api.clone();
                drop(me);
                let opened = tokio::select! {
                    r = api.watch_ipn_bus(WatchMask::NETMAP_WATCH) => r,
                    _ = alive.changed() => return,
                };
                match opened {
                    Ok(mut bus) => {
                        let Some(me) = weak.upgrade() else { return };
                        me.flush();
                        tracing::debug!("identity: watching the IPN bus for netmap changes");
                        drop(me);
                        loop {
                            let item = tokio::select! {
                                item = bus.next() => item,
                                _ = alive.changed() => return,
                            };
                            let Some(me) = weak.upgrade() else { return };
                            match item {
                                Some(Ok(n)) => {
                                    backoff = BUS_BACKOFF_MIN;
                                    if n.net_map || n.state.is_some() || n.login_finished {
                                        me.flush();
                                    }
                                }
                                Some(Err(LocalApiError::Decode { detail, .. })) => {
                                    tracing::debug!("identity: skipped a bus line: {detail}");
                                }
                                Some(Err(e)) => {
                                    me.flush();
                                    me.warn("bus", &format!("IPN bus broke: {e}"));
                                    break;
                                }
                                None => {
                                    me.flush();
                                    tracing::debug!("identity: the IPN bus stream ended");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        if let Some(me) = weak.upgrade() {
                            me.warn("bus", &format!("cannot watch the IPN bus (retrying): {e}"));
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = alive.changed() => return,
                }
                backoff = (backoff * 2).min(BUS_BACKOFF_MAX);
            }
        })
    }
}

impl Identify for WhoisResolver {
    fn identify(
        &self,
        peer: SocketAddr,
    ) -> futures_util::future::BoxFuture<'_, Result<Caller, String>> {
        Box::pin(async move { self.resolve(peer).await.map(|c| Caller::clone(&c)) })
    }

    /// Bumped by every flush (a new netmap, a state change, the bus reconnecting).
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn who(v: Value) -> WhoIs {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn loopback_caller_ip_is_the_nodes_address() {
        let w = who(json!({
            "Node": {"Name": "a.example.ts.net.", "Addresses": ["fd7a:115c:a1e0::5/128", "100.64.0.5/32"]},
            "UserProfile": {"LoginName": "a@example.com"}
        }));
        assert_eq!(
            caller_ip(&w, "127.0.0.1".parse().unwrap()),
            "100.64.0.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            caller_ip(&w, "::ffff:100.64.0.9".parse().unwrap()),
            "100.64.0.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn prometheus_lines() {
        let s = WhoisMetricsSnapshot {
            cache_hits: 3,
            err_transport: 2,
            ..Default::default()
        };
        let text = s.prometheus();
        assert!(
            text.contains("toolgate_whois_cache_hits_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("toolgate_whois_errors_total{kind=\"transport\"} 2\n"),
            "{text}"
        );
    }
}
