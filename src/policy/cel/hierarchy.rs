//! Cerbos's `hierarchy` type (`cerbos.lib.hierarchy`): a dotted path such as `a.b.c`, with
//! `ancestorOf`, `descendentOf`, `immediateChildOf`, `immediateParentOf`, `siblingOf`,
//! `overlaps`, `commonAncestors`, `size()`, `h[i]` and `==`, as in Cerbos's `hierarchy.go`.

use std::any::Any;

use cel::common::functions::Function;
use cel::common::traits::{Indexer, Sizer};
use cel::common::types::{CelInt, CelString, LIST_TYPE, STRING_TYPE, Type};
use cel::common::value::{CowVal, StaticVal, Val};
use cel::{DeclarationError, Env, ExecutionError};

use super::args::{Args, Ret, boolean, string, strings, take};

pub(super) static HIERARCHY_TYPE: Type = Type::new_unspecified_type("cerbos.lib.hierarchy");

/// A hierarchy: its segments.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Hierarchy(Vec<String>);

impl std::fmt::Display for Hierarchy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

impl Val for Hierarchy {
    fn get_type(&self) -> &Type {
        &HIERARCHY_TYPE
    }
    fn cel_type() -> &'static Type {
        &HIERARCHY_TYPE
    }
    fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
    where
        Self: 'v,
    {
        Some(self)
    }
    fn as_sizer(&self) -> Option<&dyn Sizer> {
        Some(self)
    }
    fn equals(&self, other: &dyn Val) -> bool {
        other.downcast_ref::<Hierarchy>().is_some_and(|o| o == self)
    }
    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> Option<&dyn Any> {
        Some(self)
    }
}

impl StaticVal for Hierarchy {}

impl Sizer for Hierarchy {
    fn size(&self) -> CelInt {
        CelInt::from(i64::try_from(self.0.len()).unwrap_or(i64::MAX))
    }
}

impl Indexer for Hierarchy {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        let Some(i) = idx.downcast_ref::<CelInt>() else {
            return Err(ExecutionError::function_error(
                "hierarchy",
                format!("unsupported index type '{}'", idx.get_type().name()),
            ));
        };
        usize::try_from(*i.inner())
            .ok()
            .and_then(|i| self.0.get(i))
            .map(|s| CowVal::owned(CelString::from(s.clone())))
            .ok_or_else(|| ExecutionError::function_error("hierarchy", "index out of range"))
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

pub(super) fn register(env: &mut Env) -> Result<(), DeclarationError> {
    env.add_type(HIERARCHY_TYPE.to_owned())?;
    let h = || HIERARCHY_TYPE.to_owned();
    env.add_overload(
        "hierarchy",
        "hierarchy_string",
        vec![STRING_TYPE],
        from_string,
    )?;
    env.add_overload(
        "hierarchy",
        "hierarchy_string_string",
        vec![STRING_TYPE, STRING_TYPE],
        from_string_delim,
    )?;
    env.add_overload(
        "hierarchy",
        "hierarchy_stringarray",
        vec![LIST_TYPE],
        from_list,
    )?;
    env.add_overload("hierarchy", "hierarchy_hierarchy", vec![h()], same)?;
    env.add_overload("size", "size_hierarchy", vec![h()], size)?;
    env.add_member_overload("size", "hierarchy_size", h(), vec![], size)?;
    let methods: [(&str, Function); 7] = [
        ("ancestorOf", ancestor_of),
        ("commonAncestors", common_ancestors),
        ("descendentOf", descendent_of),
        ("immediateChildOf", immediate_child_of),
        ("immediateParentOf", immediate_parent_of),
        ("overlaps", overlaps),
        ("siblingOf", sibling_of),
    ];
    for (name, f) in methods {
        env.add_member_overload(name, &format!("hierarchy_{name}"), h(), vec![h()], f)?;
    }
    Ok(())
}

fn from_string<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s] = take(args)?;
    let s = string(s.as_ref(), "hierarchy")?;
    Ok(CowVal::owned(split(s, ".")))
}

fn from_string_delim<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s, delim] = take(args)?;
    let s = string(s.as_ref(), "hierarchy")?;
    let delim = string(delim.as_ref(), "hierarchy")?;
    Ok(CowVal::owned(split(s, delim)))
}

/// Go's `strings.Split`: an empty separator splits into characters.
fn split(s: &str, delim: &str) -> Hierarchy {
    if delim.is_empty() {
        return Hierarchy(s.chars().map(String::from).collect());
    }
    Hierarchy(s.split(delim).map(String::from).collect())
}

fn from_list<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [list] = take(args)?;
    let segments = strings(list.as_ref(), "hierarchy").map_err(|_| {
        ExecutionError::function_error("hierarchy", "failed to convert list to string slice")
    })?;
    Ok(CowVal::owned(Hierarchy(
        segments.into_iter().map(String::from).collect(),
    )))
}

fn same<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [h] = take(args)?;
    Ok(h)
}

fn size<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [h] = take(args)?;
    Ok(CowVal::owned(hierarchy(&h)?.size()))
}

fn hierarchy<'x>(v: &'x CowVal<'_, '_>) -> Result<&'x Hierarchy, ExecutionError> {
    v.downcast_ref::<Hierarchy>()
        .ok_or_else(|| ExecutionError::function_error("hierarchy", "expected a hierarchy"))
}

/// Applies a relation between two hierarchies.
fn relation<'b, 'v>(args: Args<'b, 'v>, f: fn(&[String], &[String]) -> bool) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    Ok(boolean(f(&hierarchy(&a)?.0, &hierarchy(&b)?.0)))
}

/// `a` is a strict prefix of `b`.
fn is_ancestor(a: &[String], b: &[String]) -> bool {
    b.len() > a.len() && b.starts_with(a)
}

fn is_parent(a: &[String], b: &[String]) -> bool {
    b.len() == a.len() + 1 && b.starts_with(a)
}

fn ancestor_of<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    relation(args, is_ancestor)
}

fn descendent_of<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    relation(args, |a, b| is_ancestor(b, a))
}

fn immediate_parent_of<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    relation(args, is_parent)
}

fn immediate_child_of<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    relation(args, |a, b| is_parent(b, a))
}

/// Same length, and the same up to the last segment.
fn sibling_of<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    relation(args, |a, b| {
        a.len() == b.len() && a[..a.len().saturating_sub(1)] == b[..b.len().saturating_sub(1)]
    })
}

/// One is a prefix of the other.
fn overlaps<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    relation(args, |a, b| a.starts_with(b) || b.starts_with(a))
}

/// The longest common prefix; for two hierarchies of the same length, excluding the last
/// segment (so a hierarchy is not its own ancestor).
fn common_ancestors<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [a, b] = take(args)?;
    let (mut a, mut b) = (hierarchy(&a)?.0.as_slice(), hierarchy(&b)?.0.as_slice());
    if a.len() == b.len() {
        a = &a[..a.len().saturating_sub(1)];
        b = &b[..b.len().saturating_sub(1)];
    }
    let common = a
        .iter()
        .zip(b)
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.clone())
        .collect();
    Ok(CowVal::owned(Hierarchy(common)))
}
