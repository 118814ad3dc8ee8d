//! CEL for policy conditions: the Cerbos CEL environment on top of the `cel` crate.
//!
//! Owns: building the environment once (standard library, extensions, Cerbos's functions),
//! compiling an expression once at load with load-time checks, and evaluating it against one
//! request. Pure: no I/O.
//!
//! INTERFACE used by `compile`/`eval` (keep these signatures stable):
//! - [`CelEnv::new`], [`CelEnv::compile`] → [`Expr`]
//! - [`Variables::compile`] for a policy's merged variable definitions
//! - [`Request`] (once per check) and [`EvalCtx`] (once per policy × action × scope)
//! - [`Expr::eval_bool`], [`Expr::eval_json`]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::input::{Principal, Resource};

/// The compiled CEL environment. Build once, share everywhere (`Send + Sync`).
#[derive(Clone)]
pub struct CelEnv {
    env: Arc<cel::Env>,
}

impl std::fmt::Debug for CelEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CelEnv")
    }
}

/// One compiled expression.
#[derive(Clone)]
pub struct Expr {
    inner: Arc<ExprInner>,
}

struct ExprInner {
    source: String,
    program: cel::Program,
    variables: Vec<String>,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.inner.source)
    }
}

impl CelEnv {
    pub fn new() -> CelEnv {
        let mut env = cel::Env::stdlib();
        for ext in [
            cel::extensions::strings as fn(&mut cel::Env) -> _,
            cel::extensions::lists,
            cel::extensions::math,
            cel::extensions::encoders,
        ] {
            // A failure here would be a bug in the crate's own registrations; skip the library.
            let _ = env.add_extension(ext);
        }
        CelEnv { env: Arc::new(env) }
    }

    /// Compiles `src`, with the load-time checks. The error is a one-line message.
    pub fn compile(&self, src: &str) -> Result<Expr, String> {
        let program = self
            .env
            .compile(src)
            .map_err(|e| e.to_string().replace('\n', " "))?;
        let variables = referenced_variables(src);
        Ok(Expr {
            inner: Arc::new(ExprInner {
                source: src.to_string(),
                program,
                variables,
            }),
        })
    }
}

impl Default for CelEnv {
    fn default() -> Self {
        CelEnv::new()
    }
}

/// Names used as `variables.x` / `V.x` (textual scan; good enough for dependency order).
fn referenced_variables(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for prefix in ["variables.", "V."] {
        let mut rest = src;
        while let Some(i) = rest.find(prefix) {
            let before_ok = i == 0
                || !rest[..i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
            let tail = &rest[i + prefix.len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if before_ok && !name.is_empty() && !out.contains(&name) {
                out.push(name.clone());
            }
            rest = &tail[name.len()..];
        }
    }
    out
}

impl Expr {
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Variable names (`V.x`) this expression reads.
    pub fn variables_used(&self) -> &[String] {
        &self.inner.variables
    }

    /// Evaluates a boolean condition. A non-boolean result is an error.
    pub fn eval_bool(&self, ctx: &EvalCtx<'_>) -> Result<bool, String> {
        match self.eval(ctx)? {
            cel::Value::Bool(b) => Ok(b),
            other => Err(format!(
                "expected a bool, got {}",
                other.type_of().to_string()
            )),
        }
    }

    /// Evaluates an output expression to JSON.
    pub fn eval_json(&self, ctx: &EvalCtx<'_>) -> Result<Value, String> {
        let v = self.eval(ctx)?;
        to_json(&v)
    }

    fn eval(&self, ctx: &EvalCtx<'_>) -> Result<cel::Value, String> {
        let mut c = cel::Context::with_env(ctx.env.env.clone());
        let req = ctx.request;
        let mut bound: Vec<(String, cel::Value)> = Vec::new();
        let mut add = |c: &mut cel::Context, name: &str, v: Value| -> Result<(), String> {
            let v = json_to_cel(&v);
            bound.push((name.to_string(), v.clone()));
            c.add_variable_from_value(name, v);
            Ok(())
        };
        let principal = serde_json::to_value(req.principal).map_err(|e| e.to_string())?;
        let resource = serde_json::to_value(req.resource).map_err(|e| e.to_string())?;
        let principal = with_defaults(principal, &["attr", "policyVersion", "scope"]);
        let resource = with_defaults(resource, &["attr", "policyVersion", "scope"]);
        add(&mut c, "P", principal.clone())?;
        add(&mut c, "R", resource.clone())?;
        let mut request = Map::new();
        request.insert("principal".into(), principal);
        request.insert("resource".into(), resource);
        request.insert("auxData".into(), req.aux_data.clone());
        request.insert("aux_data".into(), req.aux_data.clone());
        request.insert("action".into(), Value::String(ctx.action.to_string()));
        add(&mut c, "request", Value::Object(request))?;
        let globals = Value::Object((*req.globals).clone());
        add(&mut c, "G", globals.clone())?;
        add(&mut c, "globals", globals)?;
        let constants = Value::Object((**ctx.constants).clone());
        add(&mut c, "C", constants.clone())?;
        add(&mut c, "constants", constants)?;
        let mut runtime = Map::new();
        let edr = Value::from(ctx.effective_derived_roles.to_vec());
        runtime.insert("effectiveDerivedRoles".into(), edr.clone());
        runtime.insert("effective_derived_roles".into(), edr);
        add(&mut c, "runtime", Value::Object(runtime))?;
        // Variables in dependency order, each seeing the ones before it.
        let mut vars: HashMap<String, cel::Value> = HashMap::new();
        for (name, expr) in ctx.variables.ordered.iter() {
            if !self.inner.variables.contains(name) && !ctx.variables.needed_by(name, self) {
                continue;
            }
            let mut vc = cel::Context::with_env(ctx.env.env.clone());
            for (n, v) in &bound {
                vc.add_variable_from_value(n.clone(), v.clone());
            }
            let vmap = cel::Value::Map(vars.clone().into_iter().collect::<HashMap<_, _>>().into());
            vc.add_variable_from_value("V", vmap.clone());
            vc.add_variable_from_value("variables", vmap);
            let vv = expr
                .inner
                .program
                .execute(&vc)
                .map_err(|e| format!("variable {name}: {e}"))?;
            vars.insert(name.clone(), vv);
        }
        let vmap = cel::Value::Map(vars.into_iter().collect::<HashMap<_, _>>().into());
        c.add_variable_from_value("V", vmap.clone());
        c.add_variable_from_value("variables", vmap);
        self.inner.program.execute(&c).map_err(|e| e.to_string())
    }
}

fn with_defaults(mut v: Value, keys: &[&str]) -> Value {
    if let Value::Object(m) = &mut v {
        for k in keys {
            if !m.contains_key(*k) {
                let d = if *k == "attr" {
                    Value::Object(Map::new())
                } else {
                    Value::String(String::new())
                };
                m.insert((*k).to_string(), d);
            }
        }
    }
    v
}

/// JSON → CEL, with every number a double (Cerbos attributes are `google.protobuf.Value`).
fn json_to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(a) => cel::Value::List(Arc::new(a.iter().map(json_to_cel).collect())),
        Value::Object(m) => {
            let map: HashMap<String, cel::Value> =
                m.iter().map(|(k, v)| (k.clone(), json_to_cel(v))).collect();
            cel::Value::Map(map.into())
        }
    }
}

fn to_json(v: &cel::Value) -> Result<Value, String> {
    Ok(match v {
        cel::Value::Null => Value::Null,
        cel::Value::Bool(b) => Value::Bool(*b),
        cel::Value::Int(i) => Value::from(*i),
        cel::Value::UInt(u) => Value::from(*u),
        cel::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        cel::Value::String(s) => Value::String(s.to_string()),
        cel::Value::List(l) => Value::Array(l.iter().map(to_json).collect::<Result<_, _>>()?),
        cel::Value::Map(m) => {
            let mut out = Map::new();
            for (k, v) in m.map.iter() {
                let key = match k {
                    cel::objects::Key::String(s) => s.to_string(),
                    other => format!("{other:?}"),
                };
                out.insert(key, to_json(v)?);
            }
            Value::Object(out)
        }
        other => Value::String(format!("{other:?}")),
    })
}

/// A policy's variables (imported and local, merged), in dependency order.
#[derive(Debug, Clone, Default)]
pub struct Variables {
    ordered: Vec<(String, Expr)>,
    deps: BTreeMap<String, Vec<String>>,
}

impl Variables {
    /// Orders `defs` by dependency. Errors name the variable: an undefined reference, or a cycle.
    pub fn compile(defs: Vec<(String, Expr)>) -> Result<Variables, Vec<(String, String)>> {
        let by_name: BTreeMap<String, Expr> = defs.iter().cloned().collect();
        let mut errors = Vec::new();
        let mut deps = BTreeMap::new();
        for (name, e) in &defs {
            for used in e.variables_used() {
                if !by_name.contains_key(used) {
                    errors.push((name.clone(), format!("undefined variable '{used}'")));
                }
            }
            deps.insert(name.clone(), e.variables_used().to_vec());
        }
        let mut ordered = Vec::new();
        let mut state: BTreeMap<String, u8> = BTreeMap::new();
        fn visit(
            n: &str,
            by_name: &BTreeMap<String, Expr>,
            state: &mut BTreeMap<String, u8>,
            ordered: &mut Vec<(String, Expr)>,
            errors: &mut Vec<(String, String)>,
        ) {
            match state.get(n) {
                Some(2) => return,
                Some(1) => {
                    errors.push((n.to_string(), "cyclical variable definitions".to_string()));
                    return;
                }
                _ => {}
            }
            let Some(e) = by_name.get(n) else { return };
            state.insert(n.to_string(), 1);
            for d in e.variables_used() {
                visit(d, by_name, state, ordered, errors);
            }
            state.insert(n.to_string(), 2);
            ordered.push((n.to_string(), e.clone()));
        }
        for name in by_name.keys() {
            visit(name, &by_name, &mut state, &mut ordered, &mut errors);
        }
        if errors.is_empty() {
            Ok(Variables { ordered, deps })
        } else {
            errors.sort();
            errors.dedup();
            Err(errors)
        }
    }

    fn needed_by(&self, name: &str, e: &Expr) -> bool {
        let mut stack: Vec<&str> = e.variables_used().iter().map(String::as_str).collect();
        let mut seen = Vec::new();
        while let Some(n) = stack.pop() {
            if n == name {
                return true;
            }
            if seen.contains(&n) {
                continue;
            }
            seen.push(n);
            if let Some(d) = self.deps.get(n) {
                stack.extend(d.iter().map(String::as_str));
            }
        }
        false
    }
}

/// What every expression of one check can see. Built once per check.
#[derive(Debug)]
pub struct Request<'a> {
    pub principal: &'a Principal,
    pub resource: &'a Resource,
    /// `{"jwt": {...claims}}` or null.
    pub aux_data: &'a Value,
    pub now: chrono::DateTime<chrono::Utc>,
    pub globals: &'a Map<String, Value>,
}

/// The context of one policy's evaluation for one action.
pub struct EvalCtx<'a> {
    pub env: &'a CelEnv,
    pub request: &'a Request<'a>,
    pub action: &'a str,
    pub constants: &'a Arc<Map<String, Value>>,
    pub variables: &'a Variables,
    pub effective_derived_roles: &'a [String],
}
