//! The request bodies of Cerbos's check and plan APIs (protojson of
//! `cerbos.request.v1.CheckResourcesRequest` / `PlanResourcesRequest`), parsed strictly and
//! validated the way Cerbos's `buf.validate` rules do, so a bad request gets the same
//! `INVALID_ARGUMENT` answer from toolgate as from Cerbos.
//!
//! camelCase names, with the proto's snake_case names accepted too (protojson accepts both);
//! unknown fields and duplicate fields are errors, as in Cerbos. Pure: no I/O.

use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::status::{FieldElement as F, Rule, Status, Violation};
use crate::policy::input;

/// `cerbos.engine.v1.Principal` as sent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Principal {
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, alias = "policy_version", deserialize_with = "nullable")]
    pub policy_version: String,
    #[serde(default, deserialize_with = "nullable")]
    pub roles: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub attr: Map<String, Value>,
    #[serde(default, deserialize_with = "nullable")]
    pub scope: String,
}

impl Principal {
    pub fn into_input(self) -> input::Principal {
        input::Principal {
            id: self.id,
            roles: self.roles,
            attr: self.attr,
            policy_version: self.policy_version,
            scope: self.scope,
        }
    }

    pub fn from_input(p: &input::Principal) -> Principal {
        Principal {
            id: p.id.clone(),
            policy_version: p.policy_version.clone(),
            roles: p.roles.clone(),
            attr: p.attr.clone(),
            scope: p.scope.clone(),
        }
    }
}

/// `cerbos.engine.v1.Resource` as sent in a check.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resource {
    #[serde(default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, alias = "policy_version", deserialize_with = "nullable")]
    pub policy_version: String,
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub attr: Map<String, Value>,
    #[serde(default, deserialize_with = "nullable")]
    pub scope: String,
}

/// One `resources[]` entry of a check.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceEntry {
    #[serde(default, deserialize_with = "nullable")]
    pub actions: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub resource: Option<Resource>,
}

/// `{token, keySetId}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Jwt {
    #[serde(default, deserialize_with = "nullable")]
    pub token: String,
    #[serde(default, alias = "key_set_id", deserialize_with = "nullable")]
    pub key_set_id: String,
}

/// `cerbos.request.v1.AuxData`: one token, or named tokens (0.55+); not both.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuxData {
    #[serde(default, deserialize_with = "nullable")]
    pub jwt: Option<Jwt>,
    #[serde(default, deserialize_with = "nullable")]
    pub jwts: Option<std::collections::BTreeMap<String, Jwt>>,
}

/// `CheckResourcesRequest`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CheckRequest {
    #[serde(default, alias = "request_id", deserialize_with = "nullable")]
    pub request_id: String,
    #[serde(default, alias = "include_meta", deserialize_with = "nullable")]
    pub include_meta: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub principal: Option<Principal>,
    #[serde(default, deserialize_with = "nullable")]
    pub resources: Vec<ResourceEntry>,
    #[serde(default, alias = "aux_data", deserialize_with = "nullable")]
    pub aux_data: Option<AuxData>,
    /// Copied into Cerbos's audit entries; accepted and ignored here.
    #[serde(default, alias = "request_context", deserialize_with = "nullable")]
    pub request_context: Option<Value>,
}

/// The resource of a plan: a kind and what is known of its attributes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PlanResource {
    #[serde(default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub attr: Map<String, Value>,
    #[serde(default, alias = "policy_version", deserialize_with = "nullable")]
    pub policy_version: String,
    #[serde(default, deserialize_with = "nullable")]
    pub scope: String,
}

/// `PlanResourcesRequest`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PlanRequest {
    #[serde(default, alias = "request_id", deserialize_with = "nullable")]
    pub request_id: String,
    /// Deprecated single action.
    #[serde(default, deserialize_with = "nullable")]
    pub action: String,
    #[serde(default, deserialize_with = "nullable")]
    pub actions: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub principal: Option<Principal>,
    #[serde(default, deserialize_with = "nullable")]
    pub resource: Option<PlanResource>,
    #[serde(default, alias = "aux_data", deserialize_with = "nullable")]
    pub aux_data: Option<AuxData>,
    #[serde(default, alias = "include_meta", deserialize_with = "nullable")]
    pub include_meta: bool,
    #[serde(default, alias = "request_context", deserialize_with = "nullable")]
    pub request_context: Option<Value>,
}

/// protojson reads `null` as the field's default (the Python SDK sends `"keySetId": null`).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The body could not be read as the request message.
fn syntax(e: serde_json::Error) -> Status {
    Status::invalid(format!("request body is not a valid request: {e}"))
}

/// Parses a check body. An empty body is an empty message (as in grpc-gateway).
pub fn parse_check(body: &[u8]) -> Result<CheckRequest, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CheckRequest::default());
    }
    serde_json::from_slice(body).map_err(syntax)
}

pub fn parse_plan(body: &[u8]) -> Result<PlanRequest, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(PlanRequest::default());
    }
    serde_json::from_slice(body).map_err(syntax)
}

const VERSION_PATTERN: &str = r"^[\w]*$";
const SCOPE_PATTERN: &str = r"^(^$|\.|[0-9a-zA-Z][\w\-]*(\.\w[\w\-]*)*)$";

static VERSION_RE: LazyLock<Option<regex::Regex>> =
    LazyLock::new(|| regex::Regex::new(VERSION_PATTERN).ok());
static SCOPE_RE: LazyLock<Option<regex::Regex>> =
    LazyLock::new(|| regex::Regex::new(SCOPE_PATTERN).ok());

fn matches(re: &LazyLock<Option<regex::Regex>>, s: &str) -> bool {
    // A pattern that failed to build rejects everything (fail closed).
    re.as_ref().is_some_and(|r| r.is_match(s))
}

/// `policyVersion` matches [`VERSION_PATTERN`]. The empty default and plain ASCII word
/// characters (a subset of `\w`) match without running the regex.
fn version_ok(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || matches(&VERSION_RE, s)
}

/// `scope` matches [`SCOPE_PATTERN`]; the empty default (the root scope) without the regex.
fn scope_ok(s: &str) -> bool {
    s.is_empty() || matches(&SCOPE_RE, s)
}

/// Collects violations in proto field order, as protovalidate reports them.
#[derive(Default)]
struct Check {
    out: Vec<Violation>,
}

impl Check {
    fn add(&mut self, path: String, field: Vec<F>, rule: Rule) {
        self.out.push(Violation::new(path, field, rule));
    }

    fn principal(&mut self, base: F, p: &Option<Principal>) {
        let Some(p) = p else {
            self.add("principal".into(), vec![base], Rule::Required);
            return;
        };
        let f = |x: F| vec![base.clone(), x];
        if p.id.is_empty() {
            self.add(
                "principal.id".into(),
                f(F::new(1, "id", "TYPE_STRING")),
                Rule::Required,
            );
        }
        if !version_ok(&p.policy_version) {
            self.add(
                "principal.policy_version".into(),
                f(F::new(2, "policy_version", "TYPE_STRING")),
                Rule::Pattern(VERSION_PATTERN),
            );
        }
        let roles = F::new(3, "roles", "TYPE_STRING");
        if p.roles.is_empty() {
            self.add("principal.roles".into(), f(roles.clone()), Rule::Required);
        } else if has_duplicates(&p.roles) {
            self.add("principal.roles".into(), f(roles.clone()), Rule::Unique);
        }
        for (i, r) in p.roles.iter().enumerate() {
            if r.is_empty() {
                self.add(
                    format!("principal.roles[{i}]"),
                    f(roles.clone().at(i)),
                    Rule::ItemMinLen,
                );
            }
        }
        self.attr("principal", &base, &p.attr);
        if !scope_ok(&p.scope) {
            self.add(
                "principal.scope".into(),
                f(F::new(5, "scope", "TYPE_STRING")),
                Rule::Pattern(SCOPE_PATTERN),
            );
        }
    }

    fn attr(&mut self, path: &str, base: &F, attr: &Map<String, Value>) {
        if attr.contains_key("") {
            let mut el = F::new(4, "attr", "TYPE_MESSAGE");
            el.key = Some(String::new());
            self.add(
                format!("{path}.attr[\"\"]"),
                vec![base.clone(), el],
                Rule::KeyMinLen,
            );
        }
    }

    fn aux(&mut self, number: u32, a: &Option<AuxData>) {
        if let Some(a) = a {
            if a.jwt.is_some() && a.jwts.as_ref().is_some_and(|m| !m.is_empty()) {
                self.add(
                    "aux_data".into(),
                    vec![F::new(number, "aux_data", "TYPE_MESSAGE")],
                    Rule::Exclusive,
                );
            }
        }
    }
}

fn has_duplicates(v: &[String]) -> bool {
    let mut seen = std::collections::HashSet::with_capacity(v.len());
    v.iter().any(|x| !seen.insert(x.as_str()))
}

/// Cerbos's `buf.validate` rules for a check request, then its request limits.
pub fn validate_check(
    r: &CheckRequest,
    max_resources: usize,
    max_actions: usize,
) -> Result<(), Status> {
    let mut c = Check::default();
    c.principal(F::new(3, "principal", "TYPE_MESSAGE"), &r.principal);
    let resources = F::new(4, "resources", "TYPE_MESSAGE");
    if r.resources.is_empty() {
        c.add("resources".into(), vec![resources.clone()], Rule::Required);
    }
    for (i, e) in r.resources.iter().enumerate() {
        let at = resources.clone().at(i);
        let actions = F::new(1, "actions", "TYPE_STRING");
        // Built only for a violation (the common request has none).
        let path = || format!("resources[{i}]");
        if e.actions.is_empty() {
            c.add(
                format!("{}.actions", path()),
                vec![at.clone(), actions.clone()],
                Rule::Required,
            );
        } else if has_duplicates(&e.actions) {
            c.add(
                format!("{}.actions", path()),
                vec![at.clone(), actions.clone()],
                Rule::Unique,
            );
        }
        for (j, a) in e.actions.iter().enumerate() {
            if a.is_empty() {
                c.add(
                    format!("{}.actions[{j}]", path()),
                    vec![at.clone(), actions.clone().at(j)],
                    Rule::ItemMinLen,
                );
            }
        }
        let res = F::new(2, "resource", "TYPE_MESSAGE");
        let Some(x) = &e.resource else {
            c.add(
                format!("{}.resource", path()),
                vec![at.clone(), res],
                Rule::Required,
            );
            continue;
        };
        let f = |el: F| vec![at.clone(), res.clone(), el];
        if x.kind.is_empty() {
            c.add(
                format!("{}.resource.kind", path()),
                f(F::new(1, "kind", "TYPE_STRING")),
                Rule::Required,
            );
        }
        if !version_ok(&x.policy_version) {
            c.add(
                format!("{}.resource.policy_version", path()),
                f(F::new(2, "policy_version", "TYPE_STRING")),
                Rule::Pattern(VERSION_PATTERN),
            );
        }
        if x.id.is_empty() {
            c.add(
                format!("{}.resource.id", path()),
                f(F::new(3, "id", "TYPE_STRING")),
                Rule::Required,
            );
        }
        if x.attr.contains_key("") {
            let mut el = F::new(4, "attr", "TYPE_MESSAGE");
            el.key = Some(String::new());
            c.add(
                format!("{}.resource.attr[\"\"]", path()),
                f(el),
                Rule::KeyMinLen,
            );
        }
        if !scope_ok(&x.scope) {
            c.add(
                format!("{}.resource.scope", path()),
                f(F::new(5, "scope", "TYPE_STRING")),
                Rule::Pattern(SCOPE_PATTERN),
            );
        }
    }
    c.aux(5, &r.aux_data);
    if !c.out.is_empty() {
        return Err(Status::violations(&c.out));
    }
    // Cerbos checks the limits after the message rules, actions first.
    for e in &r.resources {
        if e.actions.len() > max_actions {
            return Err(Status::invalid(format!(
                "number of actions ({}) exceeds configured limit ({max_actions})",
                e.actions.len()
            )));
        }
    }
    if r.resources.len() > max_resources {
        return Err(Status::invalid(format!(
            "number of resources in batch ({}) exceeds configured limit ({max_resources})",
            r.resources.len()
        )));
    }
    Ok(())
}

/// Cerbos's rules for a plan request: a principal, a resource kind, and `action` or `actions`.
pub fn validate_plan(r: &PlanRequest, max_actions: usize) -> Result<(), Status> {
    let mut c = Check::default();
    let actions = F::new(7, "actions", "TYPE_STRING");
    if has_duplicates(&r.actions) {
        c.add("actions".into(), vec![actions.clone()], Rule::Unique);
    }
    for (j, a) in r.actions.iter().enumerate() {
        if a.is_empty() {
            c.add(
                format!("actions[{j}]"),
                vec![actions.clone().at(j)],
                Rule::ItemMinLen,
            );
        }
    }
    c.principal(F::new(3, "principal", "TYPE_MESSAGE"), &r.principal);
    let res = F::new(4, "resource", "TYPE_MESSAGE");
    match &r.resource {
        None => c.add("resource".into(), vec![res], Rule::Required),
        Some(x) => {
            let f = |el: F| vec![res.clone(), el];
            if x.kind.is_empty() {
                c.add(
                    "resource.kind".into(),
                    f(F::new(1, "kind", "TYPE_STRING")),
                    Rule::Required,
                );
            }
            if !version_ok(&x.policy_version) {
                c.add(
                    "resource.policy_version".into(),
                    f(F::new(3, "policy_version", "TYPE_STRING")),
                    Rule::Pattern(VERSION_PATTERN),
                );
            }
            if !scope_ok(&x.scope) {
                c.add(
                    "resource.scope".into(),
                    f(F::new(4, "scope", "TYPE_STRING")),
                    Rule::Pattern(SCOPE_PATTERN),
                );
            }
        }
    }
    c.aux(5, &r.aux_data);
    if !c.out.is_empty() {
        return Err(Status::violations(&c.out));
    }
    if r.action.is_empty() && r.actions.is_empty() {
        return Err(Status::invalid(
            "either action or actions must be specified (actions: value is required)",
        ));
    }
    let n = r.actions.len() + usize::from(!r.action.is_empty());
    if n > max_actions {
        return Err(Status::invalid(format!(
            "number of actions ({n}) exceeds configured limit ({max_actions})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_is_accepted_and_unknown_fields_are_not() {
        let r = parse_check(br#"{"request_id":"r","include_meta":true,"principal":{"id":"a","roles":["u"],"policy_version":"v1"},"resources":[{"resource":{"kind":"k","id":"1","policy_version":"default"},"actions":["x"]}],"aux_data":{"jwt":{"token":"t","key_set_id":"ks"}}}"#);
        let r = r.unwrap_or_default();
        assert_eq!(r.request_id, "r");
        assert!(r.include_meta);
        assert_eq!(r.principal.map(|p| p.policy_version), Some("v1".into()));
        let e = parse_check(br#"{"foo":1}"#)
            .err()
            .map(|s| s.message)
            .unwrap_or_default();
        assert!(e.contains("unknown field `foo`"), "{e}");
        let e = parse_check(br#"{"principal":{"id":"a"},"principal":{"id":"b"}}"#)
            .err()
            .map(|s| s.message)
            .unwrap_or_default();
        assert!(e.contains("duplicate field"), "{e}");
    }

    #[test]
    fn validation_matches_cerbos_messages() {
        let r = parse_check(br#"{"principal":{"id":"","roles":[]},"resources":[{"resource":{"kind":"k","id":"1"},"actions":["a"]}]}"#).unwrap_or_default();
        let e = validate_check(&r, 50, 50)
            .err()
            .map(|s| s.message)
            .unwrap_or_default();
        assert_eq!(
            e,
            "validation errors:\n - principal.id: value is required\n - principal.roles: value is required"
        );
        let r = parse_check(br#"{"principal":{"id":"a","roles":["u"]},"resources":[{"resource":{"kind":"k","id":"1"},"actions":["a","b","c","d","e","f"]}]}"#).unwrap_or_default();
        let e = validate_check(&r, 3, 5)
            .err()
            .map(|s| s.message)
            .unwrap_or_default();
        assert_eq!(e, "number of actions (6) exceeds configured limit (5)");
        let r = parse_check(br#"{"principal":{"id":"a","roles":["u"]},"resources":[{"resource":{"kind":"k","id":"1","scope":"a..b"},"actions":["a","a"]}]}"#).unwrap_or_default();
        let e = validate_check(&r, 3, 5)
            .err()
            .map(|s| s.message)
            .unwrap_or_default();
        assert!(e.starts_with("validation errors:\n - resources[0].actions: repeated value must contain unique items\n - resources[0].resource.scope: does not match regex pattern"), "{e}");
    }

    /// The shortcuts that skip the regexes agree with them.
    #[test]
    fn pattern_shortcuts_agree_with_the_patterns() {
        for v in [
            "", "default", "v1", "V_2", "é", "v-1", "v.1", " ", "a b", "ü_x9",
        ] {
            assert_eq!(version_ok(v), matches(&VERSION_RE, v), "{v:?}");
        }
        for sc in [
            "", ".", "acme", "acme.eu", "a..b", ".a", "a-b.c_d", "-a", "é",
        ] {
            assert_eq!(scope_ok(sc), matches(&SCOPE_RE, sc), "{sc:?}");
        }
    }
}
