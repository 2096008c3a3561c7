//! The owner's cgroup in records and the cgroup filters, against the real
//! kernel: servers run in cgroups the test makes in the cgroup v2
//! hierarchy (found in /proc/self/mountinfo: at /sys/fs/cgroup/unified on
//! the hybrid development machine, /sys/fs/cgroup in the guests). Needs
//! root and a writable v2 hierarchy, and fails loudly without them.

mod common;

use std::{path::PathBuf, thread, time::Duration};

use common::*;

/// Where the whole cgroup v2 hierarchy is mounted.
fn v2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            (post.starts_with("cgroup2 ") && f.get(3) == Some(&"/")).then(|| PathBuf::from(f[4]))
        })
        .next()
        .expect(
            "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified): \
             these tests need one",
        )
}

/// A cgroup made by the test (with `mkdir`), removed on drop once its
/// processes are gone (drop the servers in it first).
struct TestCgroup {
    dir: PathBuf,
    /// From the root of the hierarchy, as records name it.
    path: String,
}

impl TestCgroup {
    fn new(parent: Option<&TestCgroup>, name: &str) -> TestCgroup {
        require_root();
        let (base, prefix) = match parent {
            Some(p) => (p.dir.clone(), p.path.clone()),
            None => (v2_mount(), String::new()),
        };
        let dir = base.join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot make the cgroup {} ({e}): these tests need a writable cgroup v2 hierarchy",
                dir.display()
            )
        });
        TestCgroup {
            dir,
            path: format!("{prefix}/{name}"),
        }
    }

    fn add(&self, pid: u32) {
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", procs.display()));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Unwinding from a failed assertion may drop a cgroup before the
        // servers in it: move them to the root (they are killed next).
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write(v2_mount().join("cgroup.procs"), pid);
        }
        // A killed process leaves its cgroup a moment after it is reaped.
        for _ in 0..200 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

fn unique(what: &str) -> String {
    format!("tracer-test-{}-{what}-{}", std::process::id(), test_port())
}

/// Connects to `server` and closes; the server closes after the peer.
fn one_connection(server: &ForkedServer, port: u16) {
    drop(server.connect(port));
}

/// A transition as the tests compare it: (old, new, lport, pid, cgroup).
type Row = (String, String, u64, u64, String);

/// The tracepoint's transitions on `ports`, socket by socket in the order
/// the sockets first appear, each socket's in its own order: two sockets'
/// transitions may interleave either way (a listener's close and its
/// child's last ACK race in a slow guest).
fn server_side(lines: &[String], ports: &[u16]) -> Vec<Row> {
    let transitions = of_type(lines, "transition");
    let mut socks: Vec<&str> = Vec::new();
    let mut rows: Vec<(usize, Row)> = transitions
        .iter()
        .filter(|t| t["source"] == "tracepoint")
        .filter(|t| ports.contains(&(t["lport"].as_u64().unwrap() as u16)))
        .map(|t| {
            let sock = t["sock"].as_str().unwrap();
            let nth = socks.iter().position(|&s| s == sock).unwrap_or_else(|| {
                socks.push(sock);
                socks.len() - 1
            });
            let row = (
                t["old"].as_str().unwrap().to_string(),
                t["new"].as_str().unwrap().to_string(),
                t["lport"].as_u64().unwrap(),
                t["pid"].as_u64().unwrap_or(0),
                t["cgroup"].as_str().unwrap_or("null").to_string(),
            );
            (nth, row)
        })
        .collect();
    rows.sort_by_key(|&(nth, _)| nth); // stable: each socket keeps its order
    rows.into_iter().map(|(_, row)| row).collect()
}

fn closed_on(port: u16) -> impl Fn(&[String]) -> bool {
    move |lines: &[String]| {
        lines.iter().any(|l| {
            let v = json(l);
            v["type"] == "transition" && v["old"] == "LAST_ACK" && v["lport"] == port
        })
    }
}

/// The 5 transitions of a server's accepted socket when the client
/// closes first, as records of (old, new, lport, pid, cgroup).
fn accepted(port: u16, pid: u32, cgroup: &str) -> Vec<Row> {
    [
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ]
    .iter()
    .map(|(o, n)| {
        (
            o.to_string(),
            n.to_string(),
            port as u64,
            pid as u64,
            cgroup.to_string(),
        )
    })
    .collect()
}

/// A server's whole life, socket by socket (as [`server_side`] gives it):
/// the listener's listen() and close, then the accepted socket (the forked
/// server closes both after its peer).
fn listened(port: u16, pid: u32, cgroup: &str) -> Vec<Row> {
    let row = |o: &str, n: &str| (o.into(), n.into(), port as u64, pid as u64, cgroup.into());
    let mut all = vec![row("CLOSE", "LISTEN"), row("LISTEN", "CLOSE")];
    all.extend(accepted(port, pid, cgroup));
    all
}

/// Two servers in two cgroups: every record of each names its own
/// cgroup path (the listener's taken in its listen(), the accepted
/// socket's inherited), the docker-named one its container; the
/// client's records name the test's own cgroup.
#[test]
fn records_name_the_owners_cgroup_and_container() {
    in_netns(|| {
        let (pa, pb) = (test_port(), test_port());
        let a = TestCgroup::new(None, &unique("a"));
        let server_a = ForkedServer::prepare(pa, ServerMode::CloseAfterPeer);
        let server_b = ForkedServer::prepare(pb, ServerMode::CloseAfterPeer);
        a.add(server_a.pid);
        let (pas, pbs) = (pa.to_string(), pb.to_string());
        let run = Running::start(&[
            "--output", "json", "--events", "all", "-v", "--port", &pas, "--port", &pbs,
        ]);
        run.wait_attached();
        server_a.go();
        one_connection(&server_a, pa);
        let mut got = Vec::new();
        run.read_until(&mut got, "server a's close", closed_on(pa));
        // B's cgroups are made now, well within a second of the walk that
        // named A's: the agent names them without waiting for its next
        // walk (from the owner's /proc/PID/cgroup).
        let b = TestCgroup::new(None, &unique("b"));
        let id = format!("{:016x}", 0xc0ffee_u64 + u64::from(pb)).repeat(4);
        let docker = TestCgroup::new(Some(&b), &format!("docker-{id}.scope"));
        docker.add(server_b.pid);
        server_b.go();
        one_connection(&server_b, pb);
        run.read_until(&mut got, "server b's close", closed_on(pb));
        run.interrupt();
        let (code, rest, err) = run.finish();
        assert_eq!(code, 0, "{err:#?}");
        got.extend(rest);

        let want_a = listened(pa, server_a.pid, &a.path);
        assert_eq!(server_side(&got, &[pa]), want_a, "{got:#?}");
        let want_b = listened(pb, server_b.pid, &docker.path);
        assert_eq!(server_side(&got, &[pb]), want_b, "{got:#?}");
        // The clients: this test process, in its own cgroup.
        let ours = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let ours = ours.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let me = u64::from(std::process::id());
        let clients: Vec<_> = of_type(&got, "transition")
            .into_iter()
            .filter(|t| [pa, pb].contains(&(t["rport"].as_u64().unwrap() as u16)))
            .collect();
        // 5 each from the tracepoint (connect to FIN_WAIT2 -> CLOSE), and
        // FIN_WAIT2 -> TIME_WAIT from sock_diag: the owner's all the same.
        assert!(clients.len() >= 2 * 5, "{got:#?}");
        for t in &clients {
            assert_eq!(
                (t["pid"].as_u64(), t["cgroup"].as_str()),
                (Some(me), Some(ours)),
                "{t}"
            );
        }

        // The servers' sockets, and those of the clients whose timewait
        // socket ended before the tracer stopped.
        let conns = of_type(&got, "connection");
        let servers = conns
            .iter()
            .filter(|c| [pa, pb].contains(&(c["lport"].as_u64().unwrap() as u16)));
        assert_eq!(servers.count(), 2, "{got:#?}");
        for c in &conns {
            let (lport, cg) = (c["lport"].as_u64().unwrap() as u16, &c["cgroup"]);
            let container = &c["container"];
            if lport == pa {
                assert_eq!(*cg, *a.path, "{c}");
                assert!(container.is_null(), "{c}");
            } else if lport == pb {
                assert_eq!(*cg, *docker.path, "{c}");
                assert_eq!(container["id"], *id, "{c}");
                assert_eq!(container["runtime"], "docker", "{c}");
            } else {
                assert_eq!(*cg, *ours, "{c}");
            }
            assert!(c["pod"].is_null(), "{c}");
        }
        let stats = of_type(&got, "stats");
        assert_eq!(stats[0]["cgroups_unresolved"], 0, "{stats:?}");
        drop((server_a, server_b));
        drop((docker, a, b));
    });
}

/// `--cgroup A` keeps exactly the transitions of the servers in A and
/// below it, by value: one that listened before the tracer started (in
/// A's child cgroup: its listener's verdict comes from the start-up
/// snapshot) and one started after; nothing of the server in B nor of
/// the clients (this process, elsewhere).
#[test]
fn cgroup_filter_keeps_one_cgroups_servers() {
    in_netns(|| {
        let (early, late, other) = (test_port(), test_port(), test_port());
        let a = TestCgroup::new(None, &unique("sel"));
        let inner = TestCgroup::new(Some(&a), "inner");
        let b = TestCgroup::new(None, &unique("other"));
        // Listening before the tracer starts.
        let before = ForkedServer::prepare(early, ServerMode::CloseAfterPeer);
        inner.add(before.pid);
        before.go();
        wait_listening(early);

        let after = ForkedServer::prepare(late, ServerMode::CloseAfterPeer);
        a.add(after.pid);
        let outside = ForkedServer::prepare(other, ServerMode::CloseAfterPeer);
        b.add(outside.pid);
        let dir = a.dir.to_string_lossy().to_string();
        let run = Running::start(&[
            "--output",
            "json",
            "--events",
            "transitions",
            "-v",
            "--cgroup",
            &dir,
        ]);
        run.wait_attached();
        outside.go();
        after.go();
        one_connection(&outside, other);
        one_connection(&before, early);
        one_connection(&after, late);
        let mut got = Vec::new();
        run.read_until(&mut got, "the selected servers' closes", |l| {
            closed_on(early)(l) && closed_on(late)(l)
        });
        // The other server's close happened before; give stragglers a
        // drain interval, then stop.
        thread::sleep(Duration::from_millis(200));
        run.interrupt();
        let (code, rest, err) = run.finish();
        assert_eq!(code, 0, "{err:#?}");
        got.extend(rest);

        let all: Vec<_> = of_type(&got, "transition");
        assert!(
            all.iter()
                .all(|t| [early, late].contains(&(t["lport"].as_u64().unwrap() as u16))),
            "only the selected servers' sockets: {got:#?}"
        );
        assert_eq!(
            server_side(&got, &[early]),
            accepted(early, before.pid, &inner.path),
            "{got:#?}"
        );
        // The listener that predates the tracer closes unseen by the
        // filter (its verdict was for the sockets it accepts); the other's
        // whole life passes.
        let want = listened(late, after.pid, &a.path);
        assert_eq!(server_side(&got, &[late]), want, "{got:#?}");
        drop((before, after, outside));
        drop((inner, a, b));
    });
}

/// `--container PREFIX` finds the container's cgroup and keeps its
/// server; `-w` shows the container in the table.
#[test]
fn container_filter_and_wide_table() {
    in_netns(|| {
        let (mine, other) = (test_port(), test_port());
        let top = TestCgroup::new(None, &unique("ctr"));
        let id = format!("{:016x}", 0xdecaf_u64 + u64::from(mine)).repeat(4);
        let ctr = TestCgroup::new(Some(&top), &format!("docker-{id}.scope"));
        let server = ForkedServer::prepare(mine, ServerMode::CloseAfterPeer);
        ctr.add(server.pid);
        let outside = ForkedServer::prepare(other, ServerMode::CloseAfterPeer);
        top.add(outside.pid);
        let run = Running::start(&["-w", "-v", "--container", &id[..12]]);
        run.wait_attached();
        server.go();
        outside.go();
        one_connection(&outside, other);
        one_connection(&server, mine);
        let needle = format!("127.0.0.1:{mine}");
        let mut got = Vec::new();
        run.read_until(&mut got, "the container's server's close", |l| {
            l.iter()
                .any(|l| l.contains(&needle) && l.contains("LAST_ACK -> CLOSE"))
        });
        run.interrupt();
        let (code, rest, err) = run.finish();
        assert_eq!(code, 0, "{err:#?}");
        got.extend(rest);
        assert!(got[0].contains("COMM             CGROUP"), "{got:#?}");
        let short = format!("docker:{}", &id[..12]);
        let rows: Vec<&String> = got.iter().skip(1).collect();
        assert_eq!(
            rows.len(),
            7,
            "the server's listener and accepted socket: {got:#?}"
        );
        for r in rows {
            assert!(r.contains(&short) && r.contains(&needle), "{r}");
        }
        drop((server, outside));
        drop((ctr, top));
    });
}

/// Bad `--cgroup`/`--container` values are one-line usage errors (exit 2).
#[test]
fn bad_cgroup_arguments_are_usage_errors() {
    require_root();
    let v1 = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup ")
                .then(|| pre.split(' ').nth(4).map(str::to_string))?
        });
    let mut bad = vec![
        (
            "--cgroup".to_string(),
            "/no/such".to_string(),
            "No such file",
        ),
        (
            "--cgroup".into(),
            "/proc".into(),
            "not in a cgroup v2 hierarchy",
        ),
        (
            "--container".into(),
            "ffffffffffff0".into(),
            "no cgroup of a container",
        ),
    ];
    match v1 {
        Some(dir) => bad.push(("--cgroup".into(), dir, "a cgroup v1 hierarchy")),
        // The guests mount only v2.
        None => eprintln!("no cgroup v1 mount here: the v1 case is not checked"),
    }
    for (flag, value, says) in bad {
        let out = tracer()
            .args([flag.as_str(), value.as_str()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        let first = err.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error: invalid value") && first.contains(says),
            "{err}"
        );
    }
}
