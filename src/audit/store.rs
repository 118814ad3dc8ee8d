//! The v3 SQLite storage of the logical rows (migrations/sqlite/0003_v3.sql): decisions,
//! outcomes and anchors sharing one chain sequence, strings as ids into `names`, explain traces
//! deduplicated in `explains`, ids, digests and hashes as bytes, times as integer microseconds.
//! Writing resolves a [`StoredRow`] into ids ([`Lookups`], cached); reading resolves ids back
//! ([`Names`]), so every reader (queries, verify, the shipper) sees the same logical row.

use std::collections::{HashMap, HashSet};

use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::compact::{CompactRow, Event, FIELDS, Field};
use super::links::{Anchor, hex, unhex32};
pub use super::links::{time_to_us, uuid_bytes};
use super::record::{StoredRow, canonical_json, event, format_time};
use super::rollup::{Key, MINUTE_US, Rollups};

/// Fixed name ids (0003_v3.sql): partial indexes name the common values with ranges.
pub const NAME_EMPTY: i64 = 1;
pub const NAME_PENDING: i64 = 2;
pub const NAME_FORWARDED: i64 = 3;
pub const NAME_DENIED: i64 = 4;
pub const NAME_ANSWERED: i64 = 5;
/// Outcome ids above this are in the `*_rare` indexes.
pub const LAST_FIXED_NAME: i64 = 7;

/// Name-cache entries kept at most (the writer's and each reader's).
const MAX_CACHED: usize = 100_000;

/// Microseconds since 1970 as the fixed-width stored text.
pub fn us_to_time(us: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(us) {
        Some(t) => format_time(t),
        None => String::new(),
    }
}

/// A decision id as stored: a canonical UUID as its 16 bytes, anything else as text.
pub fn id_value(id: &str) -> SqlValue {
    match uuid_bytes(id) {
        Some(b) => SqlValue::Blob(b.to_vec()),
        None => SqlValue::Text(id.to_string()),
    }
}

/// A stored id or digest column: the bytes when known, else the text (NULL when empty and
/// `empty_null`).
fn bytes_or_text<'a>(b: Option<&'a [u8]>, text: &'a str, empty_null: bool) -> ToSqlOutput<'a> {
    ToSqlOutput::Borrowed(match b {
        Some(b) => ValueRef::Blob(b),
        None if empty_null && text.is_empty() => ValueRef::Null,
        None => ValueRef::Text(text.as_bytes()),
    })
}

/// [`id_value`] back to text.
pub fn id_text(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Blob(b) => match uuid::Uuid::from_slice(b) {
            Ok(u) => u.hyphenated().to_string(),
            Err(_) => hex(b),
        },
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Integer(i) => i.to_string(),
        _ => String::new(),
    }
}

/// A SHA-256 hex digest as stored: 32 bytes; empty as NULL; anything else as text.
pub fn digest_value(s: &str) -> SqlValue {
    if s.is_empty() {
        return SqlValue::Null;
    }
    match unhex32(s) {
        Some(b) if hex(&b) == s => SqlValue::Blob(b.to_vec()),
        _ => SqlValue::Text(s.to_string()),
    }
}

/// [`digest_value`] back to text.
pub fn digest_text(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Blob(b) => hex(b),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        _ => String::new(),
    }
}

fn json_or_null(s: &str) -> Option<&str> {
    if s.is_empty() || s == "null" {
        None
    } else {
        Some(s)
    }
}

/// Bytes of lookup text (replay inputs) the writer keeps to find a repeated text's id without
/// hashing it with SHA-256 (then the cache starts again).
const MAX_CACHED_TEXT_BYTES: usize = 1 << 20;

/// The writer's string → id caches. Ids inserted by a transaction that then fails are
/// forgotten ([`Lookups::rollback`]): they were never stored.
#[derive(Debug, Default)]
pub(crate) struct Lookups {
    names: HashMap<String, i64>,
    fresh_names: Vec<String>,
    /// Per [`Field`] of a queued row: the text it had last and its id (0: none). Consecutive
    /// rows mostly repeat a field (gateway, kind, server, the caller at one connection), and
    /// comparing a short text costs a fraction of hashing it for `names`.
    last: Vec<(String, i64)>,
    explains: Digested,
    inputs: Digested,
    /// (node, principal) name-id pairs known to be in `node_principals` (schema v8), and those
    /// the open transaction added.
    pairs: HashSet<(i64, i64)>,
    fresh_pairs: Vec<(i64, i64)>,
}

/// A digest-keyed, insert-only lookup table (`explains`, `inputs`): `digest BLOB, text`.
#[derive(Debug, Default)]
struct Digested {
    ids: HashMap<[u8; 32], i64>,
    fresh: Vec<[u8; 32]>,
    /// Text → id for texts seen already ([`Digested::id_of_text`]): a hash-map hit costs a
    /// fraction of the SHA-256 that finds the id by digest.
    by_text: HashMap<Box<str>, i64>,
    /// Bytes of text in `by_text`.
    text_bytes: usize,
}

impl Digested {
    /// The id of `text` (whose SHA-256 is `digest`) in `table`, inserting it once.
    fn id(
        &mut self,
        c: &Connection,
        table: &str,
        digest: [u8; 32],
        text: &str,
    ) -> rusqlite::Result<i64> {
        if let Some(&id) = self.ids.get(&digest) {
            return Ok(id);
        }
        let found: Option<i64> = c
            .prepare_cached(&format!("SELECT id FROM {table} WHERE digest = ?1"))?
            .query_row([&digest[..]], |r| r.get(0))
            .optional()?;
        let id = match found {
            Some(id) => id,
            None => {
                c.prepare_cached(&format!(
                    "INSERT INTO {table} (digest, text) VALUES (?1, ?2)"
                ))?
                .execute(params![&digest[..], text])?;
                self.fresh.push(digest);
                c.last_insert_rowid()
            }
        };
        if self.ids.len() >= MAX_CACHED / 10 {
            self.ids.clear();
        }
        self.ids.insert(digest, id);
        Ok(id)
    }

    /// [`Digested::id`] for a text whose digest is not known yet: a text seen before is found
    /// by the text itself, and only a new one is digested.
    fn id_of_text(&mut self, c: &Connection, table: &str, text: &str) -> rusqlite::Result<i64> {
        if let Some(&id) = self.by_text.get(text) {
            return Ok(id);
        }
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        let id = self.id(c, table, digest, text)?;
        if self.text_bytes + text.len() > MAX_CACHED_TEXT_BYTES {
            self.by_text.clear();
            self.text_bytes = 0;
        }
        self.text_bytes += text.len();
        self.by_text.insert(text.into(), id);
        Ok(id)
    }

    fn rollback(&mut self) {
        for d in self.fresh.drain(..) {
            self.ids.remove(&d);
        }
        // It may hold ids of the failed transaction: start again (failures are rare).
        self.by_text.clear();
        self.text_bytes = 0;
    }
}

impl Lookups {
    pub fn name(&mut self, c: &Connection, s: &str) -> rusqlite::Result<i64> {
        if let Some(&id) = self.names.get(s) {
            return Ok(id);
        }
        let found: Option<i64> = c
            .prepare_cached("SELECT id FROM names WHERE text = ?1")?
            .query_row([s], |r| r.get(0))
            .optional()?;
        let id = match found {
            Some(id) => id,
            None => {
                c.prepare_cached("INSERT INTO names (text) VALUES (?1)")?
                    .execute([s])?;
                self.fresh_names.push(s.to_string());
                c.last_insert_rowid()
            }
        };
        if self.names.len() >= MAX_CACHED {
            self.names.clear();
        }
        self.names.insert(s.to_string(), id);
        Ok(id)
    }

    /// The id of an explain trace whose SHA-256 is `digest` (computed by the submitter).
    pub fn explain(
        &mut self,
        c: &Connection,
        text: &str,
        digest: Option<[u8; 32]>,
    ) -> rusqlite::Result<Option<i64>> {
        let Some(text) = json_or_null(text) else {
            return Ok(None);
        };
        let digest: [u8; 32] = digest.unwrap_or_else(|| Sha256::digest(text.as_bytes()).into());
        self.explains.id(c, "explains", digest, text).map(Some)
    }

    /// The id of a replay input (canonical JSON) in `inputs`, inserting it once.
    pub fn input(&mut self, c: &Connection, text: &str) -> rusqlite::Result<i64> {
        self.inputs.id_of_text(c, "inputs", text)
    }

    /// Records that `node` carried `principal` (`node_principals`, what a `--node` query reads),
    /// once per pair: a pair already seen costs a hash-set probe.
    fn pair(&mut self, c: &Connection, node: i64, principal: i64) -> rusqlite::Result<()> {
        if self.pairs.contains(&(node, principal)) {
            return Ok(());
        }
        c.prepare_cached(
            "INSERT OR IGNORE INTO node_principals (node, principal) VALUES (?1, ?2)",
        )?
        .execute([node, principal])?;
        if self.pairs.len() >= MAX_CACHED {
            self.pairs.clear();
        }
        self.pairs.insert((node, principal));
        self.fresh_pairs.push((node, principal));
        Ok(())
    }

    /// [`Lookups::name`] of a queued row's field `f`, whose text is `s`: the field's last id
    /// when its text did not change. Outcome rows keep their own slots (`outcome` is "pending"
    /// on a decision and "forwarded" on its outcome: shared, they would alternate).
    fn field(&mut self, c: &Connection, ev: Event, f: Field, s: &str) -> rusqlite::Result<i64> {
        let i = match ev {
            Event::Outcome => FIELDS + f as usize,
            _ => f as usize,
        };
        if let Some((text, id)) = self.last.get(i)
            && *id != 0
            && text == s
        {
            return Ok(*id);
        }
        let id = self.name(c, s)?;
        if self.last.len() <= i {
            self.last.resize_with(i + 1, || (String::new(), 0));
        }
        if let Some(e) = self.last.get_mut(i) {
            e.0.clear();
            e.0.push_str(s);
            e.1 = id;
        }
        Ok(id)
    }

    /// The transaction committed: its new ids are real.
    pub fn commit(&mut self) {
        self.fresh_names.clear();
        self.fresh_pairs.clear();
        self.explains.fresh.clear();
        self.inputs.fresh.clear();
    }

    /// The transaction failed: forget the ids it made.
    pub fn rollback(&mut self) {
        for n in self.fresh_names.drain(..) {
            self.names.remove(&n);
        }
        for e in &mut self.last {
            e.1 = 0;
        }
        for p in self.fresh_pairs.drain(..) {
            self.pairs.remove(&p);
        }
        self.explains.rollback();
        self.inputs.rollback();
    }
}

const INSERT_DECISION: &str = "INSERT INTO decisions (seq, id, time, gateway, kind, principal, login, node, node_id, tags, ip, server, method, tool, action, effect, policy, rule, reason, args_digest, outcome, latency_us, policy_hash, explain, arguments, hash, principal_input, resource_input, shadows) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29)";
const INSERT_OUTCOME: &str = "INSERT INTO outcomes (seq, decision, time, gateway, outcome, latency_us, detail, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const INSERT_ANCHOR: &str = "INSERT INTO anchors (seq, time, gateway, through_seq, through_hash, pruned_rows, reason, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

fn bad_time(t: &str) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(format!("audit row time {t:?} is not RFC 3339").into())
}

/// Inserts one logical row at `seq` with `hash` (`row.seq` and `row.hash` are ignored).
pub(crate) fn insert(
    c: &Connection,
    lk: &mut Lookups,
    seq: i64,
    row: &StoredRow,
    hash: &[u8; 32],
) -> rusqlite::Result<()> {
    let compact = CompactRow::new(row).ok_or_else(|| bad_time(&row.time))?;
    insert_compact(c, lk, seq, &compact, hash, None)
}

/// [`insert`] for a queued row (the writer's path: statements prepared once per connection,
/// lookups from the cache, nothing parsed), counted in the batch's `rollups` when given.
pub(crate) fn insert_compact(
    c: &Connection,
    lk: &mut Lookups,
    seq: i64,
    row: &CompactRow,
    hash: &[u8; 32],
    rollups: Option<&mut Rollups>,
) -> rusqlite::Result<()> {
    let time = row.time_us;
    let gateway = lk.field(c, row.event, Field::Gateway, row.get(Field::Gateway))?;
    match row.event {
        Event::Outcome => {
            let outcome = lk.field(c, row.event, Field::Outcome, row.get(Field::Outcome))?;
            let detail = lk.field(c, row.event, Field::Reason, row.get(Field::Reason))?;
            let key = row.key_bytes.as_ref().map(|b| &b[..]);
            let decision = bytes_or_text(key, row.get(Field::DecisionId), false);
            c.prepare_cached(INSERT_OUTCOME)?.execute(params![
                seq,
                decision,
                time,
                gateway,
                outcome,
                row.latency_us,
                detail,
                &hash[..],
            ])?;
            if let Some(r) = rollups {
                let ToSqlOutput::Borrowed(d) = decision else {
                    return Ok(());
                };
                r.outcome(c, row.key_bytes, d, row.latency_us)?;
            }
        }
        Event::Anchor => {
            let a: Anchor = serde_json::from_str(row.get(Field::Explain)).map_err(|e| {
                rusqlite::Error::ToSqlConversionFailure(format!("anchor: {e}").into())
            })?;
            let through = unhex32(&a.pruned_through_hash).unwrap_or([0; 32]);
            c.prepare_cached(INSERT_ANCHOR)?.execute(params![
                seq,
                time,
                gateway,
                a.pruned_through_seq,
                &through[..],
                a.pruned_rows,
                row.get(Field::Reason),
                &hash[..],
            ])?;
        }
        Event::Decision => {
            let mut n = |f: Field| lk.field(c, Event::Decision, f, row.get(f));
            let ids = [
                n(Field::Kind)?,
                n(Field::Principal)?,
                n(Field::Login)?,
                n(Field::Node)?,
                n(Field::NodeId)?,
                n(Field::Tags)?,
                n(Field::Ip)?,
                n(Field::Server)?,
                n(Field::Method)?,
                n(Field::Tool)?,
                n(Field::Action)?,
                n(Field::Policy)?,
                n(Field::Rule)?,
                n(Field::Reason)?,
                n(Field::Outcome)?,
                n(Field::PolicyHash)?,
            ];
            let explain = lk.explain(c, row.get(Field::Explain), row.explain_digest)?;
            let (principal_input, resource_input) = if row.has_inputs {
                (
                    Some(lk.input(c, row.get(Field::InputPrincipal))?),
                    Some(lk.input(c, row.get(Field::InputResource))?),
                )
            } else {
                (None, None)
            };
            let key = row.key_bytes.as_ref().map(|b| &b[..]);
            let args = row.args_bytes.as_ref().map(|b| &b[..]);
            // A shadow row's decision (schema v5); rare, so parsed here.
            let shadowed = row.get(Field::DecisionId);
            let shadowed_bytes = uuid_bytes(shadowed);
            let [
                kind,
                principal,
                login,
                node,
                node_id,
                tags,
                ip,
                server,
                method,
                tool,
                action,
                policy,
                rule,
                reason,
                outcome,
                policy_hash,
            ] = ids;
            lk.pair(c, node, principal)?;
            c.prepare_cached(INSERT_DECISION)?.execute(params![
                seq,
                bytes_or_text(key, row.get(Field::Id), false),
                time,
                gateway,
                kind,
                principal,
                login,
                node,
                node_id,
                tags,
                ip,
                server,
                method,
                tool,
                action,
                i64::from(row.get(Field::Effect) == "allow"),
                policy,
                rule,
                reason,
                bytes_or_text(args, row.get(Field::ArgsDigest), true),
                outcome,
                row.latency_us,
                policy_hash,
                explain,
                json_or_null(row.get(Field::Arguments)),
                &hash[..],
                principal_input,
                resource_input,
                bytes_or_text(shadowed_bytes.as_ref().map(|b| &b[..]), shadowed, true),
            ])?;
            if let Some(r) = rollups {
                let key = Key {
                    minute: time.div_euclid(MINUTE_US),
                    kind,
                    principal,
                    node,
                    server,
                    tool,
                    method,
                    effect: i64::from(row.get(Field::Effect) == "allow"),
                };
                let pending = (outcome == NAME_PENDING).then_some(row.key_bytes).flatten();
                r.decision(key, row.latency_us, pending);
            }
        }
    }
    Ok(())
}

/// Puts a row in the exact form reading it back gives (so the digest computed before the
/// insert is the one `verify` recomputes): time at microsecond precision, no UUID on outcome and
/// anchor rows, only the columns each table keeps. Returns false when the time is unreadable.
pub fn to_logical(row: &mut StoredRow) -> bool {
    let Some(us) = time_to_us(&row.time) else {
        return false;
    };
    let t = us_to_time(us);
    if t != row.time {
        row.time = t;
    }
    let keep = |s: &mut String, default: &str| {
        if s.is_empty() || s == "null" {
            *s = default.to_string();
        }
    };
    match row.event.as_str() {
        event::DECISION => {
            if row.effect != "allow" {
                row.effect = "deny".to_string();
            }
            keep(&mut row.explain, "null");
            keep(&mut row.arguments, "null");
        }
        event::OUTCOME | event::ANCHOR => {
            let explain = if row.event == event::ANCHOR {
                serde_json::from_str::<Anchor>(&row.explain)
                    .map(|a| anchor_explain(&a))
                    .unwrap_or_else(|_| "null".to_string())
            } else {
                "null".to_string()
            };
            *row = StoredRow {
                seq: row.seq,
                event: std::mem::take(&mut row.event),
                decision_id: std::mem::take(&mut row.decision_id),
                gateway: std::mem::take(&mut row.gateway),
                time: std::mem::take(&mut row.time),
                outcome: std::mem::take(&mut row.outcome),
                latency_us: row.latency_us,
                reason: std::mem::take(&mut row.reason),
                tags: "[]".to_string(),
                explain,
                arguments: "null".to_string(),
                ..StoredRow::default()
            };
            if row.event == event::ANCHOR {
                row.decision_id.clear();
                row.outcome.clear();
                row.latency_us = None;
            }
        }
        _ => return false,
    }
    true
}

/// A reader's id → string caches.
#[derive(Debug, Default)]
pub(crate) struct Names {
    names: HashMap<i64, String>,
    explains: HashMap<i64, String>,
}

impl Names {
    pub fn name(&mut self, c: &Connection, id: i64) -> rusqlite::Result<String> {
        if let Some(s) = self.names.get(&id) {
            return Ok(s.clone());
        }
        let s: String = c
            .prepare_cached("SELECT text FROM names WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| missing("names", id))?;
        if self.names.len() >= MAX_CACHED {
            self.names.clear();
        }
        self.names.insert(id, s.clone());
        Ok(s)
    }

    fn explain(&mut self, c: &Connection, id: Option<i64>) -> rusqlite::Result<String> {
        let Some(id) = id else {
            return Ok("null".to_string());
        };
        if let Some(s) = self.explains.get(&id) {
            return Ok(s.clone());
        }
        let s: String = c
            .prepare_cached("SELECT text FROM explains WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| missing("explains", id))?;
        if self.explains.len() >= MAX_CACHED / 10 {
            self.explains.clear();
        }
        self.explains.insert(id, s.clone());
        Ok(s)
    }
}

/// A row names a lookup that is gone: reading fails (verify reports it as a break).
fn missing(table: &str, id: i64) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Integer,
        format!("audit store: {table} row {id} is missing (a lookup row was deleted)").into(),
    )
}

fn hash32(v: ValueRef<'_>) -> [u8; 32] {
    match v {
        ValueRef::Blob(b) if b.len() == 32 => {
            let mut h = [0u8; 32];
            h.copy_from_slice(b);
            h
        }
        _ => [0u8; 32],
    }
}

/// The decision columns [`decision_from`] reads, in order.
pub const DECISION_COLS: &str = "seq, id, time, gateway, kind, principal, login, node, node_id, tags, ip, server, method, tool, action, effect, policy, rule, reason, args_digest, outcome, latency_us, policy_hash, explain, arguments, hash, shadows";
/// The number of [`DECISION_COLS`].
pub const DECISION_NCOLS: usize = 27;

/// Reads a decision selected with [`DECISION_COLS`] (prefixed or not) from index 0; `prev_hash`
/// is left empty.
pub(crate) fn decision_from(
    c: &Connection,
    n: &mut Names,
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<StoredRow> {
    let mut name = |i: usize| -> rusqlite::Result<String> { n.name(c, r.get(i)?) };
    let row = StoredRow {
        seq: r.get(0)?,
        event: event::DECISION.to_string(),
        id: id_text(r.get_ref(1)?),
        decision_id: match r.get_ref(26)? {
            ValueRef::Null => String::new(),
            v => id_text(v),
        },
        time: us_to_time(r.get(2)?),
        gateway: name(3)?,
        kind: name(4)?,
        principal: name(5)?,
        login: name(6)?,
        node: name(7)?,
        node_id: name(8)?,
        tags: name(9)?,
        ip: name(10)?,
        server: name(11)?,
        method: name(12)?,
        tool: name(13)?,
        action: name(14)?,
        effect: if r.get::<_, i64>(15)? == 1 {
            "allow"
        } else {
            "deny"
        }
        .to_string(),
        policy: name(16)?,
        rule: name(17)?,
        reason: name(18)?,
        args_digest: digest_text(r.get_ref(19)?),
        outcome: name(20)?,
        latency_us: r.get(21)?,
        policy_hash: name(22)?,
        explain: String::new(),
        arguments: r
            .get::<_, Option<String>>(24)?
            .unwrap_or_else(|| "null".to_string()),
        hash: hex(&hash32(r.get_ref(25)?)),
        prev_hash: String::new(),
        inputs: None,
        explain_digest: None,
    };
    let explain = n.explain(c, r.get(23)?)?;
    Ok(StoredRow { explain, ..row })
}

fn outcome_from(
    c: &Connection,
    n: &mut Names,
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<StoredRow> {
    Ok(StoredRow {
        seq: r.get(0)?,
        event: event::OUTCOME.to_string(),
        decision_id: id_text(r.get_ref(1)?),
        time: us_to_time(r.get(2)?),
        gateway: n.name(c, r.get(3)?)?,
        outcome: n.name(c, r.get(4)?)?,
        latency_us: r.get(5)?,
        reason: n.name(c, r.get(6)?)?,
        hash: hex(&hash32(r.get_ref(7)?)),
        tags: "[]".to_string(),
        explain: "null".to_string(),
        arguments: "null".to_string(),
        ..StoredRow::default()
    })
}

/// The canonical explain text of an anchor row.
pub fn anchor_explain(a: &Anchor) -> String {
    canonical_json(&serde_json::to_value(a).unwrap_or(serde_json::Value::Null))
}

fn anchor_from(
    c: &Connection,
    n: &mut Names,
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<StoredRow> {
    let a = Anchor {
        pruned_through_seq: r.get(3)?,
        pruned_through_hash: hex(&hash32(r.get_ref(4)?)),
        pruned_rows: r.get(5)?,
    };
    Ok(StoredRow {
        seq: r.get(0)?,
        event: event::ANCHOR.to_string(),
        time: us_to_time(r.get(1)?),
        gateway: n.name(c, r.get(2)?)?,
        reason: r.get(6)?,
        hash: hex(&hash32(r.get_ref(7)?)),
        tags: "[]".to_string(),
        explain: anchor_explain(&a),
        arguments: "null".to_string(),
        ..StoredRow::default()
    })
}

/// Reads one stored row of a chained table.
type RowFrom = fn(&Connection, &mut Names, &rusqlite::Row<'_>) -> rusqlite::Result<StoredRow>;

/// Up to `limit` chained rows with seq > `after`, in seq order, across the three tables
/// (`prev_hash` left empty).
pub(crate) fn read_after(
    c: &Connection,
    n: &mut Names,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<StoredRow>> {
    let lim = i64::try_from(limit).unwrap_or(i64::MAX);
    let decisions =
        format!("SELECT {DECISION_COLS} FROM decisions WHERE seq > ?1 ORDER BY seq LIMIT ?2");
    let tables: [(&str, RowFrom); 3] = [
        (&decisions, decision_from),
        (
            "SELECT seq, decision, time, gateway, outcome, latency_us, detail, hash FROM outcomes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            outcome_from,
        ),
        (
            "SELECT seq, time, gateway, through_seq, through_hash, pruned_rows, reason, hash FROM anchors WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            anchor_from,
        ),
    ];
    // The three reads see one snapshot. Read one by one, a commit landing between them (a
    // decision in seq 101, its outcome in 102) could show this reader outcome 102 but not
    // decision 101, and a shipper that moved its watermark to 102 would skip 101 for good.
    // (A caller already inside a transaction has its snapshot.)
    let snapshot = if c.is_autocommit() {
        Some(c.unchecked_transaction()?)
    } else {
        None
    };
    let mut out = Vec::new();
    for (sql, from) in tables {
        let mut st = c.prepare_cached(sql)?;
        let mut rows = st.query(params![after, lim])?;
        while let Some(r) = rows.next()? {
            out.push(from(c, n, r)?);
        }
    }
    drop(snapshot); // a read-only transaction: its rollback ends it
    out.sort_by_key(|r| r.seq);
    out.truncate(limit);
    Ok(out)
}

/// (seq, time µs, hash) of up to `limit` rows with seq > `after`, in seq order (retention).
pub(crate) fn seq_time_hash_after(
    c: &Connection,
    after: i64,
    limit: i64,
) -> rusqlite::Result<Vec<(i64, i64, [u8; 32])>> {
    let mut out = Vec::new();
    for t in ["decisions", "outcomes", "anchors"] {
        let mut st = c.prepare_cached(&format!(
            "SELECT seq, time, hash FROM {t} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let mut rows = st.query(params![after, limit])?;
        while let Some(r) = rows.next()? {
            out.push((r.get(0)?, r.get(1)?, hash32(r.get_ref(2)?)));
        }
    }
    out.sort_by_key(|r| r.0);
    out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok(out)
}

/// The hash of the row at `seq`, in whichever table holds it.
pub(crate) fn hash_at(c: &Connection, seq: i64) -> rusqlite::Result<Option<[u8; 32]>> {
    for t in ["decisions", "outcomes", "anchors"] {
        let h: Option<Vec<u8>> = c
            .prepare_cached(&format!("SELECT hash FROM {t} WHERE seq = ?1"))?
            .query_row([seq], |r| r.get(0))
            .optional()?;
        if let Some(h) = h {
            return Ok(Some(hash32(ValueRef::Blob(&h))));
        }
    }
    Ok(None)
}

/// What a row at `seq` follows: the previous row's hash, genesis at seq 1, or the hash an
/// anchor recorded for pruned rows. `None`: unknown (rows before it are missing).
pub(crate) fn prev_of(c: &Connection, seq: i64) -> rusqlite::Result<Option<[u8; 32]>> {
    if seq <= 1 {
        return Ok(Some(super::links::GENESIS));
    }
    if let Some(h) = hash_at(c, seq - 1)? {
        return Ok(Some(h));
    }
    let h: Option<Vec<u8>> = c
        .prepare_cached(
            "SELECT through_hash FROM anchors WHERE through_seq = ?1 ORDER BY seq DESC LIMIT 1",
        )?
        .query_row([seq - 1], |r| r.get(0))
        .optional()?;
    Ok(h.map(|h| hash32(ValueRef::Blob(&h))))
}

/// The last chained row (seq, hash), or (0, genesis) for an empty chain.
pub(crate) fn tail(c: &Connection) -> rusqlite::Result<(i64, [u8; 32])> {
    let mut best = (0i64, super::links::GENESIS);
    for t in ["decisions", "outcomes", "anchors"] {
        let last: Option<(i64, Vec<u8>)> = c
            .query_row(
                &format!("SELECT seq, hash FROM {t} ORDER BY seq DESC LIMIT 1"),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((s, h)) = last
            && s > best.0
        {
            best = (s, hash32(ValueRef::Blob(&h)));
        }
    }
    Ok(best)
}

/// The id of `text` in `names`, if any row uses it.
pub(crate) fn name_id(c: &Connection, text: &str) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached("SELECT id FROM names WHERE text = ?1")?
        .query_row([text], |r| r.get(0))
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_digests_and_times_round_trip() {
        let id = uuid::Uuid::now_v7().to_string();
        let v = id_value(&id);
        assert!(matches!(v, SqlValue::Blob(ref b) if b.len() == 16));
        let back = match &v {
            SqlValue::Blob(b) => id_text(ValueRef::Blob(b)),
            _ => unreachable!(),
        };
        assert_eq!(back, id);
        assert!(matches!(id_value("not-a-uuid"), SqlValue::Text(_)));
        assert!(matches!(id_value(&id.to_uppercase()), SqlValue::Text(_)));
        let d = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert!(matches!(digest_value(d), SqlValue::Blob(ref b) if b.len() == 32));
        assert!(matches!(digest_value(""), SqlValue::Null));
        assert!(matches!(digest_value("ABC"), SqlValue::Text(_)));
        for t in ["2026-01-02T03:04:05.123456Z", "1969-12-31T23:59:59.999999Z"] {
            assert_eq!(us_to_time(time_to_us(t).unwrap()), t);
        }
    }
}
