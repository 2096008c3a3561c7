//! What the bench will do, from its command line.
//!
//! In: the `BenchArgs`. Out: a `Plan` (run length, rounds, the loads'
//! configurations in order, the subjects in order, start trials, kernel
//! stats), or
//! an error for arguments it cannot run with (`--smoke` shortens it and
//! keeps only the tracer subjects; `--no-peers` leaves out libbpf-tools
//! but keeps the floor).

use anyhow::{bail, Context as _, Result};

use super::{
    load::{LoadConfig, LoadKind},
    subject::Subject,
    BenchArgs,
};

pub(super) struct Plan {
    pub(super) seconds: f64,
    pub(super) rounds: u32,
    /// Each load is a block of rounds of its own, in this order.
    pub(super) loads: Vec<LoadConfig>,
    pub(super) subjects: Vec<Subject>,
    pub(super) start_trials: u32,
    pub(super) kernel_stats: bool,
    pub(super) smoke: bool,
}

pub(super) fn plan(args: &BenchArgs) -> Result<Plan> {
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
    if args.smoke && args.only.is_empty() {
        // The live view is left out: it proves nothing the others do not.
        subjects.retain(|s| s.is_tracer() && *s != Subject::TracerTop);
    }
    if args.no_peers {
        subjects.retain(|s| !s.is_peer());
    }
    if let Some(path) = &args.compare_tracer {
        if !path.is_file() {
            bail!("--compare-tracer: {} is not a file", path.display());
        }
        subjects = subjects
            .into_iter()
            .flat_map(|s| std::iter::once(s).chain(s.other()))
            .collect();
    }
    let mut loads = Vec::new();
    for kind in LoadKind::parse_list(&args.load)? {
        let load = LoadConfig {
            kind,
            threads: args.threads,
            connections: args.connections,
            mode: args.mode,
            ipv6: args.ipv6,
            rate: args.rate,
            hold: args.hold,
        };
        load.check()?;
        loads.push(load);
    }
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
        loads,
        subjects,
        start_trials,
        kernel_stats: !args.no_kernel_stats,
        smoke: args.smoke,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn loads_in_the_order_given() {
        let loads = |args: &[&str]| -> Result<Vec<LoadKind>> {
            let p = plan(&Cli::try_parse_from(args)?.bench)?;
            Ok(p.loads.iter().map(|l| l.kind).collect())
        };
        assert_eq!(loads(&["x"]).unwrap(), vec![LoadKind::Churn]);
        assert_eq!(
            loads(&["x", "--load", "all"]).unwrap(),
            vec![LoadKind::Churn, LoadKind::Nginx]
        );
        assert_eq!(
            loads(&["x", "--load", "nginx,churn"]).unwrap(),
            vec![LoadKind::Nginx, LoadKind::Churn]
        );
        assert_eq!(
            loads(&["x", "--load", "nginx", "--load", "churn,nginx"]).unwrap(),
            vec![LoadKind::Nginx, LoadKind::Churn]
        );
        assert!(loads(&["x", "--load", "apache"]).is_err());
        // wrk cannot be paced; churn can.
        assert!(loads(&["x", "--load", "all", "--rate", "1000"]).is_err());
        assert!(loads(&["x", "--rate", "1000"]).is_ok());
        let p =
            plan(&Cli::parse_from(["x", "--load", "nginx", "--connections", "8"]).bench).unwrap();
        assert_eq!((p.loads[0].threads, p.loads[0].connections), (2, 8));
        // Smoke stays churn-only unless told otherwise.
        assert_eq!(loads(&["x", "--smoke"]).unwrap(), vec![LoadKind::Churn]);
    }

    #[test]
    fn smoke_is_short_and_leaves_out_peers() {
        let p = plan(&Cli::parse_from(["x", "--smoke"]).bench).unwrap();
        assert_eq!((p.seconds, p.rounds, p.start_trials), (1.0, 1, 1));
        assert_eq!(p.loads.len(), 1);
        assert_eq!(p.loads[0].kind, LoadKind::Churn);
        assert!(p.subjects.iter().all(|s| s.is_tracer()));
        assert!(!p.subjects.contains(&Subject::TracerTop));
        let p = plan(&Cli::parse_from(["x", "--only", "tcplife,tracer-none"]).bench).unwrap();
        assert_eq!(p.subjects, vec![Subject::Tcplife, Subject::TracerNone]);
        assert!(plan(&Cli::parse_from(["x", "--only", "perf"]).bench).is_err());
        let p = plan(&Cli::parse_from(["x"]).bench).unwrap();
        assert_eq!(p.subjects.len(), 7);
        assert!(p.subjects.contains(&Subject::TracerTop));
        assert!(p.subjects.contains(&Subject::Floor));
        let p = plan(&Cli::parse_from(["x", "--no-peers"]).bench).unwrap();
        assert_eq!(
            p.subjects,
            vec![
                Subject::TracerJson,
                Subject::TracerConnections,
                Subject::TracerNone,
                Subject::TracerTop,
                Subject::Floor
            ]
        );
        let p = plan(&Cli::parse_from(["x", "--only", "floor"]).bench).unwrap();
        assert_eq!(p.subjects, vec![Subject::Floor]);
        assert_eq!((p.seconds, p.rounds), (5.0, 3));
    }
}
