//! Query planning (Cerbos `PlanResources`, reference: cerbos.md §2.3): for a principal, a
//! resource kind and actions, whether the principal may act on *every* resource of the kind
//! (`KIND_ALWAYS_ALLOWED`), on none (`KIND_ALWAYS_DENIED`), or on those matching a condition
//! over the resource's unknown attributes (`KIND_CONDITIONAL`, with Cerbos's operand tree).
//!
//! Conditions are evaluated partially: whatever does not read the resource's unknown fields
//! (`R.id`, `R.attr.x` for an `x` the request did not give) is evaluated with the ordinary CEL
//! interpreter; what does is kept as a residual tree of `eq`, `ne`, `lt`, `le`, `gt`, `ge`,
//! `in`, `and`, `or`, `not` and arithmetic. The rows are combined as Cerbos 0.55's planner
//! combines them: per role, the ALLOWs of every scope in the chain OR-ed and the DENYs OR-ed;
//! across roles the ALLOWs OR-ed, and the DENYs inverted and AND-ed on top; then the principal
//! policy's rows the same way; and the per-action filters AND-ed.
//!
//! INVARIANT: a construct the planner cannot represent exactly (a function over an unknown
//! attribute, a comprehension, `has` on the resource, custom roles, ...) is a [`PlanError`],
//! never an approximate plan. Pure: no I/O.

use std::collections::BTreeMap;
use std::sync::Arc;

use cel::common::ast::{Expr as Ast, IdedExpr, operators};
use serde::Serialize;
use serde_json::{Map, Value};

use super::cel::{EvalCtx, Request, Variables};
use super::compile::{Cond, Policy, PolicySet};
use super::eval::{Source, ValidationError};
use super::glob::Glob;
use super::input::{Params, Principal, Resource};
use super::model::{Effect, ScopePermissions};

/// `meta.filterDebug` when no policy matched.
pub const NO_MATCH: &str = "NO_MATCH";

/// What a plan request asks (Cerbos `PlanResourcesInput`).
#[derive(Debug, Clone, Default)]
pub struct PlanInput {
    pub principal: Principal,
    /// `kind`, `policy_version`, `scope` and the attributes known in advance (`id` is unknown).
    pub resource: Resource,
    pub actions: Vec<String>,
    pub aux_data: Value,
}

/// One operand of the filter (Cerbos `PlanResourcesFilter.Expression.Operand`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Operand {
    Value(Value),
    Variable(String),
    Expression(Expression),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expression {
    pub operator: String,
    pub operands: Vec<Operand>,
}

fn expr(operator: &str, operands: Vec<Operand>) -> Operand {
    Operand::Expression(Expression {
        operator: operator.to_string(),
        operands,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FilterKind {
    #[serde(rename = "KIND_ALWAYS_ALLOWED")]
    AlwaysAllowed,
    #[serde(rename = "KIND_ALWAYS_DENIED")]
    AlwaysDenied,
    #[serde(rename = "KIND_CONDITIONAL")]
    Conditional,
}

/// The plan (Cerbos `PlanResourcesOutput`).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOutput {
    pub kind: FilterKind,
    /// Present for [`FilterKind::Conditional`] only.
    pub condition: Option<Operand>,
    /// Cerbos's `meta.filterDebug`: the filter as an s-expression, or `NO_MATCH`.
    pub filter_debug: String,
    /// Action → the scope whose rows decided it ("" for the root).
    pub matched_scopes: BTreeMap<String, String>,
    pub validation_errors: Vec<ValidationError>,
}

/// A condition the planner cannot turn into an exact filter, or a request it cannot plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError(pub String);

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlanError {}

/// Why planning one action stopped.
#[derive(Debug)]
enum Stop {
    Plan(PlanError),
    /// Strict evaluation: a condition failed to evaluate; the action is denied, as Cerbos
    /// 0.55 answers it (`KIND_ALWAYS_DENIED`).
    Eval,
}

impl From<PlanError> for Stop {
    fn from(e: PlanError) -> Stop {
        Stop::Plan(e)
    }
}

/// A plan node before conversion (Cerbos's `PlanResourcesAst.Node`).
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Leaf(Operand),
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
}

fn const_node(b: bool) -> Node {
    Node::Leaf(Operand::Value(Value::Bool(b)))
}

fn const_bool(n: &Node) -> Option<bool> {
    match n {
        Node::Leaf(Operand::Value(Value::Bool(b))) => Some(*b),
        _ => None,
    }
}

fn dedup(nodes: Vec<Node>) -> Vec<Node> {
    let mut out: Vec<Node> = Vec::with_capacity(nodes.len());
    for n in nodes {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

fn or_node(nodes: Vec<Node>) -> Option<Node> {
    let mut nodes = dedup(nodes);
    match nodes.len() {
        0 => None,
        1 => nodes.pop(),
        _ => Some(Node::Or(nodes)),
    }
}

fn and_node(nodes: Vec<Node>) -> Option<Node> {
    let mut nodes = dedup(nodes);
    match nodes.len() {
        0 => None,
        1 => nodes.pop(),
        _ => Some(Node::And(nodes)),
    }
}

/// `curr OR next`, either possibly absent.
fn add_or(curr: Option<Node>, next: Option<Node>) -> Option<Node> {
    match (curr, next) {
        (c, None) => c,
        (None, n) => n,
        (Some(c), Some(n)) => or_node(vec![c, n]),
    }
}

fn invert(n: Node) -> Node {
    match n {
        Node::Not(inner) => *inner,
        other => Node::Not(Box::new(other)),
    }
}

/// Plans `input` against `set`.
pub fn plan(set: &PolicySet, input: &PlanInput, params: &Params) -> Result<PlanOutput, PlanError> {
    let request = Request {
        principal: &input.principal,
        resource: &input.resource,
        aux_data: &input.aux_data,
        now: params.now,
        globals: &params.globals,
        clock_read: Default::default(),
    };
    Planner {
        set,
        input,
        params,
        request: &request,
    }
    .run()
}

struct Planner<'a> {
    set: &'a PolicySet,
    input: &'a PlanInput,
    params: &'a Params,
    request: &'a Request<'a>,
}

/// Cerbos's scope normalisation: empty → the default scope, then one leading `.` stripped.
fn normalise_scope<'a>(scope: &'a str, default: &'a str) -> &'a str {
    let s = if scope.is_empty() { default } else { scope };
    s.strip_prefix('.').unwrap_or(s)
}

fn walk_scopes(
    requested: &str,
    existing: &std::collections::BTreeSet<String>,
    lenient: bool,
) -> Vec<String> {
    if !lenient && !existing.contains(requested) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut s = requested;
    loop {
        if existing.contains(s) {
            out.push(s.to_string());
        }
        if s.is_empty() {
            break;
        }
        s = s.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
    }
    out
}

/// One row met while planning one action: its effect and its condition.
struct Row {
    effect: Effect,
    node: Node,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Resource,
    Principal,
}

impl<'a> Planner<'a> {
    fn run(&self) -> Result<PlanOutput, PlanError> {
        let p = &self.input.principal;
        let r = &self.input.resource;
        let default_version = &self.params.default_policy_version;
        let r_version = if r.policy_version.is_empty() {
            default_version.clone()
        } else {
            r.policy_version.clone()
        };
        let p_scope = normalise_scope(&p.scope, &self.params.default_scope).to_string();
        let r_scope = normalise_scope(&r.scope, &self.params.default_scope).to_string();
        let lenient = self.params.lenient_scope_search;

        let principal_chain: Vec<Arc<Policy>> = {
            let rules_of = self.set.principals.get(&(p.id.clone(), r_version.clone()));
            walk_scopes(&p_scope, &self.set.principal_scopes, lenient)
                .iter()
                .filter_map(|s| rules_of.and_then(|b| b.get(s)).cloned())
                .collect()
        };
        let resource_chain: Vec<Arc<Policy>> = {
            let by_kind = self.set.resources.get(&(r.kind.clone(), r_version.clone()));
            walk_scopes(&r_scope, &self.set.resource_scopes, lenient)
                .iter()
                .filter_map(|s| by_kind.and_then(|b| b.get(s)).cloned())
                .collect()
        };
        // Custom roles (role policies) add constraint rows this planner does not produce:
        // refuse rather than plan without them.
        let all_roles: Vec<&String> = p.roles.iter().collect();
        for role in &all_roles {
            let custom = self
                .set
                .roles
                .iter()
                .any(|((name, v), _)| name == *role && *v == r_version);
            let parents = self.set.role_parents.keys().any(|(name, _)| name == *role);
            if custom || parents {
                return Err(PlanError(format!(
                    "query planning does not support custom roles yet: {role:?} has a role policy"
                )));
            }
        }

        let mut out = PlanOutput {
            kind: FilterKind::AlwaysDenied,
            condition: None,
            filter_debug: NO_MATCH.to_string(),
            matched_scopes: BTreeMap::new(),
            validation_errors: Vec::new(),
        };
        if principal_chain.is_empty() && resource_chain.is_empty() {
            return Ok(out);
        }
        if let Some(rejected) = self.validate(&r_version, &mut out.validation_errors) {
            if rejected {
                out.filter_debug = "(false)".to_string();
                return Ok(out);
            }
        }

        let mut policy_match = false;
        let mut filters: Vec<(FilterKind, Option<Operand>)> = Vec::new();
        for action in &self.input.actions {
            out.matched_scopes.insert(action.clone(), String::new());
            let mut root: Option<Node> = None;
            let mut has_allow = false;
            let mut failed = false;
            for pass in [Pass::Resource, Pass::Principal] {
                let chain = match pass {
                    Pass::Resource => &resource_chain,
                    Pass::Principal => &principal_chain,
                };
                let (allow, deny) = match self.pass(pass, action, chain, &mut out.matched_scopes) {
                    Ok(x) => x,
                    Err(Stop::Plan(e)) => return Err(e),
                    Err(Stop::Eval) => {
                        failed = true;
                        break;
                    }
                };
                if let Some(a) = allow {
                    has_allow = true;
                    root = Some(match root {
                        None => a,
                        Some(r) => or_node(vec![a, r]).unwrap_or_else(|| const_node(false)),
                    });
                }
                if let Some(d) = deny {
                    let inv = invert(d);
                    root = Some(match root {
                        None => inv,
                        Some(r) => and_node(vec![inv, r]).unwrap_or_else(|| const_node(true)),
                    });
                }
            }
            let node = match root {
                _ if failed => {
                    policy_match = true;
                    const_node(false)
                }
                Some(n) => {
                    policy_match = true;
                    if has_allow { n } else { const_node(false) }
                }
                None => const_node(false),
            };
            filters.push(to_filter(node));
        }
        let (kind, condition, debug) = merge_with_and(filters);
        out.kind = kind;
        out.condition = condition;
        out.filter_debug = if policy_match {
            debug
        } else {
            NO_MATCH.to_string()
        };
        Ok(out)
    }

    /// One pass (resource or principal policies) for one action: its ALLOW node and its DENY
    /// node (each absent when no row of that effect was met).
    fn pass(
        &self,
        pass: Pass,
        action: &str,
        chain: &[Arc<Policy>],
        matched: &mut BTreeMap<String, String>,
    ) -> Result<(Option<Node>, Option<Node>), Stop> {
        let mut type_allow: Option<Node> = None;
        let mut type_deny: Option<Node> = None;
        let roles: Vec<&String> = match pass {
            // Principal rules are role-agnostic: one pass covers them.
            Pass::Principal => self.input.principal.roles.iter().take(1).collect(),
            Pass::Resource => self.input.principal.roles.iter().collect(),
        };
        // Derived roles are evaluated once per scope, over all the principal's roles.
        let mut derived_cache: BTreeMap<String, Vec<(String, Node)>> = BTreeMap::new();
        for role in roles {
            let mut role_allow: Option<Node> = None;
            let mut role_deny: Option<Node> = None;
            let mut pending = false;
            for policy in chain {
                let rows = match pass {
                    Pass::Principal => self.principal_rows(action, policy)?,
                    Pass::Resource => {
                        if !derived_cache.contains_key(&policy.scope) {
                            let d = self.derived_roles(policy)?;
                            derived_cache.insert(policy.scope.clone(), d);
                        }
                        let derived = derived_cache
                            .get(&policy.scope)
                            .map(Vec::as_slice)
                            .unwrap_or_default();
                        self.resource_rows(action, role, policy, derived)?
                    }
                };
                let mut scope_allow: Option<Node> = None;
                let mut scope_deny: Option<Node> = None;
                for row in rows {
                    match row.effect {
                        Effect::Allow => scope_allow = add_or(scope_allow, Some(row.node)),
                        Effect::Deny => {
                            if const_bool(&row.node) == Some(false) {
                                continue;
                            }
                            scope_deny = add_or(scope_deny, Some(row.node));
                        }
                    }
                }
                let decided = scope_allow.is_some() || scope_deny.is_some();
                role_deny = add_or(role_deny, scope_deny);
                if let Some(sa) = scope_allow {
                    role_allow = match role_allow {
                        None => Some(sa),
                        Some(ra) if pending => {
                            pending = false;
                            and_node(vec![ra, sa])
                        }
                        Some(ra) => or_node(vec![ra, sa]),
                    };
                    if policy.scope_permissions == ScopePermissions::RequireParentalConsentForAllows
                    {
                        pending = true;
                    }
                }
                if decided && policy.scope_permissions == ScopePermissions::OverrideParent {
                    matched.insert(action.to_string(), policy.scope.clone());
                }
            }
            if pending {
                role_allow = None;
            }
            if role_deny.as_ref().and_then(const_bool) == Some(true) {
                // A certain DENY for this role: it allows nothing, but other roles still may.
                role_allow = Some(const_node(false));
                role_deny = None;
            } else if role_deny.is_none() && role_allow.as_ref().and_then(const_bool) == Some(true)
            {
                return Ok((role_allow, None));
            }
            type_allow = add_or(type_allow, role_allow);
            type_deny = add_or(type_deny, role_deny);
        }
        Ok((type_allow, type_deny))
    }

    fn principal_rows(&self, action: &str, policy: &Arc<Policy>) -> Result<Vec<Row>, Stop> {
        let kind = &self.input.resource.kind;
        let mut rows = Vec::new();
        for rule in &policy.rules {
            let resource_ok = rule.resource.as_ref().is_some_and(|g| g.matches(kind));
            if !resource_ok || !rule.actions.iter().any(|g| g.matches(action)) {
                continue;
            }
            let node = self.condition(
                rule.condition.as_ref(),
                (action, &policy.constants, &policy.variables),
            )?;
            rows.push(Row {
                effect: rule.effect,
                node,
            });
        }
        Ok(rows)
    }

    /// The rows of one resource policy for one role: each rule the role meets directly, then
    /// once per derived role of the rule whose parent roles include it (the rule's condition
    /// AND the derived role's).
    fn resource_rows(
        &self,
        action: &str,
        role: &str,
        policy: &Arc<Policy>,
        derived: &[(String, Node)],
    ) -> Result<Vec<Row>, Stop> {
        let matches_role = |globs: &[Glob]| globs.iter().any(|g| g.matches(role));
        let mut rows = Vec::new();
        for rule in &policy.rules {
            if !rule.actions.iter().any(|g| g.matches(action)) {
                continue;
            }
            let by_role = matches_role(&rule.roles);
            let by_derived: Vec<&(String, Node)> = rule
                .derived_roles
                .iter()
                .filter(|name| {
                    policy
                        .derived_roles
                        .iter()
                        .any(|dr| &dr.name == *name && matches_role(&dr.parent_roles))
                })
                .filter_map(|name| derived.iter().find(|(n, _)| n == name))
                .collect();
            if !by_role && by_derived.is_empty() {
                continue;
            }
            let node = self.condition(
                rule.condition.as_ref(),
                (action, &policy.constants, &policy.variables),
            )?;
            if by_role {
                rows.push(Row {
                    effect: rule.effect,
                    node: node.clone(),
                });
            }
            for (name, dr_node) in by_derived {
                let has_condition = policy
                    .derived_roles
                    .iter()
                    .any(|dr| &dr.name == name && dr.condition.is_some());
                let row_node = match (&rule.condition, has_condition) {
                    (_, false) => node.clone(),
                    (None, true) => dr_node.clone(),
                    (Some(_), true) => Node::And(vec![node.clone(), dr_node.clone()]),
                };
                rows.push(Row {
                    effect: rule.effect,
                    node: row_node,
                });
            }
        }
        Ok(rows)
    }

    /// The conditions of the derived roles that `policy` imports and whose parent roles meet
    /// any of the principal's roles.
    fn derived_roles(&self, policy: &Arc<Policy>) -> Result<Vec<(String, Node)>, Stop> {
        let roles = &self.input.principal.roles;
        let mut out = Vec::new();
        for dr in &policy.derived_roles {
            if !dr
                .parent_roles
                .iter()
                .any(|g| roles.iter().any(|r| g.matches(r)))
            {
                continue;
            }
            let node = self.condition(dr.condition.as_ref(), ("", &dr.constants, &dr.variables))?;
            out.push((dr.name.clone(), node));
        }
        Ok(out)
    }

    fn condition(
        &self,
        cond: Option<&Cond>,
        (action, constants, variables): (&str, &Arc<Map<String, Value>>, &Variables),
    ) -> Result<Node, Stop> {
        let Some(cond) = cond else {
            return Ok(const_node(true));
        };
        let ctx = EvalCtx {
            env: &self.set.env,
            request: self.request,
            action,
            constants,
            variables,
            effective_derived_roles: &[],
            derived_roles_error: None,
        };
        let strict = self.params.evaluation == super::input::Evaluation::Strict;
        cond_node(cond, &ctx, &self.input.resource.attr, strict)
    }

    /// Schema validation as check does it. `Some(true)` when the request is rejected.
    fn validate(&self, r_version: &str, errors: &mut Vec<ValidationError>) -> Option<bool> {
        use super::input::SchemaEnforcement;
        let enforcement = self.params.schema_enforcement;
        if enforcement == SchemaEnforcement::None {
            return None;
        }
        let r = &self.input.resource;
        let base = self
            .set
            .resources
            .get(&(r.kind.clone(), r_version.to_string()))
            .and_then(|b| b.get(""))?;
        let mut any = false;
        for (schema, attr, source) in [
            (
                base.principal_schema.as_ref(),
                &self.input.principal.attr,
                Source::Principal,
            ),
            (
                base.resource_schema.as_ref(),
                &self.input.resource.attr,
                Source::Resource,
            ),
        ] {
            let Some(schema) = schema else { continue };
            let instance = Value::Object(attr.clone());
            for e in schema.validator.iter_errors(&instance) {
                any = true;
                errors.push(ValidationError {
                    path: e.instance_path().to_string(),
                    message: e.to_string(),
                    source,
                });
            }
        }
        Some(any && enforcement == SchemaEnforcement::Reject)
    }
}

/// A condition tree → a node, folding constants as Cerbos does.
fn cond_node(
    cond: &Cond,
    ctx: &EvalCtx<'_>,
    known: &Map<String, Value>,
    strict: bool,
) -> Result<Node, Stop> {
    match cond {
        Cond::Expr(e) => {
            let pe = Partial {
                ctx,
                known,
                depth: 0,
            };
            match pe.eval(e.ast()) {
                Ok(Part::Known(Value::Bool(b))) => Ok(const_node(b)),
                // A non-boolean: false, as Cerbos.
                Ok(Part::Known(_)) => Ok(const_node(false)),
                Ok(Part::Residual(op)) => Ok(Node::Leaf(op)),
                // Strict evaluation denies the action; lenient reads a failed condition as
                // false, as Cerbos does, but has no exact form for a failed part of a residual.
                Err(Fail::Eval(_) | Fail::Mixed(_)) if strict => Err(Stop::Eval),
                Err(Fail::Eval(_)) => Ok(const_node(false)),
                Err(Fail::Mixed(m)) => Err(Stop::Plan(PlanError(format!(
                    "cannot plan the condition `{}`: a part of it fails on what is known ({m})",
                    e.source()
                )))),
                Err(Fail::Unsupported(why)) => Err(Stop::Plan(PlanError(format!(
                    "cannot plan the condition `{}`: {why}",
                    e.source()
                )))),
            }
        }
        Cond::Any(children) => {
            let mut nodes = Vec::new();
            for c in children {
                let n = cond_node(c, ctx, known, strict)?;
                match const_bool(&n) {
                    Some(true) => return Ok(const_node(true)),
                    Some(false) => {}
                    None => nodes.push(n),
                }
            }
            Ok(match nodes.len() {
                0 => const_node(false),
                1 => nodes.remove(0),
                _ => Node::Or(nodes),
            })
        }
        Cond::All(children) => {
            let mut nodes = Vec::new();
            for c in children {
                let n = cond_node(c, ctx, known, strict)?;
                match const_bool(&n) {
                    Some(false) => return Ok(const_node(false)),
                    Some(true) => {}
                    None => nodes.push(n),
                }
            }
            Ok(match nodes.len() {
                0 => const_node(true),
                1 => nodes.remove(0),
                _ => Node::And(nodes),
            })
        }
        Cond::None(children) => {
            let mut nodes = Vec::new();
            for c in children {
                let n = cond_node(c, ctx, known, strict)?;
                match const_bool(&n) {
                    Some(true) => return Ok(const_node(false)),
                    Some(false) => {}
                    None => nodes.push(invert(n)),
                }
            }
            Ok(match nodes.len() {
                0 => const_node(true),
                1 => nodes.remove(0),
                _ => Node::And(nodes),
            })
        }
    }
}

/// The result of evaluating part of an expression.
#[derive(Debug)]
enum Part {
    Known(Value),
    Residual(Operand),
}

#[derive(Debug)]
enum Fail {
    /// The known part failed to evaluate (a missing key, a type error).
    Eval(String),
    /// A part failed to evaluate inside an expression that also reads the unknown resource.
    Mixed(String),
    /// The residual would need something the filter language does not have here.
    Unsupported(String),
}

/// How deep variable definitions may be followed while planning.
const MAX_PLAN_DEPTH: usize = 64;

struct Partial<'a, 'c> {
    ctx: &'a EvalCtx<'c>,
    known: &'a Map<String, Value>,
    depth: usize,
}

/// A reference to the resource: `R.<fields>` or `request.resource.<fields>`.
fn resource_fields(e: &IdedExpr) -> Option<Vec<&str>> {
    let mut fields = Vec::new();
    let mut cur = e;
    loop {
        match &cur.expr {
            Ast::Select(sel) if !sel.test => {
                fields.push(sel.field.as_str());
                cur = &sel.operand;
            }
            Ast::Ident(name) => {
                fields.push(name.as_str());
                break;
            }
            _ => return None,
        }
    }
    fields.reverse();
    match fields.as_slice() {
        ["R", rest @ ..] => Some(rest.to_vec()),
        ["request", "resource", rest @ ..] => Some(rest.to_vec()),
        _ => None,
    }
}

/// `V.x`, `variables.x`: the variable's name.
fn variable_name(e: &IdedExpr) -> Option<&str> {
    match &e.expr {
        Ast::Select(sel) if !sel.test => match &sel.operand.expr {
            Ast::Ident(n) if n == "V" || n == "variables" => Some(sel.field.as_str()),
            _ => None,
        },
        _ => None,
    }
}

enum Ref {
    /// Evaluable from the request (kind, scope, a known attribute).
    Known,
    /// The resource's unknown field, as Cerbos names the variable.
    Unknown(String),
    /// The whole resource or its attribute map: no exact filter.
    Whole,
}

impl Partial<'_, '_> {
    fn classify(&self, fields: &[&str]) -> Ref {
        match fields {
            [] | ["attr"] => Ref::Whole,
            ["attr", name, ..] if self.known.contains_key(*name) => Ref::Known,
            ["attr", ..] | ["id", ..] => {
                Ref::Unknown(format!("request.resource.{}", fields.join(".")))
            }
            _ => Ref::Known,
        }
    }

    /// Does `e` read anything unknown (or anything the planner must look at itself)?
    fn reads_unknown(&self, e: &IdedExpr, depth: usize) -> bool {
        if depth > MAX_PLAN_DEPTH {
            return true;
        }
        if let Some(fields) = resource_fields(e) {
            return !matches!(self.classify(&fields), Ref::Known);
        }
        if let Some(name) = variable_name(e) {
            return match self.ctx.variables.expr(name) {
                Some(def) => self.reads_unknown(def.ast(), depth + 1),
                None => true,
            };
        }
        match &e.expr {
            Ast::Ident(n) => n == "runtime" || n == "V" || n == "variables",
            Ast::Select(sel) => self.reads_unknown(&sel.operand, depth),
            Ast::Call(c) => {
                c.target
                    .as_ref()
                    .is_some_and(|t| self.reads_unknown(t, depth))
                    || c.args.iter().any(|a| self.reads_unknown(a, depth))
            }
            Ast::List(l) => l.elements.iter().any(|x| self.reads_unknown(x, depth)),
            Ast::Map(m) => m.entries.iter().any(|entry| match &entry.expr {
                cel::common::ast::EntryExpr::MapEntry(me) => {
                    self.reads_unknown(&me.key, depth) || self.reads_unknown(&me.value, depth)
                }
                cel::common::ast::EntryExpr::StructField(f) => self.reads_unknown(&f.value, depth),
            }),
            Ast::Comprehension(c) => [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ]
            .iter()
            .any(|x| self.reads_unknown(x, depth)),
            Ast::Struct(_) => true,
            Ast::Literal(_) | Ast::Unspecified => false,
        }
    }

    fn eval(&self, e: &IdedExpr) -> Result<Part, Fail> {
        if !self.reads_unknown(e, self.depth) {
            return self.known_value(e).map(Part::Known);
        }
        if let Some(fields) = resource_fields(e) {
            return match self.classify(&fields) {
                Ref::Unknown(path) => Ok(Part::Residual(Operand::Variable(path))),
                Ref::Whole => Err(Fail::Unsupported(
                    "it reads the whole resource or its attribute map".to_string(),
                )),
                Ref::Known => self.known_value(e).map(Part::Known),
            };
        }
        if let Some(name) = variable_name(e) {
            let def = self.ctx.variables.expr(name).ok_or_else(|| {
                Fail::Unsupported(format!("variable {name:?} is not defined here"))
            })?;
            if self.depth >= MAX_PLAN_DEPTH {
                return Err(Fail::Unsupported("variables nest too deeply".to_string()));
            }
            let inner = Partial {
                ctx: self.ctx,
                known: self.known,
                depth: self.depth + 1,
            };
            return inner.eval(def.ast());
        }
        match &e.expr {
            Ast::Call(c) => self.call(c),
            Ast::List(l) => {
                let mut operands = Vec::with_capacity(l.elements.len());
                for x in &l.elements {
                    operands.push(self.operand(x, false)?);
                }
                Ok(Part::Residual(expr("list", operands)))
            }
            Ast::Ident(n) if n == "runtime" => Err(Fail::Unsupported(
                "runtime.effectiveDerivedRoles is not supported in query plans".to_string(),
            )),
            Ast::Select(sel) if matches!(&sel.operand.expr, Ast::Ident(n) if n == "runtime") => {
                Err(Fail::Unsupported(
                    "runtime.effectiveDerivedRoles is not supported in query plans".to_string(),
                ))
            }
            Ast::Comprehension(_) => Err(Fail::Unsupported(
                "a comprehension (all, exists, filter, map, ...) over the resource".to_string(),
            )),
            Ast::Select(_) => Err(Fail::Unsupported(
                "a field of a value computed from the resource".to_string(),
            )),
            _ => Err(Fail::Unsupported(
                "this expression over the resource has no filter form".to_string(),
            )),
        }
    }

    /// Evaluates `e` (which reads nothing unknown) to a JSON value; durations, timestamps and
    /// other values with no literal form are refused.
    fn known_value(&self, e: &IdedExpr) -> Result<Value, Fail> {
        super::cel::eval_node_literal(e, self.ctx).map_err(|m| match m {
            super::cel::NodeError::Eval(m) => Fail::Eval(m),
            super::cel::NodeError::NoLiteral(t) => Fail::Unsupported(format!(
                "a {t} value next to an unknown resource attribute has no filter form"
            )),
        })
    }

    /// A part of an expression that also reads the unknown resource: an evaluation error here
    /// has no exact filter form (Cerbos's partial evaluation keeps such errors in its residual).
    fn sub(&self, e: &IdedExpr) -> Result<Part, Fail> {
        self.eval(e).map_err(|f| match f {
            Fail::Eval(m) => Fail::Mixed(m),
            other => other,
        })
    }

    /// `e` as an operand: a known value or a residual. `in_rhs` turns a known map into the
    /// list of its keys (membership tests a map's keys).
    fn operand(&self, e: &IdedExpr, in_rhs: bool) -> Result<Operand, Fail> {
        match self.sub(e)? {
            Part::Residual(op) => Ok(op),
            Part::Known(v) => value_operand(v, in_rhs),
        }
    }

    fn call(&self, c: &cel::common::ast::CallExpr) -> Result<Part, Fail> {
        let name = c.func_name.as_str();
        if c.target.is_some() {
            return Err(Fail::Unsupported(format!(
                "the function `{name}` over an unknown resource attribute"
            )));
        }
        match (name, c.args.as_slice()) {
            (operators::LOGICAL_AND | operators::LOGICAL_OR, [a, b]) => {
                let and = name == operators::LOGICAL_AND;
                let (pa, pb) = (self.sub(a)?, self.sub(b)?);
                let absorbing = !and; // false for AND, true for OR
                match (pa, pb) {
                    (Part::Known(Value::Bool(x)), _) | (_, Part::Known(Value::Bool(x)))
                        if x == absorbing =>
                    {
                        Ok(Part::Known(Value::Bool(absorbing)))
                    }
                    (Part::Known(Value::Bool(_)), other) | (other, Part::Known(Value::Bool(_))) => {
                        Ok(other)
                    }
                    (Part::Residual(x), Part::Residual(y)) => Ok(Part::Residual(expr(
                        if and { "and" } else { "or" },
                        vec![x, y],
                    ))),
                    _ => Err(Fail::Unsupported(format!(
                        "a non-boolean operand of `{}`",
                        if and { "&&" } else { "||" }
                    ))),
                }
            }
            (operators::LOGICAL_NOT, [a]) => match self.sub(a)? {
                Part::Residual(x) => Ok(Part::Residual(expr("not", vec![x]))),
                Part::Known(Value::Bool(b)) => Ok(Part::Known(Value::Bool(!b))),
                Part::Known(_) => Err(Fail::Unsupported("`!` of a non-boolean".to_string())),
            },
            (operators::CONDITIONAL, [cond, yes, no]) => match self.sub(cond)? {
                Part::Known(Value::Bool(true)) => self.sub(yes),
                Part::Known(Value::Bool(false)) => self.sub(no),
                Part::Known(_) => Err(Fail::Unsupported(
                    "a non-boolean condition of `?:`".to_string(),
                )),
                Part::Residual(c) => Ok(Part::Residual(expr(
                    "if",
                    vec![c, self.operand(yes, false)?, self.operand(no, false)?],
                ))),
            },
            (_, [a, b]) => {
                let op = match name {
                    operators::EQUALS | "@eq" => "eq",
                    operators::NOT_EQUALS | "@ne" => "ne",
                    operators::LESS => "lt",
                    operators::LESS_EQUALS => "le",
                    operators::GREATER => "gt",
                    operators::GREATER_EQUALS => "ge",
                    operators::IN | "@in_any" => "in",
                    operators::ADD => "add",
                    operators::SUBSTRACT => "sub",
                    operators::MULTIPLY => "mult",
                    operators::DIVIDE => "div",
                    operators::MODULO => "mod",
                    operators::INDEX => "index",
                    _ => {
                        return Err(Fail::Unsupported(format!(
                            "the function `{}` over an unknown resource attribute",
                            display_name(name)
                        )));
                    }
                };
                let x = self.operand(a, false)?;
                let y = self.operand(b, op == "in")?;
                Ok(Part::Residual(expr(op, vec![x, y])))
            }
            _ => Err(Fail::Unsupported(format!(
                "the function `{}` over an unknown resource attribute",
                display_name(name)
            ))),
        }
    }
}

fn display_name(name: &str) -> &str {
    match name {
        "@has" => "has",
        "@matches" => "matches",
        other => other,
    }
}

fn is_scalar(v: &Value) -> bool {
    !matches!(v, Value::Array(_) | Value::Object(_))
}

/// A known value as an operand, in the form Cerbos gives it (a literal; a list of literals;
/// a map only as the right side of `in`, as its sorted keys).
fn value_operand(v: Value, in_rhs: bool) -> Result<Operand, Fail> {
    match v {
        Value::Array(items) if items.iter().all(is_scalar) => {
            Ok(Operand::Value(Value::Array(items)))
        }
        Value::Array(_) => Err(Fail::Unsupported(
            "a nested list next to an unknown resource attribute".to_string(),
        )),
        Value::Object(m) if in_rhs => {
            let mut keys: Vec<String> = m.keys().cloned().collect();
            keys.sort();
            Ok(Operand::Value(Value::Array(
                keys.into_iter().map(Value::String).collect(),
            )))
        }
        Value::Object(_) => Err(Fail::Unsupported(
            "a map next to an unknown resource attribute".to_string(),
        )),
        scalar => Ok(Operand::Value(scalar)),
    }
}

fn to_operand(n: Node) -> Operand {
    match n {
        Node::Leaf(op) => op,
        Node::And(ns) => expr("and", ns.into_iter().map(to_operand).collect()),
        Node::Or(ns) => expr("or", ns.into_iter().map(to_operand).collect()),
        Node::Not(inner) => expr("not", vec![to_operand(*inner)]),
    }
}

fn as_bool(op: &Operand) -> Option<bool> {
    match op {
        Operand::Value(Value::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// Cerbos's filter normalisation: `in` a one-element list is `eq`, `in` an empty list is
/// false; constants folded in `and`/`or`/`not`; repeated operands of `and`/`or` dropped.
fn normalise(op: Operand) -> Option<Operand> {
    let Operand::Expression(mut e) = op else {
        return Some(op);
    };
    if e.operator == "in" && e.operands.len() == 2 {
        match e.operands.get(1) {
            Some(Operand::Value(Value::Array(items))) => match items.len() {
                0 => return Some(Operand::Value(Value::Bool(false))),
                1 => {
                    let one = items[0].clone();
                    e.operator = "eq".to_string();
                    e.operands[1] = Operand::Value(one);
                }
                _ => {}
            },
            Some(Operand::Value(Value::Object(m))) => match m.len() {
                0 => return Some(Operand::Value(Value::Bool(false))),
                1 => {
                    let key = m.keys().next().cloned().unwrap_or_default();
                    e.operator = "eq".to_string();
                    e.operands[1] = Operand::Value(Value::String(key));
                }
                _ => {}
            },
            Some(Operand::Value(_)) => e.operator = "eq".to_string(),
            _ => {}
        }
    }
    let logical = matches!(e.operator.as_str(), "and" | "or" | "not");
    let mut operands: Vec<Operand> = Vec::with_capacity(e.operands.len());
    for child in std::mem::take(&mut e.operands) {
        let Some(n) = normalise(child) else { continue };
        if logical && e.operator != "not" {
            if let Some(b) = as_bool(&n) {
                match (e.operator.as_str(), b) {
                    ("and", true) | ("or", false) => continue,
                    ("and", false) => return Some(Operand::Value(Value::Bool(false))),
                    _ => return Some(Operand::Value(Value::Bool(true))),
                }
            }
            if operands.contains(&n) {
                continue;
            }
        }
        operands.push(n);
    }
    if logical {
        match (operands.len(), e.operator.as_str()) {
            (0, "and") => return Some(Operand::Value(Value::Bool(true))),
            (0, "or") => return Some(Operand::Value(Value::Bool(false))),
            (0, _) => return None,
            (1, "and" | "or") => return operands.pop(),
            (1, _) => {
                if let Some(b) = operands.first().and_then(as_bool) {
                    return Some(Operand::Value(Value::Bool(!b)));
                }
            }
            _ => {}
        }
    }
    e.operands = operands;
    Some(Operand::Expression(e))
}

fn to_filter(node: Node) -> (FilterKind, Option<Operand>) {
    match normalise(to_operand(node)) {
        None => (FilterKind::AlwaysAllowed, None),
        Some(op) => match as_bool(&op) {
            Some(true) => (FilterKind::AlwaysAllowed, None),
            Some(false) => (FilterKind::AlwaysDenied, None),
            None => (FilterKind::Conditional, Some(op)),
        },
    }
}

/// The filter as Cerbos's `filterDebug` s-expression.
pub fn debug_string(kind: FilterKind, condition: Option<&Operand>) -> String {
    match (kind, condition) {
        (FilterKind::AlwaysAllowed, _) => "(true)".to_string(),
        (FilterKind::AlwaysDenied, _) => "(false)".to_string(),
        (FilterKind::Conditional, Some(op)) => {
            let mut s = String::new();
            write_operand(&mut s, op);
            s
        }
        (FilterKind::Conditional, None) => String::new(),
    }
}

fn write_operand(s: &mut String, op: &Operand) {
    match op {
        Operand::Value(v) => s.push_str(&v.to_string()),
        Operand::Variable(name) => s.push_str(name),
        Operand::Expression(e) => {
            s.push('(');
            s.push_str(&e.operator);
            s.push(' ');
            for (i, o) in e.operands.iter().enumerate() {
                if i > 0 {
                    s.push(' ');
                }
                write_operand(s, o);
            }
            s.push(')');
        }
    }
}

/// The per-action filters AND-ed (Cerbos's `MergeWithAnd`): any always-denied action denies;
/// distinct conditions are AND-ed in the order of their debug strings.
fn merge_with_and(
    filters: Vec<(FilterKind, Option<Operand>)>,
) -> (FilterKind, Option<Operand>, String) {
    let mut conds: BTreeMap<String, Operand> = BTreeMap::new();
    for (kind, cond) in filters {
        match (kind, cond) {
            (FilterKind::AlwaysAllowed, _) => {}
            (FilterKind::AlwaysDenied, _) => {
                return (FilterKind::AlwaysDenied, None, "(false)".to_string());
            }
            (FilterKind::Conditional, Some(c)) => {
                conds.insert(debug_string(FilterKind::Conditional, Some(&c)), c);
            }
            (FilterKind::Conditional, None) => {}
        }
    }
    let (kind, cond) = match conds.len() {
        0 => (FilterKind::AlwaysAllowed, None),
        1 => (FilterKind::Conditional, conds.into_values().next()),
        _ => (
            FilterKind::Conditional,
            Some(expr("and", conds.into_values().collect())),
        ),
    };
    let debug = debug_string(kind, cond.as_ref());
    (kind, cond, debug)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_with_one_element_is_eq_and_constants_fold() {
        let var = Operand::Variable("request.resource.attr.x".into());
        let op = expr(
            "in",
            vec![var.clone(), Operand::Value(serde_json::json!(["a"]))],
        );
        assert_eq!(
            normalise(op),
            Some(expr("eq", vec![var.clone(), Operand::Value("a".into())]))
        );
        let and = expr(
            "and",
            vec![Operand::Value(true.into()), var.clone(), var.clone()],
        );
        assert_eq!(normalise(and), Some(var));
    }
}
