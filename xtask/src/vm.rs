//! Runs the integration suite inside other kernels: Debian's 6.1 and 6.12,
//! booted with QEMU under software emulation (no KVM on these machines).
//!
//! The kernels come from Debian's packages (`apt-get download`, unpacked
//! with `dpkg -x`, never installed) and are cached under `target/vm/`. The
//! guest is an initramfs with busybox-static, the statically linked (musl)
//! test binaries and tracer binary, and an init that runs the suite and
//! prints a pass/fail marker. QEMU's exit status says nothing about the
//! guest, so the marker on the serial console decides, and every boot is
//! bounded by a timeout.

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

pub const MUSL: &str = "x86_64-unknown-linux-musl";
const PASS: &str = "TRACER-VM-RESULT: PASS";
const FAIL: &str = "TRACER-VM-RESULT: FAIL";
/// Upper bound of one boot + suite; a normal run takes about a minute.
const BOOT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A Debian kernel series the suite runs on.
#[derive(Clone, Copy, Debug)]
pub struct Series {
    pub name: &'static str,
    /// `apt-cache search --names-only` pattern of its unsigned image.
    pattern: &'static str,
}

pub const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
    },
    Series {
        name: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
    },
];

pub fn series(name: &str) -> Option<Series> {
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

/// The kernel image of the series, downloaded and unpacked once.
pub fn kernel(series: Series) -> Result<PathBuf> {
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
    let download = cache.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    output(
        Command::new("apt-get")
            .args(["download", "-qq", &package])
            .current_dir(&download),
    )?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let unpack = cache.join(format!("{package}.tmp"));
    let _ = fs::remove_dir_all(&unpack);
    output(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpack))?;
    let image = find_image(&unpack).context("no boot/vmlinuz-* in the package")?;
    fs::create_dir_all(&dir)?;
    let kept = dir.join(image.file_name().expect("file name"));
    fs::copy(&image, &kept)?;
    extract_modules(&unpack, &modules_dir(&dir))?;
    let _ = fs::remove_dir_all(&unpack);
    let _ = fs::remove_dir_all(&download);
    Ok(kept)
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

/// The series' initramfs: the common archive followed by one holding its
/// kernel modules (the kernel unpacks concatenated cpio archives in order).
pub fn initramfs_for(common: &Path, kernel_image: &Path, series: Series) -> Result<PathBuf> {
    let kernel_dir = kernel_image
        .parent()
        .context("kernel image has a directory")?;
    let staging = vm_dir().join(format!("modules-{}", series.name));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(staging.join("modules"))?;
    for (i, name) in MODULES.iter().enumerate() {
        fs::copy(
            modules_dir(kernel_dir).join(name),
            staging.join("modules").join(format!("{i}-{name}")),
        )?;
    }
    let image = vm_dir().join(format!("initramfs-{}.cpio", series.name));
    let mut bytes = fs::read(common)?;
    let modules = Command::new("sh")
        .args(["-c", "find . | cpio --quiet -o -H newc -R 0:0"])
        .current_dir(&staging)
        .output()
        .context("running cpio")?;
    if !modules.status.success() {
        bail!("cpio failed");
    }
    bytes.extend_from_slice(&modules.stdout);
    fs::write(&image, bytes)?;
    Ok(image)
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

fn cached_image(cache: &Path, series: Series) -> Option<PathBuf> {
    let prefix = format!("linux-image-{}", series.name);
    fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .find_map(|e| find_image(&e.path()))
}

/// The guest's /init.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# Debian kernels allow fentry (checked by kernel_capabilities_are_probed).
# Emulated ticks run late: jiffies-based times are looser here (measured: 44 ms).
# TRACER_GUEST: no Prometheus tools here (summary_metrics.rs checks them on
# the host only).
export PATH=/bin TRACER_BIN=/bin/tracer HOME=/root TRACER_EXPECT_FENTRY=1 TRACER_TIMER_SLACK_MS=150 TRACER_GUEST=1
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
echo "TRACER-VM: kernel $(uname -r)"
status=0
for t in /tests/*; do
    echo "TRACER-VM: running $t"
    "$t" --test-threads=1 || status=1
done
if [ $status = 0 ]; then echo "TRACER-VM-RESULT: PASS"; else echo "TRACER-VM-RESULT: FAIL"; fi
poweroff -f
"#;

/// Builds the static test binaries and the initramfs that runs them.
pub fn build_initramfs(cargo: &dyn Fn(&[&str]) -> Result<String>) -> Result<PathBuf> {
    let json = cargo(&[
        "test",
        "--package",
        "tracer",
        "--test",
        "*",
        "--no-run",
        "--target",
        MUSL,
        "--message-format=json",
    ])?;
    let mut tests = Vec::new();
    for line in json.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["profile"]["test"] == true {
            if let Some(exe) = v["executable"].as_str() {
                tests.push(PathBuf::from(exe));
            }
        }
    }
    if tests.is_empty() {
        bail!("cargo built no integration test binaries for {MUSL}");
    }
    cargo(&[
        "build",
        "--package",
        "tracer",
        "--bin",
        "tracer",
        "--target",
        MUSL,
    ])?;
    let tracer = workspace_root()
        .join("target")
        .join(MUSL)
        .join("debug/tracer");

    let root = vm_dir().join("initramfs");
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "tests", "sys/fs/bpf", "sys/kernel/tracing"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static)")?;
    let init = root.join("init");
    fs::write(&init, INIT)?;
    set_executable(&init)?;
    strip_into(&tracer, &root.join("bin/tracer"))?;
    for t in &tests {
        strip_into(
            t,
            &root.join("tests").join(t.file_name().expect("file name")),
        )?;
    }
    let image = vm_dir().join("initramfs.cpio");
    let archive = fs::File::create(&image)?;
    let mut cpio = Command::new("sh")
        .args(["-c", "find . | cpio --quiet -o -H newc -R 0:0"])
        .current_dir(&root)
        .stdout(archive)
        .spawn()
        .context("running cpio")?;
    if !cpio.wait()?.success() {
        bail!("cpio failed");
    }
    Ok(image)
}

fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn strip_into(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(from)
        .status()?;
    if !status.success() {
        bail!("strip {} failed", from.display());
    }
    Ok(())
}

/// Boots `kernel` with `initrd`, echoes the console to stderr, and returns
/// Ok if the guest printed the pass marker.
pub fn boot(series: Series, kernel: &Path, initrd: &Path) -> Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-nographic",
            "-no-reboot",
            "-m",
            "1G",
            "-smp",
            "2",
        ])
        .args(["-nic", "none", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 oops=panic quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
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
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains(PASS) => verdict = Some(true),
            Ok(line) if line.contains(FAIL) => verdict = Some(false),
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
    let _ = child.wait();
    match verdict {
        Some(true) => Ok(started.elapsed()),
        Some(false) => bail!("the integration suite failed on Linux {name} (guest console above)"),
        None => bail!("Linux {name} guest stopped without a result marker (kernel panic or init failure; console above)"),
    }
}
