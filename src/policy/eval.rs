//! The Cerbos evaluation algorithm over a compiled [`PolicySet`] (reference: cerbos.md §1.9).
//!
//! Per action: principal policies first (a decision there is final), then resource policies,
//! role by role. Within a role a DENY wins; across roles the first ALLOW wins. Scopes are
//! walked from the most specific up, honouring `SCOPE_PERMISSIONS_*`. No decision is a DENY.
//!
//! Pure and synchronous: no I/O, no locks, no allocation of the policy set. Every decision
//! carries an explain trace and the evaluation errors met on the way.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use super::cel::{EvalCtx, Request, Variables};
use super::compile::{Cond, DerivedRole, Policy, PolicyKind, PolicySet, Rule, Schema, policy_key};
use super::input::{CheckInput, Evaluation, Params, SchemaEnforcement};
use super::model::{Effect, ScopePermissions};

pub const NO_MATCH: &str = "NO_MATCH";

/// The decision for one action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionResult {
    pub action: String,
    #[serde(serialize_with = "effect_str")]
    pub effect: Effect,
    /// Cerbos `matchedPolicy`: the deciding policy's key, or `NO_MATCH`.
    pub policy: String,
    /// Cerbos `matchedScope`: the deciding policy's scope ("" for the root).
    pub scope: String,
    /// The deciding rule's name ("" when nothing matched).
    pub rule: String,
    /// One line a person can read: why this effect.
    pub reason: String,
}

fn effect_str<S: serde::Serializer>(e: &Effect, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(effect_name(*e))
}

pub fn effect_name(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "EFFECT_ALLOW",
        Effect::Deny => "EFFECT_DENY",
    }
}

/// Cerbos `OutputEntry`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputEntry {
    pub src: String,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Source {
    #[serde(rename = "SOURCE_PRINCIPAL")]
    Principal,
    #[serde(rename = "SOURCE_RESOURCE")]
    Resource,
}

/// Cerbos `ValidationError` (schema validation of attributes).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationError {
    pub path: String,
    pub message: String,
    pub source: Source,
}

/// A CEL error met while deciding, reported with the decision (not only in logs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalError {
    pub action: String,
    pub policy: String,
    pub rule: String,
    pub expression: String,
    pub message: String,
}

/// What one step of the walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// Action and role matched, condition held (or none): the rule's effect applies.
    Activated,
    /// Action and role matched, the condition was false.
    ConditionNotMet,
    /// The condition raised an error (strict: the rule denies; lenient: it is skipped).
    Error,
    /// A conditional ALLOW that did not hold in a `REQUIRE_PARENTAL_CONSENT_FOR_ALLOWS` scope.
    ImplicitDeny,
    /// A role policy does not list this action for this resource.
    RolePolicyDeny,
    /// An ALLOW in a `REQUIRE_PARENTAL_CONSENT_FOR_ALLOWS` scope: an ancestor must also allow.
    AwaitingParentalConsent,
}

/// One rule visited while deciding one action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub action: String,
    /// `principal` or `resource`.
    pub pass: &'static str,
    /// The role this pass ran for (resource pass only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub policy: String,
    pub scope: String,
    pub rule: String,
    #[serde(serialize_with = "effect_str")]
    pub effect: Effect,
    pub outcome: StepOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A derived role's activation for this request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DerivedRoleStep {
    pub name: String,
    pub scope: String,
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The explain trace: every policy, scope and rule consulted, and what each said.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Trace {
    /// Policy keys consulted, in order.
    pub policies: Vec<String>,
    pub derived_roles: Vec<DerivedRoleStep>,
    pub steps: Vec<Step>,
}

/// The result of one check (Cerbos `CheckOutput`, plus our trace).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckOutput {
    pub actions: Vec<ActionResult>,
    pub effective_derived_roles: Vec<String>,
    pub outputs: Vec<OutputEntry>,
    pub validation_errors: Vec<ValidationError>,
    pub evaluation_errors: Vec<EvalError>,
    pub trace: Trace,
}

impl CheckOutput {
    pub fn effect(&self, action: &str) -> Option<Effect> {
        self.actions
            .iter()
            .find(|a| a.action == action)
            .map(|a| a.effect)
    }
}

/// Where a pass ended up.
#[derive(Debug, Clone)]
enum Verdict {
    NoMatch,
    Decided {
        effect: Effect,
        /// The deciding policy (its own key names it in the reason).
        policy: Arc<Policy>,
        rule: String,
        role: Option<String>,
    },
}

/// Derived roles of one scope for one action: (action, [(definition, active)]).
type DerivedForAction = (String, Vec<(Arc<DerivedRole>, bool)>);

/// One scope of the resource pass: its resource policy and the role policies there.
struct Level {
    scope: String,
    resource: Option<Arc<Policy>>,
    /// Role policies at this scope, by role name.
    role_policies: Vec<(String, Arc<Policy>)>,
    /// Derived roles evaluated here for the current action: (definition, active).
    derived: Option<DerivedForAction>,
}

impl Level {
    fn active_names(&self) -> Vec<String> {
        match &self.derived {
            Some((_, d)) => d
                .iter()
                .filter(|(_, a)| *a)
                .map(|(dr, _)| dr.name.clone())
                .collect(),
            None => Vec::new(),
        }
    }
}

/// Cerbos's scope normalisation: empty → the default scope, then one leading `.` stripped.
fn normalise_scope<'a>(scope: &'a str, default: &'a str) -> &'a str {
    let s = if scope.is_empty() { default } else { scope };
    s.strip_prefix('.').unwrap_or(s)
}

/// `a.b.c` → `["a.b.c", "a.b", "a", ""]`.
fn scope_chain(scope: &str) -> Vec<String> {
    let mut out = vec![scope.to_string()];
    let mut s = scope;
    while !s.is_empty() {
        s = s.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        out.push(s.to_string());
    }
    out
}

/// The scopes to walk, most specific first. As in Cerbos, a scope "exists" if any policy of
/// the pass's kind has it (not only policies for this resource kind or principal). Strict
/// search needs the requested scope to exist; lenient search skips missing leaves.
fn walk_scopes(requested: &str, existing: &BTreeSet<String>, lenient: bool) -> Vec<String> {
    if !lenient && !existing.contains(requested) {
        return Vec::new();
    }
    scope_chain(requested)
        .into_iter()
        .filter(|s| existing.contains(s))
        .collect()
}

struct Checker<'a> {
    set: &'a PolicySet,
    input: &'a CheckInput,
    params: &'a Params,
    request: Request<'a>,
    out: CheckOutput,
    no_roles: Vec<String>,
}

/// Decides every action of `input` against `set`.
pub fn check(set: &PolicySet, input: &CheckInput, params: &Params) -> CheckOutput {
    let request = Request {
        principal: &input.principal,
        resource: &input.resource,
        aux_data: &input.aux_data,
        now: params.now,
        globals: &params.globals,
    };
    let mut c = Checker {
        set,
        input,
        params,
        request,
        out: CheckOutput::default(),
        no_roles: Vec::new(),
    };
    c.run();
    c.out
}

fn version<'a>(v: &'a str, default: &'a str) -> &'a str {
    if v.is_empty() { default } else { v }
}

impl<'a> Checker<'a> {
    fn run(&mut self) {
        let p = &self.input.principal;
        let r = &self.input.resource;
        let p_version = version(&p.policy_version, &self.params.default_policy_version).to_string();
        let r_version = version(&r.policy_version, &self.params.default_policy_version).to_string();
        let p_scope = normalise_scope(&p.scope, &self.params.default_scope).to_string();
        let r_scope = normalise_scope(&r.scope, &self.params.default_scope).to_string();
        let lenient = self.params.lenient_scope_search;

        // Principal policies. Cerbos 0.55 looks their rules up by the *resource's* version
        // (its docs say the principal's) and names the match by the principal's version;
        // we follow the code, as clients see it.
        let principal_scopes = walk_scopes(&p_scope, &self.set.principal_scopes, lenient);
        let rules_of = self.set.principals.get(&(p.id.clone(), r_version.clone()));
        let principal_chain: Vec<Arc<Policy>> = principal_scopes
            .iter()
            .filter_map(|s| rules_of.and_then(|b| b.get(s)).cloned())
            .collect();
        let named = self.set.principals.get(&(p.id.clone(), p_version.clone()));
        let principal_key = Some(
            match principal_scopes
                .iter()
                .any(|s| named.is_some_and(|b| b.contains_key(s)))
            {
                true => policy_key(
                    PolicyKind::Principal,
                    &p.id,
                    &p_version,
                    &principal_scopes[0],
                ),
                false => NO_MATCH.to_string(),
            },
        );

        let resource_scopes = walk_scopes(&r_scope, &self.set.resource_scopes, lenient);
        let by_kind = self.set.resources.get(&(r.kind.clone(), r_version.clone()));
        let mut levels: Vec<Level> = resource_scopes
            .iter()
            .map(|scope| Level {
                scope: scope.clone(),
                resource: by_kind.and_then(|b| b.get(scope)).cloned(),
                role_policies: Vec::new(),
                derived: None,
            })
            .collect();
        let resource_key = levels.iter().any(|l| l.resource.is_some()).then(|| {
            policy_key(
                PolicyKind::Resource,
                &r.kind,
                &r_version,
                &resource_scopes[0],
            )
        });

        let rejected = self.validate(&r_version);

        // Custom roles inherit their parents' permissions; parents are resolved at exactly
        // the resource's scope, as Cerbos does.
        let role_sets: Vec<(String, Vec<String>)> = p
            .roles
            .iter()
            .map(|role| (role.clone(), self.role_set(role, &r_version, &r_scope)))
            .collect();
        let all_roles: Vec<String> = {
            let mut v: Vec<String> = role_sets
                .iter()
                .flat_map(|(_, s)| s.iter().cloned())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        for level in levels.iter_mut() {
            for role in &all_roles {
                if let Some(rp) = self
                    .set
                    .roles
                    .get(&(role.clone(), r_version.clone()))
                    .and_then(|b| b.get(&level.scope))
                {
                    level.role_policies.push((role.clone(), rp.clone()));
                }
            }
        }
        for policy in &principal_chain {
            self.out.trace.policies.push(policy.key.clone());
        }
        for level in &levels {
            if let Some(policy) = &level.resource {
                self.out.trace.policies.push(policy.key.clone());
            }
            for (_, rp) in &level.role_policies {
                if !self.out.trace.policies.contains(&rp.key) {
                    self.out.trace.policies.push(rp.key.clone());
                }
            }
        }

        let actions = self.input.actions.clone();
        let mut effective: Vec<String> = Vec::new();
        for action in &actions {
            if rejected.iter().any(|a| a == action) {
                self.out.actions.push(ActionResult {
                    action: action.clone(),
                    effect: Effect::Deny,
                    policy: NO_MATCH.to_string(),
                    scope: String::new(),
                    rule: String::new(),
                    reason: "denied: the request's attributes failed schema validation".to_string(),
                });
                continue;
            }
            let mut reported = principal_key.clone();
            let mut verdict = Verdict::NoMatch;
            if !principal_chain.is_empty() {
                verdict = self.walk_principal(action, &principal_chain);
            }
            if matches!(verdict, Verdict::NoMatch) {
                reported = resource_key.clone();
                verdict = self.resource_pass(action, &mut levels, &role_sets, &all_roles);
                for level in &levels {
                    for n in level.active_names() {
                        if !effective.contains(&n) {
                            effective.push(n);
                        }
                    }
                }
            }
            let mut r = result(action, verdict, reported.as_deref());
            if r.rule.is_empty() && r.effect == Effect::Deny {
                let tried: Vec<String> = self
                    .out
                    .trace
                    .steps
                    .iter()
                    .filter(|s| {
                        s.action == *action
                            && matches!(
                                s.outcome,
                                StepOutcome::ConditionNotMet | StepOutcome::Error
                            )
                    })
                    .map(|s| format!("{}#{}", s.policy, s.rule))
                    .collect();
                if !tried.is_empty() {
                    r.reason = format!(
                        "denied by default: no rule allowed it (condition not met: {})",
                        tried.join(", ")
                    );
                }
            }
            self.out.actions.push(r);
        }
        effective.sort();
        self.out.effective_derived_roles = effective;
    }

    /// `{role} ∪ parentRoles(role)` through role policies at `scope`, recursively.
    fn role_set(&self, role: &str, version: &str, scope: &str) -> Vec<String> {
        let mut out = vec![role.to_string()];
        let mut i = 0;
        while i < out.len() && out.len() < 64 {
            let r = out[i].clone();
            if let Some(rp) = self
                .set
                .roles
                .get(&(r, version.to_string()))
                .and_then(|b| b.get(scope))
            {
                for parent in &rp.parent_roles {
                    if !out.contains(parent) {
                        out.push(parent.clone());
                    }
                }
            }
            i += 1;
        }
        out
    }

    /// Schema validation with the unscoped resource policy's schemas. Returns rejected actions.
    fn validate(&mut self, r_version: &str) -> Vec<String> {
        let enforcement = self.params.schema_enforcement;
        if enforcement == SchemaEnforcement::None {
            return Vec::new();
        }
        let r = &self.input.resource;
        let Some(base) = self
            .set
            .resources
            .get(&(r.kind.clone(), r_version.to_string()))
            .and_then(|b| b.get(""))
            .cloned()
        else {
            return Vec::new();
        };
        let mut rejected = Vec::new();
        let checks = [
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
        ];
        for (schema, attr, source) in checks {
            let Some(schema) = schema else { continue };
            let applies: Vec<&String> = self
                .input
                .actions
                .iter()
                .filter(|a| !schema.ignore_actions.iter().any(|g| g.matches(a)))
                .collect();
            if applies.is_empty() {
                continue;
            }
            let errors = validate_attrs(schema, attr, source);
            if !errors.is_empty() && enforcement == SchemaEnforcement::Reject {
                rejected.extend(applies.into_iter().cloned());
            }
            self.out.validation_errors.extend(errors);
        }
        rejected
    }

    fn ctx<'c>(
        &'c self,
        action: &'c str,
        constants: &'c Arc<Map<String, Value>>,
        variables: &'c Variables,
        derived: &'c [String],
    ) -> EvalCtx<'c> {
        EvalCtx {
            env: &self.set.env,
            request: &self.request,
            action,
            constants,
            variables,
            effective_derived_roles: derived,
        }
    }

    /// Evaluates a condition; lenient CEL errors are recorded here and read as `false`.
    fn condition(
        &mut self,
        cond: &Cond,
        ctx_parts: (&str, &Arc<Map<String, Value>>, &Variables, &[String]),
        at: (&str, &str),
    ) -> Result<bool, (String, String)> {
        let (action, constants, variables, derived) = ctx_parts;
        let lenient = self.params.evaluation == Evaluation::Lenient;
        let mut absorbed = Vec::new();
        let held = {
            let ctx = self.ctx(action, constants, variables, derived);
            eval_cond(cond, &ctx, lenient, &mut absorbed)
        };
        for (expression, message) in absorbed {
            self.out.evaluation_errors.push(EvalError {
                action: action.to_string(),
                policy: at.0.to_string(),
                rule: at.1.to_string(),
                expression,
                message,
            });
        }
        held
    }

    /// Derived roles of `level`'s policy for this action (once per scope and action).
    fn derive_roles(&mut self, level: &mut Level, action: &str, all_roles: &[String]) {
        if level.derived.as_ref().is_some_and(|(a, _)| a == action) {
            return;
        }
        let Some(policy) = level.resource.clone() else {
            level.derived = Some((action.to_string(), Vec::new()));
            return;
        };
        let mut out = Vec::new();
        for dr in &policy.derived_roles {
            let parent_ok = dr
                .parent_roles
                .iter()
                .any(|g| all_roles.iter().any(|r| g.matches(r)));
            let mut error = None;
            let active = parent_ok
                && match &dr.condition {
                    None => true,
                    Some(cond) => {
                        let at = format!("derived_roles.{}", dr.set);
                        let no_roles = std::mem::take(&mut self.no_roles);
                        let held = self.condition(
                            cond,
                            (action, &dr.constants, &dr.variables, &no_roles),
                            (&at, &dr.name),
                        );
                        self.no_roles = no_roles;
                        match held {
                            Ok(b) => b,
                            Err((expression, message)) => {
                                self.out.evaluation_errors.push(EvalError {
                                    action: action.to_string(),
                                    policy: at,
                                    rule: dr.name.clone(),
                                    expression,
                                    message: message.clone(),
                                });
                                error = Some(message);
                                false
                            }
                        }
                    }
                };
            let seen = self
                .out
                .trace
                .derived_roles
                .iter()
                .any(|d| d.name == dr.name && d.scope == level.scope);
            if parent_ok && !seen {
                self.out.trace.derived_roles.push(DerivedRoleStep {
                    name: dr.name.clone(),
                    scope: level.scope.clone(),
                    active,
                    error,
                });
            }
            out.push((dr.clone(), active));
        }
        level.derived = Some((action.to_string(), out));
    }

    fn walk_principal(&mut self, action: &str, chain: &[Arc<Policy>]) -> Verdict {
        let kind = self.input.resource.kind.clone();
        for policy in chain {
            let mut has_allow: Option<String> = None;
            for rule in &policy.rules {
                let resource_ok = rule.resource.as_ref().is_some_and(|g| g.matches(&kind));
                if !resource_ok || !rule.actions.iter().any(|g| g.matches(action)) {
                    continue;
                }
                match self.apply_rule(action, "principal", None, policy, rule, &[]) {
                    RuleOutcome::Deny => {
                        return Verdict::Decided {
                            effect: Effect::Deny,
                            policy: policy.clone(),
                            rule: rule.name.clone(),
                            role: None,
                        };
                    }
                    RuleOutcome::Allow => {
                        has_allow.get_or_insert_with(|| rule.name.clone());
                    }
                    RuleOutcome::Nothing => {}
                }
            }
            if let Some(rule) = has_allow {
                if policy.scope_permissions == ScopePermissions::RequireParentalConsentForAllows {
                    self.consent_step(action, "principal", None, policy, &rule);
                    continue;
                }
                return Verdict::Decided {
                    effect: Effect::Allow,
                    policy: policy.clone(),
                    rule,
                    role: None,
                };
            }
        }
        Verdict::NoMatch
    }

    /// Per role: a DENY wins within the role; across roles the first ALLOW wins, else the
    /// first DENY, else no match.
    fn resource_pass(
        &mut self,
        action: &str,
        levels: &mut [Level],
        role_sets: &[(String, Vec<String>)],
        all_roles: &[String],
    ) -> Verdict {
        let mut effect = Verdict::NoMatch;
        for (role, role_set) in role_sets {
            let v = self.walk_role(action, role, role_set, levels, all_roles);
            if matches!(
                v,
                Verdict::Decided {
                    effect: Effect::Allow,
                    ..
                }
            ) {
                return v;
            }
            if matches!(effect, Verdict::NoMatch) {
                effect = v;
            }
        }
        effect
    }

    fn walk_role(
        &mut self,
        action: &str,
        role: &str,
        role_set: &[String],
        levels: &mut [Level],
        all_roles: &[String],
    ) -> Verdict {
        let kind = self.input.resource.kind.clone();
        for level in levels.iter_mut() {
            self.derive_roles(level, action, all_roles);
            let active = level.active_names();
            // Role policies first: an action a custom role (or its parents) does not list
            // for this resource is a DENY for this role.
            let constraints: Vec<Arc<Policy>> = level
                .role_policies
                .iter()
                .filter(|(r, _)| role_set.contains(r))
                .map(|(_, rp)| rp.clone())
                .collect();
            let constrained = constraints.iter().any(|rp| {
                rp.rules
                    .iter()
                    .any(|rule| rule.resource.as_ref().is_some_and(|g| g.matches(&kind)))
            });
            for rp in constraints {
                // A custom role constrains the resource kinds that it or its parent custom
                // roles name (Cerbos's synthetic DENY rows); other kinds are left alone.
                if !constrained {
                    continue;
                }
                let mut allowed = false;
                for rule in &rp.rules {
                    let resource_ok = rule.resource.as_ref().is_some_and(|g| g.matches(&kind));
                    if !resource_ok || !rule.actions.iter().any(|g| g.matches(action)) {
                        continue;
                    }
                    if let RuleOutcome::Allow =
                        self.apply_rule(action, "resource", Some(role), &rp, rule, &active)
                    {
                        allowed = true;
                        break;
                    }
                }
                if !allowed {
                    self.out.trace.steps.push(Step {
                        action: action.to_string(),
                        pass: "resource",
                        role: Some(role.to_string()),
                        policy: rp.key.clone(),
                        scope: rp.scope.clone(),
                        rule: String::new(),
                        effect: Effect::Deny,
                        outcome: StepOutcome::RolePolicyDeny,
                        error: None,
                    });
                    return Verdict::Decided {
                        effect: Effect::Deny,
                        policy: rp.clone(),
                        rule: String::new(),
                        role: Some(role.to_string()),
                    };
                }
            }
            let Some(policy) = level.resource.clone() else {
                continue;
            };
            let derived: Vec<(Arc<DerivedRole>, bool)> = level
                .derived
                .as_ref()
                .map(|(_, d)| d.clone())
                .unwrap_or_default();
            let mut has_allow: Option<String> = None;
            for rule in &policy.rules {
                if !rule.actions.iter().any(|g| g.matches(action)) {
                    continue;
                }
                let by_role = rule
                    .roles
                    .iter()
                    .any(|g| role_set.iter().any(|r| g.matches(r)));
                let by_derived = rule.derived_roles.iter().any(|name| {
                    derived.iter().any(|(dr, on)| {
                        *on && &dr.name == name
                            && dr
                                .parent_roles
                                .iter()
                                .any(|g| role_set.iter().any(|r| g.matches(r)))
                    })
                });
                if !by_role && !by_derived {
                    continue;
                }
                match self.apply_rule(action, "resource", Some(role), &policy, rule, &active) {
                    RuleOutcome::Deny => {
                        return Verdict::Decided {
                            effect: Effect::Deny,
                            policy: policy.clone(),
                            rule: rule.name.clone(),
                            role: Some(role.to_string()),
                        };
                    }
                    RuleOutcome::Allow => {
                        has_allow.get_or_insert_with(|| rule.name.clone());
                    }
                    RuleOutcome::Nothing => {}
                }
            }
            if let Some(rule) = has_allow {
                if policy.scope_permissions == ScopePermissions::RequireParentalConsentForAllows {
                    self.consent_step(action, "resource", Some(role), &policy, &rule);
                    continue;
                }
                return Verdict::Decided {
                    effect: Effect::Allow,
                    policy: policy.clone(),
                    rule,
                    role: Some(role.to_string()),
                };
            }
        }
        Verdict::NoMatch
    }

    fn consent_step(
        &mut self,
        action: &str,
        pass: &'static str,
        role: Option<&str>,
        policy: &Arc<Policy>,
        rule: &str,
    ) {
        self.out.trace.steps.push(Step {
            action: action.to_string(),
            pass,
            role: role.map(str::to_string),
            policy: policy.key.clone(),
            scope: policy.scope.clone(),
            rule: rule.to_string(),
            effect: Effect::Allow,
            outcome: StepOutcome::AwaitingParentalConsent,
            error: None,
        });
    }

    /// Evaluates one matched rule: its condition, its outputs, the trace step.
    fn apply_rule(
        &mut self,
        action: &str,
        pass: &'static str,
        role: Option<&str>,
        policy: &Arc<Policy>,
        rule: &Rule,
        derived: &[String],
    ) -> RuleOutcome {
        let held = match &rule.condition {
            None => Ok(true),
            Some(cond) => self.condition(
                cond,
                (action, &policy.constants, &policy.variables, derived),
                (&policy.key, &rule.name),
            ),
        };
        let src = format!("{}#{}", policy.key, rule.name);
        let (outcome, step, error) = match held {
            Ok(true) => {
                self.output(
                    action,
                    policy,
                    derived,
                    &src,
                    rule.output_activated.as_ref(),
                );
                let o = match rule.effect {
                    Effect::Allow => RuleOutcome::Allow,
                    Effect::Deny => RuleOutcome::Deny,
                };
                let step = if rule.implicit_deny {
                    StepOutcome::ImplicitDeny
                } else {
                    StepOutcome::Activated
                };
                (o, step, None)
            }
            Ok(false) => {
                self.output(action, policy, derived, &src, rule.output_not_met.as_ref());
                (RuleOutcome::Nothing, StepOutcome::ConditionNotMet, None)
            }
            Err((expression, message)) => {
                self.out.evaluation_errors.push(EvalError {
                    action: action.to_string(),
                    policy: policy.key.clone(),
                    rule: rule.name.clone(),
                    expression,
                    message: message.clone(),
                });
                self.output(action, policy, derived, &src, rule.output_not_met.as_ref());
                // INVARIANT: in strict mode a CEL error never allows: the rule denies instead.
                (RuleOutcome::Deny, StepOutcome::Error, Some(message))
            }
        };
        let effect = match (outcome, rule.effect) {
            (RuleOutcome::Deny, _) => Effect::Deny,
            (_, e) => e,
        };
        self.out.trace.steps.push(Step {
            action: action.to_string(),
            pass,
            role: role.map(str::to_string),
            policy: policy.key.clone(),
            scope: policy.scope.clone(),
            rule: rule.name.clone(),
            effect,
            outcome: step,
            error,
        });
        outcome
    }

    /// Emits an output entry. As in Cerbos, once per rule visit (a rule visited in several
    /// role passes emits once per pass).
    fn output(
        &mut self,
        action: &str,
        policy: &Arc<Policy>,
        derived: &[String],
        src: &str,
        expr: Option<&super::cel::Expr>,
    ) {
        let Some(expr) = expr else { return };
        let (val, error) = {
            let ctx = self.ctx(action, &policy.constants, &policy.variables, derived);
            match expr.eval_json(&ctx) {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e)),
            }
        };
        self.out.outputs.push(OutputEntry {
            src: src.to_string(),
            action: action.to_string(),
            val,
            error,
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuleOutcome {
    Allow,
    Deny,
    Nothing,
}

/// The action's result. `reported` is Cerbos's `matchedPolicy` for the pass that ran: the
/// key of the requested (first existing) scope, even when an ancestor scope decided; the
/// deciding scope goes to `matchedScope`, and the deciding policy and rule to the reason.
fn result(action: &str, verdict: Verdict, reported: Option<&str>) -> ActionResult {
    match verdict {
        Verdict::NoMatch => ActionResult {
            action: action.to_string(),
            effect: Effect::Deny,
            policy: reported.unwrap_or(NO_MATCH).to_string(),
            scope: String::new(),
            rule: String::new(),
            reason: "denied by default: no policy rule matched".to_string(),
        },
        Verdict::Decided {
            effect,
            policy,
            rule,
            role,
        } => {
            let verb = match effect {
                Effect::Allow => "allowed",
                Effect::Deny => "denied",
            };
            let by = if rule.is_empty() {
                format!(
                    "{verb} by {} (the custom role does not list this action)",
                    policy.key
                )
            } else {
                format!("{verb} by {}#{rule}", policy.key)
            };
            let reason = match role {
                Some(role) => format!("{by} for role {role}"),
                None => by,
            };
            let matched = if policy.kind == PolicyKind::Role {
                policy.key.clone()
            } else {
                reported.unwrap_or(&policy.key).to_string()
            };
            ActionResult {
                action: action.to_string(),
                effect,
                policy: matched,
                scope: policy.scope.clone(),
                rule,
                reason,
            }
        }
    }
}

/// Evaluates a condition tree.
///
/// Strict: CEL's error absorption: `all` is false if any child is false, else an error if any
/// child errs; `any` mirrors it; `none` is `!any`. The error names the failing expression.
/// Lenient (Cerbos's default): an erroring expression reads as `false` and is reported
/// through `absorbed`, so `none` over an error is true, as in Cerbos.
pub fn eval_cond(
    cond: &Cond,
    ctx: &EvalCtx<'_>,
    lenient: bool,
    absorbed: &mut Vec<(String, String)>,
) -> Result<bool, (String, String)> {
    match cond {
        Cond::Expr(e) => match e.eval_bool(ctx) {
            Ok(b) => Ok(b),
            Err(m) if lenient => {
                absorbed.push((e.source().to_string(), m));
                Ok(false)
            }
            Err(m) => Err((e.source().to_string(), m)),
        },
        Cond::All(children) => {
            let mut first_err = None;
            for c in children {
                match eval_cond(c, ctx, lenient, absorbed) {
                    Ok(false) => return Ok(false),
                    Ok(true) => {}
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            first_err.map_or(Ok(true), Err)
        }
        Cond::Any(children) | Cond::None(children) => {
            let mut first_err = None;
            let mut any = false;
            for c in children {
                match eval_cond(c, ctx, lenient, absorbed) {
                    Ok(true) => {
                        any = true;
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if !any {
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
            Ok(if matches!(cond, Cond::None(_)) {
                !any
            } else {
                any
            })
        }
    }
}

fn validate_attrs(
    schema: &Schema,
    attr: &Map<String, Value>,
    source: Source,
) -> Vec<ValidationError> {
    let instance = Value::Object(attr.clone());
    schema
        .validator
        .iter_errors(&instance)
        .map(|e| ValidationError {
            path: e.instance_path().to_string(),
            message: e.to_string(),
            source,
        })
        .collect()
}
