//! The stdio supervisor on its own (no HTTP): real child processes started through the real
//! launcher (`toolgate __stdio-launch`), driven over their pipes.
//!
//! The fixture server is tests/peers/stdio_fixture.py (standard library only): it crashes,
//! hangs, writes garbage, floods stderr, leaves grandchildren behind or ignores SIGTERM on
//! demand. Every test runs in both containment modes where it matters: process group (always
//! available) and cgroup (where this machine lets us create cgroups; otherwise that half
//! prints a loud SKIPPED line, or fails under `TOOLGATE_REQUIRE_PEERS=1`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use toolgate::mcp::jsonrpc;
use toolgate::stdio::{
    Answer, CallError, ChildLimits, Isolation, OpenError, Pool, Server, Settings, procfs,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/stdio_fixture.py")
}

fn limits() -> ChildLimits {
    ChildLimits {
        max_line: 1024 * 1024,
        call_timeout: Duration::from_secs(10),
        grace: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(60),
    }
}

fn settings(name: &str, modes: &str, extra: &[&str]) -> Settings {
    let mut command = vec![
        "python3".to_string(),
        fixture().display().to_string(),
        modes.to_string(),
    ];
    command.extend(extra.iter().map(|s| s.to_string()));
    Settings {
        name: name.to_string(),
        command,
        env: Settings::child_env(std::env::vars(), &[("FIXTURE_NAME".into(), name.into())]),
        cwd: None,
        max_children: 4,
        limits: limits(),
    }
}

fn pool(isolation: Isolation) -> Pool {
    Pool::new(PathBuf::from(env!("CARGO_BIN_EXE_toolgate")), isolation, 8).unwrap()
}

/// Both pools, or only the process-group one (after a SKIPPED line; a failure under
/// `TOOLGATE_REQUIRE_PEERS=1`) where cgroups are not ours.
fn pools() -> Vec<Pool> {
    let mut out = vec![pool(Isolation::ProcessGroup)];
    match Pool::new(
        PathBuf::from(env!("CARGO_BIN_EXE_toolgate")),
        Isolation::Cgroup,
        8,
    ) {
        Ok(p) => out.push(p),
        // A missing capability, like a missing peer: loud, and a failure under
        // TOOLGATE_REQUIRE_PEERS=1 (CI runs as root, where the cgroup half runs).
        Err(e) => support::peers::missing(
            "the cgroup half of the stdio tests",
            "cgroup delegation (a capability)",
            &e,
            "run as root, or as a user with a delegated cgroup v2 subtree",
        ),
    }
    out
}

fn msg(v: Value) -> jsonrpc::Message {
    jsonrpc::parse(&jsonrpc::canonical(&v), jsonrpc::Limits::default()).unwrap()
}

async fn call(
    child: &Arc<toolgate::stdio::Child>,
    id: Value,
    name: &str,
    args: Value,
) -> Result<Value, CallError> {
    let m = msg(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": name, "arguments": args}}));
    match child.request(&m, &m.canonical(), false).await? {
        Answer::Json(b) => Ok(serde_json::from_slice(&b).unwrap()),
        Answer::Stream(_) => panic!("asked for JSON"),
    }
}

/// Waits until `f` holds, polling, or fails naming `what`.
async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: u32) -> bool {
    procfs::stat(pid).is_some_and(|s| !s.is_zombie())
}

/// Processes below this test process that are not zombies.
fn running_below_me() -> Vec<procfs::Stat> {
    procfs::descendants(std::process::id())
        .into_iter()
        .filter(|s| !s.is_zombie())
        .collect()
}

#[tokio::test]
async fn a_call_round_trips_with_the_callers_id() {
    let p = pool(Isolation::ProcessGroup);
    let server = p.server(settings("echo", "echo", &[]));
    let child = server.spawn().await.unwrap();
    let r = call(&child, json!("abc"), "echo", json!({"x": 1}))
        .await
        .unwrap();
    assert_eq!(r["id"], json!("abc"));
    assert_eq!(r["result"]["content"][0]["text"], json!("{\"x\": 1}"));
    let r = call(&child, json!(7), "get_sum", json!({"a": 2, "b": 3}))
        .await
        .unwrap();
    assert_eq!(r["id"], json!(7));
    assert_eq!(r["result"]["content"][0]["text"], json!("5"));
    // Two callers may use the same id at once: the child sees ids of ours.
    let (a, b) = tokio::join!(
        call(&child, json!(1), "echo", json!({"who": "a"})),
        call(&child, json!(2), "echo", json!({"who": "b"}))
    );
    assert_eq!(
        a.unwrap()["result"]["content"][0]["text"],
        json!("{\"who\": \"a\"}")
    );
    assert_eq!(
        b.unwrap()["result"]["content"][0]["text"],
        json!("{\"who\": \"b\"}")
    );
    p.shutdown(Duration::from_secs(10)).await;
    assert!(child.exited());
    assert_eq!(p.running(), 0);
}

#[tokio::test]
async fn the_same_id_twice_in_flight_is_refused() {
    let p = pool(Isolation::ProcessGroup);
    let server = p.server(settings("dup", "hang", &[]));
    let child = server.spawn().await.unwrap();
    // The first call is polled once, here: `request` registers its id before its first await,
    // so after that poll the call is in flight (an ordering, not a sleep). It never answers.
    let mut first = Box::pin(call(&child, json!(5), "hang", json!({})));
    let once = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(first.as_mut(), cx))
    })
    .await;
    assert!(once.is_pending(), "the hanging call answered: {once:?}");
    let second = call(&child, json!(5), "echo", json!({})).await;
    assert_eq!(second, Err(CallError::DuplicateId("5".into())));
    drop(first);
    p.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_crash_mid_call_is_a_clear_error() {
    let p = pool(Isolation::ProcessGroup);
    let server = p.server(settings("crashy", "crash", &[]));
    let child = server.spawn().await.unwrap();
    let err = call(&child, json!(1), "crash", json!({}))
        .await
        .unwrap_err();
    let CallError::Gone(why) = &err else {
        panic!("{err:?}")
    };
    assert!(
        why.contains("crashy") && why.contains("exit status 3"),
        "{why}"
    );
    // Later calls fail the same way, at once.
    let again = call(&child, json!(2), "echo", json!({})).await.unwrap_err();
    assert!(matches!(again, CallError::Gone(_)), "{again:?}");
    eventually("the slot is free", Duration::from_secs(5), || {
        p.running() == 0
    })
    .await;
}

#[tokio::test]
async fn a_hung_call_times_out_and_the_child_lives_on() {
    let p = pool(Isolation::ProcessGroup);
    let mut s = settings("hangs", "hang", &[]);
    // Long enough for a loaded machine to answer the echo below in time.
    s.limits.call_timeout = Duration::from_millis(1500);
    let server = p.server(s);
    let child = server.spawn().await.unwrap();
    let err = call(&child, json!(1), "hang", json!({})).await.unwrap_err();
    assert_eq!(err, CallError::Timeout(Duration::from_millis(1500)));
    let ok = call(&child, json!(1), "echo", json!({"after": true}))
        .await
        .unwrap();
    assert_eq!(ok["id"], json!(1));
    p.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn garbage_on_stdout_stops_the_child() {
    let p = pool(Isolation::ProcessGroup);
    let server = p.server(settings("noisy", "garbage", &[]));
    let child = server.spawn().await.unwrap();
    let err = call(&child, json!(1), "garbage", json!({}))
        .await
        .unwrap_err();
    let CallError::Gone(why) = &err else {
        panic!("{err:?}")
    };
    assert!(why.contains("not strict JSON"), "{why}");
    eventually("the child exits", Duration::from_secs(10), || {
        child.exited()
    })
    .await;
    eventually("the slot is free", Duration::from_secs(5), || {
        p.running() == 0
    })
    .await;
}

#[tokio::test]
async fn an_over_long_line_stops_the_child() {
    let p = pool(Isolation::ProcessGroup);
    let mut s = settings("long", "echo", &[]);
    s.limits.max_line = 200;
    let server = p.server(s);
    let child = server.spawn().await.unwrap();
    let err = call(&child, json!(1), "echo", json!({"pad": "y".repeat(400)}))
        .await
        .unwrap_err();
    let CallError::Gone(why) = &err else {
        panic!("{err:?}")
    };
    assert!(why.contains("the limit is 200"), "{why}");
    eventually("the child exits", Duration::from_secs(10), || {
        child.exited()
    })
    .await;
}

#[tokio::test]
async fn a_stderr_flood_does_not_block_calls() {
    let p = pool(Isolation::ProcessGroup);
    let server = p.server(settings("flood", "flood", &[]));
    let child = server.spawn().await.unwrap();
    for i in 0..3 {
        let r = call(&child, json!(i), "echo", json!({"i": i}))
            .await
            .unwrap();
        assert_eq!(r["id"], json!(i));
    }
    p.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn children_are_bounded_per_server_and_in_total() {
    let p = Pool::new(
        PathBuf::from(env!("CARGO_BIN_EXE_toolgate")),
        Isolation::ProcessGroup,
        3,
    )
    .unwrap();
    let mut s = settings("bounded", "echo", &[]);
    s.max_children = 2;
    let a = p.server(s.clone());
    let one = a.spawn().await.unwrap();
    let _two = a.spawn().await.unwrap();
    let full = a.spawn().await.unwrap_err();
    assert!(
        matches!(&full, OpenError::Full(m) if m.contains("servers.bounded.max_children")),
        "{full:?}"
    );
    s.name = "other".into();
    let b = p.server(s);
    let _three = b.spawn().await.unwrap();
    let full = b.spawn().await.unwrap_err();
    assert!(
        matches!(&full, OpenError::Full(m) if m.contains("stdio.max_children")),
        "{full:?}"
    );
    one.stop("test");
    eventually("a place frees up", Duration::from_secs(10), || {
        p.running() == 2
    })
    .await;
    a.spawn().await.unwrap();
    p.shutdown(Duration::from_secs(10)).await;
    assert_eq!(p.running(), 0);
}

#[tokio::test]
async fn an_idle_child_is_stopped() {
    let p = pool(Isolation::ProcessGroup);
    let mut s = settings("idle", "echo", &[]);
    s.limits.idle_timeout = Duration::from_millis(300);
    let server = p.server(s);
    let child = server.for_identity("alice@example.com").await.unwrap();
    call(&child, json!(1), "echo", json!({})).await.unwrap();
    let pid = child.pid();
    eventually("the idle child exits", Duration::from_secs(10), || {
        child.exited()
    })
    .await;
    assert!(!alive(pid));
    assert_eq!(p.running(), 0);
    // The identity gets a fresh child on its next call.
    let again = server.for_identity("alice@example.com").await.unwrap();
    assert_ne!(again.pid(), pid);
    p.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn one_child_per_identity_one_per_session() {
    let p = pool(Isolation::ProcessGroup);
    let server = p.server(settings("keys", "echo", &[]));
    let (a1, a2) = tokio::join!(server.for_identity("alice"), server.for_identity("alice"));
    assert_eq!(a1.unwrap().pid(), a2.unwrap().pid());
    let b = server.for_identity("bob").await.unwrap();
    let (sid, s1) = server.open_session().await.unwrap();
    assert_ne!(s1.pid(), b.pid());
    assert_eq!(server.session(&sid).unwrap().pid(), s1.pid());
    assert!(server.end_session(&sid));
    eventually("the session's child exits", Duration::from_secs(10), || {
        s1.exited()
    })
    .await;
    assert!(server.session(&sid).is_none());
    p.shutdown(Duration::from_secs(10)).await;
}

/// Stopping a child ends its grandchildren too, including one that left the process group.
#[tokio::test]
async fn stopping_ends_grandchildren_in_both_modes() {
    for p in pools() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pids");
        let server = p.server(settings(
            "forks",
            "fork,ignore-term",
            &[pidfile.to_str().unwrap()],
        ));
        let child = server.spawn().await.unwrap();
        call(&child, json!(1), "echo", json!({})).await.unwrap();
        let pids: Vec<u32> = std::fs::read_to_string(&pidfile)
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 3);
        assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
        if let Some(base) = p.cgroup_dir() {
            // Every one of them, the setsid one included, is in the child's cgroup.
            for pid in &pids {
                let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
                let leaf = base.file_name().unwrap().to_str().unwrap();
                assert!(cg.contains(&format!("/{leaf}/forks.")), "{pid}: {cg}");
            }
        }
        let launcher = child.pid();
        child.stop("test");
        eventually(
            &format!("{} mode: the launcher exits", p.isolation()),
            Duration::from_secs(10),
            || child.exited(),
        )
        .await;
        for pid in pids.iter().chain([&launcher]) {
            // Gone entirely: reaped by the launcher (a subreaper) or by us, never a zombie.
            assert!(
                procfs::stat(*pid).is_none(),
                "{} mode: pid {pid} is still there: {:?}",
                p.isolation(),
                procfs::stat(*pid)
            );
        }
        assert!(
            running_below_me().is_empty(),
            "{}: {:?}",
            p.isolation(),
            running_below_me()
        );
        if let Some(base) = p.cgroup_dir() {
            let child_dirs: Vec<_> = std::fs::read_dir(&base)
                .unwrap()
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .collect();
            assert!(child_dirs.is_empty(), "{child_dirs:?}");
        }
        p.shutdown(Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn a_missing_program_fails_the_spawn_clearly() {
    let p = pool(Isolation::ProcessGroup);
    let mut s = settings("missing", "echo", &[]);
    s.command = vec!["/nonexistent/mcp-server".into()];
    let server: Arc<Server> = p.server(s);
    let child = server.spawn().await.unwrap();
    let m = msg(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}));
    let err = child.request(&m, &m.canonical(), false).await.unwrap_err();
    let CallError::Gone(why) = &err else {
        panic!("{err:?}")
    };
    assert!(why.contains("exit status 127"), "{why}");
}

/// `toolgate doctor` checks every stdio command as its child would find it.
#[tokio::test]
async fn doctor_checks_each_stdio_command() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ids.yaml"), "{}\n").unwrap();
    let text = format!(
        "listen: [\"127.0.0.1:1\"]\ntls: off\nidentity: {{provider: static, static: ids.yaml}}\n\
         stdio: {{launcher: \"{}\"}}\n\
         policies: {{dir: {}}}\naudit: {{sqlite: audit.db}}\nservers:\n  good: {{command: [python3, x.py]}}\n\
         \x20 missing: {{command: [no-such-mcp-server]}}\n  notexec: {{command: [\"{}\"]}}\n  web: {{url: \"http://127.0.0.1:9/mcp\"}}\n",
        env!("CARGO_BIN_EXE_toolgate"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/peers/stdio_policies")
            .display(),
        fixture().display()
    );
    let cfg = toolgate::config::Config::parse("t.yaml", text.as_bytes(), dir.path()).unwrap();
    let checks = toolgate::doctor::run_checks(&cfg).await;
    let stdio: Vec<String> = checks
        .iter()
        .filter(|c| c.what == "stdio")
        .map(|c| format!("{} {}", c.verdict, c.detail))
        .collect();
    assert_eq!(stdio.len(), 3, "{stdio:?}");
    assert!(
        stdio
            .iter()
            .any(|l| l.starts_with("OK servers.good: ") && l.contains("python3")),
        "{stdio:?}"
    );
    assert!(
        stdio
            .iter()
            .any(|l| l
                .starts_with("FAIL servers.missing: `no-such-mcp-server` is not an executable")),
        "{stdio:?}"
    );
    assert!(
        stdio
            .iter()
            .any(|l| l.starts_with("FAIL servers.notexec: ") && l.contains("not executable")),
        "{stdio:?}"
    );
}
