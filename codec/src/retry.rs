//! How long to wait before trying again: one rule for every client of the
//! relay (reconnects, refused clips) and for the relay's own links (its
//! cluster's NATS). Sans-IO: the randomness comes in as an argument.

use std::time::Duration;

/// Waits that start at `min`, double with each failed attempt up to `max`,
/// and are each spread by a quarter either way, so clients that lost the
/// relay together do not come back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait before retry number `attempt` (0 for the first), given a
    /// uniform random `unit` in 0..1.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self
            .min
            .checked_mul(1u32 << attempt.min(20))
            .unwrap_or(self.max)
            .min(self.max);
        jitter(base, unit)
    }

    /// The wait before retry number `attempt` of a request the relay
    /// refused with a hint (`retry_after_ms`): never sooner than the hint.
    pub fn after_hint(&self, attempt: u32, hint: Duration, unit: f64) -> Duration {
        self.delay(attempt, unit).max(hint)
    }

    /// A counter of attempts over this rule.
    pub fn attempts(self) -> Attempts {
        Attempts {
            rule: self,
            attempt: 0,
        }
    }
}

/// `d` spread by a quarter either way (`unit` uniform in 0..1).
pub fn jitter(d: Duration, unit: f64) -> Duration {
    d.mul_f64(0.75 + unit.clamp(0.0, 1.0) * 0.5)
}

/// Failed attempts so far under a [`Backoff`].
#[derive(Debug, Clone, Copy)]
pub struct Attempts {
    rule: Backoff,
    attempt: u32,
}

impl Attempts {
    /// The wait before the next attempt; counts one more failure.
    pub fn next(&mut self, unit: f64) -> Duration {
        self.next_after(Duration::ZERO, unit)
    }

    /// [`Attempts::next`], never sooner than the relay's `hint`.
    pub fn next_after(&mut self, hint: Duration, unit: f64) -> Duration {
        let w = self.rule.after_hint(self.attempt, hint, unit);
        self.attempt = self.attempt.saturating_add(1);
        w
    }

    /// Failed attempts since the last success.
    pub fn failures(&self) -> u32 {
        self.attempt
    }

    /// An attempt succeeded: start again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_within_their_bounds_with_jitter_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut a = Backoff { min, max }.attempts();
        for i in 0..40u32 {
            let base = (min * 2u32.pow(i.min(10))).min(max);
            assert_eq!(a.rule.delay(i, 0.5), base, "{i}: the middle of the spread");
            let w = a.next(if i % 2 == 0 { 0.0 } else { 1.0 });
            assert!(
                w >= base.mul_f64(0.75) && w <= base.mul_f64(1.25),
                "{i}: {w:?}"
            );
        }
        a.reset();
        assert_eq!(a.next(0.0), min.mul_f64(0.75));
        // Randomness outside 0..1 stays within the spread.
        assert_eq!(jitter(min, 7.0), min.mul_f64(1.25));
        // A relay's hint is a floor, not a replacement.
        let rule = Backoff { min, max };
        assert_eq!(
            rule.after_hint(0, Duration::from_secs(3), 0.5),
            Duration::from_secs(3)
        );
        assert_eq!(rule.after_hint(3, Duration::from_millis(1), 0.5), 8 * min);
        assert_eq!(a.failures(), 1);
    }
}
