//! The things measured against the untraced baseline: the tracer in each
//! output mode, the floor (a program on the same tracepoint that only
//! counts), and libbpf-tools' tcpstates and tcplife when installed. Each
//! is started before the load and stopped after it; what it cost is read
//! from /proc, from the kernel's statistics of the eBPF programs it holds,
//! and from what it printed.
//!
//! The floor is bpftrace's `tracepoint:sock:inet_sock_set_state { @n =
//! count(); }` (Debian's bpftrace): one map update per transition, no
//! output until it exits, so its kernel ns/ev is about the least any
//! tracer of this tracepoint can cost. Like the peers it has no filter:
//! it counts every transition on the machine.

use std::{
    fs::{self, File},
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    procfs::{self, ProgStats},
    pty, verify,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Subject {
    Baseline,
    /// `--events transitions`: every transition as JSON to a file.
    TracerJson,
    /// `--events connections`: one record per connection.
    TracerConnections,
    /// `--events none --summary`: only the aggregates (the per-state
    /// summary at exit) and the final stats.
    TracerNone,
    /// `tracer top` drawing on a pseudo-terminal (120 x 40) that the bench
    /// reads and throws away: the live view's own cost.
    TracerTop,
    /// The same three modes run by the binary of `--compare-tracer` (an
    /// earlier build), for before/after numbers in one run.
    OtherJson,
    OtherConnections,
    OtherNone,
    /// bpftrace counting every transition in a map: the least a program
    /// on this tracepoint costs.
    Floor,
    Tcpstates,
    Tcplife,
}

impl Subject {
    pub(crate) const ALL: [Subject; 8] = [
        Subject::Baseline,
        Subject::TracerJson,
        Subject::TracerConnections,
        Subject::TracerNone,
        Subject::TracerTop,
        Subject::Floor,
        Subject::Tcpstates,
        Subject::Tcplife,
    ];

    /// The `--compare-tracer` twin of a tracer subject.
    pub(crate) fn other(self) -> Option<Subject> {
        match self {
            Subject::TracerJson => Some(Subject::OtherJson),
            Subject::TracerConnections => Some(Subject::OtherConnections),
            Subject::TracerNone => Some(Subject::OtherNone),
            _ => None,
        }
    }

    /// Run by the `--compare-tracer` binary.
    pub(crate) fn is_other(self) -> bool {
        matches!(
            self,
            Subject::OtherJson | Subject::OtherConnections | Subject::OtherNone
        )
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Subject::Baseline => "baseline",
            Subject::TracerJson => "tracer json>file",
            Subject::TracerConnections => "tracer connections",
            Subject::TracerNone => "tracer none+summary",
            Subject::TracerTop => "tracer top (pty)",
            Subject::OtherJson => "other json>file",
            Subject::OtherConnections => "other connections",
            Subject::OtherNone => "other none+summary",
            Subject::Floor => "floor (bpftrace count)",
            Subject::Tcpstates => "libbpf tcpstates",
            Subject::Tcplife => "libbpf tcplife",
        }
    }

    /// Short key for the CLI (`--only`) and file names.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Subject::Baseline => "baseline",
            Subject::TracerJson => "tracer-json",
            Subject::TracerConnections => "tracer-connections",
            Subject::TracerNone => "tracer-none",
            Subject::TracerTop => "tracer-top",
            Subject::OtherJson => "other-json",
            Subject::OtherConnections => "other-connections",
            Subject::OtherNone => "other-none",
            Subject::Floor => "floor",
            Subject::Tcpstates => "tcpstates",
            Subject::Tcplife => "tcplife",
        }
    }

    pub(crate) fn from_key(key: &str) -> Option<Subject> {
        Subject::ALL.into_iter().find(|s| s.key() == key)
    }

    pub(crate) fn is_tracer(self) -> bool {
        matches!(
            self,
            Subject::TracerJson
                | Subject::TracerConnections
                | Subject::TracerNone
                | Subject::TracerTop
        ) || self.is_other()
    }

    pub(crate) fn is_peer(self) -> bool {
        matches!(self, Subject::Tcpstates | Subject::Tcplife)
    }

    /// Subjects run from a Debian package's binary (found with
    /// `find_tool`): the peers and the floor.
    pub(crate) fn is_tool(self) -> bool {
        self.is_peer() || self == Subject::Floor
    }

    /// The Debian package of a tool subject's binary.
    pub(crate) fn package(self) -> &'static str {
        match self {
            Subject::Floor => "bpftrace",
            _ => "libbpf-tools",
        }
    }

    fn tracer_events(self) -> &'static str {
        match self {
            Subject::TracerConnections | Subject::OtherConnections => "connections",
            Subject::TracerNone | Subject::OtherNone => "none",
            _ => "transitions",
        }
    }

    fn tool_binary(self) -> &'static str {
        match self {
            Subject::Tcplife => "tcplife",
            Subject::Floor => "bpftrace",
            _ => "tcpstates",
        }
    }
}

/// The floor's program: count every transition, print nothing until the
/// end (bpftrace prints `@n: N` when it exits).
pub(super) const FLOOR_PROGRAM: &str = "tracepoint:sock:inet_sock_set_state { @n = count(); }";

/// Where a tool subject's binary is (Debian puts libbpf-tools in
/// /usr/sbin, bpftrace in /usr/bin).
pub(super) fn find_tool(s: Subject) -> Option<PathBuf> {
    find_binary(s.tool_binary())
}

/// A program in PATH or in the sbin directories (root's PATH may lack
/// them).
pub(super) fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

pub(super) struct Ctx {
    pub tracer: PathBuf,
    /// `--compare-tracer`: another build, run as the `other` subjects.
    pub other_tracer: Option<PathBuf>,
    pub out_dir: PathBuf,
    /// The tracer's `--port` filter: the load's server ports.
    pub ports: Vec<u16>,
    /// Keep the tracer's JSON output files (they are large).
    pub keep_output: bool,
    /// Appended to every tracer subject's arguments.
    pub extra_args: Vec<String>,
}

pub(super) struct Running {
    subject: Subject,
    pid: i32,
    spawned: Instant,
    /// Spawn to ready (tracer: its "attached" line; peers: program
    /// attached and event buffer open).
    pub start: Duration,
    cpu_at_ready: Duration,
    rss_idle_kib: Option<u64>,
    rss_maps_kib: Option<u64>,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Spawn to the first byte on its stdout, if seen while waiting.
    first_output: Option<Duration>,
    /// `tracer top`: the thread that reads its terminal (it writes the
    /// byte count to `stdout` when the terminal closes).
    screen: Option<thread::JoinHandle<()>>,
    /// `tracer top`: its eBPF links so far, and since when that many.
    links: (usize, Instant),
}

#[derive(Clone, Debug, Default)]
pub(super) struct Measured {
    pub start: Duration,
    pub cpu_startup: Duration,
    /// CPU time after it was ready, up to its exit.
    pub cpu_run: Duration,
    pub rss_idle_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    /// Of its RSS: the eBPF maps it has mapped (the kernel's ring buffer),
    /// when it was ready.
    pub rss_maps_kib: Option<u64>,
    pub progs: Vec<ProgStats>,
    /// Events it delivered (tracer: its stats; peers: lines printed).
    pub delivered: Option<u64>,
    /// Events it says it lost.
    pub lost: Option<u64>,
    /// The tracer's final stats record.
    pub tracer_stats: Option<Value>,
    /// Records checked one by one (tracer JSON to a file).
    pub durations: Option<verify::DurationCheck>,
    pub output_bytes: u64,
    /// SIGINT to its exit (reaped).
    pub stop: Duration,
    pub exit: String,
    pub stderr_tail: Vec<String>,
}

impl Measured {
    pub(super) fn kernel_run_time_ns(&self) -> u64 {
        self.progs.iter().map(|p| p.run_time_ns).sum()
    }
    pub(super) fn kernel_run_cnt(&self) -> u64 {
        self.progs.iter().map(|p| p.run_cnt).sum()
    }
    /// Transitions skipped because a program was already running on the
    /// CPU. The tracer's own count where it gives one: on its BTF path a
    /// second program copy handles what the first misses, so the
    /// programs' summed `recursion_misses` would overstate the loss.
    pub(super) fn recursion_misses(&self) -> u64 {
        self.tracer_stat("skipped")
            .unwrap_or_else(|| self.progs.iter().map(|p| p.recursion_misses).sum())
    }

    /// Transitions the tracer still held in the kernel at its exit
    /// (batched, of connections mid-handshake); 0 for others.
    pub(super) fn pending(&self) -> u64 {
        self.tracer_stat("pending").unwrap_or(0)
    }

    fn tracer_stat(&self, key: &str) -> Option<u64> {
        self.tracer_stats.as_ref()?.get(key)?.as_u64()
    }

    /// Wrong or missing durations: checked record by record (true), or
    /// the tracer's own counters of stale/missing timings (false).
    pub(super) fn bad_durations(&self) -> Option<(u64, bool)> {
        if let Some(d) = &self.durations {
            return Some((d.bad(), true));
        }
        let s = self.tracer_stats.as_ref()?;
        let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some((n("timing_stale") + n("timing_map_full"), false))
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "start_s": self.start.as_secs_f64(),
            "cpu_startup_s": self.cpu_startup.as_secs_f64(),
            "cpu_run_s": self.cpu_run.as_secs_f64(),
            "rss_idle_kib": self.rss_idle_kib,
            "rss_peak_kib": self.rss_peak_kib,
            "rss_maps_kib": self.rss_maps_kib,
            "programs": self.progs.iter().map(ProgStats::to_json).collect::<Vec<_>>(),
            "kernel_run_time_ns": self.kernel_run_time_ns(),
            "kernel_run_cnt": self.kernel_run_cnt(),
            "recursion_misses": self.recursion_misses(),
            "delivered": self.delivered,
            "lost": self.lost,
            "tracer_stats": self.tracer_stats,
            "durations": self.durations.as_ref().map(verify::DurationCheck::to_json),
            "output_bytes": self.output_bytes,
            "sigint_to_exit_s": self.stop.as_secs_f64(),
            "exit": self.exit,
            "stderr_tail": self.stderr_tail,
        })
    }
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts `s` (not the baseline) and returns once it is ready.
pub(super) fn start(s: Subject, ctx: &Ctx, tool: Option<&Path>) -> Result<Running> {
    fs::create_dir_all(&ctx.out_dir)
        .with_context(|| format!("creating {}", ctx.out_dir.display()))?;
    let stdout = ctx.out_dir.join(format!("{}.out", s.key()));
    let stderr = ctx.out_dir.join(format!("{}.err", s.key()));
    let mut pty = None;
    let mut cmd = if s == Subject::TracerTop {
        let mut c = Command::new(&ctx.tracer);
        c.arg("top");
        for p in &ctx.ports {
            c.args(["--port", &p.to_string()]);
        }
        let (terminal, reader) = pty::open(TOP_COLUMNS, TOP_ROWS)?;
        pty::attach(&mut c, &terminal)?;
        pty = Some(reader);
        c
    } else if s.is_tracer() {
        let bin = if s.is_other() {
            ctx.other_tracer
                .as_ref()
                .context("--compare-tracer not given")?
        } else {
            &ctx.tracer
        };
        let mut c = Command::new(bin);
        c.args(["--output", "json", "--events", s.tracer_events(), "-v"]);
        if matches!(s, Subject::TracerNone | Subject::OtherNone) {
            c.arg("--summary");
        }
        for p in &ctx.ports {
            c.args(["--port", &p.to_string()]);
        }
        c.args(&ctx.extra_args);
        c
    } else if s == Subject::Floor {
        let mut c = Command::new(tool.context("bpftrace not found")?);
        c.args(["-e", FLOOR_PROGRAM]);
        c
    } else if s.is_peer() {
        Command::new(tool.context("peer binary not found")?)
    } else {
        bail!("the baseline runs nothing");
    };
    if pty.is_none() {
        cmd.stdin(Stdio::null()).stdout(
            File::create(&stdout).with_context(|| format!("creating {}", stdout.display()))?,
        );
    }
    cmd.stderr(File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?);
    let spawned = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", s.name()))?;
    let pid = child.id() as i32;
    // Reaped with wait4 below (for its rusage), never through `child`.
    drop(child);
    // The terminal's output, read and counted until it closes.
    let screen = pty.map(|reader| pty::drain(reader, stdout.clone()));
    let mut r = Running {
        subject: s,
        pid,
        spawned,
        start: Duration::ZERO,
        cpu_at_ready: Duration::ZERO,
        rss_idle_kib: None,
        rss_maps_kib: None,
        stdout,
        stderr,
        first_output: None,
        screen,
        links: (0, Instant::now()),
    };
    loop {
        if r.first_output.is_none() && fs::metadata(&r.stdout).is_ok_and(|m| m.len() > 0) {
            r.first_output = Some(spawned.elapsed());
        }
        if let Some((status, _)) = reap(pid, false) {
            bail!(
                "{} exited before it was ready ({}): {}",
                s.name(),
                describe_status(status),
                last_line(&r.stderr)
            );
        }
        let ready = if s == Subject::TracerTop {
            r.links_settled()
        } else if s.is_tracer() {
            fs::read_to_string(&r.stderr)
                .map(|t| t.contains("attached"))
                .unwrap_or(false)
        } else if s == Subject::Floor {
            // bpftrace says "Attaching 1 probe..." before it attaches.
            procfs::attached_to_tracepoint(pid, "inet_sock_set_state")
        } else {
            procfs::libbpf_tool_ready(pid)
        };
        if ready {
            r.start = spawned.elapsed();
            break;
        }
        if spawned.elapsed() > READY_TIMEOUT {
            let _ = r.kill();
            bail!(
                "{} not ready after {:?}: {}",
                s.name(),
                READY_TIMEOUT,
                last_line(&r.stderr)
            );
        }
        thread::sleep(Duration::from_micros(500));
    }
    r.cpu_at_ready = procfs::cpu_time(pid).unwrap_or_default();
    r.rss_idle_kib = procfs::memory_kib(pid).0;
    r.rss_maps_kib = procfs::mapped_bpf_maps_kib(pid);
    Ok(r)
}

/// The terminal `tracer top` draws on: the size of a roomy window.
const TOP_COLUMNS: u16 = 120;
const TOP_ROWS: u16 = 40;
/// `tracer top` logs nothing while it owns the terminal: it counts as
/// ready once its eBPF links (the attached programs) have stopped changing
/// for this long.
const LINKS_SETTLED: Duration = Duration::from_millis(300);

impl Running {
    /// Has it attached its programs (links held, none added lately)?
    fn links_settled(&mut self) -> bool {
        let n = procfs::fd_kinds(self.pid)
            .iter()
            .filter(|(_, target)| target.contains("bpf_link") || target.contains("bpf-link"))
            .count();
        if n != self.links.0 {
            self.links = (n, Instant::now());
        }
        n > 0 && self.links.1.elapsed() >= LINKS_SETTLED
    }

    fn kill(&mut self) -> Option<(i32, libc::rusage)> {
        // SAFETY: plain syscalls on our own child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        reap(self.pid, true)
    }

    /// Reads its program statistics and memory, stops it with SIGINT (and
    /// times it: SIGINT to exit, polled every millisecond), and reads what
    /// it printed.
    pub(super) fn stop(mut self, ctx: &Ctx) -> Result<Measured> {
        let mut m = Measured {
            start: self.start,
            rss_idle_kib: self.rss_idle_kib,
            rss_maps_kib: self.rss_maps_kib,
            ..Default::default()
        };
        // Programs are unloaded when it exits: read their statistics now.
        m.progs = procfs::programs_of(self.pid);
        let (_, hwm) = procfs::memory_kib(self.pid);
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.pid, libc::SIGINT) };
        let t0 = Instant::now();
        let (status, usage) = loop {
            if let Some(r) = reap(self.pid, false) {
                break r;
            }
            if t0.elapsed() > STOP_TIMEOUT {
                let _ = self.kill();
                bail!(
                    "{} did not stop within {:?} of SIGINT",
                    self.subject.name(),
                    STOP_TIMEOUT
                );
            }
            thread::sleep(Duration::from_millis(1));
        };
        m.stop = t0.elapsed();
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        let cpu_total = tv(usage.ru_utime) + tv(usage.ru_stime);
        m.cpu_startup = self.cpu_at_ready;
        m.cpu_run = cpu_total.saturating_sub(self.cpu_at_ready);
        // VmHWM: the high-water mark of its own address space so far. Not
        // ru_maxrss: that also counts the address space it was spawned
        // from (the kernel carries the pre-exec maximum over), here the
        // bench's own.
        m.rss_peak_kib = hwm;
        m.exit = describe_status(status);
        m.stderr_tail = tail_lines(&self.stderr, 8);
        m.output_bytes = fs::metadata(&self.stdout).map(|x| x.len()).unwrap_or(0);
        let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        if let Some(screen) = self.screen.take() {
            // The terminal closed with its exit: the reader ends.
            let _ = screen.join();
            m.output_bytes = fs::read_to_string(&self.stdout)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
        }
        // The tracer and the floor print their counts at exit: a run
        // that did not end cleanly measured nothing.
        if !clean && (self.subject.is_tracer() || self.subject == Subject::Floor) {
            bail!(
                "{} exited with {}: {}",
                self.subject.name(),
                m.exit,
                last_line(&self.stderr)
            );
        }
        if self.subject == Subject::TracerTop {
            // A live view writes no records: nothing to count but its cost.
        } else if self.subject.is_tracer() {
            let check = self.subject == Subject::TracerJson;
            let scan = verify::scan(&self.stdout, check)?;
            let stats = scan.stats.with_context(|| {
                format!(
                    "{} printed no stats record (last stderr line: {})",
                    self.subject.name(),
                    last_line(&self.stderr)
                )
            })?;
            m.delivered = stats.get("events").and_then(Value::as_u64);
            m.lost = stats.get("lost").and_then(Value::as_u64);
            m.tracer_stats = Some(stats);
            m.durations = scan.durations;
        } else if self.subject == Subject::Floor {
            // A count map loses nothing; it prints no line if it never
            // counted.
            m.delivered = Some(
                bpftrace_count(&fs::read_to_string(&self.stdout).unwrap_or_default(), "@n")
                    .unwrap_or(0),
            );
            m.lost = Some(0);
        } else {
            // One line per event after a header line; lost events are
            // reported on stderr ("lost N events on CPU #k").
            m.delivered = Some(count_lines(&self.stdout)?.saturating_sub(1));
            m.lost = Some(lost_from_stderr(
                &fs::read_to_string(&self.stderr).unwrap_or_default(),
            ));
        }
        if !ctx.keep_output {
            let _ = fs::remove_file(&self.stdout);
        }
        Ok(m)
    }
}

/// Waits for the child (blocking or not); its status and rusage.
fn reap(pid: i32, block: bool) -> Option<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: valid pointers; pid is our child.
    let r = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
    (r == pid).then_some((status, usage))
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn last_line(path: &Path) -> String {
    tail_lines(path, 1)
        .pop()
        .unwrap_or_else(|| "(nothing on stderr)".into())
}

pub(super) fn count_lines(path: &Path) -> Result<u64> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    Ok(n)
}

/// The value of a bpftrace scalar map as printed at exit (`@n: 42`).
pub(super) fn bpftrace_count(text: &str, map: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix(map)?.strip_prefix(':')?;
        v.trim().parse().ok()
    })
}

/// Sum of libbpf-tools' "lost N events on CPU #k" warnings.
pub(super) fn lost_from_stderr(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("lost ")?;
            let (n, tail) = rest.split_once(' ')?;
            tail.starts_with("events").then(|| n.parse::<u64>().ok())?
        })
        .sum()
}

/// The tracer's start and stop with the load running.
#[derive(Clone, Copy, Debug)]
pub(super) struct StartTrial {
    /// Spawn to its "attached" line.
    pub attached: Duration,
    /// Spawn to the first event on its stdout.
    pub first_event: Duration,
    /// SIGINT to exit, the load still running.
    pub stop: Duration,
}

/// Attach-to-first-event: the tracer (JSON transitions to a file) is
/// started while the load runs, and stopped as soon as its first event is
/// out (the load still running). The event may come before the "attached"
/// line: the agent drains the ring buffer as soon as its loop starts.
pub(super) fn time_to_first_event(ctx: &Ctx) -> Result<StartTrial> {
    let r = start(Subject::TracerJson, ctx, None)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut f = File::open(&r.stdout)?;
    let first = match r.first_output {
        Some(t) => Some(t),
        None => loop {
            if f.seek(SeekFrom::End(0))? > 0 {
                break Some(r.spawned.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            thread::sleep(Duration::from_micros(100));
        },
    };
    let start = r.start;
    let m = r.stop(ctx)?;
    let first = first.context("no event on the tracer's stdout within 10 s of attaching")?;
    Ok(StartTrial {
        attached: start,
        first_event: first,
        stop: m.stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for s in Subject::ALL {
            assert_eq!(Subject::from_key(s.key()), Some(s));
        }
        assert_eq!(Subject::from_key("nope"), None);
    }

    #[test]
    fn lost_lines_of_libbpf_tools() {
        let err =
            "lost 12 events on CPU #0\nsomething else\nlost 3 events on CPU #1\nlost x events\n";
        assert_eq!(lost_from_stderr(err), 15);
        assert_eq!(lost_from_stderr(""), 0);
    }

    #[test]
    fn bpftrace_map_at_exit() {
        let out = "Attaching 1 probe...\n\n\n@n: 301819\n";
        assert_eq!(bpftrace_count(out, "@n"), Some(301819));
        assert_eq!(bpftrace_count(out, "@m"), None);
        assert_eq!(bpftrace_count("Attaching 1 probe...\n", "@n"), None);
        assert_eq!(bpftrace_count("@nn: 3\n", "@n"), None);
    }
}
