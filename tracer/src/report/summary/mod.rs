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

use std::{borrow::Cow, collections::HashMap};

use hdrhistogram::Histogram;

use crate::{
    kernel::events::{TcpState, Transition},
    report::format::Format,
    report::group::{GroupBy, GroupKey, NamedOwner},
    track::close::{CloseBy, Rst},
};

/// HdrHistogram precision: values are kept to within 1/128 of themselves.
pub const SIGNIFICANT_DIGITS: u8 = 2;
/// Largest duration the percentile histogram resolves (about 104 days);
/// longer stays count there (max stays exact).
const HIST_MAX_NS: u64 = 1 << 53;
/// Log2 histogram: bucket 0 is below 1 µs, bucket b ≥ 1 is
/// [2^(b-1), 2^b) µs; the last one takes everything longer.
const LOG2_BUCKETS: usize = 48;
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
    states: [Option<StateStats>; TcpState::COUNT],
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

    /// `--top`: groups shown (and destinations of the port summary).
    pub fn top(&self) -> usize {
        self.top
    }

    /// Records the stay transition `t` ended, if timed; `owner` is its
    /// socket's, as the output names it.
    pub fn transition(&mut self, t: &Transition, owner: Option<&NamedOwner>) {
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
}

mod render;
#[cfg(test)]
mod tests;

pub use render::duration;
