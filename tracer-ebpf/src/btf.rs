//! The main path: `tp_btf/inet_sock_set_state`, the same tracepoint as a
//! BTF-typed raw tracepoint (`struct sock *sk, int oldstate, int
//! newstate`). No perf record is built and no shared perf recursion guard
//! applies; the socket is read with direct loads at offsets from BTF, and
//! its timing, owner verdict and state live in socket-local storage
//! (`BPF_MAP_TYPE_SK_STORAGE`, tracing programs since 5.11): no hash
//! lookup, no capacity to fill, freed by the kernel with the socket.
//!
//! **Two copies, no skipped runs.** The kernel skips a program that is
//! already running on the CPU (a transition in softirq on top of a
//! `close()` in task context) and only counts it in the program's
//! `recursion_misses`. Two copies are attached; both run for every hit,
//! the first before the second. The first handles every hit it runs for;
//! the second handles a hit only if the socket's storage does not already
//! show the hit's new state, i.e. exactly the hits the kernel skipped the
//! first for. (The socket, not the CPU, decides: tracepoint callbacks may
//! be preempted and migrate between the two copies. A per-CPU note of the
//! first copy's hits was tried and handled 2-6 transitions twice per 5 s
//! of load.) What both miss (three levels deep) is still counted, as
//! `skipped`.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_map_type, BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::{bpf_probe_read_kernel, generated::bpf_sk_storage_get},
    macros::{btf_map, btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};

use crate::{
    offsets::{
        OFF_INET_SPORT, OFF_NET_INUM, OFF_SKC_DADDR, OFF_SKC_DPORT, OFF_SKC_FAMILY, OFF_SKC_NET,
        OFF_SKC_NUM, OFF_SKC_RCV_SADDR, OFF_SKC_V6_DADDR, OFF_SKC_V6_RCV_SADDR, OFF_SK_PROTOCOL,
    },
    transition::{batching, bump, count, on_transition, Socket, TransitionSkip},
};
use tracer_common::{counter, BatchEvent, SockState, SockTiming, AF_INET6, IPPROTO_TCP};

/// Per-socket timing and batch (`--events connections|none`). aya-ebpf's
/// `SkStorage` only takes a socket from a `sock_addr` context, so the
/// helper is called directly with the map's address.
#[btf_map]
static SOCK_STORE: ClonedSkStorage<SockState> = ClonedSkStorage::new();

/// Sockets whose storage the first copy could not create (no memory),
/// for the second copy: it must not take that hit for a skipped one and
/// send it again. Preallocated, so it works when memory is short.
#[map]
static STORAGE_FAILED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(1024, 0);

/// Per-socket timing alone, where transitions are sent one by one: 16
/// bytes a socket instead of the batch's 250 (the storage is allocated
/// for every socket the kernel creates, and zeroed).
#[btf_map]
static SOCK_TIMING_STORE: ClonedSkStorage<SockTiming> = ClonedSkStorage::new();

/// A socket storage map whose values the kernel copies from a listener to
/// each socket it accepts (`BPF_F_CLONE`): the accepted socket starts with
/// its own listener's owner verdict. aya-ebpf's `SkStorage` has fixed
/// flags; this is the same BTF map definition with the clone flag.
#[repr(C)]
struct ClonedSkStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholder pointers the loader reads from BTF; never
// dereferenced.
unsafe impl<T> Sync for ClonedSkStorage<T> {}

impl<T> ClonedSkStorage<T> {
    const fn new() -> Self {
        ClonedSkStorage {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn sock_set_state(ctx: BtfTracePointContext) -> i32 {
    count(try_sock_set_state(&ctx));
    0
}

/// The second copy: only the hits the first was skipped for.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn sock_set_state_nested(ctx: BtfTracePointContext) -> i32 {
    if !handled_by_first(&ctx) {
        bump(counter::NESTED);
        count(try_sock_set_state(&ctx));
    }
    0
}

/// Did the first copy handle this hit? It leaves every TCP socket it sees
/// in the hit's new state (CLOSE included); a socket without storage, or
/// in another state, was not handled. Hits that are not TCP count as
/// handled: there is nothing to do.
#[inline(always)]
fn handled_by_first(ctx: &BtfTracePointContext) -> bool {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() || unsafe { load::<u16>(sk, OFF_SK_PROTOCOL.load()) } != IPPROTO_TCP {
        return true;
    }
    let newstate: i32 = ctx.arg(2);
    let sock = Sock { sk };
    match sock.timing(false) {
        Some(t) => {
            let state = unsafe { (*t).state };
            state == newstate as u8
        }
        // No storage: the first copy was skipped on a socket it had not
        // seen yet, or it could not create the storage (and left a note).
        None => {
            let key = sk as u64;
            let noted = unsafe { STORAGE_FAILED.get(key) }.is_some();
            if noted {
                let _ = STORAGE_FAILED.remove(key);
            }
            noted
        }
    }
}

// Inlined: a call with the context as argument is refused by older
// verifiers (6.1: "reg type unsupported for arg#0").
#[inline(always)]
fn try_sock_set_state(ctx: &BtfTracePointContext) -> Result<(), TransitionSkip> {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        return Err(TransitionSkip::NotTcp);
    }
    let sock = Sock { sk };
    if unsafe { load::<u16>(sk, OFF_SK_PROTOCOL.load()) } != IPPROTO_TCP {
        return Err(TransitionSkip::NotTcp);
    }
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    on_transition(&sock, oldstate as u8, newstate as u8)
}

/// A fixed-offset load from a BTF-typed pointer (checked by the verifier
/// against the type at that offset).
///
/// # Safety
/// `base` is a BTF-typed kernel pointer (a tp_btf argument) and `off` the
/// offset of a `T` field of its type, read from the kernel's BTF at load
/// time; the verifier refuses the program otherwise.
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, off: u32) -> T {
    unsafe { ptr::read_volatile(base.add(off as usize).cast::<T>()) }
}

struct Sock {
    sk: *const u8,
}

impl Sock {
    #[inline(always)]
    fn word(&self, off: u32) -> u32 {
        unsafe { load::<u32>(self.sk, off) }
    }
}

impl Socket for Sock {
    #[inline(always)]
    fn addr(&self) -> u64 {
        self.sk as u64
    }

    #[inline(always)]
    fn family(&self) -> u16 {
        unsafe { load::<u16>(self.sk, OFF_SKC_FAMILY.load()) }
    }

    #[inline(always)]
    fn ports(&self) -> (u16, u16) {
        let dport: u16 = unsafe { load(self.sk, OFF_SKC_DPORT.load()) };
        // The bound local port, host order; 0 on `-> CLOSE` (already
        // released) and before connect() binds one.
        let num: u16 = unsafe { load(self.sk, OFF_SKC_NUM.load()) };
        if num != 0 {
            return (num, u16::from_be(dport));
        }
        // What the tracepoint reports then: inet_sport, which lies beyond
        // `struct sock` (in `struct inet_sock`), where the verifier allows
        // no direct load.
        let sport: u16 = unsafe {
            bpf_probe_read_kernel(self.sk.add(OFF_INET_SPORT.load() as usize).cast::<u16>())
        }
        .unwrap_or(0);
        (u16::from_be(sport), u16::from_be(dport))
    }

    #[inline(always)]
    fn addresses(&self, family: u16) -> ([u32; 4], [u32; 4]) {
        if family == AF_INET6 {
            let (s, d) = (OFF_SKC_V6_RCV_SADDR.load(), OFF_SKC_V6_DADDR.load());
            (
                [
                    self.word(s),
                    self.word(s + 4),
                    self.word(s + 8),
                    self.word(s + 12),
                ],
                [
                    self.word(d),
                    self.word(d + 4),
                    self.word(d + 8),
                    self.word(d + 12),
                ],
            )
        } else {
            (
                [self.word(OFF_SKC_RCV_SADDR.load()), 0, 0, 0],
                [self.word(OFF_SKC_DADDR.load()), 0, 0, 0],
            )
        }
    }

    #[inline(always)]
    fn netns(&self) -> u32 {
        let net: *const u8 = unsafe { load(self.sk, OFF_SKC_NET.load()) };
        if net.is_null() {
            return 0;
        }
        unsafe { load::<u32>(net, OFF_NET_INUM.load()) }
    }

    #[inline(always)]
    fn timing(&self, create: bool) -> Option<*mut SockTiming> {
        let flags = if create {
            BPF_SK_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        // `timing` is the first field of `SockState`: the same pointer in
        // either map.
        let map = if batching() {
            ptr::from_ref(&SOCK_STORE).cast_mut().cast::<c_void>()
        } else {
            ptr::from_ref(&SOCK_TIMING_STORE)
                .cast_mut()
                .cast::<c_void>()
        };
        let p =
            unsafe { bpf_sk_storage_get(map, self.sk.cast_mut().cast(), ptr::null_mut(), flags) };
        let p = p.cast::<SockTiming>();
        if p.is_null() && create {
            // Out of memory: counted here, once; the note keeps the second
            // copy from sending the transition again.
            bump(counter::TIMING_UPDATE_FAILED);
            let _ = STORAGE_FAILED.insert(self.sk as u64, 1, 0);
        }
        (!p.is_null()).then_some(p)
    }

    #[inline(always)]
    fn insert_timing(&self, _t: &SockTiming) -> bool {
        // `timing(true)` could not make a slot (out of memory), and
        // counted it.
        true
    }

    #[inline(always)]
    fn batch(&self, slot: *mut SockTiming) -> Option<*mut BatchEvent> {
        if !batching() {
            return None;
        }
        let state = slot.cast::<SockState>();
        Some(unsafe { ptr::addr_of_mut!((*state).event) })
    }

    #[inline(always)]
    fn forget_timing(&self, slot: Option<*mut SockTiming>) {
        // The kernel frees the storage with the socket. CLOSE stays as the
        // state (the second copy reads it), but times nothing: a socket
        // used again (connect, listen) starts untimed.
        if let Some(t) = slot {
            unsafe { (*t).state = tracer_common::tcp_state::CLOSE };
            unsafe { (*t).selected = 0 };
        }
    }
}
