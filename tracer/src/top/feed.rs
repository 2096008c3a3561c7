//! The agent's side of `tracer top`: once a second it drains what the
//! kernel sent, then builds a [`Snapshot`] from the same state the summary
//! and the metrics read (the tracker's connections, the observers'
//! counts, the stats counters) and sends it to the view's thread. The
//! per-event path only adds to [`Totals`]; everything here runs once a
//! second, and the /proc scans for CLOSE_WAIT holders run on the worker
//! thread.

use std::{collections::HashMap, net::IpAddr, sync::mpsc};

use crate::{
    agent::Pipeline,
    kernel::events::TcpState,
    kernel::loader::CounterValues,
    report::output::RecordWrite,
    top::model::{
        CloseWaitRow, Snapshot, Status, TimeWaitRow, MAX_CLOSE_WAIT_ROWS, MAX_TIME_WAIT_ROWS,
    },
    track::procfs::Holder,
    track::tracker::Connection,
    FastMap,
};

/// How long a connection stays in CLOSE_WAIT before its holders are
/// looked for: a busy server has sockets in CLOSE_WAIT for a moment all
/// the time (between the peer's FIN and its own close), and each look-up
/// is a scan of every process's fds. Until then its row names the owner
/// the tracker knows, without an fd.
pub const HOLDERS_AFTER_NS: u64 = 1_000_000_000;

/// What the agent needs to feed the view: where snapshots go, and the
/// view's request to stop (`q`).
pub struct Live {
    pub snapshots: mpsc::SyncSender<Snapshot>,
    pub quit: tokio::sync::oneshot::Receiver<()>,
}

/// The holders found so far, by socket, for the connections in
/// CLOSE_WAIT; at most one scan asked of the worker at a time.
#[derive(Default)]
pub struct Holders {
    found: FastMap<u64, Vec<Holder>>,
    pub asking: bool,
}

impl Holders {
    /// The worker's answer.
    pub fn found(&mut self, found: Vec<(Connection, Vec<Holder>)>) {
        self.asking = false;
        for (c, h) in found {
            self.found.insert(c.sock, h);
        }
    }
}

/// The snapshot of now, and the CLOSE_WAIT connections whose holders
/// the worker should look up (if no scan is under way).
pub fn snapshot<W: RecordWrite>(
    p: &mut Pipeline<W>,
    holders: &mut Holders,
    kernel: Option<CounterValues>,
    now_ns: u64,
) -> (Snapshot, Vec<Connection>) {
    let tracker = &p.tracker;
    let mut close_wait: Vec<Connection> = tracker
        .connections()
        .filter(|c| c.state == TcpState::CloseWait)
        .copied()
        .collect();
    close_wait.sort_by_key(|c| c.state_since_ns);
    close_wait.truncate(MAX_CLOSE_WAIT_ROWS);
    holders
        .found
        .retain(|sock, _| close_wait.iter().any(|c| c.sock == *sock));
    let ask: Vec<Connection> = if holders.asking {
        Vec::new()
    } else {
        close_wait
            .iter()
            .filter(|c| {
                !holders.found.contains_key(&c.sock)
                    && now_ns.saturating_sub(c.state_since_ns) >= HOLDERS_AFTER_NS
            })
            .copied()
            .collect()
    };

    let mut time_wait: HashMap<(IpAddr, u16), u64> = HashMap::new();
    for c in tracker.connections() {
        if c.state == TcpState::TimeWait {
            *time_wait.entry((c.raddr, c.rport)).or_default() += 1;
        }
    }
    let mut time_wait: Vec<TimeWaitRow> = time_wait
        .into_iter()
        .map(|((raddr, rport), count)| TimeWaitRow {
            raddr,
            rport,
            count,
        })
        .collect();
    time_wait.sort_by_key(|r| std::cmp::Reverse(r.count));
    time_wait.truncate(MAX_TIME_WAIT_ROWS);

    let status = Status {
        events: p.events,
        lost: kernel.map_or(0, |k| k.ringbuf_full),
        skipped: kernel.map_or(0, |k| k.skipped),
        untracked: tracker.untracked,
        unreadable: p.unreadable,
        tracked: tracker.len() as u64,
    };
    let by_state = tracker.count_by_state();
    let totals = p.observers.live.unwrap_or_default();
    let rows = close_wait
        .iter()
        .map(|c| {
            let found = holders.found.get(&c.sock).map(Vec::as_slice).unwrap_or(&[]);
            let (pid, comm, fd) = match (found.first(), &c.owner) {
                (Some(h), _) => (Some(h.pid), h.comm.clone(), Some(h.fd)),
                (None, Some(o)) => (o.known_pid(), o.comm.as_str().into_owned(), None),
                (None, None) => (None, "-".to_string(), None),
            };
            CloseWaitRow {
                sock: c.sock,
                age_ns: now_ns.saturating_sub(c.state_since_ns),
                laddr: c.laddr,
                lport: c.lport,
                raddr: c.raddr,
                rport: c.rport,
                pid,
                comm,
                fd,
                more_holders: found.len().saturating_sub(1),
                container: p
                    .out
                    .cgroups()
                    .map_or_else(|| "-".to_string(), |g| g.cell(&c.owner)),
            }
        })
        .collect();
    let snapshot = Snapshot {
        at_ns: now_ns,
        by_state,
        totals,
        close_wait: rows,
        time_wait,
        status,
    };
    (snapshot, ask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::WallClock,
        kernel::events::{tests::sample, Transition},
        report::{
            format::{EventsMode, Format},
            observe::Observers,
            output::Output,
        },
        track::{resets::Resets, tracker::Tracker},
    };

    const S: u64 = 1_000_000_000;

    fn pipeline() -> Pipeline<Vec<u8>> {
        Pipeline {
            tracker: Tracker::new(16),
            out: Output::new(
                Vec::new(),
                Format::Json,
                EventsMode::None,
                WallClock::with_offset_ns(0),
            ),
            events: 0,
            unreadable: 0,
            unreadable_records: 0,
            observers: Observers::new(None, None),
            resets: Resets::new(false),
            drain_began: None,
            deferred: Default::default(),
        }
    }

    fn enter(p: &mut Pipeline<Vec<u8>>, sock: u64, rport: u16, new: TcpState, at_s: u64) {
        p.tracker.on_transition(&Transition {
            sock,
            rport,
            old: TcpState::Established,
            new,
            mono_ns: at_s * S,
            ..sample()
        });
    }

    #[test]
    fn close_wait_oldest_first_with_holders_once_they_last() {
        let mut p = pipeline();
        enter(&mut p, 1, 80, TcpState::CloseWait, 10);
        enter(&mut p, 2, 81, TcpState::CloseWait, 5);
        enter(&mut p, 3, 82, TcpState::CloseWait, 20);
        enter(&mut p, 4, 83, TcpState::FinWait1, 20);
        let mut holders = Holders::default();
        let (s, ask) = snapshot(&mut p, &mut holders, None, 20 * S + S / 2);
        assert_eq!(s.by_state[TcpState::CloseWait.index()], 3);
        let socks: Vec<u64> = s.close_wait.iter().map(|r| r.sock).collect();
        assert_eq!(socks, [2, 1, 3], "oldest first");
        assert_eq!(s.close_wait[0].age_ns, 15 * S + S / 2);
        // Until a scan finds the holders, the owner the tracker knows:
        // none here (the peer's FIN comes in softirq, not in the owner's
        // system call).
        assert_eq!(
            (
                s.close_wait[0].pid,
                s.close_wait[0].comm.as_str(),
                s.close_wait[0].fd
            ),
            (None, "-", None)
        );
        // Half a second in CLOSE_WAIT: not scanned for yet.
        let asked: Vec<u64> = ask.iter().map(|c| c.sock).collect();
        assert_eq!(asked, [2, 1]);

        holders.asking = true;
        let holder = |pid, fd| Holder {
            pid,
            comm: "leaky".into(),
            fd,
        };
        holders.found(vec![(ask[0], vec![holder(7, 9), holder(8, 9)])]);
        assert!(!holders.asking);
        let (s, ask) = snapshot(&mut p, &mut holders, None, 22 * S);
        let r = &s.close_wait[0];
        assert_eq!(
            (r.pid, r.comm.as_str(), r.fd, r.more_holders),
            (Some(7), "leaky", Some(9), 1)
        );
        let asked: Vec<u64> = ask.iter().map(|c| c.sock).collect();
        assert_eq!(asked, [1, 3], "found ones are not asked again");
    }

    #[test]
    fn time_wait_by_destination_largest_first() {
        let mut p = pipeline();
        for (sock, rport) in [(1, 5432), (2, 80), (3, 80)] {
            enter(&mut p, sock, rport, TcpState::TimeWait, 1);
        }
        let (s, _) = snapshot(&mut p, &mut Holders::default(), None, 2 * S);
        let rows: Vec<(u16, u64)> = s.time_wait.iter().map(|r| (r.rport, r.count)).collect();
        assert_eq!(rows, [(80, 2), (5432, 1)]);
    }
}
