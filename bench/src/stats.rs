//! Small statistics: medians with their spread over repeated runs, and
//! percentiles of a latency sample.

use std::time::Duration;

/// A value measured in several runs: its median and the range around it.
#[derive(Debug, Clone, Default)]
pub struct Runs {
    pub values: Vec<f64>,
}

impl Runs {
    pub fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .values
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn median(&self) -> f64 {
        median(&self.sorted())
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// "min–max (n runs)", formatted with `digits` decimals.
    pub fn spread(&self, digits: usize) -> String {
        if self.values.len() < 2 {
            return format!("{} run", self.values.len());
        }
        format!(
            "{:.*}–{:.*} ({} runs)",
            digits,
            self.min(),
            digits,
            self.max(),
            self.values.len()
        )
    }
}

/// The median of sorted values (NaN for none).
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Latency percentiles from a full sample (nearest-rank).
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub count: usize,
}

/// Percentiles in milliseconds of `sample`.
pub fn percentiles(sample: &[Duration]) -> Percentiles {
    let mut ms: Vec<f64> = sample.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |p: f64| -> f64 {
        if ms.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * ms.len() as f64).ceil() as usize;
        ms[i.clamp(1, ms.len()) - 1]
    };
    Percentiles {
        p50: rank(50.0),
        p90: rank(90.0),
        p99: rank(99.0),
        max: ms.last().copied().unwrap_or(f64::NAN),
        count: ms.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), 3.0);
        let sample: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = percentiles(&sample);
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        let mut r = Runs::default();
        for v in [3.0, 1.0, 2.0] {
            r.push(v);
        }
        assert_eq!((r.median(), r.min(), r.max()), (2.0, 1.0, 3.0));
    }
}
