//! The parts of a connection's life the tracepoint does not show:
//!
//! - **TIME_WAIT.** After an active close the kernel continues the
//!   connection in a timewait socket that no tracepoint sees. While such
//!   connections are pending, one NETLINK_SOCK_DIAG dump of the FIN_WAIT2 and
//!   TIME_WAIT sockets per namespace and family runs every
//!   `--timewait-interval`, and each pending connection is joined to its
//!   timewait socket by namespace and 4-tuple. sock_diag rather than an
//!   `iter/tcp` iterator: it needs no BTF offsets (so it works on every
//!   kernel with the tracepoint), its remaining-time field dates the
//!   TIME_WAIT entry to the millisecond, and a dump of 131k timewait sockets
//!   took about 0.1 s here. Nothing is dumped while nothing is pending.
//! - **Owners and stuck connections.** Connections that stay in CLOSE_WAIT
//!   (or, with `--fin-wait2`, FIN_WAIT2) longer than a threshold are
//!   reported once with every process and fd holding the socket, found
//!   through the socket's inode (sock_diag) in /proc.
//! - **Sockets older than the tracer**, from a sock_diag snapshot of every
//!   namespace at start.
//!
//! The dumps, look-ups and `/proc` scans run on the worker thread
//! (`worker.rs`); this file decides what to ask it, from the connection
//! table, and what its answers do to the table. A poll's answer judges only
//! the connections that were waiting when it was asked.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use crate::{
    clock::monotonic_ns,
    kernel::events::{Comm, Family, Source, TcpState, Transition},
    kernel::filters::Filters,
    track::diag::{state_bit, DiagSocket, ALL_STATES},
    track::netns::Namespaces,
    track::procfs::{self, Holder},
    track::tracker::{Connection, Owner, SlotId, TimewaitEnd, Tracker, TupleKey},
    track::worker::{NetnsDump, NetnsQuery, TimewaitDump, TimewaitQuery},
};

/// TCP_TIMEWAIT_LEN: a timewait socket in TIME_WAIT lives 60 s (fixed in
/// the kernel) unless reused or killed.
pub const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;
/// Timer precision: jiffies (4 ms at HZ=250) and idiag_expires' whole ms.
pub const EXPIRY_TOLERANCE_NS: u64 = 10_000_000;

#[derive(Default, Debug)]
pub struct Counters {
    pub polls: u64,
    /// CPU time the worker spent on the polls.
    pub poll_ns: u64,
    pub errors: u64,
}

pub struct Lifecycle {
    /// The namespaces opened at start, until the worker takes them.
    ns: Option<Namespaces>,
    /// Per namespace: TCPTimeWaitOverflow at start, for the worker.
    overflows: HashMap<u32, u64>,
    /// Timewait deaths arrive from the fentry program (exact times).
    pub fentry: bool,
    /// The kernel answers sock_diag requests for TCP (`tcp_diag`).
    pub available: bool,
    /// A timewait poll was asked and not answered yet.
    pub polling: bool,
    /// Polls asked so far: the number of the one in flight.
    poll: u32,
    pub counters: Counters,
}

/// What the start-up snapshot found.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Sockets kept (those the filters select).
    pub sockets: usize,
    /// Listening sockets (netns as in events, local port) whose holder
    /// passes `--pid`/`--comm`: the kernel must let the sockets they accept
    /// pass from their first transition.
    pub selected_listeners: Vec<(u32, u16)>,
}

/// What one poll's answer produced, in output order.
#[derive(Default)]
pub struct PollResult {
    pub derived: Vec<(Transition, Option<Owner>)>,
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
    pub fn new() -> std::io::Result<Self> {
        let mut ns = Namespaces::new()?;
        let own = ns.own();
        let available = match ns
            .diag(own, &[])
            .map(|d| d.dump(Family::Ipv4, state_bit(TcpState::Listen)))
        {
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                log::warn!(
                    "sock_diag for TCP is unavailable ({e}; is the tcp_diag module loaded?): no TIME_WAIT \
                     accounting, no CLOSE_WAIT holders, no snapshot of older sockets"
                );
                false
            }
            None => false,
        };
        Ok(Lifecycle {
            ns: Some(ns),
            overflows: HashMap::new(),
            fentry: false,
            available,
            polling: false,
            poll: 0,
            counters: Counters::default(),
        })
    }

    /// The namespaces opened so far and their overflow counters at start,
    /// for the worker thread (once).
    pub fn take_namespaces(&mut self) -> Option<(Namespaces, HashMap<u32, u64>)> {
        let ns = self.ns.take()?;
        Some((ns, std::mem::take(&mut self.overflows)))
    }

    /// Every TCP socket of every namespace at start: listeners (for the
    /// owner of the sockets they will accept) and connections (for their
    /// later transitions and for CLOSE_WAIT alerts). Runs before the event
    /// loop, on the namespaces the worker will take.
    pub fn snapshot(
        &mut self,
        tracker: &mut Tracker,
        netns_known: bool,
        filters: &Filters,
    ) -> Snapshot {
        let mut snap = Snapshot::default();
        let Some(ns) = self.ns.as_mut().filter(|_| self.available) else {
            return snap;
        };
        let now = monotonic_ns();
        let mut found: Vec<(u32, DiagSocket)> = Vec::new();
        // Without the kernel's netns numbers only our own namespace can be
        // joined to events.
        let namespaces = if netns_known {
            ns.discover_all()
        } else {
            vec![ns.own()]
        };
        for inum in namespaces {
            if let (Some(v), _) = ns.timewait_limits(inum) {
                self.overflows.insert(inum, v);
            }
            let Some(diag) = ns.diag(inum, &[]) else {
                continue;
            };
            for family in [Family::Ipv4, Family::Ipv6] {
                let states =
                    ALL_STATES & !state_bit(TcpState::TimeWait) & !state_bit(TcpState::Close);
                match diag.dump(family, states) {
                    Ok(socks) => found.extend(
                        socks
                            .into_iter()
                            .filter(|s| !s.is_timewait())
                            .map(|s| (inum, s)),
                    ),
                    Err(e) => {
                        self.counters.errors += 1;
                        log::warn!("snapshot of netns {inum}: {e}");
                    }
                }
            }
        }
        let inodes: HashSet<u64> = found
            .iter()
            .map(|(_, s)| s.inode)
            .filter(|&i| i != 0)
            .collect();
        let holders = procfs::socket_holders(&inodes);
        // Once per process, not per socket: a stat and a read of /proc each
        // (2,000 sockets of one process cost 0.24 s before).
        let cgroups: HashMap<u32, u64> = holders
            .values()
            .flatten()
            .map(|h| h.pid)
            .collect::<HashSet<u32>>()
            .into_iter()
            .map(|pid| (pid, crate::track::containers::id_of_pid(pid)))
            .collect();
        for (inum, s) in found {
            let Some(state) = s.state else { continue };
            let key = TupleKey {
                // Without kernel offsets events carry netns 0; so must keys.
                netns: if netns_known { inum } else { 0 },
                family: s.family,
                laddr: s.laddr,
                lport: s.lport,
                raddr: s.raddr,
                rport: s.rport,
            };
            let held_by = holders.get(&s.inode).map(Vec::as_slice).unwrap_or(&[]);
            // The owner filter's verdict on a listener goes to the kernel,
            // whatever the other filters say of the listener itself.
            if state == TcpState::Listen && filters.owner_filter() && filters.owner_matches(held_by)
            {
                snap.selected_listeners.push((key.netns, key.lport));
            }
            // The kernel filters apply to events; the same filters, here,
            // keep the snapshot to the sockets the user asked about.
            if !filters.keeps_socket(&key, inum, held_by) {
                continue;
            }
            snap.sockets += 1;
            let owner = single_owner(held_by, s.uid, &cgroups);
            tracker.add_snapshot(Connection::from_snapshot(key, state, now, s.inode, owner));
        }
        snap
    }

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
        let mut by_netns: HashMap<u32, NetnsQuery> = HashMap::new();
        for (_, c) in tracker.timewait_mut() {
            let q = by_netns.entry(c.netns).or_insert_with(|| NetnsQuery {
                inum: c.netns,
                ..Default::default()
            });
            let family = usize::from(c.family == Family::Ipv6);
            q.ports[family].push((c.lport, c.rport));
            if let Some(h) = c.task_hint {
                if q.hints.len() < 8 && !q.hints.contains(&h) {
                    q.hints.push(h);
                }
            }
        }
        self.polling = true;
        self.poll = self.poll.wrapping_add(1);
        TimewaitPoll::Ask(TimewaitQuery {
            asked_ns: monotonic_ns(),
            namespaces: by_netns.into_values().collect(),
        })
    }

    /// Applies a poll's answer: joins the connections that were waiting
    /// to their timewait sockets (dating their entry into TIME_WAIT) and
    /// ends those whose socket is gone.
    pub fn apply_timewait(&mut self, tracker: &mut Tracker, dump: TimewaitDump) -> PollResult {
        self.polling = false;
        self.counters.polls += 1;
        self.counters.poll_ns += dump.cpu_ns;
        self.counters.errors += dump.errors;
        let poll = self.poll;
        let mut result = PollResult::default();
        // Namespaces answered, and whether each counted an overflow.
        let mut answered: HashMap<u32, bool> = HashMap::new();
        for (inum, d) in dump.namespaces {
            match d {
                NetnsDump::Failed => {}
                NetnsDump::Gone => {
                    answered.insert(inum, false);
                }
                NetnsDump::Dumped {
                    sockets,
                    overflowed,
                } => {
                    answered.insert(inum, overflowed);
                    for s in &sockets {
                        let key = TupleKey {
                            netns: inum,
                            family: s.family,
                            laddr: s.laddr,
                            lport: s.lport,
                            raddr: s.raddr,
                            rport: s.rport,
                        };
                        let Some(id) = tracker.timewait_of(&key) else {
                            continue;
                        };
                        let c = tracker.conn_mut(id);
                        let Some(mut tw) = c.timewait else { continue };
                        if tw.closed_ns > dump.asked_ns {
                            continue;
                        }
                        tw.seen = true;
                        tw.found_in_poll = poll;
                        let expiry = s.expires_ns;
                        if s.state == Some(TcpState::TimeWait) {
                            if c.state != TcpState::TimeWait {
                                // Entered TIME_WAIT when its 60 s timer was armed.
                                let entered =
                                    expiry.saturating_sub(TIMEWAIT_LEN_NS).max(c.state_since_ns);
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
                                result.derived.push((d, c.owner));
                                tw.expires_ns = Some(expiry);
                            } else if tw.expires_ns.is_none() {
                                tw.expires_ns = Some(expiry);
                            }
                            // Once known, the scheduled expiry is kept: a timer
                            // that fires late (timer wheel) reports 0 ms left.
                        } else {
                            tw.expires_ns = Some(expiry); // the FIN_WAIT2 timeout
                        }
                        c.timewait = Some(tw);
                    }
                }
            }
        }
        let now = dump.done_ns;
        let mut ending: Vec<(SlotId, u64, TimewaitEnd, Source)> = Vec::new();
        for (id, c) in tracker.timewait_mut() {
            let Some(&overflowed) = answered.get(&c.netns) else {
                continue;
            };
            let Some(mut tw) = c.timewait else { continue };
            if tw.closed_ns > dump.asked_ns || tw.found_in_poll == poll {
                continue;
            }
            let decided = if let Some(k) = tw.killed_ns {
                // Killed early, seen by fentry, and no reuse followed.
                Some((k, TimewaitEnd::Early, Source::Fentry))
            } else if self.fentry && tw.seen && tw.missing_polls == 0 {
                // Its death event may still wait in the ring buffer.
                None
            } else if tw.seen {
                Some(match tw.expires_ns {
                    Some(e) if now + EXPIRY_TOLERANCE_NS >= e => {
                        (e, TimewaitEnd::Expired, Source::SockDiag)
                    }
                    _ => (now, TimewaitEnd::Early, Source::SockDiag),
                })
            } else if overflowed {
                Some((tw.closed_ns, TimewaitEnd::NotCreated, Source::SockDiag))
            } else {
                Some((tw.closed_ns, TimewaitEnd::NotFound, Source::SockDiag))
            };
            match decided {
                Some((at, end, source)) => ending.push((id, at, end, source)),
                None => {
                    tw.missing_polls += 1;
                    c.timewait = Some(tw);
                }
            }
        }
        for (id, at, end, source) in ending {
            if let Some(d) = tracker.end_timewait(id, at, end, source) {
                result.derived.push((d, tracker.conn(id).owner));
            }
            result.closed.push(id);
        }
        result
    }

    /// Connections in `state` for at least `threshold` and not reported
    /// yet (marked reported now): the worker is to find their holders.
    pub fn due_stuck(
        &mut self,
        tracker: &mut Tracker,
        state: TcpState,
        threshold: Duration,
    ) -> Vec<Connection> {
        let now = monotonic_ns();
        let limit = threshold.as_nanos() as u64;
        let mut due = Vec::new();
        for (_, c) in tracker.in_state_mut(state) {
            if !c.stuck_reported && now.saturating_sub(c.state_since_ns) >= limit {
                c.stuck_reported = true;
                due.push(*c);
            }
        }
        due
    }

    /// Every connection in `state` now (for the list printed at exit).
    pub fn still_in(tracker: &mut Tracker, state: TcpState) -> Vec<Connection> {
        tracker.in_state_mut(state).map(|(_, c)| *c).collect()
    }
}

/// The owner of a socket held by exactly one process; `None` when several
/// processes hold it (no guessing).
fn single_owner(holders: &[Holder], uid: u32, cgroups: &HashMap<u32, u64>) -> Option<Owner> {
    let first = holders.first()?;
    holders.iter().all(|h| h.pid == first.pid).then(|| Owner {
        pid: first.pid,
        comm: Comm::from_name(&first.comm),
        uid,
        cgroup: cgroups.get(&first.pid).copied().unwrap_or(0),
        container: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_is_the_owner_several_are_not_guessed() {
        let h = |pid, fd| Holder {
            pid,
            comm: "srv".into(),
            fd,
        };
        assert_eq!(
            single_owner(&[h(5, 3), h(5, 4)], 7, &HashMap::from([(5, 9)]))
                .map(|o| (o.pid, o.uid, o.cgroup)),
            Some((5, 7, 9))
        );
        assert_eq!(single_owner(&[h(5, 3), h(6, 3)], 7, &HashMap::new()), None);
        assert_eq!(single_owner(&[], 7, &HashMap::new()), None);
    }
}
