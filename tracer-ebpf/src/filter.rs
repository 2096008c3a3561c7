//! In-kernel filters, set by the agent before load (constants in `.rodata`
//! and small maps), so that filtered-out transitions cost no ring buffer
//! space. All given filters must pass. A filter that is off costs one
//! constant test, which the verifier removes.

use aya_ebpf::{
    helpers::bpf_get_current_comm,
    macros::map,
    maps::{lpm_trie::Key, HashMap, LpmTrie},
    Global,
};
use tracer_common::{ListenerKey, AF_INET6, MAX_FILTER_PORTS, MAX_FILTER_PREFIXES, MAX_LISTENERS};

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

/// Either side's port (`--port`).
#[map]
static PORT_FILTER: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_PORTS, 0);
#[map]
static LPORT_FILTER: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_PORTS, 0);
#[map]
static RPORT_FILTER: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_PORTS, 0);
/// CIDR prefixes over 16-byte addresses (IPv4 as `::ffff:a.b.c.d`).
#[map]
static LADDR_FILTER: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_FILTER_PREFIXES, 0);
#[map]
static RADDR_FILTER: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_FILTER_PREFIXES, 0);
/// Listening sockets whose owner passed the owner filter, by namespace and
/// port: the sockets they accept pass too.
#[map]
static LISTENERS: HashMap<ListenerKey, u8> = HashMap::with_max_entries(MAX_LISTENERS, 0);

/// What the filters look at.
pub struct Candidate {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub oldstate: u8,
    pub newstate: u8,
    pub netns: u32,
    /// Addresses as the record holds them (IPv4 in the first 4 bytes); made
    /// 16-byte keys only when an address filter is on.
    pub saddr: [u64; 2],
    pub daddr: [u64; 2],
    pub owner_selected: bool,
}

pub fn owner_filter_on() -> bool {
    FILTER_OWNER.load() != 0
}

#[inline(always)]
pub fn passes(c: &Candidate) -> bool {
    let family = FILTER_FAMILY.load();
    if family != 0 && family != c.family {
        return false;
    }
    let states = FILTER_STATES.load();
    if states != 0 && states & ((1u16 << (c.oldstate & 15)) | (1u16 << (c.newstate & 15))) == 0 {
        return false;
    }
    let netns = FILTER_NETNS.load();
    if netns != 0 && netns != c.netns {
        return false;
    }
    if FILTER_PORTS.load() != 0 {
        let hit =
            unsafe { PORT_FILTER.get(&c.sport).is_some() || PORT_FILTER.get(&c.dport).is_some() };
        if !hit {
            return false;
        }
    }
    if FILTER_LPORTS.load() != 0 && unsafe { LPORT_FILTER.get(&c.sport) }.is_none() {
        return false;
    }
    if FILTER_RPORTS.load() != 0 && unsafe { RPORT_FILTER.get(&c.dport) }.is_none() {
        return false;
    }
    if FILTER_LADDRS.load() != 0
        && LADDR_FILTER
            .get(Key::new(128, as_v6(c.family, c.saddr)))
            .is_none()
    {
        return false;
    }
    if FILTER_RADDRS.load() != 0
        && RADDR_FILTER
            .get(Key::new(128, as_v6(c.family, c.daddr)))
            .is_none()
    {
        return false;
    }
    if FILTER_OWNER.load() != 0 && !c.owner_selected {
        return false;
    }
    true
}

/// Does the current task pass `--pid`/`--comm`? Asked only on transitions
/// that run in the owner's own system calls.
#[inline(always)]
pub fn current_task_matches(tgid: u32) -> bool {
    let pid = FILTER_PID.load();
    if pid != 0 && pid != tgid {
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

pub fn listener_selected(netns: u32, port: u16) -> bool {
    unsafe {
        LISTENERS.get(&ListenerKey {
            netns,
            port,
            _pad: 0,
        })
    }
    .is_some()
}

/// False when the table is full (the caller counts it): this listener's
/// children then pass only once their owner closes them.
pub fn remember_listener(netns: u32, port: u16) -> bool {
    LISTENERS
        .insert(
            &ListenerKey {
                netns,
                port,
                _pad: 0,
            },
            &1,
            0,
        )
        .is_ok()
}

pub fn forget_listener(netns: u32, port: u16) {
    let _ = LISTENERS.remove(&ListenerKey {
        netns,
        port,
        _pad: 0,
    });
}

/// 16 address bytes for the CIDR tries: IPv4 as `::ffff:a.b.c.d`.
#[inline(always)]
fn as_v6(family: u16, a: [u64; 2]) -> [u8; 16] {
    let mut out = [0u8; 16];
    if family == AF_INET6 {
        out[..8].copy_from_slice(&a[0].to_ne_bytes());
        out[8..].copy_from_slice(&a[1].to_ne_bytes());
    } else {
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..].copy_from_slice(&(a[0] as u32).to_ne_bytes());
    }
    out
}
