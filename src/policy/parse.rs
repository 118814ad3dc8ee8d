//! Bytes → typed documents, with errors that say where: the file, the YAML/JSON path
//! (`$.resourcePolicy.rules[0].effect`) and, when the parser knows it, the line and column.
//!
//! YAML goes through `yaml_serde` (YAML 1.2 scalars: `on`/`yes` stay strings; duplicate keys
//! are errors); JSON through `serde_json`. Both are wrapped in `serde_path_to_error`.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// The largest policy or test file we read. Bigger files get a clear error, not an OOM.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;

/// Where and what went wrong while reading one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// `$`-rooted path of the offending node, or `$` when unknown.
    pub path: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => {
                write!(f, "{} (line {l}, column {c}): {}", self.path, self.message)
            }
            _ => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

fn error(path: String, message: String) -> ParseError {
    ParseError {
        path,
        line: None,
        column: None,
        message,
    }
}

fn dollar(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." || p.is_empty() {
        "$".to_string()
    } else {
        format!("$.{p}")
    }
}

/// Is this file JSON (by name)? Everything else is YAML.
pub fn is_json(name: &str) -> bool {
    name.ends_with(".json")
}

/// Deserializes one document of type `T` from `bytes`.
pub fn document<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, ParseError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(error(
            "$".into(),
            format!(
                "file is {} bytes; the limit is {MAX_FILE_BYTES}",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| error("$".into(), format!("not valid UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(error("$".into(), "empty document".into()));
    }
    if is_json(name) {
        let mut de = serde_json::Deserializer::from_str(text);
        return serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let inner = e.inner();
            ParseError {
                path: dollar(e.path()),
                line: Some(inner.line()),
                column: Some(inner.column()),
                message: strip_position(&inner.to_string()),
            }
        });
    }
    if has_merge_keys(text) {
        // Merge keys (`<<: *anchor`) need the generic tree; positions are lost, paths are kept.
        let value = yaml_value(text)?;
        return serde_path_to_error::deserialize(value)
            .map_err(|e| error(dollar(e.path()), e.inner().to_string()));
    }
    let de = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let inner = e.inner();
        let loc = inner.location();
        ParseError {
            path: dollar(e.path()),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            message: strip_position(&inner.to_string()),
        }
    })
}

fn has_merge_keys(text: &str) -> bool {
    text.contains("<<:")
}

/// A YAML (or JSON, a subset) document as a JSON value, with merge keys applied.
pub fn yaml_value(text: &str) -> Result<Value, ParseError> {
    let mut v: yaml_serde::Value = yaml_serde::from_str(text).map_err(|e| {
        let loc = e.location();
        ParseError {
            path: "$".into(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            message: strip_position(&e.to_string()),
        }
    })?;
    v.apply_merge()
        .map_err(|e| error("$".into(), e.to_string()))?;
    serde_json::to_value(v).map_err(|e| error("$".into(), e.to_string()))
}

/// The crates append " at line X column Y"; we report positions separately.
fn strip_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::PolicyFile;

    #[test]
    fn unknown_key_names_path_and_line() {
        let src = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: x\n  version: default\n  rules:\n    - actions: [a]\n      effect: EFFECT_ALLOW\n      roles: [r]\n      colour: red\n";
        let err = document::<PolicyFile>("p.yaml", src.as_bytes()).err();
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("$.resourcePolicy.rules[0]"), "{err}");
        assert!(err.contains("colour"), "{err}");
        assert!(err.contains("line 9"), "{err}");
    }

    #[test]
    fn wrong_enum_and_type() {
        let src = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: x\n  version: default\n  rules:\n    - actions: a\n      effect: ALLOW\n      roles: [r]\n";
        let err = document::<PolicyFile>("p.yaml", src.as_bytes()).err();
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("$.resourcePolicy.rules[0].actions"), "{err}");
    }

    #[test]
    fn duplicate_keys_and_yaml12_scalars() {
        let dup = "apiVersion: a\napiVersion: b\n";
        let err = document::<PolicyFile>("p.yaml", dup.as_bytes()).err();
        assert!(
            err.map(|e| e.message)
                .unwrap_or_default()
                .contains("duplicate")
        );
        let v = yaml_value("x: on\ny: yes\n").unwrap_or_default();
        assert_eq!(v["x"], "on");
        assert_eq!(v["y"], "yes");
    }

    #[test]
    fn malformed_yaml_oversize_and_empty() {
        let err = document::<PolicyFile>("p.yaml", b"a: [b\n").err();
        assert!(err.is_some_and(|e| e.line.is_some()));
        let big = vec![b'#'; MAX_FILE_BYTES + 1];
        let err = document::<PolicyFile>("p.yaml", &big).err();
        assert!(err.is_some_and(|e| e.message.contains("limit")));
        assert!(document::<PolicyFile>("p.yaml", b"  \n").is_err());
        assert!(document::<PolicyFile>("p.yaml", &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn merge_keys_apply() {
        let v = yaml_value("base: &b {x: 1}\nd:\n  <<: *b\n  y: 2\n").unwrap_or_default();
        assert_eq!(v["d"]["x"], 1);
        assert_eq!(v["d"]["y"], 2);
    }
}
