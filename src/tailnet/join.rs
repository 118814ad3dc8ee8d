//! Joining the tailnet through the LocalAPI, as `tailscale up` does (cmd/tailscale/cli/up.go,
//! client/local: `Start`, `StartLoginInteractive`):
//!
//! 1. `POST /localapi/v0/start` with `ipn.Options{AuthKey, UpdatePrefs}`. The prefs are
//!    `ipn.NewPrefs()` plus what `up` sets: `ControlURL` (`tailnet.control_url`, empty = the
//!    default control server), `WantRunning: true`, `Hostname` (`tailnet.hostname`),
//!    `AdvertiseTags` (`tailnet.tags`), `CorpDNS: true`.
//! 2. When the node has no node key yet (`Status.HaveNodeKey` false), `POST
//!    /localapi/v0/login-interactive`. With an auth key this logs in with the key; without
//!    one, control answers with a URL that arrives on the IPN bus as `BrowseToURL`, which is
//!    logged for the operator.
//!
//! The auth key comes from `tailnet.authkey_file` or `TS_AUTHKEY`; it is never logged, never
//! shown by `Debug`, and never read from the config file itself. After a logout or an
//! expired key (the backend goes back to `NeedsLogin`), [`spawn_rejoin`] logs in again.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::localapi::{LocalApi, LocalApiError};
use super::types::{BackendState, Status, WatchMask};
use crate::config::TailnetConfig;

/// An auth key. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey(String);

impl AuthKey {
    /// Wraps a key (trimmed).
    pub fn new(key: &str) -> Option<AuthKey> {
        Some(key.trim())
            .filter(|k| !k.is_empty())
            .map(|k| AuthKey(k.to_owned()))
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(<redacted>)")
    }
}

/// The auth key: `authkey_file` (must be readable and non-empty) or else `TS_AUTHKEY`.
pub fn load_authkey(file: Option<&Path>, env: Option<String>) -> Result<Option<AuthKey>, String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("tailnet.authkey_file {}: cannot read: {e}", path.display()))?;
        warn_if_readable_by_others(path);
        return AuthKey::new(&text)
            .map(Some)
            .ok_or_else(|| format!("tailnet.authkey_file {}: the file is empty", path.display()));
    }
    Ok(env.as_deref().and_then(AuthKey::new))
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(path)
        && md.permissions().mode() & 0o044 != 0
    {
        tracing::warn!(file = %path.display(), "the auth key file is readable by group or others; chmod 600 it");
    }
}

/// What the node logs in as.
#[derive(Clone, Debug)]
pub struct JoinSettings {
    pub hostname: String,
    pub tags: Vec<String>,
    pub control_url: Option<String>,
    pub authkey: Option<AuthKey>,
}

impl JoinSettings {
    /// From `tailnet:` and the environment (`TS_AUTHKEY`).
    pub fn from_config(t: &TailnetConfig) -> Result<JoinSettings, String> {
        Ok(JoinSettings {
            hostname: t.hostname.clone(),
            tags: t.tags.clone(),
            control_url: t.control_url.clone(),
            authkey: load_authkey(t.authkey_file.as_deref(), std::env::var("TS_AUTHKEY").ok())?,
        })
    }

    /// The `ipn.Prefs` `tailscale up --hostname --advertise-tags --login-server` would send.
    pub fn prefs(&self) -> Value {
        json!({
            "ControlURL": self.control_url.clone().unwrap_or_default(),
            "RouteAll": false,
            "CorpDNS": true,
            "WantRunning": true,
            "LoggedOut": false,
            "ShieldsUp": false,
            "AdvertiseTags": self.tags,
            "Hostname": self.hostname,
            "NetfilterMode": 2,
            "NoSNAT": false,
            "AutoUpdate": {"Check": true, "Apply": null},
        })
    }

    /// The `ipn.Options` body of `POST /localapi/v0/start`.
    fn start_body(&self) -> Value {
        json!({
            "AuthKey": self.authkey.as_ref().map(AuthKey::expose).unwrap_or_default(),
            "UpdatePrefs": self.prefs(),
        })
    }
}

/// One login attempt: `start` with the prefs (and key), then `login-interactive` when the
/// node has no node key yet.
pub async fn login(api: &LocalApi, settings: &JoinSettings) -> Result<(), LocalApiError> {
    let before = api.status().await?;
    let body = Bytes::from(settings.start_body().to_string());
    api.post("/localapi/v0/start", body).await?;
    if !before.have_node_key || before.backend_state == BackendState::NeedsLogin {
        api.post("/localapi/v0/login-interactive", Bytes::new())
            .await?;
    }
    Ok(())
}

/// Waits until the node is `Running`, logging in with the auth key when it needs a login
/// (or asking control for a login URL and logging it when there is no key).
pub async fn ensure_joined(
    api: &LocalApi,
    settings: &JoinSettings,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Status, String> {
    let mut last_attempt: Option<Instant> = None;
    let mut backoff = Duration::from_secs(2);
    let mut last_note = String::new();
    // The bus carries the interactive login URL; subscribe before logging in.
    let mut bus = api.watch_ipn_bus(WatchMask::INITIAL_STATE).await.ok();
    loop {
        let status = api.status().await.map_err(|e| e.to_string());
        match &status {
            Ok(s) if s.is_running() => {
                tracing::info!(node = %s.self_dns_name().unwrap_or_default(), "the sidecar node is on the tailnet");
                return status;
            }
            Ok(s)
                if s.backend_state == BackendState::NeedsLogin
                    || s.backend_state == BackendState::NoState
                    || s.backend_state == BackendState::Stopped =>
            {
                let due = last_attempt.is_none_or(|t| t.elapsed() >= backoff);
                if due && s.backend_state != BackendState::NoState {
                    if last_attempt.is_some() {
                        backoff = (backoff * 2).min(Duration::from_secs(300));
                    }
                    last_attempt = Some(Instant::now());
                    note_login(settings, s.backend_state.as_str());
                    if let Err(e) = login(api, settings).await {
                        tracing::error!(error = %e, "logging in through the LocalAPI failed; retrying in {}s", backoff.as_secs());
                    }
                }
                if let Some(h) = s.health.iter().find(|h| h.contains("login error")) {
                    if *h != last_note {
                        tracing::error!("the sidecar node cannot log in: {h}");
                        last_note = h.clone();
                    }
                }
                if !s.auth_url.is_empty() && s.auth_url != last_note {
                    tracing::warn!(url = %s.auth_url, "to add toolgate to the tailnet, log in at this URL (or configure tailnet.authkey_file / TS_AUTHKEY)");
                    last_note = s.auth_url.clone();
                }
            }
            Ok(s) => {
                let st = s.backend_state.as_str().to_owned();
                if st != last_note {
                    if s.backend_state == BackendState::NeedsMachineAuth {
                        tracing::warn!(
                            "the sidecar node waits for approval in the tailnet admin console"
                        );
                    } else {
                        tracing::info!(state = %st, "waiting for the sidecar node");
                    }
                    last_note = st;
                }
            }
            Err(e) => {
                if *e != last_note {
                    tracing::warn!("the sidecar tailscaled does not answer yet: {e}");
                    last_note = e.clone();
                }
            }
        }
        // Wake on a bus event (state change, login URL) or after a second.
        let wait = async {
            match bus.as_mut() {
                Some(w) => match tokio::time::timeout(Duration::from_secs(1), w.next()).await {
                    Ok(Some(Ok(n))) => {
                        if let Some(url) = n.browse_to_url.filter(|u| !u.is_empty()) {
                            tracing::warn!(%url, "to add toolgate to the tailnet, log in at this URL (or configure tailnet.authkey_file / TS_AUTHKEY)");
                        }
                        if let Some(msg) = n.err_message {
                            tracing::error!("tailscaled: {msg}");
                        }
                    }
                    Ok(None) | Ok(Some(Err(_))) => {
                        bus = None;
                    }
                    Err(_) => {}
                },
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        tokio::select! {
            _ = wait => {}
            _ = shutdown.wait_for(|s| *s) => return Err("shutdown requested".into()),
        }
    }
}

fn note_login(settings: &JoinSettings, state: &str) {
    match &settings.authkey {
        Some(_) => tracing::info!(
            state,
            hostname = %settings.hostname,
            tags = ?settings.tags,
            control = %settings.control_url.as_deref().unwrap_or("(default)"),
            "logging the sidecar node in with the configured auth key"
        ),
        None => tracing::warn!(
            state,
            hostname = %settings.hostname,
            "the sidecar node needs a login and no auth key is configured (tailnet.authkey_file or TS_AUTHKEY); asking control for a login URL"
        ),
    }
}

/// Watches the IPN bus and logs in again when the backend falls back to `NeedsLogin` (a
/// logout, an expired node key or a revoked node), with a clear log line each time.
pub fn spawn_rejoin(
    api: LocalApi,
    settings: JoinSettings,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut w = tokio::select! {
                w = api.watch_ipn_bus(WatchMask::INITIAL_STATE) => w,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok(watcher) = w.as_mut() else {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            };
            loop {
                let n = tokio::select! {
                    n = watcher.next() => n,
                    _ = stop.wait_for(|s| *s) => return,
                };
                match n {
                    Some(Ok(n)) if n.state == Some(BackendState::NeedsLogin) => {
                        tracing::warn!(
                            "the sidecar node was logged out or its key expired (NeedsLogin); re-joining the tailnet"
                        );
                        let mut s = stop.clone();
                        match ensure_joined(&api, &settings, &mut s).await {
                            Ok(_) => tracing::info!("the sidecar node re-joined the tailnet"),
                            Err(e) => tracing::warn!("re-joining stopped: {e}"),
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_never_shown() {
        let s = JoinSettings {
            hostname: "toolgate".into(),
            tags: vec!["tag:toolgate".into()],
            control_url: Some("http://127.0.0.1:8080".into()),
            authkey: AuthKey::new(" tskey-auth-SECRET\n"),
        };
        assert!(!format!("{s:?}").contains("SECRET"));
        let body = s.start_body();
        assert_eq!(body["AuthKey"], "tskey-auth-SECRET");
        assert_eq!(body["UpdatePrefs"]["Hostname"], "toolgate");
        assert_eq!(
            body["UpdatePrefs"]["AdvertiseTags"],
            json!(["tag:toolgate"])
        );
        assert_eq!(body["UpdatePrefs"]["ControlURL"], "http://127.0.0.1:8080");
        assert_eq!(body["UpdatePrefs"]["WantRunning"], true);
    }

    #[test]
    fn key_sources() {
        let dir = std::env::temp_dir().join(format!("tg-authkey-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let f = dir.join("key");
        let _ = std::fs::write(&f, "tskey-file\n");
        let k = load_authkey(Some(&f), Some("tskey-env".into()));
        assert_eq!(k, Ok(AuthKey::new("tskey-file")));
        assert_eq!(
            load_authkey(None, Some("tskey-env".into())),
            Ok(AuthKey::new("tskey-env"))
        );
        assert_eq!(load_authkey(None, Some("  ".into())), Ok(None));
        assert_eq!(load_authkey(None, None), Ok(None));
        let _ = std::fs::write(&f, "\n");
        assert!(load_authkey(Some(&f), None).is_err());
        assert!(load_authkey(Some(&dir.join("missing")), None).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
