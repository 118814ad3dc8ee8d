//! Test results: the in-memory tree (richer than Cerbos's, it keeps the engine's reasons), and
//! its three renderings: Cerbos `TestResults` JSON, a text tree, and JUnit XML.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{Map, Value, json};

use crate::policy::eval::{OutputEntry, effect_name};
use crate::policy::model::Effect;

/// `cerbos.policy.v1.TestResults.Result`, ordered as in the proto (the overall result of a
/// group is the greatest of its members).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    #[default]
    Unspecified,
    Skipped,
    Passed,
    Failed,
    Errored,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Unspecified => "RESULT_UNSPECIFIED",
            Outcome::Skipped => "RESULT_SKIPPED",
            Outcome::Passed => "RESULT_PASSED",
            Outcome::Failed => "RESULT_FAILED",
            Outcome::Errored => "RESULT_ERRORED",
        }
    }
}

/// `TestResults.Summary`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub overall: Outcome,
    pub tests_count: u32,
    pub counts: BTreeMap<Outcome, u32>,
}

impl Summary {
    pub fn add(&mut self, outcome: Outcome, n: u32) {
        *self.counts.entry(outcome).or_default() += n;
    }

    pub fn count(&self, outcome: Outcome) -> u32 {
        self.counts.get(&outcome).copied().unwrap_or(0)
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        if self.overall != Outcome::Unspecified {
            m.insert("overallResult".into(), json!(self.overall.name()));
        }
        if self.tests_count > 0 {
            m.insert("testsCount".into(), json!(self.tests_count));
        }
        let counts: Vec<Value> = self
            .counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| json!({"result": r.name(), "count": n}))
            .collect();
        if !counts.is_empty() {
            m.insert("resultCounts".into(), Value::Array(counts));
        }
        Value::Object(m)
    }
}

/// `TestResults.OutputFailure`.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFailure {
    Mismatched {
        src: String,
        expected: Value,
        actual: Value,
    },
    Missing {
        src: String,
        expected: Value,
    },
    /// The output expression raised an error instead of producing a value.
    Errored {
        src: String,
        expected: Value,
        error: String,
    },
}

impl OutputFailure {
    fn to_json(&self) -> Value {
        match self {
            OutputFailure::Mismatched {
                src,
                expected,
                actual,
            } => {
                json!({"src": src, "mismatched": {"expected": expected, "actual": actual}})
            }
            OutputFailure::Missing { src, expected } => {
                json!({"src": src, "missing": {"expected": expected}})
            }
            OutputFailure::Errored {
                src,
                expected,
                error,
            } => {
                json!({"src": src, "errored": {"expected": expected, "error": error}})
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            OutputFailure::Mismatched {
                src,
                expected,
                actual,
            } => {
                format!("output {src}: expected {expected}, got {actual}")
            }
            OutputFailure::Missing { src, expected } => {
                format!("output {src}: expected {expected}, but the rule produced no output")
            }
            OutputFailure::Errored {
                src,
                expected,
                error,
            } => {
                format!(
                    "output {src}: expected {expected}, but the output expression failed: {error}"
                )
            }
        }
    }
}

/// The `outcome` oneof of `TestResults.Details`.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    Success {
        effect: Effect,
        outputs: Vec<OutputEntry>,
    },
    Failure {
        expected: Effect,
        actual: Effect,
        outputs: Vec<OutputFailure>,
    },
    Error(String),
    Skipped(String),
}

/// One action of one (principal, resource) of one test.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionOutcome {
    pub name: String,
    pub result: Outcome,
    pub detail: Detail,
    /// The engine's one-line reason for its decision (not in Cerbos's JSON).
    pub reason: String,
    /// CEL errors met while deciding this action (not in Cerbos's JSON).
    pub eval_errors: Vec<String>,
}

impl ActionOutcome {
    fn to_json(&self) -> Value {
        let mut details = Map::new();
        details.insert("result".into(), json!(self.result.name()));
        match &self.detail {
            Detail::Success { effect, outputs } => {
                let mut s = Map::new();
                s.insert("effect".into(), json!(effect_name(*effect)));
                if !outputs.is_empty() {
                    s.insert(
                        "outputs".into(),
                        Value::Array(outputs.iter().map(output_entry).collect()),
                    );
                }
                details.insert("success".into(), Value::Object(s));
            }
            Detail::Failure {
                expected,
                actual,
                outputs,
            } => {
                let mut f = Map::new();
                f.insert("expected".into(), json!(effect_name(*expected)));
                f.insert("actual".into(), json!(effect_name(*actual)));
                if !outputs.is_empty() {
                    f.insert(
                        "outputs".into(),
                        Value::Array(outputs.iter().map(OutputFailure::to_json).collect()),
                    );
                }
                details.insert("failure".into(), Value::Object(f));
            }
            Detail::Error(e) => {
                details.insert("error".into(), json!(e));
            }
            Detail::Skipped(reason) => {
                details.insert("skipReason".into(), json!(reason));
            }
        }
        json!({"name": self.name, "details": details})
    }
}

/// `cerbos.engine.v1.OutputEntry` as Cerbos prints it: `src`, `val` (or `error`) and `action`.
fn output_entry(o: &OutputEntry) -> Value {
    let mut m = Map::new();
    m.insert("src".into(), json!(o.src));
    match &o.error {
        Some(e) => m.insert("error".into(), json!(e)),
        None => m.insert("val".into(), o.val.clone().unwrap_or(Value::Null)),
    };
    m.insert("action".into(), json!(o.action));
    Value::Object(m)
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceResult {
    pub name: String,
    pub actions: Vec<ActionOutcome>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrincipalResult {
    pub name: String,
    pub resources: Vec<ResourceResult>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TestCaseResult {
    pub name: String,
    pub principals: Vec<PrincipalResult>,
}

impl TestCaseResult {
    fn actions(&self) -> impl Iterator<Item = (&str, &str, &ActionOutcome)> {
        self.principals.iter().flat_map(|p| {
            p.resources.iter().flat_map(move |r| {
                r.actions
                    .iter()
                    .map(move |a| (p.name.as_str(), r.name.as_str(), a))
            })
        })
    }
}

/// `TestResults.Suite`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SuiteResult {
    /// Relative to the directory the suites were found in, `/`-separated.
    pub file: String,
    pub name: String,
    pub description: String,
    pub summary: Summary,
    pub error: Option<String>,
    pub skip_reason: Option<String>,
    pub test_cases: Vec<TestCaseResult>,
}

impl SuiteResult {
    pub fn errored(file: &str, name: &str, description: &str, error: String) -> SuiteResult {
        SuiteResult {
            file: file.to_string(),
            name: name.to_string(),
            description: description.to_string(),
            summary: Summary {
                overall: Outcome::Errored,
                ..Summary::default()
            },
            error: Some(error),
            ..SuiteResult::default()
        }
    }

    /// Cerbos's `addResult`: files the action under test → principal → resource.
    pub fn add(&mut self, test: &str, principal: &str, resource: &str, action: ActionOutcome) {
        let tc = match self.test_cases.iter().position(|t| t.name == test) {
            Some(i) => &mut self.test_cases[i],
            None => {
                self.test_cases.push(TestCaseResult {
                    name: test.to_string(),
                    principals: Vec::new(),
                });
                let last = self.test_cases.len() - 1;
                &mut self.test_cases[last]
            }
        };
        let p = match tc.principals.iter().position(|p| p.name == principal) {
            Some(i) => &mut tc.principals[i],
            None => {
                tc.principals.push(PrincipalResult {
                    name: principal.to_string(),
                    resources: Vec::new(),
                });
                let last = tc.principals.len() - 1;
                &mut tc.principals[last]
            }
        };
        let r = match p.resources.iter().position(|r| r.name == resource) {
            Some(i) => &mut p.resources[i],
            None => {
                p.resources.push(ResourceResult {
                    name: resource.to_string(),
                    actions: Vec::new(),
                });
                let last = p.resources.len() - 1;
                &mut p.resources[last]
            }
        };
        let outcome = action.result;
        r.actions.push(action);
        self.summary.tests_count += 1;
        self.summary.add(outcome, 1);
        if outcome > self.summary.overall {
            self.summary.overall = outcome;
        }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("file".into(), json!(self.file));
        m.insert("name".into(), json!(self.name));
        if !self.description.is_empty() {
            m.insert("description".into(), json!(self.description));
        }
        m.insert("summary".into(), self.summary.to_json());
        if let Some(e) = &self.error {
            m.insert("error".into(), json!(e));
        }
        if let Some(r) = &self.skip_reason
            && !r.is_empty()
        {
            m.insert("skipReason".into(), json!(r));
        }
        if !self.test_cases.is_empty() {
            let cases: Vec<Value> = self
                .test_cases
                .iter()
                .map(|tc| {
                    let principals: Vec<Value> = tc
                        .principals
                        .iter()
                        .map(|p| {
                            let resources: Vec<Value> = p
                                .resources
                                .iter()
                                .map(|r| {
                                    let actions: Vec<Value> =
                                        r.actions.iter().map(ActionOutcome::to_json).collect();
                                    json!({"name": r.name, "actions": actions})
                                })
                                .collect();
                            json!({"name": p.name, "resources": resources})
                        })
                        .collect();
                    json!({"name": tc.name, "principals": principals})
                })
                .collect();
            m.insert("testCases".into(), Value::Array(cases));
        }
        Value::Object(m)
    }
}

/// Every suite's results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Results {
    pub suites: Vec<SuiteResult>,
    pub summary: Summary,
}

impl Results {
    pub fn push(&mut self, suite: SuiteResult) {
        self.summary.tests_count += suite.summary.tests_count;
        for (r, n) in &suite.summary.counts {
            self.summary.add(*r, *n);
        }
        if suite.summary.overall > self.summary.overall {
            self.summary.overall = suite.summary.overall;
        }
        self.suites.push(suite);
    }

    pub fn passed(&self) -> bool {
        self.summary.overall < Outcome::Failed
    }

    /// `cerbos.policy.v1.TestResults` as protojson prints it (zero values omitted).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if !self.suites.is_empty() {
            m.insert(
                "suites".into(),
                Value::Array(self.suites.iter().map(SuiteResult::to_json).collect()),
            );
        }
        m.insert("summary".into(), self.summary.to_json());
        Value::Object(m)
    }

    /// (passed, failed, skipped) for the final line: failed counts errored actions and
    /// suites that could not run; skipped counts skipped actions and skipped suites.
    pub fn totals(&self) -> (u32, u32, u32) {
        let s = &self.summary;
        let suite_errors = self.suites.iter().filter(|x| x.error.is_some()).count() as u32;
        let suite_skips = self
            .suites
            .iter()
            .filter(|x| x.summary.overall == Outcome::Skipped && x.test_cases.is_empty())
            .count() as u32;
        (
            s.count(Outcome::Passed),
            s.count(Outcome::Failed) + s.count(Outcome::Errored) + suite_errors,
            s.count(Outcome::Skipped) + suite_skips,
        )
    }

    /// A readable tree: suites, tests, and every failure with the engine's reason.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if self.suites.is_empty() {
            s.push_str("no test suites found\n");
        }
        for suite in &self.suites {
            let label = match (&suite.error, suite.summary.overall) {
                (Some(_), _) => "ERROR",
                (None, Outcome::Failed | Outcome::Errored) => "FAIL",
                (None, Outcome::Skipped) => "SKIP",
                _ => "ok",
            };
            let _ = writeln!(s, "{label:5} {} ({})", suite.name, suite.file);
            if let Some(e) = &suite.error {
                let _ = writeln!(s, "      {e}");
                continue;
            }
            if suite.test_cases.is_empty() {
                if let Some(r) = &suite.skip_reason {
                    let _ = writeln!(s, "      suite skipped{}", reason_suffix(r));
                } else {
                    let _ = writeln!(s, "      suite skipped");
                }
                continue;
            }
            for tc in &suite.test_cases {
                let mut counts: BTreeMap<Outcome, u32> = BTreeMap::new();
                for (_, _, a) in tc.actions() {
                    *counts.entry(a.result).or_default() += 1;
                }
                let n = |o: Outcome| counts.get(&o).copied().unwrap_or(0);
                let (passed, failed, skipped) = (
                    n(Outcome::Passed),
                    n(Outcome::Failed) + n(Outcome::Errored),
                    n(Outcome::Skipped),
                );
                if failed == 0 && passed == 0 {
                    let reason = tc
                        .actions()
                        .find_map(|(_, _, a)| match &a.detail {
                            Detail::Skipped(r) => Some(r.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    let _ = writeln!(s, "  SKIP  {}{}", tc.name, reason_suffix(&reason));
                    continue;
                }
                let mut line = format!("{passed} passed, {failed} failed");
                if skipped > 0 {
                    let _ = write!(line, ", {skipped} skipped");
                }
                let label = if failed > 0 { "FAIL" } else { "ok" };
                let _ = writeln!(s, "  {label:5} {} ({line})", tc.name);
                for (p, r, a) in tc.actions() {
                    let what = match &a.detail {
                        Detail::Failure {
                            expected,
                            actual,
                            outputs,
                        } if expected != actual => {
                            let mut w = format!(
                                "expected {}, got {}",
                                effect_name(*expected),
                                effect_name(*actual)
                            );
                            for o in outputs {
                                let _ = write!(w, "\n          {}", o.describe());
                            }
                            w
                        }
                        Detail::Failure { outputs, .. } => {
                            let v: Vec<String> =
                                outputs.iter().map(OutputFailure::describe).collect();
                            v.join("\n          ")
                        }
                        Detail::Error(e) => format!("error: {e}"),
                        _ => continue,
                    };
                    let _ = writeln!(s, "        {p} / {r} / {}: {what}", a.name);
                    if !a.reason.is_empty() {
                        let _ = writeln!(s, "          reason: {}", a.reason);
                    }
                    for e in &a.eval_errors {
                        let _ = writeln!(s, "          evaluation error: {e}");
                    }
                }
            }
        }
        let (passed, failed, skipped) = self.totals();
        let _ = write!(s, "\n{passed} passed, {failed} failed");
        if skipped > 0 {
            let _ = write!(s, ", {skipped} skipped");
        }
        s.push('\n');
        s
    }

    /// JUnit XML: one `testcase` per action checked; a suite that could not run is one
    /// `testcase` with an `error`.
    pub fn to_junit(&self) -> String {
        let mut body = String::new();
        let (mut all_tests, mut all_fail, mut all_err, mut all_skip) = (0u32, 0u32, 0u32, 0u32);
        for suite in &self.suites {
            let mut cases = String::new();
            let (mut tests, mut failures, mut errors, mut skipped) = (0u32, 0u32, 0u32, 0u32);
            if let Some(e) = &suite.error {
                tests += 1;
                errors += 1;
                let _ = write!(
                    cases,
                    "    <testcase name=\"{}\" classname=\"{}\" file=\"{}\">\n      <error type=\"RESULT_ERRORED\" message=\"{}\">{}</error>\n    </testcase>\n",
                    xml(&suite.name),
                    xml(&suite.file),
                    xml(&suite.file),
                    xml(e),
                    xml(e)
                );
            } else if suite.test_cases.is_empty() && suite.summary.overall == Outcome::Skipped {
                tests += 1;
                skipped += 1;
                let _ = write!(
                    cases,
                    "    <testcase name=\"{}\" classname=\"{}\" file=\"{}\">\n      <skipped message=\"{}\"/>\n    </testcase>\n",
                    xml(&suite.name),
                    xml(&suite.file),
                    xml(&suite.file),
                    xml(suite
                        .skip_reason
                        .as_deref()
                        .unwrap_or("This test suite was skipped"))
                );
            }
            for tc in &suite.test_cases {
                for (p, r, a) in tc.actions() {
                    tests += 1;
                    let _ = write!(
                        cases,
                        "    <testcase name=\"{}\" classname=\"{}\" file=\"{}\">\n      <properties>\n        <property name=\"principal\" value=\"{}\"/>\n        <property name=\"resource\" value=\"{}\"/>\n        <property name=\"action\" value=\"{}\"/>\n      </properties>\n",
                        xml(&tc.name),
                        xml(&format!("{p}.{r}.{}", a.name)),
                        xml(&suite.file),
                        xml(p),
                        xml(r),
                        xml(&a.name)
                    );
                    match &a.detail {
                        Detail::Failure {
                            expected,
                            actual,
                            outputs,
                        } => {
                            failures += 1;
                            let message = if outputs.is_empty() || expected != actual {
                                "Effect expectation unsatisfied"
                            } else {
                                "Output expectation unsatisfied"
                            };
                            let mut text = format!(
                                "expected: {}\nactual: {}",
                                effect_name(*expected),
                                effect_name(*actual)
                            );
                            for o in outputs {
                                let _ = write!(text, "\n{}", o.describe());
                            }
                            if !a.reason.is_empty() {
                                let _ = write!(text, "\nreason: {}", a.reason);
                            }
                            for e in &a.eval_errors {
                                let _ = write!(text, "\nevaluation error: {e}");
                            }
                            let _ = writeln!(
                                cases,
                                "      <failure type=\"RESULT_FAILED\" message=\"{message}\">{}</failure>",
                                xml(&text)
                            );
                        }
                        Detail::Error(e) => {
                            errors += 1;
                            let _ = writeln!(
                                cases,
                                "      <error type=\"RESULT_ERRORED\" message=\"{}\">{}</error>",
                                xml(e),
                                xml(e)
                            );
                        }
                        Detail::Skipped(reason) => {
                            skipped += 1;
                            let msg = if reason.is_empty() {
                                "This test was skipped"
                            } else {
                                reason
                            };
                            let _ = writeln!(cases, "      <skipped message=\"{}\"/>", xml(msg));
                        }
                        Detail::Success { .. } => {}
                    }
                    cases.push_str("    </testcase>\n");
                }
            }
            let description = if suite.description.is_empty() {
                String::new()
            } else {
                format!(" description=\"{}\"", xml(&suite.description))
            };
            let _ = write!(
                body,
                "  <testsuite name=\"{}\" file=\"{}\"{description} tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\">\n{cases}  </testsuite>\n",
                xml(&suite.name),
                xml(&suite.file),
            );
            all_tests += tests;
            all_fail += failures;
            all_err += errors;
            all_skip += skipped;
        }
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites tests=\"{all_tests}\" failures=\"{all_fail}\" errors=\"{all_err}\" skipped=\"{all_skip}\">\n{body}</testsuites>\n"
        )
    }
}

fn reason_suffix(r: &str) -> String {
    if r.is_empty() {
        String::new()
    } else {
        format!(" ({r})")
    }
}

/// Escapes text for XML attributes and character data; drops characters XML 1.0 forbids.
pub fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' | '\r' => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}
