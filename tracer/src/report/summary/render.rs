//! Rendering of summaries: the table (a per-state table and bcc-style
//! log2 histograms) and the JSON records. Aggregation is in `mod.rs`.

use std::io::{self, Write};

use serde::Serialize;

use super::*;

impl Summary {
    pub fn write<W: Write>(&self, w: &mut W, format: Format) -> io::Result<()> {
        match format {
            Format::Json => self.write_json(w),
            Format::Table => self.write_table(w),
        }
    }

    /// One `{"type":"summary",...}` line per group.
    pub fn write_json<W: Write>(&self, w: &mut W) -> io::Result<()> {
        for g in self.report() {
            let rec = SummaryJson {
                r#type: "summary",
                group: g.group.map(|(by, key)| GroupJson {
                    by: by.name(),
                    value: key.map(|k| k.to_json()),
                    other: key.is_none().then_some(true),
                }),
                states: StatesJson(&g.stats),
                closes: ClosesJson(&g.stats.closes),
                rst: (g.stats.closes.rst_known > 0).then(|| RstJson {
                    sent: g.stats.closes.rst_sent,
                    received: g.stats.closes.rst_received,
                }),
            };
            serde_json::to_writer(&mut *w, &rec)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Per group: a table of every state, then each state's histogram.
    pub fn write_table<W: Write>(&self, w: &mut W) -> io::Result<()> {
        for g in self.report() {
            let title = match g.group {
                None => "all sockets".to_string(),
                Some((by, Some(key))) => format!("{} {key}", by.name()),
                Some((by, None)) => format!("{}: every other value", by.name()),
            };
            writeln!(
                w,
                "Time in each TCP state ({title}; {} stays of known duration)",
                g.stats.stays
            )?;
            writeln!(
                w,
                "{:<13} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "STATE", "COUNT", "MIN", "P50", "P90", "P99", "MAX"
            )?;
            for (state, s) in g.stats.states() {
                writeln!(
                    w,
                    "{:<13} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                    state.name(),
                    s.count,
                    duration(s.min),
                    duration(s.quantile_ns(0.50)),
                    duration(s.quantile_ns(0.90)),
                    duration(s.quantile_ns(0.99)),
                    duration(s.max),
                )?;
            }
            let c = &g.stats.closes;
            if c.total() > 0 {
                let classes: Vec<String> = c
                    .nonzero()
                    .map(|(by, n)| format!("{} {n}", by.name()))
                    .collect();
                write!(
                    w,
                    "\nConnections closed: {} ({})",
                    c.total(),
                    classes.join(", ")
                )?;
                if c.rst_known > 0 {
                    write!(w, "; RSTs sent {}, received {}", c.rst_sent, c.rst_received)?;
                }
                writeln!(w)?;
            }
            for (state, s) in g.stats.states() {
                writeln!(w)?;
                write_histogram(w, state, s)?;
            }
            writeln!(w)?;
        }
        Ok(())
    }
}

/// A bcc-style log2 histogram.
fn write_histogram<W: Write>(w: &mut W, state: TcpState, s: &StateStats) -> io::Result<()> {
    let buckets = s.buckets();
    let most = buckets.iter().map(|b| b.2).max().unwrap_or(0).max(1);
    writeln!(
        w,
        "{:>21} : {:<8} distribution of {}",
        "time in state",
        "count",
        state.name()
    )?;
    for (lo, hi, n) in buckets {
        let hi = if hi == u64::MAX {
            "".to_string()
        } else {
            bound(hi)
        };
        let stars = ((n * BAR as u64).div_ceil(most)) as usize;
        writeln!(
            w,
            "{:>9} -> {:<8} : {:<8} |{:<BAR$}|",
            bound(lo),
            hi,
            n,
            "*".repeat(if n > 0 { stars.max(1) } else { 0 })
        )?;
    }
    Ok(())
}

/// A duration to 3 significant digits in ns, µs, ms or s: `50.1ms`.
pub fn duration(ns: u64) -> String {
    let (v, unit) = scaled(ns);
    if unit == "ns" {
        return format!("{ns}ns");
    }
    let digits = if v >= 99.95 {
        0
    } else if v >= 9.995 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{unit}")
}

/// A histogram bound: as [`duration`] without trailing zeros (`2µs`,
/// `1.02ms`).
pub(super) fn bound(ns: u64) -> String {
    if ns == 0 {
        return "0".into();
    }
    let s = duration(ns);
    let split = s
        .find(|c: char| c.is_alphabetic() || c == 'µ')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num = if num.contains('.') {
        num.trim_end_matches('0').trim_end_matches('.')
    } else {
        num
    };
    format!("{num}{unit}")
}

fn scaled(ns: u64) -> (f64, &'static str) {
    let f = ns as f64;
    if ns < 1_000 {
        (f, "ns")
    } else if f < 999_950.0 {
        (f / 1e3, "µs")
    } else if f < 999_950_000.0 {
        (f / 1e6, "ms")
    } else {
        (f / 1e9, "s")
    }
}

#[derive(Serialize)]
struct SummaryJson<'a> {
    r#type: &'static str,
    group: Option<GroupJson>,
    states: StatesJson<'a>,
    /// Connections by close class (`{"local": 3, ...}`, classes with none
    /// left out).
    closes: ClosesJson<'a>,
    /// Resets of those connections; null when none had its resets traced.
    rst: Option<RstJson>,
}

struct ClosesJson<'a>(&'a CloseCounts);

impl Serialize for ClosesJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (by, n) in self.0.nonzero() {
            map.serialize_entry(by.name(), &n)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct RstJson {
    sent: u64,
    received: u64,
}

#[derive(Serialize)]
struct GroupJson {
    by: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    other: Option<bool>,
}

struct StatesJson<'a>(&'a GroupStats);

impl Serialize for StatesJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (state, st) in self.0.states() {
            map.serialize_entry(
                state.name(),
                &StateJson {
                    count: st.count,
                    min_ns: st.min,
                    p50_ns: st.quantile_ns(0.50),
                    p90_ns: st.quantile_ns(0.90),
                    p99_ns: st.quantile_ns(0.99),
                    max_ns: st.max,
                    histogram: st
                        .buckets()
                        .into_iter()
                        .map(|(lo, hi, count)| BucketJson {
                            lo_ns: lo,
                            hi_ns: (hi != u64::MAX).then_some(hi),
                            count,
                        })
                        .collect(),
                },
            )?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct StateJson {
    count: u64,
    min_ns: u64,
    p50_ns: u64,
    p90_ns: u64,
    p99_ns: u64,
    max_ns: u64,
    histogram: Vec<BucketJson>,
}

#[derive(Serialize)]
struct BucketJson {
    lo_ns: u64,
    /// Exclusive; null for the last, open bucket.
    hi_ns: Option<u64>,
    count: u64,
}
