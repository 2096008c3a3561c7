//! The bench's results: one row per (load, subject), as a text table and
//! as JSON.

use serde_json::{json, Value};

use super::{stats::Summary, subject::Subject};

/// One subject over all rounds of one load.
#[derive(Clone, Debug, Default)]
pub(crate) struct Row {
    /// The load's name.
    pub load: String,
    pub name: String,
    pub runs: usize,
    pub failed: usize,
    pub rate: Option<Summary>,
    /// Traced rate over the neighbouring baselines' (per run).
    pub ratio: Option<Summary>,
    pub delivered: Option<u64>,
    pub expected: Option<u64>,
    pub lost: Option<u64>,
    pub skipped: Option<u64>,
    /// expected - delivered - lost - skipped: transitions neither
    /// delivered nor counted anywhere (negative: more than the load made,
    /// e.g. other traffic seen by an unfiltered peer).
    pub unaccounted: Option<i64>,
    /// (count, checked record by record)
    pub bad_durations: Option<(u64, bool)>,
    pub kernel_ns_per_event: Option<f64>,
    /// Kernel time per tracepoint hit: run time of all its programs over
    /// the run count of its busiest one (the hits, whoever's traffic they
    /// were), for subjects that also saw other traffic.
    pub kernel_ns_per_hit: Option<f64>,
    pub agent_us_per_event: Option<f64>,
    pub rss_idle_mib: Option<f64>,
    pub rss_peak_mib: Option<f64>,
    /// Of the RSS: eBPF maps mapped into the process (the kernel's ring
    /// buffer: its data pages once in the tracer, twice in a build that
    /// maps them as libbpf does).
    pub rss_maps_mib: Option<f64>,
    pub start_s: Option<Summary>,
    /// SIGINT to exit, after the load.
    pub stop_s: Option<Summary>,
}

impl Row {
    /// `load / subject`, for notes.
    pub(crate) fn label(&self) -> String {
        format!("{} / {}", self.load, self.name)
    }

    pub(crate) fn noisy(&self) -> bool {
        self.rate.is_some_and(|s| s.noisy()) || self.ratio.is_some_and(|s| s.noisy())
    }

    pub(crate) fn to_json(&self) -> Value {
        let s = |x: &Option<Summary>| x.map(Summary::to_json);
        json!({
            "load": self.load,
            "subject": self.name,
            "runs": self.runs,
            "failed_runs": self.failed,
            "connections_per_s": s(&self.rate),
            "ratio": s(&self.ratio),
            "events_delivered": self.delivered,
            "events_expected": self.expected,
            "lost": self.lost,
            "recursion_misses": self.skipped,
            "unaccounted": self.unaccounted,
            "bad_durations": self.bad_durations.map(|(n, _)| n),
            "bad_durations_checked_per_record": self.bad_durations.map(|(_, c)| c),
            "kernel_ns_per_event": self.kernel_ns_per_event,
            "kernel_ns_per_hit": self.kernel_ns_per_hit,
            "agent_cpu_us_per_event": self.agent_us_per_event,
            "rss_idle_mib": self.rss_idle_mib,
            "rss_peak_mib": self.rss_peak_mib,
            "rss_maps_mib": self.rss_maps_mib,
            "start_s": s(&self.start_s),
            "stop_s": s(&self.stop_s),
            "noisy": self.noisy(),
        })
    }
}

pub(crate) const HEADERS: [&str; 15] = [
    "load",
    "subject",
    "conn/s median [min-max]",
    "ratio [min-max]",
    "events delivered/expected",
    "lost",
    "skipped",
    "bad dur",
    "kernel ns/ev",
    "agent us/ev",
    "RSS idle/peak MiB",
    "of it maps",
    "start s",
    "stop s",
    "",
];

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

fn range(s: &Summary, prec: usize) -> String {
    if s.n == 1 {
        format!("{:.prec$}", s.median)
    } else {
        format!("{:.prec$} [{:.prec$}-{:.prec$}]", s.median, s.min, s.max)
    }
}

pub(crate) fn cells(r: &Row, baseline: bool) -> Vec<String> {
    let mut notes = Vec::new();
    if r.noisy() {
        let spread = r
            .rate
            .iter()
            .chain(r.ratio.iter())
            .map(Summary::spread)
            .fold(0.0, f64::max);
        notes.push(format!("noisy: spread {:.0}%", spread * 100.0));
    }
    if r.failed > 0 {
        notes.push(format!("{} of {} runs failed", r.failed, r.runs));
    }
    vec![
        r.load.clone(),
        r.name.clone(),
        opt(r.rate.as_ref(), |s| range(s, 0)),
        if baseline {
            "1.00".into()
        } else {
            opt(r.ratio.as_ref(), |s| range(s, 2))
        },
        match (r.delivered, r.expected) {
            (Some(d), Some(e)) => format!("{d}/{e}"),
            _ => "-".into(),
        },
        opt(r.lost, |n| n.to_string()),
        opt(r.skipped, |n| n.to_string()),
        opt(r.bad_durations, |(n, checked)| {
            if checked {
                n.to_string()
            } else {
                format!("{n}*")
            }
        }),
        opt(r.kernel_ns_per_event, |x| format!("{x:.0}")),
        opt(r.agent_us_per_event, |x| format!("{x:.2}")),
        match (r.rss_idle_mib, r.rss_peak_mib) {
            (Some(i), Some(p)) => format!("{i:.1}/{p:.1}"),
            _ => "-".into(),
        },
        opt(r.rss_maps_mib, |x| format!("{x:.1}")),
        opt(r.start_s.as_ref(), |s| format!("{:.3}", s.median)),
        opt(r.stop_s.as_ref(), |s| format!("{:.3}", s.max)),
        notes.join("; "),
    ]
}

/// A plain-text table: the first `left` columns left-aligned, the others
/// right, the last (notes) left and unpadded.
pub(crate) fn format_table(headers: &[&str], left: usize, rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut width = vec![0usize; cols];
    for (i, h) in headers.iter().enumerate() {
        width[i] = h.chars().count();
    }
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate().take(cols) {
            let pad = width[i].saturating_sub(c.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if i < left || i == cols - 1 {
                out.push_str(c);
                if i != cols - 1 {
                    out.push_str(&" ".repeat(pad));
                }
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(c);
            }
        }
        out.trim_end().to_string()
    };
    let mut out = String::new();
    let h: Vec<String> = headers.iter().map(ToString::to_string).collect();
    out.push_str(&line(&h));
    out.push('\n');
    let rule: Vec<String> = width
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i == cols - 1 {
                String::new()
            } else {
                "-".repeat(*w)
            }
        })
        .collect();
    out.push_str(&line(&rule));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

pub(crate) fn table(rows: &[(Subject, Row)]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(s, r)| cells(r, *s == Subject::Baseline))
        .collect();
    format_table(&HEADERS, 2, &cells)
}

/// `20261123T213500Z` for a time in seconds since the epoch (UTC).
pub(crate) fn timestamp(unix_s: u64) -> String {
    let (y, m, d) = civil_from_days((unix_s / 86_400) as i64);
    let t = unix_s % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// Howard Hinnant's days-to-civil (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0), "19700101T000000Z");
        assert_eq!(timestamp(951_782_400), "20000229T000000Z");
        assert_eq!(timestamp(1_795_469_998), "20261123T213958Z");
    }

    #[test]
    fn table_aligns_columns() {
        let t = format_table(
            &["name", "n", ""],
            1,
            &[
                vec!["a".into(), "1".into(), "".into()],
                vec!["longer".into(), "1234".into(), "noisy".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "name       n");
        assert_eq!(lines[1], "------  ----");
        assert_eq!(lines[2], "a          1");
        assert_eq!(lines[3], "longer  1234  noisy");
    }

    #[test]
    fn row_cells() {
        let rate = Summary::of(&[100.0, 90.0, 120.0]);
        let row = Row {
            load: "nginx".into(),
            name: "tracer none+summary".into(),
            runs: 3,
            failed: 0,
            rate,
            ratio: Summary::of(&[0.9, 0.95, 0.93]),
            delivered: Some(10),
            expected: Some(12),
            lost: Some(2),
            skipped: Some(0),
            unaccounted: Some(0),
            bad_durations: Some((0, false)),
            kernel_ns_per_event: Some(512.4),
            kernel_ns_per_hit: None,
            agent_us_per_event: Some(1.234),
            rss_idle_mib: Some(4.0),
            rss_peak_mib: Some(9.25),
            rss_maps_mib: Some(8.0),
            start_s: Summary::of(&[0.1234]),
            stop_s: Summary::of(&[0.004, 0.0456]),
        };
        let c = cells(&row, false);
        assert_eq!(
            (c[0].as_str(), c[1].as_str()),
            ("nginx", "tracer none+summary")
        );
        assert_eq!(c[2], "100 [90-120]");
        assert_eq!(c[3], "0.93 [0.90-0.95]");
        assert_eq!(c[4], "10/12");
        assert_eq!(c[7], "0*");
        assert_eq!(c[8], "512");
        assert_eq!(c[9], "1.23");
        assert_eq!(c[10], "4.0/9.2");
        assert_eq!(c[11], "8.0");
        assert_eq!(c[12], "0.123");
        assert_eq!(c[13], "0.046");
        assert_eq!(c[14], "noisy: spread 30%");
        let base = cells(
            &Row {
                name: "baseline".into(),
                rate: Summary::of(&[5.0]),
                ..Default::default()
            },
            true,
        );
        assert_eq!(base[2], "5");
        assert_eq!(base[3], "1.00");
        assert_eq!(base[4], "-");
    }
}
