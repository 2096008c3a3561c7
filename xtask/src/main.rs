//! Project tasks. xtask only orchestrates: the eBPF build itself lives in
//! `tracer/build.rs`.
//!
//! - `cargo xtask setup`: installs what building needs (idempotent).
//! - `cargo xtask run -- <tracer args>`: set-up, release build, run.
//! - `cargo xtask test`: set-up, unit tests, a short fuzzing of the
//!   decoders (`src/fuzz.rs`), the deployment files'
//!   check (`src/deploy.rs`), the release tarballs and image checked
//!   (`src/dist.rs`, `src/oci.rs`), then the integration tests that load
//!   the real program into the running kernel and into QEMU guests of other
//!   kernels and of arm64 (`src/vm.rs`).
//! - `cargo xtask dist [--oci]`: release tarballs for amd64 and arm64, and
//!   the container image as an OCI layout.
//! - `cargo xtask fuzz [--seconds N]`: the fuzzing alone, longer.
//! - `cargo xtask lint`: rustfmt and clippy as `test` runs them first.
//! - `cargo xtask man`: the man page and shell completions in target/man
//!   (printed by the tracer itself, from its clap definitions).
//! - `cargo xtask bench`: what tracing costs the traced, against an
//!   untraced baseline and libbpf-tools (`src/bench/`).
//! - `cargo xtask soak --minutes N`: the release tracer under every kind
//!   of traffic at once for N minutes, failing on an fd or memory leak or
//!   a transition count that does not add up (`src/soak/`).

mod bench;
mod deploy;
mod dist;
mod elf;
mod fuzz;
mod oci;
mod setup;
mod smoke;
mod soak;
mod vm;

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use vm::Arch;

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
        /// Which kernels run the integration suite: host, a guest (6.1,
        /// 6.12: x86-64; 6.1-arm64, 6.12-arm64: arm64, emulated) or all.
        #[arg(long, default_value = "all", value_parser = ["host", "6.1", "6.12", "6.1-arm64", "6.12-arm64", "all"])]
        kernel: String,
        /// Only the guests of --kernel: no unit tests, deploy check,
        /// release checks or host suite (the guests still try the release
        /// binary of their architecture). For iterating on one guest.
        #[arg(long)]
        guests_only: bool,
        /// Only the integration tests whose name contains this (libtest's
        /// filter), on the host and in the guests. For iterating on a few
        /// tests; the full run has none.
        #[arg(long, value_name = "FILTER")]
        only: Option<String>,
    },
    /// Release tarballs (amd64, arm64: static binary, deploy/ files) with
    /// SHA256SUMS in target/dist; --oci adds the container image as an OCI
    /// image layout.
    Dist(dist::DistArgs),
    /// rustfmt --check and clippy -D warnings on every crate (the kernel
    /// program for its own target), as `test` runs first.
    Lint,
    /// Write the man page (target/man/man1/tracer.1) and the shell
    /// completions (target/man/completions/) from the tracer's CLI.
    Man,
    /// Fuzz the ring buffer record decoder and the sock_diag reply parser
    /// (cargo-fuzz, nightly; also run briefly by `test`).
    Fuzz {
        /// How long each fuzz target runs, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Validate deploy/kubernetes/daemonset.yaml against the Kubernetes
    /// schemas and its privileges against docs/deployment.md (also run by
    /// `test`).
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
        Task::Man => man(),
        Task::Lint => {
            setup::ensure()?;
            setup::ensure_lint_tools()?;
            lints()
        }
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
            let bin = release_tracer()?;
            // Replace xtask with the tracer so signals reach it directly.
            let err = Command::new(&bin).args(args).exec();
            Err(err).with_context(|| format!("running {}", bin.display()))
        }
        Task::Test {
            kernel,
            guests_only,
            only,
        } => test(&kernel, guests_only, only.as_deref()),
        Task::Dist(args) => dist::run(args),
    }
}

/// `cargo xtask test`: see the module doc and the README's "The two
/// commands".
fn test(kernel: &str, guests_only: bool, only: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let guests: Vec<vm::Series> = match kernel {
        "host" => vec![],
        "all" => vm::SERIES.iter().filter(|s| s.in_all).copied().collect(),
        name => vec![vm::series(name).expect("clap checked the value")],
    };
    let mut guest_arches: Vec<Arch> = Vec::new();
    for s in &guests {
        if !guest_arches.contains(&s.arch) {
            guest_arches.push(s.arch);
        }
    }
    if guests_only && guests.is_empty() {
        bail!("--guests-only needs guest kernels (--kernel is {kernel})");
    }
    setup::ensure_for_tests(&guest_arches)?;
    let mut took: Vec<(String, Duration)> = Vec::new();
    let mut step = |name: &str, since: Instant| took.push((name.to_string(), since.elapsed()));

    if !guests_only {
        let t = Instant::now();
        eprintln!("xtask: format and lints (rustfmt, clippy -D warnings)");
        lints()?;
        step("lints", t);
        let t = Instant::now();
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
        step("unit tests", t);
        // The decoders on arbitrary input, for a bounded time.
        let t = Instant::now();
        eprintln!("xtask: fuzzing");
        fuzz::run(fuzz::TEST_SECONDS)?;
        step("fuzzing", t);
        // Kernel-independent, and quick: before the long part.
        let t = Instant::now();
        eprintln!("xtask: deploy/ manifests");
        deploy::check()?;
        step("deploy check", t);
    }

    // The release build of every architecture, its tarballs and image,
    // checked (the x86-64 binary traces here); the guests try their
    // architecture's binary too. With --guests-only, only what the guests
    // run is built, and not checked here.
    let t = Instant::now();
    let dist = if guests_only {
        dist::build(&guest_arches, false)?
    } else {
        eprintln!("xtask: release tarballs and image (cargo xtask dist --oci), checked");
        let dist = dist::build(&Arch::ALL, true)?;
        dist::check(&dist)?;
        dist
    };
    step("dist", t);

    // Kernels whose suite failed: every kernel runs even if one fails,
    // to show all differences at once.
    let mut failed: Vec<String> = Vec::new();
    if !guests_only && (kernel == "host" || kernel == "all") {
        let t = Instant::now();
        eprintln!("xtask: integration tests on the host kernel (real eBPF program)");
        let mut args = vec![
            "test",
            "--package",
            "tracer",
            "--test",
            "*",
            "--no-fail-fast",
            "--",
            "--test-threads=1",
        ];
        args.extend(only);
        let host = cargo(&args);
        if let Err(e) = host {
            eprintln!("xtask: host kernel: {e:#}");
            failed.push("the host kernel".into());
        }
        step("host suite", t);
        // A few seconds of the benchmark, to prove it runs; its ratios are
        // reported, never judged here.
        let t = Instant::now();
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
        step("bench smoke", t);
        // Two minutes of every kind of traffic at once: fails on an fd
        // leak, a count that does not add up, or gross RSS growth. Two
        // minutes cannot resolve a slow growth: the 120k connections in
        // TIME_WAIT at 2,000/s are reached after 60 s and their timewait
        // polls step the heap by 5-7 MiB each, so only more than 32 MiB
        // over the window fails here (`cargo xtask soak --minutes 30`
        // judges the slope).
        let t = Instant::now();
        eprintln!("xtask: soak test (2 minutes)");
        let soak = cargo(&[
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--",
            "soak",
            "--minutes",
            "2",
            "--rss-floor",
            "32",
        ]);
        if let Err(e) = soak {
            eprintln!("xtask: soak: {e:#}");
            failed.push("the soak test".into());
        }
        step("soak", t);
    }

    let mut initrds = Vec::new();
    for &arch in &guest_arches {
        let t = Instant::now();
        let release = match dist.artifact(arch) {
            Some(a) => Some(dist::extract_binary(a)?),
            None => None,
        };
        initrds.push((
            arch,
            vm::build_initramfs(arch, release.as_deref(), &cargo_stdout_env)?,
        ));
        step(&format!("{} guest build", arch.name()), t);
    }
    for series in guests {
        let t = Instant::now();
        let run = || -> Result<Duration> {
            let image = vm::kernel(series)?;
            eprintln!(
                "xtask: integration tests on Linux {} ({}) under QEMU",
                series.name,
                image.display()
            );
            let common = &initrds
                .iter()
                .find(|(a, _)| *a == series.arch)
                .expect("built above")
                .1;
            let initrd = vm::initramfs_for(common, &image, series, only)?;
            vm::boot(
                series,
                &image,
                &initrd,
                dist.artifact(series.arch).is_some(),
            )
        };
        match run() {
            Ok(_) => step(&format!("Linux {}", series.name), t),
            Err(e) => {
                eprintln!("xtask: Linux {}: {e:#}", series.name);
                step(&format!("Linux {} (FAILED)", series.name), t);
                failed.push(format!("Linux {}", series.name));
            }
        }
    }
    let steps: Vec<String> = took
        .iter()
        .map(|(name, d)| format!("{name} {}", minutes(*d)))
        .collect();
    eprintln!(
        "xtask: test took {} ({})",
        minutes(started.elapsed()),
        steps.join(", ")
    );
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Builds the release tracer; its path.
pub(crate) fn release_tracer() -> Result<PathBuf> {
    cargo(&[
        "build",
        "--release",
        "--package",
        "tracer",
        "--bin",
        "tracer",
    ])?;
    Ok(workspace_root().join("target/release/tracer"))
}

/// `cargo fmt --check` and clippy with warnings denied: the workspace for
/// the host, and the kernel program for its own target (as its build.rs
/// builds it: nightly, build-std core).
fn lints() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "clippy",
            "--package",
            "tracer-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(workspace_root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .status()
        .context("starting cargo +nightly clippy")?;
    if !status.success() {
        bail!("clippy on the kernel program failed ({status})");
    }
    Ok(())
}

/// `cargo xtask man`: the debug tracer prints each file of
/// [`dist::GENERATED`] (the same files the tarballs ship).
fn man() -> Result<()> {
    cargo(&["build", "--package", "tracer", "--bin", "tracer"])?;
    let bin = workspace_root().join("target/debug/tracer");
    let out = workspace_root().join("target/man");
    for (path, args) in dist::GENERATED {
        // man(1) finds pages under a man1/ directory.
        let path = match path.strip_prefix("man/") {
            Some(page) => format!("man1/{page}"),
            None => path.to_string(),
        };
        let to = out.join(&path);
        let printed = Command::new(&bin)
            .args(*args)
            .output()
            .with_context(|| format!("running tracer {}", args.join(" ")))?;
        if !printed.status.success() || printed.stdout.is_empty() {
            bail!("`tracer {}` failed ({})", args.join(" "), printed.status);
        }
        std::fs::create_dir_all(to.parent().expect("a file path"))?;
        std::fs::write(&to, &printed.stdout)
            .with_context(|| format!("writing {}", to.display()))?;
        eprintln!("xtask: wrote {}", to.display());
    }
    eprintln!("xtask: read it with `man -l target/man/man1/tracer.1`");
    Ok(())
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
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

/// Runs cargo with `env` set and returns its stdout (for
/// `--message-format=json-render-diagnostics`: the compiler's messages
/// still reach stderr).
fn cargo_stdout_env(args: &[&str], env: &[(String, String)]) -> Result<String> {
    let out = cargo_command()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting cargo")?;
    if !out.status.success() {
        bail!(
            "`cargo {}` failed ({}){}",
            args.join(" "),
            out.status,
            disk_note()
        );
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
        bail!(
            "`cargo {}` failed ({status}){}",
            args.join(" "),
            disk_note()
        );
    }
    Ok(())
}

/// The space left where the builds go, for a failed build's message: a
/// build that runs out of disk fails with messages that do not say so
/// once they scroll by.
fn disk_note() -> String {
    let target = workspace_root().join("target");
    let Ok(path) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) else {
        return String::new();
    };
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return String::new();
    }
    let free = stat.f_bavail as u64 * stat.f_frsize as u64;
    format!(
        "; {:.1} GiB free in {}",
        free as f64 / (1u64 << 30) as f64,
        target.display()
    )
}
