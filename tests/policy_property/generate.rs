//! The generator: one random, self-contained policy set plus a Cerbos test suite per case.
//!
//! Every name a case defines carries its prefix (`c17_doc`, `c17_lim`, scope `s17`,
//! `c17_dr`, principal `c17_p0`, …), so many cases can share one policy directory (one `cerbos
//! compile` per batch) without meeting each other. Only the IdP roles `user`, `admin` and
//! `guest` are shared; they carry no role policy.
//!
//! A case draws from the features of issue 12: resource policies along scope chains (both
//! scope-permission modes), role policies (custom roles with and without `parentRoles`, at the
//! root and at scopes, with conditions, naming some kinds and not others), derived roles with
//! conditions, ALLOW and DENY rules for overlapping roles and action globs, principal
//! policies, local and imported constants and variables (some written through YAML merge keys
//! in both spellings, some through anchors), `jwt`/`jwts` aux data, suite fixtures, globals
//! and lenient scope search. Attribute values are of the wrong type or absent often enough
//! (`Knobs::errors`) that conditions fail everywhere: in rules, derived roles, variables, role
//! policies, principal policies and scoped policies.

use serde_json::{Value, json};

use crate::support::rng::Rng;
use crate::yaml::{self, M, Y, s, strs};

/// How the generator leans.
#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    /// Probability that an attribute value is of an unexpected type or absent.
    pub errors: f64,
}

/// One generated case: files relative to its own directory (`c17/`).
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub files: Vec<(String, String)>,
    /// The actions every test of the suite asks about.
    pub actions: Vec<String>,
}

impl Case {
    /// The same case with every test asking about `action` only.
    pub fn asking_only(&self, action: &str) -> Case {
        let list = |xs: &[&str]| yaml::flow(&strs(xs));
        let all: Vec<&str> = self.actions.iter().map(String::as_str).collect();
        let expectation = |a: &str| {
            format!(
                "{}: \"EFFECT_DENY\"",
                yaml::key_text(&yaml::Key::Name(a.to_string()))
            )
        };
        let suite = format!("{}_test.yaml", self.name);
        let files = self
            .files
            .iter()
            .map(|(path, text)| {
                let text = if *path == suite {
                    text.replace(&list(&all), &list(&[action]))
                        .replace(&expectation(&self.actions[0]), &expectation(action))
                } else {
                    text.clone()
                };
                (path.clone(), text)
            })
            .collect();
        Case {
            name: self.name.clone(),
            files,
            actions: vec![action.to_string()],
        }
    }
}

const IDP_ROLES: [&str; 3] = ["user", "admin", "guest"];
const ACTION_GLOBS: [&str; 8] = [
    "view", "edit", "delete", "share", "archive", "*", "view:*", "edit",
];
const ACTIONS: [&str; 7] = [
    "view",
    "edit",
    "delete",
    "share",
    "archive",
    "view:public",
    "comment",
];

/// What a condition may refer to where it is written.
#[derive(Default, Clone)]
struct Scope {
    consts: Vec<&'static str>,
    vars: Vec<&'static str>,
    /// `runtime.effectiveDerivedRoles` (resource-policy rules only).
    runtime: bool,
}

/// Constants: name → value. `x_` names come from the case's `exportConstants`.
fn const_value(rng: &mut Rng, name: &str, prefix: &str) -> Value {
    match name {
        "min_level" | "x_min_level" => rng.pick(&[json!(2), json!(3), json!(2.5)]).clone(),
        "blocked" => json!(format!("{prefix}_p{}", rng.below(3))),
        "open" | "x_open" => rng
            .pick(&[json!(["open", "draft"]), json!(["open"]), json!([])])
            .clone(),
        "limits" => json!({"max": rng.below(4)}),
        _ => Value::Null,
    }
}
const LOCAL_CONSTS: [&str; 4] = ["min_level", "blocked", "open", "limits"];
const EXPORT_CONSTS: [&str; 2] = ["x_min_level", "x_open"];

/// Variables: name, expression, constants and variables it needs.
struct VarDef {
    name: &'static str,
    expr: &'static str,
    consts: &'static [&'static str],
    vars: &'static [&'static str],
}
const LOCAL_VARS: [VarDef; 6] = [
    VarDef {
        name: "is_owner",
        expr: "R.attr.owner == P.id",
        consts: &[],
        vars: &[],
    },
    VarDef {
        name: "big",
        expr: "R.attr.n > 1",
        consts: &[],
        vars: &[],
    },
    VarDef {
        name: "lvl_ok",
        expr: "P.attr.level >= C.min_level",
        consts: &["min_level"],
        vars: &[],
    },
    VarDef {
        name: "gh",
        expr: "request.auxData.jwt.iss == \"gh\"",
        consts: &[],
        vars: &[],
    },
    VarDef {
        name: "secret",
        expr: "\"secret\" in R.attr.tags",
        consts: &[],
        vars: &[],
    },
    VarDef {
        name: "both",
        expr: "V.is_owner && variables.big",
        consts: &[],
        vars: &["is_owner", "big"],
    },
];
const EXPORT_VARS: [(&str, &str); 2] = [
    ("x_owner", "R.attr.owner == P.id"),
    ("x_okta", "request.auxData.jwts.okta.claims.sub == P.id"),
];

/// A boolean CEL expression over what `sc` offers.
fn atom(rng: &mut Rng, sc: &Scope) -> String {
    let roll = rng.below(100);
    if roll < 15 && !sc.vars.is_empty() {
        let v = rng.pick(&sc.vars);
        return match rng.below(3) {
            0 => format!("V.{v}"),
            1 => format!("variables.{v}"),
            _ => format!("!V.{v}"),
        };
    }
    if roll < 27 && !sc.consts.is_empty() {
        return match *rng.pick(&sc.consts) {
            "min_level" => "P.attr.level >= C.min_level".into(),
            "x_min_level" => "P.attr.level >= constants.x_min_level".into(),
            "blocked" => "P.id == C.blocked".into(),
            "open" => "R.attr.status in C.open".into(),
            "x_open" => "R.attr.status in C.x_open".into(),
            "limits" => "R.attr.n <= C.limits.max".into(),
            other => format!("C.{other} == null"),
        };
    }
    if roll < 32 && sc.runtime {
        return rng
            .pick(&[
                "\"flagged\" in runtime.effectiveDerivedRoles",
                "size(runtime.effectiveDerivedRoles) > 0",
                "!(\"owner\" in runtime.effectiveDerivedRoles)",
            ])
            .to_string();
    }
    rng.pick(&[
        "R.attr.n > 1",
        "R.attr.n == 2",
        "R.attr.owner == P.id",
        "R.attr.owner != P.id",
        "P.attr.level >= 2",
        "P.attr.banned == true",
        "!P.attr.banned",
        "\"secret\" in R.attr.tags",
        "R.attr.tags.exists(t, t == \"secret\")",
        "size(R.attr.title) > 3",
        "R.attr.status == \"open\"",
        "request.auxData.jwt.iss == \"gh\"",
        "request.auxData.jwts.okta.claims.sub == P.id",
        "\"okta\" in request.auxData.jwts",
        "size(request.auxData.jwts) > 0",
        "has(R.attr.owner)",
        "has(P.attr.level) && P.attr.level > 1",
        "R.id.startsWith(\"d\")",
        "timestamp(R.attr.created) < now()",
        "P.attr.level >= 2 || R.attr.n > 1",
        "R.attr.n > 1 && P.attr.level >= 2",
        "G.environment == \"test\"",
        "P.attr.level + 1 > R.attr.n",
    ])
    .to_string()
}

/// A `condition: {match: ...}` tree of depth ≤ 2.
fn matcher(rng: &mut Rng, sc: &Scope, depth: u32) -> Y {
    if depth >= 2 || rng.chance(0.6) {
        return M::new().put("expr", s(atom(rng, sc))).y();
    }
    let op = *rng.pick(&["all", "any", "none"]);
    let n = 1 + rng.below(3);
    let of: Vec<Y> = (0..n).map(|_| matcher(rng, sc, depth + 1)).collect();
    M::new().put(op, M::new().put("of", Y::List(of)).y()).y()
}

fn condition(rng: &mut Rng, sc: &Scope) -> Y {
    M::new().put("match", matcher(rng, sc, 0)).y()
}

fn subset<T: Clone>(rng: &mut Rng, pool: &[T], min: usize, max: usize) -> Vec<T> {
    let mut idx: Vec<usize> = (0..pool.len()).collect();
    rng.shuffle(&mut idx);
    let n = (min + rng.below(max - min + 1)).min(pool.len());
    idx.truncate(n);
    idx.sort();
    idx.into_iter().map(|i| pool[i].clone()).collect()
}

/// A `{k: v, ...}` body written plainly or through a merge key (either spelling), with the
/// written keys winning over merged ones (a decoy under a written key checks that).
fn mapping_with_merges(rng: &mut Rng, entries: Vec<(String, Y)>, decoy: Option<Y>) -> Y {
    let mut m = M::new();
    if entries.is_empty() || rng.chance(0.5) {
        for (k, v) in entries {
            m.push(&k, v);
        }
        return m.y();
    }
    let cut = rng.below(entries.len() + 1);
    let (merged, written) = entries.split_at(cut);
    let mut src = M::new();
    for (k, v) in merged {
        src.push(k, v.clone());
    }
    if let (Some(d), Some((k, _))) = (&decoy, written.first()) {
        src.push(k, d.clone());
    }
    m.merge(rng.chance(0.5), Y::Flow(Box::new(src.y())));
    for (k, v) in written {
        m.push(k, v.clone());
    }
    m.y()
}

/// `entries` merged from an alias (`<<: *name`) of an anchor written elsewhere in the
/// document, with `own` written beside it (winning).
fn merged_from_alias(rng: &mut Rng, name: &str, own: Vec<(String, Y)>) -> Y {
    let mut m = M::new();
    m.merge(rng.chance(0.5), Y::Alias(name.to_string()));
    for (k, v) in own {
        m.push(&k, v);
    }
    m.y()
}

struct Ctx {
    prefix: String,
    kinds: Vec<String>,
    scopes: Vec<String>,
    custom_roles: Vec<String>,
    derived: Vec<&'static str>,
    has_export_consts: bool,
    has_export_vars: bool,
    principal_policy: bool,
}

/// Constants and variables blocks for a policy; returns the block and what conditions may use.
/// What a policy's `constants` and `variables` blocks hold.
struct Defs {
    blocks: Vec<(&'static str, Y)>,
    scope: Scope,
    /// A map to write under `metadata.annotations` with the anchor `vars`.
    annotations: Option<Y>,
}

fn definitions(rng: &mut Rng, ctx: &Ctx) -> Defs {
    let mut sc = Scope::default();
    let mut annotations = None;
    let mut blocks = Vec::new();
    // Constants.
    let mut cblock = M::new();
    let locals = subset(rng, &LOCAL_CONSTS, 0, 3);
    if !locals.is_empty() {
        let entries: Vec<(String, Y)> = locals
            .iter()
            .map(|n| (n.to_string(), yaml::json(&const_value(rng, n, &ctx.prefix))))
            .collect();
        let decoy = Some(Y::Scalar("99".into()));
        cblock.push("local", mapping_with_merges(rng, entries, decoy));
        sc.consts.extend(locals.iter().copied());
    }
    if ctx.has_export_consts && rng.chance(0.5) {
        cblock.push("import", strs([format!("{}_consts", ctx.prefix)]));
        sc.consts.extend(EXPORT_CONSTS);
    }
    if !cblock.0.is_empty() {
        blocks.push(("constants", cblock.y()));
    }
    // Variables, in dependency order.
    let mut vblock = M::new();
    let mut entries: Vec<(String, Y)> = Vec::new();
    for def in &LOCAL_VARS {
        let ok = def.consts.iter().all(|c| sc.consts.contains(c))
            && def.vars.iter().all(|v| sc.vars.contains(v));
        if ok && rng.chance(0.35) {
            entries.push((def.name.to_string(), s(def.expr)));
            sc.vars.push(def.name);
        }
    }
    if !entries.is_empty() {
        if rng.chance(0.2) {
            // Through an anchor under `metadata.annotations` (a map of strings, as variables
            // are), merged into `variables.local`.
            let cut = rng.below(entries.len());
            let own = entries.split_off(cut + 1);
            let mut anchored = M::new();
            for (k, v) in entries {
                anchored.push(&k, v);
            }
            annotations = Some(anchored.y());
            vblock.push("local", merged_from_alias(rng, "vars", own));
        } else {
            vblock.push("local", mapping_with_merges(rng, entries, Some(s("false"))));
        }
    }
    if ctx.has_export_vars && rng.chance(0.5) {
        vblock.push("import", strs([format!("{}_vars", ctx.prefix)]));
        sc.vars.extend(EXPORT_VARS.iter().map(|(n, _)| *n));
    }
    if !vblock.0.is_empty() {
        blocks.push(("variables", vblock.y()));
    }
    Defs {
        blocks,
        scope: sc,
        annotations,
    }
}

fn doc(kind: &str, body: M) -> String {
    doc_with(kind, body, None)
}

/// A policy document; `annotations` go under `metadata` with the anchor `vars`.
fn doc_with(kind: &str, body: M, annotations: Option<Y>) -> String {
    let mut d = M::new().put("apiVersion", s("api.cerbos.dev/v1"));
    if let Some(a) = annotations {
        d.push(
            "metadata",
            M::new()
                .put("annotations", Y::Anchored("vars".into(), Box::new(a)))
                .y(),
        );
    }
    yaml::render(&d.put(kind, body.y()).y())
}

fn roles_pool(ctx: &Ctx) -> Vec<String> {
    let mut pool: Vec<String> = IDP_ROLES.iter().map(|r| r.to_string()).collect();
    pool.extend(ctx.custom_roles.iter().cloned());
    pool
}

/// A scope's `scopePermissions`, the same for all its resource policies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Perm {
    Unset,
    Override,
    Consent,
}

fn resource_policy(rng: &mut Rng, ctx: &Ctx, kind: &str, scope: &str, perm: Perm) -> String {
    let mut body = M::new()
        .put("version", s("default"))
        .put("resource", s(kind));
    if !scope.is_empty() {
        body.push("scope", s(scope));
        match perm {
            Perm::Consent => body.push(
                "scopePermissions",
                s("SCOPE_PERMISSIONS_REQUIRE_PARENTAL_CONSENT_FOR_ALLOWS"),
            ),
            Perm::Override => body.push("scopePermissions", s("SCOPE_PERMISSIONS_OVERRIDE_PARENT")),
            Perm::Unset => {}
        }
    }
    let imports = !ctx.derived.is_empty() && rng.chance(0.7);
    if imports {
        body.push("importDerivedRoles", strs([format!("{}_dr", ctx.prefix)]));
    }
    let defs = definitions(rng, ctx);
    for (k, v) in defs.blocks {
        body.push(k, v);
    }
    let mut sc = defs.scope;
    sc.runtime = imports;
    let mut role_pool = roles_pool(ctx);
    role_pool.push("*".into());
    let n = 1 + rng.below(5);
    let mut rules = Vec::new();
    for _ in 0..n {
        let mut rule = M::new().put("actions", strs(subset(rng, &ACTION_GLOBS[..7], 1, 2)));
        rule.push(
            "effect",
            s(if rng.chance(0.65) {
                "EFFECT_ALLOW"
            } else {
                "EFFECT_DENY"
            }),
        );
        let use_derived = imports && rng.chance(0.4);
        if !use_derived || rng.chance(0.2) {
            rule.push("roles", strs(subset(rng, &role_pool, 1, 2)));
        }
        if use_derived {
            rule.push("derivedRoles", strs(subset(rng, &ctx.derived, 1, 2)));
        }
        if rng.chance(0.5) {
            rule.push("condition", condition(rng, &sc));
        }
        rules.push(rule.y());
    }
    body.push("rules", Y::List(rules));
    doc_with("resourcePolicy", body, defs.annotations)
}

fn derived_roles(rng: &mut Rng, ctx: &Ctx) -> String {
    let mut body = M::new().put("name", s(format!("{}_dr", ctx.prefix)));
    let defs = definitions(rng, ctx);
    for (k, v) in defs.blocks {
        body.push(k, v);
    }
    let sc = defs.scope;
    let mut parents = roles_pool(ctx);
    parents.push("*".into());
    let list: Vec<Y> = ctx
        .derived
        .iter()
        .map(|name| {
            let mut d = M::new()
                .put("name", s(name))
                .put("parentRoles", strs(subset(rng, &parents, 1, 2)));
            if rng.chance(0.75) {
                d.push("condition", condition(rng, &sc));
            }
            d.y()
        })
        .collect();
    body.push("definitions", Y::List(list));
    doc_with("derivedRoles", body, defs.annotations)
}

fn role_policy(rng: &mut Rng, ctx: &Ctx, idx: usize, scope: &str) -> String {
    let role = &ctx.custom_roles[idx];
    let mut body = M::new().put("role", s(role));
    if rng.chance(0.3) {
        body.push("version", s("default"));
    }
    if !scope.is_empty() {
        body.push("scope", s(scope));
    }
    // Parents: IdP roles, and sometimes an earlier custom role (no cycles).
    let mut parents: Vec<String> = subset(rng, &IDP_ROLES, 0, 2)
        .into_iter()
        .map(String::from)
        .collect();
    if idx > 0 && rng.chance(0.3) {
        parents.push(ctx.custom_roles[0].clone());
    }
    if !parents.is_empty() || rng.chance(0.3) {
        body.push("parentRoles", strs(&parents));
    }
    let defs = definitions(rng, ctx);
    for (k, v) in defs.blocks {
        body.push(k, v);
    }
    let sc = defs.scope;
    let mut kinds = ctx.kinds.clone();
    kinds.push(format!("{}_other", ctx.prefix));
    kinds.push("*".into());
    let n = 1 + rng.below(3);
    let rules: Vec<Y> = (0..n)
        .map(|_| {
            let mut r = M::new()
                .put("resource", s(rng.pick(&kinds)))
                .put("allowActions", strs(subset(rng, &ACTION_GLOBS[..7], 1, 3)));
            if rng.chance(0.35) {
                r.push("condition", condition(rng, &sc));
            }
            r.y()
        })
        .collect();
    body.push("rules", Y::List(rules));
    doc_with("rolePolicy", body, defs.annotations)
}

fn principal_policy(rng: &mut Rng, ctx: &Ctx, scope: &str) -> String {
    let mut body = M::new()
        .put("principal", s(format!("{}_mal", ctx.prefix)))
        .put("version", s("default"));
    if !scope.is_empty() {
        body.push("scope", s(scope));
    }
    let defs = definitions(rng, ctx);
    for (k, v) in defs.blocks {
        body.push(k, v);
    }
    let sc = defs.scope;
    // Cerbos refuses two rules for the same resource in one principal policy.
    let mut kinds = ctx.kinds.clone();
    kinds.push("*".into());
    let rules: Vec<Y> = subset(rng, &kinds, 1, 2)
        .into_iter()
        .map(|kind| {
            let m = 1 + rng.below(3);
            let actions: Vec<Y> = (0..m)
                .map(|_| {
                    let mut a = M::new().put("action", s(rng.pick(&ACTION_GLOBS[..7]))).put(
                        "effect",
                        s(if rng.chance(0.5) {
                            "EFFECT_ALLOW"
                        } else {
                            "EFFECT_DENY"
                        }),
                    );
                    if rng.chance(0.5) {
                        a.push("condition", condition(rng, &sc));
                    }
                    a.y()
                })
                .collect();
            M::new()
                .put("resource", s(&kind))
                .put("actions", Y::List(actions))
                .y()
        })
        .collect();
    body.push("rules", Y::List(rules));
    doc_with("principalPolicy", body, defs.annotations)
}

/// An attribute value: usually of the type conditions expect, sometimes not (or absent).
fn attr_value(rng: &mut Rng, knobs: Knobs, good: &[Value], bad: &[Value]) -> Option<Value> {
    if rng.chance(knobs.errors) {
        if rng.chance(0.4) {
            return None;
        }
        return Some(rng.pick(bad).clone());
    }
    Some(rng.pick(good).clone())
}

fn attrs(rng: &mut Rng, knobs: Knobs, spec: &[(&str, Vec<Value>, Vec<Value>)]) -> Vec<(String, Y)> {
    spec.iter()
        .filter_map(|(k, good, bad)| {
            attr_value(rng, knobs, good, bad).map(|v| (k.to_string(), yaml::json(&v)))
        })
        .collect()
}

/// `attr` for the `i`th principal or resource: the first one's is anchored as `anchor`; a
/// later one's may merge it (`<<: *anchor`) under its own values.
fn attr_block(rng: &mut Rng, a: Vec<(String, Y)>, i: usize, anchor: &str) -> Option<Y> {
    if i == 0 {
        return Some(Y::Anchored(
            anchor.into(),
            Box::new(mapping_with_merges(rng, a, None)),
        ));
    }
    if rng.chance(0.3) {
        let own = subset(rng, &a, 0, a.len());
        return Some(merged_from_alias(rng, anchor, own));
    }
    (!a.is_empty()).then(|| mapping_with_merges(rng, a, None))
}

fn principal(rng: &mut Rng, ctx: &Ctx, knobs: Knobs, id: &str, i: usize) -> Y {
    let mut pool = roles_pool(ctx);
    pool.push("unknown".into());
    let mut roles = subset(rng, &pool, 1, 3);
    rng.shuffle(&mut roles);
    let spec = [
        (
            "level",
            vec![json!(1), json!(2), json!(3), json!(2.5)],
            vec![json!("3"), json!(null), json!([2])],
        ),
        (
            "banned",
            vec![json!(true), json!(false)],
            vec![json!("no"), json!(0)],
        ),
    ];
    let mut p = M::new().put("id", s(id)).put("roles", strs(&roles));
    let a = attrs(rng, knobs, &spec);
    if let Some(attr) = attr_block(rng, a, i, "pattr") {
        p.push("attr", attr);
    }
    if ctx.principal_policy && rng.chance(0.4) {
        let mut scopes = ctx.scopes.clone();
        scopes.push(String::new());
        p.push("scope", s(rng.pick(&scopes)));
    }
    p.y()
}

fn resource(rng: &mut Rng, ctx: &Ctx, knobs: Knobs, i: usize, pids: &[String]) -> Y {
    let id = format!("d{i}");
    let mut kinds = ctx.kinds.clone();
    if rng.chance(0.05) {
        kinds = vec![format!("{}_other", ctx.prefix)];
    }
    let mut owners: Vec<Value> = pids.iter().map(|p| json!(p)).collect();
    owners.push(json!("nobody"));
    let spec = [
        (
            "n",
            vec![json!(0), json!(1), json!(2), json!(5)],
            vec![json!("x"), json!(null), json!(true)],
        ),
        ("owner", owners, vec![json!(7), json!(null)]),
        (
            "status",
            vec![json!("open"), json!("closed"), json!("draft")],
            vec![json!(3), json!(["open"])],
        ),
        (
            "tags",
            vec![
                json!([]),
                json!(["secret"]),
                json!(["x", "secret"]),
                json!(["x"]),
            ],
            vec![json!("secret"), json!(1)],
        ),
        ("title", vec![json!("hello"), json!("ab")], vec![json!(5)]),
        (
            "created",
            vec![json!("2026-01-01T00:00:00Z"), json!("2027-01-01T00:00:00Z")],
            vec![json!("yesterday"), json!(1)],
        ),
    ];
    let mut r = M::new().put("id", s(id)).put("kind", s(rng.pick(&kinds)));
    let a = attrs(rng, knobs, &spec);
    if let Some(attr) = attr_block(rng, a, i, "rattr") {
        r.push("attr", attr);
    }
    match rng.below(10) {
        0..=3 => {}
        4..=8 => {
            let s_ = rng.pick(&ctx.scopes).clone();
            r.push("scope", s(&s_));
        }
        _ => {
            let deeper = format!("{}.leaf", ctx.scopes.last().cloned().unwrap_or_default());
            r.push("scope", s(rng.pick(&[deeper, ".".to_string()])));
        }
    }
    r.y()
}

fn aux_data(rng: &mut Rng, pids: &[String]) -> Y {
    if rng.chance(0.4) {
        let iss = *rng.pick(&["gh", "other"]);
        M::new()
            .put(
                "jwt",
                M::new()
                    .put("iss", s(iss))
                    .put("sub", s(rng.pick(pids)))
                    .y(),
            )
            .y()
    } else {
        let mut tokens = M::new();
        if rng.chance(0.7) {
            tokens.push(
                "okta",
                M::new()
                    .put("claims", M::new().put("sub", s(rng.pick(pids))).y())
                    .y(),
            );
        }
        if rng.chance(0.5) {
            tokens.push(
                "github",
                M::new().put("claims", M::new().put("iss", s("gh")).y()).y(),
            );
        }
        M::new().put("jwts", tokens.y()).y()
    }
}

/// Generates case number `n`.
pub fn case(rng: &mut Rng, n: usize, knobs: Knobs) -> Case {
    let prefix = format!("c{n}");
    let scope1 = format!("s{n}");
    let scopes = vec![scope1.clone(), format!("{scope1}.eu")];
    let kinds = vec![format!("{prefix}_doc"), format!("{prefix}_note")];
    let n_custom = rng.below(3);
    let custom_roles: Vec<String> = ["lim", "aud"][..n_custom]
        .iter()
        .map(|r| format!("{prefix}_{r}"))
        .collect();
    let derived: Vec<&'static str> = if rng.chance(0.6) {
        subset(rng, &["owner", "flagged", "vip"], 1, 3)
    } else {
        Vec::new()
    };
    let ctx = Ctx {
        prefix: prefix.clone(),
        kinds: kinds.clone(),
        scopes: scopes.clone(),
        custom_roles,
        derived,
        has_export_consts: rng.chance(0.3),
        has_export_vars: rng.chance(0.3),
        principal_policy: rng.chance(0.25),
    };
    let mut files: Vec<(String, String)> = Vec::new();
    if ctx.has_export_consts {
        let mut defs = M::new();
        for c in EXPORT_CONSTS {
            defs.push(c, yaml::json(&const_value(rng, c, &prefix)));
        }
        files.push((
            "consts.yaml".into(),
            doc(
                "exportConstants",
                M::new()
                    .put("name", s(format!("{prefix}_consts")))
                    .put("definitions", defs.y()),
            ),
        ));
    }
    if ctx.has_export_vars {
        let entries: Vec<(String, Y)> = EXPORT_VARS
            .iter()
            .map(|(k, v)| (k.to_string(), s(v)))
            .collect();
        let defs = mapping_with_merges(rng, entries, Some(s("true")));
        files.push((
            "vars.yaml".into(),
            doc(
                "exportVariables",
                M::new()
                    .put("name", s(format!("{prefix}_vars")))
                    .put("definitions", defs),
            ),
        ));
    }
    if !ctx.derived.is_empty() {
        files.push(("derived.yaml".into(), derived_roles(rng, &ctx)));
    }
    // Scope permissions are a property of a scope (all of its policies must agree).
    let perms: Vec<Perm> = scopes
        .iter()
        .map(|_| *rng.pick(&[Perm::Unset, Perm::Override, Perm::Consent, Perm::Consent]))
        .collect();
    let mut explicit_at: Vec<usize> = vec![0; scopes.len()];
    for kind in &kinds {
        if !rng.chance(0.92) {
            continue;
        }
        files.push((
            format!("{kind}.yaml"),
            resource_policy(rng, &ctx, kind, "", Perm::Unset),
        ));
        // A scoped policy needs its whole chain.
        for (i, scope) in scopes.iter().enumerate() {
            if !rng.chance(0.55) {
                break;
            }
            files.push((
                format!("{kind}.{scope}.yaml"),
                resource_policy(rng, &ctx, kind, scope, perms[i]),
            ));
            if perms[i] != Perm::Unset {
                explicit_at[i] += 1;
            }
        }
    }
    for idx in 0..ctx.custom_roles.len() {
        // Cerbos 0.55 refuses a role (or principal) policy at a scope where two resource policies set
        // `scopePermissions` explicitly ("conflicting scopePermissions", even when they
        // agree); toolgate loads it (docs/compatibility.md).
        let mut all_scopes = vec![String::new()];
        all_scopes.extend(
            scopes
                .iter()
                .zip(&explicit_at)
                .filter(|(_, n)| **n < 2)
                .map(|(s, _)| s.clone()),
        );
        for scope in subset(rng, &all_scopes, 1, 2) {
            files.push((
                format!(
                    "role.{}.{}.yaml",
                    ctx.custom_roles[idx],
                    if scope.is_empty() { "root" } else { &scope }
                ),
                role_policy(rng, &ctx, idx, &scope),
            ));
        }
    }
    if ctx.principal_policy {
        files.push(("mal.yaml".into(), principal_policy(rng, &ctx, "")));
        // The same Cerbos refusal as for role policies above.
        if explicit_at[0] < 2 && rng.chance(0.4) {
            files.push((
                format!("mal.{scope1}.yaml"),
                principal_policy(rng, &ctx, &scope1),
            ));
        }
    }

    // The suite.
    // Three principals, two or three resources and two or three tests: at least 12 checks.
    let mut pids: Vec<String> = vec![format!("{prefix}_p0"), format!("{prefix}_p1")];
    pids.push(if ctx.principal_policy {
        format!("{prefix}_mal")
    } else {
        format!("{prefix}_p2")
    });
    let mut principals = M::new();
    for (i, id) in pids.iter().enumerate() {
        principals.push(&format!("p{i}"), principal(rng, &ctx, knobs, id, i));
    }
    let mut resources = M::new();
    let n_res = 2 + rng.below(2);
    for i in 0..n_res {
        resources.push(&format!("r{i}"), resource(rng, &ctx, knobs, i, &pids));
    }
    let mut aux = M::new();
    let n_aux = 1 + rng.below(2);
    for i in 0..n_aux {
        aux.push(&format!("a{i}"), aux_data(rng, &pids));
    }
    let actions = subset(rng, &ACTIONS, 3, 6);
    let p_names: Vec<String> = (0..pids.len()).map(|i| format!("p{i}")).collect();
    let r_names: Vec<String> = (0..n_res).map(|i| format!("r{i}")).collect();
    let mut tests = Vec::new();
    let mut aux_names: Vec<Option<String>> = vec![None];
    aux_names.extend((0..n_aux).map(|i| Some(format!("a{i}"))));
    for a in &aux_names {
        let mut input = M::new()
            .put("principals", strs(&p_names))
            .put("resources", strs(&r_names))
            .put("actions", strs(&actions));
        if let Some(a) = a {
            input.push("auxData", s(a));
        }
        // Every expectation is DENY: the results carry the actual effect either way.
        let expected = M::new()
            .put("principal", s(&p_names[0]))
            .put("resource", s(&r_names[0]))
            .put("actions", M::new().put(actions[0], s("EFFECT_DENY")).y());
        tests.push(
            M::new()
                .put("name", s(format!("aux {}", a.as_deref().unwrap_or("none"))))
                .put("input", input.y())
                .put("expected", Y::List(vec![expected.y()]))
                .y(),
        );
    }
    let mut options = M::new().put("now", s("2026-06-01T00:00:00Z"));
    if rng.chance(0.5) {
        options.push(
            "globals",
            M::new()
                .put("environment", s(rng.pick(&["test", "prod"])))
                .y(),
        );
    }
    if rng.chance(0.2) {
        options.push("lenientScopeSearch", Y::Scalar("true".into()));
    }
    let mut suite = M::new().put("name", s(&prefix)).put("options", options.y());
    // Fixtures: inline or in `testdata/`.
    let fixture = |files: &mut Vec<(String, String)>, file: &str, key: &str, m: M| {
        files.push((
            format!("testdata/{file}"),
            yaml::render(&M::new().put(key, m.y()).y()),
        ));
    };
    if rng.chance(0.3) {
        fixture(&mut files, "principals.yaml", "principals", principals);
    } else {
        suite.push("principals", principals.y());
    }
    if rng.chance(0.3) {
        fixture(&mut files, "resources.yaml", "resources", resources);
    } else {
        suite.push("resources", resources.y());
    }
    if !aux.0.is_empty() {
        if rng.chance(0.3) {
            fixture(&mut files, "auxdata.yaml", "auxData", aux);
        } else {
            suite.push("auxData", aux.y());
        }
    }
    suite.push("tests", Y::List(tests));
    files.push((format!("{prefix}_test.yaml"), yaml::render(&suite.y())));
    Case {
        name: prefix,
        files,
        actions: actions.iter().map(|a| a.to_string()).collect(),
    }
}
