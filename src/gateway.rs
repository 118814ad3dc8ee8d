//! The gateway's shared state and its one decision step.
//!
//! Every route goes through [`Gateway::decide`]: principal × resource × actions against the
//! current policy snapshot, then an audit row. Routes differ only in how they build the check
//! and how they answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::audit::record::RenderedExplain;
use crate::audit::record::ReplayInputs;
pub use crate::caller::{Caller, Conn};
use crate::config::Config;
pub use crate::mcp::transport::Upstream;
use crate::policy::eval::{self, CheckOutput};
use crate::policy::input::{Params, Principal, Resource};
use crate::policy::model::Effect;
use crate::policy::store::Store;

/// The decision for a set of actions, with what the audit row needs.
#[derive(Debug, Clone)]
pub struct Decision {
    pub output: CheckOutput,
    pub policy_hash: String,
    pub elapsed: Duration,
    /// The principal and resource decided on (the resource's `arguments` and `uri` as null
    /// placeholders: the row stores them only as `audit.arguments` allows), for the shadow
    /// policy set to decide again; `None` when no shadow set is configured (no copy per call).
    pub input: Option<Arc<(Principal, Resource)>>,
    /// The same principal and resource as the canonical JSON the row stores: its replay
    /// inputs (written directly, the principal's once per distinct principal).
    pub replay: Arc<ReplayInputs>,
}

impl Decision {
    pub fn effect(&self, action: &str) -> Effect {
        self.output.effect(action).unwrap_or(Effect::Deny)
    }

    pub fn result(&self, action: &str) -> Option<&eval::ActionResult> {
        self.output.actions.iter().find(|a| a.action == action)
    }
}

/// A session of the handshake era, bound to the principal that opened it.
#[derive(Debug, Clone)]
pub struct Session {
    pub principal: String,
    pub server: String,
    pub last_seen: Instant,
}

/// The answer of [`Sessions::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    /// Opened by this principal on this server.
    Own,
    /// Not a session this gateway knows (never opened through it, or ended).
    Unknown,
    /// Someone else's session: refused.
    Foreign,
}

/// Bounded session table.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

pub const MAX_SESSIONS: usize = 100_000;
pub const SESSION_IDLE: Duration = Duration::from_secs(24 * 3600);

impl Sessions {
    pub fn bind(&self, id: &str, principal: &str, server: &str) {
        let Ok(mut m) = self.map.lock() else { return };
        let session = Session {
            principal: principal.to_string(),
            server: server.to_string(),
            last_seen: Instant::now(),
        };
        insert_bounded(&mut m, MAX_SESSIONS, id.to_string(), session, |s| {
            s.last_seen.elapsed() < SESSION_IDLE
        });
    }

    /// Whose session `id` is, as seen by `principal` on `server`.
    pub fn check(&self, id: &str, principal: &str, server: &str) -> SessionCheck {
        let Ok(mut m) = self.map.lock() else {
            return SessionCheck::Foreign;
        };
        match m.get_mut(id) {
            None => SessionCheck::Unknown,
            Some(s) if s.principal == principal && s.server == server => {
                s.last_seen = Instant::now();
                SessionCheck::Own
            }
            Some(_) => SessionCheck::Foreign,
        }
    }

    pub fn end(&self, id: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(id);
        }
    }
}

/// Inserts into a table of at most `max` entries: when full, first drops the entries `live`
/// rejects; if it is still full, the new entry is not kept (callers then fail closed).
fn insert_bounded<K: std::hash::Hash + Eq, V>(
    m: &mut HashMap<K, V>,
    max: usize,
    key: K,
    value: V,
    live: impl Fn(&V) -> bool,
) {
    if m.len() >= max {
        m.retain(|_, v| live(v));
    }
    if m.len() < max {
        m.insert(key, value);
    }
}

/// Requests a server sent to a caller on its stream (sampling, elicitation, roots) that
/// policy let through, by (principal, server, canonical JSON-RPC id). A caller may answer only
/// those: a response to anything else (a request policy withheld, one never sent, one answered
/// already) is refused, so a client cannot feed the server answers it was never asked for.
#[derive(Debug, Default)]
pub struct ServerRequests {
    map: Mutex<HashMap<(String, String, String), Instant>>,
}

/// Bound on outstanding server→client requests across all callers.
pub const MAX_SERVER_REQUESTS: usize = 10_000;
/// An unanswered server→client request is forgotten after this long.
pub const SERVER_REQUEST_TTL: Duration = Duration::from_secs(15 * 60);

impl ServerRequests {
    /// Remembers that `principal` was sent request `id` by `server`. When the table is full
    /// (after dropping expired entries) the request is not remembered, so its answer will be
    /// refused: fail closed.
    pub fn expect(&self, principal: &str, server: &str, id: &str) {
        let Ok(mut m) = self.map.lock() else { return };
        let key = (principal.to_string(), server.to_string(), id.to_string());
        insert_bounded(&mut m, MAX_SERVER_REQUESTS, key, Instant::now(), |at| {
            at.elapsed() < SERVER_REQUEST_TTL
        });
    }

    /// Takes request `id` off the table; `false` if `principal` has no such request from
    /// `server` outstanding.
    pub fn answer(&self, principal: &str, server: &str, id: &str) -> bool {
        let Ok(mut m) = self.map.lock() else {
            return false;
        };
        let key = (principal.to_string(), server.to_string(), id.to_string());
        match m.remove(&key) {
            Some(at) => at.elapsed() < SERVER_REQUEST_TTL,
            None => false,
        }
    }
}

/// Requests in flight on each session, by (server, session id, canonical JSON-RPC id). A
/// second request with the id of one still in flight on the same session is refused: the
/// upstream could not tell their answers apart, and one caller's stream could carry the
/// other's answer.
#[derive(Debug, Default)]
pub struct InFlight {
    set: Mutex<std::collections::HashSet<(String, String, String)>>,
}

/// Bound on requests in flight across all sessions.
pub const MAX_IN_FLIGHT: usize = 100_000;

impl InFlight {
    /// Registers `key`; `false` if it is in flight already or the table is full (fail closed).
    pub fn begin(&self, key: &(String, String, String)) -> bool {
        let Ok(mut s) = self.set.lock() else {
            return false;
        };
        if s.len() >= MAX_IN_FLIGHT {
            return false;
        }
        s.insert(key.clone())
    }

    /// The request's answer has been delivered (or never will be).
    pub fn end(&self, key: &(String, String, String)) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(key);
        }
    }
}

/// The shared state of a running gateway.
pub struct Gateway {
    pub config: Config,
    pub store: Arc<Store>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub http: crate::mcp::transport::Client,
    pub sessions: Sessions,
    /// Server→client requests delivered to callers and not answered yet.
    pub server_requests: ServerRequests,
    /// Client requests in flight per session (duplicate ids are refused).
    pub in_flight: InFlight,
    /// Tool annotations seen in `tools/list`, for `R.attr.annotations` at call time.
    pub annotations: Mutex<HashMap<(String, String), Value>>,
    /// `Host` values this node answers to (invariant I7); empty means any (loopback dev only).
    pub allowed_hosts: Vec<String>,
    pub audit: Arc<dyn AuditSink>,
    pub metrics: crate::metrics::Metrics,
    /// tailscaled's LocalAPI, when identities come from it (for `/readyz`).
    pub localapi: Option<crate::tailnet::localapi::LocalApi>,
    /// The WhoIs resolver, for its metrics.
    pub whois: std::sync::OnceLock<Arc<crate::tailnet::whois::WhoisResolver>>,
    /// Open server→client streams to tell about tool-list changes.
    pub list_watchers: Mutex<Vec<ListWatcher>>,
    /// Sessions of the aggregated endpoint `/mcp`.
    pub aggregate: crate::mcp::sessions::Sessions,
    /// Tool names seen in each server's `tools/list`.
    pub known_tools: Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    /// Bytes of client messages in flight, daemon-wide (`limits.in_flight_bytes`).
    pub budget: Arc<crate::budget::Budget>,
    /// The shadow policy set (`policies.shadow`), when configured.
    pub shadow: Option<Arc<crate::shadow::Shadow>>,
}

/// An open stream whose caller is told when policy changes the tools it can see.
#[derive(Debug)]
pub struct ListWatcher {
    pub principal: Principal,
    pub server: String,
    pub visible: Vec<String>,
    pub tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
}

/// Bound on watchers (each is one open client stream).
pub const MAX_LIST_WATCHERS: usize = 10_000;

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("upstreams", &self.upstreams.keys())
            .finish()
    }
}

impl Gateway {
    pub fn params(&self) -> Params {
        // Spelled out rather than `..Params::default()`, which reads the clock and allocates
        // globals only to drop them: this runs on every call.
        Params {
            now: chrono::Utc::now(),
            globals: self.config.policies.globals.clone(),
            evaluation: self.config.policies.evaluation,
            schema_enforcement: self.config.policies.schema_enforcement,
            default_policy_version: "default".to_string(),
            default_scope: String::new(),
            lenient_scope_search: false,
        }
    }

    /// Evaluates `actions` for `principal` on `resource` against the current snapshot.
    pub fn decide(
        &self,
        principal: &Principal,
        resource: Resource,
        actions: Vec<String>,
    ) -> Decision {
        self.decide_lent(principal, resource, actions).0
    }

    /// [`Gateway::decide`], handing the resource back: a call's arguments are lent to the
    /// check (`R.attr.arguments`) and then forwarded, never copied (invariant I5).
    pub fn decide_lent(
        &self,
        principal: &Principal,
        resource: Resource,
        actions: Vec<String>,
    ) -> (Decision, Resource) {
        self.evaluate(principal, principal_input(principal), resource, actions)
    }

    /// [`Gateway::decide_lent`] for a connection's caller, whose replay input is rendered once
    /// for the connection rather than looked up and compared on every call.
    pub fn decide_caller(
        &self,
        caller: &Caller,
        resource: Resource,
        actions: Vec<String>,
    ) -> (Decision, Resource) {
        let input = caller
            .replay
            .get_or_init(|| principal_input(&caller.principal).into());
        self.evaluate(&caller.principal, input.to_string(), resource, actions)
    }

    fn evaluate(
        &self,
        principal: &Principal,
        principal_input: String,
        resource: Resource,
        actions: Vec<String>,
    ) -> (Decision, Resource) {
        let started = Instant::now();
        let set = self.store.current();
        // The caller's principal is shared, not copied into the check.
        let input = eval::CheckRef {
            principal,
            resource: &resource,
            actions: &actions,
            aux_data: &Value::Null,
        };
        let output = eval::check_ref(&set, input, &self.params());
        let elapsed = started.elapsed();
        self.metrics.decision_latency.observe(elapsed);
        let decision = Decision {
            output,
            policy_hash: set.hash.clone(),
            elapsed,
            input: self
                .shadow
                .is_some()
                .then(|| Arc::new((principal.clone(), recorded(&resource)))),
            replay: Arc::new(ReplayInputs {
                principal: principal_input,
                resource: resource_input(&resource),
            }),
        };
        (decision, resource)
    }

    /// Hands a decision row to the audit store, counting it; `Err` means answer 503.
    pub fn submit(&self, row: AuditRow) -> Result<Commit, AuditUnavailable> {
        let effect = match row.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        };
        // A resource URI may carry a secret (`?api_key=…`) and has no bound: the series is
        // the method's, never the URI's.
        let tool = if row.tool.is_empty() || row.uri.is_some() {
            &row.method
        } else {
            &row.tool
        };
        self.metrics.decision(effect, &row.server, tool);
        if row.kind == "identity" {
            self.metrics
                .unidentified
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let shadow = self
            .shadow
            .as_ref()
            .and_then(|s| self.shadow_job(&row).map(|j| (s, j)));
        let commit = self.audit.submit(row).inspect_err(|_| {
            self.metrics
                .audit_refusals
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })?;
        // Only a decision that was taken is shadowed: its shadow row follows it in the chain.
        if let Some((s, job)) = shadow {
            s.offer(job);
        }
        Ok(commit)
    }

    /// The shadow job of a decision row (`None` for rows that are not one policy decision).
    /// Its report writes the difference as a row of kind `shadow` linked to the decision.
    fn shadow_job(&self, row: &AuditRow) -> Option<crate::shadow::Job> {
        use crate::shadow::{Differs, Job, Verdict};
        let input = row.input.clone()?;
        let mut shadow_row = AuditRow {
            id: crate::audit::record::new_id(),
            kind: "shadow",
            caller: row.caller.clone(),
            principal: row.principal.clone(),
            ip: row.ip.clone(),
            server: row.server.clone(),
            method: row.method.clone(),
            tool: row.tool.clone(),
            action: row.action.clone(),
            effect: Effect::Deny,
            policy: String::new(),
            rule: String::new(),
            reason: String::new(),
            arguments: row.arguments.clone(),
            uri: row.uri.clone(),
            outcome: String::new(),
            latency_us: 0,
            policy_hash: String::new(),
            explain: None,
            explain_rendered: None,
            input: None,
            replay: None,
            shadows: Some(row.id.clone()),
        };
        let live = Verdict {
            effect: row.effect,
            policy: row.policy.clone(),
            rule: row.rule.clone(),
        };
        let side = crate::audit::shadow::Side {
            effect: effect_text(row.effect).to_string(),
            policy: row.policy.clone(),
            rule: row.rule.clone(),
        };
        let audit = self.audit.clone();
        let report = move |d: Differs| {
            shadow_row.effect = d.verdict.effect;
            shadow_row.policy = d.verdict.policy;
            shadow_row.rule = d.verdict.rule;
            shadow_row.reason = d.reason;
            shadow_row.policy_hash = d.policy_hash;
            shadow_row.explain = Some(crate::audit::shadow::explain(&side, d.trace));
            audit.submit(shadow_row).is_ok()
        };
        Some(Job {
            input,
            arguments: row.arguments.clone(),
            uri: row.uri.clone(),
            action: row.action.clone(),
            now: chrono::Utc::now(),
            live,
            report: Box::new(report),
        })
    }

    /// Records how an allowed call ended.
    pub fn outcome(&self, id: &str, outcome: &str, latency: Duration) {
        if outcome == "upstream_error" {
            self.metrics
                .upstream_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.metrics.upstream_latency.observe(latency);
        }
        self.audit.outcome(
            id,
            outcome,
            latency.as_micros().min(u64::MAX as u128) as u64,
        );
    }

    /// Every metric, as Prometheus text.
    pub fn prometheus(&self) -> String {
        let mut s = self.metrics.render();
        s.push_str(&self.budget.prometheus());
        s.push_str(&self.audit.prometheus());
        if let Some(sh) = &self.shadow {
            s.push_str(&sh.prometheus());
        }
        if let Some(w) = self.whois.get() {
            s.push_str(&w.snapshot().prometheus());
        }
        s
    }

    pub fn set_whois(&self, w: Arc<crate::tailnet::whois::WhoisResolver>) {
        let _ = self.whois.set(w);
    }

    pub fn annotations_for(&self, server: &str, tool: &str) -> Option<Value> {
        self.annotations
            .lock()
            .ok()
            .and_then(|m| m.get(&(server.to_string(), tool.to_string())).cloned())
    }

    /// Remembers a server's tools: their names (for list-change notices) and annotations.
    pub fn remember_tools(&self, server: &str, tools: &[Value]) {
        if let Ok(mut k) = self.known_tools.lock() {
            let set = k.entry(server.to_string()).or_default();
            for t in tools
                .iter()
                .filter_map(|t| t.get("name").and_then(Value::as_str))
            {
                if set.len() < 10_000 {
                    set.insert(t.to_string());
                }
            }
        }
        self.remember_annotations(server, tools);
    }

    /// The known tools of `server` that `principal` may see (`tools/list::T`), now.
    pub fn visible_tools(&self, principal: &Principal, server: &str) -> Vec<String> {
        let known: Vec<String> = self
            .known_tools
            .lock()
            .map(|k| {
                k.get(server)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let Some(up) = self.upstreams.get(server) else {
            return Vec::new();
        };
        known
            .into_iter()
            .filter(|t| {
                let action = format!("tools/list::{t}");
                let check = crate::mcp::mapping::Check {
                    action: action.clone(),
                    name: Some(t.clone()),
                    takes_arguments: false,
                };
                let annotations = self.annotations_for(server, t);
                let resource = crate::mcp::mapping::resource(
                    &up.target,
                    "tools/list",
                    &check,
                    annotations.as_ref(),
                );
                self.decide(principal, resource, vec![action.clone()])
                    .effect(&action)
                    == Effect::Allow
            })
            .collect()
    }

    /// Registers an open stream; returns the receiver of events to merge into it.
    pub fn watch_tool_list(
        &self,
        principal: &Principal,
        server: &str,
    ) -> tokio::sync::mpsc::Receiver<bytes::Bytes> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let visible = self.visible_tools(principal, server);
        if let Ok(mut w) = self.list_watchers.lock() {
            w.retain(|x| !x.tx.is_closed());
            if w.len() < MAX_LIST_WATCHERS {
                w.push(ListWatcher {
                    principal: principal.clone(),
                    server: server.to_string(),
                    visible,
                    tx,
                });
            }
        }
        rx
    }

    /// After a policy reload: tells every open stream whose visible tools changed.
    /// Returns how many were told.
    pub fn policies_changed(&self) -> usize {
        let mut watchers = match self.list_watchers.lock() {
            Ok(mut w) => {
                w.retain(|x| !x.tx.is_closed());
                std::mem::take(&mut *w)
            }
            Err(_) => return 0,
        };
        let mut told = 0;
        for w in watchers.iter_mut() {
            let now = self.visible_tools(&w.principal, &w.server);
            if now != w.visible {
                let event = crate::mcp::sse::Event {
                    event: Some("message".into()),
                    data: r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#.into(),
                    ..Default::default()
                };
                if w.tx.try_send(event.to_bytes()).is_ok() {
                    told += 1;
                }
                w.visible = now;
            }
        }
        if let Ok(mut w) = self.list_watchers.lock() {
            watchers.append(&mut w);
            *w = watchers;
        }
        told
    }

    pub fn remember_annotations(&self, server: &str, tools: &[Value]) {
        let Ok(mut m) = self.annotations.lock() else {
            return;
        };
        for t in tools {
            if let (Some(name), Some(a)) =
                (t.get("name").and_then(Value::as_str), t.get("annotations"))
            {
                if m.len() < 100_000 {
                    m.insert((server.to_string(), name.to_string()), a.clone());
                }
            }
        }
    }
}

fn effect_text(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    }
}

/// A compact JSON view of a principal for logs and the audit row.
pub fn principal_json(p: &Principal) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), Value::String(p.id.clone()));
    m.insert("roles".into(), Value::from(p.roles.clone()));
    Value::Object(m)
}

/// One audit row as the gateway builds it (DESIGN.md §5 keys); the audit module stores it.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: String,
    /// `mcp`, `check`, `hook`, `identity` or `shadow`.
    pub kind: &'static str,
    pub caller: Option<Arc<Caller>>,
    /// The principal the decision was made for, when the caller asserted one (check API);
    /// `None`: the caller's own principal.
    pub principal: Option<String>,
    pub ip: String,
    pub server: String,
    pub method: String,
    pub tool: String,
    pub action: String,
    pub effect: Effect,
    pub policy: String,
    pub rule: String,
    pub reason: String,
    /// The call's arguments (tools, prompts; a completion's `ref`, `argument` and `context`),
    /// shared with the message that is forwarded; the audit store digests or redacts them per
    /// `audit.arguments`.
    pub arguments: Option<Arc<Value>>,
    /// The resource URI a message names (`resources/read`), which `tool` and `action` carry:
    /// the stored row holds it only as `audit.arguments` allows (a query string may hold a
    /// key), and `args_digest` covers it. Policy saw it whole.
    pub uri: Option<String>,
    pub outcome: String,
    pub latency_us: u64,
    pub policy_hash: String,
    /// The explain trace of the decision.
    pub explain: Option<Value>,
    /// The explain trace of the decision, rendered once per distinct trace (used when
    /// `explain` is `None`).
    pub explain_rendered: Option<Arc<RenderedExplain>>,
    /// The principal and resource of the decision (see [`Decision::input`]); `None` for rows
    /// that are not one policy decision.
    pub input: Option<Arc<(Principal, Resource)>>,
    /// The replay inputs of the decision (see [`Decision::replay`]).
    pub replay: Option<Arc<ReplayInputs>>,
    /// A `shadow` row's decision: the id of the decision it shadows.
    pub shadows: Option<String>,
}

impl AuditRow {
    pub fn new(kind: &'static str, conn: &Conn) -> AuditRow {
        AuditRow {
            id: crate::audit::record::new_id(),
            kind,
            caller: conn.caller.clone(),
            principal: None,
            ip: match &conn.caller {
                Some(c) if !c.identity.ip.is_empty() => c.identity.ip.clone(),
                _ => crate::identity::normalize_ip(conn.peer.ip()).to_string(),
            },
            server: String::new(),
            method: String::new(),
            tool: String::new(),
            action: String::new(),
            effect: Effect::Deny,
            policy: String::new(),
            rule: String::new(),
            reason: String::new(),
            arguments: None,
            uri: None,
            outcome: String::new(),
            latency_us: 0,
            policy_hash: String::new(),
            explain: None,
            explain_rendered: None,
            input: None,
            replay: None,
            shadows: None,
        }
    }

    /// Fills the decision fields for `action` from `d`.
    pub fn decided(mut self, d: &Decision, action: &str) -> AuditRow {
        self.set_decision(d, action);
        self
    }

    /// Fills the decision fields for `action` from `d`, in place.
    pub fn set_decision(&mut self, d: &Decision, action: &str) {
        self.action = action.to_string();
        self.policy_hash = d.policy_hash.clone();
        if let Some(r) = d.result(action) {
            self.effect = r.effect;
            self.policy = r.policy.clone();
            self.rule = r.rule.clone();
            self.reason = r.reason.clone();
        }
        self.explain_rendered = rendered_explain(&d.output.trace);
        self.explain = match self.explain_rendered {
            Some(_) => None,
            None => serde_json::to_value(&d.output.trace).ok(),
        };
        self.input = d.input.clone();
        self.replay = Some(d.replay.clone());
    }
}

/// The audit store could not take a row: the call is refused (503), never run unaudited.
#[derive(Debug, Clone, thiserror::Error)]
#[error("audit unavailable: {0}")]
pub struct AuditUnavailable(pub String);

/// Resolves when an audit row is committed (sync mode) or queued (async mode).
pub type Commit =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), AuditUnavailable>> + Send>>;

/// Where decisions go. The SQLite writer implements it; tests may inject faults.
pub trait AuditSink: Send + Sync + 'static {
    /// Queues a row without blocking. A full or failed store answers `Err` at once.
    fn submit(&self, row: AuditRow) -> Result<Commit, AuditUnavailable>;
    /// Records how an allowed call ended (`forwarded`, `upstream_error`, …).
    fn outcome(&self, id: &str, outcome: &str, latency_us: u64);
    /// The store's own metrics, as Prometheus text.
    fn prometheus(&self) -> String {
        String::new()
    }
    /// `Err(why)` while the store cannot write.
    fn writable(&self) -> Result<(), String> {
        Ok(())
    }
    /// The chain head after each commit, for readers that wait for new rows (the dashboard's
    /// stream); `None` when the sink has no such signal (they poll).
    fn committed(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        None
    }
    /// The queue is full right now: a row submitted now would be refused. Lets an overloaded
    /// gateway answer 503 before spending a policy decision and a row on a call it cannot run.
    fn saturated(&self) -> bool {
        false
    }
}

/// The upstream HTTP client: no redirects (upstream URLs are fixed by config), rustls on ring.
pub fn http_client() -> Result<reqwest::Client, String> {
    http_client_via(None)
}

/// Sends requests for tailnet hosts (see [`is_tailnet_host`]) through tailscaled's SOCKS5
/// listener: a userspace-networking (sidecar) node has no route to 100.64.0.0/10, and
/// `socks5h` lets tailscaled resolve MagicDNS names itself.
#[derive(Debug, Clone)]
pub struct TailnetProxy {
    /// tailscaled's `--socks5-server` (loopback).
    pub socks5: std::net::SocketAddr,
    /// The tailnet's MagicDNS suffix (`tail1234.ts.net`), when known; `*.ts.net` always matches.
    pub magic_dns_suffix: Option<String>,
}

/// Is `host` (a URL host: name, IPv4, or IPv6 without brackets) on the tailnet: a MagicDNS
/// name under `*.ts.net` or `suffix`, or an address in 100.64.0.0/10 or fd7a:115c:a1e0::/48?
pub fn is_tailnet_host(host: &str, suffix: Option<&str>) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return crate::config::is_tailnet_ip(ip);
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let under = |s: &str| {
        let s = s.trim_matches('.').to_ascii_lowercase();
        !s.is_empty()
            && host.len() > s.len()
            && host.ends_with(&s)
            && host[..host.len() - s.len()].ends_with('.')
    };
    under("ts.net") || suffix.is_some_and(under)
}

/// The upstream client of a gateway ([`crate::mcp::transport::Client`]): plain `http://`
/// calls on hyper's pool, the rest on [`http_client_via`]`(proxy)`.
pub fn upstream_client_via(
    proxy: Option<TailnetProxy>,
) -> Result<crate::mcp::transport::Client, String> {
    use crate::mcp::transport::Proxied;
    let proxied = proxy.as_ref().map(|p| {
        let suffix = p.magic_dns_suffix.clone();
        Arc::new(move |host: &str| is_tailnet_host(host, suffix.as_deref())) as Proxied
    });
    Ok(crate::mcp::transport::Client::new(
        http_client_via(proxy)?,
        proxied,
    ))
}

/// [`upstream_client_via`] without a tailnet proxy.
pub fn upstream_client() -> Result<crate::mcp::transport::Client, String> {
    upstream_client_via(None)
}

/// [`http_client`], with tailnet hosts dialed through `proxy` when given.
pub fn http_client_via(proxy: Option<TailnetProxy>) -> Result<reqwest::Client, String> {
    // Installing twice is harmless: the second call reports the first provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder();
    if let Some(p) = proxy {
        let via = format!("socks5h://{}", p.socks5);
        let target: reqwest::Url = via
            .parse()
            .map_err(|e| format!("tailnet SOCKS5 proxy {via}: {e}"))?;
        b = b.proxy(reqwest::Proxy::custom(move |url| {
            url.host_str()
                .filter(|h| is_tailnet_host(h, p.magic_dns_suffix.as_deref()))
                .map(|_| target.clone())
        }));
    }
    b.redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("cannot build the upstream HTTP client: {e}"))
}

impl AuditRow {
    /// The stored form: identity fields from the caller, arguments per `audit.arguments`.
    pub fn into_record(self, redactor: &crate::audit::Redactor) -> crate::audit::Record {
        use crate::audit::{Kind, Record};
        let kind = match self.kind {
            "check" => Kind::Check,
            "hook" => Kind::Hook,
            "identity" => Kind::Identity,
            "shadow" => Kind::Shadow,
            _ => Kind::Mcp,
        };
        let effect = match self.effect {
            Effect::Allow => crate::audit::Effect::Allow,
            Effect::Deny => crate::audit::Effect::Deny,
        };
        let mut rec = Record::with_id(self.id, kind, effect);
        if let Some(c) = &self.caller {
            rec.principal = c.principal.id.clone();
            rec.login = c.identity.login.clone();
            rec.node = c.identity.node.clone();
            rec.node_id = c.identity.node_id.clone();
            rec.tags = c.identity.tags.clone();
        }
        if let Some(p) = self.principal {
            rec.principal = p;
        }
        rec.ip = self.ip;
        rec.server = self.server;
        rec.method = self.method;
        rec.tool = self.tool;
        rec.action = self.action;
        rec.policy = self.policy;
        rec.rule = self.rule;
        rec.reason = self.reason;
        rec.outcome = self.outcome;
        rec.latency_us = (self.latency_us > 0).then_some(self.latency_us);
        rec.policy_hash = self.policy_hash;
        match self.explain {
            Some(v) => rec.explain = v,
            None => rec.explain_rendered = self.explain_rendered,
        }
        rec.inputs = self.replay.as_deref().cloned();
        rec.decision_id = self.shadows.unwrap_or_default();
        if let Some(uri) = &self.uri {
            redactor.apply_uri(&mut rec, uri);
        } else if let Some(args) = &self.arguments {
            redactor.apply_arguments(&mut rec, args);
            if rec.method == "completion/complete" {
                redactor.apply_completion(&mut rec, args);
            }
        }
        rec
    }
}

/// The resource as recorded: `arguments` and `uri` stay as null placeholders (replay and the
/// shadow set know they were there; the row stores them only as `audit.arguments` allows).
fn recorded(r: &Resource) -> Resource {
    Resource {
        kind: r.kind.clone(),
        id: r.id.clone(),
        attr: r
            .attr
            .iter()
            .map(|(k, v)| match k.as_str() {
                "arguments" | "uri" => (k.clone(), Value::Null),
                _ => (k.clone(), v.clone()),
            })
            .collect(),
        policy_version: r.policy_version.clone(),
        scope: r.scope.clone(),
    }
}

/// The principal's replay input: its canonical JSON (as `canonical_json(to_value(p))` writes
/// it), rendered once per distinct principal (a caller's principal is the same on every call).
fn principal_input(p: &Principal) -> String {
    static CACHE: LazyLock<Mutex<HashMap<String, (Principal, String)>>> =
        LazyLock::new(Default::default);
    if let Ok(c) = CACHE.lock()
        && let Some((known, json)) = c.get(&p.id)
        && known == p
    {
        return json.clone();
    }
    let json = write_principal(p);
    if let Ok(mut c) = CACHE.lock() {
        if c.len() >= MAX_CACHED_INPUTS {
            c.clear();
        }
        c.insert(p.id.clone(), (p.clone(), json.clone()));
    }
    json
}

/// Distinct principals (explain traces) whose rendered form is kept.
const MAX_CACHED_INPUTS: usize = 4096;

/// Canonical JSON of a principal, written directly (keys sorted, serde's omissions kept).
fn write_principal(p: &Principal) -> String {
    use crate::audit::record::write_str;
    let mut o = String::with_capacity(64 + p.id.len());
    o.push('{');
    if !p.attr.is_empty() {
        o.push_str("\"attr\":");
        write_attr(&mut o, &p.attr, |_| false);
        o.push(',');
    }
    o.push_str("\"id\":");
    write_str(&mut o, &p.id);
    if !p.policy_version.is_empty() {
        o.push_str(",\"policyVersion\":");
        write_str(&mut o, &p.policy_version);
    }
    o.push_str(",\"roles\":[");
    for (i, r) in p.roles.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        write_str(&mut o, r);
    }
    o.push(']');
    if !p.scope.is_empty() {
        o.push_str(",\"scope\":");
        write_str(&mut o, &p.scope);
    }
    o.push('}');
    o
}
/// The resource's replay input: canonical JSON (as `canonical_json(to_value(r))` writes it)
/// with its `arguments` and `uri` attributes as null placeholders (replay knows they were
/// there; the row stores them only as `audit.arguments` allows). Written directly: no copy
/// of the resource, no intermediate value.
fn resource_input(r: &Resource) -> String {
    use crate::audit::record::write_str;
    let mut o = String::with_capacity(128);
    o.push('{');
    if !r.attr.is_empty() {
        o.push_str("\"attr\":");
        write_attr(&mut o, &r.attr, |k| matches!(k, "arguments" | "uri"));
        o.push(',');
    }
    o.push_str("\"id\":");
    write_str(&mut o, &r.id);
    o.push_str(",\"kind\":");
    write_str(&mut o, &r.kind);
    if !r.policy_version.is_empty() {
        o.push_str(",\"policyVersion\":");
        write_str(&mut o, &r.policy_version);
    }
    if !r.scope.is_empty() {
        o.push_str(",\"scope\":");
        write_str(&mut o, &r.scope);
    }
    o.push('}');
    o
}

/// An attribute map as canonical JSON (keys sorted by bytes); `null_out` keys are written as
/// null.
fn write_attr(o: &mut String, m: &Map<String, Value>, null_out: impl Fn(&str) -> bool) {
    use crate::audit::record::{write_canonical, write_str};
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    o.push('{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        write_str(o, k);
        o.push(':');
        match m.get(k) {
            Some(v) if !null_out(k) => write_canonical(o, v),
            _ => o.push_str("null"),
        }
    }
    o.push('}');
}

/// The explain trace rendered for the audit row (scrubbed, canonical, digested) once per
/// distinct trace: the same policy snapshot and rule path give the same trace on every call.
/// `None` for a trace too large to store whole (the row renders it itself).
fn rendered_explain(t: &eval::Trace) -> Option<Arc<RenderedExplain>> {
    use std::hash::{Hash, Hasher};
    type Rendered = (eval::Trace, Arc<RenderedExplain>);
    static CACHE: LazyLock<Mutex<HashMap<u64, Rendered>>> = LazyLock::new(Default::default);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.policies.hash(&mut h);
    for d in &t.derived_roles {
        (&d.name, &d.scope, d.active, &d.error).hash(&mut h);
    }
    for s in &t.steps {
        (
            &s.action, s.pass, &s.role, &s.policy, &s.scope, &s.rule, &s.error,
        )
            .hash(&mut h);
        std::mem::discriminant(&s.effect).hash(&mut h);
        std::mem::discriminant(&s.outcome).hash(&mut h);
    }
    let key = h.finish();
    if let Ok(c) = CACHE.lock()
        && let Some((known, r)) = c.get(&key)
        && known == t
    {
        return Some(r.clone());
    }
    let r = Arc::new(RenderedExplain::new(&serde_json::to_value(t).ok()?)?);
    if let Ok(mut c) = CACHE.lock() {
        if c.len() >= MAX_CACHED_INPUTS {
            c.clear();
        }
        c.insert(key, (t.clone(), r.clone()));
    }
    Some(r)
}

impl AuditSink for crate::audit::AuditLog {
    fn submit(&self, row: AuditRow) -> Result<Commit, AuditUnavailable> {
        if self.saturated() {
            // The writer's queue decides (try_send); this only skips building a doomed row.
            return Err(AuditUnavailable(
                crate::audit::AuditError::QueueFull.to_string(),
            ));
        }
        let rec = row.into_record(self.redactor());
        let ticket = crate::audit::AuditLog::submit(self, rec)
            .map_err(|e| AuditUnavailable(e.to_string()))?;
        Ok(Box::pin(async move {
            ticket
                .wait()
                .await
                .map(|_| ())
                .map_err(|e| AuditUnavailable(e.to_string()))
        }))
    }

    fn outcome(&self, id: &str, outcome: &str, latency_us: u64) {
        if let Err(e) = self.record_outcome(id, outcome, Some(latency_us), "") {
            tracing::warn!(decision = id, error = %e, "the outcome row was not stored");
        }
    }

    fn prometheus(&self) -> String {
        self.metrics().prometheus()
    }

    fn saturated(&self) -> bool {
        self.queue_depth() >= self.queue_capacity()
    }

    fn committed(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        Some(self.head_watch())
    }

    fn writable(&self) -> Result<(), String> {
        let h = self.health();
        if h.healthy {
            Ok(())
        } else {
            Err(h
                .last_error
                .unwrap_or_else(|| "audit store unhealthy".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::canonical_json;
    use serde_json::json;

    fn attrs(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// The replay inputs written directly are byte for byte what `canonical_json(to_value(..))`
    /// wrote before (stored rows and `policy replay` read them).
    #[test]
    fn replay_inputs_match_the_value_round_trip() {
        let odd = json!({"z": [1, 2.5, -3, {"b": null, "a": "é\n\"q\""}], "A": true, "tags": ["tag:x"], "n": 1e300});
        let principals = [
            Principal::default(),
            Principal {
                id: "alice@example.com".into(),
                roles: vec!["user".into(), "admin".into()],
                attr: attrs(odd.clone()),
                policy_version: "v2".into(),
                scope: "acme.eu".into(),
            },
            Principal {
                id: "\u{1}x".into(),
                roles: vec![],
                attr: attrs(json!({"login": "a@b", "node": "n"})),
                ..Principal::default()
            },
        ];
        for p in &principals {
            let old = canonical_json(&serde_json::to_value(p).unwrap());
            assert_eq!(write_principal(p), old);
            assert_eq!(principal_input(p), old, "cached");
            assert_eq!(principal_input(p), old, "from the cache");
        }
        let mut changed = principals[1].clone();
        changed.roles.push("more".into());
        assert_ne!(principal_input(&changed), principal_input(&principals[1]));
        let mut attr = attrs(odd);
        attr.insert("arguments".into(), json!({"secret": "s3cret"}));
        attr.insert("uri".into(), json!("file:///k?key=1"));
        for r in [
            Resource::default(),
            Resource {
                kind: "mcp_server".into(),
                id: "github".into(),
                attr,
                policy_version: "default".into(),
                scope: "acme".into(),
            },
        ] {
            let mut recorded = r.clone();
            for (k, v) in recorded.attr.iter_mut() {
                if k == "arguments" || k == "uri" {
                    *v = Value::Null;
                }
            }
            let old = canonical_json(&serde_json::to_value(&recorded).unwrap());
            assert_eq!(resource_input(&r), old);
        }
    }

    /// A rendered trace is what the per-row path stored: scrubbed unless `full`, and found
    /// again for an equal trace.
    #[test]
    fn rendered_explains_are_shared_and_scrubbed() {
        use crate::config::ArgumentsMode;
        use crate::policy::eval::{Step, StepOutcome, Trace};
        let secret = "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB";
        let t = Trace {
            policies: vec!["resource.mcp_server.vdefault".into()],
            derived_roles: vec![],
            steps: vec![Step {
                action: "tools/call::echo".into(),
                pass: "resource",
                role: Some("user".into()),
                policy: "resource.mcp_server.vdefault".into(),
                scope: String::new(),
                rule: "rule-001".into(),
                effect: Effect::Allow,
                outcome: StepOutcome::Activated,
                error: Some(format!("no such key: {secret}")),
            }],
        };
        let a = rendered_explain(&t).unwrap();
        let b = rendered_explain(&t.clone()).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one rendering per distinct trace");
        let v = serde_json::to_value(&t).unwrap();
        let (full, _) = a.stored(ArgumentsMode::Full);
        assert_eq!(full, canonical_json(&v));
        let mut rec = crate::audit::Record {
            explain: v,
            ..Default::default()
        };
        crate::audit::Redactor::new(ArgumentsMode::Digest, &[], 4096).scrub_record(&mut rec);
        let (digest_mode, d) = a.stored(ArgumentsMode::Digest);
        assert_eq!(digest_mode, canonical_json(&rec.explain));
        assert!(!digest_mode.contains(secret));
        use sha2::Digest as _;
        assert_eq!(
            d,
            <[u8; 32]>::from(sha2::Sha256::digest(digest_mode.as_bytes()))
        );
        assert!(a.may_contain(&["tools/call".into()]));
        assert!(!a.may_contain(&["absent-needle".into()]));
        assert!(a.may_contain(&["has\"quote".into()]));
    }
}
