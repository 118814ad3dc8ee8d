//! The memory benchmark (issue 13 item 4): the peak RSS of `toolgate serve` while 64 agents
//! each send one maximum-size `tools/call` at the same moment, in two shapes: arguments that
//! are one string filling the body limit (1 MiB), and arguments that are an array of small
//! objects at the value limit (10,000 JSON values). Each shape runs allowed (forwarded to the
//! sample upstream) and denied. Not part of the product: `scripts/bench-memory` builds it in
//! release and runs it.
//!
//! Per run: the gateway's RSS before (`VmRSS`, connections warm), its peak during the run
//! (`VmHWM`, reset through `/proc/<pid>/clear_refs` before each run), and how many calls were
//! answered 200 and how many were refused 503 by the in-flight budget
//! (`limits.in_flight_bytes`; env `IN_FLIGHT_BYTES` sets it, default the daemon's default).
//! Exits non-zero if a peak is 256 MiB or more.
//!
//! Env: `TOOLGATE_BIN` (default target/release/toolgate), `AGENTS` (64), `IN_FLIGHT_BYTES`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark tool"
)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use toolgate::sample;

const TARGET_MIB: f64 = 256.0;

fn status_kib(pid: u32, key: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

/// A `tools/call` of `tool` whose body is exactly `bytes` long: one string argument.
fn string_call(tool: &str, bytes: usize) -> Vec<u8> {
    let call = |q: String| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {"query": q}}})
            .to_string()
    };
    let empty = call(String::new()).len();
    call("x".repeat(bytes - empty)).into_bytes()
}

/// A `tools/call` of `tool` with `values` JSON values: the envelope's 9 and small objects
/// `{"a":1}` (two values each).
fn objects_call(tool: &str, values: usize) -> Vec<u8> {
    let items: Vec<serde_json::Value> = (0..(values - 9) / 2).map(|_| json!({"a": 1})).collect();
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {"query": "x", "items": items}}})
        .to_string()
        .into_bytes()
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let agents: usize = std::env::var("AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let bin = std::env::var_os("TOOLGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/toolgate"));
    let counters = Arc::new(sample::Counters::default());
    let up = sample::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), counters.clone())
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("policies")).unwrap();
    std::fs::write(
        d.join("policies/mcp.yaml"),
        "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: mcp_server\n  version: default\n  rules:\n    - actions: [\"tools/call::search_repositories\", \"tools/list::search_repositories\"]\n      effect: EFFECT_ALLOW\n      roles: [\"user\"]\n",
    )
    .unwrap();
    let mut ids = String::new();
    for k in 1..=agents {
        ids.push_str(&format!(
            "\"127.0.1.{k}\": {{login: agent{k}@example.com, node: agent{k}.example.ts.net, node_id: nA{k}}}\n"
        ));
    }
    std::fs::write(d.join("identities.yaml"), ids).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let limits = std::env::var("IN_FLIGHT_BYTES")
        .map(|b| format!("limits:\n  in_flight_bytes: {b}\n"))
        .unwrap_or_default();
    std::fs::write(
        d.join("toolgate.yaml"),
        format!(
            "listen: [\"127.0.0.1:{port}\"]\ntls: off\nidentity: {{provider: static, static: identities.yaml}}\n\
             policies: {{dir: policies}}\nservers:\n  sample: {{url: \"http://{up}/mcp\", timeout: 120s}}\n\
             audit: {{sqlite: audit.db, mode: sync}}\n{limits}"
        ),
    )
    .unwrap();
    let child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(d.join("toolgate.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let serve = Serve(child);
    let pid = serve.0.id();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "toolgate did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Installs the crypto provider reqwest needs (as toolgate does).
    let _ = toolgate::gateway::http_client();
    let clients: Vec<reqwest::Client> = (1..=agents)
        .map(|k| {
            reqwest::Client::builder()
                .local_address(IpAddr::from([127, 0, 1, k as u8]))
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap()
        })
        .collect();
    let url = format!("http://{addr}/mcp/sample");
    let send = |c: reqwest::Client, body: Vec<u8>| {
        let url = url.clone();
        async move {
            c.post(url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    // Warm: one small call per agent (connections open, caches and pools filled).
    let warm = string_call("search_repositories", 200);
    futures_util::future::join_all(clients.iter().map(|c| send(c.clone(), warm.clone()))).await;

    println!(
        "toolgate {} (pid {pid}); {agents} agents; in-flight budget {}",
        bin.display(),
        std::env::var("IN_FLIGHT_BYTES").unwrap_or_else(|_| "default".into())
    );
    println!("| shape | decision | RSS before MiB | peak RSS MiB | 200 | 503 | other |");
    println!("|---|---|---|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for (shape, make) in [
        (
            "one 1 MiB string",
            &(|t: &str| string_call(t, 1024 * 1024)) as &dyn Fn(&str) -> Vec<u8>,
        ),
        ("10,000 values (4,995 small objects)", &|t: &str| {
            objects_call(t, 10_000)
        }),
    ] {
        for (decision, tool) in [
            ("allowed", "search_repositories"),
            ("denied", "delete_repository"),
        ] {
            let body = make(tool);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = status_kib(pid, "VmRSS:");
            // Resets VmHWM to the current RSS (proc(5), clear_refs "5").
            std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
            let statuses = futures_util::future::join_all(
                clients.iter().map(|c| send(c.clone(), body.clone())),
            )
            .await;
            let peak = status_kib(pid, "VmHWM:");
            let ok = statuses.iter().filter(|s| **s == 200).count();
            let busy = statuses.iter().filter(|s| **s == 503).count();
            println!(
                "| {shape} | {decision} | {:.1} | {:.1} | {ok} | {busy} | {} |",
                mib(before),
                mib(peak),
                statuses.len() - ok - busy
            );
            worst = worst.max(mib(peak));
        }
    }
    println!(
        "upstream executed {} tool calls",
        counters
            .tool_calls
            .load(std::sync::atomic::Ordering::SeqCst)
    );
    drop(serve);
    if worst >= TARGET_MIB {
        eprintln!("peak RSS {worst:.1} MiB: target < {TARGET_MIB} MiB missed");
        std::process::exit(1);
    }
}
