//! `toolgate policy replay`: every recorded decision of a window evaluated again under a
//! candidate policy set, in parallel over the cores, and what would change, grouped by
//! direction, principal, tool and the rule that now decides (issue 18 part 2).
//!
//! Reading the store is here; the pure re-evaluation is [`crate::policy::replay`]. Rows without
//! replay inputs (written before schema v4, identity refusals, check-API batches) are counted
//! as not replayable. `now()` is each decision's recorded time; globals, evaluation mode and
//! schema enforcement come from the candidate's config (`--config`), else the defaults.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::audit::store::{digest_text, id_text, us_to_time};
use crate::policy::compile::PolicySet;
use crate::policy::input::{Params, Principal, Resource};
use crate::policy::model::Effect;
use crate::policy::replay::{Case, Known, Memo, Replayed, Replayer};

/// Examples kept per group.
const EXAMPLES: usize = 5;
/// Rows handed to a worker at once.
const CHUNK: usize = 4096;
/// Answers each worker remembers (inputs repeat: a caller calls the same tools).
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
    /// Decision ids, oldest first.
    pub examples: Vec<String>,
}

/// One decision whose answer changes, or that needs its arguments.
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
    #[serde(skip)]
    seq: i64,
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

/// The whole answer.
#[derive(Debug, Clone, Serialize)]
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
    /// Up to a few ids of decisions that need their arguments.
    pub needs_arguments_examples: Vec<String>,
    pub elapsed_ms: u64,
    /// Every changed or needs-arguments decision, oldest first (the jsonl lines).
    #[serde(skip)]
    pub changes: Vec<Change>,
}

/// A stored decision id (16 bytes, or text), formatted only when the row is reported.
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

    /// Whether this is the digest of `v`, as `audit.arguments` computed it.
    fn is_of_value(&self, v: &Value) -> bool {
        self.is_of(&crate::audit::record::canonical_json(v))
    }
}

/// One decision read from the store.
struct Item {
    seq: i64,
    id: StoredId,
    time_us: i64,
    principal: Arc<str>,
    server: Arc<str>,
    tool: Arc<str>,
    action: Arc<str>,
    action_id: i64,
    allow: bool,
    policy: Arc<str>,
    rule: Arc<str>,
    args_digest: StoredDigest,
    arguments: Option<String>,
    inputs: Option<(i64, i64, Arc<Principal>, Arc<Resource>)>,
}

/// What one worker found.
#[derive(Default)]
struct Partial {
    replayed: u64,
    unchanged: u64,
    not_replayable: u64,
    changes: Vec<Change>,
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

/// Caches of the store's lookups, as the reader needs them.
#[derive(Default)]
struct Lookups {
    names: HashMap<i64, Arc<str>>,
    principals: HashMap<i64, Arc<Principal>>,
    resources: HashMap<i64, Arc<Resource>>,
}

impl Lookups {
    fn name(&mut self, c: &Connection, id: i64) -> Result<Arc<str>, String> {
        if let Some(s) = self.names.get(&id) {
            return Ok(s.clone());
        }
        let s: String = c
            .prepare_cached("SELECT text FROM names WHERE id = ?1")
            .and_then(|mut st| st.query_row([id], |r| r.get(0)).optional())
            .map_err(err)?
            .ok_or_else(|| format!("names row {id} is missing"))?;
        let s: Arc<str> = s.into();
        self.names.insert(id, s.clone());
        Ok(s)
    }

    fn input_text(c: &Connection, id: i64) -> Result<String, String> {
        c.prepare_cached("SELECT text FROM inputs WHERE id = ?1")
            .and_then(|mut st| st.query_row([id], |r| r.get(0)).optional())
            .map_err(err)?
            .ok_or_else(|| format!("inputs row {id} is missing"))
    }

    fn principal(&mut self, c: &Connection, id: i64) -> Result<Arc<Principal>, String> {
        if let Some(p) = self.principals.get(&id) {
            return Ok(p.clone());
        }
        let p: Principal = serde_json::from_str(&Self::input_text(c, id)?)
            .map_err(|e| format!("inputs row {id}: not a principal: {e}"))?;
        let p = Arc::new(p);
        self.principals.insert(id, p.clone());
        Ok(p)
    }

    fn resource(&mut self, c: &Connection, id: i64) -> Result<Arc<Resource>, String> {
        if let Some(r) = self.resources.get(&id) {
            return Ok(r.clone());
        }
        let r: Resource = serde_json::from_str(&Self::input_text(c, id)?)
            .map_err(|e| format!("inputs row {id}: not a resource: {e}"))?;
        let r = Arc::new(r);
        self.resources.insert(id, r.clone());
        Ok(r)
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

/// Replays the window; `progress` is told how many rows were done, as they are.
pub fn run(o: &Options, progress: &(dyn Fn(u64) + Sync)) -> Result<Report, String> {
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
    let replayer = Replayer::new(&set, o.params.clone());
    let threads = match o.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let (tx, rx) = mpsc::sync_channel::<Vec<Item>>(threads * 2);
    let rx = Mutex::new(rx);
    let mut decisions = 0u64;
    let partials: Vec<Partial> = std::thread::scope(|s| -> Result<Vec<Partial>, String> {
        let workers: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| work(&replayer, &rx, progress)))
            .collect();
        let read = read_all(&c, o, &tx, &mut decisions);
        drop(tx);
        let mut out = Vec::new();
        for w in workers {
            out.push(w.join().map_err(|_| "a replay worker failed".to_string())?);
        }
        read.map(|()| out)
    })?;
    Ok(report(o, &set, decisions, partials, started))
}

/// Reads every decision of the window in seq order and hands them out in chunks.
fn read_all(
    c: &Connection,
    o: &Options,
    tx: &mpsc::SyncSender<Vec<Item>>,
    decisions: &mut u64,
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
    let mut lk = Lookups::default();
    let mut chunk = Vec::with_capacity(CHUNK);
    while let Some(r) = rows.next().map_err(err)? {
        *decisions += 1;
        let g = |i: usize| -> Result<i64, String> { r.get(i).map_err(err) };
        let inputs = match (
            r.get::<_, Option<i64>>(12).map_err(err)?,
            r.get::<_, Option<i64>>(13).map_err(err)?,
        ) {
            (Some(p), Some(rs)) => Some((p, rs, lk.principal(c, p)?, lk.resource(c, rs)?)),
            _ => None,
        };
        let action_id = g(6)?;
        chunk.push(Item {
            seq: g(0)?,
            id: StoredId::read(r.get_ref(1).map_err(err)?),
            time_us: g(2)?,
            principal: lk.name(c, g(3)?)?,
            server: lk.name(c, g(4)?)?,
            tool: lk.name(c, g(5)?)?,
            action: lk.name(c, action_id)?,
            action_id,
            allow: g(7)? == 1,
            policy: lk.name(c, g(8)?)?,
            rule: lk.name(c, g(9)?)?,
            args_digest: StoredDigest::read(r.get_ref(10).map_err(err)?),
            arguments: match r.get_ref(11).map_err(err)? {
                ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                _ => None,
            },
            inputs,
        });
        if chunk.len() >= CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
            if tx.send(full).is_err() {
                return Err("the replay workers stopped".to_string());
            }
        }
    }
    if !chunk.is_empty() && tx.send(chunk).is_err() {
        return Err("the replay workers stopped".to_string());
    }
    Ok(())
}

/// The URI a `resources/read` decision names: from the stored arguments, else the action.
fn stored_uri(stored: Option<&Value>, item: &Item) -> Option<String> {
    stored
        .and_then(|a| a.get("uri"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| item.action.split_once("::").map(|(_, u)| u.to_string()))
}

/// Which of `uri` (1) and `arguments` (2) the store has exactly: their digest is the recorded
/// one. Cheap for the common rows (no parse when the stored text is what was digested).
fn known_tag(resource: &Resource, item: &Item) -> u8 {
    let mut tag = 0u8;
    let parsed = || -> Option<Value> {
        item.arguments
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
    };
    if resource.attr.contains_key("uri")
        && stored_uri(parsed().as_ref(), item).is_some_and(|u| {
            item.args_digest
                .is_of_value(&serde_json::json!({ "uri": u }))
        })
    {
        tag |= 1;
    }
    if resource.attr.contains_key("arguments") {
        let exact = match item.arguments.as_deref() {
            // No stored arguments: `{}` (a call without any) is still known exactly.
            None => item.args_digest.is_of("{}"),
            // Stored canonical text whose digest is the recorded one; else the value re-encoded.
            Some(t) => {
                item.args_digest.is_of(t)
                    || match parsed() {
                        Some(v) => item.args_digest.is_of_value(&v),
                        None => item.args_digest.is_of("{}"),
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
fn known(resource: &Resource, item: &Item, tag: u8) -> (Known, Known) {
    let stored: Option<Value> = item
        .arguments
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok());
    let uri = if !resource.attr.contains_key("uri") {
        Known::Absent
    } else if tag & 1 != 0 {
        stored_uri(stored.as_ref(), item)
            .map(|u| Known::Exact(Value::String(u)))
            .unwrap_or(Known::Unknown)
    } else {
        Known::Unknown
    };
    let arguments = if !resource.attr.contains_key("arguments") {
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

fn work(
    replayer: &Replayer<'_>,
    rx: &Mutex<mpsc::Receiver<Vec<Item>>>,
    progress: &(dyn Fn(u64) + Sync),
) -> Partial {
    let mut out = Partial::default();
    // Keyed by (principal input, resource input, action, what is known, the args digest).
    let mut memo: Memo<(i64, i64, i64, u8, StoredDigest)> = Memo::new(MEMO);
    loop {
        let chunk = match rx.lock() {
            Ok(g) => match g.recv() {
                Ok(c) => c,
                Err(_) => break,
            },
            Err(_) => break,
        };
        let n = chunk.len() as u64;
        for item in chunk {
            let Some((pid, rid, principal, resource)) = &item.inputs else {
                out.not_replayable += 1;
                continue;
            };
            out.replayed += 1;
            let tag = known_tag(resource, &item);
            let key = (*pid, *rid, item.action_id, tag, item.args_digest.clone());
            let answer = memo.get_or(key, || {
                let (arguments, uri) = known(resource, &item, tag);
                replayer.replay(&Case {
                    principal,
                    resource,
                    action: &item.action,
                    arguments,
                    uri,
                    now: chrono::DateTime::from_timestamp_micros(item.time_us).unwrap_or_default(),
                })
            });
            let base = |status: &str, now: Option<Verdict>| Change {
                id: item.id.text(),
                time: us_to_time(item.time_us),
                principal: item.principal.to_string(),
                server: item.server.to_string(),
                tool: item.tool.to_string(),
                action: item.action.to_string(),
                status: status.to_string(),
                was: Verdict {
                    effect: effect_text(item.allow).to_string(),
                    policy: item.policy.to_string(),
                    rule: item.rule.to_string(),
                    reason: String::new(),
                },
                now,
                seq: item.seq,
            };
            match &*answer {
                Replayed::NeedsArguments => out.changes.push(base("needs_arguments", None)),
                Replayed::Decided {
                    effect,
                    policy,
                    rule,
                    reason,
                    ..
                } => {
                    let allow = *effect == Effect::Allow;
                    if allow == item.allow {
                        out.unchanged += 1;
                    } else {
                        let status = if item.allow {
                            "allow_to_deny"
                        } else {
                            "deny_to_allow"
                        };
                        out.changes.push(base(
                            status,
                            Some(Verdict {
                                effect: effect_text(allow).to_string(),
                                policy: policy.clone(),
                                rule: rule.clone(),
                                reason: reason.clone(),
                            }),
                        ));
                    }
                }
            }
        }
        progress(n);
    }
    out
}

fn report(
    o: &Options,
    set: &PolicySet,
    decisions: u64,
    partials: Vec<Partial>,
    started: Instant,
) -> Report {
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
        changes: Vec::new(),
    };
    for p in partials {
        r.replayed += p.replayed;
        r.unchanged += p.unchanged;
        r.not_replayable += p.not_replayable;
        r.changes.extend(p.changes);
    }
    r.changes.sort_by_key(|c| c.seq);
    let mut groups: BTreeMap<(String, String, String, String, String), Group> = BTreeMap::new();
    for c in &r.changes {
        match c.status.as_str() {
            "needs_arguments" => {
                r.needs_arguments += 1;
                if r.needs_arguments_examples.len() < EXAMPLES {
                    r.needs_arguments_examples.push(c.id.clone());
                }
                continue;
            }
            "allow_to_deny" => r.allow_to_deny += 1,
            _ => r.deny_to_allow += 1,
        }
        r.changed += 1;
        let (policy, rule) = c
            .now
            .as_ref()
            .map(|v| (v.policy.clone(), v.rule.clone()))
            .unwrap_or_default();
        let g = groups
            .entry((
                c.status.clone(),
                c.principal.clone(),
                c.tool.clone(),
                policy.clone(),
                rule.clone(),
            ))
            .or_insert_with(|| Group {
                direction: c.status.clone(),
                principal: c.principal.clone(),
                tool: c.tool.clone(),
                policy,
                rule,
                count: 0,
                examples: Vec::new(),
            });
        g.count += 1;
        if g.examples.len() < EXAMPLES {
            g.examples.push(c.id.clone());
        }
    }
    let mut groups: Vec<Group> = groups.into_values().collect();
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
    r
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
