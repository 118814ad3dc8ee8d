//! The dashboard (issue 16): a page served by the daemon itself at `/`, with its assets
//! embedded in the binary (no CDN, nothing fetched at run time), and the live stream of
//! decisions it reads.
//!
//! - `GET /`: the page, server-rendered for the viewer: their principal and roles, and the Live
//!   table already filled with their newest readable rows ([`live::newest`], the query the
//!   stream's backfill uses, narrowed by the page URL's filters), so it paints with no script
//!   run. The page's head, with the stylesheet inline (allowed by its hash in the page's CSP),
//!   is sent before the rows are read. The first [`SCREEN_ROWS`] rows go in the table; the rest
//!   wait in a `<template>` for the script (`/dashboard.js`, hand-written,
//!   [`include_str!`]-embedded, `async` at the end of the body, so it is off the first frame's
//!   path), which moves them into the table after the first frame and then opens the stream
//!   with `after` = the chain head the rows were read at: nothing repeated, nothing missed. The
//!   request is audited like the stream's. `/dashboard.css` is also served on its own.
//! - `GET /api/audit/stream`: Server-Sent Events, one `decision` event per audit row the
//!   viewer may read (the `toolgate_audit`/`read` policy, asked per row by
//!   [`crate::read_api::may_read`]: rows a viewer may not see never leave the daemon). Filters
//!   `principal`, `node`, `server`, `tool`, `effect`, `kind` narrow it. Without `after` (or a
//!   `Last-Event-ID`), it starts with the newest [`BACKFILL`] readable rows; then it sends each
//!   new row once, in chain order, and one `outcome` event (`{"id","seq","outcome",
//!   "latency_us"}`) when a row already sent gets its outcome, so a `pending` row is updated in
//!   place. An event's `id` is its chain position, so a browser that reconnects resumes where it
//!   stopped (a `Last-Event-ID` past `after` wins). The backfill ends with one `backfilled` event
//!   (`{"rows":N,"next":cursor}`), so the page knows when its table is filled (and where "load
//!   older" continues, through `/api/audit?cursor=..`). The
//!   backfill is one newest-first index walk: for a viewer the policy lets read only their own
//!   rows ([`crate::read_api::readable`]), the (principal, time) index, so a user owning 1% of
//!   the store does not read the other 99%.
//!
//! The row detail (explain trace, redacted arguments, outcome, latency) is read through
//! `GET /api/audit?id=..`, which carries the same per-row authorization.
//!
//! The stream wakes when the audit writer commits (a watch of the chain head), so a new row is
//! sent right after its commit; it also looks every [`POLL_EVERY`] in case a wake-up is
//! missed. The other views are JSON read by the page: [`views`] (Agents, Tools, Charts,
//! Policies) and [`explain`] (the "try a decision" form). The charts are drawn by uPlot, a
//! vendored build embedded here ([`UPLOT_VERSION`], checked against the npm registry by
//! `scripts/dashboard-assets check`), which the page loads only when the Charts view opens.

pub mod explain;
pub mod live;
pub mod views;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::audit::query::{Filter, Reader};
use crate::audit::record::Row;
use crate::gateway::{Conn, Gateway};
use crate::policy::input::Principal;
use crate::read_api::{forbidden, may_read, query_pairs};

/// Rows a new stream starts with (the newest the viewer may read), at most.
pub const BACKFILL: usize = 100;
/// How often a stream looks for new rows in the store when no commit woke it (a fallback:
/// the writer's commits wake it at once).
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// Looks at the store at most this often however fast commits come.
pub const MIN_GAP: Duration = Duration::from_millis(20);
/// Rows one poll examines at most (readable or not); the rest wait for the next poll.
pub const POLL_BATCH: usize = 1_000;
/// A stream with nothing to send sends an SSE comment this often (proxies, dead peers).
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// A stream ends after this; the browser reconnects (with `Last-Event-ID`), and the viewer's
/// identity and the filters are checked again, like on any new request.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(300);

/// The filter keys the stream accepts, besides `after`.
const STREAM_KEYS: [&str; 6] = ["principal", "node", "server", "tool", "effect", "kind"];

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("dashboard.js");
const STYLE: &str = include_str!("dashboard.css");
/// uPlot (MIT), the charts: its published `dist/uPlot.iife.min.js` and `dist/uPlot.min.css`,
/// byte for byte (`scripts/dashboard-assets check` compares them with the npm package).
const UPLOT_JS: &str = include_str!("vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("vendor/uPlot.min.css");
/// The vendored uPlot's npm version (pinned with its files' SHA-256 in
/// `src/dashboard/vendor/uplot.lock`).
pub const UPLOT_VERSION: &str = "1.6.32";

/// The dashboard's routes (merged into [`crate::server::router`], behind its Host/Origin check).
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/", get(page))
        .route(
            "/dashboard.js",
            get(|| async { asset("text/javascript", SCRIPT) }),
        )
        .route("/dashboard.css", get(|| async { asset("text/css", STYLE) }))
        .route(
            "/vendor/uPlot.iife.min.js",
            get(|| async { asset("text/javascript", UPLOT_JS) }),
        )
        .route(
            "/vendor/uPlot.min.css",
            get(|| async { asset("text/css", UPLOT_CSS) }),
        )
        .route("/api/audit/stream", get(stream))
        .route("/api/dashboard/agents", get(views::agents))
        .route("/api/dashboard/tools", get(views::tools))
        .route("/api/dashboard/chart", get(views::chart))
        .route("/api/dashboard/policies", get(views::policies))
        .route(
            "/api/dashboard/explain",
            axum::routing::post(explain::try_decision),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// `GET /?principal=..&tool=..`: the page, for an identified viewer only, with their newest
/// readable rows (see the module docs). The head goes out at once; the rows follow when read.
/// A store that cannot be read, or filters the stream would refuse, leave the table empty and
/// the page's script falls back to the stream's own backfill (which reports the error).
async fn page(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(caller) = conn.caller.clone() else {
        return forbidden("no verified tailnet identity");
    };
    let viewer = caller.principal.clone();
    let filter = match parse_stream(query.as_deref().unwrap_or(""), None) {
        Ok((f, None)) => Some(f),
        _ => None,
    };
    if filter.is_some() {
        let mut row = crate::gateway::AuditRow::new("check", &conn);
        row.method = "GET /".into();
        row.action = "read".into();
        row.effect = crate::policy::model::Effect::Allow;
        row.outcome = "answered".into();
        row.reason = format!(
            "the dashboard page with up to {BACKFILL} row(s), each authorized by policy toolgate_audit/read"
        );
        row.policy_hash = gw.store.current().hash.clone();
        if gw.submit(row).is_err() {
            return (StatusCode::SERVICE_UNAVAILABLE, "audit unavailable").into_response();
        }
    }
    let hash = gw.store.current().hash.clone();
    let (head, tail) = render(&viewer, hash.get(..12).unwrap_or(&hash));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(2);
    // Capacity 2: this first send never waits.
    let _ = tx.try_send(Ok(bytes::Bytes::from(head)));
    let db = gw.config.audit.sqlite.clone();
    let own = live::own_principal(&gw, &viewer);
    tokio::task::spawn_blocking(move || {
        let newest = filter.and_then(|f| {
            let got = Reader::open(&db)
                .map_err(|e| e.to_string())
                .and_then(|reader| live::newest(&gw, &reader, &f, &viewer, BACKFILL));
            match got {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, "GET /: the store failed; the page's stream backfills");
                    None
                }
            }
        });
        let rest = render_rows(&tail, newest.as_ref(), own.as_deref());
        let _ = tx.blocking_send(Ok(bytes::Bytes::from(rest)));
    });
    let body = channel_body(rx);
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, PAGE_CSP.clone());
    r
}

/// The page's Content-Security-Policy: nothing from elsewhere, no inline script, and of inline
/// styles only the stylesheet this binary embeds (by its SHA-256, CSP Level 2 hash source).
static PAGE_CSP: std::sync::LazyLock<HeaderValue> = std::sync::LazyLock::new(|| {
    use base64::Engine as _;
    use sha2::Digest as _;
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(STYLE));
    HeaderValue::from_str(&format!(
        "default-src 'self'; script-src 'self'; style-src 'self' 'sha256-{hash}'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
    ))
    // Unreachable (base64 is header-safe); the page then renders unstyled, never less strict.
    .unwrap_or_else(|_| {
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
    })
});

/// How many of the rendered rows go into the table itself; the rest of them ride in the page
/// inside a `<template>` (parsed, never laid out or painted) and the script moves them into
/// the table after the first frame. A screenful (a 1300-pixel-tall window's worth): laying out
/// and painting the rows below the fold before the first frame cost ~0.5 ms per row in
/// headless Chromium (docs/benchmarks.md, "Dashboard paint").
pub const SCREEN_ROWS: usize = 50;

/// The page with the viewer's principal, roles and the policy snapshot filled in (escaped),
/// split where the Live table's rows go: (everything before them, the template after them).
fn render(viewer: &Principal, snapshot: &str) -> (String, String) {
    let page = PAGE
        .replace("{{style}}", STYLE)
        .replace("{{principal}}", &escape(&viewer.id))
        .replace("{{roles}}", &escape(&viewer.roles.join(", ")))
        .replace("{{snapshot}}", &escape(snapshot));
    match page.split_once("{{rows}}") {
        Some((head, tail)) => (head.to_string(), tail.to_string()),
        None => (page, String::new()),
    }
}

/// The rows (escaped, newest first) and the rest of the page: where the stream starts
/// (`data-after`, empty when no rows were read), where "load older" continues
/// (`data-older`), and the principal a user's rows are narrowed to (`data-own`).
fn render_rows(tail: &str, newest: Option<&live::Newest>, own: Option<&str>) -> String {
    let all = newest.map(|n| n.rows.as_slice()).unwrap_or_default();
    let (screen, below) = all.split_at(all.len().min(SCREEN_ROWS));
    let mut rows = String::new();
    for r in screen {
        live::row_html(&mut rows, r);
    }
    let mut more = String::new();
    for r in below {
        live::row_html(&mut more, r);
    }
    let after = newest.map(|n| n.head.to_string()).unwrap_or_default();
    let older = newest
        .and_then(|n| n.next.as_ref())
        .map(|c| c.to_string())
        .unwrap_or_default();
    rows + &tail
        .replace("{{more}}", &more)
        .replace("{{after}}", &after)
        .replace("{{older}}", &escape(&older))
        .replace("{{own}}", &escape(own.unwrap_or("")))
        .replace("{{count}}", &newest.map_or(0, |n| n.rows.len()).to_string())
}

/// HTML text escaping (element content and double-quoted attributes).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn json_error(status: StatusCode, e: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"error": e}).to_string(),
    )
        .into_response()
}

fn json_ok(v: &serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        v.to_string(),
    )
        .into_response()
}

/// The stream's request: its filter and where it starts.
fn parse_stream(query: &str, last_event_id: Option<&str>) -> Result<(Filter, Option<i64>), String> {
    let mut after = None;
    let mut pairs = Vec::new();
    for (k, v) in query_pairs(query) {
        if k == "after" {
            after = Some(v);
        } else if STREAM_KEYS.contains(&k.as_str()) {
            if !v.is_empty() {
                pairs.push((k, v));
            }
        } else {
            return Err(format!(
                "unknown parameter {k:?}: the stream takes after, {}",
                STREAM_KEYS.join(", ")
            ));
        }
    }
    let filter = Filter::from_pairs(pairs)?;
    let position = |v: &str| {
        v.parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| format!("after: {v:?} is not a chain position"))
    };
    let after = after.as_deref().map(position).transpose()?;
    // A browser reconnecting sends the URL it started with (its `after`) and the last event it
    // got: resume from the later of the two.
    let resumed = last_event_id.and_then(|v| position(v).ok());
    let after = match (after, resumed) {
        (Some(a), Some(r)) => Some(a.max(r)),
        (a, r) => a.or(r),
    };
    Ok((filter, after))
}

/// `GET /api/audit/stream?principal=..&tool=..&after=..`: see the module docs.
async fn stream(
    State(gw): State<Arc<Gateway>>,
    Extension(conn): Extension<Conn>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(caller) = conn.caller.clone() else {
        return forbidden("no verified tailnet identity");
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let (filter, after) = match parse_stream(query.as_deref().unwrap_or(""), last) {
        Ok(x) => x,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let db = gw.config.audit.sqlite.clone();
    let reader = match tokio::task::spawn_blocking(move || Reader::open(&db)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let mut row = crate::gateway::AuditRow::new("check", &conn);
    row.method = "GET /api/audit/stream".into();
    row.action = "read".into();
    row.effect = crate::policy::model::Effect::Allow;
    row.outcome = "answered".into();
    row.reason = "a live stream of rows, each authorized by policy toolgate_audit/read".into();
    row.policy_hash = gw.store.current().hash.clone();
    if gw.submit(row).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "audit unavailable").into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let viewer = caller.principal.clone();
    tokio::spawn(pump(gw, reader, filter, viewer, after, tx));
    let body = channel_body(rx);
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// What one look at the store found: the SSE text of the readable rows, and the chain
/// position to continue after.
struct Batch {
    text: String,
    after: i64,
}

/// One SSE `decision` event.
fn event(text: &mut String, row: &Row) {
    if let Ok(json) = serde_json::to_string(row) {
        text.push_str(&format!(
            "id: {}\nevent: decision\ndata: {json}\n\n",
            row.seq
        ));
    }
}

/// The newest [`BACKFILL`] rows the viewer may read at or before the chain head
/// ([`live::newest`]), oldest first, then the `backfilled` event; continues after the head.
fn backfill(
    gw: &Gateway,
    reader: &Reader,
    filter: &Filter,
    viewer: &Principal,
) -> Result<Batch, String> {
    let n = live::newest(gw, reader, filter, viewer, BACKFILL)?;
    let mut text = String::new();
    for r in n.rows.iter().rev() {
        event(&mut text, r);
    }
    let done = serde_json::json!({
        "rows": n.rows.len(),
        "next": n.next.map(|c| c.to_string()),
    });
    text.push_str(&format!("event: backfilled\ndata: {done}\n\n"));
    Ok(Batch {
        text,
        after: n.head,
    })
}

/// The rows after chain position `after` that the viewer may read, oldest first, examining
/// at most [`POLL_BATCH`], and the outcomes recorded since for rows already sent
/// ([`live::outcome_events`]); all in chain order, up to the head read first.
fn poll(
    gw: &Gateway,
    reader: &Reader,
    filter: &Filter,
    viewer: &Principal,
    after: i64,
) -> Result<Batch, String> {
    let head = reader.head_seq().map_err(|e| e.to_string())?;
    if head <= after {
        return Ok(Batch {
            text: String::new(),
            after,
        });
    }
    let f = Filter {
        after_seq: Some(after),
        before_seq: Some(head.saturating_add(1)),
        limit: None,
        ..filter.clone()
    };
    let mut events: Vec<(i64, String)> = Vec::new();
    let mut last = after;
    let mut examined = 0usize;
    reader
        .for_each(&f, &mut |r| {
            examined += 1;
            last = last.max(r.seq);
            if may_read(gw, viewer, &r) {
                let mut text = String::new();
                event(&mut text, &r);
                events.push((r.seq, text));
            }
            examined < POLL_BATCH
        })
        .map_err(|e| e.to_string())?;
    let through = if examined >= POLL_BATCH { last } else { head };
    let (outcomes, through) =
        live::outcome_events(gw, reader, filter, viewer, after, through, POLL_BATCH)?;
    events.retain(|(seq, _)| *seq <= through);
    events.extend(outcomes);
    events.sort_by_key(|(seq, _)| *seq);
    let text = events.into_iter().map(|(_, t)| t).collect();
    Ok(Batch {
        text,
        after: through,
    })
}

/// Waits for the next commit; false when the writer stopped (never resolves without one).
async fn wait_commit(rx: &mut Option<tokio::sync::watch::Receiver<i64>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Feeds one stream until the client goes away, the store fails or [`STREAM_LIFETIME`] ends.
async fn pump(
    gw: Arc<Gateway>,
    reader: Reader,
    filter: Filter,
    viewer: Principal,
    after: Option<i64>,
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
) {
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    let mut state = Some((reader, filter, viewer));
    let mut after = after;
    if tx
        .send(Ok(bytes::Bytes::from_static(b"retry: 2000\n\n")))
        .await
        .is_err()
    {
        return;
    }
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut committed = gw.audit.committed();
    let mut first = true;
    let mut last_look = Instant::now();
    while started.elapsed() < STREAM_LIFETIME {
        if first {
            first = false;
        } else {
            let woke = tokio::select! {
                _ = tick.tick() => None,
                c = wait_commit(&mut committed) => Some(c),
                _ = tx.closed() => return,
            };
            if woke == Some(false) {
                // The writer is gone: only the fallback poll is left.
                committed = None;
            }
            // A burst of commits wakes the stream once per MIN_GAP, not once per commit.
            let since = last_look.elapsed();
            if since < MIN_GAP {
                tokio::time::sleep(MIN_GAP - since).await;
            }
        }
        last_look = Instant::now();
        let Some((reader, filter, viewer)) = state.take() else {
            return;
        };
        let g = gw.clone();
        let from = after;
        let looked = tokio::task::spawn_blocking(move || {
            let b = match from {
                None => backfill(&g, &reader, &filter, &viewer),
                Some(a) => poll(&g, &reader, &filter, &viewer, a),
            };
            (b, (reader, filter, viewer))
        })
        .await;
        let (batch, back) = match looked {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "/api/audit/stream: the reader task failed");
                return;
            }
        };
        state = Some(back);
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "/api/audit/stream: the store failed");
                let _ = tx.send(Err(std::io::Error::other(e))).await;
                return;
            }
        };
        after = Some(batch.after);
        let text = if batch.text.is_empty() {
            if quiet_since.elapsed() < KEEPALIVE {
                continue;
            }
            ": keep-alive\n\n".to_string()
        } else {
            batch.text
        };
        quiet_since = Instant::now();
        if tx.send(Ok(bytes::Bytes::from(text))).await.is_err() {
            return;
        }
    }
}

/// A response body streamed from what a producer task sends on `rx`, until it hangs up.
fn channel_body(rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>) -> Body {
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html() {
        assert_eq!(
            escape(r#"<a href="x">&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn stream_parameters() {
        let (f, a) = parse_stream("principal=alice&effect=deny&tool=", None).unwrap();
        assert_eq!(f.principal.as_deref(), Some("alice"));
        assert_eq!(f.effect.as_deref(), Some("deny"));
        assert_eq!(f.tool, None);
        assert_eq!(a, None);
        assert_eq!(parse_stream("", Some("42")).unwrap().1, Some(42));
        assert_eq!(parse_stream("after=7", Some("42")).unwrap().1, Some(42));
        assert_eq!(parse_stream("after=50", Some("42")).unwrap().1, Some(50));
        assert!(
            parse_stream("after=-1", None)
                .unwrap_err()
                .starts_with("after:")
        );
        assert!(
            parse_stream("since=2h", None)
                .unwrap_err()
                .contains("unknown")
        );
        assert!(parse_stream("effect=maybe", None).is_err());
    }

    #[test]
    fn rows_past_a_screenful_wait_in_the_template() {
        let p = Principal {
            id: "a".into(),
            ..Default::default()
        };
        let (head, tail) = render(&p, "abc");
        let rows = (0..SCREEN_ROWS + 7)
            .map(|i| crate::audit::record::Row {
                id: format!("id-{i}"),
                seq: 1000 - i as i64,
                ..Default::default()
            })
            .collect();
        let newest = live::Newest {
            rows,
            head: 1000,
            next: None,
        };
        let html = head + &render_rows(&tail, Some(&newest), None);
        let (table, rest) = html.split_once("</tbody>").unwrap();
        let (template, _) = rest
            .split_once("<template id=\"more-rows\">")
            .unwrap()
            .1
            .split_once("</template>")
            .unwrap();
        assert_eq!(table.matches("<tr data-id").count(), SCREEN_ROWS);
        assert_eq!(template.matches("<tr data-id").count(), 7);
        // Newest first, none twice: the table ends where the template begins.
        assert!(table.contains("\"id-0\"") && !table.contains(&format!("\"id-{SCREEN_ROWS}\"")));
        assert!(template.starts_with(&format!("<tr data-id=\"id-{SCREEN_ROWS}\"")));
        assert!(
            html.contains("data-rows=\"57\""),
            "every rendered row is counted"
        );
    }

    #[test]
    fn page_renders_the_viewer_escaped() {
        let p = Principal {
            id: "<script>".into(),
            roles: vec!["user".into()],
            ..Default::default()
        };
        let (head, tail) = render(&p, "abc");
        assert!(head.contains("&lt;script&gt;"));
        let html = head + &render_rows(&tail, None, None);
        assert!(!html.contains("{{"), "{html}");
    }
}
