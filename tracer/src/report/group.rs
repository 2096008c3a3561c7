//! What a state stay is grouped by: `--group-by` for summaries and the
//! opt-in label of the metrics. Keys are small `Copy` values, so looking
//! one up allocates nothing.

use std::{collections::HashMap, fmt, net::IpAddr};

use clap::ValueEnum;

use crate::{
    kernel::events::{Comm, Transition},
    track::containers::ContainerKey,
    track::tracker::Owner,
};

/// A socket's owner as summaries and metrics key it: the owner, and its
/// container when a key or label needs one (the agent resolves it from
/// the owner's cgroup as it names the owner; the tracker keeps none, as
/// it would cost every connection it holds 32 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NamedOwner {
    pub owner: Owner,
    pub container: Option<ContainerKey>,
}

impl From<Owner> for NamedOwner {
    fn from(owner: Owner) -> Self {
        NamedOwner {
            owner,
            container: None,
        }
    }
}

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
    /// Owner's cgroup v2 path.
    Cgroup,
    /// Owner's container id.
    Container,
}

impl GroupBy {
    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Lport => "lport",
            GroupBy::Rport => "rport",
            GroupBy::Raddr => "raddr",
            GroupBy::Comm => "comm",
            GroupBy::Pid => "pid",
            GroupBy::Cgroup => "cgroup",
            GroupBy::Container => "container",
        }
    }

    /// The key of a stay that ended with transition `t`, whose socket's
    /// owner is `owner` (as the output names it).
    pub fn key(self, t: &Transition, owner: Option<&NamedOwner>) -> GroupKey {
        self.key_of(t.lport, t.rport, t.raddr, owner)
    }

    pub fn key_of(
        self,
        lport: u16,
        rport: u16,
        raddr: IpAddr,
        owner: Option<&NamedOwner>,
    ) -> GroupKey {
        match (self, owner) {
            (GroupBy::Lport, _) => GroupKey::Port(lport),
            (GroupBy::Rport, _) => GroupKey::Port(rport),
            (GroupBy::Raddr, _) => GroupKey::Addr(raddr),
            (GroupBy::Comm, Some(o)) => GroupKey::Comm(o.owner.comm),
            (GroupBy::Pid, Some(o)) if o.owner.pid != 0 => GroupKey::Pid(o.owner.pid),
            (GroupBy::Cgroup, Some(o)) if o.owner.cgroup != 0 => GroupKey::Cgroup(o.owner.cgroup),
            (GroupBy::Container, Some(o)) => match o.container {
                Some(c) => GroupKey::Container(c),
                None => GroupKey::NoContainer,
            },
            (GroupBy::Comm | GroupBy::Pid | GroupBy::Cgroup | GroupBy::Container, _) => {
                GroupKey::NoOwner
            }
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
    /// A cgroup v2 id (printed as its path, `containers::label`).
    Cgroup(u64),
    Container(ContainerKey),
    /// An owner in no container.
    NoContainer,
    /// `comm`, `pid`, `cgroup` or `container` of a socket whose owner
    /// (or its cgroup) is not known.
    NoOwner,
}

impl GroupKey {
    /// As a JSON value: a number for ports and pids, a string otherwise,
    /// null for an unknown owner.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            GroupKey::Port(p) => (*p).into(),
            GroupKey::Pid(p) => (*p).into(),
            GroupKey::Addr(a) => a.to_string().into(),
            GroupKey::Comm(c) => c.as_str().into(),
            GroupKey::Cgroup(id) => crate::track::containers::label(*id).into(),
            GroupKey::Container(c) => c.id().into(),
            GroupKey::NoOwner | GroupKey::NoContainer => serde_json::Value::Null,
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
            GroupKey::Cgroup(id) => f.write_str(&crate::track::containers::label(*id)),
            GroupKey::Container(c) => write!(f, "{c}"),
            GroupKey::NoContainer => f.write_str("none"),
            GroupKey::NoOwner => f.write_str("unknown"),
        }
    }
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
    use crate::kernel::events::tests::{comm, sample};

    #[test]
    fn keys_come_from_the_transition_or_the_owner() {
        let t = sample();
        let nginx = NamedOwner::from(Owner {
            pid: 7,
            comm: comm("nginx"),
            uid: 0,
            ..Default::default()
        });
        let o = Some(&nginx);
        assert_eq!(GroupBy::Lport.key(&t, None), GroupKey::Port(43210));
        assert_eq!(GroupBy::Rport.key(&t, None), GroupKey::Port(80));
        assert_eq!(GroupBy::Raddr.key(&t, o).to_string(), "10.1.2.3");
        assert_eq!(GroupBy::Pid.key(&t, o), GroupKey::Pid(7));
        assert_eq!(GroupBy::Comm.key(&t, o).to_json(), "nginx");
        assert_eq!(GroupBy::Lport.key(&t, o).to_json(), 43210);
        // No owner known: one group of its own.
        assert_eq!(GroupBy::Comm.key(&t, None), GroupKey::NoOwner);
        assert_eq!(
            GroupBy::Pid.key(&t, None).to_json(),
            serde_json::Value::Null
        );
        assert_eq!(GroupKey::NoOwner.to_string(), "unknown");
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

    #[test]
    fn cgroup_and_container_keys_come_from_the_owner() {
        let id = "ab".repeat(32);
        let container = crate::track::containers::key_of(&id, "docker");
        let o = NamedOwner {
            owner: Owner {
                pid: 5,
                cgroup: 77,
                ..Default::default()
            },
            container,
        };
        let t = crate::kernel::events::tests::sample();
        assert_eq!(GroupBy::Cgroup.key(&t, Some(&o)), GroupKey::Cgroup(77));
        let k = GroupBy::Container.key(&t, Some(&o));
        assert_eq!(k.to_json(), serde_json::Value::from(id));
        assert_eq!(k.to_string(), "docker:abababababab");
        let bare = NamedOwner::from(Owner {
            cgroup: 0,
            ..o.owner
        });
        assert_eq!(
            GroupBy::Container.key(&t, Some(&bare)),
            GroupKey::NoContainer
        );
        assert_eq!(GroupKey::NoContainer.to_string(), "none");
        assert_eq!(GroupBy::Cgroup.key(&t, Some(&bare)), GroupKey::NoOwner);
        assert_eq!(GroupBy::Cgroup.key(&t, None), GroupKey::NoOwner);
    }
}
