//! In-kernel filters on mixed traffic: for each filter, a program instance
//! with that filter and a reference instance that sees everything run side
//! by side; the filtered one must deliver exactly the reference's
//! transitions that satisfy the filter: no more (traffic that must not
//! pass), no fewer (traffic that must).

mod common;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    sync::{mpsc, Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use common::*;
use tracer::{
    kernel::events::{TcpState, Transition},
    kernel::filters::{parse_cidr, Filters},
    kernel::loader::LoadOptions,
};

fn with(filters: Filters) -> Collector {
    Collector::load(LoadOptions {
        filters,
        ..Default::default()
    })
}

/// What identifies a transition across program instances.
/// (Timestamps differ: each instance reads the clock itself.)
fn set<'a>(events: impl IntoIterator<Item = &'a Transition>) -> BTreeSet<(u64, u8, u8, u16, u16)> {
    events
        .into_iter()
        .map(|t| (t.sock, t.old as u8, t.new as u8, t.lport, t.rport))
        .collect()
}

/// Checks that `c` got exactly the reference's events matching `pred`,
/// and that this is a real selection (some pass, some do not).
fn assert_exactly(
    what: &str,
    c: &mut Collector,
    reference: &Collector,
    pred: impl Fn(&Transition) -> bool,
) {
    let want = set(reference.events.iter().filter(|t| pred(t)));
    assert!(
        !want.is_empty(),
        "{what}: the traffic has nothing that must pass"
    );
    assert!(
        want.len() < reference.events.len(),
        "{what}: the traffic has nothing that must not pass"
    );
    c.wait_until(what, |evs| set(evs).len() >= want.len());
    c.poll();
    assert_eq!(
        set(&c.events),
        want,
        "{what}: got\n{}\nreference\n{}",
        dump(&c.events),
        dump(&reference.events)
    );
    assert_eq!(c.counters().ringbuf_full, 0);
    // Durations stay right when the transition that began a state was
    // filtered out: the same as the reference's, to the few µs between the
    // two instances' clock reads (milliseconds under emulation).
    let tolerance = if in_guest() { 10_000_000 } else { 1_000_000 };
    for t in &c.events {
        let r = reference
            .events
            .iter()
            .find(|r| set([*r]) == set([t]))
            .unwrap();
        match (t.old_state_ns, r.old_state_ns) {
            (Some(a), Some(b)) => assert!(
                a.abs_diff(b) < tolerance,
                "{what}: {a} vs {b} ns in {}",
                t.old
            ),
            (a, b) => assert_eq!(a.is_some(), b.is_some(), "{what}: {} -> {}", t.old, t.new),
        }
    }
}

/// A connection from `from` (bound first) to `to`, closed by the client.
fn connect_from(from: IpAddr, to: SocketAddr, listener: &TcpListener) {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    s.bind(&SocketAddr::new(from, 0).into()).unwrap();
    s.connect(&to.into()).unwrap();
    let client: TcpStream = s.into();
    let (server, _) = listener.accept().unwrap();
    drop(client);
    let mut b = [0u8; 1];
    let _ = std::io::Read::read(&mut &server, &mut b);
    drop(server);
}

#[test]
fn ports_addresses_and_states() {
    in_netns(|| {
        let (a, b) = (test_port(), test_port());
        let reference = with(Filters {
            ports: vec![a, b],
            ..Default::default()
        });
        let mut lport = with(Filters {
            lports: vec![a],
            ..Default::default()
        });
        let mut rport = with(Filters {
            rports: vec![a],
            ..Default::default()
        });
        let mut state = with(Filters {
            states: vec![TcpState::CloseWait],
            ports: vec![a, b],
            ..Default::default()
        });
        let mut laddr = with(Filters {
            laddrs: vec![parse_cidr("127.0.0.9/32").unwrap()],
            ..Default::default()
        });
        let mut raddr = with(Filters {
            raddrs: vec![parse_cidr("127.0.0.2").unwrap()],
            ..Default::default()
        });
        let mut v6 = with(Filters {
            laddrs: vec![parse_cidr("::1/128").unwrap()],
            ports: vec![a, b],
            ..Default::default()
        });
        let mut reference = reference;

        conversation(
            SocketAddr::from(([127, 0, 0, 1], a)),
            Duration::ZERO,
            Ending::ClientFirst,
        );
        conversation(
            SocketAddr::from(([127, 0, 0, 1], b)),
            Duration::ZERO,
            Ending::ServerFirst,
        );
        conversation(
            "[::1]:0"
                .parse::<SocketAddr>()
                .map(|s| SocketAddr::new(s.ip(), a))
                .unwrap(),
            Duration::ZERO,
            Ending::ClientFirst,
        );
        let to = SocketAddr::from(([127, 0, 0, 2], b));
        let listener = TcpListener::bind(to).unwrap();
        connect_from("127.0.0.9".parse().unwrap(), to, &listener);
        drop(listener);
        // 4 conversations x 3 sockets, all closed.
        reference.wait_closed("all sockets closed", |_| true, 12);

        assert_exactly("--lport", &mut lport, &reference, |t| t.lport == a);
        assert_exactly("--rport", &mut rport, &reference, |t| t.rport == a);
        assert_exactly("--state CLOSE_WAIT", &mut state, &reference, |t| {
            t.old == TcpState::CloseWait || t.new == TcpState::CloseWait
        });
        assert_exactly("--laddr 127.0.0.9/32", &mut laddr, &reference, |t| {
            t.laddr == IpAddr::from([127, 0, 0, 9])
        });
        assert_exactly("--raddr 127.0.0.2", &mut raddr, &reference, |t| {
            t.raddr == IpAddr::from([127, 0, 0, 2])
        });
        assert_exactly("--laddr ::1/128", &mut v6, &reference, |t| {
            t.laddr == "::1".parse::<IpAddr>().unwrap()
        });
        assert!(state.counters().filtered > 0);
    });
}

#[test]
fn one_namespace_of_two_at_once() {
    require_root();
    let port = test_port();
    // Both namespaces are created first, so their inodes are known.
    let start = Arc::new(Barrier::new(3));
    let (tx, rx) = std::sync::mpsc::channel();
    let spawn = |start: Arc<Barrier>, tx: std::sync::mpsc::Sender<u32>| {
        thread::spawn(move || {
            in_netns(move || {
                tx.send(std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino() as u32)
                    .unwrap();
                start.wait();
                conversation(
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::ZERO,
                    Ending::ClientFirst,
                );
            });
        })
    };
    let h1 = spawn(start.clone(), tx.clone());
    let h2 = spawn(start.clone(), tx);
    let ns_a = rx.recv().unwrap();
    let ns_b = rx.recv().unwrap();
    assert_ne!(ns_a, ns_b);
    let mut reference = with(Filters {
        ports: vec![port],
        ..Default::default()
    });
    let mut only_a = with(Filters {
        netns: Some(ns_a),
        ..Default::default()
    });
    start.wait();
    h1.join().unwrap();
    h2.join().unwrap();
    reference.wait_closed("both namespaces' sockets closed", |_| true, 6);
    assert!(reference.events.iter().any(|t| t.netns == ns_b));
    assert_exactly("--netns", &mut only_a, &reference, |t| t.netns == ns_a);
}

#[test]
fn owner_pid_and_comm_include_accepted_sockets() {
    in_netns(|| {
        let (srv_port, other) = (test_port(), test_port());
        let mut reference = with(Filters {
            ports: vec![srv_port, other],
            ..Default::default()
        });
        let server = ForkedServer::prepare(srv_port, ServerMode::CloseAfterPeer);
        let mut by_pid = with(Filters {
            pid: Some(server.pid),
            ..Default::default()
        });
        let name = std::str::from_utf8(&SERVER_COMM[..SERVER_COMM.len() - 1])
            .unwrap()
            .to_string();
        let mut by_comm = with(Filters {
            comm: Some(name),
            ports: vec![srv_port, other],
            ..Default::default()
        });
        // The forked server listens after both instances are loaded.
        server.go();
        drop(server.connect(srv_port));
        conversation(
            SocketAddr::from(([127, 0, 0, 1], other)),
            Duration::ZERO,
            Ending::ClientFirst,
        );
        reference.wait_until("server side closed and the other conversation", |evs| {
            evs.iter()
                .filter(|t| t.new == TcpState::Close && t.lport == srv_port)
                .count()
                >= 1
                && evs
                    .iter()
                    .filter(|t| t.new == TcpState::Close && (t.lport == other || t.rport == other))
                    .count()
                    >= 3
        });
        // The server's listener stays open (the server is paused); its
        // accepted socket, created in softirq on the client's task, passes
        // through the listener it inherits from.
        let server_side = |t: &Transition| t.lport == srv_port;
        assert_exactly("--pid", &mut by_pid, &reference, server_side);
        assert!(by_pid.events.iter().any(|t| t.old == TcpState::Listen
            && t.new == TcpState::SynRecv
            && t.pid != server.pid));
        assert_exactly("--comm", &mut by_comm, &reference, server_side);
    });
}

/// `--pid` and `--comm` on a server that listened before the tracer
/// started (the usual `--pid $(pidof nginx)`): its listener's verdict comes
/// from the start-up snapshot, so the socket it accepts passes from its
/// first transition. Every server-side transition arrives, by value, and
/// nothing of another server or of the clients.
#[test]
fn owner_filters_select_a_server_that_predates_the_tracer() {
    in_netns(|| {
        for by_comm in [false, true] {
            let (port, other) = (test_port(), test_port());
            let server = ForkedServer::start(port, ServerMode::CloseAfterPeer);
            wait_listening(port);
            // Another server, of this process: it must not pass.
            let other_listener = TcpListener::bind(("127.0.0.1", other)).unwrap();
            let pid = server.pid.to_string();
            let name = std::str::from_utf8(&SERVER_COMM[..SERVER_COMM.len() - 1]).unwrap();
            let filter = if by_comm {
                ["--comm", name]
            } else {
                ["--pid", pid.as_str()]
            };
            let mut args = vec!["--output", "json", "--events", "transitions", "-v"];
            args.extend(filter);
            let run = Running::start(&args);
            run.wait_attached();
            drop(server.connect(port));
            let client = TcpStream::connect(("127.0.0.1", other)).unwrap();
            let (accepted, _) = other_listener.accept().unwrap();
            drop(client);
            drop(accepted);
            let closed = |lines: &[String]| {
                lines.iter().any(|l| {
                    let v = json(l);
                    v["type"] == "transition" && v["old"] == "LAST_ACK" && v["lport"] == port
                })
            };
            let mut got = Vec::new();
            run.read_until(&mut got, "the accepted socket's close", closed);
            run.signal(libc::SIGINT);
            let (code, rest, err) = run.finish();
            assert_eq!(code, 0, "{err:#?}");
            got.extend(rest);
            let seen: Vec<(String, String, u64, u64)> = of_type(&got, "transition")
                .iter()
                .filter(|t| t["source"] == "tracepoint")
                .map(|t| {
                    (
                        t["old"].as_str().unwrap().to_string(),
                        t["new"].as_str().unwrap().to_string(),
                        t["lport"].as_u64().unwrap(),
                        t["pid"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            let server_side = |old: &str, new: &str| {
                (
                    old.to_string(),
                    new.to_string(),
                    port as u64,
                    server.pid as u64,
                )
            };
            assert_eq!(
                seen,
                [
                    server_side("LISTEN", "SYN_RECV"),
                    server_side("SYN_RECV", "ESTABLISHED"),
                    server_side("ESTABLISHED", "CLOSE_WAIT"),
                    server_side("CLOSE_WAIT", "LAST_ACK"),
                    server_side("LAST_ACK", "CLOSE"),
                ],
                "by_comm={by_comm}: {got:#?}"
            );
        }
    });
}

/// A prefork server (a master and its worker both hold the listener)
/// started before the tracer: the accepted socket's first transitions name
/// the server's comm, no pid, and both pids in `listener_pids`; once the
/// worker is found holding the socket in /proc, the transitions that run
/// in softirq (the client's FIN) name the worker. `--pid` of the master,
/// `--pid` of the worker and `--comm` each select the connection.
#[test]
fn prefork_servers_are_named_by_comm_then_by_the_accepting_worker() {
    in_netns(|| {
        let name = std::str::from_utf8(&SERVER_COMM[..SERVER_COMM.len() - 1]).unwrap();
        for filter in ["none", "master", "worker", "comm"] {
            let port = test_port();
            let server = PreforkServer::start(port);
            wait_listening(port);
            let (master, worker) = (server.master.to_string(), server.worker.to_string());
            let port_arg = port.to_string();
            let mut args = vec!["--output", "json", "--events", "all", "-vv"];
            match filter {
                "master" => args.extend(["--pid", master.as_str()]),
                "worker" => args.extend(["--pid", worker.as_str()]),
                "comm" => args.extend(["--comm", name]),
                _ => args.extend(["--port", port_arg.as_str()]),
            }
            let run = Running::start(&args);
            run.wait_attached();
            let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut got = Vec::new();
            let server_step = |v: &serde_json::Value, old: &str, new: &str| {
                v["type"] == "transition"
                    && v["lport"] == port
                    && v["old"] == old
                    && v["new"] == new
            };
            run.read_until(&mut got, "the accepted socket established", |lines| {
                lines
                    .iter()
                    .any(|l| server_step(&json(l), "SYN_RECV", "ESTABLISHED"))
            });
            let mut pids = [server.master, server.worker];
            pids.sort_unstable();
            let established = got
                .iter()
                .map(|l| json(l))
                .find(|v| server_step(v, "SYN_RECV", "ESTABLISHED"))
                .unwrap();
            assert_eq!(
                (
                    &established["pid"],
                    &established["comm"],
                    &established["listener_pids"]
                ),
                (
                    &serde_json::Value::Null,
                    &serde_json::json!(name),
                    &serde_json::json!(pids)
                ),
                "{filter}: {established}"
            );
            // The look-up a second after it was established.
            let found = format!(":{port} <- ");
            let start = Instant::now();
            loop {
                assert!(
                    start.elapsed() < DEADLINE,
                    "{filter}: the accepting process was never looked up"
                );
                match run.stderr.recv_timeout(Duration::from_millis(100)) {
                    Ok(line) if line.contains(&found) && line.contains("owner") => {
                        assert!(
                            line.contains(&format!("owner {} ", server.worker)),
                            "{line}"
                        );
                        break;
                    }
                    Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(e) => panic!("{filter}: {e}"),
                }
            }
            drop(client);
            run.read_until(&mut got, "the worker's close", |lines| {
                lines.iter().any(|l| {
                    let v = json(l);
                    v["type"] == "connection" && v["lport"] == port
                })
            });
            run.signal(libc::SIGINT);
            let (code, rest, err) = run.finish();
            assert_eq!(code, 0, "{err:#?}");
            got.extend(rest);
            let records: Vec<serde_json::Value> = got.iter().map(|l| json(l)).collect();
            let fin = records
                .iter()
                .find(|v| server_step(v, "ESTABLISHED", "CLOSE_WAIT"))
                .unwrap_or_else(|| panic!("{filter}: no CLOSE_WAIT: {got:#?}"));
            // In softirq: only the look-up can have named the worker.
            assert_eq!(fin["task_pid"], serde_json::Value::Null, "{fin}");
            assert_eq!(fin["pid"], server.worker, "{filter}: {fin}");
            let conn = records
                .iter()
                .find(|v| v["type"] == "connection" && v["lport"] == port)
                .unwrap();
            assert_eq!(
                (&conn["pid"], &conn["listener_pids"]),
                (&serde_json::json!(server.worker), &serde_json::json!(pids)),
                "{filter}: {conn}"
            );
            // The client's side is no prefork server's.
            if filter != "none" {
                assert!(
                    !records
                        .iter()
                        .any(|v| v["type"] == "transition" && v["rport"] == port),
                    "{filter}: {got:#?}"
                );
            }
        }
    });
}

/// A server in a process of its own on a port it shares with others
/// (SO_REUSEPORT): once told to, it listens, accepts every connection,
/// reports the peer's port, closes it; on command it closes its listener.
struct ReuseportServer {
    pid: u32,
    /// Peer ports of the connections it accepted (u16 each).
    ports_rx: std::fs::File,
    ctl_tx: i32,
}

impl ReuseportServer {
    fn start(port: u16) -> ReuseportServer {
        let (mut ctl, mut ports) = ([0i32; 2], [0i32; 2]);
        // SAFETY: plain syscalls; after fork the child makes raw system
        // calls only on data prepared before the fork.
        unsafe {
            assert_eq!(libc::pipe2(ctl.as_mut_ptr(), libc::O_CLOEXEC), 0);
            assert_eq!(libc::pipe2(ports.as_mut_ptr(), libc::O_CLOEXEC), 0);
            let addr = loopback_sockaddr(port);
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                // The control pipe as fd 3, the ports pipe as fd 4.
                keep_only_fds(&[ctl[0], ports[1]]);
                // Listens once told to (its pid is known first).
                let mut go = [0u8; 1];
                libc::read(3, go.as_mut_ptr().cast(), 1);
                let mut s = listen_or_exit(&addr, libc::SO_REUSEPORT, 64);
                loop {
                    let mut fds = [
                        libc::pollfd {
                            fd: 3,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: s,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    let n = if s >= 0 { 2 } else { 1 };
                    libc::poll(fds.as_mut_ptr(), n, -1);
                    if fds[0].revents != 0 {
                        let mut b = [0u8; 1];
                        if libc::read(3, b.as_mut_ptr().cast(), 1) != 1 || b[0] == b'x' {
                            libc::_exit(0);
                        }
                        libc::close(s);
                        s = -1;
                    }
                    if n == 2 && fds[1].revents != 0 {
                        let mut peer: libc::sockaddr_in = std::mem::zeroed();
                        let mut len = size_of::<libc::sockaddr_in>() as u32;
                        let c =
                            libc::accept(s, (&mut peer as *mut libc::sockaddr_in).cast(), &mut len);
                        if c >= 0 {
                            let p = u16::from_be(peer.sin_port);
                            libc::write(4, (&p as *const u16).cast(), 2);
                            libc::close(c);
                        }
                    }
                }
            }
            libc::close(ctl[0]);
            libc::close(ports[1]);
            use std::os::fd::FromRawFd as _;
            ReuseportServer {
                pid: pid as u32,
                ports_rx: std::fs::File::from_raw_fd(ports[0]),
                ctl_tx: ctl[1],
            }
        }
    }

    /// Tells it to listen.
    fn go(&self) {
        // SAFETY: writing one byte to our pipe.
        unsafe { libc::write(self.ctl_tx, [b'g'].as_ptr().cast(), 1) };
    }

    /// Closes its listener (it stays alive).
    fn close_listener(&self) {
        // SAFETY: writing one byte to our pipe.
        unsafe { libc::write(self.ctl_tx, [b'c'].as_ptr().cast(), 1) };
    }

    /// The next peer port it accepted.
    fn accepted(&mut self) -> u16 {
        let mut b = [0u8; 2];
        std::io::Read::read_exact(&mut self.ports_rx, &mut b).expect("peer port");
        u16::from_ne_bytes(b)
    }
}

impl Drop for ReuseportServer {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe {
            libc::close(self.ctl_tx);
            libc::kill(self.pid as i32, libc::SIGKILL);
            libc::waitpid(self.pid as i32, std::ptr::null_mut(), 0);
        }
    }
}

/// Connections to `port` until `n` were accepted, each read to its end;
/// returns the ports each server reported.
fn connect_n(port: u16, n: usize, servers: &mut [&mut ReuseportServer]) -> Vec<BTreeSet<u16>> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let start = std::time::Instant::now();
        let c = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(start.elapsed() < DEADLINE, "connect: {e}");
                    thread::sleep(Duration::from_millis(5));
                }
            }
        };
        let mut b = [0u8; 1];
        let _ = std::io::Read::read(&mut &c, &mut b);
        clients.push(c.local_addr().unwrap().port());
    }
    // Every client port was accepted by one server or the other.
    let mut got: Vec<BTreeSet<u16>> = vec![BTreeSet::new(); servers.len()];
    let mut all = BTreeSet::new();
    let want: BTreeSet<u16> = clients.iter().copied().collect();
    while all.len() < want.len() {
        for (i, s) in servers.iter_mut().enumerate() {
            // SAFETY: plain non-blocking poll of our pipe.
            let ready = unsafe {
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&s.ports_rx),
                    events: libc::POLLIN,
                    revents: 0,
                };
                libc::poll(&mut p, 1, 10) > 0
            };
            if ready {
                let port = s.accepted();
                got[i].insert(port);
                all.insert(port);
            }
        }
    }
    assert_eq!(all, want);
    got
}

/// Two processes share a port (SO_REUSEPORT) and `--pid` selects one:
/// exactly the connections its listener accepted pass, from their first
/// transition, before and after the other process closes its listener
/// (the verdict is the accepting listener's own, copied with the socket's
/// storage, not the port's).
#[test]
fn owner_filter_keeps_reuseport_listeners_apart() {
    in_netns(|| {
        let port = test_port();
        let mut reference = with(Filters {
            ports: vec![port],
            ..Default::default()
        });
        let mut a = ReuseportServer::start(port);
        let mut b = ReuseportServer::start(port);
        let mut by_pid = with(Filters {
            pid: Some(a.pid),
            ..Default::default()
        });
        // Both listen (the kernel spreads connections over them).
        a.go();
        b.go();
        let got = connect_n(port, 40, &mut [&mut a, &mut b]);
        let (mut a_ports, b_ports) = (got[0].clone(), got[1].clone());
        assert!(
            !a_ports.is_empty() && !b_ports.is_empty(),
            "both servers accepted some: {a_ports:?} {b_ports:?}"
        );
        // The other closes its listener: the selected one's keep passing.
        b.close_listener();
        reference.wait_until("b's listener closed", |evs| {
            evs.iter()
                .any(|t| t.old == TcpState::Listen && t.new == TcpState::Close)
        });
        let got = connect_n(port, 20, &mut [&mut a, &mut b]);
        assert!(got[1].is_empty(), "b no longer listens");
        a_ports.extend(&got[0]);
        let all: usize = a_ports.len() + b_ports.len();
        reference.wait_until("every server-side socket closed", |evs| {
            evs.iter()
                .filter(|t| t.lport == port && t.rport != 0 && t.new == TcpState::Close)
                .count()
                >= all
        });
        let a_listener: BTreeSet<u64> = reference
            .events
            .iter()
            .filter(|t| t.new == TcpState::Listen && t.pid == a.pid)
            .map(|t| t.sock)
            .collect();
        assert_eq!(a_listener.len(), 1);
        // On 6.1 an accepted socket's first transition (LISTEN ->
        // SYN_RECV) shows no remote port yet: it is a's if the socket's
        // next transition is.
        let mut child_firsts = BTreeSet::new();
        for (i, t) in reference.events.iter().enumerate() {
            if t.new == TcpState::SynRecv && t.rport == 0 {
                let next = reference.events[i + 1..].iter().find(|n| n.sock == t.sock);
                if next.is_some_and(|n| a_ports.contains(&n.rport)) {
                    child_firsts.insert((t.sock, t.mono_ns));
                }
            }
        }
        assert_exactly("--pid with SO_REUSEPORT", &mut by_pid, &reference, |t| {
            t.lport == port
                && (a_ports.contains(&t.rport)
                    || a_listener.contains(&t.sock)
                    || child_firsts.contains(&(t.sock, t.mono_ns)))
        });
    });
}
