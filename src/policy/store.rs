//! Loading a policy directory and holding the current snapshot.
//!
//! Directory rules follow Cerbos's disk store: any depth; hidden files and directories are
//! ignored; `*_test.{yaml,yml,json}` are test suites and `testdata/` holds their fixtures
//! (both skipped here); `_schemas/` at the root holds JSON Schemas.
//!
//! [`Store`] swaps snapshots atomically (ArcSwap). A failed reload keeps the last good
//! snapshot whole (invariant I3) and says why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::Value;

use super::compile::{self, CompileError, PolicySet, SourceFile};
use super::parse;

/// How many files a policy tree may hold; a bigger tree is refused, not half-read.
pub const MAX_FILES: usize = 100_000;

/// What a directory holds, split by role.
#[derive(Debug, Default)]
pub struct DirContents {
    pub policies: Vec<SourceFile>,
    pub tests: Vec<PathBuf>,
    pub schemas: BTreeMap<String, Value>,
}

fn is_policy_ext(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json")
}

pub fn is_test_file(name: &str) -> bool {
    ["_test.yaml", "_test.yml", "_test.json"]
        .iter()
        .any(|s| name.ends_with(s))
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CompileError {
    CompileError {
        file: path.display().to_string(),
        path: "$".into(),
        line: None,
        column: None,
        message: e.to_string(),
    }
}

/// Reads a policy tree.
pub fn read_dir(root: &Path) -> Result<DirContents, Vec<CompileError>> {
    let mut out = DirContents::default();
    let mut errors = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    let mut count = 0usize;
    if !root.is_dir() {
        return Err(vec![io_err(root, "not a directory")]);
    }
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(io_err(&dir, e));
                continue;
            }
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            count += 1;
            if count > MAX_FILES {
                return Err(vec![io_err(root, format!("more than {MAX_FILES} files"))]);
            }
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                if name == "testdata" {
                    continue;
                }
                if rel == "_schemas" {
                    read_schemas(&path, &path, &mut out.schemas, &mut errors);
                    continue;
                }
                stack.push(path);
                continue;
            }
            if !is_policy_ext(&name) {
                continue;
            }
            if is_test_file(&name) {
                out.tests.push(path);
                continue;
            }
            match read_limited(&path) {
                Ok(bytes) => out.policies.push(SourceFile { name: rel, bytes }),
                Err(e) => errors.push(io_err(&path, e)),
            }
        }
    }
    out.policies.sort_by(|a, b| a.name.cmp(&b.name));
    out.tests.sort();
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Reads a file, refusing one over the size limit before reading it.
pub fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > parse::MAX_FILE_BYTES as u64 {
        return Err(format!(
            "file is {} bytes; the limit is {}",
            meta.len(),
            parse::MAX_FILE_BYTES
        ));
    }
    std::fs::read(path).map_err(|e| e.to_string())
}

fn read_schemas(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, Value>,
    errors: &mut Vec<CompileError>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            read_schemas(root, &path, out, errors);
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        let parsed = read_limited(&path).and_then(|b| {
            let text = String::from_utf8(b).map_err(|e| e.to_string())?;
            parse::yaml_value(&text).map_err(|e| e.to_string())
        });
        match parsed {
            Ok(v) => {
                out.insert(rel, v);
            }
            Err(e) => errors.push(io_err(&path, e)),
        }
    }
}

/// Reads and compiles a policy directory.
pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<CompileError>> {
    let contents = read_dir(dir)?;
    compile_on_big_stack(contents)
}

/// CEL parsing recurses; compile on a thread with a generous stack so that no policy text can
/// overflow the caller's (load-time caps refuse what would overflow at evaluation).
fn compile_on_big_stack(contents: DirContents) -> Result<PolicySet, Vec<CompileError>> {
    let worker = std::thread::Builder::new()
        .name("policy-compile".into())
        .stack_size(64 * 1024 * 1024)
        .spawn(move || compile::compile(&contents.policies, &contents.schemas));
    let joined = match worker {
        Ok(handle) => handle
            .join()
            .map_err(|_| "the compiler thread panicked".to_string()),
        Err(e) => Err(format!("cannot start the compiler thread: {e}")),
    };
    joined.unwrap_or_else(|e| Err(vec![io_err(Path::new(""), e)]))
}

/// The live snapshot: read lock-free, replaced whole.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    current: ArcSwap<PolicySet>,
    status: std::sync::Mutex<Status>,
}

/// When the snapshot was loaded and how the last reload went (the dashboard's Policies view).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    /// When the current snapshot was compiled (RFC 3339).
    pub loaded_at: String,
    /// The last failed load or reload, if it came after the current snapshot.
    pub last_error: Option<ReloadError>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadError {
    pub at: String,
    pub errors: Vec<String>,
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Store {
    /// Loads `dir`. If it does not compile, the store starts empty (deny all) and the errors
    /// are returned beside it, so a daemon can start and report.
    pub fn open(dir: &Path) -> (Store, Result<(), Vec<CompileError>>) {
        let (set, res) = match load_dir(dir) {
            Ok(set) => (set, Ok(())),
            Err(e) => (PolicySet::empty(), Err(e)),
        };
        let mut status = Status {
            loaded_at: now_text(),
            last_error: None,
        };
        if let Err(e) = &res {
            status.last_error = Some(ReloadError {
                at: now_text(),
                errors: e.iter().map(|e| e.to_string()).collect(),
            });
        }
        let store = Store {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(set),
            status: std::sync::Mutex::new(status),
        };
        (store, res)
    }

    /// The current snapshot. Hold it only for a synchronous evaluation.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Recompiles the directory; swaps only on success (invariant I3).
    pub fn reload(&self) -> Result<Arc<PolicySet>, Vec<CompileError>> {
        let set = match load_dir(&self.dir) {
            Ok(set) => Arc::new(set),
            Err(e) => {
                self.failed(&e);
                return Err(e);
            }
        };
        self.current.store(set.clone());
        if let Ok(mut st) = self.status.lock() {
            *st = Status {
                loaded_at: now_text(),
                last_error: None,
            };
        }
        Ok(set)
    }

    /// Records a reload refused before compiling (the last good snapshot stays).
    pub fn failed(&self, errors: &[CompileError]) {
        if let Ok(mut st) = self.status.lock() {
            st.last_error = Some(ReloadError {
                at: now_text(),
                errors: errors.iter().map(|e| e.to_string()).collect(),
            });
        }
    }

    /// When the snapshot was loaded, and the last reload error since.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
