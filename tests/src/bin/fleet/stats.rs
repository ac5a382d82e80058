//! Percentiles from a sorted sample: every round trip is kept (a few MB for a long run),
//! so p99.9 is exact rather than a histogram bucket's edge.

use std::time::Duration;

/// Round trips in nanoseconds, merged from every connection.
#[derive(Default)]
pub struct Sample(Vec<u64>);

impl Sample {
    pub fn push(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn extend(&mut self, other: Sample) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Sorts once; then `quantile` answers in O(1).
    pub fn sorted(mut self) -> Sorted {
        self.0.sort_unstable();
        Sorted(self.0)
    }
}

pub struct Sorted(Vec<u64>);

impl Sorted {
    /// The q-quantile (nearest rank) in microseconds; 0 for an empty sample.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = (q * self.0.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.0.len()) - 1;
        self.0[i] as f64 / 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut s = Sample::default();
        for us in 1..=1000 {
            s.push(Duration::from_micros(us));
        }
        let s = s.sorted();
        assert_eq!(s.quantile_us(0.5), 500.0);
        assert_eq!(s.quantile_us(0.99), 990.0);
        assert_eq!(s.quantile_us(0.999), 999.0);
        assert_eq!(s.quantile_us(1.0), 1000.0);
    }
}
