//! The agent's blocking work, on a thread of its own: NETLINK_SOCK_DIAG
//! dumps and look-ups (one socket per network namespace, opened from a
//! short-lived thread that joins it), `/proc` scans for the processes that
//! hold a socket, and the namespaces' timewait counters. The thread that
//! drains the ring buffer sends it [`Job`]s and goes on; answers come back
//! as [`Done`] messages that the event loop handles like any other event.
//! Nothing here touches the connection table: the drain side asks with
//! copies of what it needs and applies the answers (`lifecycle/`).

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
    sync::mpsc,
    thread,
};

use tokio::sync::mpsc::UnboundedSender;

use crate::{
    clock::monotonic_ns,
    kernel::events::{Family, TcpState},
    track::diag::{state_bit, DiagSocket, Queues},
    track::netns::Namespaces,
    track::ports::PortRange,
    track::procfs::{self, Holder},
    track::tracker::{Connection, Owner, SlotId, TupleKey},
};

/// How often the worker closes the namespaces nothing else holds (a
/// scan of /proc and of the mounts).
const RELEASE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Jobs queued at once; the drain side sends one timewait poll at a time
/// and one batch of stuck connections a second, so this is never reached
/// in practice (a full queue drops the job, which is asked again later).
const QUEUE: usize = 16;

/// The timewait sockets the drain side is waiting for, by namespace.
#[derive(Debug, Default)]
pub struct TimewaitQuery {
    /// The poll's number (see the tracker's timewait index).
    pub poll: u32,
    /// CLOCK_MONOTONIC ns when asked.
    pub asked_ns: u64,
    pub namespaces: Vec<NetnsQuery>,
}

#[derive(Debug, Default)]
pub struct NetnsQuery {
    /// Namespace inode as events carry it (0: unknown, the agent's own).
    pub inum: u32,
    /// What to dump, per family (IPv4, IPv6).
    pub families: [Wanted; 2],
    /// (pid, tid) of tasks seen in the namespace, to open it by.
    pub hints: Vec<(u32, u32)>,
}

/// The timewait sockets a poll dumps in one family of a namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Wanted {
    #[default]
    Nothing,
    /// Those with these (local, remote) ports, at most
    /// `diag::MAX_FILTER_TUPLES`: the kernel filters the dump.
    Ports(Vec<(u16, u16)>),
    /// All of them (more are waiting than a filter takes).
    All,
}

/// One timewait socket of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitSocket {
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    /// FIN_WAIT2 (waiting for the peer's FIN) or TIME_WAIT.
    pub state: Option<TcpState>,
    /// CLOCK_MONOTONIC ns when its timer fires, as of the dump.
    pub expires_ns: u64,
}

impl TimewaitSocket {
    /// Its connection's key, in namespace `netns`.
    pub fn key(&self, netns: u32) -> TupleKey {
        TupleKey {
            netns,
            family: self.family,
            laddr: self.laddr,
            lport: self.lport,
            raddr: self.raddr,
            rport: self.rport,
        }
    }
}

#[derive(Debug)]
pub enum NetnsDump {
    /// Nothing holds the namespace any more: its sockets are gone.
    Gone,
    /// A dump failed: decide nothing on partial data.
    Failed,
    Dumped {
        sockets: Vec<TimewaitSocket>,
        /// Active closes got no timewait socket since the last poll
        /// (`TCPTimeWaitOverflow` grew, or the namespace is at
        /// `tcp_max_tw_buckets`).
        overflowed: bool,
    },
}

#[derive(Debug, Default)]
pub struct TimewaitDump {
    pub poll: u32,
    pub asked_ns: u64,
    /// When the dumps were done (CLOCK_MONOTONIC ns).
    pub done_ns: u64,
    pub namespaces: Vec<(u32, NetnsDump)>,
    /// CPU time the worker spent on it.
    pub cpu_ns: u64,
    pub errors: u64,
}

pub enum Job {
    Timewait(TimewaitQuery),
    /// The processes and fds holding each connection's socket.
    Holders {
        conns: Vec<Connection>,
        at_exit: bool,
    },
    /// The ephemeral port ranges of namespaces (with a task in each, to
    /// open it by).
    PortRanges(Vec<(u32, Option<(u32, u32)>)>),
    /// The processes that accepted these connections (their owner so far
    /// is their listener's), by slot.
    Accepted(Vec<(SlotId, Connection)>),
    /// The same for `tracer top`'s CLOSE_WAIT holders (answered apart:
    /// they are shown, not reported as stuck).
    LiveHolders(Vec<Connection>),
}

/// A stuck connection with every process and fd holding its socket and
/// the socket's queues (None when it could not be looked up).
pub type HeldSocket = (Connection, Vec<Holder>, Option<Queues>);

pub enum Done {
    Timewait(TimewaitDump),
    /// Network namespaces closed because nothing else held them.
    Released(u64),
    Holders {
        found: Vec<HeldSocket>,
        at_exit: bool,
        errors: u64,
    },
    PortRanges(Vec<(u32, Result<PortRange, String>)>),
    LiveHolders {
        found: Vec<(Connection, Vec<Holder>)>,
        errors: u64,
    },
    /// The owners found for [`Job::Accepted`]'s connections (those that
    /// one process, or processes of one comm, hold).
    Accepted {
        found: Vec<(SlotId, Connection, Owner)>,
        errors: u64,
    },
}

/// The drain side's handle on the worker thread.
pub struct Worker {
    jobs: mpsc::SyncSender<Job>,
}

impl Worker {
    /// Starts the thread with the namespaces (and their sock_diag
    /// sockets) opened at start and their overflow counters then; answers
    /// go to `done`.
    pub fn start(
        ns: Namespaces,
        overflows: HashMap<u32, u64>,
        done: UnboundedSender<Done>,
    ) -> io::Result<Worker> {
        let (jobs, queue) = mpsc::sync_channel(QUEUE);
        let mut state = State { ns, overflows };
        thread::Builder::new()
            .name("tracer-worker".into())
            .spawn(move || {
                let mut released_at = std::time::Instant::now();
                loop {
                    let job = match queue.recv_timeout(RELEASE_EVERY) {
                        Ok(job) => Some(job),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    };
                    if released_at.elapsed() >= RELEASE_EVERY {
                        released_at = std::time::Instant::now();
                        let dead = state.ns.release_dead();
                        if !dead.is_empty() {
                            log::debug!(
                                "released {} network namespaces gone elsewhere",
                                dead.len()
                            );
                            let _ = done.send(Done::Released(dead.len() as u64));
                        }
                    }
                    let Some(job) = job else { continue };
                    let answer = match job {
                        Job::Timewait(q) => Done::Timewait(state.timewait(&q)),
                        Job::PortRanges(wanted) => Done::PortRanges(
                            wanted
                                .into_iter()
                                .map(|(inum, hint)| (inum, state.port_range(inum, hint)))
                                .collect(),
                        ),
                        Job::Holders { conns, at_exit } => {
                            let (found, errors) = state.holders(conns);
                            Done::Holders {
                                found,
                                at_exit,
                                errors,
                            }
                        }
                        Job::Accepted(conns) => {
                            let (found, errors) = state.accepted(conns);
                            Done::Accepted { found, errors }
                        }
                        Job::LiveHolders(conns) => {
                            let (found, errors) = state.holders(conns);
                            // The view shows holders, not queues.
                            let found = found.into_iter().map(|(c, h, _)| (c, h)).collect();
                            Done::LiveHolders { found, errors }
                        }
                    };
                    if done.send(answer).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Worker { jobs })
    }

    /// Queues `job`; gives it back if the queue is full or the worker is
    /// gone.
    pub fn try_send(&self, job: Job) -> Result<(), Job> {
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(j) | mpsc::TrySendError::Disconnected(j) => j,
        })
    }

    /// Queues `job`; false if the queue is full or the worker is gone.
    pub fn send(&self, job: Job) -> bool {
        self.jobs.try_send(job).is_ok()
    }
}

struct State {
    ns: Namespaces,
    /// Per namespace: TCPTimeWaitOverflow at the previous poll.
    overflows: HashMap<u32, u64>,
}

/// This thread's CPU time, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; the clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl State {
    fn port_range(&mut self, inum: u32, hint: Option<(u32, u32)>) -> Result<PortRange, String> {
        let hints: Vec<(u32, u32)> = hint.into_iter().collect();
        self.ns.diag(inum, &hints);
        self.ns
            .port_range(inum)
            .unwrap_or_else(|| Err("the namespace could not be opened".into()))
    }

    fn timewait(&mut self, q: &TimewaitQuery) -> TimewaitDump {
        let cpu = thread_cpu_ns();
        let mut out = TimewaitDump {
            poll: q.poll,
            asked_ns: q.asked_ns,
            ..Default::default()
        };
        for n in &q.namespaces {
            let dump = self.dump_netns(n, &mut out.errors);
            out.namespaces.push((n.inum, dump));
        }
        out.done_ns = monotonic_ns();
        out.cpu_ns = thread_cpu_ns().saturating_sub(cpu);
        out
    }

    fn dump_netns(&mut self, n: &NetnsQuery, errors: &mut u64) -> NetnsDump {
        let inum = n.inum;
        let was_missing = self.ns.is_missing(inum);
        let Some(diag) = self.ns.diag(inum, &n.hints) else {
            if !was_missing {
                log::info!("network namespace {inum} is gone; its timewait sockets with it");
            }
            return NetnsDump::Gone;
        };
        let states = state_bit(TcpState::TimeWait) | state_bit(TcpState::FinWait2);
        let mut sockets = Vec::new();
        let mut filtered = false;
        // Only the timewait sockets' tuples and timers are kept, as the
        // dump is read: a namespace may hold a hundred thousand.
        let mut keep = |s: &DiagSocket| s.is_timewait().then(|| timewait_socket(s));
        for (family, wanted) in [Family::Ipv4, Family::Ipv6].into_iter().zip(&n.families) {
            // Few connections pending: let the kernel drop the others.
            let ports = match wanted {
                Wanted::Nothing => continue,
                Wanted::Ports(ports) => Some(ports.as_slice()),
                Wanted::All => None,
            };
            filtered |= ports.is_some();
            if let Err(e) = diag.dump_into(family, states, ports, &mut sockets, &mut keep) {
                *errors += 1;
                log::warn!("timewait dump of netns {inum}: {e}");
                return NetnsDump::Failed;
            }
        }
        // No timewait socket was created if the namespace counted an
        // overflow since the last poll, or is at its limit now.
        let (now_overflows, max_buckets) = self.ns.timewait_limits(inum);
        let before = self.overflows.get(&inum).copied();
        let counted = matches!((before, now_overflows), (Some(b), Some(n)) if n > b);
        let at_limit =
            max_buckets.is_some_and(|m| m == 0 || (!filtered && sockets.len() as u64 >= m));
        if let Some(v) = now_overflows {
            self.overflows.insert(inum, v);
        }
        NetnsDump::Dumped {
            sockets,
            overflowed: counted || at_limit,
        }
    }

    /// The owner of each accepted connection: what the processes holding
    /// its socket have in common ([`Owner::common`]), with the uid its
    /// listener's owner had.
    fn accepted(
        &mut self,
        conns: Vec<(SlotId, Connection)>,
    ) -> (Vec<(SlotId, Connection, Owner)>, u64) {
        let (ids, conns): (Vec<SlotId>, Vec<Connection>) = conns.into_iter().unzip();
        let (found, errors) = self.holders(conns);
        let mut cgroups: HashMap<u32, u64> = HashMap::new();
        let owners = ids
            .into_iter()
            .zip(found)
            .filter_map(|(id, (c, holders, _))| {
                let uid = c.owner.map_or(0, |o| o.uid);
                let owner = Owner::of_holders(&holders, uid, |pid| {
                    *cgroups
                        .entry(pid)
                        .or_insert_with(|| crate::track::containers::id_of_pid(pid))
                })?;
                Some((id, c, owner))
            })
            .collect();
        (owners, errors)
    }

    /// Each connection with every process and fd holding its socket,
    /// found by the socket's inode (looked up by 4-tuple when not known),
    /// and its queues now (looked up by 4-tuple: they say why it is stuck).
    fn holders(&mut self, mut conns: Vec<Connection>) -> (Vec<HeldSocket>, u64) {
        let mut errors = 0;
        let mut queues = Vec::with_capacity(conns.len());
        for c in &mut conns {
            let hints: Vec<(u32, u32)> = c.task_hint.into_iter().collect();
            let found = match self.ns.diag(c.netns, &hints) {
                Some(diag) => match diag.lookup(c.family, (c.laddr, c.lport), (c.raddr, c.rport)) {
                    Ok(found) => found,
                    Err(e) => {
                        errors += 1;
                        log::debug!("sock_diag look-up: {e}");
                        None
                    }
                },
                None => None,
            };
            // Another socket at the same 4-tuple (this one's inode known
            // and different) says nothing of this one.
            let found = found.filter(|s| c.inode == 0 || s.inode == c.inode);
            if let Some(s) = &found {
                c.inode = s.inode;
            }
            queues.push(found.as_ref().map(Queues::of));
        }
        let inodes: HashSet<u64> = conns.iter().map(|c| c.inode).filter(|&i| i != 0).collect();
        let holders = procfs::socket_holders(&inodes);
        let found = conns
            .into_iter()
            .zip(queues)
            .map(|(c, q)| {
                let h = holders.get(&c.inode).cloned().unwrap_or_default();
                (c, h, q)
            })
            .collect();
        (found, errors)
    }
}

fn timewait_socket(s: &DiagSocket) -> TimewaitSocket {
    TimewaitSocket {
        family: s.family,
        laddr: s.laddr,
        lport: s.lport,
        raddr: s.raddr,
        rport: s.rport,
        state: s.state,
        expires_ns: s.read_ns + u64::from(s.expires_ms) * 1_000_000,
    }
}
