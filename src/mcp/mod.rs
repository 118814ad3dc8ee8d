//! The MCP gateway: JSON-RPC envelope, method → policy mapping, and the proxy.
//!
//! Protocol eras accepted (mcp-gateways reference §1): the handshake era (2025-03-26,
//! 2025-06-18, 2025-11-25: `initialize`, `Mcp-Session-Id`, GET SSE stream, DELETE) and the
//! stateless 2026-07-28 era (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name` headers checked
//! against the body; `server/discover`).

pub mod aggregate;
pub mod jsonrpc;
pub mod mapping;
pub mod multi;
pub mod payload;
pub mod proxy;
pub mod request;
pub mod sessions;
pub mod sse;
pub mod transport;
