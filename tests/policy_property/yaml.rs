//! A small YAML writer for generated policies and suites: block style, JSON-quoted scalars,
//! merge keys written plainly in either spelling (`<<:`, `<< :`), anchors and aliases.
//! (serde's YAML writers quote `<<` and cannot write anchors, which is what the merge-key
//! cases need.)

use serde_json::Value;

/// A YAML node.
#[derive(Debug, Clone)]
pub enum Y {
    /// A scalar, already in its final text (JSON: valid YAML).
    Scalar(String),
    /// `*name`.
    Alias(String),
    List(Vec<Y>),
    Map(Vec<(Key, Y)>),
    /// `&name node`.
    Anchored(String, Box<Y>),
    /// Written in flow style (`{a: 1}`, `[x]`) wherever it appears.
    Flow(Box<Y>),
}

/// A mapping key.
#[derive(Debug, Clone)]
pub enum Key {
    Name(String),
    /// A merge key, `<<:` (false) or `<< :` (true).
    Merge(bool),
}

pub fn s(x: impl AsRef<str>) -> Y {
    Y::Scalar(Value::String(x.as_ref().to_string()).to_string())
}

pub fn json(v: &Value) -> Y {
    match v {
        Value::Array(xs) => Y::List(xs.iter().map(json).collect()),
        Value::Object(m) => Y::Map(
            m.iter()
                .map(|(k, v)| (Key::Name(k.clone()), json(v)))
                .collect(),
        ),
        other => Y::Scalar(other.to_string()),
    }
}

pub fn list(xs: impl IntoIterator<Item = Y>) -> Y {
    Y::List(xs.into_iter().collect())
}

pub fn strs<S: AsRef<str>>(xs: impl IntoIterator<Item = S>) -> Y {
    Y::Flow(Box::new(Y::List(
        xs.into_iter().map(|x| s(x.as_ref())).collect(),
    )))
}

/// A mapping builder.
#[derive(Debug, Clone, Default)]
pub struct M(pub Vec<(Key, Y)>);

impl M {
    pub fn new() -> M {
        M(Vec::new())
    }
    pub fn put(mut self, k: &str, v: Y) -> M {
        self.0.push((Key::Name(k.to_string()), v));
        self
    }
    pub fn push(&mut self, k: &str, v: Y) {
        self.0.push((Key::Name(k.to_string()), v));
    }
    pub fn merge(&mut self, spaced: bool, v: Y) {
        self.0.push((Key::Merge(spaced), v));
    }
    pub fn y(self) -> Y {
        Y::Map(self.0)
    }
}

pub fn key_text(k: &Key) -> String {
    match k {
        Key::Merge(false) => "<<".to_string(),
        Key::Merge(true) => "<< ".to_string(),
        Key::Name(n) => {
            let plain = n
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if plain {
                n.clone()
            } else {
                Value::String(n.clone()).to_string()
            }
        }
    }
}

pub fn flow(y: &Y) -> String {
    match y {
        Y::Scalar(t) => t.clone(),
        Y::Alias(a) => format!("*{a}"),
        Y::List(xs) => format!("[{}]", xs.iter().map(flow).collect::<Vec<_>>().join(", ")),
        Y::Map(kv) => format!(
            "{{{}}}",
            kv.iter()
                .map(|(k, v)| format!("{}: {}", key_text(k), flow(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Y::Anchored(a, inner) => format!("&{a} {}", flow(inner)),
        Y::Flow(inner) => flow(inner),
    }
}

/// The node on one line, if it is written inline in block style.
fn inline(y: &Y) -> Option<String> {
    match y {
        Y::Scalar(_) | Y::Alias(_) | Y::Flow(_) => Some(flow(y)),
        Y::List(xs) if xs.is_empty() => Some("[]".into()),
        Y::Map(kv) if kv.is_empty() => Some("{}".into()),
        Y::Anchored(a, inner) => inline(inner).map(|t| format!("&{a} {t}")),
        _ => None,
    }
}

fn block(y: &Y, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match y {
        Y::Map(kv) => {
            for (k, v) in kv {
                out.push_str(&format!("{pad}{}:", key_text(k)));
                value_after_colon(v, indent, out);
            }
        }
        Y::List(xs) => {
            for x in xs {
                match inline(x) {
                    Some(t) => out.push_str(&format!("{pad}- {t}\n")),
                    None => {
                        let mut inner = String::new();
                        block(x, indent + 2, &mut inner);
                        // The first line's indentation becomes the dash.
                        out.push_str(&format!("{pad}- {}", &inner[indent + 2..]));
                    }
                }
            }
        }
        other => {
            if let Some(t) = inline(other) {
                out.push_str(&format!("{pad}{t}\n"));
            }
        }
    }
}

fn value_after_colon(v: &Y, indent: usize, out: &mut String) {
    match (v, inline(v)) {
        (_, Some(t)) => out.push_str(&format!(" {t}\n")),
        (Y::Anchored(a, inner), None) => {
            out.push_str(&format!(" &{a}\n"));
            block(inner, indent + 2, out);
        }
        _ => {
            out.push('\n');
            block(v, indent + 2, out);
        }
    }
}

/// The document text.
pub fn render(y: &Y) -> String {
    let mut out = String::new();
    block(y, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_merge_keys_anchors_and_nesting() {
        let mut local = M::new();
        local.push(
            "base",
            Y::Anchored("b".into(), Box::new(json(&serde_json::json!({"a": 1})))),
        );
        local.merge(true, Y::Alias("b".into()));
        local.merge(false, Y::Flow(Box::new(M::new().put("c", s("x")).y())));
        let doc = M::new()
            .put("local", local.y())
            .put("rules", list([M::new().put("actions", strs(["view"])).y()]))
            .y();
        let text = render(&doc);
        assert_eq!(
            text,
            "local:\n  base: &b\n    a: 1\n  << : *b\n  <<: {c: \"x\"}\nrules:\n  - actions: [\"view\"]\n"
        );
        let v: Value = yaml_serde::from_str(&text).expect("valid YAML");
        assert_eq!(v["rules"][0]["actions"][0], "view");
    }
}
