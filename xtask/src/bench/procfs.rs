//! What the bench reads about a process and its eBPF programs: CPU time,
//! resident memory, the programs it holds (from `/proc/PID/fdinfo`, with
//! the kernel's run-time statistics) and their names (`bpftool -j`).

use std::{collections::BTreeMap, fs, process::Command, time::Duration};

use serde_json::{json, Value};

/// utime + stime of a `/proc/PID/stat` line, in clock ticks.
pub(crate) fn parse_stat_cpu_ticks(line: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: fields restart
    // after the last ')'. There, field 3 (state) is index 0, so utime
    // (field 14) is index 11 and stime (15) index 12.
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The first field of `/proc/PID/task/TID/schedstat`: time on the CPU, ns.
pub(crate) fn parse_schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// A `kB` line of `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB.
pub(crate) fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// `key:\tvalue` lines of a `/proc/PID/fdinfo/FD` file.
pub(crate) fn parse_fdinfo(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// One eBPF program a process holds, with the kernel's statistics (zero
/// unless BPF_ENABLE_STATS was on while it ran).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ProgStats {
    pub id: u32,
    pub name: Option<String>,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub recursion_misses: u64,
}

impl ProgStats {
    /// From a bpf-prog fd's fdinfo (None if it is not one).
    pub(crate) fn from_fdinfo(info: &BTreeMap<String, String>) -> Option<ProgStats> {
        // bpf_link fds carry a prog_id too, but no run_cnt.
        info.get("run_cnt")?;
        let num = |k: &str| info.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Some(ProgStats {
            id: info.get("prog_id")?.parse().ok()?,
            name: None,
            run_time_ns: num("run_time_ns"),
            run_cnt: num("run_cnt"),
            recursion_misses: num("recursion_misses"),
        })
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "run_time_ns": self.run_time_ns,
            "run_cnt": self.run_cnt,
            "recursion_misses": self.recursion_misses,
        })
    }
}

/// Programs in `bpftool prog show -j` output: id -> (name, stats).
pub(crate) fn parse_bpftool_progs(text: &str) -> BTreeMap<u32, ProgStats> {
    let Ok(Value::Array(progs)) = serde_json::from_str::<Value>(text) else {
        return BTreeMap::new();
    };
    progs
        .iter()
        .filter_map(|p| {
            let num = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
            let id = u32::try_from(p.get("id")?.as_u64()?).ok()?;
            Some((
                id,
                ProgStats {
                    id,
                    name: p.get("name").and_then(Value::as_str).map(str::to_string),
                    run_time_ns: num("run_time_ns"),
                    run_cnt: num("run_cnt"),
                    recursion_misses: num("recursion_misses"),
                },
            ))
        })
        .collect()
}

/// CPU time the process has used so far (all live threads), from
/// schedstat (ns) or, without it, from /proc/PID/stat (ticks).
pub(crate) fn cpu_time(pid: i32) -> Option<Duration> {
    let mut total = 0u64;
    let mut any = false;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let p = t.path().join("schedstat");
            if let Some(ns) = fs::read_to_string(p)
                .ok()
                .as_deref()
                .and_then(parse_schedstat_ns)
            {
                total += ns;
                any = true;
            }
        }
    }
    if any {
        return Some(Duration::from_nanos(total));
    }
    let line = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_cpu_ticks(&line)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// (VmRSS, VmHWM) in KiB.
pub(crate) fn memory_kib(pid: i32) -> (Option<u64>, Option<u64>) {
    match fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => (parse_status_kib(&s, "VmRSS"), parse_status_kib(&s, "VmHWM")),
        Err(_) => (None, None),
    }
}

/// Resident kilobytes of the eBPF maps the process has mapped (its ring
/// buffer: the kernel's memory, allocated whether or not it is mapped,
/// counted in its RSS; twice where a process maps the data pages twice,
/// as libbpf does, so that a record can wrap around).
pub(crate) fn mapped_bpf_maps_kib(pid: i32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/smaps"))
        .ok()
        .map(|s| parse_smaps_bpf_maps_kib(&s))
}

pub(crate) fn parse_smaps_bpf_maps_kib(smaps: &str) -> u64 {
    let mut in_map = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_map = line.contains("bpf-map") || line.contains("bpf_map");
        } else if first == "Rss:" && in_map {
            kib += fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib
}

/// What each of the process's fds is (`anon_inode:bpf-prog`, …).
pub(crate) fn fd_kinds(pid: i32) -> Vec<(String, String)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let target = fs::read_link(e.path()).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                target.to_string_lossy().into_owned(),
            ))
        })
        .collect()
}

/// Has a libbpf tool attached its program and opened its event buffer?
/// (a bpf_link, then the perf/ring buffer's epoll instance.)
pub(crate) fn libbpf_tool_ready(pid: i32) -> bool {
    let kinds = fd_kinds(pid);
    let has = |what: &str| kinds.iter().any(|(_, t)| t.contains(what));
    has("bpf_link") && has("[eventpoll]") && has("bpf-prog")
}

/// Has the process attached a program to this tracepoint? (`bpftool perf
/// show`: the perf-event attachments of every process.)
pub(crate) fn attached_to_tracepoint(pid: i32, tracepoint: &str) -> bool {
    Command::new("bpftool")
        .args(["perf", "show", "-j"])
        .output()
        .is_ok_and(|o| perf_attachment(&String::from_utf8_lossy(&o.stdout), pid, tracepoint))
}

/// Is there an attachment of `pid` to `tracepoint` in `bpftool perf show
/// -j` output?
pub(crate) fn perf_attachment(text: &str, pid: i32, tracepoint: &str) -> bool {
    let Ok(Value::Array(links)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    links.iter().any(|l| {
        l.get("pid").and_then(Value::as_i64) == Some(pid as i64)
            && l.get("tracepoint").and_then(Value::as_str) == Some(tracepoint)
    })
}

/// The eBPF programs the process holds, with the kernel's statistics, and
/// their names when bpftool is there.
pub(crate) fn programs_of(pid: i32) -> Vec<ProgStats> {
    let mut found: BTreeMap<u32, ProgStats> = BTreeMap::new();
    for (fd, target) in fd_kinds(pid) {
        if !target.contains("bpf-prog") {
            continue;
        }
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        if let Some(p) = ProgStats::from_fdinfo(&parse_fdinfo(&text)) {
            found.insert(p.id, p);
        }
    }
    if !found.is_empty() {
        if let Ok(out) = Command::new("bpftool")
            .args(["prog", "show", "-j"])
            .output()
        {
            let names = parse_bpftool_progs(&String::from_utf8_lossy(&out.stdout));
            for (id, p) in found.iter_mut() {
                p.name = names.get(id).and_then(|n| n.name.clone());
            }
        }
    }
    found.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_maps_are_summed_from_smaps() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 123 /usr/bin/tracer
Rss:                1024 kB
7f0000000000-7f0000401000 r--s 00000000 00:0f 9 anon_inode:bpf-map
Size:               4100 kB
Rss:                4100 kB
7f0000401000-7f0000402000 rw-s 00000000 00:0f 9 anon_inode:bpf-map
Rss:                   4 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";
        assert_eq!(parse_smaps_bpf_maps_kib(smaps), 4104);
    }

    #[test]
    fn stat_line_with_spaces_and_parens_in_comm() {
        let line = "4242 (tra cer) (x)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 37 0 0 20 0 2 0 123456 12345678 1500 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(line), Some(287));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn schedstat_and_status() {
        assert_eq!(parse_schedstat_ns("123456789 5000 42\n"), Some(123_456_789));
        let status =
            "Name:\ttracer\nVmPeak:\t   20000 kB\nVmHWM:\t    9876 kB\nVmRSS:\t    5432 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(9876));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(5432));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn fdinfo_of_a_program_and_of_a_link() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\nprog_type:\t5\n\
                    prog_jited:\t1\nprog_tag:\tc89482bf09319392\nmemlock:\t4096\nprog_id:\t2969\n\
                    run_time_ns:\t81234\nrun_cnt:\t321\nrecursion_misses:\t2\nverified_insns:\t123\n";
        let p = ProgStats::from_fdinfo(&parse_fdinfo(prog)).unwrap();
        assert_eq!(
            p,
            ProgStats {
                id: 2969,
                name: None,
                run_time_ns: 81234,
                run_cnt: 321,
                recursion_misses: 2
            }
        );
        let link = "pos:\t0\nflags:\t02000000\nlink_type:\tperf\nlink_id:\t724\n\
                    prog_tag:\tc89482bf09319392\nprog_id:\t2969\ntp_name:\tinet_sock_set_state\n";
        assert_eq!(ProgStats::from_fdinfo(&parse_fdinfo(link)), None);
    }

    #[test]
    fn bpftool_perf_json() {
        let text = r#"[{"pid":1036,"fd":8,"prog_id":908,"fd_type":"tracepoint","tracepoint":"inet_sock_set_state"},
            {"pid":7,"fd":3,"prog_id":9,"fd_type":"raw_tracepoint","tracepoint":"sys_enter"}]"#;
        assert!(perf_attachment(text, 1036, "inet_sock_set_state"));
        assert!(!perf_attachment(text, 7, "inet_sock_set_state"));
        assert!(!perf_attachment(text, 1037, "inet_sock_set_state"));
        assert!(!perf_attachment("", 1036, "inet_sock_set_state"));
    }

    #[test]
    fn bpftool_json() {
        let text = r#"[{"id":2736,"type":"tracepoint","name":"inet_sock_set_state","tag":"5d6f",
            "gpl_compatible":true,"run_time_ns":5000,"run_cnt":10,"recursion_misses":1,
            "map_ids":[1,2]},{"id":7,"type":"kprobe","tag":"ab"}]"#;
        let progs = parse_bpftool_progs(text);
        assert_eq!(progs.len(), 2);
        let p = &progs[&2736];
        assert_eq!(p.name.as_deref(), Some("inet_sock_set_state"));
        assert_eq!(
            (p.run_time_ns, p.run_cnt, p.recursion_misses),
            (5000, 10, 1)
        );
        assert_eq!(progs[&7].name, None);
        assert_eq!(progs[&7].run_cnt, 0);
        assert!(parse_bpftool_progs("not json").is_empty());
    }
}
