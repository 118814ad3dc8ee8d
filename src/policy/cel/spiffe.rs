//! Cerbos's SPIFFE functions (`spiffe.go`, go-spiffe's `spiffeid` rules): `spiffeID(s)` with
//! `.path()`, `.trustDomain()`, `.isMemberOf(td)`; `spiffeTrustDomain(s)` with `.id()`,
//! `.name()`; matchers `spiffeMatchAny()`, `spiffeMatchExact(id)`, `spiffeMatchOneOf(ids)`,
//! `spiffeMatchTrustDomain(td)` with `.matchesID(id)`.

use std::any::Any;

use cel::common::types::{CelString, LIST_TYPE, STRING_TYPE, Type};
use cel::common::value::{CowVal, StaticVal, Val};
use cel::{DeclarationError, Env, ExecutionError};

use super::args::{Args, Ret, boolean, elements, string, take};

pub(super) static ID_TYPE: Type = Type::new_unspecified_type("cerbos.lib.spiffeID");
pub(super) static TD_TYPE: Type = Type::new_unspecified_type("cerbos.lib.spiffeTrustDomain");
pub(super) static MATCHER_TYPE: Type = Type::new_unspecified_type("cerbos.lib.spiffeMatcher");

/// A SPIFFE ID: its trust domain and path (empty, or `/seg/...`).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct SpiffeId {
    td: String,
    path: String,
}

/// A trust domain name.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct TrustDomain(String);

/// What a matcher accepts.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Matcher {
    Any,
    OneOf(Vec<SpiffeId>),
    MemberOf(TrustDomain),
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spiffe://{}{}", self.td, self.path)
    }
}

impl std::fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Val for SpiffeId {
    fn get_type(&self) -> &Type {
        &ID_TYPE
    }
    fn cel_type() -> &'static Type {
        &ID_TYPE
    }
    /// Equal to the same ID, or to its string form.
    fn equals(&self, other: &dyn Val) -> bool {
        if let Some(s) = other.downcast_ref::<CelString>() {
            return self.to_string() == s.inner();
        }
        other.downcast_ref::<SpiffeId>().is_some_and(|o| o == self)
    }
    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> Option<&dyn Any> {
        Some(self)
    }
}

impl Val for TrustDomain {
    fn get_type(&self) -> &Type {
        &TD_TYPE
    }
    fn cel_type() -> &'static Type {
        &TD_TYPE
    }
    /// Equal to the same trust domain, or to a string naming it.
    fn equals(&self, other: &dyn Val) -> bool {
        if let Some(s) = other.downcast_ref::<CelString>() {
            return parse_td(s.inner()).is_ok_and(|td| td == *self);
        }
        other
            .downcast_ref::<TrustDomain>()
            .is_some_and(|o| o == self)
    }
    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> Option<&dyn Any> {
        Some(self)
    }
}

impl Val for Matcher {
    fn get_type(&self) -> &Type {
        &MATCHER_TYPE
    }
    fn cel_type() -> &'static Type {
        &MATCHER_TYPE
    }
    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> Option<&dyn Any> {
        Some(self)
    }
}

impl StaticVal for SpiffeId {}
impl StaticVal for TrustDomain {}
impl StaticVal for Matcher {}

pub(super) fn register(env: &mut Env) -> Result<(), DeclarationError> {
    let (id, td, m) = (
        || ID_TYPE.to_owned(),
        || TD_TYPE.to_owned(),
        || MATCHER_TYPE.to_owned(),
    );
    for t in [id(), td(), m()] {
        env.add_type(t)?;
    }
    env.add_overload("spiffeID", "spiffeID_string", vec![STRING_TYPE], spiffe_id)?;
    env.add_overload("spiffeID", "spiffeID_spiffeID", vec![id()], spiffe_id)?;
    env.add_overload(
        "spiffeTrustDomain",
        "spiffeTrustDomain_string",
        vec![STRING_TYPE],
        trust_domain,
    )?;
    env.add_overload(
        "spiffeTrustDomain",
        "spiffeTrustDomain_spiffeID",
        vec![id()],
        trust_domain,
    )?;
    env.add_overload(
        "spiffeTrustDomain",
        "spiffeTrustDomain_td",
        vec![td()],
        trust_domain,
    )?;
    env.add_overload("spiffeMatchAny", "spiffeMatchAny", vec![], match_any)?;
    env.add_overload(
        "spiffeMatchExact",
        "spiffeMatchExact_spiffeID",
        vec![id()],
        match_exact,
    )?;
    env.add_overload(
        "spiffeMatchExact",
        "spiffeMatchExact_string",
        vec![STRING_TYPE],
        match_exact,
    )?;
    env.add_overload(
        "spiffeMatchOneOf",
        "spiffeMatchOneOf_list",
        vec![LIST_TYPE],
        match_one_of,
    )?;
    env.add_overload(
        "spiffeMatchTrustDomain",
        "spiffeMatchTrustDomain_td",
        vec![td()],
        match_trust_domain,
    )?;
    env.add_overload(
        "spiffeMatchTrustDomain",
        "spiffeMatchTrustDomain_string",
        vec![STRING_TYPE],
        match_trust_domain,
    )?;
    env.add_member_overload(
        "isMemberOf",
        "spiffeID_isMemberOf",
        id(),
        vec![td()],
        is_member_of,
    )?;
    env.add_member_overload("path", "spiffeID_path", id(), vec![], path)?;
    env.add_member_overload(
        "trustDomain",
        "spiffeID_trustDomain",
        id(),
        vec![],
        trust_domain,
    )?;
    env.add_member_overload("id", "spiffeTrustDomain_id", td(), vec![], td_id)?;
    env.add_member_overload("name", "spiffeTrustDomain_name", td(), vec![], td_name)?;
    env.add_member_overload(
        "matchesID",
        "matchesID_spiffeID",
        m(),
        vec![id()],
        matches_id,
    )?;
    env.add_member_overload(
        "matchesID",
        "matchesID_string",
        m(),
        vec![STRING_TYPE],
        matches_id,
    )?;
    env.add_overload("string", "spiffeID_to_string", vec![id()], to_string)?;
    env.add_overload(
        "string",
        "spiffeTrustDomain_to_string",
        vec![td()],
        to_string,
    )?;
    Ok(())
}

fn err(message: String) -> ExecutionError {
    ExecutionError::function_error("spiffe", message)
}

fn td_chars_ok(td: &str) -> bool {
    td.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

/// go-spiffe `spiffeid.FromString`.
pub(super) fn parse_id(s: &str) -> Result<SpiffeId, String> {
    if s.is_empty() {
        return Err("failed to parse SPIFFE ID: cannot be empty".to_string());
    }
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return Err("failed to parse SPIFFE ID: scheme is missing or invalid".to_string());
    };
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if td.is_empty() {
        return Err("failed to parse SPIFFE ID: trust domain is missing".to_string());
    }
    if !td_chars_ok(td) {
        return Err("failed to parse SPIFFE ID: trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores".to_string());
    }
    validate_path(path).map_err(|e| format!("failed to parse SPIFFE ID: {e}"))?;
    Ok(SpiffeId {
        td: td.to_string(),
        path: path.to_string(),
    })
}

fn validate_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err("path cannot have a trailing slash");
    }
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err("path cannot contain empty segments");
        }
        if segment == "." || segment == ".." {
            return Err("path cannot contain dot segments");
        }
        let ok = segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !ok {
            return Err(
                "path segment characters are limited to letters, numbers, dots, dashes, and underscores",
            );
        }
    }
    Ok(())
}

/// go-spiffe `spiffeid.TrustDomainFromString`: a name, or a SPIFFE ID.
fn parse_td(s: &str) -> Result<TrustDomain, String> {
    if s.contains(":/") {
        return parse_id(s).map(|id| TrustDomain(id.td));
    }
    if s.is_empty() {
        return Err("failed to parse SPIFFE trust domain: trust domain is missing".to_string());
    }
    if !td_chars_ok(s) {
        return Err("failed to parse SPIFFE trust domain: trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores".to_string());
    }
    Ok(TrustDomain(s.to_string()))
}

fn id_of(v: &dyn Val) -> Result<SpiffeId, ExecutionError> {
    if let Some(id) = v.downcast_ref::<SpiffeId>() {
        return Ok(id.clone());
    }
    parse_id(string(v, "spiffeID")?).map_err(err)
}

fn td_of(v: &dyn Val) -> Result<TrustDomain, ExecutionError> {
    if let Some(td) = v.downcast_ref::<TrustDomain>() {
        return Ok(td.clone());
    }
    if let Some(id) = v.downcast_ref::<SpiffeId>() {
        return Ok(TrustDomain(id.td.clone()));
    }
    parse_td(string(v, "spiffeTrustDomain")?).map_err(err)
}

fn spiffe_id<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s] = take(args)?;
    Ok(CowVal::owned(id_of(s.as_ref())?))
}

fn trust_domain<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s] = take(args)?;
    Ok(CowVal::owned(td_of(s.as_ref())?))
}

fn match_any<'b, 'v>(_args: Args<'b, 'v>) -> Ret<'b, 'v> {
    Ok(CowVal::owned(Matcher::Any))
}

fn match_exact<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [id] = take(args)?;
    Ok(CowVal::owned(Matcher::OneOf(vec![id_of(id.as_ref())?])))
}

fn match_one_of<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [list] = take(args)?;
    let ids = elements(list.as_ref(), "spiffeMatchOneOf")?
        .into_iter()
        .map(id_of)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CowVal::owned(Matcher::OneOf(ids)))
}

fn match_trust_domain<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [td] = take(args)?;
    Ok(CowVal::owned(Matcher::MemberOf(td_of(td.as_ref())?)))
}

fn is_member_of<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [id, td] = take(args)?;
    Ok(boolean(id_of(id.as_ref())?.td == td_of(td.as_ref())?.0))
}

fn path<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [id] = take(args)?;
    Ok(CowVal::owned(CelString::from(id_of(id.as_ref())?.path)))
}

fn td_id<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [td] = take(args)?;
    Ok(CowVal::owned(CelString::from(format!(
        "spiffe://{}",
        td_of(td.as_ref())?.0
    ))))
}

fn td_name<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [td] = take(args)?;
    Ok(CowVal::owned(CelString::from(td_of(td.as_ref())?.0)))
}

fn matches_id<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [m, id] = take(args)?;
    let m = m
        .downcast_ref::<Matcher>()
        .ok_or_else(|| err("expected a SPIFFE matcher".to_string()))?;
    let id = match id.downcast_ref::<CelString>() {
        Some(s) => parse_id(s.inner()).map_err(|e| err(format!("invalid SPIFFE ID: {e}")))?,
        None => id_of(id.as_ref())?,
    };
    Ok(boolean(match m {
        Matcher::Any => true,
        Matcher::OneOf(ids) => ids.contains(&id),
        Matcher::MemberOf(td) => id.td == td.0,
    }))
}

fn to_string<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [x] = take(args)?;
    let s = if let Some(id) = x.downcast_ref::<SpiffeId>() {
        id.to_string()
    } else {
        td_of(x.as_ref())?.to_string()
    };
    Ok(CowVal::owned(CelString::from(s)))
}
