//! The start-up snapshot: every TCP socket of every namespace, before the
//! event loop.

use std::collections::{HashMap, HashSet};

use super::Lifecycle;
use crate::{
    clock::monotonic_ns,
    kernel::events::{Family, TcpState},
    kernel::filters::Filters,
    track::diag::{state_bit, DiagSocket, ALL_STATES},
    track::procfs,
    track::tracker::{Connection, Owner, Tracker, TupleKey},
};

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

impl Lifecycle {
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
        let mut old_timewait: Vec<(u32, DiagSocket)> = Vec::new();
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
                // Timewait sockets only hold ports (see `ports.rs`).
                let timewait = if tracker.ports.enabled() {
                    state_bit(TcpState::TimeWait)
                } else {
                    0
                };
                let states =
                    (ALL_STATES & !state_bit(TcpState::TimeWait) & !state_bit(TcpState::Close))
                        | timewait;
                match diag.dump(family, states) {
                    Ok(socks) => {
                        for s in socks {
                            if s.is_timewait() {
                                old_timewait.push((inum, s));
                            } else {
                                found.push((inum, s));
                            }
                        }
                    }
                    Err(e) => {
                        self.counters.errors += 1;
                        log::warn!("snapshot of netns {inum}: {e}");
                    }
                }
            }
        }
        for (inum, s) in old_timewait {
            let key = key_of(inum, &s, netns_known);
            if filters.keeps_socket(&key, inum, &[]) {
                let expires = s.read_ns + u64::from(s.expires_ms) * 1_000_000;
                tracker.add_old_timewait(key, expires);
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
            let key = key_of(inum, &s, netns_known);
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
            let owner = Owner::of_holders(held_by, s.uid, |pid| {
                cgroups.get(&pid).copied().unwrap_or(0)
            });
            // Only a listener's holders are kept (`listener_pids`).
            let mut pids: Vec<u32> = Vec::new();
            if state == TcpState::Listen {
                pids.extend(held_by.iter().map(|h| h.pid));
                pids.dedup();
            }
            tracker.add_snapshot(
                Connection::from_snapshot(key, state, now, s.inode, owner),
                &pids,
            );
        }
        snap
    }

    /// The ephemeral port ranges of the namespaces the snapshot opened,
    /// keyed as events key them.
    pub fn port_ranges(
        &self,
        netns_known: bool,
    ) -> Vec<(u32, Result<crate::track::ports::PortRange, String>)> {
        let Some(ns) = &self.ns else {
            return Vec::new();
        };
        if !netns_known {
            return ns.port_range(0).map(|r| (0, r)).into_iter().collect();
        }
        let mut inums = vec![ns.own()];
        inums.extend(ns.opened().filter(|&i| i != ns.own()));
        inums
            .into_iter()
            .filter_map(|i| Some((i, ns.port_range(i)?)))
            .collect()
    }
}

/// A snapshot socket's key, as events key it (netns 0 without kernel
/// offsets: events then carry 0).
fn key_of(inum: u32, s: &DiagSocket, netns_known: bool) -> TupleKey {
    TupleKey {
        netns: if netns_known { inum } else { 0 },
        family: s.family,
        laddr: s.laddr,
        lport: s.lport,
        raddr: s.raddr,
        rport: s.rport,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::procfs::Holder;

    #[test]
    fn one_holder_is_the_owner_several_share_their_comm() {
        let h = |pid, comm: &str, fd| Holder {
            pid,
            comm: comm.into(),
            fd,
        };
        let of = |holders: &[Holder]| {
            let cgroups = HashMap::from([(5, 9), (6, 9)]);
            Owner::of_holders(holders, 7, |pid| cgroups[&pid])
                .map(|o| (o.pid, o.comm.as_str().into_owned(), o.uid, o.cgroup))
        };
        assert_eq!(
            of(&[h(5, "srv", 3), h(5, "srv", 4)]),
            Some((5, "srv".into(), 7, 9))
        );
        // A prefork server's listener: its comm, no pid.
        assert_eq!(
            of(&[h(5, "srv", 3), h(6, "srv", 3)]),
            Some((0, "srv".into(), 7, 9))
        );
        assert_eq!(of(&[h(5, "srv", 3), h(6, "other", 3)]), None);
        assert_eq!(of(&[]), None);
    }
}
