//! Summaries: for each TCP state, the distribution of the time sockets
//! spent in it (count, min, p50, p90, p99, max and a log2 histogram),
//! optionally split by a [`GroupBy`] field.
//!
//! The input is one *stay*: a state and how long a socket was in it, the
//! `old_state_ns` of a transition (known durations only). The live agent
//! and `tracer summarize` feed the same [`Summary`] from the same
//! transitions, so they print the same summary for the same data.
//!
//! Percentiles come from an HdrHistogram with [`SIGNIFICANT_DIGITS`]
//! significant digits: a reported percentile is never below the exact
//! (nearest-rank) value and at most 1/128 (0.8%) above it. Count, min and
//! max are exact.
//!
//! Cost per stay: a group key is a `Copy` value looked up in a `HashMap`
//! of at most `2 × top` groups. A state's first [`EXACT_VALUES`] stays in
//! a group are kept as they are (exact percentiles, no allocation, cheap
//! to fold into "other" when a rare group is dropped); the HdrHistogram is
//! created with the next one and takes every stay after it without
//! allocating (it grows, rarely, to the longest stay).

use std::{
    borrow::Cow,
    collections::HashMap,
    io::{self, Write},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    kernel::events::{TcpState, Transition},
    report::format::Format,
    report::group::{GroupBy, GroupKey},
    track::close::{CloseBy, Rst},
    track::tracker::Owner,
};

/// HdrHistogram precision: values are kept to within 1/128 of themselves.
pub const SIGNIFICANT_DIGITS: u8 = 2;
/// Largest duration the percentile histogram resolves (about 104 days);
/// longer stays count there (max stays exact).
const HIST_MAX_NS: u64 = 1 << 53;
/// Log2 histogram: bucket 0 is below 1 µs, bucket b ≥ 1 is
/// [2^(b-1), 2^b) µs; the last one takes everything longer.
const LOG2_BUCKETS: usize = 48;
const STATES: usize = 13;
/// Stays kept as values before a state's HdrHistogram is created.
pub const EXACT_VALUES: usize = 8;
/// Width of the histogram bars, as in bcc.
const BAR: usize = 40;

/// With `--group-by`, this many groups per group shown are followed.
const FOLLOWED_PER_SHOWN: usize = 2;
const MIN_FOLLOWED: usize = 8;

/// `--summary`, `--group-by`, `--top`.
#[derive(Debug, Clone, clap::Args)]
pub struct SummaryArgs {
    /// At exit, and on SIGUSR1 while running, print for each TCP state the
    /// distribution of the time sockets spent in it (a table, or
    /// `summary` records with --output json).
    #[arg(long)]
    pub summary: bool,

    /// Split the summary by this field (the owner's, for comm and pid).
    #[arg(long, value_enum, value_name = "FIELD", requires = "summary")]
    pub group_by: Option<GroupBy>,

    /// With --group-by: the number of groups shown, by count; the rest are
    /// summed in one "other" group.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000), requires = "group_by")]
    pub top: u32,
}

/// The duration of the stay that transition `t` ended, if the kernel timed
/// it. Time in CLOSE (before connect or listen) is no part of a
/// connection's life and is left out.
pub fn stay(t: &Transition) -> Option<(TcpState, u64)> {
    let ns = t.old_state_ns?;
    (t.old != TcpState::Close).then_some((t.old, ns))
}

/// The distribution of one state's stays.
#[derive(Clone)]
pub struct StateStats {
    count: u64,
    min: u64,
    max: u64,
    /// The first EXACT_VALUES stays, then an HdrHistogram of all.
    dist: Dist,
    log2: [u64; LOG2_BUCKETS],
}

#[derive(Clone)]
enum Dist {
    Exact([u64; EXACT_VALUES]),
    Hist(Box<Histogram<u64>>),
}

impl StateStats {
    fn new() -> Self {
        StateStats {
            count: 0,
            min: u64::MAX,
            max: 0,
            dist: Dist::Exact([0; EXACT_VALUES]),
            log2: [0; LOG2_BUCKETS],
        }
    }

    fn record(&mut self, ns: u64) {
        self.record_dist(ns);
        self.count += 1;
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
        self.log2[log2_bucket(ns)] += 1;
    }

    /// Into `dist` only (before `count` counts it).
    fn record_dist(&mut self, ns: u64) {
        let n = self.count as usize;
        match &mut self.dist {
            Dist::Exact(v) if n < EXACT_VALUES => v[n] = ns,
            Dist::Exact(v) => {
                let mut h = Box::new(
                    Histogram::new(SIGNIFICANT_DIGITS).expect("2 significant digits are valid"),
                );
                for &x in v.iter() {
                    let _ = h.record(x.min(HIST_MAX_NS));
                }
                let _ = h.record(ns.min(HIST_MAX_NS));
                self.dist = Dist::Hist(h);
            }
            // Auto-resizing: grows (rarely) up to HIST_MAX_NS, never fails.
            Dist::Hist(h) => {
                let _ = h.record(ns.min(HIST_MAX_NS));
            }
        }
    }

    fn merge(&mut self, other: &StateStats) {
        if other.count == 0 {
            return;
        }
        match &other.dist {
            Dist::Exact(v) => {
                for &x in &v[..other.count as usize] {
                    self.record_dist(x);
                    self.count += 1;
                }
            }
            Dist::Hist(theirs) => {
                match &mut self.dist {
                    Dist::Exact(v) => {
                        let mut h = theirs.clone();
                        for &x in &v[..self.count as usize] {
                            let _ = h.record(x.min(HIST_MAX_NS));
                        }
                        self.dist = Dist::Hist(h);
                    }
                    Dist::Hist(mine) => {
                        let _ = mine.add(&**theirs);
                    }
                }
                self.count += other.count;
            }
        }
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        for (a, b) in self.log2.iter_mut().zip(other.log2) {
            *a += b;
        }
    }

    fn reset(&mut self) {
        *self = StateStats::new();
    }

    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn min_ns(&self) -> u64 {
        self.min
    }
    pub fn max_ns(&self) -> u64 {
        self.max
    }

    /// The nearest-rank quantile `q` (0..=1): exact for the first
    /// EXACT_VALUES stays, then from the histogram, kept within the exact
    /// min and max.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        match &self.dist {
            Dist::Exact(v) => {
                let n = self.count as usize;
                if n == 0 {
                    return 0;
                }
                let mut sorted = *v;
                sorted[..n].sort_unstable();
                let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
                sorted[rank - 1]
            }
            Dist::Hist(h) => h.value_at_quantile(q).clamp(self.min, self.max),
        }
    }

    /// The log2 buckets from the first to the last non-empty one:
    /// (low ns, high ns exclusive, count).
    pub fn buckets(&self) -> Vec<(u64, u64, u64)> {
        let first = self.log2.iter().position(|&n| n > 0);
        let last = self.log2.iter().rposition(|&n| n > 0);
        match (first, last) {
            (Some(a), Some(b)) => (a..=b)
                .map(|i| {
                    let (lo, hi) = log2_bounds(i);
                    (lo, hi, self.log2[i])
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn log2_bucket(ns: u64) -> usize {
    let us = ns / 1000;
    if us == 0 {
        0
    } else {
        ((64 - us.leading_zeros()) as usize).min(LOG2_BUCKETS - 1)
    }
}

/// Bounds of a log2 bucket in ns: [low, high).
fn log2_bounds(i: usize) -> (u64, u64) {
    if i == 0 {
        (0, 1000)
    } else if i == LOG2_BUCKETS - 1 {
        (1000 << (i - 1), u64::MAX)
    } else {
        (1000 << (i - 1), 1000 << i)
    }
}

/// Connections by how they closed, and their resets (see `close.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseCounts {
    /// Per [`CloseBy`], in `CloseBy::ALL` order.
    pub by: [u64; CloseBy::ALL.len()],
    pub rst_sent: u64,
    pub rst_received: u64,
    /// Connections whose resets were known (the reset tracepoints ran).
    pub rst_known: u64,
}

impl CloseCounts {
    pub fn add(&mut self, by: CloseBy, rst: Option<Rst>) {
        if let Some(i) = CloseBy::ALL.iter().position(|&b| b == by) {
            self.by[i] += 1;
        }
        if let Some(r) = rst {
            self.rst_known += 1;
            self.rst_sent += u64::from(r.sent);
            self.rst_received += u64::from(r.received);
        }
    }

    fn merge(&mut self, o: &CloseCounts) {
        for (a, b) in self.by.iter_mut().zip(o.by) {
            *a += b;
        }
        self.rst_sent += o.rst_sent;
        self.rst_received += o.rst_received;
        self.rst_known += o.rst_known;
    }

    pub fn total(&self) -> u64 {
        self.by.iter().sum()
    }

    /// Classes with at least one connection, in `CloseBy::ALL` order.
    pub fn nonzero(&self) -> impl Iterator<Item = (CloseBy, u64)> + '_ {
        CloseBy::ALL
            .into_iter()
            .zip(self.by)
            .filter(|&(_, n)| n > 0)
    }
}

/// Every state's distribution, for one group.
#[derive(Clone)]
pub struct GroupStats {
    states: [Option<StateStats>; STATES],
    stays: u64,
    pub closes: CloseCounts,
}

impl Default for GroupStats {
    fn default() -> Self {
        GroupStats {
            states: std::array::from_fn(|_| None),
            stays: 0,
            closes: CloseCounts::default(),
        }
    }
}

impl GroupStats {
    fn record(&mut self, state: TcpState, ns: u64) {
        self.stays += 1;
        self.states[state.index()]
            .get_or_insert_with(StateStats::new)
            .record(ns);
    }

    fn merge(&mut self, other: &GroupStats) {
        self.stays += other.stays;
        self.closes.merge(&other.closes);
        for (mine, theirs) in self.states.iter_mut().zip(&other.states) {
            if let Some(theirs) = theirs {
                mine.get_or_insert_with(StateStats::new).merge(theirs);
            }
        }
    }

    /// Empties it, keeping the allocations.
    fn reset(&mut self) {
        self.stays = 0;
        self.closes = CloseCounts::default();
        for s in self.states.iter_mut().flatten() {
            s.reset();
        }
    }

    /// Stays recorded.
    pub fn stays(&self) -> u64 {
        self.stays
    }

    /// States with at least one stay, in life order.
    pub fn states(&self) -> impl Iterator<Item = (TcpState, &StateStats)> {
        TcpState::LIFE_ORDER.into_iter().filter_map(|s| {
            self.states[s.index()]
                .as_ref()
                .filter(|st| st.count > 0)
                .map(|st| (s, st))
        })
    }

    pub fn state(&self, s: TcpState) -> Option<&StateStats> {
        self.states[s.index()].as_ref().filter(|st| st.count > 0)
    }
}

/// Groups followed with the Space-Saving rule: at most `cap` keys; a new key
/// when full takes the place of the key with the smallest weight, whose
/// stays are folded into `other`, and inherits its weight. Any key with
/// more than 1/`cap` of all stays is followed at the end, whatever the
/// order of arrival; a group's stats are exact from the time it was
/// (last) taken in.
struct Groups {
    slots: Vec<Followed>,
    index: HashMap<GroupKey, usize>,
    cap: usize,
    other: GroupStats,
}

struct Followed {
    key: GroupKey,
    weight: u64,
    stats: GroupStats,
}

impl Groups {
    fn new(cap: usize) -> Self {
        Groups {
            slots: Vec::with_capacity(cap),
            index: HashMap::with_capacity(cap + 1),
            cap,
            other: GroupStats::default(),
        }
    }

    fn record(&mut self, key: GroupKey, state: TcpState, ns: u64) {
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None if self.slots.len() < self.cap => {
                self.slots.push(Followed {
                    key,
                    weight: 0,
                    stats: GroupStats::default(),
                });
                self.index.insert(key, self.slots.len() - 1);
                self.slots.len() - 1
            }
            None => {
                let i = (0..self.slots.len())
                    .min_by_key(|&i| self.slots[i].weight)
                    .expect("cap is at least 1");
                let slot = &mut self.slots[i];
                self.other.merge(&slot.stats);
                slot.stats.reset();
                self.index.remove(&slot.key);
                slot.key = key;
                self.index.insert(key, i);
                i
            }
        };
        let slot = &mut self.slots[i];
        slot.weight += 1;
        slot.stats.record(state, ns);
    }

    /// The stats of `key` if followed, else "other" (closes do not take
    /// a place among the groups: stays decide which are followed).
    fn stats_mut(&mut self, key: &GroupKey) -> &mut GroupStats {
        match self.index.get(key) {
            Some(&i) => &mut self.slots[i].stats,
            None => &mut self.other,
        }
    }
}

/// One group of a report.
pub struct ReportGroup<'a> {
    /// `None`: no --group-by. `Some((by, None))`: every other value.
    pub group: Option<(GroupBy, Option<GroupKey>)>,
    pub stats: Cow<'a, GroupStats>,
}

pub struct Summary {
    by: Option<GroupBy>,
    top: usize,
    all: GroupStats,
    groups: Groups,
}

impl std::fmt::Debug for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Summary")
            .field("by", &self.by)
            .field("top", &self.top)
            .field("stays", &self.stays())
            .finish_non_exhaustive()
    }
}

impl Summary {
    pub fn new(by: Option<GroupBy>, top: usize) -> Self {
        let top = top.max(1);
        let cap = if by.is_some() {
            (top * FOLLOWED_PER_SHOWN).max(MIN_FOLLOWED)
        } else {
            0
        };
        Summary {
            by,
            top,
            all: GroupStats::default(),
            groups: Groups::new(cap),
        }
    }

    pub fn from_args(a: &SummaryArgs) -> Option<Self> {
        a.summary.then(|| Summary::new(a.group_by, a.top as usize))
    }

    pub fn group_by(&self) -> Option<GroupBy> {
        self.by
    }

    /// Records the stay transition `t` ended, if timed; `owner` is its
    /// socket's, as the output names it.
    pub fn transition(&mut self, t: &Transition, owner: Option<&Owner>) {
        if let Some((state, ns)) = stay(t) {
            self.record(state, ns, |by| by.key(t, owner));
        }
    }

    /// Records one stay; `key` is only called with --group-by.
    pub fn record(&mut self, state: TcpState, ns: u64, key: impl FnOnce(GroupBy) -> GroupKey) {
        match self.by {
            None => self.all.record(state, ns),
            Some(by) => self.groups.record(key(by), state, ns),
        }
    }

    /// A connection's close; `key` is only called with --group-by.
    pub fn close(&mut self, by: CloseBy, rst: Option<Rst>, key: impl FnOnce(GroupBy) -> GroupKey) {
        match self.by {
            None => self.all.closes.add(by, rst),
            Some(g) => self.groups.stats_mut(&key(g)).closes.add(by, rst),
        }
    }

    /// Stays recorded in all.
    pub fn stays(&self) -> u64 {
        match self.by {
            None => self.all.stays,
            Some(_) => {
                self.groups.other.stays
                    + self.groups.slots.iter().map(|s| s.stats.stays).sum::<u64>()
            }
        }
    }

    /// The groups to show: without --group-by one; otherwise the `top`
    /// largest by stays (ties: first taken in first), then "other" if it
    /// has any.
    pub fn report(&self) -> Vec<ReportGroup<'_>> {
        let Some(by) = self.by else {
            return vec![ReportGroup {
                group: None,
                stats: Cow::Borrowed(&self.all),
            }];
        };
        let mut order: Vec<&Followed> = self
            .groups
            .slots
            .iter()
            .filter(|s| s.stats.stays > 0 || s.stats.closes.total() > 0)
            .collect();
        order.sort_by_key(|s| std::cmp::Reverse(s.stats.stays));
        let shown = order.len().min(self.top);
        let mut out: Vec<ReportGroup<'_>> = order[..shown]
            .iter()
            .map(|s| ReportGroup {
                group: Some((by, Some(s.key))),
                stats: Cow::Borrowed(&s.stats),
            })
            .collect();
        let mut other = self.groups.other.clone();
        for s in &order[shown..] {
            other.merge(&s.stats);
        }
        if other.stays > 0 || other.closes.total() > 0 {
            out.push(ReportGroup {
                group: Some((by, None)),
                stats: Cow::Owned(other),
            });
        }
        out
    }

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
fn bound(ns: u64) -> String {
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

#[cfg(test)]
mod tests {
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
    const NOBODY: Option<&Owner> = None;

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
            text.contains(
                "ESTABLISHED           3    50.0ms     200ms     1.00s     1.00s     1.00s"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "32.8ms -> 65.5ms   : 1        |****************************************|"
            ),
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
            Some(&Owner {
                pid: 1,
                comm: comm("nginx"),
                uid: 0,
                ..Default::default()
            }),
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
}
