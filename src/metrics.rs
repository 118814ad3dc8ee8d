//! Prometheus metrics: counters and histograms in atomics, rendered as text on `/metrics`.
//!
//! [`Exposition`] is the one writer of the text format
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>): the gateway's metrics, the
//! audit store's and the WhoIs resolver's all go through it, so `# HELP`/`# TYPE` lines, label
//! escaping and number formatting are written in one place.
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

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Prometheus text exposition (format 0.0.4), written family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.as_str()
        );
    }

    /// One sample of the current family, label values escaped.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// `toolgate_build_info`: a constant 1 whose labels say which build is running, so dashboards
/// can tell a fleet's versions apart (the `*_build_info` convention of Prometheus exporters).
pub fn build_info(e: &mut Exposition) {
    e.family(
        "toolgate_build_info",
        Kind::Gauge,
        "The running build: version, and the Rust version it was built with (always 1).",
    );
    e.sample(
        "toolgate_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("rust_version", env!("CARGO_PKG_RUST_VERSION")),
        ],
        1,
    );
}

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

    fn write(&self, e: &mut Exposition, name: &str, help: &str) {
        e.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        for (i, b) in BUCKETS.iter().enumerate() {
            e.sample(
                &bucket,
                &[("le", &b.to_string())],
                self.counts[i].load(Ordering::Relaxed),
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        e.sample(&bucket, &[("le", "+Inf")], n);
        e.sample(
            &format!("{name}_sum"),
            &[],
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        );
        e.sample(&format!("{name}_count"), &[], n);
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

    /// The Prometheus text exposition of these metrics alone.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        self.write(&mut e);
        e.finish()
    }

    /// Writes these metrics (with `toolgate_build_info`).
    pub fn write(&self, e: &mut Exposition) {
        build_info(e);
        e.family(
            "toolgate_decisions_total",
            Kind::Counter,
            "Decisions by effect, server and tool.",
        );
        if let Ok(m) = self.decisions.lock() {
            for ((effect, server, tool), n) in m.iter() {
                e.sample(
                    "toolgate_decisions_total",
                    &[("effect", effect), ("server", server), ("tool", tool)],
                    n,
                );
            }
        }
        self.decision_latency.write(
            e,
            "toolgate_decision_seconds",
            "Policy evaluation time per decision.",
        );
        self.upstream_latency.write(
            e,
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
            e.single(name, Kind::Counter, help, v.load(Ordering::Relaxed));
        }
        e.single(
            "toolgate_open_connections",
            Kind::Gauge,
            "Open client connections.",
            self.open_connections.load(Ordering::Relaxed),
        );
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
        assert!(text.contains(&format!(
            "toolgate_build_info{{version=\"{}\",rust_version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            env!("CARGO_PKG_RUST_VERSION")
        )));
    }

    #[test]
    fn one_writer_escapes_labels_and_help() {
        let mut e = Exposition::new();
        e.family("x_total", Kind::Counter, "a \\ b\nc");
        e.sample("x_total", &[("tool", "a\"b\\c\nd")], 3);
        e.single("y", Kind::Gauge, "why", 0.5);
        assert_eq!(
            e.finish(),
            "# HELP x_total a \\\\ b\\nc\n# TYPE x_total counter\nx_total{tool=\"a\\\"b\\\\c\\nd\"} 3\n# HELP y why\n# TYPE y gauge\ny 0.5\n"
        );
    }
}
