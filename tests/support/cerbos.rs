//! The real Cerbos PDP for differential and property tests: finding the binary (obeying
//! `TOOLGATE_REQUIRE_PEERS`), `cerbos compile` on a directory of policies and suites, and
//! flattening Cerbos `TestResults` JSON (ours has the same shape) for comparison.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The Cerbos release toolgate is checked against.
pub const CERBOS_VERSION: &str = "0.55.0";

/// The Cerbos binary: `$CERBOS_BIN`, else the cache `scripts/peers cerbos` fills. Neither →
/// `None` (the caller returns; a loud SKIPPED line) unless `TOOLGATE_REQUIRE_PEERS=1`, which
/// makes it a failure that names the install command ([`super::peers`]).
pub fn find_cerbos() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CERBOS_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "CERBOS_BIN={} does not exist", p.display());
        return Some(p);
    }
    let cache = std::env::var_os("TOOLGATE_PEERS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/toolgate-peers"))
        });
    if let Some(cache) = cache {
        let p = cache
            .join(format!("cerbos-{CERBOS_VERSION}"))
            .join("node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64");
        if p.is_file() {
            return Some(p);
        }
    }
    super::peers::missing(
        "differential and property tests",
        &format!("Cerbos {CERBOS_VERSION}"),
        "CERBOS_BIN is unset and the peers cache has no binary",
        "scripts/peers cerbos (scripts/test runs it and sets CERBOS_BIN)",
    );
    None
}

/// What `cerbos compile --output=json` said about a directory.
#[derive(Debug)]
pub enum Compiled {
    /// The policies compiled and the suites ran (exit 0: passed, 4: some failed): the
    /// `TestResults` JSON.
    Results(Value),
    /// The policies did not compile (or the run failed otherwise): exit code and output.
    Rejected(i32, String),
}

/// `cerbos compile --no-color --output=json [--strict-evaluation] DIR`.
pub fn compile(bin: &Path, dir: &Path, strict: bool) -> Compiled {
    let mut cmd = Command::new(bin);
    cmd.args(["compile", "--no-color", "--output=json"]);
    if strict {
        cmd.arg("--strict-evaluation");
    }
    let out = cmd
        .arg(dir)
        .env("CERBOS_NO_TELEMETRY", "1")
        .output()
        .expect("run cerbos compile");
    let code = out.status.code().unwrap_or(-1);
    let text = || {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    if code != 0 && code != 4 {
        return Compiled::Rejected(code, text());
    }
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v) if v.get("suites").is_some() || code == 0 => Compiled::Results(v),
        _ => Compiled::Rejected(code, text()),
    }
}

/// (suite file, passed) for every suite.
pub fn suite_outcomes(results: &Value) -> Vec<(String, bool)> {
    results["suites"]
        .as_array()
        .map(|suites| {
            suites
                .iter()
                .map(|s| {
                    (
                        s["file"].as_str().unwrap_or_default().to_string(),
                        s["summary"]["overallResult"] == "RESULT_PASSED",
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `file/suite/test/principal/resource/action` → `RESULT … EFFECT`; a suite-level error is
/// one entry `file/suite` → `ERROR`.
pub fn flatten(results: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let empty = Vec::new();
    for s in results["suites"].as_array().unwrap_or(&empty) {
        let sk = format!(
            "{}/{}",
            s["file"].as_str().unwrap_or_default(),
            s["name"].as_str().unwrap_or_default()
        );
        if s.get("error").is_some_and(|e| !e.is_null()) {
            out.insert(sk.clone(), "ERROR".to_string());
        }
        for t in s["testCases"].as_array().unwrap_or(&empty) {
            for p in t["principals"].as_array().unwrap_or(&empty) {
                for r in p["resources"].as_array().unwrap_or(&empty) {
                    for a in r["actions"].as_array().unwrap_or(&empty) {
                        let d = &a["details"];
                        let effect = d["success"]["effect"]
                            .as_str()
                            .or_else(|| d["failure"]["actual"].as_str())
                            .unwrap_or("-");
                        out.insert(
                            format!(
                                "{sk}/{}/{}/{}/{}",
                                t["name"].as_str().unwrap_or_default(),
                                p["name"].as_str().unwrap_or_default(),
                                r["name"].as_str().unwrap_or_default(),
                                a["name"].as_str().unwrap_or_default()
                            ),
                            format!("{} {effect}", d["result"].as_str().unwrap_or("-")),
                        );
                    }
                }
            }
        }
    }
    out
}
