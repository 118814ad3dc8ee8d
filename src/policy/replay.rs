//! Re-evaluating one recorded decision under a candidate policy set (`toolgate policy replay`,
//! issue 18). Pure: the caller reads the audit store and hands in the principal, the resource,
//! the action, the recorded time, and the arguments when they are known exactly.
//!
//! Never guess: when the arguments (or a resource URI) are not known, the decision is evaluated
//! without them and reported as [`Replayed::NeedsArguments`] whenever its result could depend
//! on them: a rule, derived role or variable consulted on the way may read them
//! ([`may_read_unknown`], a conservative reading of the expression's source), an evaluation
//! error occurred (possibly on the missing value), or a schema consulted would validate them.
//!
//! Each answer says whether it could differ at another recorded time ([`Answer::timed`]), so a
//! caller may reuse a timeless answer for every decision with the same inputs.

use std::collections::HashSet;

use serde_json::Value;

use super::cel::{Expr, Variables};
use super::compile::{Cond, PolicySet};
use super::eval::{self, StepOutcome};
use super::input::{CheckInput, Params, Principal, Resource, SchemaEnforcement};
use super::model::Effect;

/// What replay knows of a value that policy saw but the store may not have kept.
#[derive(Debug, Clone, PartialEq)]
pub enum Known {
    /// The value, exactly as policy saw it (its digest matched the recorded one).
    Exact(Value),
    /// Not kept (`audit.arguments: none|digest`), or kept redacted or cut.
    Unknown,
    /// The decision had no such value.
    Absent,
}

/// One recorded decision to evaluate again.
#[derive(Debug, Clone)]
pub struct Case<'a> {
    pub principal: &'a Principal,
    /// The recorded resource; `arguments` and `uri` attributes, when present, are placeholders
    /// that [`Case::arguments`] and [`Case::uri`] fill.
    pub resource: &'a Resource,
    pub action: &'a str,
    pub arguments: Known,
    pub uri: Known,
    /// The recorded decision time: `now()` evaluates to it.
    pub now: chrono::DateTime<chrono::Utc>,
}

/// The candidate's answer for one case.
#[derive(Debug, Clone, PartialEq)]
pub enum Replayed {
    Decided {
        effect: Effect,
        policy: String,
        rule: String,
        reason: String,
    },
    /// The answer could depend on arguments the store does not hold exactly.
    NeedsArguments,
}

/// [`Replayer::replay`]'s answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub replayed: Replayed,
    /// Whether the answer could depend on the recorded time: evaluating it resolved `now()`,
    /// or consulted a rule (condition or output) or derived role whose expressions, or the
    /// variables they read, call `now()` or `timeSince` (a static, conservative reading of the
    /// compiled set). An untimed answer is the answer at every time: evaluation is
    /// deterministic, and it never reached the clock.
    pub timed: bool,
}

/// A candidate set prepared for replay: which rules, derived roles and policies may read the
/// arguments or the URI. Build once per set ([`Replayer::new`]), share across threads.
#[derive(Debug)]
pub struct Replayer<'s> {
    set: &'s PolicySet,
    params: Params,
    /// (policy key, rule name) of rules whose condition may read an unknown value.
    rules: HashSet<(String, String)>,
    /// Derived role names (any set) whose condition may read one.
    derived: HashSet<String>,
    /// Policy keys with a resource schema (validation reads every attribute).
    schemas: HashSet<String>,
    /// (policy key, rule name) of rules whose condition or outputs may read the clock.
    clock_rules: HashSet<(String, String)>,
    /// Derived role names (any set) whose condition may read the clock.
    clock_derived: HashSet<String>,
}

impl<'s> Replayer<'s> {
    /// `params` carries the candidate's globals and evaluation mode; `now` is set per case.
    pub fn new(set: &'s PolicySet, params: Params) -> Replayer<'s> {
        let mut rules = HashSet::new();
        let mut derived = HashSet::new();
        let mut schemas = HashSet::new();
        let mut clock_rules = HashSet::new();
        let mut clock_derived = HashSet::new();
        for p in &set.all {
            for r in &p.rules {
                let clock = |e: &Expr| expr_reads_clock(e, &p.variables, &mut HashSet::new());
                if r.condition
                    .as_ref()
                    .is_some_and(|c| cond_reads_clock(c, &p.variables))
                    || r.output_activated.as_ref().is_some_and(clock)
                    || r.output_not_met.as_ref().is_some_and(clock)
                {
                    clock_rules.insert((p.key.clone(), r.name.clone()));
                }
                if r.condition
                    .as_ref()
                    .is_some_and(|c| cond_may_read(c, &p.variables))
                {
                    rules.insert((p.key.clone(), r.name.clone()));
                }
            }
            for d in &p.derived_roles {
                if d.condition
                    .as_ref()
                    .is_some_and(|c| cond_may_read(c, &d.variables))
                {
                    derived.insert(d.name.clone());
                }
                if d.condition
                    .as_ref()
                    .is_some_and(|c| cond_reads_clock(c, &d.variables))
                {
                    clock_derived.insert(d.name.clone());
                }
            }
            if p.resource_schema.is_some() {
                schemas.insert(p.key.clone());
            }
        }
        Replayer {
            set,
            params,
            rules,
            derived,
            schemas,
            clock_rules,
            clock_derived,
        }
    }

    /// The candidate's answer for `case`.
    pub fn replay(&self, case: &Case<'_>) -> Answer {
        let mut resource = case.resource.clone();
        let mut unknown = false;
        for (key, known) in [("arguments", &case.arguments), ("uri", &case.uri)] {
            match known {
                Known::Exact(v) => {
                    resource.attr.insert(key.to_string(), v.clone());
                }
                Known::Unknown => {
                    resource.attr.remove(key);
                    unknown = true;
                }
                Known::Absent => {
                    resource.attr.remove(key);
                }
            }
        }
        // The action names the URI (`resources/read::U`): an unknown URI is an unknown action.
        if case.uri == Known::Unknown {
            return Answer {
                replayed: Replayed::NeedsArguments,
                timed: false,
            };
        }
        let input = CheckInput {
            principal: case.principal.clone(),
            resource,
            actions: vec![case.action.to_string()],
            aux_data: Value::Null,
        };
        let params = Params {
            now: case.now,
            ..self.params.clone()
        };
        let out = eval::check(self.set, &input, &params);
        let timed = out.read_clock || self.consulted_clock(&out);
        if unknown && self.depends_on_unknown(&out) {
            return Answer {
                replayed: Replayed::NeedsArguments,
                timed,
            };
        }
        let replayed = match out.actions.into_iter().find(|a| a.action == case.action) {
            Some(a) => Replayed::Decided {
                effect: a.effect,
                policy: a.policy,
                rule: a.rule,
                reason: a.reason,
            },
            None => Replayed::Decided {
                effect: Effect::Deny,
                policy: eval::NO_MATCH.to_string(),
                rule: String::new(),
                reason: "no decision for the action".to_string(),
            },
        };
        Answer { replayed, timed }
    }

    /// Did this evaluation consult a rule or derived role that may read the clock?
    fn consulted_clock(&self, out: &eval::CheckOutput) -> bool {
        out.trace.steps.iter().any(|s| {
            self.clock_rules
                .contains(&(s.policy.clone(), s.rule.clone()))
        }) || out
            .trace
            .derived_roles
            .iter()
            .any(|d| self.clock_derived.contains(&d.name))
    }

    /// Could this evaluation's result change with the value it did not have?
    fn depends_on_unknown(&self, out: &eval::CheckOutput) -> bool {
        if !out.evaluation_errors.is_empty() || !out.validation_errors.is_empty() {
            return true;
        }
        let conditions_ran = out.trace.steps.iter().any(|s| {
            !matches!(s.outcome, StepOutcome::RolePolicyDeny)
                && self.rules.contains(&(s.policy.clone(), s.rule.clone()))
        });
        if conditions_ran || out.trace.steps.iter().any(|s| s.error.is_some()) {
            return true;
        }
        if out
            .trace
            .derived_roles
            .iter()
            .any(|d| d.error.is_some() || self.derived.contains(&d.name))
        {
            return true;
        }
        self.params.schema_enforcement != SchemaEnforcement::None
            && out.trace.policies.iter().any(|k| self.schemas.contains(k))
    }
}

/// Whether any expression of a condition tree (or a variable it reads) may read an unknown value.
fn cond_may_read(c: &Cond, vars: &Variables) -> bool {
    match c {
        Cond::Expr(e) => expr_may_read(e, vars, &mut HashSet::new()),
        Cond::All(v) | Cond::Any(v) | Cond::None(v) => v.iter().any(|c| cond_may_read(c, vars)),
    }
}

/// Whether any expression of a condition tree (or a variable it reads) may read the clock.
fn cond_reads_clock(c: &Cond, vars: &Variables) -> bool {
    match c {
        Cond::Expr(e) => expr_reads_clock(e, vars, &mut HashSet::new()),
        Cond::All(v) | Cond::Any(v) | Cond::None(v) => v.iter().any(|c| cond_reads_clock(c, vars)),
    }
}

fn expr_reads_clock(e: &Expr, vars: &Variables, seen: &mut HashSet<String>) -> bool {
    e.uses_now()
        || e.variables_used().iter().any(|name| {
            seen.insert(name.clone())
                && vars
                    .expr(name)
                    .is_some_and(|v| expr_reads_clock(v, vars, seen))
        })
}

fn expr_may_read(e: &Expr, vars: &Variables, seen: &mut HashSet<String>) -> bool {
    if may_read_unknown(e.source()) {
        return true;
    }
    e.variables_used().iter().any(|name| {
        seen.insert(name.clone())
            && vars
                .expr(name)
                .is_some_and(|v| expr_may_read(v, vars, seen))
    })
}

/// A conservative reading of a CEL source: `true` unless every use of the resource's attributes
/// is a fixed field other than `arguments` and `uri` (`R.attr.server`, `R.attr["tool_name"]`).
/// It is `true` when the text names `arguments` or `uri` anywhere, or uses `attr`, `R`,
/// `resource`, `request` or the variables map whole or with a computed key (`R.attr[k]`,
/// `size(R.attr)`, `"arguments" in R.attr`), since those could reach them. Over-reporting
/// only turns an answer into "needs arguments"; it never makes one up.
pub fn may_read_unknown(src: &str) -> bool {
    if src.contains("arguments") || src.contains("uri") {
        return true;
    }
    let b = src.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let Some(&c) = b.get(i) else { break };
        if c == b'"' || c == b'\'' {
            // Skip a string literal (escapes included).
            i += 1;
            while let Some(&d) = b.get(i) {
                i += 1;
                if d == b'\\' {
                    i += 1;
                } else if d == c {
                    break;
                }
            }
            continue;
        }
        if !ident(c) {
            i += 1;
            continue;
        }
        let start = i;
        while b.get(i).is_some_and(|&d| ident(d)) {
            i += 1;
        }
        let word = src.get(start..i).unwrap_or("");
        let after_dot = start > 0 && prev_non_space(b, start) == Some(b'.');
        let whole_roots = ["attr", "R", "resource", "request", "V", "variables"];
        if !whole_roots.contains(&word) || (after_dot && word != "attr" && word != "resource") {
            continue;
        }
        if word == "attr" && !after_dot {
            // A bare `attr` is a comprehension variable or the like, not the resource's.
            continue;
        }
        // `P.attr` is the principal's: not the resource's values.
        if word == "attr" && preceded_by_principal(src, start) {
            continue;
        }
        let mut j = i;
        while b.get(j).is_some_and(|d| d.is_ascii_whitespace()) {
            j += 1;
        }
        match b.get(j) {
            Some(b'.') => {
                // `.field` is fine; `.exists(…)`, `.all(…)`, `.size()` use the map whole.
                let mut k = j + 1;
                while b.get(k).is_some_and(|d| d.is_ascii_whitespace()) {
                    k += 1;
                }
                while b.get(k).is_some_and(|&d| ident(d)) {
                    k += 1;
                }
                while b.get(k).is_some_and(|d| d.is_ascii_whitespace()) {
                    k += 1;
                }
                if b.get(k) == Some(&b'(') {
                    return true;
                }
            }
            Some(b'[') => {
                let mut k = j + 1;
                while b.get(k).is_some_and(|d| d.is_ascii_whitespace()) {
                    k += 1;
                }
                if !matches!(b.get(k), Some(b'"' | b'\'')) {
                    return true;
                }
            }
            _ => return true,
        }
    }
    false
}

fn prev_non_space(b: &[u8], at: usize) -> Option<u8> {
    b.get(..at)?
        .iter()
        .rev()
        .copied()
        .find(|c| !c.is_ascii_whitespace())
}

/// Is the `attr` at `at` the principal's (`P.attr`, `principal.attr`)?
fn preceded_by_principal(src: &str, at: usize) -> bool {
    let before = src.get(..at).unwrap_or("").trim_end();
    let before = before.strip_suffix('.').unwrap_or(before).trim_end();
    let tail: String = before
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    tail == "P" || tail == "principal"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::{SourceFile, compile};

    const TIMED: &str = r#"
apiVersion: api.cerbos.dev/v1
resourcePolicy:
  resource: doc
  version: default
  variables:
    local:
      morning: now().getHours() < 12
      unread_clock: timeSince(timestamp("2020-01-01T00:00:00Z")) > duration("1h")
  rules:
    - name: read_any_time
      actions: [read]
      effect: EFFECT_ALLOW
      roles: [user]
    - name: write_mornings
      actions: [write]
      effect: EFFECT_ALLOW
      roles: [user]
      condition:
        match:
          expr: V.morning
    - name: stamp_outputs_the_time
      actions: [stamp]
      effect: EFFECT_ALLOW
      roles: [user]
      output:
        when:
          ruleActivated: string(now())
"#;

    fn answer(set: &PolicySet, action: &str, hour: u32) -> Answer {
        let principal: Principal =
            serde_json::from_value(serde_json::json!({"id": "a", "roles": ["user"]})).unwrap();
        let resource: Resource =
            serde_json::from_value(serde_json::json!({"kind": "doc", "id": "d"})).unwrap();
        let now = chrono::DateTime::parse_from_rfc3339(&format!("2026-01-05T{hour:02}:00:00Z"))
            .unwrap()
            .with_timezone(&chrono::Utc);
        Replayer::new(set, Params::default()).replay(&Case {
            principal: &principal,
            resource: &resource,
            action,
            arguments: Known::Absent,
            uri: Known::Absent,
            now,
        })
    }

    /// `timed` is what lets the memo reuse an answer for another time: set exactly when the
    /// answer could differ (not merely because the policy has a clock variable it never read).
    #[test]
    fn answers_that_read_the_clock_are_timed_and_only_those() {
        let set = compile(
            &[SourceFile {
                name: "doc.yaml".into(),
                bytes: TIMED.as_bytes().to_vec(),
            }],
            &Default::default(),
        )
        .unwrap();
        let read = answer(&set, "read", 9);
        assert!(!read.timed, "{read:?}");
        assert_eq!(read, answer(&set, "read", 15));
        let (morning, evening) = (answer(&set, "write", 9), answer(&set, "write", 15));
        assert!(morning.timed && evening.timed);
        assert_ne!(morning.replayed, evening.replayed);
        assert!(answer(&set, "stamp", 9).timed);
        // The static reading alone (the rules consulted) marks them too.
        let r = Replayer::new(&set, Params::default());
        assert!(
            r.clock_rules
                .contains(&("resource.doc.vdefault".into(), "write_mornings".into()))
        );
        assert!(r.clock_rules.contains(&(
            "resource.doc.vdefault".into(),
            "stamp_outputs_the_time".into()
        )));
        assert!(
            !r.clock_rules
                .contains(&("resource.doc.vdefault".into(), "read_any_time".into()))
        );
    }

    #[test]
    fn sources_that_may_read_arguments() {
        for src in [
            "R.attr.arguments.owner == 'x'",
            "has(R.attr.arguments)",
            "request.resource.attr.arguments.size() > 0",
            "R.attr['arguments'].x",
            "size(R.attr) > 3",
            "R.attr[k] == 1",
            "'a' in R.attr",
            "R.attr.uri.startsWith('file:')",
            "request.resource == null",
            "R.attr.exists(k, k == 'z')",
        ] {
            assert!(may_read_unknown(src), "{src}");
        }
        for src in [
            "R.attr.tool_name == 'deploy'",
            "R.attr[\"server\"] == 'gh' && P.attr.login == 'a'",
            "size(P.attr) > 1",
            "'tag:ci' in P.roles",
            "R.id == 'github' && R.kind == 'mcp_server'",
            "now() > timestamp('2026-01-01T00:00:00Z')",
            "request.principal.attr.node.endsWith('.ts.net')",
            "R.attr.annotations.readOnlyHint == true",
        ] {
            assert!(!may_read_unknown(src), "{src}");
        }
    }
}
