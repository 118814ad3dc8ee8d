//! Shadow policies (`policies.shadow`): a second policy set every decision is also evaluated
//! under, on a thread of its own, never on the request path. A live decision hands a [`Job`]
//! to a bounded queue and goes on; when the queue is full the job is dropped and counted. A
//! decision the shadow set decides with another effect is reported back ([`Job::report`]),
//! which writes it as an audit row of kind `shadow`. A shadow set that does not load, or errors
//! on every evaluation, only shows in the log and the metrics: live decisions never read it.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use serde_json::Value;

use crate::metrics::{Exposition, Kind};
use crate::policy::eval::{self, CheckOutput};
use crate::policy::input::{Params, Principal, Resource};
use crate::policy::model::Effect;
use crate::policy::store::Store;

/// Jobs waiting for the shadow thread at most. Each holds its call's arguments (shared with
/// the audit row, not copied) until it is evaluated.
pub const QUEUE: usize = 256;

/// What a policy set decided for one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub effect: Effect,
    pub policy: String,
    pub rule: String,
}

/// The shadow set's answer where it differs from the live one.
#[derive(Debug, Clone)]
pub struct Differs {
    pub verdict: Verdict,
    pub reason: String,
    /// The shadow snapshot's hash.
    pub policy_hash: String,
    /// The shadow evaluation's explain trace.
    pub trace: Value,
}

/// One live decision to evaluate again under the shadow set.
pub struct Job {
    /// The principal and resource as recorded (`arguments` and `uri` as null placeholders).
    pub input: Arc<(Principal, Resource)>,
    /// The call's arguments, for `R.attr.arguments` (`{}` when none).
    pub arguments: Option<Arc<Value>>,
    /// The URI of a `resources/read`, for `R.attr.uri`.
    pub uri: Option<String>,
    pub action: String,
    /// The live decision's `now()`.
    pub now: chrono::DateTime<chrono::Utc>,
    pub live: Verdict,
    /// Called with the difference; returns false when the row could not be stored.
    pub report: Box<dyn FnOnce(Differs) -> bool + Send>,
}

/// Counters, as `toolgate_shadow_*` metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub same: AtomicU64,
    pub differs: AtomicU64,
    pub errors: AtomicU64,
    pub not_loaded: AtomicU64,
    pub queue_full: AtomicU64,
    pub rows_refused: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

/// The shadow set, its thread's queue and its counters.
pub struct Shadow {
    store: Arc<Store>,
    /// A good set is loaded (a set that never loaded is not evaluated at all).
    loaded: Arc<AtomicBool>,
    tx: SyncSender<Job>,
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("dir", &self.store.dir())
            .finish()
    }
}

/// Is this directory's content usable: compiled, and not empty (an empty set would deny every
/// call, and report every allow as a difference).
fn usable(store: &Store) -> Result<(), String> {
    match crate::policy::store::read_dir(store.dir()) {
        Ok(c) if c.policies.is_empty() => Err("the directory holds no policies".into()),
        Ok(_) => Ok(()),
        Err(errors) => Err(first_errors(&errors)),
    }
}

fn first_errors(errors: &[crate::policy::compile::CompileError]) -> String {
    let mut s = format!("{} error(s)", errors.len());
    for e in errors.iter().take(3) {
        s.push_str(&format!("; {e}"));
    }
    s
}

impl Shadow {
    /// Loads `dir` and starts the shadow thread. A set that does not load is logged and left
    /// unloaded (nothing is evaluated until a reload succeeds); only a thread that cannot start
    /// is an error.
    pub fn start(dir: &Path, base: Params) -> Result<Shadow, String> {
        let (store, res) = Store::open(dir);
        let loaded = match res
            .map_err(|e| first_errors(&e))
            .and_then(|()| usable(&store))
        {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), snapshot = %&store.current().hash[..12], "shadow policies loaded");
                true
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "the shadow policies do not load; live decisions are unaffected, and nothing is shadow-evaluated until a reload succeeds");
                false
            }
        };
        let store = Arc::new(store);
        let loaded = Arc::new(AtomicBool::new(loaded));
        let counters = Arc::new(Counters::default());
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let (s, c) = (store.clone(), counters.clone());
        std::thread::Builder::new()
            .name("shadow-policies".into())
            // CEL evaluation recurses; the live path runs it on tokio's 2 MiB worker stacks.
            .stack_size(8 * 1024 * 1024)
            .spawn(move || work(&s, &base, &c, &rx))
            .map_err(|e| format!("cannot start the shadow policy thread: {e}"))?;
        Ok(Shadow {
            store,
            loaded,
            tx,
            counters,
        })
    }

    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    /// Queues a job without waiting; a full queue drops it (counted).
    pub fn offer(&self, job: Job) {
        if !self.loaded.load(Ordering::Relaxed) {
            self.counters.not_loaded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let n = self.counters.queue_full.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n,
                        "the shadow policy queue is full; decisions are not shadow-evaluated (live decisions are unaffected)"
                    );
                }
            }
        }
    }

    /// Reloads the shadow directory; a failed reload keeps the last good set (or none).
    pub fn reload(&self, why: &str) {
        let result = usable(&self.store)
            .and_then(|()| self.store.reload().map_err(|errors| first_errors(&errors)));
        match result {
            Ok(set) => {
                self.loaded.store(true, Ordering::Relaxed);
                self.counters.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(policies = set.len(), snapshot = %&set.hash[..12], "shadow policies reloaded ({why})");
            }
            Err(e) => {
                self.counters
                    .reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "shadow policy reload failed ({why}); keeping the last good shadow policies, if any (live decisions are unaffected)");
            }
        }
    }

    /// The `toolgate_shadow_*` metrics, as Prometheus text.
    pub fn prometheus(&self) -> String {
        let c = &self.counters;
        let mut e = Exposition::new();
        e.family(
            "toolgate_shadow_evaluations_total",
            Kind::Counter,
            "Decisions evaluated under the shadow policies, by result (same, differs, error).",
        );
        for (result, v) in [
            ("same", &c.same),
            ("differs", &c.differs),
            ("error", &c.errors),
        ] {
            e.sample(
                "toolgate_shadow_evaluations_total",
                &[("result", result)],
                v.load(Ordering::Relaxed),
            );
        }
        e.family(
            "toolgate_shadow_skipped_total",
            Kind::Counter,
            "Decisions not shadow-evaluated or whose difference was not stored, by reason.",
        );
        for (reason, v) in [
            ("not_loaded", &c.not_loaded),
            ("queue_full", &c.queue_full),
            ("audit_refused", &c.rows_refused),
        ] {
            e.sample(
                "toolgate_shadow_skipped_total",
                &[("reason", reason)],
                v.load(Ordering::Relaxed),
            );
        }
        e.single(
            "toolgate_shadow_loaded",
            Kind::Gauge,
            "1 when a good shadow policy set is loaded.",
            u8::from(self.loaded.load(Ordering::Relaxed)),
        );
        e.single(
            "toolgate_shadow_reloads_total",
            Kind::Counter,
            "Successful shadow policy reloads.",
            c.reloads.load(Ordering::Relaxed),
        );
        e.single(
            "toolgate_shadow_reload_failures_total",
            Kind::Counter,
            "Failed shadow policy reloads (the last good shadow set stays).",
            c.reload_failures.load(Ordering::Relaxed),
        );
        e.finish()
    }
}

/// The shadow thread: evaluates jobs until every sender is gone.
fn work(store: &Store, base: &Params, c: &Counters, rx: &Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        let set = store.current();
        let resource = full_resource(&job);
        let actions = vec![job.action.clone()];
        let params = Params {
            now: job.now,
            ..base.clone()
        };
        let input = eval::CheckRef {
            principal: &job.input.0,
            resource: &resource,
            actions: &actions,
            aux_data: &Value::Null,
        };
        let out =
            std::panic::catch_unwind(AssertUnwindSafe(|| eval::check_ref(&set, input, &params)));
        let out = match out {
            Ok(out) if !errored(&out) => out,
            Ok(out) => {
                error(c, &job.action, &describe(&out));
                continue;
            }
            Err(_) => {
                error(c, &job.action, "the evaluation panicked");
                continue;
            }
        };
        let Some(r) = out.actions.iter().find(|a| a.action == job.action) else {
            error(c, &job.action, "no result for the action");
            continue;
        };
        if r.effect == job.live.effect {
            c.same.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        c.differs.fetch_add(1, Ordering::Relaxed);
        let differs = Differs {
            verdict: Verdict {
                effect: r.effect,
                policy: r.policy.clone(),
                rule: r.rule.clone(),
            },
            reason: r.reason.clone(),
            policy_hash: set.hash.clone(),
            trace: serde_json::to_value(&out.trace).unwrap_or(Value::Null),
        };
        if !(job.report)(differs) {
            c.rows_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The resource as the live check saw it: the recorded one with `arguments` and `uri` put back.
fn full_resource(job: &Job) -> Resource {
    let mut r = job.input.1.clone();
    for (k, v) in r.attr.iter_mut() {
        match k.as_str() {
            "arguments" => {
                *v = match job.arguments.as_deref() {
                    None | Some(Value::Null) => Value::Object(Default::default()),
                    Some(a) => a.clone(),
                }
            }
            "uri" => {
                *v = job
                    .uri
                    .as_ref()
                    .map_or(Value::Null, |u| Value::String(u.clone()))
            }
            _ => {}
        }
    }
    r
}

/// Did the evaluation meet an error (a CEL error, in a rule or a derived role)?
fn errored(out: &CheckOutput) -> bool {
    !out.evaluation_errors.is_empty()
        || out.trace.steps.iter().any(|s| s.error.is_some())
        || out.trace.derived_roles.iter().any(|d| d.error.is_some())
}

fn describe(out: &CheckOutput) -> String {
    out.evaluation_errors
        .first()
        .map(|e| format!("{}#{}: {}", e.policy, e.rule, e.message))
        .or_else(|| {
            out.trace
                .steps
                .iter()
                .find_map(|s| s.error.clone())
                .or_else(|| out.trace.derived_roles.iter().find_map(|d| d.error.clone()))
        })
        .unwrap_or_default()
}

/// Counts an evaluation error; logs the first and then at powers of two.
fn error(c: &Counters, action: &str, what: &str) {
    let n = c.errors.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(
            errors = n,
            action,
            error = what,
            "a shadow policy evaluation failed; it is counted, not recorded (live decisions are unaffected)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW_ALL: &str = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: k\n  version: default\n  rules:\n    - name: all\n      actions: [\"*\"]\n      effect: EFFECT_ALLOW\n      roles: [\"*\"]\n";

    fn job(report: Box<dyn FnOnce(Differs) -> bool + Send>) -> Job {
        Job {
            input: Arc::new((
                Principal {
                    id: "p".into(),
                    roles: vec!["user".into()],
                    ..Principal::default()
                },
                Resource {
                    kind: "k".into(),
                    id: "r".into(),
                    ..Resource::default()
                },
            )),
            arguments: None,
            uri: None,
            action: "a".into(),
            now: chrono::Utc::now(),
            live: Verdict {
                effect: Effect::Deny,
                policy: String::new(),
                rule: String::new(),
            },
            report,
        }
    }

    /// The thread is stuck on one job: offers beyond the queue are dropped and counted at once,
    /// never waited for.
    #[test]
    fn a_full_queue_drops_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.yaml"), ALLOW_ALL).unwrap();
        let s = Shadow::start(dir.path(), Params::default()).unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        s.offer(job(Box::new(move |d| {
            assert_eq!(d.verdict.effect, Effect::Allow);
            assert_eq!(d.verdict.rule, "all");
            started_tx.send(()).unwrap();
            release_rx.recv().is_ok()
        })));
        started_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        let t = std::time::Instant::now();
        for _ in 0..QUEUE + 10 {
            s.offer(job(Box::new(|_| true)));
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(s.counters.queue_full.load(Ordering::Relaxed), 10);
        release_tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.counters.differs.load(Ordering::Relaxed) < 1 + QUEUE as u64 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            s.prometheus()
                .contains("toolgate_shadow_skipped_total{reason=\"queue_full\"} 10")
        );
    }
}
