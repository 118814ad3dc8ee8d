//! The dashboard's JSON views (issue 16 parts 2 and 3): Agents, Tools, Charts and Policies,
//! each read by the page with `fetch`.
//!
//! - `GET /api/dashboard/agents?window=24h`: principals and nodes seen, with last activity,
//!   calls and denials.
//! - `GET /api/dashboard/tools?window=24h`: per server and tool, calls, denials, latency
//!   p50/p99.
//! - `GET /api/dashboard/chart?range=hour|day`: decisions per minute, allow and deny.
//! - `GET /api/dashboard/policies`: the loaded snapshot and the last reload error.
//!
//! Who sees what: every aggregate counts only rows the `toolgate_audit`/`read` policy lets the
//! viewer read. A viewer whose plan for that policy is unconditional (an admin,
//! [`readable`] = `All`) gets the writer's rollups; any other viewer gets an indexed scan
//! of the window (the `(principal, time)` index when the plan pins the principal), each row
//! authorized by [`may_read`] before it is counted, at most [`SCAN_BUDGET`] rows. Every view
//! is itself audited, like `/api/audit`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use axum::extract::{Extension, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use crate::audit::rollup::{Hist, MINUTE_US};
use crate::audit::summary::{self, Summary};
use crate::gateway::{Conn, Gateway};
use crate::read_api::{Readable, forbidden, may_read, query_pairs, readable};

use super::{json_error, json_ok};

/// Rows a scan for a viewer who may not read every row examines at most (the window's newest).
pub const SCAN_BUDGET: usize = 200_000;
/// The longest window a view takes.
pub const MAX_WINDOW_MINUTES: i64 = 7 * 24 * 60;

/// `15m`, `1h`, `24h`, `7d`: a window in whole minutes (1 minute to 7 days).
pub fn parse_window(v: &str) -> Result<i64, String> {
    let bad = || format!("window: {v:?} is not like 15m, 1h, 24h or 7d (at most 7d)");
    let (n, unit) = v.split_at(v.len().saturating_sub(1));
    let n: i64 = n.parse().map_err(|_| bad())?;
    let minutes = match unit {
        "m" => n,
        "h" => n.saturating_mul(60),
        "d" => n.saturating_mul(1440),
        _ => return Err(bad()),
    };
    if !(1..=MAX_WINDOW_MINUTES).contains(&minutes) {
        return Err(bad());
    }
    Ok(minutes)
}

/// The one query parameter a view takes (`name`), or its default; anything else is a 400.
fn one_param(query: &str, name: &str, default: &str) -> Result<String, String> {
    let mut v = default.to_string();
    for (k, val) in query_pairs(query) {
        if k == name {
            v = val;
        } else {
            return Err(format!("unknown parameter {k:?}: this view takes {name}"));
        }
    }
    Ok(v)
}

/// Where a summary came from, for the answer (`rollups` or `rows`).
struct Summed {
    summary: Summary,
    source: &'static str,
    from_minute: i64,
    to_minute: i64,
}

/// [`summarize`] over the request's `window` (default 24h); a bad window is a 400.
async fn summarize_window(
    gw: &Arc<Gateway>,
    conn: &Conn,
    view: &str,
    query: Option<&str>,
) -> Result<(Summed, i64), Response> {
    let minutes = one_param(query.unwrap_or(""), "window", "24h")
        .and_then(|w| parse_window(&w))
        .map_err(|e| json_error(StatusCode::BAD_REQUEST, e))?;
    Ok((summarize(gw, conn, view, minutes).await?, minutes))
}

/// Audits the view request, then sums the last `minutes` minutes (the current one included)
/// of the rows the viewer may read.
async fn summarize(
    gw: &Arc<Gateway>,
    conn: &Conn,
    view: &str,
    minutes: i64,
) -> Result<Summed, Response> {
    let Some(caller) = conn.caller.clone() else {
        return Err(forbidden("no verified tailnet identity"));
    };
    let viewer = caller.principal.clone();
    let scope = readable(gw, &viewer);
    let mut row = crate::gateway::AuditRow::new("check", conn);
    row.method = format!("GET /api/dashboard/{view}");
    row.action = "read".into();
    row.effect = crate::policy::model::Effect::Allow;
    row.outcome = "answered".into();
    row.reason = format!(
        "dashboard {view} over {minutes} minute(s), from {}, counting only rows policy toolgate_audit/read allows",
        if scope == Readable::All {
            "rollups"
        } else {
            "an indexed scan"
        }
    );
    row.policy_hash = gw.store.current().hash.clone();
    if gw.submit(row).is_err() {
        return Err(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit unavailable".into(),
        ));
    }
    let now_minute = chrono::Utc::now().timestamp_micros().div_euclid(MINUTE_US);
    let (from_minute, to_minute) = (now_minute - minutes + 1, now_minute);
    let db = gw.config.audit.sqlite.clone();
    let g = gw.clone();
    let done = tokio::task::spawn_blocking(move || -> Result<Summed, String> {
        let reader = crate::audit::query::Reader::open(&db).map_err(|e| e.to_string())?;
        let c = reader.connection();
        let mut keep = |r: &crate::audit::record::Row| may_read(&g, &viewer, r);
        let (summary, source) = match &scope {
            Readable::All => (
                summary::from_rollups(c, from_minute, to_minute).map_err(|e| e.to_string())?,
                "rollups",
            ),
            Readable::Principal(p) => (
                summary::from_rows(c, from_minute, to_minute, Some(p), SCAN_BUDGET, &mut keep)
                    .map_err(|e| e.to_string())?,
                "rows",
            ),
            Readable::Unknown => (
                summary::from_rows(c, from_minute, to_minute, None, SCAN_BUDGET, &mut keep)
                    .map_err(|e| e.to_string())?,
                "rows",
            ),
            Readable::Nothing => (Summary::default(), "rows"),
        };
        Ok(Summed {
            summary,
            source,
            from_minute,
            to_minute,
        })
    })
    .await;
    match done {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(json_error(StatusCode::SERVICE_UNAVAILABLE, e)),
        Err(e) => Err(json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn minute_text(m: i64) -> String {
    chrono::DateTime::from_timestamp(m.saturating_mul(60), 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn header(s: &Summed, minutes: i64) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("window_minutes".into(), minutes.into());
    m.insert("from".into(), minute_text(s.from_minute).into());
    m.insert("to".into(), minute_text(s.to_minute + 1).into());
    m.insert("source".into(), s.source.into());
    m.insert("truncated".into(), s.summary.truncated.into());
    m
}

#[derive(Default)]
struct Tally {
    calls: u64,
    denials: u64,
    last_minute: i64,
    others: BTreeSet<String>,
    latency: Hist,
}

impl Tally {
    fn add(&mut self, c: &summary::Cell, other: &str) {
        self.calls += c.calls;
        if !c.allow {
            self.denials += c.calls;
        }
        self.last_minute = self.last_minute.max(c.minute);
        if !other.is_empty() {
            self.others.insert(other.to_string());
        }
        self.latency.merge(&c.latency);
    }
}

/// The Agents view's numbers: per principal and per node.
pub fn agents_json(s: &Summary) -> (Vec<Value>, Vec<Value>) {
    let mut by_p: HashMap<&str, Tally> = HashMap::new();
    let mut by_n: HashMap<&str, Tally> = HashMap::new();
    for c in &s.cells {
        by_p.entry(&c.principal).or_default().add(c, &c.node);
        by_n.entry(&c.node).or_default().add(c, &c.principal);
    }
    let list = |m: HashMap<&str, Tally>, key: &str, others: &str| {
        let mut v: Vec<(&str, Tally)> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.last_minute.cmp(&a.1.last_minute).then(a.0.cmp(b.0)));
        v.into_iter()
            .map(|(k, t)| {
                json!({
                    key: k,
                    others: t.others,
                    "calls": t.calls,
                    "denials": t.denials,
                    "last_active": minute_text(t.last_minute),
                })
            })
            .collect::<Vec<_>>()
    };
    (
        list(by_p, "principal", "nodes"),
        list(by_n, "node", "principals"),
    )
}

/// The Tools view's numbers: per (server, tool), the tool being the method when a row has none.
pub fn tools_json(s: &Summary) -> Vec<Value> {
    let mut by: BTreeMap<(&str, &str), Tally> = BTreeMap::new();
    for c in &s.cells {
        let tool = if c.tool.is_empty() {
            &c.method
        } else {
            &c.tool
        };
        by.entry((&c.server, tool)).or_default().add(c, "");
    }
    let mut v: Vec<((&str, &str), Tally)> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.calls.cmp(&a.1.calls).then(a.0.cmp(&b.0)));
    v.into_iter()
        .map(|((server, tool), t)| {
            json!({
                "server": server,
                "tool": tool,
                "calls": t.calls,
                "denials": t.denials,
                "latency_count": t.latency.total(),
                "p50_us": t.latency.quantile(0.5),
                "p99_us": t.latency.quantile(0.99),
            })
        })
        .collect()
}

/// The Charts view's numbers: one entry per minute of the window, zeros included.
pub fn chart_json(s: &Summary, from_minute: i64, to_minute: i64) -> Value {
    let n = usize::try_from(to_minute - from_minute + 1).unwrap_or(0);
    let mut allow = vec![0u64; n];
    let mut deny = vec![0u64; n];
    for c in &s.cells {
        let Ok(i) = usize::try_from(c.minute - from_minute) else {
            continue;
        };
        let slot = if c.allow { &mut allow } else { &mut deny };
        if let Some(x) = slot.get_mut(i) {
            *x += c.calls;
        }
    }
    let t: Vec<i64> = (from_minute..=to_minute).map(|m| m * 60).collect();
    json!({"t": t, "allow": allow, "deny": deny})
}

/// `GET /api/dashboard/agents`.
pub async fn agents(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    RawQuery(query): RawQuery,
) -> Response {
    let (s, minutes) = match summarize_window(&gw, &conn, "agents", query.as_deref()).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (principals, nodes) = agents_json(&s.summary);
    let mut m = header(&s, minutes);
    m.insert("principals".into(), principals.into());
    m.insert("nodes".into(), nodes.into());
    json_ok(&Value::Object(m))
}

/// `GET /api/dashboard/tools`.
pub async fn tools(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    RawQuery(query): RawQuery,
) -> Response {
    let (s, minutes) = match summarize_window(&gw, &conn, "tools", query.as_deref()).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut m = header(&s, minutes);
    m.insert("tools".into(), tools_json(&s.summary).into());
    json_ok(&Value::Object(m))
}

/// `GET /api/dashboard/chart?range=hour|day`.
pub async fn chart(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    RawQuery(query): RawQuery,
) -> Response {
    let minutes = match one_param(query.as_deref().unwrap_or(""), "range", "hour").as_deref() {
        Ok("hour") => 60,
        Ok("day") => 1440,
        Ok(other) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                format!("range: {other:?} is not hour or day"),
            );
        }
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e.clone()),
    };
    let s = match summarize(&gw, &conn, "chart", minutes).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut m = header(&s, minutes);
    m.insert(
        "series".into(),
        chart_json(&s.summary, s.from_minute, s.to_minute),
    );
    json_ok(&Value::Object(m))
}

/// `GET /api/dashboard/policies`: the loaded snapshot (hash, load time, files, policies), the
/// last reload error, and whether this viewer may use the "try a decision" form.
pub async fn policies(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
) -> Response {
    let Some(caller) = conn.caller.clone() else {
        return forbidden("no verified tailnet identity");
    };
    let set = gw.store.current();
    let status = gw.store.status();
    let files: BTreeSet<&str> = set.all.iter().map(|p| p.file.as_str()).collect();
    let policies: Vec<Value> = set
        .all
        .iter()
        .map(|p| json!({"key": p.key, "file": p.file}))
        .collect();
    let servers: Vec<&String> = gw.config.servers.keys().collect();
    json_ok(&json!({
        "hash": set.hash,
        "loaded_at": status.loaded_at,
        "dir": gw.store.dir().display().to_string(),
        "files": files,
        "policies": policies,
        "last_error": status.last_error,
        "servers": servers,
        "may_explain": super::explain::may_explain(&gw, &caller.principal),
        "reads_every_row": crate::read_api::reads_every_row(&gw, &caller.principal),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(parse_window("15m").unwrap(), 15);
        assert_eq!(parse_window("24h").unwrap(), 1440);
        assert_eq!(parse_window("7d").unwrap(), 10080);
        for bad in ["", "8d", "0m", "h", "1w", "-1h", "1.5h"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_parameter_only() {
        assert_eq!(one_param("", "window", "24h").unwrap(), "24h");
        assert_eq!(one_param("window=1h", "window", "24h").unwrap(), "1h");
        assert!(one_param("since=1h", "window", "24h").is_err());
    }

    #[test]
    fn chart_fills_every_minute() {
        let cell = |minute, allow, calls| summary::Cell {
            minute,
            kind: "mcp".into(),
            principal: "a".into(),
            node: "n".into(),
            server: "s".into(),
            tool: "t".into(),
            method: "tools/call".into(),
            allow,
            calls,
            latency: Hist::default(),
        };
        let s = Summary {
            cells: vec![cell(10, true, 2), cell(12, false, 1), cell(12, true, 1)],
            truncated: false,
        };
        let v = chart_json(&s, 10, 12);
        assert_eq!(v["allow"], json!([2, 0, 1]));
        assert_eq!(v["deny"], json!([0, 0, 1]));
        assert_eq!(v["t"], json!([600, 660, 720]));
        let (p, n) = agents_json(&s);
        assert_eq!(p[0]["calls"], 4);
        assert_eq!(p[0]["denials"], 1);
        assert_eq!(n[0]["principals"], json!(["a"]));
        assert_eq!(tools_json(&s)[0]["tool"], "t");
    }
}
