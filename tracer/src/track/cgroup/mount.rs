//! Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo.
//!
//! Not always at /sys/fs/cgroup: hybrid hosts (systemd's v1 controllers
//! plus a controller-less v2) mount it at /sys/fs/cgroup/unified, and this
//! is what the development machine does.

use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the hierarchy that is mounted (`/` unless the
    /// mount was made inside a cgroup namespace or as a bind mount).
    pub root: String,
    pub mount_point: PathBuf,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One mountinfo line -> (root, mount point, fstype).
/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`
fn fields(line: &str) -> Option<(String, PathBuf, &str)> {
    let (before, after) = line.split_once(" - ")?;
    let mut pre = before.split(' ');
    let root = pre.nth(3)?;
    let mount_point = pre.next()?;
    let fstype = after.split(' ').next()?;
    Some((unescape(root), PathBuf::from(unescape(mount_point)), fstype))
}

/// The cgroup v2 mount of a mountinfo text: the first one of the whole
/// hierarchy (root `/`) if any, otherwise the first one.
pub fn cgroup2(mountinfo: &str) -> Option<Mount> {
    let mounts: Vec<Mount> = mountinfo
        .lines()
        .filter_map(fields)
        .filter(|(_, _, fstype)| *fstype == "cgroup2")
        .map(|(root, mount_point, _)| Mount { root, mount_point })
        .collect();
    let whole = mounts.iter().position(|m| m.root == "/");
    mounts.into_iter().nth(whole.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(root: &str, mount_point: &str) -> Option<Mount> {
        Some(Mount {
            root: root.into(),
            mount_point: mount_point.into(),
        })
    }

    #[test]
    fn hybrid_host_has_v2_at_unified() {
        // This machine's lines (v1 controllers, a controller-less v2).
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2(text), at("/", "/sys/fs/cgroup/unified"));
    }

    #[test]
    fn unified_host() {
        // Debian 12 / Fedora, systemd's default: optional fields before `-`.
        let text = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        assert_eq!(cgroup2(text), at("/", "/sys/fs/cgroup"));
    }

    #[test]
    fn prefers_the_whole_hierarchy_and_unescapes() {
        // Inside a container (cgroup namespace) then a bind of the host's.
        let text = "\
1211 1203 0:27 /../.. /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
1300 1203 0:27 / /host\\040cgroup rw,relatime master:9 - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2(text), at("/", "/host cgroup"));
        let only_ns = "1211 1203 0:27 /docker/abc /sys/fs/cgroup ro - cgroup2 cgroup rw\n";
        assert_eq!(cgroup2(only_ns), at("/docker/abc", "/sys/fs/cgroup"));
    }

    #[test]
    fn no_v2() {
        let text = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\ngarbage\n";
        assert_eq!(cgroup2(text), None);
        assert_eq!(cgroup2(""), None);
    }
}
