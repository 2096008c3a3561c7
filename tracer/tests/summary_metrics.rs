//! End-to-end tests of summaries (`--summary`, SIGUSR1, `tracer
//! summarize`) and of the Prometheus endpoint (`--metrics`): the built
//! binary, the real kernel program, real TCP in a network namespace per
//! test, and the real `promtool` and `prometheus` of Debian's `prometheus`
//! package (installed by `cargo xtask test`). Nothing waits a fixed time
//! for events: every wait polls up to a deadline.
//!
//! In the QEMU guests of `cargo xtask test` (TRACER_GUEST=1), which check
//! other kernels, the Prometheus tools are not in the initramfs: there,
//! and only there, the promtool and Prometheus server checks are skipped
//! (they do not depend on the kernel), and time slack is wider (software
//! emulation).
//!
//! Over 600 lines on purpose: the summary and metrics tests share their scrape, parse and promtool helpers, kept beside them.

mod common;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const MS: u64 = 1_000_000;

/// Scheduling slack allowed on top of a connection's hold time: on this
/// 2-core VM with 30 sockets sleeping at once, or under emulation.
fn slack_ns() -> u64 {
    if in_guest() {
        250 * MS
    } else {
        50 * MS
    }
}
/// HdrHistogram with 2 significant digits: at most 1/128 above.
const HIST_ERROR: f64 = 1.0 / 128.0;

/// One connection per entry of `holds` to a listener on `addr`, all at
/// once: the client holds it established for its time, then closes; the
/// server closes when it reads the end. Returns when everything is closed.
fn held_connections(addr: SocketAddr, holds: &[Duration]) {
    let listener = TcpListener::bind(addr).expect("bind");
    let n = holds.len();
    let server = thread::spawn(move || {
        let mut handlers = Vec::new();
        for _ in 0..n {
            let (mut s, _) = listener.accept().expect("accept");
            handlers.push(thread::spawn(move || {
                let mut buf = [0u8; 64];
                while matches!(s.read(&mut buf), Ok(k) if k > 0) {}
            }));
        }
        for h in handlers {
            h.join().unwrap();
        }
        drop(listener);
    });
    let clients: Vec<_> = holds
        .iter()
        .map(|&hold| {
            thread::spawn(move || {
                let mut c = TcpStream::connect(addr).expect("connect");
                c.write_all(b"?").unwrap();
                thread::sleep(hold);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    server.join().unwrap();
}

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Transitions of `k` connections closed by the client, and their
/// listener: 10 per connection from the tracepoint, and the client's
/// `FIN_WAIT2 -> TIME_WAIT` that the agent derives from sock_diag (its
/// `TIME_WAIT -> CLOSE` comes 60 s later).
fn expected_transitions(k: u64) -> Vec<((&'static str, &'static str), u64)> {
    vec![
        (("FIN_WAIT2", "TIME_WAIT"), k),
        (("CLOSE", "LISTEN"), 1),
        (("CLOSE", "SYN_SENT"), k),
        (("LISTEN", "SYN_RECV"), k),
        (("SYN_SENT", "ESTABLISHED"), k),
        (("SYN_RECV", "ESTABLISHED"), k),
        (("ESTABLISHED", "FIN_WAIT1"), k),
        (("ESTABLISHED", "CLOSE_WAIT"), k),
        (("FIN_WAIT1", "FIN_WAIT2"), k),
        (("FIN_WAIT2", "CLOSE"), k),
        (("CLOSE_WAIT", "LAST_ACK"), k),
        (("LAST_ACK", "CLOSE"), k),
        (("LISTEN", "CLOSE"), 1),
    ]
}

fn ns(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// `lo <= got <= hi`, with a readable failure.
fn within(what: &str, got: u64, lo: u64, hi: u64) {
    assert!(
        lo <= got && got <= hi,
        "{what}: {:.3} ms not in [{:.3}, {:.3}] ms",
        got as f64 / 1e6,
        lo as f64 / 1e6,
        hi as f64 / 1e6
    );
}

/// Bounds for a percentile whose exact value is a stay of `hold`.
fn held(hold: Duration) -> (u64, u64) {
    let h = hold.as_nanos() as u64;
    // The server's ESTABLISHED may begin a few µs after the client's.
    (h - MS, (h as f64 * (1.0 + HIST_ERROR)) as u64 + slack_ns())
}

#[test]
fn summary_percentiles_match_known_durations() {
    in_netns(|| {
        let port = test_port();
        let p = port.to_string();
        let run = Running::start(&[
            "--summary",
            "--output",
            "json",
            "--events",
            "none",
            "--port",
            &p,
            "-v",
        ]);
        run.wait_attached();
        let (short, mid, long) = (
            Duration::from_millis(50),
            Duration::from_millis(200),
            Duration::from_secs(1),
        );
        let mut holds = Vec::new();
        for _ in 0..5 {
            holds.extend([short, mid, long]);
        }
        let started = Instant::now();
        held_connections(localhost(port), &holds);
        eprintln!("traffic took {:?}", started.elapsed());

        // SIGUSR1 prints the summary without stopping: ask until it has
        // every stay (15 connections, both ends, and the listener).
        let mut got = Vec::new();
        let mid_run = run.summary_until(&mut got, "a summary of every stay", |s| {
            s.iter().any(|l| {
                let v = json(l);
                v["type"] == "summary"
                    && v["states"]["ESTABLISHED"]["count"] == 30
                    && v["states"]["LAST_ACK"]["count"] == 15
                    && v["states"]["FIN_WAIT2"]["count"] == 15
                    && v["states"]["LISTEN"]["count"] == 1
            })
        });
        assert_eq!(mid_run.len(), 1, "one summary record: {mid_run:#?}");
        run.signal(libc::SIGINT);
        let (code, rest, err) = run.finish();
        assert_eq!(code, 0, "{err:#?}");
        got.extend(rest);

        // At exit: the summary again, then the stats record last.
        let stats = json(got.last().unwrap());
        assert_eq!(stats["type"], "stats");
        assert_eq!(stats["lost"], 0);
        let summaries = of_type(&got, "summary");
        let last = summaries.last().unwrap();
        assert_eq!(*last, json(&mid_run[0]), "nothing happened since SIGUSR1");
        assert!(last["group"].is_null());

        let states = &last["states"];
        for (state, n) in [
            ("SYN_SENT", 15),
            ("SYN_RECV", 15),
            ("ESTABLISHED", 30),
            ("FIN_WAIT1", 15),
            ("FIN_WAIT2", 15),
            ("CLOSE_WAIT", 15),
            ("LAST_ACK", 15),
            ("LISTEN", 1),
        ] {
            assert_eq!(states[state]["count"], n, "{state} in {last}");
        }
        let est = &states["ESTABLISHED"];
        eprintln!("ESTABLISHED: {est}");
        let (lo, hi) = held(short);
        within("min", ns(est, "min_ns"), lo, hi);
        let (lo, hi) = held(mid);
        within("p50", ns(est, "p50_ns"), lo, hi);
        let (lo, hi) = held(long);
        within("p90", ns(est, "p90_ns"), lo, hi);
        within("p99", ns(est, "p99_ns"), lo, hi);
        within("max", ns(est, "max_ns"), lo, hi);
        assert!(ns(est, "min_ns") <= ns(est, "p50_ns"));
        assert!(ns(est, "p99_ns") <= ns(est, "max_ns"));

        // The log2 histogram: 10 stays in each class's power-of-two bucket.
        let hist = est["histogram"].as_array().unwrap();
        let count_in = |lo_ms: f64, hi_ms: f64| -> u64 {
            hist.iter()
                .filter(|b| {
                    let lo = ns(b, "lo_ns") as f64 / 1e6;
                    lo >= lo_ms && lo < hi_ms
                })
                .map(|b| ns(b, "count"))
                .sum()
        };
        // (Or the next bucket up, for scheduling slack.)
        assert_eq!(count_in(32.0, 66.0), 10, "[32.8, 131) ms: {est}");
        assert_eq!(count_in(131.0, 263.0), 10, "[131, 524) ms: {est}");
        assert_eq!(count_in(524.0, 1049.0), 10, "[524 ms, 2.1 s): {est}");
        assert_eq!(count_in(0.0, f64::MAX), 30);
    });
}

/// The kernel batches each socket's transitions when no output needs them
/// one by one (`--events connections|none`). Two tracers on the same
/// traffic, one per transition (`--events all`), one batched: the same
/// connection records and the same summary, but for the few µs between
/// the two programs' clock reads of one transition.
#[test]
fn batched_and_per_transition_modes_agree_on_the_same_traffic() {
    in_netns(|| {
        let port = test_port();
        let p = port.to_string();
        let start = |events: &str| {
            Running::start(&[
                "--summary",
                "--output",
                "json",
                "--events",
                events,
                "--port",
                &p,
                "-v",
            ])
        };
        let (per, batched) = (start("all"), start("connections"));
        per.wait_attached();
        batched.wait_attached();
        let holds: Vec<Duration> = (0..8).map(|i| Duration::from_millis(3 * i)).collect();
        held_connections(localhost(port), &holds);
        // Every server-side connection record (a client's comes when its
        // timewait socket ends: 60 s later, or sooner if the kernel kills
        // it) and every stay (FIN_WAIT2 ends when a timewait poll sees the
        // socket in TIME_WAIT).
        let done = |s: &[String]| {
            s.iter().any(|l| {
                let v = json(l);
                v["type"] == "summary"
                    && v["states"]["LAST_ACK"]["count"] == 8
                    && v["states"]["FIN_WAIT2"]["count"] == 8
            })
        };
        let (mut got_per, mut got_batched) = (Vec::new(), Vec::new());
        per.summary_until(&mut got_per, "every stay (per transition)", done);
        batched.summary_until(&mut got_batched, "every stay (batched)", done);
        for run in [&per, &batched] {
            run.signal(libc::SIGINT);
        }
        let (code, rest, err) = per.finish();
        assert_eq!(code, 0, "{err:#?}");
        got_per.extend(rest);
        let (code, rest, err) = batched.finish();
        assert_eq!(code, 0, "{err:#?}");
        got_batched.extend(rest);

        // Each tracer's programs read the clock themselves: a few µs apart
        // (milliseconds under emulation, where a guest's vCPU can stall
        // between two programs of one hit: 5.6 ms seen once). FIN_WAIT2
        // ends at the TIME_WAIT entry each agent dates from its own
        // sock_diag polls (ms, jiffies).
        let tick = if in_guest() { 20 * MS } else { MS / 5 };
        let close = |what: &str, a: u64, b: u64| {
            let tolerance = if what.starts_with("FIN_WAIT2") {
                slack_ns()
            } else {
                tick
            };
            assert!(a.abs_diff(b) <= tolerance, "{what}: {a} vs {b}");
        };
        let records = |got: &[String]| -> BTreeMap<u64, Value> {
            of_type(got, "connection")
                .into_iter()
                .filter(|c| c["at_exit"] == false && c["lport"] == port)
                .map(|c| (c["rport"].as_u64().unwrap(), c))
                .collect()
        };
        for (mode, got) in [("per transition", &got_per), ("batched", &got_batched)] {
            for c in of_type(got, "connection") {
                if c["at_exit"] == false && c["lport"] != port {
                    eprintln!("{mode}: a client's record before exit: {c}");
                }
            }
        }
        let (a, b) = (records(&got_per), records(&got_batched));
        assert_eq!(a.len(), 8, "server-side connection records: {a:#?}");
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "the same connections"
        );
        for (rport, x) in &a {
            let y = &b[rport];
            for field in ["pid", "comm", "complete", "lport", "time_wait_end"] {
                assert_eq!(x[field], y[field], "{field} of :{rport}");
            }
            let (xs, ys) = (
                x["states"].as_object().unwrap(),
                y["states"].as_object().unwrap(),
            );
            assert_eq!(
                xs.keys().collect::<Vec<_>>(),
                ys.keys().collect::<Vec<_>>(),
                "states of :{rport}"
            );
            for (state, ns) in xs {
                close(state, ns.as_u64().unwrap(), ys[state].as_u64().unwrap());
            }
            close("duration", ns(x, "duration_ns"), ns(y, "duration_ns"));
        }
        let (sa, sb) = (
            of_type(&got_per, "summary").pop().unwrap(),
            of_type(&got_batched, "summary").pop().unwrap(),
        );
        let (sa, sb) = (
            sa["states"].as_object().unwrap(),
            sb["states"].as_object().unwrap(),
        );
        assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
        for (state, x) in sa {
            let y = &sb[state];
            assert_eq!(x["count"], y["count"], "{state} count");
            for q in ["min_ns", "p50_ns", "max_ns"] {
                close(&format!("{state} {q}"), ns(x, q), ns(y, q));
            }
        }
        let (ta, tb) = (
            json(got_per.last().unwrap()),
            json(got_batched.last().unwrap()),
        );
        assert_eq!(ta["type"], "stats");
        assert_eq!(ta["events"], tb["events"], "transitions delivered");
        assert_eq!(ta["events"], 8 * 10 + 2);
        for t in [&ta, &tb] {
            assert_eq!(t["lost"], 0);
            assert_eq!(t["skipped"], 0);
            assert_eq!(t["pending"], 0);
        }
    });
}

#[test]
fn table_summary_on_sigusr1_keeps_running_and_prints_again_at_exit() {
    in_netns(|| {
        let port = test_port();
        let p = port.to_string();
        let run = Running::start(&["--summary", "--events", "none", "--port", &p, "-v"]);
        run.wait_attached();
        held_connections(localhost(port), &[Duration::from_millis(20); 2]);
        let mut got = Vec::new();
        let table = run.summary_until(&mut got, "a summary table with 4 ESTABLISHED stays", |s| {
            s.iter()
                .any(|l| l.starts_with("ESTABLISHED ") && l.split_whitespace().nth(1) == Some("4"))
        });
        assert!(
            table[0].starts_with("Time in each TCP state (all sockets;"),
            "{table:#?}"
        );
        assert!(table[1].starts_with("STATE"), "{table:#?}");
        // Still tracing after SIGUSR1: one more connection counts.
        held_connections(localhost(port), &[Duration::from_millis(20)]);
        run.summary_until(&mut got, "a summary table with 6 ESTABLISHED stays", |s| {
            s.iter()
                .any(|l| l.starts_with("ESTABLISHED ") && l.split_whitespace().nth(1) == Some("6"))
        });
        run.signal(libc::SIGTERM);
        let (code, rest, err) = run.finish();
        assert_eq!(code, 0, "{err:#?}");
        // The table at exit, with its histograms; the stats on stderr.
        assert!(
            rest.iter()
                .any(|l| l.starts_with("ESTABLISHED ") && l.split_whitespace().nth(1) == Some("6")),
            "{rest:#?}"
        );
        assert!(
            rest.iter()
                .any(|l| l.contains("distribution of ESTABLISHED")),
            "{rest:#?}"
        );
        assert!(
            rest.iter()
                .any(|l| l.contains("ms -> ") && l.contains("|***")),
            "{rest:#?}"
        );
        assert!(err.last().unwrap().starts_with("tracer: "), "{err:#?}");
    });
}

#[test]
fn sigusr1_without_summary_does_not_stop_the_tracer() {
    in_netns(|| {
        // --close-wait 0: no alerts about the machine's other sockets.
        let run = Running::start(&["--events", "none", "--close-wait", "0", "-v"]);
        run.wait_attached();
        run.signal(libc::SIGUSR1);
        let start = Instant::now();
        loop {
            match run.stderr.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains("SIGUSR1") => break,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("tracer exited on SIGUSR1"),
            }
            assert!(start.elapsed() < DEADLINE, "no SIGUSR1 notice");
        }
        run.signal(libc::SIGINT);
        let (code, out, _) = run.finish();
        assert_eq!(code, 0);
        assert!(out.is_empty(), "{out:#?}");
    });
}

/// A file of its own in the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        TempFile(std::env::temp_dir().join(format!(
            "tracer-test-{}-{}-{name}",
            std::process::id(),
            test_port()
        )))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn summarize(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = tracer()
        .arg("summarize")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tracer summarize");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout_lines(o: &Output) -> Vec<String> {
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .inspect(|l| check_if_record(l))
        .map(String::from)
        .collect()
}

#[test]
fn summarize_of_a_recording_prints_the_live_summary() {
    in_netns(|| {
        let port = test_port();
        let p = port.to_string();
        let run = Running::start(&[
            "--summary",
            "--group-by",
            "comm",
            "--output",
            "json",
            "--events",
            "all",
            "--port",
            &p,
            "-v",
        ]);
        run.wait_attached();
        held_connections(localhost(port), &[Duration::from_millis(30); 3]);
        let mut got = Vec::new();
        let start = Instant::now();
        // 3 connections: the servers' records (the clients' come when their
        // timewait sockets end, 60 s later), and the clients' TIME_WAIT.
        let count =
            |got: &[String], needle: &str| got.iter().filter(|l| l.contains(needle)).count();
        while count(&got, r#""type":"connection""#) < 3 || count(&got, r#""new":"TIME_WAIT""#) < 3 {
            assert!(
                start.elapsed() < DEADLINE,
                "waiting for 3 connection records and 3 TIME_WAIT:\n{}",
                got.join("\n")
            );
            if let Ok(l) = run.stdout.recv_timeout(Duration::from_millis(50)) {
                check_if_record(&l);
                got.push(l);
            }
        }
        run.signal(libc::SIGINT);
        let (code, rest, _) = run.finish();
        assert_eq!(code, 0);
        got.extend(rest);
        let live: Vec<&String> = got
            .iter()
            .filter(|l| l.contains(r#""type":"summary""#))
            .collect();
        assert!(!live.is_empty());
        assert!(
            live[0].contains(r#""group":{"by":"comm","value":"#),
            "{live:#?}"
        );

        let recording = TempFile::new("capture.json");
        std::fs::write(recording.path(), got.join("\n") + "\n").unwrap();
        let path = recording.path().to_str().unwrap();

        let replay = summarize(&[path, "--output", "json", "--group-by", "comm"], None);
        assert!(replay.status.success(), "{replay:?}");
        assert_eq!(stdout_lines(&replay).iter().collect::<Vec<_>>(), live);
        let note = String::from_utf8_lossy(&replay.stderr);
        assert!(
            note.contains("transition records") && note.contains("summarized from the transitions"),
            "{note}"
        );

        // From stdin, as a table: the same numbers.
        let table = summarize(&["-"], Some(&(got.join("\n") + "\n")));
        assert!(table.status.success(), "{table:?}");
        let table = stdout_lines(&table);
        assert!(
            table[0].starts_with("Time in each TCP state (all sockets;"),
            "{table:#?}"
        );
        assert!(
            table
                .iter()
                .any(|l| l.starts_with("ESTABLISHED ") && l.split_whitespace().nth(1) == Some("6")),
            "{table:#?}"
        );

        // Only the connection records: their states, no listener.
        let conns: Vec<&String> = got
            .iter()
            .filter(|l| l.contains(r#""type":"connection""#))
            .collect();
        let from_conns = summarize(
            &["-", "-o", "json"],
            Some(
                &(conns
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n"),
            ),
        );
        assert!(from_conns.status.success());
        let v = json(&stdout_lines(&from_conns)[0]);
        assert_eq!(v["states"]["ESTABLISHED"]["count"], 3, "{v}");
        assert_eq!(v["states"]["CLOSE_WAIT"]["count"], 3, "{v}");
        assert!(
            v["states"]["LISTEN"].is_null(),
            "listeners have no connection record: {v}"
        );
    });
}

/// One HTTP/1.1 GET; (status, headers, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, head.to_string(), body.to_string())
}

/// Samples of a text exposition: (name, labels, value).
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((n, rest)) => (
                    n,
                    rest.trim_end_matches('}')
                        .split(',')
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap();
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect(),
                ),
            };
            (name.to_string(), labels, value.parse().unwrap())
        })
        .collect()
}

fn sum_of(text: &str, name: &str, pred: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
    samples(text)
        .iter()
        .filter(|(n, l, _)| n == name && pred(l))
        .map(|(_, _, v)| v)
        .sum()
}

/// Scrapes until `done(text)` holds; returns that scrape.
fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let (status, head, body) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        if done(&body) {
            return body;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}; last scrape:\n{body}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn promtool_check(text: &str) {
    if in_guest() {
        eprintln!("QEMU guest: no promtool here; checked on the host");
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is needed: run `cargo xtask test`, which installs it");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A quiet tracer serving metrics, on a port of the test's own; attached.
/// `--close-wait 0`: no alerts (on stdout) about the machine's other
/// sockets, which the start-up snapshot finds in every namespace.
fn metrics_tracer() -> (Running, u16, SocketAddr) {
    let port = test_port();
    let metrics = localhost(test_port());
    let (p, m) = (port.to_string(), metrics.to_string());
    let run = Running::start(&[
        "--metrics",
        &m,
        "--events",
        "none",
        "--close-wait",
        "0",
        "--port",
        &p,
        "-v",
    ]);
    run.wait_attached();
    (run, port, metrics)
}

#[test]
fn metrics_endpoint_counts_the_traffic_and_passes_promtool() {
    in_netns(|| {
        let (run, port, metrics) = metrics_tracer();
        let (status, _, body) = http_get(metrics, "/nowhere");
        assert_eq!(status, 404, "{body}");
        // The gauges count those other sockets too (the port filter is the
        // kernel program's): compare with a scrape before the traffic.
        let (_, _, base) = http_get(metrics, "/metrics");
        let before = |state: &str| {
            sum_of(&base, "tracer_tcp_connections", |l| {
                state.is_empty() || l["state"] == state
            })
        };

        // K connections held open: the gauge shows both ends established.
        const K: u64 = 8;
        let traffic = thread::spawn(move || {
            held_connections(localhost(port), &[Duration::from_millis(1500); K as usize]);
        });
        let during = scrape_until(metrics, "2K established connections", |t| {
            sum_of(t, "tracer_tcp_connections", |l| l["state"] == "ESTABLISHED")
                == before("ESTABLISHED") + 2.0 * K as f64
        });
        assert_eq!(
            sum_of(&during, "tracer_tcp_connections", |_| true),
            before("") + 2.0 * K as f64,
            "a listener is no connection:\n{during}"
        );
        traffic.join().unwrap();

        // Every transition counted: 11 per connection and 2 for the listener.
        let total = 11 * K + 2;
        let text = scrape_until(metrics, "all transitions", |t| {
            sum_of(t, "tracer_tcp_transitions_total", |_| true) == total as f64
        });
        eprintln!(
            "scrape: {} bytes, {} lines",
            text.len(),
            text.lines().count()
        );
        for ((old, new), n) in expected_transitions(K) {
            assert_eq!(
                sum_of(&text, "tracer_tcp_transitions_total", |l| l["old"] == old
                    && l["new"] == new
                    && l["family"] == "ipv4"),
                n as f64,
                "{old} -> {new}:\n{text}"
            );
        }
        // Durations: every stay with a known duration, ESTABLISHED ≥ 1.5 s;
        // FIN_WAIT2 once per client, whole (it goes on in the timewait
        // socket); no TIME_WAIT over yet.
        let count = |state: &str| {
            sum_of(&text, "tracer_tcp_state_duration_seconds_count", |l| {
                l["state"] == state
            })
        };
        assert_eq!(count("ESTABLISHED"), 2.0 * K as f64);
        assert_eq!(count("SYN_SENT"), K as f64);
        assert_eq!(count("FIN_WAIT2"), K as f64);
        assert_eq!(count("LISTEN"), 1.0);
        assert_eq!(count("TIME_WAIT"), 0.0);
        assert_eq!(
            sum_of(&text, "tracer_tcp_state_duration_seconds_bucket", |l| l
                ["state"]
                == "ESTABLISHED"
                && l["le"] == "1"),
            0.0
        );
        assert_eq!(
            sum_of(&text, "tracer_tcp_state_duration_seconds_bucket", |l| l
                ["state"]
                == "ESTABLISHED"
                && l["le"] == "5"),
            2.0 * K as f64
        );
        assert!(
            sum_of(&text, "tracer_tcp_state_duration_seconds_sum", |l| l
                ["state"]
                == "ESTABLISHED")
                >= 2.0 * K as f64 * 1.49
        );
        // Everything closed: only the clients' timewait sockets are left.
        let after = scrape_until(metrics, "only K connections, in TIME_WAIT", |t| {
            sum_of(t, "tracer_tcp_connections", |l| l["state"] == "TIME_WAIT")
                == before("TIME_WAIT") + K as f64
                && sum_of(t, "tracer_tcp_connections", |_| true) == before("") + K as f64
        });
        assert_eq!(
            sum_of(&after, "tracer_tcp_close_wait_stuck", |_| true),
            sum_of(&base, "tracer_tcp_close_wait_stuck", |_| true)
        );
        assert_eq!(
            sum_of(&after, "tracer_tcp_events_lost_total", |_| true),
            0.0
        );
        promtool_check(&after);

        run.signal(libc::SIGTERM);
        let (code, out, err) = run.finish();
        assert_eq!(code, 0, "{err:#?}");
        assert!(
            out.is_empty(),
            "--events none with --metrics is quiet: {out:#?}"
        );
    });
}

#[test]
fn metrics_label_is_opt_in_and_capped() {
    in_netns(|| {
        // Two listening ports, label by lport with a cap of 1.
        let (a, b) = (test_port(), test_port());
        let metrics = localhost(test_port());
        let (pa, pb, m) = (a.to_string(), b.to_string(), metrics.to_string());
        let run = Running::start(&[
            "--metrics",
            &m,
            "--metrics-label",
            "lport",
            "--metrics-label-max",
            "1",
            "--events",
            "none",
            "--port",
            &pa,
            "--port",
            &pb,
            "-v",
        ]);
        run.wait_attached();
        held_connections(localhost(a), &[Duration::ZERO; 2]);
        held_connections(localhost(b), &[Duration::ZERO; 2]);
        let text = scrape_until(metrics, "all transitions", |t| {
            sum_of(t, "tracer_tcp_transitions_total", |_| true) == 2.0 * (11 * 2 + 2) as f64
        });
        let lports: std::collections::BTreeSet<String> = samples(&text)
            .into_iter()
            .filter(|(n, _, _)| n == "tracer_tcp_transitions_total")
            .map(|(_, l, _)| l["lport"].clone())
            .collect();
        // The first value seen (the first listener's port) and "other".
        assert_eq!(lports.len(), 2, "{lports:?}");
        assert!(
            lports.contains("other") && lports.contains(&pa),
            "{lports:?}"
        );
        // Server sockets of port a keep its label.
        assert_eq!(
            sum_of(&text, "tracer_tcp_transitions_total", |l| l["lport"] == pa
                && l["old"] == "SYN_RECV"),
            2.0
        );
        promtool_check(&text);
        run.signal(libc::SIGINT);
        assert_eq!(run.finish().0, 0);
    });
}

#[test]
fn a_prometheus_server_scrapes_the_endpoint() {
    if in_guest() {
        require_root();
        eprintln!("QEMU guest: no Prometheus server here; checked on the host");
        return;
    }
    in_netns(|| {
        let port = test_port();
        let metrics = localhost(test_port());
        let web = localhost(test_port());
        let (p, m) = (port.to_string(), metrics.to_string());
        let run = Running::start(&["--metrics", &m, "--events", "none", "--port", &p, "-v"]);
        run.wait_attached();
        const K: u64 = 3;
        held_connections(localhost(port), &[Duration::ZERO; K as usize]);

        let dir = TempFile::new("prometheus");
        std::fs::create_dir_all(dir.path()).unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tracer\n    \
                 static_configs:\n      - targets: ['{metrics}']\n"
            ),
        )
        .unwrap();
        let mut server = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus) is needed: run `cargo xtask test`");
        let started = Instant::now();
        let want = (11 * K + 2) as f64;
        let query = "/api/v1/query?query=sum(tracer_tcp_transitions_total)";
        let result = loop {
            let got = TcpStream::connect(web)
                .ok()
                .map(|_| http_get(web, query))
                .filter(|(status, _, _)| *status == 200)
                .and_then(|(_, _, body)| {
                    let v = json_document(&body);
                    v["data"]["result"][0]["value"][1]
                        .as_str()?
                        .parse::<f64>()
                        .ok()
                });
            if got == Some(want) || started.elapsed() > Duration::from_secs(30) {
                break got;
            }
            thread::sleep(Duration::from_millis(200));
        };
        eprintln!(
            "prometheus scraped the tracer after {:?}",
            started.elapsed()
        );
        let (_, _, up) = http_get(web, "/api/v1/query?query=up");
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!(
            result,
            Some(want),
            "prometheus' sum(tracer_tcp_transitions_total)"
        );
        assert_eq!(
            json_document(&up)["data"]["result"][0]["value"][1],
            "1",
            "{up}"
        );
        run.signal(libc::SIGINT);
        assert_eq!(run.finish().0, 0);
    });
}

fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(
        !stderr.contains("backtrace") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

fn run_to_end(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run tracer")
}

#[test]
fn bad_input_is_one_line_and_a_non_zero_exit() {
    require_root();
    let out = run_to_end(tracer().args(["--metrics", "notanaddr"]));
    assert_one_line_error(&out, 2, "not an address to listen on");
    let out = run_to_end(tracer().args(["--summary", "--group-by", "bogus"]));
    assert_one_line_error(&out, 2, "invalid value 'bogus'");
    let out = run_to_end(tracer().args(["--group-by", "lport"]));
    assert_one_line_error(&out, 2, "--summary");

    let out = run_to_end(tracer().args(["summarize", "/nonexistent"]));
    assert_one_line_error(&out, 1, "cannot open /nonexistent");
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    let out = summarize(&["-"], Some("TIME(UTC)        PID     COMM\n"));
    assert_one_line_error(&out, 1, "stdin:1: not a tracer JSON record");
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);

    // A port already in use: one line, before anything is loaded.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = run_to_end(tracer().args(["--metrics", &addr, "--duration", "1s"]));
    assert_one_line_error(&out, 1, &format!("cannot listen on {addr} for --metrics"));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

/// The Grafana dashboard (`deploy/grafana/tracer.json`), embedded at build
/// time so that the QEMU guests, which have no checkout, check it too.
const DASHBOARD: &str = include_str!("../../deploy/grafana/tracer.json");

/// The metric names (`tracer_…`) a PromQL expression refers to: the
/// identifiers outside string literals, Grafana variables (`$instance`,
/// `$__rate_interval`) skipped. Series names are kept as written
/// (`…_bucket`, `…_count`): that is what a scrape has too.
fn promql_metric_names(expr: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // A label value or a regex may mention `tracer_…`: not a metric.
            '"' | '\'' | '`' => {
                while let Some(d) = chars.next() {
                    if d == '\\' && c != '`' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
            }
            '$' | 'a'..='z' | 'A'..='Z' | '_' | ':' => {
                let mut word = String::from(c);
                while let Some(&d) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                        word.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if word.starts_with("tracer_") {
                    names.insert(word);
                }
            }
            // A number's digits cannot start a name; skip them with it.
            '0'..='9' => {
                while chars
                    .peek()
                    .is_some_and(|d| d.is_ascii_alphanumeric() || *d == '.')
                {
                    chars.next();
                }
            }
            _ => {}
        }
    }
    names
}

/// The metric family of a series name: `name` without a `_bucket`, `_sum`
/// or `_count` suffix if the scrape declares that stem a histogram (or
/// summary), else `name` itself (a counter may end in `_count`).
fn metric_family(name: &str, types: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(stem) = name.strip_suffix(suffix) {
            if types
                .get(stem)
                .is_some_and(|t| t == "histogram" || (t == "summary" && suffix != "_bucket"))
            {
                return stem.to_string();
            }
        }
    }
    name.to_string()
}

/// The panels' expressions are PromQL that Prometheus' own parser (`promtool
/// check rules`) accepts, once Grafana's variables are replaced by values
/// of their kind.
fn promql_check(queries: &[(String, String)]) {
    if in_guest() {
        eprintln!("QEMU guest: no promtool here; the dashboard's PromQL is checked on the host");
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (place, expr)) in queries.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$state", ".*");
        assert!(
            !expr.contains('$'),
            "{place}: an unknown variable in {expr:?}"
        );
        // JSON strings are YAML strings: no quoting of our own to get wrong.
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            Value::from(expr)
        ));
    }
    let file = TempFile::new("dashboard-rules.yml");
    std::fs::write(file.path(), &rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(file.path())
        .output()
        .expect("promtool (Debian package prometheus) is needed: run `cargo xtask test`, which installs it");
    assert!(
        out.status.success(),
        "promtool check rules on the dashboard's queries: {}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every panel of the dashboard, those inside (collapsed) rows included.
fn dashboard_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

#[test]
fn promql_metric_names_are_the_metrics_an_expression_reads() {
    let names = |e: &str| promql_metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (state, le) (rate(tracer_tcp_state_duration_seconds_bucket{instance=~"$instance", job="tracer_x"}[$__rate_interval])))"#
        ),
        ["tracer_tcp_state_duration_seconds_bucket"]
    );
    assert_eq!(
        names("tracer_a_total / ignoring(x) tracer_b_count + 1e3 + $tracer_var"),
        ["tracer_a_total", "tracer_b_count"]
    );
    assert!(names(r#"up{job=~"tracer_.*\"tracer_y"}"#).is_empty());
    let types: BTreeMap<String, String> = [
        ("tracer_h".to_string(), "histogram".to_string()),
        ("tracer_c_count".to_string(), "counter".to_string()),
    ]
    .into();
    assert_eq!(metric_family("tracer_h_bucket", &types), "tracer_h");
    assert_eq!(metric_family("tracer_h_count", &types), "tracer_h");
    assert_eq!(metric_family("tracer_c_count", &types), "tracer_c_count");
    assert_eq!(metric_family("tracer_g_sum", &types), "tracer_g_sum");
}

/// The dashboard only queries what the tracer exports: every `tracer_…`
/// name in a panel's (or template variable's) query is a series of a real
/// scrape after real traffic (closed by either side, reset, refused), and
/// every panel reads the `DS_PROMETHEUS` datasource variable so that the
/// dashboard imports into any Grafana.
#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let dashboard: Value = serde_json::from_str(DASHBOARD)
        .unwrap_or_else(|e| panic!("deploy/grafana/tracer.json is not JSON: {e}"));
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 39),
        "schemaVersion of a current Grafana (11 or later): {}",
        dashboard["schemaVersion"]
    );
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    assert_eq!(
        var("DS_PROMETHEUS").map(|v| (&v["type"], &v["query"])),
        Some((&Value::from("datasource"), &Value::from("prometheus"))),
        "a datasource variable DS_PROMETHEUS of type prometheus"
    );
    assert!(var("instance").is_some(), "an instance template variable");
    let uses_variable =
        |ds: &Value| ds["uid"] == "${DS_PROMETHEUS}" || ds.as_str() == Some("${DS_PROMETHEUS}");

    let panels = dashboard_panels(&dashboard);
    let mut queries: Vec<(String, String)> = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        if p["type"] == "row" {
            continue;
        }
        assert!(
            uses_variable(&p["datasource"]),
            "panel {title:?}: datasource is {}, not the ${{DS_PROMETHEUS}} variable",
            p["datasource"]
        );
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        for t in targets.unwrap_or_else(|| panic!("panel {title:?} has no targets")) {
            assert!(
                t["datasource"].is_null() || uses_variable(&t["datasource"]),
                "panel {title:?}: a target's datasource is {}",
                t["datasource"]
            );
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            queries.push((format!("panel {title:?}"), expr.to_string()));
        }
    }
    assert!(panels.len() >= 8, "{} panels", panels.len());
    promql_check(&queries);
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        queries.push((format!("variable {}", v["name"]), q.to_string()));
    }
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (place, expr) in &queries {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "{place}: no tracer_ metric in {expr:?}");
        for n in names {
            wanted.entry(n).or_default().push(place.clone());
        }
    }
    eprintln!(
        "dashboard: {} panels, {} queries, metrics {:?}",
        panels.len(),
        queries.len(),
        wanted.keys().collect::<Vec<_>>()
    );

    in_netns(move || {
        let (run, port, metrics) = metrics_tracer();
        // Every way a connection ends that the close and reset metrics tell
        // apart: closed by the client, by the server, reset by the client,
        // and refused (the kernel answers a SYN to a closed port with a RST).
        for ending in [
            Ending::ClientFirst,
            Ending::ServerFirst,
            Ending::ClientReset,
        ] {
            conversation(localhost(port), Duration::ZERO, ending);
        }
        let refused = TcpStream::connect(localhost(port));
        assert!(refused.is_err(), "nothing listens on {port} any more");

        // The histogram and the counters have a series once a transition
        // was counted; wait for all the names (or the deadline: the
        // assertion below then names the missing ones).
        let start = Instant::now();
        let (text, series) = loop {
            let (status, head, text) = http_get(metrics, "/metrics");
            assert_eq!(status, 200, "{head}");
            let series: std::collections::BTreeSet<String> =
                samples(&text).into_iter().map(|(n, _, _)| n).collect();
            if wanted.keys().all(|n| series.contains(n)) || start.elapsed() > DEADLINE {
                break (text, series);
            }
            thread::sleep(Duration::from_millis(50));
        };
        let types: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        let mut missing = Vec::new();
        for (name, places) in &wanted {
            let family = metric_family(name, &types);
            if !series.contains(name) {
                let hint = match types.get(name.as_str()).map(String::as_str) {
                    Some("histogram") => " (a histogram: query its _bucket, _sum or _count series)",
                    _ => "",
                };
                missing.push(format!("{name}{hint}, used by {}", places.join(", ")));
            } else if name.ends_with("_bucket")
                && types.get(&family).map(String::as_str) != Some("histogram")
            {
                missing.push(format!(
                    "{name} is not the _bucket series of a histogram, used by {}",
                    places.join(", ")
                ));
            } else {
                eprintln!("{name}: exported (family {family}, {})", types[&family]);
            }
        }
        assert!(
            missing.is_empty(),
            "the dashboard queries metrics the tracer does not export:\n  {}\nscrape:\n{text}",
            missing.join("\n  ")
        );
        run.signal(libc::SIGTERM);
        assert_eq!(run.finish().0, 0);
    });
}

/// Closes by class and resets, by value, in `/metrics` and in the summary:
/// two refused connects, an abort (one RST each way) and a client-first
/// close (the server's passive side; the client's record waits for its
/// timewait socket).
#[test]
fn closes_and_resets_are_counted_by_class() {
    in_netns(|| {
        let (port, refused) = (test_port(), test_port());
        let metrics = localhost(test_port());
        let (p, r, m) = (port.to_string(), refused.to_string(), metrics.to_string());
        let run = Running::start(&[
            "--metrics",
            &m,
            "--summary",
            "--output",
            "json",
            "--events",
            "none",
            "--close-wait",
            "0",
            "--port",
            &p,
            "--port",
            &r,
            "-v",
        ]);
        run.wait_attached();
        let scrape = scrape_until(metrics, "the close series", |t| {
            t.contains("tracer_tcp_closes_total")
        });
        for by in [
            "local",
            "peer",
            "both",
            "reset_received",
            "reset_sent",
            "abort",
            "refused",
            "timeout",
            "unknown",
        ] {
            assert_eq!(
                sum_of(&scrape, "tracer_tcp_closes_total", |l| l["by"] == by),
                0.0,
                "every class exported from the start, at 0: {by}"
            );
        }
        // Since 6.10 sent resets carry the kernel's reason: their series
        // come with their first reason; received ones are `none`.
        let reasons = kernel_at_least(6, 10);
        let from_start: &[&str] = if reasons {
            &["received"]
        } else {
            &["sent", "received"]
        };
        for d in from_start {
            assert!(
                samples(&scrape)
                    .iter()
                    .any(|(n, l, _)| n == "tracer_tcp_resets_total" && l["direction"] == *d),
                "{d}: {scrape}"
            );
        }
        for _ in 0..2 {
            assert!(TcpStream::connect(localhost(refused)).is_err());
        }
        conversation(localhost(port), Duration::ZERO, Ending::ClientReset);
        conversation(localhost(port), Duration::ZERO, Ending::ClientFirst);
        let want = [
            ("refused", 2.0),
            ("reset_sent", 1.0),
            ("reset_received", 1.0),
            ("peer", 1.0),
        ];
        let text = scrape_until(metrics, "the closes by class", |t| {
            want.iter()
                .all(|&(by, n)| sum_of(t, "tracer_tcp_closes_total", |l| l["by"] == by) == n)
        });
        let total = sum_of(&text, "tracer_tcp_closes_total", |_| true);
        assert_eq!(total, 5.0, "{text}");
        assert_eq!(
            sum_of(&text, "tracer_tcp_resets_total", |l| l["direction"]
                == "sent"),
            1.0
        );
        assert_eq!(
            sum_of(&text, "tracer_tcp_resets_total", |l| l["direction"]
                == "received"),
            3.0,
            "two refused connects and the abort: {text}"
        );
        for (_, labels, _) in samples(&text)
            .into_iter()
            .filter(|(n, _, _)| n == "tracer_tcp_resets_total")
        {
            match (reasons, labels["direction"].as_str()) {
                (false, _) => assert!(!labels.contains_key("reason"), "{text}"),
                (true, "received") => assert_eq!(labels["reason"], "none", "{text}"),
                // The abort's (SO_LINGER 0), named from the kernel's BTF.
                (true, _) => assert!(
                    !["none", "other", ""].contains(&labels["reason"].as_str()),
                    "{text}"
                ),
            }
        }
        promtool_check(&text);
        run.interrupt();
        let (code, out, _) = run.finish();
        assert_eq!(code, 0);
        let summary = of_type(&out, "summary");
        assert_eq!(summary.len(), 1, "{out:?}");
        assert_eq!(
            summary[0]["closes"],
            serde_json::json!({"peer": 1, "reset_received": 1, "reset_sent": 1, "refused": 2}),
            "{}",
            summary[0]
        );
        assert_eq!(
            summary[0]["rst"],
            serde_json::json!({"sent": 1, "received": 3})
        );
    });
}
