//! The aggregated endpoint's sessions (`/mcp`, [`super::multi`]): one client session and the
//! session it holds on each server, bounded and expired when idle. State only: what a session
//! does lives with the endpoint.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use super::aggregate::{Coalescer, UriIndex};

/// Aggregated sessions at most; idle ones are dropped first.
pub const MAX_SESSIONS: usize = 10_000;
pub const SESSION_IDLE: Duration = Duration::from_secs(24 * 3600);
/// Aggregated sessions one principal holds at most: opening one more ends that principal's
/// least recently used one (its client gets 404 and opens a new session, as the MCP transport
/// says). So one identity that opens sessions in a loop cannot fill the table and lock every
/// other caller out of `/mcp` until the idle ones expire.
pub const MAX_SESSIONS_PER_PRINCIPAL: usize = 256;

/// One server's session inside an aggregated one.
#[derive(Debug, Clone)]
pub(crate) struct Up {
    pub(crate) sid: Option<String>,
    pub(crate) version: String,
}

/// One client session of `/mcp`.
pub struct AggSession {
    pub(crate) principal: String,
    /// The client's `initialize` params, replayed to each server.
    pub(crate) init: Value,
    pub(crate) version: String,
    pub(crate) ups: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Up>>>>>,
    pub(crate) uris: Mutex<UriIndex>,
    /// When the endpoint last listed every server's resources to learn an unknown URI.
    pub(crate) learned: Mutex<Option<Instant>>,
    pub(crate) coalesce: Mutex<Coalescer>,
    /// The client's GET stream, when open.
    pub(crate) outbox: Mutex<Option<tokio::sync::mpsc::Sender<Bytes>>>,
    pub(crate) backlog: Mutex<VecDeque<Bytes>>,
    /// Client request id (canonical) → the server it went to, while in flight.
    pub(crate) inflight: Mutex<HashMap<String, String>>,
    pub(crate) last_seen: Mutex<Instant>,
}

/// A session learns unknown URIs at most this often: each learning lists every server's
/// resources and templates, and an unknown URI must not buy a caller that many upstream calls.
/// A server saying its resources changed allows the next learning at once.
pub(crate) const LEARN_EVERY: Duration = Duration::from_secs(10);

impl AggSession {
    /// May this session list every server's resources now, to learn an unknown URI? Yes at
    /// most once per [`LEARN_EVERY`], or again after [`AggSession::resources_changed`].
    pub(crate) fn may_learn(&self) -> bool {
        let Ok(mut l) = self.learned.lock() else {
            return false;
        };
        if l.is_some_and(|t| t.elapsed() < LEARN_EVERY) {
            return false;
        }
        *l = Some(Instant::now());
        true
    }

    /// A server's resources changed: what was learned may be stale.
    pub(crate) fn resources_changed(&self) {
        if let Ok(mut l) = self.learned.lock() {
            *l = None;
        }
    }
}

impl std::fmt::Debug for AggSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggSession")
            .field("principal", &self.principal)
            .finish()
    }
}

/// The aggregated sessions of this gateway.
#[derive(Debug, Default)]
pub struct Sessions {
    pub(crate) map: Mutex<HashMap<String, Arc<AggSession>>>,
}

impl Sessions {
    pub(crate) fn open(
        &self,
        principal: &str,
        init: Value,
        version: String,
    ) -> Option<(String, Arc<AggSession>)> {
        let sid = uuid::Uuid::new_v4().to_string();
        let s = Arc::new(AggSession {
            principal: principal.to_string(),
            init,
            version,
            ups: Mutex::default(),
            uris: Mutex::default(),
            learned: Mutex::default(),
            coalesce: Mutex::default(),
            outbox: Mutex::default(),
            backlog: Mutex::default(),
            inflight: Mutex::default(),
            last_seen: Mutex::new(Instant::now()),
        });
        let mut m = self.map.lock().ok()?;
        let own = m.iter().filter(|(_, s)| s.principal == principal);
        if own.clone().count() >= MAX_SESSIONS_PER_PRINCIPAL {
            let oldest = own
                .min_by_key(|(_, s)| s.last_seen.lock().map(|t| *t).ok())
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                m.remove(&k);
            }
        }
        if m.len() >= MAX_SESSIONS {
            m.retain(|_, s| {
                s.last_seen
                    .lock()
                    .map(|t| t.elapsed() < SESSION_IDLE)
                    .unwrap_or(false)
            });
        }
        if m.len() >= MAX_SESSIONS {
            return None;
        }
        m.insert(sid.clone(), s.clone());
        Some((sid, s))
    }

    pub(crate) fn get(&self, sid: &str) -> Option<Arc<AggSession>> {
        let s = self.map.lock().ok()?.get(sid).cloned()?;
        if let Ok(mut t) = s.last_seen.lock() {
            *t = Instant::now();
        }
        Some(s)
    }

    pub(crate) fn end(&self, sid: &str) -> Option<Arc<AggSession>> {
        self.map.lock().ok()?.remove(sid)
    }

    /// Live aggregated sessions.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[test]
    fn unknown_uris_are_learned_at_most_once_a_while() {
        let (_, s) = Sessions::default()
            .open("mallory", Value::Null, "v".into())
            .unwrap();
        assert!(s.may_learn());
        assert!(!s.may_learn());
        assert!(!s.may_learn());
        s.resources_changed();
        assert!(s.may_learn());
        assert!(!s.may_learn());
        *s.learned.lock().unwrap() = Instant::now().checked_sub(LEARN_EVERY);
        assert!(s.may_learn());
    }

    #[test]
    fn one_principal_cannot_fill_the_table() {
        let s = Sessions::default();
        let first = s.open("mallory", Value::Null, "v".into()).unwrap().0;
        std::thread::sleep(Duration::from_millis(2));
        let mut last = String::new();
        for _ in 0..MAX_SESSIONS_PER_PRINCIPAL + 50 {
            last = s.open("mallory", Value::Null, "v".into()).unwrap().0;
        }
        assert_eq!(s.len(), MAX_SESSIONS_PER_PRINCIPAL);
        // The least recently used went first; the newest is kept.
        assert!(s.get(&first).is_none());
        assert!(s.get(&last).is_some());
        // Another principal still opens one, and keeps it.
        let alice = s.open("alice", Value::Null, "v".into()).unwrap().0;
        for _ in 0..10 {
            s.open("mallory", Value::Null, "v".into()).unwrap();
        }
        assert!(s.get(&alice).is_some());
        assert_eq!(s.len(), MAX_SESSIONS_PER_PRINCIPAL + 1);
    }

    #[test]
    fn a_session_in_use_outlives_idle_ones_of_its_principal() {
        let s = Sessions::default();
        let kept = s.open("bob", Value::Null, "v".into()).unwrap().0;
        let mut idle = vec![s.open("bob", Value::Null, "v".into()).unwrap().0];
        std::thread::sleep(Duration::from_millis(2));
        for _ in 2..MAX_SESSIONS_PER_PRINCIPAL {
            idle.push(s.open("bob", Value::Null, "v".into()).unwrap().0);
        }
        std::thread::sleep(Duration::from_millis(2));
        assert!(s.get(&kept).is_some()); // used: now the most recent
        s.open("bob", Value::Null, "v".into()).unwrap();
        assert!(s.get(&kept).is_some());
        assert!(s.get(&idle[0]).is_none());
    }
}
