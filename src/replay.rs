//! `toolgate policy replay`: every recorded decision of a window evaluated again under a
//! candidate policy set, in parallel over the cores, and what would change, grouped by
//! direction, principal, tool and the rule that now decides (issue 18 part 2).
//!
//! Reading the store is here; the pure re-evaluation is [`crate::policy::replay`]. Rows without
//! replay inputs (written before schema v4, identity refusals, check-API batches) are counted
//! as not replayable. `now()` is each decision's recorded time; globals, evaluation mode and
//! schema enforcement come from the candidate's config (`--config`), else the defaults.
//!
//! Shape (for speed, issue 18 part 2): the reader (the calling thread) reads integer columns
//! only and hands out chunks; lookups (`names`, `inputs`) are loaded once into maps. Workers
//! evaluate each distinct replay input once ([`MemoKey`]; an answer that could depend on the
//! time is never reused) and keep counts and a bounded number of examples per group
//! ([`EXAMPLES`]), so memory does not grow with the number of rows. `jsonl` lines are
//! serialised by the workers and written in seq order by a writer thread as chunks complete.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::audit::store::{digest_text, id_text, us_to_time};
use crate::policy::compile::PolicySet;
use crate::policy::input::{Params, Principal, Resource};
use crate::policy::model::Effect;
use crate::policy::replay::{Answer, Case, Known, Replayed, Replayer};

/// Example decision ids kept per group (the oldest), and for *needs arguments*: the report's
/// size depends on the number of groups, never on the number of rows.
pub const EXAMPLES: usize = 5;
/// Rows handed to a worker at once.
const CHUNK: usize = 4096;
/// Distinct inputs each worker remembers before it starts over (bounds its memory).
const MEMO: usize = 200_000;

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub db: PathBuf,
    pub policies: PathBuf,
    /// Globals, evaluation mode and schema enforcement.
    pub params: Params,
    /// Stored-form bounds (fixed-width RFC 3339), inclusive since, exclusive until.
    pub since: Option<String>,
    pub until: Option<String>,
    pub principal: Option<String>,
    pub server: Option<String>,
    pub tool: Option<String>,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Evaluate every row, even when an identical input was evaluated before (the memo's
    /// tests compare both; the reports are identical).
    pub no_memo: bool,
}

/// One group of changed decisions.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Group {
    /// `allow_to_deny` or `deny_to_allow`.
    pub direction: String,
    pub principal: String,
    pub tool: String,
    /// The policy and rule that decide now.
    pub policy: String,
    pub rule: String,
    pub count: u64,
    /// Decision ids, oldest first: the group's first [`EXAMPLES`].
    pub examples: Vec<String>,
}

/// One decision whose answer changes, or that needs its arguments (a `jsonl` line).
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub id: String,
    pub time: String,
    pub principal: String,
    pub server: String,
    pub tool: String,
    pub action: String,
    /// `allow_to_deny`, `deny_to_allow`, or `needs_arguments`.
    pub status: String,
    pub was: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub now: Option<Verdict>,
}

/// A decision's effect and deciding rule.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub effect: String,
    pub policy: String,
    pub rule: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// The whole answer: counts, and groups with a few examples each (never every row; `jsonl`
/// streams the rows through [`run`]'s `lines`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub db: String,
    pub policies: String,
    pub policy_hash: String,
    pub since: Option<String>,
    pub until: Option<String>,
    /// Decisions in the window.
    pub decisions: u64,
    pub replayed: u64,
    pub unchanged: u64,
    pub changed: u64,
    pub allow_to_deny: u64,
    pub deny_to_allow: u64,
    pub needs_arguments: u64,
    /// Rows without replay inputs (before schema v4, identity refusals, check-API batches).
    pub not_replayable: u64,
    pub groups: Vec<Group>,
    /// The first [`EXAMPLES`] ids of decisions that need their arguments.
    pub needs_arguments_examples: Vec<String>,
    pub elapsed_ms: u64,
}

/// A stored decision id (16 bytes, or text), formatted only when the row is reported.
#[derive(Clone)]
enum StoredId {
    Uuid([u8; 16]),
    Other(String),
}

impl StoredId {
    fn read(v: ValueRef<'_>) -> StoredId {
        match v {
            ValueRef::Blob(b) => match <[u8; 16]>::try_from(b) {
                Ok(u) => StoredId::Uuid(u),
                Err(_) => StoredId::Other(id_text(v)),
            },
            other => StoredId::Other(id_text(other)),
        }
    }

    fn text(&self) -> String {
        match self {
            StoredId::Uuid(b) => id_text(ValueRef::Blob(b)),
            StoredId::Other(s) => s.clone(),
        }
    }
}

/// A stored `args_digest`: SHA-256 bytes, other text, or none. Compared without formatting.
#[derive(Clone, PartialEq, Eq, Hash)]
enum StoredDigest {
    None,
    Sha256([u8; 32]),
    Other(String),
}

impl StoredDigest {
    fn read(v: ValueRef<'_>) -> StoredDigest {
        match v {
            ValueRef::Null => StoredDigest::None,
            ValueRef::Blob(b) => match <[u8; 32]>::try_from(b) {
                Ok(d) => StoredDigest::Sha256(d),
                Err(_) => StoredDigest::Other(digest_text(v)),
            },
            other => match digest_text(other) {
                t if t.is_empty() => StoredDigest::None,
                t => StoredDigest::Other(t),
            },
        }
    }

    /// Whether this is the digest of the canonical JSON text `canonical`.
    fn is_of(&self, canonical: &str) -> bool {
        match self {
            StoredDigest::None => false,
            StoredDigest::Sha256(d) => Sha256::digest(canonical.as_bytes())[..] == d[..],
            StoredDigest::Other(t) => crate::audit::chain::sha256_hex(canonical.as_bytes()) == *t,
        }
    }

    /// Whether this is the digest of `{}` (arguments of a call without any), without hashing.
    fn is_of_empty(&self, empty: &[u8; 32]) -> bool {
        match self {
            StoredDigest::None => false,
            StoredDigest::Sha256(d) => d == empty,
            StoredDigest::Other(t) => t.len() == 64 && crate::audit::links::hex(empty) == *t,
        }
    }

    /// Whether this is the digest of `v`, as `audit.arguments` computed it.
    fn is_of_value(&self, v: &Value) -> bool {
        self.is_of(&crate::audit::record::canonical_json(v))
    }
}

/// One decision read from the store: the row's integers, lookups unresolved.
struct Item {
    seq: i64,
    id: StoredId,
    time_us: i64,
    principal: i64,
    server: i64,
    tool: i64,
    action: i64,
    allow: bool,
    policy: i64,
    rule: i64,
    args_digest: StoredDigest,
    arguments: Option<String>,
    /// (principal input, resource input) ids.
    inputs: Option<(i64, i64)>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Opens the store read-only; it must be at schema v4 or later (it has replay inputs).
fn open(db: &Path) -> Result<Connection, String> {
    if !db.exists() {
        return Err(format!("{}: no such audit database", db.display()));
    }
    let c = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("{}: {e}", db.display()))?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(err)?;
    let v: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| format!("{}: {e}", db.display()))?;
    let latest = crate::audit::migrate::SQLITE.len() as i64;
    if v < 4 {
        return Err(format!(
            "{}: an audit store of schema version {v}, without replay inputs; start toolgate (this version) once to upgrade it to {latest}",
            db.display()
        ));
    }
    if v > latest {
        return Err(format!(
            "{}: an audit store of schema version {v}, newer than this toolgate knows ({latest})",
            db.display()
        ));
    }
    Ok(c)
}

/// The store's lookup tables, read once before the rows (a window's rows name a small set of
/// texts and inputs, shared by every worker).
struct Tables {
    names: HashMap<i64, Box<str>>,
    inputs: HashMap<i64, Box<str>>,
}

impl Tables {
    fn load(c: &Connection) -> Result<Tables, String> {
        let mut names = HashMap::new();
        let mut st = c.prepare("SELECT id, text FROM names").map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let text: String = r.get(1).map_err(err)?;
            names.insert(r.get(0).map_err(err)?, text.into_boxed_str());
        }
        let mut inputs = HashMap::new();
        let mut st = c.prepare("SELECT id, text FROM inputs").map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let text: String = r.get(1).map_err(err)?;
            inputs.insert(r.get(0).map_err(err)?, text.into_boxed_str());
        }
        Ok(Tables { names, inputs })
    }

    fn name(&self, id: i64) -> Result<&str, String> {
        self.names
            .get(&id)
            .map(|s| &**s)
            .ok_or_else(|| format!("names row {id} is missing"))
    }

    fn input(&self, id: i64) -> Result<&str, String> {
        self.inputs
            .get(&id)
            .map(|s| &**s)
            .ok_or_else(|| format!("inputs row {id} is missing"))
    }
}

fn name_id(c: &Connection, text: &str) -> Result<Option<i64>, String> {
    crate::audit::store::name_id(c, text).map_err(err)
}

/// The number of decisions in the window (for the progress bar).
pub fn count(db: &Path, o: &Options) -> Result<u64, String> {
    let c = open(db)?;
    let Some((sql, args)) = window_sql(&c, o, "count(*)")? else {
        return Ok(0);
    };
    let n: i64 = c
        .query_row(&sql, rusqlite::params_from_iter(args.iter()), |r| r.get(0))
        .map_err(err)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// `SELECT <cols> FROM decisions WHERE <window and filters>`; `None`: a filter names a value
/// that no row has.
fn window_sql(
    c: &Connection,
    o: &Options,
    cols: &str,
) -> Result<Option<(String, Vec<rusqlite::types::Value>)>, String> {
    use rusqlite::types::Value as V;
    let mut sql = format!("SELECT {cols} FROM decisions WHERE 1");
    let mut args: Vec<V> = Vec::new();
    // Shadow rows (schema v5) are what-if answers about a decision, not decisions.
    if let Some(shadow) = name_id(c, crate::audit::Kind::Shadow.as_str())? {
        sql.push_str(" AND kind != ?");
        args.push(V::Integer(shadow));
    }
    let time =
        |t: &str| crate::audit::store::time_to_us(t).ok_or_else(|| format!("bad time bound {t:?}"));
    if let Some(s) = &o.since {
        sql.push_str(" AND time >= ?");
        args.push(V::Integer(time(s)?));
    }
    if let Some(u) = &o.until {
        sql.push_str(" AND time < ?");
        args.push(V::Integer(time(u)?));
    }
    for (col, want) in [
        ("principal", &o.principal),
        ("server", &o.server),
        ("tool", &o.tool),
    ] {
        if let Some(w) = want {
            match name_id(c, w)? {
                Some(id) => {
                    sql.push_str(&format!(" AND {col} = ?"));
                    args.push(V::Integer(id));
                }
                None => return Ok(None),
            }
        }
    }
    Ok(Some((sql, args)))
}

/// Replays the window; `progress` is told how many rows were done, as they are. With `lines`,
/// every changed or needs-arguments decision is written there as a `jsonl` line ([`Change`]),
/// oldest first, while the replay runs.
pub fn run(
    o: &Options,
    progress: &(dyn Fn(u64) + Sync),
    lines: Option<Box<dyn Write + Send + '_>>,
) -> Result<Report, String> {
    let started = Instant::now();
    let set = crate::policy::store::load_dir(&o.policies).map_err(|errors| {
        let mut s = format!(
            "the candidate policies in {} do not compile:",
            o.policies.display()
        );
        for e in errors {
            s.push_str(&format!("\n  {e}"));
        }
        s
    })?;
    let c = open(&o.db)?;
    let tables = Tables::load(&c)?;
    let replayer = Replayer::new(&set, o.params.clone());
    let threads = match o.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<Item>)>(threads * 2);
    let rx = Mutex::new(rx);
    let failed = Failure::default();
    let mut decisions = 0u64;
    let partials = std::thread::scope(|s| -> Result<Vec<Partial>, String> {
        let (line_tx, writer) = match lines {
            Some(out) => {
                let (ltx, lrx) = mpsc::channel::<(u64, String)>();
                let failed = &failed;
                (
                    Some(ltx),
                    Some(s.spawn(move || write_lines(out, lrx, failed))),
                )
            }
            None => (None, None),
        };
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let w = Worker::new(&replayer, &tables, o.no_memo, line_tx.clone());
                let (rx, failed) = (&rx, &failed);
                s.spawn(move || w.run(rx, progress, failed))
            })
            .collect();
        drop(line_tx);
        let read = read_all(&c, o, &tx, &mut decisions, &failed);
        drop(tx);
        let mut out = Vec::new();
        for w in workers {
            out.push(w.join().map_err(|_| "a replay worker failed".to_string())?);
        }
        if let Some(w) = writer {
            w.join()
                .map_err(|_| "the replay's writer failed".to_string())?;
        }
        read?;
        failed.check()?;
        Ok(out)
    })?;
    report(o, &set, &tables, decisions, partials, started)
}

/// The first error of any thread; the others see it and stop.
#[derive(Default)]
struct Failure {
    set: AtomicBool,
    first: Mutex<Option<String>>,
}

impl Failure {
    fn fail(&self, e: String) {
        if let Ok(mut f) = self.first.lock() {
            f.get_or_insert(e);
        }
        self.set.store(true, Ordering::Relaxed);
    }

    fn failed(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<(), String> {
        match self.first.lock() {
            Ok(mut f) => f.take().map_or(Ok(()), Err),
            Err(_) => Err("a replay thread failed".to_string()),
        }
    }
}

/// Writes the workers' `jsonl` chunks in chunk (so seq) order as they complete.
fn write_lines(
    mut out: Box<dyn Write + Send + '_>,
    rx: mpsc::Receiver<(u64, String)>,
    failed: &Failure,
) {
    let mut pending: BTreeMap<u64, String> = BTreeMap::new();
    let mut next = 0u64;
    let mut ok = true;
    for (n, text) in rx {
        pending.insert(n, text);
        while let Some(text) = pending.remove(&next) {
            next += 1;
            if ok && let Err(e) = out.write_all(text.as_bytes()) {
                failed.fail(format!("writing the report: {e}"));
                ok = false;
            }
        }
    }
    if ok && let Err(e) = out.flush() {
        failed.fail(format!("writing the report: {e}"));
    }
}

/// Reads every decision of the window in seq order, integers only, and hands them out in
/// numbered chunks.
fn read_all(
    c: &Connection,
    o: &Options,
    tx: &mpsc::SyncSender<(u64, Vec<Item>)>,
    decisions: &mut u64,
    failed: &Failure,
) -> Result<(), String> {
    let cols = "seq, id, time, principal, server, tool, action, effect, policy, rule, args_digest, arguments, principal_input, resource_input";
    let Some((mut sql, args)) = window_sql(c, o, cols)? else {
        return Ok(());
    };
    sql.push_str(" ORDER BY seq");
    let mut st = c.prepare(&sql).map_err(err)?;
    let mut rows = st
        .query(rusqlite::params_from_iter(args.iter()))
        .map_err(err)?;
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut n = 0u64;
    while let Some(r) = rows.next().map_err(err)? {
        *decisions += 1;
        let g = |i: usize| -> Result<i64, String> { r.get(i).map_err(err) };
        let inputs = match (
            r.get::<_, Option<i64>>(12).map_err(err)?,
            r.get::<_, Option<i64>>(13).map_err(err)?,
        ) {
            (Some(p), Some(rs)) => Some((p, rs)),
            _ => None,
        };
        chunk.push(Item {
            seq: g(0)?,
            id: StoredId::read(r.get_ref(1).map_err(err)?),
            time_us: g(2)?,
            principal: g(3)?,
            server: g(4)?,
            tool: g(5)?,
            action: g(6)?,
            allow: g(7)? == 1,
            policy: g(8)?,
            rule: g(9)?,
            args_digest: StoredDigest::read(r.get_ref(10).map_err(err)?),
            arguments: match r.get_ref(11).map_err(err)? {
                ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                _ => None,
            },
            inputs,
        });
        if chunk.len() >= CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
            if failed.failed() || tx.send((n, full)).is_err() {
                return Ok(());
            }
            n += 1;
        }
    }
    if !chunk.is_empty() {
        let _ = tx.send((n, chunk));
    }
    Ok(())
}

/// The URI a `resources/read` decision names: from the stored arguments, else the action.
fn stored_uri(stored: Option<&Value>, action: &str) -> Option<String> {
    stored
        .and_then(|a| a.get("uri"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| action.split_once("::").map(|(_, u)| u.to_string()))
}

/// A parsed resource input, with which placeholders it has.
struct ResourceInput {
    resource: Arc<Resource>,
    has_uri: bool,
    has_arguments: bool,
}

/// Which of `uri` (1) and `arguments` (2) the store has exactly: their digest is the recorded
/// one. Cheap for the common rows (no hash when nothing is stored, no parse when the stored
/// text is what was digested).
fn known_tag(res: &ResourceInput, item: &Item, action: &str, empty: &[u8; 32]) -> u8 {
    let mut tag = 0u8;
    let parsed = || -> Option<Value> {
        item.arguments
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
    };
    if res.has_uri
        && stored_uri(parsed().as_ref(), action).is_some_and(|u| {
            item.args_digest
                .is_of_value(&serde_json::json!({ "uri": u }))
        })
    {
        tag |= 1;
    }
    if res.has_arguments {
        let exact = match item.arguments.as_deref() {
            // No stored arguments: `{}` (a call without any) is still known exactly.
            None => item.args_digest.is_of_empty(empty),
            // Stored canonical text whose digest is the recorded one; else the value re-encoded.
            Some(t) => {
                item.args_digest.is_of(t)
                    || match parsed() {
                        Some(v) => item.args_digest.is_of_value(&v),
                        None => item.args_digest.is_of_empty(empty),
                    }
            }
        };
        if exact {
            tag |= 2;
        }
    }
    tag
}

/// The values of `arguments` and `uri` as [`known_tag`] found them.
fn known(res: &ResourceInput, item: &Item, action: &str, tag: u8) -> (Known, Known) {
    let stored: Option<Value> = item
        .arguments
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok());
    let uri = if !res.has_uri {
        Known::Absent
    } else if tag & 1 != 0 {
        stored_uri(stored.as_ref(), action)
            .map(|u| Known::Exact(Value::String(u)))
            .unwrap_or(Known::Unknown)
    } else {
        Known::Unknown
    };
    let arguments = if !res.has_arguments {
        Known::Absent
    } else if tag & 2 != 0 {
        Known::Exact(stored.unwrap_or_else(|| Value::Object(Default::default())))
    } else {
        Known::Unknown
    };
    (arguments, uri)
}

fn effect_text(allow: bool) -> &'static str {
    if allow { "allow" } else { "deny" }
}

/// What identifies a replay input exactly: the deduplicated principal and resource inputs, the
/// action, which of `uri`/`arguments` are known, and, only when one is, the digest that names
/// its value (when neither is known, [`known`] does not read the row's arguments or digest, so
/// rows that differ only there share the answer). The recorded time is not in the key: an answer
/// that could depend on it ([`Answer::timed`]) is never reused.
#[derive(Clone, PartialEq, Eq, Hash)]
struct MemoKey {
    principal: i64,
    resource: i64,
    action: i64,
    tag: u8,
    digest: Option<StoredDigest>,
}

/// A memoized answer: the replayed verdict and its (policy, rule) index for grouping.
struct Memoized {
    replayed: Replayed,
    verdict: u32,
}

/// `status` values.
const ALLOW_TO_DENY: u8 = 0;
const DENY_TO_ALLOW: u8 = 1;

fn status_text(status: u8) -> &'static str {
    match status {
        ALLOW_TO_DENY => "allow_to_deny",
        DENY_TO_ALLOW => "deny_to_allow",
        _ => "needs_arguments",
    }
}

/// The oldest [`EXAMPLES`] decisions of a group, ascending by seq.
#[derive(Default)]
struct Examples(Vec<(i64, StoredId)>);

impl Examples {
    fn offer(&mut self, seq: i64, id: &StoredId) {
        if self.0.len() >= EXAMPLES && self.0.last().is_some_and(|(s, _)| *s < seq) {
            return;
        }
        let at = self.0.partition_point(|(s, _)| *s < seq);
        self.0.insert(at, (seq, id.clone()));
        self.0.truncate(EXAMPLES);
    }

    fn merge(&mut self, other: Examples) {
        for (seq, id) in other.0 {
            self.offer(seq, &id);
        }
    }
}

/// One group's tally in one worker.
#[derive(Default)]
struct Tally {
    count: u64,
    examples: Examples,
}

/// What one worker found: counts, and per (status, principal id, tool id, verdict index) a
/// tally. Its size follows the number of distinct groups, not of rows.
#[derive(Default)]
struct Partial {
    replayed: u64,
    unchanged: u64,
    not_replayable: u64,
    allow_to_deny: u64,
    deny_to_allow: u64,
    needs_arguments: u64,
    needs_arguments_examples: Examples,
    groups: HashMap<(u8, i64, i64, u32), Tally>,
    /// (policy, rule) by verdict index.
    verdicts: Vec<(String, String)>,
}

/// One evaluating thread: its memo, parsed inputs and tallies.
struct Worker<'a> {
    replayer: &'a Replayer<'a>,
    tables: &'a Tables,
    no_memo: bool,
    lines: Option<mpsc::Sender<(u64, String)>>,
    memo: HashMap<MemoKey, Option<u32>>,
    answers: Vec<Memoized>,
    principals: HashMap<i64, Arc<Principal>>,
    resources: HashMap<i64, ResourceInput>,
    verdict_ids: HashMap<(String, String), u32>,
    empty: [u8; 32],
    out: Partial,
}

impl<'a> Worker<'a> {
    fn new(
        replayer: &'a Replayer<'a>,
        tables: &'a Tables,
        no_memo: bool,
        lines: Option<mpsc::Sender<(u64, String)>>,
    ) -> Worker<'a> {
        Worker {
            replayer,
            tables,
            no_memo,
            lines,
            memo: HashMap::new(),
            answers: Vec::new(),
            principals: HashMap::new(),
            resources: HashMap::new(),
            verdict_ids: HashMap::new(),
            empty: Sha256::digest(b"{}").into(),
            out: Partial::default(),
        }
    }

    fn run(
        mut self,
        rx: &Mutex<mpsc::Receiver<(u64, Vec<Item>)>>,
        progress: &(dyn Fn(u64) + Sync),
        failed: &Failure,
    ) -> Partial {
        loop {
            let (n, chunk) = match rx.lock() {
                Ok(g) => match g.recv() {
                    Ok(c) => c,
                    Err(_) => break,
                },
                Err(_) => break,
            };
            // After a failure, drain without work so the reader never blocks.
            if failed.failed() {
                continue;
            }
            let rows = chunk.len() as u64;
            let mut text = String::new();
            for item in chunk {
                if let Err(e) = self.item(item, &mut text) {
                    failed.fail(e);
                    break;
                }
            }
            if let Some(tx) = &self.lines
                && tx.send((n, text)).is_err()
            {
                failed.fail("the replay's writer stopped".to_string());
            }
            progress(rows);
        }
        self.out
    }

    fn principal(&mut self, id: i64) -> Result<Arc<Principal>, String> {
        if let Some(p) = self.principals.get(&id) {
            return Ok(p.clone());
        }
        let p: Principal = serde_json::from_str(self.tables.input(id)?)
            .map_err(|e| format!("inputs row {id}: not a principal: {e}"))?;
        let p = Arc::new(p);
        self.principals.insert(id, p.clone());
        Ok(p)
    }

    fn resource(&mut self, id: i64) -> Result<&ResourceInput, String> {
        if !self.resources.contains_key(&id) {
            let r: Resource = serde_json::from_str(self.tables.input(id)?)
                .map_err(|e| format!("inputs row {id}: not a resource: {e}"))?;
            let input = ResourceInput {
                has_uri: r.attr.contains_key("uri"),
                has_arguments: r.attr.contains_key("arguments"),
                resource: Arc::new(r),
            };
            self.resources.insert(id, input);
        }
        self.resources
            .get(&id)
            .ok_or_else(|| format!("inputs row {id} is missing"))
    }

    fn verdict(&mut self, replayed: &Replayed) -> u32 {
        let (policy, rule) = match replayed {
            Replayed::Decided { policy, rule, .. } => (policy.as_str(), rule.as_str()),
            Replayed::NeedsArguments => ("", ""),
        };
        let key = (policy.to_string(), rule.to_string());
        if let Some(&i) = self.verdict_ids.get(&key) {
            return i;
        }
        let i = u32::try_from(self.out.verdicts.len()).unwrap_or(u32::MAX);
        self.out.verdicts.push(key.clone());
        self.verdict_ids.insert(key, i);
        i
    }

    /// Evaluates `item` (or finds its answer) and tallies it; appends its `jsonl` line to
    /// `text` when lines are wanted and it changed.
    fn item(&mut self, mut item: Item, text: &mut String) -> Result<(), String> {
        let Some((pid, rid)) = item.inputs else {
            self.out.not_replayable += 1;
            return Ok(());
        };
        self.out.replayed += 1;
        let (tables, replayer, empty) = (self.tables, self.replayer, self.empty);
        let action = tables.name(item.action)?;
        let res = self.resource(rid)?;
        let tag = known_tag(res, &item, action, &empty);
        let key = MemoKey {
            principal: pid,
            resource: rid,
            action: item.action,
            tag,
            digest: (tag != 0)
                .then(|| std::mem::replace(&mut item.args_digest, StoredDigest::None)),
        };
        let hit = if self.no_memo {
            None
        } else {
            self.memo.get(&key).copied().flatten()
        };
        let fresh;
        let (replayed, verdict) = match hit {
            Some(i) => match self.answers.get(i as usize) {
                Some(m) => (&m.replayed, m.verdict),
                None => return Err("the replay memo lost an answer".to_string()),
            },
            None => {
                let principal = self.principal(pid)?;
                let res = self.resource(rid)?;
                let (arguments, uri) = known(res, &item, action, tag);
                let Answer { replayed, timed } = replayer.replay(&Case {
                    principal: &principal,
                    resource: &res.resource,
                    action,
                    arguments,
                    uri,
                    now: chrono::DateTime::from_timestamp_micros(item.time_us).unwrap_or_default(),
                });
                let verdict = self.verdict(&replayed);
                if self.no_memo || timed {
                    if !self.no_memo {
                        self.memo.insert(key, None);
                    }
                    fresh = replayed;
                    (&fresh, verdict)
                } else {
                    if self.answers.len() >= MEMO {
                        self.answers.clear();
                        self.memo.clear();
                    }
                    let i = u32::try_from(self.answers.len()).unwrap_or(u32::MAX);
                    self.answers.push(Memoized { replayed, verdict });
                    self.memo.insert(key, Some(i));
                    match self.answers.last() {
                        Some(m) => (&m.replayed, m.verdict),
                        None => return Err("the replay memo lost an answer".to_string()),
                    }
                }
            }
        };
        let status = match replayed {
            Replayed::NeedsArguments => {
                self.out.needs_arguments += 1;
                self.out.needs_arguments_examples.offer(item.seq, &item.id);
                2
            }
            Replayed::Decided { effect, .. } => {
                if (*effect == Effect::Allow) == item.allow {
                    self.out.unchanged += 1;
                    return Ok(());
                }
                let status = if item.allow {
                    self.out.allow_to_deny += 1;
                    ALLOW_TO_DENY
                } else {
                    self.out.deny_to_allow += 1;
                    DENY_TO_ALLOW
                };
                let t = self
                    .out
                    .groups
                    .entry((status, item.principal, item.tool, verdict))
                    .or_default();
                t.count += 1;
                t.examples.offer(item.seq, &item.id);
                status
            }
        };
        if self.lines.is_some() {
            let t = tables;
            let line = Change {
                id: item.id.text(),
                time: us_to_time(item.time_us),
                principal: t.name(item.principal)?.to_string(),
                server: t.name(item.server)?.to_string(),
                tool: t.name(item.tool)?.to_string(),
                action: action.to_string(),
                status: status_text(status).to_string(),
                was: Verdict {
                    effect: effect_text(item.allow).to_string(),
                    policy: t.name(item.policy)?.to_string(),
                    rule: t.name(item.rule)?.to_string(),
                    reason: String::new(),
                },
                now: match replayed {
                    Replayed::NeedsArguments => None,
                    Replayed::Decided {
                        effect,
                        policy,
                        rule,
                        reason,
                    } => Some(Verdict {
                        effect: effect_text(*effect == Effect::Allow).to_string(),
                        policy: policy.clone(),
                        rule: rule.clone(),
                        reason: reason.clone(),
                    }),
                },
            };
            text.push_str(&serde_json::to_string(&line).map_err(err)?);
            text.push('\n');
        }
        Ok(())
    }
}

fn report(
    o: &Options,
    set: &PolicySet,
    tables: &Tables,
    decisions: u64,
    partials: Vec<Partial>,
    started: Instant,
) -> Result<Report, String> {
    let mut r = Report {
        db: o.db.display().to_string(),
        policies: o.policies.display().to_string(),
        policy_hash: set.hash.clone(),
        since: o.since.clone(),
        until: o.until.clone(),
        decisions,
        replayed: 0,
        unchanged: 0,
        changed: 0,
        allow_to_deny: 0,
        deny_to_allow: 0,
        needs_arguments: 0,
        not_replayable: 0,
        groups: Vec::new(),
        needs_arguments_examples: Vec::new(),
        elapsed_ms: 0,
    };
    let mut needs = Examples::default();
    let mut groups: BTreeMap<(String, String, String, String, String), Tally> = BTreeMap::new();
    for p in partials {
        r.replayed += p.replayed;
        r.unchanged += p.unchanged;
        r.not_replayable += p.not_replayable;
        r.allow_to_deny += p.allow_to_deny;
        r.deny_to_allow += p.deny_to_allow;
        r.needs_arguments += p.needs_arguments;
        needs.merge(p.needs_arguments_examples);
        for ((status, principal, tool, verdict), t) in p.groups {
            let (policy, rule) = p
                .verdicts
                .get(verdict as usize)
                .cloned()
                .unwrap_or_default();
            let key = (
                status_text(status).to_string(),
                tables.name(principal)?.to_string(),
                tables.name(tool)?.to_string(),
                policy,
                rule,
            );
            let g = groups.entry(key).or_default();
            g.count += t.count;
            g.examples.merge(t.examples);
        }
    }
    r.changed = r.allow_to_deny + r.deny_to_allow;
    r.needs_arguments_examples = needs.0.iter().map(|(_, id)| id.text()).collect();
    let mut groups: Vec<Group> = groups
        .into_iter()
        .map(|((direction, principal, tool, policy, rule), t)| Group {
            direction,
            principal,
            tool,
            policy,
            rule,
            count: t.count,
            examples: t.examples.0.iter().map(|(_, id)| id.text()).collect(),
        })
        .collect();
    // Deny→allow first (what a change newly allows), then the biggest groups.
    groups.sort_by(|a, b| {
        b.direction
            .cmp(&a.direction)
            .then(b.count.cmp(&a.count))
            .then(a.principal.cmp(&b.principal))
            .then(a.tool.cmp(&b.tool))
    });
    r.groups = groups;
    r.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(r)
}

/// The arrow form of a direction.
pub fn arrow(direction: &str) -> &'static str {
    match direction {
        "allow_to_deny" => "allow→deny",
        "deny_to_allow" => "deny→allow",
        _ => "needs arguments",
    }
}

/// The human report.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let rate = r
        .replayed
        .saturating_mul(1000)
        .checked_div(r.elapsed_ms)
        .unwrap_or(r.replayed);
    s.push_str(&format!(
        "replayed {} of {} decisions from {} under {} (snapshot {}) in {} ms ({rate}/s)\n",
        r.replayed,
        r.decisions,
        r.db,
        r.policies,
        r.policy_hash.get(..12).unwrap_or(&r.policy_hash),
        r.elapsed_ms
    ));
    s.push_str(&format!(
        "changed {} (deny→allow {}, allow→deny {}); unchanged {}; needs arguments {}; not replayable {}\n",
        r.changed, r.deny_to_allow, r.allow_to_deny, r.unchanged, r.needs_arguments, r.not_replayable
    ));
    if !r.groups.is_empty() {
        let header = [
            "DIRECTION",
            "PRINCIPAL",
            "TOOL",
            "NOW DECIDED BY",
            "COUNT",
            "EXAMPLES",
        ];
        let rows: Vec<[String; 6]> = r
            .groups
            .iter()
            .map(|g| {
                [
                    arrow(&g.direction).to_string(),
                    g.principal.clone(),
                    g.tool.clone(),
                    if g.rule.is_empty() {
                        g.policy.clone()
                    } else {
                        format!("{}#{}", g.policy, g.rule)
                    },
                    g.count.to_string(),
                    g.examples.join(" "),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, c) in widths.iter_mut().zip(row.iter()) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(widths.iter()).enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(c);
                } else {
                    l.push_str(&format!("{c:<w$}  "));
                }
            }
            l.trim_end().to_string() + "\n"
        };
        s.push('\n');
        s.push_str(&line(&header.map(str::to_string)));
        for row in &rows {
            s.push_str(&line(row));
        }
    }
    if !r.needs_arguments_examples.is_empty() {
        s.push_str(&format!(
            "\nneeds arguments (the candidate's answer could depend on arguments the store does not hold exactly), e.g. {}\n",
            r.needs_arguments_examples.join(" ")
        ));
    }
    s
}
