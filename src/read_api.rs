//! The shared pieces of the HTTP read APIs (`/api/audit` in [`crate::server`] and the
//! dashboard): who may read which audit row (and which rows a reader may read at all, to
//! narrow a query to an index), the query-string decoding, and the 403 answer. Both APIs sit
//! above this module, so neither imports the other.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use crate::gateway::Gateway;
use crate::mcp::jsonrpc::{self, code};

/// May `principal` read `row`? The `toolgate_audit`/`read` policy, with `R.attr.principal`,
/// `R.attr.node` and `R.attr.server` from the row. Every reader of rows over HTTP
/// (`/api/audit`, the dashboard's stream) asks this per row, so rows a viewer may not see never
/// leave the daemon.
pub(crate) fn may_read(
    gw: &Gateway,
    principal: &crate::policy::input::Principal,
    row: &crate::audit::record::Row,
) -> bool {
    let mut attr = serde_json::Map::new();
    attr.insert("principal".into(), row.principal.clone().into());
    attr.insert("node".into(), row.node.clone().into());
    attr.insert("server".into(), row.server.clone().into());
    let resource = crate::policy::input::Resource {
        kind: "toolgate_audit".into(),
        id: row.id.clone(),
        attr,
        ..Default::default()
    };
    gw.decide(principal, resource, vec!["read".into()])
        .effect("read")
        == crate::policy::model::Effect::Allow
}

/// Which audit rows a viewer may read, as far as a query can use it ([`readable`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readable {
    /// Every row (an admin, an auditor).
    All,
    /// None.
    Nothing,
    /// Exactly the rows whose principal is this one (the `read_own` rule): a query may go
    /// straight to the (principal, time) index instead of reading everyone's rows.
    Principal(String),
    /// Some other condition: read the rows and ask [`may_read`] of each.
    Unknown,
}

/// Which rows `viewer` may read under the `toolgate_audit`/`read` policy, from its query plan
/// (the planner is exact or refuses: a plan it cannot represent is [`Readable::Unknown`]). Only
/// a narrowing: the rows a query returns are still each checked with [`may_read`].
pub(crate) fn readable(gw: &Gateway, viewer: &crate::policy::input::Principal) -> Readable {
    readable_in(&gw.store.current(), viewer, &gw.params())
}

/// [`readable`] under the policy set `set`.
fn readable_in(
    set: &crate::policy::compile::PolicySet,
    viewer: &crate::policy::input::Principal,
    params: &crate::policy::input::Params,
) -> Readable {
    let input = crate::policy::plan::PlanInput {
        principal: viewer.clone(),
        resource: crate::policy::input::Resource {
            kind: "toolgate_audit".into(),
            ..Default::default()
        },
        actions: vec!["read".into()],
        ..Default::default()
    };
    readable_from(crate::policy::plan::plan(set, &input, params))
}

/// [`readable`] from the plan.
fn readable_from(
    plan: Result<crate::policy::plan::PlanOutput, crate::policy::plan::PlanError>,
) -> Readable {
    use crate::policy::plan::{FilterKind, Operand};
    let Ok(plan) = plan else {
        return Readable::Unknown;
    };
    match plan.kind {
        FilterKind::AlwaysAllowed => Readable::All,
        FilterKind::AlwaysDenied => Readable::Nothing,
        FilterKind::Conditional => {
            let Some(Operand::Expression(e)) = plan.condition else {
                return Readable::Unknown;
            };
            match (e.operator.as_str(), e.operands.as_slice()) {
                (
                    "eq",
                    [
                        Operand::Variable(v),
                        Operand::Value(serde_json::Value::String(p)),
                    ],
                )
                | (
                    "eq",
                    [
                        Operand::Value(serde_json::Value::String(p)),
                        Operand::Variable(v),
                    ],
                ) if v == "request.resource.attr.principal" => Readable::Principal(p.clone()),
                _ => Readable::Unknown,
            }
        }
    }
}

/// May the viewer read every audit row (an admin, an auditor)? Decided by the
/// `toolgate_audit`/`read` policy's query plan being unconditional ([`Readable::All`]), never
/// by a role name. Such a viewer's dashboard aggregates come from the writer's rollups.
pub(crate) fn reads_every_row(gw: &Gateway, viewer: &crate::policy::input::Principal) -> bool {
    readable(gw, viewer) == Readable::All
}

/// `application/x-www-form-urlencoded` query pairs, decoded by the WHATWG URL standard's
/// parser (the `url` crate's): `+` is a space, `%XX` a byte, and a `%` not followed by two hex
/// digits stays literal (`%+A` is `%`, ` `, `A`, never a byte made from `+A`).
pub(crate) fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub(crate) fn forbidden(msg: &str) -> Response {
    let body = jsonrpc::error_body(None, code::UNIDENTIFIED, &format!("forbidden: {msg}"), None);
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::plan::{Expression, FilterKind, Operand, PlanError, PlanOutput};
    use serde_json::json;

    fn plan(kind: FilterKind, condition: Option<Operand>) -> Result<PlanOutput, PlanError> {
        Ok(PlanOutput {
            kind,
            condition,
            filter_debug: String::new(),
            matched_scopes: Default::default(),
            validation_errors: Vec::new(),
        })
    }

    fn op(operator: &str, operands: Vec<Operand>) -> Option<Operand> {
        Some(Operand::Expression(Expression {
            operator: operator.into(),
            operands,
        }))
    }

    #[test]
    fn only_an_exact_own_rows_plan_narrows_to_a_principal() {
        let var = || Operand::Variable("request.resource.attr.principal".into());
        let alice = || Operand::Value(json!("alice@example.com"));
        let own = Readable::Principal("alice@example.com".into());
        assert_eq!(
            readable_from(plan(FilterKind::AlwaysAllowed, None)),
            Readable::All
        );
        assert_eq!(
            readable_from(plan(FilterKind::AlwaysDenied, None)),
            Readable::Nothing
        );
        let c = FilterKind::Conditional;
        assert_eq!(readable_from(plan(c, op("eq", vec![var(), alice()]))), own);
        assert_eq!(readable_from(plan(c, op("eq", vec![alice(), var()]))), own);
        // Anything else is read row by row.
        let node = Operand::Variable("request.resource.attr.node".into());
        for cond in [
            op("eq", vec![node, alice()]),
            op("ne", vec![var(), alice()]),
            op("eq", vec![var(), Operand::Value(json!(7))]),
            op("or", vec![op("eq", vec![var(), alice()]).unwrap(), var()]),
            None,
        ] {
            assert_eq!(readable_from(plan(c, cond)), Readable::Unknown);
        }
        assert_eq!(readable_from(Err(PlanError("x".into()))), Readable::Unknown);
    }

    /// The shipped policies/: a user reads the (principal, time) index, an admin everything.
    #[test]
    fn the_shipped_read_policy_narrows_users_to_their_rows() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let set = crate::policy::store::load_dir(&dir).unwrap();
        let params = crate::policy::input::Params::default();
        let who = |id: &str, roles: &[&str]| crate::policy::input::Principal {
            id: id.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(
            readable_in(
                &set,
                &who("alice@example.com", &["user", "developer"]),
                &params
            ),
            Readable::Principal("alice@example.com".into())
        );
        assert_eq!(
            readable_in(&set, &who("carol@example.com", &["user", "admin"]), &params),
            Readable::All
        );
        assert_eq!(
            readable_in(&set, &who("x", &["nobody"]), &params),
            Readable::Nothing
        );
    }
}
