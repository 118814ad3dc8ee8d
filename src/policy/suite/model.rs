//! The suite and fixture files as written on disk (`cerbos.policy.v1.TestSuite`,
//! `TestFixture`), with unknown keys rejected, plus the checks Cerbos's proto validation does
//! (required fields, non-empty and unique lists, `principal` XOR `principals`, …).
//!
//! Field names are protojson camelCase; snake_case spellings are accepted as aliases.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::policy::input::{Principal, Resource};
use crate::policy::model::Effect;

/// `cerbos.policy.v1.TestSuite`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct SuiteDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub skip: bool,
    #[serde(default, alias = "skip_reason")]
    pub skip_reason: String,
    pub tests: Vec<TestTable>,
    #[serde(default)]
    pub principals: BTreeMap<String, Principal>,
    #[serde(default)]
    pub resources: BTreeMap<String, Resource>,
    #[serde(default, alias = "aux_data")]
    pub aux_data: BTreeMap<String, AuxData>,
    #[serde(default)]
    pub options: Option<TestOptions>,
    #[serde(default, rename = "$schema")]
    pub _schema: Option<String>,
    #[serde(default, alias = "principal_groups")]
    pub principal_groups: BTreeMap<String, PrincipalGroup>,
    #[serde(default, alias = "resource_groups")]
    pub resource_groups: BTreeMap<String, ResourceGroup>,
}

/// `cerbos.policy.v1.TestOptions` (plus our `strictEvaluation`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct TestOptions {
    /// RFC 3339; what `now()` returns.
    #[serde(default)]
    pub now: Option<String>,
    #[serde(default, alias = "lenient_scope_search")]
    pub lenient_scope_search: bool,
    #[serde(default)]
    pub globals: Map<String, Value>,
    #[serde(default, alias = "default_policy_version")]
    pub default_policy_version: String,
    #[serde(default, alias = "default_scope")]
    pub default_scope: String,
    /// `true` forces strict evaluation (a CEL error never allows) whatever the run's default.
    #[serde(default, alias = "strict_evaluation")]
    pub strict_evaluation: bool,
}

/// `cerbos.policy.v1.TestTable`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct TestTable {
    pub name: String,
    #[serde(default, rename = "description")]
    pub _description: String,
    #[serde(default)]
    pub skip: bool,
    #[serde(default, alias = "skip_reason")]
    pub skip_reason: String,
    pub input: TestInput,
    pub expected: Vec<Expectation>,
    #[serde(default)]
    pub options: Option<TestOptions>,
}

/// `cerbos.policy.v1.TestTable.Input`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct TestInput {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    pub actions: Vec<String>,
    #[serde(default, alias = "aux_data")]
    pub aux_data: String,
    #[serde(default, alias = "principal_groups")]
    pub principal_groups: Vec<String>,
    #[serde(default, alias = "resource_groups")]
    pub resource_groups: Vec<String>,
}

/// `cerbos.policy.v1.TestTable.Expectation`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Expectation {
    #[serde(default)]
    pub principal: String,
    #[serde(default)]
    pub resource: String,
    pub actions: BTreeMap<String, Effect>,
    #[serde(default)]
    pub outputs: Vec<OutputExpectations>,
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default, alias = "principal_groups")]
    pub principal_groups: Vec<String>,
    #[serde(default, alias = "resource_groups")]
    pub resource_groups: Vec<String>,
}

/// `cerbos.policy.v1.TestTable.OutputExpectations`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OutputExpectations {
    pub action: String,
    pub expected: Vec<ExpectedOutput>,
}

/// `cerbos.engine.v1.OutputEntry` as expected by a test.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExpectedOutput {
    pub src: String,
    #[serde(default)]
    pub val: Value,
}

/// `cerbos.engine.v1.AuxData`, holding already-decoded JWT claims: one token (`jwt`) or named
/// tokens (`jwts`), never both.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuxData {
    #[serde(default)]
    pub jwt: Option<Map<String, Value>>,
    #[serde(default)]
    pub jwts: Option<BTreeMap<String, NamedJwt>>,
}

/// One named token of `jwts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NamedJwt {
    #[serde(default)]
    pub claims: Map<String, Value>,
}

impl AuxData {
    /// As CEL sees it under `request.auxData`.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        if let Some(jwt) = &self.jwt {
            m.insert("jwt".into(), Value::Object(jwt.clone()));
        }
        if let Some(jwts) = &self.jwts {
            let named = jwts
                .iter()
                .map(|(k, t)| {
                    let mut c = Map::new();
                    c.insert("claims".into(), Value::Object(t.claims.clone()));
                    (k.clone(), Value::Object(c))
                })
                .collect();
            m.insert("jwts".into(), Value::Object(named));
        }
        Value::Object(m)
    }
}

/// Cerbos's check: `jwt` and `jwts` are mutually exclusive.
pub(super) fn check_aux_data(path: &str, aux: &BTreeMap<String, AuxData>) -> Check {
    for (k, a) in aux {
        if a.jwt.is_some() && a.jwts.is_some() {
            return fail(
                &format!("{path}.{k}"),
                "only one of the jwt or jwts fields may be set",
            );
        }
    }
    Ok(())
}

/// `cerbos.policy.v1.TestFixtureGroup.Principals`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PrincipalGroup {
    pub principals: Vec<String>,
}

/// `cerbos.policy.v1.TestFixtureGroup.Resources`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResourceGroup {
    pub resources: Vec<String>,
}

/// `testdata/principals.{yaml,yml,json}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PrincipalsFixture {
    #[serde(default)]
    pub principals: BTreeMap<String, Principal>,
    #[serde(default, alias = "principal_groups")]
    pub principal_groups: BTreeMap<String, PrincipalGroup>,
    #[serde(default, rename = "$schema")]
    pub _schema: Option<String>,
}

/// `testdata/resources.{yaml,yml,json}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ResourcesFixture {
    #[serde(default)]
    pub resources: BTreeMap<String, Resource>,
    #[serde(default, alias = "resource_groups")]
    pub resource_groups: BTreeMap<String, ResourceGroup>,
    #[serde(default, rename = "$schema")]
    pub _schema: Option<String>,
}

/// `testdata/auxdata.{yaml,yml,json}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AuxDataFixture {
    #[serde(default, alias = "aux_data")]
    pub aux_data: BTreeMap<String, AuxData>,
    #[serde(default, rename = "$schema")]
    pub _schema: Option<String>,
}

/// Parses an RFC 3339 instant (`options.now`).
pub(super) fn parse_now(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 timestamp: {e}"))
}

/// Accumulates the first validation error with its path.
type Check = Result<(), String>;

fn fail(path: &str, msg: impl std::fmt::Display) -> Check {
    Err(format!("{path}: {msg}"))
}

/// Non-empty items, each listed once.
fn names(path: &str, list: &[String], min_one: bool) -> Check {
    if min_one && list.is_empty() {
        return fail(path, "must list at least one value");
    }
    let mut seen = BTreeSet::new();
    for (i, n) in list.iter().enumerate() {
        if n.is_empty() {
            return fail(&format!("{path}[{i}]"), "must not be empty");
        }
        if !seen.insert(n) {
            return fail(&format!("{path}[{i}]"), format!("{n:?} is listed twice"));
        }
    }
    Ok(())
}

pub(super) fn check_principal(path: &str, p: &Principal) -> Check {
    if p.id.is_empty() {
        return fail(&format!("{path}.id"), "is required");
    }
    names(&format!("{path}.roles"), &p.roles, true)
}

pub(super) fn check_resource(path: &str, r: &Resource) -> Check {
    if r.kind.is_empty() {
        return fail(&format!("{path}.kind"), "is required");
    }
    if r.id.is_empty() {
        return fail(&format!("{path}.id"), "is required");
    }
    Ok(())
}

fn check_options(path: &str, o: &TestOptions) -> Check {
    if let Some(now) = &o.now
        && let Err(e) = parse_now(now)
    {
        return fail(&format!("{path}.now"), e);
    }
    Ok(())
}

/// The checks `validator.Validate(suite)` makes in Cerbos.
pub(super) fn check_suite(s: &SuiteDef) -> Check {
    if s.name.is_empty() {
        return fail("$.name", "is required");
    }
    if s.tests.is_empty() {
        return fail("$.tests", "a suite needs at least one test");
    }
    for (k, p) in &s.principals {
        check_principal(&format!("$.principals.{k}"), p)?;
    }
    for (k, r) in &s.resources {
        check_resource(&format!("$.resources.{k}"), r)?;
    }
    for (k, g) in &s.principal_groups {
        names(
            &format!("$.principalGroups.{k}.principals"),
            &g.principals,
            true,
        )?;
    }
    for (k, g) in &s.resource_groups {
        names(
            &format!("$.resourceGroups.{k}.resources"),
            &g.resources,
            true,
        )?;
    }
    check_aux_data("$.auxData", &s.aux_data)?;
    if let Some(o) = &s.options {
        check_options("$.options", o)?;
    }
    for (i, t) in s.tests.iter().enumerate() {
        let path = format!("$.tests[{i}]");
        if t.name.is_empty() {
            return fail(&format!("{path}.name"), "is required");
        }
        if let Some(o) = &t.options {
            check_options(&format!("{path}.options"), o)?;
        }
        let ip = format!("{path}.input");
        names(&format!("{ip}.actions"), &t.input.actions, true)?;
        names(&format!("{ip}.principals"), &t.input.principals, false)?;
        names(
            &format!("{ip}.principalGroups"),
            &t.input.principal_groups,
            false,
        )?;
        names(&format!("{ip}.resources"), &t.input.resources, false)?;
        names(
            &format!("{ip}.resourceGroups"),
            &t.input.resource_groups,
            false,
        )?;
        if t.input.principals.is_empty() && t.input.principal_groups.is_empty() {
            return fail(&ip, "principals or principalGroups must be present");
        }
        if t.input.resources.is_empty() && t.input.resource_groups.is_empty() {
            return fail(&ip, "resources or resourceGroups must be present");
        }
        if t.expected.is_empty() {
            return fail(
                &format!("{path}.expected"),
                "a test needs at least one expectation",
            );
        }
        for (j, e) in t.expected.iter().enumerate() {
            let ep = format!("{path}.expected[{j}]");
            names(&format!("{ep}.principals"), &e.principals, false)?;
            names(&format!("{ep}.principalGroups"), &e.principal_groups, false)?;
            names(&format!("{ep}.resources"), &e.resources, false)?;
            names(&format!("{ep}.resourceGroups"), &e.resource_groups, false)?;
            if e.principal.is_empty() && e.principals.is_empty() && e.principal_groups.is_empty() {
                return fail(
                    &ep,
                    "principal, principals, or principalGroups must be present",
                );
            }
            if !e.principal.is_empty() && !e.principals.is_empty() {
                return fail(&ep, "principal and principals may not both be present");
            }
            if e.resource.is_empty() && e.resources.is_empty() && e.resource_groups.is_empty() {
                return fail(
                    &ep,
                    "resource, resources, or resourceGroups must be present",
                );
            }
            if !e.resource.is_empty() && !e.resources.is_empty() {
                return fail(&ep, "resource and resources may not both be present");
            }
            if e.actions.is_empty() {
                return fail(
                    &format!("{ep}.actions"),
                    "must map at least one action to an effect",
                );
            }
            if e.actions.keys().any(String::is_empty) {
                return fail(&format!("{ep}.actions"), "an action name must not be empty");
            }
            for (k, o) in e.outputs.iter().enumerate() {
                let op = format!("{ep}.outputs[{k}]");
                if o.action.is_empty() {
                    return fail(&format!("{op}.action"), "is required");
                }
                if o.expected.is_empty() {
                    return fail(&format!("{op}.expected"), "must list at least one output");
                }
                for (m, x) in o.expected.iter().enumerate() {
                    if x.src.is_empty() {
                        return fail(&format!("{op}.expected[{m}].src"), "is required");
                    }
                }
            }
        }
    }
    Ok(())
}

/// The checks Cerbos makes on `testdata/principals.*`.
pub(super) fn check_principals_fixture(f: &PrincipalsFixture) -> Check {
    for (k, p) in &f.principals {
        check_principal(&format!("$.principals.{k}"), p)?;
    }
    for (k, g) in &f.principal_groups {
        let path = format!("$.principalGroups.{k}.principals");
        names(&path, &g.principals, true)?;
        if let Some(missing) = g.principals.iter().find(|m| !f.principals.contains_key(*m)) {
            return fail(
                &path,
                format!("missing fixture {missing:?} referenced in group {k:?}"),
            );
        }
    }
    Ok(())
}

/// The checks Cerbos makes on `testdata/resources.*`.
pub(super) fn check_resources_fixture(f: &ResourcesFixture) -> Check {
    for (k, r) in &f.resources {
        check_resource(&format!("$.resources.{k}"), r)?;
    }
    for (k, g) in &f.resource_groups {
        let path = format!("$.resourceGroups.{k}.resources");
        names(&path, &g.resources, true)?;
        if let Some(missing) = g.resources.iter().find(|m| !f.resources.contains_key(*m)) {
            return fail(
                &path,
                format!("missing fixture {missing:?} referenced in group {k:?}"),
            );
        }
    }
    Ok(())
}
