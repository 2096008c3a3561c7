//! The resolver on a plain directory tree (no root needed: the walk only
//! reads directories and inode numbers), then once on the real cgroup v2
//! hierarchy (root needed, and required: that test fails, not skips).

use std::fs;

use super::*;

const ID: &str = "3f4e2b0c9d8a7f6e5d4c3b2a19080706f5e4d3c2b1a09f8e7d6c5b4a39281706";
const UID: &str = "0c5a1e4f-9b2d-4c6e-8f1a-2b3c4d5e6f70";

/// A temporary tree shaped like a cgroup hierarchy, removed on drop.
struct Tree(PathBuf);

impl Tree {
    fn new(name: &str, dirs: &[String]) -> Tree {
        let root =
            std::env::temp_dir().join(format!("tracer-cgroup-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in dirs {
            fs::create_dir_all(root.join(d.trim_start_matches('/'))).unwrap();
        }
        Tree(root)
    }

    fn ino(&self, dir: &str) -> u64 {
        fs::metadata(self.0.join(dir.trim_start_matches('/')))
            .unwrap()
            .ino()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn names_containers_pods_and_units_of_a_tree() {
    let pod_dir = format!(
        "/kubepods.slice/kubepods-pod{}.slice",
        UID.replace('-', "_")
    );
    let ctr = format!("{pod_dir}/cri-containerd-{ID}.scope");
    let tree = Tree::new(
        "names",
        &[ctr.clone(), "/system.slice/nginx.service".into()],
    );
    let logs = Tree::new("names-logs", &[format!("/shop_cart-0_{UID}")]);
    let mut r = Resolver::at(&tree.0, &logs.0);

    let nginx = r
        .resolve(tree.ino("/system.slice/nginx.service"))
        .unwrap()
        .clone();
    assert_eq!(nginx.path, "/system.slice/nginx.service");
    assert_eq!(nginx.unit.as_deref(), Some("nginx.service"));
    assert_eq!((nginx.container, nginx.pod), (None, None));

    let c = r.resolve(tree.ino(&ctr)).unwrap().clone();
    assert_eq!(c.path, ctr);
    assert_eq!(c.container.unwrap().id, ID);
    let pod = c.pod.unwrap();
    assert_eq!(
        (
            pod.uid.as_str(),
            pod.namespace.as_deref(),
            pod.name.as_deref()
        ),
        (UID, Some("shop"), Some("cart-0"))
    );
    assert_eq!(r.resolve(tree.ino("/")).unwrap().path, "/");
    assert_eq!(r.walks(), 1, "one walk found all three");
    assert_eq!(r.len(), 6);
    // Serialized as the output will show it.
    let json = serde_json::to_value(r.resolve(tree.ino(&ctr)).unwrap()).unwrap();
    assert_eq!(json["container"]["runtime"], "containerd");
    assert_eq!(json["pod"]["namespace"], "shop");
}

#[test]
fn unknown_ids_walk_at_most_once_per_interval() {
    let tree = Tree::new("rate", &["/a".into()]);
    let mut r = Resolver::at(&tree.0, &tree.0);
    for id in 0..10_000u64 {
        assert!(r.resolve(u64::MAX - id).is_none());
    }
    assert_eq!(r.walks(), 1);
    // A cgroup created after the walk waits for the next allowed walk.
    fs::create_dir(tree.0.join("b")).unwrap();
    assert!(r.resolve(tree.ino("/b")).is_none());
    assert_eq!(r.walks(), 1);
    let mut r = r.with_limits(CAPACITY, Duration::ZERO);
    assert_eq!(r.resolve(tree.ino("/b")).unwrap().path, "/b");
    assert_eq!(r.walks(), 2);
}

#[test]
fn gone_cgroups_keep_their_last_path_within_capacity() {
    let tree = Tree::new("gone", &["/x/old".into()]);
    let mut r = Resolver::at(&tree.0, &tree.0).with_limits(4, Duration::ZERO);
    let old = tree.ino("/x/old");
    assert_eq!(r.resolve(old).unwrap().path, "/x/old");
    fs::remove_dir(tree.0.join("x/old")).unwrap();
    // Still cached: no walk needed, the last known path.
    assert_eq!(r.resolve(old).unwrap().path, "/x/old");
    // A walk (for an unknown id) keeps it, as gone, while there is room.
    assert!(r.resolve(u64::MAX).is_none());
    assert_eq!(r.resolve(old).unwrap().path, "/x/old");
    assert_eq!(r.walks(), 2);
    // Live cgroups come first: four of them push the gone one out.
    for d in ["y", "z", "x/w"] {
        fs::create_dir(tree.0.join(d)).unwrap();
    }
    assert!(r.resolve(u64::MAX).is_none());
    assert_eq!(r.len(), 4);
    // Gone and evicted. (Not `resolve(old)`: unlike cgroupfs, the temporary
    // directory's file system may give `old`'s inode to a new directory.)
    let paths: Vec<&str> = r.cache.values().map(|e| e.resolved.path.as_str()).collect();
    assert!(!paths.contains(&"/x/old"), "{paths:?}");
}

#[test]
fn the_id_asked_for_is_kept_even_past_capacity() {
    let dirs: Vec<String> = (0..20).map(|i| format!("/s{i}/deep")).collect();
    let tree = Tree::new("cap", &dirs);
    let mut r = Resolver::at(&tree.0, &tree.0).with_limits(5, Duration::ZERO);
    assert_eq!(r.resolve(tree.ino("/s19/deep")).unwrap().path, "/s19/deep");
    assert_eq!(r.len(), 5);
}

#[test]
fn without_cgroup_v2_nothing_resolves() {
    let mut r = Resolver::at(Path::new("/"), Path::new("/"));
    r.mount = Err(Unavailable::NotMounted);
    assert!(r.resolve(1).is_none());
    assert_eq!(r.walks(), 0);
    assert_eq!(r.mount_point(), None);
    assert_eq!(r.why().as_deref(), Some("no cgroup v2 hierarchy mounted"));
}

#[test]
fn id_of_path_refuses_what_is_not_a_v2_cgroup() {
    let msg = |p: &str| id_of_path(Path::new(p)).unwrap_err().to_string();
    assert_eq!(
        msg("/nonexistent/cg"),
        "/nonexistent/cg: No such file or directory (os error 2)"
    );
    assert_eq!(msg("/proc"), "/proc: not in a cgroup v2 hierarchy");
    // A v1 hierarchy, where the host has one (this machine is hybrid).
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let v1 = info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        post.starts_with("cgroup ")
            .then(|| pre.split(' ').nth(4).unwrap().to_string())
    });
    if let Some(v1) = v1 {
        assert_eq!(
            msg(&v1),
            format!("{v1}: a cgroup v1 hierarchy; cgroup ids are v2's")
        );
    }
    for m in [&msg("/nonexistent/cg"), &msg("/proc")] {
        assert!(!m.contains('\n'));
    }
}

/// Needs root and a writable cgroup v2 hierarchy, as every machine of this
/// project has (PLATFORM.md); fails with the reason otherwise.
#[test]
fn resolves_a_real_cgroup_and_remembers_it_gone() {
    let mut r = Resolver::new();
    if let Some(why) = r.why() {
        panic!("this test needs a cgroup v2 hierarchy: {why}");
    }
    let mount = r.mount_point().unwrap().to_path_buf();
    let name = format!("tracer-test-{}", std::process::id());
    let dir = mount.join(&name);
    if let Err(e) = fs::create_dir(&dir) {
        panic!(
            "this test needs root and a writable cgroup v2 at {}: mkdir {}: {e}",
            mount.display(),
            dir.display()
        );
    }
    let id = id_of_path(&dir);
    let file = id_of_path(&dir.join("cgroup.procs"))
        .unwrap_err()
        .to_string();
    let root_id = id_of_path(&mount);
    let first = r.resolve(*id.as_ref().unwrap_or(&0)).cloned();
    fs::remove_dir(&dir).unwrap();

    let id = id.unwrap();
    assert!(id > 1, "{id}");
    assert_eq!(root_id.unwrap(), 1, "the root cgroup's id is 1");
    assert!(
        file.ends_with("cgroup.procs: a file, not a cgroup directory"),
        "{file}"
    );
    let want = format!("/{name}");
    assert_eq!(first.map(|f| f.path), Some(want.clone()));
    assert_eq!(r.resolve(1).unwrap().path, "/");
    // Gone: the cache still names it.
    assert_eq!(r.resolve(id).map(|f| f.path.clone()), Some(want));
    // A fresh resolver never saw it.
    assert!(Resolver::new().resolve(id).is_none());
    assert!(id_of_path(&dir).is_err());
}
