//! The numbers `tracer top` shows: what the agent sends once a second
//! ([`Snapshot`]), and what the view makes of two of them ([`Model`]):
//! rates, the CLOSE_WAIT holders sorted and filtered. Pure: no terminal,
//! no clock.

use std::net::IpAddr;

use crate::{kernel::events::TcpState, track::close::CloseBy};

/// Per-class arrays, indexed by the position in [`CloseBy::ALL`].
pub const CLASSES: usize = CloseBy::ALL.len();

/// Counts that only grow, kept by the observers on the per-event path
/// (plain additions, see `report/observe.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Transitions into each state.
    pub transitions: [u64; TcpState::COUNT],
    /// Connections ended, by close class.
    pub closes: [u64; CLASSES],
    /// Resets sent and received by the connections that ended.
    pub resets_sent: u64,
    pub resets_received: u64,
}

impl Totals {
    pub fn transition(&mut self, new: TcpState) {
        self.transitions[new.index()] += 1;
    }

    pub fn closed(&mut self, by: CloseBy, sent: u32, received: u32) {
        if let Some(i) = CloseBy::ALL.iter().position(|&c| c == by) {
            self.closes[i] += 1;
        }
        self.resets_sent += u64::from(sent);
        self.resets_received += u64::from(received);
    }
}

/// A connection in CLOSE_WAIT and who holds its socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseWaitRow {
    pub sock: u64,
    /// Time in CLOSE_WAIT so far.
    pub age_ns: u64,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    /// The holder (from the /proc fd scan), else the socket's owner as the
    /// tracker knows it; `None` when neither is known.
    pub pid: Option<u32>,
    pub comm: String,
    /// The holder's fd: `None` until the scan has found it.
    pub fd: Option<u32>,
    /// More processes holding the same socket.
    pub more_holders: usize,
    /// The owner's container, else its cgroup path, else `-`.
    pub container: String,
}

/// Where connections wait in TIME_WAIT to, and how many.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeWaitRow {
    pub raddr: IpAddr,
    pub rport: u16,
    pub count: u64,
}

/// What the status line says: the stats record's loss counters, live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub events: u64,
    /// Ring buffer full.
    pub lost: u64,
    /// Kernel program runs skipped.
    pub skipped: u64,
    pub untracked: u64,
    pub unreadable: u64,
    pub tracked: u64,
}

/// The agent's state at one instant, sent to the view once a second.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// CLOCK_MONOTONIC ns when taken.
    pub at_ns: u64,
    /// Connections in each state now (listeners left out).
    pub by_state: [u64; TcpState::COUNT],
    pub totals: Totals,
    /// Oldest first, at most [`MAX_CLOSE_WAIT_ROWS`].
    pub close_wait: Vec<CloseWaitRow>,
    /// Largest first, at most [`MAX_TIME_WAIT_ROWS`].
    pub time_wait: Vec<TimeWaitRow>,
    pub status: Status,
}

/// Rows a snapshot carries at most: a screen shows fewer, and a leak of
/// a million sockets must not cost a million rows a second.
pub const MAX_CLOSE_WAIT_ROWS: usize = 1000;
pub const MAX_TIME_WAIT_ROWS: usize = 200;

/// How the CLOSE_WAIT holders are ordered (`s` cycles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sort {
    /// Oldest first.
    #[default]
    Age,
    Pid,
    Comm,
    Port,
}

impl Sort {
    pub fn next(self) -> Sort {
        match self {
            Sort::Age => Sort::Pid,
            Sort::Pid => Sort::Comm,
            Sort::Comm => Sort::Port,
            Sort::Port => Sort::Age,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Sort::Age => "age",
            Sort::Pid => "pid",
            Sort::Comm => "comm",
            Sort::Port => "port",
        }
    }
}

/// `/`: a port number matches either end's port; anything else matches
/// the comm (substring).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    Port(u16),
    Comm(String),
}

impl Filter {
    /// `None` for an empty text (no filter).
    pub fn parse(text: &str) -> Option<Filter> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        Some(match text.parse::<u16>() {
            Ok(p) => Filter::Port(p),
            Err(_) => Filter::Comm(text.to_string()),
        })
    }

    fn close_wait(&self, r: &CloseWaitRow) -> bool {
        match self {
            Filter::Port(p) => r.lport == *p || r.rport == *p,
            Filter::Comm(c) => r.comm.contains(c.as_str()),
        }
    }

    fn time_wait(&self, r: &TimeWaitRow) -> bool {
        match self {
            Filter::Port(p) => r.rport == *p,
            // TIME_WAIT sockets have no process.
            Filter::Comm(_) => true,
        }
    }

    pub fn text(&self) -> String {
        match self {
            Filter::Port(p) => p.to_string(),
            Filter::Comm(c) => c.clone(),
        }
    }
}

/// One state's line: how many now, transitions into it per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateLine {
    pub state: TcpState,
    pub now: u64,
    pub per_sec: f64,
}

/// What the view draws, from the latest snapshot and the one before.
#[derive(Debug, Default)]
pub struct Model {
    last: Option<Snapshot>,
    before: Option<Snapshot>,
    pub sort: Sort,
    pub filter: Option<Filter>,
    pub paused: bool,
}

impl Model {
    /// A new snapshot; kept aside while paused (the screen stays still).
    pub fn update(&mut self, s: Snapshot) {
        if self.paused {
            return;
        }
        self.before = self.last.take();
        self.last = Some(s);
    }

    pub fn has_data(&self) -> bool {
        self.last.is_some()
    }

    /// Seconds between the two snapshots rates are taken over.
    fn interval_s(&self) -> Option<f64> {
        let (a, b) = (self.before.as_ref()?, self.last.as_ref()?);
        let ns = b.at_ns.checked_sub(a.at_ns).filter(|&ns| ns > 0)?;
        Some(ns as f64 / 1e9)
    }

    fn rate(&self, f: impl Fn(&Snapshot) -> u64) -> f64 {
        match (self.before.as_ref(), self.last.as_ref(), self.interval_s()) {
            (Some(a), Some(b), Some(s)) => f(b).saturating_sub(f(a)) as f64 / s,
            _ => 0.0,
        }
    }

    pub fn states(&self) -> Vec<StateLine> {
        let Some(last) = &self.last else {
            return Vec::new();
        };
        TcpState::of_connections()
            .map(|state| StateLine {
                state,
                // CLOSE is where connections end, not where they stay.
                now: if state == TcpState::Close {
                    0
                } else {
                    last.by_state[state.index()]
                },
                per_sec: self.rate(|s| s.totals.transitions[state.index()]),
            })
            .collect()
    }

    /// Closes per second by class (every class, in [`CloseBy::ALL`]
    /// order), then resets sent and received per second.
    pub fn closes(&self) -> (Vec<(CloseBy, f64)>, f64, f64) {
        let classes = CloseBy::ALL
            .iter()
            .enumerate()
            .map(|(i, &by)| (by, self.rate(|s| s.totals.closes[i])))
            .collect();
        (
            classes,
            self.rate(|s| s.totals.resets_sent),
            self.rate(|s| s.totals.resets_received),
        )
    }

    /// The CLOSE_WAIT holders that pass the filter, in the chosen order.
    pub fn close_wait(&self) -> Vec<&CloseWaitRow> {
        let Some(last) = &self.last else {
            return Vec::new();
        };
        let mut rows: Vec<&CloseWaitRow> = last
            .close_wait
            .iter()
            .filter(|r| self.filter.as_ref().is_none_or(|f| f.close_wait(r)))
            .collect();
        match self.sort {
            Sort::Age => rows.sort_by_key(|r| std::cmp::Reverse(r.age_ns)),
            Sort::Pid => rows.sort_by(|a, b| a.pid.cmp(&b.pid).then(b.age_ns.cmp(&a.age_ns))),
            Sort::Comm => rows.sort_by(|a, b| a.comm.cmp(&b.comm).then(b.age_ns.cmp(&a.age_ns))),
            Sort::Port => rows.sort_by(|a, b| a.lport.cmp(&b.lport).then(b.age_ns.cmp(&a.age_ns))),
        }
        rows
    }

    /// TIME_WAIT by destination, largest first.
    pub fn time_wait(&self) -> Vec<&TimeWaitRow> {
        let Some(last) = &self.last else {
            return Vec::new();
        };
        let mut rows: Vec<&TimeWaitRow> = last
            .time_wait
            .iter()
            .filter(|r| self.filter.as_ref().is_none_or(|f| f.time_wait(r)))
            .collect();
        rows.sort_by(|a, b| b.count.cmp(&a.count).then(a.rport.cmp(&b.rport)));
        rows
    }

    pub fn status(&self) -> Status {
        self.last.as_ref().map(|s| s.status).unwrap_or_default()
    }
}

/// `age_ns` as people read it: `42s`, `3m07s`, `2h05m`.
pub fn age(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn row(sock: u64, age_s: u64, pid: u32, comm: &str, lport: u16) -> CloseWaitRow {
        CloseWaitRow {
            sock,
            age_ns: age_s * S,
            laddr: "127.0.0.1".parse().unwrap(),
            lport,
            raddr: "127.0.0.1".parse().unwrap(),
            rport: 40000,
            pid: Some(pid),
            comm: comm.into(),
            fd: Some(3),
            more_holders: 0,
            container: "-".into(),
        }
    }

    fn snapshot(at_s: u64, established: u64, into_est: u64, local: u64) -> Snapshot {
        let mut s = Snapshot {
            at_ns: at_s * S,
            ..Default::default()
        };
        s.by_state[TcpState::Established.index()] = established;
        s.totals.transitions[TcpState::Established.index()] = into_est;
        s.totals.closes[0] = local;
        s
    }

    #[test]
    fn rates_are_over_the_time_between_two_snapshots() {
        let mut m = Model::default();
        m.update(snapshot(10, 5, 100, 7));
        let est = |m: &Model| {
            *m.states()
                .iter()
                .find(|l| l.state == TcpState::Established)
                .unwrap()
        };
        // One snapshot: counts, no rate yet.
        assert_eq!(est(&m).now, 5);
        assert_eq!(est(&m).per_sec, 0.0);
        m.update(snapshot(12, 8, 130, 11));
        assert_eq!(est(&m).now, 8);
        assert_eq!(est(&m).per_sec, 15.0);
        let (classes, _, _) = m.closes();
        assert_eq!(classes[0], (CloseBy::Local, 2.0));
    }

    #[test]
    fn paused_keeps_the_screen_still() {
        let mut m = Model::default();
        m.update(snapshot(1, 5, 0, 0));
        m.paused = true;
        m.update(snapshot(2, 9, 0, 0));
        assert_eq!(m.states()[2].now, 5);
        m.paused = false;
        m.update(snapshot(3, 9, 0, 0));
        assert_eq!(m.states()[2].now, 9);
    }

    #[test]
    fn holders_sort_and_filter() {
        let mut m = Model::default();
        let mut s = snapshot(1, 0, 0, 0);
        s.close_wait = vec![
            row(1, 5, 30, "nginx", 80),
            row(2, 50, 20, "java", 8080),
            row(3, 20, 10, "app", 443),
        ];
        s.time_wait = vec![
            TimeWaitRow {
                raddr: "10.0.0.1".parse().unwrap(),
                rport: 5432,
                count: 3,
            },
            TimeWaitRow {
                raddr: "10.0.0.2".parse().unwrap(),
                rport: 80,
                count: 9,
            },
        ];
        m.update(s);
        let socks = |m: &Model| m.close_wait().iter().map(|r| r.sock).collect::<Vec<_>>();
        assert_eq!(socks(&m), [2, 3, 1], "oldest first");
        m.sort = m.sort.next();
        assert_eq!((m.sort, socks(&m)), (Sort::Pid, vec![3, 2, 1]));
        m.sort = m.sort.next();
        assert_eq!((m.sort, socks(&m)), (Sort::Comm, vec![3, 2, 1]));
        m.sort = m.sort.next();
        assert_eq!((m.sort, socks(&m)), (Sort::Port, vec![1, 3, 2]));
        assert_eq!(m.sort.next(), Sort::Age);
        assert_eq!(m.time_wait()[0].count, 9, "largest first");

        m.filter = Filter::parse("8080");
        assert_eq!(socks(&m), [2]);
        m.filter = Filter::parse("ngi");
        assert_eq!(socks(&m), [1]);
        assert_eq!(m.time_wait().len(), 2, "comm filters no TIME_WAIT");
        m.filter = Filter::parse("5432");
        assert_eq!(m.time_wait().len(), 1);
        assert_eq!(Filter::parse("  "), None);
    }

    #[test]
    fn totals_count_transitions_closes_and_resets() {
        let mut t = Totals::default();
        t.transition(TcpState::CloseWait);
        t.closed(CloseBy::Abort, 1, 0);
        t.closed(CloseBy::ResetReceived, 0, 2);
        t.closed(CloseBy::Unfinished, 0, 0);
        assert_eq!(t.transitions[TcpState::CloseWait.index()], 1);
        assert_eq!(t.closes.iter().sum::<u64>(), 2, "unfinished is no close");
        assert_eq!((t.resets_sent, t.resets_received), (1, 2));
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(age(42 * S), "42s");
        assert_eq!(age(187 * S), "3m07s");
        assert_eq!(age(7500 * S), "2h05m");
    }
}
