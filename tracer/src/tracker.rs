//! Per-connection accounting: for each socket, the time spent in every state
//! it passed through, from the stream of transitions.
//!
//! Rules (also in the README):
//! - A connection is keyed by the socket's kernel address while the socket
//!   lives. It ends at its transition to CLOSE, which yields a
//!   [`Connection`] record, except after an active close (`FIN_WAIT1`,
//!   `FIN_WAIT2` or `CLOSING -> CLOSE`): the kernel then continues the
//!   connection in a timewait socket that no tracepoint sees, so the
//!   connection waits in the timewait table (keyed by netns and 4-tuple)
//!   until `timewait.rs` sees that socket end.
//! - Its opening is seen (`complete`) when its first transition is the
//!   socket's birth: `CLOSE -> SYN_SENT` (connect), `CLOSE -> LISTEN`, or
//!   `LISTEN -> SYN_RECV` (a new child socket of a listener).
//! - `start` is when it entered the first state the tracer can time: the
//!   first transition, earlier by the kernel's `old_state_ns` when the
//!   kernel timed that state, or the start-up snapshot for sockets that
//!   existed before the tracer. `duration_ns` = end − `start`, and the
//!   per-state times always add up to it.
//! - If a transition's old state is not the state the tracker last saw (a
//!   transition was filtered or lost), the kernel's `old_state_ns` is
//!   credited to the old state and the rest of the gap to the last state
//!   seen; `gaps` counts such connections.
//! - Owner (the process that created or accepted the socket): the task of
//!   the transitions that only run in the owner's own system calls (connect,
//!   listen, close/shutdown); for an accepted socket until then, the owner
//!   of its listener (same namespace and local port; unknown if listeners of
//!   different owners share the port); for a socket that existed before the
//!   tracer, the process holding its inode in /proc at start. Otherwise
//!   unknown (`None`), never the softirq's current task.

use std::{collections::hash_map::Entry, net::IpAddr};

use crate::{
    close::ClosePath,
    events::{Comm, Family, Source, TcpState, Transition},
    FastMap as HashMap,
};

const STATES: usize = 13;

/// The process that owns a socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
    pub uid: u32,
    /// Its cgroup v2 id (0: unknown), taken with the pid.
    pub cgroup: u64,
    /// Its container, as the agent resolved `cgroup` when it named the
    /// owner in a record (`containers.rs`); the tracker leaves it `None`.
    pub container: Option<crate::containers::ContainerKey>,
}

/// A connection's identity once its socket is gone: namespace and 4-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns: u32,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
}

/// How the timewait part of an actively closed connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimewaitEnd {
    /// The timewait socket lived until its timer.
    Expired,
    /// A new connection on the same 4-tuple took it over (`tcp_tw_reuse`,
    /// or a new SYN to a server in TIME_WAIT).
    Reused,
    /// It disappeared before its timer (e.g. killed by a RST).
    Early,
    /// None was created: `tcp_max_tw_buckets` was full.
    NotCreated,
    /// None was found, and the namespace reported no overflow: the
    /// connection ended without one (or it ended within one poll).
    NotFound,
    /// The kernel offers no sock_diag for TCP: nothing can be known.
    Unknown,
}

impl TimewaitEnd {
    pub fn name(self) -> &'static str {
        match self {
            TimewaitEnd::Expired => "expired",
            TimewaitEnd::Reused => "reused",
            TimewaitEnd::Early => "early",
            TimewaitEnd::NotCreated => "not_created",
            TimewaitEnd::NotFound => "not_found",
            TimewaitEnd::Unknown => "unknown",
        }
    }
}

/// What the tracer knows of a connection's timewait socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timewait {
    /// When the tracepoint reported the full socket's CLOSE.
    pub closed_ns: u64,
    /// A dump has shown the timewait socket.
    pub seen: bool,
    /// When its timer fires, as of the last dump (CLOCK_MONOTONIC ns).
    pub expires_ns: Option<u64>,
    pub end: Option<TimewaitEnd>,
    /// When the fentry program saw it die (kernels with fentry).
    pub killed_ns: Option<u64>,
    /// Polls that found it gone before its death event arrived.
    pub missing_polls: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    /// Kernel socket address; 0 for a socket known only from the start-up
    /// snapshot.
    pub sock: u64,
    pub owner: Option<Owner>,
    pub netns: u32,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    /// CLOCK_MONOTONIC ns when the tracer first saw it.
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
    /// A transition was missing between two that were seen.
    pub gap: bool,
    /// A listening socket (it entered LISTEN), not a connection.
    pub listener: bool,
    /// Known from the start-up snapshot (it existed before the tracer).
    pub from_snapshot: bool,
    /// Inode of its socket file, when learnt (snapshot or sock_diag).
    pub inode: u64,
    /// (pid, tid) of the last task seen in the owner's own system call: a
    /// task in the socket's namespace, used to reach that namespace.
    pub task_hint: Option<(u32, u32)>,
    /// Set once an alert about it being stuck in its state was printed.
    pub stuck_reported: bool,
    pub timewait: Option<Timewait>,
    /// Its close steps and resets (see `close.rs`).
    pub close: ClosePath,
}

impl Connection {
    fn new(t: &Transition, owner: Option<Owner>) -> Self {
        let start_ns = t.mono_ns - t.old_state_ns.unwrap_or(0).min(t.mono_ns);
        let complete = matches!(
            (t.old, t.new),
            (TcpState::Close, TcpState::SynSent)
                | (TcpState::Close, TcpState::Listen)
                | (TcpState::Listen, TcpState::SynRecv)
        );
        let mut c = Connection {
            sock: t.sock,
            owner,
            netns: t.netns,
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
            gap: false,
            listener: t.new == TcpState::Listen,
            from_snapshot: false,
            inode: 0,
            task_hint: None,
            stuck_reported: false,
            timewait: None,
            close: ClosePath::default(),
        };
        c.close.push(t.old, t.new, t.mono_ns);
        // Only a state the kernel timed counts: a child's LISTEN belongs to
        // its listener, and the CLOSE before connect/listen is no part of
        // the connection's life.
        if let Some(ns) = t.old_state_ns {
            c.credit(t.old, ns.min(t.mono_ns));
        }
        c.note_owner_syscall(t);
        c
    }

    /// A socket found by the start-up snapshot, in `state` at `now_ns`.
    pub fn from_snapshot(
        key: TupleKey,
        state: TcpState,
        now_ns: u64,
        inode: u64,
        owner: Option<Owner>,
    ) -> Self {
        Connection {
            sock: 0,
            owner,
            netns: key.netns,
            family: key.family,
            laddr: key.laddr,
            lport: key.lport,
            raddr: key.raddr,
            rport: key.rport,
            first_seen_ns: now_ns,
            start_ns: now_ns,
            state,
            state_since_ns: now_ns,
            states_ns: [0; STATES],
            visited: 0,
            complete: false,
            gap: false,
            listener: state == TcpState::Listen,
            from_snapshot: true,
            inode,
            task_hint: None,
            stuck_reported: false,
            timewait: None,
            close: ClosePath::default(),
        }
    }

    pub fn key(&self) -> TupleKey {
        TupleKey {
            netns: self.netns,
            family: self.family,
            laddr: self.laddr,
            lport: self.lport,
            raddr: self.raddr,
            rport: self.rport,
        }
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
        self.close.push(t.old, t.new, now);
        self.state = t.new;
        self.state_since_ns = now;
        self.update_endpoints(t);
        self.note_owner_syscall(t);
    }

    /// Moves the connection to `state` at `at_ns` (a transition the
    /// tracepoint cannot see), crediting the time in the current state.
    pub fn advance(&mut self, state: TcpState, at_ns: u64) {
        let at = at_ns.max(self.state_since_ns);
        self.credit(self.state, at - self.state_since_ns);
        self.close.push(self.state, state, at);
        self.state = state;
        self.state_since_ns = at;
    }

    fn note_owner_syscall(&mut self, t: &Transition) {
        if t.source == Source::Tracepoint && runs_in_owner_syscall(t.old, t.new) {
            self.owner = Some(Owner {
                pid: t.pid,
                comm: t.comm,
                uid: t.uid,
                cgroup: t.cgroup,
                container: None,
            });
            self.task_hint = Some((t.pid, t.tid));
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

    /// From `start_ns` to the last transition (the end, for ended ones).
    pub fn duration_ns(&self) -> u64 {
        self.state_since_ns - self.start_ns
    }

    /// A transition of this connection that the tracepoint could not report.
    pub fn derived(
        &self,
        old: TcpState,
        new: TcpState,
        at_ns: u64,
        old_state_ns: Option<u64>,
        source: Source,
    ) -> Transition {
        let owner = self.owner.unwrap_or_default();
        Transition {
            mono_ns: at_ns,
            sock: self.sock,
            pid: owner.pid,
            tid: 0,
            uid: owner.uid,
            comm: owner.comm,
            family: self.family,
            laddr: self.laddr,
            lport: self.lport,
            raddr: self.raddr,
            rport: self.rport,
            old,
            new,
            old_state_ns,
            netns: self.netns,
            // The task's, and a derived transition has none.
            cgroup: 0,
            source,
        }
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

/// Was this `-> CLOSE` an active close that leaves a timewait socket?
fn leaves_timewait(old: TcpState) -> bool {
    matches!(
        old,
        TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing
    )
}

/// What one transition did to the tracker.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// The socket's owner, as known after this transition.
    pub owner: Option<Owner>,
    /// Connections that ended: this one at CLOSE, or an older one whose
    /// timewait socket this connection reused.
    pub closed: Vec<Connection>,
    /// Transitions the tracepoint could not report (the reused timewait's).
    pub derived: Vec<Transition>,
    /// The tracker is full; this socket is not tracked (counted).
    pub untracked: bool,
}

impl Outcome {
    /// Owner for the derived transitions: those of the connection they
    /// ended.
    pub fn owner_of_derived(&self) -> Option<Owner> {
        self.closed.first().and_then(|c| c.owner)
    }
}

#[derive(Clone, Copy, Debug)]
struct Listener {
    sock: u64,
    laddr: IpAddr,
    owner: Option<Owner>,
}

pub struct Tracker {
    conns: HashMap<u64, Connection>,
    /// Actively closed connections whose timewait socket is not resolved.
    timewait: HashMap<TupleKey, Connection>,
    /// Sockets from the start-up snapshot not yet seen in a transition.
    snapshot: HashMap<TupleKey, Connection>,
    /// Listening sockets by (netns, local port), for accepted sockets' owner.
    listeners: HashMap<(u32, u16), Vec<Listener>>,
    capacity: usize,
    /// Transitions of sockets the tracker had no room for.
    pub untracked: u64,
    /// Connections with at least one missing transition, at their close.
    pub gaps: u64,
}

impl Tracker {
    pub fn new(capacity: usize) -> Self {
        Tracker {
            conns: HashMap::default(),
            timewait: HashMap::default(),
            snapshot: HashMap::default(),
            listeners: HashMap::default(),
            capacity,
            untracked: 0,
            gaps: 0,
        }
    }

    fn full(&self) -> bool {
        self.conns.len() + self.timewait.len() + self.snapshot.len() >= self.capacity
    }

    /// Registers a socket found by the start-up snapshot.
    pub fn add_snapshot(&mut self, conn: Connection) {
        if self.full() {
            self.untracked += 1;
            return;
        }
        if conn.listener {
            self.listeners
                .entry((conn.netns, conn.lport))
                .or_default()
                .push(Listener {
                    sock: 0,
                    laddr: conn.laddr,
                    owner: conn.owner,
                });
        } else {
            self.snapshot.insert(conn.key(), conn);
        }
    }

    fn listener_owner(&self, t: &Transition) -> Option<Owner> {
        let ls = self.listeners.get(&(t.netns, t.lport))?;
        let exact: Vec<&Listener> = ls.iter().filter(|l| l.laddr == t.laddr).collect();
        let candidates: Vec<&Listener> = if exact.is_empty() {
            ls.iter().filter(|l| l.laddr.is_unspecified()).collect()
        } else {
            exact
        };
        let first = candidates.first()?.owner?;
        // Listeners of different processes on one port (SO_REUSEPORT): the
        // owner of the child cannot be told from here.
        candidates
            .iter()
            .all(|l| l.owner.map(|o| o.pid) == Some(first.pid))
            .then_some(first)
    }

    fn key_of(t: &Transition) -> TupleKey {
        TupleKey {
            netns: t.netns,
            family: t.family,
            laddr: t.laddr,
            lport: t.lport,
            raddr: t.raddr,
            rport: t.rport,
        }
    }

    pub fn on_transition(&mut self, t: &Transition) -> Outcome {
        let mut out = Outcome::default();
        self.end_reused_timewait(t, &mut out);
        match self.conns.entry(t.sock) {
            Entry::Occupied(e) => e.into_mut().apply(t),
            Entry::Vacant(_) => {
                if self.conns.len() + self.timewait.len() + self.snapshot.len() >= self.capacity {
                    self.untracked += 1;
                    out.untracked = true;
                    return out;
                }
                let birth = matches!(
                    (t.old, t.new),
                    (TcpState::Close, _) | (TcpState::Listen, TcpState::SynRecv)
                );
                // A birth is a new socket even if the snapshot, taken while
                // events queued, already saw it.
                let known = if self.snapshot.is_empty() {
                    None
                } else {
                    self.snapshot.remove(&Self::key_of(t))
                };
                let conn = match known.filter(|_| !birth) {
                    Some(mut known) => {
                        // Existed before the tracer: time counts from the snapshot.
                        known.sock = t.sock;
                        known.apply(t);
                        known
                    }
                    None => {
                        let inherited = (t.old == TcpState::Listen && t.new == TcpState::SynRecv)
                            .then(|| self.listener_owner(t))
                            .flatten();
                        Connection::new(t, inherited)
                    }
                };
                self.conns.insert(t.sock, conn);
            }
        }
        match (t.old, t.new) {
            (_, TcpState::Listen) => {
                let owner = self.conns.get(&t.sock).and_then(|c| c.owner);
                self.listeners
                    .entry((t.netns, t.lport))
                    .or_default()
                    .push(Listener {
                        sock: t.sock,
                        laddr: t.laddr,
                        owner,
                    });
            }
            (TcpState::Listen, TcpState::Close) => {
                if let Some(ls) = self.listeners.get_mut(&(t.netns, t.lport)) {
                    ls.retain(|l| l.sock != t.sock);
                    if ls.is_empty() {
                        self.listeners.remove(&(t.netns, t.lport));
                    }
                }
            }
            _ => {}
        }
        if !self.snapshot.is_empty() && t.new == TcpState::Established {
            // A socket born after attach but before the snapshot was taken
            // is in both: the tracked one wins.
            self.snapshot.remove(&Self::key_of(t));
        }
        out.owner = self.conns.get(&t.sock).and_then(|c| c.owner);
        if t.new == TcpState::Close {
            if let Some(mut conn) = self.conns.remove(&t.sock) {
                if leaves_timewait(t.old) && !conn.listener {
                    // The connection goes on in a timewait socket: in
                    // TIME_WAIT at once after CLOSING, else in FIN_WAIT2.
                    conn.state = if t.old == TcpState::Closing {
                        TcpState::TimeWait
                    } else {
                        TcpState::FinWait2
                    };
                    // The hand-over is no step of the close; CLOSING's
                    // is its entry into TIME_WAIT.
                    conn.close.pop();
                    if t.old == TcpState::Closing {
                        conn.close
                            .push(TcpState::Closing, TcpState::TimeWait, t.mono_ns);
                    }
                    conn.timewait = Some(Timewait {
                        closed_ns: t.mono_ns,
                        ..Default::default()
                    });
                    self.timewait.insert(conn.key(), conn);
                } else {
                    if conn.gap {
                        self.gaps += 1;
                    }
                    out.closed.push(conn);
                }
            }
        }
        out
    }

    /// A new connection on the 4-tuple of a connection in timewait ends that
    /// timewait socket (the kernel kills it to let the new one through).
    fn end_reused_timewait(&mut self, t: &Transition, out: &mut Outcome) {
        let reuse_at = match (t.old, t.new) {
            // The server side: the SYN that arrives for a TIME_WAIT 4-tuple.
            (TcpState::Listen, TcpState::SynRecv) => t.mono_ns,
            // The client side: connect() chose the 4-tuple of a timewait
            // socket (tcp_tw_reuse); it did so when it entered SYN_SENT.
            (TcpState::SynSent, TcpState::Established) => {
                t.mono_ns - t.old_state_ns.unwrap_or(0).min(t.mono_ns)
            }
            _ => return,
        };
        if self.timewait.is_empty() {
            return;
        }
        if let Some(mut old) = self.timewait.remove(&Self::key_of(t)) {
            // With fentry, the exact moment the kernel killed it.
            let (at, source) = match old.timewait.and_then(|tw| tw.killed_ns) {
                Some(k) => (k, Source::Fentry),
                None => (reuse_at, Source::Reuse),
            };
            out.derived
                .extend(self.finish_timewait(&mut old, at, TimewaitEnd::Reused, source));
            out.closed.push(old);
        }
    }

    /// The fentry program saw the timewait socket of `key` die at `at_ns`.
    /// Past its scheduled expiry (less `tolerance_ns`) it expired, and ends
    /// now; otherwise it was killed early: the time is kept until the next
    /// transition (a reuse) or poll says which.
    pub fn timewait_died(&mut self, key: &TupleKey, at_ns: u64, tolerance_ns: u64) -> Outcome {
        let mut out = Outcome::default();
        let Some(conn) = self.timewait.get_mut(key) else {
            return out;
        };
        let in_time_wait = conn.state == TcpState::TimeWait;
        let Some(tw) = conn.timewait.as_mut() else {
            return out;
        };
        if in_time_wait && tw.expires_ns.is_some_and(|e| at_ns + tolerance_ns >= e) {
            if let Some((d, owner)) =
                self.end_timewait(key, at_ns, TimewaitEnd::Expired, Source::Fentry)
            {
                out.derived.push(d);
                out.owner = owner;
            }
            out.closed = self.take_timewait_ended();
        } else {
            tw.killed_ns = Some(at_ns);
        }
        out
    }

    /// Ends a connection's timewait part at `at_ns`: returns the derived
    /// `-> CLOSE` transition and leaves `conn` ready to be reported.
    pub fn finish_timewait(
        &mut self,
        conn: &mut Connection,
        at_ns: u64,
        end: TimewaitEnd,
        source: Source,
    ) -> Option<Transition> {
        let tw = conn.timewait.get_or_insert_with(Timewait::default);
        tw.end = Some(end);
        if conn.gap {
            self.gaps += 1;
        }
        match end {
            // No timewait socket: the connection ended at the tracepoint's CLOSE.
            TimewaitEnd::NotCreated | TimewaitEnd::NotFound | TimewaitEnd::Unknown => {
                conn.close.push(conn.state, TcpState::Close, tw.closed_ns);
                None
            }
            _ => {
                let old = conn.state;
                let in_state = at_ns.saturating_sub(conn.state_since_ns);
                conn.advance(TcpState::Close, at_ns);
                Some(conn.derived(old, TcpState::Close, at_ns, Some(in_state), source))
            }
        }
    }

    /// Ends the timewait part of the pending connection `key` (see
    /// [`Tracker::finish_timewait`]); it is taken by
    /// [`Tracker::take_timewait_ended`].
    pub fn end_timewait(
        &mut self,
        key: &TupleKey,
        at_ns: u64,
        end: TimewaitEnd,
        source: Source,
    ) -> Option<(Transition, Option<Owner>)> {
        let mut conn = self.timewait.remove(key)?;
        let derived = self.finish_timewait(&mut conn, at_ns, end, source);
        let owner = conn.owner;
        self.timewait.insert(*key, conn);
        derived.map(|d| (d, owner))
    }

    /// Connections waiting for their timewait socket to be resolved.
    pub fn timewait_mut(&mut self) -> impl Iterator<Item = &mut Connection> {
        self.timewait.values_mut()
    }

    pub fn timewait_pending(&self) -> usize {
        self.timewait.len()
    }

    pub fn has_timewait(&self) -> bool {
        !self.timewait.is_empty()
    }

    /// Takes the connections whose timewait part has ended.
    pub fn take_timewait_ended(&mut self) -> Vec<Connection> {
        let ended: Vec<TupleKey> = self
            .timewait
            .iter()
            .filter(|(_, c)| c.timewait.is_some_and(|tw| tw.end.is_some()))
            .map(|(k, _)| *k)
            .collect();
        ended
            .into_iter()
            .filter_map(|k| self.timewait.remove(&k))
            .collect()
    }

    /// Live connections (tracked or from the snapshot) in `state`.
    pub fn in_state_mut(&mut self, state: TcpState) -> impl Iterator<Item = &mut Connection> {
        self.conns
            .values_mut()
            .chain(self.snapshot.values_mut())
            .filter(move |c| c.state == state && !c.listener)
    }

    /// Live connections per current state (timewait ones included), for
    /// gauges.
    pub fn count_by_state(&self) -> [u64; STATES] {
        let mut counts = [0u64; STATES];
        for c in self
            .conns
            .values()
            .chain(self.snapshot.values())
            .chain(self.timewait.values())
        {
            if !c.listener {
                counts[c.state.index()] += 1;
            }
        }
        counts
    }

    pub fn len(&self) -> usize {
        self.conns.len() + self.timewait.len() + self.snapshot.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, sock: u64) -> Option<&Connection> {
        self.conns.get(&sock)
    }

    pub fn get_mut(&mut self, sock: u64) -> Option<&mut Connection> {
        self.conns.get_mut(&sock)
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
            let o = tr.on_transition(t);
            assert!(o.closed.is_empty() && !o.untracked);
        }
        let mut o = tr.on_transition(last);
        assert_eq!(o.closed.len(), 1, "expected a closed connection: {o:?}");
        assert!(tr.is_empty());
        o.closed.pop().unwrap()
    }

    fn ms(c: &Connection, s: TcpState) -> Option<u64> {
        c.state_ns(s).map(|n| n / 1_000_000)
    }

    fn assert_sums(c: &Connection) {
        assert_eq!(c.states().map(|(_, n)| n).sum::<u64>(), c.duration_ns());
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
        assert!(c.timewait.is_none());
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
    fn active_close_waits_for_its_timewait_socket() {
        let mut t = Tracker::new(8);
        for step in [
            tr(100, Close, SynSent, None),
            tr(101, SynSent, Established, Some(1)),
            tr(301, Established, FinWait1, Some(200)),
            tr(302, FinWait1, FinWait2, Some(1)),
        ] {
            t.on_transition(&step);
        }
        let o = t.on_transition(&tr(305, FinWait2, Close, Some(3)));
        assert!(
            o.closed.is_empty(),
            "not reported before its timewait socket ends"
        );
        assert!(t.has_timewait());
        let mut conn = t.timewait_mut().next().unwrap().clone();
        assert_eq!(conn.state, FinWait2);
        assert_eq!(conn.timewait.unwrap().closed_ns, 305_000_000);
        // Peer's FIN at 400 ms: TIME_WAIT; the timer fires 60 s later.
        conn.advance(TimeWait, 400_000_000);
        let derived = t
            .finish_timewait(
                &mut conn,
                60_400_000_000,
                TimewaitEnd::Expired,
                Source::SockDiag,
            )
            .unwrap();
        assert_eq!(
            (derived.old, derived.new, derived.source),
            (TimeWait, Close, Source::SockDiag)
        );
        assert_eq!(derived.old_state_ns, Some(60_000_000_000));
        assert_eq!(ms(&conn, FinWait2), Some(98));
        assert_eq!(ms(&conn, TimeWait), Some(60_000));
        assert_eq!(conn.duration_ns(), 60_300_000_000);
        assert_sums(&conn);
    }

    #[test]
    fn closing_goes_straight_to_time_wait() {
        let mut t = Tracker::new(8);
        t.on_transition(&tr(0, Established, FinWait1, None));
        t.on_transition(&tr(1, FinWait1, Closing, Some(1)));
        assert!(t
            .on_transition(&tr(2, Closing, Close, Some(1)))
            .closed
            .is_empty());
        assert_eq!(t.timewait_mut().next().unwrap().state, TimeWait);
    }

    #[test]
    fn a_new_connection_on_the_same_tuple_ends_the_timewait() {
        let mut t = Tracker::new(8);
        t.on_transition(&tr(0, Close, SynSent, None));
        t.on_transition(&tr(1, SynSent, Established, Some(1)));
        t.on_transition(&tr(5, Established, FinWait1, Some(4)));
        t.on_transition(&tr(6, FinWait1, FinWait2, Some(1)));
        t.on_transition(&tr(7, FinWait2, Close, Some(1)));
        t.timewait_mut()
            .next()
            .unwrap()
            .advance(TimeWait, 8_000_000);
        // Socket 2 connects on the same 4-tuple at 1500 ms, established at 1501.
        let again = |ms: u64, old, new, known| Transition {
            sock: 2,
            ..tr(ms, old, new, known)
        };
        t.on_transition(&again(1500, Close, SynSent, None));
        let o = t.on_transition(&again(1501, SynSent, Established, Some(1)));
        assert_eq!(o.closed.len(), 1);
        let old = &o.closed[0];
        assert_eq!(old.sock, 1);
        assert_eq!(old.timewait.unwrap().end, Some(TimewaitEnd::Reused));
        assert_eq!(ms(old, TimeWait), Some(1492));
        assert_eq!(o.derived.len(), 1);
        assert_eq!(
            (o.derived[0].old, o.derived[0].new, o.derived[0].source),
            (TimeWait, Close, Source::Reuse)
        );
        assert_eq!(o.derived[0].mono_ns, 1_500_000_000);
        assert_sums(old);
        assert!(!t.has_timewait());
    }

    #[test]
    fn fentry_deaths_give_exact_expiry_and_reuse_times() {
        let mut t = Tracker::new(8);
        t.on_transition(&tr(0, Established, FinWait1, None));
        t.on_transition(&tr(1, FinWait1, FinWait2, Some(1)));
        t.on_transition(&tr(2, FinWait2, Close, Some(1)));
        let key = t.timewait_mut().next().unwrap().key();
        {
            let c = t.timewait_mut().next().unwrap();
            c.advance(TimeWait, 3_000_000);
            c.timewait.as_mut().unwrap().expires_ns = Some(60_003_000_000);
        }
        // Killed early (no reuse seen yet): kept, not ended.
        let o = t.timewait_died(&key, 500_000_000, 10_000_000);
        assert!(o.closed.is_empty());
        // The reusing connection then takes the exact kill time.
        let again = |ms: u64, old, new, known| Transition {
            sock: 2,
            ..tr(ms, old, new, known)
        };
        let o = t.on_transition(&again(501, SynSent, Established, Some(1)));
        assert_eq!(o.closed[0].timewait.unwrap().end, Some(TimewaitEnd::Reused));
        assert_eq!(o.derived[0].source, Source::Fentry);
        assert_eq!(o.derived[0].mono_ns, 500_000_000);

        // A death at the timer (here 1.5 s late, the timer wheel) expires.
        let mut t = Tracker::new(8);
        t.on_transition(&tr(0, FinWait1, Closing, None));
        t.on_transition(&tr(1, Closing, Close, Some(1)));
        let key = t.timewait_mut().next().unwrap().key();
        t.timewait_mut()
            .next()
            .unwrap()
            .timewait
            .as_mut()
            .unwrap()
            .expires_ns = Some(60_001_000_000);
        let o = t.timewait_died(&key, 61_500_000_000, 10_000_000);
        assert_eq!(o.closed.len(), 1);
        assert_eq!(
            o.closed[0].timewait.unwrap().end,
            Some(TimewaitEnd::Expired)
        );
        assert_eq!(ms(&o.closed[0], TimeWait), Some(61_499));
        assert_sums(&o.closed[0]);
    }

    #[test]
    fn first_seen_mid_life_is_incomplete() {
        // Established before the tracer started: the kernel never timed it.
        let c = life(&[
            tr(500, Established, CloseWait, None),
            tr(501, CloseWait, LastAck, Some(1)),
            tr(502, LastAck, Close, Some(1)),
        ]);
        assert!(!c.complete);
        assert_eq!(c.first_seen_ns, 500_000_000);
        assert_eq!(c.start_ns, 500_000_000);
        assert_eq!(ms(&c, Established), None);
        assert_eq!(c.duration_ns(), 2_000_000);
        assert_sums(&c);
    }

    #[test]
    fn snapshot_sockets_count_from_the_snapshot() {
        let mut t = Tracker::new(8);
        let first = tr(0, CloseWait, Close, None);
        let owner = Owner {
            pid: 99,
            comm: comm("server"),
            uid: 0,
            ..Default::default()
        };
        let key = Tracker::key_of(&first);
        t.add_snapshot(Connection::from_snapshot(
            key,
            CloseWait,
            100_000_000,
            555,
            Some(owner),
        ));
        assert_eq!(t.in_state_mut(CloseWait).count(), 1);
        // A reset ends it in softirq: the owner stays the snapshot's.
        let mut softirq = tr(900, CloseWait, Close, None);
        softirq.pid = 0;
        let mut o = t.on_transition(&softirq);
        assert_eq!(o.owner.unwrap().pid, 99);
        let c = o.closed.pop().unwrap();
        assert!(c.from_snapshot && !c.complete);
        assert_eq!(c.inode, 555);
        assert_eq!(ms(&c, CloseWait), Some(800));
        assert_eq!(c.duration_ns(), 800_000_000);
        assert_sums(&c);
    }

    #[test]
    fn a_birth_is_new_even_if_the_snapshot_saw_it() {
        let mut t = Tracker::new(8);
        let child = tr(10, Listen, SynRecv, None);
        t.add_snapshot(Connection::from_snapshot(
            Tracker::key_of(&child),
            Established,
            5_000_000,
            9,
            None,
        ));
        t.on_transition(&child);
        let c = t.get(1).unwrap();
        assert!(c.complete && !c.from_snapshot);
        assert_eq!(t.len(), 1, "the snapshot's copy is dropped");
    }

    #[test]
    fn first_seen_with_kernel_timing_starts_earlier() {
        // The kernel timed ESTABLISHED (its entry was filtered in the kernel).
        let c = life(&[
            tr(500, Established, CloseWait, Some(300)),
            tr(510, CloseWait, LastAck, Some(10)),
            tr(511, LastAck, Close, Some(1)),
        ]);
        assert_eq!(c.start_ns, 200_000_000);
        assert_eq!(ms(&c, Established), Some(300));
        assert_eq!(c.duration_ns(), 311_000_000);
        assert_sums(&c);
    }

    #[test]
    fn missing_transition_is_a_gap_and_still_sums() {
        let c = life(&[
            tr(0, Close, SynSent, None),
            tr(1, SynSent, Established, Some(1)),
            // ESTABLISHED -> CLOSE_WAIT at 100 was lost.
            tr(130, CloseWait, LastAck, Some(30)),
            tr(131, LastAck, Close, Some(1)),
        ]);
        assert!(c.gap);
        assert_eq!(ms(&c, Established), Some(99));
        assert_eq!(ms(&c, CloseWait), Some(30));
        assert_sums(&c);
    }

    #[test]
    fn owner_is_never_the_softirq_task() {
        let mut t = Tracker::new(8);
        let mut softirq = tr(500, Established, CloseWait, None);
        softirq.pid = 0;
        softirq.comm = comm("swapper/1");
        assert_eq!(t.on_transition(&softirq).owner, None);
        let mut close = tr(510, CloseWait, LastAck, Some(10));
        close.pid = 8;
        close.comm = comm("server");
        assert_eq!(t.on_transition(&close).owner.unwrap().pid, 8);
    }

    #[test]
    fn accepted_socket_inherits_its_listeners_owner() {
        let mut t = Tracker::new(8);
        let listen = Transition {
            sock: 10,
            pid: 8,
            comm: comm("server"),
            lport: 80,
            ..tr(0, Close, Listen, None)
        };
        t.on_transition(&listen);
        // The child is created in softirq on the client's task.
        let child = Transition {
            sock: 11,
            pid: 7,
            comm: comm("client"),
            lport: 80,
            ..tr(1, Listen, SynRecv, None)
        };
        let o = t.on_transition(&child);
        assert_eq!(o.owner.unwrap().pid, 8);
        // A second listener of another process on the port: unknown.
        t.on_transition(&Transition {
            sock: 12,
            pid: 9,
            lport: 80,
            ..tr(2, Close, Listen, None)
        });
        let o = t.on_transition(&Transition {
            sock: 13,
            pid: 7,
            lport: 80,
            ..tr(3, Listen, SynRecv, None)
        });
        assert_eq!(o.owner, None);
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
        assert_eq!(
            tr_.on_transition(&tr(5, SynSent, Close, Some(5)))
                .closed
                .len(),
            1
        );
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
        assert!(t.on_transition(&other).untracked);
        assert_eq!(t.untracked, 1);
        assert_eq!(t.len(), 1);
    }
}
