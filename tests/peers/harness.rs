//! Shared harness of the gateway end-to-end tests (`#[path = "peers/harness.rs"] mod harness;`
//! in tests/mcp_peers.rs, tests/bad_inputs.rs and tests/audit_join.rs).
//!
//! - [`Gateway`]: toolgate started in process the way `toolgate serve` starts it
//!   (`daemon::build` + `daemon::run`), on `127.0.0.1:<free port>`, with the static identity
//!   provider (one identity per loopback source address, [`IDENTITIES`]), the fixture policies in
//!   tests/peers/policies/ and the real SQLite audit store in sync mode with `arguments: full`.
//! - [`CountingUpstream`]: the built-in sample MCP server (`toolgate::sample`) behind a layer
//!   that counts every HTTP request it receives, whatever the method.
//! - [`raw`]: a raw HTTP/1.1 exchange from a chosen source address, for inputs no well-behaved
//!   client library sends.
//! - [`Proc`]: a child process stopped by pid on drop.
//!
//! Everything is on 127.0.0.0/8 and every wait is bounded.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use toolgate::audit::{AuditLog, Row};
use toolgate::config::Config;
use toolgate::daemon;
use toolgate::sample;

/// The static identity fixture: source IP → identity (DESIGN.md §5). 127.0.0.9 has none.
pub const IDENTITIES: &str = r#"
"127.0.0.2": {login: alice@example.com, display_name: Alice, node: alice-laptop.example.ts.net, node_id: nALICE, caps: [{roles: [developer]}]}
"127.0.0.3": {login: bob@example.com, display_name: Bob, node: bob-desktop.example.ts.net, node_id: nBOB}
"127.0.0.4": {node: ci-runner.example.ts.net, node_id: nCI, tags: ["tag:ci"]}
"#;

pub const ALICE: &str = "127.0.0.2";
pub const BOB: &str = "127.0.0.3";
pub const CI: &str = "127.0.0.4";
pub const NOBODY: &str = "127.0.0.9";

pub fn principal_of(ip: &str) -> &'static str {
    match ip {
        ALICE => "alice@example.com",
        BOB => "bob@example.com",
        CI => "ci-runner.example.ts.net",
        _ => "",
    }
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_port(addr: SocketAddr, within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{addr} did not accept connections within {within:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sample upstream, counting every HTTP request that reaches it.
pub struct CountingUpstream {
    pub addr: SocketAddr,
    pub counters: Arc<sample::Counters>,
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingUpstream {
    pub async fn start() -> CountingUpstream {
        let counters = Arc::new(sample::Counters::default());
        let requests = Arc::new(AtomicU64::new(0));
        let seen = requests.clone();
        let app = sample::router(counters.clone()).layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                seen.fetch_add(1, Ordering::SeqCst);
                async move { next.run(req).await }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CountingUpstream {
            addr,
            counters,
            requests,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    /// Every HTTP request the upstream received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Tool calls the upstream executed so far.
    pub fn tool_calls(&self) -> u64 {
        self.counters.tool_calls.load(Ordering::SeqCst)
    }

    /// (tool, canonical arguments) of every executed call.
    pub fn executed(&self) -> Vec<(String, String)> {
        self.counters.executed.lock().unwrap().clone()
    }
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// toolgate, in process, as `toolgate serve` builds it.
pub struct Gateway {
    pub addr: SocketAddr,
    pub db: PathBuf,
    pub audit: AuditLog,
    pub gateway: Arc<toolgate::gateway::Gateway>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), String>>,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts the gateway with `servers` (name → upstream URL) and extra `audit:` keys.
    pub async fn start(servers: &[(&str, String)], audit_extra: &str) -> Gateway {
        let servers: Vec<(&str, String)> = servers
            .iter()
            .map(|(name, url)| (*name, format!("{{url: \"{url}\", timeout: 20s}}")))
            .collect();
        Gateway::start_configured(&servers, audit_extra).await
    }

    /// Starts the gateway with `servers` (name → its `servers.<name>` YAML flow mapping).
    pub async fn start_configured(servers: &[(&str, String)], audit_extra: &str) -> Gateway {
        let mut yaml = String::new();
        for (name, server) in servers {
            yaml.push_str(&format!("  {name}: {server}\n"));
        }
        Gateway::start_with(
            &repo_root().join("tests/peers/policies"),
            &yaml,
            &format!("audit:\n  sqlite: audit.db\n  mode: sync\n  arguments: full\n{audit_extra}"),
        )
        .await
    }

    /// Starts the gateway with policies from `policies`, `servers_yaml` (entries under
    /// `servers:`, indented two spaces) and `extra` top-level YAML (which must hold `audit:`).
    /// stdio children are launched by the built `toolgate` binary.
    pub async fn start_with(policies: &Path, servers_yaml: &str, extra: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("identities.yaml"), IDENTITIES).unwrap();
        let port = free_port();
        let mut cfg = format!(
            "listen: [\"127.0.0.1:{port}\"]\ntls: off\nidentity:\n  provider: static\n  static: identities.yaml\n\
             policies:\n  dir: {}\n  watch: false\nservers:\n{servers_yaml}",
            policies.display()
        );
        if !extra.contains("launcher:") {
            if let Some(bin) = option_env!("CARGO_BIN_EXE_toolgate") {
                if extra.contains("stdio:") {
                    panic!("give stdio.launcher yourself when the extra YAML has a stdio: section");
                }
                cfg.push_str(&format!("stdio:\n  launcher: {bin}\n"));
            }
        }
        cfg.push_str(extra);
        let path = dir.path().join("toolgate.yaml");
        std::fs::write(&path, &cfg).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{cfg}"));
        let db = config.audit.sqlite.clone();
        let listen = daemon::resolve_listen(&config, &[]).unwrap();
        let identify = daemon::static_provider(&config, &listen).unwrap();
        let built =
            daemon::build(config, identify, &daemon::NodeInfo::default(), listen, None).unwrap();
        let audit = built.audit.clone();
        let gateway = built.gateway.clone();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(daemon::run(built, rx));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_port(addr, Duration::from_secs(10)).await.unwrap();
        Gateway {
            addr,
            db,
            audit,
            gateway,
            stop,
            task,
            dir,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every decision row so far (after flushing the writer), oldest first.
    pub async fn rows(&self) -> Vec<Row> {
        tokio::time::timeout(Duration::from_secs(10), self.audit.flush())
            .await
            .expect("audit flush timed out")
            .unwrap();
        toolgate::audit::query::query(&self.db, &toolgate::audit::query::Filter::default()).unwrap()
    }

    /// The decision row with this id.
    pub async fn row(&self, id: &str) -> Option<Row> {
        self.rows().await.into_iter().find(|r| r.id == id)
    }

    /// Stops the listeners and waits (bounded) for the server task.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.audit.flush()).await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// A reqwest client whose connections come from `ip` (its identity).
pub fn client_from(ip: &str) -> reqwest::Client {
    let _ = toolgate::gateway::http_client();
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// One raw HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn decision(&self) -> String {
        self.header("toolgate-decision-id")
            .unwrap_or("")
            .to_string()
    }
}

/// Connects from `from` to `to`, writes `request`, reads the response until the connection
/// closes (send `Connection: close`), all within `within`.
pub async fn raw(
    from: &str,
    to: SocketAddr,
    request: &[u8],
    within: Duration,
) -> Result<RawResponse, String> {
    let work = async {
        let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        sock.bind(SocketAddr::new(from.parse().map_err(|_| "bad ip")?, 0))
            .map_err(|e| e.to_string())?;
        let stream = sock.connect(to).await.map_err(|e| e.to_string())?;
        let (mut rd, mut wr) = stream.into_split();
        // Write and read at once: a server may answer (413, 408) and close before it has read
        // everything we send, and a reset after a complete response is not an error here.
        let request = request.to_vec();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&request).await;
            wr
        });
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        writer.abort();
        parse_response(&buf)
    };
    tokio::time::timeout(within, work)
        .await
        .map_err(|_| format!("no complete response within {within:?}"))?
}

/// Parses one HTTP/1.1 response (Content-Length or chunked or until close).
pub fn parse_response(buf: &[u8]) -> Result<RawResponse, String> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no response head in {} bytes", buf.len()))?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(nl) = rest[i..].windows(2).position(|w| w == b"\r\n") {
            let size_text = std::str::from_utf8(&rest[i..i + nl]).unwrap_or("0");
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
                .unwrap_or(0);
            i += nl + 2;
            if size == 0 || i + size > rest.len() {
                break;
            }
            out.extend_from_slice(&rest[i..i + size]);
            i += size + 2;
        }
        out
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// A POST to `path` with `headers` (name, value) and `body`; adds Host, Content-Length and
/// `Connection: close`.
pub fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The headers of a well-formed handshake-era JSON-RPC POST.
pub const JSON_HEADERS: [(&str, &str); 2] = [
    ("Content-Type", "application/json"),
    ("Accept", "application/json, text/event-stream"),
];

/// A child process stopped by pid (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Option<std::process::Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut std::process::Command) -> Proc {
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `Some(status)` if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `Child::kill` signals exactly this child's pid.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
