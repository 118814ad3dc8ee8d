//! The small helpers every CEL extension function shares: its arguments as an array, a
//! string, list or boolean argument read with an error that names the function. Kept apart
//! from the function library ([`super::funcs`]) so the extension modules need only this.

use cel::ExecutionError;
use cel::common::types::{CelBool, CelString};
use cel::common::value::{CowVal, Val};

pub(super) type Args<'b, 'v> = Vec<CowVal<'b, 'v>>;
pub(super) type Ret<'b, 'v> = Result<CowVal<'b, 'v>, ExecutionError>;

/// The arguments of an overload as an array (the interpreter checked the count).
pub(super) fn take<'b, 'v, const N: usize>(
    args: Args<'b, 'v>,
) -> Result<[CowVal<'b, 'v>; N], ExecutionError> {
    <[CowVal<'b, 'v>; N]>::try_from(args)
        .map_err(|a: Vec<_>| ExecutionError::invalid_argument_count(N, a.len()))
}

/// A string argument.
pub(super) fn string<'x>(v: &'x dyn Val, function: &str) -> Result<&'x str, ExecutionError> {
    v.downcast_ref::<CelString>()
        .map(|s| s.inner())
        .ok_or_else(|| {
            ExecutionError::function_error(
                function,
                format!("expected a string, got {}", v.get_type().name()),
            )
        })
}

/// The elements of a list (or the keys of a map), borrowed.
pub(super) fn elements<'x, 'v>(
    v: &'x (dyn Val + 'v),
    function: &str,
) -> Result<Vec<&'x (dyn Val + 'v)>, ExecutionError> {
    let mut it = v
        .as_iterable()
        .ok_or_else(|| {
            ExecutionError::function_error(
                function,
                format!("expected a list, got {}", v.get_type().name()),
            )
        })?
        .iter();
    let mut out = Vec::new();
    while let Some(x) = it.next() {
        out.push(x);
    }
    Ok(out)
}

/// The strings of a list of strings.
pub(super) fn strings<'x>(v: &'x dyn Val, function: &str) -> Result<Vec<&'x str>, ExecutionError> {
    elements(v, function)?
        .into_iter()
        .map(|x| string(x, function))
        .collect()
}

pub(super) fn boolean<'b, 'v>(b: bool) -> CowVal<'b, 'v> {
    CowVal::owned(CelBool::from(b))
}
