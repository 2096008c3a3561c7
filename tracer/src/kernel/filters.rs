//! The filters users give on the command line, validated, and their
//! in-kernel form (constants and small maps set before attach; see
//! `tracer-ebpf/src/filter.rs`).

use std::{net::IpAddr, os::unix::fs::MetadataExt as _};

use ipnet::IpNet;

use crate::kernel::events::{Family, TcpState};

/// All filters; every one that is given must pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    pub family: Option<Family>,
    /// Local or remote port.
    pub ports: Vec<u16>,
    pub lports: Vec<u16>,
    pub rports: Vec<u16>,
    pub laddrs: Vec<IpNet>,
    pub raddrs: Vec<IpNet>,
    /// Transitions into or out of these states.
    pub states: Vec<TcpState>,
    /// Network namespace inode.
    pub netns: Option<u32>,
    /// Owner pid (tgid) and comm.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Owner's cgroup, or one below it (`--cgroup`, `--container`).
    pub cgroups: Vec<crate::track::containers::Selected>,
    /// The start-up snapshot's verdicts on `cgroups` per holder pid: one
    /// look-up per process, not per socket (each is a read of /proc and a
    /// stat per level). Only the snapshot asks, so pids are not reused
    /// meanwhile.
    pub under_cgroups: std::cell::RefCell<std::collections::HashMap<u32, bool>>,
}

impl Filters {
    pub fn state_mask(&self) -> u16 {
        self.states.iter().fold(0, |m, s| m | (1 << (*s as u16)))
    }

    /// `--comm` as the kernel compares it: NUL-padded 16 bytes.
    pub fn comm_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        if let Some(c) = &self.comm {
            out[..c.len()].copy_from_slice(c.as_bytes());
        }
        out
    }

    pub fn owner_filter(&self) -> bool {
        self.pid.is_some() || self.comm.is_some() || !self.cgroups.is_empty()
    }

    /// Bit per hierarchy level of a selected cgroup (the kernel's
    /// `FILTER_CGROUP_LEVELS`).
    pub fn cgroup_levels(&self) -> u32 {
        self.cgroups.iter().fold(0, |m, c| m | (1 << c.level))
    }
}

impl Filters {
    /// Does a socket found by the start-up snapshot (in namespace `inum`,
    /// held by `holders`) pass the filters the kernel applies to events?
    /// `--state` is left out: any socket may still make a transition into
    /// or out of the given states.
    pub fn keeps_socket(
        &self,
        key: &crate::track::tracker::TupleKey,
        inum: u32,
        holders: &[crate::track::procfs::Holder],
    ) -> bool {
        let in_nets = |nets: &[IpNet], a: IpAddr| {
            nets.is_empty() || nets.iter().any(|n| n.contains(&unmap(a)))
        };
        let in_ports = |ports: &[u16], p: u16| ports.is_empty() || ports.contains(&p);
        self.family.is_none_or(|f| f == key.family)
            && (self.ports.is_empty()
                || self.ports.contains(&key.lport)
                || self.ports.contains(&key.rport))
            && in_ports(&self.lports, key.lport)
            && in_ports(&self.rports, key.rport)
            && in_nets(&self.laddrs, key.laddr)
            && in_nets(&self.raddrs, key.raddr)
            && self.netns.is_none_or(|n| n == inum)
            && self.owner_matches(holders)
    }

    /// Does a socket held by `holders` pass `--pid`/`--comm`/`--cgroup`?
    pub fn owner_matches(&self, holders: &[crate::track::procfs::Holder]) -> bool {
        let ids: Vec<u64> = self.cgroups.iter().map(|c| c.id).collect();
        self.pid.is_none_or(|p| holders.iter().any(|h| h.pid == p))
            && self
                .comm
                .as_deref()
                .is_none_or(|c| holders.iter().any(|h| h.comm == c))
            && (ids.is_empty()
                || holders.iter().any(|h| {
                    *self
                        .under_cgroups
                        .borrow_mut()
                        .entry(h.pid)
                        .or_insert_with(|| crate::track::containers::pid_under(h.pid, &ids))
                }))
    }
}

/// IPv4-mapped IPv6 as IPv4, so that `10.0.0.0/8` matches `::ffff:10.0.0.1`
/// as it does in the kernel's tries.
fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// An LPM trie key for a prefix: 16 bytes, IPv4 as `::ffff:a.b.c.d/96+n`.
pub fn lpm_key(net: &IpNet) -> (u32, [u8; 16]) {
    match net {
        IpNet::V4(n) => (
            96 + u32::from(n.prefix_len()),
            n.network().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{s}` is not an address or CIDR prefix (examples: 10.0.0.0/8, ::1)"))
}

/// A TCP state by its name (`CLOSE_WAIT`, case-insensitive).
pub fn parse_state(s: &str) -> Result<TcpState, String> {
    let up = s.to_ascii_uppercase().replace('-', "_");
    TcpState::ALL
        .into_iter()
        .find(|st| st.name() == up)
        .ok_or_else(|| {
            let names: Vec<&str> = TcpState::ALL.iter().map(|s| s.name()).collect();
            format!("unknown TCP state `{s}` (one of {})", names.join(", "))
        })
}

/// A network namespace: a path (`/proc/<pid>/ns/net`, `/run/netns/NAME`)
/// or an inode number.
pub fn parse_netns(s: &str) -> Result<u32, String> {
    if let Ok(ino) = s.parse::<u32>() {
        return if ino == 0 {
            Err("netns inode 0 does not exist".into())
        } else {
            Ok(ino)
        };
    }
    let meta =
        std::fs::metadata(s).map_err(|e| format!("cannot open network namespace `{s}`: {e}"))?;
    u32::try_from(meta.ino())
        .map_err(|_| format!("`{s}` has an inode beyond 32 bits; not a namespace"))
}

pub fn parse_comm(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 {
        return Err(format!(
            "`{s}`: a comm has 1 to 15 bytes (the kernel truncates names to 15)"
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_their_trie_keys() {
        let v4 = parse_cidr("10.1.2.3/8").unwrap();
        assert_eq!(v4.to_string(), "10.0.0.0/8");
        let (len, key) = lpm_key(&v4);
        assert_eq!(len, 104);
        assert_eq!(&key[10..13], &[0xff, 0xff, 10]);
        let host = parse_cidr("::1").unwrap();
        assert_eq!(lpm_key(&host).0, 128);
        assert_eq!(lpm_key(&parse_cidr("127.0.0.1").unwrap()).0, 128);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("bogus").is_err());
    }

    #[test]
    fn states_by_name() {
        assert_eq!(parse_state("close_wait"), Ok(TcpState::CloseWait));
        assert_eq!(parse_state("TIME-WAIT"), Ok(TcpState::TimeWait));
        assert!(parse_state("OPEN").unwrap_err().contains("CLOSE_WAIT"));
        let f = Filters {
            states: vec![TcpState::Established, TcpState::Close],
            ..Default::default()
        };
        assert_eq!(f.state_mask(), (1 << 1) | (1 << 7));
    }

    #[test]
    fn snapshot_sockets_pass_the_same_filters() {
        use crate::{track::procfs::Holder, track::tracker::TupleKey};
        let key = TupleKey {
            netns: 7,
            family: Family::Ipv4,
            laddr: "10.0.0.1".parse().unwrap(),
            lport: 80,
            raddr: "192.0.2.9".parse().unwrap(),
            rport: 40000,
        };
        let nginx = [Holder {
            pid: 5,
            comm: "nginx".into(),
            fd: 3,
        }];
        assert!(Filters::default().keeps_socket(&key, 7, &[]));
        let f = |f: Filters| f.keeps_socket(&key, 7, &nginx);
        assert!(f(Filters {
            ports: vec![80],
            ..Default::default()
        }));
        assert!(!f(Filters {
            ports: vec![81],
            ..Default::default()
        }));
        assert!(!f(Filters {
            rports: vec![80],
            ..Default::default()
        }));
        assert!(f(Filters {
            laddrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
            ..Default::default()
        }));
        assert!(!f(Filters {
            raddrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
            ..Default::default()
        }));
        assert!(!f(Filters {
            family: Some(Family::Ipv6),
            ..Default::default()
        }));
        assert!(!f(Filters {
            netns: Some(8),
            ..Default::default()
        }));
        assert!(f(Filters {
            pid: Some(5),
            comm: Some("nginx".into()),
            ..Default::default()
        }));
        assert!(!f(Filters {
            comm: Some("curl".into()),
            ..Default::default()
        }));
        let mapped = TupleKey {
            family: Family::Ipv6,
            laddr: "::ffff:10.0.0.1".parse().unwrap(),
            ..key
        };
        assert!(Filters {
            laddrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
            ..Default::default()
        }
        .keeps_socket(&mapped, 7, &[]));
    }

    #[test]
    fn namespaces_and_comms() {
        assert!(parse_netns("/proc/self/ns/net").unwrap() > 0);
        assert_eq!(parse_netns("4026531840"), Ok(4026531840));
        assert!(parse_netns("/nonexistent/ns")
            .unwrap_err()
            .contains("cannot open"));
        assert!(parse_netns("0").is_err());
        assert!(parse_comm("a-name-longer-than-15").is_err());
        let f = Filters {
            comm: Some("nginx".into()),
            ..Default::default()
        };
        assert_eq!(&f.comm_bytes()[..6], b"nginx\0");
        assert!(f.owner_filter());
    }
}
