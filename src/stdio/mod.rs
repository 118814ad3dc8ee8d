//! stdio MCP servers behind the gate: toolgate starts them, speaks newline-delimited JSON-RPC
//! on their pipes, bounds them, stops them when idle, and leaves nothing running behind.
//!
//! - [`Pool`]: every stdio child of this toolgate: the launcher binary, the containment mode
//!   (cgroup or process group, see [`launch`] and [`cgroup`]), the total bound, shutdown.
//! - [`Server`]: one configured `servers.<name>` with a `command`: its children by MCP session
//!   (one child per session: a stdio server keeps per-client state, and one caller must never
//!   see another's) and, for stateless (2026-07-28) callers, by caller identity (one child per
//!   identity, reused until idle).
//! - [`child::Child`]: one running server, its pipes and its stop sequence.
//!
//! Nothing here decides or audits: the MCP proxy does that for every message before it calls
//! in here, exactly as for an HTTP upstream.

pub mod cgroup;
pub mod child;
pub mod launch;
pub mod procfs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

pub use child::{Answer, CallError, Child, ChildLimits};

/// Default bound on the children of one server.
pub const DEFAULT_MAX_CHILDREN: usize = 16;
/// Default bound on all stdio children of one toolgate.
pub const DEFAULT_MAX_TOTAL: usize = 64;
/// Default idle time after which a child is stopped.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time a child gets to exit after stdin closes, and after SIGTERM.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);
/// Default longest line a child may write on stdout.
pub const DEFAULT_MAX_LINE: usize = 8 * 1024 * 1024;

/// Variables passed from toolgate's own environment to every child; everything else a child
/// gets must be named in its `env` (toolgate's environment may hold other servers' secrets).
pub const PASSED_ENV: [&str; 9] = [
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME",
];

/// How children are contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// A cgroup per child where toolgate may create cgroups, else a process group.
    #[default]
    Auto,
    /// A cgroup per child; start-up fails where that is impossible.
    Cgroup,
    /// A process group per child (with the launcher's parent-death signal and subreaper).
    ProcessGroup,
}

/// One stdio server, as configured (environment already resolved).
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    /// argv: the program (looked up in the child's `PATH`) and its arguments.
    pub command: Vec<String>,
    /// The child's whole environment.
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub max_children: usize,
    pub limits: ChildLimits,
}

impl Settings {
    /// The environment a child gets: [`PASSED_ENV`] from `daemon_env`, then `env` on top.
    pub fn child_env(
        daemon_env: impl Iterator<Item = (String, String)>,
        env: &[(String, String)],
    ) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = daemon_env
            .filter(|(k, _)| PASSED_ENV.contains(&k.as_str()))
            .collect();
        for (k, v) in env {
            out.retain(|(ok, _)| ok != k);
            out.push((k.clone(), v.clone()));
        }
        out
    }
}

/// Why no child could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// A bound is reached: answer 503 and let the caller retry.
    #[error("{0}")]
    Full(String),
    #[error("cannot start stdio server {server}: {why}")]
    Spawn { server: String, why: String },
}

/// Starts launchers from one thread that lives as long as the pool: the launcher's
/// parent-death signal fires when the *thread* that forked it ends (prctl(2)), so children
/// must never be forked from a runtime thread that may exit while they run.
struct Spawner {
    tx: Mutex<std::sync::mpsc::Sender<SpawnJob>>,
}

type SpawnJob = (
    tokio::process::Command,
    tokio::sync::oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

impl Spawner {
    fn start(handle: tokio::runtime::Handle) -> std::io::Result<Spawner> {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("stdio-spawner".into())
            .spawn(move || {
                let _enter = handle.enter();
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        Ok(Spawner { tx: Mutex::new(tx) })
    }

    async fn spawn(&self, cmd: tokio::process::Command) -> std::io::Result<tokio::process::Child> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .lock()
            .map_err(|_| std::io::Error::other("spawner poisoned"))?
            .send((cmd, reply))
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
    }
}

/// Tells when a child's process has exited (`Some(how)`).
type ExitWatch = tokio::sync::watch::Receiver<Option<String>>;

struct PoolInner {
    launcher: PathBuf,
    cgroups: Option<cgroup::Base>,
    max_total: usize,
    running: AtomicUsize,
    seq: AtomicU64,
    spawner: OnceLock<Result<Spawner, String>>,
    /// Every child started, with its exit (known even once the child itself is dropped).
    children: Mutex<Vec<(Weak<Child>, ExitWatch)>>,
}

/// Every stdio child of this toolgate.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("isolation", &self.isolation())
            .field("running", &self.running())
            .finish()
    }
}

impl Pool {
    /// A pool whose children are started through `launcher` (`toolgate`, run as
    /// `toolgate __stdio-launch`), contained as `isolation` says.
    pub fn new(launcher: PathBuf, isolation: Isolation, max_total: usize) -> Result<Pool, String> {
        let cgroups = match isolation {
            Isolation::ProcessGroup => None,
            Isolation::Cgroup => Some(
                cgroup::Base::create()
                    .map_err(|e| format!("stdio.isolation cgroup: cannot use cgroups: {e}"))?,
            ),
            Isolation::Auto => match cgroup::Base::create() {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::info!(
                        "stdio children are contained by process groups (no cgroup: {e})"
                    );
                    None
                }
            },
        };
        if let Some(b) = &cgroups {
            tracing::info!(cgroup = %b.dir.display(), "stdio children are contained by cgroups");
        }
        Ok(Pool {
            inner: Arc::new(PoolInner {
                launcher,
                cgroups,
                max_total,
                running: AtomicUsize::new(0),
                seq: AtomicU64::new(0),
                spawner: OnceLock::new(),
                children: Mutex::new(Vec::new()),
            }),
        })
    }

    /// `cgroup` or `process_group`.
    pub fn isolation(&self) -> &'static str {
        if self.inner.cgroups.is_some() {
            "cgroup"
        } else {
            "process_group"
        }
    }

    /// The base cgroup, in cgroup mode.
    pub fn cgroup_dir(&self) -> Option<PathBuf> {
        self.inner.cgroups.as_ref().map(|b| b.dir.clone())
    }

    /// Children running now (counted until their process has exited).
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::SeqCst)
    }

    pub fn server(&self, settings: Settings) -> Arc<Server> {
        Arc::new(Server {
            settings,
            pool: self.clone(),
            running: Arc::new(AtomicUsize::new(0)),
            sessions: Mutex::new(HashMap::new()),
            identities: Mutex::new(HashMap::new()),
            identity_spawn: tokio::sync::Mutex::new(()),
        })
    }

    /// Stops every child and waits (bounded) for them to exit; then removes the cgroups.
    pub async fn shutdown(&self, within: Duration) {
        let children: Vec<_> = self
            .inner
            .children
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        for c in children.iter().filter_map(|(w, _)| w.upgrade()) {
            c.stop("toolgate is shutting down");
        }
        let all =
            futures_util::future::join_all(children.into_iter().map(|(_, mut rx)| async move {
                let _ = rx.wait_for(Option::is_some).await;
            }));
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!("some stdio servers did not exit in time");
        }
        if let Some(b) = &self.inner.cgroups {
            let b = b.clone();
            let _ = tokio::task::spawn_blocking(move || b.remove()).await;
        }
    }

    fn spawner(&self) -> Result<&Spawner, String> {
        self.inner
            .spawner
            .get_or_init(|| {
                let handle = tokio::runtime::Handle::try_current()
                    .map_err(|e| format!("no async runtime: {e}"))?;
                Spawner::start(handle).map_err(|e| format!("cannot start the spawner thread: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // The spawner thread ends with the pool; the launchers it started then get their
        // parent-death signal and stop their servers. The cgroups go too.
        if let Some(b) = &self.cgroups {
            b.remove();
        }
    }
}

/// A reserved place for one child, freed when its process has exited.
struct Slot {
    pool: Arc<PoolInner>,
    server: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.running.fetch_sub(1, Ordering::SeqCst);
        self.server.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Increments `n` if it stays within `max`.
fn take(n: &AtomicUsize, max: usize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
        (v < max).then_some(v + 1)
    })
    .is_ok()
}

/// One configured stdio server and its children.
pub struct Server {
    pub settings: Settings,
    pool: Pool,
    running: Arc<AtomicUsize>,
    sessions: Mutex<HashMap<String, Arc<Child>>>,
    identities: Mutex<HashMap<String, Arc<Child>>>,
    /// One child per identity even when its first calls arrive together.
    identity_spawn: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.settings.name)
            .field("running", &self.running())
            .finish()
    }
}

impl Server {
    /// Children of this server running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Starts a new child (bounded per server and in total).
    pub async fn spawn(self: &Arc<Self>) -> Result<Arc<Child>, OpenError> {
        let s = &self.settings;
        let pool = &self.pool.inner;
        if !take(&self.running, s.max_children) {
            return Err(OpenError::Full(format!(
                "stdio server {} already runs {} children (servers.{}.max_children)",
                s.name, s.max_children, s.name
            )));
        }
        if !take(&pool.running, pool.max_total) {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return Err(OpenError::Full(format!(
                "toolgate already runs {} stdio children (stdio.max_children)",
                pool.max_total
            )));
        }
        let slot = Slot {
            pool: pool.clone(),
            server: self.running.clone(),
        };
        let spawn_err = |why: String| OpenError::Spawn {
            server: s.name.clone(),
            why,
        };
        let name = format!(
            "{}.{}",
            s.name,
            pool.seq.fetch_add(1, Ordering::Relaxed) + 1
        );
        let cgroup = match &pool.cgroups {
            Some(b) => match b.child(&name) {
                Ok(d) => Some(d),
                Err(e) => return Err(spawn_err(e)),
            },
            None => None,
        };
        let mut cmd = tokio::process::Command::new(&pool.launcher);
        cmd.arg("__stdio-launch")
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--grace-ms")
            .arg(s.limits.grace.as_millis().to_string());
        if let Some(dir) = &cgroup {
            cmd.arg("--cgroup").arg(dir);
        }
        cmd.arg("--")
            .args(&s.command)
            .env_clear()
            .envs(s.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(dir) = &s.cwd {
            cmd.current_dir(dir);
        }
        let spawner = self.pool.spawner().map_err(&spawn_err)?;
        let process = match spawner.spawn(cmd).await {
            Ok(p) => p,
            Err(e) => {
                if let Some(dir) = &cgroup {
                    let _ = std::fs::remove_dir(dir);
                }
                return Err(spawn_err(format!("{}: {e}", pool.launcher.display())));
            }
        };
        let me = Arc::downgrade(self);
        let forget = name.clone();
        let child = Child::start(child::Started {
            process,
            name,
            server: s.name.clone(),
            limits: s.limits.clone(),
            cgroup,
            on_exit: Box::new(move || {
                drop(slot);
                if let Some(server) = me.upgrade() {
                    server.forget(&forget);
                }
            }),
        })
        .map_err(spawn_err)?;
        if let Ok(mut c) = pool.children.lock() {
            c.retain(|(_, rx)| rx.borrow().is_none());
            c.push((Arc::downgrade(&child), child.exit_watch()));
        }
        tracing::info!(child = %child.name, pid = child.pid(), "started stdio server");
        Ok(child)
    }

    /// Removes every entry naming child `name`.
    fn forget(&self, name: &str) {
        if let Ok(mut m) = self.sessions.lock() {
            m.retain(|_, c| c.name != name);
        }
        if let Ok(mut m) = self.identities.lock() {
            m.retain(|_, c| c.name != name);
        }
    }

    /// A new session with a child of its own; returns the session id (random, 122 bits).
    pub async fn open_session(self: &Arc<Self>) -> Result<(String, Arc<Child>), OpenError> {
        let child = self.spawn().await?;
        let sid = uuid::Uuid::new_v4().to_string();
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(sid.clone(), child.clone());
        }
        Ok((sid, child))
    }

    /// The child of session `sid`, if it still runs.
    pub fn session(&self, sid: &str) -> Option<Arc<Child>> {
        self.sessions
            .lock()
            .ok()
            .and_then(|m| m.get(sid).cloned())
            .filter(|c| c.gone().is_none())
    }

    /// Ends session `sid` and stops its child.
    pub fn end_session(&self, sid: &str) -> bool {
        let child = self.sessions.lock().ok().and_then(|mut m| m.remove(sid));
        match child {
            Some(c) => {
                c.stop(&format!(
                    "stdio server {}: the session ended",
                    self.settings.name
                ));
                true
            }
            None => false,
        }
    }

    /// The child serving stateless calls of `principal`, started if needed.
    pub async fn for_identity(self: &Arc<Self>, principal: &str) -> Result<Arc<Child>, OpenError> {
        let existing = |s: &Self| {
            s.identities
                .lock()
                .ok()
                .and_then(|m| m.get(principal).cloned())
                .filter(|c| c.gone().is_none())
        };
        if let Some(c) = existing(self) {
            return Ok(c);
        }
        let _one = self.identity_spawn.lock().await;
        if let Some(c) = existing(self) {
            return Ok(c);
        }
        let child = self.spawn().await?;
        if let Ok(mut m) = self.identities.lock() {
            m.insert(principal.to_string(), child.clone());
        }
        Ok(child)
    }

    /// Sessions whose stream of server messages is open (for tests and metrics).
    pub fn streams(&self) -> usize {
        self.sessions
            .lock()
            .map(|m| m.values().filter(|c| c.listening()).count())
            .unwrap_or(0)
    }

    /// Live sessions (for tests and metrics).
    pub fn sessions(&self) -> usize {
        self.sessions.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// Where `command[0]` resolves for a child with environment `env` started in `cwd`: a path
/// (with `/`) taken from `cwd`, or a name searched in the child's `PATH`. `Err` says why it
/// cannot run: missing, not a file, not executable, no `PATH` entry has it.
pub fn resolve_program(
    command: &[String],
    env: &[(String, String)],
    cwd: Option<&std::path::Path>,
) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let program = command.first().ok_or("the command is empty")?;
    if let Some(dir) = cwd {
        if !dir.is_dir() {
            return Err(format!("cwd {} is not a directory", dir.display()));
        }
    }
    let runnable = |p: &std::path::Path| -> Result<(), String> {
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a file", p.display()));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(format!("{} is not executable", p.display()));
        }
        Ok(())
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        let p = match cwd {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        };
        runnable(&p)?;
        return Ok(p);
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = std::path::Path::new(dir).join(program);
        if runnable(&p).is_ok() {
            return Ok(p);
        }
    }
    Err(format!(
        "`{program}` is not an executable in the child's PATH ({path})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_by_path_or_search() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("server");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let plain = dir.path().join("notes.txt");
        std::fs::write(&plain, "x").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = vec![(
            "PATH".to_string(),
            format!("/nonexistent:{}", dir.path().display()),
        )];
        assert_eq!(
            resolve_program(&["server".into()], &env, None).unwrap(),
            exe
        );
        assert_eq!(
            resolve_program(&["./server".into()], &[], Some(dir.path())).unwrap(),
            dir.path().join("./server")
        );
        let e = resolve_program(&["missing".into()], &env, None).unwrap_err();
        assert!(e.contains("not an executable in the child's PATH"), "{e}");
        let e = resolve_program(&[plain.display().to_string()], &env, None).unwrap_err();
        assert!(e.contains("not executable"), "{e}");
        let e =
            resolve_program(&["server".into()], &env, Some(&dir.path().join("nope"))).unwrap_err();
        assert!(e.contains("is not a directory"), "{e}");
        assert!(resolve_program(&[], &env, None).is_err());
    }

    #[test]
    fn the_child_environment_is_an_allowlist_plus_env() {
        let daemon = vec![
            ("PATH".to_string(), "/usr/bin".to_string()),
            ("HOME".to_string(), "/var/lib/toolgate".to_string()),
            ("GITHUB_MCP_TOKEN".to_string(), "secret".to_string()),
            ("TS_AUTHKEY".to_string(), "tskey-secret".to_string()),
        ];
        let env = vec![
            ("ROOT".to_string(), "/srv".to_string()),
            ("HOME".to_string(), "/srv/home".to_string()),
        ];
        let got = Settings::child_env(daemon.into_iter(), &env);
        assert_eq!(
            got,
            vec![
                ("PATH".to_string(), "/usr/bin".to_string()),
                ("ROOT".to_string(), "/srv".to_string()),
                ("HOME".to_string(), "/srv/home".to_string()),
            ]
        );
    }

    #[test]
    fn bounded_counters() {
        let n = AtomicUsize::new(0);
        assert!(take(&n, 2));
        assert!(take(&n, 2));
        assert!(!take(&n, 2));
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }
}
