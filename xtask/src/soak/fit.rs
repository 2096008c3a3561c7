//! Trends of the tracer's samples: a least-squares line through the
//! samples after the warm-up, its slope per hour, and the peaks.
//!
//! In: `Sample`s (seconds since the loads started, VmRSS, open fds, CPU
//! time). Out: a `Trend` per quantity (slope per hour over the window,
//! how many samples and how long a window it rests on).

use serde_json::{json, Value};

/// One look at the tracer's process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Sample {
    /// Seconds since the loads started (negative: before them).
    pub t: f64,
    /// Whether the loads were running (the slopes use only these).
    pub loaded: bool,
    pub rss_kib: u64,
    pub fds: u64,
    /// Of `fds`, network namespaces (`net:[…]` links).
    pub netns_fds: u64,
    /// User + system CPU time so far, seconds (all threads, dead ones
    /// included).
    pub cpu_s: f64,
}

impl Sample {
    pub(super) fn to_json(self) -> Value {
        json!({
            "t_s": self.t,
            "loaded": self.loaded,
            "rss_kib": self.rss_kib,
            "fds": self.fds,
            "netns_fds": self.netns_fds,
            "cpu_s": self.cpu_s,
        })
    }
}

/// Slope and intercept of the least-squares line through `points`
/// (x, y); None for fewer than two points or all at one x.
pub(super) fn least_squares(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx <= f64::EPSILON * n {
        return None;
    }
    let slope = sxy / sxx;
    Some((slope, my - slope * mx))
}

/// A fitted line over the window after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Trend {
    /// Units of the quantity per hour.
    pub per_hour: f64,
    /// Samples in the window.
    pub n: usize,
    /// From the first to the last sample of the window, seconds.
    pub window_s: f64,
}

impl Trend {
    pub(crate) fn to_json(self) -> Value {
        json!({"per_hour": self.per_hour, "samples": self.n, "window_s": self.window_s})
    }
}

/// The least samples a trend is fitted on.
pub(super) const MIN_SAMPLES: usize = 5;

/// The trend of `value` over the loaded samples at or after `warm_up_s`;
/// None with fewer than `MIN_SAMPLES` of them.
pub(super) fn trend(
    samples: &[Sample],
    warm_up_s: f64,
    value: impl Fn(&Sample) -> f64,
) -> Option<Trend> {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.loaded && s.t >= warm_up_s)
        .map(|s| (s.t, value(s)))
        .collect();
    if points.len() < MIN_SAMPLES {
        return None;
    }
    let (slope, _) = least_squares(&points)?;
    Some(Trend {
        per_hour: slope * 3600.0,
        n: points.len(),
        window_s: points[points.len() - 1].0 - points[0].0,
    })
}

/// RSS trend in MiB per hour.
pub(super) fn rss_trend(samples: &[Sample], warm_up_s: f64) -> Option<Trend> {
    trend(samples, warm_up_s, |s| s.rss_kib as f64 / 1024.0)
}

/// Open-fd trend in fds per hour.
pub(super) fn fd_trend(samples: &[Sample], warm_up_s: f64) -> Option<Trend> {
    trend(samples, warm_up_s, |s| s.fds as f64)
}

/// The tracer's CPU use between the first and the last of the loaded
/// samples at or after `from_s`, as a share of one CPU.
pub(super) fn cpu_share(samples: &[Sample], from_s: f64) -> Option<f64> {
    let w: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.loaded && s.t >= from_s)
        .collect();
    let (first, last) = (w.first()?, w.last()?);
    let dt = last.t - first.t;
    (dt > 0.0).then(|| (last.cpu_s - first.cpu_s) / dt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, rss_kib: u64, fds: u64) -> Sample {
        Sample {
            t,
            loaded: true,
            rss_kib,
            fds,
            netns_fds: 0,
            cpu_s: t / 10.0,
        }
    }

    #[test]
    fn a_line_is_fitted_exactly() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 0.5 * i as f64)).collect();
        let (m, b) = least_squares(&pts).unwrap();
        assert!((m - 0.5).abs() < 1e-12 && (b - 3.0).abs() < 1e-12);
    }

    #[test]
    fn noise_around_a_flat_line_has_no_slope() {
        // Symmetric noise: +1, -1, +1, -1 … around 100, and the same
        // pattern mirrored, so the fitted slope is exactly 0.
        let pts = [(0.0, 101.0), (1.0, 99.0), (2.0, 99.0), (3.0, 101.0)];
        let (m, b) = least_squares(&pts).unwrap();
        assert!(m.abs() < 1e-12, "{m}");
        assert!((b - 100.0).abs() < 1e-12);
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(least_squares(&[]), None);
        assert_eq!(least_squares(&[(1.0, 2.0)]), None);
        assert_eq!(least_squares(&[(1.0, 2.0), (1.0, 5.0)]), None);
    }

    #[test]
    fn slope_per_hour_after_the_warm_up() {
        // 1 MiB a minute after t = 60 s; before it, a fast climb that
        // the warm-up leaves out; samples after the load are left out.
        let mut v: Vec<Sample> = (0..10)
            .map(|i| sample(i as f64 * 6.0, i * 10_000, 50))
            .collect();
        v.extend(
            (0..=30).map(|i| sample(60.0 + i as f64 * 2.0, 100_000 + i * 1024 / 30, 60 + i % 2)),
        );
        v.push(Sample {
            loaded: false,
            ..sample(200.0, 1, 0)
        });
        let t = rss_trend(&v, 60.0).unwrap();
        assert_eq!(t.n, 31);
        assert!((t.window_s - 60.0).abs() < 1e-9);
        // 1024/30 KiB rounded down each 2 s: about 60 MiB/h.
        assert!((t.per_hour - 60.0).abs() < 2.0, "{}", t.per_hour);
        let f = fd_trend(&v, 60.0).unwrap();
        assert!(f.per_hour.abs() < 10.0, "{}", f.per_hour);
        // Too few samples after the warm-up: no trend.
        assert_eq!(rss_trend(&v, 115.0), None);
    }

    #[test]
    fn cpu_share_over_the_window() {
        let v: Vec<Sample> = (0..=10).map(|i| sample(i as f64, 0, 0)).collect();
        assert!((cpu_share(&v, 0.0).unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(cpu_share(&v, 10.0), None);
    }
}
