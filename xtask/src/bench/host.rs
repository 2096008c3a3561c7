//! The machine the bench runs on: how idle its CPUs are, the kernel's eBPF
//! run-time statistics, the open-file limit, and the host and git state
//! written into the results.
//!
//! In: /proc, bpf(2), getrlimit(2), `git`. Out: the idle share (after
//! waiting for quiet), a stats fd to hold, JSON for the results file.

use std::{
    fs, io,
    os::fd::{FromRawFd as _, OwnedFd},
    process::Command,
    thread,
    time::Duration,
};

use serde_json::{json, Value};

use super::{QUIET_IDLE, QUIET_MAX};

/// Waits until the CPUs are mostly idle (the previous run's namespace
/// freed, nobody else busy), at most QUIET_MAX; the last idle share seen.
pub(crate) fn wait_quiet() -> Option<(f64, Duration)> {
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
pub(crate) fn enable_bpf_stats() -> io::Result<OwnedFd> {
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
            size_of::<EnableStatsAttr>() as libc::c_uint,
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
pub(crate) fn raise_nofile_limit() {
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

pub(crate) fn host_json() -> Value {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default().trim().to_string();
    json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "cpus": thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(0),
        "model": read("/proc/cpuinfo").lines().find_map(|l| l.strip_prefix("model name")
            .and_then(|v| v.split_once(':')).map(|(_, v)| v.trim().to_string())),
    })
}

pub(crate) fn git_json(root: &std::path::Path) -> Value {
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
}
