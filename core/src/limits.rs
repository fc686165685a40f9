//! Admission limits (sans-IO): token buckets per user for clips and clip
//! bytes per minute, and one for new handshakes per second.

use std::time::{Duration, Instant};

/// A token bucket: holds up to `capacity` tokens, refills at `per_sec`.
/// May go negative when a cost is charged after the fact (clip bytes are
/// known only at the end); new work waits until it is positive again.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket of `capacity` refilling over `period`.
    pub fn new(capacity: f64, period: Duration, now: Instant) -> Self {
        Self {
            capacity,
            per_sec: capacity / period.as_secs_f64().max(1e-9),
            tokens: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        self.at = now;
    }

    /// Takes `cost` tokens if at least `cost` are there (and at least
    /// one). Otherwise: how long until there will be.
    pub fn take(&mut self, cost: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let need = cost.max(0.0);
        if self.tokens >= need && self.tokens > 0.0 {
            self.tokens -= need;
            Ok(())
        } else {
            let missing = (need.max(1e-9) - self.tokens).max(0.0);
            Err(Duration::from_secs_f64(missing / self.per_sec))
        }
    }

    /// Whether anything is left (for costs charged later).
    pub fn check(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens > 0.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((-self.tokens + 1.0) / self.per_sec))
        }
    }

    /// Charges `cost` now, possibly going negative.
    pub fn charge(&mut self, cost: f64, now: Instant) {
        self.refill(now);
        self.tokens -= cost;
    }

    /// Full again (nobody used it for a while): may be forgotten.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

/// One user's clip budget.
#[derive(Debug, Clone)]
pub struct UserBudget {
    clips: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl UserBudget {
    /// `clips_per_min` / `bytes_per_min` of 0: no limit.
    pub fn new(clips_per_min: u32, bytes_per_min: u64, now: Instant) -> Self {
        let minute = Duration::from_secs(60);
        Self {
            clips: (clips_per_min > 0).then(|| Bucket::new(f64::from(clips_per_min), minute, now)),
            bytes: (bytes_per_min > 0).then(|| Bucket::new(bytes_per_min as f64, minute, now)),
        }
    }

    /// Admits one more clip, or says when to retry.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(b) = &mut self.bytes {
            b.check(now)?;
        }
        if let Some(c) = &mut self.clips {
            c.take(1.0, now)?;
        }
        Ok(())
    }

    /// Charges a finished clip's bytes.
    pub fn charge_bytes(&mut self, bytes: u64, now: Instant) {
        if let Some(b) = &mut self.bytes {
            b.charge(bytes as f64, now);
        }
    }

    pub fn is_idle(&mut self, now: Instant) -> bool {
        self.clips.as_mut().is_none_or(|b| b.is_full(now))
            && self.bytes.as_mut().is_none_or(|b| b.is_full(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_and_hints() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3.0, Duration::from_secs(3), t0);
        for _ in 0..3 {
            assert!(b.take(1.0, t0).is_ok());
        }
        let wait = b.take(1.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 0.01, "{wait:?}");
        assert!(b.take(1.0, t0 + Duration::from_millis(1001)).is_ok());
        assert!(b.is_full(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn user_budget_counts_clips_and_bytes() {
        let t0 = Instant::now();
        let mut u = UserBudget::new(2, 1000, t0);
        assert!(u.admit(t0).is_ok());
        u.charge_bytes(1500, t0); // over the byte budget
        let wait = u.admit(t0).unwrap_err();
        // 501 bytes missing at 1000 bytes/min: ~30 s.
        assert!((wait.as_secs_f64() - 30.06).abs() < 0.1, "{wait:?}");
        let later = t0 + Duration::from_secs(31);
        assert!(u.admit(later).is_ok());
        assert!(u.admit(later).is_ok());
        assert!(
            u.admit(later).unwrap_err() > Duration::ZERO,
            "2 clips a minute"
        );
        let mut free = UserBudget::new(0, 0, t0);
        for _ in 0..1000 {
            assert!(free.admit(t0).is_ok());
        }
        assert!(free.is_idle(t0));
    }
}
