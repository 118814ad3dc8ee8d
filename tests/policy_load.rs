//! Loading policies: bad input gets a located error (never a panic), limits hold, reloads
//! keep the last good snapshot, and rebuilding gives identical decisions.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test and bench code"
)]

use std::fmt::Write as _;
use std::path::Path;

use toolgate::policy::compile::CompileError;
use toolgate::policy::eval;
use toolgate::policy::input::{CheckInput, Params, Principal, Resource, SchemaEnforcement};
use toolgate::policy::store::{self, Store};

fn write(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, body).unwrap();
}

fn load_errors(files: &[(&str, &str)]) -> Vec<CompileError> {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in files {
        write(dir.path(), name, body);
    }
    match store::load_dir(dir.path()) {
        Ok(_) => Vec::new(),
        Err(e) => e,
    }
}

const HEAD: &str = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: doc\n  version: default\n  rules:\n";

fn rule(extra: &str) -> String {
    format!("{HEAD}    - actions: [view]\n      effect: EFFECT_ALLOW\n      roles: [user]\n{extra}")
}

#[track_caller]
fn assert_error(files: &[(&str, &str)], file: &str, path: &str, message: &str) {
    let errors = load_errors(files);
    assert!(
        errors
            .iter()
            .any(|e| e.file == file && e.path.starts_with(path) && e.message.contains(message)),
        "want {file} {path} {message:?}; got {errors:#?}"
    );
}

#[test]
fn malformed_yaml_is_located() {
    let errors = load_errors(&[("a.yaml", "apiVersion: [unclosed\n")]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].file, "a.yaml");
    assert!(errors[0].line.is_some());
}

#[test]
fn wrong_types_and_unknown_keys() {
    assert_error(
        &[("a.yaml", &rule("      colour: red\n"))],
        "a.yaml",
        "$.resourcePolicy.rules[0]",
        "colour",
    );
    assert_error(
        &[(
            "a.yaml",
            &format!(
                "{HEAD}    - actions: view\n      effect: EFFECT_ALLOW\n      roles: [user]\n"
            ),
        )],
        "a.yaml",
        "$.resourcePolicy.rules[0].actions",
        "",
    );
    assert_error(
        &[(
            "a.yaml",
            &format!("{HEAD}    - actions: [view]\n      effect: ALLOW\n      roles: [user]\n"),
        )],
        "a.yaml",
        "$.resourcePolicy.rules[0].effect",
        "",
    );
    assert_error(
        &[("a.yaml", "apiVersion: api.cerbos.dev/v1\nfoo: {}\n")],
        "a.yaml",
        "$",
        "foo",
    );
    assert_error(
        &[(
            "a.json",
            "{\"apiVersion\": \"api.cerbos.dev/v1\", \"resourcePolicy\": {\"resource\": 1}}",
        )],
        "a.json",
        "$.resourcePolicy.resource",
        "",
    );
}

#[test]
fn semantic_errors_are_collected_with_paths() {
    let errors = load_errors(&[
        (
            "a.yaml",
            &format!("{HEAD}    - actions: [view]\n      effect: EFFECT_ALLOW\n"),
        ),
        (
            "b.yaml",
            &rule("      condition:\n        match:\n          expr: R.attr.x ==\n")
                .replace("resource: doc", "resource: other"),
        ),
        (
            "c.yaml",
            &rule("").replace("resource: doc", "resource: \"bad*\""),
        ),
        (
            "d.yaml",
            "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: x\n  version: default\n  importDerivedRoles: [missing]\n",
        ),
    ]);
    let text: String = errors.iter().fold(String::new(), |mut s, e| {
        let _ = writeln!(s, "{e}");
        s
    });
    assert!(
        text.contains(
            "a.yaml:6:7: $.resourcePolicy.rules[0]: rule 'rule-001' does not specify any roles"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "b.yaml:11:17: $.resourcePolicy.rules[0].condition.match.expr: invalid CEL expression"
        ),
        "{text}"
    );
    assert!(
        text.contains("c.yaml:3:13: $.resourcePolicy.resource"),
        "{text}"
    );
    assert!(
        text.contains(
            "d.yaml:5:24: $.resourcePolicy.importDerivedRoles[0]: derived roles \"missing\" not found"
        ),
        "{text}"
    );
}

#[test]
fn bad_globs_variables_and_duplicates() {
    assert_error(
        &[(
            "a.yaml",
            &format!(
                "{HEAD}    - actions: [\"view:[*\"]\n      effect: EFFECT_ALLOW\n      roles: [user]\n"
            ),
        )],
        "a.yaml",
        "$.resourcePolicy.rules[0].actions[0]",
        "invalid glob",
    );
    let cyclic = format!("{HEAD}    - actions: [view]\n      effect: EFFECT_ALLOW\n      roles: [user]\n      condition: {{match: {{expr: V.a}}}}\n")
        .replace("  rules:\n", "  variables:\n    local:\n      a: V.b\n      b: V.a\n  rules:\n");
    assert_error(
        &[("a.yaml", &cyclic)],
        "a.yaml",
        "$.resourcePolicy.variables.local",
        "cyclical",
    );
    let undefined = rule("").replace(
        "  rules:\n",
        "  variables:\n    local:\n      a: V.nope\n  rules:\n",
    );
    assert_error(
        &[("a.yaml", &undefined)],
        "a.yaml",
        "$.resourcePolicy.variables.local.a",
        "undefined variable",
    );
    let errors = load_errors(&[("a.yaml", &rule("")), ("b.yaml", &rule(""))]);
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("duplicate policy resource.doc.vdefault")),
        "{errors:?}"
    );
}

/// Forms Cerbos 0.55's `cerbos compile` refuses and toolgate loaded (found by
/// tests/policy_property.rs): two rules for one resource in a principal policy, and a merge key
/// whose alias names an anchor defined inside the same mapping.
#[test]
fn forms_cerbos_refuses_are_refused() {
    let pp = "apiVersion: api.cerbos.dev/v1\nprincipalPolicy:\n  principal: mallory\n  version: default\n  rules:\n    - resource: doc\n      actions: [{action: view, effect: EFFECT_DENY}]\n    - resource: note\n      actions: [{action: view, effect: EFFECT_DENY}]\n    - resource: doc\n      actions: [{action: edit, effect: EFFECT_ALLOW}]\n";
    assert_error(
        &[("p.yaml", pp)],
        "p.yaml",
        "$.principalPolicy.rules[2].resource",
        "duplicate resource \"doc\" at rule #3: previous definition in rule #1",
    );
    let same_mapping = rule("").replace(
        "  rules:\n",
        "  constants:\n    local:\n      shared: &a {blocked: mallory}\n      <<: *a\n  rules:\n",
    );
    let errors = load_errors(&[("a.yaml", &same_mapping)]);
    assert!(
        errors
            .iter()
            .any(|e| e.file == "a.yaml" && e.line == Some(8) && e.message.contains("same mapping")),
        "{errors:#?}"
    );
    // The anchor elsewhere in the document: both load it.
    let elsewhere = rule("").replace(
        "  rules:\n",
        "  constants:\n    local:\n      shared: &a {blocked: mallory}\n  variables:\n    local:\n      <<: *a\n  rules:\n",
    );
    let errors = load_errors(&[("a.yaml", &elsewhere.replace("mallory", "'\"mallory\"'"))]);
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn ambiguous_derived_roles() {
    let set = |name: &str| {
        format!(
            "apiVersion: api.cerbos.dev/v1\nderivedRoles:\n  name: {name}\n  definitions:\n    - name: owner\n      parentRoles: [user]\n"
        )
    };
    let policy = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: doc\n  version: default\n  importDerivedRoles: [a, b]\n  rules:\n    - actions: [view]\n      effect: EFFECT_ALLOW\n      derivedRoles: [owner]\n";
    assert_error(
        &[
            ("a.yaml", &set("a")),
            ("b.yaml", &set("b")),
            ("p.yaml", policy),
        ],
        "p.yaml",
        "$.resourcePolicy.rules[0].derivedRoles[0]",
        "ambiguous",
    );
}

#[test]
fn deeply_nested_conditions_are_refused_not_overflowed() {
    let mut cond = String::from("{expr: \"true\"}");
    for _ in 0..200 {
        cond = format!("{{all: {{of: [{cond}]}}}}");
    }
    let body = rule(&format!("      condition:\n        match: {cond}\n"));
    // A YAML parser may refuse this depth itself; either way it is a located error, not a crash.
    let errors = load_errors(&[("a.yaml", &body)]);
    assert!(!errors.is_empty());
    assert!(errors.iter().all(|e| e.file == "a.yaml"), "{errors:?}");
    let mut cond = String::from("{expr: \"true\"}");
    for _ in 0..40 {
        cond = format!("{{any: {{of: [{cond}]}}}}");
    }
    assert_error(
        &[(
            "a.yaml",
            &rule(&format!("      condition:\n        match: {cond}\n")),
        )],
        "a.yaml",
        "$.resourcePolicy.rules[0].condition.match",
        "deeper than",
    );
    let long_chain = vec!["1"; 5000].join(" + ");
    assert_error(
        &[(
            "a.yaml",
            &rule(&format!(
                "      condition:\n        match:\n          expr: \"{long_chain} > 0\"\n"
            )),
        )],
        "a.yaml",
        "$.resourcePolicy.rules[0].condition.match.expr",
        "",
    );
}

#[test]
fn ten_megabyte_file_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut body = rule("");
    body.push_str(&"# padding\n".repeat(1_100_000));
    write(dir.path(), "big.yaml", &body);
    let errors = store::load_dir(dir.path()).err().unwrap_or_default();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].message.contains("the limit is"), "{errors:?}");
}

#[test]
fn ten_thousand_policies_load() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..10_000 {
        write(
            dir.path(),
            &format!("p/{i:05}.yaml"),
            &rule("").replace("resource: doc", &format!("resource: kind{i}")),
        );
    }
    let set = store::load_dir(dir.path()).unwrap();
    assert_eq!(set.len(), 10_000);
    let input = CheckInput {
        principal: Principal {
            id: "u".into(),
            roles: vec!["user".into()],
            ..Default::default()
        },
        resource: Resource {
            kind: "kind9999".into(),
            id: "x".into(),
            ..Default::default()
        },
        actions: vec!["view".into()],
        ..Default::default()
    };
    assert_eq!(
        eval::check(&set, &input, &Params::default()).actions[0].policy,
        "resource.kind9999.vdefault"
    );
}

#[test]
fn hidden_files_tests_and_testdata_are_not_policies() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ok.yaml", &rule(""));
    write(dir.path(), ".hidden.yaml", "garbage: [");
    write(dir.path(), ".hidden_dir/x.yaml", "garbage: [");
    write(dir.path(), "testdata/principals.yaml", "principals: {}");
    write(dir.path(), "doc_test.yaml", "name: x");
    write(dir.path(), "README.md", "not yaml");
    let contents = store::read_dir(dir.path()).unwrap();
    assert_eq!(contents.policies.len(), 1);
    assert_eq!(contents.tests.len(), 1);
}

fn input(roles: &[&str], attr: serde_json::Value, actions: &[&str]) -> CheckInput {
    CheckInput {
        principal: Principal {
            id: "u".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        },
        resource: Resource {
            kind: "doc".into(),
            id: "d".into(),
            attr: attr.as_object().cloned().unwrap_or_default(),
            ..Default::default()
        },
        actions: actions.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn failed_reload_keeps_the_last_good_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "doc.yaml", &rule(""));
    let (store, res) = Store::open(dir.path());
    res.unwrap();
    let first = store.current();
    let allow = input(&["user"], serde_json::json!({}), &["view"]);
    assert_eq!(
        eval::check(&first, &allow, &Params::default()).actions[0].effect,
        toolgate::policy::model::Effect::Allow
    );
    write(
        dir.path(),
        "doc.yaml",
        "apiVersion: api.cerbos.dev/v1\nresourcePolicy: [broken\n",
    );
    assert!(store.reload().is_err());
    let still = store.current();
    assert_eq!(still.hash, first.hash);
    assert_eq!(
        eval::check(&still, &allow, &Params::default()).actions[0].effect,
        toolgate::policy::model::Effect::Allow
    );
    write(
        dir.path(),
        "doc.yaml",
        &rule("").replace("EFFECT_ALLOW", "EFFECT_DENY"),
    );
    let next = store.reload().unwrap();
    assert_ne!(next.hash, first.hash);
    assert_eq!(
        eval::check(&store.current(), &allow, &Params::default()).actions[0].effect,
        toolgate::policy::model::Effect::Deny
    );
}

#[test]
fn a_store_that_never_compiled_denies_everything() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "doc.yaml", "nonsense: [");
    let (store, res) = Store::open(dir.path());
    assert!(res.is_err());
    let out = eval::check(
        &store.current(),
        &input(&["user"], serde_json::json!({}), &["view"]),
        &Params::default(),
    );
    assert_eq!(out.actions[0].policy, "NO_MATCH");
}

#[test]
fn rebuilding_gives_identical_decisions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs = [
        "policies",
        "tests/corpus/derived/policies",
        "tests/corpus/scopes/policies",
        "tests/corpus/roles/policies",
    ];
    for d in dirs {
        let dir = root.join(d);
        let inputs: Vec<CheckInput> = [
            input(
                &["user"],
                serde_json::json!({"owner": "u", "public": true, "locked": true}),
                &["view", "edit", "delete", "read", "write"],
            ),
            input(
                &["user", "admin"],
                serde_json::json!({"department": "hr"}),
                &["view", "edit", "purge", "archive"],
            ),
            input(
                &["staff", "manager"],
                serde_json::json!({"locked": false}),
                &["read", "write", "archive"],
            ),
        ]
        .into_iter()
        .collect();
        let params = Params::default();
        let baseline: Vec<String> = {
            let set = store::load_dir(&dir).unwrap();
            inputs
                .iter()
                .map(|i| serde_json::to_string(&eval::check(&set, i, &params)).unwrap())
                .collect()
        };
        for _ in 0..20 {
            let set = store::load_dir(&dir).unwrap();
            let again: Vec<String> = inputs
                .iter()
                .map(|i| serde_json::to_string(&eval::check(&set, i, &params)).unwrap())
                .collect();
            assert_eq!(again, baseline, "{d}: decisions changed on rebuild");
        }
    }
}

#[test]
fn schemas_warn_and_reject() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "_schemas/principal.json",
        r#"{"type":"object","properties":{"department":{"enum":["marketing","engineering"]}},"required":["department"]}"#,
    );
    write(
        dir.path(),
        "doc.yaml",
        &rule("").replace(
            "  rules:\n",
            "  schemas:\n    principalSchema:\n      ref: cerbos:///principal.json\n      ignoreWhen:\n        actions: [\"create:*\"]\n  rules:\n",
        ),
    );
    let set = store::load_dir(dir.path()).unwrap();
    let mut bad = input(&["user"], serde_json::json!({}), &["view", "create:draft"]);
    bad.principal
        .attr
        .insert("department".into(), "sales".into());
    let mut params = Params {
        schema_enforcement: SchemaEnforcement::Warn,
        ..Params::default()
    };
    let out = eval::check(&set, &bad, &params);
    assert_eq!(out.validation_errors.len(), 1, "{out:?}");
    assert_eq!(out.validation_errors[0].path, "/department");
    assert_eq!(
        out.effect("view"),
        Some(toolgate::policy::model::Effect::Allow)
    );
    params.schema_enforcement = SchemaEnforcement::Reject;
    let out = eval::check(&set, &bad, &params);
    assert_eq!(
        out.effect("view"),
        Some(toolgate::policy::model::Effect::Deny)
    );
    params.schema_enforcement = SchemaEnforcement::None;
    assert!(
        eval::check(&set, &bad, &params)
            .validation_errors
            .is_empty()
    );
    let errors = load_errors(&[(
        "doc.yaml",
        &rule("").replace(
            "  rules:\n",
            "  schemas:\n    principalSchema:\n      ref: cerbos:///missing.json\n  rules:\n",
        ),
    )]);
    assert!(
        errors
            .iter()
            .any(|e| e.path == "$.resourcePolicy.schemas.principalSchema.ref"),
        "{errors:?}"
    );
}

/// A check's derived roles are evaluated once for all its actions, unless one may read the
/// action (`request.action`): those are evaluated per action, whatever the actions' order.
/// A derived role whose condition errors is evaluated per action too (its errors are reported
/// per action), and the cached roles give the same answers as one action at a time.
#[test]
fn derived_roles_that_read_the_action_are_evaluated_per_action() {
    let dir = tempfile::tempdir().unwrap();
    let role = |set: &str, name: &str, expr: &str| {
        format!(
            "apiVersion: api.cerbos.dev/v1\nderivedRoles:\n  name: {set}\n  definitions:\n    - name: {name}\n      parentRoles: [user]\n      condition:\n        match:\n          expr: {expr}\n"
        )
    };
    write(
        dir.path(),
        "a.yaml",
        &role("a", "reader", "request.action.startsWith('read')"),
    );
    write(
        dir.path(),
        "b.yaml",
        &role("b", "owner", "R.attr.owner == P.id"),
    );
    write(
        dir.path(),
        "c.yaml",
        &role("c", "broken", "R.attr.missing.deep == 1"),
    );
    let policy = |kind: &str, import: &str, rules: &[(&str, &str)]| {
        let mut s = format!(
            "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: {kind}\n  version: default\n  importDerivedRoles: [{import}]\n  rules:\n"
        );
        for (actions, role) in rules {
            writeln!(s, "    - actions: [{actions}]\n      effect: EFFECT_ALLOW\n      derivedRoles: [{role}]").unwrap();
        }
        s
    };
    write(
        dir.path(),
        "da.yaml",
        &policy("da", "a", &[("read, write", "reader")]),
    );
    write(
        dir.path(),
        "db.yaml",
        &policy("db", "b", &[("edit, publish", "owner")]),
    );
    write(
        dir.path(),
        "dc.yaml",
        &policy("dc", "b, c", &[("purge", "broken"), ("edit", "owner")]),
    );
    let set = store::load_dir(dir.path()).unwrap();
    let check = |kind: &str, owner: &str, actions: &[&str]| {
        let mut resource = Resource {
            kind: kind.into(),
            id: "d1".into(),
            ..Default::default()
        };
        resource.attr.insert("owner".into(), owner.into());
        let input = CheckInput {
            principal: Principal {
                id: "alice".into(),
                roles: vec!["user".into()],
                ..Default::default()
            },
            resource,
            actions: actions.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        let out = eval::check(&set, &input, &Params::default());
        let allowed: Vec<String> = out
            .actions
            .iter()
            .filter(|r| r.effect == toolgate::policy::model::Effect::Allow)
            .map(|r| r.action.clone())
            .collect();
        (allowed, out.evaluation_errors.len())
    };
    let allowed = |kind: &str, owner: &str, actions: &[&str]| check(kind, owner, actions).0;
    // `reader` reads the action: read is allowed, write is not, in either order.
    assert_eq!(allowed("da", "bob", &["read", "write"]), ["read"]);
    assert_eq!(allowed("da", "bob", &["write", "read"]), ["read"]);
    // `owner` does not: one evaluation serves every action, with the answers of one at a time.
    assert_eq!(
        allowed("db", "alice", &["edit", "write", "publish"]),
        ["edit", "publish"]
    );
    assert_eq!(
        allowed("db", "bob", &["edit", "publish"]),
        Vec::<String>::new()
    );
    for a in ["edit", "publish"] {
        assert_eq!(allowed("db", "alice", &[a]), [a]);
    }
    // `broken` errors (strict): purge is denied, edit still allowed, and the error is
    // reported once per action.
    let (ok, one) = check("dc", "alice", &["purge"]);
    assert!(ok.is_empty());
    assert!(one >= 1);
    let (ok, three) = check("dc", "alice", &["purge", "edit", "other"]);
    assert_eq!(ok, ["edit"]);
    assert_eq!(three, 3 * one, "one error report per action");
}
