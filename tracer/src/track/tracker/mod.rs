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
//!   until `lifecycle.rs` (or the fentry program's death record) sees
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
//! `connection.rs` is one connection; this file is the table of them.

mod connection;
mod owners;
#[cfg(test)]
mod tests;

use std::collections::hash_map::Entry;

pub use connection::{Connection, Timewait, TimewaitEnd, TupleKey};
use owners::Listeners;
pub use owners::Owner;

use crate::{
    kernel::events::{Source, TcpState, Transition},
    FastMap as HashMap,
};
use connection::STATES;

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

pub struct Tracker {
    conns: HashMap<u64, Connection>,
    /// Actively closed connections whose timewait socket is not resolved.
    timewait: HashMap<TupleKey, Connection>,
    /// Sockets from the start-up snapshot not yet seen in a transition.
    snapshot: HashMap<TupleKey, Connection>,
    /// Listening sockets, for accepted sockets' owner.
    listeners: Listeners,
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
            listeners: Listeners::default(),
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
                .add(conn.netns, conn.lport, 0, conn.laddr, conn.owner);
        } else {
            self.snapshot.insert(conn.key(), conn);
        }
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
                            .then(|| self.listeners.owner_of(t))
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
                self.listeners.add(t.netns, t.lport, t.sock, t.laddr, owner);
            }
            (TcpState::Listen, TcpState::Close) => {
                self.listeners.remove(t.netns, t.lport, t.sock);
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
