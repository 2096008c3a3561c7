//! The nginx load's client: wrk, one request per connection, and what one
//! run of it did.
//!
//! In: the `LoadConfig` (threads, connections), the running `Nginx` and
//! the run's length. `run`, on the namespace's thread: reads the
//! namespace's TCP counters, runs `wrk -t T -c C -d Ns -H 'Connection:
//! close'` with the bench's script (which keeps wrk and its last
//! connections alive after its report), waits for the connections to
//! settle, notes which of them hold unread data (`Tail`), lets wrk exit,
//! waits until every socket on nginx's port has closed, reads the counters
//! again. Out: a `LoadResult` whose rate is wrk's Requests/sec and whose
//! expected events come from the counters (`counters.rs`), or its errors.
//! wrk takes whole seconds: the run's length is rounded (at least 1 s).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::{
    counters::{nginx_expected, Tail, TcpCounters},
    env::{settle_in, HALF_WAY},
    load::{LoadConfig, LoadResult},
    nginx::{Nginx, WRK_DONE},
    subject::find_binary,
    SETTLE_MAX,
};

/// wrk's own timeout for a response (only counted by wrk).
const WRK_TIMEOUT: &str = "10s";
/// After the run's length, how long wrk may take to report.
const REPORT_GRACE: Duration = Duration::from_secs(30);
/// States of a socket on nginx's port that must be gone before the
/// counters are read after wrk's exit: all but LISTEN (0A), TIME_WAIT (06)
/// and FIN_WAIT2 (05: the timewait sockets' substate).
const NOT_CLOSED: &[&str] = &["01", "02", "03", "04", "08", "09", "0B"];

/// What wrk printed.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct WrkReport {
    /// Responses completed.
    pub requests: u64,
    pub duration: Duration,
    pub requests_per_s: f64,
    /// Socket errors: connect, read, write, timeout.
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    /// Non-2xx or 3xx responses.
    pub bad_status: u64,
}

impl WrkReport {
    /// wrk 4's report: `N requests in 3.07s, 7.27MB read`, `Socket
    /// errors: connect 0, read 0, write 0, timeout 0` (only if any),
    /// `Non-2xx or 3xx responses: N` (only if any), `Requests/sec: X`.
    pub(super) fn parse(text: &str) -> Result<WrkReport> {
        let mut r = WrkReport::default();
        let mut seen = (false, false);
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("Requests/sec:") {
                r.requests_per_s = rest.trim().parse().context("wrk's Requests/sec")?;
                seen.1 = true;
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                for part in rest.split(',') {
                    let mut kv = part.split_whitespace();
                    let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                        continue;
                    };
                    let v: u64 = v.parse().context("wrk's socket errors")?;
                    match k {
                        "connect" => r.connect_errors = v,
                        "read" => r.read_errors = v,
                        "write" => r.write_errors = v,
                        "timeout" => r.timeouts = v,
                        _ => {}
                    }
                }
            } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.bad_status = rest.trim().parse().context("wrk's non-2xx count")?;
            } else if let [n, "requests", "in", t, ..] =
                line.split_whitespace().collect::<Vec<_>>()[..]
            {
                r.requests = n.parse().context("wrk's request count")?;
                r.duration = parse_wrk_time(t.trim_end_matches(','))
                    .with_context(|| format!("wrk's run time {t:?}"))?;
                seen.0 = true;
            }
        }
        if !(seen.0 && seen.1) {
            bail!("no request count or Requests/sec in wrk's output");
        }
        Ok(r)
    }

    /// Errors that make the run fail (timeouts are only slow responses).
    pub(super) fn errors(&self) -> Vec<String> {
        let mut e = Vec::new();
        let socket = self.connect_errors + self.read_errors + self.write_errors;
        if socket > 0 {
            e.push(format!(
                "wrk: socket errors: connect {}, read {}, write {}",
                self.connect_errors, self.read_errors, self.write_errors
            ));
        }
        if self.bad_status > 0 {
            e.push(format!("wrk: {} non-2xx or 3xx responses", self.bad_status));
        }
        e
    }
}

/// wrk's times: `812.34us`, `3.07s`, `1.00m`, `2.00h`.
fn parse_wrk_time(t: &str) -> Option<Duration> {
    let split = t.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().ok()?;
    let s = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(s))
}

/// wrk's `-d`: whole seconds, at least one.
pub(super) fn wrk_seconds(d: Duration) -> u64 {
    (d.as_secs_f64().round() as u64).max(1)
}

/// One run of wrk against `nginx`, from the namespace's thread.
pub(super) fn run(cfg: &LoadConfig, nginx: &Nginx, d: Duration) -> LoadResult {
    match run_counted(cfg, nginx, d) {
        Ok(r) => r,
        Err(e) => LoadResult {
            errors: vec![format!("nginx load: {e:#}")],
            ..Default::default()
        },
    }
}

fn run_counted(cfg: &LoadConfig, nginx: &Nginx, d: Duration) -> Result<LoadResult> {
    let bin = find_binary("wrk")
        .context("wrk is not installed (Debian package wrk; cargo xtask bench installs it)")?;
    let here = "/proc/thread-self/net";
    let ports = [nginx.port];
    let before = TcpCounters::read_here()?;
    let secs = wrk_seconds(d);
    let mut child = Command::new(bin)
        .args(["-t", &cfg.threads.to_string()])
        .args(["-c", &cfg.connections.to_string()])
        .args(["-d", &format!("{secs}s")])
        .args(["--timeout", WRK_TIMEOUT])
        .arg("-s")
        .arg(nginx.wrk_script_path())
        .args(["-H", "Connection: close"])
        .arg(&nginx.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting wrk")?;
    let lines = read_lines(&mut child);
    let deadline = Instant::now() + Duration::from_secs(secs) + REPORT_GRACE;
    let mut out = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.trim() == WRK_DONE => break,
            Ok(line) => {
                out += &line;
                out.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("wrk did not report within {secs} s + {REPORT_GRACE:?}");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                bail!(
                    "wrk exited ({status}) before its report: {} {}",
                    out.trim(),
                    stderr_of(&mut child)
                );
            }
        }
    }
    let report = WrkReport::parse(&out);
    // wrk's script holds its last connections: let them settle, then see
    // which hold data they will never read.
    let (held_settle, held_pending) = settle_in(here, &ports, HALF_WAY, SETTLE_MAX);
    let mut tail = Tail::default();
    for f in ["tcp", "tcp6"] {
        if let Ok(t) = std::fs::read_to_string(format!("{here}/{f}")) {
            tail.add(&t, nginx.port);
        }
    }
    drop(child.stdin.take());
    let status = wait_for(&mut child, Duration::from_secs(10))?;
    let (closed_settle, left_open) = settle_in(here, &ports, NOT_CLOSED, SETTLE_MAX);
    let after = TcpCounters::read_here()?;
    let delta = before.delta(&after);
    let report = report?;
    let mut errors = report.errors();
    if !status.success() {
        errors.push(format!(
            "wrk exited with {status}: {}",
            stderr_of(&mut child)
        ));
    }
    if held_pending > 0 || left_open > 0 {
        errors.push(format!(
            "nginx load: sockets on port {} still open {:?} after wrk ({held_pending} half-way while held, {left_open} not closed after its exit)",
            nginx.port, SETTLE_MAX
        ));
    }
    let expected = nginx_expected(&delta, &tail);
    if let Err(e) = &expected {
        errors.push(format!("nginx load: {e}"));
    }
    let expected = expected.ok();
    Ok(LoadResult {
        connections: delta.active_opens,
        elapsed: report.duration,
        rate: Some(report.requests_per_s),
        expected_transitions: expected.map_or(0, |e| e.transitions),
        expected_closed: expected.map_or(0, |e| e.closed),
        errors,
        detail: Some(json!({
            "wrk": {
                "requests": report.requests,
                "duration_s": report.duration.as_secs_f64(),
                "requests_per_s": report.requests_per_s,
                "socket_errors": {
                    "connect": report.connect_errors,
                    "read": report.read_errors,
                    "write": report.write_errors,
                    "timeout": report.timeouts,
                },
                "non_2xx_3xx": report.bad_status,
                "exit": status.to_string(),
            },
            "tcp_counters": delta.to_json(),
            "left_open_at_end": tail.to_json(),
            "held_settle_s": held_settle.as_secs_f64(),
            "closed_settle_s": closed_settle.as_secs_f64(),
        })),
        ..Default::default()
    })
}

/// The child's stdout, line by line, on a thread of its own (so that
/// waiting for a line can time out).
fn read_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s.trim().to_string()
}

/// Waits for the child, killing it after `max`.
fn wait_for(child: &mut Child, max: Duration) -> Result<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if t0.elapsed() > max {
            let _ = child.kill();
            let s = child.wait()?;
            bail!("wrk did not exit within {max:?} of its stdin closing ({s})");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 3s test @ http://127.0.0.1:800/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.34ms    2.86ms  25.41ms   74.41%
    Req/Sec     4.82k     1.31k    8.79k    78.33%
  29301 requests in 3.07s, 7.27MB read
Requests/sec:   9555.95
Transfer/sec:      2.37MB
";

    #[test]
    fn parses_wrks_report() {
        let r = WrkReport::parse(REPORT).unwrap();
        assert_eq!(r.requests, 29301);
        assert_eq!(r.duration, Duration::from_millis(3070));
        assert_eq!(r.requests_per_s, 9555.95);
        assert!(r.errors().is_empty());
        let bad = REPORT.replace(
            "Requests/sec:",
            "  Socket errors: connect 1, read 2, write 0, timeout 7\n  Non-2xx or 3xx responses: 5\nRequests/sec:",
        );
        let r = WrkReport::parse(&bad).unwrap();
        assert_eq!(
            (
                r.connect_errors,
                r.read_errors,
                r.write_errors,
                r.timeouts,
                r.bad_status
            ),
            (1, 2, 0, 7, 5)
        );
        assert_eq!(r.errors().len(), 2);
        assert!(WrkReport::parse("unable to connect to 127.0.0.1:800 Connection refused").is_err());
    }

    #[test]
    fn wrk_times_and_seconds() {
        assert_eq!(parse_wrk_time("1.00m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_wrk_time("812.00us"), Some(Duration::from_micros(812)));
        assert_eq!(parse_wrk_time("3.07s"), Some(Duration::from_millis(3070)));
        assert_eq!(parse_wrk_time("3"), None);
        assert_eq!(wrk_seconds(Duration::from_millis(400)), 1);
        assert_eq!(wrk_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(wrk_seconds(Duration::from_secs(5)), 5);
    }
}
