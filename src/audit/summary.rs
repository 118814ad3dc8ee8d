//! Aggregates over a window of minutes for the dashboard: calls, denials and latency per
//! minute × (kind, principal, node, server, tool, method, effect), read either from the
//! writer's rollups ([`from_rollups`], for a viewer who may read every row) or from an indexed
//! scan of the decisions themselves ([`from_rows`], each row passed to a `keep` check first, so
//! a row the viewer may not read is never counted). Both give the same [`Cell`]s for the same
//! rows; the dashboard tests compare them.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};

use super::AuditError;
use super::record::Row;
use super::rollup::{Hist, MINUTE_US};
use super::store::{self, Names};

/// One aggregate: a minute and the rows' names, with the calls and their latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub minute: i64,
    pub kind: String,
    pub principal: String,
    pub node: String,
    pub server: String,
    pub tool: String,
    pub method: String,
    pub allow: bool,
    pub calls: u64,
    pub latency: Hist,
}

/// What a window holds, and whether a scan stopped at its budget.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub cells: Vec<Cell>,
    /// A scan met its row budget: older rows of the window are not counted.
    pub truncated: bool,
}

/// Name ids of one aggregate key (without the minute).
type Ids = [i64; 6];

#[derive(Default)]
struct Acc {
    map: HashMap<(i64, Ids, bool), (u64, Hist)>,
}

impl Acc {
    fn finish(self, conn: &Connection) -> Result<Vec<Cell>, AuditError> {
        let mut names = Names::default();
        let mut out = Vec::with_capacity(self.map.len());
        for ((minute, ids, allow), (calls, latency)) in self.map {
            let mut n = |i: usize| names.name(conn, ids[i]);
            out.push(Cell {
                minute,
                kind: n(0)?,
                principal: n(1)?,
                node: n(2)?,
                server: n(3)?,
                tool: n(4)?,
                method: n(5)?,
                allow,
                calls,
                latency,
            });
        }
        out.sort_by(|a, b| {
            (a.minute, &a.principal, &a.server, &a.tool).cmp(&(
                b.minute,
                &b.principal,
                &b.server,
                &b.tool,
            ))
        });
        Ok(out)
    }
}

/// The rollups of minutes `from_minute..=to_minute` (every row: only for a viewer who may read
/// them all).
pub fn from_rollups(
    conn: &Connection,
    from_minute: i64,
    to_minute: i64,
) -> Result<Summary, AuditError> {
    let mut acc = Acc::default();
    let mut st = conn.prepare_cached(
        "SELECT minute, kind, principal, node, server, tool, method, effect, calls, latency \
         FROM rollups WHERE minute >= ?1 AND minute <= ?2",
    )?;
    let mut rows = st.query(params![from_minute, to_minute])?;
    while let Some(r) = rows.next()? {
        let ids: Ids = [
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ];
        let allow = r.get::<_, i64>(7)? == 1;
        let calls: i64 = r.get(8)?;
        let lat: Option<Vec<u8>> = r.get(9)?;
        let e = acc.map.entry((r.get(0)?, ids, allow)).or_default();
        e.0 += u64::try_from(calls).unwrap_or(0);
        if let Some(b) = lat {
            e.1.merge(&Hist::decode(&b));
        }
    }
    Ok(Summary {
        cells: acc.finish(conn)?,
        truncated: false,
    })
}

/// The decisions of minutes `from_minute..=to_minute` that `keep` accepts, newest first,
/// examining at most `budget` rows. With `principal`, only that principal's rows are read
/// (the `(principal, time)` index); otherwise the time index.
pub fn from_rows(
    conn: &Connection,
    from_minute: i64,
    to_minute: i64,
    principal: Option<&str>,
    budget: usize,
    keep: &mut dyn FnMut(&Row) -> bool,
) -> Result<Summary, AuditError> {
    let from = from_minute.saturating_mul(MINUTE_US);
    let to = to_minute.saturating_add(1).saturating_mul(MINUTE_US);
    let pid = match principal {
        None => None,
        Some(p) => {
            let id: Option<i64> = conn
                .prepare_cached("SELECT id FROM names WHERE text = ?1")?
                .query_row([p], |r| r.get(0))
                .optional()?;
            match id {
                Some(id) => Some(id),
                None => return Ok(Summary::default()),
            }
        }
    };
    let cond = if pid.is_some() {
        "d.principal = ?3 AND d.time >= ?1 AND d.time < ?2"
    } else {
        "d.time >= ?1 AND d.time < ?2 AND ?3 IS NULL"
    };
    let sql = format!(
        "SELECT d.id, d.time, d.kind, d.principal, d.node, d.server, d.tool, d.method, d.effect, \
         COALESCE((SELECT o.latency_us FROM outcomes o WHERE o.decision = d.id ORDER BY o.seq DESC LIMIT 1), d.latency_us) \
         FROM decisions d WHERE {cond} ORDER BY d.time DESC LIMIT ?4"
    );
    let mut names = Names::default();
    let mut acc = Acc::default();
    let mut st = conn.prepare_cached(&sql)?;
    let limit = i64::try_from(budget).unwrap_or(i64::MAX).saturating_add(1);
    let mut rows = st.query(params![from, to, pid, limit])?;
    let mut examined = 0usize;
    let mut truncated = false;
    while let Some(r) = rows.next()? {
        if examined >= budget {
            truncated = true;
            break;
        }
        examined += 1;
        let ids: Ids = [
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
        ];
        // What the read policy looks at: the row's id, principal, node and server.
        let row = Row {
            id: store::id_text(r.get_ref(0)?),
            principal: names.name(conn, ids[1])?,
            node: names.name(conn, ids[2])?,
            server: names.name(conn, ids[3])?,
            ..Row::default()
        };
        if !keep(&row) {
            continue;
        }
        let time: i64 = r.get(1)?;
        let allow = r.get::<_, i64>(8)? == 1;
        let latency: Option<i64> = r.get(9)?;
        let e = acc
            .map
            .entry((time.div_euclid(MINUTE_US), ids, allow))
            .or_default();
        e.0 += 1;
        if let Some(l) = latency {
            e.1.add(l);
        }
    }
    Ok(Summary {
        cells: acc.finish(conn)?,
        truncated,
    })
}
