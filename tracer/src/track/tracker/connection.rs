//! One connection: its endpoints, owner, time in each state, close path
//! and timewait part, updated transition by transition (the rules are in
//! `mod.rs`).

use std::{
    hash::{Hash, Hasher},
    net::IpAddr,
    num::NonZeroU64,
};

use super::{owners::Owner, state_times::StateTimes, Derived};
use crate::{
    kernel::events::{Family, Source, TcpState, Transition},
    track::close::ClosePath,
    track::ports::Hold,
};

/// A connection's identity once its socket is gone: namespace and 4-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleKey {
    pub netns: u32,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
}

/// Three words for an IPv4 key, five for IPv6: it is hashed twice per
/// connection, and the derived hash wrote each field, enum tag and
/// address length apart. The family shows in the addresses' width.
impl Hash for TupleKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(
            u64::from(self.netns) << 32 | u64::from(self.lport) << 16 | u64::from(self.rport),
        );
        hash_addr(h, &self.laddr);
        hash_addr(h, &self.raddr);
    }
}

/// An address as one word of its width.
pub fn hash_addr<H: Hasher>(h: &mut H, addr: &IpAddr) {
    match addr {
        IpAddr::V4(a) => h.write_u32(a.to_bits()),
        IpAddr::V6(a) => h.write_u128(a.to_bits()),
    }
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
    /// The tracer stopped while the connection waited for its timewait
    /// socket to end.
    TracingStopped,
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
            TimewaitEnd::TracingStopped => "tracing_stopped",
        }
    }
}

/// What the tracer knows of a connection's timewait socket. Part of every
/// connection the tracker holds: its optional times are 8 bytes each
/// (CLOCK_MONOTONIC is never 0 at a socket's event).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timewait {
    /// When the tracepoint reported the full socket's CLOSE.
    pub closed_ns: u64,
    /// A dump has shown the timewait socket.
    pub seen: bool,
    /// When its timer fires, as of the last dump (CLOCK_MONOTONIC ns).
    expires: Option<NonZeroU64>,
    pub end: Option<TimewaitEnd>,
    /// When the fentry program saw it die (kernels with fentry).
    killed: Option<NonZeroU64>,
    /// Polls that found it gone (it is decided at the second).
    pub missing_polls: u8,
    /// When the first poll that found it gone ran, and whether its
    /// namespace had overflowed then.
    pub missing_since_ns: u64,
    pub missing_overflowed: bool,
    /// The FIN_WAIT2 stay of the full socket before its hand-over (the
    /// kernel's `old_state_ns` of `FIN_WAIT2 -> CLOSE`), if known: the
    /// summary and the metrics count the stay whole when it ends in the
    /// timewait socket (see `report/observe.rs`). A value and a flag, not
    /// an `Option<u64>`: the flag fits in the struct's padding, an
    /// `Option` would add 8 bytes to every slot.
    stay_before_ns: u64,
    stay_before_known: bool,
}

impl Timewait {
    /// The timewait part of a connection whose full socket closed at `ns`.
    pub fn closed_at(ns: u64) -> Self {
        Timewait {
            closed_ns: ns,
            ..Default::default()
        }
    }

    /// When its timer fires, as of the last dump (CLOCK_MONOTONIC ns).
    pub fn expires_ns(&self) -> Option<u64> {
        self.expires.map(NonZeroU64::get)
    }

    pub fn set_expires_ns(&mut self, ns: u64) {
        self.expires = NonZeroU64::new(ns);
    }

    /// When the fentry program saw it die (kernels with fentry).
    pub fn killed_ns(&self) -> Option<u64> {
        self.killed.map(NonZeroU64::get)
    }

    pub fn set_killed_ns(&mut self, ns: u64) {
        self.killed = NonZeroU64::new(ns);
    }

    /// The FIN_WAIT2 stay before the hand-over, if known.
    pub fn stay_before_ns(&self) -> Option<u64> {
        self.stay_before_known.then_some(self.stay_before_ns)
    }

    pub fn set_stay_before_ns(&mut self, ns: Option<u64>) {
        self.stay_before_ns = ns.unwrap_or(0);
        self.stay_before_known = ns.is_some();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
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
    /// Time in each state passed through.
    times: StateTimes,
    pub complete: bool,
    /// A transition was missing between two that were seen (or, never
    /// seen in TCP, it passed through more states than
    /// [`StateTimes`] stores).
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
    /// Its `close` record was written (when its close handshake was over:
    /// at its entry into TIME_WAIT for an active close, else at its end),
    /// and whether that was before its end (at the entry into TIME_WAIT).
    pub close_written: bool,
    pub close_written_early: bool,
    /// Written when the tracer stopped, before its end (`complete` is
    /// false then).
    pub cut_at_exit: bool,
    pub timewait: Option<Timewait>,
    /// Its close steps and resets (see `close.rs`).
    pub close: ClosePath,
    /// A listener's child (`LISTEN -> SYN_RECV`): it uses its listener's
    /// port, no ephemeral one.
    pub accepted: bool,
    /// What it holds of its namespace's ephemeral ports, as counted
    /// (see `ports.rs`).
    pub hold: Hold,
}

impl Connection {
    pub(super) fn new(t: &Transition, owner: Option<Owner>) -> Self {
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
            times: StateTimes::default(),
            complete,
            gap: false,
            // A listener first seen at its close is one too.
            listener: t.new == TcpState::Listen
                || (t.old == TcpState::Listen && t.new == TcpState::Close),
            from_snapshot: false,
            inode: 0,
            task_hint: None,
            stuck_reported: false,
            close_written: false,
            close_written_early: false,
            cut_at_exit: false,
            timewait: None,
            close: ClosePath::default(),
            accepted: t.old == TcpState::Listen && t.new == TcpState::SynRecv,
            hold: Hold::Nothing,
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
            times: StateTimes::default(),
            complete: false,
            gap: false,
            listener: state == TcpState::Listen,
            from_snapshot: true,
            inode,
            task_hint: None,
            stuck_reported: false,
            close_written: false,
            close_written_early: false,
            cut_at_exit: false,
            timewait: None,
            close: ClosePath::default(),
            accepted: false,
            hold: Hold::Nothing,
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

    pub(super) fn apply(&mut self, t: &Transition) {
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

    /// Credits the time in the current state up to `at_ns`, staying in it
    /// (a connection cut short when the tracer stops).
    pub fn extend_to(&mut self, at_ns: u64) {
        let at = at_ns.max(self.state_since_ns);
        self.credit(self.state, at - self.state_since_ns);
        self.state_since_ns = at;
    }

    fn note_owner_syscall(&mut self, t: &Transition) {
        if t.source == Source::Tracepoint && TcpState::runs_in_owner_syscall(t.old, t.new) {
            self.owner = Some(Owner {
                pid: t.pid,
                comm: t.comm,
                uid: t.uid,
                cgroup: t.cgroup,
            });
            self.task_hint = Some((t.pid, t.tid));
        }
    }

    fn credit(&mut self, state: TcpState, ns: u64) {
        if !self.times.credit(state, ns) {
            self.gap = true;
        }
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
        self.times.iter()
    }

    pub fn state_ns(&self, state: TcpState) -> Option<u64> {
        self.times.get(state)
    }

    /// From `start_ns` to the last transition (the end, for ended ones).
    pub fn duration_ns(&self) -> u64 {
        self.state_since_ns - self.start_ns
    }

    /// Ends the timewait part at `at_ns` as `end`: returns the derived
    /// `-> CLOSE` transition when there was a timewait socket to end.
    pub fn finish_timewait(
        &mut self,
        at_ns: u64,
        end: TimewaitEnd,
        source: Source,
    ) -> Option<Transition> {
        let tw = self.timewait.get_or_insert_with(Timewait::default);
        tw.end = Some(end);
        let closed_ns = tw.closed_ns;
        match end {
            // No timewait socket: the connection ended at the tracepoint's CLOSE.
            TimewaitEnd::NotCreated | TimewaitEnd::NotFound | TimewaitEnd::Unknown => {
                self.close.push(self.state, TcpState::Close, closed_ns);
                None
            }
            _ => {
                let old = self.state;
                let in_state = at_ns.saturating_sub(self.state_since_ns);
                self.advance(TcpState::Close, at_ns);
                Some(self.derived(old, TcpState::Close, at_ns, Some(in_state), source))
            }
        }
    }

    /// A derived transition with what the output and the observers need
    /// beside it (see [`Derived`]).
    pub fn with_context(&self, t: Transition) -> Derived {
        Derived {
            t,
            owner: self.owner,
            stay_before_ns: self.timewait.and_then(|tw| tw.stay_before_ns()),
        }
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
            task: false,
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
