//! Policy coverage from the explain traces of every test check: which rules no test reached,
//! which conditions never came out both true and false, and which action patterns of a rule no
//! tested action matched. Derived role definitions are covered the same way (reached when a
//! principal had a parent role; condition outcomes from their activation).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::sync::Arc;

use serde::Serialize;

use crate::policy::compile::{Policy, PolicyKind, PolicySet};
use crate::policy::eval::{CheckOutput, StepOutcome};

/// What the tests did to one rule or derived role.
#[derive(Debug, Default)]
struct Stats {
    reached: bool,
    cond_true: bool,
    cond_false: bool,
    cond_error: bool,
    /// Actions the rule was consulted for.
    actions: BTreeSet<String>,
}

/// Gathers traces while the suites run.
#[derive(Debug)]
pub(super) struct Collector<'a> {
    set: &'a PolicySet,
    by_key: HashMap<&'a str, &'a Arc<Policy>>,
    /// (policy key, rule name) → stats.
    rules: HashMap<(String, String), Stats>,
    /// (file, YAML path) of a derived role definition → stats.
    derived: HashMap<(String, String), Stats>,
}

impl<'a> Collector<'a> {
    pub fn new(set: &'a PolicySet) -> Self {
        Collector {
            set,
            by_key: set.all.iter().map(|p| (p.key.as_str(), p)).collect(),
            rules: HashMap::new(),
            derived: HashMap::new(),
        }
    }

    pub fn record(&mut self, out: &CheckOutput) {
        for st in &out.trace.steps {
            if st.rule.is_empty() {
                continue;
            }
            let s = self
                .rules
                .entry((st.policy.clone(), st.rule.clone()))
                .or_default();
            s.reached = true;
            s.actions.insert(st.action.clone());
            match st.outcome {
                StepOutcome::Activated => s.cond_true = true,
                StepOutcome::ConditionNotMet => s.cond_false = true,
                StepOutcome::Error => s.cond_error = true,
                _ => {}
            }
        }
        for d in &out.trace.derived_roles {
            for key in &out.trace.policies {
                let Some(p) = self.by_key.get(key.as_str()) else {
                    continue;
                };
                if p.kind != PolicyKind::Resource || p.scope != d.scope {
                    continue;
                }
                for dr in p.derived_roles.iter().filter(|dr| dr.name == d.name) {
                    let s = self
                        .derived
                        .entry((dr.file.clone(), dr.path.clone()))
                        .or_default();
                    s.reached = true;
                    if d.error.is_some() {
                        s.cond_error = true;
                    } else if d.active {
                        s.cond_true = true;
                    } else {
                        s.cond_false = true;
                    }
                }
            }
        }
    }

    pub fn finish(self) -> Coverage {
        let empty = Stats::default();
        let mut policies = Vec::new();
        for p in &self.set.all {
            let mut pc = PolicyCoverage {
                policy: p.key.clone(),
                kind: match p.kind {
                    PolicyKind::Resource => "resource",
                    PolicyKind::Principal => "principal",
                    PolicyKind::Role => "role",
                }
                .to_string(),
                file: p.file.clone(),
                ..PolicyCoverage::default()
            };
            for rule in &p.rules {
                let s = self
                    .rules
                    .get(&(p.key.clone(), rule.name.clone()))
                    .unwrap_or(&empty);
                pc.note(&rule.name, &rule.path, s, rule.condition.is_some());
                for (j, g) in rule.actions.iter().enumerate() {
                    pc.actions.total += 1;
                    if s.actions.iter().any(|a| g.matches(a)) {
                        pc.actions.covered += 1;
                    } else if s.reached {
                        let path = match p.kind {
                            PolicyKind::Resource => format!("{}.actions[{j}]", rule.path),
                            PolicyKind::Principal => format!("{}.action", rule.path),
                            PolicyKind::Role => format!("{}.allowActions[{j}]", rule.path),
                        };
                        pc.uncovered.push(Gap {
                            kind: GapKind::Action,
                            rule: rule.name.clone(),
                            path,
                            line: None,
                            column: None,
                            missing: None,
                            action: Some(g.as_str().to_string()),
                        });
                    }
                }
            }
            pc.finish();
            policies.push(pc);
        }
        // Derived roles, by set: every definition some resource policy uses.
        let mut sets: BTreeMap<(String, String), Vec<Arc<crate::policy::compile::DerivedRole>>> =
            BTreeMap::new();
        let mut seen = BTreeSet::new();
        for p in &self.set.all {
            for dr in &p.derived_roles {
                if seen.insert((dr.file.clone(), dr.path.clone())) {
                    sets.entry((dr.set.clone(), dr.file.clone()))
                        .or_default()
                        .push(dr.clone());
                }
            }
        }
        for ((set, file), mut defs) in sets {
            defs.sort_by(|a, b| a.path.cmp(&b.path));
            let mut pc = PolicyCoverage {
                policy: format!("derived_roles.{set}"),
                kind: "derivedRoles".to_string(),
                file,
                ..PolicyCoverage::default()
            };
            for dr in defs {
                let s = self
                    .derived
                    .get(&(dr.file.clone(), dr.path.clone()))
                    .unwrap_or(&empty);
                pc.note(&dr.name, &dr.path, s, dr.condition.is_some());
            }
            pc.finish();
            policies.push(pc);
        }
        let mut cov = Coverage {
            policies,
            ..Coverage::default()
        };
        for p in &cov.policies {
            cov.rules.add(&p.rules);
            cov.conditions.add(&p.conditions);
            cov.actions.add(&p.actions);
        }
        cov.percent = percent(&[&cov.rules, &cov.conditions, &cov.actions]);
        cov
    }
}

/// `covered` of `total` points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub covered: u32,
    pub total: u32,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.covered += o.covered;
        self.total += o.total;
    }
}

fn percent(t: &[&Tally]) -> f64 {
    let (c, n) = t
        .iter()
        .fold((0u32, 0u32), |(c, n), t| (c + t.covered, n + t.total));
    if n == 0 {
        100.0
    } else {
        (f64::from(c) * 1000.0 / f64::from(n)).round() / 10.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapKind {
    /// No test reached the rule (its actions and roles never matched a tested request).
    Rule,
    /// The rule's condition never evaluated to `missing`.
    Condition,
    /// No tested action matched this action pattern of a reached rule.
    Action,
}

/// One thing no test exercised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gap {
    pub kind: GapKind,
    pub rule: String,
    /// YAML path in the policy file.
    pub path: String,
    /// Line and column of that path in the file, when the file could be read again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// Condition gaps: `"true"`, `"false"` or `"true and false"` (it only raised errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
    /// Action gaps: the action pattern.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// One policy (or derived roles set).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCoverage {
    pub policy: String,
    /// `resource`, `principal`, `role` or `derivedRoles`.
    pub kind: String,
    pub file: String,
    pub percent: f64,
    /// Rules (or derived role definitions) reached.
    pub rules: Tally,
    /// Condition outcomes seen: two per conditional rule (true and false).
    pub conditions: Tally,
    /// Action patterns matched by some tested action.
    pub actions: Tally,
    pub uncovered: Vec<Gap>,
}

impl PolicyCoverage {
    fn note(&mut self, name: &str, path: &str, s: &Stats, conditional: bool) {
        self.rules.total += 1;
        if s.reached {
            self.rules.covered += 1;
        } else {
            self.uncovered.push(Gap {
                kind: GapKind::Rule,
                rule: name.to_string(),
                path: path.to_string(),
                line: None,
                column: None,
                missing: None,
                action: None,
            });
        }
        if conditional {
            self.conditions.total += 2;
            self.conditions.covered += u32::from(s.cond_true) + u32::from(s.cond_false);
            let missing = match (s.cond_true, s.cond_false) {
                (true, true) => None,
                (true, false) => Some("false"),
                (false, true) => Some("true"),
                (false, false) => Some("true and false"),
            };
            if let (true, Some(m)) = (s.reached, missing) {
                self.uncovered.push(Gap {
                    kind: GapKind::Condition,
                    rule: name.to_string(),
                    path: format!("{path}.condition"),
                    line: None,
                    column: None,
                    missing: Some(m.to_string()),
                    action: None,
                });
            }
        }
    }

    fn finish(&mut self) {
        self.percent = percent(&[&self.rules, &self.conditions, &self.actions]);
    }
}

/// Coverage of every policy in the set.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Coverage {
    /// All points (rules reached + condition outcomes + action patterns) covered, in percent.
    pub percent: f64,
    pub rules: Tally,
    pub conditions: Tally,
    pub actions: Tally,
    pub policies: Vec<PolicyCoverage>,
}

impl Coverage {
    /// Gives every gap the line and column of its path, given each policy file's text.
    pub fn locate(&mut self, text_of: impl Fn(&str) -> Option<String>) {
        for p in &mut self.policies {
            if p.uncovered.is_empty() {
                continue;
            }
            let Some(tree) =
                text_of(&p.file).and_then(|t| crate::policy::yaml_merge::parse(&t).ok().flatten())
            else {
                continue;
            };
            for g in &mut p.uncovered {
                let steps = crate::policy::compile::path_steps(&g.path);
                let (line, column) = crate::policy::yaml_merge::locate(&tree, &steps, None);
                if line > 0 {
                    g.line = Some(line);
                    g.column = Some(column);
                }
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\ncoverage: {:.1}% (rules reached {}/{}, condition outcomes {}/{}, action patterns {}/{})",
            self.percent,
            self.rules.covered,
            self.rules.total,
            self.conditions.covered,
            self.conditions.total,
            self.actions.covered,
            self.actions.total
        );
        for p in &self.policies {
            let _ = writeln!(s, "  {:5.1}%  {} ({})", p.percent, p.policy, p.file);
            for g in &p.uncovered {
                let what = match g.kind {
                    GapKind::Rule if p.kind == "derivedRoles" => {
                        format!("derived role {} never reached by any test", g.rule)
                    }
                    GapKind::Rule => format!("rule {} never reached by any test", g.rule),
                    GapKind::Condition => format!(
                        "condition of {} never evaluated to {}",
                        g.rule,
                        g.missing.as_deref().unwrap_or_default()
                    ),
                    GapKind::Action => format!(
                        "action {:?} of rule {} never tested",
                        g.action.as_deref().unwrap_or_default(),
                        g.rule
                    ),
                };
                match (g.line, g.column) {
                    (Some(l), Some(c)) => {
                        let _ = writeln!(s, "          {}:{l}:{c}: {}: {what}", p.file, g.path);
                    }
                    _ => {
                        let _ = writeln!(s, "          {}: {}: {what}", p.file, g.path);
                    }
                }
            }
        }
        s
    }
}
