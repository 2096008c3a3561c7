//! `cargo xtask setup`: the toolchain recipe of `shared/PLATFORM.md`,
//! idempotent and checked by running what it installs.
//!
//! - nightly with `rust-src` (the kernel program is built with
//!   `-Z build-std=core`);
//! - bpf-linker 0.13 built against the nightly's own libLLVM (no prebuilt
//!   binary can be downloaded, and the distribution's LLVM is too old),
//!   rebuilt when it no longer starts (the nightly's libLLVM changed).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::vm::Arch;

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the test suite uses (checked with dpkg, installed with
/// apt-get when missing):
/// - `prometheus`: `promtool check metrics` on the `/metrics` endpoint.
/// - `tmux`: a terminal for `tracer top`'s tests (tests/top.rs), read
///   with `capture-pane`.
pub(crate) const APT_PACKAGES: &[&str] = &["prometheus", "tmux"];

pub(crate) fn ensure() -> Result<()> {
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

/// Debian packages for running the suite in other kernels: a static
/// busybox for the guest's userland, cpio for its initramfs, xz for the
/// kernel's modules; QEMU per guest architecture ([`qemu_package`]).
pub(crate) const VM_APT_PACKAGES: &[&str] = &["busybox-static", "cpio", "xz-utils"];

/// The Debian package of the QEMU that emulates `arch`.
pub(crate) fn qemu_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86",
        Arch::Aarch64 => "qemu-system-arm",
    }
}

/// Set-up for the test suite: the build's, the Debian packages, the musl
/// targets of the release binaries (`cargo xtask dist`, all
/// architectures), and for guest kernels QEMU for their architectures and
/// Debian's packages of foreign architectures (their kernels, busybox).
pub(crate) fn ensure_for_tests(guests: &[Arch]) -> Result<()> {
    ensure()?;
    let mut packages = APT_PACKAGES.to_vec();
    if !guests.is_empty() {
        packages.extend_from_slice(VM_APT_PACKAGES);
    }
    for &arch in guests {
        if !packages.contains(&qemu_package(arch)) {
            packages.push(qemu_package(arch));
        }
    }
    ensure_for_dist(&Arch::ALL)?;
    ensure_lint_tools()?;
    for &arch in guests {
        ensure_foreign_architecture(arch)?;
    }
    ensure_apt_packages(&packages)
}

/// Set-up for `cargo xtask dist`: the musl target of every architecture
/// built (a foreign one links with rust-lld, which comes with the
/// toolchain).
pub(crate) fn ensure_for_dist(arches: &[Arch]) -> Result<()> {
    for &arch in arches {
        ensure_target(arch.musl())?;
    }
    Ok(())
}

/// apt knows the packages of `arch` (`dpkg --add-architecture`): only
/// downloaded and unpacked (guest kernels, busybox), never installed.
fn ensure_foreign_architecture(arch: Arch) -> Result<()> {
    if arch == Arch::host() {
        return Ok(());
    }
    let native = output(Command::new("dpkg").arg("--print-architecture"))?;
    let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if native.trim() == arch.name() || foreign.lines().any(|l| l.trim() == arch.name()) {
        return Ok(());
    }
    eprintln!(
        "xtask: dpkg --add-architecture {} (for its kernel packages)",
        arch.name()
    );
    run(Command::new("dpkg").args(["--add-architecture", arch.name()]))?;
    run(Command::new("apt-get").args(["update", "-qq"]))
}

/// Debian packages the bench uses: libbpf-tools (`tcpstates`, `tcplife`,
/// the reference it compares against), bpftool (program names, and
/// whether bpftrace has attached), bpftrace (the floor subject: a program
/// that only counts), nginx and wrk (the nginx load's server and client;
/// Debian's `nginx` is the server itself, `nginx-light` only adds a
/// module). Installing nginx does not start it where policy-rc.d forbids
/// services (containers like this one); the bench starts its own.
pub(crate) const BENCH_APT_PACKAGES: &[&str] =
    &["libbpf-tools", "bpftool", "bpftrace", "nginx", "wrk"];

/// Set-up for `cargo xtask bench` beyond the build's (which it runs first).
pub(crate) fn ensure_for_bench() -> Result<()> {
    ensure_apt_packages(BENCH_APT_PACKAGES)
}

/// rustfmt and clippy for the default toolchain, and clippy for the
/// nightly that checks the kernel program (installed `--profile minimal`).
pub(crate) fn ensure_lint_tools() -> Result<()> {
    let has = |toolchain: Option<&str>, tool: &str| {
        let mut cmd = Command::new("cargo");
        if let Some(t) = toolchain {
            cmd.arg(format!("+{t}"));
        }
        cmd.args([tool, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for (toolchain, component, tool) in [
        (None, "rustfmt", "fmt"),
        (None, "clippy", "clippy"),
        (Some(NIGHTLY), "clippy", "clippy"),
    ] {
        if has(toolchain, tool) {
            continue;
        }
        eprintln!(
            "xtask: adding {component} to {}",
            toolchain.unwrap_or("the default toolchain")
        );
        let mut cmd = Command::new("rustup");
        cmd.args(["component", "add", component]);
        if let Some(t) = toolchain {
            cmd.args(["--toolchain", t]);
        }
        run(&mut cmd)?;
    }
    Ok(())
}

fn ensure_target(target: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    eprintln!("xtask: adding the {target} target");
    run(Command::new("rustup").args(["target", "add", target]))
}

fn ensure_apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f", "${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Runs `cmd` and returns its stdout; its stderr goes to ours.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn ensure_nightly() -> Result<()> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        return Ok(());
    }
    eprintln!("xtask: installing the nightly toolchain");
    run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

fn ensure_rust_src() -> Result<()> {
    let src = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core");
    if src.is_dir() {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to {NIGHTLY}");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's libLLVM (about a minute)");
    let sysroot = nightly_sysroot()?;
    let version = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in rustc -vV")?
        .to_string();
    let lib = sysroot.join("lib");
    let llvm_so = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // This prefix becomes bpf-linker's RUNPATH: keep it stable per libLLVM.
    let home = std::env::var("HOME").context("HOME not set")?;
    let prefix = PathBuf::from(home)
        .join(".local/share/bpf-linker-llvm")
        .join(&llvm_so);
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so", llvm_so.as_str()] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm_so), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args(["+stable", "install", "--locked", "--force"])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        // Without it, build scripts find the distribution's LLVM 14.
        .env("LLVM_PREFIX", &prefix))?;
    if !bpf_linker_works() {
        bail!("bpf-linker was built but `bpf-linker --version` still fails");
    }
    Ok(())
}
