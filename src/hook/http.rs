//! The hook's HTTP adapter: `POST /hooks/aperture/pre_request`,
//! `POST /hooks/aperture/post_response` and `POST /hooks/aperture` (event inferred).
//!
//! Order of work, each step failing closed:
//! 1. `hooks.aperture` configured, else 404.
//! 2. The connection's WhoIs caller holds one of `hooks.aperture.callers` (the Aperture node's
//!    tag), else 403; the API key from `key_file` is presented (`Authorization: Bearer` or
//!    `X-Api-Key`) and equal, compared in constant time, else 401.
//! 3. The body is read within `max_body`, parsed strictly (duplicate and case-variant keys are
//!    refused at every depth, as on the MCP path) and read as `HookCallData`.
//! 4. The principal: `metadata.login_name` with `metadata.grants`; `tagged-devices` is looked
//!    up by `stable_node_id` among tailscaled's peers.
//! 5. Decisions and audit rows (kind `hook`); the answer waits for the rows to commit.
//!
//! From step 3 on, the caller is Aperture itself, so a `pre_request` that cannot be read or
//! decided is answered `200` with `{"action":"block"}`: a non-2xx answer would let the request
//! through under Aperture's default `fail_policy: fail_open`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};

use super::call::{self, Event, HookCall};
use super::{check, provider};
use crate::config::hooks::ApertureHookConfig;
use crate::gateway::{AuditRow, Caller, Conn, Decision, Gateway};
use crate::policy::model::Effect;
use crate::tailnet::types::PeerStatus;

/// The longest API key file we read.
pub const MAX_KEY_BYTES: usize = 4096;
/// A missing peer makes a fresh status fetch at most this often (a caller naming unknown nodes
/// cannot make every request cost a LocalAPI call).
pub const PEER_MISS_REFRESH: Duration = Duration::from_secs(1);
/// The bound on one status fetch for the tagged-device lookup.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the API key file: its content without surrounding whitespace, non-empty. Only its
/// SHA-256 is kept.
pub fn load_key(path: &std::path::Path) -> Result<[u8; 32], String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| {
        format!(
            "hooks.aperture.key_file {}: cannot read: {e}",
            path.display()
        )
    })?;
    if bytes.len() > MAX_KEY_BYTES {
        return Err(format!(
            "hooks.aperture.key_file {}: longer than {MAX_KEY_BYTES} bytes",
            path.display()
        ));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("hooks.aperture.key_file {}: not UTF-8 text", path.display()))?
        .trim();
    if text.is_empty() {
        return Err(format!("hooks.aperture.key_file {}: empty", path.display()));
    }
    Ok(sha2::Sha256::digest(text.as_bytes()).into())
}

/// Checks the hook's configuration and key file at start (so `serve` refuses to start with an
/// unreadable key rather than refusing every hook call later).
pub fn check_config(cfg: &crate::config::Config) -> Result<(), String> {
    if let Some(path) = cfg
        .hooks
        .aperture
        .as_ref()
        .and_then(|a| a.key_file.as_ref())
    {
        load_key(path)?;
    }
    Ok(())
}

/// Tailscaled's peers by stable node ID, fetched on demand.
#[derive(Debug, Default)]
struct PeerCache {
    inner: tokio::sync::Mutex<PeerSnapshot>,
}

#[derive(Debug, Default)]
struct PeerSnapshot {
    fetched: Option<Instant>,
    peers: HashMap<String, PeerStatus>,
}

impl PeerCache {
    /// The peer with stable ID `id`. The snapshot is reused for `ttl`; a miss refetches at
    /// most every [`PEER_MISS_REFRESH`]. One fetch at a time.
    async fn lookup(
        &self,
        api: &crate::tailnet::localapi::LocalApi,
        id: &str,
        ttl: Duration,
    ) -> Result<Option<PeerStatus>, String> {
        let mut s = self.inner.lock().await;
        let age = s.fetched.map(|t| t.elapsed());
        let fresh = age.is_some_and(|a| a < ttl);
        if fresh && let Some(p) = s.peers.get(id) {
            return Ok(Some(p.clone()));
        }
        if !fresh || age.is_none_or(|a| a >= PEER_MISS_REFRESH) {
            let status = tokio::time::timeout(STATUS_TIMEOUT, api.status_with_peers())
                .await
                .map_err(|_| "tailscaled's status did not answer in time".to_string())?
                .map_err(|e| format!("tailscaled's status: {e}"))?;
            s.peers = status
                .peer
                .into_values()
                .filter(|p| !p.id.is_empty())
                .map(|p| (p.id.clone(), p))
                .collect();
            s.fetched = Some(Instant::now());
        }
        Ok(s.peers.get(id).cloned())
    }
}

/// The routes' state.
pub struct HookState {
    gw: Arc<Gateway>,
    /// SHA-256 of the API key; `Err` when the key file could not be read (every call refused).
    key: Result<Option<[u8; 32]>, String>,
    peers: PeerCache,
}

/// The hook's routes, to merge into the main router.
pub fn routes(gw: &Arc<Gateway>) -> Router<Arc<Gateway>> {
    let key = match gw
        .config
        .hooks
        .aperture
        .as_ref()
        .and_then(|a| a.key_file.as_ref())
    {
        None => Ok(None),
        Some(path) => load_key(path).map(Some).inspect_err(|e| {
            tracing::error!(error = %e, "the Aperture hook refuses every call");
        }),
    };
    let state = Arc::new(HookState {
        gw: gw.clone(),
        key,
        peers: PeerCache::default(),
    });
    Router::new()
        .route(
            "/hooks/aperture",
            post(|State(h): State<Arc<HookState>>, req: Request| handle(h, None, req)),
        )
        .route(
            "/hooks/aperture/pre_request",
            post(|State(h): State<Arc<HookState>>, req: Request| {
                handle(h, Some(Event::PreRequest), req)
            }),
        )
        .route(
            "/hooks/aperture/post_response",
            post(|State(h): State<Arc<HookState>>, req: Request| {
                handle(h, Some(Event::PostResponse), req)
            }),
        )
        .with_state(state)
}

fn json_response(status: StatusCode, body: &Value, decision: &str) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(decision)
        && !decision.is_empty()
    {
        r.headers_mut()
            .insert(crate::mcp::proxy::DECISION_HEADER, v);
    }
    r
}

/// A `GuardrailResponse` block.
fn block(http: StatusCode, status_code: u16, message: &str, decision: &str) -> Response {
    json_response(
        http,
        &json!({"action": "block", "status_code": status_code, "message": message}),
        decision,
    )
}

/// A refused call, audited (kind `hook`, outcome `refused`) with whoever the connection is.
async fn refuse(
    gw: &Gateway,
    conn: &Conn,
    event: Option<Event>,
    http: StatusCode,
    status_code: u16,
    why: &str,
) -> Response {
    let mut row = AuditRow::new("hook", conn);
    row.method = event.map_or("hook", Event::as_str).to_string();
    row.outcome = "refused".into();
    row.reason = why.to_string();
    row.policy_hash = gw.store.current().hash.clone();
    let id = row.id.clone();
    let message = format!("toolgate: {why} (decision {id})");
    let stored = match gw.submit(row) {
        Ok(commit) => commit.await.is_ok(),
        Err(_) => false,
    };
    match stored {
        true => block(http, status_code, &message, &id),
        false => block(
            StatusCode::SERVICE_UNAVAILABLE,
            503,
            "toolgate: audit unavailable",
            "",
        ),
    }
}

async fn handle(h: Arc<HookState>, route: Option<Event>, req: Request) -> Response {
    let gw = &h.gw;
    let Some(cfg) = gw.config.hooks.aperture.as_ref() else {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "the Aperture hook is not configured (hooks.aperture)"}),
            "",
        );
    };
    let Some(conn) = req.extensions().get::<Conn>().cloned() else {
        return block(
            StatusCode::FORBIDDEN,
            403,
            "toolgate: no verified tailnet identity",
            "",
        );
    };
    let (parts, body) = req.into_parts();
    if let Err(why) = admit(&h, cfg, &conn, &parts.headers) {
        let (http, code) = match why {
            Refusal::Caller(_) => (StatusCode::FORBIDDEN, 403),
            Refusal::Key(_) => (StatusCode::UNAUTHORIZED, 401),
        };
        return refuse(gw, &conn, route, http, code, why.text()).await;
    }
    let fail = |code: u16, why: String| {
        let conn = conn.clone();
        async move { refuse(gw, &conn, route, StatusCode::OK, code, &why).await }
    };
    let bytes = match axum::body::to_bytes(body, cfg.max_body).await {
        Ok(b) => b,
        Err(e) => {
            return fail(
                413,
                format!(
                    "the hook body could not be read within hooks.aperture.max_body ({} bytes): {e}",
                    cfg.max_body
                ),
            )
            .await;
        }
    };
    let limits = crate::mcp::jsonrpc::Limits {
        max_bytes: cfg.max_body,
        max_depth: 64,
        max_nodes: cfg.max_nodes,
    };
    let call = match crate::mcp::jsonrpc::parse_value(&bytes, limits)
        .map_err(|e| format!("the hook body: {e}"))
        .and_then(call::parse)
    {
        Ok(c) => c,
        Err(e) => return fail(400, e).await,
    };
    let event = route.unwrap_or(if call.looks_post_response() {
        Event::PostResponse
    } else {
        Event::PreRequest
    });
    let caller = match principal(&h, &call).await {
        Ok(c) => Arc::new(c),
        Err(e) => return fail(cfg.block_status, e).await,
    };
    let context = context(&conn, &call);
    let cx = Cx {
        gw,
        cfg,
        conn: &conn,
        caller,
        call: &call,
        event,
        context,
    };
    match event {
        Event::PreRequest => pre_request(&cx).await,
        Event::PostResponse => post_response(&cx).await,
    }
}

/// Why a caller is not admitted.
enum Refusal {
    Caller(String),
    Key(String),
}

impl Refusal {
    fn text(&self) -> &str {
        match self {
            Refusal::Caller(s) | Refusal::Key(s) => s,
        }
    }
}

/// Step 2: the Aperture node by tag, then the key.
fn admit(
    h: &HookState,
    cfg: &ApertureHookConfig,
    conn: &Conn,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    let Some(caller) = conn.caller.as_ref() else {
        return Err(Refusal::Caller(format!(
            "no verified tailnet identity: {}",
            conn.unidentified.as_deref().unwrap_or("unknown peer")
        )));
    };
    if !caller
        .identity
        .tags
        .iter()
        .any(|t| cfg.callers.iter().any(|c| c == t))
    {
        return Err(Refusal::Caller(format!(
            "{} is not an Aperture node: only nodes tagged {} may call the hook (hooks.aperture.callers)",
            caller.principal.id,
            cfg.callers.join(" or ")
        )));
    }
    let want = match &h.key {
        Ok(None) => return Ok(()),
        Ok(Some(k)) => k,
        Err(e) => return Err(Refusal::Key(format!("the hook's key cannot be read: {e}"))),
    };
    let mut presented: Vec<&[u8]> = Vec::new();
    for v in headers.get_all(header::AUTHORIZATION) {
        let b = v.as_bytes();
        match b.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => {
                presented.push(b.get(7..).unwrap_or_default().trim_ascii());
            }
            _ => {
                return Err(Refusal::Key(
                    "Authorization is not a Bearer key".to_string(),
                ));
            }
        }
    }
    for v in headers.get_all("x-api-key") {
        presented.push(v.as_bytes().trim_ascii());
    }
    if presented.is_empty() {
        return Err(Refusal::Key(
            "no API key (send it as Authorization: Bearer or X-Api-Key)".into(),
        ));
    }
    if presented.iter().all(|k| key_matches(k, want)) {
        Ok(())
    } else {
        Err(Refusal::Key("wrong API key".into()))
    }
}

/// Constant time in the key's content: both sides are hashed first, then compared with
/// `subtle`, so neither the length nor a matching prefix shows in the timing.
fn key_matches(presented: &[u8], want: &[u8; 32]) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    let got: [u8; 32] = sha2::Sha256::digest(presented).into();
    !presented.is_empty() && bool::from(got.ct_eq(want))
}

/// Step 4: the principal Aperture asserts.
async fn principal(h: &HookState, call: &HookCall) -> Result<Caller, String> {
    let gw = &h.gw;
    let capability = &gw.config.identity.capability;
    let meta = &call.metadata;
    let identity = if check::is_tagged_login(meta) {
        if meta.stable_node_id.is_empty() {
            return Err(
                "a tagged device (login tagged-devices) without metadata.stable_node_id: \
                 cannot tell which node it is"
                    .into(),
            );
        }
        let Some(api) = gw.localapi.as_ref() else {
            return Err(format!(
                "a tagged device (node {}) can only be identified through tailscaled's status, \
                 and this toolgate has no tailscaled (identity.provider static)",
                meta.stable_node_id
            ));
        };
        let peer = h
            .peers
            .lookup(api, &meta.stable_node_id, gw.config.identity.whois_ttl)
            .await
            .map_err(|e| {
                format!(
                    "tagged device {}: cannot look it up: {e}",
                    meta.stable_node_id
                )
            })?
            .ok_or_else(|| {
                format!(
                    "tagged device {} is unknown: no peer with that stable node ID in \
                     tailscaled's status, so its tags cannot be known (the login tagged-devices \
                     never authorizes)",
                    meta.stable_node_id
                )
            })?;
        check::tagged_identity(meta, capability, &peer)?
    } else {
        check::user_identity(meta, capability)?
    };
    let principal = identity.principal(&gw.config.identity.role_mappings);
    Ok(Caller::new(identity, principal))
}

/// The context every row of a call ends its reason with: the Aperture node, the model, the
/// request and the session.
fn context(conn: &Conn, call: &HookCall) -> String {
    let m = &call.metadata;
    let via = conn.caller.as_ref().map_or("", |c| c.principal.id.as_str());
    format!(
        "via Aperture {via}; model {:?}; request {:?}; session {:?}",
        m.model, m.request_id, m.session_id
    )
}

/// One decided call's context.
struct Cx<'a> {
    gw: &'a Gateway,
    cfg: &'a ApertureHookConfig,
    conn: &'a Conn,
    caller: Arc<Caller>,
    call: &'a HookCall,
    event: Event,
    /// What every row's reason ends with (see [`Cx::context`]), rendered once per call.
    context: String,
}

impl Cx<'_> {
    /// The decision on `action` of `tool` with `args`, and the arguments back (lent to the
    /// check as `R.attr.arguments`, then kept by the audit row: never copied).
    fn decide(&self, tool: &str, action: &str, args: Map<String, Value>) -> (Decision, Value) {
        let resource = check::tool_resource_owned(
            &self.cfg.resource_kind,
            &self.cfg.scope,
            tool,
            args,
            &self.call.metadata,
        );
        let (d, mut resource) =
            self.gw
                .decide_caller(&self.caller, resource, vec![action.to_string()]);
        let args = resource
            .attr
            .remove("arguments")
            .unwrap_or_else(|| Value::Object(Map::new()));
        (d, args)
    }

    /// Which of `offered` this caller may not list (`tools/list::<name>`), decided against
    /// one policy snapshot; the listing's row carries the result, so no per-tool decision
    /// record (replay inputs, trace) is built. Returns the snapshot's hash too.
    fn hidden_tools(&self, offered: &[String]) -> (BTreeSet<String>, String) {
        let started = Instant::now();
        let set = self.gw.store.current();
        let params = self.gw.params();
        let mut hidden = BTreeSet::new();
        let mut actions = vec![String::new()];
        for name in offered {
            let resource = check::tool_resource(
                &self.cfg.resource_kind,
                &self.cfg.scope,
                name,
                None,
                &self.call.metadata,
            );
            actions[0] = check::list_action(name);
            let out = crate::policy::eval::check_ref(
                &set,
                crate::policy::eval::CheckRef {
                    principal: &self.caller.principal,
                    resource: &resource,
                    actions: &actions,
                    aux_data: &Value::Null,
                },
                &params,
            );
            if out.effect(&actions[0]) != Some(Effect::Allow) {
                hidden.insert(name.clone());
            }
        }
        self.gw.metrics.decision_latency.observe(started.elapsed());
        (hidden, set.hash.clone())
    }

    /// A row for the asserted principal, naming the Aperture node and the request.
    fn row(&self) -> AuditRow {
        let mut row = AuditRow::new("hook", self.conn);
        row.caller = Some(self.caller.clone());
        let m = &self.call.metadata;
        row.server = if m.provider.is_empty() {
            "aperture".into()
        } else {
            m.provider.clone()
        };
        row.method = self.event.as_str().to_string();
        row
    }

    /// The context every row's reason ends with.
    fn context(&self) -> &str {
        &self.context
    }

    fn tool_row(
        &self,
        d: &Decision,
        tool: &str,
        action: &str,
        args: Value,
        outcome: &str,
    ) -> AuditRow {
        let mut row = self.row().decided(d, action);
        row.tool = tool.to_string();
        row.arguments = Some(Arc::new(args));
        row.outcome = outcome.to_string();
        row.latency_us = d.elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        if row.reason.is_empty() {
            row.reason = self.context.clone();
        } else {
            row.reason.reserve(2 + self.context.len());
            row.reason.push_str("; ");
            row.reason.push_str(&self.context);
        }
        row
    }

    /// Submits rows and waits for them to commit; `false` if any could not be stored.
    async fn commit(&self, rows: Vec<AuditRow>) -> bool {
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            match self.gw.submit(row) {
                Ok(c) => pending.push(c),
                Err(_) => return false,
            }
        }
        futures_util::future::join_all(pending)
            .await
            .iter()
            .all(Result::is_ok)
    }

    async fn fail(&self, code: u16, why: String) -> Response {
        refuse(
            self.gw,
            self.conn,
            Some(self.event),
            StatusCode::OK,
            code,
            &why,
        )
        .await
    }
}

fn audit_unavailable() -> Response {
    block(
        StatusCode::OK,
        503,
        "toolgate: the audit store cannot take the decision; nothing was allowed",
        "",
    )
}

/// `pre_request`: check the latest tool uses; block on a deny; else take out the offered tools
/// this caller may not list (`modify`), or allow.
async fn pre_request(cx: &Cx<'_>) -> Response {
    let Some(body) = cx.call.request_body.as_ref() else {
        return cx
            .fail(
                400,
                "no request_body: add \"request_body\" to the grant's send_hooks send list, \
                 the hook cannot see the tools otherwise"
                    .into(),
            )
            .await;
    };
    let (uses, offered) = match provider::latest_tool_uses(body)
        .and_then(|u| provider::offered_tools(body).map(|o| (u, o)))
    {
        Ok(x) => x,
        Err(e) => return cx.fail(400, e).await,
    };
    let mut rows = Vec::with_capacity(uses.len() + 1);
    let mut denied: Vec<(String, String, String)> = Vec::new();
    for u in uses {
        let action = check::call_action(&u.name);
        let (d, args) = cx.decide(&u.name, &action, u.params);
        let allowed = d.effect(&action) == Effect::Allow;
        let row = cx.tool_row(
            &d,
            &u.name,
            &action,
            args,
            if allowed { "answered" } else { "blocked" },
        );
        if !allowed {
            let reason = d
                .result(&action)
                .map(|r| r.reason.clone())
                .unwrap_or_default();
            denied.push((u.name, row.id.clone(), reason));
        }
        rows.push(row);
    }
    if let Some((tool, id, reason)) = denied.first() {
        let ok = cx.commit(rows).await;
        if !ok {
            return audit_unavailable();
        }
        let more = if denied.len() > 1 {
            format!(
                " (also denied: {})",
                denied
                    .iter()
                    .skip(1)
                    .map(|(t, i, _)| format!("{t} [{i}]"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        };
        let reason = if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        };
        let message = format!(
            "toolgate denied the tool {tool:?} for {} (decision {id}){reason}{more}",
            cx.caller.principal.id
        );
        return block(StatusCode::OK, cx.cfg.block_status, &message, id);
    }
    // Offered tools: each checked with tools/list::<name> (no arguments).
    let mut hidden: BTreeSet<String> = BTreeSet::new();
    let mut list_row = None;
    if !offered.is_empty() {
        let started = Instant::now();
        let (h, policy_hash) = cx.hidden_tools(&offered);
        hidden = h;
        let mut row = cx.row();
        row.action = "tools/list".into();
        row.effect = Effect::Allow;
        row.outcome = if hidden.is_empty() {
            "answered".into()
        } else {
            "modified".into()
        };
        row.policy_hash = policy_hash;
        row.latency_us = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        let shown = offered.len() - hidden.len();
        row.reason = if hidden.is_empty() {
            format!(
                "all {} offered tools listed; {}",
                offered.len(),
                cx.context()
            )
        } else {
            format!(
                "{shown} of {} offered tools listed; hidden (tools/list denied): {}; {}",
                offered.len(),
                hidden.iter().cloned().collect::<Vec<_>>().join(", "),
                cx.context()
            )
        };
        list_row = Some(row);
    }
    if let Some(forced) = provider::forced_tool(body).filter(|t| hidden.contains(t)) {
        let mut row = list_row.take().unwrap_or_else(|| cx.row());
        row.effect = Effect::Deny;
        row.outcome = "blocked".into();
        row.tool = forced.clone();
        row.reason = format!(
            "tool_choice forces {forced:?}, which this caller may not list; {}",
            cx.context()
        );
        let id = row.id.clone();
        if !cx.commit(vec![row]).await || !cx.commit(rows).await {
            return audit_unavailable();
        }
        let message = format!(
            "toolgate denied the tool {forced:?} for {} (decision {id}): tool_choice forces a tool this caller may not use",
            cx.caller.principal.id
        );
        return block(StatusCode::OK, cx.cfg.block_status, &message, &id);
    }
    let decision = list_row
        .as_ref()
        .or(rows.first())
        .map(|r| r.id.clone())
        .unwrap_or_default();
    rows.extend(list_row);
    if rows.is_empty() {
        // Nothing to check: still one row, so every hook call is in the trail.
        let mut row = cx.row();
        row.effect = Effect::Allow;
        row.outcome = "answered".into();
        row.policy_hash = cx.gw.store.current().hash.clone();
        row.reason = format!("no tool use and no tools offered; {}", cx.context());
        let id = row.id.clone();
        if !cx.commit(vec![row]).await {
            return audit_unavailable();
        }
        return json_response(StatusCode::OK, &json!({"action": "allow"}), &id);
    }
    if !cx.commit(rows).await {
        return audit_unavailable();
    }
    if hidden.is_empty() {
        json_response(StatusCode::OK, &json!({"action": "allow"}), &decision)
    } else {
        let body = provider::without_tools(body, &hidden);
        json_response(
            StatusCode::OK,
            &json!({"action": "modify", "request_body": body}),
            &decision,
        )
    }
}

/// `entire_request` / `tool_call_entire_request`: every tool call the model made, audited with
/// the decision policy would have given, outcome `observed`. Aperture does not wait for it.
async fn post_response(cx: &Cx<'_>) -> Response {
    let uses: Vec<provider::ToolUse> = match (&cx.call.tool_calls, &cx.call.response_body) {
        (Some(calls), _) => calls
            .iter()
            .map(|c| provider::ToolUse {
                name: c.name.clone(),
                params: c.params.clone(),
            })
            .collect(),
        (None, Some(body)) => match provider::response_tool_uses(body) {
            Ok(u) => u,
            Err(e) => return cx.fail(400, e).await,
        },
        (None, None) => Vec::new(),
    };
    let mut rows = Vec::with_capacity(uses.len().max(1));
    for u in uses {
        let action = check::call_action(&u.name);
        let (d, args) = cx.decide(&u.name, &action, u.params);
        rows.push(cx.tool_row(&d, &u.name, &action, args, "observed"));
    }
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    if rows.is_empty() {
        let mut row = cx.row();
        row.effect = Effect::Allow;
        row.outcome = "observed".into();
        row.policy_hash = cx.gw.store.current().hash.clone();
        row.reason = format!(
            "no tool calls in the response (send \"tools\" or \"response_body\" to see them); {}",
            cx.context()
        );
        rows.push(row);
    }
    let first = rows.first().map(|r| r.id.clone()).unwrap_or_default();
    if !cx.commit(rows).await {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "the audit store cannot take the observed calls"}),
            "",
        );
    }
    json_response(
        StatusCode::OK,
        &json!({"observed": ids.len(), "decisions": ids}),
        &first,
    )
}
