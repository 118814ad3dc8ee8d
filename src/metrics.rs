//! Prometheus metrics: counters and histograms in atomics, rendered as text on `/metrics`.
//!
//! Label sets are bounded (a tool name an agent invents must not grow memory without bound):
//! past [`MAX_SERIES`] distinct label sets, new ones are counted under `tool="_other"`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const MAX_SERIES: usize = 5_000;

/// Latency buckets in seconds, from 10 µs to 10 s.
const BUCKETS: [f64; 13] = [
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0,
];

/// A fixed-bucket histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; 13],
    count: AtomicU64,
    /// Sum in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// The gateway's own metrics (the audit store and the WhoIs resolver keep theirs).
#[derive(Debug, Default)]
pub struct Metrics {
    /// (effect, server, tool) → count.
    decisions: Mutex<BTreeMap<(String, String, String), u64>>,
    pub decision_latency: Histogram,
    pub upstream_latency: Histogram,
    pub upstream_errors: AtomicU64,
    pub policy_reloads: AtomicU64,
    pub policy_reload_failures: AtomicU64,
    pub open_connections: AtomicU64,
    pub unidentified: AtomicU64,
    pub audit_refusals: AtomicU64,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn decision(&self, effect: &str, server: &str, tool: &str) {
        let Ok(mut m) = self.decisions.lock() else {
            return;
        };
        let mut key = (effect.to_string(), server.to_string(), tool.to_string());
        if !m.contains_key(&key) && m.len() >= MAX_SERIES {
            key.2 = "_other".into();
        }
        *m.entry(key).or_insert(0) += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP toolgate_decisions_total Decisions by effect, server and tool.\n# TYPE toolgate_decisions_total counter\n");
        if let Ok(m) = self.decisions.lock() {
            for ((effect, server, tool), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "toolgate_decisions_total{{effect=\"{}\",server=\"{}\",tool=\"{}\"}} {n}",
                    escape(effect),
                    escape(server),
                    escape(tool)
                );
            }
        }
        self.decision_latency.render(
            &mut out,
            "toolgate_decision_seconds",
            "Policy evaluation time per decision.",
        );
        self.upstream_latency.render(
            &mut out,
            "toolgate_upstream_seconds",
            "Upstream MCP round-trip time.",
        );
        let counters = [
            (
                "toolgate_upstream_errors_total",
                "Upstream failures (unreachable, timeout, 5xx, bad response).",
                &self.upstream_errors,
            ),
            (
                "toolgate_policy_reloads_total",
                "Successful policy reloads.",
                &self.policy_reloads,
            ),
            (
                "toolgate_policy_reload_failures_total",
                "Failed policy reloads (the last good policies stay).",
                &self.policy_reload_failures,
            ),
            (
                "toolgate_unidentified_total",
                "Connections refused for lack of a tailnet identity.",
                &self.unidentified,
            ),
            (
                "toolgate_audit_refusals_total",
                "Calls refused with 503 because the audit store could not take the row.",
                &self.audit_refusals,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP toolgate_open_connections Open client connections.\n# TYPE toolgate_open_connections gauge\ntoolgate_open_connections {}",
            self.open_connections.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_bounds_series() {
        let m = Metrics::default();
        m.decision("allow", "github", "create_issue");
        m.decision("allow", "github", "create_issue");
        m.decision_latency.observe(Duration::from_micros(3));
        for i in 0..(MAX_SERIES + 10) {
            m.decision("deny", "x", &format!("t{i}"));
        }
        let text = m.render();
        assert!(text.contains(
            "toolgate_decisions_total{effect=\"allow\",server=\"github\",tool=\"create_issue\"} 2"
        ));
        assert!(
            text.contains("tool=\"_other\"} 11"),
            "the allow series takes one of the {MAX_SERIES} slots"
        );
        assert!(text.contains("toolgate_decision_seconds_bucket{le=\"0.00001\"} 1"));
        assert!(text.contains("toolgate_decision_seconds_count 1"));
    }
}
