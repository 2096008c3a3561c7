//! `cargo xtask fuzz [--seconds N]`: the fuzz targets of `fuzz/` (the ring
//! buffer record decoder and the sock_diag reply parser), each for a
//! bounded time; `cargo xtask test` runs them for [`TEST_SECONDS`] each.
//!
//! - Set-up (idempotent): cargo-fuzz [`CARGO_FUZZ_VERSION`], installed
//!   from crates.io with the stable toolchain when `cargo fuzz --version`
//!   does not report it (about 3 minutes, once); the nightly toolchain
//!   comes from `setup::ensure`.
//! - Build: `cargo +nightly fuzz build` into `target/fuzz` (libFuzzer with
//!   coverage and comparison tracing, overflow checks and debug assertions
//!   on; no sanitizer: the code fuzzed has no `unsafe`, and the targets
//!   count allocations themselves). The first build takes about 3 minutes
//!   (the tracer crate and its embedded kernel program), later ones
//!   seconds to half a minute.
//! - Run: each target, one after the other (the machine is shared), on its
//!   corpus in `target/fuzz/corpus/<target>` (kept between runs, not
//!   committed) and the committed inputs of `fuzz/regressions/<target>`
//!   (past crashes: replayed first, every run). A crash stops the run with
//!   the input saved under `target/fuzz/artifacts/<target>/`: fix it, add a
//!   unit test, and keep the input in `fuzz/regressions/<target>/`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::workspace_root;

pub(crate) const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Seconds each target runs for in `cargo xtask test`: with the
/// incremental build, the fuzzing step stays under 2 minutes.
pub(crate) const TEST_SECONDS: u64 = 40;

/// A fuzz target and the longest input it is given.
pub(crate) struct Target {
    pub name: &'static str,
    pub max_len: usize,
}

pub(crate) const TARGETS: &[Target] = &[
    // A batch, the longest record, is about 300 bytes.
    Target {
        name: "decode_record",
        max_len: 1024,
    },
    // Up to a few hundred messages in one datagram.
    Target {
        name: "sock_diag_reply",
        max_len: 16 << 10,
    },
];

/// Options of every `cargo fuzz` build and run (the same, or `run`
/// rebuilds).
const BUILD_ARGS: &[&str] = &[
    "--fuzz-dir",
    "fuzz",
    "--sanitizer",
    "none",
    "--debug-assertions",
    "--codegen-units",
    "16",
    "--target-dir",
    "target/fuzz",
];

/// Installs cargo-fuzz when `cargo fuzz --version` is not the pinned one.
pub(crate) fn ensure() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim()
                    == format!("cargo-fuzz {CARGO_FUZZ_VERSION}")
        });
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 3 minutes, once)");
    let status = clean(Command::new("cargo").args(["+stable", "install", "--locked", "--force"]))
        .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"))
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("installing cargo-fuzz {CARGO_FUZZ_VERSION} failed ({status})");
    }
    Ok(())
}

/// Set-up, build, then every target for `seconds`.
pub(crate) fn run(seconds: u64) -> Result<()> {
    crate::setup::ensure()?;
    ensure()?;
    let root = workspace_root();
    eprintln!("xtask: building the fuzz targets (nightly, libFuzzer)");
    cargo_fuzz(&root, &["build"], &[])?;
    let mut failed = Vec::new();
    for t in TARGETS {
        let corpus = root.join("target/fuzz/corpus").join(t.name);
        let artifacts = root.join("target/fuzz/artifacts").join(t.name);
        for dir in [&corpus, &artifacts] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut dirs = vec![path_str(&corpus)?];
        let regressions = root.join("fuzz/regressions").join(t.name);
        if regressions.is_dir() {
            dirs.push(path_str(&regressions)?);
        }
        eprintln!("xtask: fuzzing {} for {seconds} s", t.name);
        let options = [
            format!("-max_total_time={seconds}"),
            format!("-max_len={}", t.max_len),
            format!("-artifact_prefix={}/", path_str(&artifacts)?),
            // Per input, and for the whole process: decoding one input
            // takes microseconds and a few MB at most.
            "-timeout=10".into(),
            "-rss_limit_mb=512".into(),
            "-print_final_stats=1".into(),
        ];
        let mut args = vec!["run", t.name];
        args.extend(dirs.iter().map(String::as_str));
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        if let Err(e) = cargo_fuzz(&root, &args, &options) {
            eprintln!(
                "xtask: fuzz target {} failed: {e:#}; the input is in {}",
                t.name,
                artifacts.display()
            );
            failed.push(t.name);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found crashes in {} (fix them, make each a unit test, and keep \
             the input in fuzz/regressions/<target>/)",
            failed.join(", ")
        );
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

/// `cargo +nightly fuzz <args> <BUILD_ARGS> [-- <libfuzzer>]` in `root`.
fn cargo_fuzz(root: &PathBuf, args: &[&str], libfuzzer: &[&str]) -> Result<()> {
    let mut cmd = Command::new("cargo");
    clean(&mut cmd)
        .current_dir(root)
        .arg("+nightly")
        .arg("fuzz")
        .args(args.first())
        .args(BUILD_ARGS)
        .args(args.iter().skip(1));
    if !libfuzzer.is_empty() {
        cmd.arg("--").args(libfuzzer);
    }
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("`cargo fuzz {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Without the toolchain and flags of the cargo that runs xtask: rustup's
/// `+toolchain` decides, and cargo-fuzz sets its own flags.
fn clean(cmd: &mut Command) -> &mut Command {
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_its_file_and_the_test_budget_holds() {
        let root = workspace_root();
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(
                root.join(format!("fuzz/fuzz_targets/{}.rs", t.name))
                    .is_file(),
                "{}",
                t.name
            );
            assert!(manifest.contains(&format!("name = \"{}\"", t.name)));
        }
        // Fuzzing in `cargo xtask test`: at most 2 minutes with the build.
        assert!(TEST_SECONDS * TARGETS.len() as u64 <= 90);
    }
}
