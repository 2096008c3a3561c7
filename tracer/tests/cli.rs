//! End-to-end tests of the built `tracer` binary: real program, real
//! traffic in a network namespace, output parsed as a user's script would.
//! Error paths are checked for one clear line, the right exit code and no
//! backtrace, with RUST_BACKTRACE=1 set.

mod common;

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

#[test]
fn json_end_to_end_stops_on_sigint() {
    in_netns(|| {
        let port = test_port();
        let p = port.to_string();
        let run = Running::start(&["--output", "json", "--events", "all", "--port", &p, "-v"]);
        run.wait_attached();
        conversation(
            SocketAddr::new("127.0.0.1".parse().unwrap(), port),
            Duration::from_millis(20),
            Ending::ClientFirst,
        );
        let mut got = Vec::new();
        // The server's record (a passive close) comes at once; the client,
        // which closed first, goes on in a timewait socket: its TIME_WAIT
        // entry comes from the first sock_diag poll, its record only when
        // that socket is gone (60 s, after this test).
        run.read_until(
            &mut got,
            "the server's record and the client's TIME_WAIT",
            |l| {
                l.iter().any(|l| l.contains(r#""type":"connection""#))
                    && l.iter().any(|l| l.contains(r#""new":"TIME_WAIT""#))
            },
        );
        run.interrupt();
        let (code, rest, _err) = run.finish();
        assert_eq!(code, 0);
        got.extend(rest);

        let all = of_type(&got, "transition");
        let transitions: Vec<&Value> = all.iter().filter(|t| t["source"] == "tracepoint").collect();
        assert_eq!(transitions.len(), 12, "{got:#?}");
        let derived: Vec<&Value> = all.iter().filter(|t| t["source"] != "tracepoint").collect();
        assert_eq!(derived.len(), 1, "{got:#?}");
        let tw = derived[0];
        assert_eq!(
            (
                tw["old"].as_str(),
                tw["new"].as_str(),
                tw["source"].as_str()
            ),
            (Some("FIN_WAIT2"), Some("TIME_WAIT"), Some("sock_diag"))
        );
        assert_eq!(tw["rport"], port, "the client's");
        assert_eq!(tw["pid"], std::process::id(), "the owner of the client");
        assert!(
            tw["task_pid"].is_null(),
            "no kernel task for a derived record"
        );
        for t in &transitions {
            for key in [
                "time", "sock", "comm", "family", "laddr", "raddr", "old", "new",
            ] {
                assert!(t[key].is_string(), "{key} in {t}");
            }
            for key in ["mono_ns", "pid", "lport", "rport"] {
                assert!(t[key].is_u64(), "{key} in {t}");
            }
            assert!(t["old_state_ns"].is_u64() || t["old_state_ns"].is_null());
            assert!(t["sock"].as_str().unwrap().starts_with("0x"));
            assert!(t["time"].as_str().unwrap().ends_with('Z'));
            assert_eq!(t["family"], "ipv4");
            assert!(t["lport"] == port || t["rport"] == port);
        }
        let connections = of_type(&got, "connection");
        for c in &connections {
            let sum: u64 = c["states"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum();
            assert_eq!(sum, c["duration_ns"].as_u64().unwrap(), "{c}");
            // Complete, unless cut short by the tracer's stop.
            assert_eq!(c["complete"] == true, c["at_exit"] == false, "{c}");
            assert!(c["start"].is_string());
        }
        // The server's, and the client's written at exit, in its TIME_WAIT.
        assert_eq!(connections.len(), 2, "{got:#?}");
        let server = connections.iter().find(|c| c["lport"] == port).unwrap();
        let client = connections.iter().find(|c| c["rport"] == port).unwrap();
        assert_eq!(client["time_wait_end"], "tracing_stopped", "{client}");
        assert_eq!(client["close"]["by"], "local", "{client}");
        assert_eq!(server["lport"], port);
        assert!(server["states"]["ESTABLISHED"].as_u64().unwrap() >= 20_000_000);
        assert!(
            server["time_wait_end"].is_null(),
            "a passive close has no timewait"
        );
        let stats = json(got.last().unwrap());
        assert_eq!(stats["type"], "stats", "the last line is the stats record");
        assert_eq!(stats["events"], 12);
        assert_eq!(stats["lost"], 0);
        assert_eq!(
            stats["timewait_pending"], 1,
            "the client, still in TIME_WAIT"
        );
        assert_eq!(
            stats["kernel"]["ringbuf"], true,
            "capabilities in the stats record"
        );
    });
}

#[test]
fn table_output_and_stop_after_duration() {
    in_netns(|| {
        let port = test_port();
        let p = port.to_string();
        let run = Running::start(&["--port", &p, "--duration", "3s", "--events", "all", "-v"]);
        run.wait_attached();
        conversation(
            SocketAddr::new("::1".parse().unwrap(), port),
            Duration::ZERO,
            Ending::ServerFirst,
        );
        let started = Instant::now();
        let (code, out, err) = run.finish();
        assert_eq!(code, 0);
        assert!(started.elapsed() < Duration::from_secs(3) + Duration::from_secs(2));
        assert!(out[0].starts_with("TIME(UTC)"), "{out:#?}");
        let transitions: Vec<&String> = out
            .iter()
            .filter(|l| l.contains(" -> ") && !l.contains("(sock_diag)"))
            .collect();
        assert_eq!(transitions.len(), 12, "{out:#?}");
        assert!(out
            .iter()
            .any(|l| l.contains("CLOSE -> SYN_SENT") && l.contains(&format!("[::1]:{port}"))));
        // The client's (a passive close), and the server's, written at exit
        // in its TIME_WAIT; the server's close line came at its entry into
        // TIME_WAIT.
        assert_eq!(
            out.iter().filter(|l| l.contains("CONNECTION")).count(),
            2,
            "{out:#?}"
        );
        assert!(
            out.iter()
                .any(|l| l.contains(" CLOSE local FIN") && l.contains("> TIME_WAIT")),
            "{out:#?}"
        );
        let stats = err.last().expect("stats line on stderr");
        assert!(stats.starts_with("tracer: 12 events, 0 lost"), "{err:#?}");
        assert!(
            stats.ends_with("1 waiting for their timewait socket at exit"),
            "{err:#?}"
        );
    });
}

/// The command runs as nobody (needs root to switch).
fn as_nobody(cmd: &mut Command) -> &mut Command {
    // SAFETY: setgid and setuid are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn run_to_end(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run tracer")
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

#[test]
fn usage_errors_are_clap_errors() {
    let out = run_to_end(tracer().args(["--port", "65536"]));
    assert_one_line_error(&out, 2, "out of range");
    let out = run_to_end(tracer().args(["--output", "xml"]));
    assert_one_line_error(&out, 2, "invalid value");
    let out = run_to_end(tracer().args(["--duration", "soon"]));
    assert_one_line_error(&out, 2, "--duration");
    for (args, needle) in [
        (&["--laddr", "10.0.0.0/40"][..], "not an address or CIDR"),
        (&["--state", "OPEN"], "unknown TCP state"),
        (
            &["--netns", "/nonexistent/ns"],
            "cannot open network namespace",
        ),
        (&["--comm", "a-name-longer-than-fifteen"], "1 to 15 bytes"),
        (&["--rport", "0"], "out of range"),
        (&["--port-pressure", "101"], "not a percentage"),
        (&["--port-pressure", "half"], "not a percentage"),
        (
            &["--events", "bogus"],
            "possible values: transitions, connections, closes, all, none",
        ),
    ] {
        let out = run_to_end(tracer().args(args));
        assert_one_line_error(&out, 2, needle);
    }
}

/// The completions and the man page come from the binary itself, without
/// privileges; bash parses the script it prints.
#[test]
fn completions_and_man_page_need_no_privileges() {
    let unprivileged = |args: &[&str]| run_to_end(as_nobody(&mut tracer()).args(args));
    let out = unprivileged(&["completions", "bash"]);
    assert!(out.status.success(), "{out:?}");
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("--close-wait"));
    // The guests' busybox has no bash.
    if !in_guest() {
        let check = Command::new("bash")
            .args(["-n", "-c", &script])
            .output()
            .expect("bash");
        assert!(check.status.success(), "{check:?}");
    }
    for shell in ["zsh", "fish"] {
        let out = unprivileged(&["completions", shell]);
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{shell}: {out:?}"
        );
    }
    let out = unprivileged(&["man"]);
    assert!(out.status.success(), "{out:?}");
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".SH RECORDS"), "{page}");

    let out = run_to_end(tracer().args(["completions", "tcsh"]));
    assert_one_line_error(&out, 2, "invalid value");
}

#[test]
fn without_privileges_one_line_names_the_remedy() {
    require_root();
    let mut cmd = tracer();
    let out = run_to_end(as_nobody(&mut cmd).args(["--duration", "1s"]));
    assert_one_line_error(&out, 1, "sudo");
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

#[test]
fn kernel_without_the_tracepoint_is_one_clear_line() {
    require_root();
    // Show the tracer a tracefs without the tracepoint: an empty tmpfs over
    // it, in a private mount namespace of the child only.
    let mut cmd = tracer();
    hide_with_tmpfs(
        &mut cmd,
        &["/sys/kernel/tracing", "/sys/kernel/debug"],
        &["/sys/kernel/tracing/events"],
    );
    let out = run_to_end(cmd.args(["--duration", "1s"]));
    assert_one_line_error(&out, 1, "no sock:inet_sock_set_state tracepoint");
}

/// `--attach` picks the kernel program; `-v` and the stats record say
/// which ran, and both paths deliver the same conversation.
#[test]
fn attach_picks_the_kernel_path_and_says_so() {
    in_netns(|| {
        for (attach, path, log) in [
            ("tp-btf", "tp_btf", "tp_btf/inet_sock_set_state"),
            (
                "tracepoint",
                "tracepoint",
                "tracepoint sock:inet_sock_set_state",
            ),
        ] {
            let port = test_port();
            let p = port.to_string();
            let run = Running::start(&[
                "--output", "json", "--events", "all", "--port", &p, "--attach", attach, "-v",
            ]);
            let mut said = String::new();
            let start = Instant::now();
            while !said.contains("attached") {
                assert!(start.elapsed() < DEADLINE, "{attach}: not attached: {said}");
                if let Ok(line) = run.stderr.recv_timeout(Duration::from_millis(100)) {
                    said.push_str(&line);
                    said.push('\n');
                }
            }
            assert!(said.contains(log), "{attach}: -v says {said}");
            conversation(
                SocketAddr::new("127.0.0.1".parse().unwrap(), port),
                Duration::ZERO,
                Ending::ServerFirst,
            );
            let mut got = Vec::new();
            run.read_until(&mut got, "the client's record, the listener's close", |l| {
                l.iter().any(|l| l.contains(r#""type":"connection""#))
                    && l.iter()
                        .any(|l| l.contains(r#""old":"LISTEN","new":"CLOSE""#))
            });
            run.interrupt();
            let (code, rest, err) = run.finish();
            assert_eq!(code, 0, "{err:#?}");
            got.extend(rest);
            let stats = json(got.last().unwrap());
            assert_eq!(stats["kernel"]["transitions"], path, "{attach}");
            assert_eq!(stats["skipped"], 0);
            let from_kernel = of_type(&got, "transition")
                .iter()
                .filter(|t| t["source"] == "tracepoint")
                .count();
            assert_eq!(from_kernel, 12, "{attach}: {got:#?}");
        }
    });
}

/// The records' schema check is live: a real record passes, the same
/// record with a field the schema does not list, or of an unknown type,
/// fails (no root or kernel needed).
#[test]
fn records_outside_the_schema_fail_the_tests() {
    // A close_wait alert the tracer printed (docs/records.md).
    const RECORD: &str = r#"{"type":"close_wait","sock":"0xffff8881c2cfd340","pid":20957,"comm":"python3","uid":0,"cgroup":"/","container":null,"pod":null,"family":"ipv4","laddr":"127.0.0.1","lport":18081,"raddr":"127.0.0.1","rport":45848,"netns":4026531833,"first_seen":"2026-12-03T13:42:34.552410921Z","complete":true,"from_snapshot":false,"state":"CLOSE_WAIT","since":"2026-12-03T13:42:34.752811174Z","age_ns":2299433670,"owners":[{"pid":20957,"comm":"python3","fd":5}],"at_exit":false,"close":{"by":"unfinished","first_fin":"peer","fin_to_close_ns":null,"handshake":["ESTABLISHED>CLOSE_WAIT"],"handshake_at_ns":[0],"rst":{"sent":0,"received":0}}}"#;
    assert_eq!(json(RECORD)["type"], "close_wait");
    let refused = |line: String| {
        let panic = std::panic::catch_unwind(|| json(&line)).expect_err(&line);
        let why = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            why.contains("does not match docs/records.schema.json"),
            "{why}"
        );
    };
    refused(RECORD.replacen(r#""at_exit":false"#, r#""at_exit":false,"new_field":1"#, 1));
    refused(RECORD.replacen(r#""type":"close_wait""#, r#""type":"closewait""#, 1));
    refused(RECORD.replacen(r#""age_ns":2299433670"#, r#""age_ns":"2.3s""#, 1));
}
