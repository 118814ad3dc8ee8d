//! The stdio benchmark (issue 17 part 4): what a `tools/call` through toolgate to a warm stdio
//! child costs over calling the same kind of child directly over its pipes; and, separately,
//! what starting a child (a new session) costs. Not part of the product: `scripts/bench-stdio`
//! builds it in release and runs it.
//!
//! ```text
//! bench_stdio            # the benchmark (env: TOOLGATE_BIN, ROUNDS=7, CALLS=2000, SPAWNS=10)
//! bench_stdio echo       # (the child) a minimal MCP server on stdin/stdout: echoes arguments
//! ```
//!
//! Rounds alternate direct and through-toolgate, each `CALLS` sequential calls on one
//! keep-alive connection (toolgate: `durability: normal`, sync audit, static identity, one
//! policy allowing `echo`). Per round: p50 and p99 of wall time per call, and CPU per call
//! from `/proc/<pid>/stat` (toolgate's process; the child's): CPU time is robust to a loaded
//! machine, wall time is not. The result is the median over rounds of the p50 difference,
//! with its spread.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark tool"
)]

#[path = "bench_common/mod.rs"]
mod bench_common;

use bench_common::{cpu_us, env_u64, median};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The child: newline-delimited JSON-RPC; `initialize`, `tools/list`, `tools/call` (echo).
fn echo_server() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { return };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let (Some(id), Some(method)) = (v.get("id"), v.get("method").and_then(|m| m.as_str()))
        else {
            continue;
        };
        let result = match method {
            "initialize" => serde_json::json!({"protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}}, "serverInfo": {"name": "echo", "version": "1"}}),
            "tools/list" => {
                serde_json::json!({"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]})
            }
            _ => {
                let args = v.pointer("/params/arguments").cloned().unwrap_or_default();
                serde_json::json!({"content": [{"type": "text", "text": args.to_string()}]})
            }
        };
        let answer = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result});
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
}

fn call_body(i: u64) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"echo","arguments":{{"message":"hello","n":{i}}}}}}}"#
    )
}

/// One round's numbers.
#[derive(Debug, Clone, Copy)]
struct Round {
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_call: f64,
    child_cpu_us_per_call: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summarize(mut t: Vec<f64>, cpu: f64, child_cpu: f64) -> Round {
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = t.len() as f64;
    Round {
        p50_us: percentile(&t, 0.5),
        p99_us: percentile(&t, 0.99),
        cpu_us_per_call: cpu / n,
        child_cpu_us_per_call: child_cpu / n,
    }
}

/// The same child, driven directly over its pipes.
struct Direct {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Direct {
    fn start(me: &Path) -> Direct {
        let mut child = Command::new(me)
            .arg("echo")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut d = Direct {
            child,
            stdin,
            stdout,
        };
        d.call(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#);
        d
    }

    fn call(&mut self, body: &str) -> String {
        writeln!(self.stdin, "{body}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line
    }

    fn round(&mut self, calls: u64) -> Round {
        let cpu0 = cpu_us(self.child.id());
        let mut t = Vec::with_capacity(calls as usize);
        for i in 1..=calls {
            let body = call_body(i);
            let s = Instant::now();
            let a = self.call(&body);
            t.push(s.elapsed().as_secs_f64() * 1e6);
            assert!(a.contains("hello"), "{a}");
        }
        let cpu = (cpu_us(self.child.id()) - cpu0) as f64;
        summarize(t, 0.0, cpu)
    }
}

/// One keep-alive HTTP/1.1 connection to toolgate.
struct Http {
    addr: SocketAddr,
    stream: BufReader<TcpStream>,
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        Http {
            addr,
            stream: BufReader::new(s),
        }
    }

    /// POSTs `body` to `/mcp/echo`; returns (status, session header, body).
    fn post(&mut self, session: Option<&str>, body: &str) -> (u16, Option<String>, String) {
        let mut req = format!(
            "POST /mcp/echo HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(s) = session {
            req.push_str(&format!(
                "Mcp-Session-Id: {s}\r\nMCP-Protocol-Version: 2025-11-25\r\n"
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.stream.get_mut().write_all(req.as_bytes()).unwrap();
        let mut status = 0;
        let mut len = 0usize;
        let mut sid = None;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(s) = l.strip_prefix("HTTP/1.1 ") {
                status = s[..3].parse().unwrap();
            } else if let Some((k, v)) = l.split_once(':') {
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap(),
                    "mcp-session-id" => sid = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        let mut buf = vec![0; len];
        self.stream.read_exact(&mut buf).unwrap();
        (status, sid, String::from_utf8(buf).unwrap())
    }
}

struct Toolgate {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Toolgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_toolgate(bin: &Path, me: &Path) -> Toolgate {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("policies")).unwrap();
    std::fs::write(
        d.join("policies/echo.yaml"),
        "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: mcp_server\n  version: default\n  rules:\n    - actions: [initialize, \"notifications/initialized\", \"tools/list::echo\", \"tools/call::echo\"]\n      effect: EFFECT_ALLOW\n      roles: [user]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("ids.yaml"),
        "\"127.0.0.1\": {login: bench@example.com, node: bench.example.ts.net, node_id: nB}\n",
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = format!(
        "listen: [\"127.0.0.1:{port}\"]\ntls: off\nidentity: {{provider: static, static: ids.yaml}}\npolicies: {{dir: policies, watch: false}}\n\
         audit: {{sqlite: audit.db, mode: sync, durability: normal}}\nstdio: {{launcher: \"{}\"}}\nservers:\n  echo:\n    command: [\"{}\", echo]\n    max_children: 64\n",
        bin.display(),
        me.display()
    );
    std::fs::write(d.join("toolgate.yaml"), cfg).unwrap();
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(d.join("toolgate.yaml"))
        .env("TOOLGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "toolgate did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Toolgate {
        child,
        addr,
        _dir: dir,
    }
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}"#;

/// The echo child's pid below toolgate (launcher → child).
fn child_pids(toolgate: u32) -> Vec<u32> {
    toolgate::stdio::procfs::descendants(toolgate)
        .into_iter()
        .filter(|s| !s.is_zombie())
        .map(|s| s.pid)
        .collect()
}

fn main() {
    let me = std::env::current_exe().unwrap();
    if std::env::args().nth(1).as_deref() == Some("echo") {
        echo_server();
        return;
    }
    let bin: PathBuf = std::env::var_os("TOOLGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/toolgate"));
    let rounds = env_u64("ROUNDS", 7);
    let calls = env_u64("CALLS", 2000);
    let spawns = env_u64("SPAWNS", 10);
    let tg = start_toolgate(&bin, &me);
    let mut http = Http::connect(tg.addr);
    let (status, sid, body) = http.post(None, INIT);
    assert_eq!(status, 200, "{body}");
    let sid = sid.expect("a session id");
    http.post(
        Some(&sid),
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    );
    // Warm up both paths.
    for i in 0..200 {
        http.post(Some(&sid), &call_body(i));
    }
    let mut direct = Direct::start(&me);
    direct.round(200);
    let mut rows = Vec::new();
    for r in 0..rounds {
        let d = direct.round(calls);
        let pids = child_pids(tg.child.id());
        let cpu0 = cpu_us(tg.child.id());
        let ccpu0: u64 = pids.iter().map(|p| cpu_us(*p)).sum();
        let mut t = Vec::with_capacity(calls as usize);
        for i in 1..=calls {
            let body = call_body(i);
            let s = Instant::now();
            let (st, _, a) = http.post(Some(&sid), &body);
            t.push(s.elapsed().as_secs_f64() * 1e6);
            assert!(st == 200 && a.contains("hello"), "{st} {a}");
        }
        let cpu = (cpu_us(tg.child.id()) - cpu0) as f64;
        let ccpu = (pids.iter().map(|p| cpu_us(*p)).sum::<u64>() - ccpu0) as f64;
        let g = summarize(t, cpu, ccpu);
        println!(
            "round {r}: direct p50 {:.1} µs p99 {:.1} µs (child cpu {:.1} µs/call) | toolgate p50 {:.1} µs p99 {:.1} µs, toolgate cpu {:.1} µs/call, child+launcher cpu {:.1} µs/call | added p50 {:.1} µs",
            d.p50_us,
            d.p99_us,
            d.child_cpu_us_per_call,
            g.p50_us,
            g.p99_us,
            g.cpu_us_per_call,
            g.child_cpu_us_per_call,
            g.p50_us - d.p50_us
        );
        rows.push((d, g));
    }
    // Spawn time: a new session (launcher + child start + initialize), then DELETE.
    let mut spawn_ms = Vec::new();
    for _ in 0..spawns {
        let mut h = Http::connect(tg.addr);
        let s = Instant::now();
        let (st, sid, body) = h.post(None, INIT);
        spawn_ms.push(s.elapsed().as_secs_f64() * 1e3);
        assert_eq!(st, 200, "{body}");
        let sid = sid.unwrap();
        let req = format!(
            "DELETE /mcp/echo HTTP/1.1\r\nHost: {}\r\nMcp-Session-Id: {sid}\r\nConnection: close\r\n\r\n",
            tg.addr
        );
        h.stream.get_mut().write_all(req.as_bytes()).unwrap();
        let mut rest = Vec::new();
        let _ = h.stream.read_to_end(&mut rest);
    }
    let added: Vec<f64> = rows.iter().map(|(d, g)| g.p50_us - d.p50_us).collect();
    let cpu: Vec<f64> = rows.iter().map(|(_, g)| g.cpu_us_per_call).collect();
    let (amin, amax) = added
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    let (cmin, cmax) = cpu
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    let added_med = median(added);
    println!(
        "added p50 (toolgate − direct), median of {rounds} rounds: {added_med:.1} µs (spread {amin:.1} … {amax:.1}); toolgate CPU per call: median {:.1} µs (spread {cmin:.1} … {cmax:.1})",
        median(cpu)
    );
    println!(
        "spawn (new session: launcher + child + initialize), {spawns} runs: median {:.1} ms (spread {:.1} … {:.1})",
        median(spawn_ms.clone()),
        spawn_ms.iter().cloned().fold(f64::MAX, f64::min),
        spawn_ms.iter().cloned().fold(f64::MIN, f64::max)
    );
    println!(
        "target: added p50 <= 300 µs: {}",
        if added_med <= 300.0 { "met" } else { "MISSED" }
    );
}
