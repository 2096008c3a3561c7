//! One sock_diag socket per network namespace, and work done inside a
//! namespace (a short-lived thread that `setns`es: the agent's own threads
//! never move).

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use crate::{track::diag::Diag, track::ports::PortRange, track::procfs};

/// What the agent keeps of a namespace (which keeps it alive: see
/// [`Namespaces::release_dead`]).
struct Entry {
    diag: Diag,
    /// The namespace's `/proc/net/netstat` and `tcp_max_tw_buckets`,
    /// opened from inside it: a file of /proc/net or /proc/sys/net stays
    /// bound to the namespace it was opened in, so polls re-read them
    /// without joining the namespace again.
    netstat: Option<File>,
    max_tw_buckets: Option<File>,
    /// Its ephemeral port range, read when opened (or why it could not be).
    port_range: Result<PortRange, String>,
}

/// Opens a namespace's sock_diag socket and counter files, and reads its
/// ephemeral port range, from a thread inside it.
fn open_inside() -> io::Result<Entry> {
    Ok(Entry {
        diag: Diag::new()?,
        netstat: File::open("/proc/thread-self/net/netstat").ok(),
        max_tw_buckets: File::open("/proc/sys/net/ipv4/tcp_max_tw_buckets").ok(),
        port_range: read_port_range(),
    })
}

/// The calling thread's namespace's `ip_local_port_range` less
/// `ip_local_reserved_ports`.
fn read_port_range() -> Result<PortRange, String> {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .map_err(|e| format!("reading {name}: {e}"))
    };
    PortRange::parse(
        &read("ip_local_port_range")?,
        &read("ip_local_reserved_ports")?,
    )
}

/// The whole of `f`, read again from its start.
fn reread(f: &File) -> Option<String> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; 16 << 10];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = f.read_at(&mut buf[len..], len as u64).ok()?;
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

pub struct Namespaces {
    own: u32,
    entries: HashMap<u32, Entry>,
    /// Namespaces searched for in /proc and not found (not searched again
    /// until the next [`Namespaces::release_dead`]: an inode number is
    /// reused by a later namespace).
    missing: std::collections::HashSet<u32>,
}

fn ino(path: &Path) -> io::Result<u32> {
    Ok(std::fs::metadata(path)?.ino() as u32)
}

/// Runs `f` on a thread that has joined the namespace `ns`.
fn run_in<T: Send>(ns: &File, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd, affecting this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

impl Namespaces {
    pub fn new() -> io::Result<Namespaces> {
        let own_path = Path::new("/proc/thread-self/ns/net");
        let own = ino(own_path)?;
        let mut n = Namespaces {
            own,
            entries: HashMap::new(),
            missing: Default::default(),
        };
        n.entries.insert(own, open_inside()?);
        Ok(n)
    }

    pub fn own(&self) -> u32 {
        self.own
    }

    fn open(&mut self, inum: u32, path: &Path) -> bool {
        let Ok(ns) = File::open(path) else {
            return false;
        };
        if ns.metadata().map(|m| m.ino() as u32).ok() != Some(inum) {
            return false;
        }
        match run_in(&ns, open_inside) {
            Ok(entry) => {
                self.entries.insert(inum, entry);
                true
            }
            Err(e) => {
                log::debug!("sock_diag in netns {inum}: {e}");
                false
            }
        }
    }

    /// The sock_diag socket of namespace `inum` (0 = unknown: the agent's
    /// own). `hints` are (pid, tid) of tasks seen acting on the socket; they
    /// are checked, then /proc is searched once.
    pub fn diag(&mut self, inum: u32, hints: &[(u32, u32)]) -> Option<&mut Diag> {
        let inum = if inum == 0 { self.own } else { inum };
        if !self.entries.contains_key(&inum) {
            let found = hints.iter().any(|&(pid, tid)| {
                self.open(inum, Path::new(&format!("/proc/{pid}/task/{tid}/ns/net")))
            });
            if !found && !self.missing.contains(&inum) {
                let all = procfs::network_namespaces();
                if !all.get(&inum).is_some_and(|p| self.open(inum, p)) {
                    self.missing.insert(inum);
                }
            }
        }
        self.entries.get_mut(&inum).map(|e| &mut e.diag)
    }

    /// Namespace `inum`'s ephemeral port range (0: the agent's own), as
    /// read when it was opened; `None` if it is not open.
    pub fn port_range(&self, inum: u32) -> Option<Result<PortRange, String>> {
        let inum = if inum == 0 { self.own } else { inum };
        self.entries.get(&inum).map(|e| e.port_range.clone())
    }

    /// The namespaces held open.
    pub fn opened(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.keys().copied()
    }

    /// Was `inum` searched for and not found?
    pub fn is_missing(&self, inum: u32) -> bool {
        self.missing.contains(&inum)
    }

    /// Namespaces held open (the agent's own included).
    pub fn open_count(&self) -> usize {
        self.entries.len()
    }

    /// Closes the namespaces that nothing else holds any more: no process
    /// or thread is in them and no bind mount (`ip netns`, container
    /// runtimes) keeps them. Their file and sock_diag socket were all that
    /// kept them alive, with whatever timewait sockets were left in them.
    /// Returns the inodes released.
    pub fn release_dead(&mut self) -> Vec<u32> {
        self.missing.clear();
        if self.entries.len() <= 1 {
            return Vec::new();
        }
        let mut alive = procfs::network_namespaces();
        for inum in procfs::mounted_network_namespaces() {
            alive.entry(inum).or_default();
        }
        let own = self.own;
        let dead: Vec<u32> = self
            .entries
            .keys()
            .copied()
            .filter(|&i| i != own && !alive.contains_key(&i))
            .collect();
        for inum in &dead {
            self.entries.remove(inum);
        }
        dead
    }

    /// Opens every namespace /proc shows (for the start-up snapshot).
    pub fn discover_all(&mut self) -> Vec<u32> {
        for (inum, path) in procfs::network_namespaces() {
            if !self.entries.contains_key(&inum) {
                self.open(inum, &path);
            }
        }
        self.entries.keys().copied().collect()
    }

    /// Of namespace `inum`: `TcpExt: TCPTimeWaitOverflow` (active closes
    /// that got no timewait socket) and `net.ipv4.tcp_max_tw_buckets`.
    pub fn timewait_limits(&self, inum: u32) -> (Option<u64>, Option<u64>) {
        let inum = if inum == 0 { self.own } else { inum };
        let Some(entry) = self.entries.get(&inum) else {
            return (None, None);
        };
        let netstat = entry.netstat.as_ref().and_then(reread);
        let max = entry.max_tw_buckets.as_ref().and_then(reread);
        (
            netstat.and_then(|t| procfs::netstat_value(&t, "TCPTimeWaitOverflow")),
            max.and_then(|m| m.trim().parse().ok()),
        )
    }
}
