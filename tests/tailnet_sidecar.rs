//! `tailnet.mode: sidecar` without a control server:
//!
//! - joining through the LocalAPI against a small fake that speaks `start`,
//!   `login-interactive`, `status` and `watch-ipn-bus` (what `tailscale up --authkey` sends);
//! - the real tailscaled 1.96.4 (`TAILSCALED_BIN`, set by `scripts/test`) started, restarted
//!   after it dies and stopped by the supervisor. It never logs in here (no control server),
//!   always runs with `--no-logs-no-support`, and stays logged out.
//! - upstream routing: tailnet hosts go through the SOCKS5 proxy, others do not.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use toolgate::config::TailnetConfig;
use toolgate::tailnet::join::{AuthKey, JoinSettings, ensure_joined};
use toolgate::tailnet::localapi::LocalApi;
use toolgate::tailnet::sidecar::{Sidecar, SidecarSettings};

#[derive(Default)]
struct FakeState {
    backend: String,
    have_node_key: bool,
    auth_url: String,
    /// (method, path, body) of every request.
    requests: Vec<(String, String, String)>,
    /// Accept the key (→ Running) or not (stay NeedsLogin).
    accept: bool,
}

async fn handle(
    state: Arc<Mutex<FakeState>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut s = state.lock().unwrap();
    s.requests.push((
        method.clone(),
        path.clone(),
        String::from_utf8_lossy(&body).into_owned(),
    ));
    let reply = |code: u16, text: String| {
        Response::builder()
            .status(code)
            .body(Full::new(Bytes::from(text)))
            .unwrap()
    };
    Ok(match (method.as_str(), path.as_str()) {
        ("GET", "/localapi/v0/status") => {
            let running = s.backend == "Running";
            reply(
                200,
                json!({
                    "Version": "1.96.4", "TUN": false, "BackendState": s.backend,
                    "HaveNodeKey": s.have_node_key, "AuthURL": s.auth_url,
                    "TailscaleIPs": if running { json!(["100.64.0.9"]) } else { Value::Null },
                    "Self": {"ID": "n1", "HostName": "toolgate", "DNSName": if running { "toolgate.lab.ts.net." } else { "" }},
                    "CurrentTailnet": if running { json!({"Name": "lab.ts.net", "MagicDNSSuffix": "lab.ts.net", "MagicDNSEnabled": true}) } else { Value::Null },
                })
                .to_string()
                    + "\n",
            )
        }
        ("POST", "/localapi/v0/start") => reply(204, String::new()),
        ("POST", "/localapi/v0/login-interactive") => {
            let opts: Value = s
                .requests
                .iter()
                .rev()
                .find(|r| r.1 == "/localapi/v0/start")
                .and_then(|r| serde_json::from_str(&r.2).ok())
                .unwrap_or_default();
            if opts["AuthKey"].as_str().unwrap_or("").is_empty() {
                s.auth_url = "http://127.0.0.1:8080/a/xyz".into();
            } else if s.accept {
                s.backend = "Running".into();
                s.have_node_key = true;
            }
            reply(204, String::new())
        }
        ("GET", "/localapi/v0/watch-ipn-bus") => {
            // One initial-state line; the stream then ends (the client copes).
            reply(
                200,
                format!(
                    "{{\"State\":{}}}\n",
                    if s.backend == "Running" { 6 } else { 2 }
                ),
            )
        }
        _ => reply(404, "404 page not found\n".into()),
    })
}

async fn fake(accept: bool) -> (tempfile::TempDir, PathBuf, Arc<Mutex<FakeState>>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ts.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let state = Arc::new(Mutex::new(FakeState {
        backend: "NeedsLogin".into(),
        accept,
        ..FakeState::default()
    }));
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| handle(st.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    (dir, sock, state)
}

fn settings(key: Option<&str>) -> JoinSettings {
    JoinSettings {
        hostname: "toolgate".into(),
        tags: vec!["tag:toolgate".into()],
        control_url: Some("http://127.0.0.1:8080".into()),
        authkey: key.and_then(AuthKey::new),
    }
}

#[tokio::test]
async fn joins_with_the_auth_key_like_tailscale_up() {
    let (_dir, sock, state) = fake(true).await;
    let api = LocalApi::unix(&sock);
    let (_tx, mut rx) = tokio::sync::watch::channel(false);
    let st = tokio::time::timeout(
        Duration::from_secs(10),
        ensure_joined(&api, &settings(Some("rsk_secret")), &mut rx),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(st.is_running());
    let s = state.lock().unwrap();
    let posts: Vec<&(String, String, String)> =
        s.requests.iter().filter(|r| r.0 == "POST").collect();
    assert_eq!(posts.len(), 2, "{posts:?}");
    assert_eq!(posts[0].1, "/localapi/v0/start");
    assert_eq!(posts[1].1, "/localapi/v0/login-interactive");
    let opts: Value = serde_json::from_str(&posts[0].2).unwrap();
    assert_eq!(opts["AuthKey"], "rsk_secret");
    let p = &opts["UpdatePrefs"];
    assert_eq!(p["ControlURL"], "http://127.0.0.1:8080");
    assert_eq!(p["Hostname"], "toolgate");
    assert_eq!(p["AdvertiseTags"], json!(["tag:toolgate"]));
    assert_eq!(p["WantRunning"], true);
}

#[tokio::test]
async fn without_a_key_it_asks_for_a_login_url_and_waits() {
    let (_dir, sock, state) = fake(true).await;
    let api = LocalApi::unix(&sock);
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let join = tokio::spawn(async move { ensure_joined(&api, &settings(None), &mut rx).await });
    // It asked for a login URL, then went on polling the status (waiting, not giving up).
    wait_requests(&state, "a status poll after the login request", |paths| {
        paths
            .iter()
            .skip_while(|p| *p != "/localapi/v0/login-interactive")
            .any(|p| *p == "/localapi/v0/status")
    })
    .await;
    assert!(!join.is_finished(), "it waits for the login");
    {
        let s = state.lock().unwrap();
        assert_eq!(s.backend, "NeedsLogin");
        assert_eq!(s.auth_url, "http://127.0.0.1:8080/a/xyz");
        let start = s
            .requests
            .iter()
            .find(|r| r.1 == "/localapi/v0/start")
            .unwrap();
        let opts: Value = serde_json::from_str(&start.2).unwrap();
        assert_eq!(opts["AuthKey"], "");
    }
    // Completing the login elsewhere (the operator opened the URL) lets it go on.
    state.lock().unwrap().backend = "Running".into();
    let st = tokio::time::timeout(Duration::from_secs(5), join)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(st.is_running());
    drop(tx);
}

#[tokio::test]
async fn a_rejected_key_is_retried_with_backoff_and_shutdown_ends_the_wait() {
    let (_dir, sock, state) = fake(false).await;
    let api = LocalApi::unix(&sock);
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let join =
        tokio::spawn(async move { ensure_joined(&api, &settings(Some("rsk_bad")), &mut rx).await });
    // It is retried: a second `start`.
    let paths = wait_requests(&state, "a second login attempt", |paths| {
        paths.iter().filter(|p| *p == "/localapi/v0/start").count() >= 2
    })
    .await;
    // With a backoff, not in a hot loop: between the first attempt and the second, the loop
    // polled the status and did not log in (the backoff, 2 s, outlasts one 1 s tick), so at
    // least three status requests lie between them (the idle poll, the poll that found the
    // retry due, and the login's own). A retry without a backoff has two.
    let first_done = paths
        .iter()
        .position(|p| p == "/localapi/v0/login-interactive")
        .unwrap();
    let second_start = paths
        .iter()
        .enumerate()
        .filter(|(_, p)| *p == "/localapi/v0/start")
        .nth(1)
        .unwrap()
        .0;
    let polls = paths[first_done..second_start]
        .iter()
        .filter(|p| *p == "/localapi/v0/status")
        .count();
    assert!(
        polls >= 3,
        "{polls} status polls between attempts: {paths:?}"
    );
    tx.send(true).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), join)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_err());
}

/// Polls the fake's request log (paths, in order) until `done` holds; returns it (10 s deadline).
async fn wait_requests(
    state: &Arc<Mutex<FakeState>>,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let paths: Vec<String> = state
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|r| r.1.clone())
            .collect();
        if done(&paths) {
            return paths;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 10 s; requests: {paths:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The real tailscaled, or `None` after a SKIPPED line (a failure under
/// `TOOLGATE_REQUIRE_PEERS=1`).
fn tailscaled_bin(test: &str) -> Option<PathBuf> {
    match std::env::var_os("TAILSCALED_BIN") {
        Some(p) if !p.is_empty() && std::path::Path::new(&p).is_file() => Some(PathBuf::from(p)),
        other => {
            support::peers::missing(
                test,
                "tailscaled",
                &format!("TAILSCALED_BIN is {other:?}, not a file (scripts/test sets it)"),
                "scripts/peers-tailscale tailscaled (then TAILSCALED_BIN=that path)",
            );
            None
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_real_tailscaled_is_supervised_restarted_and_stopped() {
    let Some(bin) = tailscaled_bin("the_real_tailscaled_is_supervised_restarted_and_stopped")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socks = format!("127.0.0.1:{}", free_port());
    let cfg = TailnetConfig {
        tailscaled: bin,
        state_dir: dir.path().join("state"),
        socks5: socks.parse().ok(),
        ..TailnetConfig::default()
    };
    let mut settings = SidecarSettings::from_config(&cfg);
    settings.backoff_min = Duration::from_millis(100);
    assert!(settings.args().iter().any(|a| a == "--no-logs-no-support"));
    let sc = Sidecar::start(settings).await.unwrap();
    let api = sc.localapi();
    let st = api.status().await.unwrap();
    assert_eq!(st.backend_state.as_str(), "NeedsLogin");
    assert!(!st.tun, "userspace networking");
    // Its SOCKS5 listener is up.
    assert!(tokio::net::TcpStream::connect(&socks).await.is_ok());
    let pid = sc.pid().unwrap();
    // Kill it: the supervisor starts a new one.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while sc.starts() < 2 || sc.pid().is_none() {
        assert!(std::time::Instant::now() < deadline, "not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sc.wait_ready(Duration::from_secs(15)).await.unwrap();
    let pid2 = sc.pid().unwrap();
    assert_ne!(pid, pid2);
    assert!(api.status().await.is_ok());
    sc.stop().await;
    assert!(
        !pid_alive(pid2),
        "tailscaled {pid2} still running after stop"
    );
    let log = std::fs::read_to_string(dir.path().join("state/tailscaled.log")).unwrap();
    assert!(log.contains("no-logs-no-support") || !log.is_empty());
}

#[tokio::test]
async fn a_missing_binary_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TailnetConfig {
        tailscaled: dir.path().join("no-such-tailscaled"),
        state_dir: dir.path().join("state"),
        ..TailnetConfig::default()
    };
    let e = Sidecar::start(SidecarSettings::from_config(&cfg))
        .await
        .unwrap_err();
    assert!(e.contains("tailnet.tailscaled"), "{e}");
}

#[test]
fn tailnet_hosts_go_through_the_proxy() {
    use toolgate::gateway::is_tailnet_host;
    assert!(is_tailnet_host("mcp-github.tail1234.ts.net", None));
    assert!(is_tailnet_host("mcp.lab.ts.net.", None));
    assert!(is_tailnet_host("100.64.0.5", None));
    assert!(is_tailnet_host("[fd7a:115c:a1e0::5]", None));
    assert!(is_tailnet_host("mcp.corp.example", Some("corp.example")));
    assert!(!is_tailnet_host("corp.example", Some("corp.example")));
    assert!(!is_tailnet_host("127.0.0.1", None));
    assert!(!is_tailnet_host("api.github.com", None));
    assert!(!is_tailnet_host("evilts.net", None));
    assert!(!is_tailnet_host("10.0.0.1", Some("")));
}

/// A tailnet upstream URL is dialed through the SOCKS5 listener: a tiny SOCKS5 server
/// records the CONNECT target (the MagicDNS name, unresolved: socks5h) and relays to a local
/// HTTP server; a non-tailnet host is dialed directly.
#[tokio::test]
async fn upstream_requests_to_tailnet_hosts_use_socks5h() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = http.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = c.read(&mut buf).await;
                let _ = c
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let socks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socks_addr = socks.local_addr().unwrap();
    let targets: Arc<Mutex<Vec<String>>> = Arc::default();
    let t2 = targets.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = socks.accept().await else {
                return;
            };
            let t2 = t2.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 2];
                c.read_exact(&mut b).await.unwrap();
                let mut m = vec![0u8; usize::from(b[1])];
                c.read_exact(&mut m).await.unwrap();
                c.write_all(&[5, 0]).await.unwrap();
                let mut h = [0u8; 4];
                c.read_exact(&mut h).await.unwrap();
                let target = match h[3] {
                    3 => {
                        let mut l = [0u8; 1];
                        c.read_exact(&mut l).await.unwrap();
                        let mut n = vec![0u8; usize::from(l[0])];
                        c.read_exact(&mut n).await.unwrap();
                        String::from_utf8(n).unwrap()
                    }
                    1 => {
                        let mut a = [0u8; 4];
                        c.read_exact(&mut a).await.unwrap();
                        std::net::Ipv4Addr::from(a).to_string()
                    }
                    other => panic!("address type {other}"),
                };
                let mut p = [0u8; 2];
                c.read_exact(&mut p).await.unwrap();
                t2.lock()
                    .unwrap()
                    .push(format!("{target}:{}", u16::from_be_bytes(p)));
                c.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0])
                    .await
                    .unwrap();
                let mut up = tokio::net::TcpStream::connect(http_addr).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    });
    let client = toolgate::gateway::http_client_via(Some(toolgate::gateway::TailnetProxy {
        socks5: socks_addr,
        magic_dns_suffix: Some("lab.ts.net".into()),
    }))
    .unwrap();
    let r = client
        .get("http://mcp-github.lab.ts.net/mcp")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(
        targets.lock().unwrap().as_slice(),
        ["mcp-github.lab.ts.net:80"]
    );
    // Not a tailnet host: straight to the server, the proxy sees nothing new.
    let r = client
        .get(format!("http://{http_addr}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(targets.lock().unwrap().len(), 1);
}
