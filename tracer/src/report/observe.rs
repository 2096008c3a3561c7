//! What every transition feeds besides the output: the summary
//! (`--summary`) and the Prometheus metrics (`--metrics`). They get each
//! transition with the owner the output names
//! ([`crate::agent::Pipeline::emit`]); `tracer summarize` reads the same
//! pairs back from a recording, so both aggregate the same data the same
//! way.
//!
//! A *stay* is the time a connection spent in a state: the `old_state_ns`
//! of the transition that ended it. One case spans two transitions: after
//! an active close the kernel hands the connection over to a timewait
//! socket, which the tracepoint reports as `FIN_WAIT2 -> CLOSE` although
//! the connection stays in FIN_WAIT2 (in the timewait socket) until the
//! agent sees it move on (`FIN_WAIT2 -> TIME_WAIT` or `-> CLOSE`, derived
//! from sock_diag). That stay is kept pending at the hand-over and counted once,
//! whole, when it ends; if the connection turns out to have had no timewait
//! socket, it is counted when its record says so.
//!
//! The live agent's tracker keeps the pending part with the connection
//! and hands it back with the transition that ends the stay
//! ([`Observers::with_tracked_stays`]); a recording has no tracker, so
//! `tracer summarize` keeps it here, by 4-tuple.

use std::{hash::BuildHasher as _, net::IpAddr};

use crate::{
    clock,
    kernel::events::{Family, Source, TcpState, Transition},
    report::group::NamedOwner,
    report::metrics::Recorder,
    report::summary::Summary,
    track::close::{Close, CloseBy, Rst},
    track::tracker::{Connection, TimewaitEnd, Tracker, TupleKey},
    FastMap as HashMap,
};

/// FIN_WAIT2 stays pending at once, at most (one per connection waiting for
/// its timewait socket; the tracker's default capacity). Past it, the part
/// before the hand-over counts as a stay of its own.
const MAX_PENDING_STAYS: usize = 65536;

pub struct Observers {
    pub summary: Option<Summary>,
    pub metrics: Option<Recorder>,
    /// `tracer top`'s running counts (plain additions).
    pub live: Option<crate::top::model::Totals>,
    /// Without tracked stays (`tracer summarize`): FIN_WAIT2 time before
    /// the hand-over, per connection in timewait, by a 64-bit hash of its
    /// namespace and 4-tuple.
    pending_stays: HashMap<u64, u64>,
    tuples: foldhash::fast::RandomState,
    /// The pending parts come with the transitions (the live agent).
    tracked_stays: bool,
}

impl Observers {
    pub fn new(summary: Option<Summary>, metrics: Option<Recorder>) -> Self {
        Observers {
            summary,
            metrics,
            live: None,
            pending_stays: HashMap::default(),
            tuples: Default::default(),
            tracked_stays: false,
        }
    }

    /// The live agent's: the part of a FIN_WAIT2 stay before the hand-over
    /// comes with the derived transition that ends the stay, and with the
    /// record of a connection that had no timewait socket (the tracker
    /// keeps it), instead of a table by 4-tuple (two look-ups missing the
    /// caches per active close).
    pub fn with_tracked_stays(mut self) -> Self {
        self.tracked_stays = true;
        self
    }

    /// Transition `t` of a socket owned by `owner` (as the output names it).
    /// `stay_before_ns`: with tracked stays, a derived transition's part of
    /// its FIN_WAIT2 stay before the hand-over ([`crate::track::tracker::Derived`]).
    pub fn transition(
        &mut self,
        t: &Transition,
        owner: &Option<NamedOwner>,
        stay_before_ns: Option<u64>,
    ) {
        if let Some(l) = &mut self.live {
            l.transition(t.new);
        }
        if self.summary.is_none() && self.metrics.is_none() {
            return;
        }
        let t = self.whole_stay(t, stay_before_ns);
        if let Some(m) = &mut self.metrics {
            m.transition(&t, owner.as_ref());
        }
        if let Some(s) = &mut self.summary {
            s.transition(&t, owner.as_ref());
        }
    }

    /// `t` with `old_state_ns` covering the whole stay it ended: none at a
    /// hand-over to a timewait socket (the stay goes on), the part before
    /// it added when the stay ends in the timewait socket.
    fn whole_stay(&mut self, t: &Transition, stay_before_ns: Option<u64>) -> Transition {
        let mut t = *t;
        if t.old != TcpState::FinWait2 {
            return t;
        }
        if self.tracked_stays {
            if t.source == Source::Tracepoint {
                if t.new == TcpState::Close {
                    // Pending: the tracker keeps it with the connection.
                    t.old_state_ns = None;
                }
            } else if let Some(before) = stay_before_ns {
                t.old_state_ns = Some(before + t.old_state_ns.unwrap_or(0));
            }
            return t;
        }
        let key = self.tuples.hash_one(key_of(
            t.netns, t.family, t.laddr, t.lport, t.raddr, t.rport,
        ));
        if t.source == Source::Tracepoint && t.new == TcpState::Close {
            if let Some(ns) = t.old_state_ns {
                if self.pending_stays.len() < MAX_PENDING_STAYS {
                    self.pending_stays.insert(key, ns);
                    t.old_state_ns = None;
                }
            }
        } else if t.source != Source::Tracepoint {
            if let Some(before) = self.pending_stays.remove(&key) {
                t.old_state_ns = Some(before + t.old_state_ns.unwrap_or(0));
            }
        }
        t
    }

    /// A connection's record was written (its owner as the output named
    /// it): if it had no timewait socket after all, its pending FIN_WAIT2
    /// stay ended at the hand-over; and its close is counted by class.
    pub fn connection(&mut self, c: &Connection, owner: Option<&NamedOwner>, close: &Close) {
        let end = c.timewait.and_then(|tw| tw.end);
        if self.tracked_stays {
            let before = c.timewait.and_then(|tw| tw.stay_before_ns());
            if let Some(ns) = before.filter(|_| no_timewait_socket(end)) {
                self.pending_stay_ended(&c.key(), ns, owner);
            }
        } else {
            self.timewait_ended(&c.key(), end, owner);
        }
        if !c.listener {
            self.closed(&c.key(), close.by, close.rst, owner);
        }
    }

    /// A connection closed as `by` (also from a recorded connection
    /// record's `close`).
    pub fn closed(
        &mut self,
        key: &TupleKey,
        by: CloseBy,
        rst: Option<Rst>,
        owner: Option<&NamedOwner>,
    ) {
        if let Some(l) = &mut self.live {
            let (sent, received) = rst.map_or((0, 0), |r| (r.sent, r.received));
            l.closed(by, sent, received);
        }
        if let Some(m) = &mut self.metrics {
            m.closed(by, rst);
        }
        if let Some(s) = &mut self.summary {
            s.close(by, rst, |g| {
                g.key_of(key.lport, key.rport, key.raddr, owner)
            });
        }
    }

    /// The same from a recorded connection record's fields.
    pub fn timewait_ended(
        &mut self,
        key: &TupleKey,
        end: Option<TimewaitEnd>,
        owner: Option<&NamedOwner>,
    ) {
        if !no_timewait_socket(end) {
            return;
        }
        if let Some(ns) = self.pending_stays.remove(&self.tuples.hash_one(key)) {
            self.pending_stay_ended(key, ns, owner);
        }
    }

    /// A FIN_WAIT2 stay kept pending at the hand-over ended there after
    /// all (the connection had no timewait socket): counted now.
    fn pending_stay_ended(&mut self, key: &TupleKey, ns: u64, owner: Option<&NamedOwner>) {
        if let Some(m) = &mut self.metrics {
            m.stay(TcpState::FinWait2, ns, key.lport, key.rport, owner);
        }
        if let Some(s) = &mut self.summary {
            s.record(TcpState::FinWait2, ns, |by| {
                by.key_of(key.lport, key.rport, key.raddr, owner)
            });
        }
    }

    /// Before a scrape: the gauges from the tracker, lost events from the
    /// kernel's counters.
    pub fn refresh_metrics(&mut self, tracker: &mut Tracker, lost: Option<u64>) {
        if let Some(m) = &mut self.metrics {
            m.refresh(tracker, lost, clock::monotonic_ns());
        }
    }
}

/// The connection had no timewait socket after all: its FIN_WAIT2 stay
/// ended at the hand-over.
fn no_timewait_socket(end: Option<TimewaitEnd>) -> bool {
    matches!(end, Some(TimewaitEnd::NotCreated | TimewaitEnd::NotFound))
}

pub fn key_of(
    netns: u32,
    family: Family,
    laddr: IpAddr,
    lport: u16,
    raddr: IpAddr,
    rport: u16,
) -> TupleKey {
    TupleKey {
        netns,
        family,
        laddr,
        lport,
        raddr,
        rport,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::events::tests::sample;
    use TcpState::*;

    const MS: u64 = 1_000_000;

    fn fw2(new: TcpState, ns: u64, source: Source) -> Transition {
        Transition {
            old: FinWait2,
            new,
            old_state_ns: Some(ns),
            source,
            ..sample()
        }
    }

    fn fin_wait2(o: &Observers) -> Vec<u64> {
        let r = o.summary.as_ref().unwrap().report();
        match r[0].stats.state(FinWait2) {
            None => vec![],
            Some(s) => vec![s.count(), s.min_ns(), s.max_ns()],
        }
    }

    #[test]
    fn fin_wait2_across_the_hand_over_is_one_stay() {
        let mut o = Observers::new(Some(Summary::new(None, 10)), None);
        // 0.03 ms until the kernel hands over, 50 ms in the timewait socket.
        o.transition(&fw2(Close, 30_000, Source::Tracepoint), &None, None);
        assert_eq!(
            fin_wait2(&o),
            Vec::<u64>::new(),
            "pending: the stay goes on"
        );
        o.transition(&fw2(TimeWait, 50 * MS, Source::SockDiag), &None, None);
        assert_eq!(fin_wait2(&o), vec![1, 50 * MS + 30_000, 50 * MS + 30_000]);
        // A FIN_WAIT2 that ends otherwise is counted as it is.
        o.transition(&fw2(TimeWait, 7 * MS, Source::SockDiag), &None, None);
        assert_eq!(fin_wait2(&o), vec![2, 7 * MS, 50 * MS + 30_000]);
    }

    #[test]
    fn tracked_stays_come_with_the_transition_that_ends_them() {
        let mut o = Observers::new(Some(Summary::new(None, 10)), None).with_tracked_stays();
        o.transition(&fw2(Close, 30_000, Source::Tracepoint), &None, None);
        assert_eq!(fin_wait2(&o), Vec::<u64>::new(), "pending in the tracker");
        o.transition(
            &fw2(TimeWait, 50 * MS, Source::SockDiag),
            &None,
            Some(30_000),
        );
        assert_eq!(fin_wait2(&o), vec![1, 50 * MS + 30_000, 50 * MS + 30_000]);
        // Unknown before the hand-over: the timewait socket's part alone.
        o.transition(&fw2(Close, 7 * MS, Source::SockDiag), &None, None);
        assert_eq!(fin_wait2(&o), vec![2, 7 * MS, 50 * MS + 30_000]);
        assert!(o.pending_stays.is_empty(), "no table of its own");
    }

    #[test]
    fn without_a_timewait_socket_the_pending_stay_counts_at_the_record() {
        let mut o = Observers::new(Some(Summary::new(None, 10)), None);
        let t = fw2(Close, 30_000, Source::Tracepoint);
        o.transition(&t, &None, None);
        let key = key_of(t.netns, t.family, t.laddr, t.lport, t.raddr, t.rport);
        o.timewait_ended(&key, Some(TimewaitEnd::Expired), None);
        assert_eq!(fin_wait2(&o), Vec::<u64>::new());
        o.timewait_ended(&key, Some(TimewaitEnd::NotFound), None);
        assert_eq!(fin_wait2(&o), vec![1, 30_000, 30_000]);
        // Once only.
        o.timewait_ended(&key, Some(TimewaitEnd::NotFound), None);
        assert_eq!(fin_wait2(&o)[0], 1);
    }
}
