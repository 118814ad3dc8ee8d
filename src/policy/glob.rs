//! Cerbos's globs for actions, roles and resource kinds: gobwas/glob with `:` as the separator.
//!
//! - `*` matches within one `:`-segment, `**` across segments, `?` one non-`:` character,
//!   `[abc]`/`[!a-z]` a class, `{a,b}` alternatives.
//! - A lone `*` is rewritten to `**`: it matches everything, `:` included.
//! - As in Cerbos's rule table, a pattern is a glob only if it contains `*`; otherwise it is
//!   compared literally (so `?`, `[]`, `{}` without a `*` are plain characters).

use regex::Regex;

/// A compiled glob.
#[derive(Debug, Clone)]
pub enum Glob {
    /// `*` (or `**`): everything.
    Any,
    Literal(Box<str>),
    /// Everything else: an anchored regex translated from the glob.
    Pattern {
        source: Box<str>,
        regex: Regex,
    },
}

impl Glob {
    /// Compiles `pattern`; the error names what is malformed.
    pub fn new(pattern: &str) -> Result<Glob, String> {
        if pattern == "*" || pattern == "**" {
            return Ok(Glob::Any);
        }
        if !pattern.contains('*') {
            return Ok(Glob::Literal(pattern.into()));
        }
        let regex = Regex::new(&translate(pattern)?)
            .map_err(|e| format!("invalid glob {pattern:?}: {e}"))?;
        Ok(Glob::Pattern {
            source: pattern.into(),
            regex,
        })
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            Glob::Any => true,
            Glob::Literal(l) => &**l == s,
            Glob::Pattern { regex, .. } => regex.is_match(s),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Glob::Any => "*",
            Glob::Literal(l) => l,
            Glob::Pattern { source, .. } => source,
        }
    }

    pub fn is_literal(&self) -> bool {
        matches!(self, Glob::Literal(_))
    }
}

/// Glob → anchored regex source.
fn translate(pattern: &str) -> Result<String, String> {
    let mut out = String::from("^(?s:");
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    let mut braces = 0usize;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '*' => {
                if chars.get(i + 1) == Some(&'*') {
                    out.push_str(".*");
                    i += 1;
                } else {
                    out.push_str("[^:]*");
                }
            }
            '?' => out.push_str("[^:]"),
            '[' => {
                let close = chars[i + 1..]
                    .iter()
                    .position(|&c| c == ']')
                    .map(|p| p + i + 1)
                    .ok_or_else(|| format!("invalid glob {pattern:?}: unclosed '['"))?;
                let mut class: String = chars[i + 1..close].iter().collect();
                if class.is_empty() {
                    return Err(format!("invalid glob {pattern:?}: empty '[]'"));
                }
                if let Some(rest) = class.strip_prefix('!') {
                    class = format!("^{rest}");
                }
                out.push('[');
                for ch in class.chars() {
                    if matches!(ch, '[' | ']' | '\\' | '&' | '~') {
                        out.push('\\');
                    }
                    out.push(ch);
                }
                out.push(']');
                i = close;
            }
            '{' => {
                braces += 1;
                out.push_str("(?:");
            }
            '}' if braces > 0 => {
                braces -= 1;
                out.push(')');
            }
            ',' if braces > 0 => out.push('|'),
            '\\' => {
                i += 1;
                let next = chars
                    .get(i)
                    .ok_or_else(|| format!("invalid glob {pattern:?}: trailing '\\'"))?;
                out.push_str(&regex::escape(&next.to_string()));
            }
            other => out.push_str(&regex::escape(&other.to_string())),
        }
        i += 1;
    }
    if braces > 0 {
        return Err(format!("invalid glob {pattern:?}: unclosed '{{'"));
    }
    out.push_str(")$");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(p: &str, s: &str) -> bool {
        Glob::new(p).map(|g| g.matches(s)).unwrap_or(false)
    }

    #[test]
    fn cerbos_separator_semantics() {
        assert!(m("*", "a:b:c"));
        assert!(m("view:*", "view:public"));
        assert!(!m("view:*", "view"));
        assert!(!m("view:*", "view:a:b"));
        assert!(m("a:*:d", "a:x:d"));
        assert!(!m("a:*:d", "a:x"));
        assert!(m("view:**", "view:a:b"));
        assert!(m("tools/call::*", "tools/call::deploy"));
        assert!(!m("tools/call::*", "tools/list::deploy"));
        assert!(m("tools/call::git_*", "tools/call::git_push"));
        assert!(m("{read,write}:*", "write:x"));
        assert!(m("v?ew:*", "view:x"));
        assert!(m("[a-c]*", "bzz"));
        assert!(!m("[!a-c]*", "bzz"));
    }

    #[test]
    fn without_a_star_everything_is_literal() {
        assert!(m("a?c", "a?c"));
        assert!(!m("a?c", "abc"));
        assert!(m("{a,b}", "{a,b}"));
    }

    #[test]
    fn malformed_globs_are_errors() {
        for bad in ["[abc*", "{a,b*", "x*\\"] {
            let err = Glob::new(bad).err().unwrap_or_default();
            assert!(err.contains("invalid glob"), "{bad}: {err}");
        }
    }

    /// A direct backtracking matcher for `*`, `**` and literals: the reference.
    fn reference(p: &[char], s: &[char]) -> bool {
        match p {
            [] => s.is_empty(),
            ['*', '*', rest @ ..] => (0..=s.len()).any(|i| reference(rest, &s[i..])),
            ['*', rest @ ..] => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != ':')
                .any(|i| reference(rest, &s[i..])),
            [c, rest @ ..] => s.first() == Some(c) && reference(rest, &s[1..]),
        }
    }

    proptest! {
        #[test]
        fn agrees_with_reference(p in "[ab:*]{0,7}", s in "[ab:]{0,7}") {
            let pc: Vec<char> = p.chars().collect();
            let sc: Vec<char> = s.chars().collect();
            let want = if p == "*" { true } else if !p.contains('*') { p == s } else { reference(&pc, &sc) };
            prop_assert_eq!(m(&p, &s), want, "pattern {:?} on {:?}", p, s);
        }
    }
}
