//! Per-minute rollups (migrations/sqlite/0006_rollups.sql): calls and a latency histogram per
//! minute × (kind, principal, node, server, tool, method, effect), kept by the writer inside each
//! batch's transaction. The batch is aggregated in memory ([`Rollups::decision`],
//! [`Rollups::outcome`]) and written as one upsert per distinct key ([`Rollups::flush`]), so
//! the dashboard's day-long aggregates for an admin read a few thousand rollup rows, never the
//! decisions.
//!
//! Latency: a decision's own `latency_us` (check, hook) counts with the decision; an allowed
//! call's latency arrives later on its outcome row and is added to the decision's key and
//! minute, found in a bounded map of calls still pending (or, past it, by the decision's id).
//! That is the latency a query row shows (the outcome's, else the decision's).

use std::collections::HashMap;

use rusqlite::functions::FunctionFlags;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, params};

/// Microseconds per minute.
pub const MINUTE_US: i64 = 60_000_000;

/// Pending calls remembered for their outcome's latency at most (then the map starts again;
/// an outcome not found in it is looked up by its decision's id).
const MAX_PENDING: usize = 65_536;

/// A log-bucket latency histogram: four buckets per power of two of microseconds (each bucket
/// spans 25% of its lower bound; a percentile is reported as its bucket's midpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hist {
    /// (bucket, count), by bucket.
    counts: Vec<(u8, u32)>,
}

/// The bucket of a latency in microseconds.
pub fn bucket(us: i64) -> u8 {
    if us < 1 {
        return 0;
    }
    let v = us.unsigned_abs();
    let e = 63 - v.leading_zeros() as u64;
    let sub = if e >= 2 {
        (v >> (e - 2)) & 3
    } else {
        (v << (2 - e)) & 3
    };
    u8::try_from(1 + e * 4 + sub).unwrap_or(u8::MAX)
}

/// The bounds `[lo, hi)` of a bucket, in microseconds.
pub fn bounds(b: u8) -> (f64, f64) {
    if b == 0 {
        return (0.0, 1.0);
    }
    let i = f64::from(b - 1);
    let e = (i / 4.0).floor();
    let sub = i - e * 4.0;
    let base = 2f64.powf(e);
    (base * (1.0 + sub / 4.0), base * (1.0 + (sub + 1.0) / 4.0))
}

impl Hist {
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Counts one latency.
    pub fn add(&mut self, us: i64) {
        self.add_n(bucket(us), 1);
    }

    fn add_n(&mut self, b: u8, n: u32) {
        match self.counts.binary_search_by_key(&b, |(k, _)| *k) {
            Ok(i) => {
                if let Some(c) = self.counts.get_mut(i) {
                    c.1 = c.1.saturating_add(n);
                }
            }
            Err(i) => self.counts.insert(i, (b, n)),
        }
    }

    pub fn merge(&mut self, other: &Hist) {
        for &(b, n) in &other.counts {
            self.add_n(b, n);
        }
    }

    /// How many latencies it holds.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| u64::from(*n)).sum()
    }

    /// The `p`-quantile (0 < p ≤ 1) in microseconds, as its bucket's midpoint; `None` when empty.
    pub fn quantile(&self, p: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((p * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for &(b, n) in &self.counts {
            seen += u64::from(n);
            if seen >= rank {
                let (lo, hi) = bounds(b);
                return Some(((lo + hi) / 2.0).floor() as u64);
            }
        }
        None
    }

    /// The stored form: (bucket byte, count as 4 bytes little-endian), by bucket.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.counts.len() * 5);
        for &(b, n) in &self.counts {
            out.push(b);
            out.extend_from_slice(&n.to_le_bytes());
        }
        out
    }

    /// [`Hist::encode`] back; bytes that are not whole pairs are ignored.
    pub fn decode(bytes: &[u8]) -> Hist {
        let mut h = Hist::default();
        for c in bytes.chunks_exact(5) {
            if let [b, n0, n1, n2, n3] = *c {
                h.add_n(b, u32::from_le_bytes([n0, n1, n2, n3]));
            }
        }
        h
    }
}

/// A rollup row's key: the minute and the row's name ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub minute: i64,
    pub kind: i64,
    pub principal: i64,
    pub node: i64,
    pub server: i64,
    pub tool: i64,
    pub method: i64,
    pub effect: i64,
}

/// One key's aggregate.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    pub calls: u64,
    pub latency: Hist,
}

/// The writer's rollup state: this batch's aggregate and the calls awaiting an outcome.
#[derive(Debug, Default)]
pub struct Rollups {
    batch: HashMap<Key, Cell>,
    /// Decision id bytes → its key, for allowed calls whose outcome (latency) is still to come.
    pending: HashMap<[u8; 16], Key>,
}

const UPSERT: &str = "INSERT INTO rollups (minute, kind, principal, node, server, tool, method, effect, calls, latency) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (minute, kind, principal, node, server, tool, method, effect) DO UPDATE SET calls = calls + excluded.calls, latency = toolgate_hist_merge(latency, excluded.latency)";

impl Rollups {
    /// Counts a committed decision; `pending` when an outcome row will follow with its latency.
    pub fn decision(&mut self, key: Key, latency_us: Option<i64>, id: Option<[u8; 16]>) {
        let cell = self.batch.entry(key).or_default();
        cell.calls += 1;
        if let Some(l) = latency_us {
            cell.latency.add(l);
        }
        if let Some(id) = id {
            if self.pending.len() >= MAX_PENDING {
                self.pending.clear();
            }
            self.pending.insert(id, key);
        }
    }

    /// Adds an outcome's latency to its decision's key (found in the pending map, else looked
    /// up by `decision`, the outcome row's stored decision reference).
    pub fn outcome(
        &mut self,
        c: &Connection,
        id: Option<[u8; 16]>,
        decision: ValueRef<'_>,
        latency_us: Option<i64>,
    ) -> rusqlite::Result<()> {
        let found = id.and_then(|b| self.pending.remove(&b));
        let Some(l) = latency_us else {
            return Ok(());
        };
        let key = match found {
            Some(k) => Some(k),
            None => key_of(c, decision)?,
        };
        if let Some(k) = key {
            self.batch.entry(k).or_default().latency.add(l);
        }
        Ok(())
    }

    /// Writes this batch's aggregate (one upsert per key) inside the batch's transaction.
    pub fn flush(&mut self, c: &Connection) -> rusqlite::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut st = c.prepare_cached(UPSERT)?;
        for (k, cell) in self.batch.drain() {
            let lat = (!cell.latency.is_empty()).then(|| cell.latency.encode());
            st.execute(params![
                k.minute,
                k.kind,
                k.principal,
                k.node,
                k.server,
                k.tool,
                k.method,
                k.effect,
                i64::try_from(cell.calls).unwrap_or(i64::MAX),
                lat,
            ])?;
        }
        Ok(())
    }

    /// The batch failed: forget its aggregate.
    pub fn rollback(&mut self) {
        self.batch.clear();
    }
}

/// The rollup key of a stored decision (by its stored id), if it exists.
fn key_of(c: &Connection, id: ValueRef<'_>) -> rusqlite::Result<Option<Key>> {
    c.prepare_cached(
        "SELECT time, kind, principal, node, server, tool, method, effect FROM decisions WHERE id = ?1",
    )?
    .query_row([rusqlite::types::ToSqlOutput::Borrowed(id)], |r| {
        Ok(Key {
            minute: r.get::<_, i64>(0)?.div_euclid(MINUTE_US),
            kind: r.get(1)?,
            principal: r.get(2)?,
            node: r.get(3)?,
            server: r.get(4)?,
            tool: r.get(5)?,
            method: r.get(6)?,
            effect: r.get(7)?,
        })
    })
    .optional()
}

/// Registers `toolgate_hist_merge(a, b)` (the upsert's histogram sum) on a write connection.
pub fn register(c: &Connection) -> rusqlite::Result<()> {
    c.create_scalar_function(
        "toolgate_hist_merge",
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let blob = |i: usize| -> rusqlite::Result<Option<Vec<u8>>> {
                Ok(match ctx.get_raw(i) {
                    ValueRef::Blob(b) => Some(b.to_vec()),
                    _ => None,
                })
            };
            Ok(match (blob(0)?, blob(1)?) {
                (None, None) => None,
                (Some(a), None) | (None, Some(a)) => Some(a),
                (Some(a), Some(b)) => {
                    let mut h = Hist::decode(&a);
                    h.merge(&Hist::decode(&b));
                    Some(h.encode())
                }
            })
        },
    )
}

/// Builds the rollups of every stored decision (the upgrade to schema v5), in chunks.
pub fn backfill(c: &Connection) -> rusqlite::Result<()> {
    register(c)?;
    let mut r = Rollups::default();
    let mut st = c.prepare(
        "SELECT d.time, d.kind, d.principal, d.node, d.server, d.tool, d.method, d.effect, \
         COALESCE((SELECT o.latency_us FROM outcomes o WHERE o.decision = d.id ORDER BY o.seq DESC LIMIT 1), d.latency_us) \
         FROM decisions d ORDER BY d.seq",
    )?;
    let mut rows = st.query([])?;
    let mut n = 0usize;
    while let Some(row) = rows.next()? {
        let key = Key {
            minute: row.get::<_, i64>(0)?.div_euclid(MINUTE_US),
            kind: row.get(1)?,
            principal: row.get(2)?,
            node: row.get(3)?,
            server: row.get(4)?,
            tool: row.get(5)?,
            method: row.get(6)?,
            effect: row.get(7)?,
        };
        r.decision(key, row.get(8)?, None);
        n += 1;
        if n.is_multiple_of(100_000) {
            r.flush(c)?;
        }
    }
    r.flush(c)
}

/// After retention pruned rows: drops the rollups of the minutes before the oldest decision
/// left (those minutes' rows are all gone; at most `cutoff_us`'s minute when none is left).
pub fn prune(c: &Connection, cutoff_us: i64) -> rusqlite::Result<usize> {
    let oldest: Option<i64> = c.query_row("SELECT min(time) FROM decisions", [], |r| r.get(0))?;
    let until = oldest.unwrap_or(cutoff_us).min(cutoff_us);
    c.execute(
        "DELETE FROM rollups WHERE minute < ?1",
        [until.div_euclid(MINUTE_US)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_grow_by_quarter_octaves() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        let mut last = 0;
        for us in [1, 2, 3, 5, 8, 10, 100, 1_000, 10_000, 1_000_000, i64::MAX] {
            let b = bucket(us);
            assert!(b >= last);
            last = b;
            let (lo, hi) = bounds(b);
            assert!(
                lo <= us as f64 && (us as f64) < hi * 1.000_001,
                "{us} {lo} {hi}"
            );
        }
    }

    #[test]
    fn quantiles_and_round_trip() {
        let mut h = Hist::default();
        for us in 1..=1000 {
            h.add(us);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((440..=560).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((900..=1100).contains(&p99), "{p99}");
        let d = Hist::decode(&h.encode());
        assert_eq!(d, h);
        let mut m = d.clone();
        m.merge(&h);
        assert_eq!(m.total(), 2000);
        assert_eq!(m.quantile(0.5), h.quantile(0.5));
        assert_eq!(Hist::default().quantile(0.5), None);
    }
}
