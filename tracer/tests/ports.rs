//! Ephemeral-port pressure with the real program in the running kernel: a
//! client that churns connections to one destination in a namespace whose
//! port range is narrowed to 200 ports. Needs root.

mod common;

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const RANGE: (u16, u16) = (50000, 50199);

/// Client sockets toward 127.0.0.1:`port` as the kernel lists them in
/// this thread's namespace (`/proc/thread-self/net/tcp`, what `ss` reads;
/// the guests have no `ss`): all, and those in TIME_WAIT.
fn listed_counts(port: u16) -> (usize, usize) {
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp")
        .expect("read /proc/thread-self/net/tcp");
    // rem_address of 127.0.0.1:port (little-endian address, hex port).
    let dst = format!("0100007F:{port:04X}");
    let (mut all, mut time_wait) = (0, 0);
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(2) == Some(&dst.as_str()) {
            all += 1;
            // TCP_TIME_WAIT
            time_wait += usize::from(f.get(3) == Some(&"06"));
        }
    }
    (all, time_wait)
}

/// In the test's own namespace: the ephemeral port range narrowed to
/// [`RANGE`], and a listener on 127.0.0.1 at a test port outside it.
/// Timewait sockets are not reused (`tcp_tw_reuse` 0) until a test says
/// so: the default (2) reuses loopback ones a second after they were
/// made, which a slow machine (the emulated guests) reaches while it is
/// still making the test's connections.
fn narrowed_namespace() -> (SocketAddr, TcpListener) {
    netns_sysctl("net.ipv4.tcp_tw_reuse", "0");
    netns_sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("{} {}", RANGE.0, RANGE.1),
    );
    let port = test_port();
    assert!(!(RANGE.0..=RANGE.1).contains(&port));
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    (server, TcpListener::bind(server).unwrap())
}

fn pressure_records(lines: &[String]) -> Vec<Value> {
    of_type(lines, "port_pressure")
}

/// A connection from the range. SO_REUSEADDR, which its timewait socket
/// inherits, lets a later socket bind to its port.
fn connect(server: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.connect(&server.into()).expect("connect");
    s.into()
}

/// One connection from the range, closed by the client first: it leaves a
/// timewait socket on the client's side. Returns its local port.
fn client_first(listener: &TcpListener, server: SocketAddr) -> u16 {
    let client = connect(server);
    let lport = client.local_addr().unwrap().port();
    let (mut accepted, _) = listener.accept().unwrap();
    drop(client);
    let mut b = [0u8; 1];
    assert_eq!(accepted.read(&mut b).unwrap(), 0);
    drop(accepted);
    lport
}

/// A connection from `lport` (the 4-tuple of a timewait socket: the
/// kernel reuses it), closed by the server first: nothing is left of it on
/// the client's side.
fn reuse_and_let_server_close(listener: &TcpListener, server: SocketAddr, lport: u16) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], lport)).into())
        .unwrap();
    s.connect(&server.into())
        .unwrap_or_else(|e| panic!("reconnect from {lport}: {e}"));
    let mut client: TcpStream = s.into();
    let (accepted, _) = listener.accept().unwrap();
    drop(accepted);
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap(), 0);
    drop(client);
}

#[test]
fn port_pressure_at_the_threshold_and_back_below() {
    in_netns(|| {
        let (server, listener) = narrowed_namespace();
        let port = server.port();
        let port_arg = port.to_string();
        let run = Running::start(&[
            "--output",
            "json",
            "--events",
            "none",
            "--port",
            &port_arg,
            "--port-pressure",
            "50",
            "-v",
        ]);
        run.wait_attached();
        let netns = own_netns().expect("a namespace of its own");

        // 99 timewait sockets: under the threshold (100 of 200).
        let mut lports: Vec<u16> = (0..99).map(|_| client_first(&listener, server)).collect();
        assert!(lports.iter().all(|p| (RANGE.0..=RANGE.1).contains(p)));
        let start = Instant::now();
        while listed_counts(port) != (99, 99) {
            assert!(
                start.elapsed() < DEADLINE,
                "the kernel never listed the 99 timewait sockets: {:?}",
                listed_counts(port)
            );
            thread::sleep(Duration::from_millis(20));
        }
        // The hundredth, kept open, crosses it.
        let open = connect(server);
        let (open_accepted, _) = listener.accept().unwrap();
        lports.push(open.local_addr().unwrap().port());
        let mut got = Vec::new();
        run.read_until(&mut got, "the port_pressure record", |l| {
            !pressure_records(l).is_empty()
        });
        assert_eq!(
            listed_counts(port),
            (100, 99),
            "the kernel's list after the crossing"
        );
        let rec = &pressure_records(&got)[0];
        assert_eq!(rec["netns"], netns, "{rec}");
        assert_eq!(rec["laddr"], "127.0.0.1", "{rec}");
        assert_eq!(rec["raddr"], "127.0.0.1", "{rec}");
        assert_eq!(rec["rport"], port, "{rec}");
        assert_eq!(rec["in_use"], 100, "{rec}");
        assert_eq!(rec["time_wait"], 99, "{rec}");
        assert_eq!(rec["range"], 200, "{rec}");
        assert_eq!(rec["ratio"], 0.5, "{rec}");
        assert_eq!(rec["above"], true, "{rec}");
        assert_eq!(rec["at_exit"], false, "{rec}");
        assert!(rec["time"].is_string(), "{rec}");
        assert_eq!(pressure_records(&got).len(), 1, "once: {got:?}");

        // The TIME_WAITs end: each 4-tuple is reused (tcp_tw_reuse, past
        // its delay) by a connection the server closes first, which leaves
        // no timewait socket.
        netns_sysctl("net.ipv4.tcp_tw_reuse", "1");
        thread::sleep(Duration::from_millis(1100));
        drop(open_accepted);
        let mut b = [0u8; 1];
        assert_eq!((&open).read(&mut b).unwrap(), 0);
        drop(open);
        for &lport in &lports[..99] {
            reuse_and_let_server_close(&listener, server, lport);
        }
        run.read_until(&mut got, "the record of the fall below", |l| {
            pressure_records(l).len() >= 2
        });
        let below = &pressure_records(&got)[1];
        // Below under 50 % less 5 % of the range: at 89 ports, the
        // hundredth's and 10 timewait sockets gone.
        assert_eq!(below["above"], false, "{below}");
        assert_eq!(below["in_use"], 89, "{below}");
        assert_eq!(below["time_wait"], 89, "{below}");
        assert_eq!(below["ratio"], 0.445, "{below}");
        let start = Instant::now();
        while listed_counts(port) != (0, 0) {
            assert!(
                start.elapsed() < DEADLINE,
                "the kernel still lists client sockets: {:?}",
                listed_counts(port)
            );
            thread::sleep(Duration::from_millis(20));
        }
        run.interrupt();
        let (code, rest, _) = run.finish();
        assert_eq!(code, 0);
        got.extend(rest);
        // Nothing above at exit: no listing.
        assert_eq!(pressure_records(&got).len(), 2, "{got:?}");
        let stats = of_type(&got, "stats").pop().expect("stats record");
        assert_eq!(stats["port_pressure_unknown_ns"], 0, "{stats}");
        assert_eq!(stats["port_pressure_dests_full"], 0, "{stats}");
    });
}

#[test]
fn destinations_still_above_are_listed_at_exit_and_summarized() {
    in_netns(|| {
        let (server, listener) = narrowed_namespace();
        let port = server.port();
        let port_arg = port.to_string();
        let run = Running::start(&[
            "--output",
            "json",
            "--events",
            "none",
            "--port",
            &port_arg,
            "--port-pressure",
            "10",
            "--summary",
            "-v",
        ]);
        run.wait_attached();
        for _ in 0..20 {
            client_first(&listener, server);
        }
        let mut got = Vec::new();
        run.read_until(&mut got, "the port_pressure record", |l| {
            !pressure_records(l).is_empty()
        });
        run.interrupt();
        let (code, rest, _) = run.finish();
        assert_eq!(code, 0);
        got.extend(rest);
        let recs = pressure_records(&got);
        assert_eq!(recs.len(), 2, "{got:?}");
        let (crossed, listed) = (&recs[0], &recs[1]);
        assert_eq!(crossed["in_use"], 20, "{crossed}");
        assert_eq!(listed["at_exit"], true, "{listed}");
        assert_eq!(listed["above"], true, "{listed}");
        assert_eq!(listed["in_use"], 20, "{listed}");
        assert_eq!(listed["time_wait"], 20, "{listed}");
        // --summary: the destinations by ports in use.
        let summary = of_type(&got, "port_summary").pop().expect("port_summary");
        let top = &summary["destinations"][0];
        assert_eq!(top["rport"], port, "{summary}");
        assert_eq!(
            (
                &top["in_use"],
                &top["time_wait"],
                &top["range"],
                &top["ratio"]
            ),
            (&20.into(), &20.into(), &200.into(), &0.1.into()),
            "{summary}"
        );
    });
}

#[test]
fn timewait_sockets_older_than_the_tracer_count_until_reused() {
    in_netns(|| {
        let (server, listener) = narrowed_namespace();
        let port = server.port();
        let lports: Vec<u16> = (0..20).map(|_| client_first(&listener, server)).collect();
        let start = Instant::now();
        while listed_counts(port) != (20, 20) {
            assert!(start.elapsed() < DEADLINE, "{:?}", listed_counts(port));
            thread::sleep(Duration::from_millis(20));
        }
        let port_arg = port.to_string();
        let run = Running::start(&[
            "--output",
            "json",
            "--events",
            "none",
            "--port",
            &port_arg,
            "--port-pressure",
            "10",
            "-v",
        ]);
        run.wait_attached();
        let mut got = Vec::new();
        run.read_until(&mut got, "the port_pressure record at start", |l| {
            !pressure_records(l).is_empty()
        });
        let rec = &pressure_records(&got)[0];
        assert_eq!(
            (&rec["in_use"], &rec["time_wait"], &rec["above"]),
            (&20.into(), &20.into(), &true.into()),
            "{rec}"
        );
        // Each reuse ends one (below under 10: at 9).
        netns_sysctl("net.ipv4.tcp_tw_reuse", "1");
        thread::sleep(Duration::from_millis(1100));
        for &lport in &lports[..11] {
            reuse_and_let_server_close(&listener, server, lport);
        }
        run.read_until(&mut got, "the record of the fall below", |l| {
            pressure_records(l).len() >= 2
        });
        let below = &pressure_records(&got)[1];
        assert_eq!(
            (&below["in_use"], &below["time_wait"], &below["above"]),
            (&9.into(), &9.into(), &false.into()),
            "{below}"
        );
        assert_eq!(listed_counts(port), (9, 9));
    });
}

/// A namespace whose sysctls cannot be read (hidden here by an empty
/// tmpfs in the tracer's mount namespace) has no port pressure: `-v` says
/// why once, the stats count it, and tracing goes on.
#[test]
fn unreadable_port_range_is_said_once_and_counted() {
    in_netns(|| {
        let netns = own_netns().expect("a namespace of its own");
        let port = test_port();
        let server = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = TcpListener::bind(server).unwrap();
        let mut cmd = tracer();
        hide_with_tmpfs(&mut cmd, &["/proc/sys/net/ipv4"], &[]);
        let child = cmd
            .args(["--output", "json", "--events", "connections", "-v"])
            .args(["--port", &port.to_string(), "--netns", &netns.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn tracer");
        let run = Running::from_child(child);
        let said = run.wait_attached_saying();
        for _ in 0..3 {
            client_first(&listener, server);
        }
        let mut got = Vec::new();
        run.read_until(&mut got, "the server's connection records", |l| {
            of_type(l, "connection").len() >= 3
        });
        run.interrupt();
        let (code, rest, err) = run.finish();
        assert_eq!(code, 0);
        got.extend(rest);
        let why = format!("netns {netns}: no port pressure: reading ip_local_port_range");
        let all = format!("{said}\n{}", err.join("\n"));
        assert_eq!(all.matches(&why).count(), 1, "{all}");
        assert!(pressure_records(&got).is_empty());
        let stats = of_type(&got, "stats").pop().expect("stats record");
        assert!(
            stats["port_pressure_unknown_ns"].as_u64() >= Some(1),
            "{stats}"
        );
    });
}
