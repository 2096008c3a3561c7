//! Close handshakes end to end: every close class produced for real on
//! loopback and checked field by field, by a batching tracer
//! (`--events closes`), a per-transition one (`--events all`) and the
//! table view, all watching the same traffic; a half-closed connection
//! that never finishes; and a kernel without the reset tracepoints.
//!
//! Over 600 lines on purpose: one test per close class would repeat the traffic and three tracers; they share one run, checked field by field.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{json, Value};
use socket2::{Domain, SockRef, Socket, Type};

const MS: u64 = 1_000_000;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A client socket bound to `lport` (so that a later connection can take
/// over its timewait socket's 4-tuple), connected to `to`.
fn connect_from(lport: u16, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&local(lport).into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

fn eof(mut s: &TcpStream) {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => panic!("expected EOF, got {e}"),
        }
    }
}

/// `first` closes; `second` reads its FIN and closes 20 ms later.
fn close_in_turn(first: TcpStream, second: TcpStream) {
    drop(first);
    eof(&second);
    thread::sleep(Duration::from_millis(20));
}

/// Both ends shut down before either reads the other's FIN: the client's
/// FIN waits behind data the server's full receive window holds back, so
/// the server's FIN reaches a client already in FIN_WAIT1 (CLOSING).
fn simultaneous(client: &TcpStream, server: &TcpStream) {
    client.set_nonblocking(true).unwrap();
    let chunk = [7u8; 65536];
    loop {
        match (&*client).write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the window: {e}"),
        }
    }
    client.set_nonblocking(false).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    server.shutdown(std::net::Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(20));
    eof(server);
    eof(client);
}

/// The connection record of (lport, rport) that started before `before`
/// (RFC 3339, as the records write times): a later connection may reuse
/// the 4-tuple, and its record may come first.
fn record<'a>(recs: &'a [Value], lport: u16, rport: u16, before: &str) -> Option<&'a Value> {
    recs.iter().find(|v| {
        v["type"] == "connection"
            && v["lport"] == lport
            && v["rport"] == rport
            && v["start"].as_str().is_some_and(|s| s < before)
    })
}

fn steps(v: &Value) -> Vec<String> {
    v["close"]["handshake"]
        .as_array()
        .unwrap_or_else(|| panic!("no handshake in {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Checks one record's `close`, field by field. `fin` bounds
/// `fin_to_close_ns` (ns), None: null.
fn check(
    v: &Value,
    by: &str,
    first_fin: Value,
    path: &[&str],
    fin: Option<(u64, u64)>,
    rst: (u32, u32),
) {
    let c = &v["close"];
    assert_eq!(c["by"], by, "by: {v}");
    assert_eq!(c["first_fin"], first_fin, "first_fin: {v}");
    assert_eq!(steps(v), path, "handshake: {v}");
    let at: Vec<u64> = c["handshake_at_ns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(at.len(), path.len(), "{v}");
    assert_eq!(at.first(), Some(&0), "{v}");
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "in order: {v}");
    match fin {
        None => assert!(c["fin_to_close_ns"].is_null(), "fin_to_close_ns: {v}"),
        Some((lo, hi)) => {
            let ns = c["fin_to_close_ns"]
                .as_u64()
                .unwrap_or_else(|| panic!("{v}"));
            assert!(
                (lo..=hi).contains(&ns),
                "fin_to_close_ns {ns} not in [{lo}, {hi}]: {v}"
            );
        }
    }
    check_rst(v, rst);
}

/// `rst`: the counts and, where the kernel gives reasons (6.10+), one
/// reason per reset sent (each side here sends at most one).
fn check_rst(v: &Value, (sent, received): (u32, u32)) {
    let rst = &v["close"]["rst"];
    assert_eq!(
        (&rst["sent"], &rst["received"]),
        (&json!(sent), &json!(received)),
        "rst: {v}"
    );
    let mut keys: Vec<&String> = rst.as_object().unwrap().keys().collect();
    keys.sort();
    if reset_reasons_expected() {
        assert_eq!(keys, ["reasons", "received", "sent"], "{v}");
        let reasons = rst["reasons"].as_array().unwrap();
        assert_eq!(reasons.len(), sent.min(1) as usize, "{v}");
        // Named from BTF: not a number.
        assert!(
            reasons
                .iter()
                .all(|r| r.as_str().is_some_and(|r| r.parse::<u32>().is_err())),
            "{v}"
        );
    } else {
        assert_eq!(keys, ["received", "sent"], "no reasons before 6.10: {v}");
    }
}

/// `tcp:tcp_send_reset` carries the kernel's reason since 6.10.
fn reset_reasons_expected() -> bool {
    kernel_at_least(6, 10)
}

#[test]
fn every_close_class_for_real() {
    in_netns(|| {
        // tcp_tw_reuse: reconnecting from the same ports ends the
        // timewait sockets after the reuse delay instead of 60 s.
        netns_sysctl("net.ipv4.tcp_tw_reuse", "1");
        let (port, refused, dropping) = (test_port(), test_port(), test_port());
        let (c_first, s_first, simul, abort) = (test_port(), test_port(), test_port(), test_port());
        let ports: Vec<String> = [port, refused, dropping]
            .iter()
            .map(u16::to_string)
            .collect();
        let mut base = vec!["--output", "json", "-v"];
        for p in &ports {
            base.extend(["--port", p.as_str()]);
        }
        let with = |extra: &[&'static str]| {
            let mut a = base.clone();
            a.extend(extra);
            a
        };
        // One after the other: loading is CPU-bound (BTF), and the
        // emulated guests are slow.
        let attached = |args: &[&str]| {
            let r = Running::start(args);
            r.wait_attached();
            r
        };
        let batched = attached(&with(&["--events", "closes"]));
        let each = attached(&with(&["--events", "all"]));
        let mut table_args = with(&["--events", "closes"]);
        table_args.retain(|a| *a != "json" && *a != "--output");
        let table = attached(&table_args);

        let listener = TcpListener::bind(local(port)).unwrap();
        let server = local(port);
        // Client first: the server closes 20 ms after the client's FIN.
        let c = connect_from(c_first, server);
        let (s, _) = listener.accept().unwrap();
        close_in_turn(c, s);
        // Server first.
        let c = connect_from(s_first, server);
        let (s, _) = listener.accept().unwrap();
        close_in_turn(s, c);
        // Simultaneous.
        let c = connect_from(simul, server);
        let (s, _) = listener.accept().unwrap();
        simultaneous(&c, &s);
        drop(c);
        drop(s);
        // The client aborts (SO_LINGER 0): it sends a RST, the server
        // receives it.
        let c = connect_from(abort, server);
        let (s, _) = listener.accept().unwrap();
        SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
        let _ = (&s).read(&mut [0u8; 1]);
        drop(s);
        // Refused: nothing listens.
        let e = TcpStream::connect(local(refused)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
        // A listener whose accept queue is full drops SYNs: one retry
        // (TCP_SYNCNT 1), then the connect times out (about 3 s).
        let full = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        full.bind(&local(dropping).into()).unwrap();
        full.listen(0).unwrap();
        let _queued = TcpStream::connect(local(dropping)).unwrap();
        let dropped = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        set_syncnt(&dropped, 1);
        let started = Instant::now();
        let e = dropped.connect(&local(dropping).into()).unwrap_err();
        let timed_out = started.elapsed();
        assert!(
            timed_out >= Duration::from_secs(2),
            "{e} after {timed_out:?}"
        );
        let timeout_lport = dropped.local_addr().unwrap().as_socket().unwrap().port();
        drop(dropped);
        // End the timewait sockets: a new connection on each 4-tuple
        // (tcp_tw_reuse on the client side; a new SYN on the server's),
        // aborted so that it leaves none.
        thread::sleep(Duration::from_millis(2200).saturating_sub(timed_out));
        let reconnect_at =
            humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
        let before = reconnect_at.as_str();
        for p in [c_first, s_first, simul] {
            let c = connect_from(p, server);
            let (s, _) = listener.accept().unwrap();
            SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
            drop(c);
            drop(s);
        }

        let pairs = [
            (port, c_first),
            (c_first, port),
            (port, s_first),
            (s_first, port),
            (port, simul),
            (simul, port),
            (port, abort),
            (abort, port),
        ];
        let done = |l: &[String]| {
            let recs: Vec<Value> = l.iter().map(|l| json(l)).collect();
            pairs
                .iter()
                .all(|&(a, b)| record(&recs, a, b, before).is_some())
                && recs
                    .iter()
                    .any(|v| v["type"] == "connection" && v["rport"] == refused)
                && recs
                    .iter()
                    .any(|v| v["type"] == "connection" && v["lport"] == timeout_lport)
        };
        let mut got = Vec::new();
        batched.read_until(&mut got, "every connection record (batched)", done);
        let mut got_each = Vec::new();
        each.read_until(
            &mut got_each,
            "every connection record (per transition)",
            |l| done(&of_type_lines(l, "connection")),
        );
        let mut lines = Vec::new();
        table.read_until(&mut lines, "the close lines", |l| {
            l.iter().filter(|l| l.contains("refused")).count() >= 1
                && l.iter().filter(|l| l.contains("RST sent")).count() >= 1
                && l.iter().filter(|l| l.contains(" both FIN ")).count() >= 1
        });
        for r in [&batched, &each, &table] {
            r.interrupt();
        }
        let (code, rest, _) = batched.finish();
        assert_eq!(code, 0);
        got.extend(rest);
        let (code, rest, _) = each.finish();
        assert_eq!(code, 0);
        got_each.extend(rest);
        let (code, rest, _) = table.finish();
        assert_eq!(code, 0);
        lines.extend(rest);

        let recs: Vec<Value> = got.iter().map(|l| json(l)).collect();
        let each_recs: Vec<Value> = got_each.iter().map(|l| json(l)).collect();
        let get =
            |a: u16, b: u16| record(&recs, a, b, before).unwrap_or_else(|| panic!("no {a}->{b}"));
        let active = [
            "ESTABLISHED>FIN_WAIT1",
            "FIN_WAIT1>FIN_WAIT2",
            "FIN_WAIT2>TIME_WAIT",
            "TIME_WAIT>CLOSE",
        ];
        let passive = [
            "ESTABLISHED>CLOSE_WAIT",
            "CLOSE_WAIT>LAST_ACK",
            "LAST_ACK>CLOSE",
        ];
        // The side that waited 20 ms before its own FIN. On the active
        // side the handshake ends at the TIME_WAIT entry, dated from the
        // timewait timer's jiffies: up to 10 ms early (150 ms in the
        // emulated guests).
        let waited = Some((20 * MS, 2_000 * MS));
        let tw_precision = if in_guest() { 150 * MS } else { 10 * MS };
        let waited_active = Some((20 * MS - tw_precision.min(20 * MS), 2_000 * MS));
        let quick = Some((0, 2_000 * MS));
        check(
            get(port, c_first),
            "peer",
            json!("peer"),
            &passive,
            waited,
            (0, 0),
        );
        check(
            get(c_first, port),
            "local",
            json!("local"),
            &active,
            waited_active,
            (0, 0),
        );
        assert_eq!(get(c_first, port)["time_wait_end"], "reused");
        check(
            get(s_first, port),
            "peer",
            json!("peer"),
            &passive,
            waited,
            (0, 0),
        );
        check(
            get(port, s_first),
            "local",
            json!("local"),
            &active,
            waited_active,
            (0, 0),
        );
        assert_eq!(get(port, s_first)["time_wait_end"], "reused");
        // The client's FIN waited behind its data: it was in FIN_WAIT1
        // when the server's FIN came (CLOSING); the server's own FIN went
        // out first, a plain active close on its side.
        check(
            get(simul, port),
            "both",
            json!("both"),
            &[
                "ESTABLISHED>FIN_WAIT1",
                "FIN_WAIT1>CLOSING",
                "CLOSING>TIME_WAIT",
                "TIME_WAIT>CLOSE",
            ],
            quick,
            (0, 0),
        );
        check(
            get(port, simul),
            "local",
            json!("local"),
            &active,
            quick,
            (0, 0),
        );
        check(
            get(abort, port),
            "reset_sent",
            Value::Null,
            &["ESTABLISHED>CLOSE"],
            None,
            (1, 0),
        );
        check(
            get(port, abort),
            "reset_received",
            Value::Null,
            &["ESTABLISHED>CLOSE"],
            None,
            (0, 1),
        );
        let on = |key: &str, port: u16| {
            recs.iter()
                .find(|v| v["type"] == "connection" && v[key] == port)
                .unwrap_or_else(|| panic!("no record with {key} {port}"))
        };
        let refused_rec = on("rport", refused);
        check(
            refused_rec,
            "refused",
            Value::Null,
            &["SYN_SENT>CLOSE"],
            None,
            (0, 1),
        );
        let timeout_rec = on("lport", timeout_lport);
        check(
            timeout_rec,
            "timeout",
            Value::Null,
            &["SYN_SENT>CLOSE"],
            None,
            (0, 0),
        );
        assert!(
            timeout_rec["states"]["SYN_SENT"].as_u64().unwrap() >= 2_000 * MS,
            "{timeout_rec}"
        );
        let stats = recs.iter().find(|v| v["type"] == "stats").unwrap();
        // The kernel traces a reset sent for no socket since 6.10 only.
        let no_socket = stats["resets_no_socket"].as_u64().unwrap();
        if kernel_at_least(6, 10) {
            assert!(no_socket >= 1, "the refused SYN's RST: {stats}");
        } else {
            assert_eq!(no_socket, 0, "{stats}");
        }
        assert_eq!(stats["kernel"]["resets"], true);
        assert_eq!(stats["kernel"]["reset_reasons"], reset_reasons_expected());

        // Per transition, the same closes. Times come from each program's
        // own clock reads (within 1 ms), and a FIN_WAIT2 -> TIME_WAIT entry
        // from each tracer's own timewait dump (the timer's remaining
        // time, in jiffies: within 10 ms). Where no fentry program sees
        // timewait sockets die, each tracer dates the end of TIME_WAIT by
        // its own polls: a timer's end from the dump, a socket gone
        // before the reuse that would have dated it at the poll that
        // found it gone, so the two differ by up to a poll interval (1 s,
        // longer when polls are slow). The emulated guests are slower.
        let (slack, timewait_slack) = if in_guest() {
            (20 * MS, 150 * MS)
        } else {
            (MS, 10 * MS)
        };
        let deaths_dumped = stats["kernel"]["timewait_fentry"] != true;
        for &(a, b) in &pairs {
            let (x, y) = (get(a, b), record(&each_recs, a, b, before).unwrap());
            let (cx, cy) = (&x["close"], &y["close"]);
            for k in ["by", "first_fin", "handshake", "rst"] {
                assert_eq!(cx[k], cy[k], "{a}->{b} {k}: {x} vs {y}");
            }
            let at = |c: &Value| -> Vec<u64> {
                c["handshake_at_ns"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_u64().unwrap())
                    .collect()
            };
            let x_steps = steps(x);
            for (i, (p, q)) in at(cx).into_iter().zip(at(cy)).enumerate() {
                let step = x_steps[i].as_str();
                let bound = if step == "TIME_WAIT>CLOSE" && deaths_dumped {
                    3_000 * MS
                } else if step == "FIN_WAIT2>TIME_WAIT" {
                    timewait_slack
                } else {
                    slack
                };
                assert!(p.abs_diff(q) <= bound, "step {i}: {x} vs {y}");
            }
        }

        // The table: one line per connection, who closed and how, when its
        // close handshake is over; an active closer's again at the end of
        // its TIME_WAIT.
        let line = |needle: &str| {
            lines
                .iter()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with {needle:?}:\n{}", lines.join("\n")))
        };
        assert!(
            lines[0].starts_with("TIME(UTC)") && lines[0].ends_with("CLOSE"),
            "{}",
            lines[0]
        );
        let cells = |a: u16, b: u16| {
            format!(
                "{:<27} {:<27} ",
                format!("127.0.0.1:{a}"),
                format!("127.0.0.1:{b}")
            )
        };
        let l = line(&cells(port, c_first));
        assert!(
            l.contains("peer FIN  CLOSE_WAIT ") && l.contains(" > LAST_ACK "),
            "{l}"
        );
        // The first connection on this 4-tuple: its line when it entered
        // TIME_WAIT, then at the end (a new connection took its 4-tuple).
        let early = line(&cells(c_first, port));
        assert!(early.ends_with("> TIME_WAIT"), "{early}");
        let l = lines
            .iter()
            .find(|l| l.contains(&cells(c_first, port)) && l.ends_with(')'))
            .unwrap_or_else(|| panic!("no end line:\n{}", lines.join("\n")));
        assert!(
            l.contains("local FIN  FIN_WAIT1 ")
                && l.contains(" > FIN_WAIT2 ")
                && l.contains(" > TIME_WAIT ")
                && l.ends_with("(reused)"),
            "{l}"
        );
        let l = line(&cells(abort, port));
        let reason = &get(abort, port)["close"]["rst"]["reasons"][0];
        match reason.as_str() {
            Some(reason) => assert!(
                l.ends_with(&format!(
                    "reset_sent  ESTABLISHED > CLOSE  RST sent ({reason})"
                )),
                "{l}"
            ),
            None => assert!(
                l.ends_with("reset_sent  ESTABLISHED > CLOSE  RST sent"),
                "{l}"
            ),
        }
        let l = line(&format!(" 127.0.0.1:{refused} "));
        assert!(
            l.ends_with("refused  SYN_SENT > CLOSE  RST received"),
            "{l}"
        );
    });
}

fn of_type_lines(lines: &[String], ty: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| json(l)["type"] == ty)
        .cloned()
        .collect()
}

fn set_syncnt(s: &Socket, n: i32) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid socket and option size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&n as *const i32).cast(),
            4,
        )
    };
    assert_eq!(rc, 0, "TCP_SYNCNT: {}", std::io::Error::last_os_error());
}

/// A client shuts down its side and keeps the socket; the server never
/// closes: no connection record, and the stuck alerts show the close so
/// far (`by` unfinished).
#[test]
fn a_half_close_that_never_finishes() {
    in_netns(|| {
        let port = test_port();
        let p = port.to_string();
        let run = Running::start(&[
            "--output",
            "json",
            "--events",
            "closes",
            "--port",
            &p,
            "--close-wait",
            "1s",
            "--fin-wait2",
            "1s",
            "-v",
        ]);
        run.wait_attached();
        let listener = TcpListener::bind(local(port)).unwrap();
        let c = TcpStream::connect(local(port)).unwrap();
        let (s, _) = listener.accept().unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        run.read_until(&mut got, "both alerts", |l| {
            let r: Vec<Value> = l.iter().map(|l| json(l)).collect();
            r.iter().any(|v| v["type"] == "close_wait") && r.iter().any(|v| v["type"] == "stuck")
        });
        run.interrupt();
        let (code, rest, _) = run.finish();
        assert_eq!(code, 0);
        got.extend(rest);
        drop((c, s));
        let recs: Vec<Value> = got.iter().map(|l| json(l)).collect();
        // Written when the tracer stopped, as far as they got.
        let at_exit: Vec<&Value> = recs.iter().filter(|v| v["type"] == "connection").collect();
        assert_eq!(at_exit.len(), 2, "{got:?}");
        for c in at_exit {
            assert_eq!(c["at_exit"], true, "{c}");
            assert_eq!(c["complete"], false, "{c}");
            assert_eq!(c["close"]["by"], "unfinished", "{c}");
        }
        for (ty, first, path) in [
            ("close_wait", "peer", vec!["ESTABLISHED>CLOSE_WAIT"]),
            (
                "stuck",
                "local",
                vec!["ESTABLISHED>FIN_WAIT1", "FIN_WAIT1>FIN_WAIT2"],
            ),
        ] {
            let alerts: Vec<&Value> = recs.iter().filter(|v| v["type"] == ty).collect();
            assert_eq!(alerts.len(), 2, "one alert and one at exit: {alerts:?}");
            assert_eq!(alerts[0]["at_exit"], false);
            assert_eq!(alerts[1]["at_exit"], true);
            for v in alerts {
                check(v, "unfinished", json!(first), &path, None, (0, 0));
            }
        }
    });
}

/// Without the reset tracepoints (hidden here by an empty tmpfs over
/// `events/tcp` in the tracer's own mount namespace) everything else
/// works: `rst` is null, and `-v` says why.
#[test]
fn without_reset_tracepoints_rst_is_null() {
    in_netns(|| {
        let port = test_port();
        let ns = own_netns().expect("own namespace").to_string();
        let mut cmd = tracer();
        cmd.args([
            "--output",
            "json",
            "--events",
            "closes",
            "-v",
            "--port",
            &port.to_string(),
            "--netns",
            &ns,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        hide_with_tmpfs(
            &mut cmd,
            &["/sys/kernel/tracing/events/tcp", "/sys/kernel/debug"],
            &[],
        );
        let run = Running::from_child(cmd.spawn().expect("spawn tracer"));
        let said = run.wait_attached_saying();
        assert!(said.contains("no reset tracepoints"), "-v says why: {said}");
        conversation(local(port), Duration::ZERO, Ending::ClientReset);
        let mut got = Vec::new();
        run.read_until(&mut got, "both records", |l| l.len() >= 2);
        run.interrupt();
        let (code, rest, _) = run.finish();
        assert_eq!(code, 0);
        got.extend(rest);
        let recs: Vec<Value> = got.iter().map(|l| json(l)).collect();
        let conns: Vec<&Value> = recs.iter().filter(|v| v["type"] == "connection").collect();
        assert_eq!(conns.len(), 2, "{got:?}");
        for v in conns {
            assert!(v["close"]["rst"].is_null(), "{v}");
            // Without resets an abort cannot be told from a reset.
            assert_eq!(v["close"]["by"], "unknown", "{v}");
            assert_eq!(steps(v), ["ESTABLISHED>CLOSE"]);
        }
        let stats = recs.iter().find(|v| v["type"] == "stats").unwrap();
        assert_eq!(stats["kernel"]["resets"], false);
    });
}

/// The active closer's close comes when its handshake is over (its entry
/// into TIME_WAIT, seen by the next timewait poll), not 60 s later; and
/// when the tracer stops a second after, the connection is written as far
/// as it got: closed by this side, its TIME_WAIT cut by the tracer.
#[test]
fn the_active_closers_close_comes_live_and_nothing_is_dropped_at_exit() {
    in_netns(|| {
        let port = test_port();
        let p = port.to_string();
        let run = Running::start(&[
            "-o",
            "json",
            "--events",
            "closes",
            "--port",
            &p,
            "--timewait-interval",
            "200ms",
            "-v",
        ]);
        run.wait_attached();
        let client = conversation(local(port), Duration::ZERO, Ending::ClientFirst);
        let is_client = |v: &Value| v["lport"] == client.port() && v["rport"] == port;
        let mut got = Vec::new();
        run.read_until(&mut got, "the client's close record", |l| {
            l.iter().any(|l| {
                let v = json(l);
                v["type"] == "close" && is_client(&v)
            })
        });
        let early = of_type(&got, "close")
            .into_iter()
            .find(|v| is_client(v))
            .unwrap();
        assert_eq!(early["state"], "TIME_WAIT", "{early}");
        assert_eq!(early["close"]["by"], "local", "{early}");
        assert_eq!(early["at_exit"], false);
        assert!(
            !of_type(&got, "connection").iter().any(&is_client),
            "the connection record waits for the end of TIME_WAIT"
        );
        // Stopped a second later: the client's connection is written.
        thread::sleep(Duration::from_secs(1));
        run.interrupt();
        let (code, rest, _) = run.finish();
        assert_eq!(code, 0);
        got.extend(rest);
        let conn = of_type(&got, "connection")
            .into_iter()
            .find(|v| is_client(v))
            .expect("the client's record at exit");
        assert_eq!(conn["close"]["by"], "local", "{conn}");
        assert_eq!(conn["time_wait_end"], "tracing_stopped", "{conn}");
        assert_eq!(conn["complete"], false);
        assert_eq!(conn["at_exit"], true);
        assert!(
            conn["states"]["TIME_WAIT"].as_u64().unwrap() >= 900_000_000,
            "{conn}"
        );
        // One close record for it, the early one.
        assert_eq!(
            of_type(&got, "close")
                .iter()
                .filter(|v| is_client(v))
                .count(),
            1
        );
        let stats = json(got.last().unwrap());
        assert_eq!(stats["timewait_pending"], 1, "{stats}");
        assert_eq!(stats["open_at_exit"], 0, "{stats}");
    });
}
