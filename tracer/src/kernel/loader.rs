//! Loads the embedded kernel program, sets its filters and map sizes, and
//! attaches it to `sock:inet_sock_set_state`.
//!
//! Over 600 lines on purpose: loading is one sequence (checks, globals, maps, programs per route, optional programs) that reads best top to bottom in one file.

use std::{ffi::CString, io, path::Path};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, Map, MapData, PerCpuArray,
    },
    programs::{BtfTracePoint, FEntry, TracePoint},
    Ebpf, EbpfLoader,
};
use thiserror::Error;
use tracer_common::{
    counter, global, map, ListenerKey, BTF_PROGRAM, BTF_PROGRAM_NESTED, MAX_FILTER_CGROUPS,
    MAX_FILTER_PORTS, MAX_FILTER_PREFIXES, PROGRAM_NAME, RECEIVE_RESET_PROGRAM, SEND_RESET_PROGRAM,
    TIMEWAIT_FUNCTION, TIMEWAIT_PROGRAM,
};

use crate::{
    kernel::btf_offsets::{self, KernelBtf, KernelOffsets, ResetReasons},
    kernel::events::Family,
    kernel::features::{self, Capabilities},
    kernel::filters::{self, Filters},
    kernel::ring::Ring,
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
        "at most {MAX_FILTER_CGROUPS} cgroups can be given to --cgroup and --container, got {0}"
    )]
    TooManyCgroups(usize),
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
    #[error("mapping the ring buffer: {0}")]
    RingMap(io::Error),
    #[error("the kernel has no {0} tracepoint")]
    NoResetTracepoint(&'static str),
    #[error("--attach tp-btf: {0}")]
    NoTpBtf(String),
}

/// Which program receives the transitions (`--attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Attach {
    /// The BTF tracepoint where the kernel allows it, else the classic one.
    #[default]
    Auto,
    /// `tp_btf/inet_sock_set_state` with socket-local storage; an error
    /// where the kernel cannot.
    TpBtf,
    /// The classic `sock:inet_sock_set_state` tracepoint with an LRU hash
    /// (the fallback; for comparison and tests).
    Tracepoint,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub filters: Filters,
    pub max_sockets: u32,
    pub ringbuf_bytes: u32,
    /// Ring buffer fill that wakes the agent (0: every event). The agent
    /// must also drain on a timer: below the threshold nothing wakes it.
    pub wakeup_bytes: u64,
    pub attach: Attach,
    /// Batch each socket's transitions in the kernel (BTF path only):
    /// for outputs that need no transition the moment it happens.
    pub batch: bool,
    /// States whose entry sends a socket's batch at once (bit per state).
    pub flush_states: u16,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            filters: Filters::default(),
            max_sockets: 65536,
            ringbuf_bytes: 4 << 20,
            wakeup_bytes: 0,
            attach: Attach::Auto,
            batch: false,
            flush_states: 0,
        }
    }
}

/// The loaded, attached program and the maps the agent reads. Dropping it
/// detaches the program and frees the maps.
pub struct Probe {
    pub events: Ring,
    pub capabilities: Capabilities,
    /// Kernel offsets found in BTF (netns of each socket, when known).
    pub offsets: KernelOffsets,
    /// The names of the reasons sent resets carry (`carried` false where
    /// they carry none, or the reset programs are not attached).
    pub reset_reasons: ResetReasons,
    pub counters: KernelCounters,
    /// The owner filter's listener table: the agent seeds it with the
    /// listeners that predate the tracer.
    pub listeners: SelectedListeners,
    /// The kernel program's aya-log records (rare errors), if any.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The loaded programs: dropping it detaches them all.
    pub programs: Ebpf,
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
    /// Program runs the kernel skipped because one was already running
    /// on that CPU: transitions neither seen nor otherwise counted.
    pub skipped: u64,
    /// Transitions waiting in sockets' batches in the kernel.
    pub batch_pending: u64,
    /// Resets sent for segments no socket matched (closed ports).
    pub resets_no_socket: u64,
    /// Reset and timewait death records lost to a full ring buffer
    /// (`ringbuf_full` counts transitions only).
    pub resets_lost: u64,
    pub timewait_deaths_lost: u64,
}

/// `recursion_misses` of a program's fdinfo (5.12+; 0 where absent).
fn recursion_misses(fdinfo: &Path) -> u64 {
    std::fs::read_to_string(fdinfo)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("recursion_misses:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The fdinfo path of a loaded program.
fn fdinfo_of(fd: &aya::programs::ProgramFd) -> std::path::PathBuf {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    Path::new("/proc/self/fdinfo").join(fd.as_fd().as_raw_fd().to_string())
}

/// The kernel's table of listeners whose owner passes the owner filter.
pub struct SelectedListeners(HashMap<MapData, ListenerKey, u64>);

impl SelectedListeners {
    /// Lets the sockets accepted by the listener on (`netns`, `port`) pass
    /// the owner filter. False when the table is full.
    pub fn select(&mut self, netns: u32, port: u16) -> bool {
        let key = ListenerKey {
            netns,
            port,
            _pad: 0,
        };
        // One more selected listener on the port (the kernel counts them).
        let n = self.0.get(&key, 0).unwrap_or(0);
        self.0.insert(key, n + 1, 0).is_ok()
    }
}

pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
    /// `/proc/self/fdinfo/N` of the program that receives transitions
    /// first: the kernel counts the runs it skipped there
    /// (`recursion_misses`).
    fdinfo: Vec<std::path::PathBuf>,
    /// The programs' skipped runs as read by [`KernelCounters::freeze`].
    frozen_misses: Option<u64>,
}

impl KernelCounters {
    fn recursion_misses(&self) -> u64 {
        self.frozen_misses
            .unwrap_or_else(|| self.fdinfo.iter().map(|p| recursion_misses(p)).sum())
    }

    /// Reads the programs' skipped runs now and keeps them: they are read
    /// from the programs' fds, which go when the programs are detached.
    pub fn freeze(&mut self) {
        self.frozen_misses = Some(self.recursion_misses());
    }

    /// Transitions lost to a full ring buffer: the map alone (no file
    /// read), for the event loop's warnings and metrics.
    pub fn lost(&self) -> Result<u64, aya::maps::MapError> {
        Ok(self.map.get(&counter::RINGBUF_FULL, 0)?.iter().sum())
    }

    /// Every counter, the programs' skipped runs included (read from
    /// their fdinfo files: at exit, or frozen by [`KernelCounters::freeze`]).
    pub fn read(&self) -> Result<CounterValues, aya::maps::MapError> {
        let sum =
            |i: u32| -> Result<u64, aya::maps::MapError> { Ok(self.map.get(&i, 0)?.iter().sum()) };
        Ok(CounterValues {
            // The second BTF copy handled some of the first's misses.
            skipped: self
                .recursion_misses()
                .saturating_sub(sum(counter::NESTED)?),
            seen: sum(counter::SEEN)?,
            filtered: sum(counter::FILTERED)?,
            ringbuf_full: sum(counter::RINGBUF_FULL)?,
            timing_update_failed: sum(counter::TIMING_UPDATE_FAILED)?,
            timing_stale: sum(counter::TIMING_STALE)?,
            listeners_full: sum(counter::LISTENERS_FULL)?,
            timewait_unreadable: sum(counter::TIMEWAIT_UNREADABLE)?,
            resets_no_socket: sum(counter::RESET_NO_SOCKET)?,
            resets_lost: sum(counter::RESETS_LOST)?,
            timewait_deaths_lost: sum(counter::TIMEWAIT_DEATHS_LOST)?,
            batch_pending: self
                .map
                .get(&counter::BATCH_PENDING, 0)?
                .iter()
                .fold(0u64, |a, &v| a.wrapping_add(v)),
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

/// Attaches the reset programs (`tcp:tcp_send_reset`,
/// `tcp:tcp_receive_reset`); an error names what is missing. Both or
/// neither: one direction alone would misname how connections ended.
fn attach_resets(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for name in [SEND_RESET_PROGRAM, RECEIVE_RESET_PROGRAM] {
        let exists = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .any(|base| Path::new(base).join("events/tcp").join(name).is_dir());
        if !exists {
            return Err(LoadError::NoResetTracepoint(
                if name == SEND_RESET_PROGRAM {
                    "tcp:tcp_send_reset"
                } else {
                    "tcp:tcp_receive_reset"
                },
            ));
        }
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing("reset program"))?
            .try_into()?;
        program.load()?;
    }
    for name in [SEND_RESET_PROGRAM, RECEIVE_RESET_PROGRAM] {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing("reset program"))?
            .try_into()?;
        program.attach("tcp", name)?;
    }
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
    if f.cgroups.len() > MAX_FILTER_CGROUPS as usize {
        return Err(LoadError::TooManyCgroups(f.cgroups.len()));
    }
    ensure_tracefs()?;
    if !tracepoint_exists() {
        return Err(LoadError::NoTracepoint);
    }
    raise_memlock_rlimit();
    if !features::ringbuf_supported() {
        return Err(LoadError::NoRingBuf);
    }
    let kernel_btf = match btf_offsets::from_sys_fs() {
        Ok(k) => k,
        Err(e) => {
            log::warn!(
                "no kernel struct offsets ({e}); network namespaces will be reported unknown"
            );
            KernelBtf {
                offsets: KernelOffsets::UNKNOWN,
                reset_reasons: ResetReasons::default(),
            }
        }
    };
    let offsets = kernel_btf.offsets;
    let reasons = &kernel_btf.reset_reasons;
    let btf = features::kernel_btf();
    let btf_ready = btf.is_some() && offsets.btf_path_known();
    match opts.attach {
        Attach::Tracepoint => load_attached(opts, &btf, offsets, reasons, Route::Classic),
        Attach::TpBtf if !btf_ready => Err(LoadError::NoTpBtf(
            "the kernel's BTF (/sys/kernel/btf/vmlinux) or the struct sock offsets in it are missing"
                .into(),
        )),
        Attach::TpBtf => load_attached(opts, &btf, offsets, reasons, Route::Btf).map_err(|e| match e {
            LoadError::NotPrivileged => e,
            e => LoadError::NoTpBtf(e.to_string()),
        }),
        Attach::Auto if !btf_ready => {
            log::info!("no kernel BTF with struct sock offsets: the classic tracepoint runs");
            load_attached(opts, &btf, offsets, reasons, Route::Classic)
        }
        Attach::Auto => match load_attached(opts, &btf, offsets, reasons, Route::Btf) {
            Ok(probe) => Ok(probe),
            Err(e) => {
                // E.g. 5.8-5.10: tp_btf, but no socket storage in tracing programs.
                log::info!("the BTF tracepoint path failed ({e}); the classic tracepoint runs");
                load_attached(opts, &btf, offsets, reasons, Route::Classic)
            }
        },
    }
    .map_err(refused_or)
}

/// The non-zero words of the kernel's port bitmap for `ports`.
fn port_bitmap(ports: &[u16]) -> std::collections::BTreeMap<u32, u64> {
    let mut words = std::collections::BTreeMap::new();
    for &p in ports {
        *words.entry(u32::from(p >> 6)).or_insert(0u64) |= 1 << (p & 63);
    }
    words
}

/// Which program set is loaded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Two copies of the BTF tracepoint program, socket-local storage.
    Btf,
    /// The classic tracepoint program, LRU hash.
    Classic,
}

fn load_attached(
    opts: &LoadOptions,
    btf: &Option<aya::Btf>,
    offsets: KernelOffsets,
    reset_reasons: &ResetReasons,
    route: Route,
) -> Result<Probe, LoadError> {
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
    let cgroup_levels = f.cgroup_levels();
    // The LRU hash is preallocated: keep it minimal where it is unused.
    let lru_entries = if route == Route::Classic {
        opts.max_sockets
    } else {
        1
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
        .override_global(global::OFF_SK_PROTOCOL, &offsets.sk_protocol, true)
        .override_global(global::OFF_INET_SPORT, &offsets.inet_sport, true)
        .override_global(global::OFF_RST_REASON, &offsets.rst_reason, true)
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
        .override_global(global::FILTER_CGROUP_LEVELS, &cgroup_levels, true)
        .override_global(global::BATCH, &u8::from(opts.batch), true)
        .override_global(global::FLUSH_STATES, &opts.flush_states, true)
        .map_max_entries(map::SOCK_TIMING, lru_entries)
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
        let mut bitmap: Array<_, u64> = Array::try_from(
            ebpf.map_mut(name)
                .ok_or(LoadError::Missing("port filter map"))?,
        )?;
        for (word, bits) in port_bitmap(list) {
            bitmap.set(word, bits, 0)?;
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

    if !f.cgroups.is_empty() {
        let mut selected: HashMap<_, u64, u8> = HashMap::try_from(
            ebpf.map_mut(map::CGROUP_FILTER)
                .ok_or(LoadError::Missing("cgroup filter map"))?,
        )?;
        for c in &f.cgroups {
            selected.insert(c.id, 1, 0)?;
        }
    }

    let mut fdinfo = Vec::new();
    match (route, btf.as_ref()) {
        (Route::Btf, Some(btf)) => {
            // Both loaded before either is attached: all or nothing.
            for name in [BTF_PROGRAM, BTF_PROGRAM_NESTED] {
                let program: &mut BtfTracePoint = ebpf
                    .program_mut(name)
                    .ok_or(LoadError::Missing("BTF tracepoint program"))?
                    .try_into()?;
                program.load("inet_sock_set_state", btf)?;
                // The first copy's misses are what may be lost.
                if name == BTF_PROGRAM {
                    fdinfo.push(fdinfo_of(program.fd()?));
                }
            }
            for name in [BTF_PROGRAM, BTF_PROGRAM_NESTED] {
                let program: &mut BtfTracePoint = ebpf
                    .program_mut(name)
                    .ok_or(LoadError::Missing("BTF tracepoint program"))?
                    .try_into()?;
                program.attach()?;
            }
        }
        _ => {
            let program: &mut TracePoint = ebpf
                .program_mut(PROGRAM_NAME)
                .ok_or(LoadError::Missing("tracepoint program"))?
                .try_into()?;
            program.load()?;
            program.attach("sock", "inet_sock_set_state")?;
            fdinfo.push(fdinfo_of(program.fd()?));
        }
    }

    let mut capabilities = features::probe(&mut ebpf, btf.as_ref());
    capabilities.transitions = if route == Route::Btf {
        features::TransitionPath::TpBtf
    } else {
        features::TransitionPath::Tracepoint
    };
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

    match attach_resets(&mut ebpf) {
        Ok(()) => {
            capabilities.resets = true;
            capabilities.reset_reasons = reset_reasons.carried;
        }
        Err(e) => log::info!(
            "no reset tracepoints ({e}): connection records say nothing of resets (\"rst\": null)"
        ),
    }

    let events = match ebpf.take_map(map::EVENTS) {
        Some(Map::RingBuf(data)) => Ring::new(data).map_err(LoadError::RingMap)?,
        _ => return Err(LoadError::Missing("EVENTS ring buffer")),
    };
    let counters = KernelCounters {
        map: PerCpuArray::try_from(
            ebpf.take_map(map::COUNTERS)
                .ok_or(LoadError::Missing("COUNTERS map"))?,
        )?,
        fdinfo,
        frozen_misses: None,
    };
    let listeners = SelectedListeners(HashMap::try_from(
        ebpf.take_map(map::LISTENERS)
            .ok_or(LoadError::Missing("LISTENERS map"))?,
    )?);
    Ok(Probe {
        events,
        listeners,
        capabilities,
        offsets,
        reset_reasons: if capabilities.reset_reasons {
            reset_reasons.clone()
        } else {
            ResetReasons::default()
        },
        counters,
        logger,
        programs: ebpf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_bitmap_sets_one_bit_per_port() {
        let words = port_bitmap(&[0, 63, 64, 8080, 65535]);
        assert_eq!(words.get(&0), Some(&(1 | 1 << 63)));
        assert_eq!(words.get(&1), Some(&1));
        assert_eq!(words.get(&(8080 / 64)), Some(&(1 << (8080 % 64))));
        assert_eq!(words.get(&1023), Some(&(1 << 63)));
        assert_eq!(words.len(), 4);
    }
}
