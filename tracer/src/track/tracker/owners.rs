//! Who owns a socket: the process the records name. The rules (also in
//! the README): the task of the transitions that only run in the owner's
//! own system calls (connect, listen, close/shutdown); for an accepted
//! socket until then, the owner of its listener (same namespace and local
//! port; unknown if listeners of different owners share the port); for a
//! socket that existed before the tracer, the process holding its inode in
//! /proc at start. Otherwise unknown (`None`), never the softirq's current
//! task.

use std::net::IpAddr;

use crate::{
    kernel::events::{Comm, TcpState, Transition},
    FastMap as HashMap,
};

/// The process that owns a socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
    pub uid: u32,
    /// Its cgroup v2 id (0: unknown), taken with the pid.
    pub cgroup: u64,
    /// Its container, as the agent resolved `cgroup` when it named the
    /// owner in a record (`containers.rs`); the tracker leaves it `None`.
    pub container: Option<crate::track::containers::ContainerKey>,
}

/// Transitions the kernel only makes inside the socket owner's own system
/// calls, so the current task is the owner.
pub(super) fn runs_in_owner_syscall(old: TcpState, new: TcpState) -> bool {
    use TcpState::*;
    matches!(
        (old, new),
        (Close, SynSent) | (Close, Listen) | (Established, FinWait1) | (CloseWait, LastAck)
    )
}

#[derive(Clone, Copy, Debug)]
struct Listener {
    sock: u64,
    laddr: IpAddr,
    owner: Option<Owner>,
}

/// Listening sockets by (netns, local port), for accepted sockets' owner.
#[derive(Default)]
pub(super) struct Listeners(HashMap<(u32, u16), Vec<Listener>>);

impl Listeners {
    /// A listener (`sock` 0: one known from the start-up snapshot).
    pub(super) fn add(
        &mut self,
        netns: u32,
        port: u16,
        sock: u64,
        laddr: IpAddr,
        owner: Option<Owner>,
    ) {
        self.0
            .entry((netns, port))
            .or_default()
            .push(Listener { sock, laddr, owner });
    }

    pub(super) fn remove(&mut self, netns: u32, port: u16, sock: u64) {
        if let Some(ls) = self.0.get_mut(&(netns, port)) {
            ls.retain(|l| l.sock != sock);
            if ls.is_empty() {
                self.0.remove(&(netns, port));
            }
        }
    }

    /// Is a socket listening on `port` in `netns`?
    pub(super) fn has(&self, netns: u32, port: u16) -> bool {
        self.0.contains_key(&(netns, port))
    }

    /// The owner of the listener that accepted `t`'s socket: the one on
    /// its exact local address, else a wildcard one.
    pub(super) fn owner_of(&self, t: &Transition) -> Option<Owner> {
        let ls = self.0.get(&(t.netns, t.lport))?;
        let exact: Vec<&Listener> = ls.iter().filter(|l| l.laddr == t.laddr).collect();
        let candidates: Vec<&Listener> = if exact.is_empty() {
            ls.iter().filter(|l| l.laddr.is_unspecified()).collect()
        } else {
            exact
        };
        let first = candidates.first()?.owner?;
        // Listeners of different processes on one port (SO_REUSEPORT): the
        // owner of the child cannot be told from here.
        candidates
            .iter()
            .all(|l| l.owner.map(|o| o.pid) == Some(first.pid))
            .then_some(first)
    }
}
