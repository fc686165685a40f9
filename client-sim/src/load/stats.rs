//! Latency histograms (HDR, microsecond resolution) and the report's
//! numbers.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency histogram from 1 µs to 10 min at 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid"))
    }

    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        let _ = self.0.record(us);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn summary(&self) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: self.0.len(),
            p50: ms(self.0.value_at_quantile(0.50)),
            p90: ms(self.0.value_at_quantile(0.90)),
            p95: ms(self.0.value_at_quantile(0.95)),
            p99: ms(self.0.value_at_quantile(0.99)),
            max: ms(self.0.max()),
        }
    }

    /// The CDF as (ms, quantile) points, for plots.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for q in (0..=1000).map(|i| f64::from(i) / 1000.0) {
            out.push((self.0.value_at_quantile(q) as f64 / 1000.0, q));
        }
        out
    }

    pub fn add(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }
}

/// Percentiles of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    /// The MCPTT KPIs (access time, mouth-to-ear) are set at the 95th.
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_ms() {
        let mut l = Latency::new();
        for ms in 1..=100u64 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50 - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p95 - 95.0).abs() < 0.1, "{s:?}");
        assert!((s.p99 - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max - 100.0).abs() < 0.1, "{s:?}");
        assert_eq!(l.cdf().len(), 1001);
    }
}
