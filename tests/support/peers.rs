//! One switch for every test that needs a real peer or a capability (issue 20.2).
//!
//! `TOOLGATE_REQUIRE_PEERS=1` (CI and `scripts/test` set it) turns a missing peer — tailscaled,
//! Cerbos, node, the MCP SDKs, PostgreSQL, nginx, Go — or a missing capability — root, network
//! namespaces — into a test failure that names what is missing and how to install it. Without
//! the switch the test prints a loud `SKIPPED` line straight to the process's stderr (libtest
//! captures `println!` and `eprintln!`; a skip must show) and passes.

/// Whether `TOOLGATE_REQUIRE_PEERS=1`.
pub fn required() -> bool {
    std::env::var("TOOLGATE_REQUIRE_PEERS").as_deref() == Ok("1")
}

/// `test` cannot run because `peer` is missing (`why`); `install` says how to get it.
///
/// Panics when [`required`]; otherwise prints a SKIPPED line and returns, and the caller
/// returns too.
pub fn missing(test: &str, peer: &str, why: &str, install: &str) {
    let msg = format!("{test}: {peer} is missing: {why}; install: {install}");
    if required() {
        panic!("{msg} (TOOLGATE_REQUIRE_PEERS=1: a missing peer is a failure)");
    }
    let line =
        format!("SKIPPED ({peer} missing) {msg}; set TOOLGATE_REQUIRE_PEERS=1 to fail instead");
    loud(&line);
}

/// A peer's version differs from the one its contract is pinned to: a failure under the switch
/// (the contract was established against `want`), a loud warning otherwise.
pub fn version_mismatch(test: &str, peer: &str, got: &str, want: &str, install: &str) {
    let msg = format!(
        "{test}: {peer} reports version {got:?}; the contract is pinned to {want}; install: {install}"
    );
    if required() {
        panic!("{msg} (TOOLGATE_REQUIRE_PEERS=1: a version mismatch is a failure)");
    }
    loud(&format!("WARNING {msg}"));
}

/// Whether this process runs as root (network namespaces, the tailnet lab, cgroups).
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Writes a line to the process's stderr, past libtest's capture.
fn loud(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}
