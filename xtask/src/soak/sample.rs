//! What the soak reads about the tracer's process: VmRSS, the open fds
//! (how many, and which are network namespaces and sockets) and CPU time
//! (`/proc/PID/stat`: it keeps the time of threads that have ended; the
//! tracer runs short-lived threads in other namespaces).

use std::{collections::BTreeSet, fs};

use serde_json::{json, Value};

use super::fit::Sample;
use crate::bench::procfs::{fd_kinds, parse_stat_cpu_ticks, parse_status_kib};

/// The tracer's open fds, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FdCensus {
    pub total: u64,
    /// `net:[INODE]` links: network namespaces.
    pub netns_fds: u64,
    /// The namespaces they are.
    pub netns: BTreeSet<u64>,
    /// `socket:[…]` (netlink, the metrics listener, …).
    pub sockets: u64,
}

impl FdCensus {
    /// From (fd, link target) pairs as in /proc/PID/fd.
    pub(crate) fn of(links: &[(String, String)]) -> FdCensus {
        let mut c = FdCensus {
            total: links.len() as u64,
            ..Default::default()
        };
        for (_, target) in links {
            if let Some(ino) = target
                .strip_prefix("net:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                c.netns_fds += 1;
                c.netns.insert(ino);
            } else if target.starts_with("socket:[") {
                c.sockets += 1;
            }
        }
        c
    }

    pub(crate) fn read(pid: i32) -> Option<FdCensus> {
        fs::metadata(format!("/proc/{pid}")).ok()?;
        Some(FdCensus::of(&fd_kinds(pid)))
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({"total": self.total, "netns_fds": self.netns_fds, "sockets": self.sockets})
    }
}

/// VmRSS, fds and CPU time now; None once the process is gone.
pub(super) fn sample(pid: i32, t: f64, loaded: bool) -> Option<Sample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fds = FdCensus::read(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Sample {
        t,
        loaded,
        rss_kib: parse_status_kib(&status, "VmRSS")?,
        fds: fds.total,
        netns_fds: fds.netns_fds,
        cpu_s: parse_stat_cpu_ticks(&stat)? as f64 / hz,
    })
}

/// VmHWM (KiB): the peak resident size so far.
pub(super) fn hwm_kib(pid: i32) -> Option<u64> {
    parse_status_kib(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "VmHWM",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn census_of_fd_links() {
        let l = |fd: &str, t: &str| (fd.to_string(), t.to_string());
        let c = FdCensus::of(&[
            l("0", "/dev/null"),
            l("1", "pipe:[123]"),
            l("3", "anon_inode:bpf-prog"),
            l("4", "net:[4026531840]"),
            l("5", "socket:[99]"),
            l("6", "net:[4026532301]"),
            l("7", "socket:[100]"),
            l("8", "net:[4026532301]"),
        ]);
        assert_eq!(c.total, 8);
        assert_eq!(
            c.netns.iter().copied().collect::<Vec<_>>(),
            vec![4026531840, 4026532301]
        );
        assert_eq!(c.netns_fds, 3);
        assert_eq!(c.sockets, 2);
    }
}
