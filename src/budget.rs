//! The daemon-wide budget of bytes held for client messages in flight (`limits.in_flight_bytes`).
//!
//! Per-message limits (`servers.<name>.max_body`, `max_nodes`) bound one call; this bounds
//! them all together (invariant I5). An MCP call reserves its declared body length (or the
//! server's `max_body` when it declares none) before its body is read, then, once parsed, what
//! its parsed value and forwarded copy take ([`crate::mcp::jsonrpc::Size::parsed_bytes`] plus
//! the body's length), and gives it back when it is answered. A call that does not fit is
//! answered 503 with `Retry-After` before any policy decision, audited and counted
//! (`toolgate_in_flight_refusals_total`), and nothing of it is forwarded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// `limits.in_flight_bytes` by default: about 30 concurrent 1 MiB calls (each reserves its
/// parsed value and its forwarded copy, about 2 MiB), or a dozen of 10,000 small objects
/// (about 4 MiB each); see docs/benchmarks.md for what 64 such calls at once cost.
pub const DEFAULT_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

/// The most one call to a server with these limits can reserve: its body, and the parsed form
/// of `max_nodes` values that are all objects (`[{},{},...]`), and its forwarded copy.
pub fn largest_call(max_body: usize, max_nodes: usize) -> usize {
    let worst = crate::mcp::jsonrpc::Size {
        nodes: max_nodes,
        objects: max_nodes,
    };
    worst.parsed_bytes(max_body).saturating_add(max_body)
}

/// Bytes reserved by calls in flight, against a capacity.
#[derive(Debug)]
pub struct Budget {
    capacity: usize,
    used: AtomicUsize,
    refused: AtomicU64,
}

impl Budget {
    pub fn new(capacity: usize) -> Arc<Budget> {
        Arc::new(Budget {
            capacity,
            used: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Calls refused because they did not fit.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Adds `bytes` if they fit; counts a refusal if not.
    fn take(&self, bytes: usize) -> bool {
        let fits = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|n| *n <= self.capacity)
            })
            .is_ok();
        if !fits {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        fits
    }

    /// Reserves `bytes`, or `None` (counted as a refusal) when they do not fit.
    pub fn reserve(self: &Arc<Budget>, bytes: usize) -> Option<Reservation> {
        self.take(bytes).then(|| Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// The Prometheus text of the budget.
    pub fn prometheus(&self) -> String {
        use crate::metrics::{Exposition, Kind};
        let mut e = Exposition::new();
        e.single(
            "toolgate_in_flight_bytes",
            Kind::Gauge,
            "Bytes reserved by MCP messages in flight (limits.in_flight_bytes).",
            self.used(),
        );
        e.single(
            "toolgate_in_flight_capacity_bytes",
            Kind::Gauge,
            "limits.in_flight_bytes.",
            self.capacity,
        );
        e.single(
            "toolgate_in_flight_refusals_total",
            Kind::Counter,
            "Calls refused with 503 because limits.in_flight_bytes was reached.",
            self.refused(),
        );
        e.finish()
    }
}

/// Bytes held for one call; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Changes the reservation to `bytes`: shrinking always works; growing works if the
    /// difference fits (else the reservation is unchanged, a refusal is counted, and `false`).
    pub fn resize(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            self.budget
                .used
                .fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            self.bytes = bytes;
            return true;
        }
        if self.budget.take(bytes - self.bytes) {
            self.bytes = bytes;
            true
        } else {
            false
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_the_capacity_and_are_given_back() {
        let b = Budget::new(100);
        let mut r1 = b.reserve(60).unwrap();
        assert!(b.reserve(41).is_none());
        assert_eq!(b.refused(), 1);
        let r2 = b.reserve(40).unwrap();
        assert_eq!(b.used(), 100);
        assert!(!r1.resize(61), "growing past the capacity is refused");
        assert_eq!((r1.bytes(), b.used(), b.refused()), (60, 100, 2));
        assert!(r1.resize(10));
        assert_eq!(b.used(), 50);
        assert!(r1.resize(60));
        drop(r2);
        drop(r1);
        assert_eq!(b.used(), 0);
        assert!(b.reserve(101).is_none());
        assert!(
            b.prometheus()
                .contains("toolgate_in_flight_refusals_total 3")
        );
    }
}
