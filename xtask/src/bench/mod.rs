//! `cargo xtask bench`: what tracing costs the traced.
//!
//! A load of its own (loopback TCP in a network namespace of its own, see
//! `load.rs`) runs untraced (the baseline) and under each subject in turn,
//! baseline before and after every subject (B X1 B X2 … B, several
//! rounds). Each subject's rate is compared with the mean of its two
//! neighbouring baselines, so drift of a shared machine cancels out;
//! medians and min/max are reported, and wide spreads are flagged. It is a
//! benchmark, not a test: it fails only when it cannot measure.

mod env;
mod hold;
mod load;
mod netns;
mod procfs;
mod report;
mod sockets;
mod stats;
mod subject;
mod verify;
mod workers;

use std::{
    fs, io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

pub use hold::hold_helper;
use load::{LoadConfig, LoadResult, Mode};
use report::Row;
use stats::Summary;
use subject::{Ctx, Measured, Subject};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Seconds of load in each run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Rounds; each runs the baseline before and after every subject.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Load threads (each plays both ends of its connections).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Who closes first.
    #[arg(long, value_enum, default_value_t = Mode::ClientFirst)]
    pub mode: Mode,
    /// Connect over IPv6 (::1) instead of IPv4.
    #[arg(long)]
    pub ipv6: bool,
    /// Connections per second, all threads together (default: as fast as
    /// they go).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Sockets held in CLOSE_WAIT (on other ports) during every run, e.g.
    /// 100000.
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Prove it works in a few seconds: one round of 1 s runs, the tracer
    /// only, nothing installed. Exits non-zero only if it cannot measure.
    #[arg(long)]
    pub smoke: bool,
    /// Only these subjects (comma-separated): tracer-json,
    /// tracer-connections, tracer-none, tcpstates, tcplife.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Leave out libbpf-tools' tcpstates and tcplife.
    #[arg(long)]
    pub no_peers: bool,
    /// Do not turn on the kernel's eBPF run-time statistics (they add two
    /// clock reads to every program run).
    #[arg(long)]
    pub no_kernel_stats: bool,
    /// Trials of the start-up measurement with the load running (0: none).
    #[arg(long, default_value_t = 3)]
    pub start_trials: u32,
    /// Keep the subjects' output in target/bench/run/ (it can be large).
    #[arg(long)]
    pub keep_output: bool,
    /// Extra arguments for every tracer subject (e.g. `--tracer-arg=--attach
    /// --tracer-arg=tracepoint` to measure the classic path).
    #[arg(long = "tracer-arg", allow_hyphen_values = true)]
    pub tracer_args: Vec<String>,
}

/// Ready to load: after the subject is ready, before the load starts.
const SETTLE_BEFORE: Duration = Duration::from_millis(200);
/// After the load, before stopping the subject: at least this, and until
/// no load socket is half-way (at most SETTLE_MAX): delayed ACKs complete
/// the last connections' transitions.
const SETTLE_AFTER: Duration = Duration::from_millis(200);
const SETTLE_MAX: Duration = Duration::from_secs(10);
/// Between runs: the kernel frees the previous run's namespace. Before
/// each run the bench also waits (up to QUIET_MAX) for the CPUs to be
/// mostly idle, and records how idle they were.
const COOL_DOWN: Duration = Duration::from_millis(300);
const QUIET_MAX: Duration = Duration::from_secs(3);
/// Idle share of all CPUs over 100 ms that counts as quiet.
const QUIET_IDLE: f64 = 0.80;

struct Plan {
    seconds: f64,
    rounds: u32,
    load: LoadConfig,
    subjects: Vec<Subject>,
    start_trials: u32,
    kernel_stats: bool,
    smoke: bool,
}

struct RunRecord {
    round: u32,
    subject: Subject,
    load: Option<LoadResult>,
    held_check: Option<hold::HeldCheck>,
    /// How long the load's last transitions took to happen after it
    /// stopped, and sockets still half-way when the subject was stopped.
    settled: Option<(Duration, u64)>,
    /// Idle share of the CPUs just before the run, and how long the bench
    /// waited for it.
    idle_before: Option<(f64, Duration)>,
    /// (namespace inode, time to set up the held sockets)
    env: Option<(u64, Duration)>,
    measured: Option<Measured>,
    error: Option<String>,
}

impl RunRecord {
    fn ok(&self) -> bool {
        self.error.is_none()
    }

    fn rate(&self) -> Option<f64> {
        self.ok()
            .then(|| self.load.as_ref().map(LoadResult::per_second))
            .flatten()
    }

    fn expected(&self) -> Option<u64> {
        let l = self.load.as_ref()?;
        Some(if self.subject == Subject::Tcplife {
            l.expected_closed
        } else {
            l.expected_transitions
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "round": self.round,
            "subject": self.subject.name(),
            "ok": self.ok(),
            "error": self.error,
            "load": self.load.as_ref().map(LoadResult::to_json),
            "held_sockets_at_teardown": self.held_check.map(|h| json!({
                "held": h.held, "eof": h.eof, "other": h.other,
            })),
            "settle_s": self.settled.map(|s| s.0.as_secs_f64()),
            "sockets_pending_at_stop": self.settled.map(|s| s.1),
            "cpu_idle_before": self.idle_before.map(|i| i.0),
            "waited_for_quiet_s": self.idle_before.map(|i| i.1.as_secs_f64()),
            "netns_inode": self.env.map(|e| e.0),
            "hold_setup_s": self.env.map(|e| e.1.as_secs_f64()),
            "expected_events": self.expected(),
            "subject_measured": self.measured.as_ref().map(Measured::to_json),
        })
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let mut notes: Vec<String> = Vec::new();
    let plan = plan(&args)?;
    crate::setup::ensure()?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads eBPF programs and creates network namespaces: run it as root");
    }
    let wants_peers = plan.subjects.iter().any(|s| s.is_peer());
    if wants_peers {
        if let Err(e) = crate::setup::ensure_for_bench() {
            notes.push(format!("could not install libbpf-tools: {e:#}"));
        }
    }
    crate::cargo(&[
        "build",
        "--release",
        "--package",
        "tracer",
        "--bin",
        "tracer",
    ])?;
    let root = crate::workspace_root();
    let out_dir = root.join("target/bench");
    let ctx = Ctx {
        tracer: root.join("target/release/tracer"),
        out_dir: out_dir.join("run"),
        ports: plan.load.load_ports(),
        keep_output: args.keep_output,
        extra_args: args.tracer_args.clone(),
    };

    let mut subjects = Vec::new();
    let mut peers = std::collections::HashMap::new();
    for &s in &plan.subjects {
        if s.is_peer() {
            match subject::find_peer(s) {
                Some(p) => {
                    peers.insert(s, p);
                }
                None => {
                    notes.push(format!(
                        "{}: not installed (Debian package libbpf-tools); left out",
                        s.name()
                    ));
                    continue;
                }
            }
        }
        subjects.push(s);
    }

    let _stats_fd = if plan.kernel_stats {
        match enable_bpf_stats() {
            Ok(fd) => Some(fd),
            Err(e) => {
                notes.push(format!(
                    "BPF_ENABLE_STATS failed ({e}): no kernel run times"
                ));
                None
            }
        }
    } else {
        None
    };
    let kernel_stats = _stats_fd.is_some();
    raise_nofile_limit();

    eprintln!(
        "xtask: bench: {} load, {} threads, {}, {}{}; {} round(s) of {:.1} s runs: baseline, then {} (each followed by a baseline)",
        plan.load.mode.name(),
        plan.load.threads,
        if plan.load.ipv6 { "IPv6" } else { "IPv4" },
        plan.load
            .rate
            .map_or("unbounded".to_string(), |r| format!("capped at {r:.0} conn/s")),
        if plan.load.hold > 0 {
            format!(", {} sockets held in CLOSE_WAIT", plan.load.hold)
        } else {
            String::new()
        },
        plan.rounds,
        plan.seconds,
        subjects
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
    );
    let started = SystemTime::now();
    let loadavg_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut runs: Vec<RunRecord> = Vec::new();
    for round in 1..=plan.rounds {
        runs.push(run_one(&plan, &ctx, round, Subject::Baseline, None));
        for &s in &subjects {
            runs.push(run_one(&plan, &ctx, round, s, peers.get(&s)));
            runs.push(run_one(&plan, &ctx, round, Subject::Baseline, None));
        }
    }

    let mut start_trials = Vec::new();
    if plan.start_trials > 0 && subjects.iter().any(|s| s.is_tracer()) {
        for i in 1..=plan.start_trials {
            let r = start_trial(&plan, &ctx);
            match &r {
                Ok((a, f)) => eprintln!(
                    "xtask: bench: start trial {i}: spawn to attached {:.3} s, to first event {:.3} s",
                    a.as_secs_f64(),
                    f.as_secs_f64()
                ),
                Err(e) => eprintln!("xtask: bench: start trial {i}: {e:#}"),
            }
            start_trials.push(r);
            thread::sleep(COOL_DOWN);
        }
    }

    let mut rows: Vec<(Subject, Row)> = Vec::new();
    for s in std::iter::once(Subject::Baseline).chain(subjects.iter().copied()) {
        rows.push((s, summarize(s, &runs, kernel_stats)));
    }
    let table = report::table(&rows);
    let start_s: Vec<f64> = start_trials
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|(a, _)| a.as_secs_f64())
        .collect();
    let first_s: Vec<f64> = start_trials
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|(_, f)| f.as_secs_f64())
        .collect();
    // Attached to first event (0: the event was out before the line).
    let after_attach_s: Vec<f64> = start_trials
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|(a, f)| f.saturating_sub(*a).as_secs_f64())
        .collect();

    let failed: Vec<&RunRecord> = runs.iter().filter(|r| !r.ok()).collect();
    if rows.iter().any(|(_, r)| r.noisy()) {
        notes.push(format!(
            "noisy: the spread of some rows is over {:.0}% (a shared 2-core machine: other builds and tests run beside the bench); compare medians, or rerun",
            stats::NOISY_SPREAD * 100.0
        ));
    }
    for (_, r) in &rows {
        match r.unaccounted {
            Some(n) if n > 0 => notes.push(format!(
                "{}: {n} expected transitions were neither delivered nor counted as lost or skipped",
                r.name
            )),
            Some(n) if n < 0 => notes.push(format!(
                "{}: {} more events than the load caused (other TCP traffic on the machine: it is not filtered)",
                r.name, -n
            )),
            _ => {}
        }
    }
    for &s in &subjects {
        let untracked: u64 = runs
            .iter()
            .filter(|r| r.subject == s)
            .filter_map(|r| {
                r.measured
                    .as_ref()?
                    .tracer_stats
                    .as_ref()?
                    .get("untracked")?
                    .as_u64()
            })
            .sum();
        if untracked > 0 {
            notes.push(format!(
                "{}: {untracked} transitions of sockets the agent had no room to track (`untracked` in its stats)",
                s.name()
            ));
        }
    }
    for r in &failed {
        notes.push(format!(
            "round {} {}: {}",
            r.round,
            r.subject.name(),
            r.error.as_deref().unwrap_or("")
        ));
    }

    println!();
    print!("{table}");
    println!(
        "load: {}, {} threads, {}, {}{}; {} round(s) x {:.1} s; kernel stats {}",
        plan.load.mode.name(),
        plan.load.threads,
        if plan.load.ipv6 { "IPv6" } else { "IPv4" },
        plan.load.rate.map_or("unbounded".to_string(), |r| format!(
            "capped at {r:.0} conn/s"
        )),
        if plan.load.hold > 0 {
            format!(", {} held in CLOSE_WAIT", plan.load.hold)
        } else {
            String::new()
        },
        plan.rounds,
        plan.seconds,
        if kernel_stats { "on" } else { "off" },
    );
    if let Some(s) = Summary::of(&start_s) {
        let f = Summary::of(&first_s).expect("same trials");
        let g = Summary::of(&after_attach_s).expect("same trials");
        println!(
            "tracer started with the load running ({} trials, medians [min-max]): spawn to \"attached\" {:.3} s [{:.3}-{:.3}]; spawn to first event on stdout {:.3} s [{:.3}-{:.3}]; \"attached\" to first event {:.1} ms (max {:.1} ms)",
            s.n, s.median, s.min, s.max, f.median, f.min, f.max,
            g.median * 1e3, g.max * 1e3
        );
    }
    if rows
        .iter()
        .any(|(_, r)| r.bad_durations.is_some_and(|(_, checked)| !checked))
    {
        println!("* bad dur: the tracer's own timing_stale + timing_map_full counters (its output in this mode has no per-transition records to check)");
    }
    for n in &notes {
        println!("note: {n}");
    }

    let stamp = report::timestamp(
        started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    let doc = json!({
        "version": 1,
        "started": stamp,
        "host": host_json(),
        "git": git_json(&root),
        "loadavg_before": loadavg_before.trim(),
        "loadavg_after": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "config": {
            "seconds": plan.seconds,
            "rounds": plan.rounds,
            "smoke": plan.smoke,
            "kernel_stats": kernel_stats,
            "load": plan.load.to_json(),
            "tracer_ports": ctx.ports,
            "order": "per round: baseline, then each subject followed by a baseline; ratio = subject / mean of its two neighbouring baselines",
        },
        "summary": rows.iter().map(|(_, r)| r.to_json()).collect::<Vec<_>>(),
        "start_trials": start_trials.iter().map(|r| match r {
            Ok((a, f)) => json!({
                "spawn_to_attached_s": a.as_secs_f64(),
                "spawn_to_first_event_s": f.as_secs_f64(),
                "attached_to_first_event_s": f.saturating_sub(*a).as_secs_f64(),
            }),
            Err(e) => json!({"error": format!("{e:#}")}),
        }).collect::<Vec<_>>(),
        "runs": runs.iter().map(RunRecord::to_json).collect::<Vec<_>>(),
        "table": table,
        "notes": notes,
    });
    fs::create_dir_all(&out_dir)?;
    let text = serde_json::to_string_pretty(&doc)? + "\n";
    let path = out_dir.join(format!("bench-{stamp}.json"));
    fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    fs::write(out_dir.join("latest.json"), &text)?;
    println!("results: {}", path.display());

    // It fails only when it could not measure: the baseline or the tracer
    // did not run (peers that cannot run are notes).
    let fatal: Vec<&&RunRecord> = failed.iter().filter(|r| !r.subject.is_peer()).collect();
    if let Some(first) = fatal.first() {
        bail!(
            "bench: {} of {} runs failed; first: round {} {}: {}",
            fatal.len(),
            runs.len(),
            first.round,
            first.subject.name(),
            first.error.as_deref().unwrap_or("")
        );
    }
    if let Some((_, b)) = rows.first() {
        if b.rate.is_none_or(|s| s.median <= 0.0) {
            bail!("bench: the baseline made no connections");
        }
    }
    Ok(())
}

fn plan(args: &BenchArgs) -> Result<Plan> {
    let mut subjects: Vec<Subject> = if args.only.is_empty() {
        Subject::ALL[1..].to_vec()
    } else {
        let mut v = Vec::new();
        for k in &args.only {
            let s = Subject::from_key(k.trim()).with_context(|| {
                format!(
                    "--only: unknown subject {k:?} (one of: {})",
                    Subject::ALL[1..]
                        .iter()
                        .map(|s| s.key())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            if s != Subject::Baseline && !v.contains(&s) {
                v.push(s);
            }
        }
        v
    };
    if args.no_peers || (args.smoke && args.only.is_empty()) {
        subjects.retain(|s| !s.is_peer());
    }
    let load = LoadConfig {
        threads: args.threads,
        mode: args.mode,
        ipv6: args.ipv6,
        rate: args.rate,
        hold: args.hold,
    };
    load.check()?;
    let (seconds, rounds, start_trials) = if args.smoke {
        (1.0, 1, args.start_trials.min(1))
    } else {
        (args.seconds, args.rounds, args.start_trials)
    };
    if seconds.is_nan() || seconds <= 0.0 || rounds == 0 {
        bail!("--seconds and --rounds must be positive");
    }
    Ok(Plan {
        seconds,
        rounds,
        load,
        subjects,
        start_trials,
        kernel_stats: !args.no_kernel_stats,
        smoke: args.smoke,
    })
}

fn run_one(plan: &Plan, ctx: &Ctx, round: u32, s: Subject, peer: Option<&PathBuf>) -> RunRecord {
    let mut rec = RunRecord {
        round,
        subject: s,
        load: None,
        held_check: None,
        settled: None,
        idle_before: None,
        env: None,
        measured: None,
        error: None,
    };
    rec.idle_before = wait_quiet();
    let mut env = match env::Env::setup(&plan.load) {
        Ok(e) => e,
        Err(e) => {
            rec.error = Some(format!("load set-up: {e:#}"));
            return finish(rec);
        }
    };
    rec.env = Some((env.ready.netns_inode, env.ready.hold_took));
    let outcome = (|| -> Result<()> {
        let running = match s {
            Subject::Baseline => None,
            _ => Some(subject::start(s, ctx, peer.map(PathBuf::as_path))?),
        };
        thread::sleep(SETTLE_BEFORE);
        let load = env.run(Duration::from_secs_f64(plan.seconds));
        thread::sleep(SETTLE_AFTER);
        let settled = env.settle(&ctx.ports, SETTLE_MAX);
        rec.settled = Some((SETTLE_AFTER + settled.0, settled.1));
        let measured = running.map(|r| r.stop(ctx)).transpose();
        let load = load?;
        let load_errors = load.errors.clone();
        rec.load = Some(load);
        rec.measured = measured?;
        if let Some(e) = load_errors.first() {
            bail!("load: {e}");
        }
        Ok(())
    })();
    rec.held_check = Some(env.teardown());
    if let Err(e) = outcome {
        rec.error = Some(format!("{e:#}"));
    }
    if let Some(h) = rec.held_check {
        if rec.ok() && h.other > 0 {
            rec.error = Some(format!(
                "load: {} of {} held sockets were not in CLOSE_WAIT at the end",
                h.other, h.held
            ));
        }
    }
    thread::sleep(COOL_DOWN);
    finish(rec)
}

fn finish(rec: RunRecord) -> RunRecord {
    let mut line = format!(
        "xtask: bench: round {} {:<19}",
        rec.round,
        rec.subject.name()
    );
    if let Some(l) = &rec.load {
        line += &format!(" {:>8.0} conn/s", l.per_second());
    }
    if let (Some(m), Some(e)) = (&rec.measured, rec.expected()) {
        line += &format!(
            "  events {}/{}",
            m.delivered.map_or("-".into(), |d| d.to_string()),
            e
        );
        if let Some(d) = &m.durations {
            line += &format!("  bad durations {}", d.bad());
        }
        line += &format!("  start {:.3} s", m.start.as_secs_f64());
    }
    if let Some((_, n)) = rec.settled.filter(|s| s.1 > 0) {
        line += &format!("  ({n} load sockets still half-way when stopped)");
    }
    if let Some(e) = &rec.error {
        line += &format!("  FAILED: {e}");
    }
    eprintln!("{line}");
    rec
}

/// The tracer started while the load already runs: spawn to attached,
/// attached to its first event on stdout.
fn start_trial(plan: &Plan, ctx: &Ctx) -> Result<(Duration, Duration)> {
    wait_quiet();
    let mut env = env::Env::setup(&plan.load)?;
    let result = thread::scope(|sc| {
        let load = sc.spawn(|| env.run(Duration::from_secs(3)));
        thread::sleep(Duration::from_millis(300));
        let r = subject::time_to_first_event(ctx);
        let _ = load.join();
        r
    });
    env.teardown();
    result
}

fn summarize(s: Subject, runs: &[RunRecord], kernel_stats: bool) -> Row {
    let mine: Vec<(usize, &RunRecord)> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.subject == s)
        .collect();
    let ok: Vec<&RunRecord> = mine.iter().map(|(_, r)| *r).filter(|r| r.ok()).collect();
    let rates: Vec<f64> = ok.iter().filter_map(|r| r.rate()).collect();
    let mut row = Row {
        name: s.name().to_string(),
        runs: mine.len(),
        failed: mine.len() - ok.len(),
        rate: Summary::of(&rates),
        ..Default::default()
    };
    if s == Subject::Baseline {
        return row;
    }
    let neighbour = |i: usize, before: bool| -> Option<f64> {
        let j = if before { i.checked_sub(1)? } else { i + 1 };
        let r = runs.get(j)?;
        (r.subject == Subject::Baseline && r.round == runs[i].round)
            .then(|| r.rate())
            .flatten()
    };
    let ratios: Vec<f64> = mine
        .iter()
        .filter(|(_, r)| r.ok())
        .filter_map(|&(i, r)| {
            stats::paired_ratio(r.rate()?, neighbour(i, true), neighbour(i, false))
        })
        .collect();
    row.ratio = Summary::of(&ratios);
    let measured: Vec<(&RunRecord, &Measured)> = ok
        .iter()
        .filter_map(|r| Some((*r, r.measured.as_ref()?)))
        .collect();
    if measured.is_empty() {
        return row;
    }
    let sum = |f: &dyn Fn(&RunRecord, &Measured) -> Option<u64>| -> Option<u64> {
        measured.iter().map(|(r, m)| f(r, m)).sum()
    };
    row.delivered = sum(&|_, m| m.delivered);
    row.expected = sum(&|r, _| r.expected());
    row.lost = sum(&|_, m| m.lost);
    row.skipped = kernel_stats
        .then(|| sum(&|_, m| Some(m.recursion_misses())))
        .flatten();
    // One program run per transition: what neither arrived nor was
    // counted as lost or skipped (not for tcplife: one line per socket).
    if s != Subject::Tcplife {
        if let (Some(e), Some(d)) = (row.expected, row.delivered) {
            let pending: u64 = measured.iter().map(|(_, m)| m.pending()).sum();
            row.unaccounted = Some(
                e as i64
                    - d as i64
                    - row.lost.unwrap_or(0) as i64
                    - row.skipped.unwrap_or(0) as i64
                    - pending as i64,
            );
        }
    }
    row.bad_durations = measured
        .iter()
        .map(|(_, m)| m.bad_durations())
        .try_fold((0, true), |(n, all), b| b.map(|(k, c)| (n + k, all && c)));
    let transitions: u64 = measured
        .iter()
        .filter_map(|(r, _)| r.load.as_ref().map(|l| l.expected_transitions))
        .sum();
    if transitions > 0 {
        if kernel_stats {
            let ns: u64 = measured.iter().map(|(_, m)| m.kernel_run_time_ns()).sum();
            row.kernel_ns_per_event = Some(ns as f64 / transitions as f64);
        }
        let cpu: f64 = measured.iter().map(|(_, m)| m.cpu_run.as_secs_f64()).sum();
        row.agent_us_per_event = Some(cpu * 1e6 / transitions as f64);
    }
    let mib = |k: u64| k as f64 / 1024.0;
    row.rss_idle_mib = Summary::of(
        &measured
            .iter()
            .filter_map(|(_, m)| m.rss_idle_kib.map(mib))
            .collect::<Vec<_>>(),
    )
    .map(|s| s.median);
    row.rss_peak_mib = measured
        .iter()
        .filter_map(|(_, m)| m.rss_peak_kib.map(mib))
        .reduce(f64::max);
    row.start_s = Summary::of(
        &measured
            .iter()
            .map(|(_, m)| m.start.as_secs_f64())
            .collect::<Vec<_>>(),
    );
    row
}

/// Waits until the CPUs are mostly idle (the previous run's namespace
/// freed, nobody else busy), at most QUIET_MAX; the last idle share seen.
fn wait_quiet() -> Option<(f64, Duration)> {
    let t0 = std::time::Instant::now();
    let mut prev = cpu_times()?;
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = cpu_times()?;
        let (idle, total) = (now.0 - prev.0, now.1 - prev.1);
        let share = if total > 0 {
            idle as f64 / total as f64
        } else {
            1.0
        };
        if share >= QUIET_IDLE || t0.elapsed() >= QUIET_MAX {
            return Some((share, t0.elapsed()));
        }
        prev = now;
    }
}

/// (idle + iowait, total) jiffies of all CPUs, from /proc/stat.
fn cpu_times() -> Option<(u64, u64)> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat_cpu(&text)
}

fn parse_proc_stat_cpu(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is in user).
    let total: u64 = v.iter().take(8).sum();
    Some((v[3] + v[4], total))
}

/// Turns on the kernel's run-time statistics of every eBPF program
/// (run_time_ns, run_cnt) for as long as the returned fd is open.
fn enable_bpf_stats() -> io::Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    const BPF_STATS_RUN_TIME: u32 = 0;
    #[repr(C)]
    struct EnableStatsAttr {
        type_: u32,
    }
    let attr = EnableStatsAttr {
        type_: BPF_STATS_RUN_TIME,
    };
    // SAFETY: bpf(2) reads `size` bytes of a valid attr; the kernel
    // returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &attr as *const EnableStatsAttr,
            std::mem::size_of::<EnableStatsAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Never-close keeps as many sockets as it has descriptors for: raise the
/// soft limit to the hard one (raising the hard limit needs
/// CAP_SYS_RESOURCE, which this machine's root does not have).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn host_json() -> Value {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default().trim().to_string();
    json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "model": read("/proc/cpuinfo").lines().find_map(|l| l.strip_prefix("model name")
            .and_then(|v| v.split_once(':')).map(|(_, v)| v.trim().to_string())),
    })
}

fn git_json(root: &std::path::Path) -> Value {
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    json!({
        "commit": run(&["rev-parse", "HEAD"]),
        "dirty": run(&["status", "--porcelain"]).map(|s| !s.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_cpu_line() {
        let text = "cpu  100 5 50 800 20 1 4 0 0 0\ncpu0 50 2 25 400 10 0 2 0 0 0\nintr 1\n";
        assert_eq!(parse_proc_stat_cpu(text), Some((820, 980)));
        assert_eq!(parse_proc_stat_cpu("intr 1\n"), None);
    }

    fn record(subject: Subject, round: u32, conns: u64, delivered: u64) -> RunRecord {
        RunRecord {
            round,
            subject,
            load: Some(LoadResult {
                connections: conns,
                elapsed: Duration::from_secs(1),
                expected_transitions: conns * 10,
                expected_closed: conns * 2,
                ..Default::default()
            }),
            held_check: None,
            settled: None,
            idle_before: None,
            env: None,
            measured: (subject != Subject::Baseline).then(|| Measured {
                delivered: Some(delivered),
                lost: Some(0),
                cpu_run: Duration::from_millis(conns),
                rss_idle_kib: Some(2048),
                rss_peak_kib: Some(4096),
                start: Duration::from_millis(70),
                progs: vec![procfs::ProgStats {
                    id: 1,
                    name: None,
                    run_time_ns: conns * 10 * 500,
                    run_cnt: conns * 10,
                    recursion_misses: 1,
                }],
                tracer_stats: Some(json!({"timing_stale": 1, "timing_map_full": 0})),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn rows_pair_each_run_with_its_neighbouring_baselines() {
        use Subject::{Baseline as B, TracerNone as X};
        let mut failed = record(X, 2, 1, 1);
        failed.error = Some("boom".into());
        let runs = vec![
            record(B, 1, 100, 0),
            record(X, 1, 80, 800),
            record(B, 1, 120, 0),
            record(X, 1, 90, 895),
            record(B, 1, 100, 0),
            // A new round: its first baseline is not the last one's neighbour.
            record(B, 2, 1000, 0),
            failed,
            record(B, 2, 1000, 0),
        ];
        let base = summarize(B, &runs, true);
        assert_eq!((base.runs, base.failed), (5, 0));
        assert_eq!(base.rate.unwrap().median, 120.0);
        let x = summarize(X, &runs, true);
        assert_eq!((x.runs, x.failed), (3, 1));
        let ratio = x.ratio.unwrap();
        assert_eq!(ratio.n, 2);
        assert!((ratio.min - 80.0 / 110.0).abs() < 1e-9);
        assert!((ratio.max - 90.0 / 110.0).abs() < 1e-9);
        assert_eq!((x.delivered, x.expected), (Some(1695), Some(1700)));
        assert_eq!((x.lost, x.skipped), (Some(0), Some(2)));
        assert_eq!(x.unaccounted, Some(3));
        assert_eq!(x.kernel_ns_per_event, Some(500.0));
        // 170 ms of CPU over 1700 events.
        assert!((x.agent_us_per_event.unwrap() - 100.0).abs() < 1e-9);
        assert_eq!((x.rss_idle_mib, x.rss_peak_mib), (Some(2.0), Some(4.0)));
        assert_eq!(x.bad_durations, Some((2, false)));
        let no_stats = summarize(X, &runs, false);
        assert_eq!(
            (no_stats.kernel_ns_per_event, no_stats.skipped),
            (None, None)
        );
    }

    #[test]
    fn smoke_is_short_and_leaves_out_peers() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let p = plan(&Cli::parse_from(["x", "--smoke"]).bench).unwrap();
        assert_eq!((p.seconds, p.rounds, p.start_trials), (1.0, 1, 1));
        assert!(p.subjects.iter().all(|s| s.is_tracer()));
        let p = plan(&Cli::parse_from(["x", "--only", "tcplife,tracer-none"]).bench).unwrap();
        assert_eq!(p.subjects, vec![Subject::Tcplife, Subject::TracerNone]);
        assert!(plan(&Cli::parse_from(["x", "--only", "perf"]).bench).is_err());
        let p = plan(&Cli::parse_from(["x"]).bench).unwrap();
        assert_eq!(p.subjects.len(), 5);
        assert_eq!((p.seconds, p.rounds), (5.0, 3));
    }
}
