//! Shared helpers for the integration tests (`mod support;` in each test crate).
//!
//! - [`candidate`]: the changed policy set of the replay and shadow tests.
//! - [`cerbos`]: the real Cerbos binary (`cerbos compile`) and its `TestResults` JSON.
//! - [`demo_daemon`]: the demo's daemon in-process, with an admin viewer (the read-API tests).
//! - [`fake_localapi`]: a fake tailscaled LocalAPI on a unix socket.
//! - [`mcp_client`]: one MCP POST through the gateway, returning its decision id.
//! - [`peers`]: the `TOOLGATE_REQUIRE_PEERS` switch: a missing peer skips loudly or fails.
//! - [`rng`]: a seeded generator for generated inputs.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support code"
)]

pub mod candidate;
pub mod cerbos;
pub mod demo_daemon;
pub mod fake_localapi;
pub mod mcp_client;
pub mod peers;
pub mod rng;
