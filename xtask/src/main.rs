//! Project tasks. xtask only orchestrates: the eBPF build itself lives in
//! `tracer/build.rs`.
//!
//! - `cargo xtask setup`: installs what building needs (idempotent).
//! - `cargo xtask run -- <tracer args>`: set-up, release build, run.
//! - `cargo xtask test`: set-up, unit tests, a short fuzzing of the
//!   decoders (`src/fuzz.rs`), the deployment files' check
//!   (`src/deploy.rs`), then the integration tests that load the real
//!   program into the running kernel.
//! - `cargo xtask fuzz [--seconds N]`: the fuzzing alone, longer.
//! - `cargo xtask bench`: what tracing costs the traced, against an
//!   untraced baseline and libbpf-tools (`src/bench/`).
//! - `cargo xtask soak --minutes N`: the release tracer under every kind
//!   of traffic at once for N minutes, failing on an fd or memory leak or
//!   a transition count that does not add up (`src/soak/`).

mod bench;
mod deploy;
mod fuzz;
mod setup;
mod soak;
mod vm;

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "tracer's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces the eBPF build needs (idempotent).
    Setup,
    /// Build in release mode and run the tracer with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the unit tests, then the integration tests (root) on the host
    /// kernel and in QEMU guests with other kernels.
    Test {
        /// Which kernels run the integration suite: host, 6.1, 6.12 or all.
        #[arg(long, default_value = "all", value_parser = ["host", "6.1", "6.12", "all"])]
        kernel: String,
    },
    /// Fuzz the ring buffer record decoder and the sock_diag reply parser
    /// (cargo-fuzz, nightly; also run briefly by `test`).
    Fuzz {
        /// How long each fuzz target runs, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Validate deploy/kubernetes/daemonset.yaml against the Kubernetes
    /// schemas and its privileges against the README (also run by `test`).
    CheckDeploy,
    /// Benchmark: connections/s of a loopback load untraced and under the
    /// tracer in each mode (and libbpf-tools when installed), with events
    /// delivered, losses, CPU, memory and start time (root).
    Bench(bench::BenchArgs),
    /// Soak test: the release tracer for N minutes under churn, aborts, a
    /// restarted listener, sockets held in CLOSE_WAIT and namespaces made
    /// and deleted; fails on an fd leak, RSS growth or a transition count
    /// that does not add up (root).
    Soak(soak::SoakArgs),
    /// Internal to `bench --hold`: holds sockets in CLOSE_WAIT in the
    /// caller's network namespace.
    #[command(name = "bench-hold", hide = true)]
    BenchHold {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 0)]
        first_addr: u64,
        #[arg(long)]
        ipv6: bool,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Setup => setup::ensure(),
        Task::CheckDeploy => deploy::check(),
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Bench(args) => bench::run(args),
        Task::Soak(args) => soak::run(args),
        Task::BenchHold {
            port,
            count,
            first_addr,
            ipv6,
        } => bench::hold_helper(port, count, first_addr, ipv6),
        Task::Run { args } => {
            setup::ensure()?;
            cargo(&[
                "build",
                "--release",
                "--package",
                "tracer",
                "--bin",
                "tracer",
            ])?;
            let bin = workspace_root().join("target/release/tracer");
            // Replace xtask with the tracer so signals reach it directly.
            let err = Command::new(&bin).args(args).exec();
            Err(err).with_context(|| format!("running {}", bin.display()))
        }
        Task::Test { kernel } => {
            let guests: Vec<vm::Series> = match kernel.as_str() {
                "host" => vec![],
                "all" => vm::SERIES.to_vec(),
                name => vec![vm::series(name).expect("clap checked the value")],
            };
            setup::ensure_for_tests(!guests.is_empty())?;
            eprintln!("xtask: unit tests");
            cargo(&[
                "test",
                "--package",
                "tracer-common",
                "--package",
                "tracer",
                "--package",
                "xtask",
                "--lib",
                "--bins",
            ])?;
            // The decoders on arbitrary input, for a bounded time.
            eprintln!("xtask: fuzzing");
            fuzz::run(fuzz::TEST_SECONDS)?;
            // Kernel-independent, and quick: before the long part.
            eprintln!("xtask: deploy/ manifests");
            deploy::check()?;
            if kernel == "host" || kernel == "all" {
                eprintln!("xtask: integration tests on the host kernel (real eBPF program)");
                cargo(&[
                    "test",
                    "--package",
                    "tracer",
                    "--test",
                    "*",
                    "--",
                    "--test-threads=1",
                ])?;
            }
            if kernel == "host" || kernel == "all" {
                // A few seconds of the benchmark, to prove it runs; its
                // ratios are reported, never judged here.
                eprintln!("xtask: benchmark smoke run");
                cargo(&[
                    "run",
                    "--quiet",
                    "--package",
                    "xtask",
                    "--",
                    "bench",
                    "--smoke",
                ])?;
                // Two minutes of every kind of traffic at once: fails on
                // an fd leak, RSS growth or a count that does not add up.
                eprintln!("xtask: soak test (2 minutes)");
                cargo(&[
                    "run",
                    "--quiet",
                    "--package",
                    "xtask",
                    "--",
                    "soak",
                    "--minutes",
                    "2",
                ])?;
            }
            if guests.is_empty() {
                return Ok(());
            }
            let initrd = vm::build_initramfs(&cargo_stdout)?;
            // Every kernel runs even if one fails: all differences at once.
            let mut passed = Vec::new();
            let mut failed = Vec::new();
            for series in guests {
                let run = || -> Result<std::time::Duration> {
                    let image = vm::kernel(series)?;
                    eprintln!(
                        "xtask: integration tests on Linux {} ({}) under QEMU",
                        series.name,
                        image.display()
                    );
                    let initrd = vm::initramfs_for(&initrd, &image, series)?;
                    vm::boot(series, &image, &initrd)
                };
                match run() {
                    Ok(took) => passed.push(format!("{} {:.0}s", series.name, took.as_secs_f64())),
                    Err(e) => {
                        eprintln!("xtask: Linux {}: {e:#}", series.name);
                        failed.push(series.name);
                    }
                }
            }
            eprintln!(
                "xtask: guest kernels passed: {}",
                if passed.is_empty() {
                    "none".into()
                } else {
                    passed.join(", ")
                }
            );
            if !failed.is_empty() {
                bail!(
                    "the integration suite failed on Linux {}",
                    failed.join(", ")
                );
            }
            Ok(())
        }
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

fn cargo_command() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs cargo and returns its stdout (for `--message-format=json`).
fn cargo_stdout(args: &[&str]) -> Result<String> {
    let out = cargo_command()
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting cargo")?;
    if !out.status.success() {
        bail!("`cargo {}` failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs cargo (the one that runs xtask) in the workspace root.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("starting {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
