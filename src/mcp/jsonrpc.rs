//! The JSON-RPC envelope, parsed once and strictly (DESIGN.md §1 step 3, invariant I4).
//!
//! - one message per body (a batch is reported as such, for the caller to refuse);
//! - invalid UTF-8, duplicate keys, and keys equal under case folding ([`fold_key`]: `name`
//!   and `NAME`, `params` and `paramſ`) are refused at every depth;
//! - a client's message carries only the envelope keys of its kind ([`check_envelope`]);
//! - size and nesting depth are bounded;
//! - what is forwarded upstream is the canonical re-serialization of the parsed value (sorted
//!   keys, no whitespace), never the client's raw bytes. An upstream's answer goes back to the
//!   client as its own bytes once it passed this parse ([`parse_head`]), unless it is a list,
//!   which is filtered and re-serialized.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// JSON-RPC error codes we answer with.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// MCP 2026-07-28: a header does not match the body.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// MCP 2026-07-28: an unsupported `MCP-Protocol-Version`.
    pub const UNSUPPORTED_VERSION: i64 = -32022;
    /// Ours, outside the reserved range: the caller has no verified tailnet identity.
    pub const UNIDENTIFIED: i64 = -31001;
    /// Ours: denied by policy (for non-tool methods).
    pub const DENIED: i64 = -31002;
    /// Ours: the audit store cannot take the decision right now; retry later.
    pub const AUDIT_UNAVAILABLE: i64 = -31003;
    /// Ours: the upstream MCP server failed.
    pub const UPSTREAM: i64 = -31004;
    /// Ours: the gateway holds `limits.in_flight_bytes` of calls already; retry later.
    pub const OVERLOADED: i64 = -31005;
}

/// The longest string `id` a request may carry (security.md RPC-5).
pub const MAX_ID_BYTES: usize = 128;

/// Bounds on one message.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
    /// JSON values in the whole message (objects, arrays and scalars each count one): the
    /// parsed form of many small values costs far more memory than their bytes.
    pub max_nodes: usize,
}

/// A client message's default byte limit (`servers.<name>.max_body`).
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// A client message's default JSON value limit (`servers.<name>.max_nodes`).
pub const DEFAULT_MAX_NODES: usize = 10_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_depth: 64,
            max_nodes: DEFAULT_MAX_NODES,
        }
    }
}

/// The most JSON values in one upstream answer we parse (lists, results).
pub const MAX_UPSTREAM_NODES: usize = 2_000_000;

/// What a parsed value holds, for the memory it costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size {
    /// JSON values (each object, array and scalar).
    pub nodes: usize,
    /// Of which objects (a parsed object costs a map node of several hundred bytes).
    pub objects: usize,
}

impl Size {
    /// A generous estimate of the heap a parsed value of `bytes` JSON text takes: its strings
    /// (at most the text), a `Value` per node, a map node per object (serde_json's ordered map
    /// allocates a whole B-tree leaf, ~640 bytes, even for one key).
    pub fn parsed_bytes(&self, bytes: usize) -> usize {
        bytes
            .saturating_add(self.nodes.saturating_mul(48))
            .saturating_add(self.objects.saturating_mul(704))
    }
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    TooLarge {
        size: usize,
        limit: usize,
    },
    /// More JSON values than the limit.
    TooManyValues {
        limit: usize,
    },
    NotUtf8,
    /// Malformed JSON, a duplicate or case-variant key, or too deep.
    Json(String),
    /// A JSON array: a batch.
    Batch,
    /// Valid JSON but not a JSON-RPC 2.0 message.
    Invalid(String),
}

impl ParseError {
    pub fn code(&self) -> i64 {
        match self {
            ParseError::Json(_) | ParseError::NotUtf8 => code::PARSE_ERROR,
            _ => code::INVALID_REQUEST,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooLarge { size, limit } => {
                write!(f, "body is {size} bytes; the limit is {limit}")
            }
            ParseError::TooManyValues { limit } => {
                write!(
                    f,
                    "body has more than {limit} JSON values; the limit is {limit}"
                )
            }
            ParseError::NotUtf8 => f.write_str("body is not valid UTF-8"),
            ParseError::Json(e) => write!(f, "invalid JSON: {e}"),
            ParseError::Batch => {
                f.write_str("JSON-RPC batches are not supported; send one message per request")
            }
            ParseError::Invalid(e) => write!(f, "not a JSON-RPC 2.0 message: {e}"),
        }
    }
}

/// The kind of one JSON-RPC message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Notification,
    /// A response (result or error), e.g. a client answering a server's sampling request.
    Response,
}

/// One parsed JSON-RPC 2.0 message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub kind: Kind,
    /// `method` for requests and notifications; "" for responses.
    pub method: String,
    /// The `id` (requests and responses).
    pub id: Option<Value>,
    /// The whole message as parsed.
    pub value: Value,
}

impl Message {
    pub fn params(&self) -> Option<&Map<String, Value>> {
        self.value.get("params").and_then(Value::as_object)
    }

    /// `params.name` (tools/call, prompts/get).
    pub fn param_str(&self, key: &str) -> Option<&str> {
        self.params()
            .and_then(|p| p.get(key))
            .and_then(Value::as_str)
    }

    /// The canonical bytes to forward: sorted keys, no whitespace.
    pub fn canonical(&self) -> Vec<u8> {
        canonical(&self.value)
    }
}

/// Canonical JSON: object keys sorted (serde_json's map is ordered), no whitespace.
pub fn canonical(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// A JSON-RPC id as a table key: `"7"` and `7` are different ids, so the JSON text is the key.
pub fn canonical_id(id: &Value) -> String {
    String::from_utf8(canonical(id)).unwrap_or_default()
}

/// The key by which two object keys are compared: keys with equal fold keys are refused as
/// ambiguous (invariant I4), because a case-insensitive decoder upstream would take one for
/// the other while policy saw the first.
///
/// Per character: Unicode *simple* case folding (CaseFolding.txt C+S, as JSON decoders that
/// fold per code point do; `ſ` → `s`, Kelvin sign → `k`), applied to the simple uppercase of
/// the simple lowercase. The inner mappings are Go's `encoding/json` rule since Go 1.21
/// (`foldName`: `unicode.ToUpper(unicode.ToLower(r))`), which also merges `ı` and `İ` with
/// `i`; Go up to 1.20 used `bytes.EqualFold` (simple-fold orbits). So every pair of keys that
/// either Go rule or simple folding matches has one fold key (tests check this against the
/// full Unicode range, and against the Go toolchain's own tables in tests/mcp_peers.rs).
pub fn fold_key(key: &str) -> String {
    if key.is_ascii() {
        return key.to_ascii_lowercase();
    }
    let cm = icu_casemap::CaseMapper::new();
    key.chars()
        .map(|c| cm.simple_fold(cm.simple_uppercase(cm.simple_lowercase(c))))
        .collect()
}

/// The fold key of a key as the parser lends it: a key of plain lowercase ASCII (most keys) is
/// its own fold key, borrowed from the body; any other key is folded into a new string.
fn fold_of<'de>(key: &Cow<'de, str>) -> Cow<'de, str> {
    match key {
        Cow::Borrowed(k) if !k.bytes().any(|b| !b.is_ascii() || b.is_ascii_uppercase()) => {
            Cow::Borrowed(k)
        }
        k => Cow::Owned(fold_key(k)),
    }
}

/// One object's keys so far, by fold key. A short object (an envelope, most arguments) is
/// scanned: for a handful of keys that costs less than hashing each one. A long one is hashed.
/// Beside each fold key sits the first key that had it, to name both in a refusal, unless that
/// key is its own fold key or the object being built holds it (so no key is held twice).
#[derive(Default)]
enum Folded<'de> {
    #[default]
    Empty,
    Few(Vec<(Cow<'de, str>, Option<Cow<'de, str>>)>),
    Many(std::collections::HashMap<Cow<'de, str>, Option<Cow<'de, str>>>),
}

impl<'de> Folded<'de> {
    /// Keys scanned before the set is hashed.
    const FEW: usize = 16;

    /// `Some` when a key had this fold key before, with that key if it is kept here.
    fn get(&self, fold: &str) -> Option<Option<&str>> {
        match self {
            Folded::Empty => None,
            Folded::Few(v) => v.iter().find(|(f, _)| f == fold).map(|(_, k)| k.as_deref()),
            Folded::Many(s) => s.get(fold).map(|k| k.as_deref()),
        }
    }

    fn insert(&mut self, fold: Cow<'de, str>, first: Option<Cow<'de, str>>) {
        match self {
            Folded::Empty => *self = Folded::Few(vec![(fold, first)]),
            Folded::Few(v) if v.len() < Self::FEW => v.push((fold, first)),
            Folded::Few(v) => {
                let mut s: std::collections::HashMap<_, _> = v.drain(..).collect();
                s.insert(fold, first);
                *self = Folded::Many(s);
            }
            Folded::Many(s) => {
                s.insert(fold, first);
            }
        }
    }
}

/// The keys a client's JSON-RPC message may carry, by kind: anything else could be read by
/// an upstream as something policy never saw (a `paramſ` beside `params`, a `METHOD` in an
/// answer), so it is refused.
const REQUEST_KEYS: [&str; 4] = ["jsonrpc", "id", "method", "params"];
const NOTIFICATION_KEYS: [&str; 3] = ["jsonrpc", "method", "params"];
const RESPONSE_KEYS: [&str; 4] = ["jsonrpc", "id", "result", "error"];

/// Refuses a client message with a key outside its kind's envelope (`-32600`).
pub fn check_envelope(msg: &Message) -> Result<(), ParseError> {
    let (allowed, kind): (&[&str], &str) = match msg.kind {
        Kind::Request => (&REQUEST_KEYS, "request"),
        Kind::Notification => (&NOTIFICATION_KEYS, "notification"),
        Kind::Response => (&RESPONSE_KEYS, "response"),
    };
    let Some(obj) = msg.value.as_object() else {
        return Err(ParseError::Invalid("the body must be a JSON object".into()));
    };
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ParseError::Invalid(format!(
            "unknown key {k:?} in a JSON-RPC {kind}; a {kind} has only {}",
            allowed
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        None => Ok(()),
    }
}

/// Parses one body into a JSON value, strictly.
pub fn parse_value(body: &[u8], limits: Limits) -> Result<Value, ParseError> {
    parse_value_sized(body, limits).map(|(v, _)| v)
}

/// [`parse_value`], also saying how many values and objects the value holds.
pub fn parse_value_sized(body: &[u8], limits: Limits) -> Result<(Value, Size), ParseError> {
    strict(body, limits, usize::MAX)
}

/// Parses and checks one body exactly as strictly as [`parse`] (the same refusals, in the same
/// words), but builds only the message's top level: a member that is an object or an array
/// comes back empty. For an answer forwarded as its own bytes, which needs its envelope
/// checked and nothing else read, this skips building a tree of the whole result.
pub fn parse_head(body: &[u8], limits: Limits) -> Result<Message, ParseError> {
    let (value, _) = strict(body, limits, 1)?;
    message(value)
}

/// The one strict parse: every value is checked, and containers nested fewer than `keep`
/// levels deep are built (`usize::MAX`: the whole value).
fn strict(body: &[u8], limits: Limits, keep: usize) -> Result<(Value, Size), ParseError> {
    if body.len() > limits.max_bytes {
        return Err(ParseError::TooLarge {
            size: body.len(),
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| ParseError::NotUtf8)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let count = Count {
        nodes: std::cell::Cell::new(0),
        objects: std::cell::Cell::new(0),
        max_nodes: limits.max_nodes,
    };
    let value = Strict {
        depth: 0,
        max_depth: limits.max_depth,
        keep,
        count: &count,
    }
    .deserialize(&mut de)
    .map_err(|e| {
        if count.nodes.get() > limits.max_nodes {
            ParseError::TooManyValues {
                limit: limits.max_nodes,
            }
        } else {
            ParseError::Json(e.to_string())
        }
    })?;
    de.end().map_err(|e| ParseError::Json(e.to_string()))?;
    Ok((
        value,
        Size {
            nodes: count.nodes.get(),
            objects: count.objects.get(),
        },
    ))
}

/// Parses one body into one JSON-RPC message. An array is `ParseError::Batch`.
pub fn parse(body: &[u8], limits: Limits) -> Result<Message, ParseError> {
    parse_sized(body, limits).map(|(m, _)| m)
}

/// [`parse`], also saying how many values and objects the message holds.
pub fn parse_sized(body: &[u8], limits: Limits) -> Result<(Message, Size), ParseError> {
    let (value, size) = parse_value_sized(body, limits)?;
    Ok((message(value)?, size))
}

/// Classifies a parsed value as a JSON-RPC 2.0 message.
pub fn message(value: Value) -> Result<Message, ParseError> {
    let obj = match &value {
        Value::Array(_) => return Err(ParseError::Batch),
        Value::Object(o) => o,
        _ => return Err(ParseError::Invalid("the body must be a JSON object".into())),
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(ParseError::Invalid("\"jsonrpc\" must be \"2.0\"".into()));
    }
    let id = obj.get("id").cloned();
    if let Some(id) = &id {
        if !(id.is_string() || id.is_i64() || id.is_u64() || id.is_null()) {
            return Err(ParseError::Invalid(
                "\"id\" must be a string or an integer".into(),
            ));
        }
        // Requests: MCP forbids a null id, and an id is an identifier, not a payload.
        if obj.contains_key("method") {
            if id.is_null() {
                return Err(ParseError::Invalid("\"id\" must not be null".into()));
            }
            if id.as_str().is_some_and(|s| s.len() > MAX_ID_BYTES) {
                return Err(ParseError::Invalid(format!(
                    "a string \"id\" may be at most {MAX_ID_BYTES} bytes"
                )));
            }
        }
    }
    if let Some(params) = obj.get("params") {
        if !(params.is_object() || params.is_array()) {
            return Err(ParseError::Invalid(
                "\"params\" must be an object or an array".into(),
            ));
        }
    }
    let (kind, method) = match obj.get("method") {
        Some(Value::String(m)) if !m.is_empty() => {
            let kind = if id.is_some() {
                Kind::Request
            } else {
                Kind::Notification
            };
            (kind, m.clone())
        }
        Some(_) => {
            return Err(ParseError::Invalid(
                "\"method\" must be a non-empty string".into(),
            ));
        }
        None => {
            if obj.contains_key("result") == obj.contains_key("error") || id.is_none() {
                return Err(ParseError::Invalid(
                    "a message needs a \"method\", or an \"id\" with exactly one of \"result\" and \"error\"".into(),
                ));
            }
            (Kind::Response, String::new())
        }
    };
    Ok(Message {
        kind,
        method,
        id,
        value,
    })
}

/// A JSON-RPC error response body.
pub fn error_body(id: Option<&Value>, code: i64, message: &str, data: Option<Value>) -> Vec<u8> {
    let mut err = Map::new();
    err.insert("code".into(), Value::from(code));
    err.insert("message".into(), Value::String(message.to_string()));
    if let Some(d) = data {
        err.insert("data".into(), d);
    }
    let mut m = Map::new();
    m.insert("jsonrpc".into(), Value::String("2.0".into()));
    m.insert("id".into(), id.cloned().unwrap_or(Value::Null));
    m.insert("error".into(), Value::Object(err));
    canonical(&Value::Object(m))
}

/// A JSON-RPC result response body.
pub fn result_body(id: Option<&Value>, result: Value) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("jsonrpc".into(), Value::String("2.0".into()));
    m.insert("id".into(), id.cloned().unwrap_or(Value::Null));
    m.insert("result".into(), result);
    canonical(&Value::Object(m))
}

/// Values seen so far in one parse, against the limit.
struct Count {
    nodes: std::cell::Cell<usize>,
    objects: std::cell::Cell<usize>,
    max_nodes: usize,
}

/// A serde seed that builds a `Value` while refusing duplicate keys and keys with equal
/// [`fold_key`]s, and bounding depth and the number of values. Containers at `keep` levels
/// deep or more are checked alike but not built: they come back empty, and the scalars in
/// them as `null`.
#[derive(Clone, Copy)]
struct Strict<'c> {
    depth: usize,
    max_depth: usize,
    keep: usize,
    count: &'c Count,
}

impl<'c> Strict<'c> {
    /// The seed for a member of this container, refusing one level too deep.
    fn member<E: de::Error>(&self) -> Result<Strict<'c>, E> {
        if self.depth >= self.max_depth {
            return Err(E::custom(format!(
                "nested deeper than {} levels",
                self.max_depth
            )));
        }
        Ok(Strict {
            depth: self.depth + 1,
            max_depth: self.max_depth,
            keep: self.keep,
            count: self.count,
        })
    }

    /// Whether this value is kept: a scalar is when its container is built.
    fn kept(&self) -> bool {
        self.depth <= self.keep
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        let n = self.count.nodes.get() + 1;
        self.count.nodes.set(n);
        if n > self.count.max_nodes {
            return Err(de::Error::custom(format!(
                "more than {} JSON values",
                self.count.max_nodes
            )));
        }
        d.deserialize_any(self)
    }
}

/// An object key as the parser lends it: borrowed from the body unless it had escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(match self.kept() {
            true => Value::String(v.to_string()),
            false => Value::Null,
        })
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(match self.kept() {
            true => Value::String(v),
            false => Value::Null,
        })
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let member = self.member()?;
        let build = self.depth < self.keep;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(member)? {
            if build {
                out.push(v);
            }
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let member = self.member()?;
        self.count.objects.set(self.count.objects.get() + 1);
        let build = self.depth < self.keep;
        let mut out = Map::new();
        let mut folded = Folded::default();
        while let Some(key) = map.next_key_seed(Key)? {
            let fold = fold_of(&key);
            if let Some(kept) = folded.get(&fold) {
                // The key it collides with, from wherever it is held.
                let first: &str = match kept {
                    Some(first) => first,
                    None if build => out
                        .keys()
                        .map(String::as_str)
                        .find(|k| fold_key(k) == fold)
                        .unwrap_or_default(),
                    None => fold.as_ref(),
                };
                return Err(de::Error::custom(match first == key {
                    true => format!("duplicate key {key:?}"),
                    false => format!(
                        "keys {first:?} and {key:?} are equal under case folding (ambiguous to case-insensitive decoders)"
                    ),
                }));
            }
            let v = map.next_value_seed(member)?;
            if build {
                out.insert(key.into_owned(), v);
                folded.insert(fold, None);
            } else {
                let first = (key != fold).then_some(key);
                folded.insert(fold, first);
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    fn p(s: &str) -> Result<Message, ParseError> {
        parse(s.as_bytes(), Limits::default())
    }

    #[test]
    fn classifies_messages() {
        let m = p(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{}}}"#).unwrap();
        assert_eq!(m.kind, Kind::Request);
        assert_eq!(m.param_str("name"), Some("x"));
        assert_eq!(
            p(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
                .unwrap()
                .kind,
            Kind::Notification
        );
        assert_eq!(
            p(r#"{"jsonrpc":"2.0","id":"a","result":{}}"#).unwrap().kind,
            Kind::Response
        );
    }

    #[test]
    fn refuses_what_could_smuggle() {
        let cases = [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}"#,
                "duplicate",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","NAME":"b"}}"#,
                "case",
            ),
            (r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#, "batch"),
            (r#"{"jsonrpc":"2.0","id":1,"method":"ping"} {}"#, "trailing"),
            (r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, "2.0"),
            (r#"{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}"#, "id"),
            (r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#, "null"),
            (r#"{"jsonrpc":"2.0","id":1,"method":""}"#, "method"),
            (
                r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#,
                "exactly one",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x","params":"s"}"#,
                "params",
            ),
            ("\"just a string\"", "object"),
        ];
        for (body, what) in cases {
            let e = p(body).unwrap_err();
            assert!(
                e.to_string().to_lowercase().contains(what)
                    || matches!(e, ParseError::Batch) && what == "batch",
                "{body}: {e}"
            );
        }
        assert_eq!(
            parse(&[0xff, 0xfe], Limits::default()).unwrap_err(),
            ParseError::NotUtf8
        );
        let long_id = format!(
            r#"{{"jsonrpc":"2.0","id":"{}","method":"ping"}}"#,
            "i".repeat(129)
        );
        assert!(p(&long_id).unwrap_err().to_string().contains("at most"));
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(p(&deep).unwrap_err().to_string().contains("deeper"));
        let big = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"s":"{}"}}}}"#,
            "a".repeat(100)
        );
        assert!(matches!(
            parse(
                big.as_bytes(),
                Limits {
                    max_bytes: 50,
                    max_depth: 8,
                    max_nodes: 100,
                }
            ),
            Err(ParseError::TooLarge { .. })
        ));
    }

    #[test]
    fn canonical_form_is_sorted_and_stable() {
        let m = p("{ \"params\": {\"b\": 1, \"a\": [1, 2]}, \"method\": \"x\", \"id\": 7, \"jsonrpc\": \"2.0\" }").unwrap();
        assert_eq!(
            String::from_utf8(m.canonical()).unwrap(),
            r#"{"id":7,"jsonrpc":"2.0","method":"x","params":{"a":[1,2],"b":1}}"#
        );
        let again = parse(&m.canonical(), Limits::default()).unwrap();
        assert_eq!(again.canonical(), m.canonical());
    }

    /// A case-folded twin is refused wherever it falls in its object: among the first keys
    /// (scanned), past [`Folded::FEW`] (hashed), and right at the switch; the refusal names
    /// both keys. Distinct keys of any count pass.
    #[test]
    fn folded_twins_are_refused_in_short_and_long_objects() {
        for n in [0, 1, Folded::FEW - 1, Folded::FEW, Folded::FEW + 1, 40] {
            let mut keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            let object = |keys: &[String]| {
                let fields: Vec<String> = keys.iter().map(|k| format!("\"{k}\":1")).collect();
                format!(
                    r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{{}}}}}}}"#,
                    fields.join(",")
                )
            };
            assert!(p(&object(&keys)).is_ok(), "{n} distinct keys");
            keys.insert(0, "Name".into());
            keys.push("nAME".into());
            let e = p(&object(&keys)).unwrap_err().to_string();
            assert!(e.contains("case folding"), "{n}: {e}");
            assert!(e.contains("\"Name\"") && e.contains("\"nAME\""), "{n}: {e}");
            // The twin of a key written after the switch to hashing.
            keys.remove(0);
            keys.pop();
            keys.push("late".into());
            keys.push("LATE".into());
            let e = p(&object(&keys)).unwrap_err().to_string();
            assert!(e.contains("\"late\"") && e.contains("\"LATE\""), "{n}: {e}");
        }
    }

    /// What the head parse says of a body, to compare with the full parse.
    fn verdict(
        r: Result<Message, ParseError>,
    ) -> Result<(Kind, Option<Value>, String), ParseError> {
        r.map(|m| (m.kind, m.id, m.method))
    }

    /// [`parse_head`] refuses exactly what [`parse`] refuses, in the same words, at any depth,
    /// and reads the same envelope from what both accept; its nested containers are empty.
    #[test]
    fn the_head_parse_refuses_what_the_full_parse_refuses() {
        let small = Limits {
            max_bytes: 4096,
            max_depth: 6,
            max_nodes: 40,
        };
        let bodies = [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}]}}"#,
            r#"{"jsonrpc":"2.0","id":"a","error":{"code":1,"message":"m","data":[1,{"x":null}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":[{"b":1,"B":2}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":[{"b":1,"b":2}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":[{"b":1,"\u0062":2}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":[{"s":1,"ſ":2}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":[{"ſ":1,"s":2}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":[{"\u0042":1,"b":2}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"\u0042":1,"b":2}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{},"\u0069d":2}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":[[[[[[[1]]]]]]]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":[[[[[[]]]]]]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"t":"\ud800"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{}} x"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{},"ID":1}"#,
            r#"{"jsonrpc":"2.0","id":{"a":1},"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"name":"y"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":7}"#,
            r#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"n":1e999}}"#,
            "\"s\"",
            "",
        ];
        for body in bodies {
            for limits in [Limits::default(), small] {
                let full = verdict(parse(body.as_bytes(), limits));
                let head = verdict(parse_head(body.as_bytes(), limits));
                assert_eq!(head, full, "{body}");
            }
        }
        let m = parse_head(bodies[1].as_bytes(), Limits::default()).unwrap();
        assert_eq!(m.value["error"], serde_json::json!({}));
        assert_eq!(m.value["id"], "a");
        assert_eq!(
            parse_head(&[0xff], Limits::default()).unwrap_err(),
            ParseError::NotUtf8
        );
    }

    /// JSON text of any shape, its keys drawn from a few that fold together (and one written
    /// with an escape), so duplicates and case-folded twins fall at every depth.
    fn json_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let key = proptest::sample::select(vec!["a", "A", "s", "ſ", "S", "id", "\\u0061", "kind"]);
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            (-5i64..5).prop_map(|n| n.to_string()),
            Just("2.5".to_string()),
            Just("\"t\"".to_string()),
            Just("\"\\u00e9\"".to_string()),
        ];
        leaf.prop_recursive(6, 48, 4, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec((key.clone(), inner), 0..4).prop_map(|kv| {
                    let fields: Vec<String> =
                        kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2048))]

        /// The head parse and the full parse agree on every body, within the limits or past them.
        #[test]
        fn the_head_parse_agrees_with_the_full_parse(
            result in json_text(),
            id in proptest::sample::select(vec!["1", "\"x\"", "null", "{}", "[1]"]),
            tail in proptest::sample::select(vec!["", ",\"error\":{}", ",\"ID\":1", ",\"method\":\"m\""]),
            max_depth in 2usize..8,
            max_nodes in 4usize..60,
        ) {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}{tail}}}"#);
            for limits in [Limits::default(), Limits { max_bytes: 4096, max_depth, max_nodes }] {
                let full = verdict(parse(body.as_bytes(), limits));
                let head = verdict(parse_head(body.as_bytes(), limits));
                proptest::prop_assert_eq!(head, full, "{}", body);
            }
        }
    }

    #[test]
    fn fold_key_merges_what_simple_folding_and_go_merge() {
        let cm = icu_casemap::CaseMapper::new();
        let key = |c: char| fold_key(&c.to_string());
        for c in (0..=0x10ffff_u32).filter_map(char::from_u32) {
            // Coarser than simple case folding: a character and its fold share a key.
            assert_eq!(key(c), key(cm.simple_fold(c)), "U+{:04X}", c as u32);
            // Coarser than Go's foldName (Go 1.21+): ToUpper(ToLower(r)).
            let go = cm.simple_uppercase(cm.simple_lowercase(c));
            assert_eq!(key(c), key(go), "U+{:04X}", c as u32);
        }
        for (a, b) in [
            ("params", "paramſ"),
            ("arguments", "ARGUMENTſ"),
            ("kind", "\u{212a}ind"),
            ("uri", "urı"),
            ("uri", "URİ"),
            ("name", "NAME"),
            ("σς", "ΣΣ"),
        ] {
            assert_eq!(fold_key(a), fold_key(b), "{a} {b}");
        }
        // Not case: different keys stay different.
        for (a, b) in [
            ("name", "nаme"),
            ("ss", "ß"),
            ("a_b", "ab"),
            ("id", "i\u{307}d"),
        ] {
            assert_ne!(fold_key(a), fold_key(b), "{a} {b}");
        }
    }

    #[test]
    fn the_envelope_holds_only_its_kinds_keys() {
        let refused = [
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","paramſ":{"name":"delete_repository"}}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{},"extra":1}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized","id2":1}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized","Params":{}}"#,
            r#"{"jsonrpc":"2.0","id":"s1","result":{},"METHOD":"tools/call","PARAMS":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":"s1","error":{"code":1,"message":"m"},"method2":"x"}"#,
        ];
        for body in refused {
            let m = p(body).unwrap();
            let e = check_envelope(&m).unwrap_err();
            assert_eq!(e.code(), code::INVALID_REQUEST, "{body}");
            assert!(e.to_string().contains("unknown key"), "{body}: {e}");
        }
        for body in [
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":"s1","result":{}}"#,
            r#"{"jsonrpc":"2.0","id":"s1","error":{"code":1,"message":"m"}}"#,
        ] {
            check_envelope(&p(body).unwrap()).unwrap();
        }
    }

    /// One spelling of `key` a case-insensitive decoder would take for it: each character
    /// becomes itself, its other ASCII case, or a Unicode character that folds to it.
    fn variant_of(key: &'static str) -> impl proptest::strategy::Strategy<Value = String> {
        let per_char: Vec<proptest::strategy::BoxedStrategy<char>> = key
            .chars()
            .map(|c| {
                let mut options = vec![c, c.to_ascii_uppercase(), c.to_ascii_lowercase()];
                match c.to_ascii_lowercase() {
                    's' => options.push('\u{17f}'),
                    'k' => options.push('\u{212a}'),
                    'i' => options.extend(['\u{131}', '\u{130}']),
                    _ => {}
                }
                proptest::sample::select(options).boxed()
            })
            .collect();
        per_char.prop_map(|cs| cs.into_iter().collect::<String>())
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(512))]

        /// Any spelling of a key that folds to it, beside the key, is refused wherever it is.
        #[test]
        fn case_variant_keys_are_refused_at_every_depth(
            (key, variant) in proptest::prop_oneof![
                variant_of("params").prop_map(|v| ("params", v)),
                variant_of("method").prop_map(|v| ("method", v)),
                variant_of("arguments").prop_map(|v| ("arguments", v)),
                variant_of("name").prop_map(|v| ("name", v)),
                variant_of("uri").prop_map(|v| ("uri", v)),
                variant_of("visibility").prop_map(|v| ("visibility", v)),
                variant_of("kind").prop_map(|v| ("kind", v)),
            ],
            depth in 0usize..4,
        ) {
            use proptest::prop_assert;
            use proptest::prop_assert_eq;
            let twin = |inner: String| -> String {
                let mut s = format!(r#"{{"{key}":1,{}:{inner}}}"#, serde_json::to_string(&variant).unwrap());
                for _ in 0..depth {
                    s = format!(r#"{{"a":[{s}]}}"#);
                }
                s
            };
            let body = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{}}}}}"#, twin("2".into()));
            let outcome = p(&body);
            if variant == key {
                prop_assert!(outcome.unwrap_err().to_string().contains("duplicate"));
            } else {
                let e = outcome.unwrap_err();
                prop_assert_eq!(e.code(), code::PARSE_ERROR);
                prop_assert!(e.to_string().contains("case folding"), "{}", e);
            }
            // Alone at the top level, a variant of an envelope key is an unknown key.
            if variant != key && (key == "params" || key == "method") {
                let alone = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"ping",{}:{{}}}}"#, serde_json::to_string(&variant).unwrap());
                let refused = match p(&alone) {
                    Ok(m) => check_envelope(&m).is_err(),
                    Err(_) => true,
                };
                prop_assert!(refused, "{}", alone);
            }
        }
    }

    #[test]
    fn the_number_of_values_is_bounded_and_counted() {
        let limits = Limits {
            max_nodes: 10,
            ..Limits::default()
        };
        // 1 envelope + jsonrpc + id + method + params + name + arguments + items = 8 values,
        // then 2 per `{"a":1}`.
        let body = |n: usize| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{"items":[{}]}}}}}}"#,
                vec![r#"{"a":1}"#; n].join(",")
            )
        };
        let (_, size) = parse_sized(body(0).as_bytes(), limits).unwrap();
        assert_eq!(
            size,
            Size {
                nodes: 8,
                objects: 3
            }
        );
        let (_, size) = parse_sized(body(1).as_bytes(), limits).unwrap();
        assert_eq!(
            size,
            Size {
                nodes: 10,
                objects: 4
            }
        );
        assert_eq!(
            parse(body(2).as_bytes(), limits).unwrap_err(),
            ParseError::TooManyValues { limit: 10 }
        );
        assert_eq!(
            ParseError::TooManyValues { limit: 10 }.code(),
            code::INVALID_REQUEST
        );
        assert!(size.parsed_bytes(100) > 100 + 4 * 640);
    }
}
