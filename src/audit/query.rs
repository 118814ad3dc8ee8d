//! Reading the trail: [`Filter`] (the `audit query` flags and the `/api/audit` parameters), a
//! read-only [`Reader`] (WAL: never blocks the writer), `audit stats` and the SQL they share with
//! the Postgres fleet queries. Only bound parameters reach SQL.
//!
//! Order: rows come oldest first. With a `limit`, they are the newest `limit` matching rows
//! (still printed oldest first, like `tail`); without one, every matching row.

use std::path::Path;
use std::time::Duration;

use std::sync::Mutex;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use super::AuditError;
use super::chain;
use super::key::ChainKey;
use super::record::{Row, format_time, normalize_time};
use super::store::{self, DECISION_COLS, DECISION_NCOLS, LAST_FIXED_NAME, Names};

/// Which decisions to return. Every field narrows; `None` means any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Fixed-width RFC 3339 lower bound (inclusive); see [`parse_time_bound`].
    pub since: Option<String>,
    /// Upper bound (exclusive).
    pub until: Option<String>,
    pub principal: Option<String>,
    pub node: Option<String>,
    pub tag: Option<String>,
    pub server: Option<String>,
    pub tool: Option<String>,
    /// `allow` or `deny`.
    pub effect: Option<String>,
    /// The merged outcome; `upstream_error` also matches `upstream_error:<kind>`.
    pub outcome: Option<String>,
    pub kind: Option<String>,
    /// One decision by id.
    pub id: Option<String>,
    pub gateway: Option<String>,
    /// Newest N (see the module docs).
    pub limit: Option<usize>,
    /// Only rows after this chain position (`--follow`, paging).
    pub after_seq: Option<i64>,
    /// Only rows before this chain position (paging back).
    pub before_seq: Option<i64>,
    /// Only rows before this position in the newest-first order (time, then chain position):
    /// the keyset cursor of `/api/audit` paging ([`Cursor`]).
    #[serde(default)]
    pub before: Option<Cursor>,
    /// `/api/audit?shadow=diff`: only shadow rows, answered as their differences
    /// ([`super::shadow::ShadowDiff`]).
    #[serde(default)]
    pub shadow_diff: bool,
}

/// A position in the newest-first order of decisions (time, then chain position): the `next`
/// of an `/api/audit` page. As text, `<seq>.<time>`; it is opaque to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The row's fixed-width RFC 3339 time.
    pub time: String,
    /// The row's chain position.
    pub seq: i64,
}

impl Cursor {
    /// The position of `row`.
    pub fn of(row: &Row) -> Cursor {
        Cursor {
            time: row.time.clone(),
            seq: row.seq,
        }
    }

    /// Parses the text form, refusing anything this gateway did not issue.
    pub fn parse(s: &str) -> Result<Cursor, String> {
        let bad = || format!("cursor: {s:?} is not a `next` value this gateway returned");
        let (seq, time) = s.split_once('.').ok_or_else(bad)?;
        let seq: i64 = seq.parse().map_err(|_| bad())?;
        let time = normalize_time(time).ok_or_else(bad)?;
        if seq < 0 || time.len() != 27 {
            return Err(bad());
        }
        Ok(Cursor { time, seq })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.seq, self.time)
    }
}

/// `/api/audit` rows per page when the request names no `limit`.
pub const DEFAULT_PAGE_LIMIT: usize = 100;
/// `/api/audit` rows per page at most; a larger `limit` is refused (400).
pub const MAX_PAGE_LIMIT: usize = 1_000;
/// Rows one `/api/audit` page examines at most (rows the caller may not read included); a
/// page that stops here is short, and its `next` continues after the last row examined.
pub const PAGE_SCAN_BUDGET: usize = 10 * MAX_PAGE_LIMIT;

/// How a page ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageEnd {
    /// Rows handed to the caller.
    pub rows: usize,
    /// Rows examined and withheld (`keep` said no).
    pub withheld: usize,
    /// Where the next page starts; `None` when no matching row is left.
    pub next: Option<Cursor>,
    /// The receiver stopped taking rows (the client went away).
    pub stopped: bool,
}

/// `--since`/`--until` values: a duration back from `now` (`90s`, `15m`, `2h`, `7d`), an RFC 3339
/// time, or a date (`2026-01-31`, midnight UTC). Returns the fixed-width stored form.
pub fn parse_time_bound(s: &str, now: chrono::DateTime<chrono::Utc>) -> Result<String, String> {
    let s = s.trim();
    if let Ok(d) = crate::config::duration_text::parse(s) {
        let d = chrono::Duration::from_std(d).map_err(|_| format!("{s:?}: too long"))?;
        let t = now
            .checked_sub_signed(d)
            .ok_or_else(|| format!("{s:?}: too long"))?;
        return Ok(format_time(t));
    }
    if let Some(t) = normalize_time(s) {
        return Ok(t);
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(format_time(t.and_utc()));
    }
    Err(format!(
        "{s:?}: want a duration (2h, 30m, 7d), an RFC 3339 time or a date (2026-01-31)"
    ))
}

impl Filter {
    /// Builds a filter from URL query pairs (`GET /api/audit?principal=..&since=2h&limit=50`).
    /// Unknown keys are errors.
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<Filter, String>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let now = chrono::Utc::now();
        let mut f = Filter::default();
        for (k, v) in pairs {
            let (k, v) = (k.as_ref(), v.as_ref().to_string());
            let int = |v: &str| {
                v.parse::<i64>()
                    .map_err(|_| format!("{k}: {v:?} is not a number"))
            };
            match k {
                "since" => {
                    f.since = Some(parse_time_bound(&v, now).map_err(|e| format!("since: {e}"))?)
                }
                "until" => {
                    f.until = Some(parse_time_bound(&v, now).map_err(|e| format!("until: {e}"))?)
                }
                "principal" => f.principal = Some(v),
                "node" => f.node = Some(v),
                "tag" => f.tag = Some(v),
                "server" => f.server = Some(v),
                "tool" => f.tool = Some(v),
                "effect" => f.effect = Some(check_effect(&v)?),
                "outcome" => f.outcome = Some(v),
                "kind" => f.kind = Some(v),
                "id" => f.id = Some(v),
                "gateway" => f.gateway = Some(v),
                "limit" => {
                    f.limit = Some(
                        v.parse()
                            .map_err(|_| format!("limit: {v:?} is not a count"))?,
                    )
                }
                "cursor" => f.before = Some(Cursor::parse(&v)?),
                "shadow" if v == "diff" => {
                    f.shadow_diff = true;
                    f.kind = Some(super::Kind::Shadow.as_str().to_string());
                }
                "shadow" => return Err(format!("shadow: {v:?} is not diff")),
                "after_seq" => f.after_seq = Some(int(&v)?),
                "before_seq" => f.before_seq = Some(int(&v)?),
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        Ok(f)
    }
}

pub(crate) fn check_effect(v: &str) -> Result<String, String> {
    match v {
        "allow" | "deny" => Ok(v.to_string()),
        _ => Err(format!("effect: {v:?} is not allow or deny")),
    }
}

/// A bound SQL parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// The merged outcome of decision `d` joined as `o`.
pub(crate) fn outcome_join(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => {
            "LEFT JOIN events o ON o.seq = (SELECT max(x.seq) FROM events x WHERE x.event = 'outcome' AND x.decision_id = d.id)"
        }
        Dialect::Postgres => {
            "LEFT JOIN LATERAL (SELECT x.outcome, x.latency_us FROM events x WHERE x.event = 'outcome' AND x.decision_id = d.id ORDER BY x.seq DESC LIMIT 1) o ON true"
        }
    }
}

/// The WHERE clause (always starting with the decision-row condition) and its parameters.
///
/// Used by the Postgres fleet queries (text columns); the SQLite store has [`sqlite_where`].
pub(crate) fn where_clause(f: &Filter, dialect: Dialect) -> (String, Vec<Param>) {
    let mut conds = vec!["d.event = 'decision'".to_string()];
    let mut params: Vec<Param> = Vec::new();
    let ph = |p: Param, params: &mut Vec<Param>| -> String {
        params.push(p);
        match dialect {
            Dialect::Sqlite => format!("?{}", params.len()),
            Dialect::Postgres => format!("${}", params.len()),
        }
    };
    let ts = match dialect {
        Dialect::Sqlite => "",
        Dialect::Postgres => "::timestamptz",
    };
    if let Some(v) = &f.since {
        let p = ph(Param::Text(v.clone()), &mut params);
        conds.push(format!("d.time >= {p}{ts}"));
    }
    if let Some(v) = &f.until {
        let p = ph(Param::Text(v.clone()), &mut params);
        conds.push(format!("d.time < {p}{ts}"));
    }
    // SQLite has no statistics here (ANALYZE would hold the write lock for seconds), so steer
    // it: a unary `+` keeps a column's index out of play when a more selective one applies
    // (id > principal > tool > effect > time).
    let selective = f.id.is_some() || f.principal.is_some() || f.tool.is_some();
    let hint = |col: &str| -> &'static str {
        let skip = match col {
            "principal" => f.id.is_some(),
            "tool" => f.id.is_some() || f.principal.is_some(),
            "effect" => selective,
            _ => false,
        };
        if skip && dialect == Dialect::Sqlite {
            "+"
        } else {
            ""
        }
    };
    for (col, v) in [
        ("principal", &f.principal),
        ("node", &f.node),
        ("server", &f.server),
        ("tool", &f.tool),
        ("effect", &f.effect),
        ("kind", &f.kind),
        ("id", &f.id),
        ("gateway", &f.gateway),
    ] {
        if let Some(v) = v {
            let p = ph(Param::Text(v.clone()), &mut params);
            conds.push(format!("{}d.{col} = {p}", hint(col)));
        }
    }
    if let Some(v) = &f.tag {
        let p = ph(Param::Text(v.clone()), &mut params);
        conds.push(match dialect {
            Dialect::Sqlite => {
                format!("EXISTS (SELECT 1 FROM json_each(d.tags) WHERE json_each.value = {p})")
            }
            Dialect::Postgres => format!("d.tags ? {p}"),
        });
    }
    if let Some(v) = &f.outcome {
        let p = ph(Param::Text(v.clone()), &mut params);
        let q = ph(Param::Text(format!("{v}:")), &mut params);
        let n = ph(
            Param::Int(i64::try_from(v.len() + 1).unwrap_or(i64::MAX)),
            &mut params,
        );
        conds.push(format!(
            "(COALESCE(o.outcome, d.outcome) = {p} OR substr(COALESCE(o.outcome, d.outcome), 1, {n}) = {q})"
        ));
    }
    if let Some(v) = f.after_seq {
        let p = ph(Param::Int(v), &mut params);
        conds.push(format!("d.seq > {p}"));
    }
    if let Some(v) = f.before_seq {
        let p = ph(Param::Int(v), &mut params);
        conds.push(format!("d.seq < {p}"));
    }
    if let Some(c) = &f.before {
        let t = ph(Param::Text(c.time.clone()), &mut params);
        let q = ph(Param::Int(c.seq), &mut params);
        conds.push(format!(
            "(d.time < {t}{ts} OR (d.time = {t}{ts} AND d.seq < {q}))"
        ));
    }
    (conds.join(" AND "), params)
}

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Param::Text(s) => s.to_sql(),
            Param::Int(i) => i.to_sql(),
        }
    }
}

/// What a filter's strings are in the store: name ids, or `None` when some filter value was
/// never stored (nothing can match).
struct Resolved {
    conds: Vec<String>,
    params: Vec<SqlValue>,
    /// The ids a `--outcome` filter matches, and whether all of them are in the rare indexes.
    outcome_ids: Vec<i64>,
}

fn us_bound(t: &str) -> i64 {
    store::time_to_us(t).unwrap_or(i64::MIN)
}

/// The SQLite WHERE clause over `decisions d` (joined to its latest outcome `o`).
fn sqlite_where(
    c: &Connection,
    f: &Filter,
    candidates: bool,
) -> Result<Option<Resolved>, AuditError> {
    let mut r = Resolved {
        conds: vec!["1".to_string()],
        params: Vec::new(),
        outcome_ids: Vec::new(),
    };
    let ph = |v: SqlValue, r: &mut Resolved| -> String {
        r.params.push(v);
        format!("?{}", r.params.len())
    };
    if let Some(v) = &f.since {
        let p = ph(SqlValue::Integer(us_bound(v)), &mut r);
        r.conds.push(format!("d.time >= {p}"));
    }
    if let Some(v) = &f.until {
        let p = ph(SqlValue::Integer(us_bound(v)), &mut r);
        r.conds.push(format!("d.time < {p}"));
    }
    // A node's rows are found through the principal index: `node_principals` (schema v8)
    // names the principals it has carried, nearly always one (DESIGN.md §3). With one, the
    // query is that principal's range, filtered by node; with several (a decision-API caller
    // asserting others), it walks the time index.
    let mut node_principal = None;
    if let Some(v) = &f.node {
        let Some(node) = store::name_id(c, v)? else {
            return Ok(None);
        };
        let mut st =
            c.prepare_cached("SELECT principal FROM node_principals WHERE node = ?1 LIMIT 2")?;
        let ps: Vec<i64> = st
            .query_map([node], |x| x.get(0))?
            .collect::<Result<_, _>>()?;
        match ps[..] {
            [] => return Ok(None),
            [p] if f.principal.is_none() => {
                node_principal = Some(p);
                let q = ph(SqlValue::Integer(p), &mut r);
                r.conds.push(format!(
                    "{}d.principal = {q}",
                    if f.id.is_some() { "+" } else { "" }
                ));
            }
            _ => {}
        }
        let q = ph(SqlValue::Integer(node), &mut r);
        r.conds.push(format!("d.node = {q}"));
    }
    // SQLite has no statistics here (ANALYZE would hold the write lock for seconds), so steer
    // it: a unary `+` keeps a column's index out of play when a more selective one applies
    // (id > principal (or a node's one principal) > tool > effect > time).
    let by_principal = f.principal.is_some() || node_principal.is_some();
    let selective = f.id.is_some() || by_principal || f.node.is_some() || f.tool.is_some();
    let skip = |col: &str| -> &'static str {
        let skip = match col {
            "principal" => f.id.is_some(),
            "tool" => f.id.is_some() || by_principal,
            "effect" => selective,
            _ => false,
        };
        if skip { "+" } else { "" }
    };
    for (col, v) in [
        ("principal", &f.principal),
        ("server", &f.server),
        ("tool", &f.tool),
        ("kind", &f.kind),
        ("gateway", &f.gateway),
    ] {
        if let Some(v) = v {
            let Some(id) = store::name_id(c, v)? else {
                return Ok(None);
            };
            let p = ph(SqlValue::Integer(id), &mut r);
            r.conds.push(format!("{}d.{col} = {p}", skip(col)));
        }
    }
    if let Some(v) = &f.effect {
        // `effect < 1` is the deny index's own condition (SQLite uses it only then).
        let cond = if v == "allow" { "= 1" } else { "< 1" };
        r.conds.push(format!("{}d.effect {cond}", skip("effect")));
    }
    if let Some(v) = &f.id {
        let p = ph(store::id_value(v), &mut r);
        r.conds.push(format!("d.id = {p}"));
    }
    if let Some(v) = &f.tag {
        // Tag sets are few (one per distinct caller tag list): find those holding the tag.
        let mut st = c.prepare_cached(
            "SELECT n.id FROM names n WHERE n.text LIKE '[%' AND json_valid(n.text) AND EXISTS (SELECT 1 FROM json_each(n.text) j WHERE j.value = ?1)",
        )?;
        let ids: Vec<i64> = st.query_map([v], |x| x.get(0))?.collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(None);
        }
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        r.conds.push(format!("d.tags IN ({})", list.join(",")));
    }
    if let Some(v) = &f.outcome {
        let mut st =
            c.prepare_cached("SELECT id FROM names WHERE text = ?1 OR (text >= ?2 AND text < ?3)")?;
        let ids: Vec<i64> = st
            .query_map(
                rusqlite::params![v, format!("{v}:"), format!("{v};")],
                |x| x.get(0),
            )?
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(None);
        }
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let list = list.join(",");
        r.conds
            .push(format!("COALESCE(o.outcome, d.outcome) IN ({list})"));
        if candidates && ids.iter().all(|i| *i > LAST_FIXED_NAME) {
            // Candidates first, through the rare-outcome indexes: decisions whose own outcome
            // matches, and decisions named by a matching outcome row. The merged test above then
            // keeps only those whose latest outcome matches. Outcome rows are never older than
            // their decision, so `since` narrows them too.
            let since = match &f.since {
                Some(s) => format!(" AND {{t}}.time >= {}", us_bound(s)),
                None => String::new(),
            };
            r.conds.push(format!(
                "d.seq IN (SELECT c.seq FROM decisions c WHERE c.outcome IN ({list}) AND c.outcome > {LAST_FIXED_NAME}{} \
                 UNION ALL SELECT c.seq FROM outcomes x JOIN decisions c ON c.id = x.decision WHERE x.outcome IN ({list}) AND x.outcome > {LAST_FIXED_NAME}{})",
                since.replace("{t}", "c"),
                since.replace("{t}", "x"),
            ));
        }
        r.outcome_ids = ids;
    }
    if let Some(v) = f.after_seq {
        let p = ph(SqlValue::Integer(v), &mut r);
        r.conds.push(format!("d.seq > {p}"));
    }
    if let Some(v) = f.before_seq {
        let p = ph(SqlValue::Integer(v), &mut r);
        r.conds.push(format!("d.seq < {p}"));
    }
    if let Some(c) = &f.before {
        // The keyset cursor of `/api/audit` paging, in the newest-first order (time, seq).
        let t = ph(SqlValue::Integer(us_bound(&c.time)), &mut r);
        let q = ph(SqlValue::Integer(c.seq), &mut r);
        r.conds
            .push(format!("(d.time < {t} OR (d.time = {t} AND d.seq < {q}))"));
    }
    Ok(Some(r))
}

/// The latest outcome row of decision `d`, joined as `o`.
const OUTCOME_JOIN: &str =
    "LEFT JOIN outcomes o ON o.seq = (SELECT max(x.seq) FROM outcomes x WHERE x.decision = d.id)";

/// See [`Reader::outcome_is_rare`].
const RARE_OUTCOME_ROWS: i64 = 10_000;

/// A read-only connection to the store.
pub struct Reader {
    conn: Connection,
    names: Mutex<Names>,
    /// Below this many rows an outcome counts as rare ([`RARE_OUTCOME_ROWS`]).
    rare_outcome_rows: i64,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish()
    }
}

/// One count in `audit stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub key: String,
    pub count: u64,
    /// Of those, denied.
    pub denied: u64,
}

/// One group of denials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    pub principal: String,
    pub tool: String,
    pub policy: String,
    pub rule: String,
    pub count: u64,
}

/// `audit stats` over a window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub since: Option<String>,
    pub until: Option<String>,
    pub decisions: u64,
    pub allowed: u64,
    pub denied: u64,
    pub top_principals: Vec<Count>,
    pub top_tools: Vec<Count>,
    pub top_denials: Vec<Denial>,
    /// Merged outcomes other than forwarded, denied, answered and pending.
    pub error_outcomes: Vec<Count>,
}

impl Reader {
    /// Opens `path` read-only. Missing file: an error (the CLI says where it looked).
    pub fn open(path: &Path) -> Result<Reader, AuditError> {
        if !path.exists() {
            return Err(AuditError::Query(format!(
                "{}: no such audit database",
                path.display()
            )));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| AuditError::Query(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version < 1 {
            return Err(AuditError::Query(format!(
                "{}: not a toolgate audit database (schema version {version})",
                path.display()
            )));
        }
        let latest = super::migrate::SQLITE.len() as i64;
        if version < latest {
            return Err(AuditError::Query(format!(
                "{}: an audit store of schema version {version}; start toolgate (this version) once to upgrade it to {latest}",
                path.display()
            )));
        }
        if version > latest {
            return Err(AuditError::Query(format!(
                "{}: an audit store of schema version {version}, newer than this toolgate knows ({latest})",
                path.display()
            )));
        }
        Ok(Reader {
            conn,
            names: Mutex::new(Names::default()),
            rare_outcome_rows: RARE_OUTCOME_ROWS,
        })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Matching decisions, oldest first (the newest `limit` with a limit).
    pub fn query(&self, f: &Filter) -> Result<Vec<Row>, AuditError> {
        self.query_where(f, &mut |_| true)
    }

    /// Like [`Reader::query`], keeping only rows `keep` accepts; the limit counts kept rows
    /// (`/api/audit` authorizes each row with it).
    pub fn query_where(
        &self,
        f: &Filter,
        keep: &mut dyn FnMut(&Row) -> bool,
    ) -> Result<Vec<Row>, AuditError> {
        let mut out = Vec::new();
        match f.limit {
            Some(limit) => {
                if limit == 0 {
                    return Ok(out);
                }
                // The newest N with an outcome filter: try recent windows first, where the
                // outcome index narrows well. A window that yields N rows holds the newest N
                // (every row outside it is older).
                if let (Some(v), None) = (&f.outcome, &f.since) {
                    let now = chrono::Utc::now();
                    for hours in [1, 24, 24 * 7, 24 * 30] {
                        let since = format_time(now - chrono::Duration::hours(hours));
                        if !self.outcome_is_rare(v, Some(&since))? {
                            break;
                        }
                        let g = Filter {
                            since: Some(since),
                            ..f.clone()
                        };
                        let mut got = Vec::new();
                        self.scan(&g, true, &mut |r| {
                            if keep(&r) {
                                got.push(r);
                            }
                            got.len() < limit
                        })?;
                        if got.len() >= limit {
                            got.reverse();
                            return Ok(got);
                        }
                    }
                }
                self.scan(f, true, &mut |r| {
                    if keep(&r) {
                        out.push(r);
                    }
                    out.len() < limit
                })?;
                out.reverse();
            }
            None => {
                self.scan(f, false, &mut |r| {
                    if keep(&r) {
                        out.push(r);
                    }
                    true
                })?;
            }
        }
        Ok(out)
    }

    /// Streams matching rows oldest first (every one when there is no limit); `each` returns
    /// false to stop. With a limit, the newest `limit` rows are collected first.
    pub fn for_each(
        &self,
        f: &Filter,
        each: &mut dyn FnMut(Row) -> bool,
    ) -> Result<(), AuditError> {
        if f.limit.is_some() {
            for r in self.query(f)? {
                if !each(r) {
                    break;
                }
            }
            return Ok(());
        }
        self.scan(f, false, each)
    }

    /// One page, newest first (the order [`Cursor`] follows), streamed to `emit` row by row:
    /// at most `limit` rows that `keep` accepts, examining at most `budget` rows. `emit`
    /// returns false to stop (the client went away). `f.limit` is ignored; `f.before` is the
    /// cursor. Nothing is collected: memory does not grow with the page or the store.
    pub fn page(
        &self,
        f: &Filter,
        limit: usize,
        budget: usize,
        keep: &mut dyn FnMut(&Row) -> bool,
        emit: &mut dyn FnMut(Row) -> bool,
    ) -> Result<PageEnd, AuditError> {
        let mut end = PageEnd::default();
        let mut examined = 0usize;
        let mut last: Option<Cursor> = None;
        let mut more = false;
        self.scan(f, true, &mut |r| {
            if end.rows >= limit || examined >= budget {
                // One row past the page: more rows match.
                more = true;
                return false;
            }
            examined += 1;
            last = Some(Cursor::of(&r));
            if keep(&r) {
                end.rows += 1;
                if !emit(r) {
                    end.stopped = true;
                    return false;
                }
            } else {
                end.withheld += 1;
            }
            true
        })?;
        if more {
            end.next = last;
        }
        Ok(end)
    }

    fn scan(
        &self,
        f: &Filter,
        newest_first: bool,
        each: &mut dyn FnMut(Row) -> bool,
    ) -> Result<(), AuditError> {
        let candidates = match &f.outcome {
            Some(v) => self.outcome_is_rare(v, f.since.as_deref())?,
            None => false,
        };
        let Some(w) = sqlite_where(&self.conn, f, candidates)? else {
            return Ok(());
        };
        let order = if newest_first { "DESC" } else { "ASC" };
        let cols: Vec<String> = DECISION_COLS
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect();
        let sql = format!(
            "SELECT {}, o.outcome, o.latency_us FROM decisions d {OUTCOME_JOIN} WHERE {} ORDER BY d.time {order}, d.seq {order}",
            cols.join(", "),
            w.conds.join(" AND ")
        );
        let mut names = self
            .names
            .lock()
            .map_err(|_| AuditError::Query("reader cache poisoned".into()))?;
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(w.params.iter()))?;
        while let Some(r) = rows.next()? {
            let mut s = store::decision_from(&self.conn, &mut names, r)?;
            s.prev_hash = store::prev_of(&self.conn, s.seq)?
                .map(|h| chain::hex(&h))
                .unwrap_or_default();
            let o: Option<i64> = r.get(DECISION_NCOLS)?;
            let l: Option<i64> = r.get(DECISION_NCOLS + 1)?;
            let merged = match o {
                Some(o) => Some((names.name(&self.conn, o)?, l)),
                None => None,
            };
            if !each(Row::from_stored(s, merged)) {
                break;
            }
        }
        Ok(())
    }

    /// Sets the rare-outcome bound: `0` never starts from the outcome index, `i64::MAX`
    /// always does. Both give the same rows; tests compare them.
    #[doc(hidden)]
    pub fn with_rare_outcome_rows(mut self, n: i64) -> Reader {
        self.rare_outcome_rows = n;
        self
    }

    /// Do fewer than [`RARE_OUTCOME_ROWS`] rows (since `since`) carry outcome `v` (or
    /// `v:<kind>`)? Then an outcome filter starts from those rows; otherwise matches are common
    /// and the newest ones are found faster along the time index. (SQLite keeps no statistics here: ANALYZE would
    /// hold the write lock.) One index range count, stopped at the bound: well under 1 ms.
    fn outcome_is_rare(&self, v: &str, since: Option<&str>) -> Result<bool, AuditError> {
        if matches!(v, "pending" | "forwarded" | "denied" | "answered" | "") {
            // Not in the (partial) indexes, and common by nature.
            return Ok(false);
        }
        let since = since.map(us_bound).unwrap_or(i64::MIN);
        let n: i64 = self
            .conn
            .prepare_cached(&format!(
                "SELECT count(*) FROM (SELECT 1 FROM decisions d JOIN names n ON n.id = d.outcome \
                 WHERE d.outcome IN (SELECT id FROM names WHERE text = ?1 OR (text >= ?2 AND text < ?3)) \
                 AND d.outcome > {LAST_FIXED_NAME} AND d.time >= ?5 \
                 UNION ALL SELECT 1 FROM outcomes x \
                 WHERE x.outcome IN (SELECT id FROM names WHERE text = ?1 OR (text >= ?2 AND text < ?3)) \
                 AND x.outcome > {LAST_FIXED_NAME} AND x.time >= ?5 LIMIT ?4)",
            ))?
            .query_row(
                rusqlite::params![
                    v,
                    format!("{v}:"),
                    format!("{v};"),
                    self.rare_outcome_rows,
                    since
                ],
                |r| r.get(0),
            )?;
        Ok(n < self.rare_outcome_rows)
    }

    /// One decision by id.
    pub fn get(&self, id: &str) -> Result<Option<Row>, AuditError> {
        let f = Filter {
            id: Some(id.to_string()),
            ..Filter::default()
        };
        Ok(self.query(&f)?.into_iter().next())
    }

    /// Outcome rows with a chain position in (`after`, `through`], oldest first, at most
    /// `limit`: each as (its position, its decision's position). One range of the outcomes'
    /// primary key, each joined to its decision by id (the unique `decisions_id` index); the
    /// live stream sends them so a `pending` row is updated in place. Outcomes whose decision
    /// is not in the store are skipped.
    pub fn outcomes_between(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> Result<Vec<(i64, i64)>, AuditError> {
        let mut st = self.conn.prepare_cached(
            "SELECT o.seq, d.seq FROM outcomes o JOIN decisions d ON d.id = o.decision WHERE o.seq > ?1 AND o.seq <= ?2 ORDER BY o.seq LIMIT ?3",
        )?;
        let lim = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = st.query_map(rusqlite::params![after, through, lim], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The last committed chain position (for `--follow`).
    pub fn head_seq(&self) -> Result<i64, AuditError> {
        Ok(store::tail(&self.conn)?.0)
    }

    /// Walks the hash chain with the key found next to the database (`audit.key`), or, when
    /// there is none, checks linkage only (see [`chain::Report::keyed`]).
    pub fn verify(&self) -> Result<chain::Report, AuditError> {
        let key = self
            .conn
            .path()
            .map(|p| super::key::default_path(Path::new(p)))
            .filter(|p| p.exists())
            .map(|p| super::key::load(&p))
            .transpose()
            .map_err(AuditError::Query)?;
        self.verify_with(key.as_ref(), None)
    }

    /// Walks the hash chain: with `key`, content too; `expect_head`: see [`chain::verify`].
    pub fn verify_with(
        &self,
        key: Option<&ChainKey>,
        expect_head: Option<&str>,
    ) -> Result<chain::Report, AuditError> {
        Ok(chain::verify(&self.conn, key, expect_head)?)
    }

    /// Totals and top lists over the filter (usually just a time window).
    pub fn stats(&self, f: &Filter, top: usize) -> Result<Stats, AuditError> {
        let mut f = f.clone();
        f.limit = None;
        let mut st = Stats {
            since: f.since.clone(),
            until: f.until.clone(),
            ..Stats::default()
        };
        let Some(mut w) = sqlite_where(&self.conn, &f, false)? else {
            return Ok(st);
        };
        // Shadow rows are what-if answers about decisions, not decisions: counted only when
        // asked for (`--kind shadow`).
        if f.kind.is_none()
            && let Some(id) = store::name_id(&self.conn, super::Kind::Shadow.as_str())?
        {
            w.conds.push(format!("d.kind != {id}"));
        }
        let from = format!(
            "FROM decisions d {OUTCOME_JOIN} WHERE {}",
            w.conds.join(" AND ")
        );
        let p = || rusqlite::params_from_iter(w.params.iter());
        let top = i64::try_from(top).unwrap_or(10);
        let (n, a, d): (i64, Option<i64>, Option<i64>) = self.conn.query_row(
            &format!("SELECT count(*), sum(d.effect = 1), sum(d.effect = 0) {from}"),
            p(),
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        st.decisions = n as u64;
        st.allowed = a.unwrap_or(0) as u64;
        st.denied = d.unwrap_or(0) as u64;
        let mut names = self
            .names
            .lock()
            .map_err(|_| AuditError::Query("reader cache poisoned".into()))?;
        let c = &self.conn;
        let mut counts = |expr: &str, extra: &str| -> Result<Vec<Count>, AuditError> {
            let sql = format!(
                "SELECT {expr}, count(*) AS n, sum(d.effect = 0) {from} {extra} GROUP BY 1 ORDER BY n DESC, 1 LIMIT {top}"
            );
            let mut stmt = c.prepare(&sql)?;
            let rows: Vec<(i64, i64, Option<i64>)> = stmt
                .query_map(p(), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::new();
            for (k, n, d) in rows {
                out.push(Count {
                    key: names.name(c, k)?,
                    count: n as u64,
                    denied: d.unwrap_or(0) as u64,
                });
            }
            // Ties were ordered by id; order them by text like the fleet query does.
            out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
            Ok(out)
        };
        let tool_or_method = format!(
            "CASE WHEN d.tool = {} THEN d.method ELSE d.tool END",
            store::NAME_EMPTY
        );
        st.top_principals = counts("d.principal", "")?;
        st.top_tools = counts(&tool_or_method, "")?;
        st.error_outcomes = counts(
            "COALESCE(o.outcome, d.outcome)",
            &format!(
                "AND COALESCE(o.outcome, d.outcome) NOT IN ({}, {}, {}, {}, {})",
                store::NAME_EMPTY,
                store::NAME_FORWARDED,
                store::NAME_DENIED,
                store::NAME_ANSWERED,
                store::NAME_PENDING
            ),
        )?;
        let sql = format!(
            "SELECT d.principal, {tool_or_method}, d.policy, d.rule, count(*) AS n {from} AND d.effect = 0 GROUP BY 1, 2, 3, 4 ORDER BY n DESC LIMIT {top}"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows: Vec<(i64, i64, i64, i64, i64)> = stmt
            .query_map(p(), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        for (pr, t, po, ru, n) in rows {
            st.top_denials.push(Denial {
                principal: names.name(c, pr)?,
                tool: names.name(c, t)?,
                policy: names.name(c, po)?,
                rule: names.name(c, ru)?,
                count: n as u64,
            });
        }
        st.top_denials.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.principal.cmp(&b.principal))
                .then_with(|| a.tool.cmp(&b.tool))
        });
        Ok(st)
    }
}

/// Opens `path` read-only and runs one query (`/api/audit`: call it in `spawn_blocking`).
pub fn query(path: &Path, f: &Filter) -> Result<Vec<Row>, AuditError> {
    Reader::open(path)?.query(f)
}

/// [`query`] keeping only the rows `keep` accepts (per-row authorization); the limit counts
/// kept rows.
pub fn query_authorized(
    path: &Path,
    f: &Filter,
    keep: &mut dyn FnMut(&Row) -> bool,
) -> Result<Vec<Row>, AuditError> {
    Reader::open(path)?.query_where(f, keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_bounds() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_time_bound("2h", now).unwrap(),
            "2026-03-01T10:00:00.000000Z"
        );
        assert_eq!(
            parse_time_bound("2026-02-01", now).unwrap(),
            "2026-02-01T00:00:00.000000Z"
        );
        assert_eq!(
            parse_time_bound("2026-02-01T01:00:00+01:00", now).unwrap(),
            "2026-02-01T00:00:00.000000Z"
        );
        assert!(parse_time_bound("last week", now).is_err());
    }

    #[test]
    fn filters_from_pairs() {
        let f = Filter::from_pairs([("principal", "alice"), ("limit", "5"), ("effect", "deny")])
            .unwrap();
        assert_eq!(f.principal.as_deref(), Some("alice"));
        assert_eq!(f.limit, Some(5));
        assert!(Filter::from_pairs([("effect", "maybe")]).is_err());
        assert!(Filter::from_pairs([("bogus", "1")]).is_err());
    }

    #[test]
    fn cursors_round_trip_and_refuse_foreign_text() {
        let c = Cursor {
            time: "2026-03-01T10:00:00.000000Z".into(),
            seq: 42,
        };
        assert_eq!(c.to_string(), "42.2026-03-01T10:00:00.000000Z");
        assert_eq!(Cursor::parse(&c.to_string()).unwrap(), c);
        for bad in [
            "",
            "42",
            "x.2026-03-01T10:00:00.000000Z",
            "-1.2026-03-01T10:00:00.000000Z",
            "42.yesterday",
        ] {
            let e = Cursor::parse(bad).unwrap_err();
            assert!(e.starts_with("cursor: "), "{e}");
        }
        let f = Filter::from_pairs([("cursor", "7.2026-03-01T10:00:00Z")]).unwrap();
        assert_eq!(f.before.unwrap().seq, 7);
    }

    #[test]
    fn sql_binds_every_value() {
        let f = Filter {
            principal: Some("x' OR 1=1 --".into()),
            tag: Some("tag:ci".into()),
            outcome: Some("upstream_error".into()),
            ..Filter::default()
        };
        let (w, p) = where_clause(&f, Dialect::Postgres);
        assert!(!w.contains("OR 1=1"), "{w}");
        assert!(w.contains("$1") && w.contains("$4"), "{w}");
        assert_eq!(p.len(), 5);
    }
}
