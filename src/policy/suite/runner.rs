//! Running one suite: loading it and its fixtures, building the test matrix as Cerbos does
//! (`internal/verify/test_matrix.go`), checking every (principal, resource) and comparing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Options;
use super::coverage::Collector;
use super::model::{self, AuxData, SuiteDef, TestOptions, TestTable};
use super::results::{ActionOutcome, Detail, Outcome, OutputFailure, SuiteResult};
use crate::policy::compile::PolicySet;
use crate::policy::eval::{self, CheckOutput};
use crate::policy::input::{
    CheckInput, Evaluation, Params, Principal, Resource, SchemaEnforcement,
};
use crate::policy::model::Effect;
use crate::policy::{parse, store};

/// Cerbos's error for a check that read the clock in a test without `options.now`.
pub const NOW_NOT_SET: &str =
    "a policy used a time-based condition, but `now` was not provided in the test options";

/// Cerbos's skip reason for a test excluded by `--run`.
pub const SKIP_REASON_NAME: &str = "Test name did not match the provided pattern";

/// What a `testdata/` directory holds.
#[derive(Debug, Default)]
pub(super) struct Fixture {
    principals: BTreeMap<String, Principal>,
    principal_groups: BTreeMap<String, Vec<String>>,
    resources: BTreeMap<String, Resource>,
    resource_groups: BTreeMap<String, Vec<String>>,
    aux_data: BTreeMap<String, AuxData>,
}

/// Loaded fixtures by `testdata/` path (`None`: no such directory).
pub(super) type FixtureCache = HashMap<PathBuf, Result<Option<Arc<Fixture>>, String>>;

/// Everything fixed for one run.
pub(super) struct RunCtx<'a> {
    pub root: &'a Path,
    pub set: &'a PolicySet,
    pub opts: &'a Options,
    /// `now()` for tests without `options.now`: one instant for the whole run.
    pub now: chrono::DateTime<chrono::Utc>,
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// The first of `base.yaml`, `base.yml`, `base.json` that exists.
fn one_of(dir: &Path, base: &str) -> Option<PathBuf> {
    ["yaml", "yml", "json"]
        .iter()
        .map(|ext| dir.join(format!("{base}.{ext}")))
        .find(|p| p.is_file())
}

fn read_doc<T: DeserializeOwned>(root: &Path, path: &Path) -> Result<T, String> {
    let bytes = store::read_limited(path)?;
    let name = path.to_string_lossy();
    parse::document::<T>(&name, &bytes).map_err(|e| format!("{}: {e}", rel(root, path)))
}

fn load_fixture(root: &Path, dir: &Path) -> Result<Option<Fixture>, String> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut f = Fixture::default();
    if let Some(p) = one_of(dir, "principals") {
        let doc: model::PrincipalsFixture =
            read_doc(root, &p).map_err(|e| format!("failed to load principals: {e}"))?;
        model::check_principals_fixture(&doc)
            .map_err(|e| format!("failed to load principals: {}: {e}", rel(root, &p)))?;
        f.principals = doc.principals;
        f.principal_groups = doc
            .principal_groups
            .into_iter()
            .map(|(k, g)| (k, g.principals))
            .collect();
    }
    if let Some(p) = one_of(dir, "resources") {
        let doc: model::ResourcesFixture =
            read_doc(root, &p).map_err(|e| format!("failed to load resources: {e}"))?;
        model::check_resources_fixture(&doc)
            .map_err(|e| format!("failed to load resources: {}: {e}", rel(root, &p)))?;
        f.resources = doc.resources;
        f.resource_groups = doc
            .resource_groups
            .into_iter()
            .map(|(k, g)| (k, g.resources))
            .collect();
    }
    if let Some(p) = ["auxdata", "auxData", "aux_data"]
        .iter()
        .find_map(|b| one_of(dir, b))
    {
        let doc: model::AuxDataFixture =
            read_doc(root, &p).map_err(|e| format!("failed to load aux data: {e}"))?;
        model::check_aux_data("$.auxData", &doc.aux_data)
            .map_err(|e| format!("failed to load aux data: {}: {e}", rel(root, &p)))?;
        f.aux_data = doc.aux_data;
    }
    Ok(Some(f))
}

/// Suite-local definitions first, then `testdata/` (Cerbos's `lookupPrincipal` & co.).
struct Lookup<'a> {
    suite: &'a SuiteDef,
    fixture: Option<&'a Fixture>,
}

impl Lookup<'_> {
    fn principal(&self, name: &str) -> Result<&Principal, String> {
        self.suite
            .principals
            .get(name)
            .or_else(|| self.fixture.and_then(|f| f.principals.get(name)))
            .ok_or_else(|| format!("principal {name:?} not found"))
    }

    fn resource(&self, name: &str) -> Result<&Resource, String> {
        self.suite
            .resources
            .get(name)
            .or_else(|| self.fixture.and_then(|f| f.resources.get(name)))
            .ok_or_else(|| format!("resource {name:?} not found"))
    }

    fn principal_group(&self, name: &str) -> Result<&[String], String> {
        self.suite
            .principal_groups
            .get(name)
            .map(|g| g.principals.as_slice())
            .or_else(|| {
                self.fixture
                    .and_then(|f| f.principal_groups.get(name))
                    .map(Vec::as_slice)
            })
            .ok_or_else(|| format!("principal group {name:?} not found"))
    }

    fn resource_group(&self, name: &str) -> Result<&[String], String> {
        self.suite
            .resource_groups
            .get(name)
            .map(|g| g.resources.as_slice())
            .or_else(|| {
                self.fixture
                    .and_then(|f| f.resource_groups.get(name))
                    .map(Vec::as_slice)
            })
            .ok_or_else(|| format!("resource group {name:?} not found"))
    }

    fn aux_data(&self, name: &str) -> Result<Value, String> {
        if name.is_empty() {
            return Ok(Value::Null);
        }
        self.suite
            .aux_data
            .get(name)
            .or_else(|| self.fixture.and_then(|f| f.aux_data.get(name)))
            .map(AuxData::to_value)
            .ok_or_else(|| format!("auxData {name:?} not found"))
    }
}

/// Cerbos's `collectFixtures`: the named fixtures, then each group's members not yet seen.
fn collect<'a>(
    single: &'a str,
    list: &'a [String],
    groups: &[String],
    lookup: impl Fn(&str) -> Result<&'a [String], String>,
) -> Result<Vec<&'a str>, String> {
    let mut out: Vec<&str> = if single.is_empty() {
        list.iter().map(String::as_str).collect()
    } else {
        vec![single]
    };
    for g in groups {
        for m in lookup(g)? {
            if !out.contains(&m.as_str()) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// What one (principal, resource) of a test table expects.
#[derive(Debug, Default, Clone)]
struct Expected {
    actions: BTreeMap<String, Effect>,
    /// action → [(src, val)], in the order written.
    outputs: BTreeMap<String, Vec<(String, Value)>>,
}

/// One (principal, resource) element of a test table's matrix, ready to check.
struct Test<'a> {
    table: &'a TestTable,
    principal_key: &'a str,
    resource_key: &'a str,
    principal: &'a Principal,
    resource: &'a Resource,
    aux_data: Value,
    expected: Expected,
}

/// Cerbos's `buildExpectationLookup` + `buildTestMatrix` + `buildTest`.
fn build_tests<'a>(lk: &'a Lookup<'a>, table: &'a TestTable) -> Result<Vec<Test<'a>>, String> {
    let input_actions = &table.input.actions;
    let mut lookup: BTreeMap<(&str, &str), Expected> = BTreeMap::new();
    let mut order: Vec<(&str, &str)> = Vec::new();
    for e in &table.expected {
        let unreachable: Vec<&str> = e
            .outputs
            .iter()
            .map(|o| o.action.as_str())
            .filter(|a| !input_actions.iter().any(|x| x == a))
            .collect();
        if !unreachable.is_empty() {
            return Err(format!(
                "found output expectations for actions that are not in the input actions list: [{}]",
                unreachable.join(",")
            ));
        }
        let extra: Vec<&str> = e
            .actions
            .keys()
            .map(String::as_str)
            .filter(|a| !input_actions.iter().any(|x| x == a))
            .collect();
        if !extra.is_empty() {
            return Err(format!(
                "found expectations for actions that do not exist in the input actions list: [{}]",
                extra.join(",")
            ));
        }
        let principals = collect(&e.principal, &e.principals, &e.principal_groups, |g| {
            lk.principal_group(g)
        })?;
        let resources = collect(&e.resource, &e.resources, &e.resource_groups, |g| {
            lk.resource_group(g)
        })?;
        for p in &principals {
            for r in &resources {
                let key = (*p, *r);
                if !lookup.contains_key(&key) {
                    order.push(key);
                }
                let target = lookup.entry(key).or_default();
                for (action, effect) in &e.actions {
                    match target.actions.get(action) {
                        Some(old) if old != effect => {
                            return Err(format!(
                                "found inconsistent expectations for principal {p:?} performing action {action:?} on resource {r:?}"
                            ));
                        }
                        Some(_) => {}
                        None => {
                            target.actions.insert(action.clone(), *effect);
                        }
                    }
                }
                for o in &e.outputs {
                    let entries = target.outputs.entry(o.action.clone()).or_default();
                    for x in &o.expected {
                        match entries.iter().find(|(s, _)| *s == x.src) {
                            Some((_, old)) if !values_equal(old, &x.val) => {
                                return Err(format!(
                                    "found inconsistent expectations for output {:?} from principal {p:?} performing action {:?} on resource {r:?}",
                                    x.src, o.action
                                ));
                            }
                            Some(_) => {}
                            None => entries.push((x.src.clone(), x.val.clone())),
                        }
                    }
                }
            }
        }
    }
    let principals = collect(
        "",
        &table.input.principals,
        &table.input.principal_groups,
        |g| lk.principal_group(g),
    )?;
    let resources = collect(
        "",
        &table.input.resources,
        &table.input.resource_groups,
        |g| lk.resource_group(g),
    )?;
    let mut matrix = Vec::with_capacity(principals.len() * resources.len());
    for p in &principals {
        for r in &resources {
            // A pair without an expectation expects DENY for every action.
            let expected = lookup.remove(&(*p, *r)).unwrap_or_default();
            matrix.push((*p, *r, expected));
        }
    }
    if let Some((p, r)) = order.into_iter().find(|k| lookup.contains_key(k)) {
        return Err(format!(
            "found an expectation for principal {p:?} and resource {r:?}, but at least one of these is not present in input"
        ));
    }
    let mut tests = Vec::with_capacity(matrix.len());
    for (p, r, expected) in matrix {
        tests.push(Test {
            table,
            principal_key: p,
            resource_key: r,
            principal: lk.principal(p)?,
            resource: lk.resource(r)?,
            aux_data: lk.aux_data(&table.input.aux_data)?,
            expected,
        });
    }
    Ok(tests)
}

/// JSON equality with numbers compared by value (`1 == 1.0`), as protobuf `Value`s are.
pub(super) fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| values_equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| values_equal(v, w)))
        }
        _ => a == b,
    }
}

/// Engine parameters from a test's effective options.
pub(super) fn params(ctx: &RunCtx<'_>, options: Option<&TestOptions>) -> Params {
    let default = TestOptions::default();
    let o = options.unwrap_or(&default);
    let now = o
        .now
        .as_deref()
        .and_then(|s| model::parse_now(s).ok())
        .unwrap_or(ctx.now);
    Params {
        now,
        globals: Arc::new(o.globals.clone()),
        evaluation: if o.strict_evaluation {
            Evaluation::Strict
        } else {
            ctx.opts.evaluation
        },
        // As `cerbos compile` (without --ignore-schemas): schema violations deny.
        schema_enforcement: SchemaEnforcement::Reject,
        default_policy_version: if o.default_policy_version.is_empty() {
            "default".to_string()
        } else {
            o.default_policy_version.clone()
        },
        default_scope: o.default_scope.clone(),
        lenient_scope_search: o.lenient_scope_search,
    }
}

/// Compares one action's decision and outputs with what the test expects.
fn judge(action: &str, expected: &Expected, out: &CheckOutput) -> ActionOutcome {
    let eval_errors: Vec<String> = out
        .evaluation_errors
        .iter()
        .filter(|e| e.action == action)
        .map(|e| format!("{}#{}: `{}`: {}", e.policy, e.rule, e.expression, e.message))
        .collect();
    let Some(result) = out.actions.iter().find(|a| a.action == action) else {
        return ActionOutcome {
            name: action.to_string(),
            result: Outcome::Errored,
            detail: Detail::Error(format!("no result for action {action:?}")),
            reason: String::new(),
            eval_errors,
        };
    };
    let want = expected
        .actions
        .get(action)
        .copied()
        .unwrap_or(Effect::Deny);
    let outputs: Vec<_> = out
        .outputs
        .iter()
        .filter(|o| o.action == action)
        .cloned()
        .collect();
    let mut outcome = ActionOutcome {
        name: action.to_string(),
        result: Outcome::Passed,
        detail: Detail::Success {
            effect: result.effect,
            outputs: Vec::new(),
        },
        reason: result.reason.clone(),
        eval_errors,
    };
    if want != result.effect {
        outcome.result = Outcome::Failed;
        outcome.detail = Detail::Failure {
            expected: want,
            actual: result.effect,
            outputs: Vec::new(),
        };
        return outcome;
    }
    let mut failures = Vec::new();
    for (src, val) in expected
        .outputs
        .get(action)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        match outputs.iter().find(|o| &o.src == src) {
            None => failures.push(OutputFailure::Missing {
                src: src.clone(),
                expected: val.clone(),
            }),
            Some(o) => match (&o.val, &o.error) {
                (_, Some(error)) => failures.push(OutputFailure::Errored {
                    src: src.clone(),
                    expected: val.clone(),
                    error: error.clone(),
                }),
                (actual, None) => {
                    let actual = actual.clone().unwrap_or(Value::Null);
                    if !values_equal(val, &actual) {
                        failures.push(OutputFailure::Mismatched {
                            src: src.clone(),
                            expected: val.clone(),
                            actual,
                        });
                    }
                }
            },
        }
    }
    if failures.is_empty() {
        outcome.detail = Detail::Success {
            effect: result.effect,
            outputs,
        };
    } else {
        outcome.result = Outcome::Failed;
        outcome.detail = Detail::Failure {
            expected: want,
            actual: result.effect,
            outputs: failures,
        };
    }
    outcome
}

fn skipped(action: &str, reason: &str) -> ActionOutcome {
    ActionOutcome {
        name: action.to_string(),
        result: Outcome::Skipped,
        detail: Detail::Skipped(reason.to_string()),
        reason: String::new(),
        eval_errors: Vec::new(),
    }
}

/// Checks suite-level group definitions: every member must name a known fixture.
fn check_groups(lk: &Lookup<'_>) -> Result<(), String> {
    for (g, def) in &lk.suite.principal_groups {
        if let Some(m) = def.principals.iter().find(|m| lk.principal(m).is_err()) {
            return Err(format!(
                "Invalid principal groups in test suite: missing fixture {m:?} referenced in group {g:?}"
            ));
        }
    }
    for (g, def) in &lk.suite.resource_groups {
        if let Some(m) = def.resources.iter().find(|m| lk.resource(m).is_err()) {
            return Err(format!(
                "Invalid resource groups in test suite: missing fixture {m:?} referenced in group {g:?}"
            ));
        }
    }
    Ok(())
}

/// Loads and runs one suite file. Never panics: every problem becomes an errored suite.
pub(super) fn run_suite(
    ctx: &RunCtx<'_>,
    path: &Path,
    fixtures: &mut FixtureCache,
    cov: &mut Collector<'_>,
) -> SuiteResult {
    let file = rel(ctx.root, path);
    let suite: SuiteDef = match read_doc(ctx.root, path) {
        Ok(s) => s,
        Err(e) => {
            return SuiteResult::errored(
                &file,
                "Unknown",
                "",
                format!("failed to load test suite: {e}"),
            );
        }
    };
    if let Err(e) = model::check_suite(&suite) {
        return SuiteResult::errored(
            &file,
            "Unknown",
            "",
            format!("failed to load test suite: {file}: {e}"),
        );
    }
    let testdata = path.parent().unwrap_or(ctx.root).join("testdata");
    let fixture = fixtures
        .entry(testdata.clone())
        .or_insert_with(|| load_fixture(ctx.root, &testdata).map(|f| f.map(Arc::new)))
        .clone();
    let fixture = match fixture {
        Ok(f) => f,
        Err(e) => {
            return SuiteResult::errored(
                &file,
                &suite.name,
                &suite.description,
                format!(
                    "failed to load test fixtures from {}: {e}",
                    rel(ctx.root, &testdata)
                ),
            );
        }
    };
    let lk = Lookup {
        suite: &suite,
        fixture: fixture.as_deref(),
    };
    if let Err(e) = check_groups(&lk) {
        return SuiteResult::errored(&file, &suite.name, &suite.description, e);
    }
    let mut result = SuiteResult {
        file: file.clone(),
        name: suite.name.clone(),
        description: suite.description.clone(),
        ..SuiteResult::default()
    };
    if suite.skip {
        result.summary.overall = Outcome::Skipped;
        result.skip_reason = Some(suite.skip_reason.clone());
        return result;
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in &suite.tests {
        if !seen.insert(t.name.as_str()) {
            return SuiteResult::errored(
                &file,
                &suite.name,
                &suite.description,
                format!(
                    "Invalid test suite: another test named {} already exists",
                    t.name
                ),
            );
        }
    }
    let mut tests = Vec::new();
    for table in &suite.tests {
        match build_tests(&lk, table) {
            Ok(t) => tests.extend(t),
            Err(e) => {
                return SuiteResult::errored(
                    &file,
                    &suite.name,
                    &suite.description,
                    format!(
                        "Failed to load the test suite: invalid test {:?}: {e}",
                        table.name
                    ),
                );
            }
        }
    }
    for test in tests {
        let table = test.table;
        let actions = &table.input.actions;
        let skip_reason = match &ctx.opts.run {
            Some(re) if !re.is_match(&format!("{}/{}", suite.name, table.name)) => {
                Some(SKIP_REASON_NAME)
            }
            _ if table.skip => Some(table.skip_reason.as_str()),
            _ => None,
        };
        if let Some(reason) = skip_reason {
            for a in actions {
                result.add(
                    &table.name,
                    test.principal_key,
                    test.resource_key,
                    skipped(a, reason),
                );
            }
            continue;
        }
        // A test's own options replace the suite's (no merge).
        let options = table.options.as_ref().or(suite.options.as_ref());
        let input = CheckInput {
            principal: test.principal.clone(),
            resource: test.resource.clone(),
            actions: actions.clone(),
            aux_data: test.aux_data.clone(),
        };
        let out = eval::check(ctx.set, &input, &params(ctx, options));
        cov.record(&out);
        // As Cerbos 0.55 (established with `cerbos compile`): a check whose evaluation read
        // the clock, in a test that does not fix `now`, errors for every action of that
        // principal and resource, since its result would depend on when the suite runs.
        let clock_unset = options.and_then(|o| o.now.as_ref()).is_none();
        for a in actions {
            let outcome = if clock_unset && out.used_now {
                ActionOutcome {
                    name: a.clone(),
                    result: Outcome::Errored,
                    detail: Detail::Error(NOW_NOT_SET.to_string()),
                    reason: String::new(),
                    eval_errors: Vec::new(),
                }
            } else {
                judge(a, &test.expected, &out)
            };
            result.add(&table.name, test.principal_key, test.resource_key, outcome);
        }
    }
    result
}
