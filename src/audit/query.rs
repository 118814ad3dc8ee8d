//! Reading the trail: [`Filter`] (the `audit query` flags and the `/api/audit` parameters), a
//! read-only [`Reader`] (WAL: never blocks the writer), `audit stats` and the SQL they share with
//! the Postgres fleet queries. Only bound parameters reach SQL.
//!
//! Order: rows come oldest first. With a `limit`, they are the newest `limit` matching rows
//! (still printed oldest first, like `tail`); without one, every matching row.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::AuditError;
use super::chain;
use super::record::{COLUMNS, Row, StoredRow, format_time, normalize_time};

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
/// `candidates`: find outcome matches through the `events_outcome` index first (SQLite only;
/// worth it when few rows carry that outcome, see [`Reader::outcome_is_rare`]).
pub(crate) fn where_clause(f: &Filter, dialect: Dialect, candidates: bool) -> (String, Vec<Param>) {
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
        if candidates && dialect == Dialect::Sqlite {
            // Candidates first, through `events_outcome` (migration 0002): decisions whose own
            // outcome matches, and decisions named by a matching outcome row. The merged test
            // above then keeps only those whose latest outcome matches. A prefix is the range
            // [v + ":", v + ";"). Outcome rows are never older than their decision, so `since`
            // narrows them too.
            let end = ph(Param::Text(format!("{v};")), &mut params);
            let since = |t: &str, params: &mut Vec<Param>| match &f.since {
                Some(s) => format!(" AND {t}.time >= {}", ph(Param::Text(s.clone()), params)),
                None => String::new(),
            };
            let (since_c, since_x) = (since("c", &mut params), since("x", &mut params));
            // One SELECT per index range (an OR across ranges would scan the whole index), each
            // repeating the partial index's condition (SQLite uses it only then).
            let ranges = |t: &str, since: &str| {
                [
                    format!("{t}.outcome = {p}{since} AND {t}.outcome NOT IN {COMMON_OUTCOMES}"),
                    format!(
                        "{t}.outcome >= {q} AND {t}.outcome < {end}{since} AND {t}.outcome NOT IN {COMMON_OUTCOMES}"
                    ),
                ]
            };
            let mut parts = Vec::new();
            for r in ranges("c", &since_c) {
                parts.push(format!(
                    "SELECT c.seq FROM events c WHERE {r} AND c.event = 'decision'"
                ));
            }
            for r in ranges("x", &since_x) {
                parts.push(format!(
                    "SELECT c.seq FROM events x JOIN events c ON c.id = x.decision_id WHERE {r} AND x.event = 'outcome'"
                ));
            }
            conds.push(format!("d.seq IN ({})", parts.join(" UNION ALL ")));
        }
    }
    if let Some(v) = f.after_seq {
        let p = ph(Param::Int(v), &mut params);
        conds.push(format!("d.seq > {p}"));
    }
    if let Some(v) = f.before_seq {
        let p = ph(Param::Int(v), &mut params);
        conds.push(format!("d.seq < {p}"));
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

fn select_sql(f: &Filter, newest_first: bool, candidates: bool) -> (String, Vec<Param>) {
    let cols: Vec<String> = COLUMNS.iter().map(|c| format!("d.{c}")).collect();
    let (w, params) = where_clause(f, Dialect::Sqlite, candidates);
    let order = if newest_first { "DESC" } else { "ASC" };
    (
        format!(
            "SELECT {}, o.outcome, o.latency_us FROM events d {} WHERE {w} ORDER BY d.time {order}, d.seq {order}",
            cols.join(", "),
            outcome_join(Dialect::Sqlite)
        ),
        params,
    )
}

fn row_from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let s = StoredRow::from_sqlite(r, 0)?;
    let o: Option<String> = r.get(COLUMNS.len())?;
    let l: Option<i64> = r.get(COLUMNS.len() + 1)?;
    Ok(Row::from_stored(s, o.map(|o| (o, l))))
}

/// See [`Reader::outcome_is_rare`].
const RARE_OUTCOME_ROWS: i64 = 10_000;

/// The outcomes `events_outcome` leaves out (migration 0002), as SQL.
const COMMON_OUTCOMES: &str = "('pending', 'forwarded')";

/// A read-only connection to the store.
pub struct Reader {
    conn: Connection,
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
        Ok(Reader {
            conn,
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
        let (sql, params) = select_sql(f, newest_first, candidates);
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        while let Some(r) = rows.next()? {
            if !each(row_from_sqlite(r)?) {
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
        if matches!(v, "pending" | "forwarded") {
            // Not in the (partial) index, and common by nature.
            return Ok(false);
        }
        let n: i64 = self
            .conn
            .prepare_cached(&format!(
                "SELECT count(*) FROM (SELECT 1 FROM events WHERE outcome = ?1 AND time >= ?5 \
                 AND outcome NOT IN {COMMON_OUTCOMES} UNION ALL SELECT 1 FROM events WHERE outcome >= ?2 \
                 AND outcome < ?3 AND time >= ?5 AND outcome NOT IN {COMMON_OUTCOMES} LIMIT ?4)",
            ))?
            .query_row(
                rusqlite::params![
                    v,
                    format!("{v}:"),
                    format!("{v};"),
                    self.rare_outcome_rows,
                    since.unwrap_or("")
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

    /// The last committed chain position (for `--follow`).
    pub fn head_seq(&self) -> Result<i64, AuditError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT max(seq) FROM events", [], |r| r.get(0))
            .optional()?
            .flatten();
        Ok(v.unwrap_or(0))
    }

    /// Walks the hash chain.
    pub fn verify(&self) -> Result<chain::Report, AuditError> {
        Ok(chain::verify(&self.conn)?)
    }

    /// Totals and top lists over the filter (usually just a time window).
    pub fn stats(&self, f: &Filter, top: usize) -> Result<Stats, AuditError> {
        let mut f = f.clone();
        f.limit = None;
        let (w, params) = where_clause(&f, Dialect::Sqlite, false);
        let from = format!("FROM events d {} WHERE {w}", outcome_join(Dialect::Sqlite));
        let p = || rusqlite::params_from_iter(params.iter());
        let top = i64::try_from(top).unwrap_or(10);
        let mut st = Stats {
            since: f.since.clone(),
            until: f.until.clone(),
            ..Stats::default()
        };
        let (n, a, d): (i64, Option<i64>, Option<i64>) = self.conn.query_row(
            &format!("SELECT count(*), sum(d.effect = 'allow'), sum(d.effect = 'deny') {from}"),
            p(),
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        st.decisions = n as u64;
        st.allowed = a.unwrap_or(0) as u64;
        st.denied = d.unwrap_or(0) as u64;
        let counts = |expr: &str, extra: &str| -> Result<Vec<Count>, AuditError> {
            let sql = format!(
                "SELECT {expr}, count(*) AS n, sum(d.effect = 'deny') {from} {extra} GROUP BY 1 ORDER BY n DESC, 1 LIMIT {top}"
            );
            let mut stmt = self.conn.prepare(&sql)?;
            let rows = stmt.query_map(p(), |r| {
                Ok(Count {
                    key: r.get(0)?,
                    count: r.get::<_, i64>(1)? as u64,
                    denied: r.get::<_, Option<i64>>(2)?.unwrap_or(0) as u64,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        };
        st.top_principals = counts("d.principal", "")?;
        st.top_tools = counts("CASE WHEN d.tool = '' THEN d.method ELSE d.tool END", "")?;
        st.error_outcomes = counts(
            "COALESCE(o.outcome, d.outcome)",
            "AND COALESCE(o.outcome, d.outcome) NOT IN ('', 'forwarded', 'denied', 'answered', 'pending')",
        )?;
        let sql = format!(
            "SELECT d.principal, CASE WHEN d.tool = '' THEN d.method ELSE d.tool END, d.policy, d.rule, count(*) AS n {from} AND d.effect = 'deny' GROUP BY 1, 2, 3, 4 ORDER BY n DESC, 1, 2 LIMIT {top}"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(p(), |r| {
            Ok(Denial {
                principal: r.get(0)?,
                tool: r.get(1)?,
                policy: r.get(2)?,
                rule: r.get(3)?,
                count: r.get::<_, i64>(4)? as u64,
            })
        })?;
        st.top_denials = rows.collect::<Result<Vec<_>, _>>()?;
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
    fn sql_binds_every_value() {
        let f = Filter {
            principal: Some("x' OR 1=1 --".into()),
            tag: Some("tag:ci".into()),
            outcome: Some("upstream_error".into()),
            ..Filter::default()
        };
        let (w, p) = where_clause(&f, Dialect::Postgres, false);
        assert!(!w.contains("OR 1=1"), "{w}");
        assert!(w.contains("$1") && w.contains("$4"), "{w}");
        assert_eq!(p.len(), 5);
    }
}
