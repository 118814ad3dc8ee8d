//! Bytes → typed documents, with errors that say where: the file, the YAML/JSON path
//! (`$.resourcePolicy.rules[0].effect`) and, when the parser knows it, the line and column.
//!
//! YAML goes through `yaml_serde` (YAML 1.2 scalars: `on`/`yes` stay strings; duplicate keys
//! are errors); JSON through `serde_json`. Both are wrapped in `serde_path_to_error`. A YAML
//! document with merge keys (`<<`, found by parsing, in any spelling) is merged first by
//! [`yaml_merge`], which keeps every value's line and column for the errors.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::yaml_merge;

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
    if let Some(tree) = merge_tree(text)? {
        // Merge keys: deserialize the merged document, locate errors in the original.
        let merged = yaml_merge::emit(&tree);
        let de = yaml_serde::Deserializer::from_str(&merged);
        return serde_path_to_error::deserialize(de).map_err(|e| {
            let inner = e.inner();
            let message = strip_path(&strip_position(&inner.to_string()), &dollar(e.path()));
            let steps = steps(e.path());
            let field = unknown_field(&message);
            let (line, column) = yaml_merge::locate(&tree, &steps, field.as_deref());
            ParseError {
                path: dollar(e.path()),
                line: Some(line),
                column: Some(column),
                message,
            }
        });
    }
    let de = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let inner = e.inner();
        let loc = inner.location();
        let path = dollar(e.path());
        ParseError {
            message: strip_path(&strip_position(&inner.to_string()), &path),
            path,
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
        }
    })
}

/// yaml_serde starts its messages with the path of the node (`resourcePolicy.rules[1]: ...`);
/// we print our own `$`-rooted path in front, so theirs goes: the path is said once.
fn strip_path(message: &str, path: &str) -> String {
    if let Some((head, rest)) = message.split_once(": ") {
        let ours = path.strip_prefix("$.").unwrap_or(path);
        let head_is_path = !head.is_empty()
            && !head.contains(' ')
            && (ours == head
                || ours.starts_with(&format!("{head}."))
                || ours.starts_with(&format!("{head}[")));
        if head_is_path {
            return rest.to_string();
        }
    }
    message.to_string()
}

/// The document with its merge keys applied, if it has any (found in the parsed YAML, in
/// every spelling). A document the position-keeping parser cannot read is left to
/// `yaml_serde`, which reports its own error, unless it is one that Cerbos refuses and
/// `yaml_serde` would accept.
fn merge_tree(text: &str) -> Result<Option<yaml_merge::Node>, ParseError> {
    let into = |e: yaml_merge::Error| ParseError {
        path: "$".into(),
        line: e.mark.map(|m| m.0),
        column: e.mark.map(|m| m.1),
        message: e.message,
    };
    let tree = match yaml_merge::parse(text) {
        Ok(Some(tree)) => tree,
        Err(e) if e.refused => return Err(into(e)),
        Ok(None) | Err(_) => return Ok(None),
    };
    if !yaml_merge::has_merge_keys(&tree) {
        return Ok(None);
    }
    yaml_merge::merge(tree).map(Some).map_err(into)
}

fn steps(path: &serde_path_to_error::Path) -> Vec<yaml_merge::Step<'_>> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Map { key } => Some(yaml_merge::Step::Key(key)),
            Segment::Seq { index } => Some(yaml_merge::Step::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// The field named by serde's "unknown field `x`" message.
fn unknown_field(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("unknown field `")?;
    rest.split('`').next().map(str::to_string)
}

/// A YAML (or JSON, a subset) document as a JSON value, with merge keys applied.
pub fn yaml_value(text: &str) -> Result<Value, ParseError> {
    if let Some(tree) = merge_tree(text)? {
        let merged = yaml_merge::emit(&tree);
        let v: yaml_serde::Value = yaml_serde::from_str(&merged)
            .map_err(|e| error("$".into(), strip_position(&e.to_string())))?;
        return serde_json::to_value(v).map_err(|e| error("$".into(), e.to_string()));
    }
    let v: yaml_serde::Value = yaml_serde::from_str(text).map_err(|e| {
        let loc = e.location();
        ParseError {
            path: "$".into(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            message: strip_position(&e.to_string()),
        }
    })?;
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
        // The path is said once: yaml_serde's own `resourcePolicy.rules[0]: ` prefix goes.
        assert_eq!(err.matches("rules[0]").count(), 1, "{err}");
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
    fn merge_keys_in_any_spelling_keep_positions() {
        // `<< :` (a space before the colon) merges; the merged constant is there.
        let src = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: x\n  version: default\n  constants:\n    local: {<< : {blocked: mallory}}\n";
        let p = document::<PolicyFile>("p.yaml", src.as_bytes());
        let local = p
            .ok()
            .and_then(|p| p.resource_policy)
            .and_then(|r| r.constants)
            .map(|c| c.local)
            .unwrap_or_default();
        assert_eq!(local.get("blocked"), Some(&serde_json::json!("mallory")));
        // An error inside a merged value points at the value where it was written.
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Item {
            n: u32,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Doc {
            base: serde_json::Value,
            item: Item,
        }
        let src = "base: &b {n: x}\nitem:\n  << : *b\n";
        let err = document::<Doc>("d.yaml", src.as_bytes()).err();
        let err = err.map(|e| (e.path, e.line, e.column)).unwrap_or_default();
        assert_eq!(err, ("$.item.n".to_string(), Some(1), Some(14)));
        // An unknown field inside a merged mapping points at its key.
        let src = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: x\n  version: default\n  rules:\n    - << : {actions: [a], effect: EFFECT_ALLOW}\n      roles: [r]\n      colour: red\n";
        let err = document::<PolicyFile>("p.yaml", src.as_bytes()).err();
        let err = err
            .map(|e| (e.message, e.line, e.column))
            .unwrap_or_default();
        assert!(err.0.contains("colour"), "{err:?}");
        assert_eq!((err.1, err.2), (Some(8), Some(7)), "{err:?}");
        // A quoted "<<" is an ordinary key, as in Cerbos.
        let v = yaml_value("a: {\"<<\": {b: 1}}\n").unwrap_or_default();
        assert_eq!(v["a"]["<<"]["b"], 1);
        // Cerbos rejects a sequence as a merge value, and so do we, with a position.
        let err = yaml_value("x: &x {b: 1}\na:\n  <<: [*x]\n").err();
        assert!(err.is_some_and(|e| e.line == Some(3) && e.message.contains("sequence")));
    }

    #[test]
    fn merge_keys_apply() {
        let v = yaml_value("base: &b {x: 1}\nd:\n  <<: *b\n  y: 2\n").unwrap_or_default();
        assert_eq!(v["d"]["x"], 1);
        assert_eq!(v["d"]["y"], 2);
    }
}
