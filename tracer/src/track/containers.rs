//! The owner's cgroup and container in records, summaries and metrics,
//! and the cgroup filter's selections (`--cgroup`, `--container`).
//!
//! The kernel records the owner's cgroup v2 id where it records the pid
//! (the transitions that run in the owner's own system calls); sockets
//! older than the tracer get their holder's cgroup from
//! `/proc/PID/cgroup`. [`Cgroups`] names ids with the [`Resolver`] of
//! `cgroup/` (bounded cache, at most one walk of the hierarchy a second);
//! an id it cannot name is `null` in the records and counted.

use std::{
    collections::HashMap,
    fmt, fs,
    path::{Path, PathBuf},
    sync::{LazyLock, Mutex},
};

use serde::Serialize;

use crate::{
    report::group::NamedOwner,
    track::cgroup::{self, Container, Pod, Resolved, Resolver, Runtime},
    track::tracker::Owner,
};

/// A container as a small `Copy` value (group keys allocate nothing): the
/// 64-hex-digit id as 32 bytes, and the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContainerKey {
    id: [u8; 32],
    pub runtime: Runtime,
}

impl ContainerKey {
    pub fn of(c: &Container) -> Option<ContainerKey> {
        let mut id = [0u8; 32];
        let hex = c.id.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        for (i, b) in id.iter_mut().enumerate() {
            let pair = std::str::from_utf8(&hex[2 * i..2 * i + 2]).ok()?;
            *b = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(ContainerKey {
            id,
            runtime: c.runtime,
        })
    }

    /// The full id, 64 lowercase hex digits.
    pub fn id(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `docker:0123456789ab`: the runtime and the id as `docker ps` shows it.
impl fmt::Display for ContainerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.runtime, &self.id()[..12])
    }
}

/// Paths of the cgroup ids that group keys name (`--group-by cgroup`),
/// for printing them: a key stays a `u64`. Bounded like the resolver's
/// cache; an id past the bound prints as `cgroup <id>`.
static LABELS: LazyLock<Mutex<HashMap<u64, String>>> = LazyLock::new(Default::default);

/// How a cgroup id is shown in summaries and metric labels.
pub fn label(id: u64) -> String {
    let labels = LABELS.lock().unwrap_or_else(|e| e.into_inner());
    match labels.get(&id) {
        Some(path) => path.clone(),
        None => format!("cgroup {id}"),
    }
}

fn remember_label(id: u64, path: &str) {
    let mut labels = LABELS.lock().unwrap_or_else(|e| e.into_inner());
    if labels.len() < cgroup::CAPACITY && !labels.contains_key(&id) {
        labels.insert(id, path.to_string());
    }
}

/// A number standing for cgroup `path` where no id is known (`tracer
/// summarize` reads paths from a recording): FNV-1a of the path, with its
/// label remembered.
pub fn id_for_label(path: &str) -> u64 {
    let id = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    remember_label(id, path);
    id
}

/// A recorded container (`{"id":…, "runtime":…}`) as a key.
pub fn key_of(id: &str, runtime: &str) -> Option<ContainerKey> {
    let runtime = [
        Runtime::Docker,
        Runtime::Containerd,
        Runtime::CriO,
        Runtime::Podman,
    ]
    .into_iter()
    .find(|r| r.as_str() == runtime)?;
    ContainerKey::of(&Container {
        id: id.to_string(),
        runtime,
    })
}

/// The cgroup fields of transition, connection and stuck records.
#[derive(Debug, Default, Serialize)]
pub struct CgroupJson {
    pub cgroup: Option<String>,
    pub container: Option<Container>,
    pub pod: Option<Pod>,
}

/// The cgroup fields of a record whose owner's cgroup is unknown.
pub const NULL_CGROUP_FIELDS: &str = r#""cgroup":null,"container":null,"pod":null"#;

/// Names cgroup ids: the hierarchy's [`Resolver`] (bounded cache, at
/// most one walk a second), else the owner's `/proc/PID/cgroup`. It reads
/// files, so the agent runs it on a thread of its own ([`Cgroups::start`]).
pub struct Namer {
    resolver: Resolver,
    /// Ids the resolver could not name yet, named from their owner's
    /// `/proc/PID/cgroup` (or known not to be: `None`). The resolver walks
    /// at most once a second, so a container started within a second of
    /// the last walk would otherwise be null for up to a second. Bounded:
    /// cleared when full.
    recent: HashMap<u64, Option<Resolved>>,
}

/// Ids [`Namer`] names from `/proc` between walks.
const RECENT: usize = 256;

impl Namer {
    pub fn new(resolver: Resolver) -> Namer {
        Namer {
            resolver,
            recent: HashMap::new(),
        }
    }

    /// What cgroup `id` of process `pid` names, if it can be named.
    pub fn name(&mut self, id: u64, pid: u32) -> Option<Resolved> {
        if id == 0 || self.resolver.why().is_some() {
            return None;
        }
        if let Some(r) = self.resolver.resolve(id) {
            return Some(r.clone());
        }
        if !self.recent.contains_key(&id) {
            if self.recent.len() >= RECENT {
                self.recent.clear();
            }
            self.recent.insert(id, named_by_pid(pid, id));
        }
        self.recent.get(&id).cloned().flatten()
    }
}

/// A named cgroup id, with what records need of it written once.
struct Named {
    resolved: Resolved,
    /// `"cgroup":…,"container":…,"pod":…`, spliced into every record.
    fields: Box<str>,
    container: Option<ContainerKey>,
}

impl Named {
    fn new(resolved: Resolved) -> Named {
        let json = CgroupJson {
            cgroup: Some(resolved.path.clone()),
            container: resolved.container.clone(),
            pod: resolved.pod.clone(),
        };
        let text = serde_json::to_string(&json).unwrap_or_default();
        // `{…}` without its braces.
        let fields = text
            .get(1..text.len().saturating_sub(1))
            .unwrap_or_default();
        Named {
            container: resolved.container.as_ref().and_then(ContainerKey::of),
            fields: fields.into(),
            resolved,
        }
    }
}

/// An id as far as the cache knows it.
struct Known {
    named: Option<Named>,
    /// When it was found unnameable (CLOCK_MONOTONIC ns): asked again a
    /// second later.
    at_ns: u64,
}

/// Where names come from.
enum Source {
    /// Named on the spot (tests, `tracer summarize`).
    Inline(Namer),
    /// Asked of the naming thread; records wait for the answer (see
    /// [`Cgroups::ready`]).
    Thread {
        asks: std::sync::mpsc::SyncSender<(u64, u32)>,
        /// Ids asked and not answered, and since when.
        asked: crate::FastMap<u64, u64>,
    },
}

/// How long a record waits for its owner's cgroup to be named before it
/// is written with null fields (and counted).
pub const NAMING_WAIT_NS: u64 = 200_000_000;
/// An id found unnameable is asked again after this long.
const RETRY_NS: u64 = 1_000_000_000;

/// Names the owners' cgroups for the output, from a cache; what is not
/// cached yet is named by a [`Namer`] (on its thread, once started).
pub struct Cgroups {
    known: crate::FastMap<u64, Known>,
    source: Source,
    /// Why nothing can be named (no cgroup v2 hierarchy).
    why: Option<String>,
    /// Records whose owner had a cgroup id that could not be named: not
    /// walked yet, and the owner no longer in it (gone, or moved).
    pub unresolved: u64,
    /// Group keys or metric labels need owners' containers ([`Cgroups::enrich`]).
    keys: bool,
    /// The last id [`Cgroups::ready`] found named (0: none): most records
    /// in a row have one owner's cgroup, and this spares their look-up.
    last_named: u64,
}

impl Cgroups {
    /// `keys`: `--group-by cgroup|container` or `--metrics-label
    /// container` is on.
    pub fn new(resolver: Resolver, keys: bool) -> Cgroups {
        Cgroups {
            known: Default::default(),
            why: resolver.why(),
            source: Source::Inline(Namer::new(resolver)),
            unresolved: 0,
            keys,
            last_named: 0,
        }
    }

    /// Moves the naming to a thread of its own: the answers go to `done`
    /// (to be given to [`Cgroups::answer`]).
    pub fn start(
        &mut self,
        done: tokio::sync::mpsc::UnboundedSender<(u64, Option<Resolved>)>,
    ) -> std::io::Result<()> {
        let (asks, queue) = std::sync::mpsc::sync_channel::<(u64, u32)>(1024);
        let inline = std::mem::replace(
            &mut self.source,
            Source::Thread {
                asks,
                asked: Default::default(),
            },
        );
        let Source::Inline(mut namer) = inline else {
            return Ok(());
        };
        std::thread::Builder::new()
            .name("tracer-cgroups".into())
            .spawn(move || {
                for (id, pid) in queue {
                    if done.send((id, namer.name(id, pid))).is_err() {
                        return;
                    }
                }
            })?;
        Ok(())
    }

    pub fn keys(&self) -> bool {
        self.keys
    }

    /// Why nothing can be named (no cgroup v2), for `-v`.
    pub fn why(&self) -> Option<String> {
        self.why.clone()
    }

    /// Can a record of `owner` be written now? Its cgroup is named (or
    /// cannot be), or has waited [`NAMING_WAIT_NS`]. Otherwise the naming
    /// thread is asked (once) and the record must wait.
    pub fn ready(&mut self, owner: &Option<Owner>) -> bool {
        let (id, pid) = owner.as_ref().map_or((0, 0), |o| (o.cgroup, o.pid));
        if id == 0 || id == self.last_named || self.why.is_some() {
            return true;
        }
        // The common case, without reading the clock: named.
        let known = self.known.get(&id);
        if known.is_some_and(|k| k.named.is_some()) {
            self.last_named = id;
            return true;
        }
        let now = crate::clock::monotonic_ns();
        if known.is_some_and(|k| now < k.at_ns + RETRY_NS) {
            return true;
        }
        match &mut self.source {
            Source::Inline(namer) => {
                let named = namer.name(id, pid);
                self.remember(id, named, now);
                true
            }
            Source::Thread { asks, asked } => match asked.get(&id) {
                Some(&since) if now >= since + NAMING_WAIT_NS => {
                    asked.remove(&id);
                    self.remember(id, None, now);
                    true
                }
                Some(_) => false,
                None => {
                    if asks.try_send((id, pid)).is_err() {
                        // The thread is swamped: write it unnamed.
                        self.remember(id, None, now);
                        return true;
                    }
                    asked.insert(id, now);
                    false
                }
            },
        }
    }

    /// The naming thread's answer for `id`.
    pub fn answer(&mut self, id: u64, resolved: Option<Resolved>) {
        if let Source::Thread { asked, .. } = &mut self.source {
            asked.remove(&id);
        }
        self.remember(id, resolved, crate::clock::monotonic_ns());
    }

    /// Ids waiting for the naming thread.
    pub fn asked(&self) -> usize {
        match &self.source {
            Source::Thread { asked, .. } => asked.len(),
            Source::Inline(_) => 0,
        }
    }

    fn remember(&mut self, id: u64, resolved: Option<Resolved>, now: u64) {
        self.last_named = 0;
        if self.known.len() >= cgroup::CAPACITY {
            self.known.clear();
        }
        let named = resolved.map(Named::new);
        if let Some(n) = &named {
            remember_label(id, &n.resolved.path);
        }
        self.known.insert(id, Known { named, at_ns: now });
    }

    /// What the cache knows of `owner`'s cgroup (named on the spot when
    /// inline). `count`: an id that cannot be named counts in
    /// `unresolved` (once per record: the output's calls count, the
    /// observers' do not).
    fn lookup(&mut self, owner: &Option<Owner>, count: bool) -> Option<&Named> {
        let id = owner.as_ref().map_or(0, |o| o.cgroup);
        if id == 0 || self.why.is_some() {
            return None;
        }
        if matches!(self.source, Source::Inline(_)) {
            self.ready(owner);
        }
        let found = self.known.get(&id).and_then(|k| k.named.as_ref());
        if found.is_none() && count {
            self.unresolved += 1;
        }
        found
    }

    /// The owner with its container filled in, for the observers'
    /// `--group-by container|cgroup` and `--metrics-label container`.
    pub fn enrich(&mut self, owner: &Option<Owner>) -> Option<NamedOwner> {
        let mut o = NamedOwner::from((*owner)?);
        if !self.keys {
            return Some(o);
        }
        if let Some(n) = self.lookup(owner, false) {
            o.container = n.container;
        }
        Some(o)
    }

    /// The owner's cgroup fields as JSON (see [`NULL_CGROUP_FIELDS`]).
    pub fn json_fields(&mut self, owner: &Option<Owner>) -> &str {
        match self.lookup(owner, true) {
            Some(n) => &n.fields,
            None => NULL_CGROUP_FIELDS,
        }
    }

    pub fn json(&mut self, owner: &Option<Owner>) -> CgroupJson {
        match self.lookup(owner, true) {
            Some(n) => CgroupJson {
                cgroup: Some(n.resolved.path.clone()),
                container: n.resolved.container.clone(),
                pod: n.resolved.pod.clone(),
            },
            None => CgroupJson::default(),
        }
    }

    /// The `-w` table column: the container (`docker:0123456789ab`), else
    /// the cgroup path, else `-`.
    pub fn cell(&mut self, owner: &Option<Owner>) -> String {
        match self.lookup(owner, true) {
            Some(n) => match n.container {
                Some(k) => k.to_string(),
                None => n.resolved.path.clone(),
            },
            None => "-".into(),
        }
    }
}

/// What cgroup `id` names, if process `pid` is still in it.
fn named_by_pid(pid: u32, id: u64) -> Option<Resolved> {
    let mount = v2_mount()?;
    let path = path_of_pid(pid)?;
    let dir = dir_of(&mount, &path)?;
    if cgroup::id_of_path(&dir).ok()? != id {
        return None;
    }
    let parsed = cgroup::parse(&path);
    Some(Resolved {
        pod: parsed
            .pod_uid
            .map(|uid| cgroup::find_pod(&uid, Path::new(cgroup::POD_LOG_ROOT))),
        container: parsed.container,
        unit: parsed.unit,
        path,
    })
}

/// The cgroup v2 path of process `pid` (its `0::` line in
/// `/proc/PID/cgroup`), from the root of the hierarchy as this process
/// sees it.
pub fn path_of_pid(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// Where the v2 hierarchy is mounted, and the hierarchy path of the
/// mount's root (`/` unless namespaced or a bind mount).
fn v2_mount() -> Option<cgroup::Mount> {
    static MOUNT: LazyLock<Option<cgroup::Mount>> = LazyLock::new(|| {
        let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
        cgroup::cgroup2_mount(&text)
    });
    MOUNT.clone()
}

/// The directory of hierarchy path `path` under the v2 mount.
fn dir_of(mount: &cgroup::Mount, path: &str) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    let rel = path.strip_prefix(root)?;
    if !rel.is_empty() && !rel.starts_with('/') {
        return None;
    }
    Some(mount.mount_point.join(rel.trim_start_matches('/')))
}

/// The cgroup v2 id of process `pid` (0 when unknown: no v2 hierarchy, or
/// the process is gone).
pub fn id_of_pid(pid: u32) -> u64 {
    let Some(mount) = v2_mount() else { return 0 };
    path_of_pid(pid)
        .and_then(|p| dir_of(&mount, &p))
        .and_then(|d| cgroup::id_of_path(&d).ok())
        .unwrap_or(0)
}

/// Is process `pid` in one of the cgroups `ids`, or below one? Its
/// cgroup and every ancestor are looked up (a stat each): the start-up
/// snapshot's counterpart of the kernel's ancestor test.
pub fn pid_under(pid: u32, ids: &[u64]) -> bool {
    let (Some(mount), Some(path)) = (v2_mount(), path_of_pid(pid)) else {
        return false;
    };
    let mut p = path.as_str();
    loop {
        let id = dir_of(&mount, if p.is_empty() { "/" } else { p })
            .and_then(|d| cgroup::id_of_path(&d).ok());
        if id.is_some_and(|id| ids.contains(&id)) {
            return true;
        }
        match p.rfind('/') {
            Some(i) if !p.is_empty() => p = &p[..i],
            _ => return false,
        }
    }
}

/// A cgroup selected by `--cgroup` or `--container`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    pub id: u64,
    /// Depth in the v2 hierarchy (its root is 0): the kernel compares the
    /// owner's ancestor at this level.
    pub level: u32,
    pub dir: PathBuf,
}

/// `--cgroup PATH`: a directory of the cgroup v2 hierarchy.
pub fn parse_cgroup(s: &str) -> Result<Selected, String> {
    let dir = Path::new(s);
    let id = cgroup::id_of_path(dir).map_err(|e| e.to_string())?;
    let dir = fs::canonicalize(dir).map_err(|e| format!("{s}: {e}"))?;
    let mount = v2_mount().ok_or_else(|| format!("{s}: no cgroup v2 hierarchy is mounted"))?;
    let below = dir.strip_prefix(&mount.mount_point).map_err(|_| {
        format!(
            "{s}: not under the cgroup v2 mount {}",
            mount.mount_point.display()
        )
    })?;
    if mount.root.contains("..") {
        return Err(format!(
            "{s}: the cgroup v2 mount is a namespaced view; its depth is unknown"
        ));
    }
    let depth = |p: &Path| p.components().filter(|c| c.as_os_str() != "/").count() as u32;
    let level = depth(Path::new(&mount.root)) + depth(below);
    if level >= tracer_common::MAX_CGROUP_LEVEL {
        return Err(format!(
            "{s}: {level} levels deep; at most {} can be filtered",
            tracer_common::MAX_CGROUP_LEVEL - 1
        ));
    }
    Ok(Selected { id, level, dir })
}

/// `--container ID` (the full id or a prefix, as `docker ps` shows): the
/// shallowest cgroup of the one container whose id starts with it.
pub fn parse_container(s: &str) -> Result<Selected, String> {
    let want = s.to_ascii_lowercase();
    if want.is_empty() || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("`{s}` is not a container id (hex digits)"));
    }
    let mount = v2_mount().ok_or_else(|| format!("{s}: no cgroup v2 hierarchy is mounted"))?;
    let mut found: Option<(String, String)> = None;
    for (_, path) in cgroup::walk(&mount.mount_point, "") {
        let Some(c) = cgroup::parse(&path).container else {
            continue;
        };
        if !c.id.starts_with(&want) {
            continue;
        }
        match &found {
            // Walked shallow first: the container's own cgroup comes
            // before its sub-cgroups.
            Some((id, _)) if *id == c.id => {}
            Some((id, _)) => {
                return Err(format!(
                    "`{s}` names more than one container ({} and {}); give more digits",
                    &id[..12],
                    &c.id[..12]
                ))
            }
            None => found = Some((c.id, path)),
        }
    }
    let (_, path) = found.ok_or_else(|| {
        format!(
            "no cgroup of a container `{s}` under {}",
            mount.mount_point.display()
        )
    })?;
    let dir = mount.mount_point.join(path.trim_start_matches('/'));
    parse_cgroup(&dir.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_keys_round_trip_and_print_short() {
        let c = Container {
            id: "0123456789abcdef".repeat(4),
            runtime: Runtime::Docker,
        };
        let k = ContainerKey::of(&c).unwrap();
        assert_eq!(k.id(), c.id);
        assert_eq!(k.to_string(), "docker:0123456789ab");
        let bad = Container {
            id: "xyz".into(),
            ..c
        };
        assert_eq!(ContainerKey::of(&bad), None);
    }

    #[test]
    fn hierarchy_paths_map_to_directories_under_the_mount() {
        let m = cgroup::Mount {
            root: "/".into(),
            mount_point: "/sys/fs/cgroup/unified".into(),
        };
        assert_eq!(
            dir_of(&m, "/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a/b"))
        );
        assert_eq!(
            dir_of(&m, "/"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let bind = cgroup::Mount {
            root: "/kubepods".into(),
            mount_point: "/host".into(),
        };
        assert_eq!(dir_of(&bind, "/kubepods/x"), Some(PathBuf::from("/host/x")));
        assert_eq!(dir_of(&bind, "/kubepodsX"), None);
        assert_eq!(dir_of(&bind, "/system.slice"), None);
    }

    #[test]
    fn bad_cgroup_paths_are_one_line_errors() {
        for bad in ["/no/such", "/proc"] {
            let e = parse_cgroup(bad).unwrap_err();
            assert!(e.starts_with(bad) && !e.contains('\n'), "{e}");
        }
        assert!(parse_container("zz").is_err());
    }

    /// The records' fields, the table cell and the group keys from a tree
    /// shaped like a hierarchy (no root needed).
    #[test]
    fn owners_are_named_from_the_hierarchy() {
        use std::os::unix::fs::MetadataExt as _;
        let id = "3f".repeat(32);
        let root = std::env::temp_dir().join(format!("tracer-containers-{}", std::process::id()));
        let ctr = root.join(format!("system.slice/docker-{id}.scope"));
        fs::create_dir_all(&ctr).unwrap();
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let owner = |cgroup| {
            Some(Owner {
                pid: 1,
                cgroup,
                ..Default::default()
            })
        };
        let mut c = Cgroups::new(Resolver::at(&root, &root.join("no-pods")), true);
        let j = c.json(&owner(ino(&ctr)));
        assert_eq!(
            j.cgroup.as_deref(),
            Some(format!("/system.slice/docker-{id}.scope").as_str())
        );
        assert_eq!(
            j.container.as_ref().map(|c| c.runtime),
            Some(Runtime::Docker)
        );
        assert!(j.pod.is_none());
        assert_eq!(c.cell(&owner(ino(&ctr))), "docker:3f3f3f3f3f3f");
        let plain = root.join("system.slice");
        assert_eq!(c.cell(&owner(ino(&plain))), "/system.slice");
        let enriched = c.enrich(&owner(ino(&ctr))).unwrap();
        assert_eq!(enriched.container.map(|k| k.id()), Some(id.clone()));
        // Group keys print their path once it was named.
        assert_eq!(label(ino(&plain)), "/system.slice");
        // Unknown owners and ids: null fields, one count per record.
        assert!(c.json(&None).cgroup.is_none());
        assert_eq!(c.unresolved, 0);
        assert!(c.json(&owner(u64::MAX)).cgroup.is_none());
        assert_eq!(c.cell(&owner(u64::MAX)), "-");
        assert_eq!(c.unresolved, 2);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unknown_ids_print_as_numbers() {
        assert_eq!(label(u64::MAX - 1), format!("cgroup {}", u64::MAX - 1));
        remember_label(u64::MAX - 2, "/a");
        assert_eq!(label(u64::MAX - 2), "/a");
    }
}
