//! The launcher (`toolgate __stdio-launch`): the one process between toolgate and a stdio MCP
//! server, there so that no child or grandchild outlives toolgate, even after `kill -9`.
//!
//! toolgate starts the launcher with the server's stdin, stdout, stderr, environment and
//! working directory; the launcher starts the server with all of them inherited, in a new
//! process group, and then only waits. The bytes never pass through it. What it guarantees:
//!
//! - **toolgate dies, however** (`kill -9` included): the kernel sends the launcher SIGTERM
//!   (`PR_SET_PDEATHSIG`, set before the server starts; a toolgate that died even earlier is
//!   caught by checking the parent pid after setting it). The launcher then stops the server.
//! - **Stopping** (SIGTERM from toolgate, or the above): SIGTERM to the server's process group
//!   (and, in a cgroup, to every process in it), up to `--grace-ms` for them to exit, then
//!   SIGKILL to the group (`cgroup.kill` in a cgroup).
//! - **Grandchildren** (`npx` starts `sh`, which starts `node`): the launcher is a child
//!   subreaper (`PR_SET_CHILD_SUBREAPER`), so a descendant whose parent exits is re-parented to
//!   it rather than to init. After the group is gone it kills every child it still has
//!   (descendants that left the group with `setsid`) and reaps them: no zombie is left
//!   behind either. In a cgroup (see `cgroup.rs`) nothing can escape at all.
//! - **The server exits by itself**: whatever it left running in its group or cgroup is
//!   stopped the same way, and the launcher exits with the server's status (128+signal when
//!   it was killed by a signal).
//!
//! What it does not cover: the launcher itself being SIGKILLed by someone else while toolgate
//! lives (toolgate then kills the child's cgroup, when it has one; under systemd the unit's
//! cgroup is killed when the unit stops). `PR_SET_PDEATHSIG` fires when the *thread* that
//! started the launcher ends, so toolgate starts launchers from one thread that lives as long
//! as the process (`Spawner` in `child.rs`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use rustix::process::{Pid, Signal};

use super::{cgroup, procfs};

/// Arguments of `toolgate __stdio-launch`.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// The pid of the toolgate that starts this launcher (checked after PR_SET_PDEATHSIG).
    #[arg(long)]
    pub parent: u32,
    /// How long the server may take to exit after SIGTERM before it is SIGKILLed.
    #[arg(long, default_value_t = 2000)]
    pub grace_ms: u64,
    /// A cgroup v2 directory to run the server in (created by toolgate, empty).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The server's command line.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

/// Exit status when the launcher itself failed before the server ran.
const EXIT_LAUNCH: u8 = 125;
/// Exit status when the server's program could not be started.
const EXIT_NOT_FOUND: u8 = 127;

fn say(msg: &str) {
    // stderr is the server's stderr too: toolgate logs it with the server's name.
    eprintln!("toolgate launcher: {msg}");
}

/// Runs the launcher; returns its exit code.
pub fn run(args: &LaunchArgs) -> ExitCode {
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(Signal::TERM)) {
        say(&format!("cannot set the parent-death signal: {e}"));
        return ExitCode::from(EXIT_LAUNCH);
    }
    let parent = rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32);
    if parent != Some(args.parent) {
        // toolgate died before the parent-death signal was armed: start nothing.
        return ExitCode::from(EXIT_LAUNCH);
    }
    let me = rustix::process::getpid();
    if let Err(e) = rustix::process::set_child_subreaper(Some(me)) {
        say(&format!("cannot become a child subreaper: {e}"));
        return ExitCode::from(EXIT_LAUNCH);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("cannot start: {e}"));
            return ExitCode::from(EXIT_LAUNCH);
        }
    };
    rt.block_on(supervise(args))
}

/// What ended the wait.
enum End {
    /// The server exited with this status.
    Exited(rustix::process::WaitStatus),
    /// We were told to stop (SIGTERM, SIGINT, SIGHUP, or toolgate's death).
    Stop,
}

async fn supervise(args: &LaunchArgs) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first: a SIGTERM that arrives once the server runs must be ours to handle.
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        say("cannot install signal handlers");
        return ExitCode::from(EXIT_LAUNCH);
    };
    let me = std::process::id();
    let mut cg = args.cgroup.clone();
    if let Some(dir) = &cg {
        if let Err(e) = cgroup::join(dir, me) {
            say(&format!(
                "{e}; the server is contained by its process group only"
            ));
            cg = None;
        }
    }
    let Some((program, rest)) = args.command.split_first() else {
        say("no command");
        return ExitCode::from(EXIT_LAUNCH);
    };
    let mut cmd = std::process::Command::new(program);
    std::os::unix::process::CommandExt::process_group(cmd.args(rest), 0);
    let spawned = cmd.spawn();
    // Back out of the child's cgroup, so that it holds exactly the server's processes.
    if let Some(dir) = &cg {
        if let Some(parent) = dir.parent() {
            if let Err(e) = cgroup::join(parent, me) {
                say(&e);
            }
        }
    }
    let server = match spawned {
        Ok(c) => c.id(),
        Err(e) => {
            say(&format!("cannot start {program:?}: {e}"));
            if let Some(dir) = &cg {
                let _ = std::fs::remove_dir(dir);
            }
            return ExitCode::from(EXIT_NOT_FOUND);
        }
    };
    let Some(group) = Pid::from_raw(server as i32) else {
        return ExitCode::from(EXIT_LAUNCH);
    };
    let mut reaped = reaper();
    let end = loop {
        tokio::select! {
            r = reaped.recv() => match r {
                Some((pid, status)) if pid == server => break End::Exited(status),
                Some(_) => {}
                None => break End::Stop,
            },
            _ = term.recv() => break End::Stop,
            _ = int.recv() => break End::Stop,
            _ = hup.recv() => break End::Stop,
        }
    };
    let grace = Duration::from_millis(args.grace_ms);
    let mut status = None;
    if let End::Exited(s) = end {
        status = Some(s);
    }
    // Stop the group (and cgroup): SIGTERM, up to `grace` to go, then SIGKILL.
    let _ = rustix::process::kill_process_group(group, Signal::TERM);
    if let Some(dir) = &cg {
        cgroup::signal(dir, Signal::TERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let group_gone = rustix::process::test_kill_process_group(group).is_err();
        let cgroup_gone = cg.as_deref().is_none_or(|d| !cgroup::populated(d));
        if group_gone && cgroup_gone && status.is_some() {
            break;
        }
        let tick = tokio::time::sleep(Duration::from_millis(10));
        tokio::select! {
            r = reaped.recv() => {
                if let Some((pid, s)) = r {
                    if pid == server {
                        status = Some(s);
                    }
                }
            }
            _ = tick => {}
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    let _ = rustix::process::kill_process_group(group, Signal::KILL);
    if let Some(dir) = &cg {
        cgroup::kill(dir);
    }
    // Whatever is still our child (left the group, or was re-parented to us): SIGKILL, reap.
    let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(2);
    loop {
        let mine: Vec<procfs::Stat> = procfs::all().into_iter().filter(|s| s.ppid == me).collect();
        let cgroup_gone = cg.as_deref().is_none_or(|d| !cgroup::populated(d));
        if mine.is_empty() && cgroup_gone {
            break;
        }
        for s in mine.iter().filter(|s| !s.is_zombie()) {
            if let Some(p) = Pid::from_raw(s.pid as i32) {
                let _ = rustix::process::kill_process(p, Signal::KILL);
                if s.pgrp == s.pid {
                    let _ = rustix::process::kill_process_group(p, Signal::KILL);
                }
            }
        }
        if let Some(dir) = &cg {
            cgroup::kill(dir);
        }
        if tokio::time::Instant::now() >= deadline {
            say("some processes did not go away after SIGKILL");
            break;
        }
        let tick = tokio::time::sleep(Duration::from_millis(10));
        tokio::select! {
            r = reaped.recv() => {
                if let Some((pid, s)) = r {
                    if pid == server {
                        status = Some(s);
                    }
                }
            }
            _ = tick => {}
        }
    }
    if let Some(dir) = &cg {
        let _ = std::fs::remove_dir(dir);
    }
    match status {
        Some(s) => match (s.exit_status(), s.terminating_signal()) {
            (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
            _ => ExitCode::from(1),
        },
        // Stopped before the server exited by itself: 128 + SIGTERM.
        None => ExitCode::from(143),
    }
}

/// Reaps every child (the server and whatever is re-parented to us) on a thread of its own,
/// reporting (pid, status).
fn reaper() -> tokio::sync::mpsc::UnboundedReceiver<(u32, rustix::process::WaitStatus)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            loop {
                match rustix::process::wait(rustix::process::WaitOptions::empty()) {
                    Ok(Some((pid, status))) => {
                        let pid = pid.as_raw_nonzero().get() as u32;
                        if tx.send((pid, status)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(rustix::io::Errno::INTR) => {}
                    // No children right now; more may be re-parented to us.
                    Err(_) => {
                        if tx.is_closed() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        say(&format!("cannot start the reaper thread: {e}"));
    }
    rx
}
