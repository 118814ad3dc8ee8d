//! Exit codes, the same for every command (README, "Exit codes"). Runtime failures never
//! share clap's 2, so a script can tell "I called it wrong" from "it ran and failed".

/// A runtime failure: the daemon stopped on an error, doctor found a FAIL, the audit store
/// could not be read, `audit verify` found a break, whois found no identity.
pub const FAILURE: u8 = 1;
/// A usage error: unknown flag, missing or malformed argument (clap's own code).
pub const USAGE: u8 = 2;
/// Policies do not compile (as `cerbos compile`), or the policy directory is empty where
/// `serve` needs policies.
pub const COMPILE: u8 = 3;
/// Policy tests failed (as `cerbos compile`).
pub const TESTS: u8 = 4;
/// The config file is missing, unreadable or invalid.
pub const CONFIG: u8 = 5;
/// `audit verify` without the chain key: linkage held, but row content was not checked.
pub const UNKEYED: u8 = 6;
