//! The response bodies of Cerbos's check and plan APIs (protojson of
//! `cerbos.response.v1.CheckResourcesResponse` and `PlanResourcesResponse`), built from the engine's [`CheckOutput`]s.
//!
//! As protojson writes them: camelCase, enum names as strings, empty fields omitted, map keys
//! sorted (Go marshals maps in key order). `meta` only with `includeMeta`. Beyond Cerbos, and
//! only when asked (`?explain=true`): each result's `evaluationErrors` and explain `trace`.
//! Pure: no I/O.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::request::{PlanRequest, PlanResource, Resource};
use crate::policy::eval::{
    CheckOutput, EvalError, OutputEntry, Trace, ValidationError, effect_name,
};
use crate::policy::plan::{FilterKind, Operand, PlanOutput};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckResponse<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    pub request_id: &'a str,
    pub results: Vec<ResultEntry<'a>>,
    pub cerbos_call_id: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceEcho<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub policy_version: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub scope: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionMeta<'a> {
    pub matched_policy: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub matched_scope: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta<'a> {
    pub actions: BTreeMap<&'a str, ActionMeta<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effective_derived_roles: Vec<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Output<'a> {
    pub src: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val: Option<&'a Value>,
    pub action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultEntry<'a> {
    pub resource: ResourceEcho<'a>,
    pub actions: BTreeMap<&'a str, &'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub validation_errors: Vec<&'a ValidationError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<Output<'a>>,
    /// toolgate only, with `?explain=true`: CEL errors met while deciding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation_errors: Option<&'a [EvalError]>,
    /// toolgate only, with `?explain=true`: every policy, scope and rule consulted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<&'a Trace>,
}

fn output(o: &OutputEntry) -> Output<'_> {
    Output {
        src: &o.src,
        val: o.val.as_ref(),
        action: &o.action,
        error: o.error.as_deref(),
    }
}

/// One result: the resource echoed, each action's effect, and what was asked for besides.
pub fn result<'a>(
    resource: &'a Resource,
    out: &'a CheckOutput,
    include_meta: bool,
    explain: bool,
) -> ResultEntry<'a> {
    let actions = out
        .actions
        .iter()
        .map(|a| (a.action.as_str(), effect_name(a.effect)))
        .collect();
    let meta = include_meta.then(|| {
        // In the engine's order, which is Cerbos's (its SDKs keep it; Cerbos does not sort).
        let mut roles: Vec<&str> = Vec::with_capacity(out.effective_derived_roles.len());
        for r in &out.effective_derived_roles {
            if !roles.contains(&r.as_str()) {
                roles.push(r);
            }
        }
        Meta {
            actions: out
                .actions
                .iter()
                .map(|a| {
                    (
                        a.action.as_str(),
                        ActionMeta {
                            matched_policy: &a.policy,
                            matched_scope: &a.scope,
                        },
                    )
                })
                .collect(),
            effective_derived_roles: roles,
        }
    });
    ResultEntry {
        resource: ResourceEcho {
            id: &resource.id,
            kind: &resource.kind,
            policy_version: &resource.policy_version,
            scope: &resource.scope,
        },
        actions,
        validation_errors: out.validation_errors.iter().collect(),
        meta,
        outputs: out.outputs.iter().map(output).collect(),
        evaluation_errors: explain.then_some(out.evaluation_errors.as_slice()),
        trace: explain.then_some(&out.trace),
    }
}

/// `cerbos.response.v1.PlanResourcesResponse`, as protojson writes it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanResponse<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    pub request_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub action: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub actions: &'a [String],
    #[serde(skip_serializing_if = "str::is_empty")]
    pub resource_kind: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub policy_version: &'a str,
    pub filter: PlanFilter<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<PlanMeta<'a>>,
    #[serde(skip_serializing_if = "<[ValidationError]>::is_empty")]
    pub validation_errors: &'a [ValidationError],
    pub cerbos_call_id: &'a str,
}

#[derive(Debug, Serialize)]
pub struct PlanFilter<'a> {
    pub kind: FilterKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<&'a Operand>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanMeta<'a> {
    pub filter_debug: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub matched_scopes: &'a BTreeMap<String, String>,
}

static NO_SCOPES: BTreeMap<String, String> = BTreeMap::new();

/// The plan answer: the request's echo, the filter, and `meta` with `includeMeta`.
pub fn plan<'a>(
    r: &'a PlanRequest,
    resource: &'a PlanResource,
    p: &'a PlanOutput,
    call_id: &'a str,
) -> PlanResponse<'a> {
    PlanResponse {
        request_id: &r.request_id,
        action: &r.action,
        actions: &r.actions,
        resource_kind: &resource.kind,
        policy_version: &resource.policy_version,
        filter: PlanFilter {
            kind: p.kind,
            condition: p.condition.as_ref(),
        },
        meta: r.include_meta.then_some(PlanMeta {
            filter_debug: &p.filter_debug,
            // Cerbos 0.55 reports them for `actions` only, not for the deprecated `action`.
            matched_scopes: if r.actions.is_empty() {
                &NO_SCOPES
            } else {
                &p.matched_scopes
            },
        }),
        validation_errors: &p.validation_errors,
        cerbos_call_id: call_id,
    }
}
