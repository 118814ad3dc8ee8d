//! `toolgate serve` as a process: SIGTERM stops accepting, lets an in-flight call finish,
//! flushes the audit store and exits 0; SIGHUP reloads policies.
//!
//! No sleeps for synchronisation: with the file watcher off, each SIGHUP is proven handled by
//! the reload counters on the loopback metrics listener, and the slow call is proven in flight
//! (the upstream counted it as started) before SIGTERM is sent.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A blocking TCP stream from a chosen loopback source address (the static identity).
fn connect_from(from: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = rt.block_on(async move {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddr::from((from, 0)))?;
        s.connect(addr).await?.into_std()
    })?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

const RELOADS: &str = "toolgate_policy_reloads_total";
const RELOAD_FAILURES: &str = "toolgate_policy_reload_failures_total";

/// The value of counter `name` in a Prometheus text page.
fn counter(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls the metrics listener until every `(counter, value)` holds (20 s deadline).
fn wait_for_metrics(metrics: SocketAddr, want: &[(&str, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    loop {
        if let Ok(mut s) = TcpStream::connect(metrics) {
            let _ = s.write_all(
                b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            );
            let mut page = String::new();
            if s.read_to_string(&mut page).is_ok() {
                if want.iter().all(|(n, v)| counter(&page, n) == Some(*v)) {
                    return;
                }
                last = page;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics never reached {want:?}; last page:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn post(addr: SocketAddr, from: [u8; 4], body: &str) -> std::io::Result<String> {
    let mut s = connect_from(from, addr)?;
    let req = format!(
        "POST /mcp/github HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn sigterm_drains_and_flushes_sighup_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let counters = Arc::new(toolgate::sample::Counters::default());
    let upstream = rt
        .block_on(toolgate::sample::spawn(
            "127.0.0.1:0".parse().unwrap(),
            counters.clone(),
        ))
        .unwrap();
    let port = free_port();
    let metrics_port = free_port();
    let cfg = toolgate::demo::write_files(dir.path(), port, upstream).unwrap();
    // The file watcher off, so only SIGHUP can move the reload counters; a metrics listener
    // to read them.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let edited = text.replace(
        "policies:\n  dir: policies\n",
        "policies:\n  dir: policies\n  watch: false\n",
    );
    assert_ne!(
        edited, text,
        "the demo config's policies block changed shape"
    );
    std::fs::write(
        &cfg,
        format!("{edited}metrics:\n  listen: \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let bin = env!("CARGO_BIN_EXE_toolgate");
    let child = Command::new(bin)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("TOOLGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "toolgate did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_metrics(metrics, &[(RELOADS, 0), (RELOAD_FAILURES, 0)]);
    // SIGHUP with a broken policy file keeps the old policies: alice still reads.
    std::fs::write(dir.path().join("policies/broken.yaml"), "apiVersion: [").unwrap();
    let pid = guard.0.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    wait_for_metrics(metrics, &[(RELOADS, 0), (RELOAD_FAILURES, 1)]);
    let call = |delay: u64| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"search_repositories","arguments":{{"query":"x","delay_ms":{delay}}}}}}}"#
        )
    };
    let quick = post(addr, [127, 0, 0, 2], &call(0)).unwrap();
    assert!(quick.starts_with("HTTP/1.1 200"), "{quick}");
    assert!(quick.contains("\"isError\":false"), "{quick}");
    // With the broken file gone, SIGHUP reloads: the success counter moves, the failure one not.
    std::fs::remove_file(dir.path().join("policies/broken.yaml")).unwrap();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    wait_for_metrics(metrics, &[(RELOADS, 1), (RELOAD_FAILURES, 1)]);
    // A slow call in flight when SIGTERM arrives still completes. The upstream counts a call
    // as started before its delay (`delay_ms`, the scenario's slow upstream), so SIGTERM is
    // sent only once the call has reached it.
    let started = || counters.started.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(started(), 1, "the quick call");
    let slow = std::thread::spawn(move || post(addr, [127, 0, 0, 2], &call(3000)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while started() < 2 {
        assert!(
            Instant::now() < deadline,
            "the slow call never reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!slow.is_finished(), "the slow call finished before SIGTERM");
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let answer = slow.join().unwrap().unwrap();
    assert!(
        answer.contains("\"isError\":false"),
        "in-flight call was cut: {answer}"
    );
    let status = guard.0.wait().unwrap();
    let mut stderr = String::new();
    guard
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("policy reload failed"), "{stderr}");
    // New connections are refused after shutdown, and every call has its committed row.
    assert!(TcpStream::connect(addr).is_err());
    let rows =
        toolgate::audit::query::query(&dir.path().join("audit.db"), &Default::default()).unwrap();
    let forwarded = rows
        .iter()
        .filter(|r| r.tool == "search_repositories" && r.outcome == "forwarded")
        .count();
    assert_eq!(forwarded, 2, "{rows:#?}");
    assert_eq!(
        counters
            .tool_calls
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}
