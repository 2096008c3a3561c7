//! One row of the table per (load, subject), from its runs.
//!
//! In: every `RunRecord` in the order run (a subject's neighbours are the
//! baselines before and after it in the same load and round). Out: a
//! `Row`: rates
//! and ratios to the neighbouring baselines, events delivered, lost,
//! skipped and unaccounted for, bad durations, kernel and agent time per
//! event, memory and start time.

use super::{
    load::LoadKind,
    record::RunRecord,
    report::Row,
    stats::{self, Summary},
    subject::{Measured, Subject},
};

pub(super) fn summarize(load: LoadKind, s: Subject, runs: &[RunRecord], kernel_stats: bool) -> Row {
    let mine: Vec<(usize, &RunRecord)> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.subject == s && r.load_kind == load)
        .collect();
    let ok: Vec<&RunRecord> = mine.iter().map(|(_, r)| *r).filter(|r| r.ok()).collect();
    let rates: Vec<f64> = ok.iter().filter_map(|r| r.rate()).collect();
    let mut row = Row {
        load: load.name().to_string(),
        name: s.name().to_string(),
        runs: mine.len(),
        failed: mine.len() - ok.len(),
        rate: Summary::of(&rates),
        ..Default::default()
    };
    if s == Subject::Baseline {
        return row;
    }
    let neighbour = |i: usize, before: bool| -> Option<f64> {
        let j = if before { i.checked_sub(1)? } else { i + 1 };
        let r = runs.get(j)?;
        (r.subject == Subject::Baseline
            && r.round == runs[i].round
            && r.load_kind == runs[i].load_kind)
            .then(|| r.rate())
            .flatten()
    };
    let ratios: Vec<f64> = mine
        .iter()
        .filter(|(_, r)| r.ok())
        .filter_map(|&(i, r)| {
            stats::paired_ratio(r.rate()?, neighbour(i, true), neighbour(i, false))
        })
        .collect();
    row.ratio = Summary::of(&ratios);
    let measured: Vec<(&RunRecord, &Measured)> = ok
        .iter()
        .filter_map(|r| Some((*r, r.measured.as_ref()?)))
        .collect();
    if measured.is_empty() {
        return row;
    }
    let sum = |f: &dyn Fn(&RunRecord, &Measured) -> Option<u64>| -> Option<u64> {
        measured.iter().map(|(r, m)| f(r, m)).sum()
    };
    row.delivered = sum(&|_, m| m.delivered);
    row.expected = sum(&|r, _| r.expected());
    row.lost = sum(&|_, m| m.lost);
    row.skipped = kernel_stats
        .then(|| sum(&|_, m| Some(m.recursion_misses())))
        .flatten();
    // One program run per transition: what neither arrived nor was
    // counted as lost or skipped (not for tcplife: one line per socket).
    if s != Subject::Tcplife {
        if let (Some(e), Some(d)) = (row.expected, row.delivered) {
            let pending: u64 = measured.iter().map(|(_, m)| m.pending()).sum();
            row.unaccounted = Some(
                e as i64
                    - d as i64
                    - row.lost.unwrap_or(0) as i64
                    - row.skipped.unwrap_or(0) as i64
                    - pending as i64,
            );
        }
    }
    row.bad_durations = measured
        .iter()
        .map(|(_, m)| m.bad_durations())
        .try_fold((0, true), |(n, all), b| b.map(|(k, c)| (n + k, all && c)));
    let transitions: u64 = measured
        .iter()
        .filter_map(|(r, _)| r.load.as_ref().map(|l| l.expected_transitions))
        .sum();
    if transitions > 0 {
        if kernel_stats {
            let ns: u64 = measured.iter().map(|(_, m)| m.kernel_run_time_ns()).sum();
            row.kernel_ns_per_event = Some(ns as f64 / transitions as f64);
            let hits: u64 = measured
                .iter()
                .map(|(_, m)| m.progs.iter().map(|p| p.run_cnt).max().unwrap_or(0))
                .sum();
            row.kernel_ns_per_hit = (hits > 0).then(|| ns as f64 / hits as f64);
        }
        let cpu: f64 = measured.iter().map(|(_, m)| m.cpu_run.as_secs_f64()).sum();
        row.agent_us_per_event = Some(cpu * 1e6 / transitions as f64);
    }
    let mib = |k: u64| k as f64 / 1024.0;
    row.rss_idle_mib = Summary::of(
        &measured
            .iter()
            .filter_map(|(_, m)| m.rss_idle_kib.map(mib))
            .collect::<Vec<_>>(),
    )
    .map(|s| s.median);
    row.rss_maps_mib = Summary::of(
        &measured
            .iter()
            .filter_map(|(_, m)| m.rss_maps_kib.map(mib))
            .collect::<Vec<_>>(),
    )
    .map(|s| s.median);
    row.rss_peak_mib = measured
        .iter()
        .filter_map(|(_, m)| m.rss_peak_kib.map(mib))
        .reduce(f64::max);
    row.start_s = Summary::of(
        &measured
            .iter()
            .map(|(_, m)| m.start.as_secs_f64())
            .collect::<Vec<_>>(),
    );
    row.stop_s = Summary::of(
        &measured
            .iter()
            .map(|(_, m)| m.stop.as_secs_f64())
            .collect::<Vec<_>>(),
    );
    row
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::bench::{load::LoadResult, procfs};

    fn record(subject: Subject, round: u32, conns: u64, delivered: u64) -> RunRecord {
        RunRecord {
            load_kind: LoadKind::Churn,
            round,
            subject,
            load: Some(LoadResult {
                connections: conns,
                elapsed: Duration::from_secs(1),
                expected_transitions: conns * 10,
                expected_closed: conns * 2,
                ..Default::default()
            }),
            held_check: None,
            settled: None,
            idle_before: None,
            env: None,
            measured: (subject != Subject::Baseline).then(|| Measured {
                delivered: Some(delivered),
                lost: Some(0),
                cpu_run: Duration::from_millis(conns),
                rss_idle_kib: Some(2048),
                rss_peak_kib: Some(4096),
                start: Duration::from_millis(70),
                stop: Duration::from_millis(conns),
                progs: vec![procfs::ProgStats {
                    id: 1,
                    name: None,
                    run_time_ns: conns * 10 * 500,
                    run_cnt: conns * 10,
                    recursion_misses: 1,
                }],
                tracer_stats: Some(json!({"timing_stale": 1, "timing_map_full": 0})),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn rows_pair_each_run_with_its_neighbouring_baselines() {
        use Subject::{Baseline as B, TracerNone as X};
        let mut failed = record(X, 2, 1, 1);
        failed.error = Some("boom".into());
        let runs = vec![
            record(B, 1, 100, 0),
            record(X, 1, 80, 800),
            record(B, 1, 120, 0),
            record(X, 1, 90, 895),
            record(B, 1, 100, 0),
            // A new round: its first baseline is not the last one's neighbour.
            record(B, 2, 1000, 0),
            failed,
            record(B, 2, 1000, 0),
        ];
        let base = summarize(LoadKind::Churn, B, &runs, true);
        assert_eq!((base.runs, base.failed), (5, 0));
        assert_eq!(base.rate.unwrap().median, 120.0);
        let x = summarize(LoadKind::Churn, X, &runs, true);
        assert_eq!((x.runs, x.failed), (3, 1));
        let ratio = x.ratio.unwrap();
        assert_eq!(ratio.n, 2);
        assert!((ratio.min - 80.0 / 110.0).abs() < 1e-9);
        assert!((ratio.max - 90.0 / 110.0).abs() < 1e-9);
        assert_eq!((x.delivered, x.expected), (Some(1695), Some(1700)));
        assert_eq!((x.lost, x.skipped), (Some(0), Some(2)));
        assert_eq!(x.unaccounted, Some(3));
        assert_eq!(x.kernel_ns_per_event, Some(500.0));
        assert_eq!(x.kernel_ns_per_hit, Some(500.0));
        // 170 ms of CPU over 1700 events.
        assert!((x.agent_us_per_event.unwrap() - 100.0).abs() < 1e-9);
        assert_eq!((x.rss_idle_mib, x.rss_peak_mib), (Some(2.0), Some(4.0)));
        assert_eq!(x.bad_durations, Some((2, false)));
        // Stop times of the two good runs: 80 and 90 ms.
        let stop = x.stop_s.unwrap();
        assert_eq!((stop.n, stop.max), (2, 0.09));
        let no_stats = summarize(LoadKind::Churn, X, &runs, false);
        assert_eq!(
            (no_stats.kernel_ns_per_event, no_stats.skipped),
            (None, None)
        );
    }
}
