//! The decision API benchmark (issue 15 part 6): toolgate's Cerbos-compatible
//! `POST /api/check/resources` next to the real Cerbos PDP serving the same policies, and the
//! Aperture hook (`POST /hooks/aperture/pre_request`). Not part of the product:
//! `scripts/bench-pdp` builds it in release and runs it pinned to the second core, with the
//! servers pinned to the first.
//!
//! ```text
//! bench_pdp      # env: TOOLGATE_BIN, CERBOS_BIN, MODE=all|pdp|hook, ROUNDS=5, SECONDS=3,
//!                #   CONNS=32, PROXY_CPU=0, GEN_CPU=1, AUDIT="<extra audit keys>" (unset: as shipped)
//! ```
//!
//! The load generator is one thread (tokio, current-thread) holding N keep-alive HTTP/1.1
//! connections, each sending the next request as soon as the last answer arrived. Policies:
//! `tests/pdp/policies` (agent tools with derived roles, CEL conditions, variables, outputs and
//! a scope) for both servers; the hook runs on the shipped `policies/`. toolgate runs with
//! `pdp.enabled`, static identities (127.0.0.1 is a node tagged `tag:pep` and `tag:aperture`)
//! and audit as shipped (`mode: sync`, `durability: full`); Cerbos 0.55.0 as shipped (audit
//! off) with `strictEvaluation` on, toolgate's default. Shapes: 1 resource × 1 action, 1 × 5,
//! 5 × 2. Before measuring, each shape's decisions from both servers are compared and must be
//! equal. Per shape, server and round (servers interleaved, order rotating): calls/s, p50 and
//! p99 of wall time per call, CPU per call of the server from `/proc/<pid>/stat`; the summary
//! is the median over rounds with the spread, and the medians of per-round ratios.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark tool"
)]

/// The shipped binary's allocator (src/main.rs), so the floor servers allocate as toolgate does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "bench_common/mod.rs"]
mod bench_common;

use bench_common::{cpu_us, env_u64, free_port, median, pct, spread};
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 framing (Content-Length or chunked: Go's net/http chunks bodies over 2 KiB).

/// One complete response at the start of `buf`: (bytes used, status, raw body range).
fn response_in(buf: &[u8]) -> Option<(usize, u16, std::ops::Range<usize>)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status = head.get(9..12)?.parse().ok()?;
    let mut len = None;
    let mut chunked = false;
    for l in head.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.trim() == "chunked" {
            chunked = true;
        }
    }
    if !chunked {
        let len = len.unwrap_or(0);
        return (buf.len() >= head_end + len).then_some((
            head_end + len,
            status,
            head_end..head_end + len,
        ));
    }
    let mut at = head_end;
    loop {
        let line_end = at + buf[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&buf[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // No trailers are sent: the final CRLF.
            return (buf.len() >= at + 2).then_some((at + 2, status, head_end..at));
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        at += size + 2;
    }
}

/// The decoded body of a complete response (chunks joined).
fn body_of(raw: &[u8], chunked: bool) -> Vec<u8> {
    if !chunked {
        return raw.to_vec();
    }
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(p) = raw[at..].windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            std::str::from_utf8(&raw[at..at + p])
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap();
        at += p + 2;
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[at..at + size]);
        at += size + 2;
    }
    out
}

fn http_post(host: &str, path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// One request on a fresh blocking connection: (status, decoded body).
fn once(addr: SocketAddr, req: &[u8]) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some((_, status, body)) = response_in(&buf) {
            let head = String::from_utf8_lossy(&buf[..body.start]).to_ascii_lowercase();
            let raw = body_of(&buf[body], head.contains("transfer-encoding: chunked"));
            return (
                status,
                serde_json::from_slice(&raw)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into())),
            );
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "{addr} closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator.

/// Sends `req` on one connection until `until`; each call's wall time (µs). Every answer must
/// be a 200 whose body holds `marker`.
async fn client(
    addr: SocketAddr,
    req: std::sync::Arc<Vec<u8>>,
    marker: &'static [u8],
    until: Instant,
) -> Vec<u32> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut times = Vec::with_capacity(100_000);
    let mut buf = Vec::with_capacity(16384);
    let mut chunk = vec![0u8; 16384];
    while Instant::now() < until {
        let t = Instant::now();
        s.write_all(&req).await.unwrap();
        buf.clear();
        loop {
            if let Some((used, status, body)) = response_in(&buf) {
                assert!(
                    status == 200 && buf[body.clone()].windows(marker.len()).any(|w| w == marker),
                    "{addr}: {status} {}",
                    String::from_utf8_lossy(&buf[body])
                );
                assert_eq!(used, buf.len(), "{addr}: more than one answer");
                break;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed by {addr}");
            buf.extend_from_slice(&chunk[..n]);
        }
        times.push(t.elapsed().as_micros() as u32);
    }
    times
}

/// One server's numbers for one shape in one round.
#[derive(Debug, Clone, Copy)]
struct Round {
    rps: f64,
    p50: f64,
    p99: f64,
    /// The server's CPU per call (µs).
    cpu: f64,
}

async fn round(
    addr: SocketAddr,
    req: &std::sync::Arc<Vec<u8>>,
    marker: &'static [u8],
    conns: usize,
    secs: f64,
    pid: u32,
) -> Round {
    // Warm the connections' first calls out of the measurement.
    let warm = Instant::now() + Duration::from_millis(300);
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(client(addr, req.clone(), marker, warm)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let cpu0 = cpu_us(pid);
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(client(addr, req.clone(), marker, until)))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_us(pid) - cpu0) as f64;
    all.sort_unstable();
    let n = all.len() as f64;
    Round {
        rps: n / wall,
        p50: pct(&all, 0.5),
        p99: pct(&all, 0.99),
        cpu: cpu / n,
    }
}

// ---------------------------------------------------------------------------------------------
// The servers.

struct Proc {
    name: &'static str,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM to this pid, SIGKILL if it lingers.
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

fn wait_listening(addr: SocketAddr, p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        if matches!(p.child.try_wait(), Ok(Some(_))) {
            let log = std::fs::read_to_string(p.dir.path().join("server.log")).unwrap_or_default();
            panic!("{}: the process exited:\n{log}", p.name);
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened at {addr}",
            p.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(
    name: &'static str,
    cpu: &str,
    bin: &Path,
    args: &[String],
    dir: tempfile::TempDir,
) -> Proc {
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = Command::new("taskset")
        .arg("-c")
        .arg(cpu)
        .arg(bin)
        .args(args)
        .current_dir(dir.path())
        .env("CERBOS_NO_TELEMETRY", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc { name, child, dir }
}

const IDENTITIES: &str = "\"127.0.0.1\": {node: pep.example.ts.net, node_id: nPEP1, tags: [\"tag:pep\", \"tag:aperture\"]}\n";
const HOOK_KEY: &str = "sk-bench-hook-key";

/// toolgate serving `policies` with the decision API and the Aperture hook on; audit as shipped.
fn start_toolgate(
    bin: &Path,
    cpu: &str,
    name: &'static str,
    policies: &Path,
) -> (Proc, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("ids.yaml"), IDENTITIES).unwrap();
    std::fs::write(d.join("hook.key"), format!("{HOOK_KEY}\n")).unwrap();
    let port = free_port();
    // AUDIT="durability: normal" (say): extra `audit` keys, for experiments; unset = as shipped.
    let audit_extra = match std::env::var("AUDIT") {
        Ok(x) if !x.trim().is_empty() => format!(", {x}"),
        _ => String::new(),
    };
    let cfg = format!(
        "listen: [\"127.0.0.1:{port}\"]\ntls: off\nlog: {{level: warn, format: text}}\nidentity: {{provider: static, static: ids.yaml}}\n\
         policies: {{dir: \"{}\", watch: false}}\naudit: {{sqlite: audit.db{audit_extra}}}\npdp: {{enabled: true, callers: [\"tag:pep\"]}}\n\
         hooks: {{aperture: {{callers: [\"tag:aperture\"], key_file: hook.key}}}}\n",
        policies.display()
    );
    std::fs::write(d.join("toolgate.yaml"), cfg).unwrap();
    let args = [
        "serve".to_string(),
        "--config".into(),
        d.join("toolgate.yaml").display().to_string(),
    ];
    let mut p = spawn(name, cpu, bin, &args, dir);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, &mut p);
    (p, addr)
}

/// Cerbos serving `policies` as shipped (audit off), strict evaluation as toolgate's default.
fn start_cerbos(bin: &Path, cpu: &str, policies: &Path) -> (Proc, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let (http, grpc) = (free_port(), free_port());
    let config = json!({
        "server": {"httpListenAddr": format!("127.0.0.1:{http}"), "grpcListenAddr": format!("127.0.0.1:{grpc}"), "metricsEnabled": false},
        "storage": {"driver": "disk", "disk": {"directory": policies, "watchForChanges": false}},
        "engine": {"strictEvaluation": true},
        "audit": {"enabled": false},
        "telemetry": {"disabled": true}
    });
    std::fs::write(dir.path().join("cerbos.yaml"), config.to_string()).unwrap();
    let args = [
        "server".to_string(),
        format!("--config={}", dir.path().join("cerbos.yaml").display()),
        "--log-level=warn".into(),
    ];
    let mut p = spawn("cerbos", cpu, bin, &args, dir);
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    wait_listening(addr, &mut p);
    // Listening comes before the policies are loaded: wait for SERVING.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = format!("GET /_cerbos/health HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        let (s, v) = once(addr, req.as_bytes());
        if s == 200 && v["status"] == "SERVING" {
            break;
        }
        assert!(Instant::now() < deadline, "cerbos never SERVING: {s} {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, addr)
}

// ---------------------------------------------------------------------------------------------
// The requests.

fn principal() -> Value {
    json!({"id": "alice", "roles": ["user"], "attr": {"team": "core", "org": "example", "oncall": true}})
}

fn resource(tool: &str, arguments: Value) -> Value {
    json!({"kind": "mcp_tool", "id": tool, "attr": {
        "org": "example", "team": "core", "owner": "bob", "env": "staging", "arguments": arguments
    }})
}

/// (name, CheckResourcesRequest) for the three shapes of the issue.
fn shapes() -> Vec<(&'static str, Value)> {
    let one = json!({
        "requestId": "bench-1x1",
        "principal": principal(),
        "resources": [{"actions": ["tools/call::read_file"], "resource": resource("read_file", json!({"path": "/src/main.rs"}))}]
    });
    let five = json!({
        "requestId": "bench-1x5",
        "principal": principal(),
        "resources": [{
            "actions": ["tools/list::write_file", "tools/call::read_file", "tools/call::write_file", "tools/call::deploy", "tools/call::delete_repo"],
            "resource": resource("write_file", json!({"path": "/src/lib.rs", "lines": 40}))
        }]
    });
    let tools = [
        ("read_file", json!({"path": "/src/main.rs"})),
        ("search_code", json!({"q": "unwrap"})),
        ("write_file", json!({"path": "/src/lib.rs", "lines": 40})),
        ("deploy", json!({"change_ticket": "CHG-1234"})),
        ("delete_repo", json!({"name": "toolgate"})),
    ];
    let resources: Vec<Value> = tools
        .iter()
        .map(|(t, a)| {
            json!({"actions": [format!("tools/list::{t}"), format!("tools/call::{t}")], "resource": resource(t, a.clone())})
        })
        .collect();
    let ten = json!({"requestId": "bench-5x2", "principal": principal(), "resources": resources});
    vec![("1x1", one), ("1x5", five), ("5x2", ten)]
}

/// An Aperture `HookCallData` for an Anthropic Messages request whose last assistant turn used
/// three tools, offering four (one the caller may not list: the answer is a `modify`).
fn hook_call() -> Value {
    let uses = [
        ("read_file", json!({"path": "src/main.rs"})),
        ("search_code", json!({"q": "unwrap"})),
        ("run_shell", json!({"command": "cargo fmt"})),
    ];
    let blocks: Vec<Value> = uses
        .iter()
        .enumerate()
        .map(|(i, (n, input))| json!({"type": "tool_use", "id": format!("toolu_0{i}"), "name": n, "input": input}))
        .collect();
    let content: Vec<Value> = std::iter::once(json!({"type": "text", "text": "Looking."}))
        .chain(blocks)
        .collect();
    let results: Vec<Value> = (0..uses.len())
        .map(|i| json!({"type": "tool_result", "tool_use_id": format!("toolu_0{i}"), "content": "ok"}))
        .collect();
    let tools: Vec<Value> = ["read_file", "run_shell", "deploy_prod", "search_code"]
        .iter()
        .map(|t| json!({"name": t, "description": "d", "input_schema": {"type": "object"}}))
        .collect();
    json!({
        "metadata": {
            "login_name": "alice@example.com",
            "user_agent": "claude-code/1.0",
            "url": "https://aperture.example.ts.net/v1/messages",
            "model": "claude-sonnet-4",
            "provider": "anthropic",
            "tailnet_name": "example.ts.net",
            "stable_node_id": "nALICE1",
            "request_id": "req_abc123",
            "session_id": "sess_xyz789",
            "grants": {"toolgate.dev/cap/toolgate": [{"roles": ["developer"]}], "tailscale.com/cap/aperture": [{"models": "**"}]}
        },
        "user_message": "tidy the repo",
        "request_body": {
            "model": "claude-sonnet-4-20250514",
            "max_tokens": 1024,
            "system": "You are a coding agent.",
            "tools": tools,
            "messages": [
                {"role": "user", "content": "tidy the repo"},
                {"role": "assistant", "content": content},
                {"role": "user", "content": results}
            ]
        }
    })
}

/// Each resource's action → effect, from a check answer.
fn effects(v: &Value) -> Vec<(String, Value)> {
    v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {v}"))
        .iter()
        .map(|r| {
            (
                r["resource"]["id"].as_str().unwrap_or_default().to_string(),
                r["actions"].clone(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

/// Median and spread of one figure over rounds.
fn summary(rs: &[Round], g: fn(&Round) -> f64) -> (f64, f64, f64) {
    let v: Vec<f64> = rs.iter().map(g).collect();
    let (a, b) = spread(&v);
    (median(v), a, b)
}

fn print_summary(label: &str, rs: &[Round]) {
    let (rps, r0, r1) = summary(rs, |x| x.rps);
    let (p50, a0, a1) = summary(rs, |x| x.p50);
    let (p99, b0, b1) = summary(rs, |x| x.p99);
    let (cpu, c0, c1) = summary(rs, |x| x.cpu);
    println!(
        "{label:<18} {rps:>8.0} calls/s ({r0:.0} … {r1:.0})  p50 {p50:.0} µs ({a0:.0} … {a1:.0})  p99 {p99:.0} µs ({b0:.0} … {b1:.0})  cpu {cpu:.1} µs/call ({c0:.1} … {c1:.1})"
    );
}

/// How much of the hook a floor server does.
#[derive(Clone, Copy, PartialEq)]
enum Floor {
    /// The HTTP stack and the body read whole; a fixed `modify` answer.
    Http,
    /// And the body parsed (`serde_json::Value`: any hook must read the tool uses out of it).
    Json,
    /// And the hook's own steps but the audit: the bounded parse, `HookCallData`, the
    /// provider walk, the principal from the metadata, the 3 `tools/call` and 4 `tools/list`
    /// decisions against the shipped policies, and the `modify` body built and serialised.
    Decide,
}

/// What the [`Floor::Decide`] server holds: the shipped policies, compiled once.
struct Decider {
    set: toolgate::policy::compile::PolicySet,
}

impl Decider {
    fn load(root: &Path) -> Decider {
        let set = toolgate::policy::store::load_dir(&root.join("policies"))
            .unwrap_or_else(|e| panic!("policies/: {e:?}"));
        Decider { set }
    }

    /// The hook's `pre_request` minus its audit rows: the answer's bytes.
    fn answer(&self, body: &[u8]) -> Vec<u8> {
        use toolgate::hook::{call, check, provider};
        use toolgate::policy::eval::{CheckRef, check_ref};
        let limits = toolgate::mcp::jsonrpc::Limits {
            max_bytes: 1 << 20,
            max_depth: 64,
            max_nodes: 100_000,
        };
        let v = toolgate::mcp::jsonrpc::parse_value(body, limits).unwrap();
        let hc = call::parse(v).unwrap();
        let id = check::user_identity(&hc.metadata, "toolgate.dev/cap/toolgate").unwrap();
        let principal = id.principal(&Default::default());
        let rb = hc.request_body.as_ref().unwrap();
        let uses = provider::latest_tool_uses(rb).unwrap();
        let offered = provider::offered_tools(rb).unwrap();
        let params = toolgate::policy::input::Params::default();
        let allows = |r: &toolgate::policy::input::Resource, action: String| {
            let actions = [action];
            let req = CheckRef {
                principal: &principal,
                resource: r,
                actions: &actions,
                aux_data: &Value::Null,
            };
            check_ref(&self.set, req, &params).effect(&actions[0])
                == Some(toolgate::policy::model::Effect::Allow)
        };
        let mut allowed = 0;
        for u in uses {
            let r =
                check::tool_resource_owned("aperture_tool", "", &u.name, u.params, &hc.metadata);
            allowed += usize::from(allows(&r, check::call_action(&u.name)));
        }
        assert_eq!(allowed, 3);
        let mut hidden = std::collections::BTreeSet::new();
        for name in &offered {
            let r = check::tool_resource("aperture_tool", "", name, None, &hc.metadata);
            if !allows(&r, check::list_action(name)) {
                hidden.insert(name.clone());
            }
        }
        let body = provider::without_tools(rb, &hidden);
        serde_json::to_vec(&json!({"action": "modify", "request_body": body})).unwrap()
    }
}

/// A hook floor (`bench_pdp floor-http|floor-json|floor-decide`): the HTTP stack the hook is
/// served on (hyper's `auto::Builder`, HTTP/1 with a header read timeout, as `server.rs`) and
/// as much of the hook as [`Floor`] says. No identity lookup and no audit: what the hook cannot
/// go below on this stack. Prints its port.
fn floor_main(floor: Floor) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;

    const ANSWER: &[u8] = br#"{"action":"modify","modified_body":{"model":"m","tools":[]}}"#;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let decider = std::sync::Arc::new(
        (floor == Floor::Decide).then(|| Decider::load(Path::new(env!("CARGO_MANIFEST_DIR")))),
    );
    rt.block_on(async move {
        let l = bench_common::announced_listener().await;
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            let decider = decider.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let decider = decider.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let answer = match (floor, decider.as_ref()) {
                                (Floor::Decide, Some(d)) => bytes::Bytes::from(d.answer(&body)),
                                (Floor::Json, _) => {
                                    let v: Value = serde_json::from_slice(&body).unwrap();
                                    assert!(v.is_object());
                                    bytes::Bytes::from_static(ANSWER)
                                }
                                _ => bytes::Bytes::from_static(ANSWER),
                            };
                            let mut r = hyper::Response::new(Full::new(answer));
                            r.headers_mut().insert(
                                "content-type",
                                hyper::header::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, hyper::Error>(r)
                        }
                    },
                );
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10));
                let _ = builder.serve_connection(TokioIo::new(s), service).await;
            });
        }
    });
}

/// `bench_pdp floor-http|floor-json|floor-decide`, pinned like the servers; its address.
fn start_floor(cpu: &str, mode: &'static str) -> (Proc, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("taskset")
        .arg("-c")
        .arg(cpu)
        .arg(std::env::current_exe().unwrap())
        .arg(mode)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = bench_common::printed_addr(&mut child);
    let mut p = Proc {
        name: mode,
        child,
        dir,
    };
    wait_listening(addr, &mut p);
    (p, addr)
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("floor-http") => return floor_main(Floor::Http),
        Some("floor-json") => return floor_main(Floor::Json),
        Some("floor-decide") => return floor_main(Floor::Decide),
        _ => {}
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin: PathBuf = std::env::var_os("TOOLGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/toolgate"));
    let mode = std::env::var("MODE").unwrap_or("all".into());
    let (do_pdp, do_hook) = match mode.as_str() {
        "all" => (true, true),
        "pdp" => (true, false),
        "hook" => (false, true),
        m => panic!("MODE={m}: all, pdp or hook"),
    };
    let rounds = env_u64("ROUNDS", 5).max(1);
    let secs = env_u64("SECONDS", 3) as f64;
    let conns = env_u64("CONNS", 32) as usize;
    let cpu = std::env::var("PROXY_CPU").unwrap_or("0".into());
    let gen_cpu = std::env::var("GEN_CPU").unwrap_or("1".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "servers on cpu {cpu}; generator on cpu {gen_cpu}; {conns} connections; {rounds} rounds of {secs} s per server and shape"
    );
    let mut missed = false;
    let mut target = |what: String, ok: bool| {
        println!("target {what}: {}", if ok { "met" } else { "MISSED" });
        missed |= !ok;
    };

    if do_pdp {
        let cerbos_bin =
            PathBuf::from(std::env::var("CERBOS_BIN").expect("CERBOS_BIN (scripts/peers cerbos)"));
        let policies = root.join("tests/pdp/policies");
        let (tg, tg_addr) = start_toolgate(&bin, &cpu, "toolgate", &policies);
        let (cb, cb_addr) = start_cerbos(&cerbos_bin, &cpu, &policies);
        let servers = [
            ("toolgate", tg_addr, tg.child.id()),
            ("cerbos", cb_addr, cb.child.id()),
        ];
        let shapes = shapes();
        // Per shape and server: the request bytes; the decisions must agree.
        let mut reqs: Vec<[std::sync::Arc<Vec<u8>>; 2]> = Vec::new();
        for (name, body) in &shapes {
            let body = body.to_string().into_bytes();
            let r = servers.map(|(_, a, _)| {
                std::sync::Arc::new(http_post(&a.to_string(), "/api/check/resources", "", &body))
            });
            let (s0, v0) = once(tg_addr, &r[0]);
            let (s1, v1) = once(cb_addr, &r[1]);
            assert_eq!((s0, s1), (200, 200), "{name}: toolgate {v0}, cerbos {v1}");
            assert_eq!(effects(&v0), effects(&v1), "{name}: the servers disagree");
            println!(
                "shape {name}: same decisions from both: {}",
                Value::from(
                    effects(&v0)
                        .into_iter()
                        .map(|(id, a)| json!({id: a}))
                        .collect::<Vec<_>>()
                )
            );
            reqs.push(r);
        }
        // results[shape][server] = rounds
        let mut results: Vec<[Vec<Round>; 2]> = vec![[Vec::new(), Vec::new()]; shapes.len()];
        for r in 0..rounds as usize {
            for (si, (shape, _)) in shapes.iter().enumerate() {
                for k in 0..2 {
                    let i = (k + r + si) % 2;
                    let (name, addr, pid) = servers[i];
                    let x =
                        rt.block_on(round(addr, &reqs[si][i], b"\"results\"", conns, secs, pid));
                    println!(
                        "round {r} {shape} {name:<9} {:>8.0} calls/s  p50 {:>6.0} µs  p99 {:>6.0} µs  cpu {:>6.1} µs/call",
                        x.rps, x.p50, x.p99, x.cpu
                    );
                    results[si][i].push(x);
                }
            }
        }
        println!("\ncheck API, medians over {rounds} rounds (spread min … max):");
        for (si, (shape, _)) in shapes.iter().enumerate() {
            for (i, (name, _, _)) in servers.iter().enumerate() {
                print_summary(&format!("{shape} {name}"), &results[si][i]);
            }
        }
        for (si, (shape, _)) in shapes.iter().enumerate() {
            let per = |g: fn(&Round) -> f64| -> Vec<f64> {
                results[si][0]
                    .iter()
                    .zip(&results[si][1])
                    .map(|(x, y)| g(x) / g(y))
                    .collect()
            };
            let (tput, p99, cpu) = (per(|x| x.rps), per(|x| x.p99), per(|x| x.cpu));
            let ((t0, t1), (q0, q1), (c0, c1)) = (spread(&tput), spread(&p99), spread(&cpu));
            let (tm, qm, cm) = (median(tput), median(p99), median(cpu));
            println!(
                "{shape} toolgate / cerbos: throughput {tm:.2}× ({t0:.2} … {t1:.2}), p99 {qm:.2}× ({q0:.2} … {q1:.2}), CPU per call {cm:.2}× ({c0:.2} … {c1:.2})"
            );
            target(
                format!("{shape} throughput >= 5x cerbos ({tm:.2}x)"),
                tm >= 5.0,
            );
            target(format!("{shape} p99 <= 0.2x cerbos ({qm:.2}x)"), qm <= 0.2);
        }
        drop((tg, cb));
    }

    if do_hook {
        let (tg, addr) = start_toolgate(&bin, &cpu, "toolgate hook", &root.join("policies"));
        let body = hook_call().to_string().into_bytes();
        let req = std::sync::Arc::new(http_post(
            &addr.to_string(),
            "/hooks/aperture/pre_request",
            &format!("Authorization: Bearer {HOOK_KEY}\r\n"),
            &body,
        ));
        let (s, v) = once(addr, &req);
        assert!(s == 200 && v["action"] == "modify", "hook: {s} {v}");
        println!(
            "\nhook pre_request ({} byte body, 3 tool uses, 4 tools offered): {}",
            body.len(),
            v["action"]
        );
        // The floors, interleaved with toolgate: the same request bytes and connections.
        let floors = ["floor-http", "floor-json", "floor-decide"].map(|m| start_floor(&cpu, m));
        let floor_reqs = floors.each_ref().map(|(_, a)| {
            std::sync::Arc::new(http_post(
                &a.to_string(),
                "/hooks/aperture/pre_request",
                &format!("Authorization: Bearer {HOOK_KEY}\r\n"),
                &body,
            ))
        });
        let mut rs = Vec::new();
        let mut floor_rs: [Vec<Round>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for r in 0..rounds as usize {
            let x = rt.block_on(round(addr, &req, b"\"modify\"", conns, secs, tg.child.id()));
            println!(
                "round {r} hook      {:>8.0} calls/s  p50 {:>6.0} µs  p99 {:>6.0} µs  cpu {:>6.1} µs/call",
                x.rps, x.p50, x.p99, x.cpu
            );
            rs.push(x);
            for (i, (p, a)) in floors.iter().enumerate() {
                let x = rt.block_on(round(
                    *a,
                    &floor_reqs[i],
                    b"\"modify\"",
                    conns,
                    secs,
                    p.child.id(),
                ));
                println!(
                    "round {r} {:<10}{:>8.0} calls/s  p50 {:>6.0} µs  p99 {:>6.0} µs  cpu {:>6.1} µs/call",
                    p.name, x.rps, x.p50, x.p99, x.cpu
                );
                floor_rs[i].push(x);
            }
        }
        println!("\nhook, medians over {rounds} rounds (spread min … max):");
        print_summary("pre_request", &rs);
        print_summary("floor: HTTP only", &floor_rs[0]);
        print_summary("floor: HTTP + JSON", &floor_rs[1]);
        print_summary("floor: all but audit", &floor_rs[2]);
        drop(floors);
        let (p99, _, _) = summary(&rs, |x| x.p99);
        target(
            format!("hook pre_request p99 <= 1 ms at {conns} connections ({p99:.0} µs)"),
            p99 <= 1000.0,
        );
        drop(tg);
    }
    if missed {
        std::process::exit(1);
    }
}
