//! Names for a socket owner's cgroup: the kernel program records
//! `bpf_get_current_cgroup_id()`, which is the inode number of the cgroup's
//! directory in the v2 hierarchy; this module turns that number into the
//! cgroup's path and what the path says (container, pod, systemd unit).
//!
//! Finding a path means walking cgroupfs, so [`Resolver`] keeps a bounded
//! cache and walks at most once per [`REWALK_EVERY`]: a flood of unknown ids
//! costs one walk a second, not one per event. Ids are never reused (kernfs
//! hands out 64-bit ids in increasing order), so a cached entry is never
//! wrong, only possibly gone; a gone cgroup keeps resolving to its last
//! known path while it stays in the cache, which is what a socket that
//! outlives its container (TIME_WAIT) needs.
//!
//! The cache is rebuilt by each walk, not grown per look-up: it then holds
//! the id asked for, the live cgroups in walk order (shallow first), then
//! the gone ones still known (most recently inserted first), and whatever
//! passes `capacity` is dropped in that order. Only a walk inserts, so a
//! look-up never evicts.

mod mount;
mod path;
mod pods;

use std::{
    collections::{HashMap, VecDeque},
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;
use thiserror::Error;

pub use mount::{cgroup2 as cgroup2_mount, Mount};
pub use path::{parse, Container, Parsed, Runtime};
pub use pods::{find_pod, Pod, POD_LOG_ROOT};

/// Entries a [`Resolver`] keeps by default.
pub const CAPACITY: usize = 4096;
/// The least time between two walks of the hierarchy.
pub const REWALK_EVERY: Duration = Duration::from_secs(1);
/// A walk stops after this many directories (a bound on its cost).
const MAX_WALK: usize = 1 << 16;

// `statfs::f_type` and these constants change type with the C library and
// the architecture; i64 holds them all.
#[allow(clippy::unnecessary_cast)]
const CGROUP2_SUPER_MAGIC: i64 = libc::CGROUP2_SUPER_MAGIC as i64;
#[allow(clippy::unnecessary_cast)]
const CGROUP_SUPER_MAGIC: i64 = libc::CGROUP_SUPER_MAGIC as i64;

/// Why a resolver names nothing.
#[derive(Debug, Error)]
enum Unavailable {
    #[error("no cgroup v2 hierarchy mounted")]
    NotMounted,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(io::Error),
}

/// What a cgroup id names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resolved {
    /// From the root of the v2 hierarchy, such as `/system.slice/nginx.service`.
    pub path: String,
    pub container: Option<Container>,
    pub pod: Option<Pod>,
    pub unit: Option<String>,
}

struct Entry {
    resolved: Resolved,
    /// Insertion order (larger is newer).
    seq: u64,
}

pub struct Resolver {
    /// Where the hierarchy is mounted, and the hierarchy path of that
    /// mount's root ("" when it is the whole hierarchy).
    mount: Result<(PathBuf, String), Unavailable>,
    pod_root: PathBuf,
    capacity: usize,
    every: Duration,
    cache: HashMap<u64, Entry>,
    seq: u64,
    last_walk: Option<Instant>,
    walks: u64,
}

impl Resolver {
    /// A resolver of this host's cgroup v2 hierarchy; without one it names
    /// nothing and [`Resolver::why`] says why.
    pub fn new() -> Resolver {
        let mount = match fs::read_to_string("/proc/self/mountinfo") {
            Err(e) => Err(Unavailable::Mountinfo(e)),
            Ok(text) => mount::cgroup2(&text).ok_or(Unavailable::NotMounted),
        };
        let mut r = Resolver::at(Path::new("/"), Path::new(POD_LOG_ROOT));
        r.mount = mount.map(|m| {
            // A namespaced root (`/../..`) is not a path: keep mount-relative.
            let prefix = match m.root.as_str() {
                "/" => String::new(),
                r if r.starts_with('/') && !r.contains("/..") => r.trim_end_matches('/').into(),
                _ => String::new(),
            };
            (m.mount_point, prefix)
        });
        r
    }

    /// A resolver of the hierarchy mounted at `mount_point`, naming pods
    /// from the log directories under `pod_root` (tests use any directory).
    pub fn at(mount_point: &Path, pod_root: &Path) -> Resolver {
        Resolver {
            mount: Ok((mount_point.to_path_buf(), String::new())),
            pod_root: pod_root.to_path_buf(),
            capacity: CAPACITY,
            every: REWALK_EVERY,
            cache: HashMap::new(),
            seq: 0,
            last_walk: None,
            walks: 0,
        }
    }

    /// Other bounds than [`CAPACITY`] and [`REWALK_EVERY`].
    pub fn with_limits(mut self, capacity: usize, rewalk_every: Duration) -> Resolver {
        self.capacity = capacity.max(1);
        self.every = rewalk_every;
        self
    }

    /// Why this resolver names nothing (for `-v`), or `None` if it can.
    pub fn why(&self) -> Option<String> {
        self.mount.as_ref().err().map(ToString::to_string)
    }

    /// Where the v2 hierarchy is mounted.
    pub fn mount_point(&self) -> Option<&Path> {
        self.mount.as_ref().ok().map(|(p, _)| p.as_path())
    }

    /// How many times the hierarchy was walked.
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// Cached entries.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// What cgroup `id` names: from the cache, else from a walk if the last
    /// one is at least `rewalk_every` old, else `None` (ask again later).
    /// `None` too for an id never seen, or gone and evicted.
    pub fn resolve(&mut self, id: u64) -> Option<&Resolved> {
        if !self.cache.contains_key(&id) && self.mount.is_ok() {
            let now = Instant::now();
            if self
                .last_walk
                .is_none_or(|t| now.duration_since(t) >= self.every)
            {
                self.last_walk = Some(now);
                self.walk(id);
            }
        }
        self.cache.get(&id).map(|e| &e.resolved)
    }

    fn walk(&mut self, wanted: u64) {
        let Ok((mount_point, prefix)) = &self.mount else {
            return;
        };
        let found = walk(mount_point, prefix);
        self.walks += 1;
        let pods = if found.iter().any(|(_, p)| p.contains("pod")) {
            pods::list(&self.pod_root)
        } else {
            HashMap::new()
        };
        let mut old = std::mem::take(&mut self.cache);
        let wanted_first = found.iter().filter(|(id, _)| *id == wanted);
        for (id, path) in wanted_first.chain(found.iter()) {
            if self.cache.len() >= self.capacity {
                break;
            }
            if self.cache.contains_key(id) {
                continue;
            }
            let seq = match old.remove(id) {
                Some(e) => e.seq,
                None => {
                    self.seq += 1;
                    self.seq
                }
            };
            let resolved = describe(path.clone(), &pods);
            self.cache.insert(*id, Entry { resolved, seq });
        }
        // What is left of the old cache is gone, or live past capacity.
        let mut gone: Vec<(u64, Entry)> = old.into_iter().collect();
        gone.sort_by_key(|(_, e)| std::cmp::Reverse(e.seq));
        let room = self.capacity.saturating_sub(self.cache.len());
        self.cache.extend(gone.into_iter().take(room));
    }
}

impl Default for Resolver {
    fn default() -> Resolver {
        Resolver::new()
    }
}

fn describe(path: String, pods: &HashMap<String, (String, String)>) -> Resolved {
    let parsed = path::parse(&path);
    let pod = parsed
        .pod_uid
        .map(|uid| pods::named(&uid, pods.get(&uid).cloned()));
    Resolved {
        path,
        container: parsed.container,
        pod,
        unit: parsed.unit,
    }
}

/// Every directory under `mount_point` (itself included), breadth first:
/// (inode, hierarchy path). A directory removed meanwhile is skipped.
pub(crate) fn walk(mount_point: &Path, prefix: &str) -> Vec<(u64, String)> {
    let mut found = Vec::new();
    let Ok(root) = fs::metadata(mount_point) else {
        return found;
    };
    let top = if prefix.is_empty() { "/" } else { prefix };
    found.push((root.ino(), top.to_string()));
    let mut queue = VecDeque::from([(mount_point.to_path_buf(), prefix.to_string())]);
    while let Some((dir, path)) = queue.pop_front() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if found.len() >= MAX_WALK {
                return found;
            }
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(meta) = e.metadata() else {
                continue;
            };
            let child = format!("{path}/{}", e.file_name().to_string_lossy());
            found.push((meta.ino(), child.clone()));
            queue.push_back((e.path(), child));
        }
    }
    found
}

/// The id of the cgroup v2 directory `path` (its inode number), for a
/// filter given a path. A path outside a v2 hierarchy is an error whose
/// message fits one line.
pub fn id_of_path(path: &Path) -> io::Result<u64> {
    let shown = path.display();
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{shown}: contains a NUL byte"),
        )
    })?;
    // SAFETY: statfs fills a plain C struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` outlives the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{shown}: {e}")));
    }
    let what = match st.f_type as i64 {
        CGROUP2_SUPER_MAGIC => None,
        CGROUP_SUPER_MAGIC => Some("a cgroup v1 hierarchy; cgroup ids are v2's"),
        _ => Some("not in a cgroup v2 hierarchy"),
    };
    if let Some(what) = what {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{shown}: {what}"),
        ));
    }
    let meta = fs::metadata(path).map_err(|e| io::Error::new(e.kind(), format!("{shown}: {e}")))?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{shown}: a file, not a cgroup directory"),
        ));
    }
    Ok(meta.ino())
}

#[cfg(test)]
mod tests;
