//! The dashboard in a real browser (issue 16 part 4): headless Chromium (Debian's `chromium`)
//! driven by playwright-core (`scripts/peers-browser` installs both) through
//! tests/browser/dashboard.cjs. One browser, one node process, for the whole suite; it
//! reports JSON and the assertions are here.
//!
//! Chromium connects from 127.0.0.1, so two daemons map 127.0.0.1 to two viewers: an admin
//! (sees every row) and alice (a user: only her own rows). Each page: the Live rows arrive in
//! the HTML itself (server-rendered; a principal or tool name with markup in it shows as text),
//! a row's detail opens, a row still `pending` when the page loaded shows its outcome once it
//! is recorded, a decision made through the gateway after the page loaded shows without a
//! reload, "load older" appends the next older rows, and a user never sees another principal's
//! row; then the Agents, Tools, Policies and Charts views each open from the nav and reach
//! `data-state=ready` (the user's Agents view names only alice; Charts loads uPlot only then,
//! and draws). Screenshots of each view land in target/browser-screenshots/ (kept as CI
//! artifacts).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use toolgate::audit::{Effect, Kind, Record};
use toolgate::daemon;

mod support;
use support::{demo_daemon, peers};

/// The whole browser run (launch, both sessions, every view) must finish within this.
const BUDGET: Duration = Duration::from_secs(60);

const ALICE: &str = "127.0.0.2";
const BOB: &str = "127.0.0.3";

/// 127.0.0.1 (the browser) as an admin.
const BROWSER_ADMIN: &str = "\"127.0.0.1\":\n  login: admin@example.com\n  display_name: Ada Admin\n  node: admin-laptop.example.ts.net\n  caps: [{roles: [admin]}]\n";
/// 127.0.0.1 (the browser) as alice, a user (as 127.0.0.2 is).
const BROWSER_ALICE: &str = "\"127.0.0.1\":\n  login: alice@example.com\n  display_name: Alice\n  node: alice-laptop.example.ts.net\n  node_id: nALICE1\n  tailnet: example.ts.net\n  caps: [{roles: [developer]}]\n";

/// Chromium and playwright-core, from `scripts/peers-browser` (its env vars, else its defaults).
fn browser_peers() -> Option<(PathBuf, PathBuf)> {
    let chromium = std::env::var_os("TOOLGATE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let modules = std::env::var_os("TOOLGATE_PLAYWRIGHT_MODULES")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                Path::new(&h).join(".cache/toolgate-peers/playwright-core-1.65.1/node_modules")
            })
        })?;
    let node = std::process::Command::new("node").arg("--version").output();
    (chromium.exists() && modules.join("playwright-core").exists() && node.is_ok())
        .then_some((chromium, modules))
}

struct Running {
    _dir: tempfile::TempDir,
    base: String,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), String>>,
    audit: toolgate::audit::AuditLog,
}

async fn start(extra: &str) -> Running {
    let demo_daemon::Built { dir, addr, daemon } = demo_daemon::build_with(extra).await;
    let audit = daemon.audit.clone();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(daemon::run(daemon, rx));
    demo_daemon::wait_listening(addr).await;
    Running {
        _dir: dir,
        base: format!("http://{addr}"),
        stop,
        server,
        audit,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(30), self.server)
            .await
            .expect("the daemon did not stop within 30 s")
            .expect("the daemon task panicked");
        assert_eq!(exit, Ok(()));
    }
}

fn tools_call(query: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": "search_repositories", "arguments": {"query": query}}})
}

async fn call(from: &str, base: &str, query: &str) {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap();
    let r = client
        .post(format!("{base}/mcp/github"))
        .header("content-type", "application/json")
        .body(tools_call(query).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// The views besides Live (issue 16 part 2; their hooks are listed at the top of
/// src/dashboard/dashboard.js): each is opened from its nav link, and counts as shown once its
/// section says `data-state=ready` (its data painted).
const VIEWS: [&str; 4] = ["agents", "tools", "policies", "charts"];

fn views() -> Value {
    VIEWS
        .iter()
        .map(|v| {
            json!({"name": v, "nav": format!("#nav a[data-view={v}]"),
                   "wait": format!("#view-{v}[data-state=ready]"), "root": format!("#view-{v}")})
        })
        .collect()
}

fn session(
    name: &str,
    base: &str,
    pending: &str,
    calls: &[(&str, &str)],
    expect_new: &[&str],
) -> Value {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(from, q)| json!({"from": from, "path": "/mcp/github", "body": tools_call(q)}))
        .collect();
    json!({"name": name, "base": base, "pending": pending, "calls": calls,
           "expect_new": expect_new, "views": views()})
}

/// Rows written straight to the audit store (as the gateway writes them).
fn record(principal: &str, tool: &str, outcome: &str) -> Record {
    let mut r = Record::new(Kind::Mcp, Effect::Allow);
    r.principal = principal.into();
    r.login = principal.into();
    r.node = "alice-laptop.example.ts.net".into();
    r.server = "github".into();
    r.method = "tools/call".into();
    r.tool = tool.into();
    r.action = format!("tools/call::{tool}");
    r.outcome = outcome.into();
    r.explain = json!({"written": "by the test"});
    r
}

/// More of alice's rows than a page holds (so "load older" has rows to load), a principal and
/// a tool name with markup in them, and one of alice's calls still `pending`; returns its id.
async fn seed(d: &Running) -> String {
    for i in 0..150 {
        d.audit
            .submit(record(ALICE_ID, &format!("bulk_{i}"), "forwarded"))
            .unwrap();
    }
    d.audit
        .submit(record(XSS_PRINCIPAL, "search_repositories", "forwarded"))
        .unwrap();
    d.audit
        .submit(record(ALICE_ID, XSS_TOOL, "forwarded"))
        .unwrap();
    let pending = d
        .audit
        .submit(record(ALICE_ID, "search_repositories", "pending"))
        .unwrap();
    pending.id().to_string()
}

const ALICE_ID: &str = "alice@example.com";
/// Names that would run script if the page put them in as HTML (the CSP would also refuse).
const XSS_PRINCIPAL: &str = "<script>window.__xss=1</script>@example.com";
const XSS_TOOL: &str = "<img src=x onerror=\"window.__xss=2\">";

fn principals(rows: &Value) -> Vec<String> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["principal"].as_str().unwrap().to_string())
        .collect()
}

/// Both viewers' pages in one Chromium: see the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let Some((chromium, modules)) = browser_peers() else {
        peers::missing(
            "dashboard_in_a_real_browser",
            "chromium + playwright-core",
            "no /usr/bin/chromium (or TOOLGATE_CHROMIUM), node, or playwright-core 1.65.1 in the peers cache (or TOOLGATE_PLAYWRIGHT_MODULES)",
            "scripts/peers-browser (apt-get install chromium; npm playwright-core into ~/.cache/toolgate-peers)",
        );
        return;
    };
    let t0 = Instant::now();
    let admin = start(BROWSER_ADMIN).await;
    let user = start(BROWSER_ALICE).await;
    // Rows before the pages load (server-rendered): alice's many, the markup names, a pending
    // call, and one call each by alice and bob.
    let mut pending = Vec::new();
    for d in [&admin, &user] {
        pending.push(seed(d).await);
        call(ALICE, &d.base, "alice-before").await;
        call(BOB, &d.base, "bob-before").await;
        d.audit.flush().await.unwrap();
    }

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
    let spec = json!({
        "playwright": modules,
        "chromium": chromium,
        "shots": shots,
        "budget_ms": BUDGET.as_millis() as u64,
        "sessions": [
            // The admin: bob's and alice's new decisions both show.
            session("admin", &admin.base, &pending[0], &[(BOB, "bob-live"), (ALICE, "alice-live")],
                    &["bob@example.com", "alice@example.com"]),
            // alice: bob's decision comes first in the chain; hers shows, his never does.
            session("user", &user.base, &pending[1], &[(BOB, "bob-live"), (ALICE, "alice-live")],
                    &["alice@example.com"]),
        ],
    });
    let spec_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(spec_file.path(), spec.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.cjs");
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .arg(spec_file.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let daemons = [(&admin, &pending[0]), (&user, &pending[1])];
    // Each `{"await_outcome": session}` line: the page shows that session's pending row; record
    // its outcome now. The last line is the report.
    let run = async {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut last = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if let Some(name) = v["await_outcome"].as_str() {
                let (d, id) = daemons[usize::from(name != "admin")];
                d.audit
                    .record_outcome(id, "forwarded", Some(4321), "")
                    .unwrap();
                continue;
            }
            last = line;
        }
        let out = child.wait_with_output().await.unwrap();
        (last, out)
    };
    let (last, out) = tokio::time::timeout(BUDGET + Duration::from_secs(10), run)
        .await
        .unwrap_or_else(|_| panic!("the browser run took over {BUDGET:?}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dashboard.cjs failed ({}): {stderr}",
        out.status
    );
    let report: Value = serde_json::from_str(&last)
        .unwrap_or_else(|e| panic!("dashboard.cjs printed no JSON ({e}): {stderr}"));
    let s = &report["sessions"];

    for v in s.as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        assert_eq!(v["status"], 200, "{name}");
        assert_eq!(v["page_errors"], json!([]), "{name}: script errors");
        assert_eq!(
            v["console_errors"],
            json!([]),
            "{name}: console errors: {}",
            v["console_errors"]
        );
        assert!(v["painted_ms"].as_f64().is_some(), "{name}: never painted");
        assert_eq!(v["not_reloaded"], true, "{name}: the page reloaded");
        assert!(
            v["calls"].as_array().unwrap().iter().all(|c| c == 200),
            "{name}: {}",
            v["calls"]
        );
        assert!(
            v["detail"]["explain"].as_str().unwrap().contains('{'),
            "{name}: the detail shows no explain trace: {}",
            v["detail"]
        );
        // Server-rendered: the rows are in the HTML, and no chart library was loaded for them.
        assert!(
            v["html_rows"].as_u64().unwrap() >= 100,
            "{name}: {} rows in the HTML",
            v["html_rows"]
        );
        // Past the first screenful the rendered rows wait in a <template>; once painted, every
        // rendered row is in the table, newest first, each once.
        let seqs: Vec<i64> = v["backfill"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_i64().unwrap())
            .collect();
        assert!(
            seqs.len() as u64 >= v["html_rows"].as_u64().unwrap(),
            "{name}: {} of {} rendered rows in the table",
            seqs.len(),
            v["html_rows"]
        );
        assert!(
            seqs.windows(2).all(|w| w[0] > w[1]),
            "{name}: the table's rows are not newest first, each once: {seqs:?}"
        );
        assert_eq!(
            v["uplot_at_load"], "undefined",
            "{name}: uPlot loaded eagerly"
        );
        assert!(
            v["scripts_at_load"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| !s.as_str().unwrap().contains("uPlot")),
            "{name}: {}",
            v["scripts_at_load"]
        );
        // The pending row: `pending` on the page, then its outcome, live.
        assert_eq!(v["pending_before"], json!(["pending", ""]), "{name}");
        assert_eq!(v["pending_after"], json!(["forwarded", "4.3 ms"]), "{name}");
        // "Load older": older rows than any shown before, appended below, each once.
        assert_eq!(v["older_visible"], true, "{name}");
        let shown_min = v["all"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_i64().unwrap())
            .min()
            .unwrap();
        let older = v["older"].as_array().unwrap();
        assert!(!older.is_empty(), "{name}: load older loaded nothing");
        for r in older {
            assert!(r["seq"].as_i64().unwrap() < shown_min, "{name}: {r}");
        }
        let all = v["older_then"].as_array().unwrap();
        let ids: std::collections::HashSet<&str> =
            all.iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), all.len(), "{name}: a row shows twice");
        // Charts: uPlot was loaded when the view opened, and drew both charts.
        assert_eq!(v["charts_drawn"]["uplot"], "function", "{name}");
        assert!(
            v["charts_drawn"]["canvases"].as_u64().unwrap() >= 2,
            "{name}: {}",
            v["charts_drawn"]
        );
        assert_eq!(v["xss"], Value::Null, "{name}: markup in a name ran");
        for shot in ["live", "live-detail", "live-new", "live-older"] {
            let p = shots.join(format!("{name}-{shot}.png"));
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000, "{}: no screenshot", p.display());
        }
    }

    // The admin sees both principals, before and live.
    let a = &s[0];
    assert_eq!(a["viewer"], "admin@example.com");
    let before = principals(&a["backfill"]);
    for p in ["alice@example.com", "bob@example.com", XSS_PRINCIPAL] {
        assert!(before.iter().any(|x| x == p), "admin backfill: {before:?}");
    }
    let live = principals(&a["after"]);
    for p in ["alice@example.com", "bob@example.com"] {
        assert!(live.iter().any(|x| x == p), "admin live: {live:?}");
    }

    // alice sees her own rows only: in the backfill, live, and in the whole table at the end
    // (bob's live row preceded hers in the chain, so had it been sent it would be there).
    let u = &s[1];
    assert_eq!(u["viewer"], "alice@example.com");
    let tools: Vec<&str> = u["backfill"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["tool"].as_str().unwrap())
        .collect();
    assert!(tools.contains(&XSS_TOOL), "user backfill tools: {tools:?}");
    for key in ["backfill", "after", "all", "older", "older_then"] {
        let ps = principals(&u[key]);
        assert!(!ps.is_empty(), "user {key}: no rows");
        assert!(
            ps.iter().all(|p| p == "alice@example.com"),
            "user {key}: {ps:?}"
        );
    }

    for v in s.as_array().unwrap() {
        for name in VIEWS {
            let view = &v["views"][name];
            assert_eq!(view["ok"], true, "{} view {name}: {view}", v["name"]);
            let p = shots.join(format!("{}-{name}.png", v["name"].as_str().unwrap()));
            assert!(p.exists(), "{}: no screenshot", p.display());
        }
    }
    // Agents: the admin sees both principals; alice only herself.
    let agents = a["views"]["agents"]["text"].as_str().unwrap();
    for p in ["alice@example.com", "bob@example.com"] {
        assert!(agents.contains(p), "admin agents view: {agents}");
    }
    let agents = u["views"]["agents"]["text"].as_str().unwrap();
    assert!(
        agents.contains("alice@example.com"),
        "user agents view: {agents}"
    );
    assert!(
        !agents.contains("bob@example.com"),
        "user agents view: {agents}"
    );
    let tools = u["views"]["tools"]["text"].as_str().unwrap();
    assert!(
        tools.contains("search_repositories"),
        "user tools view: {tools}"
    );

    eprintln!(
        "browser suite: chromium {} launched in {} ms, node run {} ms, test {:.1} s; Live painted at {} / {} ms after navigation start (admin / user), new rows shown {} / {} ms after the calls",
        report["browser"],
        report["launch_ms"],
        report["total_ms"],
        t0.elapsed().as_secs_f64(),
        a["painted_ms"],
        u["painted_ms"],
        a["live_ms"],
        u["live_ms"]
    );
    admin.stop().await;
    user.stop().await;
}
