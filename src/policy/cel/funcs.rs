//! Function overloads: our internal helpers (`@tick`, `@utc`, `@timeSince`, `@keys`, ...) and
//! Cerbos's list functions (`intersect`, `except`, `hasIntersection`, `isSubset`, `id`), cel-go's
//! ext.Sets and `json.encode`. The typed libraries live in their own modules.

use std::collections::HashSet;

use cel::common::functions::Function;
use cel::common::types::{
    CelBool, CelInt, CelList, CelMap, CelMapKey, CelOptional, CelString, CelTimestamp, DYN_TYPE,
    INT_TYPE, Kind, LIST_TYPE, MAP_TYPE, TIMESTAMP_TYPE,
};
use cel::common::value::{CowVal, Val};
use cel::{DeclarationError, Env, ExecutionError};

use super::args::{Args, Ret, boolean, elements, string, take};
use super::scope::{charge, internal_error};
use super::views::cel_equal;

/// Registers every function of ours on `env`.
pub(super) fn register(env: &mut Env) -> Result<(), DeclarationError> {
    env.add_overload("@tick", "@tick", vec![DYN_TYPE], tick)?;
    env.add_overload("@utc", "@utc", vec![DYN_TYPE], utc)?;
    env.add_overload(
        "@timeSince",
        "@timeSince",
        vec![TIMESTAMP_TYPE, TIMESTAMP_TYPE],
        time_since,
    )?;
    env.add_overload("@keys", "@keys", vec![DYN_TYPE], keys)?;
    env.add_overload(
        "@mapInsert",
        "@mapInsert",
        vec![MAP_TYPE, DYN_TYPE, DYN_TYPE],
        map_insert,
    )?;
    env.add_overload(
        "@mapMerge",
        "@mapMerge",
        vec![MAP_TYPE, MAP_TYPE],
        map_merge,
    )?;
    env.add_overload("@range", "@range", vec![INT_TYPE], range)?;
    env.add_overload("@has", "@has", vec![DYN_TYPE, DYN_TYPE], has_field)?;
    env.add_overload("@eq", "@eq", vec![DYN_TYPE, DYN_TYPE], equal)?;
    env.add_overload("@ne", "@ne", vec![DYN_TYPE, DYN_TYPE], not_equal)?;
    env.add_overload("@in_any", "@in_any", vec![DYN_TYPE, DYN_TYPE], in_any)?;
    env.add_overload("id", "id_dyn", vec![DYN_TYPE], identity)?;
    let list_functions: [(&str, Function); 6] = [
        ("intersect", intersect),
        ("except", except),
        ("hasIntersection", has_intersection),
        ("has_intersection", has_intersection),
        ("isSubset", is_subset),
        ("is_subset", is_subset),
    ];
    for (name, f) in list_functions {
        env.add_overload(
            name,
            &format!("{name}_list_list"),
            vec![LIST_TYPE, LIST_TYPE],
            f,
        )?;
        env.add_member_overload(
            name,
            &format!("list_{name}_list"),
            LIST_TYPE,
            vec![LIST_TYPE],
            f,
        )?;
    }
    let sets: [(&str, Function); 3] = [
        ("sets.contains", sets_contains),
        ("sets.equivalent", sets_equivalent),
        ("sets.intersects", has_intersection),
    ];
    for (name, f) in sets {
        env.add_overload(name, name, vec![LIST_TYPE, LIST_TYPE], f)?;
    }
    env.add_overload(
        "json.encode",
        "json_encode_dyn",
        vec![DYN_TYPE],
        json_encode,
    )?;
    super::hierarchy::register(env)?;
    super::network::register(env)?;
    super::paths::register(env)?;
    super::regex::register(env)?;
    super::spiffe::register(env)?;
    Ok(())
}

/// `has(x.f)` as cel-go evaluates it in Cerbos 0.55 (established with the binary): present
/// key → true, missing key → false, a scalar operand → false, a list operand → an error.
fn has_field<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [left, field] = take(args)?;
    let key: CelString = string(field.as_ref(), "has")?.into();
    let mut target: &dyn Val = left.as_ref();
    if let Some(opt) = target.downcast_ref::<CelOptional>() {
        match opt.inner() {
            Some(inner) => target = inner,
            None => return Ok(CowVal::owned(CelBool::from(false))),
        }
    }
    let present = match target.as_indexer() {
        Some(indexer) => match indexer.get(&key) {
            Ok(_) => true,
            Err(ExecutionError::NoSuchKey(_)) => false,
            Err(e) => return Err(e),
        },
        None => false,
    };
    Ok(CowVal::owned(CelBool::from(present)))
}

/// Charges the budget for `n` element comparisons.
fn charge_comparisons(n: usize) -> Result<(), ExecutionError> {
    charge(1 + u64::try_from(n / 16).unwrap_or(u64::MAX))
}

fn tick<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    charge(1)?;
    let [x] = take(args)?;
    Ok(x)
}

fn identity<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [x] = take(args)?;
    Ok(x)
}

/// `a == b` when either side may be a lazy view (see `views::cel_equal`).
fn equal<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    Ok(boolean(cel_equal(a.as_ref(), b.as_ref())))
}

fn not_equal<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    Ok(boolean(!cel_equal(a.as_ref(), b.as_ref())))
}

/// `x in c` when `x` may be a list or map (compared structurally).
fn in_any<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [x, c] = take(args)?;
    let structured = matches!(x.get_type().kind(), Kind::List | Kind::Map);
    if c.get_type().kind() == Kind::List && structured {
        let items = elements(c.as_ref(), "in")?;
        charge_comparisons(items.len())?;
        return Ok(boolean(items.iter().any(|e| cel_equal(*e, x.as_ref()))));
    }
    let container = c.as_container().ok_or_else(|| {
        ExecutionError::no_such_overload(
            "@in",
            vec![
                x.get_type().name().to_string(),
                c.get_type().name().to_string(),
            ],
        )
    })?;
    Ok(boolean(container.contains(x.as_ref())?))
}

/// `lists.range(n)`: `[0, 1, ..., n-1]`, charged to the budget (at most 1,000,000, as cel-go).
fn range<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [n] = take(args)?;
    let n = n.downcast_ref::<CelInt>().map_or(0, |n| *n.inner());
    if n > 1_000_000 {
        return Err(ExecutionError::function_error(
            "lists.range",
            format!("size {n} exceeds maximum allowed (1000000)"),
        ));
    }
    charge(1 + u64::try_from(n / 16).unwrap_or(0))?;
    let items = (0..n.max(0))
        .map(|i| Box::new(CelInt::from(i)) as Box<dyn Val + 'v>)
        .collect::<Vec<_>>();
    Ok(CowVal::owned(CelList::from(items)))
}

/// A timestamp in UTC (what cel-go's zero-argument getters read); anything else unchanged.
fn utc<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [x] = take(args)?;
    match x.downcast_ref::<CelTimestamp>() {
        Some(t) => Ok(CowVal::owned(CelTimestamp::from(
            t.inner().with_timezone(&chrono::Utc).fixed_offset(),
        ))),
        None => Ok(x),
    }
}

/// `timeSince(t)`: `now - t`.
fn time_since<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [now, t] = take(args)?;
    let sub = now
        .as_subtractor()
        .ok_or_else(|| ExecutionError::function_error("timeSince", "no subtraction"))?;
    Ok(CowVal::Owned(sub.sub(t.as_ref())?.into_owned()))
}

/// The loop keys of a two-variable comprehension: a list's indexes, a map's keys.
fn keys<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [x] = take(args)?;
    let items: Vec<Box<dyn Val + 'v>> = match x.get_type().kind() {
        Kind::List => {
            let n = x.as_sizer().map_or(0, |s| *s.size().inner());
            (0..n)
                .map(|i| Box::new(CelInt::from(i)) as Box<dyn Val + 'v>)
                .collect()
        }
        Kind::Map => elements(x.as_ref(), "comprehension")?
            .into_iter()
            .map(|k| k.clone_as_boxed())
            .collect(),
        _ => {
            return Err(ExecutionError::function_error(
                "comprehension",
                format!("cannot iterate over a {}", x.get_type().name()),
            ));
        }
    };
    Ok(CowVal::owned(CelList::from(items)))
}

fn entries<'x, 'v>(m: &'x (dyn Val + 'v)) -> Result<&'x CelMap<'v>, ExecutionError> {
    m.downcast_ref::<CelMap>()
        .ok_or_else(|| internal_error(format!("expected a map, got {}", m.get_type().name())))
}

/// `transformMap`'s step: the accumulator with one more entry.
fn map_insert<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [m, k, v] = take(args)?;
    let mut map = entries(m.as_ref())?.inner().clone();
    charge(1 + u64::try_from(map.len() / 4).unwrap_or(u64::MAX))?;
    map.insert(CelMapKey::try_from(k)?, v.into_owned());
    Ok(CowVal::owned(CelMap::from(map)))
}

/// `transformMapEntry`'s step: the accumulator with the entries of one more map; a key
/// produced twice is an error, as in cel-go.
fn map_merge<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [m, more] = take(args)?;
    let mut map = entries(m.as_ref())?.inner().clone();
    let keys = elements(more.as_ref(), "transformMapEntry")?;
    let indexer = more
        .as_indexer()
        .ok_or_else(|| internal_error("transformMapEntry: expected a map"))?;
    charge(1 + u64::try_from((map.len() + keys.len()) / 4).unwrap_or(u64::MAX))?;
    for k in keys {
        let key = CelMapKey::try_from(k.clone_as_boxed())?;
        if map.contains_key(&key) {
            return Err(internal_error(format!(
                "insert failed: key {} already exists",
                key_text(&key)
            )));
        }
        let value = indexer.get(k)?.into_owned();
        map.insert(key, value);
    }
    Ok(CowVal::owned(CelMap::from(map)))
}

fn key_text(k: &CelMapKey<'_>) -> String {
    match k {
        CelMapKey::String(s) => format!("{:?}", s.inner()),
        CelMapKey::Int(i) => i.inner().to_string(),
        CelMapKey::UInt(u) => format!("{}u", u.inner()),
        CelMapKey::Bool(b) => b.inner().to_string(),
    }
}

/// The elements of a list, for membership tests: hashed when they are all strings.
struct Members<'x, 'v> {
    items: Vec<&'x (dyn Val + 'v)>,
    strings: Option<HashSet<&'x str>>,
}

impl<'x, 'v> Members<'x, 'v> {
    fn new(items: Vec<&'x (dyn Val + 'v)>) -> Result<Self, ExecutionError> {
        charge_comparisons(items.len())?;
        let strings = if items.len() > 8 {
            items
                .iter()
                .map(|x| x.downcast_ref::<CelString>().map(|s| s.inner()))
                .collect::<Option<HashSet<_>>>()
        } else {
            None
        };
        Ok(Members { items, strings })
    }

    /// Whether `v` equals an element (CEL equality: `1 == 1.0`).
    fn contains(&self, v: &dyn Val) -> Result<bool, ExecutionError> {
        if let Some(set) = &self.strings {
            return Ok(v
                .downcast_ref::<CelString>()
                .is_some_and(|s| set.contains(s.inner())));
        }
        charge_comparisons(self.items.len())?;
        Ok(self.items.iter().any(|x| cel_equal(*x, v)))
    }
}

/// Cerbos `intersect`: the elements of the shorter list (the left one on a tie) found in the
/// other, in order, duplicates kept.
fn intersect<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    let (a, b) = (
        elements(a.as_ref(), "intersect")?,
        elements(b.as_ref(), "intersect")?,
    );
    let (short, long) = if a.len() > b.len() { (b, a) } else { (a, b) };
    let long = Members::new(long)?;
    let mut out = Vec::new();
    for x in short {
        if long.contains(x)? {
            out.push(x.clone_as_boxed());
        }
    }
    Ok(CowVal::owned(CelList::from(out)))
}

/// Cerbos `except`: the elements of the left list not in the right one.
fn except<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    let (a, b) = (
        elements(a.as_ref(), "except")?,
        elements(b.as_ref(), "except")?,
    );
    let b = Members::new(b)?;
    let mut out = Vec::new();
    for x in a {
        if !b.contains(x)? {
            out.push(x.clone_as_boxed());
        }
    }
    Ok(CowVal::owned(CelList::from(out)))
}

/// Whether every element of `a` is in `b`.
fn subset(a: &dyn Val, b: &dyn Val, function: &str) -> Result<bool, ExecutionError> {
    let b = Members::new(elements(b, function)?)?;
    for x in elements(a, function)? {
        if !b.contains(x)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `hasIntersection(a, b)`, `sets.intersects(a, b)`.
fn has_intersection<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    let (a, b) = (
        elements(a.as_ref(), "hasIntersection")?,
        elements(b.as_ref(), "hasIntersection")?,
    );
    let (short, long) = if a.len() > b.len() { (b, a) } else { (a, b) };
    let long = Members::new(long)?;
    for x in short {
        if long.contains(x)? {
            return Ok(boolean(true));
        }
    }
    Ok(boolean(false))
}

/// Cerbos `a.isSubset(b)`: every element of `a` is in `b`.
fn is_subset<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    Ok(boolean(subset(a.as_ref(), b.as_ref(), "isSubset")?))
}

/// `sets.contains(a, b)`: every element of `b` is in `a`.
fn sets_contains<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    Ok(boolean(subset(b.as_ref(), a.as_ref(), "sets.contains")?))
}

/// `sets.equivalent(a, b)`: the same elements, duplicates and order aside.
fn sets_equivalent<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    let (a, b) = (a.as_ref(), b.as_ref());
    Ok(boolean(
        subset(a, b, "sets.equivalent")? && subset(b, a, "sets.equivalent")?,
    ))
}

/// `json.encode(v)`: the JSON text of the value, as rule outputs render it.
fn json_encode<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [x] = take(args)?;
    let json = super::output::to_json(x.as_ref()).map_err(internal_error)?;
    let text = serde_json::to_string(&json).map_err(|e| internal_error(e.to_string()))?;
    Ok(CowVal::owned(CelString::from(text)))
}
