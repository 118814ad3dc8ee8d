//! Lazy CEL views of the request: JSON objects and arrays (`P.attr`, `R.attr`, globals,
//! constants, aux data), string lists (`P.roles`), the principal and the resource.
//!
//! A view converts only what an expression touches: `R.attr.owner` converts one string, not the
//! whole attribute map. Every JSON number is a `double`, as in Cerbos (attributes are
//! `google.protobuf.Value`). Iteration and `+` materialise one level, once. Views are not
//! built-in lists or maps to the interpreter, so equality and `in` involving them go through
//! [`cel_equal`], which compares any lists and maps structurally (`check.rs` routes `==`,
//! `!=` and `in` there whenever neither side is a scalar literal).

use std::sync::{Arc, OnceLock};

use cel::ExecutionError;
use cel::common::traits::{Adder, Container, Indexer, Iterable, Sizer, Zeroer};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelOptional, CelString, Kind,
    LIST_TYPE, MAP_TYPE, Type,
};
use cel::common::value::{CowVal, Val};
use serde_json::{Map, Value};

use crate::policy::input::{Principal, Resource};

/// `No such key: name`.
pub(super) fn no_such_key(name: &str) -> ExecutionError {
    ExecutionError::NoSuchKey(Arc::new(name.to_string()))
}

/// The CEL value of a JSON value: scalars converted (strings borrowed), containers as views.
pub(super) fn json_val<'a>(v: &'a Value) -> Box<dyn Val + 'a> {
    match v {
        Value::Null => Box::new(CelNull),
        Value::Bool(b) => Box::new(CelBool::from(*b)),
        Value::Number(n) => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        Value::String(s) => Box::new(CelString::from(s.as_str())),
        Value::Array(a) => Box::new(JList::from_src(a)),
        Value::Object(m) => Box::new(JMap::from_src(m)),
    }
}

/// The value at `path` (field names) below the object `m`, if every step is an object field.
pub(super) fn json_path<'a, 'p>(
    m: &'a Map<String, Value>,
    mut path: impl Iterator<Item = &'p str>,
) -> Option<Box<dyn Val + 'a>> {
    let mut v = m.get(path.next()?)?;
    for field in path {
        v = v.as_object()?.get(field)?;
    }
    Some(json_val(v))
}

fn map_of<'a>(m: &'a Map<String, Value>) -> CelMap<'a> {
    CelMap::from(
        m.iter()
            .map(|(k, v)| (CelMapKey::String(CelString::from(k.as_str())), json_val(v)))
            .collect::<std::collections::HashMap<_, _>>(),
    )
}

/// Deepest structure compared (JSON input is at most 128 deep).
const MAX_EQUAL_DEPTH: usize = 256;

/// CEL equality (`==`), for any values: lists and maps, built-in or views, compare by
/// their elements; the rest as the values define it (`1 == 1.0`, `1 != "1"`).
pub(super) fn cel_equal(a: &dyn Val, b: &dyn Val) -> bool {
    equal_at(a, b, 0)
}

fn equal_at(a: &dyn Val, b: &dyn Val, depth: usize) -> bool {
    if depth > MAX_EQUAL_DEPTH {
        return false;
    }
    match (a.get_type().kind(), b.get_type().kind()) {
        (Kind::List, Kind::List) => {
            let (Some(sa), Some(sb)) = (a.as_sizer(), b.as_sizer()) else {
                return false;
            };
            let (Some(ia), Some(ib)) = (a.as_iterable(), b.as_iterable()) else {
                return false;
            };
            if sa.size() != sb.size() {
                return false;
            }
            let (mut x, mut y) = (ia.iter(), ib.iter());
            loop {
                match (x.next(), y.next()) {
                    (Some(p), Some(q)) if equal_at(p, q, depth + 1) => {}
                    (None, None) => return true,
                    _ => return false,
                }
            }
        }
        (Kind::Map, Kind::Map) => {
            let (Some(sa), Some(sb)) = (a.as_sizer(), b.as_sizer()) else {
                return false;
            };
            let (Some(ka), Some(ga), Some(gb)) = (a.as_iterable(), a.as_indexer(), b.as_indexer())
            else {
                return false;
            };
            if sa.size() != sb.size() {
                return false;
            }
            let mut keys = ka.iter();
            while let Some(k) = keys.next() {
                match (ga.get(k), gb.get(k)) {
                    (Ok(x), Ok(y)) if equal_at(x.as_ref(), y.as_ref(), depth + 1) => {}
                    _ => return false,
                }
            }
            true
        }
        (Kind::List | Kind::Map, _) | (_, Kind::List | Kind::Map) => false,
        _ => {
            if let (Some(x), Some(y)) = (
                a.downcast_ref::<CelOptional>(),
                b.downcast_ref::<CelOptional>(),
            ) {
                return match (x.option(), y.option()) {
                    (Some(p), Some(q)) => equal_at(p, q, depth + 1),
                    (None, None) => true,
                    _ => false,
                };
            }
            a.equals(b)
        }
    }
}

/// Implements `Val` for a view over a list or map: iteration and `+` come from its
/// materialised form, `self.full()`.
macro_rules! container_val {
    ($view:ident, $ty:expr) => {
        impl<'a> Val for $view<'a> {
            fn get_type(&self) -> &Type {
                &$ty
            }
            fn cel_type() -> &'static Type {
                &$ty
            }
            fn as_adder<'b, 'v>(&'b self) -> Option<&'b (dyn Adder + 'v)>
            where
                Self: 'v,
            {
                self.full().as_adder()
            }
            fn as_container(&self) -> Option<&dyn Container> {
                Some(self)
            }
            fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
            where
                Self: 'v,
            {
                Some(self)
            }
            fn as_iterable<'b, 'v>(&'b self) -> Option<&'b (dyn Iterable + 'v)>
            where
                Self: 'v,
            {
                Some(self.full())
            }
            fn as_sizer(&self) -> Option<&dyn Sizer> {
                Some(self)
            }
            fn as_zeroer(&self) -> Option<&dyn Zeroer> {
                Some(self)
            }
            fn equals(&self, other: &dyn Val) -> bool {
                cel_equal(self, other)
            }
            fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
            where
                Self: 'v,
            {
                Box::new(Self::from_src(self.src))
            }
        }

        impl std::fmt::Debug for $view<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({} entries)", stringify!($view), self.src.len())
            }
        }

        impl Sizer for $view<'_> {
            fn size(&self) -> CelInt {
                CelInt::from(i64::try_from(self.src.len()).unwrap_or(i64::MAX))
            }
        }

        impl Zeroer for $view<'_> {
            fn is_zero_value(&self) -> bool {
                self.src.is_empty()
            }
        }
    };
}

/// A JSON object as a CEL `map(string, dyn)`.
pub(super) struct JMap<'a> {
    src: &'a Map<String, Value>,
    full: OnceLock<CelMap<'a>>,
}

impl<'a> JMap<'a> {
    pub(super) fn new(src: &'a Map<String, Value>) -> Self {
        Self::from_src(src)
    }

    fn from_src(src: &'a Map<String, Value>) -> Self {
        JMap {
            src,
            full: OnceLock::new(),
        }
    }

    pub(super) fn src(&self) -> &'a Map<String, Value> {
        self.src
    }

    fn full(&self) -> &CelMap<'a> {
        self.full.get_or_init(|| map_of(self.src))
    }
}

container_val!(JMap, MAP_TYPE);

impl Indexer for JMap<'_> {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        if let Some(full) = self.full.get() {
            return full.get(idx);
        }
        match idx.downcast_ref::<CelString>() {
            Some(key) => match self.src.get(key.inner()) {
                Some(v) => Ok(CowVal::Owned(json_val(v))),
                None => Err(no_such_key(key.inner())),
            },
            // Other key types: exactly as a built-in map answers.
            None => self.full().get(idx),
        }
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

impl Container for JMap<'_> {
    fn contains(&self, value: &dyn Val) -> Result<bool, ExecutionError> {
        match value.downcast_ref::<CelString>() {
            Some(key) => Ok(self.src.contains_key(key.inner())),
            None => self.full().contains(value),
        }
    }
}

/// A JSON array as a CEL `list(dyn)`.
pub(super) struct JList<'a> {
    src: &'a [Value],
    full: OnceLock<CelList<'a>>,
}

impl<'a> JList<'a> {
    fn from_src(src: &'a [Value]) -> Self {
        JList {
            src,
            full: OnceLock::new(),
        }
    }

    fn full(&self) -> &CelList<'a> {
        self.full
            .get_or_init(|| CelList::from(self.src.iter().map(json_val).collect::<Vec<_>>()))
    }
}

container_val!(JList, LIST_TYPE);

impl Indexer for JList<'_> {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.full().get(idx)
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

impl Container for JList<'_> {
    /// `x in list`, comparing scalars in place rather than materialising the list.
    fn contains(&self, value: &dyn Val) -> Result<bool, ExecutionError> {
        if let Some(s) = value.downcast_ref::<CelString>() {
            let s = s.inner();
            return Ok(self.src.iter().any(|e| e.as_str() == Some(s)));
        }
        if matches!(
            value.get_type().kind(),
            Kind::Double | Kind::Int | Kind::UInt | Kind::Boolean
        ) {
            return Ok(self.src.iter().any(|e| match e {
                Value::Number(n) => CelDouble::from(n.as_f64().unwrap_or(f64::NAN)).equals(value),
                Value::Bool(b) => CelBool::from(*b).equals(value),
                _ => false,
            }));
        }
        let mut items = self.full().iter();
        while let Some(e) = items.next() {
            if cel_equal(e, value) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// A list of strings (`P.roles`, `runtime.effectiveDerivedRoles`) as a CEL `list(string)`.
pub(super) struct StrList<'a> {
    src: &'a [String],
    full: OnceLock<CelList<'a>>,
}

impl<'a> StrList<'a> {
    pub(super) fn new(src: &'a [String]) -> Self {
        Self::from_src(src)
    }

    fn from_src(src: &'a [String]) -> Self {
        StrList {
            src,
            full: OnceLock::new(),
        }
    }

    fn full(&self) -> &CelList<'a> {
        self.full.get_or_init(|| {
            CelList::from(
                self.src
                    .iter()
                    .map(|s| Box::new(CelString::from(s.as_str())) as Box<dyn Val + 'a>)
                    .collect::<Vec<_>>(),
            )
        })
    }
}

container_val!(StrList, LIST_TYPE);

impl Indexer for StrList<'_> {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.full().get(idx)
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

impl Container for StrList<'_> {
    fn contains(&self, value: &dyn Val) -> Result<bool, ExecutionError> {
        Ok(match value.downcast_ref::<CelString>() {
            Some(s) => self.src.iter().any(|e| e == s.inner()),
            None => false,
        })
    }
}

/// `request.auxData`: the aux data object, with an empty `jwt` when there is none.
pub(super) struct AuxView<'a> {
    src: &'a Map<String, Value>,
    full: OnceLock<CelMap<'a>>,
}

static EMPTY: OnceLock<Map<String, Value>> = OnceLock::new();

impl<'a> AuxView<'a> {
    pub(super) fn new(aux: &'a Value) -> Self {
        match aux {
            Value::Object(m) => Self::from_src(m),
            _ => Self::from_src(EMPTY.get_or_init(Map::new)),
        }
    }

    fn from_src(src: &'a Map<String, Value>) -> Self {
        AuxView {
            src,
            full: OnceLock::new(),
        }
    }

    pub(super) fn src(&self) -> &'a Map<String, Value> {
        self.src
    }

    fn full(&self) -> &CelMap<'a> {
        self.full.get_or_init(|| {
            let mut map = map_of(self.src).into_inner();
            // As in Cerbos, `jwt` and `jwts` are empty maps when absent, never errors.
            for key in ["jwt", "jwts"] {
                map.entry(CelMapKey::String(CelString::from(key)))
                    .or_insert_with(|| Box::new(CelMap::default()));
            }
            CelMap::from(map)
        })
    }
}

container_val!(AuxView, MAP_TYPE);

impl Indexer for AuxView<'_> {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.full().get(idx)
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

impl Container for AuxView<'_> {
    fn contains(&self, value: &dyn Val) -> Result<bool, ExecutionError> {
        self.full().contains(value)
    }
}

/// `P` / `request.principal`: a map of `id`, `roles`, `attr`, `policyVersion`, `scope`.
pub(super) struct PrincipalView<'a> {
    src: &'a Principal,
    roles: StrList<'a>,
    attr: JMap<'a>,
    full: OnceLock<CelMap<'a>>,
}

/// `R` / `request.resource`: a map of `kind`, `id`, `attr`, `policyVersion`, `scope`.
pub(super) struct ResourceView<'a> {
    src: &'a Resource,
    attr: JMap<'a>,
    full: OnceLock<CelMap<'a>>,
}

impl<'a> PrincipalView<'a> {
    pub(super) fn new(src: &'a Principal) -> Self {
        PrincipalView {
            src,
            roles: StrList::new(&src.roles),
            attr: JMap::new(&src.attr),
            full: OnceLock::new(),
        }
    }

    fn from_src(src: &'a Principal) -> Self {
        Self::new(src)
    }

    pub(super) fn attr(&self) -> &JMap<'a> {
        &self.attr
    }

    pub(super) fn roles(&self) -> &StrList<'a> {
        &self.roles
    }

    /// A field (`policy_version` as an alias), `None` if there is no such field.
    pub(super) fn field<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'a>> {
        let p = self.src;
        Some(match name {
            "id" => CowVal::owned(CelString::from(p.id.as_str())),
            "roles" => CowVal::Borrowed(&self.roles),
            "attr" => CowVal::Borrowed(&self.attr),
            "policyVersion" | "policy_version" => {
                CowVal::owned(CelString::from(p.policy_version.as_str()))
            }
            "scope" => CowVal::owned(CelString::from(p.scope.as_str())),
            _ => return None,
        })
    }

    fn full(&self) -> &CelMap<'a> {
        self.full.get_or_init(|| {
            record(["id", "roles", "attr", "policyVersion", "scope"], |f| {
                self.field(f)
            })
        })
    }
}

impl<'a> ResourceView<'a> {
    pub(super) fn new(src: &'a Resource) -> Self {
        ResourceView {
            src,
            attr: JMap::new(&src.attr),
            full: OnceLock::new(),
        }
    }

    fn from_src(src: &'a Resource) -> Self {
        Self::new(src)
    }

    pub(super) fn attr(&self) -> &JMap<'a> {
        &self.attr
    }

    /// A field (`policy_version` as an alias), `None` if there is no such field.
    pub(super) fn field<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'a>> {
        let r = self.src;
        Some(match name {
            "kind" => CowVal::owned(CelString::from(r.kind.as_str())),
            "id" => CowVal::owned(CelString::from(r.id.as_str())),
            "attr" => CowVal::Borrowed(&self.attr),
            "policyVersion" | "policy_version" => {
                CowVal::owned(CelString::from(r.policy_version.as_str()))
            }
            "scope" => CowVal::owned(CelString::from(r.scope.as_str())),
            _ => return None,
        })
    }

    fn full(&self) -> &CelMap<'a> {
        self.full.get_or_init(|| {
            record(["kind", "id", "attr", "policyVersion", "scope"], |f| {
                self.field(f)
            })
        })
    }
}

/// A built-in map of the named fields.
fn record<'b, 'a: 'b, const N: usize>(
    fields: [&str; N],
    field: impl Fn(&str) -> Option<CowVal<'b, 'a>>,
) -> CelMap<'a> {
    CelMap::from(
        fields
            .iter()
            .filter_map(|f| {
                let v = field(f)?.into_owned();
                Some((CelMapKey::String(CelString::from(f.to_string())), v))
            })
            .collect::<std::collections::HashMap<_, _>>(),
    )
}

macro_rules! record_view {
    ($view:ident, $name:literal) => {
        impl std::fmt::Debug for $view<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($name)
            }
        }

        impl<'a> Val for $view<'a> {
            fn get_type(&self) -> &Type {
                &MAP_TYPE
            }
            fn cel_type() -> &'static Type {
                &MAP_TYPE
            }
            fn as_container(&self) -> Option<&dyn Container> {
                Some(self.full())
            }
            fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
            where
                Self: 'v,
            {
                Some(self)
            }
            fn as_iterable<'b, 'v>(&'b self) -> Option<&'b (dyn Iterable + 'v)>
            where
                Self: 'v,
            {
                Some(self.full())
            }
            fn as_sizer(&self) -> Option<&dyn Sizer> {
                Some(self.full())
            }
            fn equals(&self, other: &dyn Val) -> bool {
                cel_equal(self, other)
            }
            fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
            where
                Self: 'v,
            {
                Box::new(Self::from_src(self.src))
            }
        }

        impl Indexer for $view<'_> {
            fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
            where
                Self: 'v,
            {
                let name = idx
                    .downcast_ref::<CelString>()
                    .map(|s| s.inner())
                    .unwrap_or_default();
                self.field(name).ok_or_else(|| no_such_key(name))
            }

            fn steal<'v>(
                self: Box<Self>,
                idx: &dyn Val,
            ) -> Result<Box<dyn Val + 'v>, ExecutionError>
            where
                Self: 'v,
            {
                self.get(idx).map(CowVal::into_owned)
            }
        }
    };
}

record_view!(PrincipalView, "principal");
record_view!(ResourceView, "resource");
