//! The fleet sink (`audit.postgres`): a shipper copies committed SQLite rows to PostgreSQL in
//! chain order, at least once and idempotent by row id (`ON CONFLICT (id) DO NOTHING`), so the
//! effect is exactly once. SQLite stays the durable outbox: the shipped watermark is persisted in
//! its `meta` table (through the writer), shipping resumes from it after a restart or an outage,
//! and retention never prunes unshipped rows. Several gateways ship into one database; every row
//! carries its gateway and its store's id, and `(store_id, seq)` is that store's chain.
//!
//! Uses sqlx with only its postgres feature. The URL may hold `${NAME}` (taken from the
//! environment, e.g. a password) and sqlx also reads `PGPASSWORD`; URLs are never logged with a
//! password ([`redact_url`]).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection as _, Row as _};

use super::AuditError;
use super::chain::{self, Break, GENESIS, hex};
use super::key::{ChainKey, unhex32};
use super::query::{Dialect, Filter, Param, outcome_join, where_clause};
use super::record::{COLUMNS, Row, StoredRow, event};
use super::store::{self, Names};
use super::writer::Shared;

/// How the shipper reaches Postgres.
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub url: String,
    pub schema: String,
    /// Rows per shipping transaction.
    pub batch_rows: usize,
}

/// The URL with any password replaced by `***` (for logs and errors).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(auth_end);
    match auth.rfind('@') {
        Some(at) => {
            let (userinfo, host) = auth.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}{user}:***{host}{tail}"),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

fn valid_schema(s: &str) -> bool {
    crate::config::valid_postgres_schema(s)
}

fn pg_err(e: &sqlx::Error) -> AuditError {
    // sqlx errors do not include the connection URL; keep only the message.
    AuditError::Postgres(e.to_string())
}

/// Connects, creates the schema and applies the migrations (under an advisory lock).
pub async fn connect(pg: &PgSettings) -> Result<PgConnection, AuditError> {
    let mut conn = connect_existing(pg).await?;
    migrate(&mut conn, &pg.schema).await?;
    Ok(conn)
}

/// Connects without touching the schema (readers: `audit query --postgres`).
pub async fn connect_existing(pg: &PgSettings) -> Result<PgConnection, AuditError> {
    if !valid_schema(&pg.schema) {
        return Err(AuditError::Postgres(format!(
            "bad schema name {:?}",
            pg.schema
        )));
    }
    let url = crate::config::expand_env(&pg.url)
        .map_err(|e| AuditError::Postgres(format!("audit.postgres: {e}")))?;
    let opts = PgConnectOptions::from_str(&url)
        .map_err(|_| AuditError::Postgres(format!("bad URL {}", redact_url(&pg.url))))?
        .application_name("toolgate-audit")
        .options([("search_path", pg.schema.as_str())]);
    let conn = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect_with(&opts))
        .await
        .map_err(|_| {
            AuditError::Postgres(format!("connecting to {}: timed out", redact_url(&pg.url)))
        })?
        .map_err(|e| AuditError::Postgres(format!("connecting to {}: {e}", redact_url(&pg.url))))?;
    Ok(conn)
}

/// Applies the Postgres migrations in `schema`; returns the version.
pub async fn migrate(conn: &mut PgConnection, schema: &str) -> Result<usize, AuditError> {
    if !valid_schema(schema) {
        return Err(AuditError::Postgres(format!("bad schema name {schema:?}")));
    }
    sqlx::query("SELECT pg_advisory_lock(hashtext('toolgate_audit_migrate'))")
        .execute(&mut *conn)
        .await
        .map_err(|e| pg_err(&e))?;
    let r = migrate_locked(conn, schema).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext('toolgate_audit_migrate'))")
        .execute(&mut *conn)
        .await;
    r
}

async fn migrate_locked(conn: &mut PgConnection, schema: &str) -> Result<usize, AuditError> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; \
         CREATE TABLE IF NOT EXISTS \"{schema}\".schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());"
    )))
    .execute(&mut *conn)
    .await
    .map_err(|e| pg_err(&e))?;
    let done: Option<i32> = sqlx::query(AssertSqlSafe(format!(
        "SELECT max(version) FROM \"{schema}\".schema_migrations"
    )))
    .fetch_one(&mut *conn)
    .await
    .and_then(|r| r.try_get(0))
    .map_err(|e| pg_err(&e))?;
    let done = usize::try_from(done.unwrap_or(0)).unwrap_or(0);
    if done > super::migrate::POSTGRES.len() {
        return Err(AuditError::Postgres(format!(
            "schema {schema} is at version {done}, newer than this toolgate knows"
        )));
    }
    for (i, (name, sql)) in super::migrate::POSTGRES.iter().enumerate().skip(done) {
        let mut tx = conn.begin().await.map_err(|e| pg_err(&e))?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "SET LOCAL search_path TO \"{schema}\"; {sql}"
        )))
        .execute(&mut *tx)
        .await
        .map_err(|e| AuditError::Postgres(format!("migration {name}: {e}")))?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".schema_migrations (version, name) VALUES ($1, $2)"
        )))
        .bind(i32::try_from(i + 1).unwrap_or(i32::MAX))
        .bind(*name)
        .execute(&mut *tx)
        .await
        .map_err(|e| pg_err(&e))?;
        tx.commit().await.map_err(|e| pg_err(&e))?;
    }
    Ok(super::migrate::POSTGRES.len())
}

/// Reconnect delays of the shipper: 200 ms doubling to 10 s, each jittered so that a fleet of
/// gateways does not reconnect to one PostgreSQL in lockstep.
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// The shipped columns: the chain's columns plus the store id, chain version and key id.
const PG_INSERT_COLS: &str = "seq, event, id, decision_id, gateway, time, kind, principal, login, node, node_id, tags, ip, server, method, tool, action, effect, policy, rule, reason, args_digest, outcome, latency_us, policy_hash, explain, arguments, hash, prev_hash, tags_text, store_id, chain, key_id";

/// Inserts rows idempotently (by id) in one transaction; returns rows newly inserted.
pub async fn insert_rows(
    conn: &mut PgConnection,
    store_id: &str,
    key_id: &str,
    rows: &[StoredRow],
) -> Result<u64, AuditError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut sql = format!("INSERT INTO events ({PG_INSERT_COLS}) VALUES ");
    let per = 33;
    for i in 0..rows.len() {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..per {
            if c > 0 {
                sql.push(',');
            }
            let n = i * per + c + 1;
            sql.push_str(&format!("${n}"));
            match c {
                5 => sql.push_str("::timestamptz"),
                11 => sql.push_str("::jsonb"),
                _ => {}
            }
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (id) DO NOTHING");
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for r in rows {
        let id = if r.event == event::DECISION {
            r.id.clone()
        } else {
            format!("{store_id}:{}", r.seq)
        };
        q = q
            .bind(r.seq)
            .bind(r.event.clone())
            .bind(id)
            .bind(r.decision_id.clone())
            .bind(r.gateway.clone())
            .bind(r.time.clone())
            .bind(r.kind.clone())
            .bind(r.principal.clone())
            .bind(r.login.clone())
            .bind(r.node.clone())
            .bind(r.node_id.clone())
            .bind(r.tags.clone())
            .bind(r.ip.clone())
            .bind(r.server.clone())
            .bind(r.method.clone())
            .bind(r.tool.clone())
            .bind(r.action.clone())
            .bind(r.effect.clone())
            .bind(r.policy.clone())
            .bind(r.rule.clone())
            .bind(r.reason.clone())
            .bind(r.args_digest.clone())
            .bind(r.outcome.clone())
            .bind(r.latency_us)
            .bind(r.policy_hash.clone())
            .bind(r.explain.clone())
            .bind(r.arguments.clone())
            .bind(r.hash.clone())
            .bind(r.prev_hash.clone())
            .bind(r.tags.clone())
            .bind(store_id.to_string())
            .bind(3i16)
            .bind(key_id.to_string());
    }
    let mut tx = conn.begin().await.map_err(|e| pg_err(&e))?;
    let done = q.execute(&mut *tx).await.map_err(|e| pg_err(&e))?;
    if let Some(last) = rows.last() {
        sqlx::query(
            "INSERT INTO heads (store_id, gateway, seq, hash, key_id) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (store_id) DO UPDATE SET gateway = EXCLUDED.gateway, seq = EXCLUDED.seq, hash = EXCLUDED.hash, key_id = EXCLUDED.key_id, updated_at = now() \
             WHERE heads.seq < EXCLUDED.seq",
        )
        .bind(store_id)
        .bind(last.gateway.clone())
        .bind(last.seq)
        .bind(last.hash.clone())
        .bind(key_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| pg_err(&e))?;
    }
    tx.commit().await.map_err(|e| pg_err(&e))?;
    Ok(done.rows_affected())
}

/// The SELECT list reading a [`StoredRow`] back (time in the stored fixed-width form).
fn pg_select_cols(alias: &str) -> String {
    COLUMNS
        .iter()
        .map(|c| match *c {
            "time" => format!(
                "to_char({alias}.time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
            ),
            "tags" => format!("{alias}.tags_text"),
            c => format!("{alias}.{c}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn stored_from_pg(r: &sqlx::postgres::PgRow) -> Result<StoredRow, sqlx::Error> {
    Ok(StoredRow {
        seq: r.try_get(0)?,
        event: r.try_get(1)?,
        id: r.try_get(2)?,
        decision_id: r.try_get(3)?,
        gateway: r.try_get(4)?,
        time: r.try_get(5)?,
        kind: r.try_get(6)?,
        principal: r.try_get(7)?,
        login: r.try_get(8)?,
        node: r.try_get(9)?,
        node_id: r.try_get(10)?,
        tags: r.try_get(11)?,
        ip: r.try_get(12)?,
        server: r.try_get(13)?,
        method: r.try_get(14)?,
        tool: r.try_get(15)?,
        action: r.try_get(16)?,
        effect: r.try_get(17)?,
        policy: r.try_get(18)?,
        rule: r.try_get(19)?,
        reason: r.try_get(20)?,
        args_digest: r.try_get(21)?,
        outcome: r.try_get(22)?,
        latency_us: r.try_get(23)?,
        policy_hash: r.try_get(24)?,
        explain: r.try_get(25)?,
        arguments: r.try_get(26)?,
        hash: r.try_get(27)?,
        prev_hash: r.try_get(28)?,
        inputs: None,
        explain_digest: None,
    })
}

/// Fleet query: the same filters and order as [`super::query::Reader::query`], over every
/// gateway's rows.
pub async fn query(conn: &mut PgConnection, f: &Filter) -> Result<Vec<Row>, AuditError> {
    let (w, params) = where_clause(f, Dialect::Postgres);
    let newest_first = f.limit.is_some();
    let order = if newest_first { "DESC" } else { "ASC" };
    let mut sql = format!(
        "SELECT {}, o.outcome, o.latency_us FROM events d {} WHERE {w} ORDER BY d.time {order}, d.gateway {order}, d.seq {order}",
        pg_select_cols("d"),
        outcome_join(Dialect::Postgres)
    );
    if let Some(l) = f.limit {
        sql.push_str(&format!(" LIMIT {l}"));
    }
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for p in params {
        q = match p {
            Param::Text(s) => q.bind(s),
            Param::Int(i) => q.bind(i),
        };
    }
    let rows = q.fetch_all(&mut *conn).await.map_err(|e| pg_err(&e))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let s = stored_from_pg(r).map_err(|e| pg_err(&e))?;
        let o: Option<String> = r.try_get(COLUMNS.len()).map_err(|e| pg_err(&e))?;
        let l: Option<i64> = r.try_get(COLUMNS.len() + 1).map_err(|e| pg_err(&e))?;
        out.push(Row::from_stored(s, o.map(|o| (o, l))));
    }
    if newest_first {
        out.reverse();
    }
    Ok(out)
}

/// Every chain in the fleet database, checked row by row from genesis or an anchor to the head
/// the shipper recorded. Rows of the keyed chain (`chain` 3) are checked with the key whose id
/// they carry, when `keys` has it; otherwise linkage only (`prev_hash` and seq continuity).
/// Returns (rows checked, first break per store, stores checked without their key).
pub async fn verify(
    conn: &mut PgConnection,
    keys: &[ChainKey],
) -> Result<(u64, Vec<(String, Break)>, Vec<String>), AuditError> {
    let sql = format!(
        "SELECT {}, e.store_id, e.chain, e.key_id FROM events e ORDER BY e.store_id, e.seq",
        pg_select_cols("e")
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| pg_err(&e))?;
    let heads: Vec<(String, i64, String)> =
        sqlx::query("SELECT store_id, seq, hash FROM heads ORDER BY store_id")
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| pg_err(&e))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| pg_err(&e))?;
    let n = rows.len() as u64;
    let mut stores: Vec<(String, Vec<PgChainRow>)> = Vec::new();
    for r in &rows {
        let s = stored_from_pg(r).map_err(|e| pg_err(&e))?;
        let store: String = r.try_get(COLUMNS.len()).map_err(|e| pg_err(&e))?;
        let chain: i16 = r.try_get(COLUMNS.len() + 1).map_err(|e| pg_err(&e))?;
        let key_id: String = r.try_get(COLUMNS.len() + 2).map_err(|e| pg_err(&e))?;
        match stores.last_mut() {
            Some((id, v)) if *id == store => v.push((s, chain, key_id)),
            _ => stores.push((store, vec![(s, chain, key_id)])),
        }
    }
    let mut breaks = Vec::new();
    let mut unkeyed = Vec::new();
    for (store, rows) in stores {
        let head = heads.iter().find(|h| h.0 == store);
        let (b, keyed) = verify_store(&rows, keys, head.map(|h| (h.1, h.2.as_str())));
        if let Some(b) = b {
            breaks.push((store.clone(), b));
        }
        if !keyed {
            unkeyed.push(store);
        }
    }
    Ok((n, breaks, unkeyed))
}

/// A shipped row with its chain version and key id.
type PgChainRow = (StoredRow, i16, String);

/// One store's rows in seq order; returns the first break and whether every keyed row was
/// checked with its key.
fn verify_store(
    rows: &[PgChainRow],
    keys: &[ChainKey],
    head: Option<(i64, &str)>,
) -> (Option<Break>, bool) {
    let mut keyed = true;
    let mut prev: Option<(i64, String, i16)> = None;
    for (s, chain_v, key_id) in rows {
        let brk = |problem: String| Break {
            seq: s.seq,
            id: s.id.clone(),
            problem,
        };
        let expected_prev = match &prev {
            None if s.seq == 1 => hex(&GENESIS),
            None => {
                // Rows before the first were pruned before shipping: an anchor must say so.
                let anchored = rows.iter().find_map(|(a, _, _)| {
                    (a.event == event::ANCHOR)
                        .then(|| serde_json::from_str::<chain::Anchor>(&a.explain).ok())
                        .flatten()
                        .filter(|x| x.pruned_through_seq + 1 == s.seq)
                });
                match anchored {
                    Some(a) => a.pruned_through_hash,
                    None => {
                        return (
                            Some(brk(format!(
                                "rows before seq {} are missing and no retention anchor accounts for them",
                                s.seq
                            ))),
                            keyed,
                        );
                    }
                }
            }
            Some((pseq, _, _)) if s.seq != pseq + 1 => {
                return (
                    Some(brk(format!("rows {}..{} are missing", pseq + 1, s.seq - 1))),
                    keyed,
                );
            }
            Some((_, phash, pchain)) => {
                if *pchain == 1 && *chain_v == 3 {
                    // The store was re-keyed by its v3 upgrade here: the keyed chain starts from
                    // the re-keyed hash of the row before, which only the SQLite store holds.
                    s.prev_hash.clone()
                } else {
                    phash.clone()
                }
            }
        };
        if s.prev_hash != expected_prev {
            return (
                Some(brk(
                    "prev_hash does not match the previous row (a row was deleted, inserted or edited)"
                        .into(),
                )),
                keyed,
            );
        }
        match chain_v {
            1 => {
                if chain::legacy_row_hash(&s.prev_hash, s.seq, &s.content()) != s.hash {
                    return (
                        Some(brk("hash does not match the row's content".into())),
                        keyed,
                    );
                }
            }
            _ => match keys.iter().find(|k| k.id() == key_id) {
                Some(k) => {
                    let mut logical = s.clone();
                    if logical.event != event::DECISION {
                        logical.id.clear();
                    }
                    let prev = unhex32(&expected_prev).unwrap_or(GENESIS);
                    if !chain::check_row(k, &prev, &logical) {
                        return (
                            Some(brk("hash does not match the row's content (keyed)".into())),
                            keyed,
                        );
                    }
                }
                None => keyed = false,
            },
        }
        prev = Some((s.seq, s.hash.clone(), *chain_v));
    }
    let tail_problem = match (&prev, head) {
        (Some((seq, hash, _)), Some((hseq, hhash))) if *seq == hseq && hash == hhash => None,
        (Some((seq, _, _)), Some((hseq, _))) if *seq > hseq => None,
        (_, Some((hseq, hhash))) => Some(format!(
            "the chain ends before the recorded head (seq {hseq}, hash {hhash}): rows were removed from the end"
        )),
        (Some((_, _, 3)), None) => Some(
            "the store has keyed rows but no recorded head (the heads row was removed)".to_string(),
        ),
        _ => None,
    };
    let b = tail_problem.map(|problem| Break {
        seq: prev.as_ref().map(|p| p.0).unwrap_or(0),
        id: String::new(),
        problem,
    });
    (b, keyed)
}

/// What [`cross_check`] found for one SQLite store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrossCheck {
    /// The store's id (its rows' `store_id` in PostgreSQL).
    pub store_id: String,
    /// The highest seq PostgreSQL knows for this store (its rows or its recorded head); 0: none.
    pub shipped_through: i64,
    /// The local head seq.
    pub local_head: i64,
    /// Shipped keyed rows whose hash matched the local row's.
    pub matched: u64,
    /// Shipped rows pruned here by retention (not comparable).
    pub pruned: u64,
    /// Shipped rows of the old unkeyed chain (re-keyed locally by the v3 upgrade: not comparable).
    pub legacy: u64,
    /// The first disagreement.
    pub broken: Option<Break>,
}

/// Cross-checks a SQLite store against its PostgreSQL copy: every shipped keyed row must still
/// be in the file with the same hash (unless retention pruned it), and the file's chain must
/// reach the highest seq PostgreSQL holds for it. This catches what the file alone cannot: rows
/// removed from the end together with a rewritten (or replayed) head, and a chain rewritten by
/// someone holding the key.
pub async fn cross_check(
    conn: &mut PgConnection,
    sqlite: &Connection,
) -> Result<CrossCheck, AuditError> {
    let q = |e: rusqlite::Error| AuditError::Query(e.to_string());
    let store = store_id(sqlite).map_err(q)?;
    if store.is_empty() {
        return Err(AuditError::Query(
            "the store has no store_id in meta (it was never opened by toolgate)".into(),
        ));
    }
    let (local_head, _) = store::tail(sqlite).map_err(q)?;
    let pruned_through: i64 = sqlite
        .query_row(
            "SELECT coalesce(max(through_seq), 0) FROM anchors",
            [],
            |r| r.get(0),
        )
        .map_err(q)?;
    let head: Option<(i64, String)> =
        sqlx::query("SELECT seq, hash FROM heads WHERE store_id = $1")
            .bind(&store)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| pg_err(&e))?
            .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
            .map_err(|e| pg_err(&e))?;
    let mut out = CrossCheck {
        store_id: store.clone(),
        local_head,
        ..CrossCheck::default()
    };
    let brk = |seq: i64, problem: String| {
        Some(Break {
            seq,
            id: String::new(),
            problem,
        })
    };
    let mut after = 0i64;
    'pages: loop {
        let rows = sqlx::query(
            "SELECT seq, hash, chain FROM events WHERE store_id = $1 AND seq > $2 ORDER BY seq LIMIT 10000",
        )
        .bind(&store)
        .bind(after)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| pg_err(&e))?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.try_get(0).map_err(|e| pg_err(&e))?;
        for r in &rows {
            let seq: i64 = r.try_get(0).map_err(|e| pg_err(&e))?;
            let hash: String = r.try_get(1).map_err(|e| pg_err(&e))?;
            let chain_v: i16 = r.try_get(2).map_err(|e| pg_err(&e))?;
            out.shipped_through = out.shipped_through.max(seq);
            if chain_v != 3 {
                out.legacy += 1;
                continue;
            }
            match store::hash_at(sqlite, seq).map_err(q)? {
                Some(h) if hex(&h) == hash => out.matched += 1,
                Some(_) => {
                    out.broken = brk(
                        seq,
                        "the row differs from its PostgreSQL copy (rewritten here after it was shipped)"
                            .into(),
                    );
                    break 'pages;
                }
                None if seq <= pruned_through => out.pruned += 1,
                None if seq > local_head => break 'pages,
                None => {
                    out.broken = brk(
                        seq,
                        "the row is in the PostgreSQL copy but missing here (deleted after it was shipped)"
                            .into(),
                    );
                    break 'pages;
                }
            }
        }
    }
    if let Some((hseq, hhash)) = &head {
        out.shipped_through = out.shipped_through.max(*hseq);
        if out.broken.is_none()
            && *hseq <= local_head
            && let Some(h) = store::hash_at(sqlite, *hseq).map_err(q)?
            && hex(&h) != *hhash
        {
            out.broken = brk(
                *hseq,
                "the row differs from the head recorded in PostgreSQL (rewritten here)".into(),
            );
        }
    }
    if out.shipped_through > local_head {
        // Truncation outranks a row-level finding: it is the whole story.
        out.broken = brk(
            local_head,
            format!(
                "the PostgreSQL copy holds this store's chain through seq {}, but this file ends at seq {local_head}: rows were removed from the end (a head that still verifies was rewritten or replayed)",
                out.shipped_through
            ),
        );
    }
    Ok(out)
}

/// The shipper thread (started by [`super::AuditLog::open`] when `audit.postgres` is set).
pub(crate) struct Shipper {
    pub db: PathBuf,
    pub pg: PgSettings,
    pub shared: Arc<Shared>,
    /// Hands a new watermark to the writer (which persists it); false if the queue was full.
    pub report: Box<dyn Fn(i64) -> bool + Send>,
}

/// The store's id (created at the first open), distinguishing chains of re-created databases.
pub(crate) fn store_id(conn: &Connection) -> rusqlite::Result<String> {
    Ok(super::retention::meta_text(conn, "store_id")?.unwrap_or_default())
}

/// Up to `limit` rows after `after`, with `prev_hash` filled in (the logical rows shipped).
fn read_after(
    conn: &Connection,
    names: &mut Names,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<StoredRow>> {
    let mut rows = store::read_after(conn, names, after, limit)?;
    let mut prev = match rows.first() {
        Some(r) => store::prev_of(conn, r.seq)?
            .map(|h| hex(&h))
            .unwrap_or_default(),
        None => return Ok(rows),
    };
    for r in rows.iter_mut() {
        r.prev_hash = std::mem::replace(&mut prev, r.hash.clone());
    }
    Ok(rows)
}

impl Shipper {
    pub(crate) fn run(self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "audit shipper: no runtime");
                return;
            }
        };
        rt.block_on(self.main());
    }

    async fn pause(&self, d: Duration) {
        if self.shared.stop.load(Ordering::SeqCst) {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.shared.stop_notify.notified() => {}
        }
    }

    fn fail(&self, what: &str, e: &AuditError, logged: &mut bool) {
        self.shared.ship_errors.fetch_add(1, Ordering::Relaxed);
        self.shared.ship_healthy.store(false, Ordering::Relaxed);
        if !*logged {
            tracing::warn!(error = %e, url = %redact_url(&self.pg.url), "audit shipper: {what}; retrying");
            *logged = true;
        }
    }

    async fn main(self) {
        let sqlite = match Connection::open_with_flags(
            &self.db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "audit shipper: cannot read the store");
                return;
            }
        };
        let _ = sqlite.busy_timeout(Duration::from_secs(5));
        let store = store_id(&sqlite).unwrap_or_default();
        let key_id = super::retention::meta_text(&sqlite, "key_id")
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut names = Names::default();
        let mut shipped = self.shared.shipped_seq.load(Ordering::Relaxed);
        let mut pg: Option<PgConnection> = None;
        let mut backoff = crate::backoff::Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
        let mut logged = false;
        let mut unreported = false;
        while !self.shared.stop.load(Ordering::SeqCst) {
            if unreported {
                unreported = !(self.report)(shipped);
            }
            let rows = match read_after(&sqlite, &mut names, shipped, self.pg.batch_rows.max(1)) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(
                        "reading the store",
                        &AuditError::Query(e.to_string()),
                        &mut logged,
                    );
                    self.pause(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let lag_ms = rows
                .first()
                .and_then(|r| chrono::DateTime::parse_from_rfc3339(&r.time).ok())
                .map(|t| {
                    (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                        .num_milliseconds()
                        .max(0)
                })
                .unwrap_or(0);
            self.shared
                .ship_lag_ms
                .store(u64::try_from(lag_ms).unwrap_or(0), Ordering::Relaxed);
            if rows.is_empty() {
                self.pause(Duration::from_millis(200)).await;
                continue;
            }
            if pg.is_none() {
                match connect(&self.pg).await {
                    Ok(c) => pg = Some(c),
                    Err(e) => {
                        self.fail("connecting", &e, &mut logged);
                        self.pause(backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            let Some(conn) = pg.as_mut() else { continue };
            let t0 = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                insert_rows(conn, &store, &key_id, &rows),
            )
            .await;
            match r {
                Ok(Ok(_)) => {
                    if let Some(last) = rows.last() {
                        shipped = last.seq;
                    }
                    self.shared.shipped_seq.store(shipped, Ordering::Relaxed);
                    self.shared
                        .shipped_rows
                        .fetch_add(rows.len() as u64, Ordering::Relaxed);
                    if !self.shared.ship_healthy.swap(true, Ordering::Relaxed) || logged {
                        tracing::info!("audit shipper: shipping again");
                    }
                    logged = false;
                    backoff.reset();
                    unreported = !(self.report)(shipped);
                    tracing::trace!(
                        rows = rows.len(),
                        ms = t0.elapsed().as_millis() as u64,
                        "audit shipped"
                    );
                }
                Ok(Err(e)) => {
                    pg = None;
                    self.fail("shipping", &e, &mut logged);
                    self.pause(backoff.next_delay()).await;
                }
                Err(_) => {
                    pg = None;
                    self.fail(
                        "shipping",
                        &AuditError::Postgres("timed out".into()),
                        &mut logged,
                    );
                    self.pause(backoff.next_delay()).await;
                }
            }
        }
        if let Some(c) = pg {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.close()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_never_show_passwords() {
        assert_eq!(
            redact_url("postgres://u:hunter2@db:5432/x?sslmode=disable"),
            "postgres://u:***@db:5432/x?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
    }
}
