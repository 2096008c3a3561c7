//! Median, minimum, maximum and spread of a handful of runs.

use serde_json::{json, Value};

/// A spread (max - min, relative to the median) above this is flagged.
pub(super) const NOISY_SPREAD: f64 = 0.10;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// None for no values (NaNs are ignored).
    pub(crate) fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            n,
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// (max - min) / median; 0 when the median is 0.
    pub(crate) fn spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median.abs()
        }
    }

    pub(crate) fn noisy(&self) -> bool {
        self.n > 1 && self.spread() > NOISY_SPREAD
    }

    pub(crate) fn to_json(self) -> Value {
        json!({
            "n": self.n,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "spread": self.spread(),
        })
    }
}

/// Each traced run's rate over the mean of the baselines just before and
/// just after it (or the one it has): slow drift of a shared machine
/// cancels out.
pub(super) fn paired_ratio(traced: f64, before: Option<f64>, after: Option<f64>) -> Option<f64> {
    let base = match (before, after) {
        (Some(b), Some(a)) => (b + a) / 2.0,
        (Some(b), None) | (None, Some(b)) => b,
        (None, None) => return None,
    };
    (base > 0.0).then(|| traced / base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
        assert_eq!(Summary::of(&[5.0, f64::NAN]).unwrap().median, 5.0);
    }

    #[test]
    fn spread_and_noise() {
        let quiet = Summary::of(&[100.0, 104.0, 98.0]).unwrap();
        assert!((quiet.spread() - 0.06).abs() < 1e-9);
        assert!(!quiet.noisy());
        let noisy = Summary::of(&[100.0, 120.0, 95.0]).unwrap();
        assert!(noisy.noisy());
        // One run has no spread to speak of.
        assert!(!Summary::of(&[1.0]).unwrap().noisy());
        assert_eq!(Summary::of(&[0.0, 0.0]).unwrap().spread(), 0.0);
    }

    #[test]
    fn ratios_against_neighbouring_baselines() {
        assert_eq!(paired_ratio(80.0, Some(100.0), Some(60.0)), Some(1.0));
        assert_eq!(paired_ratio(50.0, Some(100.0), None), Some(0.5));
        assert_eq!(paired_ratio(50.0, None, Some(100.0)), Some(0.5));
        assert_eq!(paired_ratio(50.0, None, None), None);
        assert_eq!(paired_ratio(50.0, Some(0.0), None), None);
    }
}
