//! The Live view's rows on the server: the viewer's newest readable rows (one query, shared by
//! the page at `/`, which renders them into its HTML so the table paints with no script run,
//! and by the stream's backfill), their HTML, and the stream's outcome updates.
//!
//! Who sees what: the query is narrowed to the rows the `toolgate_audit`/`read` policy could let
//! the viewer read ([`readable`]: a user's own rows come from the (principal, time) index) and
//! every row is still checked with [`may_read`], so rows the viewer may not see never leave
//! the daemon, in the HTML or on the stream.

use crate::audit::query::{Cursor, Filter, PAGE_SCAN_BUDGET, Reader};
use crate::audit::record::Row;
use crate::gateway::Gateway;
use crate::policy::input::Principal;
use crate::read_api::{Readable, may_read, readable};

use super::escape;

/// The newest rows a viewer may read, as of one chain position.
#[derive(Debug, Default)]
pub struct Newest {
    /// Newest first.
    pub rows: Vec<Row>,
    /// The chain head when they were read: every row at or before it was considered, so a
    /// stream started after it has no gap and repeats none of them.
    pub head: i64,
    /// The cursor of the next (older) page, for "load older" (`/api/audit?cursor=..`); `None`
    /// when no older matching row is left.
    pub next: Option<Cursor>,
}

/// The newest `limit` rows matching `filter` that `viewer` may read, at or before the chain
/// head: one newest-first index walk examining at most [`PAGE_SCAN_BUDGET`] rows.
pub fn newest(
    gw: &Gateway,
    reader: &Reader,
    filter: &Filter,
    viewer: &Principal,
    limit: usize,
) -> Result<Newest, String> {
    let head = reader.head_seq().map_err(|e| e.to_string())?;
    let mut f = Filter {
        before_seq: Some(head.saturating_add(1)),
        limit: None,
        ..filter.clone()
    };
    let none = match readable(gw, viewer) {
        Readable::All | Readable::Unknown => false,
        Readable::Nothing => true,
        Readable::Principal(p) => {
            let other = f.principal.as_ref().is_some_and(|asked| *asked != p);
            f.principal = Some(p);
            other
        }
    };
    let mut out = Newest {
        head,
        ..Newest::default()
    };
    if none {
        return Ok(out);
    }
    let end = reader
        .page(
            &f,
            limit,
            PAGE_SCAN_BUDGET,
            &mut |r| may_read(gw, viewer, r),
            &mut |r| {
                out.rows.push(r);
                true
            },
        )
        .map_err(|e| e.to_string())?;
    out.next = end.next;
    Ok(out)
}

/// The principal a viewer's rows are narrowed to, when the policy lets them read only their
/// own (the page passes it to `/api/audit` so "load older" walks the same index).
pub fn own_principal(gw: &Gateway, viewer: &Principal) -> Option<String> {
    match readable(gw, viewer) {
        Readable::Principal(p) => Some(p),
        _ => None,
    }
}

/// A latency as the table shows it (the page's script formats it the same way).
pub fn latency_text(us: Option<i64>) -> String {
    match us {
        None => String::new(),
        Some(us) if us >= 1000 => {
            let tenths = (us + 50) / 100;
            format!("{}.{} ms", tenths / 10, tenths % 10)
        }
        Some(us) => format!("{us} µs"),
    }
}

/// One table row, every value escaped; the cells and hooks are those the page's script builds
/// (src/dashboard/dashboard.js). The time cell carries `elementtiming`, so the page can tell
/// when the rows were first painted (Element Timing) without running before the paint.
pub fn row_html(out: &mut String, r: &Row) {
    let time: String = r.time.replacen('T', " ", 1).chars().take(23).collect();
    let tool = if r.tool.is_empty() {
        &r.method
    } else {
        &r.tool
    };
    out.push_str(&format!(
        "<tr data-id=\"{}\" data-seq=\"{}\"><td elementtiming=\"row\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td class=\"outcome\">{}</td><td class=\"latency\">{}</td></tr>\n",
        escape(&r.id),
        r.seq,
        escape(&time),
        escape(&r.kind),
        escape(&r.principal),
        escape(&r.node),
        escape(&r.server),
        escape(tool),
        escape(&r.effect),
        escape(&r.effect),
        escape(&r.outcome),
        escape(&latency_text(r.latency_us)),
    ));
}

/// The outcome updates for the stream: the outcome rows in (`after`, `through`] (at most
/// `limit`) of decisions at or before `after` (the ones the client already has) that match
/// `filter` and that `viewer` may read, each as (the outcome row's position, the SSE event).
/// The event carries the decision's latest merged outcome and latency, nothing else. Also
/// returns the position the outcomes were read through (lower than `through` when `limit`
/// cut them short).
pub fn outcome_events(
    gw: &Gateway,
    reader: &Reader,
    filter: &Filter,
    viewer: &Principal,
    after: i64,
    through: i64,
    limit: usize,
) -> Result<(Vec<(i64, String)>, i64), String> {
    let found = reader
        .outcomes_between(after, through, limit)
        .map_err(|e| e.to_string())?;
    let read_through = if found.len() >= limit {
        found.last().map_or(through, |(seq, _)| *seq)
    } else {
        through
    };
    // One event per decision: its newest outcome row in the range.
    let mut latest: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
    for (seq, decision) in found {
        if decision <= after {
            latest.insert(decision, seq);
        }
    }
    let mut events = Vec::new();
    for (decision, seq) in latest {
        let f = Filter {
            after_seq: Some(decision - 1),
            before_seq: Some(decision + 1),
            limit: None,
            before: None,
            ..filter.clone()
        };
        let mut row = None;
        reader
            .for_each(&f, &mut |r| {
                row = Some(r);
                false
            })
            .map_err(|e| e.to_string())?;
        let Some(r) = row.filter(|r| may_read(gw, viewer, r)) else {
            continue;
        };
        let data = serde_json::json!({
            "id": r.id,
            "seq": r.seq,
            "outcome": r.outcome,
            "latency_us": r.latency_us,
        });
        events.push((seq, format!("id: {seq}\nevent: outcome\ndata: {data}\n\n")));
    }
    Ok((events, read_through))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_like_the_script() {
        assert_eq!(latency_text(None), "");
        assert_eq!(latency_text(Some(999)), "999 µs");
        assert_eq!(latency_text(Some(1000)), "1.0 ms");
        assert_eq!(latency_text(Some(1250)), "1.3 ms");
        assert_eq!(latency_text(Some(12_345)), "12.3 ms");
    }

    #[test]
    fn rows_are_escaped() {
        let r = Row {
            id: "x\"><script>".into(),
            time: "2026-12-07T03:05:52.123456Z".into(),
            principal: "<script>alert(1)</script>".into(),
            tool: "<img src=x onerror=alert(1)>".into(),
            effect: "allow".into(),
            ..Row::default()
        };
        let mut html = String::new();
        row_html(&mut html, &r);
        assert!(
            !html.contains("<script>") && !html.contains("<img"),
            "{html}"
        );
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(html.contains("<td elementtiming=\"row\">2026-12-07 03:05:52.123</td>"));
    }
}
