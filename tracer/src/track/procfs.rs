//! What only /proc tells: which processes hold a socket (by inode), and
//! which network namespaces exist.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use serde::Serialize;

/// A process holding a socket through a file descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    pub fd: u32,
}

fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

pub fn comm_of(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// `socket:[12345]` -> 12345
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Every (pid, fd) holding one of `inodes`, in one pass over /proc/*/fd.
/// Cost grows with the number of open files on the machine, so callers
/// batch their questions.
pub fn socket_holders(inodes: &HashSet<u64>) -> HashMap<u64, Vec<Holder>> {
    let mut found: HashMap<u64, Vec<Holder>> = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    for pid in pids() {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let mut comm: Option<String> = None;
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(ino) = link.to_str().and_then(socket_inode) else {
                continue;
            };
            if !inodes.contains(&ino) {
                continue;
            }
            let Some(fdnum) = fd.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let comm = comm
                .get_or_insert_with(|| comm_of(pid).unwrap_or_default())
                .clone();
            found.entry(ino).or_default().push(Holder {
                pid,
                comm,
                fd: fdnum,
            });
        }
    }
    for holders in found.values_mut() {
        holders.sort_by_key(|h| (h.pid, h.fd));
    }
    found
}

/// Network namespace inode -> a path that opens it. Threads are included
/// (a thread can live in a namespace of its own), and so are namespaces
/// kept by `ip netns` in /run/netns with no process in them.
pub fn network_namespaces() -> HashMap<u32, PathBuf> {
    let mut out = HashMap::new();
    for e in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        if let Ok(m) = fs::metadata(e.path()) {
            out.entry(m.ino() as u32).or_insert(e.path());
        }
    }
    for pid in pids() {
        let mut paths = vec![PathBuf::from(format!("/proc/{pid}/ns/net"))];
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if t.file_name().to_str() != Some(&pid.to_string()) {
                    paths.push(t.path().join("ns/net"));
                }
            }
        }
        for p in paths {
            if let Ok(m) = fs::metadata(&p) {
                out.entry(m.ino() as u32).or_insert(p);
            }
        }
    }
    out
}

/// Network namespaces bound to a path (`ip netns add`, container
/// runtimes): the `nsfs` mounts of this mount namespace, whose root reads
/// `net:[INODE]`.
pub fn mounted_network_namespaces() -> Vec<u32> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| nsfs_mounts(&t))
        .unwrap_or_default()
}

fn nsfs_mounts(mountinfo: &str) -> Vec<u32> {
    mountinfo
        .lines()
        .filter_map(|l| {
            // "ID PARENT MAJ:MIN ROOT MOUNT OPTS [TAGS] - FSTYPE SOURCE SUPER"
            let (head, tail) = l.split_once(" - ")?;
            if tail.split_whitespace().next()? != "nsfs" {
                return None;
            }
            let root = head.split_whitespace().nth(3)?;
            root.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The value of `TcpExt: name` in a /proc/net/netstat text.
pub fn netstat_value(text: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names.split_whitespace().position(|n| n == name)?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn netstat_parsing() {
        let text = "TcpExt: SyncookiesSent TCPTimeWaitOverflow TW\nTcpExt: 0 17 5\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(netstat_value(text, "TCPTimeWaitOverflow"), Some(17));
        assert_eq!(netstat_value(text, "TW"), Some(5));
        assert_eq!(netstat_value(text, "Nope"), None);
    }

    #[test]
    fn finds_our_own_socket_and_namespace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd as _;
        let fd = listener.as_raw_fd() as u32;
        let link = fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let ino = socket_inode(link.to_str().unwrap()).unwrap();
        let holders = socket_holders(&HashSet::from([ino]));
        let me = std::process::id();
        assert!(
            holders[&ino].iter().any(|h| h.pid == me && h.fd == fd),
            "{holders:?}"
        );
        let own = fs::metadata("/proc/self/ns/net").unwrap().ino() as u32;
        assert!(network_namespaces().contains_key(&own));
    }

    #[test]
    fn bound_namespaces_are_the_nsfs_mounts() {
        let text = "\
29 1 0:4 net:[4026532301] /run/netns/blue rw,shared:5 - nsfs nsfs rw
30 1 0:4 mnt:[4026532302] /run/x rw - nsfs nsfs rw
31 1 0:25 / /sys rw - sysfs sysfs rw
32 1 0:4 net:[4026532400] /var/run/docker/netns/ab rw - nsfs nsfs rw";
        assert_eq!(nsfs_mounts(text), vec![4026532301, 4026532400]);
    }
}
