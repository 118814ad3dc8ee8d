//! `GET /api/audit` is the audit query as JSON, authorized row by row by policy
//! (`toolgate_audit`/`read`): people see their own rows, admins see all.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde_json::{Value, json};
use toolgate::{config::Config, daemon, demo, sample};

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
    let _ = toolgate::gateway::http_client();
    let dir = tempfile::tempdir().unwrap();
    let up = sample::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(sample::Counters::default()),
    )
    .await
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg_path = demo::write_files(dir.path(), port, up).unwrap();
    let ids = format!(
        "{}\n\"127.0.0.5\":\n  login: carol@example.com\n  node: carol.example.ts.net\n  caps: [{{roles: [admin]}}]\n",
        demo::IDENTITIES
    );
    std::fs::write(dir.path().join("identities.yaml"), ids).unwrap();
    let cfg = Config::load(&cfg_path).unwrap();
    let listen = daemon::resolve_listen(&cfg, &[]).unwrap();
    let identify = daemon::static_provider(&cfg, &listen).unwrap();
    let built = daemon::build(cfg, identify, &daemon::NodeInfo::default(), listen, None).unwrap();
    let audit = built.audit.clone();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(daemon::run(built, rx));
    let base = format!("http://127.0.0.1:{port}");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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
    let _ = stop.send(true);
    let _ = server.await;
}
