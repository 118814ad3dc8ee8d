use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::coverage::GapKind;
use super::results::{Detail, OutputFailure};
use super::runner::SKIP_REASON_NAME;
use super::*;
use crate::policy::input::Evaluation;
use crate::policy::model::Effect;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/suites")
        .join(name)
}

fn run_at(dir: &Path, opts: &Options) -> Report {
    let set = store::load_dir(dir)
        .unwrap_or_else(|e| panic!("{} does not compile: {e:?}", dir.display()));
    run(dir, &set, opts)
}

fn run_fixture(name: &str) -> Report {
    run_at(&fixture_dir(name), &Options::default())
}

fn suite<'a>(r: &'a Report, name: &str) -> &'a results::SuiteResult {
    r.tree
        .suites
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no suite {name}: {:#?}", r.tree.suites))
}

fn suite_by_file<'a>(r: &'a Report, file: &str) -> &'a results::SuiteResult {
    r.tree
        .suites
        .iter()
        .find(|s| s.file == file)
        .unwrap_or_else(|| panic!("no suite file {file}"))
}

/// (result, detail) of one action.
fn action<'a>(
    s: &'a results::SuiteResult,
    test: &str,
    p: &str,
    r: &str,
    a: &str,
) -> &'a results::ActionOutcome {
    s.test_cases
        .iter()
        .find(|t| t.name == test)
        .and_then(|t| t.principals.iter().find(|x| x.name == p))
        .and_then(|x| x.resources.iter().find(|x| x.name == r))
        .and_then(|x| x.actions.iter().find(|x| x.name == a))
        .unwrap_or_else(|| panic!("no result for {test}/{p}/{r}/{a} in {s:#?}"))
}

/// A throwaway policy directory.
fn temp(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

const DOC_POLICY: &str = r#"
apiVersion: api.cerbos.dev/v1
resourcePolicy:
  resource: doc
  version: default
  rules:
    - name: read
      actions: [read]
      effect: EFFECT_ALLOW
      roles: [user]
    - name: no_read_secret
      actions: [read]
      effect: EFFECT_DENY
      roles: [user]
      condition:
        match:
          expr: R.attr.secret == true
"#;

const DOC_FIXTURES: &str = r#"
principals:
  ann: {id: ann, roles: [user]}
"#;

fn doc_suite(body: &str) -> tempfile::TempDir {
    temp(&[
        ("doc.yaml", DOC_POLICY),
        ("testdata/principals.yaml", DOC_FIXTURES),
        ("doc_test.yaml", body),
    ])
}

#[test]
fn passing_suite_reports_cerbos_json() {
    let r = run_fixture("basic");
    assert!(r.passed, "{}", r.to_text());
    let v = &r.results;
    assert_eq!(v["summary"]["overallResult"], "RESULT_PASSED");
    // 12 + 4 + 1 + 1 checked, 1 skipped, 2 in the JSON suite: every action counts.
    assert_eq!(v["summary"]["testsCount"], 21);
    assert_eq!(
        v["summary"]["resultCounts"],
        json!([{"result": "RESULT_SKIPPED", "count": 1}, {"result": "RESULT_PASSED", "count": 20}])
    );
    let files: Vec<&str> = v["suites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["album_test.yaml", "flagged_test.json"]);
    let first = &v["suites"][0]["testCases"][0];
    assert_eq!(first["name"], "owners and public albums");
    assert_eq!(first["principals"][0]["name"], "alicia");
    assert_eq!(
        first["principals"][0]["resources"][0]["name"],
        "alicia_album"
    );
    assert_eq!(
        first["principals"][0]["resources"][0]["actions"][0],
        json!({"name": "view", "details": {"result": "RESULT_PASSED", "success": {
            "effect": "EFFECT_ALLOW",
            // public_view's conditionNotMet output: every output of the action is reported.
            "outputs": [{"src": "resource.album.vdefault#public_view", "val": {"private": "A1"}, "action": "view"}]
        }}})
    );
    assert!(
        r.to_text()
            .trim_end()
            .ends_with("20 passed, 0 failed, 1 skipped"),
        "{}",
        r.to_text()
    );
}

#[test]
fn groups_anchors_and_merge_keys() {
    let r = run_fixture("basic");
    let s = suite(&r, "AlbumSuite");
    let tc = s
        .test_cases
        .iter()
        .find(|t| t.name == "owners and public albums")
        .unwrap();
    // principalGroups: [users] expands to alicia and bradley (bradley merged from an anchor).
    let names: Vec<&str> = tc.principals.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["alicia", "bradley"]);
    // public_album merges `*album` and `*attrs` and overrides some keys.
    let a = action(
        s,
        "owners and public albums",
        "bradley",
        "public_album",
        "view",
    );
    assert!(
        matches!(
            a.detail,
            Detail::Success {
                effect: Effect::Allow,
                ..
            }
        ),
        "{a:?}"
    );
}

#[test]
fn missing_pair_and_missing_action_expect_deny() {
    let r = run_fixture("basic");
    let s = suite(&r, "AlbumSuite");
    // bradley × alicia_album has no expectation at all.
    for act in ["view", "edit", "delete"] {
        let a = action(
            s,
            "owners and public albums",
            "bradley",
            "alicia_album",
            act,
        );
        assert_eq!(a.result, Outcome::Passed);
        assert!(
            matches!(
                a.detail,
                Detail::Success {
                    effect: Effect::Deny,
                    ..
                }
            ),
            "{a:?}"
        );
    }
    // edit is missing from alicia × public_album's expectation.
    let a = action(
        s,
        "owners and public albums",
        "alicia",
        "public_album",
        "edit",
    );
    assert!(
        matches!(
            a.detail,
            Detail::Success {
                effect: Effect::Deny,
                ..
            }
        ),
        "{a:?}"
    );
    // And a missing pair that is in fact allowed fails, expecting DENY.
    let d = doc_suite(
        r#"
name: S
principals: {bob: {id: bob, roles: [user]}}
resources: {d: {id: d1, kind: doc, attr: {secret: false}}}
tests:
  - name: t
    input: {principals: [ann, bob], resources: [d], actions: [read]}
    expected:
      - {principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}
"#,
    );
    let r = run_at(d.path(), &Options::default());
    assert!(!r.passed);
    let a = action(suite(&r, "S"), "t", "bob", "d", "read");
    assert_eq!(
        a.detail,
        Detail::Failure {
            expected: Effect::Deny,
            actual: Effect::Allow,
            outputs: vec![]
        }
    );
}

#[test]
fn fixtures_from_testdata_with_suite_definitions_winning() {
    let r = run_fixture("basic");
    let s = suite(&r, "AlbumSuite");
    // guest_gina, fixture_albums, the guests group and validJWT all come from testdata/.
    let a = action(
        s,
        "fixtures from testdata",
        "guest_gina",
        "john_album",
        "view",
    );
    assert!(
        matches!(
            a.detail,
            Detail::Success {
                effect: Effect::Allow,
                ..
            }
        ),
        "{a:?}"
    );
    // The suite's john (a user who owns john_album) wins over the fixture's guest john.
    let a = action(s, "fixtures from testdata", "john", "john_album", "delete");
    assert!(
        matches!(
            a.detail,
            Detail::Success {
                effect: Effect::Allow,
                ..
            }
        ),
        "{a:?}"
    );
    // The JSON suite uses the fixtures too.
    let j = suite(&r, "FlaggedSuite");
    assert_eq!(j.summary.overall, Outcome::Passed);
}

#[test]
fn test_options_replace_suite_options() {
    let r = run_fixture("basic");
    let s = suite(&r, "AlbumSuite");
    // The suite's globals allow editors to edit...
    let a = action(
        s,
        "globals from the suite options",
        "eddie",
        "alicia_album",
        "edit",
    );
    assert!(
        matches!(
            a.detail,
            Detail::Success {
                effect: Effect::Allow,
                ..
            }
        ),
        "{a:?}"
    );
    // ...but a test with its own options has no globals at all (no merge).
    let a = action(
        s,
        "own options replace the suite options",
        "eddie",
        "alicia_album",
        "edit",
    );
    assert!(
        matches!(
            a.detail,
            Detail::Success {
                effect: Effect::Deny,
                ..
            }
        ),
        "{a:?}"
    );
    assert!(
        a.eval_errors.iter().any(|e| e.contains("global_edit")),
        "{a:?}"
    );
}

#[test]
fn options_now_drives_now() {
    let r = run_fixture("time");
    assert!(r.passed, "{}", r.to_text());
    let s = suite(&r, "DeadlineSuite");
    let a = action(
        s,
        "before the deadline (suite now)",
        "ursula",
        "q2_report",
        "submit",
    );
    assert!(
        matches!(
            a.detail,
            Detail::Success {
                effect: Effect::Allow,
                ..
            }
        ),
        "{a:?}"
    );
    let a = action(
        s,
        "after the deadline (test now)",
        "ursula",
        "q2_report",
        "submit",
    );
    assert!(
        matches!(
            a.detail,
            Detail::Success {
                effect: Effect::Deny,
                ..
            }
        ),
        "{a:?}"
    );
}

#[test]
fn failing_suite_has_failure_details() {
    let r = run_fixture("failing");
    assert!(!r.passed);
    assert_eq!(r.results["summary"]["overallResult"], "RESULT_ERRORED");
    let s = suite(&r, "WrongSuite");
    assert_eq!(s.summary.overall, Outcome::Failed);
    let a = action(s, "wrong effect", "bob", "ann_doc", "write");
    assert_eq!(a.result, Outcome::Failed);
    assert_eq!(
        a.detail,
        Detail::Failure {
            expected: Effect::Allow,
            actual: Effect::Deny,
            outputs: vec![]
        }
    );
    assert!(!a.reason.is_empty());
    let json = &r.results["suites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "WrongSuite")
        .unwrap()["testCases"];
    assert_eq!(
        json[0]["principals"][0]["resources"][0]["actions"][0]["details"],
        json!({"result": "RESULT_FAILED", "failure": {"expected": "EFFECT_ALLOW", "actual": "EFFECT_DENY"}})
    );
    let text = r.to_text();
    assert!(
        text.contains("bob / ann_doc / write: expected EFFECT_ALLOW, got EFFECT_DENY"),
        "{text}"
    );
    assert!(text.contains("reason: "), "{text}");
    // 2 passed (GoodSuite), 2 failed actions + 3 suites that could not run.
    assert!(text.trim_end().ends_with("2 passed, 5 failed"), "{text}");
}

#[test]
fn output_expectations() {
    let r = run_fixture("failing");
    // GoodSuite: the expected output matches and is reported in `success.outputs`.
    let g = suite(&r, "GoodSuite");
    assert_eq!(g.summary.overall, Outcome::Passed);
    let good = r.results["suites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "GoodSuite")
        .unwrap();
    assert_eq!(
        good["testCases"][0]["principals"][0]["resources"][0]["actions"][0]["details"]["success"]["outputs"],
        json!([{"src": "resource.doc.vdefault#read", "val": {"who": "ann"}, "action": "read"}])
    );
    // WrongSuite: one mismatched and one missing output.
    let a = action(
        suite(&r, "WrongSuite"),
        "wrong outputs",
        "ann",
        "ann_doc",
        "read",
    );
    let Detail::Failure {
        expected,
        actual,
        outputs,
    } = &a.detail
    else {
        panic!("{a:?}")
    };
    assert_eq!((*expected, *actual), (Effect::Allow, Effect::Allow));
    assert_eq!(
        outputs,
        &vec![
            OutputFailure::Mismatched {
                src: "resource.doc.vdefault#read".into(),
                expected: json!({"who": "<bob & co>"}),
                actual: json!({"who": "ann"}),
            },
            OutputFailure::Missing {
                src: "resource.doc.vdefault#nope".into(),
                expected: json!(1)
            },
        ]
    );
    let wrong = r.results["suites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "WrongSuite")
        .unwrap();
    let f =
        &wrong["testCases"][1]["principals"][0]["resources"][0]["actions"][0]["details"]["failure"];
    assert_eq!(
        f["outputs"][0]["mismatched"]["actual"],
        json!({"who": "ann"})
    );
    assert_eq!(f["outputs"][1]["missing"]["expected"], json!(1));
    // Numbers compare by value: 1 == 1.0.
    assert!(runner::values_equal(
        &json!({"n": [1]}),
        &json!({"n": [1.0]})
    ));
}

#[test]
fn bad_suite_file_is_an_errored_entry() {
    let r = run_fixture("failing");
    let s = suite_by_file(&r, "bad_test.yaml");
    assert_eq!(s.name, "Unknown");
    assert_eq!(s.summary.overall, Outcome::Errored);
    let e = s.error.as_deref().unwrap();
    assert!(
        e.contains("expectd") && e.contains("$.tests[0]") && e.contains("line 5"),
        "{e}"
    );
    let v = r.results["suites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["file"] == "bad_test.yaml")
        .unwrap();
    assert_eq!(v["summary"], json!({"overallResult": "RESULT_ERRORED"}));
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("failed to load test suite")
    );
    // Conflicting duplicate expectations, and expectations for principals not in the input.
    let c = suite(&r, "ConflictSuite").error.as_deref().unwrap();
    assert!(c.contains("inconsistent expectations"), "{c}");
    let c = suite(&r, "StrangerSuite").error.as_deref().unwrap();
    assert!(
        c.contains("\"zed\"") && c.contains("not present in input"),
        "{c}"
    );
}

#[test]
fn broken_files_never_panic() {
    for body in [
        "",
        "::: not yaml [",
        "name: X\n",
        "name: X\ntests: []\n",
        "- a\n- b\n",
        "name: X\ntests:\n  - name: t\n    input: {actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n",
        "name: X\ntests:\n  - name: t\n    input: {principals: [ann], resources: [d], actions: [read, read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n",
        "name: X\ntests:\n  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, principals: [ann], resource: d, actions: {read: EFFECT_ALLOW}}]\n",
        "name: X\ntests:\n  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: ALLOW}}]\n",
        "name: X\noptions: {now: yesterday}\ntests:\n  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n",
    ] {
        let d = doc_suite(body);
        let r = run_at(d.path(), &Options::default());
        assert!(!r.passed, "{body:?} passed");
        let s = suite_by_file(&r, "doc_test.yaml");
        assert_eq!(s.summary.overall, Outcome::Errored, "{body:?}");
        assert!(
            s.error.as_deref().is_some_and(|e| !e.is_empty()),
            "{body:?}"
        );
    }
}

#[test]
fn lookup_errors_name_the_problem() {
    let cases = [
        // Unknown principal.
        (
            "input: {principals: [nobody], resources: [d], actions: [read]}\n    expected: [{principal: nobody, resource: d, actions: {read: EFFECT_ALLOW}}]",
            "principal \"nobody\" not found",
        ),
        // Unknown group.
        (
            "input: {principalGroups: [nogroup], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]",
            "principal group \"nogroup\" not found",
        ),
        // An expectation for an action not in the input.
        (
            "input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {write: EFFECT_ALLOW}}]",
            "do not exist in the input actions list: [write]",
        ),
        // Unknown aux data.
        (
            "input: {principals: [ann], resources: [d], actions: [read], auxData: nope}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]",
            "auxData \"nope\" not found",
        ),
    ];
    for (test, want) in cases {
        let body = format!(
            "name: S\nresources: {{d: {{id: d1, kind: doc}}}}\ntests:\n  - name: t\n    {test}\n"
        );
        let d = doc_suite(&body);
        let r = run_at(d.path(), &Options::default());
        let e = suite(&r, "S").error.clone().unwrap_or_default();
        assert!(e.contains(want), "{e} does not contain {want}");
    }
    // A suite group naming a missing fixture; duplicate test names.
    let d = doc_suite(
        "name: S\nprincipalGroups: {g: {principals: [ann, ghost]}}\nresources: {d: {id: d1, kind: doc}}\ntests:\n  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n",
    );
    let e = suite(&run_at(d.path(), &Options::default()), "S")
        .error
        .clone()
        .unwrap_or_default();
    assert!(e.contains("missing fixture \"ghost\""), "{e}");
    let t = "  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n";
    let d = doc_suite(&format!(
        "name: S\nresources: {{d: {{id: d1, kind: doc}}}}\ntests:\n{t}{t}"
    ));
    let e = suite(&run_at(d.path(), &Options::default()), "S")
        .error
        .clone()
        .unwrap_or_default();
    assert!(e.contains("another test named t already exists"), "{e}");
}

#[test]
fn bad_fixture_errors_the_suites_next_to_it() {
    let d = temp(&[
        ("doc.yaml", DOC_POLICY),
        (
            "testdata/principals.yaml",
            "principals:\n  ann: {id: ann, roles: [user], colour: red}\n",
        ),
        (
            "doc_test.yaml",
            "name: S\nresources: {d: {id: d1, kind: doc}}\ntests:\n  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n",
        ),
    ]);
    let r = run_at(d.path(), &Options::default());
    let s = suite(&r, "S");
    let e = s.error.as_deref().unwrap_or_default();
    assert!(
        e.contains("failed to load test fixtures from testdata") && e.contains("colour"),
        "{e}"
    );
}

#[test]
fn run_filter_skips_non_matching_tests() {
    let opts = Options {
        run: Some(regex::Regex::new("^AlbumSuite/globals").unwrap()),
        ..Options::default()
    };
    let r = run_at(&fixture_dir("basic"), &opts);
    assert!(r.passed, "{}", r.to_text());
    let s = suite(&r, "AlbumSuite");
    let a = action(
        s,
        "globals from the suite options",
        "eddie",
        "alicia_album",
        "edit",
    );
    assert_eq!(a.result, Outcome::Passed);
    let a = action(
        s,
        "owners and public albums",
        "alicia",
        "alicia_album",
        "view",
    );
    assert_eq!(a.result, Outcome::Skipped);
    assert_eq!(a.detail, Detail::Skipped(SKIP_REASON_NAME.into()));
    assert_eq!(suite(&r, "FlaggedSuite").summary.overall, Outcome::Skipped);
    assert_eq!(
        r.results["summary"]["resultCounts"],
        json!([{"result": "RESULT_SKIPPED", "count": 20}, {"result": "RESULT_PASSED", "count": 1}])
    );
    assert!(
        r.to_text()
            .trim_end()
            .ends_with("1 passed, 0 failed, 20 skipped"),
        "{}",
        r.to_text()
    );
}

#[test]
fn skipped_suite_and_hidden_files() {
    let ok = "  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n";
    let d = temp(&[
        ("doc.yaml", DOC_POLICY),
        ("testdata/principals.yaml", DOC_FIXTURES),
        (
            "skip_test.yaml",
            &format!(
                "name: Skipped\nskip: true\nskipReason: later\nresources: {{d: {{id: d1, kind: doc}}}}\ntests:\n{ok}"
            ),
        ),
        (".hidden_test.yaml", "garbage: ["),
        ("sub/.hidden/x_test.yaml", "garbage: ["),
        ("sub/testdata/y_test.yaml", "garbage: ["),
    ]);
    let r = run_at(d.path(), &Options::default());
    assert!(r.passed);
    assert_eq!(r.tree.suites.len(), 1);
    let v = &r.results["suites"][0];
    assert_eq!(v["summary"], json!({"overallResult": "RESULT_SKIPPED"}));
    assert_eq!(v["skipReason"], "later");
    assert!(
        r.to_text()
            .trim_end()
            .ends_with("0 passed, 0 failed, 1 skipped"),
        "{}",
        r.to_text()
    );
}

#[test]
fn strict_evaluation_option_forces_strict() {
    // no_read_secret errors (no `secret` attribute). Lenient: the DENY rule is skipped and
    // `read` allows. Strict: the erroring DENY rule denies.
    let t = "tests:\n  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n";
    let res = "resources: {d: {id: d1, kind: doc}}\n";
    let lenient = Options {
        evaluation: Evaluation::Lenient,
        ..Options::default()
    };
    let d = doc_suite(&format!("name: S\n{res}{t}"));
    assert!(run_at(d.path(), &lenient).passed);
    assert!(!run_at(d.path(), &Options::default()).passed);
    let d = doc_suite(&format!(
        "name: S\noptions: {{strictEvaluation: true}}\n{res}{t}"
    ));
    let r = run_at(d.path(), &lenient);
    assert!(!r.passed);
    let a = action(suite(&r, "S"), "t", "ann", "d", "read");
    assert!(
        a.eval_errors.iter().any(|e| e.contains("no_read_secret")),
        "{a:?}"
    );
    assert!(
        r.to_text().contains("evaluation error: "),
        "{}",
        r.to_text()
    );
}

#[test]
fn junit_is_well_formed_ish() {
    let r = run_fixture("failing");
    let x = r.to_junit();
    assert!(
        x.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites "),
        "{x}"
    );
    assert!(x.trim_end().ends_with("</testsuites>"));
    assert_eq!(x.matches("<testsuite ").count(), 5);
    assert_eq!(
        x.matches("<testsuite ").count(),
        x.matches("</testsuite>").count()
    );
    assert_eq!(
        x.matches("<testcase ").count(),
        x.matches("</testcase>").count()
    );
    // 2 passed + 2 failed actions + 3 errored suites as one test case each.
    assert!(
        x.contains("<testsuites tests=\"7\" failures=\"2\" errors=\"3\" skipped=\"0\">"),
        "{x}"
    );
    assert!(x.contains("&lt;bob &amp; co&gt;"), "{x}");
    assert!(!x.contains("<bob"), "{x}");
    assert!(x.contains("message=\"Output expectation unsatisfied\""));
    assert!(x.contains("message=\"Effect expectation unsatisfied\""));
    // Attribute values never hold a raw quote or angle bracket.
    for line in x.lines().skip(1) {
        let inner = line.trim().trim_start_matches('<').trim_end_matches('>');
        assert!(!inner.contains('<') || line.contains("</"), "{line}");
    }
    assert_eq!(
        results::xml("a\"b'<c>&\u{1}d\n"),
        "a&quot;b&apos;&lt;c&gt;&amp;d&#10;"
    );
}

#[test]
fn coverage_lists_untested_rules_conditions_and_actions() {
    let r = run_fixture("basic");
    let c = &r.coverage;
    let album = c
        .policies
        .iter()
        .find(|p| p.policy == "resource.album.vdefault")
        .unwrap();
    assert_eq!(album.file, "album.yaml");
    assert!(album.uncovered.iter().any(|g| g.kind == GapKind::Rule
        && g.rule == "untested"
        && g.path == "$.resourcePolicy.rules[5]"));
    // global_edit was true (suite globals) and erred (no globals), never false.
    assert!(album.uncovered.iter().any(|g| g.kind == GapKind::Condition
        && g.rule == "global_edit"
        && g.missing.as_deref() == Some("false")
        && g.path == "$.resourcePolicy.rules[4].condition"));
    // Conditions seen both ways are not listed.
    assert!(
        !album
            .uncovered
            .iter()
            .any(|g| g.rule == "public_view" || g.rule == "jwt_view")
    );
    assert_eq!(album.rules.covered, 5);
    assert_eq!(album.rules.total, 6);
    let dr = c
        .policies
        .iter()
        .find(|p| p.policy == "derived_roles.album_roles")
        .unwrap();
    assert_eq!(dr.conditions.covered, 2, "{dr:?}");
    assert!(c.percent > 0.0 && c.percent < 100.0);
    let text = r.coverage_text();
    assert!(
        text.contains("album.yaml:49:7: $.resourcePolicy.rules[5]: rule untested never reached"),
        "{text}"
    );
    assert!(
        text.contains("condition of global_edit never evaluated to false"),
        "{text}"
    );
    let j = r.coverage_json();
    assert!(
        j["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["policy"] == "resource.album.vdefault")
    );
    assert_eq!(j["rules"]["total"], Value::from(c.rules.total));

    // An action pattern of a reached rule that no test used.
    let d = temp(&[
        (
            "p.yaml",
            "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: doc\n  version: default\n  rules:\n    - name: rw\n      actions: [read, \"write:*\"]\n      effect: EFFECT_ALLOW\n      roles: [user]\n",
        ),
        (
            "p_test.yaml",
            "name: S\nprincipals: {ann: {id: ann, roles: [user]}}\nresources: {d: {id: d1, kind: doc}}\ntests:\n  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n",
        ),
    ]);
    let r = run_at(d.path(), &Options::default());
    assert!(r.passed);
    let p = &r.coverage.policies[0];
    assert_eq!(p.uncovered.len(), 1, "{p:?}");
    assert_eq!(p.uncovered[0].kind, GapKind::Action);
    assert_eq!(p.uncovered[0].action.as_deref(), Some("write:*"));
    assert_eq!(p.uncovered[0].path, "$.resourcePolicy.rules[0].actions[1]");
    assert!((p.percent - 66.7).abs() < 0.01, "{p:?}");
}

#[test]
fn params_follow_the_effective_options() {
    let set = crate::policy::compile::PolicySet::empty();
    let opts = Options {
        evaluation: Evaluation::Lenient,
        run: None,
    };
    let now = chrono::Utc::now();
    let ctx = runner::RunCtx {
        root: Path::new("."),
        set: &set,
        opts: &opts,
        now,
    };
    // Without options.now every check of the run sees the same instant.
    let p = runner::params(&ctx, None);
    assert_eq!(p.now, now);
    assert_eq!(p.evaluation, Evaluation::Lenient);
    assert_eq!(p.default_policy_version, "default");
    let o: model::TestOptions = serde_json::from_value(json!({
        "now": "2022-08-02T15:00:00+02:00",
        "defaultPolicyVersion": "staging",
        "defaultScope": "acme",
        "lenientScopeSearch": true,
        "strictEvaluation": true,
        "globals": {"g": 1}
    }))
    .unwrap();
    let p = runner::params(&ctx, Some(&o));
    assert_eq!(p.now.to_rfc3339(), "2022-08-02T13:00:00+00:00");
    assert_eq!(p.evaluation, Evaluation::Strict);
    assert_eq!(p.default_policy_version, "staging");
    assert_eq!(p.default_scope, "acme");
    assert!(p.lenient_scope_search);
    assert_eq!(p.globals.get("g"), Some(&json!(1)));
}

#[test]
fn nested_suites_use_the_testdata_next_to_them() {
    let t = "tests:\n  - name: t\n    input: {principals: [ann], resources: [d], actions: [read]}\n    expected: [{principal: ann, resource: d, actions: {read: EFFECT_ALLOW}}]\n";
    let d = temp(&[
        ("doc.yaml", DOC_POLICY),
        ("testdata/principals.yaml", DOC_FIXTURES),
        (
            "testdata/resources.yaml",
            "resources: {d: {id: d1, kind: doc, attr: {secret: false}}}\n",
        ),
        // sub/testdata defines ann as a non-user and no `d`: the root fixtures are not used.
        (
            "sub/testdata/principals.yaml",
            "principals: {ann: {id: ann, roles: [guest]}}\n",
        ),
        ("root_test.yaml", &format!("name: Root\n{t}")),
        (
            "sub/nested_test.yaml",
            &format!(
                "name: Nested\nresources: {{d: {{id: d1, kind: doc, attr: {{secret: false}}}}}}\n{t}"
            ),
        ),
    ]);
    let r = run_at(d.path(), &Options::default());
    assert_eq!(
        suite(&r, "Root").summary.overall,
        Outcome::Passed,
        "{}",
        r.to_text()
    );
    let n = suite(&r, "Nested");
    assert_eq!(n.file, "sub/nested_test.yaml");
    let a = action(n, "t", "ann", "d", "read");
    assert_eq!(
        a.detail,
        Detail::Failure {
            expected: Effect::Allow,
            actual: Effect::Deny,
            outputs: vec![]
        }
    );
}
