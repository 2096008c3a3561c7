//! One run after another: each in a fresh namespace, the subject started
//! before the load and stopped after it settled.
//!
//! In: the `Plan`, the load, the subjects' `Ctx` for it, the round and
//! the subject. Out: a `RunRecord` (and a progress line on stderr), or
//! from `start_trial` the tracer's start-up times with the load already
//! running.

use std::{path::PathBuf, thread, time::Duration};

use anyhow::{bail, Result};

use super::{
    env::Env,
    host::wait_quiet,
    load::LoadConfig,
    plan::Plan,
    record::RunRecord,
    subject::{self, Ctx, StartTrial, Subject},
    COOL_DOWN, SETTLE_AFTER, SETTLE_BEFORE, SETTLE_MAX,
};

pub(super) fn run_one(
    plan: &Plan,
    load: &LoadConfig,
    ctx: &Ctx,
    round: u32,
    s: Subject,
    tool: Option<&PathBuf>,
) -> RunRecord {
    let mut rec = RunRecord {
        load_kind: load.kind,
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
    let mut env = match Env::setup(load) {
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
            _ => Some(subject::start(s, ctx, tool.map(PathBuf::as_path))?),
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
        "xtask: bench: {} round {} {:<22}",
        rec.load_kind.name(),
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
        line += &format!(
            "  start {:.3} s  stop {:.3} s",
            m.start.as_secs_f64(),
            m.stop.as_secs_f64()
        );
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
/// attached to its first event on stdout, and SIGINT to exit with the load
/// still running.
pub(super) fn start_trial(load: &LoadConfig, ctx: &Ctx) -> Result<StartTrial> {
    wait_quiet();
    let mut env = Env::setup(load)?;
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
