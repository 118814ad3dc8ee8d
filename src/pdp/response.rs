//! The response bodies of Cerbos's check API (protojson of
//! `cerbos.response.v1.CheckResourcesResponse`), built from the engine's [`CheckOutput`]s.
//!
//! As protojson writes them: camelCase, enum names as strings, empty fields omitted, map keys
//! sorted (Go marshals maps in key order). `meta` only with `includeMeta`. Beyond Cerbos, and
//! only when asked (`?explain=true`): each result's `evaluationErrors` and explain `trace`.
//! Pure: no I/O.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::request::Resource;
use crate::policy::eval::{
    CheckOutput, EvalError, OutputEntry, Trace, ValidationError, effect_name,
};

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
