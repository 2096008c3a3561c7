//! In-kernel filters, set by the agent before load (constants in `.rodata`
//! and small maps), so that filtered-out transitions cost no ring buffer
//! space. All given filters must pass. A filter that is off costs one
//! constant test, which the verifier removes.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, generated::bpf_get_current_ancestor_cgroup_id},
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
    Global,
};
use tracer_common::{
    ListenerKey, AF_INET6, MAX_CGROUP_LEVEL, MAX_FILTER_CGROUPS, MAX_FILTER_PREFIXES,
    MAX_LISTENERS, PORT_BITMAP_WORDS,
};

use crate::transition::Socket;

#[unsafe(no_mangle)]
static FILTER_FAMILY: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_PORTS: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_LPORTS: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_RPORTS: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_LADDRS: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_RADDRS: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_STATES: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_NETNS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_OWNER: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_PID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_COMM: Global<[u8; 16]> = Global::new([0; 16]);
#[unsafe(no_mangle)]
static FILTER_CGROUP_LEVELS: Global<u32> = Global::new(0);

/// Port sets as bitmaps (bit `port % 64` of word `port / 64`): an array
/// look-up is inlined by the verifier, where a hash look-up is a helper
/// call and a hash. Either side's port (`--port`), local, remote.
#[map]
static PORT_FILTER: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);
#[map]
static LPORT_FILTER: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);
#[map]
static RPORT_FILTER: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);

#[inline(always)]
fn has_port(set: &Array<u64>, port: u16) -> bool {
    set.get(u32::from(port >> 6))
        .is_some_and(|w| w & (1u64 << (port & 63)) != 0)
}
/// CIDR prefixes over 16-byte addresses (IPv4 as `::ffff:a.b.c.d`).
#[map]
static LADDR_FILTER: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_FILTER_PREFIXES, 0);
#[map]
static RADDR_FILTER: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_FILTER_PREFIXES, 0);
/// Selected listening sockets (their owner passed the owner filter) per
/// namespace and port: the sockets they accept pass too, where no socket
/// storage carries the listener's own verdict (see `account_time`).
#[map]
static LISTENERS: HashMap<ListenerKey, u64> = HashMap::with_max_entries(MAX_LISTENERS, 0);

/// cgroup v2 ids of `--cgroup`/`--container`. Filled before attach and
/// never changed; the agent refuses more than `MAX_FILTER_CGROUPS`.
#[map]
static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(MAX_FILTER_CGROUPS, 0);

/// What the filters look at, read before any filter runs: what the timing
/// needs anyway. The namespace and the addresses are read only when a
/// filter asks for them.
pub(crate) struct Candidate {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub oldstate: u8,
    pub newstate: u8,
    pub owner_selected: bool,
}

pub(crate) fn owner_filter_on() -> bool {
    FILTER_OWNER.load() != 0
}

/// Cheapest tests first; `netns` is filled in if the namespace was read.
#[inline(always)]
pub(crate) fn passes<S: Socket>(s: &S, c: &Candidate, netns: &mut Option<u32>) -> bool {
    let family = FILTER_FAMILY.load();
    if family != 0 && family != c.family {
        return false;
    }
    let states = FILTER_STATES.load();
    if states != 0 && states & ((1u16 << (c.oldstate & 15)) | (1u16 << (c.newstate & 15))) == 0 {
        return false;
    }
    if FILTER_OWNER.load() != 0 && !c.owner_selected {
        return false;
    }
    if FILTER_PORTS.load() != 0
        && !has_port(&PORT_FILTER, c.sport)
        && !has_port(&PORT_FILTER, c.dport)
    {
        return false;
    }
    if FILTER_LPORTS.load() != 0 && !has_port(&LPORT_FILTER, c.sport) {
        return false;
    }
    if FILTER_RPORTS.load() != 0 && !has_port(&RPORT_FILTER, c.dport) {
        return false;
    }
    let want_netns = FILTER_NETNS.load();
    if want_netns != 0 {
        let n = *netns.get_or_insert_with(|| s.netns());
        if n != want_netns {
            return false;
        }
    }
    if FILTER_LADDRS.load() != 0 || FILTER_RADDRS.load() != 0 {
        let (saddr, daddr) = s.addresses(c.family);
        if FILTER_LADDRS.load() != 0
            && LADDR_FILTER
                .get(Key::new(128, as_v6(c.family, saddr)))
                .is_none()
        {
            return false;
        }
        if FILTER_RADDRS.load() != 0
            && RADDR_FILTER
                .get(Key::new(128, as_v6(c.family, daddr)))
                .is_none()
        {
            return false;
        }
    }
    true
}

/// Does the current task pass `--pid`/`--comm`? Asked only on transitions
/// that run in the owner's own system calls.
#[inline(always)]
pub(crate) fn current_task_matches(tgid: u32) -> bool {
    let pid = FILTER_PID.load();
    if pid != 0 && pid != tgid {
        return false;
    }
    let levels = FILTER_CGROUP_LEVELS.load();
    if levels != 0 && !current_cgroup_selected(levels) {
        return false;
    }
    let want = FILTER_COMM.load();
    if want[0] == 0 {
        return true;
    }
    match bpf_get_current_comm() {
        Ok(comm) => {
            let mut i = 0;
            while i < 16 {
                if comm[i] != want[i] {
                    return false;
                }
                if want[i] == 0 {
                    break;
                }
                i += 1;
            }
            true
        }
        Err(_) => false,
    }
}

/// Is the current task in a selected cgroup or below one? Its ancestor at
/// each level where a selected cgroup sits is looked up (one hash look-up
/// per such level, not per ancestor): a task in a pod's container is under
/// the pod's slice. `bpf_get_current_ancestor_cgroup_id` (tracing programs
/// since 5.17) returns 0 past the task's own level, which no cgroup has.
#[inline(always)]
fn current_cgroup_selected(levels: u32) -> bool {
    let mut level = 0;
    while level < MAX_CGROUP_LEVEL {
        if levels & (1 << level) != 0 {
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id != 0 && unsafe { CGROUP_FILTER.get(id) }.is_some() {
                return true;
            }
        }
        level += 1;
    }
    false
}

pub(crate) fn listener_selected(netns: u32, port: u16) -> bool {
    unsafe {
        LISTENERS.get(ListenerKey {
            netns,
            port,
            _pad: 0,
        })
    }
    .is_some()
}

/// Counts one more selected listener on (`netns`, `port`). False when
/// the table is full (the caller counts it): this listener's children
/// then pass only once their owner closes them.
pub(crate) fn remember_listener(netns: u32, port: u16) -> bool {
    let key = ListenerKey {
        netns,
        port,
        _pad: 0,
    };
    if let Some(n) = LISTENERS.get_ptr_mut(key) {
        // Not atomic (the BPF target has no atomic read-modify-write in
        // `core`): two selected listeners of one port opening on two CPUs
        // at the same instant may count once. This table only serves
        // listeners no socket storage speaks for.
        unsafe { *n += 1 };
        return true;
    }
    LISTENERS.insert(key, 1, 0).is_ok()
}

/// One selected listener on (`netns`, `port`) fewer; the entry goes with
/// the last.
pub(crate) fn forget_listener(netns: u32, port: u16) {
    let key = ListenerKey {
        netns,
        port,
        _pad: 0,
    };
    let Some(n) = LISTENERS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a map value; not atomic, as above.
    let before = unsafe { *n };
    if before <= 1 {
        let _ = LISTENERS.remove(key);
    } else {
        unsafe { *n = before - 1 };
    }
}

/// 16 address bytes for the CIDR tries: IPv4 as `::ffff:a.b.c.d`.
#[inline(always)]
fn as_v6(family: u16, a: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    if family == AF_INET6 {
        out[..4].copy_from_slice(&a[0].to_ne_bytes());
        out[4..8].copy_from_slice(&a[1].to_ne_bytes());
        out[8..12].copy_from_slice(&a[2].to_ne_bytes());
        out[12..].copy_from_slice(&a[3].to_ne_bytes());
    } else {
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..].copy_from_slice(&a[0].to_ne_bytes());
    }
    out
}
