//! Percentiles and medians over measured durations.

use std::time::Duration;

use serde::Serialize;

/// The nearest-rank percentile `p` (0..=100) of sorted samples; zero for no samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency figures of one set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    /// The fastest sample: for a broadcast, the pipeline's fixed delay before its first delivery.
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort_unstable();
        Latency {
            min_ms: ms(samples.first().copied().unwrap_or_default()),
            p50_ms: ms(percentile(&samples, 50.0)),
            p99_ms: ms(percentile(&samples, 99.0)),
            max_ms: ms(samples.last().copied().unwrap_or_default()),
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The median of some figures (the lower middle one for an even count, so it is always a
/// figure that was measured); zero for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&s[..1], 99.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn latency_figures_come_from_unsorted_samples() {
        let s = [30, 10, 20].map(Duration::from_millis).to_vec();
        let l = Latency::of(s);
        assert_eq!((l.min_ms, l.p50_ms, l.max_ms), (10.0, 20.0, 30.0));
    }

    #[test]
    fn median_picks_a_measured_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.0);
        assert_eq!(median(&[]), 0.0);
    }
}
