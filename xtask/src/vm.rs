//! Runs the integration suite inside other kernels: Debian's 6.1 and 6.12,
//! for x86-64 and for arm64, booted with QEMU under software emulation (no
//! KVM on these machines).
//!
//! The kernels come from Debian's packages (`apt-get download`, unpacked
//! with `dpkg -x`, never installed) and are cached under `target/vm/`. The
//! guest is an initramfs with busybox-static, the statically linked (musl)
//! test binaries and tracer binary of the guest's architecture, the release
//! binary of `cargo xtask dist`, and an init that runs the suite and prints
//! pass/fail markers. QEMU's exit status says nothing about the guest, so
//! the markers on the serial console decide, and every boot is bounded by a
//! timeout.
//!
//! arm64 guests are emulated on the x86-64 machine (`qemu-system-aarch64 -M
//! virt`); their binaries are cross-built for `aarch64-unknown-linux-musl`
//! and linked with the toolchain's own `rust-lld` (no cross gcc needed).
//! The embedded eBPF object is the same program on both (`dist.rs`).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{setup::output, workspace_root};

const PASS: &str = "TRACER-VM-RESULT: PASS";
const FAIL: &str = "TRACER-VM-RESULT: FAIL";
const DIST_PASS: &str = "TRACER-VM-DIST: PASS";
const DIST_FAIL: &str = "TRACER-VM-DIST: FAIL";
/// What the guest's init prints first: the guest got as far as our code.
const INIT_MARK: &str = "TRACER-VM:";
/// Tries of `apt-get download` before a guest's kernel counts as missing.
const DOWNLOAD_ATTEMPTS: u64 = 3;
/// Upper bound of one boot + suite; a run takes 5-7 minutes, x86-64 and
/// arm64 alike, on the CI machine kind.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// A CPU architecture the tracer is built and tested for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub(crate) const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The Rust target of its static binaries.
    pub(crate) fn musl(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Debian's (and the OCI image spec's, Go's, Docker's) name of it:
    /// `amd64`, `arm64`. Names the release tarballs too.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The machine xtask runs on.
    pub(crate) fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

    /// ELF `e_machine` of its binaries.
    pub(crate) fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }

    /// Environment for cargo when building for this architecture's musl
    /// target: a foreign architecture links with rust-lld (shipped with
    /// the toolchain), since the machine has no cross gcc.
    pub(crate) fn cargo_env(self) -> Vec<(String, String)> {
        if self == Arch::host() {
            return vec![];
        }
        let var = format!(
            "CARGO_TARGET_{}_LINKER",
            self.musl().to_uppercase().replace('-', "_")
        );
        vec![(var, "rust-lld".into())]
    }

    fn qemu(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// QEMU's machine and CPU.
    fn machine(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => &["-cpu", "max"],
            // `max` emulates pointer authentication (which Debian's
            // kernel uses in every function) with the architected QARMA
            // cipher, the slowest part of emulating it; QEMU's own cheap
            // algorithm behaves the same for the guest.
            Arch::Aarch64 => &["-M", "virt", "-cpu", "max,pauth-impdef=on"],
        }
    }

    fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }
}

/// A Debian kernel series the suite runs on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Series {
    pub name: &'static str,
    pub arch: Arch,
    /// `apt-cache search --names-only` pattern of its unsigned image.
    pattern: &'static str,
    /// `<version>.` prefix of its package names (`linux-image-6.1.`).
    prefix: &'static str,
    /// Whether fentry programs attach there (TRACER_EXPECT_FENTRY):
    /// Debian's kernels do not lock ftrace, but fentry on a kernel
    /// function needs ftrace direct calls, which arm64 has since 6.4
    /// (6.12's config has CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS, 6.1's
    /// not: there fentry programs load but do not attach).
    fentry: bool,
    /// Run by `--kernel all` (every series is; the field says where to
    /// leave one out while it is not green).
    pub in_all: bool,
    /// The integration test binaries it runs, if not all: a named subset
    /// where emulation makes the whole suite too slow for one
    /// `cargo xtask test` (docs/kernels.md says which and why).
    pub subset: Option<&'static [&'static str]>,
}

pub(crate) const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        arch: Arch::X86_64,
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        prefix: "linux-image-6.1.",
        fentry: true,
        in_all: true,
        subset: None,
    },
    Series {
        name: "6.12",
        arch: Arch::X86_64,
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
        prefix: "linux-image-6.12.",
        fentry: true,
        in_all: true,
        subset: None,
    },
    Series {
        name: "6.1-arm64",
        arch: Arch::Aarch64,
        pattern: r"^linux-image-6\.1\.0-[0-9]+-arm64-unsigned$",
        prefix: "linux-image-6.1.",
        fentry: false,
        in_all: true,
        // What differs there: the record layout and BTF offsets on an
        // older arm64 kernel (integration), timewait deaths from the
        // sock_diag polls without fentry (lifecycle, closes), resets and
        // ephemeral ports; 6.12-arm64 runs the whole suite.
        subset: Some(&["integration", "lifecycle", "closes", "resets", "ports"]),
    },
    Series {
        name: "6.12-arm64",
        arch: Arch::Aarch64,
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-arm64-unsigned$",
        prefix: "linux-image-6.12.",
        fentry: true,
        in_all: true,
        subset: None,
    },
];

pub(crate) fn series(name: &str) -> Option<Series> {
    SERIES.iter().copied().find(|s| s.name == name)
}

fn vm_dir() -> PathBuf {
    workspace_root().join("target/vm")
}

/// The newest package of the series that apt knows.
fn newest_package(series: Series) -> Result<Option<String>> {
    let search =
        || output(Command::new("apt-cache").args(["search", "--names-only", series.pattern]));
    let mut found = search()?;
    if found.trim().is_empty() {
        output(Command::new("apt-get").args(["update", "-qq"]))?;
        found = search()?;
    }
    let mut names: Vec<String> = found
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    // Sort by the numbers in the name: 6.1.0-9 < 6.1.0-10.
    names.sort_by_key(|n| {
        n.split(|c: char| !c.is_ascii_digit())
            .filter_map(|d| d.parse::<u64>().ok())
            .collect::<Vec<_>>()
    });
    Ok(names.pop())
}

/// Downloads a Debian package of `arch` and unpacks it into `into`.
fn download_unpack(package: &str, arch: Arch, into: &Path) -> Result<()> {
    let download = into.with_extension("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    // The package mirror is the one network dependency of a guest run; a
    // transient failure there must not fail a whole `cargo xtask test`.
    let mut attempt = 1;
    while let Err(e) = output(
        Command::new("apt-get")
            .args(["download", "-qq", &format!("{package}:{}", arch.name())])
            .current_dir(&download),
    ) {
        if attempt == DOWNLOAD_ATTEMPTS {
            return Err(e.context(format!("{DOWNLOAD_ATTEMPTS} attempts")));
        }
        eprintln!("xtask: {e:#}; trying again");
        thread::sleep(Duration::from_secs(5 * attempt));
        attempt += 1;
    }
    let deb = fs::read_dir(&download)?
        .filter_map(std::result::Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let _ = fs::remove_dir_all(into);
    output(Command::new("dpkg").arg("-x").arg(&deb).arg(into))?;
    let _ = fs::remove_dir_all(&download);
    Ok(())
}

/// The kernel image of the series, downloaded and unpacked once.
pub(crate) fn kernel(series: Series) -> Result<PathBuf> {
    let cache = vm_dir().join("kernels");
    fs::create_dir_all(&cache)?;
    let package = match newest_package(series) {
        Ok(Some(p)) => p,
        other => {
            // Offline or no such package: use a cached image of the series.
            let cached = cached_image(&cache, series);
            return cached.ok_or_else(|| {
                anyhow!(
                    "no Debian {} kernel package found ({other:?}) and none cached",
                    series.name
                )
            });
        }
    };
    let dir = cache.join(&package);
    if let Some(image) =
        find_image(&dir).filter(|_| modules_dir(&dir).join(MODULES[MODULES.len() - 1]).exists())
    {
        return Ok(image);
    }
    eprintln!("xtask: downloading {package}");
    let unpack = cache.join(format!("{package}.tmp"));
    download_unpack(&package, series.arch, &unpack)?;
    let image = find_image(&unpack).context("no boot/vmlinuz-* in the package")?;
    fs::create_dir_all(&dir)?;
    let kept = dir.join(image.file_name().expect("file name"));
    fs::copy(&image, &kept)?;
    extract_modules(&unpack, &modules_dir(&dir))?;
    let _ = fs::remove_dir_all(&unpack);
    Ok(kept)
}

/// A static busybox for the guest's userland: the host's own (package
/// busybox-static) for its architecture, Debian's busybox-static of the
/// other one downloaded and unpacked (never installed) otherwise.
fn busybox(arch: Arch) -> Result<PathBuf> {
    if arch == Arch::host() {
        return Ok(PathBuf::from("/bin/busybox"));
    }
    let dir = vm_dir().join(format!("busybox-{}", arch.name()));
    let bin = dir.join("bin/busybox");
    if !bin.exists() {
        eprintln!("xtask: downloading busybox-static:{}", arch.name());
        download_unpack("busybox-static", arch, &dir)?;
    }
    crate::elf::Elf::read(&bin)?.expect_machine(arch)?;
    Ok(bin)
}

/// Modules the guest loads, in order: sock_diag for TCP (`inet_diag`,
/// `tcp_diag`) is a module in Debian's kernels, loaded on demand by modprobe
/// on a normal system; the guest has no modprobe, so init insmods them.
const MODULES: &[&str] = &["inet_diag.ko", "tcp_diag.ko"];

fn modules_dir(kernel_dir: &Path) -> PathBuf {
    kernel_dir.join("modules")
}

fn extract_modules(unpacked: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    let lib = unpacked.join("lib/modules");
    let version = fs::read_dir(&lib)?
        .flatten()
        .next()
        .context("no lib/modules/<version> in the package")?
        .path();
    for name in MODULES {
        let xz = version.join("kernel/net/ipv4").join(format!("{name}.xz"));
        let plain = version.join("kernel/net/ipv4").join(name);
        let out = to.join(name);
        if plain.exists() {
            fs::copy(&plain, &out)?;
        } else {
            let data = Command::new("xz")
                .arg("-dc")
                .arg(&xz)
                .output()
                .with_context(|| format!("xz -dc {}", xz.display()))?;
            if !data.status.success() {
                bail!("xz -dc {} failed", xz.display());
            }
            fs::write(&out, data.stdout)?;
        }
    }
    Ok(())
}

/// The series' own part of the guest's environment: what the tests may
/// expect of this kernel, and the test filter of `--only`.
fn series_env(series: Series, only: Option<&str>) -> String {
    let mut env = format!(
        "export TRACER_EXPECT_FENTRY={}\n",
        if series.fentry { 1 } else { 0 }
    );
    if let Some(binaries) = series.subset {
        env.push_str(&format!(
            "export TRACER_TEST_BINARIES='{}'\n",
            binaries.join(" ")
        ));
    }
    if let Some(filter) = only {
        // Single-quoted for the guest's shell.
        env.push_str(&format!(
            "export TRACER_TEST_FILTER='{}'\n",
            filter.replace('\'', "'\\''")
        ));
    }
    env
}

/// The series' initramfs: the common archive of its architecture followed
/// by one holding its kernel modules and environment (the kernel unpacks
/// concatenated cpio archives in order).
pub(crate) fn initramfs_for(
    common: &Path,
    kernel_image: &Path,
    series: Series,
    only: Option<&str>,
) -> Result<PathBuf> {
    let kernel_dir = kernel_image
        .parent()
        .context("kernel image has a directory")?;
    let staging = vm_dir().join(format!("series-{}", series.name));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(staging.join("modules"))?;
    for (i, name) in MODULES.iter().enumerate() {
        fs::copy(
            modules_dir(kernel_dir).join(name),
            staging.join("modules").join(format!("{i}-{name}")),
        )?;
    }
    fs::write(staging.join("series.env"), series_env(series, only))?;
    let image = vm_dir().join(format!("initramfs-{}.cpio", series.name));
    let mut bytes = fs::read(common)?;
    bytes.extend_from_slice(&cpio(&staging)?);
    fs::write(&image, bytes)?;
    Ok(image)
}

/// A newc cpio archive of `dir`, owned by root.
fn cpio(dir: &Path) -> Result<Vec<u8>> {
    let out = Command::new("sh")
        .args([
            "-c",
            "find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0",
        ])
        .current_dir(dir)
        .output()
        .context("running cpio")?;
    if !out.status.success() {
        bail!("cpio failed");
    }
    Ok(out.stdout)
}

fn find_image(dir: &Path) -> Option<PathBuf> {
    for sub in [dir.to_path_buf(), dir.join("boot")] {
        if let Ok(entries) = fs::read_dir(&sub) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("vmlinuz-") {
                    return Some(e.path());
                }
            }
        }
    }
    None
}

/// A cached image of the series (offline), e.g.
/// `linux-image-6.1.0-57-arm64-unsigned` for 6.1-arm64, not 6.12's.
fn cached_image(cache: &Path, series: Series) -> Option<PathBuf> {
    let suffix = format!("-{}-unsigned", series.arch.name());
    let mut dirs: Vec<PathBuf> = fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(series.prefix) && name.ends_with(&suffix)
        })
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.iter().rev().find_map(|d| find_image(d))
}

/// The guest's /init.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# Emulated ticks run late: jiffies-based times are looser here (measured: 44 ms).
# TRACER_GUEST: no Prometheus tools here (summary_metrics.rs checks them on
# the host only).
export PATH=/bin TRACER_BIN=/bin/tracer HOME=/root TRACER_TIMER_SLACK_MS=150 TRACER_GUEST=1
# The series' own: TRACER_EXPECT_FENTRY (whether fentry attaches there,
# checked by kernel_capabilities_are_probed and lifecycle.rs).
. /series.env
mkdir -p /proc /sys /dev /tmp /root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t bpf bpf /sys/fs/bpf
# The whole cgroup v2 hierarchy, as systemd mounts it: tests/cgroups.rs
# makes cgroups in it (it finds the mount in /proc/self/mountinfo).
mount -t cgroup2 none /sys/fs/cgroup
# tracefs is left unmounted on purpose: the tracer mounts it when needed.
for m in /modules/*.ko; do insmod "$m" || echo "TRACER-VM: insmod $m failed"; done
ip link set lo up
echo "TRACER-VM: kernel $(uname -r) $(uname -m)"

# The release binary of `cargo xtask dist`, from its tarball: a short real
# trace of one loopback connection. The client sends a line and closes
# first; the server's stdin stays open, so that it closes on the client's
# FIN (CLOSE_WAIT, LAST_ACK), not on its own stdin's end, at the same
# time as the client (both FIN_WAIT1 -> CLOSING, seen on 6.1).
dist_smoke() {
    [ -x /dist/tracer ] || return 0
    echo "TRACER-VM: dist binary: $(/dist/tracer --version)"
    /dist/tracer --port 7777 --duration 6s --events all -v >/tmp/dist.out 2>/tmp/dist.err &
    pid=$!
    i=0
    while ! grep -q attached /tmp/dist.err; do
        i=$((i + 1))
        if [ $i -gt 600 ]; then echo "TRACER-VM: dist binary did not attach"; break; fi
        sleep 0.1
    done
    sleep 2 | nc -l -p 7777 >/tmp/dist.nc &
    sleep 0.3
    echo hello | nc 127.0.0.1 7777
    wait $pid
    rc=$?
    cat /tmp/dist.out /tmp/dist.err
    ok=1
    [ $rc = 0 ] || { echo "TRACER-VM: dist binary exited with $rc"; ok=0; }
    for t in "CLOSE -> SYN_SENT" "SYN_SENT -> ESTABLISHED" "LISTEN -> SYN_RECV" "SYN_RECV -> ESTABLISHED" "ESTABLISHED -> FIN_WAIT1" "ESTABLISHED -> CLOSE_WAIT" "CLOSE_WAIT -> LAST_ACK" "LAST_ACK -> CLOSE"; do
        grep -q " $t " /tmp/dist.out || { echo "TRACER-VM: dist binary did not print $t"; ok=0; }
    done
    grep -q "^tracer: [0-9]* events, 0 lost" /tmp/dist.err || { echo "TRACER-VM: no summary line with 0 lost"; ok=0; }
    grep -q "^hello$" /tmp/dist.nc || { echo "TRACER-VM: the connection carried nothing"; ok=0; }
    if [ $ok = 1 ]; then echo "TRACER-VM-DIST: PASS"; else echo "TRACER-VM-DIST: FAIL"; fi
}
dist_smoke

status=0
for t in /tests/*; do
    if [ -n "$TRACER_TEST_BINARIES" ] && ! echo " $TRACER_TEST_BINARIES " | grep -q " ${t##*/} "; then
        echo "TRACER-VM: $t is not in this series' subset"
        continue
    fi
    echo "TRACER-VM: running $t"
    "$t" --test-threads=1 ${TRACER_TEST_FILTER:+"$TRACER_TEST_FILTER"} || status=1
done
if [ $status = 0 ]; then echo "TRACER-VM-RESULT: PASS"; else echo "TRACER-VM-RESULT: FAIL"; fi
poweroff -f
"#;

/// Runs cargo with arguments and environment, returns its stdout.
pub(crate) type CargoStdout = dyn Fn(&[&str], &[(String, String)]) -> Result<String>;

/// Builds `arch`'s static test binaries and the initramfs that runs them
/// (with `dist`, the release binary to try, when given).
pub(crate) fn build_initramfs(
    arch: Arch,
    dist: Option<&Path>,
    cargo: &CargoStdout,
) -> Result<PathBuf> {
    let musl = arch.musl();
    // Debug info is left out rather than stripped afterwards: binutils'
    // strip knows only the host's architecture.
    let mut env = arch.cargo_env();
    env.push(("CARGO_PROFILE_DEV_DEBUG".into(), "false".into()));
    env.push(("CARGO_PROFILE_DEV_STRIP".into(), "debuginfo".into()));
    let json = cargo(
        &[
            "test",
            "--package",
            "tracer",
            "--test",
            "*",
            "--no-run",
            "--target",
            musl,
            "--message-format=json-render-diagnostics",
        ],
        &env,
    )?;
    let mut tests = Vec::new();
    for line in json.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["profile"]["test"] == true {
            if let (Some(exe), Some(name)) =
                (v["executable"].as_str(), v["target"]["name"].as_str())
            {
                tests.push((name.to_string(), PathBuf::from(exe)));
            }
        }
    }
    if tests.is_empty() {
        bail!("cargo built no integration test binaries for {musl}");
    }
    let json = cargo(
        &[
            "build",
            "--package",
            "tracer",
            "--bin",
            "tracer",
            "--target",
            musl,
            "--message-format=json-render-diagnostics",
        ],
        &env,
    )?;
    let tracer = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "tracer")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo built no tracer binary")?;

    let root = vm_dir().join(format!("initramfs-{}", arch.name()));
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "tests", "dist", "sys/fs/bpf", "sys/kernel/tracing"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy(busybox(arch)?, root.join("bin/busybox")).context("copying busybox")?;
    set_executable(&root.join("bin/busybox"))?;
    let init = root.join("init");
    fs::write(&init, INIT)?;
    set_executable(&init)?;
    copy_checked(&tracer, &root.join("bin/tracer"), arch)?;
    for (name, t) in &tests {
        copy_checked(t, &root.join("tests").join(name), arch)?;
    }
    if let Some(dist) = dist {
        copy_checked(dist, &root.join("dist/tracer"), arch)?;
    }
    let image = vm_dir().join(format!("initramfs-{}.cpio", arch.name()));
    fs::write(&image, cpio(&root)?)?;
    Ok(image)
}

fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Copies a binary into the guest, refusing one of another architecture
/// or one that needs a dynamic loader (the guest has none).
fn copy_checked(from: &Path, to: &Path, arch: Arch) -> Result<()> {
    let elf = crate::elf::Elf::read(from)?;
    elf.expect_machine(arch)?;
    if let Some(interp) = &elf.interpreter {
        bail!("{} is dynamically linked ({interp})", from.display());
    }
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// Boots `kernel` with `initrd`, echoes the console to stderr, and returns
/// how long it took if the guest printed the pass marker (and, with
/// `dist`, the release binary's).
pub(crate) fn boot(series: Series, kernel: &Path, initrd: &Path, dist: bool) -> Result<Duration> {
    // A fault of the emulated machine, not of the tracer: one more boot
    // says which.
    let why = match boot_once(series, kernel, initrd, dist)? {
        Boot::Done(took) => return Ok(took),
        Boot::MachineFault(why) => why,
    };
    eprintln!("xtask: Linux {}: {why}; booting again", series.name);
    match boot_once(series, kernel, initrd, dist)? {
        Boot::Done(took) => Ok(took),
        Boot::MachineFault(why) => bail!("{why}, twice"),
    }
}

/// How a boot ended when the suite did not fail.
enum Boot {
    Done(Duration),
    /// The guest stopped before its init printed anything (QEMU or the
    /// kernel failed), or its kernel met a breakpoint of its own text
    /// patching (see [`STALE_INT3`]).
    MachineFault(String),
}

/// The guest kernel's oops when a CPU executes the `int3` the kernel plants
/// while it patches its own code (a tracepoint's static key turned off as
/// the last program detaches) after the patch is done. The kernel only
/// plants it for the patch's duration and handles every hit meanwhile;
/// QEMU's multi-threaded TCG can still run a translation of the code
/// taken mid-patch on the other vCPU. Seen once in the 6.12 guest (at
/// `inet_sk_state_store`, a test detaching under load); no eBPF program
/// can write kernel text.
const STALE_INT3: &str = "Oops: int3";

fn boot_once(series: Series, kernel: &Path, initrd: &Path, dist: bool) -> Result<Boot> {
    let started = Instant::now();
    let arch = series.arch;
    let mut child = Command::new(arch.qemu())
        .args(["-accel", "tcg,thread=multi"])
        .args(arch.machine())
        .args(["-nographic", "-no-reboot", "-m", "1G", "-smp", "2"])
        .args(["-nic", "none", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console={} panic=-1 oops=panic quiet",
            arch.console()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", arch.qemu()))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let name = series.name;
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            // The console carries escape codes and CRs; keep the text.
            let line: String = String::from_utf8_lossy(&buf)
                .chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect();
            eprintln!("[{name}] {line}");
            let _ = tx.send(line);
            buf.clear();
        }
    });
    let mut verdict = None;
    let mut dist_verdict = None;
    let mut init_ran = false;
    let mut stale_int3 = None;
    loop {
        let line = rx.recv_timeout(Duration::from_millis(200));
        if line.as_ref().is_ok_and(|l| l.contains(INIT_MARK)) {
            init_ran = true;
        }
        if let Ok(l) = &line {
            if stale_int3.is_none() && l.contains(STALE_INT3) {
                stale_int3 = Some(l.trim().to_owned());
            }
        }
        match line {
            Ok(line) if line.contains(PASS) => verdict = Some(true),
            Ok(line) if line.contains(FAIL) => verdict = Some(false),
            Ok(line) if line.contains(DIST_PASS) => dist_verdict = Some(true),
            Ok(line) if line.contains(DIST_FAIL) => dist_verdict = Some(false),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if started.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("Linux {name} guest did not finish within {BOOT_TIMEOUT:?}");
        }
    }
    let status = child.wait();
    let took = started.elapsed();
    if !init_ran {
        return Ok(Boot::MachineFault(format!(
            "Linux {name} guest stopped after {took:.1?} before its init ran ({})",
            status.map_or_else(|e| e.to_string(), |s| s.to_string())
        )));
    }
    if let (None, Some(oops)) = (verdict, stale_int3) {
        return Ok(Boot::MachineFault(format!(
            "Linux {name} guest kernel stopped after {took:.1?} on an int3 of its own text patching, an emulator race ({oops})"
        )));
    }
    if dist && dist_verdict != Some(true) {
        bail!("the release binary of `cargo xtask dist` failed its trace on Linux {name} (guest console above)");
    }
    match verdict {
        Some(true) => Ok(Boot::Done(took)),
        Some(false) => bail!("the integration suite failed on Linux {name} (guest console above)"),
        None => bail!("Linux {name} guest stopped without a result marker (kernel panic or init failure; console above)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_names_are_unique_and_arm64_is_named_so() {
        for s in SERIES {
            assert_eq!(
                SERIES.iter().filter(|o| o.name == s.name).count(),
                1,
                "{}",
                s.name
            );
            assert_eq!(s.name.ends_with("-arm64"), s.arch == Arch::Aarch64);
            assert!(s.pattern.contains(s.arch.name()), "{}", s.name);
        }
    }

    #[test]
    fn the_test_filter_reaches_the_guest_quoted() {
        let s = series("6.1").unwrap();
        assert_eq!(series_env(s, None), "export TRACER_EXPECT_FENTRY=1\n");
        assert_eq!(
            series_env(s, Some("it's")),
            "export TRACER_EXPECT_FENTRY=1\nexport TRACER_TEST_FILTER='it'\\''s'\n"
        );
    }

    #[test]
    fn subsets_name_test_binaries_that_exist_and_reach_the_guest() {
        for s in SERIES {
            let Some(subset) = s.subset else { continue };
            for name in subset {
                let file = workspace_root().join(format!("tracer/tests/{name}.rs"));
                assert!(file.is_file(), "{}: {}", s.name, file.display());
            }
            assert!(series_env(*s, None).contains(&format!(
                "export TRACER_TEST_BINARIES='{}'",
                subset.join(" ")
            )));
        }
    }

    #[test]
    fn cached_images_are_found_by_series_and_arch() {
        let dir = std::env::temp_dir().join(format!("xtask-vm-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (pkg, image) in [
            (
                "linux-image-6.12.118+deb12-arm64-unsigned",
                "vmlinuz-6.12-arm",
            ),
            (
                "linux-image-6.12.118+deb12-amd64-unsigned",
                "vmlinuz-6.12-x86",
            ),
            ("linux-image-6.1.0-57-amd64-unsigned", "vmlinuz-6.1-x86"),
        ] {
            fs::create_dir_all(dir.join(pkg)).unwrap();
            fs::write(dir.join(pkg).join(image), b"").unwrap();
        }
        let found = |name| {
            cached_image(&dir, series(name).unwrap())
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        };
        assert_eq!(found("6.1").as_deref(), Some("vmlinuz-6.1-x86"));
        assert_eq!(found("6.12").as_deref(), Some("vmlinuz-6.12-x86"));
        assert_eq!(found("6.12-arm64").as_deref(), Some("vmlinuz-6.12-arm"));
        assert_eq!(found("6.1-arm64"), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
