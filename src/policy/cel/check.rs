//! Load-time work on a parsed expression (the `cel` crate has no type checker):
//! - reject unknown root identifiers, unknown fields of `P`/`R`/`request`/`runtime`, unknown
//!   functions, bad literal arguments (durations, timestamps, regexes, IPs, CIDRs, SPIFFE IDs),
//!   bare uses of `V`, too deep trees and too deeply nested comprehensions;
//! - collect the variables read (`V.x`, `variables.x`);
//! - instrument every loop with an `@tick` call that charges the evaluation's cost budget, and
//!   route `==`, `!=` and `in` between non-literals to structural equality (lazy views).

use std::sync::Arc;

use cel::common::ast::{CallExpr, ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::common::ast::{SelectExpr, operators};

use super::{MAX_DEPTH, MAX_LOOP_NESTING};

/// A checked expression, ready to evaluate.
pub(super) struct Compiled {
    pub ast: IdedExpr,
    pub variables: Vec<String>,
    pub depth: usize,
    /// Whether the expression reads the clock (`now()`, `timeSince`).
    pub uses_now: bool,
}

/// Identifiers an expression may start from (besides comprehension variables and type names).
const ROOTS: [&str; 10] = [
    "request",
    "P",
    "R",
    "V",
    "C",
    "G",
    "variables",
    "constants",
    "globals",
    "runtime",
];

const PRINCIPAL_FIELDS: [&str; 6] = [
    "id",
    "roles",
    "attr",
    "policyVersion",
    "policy_version",
    "scope",
];
const RESOURCE_FIELDS: [&str; 6] = [
    "kind",
    "id",
    "attr",
    "policyVersion",
    "policy_version",
    "scope",
];
const REQUEST_FIELDS: [&str; 5] = ["principal", "resource", "auxData", "aux_data", "action"];
const RUNTIME_FIELDS: [&str; 2] = ["effectiveDerivedRoles", "effective_derived_roles"];

/// Functions of Cerbos's CEL that are deliberately not provided, and why.
const UNSUPPORTED: [(&str, &str); 1] = [(
    "absPath",
    "its result depends on the server's working directory",
)];

/// Functions whose all-literal calls are evaluated at load, so a bad literal is a load error.
const LITERAL_CHECKED: [&str; 9] = [
    "duration",
    "timestamp",
    "ip",
    "cidr",
    "ip.isCanonical",
    "spiffeID",
    "spiffeTrustDomain",
    "spiffeMatchExact",
    "spiffeMatchTrustDomain",
];

/// Parses and checks `src`; the error is one line.
pub(super) fn compile(env: &Arc<cel::Env>, src: &str) -> Result<Compiled, String> {
    let mut ast = env.parser().parse(src).map_err(|e| parse_error(&e))?;
    let d = depth(&ast);
    if d > MAX_DEPTH {
        return Err(format!(
            "expression nests too deeply ({d} levels, limit {MAX_DEPTH})"
        ));
    }
    let mut checker = Checker {
        env,
        probe: cel::Context::with_env(env.clone()),
        bound: Vec::new(),
        loops: 0,
        variables: Vec::new(),
    };
    checker.expr(&ast)?;
    let variables = checker.variables;
    let uses_now = mentions(&ast, super::macros::NOW);
    instrument(&mut ast);
    let depth = depth(&ast);
    Ok(Compiled {
        ast,
        variables,
        depth,
        uses_now,
    })
}

fn parse_error(e: &cel::ParseErrors) -> String {
    let Some(first) = e.errors.first() else {
        return "syntax error".to_string();
    };
    let msg = first.msg.replace('\n', " ");
    if msg.contains("Recursion limit") {
        return "expression nests too deeply (parser limit)".to_string();
    }
    format!(
        "syntax error at line {}, column {}: {msg}",
        first.pos.0,
        first.pos.1.max(0) + 1
    )
}

struct Checker<'a> {
    env: &'a Arc<cel::Env>,
    /// A scratch context, used to ask whether a function name is declared.
    probe: cel::Context<'static, 'static>,
    /// Comprehension and bind variables in scope, innermost last.
    bound: Vec<String>,
    /// Loops (comprehensions that iterate) around the current node.
    loops: usize,
    variables: Vec<String>,
}

impl Checker<'_> {
    fn expr(&mut self, e: &IdedExpr) -> Result<(), String> {
        match &e.expr {
            Expr::Unspecified => Err("empty expression".to_string()),
            Expr::Literal(_) => Ok(()),
            Expr::Ident(name) => self.ident(name),
            Expr::Select(sel) => self.select(sel),
            Expr::Call(call) => self.call(e, call),
            Expr::List(list) => list.elements.iter().try_for_each(|el| self.expr(el)),
            Expr::Map(map) => map.entries.iter().try_for_each(|entry| match &entry.expr {
                EntryExpr::MapEntry(me) => {
                    self.expr(&me.key)?;
                    self.expr(&me.value)
                }
                EntryExpr::StructField(f) => {
                    Err(format!("unexpected field '{}' in a map literal", f.field))
                }
            }),
            Expr::Struct(s) => Err(format!(
                "message construction is not supported ('{}')",
                s.type_name
            )),
            Expr::Comprehension(c) => self.comprehension(c),
        }
    }

    fn comprehension(&mut self, c: &ComprehensionExpr) -> Result<(), String> {
        self.expr(&c.iter_range)?;
        self.expr(&c.accu_init)?;
        let iterates = !is_empty_list(&c.iter_range);
        if iterates {
            self.loops += 1;
            if self.loops > MAX_LOOP_NESTING {
                return Err(format!(
                    "comprehensions nest too deeply ({} levels, limit {MAX_LOOP_NESTING})",
                    self.loops
                ));
            }
        }
        let before = self.bound.len();
        self.bound.push(c.iter_var.clone());
        if let Some(v2) = &c.iter_var2 {
            self.bound.push(v2.clone());
        }
        self.bound.push(c.accu_var.clone());
        let result = self
            .expr(&c.loop_cond)
            .and_then(|()| self.expr(&c.loop_step))
            .and_then(|()| self.expr(&c.result));
        self.bound.truncate(before);
        if iterates {
            self.loops -= 1;
        }
        result
    }

    fn is_bound(&self, name: &str) -> bool {
        self.bound.iter().any(|b| b == name)
    }

    fn is_type(&self, name: &str) -> bool {
        self.env.types().find_type(name).is_some()
    }

    /// An unbound `V` or `variables`.
    fn is_vars(&self, e: &IdedExpr) -> bool {
        matches!(&e.expr, Expr::Ident(n) if (n == "V" || n == "variables") && !self.is_bound(n))
    }

    fn use_variable(&mut self, name: &str) {
        if !self.variables.iter().any(|v| v == name) {
            self.variables.push(name.to_string());
        }
    }

    fn ident(&self, name: &str) -> Result<(), String> {
        if self.is_bound(name) || name.starts_with('@') {
            return Ok(());
        }
        if name == "V" || name == "variables" {
            return Err(format!(
                "'{name}' must be followed by a variable name, as in {name}.name"
            ));
        }
        if ROOTS.contains(&name) || self.is_type(name) {
            return Ok(());
        }
        Err(format!("undeclared reference to '{name}'"))
    }

    fn select(&mut self, sel: &SelectExpr) -> Result<(), String> {
        if self.is_vars(&sel.operand) {
            self.use_variable(&sel.field);
            return Ok(());
        }
        let Some(segments) = name_segments(sel) else {
            return self.expr(&sel.operand);
        };
        let root = segments[0];
        if self.is_bound(root) || root.starts_with('@') {
            return Ok(());
        }
        // `V.x.y` reads the variable `x`.
        if (root == "V" || root == "variables")
            && let Some(var) = segments.get(1)
        {
            self.use_variable(var);
            return Ok(());
        }
        if ROOTS.contains(&root) {
            return check_fields(&segments);
        }
        if !sel.test && self.is_type(&segments.join(".")) {
            return Ok(());
        }
        Err(format!("undeclared reference to '{root}'"))
    }

    fn call(&mut self, e: &IdedExpr, call: &CallExpr) -> Result<(), String> {
        let name = call.func_name.as_str();
        // `V["x"]` and `V.?x` read the variable `x`.
        if (name == operators::INDEX
            || name == operators::OPT_SELECT
            || name == operators::OPT_INDEX)
            && call.args.len() == 2
            && self.is_vars(&call.args[0])
        {
            return match &call.args[1].expr {
                Expr::Literal(LiteralValue::String(s)) => {
                    self.use_variable(s.inner());
                    Ok(())
                }
                _ => Err(format!(
                    "variables must be read by name, as in {}.name",
                    ident_name(&call.args[0])
                )),
            };
        }
        // A namespaced function: `math.abs(x)`, `sets.contains(a, b)`, `ip.isCanonical(s)`.
        if let Some(target) = &call.target
            && let Some(namespace) = qualified_name(target)
        {
            let root = namespace.split('.').next().unwrap_or_default();
            let full = format!("{namespace}.{name}");
            if !self.is_bound(root) && !ROOTS.contains(&root) && self.declared(&full) {
                self.literals(e, &full, call)?;
                return call.args.iter().try_for_each(|a| self.expr(a));
            }
        }
        let operator =
            name.starts_with('_') || name.starts_with('@') || name == "!_" || name == "-_";
        if !operator && !self.declared(name) {
            if let Some((_, why)) = UNSUPPORTED.iter().find(|(n, _)| *n == name) {
                return Err(format!("unsupported function '{name}': {why}"));
            }
            return Err(format!("undeclared function '{name}'"));
        }
        self.literals(e, name, call)?;
        if let Some(target) = &call.target {
            self.expr(target)?;
        }
        call.args.iter().try_for_each(|a| self.expr(a))
    }

    /// Whether `name` is a declared function (global or member).
    fn declared(&mut self, name: &str) -> bool {
        self.probe.add_function(name, || false).is_err()
    }

    /// Validates literal arguments: Cerbos's duration, timestamp and regex validators, and the
    /// same for the IP, CIDR and SPIFFE parsers.
    fn literals(&self, e: &IdedExpr, name: &str, call: &CallExpr) -> Result<(), String> {
        let pattern = match name {
            "@matches" | "regex.replace" | "regex.extract" | "regex.extractAll" => call.args.get(1),
            _ => None,
        };
        if let Some(Expr::Literal(LiteralValue::String(p))) = pattern.map(|p| &p.expr) {
            super::regex::compile(p.inner())
                .map_err(|err| format!("invalid regular expression {:?}: {err}", p.inner()))?;
        }
        if name == "inIPAddrRange"
            && let Some(Expr::Literal(LiteralValue::String(c))) = call.args.first().map(|a| &a.expr)
        {
            super::network::parse_net_cidr(c.inner())
                .map_err(|err| format!("invalid CIDR {:?}: {err}", c.inner()))?;
        }
        let all_literal = call.target.as_ref().is_none_or(|t| is_namespace(t))
            && !call.args.is_empty()
            && call.args.iter().all(|a| matches!(a.expr, Expr::Literal(_)));
        if all_literal && LITERAL_CHECKED.contains(&name) {
            let ctx = cel::Context::with_env(self.env.clone());
            if let Err(err) = cel::Value::resolve_val(e, &ctx) {
                let arg = match &call.args[0].expr {
                    Expr::Literal(LiteralValue::String(s)) => format!(" {:?}", s.inner()),
                    _ => String::new(),
                };
                let short = name.rsplit('.').next().unwrap_or(name);
                return Err(format!(
                    "invalid {short} literal{arg}: {}",
                    super::scope::error_message(&err)
                ));
            }
        }
        Ok(())
    }
}

/// The fields of `a.b.c` as `["a", "b", "c"]`, when the selection is on a plain name.
fn name_segments(sel: &SelectExpr) -> Option<Vec<&str>> {
    let mut segments = vec![sel.field.as_str()];
    let mut e = &sel.operand.expr;
    loop {
        match e {
            Expr::Ident(name) => {
                segments.push(name);
                segments.reverse();
                return Some(segments);
            }
            Expr::Select(inner) if !inner.test => {
                segments.push(&inner.field);
                e = &inner.operand.expr;
            }
            _ => return None,
        }
    }
}

/// `a.b.c` for an identifier or a selection chain on one.
fn qualified_name(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(sel) if !sel.test => name_segments(sel).map(|s| s.join(".")),
        _ => None,
    }
}

fn is_namespace(e: &IdedExpr) -> bool {
    qualified_name(e).is_some()
}

fn ident_name(e: &IdedExpr) -> &str {
    match &e.expr {
        Expr::Ident(n) => n,
        _ => "V",
    }
}

/// Fields of the request objects, as Cerbos's type checker knows them.
fn check_fields(segments: &[&str]) -> Result<(), String> {
    let (what, fields, rest): (&str, &[&str], &[&str]) = match segments {
        ["P", rest @ ..] | ["request", "principal", rest @ ..] => {
            ("principal", &PRINCIPAL_FIELDS, rest)
        }
        ["R", rest @ ..] | ["request", "resource", rest @ ..] => {
            ("resource", &RESOURCE_FIELDS, rest)
        }
        ["request", rest @ ..] => ("request", &REQUEST_FIELDS, rest),
        ["runtime", rest @ ..] => ("runtime", &RUNTIME_FIELDS, rest),
        _ => return Ok(()),
    };
    let Some(field) = rest.first() else {
        return Ok(());
    };
    if !fields.contains(field) {
        return Err(format!(
            "undefined field '{field}' of {what} (fields: {})",
            fields.join(", ")
        ));
    }
    // Only maps have fields below them; auxData's are free-form.
    let open = matches!(*field, "attr" | "auxData" | "aux_data");
    if rest.len() > 1 && !open {
        return Err(format!(
            "field '{field}' of {what} has no field '{}'",
            rest[1]
        ));
    }
    Ok(())
}

fn is_empty_list(e: &IdedExpr) -> bool {
    matches!(&e.expr, Expr::List(l) if l.elements.is_empty())
}

/// The number of nodes on the longest path from the root (iterative: safe on any tree).
pub(super) fn depth(root: &IdedExpr) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((e, d)) = stack.pop() {
        deepest = deepest.max(d);
        for_each_child(e, |c| stack.push((c, d + 1)));
    }
    deepest
}

/// Does the tree mention the identifier `name` anywhere?
fn mentions(e: &IdedExpr, name: &str) -> bool {
    if matches!(&e.expr, Expr::Ident(n) if n == name) {
        return true;
    }
    let mut found = false;
    for_each_child(e, |c| found = found || mentions(c, name));
    found
}

fn for_each_child<'e>(e: &'e IdedExpr, mut f: impl FnMut(&'e IdedExpr)) {
    match &e.expr {
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                f(t);
            }
            c.args.iter().for_each(f);
        }
        Expr::Comprehension(c) => {
            for child in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                f(child);
            }
        }
        Expr::List(l) => l.elements.iter().for_each(f),
        Expr::Map(m) => {
            for entry in &m.entries {
                if let EntryExpr::MapEntry(me) = &entry.expr {
                    f(&me.key);
                    f(&me.value);
                }
            }
        }
        Expr::Select(s) => f(&s.operand),
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(sf) = &entry.expr {
                    f(&sf.value);
                }
            }
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// Adds an `@tick` to every loop, so each iteration charges the cost budget. Keeps the shape
/// the interpreter recognises for `map`/`filter` (an append to the accumulator), which it runs
/// in linear time: there the tick goes on the guard, or on the appended element.
fn instrument(e: &mut IdedExpr) {
    match &mut e.expr {
        Expr::Call(c) => {
            if let Some(t) = &mut c.target {
                instrument(t);
            }
            c.args.iter_mut().for_each(instrument);
            structural_equality(c);
        }
        Expr::Comprehension(c) => {
            for child in [
                &mut c.iter_range,
                &mut c.accu_init,
                &mut c.loop_cond,
                &mut c.loop_step,
                &mut c.result,
            ] {
                instrument(child);
            }
            if !is_empty_list(&c.iter_range) {
                add_tick(c);
            }
        }
        Expr::List(l) => l.elements.iter_mut().for_each(instrument),
        Expr::Map(m) => {
            for entry in &mut m.entries {
                if let EntryExpr::MapEntry(me) = &mut entry.expr {
                    instrument(&mut me.key);
                    instrument(&mut me.value);
                }
            }
        }
        Expr::Select(s) => {
            instrument(&mut s.operand);
            if s.test {
                presence_test(e);
            }
        }
        Expr::Struct(_) | Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// `has(x.f)` becomes `@has(x, "f")`, which tests presence as cel-go does in Cerbos: on a
/// scalar (string, number, bool, null) it is `false`, not an error; on a list it is an error.
fn presence_test(e: &mut IdedExpr) {
    let id = e.id;
    let Expr::Select(sel) = std::mem::take(&mut e.expr) else {
        return;
    };
    let field = IdedExpr {
        id,
        expr: Expr::Literal(LiteralValue::String(sel.field.clone().into())),
    };
    e.expr = Expr::Call(CallExpr {
        func_name: "@has".to_string(),
        target: None,
        args: vec![*sel.operand, field],
    });
}

/// `a == b`, `a != b` and `a in b` compare lists and maps structurally through our own
/// overloads, since the built-in ones do not see lazy views as lists or maps. A scalar
/// literal operand (`P.id == "x"`, `"x" in P.roles`) cannot meet a view: those stay native.
fn structural_equality(c: &mut CallExpr) {
    let scalar = |e: &IdedExpr| matches!(e.expr, Expr::Literal(_));
    let replacement = match (c.func_name.as_str(), c.args.as_slice()) {
        (operators::EQUALS, [a, b]) if !scalar(a) && !scalar(b) => "@eq",
        (operators::NOT_EQUALS, [a, b]) if !scalar(a) && !scalar(b) => "@ne",
        (operators::IN, [a, _]) if !scalar(a) => "@in_any",
        _ => return,
    };
    c.func_name = replacement.to_string();
}

fn add_tick(c: &mut ComprehensionExpr) {
    let accu = c.accu_var.clone();
    let is_accu = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(n) if *n == accu);
    let appends = |e: &IdedExpr| match &e.expr {
        Expr::Call(call) if call.func_name == operators::ADD && call.target.is_none() => {
            matches!(call.args.as_slice(), [lhs, rhs] if is_accu(lhs) && matches!(rhs.expr, Expr::List(_)))
        }
        _ => false,
    };
    let append_shape = is_accu(&c.result) && matches!(c.loop_cond.expr, Expr::Literal(_));
    if append_shape && let Expr::Call(call) = &mut c.loop_step.expr {
        let plain = call.target.is_none();
        if plain
            && call.func_name == operators::CONDITIONAL
            && let [guard, step, otherwise] = call.args.as_mut_slice()
            && is_accu(otherwise)
            && appends(step)
        {
            wrap_tick(guard);
            return;
        }
        if plain
            && call.func_name == operators::ADD
            && let [lhs, rhs] = call.args.as_mut_slice()
            && is_accu(lhs)
            && let Expr::List(items) = &mut rhs.expr
            && let Some(first) = items.elements.first_mut()
        {
            wrap_tick(first);
            return;
        }
    }
    wrap_tick(&mut c.loop_cond);
}

fn wrap_tick(e: &mut IdedExpr) {
    let inner = std::mem::take(e);
    *e = IdedExpr {
        id: inner.id,
        expr: Expr::Call(CallExpr {
            func_name: "@tick".to_string(),
            target: None,
            args: vec![inner],
        }),
    };
}
