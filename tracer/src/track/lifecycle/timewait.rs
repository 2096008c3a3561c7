//! The timewait polls: what to ask the worker about the connections
//! waiting for their timewait socket, and what its answer does to them.

use std::collections::HashMap;

use super::{Lifecycle, EXPIRY_TOLERANCE_NS, TIMEWAIT_LEN_NS};
use crate::{
    clock::monotonic_ns,
    kernel::events::{Family, Source, TcpState},
    track::diag::MAX_FILTER_TUPLES,
    track::tracker::{Derived, SlotId, TimewaitEnd, Tracker, PREFETCH_RUN},
    track::worker::{NetnsDump, NetnsQuery, TimewaitDump, TimewaitQuery, TimewaitSocket, Wanted},
};

/// What one poll's answer produced, in output order.
#[derive(Default)]
pub struct PollResult {
    pub derived: Vec<Derived>,
    /// Connections whose entry into TIME_WAIT this poll dated: their
    /// close handshake is over.
    pub in_time_wait: Vec<SlotId>,
    /// Connections ended (their slots, to write and release).
    pub closed: Vec<SlotId>,
}

/// What a timewait poll needs.
pub enum TimewaitPoll {
    /// Nothing is waiting, or a poll is in flight.
    Nothing,
    /// sock_diag is unavailable: everything waiting ended, unknown how.
    Resolved(PollResult),
    /// Ask the worker.
    Ask(TimewaitQuery),
}

impl Lifecycle {
    /// The next timewait poll: what to ask the worker about the
    /// connections waiting for their timewait socket.
    pub fn timewait_poll(&mut self, tracker: &mut Tracker) -> TimewaitPoll {
        if self.polling || !tracker.has_timewait() {
            return TimewaitPoll::Nothing;
        }
        if !self.available {
            let mut result = PollResult::default();
            let ids: Vec<(SlotId, u64)> = tracker
                .timewait_mut()
                .map(|(id, c)| (id, c.timewait.map_or(0, |t| t.closed_ns)))
                .collect();
            for (id, closed) in ids {
                tracker.end_timewait(id, closed, TimewaitEnd::Unknown, Source::SockDiag);
                result.closed.push(id);
            }
            return TimewaitPoll::Resolved(result);
        }
        // Per namespace and family: how many wait, and the first few
        // (their ports let the kernel filter the dump; their tasks open
        // the namespace).
        type Pending = (NetnsQuery, [usize; 2], [Vec<SlotId>; 2]);
        let mut by_netns: HashMap<u32, Pending> = HashMap::new();
        for e in tracker.timewait_entries() {
            let (_, counts, first) = by_netns.entry(e.netns).or_insert_with(|| {
                let q = NetnsQuery {
                    inum: e.netns,
                    ..Default::default()
                };
                (q, [0; 2], Default::default())
            });
            let f = usize::from(e.family == Family::Ipv6);
            counts[f] += 1;
            if first[f].len() < MAX_FILTER_TUPLES {
                first[f].push(e.id);
            }
        }
        let mut namespaces = Vec::with_capacity(by_netns.len());
        for (_, (mut q, counts, first)) in by_netns {
            for (f, &n) in counts.iter().enumerate() {
                q.families[f] = match n {
                    0 => Wanted::Nothing,
                    n if n <= MAX_FILTER_TUPLES => Wanted::Ports(Vec::with_capacity(n)),
                    _ => Wanted::All,
                };
            }
            for id in first.into_iter().flatten() {
                let c = tracker.conn(id);
                let f = usize::from(c.family == Family::Ipv6);
                if let Wanted::Ports(ports) = &mut q.families[f] {
                    ports.push((c.lport, c.rport));
                }
                if let Some(h) = c.task_hint {
                    if q.hints.len() < 8 && !q.hints.contains(&h) {
                        q.hints.push(h);
                    }
                }
            }
            namespaces.push(q);
        }
        self.polling = true;
        TimewaitPoll::Ask(TimewaitQuery {
            poll: tracker.begin_poll(),
            asked_ns: monotonic_ns(),
            namespaces,
        })
    }

    /// Applies a poll's answer at once (at exit, and in tests): see
    /// [`Lifecycle::begin_apply`].
    pub fn apply_timewait(&mut self, tracker: &mut Tracker, dump: TimewaitDump) -> PollResult {
        self.begin_apply(dump);
        // An unbounded step applies all of it.
        self.apply_step(tracker, usize::MAX)
    }

    /// Takes a poll's answer, to apply with [`Lifecycle::apply_step`]: it
    /// joins the connections that were waiting to their timewait sockets
    /// (dating their entry into TIME_WAIT) and ends those whose socket is
    /// gone. No new poll is asked until it is all applied.
    pub fn begin_apply(&mut self, dump: TimewaitDump) {
        self.counters.polls += 1;
        self.counters.poll_ns += dump.cpu_ns;
        self.counters.errors += dump.errors;
        self.applying = Some(Applying {
            poll: dump.poll,
            done_ns: dump.done_ns,
            namespaces: dump.namespaces,
            netns: 0,
            socket: 0,
            answered: HashMap::new(),
            unsighted: None,
            judged: 0,
        });
    }

    /// A poll's answer is being applied.
    pub fn applying(&self) -> bool {
        self.applying.is_some()
    }

    /// Applies the next `budget` sockets of the answer (sightings first,
    /// then the waiting connections it did not show): a slice whose
    /// records the caller writes before the ring buffer's next events, so
    /// that a poll of tens of thousands of connections never holds up the
    /// drain. Between slices the tracker may change: a connection that a
    /// new one reused, or whose slot was freed, is no longer judged (the
    /// index says so), and a connection that began to wait since the poll
    /// was asked never is.
    pub fn apply_step(&mut self, tracker: &mut Tracker, budget: usize) -> PollResult {
        let mut result = PollResult::default();
        let Some(a) = self.applying.as_mut() else {
            return result;
        };
        let mut left = budget;
        while left > 0 && a.netns < a.namespaces.len() {
            let (inum, d) = &a.namespaces[a.netns];
            let inum = *inum;
            match d {
                NetnsDump::Failed => {}
                NetnsDump::Gone => {
                    a.answered.insert(inum, false);
                }
                NetnsDump::Dumped {
                    sockets,
                    overflowed,
                } => {
                    a.answered.insert(inum, *overflowed);
                    let n = left.min(sockets.len() - a.socket);
                    for run in sockets[a.socket..a.socket + n].chunks(PREFETCH_RUN) {
                        for s in run {
                            tracker.prefetch_sighting(&s.key(inum));
                        }
                        for s in run {
                            sighted(tracker, inum, s, a.poll, &mut result);
                        }
                    }
                    a.socket += n;
                    left -= n;
                    if a.socket < sockets.len() {
                        return result;
                    }
                }
            }
            a.netns += 1;
            a.socket = 0;
        }
        // Out of budget before the last namespace.
        if a.netns < a.namespaces.len() {
            return result;
        }
        let poll = a.poll;
        let unsighted = a
            .unsighted
            .get_or_insert_with(|| tracker.timewait_unsighted(poll));
        let n = left.min(unsighted.len() - a.judged);
        for run in unsighted[a.judged..a.judged + n].chunks(PREFETCH_RUN) {
            for &id in run {
                tracker.prefetch(id);
            }
            for &id in run {
                if tracker.still_unsighted(id, poll) {
                    unsighted_judged(tracker, id, a.done_ns, &a.answered, &mut result);
                }
            }
        }
        a.judged += n;
        if a.judged == unsighted.len() {
            self.applying = None;
            self.polling = false;
        }
        result
    }
}

/// A poll's answer on its way into the tracker.
pub(super) struct Applying {
    poll: u32,
    done_ns: u64,
    namespaces: Vec<(u32, NetnsDump)>,
    /// The next namespace and socket to apply.
    netns: usize,
    socket: usize,
    /// Namespaces answered so far, and whether each counted an overflow.
    answered: HashMap<u32, bool>,
    /// Once every sighting is applied: the connections the poll judges
    /// and did not find, and how many of them are judged.
    unsighted: Option<Vec<SlotId>>,
    judged: usize,
}

/// Poll `poll` found timewait socket `s` in namespace `inum`: its
/// connection, if waiting, is joined to it.
fn sighted(
    tracker: &mut Tracker,
    inum: u32,
    s: &TimewaitSocket,
    poll: u32,
    result: &mut PollResult,
) {
    let key = s.key(inum);
    let Some(id) = tracker.timewait_sighted(&key, poll) else {
        return;
    };
    let c = tracker.conn_mut(id);
    let Some(mut tw) = c.timewait else { return };
    tw.seen = true;
    let expiry = s.expires_ns;
    let mut settled = false;
    if s.state == Some(TcpState::TimeWait) {
        if c.state != TcpState::TimeWait {
            // Entered TIME_WAIT when its 60 s timer was armed.
            let entered = expiry.saturating_sub(TIMEWAIT_LEN_NS).max(c.state_since_ns);
            let old = c.state;
            let in_old = entered - c.state_since_ns;
            c.advance(TcpState::TimeWait, entered);
            let d = c.derived(
                old,
                TcpState::TimeWait,
                entered,
                Some(in_old),
                Source::SockDiag,
            );
            result.derived.push(c.with_context(d));
            result.in_time_wait.push(id);
        }
        // Once known, the scheduled expiry is kept: a timer
        // that fires late (timer wheel) reports 0 ms left.
        if tw.expires_ns().is_none() {
            tw.set_expires_ns(expiry);
        }
        settled = true;
    } else {
        tw.set_expires_ns(expiry); // the FIN_WAIT2 timeout
    }
    c.timewait = Some(tw);
    if settled {
        tracker.timewait_settled(&key);
    }
}

/// Connection `id` was waiting and the poll done at `now` did not find
/// its timewait socket: it ends now, or at the next poll that does not
/// find it either.
fn unsighted_judged(
    tracker: &mut Tracker,
    id: SlotId,
    now: u64,
    answered: &HashMap<u32, bool>,
    result: &mut PollResult,
) {
    let c = tracker.conn_mut(id);
    let Some(&overflowed) = answered.get(&c.netns) else {
        return;
    };
    let Some(mut tw) = c.timewait else { return };
    let expired = tw
        .expires_ns()
        .filter(|&e| tw.seen && now + EXPIRY_TOLERANCE_NS >= e);
    let decided = if let (Some(k), 1..) = (tw.killed_ns(), tw.missing_polls) {
        // Killed early, seen by fentry, and no reuse followed.
        Some((k, TimewaitEnd::Early, Source::Fentry))
    } else if let (Some(e), 0, None) = (expired, tw.missing_polls, tw.killed_ns()) {
        Some((e, TimewaitEnd::Expired, Source::SockDiag))
    } else if tw.missing_polls == 0 {
        // Gone before its timer, or never seen: decided at the
        // next poll, from what this one saw. A new connection that
        // took its 4-tuple (a reuse) may still wait in the ring
        // buffer; so may its death event, with fentry.
        tw.missing_since_ns = now;
        tw.missing_overflowed = overflowed;
        None
    } else if tw.seen {
        Some((tw.missing_since_ns, TimewaitEnd::Early, Source::SockDiag))
    } else if tw.missing_overflowed {
        Some((tw.closed_ns, TimewaitEnd::NotCreated, Source::SockDiag))
    } else {
        Some((tw.closed_ns, TimewaitEnd::NotFound, Source::SockDiag))
    };
    match decided {
        Some((at, end, source)) => {
            if let Some(d) = tracker.end_timewait(id, at, end, source) {
                result.derived.push(tracker.conn(id).with_context(d));
            }
            result.closed.push(id);
        }
        None => {
            tw.missing_polls += 1;
            c.timewait = Some(tw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::events::{tests::sample, Transition};
    use crate::track::{tracker::TupleKey, worker::TimewaitSocket};
    use TcpState::*;

    const MS: u64 = 1_000_000;

    /// Socket `sock` (local port `port`) closes actively at `ms`.
    fn active_close(t: &mut Tracker, sock: u64, port: u16, ms: u64) -> TupleKey {
        let tr = |at: u64, old, new| Transition {
            mono_ns: at * MS,
            sock,
            lport: port,
            old,
            new,
            old_state_ns: None,
            ..sample()
        };
        t.on_transition(&tr(ms - 3, Close, SynSent));
        t.on_transition(&tr(ms - 2, SynSent, Established));
        t.on_transition(&tr(ms - 1, Established, FinWait1));
        t.on_transition(&tr(ms - 1, FinWait1, FinWait2));
        assert!(t.on_transition(&tr(ms, FinWait2, Close)).closed.is_empty());
        Tracker::key_of(&tr(ms, FinWait2, Close))
    }

    fn found(key: &TupleKey, state: TcpState, expires_ns: u64) -> TimewaitSocket {
        TimewaitSocket {
            family: key.family,
            laddr: key.laddr,
            lport: key.lport,
            raddr: key.raddr,
            rport: key.rport,
            state: Some(state),
            expires_ns,
        }
    }

    fn ask(l: &mut Lifecycle, t: &mut Tracker) -> TimewaitQuery {
        match l.timewait_poll(t) {
            TimewaitPoll::Ask(q) => q,
            _ => panic!("expected a query"),
        }
    }

    fn answer(
        q: &TimewaitQuery,
        sockets: Vec<TimewaitSocket>,
        overflowed: bool,
        at_ms: u64,
    ) -> TimewaitDump {
        TimewaitDump {
            poll: q.poll,
            asked_ns: q.asked_ns,
            done_ns: at_ms * MS,
            namespaces: vec![(
                q.namespaces[0].inum,
                NetnsDump::Dumped {
                    sockets,
                    overflowed,
                },
            )],
            cpu_ns: 0,
            errors: 0,
        }
    }

    #[test]
    fn a_poll_dates_time_wait_and_ends_what_it_does_not_find() {
        let mut t = Tracker::new(64);
        let mut l = Lifecycle::detached();
        let a = active_close(&mut t, 1, 1001, 100);
        let b = active_close(&mut t, 2, 1002, 100);
        let q = ask(&mut l, &mut t);
        assert!(
            matches!(l.timewait_poll(&mut t), TimewaitPoll::Nothing),
            "one poll at a time"
        );
        assert_eq!(q.namespaces.len(), 1);
        let Wanted::Ports(mut ports) = q.namespaces[0].families[0].clone() else {
            panic!("few enough for a filtered dump");
        };
        ports.sort();
        assert_eq!(ports, vec![(1001, 80), (1002, 80)]);
        // Closed while the poll was in flight: not judged by it.
        let c = active_close(&mut t, 3, 1003, 150);
        // `a` entered TIME_WAIT at 120 ms (its timer fires 60 s later);
        // `b` and `c` are not in the dump.
        let tw_a = || vec![found(&a, TimeWait, 60_120 * MS)];
        let r = l.apply_timewait(&mut t, answer(&q, tw_a(), false, 200));
        assert_eq!(r.derived.len(), 1);
        let d = r.derived[0].t;
        assert_eq!((d.old, d.new, d.mono_ns), (FinWait2, TimeWait, 120 * MS));
        assert_eq!(d.old_state_ns, Some(20 * MS));
        assert!(r.closed.is_empty(), "a first miss decides nothing yet");
        assert_eq!(t.timewait_pending(), 3);

        // Next poll: `b` missing again, with no new connection on its
        // 4-tuple meanwhile: it had no timewait socket. `c` is missing in
        // an overflowing namespace: a first miss.
        let q = ask(&mut l, &mut t);
        let r = l.apply_timewait(&mut t, answer(&q, tw_a(), true, 1_200));
        assert!(r.derived.is_empty());
        assert_eq!(r.closed.len(), 1);
        let ended = t.take(r.closed[0]);
        assert_eq!(ended.key(), b);
        assert_eq!(ended.timewait.unwrap().end, Some(TimewaitEnd::NotFound));
        // Then `c`: no timewait socket was made for it (the overflow seen
        // at its first miss).
        let q = ask(&mut l, &mut t);
        let r = l.apply_timewait(&mut t, answer(&q, tw_a(), false, 2_200));
        assert_eq!(r.closed.len(), 1);
        let ended = t.take(r.closed[0]);
        assert_eq!(ended.key(), c);
        assert_eq!(ended.timewait.unwrap().end, Some(TimewaitEnd::NotCreated));
        assert_eq!(t.timewait_pending(), 1, "a waits out its TIME_WAIT");

        // After its expiry `a` is gone: it expired at its timer, at once.
        let q = ask(&mut l, &mut t);
        let r = l.apply_timewait(&mut t, answer(&q, vec![], false, 61_000));
        assert_eq!(r.closed.len(), 1);
        let ended = t.take(r.closed[0]);
        assert_eq!(ended.timewait.unwrap().end, Some(TimewaitEnd::Expired));
        assert_eq!(ended.state_ns(TimeWait), Some(60_000 * MS));
        assert_eq!(r.derived[0].t.mono_ns, 60_120 * MS);
        assert!(!t.has_timewait());
    }

    #[test]
    fn an_answer_applied_in_slices_judges_only_what_still_waits() {
        let mut t = Tracker::new(64);
        let mut l = Lifecycle::detached();
        let keys: Vec<TupleKey> = (0..4)
            .map(|i| active_close(&mut t, 10 + i, 3000 + i as u16, 100))
            .collect();
        let q = ask(&mut l, &mut t);
        // 0 and 1 in TIME_WAIT; 2 and 3 not in the dump.
        let sockets = keys[..2]
            .iter()
            .map(|k| found(k, TimeWait, 60_120 * MS))
            .collect();
        l.begin_apply(answer(&q, sockets, false, 200));
        for _ in 0..2 {
            let r = l.apply_step(&mut t, 1);
            assert_eq!(r.in_time_wait.len(), 1, "one socket per slice");
        }
        assert!(l.applying() && l.polling, "2 and 3 are still to judge");
        assert!(matches!(l.timewait_poll(&mut t), TimewaitPoll::Nothing));
        // Between slices: a new connection takes 1's 4-tuple (a reuse);
        // 2 ends, and its slot goes to a connection that closes after the
        // poll was asked.
        let reuse = Transition {
            mono_ns: 210 * MS,
            sock: 99,
            lport: keys[1].lport,
            old: Listen,
            new: SynRecv,
            old_state_ns: None,
            ..sample()
        };
        let o = t.on_transition(&reuse);
        assert_eq!(o.closed.len(), 1, "1 ended as reused");
        t.release(o.closed[0]);
        let two = t
            .timewait_mut()
            .find(|(_, c)| c.key() == keys[2])
            .map(|(id, _)| id)
            .unwrap();
        t.end_timewait(two, 210 * MS, TimewaitEnd::Early, Source::SockDiag);
        t.release(two);
        let late = active_close(&mut t, 20, 3010, 220);
        let late_id = t
            .timewait_mut()
            .find(|(_, c)| c.key() == late)
            .map(|(id, _)| id);
        assert_eq!(late_id, Some(two), "the freed slot is taken again");
        let mut derived = 0;
        let mut closed = 0;
        while l.applying() {
            let r = l.apply_step(&mut t, 1);
            derived += r.derived.len();
            closed += r.closed.len();
        }
        assert_eq!(
            (derived, closed),
            (0, 0),
            "3's first miss decides nothing yet"
        );
        assert!(!l.polling);
        // 0 waits in TIME_WAIT, 3 after one miss, the late one unjudged.
        assert_eq!(t.timewait_pending(), 3);
        let waiting: Vec<TupleKey> = t.timewait_mut().map(|(_, c)| c.key()).collect();
        assert!(waiting.contains(&keys[0]) && waiting.contains(&keys[3]));
        assert!(waiting.contains(&late));
        let (_, c3) = t.timewait_mut().find(|(_, c)| c.key() == keys[3]).unwrap();
        assert_eq!(c3.timewait.unwrap().missing_polls, 1);
        let (_, cl) = t.timewait_mut().find(|(_, c)| c.key() == late).unwrap();
        assert_eq!(cl.timewait.unwrap().missing_polls, 0);
    }

    #[test]
    fn gone_before_its_timer_is_an_early_end_and_many_are_dumped_whole() {
        let mut t = Tracker::new(64);
        let mut l = Lifecycle::detached();
        let keys: Vec<TupleKey> = (0..20)
            .map(|i| active_close(&mut t, 10 + i, 2000 + i as u16, 100))
            .collect();
        let q = ask(&mut l, &mut t);
        assert_eq!(q.namespaces[0].families[0], Wanted::All);
        let all = keys
            .iter()
            .map(|k| found(k, FinWait2, 60_100 * MS))
            .collect();
        let r = l.apply_timewait(&mut t, answer(&q, all, false, 150));
        assert!(r.closed.is_empty() && r.derived.is_empty());
        let rest = || {
            keys[1..]
                .iter()
                .map(|k| found(k, TimeWait, 60_300 * MS))
                .collect()
        };
        let q = ask(&mut l, &mut t);
        let r = l.apply_timewait(&mut t, answer(&q, rest(), false, 1_000));
        let entered = r.derived.iter().filter(|d| d.t.new == TimeWait).count();
        assert_eq!(entered, 19, "19 entered TIME_WAIT");
        assert!(r.closed.is_empty());
        let q = ask(&mut l, &mut t);
        let r = l.apply_timewait(&mut t, answer(&q, rest(), false, 2_000));
        assert_eq!(r.closed.len(), 1);
        let ended = t.take(r.closed[0]);
        assert_eq!(ended.key(), keys[0]);
        assert_eq!(ended.timewait.unwrap().end, Some(TimewaitEnd::Early));
        assert_eq!(
            ended.state_since_ns,
            1_000 * MS,
            "dated by the poll that first missed it"
        );
    }

    /// A poll may miss a timewait socket whose 4-tuple a new connection
    /// just took, before the agent reads that connection's transitions:
    /// the reuse still ends it.
    #[test]
    fn a_reuse_read_after_a_missing_poll_is_still_a_reuse() {
        let mut t = Tracker::new(64);
        let mut l = Lifecycle::detached();
        let a = active_close(&mut t, 1, 1001, 100);
        let q = ask(&mut l, &mut t);
        l.apply_timewait(
            &mut t,
            answer(&q, vec![found(&a, TimeWait, 60_100 * MS)], false, 200),
        );
        let q = ask(&mut l, &mut t);
        assert!(l
            .apply_timewait(&mut t, answer(&q, vec![], false, 2_300))
            .closed
            .is_empty());
        let again = |at: u64, old, new, known: Option<u64>| Transition {
            mono_ns: at * MS,
            sock: 9,
            lport: 1001,
            old,
            new,
            old_state_ns: known.map(|k| k * MS),
            ..sample()
        };
        t.on_transition(&again(2_200, Close, SynSent, None));
        let o = t.on_transition(&again(2_201, SynSent, Established, Some(1)));
        assert_eq!(o.closed.len(), 1);
        let ended = t.take(o.closed[0]);
        assert_eq!(ended.timewait.unwrap().end, Some(TimewaitEnd::Reused));
        assert_eq!(ended.state_since_ns, 2_200 * MS);
    }
}
