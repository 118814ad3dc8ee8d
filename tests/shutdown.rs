//! `toolgate serve` as a process: SIGTERM stops accepting, lets an in-flight call finish,
//! flushes the audit store and exits 0; SIGHUP reloads policies, and the shadow policies
//! (`policies.shadow`) after them.
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
const SHADOW_RELOADS: &str = "toolgate_shadow_reloads_total";
const SHADOW_RELOAD_FAILURES: &str = "toolgate_shadow_reload_failures_total";
const SHADOW_LOADED: &str = "toolgate_shadow_loaded";
const SHADOW_SAME: &str = "toolgate_shadow_evaluations_total{result=\"same\"}";
const SHADOW_DIFFERS: &str = "toolgate_shadow_evaluations_total{result=\"differs\"}";
const SHADOW_NOT_LOADED: &str = "toolgate_shadow_skipped_total{reason=\"not_loaded\"}";

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
    // The file watcher off, so only SIGHUP can move the reload counters; a metrics listener
    // to read them.
    let (mut guard, addr, metrics) = serve(dir.path(), upstream, "");
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

/// Writes the demo's files into `dir` with the file watcher off (only SIGHUP reloads), a
/// metrics listener, and `extra` added to the `policies` block; starts `toolgate serve` on them
/// and waits until it accepts. Returns the process, the gateway's and the metrics address.
fn serve(
    dir: &std::path::Path,
    upstream: SocketAddr,
    extra: &str,
) -> (Guard, SocketAddr, SocketAddr) {
    let port = free_port();
    let metrics_port = free_port();
    let cfg = toolgate::demo::write_files(dir, port, upstream).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let edited = text.replace(
        "policies:\n  dir: policies\n",
        &format!("policies:\n  dir: policies\n  watch: false\n{extra}"),
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
    let child = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("TOOLGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = Guard(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "toolgate did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    (guard, addr, metrics)
}

/// A shadow set whose one `mcp_server` policy denies every action: every call the live set
/// allows is a difference under it.
const DENY_ALL: &str = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: mcp_server\n  version: default\n  rules:\n    - name: deny_everything\n      actions: [\"*\"]\n      effect: EFFECT_DENY\n      roles: [\"*\"]\n";

/// SIGHUP reloads the shadow set after the live one: a set that did not load at start loads,
/// a broken one is a counted failure that keeps the last good set (still evaluated, its old
/// content, not the new valid files next to the broken one) while the live set reloads, and
/// fixing it puts the new content in effect. Each step is proven by the counters, and the
/// content in effect by how alice's allowed call is shadow-evaluated (same or differs).
#[test]
fn sighup_reloads_the_shadow_policies() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt
        .block_on(toolgate::sample::spawn(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(toolgate::sample::Counters::default()),
        ))
        .unwrap();
    let shadow = dir.path().join("shadow");
    std::fs::create_dir_all(&shadow).unwrap();
    std::fs::write(shadow.join("broken.yaml"), "apiVersion: [not a policy\n").unwrap();
    let (mut guard, addr, metrics) = serve(dir.path(), upstream, "  shadow: shadow\n");
    let pid = guard.0.id().to_string();
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    let call = || {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","arguments":{"query":"x"}}}"#;
        let out = post(addr, [127, 0, 0, 2], body).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(
            out.contains("\"isError\":false"),
            "the live set allows it: {out}"
        );
    };
    // A shadow set that does not load at start: the gateway serves, nothing is shadow-evaluated.
    call();
    wait_for_metrics(
        metrics,
        &[
            (RELOADS, 0),
            (SHADOW_LOADED, 0),
            (SHADOW_RELOADS, 0),
            (SHADOW_RELOAD_FAILURES, 0),
            (SHADOW_NOT_LOADED, 1),
            (SHADOW_SAME, 0),
        ],
    );
    // Fixed on disk (the live policies, copied): SIGHUP loads it, and it is evaluated.
    std::fs::remove_file(shadow.join("broken.yaml")).unwrap();
    for e in std::fs::read_dir(dir.path().join("policies")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), shadow.join(e.file_name())).unwrap();
        }
    }
    hup();
    wait_for_metrics(
        metrics,
        &[
            (RELOADS, 1),
            (RELOAD_FAILURES, 0),
            (SHADOW_LOADED, 1),
            (SHADOW_RELOADS, 1),
            (SHADOW_RELOAD_FAILURES, 0),
        ],
    );
    call();
    wait_for_metrics(
        metrics,
        &[
            (SHADOW_NOT_LOADED, 1),
            (SHADOW_SAME, 1),
            (SHADOW_DIFFERS, 0),
        ],
    );
    // New content with a broken file beside it: SIGHUP reloads the live set, the shadow reload
    // fails and is counted, and the last good shadow set stays, unchanged: the call is still
    // the same under it, not denied by the new mcp_server policy.
    std::fs::remove_file(shadow.join("mcp_server_test.yaml")).unwrap();
    std::fs::write(shadow.join("mcp_server.yaml"), DENY_ALL).unwrap();
    std::fs::write(shadow.join("broken.yaml"), "apiVersion: [not a policy\n").unwrap();
    hup();
    wait_for_metrics(
        metrics,
        &[
            (RELOADS, 2),
            (RELOAD_FAILURES, 0),
            (SHADOW_LOADED, 1),
            (SHADOW_RELOADS, 1),
            (SHADOW_RELOAD_FAILURES, 1),
        ],
    );
    call();
    wait_for_metrics(metrics, &[(SHADOW_SAME, 2), (SHADOW_DIFFERS, 0)]);
    // The broken file gone: SIGHUP puts the new content in effect; the call now differs.
    std::fs::remove_file(shadow.join("broken.yaml")).unwrap();
    hup();
    wait_for_metrics(
        metrics,
        &[
            (RELOADS, 3),
            (RELOAD_FAILURES, 0),
            (SHADOW_LOADED, 1),
            (SHADOW_RELOADS, 2),
            (SHADOW_RELOAD_FAILURES, 1),
        ],
    );
    call();
    wait_for_metrics(
        metrics,
        &[
            (SHADOW_NOT_LOADED, 1),
            (SHADOW_SAME, 2),
            (SHADOW_DIFFERS, 1),
        ],
    );
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
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
    assert!(
        stderr.contains("shadow policy reload failed (SIGHUP)"),
        "{stderr}"
    );
}
