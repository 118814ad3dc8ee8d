//! The dashboard in a real browser (issue 16 part 4): headless Chromium (Debian's `chromium`)
//! driven by playwright-core (`scripts/peers-browser` installs both) through
//! tests/browser/dashboard.cjs. One browser, one node process, for the whole suite; it
//! reports JSON and the assertions are here.
//!
//! Chromium connects from 127.0.0.1, so two daemons map 127.0.0.1 to two viewers: an admin
//! (sees every row) and alice (a user: only her own rows). Each page: the Live view's backfill
//! is painted, a row's detail opens, a decision made through the gateway after the page loaded
//! shows without a reload, and a user never sees another principal's row; then the Agents,
//! Tools, Policies and Charts views each open from the nav and reach `data-state=ready` (the
//! user's Agents view names only alice). Screenshots of each view land in
//! target/browser-screenshots/ (kept as CI artifacts).

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

fn session(name: &str, base: &str, calls: &[(&str, &str)], expect_new: &[&str]) -> Value {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(from, q)| json!({"from": from, "path": "/mcp/github", "body": tools_call(q)}))
        .collect();
    json!({"name": name, "base": base, "calls": calls, "expect_new": expect_new, "views": views()})
}

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
    // Rows before the pages load (the backfill): one each by alice and bob.
    for d in [&admin, &user] {
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
            session("admin", &admin.base, &[(BOB, "bob-live"), (ALICE, "alice-live")],
                    &["bob@example.com", "alice@example.com"]),
            // alice: bob's decision comes first in the chain; hers shows, his never does.
            session("user", &user.base, &[(BOB, "bob-live"), (ALICE, "alice-live")],
                    &["alice@example.com"]),
        ],
    });
    let spec_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(spec_file.path(), spec.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.cjs");
    let child = tokio::process::Command::new("node")
        .arg(&script)
        .arg(spec_file.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(BUDGET + Duration::from_secs(10), child)
        .await
        .unwrap_or_else(|_| panic!("the browser run took over {BUDGET:?}"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dashboard.cjs failed ({}): {stderr}",
        out.status
    );
    let report: Value = serde_json::from_slice(&out.stdout)
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
        for shot in ["live", "live-detail", "live-new"] {
            let p = shots.join(format!("{name}-{shot}.png"));
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000, "{}: no screenshot", p.display());
        }
    }

    // The admin sees both principals, before and live.
    let a = &s[0];
    assert_eq!(a["viewer"], "admin@example.com");
    let before = principals(&a["backfill"]);
    for p in ["alice@example.com", "bob@example.com"] {
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
    for key in ["backfill", "after", "all"] {
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
