//! The tracer under soak: started with its JSON Lines on a pipe, read by
//! a thread that counts the records by type (and connections by how they
//! closed) and keeps the final `stats` record, optionally copying every
//! line to a file; stopped with SIGINT.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the tracer printed.
#[derive(Debug, Default)]
pub(super) struct Sink {
    pub lines: u64,
    pub bytes: u64,
    /// Records by `type`.
    pub by_type: BTreeMap<String, u64>,
    /// Connection records by `close.by`.
    pub close_by: BTreeMap<String, u64>,
    /// Connection records by `time_wait_end` (those that have one).
    pub time_wait_end: BTreeMap<String, u64>,
    /// Lines that are no JSON record.
    pub other: u64,
    /// The last `stats` record.
    pub stats: Option<Value>,
}

impl Sink {
    /// Counts one line of output.
    pub(super) fn line(&mut self, line: &str) {
        self.lines += 1;
        self.bytes += line.len() as u64 + 1;
        let Some(kind) = string_field(line, "type") else {
            self.other += 1;
            return;
        };
        *self.by_type.entry(kind.to_string()).or_default() += 1;
        match kind {
            "connection" => {
                if let Some(by) = line
                    .find("\"close\":{")
                    .and_then(|i| string_field(&line[i..], "by"))
                {
                    *self.close_by.entry(by.to_string()).or_default() += 1;
                }
                if let Some(end) = string_field(line, "time_wait_end") {
                    *self.time_wait_end.entry(end.to_string()).or_default() += 1;
                }
            }
            "stats" => self.stats = serde_json::from_str(line).ok(),
            _ => {}
        }
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "lines": self.lines,
            "bytes": self.bytes,
            "by_type": self.by_type,
            "connections_by_close": self.close_by,
            "time_wait_end": self.time_wait_end,
            "other_lines": self.other,
        })
    }
}

/// The first `"key":"value"` string value in a JSON line (no escapes in
/// the values looked up).
pub(super) fn string_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

pub(super) struct Tracer {
    child: Child,
    pub pid: i32,
    stderr: PathBuf,
    sink: Option<thread::JoinHandle<Sink>>,
    /// Spawn to its "attached" line.
    pub start: Duration,
}

/// Starts `bin args…` and returns once it says "attached" on stderr.
pub(super) fn start(
    bin: &Path,
    args: &[String],
    out_dir: &Path,
    keep_output: bool,
) -> Result<Tracer> {
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stderr = out_dir.join("tracer.err");
    let copy = keep_output.then(|| out_dir.join("tracer.out"));
    let spawned = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().expect("piped");
    // The largest pipe an unprivileged process may ask for (1 MiB by
    // default), so a burst of records waits in the pipe rather than in
    // the tracer's own buffer while this side gets a CPU.
    let max = fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_int>().ok())
        .unwrap_or(1 << 20);
    // SAFETY: fcntl on the pipe we hold; failure leaves its size as it was.
    unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, max) };
    let sink = thread::Builder::new()
        .name("soak-sink".into())
        .spawn(move || read_all(stdout, copy))
        .context("spawning the tracer's reader")?;
    let mut t = Tracer {
        child,
        pid,
        stderr,
        sink: Some(sink),
        start: Duration::ZERO,
    };
    loop {
        if let Some(status) = t.child.try_wait()? {
            bail!(
                "the tracer exited before it attached ({status}): {}",
                t.last_stderr_line()
            );
        }
        if fs::read_to_string(&t.stderr).is_ok_and(|s| s.contains("attached")) {
            t.start = spawned.elapsed();
            return Ok(t);
        }
        if spawned.elapsed() > READY_TIMEOUT {
            let _ = t.child.kill();
            let _ = t.child.wait();
            bail!(
                "the tracer did not attach within {READY_TIMEOUT:?}: {}",
                t.last_stderr_line()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn read_all(stdout: ChildStdout, copy: Option<PathBuf>) -> Sink {
    let mut sink = Sink::default();
    let mut out = copy.and_then(|p| File::create(p).ok()).map(BufWriter::new);
    let mut r = BufReader::with_capacity(1 << 20, stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Some(o) = out.as_mut() {
                    let _ = o.write_all(line.as_bytes());
                }
                sink.line(line.trim_end_matches('\n'));
            }
        }
    }
    if let Some(mut o) = out {
        let _ = o.flush();
    }
    sink
}

/// How the tracer ended.
pub(super) struct Stopped {
    pub sink: Sink,
    /// SIGINT to exit.
    pub stop: Duration,
    pub exit: String,
    pub stderr_tail: Vec<String>,
}

impl Tracer {
    /// Err with the last stderr line if it has exited.
    pub(super) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the tracer exited during the soak ({status}): {}",
                self.last_stderr_line()
            );
        }
        Ok(())
    }

    pub(super) fn last_stderr_line(&self) -> String {
        tail(&self.stderr, 1)
            .pop()
            .unwrap_or_else(|| "(nothing on stderr)".into())
    }

    /// SIGINT, then waits for its exit and its last record.
    pub(super) fn stop(mut self) -> Result<Stopped> {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.pid, libc::SIGINT) };
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if t0.elapsed() > STOP_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the tracer did not exit within {STOP_TIMEOUT:?} of SIGINT");
            }
            thread::sleep(Duration::from_millis(5));
        };
        let stop = t0.elapsed();
        let sink = self
            .sink
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("the tracer's reader panicked"))?;
        let stderr_tail = tail(&self.stderr, 8);
        if !status.success() {
            bail!(
                "the tracer exited with {status} after SIGINT: {}",
                stderr_tail
                    .last()
                    .map_or("(nothing on stderr)", |s| s.as_str())
            );
        }
        Ok(Stopped {
            sink,
            stop,
            exit: status.to_string(),
            stderr_tail,
        })
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Only if stop() did not reap it (an error on the way).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_counted_by_type_and_close() {
        let mut s = Sink::default();
        s.line(r#"{"type":"connection","sock":"0x1","time_wait_end":null,"close":{"by":"reset_sent","first_fin":null}}"#);
        s.line(r#"{"type":"connection","sock":"0x2","time_wait_end":"expired","close":{"by":"local","first_fin":"local"}}"#);
        s.line(r#"{"type":"close_wait","sock":"0x3","close":{"by":"unfinished"}}"#);
        s.line(r#"{"type":"summary","group":null}"#);
        s.line(r#"{"type":"stats","events":12,"lost":0}"#);
        s.line("garbage");
        assert_eq!(s.lines, 6);
        assert_eq!(s.by_type["connection"], 2);
        assert_eq!(s.by_type["close_wait"], 1);
        assert_eq!(s.close_by["reset_sent"], 1);
        assert_eq!(s.close_by["local"], 1);
        assert_eq!(s.close_by.get("unfinished"), None);
        assert_eq!(s.time_wait_end["expired"], 1);
        assert_eq!(s.time_wait_end.len(), 1);
        assert_eq!(s.other, 1);
        assert_eq!(s.stats.as_ref().unwrap()["events"], 12);
    }

    #[test]
    fn string_fields() {
        assert_eq!(string_field(r#"{"type":"stats"}"#, "type"), Some("stats"));
        assert_eq!(string_field(r#"{"a":1}"#, "type"), None);
        assert_eq!(string_field(r#"{"by":null}"#, "by"), None);
    }
}
