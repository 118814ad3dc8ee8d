//! YAML merge keys (`<<`), found in the parsed document and applied with every value's line
//! and column kept, so that errors in merged documents still say `file:line:column`.
//!
//! A merge key is a plain, untagged `<<` key, however it is spaced (`<<:`, `<< :`); a quoted
//! `"<<"` is an ordinary key. Its value is a mapping or an alias of one; the mapping's own keys
//! win over merged ones. A sequence of mappings and a `!!merge` tag are rejected. This is what
//! the Cerbos 0.55.0 binary does (established with `cerbos compile`, docs/compatibility.md).
//!
//! The merged tree is written back as flow-style YAML that `yaml_serde` reads with the same
//! scalar typing as the original, so merged and unmerged documents deserialize alike; errors
//! are located by walking their path in the merged tree.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Tag};

/// Most nodes a document may expand to through aliases (guards against "billion laughs").
pub const MAX_NODES: usize = 1_000_000;

/// A position: 1-based line and column.
pub type Mark = (usize, usize);

/// One node of a parsed document, with where it starts.
#[derive(Debug, Clone)]
pub struct Node {
    pub mark: Mark,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Scalar {
        text: String,
        plain: bool,
        tag: Option<String>,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// An error with a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub mark: Option<Mark>,
    pub message: String,
    /// A document other YAML readers accept but Cerbos refuses: the caller must not fall back
    /// to another reader.
    pub refused: bool,
}

fn error(mark: Mark, message: impl Into<String>) -> Error {
    Error {
        mark: Some(mark),
        message: message.into(),
        refused: false,
    }
}

fn tag_text(tag: &Tag) -> String {
    if tag.handle == "!!" || tag.handle == "tag:yaml.org,2002:" {
        format!("!!{}", tag.suffix)
    } else if tag.handle.starts_with("tag:") {
        format!("!<{}{}>", tag.handle, tag.suffix)
    } else {
        format!("{}{}", tag.handle, tag.suffix)
    }
}

/// A container being built.
struct Frame {
    mark: Mark,
    /// How many nodes had been read when it opened.
    opened: usize,
    anchor: usize,
    tag: Option<String>,
    map: bool,
    items: Vec<Node>,
}

fn size(node: &Node) -> usize {
    match &node.kind {
        Kind::Scalar { .. } => 1,
        Kind::Seq(items) => 1 + items.iter().map(size).sum::<usize>(),
        Kind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| size(k) + size(v))
                .sum::<usize>()
        }
    }
}

/// Parses one YAML document into a tree (aliases expanded). `Ok(None)` for an empty input.
pub fn parse(text: &str) -> Result<Option<Node>, Error> {
    let mut stack: Vec<Frame> = Vec::new();
    // anchor id → (node, its size, how many nodes had been read when it was defined)
    let mut anchors: HashMap<usize, (Node, usize, usize)> = HashMap::new();
    let mut read = 0usize;
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let mut nodes = 0usize;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| {
            error(
                (e.marker().line(), e.marker().col() + 1),
                e.info().to_string(),
            )
        })?;
        let mark = (span.start.line(), span.start.col() + 1);
        read += 1;
        let is_map = matches!(event, Event::MappingStart(..));
        let (node, anchor) = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(error(mark, "a file holds one YAML document"));
                }
                continue;
            }
            Event::MappingStart(anchor, tag) | Event::SequenceStart(anchor, tag) => {
                stack.push(Frame {
                    mark,
                    opened: read,
                    anchor,
                    tag: tag.map(|t| tag_text(&t)),
                    map: is_map,
                    items: Vec::new(),
                });
                continue;
            }
            Event::MappingEnd | Event::SequenceEnd => {
                let Some(frame) = stack.pop() else {
                    return Err(error(mark, "unbalanced YAML collection"));
                };
                if frame.tag.is_some() {
                    return Err(error(
                        frame.mark,
                        "tags on mappings and sequences are not supported",
                    ));
                }
                let kind = if frame.map {
                    let mut entries = Vec::with_capacity(frame.items.len() / 2);
                    let mut items = frame.items.into_iter();
                    while let (Some(k), Some(v)) = (items.next(), items.next()) {
                        entries.push((k, v));
                    }
                    Kind::Map(entries)
                } else {
                    Kind::Seq(frame.items)
                };
                // A block collection starts where its first item does (the parser's own
                // start mark of a block mapping may lie elsewhere).
                let mark = match &kind {
                    Kind::Map(entries) => entries.first().map_or(frame.mark, |(k, _)| k.mark),
                    Kind::Seq(items) => items.first().map_or(frame.mark, |i| i.mark),
                    Kind::Scalar { .. } => frame.mark,
                };
                (Node { mark, kind }, frame.anchor)
            }
            Event::Scalar(text, style, anchor, tag) => (
                Node {
                    mark,
                    kind: Kind::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain,
                        tag: tag.map(|t| tag_text(&t)),
                    },
                },
                anchor,
            ),
            Event::Alias(id) => {
                let Some((node, n, defined)) = anchors.get(&id) else {
                    return Err(error(mark, "an alias names an unknown anchor"));
                };
                // Cerbos 0.55 resolves a merge key's alias only to an anchor defined outside
                // the mapping that holds the key ("unknown anchor" otherwise); so do we.
                if let Some(parent) = stack.last()
                    && parent.map
                    && parent.items.len() % 2 == 1
                    && parent.items.last().is_some_and(is_merge_key)
                    && *defined > parent.opened
                {
                    return Err(Error {
                        refused: true,
                        ..error(
                            mark,
                            "a merge key's alias names an anchor defined inside the same mapping; Cerbos 0.55 rejects this (\"unknown anchor\"): define the anchor outside the mapping",
                        )
                    });
                }
                nodes += n;
                if nodes > MAX_NODES {
                    return Err(error(
                        mark,
                        format!("aliases expand the document beyond {MAX_NODES} nodes"),
                    ));
                }
                (node.clone(), 0)
            }
            _ => continue,
        };
        nodes += 1;
        if anchor != 0 {
            let n = size(&node);
            anchors.insert(anchor, (node.clone(), n, read));
        }
        match stack.last_mut() {
            Some(parent) => parent.items.push(node),
            None => root = Some(node),
        }
    }
    Ok(root)
}

fn is_merge_key(key: &Node) -> bool {
    matches!(&key.kind, Kind::Scalar { text, plain: true, tag: None } if text == "<<")
}

fn is_merge_tag(key: &Node) -> bool {
    matches!(&key.kind, Kind::Scalar { tag: Some(t), .. } if t == "!!merge")
}

/// Does any mapping of the tree have a merge key?
pub fn has_merge_keys(node: &Node) -> bool {
    match &node.kind {
        Kind::Scalar { .. } => false,
        Kind::Seq(items) => items.iter().any(has_merge_keys),
        Kind::Map(entries) => entries.iter().any(|(k, v)| {
            is_merge_key(k) || is_merge_tag(k) || has_merge_keys(k) || has_merge_keys(v)
        }),
    }
}

fn key_text(key: &Node) -> Option<&str> {
    match &key.kind {
        Kind::Scalar { text, .. } => Some(text),
        _ => None,
    }
}

/// Applies every merge key, innermost first. Duplicate keys are errors, as in `yaml_serde`.
pub fn merge(node: Node) -> Result<Node, Error> {
    let mark = node.mark;
    let kind = match node.kind {
        Kind::Scalar { .. } => node.kind,
        Kind::Seq(items) => Kind::Seq(items.into_iter().map(merge).collect::<Result<_, _>>()?),
        Kind::Map(entries) => {
            let mut own: Vec<(Node, Node)> = Vec::with_capacity(entries.len());
            let mut sources: Vec<Node> = Vec::new();
            let mut merge_key: Option<Mark> = None;
            for (k, v) in entries {
                if is_merge_tag(&k) {
                    return Err(error(
                        k.mark,
                        "a `!!merge` tag on a key is not supported (Cerbos 0.55 rejects it); write `<<:`",
                    ));
                }
                let v = merge(v)?;
                if is_merge_key(&k) {
                    if merge_key.is_some() {
                        return Err(error(k.mark, "duplicate merge key `<<`"));
                    }
                    merge_key = Some(k.mark);
                    match v.kind {
                        Kind::Map(_) => sources.push(v),
                        Kind::Seq(_) => {
                            return Err(error(
                                k.mark,
                                "the value of a merge key `<<` must be a mapping or an alias of one (Cerbos 0.55 rejects a sequence)",
                            ));
                        }
                        Kind::Scalar { .. } => {
                            return Err(error(
                                k.mark,
                                "the value of a merge key `<<` must be a mapping or an alias of one",
                            ));
                        }
                    }
                    continue;
                }
                let k = merge(k)?;
                let Some(name) = key_text(&k) else {
                    return Err(error(k.mark, "a mapping key must be a scalar"));
                };
                if own.iter().any(|(o, _)| key_text(o) == Some(name)) {
                    return Err(error(k.mark, format!("duplicate entry with key {name:?}")));
                }
                own.push((k, v));
            }
            for source in sources {
                if let Kind::Map(entries) = source.kind {
                    for (k, v) in entries {
                        let name = key_text(&k).map(str::to_string);
                        if !own.iter().any(|(o, _)| key_text(o) == name.as_deref()) {
                            own.push((k, v));
                        }
                    }
                }
            }
            Kind::Map(own)
        }
    };
    Ok(Node { mark, kind })
}

/// A plain scalar that can be written back as is: its YAML type resolution stays the same.
fn simple_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-' | '~'))
}

fn emit_scalar(out: &mut String, text: &str, plain: bool, tag: Option<&String>) {
    if let Some(t) = tag {
        out.push_str(t);
        out.push(' ');
    }
    if plain && text.is_empty() && tag.is_none() {
        out.push_str("null");
    } else if plain && simple_token(text) {
        out.push_str(text);
    } else {
        // JSON string syntax is valid YAML double-quoted syntax.
        out.push_str(&serde_json::Value::String(text.to_string()).to_string());
    }
}

/// Writes the tree back as one flow-style YAML document.
pub fn emit(node: &Node) -> String {
    let mut out = String::new();
    emit_into(&mut out, node);
    out
}

fn emit_into(out: &mut String, node: &Node) {
    match &node.kind {
        Kind::Scalar { text, plain, tag } => emit_scalar(out, text, *plain, tag.as_ref()),
        Kind::Seq(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                emit_into(out, item);
            }
            out.push(']');
        }
        Kind::Map(entries) => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                emit_into(out, k);
                out.push_str(": ");
                emit_into(out, v);
            }
            out.push('}');
        }
    }
}

/// One step of a `serde_path_to_error` path.
pub enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// The position of the node at `path` (the deepest one found), and of the key `field` in it
/// when that node is a mapping holding it (for "unknown field" errors).
pub fn locate(root: &Node, path: &[Step<'_>], field: Option<&str>) -> Mark {
    let mut node = root;
    // The key that led to `node`, when the last step was one.
    let mut via: Option<(&str, Mark)> = None;
    for step in path {
        let next = match (step, &node.kind) {
            (Step::Key(k), Kind::Map(entries)) => entries
                .iter()
                .find(|(key, _)| key_text(key) == Some(k))
                .map(|(key, v)| (v, Some((*k, key.mark)))),
            (Step::Index(i), Kind::Seq(items)) => items.get(*i).map(|v| (v, None)),
            _ => None,
        };
        match next {
            Some((n, key)) => {
                node = n;
                via = key;
            }
            None => break,
        }
    }
    if let (Some(field), Some((key, mark))) = (field, via)
        && field == key
    {
        return mark;
    }
    if let (Some(field), Kind::Map(entries)) = (field, &node.kind)
        && let Some((k, _)) = entries.iter().find(|(k, _)| key_text(k) == Some(field))
    {
        return k.mark;
    }
    node.mark
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(src: &str) -> Result<String, Error> {
        let tree = parse(src)?.ok_or_else(|| error((0, 0), "empty"))?;
        merge(tree).map(|t| emit(&t))
    }

    #[test]
    fn every_plain_spelling_merges_and_quoted_keys_do_not() {
        assert_eq!(merged("a: {<< : {b: 1}}\n").as_deref(), Ok("{a: {b: 1}}"));
        assert_eq!(merged("a:\n  <<: {b: 1}\n").as_deref(), Ok("{a: {b: 1}}"));
        assert_eq!(
            merged("x: &x {b: 1}\na:\n  <<   :   *x\n  c: 2\n").as_deref(),
            Ok("{x: {b: 1}, a: {c: 2, b: 1}}")
        );
        assert_eq!(
            merged("a: {\"<<\": {b: 1}}\n").as_deref(),
            Ok("{a: {\"<<\": {b: 1}}}")
        );
        assert_eq!(
            merged("a: {'<<': {b: 1}}\n").as_deref(),
            Ok("{a: {\"<<\": {b: 1}}}")
        );
    }

    #[test]
    fn own_keys_win_and_merged_values_keep_their_positions() {
        let tree = parse("x: &x {b: 1, c: 2}\na:\n  c: 3\n  <<: *x\n")
            .ok()
            .flatten()
            .and_then(|t| merge(t).ok());
        let Some(tree) = tree else { panic!("no tree") };
        assert_eq!(emit(&tree), "{x: {b: 1, c: 2}, a: {c: 3, b: 1}}");
        // `a.b` came from the anchor: its value is on line 1, column 11.
        assert_eq!(
            locate(&tree, &[Step::Key("a"), Step::Key("b")], None),
            (1, 11)
        );
        assert_eq!(locate(&tree, &[Step::Key("a")], Some("c")), (3, 3));
    }

    #[test]
    fn rejected_forms() {
        let e = merged("x: &x {b: 1}\na: {<<: [*x]}\n").err();
        assert!(e.is_some_and(|e| e.message.contains("sequence") && e.mark == Some((2, 5))));
        let e = merged("a: {!!merge <<: {b: 1}}\n").err();
        assert!(e.is_some_and(|e| e.message.contains("!!merge")));
        let e = merged("a: {<<: 1}\n").err();
        assert!(e.is_some_and(|e| e.message.contains("mapping")));
        let e = merged("a: {<<: {b: 1}, <<: {c: 1}}\n").err();
        assert!(e.is_some_and(|e| e.message.contains("duplicate")));
        let e = merged("a: {<<: {b: 1}, c: 1, c: 2}\n").err();
        assert!(e.is_some_and(|e| e.message.contains("duplicate") && e.mark == Some((1, 23))));
        let e = merged("a: 1\n---\nb: 2\n").err();
        assert!(e.is_some_and(|e| e.message.contains("one YAML document")));
    }

    #[test]
    fn a_merge_alias_to_an_anchor_inside_the_same_mapping_is_refused() {
        // As Cerbos 0.55 ("unknown anchor"), at the alias.
        for src in [
            "a:\n  x: &s {b: 1}\n  <<: *s\n",
            "a:\n  x: {y: &s {b: 1}}\n  << : *s\n",
        ] {
            let e = merged(src).err();
            assert!(
                e.as_ref().is_some_and(
                    |e| e.message.contains("same mapping") && e.mark.is_some_and(|m| m.0 == 3)
                ),
                "{src}: {e:?}"
            );
        }
        // An anchor outside the mapping, or an alias that is not a merge source, is fine.
        assert_eq!(
            merged("a:\n  x: &s {b: 1}\nc:\n  <<: *s\n").as_deref(),
            Ok("{a: {x: {b: 1}}, c: {b: 1}}")
        );
        assert_eq!(
            merged("a:\n  x: &s {b: 1}\n  y: {<<: *s}\n").as_deref(),
            Ok("{a: {x: {b: 1}, y: {b: 1}}}")
        );
    }

    #[test]
    fn scalars_keep_their_types_when_written_back() {
        assert_eq!(
            merged("a: {<<: {n: 1, s: '1', t: true, q: \"yes\", e: , m: a b, f: 1.5}}\n")
                .as_deref(),
            Ok("{a: {n: 1, s: \"1\", t: true, q: \"yes\", e: null, m: \"a b\", f: 1.5}}")
        );
    }

    #[test]
    fn alias_bombs_stop() {
        let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            src.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse(&src).err();
        assert!(e.is_some_and(|e| e.message.contains("beyond")));
    }
}
