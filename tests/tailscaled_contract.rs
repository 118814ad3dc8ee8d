//! Contract tests of the LocalAPI client against the REAL tailscaled 1.96.4 (DESIGN.md §7,
//! reference/tailscale.md §5): a logged-out daemon in userspace mode, no control server, no
//! network. Each test starts its own daemon and kills it (by pid) when done, also on failure.
//!
//! The binary: `$TAILSCALED_BIN`, else `${TOOLGATE_PEERS:-$HOME/.cache/toolgate-peers}/
//! tailscale-1.96.4/tailscaled` (install it with `scripts/peers-tailscale`). Without it every
//! test prints a SKIPPED line and passes, or fails when `TOOLGATE_REQUIRE_PEERS=1` (CI); a
//! tailscaled of another version fails under the switch too (the contract is pinned).
//!
//! The daemon ALWAYS runs with `--no-logs-no-support` (and `TS_NO_LOGS_NO_SUPPORT=true`):
//! without it tailscaled tries to reach log.tailscale.com and public DERP servers. Nothing here
//! ever runs `tailscale up`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use toolgate::tailnet::localapi::{LocalApi, LocalApiError, WhoIsProto};
use toolgate::tailnet::types::{BackendState, Prefs, WatchMask};

const WANT_VERSION: &str = "1.96.4";
const INSTALL: &str = "scripts/peers-tailscale tailscaled (then TAILSCALED_BIN=that path)";

/// The tailscaled binary, or `None` when it is not installed (after a SKIPPED line; a failure
/// under `TOOLGATE_REQUIRE_PEERS=1`).
fn tailscaled_bin(test: &str) -> Option<PathBuf> {
    let path = match std::env::var_os("TAILSCALED_BIN") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => std::env::var_os("TOOLGATE_PEERS")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/toolgate-peers"))
            })
            .map(|cache| cache.join(format!("tailscale-{WANT_VERSION}/tailscaled"))),
    };
    match path {
        Some(path) if path.is_file() => Some(path),
        other => {
            support::peers::missing(
                test,
                "tailscaled",
                &format!("no tailscaled at {other:?} (TAILSCALED_BIN)"),
                INSTALL,
            );
            None
        }
    }
}

/// A running, logged-out tailscaled. Dropping it stops the process (SIGTERM, then SIGKILL).
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    started: Duration,
}

impl Daemon {
    fn start(bin: &Path) -> Daemon {
        let version = Command::new(bin).arg("--version").output().unwrap();
        let first = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        if first != WANT_VERSION {
            support::peers::version_mismatch(
                &bin.display().to_string(),
                "tailscaled",
                &first,
                WANT_VERSION,
                INSTALL,
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ts.sock");
        let log = std::fs::File::create(dir.path().join("tailscaled.log")).unwrap();
        let t = Instant::now();
        let child = Command::new(bin)
            .arg("--tun=userspace-networking")
            .arg("--state=mem:")
            .arg(format!("--statedir={}", dir.path().join("state").display()))
            .arg(format!("--socket={}", socket.display()))
            .arg("--port=0")
            .arg("--no-logs-no-support") // MANDATORY: no logtail, no bootstrap DNS to the internet
            .env("TS_NO_LOGS_NO_SUPPORT", "true")
            .env("TS_LOGS_DIR", dir.path().join("logs"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            dir,
            socket,
            started: Duration::ZERO,
        };
        // Wait for the socket to accept connections (the guard kills the daemon if we panic).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::os::unix::net::UnixStream::connect(&d.socket).is_ok() {
                break;
            }
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("tailscaled exited early ({status}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "tailscaled socket did not appear:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d.started = t.elapsed();
        d
    }

    fn client(&self) -> LocalApi {
        LocalApi::unix(&self.socket)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tailscaled.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw HTTP/1.1 exchange over the socket (for requests our client refuses to make).
async fn raw(socket: &Path, request: &str) -> String {
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn status_of_a_logged_out_daemon() {
    let Some(bin) = tailscaled_bin("status_of_a_logged_out_daemon") else {
        return;
    };
    let d = Daemon::start(&bin);
    let c = d.client();
    let t = Instant::now();
    let st = c.status().await.unwrap();
    println!(
        "tailscaled socket after {:?}; first status in {:?}",
        d.started,
        t.elapsed()
    );
    assert!(
        matches!(
            st.backend_state,
            BackendState::NeedsLogin | BackendState::NoState
        ),
        "{:?}",
        st.backend_state
    );
    assert!(st.version.starts_with(WANT_VERSION), "{}", st.version);
    assert!(!st.tun, "userspace networking");
    assert!(st.tailscale_ips.is_empty());
    assert!(st.current_tailnet.is_none());
    assert!(st.cert_domains.is_empty());
    let me = st
        .self_
        .as_ref()
        .expect("Self is present even when logged out");
    assert!(me.public_key.starts_with("nodekey:"));
    assert_eq!(st.self_dns_name(), None);
    let st = c.status_with_peers().await.unwrap();
    assert!(st.peer.is_empty());
    assert_eq!(
        c.connections_opened(),
        1,
        "keep-alive works against the real daemon"
    );
}

#[tokio::test]
async fn whois_without_a_netmap_is_not_found() {
    let Some(bin) = tailscaled_bin("whois_without_a_netmap_is_not_found") else {
        return;
    };
    let d = Daemon::start(&bin);
    // For any ip:port that no netmap node owns, 1.96.4 retries its proxymap (0+10+20+50+100 ms)
    // before the 404: ~181 ms per proto, twice that without `proto=` (tcp, then udp).
    let c = d.client();
    let t = Instant::now();
    let e = c
        .whois("100.64.0.1:1234".parse().unwrap())
        .await
        .unwrap_err();
    println!(
        "cold whois (connect + 404) against real tailscaled: {:?}",
        t.elapsed()
    );
    assert_eq!(
        e,
        LocalApiError::NotFound {
            endpoint: "whois".into(),
            body: "no match for IP:port".into()
        }
    );
    let t = Instant::now();
    let e = c
        .whois("100.64.0.1:1235".parse().unwrap())
        .await
        .unwrap_err();
    println!(
        "warm whois (pooled, 404) against real tailscaled: {:?}",
        t.elapsed()
    );
    assert!(e.is_not_found());
    let e = c
        .whois("[fd7a:115c:a1e0::1]:443".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        e.is_not_found(),
        "IPv6 addr is accepted (bracketed, escaped): {e}"
    );
    let e = c.whois_addr("100.64.0.1", None).await.unwrap_err();
    assert!(e.is_not_found(), "bare IP: {e}");
    let t = Instant::now();
    let e = c
        .whois("127.0.0.1:40000".parse().unwrap())
        .await
        .unwrap_err();
    println!(
        "unmapped loopback whois against real tailscaled (no netmap): {:?}",
        t.elapsed()
    );
    assert!(e.is_not_found());
    let e = c
        .whois_addr("100.64.0.1:1", Some(WhoIsProto::Udp))
        .await
        .unwrap_err();
    assert!(e.is_not_found());
    // A bare IP skips the proxymap retry: a fresh client measures connect + request alone.
    let t = Instant::now();
    let e = d.client().whois_addr("100.64.0.1", None).await.unwrap_err();
    println!(
        "cold whois (new connection, bare-IP 404) against real tailscaled: {:?}",
        t.elapsed()
    );
    assert!(e.is_not_found());
}

#[tokio::test]
async fn malformed_whois_is_bad_request() {
    let Some(bin) = tailscaled_bin("malformed_whois_is_bad_request") else {
        return;
    };
    let d = Daemon::start(&bin);
    let c = d.client();
    let e = c.whois_addr("garbage", None).await.unwrap_err();
    assert_eq!(
        e,
        LocalApiError::BadRequest {
            endpoint: "whois".into(),
            body: "invalid 'addr' parameter".into()
        }
    );
    let e = c.whois_addr("", None).await.unwrap_err();
    assert_eq!(
        e,
        LocalApiError::BadRequest {
            endpoint: "whois".into(),
            body: "missing 'addr' parameter".into()
        }
    );
    let e = c.whois_addr("nodekey:zz", None).await.unwrap_err();
    assert!(matches!(e, LocalApiError::BadRequest { .. }), "{e}");
    let e = c.get("/localapi/v0/nonexistent").await.unwrap_err();
    assert_eq!(
        e,
        LocalApiError::NotFound {
            endpoint: "nonexistent".into(),
            body: "404 page not found".into()
        }
    );
}

#[tokio::test]
async fn wrong_host_and_browser_headers_are_forbidden() {
    let Some(bin) = tailscaled_bin("wrong_host_and_browser_headers_are_forbidden") else {
        return;
    };
    let d = Daemon::start(&bin);
    let r = raw(
        &d.socket,
        "GET /localapi/v0/status HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\ninvalid localapi request\n"), "{r}");
    assert!(!r.to_ascii_lowercase().contains("tailscale-version"), "{r}");
    for h in [
        "Origin: http://evil.example",
        "Referer: http://evil.example/",
    ] {
        let r = raw(
            &d.socket,
            &format!(
                "GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n{h}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{h}: {r}");
    }
    let ok = raw(
        &d.socket,
        "GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains("\n\t\"BackendState\": "), "tab-indented JSON");
    assert!(
        ok.to_ascii_lowercase()
            .contains("tailscale-version: 1.96.4")
    );
    // Our client's own requests pass the same rule.
    assert!(d.client().status().await.is_ok());
}

#[tokio::test]
async fn ipn_bus_delivers_the_initial_notify() {
    let Some(bin) = tailscaled_bin("ipn_bus_delivers_the_initial_notify") else {
        return;
    };
    let d = Daemon::start(&bin);
    let c = d.client();
    let t = Instant::now();
    let mut bus = c
        .watch_ipn_bus(WatchMask::INITIAL_STATE | WatchMask::INITIAL_PREFS)
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), bus.next())
        .await
        .expect("a first notification within 5 s")
        .expect("the stream is open")
        .unwrap();
    println!("first bus notification after {:?}", t.elapsed());
    assert!(first.version.starts_with(WANT_VERSION), "{}", first.version);
    assert!(!first.session_id.is_empty());
    assert_eq!(first.state, Some(BackendState::NeedsLogin));
    let prefs = first.prefs.expect("InitialPrefs");
    assert!(prefs.logged_out);
    assert!(!prefs.want_running);
    assert!(!first.net_map);
    // The stream stays open (long-lived). A fresh daemon may follow up with health updates
    // (seen: `Health.Warnings["wantrunning-false"]` shortly after start); whatever arrives in
    // the next 300 ms must decode, and the stream must not end.
    let window = Instant::now() + Duration::from_millis(300);
    let mut later = 0;
    while let Ok(item) = tokio::time::timeout_at(window.into(), bus.next()).await {
        let n = item.expect("the bus stream must not end").unwrap();
        assert!(n.version.starts_with(WANT_VERSION) || n.version.is_empty());
        later += 1;
    }
    println!("{later} more bus notification(s) within 300 ms");
}

#[tokio::test]
async fn prefs_and_cert_error_paths() {
    let Some(bin) = tailscaled_bin("prefs_and_cert_error_paths") else {
        return;
    };
    let d = Daemon::start(&bin);
    let c = d.client();
    let body = c.get("/localapi/v0/prefs").await.unwrap();
    let prefs: Prefs = serde_json::from_slice(&body).unwrap();
    assert!(prefs.logged_out);
    let e = c.cert_pair("foo.example.ts.net", None).await.unwrap_err();
    // As root: 500 `no netmap available`; as another uid: 403 `cert access denied`.
    match &e {
        LocalApiError::Status {
            code: 500,
            body,
            endpoint,
        } => {
            assert_eq!(body, "no netmap available");
            assert_eq!(endpoint, "cert/foo.example.ts.net");
        }
        LocalApiError::AccessDenied { body, .. } => assert_eq!(body, "cert access denied"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn serve_waits_clearly_while_tailscaled_needs_login() {
    let Some(bin) = tailscaled_bin("serve_waits_clearly_while_tailscaled_needs_login") else {
        return;
    };
    let d = Daemon::start(&bin);
    let cfg = d.dir.path().join("toolgate.yaml");
    std::fs::create_dir_all(d.dir.path().join("policies")).unwrap();
    // serve refuses to start without policies; one copied from the repository will do.
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policies/toolgate_metrics.yaml"
        ),
        d.dir.path().join("policies/toolgate_metrics.yaml"),
    )
    .unwrap();
    std::fs::write(
        &cfg,
        format!(
            "listen: [tailnet:8443]\ntls: off\nidentity: {{socket: {}}}\npolicies: {{dir: policies}}\naudit: {{sqlite: audit.db}}\n",
            d.socket.display()
        ),
    )
    .unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("TOOLGATE_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its log, line by line as written: the wait is proven by the line that announces it.
    let stderr = serve.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("tailscaled is not running yet") => break,
            Ok(_) => {}
            Err(e) => panic!(
                "serve never said it waits for tailscaled ({e}); exit: {:?}",
                serve.try_wait()
            ),
        }
    }
    // Still waiting (it must not give up, nor bind anything), then SIGTERM ends it cleanly.
    assert!(
        serve.try_wait().unwrap().is_none(),
        "serve exited while waiting for login"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let status = serve.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(
        status.success(),
        "SIGTERM while waiting must exit 0: {status:?}\n{log}"
    );
    assert!(log.contains("tailscaled is not running yet"), "{log}");
    assert!(log.contains("NeedsLogin"), "{log}");
    assert!(log.contains("tailscale up"), "{log}");
}
