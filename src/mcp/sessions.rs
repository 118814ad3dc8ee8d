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
    pub(crate) coalesce: Mutex<Coalescer>,
    /// The client's GET stream, when open.
    pub(crate) outbox: Mutex<Option<tokio::sync::mpsc::Sender<Bytes>>>,
    pub(crate) backlog: Mutex<VecDeque<Bytes>>,
    /// Client request id (canonical) → the server it went to, while in flight.
    pub(crate) inflight: Mutex<HashMap<String, String>>,
    pub(crate) last_seen: Mutex<Instant>,
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
            coalesce: Mutex::default(),
            outbox: Mutex::default(),
            backlog: Mutex::default(),
            inflight: Mutex::default(),
            last_seen: Mutex::new(Instant::now()),
        });
        let mut m = self.map.lock().ok()?;
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
