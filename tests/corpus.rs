//! Data-driven decisions: each `tests/corpus/<case>/` holds `policies/` and `cases.yaml`
//! (inputs, expected effect/policy/scope/rule per action, and expected explain-trace lines).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test and bench code"
)]

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};
use toolgate::policy::eval::{self, CheckOutput};
use toolgate::policy::input::{CheckInput, Evaluation, Params, Principal, Resource};
use toolgate::policy::store;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    evaluation: Option<Evaluation>,
    #[serde(default)]
    now: Option<String>,
    #[serde(default)]
    lenient_scope_search: bool,
    #[serde(default)]
    globals: Map<String, Value>,
    principal: Principal,
    resource: Resource,
    #[serde(default)]
    aux_data: Value,
    /// action → expected `{effect, policy?, scope?, rule?}`
    want: Map<String, Value>,
    /// Lines expected (as substrings, in order) in the rendered trace.
    #[serde(default)]
    trace: Vec<String>,
    #[serde(default)]
    effective_derived_roles: Option<Vec<String>>,
    #[serde(default)]
    evaluation_errors: Option<usize>,
    #[serde(default)]
    outputs: Option<Vec<Value>>,
}

fn render(out: &CheckOutput) -> Vec<String> {
    let mut lines = Vec::new();
    for d in &out.trace.derived_roles {
        lines.push(format!(
            "derived {} {}{}",
            d.name,
            if d.active { "active" } else { "inactive" },
            d.error
                .as_ref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default()
        ));
    }
    for s in &out.trace.steps {
        lines.push(format!(
            "{} {}{} {}#{} {:?}{}",
            s.action,
            s.pass,
            s.role
                .as_ref()
                .map(|r| format!(" role={r}"))
                .unwrap_or_default(),
            s.policy,
            s.rule,
            s.outcome,
            s.error
                .as_ref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default()
        ));
    }
    lines
}

fn run_case_dir(dir: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    let set = match store::load_dir(&dir.join("policies")) {
        Ok(s) => s,
        Err(e) => return vec![format!("{}: compile: {e:?}", dir.display())],
    };
    let text = match std::fs::read_to_string(dir.join("cases.yaml")) {
        Ok(t) => t,
        Err(e) => return vec![format!("{}: cases.yaml: {e}", dir.display())],
    };
    let file: File = match yaml_serde::from_str(&text) {
        Ok(f) => f,
        Err(e) => return vec![format!("{}: cases.yaml: {e}", dir.display())],
    };
    for case in file.cases {
        let mut params = Params {
            evaluation: case.evaluation.unwrap_or(Evaluation::Strict),
            lenient_scope_search: case.lenient_scope_search,
            globals: std::sync::Arc::new(case.globals.clone()),
            ..Params::default()
        };
        if let Some(now) = &case.now {
            // A malformed `now` is the case's error, never a silent fallback to the clock.
            match chrono::DateTime::parse_from_rfc3339(now) {
                Ok(t) => params.now = t.to_utc(),
                Err(e) => {
                    failures.push(format!(
                        "{} / {}: now {now:?} is not RFC 3339: {e}",
                        dir.display(),
                        case.name
                    ));
                    continue;
                }
            }
        }
        let input = CheckInput {
            principal: case.principal.clone(),
            resource: case.resource.clone(),
            actions: case.want.keys().cloned().collect(),
            aux_data: case.aux_data.clone(),
        };
        let out = eval::check(&set, &input, &params);
        let ctx = format!("{} / {}", dir.display(), case.name);
        for (action, want) in &case.want {
            let Some(got) = out.actions.iter().find(|a| &a.action == action) else {
                failures.push(format!("{ctx}: no result for {action}"));
                continue;
            };
            let got_json = serde_json::to_value(got).unwrap_or_default();
            let want = match want {
                Value::String(effect) => serde_json::json!({ "effect": effect }),
                Value::Object(_) => want.clone(),
                other => {
                    // Anything else would check nothing and pass.
                    failures.push(format!(
                        "{ctx}: {action}: want must be an effect or an object, got {other}"
                    ));
                    continue;
                }
            };
            if let Value::Object(w) = &want {
                for (k, v) in w {
                    if got_json.get(k) != Some(v) {
                        failures.push(format!(
                            "{ctx}: {action}: {k}: want {v}, got {}\n  reason: {}\n  trace:\n    {}",
                            got_json.get(k).cloned().unwrap_or_default(),
                            got.reason,
                            render(&out).join("\n    ")
                        ));
                    }
                }
            }
        }
        let lines = render(&out);
        let mut pos = 0;
        for want in &case.trace {
            match lines[pos..].iter().position(|l| l.contains(want.as_str())) {
                Some(i) => pos += i + 1,
                None => failures.push(format!(
                    "{ctx}: trace line {want:?} not found (in order) in:\n    {}",
                    lines.join("\n    ")
                )),
            }
        }
        if let Some(want) = &case.effective_derived_roles {
            if &out.effective_derived_roles != want {
                failures.push(format!(
                    "{ctx}: effective derived roles: want {want:?}, got {:?}",
                    out.effective_derived_roles
                ));
            }
        }
        if let Some(n) = case.evaluation_errors {
            if out.evaluation_errors.len() != n {
                failures.push(format!(
                    "{ctx}: evaluation errors: want {n}, got {:?}",
                    out.evaluation_errors
                ));
            }
        }
        if let Some(want) = &case.outputs {
            let got: Vec<Value> = out
                .outputs
                .iter()
                .map(|o| serde_json::to_value(o).unwrap_or_default())
                .collect();
            if &got != want {
                failures.push(format!("{ctx}: outputs: want {want:?}, got {got:?}"));
            }
        }
    }
    failures
}

#[test]
fn corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    assert!(
        dirs.len() >= 5,
        "corpus dirs missing under {}",
        root.display()
    );
    let failures: Vec<String> = dirs.iter().flat_map(|d| run_case_dir(d)).collect();
    assert!(
        failures.is_empty(),
        "{} corpus failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The runner itself has teeth: a malformed `now` and a `want` that is neither an effect nor
/// an object are failures, not silent passes (issue 20.8).
#[test]
fn the_runner_rejects_a_malformed_now_and_a_non_object_want() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let first = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("policies").is_dir())
        .min()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("policies")).unwrap();
    for e in std::fs::read_dir(first.join("policies")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.join("policies").join(p.file_name().unwrap())).unwrap();
        }
    }
    let case = |now: &str, want: &str| {
        format!(
            "cases:\n  - name: c\n{now}    principal: {{id: p, roles: [user]}}\n    resource: {{kind: k, id: r}}\n    want:\n      read: {want}\n"
        )
    };
    std::fs::write(
        dir.join("cases.yaml"),
        case("    now: \"yesterday\"\n", "EFFECT_DENY"),
    )
    .unwrap();
    let f = run_case_dir(dir);
    assert!(f.iter().any(|m| m.contains("not RFC 3339")), "{f:?}");
    std::fs::write(dir.join("cases.yaml"), case("", "[1, 2]")).unwrap();
    let f = run_case_dir(dir);
    assert!(
        f.iter()
            .any(|m| m.contains("want must be an effect or an object")),
        "{f:?}"
    );
}
