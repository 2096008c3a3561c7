//! Unit tests of `output` (no root needed).
use super::*;
use crate::kernel::events::{
    tests::{comm, sample},
    Family, TcpState,
};
use crate::track::tracker::Tracker;

fn out(format: Format, events: EventsMode) -> Output<Vec<u8>> {
    // Monotonic 0 is 2026-11-23T00:00:00Z.
    Output::new(
        Vec::new(),
        format,
        events,
        WallClock::with_offset_ns(1_795_392_000_000_000_000),
    )
}

fn text(o: Output<Vec<u8>>) -> String {
    String::from_utf8(o.into_inner()).unwrap()
}

fn owner() -> Option<Owner> {
    Some(Owner {
        pid: 42,
        comm: comm("curl"),
        uid: 1000,
        ..Default::default()
    })
}

#[test]
fn transition_json_has_the_contract_fields() {
    let mut o = out(Format::Json, EventsMode::Transitions);
    o.transition(&sample(), &owner(), None).unwrap();
    let s = text(o);
    let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
    assert_eq!(v["type"], "transition");
    assert_eq!(v["time"], "2026-11-23T00:00:01.000000123Z");
    assert_eq!(v["mono_ns"], 1_000_000_123u64);
    assert_eq!(v["sock"], "0xffff888012345678");
    assert_eq!(v["pid"], 42);
    assert_eq!(v["comm"], "curl");
    assert_eq!(v["uid"], 1000);
    assert_eq!(v["task_pid"], 42);
    assert_eq!(v["task_tid"], 43);
    assert_eq!(v["family"], "ipv4");
    assert_eq!(v["laddr"], "127.0.0.1");
    assert_eq!(v["lport"], 43210);
    assert_eq!(v["raddr"], "10.1.2.3");
    assert_eq!(v["rport"], 80);
    assert_eq!(v["old"], "SYN_SENT");
    assert_eq!(v["new"], "ESTABLISHED");
    assert_eq!(v["old_state_ns"], 1234);
    assert_eq!(v["netns"], 4026531840u64);
    assert_eq!(v["source"], "tracepoint");
}

#[test]
fn unknown_owner_and_duration_are_null_and_derived_has_no_task() {
    let mut o = out(Format::Json, EventsMode::All);
    let t = Transition {
        old_state_ns: None,
        source: Source::SockDiag,
        task: false,
        ..sample()
    };
    o.transition(&t, &None, None).unwrap();
    let v: serde_json::Value = serde_json::from_str(text(o).trim_end()).unwrap();
    assert!(v["old_state_ns"].is_null());
    assert!(v["pid"].is_null() && v["comm"].is_null());
    assert!(v["task_pid"].is_null() && v["task_comm"].is_null());
    assert_eq!(v["source"], "sock_diag");
}

#[test]
fn table_has_header_and_brackets_ipv6() {
    let mut o = out(Format::Table, EventsMode::Transitions);
    let t = Transition {
        family: Family::Ipv6,
        laddr: "::1".parse().unwrap(),
        raddr: "2001:db8::1".parse().unwrap(),
        ..sample()
    };
    o.transition(&t, &owner(), None).unwrap();
    o.transition(
        &Transition {
            old_state_ns: None,
            ..t
        },
        &None,
        None,
    )
    .unwrap();
    let s = text(o);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("TIME(UTC)"));
    assert!(
        lines[1].starts_with("00:00:01.000000  42      curl"),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains("[::1]:43210"));
    assert!(lines[1].contains("[2001:db8::1]:80"));
    assert!(lines[1].contains("SYN_SENT -> ESTABLISHED"));
    assert!(lines[1].ends_with("0.001"), "{}", lines[1]);
    assert!(
        lines[2].starts_with("00:00:01.000000  -       -"),
        "{}",
        lines[2]
    );
    assert!(lines[2].ends_with(" -"));
}

fn close_of(c: &Connection) -> Close {
    crate::track::close::classify(&c.close, true)
}

fn closed() -> Connection {
    let mut tr = Tracker::new(4);
    let t = |ms: u64, old, new, known: Option<u64>| Transition {
        mono_ns: ms * 1_000_000,
        old,
        new,
        old_state_ns: known.map(|k| k * 1_000_000),
        ..sample()
    };
    tr.on_transition(&t(1000, TcpState::Close, TcpState::SynSent, None));
    tr.on_transition(&t(1001, TcpState::SynSent, TcpState::Established, Some(1)));
    let id = tr
        .on_transition(&t(1201, TcpState::Established, TcpState::Close, Some(200)))
        .closed[0];
    tr.take(id)
}

#[test]
fn connection_json() {
    let mut o = out(Format::Json, EventsMode::Connections);
    o.transition(&sample(), &owner(), None).unwrap(); // not printed in this mode
    o.connection(&closed(), &close_of(&closed()), None).unwrap();
    let s = text(o);
    assert_eq!(s.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
    assert_eq!(v["type"], "connection");
    assert_eq!(v["start"], "2026-11-23T00:00:01.000000000Z");
    assert_eq!(v["duration_ns"], 201_000_000u64);
    assert_eq!(v["states"]["SYN_SENT"], 1_000_000u64);
    assert_eq!(v["states"]["ESTABLISHED"], 200_000_000u64);
    assert_eq!(v["states"].as_object().unwrap().len(), 2);
    assert_eq!(v["complete"], true);
    assert_eq!(v["pid"], 42, "connect() ran in the owner");
    assert!(v["time_wait_end"].is_null());
    for k in [
        "sock", "pid", "comm", "family", "laddr", "lport", "raddr", "rport",
    ] {
        assert!(!v[k].is_null(), "{k}");
    }
}

#[test]
fn connection_table_line() {
    let mut o = out(Format::Table, EventsMode::Connections);
    o.connection(&closed(), &close_of(&closed()), None).unwrap();
    let s = text(o);
    assert!(
        s.contains("CONNECTION 201.000ms SYN_SENT=1.000ms ESTABLISHED=200.000ms\n"),
        "{s}"
    );
    // Seen whole but cut at exit: its end is what is missing.
    let mut cut = closed();
    (cut.cut_at_exit, cut.complete) = (true, false);
    let mut o = out(Format::Table, EventsMode::Connections);
    o.connection(&cut, &close_of(&cut), None).unwrap();
    let s = text(o);
    assert!(
        s.trim_end()
            .ends_with("ESTABLISHED=200.000ms (cut at exit)"),
        "{s}"
    );
    let mut unopened = closed();
    unopened.complete = false;
    let mut o = out(Format::Table, EventsMode::Connections);
    o.connection(&unopened, &close_of(&unopened), None).unwrap();
    let s = text(o);
    assert!(s.trim_end().ends_with(" (opening not seen)"), "{s}");
}

#[test]
fn json_states_are_in_life_order_and_listeners_get_no_record() {
    let mut o = out(Format::Json, EventsMode::Connections);
    o.connection(&closed(), &close_of(&closed()), None).unwrap();
    let mut listener = closed();
    listener.listener = true;
    o.connection(&listener, &close_of(&listener), None).unwrap();
    let s = text(o);
    assert_eq!(s.lines().count(), 1);
    assert!(
        s.contains(r#""states":{"SYN_SENT":1000000,"ESTABLISHED":200000000}"#),
        "{s}"
    );
}

#[test]
fn close_wait_alert_names_the_holders() {
    let mut c = closed();
    c.state = TcpState::CloseWait;
    c.state_since_ns = 1_000_000_000;
    let holders = [Holder {
        pid: 7,
        comm: "server".into(),
        fd: 5,
    }];
    let queues = Queues {
        rqueue: 1000,
        wqueue: 3,
    };
    let mut o = out(Format::Json, EventsMode::None);
    o.stuck(
        &c,
        31_000_000_000,
        &holders,
        Some(queues),
        false,
        &close_of(&c),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(text(o).trim_end()).unwrap();
    assert_eq!(v["type"], "close_wait");
    assert_eq!(v["age_ns"], 30_000_000_000u64);
    assert_eq!(v["since"], "2026-11-23T00:00:01.000000000Z");
    assert_eq!(v["owners"][0]["pid"], 7);
    assert_eq!(v["owners"][0]["fd"], 5);
    assert_eq!(v["owners"][0]["comm"], "server");
    assert_eq!(v["at_exit"], false);
    assert_eq!((&v["rqueue"], &v["wqueue"]), (&1000.into(), &3.into()));
    let mut o = out(Format::Table, EventsMode::None);
    o.stuck(
        &c,
        31_000_000_000,
        &holders,
        Some(queues),
        true,
        &close_of(&c),
    )
    .unwrap();
    let s = text(o);
    assert!(s.starts_with("STILL CLOSE_WAIT for 30.0s"), "{s}");
    assert!(s.contains("pid 7 (server) fd 5"), "{s}");
    assert!(s.contains("; 1000 bytes unread)"), "{s}");
    // Queues unknown: null, and nothing said of them.
    let mut o = out(Format::Json, EventsMode::None);
    o.stuck(&c, 31_000_000_000, &holders, None, false, &close_of(&c))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(text(o).trim_end()).unwrap();
    assert!(v["rqueue"].is_null() && v["wqueue"].is_null(), "{v}");
    let mut o = out(Format::Table, EventsMode::None);
    let read_all = Queues {
        rqueue: 0,
        wqueue: 0,
    };
    o.stuck(
        &c,
        31_000_000_000,
        &holders,
        Some(read_all),
        false,
        &close_of(&c),
    )
    .unwrap();
    assert!(!text(o).contains("unread"));
}

#[test]
fn stats_json_and_line() {
    let stats = Stats {
        events: 10,
        lost: 2,
        ..Default::default()
    };
    let mut o = out(Format::Json, EventsMode::None);
    o.stats(&stats, std::time::Duration::from_secs(1)).unwrap();
    let v: serde_json::Value = serde_json::from_str(text(o).trim_end()).unwrap();
    assert_eq!(v["type"], "stats");
    assert_eq!(v["events"], 10);
    assert_eq!(v["lost"], 2);
    assert_eq!(
        stats_line(&stats),
        "tracer: 10 events, 2 lost, 0 filtered in kernel, 0 unreadable"
    );
}

/// What serde_json wrote for a transition before the hand-written writer
/// (the shapes of `json.rs`), for the byte-for-byte comparison.
fn serde_transition(
    o: &mut Output<Vec<u8>>,
    t: &Transition,
    owner: &Option<Owner>,
    listener_pids: Option<&[u32]>,
) -> String {
    let from_kernel = t.task;
    let rec = TransitionJson {
        r#type: "transition",
        time: o.time(t.mono_ns),
        mono_ns: t.mono_ns,
        sock: sock_hex(t.sock),
        owner: owner_json(owner),
        cgroup: o.cgroup_json(owner),
        task_pid: from_kernel.then_some(t.pid),
        task_tid: from_kernel.then_some(t.tid),
        task_comm: from_kernel.then(|| t.comm.as_str()),
        family: t.family.name(),
        laddr: t.laddr,
        lport: t.lport,
        raddr: t.raddr,
        rport: t.rport,
        old: t.old.name(),
        new: t.new.name(),
        old_state_ns: t.old_state_ns,
        netns: (t.netns != 0).then_some(t.netns),
        source: t.source.name(),
        listener_pids,
    };
    serde_json::to_string(&rec).unwrap() + "\n"
}

fn serde_connection(
    o: &mut Output<Vec<u8>>,
    c: &Connection,
    close: &Close,
    reasons: &ResetReasons,
    listener_pids: Option<&[u32]>,
) -> String {
    let rec = ConnectionJson {
        r#type: "connection",
        conn: o.conn_fields(c),
        start: o.time(c.start_ns),
        end: o.time(c.state_since_ns),
        duration_ns: c.duration_ns(),
        states: StatesJson(c),
        time_wait_end: c.timewait.and_then(|tw| tw.end).map(|e| e.name()),
        close: CloseJson::new(close, reasons),
        at_exit: c.cut_at_exit,
        listener_pids,
    };
    serde_json::to_string(&rec).unwrap() + "\n"
}

#[test]
fn hand_written_json_is_byte_for_byte_serdes() {
    use crate::track::tracker::{Timewait, TimewaitEnd};
    let mut transitions = vec![sample()];
    let mut t = sample();
    t.laddr = "fd00::1".parse().unwrap();
    t.raddr = "::ffff:10.0.0.1".parse().unwrap();
    t.family = Family::Ipv6;
    t.netns = 0;
    t.old_state_ns = None;
    t.sock = 0;
    t.comm = crate::kernel::events::Comm::new(*b"we\"ird\\\n\x01\xffna\0\0\0\0");
    transitions.push(t);
    let mut d = sample();
    d.source = Source::SockDiag;
    d.mono_ns = 59_999_999_999_999;
    transitions.push(d);
    for t in &transitions {
        // A prefork server's: its comm, no pid, its listener's pids.
        let shared = owner().map(|o| Owner { pid: 0, ..o });
        for (owner, pids) in [
            (owner(), None),
            (None, None),
            (shared, Some(&[7, 4000][..])),
        ] {
            let mut o = out(Format::Json, EventsMode::All);
            o.transition(t, &owner, pids).unwrap();
            let mut reference = out(Format::Json, EventsMode::All);
            let want = serde_transition(&mut reference, t, &owner, pids);
            assert_eq!(text(o), want);
        }
    }
    let mut conns = vec![closed()];
    let mut c = closed();
    c.owner = owner();
    let mut tw = Timewait::default();
    tw.end = Some(TimewaitEnd::Expired);
    c.timewait = Some(tw);
    c.close.rst_sent = 2;
    // One the kernel's BTF names, one it does not.
    c.close.rst_reasons.add(12, 1);
    c.close.rst_reasons.add(99, 1);
    conns.push(c);
    let mut c = closed();
    c.close = Default::default();
    c.netns = 0;
    conns.push(c);
    let kernels = [
        ResetReasons::default(),
        crate::kernel::reset_reasons::tests::sample(),
    ];
    for c in &conns {
        for (resets, reasons) in [true, false]
            .into_iter()
            .flat_map(|r| kernels.iter().map(move |k| (r, k)))
        {
            let close = crate::track::close::classify(&c.close, resets);
            let mut o =
                out(Format::Json, EventsMode::Connections).with_reset_reasons(reasons.clone());
            let pids = c.owner.map(|_| &[3u32][..]);
            o.connection(c, &close, pids).unwrap();
            let written = text(o);
            let mut reference = out(Format::Json, EventsMode::Connections);
            assert_eq!(
                written,
                serde_connection(&mut reference, c, &close, reasons, pids)
            );
            let v: serde_json::Value = serde_json::from_str(written.trim_end()).unwrap();
            let rst = &v["close"]["rst"];
            if !resets {
                assert!(rst.is_null());
            } else if !reasons.carried {
                assert!(rst.get("reasons").is_none(), "{rst}");
            } else if c.close.rst_sent == 2 {
                assert_eq!(
                    rst["reasons"],
                    serde_json::json!(["TCP_ABORT_ON_LINGER", "99"])
                );
            } else {
                assert_eq!(rst["reasons"], serde_json::json!([]));
            }
        }
    }
}

#[test]
fn port_pressure_record_and_table_lines() {
    use crate::track::ports::{Dest, Pressure};
    let p = Pressure {
        dest: Dest {
            netns: 7,
            laddr: "10.0.0.1".parse().unwrap(),
            raddr: "::1".parse().unwrap(),
            rport: 443,
        },
        in_use: 150,
        time_wait: 120,
        range: 200,
        above: true,
    };
    let mut o = out(Format::Json, EventsMode::None);
    o.port_pressure(&p, 2_000_000_000, false).unwrap();
    let v: serde_json::Value = serde_json::from_str(text(o).trim_end()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "type": "port_pressure", "time": "2026-11-23T00:00:02.000000000Z", "netns": 7,
            "laddr": "10.0.0.1", "raddr": "::1", "rport": 443, "in_use": 150,
            "time_wait": 120, "range": 200, "ratio": 0.75, "above": true,
            "at_exit": false,
        })
    );
    let mut o = out(Format::Table, EventsMode::None);
    o.port_pressure(&p, 0, false).unwrap();
    let below = Pressure {
        in_use: 89,
        above: false,
        ..p
    };
    o.port_pressure(&below, 0, false).unwrap();
    o.port_pressure(&p, 0, true).unwrap();
    assert_eq!(
        text(o),
        "!! PORTS 10.0.0.1 -> [::1]:443 (netns 7): 150 of 200 ephemeral ports in use (75%), 120 in TIME_WAIT\n\
         !! PORTS 10.0.0.1 -> [::1]:443 (netns 7): 89 of 200 ephemeral ports in use (44%), 120 in TIME_WAIT; back below the threshold\n\
         STILL PORTS 10.0.0.1 -> [::1]:443 (netns 7): 150 of 200 ephemeral ports in use (75%), 120 in TIME_WAIT\n"
    );
}

#[test]
fn port_summary_table() {
    use crate::track::ports::{Dest, Pressure};
    let p = Pressure {
        dest: Dest {
            netns: 0,
            laddr: "10.0.0.1".parse().unwrap(),
            raddr: "10.0.0.2".parse().unwrap(),
            rport: 5432,
        },
        in_use: 30,
        time_wait: 25,
        range: 28232,
        above: false,
    };
    let mut o = out(Format::Table, EventsMode::None);
    o.port_summary(&[p]).unwrap();
    assert_eq!(
        text(o),
        "Ephemeral ports held per destination (top 1 by ports in use)\n\
         NETNS      LADDR                       RADDR:RPORT                  IN_USE TIME_WAIT   RANGE  RATIO\n\
         -          10.0.0.1                    10.0.0.2:5432                    30        25   28232   0.1%\n\n"
    );
}

#[test]
fn close_lines_name_the_reasons_of_resets_sent() {
    let mut c = closed();
    c.close = Default::default();
    c.close
        .push(TcpState::Established, TcpState::Close, 5_000_000);
    c.close.rst_sent = 1;
    c.close.rst_reasons.add(12, 1);
    let close = crate::track::close::classify(&c.close, true);
    let named = crate::kernel::reset_reasons::tests::sample();
    assert!(
        close_summary(&close, None, &named).ends_with("  RST sent (TCP_ABORT_ON_LINGER)"),
        "{}",
        close_summary(&close, None, &named)
    );
    // Older kernels: as before.
    let line = close_summary(&close, None, &ResetReasons::default());
    assert!(line.ends_with("  RST sent"), "{line}");
}
