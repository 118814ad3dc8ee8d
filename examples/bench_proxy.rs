//! The proxy benchmark (issue 14 part 6): what a `tools/call` through toolgate costs next to
//! nginx `proxy_pass` and next to calling the upstream directly. Not part of the product:
//! `scripts/bench-proxy` builds it in release and runs it pinned to the second core, with the
//! proxies pinned to the first.
//!
//! ```text
//! bench_proxy            # the benchmark (env: TOOLGATE_BIN, ROUNDS=5, SECONDS=3, CONNS="1 32",
//!                        #   PROXY_CPU=0, GEN_CPU=1, NGINX_BIN)
//! bench_proxy upstream   # (the upstream) a tiny HTTP/1.1 JSON-RPC echo; prints its port
//! bench_proxy floor PORT # (a proxy) hyper server + hyper's pooled client, bytes unchanged
//!                        #   to 127.0.0.1:PORT; prints its port
//! bench_proxy floor-full PORT | floor-normal PORT
//!                        # (a proxy) the floor plus the least audit a gateway must write:
//!                        #   a decision row committed before forwarding, an outcome row
//!                        #   after (SQLite WAL, synchronous FULL or NORMAL, group commit)
//! bench_proxy noaudit PORT
//!                        # (a proxy) toolgate's own request path (server, identity, parse,
//!                        #   policy, forward, answer check) with a null audit sink
//! bench_proxy load ADDR CONNS SECONDS [PID]
//!                        # (profiling) load one running proxy; with PID, its CPU per call
//!                        #   and each of its threads' (from /proc/PID/task); env CALLS=N
//!                        #   stops after N calls (the warm-up's and the run's each)
//! ```
//!
//! The load generator is one thread (tokio, current-thread) holding N keep-alive HTTP/1.1
//! connections, each sending the next `tools/call` as soon as the last answer arrived. The
//! upstream is its own process on the generator's core and answers each call with a fixed
//! result carrying the call's id. Paths, interleaved in every round (their order rotates):
//! `direct` (generator → upstream), `nginx` (`proxy_pass`, keep-alive to the upstream, one
//! worker), `toolgate full` and `toolgate normal` (static identity, one policy allowing the
//! call, sync audit, `durability: full` (the default) or `normal`). Unless `FLOORS=0`, two
//! more proxies on the proxies' core show where toolgate's cost is: `floor` (the HTTP stack
//! toolgate is built on and nothing else: hyper's server with toolgate's settings, reading the
//! body, POSTing the same bytes through hyper's pooled client, reading the answer, answering
//! it; no JSON, no policy, no audit), `floor+audit full` and `floor+audit normal` (the floor
//! plus the least audit a gateway that records before it forwards must write: two lean rows
//! per call, the decision's committed before the call goes upstream, on one group-committing
//! writer thread; see [`FloorAudit`]) and `toolgate noaudit` (toolgate's request path, axum,
//! identity, JSON-RPC parse, policy, forward and answer check included, with an audit sink
//! that keeps nothing: the cost of everything but the audit rows). Per path and round:
//! calls/s, p50 and p99 of wall time per call, and CPU per call of the proxy's processes and of
//! the upstream from `/proc/<pid>/stat`. The summary is the median over rounds, with the spread.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark tool"
)]

/// The shipped binary's allocator (src/main.rs), so the floor and noaudit servers allocate as
/// toolgate does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "bench_common/mod.rs"]
mod bench_common;

use bench_common::{cpu_us, env_u64, free_port, median, pct, spread};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `pid` and its direct children (nginx's workers).
fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let text = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let tail = text.rsplit_once(')').map(|(_, t)| t).unwrap_or_default();
            if tail.split_whitespace().nth(1) == Some(&pid.to_string()) {
                out.push(p);
            }
        }
    }
    out
}

fn cpu_of(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_us(*p)).sum()
}

// ---------------------------------------------------------------------------------------------
// The upstream: HTTP/1.1 keep-alive, one JSON-RPC answer per POST.

/// The value after `"id":` in a JSON-RPC request (a number here), as written.
fn id_of(body: &[u8]) -> &[u8] {
    let key = b"\"id\":";
    let Some(i) = body.windows(key.len()).position(|w| w == key) else {
        return b"null";
    };
    let rest = &body[i + key.len()..];
    let end = rest
        .iter()
        .position(|b| *b == b',' || *b == b'}')
        .unwrap_or(rest.len());
    &rest[..end]
}

/// Splits one HTTP/1.1 request off `buf`: (bytes used, body range), if complete.
fn request_in(buf: &[u8]) -> Option<(usize, std::ops::Range<usize>)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some((head_end + len, head_end..head_end + len))
}

async fn upstream_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    let mut out = Vec::with_capacity(512);
    loop {
        while let Some((used, body)) = request_in(&buf) {
            let id = id_of(&buf[body]).to_vec();
            let mut answer = Vec::with_capacity(128);
            answer.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
            answer.extend_from_slice(&id);
            answer.extend_from_slice(
                b",\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"hello\"}]}}",
            );
            out.clear();
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                answer.len()
            )
            .unwrap();
            out.extend_from_slice(&answer);
            if s.write_all(&out).await.is_err() {
                return;
            }
            buf.drain(..used);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn upstream_main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = bench_common::announced_listener().await;
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(upstream_conn(s));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The load generator.

fn call(i: u64, host: &str) -> Vec<u8> {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"echo","arguments":{{"message":"hello","n":{i}}}}}}}"#
    );
    format!(
        "POST /mcp/echo HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends calls on one connection until `until` or `max` calls; returns each call's wall time (µs).
async fn client(
    addr: SocketAddr,
    host: String,
    until: Instant,
    start_id: u64,
    max: u64,
) -> Vec<u32> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut times = Vec::with_capacity(100_000);
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    let mut i = start_id;
    while Instant::now() < until && i - start_id < max {
        i += 1;
        let req = call(i, &host);
        let t = Instant::now();
        s.write_all(&req).await.unwrap();
        buf.clear();
        let (status, body) = loop {
            if let Some((used, body)) = response_in(&buf) {
                let status = std::str::from_utf8(&buf[9..12]).unwrap_or("0").to_string();
                let b = buf[body].to_vec();
                buf.drain(..used);
                break (status, b);
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed by {addr}");
            buf.extend_from_slice(&chunk[..n]);
        };
        times.push(t.elapsed().as_micros() as u32);
        assert!(
            status == "200" && body.windows(5).any(|w| w == b"hello"),
            "{addr}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    times
}

/// Splits one HTTP/1.1 response (Content-Length framed) off `buf`.
fn response_in(buf: &[u8]) -> Option<(usize, std::ops::Range<usize>)> {
    request_in(buf)
}

/// One path's numbers in one round.
#[derive(Debug, Clone, Copy)]
struct Round {
    rps: f64,
    p50: f64,
    p99: f64,
    /// The proxy's CPU per call (µs); 0 for direct.
    cpu: f64,
    /// The upstream's CPU per call (µs).
    up_cpu: f64,
}

async fn round(
    addr: SocketAddr,
    conns: usize,
    secs: f64,
    max: u64,
    proxy: &[u32],
    upstream: u32,
) -> Round {
    let host = format!("{addr}");
    // Warm the connections' first calls out of the measurement.
    let warm = Instant::now() + Duration::from_millis(200);
    let tasks: Vec<_> = (0..conns)
        .map(|c| tokio::spawn(client(addr, host.clone(), warm, (c as u64) << 40, max)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let cpu0 = cpu_of(proxy);
    let ucpu0 = cpu_us(upstream);
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            tokio::spawn(client(
                addr,
                host.clone(),
                until,
                (c as u64 + 64) << 40,
                max,
            ))
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_of(proxy) - cpu0) as f64;
    let ucpu = (cpu_us(upstream) - ucpu0) as f64;
    all.sort_unstable();
    let n = all.len() as f64;
    Round {
        rps: n / wall,
        p50: pct(&all, 0.5),
        p99: pct(&all, 0.99),
        cpu: cpu / n,
        up_cpu: ucpu / n,
    }
}

// ---------------------------------------------------------------------------------------------
// The proxies.

struct Proc {
    child: Child,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM to this pid (nginx's master stops its workers), SIGKILL if it lingers.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(addr: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            !matches!(child.try_wait(), Ok(Some(_))),
            "{addr}: the process exited"
        );
        assert!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pinned(cpu: &str, bin: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu).arg(bin);
    c
}

/// The one rule every toolgate path runs: allow `echo` for users.
const POLICY: &str = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: mcp_server\n  version: default\n  rules:\n    - actions: [\"tools/list::echo\", \"tools/call::echo\"]\n      effect: EFFECT_ALLOW\n      roles: [user]\n";
/// The load generator's identity (static provider).
const IDS: &str =
    "\"127.0.0.1\": {login: bench@example.com, node: bench.example.ts.net, node_id: nB}\n";

fn start_toolgate(
    bin: &Path,
    cpu: &str,
    upstream: SocketAddr,
    durability: &str,
) -> (Proc, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("policies")).unwrap();
    std::fs::write(d.join("policies/echo.yaml"), POLICY).unwrap();
    std::fs::write(d.join("ids.yaml"), IDS).unwrap();
    let port = free_port();
    let cfg = format!(
        "listen: [\"127.0.0.1:{port}\"]\ntls: off\nlog: {{level: warn, format: text}}\nidentity: {{provider: static, static: ids.yaml}}\npolicies: {{dir: policies, watch: false}}\n\
         audit: {{sqlite: audit.db, mode: sync, durability: {durability}}}\nservers:\n  echo: {{url: \"http://{upstream}/mcp\"}}\n"
    );
    std::fs::write(d.join("toolgate.yaml"), cfg).unwrap();
    let mut child = pinned(cpu, bin)
        .args(["serve", "--config"])
        .arg(d.join("toolgate.yaml"))
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, &mut child);
    (
        Proc {
            child,
            _dir: Some(dir),
        },
        addr,
    )
}

fn start_nginx(bin: &Path, cpu: &str, upstream: SocketAddr) -> (Proc, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let port = free_port();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n  upstream up {{ server {upstream}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n    location /mcp/ {{\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n      proxy_pass http://up/mcp/;\n    }}\n  }}\n}}\n",
        p = p.display()
    );
    std::fs::write(p.join("nginx.conf"), conf).unwrap();
    let mut child = pinned(cpu, bin)
        .arg("-e")
        .arg(p.join("error.log"))
        .arg("-p")
        .arg(p)
        .arg("-c")
        .arg(p.join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, &mut child);
    (
        Proc {
            child,
            _dir: Some(dir),
        },
        addr,
    )
}

/// `bench_proxy floor|noaudit PORT`, pinned like the other proxies; its address.
fn start_sub(me: &Path, cpu: &str, mode: &str, upstream: SocketAddr) -> (Proc, SocketAddr) {
    let mut child = pinned(cpu, me)
        .arg(mode)
        .arg(upstream.port().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = bench_common::printed_addr(&mut child);
    wait_listening(addr, &mut child);
    (Proc { child, _dir: None }, addr)
}

/// A runtime like `toolgate serve`'s (multi-thread; one worker when pinned to one core).
fn proxy_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The floor: the HTTP stack toolgate is built on, doing nothing else. hyper's server
/// (`auto::Builder`, HTTP/1 with a header read timeout, as `server.rs`), the request body read
/// whole, POSTed unchanged through hyper's pooled HTTP/1.1 client (as `mcp/transport.rs`: nodelay,
/// 256 idle per host, 90 s), the answer read whole and sent back.
fn floor_main(port: u16, audit: Option<FloorAudit>) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

    let audit = audit.map(std::sync::Arc::new);
    let rt = proxy_runtime();
    rt.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(256)
                .build(connector);
        let uri: hyper::Uri = format!("http://127.0.0.1:{port}/mcp").parse().unwrap();
        let l = bench_common::announced_listener().await;
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            let client = client.clone();
            let uri = uri.clone();
            let audit = audit.clone();
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let client = client.clone();
                    let uri = uri.clone();
                    let audit = audit.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let started = Instant::now();
                        let decision = match &audit {
                            Some(a) => Some(a.decide(&body).await),
                            None => None,
                        };
                        let mut up = hyper::Request::new(Full::new(body));
                        *up.method_mut() = hyper::Method::POST;
                        *up.uri_mut() = uri;
                        up.headers_mut().insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        let resp = client.request(up).await.unwrap();
                        let answer = resp.into_body().collect().await?.to_bytes();
                        if let (Some(a), Some(seq)) = (&audit, decision) {
                            a.outcome(seq, started.elapsed().as_micros() as i64);
                        }
                        let mut r = hyper::Response::new(Full::new(answer));
                        r.headers_mut().insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, hyper::Error>(r)
                    }
                });
            tokio::spawn(async move {
                let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                b.http1()
                    .header_read_timeout(Duration::from_secs(10))
                    .timer(TokioTimer::new());
                let _ = b
                    .serve_connection_with_upgrades(TokioIo::new(s), service)
                    .await;
            });
        }
    });
}

/// The least a gateway that audits before it forwards must write, for [`floor_main`]: per call,
/// a decision row committed before the call goes upstream (its `seq` is the outcome's key) and
/// an outcome row after the answer that rides the next commit. One writer thread, group
/// commit (it yields once, then drains what queued), statements prepared once, the rows chained
/// by SHA-256 with the head kept in `meta` on every commit, outcome rows buffered without waking
/// the writer (as toolgate's), and only the indexes the queries
/// need (time; principal, time; tool, time; denies). No lookups, no JSON, no explain trace:
/// each row is eight integers and blobs. `synchronous` is `FULL` or `NORMAL`. Checkpoints run
/// on their own thread, as toolgate's. `FLOOR_INDEXES=0` drops the indexes and the chain head
/// too (a bare two-row append per call); `FLOOR_YIELD=0` drains the queue without first
/// yielding the core (smaller commits that can overlap one another's fsync).
struct FloorAudit {
    tx: std::sync::mpsc::Sender<FloorRow>,
    /// Outcome rows wait here without waking the writer (as toolgate's side buffer): they ride
    /// the next decision's commit, or the writer's 50 ms tick on an idle proxy.
    outcomes: std::sync::Arc<std::sync::Mutex<Vec<FloorRow>>>,
    _dir: tempfile::TempDir,
}

enum FloorRow {
    Decision {
        time: i64,
        digest: [u8; 32],
        done: tokio::sync::oneshot::Sender<i64>,
    },
    Outcome {
        decision: i64,
        time: i64,
        latency_us: i64,
    },
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

impl FloorAudit {
    fn start(synchronous: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let (tx, rx) = std::sync::mpsc::channel();
        let outcomes = std::sync::Arc::default();
        let (sync, buffered) = (synchronous.to_string(), std::sync::Arc::clone(&outcomes));
        std::thread::Builder::new()
            .name("floor-writer".into())
            .spawn(move || floor_writer(&path, &sync, rx, &buffered))
            .unwrap();
        FloorAudit {
            tx,
            outcomes,
            _dir: dir,
        }
    }

    /// Queue the decision row and wait for its commit; its `seq`.
    async fn decide(&self, body: &[u8]) -> i64 {
        use sha2::Digest as _;
        let (done, rx) = tokio::sync::oneshot::channel();
        let digest: [u8; 32] = sha2::Sha256::digest(body).into();
        let row = FloorRow::Decision {
            time: now_us(),
            digest,
            done,
        };
        self.tx.send(row).unwrap();
        rx.await.unwrap()
    }

    /// Buffer the outcome row: never awaited, wakes nobody.
    fn outcome(&self, decision: i64, latency_us: i64) {
        let row = FloorRow::Outcome {
            decision,
            time: now_us(),
            latency_us,
        };
        self.outcomes.lock().unwrap().push(row);
    }
}

fn floor_writer(
    path: &Path,
    synchronous: &str,
    rx: std::sync::mpsc::Receiver<FloorRow>,
    outcomes: &std::sync::Mutex<Vec<FloorRow>>,
) {
    use sha2::Digest as _;
    let mut c = rusqlite::Connection::open(path).unwrap();
    // Checkpoints as toolgate's (src/audit/writer.rs): a thread of their own copies the WAL back
    // once it holds 8 MiB, so the WAL is reused rather than grown (a growing file makes every
    // FULL commit's fdatasync a journal commit too); the floor never truncates it. With
    // FLOOR_INDEXES=0 neither the indexes nor the chain head are kept.
    let indexes = env_u64("FLOOR_INDEXES", 1) != 0;
    c.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous}; PRAGMA journal_size_limit=67108864;
         PRAGMA wal_autocheckpoint=32768;
         CREATE TABLE decisions (seq INTEGER PRIMARY KEY, id BLOB NOT NULL, time INTEGER NOT NULL,
           principal INTEGER NOT NULL, tool INTEGER NOT NULL, effect INTEGER NOT NULL,
           args_digest BLOB, hash BLOB NOT NULL) STRICT;
         CREATE TABLE outcomes (seq INTEGER PRIMARY KEY, decision INTEGER NOT NULL,
           time INTEGER NOT NULL, outcome INTEGER NOT NULL, latency_us INTEGER,
           hash BLOB NOT NULL) STRICT;
         CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT;"
    ))
    .unwrap();
    if indexes {
        c.execute_batch(
            "CREATE INDEX decisions_time ON decisions (time);
             CREATE INDEX decisions_principal ON decisions (principal, time);
             CREATE INDEX decisions_tool ON decisions (tool, time);
             CREATE INDEX decisions_deny ON decisions (time) WHERE effect < 1;",
        )
        .unwrap();
    }
    let checkpoints = rusqlite::Connection::open(path).unwrap();
    let wal = path.with_extension("db-wal");
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            if std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) >= 8 << 20 {
                let _ = checkpoints.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        }
    });
    let (mut seq, mut prev) = (0i64, [0u8; 32]);
    let mut batch = Vec::new();
    let mut waiters = Vec::new();
    let yields = env_u64("FLOOR_YIELD", 1) != 0;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(first) => {
                batch.push(first);
                if yields {
                    std::thread::yield_now();
                }
                batch.extend(rx.try_iter());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        batch.append(&mut outcomes.lock().unwrap());
        if batch.is_empty() {
            continue;
        }
        let t = c.transaction().unwrap();
        {
            let mut d = t
                .prepare_cached(
                    "INSERT INTO decisions (seq, id, time, principal, tool, effect, args_digest, hash) \
                     VALUES (?1, ?2, ?3, 1, 1, 1, ?4, ?5)",
                )
                .unwrap();
            let mut o = t
                .prepare_cached(
                    "INSERT INTO outcomes (seq, decision, time, outcome, latency_us, hash) \
                     VALUES (?1, ?2, ?3, 3, ?4, ?5)",
                )
                .unwrap();
            for row in batch.drain(..) {
                seq += 1;
                let mut h = sha2::Sha256::new();
                h.update(prev);
                h.update(seq.to_be_bytes());
                match row {
                    FloorRow::Decision { time, digest, done } => {
                        let id = uuid::Uuid::now_v7();
                        h.update(id.as_bytes());
                        h.update(time.to_be_bytes());
                        h.update(digest);
                        prev = h.finalize().into();
                        d.execute(rusqlite::params![
                            seq,
                            &id.as_bytes()[..],
                            time,
                            &digest[..],
                            &prev[..]
                        ])
                        .unwrap();
                        waiters.push((done, seq));
                    }
                    FloorRow::Outcome {
                        decision,
                        time,
                        latency_us,
                    } => {
                        h.update(decision.to_be_bytes());
                        h.update(time.to_be_bytes());
                        h.update(latency_us.to_be_bytes());
                        prev = h.finalize().into();
                        o.execute(rusqlite::params![
                            seq,
                            decision,
                            time,
                            latency_us,
                            &prev[..]
                        ])
                        .unwrap();
                    }
                }
            }
            if indexes {
                t.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('head', ?1)")
                    .unwrap()
                    .execute([&prev[..]])
                    .unwrap();
            }
        }
        t.commit().unwrap();
        for (done, seq) in waiters.drain(..) {
            let _ = done.send(seq);
        }
    }
}

/// An audit sink that keeps nothing: every row "committed" at once.
struct NullSink;

impl toolgate::gateway::AuditSink for NullSink {
    fn submit(
        &self,
        _row: toolgate::gateway::AuditRow,
    ) -> Result<toolgate::gateway::Commit, toolgate::gateway::AuditUnavailable> {
        Ok(Box::pin(async { Ok(()) }))
    }
    fn outcome(&self, _id: &str, _outcome: &str, _latency_us: u64) {}
}

/// toolgate's request path without audit: the gateway `toolgate serve` builds for the bench's
/// config (static identity, the one allow rule, the echo upstream), served by `server.rs`,
/// with [`NullSink`] in place of the SQLite store.
fn noaudit_main(port: u16) {
    use std::sync::Arc;
    use toolgate::config::{Config, RoleMappings};
    use toolgate::gateway::{Gateway, Upstream};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("policies")).unwrap();
    std::fs::write(d.join("policies/echo.yaml"), POLICY).unwrap();
    let cfg_text = format!(
        "listen: [\"127.0.0.1:0\"]\ntls: off\nidentity: {{provider: static, static: ids.yaml}}\npolicies: {{dir: policies, watch: false}}\nservers:\n  echo: {{url: \"http://127.0.0.1:{port}/mcp\"}}\n"
    );
    let config = Config::parse("bench.yaml", cfg_text.as_bytes(), d).unwrap();
    let (store, res) = toolgate::policy::store::Store::open(&config.policies.dir);
    res.unwrap();
    let upstreams = config
        .servers
        .iter()
        .map(|(n, c)| {
            (
                n.clone(),
                Arc::new(Upstream::from_config(n, c, None).unwrap()),
            )
        })
        .collect();
    let budget = toolgate::budget::Budget::new(config.limits.in_flight_bytes);
    let rt = proxy_runtime();
    rt.block_on(async move {
        let gw = Arc::new(Gateway {
            config,
            budget,
            shadow: None,
            store: Arc::new(store),
            upstreams,
            http: toolgate::gateway::upstream_client().unwrap(),
            sessions: Default::default(),
            server_requests: Default::default(),
            annotations: Default::default(),
            allowed_hosts: Vec::new(),
            audit: Arc::new(NullSink),
            metrics: Default::default(),
            localapi: None,
            whois: Default::default(),
            list_watchers: Default::default(),
            known_tools: Default::default(),
            in_flight: Default::default(),
            aggregate: Default::default(),
        });
        let ids = toolgate::identity::StaticIdentities::parse("ids.yaml", IDS.as_bytes()).unwrap();
        let provider = Arc::new(toolgate::server::StaticProvider {
            identities: ids,
            mappings: RoleMappings::default(),
        });
        let l = bench_common::announced_listener().await;
        let (_tx, rx) = tokio::sync::watch::channel(false);
        toolgate::server::serve_listener(l, toolgate::server::router(gw), provider, None, rx).await;
        drop(dir);
    });
}

/// Each thread of `pid`: (name, CPU µs).
fn threads(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in d.flatten() {
            let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let text = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let tail = text.rsplit_once(')').map(|(_, t)| t).unwrap_or_default();
            let f: Vec<&str> = tail.split_whitespace().collect();
            let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            out.push((name.trim().to_string(), ticks * 10_000));
        }
    }
    out
}

/// `bench_proxy load ADDR CONNS SECONDS [PID]`: one path, for profiling.
fn load_main(args: &[String]) {
    let addr: SocketAddr = args[0].parse().unwrap();
    let conns: usize = args[1].parse().unwrap();
    let secs: f64 = args[2].parse().unwrap();
    let pid: Option<u32> = args.get(3).map(|p| p.parse().unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = pid.map(threads).unwrap_or_default();
    let x = rt.block_on(round(
        addr,
        conns,
        secs,
        env_u64("CALLS", u64::MAX) / conns as u64,
        &pid.into_iter().collect::<Vec<_>>(),
        0,
    ));
    println!(
        "{addr} conns {conns}: {:.0} calls/s  p50 {:.1} µs  p99 {:.1} µs  cpu {:.1} µs/call",
        x.rps, x.p50, x.p99, x.cpu
    );
    if let Some(pid) = pid {
        // Per thread name (tokio's workers share one): each one's share of the process's CPU
        // over the whole run (warm-up included), times the measured CPU per call.
        let mut by: std::collections::BTreeMap<String, i64> = Default::default();
        for (n, us) in threads(pid) {
            *by.entry(n).or_default() += us as i64;
        }
        for (n, us) in before {
            *by.entry(n).or_default() -= us as i64;
        }
        let total = by.values().sum::<i64>().max(1) as f64;
        for (n, us) in by {
            println!("  thread {n:<20} {:.1} µs/call", us as f64 / total * x.cpu);
        }
    }
}

fn main() {
    let me = std::env::current_exe().unwrap();
    if std::env::args().nth(1).as_deref() == Some("upstream") {
        upstream_main();
        return;
    }
    let mode = std::env::args().nth(1);
    if let Some(audit) = match mode.as_deref() {
        Some("floor") => Some(None),
        Some("floor-full") => Some(Some("FULL")),
        Some("floor-normal") => Some(Some("NORMAL")),
        _ => None,
    } {
        let port = std::env::args().nth(2).unwrap().parse().unwrap();
        floor_main(port, audit.map(FloorAudit::start));
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("noaudit") {
        noaudit_main(std::env::args().nth(2).unwrap().parse().unwrap());
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("load") {
        load_main(&std::env::args().skip(2).collect::<Vec<_>>());
        return;
    }
    let bin: PathBuf = std::env::var_os("TOOLGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/toolgate"));
    let nginx_bin = PathBuf::from(std::env::var("NGINX_BIN").unwrap_or("/usr/sbin/nginx".into()));
    let rounds = env_u64("ROUNDS", 5);
    let secs = env_u64("SECONDS", 3) as f64;
    let conns: Vec<usize> = std::env::var("CONNS")
        .unwrap_or("1 32".into())
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    let proxy_cpu = std::env::var("PROXY_CPU").unwrap_or("0".into());
    let gen_cpu = std::env::var("GEN_CPU").unwrap_or("1".into());

    // The upstream, on the generator's core.
    let mut up = pinned(&gen_cpu, &me)
        .arg("upstream")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let up_addr = bench_common::printed_addr(&mut up);
    let up_pid = up.id();
    let _up = Proc {
        child: up,
        _dir: None,
    };
    let (nginx, nginx_addr) = start_nginx(&nginx_bin, &proxy_cpu, up_addr);
    let (tg_full, full_addr) = start_toolgate(&bin, &proxy_cpu, up_addr, "full");
    let (tg_normal, normal_addr) = start_toolgate(&bin, &proxy_cpu, up_addr, "normal");
    let nginx_pids = family(nginx.child.id());
    let mut paths: Vec<(&str, SocketAddr, Vec<u32>)> = vec![
        ("direct", up_addr, vec![]),
        ("nginx", nginx_addr, nginx_pids),
        ("toolgate full", full_addr, vec![tg_full.child.id()]),
        ("toolgate normal", normal_addr, vec![tg_normal.child.id()]),
    ];
    let mut floors = Vec::new();
    if env_u64("FLOORS", 1) != 0 {
        for (name, mode) in [
            ("floor", "floor"),
            ("floor+audit full", "floor-full"),
            ("floor+audit normal", "floor-normal"),
            ("toolgate noaudit", "noaudit"),
        ] {
            let (p, addr) = start_sub(&me, &proxy_cpu, mode, up_addr);
            paths.push((name, addr, vec![p.child.id()]));
            floors.push(p);
        }
    }
    println!(
        "proxies on cpu {proxy_cpu}; generator and upstream on cpu {gen_cpu}; {rounds} rounds of {secs} s per path and connection count"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // results[conns][path] = rounds
    let mut results: Vec<Vec<Vec<Round>>> = vec![vec![Vec::new(); paths.len()]; conns.len()];
    for r in 0..rounds as usize {
        for (ci, &c) in conns.iter().enumerate() {
            for k in 0..paths.len() {
                let pi = (k + r) % paths.len();
                let (name, addr, pids) = &paths[pi];
                let x = rt.block_on(round(*addr, c, secs, u64::MAX, pids, up_pid));
                println!(
                    "round {r} conns {c:>2} {name:<18} {:>8.0} calls/s  p50 {:>7.1} µs  p99 {:>7.1} µs  proxy cpu {:>6.1} µs/call  upstream cpu {:>5.1} µs/call",
                    x.rps, x.p50, x.p99, x.cpu, x.up_cpu
                );
                results[ci][pi].push(x);
            }
        }
    }
    println!("\nmedians over {rounds} rounds (spread min … max):");
    for (ci, &c) in conns.iter().enumerate() {
        for (pi, (name, _, _)) in paths.iter().enumerate() {
            let rs = &results[ci][pi];
            let f = |g: fn(&Round) -> f64| {
                let v: Vec<f64> = rs.iter().map(g).collect();
                let (a, b) = spread(&v);
                (median(v), a, b)
            };
            let (rps, r0, r1) = f(|x| x.rps);
            let (p50, a0, a1) = f(|x| x.p50);
            let (p99, b0, b1) = f(|x| x.p99);
            let (cpu, c0, c1) = f(|x| x.cpu);
            let (ucpu, _, _) = f(|x| x.up_cpu);
            println!(
                "conns {c:>2} {name:<18} {rps:>8.0} calls/s ({r0:.0} … {r1:.0})  p50 {p50:.1} µs ({a0:.1} … {a1:.1})  p99 {p99:.1} µs ({b0:.1} … {b1:.1})  proxy cpu {cpu:.1} µs/call ({c0:.1} … {c1:.1})  upstream cpu {ucpu:.1} µs/call"
            );
        }
    }
    // Ratios and targets: medians of per-round ratios (paths of one round ran back to back).
    let idx = |n: &str| paths.iter().position(|p| p.0 == n).unwrap();
    let (d, n, f, m) = (
        idx("direct"),
        idx("nginx"),
        idx("toolgate full"),
        idx("toolgate normal"),
    );
    let mut missed = false;
    let mut target = |what: String, ok: bool| {
        println!("target {what}: {}", if ok { "met" } else { "MISSED" });
        missed |= !ok;
    };
    for (ci, &c) in conns.iter().enumerate() {
        let per = |a: usize, b: usize, g: fn(&Round) -> f64| -> Vec<f64> {
            results[ci][a]
                .iter()
                .zip(&results[ci][b])
                .map(|(x, y)| g(x) / g(y))
                .collect()
        };
        let tput = per(f, n, |x| x.rps);
        let p99 = per(f, n, |x| x.p99);
        let cpu = per(f, n, |x| x.cpu);
        let (t0, t1) = spread(&tput);
        let (q0, q1) = spread(&p99);
        let (c0, c1) = spread(&cpu);
        let (tm, qm, cm) = (median(tput), median(p99), median(cpu));
        println!(
            "conns {c:>2}: toolgate full / nginx: throughput {tm:.2}× ({t0:.2} … {t1:.2}), p99 {qm:.2}× ({q0:.2} … {q1:.2}), CPU per call {cm:.1}× ({c0:.1} … {c1:.1})"
        );
        // Where toolgate's CPU goes: the HTTP stack's floor, the request path without audit,
        // and the audit rows (toolgate minus noaudit), each against nginx's CPU per call.
        let med = |i: usize, g: fn(&Round) -> f64| median(results[ci][i].iter().map(g).collect());
        if let (Some(fl), Some(na)) = (
            paths.iter().position(|p| p.0 == "floor"),
            paths.iter().position(|p| p.0 == "toolgate noaudit"),
        ) {
            let (cn, cfl, cna) = (med(n, |x| x.cpu), med(fl, |x| x.cpu), med(na, |x| x.cpu));
            let (cf, cm) = (med(f, |x| x.cpu), med(m, |x| x.cpu));
            println!(
                "conns {c:>2}: CPU µs per call: nginx {cn:.1}, floor {cfl:.1} ({:.1}× nginx), toolgate noaudit {cna:.1} (+{:.1} over the floor), toolgate normal {cm:.1} (+{:.1} for audit), full {cf:.1} (+{:.1})",
                cfl / cn,
                cna - cfl,
                cm - cna,
                cf - cna
            );
            println!(
                "conns {c:>2}: throughput / nginx: floor {:.2}×, toolgate noaudit {:.2}×; p99 / nginx: floor {:.2}×, noaudit {:.2}×",
                median(per(fl, n, |x| x.rps)),
                median(per(na, n, |x| x.rps)),
                median(per(fl, n, |x| x.p99)),
                median(per(na, n, |x| x.p99)),
            );
        }
        // The floor with the least audit a gateway must write (two rows per call, the decision
        // committed before forwarding): what the targets leave once the hop and the commit are
        // paid, whatever the request path does.
        for name in ["floor+audit full", "floor+audit normal"] {
            let Some(a) = paths.iter().position(|p| p.0 == name) else {
                continue;
            };
            let added: Vec<f64> = results[ci][a]
                .iter()
                .zip(&results[ci][d])
                .map(|(x, y)| x.p50 - y.p50)
                .collect();
            println!(
                "conns {c:>2}: {name}: throughput {:.2}× nginx, p99 {:.2}× nginx, CPU {:.1} µs per call, p50 added over direct {:.1} µs",
                median(per(a, n, |x| x.rps)),
                median(per(a, n, |x| x.p99)),
                med(a, |x| x.cpu),
                median(added),
            );
        }
        if c == 32 {
            target(
                format!("32 conns throughput >= 0.3x nginx ({tm:.2}x)"),
                tm >= 0.3,
            );
            target(format!("32 conns p99 <= 3x nginx ({qm:.2}x)"), qm <= 3.0);
        }
        if c == 1 {
            for (name, i, limit) in [("full", f, 500.0), ("normal", m, 150.0)] {
                let added: Vec<f64> = results[ci][i]
                    .iter()
                    .zip(&results[ci][d])
                    .map(|(x, y)| x.p50 - y.p50)
                    .collect();
                let (a0, a1) = spread(&added);
                let am = median(added);
                println!(
                    "conns  1: toolgate {name} p50 added over direct: {am:.1} µs ({a0:.1} … {a1:.1})"
                );
                target(
                    format!("1 conn p50 added <= {limit} µs with durability {name} ({am:.1} µs)"),
                    am <= limit,
                );
            }
        }
    }
    // Before `exit`, which runs no destructors: every server, the upstream too.
    drop((nginx, tg_full, tg_normal, floors, _up));
    if missed {
        std::process::exit(1);
    }
}
