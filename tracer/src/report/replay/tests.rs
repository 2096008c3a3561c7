//! Unit tests of `replay` (`tracer summarize`) (no root needed).
use super::*;
use crate::{
    kernel::events::tests::{comm as c, sample},
    report::format::EventsMode,
    report::summary::SummaryArgs,
};
use TcpState::*;

const MS: u64 = 1_000_000;

/// A listener on port 80 (nginx), one client connection to it (curl)
/// closed by the client, and the server's child closed after it.
fn traffic() -> Vec<Transition> {
    let client = |ms: u64, old, new, known: Option<u64>| Transition {
        mono_ns: ms * MS,
        sock: 1,
        old,
        new,
        old_state_ns: known.map(|k| k * MS),
        pid: 10,
        comm: c("curl"),
        ..sample()
    };
    let server = |ms: u64, old, new, known: Option<u64>| Transition {
        mono_ns: ms * MS,
        sock: 2,
        old,
        new,
        old_state_ns: known.map(|k| k * MS),
        // Softirq work on whatever task was current.
        pid: 0,
        comm: c("swapper/0"),
        laddr: "10.1.2.3".parse().unwrap(),
        lport: 80,
        raddr: "127.0.0.1".parse().unwrap(),
        rport: 43210,
        ..sample()
    };
    vec![
        Transition {
            sock: 3,
            pid: 20,
            comm: c("nginx"),
            raddr: "0.0.0.0".parse().unwrap(),
            rport: 0,
            ..server(50, Close, Listen, None)
        },
        client(100, Close, SynSent, None),
        server(101, Listen, SynRecv, None),
        client(102, SynSent, Established, Some(2)),
        server(103, SynRecv, Established, Some(2)),
        client(303, Established, FinWait1, Some(201)),
        server(304, Established, CloseWait, Some(201)),
        client(305, FinWait1, FinWait2, Some(2)),
        Transition {
            pid: 20,
            comm: c("nginx"),
            ..server(354, CloseWait, LastAck, Some(50))
        },
        // The client hands over to its timewait socket on the FIN...
        client(355, FinWait2, Close, Some(50)),
        server(356, LastAck, Close, Some(2)),
    ]
}

/// The JSON Lines the live agent writes for `events` (through the real
/// decoder, tracker and output), with --summary; the client's timewait
/// socket is seen in TIME_WAIT 1 ms after the hand-over and expires 60 s
/// later, as `lifecycle/timewait.rs` would report. Returns the recording and the
/// live summary records.
fn recording(events: &[Transition], mode: EventsMode, by: Option<GroupBy>) -> (String, String) {
    use crate::{
        agent::Pipeline, clock::WallClock, kernel::events::encode, report::output::Output,
        track::tracker::Tracker,
    };
    let args = SummaryArgs {
        summary: true,
        group_by: by,
        top: 10,
    };
    let mut p = Pipeline {
        tracker: Tracker::new(64),
        out: Output::new(Vec::new(), Format::Json, mode, WallClock::with_offset_ns(0)),
        events: 0,
        unreadable: 0,
        unreadable_records: 0,
        // As the live agent's.
        observers: Observers::new(Summary::from_args(&args), None).with_tracked_stays(),
        resets: crate::track::resets::Resets::new(true),
        drain_began: None,
        deferred: Default::default(),
    };
    for t in events {
        p.handle(&encode(t)).unwrap();
    }
    // ... whose FIN_WAIT2 goes on there until it enters TIME_WAIT.
    let (id, conn) = p.tracker.timewait_mut().next().expect("client in timewait");
    conn.advance(TimeWait, 356 * MS);
    let d = conn.derived(FinWait2, TimeWait, 356 * MS, Some(MS), Source::SockDiag);
    let d = conn.with_context(d);
    p.emit_derived(&d).unwrap();
    let d = p
        .tracker
        .end_timewait(id, 60_356 * MS, TimewaitEnd::Expired, Source::SockDiag)
        .unwrap();
    let d = p.tracker.conn(id).with_context(d);
    p.emit_derived(&d).unwrap();
    p.close(id).unwrap();
    p.release_all().unwrap();
    let mut live = Vec::new();
    p.observers
        .summary
        .as_ref()
        .unwrap()
        .write_json(&mut live)
        .unwrap();
    let rec = String::from_utf8(p.out.into_inner()).unwrap();
    (rec, String::from_utf8(live).unwrap())
}

fn replay(rec: &str, by: Option<GroupBy>) -> (Read, String) {
    let (s, read) = summarize(rec.as_bytes(), "test", by, 10).unwrap();
    let mut out = Vec::new();
    s.write_json(&mut out).unwrap();
    (read, String::from_utf8(out).unwrap())
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_recording_gives_the_live_summary() {
    for by in [
        None,
        Some(GroupBy::Lport),
        Some(GroupBy::Comm),
        Some(GroupBy::Pid),
        Some(GroupBy::Raddr),
    ] {
        let (rec, live) = recording(&traffic(), EventsMode::All, by);
        let (read, replayed) = replay(&rec, by);
        assert_eq!(replayed, live, "{by:?}");
        assert_eq!(read.transitions, 13, "11 reported, 2 derived");
        assert_eq!(read.connections, 2);
        assert_eq!(read.connections_ignored, 2, "transitions are preferred");
    }
}

/// A summary without its close counts: a recording of transitions
/// alone has no connection records, so no closes to count (the live
/// run counted them).
fn without_closes(summary: &str) -> String {
    summary
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("closes");
            o.remove("rst");
            v.to_string() + "\n"
        })
        .collect()
}

#[test]
fn stays_are_whole_and_time_wait_is_measured() {
    let (rec, live) = recording(&traffic(), EventsMode::Transitions, None);
    let v = &json_lines(&live)[0]["states"];
    // FIN_WAIT2: 50 ms to the hand-over, 1 ms in the timewait socket.
    assert_eq!(v["FIN_WAIT2"]["count"], 1, "{v}");
    assert_eq!(v["FIN_WAIT2"]["max_ns"], 51 * MS);
    assert_eq!(v["TIME_WAIT"]["count"], 1);
    assert_eq!(v["TIME_WAIT"]["max_ns"], 60_000 * MS);
    assert_eq!(v["ESTABLISHED"]["count"], 2);
    assert!(v["LISTEN"].is_null(), "the listener is still open");
    assert_eq!(without_closes(&replay(&rec, None).1), without_closes(&live));
}

#[test]
fn comm_groups_are_the_owners() {
    let (rec, live) = recording(&traffic(), EventsMode::Transitions, Some(GroupBy::Comm));
    let groups = json_lines(&live);
    let of = |comm: &str| {
        groups
            .iter()
            .find(|g| g["group"]["value"] == comm)
            .unwrap_or_else(|| panic!("no {comm} group in {live}"))["states"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    let set = |names: &[&str]| -> std::collections::BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    };
    // Every stay is its owner's, never the softirq's current task: the
    // client's from its connect(), the accepted socket's its listener's.
    assert_eq!(
        of("curl"),
        set(&[
            "SYN_SENT",
            "ESTABLISHED",
            "FIN_WAIT1",
            "FIN_WAIT2",
            "TIME_WAIT"
        ])
    );
    assert_eq!(
        of("nginx"),
        set(&["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK"])
    );
    assert_eq!(groups.len(), 2, "{live}");
    assert_eq!(
        without_closes(&replay(&rec, Some(GroupBy::Comm)).1),
        without_closes(&live)
    );
}

#[test]
fn connection_records_alone_are_used() {
    let (rec, _) = recording(&traffic(), EventsMode::Connections, None);
    let (read, out) = replay(&rec, None);
    assert_eq!(read.transitions, 0);
    assert_eq!(read.connections, 2);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["states"]["ESTABLISHED"]["count"], 2);
    assert_eq!(v["states"]["ESTABLISHED"]["max_ns"], 201 * MS);
    assert_eq!(v["states"]["CLOSE_WAIT"]["count"], 1);
    // The client's record has its whole FIN_WAIT2 and its TIME_WAIT.
    assert_eq!(v["states"]["FIN_WAIT2"]["max_ns"], 51 * MS);
    assert_eq!(v["states"]["TIME_WAIT"]["count"], 1);
    // Close classes come from the records' `close`.
    assert_eq!(
        v["closes"],
        serde_json::json!({"local": 1, "peer": 1}),
        "{v}"
    );
    assert_eq!(v["rst"], serde_json::json!({"sent": 0, "received": 0}));
    // Owners of connection records.
    let (_, by_comm) = replay(&rec, Some(GroupBy::Comm));
    assert!(by_comm.contains(r#""value":"nginx""#), "{by_comm}");
    assert!(by_comm.contains(r#""value":"curl""#), "{by_comm}");
}

#[test]
fn other_records_and_blank_lines_are_skipped() {
    let (rec, live) = recording(&traffic(), EventsMode::Transitions, None);
    let rec = format!(
        "\n{rec}{live}{}\n",
        r#"{"type":"stats","events":10,"lost":0}"#
    );
    let (read, out) = replay(&rec, None);
    assert_eq!(read.other, 2);
    assert_eq!(without_closes(&out), without_closes(&live));
}

#[test]
fn errors_name_the_line() {
    let err = summarize(
        "{\"type\":\"stats\"}\nTIME(UTC) PID COMM\n".as_bytes(),
        "cap.json",
        None,
        10,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("cap.json:2: not a tracer JSON record"),
        "{err}"
    );
    let err = summarize(
        r#"{"type":"transition","sock":"0x1"}"#.as_bytes(),
        "x",
        None,
        10,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("x:1: bad transition record: no `family`"),
        "{err}"
    );
    let (rec, _) = recording(&traffic(), EventsMode::Transitions, None);
    let bad = rec.replacen("\"ESTABLISHED\"", "\"ESTABLISHD\"", 1);
    let err = summarize(bad.as_bytes(), "x", None, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown TCP state `ESTABLISHD`"), "{err}");
}

#[test]
fn a_cut_last_line_is_skipped() {
    let (rec, live) = recording(&traffic(), EventsMode::Transitions, None);
    let cut = format!("{rec}{{\"type\":\"transition\",\"mono");
    let (read, out) = replay(&cut, None);
    assert_eq!(read.transitions, 13);
    assert_eq!(without_closes(&out), without_closes(&live));
}

#[test]
fn every_source_is_read_back() {
    for s in SOURCES {
        // A new Source makes this match fail to compile: add it to SOURCES.
        match s {
            Source::Tracepoint | Source::SockDiag | Source::Reuse | Source::Fentry => {}
        }
    }
    let (rec, _) = recording(&traffic(), EventsMode::Transitions, None);
    for s in SOURCES {
        let one = rec.lines().next().unwrap().replace(
            r#""source":"tracepoint""#,
            &format!(r#""source":"{}""#, s.name()),
        );
        let (t, _) = serde_json::from_str::<RecordedLine>(&one)
            .unwrap()
            .transition()
            .unwrap();
        assert_eq!(t.source, s);
    }
}

#[test]
fn subcommand_and_flags() {
    use crate::cli::{Args, Command};
    use clap::{error::ErrorKind, Parser as _};
    let parse =
        |a: &[&str]| Args::try_parse_from(std::iter::once("tracer").chain(a.iter().copied()));
    let a = parse(&[
        "summarize",
        "cap.json",
        "-o",
        "json",
        "--group-by",
        "rport",
        "--top",
        "5",
    ])
    .unwrap();
    let Some(Command::Summarize(s)) = a.command else {
        panic!("no subcommand")
    };
    assert_eq!(s.file, PathBuf::from("cap.json"));
    assert_eq!(s.output, Format::Json);
    assert_eq!(s.group_by, Some(GroupBy::Rport));
    assert_eq!(s.top, 5);
    assert!(parse(&["--port", "80"]).unwrap().command.is_none());
    assert_eq!(
        parse(&["summarize"]).unwrap_err().kind(),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        parse(&["summarize", "-", "--group-by", "bogus"])
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidValue
    );
    assert_eq!(
        parse(&["--port", "80", "summarize", "-"])
            .unwrap_err()
            .kind(),
        ErrorKind::ArgumentConflict
    );
}
