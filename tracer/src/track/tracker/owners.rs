//! Who owns a socket: the process the records name. The rules (also in
//! the README): the task of the transitions that only run in the owner's
//! own system calls (connect, listen, close/shutdown); for an accepted
//! socket until then, the process that holds it in /proc once a scan has
//! found it (the agent asks the worker, a second after it is established), and
//! before that the owner of its listener (same namespace and local port);
//! for a socket that existed before the tracer, the process holding its
//! inode in /proc at start. Otherwise unknown (`None`), never the
//! softirq's current task.
//!
//! Several processes can hold one listener (prefork servers: a master and
//! its workers) or listen on one port (SO_REUSEPORT): when all of them
//! have the same comm, that comm is the owner with its pid unknown (0),
//! and the records list the listeners' pids (`listener_pids`); when their
//! comms differ, the owner is unknown.

use std::net::IpAddr;

use crate::{
    kernel::events::{Comm, Transition},
    FastMap as HashMap,
};

/// The process that owns a socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// 0 when it is not known which of several processes of this comm
    /// (holding its listener) it is.
    pub pid: u32,
    pub comm: Comm,
    pub uid: u32,
    /// Its cgroup v2 id (0: unknown), taken with the pid.
    pub cgroup: u64,
}

impl Owner {
    /// The pid, if it is known.
    pub fn known_pid(&self) -> Option<u32> {
        (self.pid != 0).then_some(self.pid)
    }

    /// The owner of a socket that `holders` hold ([`Owner::common`]: a
    /// prefork server's listener, held by a master and its workers, is
    /// owned by their comm), with `uid` and each holder's cgroup.
    pub fn of_holders(
        holders: &[crate::track::procfs::Holder],
        uid: u32,
        mut cgroup_of: impl FnMut(u32) -> u64,
    ) -> Option<Owner> {
        Owner::common(holders.iter().map(|h| Owner {
            pid: h.pid,
            comm: Comm::from_name(&h.comm),
            uid,
            cgroup: cgroup_of(h.pid),
        }))
    }

    /// What several owners have in common: the one owner if they are all
    /// the same process, their comm (pid unknown) if they share it, else
    /// nothing. The uid and cgroup are kept where they agree.
    pub fn common(owners: impl IntoIterator<Item = Owner>) -> Option<Owner> {
        let mut owners = owners.into_iter();
        let mut common = owners.next()?;
        for o in owners {
            if o.comm != common.comm {
                return None;
            }
            if o.pid != common.pid {
                common.pid = 0;
            }
            if o.uid != common.uid {
                common.uid = 0;
            }
            if o.cgroup != common.cgroup {
                common.cgroup = 0;
            }
        }
        Some(common)
    }
}

#[derive(Clone, Debug)]
struct Listener {
    sock: u64,
    laddr: IpAddr,
    owner: Option<Owner>,
    /// The processes known to hold it: those found in /proc at start, or
    /// the one that called listen().
    pids: Vec<u32>,
}

/// The listeners of one (netns, port).
#[derive(Default)]
struct PortListeners {
    listeners: Vec<Listener>,
    /// Every pid of `listeners`, sorted, without repeats.
    pids: Box<[u32]>,
}

/// Listening sockets by (netns, local port), for accepted sockets' owner.
#[derive(Default)]
pub(super) struct Listeners(HashMap<(u32, u16), PortListeners>);

impl Listeners {
    /// A listener (`sock` 0: one known from the start-up snapshot) held by
    /// `pids`.
    pub(super) fn add(
        &mut self,
        netns: u32,
        port: u16,
        sock: u64,
        laddr: IpAddr,
        owner: Option<Owner>,
        pids: &[u32],
    ) {
        let p = self.0.entry((netns, port)).or_default();
        p.listeners.push(Listener {
            sock,
            laddr,
            owner,
            pids: pids.to_vec(),
        });
        p.update_pids();
    }

    pub(super) fn remove(&mut self, netns: u32, port: u16, sock: u64) {
        if let Some(p) = self.0.get_mut(&(netns, port)) {
            p.listeners.retain(|l| l.sock != sock);
            if p.listeners.is_empty() {
                self.0.remove(&(netns, port));
            } else {
                p.update_pids();
            }
        }
    }

    /// Is a socket listening on `port` in `netns`?
    pub(super) fn has(&self, netns: u32, port: u16) -> bool {
        self.0.contains_key(&(netns, port))
    }

    /// The processes known to hold a listener on `port` in `netns`.
    pub(super) fn pids(&self, netns: u32, port: u16) -> Option<&[u32]> {
        self.0
            .get(&(netns, port))
            .map(|p| &*p.pids)
            .filter(|p| !p.is_empty())
    }

    /// The owner of the listener that accepted `t`'s socket: the one on
    /// its exact local address, else a wildcard one. Listeners of several
    /// processes on one port (SO_REUSEPORT) give what their owners have in
    /// common ([`Owner::common`]).
    pub(super) fn owner_of(&self, t: &Transition) -> Option<Owner> {
        let ls = &self.0.get(&(t.netns, t.lport))?.listeners;
        let exact = ls.iter().any(|l| l.laddr == t.laddr);
        let candidates = ls.iter().filter(|l| {
            if exact {
                l.laddr == t.laddr
            } else {
                l.laddr.is_unspecified()
            }
        });
        let mut common: Option<Owner> = None;
        for l in candidates {
            let o = l.owner?;
            common = Some(match common {
                None => o,
                Some(c) => Owner::common([c, o])?,
            });
        }
        common
    }
}

impl PortListeners {
    fn update_pids(&mut self) {
        let mut pids: Vec<u32> = self
            .listeners
            .iter()
            .flat_map(|l| l.pids.iter().copied())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        self.pids = pids.into_boxed_slice();
    }
}

/// Accepted connections that took their listener's owner, waiting to be
/// looked up in /proc for the process that accepted them: a prefork
/// server's worker, where the listener names its master or only a comm.
#[derive(Default)]
pub(super) struct Accepted {
    queue: std::collections::VecDeque<AcceptedEntry>,
    /// Not queued: the queue was full.
    pub(super) skipped: u64,
}

/// At most this many wait; beyond, a connection keeps its listener's
/// owner until its own close names it.
const MAX_ACCEPTED: usize = 65_536;

#[derive(Clone, Copy)]
pub(super) struct AcceptedEntry {
    pub(super) id: super::SlotId,
    pub(super) sock: u64,
    pub(super) first_seen_ns: u64,
    pub(super) established_ns: u64,
}

impl Accepted {
    pub(super) fn push(&mut self, e: AcceptedEntry) {
        if self.queue.len() >= MAX_ACCEPTED {
            self.skipped += 1;
            if self.skipped == 1 {
                log::warn!(
                    "over {MAX_ACCEPTED} accepted connections wait for the look-up of the process that accepted them; the others keep their listener's owner until they close"
                );
            }
        } else {
            self.queue.push_back(e);
        }
    }

    /// The next entry established at or before `before_ns`.
    pub(super) fn pop_due(&mut self, before_ns: u64) -> Option<AcceptedEntry> {
        if self.queue.front()?.established_ns > before_ns {
            return None;
        }
        self.queue.pop_front()
    }
}
