//! Summaries: aggregation, percentiles, groups and rendering.
use super::render::bound;
use super::*;
use crate::kernel::events::tests::{comm, sample};
use TcpState::*;

const MS: u64 = 1_000_000;

fn est(ns: u64) -> Transition {
    Transition {
        old: Established,
        new: FinWait1,
        old_state_ns: Some(ns),
        ..sample()
    }
}

/// No owner known (the key functions never ask when not grouping by
/// comm or pid).
const NOBODY: Option<&NamedOwner> = None;

/// The exact nearest-rank quantile of sorted values.
fn exact(sorted: &[u64], q: f64) -> u64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    sorted[rank - 1]
}

fn parse(args: &[&str]) -> Result<crate::cli::Args, clap::Error> {
    use clap::Parser as _;
    crate::cli::Args::try_parse_from(std::iter::once("tracer").chain(args.iter().copied()))
}

#[test]
fn summary_flags() {
    use clap::error::ErrorKind;
    let a = parse(&[]).unwrap();
    assert!(!a.summary.summary && a.summary.group_by.is_none());
    assert!(Summary::from_args(&a.summary).is_none());
    let a = parse(&["--summary", "--group-by", "comm", "--top", "3"]).unwrap();
    assert_eq!(a.summary.group_by, Some(GroupBy::Comm));
    assert_eq!(a.summary.top, 3);
    let s = Summary::from_args(&a.summary).unwrap();
    assert_eq!(s.group_by(), Some(GroupBy::Comm));
    assert_eq!(
        parse(&["--group-by", "lport"]).unwrap_err().kind(),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        parse(&["--summary", "--top", "3"]).unwrap_err().kind(),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        parse(&["--summary", "--group-by", "bogus"])
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidValue
    );
    assert_eq!(
        parse(&["--summary", "--group-by", "pid", "--top", "0"])
            .unwrap_err()
            .kind(),
        ErrorKind::ValueValidation
    );
}

#[test]
fn stays_are_timed_old_states_other_than_close() {
    assert_eq!(stay(&est(5)), Some((Established, 5)));
    assert_eq!(
        stay(&Transition {
            old_state_ns: None,
            ..est(5)
        }),
        None
    );
    assert_eq!(
        stay(&Transition {
            old: Close,
            new: SynSent,
            ..est(5)
        }),
        None
    );
}

#[test]
fn known_durations_give_their_percentiles_within_the_bound() {
    // 10 × 50 ms, 10 × 200 ms, 10 × 1 s, with some jitter.
    let mut values = Vec::new();
    for i in 0..10u64 {
        values.push(50 * MS + i * 37_000);
        values.push(200 * MS + i * 91_000);
        values.push(1000 * MS + i * 1_300_000);
    }
    let mut s = Summary::new(None, 10);
    for &v in &values {
        s.transition(&est(v), NOBODY);
    }
    values.sort();
    let r = s.report();
    assert_eq!(r.len(), 1);
    let st = r[0].stats.state(Established).unwrap();
    assert_eq!(st.count(), 30);
    assert_eq!(st.min_ns(), values[0]);
    assert_eq!(st.max_ns(), *values.last().unwrap());
    for q in [0.5, 0.9, 0.99] {
        let want = exact(&values, q);
        let got = st.quantile_ns(q);
        assert!(got >= want, "p{q}: {got} < {want}");
        assert!(
            got as f64 <= want as f64 * (1.0 + 1.0 / 128.0),
            "p{q}: {got} more than 1/128 above {want}"
        );
    }
    assert!(st.quantile_ns(0.5) < 202 * MS);
    assert!(st.quantile_ns(0.99) >= 1000 * MS);
}

#[test]
fn percentile_bound_holds_over_many_magnitudes() {
    // A deterministic spread from 1 µs to about 100 s.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut values = Vec::new();
    let mut s = Summary::new(None, 10);
    for _ in 0..5000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = 1000 + (x % 100_000) * (1 + (x >> 40) % 1_000_000);
        values.push(v);
        s.transition(&est(v), NOBODY);
    }
    values.sort();
    let r = s.report();
    let st = r[0].stats.state(Established).unwrap();
    for q in [0.01, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999] {
        let want = exact(&values, q);
        let got = st.quantile_ns(q);
        assert!(
            got >= want && got as f64 <= want as f64 * (1.0 + 1.0 / 128.0),
            "q{q}: {got} vs {want}"
        );
    }
}

#[test]
fn few_stays_are_exact_and_merges_keep_every_value() {
    let mut few = StateStats::new();
    for v in [5, 1, 4, 2, 3] {
        few.record(v * MS);
    }
    assert!(matches!(few.dist, Dist::Exact(_)));
    assert_eq!(few.quantile_ns(0.5), 3 * MS);
    assert_eq!(few.quantile_ns(0.0), MS);
    assert_eq!(few.quantile_ns(1.0), 5 * MS);
    // Exact into exact, past EXACT_VALUES: becomes a histogram.
    let mut a = few.clone();
    a.merge(&few);
    assert_eq!(a.count(), 10);
    assert!(matches!(a.dist, Dist::Hist(_)));
    let p50 = a.quantile_ns(0.5);
    assert!((3 * MS..=3 * MS + 3 * MS / 128).contains(&p50), "{p50}");
    let mut many = StateStats::new();
    for v in 1..=100 {
        many.record(v * MS);
    }
    // Histogram into exact, and exact into histogram: same result.
    let mut x = few.clone();
    x.merge(&many);
    let mut y = many.clone();
    y.merge(&few);
    for q in [0.01, 0.5, 0.9, 0.99, 1.0] {
        assert_eq!(x.quantile_ns(q), y.quantile_ns(q), "q{q}");
    }
    assert_eq!((x.count(), x.min_ns(), x.max_ns()), (105, MS, 100 * MS));
    assert_eq!(x.log2, y.log2);
    x.reset();
    assert_eq!(x.count(), 0);
    assert!(matches!(x.dist, Dist::Exact(_)));
}

#[test]
fn log2_buckets_are_microsecond_powers_of_two() {
    assert_eq!(log2_bucket(0), 0);
    assert_eq!(log2_bucket(999), 0);
    assert_eq!(log2_bucket(1000), 1);
    assert_eq!(log2_bucket(1999), 1);
    assert_eq!(log2_bucket(2000), 2);
    assert_eq!(log2_bounds(2), (2000, 4000));
    assert_eq!(log2_bucket(50 * MS), 16); // [32.768, 65.536) ms
    assert_eq!(log2_bounds(16), (32_768_000, 65_536_000));
    assert_eq!(log2_bucket(u64::MAX), LOG2_BUCKETS - 1);
    let mut s = StateStats::new();
    s.record(50 * MS);
    s.record(200 * MS);
    let b = s.buckets();
    assert_eq!(b.first().unwrap(), &(32_768_000, 65_536_000, 1));
    assert_eq!(b.last().unwrap(), &(131_072_000, 262_144_000, 1));
    assert_eq!(b.len(), 3, "empty buckets in between are shown");
}

#[test]
fn durations_read_well() {
    assert_eq!(duration(999), "999ns");
    assert_eq!(duration(1000), "1.00µs");
    assert_eq!(duration(50_123_000), "50.1ms");
    assert_eq!(duration(200_330_000), "200ms");
    assert_eq!(duration(999_990_000), "1.00s");
    assert_eq!(duration(1_000_300_000), "1.00s");
    assert_eq!(duration(12_345_000_000), "12.3s");
    assert_eq!(bound(2000), "2µs");
    assert_eq!(bound(1_024_000), "1.02ms");
    assert_eq!(bound(16_384_000), "16.4ms");
    assert_eq!(bound(0), "0");
}

#[test]
fn table_has_every_state_and_a_histogram() {
    let mut s = Summary::new(None, 10);
    for v in [50 * MS, 200 * MS, 1000 * MS] {
        s.transition(&est(v), NOBODY);
    }
    s.transition(
        &Transition {
            old: SynSent,
            new: Established,
            old_state_ns: Some(60_000),
            ..sample()
        },
        NOBODY,
    );
    let mut out = Vec::new();
    s.write_table(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("all sockets; 4 stays"), "{text}");
    let syn = text.find("\nSYN_SENT").unwrap();
    let est = text.find("\nESTABLISHED").unwrap();
    assert!(syn < est, "life order:\n{text}");
    assert!(
        text.contains("ESTABLISHED           3    50.0ms     200ms     1.00s     1.00s     1.00s"),
        "{text}"
    );
    assert!(
        text.contains("32.8ms -> 65.5ms   : 1        |****************************************|"),
        "{text}"
    );
    assert!(text.contains("distribution of ESTABLISHED"), "{text}");
    if std::env::var_os("SHOW").is_some() {
        println!("{text}");
    }
}

#[test]
fn json_record_has_the_contract_fields() {
    let mut s = Summary::new(None, 10);
    for v in [50 * MS, 200 * MS, 1000 * MS] {
        s.transition(&est(v), NOBODY);
    }
    let mut out = Vec::new();
    s.write_json(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["type"], "summary");
    assert!(v["group"].is_null());
    let e = &v["states"]["ESTABLISHED"];
    assert_eq!(e["count"], 3);
    assert_eq!(e["min_ns"], 50 * MS);
    assert_eq!(e["max_ns"], 1000 * MS);
    for k in ["p50_ns", "p90_ns", "p99_ns"] {
        assert!(e[k].is_u64(), "{k}");
    }
    let h = e["histogram"].as_array().unwrap();
    assert_eq!(h[0]["lo_ns"], 32_768_000u64);
    assert_eq!(h[0]["hi_ns"], 65_536_000u64);
    assert_eq!(h[0]["count"], 1);
    assert_eq!(
        h.iter().map(|b| b["count"].as_u64().unwrap()).sum::<u64>(),
        3
    );
    assert!(
        text.contains(r#"{"count":3,"min_ns":50000000,"p50_ns":"#),
        "{text}"
    );
}

#[test]
fn group_by_port_shows_top_groups_and_other() {
    let mut s = Summary::new(Some(GroupBy::Lport), 2);
    for (port, n) in [(80u16, 5), (443, 3), (22, 1), (8080, 2)] {
        for _ in 0..n {
            s.transition(
                &Transition {
                    lport: port,
                    ..est(MS)
                },
                NOBODY,
            );
        }
    }
    let r = s.report();
    let names: Vec<String> = r
        .iter()
        .map(|g| match g.group {
            Some((_, Some(k))) => k.to_string(),
            Some((_, None)) => "other".into(),
            None => "all".into(),
        })
        .collect();
    assert_eq!(names, ["80", "443", "other"]);
    assert_eq!(r[2].stats.stays(), 3);
    let mut out = Vec::new();
    s.write_json(&mut out).unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0]["group"],
        serde_json::json!({"by":"lport","value":80})
    );
    assert_eq!(
        lines[2]["group"],
        serde_json::json!({"by":"lport","other":true})
    );
    assert_eq!(lines[2]["states"]["ESTABLISHED"]["count"], 3);
}

#[test]
fn group_by_comm_uses_the_owner() {
    let mut s = Summary::new(Some(GroupBy::Comm), 10);
    s.transition(
        &est(MS),
        Some(&NamedOwner::from(crate::track::tracker::Owner {
            pid: 1,
            comm: comm("nginx"),
            uid: 0,
            ..Default::default()
        })),
    );
    let mut out = Vec::new();
    s.write_json(&mut out).unwrap();
    assert!(String::from_utf8(out)
        .unwrap()
        .contains(r#""group":{"by":"comm","value":"nginx"}"#));
}

#[test]
fn a_frequent_key_survives_a_stream_of_rare_ones() {
    // Space-Saving: 8 followed groups, 1000 distinct rare ports, and
    // port 80 with a quarter of all stays arriving late.
    let mut s = Summary::new(Some(GroupBy::Lport), 1);
    let mut port80 = 0;
    for i in 0..1000u16 {
        s.transition(
            &Transition {
                lport: 1000 + i,
                ..est(MS)
            },
            NOBODY,
        );
        if i >= 500 && i % 2 == 0 {
            for _ in 0..2 {
                s.transition(
                    &Transition {
                        lport: 80,
                        ..est(2 * MS)
                    },
                    NOBODY,
                );
                port80 += 1;
            }
        }
    }
    let r = s.report();
    assert_eq!(r[0].group, Some((GroupBy::Lport, Some(GroupKey::Port(80)))));
    assert!(r[0].stats.stays() > port80 / 2, "{}", r[0].stats.stays());
    // Nothing is lost: followed + other = all.
    assert_eq!(
        r.iter().map(|g| g.stats.stays()).sum::<u64>(),
        1000 + port80
    );
    assert_eq!(s.stays(), 1000 + port80);
}
