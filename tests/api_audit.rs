//! `GET /api/audit` is the audit query as JSON, authorized row by row by policy
//! (`toolgate_audit`/`read`): people see their own rows, admins see all.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};
use toolgate::daemon;

mod support;
use support::demo_daemon;

async fn get(from: [u8; 4], url: &str) -> (u16, Value) {
    let c = reqwest::Client::builder()
        .local_address(IpAddr::from(from))
        .build()
        .unwrap();
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

async fn call(from: [u8; 4], base: &str, tool: &str, args: Value) {
    let c = reqwest::Client::builder()
        .local_address(IpAddr::from(from))
        .build()
        .unwrap();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}});
    let r = c
        .post(format!("{base}/mcp/github"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn users_see_their_own_rows_admins_see_all() {
    let demo_daemon::Built {
        dir: _dir,
        addr,
        daemon: built,
    } = demo_daemon::build().await;
    let port = addr.port();
    let audit = built.audit.clone();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(daemon::run(built, rx));
    let base = format!("http://127.0.0.1:{port}");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    demo_daemon::wait_listening(addr).await;
    call(
        [127, 0, 0, 2],
        &base,
        "search_repositories",
        json!({"query": "a"}),
    )
    .await;
    call(
        [127, 0, 0, 3],
        &base,
        "search_repositories",
        json!({"query": "b"}),
    )
    .await;
    audit.flush().await.unwrap();

    let principals = |v: &Value| -> Vec<String> {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["principal"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let (s, alice) = get(
        [127, 0, 0, 2],
        &format!("{base}/api/audit?tool=search_repositories"),
    )
    .await;
    assert_eq!(s, 200, "{alice}");
    assert_eq!(principals(&alice), vec!["alice@example.com"]);
    assert_eq!(alice["withheld"], 1);
    let (_, carol) = get(
        [127, 0, 0, 5],
        &format!("{base}/api/audit?tool=search_repositories"),
    )
    .await;
    let mut all = principals(&carol);
    all.sort();
    assert_eq!(all, vec!["alice@example.com", "bob@example.com"]);
    let (s, bad) = get([127, 0, 0, 2], &format!("{base}/api/audit?colour=red")).await;
    assert_eq!(s, 400, "{bad}");
    let (s, _) = get([127, 0, 0, 9], &format!("{base}/api/audit")).await;
    assert_eq!(s, 403);
    stop_daemon(stop, server).await;
}

/// Asks the daemon to stop and checks that it does, cleanly: `daemon::run` returns `Ok` (an
/// error there, such as a failed final audit flush, fails the test) within 30 s.
async fn stop_daemon(
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), String>>,
) {
    stop.send(true)
        .expect("the daemon still listens for the stop signal");
    let exit = tokio::time::timeout(std::time::Duration::from_secs(30), server)
        .await
        .expect("the daemon did not stop within 30 s")
        .expect("the daemon task panicked");
    assert_eq!(exit, Ok(()), "the daemon's exit");
}

/// Peak resident memory of this process since the last [`reset_peak`], in bytes.
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

fn reset_peak() {
    // proc(5): writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// Issue 13 item 5: `/api/audit` answers pages, never the whole store. Over 100k rows: no
/// `limit` gives 100 rows and a `next`; `limit` above 1,000 (or 0) and a foreign cursor are a
/// 400; following `next` returns every row exactly once, newest first, for an admin (who sees
/// all) and for a caller who may read one row in 50 (short pages within the scan budget still
/// carry `next`); the answer is streamed (no Content-Length) and the process's peak memory
/// stays bounded. Before: one request returned every row (125 MB, 1.29 GB RSS for 100k).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_bounded_streamed_and_complete() {
    const ROWS: usize = 100_000;
    let demo_daemon::Built {
        dir: _dir,
        addr,
        daemon: built,
    } = demo_daemon::build().await;
    let port = addr.port();
    let audit = built.audit.clone();
    // 100k decisions: one in 50 is alice's; ~600 bytes each, ~80 MB as one JSON answer.
    let filler = "r".repeat(500);
    let mut tickets = Vec::new();
    for i in 0..ROWS {
        let mut r =
            toolgate::audit::Record::new(toolgate::audit::Kind::Mcp, toolgate::audit::Effect::Deny);
        r.principal = if i % 50 == 0 {
            "alice@example.com".into()
        } else {
            format!("user{}@example.com", i % 7)
        };
        r.server = "github".into();
        r.method = "tools/call".into();
        r.tool = "search_repositories".into();
        r.reason = format!("{i} {filler}");
        r.outcome = "denied".into();
        tickets.push(audit.submit(r).unwrap());
        if tickets.len() >= 1000 {
            for t in tickets.drain(..) {
                t.wait().await.unwrap();
            }
        }
    }
    for t in tickets.drain(..) {
        t.wait().await.unwrap();
    }
    let (stop, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(daemon::run(built, rx));
    let base = format!("http://127.0.0.1:{port}");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    demo_daemon::wait_listening(addr).await;
    let carol = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, 5]))
        .build()
        .unwrap();
    let page = |client: reqwest::Client, url: String| async move {
        let r = client.get(url).send().await.unwrap();
        let status = r.status().as_u16();
        let streamed = r.content_length().is_none();
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
        (status, streamed, v)
    };

    reset_peak();
    let before = peak_rss();
    // No limit: the default page.
    let (s, streamed, v) = page(carol.clone(), format!("{base}/api/audit?kind=mcp")).await;
    assert_eq!(s, 200, "{v}");
    assert!(streamed, "the answer is streamed");
    assert_eq!(v["rows"].as_array().unwrap().len(), 100);
    assert!(v["next"].is_string(), "{}", v["next"]);
    assert_eq!(v["withheld"], 0);
    // The newest first.
    assert!(
        v["rows"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{} ", ROWS - 1))
    );
    // Bad paging parameters are refused, saying what is wrong.
    for (q, want) in [
        ("limit=1001", "limit: 1001 is outside 1..=1000"),
        ("limit=100000", "limit"),
        ("limit=0", "limit: 0"),
        ("cursor=12", "cursor: \"12\" is not a `next` value"),
        ("cursor=x.2026-01-01T00:00:00Z", "cursor"),
    ] {
        let (s, _, v) = page(carol.clone(), format!("{base}/api/audit?{q}")).await;
        assert_eq!(s, 400, "{q}: {v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{q}: {v}");
    }
    // Every row exactly once, following `next`.
    let mut seen = std::collections::HashSet::new();
    let mut pages = 0;
    let mut url = format!("{base}/api/audit?kind=mcp&limit=1000");
    loop {
        let (s, _, v) = page(carol.clone(), url.clone()).await;
        assert_eq!(s, 200, "{v}");
        pages += 1;
        for r in v["rows"].as_array().unwrap() {
            assert!(
                seen.insert(r["id"].as_str().unwrap().to_string()),
                "twice: {r}"
            );
        }
        match v["next"].as_str() {
            Some(n) => url = format!("{base}/api/audit?kind=mcp&limit=1000&cursor={n}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), ROWS);
    assert_eq!(pages, ROWS / 1000);
    let grown = peak_rss().saturating_sub(before);
    eprintln!(
        "paged {ROWS} rows in {pages} pages; peak RSS grew by {} MiB",
        grown / (1024 * 1024)
    );
    assert!(
        grown < 64 * 1024 * 1024,
        "peak RSS grew by {} MiB",
        grown / (1024 * 1024)
    );

    // Alice may read one row in 50: pages fill within the scan budget or stop short with a
    // `next`; together they hold each of her rows once, and nobody else's.
    let alice = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let mut mine = std::collections::HashSet::new();
    let mut withheld = 0;
    let mut short_with_next = 0;
    let mut url = format!("{base}/api/audit?kind=mcp&limit=1000");
    loop {
        let (s, _, v) = page(alice.clone(), url.clone()).await;
        assert_eq!(s, 200, "{v}");
        let rows = v["rows"].as_array().unwrap();
        for r in rows {
            assert_eq!(r["principal"], "alice@example.com");
            assert!(mine.insert(r["id"].as_str().unwrap().to_string()));
        }
        withheld += v["withheld"].as_u64().unwrap();
        match v["next"].as_str() {
            Some(n) => {
                if rows.len() < 1000 {
                    short_with_next += 1;
                }
                url = format!("{base}/api/audit?kind=mcp&limit=1000&cursor={n}");
            }
            None => break,
        }
    }
    assert_eq!(mine.len(), ROWS / 50);
    assert_eq!(withheld as usize, ROWS - ROWS / 50);
    assert!(short_with_next > 0, "the scan budget was reached");
    stop_daemon(stop, server).await;
}
