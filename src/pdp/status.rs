//! `google.rpc.Status`, the error body of Cerbos's HTTP API (grpc-gateway's JSON form):
//! `{"code": 3, "message": "...", "details": [...]}`, with the HTTP status grpc-gateway maps
//! each gRPC code to. Both Cerbos SDKs parse exactly this shape
//! (https://github.com/cerbos/cerbos-sdk-javascript `packages/http/src/transport.ts`).

use serde::Serialize;
use serde_json::{Value, json};

/// gRPC status codes used here (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
pub mod code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNIMPLEMENTED: i32 = 12;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// One error answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub code: i32,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<Value>,
}

impl Status {
    pub fn new(code: i32, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Status {
        Status::new(code::INVALID_ARGUMENT, message)
    }

    /// A `buf.validate` failure: Cerbos's message (`validation error: <path>: <why>`, or a
    /// list when there are several) and one `buf.validate.Violations` detail.
    pub fn violations(v: &[Violation]) -> Status {
        let message = match v {
            [one] => format!("validation error: {}: {}", one.path, one.message),
            many => {
                let mut m = "validation errors:".to_string();
                for x in many {
                    m.push_str(&format!("\n - {}: {}", x.path, x.message));
                }
                m
            }
        };
        let violations: Vec<Value> = v.iter().map(Violation::to_json).collect();
        Status {
            code: code::INVALID_ARGUMENT,
            message,
            details: vec![json!({
                "@type": "type.googleapis.com/buf.validate.Violations",
                "violations": violations,
            })],
        }
    }

    /// The HTTP status grpc-gateway answers for this code.
    pub fn http_status(&self) -> u16 {
        match self.code {
            0 => 200,
            code::INVALID_ARGUMENT => 400,
            code::NOT_FOUND => 404,
            code::PERMISSION_DENIED => 403,
            code::RESOURCE_EXHAUSTED => 429,
            code::UNIMPLEMENTED => 501,
            code::UNAVAILABLE => 503,
            code::UNAUTHENTICATED => 401,
            _ => 500,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!("{{\"code\":{},\"message\":\"internal error\"}}", self.code)
        })
    }
}

/// One element of a field path, as protovalidate reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldElement {
    pub number: u32,
    pub name: &'static str,
    /// `TYPE_MESSAGE`, `TYPE_STRING`, `TYPE_BOOL`, ...
    pub ty: &'static str,
    /// Index into a repeated field.
    pub index: Option<usize>,
    /// Key into a map field (`map<string, Value>`).
    pub key: Option<String>,
}

impl FieldElement {
    pub const fn new(number: u32, name: &'static str, ty: &'static str) -> FieldElement {
        FieldElement {
            number,
            name,
            ty,
            index: None,
            key: None,
        }
    }

    pub fn at(mut self, index: usize) -> FieldElement {
        self.index = Some(index);
        self
    }

    fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("fieldNumber".into(), self.number.into());
        m.insert("fieldName".into(), self.name.into());
        m.insert("fieldType".into(), self.ty.into());
        if let Some(i) = self.index {
            // protojson writes uint64 as a string.
            m.insert("index".into(), i.to_string().into());
        }
        if let Some(k) = &self.key {
            m.insert("keyType".into(), "TYPE_STRING".into());
            m.insert("valueType".into(), "TYPE_MESSAGE".into());
            m.insert("stringKey".into(), k.clone().into());
        }
        Value::Object(m)
    }
}

/// Which `buf.validate` rule failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Required,
    Unique,
    /// `string.min_len` on a repeated field's items.
    ItemMinLen,
    /// `string.min_len` on a field.
    MinLen,
    /// `string.min_len` on a map's keys.
    KeyMinLen,
    Pattern(&'static str),
    /// A message-level rule (`cel`), e.g. `auxData`'s jwt/jwts exclusivity.
    Exclusive,
}

/// One protovalidate violation.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// `resources[0].resource.kind`.
    pub path: String,
    pub field: Vec<FieldElement>,
    pub rule: Rule,
    pub message: String,
}

impl Violation {
    pub fn new(path: String, field: Vec<FieldElement>, rule: Rule) -> Violation {
        let message = match rule {
            Rule::Required => "value is required".to_string(),
            Rule::Unique => "repeated value must contain unique items".to_string(),
            Rule::ItemMinLen | Rule::MinLen | Rule::KeyMinLen => {
                "must be at least 1 characters".to_string()
            }
            Rule::Pattern(p) => format!("does not match regex pattern `{p}`"),
            Rule::Exclusive => "jwt and jwts are mutually exclusive".to_string(),
        };
        Violation {
            path,
            field,
            rule,
            message,
        }
    }

    fn to_json(&self) -> Value {
        let el = |n: u32, name: &str, ty: &str| json!({"fieldNumber": n, "fieldName": name, "fieldType": ty});
        let (rule, id): (Vec<Value>, &str) = match self.rule {
            Rule::Required => (vec![el(25, "required", "TYPE_BOOL")], "required"),
            Rule::Unique => (
                vec![
                    el(18, "repeated", "TYPE_MESSAGE"),
                    el(3, "unique", "TYPE_BOOL"),
                ],
                "repeated.unique",
            ),
            Rule::ItemMinLen => (
                vec![
                    el(18, "repeated", "TYPE_MESSAGE"),
                    el(4, "items", "TYPE_MESSAGE"),
                    el(14, "string", "TYPE_MESSAGE"),
                    el(2, "min_len", "TYPE_UINT64"),
                ],
                "string.min_len",
            ),
            Rule::MinLen => (
                vec![
                    el(14, "string", "TYPE_MESSAGE"),
                    el(2, "min_len", "TYPE_UINT64"),
                ],
                "string.min_len",
            ),
            Rule::KeyMinLen => (
                vec![
                    el(19, "map", "TYPE_MESSAGE"),
                    el(4, "keys", "TYPE_MESSAGE"),
                    el(14, "string", "TYPE_MESSAGE"),
                    el(2, "min_len", "TYPE_UINT64"),
                ],
                "string.min_len",
            ),
            Rule::Pattern(_) => (
                vec![
                    el(14, "string", "TYPE_MESSAGE"),
                    el(6, "pattern", "TYPE_STRING"),
                ],
                "string.pattern",
            ),
            Rule::Exclusive => (
                vec![el(23, "cel", "TYPE_MESSAGE")],
                "aux_data.jwt_exclusive",
            ),
        };
        let mut v = json!({
            "field": {"elements": self.field.iter().map(FieldElement::to_json).collect::<Vec<_>>()},
            "rule": {"elements": rule},
            "ruleId": id,
            "message": self.message,
        });
        if self.rule == Rule::KeyMinLen {
            v["forKey"] = Value::Bool(true);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_roles_has_cerbos_shape() {
        let v = Violation::new(
            "principal.roles".into(),
            vec![
                FieldElement::new(3, "principal", "TYPE_MESSAGE"),
                FieldElement::new(3, "roles", "TYPE_STRING"),
            ],
            Rule::Required,
        );
        let s = Status::violations(&[v]);
        let got: Value = serde_json::from_str(&s.to_json()).unwrap_or_default();
        // Captured from Cerbos 0.55.0.
        let want: Value = serde_json::from_str(r#"{"code":3, "message":"validation error: principal.roles: value is required", "details":[{"@type":"type.googleapis.com/buf.validate.Violations", "violations":[{"field":{"elements":[{"fieldNumber":3, "fieldName":"principal", "fieldType":"TYPE_MESSAGE"}, {"fieldNumber":3, "fieldName":"roles", "fieldType":"TYPE_STRING"}]}, "rule":{"elements":[{"fieldNumber":25, "fieldName":"required", "fieldType":"TYPE_BOOL"}]}, "ruleId":"required", "message":"value is required"}]}]}"#).unwrap_or_default();
        assert_eq!(got, want);
        assert_eq!(s.http_status(), 400);
    }
}
