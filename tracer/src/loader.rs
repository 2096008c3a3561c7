//! Loads the embedded kernel program, sets its filters and map sizes, and
//! attaches it to `sock:inet_sock_set_state`.

use std::{ffi::CString, io, path::Path};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, MapData, PerCpuArray, RingBuf,
    },
    programs::{FEntry, TracePoint},
    Ebpf, EbpfLoader,
};
use thiserror::Error;
use tracer_common::{
    counter, global, map, MAX_FILTER_PORTS, MAX_FILTER_PREFIXES, PROGRAM_NAME, TIMEWAIT_FUNCTION,
    TIMEWAIT_PROGRAM,
};

use crate::{
    btf_offsets::{self, KernelOffsets},
    events::Family,
    features::{self, Capabilities},
    filters::{self, Filters},
};

/// The kernel object built by `build.rs`.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

const REMEDY: &str = "run it as root (sudo), or grant CAP_BPF and CAP_PERFMON";

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("tracer needs privileges to load eBPF programs: {REMEDY}")]
    NotPrivileged,
    #[error("the kernel refused the eBPF program ({0}): {REMEDY}")]
    Refused(String),
    #[error(
        "this kernel has no sock:inet_sock_set_state tracepoint (it needs Linux 4.16 or later, \
         built with CONFIG_TRACEPOINTS)"
    )]
    NoTracepoint,
    #[error(
        "cannot reach tracefs ({0}); mount it with: mount -t tracefs nodev /sys/kernel/tracing"
    )]
    Tracefs(io::Error),
    #[error("this kernel has no BPF ring buffer (it needs Linux 5.8 or later)")]
    NoRingBuf,
    #[error("at most {MAX_FILTER_PORTS} ports can be given to one port filter, got {0}")]
    TooManyPorts(usize),
    #[error("at most {MAX_FILTER_PREFIXES} prefixes can be given to --laddr or --raddr, got {0}")]
    TooManyPrefixes(usize),
    #[error(
        "--netns needs the kernel's BTF (/sys/kernel/btf/vmlinux) to find each socket's namespace"
    )]
    NetnsNeedsBtf,
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub filters: Filters,
    pub max_sockets: u32,
    pub ringbuf_bytes: u32,
    /// Ring buffer fill that wakes the agent (0: every event). The agent
    /// must also drain on a timer: below the threshold nothing wakes it.
    pub wakeup_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            filters: Filters::default(),
            max_sockets: 65536,
            ringbuf_bytes: 4 << 20,
            wakeup_bytes: 0,
        }
    }
}

/// The loaded, attached program and the maps the agent reads. Dropping it
/// detaches the program and frees the maps.
pub struct Probe {
    pub events: RingBuf<MapData>,
    pub capabilities: Capabilities,
    /// Kernel offsets found in BTF (netns of each socket, when known).
    pub offsets: KernelOffsets,
    pub counters: KernelCounters,
    /// The kernel program's aya-log records (rare errors), if any.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    _ebpf: Ebpf,
}

/// Sums of the kernel program's per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub seen: u64,
    pub filtered: u64,
    pub ringbuf_full: u64,
    pub timing_update_failed: u64,
    pub timing_stale: u64,
    pub listeners_full: u64,
    pub timewait_unreadable: u64,
}

pub struct KernelCounters(PerCpuArray<MapData, u64>);

impl KernelCounters {
    pub fn read(&self) -> Result<CounterValues, aya::maps::MapError> {
        let sum =
            |i: u32| -> Result<u64, aya::maps::MapError> { Ok(self.0.get(&i, 0)?.iter().sum()) };
        Ok(CounterValues {
            seen: sum(counter::SEEN)?,
            filtered: sum(counter::FILTERED)?,
            ringbuf_full: sum(counter::RINGBUF_FULL)?,
            timing_update_failed: sum(counter::TIMING_UPDATE_FAILED)?,
            timing_stale: sum(counter::TIMING_STALE)?,
            listeners_full: sum(counter::LISTENERS_FULL)?,
            timewait_unreadable: sum(counter::TIMEWAIT_UNREADABLE)?,
        })
    }
}

/// Refuses early, with the remedy, when the process cannot load eBPF.
pub fn check_privileges() -> Result<(), LoadError> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(LoadError::NotPrivileged)
    }
}

/// Finds tracefs (aya reads the tracepoint's id there), mounting it at its
/// standard place if the system has not, as systemd would at boot.
pub fn ensure_tracefs() -> Result<(), LoadError> {
    const TRACEFS: &str = "/sys/kernel/tracing";
    if Path::new(TRACEFS).join("events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        return Ok(());
    }
    let target = CString::new(TRACEFS).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(LoadError::Tracefs(io::Error::last_os_error()));
    }
    log::info!("mounted tracefs on {TRACEFS}");
    Ok(())
}

fn tracepoint_exists() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|base| {
            Path::new(base)
                .join("events/sock/inet_sock_set_state")
                .is_dir()
        })
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

/// Is this error the kernel saying "not allowed"?
fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::PermissionDenied
                || io.raw_os_error() == Some(libc::EPERM)
            {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

fn refused_or(err: LoadError) -> LoadError {
    if is_permission_error(&err) {
        LoadError::Refused(err.to_string())
    } else {
        err
    }
}

fn attach_timewait(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<(), LoadError> {
    let program: &mut FEntry = ebpf
        .program_mut(TIMEWAIT_PROGRAM)
        .ok_or(LoadError::Missing("timewait program"))?
        .try_into()?;
    program.load(TIMEWAIT_FUNCTION, btf)?;
    program.attach()?;
    Ok(())
}

pub fn load(opts: &LoadOptions) -> Result<Probe, LoadError> {
    check_privileges()?;
    let f = &opts.filters;
    for ports in [&f.ports, &f.lports, &f.rports] {
        if ports.len() > MAX_FILTER_PORTS as usize {
            return Err(LoadError::TooManyPorts(ports.len()));
        }
    }
    for nets in [&f.laddrs, &f.raddrs] {
        if nets.len() > MAX_FILTER_PREFIXES as usize {
            return Err(LoadError::TooManyPrefixes(nets.len()));
        }
    }
    ensure_tracefs()?;
    if !tracepoint_exists() {
        return Err(LoadError::NoTracepoint);
    }
    raise_memlock_rlimit();
    if !features::ringbuf_supported() {
        return Err(LoadError::NoRingBuf);
    }
    load_attached(opts).map_err(refused_or)
}

fn load_attached(opts: &LoadOptions) -> Result<Probe, LoadError> {
    let f = &opts.filters;
    let family: u16 = f.family.map_or(0, Family::af);
    let on = |v: bool| u8::from(v);
    let (ports, lports, rports) = (
        on(!f.ports.is_empty()),
        on(!f.lports.is_empty()),
        on(!f.rports.is_empty()),
    );
    let (laddrs, raddrs) = (on(!f.laddrs.is_empty()), on(!f.raddrs.is_empty()));
    let (states, netns, owner) = (f.state_mask(), f.netns.unwrap_or(0), on(f.owner_filter()));
    let (pid, comm) = (f.pid.unwrap_or(0), f.comm_bytes());
    let btf = features::kernel_btf();
    let offsets = match btf_offsets::from_sys_fs() {
        Ok(o) => o,
        Err(e) => {
            log::warn!(
                "no kernel struct offsets ({e}); network namespaces will be reported unknown"
            );
            KernelOffsets::UNKNOWN
        }
    };
    if netns != 0 && !offsets.netns_known() {
        return Err(LoadError::NetnsNeedsBtf);
    }
    let mut ebpf = EbpfLoader::new()
        .btf(btf.as_ref())
        .override_global(global::OFF_SKC_NET, &offsets.skc_net, true)
        .override_global(global::OFF_NET_INUM, &offsets.net_inum, true)
        .override_global(global::FILTER_FAMILY, &family, true)
        .override_global(global::WAKEUP_BYTES, &opts.wakeup_bytes, true)
        .override_global(global::OFF_SKC_FAMILY, &offsets.sock_common[0], true)
        .override_global(global::OFF_SKC_NUM, &offsets.sock_common[1], true)
        .override_global(global::OFF_SKC_DPORT, &offsets.sock_common[2], true)
        .override_global(global::OFF_SKC_RCV_SADDR, &offsets.sock_common[3], true)
        .override_global(global::OFF_SKC_DADDR, &offsets.sock_common[4], true)
        .override_global(global::OFF_SKC_V6_RCV_SADDR, &offsets.sock_common[5], true)
        .override_global(global::OFF_SKC_V6_DADDR, &offsets.sock_common[6], true)
        .override_global(global::FILTER_PORTS, &ports, true)
        .override_global(global::FILTER_LPORTS, &lports, true)
        .override_global(global::FILTER_RPORTS, &rports, true)
        .override_global(global::FILTER_LADDRS, &laddrs, true)
        .override_global(global::FILTER_RADDRS, &raddrs, true)
        .override_global(global::FILTER_STATES, &states, true)
        .override_global(global::FILTER_NETNS, &netns, true)
        .override_global(global::FILTER_OWNER, &owner, true)
        .override_global(global::FILTER_PID, &pid, true)
        .override_global(global::FILTER_COMM, &comm, true)
        .map_max_entries(map::SOCK_TIMING, opts.max_sockets)
        .map_max_entries(map::EVENTS, opts.ringbuf_bytes)
        .load(PROGRAM_OBJECT)?;

    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            log::debug!("no eBPF logger: {e}");
            None
        }
    };

    for (name, list) in [
        (map::PORT_FILTER, &f.ports),
        (map::LPORT_FILTER, &f.lports),
        (map::RPORT_FILTER, &f.rports),
    ] {
        if list.is_empty() {
            continue;
        }
        let mut m: HashMap<_, u16, u8> = HashMap::try_from(
            ebpf.map_mut(name)
                .ok_or(LoadError::Missing("port filter map"))?,
        )?;
        for port in list {
            m.insert(port, 1, 0)?;
        }
    }
    for (name, nets) in [
        (map::LADDR_FILTER, &f.laddrs),
        (map::RADDR_FILTER, &f.raddrs),
    ] {
        if nets.is_empty() {
            continue;
        }
        let mut trie: LpmTrie<_, [u8; 16], u8> = LpmTrie::try_from(
            ebpf.map_mut(name)
                .ok_or(LoadError::Missing("address filter map"))?,
        )?;
        for net in nets {
            let (len, bytes) = filters::lpm_key(net);
            trie.insert(&Key::new(len, bytes), 1, 0)?;
        }
    }

    let program: &mut TracePoint = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(LoadError::Missing("tracepoint program"))?
        .try_into()?;
    program.load()?;
    program.attach("sock", "inet_sock_set_state")?;

    let mut capabilities = features::probe(&mut ebpf, btf.as_ref());
    features::unload_probes(&mut ebpf);
    // Where fentry works, time timewait deaths exactly; the sock_diag polls
    // remain the portable path (and date the TIME_WAIT entry either way).
    if let (true, true, Some(btf)) = (capabilities.fentry, offsets.timewait_known(), btf.as_ref()) {
        match attach_timewait(&mut ebpf, btf) {
            Ok(()) => capabilities.timewait_fentry = true,
            Err(e) => log::info!(
                "no fentry on {TIMEWAIT_FUNCTION} ({e}); timewait deaths from sock_diag polls"
            ),
        }
    }

    let events = RingBuf::try_from(
        ebpf.take_map(map::EVENTS)
            .ok_or(LoadError::Missing("EVENTS map"))?,
    )?;
    let counters = KernelCounters(PerCpuArray::try_from(
        ebpf.take_map(map::COUNTERS)
            .ok_or(LoadError::Missing("COUNTERS map"))?,
    )?);
    Ok(Probe {
        events,
        capabilities,
        offsets,
        counters,
        logger,
        _ebpf: ebpf,
    })
}
