//! Reconnect delays: exponential backoff with jitter.
//!
//! A fleet of gateways that lost the same PostgreSQL (or a sidecar that keeps exiting) must not
//! retry in lockstep: each delay is drawn uniformly from the upper half of the current step
//! ("equal jitter", <https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/>),
//! so retries spread out while the wait still grows with every failure.

use std::time::Duration;

/// Doubling delays between `min` and `max`, each one jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            step: min,
            rng: fastrand::Rng::new(),
        }
    }

    /// The delay before the next attempt (in `[step/2, step]`); the step then doubles, up to
    /// `max`.
    pub fn next_delay(&mut self) -> Duration {
        let d = jitter(self.step, &mut self.rng);
        self.step = (self.step * 2).min(self.max);
        d
    }

    /// The step the next delay is drawn from (before jitter).
    pub fn step(&self) -> Duration {
        self.step
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// A delay drawn uniformly from `[d/2, d]`.
fn jitter(d: Duration, rng: &mut fastrand::Rng) -> Duration {
    let half = d / 2;
    let span = u64::try_from((d - half).as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rng.u64(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_in_bounds_and_differ_between_gateways() {
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(10));
        let mut b = Backoff::new(min, max);
        let mut step = min;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{step:?}/2, {step:?}]"
            );
            step = (step * 2).min(max);
        }
        assert_eq!(b.step(), max);
        b.reset();
        assert_eq!(b.step(), min);
        // Twenty gateways that fail together do not retry together.
        let first: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(1), max).next_delay())
            .collect();
        assert!(
            first.len() > 1,
            "every gateway drew the same delay: {first:?}"
        );
    }
}
