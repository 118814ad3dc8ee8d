//! The HTTP adapter of the decision API: identity and access first, then the body (bounded,
//! parsed, validated, limited, tokens verified), then one evaluation per resource against one
//! policy snapshot, one audit row, and the answer. No answer leaves before its audit row is
//! accepted (and, with `audit.mode: sync`, committed): a full or failed audit store answers
//! 503 `UNAVAILABLE`, never an unaudited decision.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Map, json};

use super::access::{Access, access};
use super::request::{self, CheckRequest};
use super::response::{self, CheckResponse};
use super::status::{Status, code};
use crate::audit::record::RenderedExplain;
use crate::audit::redact::CleanJson;
use crate::gateway::{AuditRow, Caller, Conn, Gateway};
use crate::policy::eval::{self, CheckOutput};
use crate::policy::input::CheckInput;
use crate::policy::model::Effect;
use crate::policy::plan::{self, FilterKind, PlanInput};

/// Bound on a request body: gRPC's default maximum message, which Cerbos enforces.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// The routes of the decision API (merged into the daemon's router).
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/api/check/resources", post(check).fallback(not_allowed))
        .route("/api/plan/resources", post(plan).fallback(not_allowed))
        .route("/api/server_info", get(server_info).fallback(not_allowed))
        .route("/_cerbos/health", get(health).fallback(not_allowed))
}

/// A `google.rpc.Status` answer.
pub fn error(s: &Status) -> Response {
    let mut r = Response::new(Body::from(s.to_json()));
    *r.status_mut() = StatusCode::from_u16(s.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn json_ok(body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn not_allowed() -> Response {
    error(&Status::new(code::UNIMPLEMENTED, "Method Not Allowed"))
}

fn disabled() -> Response {
    error(&Status::new(
        code::NOT_FOUND,
        "the Cerbos-compatible API is disabled on this gateway (pdp.enabled: false)",
    ))
}

/// `GET /_cerbos/health[?service=...]`: any caller; Cerbos's answer for its check service.
async fn health(State(gw): State<Arc<Gateway>>, RawQuery(q): RawQuery) -> Response {
    let service = query_param(q.as_deref(), "service").unwrap_or_default();
    if !service.is_empty() && service != "cerbos.svc.v1.CerbosService" {
        return error(&Status::new(code::NOT_FOUND, "unknown service"));
    }
    if !gw.config.pdp.enabled || gw.store.current().is_empty() {
        let mut r = json_ok("{\"status\":\"NOT_SERVING\"}".into());
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    }
    json_ok("{\"status\":\"SERVING\"}".into())
}

/// `GET /api/server_info`: toolgate's own version (identified callers only).
async fn server_info(State(gw): State<Arc<Gateway>>, Extension(conn): Extension<Conn>) -> Response {
    if !gw.config.pdp.enabled {
        return disabled();
    }
    if conn.caller.is_none() {
        return error(&unidentified(&conn));
    }
    json_ok(
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "commit": option_env!("TOOLGATE_COMMIT").unwrap_or(""),
            "buildDate": option_env!("TOOLGATE_BUILD_DATE").unwrap_or(""),
        })
        .to_string(),
    )
}

fn unidentified(conn: &Conn) -> Status {
    Status::new(
        code::PERMISSION_DENIED,
        format!(
            "no verified tailnet identity for this caller ({})",
            conn.unidentified.as_deref().unwrap_or("unknown peer")
        ),
    )
}

/// The first value of `name` in a query string (no percent-decoding needed for our values).
fn query_param<'a>(q: Option<&'a str>, name: &str) -> Option<&'a str> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn explain_requested(q: Option<&str>) -> bool {
    matches!(query_param(q, "explain"), Some("true" | "1" | ""))
}

/// The caller and what it may do, or the refusal (audited).
fn admit(gw: &Gateway, conn: &Conn, method: &str) -> Result<(Arc<Caller>, Access), Status> {
    let Some(caller) = conn.caller.clone() else {
        let s = unidentified(conn);
        refuse(gw, conn, method, &s.message);
        return Err(s);
    };
    let pdp = &gw.config.pdp;
    match access(&pdp.callers, pdp.self_only, &caller) {
        Access::Denied => {
            let why = format!(
                "{} may not ask for decisions: it holds none of pdp.callers ({})",
                caller.principal.id,
                pdp.callers.join(", ")
            );
            refuse(gw, conn, method, &why);
            Err(Status::new(code::PERMISSION_DENIED, why))
        }
        a => Ok((caller, a)),
    }
}

/// Audits a refused request (no decision was made).
fn refuse(gw: &Gateway, conn: &Conn, method: &str, why: &str) {
    let mut row = AuditRow::new("check", conn);
    row.method = method.to_string();
    row.outcome = "refused".into();
    row.reason = format!("forbidden: {why}");
    row.policy_hash = gw.store.current().hash.clone();
    let _ = gw.submit(row);
}

async fn read_body(body: Body) -> Result<bytes::Bytes, Status> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        Status::new(
            code::RESOURCE_EXHAUSTED,
            format!("request body larger than max ({MAX_BODY} bytes)"),
        )
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The request's principal (required) and its `auxData` with every JWT verified against the
/// configured keysets: the step check and plan share after validating their own shape.
fn principal_and_aux(
    gw: &Gateway,
    principal: Option<request::Principal>,
    aux: Option<&request::AuxData>,
) -> Result<(request::Principal, serde_json::Value), Status> {
    let aux = gw.config.pdp.keysets.decode(aux, now_secs())?;
    let principal = principal
        .ok_or_else(|| Status::invalid("validation error: principal: value is required"))?;
    Ok((principal, aux))
}

/// `POST /api/check/resources`.
async fn check(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    RawQuery(q): RawQuery,
    req: Request,
) -> Response {
    const METHOD: &str = "POST /api/check/resources";
    if !gw.config.pdp.enabled {
        return disabled();
    }
    let (caller, access) = match admit(&gw, &conn, METHOD) {
        Ok(x) => x,
        Err(s) => return error(&s),
    };
    let explain = explain_requested(q.as_deref());
    if explain && access != Access::Assert {
        return error(&Status::new(
            code::PERMISSION_DENIED,
            "explain=true is for the callers listed in pdp.callers",
        ));
    }
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(s) => return error(&s),
    };
    let started = Instant::now();
    let mut r: CheckRequest = match request::parse_check(&body) {
        Ok(r) => r,
        Err(s) => return error(&s),
    };
    if access == Access::SelfOnly {
        // The body's principal is ignored: the caller asks about itself.
        r.principal = Some(request::Principal::from_input(&caller.principal));
    }
    let limits = &gw.config.pdp.request_limits;
    if let Err(s) = request::validate_check(
        &r,
        limits.max_resources_per_request,
        limits.max_actions_per_resource,
    ) {
        return error(&s);
    }
    let (principal, aux) = match principal_and_aux(&gw, r.principal.take(), r.aux_data.as_ref()) {
        Ok(x) => x,
        Err(s) => return error(&s),
    };
    let set = gw.store.current();
    let params = gw.params();
    let mut input = CheckInput {
        principal: principal.into_input(),
        aux_data: aux,
        ..Default::default()
    };
    let mut outputs: Vec<CheckOutput> = Vec::with_capacity(r.resources.len());
    let mut resources: Vec<request::Resource> = Vec::with_capacity(r.resources.len());
    for e in r.resources.iter_mut() {
        let mut res = e.resource.take().unwrap_or_default();
        input.resource = crate::policy::input::Resource {
            kind: res.kind.clone(),
            id: res.id.clone(),
            attr: std::mem::take(&mut res.attr),
            policy_version: res.policy_version.clone(),
            scope: res.scope.clone(),
        };
        input.actions = std::mem::take(&mut e.actions);
        outputs.push(eval::check(&set, &input, &params));
        resources.push(res);
    }
    let elapsed = started.elapsed();
    gw.metrics.decision_latency.observe(elapsed);

    let mut row = audit_row(
        &conn,
        &caller,
        &input.principal.id,
        &resources,
        &outputs,
        access,
    );
    row.policy_hash = set.hash.clone();
    row.latency_us = elapsed.as_micros().min(u64::MAX as u128) as u64;
    let call_id = row.id.clone();
    let commit = match gw.submit(row) {
        Ok(c) => c,
        Err(e) => return error(&Status::new(code::UNAVAILABLE, e.to_string())),
    };
    if let Err(e) = commit.await {
        return error(&Status::new(code::UNAVAILABLE, e.to_string()));
    }
    let results = resources
        .iter()
        .zip(outputs.iter())
        .map(|(res, out)| response::result(res, out, r.include_meta, explain))
        .collect();
    let resp = CheckResponse {
        request_id: &r.request_id,
        results,
        cerbos_call_id: &call_id,
    };
    match serde_json::to_string(&resp) {
        Ok(s) => json_ok(s),
        Err(e) => error(&Status::new(code::INTERNAL, e.to_string())),
    }
}

/// Longest `reason` text of a check row; the full per-action detail is in `explain`.
const MAX_REASON: usize = 2048;

/// One audit row per request: the caller (identity fields), the principal it asserted, and
/// every resource × action with its effect and deciding policy (in `explain.results`). The
/// row's effect is `deny` if any action was denied.
fn audit_row(
    conn: &Conn,
    caller: &Caller,
    principal: &str,
    resources: &[request::Resource],
    outputs: &[CheckOutput],
    access: Access,
) -> AuditRow {
    let mut row = AuditRow::new("check", conn);
    row.method = "POST /api/check/resources".into();
    row.principal = Some(principal.to_string());
    row.outcome = "answered".into();
    let mut effect = Effect::Allow;
    let mut reason = format!(
        "caller {} ({}) asked for {principal}:",
        caller.principal.id,
        match access {
            Access::Assert => "pdp.callers",
            _ => "self_only",
        }
    );
    let mut first_deny: Option<(&str, &str, &str)> = None;
    let n_actions: usize = outputs.iter().map(|o| o.actions.len()).sum();
    let mut action = String::with_capacity(n_actions * 24);
    for (res, out) in resources.iter().zip(outputs) {
        for a in &out.actions {
            let e = match a.effect {
                Effect::Allow => "allow",
                Effect::Deny => {
                    effect = Effect::Deny;
                    if first_deny.is_none() {
                        first_deny = Some((&a.policy, &a.rule, &a.action));
                    }
                    "deny"
                }
            };
            if reason.len() < MAX_REASON {
                for part in [
                    " ",
                    res.kind.as_str(),
                    "/",
                    &res.id,
                    " ",
                    &a.action,
                    "=",
                    e,
                    ";",
                ] {
                    reason.push_str(part);
                }
            }
            if !action.is_empty() {
                action.push(',');
            }
            action.push_str(&a.action);
        }
    }
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push('…');
    }
    row.effect = effect;
    if let Some((policy, rule, _)) = first_deny {
        row.policy = policy.to_string();
        row.rule = rule.to_string();
    } else if let Some(a) = outputs.first().and_then(|o| o.actions.first()) {
        row.policy = a.policy.clone();
        row.rule = a.rule.clone();
    }
    if let [one] = resources {
        row.tool = format!("{}/{}", one.kind, one.id);
    }
    if action.len() > MAX_REASON {
        action.truncate(
            (0..=MAX_REASON)
                .rev()
                .find(|&i| action.is_char_boundary(i))
                .unwrap_or(0),
        );
    }
    row.action = action;
    row.reason = reason;
    match explain_text(&caller.principal.id, principal, resources, outputs) {
        Some(rendered) => row.explain_rendered = Some(Arc::new(rendered)),
        None => {
            row.explain = Some(explain_value(
                &caller.principal.id,
                principal,
                resources,
                outputs,
            ))
        }
    }
    row
}

/// The check row's `explain`, `{"caller", "principal", "results": [{"kind", "id", "actions":
/// {<action>: {"effect", "policy", "rule"}}}]}`, as a value: the per-row path, which the
/// audit writer scrubs and writes as canonical JSON. Taken when [`explain_text`] cannot.
fn explain_value(
    caller: &str,
    principal: &str,
    resources: &[request::Resource],
    outputs: &[CheckOutput],
) -> serde_json::Value {
    let results: Vec<serde_json::Value> = resources
        .iter()
        .zip(outputs)
        .map(|(res, out)| {
            let mut actions = Map::new();
            for a in &out.actions {
                let e = match a.effect {
                    Effect::Allow => "allow",
                    Effect::Deny => "deny",
                };
                actions.insert(
                    a.action.clone(),
                    json!({"effect": e, "policy": a.policy, "rule": a.rule}),
                );
            }
            json!({"kind": res.kind, "id": res.id, "actions": actions})
        })
        .collect();
    json!({
        "caller": caller,
        "principal": principal,
        "results": results,
    })
}

/// [`explain_value`]'s stored form written straight from the outputs: canonical JSON (keys in
/// byte order; of equal action keys the last, as a map insert keeps it), each string checked
/// against the scrubber as it is written. `None` when one would be scrubbed (or the text is
/// over the explain cap): the caller then takes the value path, which scrubs it. Saves the
/// value tree, its scrub walk and its canonical rewrite on every check (unit-tested equal).
fn explain_text(
    caller: &str,
    principal: &str,
    resources: &[request::Resource],
    outputs: &[CheckOutput],
) -> Option<RenderedExplain> {
    let n: usize = outputs.iter().map(|o| o.actions.len()).sum();
    let mut t = CleanJson::with_capacity(64 + resources.len() * 48 + n * 112);
    t.punct("{\"caller\":");
    t.str(caller);
    t.punct(",\"principal\":");
    t.str(principal);
    t.punct(",\"results\":[");
    let mut order: Vec<&eval::ActionResult> = Vec::new();
    for (i, (res, out)) in resources.iter().zip(outputs).enumerate() {
        if i > 0 {
            t.punct(",");
        }
        t.punct("{\"actions\":{");
        order.clear();
        order.extend(out.actions.iter());
        order.sort_by(|a, b| a.action.cmp(&b.action));
        let mut first = true;
        for (j, a) in order.iter().enumerate() {
            if order.get(j + 1).is_some_and(|next| next.action == a.action) {
                continue;
            }
            if !first {
                t.punct(",");
            }
            first = false;
            t.str(&a.action);
            t.punct(match a.effect {
                Effect::Allow => ":{\"effect\":\"allow\",\"policy\":",
                Effect::Deny => ":{\"effect\":\"deny\",\"policy\":",
            });
            t.str(&a.policy);
            t.punct(",\"rule\":");
            t.str(&a.rule);
            t.punct("}");
        }
        t.punct("},\"id\":");
        t.str(&res.id);
        t.punct(",\"kind\":");
        t.str(&res.kind);
        t.punct("}");
        if !t.is_clean() {
            return None;
        }
    }
    t.punct("]}");
    t.finish()
}

/// `POST /api/plan/resources`: a query plan for one resource kind (policy/plan.rs), one audit
/// row per request. A condition the planner cannot represent exactly is answered 501
/// `UNIMPLEMENTED` naming it, never with an approximate plan.
async fn plan(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    req: Request,
) -> Response {
    const METHOD: &str = "POST /api/plan/resources";
    if !gw.config.pdp.enabled {
        return disabled();
    }
    let (caller, access) = match admit(&gw, &conn, METHOD) {
        Ok(x) => x,
        Err(s) => return error(&s),
    };
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(s) => return error(&s),
    };
    let started = Instant::now();
    let mut r = match request::parse_plan(&body) {
        Ok(r) => r,
        Err(s) => return error(&s),
    };
    if access == Access::SelfOnly {
        r.principal = Some(request::Principal::from_input(&caller.principal));
    }
    let limits = &gw.config.pdp.request_limits;
    if let Err(s) = request::validate_plan(&r, limits.max_actions_per_resource) {
        return error(&s);
    }
    let (principal, aux) = match principal_and_aux(&gw, r.principal.take(), r.aux_data.as_ref()) {
        Ok(x) => x,
        Err(s) => return error(&s),
    };
    let mut resource = r.resource.take().unwrap_or_default();
    let mut actions = r.actions.clone();
    if !r.action.is_empty() && !actions.contains(&r.action) {
        actions.insert(0, r.action.clone());
    }
    let input = PlanInput {
        principal: principal.into_input(),
        resource: crate::policy::input::Resource {
            kind: resource.kind.clone(),
            id: String::new(),
            attr: std::mem::take(&mut resource.attr),
            policy_version: resource.policy_version.clone(),
            scope: resource.scope.clone(),
        },
        actions,
        aux_data: aux,
    };
    let set = gw.store.current();
    let planned = crate::policy::plan::plan(&set, &input, &gw.params());
    let elapsed = started.elapsed();
    gw.metrics.decision_latency.observe(elapsed);

    let mut row = AuditRow::new("check", &conn);
    row.method = METHOD.into();
    row.principal = Some(input.principal.id.clone());
    row.tool = resource.kind.clone();
    row.action = input.actions.join(",");
    row.policy_hash = set.hash.clone();
    row.latency_us = elapsed.as_micros().min(u64::MAX as u128) as u64;
    let via = match access {
        Access::Assert => "pdp.callers",
        _ => "self_only",
    };
    // A plan is not a decision about one resource: only an unconditional plan is an ALLOW.
    row.effect = Effect::Deny;
    match &planned {
        Ok(p) => {
            row.outcome = "answered".into();
            if p.kind == FilterKind::AlwaysAllowed {
                row.effect = Effect::Allow;
            }
            let kind = serde_json::to_value(p.kind).unwrap_or_default();
            let debug = plan::debug_string(p.kind, p.condition.as_ref());
            let mut reason = format!(
                "caller {} ({via}) asked for a plan for {} on {}: {} {}",
                caller.principal.id,
                input.principal.id,
                resource.kind,
                kind.as_str().unwrap_or_default(),
                debug
            );
            if reason.len() > MAX_REASON {
                let mut cut = MAX_REASON;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
                reason.push('…');
            }
            row.reason = reason;
            row.explain = Some(json!({
                "caller": caller.principal.id,
                "principal": input.principal.id,
                "plan": {"kind": kind, "condition": p.condition, "actions": input.actions},
            }));
        }
        Err(e) => {
            row.outcome = "error".into();
            row.reason = format!(
                "caller {} ({via}) asked for a plan for {} on {}: {e}",
                caller.principal.id, input.principal.id, resource.kind
            );
        }
    }
    let call_id = row.id.clone();
    let commit = match gw.submit(row) {
        Ok(c) => c,
        Err(e) => return error(&Status::new(code::UNAVAILABLE, e.to_string())),
    };
    if let Err(e) = commit.await {
        return error(&Status::new(code::UNAVAILABLE, e.to_string()));
    }
    let p = match planned {
        Ok(p) => p,
        Err(e) => {
            return error(&Status::new(
                code::UNIMPLEMENTED,
                format!("query planning: {e}"),
            ));
        }
    };
    let resp = response::plan(&r, &resource, &p, &call_id);
    match serde_json::to_string(&resp) {
        Ok(s) => json_ok(s),
        Err(e) => error(&Status::new(code::INTERNAL, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("a=1&service=x"), "service"), Some("x"));
        assert!(explain_requested(Some("explain=true")));
        assert!(!explain_requested(Some("explain=false")));
        assert!(!explain_requested(None));
    }

    fn act(action: &str, effect: Effect, policy: &str, rule: &str) -> eval::ActionResult {
        eval::ActionResult {
            action: action.into(),
            effect,
            policy: policy.into(),
            scope: String::new(),
            rule: rule.into(),
            reason: String::new(),
        }
    }

    fn res(kind: &str, id: &str) -> request::Resource {
        request::Resource {
            kind: kind.into(),
            id: id.into(),
            ..Default::default()
        }
    }

    fn out(actions: Vec<eval::ActionResult>) -> CheckOutput {
        CheckOutput {
            actions,
            ..Default::default()
        }
    }

    /// The explain written as text is, in every `audit.arguments` mode, byte for byte what
    /// the value path stored (the value scrubbed by `scrub_record`, canonical JSON, capped),
    /// with the digest of what is stored; a string the scrubber would change sends the row
    /// down the value path, so no secret-looking request string is stored in clear.
    #[test]
    fn explain_text_is_what_the_value_path_stored() {
        use crate::audit::Redactor;
        use crate::audit::record::{Record, canonical_json};
        use crate::config::ArgumentsMode;
        use sha2::Digest as _;
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl";
        let ghp = "ghp_0123456789abcdefghijABCDEFGHIJ";
        let p = "resource.mcp_tool.vdefault";
        // The bench's 5 × 2 shape.
        let tools = [
            "read_file",
            "search_code",
            "write_file",
            "deploy",
            "delete_repo",
        ];
        let five: Vec<request::Resource> = tools.iter().map(|t| res("mcp_tool", t)).collect();
        let five_out: Vec<CheckOutput> = tools
            .iter()
            .map(|t| {
                let call = if *t == "delete_repo" {
                    act(
                        &format!("tools/call::{t}"),
                        Effect::Deny,
                        p,
                        "deny-destructive",
                    )
                } else {
                    act(
                        &format!("tools/call::{t}"),
                        Effect::Allow,
                        p,
                        "allow-dev-tools",
                    )
                };
                out(vec![
                    act(&format!("tools/list::{t}"), Effect::Allow, p, "list"),
                    call,
                ])
            })
            .collect();
        type Case = (
            &'static str,
            String,
            Vec<request::Resource>,
            Vec<CheckOutput>,
            bool,
        );
        let cases: Vec<Case> = vec![
            ("5x2", "alice".into(), five, five_out, true),
            (
                "keys sort by bytes, escapes, unicode, a duplicate action (the last wins)",
                "bob \"the\" \\ builder\n\u{1}é".into(),
                vec![res("kïnd/\"q\"", "id\t1"), res("", "")],
                vec![
                    out(vec![
                        act("b", Effect::Allow, "p1", "r1"),
                        act("B", Effect::Deny, "p2", ""),
                        act("a", Effect::Allow, "NO_MATCH", ""),
                        act("é", Effect::Allow, "p3", "r3"),
                        act("a", Effect::Deny, "p4", "r4"),
                        act("tools/call::x", Effect::Deny, "p5", "r5"),
                    ]),
                    out(vec![]),
                ],
                true,
            ),
            ("no resources", "carol".into(), vec![], vec![], true),
            (
                "a JWT as the resource id",
                "alice".into(),
                vec![res("mcp_tool", jwt)],
                vec![out(vec![act("tools/call::x", Effect::Allow, p, "r")])],
                false,
            ),
            (
                "a token in an action (an object key)",
                "alice".into(),
                vec![res("mcp_tool", "x")],
                vec![out(vec![
                    act(&format!("tools/call::{ghp}"), Effect::Deny, p, "r"),
                    act("tools/call::a", Effect::Allow, p, "r"),
                ])],
                false,
            ),
            (
                "a bearer header as the principal",
                "Authorization: Bearer abcdefghijklmnop123".into(),
                vec![res("mcp_tool", "x")],
                vec![out(vec![act("a", Effect::Allow, p, "r")])],
                false,
            ),
            (
                "a secret-looking policy and rule",
                "alice".into(),
                vec![res("mcp_tool", "x")],
                vec![out(vec![act(
                    "a",
                    Effect::Allow,
                    "password=correcthorse",
                    ghp,
                )])],
                false,
            ),
            (
                "a large request over the explain cap",
                "alice".into(),
                (0..50).map(|i| res("mcp_tool", &format!("t{i}"))).collect(),
                (0..50)
                    .map(|i| {
                        out((0..50)
                            .map(|j| act(&format!("tools/call::{i}::{j}"), Effect::Allow, p, "r"))
                            .collect())
                    })
                    .collect(),
                false,
            ),
        ];
        for (name, principal, resources, outputs, fast) in &cases {
            let caller = "pep.example.ts.net";
            let text = explain_text(caller, principal, resources, outputs);
            assert_eq!(text.is_some(), *fast, "{name}: which path");
            for mode in [
                ArgumentsMode::None,
                ArgumentsMode::Digest,
                ArgumentsMode::Redacted,
                ArgumentsMode::Full,
            ] {
                let mut rec = Record {
                    explain: explain_value(caller, principal, resources, outputs),
                    ..Default::default()
                };
                Redactor::new(mode, &[], 4096).scrub_record(&mut rec);
                let mut old = canonical_json(&rec.explain);
                Redactor::cap_explain(&mut old);
                if let Some(r) = &text {
                    let (stored, digest) = r.stored(mode);
                    assert_eq!(stored, old, "{name} {mode:?}");
                    assert_eq!(
                        digest,
                        <[u8; 32]>::from(sha2::Sha256::digest(stored.as_bytes())),
                        "{name} {mode:?}"
                    );
                } else if mode != ArgumentsMode::Full {
                    for secret in [jwt, ghp, "abcdefghijklmnop123", "correcthorse"] {
                        assert!(!old.contains(secret), "{name} {mode:?}: {old}");
                    }
                }
            }
        }
    }
}
