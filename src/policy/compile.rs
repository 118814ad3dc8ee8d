//! Policy files → one immutable, indexed [`PolicySet`].
//!
//! Compilation is all-or-nothing: every file is checked and every error is collected (file,
//! YAML path, message). CEL is compiled once here, never per request. The index is built from
//! ordered maps, so the same files give the same set, and the same decisions, on every start.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::cel::{CelEnv, Expr, Variables};
use super::glob::Glob;
use super::model::{self, Effect, PolicyFile, ScopePermissions};
use super::parse;

/// The most policies one set may hold; beyond this a load fails clearly.
pub const MAX_POLICIES: usize = 50_000;
/// How deep `all`/`any`/`none` may nest.
pub const MAX_MATCH_DEPTH: usize = 32;

/// One input file: its path relative to the policy root, and its bytes.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// One compile error, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub file: String,
    /// `$`-rooted YAML path, e.g. `$.resourcePolicy.rules[0].condition.match.expr`.
    pub path: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => {
                write!(f, "{}:{l}:{c}: {}: {}", self.file, self.path, self.message)
            }
            (Some(l), None) => write!(f, "{}:{l}: {}: {}", self.file, self.path, self.message),
            _ => write!(f, "{}: {}: {}", self.file, self.path, self.message),
        }
    }
}

/// Splits a `$`-rooted path (`$.resourcePolicy.rules[0].condition.match.expr`) into steps.
/// Keys are split at dots and brackets, so a key that itself holds one is found only up to it
/// (the error then points at the deepest node found, still in the right place).
pub(crate) fn path_steps(path: &str) -> Vec<super::yaml_merge::Step<'_>> {
    use super::yaml_merge::Step;
    let mut steps = Vec::new();
    let rest = path.strip_prefix('$').unwrap_or(path);
    for part in rest.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
            steps.push(Step::Key(key));
        }
        for idx in pieces {
            match idx.trim_end_matches(']').parse() {
                Ok(i) => steps.push(Step::Index(i)),
                Err(_) => return steps,
            }
        }
    }
    steps
}

/// Gives errors found after parsing (CEL, references, names) the line and column of the node
/// their path names, so every error reads `file:line:column`.
fn locate_errors(errors: &mut [CompileError], files: &[SourceFile]) {
    let mut trees: BTreeMap<&str, Option<super::yaml_merge::Node>> = BTreeMap::new();
    for e in errors.iter_mut().filter(|e| e.line.is_none()) {
        let Some(f) = files.iter().find(|f| f.name == e.file) else {
            continue;
        };
        let tree = trees.entry(f.name.as_str()).or_insert_with(|| {
            std::str::from_utf8(&f.bytes)
                .ok()
                .and_then(|t| super::yaml_merge::parse(t).ok().flatten())
        });
        if let Some(tree) = tree {
            let (line, column) = super::yaml_merge::locate(tree, &path_steps(&e.path), None);
            if line > 0 {
                e.line = Some(line);
                e.column = Some(column);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Resource,
    Principal,
    Role,
}

/// A condition tree, compiled.
#[derive(Debug, Clone)]
pub enum Cond {
    Expr(Expr),
    All(Vec<Cond>),
    Any(Vec<Cond>),
    None(Vec<Cond>),
}

impl Cond {
    /// Whether any expression of the condition satisfies `f`.
    pub fn any_expr(&self, f: &impl Fn(&Expr) -> bool) -> bool {
        match self {
            Cond::Expr(e) => f(e),
            Cond::All(c) | Cond::Any(c) | Cond::None(c) => c.iter().any(|c| c.any_expr(f)),
        }
    }
}

/// Whether an expression may read the action being checked, judged by its text and erring
/// towards yes: it names `action` anywhere, or takes `request` other than as
/// `request.principal`, `request.resource` or `request.auxData` (`request.action` and the
/// whole `request` reach the action).
pub fn may_read_action(source: &str) -> bool {
    if source.contains("action") {
        return true;
    }
    let mut rest = source;
    while let Some(i) = rest.find("request") {
        rest = &rest[i + "request".len()..];
        let known = [".principal", ".resource", ".auxData", ".aux_data"]
            .iter()
            .any(|p| rest.starts_with(p));
        if !known {
            return true;
        }
    }
    false
}

/// A derived role definition, with its own set's constants and variables.
#[derive(Debug)]
pub struct DerivedRole {
    pub name: String,
    /// The `derivedRoles` set it came from.
    pub set: String,
    pub parent_roles: Vec<Glob>,
    pub condition: Option<Cond>,
    pub constants: Arc<Map<String, Value>>,
    pub variables: Variables,
    pub path: String,
    pub file: String,
    /// Whether its condition or its variables may read the action ([`may_read_action`]).
    /// When none of a scope's derived roles does, one evaluation serves every action of a
    /// check.
    pub reads_action: bool,
}

/// One rule of any policy kind.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    /// YAML path of the rule, for explain and coverage.
    pub path: String,
    /// Principal and role policies: the resource kind glob.
    pub resource: Option<Glob>,
    pub actions: Vec<Glob>,
    pub roles: Vec<Glob>,
    pub derived_roles: Vec<String>,
    pub effect: Effect,
    pub condition: Option<Cond>,
    pub output_activated: Option<Expr>,
    pub output_not_met: Option<Expr>,
    /// A conditional ALLOW in a `REQUIRE_PARENTAL_CONSENT_FOR_ALLOWS` scope, rewritten (as
    /// Cerbos does) into a DENY whose condition is `none(original)`.
    pub implicit_deny: bool,
}

/// A compiled JSON Schema, with the actions it does not apply to.
pub struct Schema {
    pub reference: String,
    pub validator: jsonschema::Validator,
    pub ignore_actions: Vec<Glob>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Schema({})", self.reference)
    }
}

/// One resource, principal or role policy at one scope.
#[derive(Debug)]
pub struct Policy {
    pub kind: PolicyKind,
    /// Cerbos's policy key: `resource.<kind>.v<version>[/<scope>]`, `principal.…`, `role.…`.
    pub key: String,
    pub file: String,
    pub scope: String,
    pub scope_permissions: ScopePermissions,
    pub constants: Arc<Map<String, Value>>,
    pub variables: Variables,
    /// Resource policies: the imported derived roles that its rules reference.
    pub derived_roles: Vec<Arc<DerivedRole>>,
    /// Role policies: the roles this custom role inherits from.
    pub parent_roles: Vec<String>,
    pub rules: Vec<Rule>,
    pub principal_schema: Option<Schema>,
    pub resource_schema: Option<Schema>,
}

/// Policies of one (name, version), by scope.
pub type ByScope = BTreeMap<String, Arc<Policy>>;

/// The compiled, immutable set of policies. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct PolicySet {
    pub env: CelEnv,
    /// (resource kind, version) → scope → policy.
    pub resources: HashMap<(String, String), ByScope>,
    /// (principal id, version) → scope → policy.
    pub principals: HashMap<(String, String), ByScope>,
    /// (role, version) → scope → role policy.
    pub roles: HashMap<(String, String), ByScope>,
    /// SHA-256 over every source file's name and bytes, in name order.
    pub hash: String,
    /// Every compiled policy, in key order (for listing and coverage).
    pub all: Vec<Arc<Policy>>,
    /// (role, scope) → the parent roles its role policies there name, of every version (as in
    /// Cerbos, parent roles belong to a scope, not to a policy version).
    pub role_parents: HashMap<(String, String), Vec<String>>,
    /// (version, scope) of every principal policy: whether any principal policy of a version
    /// exists along a scope chain (Cerbos's `ScopedPrincipalExists`).
    pub principal_versions: std::collections::BTreeSet<(String, String)>,
    /// Scopes that exist for the resource pass: of every resource and role policy.
    pub resource_scopes: std::collections::BTreeSet<String>,
    /// Scopes that exist for the principal pass: of every principal policy.
    pub principal_scopes: std::collections::BTreeSet<String>,
}

impl PolicySet {
    /// An empty set: every check answers DENY with NO_MATCH.
    pub fn empty() -> PolicySet {
        PolicySet {
            env: CelEnv::new(),
            resources: HashMap::new(),
            principals: HashMap::new(),
            roles: HashMap::new(),
            role_parents: HashMap::new(),
            principal_versions: Default::default(),
            hash: hex(&Sha256::digest(b"")),
            all: Vec::new(),
            resource_scopes: Default::default(),
            principal_scopes: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Cerbos's key naming: names that look like identifiers get `[^\w.]+` replaced by `_`.
pub fn key_part(name: &str) -> String {
    let legacy = {
        let mut ok = !name.is_empty();
        for seg in name.split(':') {
            let mut chars = seg.chars();
            match chars.next() {
                Some(c) if c.is_alphabetic() => {}
                _ => ok = false,
            }
            if !chars.all(|c| c.is_alphanumeric() || "_@.-/".contains(c)) {
                ok = false;
            }
        }
        ok
    };
    if !legacy {
        return name.to_string();
    }
    let mut out = String::with_capacity(name.len());
    let mut in_run = false;
    for c in name.chars() {
        if c.is_alphanumeric() || c == '_' || c == '.' {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('_');
            in_run = true;
        }
    }
    out
}

pub fn policy_key(kind: PolicyKind, name: &str, version: &str, scope: &str) -> String {
    let prefix = match kind {
        PolicyKind::Resource => "resource",
        PolicyKind::Principal => "principal",
        PolicyKind::Role => "role",
    };
    let mut key = format!("{prefix}.{}.v{version}", key_part(name));
    if !scope.is_empty() {
        key.push('/');
        key.push_str(scope);
    }
    key
}

/// Compiles a set of files. `schemas` maps a `_schemas/`-relative name to its JSON.
pub fn compile(
    files: &[SourceFile],
    schemas: &BTreeMap<String, Value>,
) -> Result<PolicySet, Vec<CompileError>> {
    Compiler::new(schemas).run(files)
}

/// In a `REQUIRE_PARENTAL_CONSENT_FOR_ALLOWS` scope a conditional ALLOW that does not hold is
/// an implicit DENY. Cerbos compiles it into a DENY rule with condition `none(cond)` (its
/// outputs move along), and so do we: one mechanism, the same outputs.
fn rewrite_for_consent(perms: ScopePermissions, rules: &mut [Rule]) {
    if perms != ScopePermissions::RequireParentalConsentForAllows {
        return;
    }
    for rule in rules.iter_mut() {
        if rule.effect == Effect::Allow {
            if let Some(cond) = rule.condition.take() {
                rule.effect = Effect::Deny;
                rule.condition = Some(Cond::None(vec![cond]));
                rule.implicit_deny = true;
            }
        }
    }
}

struct Parsed {
    file: String,
    policy: PolicyFile,
}

struct Compiler<'a> {
    env: CelEnv,
    schemas: &'a BTreeMap<String, Value>,
    errors: Vec<CompileError>,
}

fn err(file: &str, path: impl Into<String>, message: impl Into<String>) -> CompileError {
    CompileError {
        file: file.to_string(),
        path: path.into(),
        line: None,
        column: None,
        message: message.into(),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(['!', '*', '?', '[', ']', '{', '}'])
}

fn valid_version(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

fn valid_scope(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    s.split('.').all(|seg| {
        let mut chars = seg.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    })
}

fn valid_rule_name(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        None => true,
        Some(c) => {
            c.is_ascii_alphabetic() && chars.all(|c| c.is_alphanumeric() || "_@.-".contains(c))
        }
    }
}

/// Exported variables and constants, and derived-role sets, by name.
struct Exports {
    variables: BTreeMap<String, (String, BTreeMap<String, String>)>,
    constants: BTreeMap<String, BTreeMap<String, Value>>,
    derived: BTreeMap<String, Vec<Arc<DerivedRole>>>,
}

impl<'a> Compiler<'a> {
    fn new(schemas: &'a BTreeMap<String, Value>) -> Self {
        Compiler {
            env: CelEnv::new(),
            schemas,
            errors: Vec::new(),
        }
    }

    fn run(mut self, files: &[SourceFile]) -> Result<PolicySet, Vec<CompileError>> {
        let mut sorted: Vec<&SourceFile> = files.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut hasher = Sha256::new();
        let mut parsed = Vec::new();
        for f in &sorted {
            hasher.update((f.name.len() as u64).to_le_bytes());
            hasher.update(f.name.as_bytes());
            hasher.update((f.bytes.len() as u64).to_le_bytes());
            hasher.update(&f.bytes);
            match parse::document::<PolicyFile>(&f.name, &f.bytes) {
                Ok(policy) if policy.disabled => {}
                Ok(policy) => parsed.push(Parsed {
                    file: f.name.clone(),
                    policy,
                }),
                Err(e) => self.errors.push(CompileError {
                    file: f.name.clone(),
                    path: e.path,
                    line: e.line,
                    column: e.column,
                    message: e.message,
                }),
            }
        }
        if parsed.len() > MAX_POLICIES {
            self.errors.push(err(
                "",
                "$",
                format!("{} policies; the limit is {MAX_POLICIES}", parsed.len()),
            ));
            return Err(self.errors);
        }
        for p in &parsed {
            self.check_envelope(p);
        }
        let exports = self.collect_exports(&parsed);
        let mut set = PolicySet::empty();
        set.env = self.env.clone();
        set.hash = hex(&hasher.finalize());
        let mut owners: HashMap<String, String> = HashMap::new();
        for p in &parsed {
            let compiled = if let Some(rp) = &p.policy.resource_policy {
                self.resource_policy(p, rp, &exports)
            } else if let Some(pp) = &p.policy.principal_policy {
                self.principal_policy(p, pp, &exports)
            } else if let Some(rp) = &p.policy.role_policy {
                self.role_policy(p, rp, &exports)
            } else {
                None
            };
            let Some((name, version, policy)) = compiled else {
                continue;
            };
            if let Some(first) = owners.get(&policy.key) {
                self.errors.push(err(
                    &p.file,
                    "$",
                    format!("duplicate policy {}: also defined in {first}", policy.key),
                ));
                continue;
            }
            owners.insert(policy.key.clone(), p.file.clone());
            let policy = Arc::new(policy);
            let index = match policy.kind {
                PolicyKind::Resource => &mut set.resources,
                PolicyKind::Principal => &mut set.principals,
                PolicyKind::Role => &mut set.roles,
            };
            match policy.kind {
                PolicyKind::Principal => set.principal_scopes.insert(policy.scope.clone()),
                PolicyKind::Resource | PolicyKind::Role => {
                    set.resource_scopes.insert(policy.scope.clone())
                }
            };
            if policy.kind == PolicyKind::Principal {
                set.principal_versions
                    .insert((version.clone(), policy.scope.clone()));
            }
            if policy.kind == PolicyKind::Role {
                let parents = set
                    .role_parents
                    .entry((name.clone(), policy.scope.clone()))
                    .or_default();
                for parent in &policy.parent_roles {
                    if !parents.contains(parent) {
                        parents.push(parent.clone());
                    }
                }
            }
            index
                .entry((name, version))
                .or_default()
                .insert(policy.scope.clone(), policy.clone());
            set.all.push(policy);
        }
        self.check_scope_chains(&set);
        if !self.errors.is_empty() {
            self.errors
                .sort_by(|a, b| (&a.file, &a.path).cmp(&(&b.file, &b.path)));
            self.errors.dedup();
            locate_errors(&mut self.errors, files);
            return Err(self.errors);
        }
        set.all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(set)
    }

    fn check_envelope(&mut self, p: &Parsed) {
        let pf = &p.policy;
        if pf.api_version != "api.cerbos.dev/v1" {
            self.errors.push(err(
                &p.file,
                "$.apiVersion",
                format!(
                    "unsupported apiVersion {:?}: want \"api.cerbos.dev/v1\"",
                    pf.api_version
                ),
            ));
        }
        let bodies = [
            pf.resource_policy.is_some(),
            pf.principal_policy.is_some(),
            pf.derived_roles.is_some(),
            pf.export_variables.is_some(),
            pf.export_constants.is_some(),
            pf.role_policy.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if bodies != 1 {
            self.errors.push(err(
                &p.file,
                "$",
                format!(
                    "a policy file holds exactly one of resourcePolicy, principalPolicy, derivedRoles, exportVariables, exportConstants, rolePolicy; found {bodies}"
                ),
            ));
        }
        if pf.variables.is_some()
            && (pf.export_variables.is_some()
                || pf.export_constants.is_some()
                || pf.role_policy.is_some())
        {
            self.errors.push(err(
                &p.file,
                "$.variables",
                "top-level variables are not allowed in this kind of policy",
            ));
        }
    }

    fn collect_exports(&mut self, parsed: &[Parsed]) -> Exports {
        let mut ex = Exports {
            variables: BTreeMap::new(),
            constants: BTreeMap::new(),
            derived: BTreeMap::new(),
        };
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut claim = |errors: &mut Vec<CompileError>, kind: &str, name: &str, file: &str| {
            let key = format!("{kind}.{name}");
            if let Some(first) = seen.get(&key) {
                errors.push(err(
                    file,
                    "$",
                    format!("duplicate policy {key}: also defined in {first}"),
                ));
                false
            } else {
                seen.insert(key, file.to_string());
                true
            }
        };
        for p in parsed {
            if let Some(v) = &p.policy.export_variables {
                if claim(&mut self.errors, "export_variables", &v.name, &p.file) {
                    ex.variables
                        .insert(v.name.clone(), (p.file.clone(), v.definitions.clone()));
                }
            }
            if let Some(c) = &p.policy.export_constants {
                if claim(&mut self.errors, "export_constants", &c.name, &p.file) {
                    ex.constants.insert(c.name.clone(), c.definitions.clone());
                }
            }
        }
        for p in parsed {
            let Some(dr) = &p.policy.derived_roles else {
                continue;
            };
            if !claim(&mut self.errors, "derived_roles", &dr.name, &p.file) {
                continue;
            }
            let constants = self.constants(
                &p.file,
                "$.derivedRoles.constants",
                dr.constants.as_ref(),
                &ex,
            );
            let variables = self.variables(
                &p.file,
                "$.derivedRoles.variables",
                dr.variables.as_ref(),
                p.policy.variables.as_ref(),
                &ex,
            );
            if dr.definitions.is_empty() {
                self.errors.push(err(
                    &p.file,
                    "$.derivedRoles.definitions",
                    "a derived roles set needs at least one definition",
                ));
            }
            let mut defs = Vec::new();
            let mut names = BTreeMap::new();
            for (i, d) in dr.definitions.iter().enumerate() {
                let path = format!("$.derivedRoles.definitions[{i}]");
                if names.insert(d.name.clone(), ()).is_some() {
                    self.errors.push(err(
                        &p.file,
                        &path,
                        format!("derived role {:?} is defined twice in this set", d.name),
                    ));
                }
                if d.parent_roles.is_empty() {
                    self.errors.push(err(
                        &p.file,
                        format!("{path}.parentRoles"),
                        "a derived role needs at least one parent role",
                    ));
                }
                let parent_roles =
                    self.globs(&p.file, &format!("{path}.parentRoles"), &d.parent_roles);
                let condition = d.condition.as_ref().and_then(|c| {
                    self.condition(&p.file, &format!("{path}.condition.match"), &c.match_, 0)
                });
                let reads_action = condition
                    .as_ref()
                    .is_some_and(|c| c.any_expr(&|e| may_read_action(e.source())))
                    || variables.sources().any(may_read_action);
                defs.push(Arc::new(DerivedRole {
                    name: d.name.clone(),
                    set: dr.name.clone(),
                    parent_roles,
                    condition,
                    constants: constants.clone(),
                    variables: variables.clone(),
                    path,
                    file: p.file.clone(),
                    reads_action,
                }));
            }
            ex.derived.insert(dr.name.clone(), defs);
        }
        ex
    }

    fn globs(&mut self, file: &str, path: &str, patterns: &[String]) -> Vec<Glob> {
        let mut out = Vec::with_capacity(patterns.len());
        for (i, p) in patterns.iter().enumerate() {
            if p.is_empty() {
                self.errors
                    .push(err(file, format!("{path}[{i}]"), "empty name"));
                continue;
            }
            match Glob::new(p) {
                Ok(g) => out.push(g),
                Err(e) => self.errors.push(err(file, format!("{path}[{i}]"), e)),
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in patterns.iter().enumerate() {
            if !seen.insert(p) {
                self.errors.push(err(
                    file,
                    format!("{path}[{i}]"),
                    format!("{p:?} is listed twice"),
                ));
            }
        }
        out
    }

    fn expr(&mut self, file: &str, path: &str, src: &str) -> Option<Expr> {
        match self.env.compile(src) {
            Ok(e) => Some(e),
            Err(e) => {
                self.errors
                    .push(err(file, path, format!("invalid CEL expression: {e}")));
                None
            }
        }
    }

    fn condition(
        &mut self,
        file: &str,
        path: &str,
        m: &model::Match,
        depth: usize,
    ) -> Option<Cond> {
        if depth >= MAX_MATCH_DEPTH {
            self.errors.push(err(
                file,
                path,
                format!("condition nests deeper than {MAX_MATCH_DEPTH} levels"),
            ));
            return None;
        }
        let set = [
            m.expr.is_some(),
            m.all.is_some(),
            m.any.is_some(),
            m.none.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set != 1 {
            self.errors.push(err(
                file,
                path,
                "a match needs exactly one of expr, all, any, none",
            ));
            return None;
        }
        if let Some(src) = &m.expr {
            return self
                .expr(file, &format!("{path}.expr"), src)
                .map(Cond::Expr);
        }
        let (name, list) = match (&m.all, &m.any, &m.none) {
            (Some(l), _, _) => ("all", l),
            (_, Some(l), _) => ("any", l),
            (_, _, Some(l)) => ("none", l),
            _ => return None,
        };
        if list.of.is_empty() {
            self.errors.push(err(
                file,
                format!("{path}.{name}.of"),
                format!("`{name}` needs at least one condition"),
            ));
            return None;
        }
        let mut children = Vec::with_capacity(list.of.len());
        for (i, child) in list.of.iter().enumerate() {
            children.push(self.condition(
                file,
                &format!("{path}.{name}.of[{i}]"),
                child,
                depth + 1,
            )?);
        }
        Some(match name {
            "all" => Cond::All(children),
            "any" => Cond::Any(children),
            _ => Cond::None(children),
        })
    }

    fn constants(
        &mut self,
        file: &str,
        path: &str,
        c: Option<&model::Constants>,
        ex: &Exports,
    ) -> Arc<Map<String, Value>> {
        let mut out = Map::new();
        let Some(c) = c else {
            return Arc::new(out);
        };
        for (i, name) in c.import.iter().enumerate() {
            let Some(defs) = ex.constants.get(name) else {
                self.errors.push(err(
                    file,
                    format!("{path}.import[{i}]"),
                    format!(
                        "constants import {name:?} not found (no exportConstants with that name)"
                    ),
                ));
                continue;
            };
            for (k, v) in defs {
                if out.insert(k.clone(), v.clone()).is_some() {
                    self.errors.push(err(
                        file,
                        format!("{path}.import[{i}]"),
                        format!("constant {k:?} is defined more than once"),
                    ));
                }
            }
        }
        for (k, v) in &c.local {
            if out.insert(k.clone(), v.clone()).is_some() {
                self.errors.push(err(
                    file,
                    format!("{path}.local.{k}"),
                    format!("constant {k:?} is defined more than once"),
                ));
            }
        }
        Arc::new(out)
    }

    fn variables(
        &mut self,
        file: &str,
        path: &str,
        v: Option<&model::Variables>,
        top_level: Option<&BTreeMap<String, String>>,
        ex: &Exports,
    ) -> Variables {
        let mut defs: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut add = |errors: &mut Vec<CompileError>, name: &str, src: &str, at: String| {
            if defs
                .insert(name.to_string(), (src.to_string(), at.clone()))
                .is_some()
            {
                errors.push(err(
                    file,
                    at,
                    format!("variable {name:?} is defined more than once"),
                ));
            }
        };
        if let Some(v) = v {
            for (i, name) in v.import.iter().enumerate() {
                let Some((_, vars)) = ex.variables.get(name) else {
                    self.errors.push(err(
                        file,
                        format!("{path}.import[{i}]"),
                        format!("variables import {name:?} not found (no exportVariables with that name)"),
                    ));
                    continue;
                };
                for (k, src) in vars {
                    add(&mut self.errors, k, src, format!("{path}.import[{i}]"));
                }
            }
            for (k, src) in &v.local {
                add(&mut self.errors, k, src, format!("{path}.local.{k}"));
            }
        }
        if let Some(top) = top_level {
            for (k, src) in top {
                add(&mut self.errors, k, src, format!("$.variables.{k}"));
            }
        }
        let mut compiled = Vec::with_capacity(defs.len());
        let mut paths = BTreeMap::new();
        for (name, (src, at)) in defs {
            if let Some(e) = self.expr(file, &at, &src) {
                compiled.push((name.clone(), e));
            }
            paths.insert(name, at);
        }
        match Variables::compile(compiled) {
            Ok(v) => v,
            Err(errors) => {
                for (name, message) in errors {
                    let at = paths
                        .get(&name)
                        .cloned()
                        .unwrap_or_else(|| path.to_string());
                    self.errors.push(err(file, at, message));
                }
                Variables::default()
            }
        }
    }

    fn outputs(
        &mut self,
        file: &str,
        path: &str,
        o: Option<&model::Output>,
    ) -> (Option<Expr>, Option<Expr>) {
        let Some(o) = o else { return (None, None) };
        let mut activated = o
            .expr
            .as_ref()
            .and_then(|src| self.expr(file, &format!("{path}.output.expr"), src));
        let mut not_met = None;
        if let Some(w) = &o.when {
            if let Some(src) = &w.rule_activated {
                activated = self.expr(file, &format!("{path}.output.when.ruleActivated"), src);
            }
            if let Some(src) = &w.condition_not_met {
                not_met = self.expr(file, &format!("{path}.output.when.conditionNotMet"), src);
            }
        }
        (activated, not_met)
    }

    fn check_common(
        &mut self,
        file: &str,
        root: &str,
        name_field: &str,
        name: &str,
        version: &str,
        scope: &str,
    ) {
        if !valid_name(name) {
            self.errors.push(err(
                file,
                format!("{root}.{name_field}"),
                format!("{name:?} is not a valid name (empty, or contains one of !*?[]{{}})"),
            ));
        }
        if !valid_version(version) {
            self.errors.push(err(
                file,
                format!("{root}.version"),
                format!("{version:?} is not a valid version (letters, digits and _ only)"),
            ));
        }
        if !valid_scope(scope) {
            self.errors.push(err(
                file,
                format!("{root}.scope"),
                format!("{scope:?} is not a valid scope (dot-separated words)"),
            ));
        }
    }

    fn schema(&mut self, file: &str, path: &str, s: Option<&model::SchemaRef>) -> Option<Schema> {
        let s = s?;
        let name = s
            .ref_
            .strip_prefix("cerbos:///")
            .unwrap_or(&s.ref_)
            .to_string();
        let Some(doc) = self.schemas.get(&name) else {
            self.errors.push(err(
                file,
                format!("{path}.ref"),
                format!("schema {:?} not found under _schemas/", s.ref_),
            ));
            return None;
        };
        let validator = match jsonschema::validator_for(doc) {
            Ok(v) => v,
            Err(e) => {
                self.errors.push(err(
                    file,
                    format!("{path}.ref"),
                    format!("schema {:?} is invalid: {e}", s.ref_),
                ));
                return None;
            }
        };
        let ignore = s
            .ignore_when
            .as_ref()
            .map(|i| i.actions.clone())
            .unwrap_or_default();
        let ignore_actions = self.globs(file, &format!("{path}.ignoreWhen.actions"), &ignore);
        Some(Schema {
            reference: s.ref_.clone(),
            validator,
            ignore_actions,
        })
    }

    fn resource_policy(
        &mut self,
        p: &Parsed,
        rp: &model::ResourcePolicy,
        ex: &Exports,
    ) -> Option<(String, String, Policy)> {
        let file = p.file.as_str();
        let root = "$.resourcePolicy";
        self.check_common(file, root, "resource", &rp.resource, &rp.version, &rp.scope);
        let constants = self.constants(
            file,
            &format!("{root}.constants"),
            rp.constants.as_ref(),
            ex,
        );
        let variables = self.variables(
            file,
            &format!("{root}.variables"),
            rp.variables.as_ref(),
            p.policy.variables.as_ref(),
            ex,
        );
        // Imported derived roles, by name; a name defined by two imported sets is ambiguous
        // only if a rule uses it.
        let mut available: BTreeMap<String, Vec<Arc<DerivedRole>>> = BTreeMap::new();
        for (i, set) in rp.import_derived_roles.iter().enumerate() {
            match ex.derived.get(set) {
                Some(defs) => {
                    for d in defs {
                        available.entry(d.name.clone()).or_default().push(d.clone());
                    }
                }
                None => self.errors.push(err(
                    file,
                    format!("{root}.importDerivedRoles[{i}]"),
                    format!("derived roles {set:?} not found (no derivedRoles with that name)"),
                )),
            }
        }
        let mut used: Vec<Arc<DerivedRole>> = Vec::new();
        let mut rules = Vec::with_capacity(rp.rules.len());
        for (i, r) in rp.rules.iter().enumerate() {
            let path = format!("{root}.rules[{i}]");
            if r.actions.is_empty() {
                self.errors.push(err(
                    file,
                    format!("{path}.actions"),
                    "a rule needs at least one action",
                ));
            }
            if r.roles.is_empty() && r.derived_roles.is_empty() {
                let name = if r.name.is_empty() {
                    format!("rule-{:03}", i + 1)
                } else {
                    r.name.clone()
                };
                self.errors.push(err(
                    file,
                    &path,
                    format!(
                        "rule '{name}' does not specify any roles or derived roles to be matched"
                    ),
                ));
            }
            if !valid_rule_name(&r.name) {
                self.errors.push(err(
                    file,
                    format!("{path}.name"),
                    format!("{:?} is not a valid rule name", r.name),
                ));
            }
            for (j, dr) in r.derived_roles.iter().enumerate() {
                match available.get(dr).map(Vec::as_slice) {
                    Some([one]) => {
                        if !used.iter().any(|u| Arc::ptr_eq(u, one)) {
                            used.push(one.clone());
                        }
                    }
                    Some(many) if many.len() > 1 => {
                        let sets: Vec<&str> = many.iter().map(|d| d.set.as_str()).collect();
                        self.errors.push(err(
                            file,
                            format!("{path}.derivedRoles[{j}]"),
                            format!(
                                "derived role {dr:?} is ambiguous: defined in {}",
                                sets.join(", ")
                            ),
                        ));
                    }
                    _ => self.errors.push(err(
                        file,
                        format!("{path}.derivedRoles[{j}]"),
                        format!(
                            "derived role {dr:?} is not defined in any imported derived roles set"
                        ),
                    )),
                }
            }
            let actions = self.globs(file, &format!("{path}.actions"), &r.actions);
            let roles = self.globs(file, &format!("{path}.roles"), &r.roles);
            let condition = r.condition.as_ref().and_then(|c| {
                self.condition(file, &format!("{path}.condition.match"), &c.match_, 0)
            });
            let (output_activated, output_not_met) = self.outputs(file, &path, r.output.as_ref());
            rules.push(Rule {
                name: if r.name.is_empty() {
                    format!("rule-{:03}", i + 1)
                } else {
                    r.name.clone()
                },
                path,
                resource: None,
                actions,
                roles,
                derived_roles: r.derived_roles.clone(),
                effect: r.effect,
                condition,
                output_activated,
                output_not_met,
                implicit_deny: false,
            });
        }
        let (principal_schema, resource_schema) = match &rp.schemas {
            Some(s) => (
                self.schema(
                    file,
                    &format!("{root}.schemas.principalSchema"),
                    s.principal_schema.as_ref(),
                ),
                self.schema(
                    file,
                    &format!("{root}.schemas.resourceSchema"),
                    s.resource_schema.as_ref(),
                ),
            ),
            None => (None, None),
        };
        used.sort_by(|a, b| a.name.cmp(&b.name));
        rewrite_for_consent(rp.scope_permissions, &mut rules);
        let key = policy_key(PolicyKind::Resource, &rp.resource, &rp.version, &rp.scope);
        Some((
            rp.resource.clone(),
            rp.version.clone(),
            Policy {
                kind: PolicyKind::Resource,
                key,
                file: file.to_string(),
                scope: rp.scope.clone(),
                scope_permissions: rp.scope_permissions,
                constants,
                variables,
                derived_roles: used,
                parent_roles: Vec::new(),
                rules,
                principal_schema,
                resource_schema,
            },
        ))
    }

    fn principal_policy(
        &mut self,
        p: &Parsed,
        pp: &model::PrincipalPolicy,
        ex: &Exports,
    ) -> Option<(String, String, Policy)> {
        let file = p.file.as_str();
        let root = "$.principalPolicy";
        self.check_common(
            file,
            root,
            "principal",
            &pp.principal,
            &pp.version,
            &pp.scope,
        );
        let constants = self.constants(
            file,
            &format!("{root}.constants"),
            pp.constants.as_ref(),
            ex,
        );
        let variables = self.variables(
            file,
            &format!("{root}.variables"),
            pp.variables.as_ref(),
            p.policy.variables.as_ref(),
            ex,
        );
        let mut rules = Vec::new();
        for (i, r) in pp.rules.iter().enumerate() {
            let rpath = format!("{root}.rules[{i}]");
            // As Cerbos 0.55: one rule per resource in a principal policy.
            if let Some(first) = pp.rules[..i].iter().position(|o| o.resource == r.resource) {
                self.errors.push(err(
                    file,
                    format!("{rpath}.resource"),
                    format!(
                        "duplicate resource {:?} at rule #{}: previous definition in rule #{}",
                        r.resource,
                        i + 1,
                        first + 1
                    ),
                ));
            }
            let resource = match Glob::new(&r.resource) {
                Ok(g) if !r.resource.is_empty() => Some(g),
                Ok(_) => {
                    self.errors
                        .push(err(file, format!("{rpath}.resource"), "empty resource"));
                    None
                }
                Err(e) => {
                    self.errors.push(err(file, format!("{rpath}.resource"), e));
                    None
                }
            };
            if r.actions.is_empty() {
                self.errors.push(err(
                    file,
                    format!("{rpath}.actions"),
                    "a rule needs at least one action",
                ));
            }
            for (j, a) in r.actions.iter().enumerate() {
                let path = format!("{rpath}.actions[{j}]");
                if !valid_rule_name(&a.name) {
                    self.errors.push(err(
                        file,
                        format!("{path}.name"),
                        format!("{:?} is not a valid rule name", a.name),
                    ));
                }
                let actions = self.globs(
                    file,
                    &format!("{path}.action"),
                    std::slice::from_ref(&a.action),
                );
                let condition = a.condition.as_ref().and_then(|c| {
                    self.condition(file, &format!("{path}.condition.match"), &c.match_, 0)
                });
                let (output_activated, output_not_met) =
                    self.outputs(file, &path, a.output.as_ref());
                rules.push(Rule {
                    name: if a.name.is_empty() {
                        format!("{}_rule-{:03}", key_part(&r.resource), j + 1)
                    } else {
                        a.name.clone()
                    },
                    path,
                    resource: resource.clone(),
                    actions,
                    roles: Vec::new(),
                    derived_roles: Vec::new(),
                    effect: a.effect,
                    condition,
                    output_activated,
                    output_not_met,
                    implicit_deny: false,
                });
            }
        }
        rewrite_for_consent(pp.scope_permissions, &mut rules);
        let key = policy_key(PolicyKind::Principal, &pp.principal, &pp.version, &pp.scope);
        Some((
            pp.principal.clone(),
            pp.version.clone(),
            Policy {
                kind: PolicyKind::Principal,
                key,
                file: file.to_string(),
                scope: pp.scope.clone(),
                scope_permissions: pp.scope_permissions,
                constants,
                variables,
                derived_roles: Vec::new(),
                parent_roles: Vec::new(),
                rules,
                principal_schema: None,
                resource_schema: None,
            },
        ))
    }

    fn role_policy(
        &mut self,
        p: &Parsed,
        rp: &model::RolePolicy,
        ex: &Exports,
    ) -> Option<(String, String, Policy)> {
        let file = p.file.as_str();
        let root = "$.rolePolicy";
        let version = if rp.version.is_empty() {
            "default".to_string()
        } else {
            rp.version.clone()
        };
        self.check_common(file, root, "role", &rp.role, &version, &rp.scope);
        if rp.scope_permissions == ScopePermissions::OverrideParent {
            self.errors.push(err(
                file,
                format!("{root}.scopePermissions"),
                "role policies only accept SCOPE_PERMISSIONS_REQUIRE_PARENTAL_CONSENT_FOR_ALLOWS",
            ));
        }
        let constants = self.constants(
            file,
            &format!("{root}.constants"),
            rp.constants.as_ref(),
            ex,
        );
        let variables = self.variables(
            file,
            &format!("{root}.variables"),
            rp.variables.as_ref(),
            None,
            ex,
        );
        let mut rules = Vec::new();
        for (i, r) in rp.rules.iter().enumerate() {
            let path = format!("{root}.rules[{i}]");
            let resource = match Glob::new(&r.resource) {
                Ok(g) if !r.resource.is_empty() => Some(g),
                Ok(_) => {
                    self.errors
                        .push(err(file, format!("{path}.resource"), "empty resource"));
                    None
                }
                Err(e) => {
                    self.errors.push(err(file, format!("{path}.resource"), e));
                    None
                }
            };
            if r.allow_actions.is_empty() {
                self.errors.push(err(
                    file,
                    format!("{path}.allowActions"),
                    "a rule needs at least one action",
                ));
            }
            let actions = self.globs(file, &format!("{path}.allowActions"), &r.allow_actions);
            let condition = r.condition.as_ref().and_then(|c| {
                self.condition(file, &format!("{path}.condition.match"), &c.match_, 0)
            });
            let (output_activated, output_not_met) = self.outputs(file, &path, r.output.as_ref());
            rules.push(Rule {
                name: if r.name.is_empty() {
                    format!("rule-{:03}", i + 1)
                } else {
                    r.name.clone()
                },
                path,
                resource,
                actions,
                roles: Vec::new(),
                derived_roles: Vec::new(),
                effect: Effect::Allow,
                condition,
                output_activated,
                output_not_met,
                implicit_deny: false,
            });
        }
        let key = policy_key(PolicyKind::Role, &rp.role, &version, &rp.scope);
        Some((
            rp.role.clone(),
            version,
            Policy {
                kind: PolicyKind::Role,
                key,
                file: file.to_string(),
                scope: rp.scope.clone(),
                scope_permissions: ScopePermissions::RequireParentalConsentForAllows,
                constants,
                variables,
                derived_roles: Vec::new(),
                parent_roles: rp.parent_roles.clone(),
                rules,
                principal_schema: None,
                resource_schema: None,
            },
        ))
    }

    /// A scoped resource or principal policy needs every ancestor scope present.
    fn check_scope_chains(&mut self, set: &PolicySet) {
        for index in [&set.resources, &set.principals] {
            let mut keys: Vec<_> = index.keys().collect();
            keys.sort();
            for k in keys {
                let Some(by_scope) = index.get(k) else {
                    continue;
                };
                for (scope, policy) in by_scope {
                    let mut s = scope.as_str();
                    while !s.is_empty() {
                        s = s.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
                        if !by_scope.contains_key(s) {
                            self.errors.push(err(
                                &policy.file,
                                "$",
                                format!(
                                    "{} has no parent policy for scope {s:?}: scoped policies need one at every ancestor scope",
                                    policy.key
                                ),
                            ));
                            break;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_follow_cerbos() {
        assert_eq!(key_part("album:object"), "album_object");
        assert_eq!(key_part("mcp_server"), "mcp_server");
        assert_eq!(
            policy_key(PolicyKind::Resource, "leave_request", "20210210", "acme.hr"),
            "resource.leave_request.v20210210/acme.hr"
        );
        assert_eq!(
            policy_key(PolicyKind::Principal, "alice@example.com", "default", ""),
            "principal.alice_example.com.vdefault"
        );
        assert_eq!(key_part("123abc"), "123abc");
    }

    #[test]
    fn what_may_read_the_action() {
        for yes in [
            "request.action == 'x'",
            "request['action'] == 'x'",
            "request.action.startsWith('read')",
            "has(request.auxData) && request == {}",
            "request .principal.id == 'a'",
            "'action' in R.attr.tags",
        ] {
            assert!(may_read_action(yes), "{yes}");
        }
        for no in [
            "R.attr.owner == P.id",
            "request.principal.id == request.resource.attr.owner",
            "has(request.auxData.jwt) && request.aux_data.jwt.sub == P.id",
            "V.same_org && C.limit > 1",
        ] {
            assert!(!may_read_action(no), "{no}");
        }
    }
}
