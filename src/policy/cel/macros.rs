//! Parse-time rewrites (macros) that give the `cel` crate what Cerbos's CEL has:
//! - `cel.bind(x, init, body)` (cel-go ext.Bindings);
//! - two-variable comprehensions `all/exists/existsOne(i, v, p)`, `transformList`,
//!   `transformMap`, `transformMapEntry` (cel-go ext.TwoVarComprehensions);
//! - `now()` → the identifier `@now`, bound once per evaluation; `timeSince(t)`;
//! - the ten zero-argument timestamp getters read UTC, as cel-go's do;
//! - `matches` through a process-wide cache of compiled regexes.

use cel::common::ast::{
    CallExpr, ComprehensionExpr, Expr, IdedExpr, ListExpr, LiteralValue, MapExpr, operators,
};
use cel::parser::{Macro, MacroExprHelper, ParseError};
use cel::{DeclarationError, Env};

/// The per-evaluation `now()`.
pub(super) const NOW: &str = "@now";
/// Accumulator of the comprehensions built here (shadowed correctly when nested).
const RESULT: &str = "@result";
/// The evaluated target of a two-variable comprehension.
const TARGET: &str = "@target2";
/// Loop variable of a `cel.bind` comprehension (it never iterates).
const UNUSED: &str = "@unused";

/// The timestamp getters whose zero-argument form reads UTC.
const GETTERS: [&str; 10] = [
    "getFullYear",
    "getMonth",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
];

/// Registers the macros on `env`.
pub(super) fn register(env: &mut Env) -> Result<(), DeclarationError> {
    env.add_macro(Macro::global("now", 0, |h, _, _| Ok(Some(ident(h, NOW)))))?;
    env.add_macro(Macro::global("timeSince", 1, |h, _, args| {
        let [t] = take_args(h, args)?;
        let now = ident(h, NOW);
        Ok(Some(call(h, "@timeSince", None, vec![now, t])))
    }))?;
    env.add_macro(Macro::receiver("timeSince", 0, |h, target, _| {
        let t = take_target(h, target)?;
        let now = ident(h, NOW);
        Ok(Some(call(h, "@timeSince", None, vec![now, t])))
    }))?;
    for getter in GETTERS {
        env.add_macro(Macro::receiver(getter, 0, move |h, target, _| {
            let t = take_target(h, target)?;
            let utc = call(h, "@utc", None, vec![t]);
            Ok(Some(call(h, getter, Some(utc), vec![])))
        }))?;
    }
    env.add_macro(Macro::receiver("matches", 1, |h, target, args| {
        let s = take_target(h, target)?;
        let [re] = take_args(h, args)?;
        Ok(Some(call(h, "@matches", None, vec![s, re])))
    }))?;
    env.add_macro(Macro::global("matches", 2, |h, _, args| {
        let [s, re] = take_args(h, args)?;
        Ok(Some(call(h, "@matches", None, vec![s, re])))
    }))?;
    env.add_macro(Macro::receiver("bind", 3, bind_macro))?;
    // `lists.range(n)` through our overload, which charges the cost budget for `n` elements.
    env.add_macro(Macro::receiver("range", 1, |h, target, args| {
        if !matches!(target.as_ref().map(|t| &t.expr), Some(Expr::Ident(n)) if n == "lists") {
            return Ok(None);
        }
        let [n] = take_args(h, args)?;
        target.take();
        Ok(Some(call(h, "@range", None, vec![n])))
    }))?;
    for (name, kind) in [
        ("all", Fold::All),
        ("exists", Fold::Exists),
        ("existsOne", Fold::ExistsOne),
        ("exists_one", Fold::ExistsOne),
        ("transformList", Fold::List),
        ("transformMap", Fold::Map),
        ("transformMapEntry", Fold::MapEntry),
    ] {
        env.add_macro(Macro::receiver(name, 3, move |h, target, args| {
            two_var(h, target, args, kind, false)
        }))?;
        if matches!(kind, Fold::List | Fold::Map | Fold::MapEntry) {
            env.add_macro(Macro::receiver(name, 4, move |h, target, args| {
                two_var(h, target, args, kind, true)
            }))?;
        }
    }
    Ok(())
}

/// What a two-variable comprehension computes.
#[derive(Clone, Copy)]
enum Fold {
    All,
    Exists,
    ExistsOne,
    List,
    Map,
    MapEntry,
}

/// `cel.bind(x, init, body)`; declines `bind` on any other target.
fn bind_macro(
    h: &mut MacroExprHelper<'_>,
    target: &mut Option<IdedExpr>,
    args: &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError> {
    if !matches!(target.as_ref().map(|t| &t.expr), Some(Expr::Ident(n)) if n == "cel") {
        return Ok(None);
    }
    let [var, init, body] = take_args(h, args)?;
    let name = simple_name(h, var, "cel.bind()")?;
    target.take();
    Ok(Some(bind(h, name, init, body)))
}

/// `target.f(i, v, [filter,] expr)`: a loop over the keys (map) or indexes (list) of the
/// target, evaluated once, with `v` bound to the element of each.
fn two_var(
    h: &mut MacroExprHelper<'_>,
    target: &mut Option<IdedExpr>,
    args: &mut Vec<IdedExpr>,
    kind: Fold,
    filtered: bool,
) -> Result<Option<IdedExpr>, ParseError> {
    let range = take_target(h, target)?;
    let mut args = std::mem::take(args);
    let body = args.pop();
    let filter = if filtered { args.pop() } else { None };
    let (Some(body), [k, v]) = (body, <[IdedExpr; 2]>::try_from(args).unwrap_or_default()) else {
        return Err(h.new_error(range.id, "wrong number of arguments"));
    };
    let k = simple_name(h, k, "a comprehension")?;
    let v = simple_name(h, v, "a comprehension")?;
    if k == v {
        return Err(h.new_error(
            range.id,
            format!("the two iteration variables are both named '{k}'"),
        ));
    }
    // `v` bound to `@target2[k]` around an expression.
    let with_value = |h: &mut MacroExprHelper<'_>, e: IdedExpr| {
        let t = ident(h, TARGET);
        let key = ident(h, &k);
        let element = call(h, operators::INDEX, None, vec![t, key]);
        bind(h, v.clone(), element, e)
    };
    let body = with_value(h, body);
    let filter = filter.map(|f| with_value(h, f));
    let (init, cond, step, result) = match kind {
        Fold::All | Fold::Exists => {
            let all = matches!(kind, Fold::All);
            let init = bool_lit(h, all);
            let accu = ident(h, RESULT);
            let accu = if all {
                accu
            } else {
                call(h, operators::LOGICAL_NOT, None, vec![accu])
            };
            let cond = call(h, operators::NOT_STRICTLY_FALSE, None, vec![accu]);
            let op = if all {
                operators::LOGICAL_AND
            } else {
                operators::LOGICAL_OR
            };
            let accu = ident(h, RESULT);
            let step = call(h, op, None, vec![accu, body]);
            (init, cond, step, ident(h, RESULT))
        }
        Fold::ExistsOne => {
            let init = int_lit(h, 0);
            let cond = bool_lit(h, true);
            let accu = ident(h, RESULT);
            let one = int_lit(h, 1);
            let plus = call(h, operators::ADD, None, vec![accu, one]);
            let accu = ident(h, RESULT);
            let step = call(h, operators::CONDITIONAL, None, vec![body, plus, accu]);
            let accu = ident(h, RESULT);
            let one = int_lit(h, 1);
            let result = call(h, operators::EQUALS, None, vec![accu, one]);
            (init, cond, step, result)
        }
        Fold::List | Fold::Map | Fold::MapEntry => {
            let init = if matches!(kind, Fold::List) {
                h.next_expr(Expr::List(ListExpr::new(vec![])))
            } else {
                h.next_expr(Expr::Map(MapExpr::default()))
            };
            let cond = bool_lit(h, true);
            let accu = ident(h, RESULT);
            let step = match kind {
                Fold::List => {
                    let item = h.next_expr(Expr::List(ListExpr::new(vec![body])));
                    call(h, operators::ADD, None, vec![accu, item])
                }
                Fold::Map => {
                    let key = ident(h, &k);
                    call(h, "@mapInsert", None, vec![accu, key, body])
                }
                _ => call(h, "@mapMerge", None, vec![accu, body]),
            };
            let step = match filter {
                Some(filter) => {
                    let accu = ident(h, RESULT);
                    call(h, operators::CONDITIONAL, None, vec![filter, step, accu])
                }
                None => step,
            };
            (init, cond, step, ident(h, RESULT))
        }
    };
    let keys_of = ident(h, TARGET);
    let keys = call(h, "@keys", None, vec![keys_of]);
    let fold = h.next_expr(Expr::Comprehension(Box::new(ComprehensionExpr {
        iter_range: keys,
        iter_var: k.clone(),
        iter_var2: None,
        accu_var: RESULT.to_string(),
        accu_init: init,
        loop_cond: cond,
        loop_step: step,
        result,
    })));
    Ok(Some(bind(h, TARGET.to_string(), range, fold)))
}

/// `cel.bind(name, init, body)` as a comprehension over an empty list, as cel-go expands it.
fn bind(h: &mut MacroExprHelper<'_>, name: String, init: IdedExpr, body: IdedExpr) -> IdedExpr {
    let range = h.next_expr(Expr::List(ListExpr::new(vec![])));
    let cond = bool_lit(h, false);
    let step = ident(h, &name);
    h.next_expr(Expr::Comprehension(Box::new(ComprehensionExpr {
        iter_range: range,
        iter_var: UNUSED.to_string(),
        iter_var2: None,
        accu_var: name,
        accu_init: init,
        loop_cond: cond,
        loop_step: step,
        result: body,
    })))
}

fn take_args<const N: usize>(
    h: &mut MacroExprHelper<'_>,
    args: &mut Vec<IdedExpr>,
) -> Result<[IdedExpr; N], ParseError> {
    <[IdedExpr; N]>::try_from(std::mem::take(args))
        .map_err(|_| h.new_error(0, "wrong number of arguments"))
}

fn take_target(
    h: &mut MacroExprHelper<'_>,
    target: &mut Option<IdedExpr>,
) -> Result<IdedExpr, ParseError> {
    target
        .take()
        .ok_or_else(|| h.new_error(0, "missing receiver"))
}

fn simple_name(h: &mut MacroExprHelper<'_>, e: IdedExpr, what: &str) -> Result<String, ParseError> {
    match e.expr {
        Expr::Ident(name) => Ok(name),
        _ => Err(h.new_error(
            e.id,
            format!("the variable of {what} must be a simple name"),
        )),
    }
}

fn call(
    h: &mut MacroExprHelper<'_>,
    name: &str,
    target: Option<IdedExpr>,
    args: Vec<IdedExpr>,
) -> IdedExpr {
    h.next_expr(Expr::Call(CallExpr {
        func_name: name.to_string(),
        target: target.map(Box::new),
        args,
    }))
}

fn ident(h: &mut MacroExprHelper<'_>, name: &str) -> IdedExpr {
    h.next_expr(Expr::Ident(name.to_string()))
}

fn bool_lit(h: &mut MacroExprHelper<'_>, b: bool) -> IdedExpr {
    h.next_expr(Expr::Literal(LiteralValue::Boolean(b.into())))
}

fn int_lit(h: &mut MacroExprHelper<'_>, i: i64) -> IdedExpr {
    h.next_expr(Expr::Literal(LiteralValue::Int(i.into())))
}
