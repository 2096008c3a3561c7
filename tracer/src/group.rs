//! What a state stay is grouped by: `--group-by` for summaries and the
//! opt-in label of the metrics. Keys are small `Copy` values, so looking
//! one up allocates nothing.

use std::{collections::HashMap, fmt, net::IpAddr};

use clap::ValueEnum;

use crate::{
    events::{Comm, Transition},
    tracker::{Tracker, Update},
};

/// A field of a connection to split summaries by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum GroupBy {
    /// Local port.
    Lport,
    /// Remote port.
    Rport,
    /// Remote address.
    Raddr,
    /// Owner's command name.
    Comm,
    /// Owner's process id.
    Pid,
}

impl GroupBy {
    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Lport => "lport",
            GroupBy::Rport => "rport",
            GroupBy::Raddr => "raddr",
            GroupBy::Comm => "comm",
            GroupBy::Pid => "pid",
        }
    }

    /// The key of a stay that ended with transition `t`. `owner` is only
    /// called for `comm` and `pid`.
    pub fn key(self, t: &Transition, owner: impl FnOnce() -> Owner) -> GroupKey {
        self.key_of(t.lport, t.rport, t.raddr, owner)
    }

    pub fn key_of(
        self,
        lport: u16,
        rport: u16,
        raddr: IpAddr,
        owner: impl FnOnce() -> Owner,
    ) -> GroupKey {
        match self {
            GroupBy::Lport => GroupKey::Port(lport),
            GroupBy::Rport => GroupKey::Port(rport),
            GroupBy::Raddr => GroupKey::Addr(raddr),
            GroupBy::Comm => GroupKey::Comm(owner().comm),
            GroupBy::Pid => GroupKey::Pid(owner().pid),
        }
    }
}

/// One value of a [`GroupBy`] field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupKey {
    Port(u16),
    Addr(IpAddr),
    Comm(Comm),
    Pid(u32),
}

impl GroupKey {
    /// As a JSON value: a number for ports and pids, a string otherwise.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            GroupKey::Port(p) => (*p).into(),
            GroupKey::Pid(p) => (*p).into(),
            GroupKey::Addr(a) => a.to_string().into(),
            GroupKey::Comm(c) => c.as_str().into(),
        }
    }
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupKey::Port(p) => write!(f, "{p}"),
            GroupKey::Pid(p) => write!(f, "{p}"),
            GroupKey::Addr(a) => write!(f, "{a}"),
            GroupKey::Comm(c) => f.write_str(&c.as_str()),
        }
    }
}

/// The task a stay is attributed to when grouping by `comm` or `pid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
}

/// The owner of the socket of `t` as the tracker knows it once `t` is
/// applied (see the tracker's owner rule), or the task current when `t`
/// fired if the tracker does not follow the socket.
pub fn owner(t: &Transition, tracker: &Tracker, update: &Update) -> Owner {
    let (pid, comm) = match update {
        Update::Closed(c) => (c.pid, c.comm),
        _ => match tracker.get(t.sock) {
            Some(c) => (c.pid, c.comm),
            None => (t.pid, t.comm),
        },
    };
    Owner { pid, comm }
}

/// Numbers for at most `cap` distinct keys, first come first served: a
/// key keeps its number for good (metric series must not change meaning);
/// keys past the cap get [`Slot::Other`].
pub struct BoundedKeys {
    index: HashMap<GroupKey, usize>,
    cap: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Seen before.
    Known(usize),
    /// Seen for the first time now, and numbered.
    New(usize),
    /// Past the cap.
    Other,
}

impl BoundedKeys {
    pub fn new(cap: usize) -> Self {
        BoundedKeys {
            index: HashMap::with_capacity(cap),
            cap,
        }
    }

    pub fn slot(&mut self, key: GroupKey) -> Slot {
        if let Some(&i) = self.index.get(&key) {
            return Slot::Known(i);
        }
        let n = self.index.len();
        if n >= self.cap {
            return Slot::Other;
        }
        self.index.insert(key, n);
        Slot::New(n)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{tests::comm, tests::sample, TcpState};

    #[test]
    fn keys_come_from_the_transition_or_the_owner() {
        let t = sample();
        let nobody = || panic!("owner not needed");
        assert_eq!(GroupBy::Lport.key(&t, nobody), GroupKey::Port(43210));
        assert_eq!(GroupBy::Rport.key(&t, nobody), GroupKey::Port(80));
        assert_eq!(
            GroupBy::Raddr.key(&t, nobody).to_string(),
            "10.1.2.3".to_string()
        );
        let owner = || Owner {
            pid: 7,
            comm: comm("nginx"),
        };
        assert_eq!(GroupBy::Pid.key(&t, owner), GroupKey::Pid(7));
        assert_eq!(GroupBy::Comm.key(&t, owner).to_json(), "nginx");
        assert_eq!(GroupBy::Lport.key(&t, owner).to_json(), 43210);
    }

    #[test]
    fn owner_is_the_trackers_when_it_follows_the_socket() {
        let mut tracker = Tracker::new(4);
        let mut connect = Transition {
            old: TcpState::Close,
            new: TcpState::SynSent,
            old_state_ns: None,
            pid: 10,
            comm: comm("client"),
            ..sample()
        };
        let u = tracker.on_transition(&connect);
        assert_eq!(owner(&connect, &tracker, &u).pid, 10);
        // A softirq transition on another task: still the owner's.
        connect.old = TcpState::SynSent;
        connect.new = TcpState::Established;
        connect.pid = 0;
        connect.comm = comm("swapper/1");
        let u = tracker.on_transition(&connect);
        assert_eq!(owner(&connect, &tracker, &u).comm, comm("client"));
        // Closed: the record's owner.
        connect.old = TcpState::Established;
        connect.new = TcpState::Close;
        let u = tracker.on_transition(&connect);
        assert!(matches!(u, Update::Closed(_)));
        assert_eq!(owner(&connect, &tracker, &u).pid, 10);
        // Not followed: the current task.
        let full = Tracker::new(0);
        assert_eq!(owner(&connect, &full, &Update::Untracked).pid, 0);
    }

    #[test]
    fn bounded_keys_keep_their_numbers_and_cap() {
        let mut k = BoundedKeys::new(2);
        assert_eq!(k.slot(GroupKey::Port(1)), Slot::New(0));
        assert_eq!(k.slot(GroupKey::Port(2)), Slot::New(1));
        assert_eq!(k.slot(GroupKey::Port(1)), Slot::Known(0));
        assert_eq!(k.slot(GroupKey::Port(3)), Slot::Other);
        assert_eq!(k.slot(GroupKey::Port(2)), Slot::Known(1));
    }
}
