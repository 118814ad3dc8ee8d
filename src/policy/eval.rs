//! The Cerbos evaluation algorithm over a compiled [`PolicySet`] (reference: cerbos.md §1.9).
//!
//! Per action: principal policies first (a decision there is final), then resource policies,
//! role by role. Within a role a DENY wins; across roles the first ALLOW wins. Scopes are
//! walked from the most specific up, honouring `SCOPE_PERMISSIONS_*`. No decision is a DENY.
//!
//! Pure and synchronous: no I/O, no locks, no allocation of the policy set. Every decision
//! carries an explain trace and the evaluation errors met on the way.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use super::cel::{EvalCtx, Request, Variables};
use super::compile::{ByScope, Cond, DerivedRole, Policy, PolicyKind, PolicySet, Rule, Schema};
use super::input::{CheckInput, Evaluation, Params, SchemaEnforcement};
use super::model::{Effect, ScopePermissions};

pub const NO_MATCH: &str = "NO_MATCH";
pub const NO_MATCH_FOR_SCOPE_PERMISSIONS: &str = "NO_MATCH_FOR_SCOPE_PERMISSIONS";

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

/// Where a role pass ended up.
#[derive(Debug, Clone)]
enum Verdict {
    NoMatch {
        awaiting_consent: bool,
    },
    Decided {
        effect: Effect,
        policy: Arc<Policy>,
        rule: String,
        role: Option<String>,
    },
}

/// A scope string's resource policy and the role policies that apply there.
struct ScopeLevel {
    scope: String,
    resource: Option<Arc<Policy>>,
    /// (role name, role policy) for principal roles that have one at this scope.
    role_policies: Vec<(String, Arc<Policy>)>,
    /// Derived roles active for the principal here: (definition, active).
    derived: Vec<(Arc<DerivedRole>, bool)>,
    /// Names of `derived` that are active.
    active_names: Vec<String>,
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

/// The chain of policies to walk: strict needs the exact scope; lenient skips missing leaves.
fn policy_chain(
    by_scope: Option<&ByScope>,
    scope: &str,
    lenient: bool,
) -> Vec<(String, Option<Arc<Policy>>)> {
    let Some(by_scope) = by_scope else {
        return Vec::new();
    };
    let chain = scope_chain(scope);
    let start = if lenient {
        chain.iter().position(|s| by_scope.contains_key(s))
    } else if by_scope.contains_key(scope) {
        Some(0)
    } else {
        None
    };
    let Some(start) = start else {
        return Vec::new();
    };
    chain[start..]
        .iter()
        .map(|s| (s.clone(), by_scope.get(s).cloned()))
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

        let principal_chain = policy_chain(
            self.set.principals.get(&(p.id.clone(), p_version.clone())),
            &p_scope,
            lenient,
        );
        let resource_chain = policy_chain(
            self.set.resources.get(&(r.kind.clone(), r_version.clone())),
            &r_scope,
            lenient,
        );
        let rejected = self.validate(&r_version);

        // Role-policy parents: a custom role inherits its parents' permissions.
        let role_sets: Vec<(String, Vec<String>)> = p
            .roles
            .iter()
            .map(|role| {
                (
                    role.clone(),
                    self.role_set(role, &r_version, &resource_chain),
                )
            })
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
        let mut levels: Vec<ScopeLevel> = resource_chain
            .iter()
            .map(|(scope, policy)| ScopeLevel {
                scope: scope.clone(),
                resource: policy.clone(),
                role_policies: p
                    .roles
                    .iter()
                    .filter_map(|role| {
                        self.set
                            .roles
                            .get(&(role.clone(), r_version.clone()))
                            .and_then(|b| b.get(scope))
                            .map(|rp| (role.clone(), rp.clone()))
                    })
                    .collect(),
                derived: Vec::new(),
                active_names: Vec::new(),
            })
            .collect();
        for (_, policy) in &principal_chain {
            if let Some(policy) = policy {
                self.out.trace.policies.push(policy.key.clone());
            }
        }
        for level in &levels {
            if let Some(policy) = &level.resource {
                self.out.trace.policies.push(policy.key.clone());
            }
            for (_, rp) in &level.role_policies {
                self.out.trace.policies.push(rp.key.clone());
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
            // Derived roles are evaluated per scope (and per action: CEL may read request.action).
            for level in levels.iter_mut() {
                self.derive_roles(level, action, &all_roles);
                for n in &level.active_names {
                    if !effective.contains(n) {
                        effective.push(n.clone());
                    }
                }
            }
            let mut verdict = Verdict::NoMatch {
                awaiting_consent: false,
            };
            if !principal_chain.is_empty() {
                verdict = self.walk_principal(action, &principal_chain);
            }
            if !matches!(verdict, Verdict::Decided { .. }) {
                let principal_consent = matches!(
                    verdict,
                    Verdict::NoMatch {
                        awaiting_consent: true
                    }
                );
                verdict = self.resource_pass(action, &levels, &role_sets);
                if principal_consent {
                    if let Verdict::NoMatch { .. } = verdict {
                        verdict = Verdict::NoMatch {
                            awaiting_consent: true,
                        };
                    }
                }
            }
            let mut r = result(action, verdict);
            if r.policy == NO_MATCH {
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

    /// `{role} ∪ parentRoles(role)` through role policies, recursively.
    fn role_set(
        &self,
        role: &str,
        version: &str,
        chain: &[(String, Option<Arc<Policy>>)],
    ) -> Vec<String> {
        let mut out = vec![role.to_string()];
        let mut i = 0;
        while i < out.len() && out.len() < 64 {
            let r = out[i].clone();
            if let Some(by_scope) = self.set.roles.get(&(r, version.to_string())) {
                for (scope, _) in chain {
                    if let Some(rp) = by_scope.get(scope) {
                        for parent in &rp.parent_roles {
                            if !out.contains(parent) {
                                out.push(parent.clone());
                            }
                        }
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

    fn derive_roles(&mut self, level: &mut ScopeLevel, action: &str, all_roles: &[String]) {
        let Some(policy) = level.resource.clone() else {
            return;
        };
        level.derived.clear();
        level.active_names.clear();
        for dr in &policy.derived_roles {
            let parent_ok = dr
                .parent_roles
                .iter()
                .any(|g| all_roles.iter().any(|r| g.matches(r)));
            let (active, error) = if !parent_ok {
                (false, None)
            } else {
                match &dr.condition {
                    None => (true, None),
                    Some(cond) => {
                        let ctx = self.ctx(action, &dr.constants, &dr.variables, &self.no_roles);
                        match eval_cond(cond, &ctx) {
                            Ok(b) => (b, None),
                            Err((expr, msg)) => {
                                self.out.evaluation_errors.push(EvalError {
                                    action: action.to_string(),
                                    policy: format!("derived_roles.{}", dr.set),
                                    rule: dr.name.clone(),
                                    expression: expr,
                                    message: msg.clone(),
                                });
                                (false, Some(msg))
                            }
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
            if active {
                level.active_names.push(dr.name.clone());
            }
            level.derived.push((dr.clone(), active));
        }
    }

    fn walk_principal(&mut self, action: &str, chain: &[(String, Option<Arc<Policy>>)]) -> Verdict {
        let kind = self.input.resource.kind.clone();
        let mut awaiting = false;
        for (_, policy) in chain {
            let Some(policy) = policy else { continue };
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
                    awaiting = true;
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
        Verdict::NoMatch {
            awaiting_consent: awaiting,
        }
    }

    fn resource_pass(
        &mut self,
        action: &str,
        levels: &[ScopeLevel],
        role_sets: &[(String, Vec<String>)],
    ) -> Verdict {
        let mut effect = Verdict::NoMatch {
            awaiting_consent: false,
        };
        for (role, role_set) in role_sets {
            let v = self.walk_role(action, role, role_set, levels);
            let is_allow = matches!(
                v,
                Verdict::Decided {
                    effect: Effect::Allow,
                    ..
                }
            );
            match (&effect, &v) {
                (
                    Verdict::NoMatch {
                        awaiting_consent: false,
                    },
                    _,
                ) => effect = v.clone(),
                (
                    Verdict::NoMatch {
                        awaiting_consent: true,
                    },
                    Verdict::Decided { .. },
                ) => effect = v.clone(),
                _ => {}
            }
            if is_allow {
                effect = v;
                break;
            }
        }
        effect
    }

    fn walk_role(
        &mut self,
        action: &str,
        role: &str,
        role_set: &[String],
        levels: &[ScopeLevel],
    ) -> Verdict {
        let kind = self.input.resource.kind.clone();
        let mut awaiting = false;
        for level in levels {
            // Role-policy constraints come first: an unlisted action is a DENY for this role.
            for (rp_role, rp) in &level.role_policies {
                if rp_role != role {
                    continue;
                }
                let mut allowed = false;
                for rule in &rp.rules {
                    let resource_ok = rule.resource.as_ref().is_some_and(|g| g.matches(&kind));
                    if !resource_ok || !rule.actions.iter().any(|g| g.matches(action)) {
                        continue;
                    }
                    if let RuleOutcome::Allow = self.apply_rule(
                        action,
                        "resource",
                        Some(role),
                        rp,
                        rule,
                        &level.active_names,
                    ) {
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
            let Some(policy) = &level.resource else {
                continue;
            };
            let mut has_allow: Option<String> = None;
            let consent =
                policy.scope_permissions == ScopePermissions::RequireParentalConsentForAllows;
            for rule in &policy.rules {
                if !rule.actions.iter().any(|g| g.matches(action)) {
                    continue;
                }
                let by_role = rule
                    .roles
                    .iter()
                    .any(|g| role_set.iter().any(|r| g.matches(r)));
                let by_derived = rule.derived_roles.iter().any(|name| {
                    level.derived.iter().any(|(dr, active)| {
                        *active
                            && &dr.name == name
                            && dr
                                .parent_roles
                                .iter()
                                .any(|g| role_set.iter().any(|r| g.matches(r)))
                    })
                });
                let derived_declined = !by_role
                    && rule.derived_roles.iter().any(|name| {
                        level.derived.iter().any(|(dr, active)| {
                            !*active
                                && &dr.name == name
                                && dr
                                    .parent_roles
                                    .iter()
                                    .any(|g| role_set.iter().any(|r| g.matches(r)))
                        })
                    });
                if !by_role && !by_derived {
                    // In a consent scope, a conditional ALLOW whose derived role did not hold
                    // does not deny: only a false *rule* condition does.
                    let _ = derived_declined;
                    continue;
                }
                let outcome = self.apply_rule(
                    action,
                    "resource",
                    Some(role),
                    policy,
                    rule,
                    &level.active_names,
                );
                match outcome {
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
                    RuleOutcome::Nothing => {
                        if consent && rule.effect == Effect::Allow && rule.condition.is_some() {
                            self.out.trace.steps.push(Step {
                                action: action.to_string(),
                                pass: "resource",
                                role: Some(role.to_string()),
                                policy: policy.key.clone(),
                                scope: policy.scope.clone(),
                                rule: rule.name.clone(),
                                effect: Effect::Deny,
                                outcome: StepOutcome::ImplicitDeny,
                                error: None,
                            });
                            return Verdict::Decided {
                                effect: Effect::Deny,
                                policy: policy.clone(),
                                rule: rule.name.clone(),
                                role: Some(role.to_string()),
                            };
                        }
                    }
                }
            }
            if let Some(rule) = has_allow {
                if consent {
                    awaiting = true;
                    self.consent_step(action, "resource", Some(role), policy, &rule);
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
        Verdict::NoMatch {
            awaiting_consent: awaiting,
        }
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
            Some(cond) => {
                let ctx = self.ctx(action, &policy.constants, &policy.variables, derived);
                eval_cond(cond, &ctx)
            }
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
                (o, StepOutcome::Activated, None)
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
                let o = match self.params.evaluation {
                    Evaluation::Strict => RuleOutcome::Deny,
                    Evaluation::Lenient => RuleOutcome::Nothing,
                };
                (o, StepOutcome::Error, Some(message))
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

    fn output(
        &mut self,
        action: &str,
        policy: &Arc<Policy>,
        derived: &[String],
        src: &str,
        expr: Option<&super::cel::Expr>,
    ) {
        let Some(expr) = expr else { return };
        if self
            .out
            .outputs
            .iter()
            .any(|o| o.src == src && o.action == action)
        {
            return;
        }
        let ctx = self.ctx(action, &policy.constants, &policy.variables, derived);
        let (val, error) = match expr.eval_json(&ctx) {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
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

fn result(action: &str, verdict: Verdict) -> ActionResult {
    match verdict {
        Verdict::NoMatch { awaiting_consent } => {
            let (policy, reason) = if awaiting_consent {
                (
                    NO_MATCH_FOR_SCOPE_PERMISSIONS,
                    "denied: allowed in a scope that requires parental consent, and no parent scope allowed it",
                )
            } else {
                (NO_MATCH, "denied by default: no policy rule matched")
            };
            ActionResult {
                action: action.to_string(),
                effect: Effect::Deny,
                policy: policy.to_string(),
                scope: String::new(),
                rule: String::new(),
                reason: reason.to_string(),
            }
        }
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
                    "{verb} by {} (action not listed for this resource)",
                    policy.key
                )
            } else {
                format!("{verb} by {}#{rule}", policy.key)
            };
            let reason = match (role, policy.kind) {
                (Some(role), PolicyKind::Resource | PolicyKind::Role) => {
                    format!("{by} for role {role}")
                }
                _ => by,
            };
            ActionResult {
                action: action.to_string(),
                effect,
                policy: policy.key.clone(),
                scope: policy.scope.clone(),
                rule,
                reason,
            }
        }
    }
}

/// Evaluates a condition tree with CEL's error absorption: `all` is false if any child is
/// false, else an error if any child errs; `any` mirrors it; `none` is `!any`.
/// The error names the failing expression.
pub fn eval_cond(cond: &Cond, ctx: &EvalCtx<'_>) -> Result<bool, (String, String)> {
    match cond {
        Cond::Expr(e) => e.eval_bool(ctx).map_err(|m| (e.source().to_string(), m)),
        Cond::All(children) => {
            let mut first_err = None;
            for c in children {
                match eval_cond(c, ctx) {
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
                match eval_cond(c, ctx) {
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
