//! One evaluation's bindings: a `VariableResolver` that hands out lazy views of the request
//! (nothing is converted until an expression touches it), policy variables evaluated on first
//! use and cached for the rest of the evaluation, the fixed `now()`, and the cost budget.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use cel::ExecutionError;
use cel::common::traits::Indexer;
use cel::common::types::{
    CelBool, CelBytes, CelDuration, CelInt, CelList, CelMap, CelMapKey, CelNull, CelOptional,
    CelString, CelTimestamp, CelType, CelUInt, Kind, MAP_TYPE, Type,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;

use super::views::{AuxView, JMap, PrincipalView, ResourceView, StrList, json_path, no_such_key};
use super::{COST_EXCEEDED, COST_LIMIT, EvalCtx, Variables};

thread_local! {
    /// Work units left to the evaluation running on this thread.
    static BUDGET: Cell<u64> = const { Cell::new(0) };
}

/// Gives the evaluation about to run on this thread a full budget.
pub(super) fn reset_budget() {
    BUDGET.with(|b| b.set(COST_LIMIT));
}

/// Spends `units` of the budget; fails once it is exhausted.
pub(super) fn charge(units: u64) -> Result<(), ExecutionError> {
    BUDGET.with(|b| {
        let left = b.get();
        if units > left {
            b.set(0);
            Err(internal_error(COST_EXCEEDED))
        } else {
            b.set(left - units);
            Ok(())
        }
    })
}

/// An error whose message is shown as is (see [`error_message`]).
pub(super) fn internal_error(message: impl Into<String>) -> ExecutionError {
    ExecutionError::FunctionError {
        function: "@".to_string(),
        message: message.into(),
    }
}

/// The one-line message of an evaluation error, with our internal function names replaced by
/// the names written in the expression.
pub(super) fn error_message(e: &ExecutionError) -> String {
    let raw = match e {
        ExecutionError::FunctionError { function, message } if function.starts_with('@') => {
            message.clone()
        }
        other => other.to_string(),
    };
    raw.replace("'@matches'", "'matches'")
        .replace("'@timeSince'", "'timeSince'")
        .replace("'@utc'", "'timestamp getter'")
        .replace('\n', " ")
}

/// The bindings of one evaluation.
pub(super) struct Scope<'a> {
    env: &'a std::sync::Arc<cel::Env>,
    action: &'a str,
    principal: PrincipalView<'a>,
    resource: ResourceView<'a>,
    aux: AuxView<'a>,
    globals: JMap<'a>,
    constants: JMap<'a>,
    derived_roles: StrList<'a>,
    /// Strict evaluation: a derived role of this scope failed, so `runtime.effectiveDerivedRoles`
    /// is an error (Cerbos's `strictEvaluation`).
    derived_roles_error: Option<&'a str>,
    now: CelTimestamp,
    clock_read: &'a std::sync::atomic::AtomicBool,
    variables: &'a Variables,
    /// One slot per variable: its value (owned, so it outlives any borrow) or its error.
    slots: Vec<Slot>,
}

#[derive(Default)]
struct Slot {
    busy: AtomicBool,
    value: OnceLock<Result<Box<dyn Val>, String>>,
}

impl<'a> Scope<'a> {
    pub(super) fn new(ctx: &'a EvalCtx<'a>) -> Scope<'a> {
        let req = ctx.request;
        Scope {
            env: &ctx.env.env,
            action: ctx.action,
            principal: PrincipalView::new(req.principal),
            resource: ResourceView::new(req.resource),
            aux: AuxView::new(req.aux_data),
            globals: JMap::new(req.globals),
            constants: JMap::new(ctx.constants),
            derived_roles: StrList::new(ctx.effective_derived_roles),
            derived_roles_error: ctx.derived_roles_error,
            now: CelTimestamp::from(req.now.fixed_offset()),
            clock_read: &req.clock_read,
            variables: ctx.variables,
            slots: (0..ctx.variables.len()).map(|_| Slot::default()).collect(),
        }
    }

    /// The value of the variable `name`, evaluated on first use.
    fn variable(&self, name: &str) -> Result<&(dyn Val + 'static), ExecutionError> {
        let Some((i, expr)) = self.variables.get(name) else {
            return Err(no_such_key(name));
        };
        let Some(slot) = self.slots.get(i) else {
            return Err(no_such_key(name));
        };
        if slot.value.get().is_none() && slot.busy.swap(true, Ordering::Relaxed) {
            return Err(internal_error(format!(
                "variable '{name}': cyclical variable definitions"
            )));
        }
        let value = slot.value.get_or_init(|| {
            let mut context = cel::Context::with_env(self.env.clone());
            context.set_variable_resolver(self);
            // As in `eval_bool`, `Value::resolve` runs the interpreter compiled in `cel`. A
            // value it cannot return (a view, one of our types) is evaluated again, kept as is.
            let value = match cel::Value::resolve(&expr.inner.ast, &context) {
                Ok(v) => Box::<dyn Val>::try_from(v),
                Err(ExecutionError::UnexpectedType { want, .. })
                    if want.contains("representable as") =>
                {
                    cel::Value::resolve_val(&expr.inner.ast, &context)
                        .and_then(|v| to_static(v.as_ref()))
                }
                Err(e) => Err(e),
            };
            value.map_err(|e| format!("variable '{name}': {}", error_message(&e)))
        });
        match value {
            Ok(v) => Ok(v.as_ref()),
            Err(e) => Err(internal_error(e.clone())),
        }
    }
}

impl<'a> Scope<'a> {
    /// `P…` / `request.principal…` after the root: the principal, a field, or a path into
    /// its attributes.
    fn principal_path<'b, 'p>(
        &'b self,
        mut rest: impl Iterator<Item = &'p str>,
    ) -> Option<CowVal<'b, 'b>> {
        let Some(field) = rest.next() else {
            return Some(CowVal::Borrowed(&self.principal));
        };
        if field == "attr" {
            return attr_path(self.principal.attr(), rest);
        }
        if field == "roles" {
            return rest
                .next()
                .is_none()
                .then(|| CowVal::Borrowed(self.principal.roles() as &dyn Val));
        }
        let value = self.principal.field(field)?;
        rest.next().is_none().then_some(value)
    }

    /// `R…` / `request.resource…` after the root.
    fn resource_path<'b, 'p>(
        &'b self,
        mut rest: impl Iterator<Item = &'p str>,
    ) -> Option<CowVal<'b, 'b>> {
        let Some(field) = rest.next() else {
            return Some(CowVal::Borrowed(&self.resource));
        };
        if field == "attr" {
            return attr_path(self.resource.attr(), rest);
        }
        let value = self.resource.field(field)?;
        rest.next().is_none().then_some(value)
    }
}

/// A JSON map, or a path of fields into it (converted straight from the JSON).
fn attr_path<'b, 'a: 'b, 'p>(
    map: &'b JMap<'a>,
    rest: impl Iterator<Item = &'p str>,
) -> Option<CowVal<'b, 'b>> {
    let mut rest = rest.peekable();
    if rest.peek().is_none() {
        return Some(CowVal::Borrowed(map));
    }
    json_path(map.src(), rest).map(CowVal::Owned)
}

/// Names are resolved whole when possible (the interpreter asks for `R.attr.a.b` before
/// `R.attr.a`, `R.attr` and `R`): a path into JSON is walked directly, without intermediate
/// values. A miss makes the interpreter try the shorter names, which report errors as usual.
impl VariableResolver for Scope<'_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        let mut path = name.split('.');
        let root = path.next()?;
        match root {
            "P" => self.principal_path(path),
            "R" => self.resource_path(path),
            "request" => match path.next() {
                None => Some(CowVal::owned(RequestView { scope: self })),
                Some("principal") => self.principal_path(path),
                Some("resource") => self.resource_path(path),
                Some("auxData" | "aux_data") => {
                    let mut rest = path.peekable();
                    if rest.peek().is_none() {
                        return Some(CowVal::Borrowed(&self.aux));
                    }
                    json_path(self.aux.src(), rest).map(CowVal::Owned)
                }
                Some("action") => path
                    .next()
                    .is_none()
                    .then(|| CowVal::owned(CelString::from(self.action))),
                Some(_) => None,
            },
            "runtime" => match (path.next(), path.next()) {
                (None, _) => Some(CowVal::owned(RuntimeView { scope: self })),
                // With an error, `RuntimeView` (which the interpreter falls back to) reports it.
                (Some("effectiveDerivedRoles" | "effective_derived_roles"), None) => self
                    .derived_roles_error
                    .is_none()
                    .then_some(CowVal::Borrowed(&self.derived_roles)),
                _ => None,
            },
            "G" | "globals" => attr_path(&self.globals, path),
            "C" | "constants" => attr_path(&self.constants, path),
            "V" | "variables" => match (path.next(), path.next()) {
                (None, _) => Some(CowVal::owned(VarsView { scope: self })),
                // An error is reported by `VarsView`, which the interpreter falls back to.
                (Some(var), None) => self.variable(var).ok().map(CowVal::Borrowed),
                _ => None,
            },
            super::macros::NOW => {
                self.clock_read.store(true, Ordering::Relaxed);
                Some(CowVal::Borrowed(&self.now))
            }
            _ => None,
        }
    }
}

static REQUEST_TYPE: Type = Type::new_unspecified_type("cerbos.engine.v1.CheckInput");
static RUNTIME_TYPE: Type = Type::new_unspecified_type("cerbos.engine.v1.Runtime");

/// `request`: `principal`, `resource`, `auxData` (`aux_data`), and our `action`.
struct RequestView<'s, 'a> {
    scope: &'s Scope<'a>,
}

/// `runtime`: `effectiveDerivedRoles` (`effective_derived_roles`).
struct RuntimeView<'s, 'a> {
    scope: &'s Scope<'a>,
}

/// `V` / `variables`: each variable evaluated when first read.
struct VarsView<'s, 'a> {
    scope: &'s Scope<'a>,
}

macro_rules! object_view {
    ($view:ident, $ty:expr, $name:literal) => {
        impl std::fmt::Debug for $view<'_, '_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($name)
            }
        }

        impl Val for $view<'_, '_> {
            fn get_type(&self) -> &Type {
                $ty
            }
            fn cel_type() -> &'static Type {
                $ty
            }
            fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
            where
                Self: 'v,
            {
                Some(self)
            }
            fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
            where
                Self: 'v,
            {
                Box::new($view { scope: self.scope })
            }
        }
    };
}

object_view!(RequestView, &REQUEST_TYPE, "request");
object_view!(RuntimeView, &RUNTIME_TYPE, "runtime");
object_view!(VarsView, &MAP_TYPE, "variables");

fn field_name(idx: &dyn Val) -> Result<&str, ExecutionError> {
    idx.downcast_ref::<CelString>()
        .map(|s| s.inner())
        .ok_or_else(|| ExecutionError::UnexpectedType {
            got: idx.get_type().name().to_string(),
            want: "string".to_string(),
        })
}

impl Indexer for RequestView<'_, '_> {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        let s = self.scope;
        Ok(match field_name(idx)? {
            "principal" => CowVal::Borrowed(&s.principal),
            "resource" => CowVal::Borrowed(&s.resource),
            "auxData" | "aux_data" => CowVal::Borrowed(&s.aux),
            "action" => CowVal::owned(CelString::from(s.action)),
            other => return Err(no_such_key(other)),
        })
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

impl Indexer for RuntimeView<'_, '_> {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        match field_name(idx)? {
            "effectiveDerivedRoles" | "effective_derived_roles" => {
                match self.scope.derived_roles_error {
                    Some(e) => Err(internal_error(format!(
                        "runtime.effectiveDerivedRoles is unknown: {e}"
                    ))),
                    None => Ok(CowVal::Borrowed(&self.scope.derived_roles)),
                }
            }
            other => Err(no_such_key(other)),
        }
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

impl Indexer for VarsView<'_, '_> {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        let scope: &'b Scope<'_> = self.scope;
        scope.variable(field_name(idx)?).map(CowVal::Borrowed)
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

/// A copy of `v` that borrows nothing, to cache a variable's value across the evaluation.
pub(super) fn to_static(v: &dyn Val) -> Result<Box<dyn Val>, ExecutionError> {
    to_static_at(v, 0)
}

fn to_static_at(v: &dyn Val, depth: usize) -> Result<Box<dyn Val>, ExecutionError> {
    if depth > 256 {
        return Err(internal_error("value nested too deeply"));
    }
    let keep = || {
        internal_error(format!(
            "a {} cannot be kept in a variable",
            v.get_type().name()
        ))
    };
    Ok(match v.get_type().kind() {
        Kind::String => Box::new(CelString::from(
            v.downcast_ref::<CelString>()
                .ok_or_else(keep)?
                .inner()
                .to_string(),
        )),
        Kind::Bytes => Box::new(CelBytes::from(
            v.downcast_ref::<CelBytes>()
                .ok_or_else(keep)?
                .inner()
                .to_vec(),
        )),
        Kind::List => {
            let mut items = v.as_iterable().ok_or_else(keep)?.iter();
            let mut out = Vec::new();
            while let Some(x) = items.next() {
                out.push(to_static_at(x, depth + 1)?);
            }
            Box::new(CelList::from(out))
        }
        Kind::Map => {
            let mut keys = v.as_iterable().ok_or_else(keep)?.iter();
            let indexer = v.as_indexer().ok_or_else(keep)?;
            let mut out = std::collections::HashMap::new();
            while let Some(k) = keys.next() {
                let value = indexer.get(k)?;
                let key = CelMapKey::try_from(to_static_at(k, depth + 1)?)?;
                out.insert(key, to_static_at(value.as_ref(), depth + 1)?);
            }
            Box::new(CelMap::from(out))
        }
        _ => match v.downcast_ref::<CelOptional>() {
            Some(o) => Box::new(match o.option() {
                Some(x) => CelOptional::of(to_static_at(x, depth + 1)?),
                None => CelOptional::none(),
            }),
            None => static_clone(v)?,
        },
    })
}

/// Copies a value of a `'static` type (the scalars, and our own types).
fn static_clone(v: &dyn Val) -> Result<Box<dyn Val>, ExecutionError> {
    macro_rules! try_types {
        ($($t:ty),*) => {
            $(if let Some(x) = v.downcast_ref::<$t>() {
                return Ok(Box::new(x.clone()));
            })*
        };
    }
    try_types!(
        CelBool,
        CelInt,
        CelUInt,
        CelNull,
        CelTimestamp,
        CelDuration,
        CelType,
        cel::common::types::CelDouble,
        super::hierarchy::Hierarchy,
        super::network::IpVal,
        super::network::CidrVal,
        super::spiffe::SpiffeId,
        super::spiffe::TrustDomain,
        super::spiffe::Matcher
    );
    Err(internal_error(format!(
        "a value of type {} cannot be kept in a variable",
        v.get_type().name()
    )))
}
