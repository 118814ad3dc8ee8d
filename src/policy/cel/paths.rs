//! Cerbos's path functions with Go `path/filepath` semantics on Unix: `basePath`, `dirPath`,
//! `extPath`, `volumeName`, `joinPath`, `pathHasPrefix`, `pathMatch`, `pathMatchAnyOf`,
//! `relPath`. A relative path is taken relative to `/` where Cerbos would use its working
//! directory (`absPath` itself is not offered: see `check.rs`).

use cel::common::functions::Function;
use cel::common::types::{CelString, LIST_TYPE, STRING_TYPE};
use cel::common::value::CowVal;
use cel::{DeclarationError, Env, ExecutionError};

use super::args::{Args, Ret, boolean, string, strings, take};

pub(super) fn register(env: &mut Env) -> Result<(), DeclarationError> {
    let unary: [(&str, Function); 4] = [
        ("basePath", base_path),
        ("dirPath", dir_path),
        ("extPath", ext_path),
        ("volumeName", volume_name),
    ];
    for (name, f) in unary {
        env.add_overload(name, &format!("{name}_string"), vec![STRING_TYPE], f)?;
    }
    env.add_overload(
        "joinPath",
        "joinPath_stringarray",
        vec![LIST_TYPE],
        join_path,
    )?;
    env.add_overload(
        "relPath",
        "relPath_string_string",
        vec![STRING_TYPE, STRING_TYPE],
        rel_path,
    )?;
    let binary: [(&str, Function, cel::common::types::Type); 3] = [
        ("pathHasPrefix", path_has_prefix, STRING_TYPE),
        ("pathMatch", path_match, STRING_TYPE),
        ("pathMatchAnyOf", path_match_any_of, LIST_TYPE),
    ];
    for (name, f, arg) in binary {
        env.add_overload(
            name,
            &format!("{name}_overload"),
            vec![STRING_TYPE, arg.to_owned()],
            f,
        )?;
        env.add_member_overload(
            name,
            &format!("{name}_member_overload"),
            STRING_TYPE,
            vec![arg],
            f,
        )?;
    }
    Ok(())
}

fn str_result<'b, 'v>(s: String) -> Ret<'b, 'v> {
    Ok(CowVal::owned(CelString::from(s)))
}

fn base_path<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [p] = take(args)?;
    str_result(base(&clean(string(p.as_ref(), "basePath")?)))
}

fn dir_path<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [p] = take(args)?;
    str_result(dir(&clean(string(p.as_ref(), "dirPath")?)))
}

fn ext_path<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [p] = take(args)?;
    str_result(ext(&clean(string(p.as_ref(), "extPath")?)).to_string())
}

/// Always empty on Unix.
fn volume_name<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [p] = take(args)?;
    string(p.as_ref(), "volumeName")?;
    str_result(String::new())
}

fn join_path<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [list] = take(args)?;
    let elems = strings(list.as_ref(), "joinPath").map_err(|_| {
        ExecutionError::function_error("joinPath", "failed to convert list to string slice")
    })?;
    str_result(join(&elems))
}

fn rel_path<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [b, t] = take(args)?;
    let (b, t) = (
        string(b.as_ref(), "relPath")?,
        string(t.as_ref(), "relPath")?,
    );
    let rel = rel(&clean(b), &clean(t)).map_err(|e| {
        ExecutionError::function_error(
            "relPath",
            format!("failed to determine relative path of {t}: {e}"),
        )
    })?;
    str_result(rel)
}

fn path_has_prefix<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [p, prefix] = take(args)?;
    let p = abs(string(p.as_ref(), "pathHasPrefix")?);
    let prefix = abs(string(prefix.as_ref(), "pathHasPrefix")?);
    let rel = rel(&prefix, &p).map_err(|e| {
        ExecutionError::function_error(
            "pathHasPrefix",
            format!("failed to determine relative path of {prefix}: {e}"),
        )
    })?;
    Ok(boolean(
        !rel.is_empty() && !rel.starts_with('.') && !rel.starts_with('/'),
    ))
}

fn path_match<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [p, pattern] = take(args)?;
    let p = string(p.as_ref(), "pathMatch")?;
    let pattern = string(pattern.as_ref(), "pathMatch")?;
    Ok(boolean(match_one(p, pattern, "pathMatch")?))
}

fn path_match_any_of<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [p, patterns] = take(args)?;
    let p = string(p.as_ref(), "pathMatchAnyOf")?;
    let patterns = strings(patterns.as_ref(), "pathMatchAnyOf").map_err(|_| {
        ExecutionError::function_error("pathMatchAnyOf", "failed to convert list to string slice")
    })?;
    for pattern in patterns {
        if match_one(p, pattern, "pathMatchAnyOf")? {
            return Ok(boolean(true));
        }
    }
    Ok(boolean(false))
}

fn match_one(p: &str, pattern: &str, function: &str) -> Result<bool, ExecutionError> {
    glob_match(pattern, &clean(p)).map_err(|_| {
        ExecutionError::function_error(
            function,
            format!("failed to match pattern {pattern:?} on path {p:?}: syntax error in pattern"),
        )
    })
}

/// `filepath.Abs`, with `/` as the working directory.
fn abs(p: &str) -> String {
    if p.starts_with('/') {
        clean(p)
    } else {
        clean(&format!("/{p}"))
    }
}

/// Go's `lazybuf.append`: writes at `w`, the logical length of `buf`.
fn append(buf: &mut Vec<u8>, w: &mut usize, c: u8) {
    if *w < buf.len() {
        buf[*w] = c;
    } else {
        buf.push(c);
    }
    *w += 1;
}

/// Go `filepath.Clean`.
pub(super) fn clean(path: &str) -> String {
    if path.is_empty() {
        return ".".to_string();
    }
    let p = path.as_bytes();
    let n = p.len();
    let rooted = p[0] == b'/';
    // Go's lazybuf: `w` is the logical length of `buf`.
    let mut buf: Vec<u8> = Vec::with_capacity(n);
    let mut w = 0usize;
    let (mut r, mut dotdot) = (0, 0);
    if rooted {
        append(&mut buf, &mut w, b'/');
        r = 1;
        dotdot = 1;
    }
    while r < n {
        let empty = p[r] == b'/';
        let dot = p[r] == b'.' && (r + 1 == n || p[r + 1] == b'/');
        if empty || dot {
            r += 1;
        } else if p[r] == b'.' && p.get(r + 1) == Some(&b'.') && (r + 2 == n || p[r + 2] == b'/') {
            r += 2;
            if w > dotdot {
                w -= 1;
                while w > dotdot && buf[w] != b'/' {
                    w -= 1;
                }
            } else if !rooted {
                if w > 0 {
                    append(&mut buf, &mut w, b'/');
                }
                append(&mut buf, &mut w, b'.');
                append(&mut buf, &mut w, b'.');
                dotdot = w;
            }
        } else {
            if (rooted && w != 1) || (!rooted && w != 0) {
                append(&mut buf, &mut w, b'/');
            }
            while r < n && p[r] != b'/' {
                append(&mut buf, &mut w, p[r]);
                r += 1;
            }
        }
    }
    if w == 0 {
        return ".".to_string();
    }
    String::from_utf8_lossy(&buf[..w]).into_owned()
}

/// Go `filepath.Base`.
fn base(path: &str) -> String {
    if path.is_empty() {
        return ".".to_string();
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return "/".to_string();
    }
    match trimmed.rfind('/') {
        Some(i) => trimmed[i + 1..].to_string(),
        None => trimmed.to_string(),
    }
}

/// Go `filepath.Dir`.
fn dir(path: &str) -> String {
    let upto = path.rfind('/').map_or(0, |i| i + 1);
    clean(&path[..upto])
}

/// Go `filepath.Ext`.
fn ext(path: &str) -> &str {
    for (i, b) in path.bytes().enumerate().rev() {
        if b == b'/' {
            break;
        }
        if b == b'.' {
            return &path[i..];
        }
    }
    ""
}

/// Go `filepath.Join`: the non-empty elements from the first, joined and cleaned.
fn join(elems: &[&str]) -> String {
    match elems.iter().position(|e| !e.is_empty()) {
        Some(i) => clean(&elems[i..].join("/")),
        None => String::new(),
    }
}

/// Go `filepath.Rel`.
fn rel(basepath: &str, targpath: &str) -> Result<String, String> {
    let cant = || format!("Rel: can't make {targpath} relative to {basepath}");
    let base = clean(basepath);
    let targ = clean(targpath);
    if targ == base {
        return Ok(".".to_string());
    }
    let base = if base == "." { String::new() } else { base };
    let (b, t) = (base.as_bytes(), targ.as_bytes());
    let base_slashed = b.first() == Some(&b'/');
    let targ_slashed = t.first() == Some(&b'/');
    if base_slashed != targ_slashed {
        return Err(cant());
    }
    let (bl, tl) = (b.len(), t.len());
    let (mut b0, mut bi, mut t0, mut ti) = (0, 0, 0, 0);
    loop {
        while bi < bl && b[bi] != b'/' {
            bi += 1;
        }
        while ti < tl && t[ti] != b'/' {
            ti += 1;
        }
        if t[t0..ti] != b[b0..bi] {
            break;
        }
        if bi < bl {
            bi += 1;
        }
        if ti < tl {
            ti += 1;
        }
        b0 = bi;
        t0 = ti;
        if b0 == bl && t0 == tl {
            break;
        }
    }
    if &b[b0..bi] == b".." {
        return Err(cant());
    }
    if b0 != bl {
        let seps = b[b0..bl].iter().filter(|c| **c == b'/').count();
        let mut out = String::from("..");
        for _ in 0..seps {
            out.push_str("/..");
        }
        if t0 != tl {
            out.push('/');
            out.push_str(&targ[t0..]);
        }
        return Ok(out);
    }
    Ok(targ[t0..].to_string())
}

/// A malformed glob pattern.
#[derive(Debug)]
struct BadPattern;

/// Go `filepath.Match` on Unix: `*` (no `/`), `?`, `[...]` classes with `^` and ranges, `\`.
fn glob_match(pattern: &str, name: &str) -> Result<bool, BadPattern> {
    let mut pattern = pattern.as_bytes();
    let mut name = name.as_bytes();
    'pattern: while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            return Ok(!name.contains(&b'/'));
        }
        let (t, ok) = match_chunk(chunk, name)?;
        if ok && (t.is_empty() || !pattern.is_empty()) {
            name = t;
            continue;
        }
        if star {
            let mut i = 0;
            while i < name.len() && name[i] != b'/' {
                let (t, ok) = match_chunk(chunk, &name[i + 1..])?;
                if ok {
                    if pattern.is_empty() && !t.is_empty() {
                        i += 1;
                        continue;
                    }
                    name = t;
                    continue 'pattern;
                }
                i += 1;
            }
        }
        while !pattern.is_empty() {
            let (_, chunk, rest) = scan_chunk(pattern);
            pattern = rest;
            match_chunk(chunk, b"")?;
        }
        return Ok(false);
    }
    Ok(name.is_empty())
}

fn scan_chunk(mut pattern: &[u8]) -> (bool, &[u8], &[u8]) {
    let mut star = false;
    while pattern.first() == Some(&b'*') {
        pattern = &pattern[1..];
        star = true;
    }
    let mut in_range = false;
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            b'\\' if i + 1 < pattern.len() => i += 1,
            b'[' => in_range = true,
            b']' => in_range = false,
            b'*' if !in_range => break,
            _ => {}
        }
        i += 1;
    }
    (star, &pattern[..i], &pattern[i..])
}

/// Go `utf8.DecodeRune`: the character and its length, U+FFFD and 1 when invalid.
fn decode(s: &[u8]) -> (char, usize) {
    let width = match s.first() {
        None => return (char::REPLACEMENT_CHARACTER, 0),
        Some(b) if *b < 0x80 => 1,
        Some(b) if *b >= 0xF0 => 4,
        Some(b) if *b >= 0xE0 => 3,
        Some(_) => 2,
    };
    match s.get(..width).and_then(|c| std::str::from_utf8(c).ok()) {
        Some(c) => (
            c.chars().next().unwrap_or(char::REPLACEMENT_CHARACTER),
            width,
        ),
        None => (char::REPLACEMENT_CHARACTER, 1),
    }
}

fn match_chunk<'n>(mut chunk: &[u8], mut s: &'n [u8]) -> Result<(&'n [u8], bool), BadPattern> {
    let mut failed = false;
    while let Some(&c) = chunk.first() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match c {
            b'[' => {
                let mut r = '\0';
                if !failed {
                    let (ch, n) = decode(s);
                    r = ch;
                    s = &s[n..];
                }
                chunk = &chunk[1..];
                let mut negated = false;
                if chunk.first() == Some(&b'^') {
                    negated = true;
                    chunk = &chunk[1..];
                }
                let mut matched = false;
                let mut nrange = 0;
                loop {
                    if chunk.first() == Some(&b']') && nrange > 0 {
                        chunk = &chunk[1..];
                        break;
                    }
                    let (lo, rest) = get_esc(chunk)?;
                    chunk = rest;
                    let mut hi = lo;
                    if chunk.first() == Some(&b'-') {
                        let (h, rest) = get_esc(&chunk[1..])?;
                        hi = h;
                        chunk = rest;
                    }
                    if lo <= r && r <= hi {
                        matched = true;
                    }
                    nrange += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            b'?' => {
                if !failed {
                    if s[0] == b'/' {
                        failed = true;
                    }
                    let (_, n) = decode(s);
                    s = &s[n.max(1)..];
                }
                chunk = &chunk[1..];
            }
            _ => {
                if c == b'\\' {
                    chunk = &chunk[1..];
                    if chunk.is_empty() {
                        return Err(BadPattern);
                    }
                }
                if !failed {
                    if chunk[0] != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
        }
    }
    if failed {
        return Ok((b"", false));
    }
    Ok((s, true))
}

fn get_esc(chunk: &[u8]) -> Result<(char, &[u8]), BadPattern> {
    let mut chunk = chunk;
    match chunk.first() {
        None | Some(b'-') | Some(b']') => return Err(BadPattern),
        Some(b'\\') => {
            chunk = &chunk[1..];
            if chunk.is_empty() {
                return Err(BadPattern);
            }
        }
        Some(_) => {}
    }
    let (r, n) = decode(chunk);
    if r == char::REPLACEMENT_CHARACTER && n == 1 {
        return Err(BadPattern);
    }
    let rest = &chunk[n..];
    if rest.is_empty() {
        return Err(BadPattern);
    }
    Ok((r, rest))
}
