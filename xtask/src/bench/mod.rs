//! `cargo xtask bench`: what tracing costs the traced.
//!
//! A load (loopback TCP in a network namespace of its own, see `load.rs`:
//! `churn`, the bench's own connections, the default; or `nginx`, Debian's
//! nginx serving wrk one request per connection) runs untraced (the
//! baseline) and under each subject in turn, baseline before and after
//! every subject (B X1 B X2 … B, several rounds). Each subject's rate is
//! compared with the mean of its two neighbouring baselines, so drift of a
//! shared machine cancels out; medians and min/max are reported, and wide
//! spreads are flagged. With several loads (`--load churn,nginx` or
//! `all`) each is a block of rounds of its own, and the table has a row
//! per (load, subject). The nginx load's rate (the `conn/s` column) is
//! wrk's Requests/sec, one connection per request; its expected events
//! come from the namespace's TCP counters (`counters.rs`). It is a
//! benchmark, not a test: it fails only when it cannot measure.
//!
//! This file: the command line (`BenchArgs`), the timing of a run and
//! `run`, which plans (`plan.rs`), runs each subject and baseline in turn
//! (`runs.rs`, the loads in `load.rs`, the subjects in `subject.rs`: the
//! tracer in three modes, the floor, libbpf-tools' tcpstates and tcplife),
//! summarizes the runs into rows (`summarize.rs`), prints the table and
//! notes (`report.rs`) and writes target/bench/bench-STAMP.json (each run
//! as a `RunRecord`, `record.rs`; the host and git state, `host.rs`).
//!
//! Every subject is stopped with SIGINT once the load has settled; the
//! time from SIGINT to its exit is the `stop s` column (the slowest of its
//! runs), and the start trials also stop the tracer with the load still
//! running. The target is an exit within `STOP_TARGET` (1 s): slower
//! stops are noted, never failed on. A tracer subject that exits without
//! its final `stats` record fails its run.

mod counters;
pub(crate) mod env;
pub(crate) mod hold;
pub(crate) mod host;
pub(crate) mod load;
pub(crate) mod netns;
mod nginx;
mod plan;
pub(crate) mod procfs;
mod pty;
mod record;
pub(crate) mod report;
mod runs;
pub(crate) mod sockets;
mod stats;
mod subject;
mod summarize;
mod verify;
mod workers;
mod wrk;

use std::{
    fs, thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

pub(crate) use hold::hold_helper;
use host::{enable_bpf_stats, git_json, host_json, raise_nofile_limit};
use load::{LoadKind, Mode};
use plan::plan;
use record::RunRecord;
use report::Row;
use runs::{run_one, start_trial};
use stats::Summary;
use subject::{Ctx, StartTrial, Subject};
use summarize::summarize;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Loads (comma-separated, or `all`): churn (the bench's own loopback
    /// connections), nginx (Debian's nginx and wrk, one request per
    /// connection); each a block of rounds of its own.
    #[arg(long, value_delimiter = ',', default_value = "churn")]
    pub load: Vec<String>,
    /// Seconds of load in each run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Rounds; each runs the baseline before and after every subject.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Load threads (churn: each plays both ends of its connections;
    /// nginx: wrk's threads).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// nginx load: wrk's connections (one request each, then a new one).
    #[arg(long, default_value_t = 50)]
    pub connections: u32,
    /// Churn load: who closes first.
    #[arg(long, value_enum, default_value_t = Mode::ClientFirst)]
    pub mode: Mode,
    /// Connect over IPv6 (::1) instead of IPv4.
    #[arg(long)]
    pub ipv6: bool,
    /// Churn load: connections per second, all threads together (default:
    /// as fast as they go).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Sockets held in CLOSE_WAIT (on other ports) during every run, e.g.
    /// 100000.
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Prove it works in a few seconds: one round of 1 s runs, the tracer
    /// only (no floor, no peers), nothing installed. Exits non-zero only
    /// if it cannot measure.
    #[arg(long)]
    pub smoke: bool,
    /// Only these subjects (comma-separated): tracer-json,
    /// tracer-connections, tracer-none, tracer-top, floor, tcpstates, tcplife.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Leave out libbpf-tools' tcpstates and tcplife (the floor stays: it
    /// is no peer but the least a tracer of this tracepoint can cost).
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
    /// Another tracer binary (an earlier build, copied out of
    /// target/release) run beside this one in the same rounds: each tracer
    /// subject is followed by its `other` twin, so before/after numbers
    /// come from one run.
    #[arg(long, value_name = "PATH")]
    pub compare_tracer: Option<std::path::PathBuf>,
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
/// The target for stopping: a subject should exit within this of SIGINT
/// (printed, never failed on).
const STOP_TARGET: Duration = Duration::from_secs(1);

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    let mut notes: Vec<String> = Vec::new();
    let plan = plan(&args)?;
    crate::setup::ensure()?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads eBPF programs and creates network namespaces: run it as root");
    }
    let wants_tools = plan.subjects.iter().any(|s| s.is_tool());
    let wants_nginx = plan.loads.iter().any(|l| l.kind == LoadKind::Nginx);
    if wants_tools || wants_nginx {
        if let Err(e) = crate::setup::ensure_for_bench() {
            notes.push(format!(
                "could not install the bench's Debian packages: {e:#}"
            ));
        }
    }
    if wants_nginx {
        for bin in ["nginx", "wrk"] {
            if subject::find_binary(bin).is_none() {
                bail!("the nginx load needs Debian's {bin} (cargo xtask bench installs it: {notes:?})");
            }
        }
    }
    crate::release_tracer()?;
    let root = crate::workspace_root();
    let out_dir = root.join("target/bench");
    // One per load: the tracer subjects filter on that load's ports.
    let ctxs: Vec<Ctx> = plan
        .loads
        .iter()
        .map(|l| Ctx {
            tracer: root.join("target/release/tracer"),
            other_tracer: args.compare_tracer.clone(),
            out_dir: out_dir.join("run"),
            ports: l.load_ports(),
            keep_output: args.keep_output,
            extra_args: args.tracer_args.clone(),
        })
        .collect();

    let mut subjects = Vec::new();
    let mut tools = std::collections::HashMap::new();
    for &s in &plan.subjects {
        if s.is_tool() {
            match subject::find_tool(s) {
                Some(p) => {
                    tools.insert(s, p);
                }
                None => {
                    notes.push(format!(
                        "{}: not installed (Debian package {}); left out",
                        s.name(),
                        s.package()
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

    let started = SystemTime::now();
    let loadavg_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut runs: Vec<RunRecord> = Vec::new();
    // Each load is a block of rounds of its own.
    for (load, ctx) in plan.loads.iter().zip(&ctxs) {
        eprintln!(
            "xtask: bench: load {}; {} round(s) of {:.1} s runs: baseline, then {} (each followed by a baseline)",
            load.describe(),
            plan.rounds,
            plan.seconds,
            subjects
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", "),
        );
        for round in 1..=plan.rounds {
            runs.push(run_one(&plan, load, ctx, round, Subject::Baseline, None));
            for &s in &subjects {
                runs.push(run_one(&plan, load, ctx, round, s, tools.get(&s)));
                runs.push(run_one(&plan, load, ctx, round, Subject::Baseline, None));
            }
        }
    }

    // With the first load only.
    let trial_load = &plan.loads[0];
    let mut start_trials = Vec::new();
    if plan.start_trials > 0 && subjects.iter().any(|s| s.is_tracer()) {
        for i in 1..=plan.start_trials {
            let r = start_trial(trial_load, &ctxs[0]);
            match &r {
                Ok(t) => eprintln!(
                    "xtask: bench: start trial {i}: spawn to attached {:.3} s, to first event {:.3} s; SIGINT to exit {:.3} s",
                    t.attached.as_secs_f64(),
                    t.first_event.as_secs_f64(),
                    t.stop.as_secs_f64()
                ),
                Err(e) => eprintln!("xtask: bench: start trial {i}: {e:#}"),
            }
            start_trials.push(r);
            thread::sleep(COOL_DOWN);
        }
    }

    let mut rows: Vec<(Subject, Row)> = Vec::new();
    for load in &plan.loads {
        for s in std::iter::once(Subject::Baseline).chain(subjects.iter().copied()) {
            rows.push((s, summarize(load.kind, s, &runs, kernel_stats)));
        }
    }
    let table = report::table(&rows);
    let trial_s = |f: &dyn Fn(&StartTrial) -> Duration| -> Vec<f64> {
        start_trials
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|t| f(t).as_secs_f64())
            .collect()
    };
    let start_s = trial_s(&|t| t.attached);
    let first_s = trial_s(&|t| t.first_event);
    // Attached to first event (0: the event was out before the line).
    let after_attach_s = trial_s(&|t| t.first_event.saturating_sub(t.attached));
    let stop_loaded_s = trial_s(&|t| t.stop);

    let failed: Vec<&RunRecord> = runs.iter().filter(|r| !r.ok()).collect();
    if rows.iter().any(|(_, r)| r.noisy()) {
        notes.push(format!(
            "noisy: the spread of some rows is over {:.0}% (a shared 2-core machine: other builds and tests run beside the bench); compare medians, or rerun",
            stats::NOISY_SPREAD * 100.0
        ));
    }
    for (s, r) in &rows {
        match r.unaccounted {
            Some(n) if n > 0 => notes.push(format!(
                "{}: {n} expected transitions were neither delivered nor counted as lost or skipped",
                r.label()
            )),
            Some(n) if n < 0 => notes.push(format!(
                "{}: {} more events than the load caused ({})",
                r.label(),
                -n,
                if s.is_tracer() {
                    "TCP traffic on the load's ports in other network namespaces: its port filter does not tell them apart".to_string()
                } else {
                    format!(
                        "other TCP traffic on the machine: it is not filtered; its kernel ns/ev over the load's events overstates, per program run it took {}",
                        r.kernel_ns_per_hit.map_or("-".into(), |x| format!("{x:.0} ns"))
                    )
                }
            )),
            _ => {}
        }
    }
    for load in &plan.loads {
        for &s in &subjects {
            let untracked: u64 = runs
                .iter()
                .filter(|r| r.subject == s && r.load_kind == load.kind)
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
                    "{} / {}: {untracked} transitions of sockets the agent had no room to track (`untracked` in its stats)",
                    load.kind.name(),
                    s.name()
                ));
            }
        }
    }
    for r in &runs {
        if let Some(m) = r.measured.as_ref().filter(|m| m.stop > STOP_TARGET) {
            notes.push(format!(
                "{} round {} {}: exited {:.2} s after SIGINT (target: within {:.0} s)",
                r.load_kind.name(),
                r.round,
                r.subject.name(),
                m.stop.as_secs_f64(),
                STOP_TARGET.as_secs_f64()
            ));
        }
    }
    for (i, t) in start_trials.iter().enumerate() {
        if let Some(t) = t.as_ref().ok().filter(|t| t.stop > STOP_TARGET) {
            notes.push(format!(
                "start trial {}: the tracer exited {:.2} s after SIGINT with the load running (target: within {:.0} s)",
                i + 1,
                t.stop.as_secs_f64(),
                STOP_TARGET.as_secs_f64()
            ));
        }
    }
    for r in &failed {
        notes.push(format!(
            "{} round {} {}: {}",
            r.load_kind.name(),
            r.round,
            r.subject.name(),
            r.error.as_deref().unwrap_or("")
        ));
    }

    println!();
    print!("{table}");
    for load in &plan.loads {
        println!("load {}", load.describe());
    }
    println!(
        "{} round(s) x {:.1} s per load; kernel stats {}",
        plan.rounds,
        plan.seconds,
        if kernel_stats { "on" } else { "off" },
    );
    if let Some(s) = Summary::of(&start_s) {
        let f = Summary::of(&first_s).expect("same trials");
        let g = Summary::of(&after_attach_s).expect("same trials");
        let h = Summary::of(&stop_loaded_s).expect("same trials");
        println!(
            "tracer started with the {} load running ({} trials, medians [min-max]): spawn to \"attached\" {:.3} s [{:.3}-{:.3}]; spawn to first event on stdout {:.3} s [{:.3}-{:.3}]; \"attached\" to first event {:.1} ms (max {:.1} ms); then stopped with the load still running: SIGINT to exit {:.3} s [{:.3}-{:.3}]",
            trial_load.kind.name(), s.n, s.median, s.min, s.max, f.median, f.min, f.max,
            g.median * 1e3, g.max * 1e3, h.median, h.min, h.max
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
        "version": 2,
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
            "loads": plan.loads.iter().zip(&ctxs).map(|(l, c)| {
                let mut j = l.to_json();
                j["tracer_ports"] = json!(c.ports);
                j
            }).collect::<Vec<_>>(),
            "start_trials_load": trial_load.kind.name(),
            "order": "each load a block of rounds; per round: baseline, then each subject followed by a baseline; ratio = subject / mean of its two neighbouring baselines",
        },
        "summary": rows.iter().map(|(_, r)| r.to_json()).collect::<Vec<_>>(),
        "start_trials": start_trials.iter().map(|r| match r {
            Ok(t) => json!({
                "spawn_to_attached_s": t.attached.as_secs_f64(),
                "spawn_to_first_event_s": t.first_event.as_secs_f64(),
                "attached_to_first_event_s": t.first_event.saturating_sub(t.attached).as_secs_f64(),
                "sigint_to_exit_with_load_s": t.stop.as_secs_f64(),
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
    // did not run (peers and the floor that cannot run are notes).
    let fatal: Vec<&&RunRecord> = failed.iter().filter(|r| !r.subject.is_tool()).collect();
    if let Some(first) = fatal.first() {
        bail!(
            "bench: {} of {} runs failed; first: {} round {} {}: {}",
            fatal.len(),
            runs.len(),
            first.load_kind.name(),
            first.round,
            first.subject.name(),
            first.error.as_deref().unwrap_or("")
        );
    }
    for (s, r) in &rows {
        if *s == Subject::Baseline && r.rate.is_none_or(|s| s.median <= 0.0) {
            bail!("bench: the {} baseline made no connections", r.load);
        }
    }
    Ok(())
}
