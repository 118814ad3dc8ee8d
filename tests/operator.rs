//! The operator's view of `toolgate` as a process: systemd readiness and status (a
//! `NOTIFY_SOCKET` stub records every message), start-up refusals, `policy check --config`
//! (the unit's ExecReload), durations on the command line, and log formats under journald.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::fake_localapi::{FakeLocalApi, default_status};

const BIN: &str = env!("CARGO_BIN_EXE_toolgate");

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

/// A `NOTIFY_SOCKET` stand-in: a unix datagram socket that records every message.
struct NotifyStub {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl NotifyStub {
    fn new(dir: &Path) -> NotifyStub {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifyStub {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Reads messages until one satisfies `want` (returned), or fails at the deadline.
    fn until(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                self.seen.push(msg.clone());
                if want(&msg) {
                    return msg;
                }
            }
        }
        panic!("no notification {what} within 30 s; saw {:#?}", self.seen);
    }

    /// Every message that arrives within `d` (for "nothing more came" checks).
    fn drain_for(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                self.seen.push(msg.clone());
                out.push(msg);
            }
        }
        out
    }
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

fn status_of(msg: &str) -> Option<&str> {
    msg.lines().find_map(|l| l.strip_prefix("STATUS="))
}

fn serve(cfg: &Path, notify: &Path) -> Guard {
    Guard(
        Command::new(BIN)
            .args(["serve", "-c", cfg.to_str().unwrap()])
            .env("NOTIFY_SOCKET", notify)
            .env("TOOLGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn wait_exit(guard: &mut Guard, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "toolgate did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(guard: &mut Guard) -> String {
    let mut s = String::new();
    if let Some(mut e) = guard.0.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Item 1: READY=1 only once the listener accepts and policies are loaded; a reload says
/// RELOADING=1 (with MONOTONIC_USEC) and READY=1 again, and a failed one says so in STATUS;
/// SIGTERM says STOPPING=1.
#[test]
fn serve_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt
        .block_on(toolgate::sample::spawn(
            "127.0.0.1:0".parse().unwrap(),
            Default::default(),
        ))
        .unwrap();
    let port = free_port();
    let cfg = toolgate::demo::write_files(dir.path(), port, upstream).unwrap();
    let mut stub = NotifyStub::new(dir.path());
    let mut child = serve(&cfg, &stub.path);

    let first = stub.until("STATUS", |m| status_of(m).is_some());
    assert!(
        status_of(&first).unwrap().contains("loading policies"),
        "{first}"
    );
    let ready = stub.until("READY=1", |m| has_line(m, "READY=1"));
    // The listener is up when READY=1 arrives.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("READY=1 before the listener");
    let status = status_of(&ready).unwrap();
    assert!(
        status.contains(&format!("127.0.0.1:{port}")) && status.contains("policies"),
        "{status}"
    );
    assert!(
        !stub.seen[..stub.seen.len() - 1]
            .iter()
            .any(|m| has_line(m, "READY=1")),
        "READY=1 came once: {:#?}",
        stub.seen
    );

    // A good reload.
    signal(&child.0, "-HUP");
    let reloading = stub.until("RELOADING=1", |m| has_line(m, "RELOADING=1"));
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    let again = stub.until("READY=1 after the reload", |m| has_line(m, "READY=1"));
    assert!(status_of(&again).unwrap().contains("reloaded"), "{again}");

    // A broken policy: the reload fails, the last good set stays, STATUS says so.
    std::fs::write(
        dir.path().join("policies/broken.yaml"),
        "apiVersion: api.cerbos.dev/v1\nresourcePolicy: {resource: x, version: default, rules: [{actions: ['*'], effect: EFFECT_NOPE, roles: ['*']}]}\n",
    )
    .unwrap();
    signal(&child.0, "-HUP");
    let failed = stub.until("a failed-reload status", |m| {
        status_of(m).is_some_and(|s| s.contains("failed"))
    });
    assert!(has_line(&failed, "READY=1"), "{failed}");
    assert!(
        status_of(&failed).unwrap().contains("last good"),
        "{failed}"
    );

    signal(&child.0, "-TERM");
    let stopping = stub.until("STOPPING=1", |m| has_line(m, "STOPPING=1"));
    assert!(status_of(&stopping).is_some(), "{stopping}");
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
}

/// Item 1: a missing or empty policy directory fails the start with a clear message, and
/// READY=1 is never sent.
#[test]
fn serve_refuses_to_start_without_policies() {
    for case in ["missing", "empty", "broken"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg =
            toolgate::demo::write_files(dir.path(), port, "127.0.0.1:9".parse().unwrap()).unwrap();
        let policies = dir.path().join("policies");
        std::fs::remove_dir_all(&policies).unwrap();
        match case {
            "missing" => {}
            "empty" => {
                std::fs::create_dir(&policies).unwrap();
                std::fs::create_dir(policies.join("testdata")).unwrap();
                std::fs::write(policies.join("a_test.yaml"), "name: x\n").unwrap();
            }
            _ => {
                std::fs::create_dir(&policies).unwrap();
                std::fs::write(policies.join("p.yaml"), "apiVersion: nope\n").unwrap();
            }
        }
        let mut stub = NotifyStub::new(dir.path());
        let mut child = serve(&cfg, &stub.path);
        let status = wait_exit(&mut child, Duration::from_secs(30));
        assert!(!status.success(), "{case}: started anyway");
        let err = stderr_of(&mut child);
        let want = match case {
            "missing" => "does not exist",
            "empty" => "holds no policies",
            _ => "do not compile",
        };
        assert!(err.contains(want), "{case}: {err}");
        assert!(err.contains("policies"), "{case}: {err}");
        let seen = stub.drain_for(Duration::from_millis(300));
        assert!(
            !seen.iter().any(|m| has_line(m, "READY=1")),
            "{case}: READY=1 sent: {seen:#?}"
        );
        // Nothing listens.
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}

/// Item 1: while tailscaled is not Running, STATUS says so (with what to do) and READY=1 waits;
/// once it is Running, READY=1 follows.
#[test]
fn serve_says_what_it_waits_for_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(FakeLocalApi::start());
    let mut status = default_status();
    status["BackendState"] = json!("NeedsLogin");
    status["AuthURL"] = json!("https://login.example.com/a/123");
    api.set_status(status);
    let port = free_port();
    let cfg =
        toolgate::demo::write_files(dir.path(), port, "127.0.0.1:9".parse().unwrap()).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "identity:\n  provider: static\n  static: identities.yaml\n",
        &format!("identity:\n  socket: {}\n", api.socket_path().display()),
    );
    std::fs::write(&cfg, text).unwrap();
    let mut stub = NotifyStub::new(dir.path());
    let mut child = serve(&cfg, &stub.path);
    let waiting = stub.until("a NeedsLogin status", |m| {
        status_of(m).is_some_and(|s| s.contains("NeedsLogin"))
    });
    let s = status_of(&waiting).unwrap();
    assert!(
        s.contains("waiting for tailscaled") && s.contains("https://login.example.com/a/123"),
        "{s}"
    );
    let more = stub.drain_for(Duration::from_millis(1500));
    assert!(
        !more.iter().any(|m| has_line(m, "READY=1")),
        "READY=1 while tailscaled needs a login: {more:#?}"
    );
    api.set_status(default_status());
    stub.until("READY=1", |m| has_line(m, "READY=1"));
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("listening when ready");
    signal(&child.0, "-TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());

    // Running but without addresses: `tailnet:PORT` cannot bind yet, so it waits and says so.
    let mut status = default_status();
    status["TailscaleIPs"] = json!([]);
    status["Self"]["TailscaleIPs"] = json!([]);
    api.set_status(status);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("\"127.0.0.1:{port}\""), "\"tailnet:4443\"");
    std::fs::write(&cfg, text).unwrap();
    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let mut stub = NotifyStub::new(&second);
    let mut child = serve(&cfg, &stub.path);
    stub.until("an addresses status", |m| {
        status_of(m).is_some_and(|s| s.contains("tailnet addresses"))
    });
    let more = stub.drain_for(Duration::from_millis(1500));
    assert!(!more.iter().any(|m| has_line(m, "READY=1")), "{more:#?}");
    signal(&child.0, "-TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
    drop(api);
}

fn toolgate(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Item 1 (ExecReload): `policy check --config` checks the directory `serve` would load and
/// fails on what would fail a start; a bare DIR only warns when empty (item 7).
#[test]
fn policy_check_with_config_checks_what_serve_would_load() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = toolgate::demo::write_files(dir.path(), 1, "127.0.0.1:9".parse().unwrap()).unwrap();
    let c = cfg.to_str().unwrap();
    let out = toolgate(&["policy", "check", "-c", c]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("policies compiled"));

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = toolgate(&["policy", "check", empty.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{out:?}"
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("dir: policies", "dir: empty");
    std::fs::write(&cfg, text).unwrap();
    let out = toolgate(&["policy", "check", "--config", c]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no policies"));

    let out = toolgate(&["policy", "check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = toolgate(&["policy", "check", "-c", "/nonexistent/toolgate.yaml"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "a config error is not a usage error: {out:?}"
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Item 6: errors say where (file:line:column, the YAML path once, the audit command and its
/// database), and runtime failures never exit with clap's 2.
#[test]
fn errors_name_where_and_exit_codes_tell_failures_from_usage() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    std::fs::create_dir(&p).unwrap();
    let policy = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: mcp_server\n  version: default\n  rules:\n    - actions: [\"x\"]\n      effect: EFFECT_ALLOW\n      roles: [r]\n      condition:\n        match:\n          expr: request.resource.attr.a ==\n";
    std::fs::write(p.join("bad.yaml"), policy).unwrap();
    let out = toolgate(&["policy", "check", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        stderr(&out).contains(
            "bad.yaml:11:17: $.resourcePolicy.rules[0].condition.match.expr: invalid CEL"
        ),
        "the CEL error points at its expression: {}",
        stderr(&out)
    );
    let unknown = policy.replace(
        "      condition:\n        match:\n          expr: request.resource.attr.a ==\n",
        "      colour: red\n",
    );
    std::fs::write(p.join("bad.yaml"), unknown).unwrap();
    let out = toolgate(&["policy", "check", p.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(
        err.contains("bad.yaml:9:7: $.resourcePolicy.rules[0].colour: unknown field"),
        "{err}"
    );
    assert_eq!(
        err.matches("rules[0]").count(),
        1,
        "the path is printed once: {err}"
    );

    // --coverage: file:line:column per uncovered rule.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let out = toolgate(&["policy", "test", repo.to_str().unwrap(), "--coverage"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let gaps: Vec<&str> = text.lines().filter(|l| l.contains("never")).collect();
    assert!(!gaps.is_empty(), "{text}");
    for g in gaps {
        let loc = g.trim().split(": ").next().unwrap_or("");
        let parts: Vec<&str> = loc.split(':').collect();
        assert!(
            parts.len() == 3
                && parts[1].parse::<usize>().is_ok()
                && parts[2].parse::<usize>().is_ok(),
            "no file:line:column in {g:?}"
        );
    }

    // audit: the command and the database, said once; a missing store is a runtime failure.
    let db = dir.path().join("missing.db");
    let out = toolgate(&["audit", "query", "--db", db.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "error: audit query ({}): no such audit database",
            db.display()
        )
    );
    let out = toolgate(&["audit", "stats", "--db", db.to_str().unwrap()]);
    assert!(
        stderr(&out).starts_with(&format!("error: audit stats ({})", db.display())),
        "{out:?}"
    );
    let out = toolgate(&["audit", "query", "--since", "5y"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed flag is a usage error: {out:?}"
    );
    assert!(
        stderr(&out).starts_with("error: audit query: --since"),
        "{out:?}"
    );

    // A config that cannot be read: 5, for serve, doctor, whois and audit alike.
    for args in [
        &["serve", "-c", "/nonexistent/toolgate.yaml"][..],
        &["doctor", "-c", "/nonexistent/toolgate.yaml"],
        &["whois", "100.64.0.1", "-c", "/nonexistent/toolgate.yaml"],
        &["audit", "query", "--config", "/nonexistent/toolgate.yaml"],
    ] {
        let out = toolgate(args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {out:?}");
    }
    let help = toolgate(&["--help"]);
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("Exit codes: 0 success; 1 runtime failure")
    );
}

/// Item 3: `--since`/`--until` take Go and Prometheus durations.
#[test]
fn audit_time_bounds_take_go_durations() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    drop(toolgate::audit::AuditLog::open(toolgate::audit::Settings::for_path(&db)).unwrap());
    for since in ["1h30m", "1.5h", "90s", "250ms", "7d"] {
        let out = toolgate(&[
            "audit",
            "query",
            "--db",
            db.to_str().unwrap(),
            "--since",
            since,
            "--until",
            "1ms",
            "--format",
            "jsonl",
        ]);
        assert!(out.status.success(), "--since {since}: {out:?}");
    }
    let out = toolgate(&[
        "audit",
        "query",
        "--db",
        db.to_str().unwrap(),
        "--since",
        "5y",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("5y"),
        "{out:?}"
    );
}

/// Item 5: under journald (JOURNAL_STREAM names stderr) logs are plain text without ANSI
/// codes; on a pipe without it, JSON.
#[test]
fn logs_are_plain_text_under_journald() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = toolgate::demo::write_files(dir.path(), 1, "127.0.0.1:9".parse().unwrap()).unwrap();
    std::fs::remove_dir_all(dir.path().join("policies")).unwrap();
    let run = |journal: bool| -> String {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", writer.as_raw_fd())).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "-c", cfg.to_str().unwrap()])
            .env_remove("TOOLGATE_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(writer);
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let mut out = String::new();
        reader.read_to_string(&mut out).unwrap();
        assert!(!child.wait().unwrap().success());
        out
    };
    let journal = run(true);
    assert!(journal.contains("ERROR"), "{journal}");
    assert!(
        !journal.contains('\u{1b}'),
        "ANSI codes in the journal: {journal:?}"
    );
    assert!(!journal.contains("{\"timestamp\""), "{journal}");
    let piped = run(false);
    assert!(piped.contains("{\"timestamp\""), "{piped}");
}

/// What the sandbox test needs; `None` when all is there, else what is missing and how to get it.
fn sandbox_missing() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        return Some("root (for unshare and setpriv)".into());
    }
    for tool in ["unshare", "setpriv", "systemd-analyze"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} (apt-get install -y util-linux systemd)"));
        }
    }
    let seccomp = Command::new("/usr/bin/python3")
        .args(["-c", "import seccomp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !seccomp {
        return Some("python3-seccomp (apt-get install -y python3-seccomp)".into());
    }
    if std::env::var_os("TAILSCALED_BIN").is_none() {
        return Some(
            "tailscaled (export TAILSCALED_BIN=$(scripts/peers-tailscale tailscaled))".into(),
        );
    }
    None
}

/// Links (or copies) `from` into `dir` so the unprivileged sandbox user can run it.
fn place(from: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    if std::fs::hard_link(from, &to).is_err() {
        std::fs::copy(from, &to).unwrap();
    }
    to
}

/// Item 2: sidecar mode inside (an approximation of) the unit's sandbox — an unprivileged user
/// with no capabilities, the unit's system-call filter with EPERM, its address families, a
/// read-only root — starts its tailscaled and gets as far as waiting for a login. Without
/// AF_NETLINK, tailscaled cannot start (systemd/toolgate-sidecar.conf).
#[test]
fn sidecar_mode_runs_inside_the_units_sandbox() {
    if let Some(missing) = sandbox_missing() {
        if std::env::var("TOOLGATE_REQUIRE_PEERS").as_deref() == Ok("1") {
            panic!("the sandbox test needs {missing}");
        }
        eprintln!("skipped: the sandbox test needs {missing}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let nobody = 65534;
    std::os::unix::fs::chown(dir, Some(nobody), Some(nobody)).unwrap();
    let tailscaled = place(
        Path::new(&std::env::var_os("TAILSCALED_BIN").unwrap()),
        dir,
        "tailscaled",
    );
    let bin = place(Path::new(BIN), dir, "toolgate");
    toolgate::demo::write_files(dir, 1, "127.0.0.1:9".parse().unwrap()).unwrap();
    let port = free_port();
    let socks = free_port();
    let cfg = dir.join("sidecar.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: [\"127.0.0.1:{port}\"]\ntls: off\npolicies: {{dir: policies}}\naudit: {{sqlite: audit.db}}\ntailnet: {{mode: sidecar, tailscaled: {}, state_dir: ts, socks5: \"127.0.0.1:{socks}\"}}\n",
            tailscaled.display()
        ),
    )
    .unwrap();
    let chown_all = |p: &Path| {
        let _ = Command::new("chown")
            .args(["-R", "65534:65534", p.to_str().unwrap()])
            .status();
    };
    chown_all(dir);
    let mut stub = NotifyStub::new(dir);
    std::fs::set_permissions(
        &stub.path,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let sandbox = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/sandbox-exec");
    let dir_s = dir.to_str().unwrap();
    let mut child = Guard(
        Command::new(&sandbox)
            .args(["--user", "nobody", "--rw", dir_s, "--"])
            .arg(&bin)
            .args(["serve", "-c", cfg.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &stub.path)
            .env("TOOLGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    stub.until("the sidecar join status", |m| {
        status_of(m).is_some_and(|s| s.contains("to join the tailnet"))
    });
    // tailscaled runs inside the sandbox and answers its LocalAPI (logged out: a login is due).
    let api = toolgate::tailnet::localapi::LocalApi::unix(dir.join("ts/tailscaled.sock"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let state = loop {
        match rt.block_on(api.status()) {
            Ok(s) => break s.backend_state.as_str().to_string(),
            Err(e) => {
                assert!(Instant::now() < deadline, "tailscaled never answered: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(
        ["NeedsLogin", "NoState", "Starting"].contains(&state.as_str()),
        "{state}"
    );
    signal(&child.0, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let err = stderr_of(&mut child);
    assert!(status.success(), "{err}");
    assert!(
        !err.contains("exited; restarting"),
        "tailscaled died in the sandbox: {err}"
    );

    // The evidence for AF_NETLINK: without it tailscaled exits at start.
    let out = Command::new(&sandbox)
        .args([
            "--user",
            "nobody",
            "--rw",
            dir_s,
            "--families",
            "AF_UNIX,AF_INET,AF_INET6",
            "--",
        ])
        .arg(&tailscaled)
        .args([
            "--tun=userspace-networking",
            &format!("--statedir={dir_s}/ts2"),
            &format!("--socket={dir_s}/ts2.sock"),
            "--no-logs-no-support",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("netlinkrib"), "{text}");
}

/// Item 7: every flag has help, `-c` is `--config` everywhere, completions are generated,
/// `whois` with the static provider answers without tailscaled, `demo --port`, and the audit
/// table fits `COLUMNS` with an ellipsis.
#[test]
fn the_cli_fits_a_terminal_and_helps() {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" || a.is_hide_set() {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} {id}: no help"));
            }
            if a.get_long() == Some("config") && a.get_short() != Some('c') {
                missing.push(format!("{path} --config: no -c"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(&toolgate::cli::command(), "toolgate", &mut missing);
    assert!(missing.is_empty(), "{missing:#?}");

    let out = toolgate(&["completions", "bash"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("_toolgate()"));

    // demo --port, and its files for the rest.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = toolgate(&[
        "demo",
        "--dir",
        dir.path().to_str().unwrap(),
        "--port",
        &port.to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("gateway on http://127.0.0.1:{port}")),
        "{out:?}"
    );

    // whois with the static provider: the fixture answers; tailscaled's socket is not used.
    let cfg = dir.path().join("toolgate.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "  static: identities.yaml\n",
        "  static: identities.yaml\n  socket: /nonexistent/tailscaled.sock\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let out = toolgate(&["whois", "127.0.0.2:1234", "-c", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("alice@example.com"));

    // The table fits COLUMNS (stdout is a pipe here) and cuts with an ellipsis.
    let out = Command::new(BIN)
        .args([
            "audit",
            "query",
            "-c",
            cfg.to_str().unwrap(),
            "--format",
            "table",
        ])
        .env("COLUMNS", "90")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().count() > 2, "{table}");
    for line in table.lines() {
        assert!(line.chars().count() <= 90, "{line:?}");
    }
    assert!(table.contains('…'), "{table}");
    let out = Command::new(BIN)
        .args(["audit", "stats", "-c", cfg.to_str().unwrap()])
        .env("COLUMNS", "40")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        assert!(line.chars().count() <= 40, "{line:?}");
    }
}

/// `toolgate doctor -c CFG` with `env` unset: its exit code and stdout.
fn doctor(cfg: &Path, unset: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["doctor", "-c", cfg.to_str().unwrap()]);
    for name in unset {
        cmd.env_remove(name);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The report line about `servers.NAME` of kind `what`.
fn line_of<'a>(report: &'a str, what: &str, name: &str) -> &'a str {
    let what = format!(" {what} ");
    let name = format!("servers.{name}:");
    report
        .lines()
        .find(|l| l.contains(&what) && l.contains(&name))
        .unwrap_or_else(|| panic!("no {what}line for {name} in:\n{report}"))
}

/// Item 4: `doctor` probes every upstream for real: an HTTP one that answers
/// `server/discover`, a stdio one it starts and initializes (and stops), and one of each that
/// is down; any down upstream means "not ready" and exit 1. With the down ones gone: ready.
#[test]
fn doctor_probes_every_upstream_and_a_down_one_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt
        .block_on(toolgate::sample::spawn(
            "127.0.0.1:0".parse().unwrap(),
            Default::default(),
        ))
        .unwrap();
    let cfg = toolgate::demo::write_files(dir.path(), free_port(), upstream).unwrap();
    let base = std::fs::read_to_string(&cfg).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/stdio_fixture.py");
    let pidfile = dir.path().join("fixture.pids");
    // The child notes its pid, then becomes the fixture.
    let script = format!(
        "import os; open('{}', 'w').write(str(os.getpid())); os.execvp('python3', ['python3', '{}'])",
        pidfile.display(),
        fixture.display()
    );
    let up = format!(
        "  local: {{command: [python3, -c, \"{script}\"], env: {{FIXTURE_NAME: local-fixture}}}}\n"
    );
    let down = format!(
        "  gone: {{url: \"http://127.0.0.1:{}/mcp\"}}\n  dies: {{command: [python3, -c, \"import sys; sys.exit(3)\"]}}\n",
        free_port()
    );
    std::fs::write(
        &cfg,
        base.replace("servers:\n", &format!("servers:\n{up}{down}")),
    )
    .unwrap();

    let (code, report) = doctor(&cfg, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert!(report.contains("not ready"), "{report}");
    for name in ["github", "files", "shell"] {
        let l = line_of(&report, "upstream", name);
        assert!(
            l.starts_with("OK ")
                && l.contains(&format!("http://{upstream}/mcp"))
                && l.contains("server/discover answers versions 2026-07-28, 2025-11-25")
                && l.contains("toolgate-sample"),
            "{l}"
        );
    }
    let l = line_of(&report, "upstream", "local");
    assert!(
        l.starts_with("OK ")
            && l.contains("initialize answers protocol 2025-11-25 (local-fixture 1)"),
        "{l}"
    );
    let l = line_of(&report, "upstream", "gone");
    assert!(
        l.starts_with("FAIL ") && l.contains("not reachable") && l.contains("is it running?"),
        "{l}"
    );
    let l = line_of(&report, "upstream", "dies");
    assert!(
        l.starts_with("FAIL ") && l.contains("initialize failed") && l.contains("exit"),
        "{l}"
    );
    // The probe's stdio child was stopped again.
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the probed child {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Without the down upstreams: ready.
    std::fs::write(&cfg, base.replace("servers:\n", &format!("servers:\n{up}"))).unwrap();
    let (code, report) = doctor(&cfg, &[]);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("ready: every essential check passed"),
        "{report}"
    );
}

/// Item 4: `doctor` loads a config whose `${VAR}`s are unset and names every one with every
/// place it is used (the upstreams that need them are not probed); an empty policy directory
/// fails; policies no server uses and servers no policy covers are warned about.
#[test]
fn doctor_names_unset_variables_empty_policies_and_uncovered_kinds() {
    const A: &str = "TOOLGATE_DOCTOR_TEST_TOKEN";
    const B: &str = "TOOLGATE_DOCTOR_TEST_TEAM";
    let dir = tempfile::tempdir().unwrap();
    let cfg = toolgate::demo::write_files(dir.path(), free_port(), "127.0.0.1:9".parse().unwrap())
        .unwrap();
    let base = std::fs::read_to_string(&cfg).unwrap();
    let text = base
        .replace(
            "  github: {url: \"http://127.0.0.1:9/mcp\"}",
            &format!(
                "  github: {{url: \"http://127.0.0.1:9/mcp\", headers: {{Authorization: \"Bearer ${{{A}}}\", X-Team: \"${{{B}}}\"}}}}"
            ),
        )
        .replace(
            "  files: {url: \"http://127.0.0.1:9/mcp\"}",
            &format!(
                "  files: {{command: [python3, \"-c\", \"pass\"], env: {{TOKEN: \"${{{A}}}\"}}}}"
            ),
        )
        .replace(
            "  shell: {url: \"http://127.0.0.1:9/mcp\"}",
            "  shell: {url: \"http://127.0.0.1:9/mcp\", resource_kind: mcp_sever}",
        );
    assert_ne!(text, base);
    std::fs::write(&cfg, &text).unwrap();
    std::fs::write(
        dir.path().join("policies/orphan.yaml"),
        "apiVersion: api.cerbos.dev/v1\nresourcePolicy: {resource: nobody_uses_me, version: default, rules: [{actions: [read], effect: EFFECT_ALLOW, roles: [admin]}]}\n",
    )
    .unwrap();

    let (code, report) = doctor(&cfg, &[A, B]);
    assert_eq!(
        code,
        Some(1),
        "the config loads despite unset variables:\n{report}"
    );
    let env: Vec<&str> = report.lines().filter(|l| l.contains(" env ")).collect();
    assert_eq!(env.len(), 2, "one line per variable:\n{report}");
    let a = env
        .iter()
        .find(|l| l.contains(&format!("${{{A}}}")))
        .unwrap();
    assert!(
        a.starts_with("FAIL ")
            && a.contains("$.servers.github.headers.Authorization")
            && a.contains("$.servers.files.env.TOKEN")
            && a.contains("toolgate.env"),
        "{a}"
    );
    let b = env
        .iter()
        .find(|l| l.contains(&format!("${{{B}}}")))
        .unwrap();
    assert!(b.contains("$.servers.github.headers.X-Team"), "{b}");
    let l = line_of(&report, "upstream", "github");
    assert!(
        l.starts_with("SKIP ") && l.contains(A) && l.contains(B),
        "{l}"
    );
    assert!(line_of(&report, "upstream", "files").starts_with("SKIP "));
    // The typo'd kind: no policy covers the server, and no server uses the orphan policy.
    let l = line_of(&report, "coverage", "shell");
    assert!(
        l.starts_with("WARN ") && l.contains("\"mcp_sever\"") && l.contains("denied"),
        "{l}"
    );
    assert!(
        report.lines().any(|l| l.starts_with("WARN ")
            && l.contains("\"nobody_uses_me\"")
            && l.contains("orphan.yaml")
            && l.contains("match no configured server")),
        "{report}"
    );

    // An empty policy directory: `serve` would refuse to start, so doctor fails it.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(&cfg, base.replace("dir: policies", "dir: empty")).unwrap();
    let (code, report) = doctor(&cfg, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("FAIL  policies") && l.contains("holds no policies")),
        "{report}"
    );
}
