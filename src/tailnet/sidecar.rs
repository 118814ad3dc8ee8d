//! `tailnet.mode: sidecar`: toolgate starts and supervises its own `tailscaled`, so the
//! gateway is its own tailnet node (`toolgate.<tailnet>.ts.net`, tsnet-style) whatever the
//! host runs (reference/tailscale.md §3.6 shape 2).
//!
//! The daemon runs with `--tun=userspace-networking` (no TUN device, no CAP_NET_ADMIN), its
//! own `--statedir` and `--socket`, a loopback `--socks5-server` for dialing tailnet upstreams,
//! and `--no-logs-no-support` (plus `TS_NO_LOGS_NO_SUPPORT=true`) unless `tailnet.logs: true`.
//! Its output goes to `<state_dir>/tailscaled.log`. If it exits, it is restarted after a
//! backoff (0.5 s doubling to 30 s, each delay jittered; reset after a minute of uptime). On shutdown it gets
//! SIGTERM by pid, then SIGKILL after a grace period; the child is also `kill_on_drop`, so it
//! never outlives toolgate's runtime.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::localapi::LocalApi;
use crate::config::TailnetConfig;

/// First pause before a restart.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest pause before a restart.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Uptime after which the backoff starts over.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// How long tailscaled may take to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long `start` waits for the LocalAPI to answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to run the sidecar tailscaled.
#[derive(Clone, Debug)]
pub struct SidecarSettings {
    /// The tailscaled binary.
    pub binary: PathBuf,
    /// `--statedir`.
    pub state_dir: PathBuf,
    /// `--socket`.
    pub socket: PathBuf,
    /// `--socks5-server`.
    pub socks5: Option<SocketAddr>,
    /// Tailscale log upload (`false`: `--no-logs-no-support`).
    pub logs: bool,
    /// First and longest restart pauses.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl SidecarSettings {
    /// From `tailnet:`.
    pub fn from_config(t: &TailnetConfig) -> Self {
        Self {
            binary: t.tailscaled.clone(),
            state_dir: t.state_dir.clone(),
            socket: t.sidecar_socket(),
            socks5: t.socks5_addr(),
            logs: t.logs,
            backoff_min: BACKOFF_MIN,
            backoff_max: BACKOFF_MAX,
        }
    }

    /// tailscaled's arguments.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--tun=userspace-networking".into()];
        let mut flag = |name: &str, v: &std::path::Path| {
            let mut s = OsString::from(name);
            s.push(v.as_os_str());
            a.push(s);
        };
        flag("--statedir=", &self.state_dir);
        flag("--socket=", &self.socket);
        if !self.logs {
            a.push("--no-logs-no-support".into());
        }
        if let Some(s) = self.socks5 {
            a.push(format!("--socks5-server={s}").into());
        }
        a
    }

    /// Environment set for tailscaled (on top of toolgate's, minus `TS_AUTHKEY`).
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        let mut e = vec![("TS_LOGS_DIR", self.state_dir.join("logs").into_os_string())];
        if !self.logs {
            e.push(("TS_NO_LOGS_NO_SUPPORT", "true".into()));
        }
        e
    }

    fn command(&self) -> Result<Command, String> {
        let log_path = self.state_dir.join("tailscaled.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.args())
            .env_remove("TS_AUTHKEY")
            // tailscaled speaks sd_notify too: only toolgate reports readiness to systemd.
            .env_remove(crate::systemd::NOTIFY_SOCKET)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        Ok(cmd)
    }
}

/// A running, supervised sidecar tailscaled. Dropping it stops the supervisor and kills the
/// child; [`Sidecar::stop`] stops it gracefully.
pub struct Sidecar {
    settings: SidecarSettings,
    stop_tx: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    pid: Arc<AtomicU32>,
    starts: Arc<AtomicU64>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("binary", &self.settings.binary)
            .field("socket", &self.settings.socket)
            .field("pid", &self.pid())
            .field("starts", &self.starts())
            .finish()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.stop_tx.send(true);
        if let Some(t) = self.task.take() {
            // Aborting drops the Child, and kill_on_drop kills it.
            t.abort();
        }
    }
}

impl Sidecar {
    /// Creates the state directory, starts tailscaled and its supervisor, and waits until its
    /// LocalAPI answers (at most [`READY_TIMEOUT`]).
    pub async fn start(settings: SidecarSettings) -> Result<Sidecar, String> {
        create_private_dir(&settings.state_dir)?;
        if let Some(parent) = settings.socket.parent() {
            create_private_dir(parent)?;
        }
        // A stale socket from a previous run would make the readiness check talk to nothing.
        let _ = std::fs::remove_file(&settings.socket);
        let child = spawn(&settings)?;
        let pid = Arc::new(AtomicU32::new(child.id().unwrap_or(0)));
        let starts = Arc::new(AtomicU64::new(1));
        tracing::info!(
            binary = %settings.binary.display(),
            pid = pid.load(Ordering::Relaxed),
            socket = %settings.socket.display(),
            socks5 = ?settings.socks5,
            logs = settings.logs,
            "started the sidecar tailscaled (userspace networking)"
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(
            settings.clone(),
            child,
            stop_rx,
            pid.clone(),
            starts.clone(),
        ));
        let sidecar = Sidecar {
            settings,
            stop_tx,
            task: Some(task),
            pid,
            starts,
        };
        sidecar.wait_ready(READY_TIMEOUT).await?;
        Ok(sidecar)
    }

    /// A LocalAPI client for the sidecar's socket.
    pub fn localapi(&self) -> LocalApi {
        LocalApi::unix(&self.settings.socket)
    }

    /// The current tailscaled's pid (None while it is being restarted).
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// How many times tailscaled was started (1 + restarts).
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed)
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &SidecarSettings {
        &self.settings
    }

    /// Waits until the LocalAPI answers `status`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let api = self.localapi();
        let deadline = Instant::now() + timeout;
        loop {
            match api.status().await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "the sidecar tailscaled did not answer on {} within {}s: {e} (see {})",
                        self.settings.socket.display(),
                        timeout.as_secs(),
                        self.settings.state_dir.join("tailscaled.log").display()
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Stops tailscaled (SIGTERM by pid, SIGKILL after [`STOP_GRACE`]) and the supervisor.
    pub async fn stop(mut self) {
        let _ = self.stop_tx.send(true);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(STOP_GRACE + Duration::from_secs(2), t).await;
        }
    }
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

fn spawn(settings: &SidecarSettings) -> Result<Child, String> {
    settings.command()?.spawn().map_err(|e| {
        format!(
            "cannot start tailscaled {:?} (tailnet.tailscaled): {e}",
            settings.binary.display().to_string()
        )
    })
}

/// SIGTERM by pid (through `kill(1)`: this crate has no unsafe code), then SIGKILL.
async fn terminate(child: &mut Child) {
    let Some(pid) = child.id() else { return };
    let sent = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false);
    if sent {
        if let Ok(Ok(status)) = tokio::time::timeout(STOP_GRACE, child.wait()).await {
            tracing::info!(pid, %status, "the sidecar tailscaled stopped");
            return;
        }
        tracing::warn!(
            pid,
            "the sidecar tailscaled did not stop on SIGTERM; killing it"
        );
    }
    let _ = child.kill().await;
}

async fn supervise(
    settings: SidecarSettings,
    mut child: Child,
    mut stop: watch::Receiver<bool>,
    pid: Arc<AtomicU32>,
    starts: Arc<AtomicU64>,
) {
    let mut backoff = crate::backoff::Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut started = Instant::now();
    loop {
        tokio::select! {
            status = child.wait() => {
                pid.store(0, Ordering::Relaxed);
                if started.elapsed() >= BACKOFF_RESET_AFTER {
                    backoff.reset();
                }
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                tracing::error!(%status, restart_within_ms = u64::try_from(backoff.step().as_millis()).unwrap_or(u64::MAX), "the sidecar tailscaled exited; restarting it");
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                terminate(&mut child).await;
                pid.store(0, Ordering::Relaxed);
                return;
            }
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match spawn(&settings) {
                Ok(c) => {
                    child = c;
                    started = Instant::now();
                    pid.store(child.id().unwrap_or(0), Ordering::Relaxed);
                    starts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        pid = pid.load(Ordering::Relaxed),
                        "restarted the sidecar tailscaled"
                    );
                    break;
                }
                Err(e) => tracing::error!("{e}; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_always_keep_logs_off_by_default() {
        let cfg = TailnetConfig {
            state_dir: "/s".into(),
            socks5: "127.0.0.1:1081".parse().ok(),
            ..TailnetConfig::default()
        };
        let s = SidecarSettings::from_config(&cfg);
        let args: Vec<String> = s
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--tun=userspace-networking",
                "--statedir=/s",
                "--socket=/s/tailscaled.sock",
                "--no-logs-no-support",
                "--socks5-server=127.0.0.1:1081"
            ]
        );
        assert!(
            s.env()
                .iter()
                .any(|(k, v)| *k == "TS_NO_LOGS_NO_SUPPORT" && v == "true")
        );
        let s = SidecarSettings { logs: true, ..s };
        assert!(!s.args().iter().any(|a| a == "--no-logs-no-support"));
        assert!(!s.env().iter().any(|(k, _)| *k == "TS_NO_LOGS_NO_SUPPORT"));
    }
}
