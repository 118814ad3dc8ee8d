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
use super::input::{CheckInput, Evaluation, Params, Principal, Resource, SchemaEnforcement};
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
    /// Whether deciding read the clock: a condition or output called `now()`, or a visited
    /// policy has a variable that does (Cerbos evaluates a policy's variables eagerly).
    /// Test suites without `options.now` report such checks as errored, as Cerbos does.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub used_now: bool,
    /// Whether an evaluated expression actually resolved `now()` (narrower than
    /// [`CheckOutput::used_now`]: a visited policy's unread clock variable does not count).
    /// An evaluation that did not read it gives the same answer at any time (replay's memo).
    #[serde(skip)]
    pub read_clock: bool,
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
    /// Strict evaluation: an evaluation error reached the action, which is denied outright
    /// (Cerbos's `strictEvaluation`). Names the policy and rule where the error happened.
    Failed {
        policy: Arc<Policy>,
        rule: String,
        role: Option<String>,
        message: String,
    },
}

/// A derived role's state for one request at one scope.
#[derive(Debug, Clone, PartialEq)]
enum DerivedState {
    Active,
    Inactive,
    /// Its condition raised an error (lenient evaluation reads this as inactive).
    Failed(String),
}

/// Derived roles of one scope for one action: (action, [(definition, state)]).
type DerivedForAction = (String, Vec<(Arc<DerivedRole>, DerivedState)>);

/// One scope of the resource pass: its resource policy and the role policies there.
struct Level {
    scope: String,
    resource: Option<Arc<Policy>>,
    /// Role policies at this scope, by role name.
    role_policies: Vec<(String, Arc<Policy>)>,
    /// Derived roles evaluated here, for the action they name (or for every action of the
    /// check, with `derived_any_action`).
    derived: Option<DerivedForAction>,
    /// `derived` holds for every action of this check: no derived role here may read the
    /// action, and their evaluation raised no error (errors are recorded per action).
    derived_any_action: bool,
}

impl Level {
    fn active_names(&self) -> Vec<String> {
        match &self.derived {
            Some((_, d)) => d
                .iter()
                .filter(|(_, s)| *s == DerivedState::Active)
                .map(|(dr, _)| dr.name.clone())
                .collect(),
            None => Vec::new(),
        }
    }

    /// The first derived role of this scope whose condition failed, as a message.
    fn derived_failure(&self) -> Option<String> {
        self.derived.as_ref().and_then(|(_, d)| {
            d.iter().find_map(|(dr, s)| match s {
                DerivedState::Failed(m) => Some(format!("derived role {}: {m}", dr.name)),
                _ => None,
            })
        })
    }

    fn role_policy(&self, role: &str) -> Option<&Arc<Policy>> {
        self.role_policies
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, p)| p)
    }
}

/// What the derived roles of a scope give a condition: the active names, and under strict
/// evaluation the failure that makes `runtime.effectiveDerivedRoles` an error.
#[derive(Debug, Clone, Default)]
struct DerivedView {
    active: Vec<String>,
    failure: Option<String>,
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
    input: CheckRef<'a>,
    params: &'a Params,
    request: Request<'a>,
    out: CheckOutput,
}

/// A check's parts, borrowed: the gateway asks about a caller's shared principal without
/// copying it into a [`CheckInput`].
#[derive(Debug, Clone, Copy)]
pub struct CheckRef<'a> {
    pub principal: &'a Principal,
    pub resource: &'a Resource,
    pub actions: &'a [String],
    pub aux_data: &'a Value,
}

impl<'a> CheckRef<'a> {
    pub fn of(input: &'a CheckInput) -> CheckRef<'a> {
        CheckRef {
            principal: &input.principal,
            resource: &input.resource,
            actions: &input.actions,
            aux_data: &input.aux_data,
        }
    }
}

/// Decides every action of `input` against `set`.
pub fn check(set: &PolicySet, input: &CheckInput, params: &Params) -> CheckOutput {
    check_ref(set, CheckRef::of(input), params)
}

/// [`check`] over borrowed parts.
pub fn check_ref(set: &PolicySet, input: CheckRef<'_>, params: &Params) -> CheckOutput {
    let request = Request {
        principal: input.principal,
        resource: input.resource,
        aux_data: input.aux_data,
        now: params.now,
        globals: &params.globals,
        clock_read: Default::default(),
    };
    let mut c = Checker {
        set,
        input,
        params,
        request,
        out: CheckOutput::default(),
    };
    c.run();
    c.out.read_clock = c
        .request
        .clock_read
        .load(std::sync::atomic::Ordering::Relaxed);
    c.out.used_now |= c.out.read_clock;
    c.out
}

fn version<'a>(v: &'a str, default: &'a str) -> &'a str {
    if v.is_empty() { default } else { v }
}

impl<'a> Checker<'a> {
    fn run(&mut self) {
        let p = self.input.principal;
        let r = self.input.resource;
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
        // Cerbos's `ScopedPrincipalExists`: a principal policy of the principal's version, of
        // any principal, along the chain. It names the pass in `matchedPolicy`.
        let principal_exists = principal_scopes.iter().any(|s| {
            self.set
                .principal_versions
                .contains(&(p_version.clone(), s.clone()))
        });
        let principal_key = Some(match principal_exists {
            true => policy_key(
                PolicyKind::Principal,
                &p.id,
                &p_version,
                &principal_scopes[0],
            ),
            false => NO_MATCH.to_string(),
        });

        let resource_scopes = walk_scopes(&r_scope, &self.set.resource_scopes, lenient);
        let by_kind = self.set.resources.get(&(r.kind.clone(), r_version.clone()));
        let mut levels: Vec<Level> = resource_scopes
            .iter()
            .map(|scope| Level {
                scope: scope.clone(),
                resource: by_kind.and_then(|b| b.get(scope)).cloned(),
                role_policies: Vec::new(),
                derived: None,
                derived_any_action: false,
            })
            .collect();
        // As in Cerbos, a role-policy rule naming this kind also makes a resource policy
        // "exist" for `matchedPolicy` (its rows are resource rows in Cerbos's index).
        let named_by_role_policy = || {
            self.set.roles.iter().any(|((_, v), by_scope)| {
                *v == r_version
                    && resource_scopes.iter().any(|scope| {
                        by_scope.get(scope).is_some_and(|rp| {
                            rp.rules.iter().any(|rule| {
                                rule.resource.as_ref().is_some_and(|g| g.matches(&r.kind))
                            })
                        })
                    })
            })
        };
        let resource_exists = levels.iter().any(|l| l.resource.is_some()) || named_by_role_policy();
        let resource_key =
            resource_exists.then(|| match levels.first().and_then(|l| l.resource.as_ref()) {
                // The most specific scope's own policy: the key to report, formatted at compile.
                Some(policy) => policy.key.clone(),
                None => policy_key(
                    PolicyKind::Resource,
                    &r.kind,
                    &r_version,
                    &resource_scopes[0],
                ),
            });

        let rejected = self.validate(&r_version);

        // Custom roles inherit their parents' permissions; parents are resolved at exactly
        // the resource's scope, as Cerbos does.
        let role_sets: Vec<(String, Vec<String>)> = p
            .roles
            .iter()
            .map(|role| (role.clone(), self.role_set(role, &r_scope)))
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

        let actions = self.input.actions;
        let mut effective: Vec<String> = Vec::new();
        for action in actions {
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
            // As Cerbos: with no principal policy of the principal's version and no resource
            // policy along the chains, nothing is evaluated (every action is NO_MATCH).
            let anything = principal_exists || resource_exists;
            if anything && !principal_chain.is_empty() {
                verdict = self.walk_principal(action, &principal_chain);
            }
            if anything && matches!(verdict, Verdict::NoMatch) {
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

    /// `{role} ∪ parentRoles(role)` through role policies at `scope`, recursively. As in
    /// Cerbos, parent roles belong to the scope, whatever the role policy's version.
    fn role_set(&self, role: &str, scope: &str) -> Vec<String> {
        let mut out = vec![role.to_string()];
        let mut i = 0;
        while i < out.len() && out.len() < 64 {
            let key = (out[i].clone(), scope.to_string());
            if let Some(parents) = self.set.role_parents.get(&key) {
                for parent in parents {
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
        let r = self.input.resource;
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
        derived: &'c DerivedView,
    ) -> EvalCtx<'c> {
        EvalCtx {
            env: &self.set.env,
            request: &self.request,
            action,
            constants,
            variables,
            effective_derived_roles: &derived.active,
            derived_roles_error: derived.failure.as_deref(),
        }
    }

    fn lenient(&self) -> bool {
        self.params.evaluation == Evaluation::Lenient
    }

    /// Evaluates a condition. Lenient: CEL errors are recorded here and read as `false`.
    /// Strict: the first error met (in Cerbos's order) is returned and recorded.
    fn condition(
        &mut self,
        cond: &Cond,
        ctx_parts: (&str, &Arc<Map<String, Value>>, &Variables, &DerivedView),
        at: (&str, &str),
    ) -> Result<bool, String> {
        let (action, constants, variables, derived) = ctx_parts;
        let lenient = self.lenient();
        let mut absorbed = Vec::new();
        let held = {
            let ctx = self.ctx(action, constants, variables, derived);
            eval_cond(cond, &ctx, lenient, &mut absorbed)
        };
        let failed = held.as_ref().err().cloned();
        for (expression, message) in absorbed.into_iter().chain(failed) {
            self.out.evaluation_errors.push(EvalError {
                action: action.to_string(),
                policy: at.0.to_string(),
                rule: at.1.to_string(),
                expression,
                message,
            });
        }
        held.map_err(|(expression, message)| format!("`{expression}`: {message}"))
    }

    /// Derived roles of `level`'s policy for this action (once per scope and action).
    fn derive_roles(&mut self, level: &mut Level, action: &str, all_roles: &[String]) {
        if level
            .derived
            .as_ref()
            .is_some_and(|(a, _)| level.derived_any_action || a == action)
        {
            return;
        }
        let Some(policy) = level.resource.clone() else {
            level.derived = Some((action.to_string(), Vec::new()));
            level.derived_any_action = true;
            return;
        };
        let mut out = Vec::new();
        let lenient = self.lenient();
        let errors_before = self.out.evaluation_errors.len();
        let mut any_action = true;
        for dr in &policy.derived_roles {
            let parent_ok = dr
                .parent_roles
                .iter()
                .any(|g| all_roles.iter().any(|r| g.matches(r)));
            if parent_ok {
                self.out.used_now |= dr.variables.use_now();
                any_action &= !dr.reads_action;
            }
            let state = if !parent_ok {
                DerivedState::Inactive
            } else {
                match &dr.condition {
                    None => DerivedState::Active,
                    Some(cond) => {
                        let at = format!("derived_roles.{}", dr.set);
                        let none = DerivedView::default();
                        match self.condition(
                            cond,
                            (action, &dr.constants, &dr.variables, &none),
                            (&at, &dr.name),
                        ) {
                            Ok(true) => DerivedState::Active,
                            Ok(false) => DerivedState::Inactive,
                            // Lenient (Cerbos's default): an erroring derived role is inactive.
                            Err(_) if lenient => DerivedState::Inactive,
                            Err(m) => DerivedState::Failed(m),
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
                    active: state == DerivedState::Active,
                    error: match &state {
                        DerivedState::Failed(m) => Some(m.clone()),
                        _ => None,
                    },
                });
            }
            any_action &= !matches!(state, DerivedState::Failed(_));
            out.push((dr.clone(), state));
        }
        level.derived_any_action = any_action && self.out.evaluation_errors.len() == errors_before;
        level.derived = Some((action.to_string(), out));
    }

    fn walk_principal(&mut self, action: &str, chain: &[Arc<Policy>]) -> Verdict {
        let kind = self.input.resource.kind.clone();
        let none = DerivedView::default();
        for policy in chain {
            let mut has_allow: Option<String> = None;
            for rule in &policy.rules {
                let resource_ok = rule.resource.as_ref().is_some_and(|g| g.matches(&kind));
                if !resource_ok || !rule.actions.iter().any(|g| g.matches(action)) {
                    continue;
                }
                self.out.used_now |= policy.variables.use_now();
                match self.apply_rule(action, "principal", None, policy, rule, &none) {
                    RuleOutcome::Deny => {
                        return Verdict::Decided {
                            effect: Effect::Deny,
                            policy: policy.clone(),
                            rule: rule.name.clone(),
                            role: None,
                        };
                    }
                    RuleOutcome::Failed(message) => {
                        return Verdict::Failed {
                            policy: policy.clone(),
                            rule: rule.name.clone(),
                            role: None,
                            message,
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
    /// first DENY, else no match. Under strict evaluation an error that reaches the action
    /// denies it outright: no later role is asked.
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
            match v {
                Verdict::Decided {
                    effect: Effect::Allow,
                    ..
                }
                | Verdict::Failed { .. } => return v,
                _ => {}
            }
            if matches!(effect, Verdict::NoMatch) {
                effect = v;
            }
        }
        effect
    }

    /// Does the role pass meet anything at this level? Cerbos applies a custom role's
    /// constraints at a scope only when its query there returns rows: a resource-policy rule
    /// for one of the roles (directly, or through a derived role's parent roles), or a
    /// role-policy rule of one of them naming this resource kind (`appendRolePolicyDenies`
    /// runs after the query's early return on an empty result; established with the 0.55.0
    /// binary, docs/compatibility.md).
    fn level_has_rows(&self, level: &Level, role_set: &[String], kind: &str) -> bool {
        let matches_set = |g: &super::glob::Glob| role_set.iter().any(|r| g.matches(r));
        let resource_rows = level.resource.as_ref().is_some_and(|policy| {
            policy.rules.iter().any(|rule| {
                rule.roles.iter().any(matches_set)
                    || rule.derived_roles.iter().any(|name| {
                        policy
                            .derived_roles
                            .iter()
                            .any(|dr| &dr.name == name && dr.parent_roles.iter().any(matches_set))
                    })
            })
        });
        resource_rows
            || role_set.iter().any(|r| {
                level.role_policy(r).is_some_and(|rp| {
                    rp.rules
                        .iter()
                        .any(|rule| rule.resource.as_ref().is_some_and(|g| g.matches(kind)))
                })
            })
    }

    /// A custom role's constraint at one level (Cerbos's synthetic DENY rows of a role
    /// policy): the action is denied unless a rule for this resource kind lists it, and every
    /// conditional rule that lists it holds. A role policy naming no rule for the kind denies
    /// every action. Returns the verdict when the constraint decides.
    fn role_policy_check(
        &mut self,
        action: &str,
        role: &str,
        rp: &Arc<Policy>,
        kind: &str,
        derived: &DerivedView,
    ) -> Option<Verdict> {
        let matching: Vec<&Rule> = rp
            .rules
            .iter()
            .filter(|rule| rule.resource.as_ref().is_some_and(|g| g.matches(kind)))
            .filter(|rule| rule.actions.iter().any(|g| g.matches(action)))
            .collect();
        if matching.is_empty() {
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
            return Some(Verdict::Decided {
                effect: Effect::Deny,
                policy: rp.clone(),
                rule: String::new(),
                role: Some(role.to_string()),
            });
        }
        for rule in matching {
            let held = match &rule.condition {
                None => Ok(true),
                Some(cond) => self.condition(
                    cond,
                    (action, &rp.constants, &rp.variables, derived),
                    (&rp.key, &rule.name),
                ),
            };
            let (outcome, effect, error) = match &held {
                Ok(true) => (StepOutcome::Activated, Effect::Allow, None),
                Ok(false) => (StepOutcome::RolePolicyDeny, Effect::Deny, None),
                Err(m) => (StepOutcome::Error, Effect::Deny, Some(m.clone())),
            };
            self.out.trace.steps.push(Step {
                action: action.to_string(),
                pass: "resource",
                role: Some(role.to_string()),
                policy: rp.key.clone(),
                scope: rp.scope.clone(),
                rule: rule.name.clone(),
                effect,
                outcome,
                error,
            });
            match held {
                Ok(true) => {
                    self.output(
                        action,
                        rp,
                        derived,
                        &rule.name,
                        rule.output_activated.as_ref(),
                    );
                }
                Ok(false) => {
                    self.output(
                        action,
                        rp,
                        derived,
                        &rule.name,
                        rule.output_not_met.as_ref(),
                    );
                    return Some(Verdict::Decided {
                        effect: Effect::Deny,
                        policy: rp.clone(),
                        rule: rule.name.clone(),
                        role: Some(role.to_string()),
                    });
                }
                Err(message) => {
                    return Some(Verdict::Failed {
                        policy: rp.clone(),
                        rule: rule.name.clone(),
                        role: Some(role.to_string()),
                        message,
                    });
                }
            }
        }
        None
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
        let strict = !self.lenient();
        for level in levels.iter_mut() {
            self.derive_roles(level, action, all_roles);
            let view = DerivedView {
                active: level.active_names(),
                failure: if strict {
                    level.derived_failure()
                } else {
                    None
                },
            };
            // Role policies first, in the role set's order: an action that a custom role (or
            // a parent custom role) does not allow here is a DENY for this role.
            if self.level_has_rows(level, role_set, &kind) {
                let constraints: Vec<Arc<Policy>> = role_set
                    .iter()
                    .filter_map(|r| level.role_policy(r).cloned())
                    .collect();
                for rp in constraints {
                    if let Some(v) = self.role_policy_check(action, role, &rp, &kind, &view) {
                        return v;
                    }
                }
            }
            let Some(policy) = level.resource.clone() else {
                continue;
            };
            let derived: Vec<(Arc<DerivedRole>, DerivedState)> = level
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
                let visited = by_role
                    || rule.derived_roles.iter().any(|name| {
                        derived.iter().any(|(dr, _)| {
                            &dr.name == name
                                && dr
                                    .parent_roles
                                    .iter()
                                    .any(|g| role_set.iter().any(|r| g.matches(r)))
                        })
                    });
                if visited {
                    self.out.used_now |= policy.variables.use_now();
                }
                // Cerbos visits a rule's role rows, then its derived-role rows (one per derived
                // role whose parent roles this role set holds). We evaluate the rule once: an
                // active derived role applies it, a failed one (strict) denies the action.
                let mut outcome = RuleOutcome::Nothing;
                let mut applied = false;
                if by_role {
                    outcome = self.apply_rule(action, "resource", Some(role), &policy, rule, &view);
                    applied = true;
                }
                for name in &rule.derived_roles {
                    if matches!(outcome, RuleOutcome::Deny | RuleOutcome::Failed(_)) {
                        break;
                    }
                    let Some((dr, state)) = derived.iter().find(|(dr, _)| {
                        &dr.name == name
                            && dr
                                .parent_roles
                                .iter()
                                .any(|g| role_set.iter().any(|r| g.matches(r)))
                    }) else {
                        continue;
                    };
                    match state {
                        DerivedState::Failed(m) if strict => {
                            let message = format!("derived role {}: {m}", dr.name);
                            self.out.trace.steps.push(Step {
                                action: action.to_string(),
                                pass: "resource",
                                role: Some(role.to_string()),
                                policy: policy.key.clone(),
                                scope: policy.scope.clone(),
                                rule: rule.name.clone(),
                                effect: Effect::Deny,
                                outcome: StepOutcome::Error,
                                error: Some(message.clone()),
                            });
                            outcome = RuleOutcome::Failed(message);
                        }
                        DerivedState::Active if !applied => {
                            outcome = self.apply_rule(
                                action,
                                "resource",
                                Some(role),
                                &policy,
                                rule,
                                &view,
                            );
                            applied = true;
                        }
                        _ => {}
                    }
                }
                match outcome {
                    RuleOutcome::Deny => {
                        return Verdict::Decided {
                            effect: Effect::Deny,
                            policy: policy.clone(),
                            rule: rule.name.clone(),
                            role: Some(role.to_string()),
                        };
                    }
                    RuleOutcome::Failed(message) => {
                        return Verdict::Failed {
                            policy: policy.clone(),
                            rule: rule.name.clone(),
                            role: Some(role.to_string()),
                            message,
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
        derived: &DerivedView,
    ) -> RuleOutcome {
        let held = match &rule.condition {
            None => Ok(true),
            Some(cond) => self.condition(
                cond,
                (action, &policy.constants, &policy.variables, derived),
                (&policy.key, &rule.name),
            ),
        };
        let (outcome, step, error) = match held {
            Ok(true) => {
                self.output(
                    action,
                    policy,
                    derived,
                    &rule.name,
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
                self.output(
                    action,
                    policy,
                    derived,
                    &rule.name,
                    rule.output_not_met.as_ref(),
                );
                (RuleOutcome::Nothing, StepOutcome::ConditionNotMet, None)
            }
            Err(message) => {
                // No output: Cerbos (strict) emits none for a rule whose condition failed.
                // INVARIANT: a CEL error never allows. Strict evaluation (the default) denies
                // the action outright, as Cerbos's `strictEvaluation` does; lenient evaluation
                // never gets here (errors read as `false`).
                (
                    RuleOutcome::Failed(message.clone()),
                    StepOutcome::Error,
                    Some(message),
                )
            }
        };
        let effect = match (&outcome, rule.effect) {
            (RuleOutcome::Deny | RuleOutcome::Failed(_), _) => Effect::Deny,
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

    /// Emits an output entry of `policy#rule`. As in Cerbos, once per rule visit (a rule
    /// visited in several role passes emits once per pass).
    fn output(
        &mut self,
        action: &str,
        policy: &Arc<Policy>,
        derived: &DerivedView,
        rule: &str,
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
            src: format!("{}#{rule}", policy.key),
            action: action.to_string(),
            val,
            error,
        });
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RuleOutcome {
    Allow,
    Deny,
    Nothing,
    /// Strict evaluation: the condition raised this error.
    Failed(String),
}

/// The action's result. `reported` is Cerbos's `matchedPolicy` for the pass that ran: the
/// key of the requested (first existing) scope, even when an ancestor scope decided; the
/// deciding scope goes to `matchedScope`, and the deciding policy and rule to the reason.
/// A failure (strict evaluation) is reported by the policy and scope where it happened.
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
        Verdict::Failed {
            policy,
            rule,
            role,
            message,
        } => {
            let mut reason = format!(
                "denied: evaluation error in {}#{rule} (strict evaluation): {message}",
                policy.key
            );
            if let Some(role) = role {
                reason.push_str(&format!(" (role {role})"));
            }
            ActionResult {
                action: action.to_string(),
                effect: Effect::Deny,
                policy: policy.key.clone(),
                scope: policy.scope.clone(),
                rule,
                reason,
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
            // Pushed, not formatted: an allowed call builds this on every check.
            let mut reason = String::with_capacity(96);
            reason.push_str(verb);
            reason.push_str(" by ");
            reason.push_str(&policy.key);
            if rule.is_empty() {
                reason.push_str(" (the custom role does not list this action)");
            } else {
                reason.push('#');
                reason.push_str(&rule);
                if policy.kind == PolicyKind::Role {
                    reason.push_str(" (the custom role's condition does not hold)");
                }
            }
            if let Some(role) = role {
                reason.push_str(" for role ");
                reason.push_str(&role);
            }
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
/// Strict (Cerbos's `strictEvaluation`): `all`, `any` and `none` visit their children in
/// order and stop at the first child that decides them or raises an error; the error is
/// returned with the failing expression. So `all(error, false)` is an error and
/// `all(false, error)` is false, as in Cerbos.
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
            for c in children {
                if !eval_cond(c, ctx, lenient, absorbed)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Cond::Any(children) => {
            for c in children {
                if eval_cond(c, ctx, lenient, absorbed)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Cond::None(children) => {
            for c in children {
                if eval_cond(c, ctx, lenient, absorbed)? {
                    return Ok(false);
                }
            }
            Ok(true)
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
