//! Per-connection accounting: for each socket, the time spent in every state
//! it passed through, from the stream of transitions.
//!
//! Rules (also in the README):
//! - A connection is keyed by the socket's kernel address and ends at its
//!   transition to CLOSE, which yields a [`Connection`] record.
//! - Its opening is seen (`complete`) when its first transition is the
//!   socket's birth: `CLOSE -> SYN_SENT` (connect), `CLOSE -> LISTEN`, or
//!   `LISTEN -> SYN_RECV` (a new child socket of a listener).
//! - `start` is when it entered the first state the tracer can time: the
//!   first transition, or earlier by the kernel's `old_state_ns` when the
//!   kernel timed that state (it may have, e.g. when the in-kernel filter
//!   dropped the earlier transition). `duration_ns` = CLOSE time − `start`,
//!   and the per-state times always add up to it.
//! - If a transition's old state is not the state the tracker last saw (a
//!   transition was filtered or lost), the kernel's `old_state_ns` is
//!   credited to the old state and the rest of the gap to the last state
//!   seen; `gaps` counts such connections.
//! - Owner: the pid/comm of the first transition, replaced by those of the
//!   first transition that only runs in the owner's own system calls
//!   (connect, listen, close/shutdown), since softirq transitions run on
//!   whatever task is current.

use std::{
    collections::{hash_map::Entry, HashMap},
    net::IpAddr,
};

use crate::events::{Comm, Family, TcpState, Transition};

const STATES: usize = 13;

#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    pub sock: u64,
    pub pid: u32,
    pub comm: Comm,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    /// CLOCK_MONOTONIC ns when the tracer first saw a transition of it.
    pub first_seen_ns: u64,
    /// CLOCK_MONOTONIC ns of the start of the first timed state.
    pub start_ns: u64,
    /// Current state and since when.
    pub state: TcpState,
    pub state_since_ns: u64,
    /// Nanoseconds per state index ([`TcpState::index`]).
    states_ns: [u64; STATES],
    /// Bit per state index: passed through it.
    visited: u16,
    pub complete: bool,
    owner_confirmed: bool,
    /// A transition was missing between two that were seen.
    pub gap: bool,
    /// A listening socket (it entered LISTEN), not a connection.
    pub listener: bool,
}

impl Connection {
    fn new(t: &Transition) -> Self {
        let start_ns = t.mono_ns - t.old_state_ns.unwrap_or(0).min(t.mono_ns);
        let complete = matches!(
            (t.old, t.new),
            (TcpState::Close, TcpState::SynSent)
                | (TcpState::Close, TcpState::Listen)
                | (TcpState::Listen, TcpState::SynRecv)
        );
        let mut c = Connection {
            sock: t.sock,
            pid: t.pid,
            comm: t.comm,
            family: t.family,
            laddr: t.laddr,
            lport: t.lport,
            raddr: t.raddr,
            rport: t.rport,
            first_seen_ns: t.mono_ns,
            start_ns,
            state: t.new,
            state_since_ns: t.mono_ns,
            states_ns: [0; STATES],
            visited: 0,
            complete,
            owner_confirmed: runs_in_owner_syscall(t.old, t.new),
            gap: false,
            listener: t.new == TcpState::Listen,
        };
        // Only a state the kernel timed counts: a child's LISTEN belongs to
        // its listener, and the CLOSE before connect/listen is no part of
        // the connection's life.
        if let Some(ns) = t.old_state_ns {
            c.credit(t.old, ns.min(t.mono_ns));
        }
        c
    }

    fn apply(&mut self, t: &Transition) {
        let now = t.mono_ns.max(self.state_since_ns);
        if t.old == self.state {
            self.credit(self.state, now - self.state_since_ns);
        } else {
            // Missed at least one transition: the kernel's timing of the old
            // state is exact; the rest of the gap goes to the last known state.
            self.gap = true;
            let old_ns = t.old_state_ns.unwrap_or(0).min(now - self.state_since_ns);
            self.credit(self.state, now - self.state_since_ns - old_ns);
            if t.old_state_ns.is_some() {
                self.credit(t.old, old_ns);
            }
        }
        self.state = t.new;
        self.state_since_ns = now;
        self.update_endpoints(t);
        if !self.owner_confirmed && runs_in_owner_syscall(t.old, t.new) {
            self.pid = t.pid;
            self.comm = t.comm;
            self.owner_confirmed = true;
        }
    }

    fn credit(&mut self, state: TcpState, ns: u64) {
        self.states_ns[state.index()] += ns;
        self.visited |= 1 << state.index();
    }

    /// Ports and addresses can be zero early (the local port of a connecting
    /// socket is bound after `CLOSE -> SYN_SENT`); keep the latest non-zero.
    fn update_endpoints(&mut self, t: &Transition) {
        if t.lport != 0 {
            self.lport = t.lport;
        }
        if t.rport != 0 {
            self.rport = t.rport;
        }
        if !t.laddr.is_unspecified() {
            self.laddr = t.laddr;
        }
        if !t.raddr.is_unspecified() {
            self.raddr = t.raddr;
        }
    }

    /// Time in each state the connection passed through, in life order.
    pub fn states(&self) -> impl Iterator<Item = (TcpState, u64)> + '_ {
        TcpState::LIFE_ORDER
            .into_iter()
            .filter(|s| self.visited & (1 << s.index()) != 0)
            .map(|s| (s, self.states_ns[s.index()]))
    }

    pub fn state_ns(&self, state: TcpState) -> Option<u64> {
        (self.visited & (1 << state.index()) != 0).then(|| self.states_ns[state.index()])
    }

    /// From `start_ns` to the last transition (the CLOSE for ended ones).
    pub fn duration_ns(&self) -> u64 {
        self.state_since_ns - self.start_ns
    }
}

/// Transitions the kernel only makes inside the socket owner's own system
/// calls, so the current task is the owner.
fn runs_in_owner_syscall(old: TcpState, new: TcpState) -> bool {
    use TcpState::*;
    matches!(
        (old, new),
        (Close, SynSent) | (Close, Listen) | (Established, FinWait1) | (CloseWait, LastAck)
    )
}

/// What one transition did to the tracker.
#[derive(Debug, PartialEq)]
pub enum Update {
    /// The connection goes on (or was just started).
    Tracked,
    /// It reached CLOSE: its final record.
    Closed(Connection),
    /// The tracker is full; this socket is not tracked (counted).
    Untracked,
}

pub struct Tracker {
    conns: HashMap<u64, Connection>,
    capacity: usize,
    /// Transitions of sockets the tracker had no room for.
    pub untracked: u64,
    /// Connections with at least one missing transition, at their close.
    pub gaps: u64,
}

impl Tracker {
    pub fn new(capacity: usize) -> Self {
        Tracker {
            conns: HashMap::new(),
            capacity,
            untracked: 0,
            gaps: 0,
        }
    }

    pub fn on_transition(&mut self, t: &Transition) -> Update {
        let len = self.conns.len();
        match self.conns.entry(t.sock) {
            Entry::Vacant(e) => {
                if len >= self.capacity {
                    self.untracked += 1;
                    return Update::Untracked;
                }
                e.insert(Connection::new(t));
            }
            Entry::Occupied(e) => e.into_mut().apply(t),
        }
        if t.new == TcpState::Close {
            if let Some(conn) = self.conns.remove(&t.sock) {
                if conn.gap {
                    self.gaps += 1;
                }
                return Update::Closed(conn);
            }
        }
        Update::Tracked
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn get(&self, sock: u64) -> Option<&Connection> {
        self.conns.get(&sock)
    }

    /// Every socket followed now (listeners included), in no order.
    pub fn iter(&self) -> impl Iterator<Item = &Connection> {
        self.conns.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::tests::{comm, sample};
    use TcpState::*;

    /// A transition of socket 1 at `ms` milliseconds.
    fn tr(ms: u64, old: TcpState, new: TcpState, known: Option<u64>) -> Transition {
        Transition {
            mono_ns: ms * 1_000_000,
            sock: 1,
            old,
            new,
            old_state_ns: known.map(|m| m * 1_000_000),
            ..sample()
        }
    }

    /// Feeds `steps` as one socket's life and returns its record.
    fn life(steps: &[Transition]) -> Connection {
        let mut tr = Tracker::new(16);
        let (last, init) = steps.split_last().unwrap();
        for t in init {
            assert_eq!(tr.on_transition(t), Update::Tracked);
        }
        match tr.on_transition(last) {
            Update::Closed(c) => {
                assert!(tr.is_empty());
                c
            }
            other => panic!("expected a closed connection, got {other:?}"),
        }
    }

    fn ms(c: &Connection, s: TcpState) -> Option<u64> {
        c.state_ns(s).map(|n| n / 1_000_000)
    }

    fn assert_sums(c: &Connection) {
        assert_eq!(c.states().map(|(_, n)| n).sum::<u64>(), c.duration_ns());
    }

    #[test]
    fn active_close() {
        let c = life(&[
            tr(100, Close, SynSent, None),
            tr(101, SynSent, Established, Some(1)),
            tr(301, Established, FinWait1, Some(200)),
            tr(302, FinWait1, FinWait2, Some(1)),
            tr(305, FinWait2, Close, Some(3)),
        ]);
        assert!(c.complete && !c.gap);
        assert_eq!(c.start_ns, 100_000_000);
        assert_eq!(c.duration_ns(), 205_000_000);
        assert_eq!(ms(&c, SynSent), Some(1));
        assert_eq!(ms(&c, Established), Some(200));
        assert_eq!(ms(&c, FinWait1), Some(1));
        assert_eq!(ms(&c, FinWait2), Some(3));
        assert_eq!(ms(&c, Close), None);
        assert_eq!(c.states().count(), 4);
        assert_sums(&c);
    }

    #[test]
    fn passive_close_of_accepted_child() {
        let c = life(&[
            tr(10, Listen, SynRecv, None),
            tr(11, SynRecv, Established, Some(1)),
            tr(50, Established, CloseWait, Some(39)),
            tr(70, CloseWait, LastAck, Some(20)),
            tr(71, LastAck, Close, Some(1)),
        ]);
        assert!(c.complete);
        assert_eq!(
            ms(&c, Listen),
            None,
            "the listener's LISTEN is not the child's"
        );
        assert_eq!(ms(&c, CloseWait), Some(20));
        assert_eq!(ms(&c, LastAck), Some(1));
        assert_eq!(c.duration_ns(), 61_000_000);
        assert_sums(&c);
    }

    #[test]
    fn reset_while_established() {
        let c = life(&[
            tr(0, Close, SynSent, None),
            tr(2, SynSent, Established, Some(2)),
            tr(9, Established, Close, Some(7)),
        ]);
        assert_eq!(ms(&c, Established), Some(7));
        assert_eq!(c.duration_ns(), 9_000_000);
        assert_sums(&c);
    }

    #[test]
    fn first_seen_mid_life_is_incomplete() {
        // Established before the tracer started: the kernel never timed it.
        let c = life(&[
            tr(500, Established, FinWait1, None),
            tr(501, FinWait1, FinWait2, Some(1)),
            tr(502, FinWait2, Close, Some(1)),
        ]);
        assert!(!c.complete);
        assert_eq!(c.first_seen_ns, 500_000_000);
        assert_eq!(c.start_ns, 500_000_000);
        assert_eq!(ms(&c, Established), None);
        assert_eq!(c.duration_ns(), 2_000_000);
        assert_sums(&c);
    }

    #[test]
    fn first_seen_with_kernel_timing_starts_earlier() {
        // The kernel timed ESTABLISHED (its entry was filtered in the kernel).
        let c = life(&[
            tr(500, Established, FinWait1, Some(300)),
            tr(510, FinWait1, Close, Some(10)),
        ]);
        assert_eq!(c.start_ns, 200_000_000);
        assert_eq!(ms(&c, Established), Some(300));
        assert_eq!(c.duration_ns(), 310_000_000);
        assert_sums(&c);
    }

    #[test]
    fn missing_transition_is_a_gap_and_still_sums() {
        let c = life(&[
            tr(0, Close, SynSent, None),
            tr(1, SynSent, Established, Some(1)),
            // ESTABLISHED -> FIN_WAIT1 at 100 was lost.
            tr(130, FinWait1, FinWait2, Some(30)),
            tr(131, FinWait2, Close, Some(1)),
        ]);
        assert!(c.gap);
        assert_eq!(ms(&c, Established), Some(99));
        assert_eq!(ms(&c, FinWait1), Some(30));
        assert_sums(&c);
    }

    #[test]
    fn owner_comes_from_the_owners_syscall() {
        let mut child_on_client_task = tr(10, Listen, SynRecv, None);
        child_on_client_task.pid = 7;
        child_on_client_task.comm = comm("client");
        let mut close_by_server = tr(20, Established, FinWait1, Some(9));
        close_by_server.pid = 8;
        close_by_server.comm = comm("server");
        let mut softirq = tr(21, FinWait1, Close, Some(1));
        softirq.pid = 0;
        let c = life(&[
            child_on_client_task,
            tr(11, SynRecv, Established, Some(1)),
            close_by_server,
            softirq,
        ]);
        assert_eq!(
            (c.pid, c.comm.as_str().into_owned()),
            (8, "server".to_string())
        );
    }

    #[test]
    fn endpoints_fill_in_when_bound() {
        let mut connect = tr(0, Close, SynSent, None);
        connect.lport = 0;
        connect.laddr = "0.0.0.0".parse().unwrap();
        let c = life(&[connect, tr(1, SynSent, Close, Some(1))]);
        assert_eq!(c.lport, 43210);
        assert_eq!(c.laddr, "127.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn socket_reused_after_close_starts_a_new_connection() {
        let mut tr_ = Tracker::new(4);
        tr_.on_transition(&tr(0, Close, SynSent, None));
        assert!(matches!(
            tr_.on_transition(&tr(5, SynSent, Close, Some(5))),
            Update::Closed(_)
        ));
        tr_.on_transition(&tr(10, Close, SynSent, None));
        assert_eq!(tr_.get(1).unwrap().start_ns, 10_000_000);
    }

    #[test]
    fn full_tracker_counts_untracked() {
        let mut t = Tracker::new(1);
        t.on_transition(&tr(0, Close, SynSent, None));
        let other = Transition {
            sock: 2,
            ..tr(1, Close, SynSent, None)
        };
        assert_eq!(t.on_transition(&other), Update::Untracked);
        assert_eq!(t.untracked, 1);
        assert_eq!(t.len(), 1);
    }
}
