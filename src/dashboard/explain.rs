//! The Policies view's "try a decision" form: `POST /api/dashboard/explain` evaluates a
//! `tools/call` for a principal, a server's tool and arguments against the loaded snapshot and
//! answers the explain trace (the same evaluation and trace as `toolgate policy explain` and
//! the audit rows). It needs its own permission: action `explain` on resource kind
//! `toolgate_policy` (id `explain`), so seeing one's own rows does not let a viewer probe what
//! others may do. Each attempt is audited; nothing is forwarded.

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};

use crate::gateway::{Conn, Gateway};
use crate::mcp::mapping::{self, Check, Target};
use crate::policy::input::{Principal, Resource};
use crate::policy::model::Effect;
use crate::read_api::forbidden;

use super::{json_error, json_ok};

/// The resource kind and action the form is authorized by.
pub const RESOURCE_KIND: &str = "toolgate_policy";
pub const ACTION: &str = "explain";

/// The largest request body the form takes.
pub const MAX_BODY: usize = 64 * 1024;

/// What the form sends.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TryRequest {
    /// The principal to decide for (`id`, `roles`, `attr`, as in `policy explain`).
    pub principal: Principal,
    /// A server of the config (its resource kind and scope apply).
    pub server: String,
    pub tool: String,
    #[serde(default)]
    pub arguments: Option<Value>,
}

/// May `viewer` use the form? (`toolgate_policy`/`explain`.)
pub fn may_explain(gw: &Gateway, viewer: &Principal) -> bool {
    let resource = Resource {
        kind: RESOURCE_KIND.into(),
        id: ACTION.into(),
        attr: Map::new(),
        ..Default::default()
    };
    gw.decide(viewer, resource, vec![ACTION.into()])
        .effect(ACTION)
        == Effect::Allow
}

/// `POST /api/dashboard/explain` (JSON [`TryRequest`]): the decision and its trace.
pub async fn try_decision(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(caller) = conn.caller.clone() else {
        return forbidden("no verified tailnet identity");
    };
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().map(str::trim) == Some("application/json"));
    if !json_type {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the form as application/json".into(),
        );
    }
    let allowed = may_explain(&gw, &caller.principal);
    let mut row = crate::gateway::AuditRow::new("check", &conn);
    row.method = "POST /api/dashboard/explain".into();
    row.action = ACTION.into();
    row.effect = if allowed { Effect::Allow } else { Effect::Deny };
    row.outcome = if allowed { "answered" } else { "denied" }.into();
    row.reason = if allowed {
        "try a decision: policy toolgate_policy/explain allows it".into()
    } else {
        "try a decision: policy toolgate_policy/explain does not allow this viewer".into()
    };
    row.policy_hash = gw.store.current().hash.clone();
    if gw.submit(row).is_err() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "audit unavailable".into());
    }
    if !allowed {
        return forbidden("policy toolgate_policy/explain does not allow you to try decisions");
    }
    if body.len() > MAX_BODY {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the form is limited to {MAX_BODY} bytes"),
        );
    }
    let req: TryRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("the form: {e}")),
    };
    let Some(server) = gw.config.servers.get(&req.server) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            format!("server {:?} is not in the config", req.server),
        );
    };
    if !matches!(req.arguments, None | Some(Value::Null | Value::Object(_))) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "arguments must be a JSON object".into(),
        );
    }
    let target = Target {
        server: req.server.clone(),
        resource_kind: server.resource_kind.clone(),
        scope: server.scope.clone(),
    };
    let check = Check {
        action: format!("tools/call::{}", req.tool),
        name: Some(req.tool.clone()),
        takes_arguments: true,
    };
    let mut resource = mapping::resource(&target, "tools/call", &check, None);
    mapping::lend_arguments(&mut resource, req.arguments);
    let d = gw.decide(&req.principal, resource.clone(), vec![check.action.clone()]);
    json_ok(&json!({
        "action": check.action,
        "effect": match d.effect(&check.action) {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        },
        "result": d.result(&check.action),
        "principal": req.principal,
        "resource": resource,
        "trace": d.output.trace,
        "evaluation_errors": d.output.evaluation_errors,
        "validation_errors": d.output.validation_errors,
        "policy_hash": d.policy_hash,
    }))
}
