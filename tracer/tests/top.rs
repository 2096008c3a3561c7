//! End-to-end tests of `tracer top`: the built binary in a real terminal
//! (a tmux pane, read with `tmux capture-pane -p`), the real kernel
//! program, real TCP in a network namespace per test. Nothing waits a
//! fixed time: every wait polls the screen up to a deadline.
//!
//! In the QEMU guests of `cargo xtask test` (TRACER_GUEST=1) there is no
//! tmux: there, and only there, the terminal tests are skipped (the view
//! does not depend on the kernel; the agent under it is the one every
//! other test runs).

mod common;

use std::{
    io::Read as _,
    net::Shutdown,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;

/// A tmux server of its own (so tests never share one), started from the
/// calling thread: its panes live in that thread's network namespace.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// A detached session of `width`x`height` running `script` in `sh`.
    fn start(width: u16, height: u16, script: &str) -> Tmux {
        let socket = format!("tracer-top-{}-{}", std::process::id(), test_port());
        let t = Tmux { socket };
        let status = t
            .cmd()
            .args(["new-session", "-d", "-x", &width.to_string(), "-y"])
            .arg(height.to_string())
            .args(["sh", "-c", script])
            .status()
            .expect("run tmux (installed by `cargo xtask test`)");
        assert!(status.success(), "tmux new-session failed");
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket, "-f", "/dev/null"]);
        c
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let status = self
            .cmd()
            .args(["send-keys"])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    fn resize(&self, width: u16, height: u16) {
        let status = self
            .cmd()
            .args(["resize-window", "-x", &width.to_string(), "-y"])
            .arg(height.to_string())
            .status()
            .expect("tmux resize-window");
        assert!(status.success());
    }

    /// Waits until `done` holds for the screen; returns it.
    fn wait(&self, what: &str, within: Duration, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if done(&s) {
                return s;
            }
            if start.elapsed() > within {
                panic!("{what}: not on the screen within {within:?}:\n{s}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").stderr(Stdio::null()).status();
    }
}

fn no_tmux_here() -> bool {
    if in_guest() {
        eprintln!("QEMU guest: no tmux here; checked on the host");
        return true;
    }
    false
}

/// The shell line that runs `tracer top ARGS`, then says how it ended and
/// whether the terminal is back in canonical mode (`icanon`, not
/// `-icanon`), and stays so the screen can be read. `$$` of the inner
/// shell, which `exec`s the tracer, is the tracer's pid.
fn script(args: &[String], pidfile: &str) -> String {
    let bin =
        std::env::var("TRACER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tracer").to_string());
    format!(
        "sh -c 'echo $$ > {pidfile}; exec {bin} top {}'; echo EXIT=$?; stty -a | tr \" \" \"\\n\" | grep -x -- \"-*icanon\"; sleep 600",
        args.join(" ")
    )
}

/// The line of `screen` that contains `what`.
fn line<'a>(screen: &'a str, what: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.contains(what))
}

/// The whitespace-separated fields of the line that starts (inside its
/// box) with `first`.
fn row(screen: &str, first: &str) -> Vec<String> {
    screen
        .lines()
        .flat_map(|l| l.split('│'))
        .find(|cell| cell.split_whitespace().next() == Some(first))
        .map(|cell| cell.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

#[test]
fn without_a_terminal_it_says_so_and_exits_2() {
    let out = tracer()
        .arg("top")
        .stdin(Stdio::null())
        .output()
        .expect("run tracer top");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("needs a terminal"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_terminal_too_small_gets_one_line_and_exit_2() {
    if no_tmux_here() {
        return;
    }
    let pidfile = format!("/tmp/tracer-top-small-{}", std::process::id());
    let tmux = Tmux::start(40, 10, &script(&[], &pidfile));
    let s = tmux.wait("the exit", DEADLINE, |s| {
        s.contains("EXIT=") && s.contains("icanon")
    });
    assert!(s.contains("EXIT=2"), "{s}");
    // One line, wrapped by the narrow pane.
    let said: String = s.split("EXIT=").next().unwrap().replace('\n', "");
    assert!(
        said.trim() == "tracer: error: terminal too small (40x10): tracer top needs at least 80x24",
        "{s}"
    );
    assert!(!s.contains("panicked"), "{s}");
    let _ = std::fs::remove_file(&pidfile);
}

/// Three servers hold their accepted connection in CLOSE_WAIT (the client
/// closed, the server never does), on ports `tracer top --port` selects;
/// a fourth does on a port it does not; two connections closed by their
/// client wait in TIME_WAIT toward one destination. The screen shows
/// exactly that, the keys act, a resize redraws, and `q` gives the
/// terminal back.
#[test]
fn shows_close_wait_holders_time_wait_and_obeys_the_keys() {
    if no_tmux_here() {
        return;
    }
    in_netns(|| {
        let ports: Vec<u16> = (0..3).map(|_| test_port()).collect();
        let other = test_port();
        let tw_port = test_port();
        let churn_port = test_port();
        let mut args: Vec<String> = ports
            .iter()
            .chain([&tw_port, &churn_port])
            .flat_map(|p| ["--port".to_string(), p.to_string()])
            .collect();
        args.extend(["--netns".into(), own_netns().unwrap().to_string()]);
        let pidfile = format!("/tmp/tracer-top-keys-{}", std::process::id());
        let tmux = Tmux::start(120, 40, &script(&args, &pidfile));
        // The first snapshot: the agent is attached.
        tmux.wait("the first snapshot", attach_deadline(), |s| {
            s.contains("tracer top") && !s.contains("(starting)")
        });

        // Connections opened and closed all along: transitions and closes
        // per second.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            thread::spawn(move || {
                let addr = format!("127.0.0.1:{churn_port}").parse().unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    conversation(addr, Duration::ZERO, Ending::ClientFirst);
                    thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let rate = |s: &str, first: &str, col: usize| -> f64 {
            row(s, first)
                .get(col)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0.0)
        };
        let s = tmux.wait("connections and closes per second", DEADLINE, |s| {
            rate(s, "ESTABLISHED", 2) > 0.0 && rate(s, "peer", 1) > 0.0
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().unwrap();
        // A client and a server side per connection; at most one every
        // 20 ms.
        assert!(rate(&s, "ESTABLISHED", 2) <= 2.0 * 50.0 * 1.5, "{s}");

        let mut servers = Vec::new();
        let mut clients = Vec::new();
        for &p in ports.iter().chain([&other]) {
            let mut server = ForkedServer::start(p, ServerMode::NeverClose);
            let client = server.connect(p);
            let fd = server.accepted_fd();
            client.shutdown(Shutdown::Write).unwrap();
            clients.push(client);
            servers.push((server, fd, p));
        }
        for _ in 0..2 {
            conversation(
                format!("127.0.0.1:{tw_port}").parse().unwrap(),
                Duration::ZERO,
                Ending::ClientFirst,
            );
        }

        let s = tmux.wait(
            "3 in CLOSE_WAIT, their holders, 2 in TIME_WAIT",
            DEADLINE,
            |s| {
                row(s, "CLOSE_WAIT").get(1).map(String::as_str) == Some("3")
                    && s.contains("CLOSE_WAIT holders (3)")
                    && servers[..3].iter().all(|(srv, fd, _)| {
                        // With its fd, once the holders' scan found it.
                        line(s, &format!(" {} ", srv.pid)).is_some_and(|l| {
                            l.trim_matches(['│', ' ']).split_whitespace().nth(3)
                                == Some(fd.to_string().as_str())
                        })
                    })
                    && row(s, &format!("127.0.0.1:{tw_port}"))
                        .get(1)
                        .map(String::as_str)
                        == Some("2")
            },
        );
        for (srv, fd, port) in &servers[..3] {
            let l = line(&s, &format!(" {} ", srv.pid)).unwrap();
            let cells: Vec<&str> = l.trim_matches(['│', ' ']).split_whitespace().collect();
            // AGE PID COMM FD LPORT REMOTE CONTAINER
            assert_eq!(cells[1], srv.pid.to_string(), "{l}");
            assert_eq!(cells[2], "tracer-srv", "{l}");
            assert_eq!(cells[3], fd.to_string(), "{l}");
            assert_eq!(cells[4], port.to_string(), "{l}");
        }
        let (other_srv, _, _) = &servers[3];
        assert!(
            line(&s, &format!(" {} ", other_srv.pid)).is_none(),
            "filtered out:\n{s}"
        );
        let status = line(&s, "events ").unwrap();
        assert!(
            status.contains("lost 0") && status.contains("skipped 0"),
            "{status}"
        );

        // `/` filters by port, `s` cycles the sort, `p` pauses.
        tmux.keys(&["/"]);
        tmux.keys(&["-l", &ports[1].to_string()]);
        tmux.keys(&["Enter"]);
        let s = tmux.wait("the port filter", DEADLINE, |s| {
            s.contains("CLOSE_WAIT holders (1)")
        });
        assert!(
            line(&s, &format!(" {} ", servers[1].0.pid)).is_some(),
            "{s}"
        );
        tmux.keys(&["/"]);
        tmux.keys(&["-l", "tracer-s"]);
        tmux.keys(&["Enter"]);
        tmux.wait("the comm filter", DEADLINE, |s| {
            s.contains("CLOSE_WAIT holders (3)") && s.contains("filter: tracer-s")
        });
        tmux.keys(&["s"]);
        tmux.wait("sort by pid", DEADLINE, |s| s.contains("sort: pid"));
        // Enter on an empty filter clears it.
        tmux.keys(&["/"]);
        tmux.keys(&["Enter"]);
        tmux.wait("no filter", DEADLINE, |s| s.contains("filter: -"));
        tmux.keys(&["p"]);
        tmux.wait("paused", DEADLINE, |s| s.contains("PAUSED"));
        tmux.keys(&["p"]);
        tmux.wait("resumed", DEADLINE, |s| !s.contains("PAUSED"));

        // Resized: too small, one line; back, the view again.
        tmux.resize(50, 12);
        tmux.wait("the small-screen line", DEADLINE, |s| {
            s.contains("terminal too small (50x12)")
        });
        tmux.resize(120, 40);
        tmux.wait("the view again", DEADLINE, |s| {
            s.contains("CLOSE_WAIT holders (3)")
        });

        tmux.keys(&["q"]);
        let s = tmux.wait("the exit", DEADLINE, |s| {
            s.contains("EXIT=") && s.contains("icanon")
        });
        assert!(s.contains("EXIT=0"), "{s}");
        assert!(
            line(&s, "icanon").is_some_and(|l| l.trim() == "icanon"),
            "terminal restored:\n{s}"
        );
        assert!(!s.contains("panicked"), "{s}");
        drop(clients);
        let _ = std::fs::remove_file(&pidfile);
    });
}

/// SIGTERM and SIGINT stop it like `q`: exit 0, the terminal given back.
#[test]
fn signals_give_the_terminal_back() {
    if no_tmux_here() {
        return;
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        in_netns(move || {
            let pidfile = format!("/tmp/tracer-top-sig-{}-{sig}", std::process::id());
            let args = vec!["--netns".to_string(), own_netns().unwrap().to_string()];
            let tmux = Tmux::start(100, 30, &script(&args, &pidfile));
            tmux.wait("the first snapshot", attach_deadline(), |s| {
                s.contains("tracer top") && !s.contains("(starting)")
            });
            let mut pid = String::new();
            std::fs::File::open(&pidfile)
                .unwrap()
                .read_to_string(&mut pid)
                .unwrap();
            let pid: i32 = pid.trim().parse().unwrap();
            // SAFETY: a signal to the tracer this test started.
            assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
            let s = tmux.wait("the exit", DEADLINE, |s| {
                s.contains("EXIT=") && s.contains("icanon")
            });
            assert!(s.contains("EXIT=0"), "signal {sig}:\n{s}");
            assert!(
                line(&s, "icanon").is_some_and(|l| l.trim() == "icanon"),
                "signal {sig}: terminal restored:\n{s}"
            );
            let _ = std::fs::remove_file(&pidfile);
        });
    }
}
