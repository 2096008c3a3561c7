//! Integration tests: the real kernel program, loaded into the running
//! kernel, watching real TCP connections in a network namespace per test.
//! They need root and fail (never skip) without it. `cargo xtask test`
//! runs them one at a time.

mod common;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use common::*;
use tracer::{
    kernel::events::{Family, TcpState::*, Transition},
    kernel::features::TransitionPath,
    kernel::filters::Filters,
    kernel::loader::{Attach, LoadOptions},
    track::tracker::Tracker,
};
use tracer_common::{InetSockSetStateRecord, TcpReceiveResetRecord, TcpSendResetRecord};

/// Scheduling slack allowed on top of a 200 ms hold (loaded CI machines).
const HOLD_SLACK: Duration = Duration::from_millis(100);

/// Fields of a tracepoint's format file: name -> (offset, size).
fn format_fields(event: &str) -> BTreeMap<String, (usize, usize)> {
    tracer::kernel::loader::ensure_tracefs().expect("tracefs");
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|b| std::fs::read_to_string(format!("{b}/events/{event}/format")).ok())
        .unwrap_or_else(|| panic!("format file of {event}"));
    // field:__u16 sport;	offset:24;	size:2;	signed:0;
    let mut fields = BTreeMap::new();
    for line in format
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("field:"))
    {
        let parts: Vec<&str> = line.split(';').map(str::trim).collect();
        let decl = parts[0].trim_start_matches("field:");
        let name = decl
            .rsplit(' ')
            .next()
            .unwrap()
            .split('[')
            .next()
            .unwrap()
            .trim_start_matches('*');
        let num = |p: &str, key: &str| p.strip_prefix(key).unwrap().parse::<usize>().unwrap();
        fields.insert(
            name.to_string(),
            (num(parts[1], "offset:"), num(parts[2], "size:")),
        );
    }
    fields
}

/// Checks the offset and size of each named field of `$record` against
/// the format file's `$fields`.
macro_rules! check_fields {
    ($fields:expr, $record:ty, $($f:ident),*) => {$(
        let (off, size) = $fields[stringify!($f)];
        assert_eq!(std::mem::offset_of!($record, $f), off, "offset of {}", stringify!($f));
        let rec = <$record>::default();
        assert_eq!(std::mem::size_of_val(&rec.$f), size, "size of {}", stringify!($f));
    )*};
}

#[test]
fn tracepoint_format_matches_record_layout() {
    require_root();
    let fields = format_fields("sock/inet_sock_set_state");
    check_fields!(
        fields,
        InetSockSetStateRecord,
        common_type,
        common_flags,
        common_preempt_count,
        common_pid,
        skaddr,
        oldstate,
        newstate,
        sport,
        dport,
        family,
        protocol,
        saddr,
        daddr,
        saddr_v6,
        daddr_v6
    );
    assert_eq!(
        fields.len(),
        15,
        "the format has fields the record does not know: {fields:?}"
    );
}

/// The reset tracepoints' records are read only up to `state` (send) and
/// `skaddr` (receive): those leading fields must be where the structs say,
/// on every kernel (what follows them differs between kernels). The send
/// record's `reason` (6.10+) is read where BTF says: the format file agrees.
#[test]
fn reset_tracepoint_formats() {
    require_root();
    let send = format_fields("tcp/tcp_send_reset");
    let from_btf = tracer::kernel::btf_offsets::from_sys_fs()
        .expect("kernel BTF")
        .offsets
        .rst_reason;
    match send.get("reason") {
        Some(&(offset, size)) => {
            assert_eq!((from_btf as usize, size), (offset, 4), "{send:?}");
        }
        None => assert_eq!(from_btf, tracer_common::OFFSET_UNKNOWN, "{send:?}"),
    }
    check_fields!(
        send,
        TcpSendResetRecord,
        common_type,
        common_flags,
        common_preempt_count,
        common_pid,
        skbaddr,
        skaddr,
        state
    );
    let receive = format_fields("tcp/tcp_receive_reset");
    check_fields!(
        receive,
        TcpReceiveResetRecord,
        common_type,
        common_flags,
        common_preempt_count,
        common_pid,
        skaddr
    );
}

/// The three sockets of one conversation: listener, client, accepted child.
struct Sockets {
    listener: u64,
    client: u64,
    server: u64,
}

fn sockets(c: &Collector, port: u16, client: SocketAddr) -> Sockets {
    Sockets {
        listener: c.sock_where("listener", |t| t.new == Listen && t.lport == port),
        client: c.sock_where("client", |t| t.rport == port && t.old == SynSent),
        server: c.sock_where("server", |t| t.lport == port && t.rport == client.port()),
    }
}

/// Runs one conversation in a fresh namespace and returns what the
/// kernel program reported of it.
fn observe(ip: IpAddr, hold: Duration, close: Ending) -> (Collector, Sockets) {
    observe_with(ip, hold, close, LoadOptions::default())
}

/// [`observe`] with other load options: the classic path, batching.
fn observe_with(
    ip: IpAddr,
    hold: Duration,
    close: Ending,
    opts: LoadOptions,
) -> (Collector, Sockets) {
    in_netns(move || {
        let port = test_port();
        let mut c = Collector::on_port_with(port, opts);
        let client = conversation(SocketAddr::new(ip, port), hold, close);
        // Client, child and listener all reach CLOSE.
        c.wait_closed(
            "three sockets closed",
            |t| t.lport == port || t.rport == port,
            3,
        );
        let s = sockets(&c, port, client);
        (c, s)
    })
}

/// Checks what holds for every conversation: the kernel's durations match
/// the gaps between consecutive events, the connection records add up,
/// nothing was lost, and every event has the right family.
fn check_common(c: &Collector, s: &Sockets, family: Family) {
    for sock in [s.listener, s.client, s.server] {
        let evs = c.of_sock(sock);
        assert!(
            evs[0].old_state_ns.is_none(),
            "first transition of a new socket has no known duration"
        );
        for pair in evs.windows(2) {
            assert_eq!(
                pair[1].old_state_ns,
                Some(pair[1].mono_ns - pair[0].mono_ns),
                "kernel duration of {} differs from the event gap",
                pair[1].old
            );
        }
        assert!(evs.iter().all(|t| t.family == family));
    }
    let mut tracker = Tracker::new(16);
    let mut closed = Vec::new();
    for t in &c.events {
        for id in tracker.on_transition(t).closed {
            closed.push(tracker.take(id));
        }
    }
    // The active closer (if any) waits for its timewait socket.
    assert_eq!(closed.len() + tracker.timewait_pending(), 3);
    for conn in &closed {
        assert!(conn.complete, "opening of {:#x} seen", conn.sock);
        assert!(!conn.gap);
        assert_eq!(
            conn.states().map(|(_, ns)| ns).sum::<u64>(),
            conn.duration_ns()
        );
    }
    let k = c.counters();
    assert_eq!(k.ringbuf_full, 0, "lost events");
    assert_eq!(k.timing_update_failed, 0);
}

fn client_closes_first(ip: IpAddr, family: Family) {
    client_closes_first_with(ip, family, LoadOptions::default());
}

fn client_closes_first_with(ip: IpAddr, family: Family, opts: LoadOptions) {
    let (c, s) = observe_with(ip, Duration::ZERO, Ending::ClientFirst, opts);
    assert_eq!(
        sequence(&c.of_sock(s.listener)),
        [(Close, Listen), (Listen, Close)]
    );
    assert_eq!(
        sequence(&c.of_sock(s.client)),
        [
            (Close, SynSent),
            (SynSent, Established),
            (Established, FinWait1),
            (FinWait1, FinWait2),
            (FinWait2, Close)
        ],
        "client:\n{}",
        dump(&c.events)
    );
    assert_eq!(
        sequence(&c.of_sock(s.server)),
        [
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, CloseWait),
            (CloseWait, LastAck),
            (LastAck, Close)
        ],
        "server:\n{}",
        dump(&c.events)
    );
    check_common(&c, &s, family);
}

#[test]
fn ipv4_client_closes_first() {
    client_closes_first("127.0.0.1".parse().unwrap(), Family::Ipv4);
}

#[test]
fn ipv6_client_closes_first() {
    client_closes_first("::1".parse().unwrap(), Family::Ipv6);
}

/// The fallback path (classic tracepoint, LRU hash) gives the same events.
#[test]
fn ipv4_client_closes_first_on_the_classic_tracepoint() {
    let opts = LoadOptions {
        attach: Attach::Tracepoint,
        ..Default::default()
    };
    client_closes_first_with("127.0.0.1".parse().unwrap(), Family::Ipv4, opts);
}

#[test]
fn ipv6_client_closes_first_on_the_classic_tracepoint() {
    let opts = LoadOptions {
        attach: Attach::Tracepoint,
        ..Default::default()
    };
    client_closes_first_with("::1".parse().unwrap(), Family::Ipv6, opts);
}

/// Batched in the kernel (nothing flushed early: each socket's whole life
/// arrives in one record at its CLOSE): the same transitions, durations
/// and connection records.
#[test]
fn ipv4_client_closes_first_batched() {
    let opts = LoadOptions {
        attach: Attach::TpBtf,
        batch: true,
        ..Default::default()
    };
    client_closes_first_with("127.0.0.1".parse().unwrap(), Family::Ipv4, opts);
}

/// Batched with ESTABLISHED flushed early (as the agent does): a socket's
/// life comes in two records, in order.
#[test]
fn ipv6_client_closes_first_batched_with_early_flush() {
    let opts = LoadOptions {
        attach: Attach::TpBtf,
        batch: true,
        flush_states: 1 << (Established as u8),
        ..Default::default()
    };
    client_closes_first_with("::1".parse().unwrap(), Family::Ipv6, opts);
}

#[test]
fn ipv4_server_closes_first() {
    let (c, s) = observe(
        "127.0.0.1".parse().unwrap(),
        Duration::ZERO,
        Ending::ServerFirst,
    );
    assert_eq!(
        sequence(&c.of_sock(s.server)),
        [
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, FinWait1),
            (FinWait1, FinWait2),
            (FinWait2, Close)
        ],
        "server:\n{}",
        dump(&c.events)
    );
    assert_eq!(
        sequence(&c.of_sock(s.client)),
        [
            (Close, SynSent),
            (SynSent, Established),
            (Established, CloseWait),
            (CloseWait, LastAck),
            (LastAck, Close)
        ],
        "client:\n{}",
        dump(&c.events)
    );
    check_common(&c, &s, Family::Ipv4);
}

#[test]
fn ipv6_reset_by_client() {
    let (c, s) = observe("::1".parse().unwrap(), Duration::ZERO, Ending::ClientReset);
    assert_eq!(
        sequence(&c.of_sock(s.client)),
        [
            (Close, SynSent),
            (SynSent, Established),
            (Established, Close)
        ],
        "client:\n{}",
        dump(&c.events)
    );
    assert_eq!(
        sequence(&c.of_sock(s.server)),
        [
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, Close)
        ],
        "server:\n{}",
        dump(&c.events)
    );
    check_common(&c, &s, Family::Ipv6);
}

#[test]
fn established_for_200ms_is_timed() {
    let hold = Duration::from_millis(200);
    let (c, s) = observe("127.0.0.1".parse().unwrap(), hold, Ending::ClientFirst);
    let established = |sock: u64| -> Duration {
        let t = c
            .of_sock(sock)
            .into_iter()
            .find(|t| t.old == Established)
            .expect("left ESTABLISHED");
        Duration::from_nanos(t.old_state_ns.expect("ESTABLISHED was timed"))
    };
    // connect() returns once the client is ESTABLISHED and close() starts
    // FIN_WAIT1, so the client's time is at least the hold.
    let client = established(s.client);
    assert!(
        client >= hold && client < hold + HOLD_SLACK,
        "client ESTABLISHED {client:?}"
    );
    // The child becomes ESTABLISHED a few µs after the client (the final ACK).
    let server = established(s.server);
    assert!(
        server >= hold - Duration::from_millis(1) && server < hold + HOLD_SLACK,
        "server ESTABLISHED {server:?}"
    );
    check_common(&c, &s, Family::Ipv4);
}

#[test]
fn kernel_filters_family_and_port() {
    in_netns(|| {
        let (keep, other) = (test_port(), test_port());
        let mut c = Collector::load(LoadOptions {
            filters: Filters {
                family: Some(Family::Ipv4),
                ports: vec![keep],
                ..Default::default()
            },
            ..Default::default()
        });
        for (ip, port) in [
            ("::1", keep),
            ("127.0.0.1", other),
            ("::1", other),
            ("127.0.0.1", keep),
        ] {
            conversation(
                SocketAddr::new(ip.parse().unwrap(), port),
                Duration::ZERO,
                Ending::ClientFirst,
            );
        }
        // The IPv4 conversation on `keep` comes last: once it is complete,
        // everything before it has been through the filter too.
        c.wait_closed(
            "IPv4 on the kept port",
            |t| t.lport == keep || t.rport == keep,
            3,
        );
        for t in &c.events {
            assert_eq!(t.family, Family::Ipv4, "{}", dump(&c.events));
            assert!(t.lport == keep || t.rport == keep, "{}", dump(&c.events));
        }
        // Three sockets, five transitions for each conversation's client
        // and child, two for each listener: 12 per conversation.
        assert_eq!(c.events.len(), 12, "{}", dump(&c.events));
        let k = c.counters();
        assert!(
            k.filtered >= 36,
            "the other three conversations were filtered: {k:?}"
        );
        assert_eq!(k.ringbuf_full, 0);
    });
}

#[test]
fn full_ring_buffer_is_counted_not_silent() {
    in_netns(|| {
        let port = test_port();
        // One page holds about 30 records; 20 conversations make 240.
        let mut c = Collector::load(LoadOptions {
            filters: Filters {
                ports: vec![port],
                ..Default::default()
            },
            ringbuf_bytes: 4096,
            ..Default::default()
        });
        for _ in 0..20 {
            conversation(
                SocketAddr::new("127.0.0.1".parse().unwrap(), port),
                Duration::ZERO,
                Ending::ClientFirst,
            );
        }
        c.poll();
        let k = c.counters();
        let delivered = c.events.len() as u64;
        assert!(
            k.ringbuf_full > 0,
            "a full ring buffer must be counted: {k:?}"
        );
        assert_eq!(
            delivered + k.ringbuf_full,
            240,
            "delivered + lost = generated ({k:?})"
        );
    });
}

#[test]
fn durations_are_known_only_for_states_the_kernel_saw_entered() {
    in_netns(|| {
        let port = test_port();
        let addr = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
        // A connection established before the program is loaded.
        let listener = std::net::TcpListener::bind(addr).unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut c = Collector::on_port(port);
        drop(client);
        drop(server);
        drop(listener);
        c.wait_closed("three sockets closed", |_| true, 3);
        let first_of =
            |pred: &dyn Fn(&Transition) -> bool| *c.events.iter().find(|t| pred(t)).unwrap();
        let client_fin = first_of(&|t| t.old == Established && t.new == FinWait1);
        assert_eq!(
            client_fin.old_state_ns, None,
            "ESTABLISHED began before the tracer"
        );
        let client_fw2 = first_of(&|t| t.sock == client_fin.sock && t.old == FinWait1);
        assert!(
            client_fw2.old_state_ns.is_some(),
            "FIN_WAIT1 began under the tracer"
        );
        let mut tracker = Tracker::new(8);
        let mut closed = Vec::new();
        for t in &c.events {
            for id in tracker.on_transition(t).closed {
                closed.push(tracker.take(id));
            }
        }
        assert_eq!(closed.len() + tracker.timewait_pending(), 3);
        assert!(
            closed.iter().all(|conn| !conn.complete),
            "openings were not seen"
        );
    });
}

#[test]
fn kernel_capabilities_are_probed() {
    require_root();
    let c = Collector::load(LoadOptions::default());
    let caps = c.probe.capabilities;
    assert!(caps.ringbuf);
    assert_eq!(
        caps.btf,
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
    );
    // Every kernel the suite runs on is 5.9 or later: with BTF, tp_btf and
    // iter/tcp must be found.
    if caps.btf {
        assert!(caps.tp_btf && caps.iter_tcp, "{caps:?}");
        // ... and socket storage in tracing programs (5.11): the BTF
        // tracepoint path runs by default.
        assert_eq!(caps.transitions, TransitionPath::TpBtf, "{caps:?}");
    }
    drop(c);
    let classic = Collector::load(LoadOptions {
        attach: Attach::Tracepoint,
        ..Default::default()
    });
    assert_eq!(
        classic.probe.capabilities.transitions,
        TransitionPath::Tracepoint
    );
    // The kprobe PMU and the tracefs kprobe interface come with the same
    // config option; the probe must agree with tracefs.
    tracer::kernel::loader::ensure_tracefs().unwrap();
    let tracefs_kprobes = std::path::Path::new("/sys/kernel/tracing/kprobe_events").exists();
    assert_eq!(caps.kprobe, tracefs_kprobes, "{caps:?}");
    // Whether fentry programs load depends on the kernel's lockdown of
    // ftrace, and whether they attach on its trampolines (arm64 before 6.4
    // loads them but cannot attach them): the guests say which they offer
    // (TRACER_EXPECT_FENTRY: attached, from xtask's series).
    if let Ok(expect) = std::env::var("TRACER_EXPECT_FENTRY") {
        let attaches = expect == "1";
        assert_eq!(caps.timewait_fentry, attaches, "{caps:?}");
        if attaches {
            assert!(caps.fentry, "{caps:?}");
        }
    }
    // Attached implies loaded.
    assert!(caps.fentry || !caps.timewait_fentry, "{caps:?}");
}

#[test]
fn events_carry_the_sockets_network_namespace() {
    use std::os::unix::fs::MetadataExt as _;
    let host_ns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    in_netns(move || {
        let test_ns = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        assert_ne!(test_ns, host_ns);
        let port = test_port();
        let mut c = Collector::on_port(port);
        assert!(
            c.probe.offsets.netns_known(),
            "BTF offsets found: {:?}",
            c.probe.offsets
        );
        conversation(
            SocketAddr::new("127.0.0.1".parse().unwrap(), port),
            Duration::ZERO,
            Ending::ClientFirst,
        );
        c.wait_closed("three sockets closed", |_| true, 3);
        for t in &c.events {
            assert_eq!(u64::from(t.netns), test_ns, "{}", dump(&c.events));
        }
    });
}
