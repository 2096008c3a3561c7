//! Joins the kernel's reset records to connections, by socket address.
//!
//! In: resets (`tcp:tcp_send_reset`, `tcp:tcp_receive_reset`) and the
//! connections the tracker closes. Out: connections with their resets
//! counted (and, where the kernel gives them, the reasons of those sent),
//! released once no reset of theirs can still be on its way.
//!
//! Ordering: a received reset comes before the `-> CLOSE` it causes, but
//! the reset an abort sends (`SO_LINGER` 0, `close()` with unread data)
//! comes just after it. So a connection closed by the tracepoint is held
//! for [`RESET_GRACE_NS`] and released by the first drain of the ring
//! buffer that began after that: the reset was in the buffer by then. A
//! reset for a socket the agent does not know yet (a batched connect
//! refused: the batch comes with the CLOSE) waits in a small table until
//! the connection closes; what stays there unclaimed for
//! [`PENDING_TTL_NS`] (a filtered connection's, or a socket the tracker had
//! no room for) is counted as `resets_unmatched`.

use std::collections::{hash_map::Entry, VecDeque};

use crate::{
    kernel::events::{Reset, ResetDirection, TcpState},
    track::close::{RstReasons, RESET_GRACE_NS},
    track::tracker::{SlotId, Tracker},
    FastMap as HashMap,
};

/// Resets of unknown sockets remembered at once; more are counted
/// unmatched.
pub const MAX_PENDING: usize = 4096;
/// How long a reset of an unknown socket waits for its connection.
pub const PENDING_TTL_NS: u64 = 5_000_000_000;
/// Hand-overs to a timewait socket remembered for an abort's reset: it
/// follows its `-> CLOSE` at once, so only closes on other CPUs in
/// between can push it out.
const RECENT_HANDOVERS: usize = 16;

/// A connection that went on in a timewait socket (as the tracepoint
/// shows it), by the socket address it had.
#[derive(Clone, Copy, Debug)]
struct Handover {
    sock: u64,
    id: SlotId,
    at_ns: u64,
}

/// A connection held for its resets: its socket address beside it, so
/// releasing it touches no slot.
#[derive(Clone, Copy, Debug)]
struct Held {
    id: SlotId,
    sock: u64,
    release_ns: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Pending {
    sent: u32,
    received: u32,
    reasons: RstReasons,
    first_ns: u64,
    /// Of `sent`, resets sent by the socket already in CLOSE (an abort's,
    /// e.g. from FIN_WAIT2 with `TCP_LINGER2` < 0, which the tracepoint
    /// shows as the `FIN_WAIT2 -> CLOSE` of a timewait hand-over).
    aborts: u32,
}

#[derive(Default)]
pub struct Resets {
    /// The reset tracepoints are attached (else nothing is held).
    pub enabled: bool,
    /// Ended connections (their slots in the tracker) and when they may
    /// be written, in close order.
    held: VecDeque<Held>,
    /// The newest held connection of each socket address: an abort's
    /// reset finds its connection without a walk of `held`.
    held_by_sock: HashMap<u64, SlotId>,
    /// Held connections looked at to join resets (one per join: tests
    /// check no join walks the table).
    pub examined: u64,
    pending: HashMap<u64, Pending>,
    /// The latest hand-overs, oldest overwritten first: a ring, not a map,
    /// so that an active close costs no hashing.
    handovers: [Option<Handover>; RECENT_HANDOVERS],
    next_handover: usize,
    /// Resets of sockets never joined to a connection the tracer reports.
    pub unmatched: u64,
    /// Resets joined to a connection.
    pub joined: u64,
}

fn add(sent: &mut u32, received: &mut u32, reasons: &mut RstReasons, r: &Reset) {
    match r.direction {
        ResetDirection::Sent => {
            *sent = sent.saturating_add(1);
            if let Some(reason) = r.reason {
                reasons.add(reason, 1);
            }
        }
        ResetDirection::Received => *received = received.saturating_add(1),
    }
}

impl Resets {
    pub fn new(enabled: bool) -> Self {
        Resets {
            enabled,
            ..Default::default()
        }
    }

    /// A reset from the kernel: to its connection if known, else kept
    /// until its connection closes. Only a reset sent by a socket already
    /// in CLOSE (an abort's) belongs to a held connection: any other comes
    /// from a live socket, which may have taken a held one's address. An
    /// abort's reset follows its CLOSE at once, so the search from the
    /// newest held record ends within a few.
    pub fn reset(&mut self, r: &Reset, tracker: &mut Tracker) {
        let after_close = r.direction == ResetDirection::Sent && r.state == Some(TcpState::Close);
        let held = if after_close {
            let id = self.held_by_sock.get(&r.sock).copied();
            self.examined += u64::from(id.is_some());
            id
        } else {
            None
        };
        let conn = match held {
            Some(id) => Some(tracker.conn_mut(id)),
            None if after_close => match self.handover_of(r) {
                // An abort from FIN_WAIT2: the tracker took its `-> CLOSE`
                // for a hand-over and waits for a timewait socket that
                // never comes; the reset is its all the same.
                Some(id) => tracker.waiting_timewait_mut(id, r.sock),
                None => tracker.get_mut(r.sock),
            },
            None => tracker.get_mut(r.sock),
        };
        if let Some(c) = conn {
            let close = &mut c.close;
            add(
                &mut close.rst_sent,
                &mut close.rst_received,
                &mut close.rst_reasons,
                r,
            );
            self.joined += 1;
            return;
        }
        if !self.pending.contains_key(&r.sock) && self.pending.len() >= MAX_PENDING {
            self.unmatched += 1;
            return;
        }
        let p = self.pending.entry(r.sock).or_insert(Pending {
            first_ns: r.mono_ns,
            ..Default::default()
        });
        add(&mut p.sent, &mut p.received, &mut p.reasons, r);
        p.aborts += u32::from(after_close);
    }

    /// The tracker saw connection `id` (socket `sock`) go on in a timewait
    /// socket at `at_ns`.
    pub fn handed_over(&mut self, id: SlotId, sock: u64, at_ns: u64) {
        if !self.enabled {
            return;
        }
        self.handovers[self.next_handover] = Some(Handover { sock, id, at_ns });
        self.next_handover = (self.next_handover + 1) % RECENT_HANDOVERS;
    }

    /// The recent hand-over an abort's reset `r` follows, if any.
    fn handover_of(&self, r: &Reset) -> Option<SlotId> {
        self.handovers
            .iter()
            .flatten()
            .find(|h| {
                h.sock == r.sock && h.at_ns <= r.mono_ns && r.mono_ns <= h.at_ns + RESET_GRACE_NS
            })
            .map(|h| h.id)
    }

    /// A connection the tracker ended (slot `id`): true if it can be
    /// written now, false if it is held (see the module doc).
    pub fn closed(&mut self, id: SlotId, tracker: &mut Tracker) -> bool {
        if !self.enabled {
            return true;
        }
        let conn = tracker.conn_mut(id);
        // Almost always empty: no hash of the socket per connection then.
        let pending = if self.pending.is_empty() {
            None
        } else {
            self.pending.remove(&conn.sock)
        };
        // An active closer's full socket is freed when its timewait socket
        // takes over: a reset at its address after that is a new socket's
        // (which claims it when it closes), unless it is the abort's own,
        // sent at once by the socket in CLOSE (then there was no timewait
        // socket).
        let gone_at = conn.timewait.map(|tw| tw.closed_ns);
        let next_sockets = |p: &Pending| {
            gone_at.is_some_and(|at| {
                let own_abort =
                    p.aborts == p.sent + p.received && p.first_ns <= at + RESET_GRACE_NS;
                p.first_ns > at && !own_abort
            })
        };
        if let Some(p) = pending.filter(next_sockets) {
            self.pending.insert(conn.sock, p);
        } else if let Some(p) = pending {
            // A reset older than the connection was another socket's at
            // the same address.
            if p.first_ns >= conn.first_seen_ns.min(conn.start_ns) {
                conn.close.rst_sent += p.sent;
                conn.close.rst_received += p.received;
                conn.close.rst_reasons.merge(&p.reasons);
                self.joined += u64::from(p.sent + p.received);
            } else {
                self.unmatched += u64::from(p.sent + p.received);
            }
        }
        // Ended by a timewait socket (or never by the tracepoint): no
        // reset follows.
        if conn.sock == 0 || conn.timewait.is_some() {
            return true;
        }
        let release = conn.state_since_ns + RESET_GRACE_NS;
        self.held_by_sock.insert(conn.sock, id);
        self.held.push_back(Held {
            id,
            sock: conn.sock,
            release_ns: release,
        });
        false
    }

    /// The next held connection whose grace ended before `drain_start_ns`
    /// (the start of a drain that emptied the ring buffer), in close order.
    pub fn pop_due(&mut self, drain_start_ns: u64) -> Option<SlotId> {
        if self
            .held
            .front()
            .is_some_and(|h| h.release_ns <= drain_start_ns)
        {
            return self.pop_any();
        }
        None
    }

    /// The held connections [`Resets::pop_due`] would give, in its order,
    /// without taking them (to prefetch their slots).
    pub fn due(&self, drain_start_ns: u64) -> impl Iterator<Item = SlotId> + '_ {
        self.held
            .iter()
            .take_while(move |h| h.release_ns <= drain_start_ns)
            .map(|h| h.id)
    }

    /// Resets of unknown sockets past their time are counted unmatched.
    pub fn expire_pending(&mut self, drain_start_ns: u64) {
        if self.pending.is_empty() {
            return;
        }
        let mut dropped = 0u64;
        self.pending.retain(|_, p| {
            let keep = p.first_ns + PENDING_TTL_NS > drain_start_ns;
            if !keep {
                dropped += u64::from(p.sent + p.received);
            }
            keep
        });
        self.unmatched += dropped;
    }

    /// The next held connection, whatever its grace (at exit).
    pub fn pop_any(&mut self) -> Option<SlotId> {
        let Held { id, sock, .. } = self.held.pop_front()?;
        if let Entry::Occupied(e) = self.held_by_sock.entry(sock) {
            if *e.get() == id {
                e.remove();
            }
        }
        Some(id)
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// When the last held connection may be written (CLOCK_MONOTONIC).
    pub fn last_release_ns(&self) -> Option<u64> {
        self.held.back().map(|h| h.release_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::events::{tests::sample, Source, TcpState::*, Transition};
    use crate::track::tracker::TimewaitEnd;

    const MS: u64 = 1_000_000;

    fn tr(
        ms: u64,
        sock: u64,
        old: crate::kernel::events::TcpState,
        new: crate::kernel::events::TcpState,
    ) -> Transition {
        Transition {
            mono_ns: ms * MS,
            sock,
            old,
            new,
            old_state_ns: None,
            ..sample()
        }
    }

    /// The connection the transition ended.
    fn ended(t: &mut Tracker, tr: &Transition) -> SlotId {
        t.on_transition(tr).closed[0]
    }

    /// Socket `sock` (local port `lport`) closes first, from 0 to 4 ms:
    /// its last transition, `FIN_WAIT2 -> CLOSE`, reads as a hand-over to
    /// a timewait socket. Its outcome.
    fn active_close(t: &mut Tracker, sock: u64, lport: u16) -> crate::track::tracker::Outcome {
        let on = |ms, old, new| Transition {
            lport,
            ..tr(ms, sock, old, new)
        };
        t.on_transition(&on(0, Close, SynSent));
        t.on_transition(&on(1, SynSent, Established));
        t.on_transition(&on(2, Established, FinWait1));
        t.on_transition(&on(3, FinWait1, FinWait2));
        t.on_transition(&on(4, FinWait2, Close))
    }

    /// What `pop_due` releases at `at`, copied out; `due` must have listed
    /// the same, in the same order.
    fn due(r: &mut Resets, t: &mut Tracker, at: u64) -> Vec<crate::track::tracker::Connection> {
        let listed: Vec<SlotId> = r.due(at).collect();
        let (mut popped, mut out) = (Vec::new(), Vec::new());
        while let Some(id) = r.pop_due(at) {
            popped.push(id);
            out.push(t.take(id));
        }
        assert_eq!(listed, popped);
        r.expire_pending(at);
        out
    }

    fn all(r: &mut Resets, t: &mut Tracker) -> Vec<crate::track::tracker::Connection> {
        let mut out = Vec::new();
        while let Some(id) = r.pop_any() {
            out.push(t.take(id));
        }
        out
    }

    fn reset(ms: u64, sock: u64, direction: ResetDirection) -> Reset {
        Reset {
            mono_ns: ms * MS,
            sock,
            direction,
            // An abort's reset goes out after the socket's CLOSE.
            state: (direction == ResetDirection::Sent).then_some(Close),
            // TCP_ABORT_ON_CLOSE
            reason: (direction == ResetDirection::Sent).then_some(11),
        }
    }

    #[test]
    fn an_abort_reset_after_the_close_joins_the_held_record() {
        let mut t = Tracker::new(8);
        let mut r = Resets::new(true);
        t.on_transition(&tr(0, 1, Close, SynSent));
        t.on_transition(&tr(1, 1, SynSent, Established));
        let c = ended(&mut t, &tr(10, 1, Established, Close));
        assert!(!r.closed(c, &mut t), "held for its grace");
        r.reset(&reset(10, 1, ResetDirection::Sent), &mut t);
        assert!(due(&mut r, &mut t, 15 * MS).is_empty(), "grace not over");
        let out = due(&mut r, &mut t, 31 * MS);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].close.rst_sent, out[0].close.rst_received), (1, 0));
        let reasons: Vec<_> = out[0].close.rst_reasons.iter().collect();
        assert_eq!(reasons, [(11, 1)]);
        assert_eq!((r.joined, r.unmatched), (1, 0));
    }

    #[test]
    fn a_reset_before_the_connection_is_known_waits_for_it() {
        let mut t = Tracker::new(8);
        let mut r = Resets::new(true);
        // Refused connect in batch mode: the reset comes first.
        r.reset(&reset(2, 7, ResetDirection::Received), &mut t);
        t.on_transition(&tr(1, 7, Close, SynSent));
        let c = ended(&mut t, &tr(2, 7, SynSent, Close));
        assert!(!r.closed(c, &mut t));
        let out = all(&mut r, &mut t);
        assert_eq!(out[0].close.rst_received, 1);
        // A live connection gets its reset directly.
        t.on_transition(&tr(5, 8, Close, SynSent));
        r.reset(&reset(6, 8, ResetDirection::Sent), &mut t);
        assert_eq!(t.get(8).unwrap().close.rst_sent, 1);
        // A sent reset that waited for its connection keeps its reason.
        r.reset(&reset(7, 9, ResetDirection::Sent), &mut t);
        t.on_transition(&tr(7, 9, Close, SynSent));
        let c = ended(&mut t, &tr(8, 9, SynSent, Close));
        assert!(!r.closed(c, &mut t));
        let out = all(&mut r, &mut t);
        let reasons: Vec<_> = out[0].close.rst_reasons.iter().collect();
        assert_eq!((out[0].close.rst_sent, reasons), (1, vec![(11, 1)]));
    }

    #[test]
    fn a_live_socket_at_a_held_ones_address_gets_its_own_reset() {
        let mut t = Tracker::new(8);
        let mut r = Resets::new(true);
        t.on_transition(&tr(0, 3, Close, SynSent));
        t.on_transition(&tr(1, 3, SynSent, Established));
        let c = ended(&mut t, &tr(10, 3, Established, Close));
        assert!(!r.closed(c, &mut t));
        // Address 3 is reused by a connect that is refused (batched: the
        // agent does not know the socket yet).
        r.reset(&reset(11, 3, ResetDirection::Received), &mut t);
        t.on_transition(&tr(11, 3, Close, SynSent));
        let c = ended(&mut t, &tr(11, 3, SynSent, Close));
        assert!(!r.closed(c, &mut t));
        let out = all(&mut r, &mut t);
        assert_eq!(out[0].close.rst_received, 0, "the held one received none");
        assert_eq!(out[1].close.rst_received, 1);
    }

    /// An active closer's socket address is free once its timewait socket
    /// takes over: a reset of the next socket there, the agent not knowing
    /// it yet (batched), is not the waiting connection's.
    #[test]
    fn a_reset_after_a_timewait_hand_over_is_the_next_sockets() {
        let mut t = Tracker::new(8);
        let mut r = Resets::new(true);
        assert!(active_close(&mut t, 4, sample().lport).closed.is_empty());
        // The next socket at address 4 is reset; the waiting connection's
        // TIME_WAIT then ends.
        r.reset(&reset(50, 4, ResetDirection::Received), &mut t);
        let id = t.timewait_mut().next().unwrap().0;
        t.end_timewait(id, 60 * MS, TimewaitEnd::Reused, Source::Reuse);
        assert!(r.closed(id, &mut t), "no reset follows a timewait socket");
        assert_eq!(t.conn(id).close.rst_received, 0);
        t.take(id);
        // The next socket claims it when it closes.
        t.on_transition(&tr(49, 4, Close, SynSent));
        let c = ended(&mut t, &tr(50, 4, SynSent, Close));
        assert!(!r.closed(c, &mut t));
        let out = all(&mut r, &mut t);
        assert_eq!(out[0].close.rst_received, 1);
        assert_eq!((r.joined, r.unmatched), (1, 0));
    }

    /// A close in FIN_WAIT2 with `TCP_LINGER2` < 0 aborts: the tracepoint
    /// shows `FIN_WAIT2 -> CLOSE` as for a timewait hand-over, and the
    /// abort's reset comes just after; it is the connection's.
    #[test]
    fn an_abort_from_fin_wait2_keeps_its_reset() {
        let mut t = Tracker::new(8);
        let mut r = Resets::new(true);
        assert!(active_close(&mut t, 5, sample().lport).closed.is_empty());
        r.reset(&reset(4, 5, ResetDirection::Sent), &mut t);
        let id = t.timewait_mut().next().unwrap().0;
        t.end_timewait(id, 2_000 * MS, TimewaitEnd::NotFound, Source::Reuse);
        assert!(r.closed(id, &mut t));
        assert_eq!(t.conn(id).close.rst_sent, 1);
        assert_eq!((r.joined, r.unmatched), (1, 0));
    }

    /// The same abort, its hand-over told: the reset joins at once, so a
    /// timewait poll that decides `not_found` long after (polls stretch
    /// on a busy host) still finds it, after unknown resets expired.
    #[test]
    fn an_abort_from_fin_wait2_joins_at_once_whenever_its_end_is_decided() {
        let mut t = Tracker::new(8);
        let mut r = Resets::new(true);
        let out = active_close(&mut t, 5, sample().lport);
        let id = out
            .handed_over
            .expect("a hand-over, as the tracepoint shows it");
        r.handed_over(id, 5, 4 * MS);
        // Other sockets' hand-overs, on 4-tuples of their own, between.
        for sock in 10..12 {
            let o = active_close(&mut t, sock, 40_000 + sock as u16);
            r.handed_over(o.handed_over.unwrap(), sock, 4 * MS);
        }
        r.reset(&reset(4, 5, ResetDirection::Sent), &mut t);
        assert_eq!(t.conn(id).close.rst_sent, 1);
        assert_eq!(r.joined, 1);
        r.expire_pending(4 * MS + 2 * PENDING_TTL_NS);
        t.end_timewait(id, 12_000 * MS, TimewaitEnd::NotFound, Source::SockDiag);
        assert!(r.closed(id, &mut t));
        assert_eq!(t.conn(id).close.rst_sent, 1);
        assert_eq!((r.joined, r.unmatched), (1, 0));
        // A reset sent after CLOSE at the address but past the grace is
        // not the abort's.
        r.reset(&reset(40, 10, ResetDirection::Sent), &mut t);
        assert_eq!(r.joined, 1);
    }

    #[test]
    fn unclaimed_and_stale_resets_are_counted_unmatched() {
        let mut t = Tracker::new(8);
        let mut r = Resets::new(true);
        r.reset(&reset(1, 99, ResetDirection::Sent), &mut t);
        assert!(due(&mut r, &mut t, 2 * MS).is_empty());
        assert_eq!(r.unmatched, 0);
        due(&mut r, &mut t, MS + PENDING_TTL_NS);
        assert_eq!(r.unmatched, 1);
        // Older than the connection at the same address: not its reset.
        r.reset(&reset(1, 5, ResetDirection::Received), &mut t);
        t.on_transition(&tr(100, 5, Close, SynSent));
        let c = ended(&mut t, &tr(101, 5, SynSent, Close));
        r.closed(c, &mut t);
        assert_eq!(all(&mut r, &mut t)[0].close.rst_received, 0);
        assert_eq!(r.unmatched, 2);
    }

    #[test]
    fn disabled_or_timewait_ended_records_pass_at_once() {
        let mut t = Tracker::new(8);
        t.on_transition(&tr(0, 1, Close, SynSent));
        let c = ended(&mut t, &tr(1, 1, SynSent, Close));
        assert!(Resets::new(false).closed(c, &mut t));
        t.conn_mut(c).timewait = Some(Default::default());
        assert!(Resets::new(true).closed(c, &mut t));
    }

    /// Joins cost the same with 50,000 entries as with one: resets find
    /// their held connection, deaths and reuses their waiting one, by
    /// index (counted: one connection looked at per join).
    #[test]
    fn joins_do_not_walk_the_tables() {
        const N: u64 = 50_000;
        let mut t = Tracker::new(2 * N as usize + 16);
        let mut r = Resets::new(true);
        let conn = |sock: u64, port: u16, ms: u64, old, new| Transition {
            mono_ns: ms * MS,
            sock,
            lport: port,
            old,
            new,
            old_state_ns: None,
            ..sample()
        };
        // N connections waiting for their timewait socket (sockets 1..=N),
        // N aborted ones held for their reset (sockets N+1..=2N).
        for i in 1..=N {
            let port = (i % 60_000) as u16 + 1;
            let rport = (i / 60_000) as u16 + 1;
            let c = |ms, old, new| Transition {
                rport,
                ..conn(i, port, ms, old, new)
            };
            t.on_transition(&c(1, Close, SynSent));
            t.on_transition(&c(2, SynSent, Established));
            t.on_transition(&c(3, Established, FinWait1));
            t.on_transition(&c(4, FinWait1, FinWait2));
            t.on_transition(&c(5, FinWait2, Close));
            let a = |ms, old, new| Transition {
                rport: 9,
                ..conn(N + i, port, ms, old, new)
            };
            t.on_transition(&a(1, Close, SynSent));
            let id = t.on_transition(&a(6, SynSent, Close)).closed[0];
            assert!(!r.closed(id, &mut t));
        }
        assert_eq!(t.timewait_pending() as u64, N);
        assert_eq!(r.held() as u64, N);
        let (t0, r0) = (t.examined, r.examined);
        // 1,000 aborts' resets, deaths and reuses, spread over the tables.
        for k in 0..1_000u64 {
            let i = 1 + k * (N / 1_000);
            r.reset(&reset(7, N + i, ResetDirection::Sent), &mut t);
            let key = Tracker::key_of(&Transition {
                rport: (i / 60_000) as u16 + 1,
                ..conn(i, (i % 60_000) as u16 + 1, 5, FinWait2, Close)
            });
            t.timewait_died(&key, 8 * MS, MS);
        }
        eprintln!(
            "1,000 resets looked at {} held connections, 1,000 deaths {} waiting ones",
            r.examined - r0,
            t.examined - t0
        );
        assert_eq!(r.examined - r0, 1_000);
        assert_eq!(r.joined, 1_000);
        assert!(t.examined - t0 <= 1_000);
    }
}
