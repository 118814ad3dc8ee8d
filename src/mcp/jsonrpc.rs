//! The JSON-RPC envelope, parsed once and strictly (DESIGN.md §1 step 3, invariant I4).
//!
//! - one message per body (a batch is reported as such, for the caller to refuse);
//! - invalid UTF-8, duplicate keys and case-variant keys (`name` and `NAME`) are refused;
//! - size and nesting depth are bounded;
//! - what is forwarded is the canonical re-serialization of the parsed value (sorted keys,
//!   no whitespace), never the raw bytes.

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
}

/// The longest string `id` a request may carry (security.md RPC-5).
pub const MAX_ID_BYTES: usize = 128;

/// Bounds on one message.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 * 1024 * 1024,
            max_depth: 64,
        }
    }
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    TooLarge {
        size: usize,
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

/// Parses one body into a JSON value, strictly.
pub fn parse_value(body: &[u8], limits: Limits) -> Result<Value, ParseError> {
    if body.len() > limits.max_bytes {
        return Err(ParseError::TooLarge {
            size: body.len(),
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| ParseError::NotUtf8)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Strict {
        depth: 0,
        max_depth: limits.max_depth,
    }
    .deserialize(&mut de)
    .map_err(|e| ParseError::Json(e.to_string()))?;
    de.end().map_err(|e| ParseError::Json(e.to_string()))?;
    Ok(value)
}

/// Parses one body into one JSON-RPC message. An array is `ParseError::Batch`.
pub fn parse(body: &[u8], limits: Limits) -> Result<Message, ParseError> {
    let value = parse_value(body, limits)?;
    message(value)
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

/// A serde seed that builds a `Value` while refusing duplicate and case-variant keys and
/// bounding depth.
struct Strict {
    depth: usize,
    max_depth: usize,
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
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
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= self.max_depth {
            return Err(de::Error::custom(format!(
                "nested deeper than {} levels",
                self.max_depth
            )));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict {
            depth: self.depth + 1,
            max_depth: self.max_depth,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= self.max_depth {
            return Err(de::Error::custom(format!(
                "nested deeper than {} levels",
                self.max_depth
            )));
        }
        let mut out = Map::new();
        let mut folded: std::collections::HashSet<String> = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let lower = key.to_lowercase();
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            if folded.contains(&lower) {
                return Err(de::Error::custom(format!(
                    "key {key:?} differs from another key only in case"
                )));
            }
            let v = map.next_value_seed(Strict {
                depth: self.depth + 1,
                max_depth: self.max_depth,
            })?;
            folded.insert(lower);
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    max_depth: 8
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
}
