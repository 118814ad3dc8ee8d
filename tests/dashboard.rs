//! The dashboard (issue 16): the page at `/` and its live stream `/api/audit/stream`, over
//! HTTP against a running daemon. The stream is filtered by the `toolgate_audit`/`read`
//! policy per viewer: an admin sees every row, a user only their own.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use toolgate::daemon;

mod support;
use support::demo_daemon;

const ALICE: [u8; 4] = [127, 0, 0, 2];
const BOB: [u8; 4] = [127, 0, 0, 3];
const CAROL_ADMIN: [u8; 4] = [127, 0, 0, 5];
const NOBODY: [u8; 4] = [127, 0, 0, 9];

fn client(from: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(from))
        .build()
        .unwrap()
}

async fn call(from: [u8; 4], base: &str, tool: &str, args: Value) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}});
    let r = client(from)
        .post(format!("{base}/mcp/github"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// An open SSE stream, parsed into `decision` events as they arrive.
struct Stream {
    resp: reqwest::Response,
    buf: String,
    rows: Vec<Value>,
    /// The `outcome` events (a row already sent got its outcome).
    outcomes: Vec<Value>,
    /// The `backfilled` event's row count, and how many rows had arrived before it.
    backfilled: Option<(u64, usize)>,
}

impl Stream {
    async fn open(from: [u8; 4], url: &str) -> Stream {
        let resp = client(from).get(url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{url}");
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Stream {
            resp,
            buf: String::new(),
            rows: Vec::new(),
            outcomes: Vec::new(),
            backfilled: None,
        }
    }

    /// Reads events until `done` holds for the rows so far (10 s deadline).
    async fn until(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) {
        self.until_with(what, |s| done(&s.rows)).await;
    }

    /// Reads events until `done` holds for the stream so far (10 s deadline).
    async fn until_with(&mut self, what: &str, done: impl Fn(&Stream) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {what} on the stream within 10 s: {:?}", self.rows));
            let chunk = tokio::time::timeout(left, self.resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("no {what} on the stream within 10 s: {:?}", self.rows))
                .unwrap()
                .expect("the stream ended");
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
            self.parse();
        }
    }

    /// Moves the complete events in the buffer into `rows` (and `backfilled`).
    fn parse(&mut self) {
        while let Some(end) = self.buf.find("\n\n") {
            let ev: String = self.buf.drain(..end + 2).collect();
            let mut name = "message";
            let mut data = None;
            let mut id = None;
            for line in ev.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = match v {
                        "decision" => "decision",
                        "backfilled" => "backfilled",
                        "outcome" => "outcome",
                        _ => "other",
                    };
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_string());
                }
            }
            if name == "outcome" {
                let v: Value = serde_json::from_str(&data.unwrap()).unwrap();
                // Its id is the outcome row's own chain position, after its decision's.
                let at: i64 = id.unwrap().parse().unwrap();
                assert!(at > v["seq"].as_i64().unwrap(), "{v}");
                self.outcomes.push(v);
            } else if name == "backfilled" {
                let v: Value = serde_json::from_str(&data.unwrap()).unwrap();
                self.backfilled = Some((v["rows"].as_u64().unwrap(), self.rows.len()));
            } else if name == "decision" {
                let row: Value = serde_json::from_str(&data.unwrap()).unwrap();
                assert_eq!(
                    id.unwrap(),
                    row["seq"].to_string(),
                    "the event id is the seq"
                );
                self.rows.push(row);
            }
        }
    }
}

fn has_call(rows: &[Value], principal: &str, query: &str) -> bool {
    rows.iter().any(|r| {
        r["principal"] == principal
            && r["tool"] == "search_repositories"
            && r["arguments"]["query"] == query
    })
}

async fn start() -> (
    tempfile::TempDir,
    String,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), String>>,
    toolgate::audit::AuditLog,
) {
    let demo_daemon::Built {
        dir,
        addr,
        daemon: built,
    } = demo_daemon::build().await;
    let port = addr.port();
    let audit = built.audit.clone();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(daemon::run(built, rx));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    demo_daemon::wait_listening(addr).await;
    (dir, format!("http://{addr}"), stop, server, audit)
}

async fn stop_daemon(
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), String>>,
) {
    stop.send(true).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the daemon did not stop within 30 s")
        .expect("the daemon task panicked");
    assert_eq!(exit, Ok(()));
}

/// The page and its assets are served from the binary, to identified viewers only; the page
/// names the viewer.
#[tokio::test]
async fn the_page_is_served_to_identified_viewers() {
    let (_dir, base, stop, server, _audit) = start().await;
    let r = client(ALICE).get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    // The stylesheet is inline, and the page's CSP allows exactly it (by its SHA-256) and no
    // other inline style or any inline script.
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    let html = r.text().await.unwrap();
    let style = html
        .split_once("<style>")
        .and_then(|(_, rest)| rest.split_once("</style>"))
        .map(|(style, _)| style)
        .expect("an inline stylesheet");
    let hash = {
        use base64::Engine as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(style))
    };
    assert!(
        csp.contains(&format!("style-src 'self' 'sha256-{hash}';")),
        "{csp}"
    );
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(html.contains("alice@example.com"), "{html}");
    assert!(html.contains("/dashboard.js") && html.contains("Live decisions"));
    assert!(!html.contains("{{"), "every placeholder is filled");
    for (path, ty) in [
        ("/dashboard.js", "text/javascript"),
        ("/dashboard.css", "text/css"),
    ] {
        let r = client(ALICE)
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert_eq!(r.headers()["content-type"].to_str().unwrap(), ty);
        assert!(!r.text().await.unwrap().is_empty());
    }
    let r = client(NOBODY).get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = client(NOBODY)
        .get(format!("{base}/api/audit/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = client(ALICE)
        .get(format!("{base}/api/audit/stream?since=2h"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    stop_daemon(stop, server).await;
}

/// Rows already in the store arrive first (backfill), new ones live; an admin sees every
/// row, a user only theirs; filters narrow the stream; a row carries its detail (explain
/// trace, redacted arguments, outcome, latency).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_stream_live_filtered_by_policy() {
    let (_dir, base, stop, server, audit) = start().await;
    // Before any stream: one call each (backfill).
    call(
        ALICE,
        &base,
        "search_repositories",
        json!({"query": "a-old"}),
    )
    .await;
    call(BOB, &base, "search_repositories", json!({"query": "b-old"})).await;
    audit.flush().await.unwrap();

    let stream = format!("{base}/api/audit/stream");
    let mut admin = Stream::open(CAROL_ADMIN, &stream).await;
    let mut alice = Stream::open(ALICE, &stream).await;
    let mut bob_only = Stream::open(
        CAROL_ADMIN,
        &format!("{stream}?principal=bob@example.com&tool=search_repositories&kind=mcp"),
    )
    .await;
    admin
        .until("backfill", |r| {
            has_call(r, "alice@example.com", "a-old") && has_call(r, "bob@example.com", "b-old")
        })
        .await;
    alice
        .until("backfill", |r| has_call(r, "alice@example.com", "a-old"))
        .await;
    // The backfill ends with its `backfilled` event, which counts the rows before it.
    for s in [&mut admin, &mut alice] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.backfilled.is_none() {
            assert!(Instant::now() < deadline, "no backfilled event");
            let chunk = tokio::time::timeout(Duration::from_secs(10), s.resp.chunk())
                .await
                .unwrap()
                .unwrap()
                .expect("the stream ended");
            s.buf.push_str(std::str::from_utf8(&chunk).unwrap());
            s.parse();
        }
        let (n, before) = s.backfilled.unwrap();
        assert_eq!(n as usize, before, "backfilled counts the rows before it");
        assert!(n >= 1);
    }

    // New decisions, after the streams opened: bob's first, then alice's.
    call(BOB, &base, "search_repositories", json!({"query": "b-new"})).await;
    call(
        ALICE,
        &base,
        "search_repositories",
        json!({"query": "a-new"}),
    )
    .await;
    admin
        .until("the new decisions", |r| {
            has_call(r, "alice@example.com", "a-new") && has_call(r, "bob@example.com", "b-new")
        })
        .await;
    alice
        .until("alice's new decision", |r| {
            has_call(r, "alice@example.com", "a-new")
        })
        .await;
    // The stream is in chain order: bob's row came before alice's, so had it been sent to
    // alice it would be here by now.
    for r in &alice.rows {
        assert_eq!(r["principal"], "alice@example.com", "alice saw {r}");
    }
    bob_only
        .until("bob's new decision", |r| {
            has_call(r, "bob@example.com", "b-new")
        })
        .await;
    for r in &bob_only.rows {
        assert_eq!(r["principal"], "bob@example.com", "{r}");
        assert_eq!(r["tool"], "search_repositories", "{r}");
    }
    // Each row once, in chain order.
    let seqs: Vec<i64> = admin
        .rows
        .iter()
        .map(|r| r["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // The detail: explain trace, arguments (redacted), outcome and latency.
    let row = admin
        .rows
        .iter()
        .find(|r| has_call(std::slice::from_ref(r), "alice@example.com", "a-new"))
        .unwrap();
    assert_eq!(row["kind"], "mcp");
    assert!(!row["explain"].is_null(), "{row}");
    assert!(row.get("latency_us").is_some() && row.get("outcome").is_some());
    // Resuming from an event id sends only what came after it.
    let seq = row["seq"].as_i64().unwrap();
    let mut resumed = Stream::open(ALICE, &format!("{stream}?after={seq}")).await;
    call(
        ALICE,
        &base,
        "search_repositories",
        json!({"query": "a-last"}),
    )
    .await;
    resumed
        .until("alice's last decision", |r| {
            has_call(r, "alice@example.com", "a-last")
        })
        .await;
    assert!(
        resumed
            .rows
            .iter()
            .all(|r| r["seq"].as_i64().unwrap() > seq)
    );
    drop((admin, alice, bob_only, resumed));
    stop_daemon(stop, server).await;
}

/// A call whose answer is not checked (a denied one answers a JSON-RPC error).
async fn call_any(from: [u8; 4], base: &str, tool: &str, args: Value) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}});
    client(from)
        .post(format!("{base}/mcp/github"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
}

async fn get_json(from: [u8; 4], url: &str) -> (u16, Value) {
    let r = client(from).get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

fn principals(v: &Value) -> Vec<String> {
    v["principals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["principal"].as_str().unwrap().to_string())
        .collect()
}

fn tool<'a>(v: &'a Value, server: &str, name: &str) -> Option<&'a Value> {
    v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["server"] == server && t["tool"] == name)
}

/// Agents, Tools and Charts count only what the viewer may read: an admin gets every row
/// (from the writer's rollups), a user only their own (from an indexed scan of their rows);
/// bob's calls never show in alice's numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_count_only_rows_the_viewer_may_read() {
    let (_dir, base, stop, server, audit) = start().await;
    for q in ["a1", "a2"] {
        call(ALICE, &base, "search_repositories", json!({"query": q})).await;
    }
    call_any(
        ALICE,
        &base,
        "delete_repository",
        json!({"owner": "acme", "repo": "x"}),
    )
    .await;
    call(BOB, &base, "search_repositories", json!({"query": "b1"})).await;
    // Outcome rows (the calls' latency) ride with the next commit or within 50 ms.
    tokio::time::sleep(Duration::from_millis(200)).await;
    audit.flush().await.unwrap();

    for view in ["agents", "tools", "chart", "policies"] {
        let (status, _) = get_json(NOBODY, &format!("{base}/api/dashboard/{view}")).await;
        assert_eq!(status, 403, "{view} without an identity");
    }
    let (status, body) = get_json(ALICE, &format!("{base}/api/dashboard/agents?window=2y")).await;
    assert_eq!(status, 400, "{body}");

    // The admin: every principal, from rollups.
    let (status, a) = get_json(
        CAROL_ADMIN,
        &format!("{base}/api/dashboard/agents?window=1h"),
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["source"], "rollups", "{a}");
    let ps = principals(&a);
    assert!(
        ps.contains(&"alice@example.com".to_string())
            && ps.contains(&"bob@example.com".to_string()),
        "{a}"
    );
    let alice = a["principals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["principal"] == "alice@example.com")
        .unwrap();
    assert!(alice["calls"].as_u64().unwrap() >= 3, "{alice}");
    assert!(alice["denials"].as_u64().unwrap() >= 1, "{alice}");
    assert_eq!(alice["nodes"], json!(["alice-laptop.example.ts.net"]));
    assert!(
        a["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == "bob-desktop.example.ts.net"),
        "{a}"
    );

    let (_, t) = get_json(
        CAROL_ADMIN,
        &format!("{base}/api/dashboard/tools?window=1h"),
    )
    .await;
    assert_eq!(t["source"], "rollups");
    let search = tool(&t, "github", "search_repositories").unwrap_or_else(|| panic!("{t}"));
    assert_eq!(search["calls"], 3, "{t}");
    assert_eq!(search["denials"], 0, "{t}");
    assert!(
        search["p50_us"].as_u64().unwrap() > 0
            && search["p99_us"].as_u64().unwrap() >= search["p50_us"].as_u64().unwrap(),
        "{search}"
    );
    let delete = tool(&t, "github", "delete_repository").unwrap_or_else(|| panic!("{t}"));
    assert_eq!(delete["denials"], 1, "{t}");

    // The user: only their own rows, from a scan of them.
    let (status, a) = get_json(ALICE, &format!("{base}/api/dashboard/agents?window=1h")).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["source"], "rows", "{a}");
    assert_eq!(principals(&a), vec!["alice@example.com".to_string()], "{a}");
    assert!(
        !a.to_string().contains("bob"),
        "nothing of bob's reaches alice: {a}"
    );
    let (_, t) = get_json(ALICE, &format!("{base}/api/dashboard/tools?window=1h")).await;
    assert_eq!(
        tool(&t, "github", "search_repositories").unwrap()["calls"],
        2,
        "{t}"
    );
    let (_, t) = get_json(BOB, &format!("{base}/api/dashboard/tools?window=1h")).await;
    assert_eq!(
        tool(&t, "github", "search_repositories").unwrap()["calls"],
        1,
        "{t}"
    );
    assert!(tool(&t, "github", "delete_repository").is_none(), "{t}");

    // Charts: per minute, allow and deny; alice's counts only her rows.
    let (status, c) = get_json(ALICE, &format!("{base}/api/dashboard/chart?range=hour")).await;
    assert_eq!(status, 200, "{c}");
    let s = &c["series"];
    assert_eq!(s["t"].as_array().unwrap().len(), 60);
    let sum = |k: &str| {
        s[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum::<u64>()
    };
    assert!(sum("allow") >= 2 && sum("deny") >= 1, "{c}");
    let (_, a) = get_json(ALICE, &format!("{base}/api/dashboard/agents?window=1h")).await;
    let (_, day) = get_json(
        CAROL_ADMIN,
        &format!("{base}/api/dashboard/chart?range=day"),
    )
    .await;
    assert_eq!(day["series"]["t"].as_array().unwrap().len(), 1440);
    assert!(
        a["principals"][0]["calls"].as_u64().unwrap() >= sum("allow") + sum("deny") - 2,
        "{a} {c}"
    );
    let (status, _) = get_json(ALICE, &format!("{base}/api/dashboard/chart?range=week")).await;
    assert_eq!(status, 400);
    stop_daemon(stop, server).await;
}

/// The rollups the writer keeps equal an aggregate of the stored rows, minute by minute, key
/// by key, latency histogram included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_a_scan_of_the_rows() {
    let (_dir, base, stop, server, audit) = start().await;
    for (who, q) in [(ALICE, "x"), (BOB, "y"), (ALICE, "z"), (CAROL_ADMIN, "w")] {
        call(who, &base, "search_repositories", json!({"query": q})).await;
    }
    call_any(
        BOB,
        &base,
        "delete_repository",
        json!({"owner": "acme", "repo": "x"}),
    )
    .await;
    let _ = get_json(ALICE, &format!("{base}/api/dashboard/agents")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    audit.flush().await.unwrap();
    stop_daemon(stop, server).await;
    let reader = toolgate::audit::query::Reader::open(audit.path()).unwrap();
    let c = reader.connection();
    let now = chrono::Utc::now().timestamp() / 60 + 1;
    let rolled = toolgate::audit::summary::from_rollups(c, 0, now).unwrap();
    let scanned = toolgate::audit::summary::from_rows(
        c,
        0,
        now,
        None,
        usize::MAX / 2,
        &mut |_: &toolgate::audit::Row| true,
    )
    .unwrap();
    assert!(!scanned.truncated);
    assert!(rolled.cells.len() >= 4, "{:?}", rolled.cells);
    let sorted = |mut v: Vec<toolgate::audit::summary::Cell>| {
        v.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        v
    };
    assert_eq!(sorted(rolled.cells.clone()), sorted(scanned.cells));
    assert!(
        rolled
            .cells
            .iter()
            .any(|c| c.tool == "search_repositories" && c.latency.total() > 0),
        "the calls' latency (from their outcome rows) is in the rollups: {:?}",
        rolled.cells
    );
}

/// The Policies view shows the loaded snapshot; its "try a decision" form needs
/// `toolgate_policy`/`explain`, which the demo policies give admins only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_view_and_the_try_a_decision_form() {
    let (_dir, base, stop, server, _audit) = start().await;
    let (status, p) = get_json(ALICE, &format!("{base}/api/dashboard/policies")).await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["hash"].as_str().unwrap().len(), 64, "{p}");
    assert!(p["loaded_at"].as_str().unwrap().ends_with('Z'), "{p}");
    assert!(
        p["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().ends_with("toolgate_policy.yaml")),
        "{p}"
    );
    assert!(p["last_error"].is_null(), "{p}");
    assert_eq!(p["may_explain"], false);
    assert!(
        p["servers"].as_array().unwrap().contains(&json!("github")),
        "{p}"
    );
    let (_, p) = get_json(CAROL_ADMIN, &format!("{base}/api/dashboard/policies")).await;
    assert_eq!(p["may_explain"], true);

    let form = json!({
        "principal": {"id": "alice@example.com", "roles": ["user", "developer"], "attr": {"tags": [], "login": "alice@example.com"}},
        "server": "github",
        "tool": "delete_repository",
        "arguments": {"owner": "acme", "repo": "x"},
    });
    let post = |from: [u8; 4], body: Value, ty: &'static str| {
        let url = format!("{base}/api/dashboard/explain");
        async move {
            let r = client(from)
                .post(url)
                .header("content-type", ty)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (
                s,
                serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = post(ALICE, form.clone(), "application/json").await;
    assert_eq!(status, 403, "a user without the role is refused: {body}");
    let (status, _) = post(NOBODY, form.clone(), "application/json").await;
    assert_eq!(status, 403);
    let (status, d) = post(CAROL_ADMIN, form.clone(), "application/json").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["action"], "tools/call::delete_repository");
    assert_eq!(d["effect"], "deny", "{d}");
    assert!(!d["trace"]["steps"].as_array().unwrap().is_empty(), "{d}");
    let mut allowed = form.clone();
    allowed["tool"] = json!("search_repositories");
    let (status, d) = post(CAROL_ADMIN, allowed, "application/json").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["effect"], "allow", "{d}");
    let mut bad = form.clone();
    bad["server"] = json!("nope");
    assert_eq!(post(CAROL_ADMIN, bad, "application/json").await.0, 400);
    assert_eq!(post(CAROL_ADMIN, form, "text/plain").await.0, 415);
    stop_daemon(stop, server).await;
}

/// The HTML of `/` as `from` sees it.
async fn page_html(from: [u8; 4], base: &str) -> String {
    let r = client(from).get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.text().await.unwrap()
}

/// The value of the first `name="..."` attribute in `html`.
fn attr<'a>(html: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    let at = html
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {html}"))
        + key.len();
    let end = html[at..].find('"').unwrap();
    &html[at..at + end]
}

/// The ids of the server-rendered Live rows (`<tr data-id="..">`), newest first.
fn rendered_ids(html: &str) -> Vec<String> {
    html.split("<tr data-id=\"")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].to_string())
        .collect()
}

/// The ids of `principal`'s rows, as the admin reads them through `/api/audit`.
async fn ids_of(base: &str, principal: &str) -> Vec<(String, i64)> {
    let (status, v) = get_json(
        CAROL_ADMIN,
        &format!("{base}/api/audit?principal={principal}&limit=1000"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["seq"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The page arrives with the viewer's newest rows already in its table, server-rendered and
/// escaped: a user's page holds none of another user's rows (not their principal, not their
/// row ids), an admin's holds everyone's, and a name with markup in it is text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_only_the_viewers_rows() {
    let (_dir, base, stop, server, audit) = start().await;
    call(ALICE, &base, "search_repositories", json!({"query": "a"})).await;
    call(BOB, &base, "search_repositories", json!({"query": "b"})).await;
    // A decision whose principal and tool carry markup (a name is whatever an identity says).
    let mut r =
        toolgate::audit::Record::new(toolgate::audit::Kind::Mcp, toolgate::audit::Effect::Deny);
    r.principal = "<script>alert(1)</script>@example.com".into();
    r.server = "github".into();
    r.method = "tools/call".into();
    r.tool = "<img src=x onerror=alert(2)>".into();
    r.outcome = "denied".into();
    audit.submit(r).unwrap();
    audit.flush().await.unwrap();

    let alice = page_html(ALICE, &base).await;
    let ids = rendered_ids(&alice);
    assert!(!ids.is_empty(), "{alice}");
    assert!(alice.contains("<td>alice@example.com</td>"), "{alice}");
    assert!(!alice.contains("bob@example.com"), "{alice}");
    assert!(!alice.contains("alert("), "{alice}");
    let bobs = ids_of(&base, "bob@example.com").await;
    assert!(!bobs.is_empty());
    for (id, _) in &bobs {
        assert!(
            !alice.contains(id.as_str()),
            "bob's row {id} in alice's page"
        );
    }
    let alices = ids_of(&base, "alice@example.com").await;
    for id in &ids {
        assert!(alices.iter().any(|(a, _)| a == id), "{id} is not alice's");
    }
    // She reads only her own rows: "load older" asks /api/audit for them by principal.
    assert_eq!(attr(&alice, "data-own"), "alice@example.com");

    let admin = page_html(CAROL_ADMIN, &base).await;
    assert!(admin.contains("<td>bob@example.com</td>"), "{admin}");
    assert!(admin.contains("<td>alice@example.com</td>"), "{admin}");
    assert!(
        admin.contains("<td>&lt;script&gt;alert(1)&lt;/script&gt;@example.com</td>"),
        "{admin}"
    );
    assert!(admin.contains("<td>&lt;img src=x onerror=alert(2)&gt;</td>"));
    assert!(!admin.contains("<script>alert") && !admin.contains("<img src=x"));
    assert_eq!(attr(&admin, "data-own"), "");
    // The page's filters narrow the rendered rows like the stream's.
    let r = client(CAROL_ADMIN)
        .get(format!("{base}/?principal=bob@example.com&kind=mcp"))
        .send()
        .await
        .unwrap();
    let only_bob = r.text().await.unwrap();
    assert!(only_bob.contains("<td>bob@example.com</td>"));
    assert!(
        !only_bob.contains("<td>alice@example.com</td>"),
        "{only_bob}"
    );
    stop_daemon(stop, server).await;
}

/// The page's stream starts after the chain position its rows were read at: a row committed
/// between the page and the stream arrives (no gap), no rendered row comes again (no
/// duplicate); and when a row already shown gets its outcome, an `outcome` event says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_continues_after_the_rendered_rows() {
    let (_dir, base, stop, server, audit) = start().await;
    call(ALICE, &base, "search_repositories", json!({"query": "a-1"})).await;
    call(BOB, &base, "search_repositories", json!({"query": "b-1"})).await;
    // A decision still waiting for its outcome.
    let mut r =
        toolgate::audit::Record::new(toolgate::audit::Kind::Mcp, toolgate::audit::Effect::Allow);
    r.principal = "alice@example.com".into();
    r.server = "github".into();
    r.method = "tools/call".into();
    r.tool = "search_repositories".into();
    r.outcome = "pending".into();
    let pending = audit.submit(r).unwrap().id().to_string();
    audit.flush().await.unwrap();

    let html = page_html(ALICE, &base).await;
    let shown = rendered_ids(&html);
    let after: i64 = attr(&html, "data-after").parse().unwrap();
    assert!(shown.contains(&pending), "{html}");
    assert!(
        html.contains("<td class=\"outcome\">pending</td>"),
        "{html}"
    );
    // Every row of alice's up to `after` is on the page (fewer than a page of them).
    for (id, seq) in ids_of(&base, "alice@example.com").await {
        if seq <= after {
            assert!(
                shown.contains(&id),
                "alice's row {id} (seq {seq}) is missing"
            );
        }
    }

    // Committed after the page was rendered, before its stream opens.
    call(BOB, &base, "search_repositories", json!({"query": "b-2"})).await;
    call(ALICE, &base, "search_repositories", json!({"query": "a-2"})).await;
    audit.flush().await.unwrap();
    let mut s = Stream::open(ALICE, &format!("{base}/api/audit/stream?after={after}")).await;
    s.until("the row committed in between", |r| {
        has_call(r, "alice@example.com", "a-2")
    })
    .await;
    audit
        .record_outcome(&pending, "forwarded", Some(1234), "")
        .unwrap();
    audit.flush().await.unwrap();
    s.until_with("the pending row's outcome", |s| {
        s.outcomes.iter().any(|o| o["id"] == pending.as_str())
    })
    .await;
    let o = s
        .outcomes
        .iter()
        .find(|o| o["id"] == pending.as_str())
        .unwrap();
    assert_eq!(o["outcome"], "forwarded", "{o}");
    assert_eq!(o["latency_us"], 1234, "{o}");
    // No duplicate: nothing on the page comes again; only alice's rows, each once.
    for r in &s.rows {
        let id = r["id"].as_str().unwrap().to_string();
        assert!(
            !shown.contains(&id),
            "{id} was on the page and streamed again"
        );
        assert!(r["seq"].as_i64().unwrap() > after);
        assert_eq!(r["principal"], "alice@example.com", "{r}");
    }
    let ids: std::collections::HashSet<&str> =
        s.rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), s.rows.len(), "a row came twice");
    // Outcomes of others' rows never reach alice.
    for o in &s.outcomes {
        assert!(
            ids_of(&base, "alice@example.com")
                .await
                .iter()
                .any(|(id, _)| o["id"] == id.as_str()),
            "{o}"
        );
    }
    drop(s);
    stop_daemon(stop, server).await;
}
