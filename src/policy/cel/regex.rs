//! Regular expressions: `matches` and cel-go's ext.Regex (`regex.replace`, `regex.extract`,
//! `regex.extractAll`), compiled once per pattern in a process-wide cache, in RE2's dialect:
//! `\d \w \s \b` are ASCII-only (Rust's are Unicode-aware), `[` inside a class is a literal,
//! and `\Q…\E` quotes.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use cel::common::types::{CelInt, CelList, CelOptional, CelString, INT_TYPE, STRING_TYPE};
use cel::common::value::{CowVal, Val};
use cel::{DeclarationError, Env, ExecutionError};
use regex::Regex;

use super::args::{Args, Ret, boolean, string, take};

/// Most patterns kept compiled; the cache is emptied when full.
const CACHE_SIZE: usize = 256;
/// Compiled-program size limit per pattern (bounds the cache's memory).
const SIZE_LIMIT: usize = 1 << 20;

static CACHE: LazyLock<Mutex<HashMap<String, Arc<Regex>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

pub(super) fn register(env: &mut Env) -> Result<(), DeclarationError> {
    env.add_overload(
        "@matches",
        "@matches",
        vec![STRING_TYPE, STRING_TYPE],
        matches,
    )?;
    env.add_overload(
        "regex.replace",
        "regex_replace_string_string_string",
        vec![STRING_TYPE, STRING_TYPE, STRING_TYPE],
        replace,
    )?;
    env.add_overload(
        "regex.replace",
        "regex_replace_string_string_string_int",
        vec![STRING_TYPE, STRING_TYPE, STRING_TYPE, INT_TYPE],
        replace,
    )?;
    env.add_overload(
        "regex.extract",
        "regex_extract_string_string",
        vec![STRING_TYPE, STRING_TYPE],
        extract,
    )?;
    env.add_overload(
        "regex.extractAll",
        "regex_extractAll_string_string",
        vec![STRING_TYPE, STRING_TYPE],
        extract_all,
    )?;
    Ok(())
}

/// The compiled `pattern` (RE2 syntax), from the cache when it is there.
pub(super) fn compile(pattern: &str) -> Result<Arc<Regex>, String> {
    if let Ok(cache) = CACHE.lock()
        && let Some(re) = cache.get(pattern)
    {
        return Ok(re.clone());
    }
    let re = regex::RegexBuilder::new(&translate(pattern))
        .size_limit(SIZE_LIMIT)
        .build()
        .map_err(|e| {
            e.to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_string()
        })?;
    let re = Arc::new(re);
    if let Ok(mut cache) = CACHE.lock() {
        if cache.len() >= CACHE_SIZE {
            cache.clear();
        }
        cache.insert(pattern.to_string(), re.clone());
    }
    Ok(re)
}

fn compiled(pattern: &str, function: &str) -> Result<Arc<Regex>, ExecutionError> {
    compile(pattern).map_err(|e| {
        ExecutionError::function_error(
            function,
            format!("invalid regular expression {pattern:?}: {e}"),
        )
    })
}

/// RE2 → Rust `regex`: ASCII Perl classes and word boundaries, literal `[` (and `&`, `~`,
/// which Rust treats as set operators) inside classes, and `\Q…\E` quoting.
pub(super) fn translate(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars().peekable();
    // Inside a class: whether a `]` now would be a literal (right after `[` or `[^`).
    let mut class: Option<bool> = None;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(e) = chars.next() else {
                    out.push('\\');
                    break;
                };
                if e == 'Q' && class.is_none() {
                    let mut quoted = String::new();
                    while let Some(q) = chars.next() {
                        if q == '\\' && chars.peek() == Some(&'E') {
                            chars.next();
                            break;
                        }
                        quoted.push(q);
                    }
                    out.push_str(&regex::escape(&quoted));
                    continue;
                }
                let inside = class.is_some();
                let replacement = match (e, inside) {
                    ('d', false) => "[0-9]",
                    ('D', _) => "[^0-9]",
                    ('w', false) => "[0-9A-Za-z_]",
                    ('W', _) => "[^0-9A-Za-z_]",
                    ('s', false) => "[\\t\\n\\f\\r ]",
                    ('S', _) => "[^\\t\\n\\f\\r ]",
                    ('d', true) => "0-9",
                    ('w', true) => "0-9A-Za-z_",
                    ('s', true) => "\\t\\n\\f\\r ",
                    ('b', false) => "(?-u:\\b)",
                    ('B', false) => "(?-u:\\B)",
                    _ => "",
                };
                if replacement.is_empty() {
                    out.push('\\');
                    out.push(e);
                } else {
                    out.push_str(replacement);
                }
                if class.is_some() {
                    class = Some(false);
                }
            }
            '[' => match class {
                None => {
                    out.push('[');
                    if chars.peek() == Some(&'^') {
                        chars.next();
                        out.push('^');
                    }
                    class = Some(true);
                }
                Some(_) if chars.peek() == Some(&':') => {
                    // A POSIX class such as `[:alpha:]`, in both dialects: copied through `:]`.
                    out.push('[');
                    let mut prev = '[';
                    for x in chars.by_ref() {
                        out.push(x);
                        if prev == ':' && x == ']' {
                            break;
                        }
                        prev = x;
                    }
                    class = Some(false);
                }
                Some(_) => {
                    out.push_str("\\[");
                    class = Some(false);
                }
            },
            ']' => match class {
                Some(true) => {
                    out.push_str("\\]");
                    class = Some(false);
                }
                Some(false) => {
                    out.push(']');
                    class = None;
                }
                None => out.push(']'),
            },
            // RE2 reads a `{` that starts no repetition (`{n}`, `{n,}`, `{n,m}`) as a literal.
            '{' if class.is_none() && !starts_repetition(chars.clone()) => out.push_str("\\{"),
            '&' | '~' if class.is_some() => {
                out.push('\\');
                out.push(c);
                class = Some(false);
            }
            _ => {
                out.push(c);
                if class.is_some() {
                    class = Some(false);
                }
            }
        }
    }
    out
}

/// Whether the characters after a `{` are `n}`, `n,}` or `n,m}`.
fn starts_repetition(rest: impl Iterator<Item = char>) -> bool {
    let mut body = String::new();
    for c in rest.take(32) {
        if c == '}' {
            let (min, max) = body.split_once(',').unwrap_or((&body, "0"));
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            return digits(min) && (max.is_empty() || digits(max));
        }
        body.push(c);
    }
    false
}

/// `s.matches(re)` / `matches(s, re)`: an unanchored search.
fn matches<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s, re] = take(args)?;
    let s = string(s.as_ref(), "matches")?;
    let re = compiled(string(re.as_ref(), "matches")?, "matches")?;
    Ok(boolean(re.is_match(s)))
}

/// The number of capture groups, refusing more than one (cel-go's extract functions).
fn one_group(re: &Regex, pattern: &str, function: &str) -> Result<usize, ExecutionError> {
    let groups = re.captures_len() - 1;
    if groups > 1 {
        return Err(ExecutionError::function_error(
            function,
            format!("regular expression has more than one capturing group: {pattern:?}"),
        ));
    }
    Ok(groups)
}

/// `regex.extract(s, re)`: the first match (or its one group), as an optional.
fn extract<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s, p] = take(args)?;
    let s = string(s.as_ref(), "regex.extract")?;
    let p = string(p.as_ref(), "regex.extract")?;
    let re = compiled(p, "regex.extract")?;
    let groups = one_group(&re, p, "regex.extract")?;
    let found = re.captures(s).and_then(|c| {
        let m = if groups == 1 { c.get(1) } else { c.get(0) };
        m.map(|m| m.as_str().to_string())
            .filter(|m| groups == 0 || !m.is_empty())
    });
    Ok(CowVal::owned(match found {
        Some(m) => CelOptional::of(Box::new(CelString::from(m))),
        None => CelOptional::none(),
    }))
}

/// `regex.extractAll(s, re)`: every match (or its one group, when not empty).
fn extract_all<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s, p] = take(args)?;
    let s = string(s.as_ref(), "regex.extractAll")?;
    let p = string(p.as_ref(), "regex.extractAll")?;
    let re = compiled(p, "regex.extractAll")?;
    let groups = one_group(&re, p, "regex.extractAll")?;
    let mut out: Vec<Box<dyn Val + 'v>> = Vec::new();
    for c in re.captures_iter(s) {
        let m = if groups == 1 { c.get(1) } else { c.get(0) };
        if let Some(m) = m.filter(|m| groups == 0 || !m.as_str().is_empty()) {
            out.push(Box::new(CelString::from(m.as_str().to_string())));
        }
    }
    Ok(CowVal::owned(CelList::from(out)))
}

/// `regex.replace(s, re, replacement[, count])`: `$1`, `${name}` refer to groups; a
/// reference to a group the pattern lacks is an error (cel-go validates the replacement).
fn replace<'b, 'v>(mut args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let count = if args.len() == 4 {
        args.pop()
            .map(|n| n.downcast_ref::<CelInt>().map(|n| *n.inner()))
    } else {
        None
    };
    let count = match count {
        Some(None) => {
            return Err(ExecutionError::function_error(
                "regex.replace",
                "count must be an int",
            ));
        }
        Some(Some(n)) => Some(n),
        None => None,
    };
    let [s, p, replacement] = take(args)?;
    let s = string(s.as_ref(), "regex.replace")?;
    let p = string(p.as_ref(), "regex.replace")?;
    let replacement = string(replacement.as_ref(), "regex.replace")?;
    let re = compiled(p, "regex.replace")?;
    validate_replacement(&re, replacement)?;
    let limit = match count {
        None | Some(-1) => 0,
        Some(n) if n <= 0 => return Ok(CowVal::owned(CelString::from(s.to_string()))),
        Some(n) if n > i64::from(i32::MAX) => {
            return Err(ExecutionError::function_error(
                "regex.replace",
                "integer overflow",
            ));
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    let out = re.replacen(s, limit, replacement).into_owned();
    Ok(CowVal::owned(CelString::from(out)))
}

/// cel-go's checks of `$N` / `${name}` references in a replacement.
fn validate_replacement(re: &Regex, replacement: &str) -> Result<(), ExecutionError> {
    let err = |m: String| ExecutionError::function_error("regex.replace", m);
    let groups = re.captures_len() - 1;
    let bytes = replacement.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let rest = &replacement[i + 1..];
        if rest.starts_with('$') {
            i += 2;
            continue;
        }
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !digits.is_empty() {
            let n: usize = digits.parse().unwrap_or(usize::MAX);
            if n > groups {
                return Err(err(format!(
                    "replacement string references group ${n}, but regex has only {groups} group(s)"
                )));
            }
            i += 1 + digits.len();
            continue;
        }
        if let Some(named) = rest.strip_prefix('{')
            && let Some(end) = named.find('}')
        {
            let name = &named[..end];
            let valid = re.capture_names().flatten().any(|g| g == name)
                || name.parse::<usize>().is_ok_and(|n| n <= groups);
            if !valid {
                return Err(err(format!(
                    "invalid capture group name in replacement string: {name}"
                )));
            }
            i += 2 + end + 1;
            continue;
        }
        let word: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !word.is_empty() {
            return Err(err(format!("invalid group reference: ${word}")));
        }
        i += 1;
    }
    Ok(())
}
