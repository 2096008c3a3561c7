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
//!   until `lifecycle/timewait.rs` (or the fentry program's death record) sees
//!   that socket end.
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
//! - Owner: see `owners.rs`.
//!
//! `connection.rs` is one connection, `slab.rs` where connections live;
//! this file is the table of them: one index look-up per transition (by
//! socket address), and 4-tuple indexes only for the connections that
//! need them (waiting for their timewait socket, or known from the
//! start-up snapshot).

mod connection;
mod owners;
mod slab;
mod state_times;
#[cfg(test)]
mod tests;
mod timewait;

use std::collections::hash_map::Entry;

use arrayvec::ArrayVec;

pub use connection::{hash_addr, Connection, Timewait, TimewaitEnd, TupleKey};
pub use owners::Owner;
use owners::{Accepted, AcceptedEntry, Listeners};
pub use slab::{Phase, SlotId, PREFETCH_RUN};
use timewait::TimewaitIndex;
pub use timewait::TwEntry;

use crate::{
    kernel::events::{Source, TcpState, Transition},
    track::ports::{Dest, Hold, Ports},
    FastMap as HashMap,
};
use slab::Slab;

/// Was this `-> CLOSE` an active close that leaves a timewait socket?
fn leaves_timewait(old: TcpState) -> bool {
    matches!(
        old,
        TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing
    )
}

/// Connections one transition can end: its own, and an older one whose
/// timewait socket it reused.
pub type Closed = ArrayVec<SlotId, 2>;

/// A transition the tracepoint could not report, derived by the tracker
/// or a timewait poll from a connection's timewait socket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Derived {
    pub t: Transition,
    /// Its connection's owner.
    pub owner: Option<Owner>,
    /// When `t` leaves FIN_WAIT2: the part of that stay spent in the full
    /// socket, before the hand-over, if known. The summary and the metrics
    /// count the stay whole (`report/observe.rs`); the record keeps the
    /// kernel's split.
    pub stay_before_ns: Option<u64>,
}

/// What one transition did to the tracker.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// The socket's owner, as known after this transition.
    pub owner: Option<Owner>,
    /// Connections that ended (in [`Phase::Ended`]: the caller writes and
    /// frees them with [`Tracker::release`]).
    pub closed: Closed,
    /// A transition the tracepoint could not report (the reused
    /// timewait's end).
    pub derived: Option<Derived>,
    /// The tracker is full; this socket is not tracked (counted).
    pub untracked: bool,
    /// The connection went on in a timewait socket, already in TIME_WAIT
    /// (a simultaneous close, CLOSING -> CLOSE): its close handshake is
    /// over now.
    pub handshake_done: Option<SlotId>,
    /// The connection went on in a timewait socket (or so the tracepoint
    /// shows it: an abort from FIN_WAIT2 looks the same until its reset).
    pub handed_over: Option<SlotId>,
}

pub struct Tracker {
    slab: Slab,
    /// Live sockets by kernel address.
    by_sock: HashMap<u64, SlotId>,
    /// Actively closed connections whose timewait socket is not resolved.
    timewait: TimewaitIndex,
    /// Sockets from the start-up snapshot not yet seen in a transition.
    snapshot: HashMap<TupleKey, SlotId>,
    /// Listening sockets, for accepted sockets' owner.
    listeners: Listeners,
    /// Accepted connections to look up in /proc for their owner.
    accepted: Accepted,
    /// Timewait sockets older than the tracer (start-up snapshot): the
    /// ports they hold until their expiry (CLOCK_MONOTONIC ns) or a reuse
    /// of their 4-tuple.
    old_timewait: HashMap<TupleKey, (u64, Hold)>,
    capacity: usize,
    /// Transitions of sockets the tracker had no room for.
    pub untracked: u64,
    /// Connections with at least one missing transition, at their close.
    pub gaps: u64,
    /// Ephemeral ports held per destination.
    pub ports: Ports,
    /// Entries of the 4-tuple tables that another connection on the same
    /// namespace and 4-tuple replaced (a timewait ends as reused; a
    /// snapshot socket is dropped).
    pub replaced: u64,
    /// Connections looked at to join a timewait socket's news (a reuse, a
    /// death, a poll's sighting) to its connection: one per join, whatever
    /// the table holds (tests check no join walks the table).
    pub examined: u64,
}

impl Tracker {
    pub fn new(capacity: usize) -> Self {
        Tracker {
            slab: Slab::default(),
            by_sock: HashMap::default(),
            timewait: TimewaitIndex::default(),
            snapshot: HashMap::default(),
            listeners: Listeners::default(),
            accepted: Accepted::default(),
            old_timewait: HashMap::default(),
            capacity,
            ports: Ports::disabled(),
            untracked: 0,
            gaps: 0,
            replaced: 0,
            examined: 0,
        }
    }

    fn full(&self) -> bool {
        self.len() >= self.capacity
    }

    /// The processes known to hold a listening socket on `port` in
    /// `netns` (sorted), for the records' `listener_pids`.
    pub fn listener_pids(&self, netns: u32, port: u16) -> Option<&[u32]> {
        self.listeners.pids(netns, port)
    }

    /// Accepted connections established at or before `before_ns` that are
    /// still open and still have their listener's owner (at most `max`):
    /// to look up in /proc for the process that accepted them.
    pub fn due_accepted(&mut self, before_ns: u64, max: usize) -> Vec<(SlotId, Connection)> {
        let mut due = Vec::new();
        while due.len() < max {
            let Some(e) = self.accepted.pop_due(before_ns) else {
                break;
            };
            if self.is_same_open(e.id, e.sock, e.first_seen_ns) {
                due.push((e.id, *self.slab.get(e.id)));
            }
        }
        due
    }

    /// The owner found in /proc for the accepted connection `c` (slot
    /// `id`), unless it has ended or its own system call named one since.
    pub fn set_accepted_owner(&mut self, id: SlotId, c: &Connection, owner: Owner) -> bool {
        if !self.is_same_open(id, c.sock, c.first_seen_ns) {
            return false;
        }
        self.slab.get_mut(id).owner = Some(owner);
        true
    }

    /// Slot `id` still holds the open connection of socket `sock` first
    /// seen at `first_seen_ns`, whose owner no system call of its own
    /// has named.
    fn is_same_open(&self, id: SlotId, sock: u64, first_seen_ns: u64) -> bool {
        let c = self.slab.get(id);
        self.slab.phase(id) == Phase::Live
            && c.sock == sock
            && c.first_seen_ns == first_seen_ns
            && c.task_hint.is_none()
    }

    /// Registers a socket found by the start-up snapshot, held by the
    /// processes `pids`.
    pub fn add_snapshot(&mut self, conn: Connection, pids: &[u32]) {
        if self.full() {
            self.untracked += 1;
            return;
        }
        if conn.listener {
            self.listeners
                .add(conn.netns, conn.lport, 0, conn.laddr, conn.owner, pids);
            return;
        }
        let key = conn.key();
        let id = self.slab.insert(Phase::Snapshot, conn);
        if let Some(old) = self.snapshot.insert(key, id) {
            self.replaced += 1;
            self.free(old);
        }
        self.count_ports(id);
    }

    /// A timewait socket of the start-up snapshot, which dies at
    /// `expires_ns`: only its port is counted.
    pub fn add_old_timewait(&mut self, key: TupleKey, expires_ns: u64) {
        // One that closed since the tracer attached is counted already.
        if self.ports.enabled() && self.timewait.get(&key).is_none() {
            self.old_timewait.insert(key, (expires_ns, Hold::Nothing));
            self.count_old_timewait(&key);
        }
    }

    fn count_old_timewait(&mut self, key: &TupleKey) {
        let Some(&(_, Hold::Nothing)) = self.old_timewait.get(key) else {
            return;
        };
        if self.listeners.has(key.netns, key.lport)
            || !self.ports.counts(key.netns, key.lport, None)
        {
            return;
        }
        let held = self
            .ports
            .hold(Dest::of(key), Hold::Nothing, Hold::TimeWait);
        if let Some(e) = self.old_timewait.get_mut(key) {
            e.1 = held;
        }
    }

    fn drop_old_timewait(&mut self, key: &TupleKey) {
        if let Some((_, hold)) = self.old_timewait.remove(key) {
            self.ports.hold(Dest::of(key), hold, Hold::Nothing);
        }
    }

    /// The start-up snapshot's timewait sockets whose expiry is past.
    pub fn expire_old_timewait(&mut self, now_ns: u64) {
        if self.old_timewait.is_empty() {
            return;
        }
        let gone: Vec<TupleKey> = self
            .old_timewait
            .iter()
            .filter(|(_, &(expires, _))| expires <= now_ns)
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            self.drop_old_timewait(&key);
        }
    }

    pub fn key_of(t: &Transition) -> TupleKey {
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
        let closing = t.new == TcpState::Close;
        let full = self.full();
        let mut stale = None;
        let id = match self.by_sock.entry(t.sock) {
            Entry::Occupied(e) => {
                let id = *e.get();
                if closing {
                    e.remove();
                }
                self.slab.get_mut(id).apply(t);
                id
            }
            Entry::Vacant(v) => {
                if full {
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
                let id = match known {
                    Some(id) if !birth => {
                        // Existed before the tracer: time counts from the snapshot.
                        let c = self.slab.get_mut(id);
                        c.sock = t.sock;
                        c.apply(t);
                        self.slab.set_phase(id, Phase::Live);
                        id
                    }
                    other => {
                        stale = other;
                        let inherited = (t.old == TcpState::Listen && t.new == TcpState::SynRecv)
                            .then(|| self.listeners.owner_of(t))
                            .flatten();
                        self.slab.insert(Phase::Live, Connection::new(t, inherited))
                    }
                };
                if !closing {
                    v.insert(id);
                }
                id
            }
        };
        if let Some(stale) = stale {
            self.free(stale);
        }
        // Its local port shows after SYN_SENT.
        self.count_ports(id);
        match (t.old, t.new) {
            (_, TcpState::Listen) => {
                let owner = self.slab.get(id).owner;
                let pids = owner.and_then(|o| o.known_pid());
                self.listeners
                    .add(t.netns, t.lport, t.sock, t.laddr, owner, pids.as_slice());
            }
            (TcpState::Listen, TcpState::Close) => {
                self.listeners.remove(t.netns, t.lport, t.sock);
            }
            _ => {}
        }
        if !self.snapshot.is_empty() && t.new == TcpState::Established {
            // A socket born after attach but before the snapshot was taken
            // is in both: the tracked one wins.
            if let Some(stale) = self.snapshot.remove(&Self::key_of(t)) {
                self.free(stale);
            }
        }
        let conn = self.slab.get_mut(id);
        out.owner = conn.owner;
        if (t.old, t.new) == (TcpState::SynRecv, TcpState::Established)
            && conn.accepted
            && conn.task_hint.is_none()
        {
            self.accepted.push(AcceptedEntry {
                id,
                sock: conn.sock,
                first_seen_ns: conn.first_seen_ns,
                established_ns: t.mono_ns,
            });
        }
        if closing {
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
                let mut tw = Timewait::closed_at(t.mono_ns);
                if t.old == TcpState::FinWait2 {
                    tw.set_stay_before_ns(t.old_state_ns);
                }
                conn.timewait = Some(tw);
                if t.old == TcpState::Closing {
                    out.handshake_done = Some(id);
                }
                out.handed_over = Some(id);
                let key = conn.key();
                self.set_phase(id, Phase::Timewait);
                if let Some(old) = self.timewait.insert(&key, id) {
                    self.replaced += 1;
                    // Two connections on one 4-tuple both waiting: the
                    // older one's timewait socket gave way to this one.
                    self.end_timewait_slot(old, t.mono_ns, TimewaitEnd::Reused, Source::Reuse);
                    if out.closed.try_push(old).is_err() {
                        self.free(old);
                    }
                }
            } else {
                if conn.gap {
                    self.gaps += 1;
                }
                self.set_phase(id, Phase::Ended);
                let _ = out.closed.try_push(id);
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
        let key = Self::key_of(t);
        if !self.old_timewait.is_empty() {
            // A timewait socket older than the tracer gave way.
            self.drop_old_timewait(&key);
        }
        if !self.timewait.may_hold(&key) {
            return;
        }
        let (slab, examined) = (&self.slab, &mut self.examined);
        // The index's key is a hash: the connection's own 4-tuple decides.
        let taken = self.timewait.remove_if(&key, |e| {
            *examined += 1;
            // Ended at once if it matches: its whole slot is read.
            slab.prefetch(e.id);
            slab.get(e.id).key() == key
        });
        let Some(TwEntry { id, .. }) = taken else {
            return;
        };
        // With fentry, the exact moment the kernel killed it.
        let (at, source) = match self.slab.get(id).timewait.and_then(|tw| tw.killed_ns()) {
            Some(k) => (k, Source::Fentry),
            None => (reuse_at, Source::Reuse),
        };
        let derived = self.end_timewait_slot(id, at, TimewaitEnd::Reused, source);
        out.derived = derived.map(|d| self.slab.get(id).with_context(d));
        let _ = out.closed.try_push(id);
    }

    /// The fentry program saw the timewait socket of `key` die at `at_ns`.
    /// Past its scheduled expiry (less `tolerance_ns`) it expired, and ends
    /// now; otherwise it was killed early: the time is kept until the next
    /// transition (a reuse) or poll says which.
    pub fn timewait_died(&mut self, key: &TupleKey, at_ns: u64, tolerance_ns: u64) -> Outcome {
        let mut out = Outcome::default();
        let Some(id) = self.timewait.get(key).map(|e| e.id) else {
            return out;
        };
        self.examined += 1;
        let conn = self.slab.get_mut(id);
        if conn.key() != *key {
            return out;
        }
        let in_time_wait = conn.state == TcpState::TimeWait;
        let Some(tw) = conn.timewait.as_mut() else {
            return out;
        };
        if in_time_wait && tw.expires_ns().is_some_and(|e| at_ns + tolerance_ns >= e) {
            if let Some(d) = self.end_timewait(id, at_ns, TimewaitEnd::Expired, Source::Fentry) {
                out.derived = Some(self.slab.get(id).with_context(d));
            }
            out.owner = self.slab.get(id).owner;
            let _ = out.closed.try_push(id);
        } else {
            tw.set_killed_ns(at_ns);
        }
        out
    }

    /// Ends the timewait part of connection `id` (waiting in the timewait
    /// table) at `at_ns`: returns the derived `-> CLOSE` transition, if
    /// there was a timewait socket, and leaves the connection
    /// [`Phase::Ended`] for the caller to write and release.
    pub fn end_timewait(
        &mut self,
        id: SlotId,
        at_ns: u64,
        end: TimewaitEnd,
        source: Source,
    ) -> Option<Transition> {
        let key = self.slab.get(id).key();
        self.timewait.remove(&key, id);
        self.end_timewait_slot(id, at_ns, end, source)
    }

    fn end_timewait_slot(
        &mut self,
        id: SlotId,
        at_ns: u64,
        end: TimewaitEnd,
        source: Source,
    ) -> Option<Transition> {
        self.set_phase(id, Phase::Ended);
        let conn = self.slab.get_mut(id);
        if conn.gap {
            self.gaps += 1;
        }
        conn.finish_timewait(at_ns, end, source)
    }

    /// Connections waiting for their timewait socket to be resolved.
    pub fn timewait_mut(&mut self) -> impl Iterator<Item = (SlotId, &mut Connection)> {
        self.slab
            .iter_mut()
            .filter(|(_, p, _)| *p == Phase::Timewait)
            .map(|(id, _, c)| (id, c))
    }

    /// Starts a timewait poll: its number. Connections that begin to wait
    /// from now on are judged only by later polls.
    pub fn begin_poll(&mut self) -> u32 {
        self.timewait.poll = self.timewait.poll.wrapping_add(1);
        self.timewait.poll
    }

    /// The waiting connections' index entries (namespace, family, polls).
    pub fn timewait_entries(&self) -> impl Iterator<Item = &TwEntry> {
        self.timewait.entries()
    }

    /// Poll `poll` found the timewait socket of `key`: the waiting
    /// connection it belongs to, if the poll judges it and it is not yet
    /// known to be in TIME_WAIT (else nothing is left to learn from it).
    pub fn timewait_sighted(&mut self, key: &TupleKey, poll: u32) -> Option<SlotId> {
        let e = self.timewait.get_mut(key)?;
        if e.born_in >= poll {
            return None;
        }
        e.found_in = poll;
        if e.in_time_wait {
            return None;
        }
        let id = e.id;
        self.examined += 1;
        let conn = self.slab.get(id);
        if conn.key() != *key {
            return None;
        }
        if conn.state == TcpState::TimeWait {
            if let Some(e) = self.timewait.get_mut(key) {
                e.in_time_wait = true;
            }
        }
        Some(id)
    }

    /// Prefetches what [`Tracker::timewait_sighted`] of `key` will read
    /// (see [`Slab::prefetch`]): called for a run of a poll's sightings
    /// before they are applied, so that their cache misses overlap.
    pub fn prefetch_sighting(&self, key: &TupleKey) {
        if let Some(e) = self.timewait.get(key) {
            if !e.in_time_wait {
                self.slab.prefetch(e.id);
            }
        }
    }

    /// Prefetches connection `id`'s slot (see [`Slab::prefetch`]).
    pub fn prefetch(&self, id: SlotId) {
        self.slab.prefetch(id);
    }

    /// Marks the connection of `key` as dated in TIME_WAIT (see
    /// [`Tracker::timewait_sighted`]).
    pub fn timewait_settled(&mut self, key: &TupleKey) {
        if let Some(e) = self.timewait.get_mut(key) {
            e.in_time_wait = true;
        }
    }

    /// Waiting connections that poll `poll` judges and did not find.
    pub fn timewait_unsighted(&self, poll: u32) -> Vec<SlotId> {
        self.timewait
            .entries()
            .filter(|e| e.unsighted_by(poll))
            .map(|e| e.id)
            .collect()
    }

    /// Connection `id` still waits under the index entry of its 4-tuple,
    /// and poll `poll` judges it without having found it (it was in
    /// [`Tracker::timewait_unsighted`], and nothing ended it since).
    pub fn still_unsighted(&self, id: SlotId, poll: u32) -> bool {
        self.slab.phase(id) == Phase::Timewait
            && self
                .timewait
                .get(&self.slab.get(id).key())
                .is_some_and(|e| e.id == id && e.unsighted_by(poll))
    }

    pub fn timewait_pending(&self) -> usize {
        self.timewait.len()
    }

    pub fn has_timewait(&self) -> bool {
        !self.timewait.is_empty()
    }

    /// Live connections (tracked or from the snapshot) in `state`.
    pub fn in_state_mut(
        &mut self,
        state: TcpState,
    ) -> impl Iterator<Item = (SlotId, &mut Connection)> {
        self.slab
            .iter_mut()
            .filter(move |(_, p, c)| {
                matches!(p, Phase::Live | Phase::Snapshot) && c.state == state && !c.listener
            })
            .map(|(id, _, c)| (id, c))
    }

    /// At exit: the connections whose close has begun (waiting for their
    /// timewait socket, or live in FIN_WAIT1, FIN_WAIT2, CLOSING, LAST_ACK
    /// or CLOSE_WAIT), ended now as far as they got (a timewait one's end
    /// is [`TimewaitEnd::TracingStopped`]), for the caller to write and
    /// release; and how many connections were still open (not closing,
    /// not listening).
    pub fn cut_at_exit(&mut self, now_ns: u64) -> (Vec<SlotId>, u64) {
        use TcpState::*;
        let mut cut = Vec::new();
        let mut open = 0;
        for (id, phase, c) in self.slab.iter_mut() {
            let closing = matches!(
                c.state,
                FinWait1 | FinWait2 | Closing | LastAck | CloseWait | TimeWait
            );
            match phase {
                Phase::Timewait => {
                    let tw = c.timewait.get_or_insert_with(Timewait::default);
                    tw.end = Some(TimewaitEnd::TracingStopped);
                }
                Phase::Live | Phase::Snapshot if closing && !c.listener => {}
                Phase::Live | Phase::Snapshot => {
                    if !c.listener {
                        open += 1;
                    }
                    continue;
                }
                Phase::Free | Phase::Ended => continue,
            }
            // The time in its state so far.
            c.extend_to(now_ns);
            c.cut_at_exit = true;
            c.complete = false;
            cut.push(id);
        }
        for &id in &cut {
            let c = self.slab.get(id);
            let (key, sock) = (c.key(), c.sock);
            match self.slab.phase(id) {
                Phase::Timewait => {
                    self.timewait.remove(&key, id);
                }
                Phase::Snapshot => {
                    self.snapshot.remove(&key);
                }
                _ => {
                    self.by_sock.remove(&sock);
                }
            }
            self.set_phase(id, Phase::Ended);
        }
        (cut, open)
    }

    /// Live connections per current state (timewait ones included), for
    /// gauges.
    pub fn count_by_state(&self) -> [u64; TcpState::COUNT] {
        let mut counts = [0u64; TcpState::COUNT];
        for (_, p, c) in self.slab.iter() {
            if matches!(p, Phase::Live | Phase::Snapshot | Phase::Timewait) && !c.listener {
                counts[c.state.index()] += 1;
            }
        }
        counts
    }

    /// Every connection counted by [`Tracker::count_by_state`].
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.slab
            .iter()
            .filter(|(_, p, c)| {
                matches!(p, Phase::Live | Phase::Snapshot | Phase::Timewait) && !c.listener
            })
            .map(|(_, _, c)| c)
    }

    /// Connections tracked (live, from the snapshot, or waiting for their
    /// timewait socket); ended ones waiting to be written are not counted.
    pub fn len(&self) -> usize {
        self.by_sock.len() + self.timewait.len() + self.snapshot.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, sock: u64) -> Option<&Connection> {
        self.by_sock.get(&sock).map(|&id| self.slab.get(id))
    }

    /// The connection in slot `id` if it still waits for the timewait
    /// socket that took over from socket `sock`.
    pub fn waiting_timewait_mut(&mut self, id: SlotId, sock: u64) -> Option<&mut Connection> {
        let waiting = self.slab.phase(id) == Phase::Timewait && self.slab.get(id).sock == sock;
        waiting.then(|| self.slab.get_mut(id))
    }

    pub fn get_mut(&mut self, sock: u64) -> Option<&mut Connection> {
        let id = *self.by_sock.get(&sock)?;
        Some(self.slab.get_mut(id))
    }

    /// The connection in slot `id`.
    pub fn conn(&self, id: SlotId) -> &Connection {
        self.slab.get(id)
    }

    pub fn conn_mut(&mut self, id: SlotId) -> &mut Connection {
        self.slab.get_mut(id)
    }

    pub fn phase(&self, id: SlotId) -> Phase {
        self.slab.phase(id)
    }

    /// Frees an ended connection's slot (once written).
    pub fn release(&mut self, id: SlotId) {
        debug_assert_eq!(self.slab.phase(id), Phase::Ended);
        self.free(id);
    }

    fn set_phase(&mut self, id: SlotId, phase: Phase) {
        self.slab.set_phase(id, phase);
        self.count_ports(id);
    }

    fn free(&mut self, id: SlotId) {
        if self.slab.phase(id) == Phase::Free {
            return;
        }
        self.slab.set_phase(id, Phase::Ended);
        self.count_ports(id);
        self.slab.free(id);
    }

    /// Brings the port counts up to date with connection `id`'s phase and
    /// local port (see `ports.rs`).
    fn count_ports(&mut self, id: SlotId) {
        if !self.ports.enabled() {
            return;
        }
        let phase = self.slab.phase(id);
        let c = self.slab.get(id);
        let client = !(c.listener || c.accepted || c.lport == 0);
        let to = match phase {
            Phase::Live | Phase::Snapshot if client => Hold::Port,
            Phase::Timewait if client => Hold::TimeWait,
            _ => Hold::Nothing,
        };
        if to == c.hold {
            return;
        }
        if c.hold == Hold::Nothing
            && (!self.ports.counts(c.netns, c.lport, c.task_hint)
                // One of the snapshot's sockets on a listening port was
                // accepted (the snapshot cannot tell otherwise).
                || (c.from_snapshot && self.listeners.has(c.netns, c.lport)))
        {
            return;
        }
        let dest = Dest::of(&c.key());
        let held = self.ports.hold(dest, c.hold, to);
        self.slab.get_mut(id).hold = held;
    }

    /// Namespace `netns`'s ephemeral range (or why it is unknown): its
    /// connections are counted from now on.
    pub fn set_port_range(
        &mut self,
        netns: u32,
        range: Result<crate::track::ports::PortRange, String>,
    ) {
        if !self.ports.set_range(netns, range) {
            return;
        }
        let ids: Vec<SlotId> = self
            .slab
            .iter()
            .filter(|(_, _, c)| c.netns == netns)
            .map(|(id, _, _)| id)
            .collect();
        for id in ids {
            self.count_ports(id);
        }
        let old: Vec<TupleKey> = self
            .old_timewait
            .keys()
            .filter(|k| k.netns == netns)
            .copied()
            .collect();
        for key in old {
            self.count_old_timewait(&key);
        }
    }

    /// Copies an ended connection out and frees its slot.
    pub fn take(&mut self, id: SlotId) -> Connection {
        let c = *self.slab.get(id);
        self.release(id);
        c
    }

    /// Bytes the table holds (slots and indexes), logged with `-v` at exit:
    /// slabs and hash tables keep their peak size, so this is the peak.
    pub fn memory_bytes(&self) -> usize {
        let slot = size_of::<Phase>() + size_of::<Connection>();
        let index = |cap: usize, entry: usize| cap * (entry + 1);
        self.slab.allocated() * slot
            + index(self.by_sock.capacity(), size_of::<(u64, SlotId)>())
            + index(self.timewait.capacity(), size_of::<(u64, TwEntry)>())
            + self.timewait.by_lport_bytes()
            + index(self.snapshot.capacity(), size_of::<(TupleKey, SlotId)>())
            + index(
                self.old_timewait.capacity(),
                size_of::<(TupleKey, (u64, Hold))>(),
            )
            + self.ports.memory_bytes()
    }
}
