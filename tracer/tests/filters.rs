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
    sync::{Arc, Barrier},
    thread,
    time::Duration,
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
            })
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
