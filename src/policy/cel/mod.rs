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
//!
//! Layout: `env` builds the `cel::Env`; `macros` holds the parse-time rewrites (`cel.bind`,
//! two-variable comprehensions, `now()`, UTC getters, cached `matches`); `check` the load-time
//! checks and AST rewrites, run by `compiler` on a thread with a large stack; `scope` binds
//! a request lazily (variable resolver, lazy policy variables, cost budget); `views` the lazy
//! JSON views; `output` protojson-like output; `funcs`, `hierarchy`, `network`,
//! `paths`, `regex`, `spiffe` the functions.
//!
//! Limits: [`MAX_SOURCE_LEN`], [`MAX_DEPTH`], [`MAX_VARIABLE_DEPTH`], [`MAX_LOOP_NESTING`] at
//! load; [`COST_LIMIT`] per evaluation. Policy variables are evaluated on first use and cached
//! for the rest of that one evaluation (`eval_bool`/`eval_json` call).

mod args;
mod check;
mod compiler;
mod env;
mod funcs;
mod hierarchy;
mod macros;
mod network;
mod output;
mod paths;
mod regex;
mod scope;
mod spiffe;
mod views;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock};

use cel::common::value::Val;
use serde_json::{Map, Value};

use super::input::{Principal, Resource};

/// Longest expression source accepted, in bytes.
pub const MAX_SOURCE_LEN: usize = 8 * 1024;
/// Deepest expression tree accepted (after macro expansion). Bounds the interpreter's recursion.
pub const MAX_DEPTH: usize = 50;
/// Deepest chain of variable definitions (own depth plus that of the variables read, recursively).
pub const MAX_VARIABLE_DEPTH: usize = 100;
/// Most comprehensions (`all`, `exists`, `map`, ...) nested in one another.
pub const MAX_LOOP_NESTING: usize = 4;
/// Work units one evaluation may spend: one per comprehension iteration, and a share of the
/// element comparisons of the list functions. Exceeding it is the error [`COST_EXCEEDED`].
pub const COST_LIMIT: u64 = 100_000;
/// The error of an evaluation that exceeded [`COST_LIMIT`].
pub const COST_EXCEEDED: &str = "evaluation cost limit exceeded";

/// The compiled CEL environment. Build once, share everywhere (`Send + Sync`).
#[derive(Clone)]
pub struct CelEnv {
    env: Arc<cel::Env>,
    /// Set when the environment could not be built: every compile then fails with it.
    broken: Option<Arc<str>>,
}

impl std::fmt::Debug for CelEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CelEnv")
    }
}

static SHARED: LazyLock<CelEnv> = LazyLock::new(|| match env::build() {
    Ok(env) => CelEnv {
        env: Arc::new(env),
        broken: None,
    },
    Err(e) => CelEnv {
        env: Arc::new(cel::Env::stdlib()),
        broken: Some(format!("CEL environment failed to build: {e}").into()),
    },
});

impl CelEnv {
    /// The environment (built once per process, then shared).
    pub fn new() -> CelEnv {
        SHARED.clone()
    }

    /// Compiles `src`, with the load-time checks. The error is a one-line message.
    pub fn compile(&self, src: &str) -> Result<Expr, String> {
        if let Some(e) = &self.broken {
            return Err(e.to_string());
        }
        if src.len() > MAX_SOURCE_LEN {
            return Err(format!(
                "expression is too long: {} bytes (limit {MAX_SOURCE_LEN})",
                src.len()
            ));
        }
        let compiled = compiler::compile(&self.env, src)?;
        Ok(Expr {
            inner: Arc::new(ExprInner {
                source: src.to_string(),
                ast: compiled.ast,
                variables: compiled.variables,
                depth: compiled.depth,
                uses_now: compiled.uses_now,
            }),
        })
    }
}

impl Default for CelEnv {
    fn default() -> Self {
        CelEnv::new()
    }
}

/// One compiled expression.
#[derive(Clone)]
pub struct Expr {
    inner: Arc<ExprInner>,
}

struct ExprInner {
    source: String,
    /// The checked, macro-expanded and cost-instrumented tree.
    ast: cel::IdedExpr,
    variables: Vec<String>,
    depth: usize,
    uses_now: bool,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.inner.source)
    }
}

impl Expr {
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Whether the expression reads the clock (`now()`, `timeSince`), wherever it stands.
    pub fn uses_now(&self) -> bool {
        self.inner.uses_now
    }

    /// The checked tree (query planning walks it to evaluate what is known).
    pub(crate) fn ast(&self) -> &cel::IdedExpr {
        &self.inner.ast
    }

    /// Variable names (`V.x`, `variables.x`) this expression reads.
    pub fn variables_used(&self) -> &[String] {
        &self.inner.variables
    }

    /// Evaluates a boolean condition. A non-boolean result is `false`, not an error: Cerbos
    /// 0.55 reads it so in both evaluation modes (checked against the binary, see
    /// docs/compatibility.md).
    pub fn eval_bool(&self, ctx: &EvalCtx<'_>) -> Result<bool, String> {
        let run = || {
            scope::reset_budget();
            let scope = scope::Scope::new(ctx);
            let mut context = cel::Context::with_env(ctx.env.env.clone());
            context.set_variable_resolver(&scope);
            // `Value::resolve` (not the `#[inline(always)]` `resolve_val`) runs the interpreter
            // as compiled in the `cel` crate: with its optimisation level, hence its (much
            // smaller) stack frames, in debug builds too.
            match cel::Value::resolve(&self.inner.ast, &context) {
                Ok(cel::Value::Bool(b)) => Ok(b),
                Ok(_) => Ok(false),
                Err(cel::ExecutionError::UnexpectedType { want, .. })
                    if want.contains("representable as") =>
                {
                    Ok(false)
                }
                Err(e) => Err(scope::error_message(&e)),
            }
        };
        catch_unwind(AssertUnwindSafe(run))
            .unwrap_or_else(|_| Err("internal error while evaluating the expression".to_string()))
    }

    /// Evaluates an output expression to JSON (protojson-like: durations `"5400s"`, timestamps
    /// RFC 3339, whole doubles as integers).
    pub fn eval_json(&self, ctx: &EvalCtx<'_>) -> Result<Value, String> {
        self.eval_with(ctx, output::to_json)
    }

    /// Evaluates against `ctx` with a fresh cost budget, and hands the result to `f`.
    fn eval_with<T>(
        &self,
        ctx: &EvalCtx<'_>,
        f: impl FnOnce(&dyn Val) -> Result<T, String>,
    ) -> Result<T, String> {
        let run = || {
            scope::reset_budget();
            let scope = scope::Scope::new(ctx);
            let mut context = cel::Context::with_env(ctx.env.env.clone());
            context.set_variable_resolver(&scope);
            let value = cel::Value::resolve_val(&self.inner.ast, &context)
                .map_err(|e| scope::error_message(&e))?;
            f(value.as_ref())
        };
        catch_unwind(AssertUnwindSafe(run))
            .unwrap_or_else(|_| Err("internal error while evaluating the expression".to_string()))
    }
}

/// Why a node of a tree has no literal value.
#[derive(Debug)]
pub(crate) enum NodeError {
    /// It failed to evaluate.
    Eval(String),
    /// Its value (a duration, a timestamp, a type, ...) has no JSON literal form; the type name.
    NoLiteral(String),
}

/// Evaluates one node of a compiled expression's tree to a JSON literal (query planning
/// evaluates the parts that do not read the unknown resource). Only null, booleans, numbers,
/// strings, lists and maps have one.
pub(crate) fn eval_node_literal(
    ast: &cel::IdedExpr,
    ctx: &EvalCtx<'_>,
) -> Result<Value, NodeError> {
    use cel::common::types::Kind;
    let run = || {
        scope::reset_budget();
        let scope = scope::Scope::new(ctx);
        let mut context = cel::Context::with_env(ctx.env.env.clone());
        context.set_variable_resolver(&scope);
        let value = cel::Value::resolve_val(ast, &context)
            .map_err(|e| NodeError::Eval(scope::error_message(&e)))?;
        let ty = value.get_type();
        match ty.kind() {
            Kind::NullType
            | Kind::Boolean
            | Kind::Int
            | Kind::UInt
            | Kind::Double
            | Kind::String
            | Kind::List
            | Kind::Map => output::to_json(value.as_ref()).map_err(NodeError::Eval),
            _ => Err(NodeError::NoLiteral(ty.name().to_string())),
        }
    };
    catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|_| {
        Err(NodeError::Eval(
            "internal error while evaluating the expression".to_string(),
        ))
    })
}

/// A policy's variables (imported and local, merged), in dependency order.
#[derive(Debug, Clone, Default)]
pub struct Variables {
    /// Definitions, each after the ones it reads.
    defs: Vec<(String, Expr)>,
    index: HashMap<String, usize>,
}

impl Variables {
    /// Orders `defs` by dependency. Errors name the variable: an undefined reference, a cycle
    /// ("cyclical variable definitions"), or a chain of definitions nested too deeply.
    pub fn compile(defs: Vec<(String, Expr)>) -> Result<Variables, Vec<(String, String)>> {
        let by_name: BTreeMap<String, Expr> = defs.into_iter().collect();
        let mut errors = Vec::new();
        for (name, e) in &by_name {
            for used in e.variables_used() {
                if !by_name.contains_key(used) {
                    errors.push((name.clone(), format!("undefined variable '{used}'")));
                }
            }
        }
        let mut order = Ordering {
            by_name: &by_name,
            state: BTreeMap::new(),
            total_depth: BTreeMap::new(),
            ordered: Vec::new(),
            errors: &mut errors,
        };
        for name in by_name.keys() {
            order.visit(name);
        }
        let ordered = order.ordered;
        if !errors.is_empty() {
            errors.sort();
            errors.dedup();
            return Err(errors);
        }
        let index = ordered
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Ok(Variables {
            defs: ordered,
            index,
        })
    }

    /// The definition of the variable `name`.
    pub fn expr(&self, name: &str) -> Option<&Expr> {
        self.get(name).map(|(_, e)| e)
    }

    fn get(&self, name: &str) -> Option<(usize, &Expr)> {
        let i = *self.index.get(name)?;
        self.defs.get(i).map(|(_, e)| (i, e))
    }

    fn len(&self) -> usize {
        self.defs.len()
    }

    /// Whether any definition reads the clock (Cerbos evaluates a policy's variables eagerly).
    pub fn use_now(&self) -> bool {
        self.defs.iter().any(|(_, e)| e.uses_now())
    }

    /// The definitions' source texts.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.defs.iter().map(|(_, e)| e.source())
    }
}

/// Depth-first topological ordering of variable definitions.
struct Ordering<'a> {
    by_name: &'a BTreeMap<String, Expr>,
    /// 1 = in progress, 2 = done.
    state: BTreeMap<&'a str, u8>,
    total_depth: BTreeMap<&'a str, usize>,
    ordered: Vec<(String, Expr)>,
    errors: &'a mut Vec<(String, String)>,
}

impl<'a> Ordering<'a> {
    /// Visits `name`; returns the depth of its chain of definitions.
    fn visit(&mut self, name: &str) -> usize {
        let Some((key, e)) = self.by_name.get_key_value(name) else {
            return 0;
        };
        match self.state.get(key.as_str()) {
            Some(2) => return self.total_depth.get(key.as_str()).copied().unwrap_or(0),
            Some(_) => {
                self.errors
                    .push((key.clone(), "cyclical variable definitions".to_string()));
                return 0;
            }
            None => {}
        }
        self.state.insert(key, 1);
        let mut deepest = 0;
        for used in e.variables_used() {
            deepest = deepest.max(self.visit(used));
        }
        let total = e.inner.depth + deepest;
        if total > MAX_VARIABLE_DEPTH {
            self.errors.push((
                key.clone(),
                format!(
                    "variable definitions nest too deeply ({total} levels, limit {MAX_VARIABLE_DEPTH})"
                ),
            ));
        }
        self.state.insert(key, 2);
        self.total_depth.insert(key, total);
        self.ordered.push((key.clone(), e.clone()));
        total
    }
}

/// What every expression of one check can see. Built once per check.
#[derive(Debug)]
pub struct Request<'a> {
    pub principal: &'a Principal,
    pub resource: &'a Resource,
    /// `{"jwt": {...claims}}`, `{"jwts": {name: {"claims": {...}}}}` or null.
    pub aux_data: &'a Value,
    pub now: chrono::DateTime<chrono::Utc>,
    pub globals: &'a Map<String, Value>,
    /// Set when an evaluation read `now()` (test suites without `options.now` report it).
    pub clock_read: std::sync::atomic::AtomicBool,
}

/// The context of one policy's evaluation for one action.
pub struct EvalCtx<'a> {
    pub env: &'a CelEnv,
    pub request: &'a Request<'a>,
    pub action: &'a str,
    pub constants: &'a Arc<Map<String, Value>>,
    pub variables: &'a Variables,
    pub effective_derived_roles: &'a [String],
    /// Set when a derived role of this scope failed to evaluate under strict evaluation: then
    /// `runtime.effectiveDerivedRoles` is an error, as in Cerbos's `strictEvaluation`.
    pub derived_roles_error: Option<&'a str>,
}
