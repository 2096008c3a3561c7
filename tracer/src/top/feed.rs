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
            .filter(|c| !holders.found.contains_key(&c.sock))
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
                (None, Some(o)) => (Some(o.pid), o.comm.as_str().into_owned(), None),
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
