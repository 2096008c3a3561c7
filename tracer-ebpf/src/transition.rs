//! `sock:inet_sock_set_state`: one event per TCP state transition.

use core::{ffi::c_void, mem::offset_of, ptr};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated,
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext as _, Global,
};
use aya_log_ebpf::warn;

use crate::filter;
use tracer_common::{
    counter, tcp_state, EventHeader, EventKind, InetSockSetStateRecord, SockTiming,
    TransitionEvent, AF_INET6, FLAG_OLD_STATE_KNOWN, IPPROTO_TCP, OFFSET_UNKNOWN,
};

/// Offsets of `sock_common.skc_net.net` and `net.ns.inum`, found by the
/// agent in the kernel's BTF (Rust eBPF has no CO-RE relocations).
#[unsafe(no_mangle)]
static OFF_SKC_NET: Global<u32> = Global::new(OFFSET_UNKNOWN);
#[unsafe(no_mangle)]
static OFF_NET_INUM: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// Wake the agent only once this many bytes wait in the ring buffer: a
/// wake-up per event was the dominant cost of delivery (2-3 µs each in
/// this VM, against ~0.6 µs without). The agent also drains on a timer.
/// 0: wake up on every event.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(0);

/// Sized by the agent (`--ringbuf-size`) before load.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// When each socket entered its current state. Sized by the agent
/// (`--max-sockets`); LRU so that sockets freed without a CLOSE transition
/// cannot fill it up for good.
#[map]
static SOCK_TIMING: LruHashMap<u64, SockTiming> = LruHashMap::with_max_entries(65536, 0);

/// Why a transition produced no event. Every variant is counted.
enum Skip {
    NotTcp,
    Filtered,
    RingBufFull,
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(()) => {}
        Err(Skip::NotTcp) => {}
        Err(Skip::Filtered) => bump(counter::FILTERED),
        Err(Skip::RingBufFull) => bump(counter::RINGBUF_FULL),
    }
    0
}

/// Direct, aligned scalar load of a field of the tracepoint record. (A
/// generic copy of an array field makes LLVM emit a `memmove` on the context
/// pointer, which the verifier refuses.)
#[inline(always)]
unsafe fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

macro_rules! rec {
    ($ctx:expr, $field:ident : $ty:ty) => {
        unsafe { field::<$ty>($ctx, offset_of!(InetSockSetStateRecord, $field)) }
    };
    ($ctx:expr, $field:ident : $ty:ty, + $extra:expr) => {
        unsafe { field::<$ty>($ctx, offset_of!(InetSockSetStateRecord, $field) + $extra) }
    };
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), Skip> {
    if rec!(ctx, protocol: u16) != IPPROTO_TCP {
        return Err(Skip::NotTcp);
    }
    bump(counter::SEEN);
    let now = unsafe { bpf_ktime_get_ns() };
    let skaddr = rec!(ctx, skaddr: u64);
    let oldstate = rec!(ctx, oldstate: i32) as u8;
    let newstate = rec!(ctx, newstate: i32) as u8;
    let family = rec!(ctx, family: u16);
    let sport = rec!(ctx, sport: u16);
    let dport = rec!(ctx, dport: u16);
    let netns = netns_inum(skaddr);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;

    // Timing (and the owner filter's verdict) is kept for every socket,
    // filtered or not, so a duration is right even when the transition
    // that started it was filtered out.
    let (old_state_ns, owner_selected) =
        account_time(ctx, skaddr, oldstate, newstate, now, netns, sport, tgid);

    let (saddr, daddr) = addresses(ctx, family);
    let candidate = filter::Candidate {
        family,
        sport,
        dport,
        oldstate,
        newstate,
        netns,
        saddr,
        daddr,
        owner_selected,
    };
    if !filter::passes(&candidate) {
        return Err(Skip::Filtered);
    }

    let mut entry = EVENTS
        .reserve::<TransitionEvent>(0)
        .ok_or(Skip::RingBufFull)?;
    let ev = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    unsafe {
        (*ev).header = EventHeader {
            ts_ns: now,
            kind: EventKind::Transition as u32,
            len: size_of::<TransitionEvent>() as u32,
        };
        (*ev).skaddr = skaddr;
        (*ev).old_state_ns = old_state_ns.unwrap_or(0);
        (*ev).flags = if old_state_ns.is_some() {
            FLAG_OLD_STATE_KNOWN
        } else {
            0
        };
        (*ev).pid = (pid_tgid >> 32) as u32;
        (*ev).tid = pid_tgid as u32;
        (*ev).uid = bpf_get_current_uid_gid() as u32;
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).family = family;
        (*ev).oldstate = oldstate;
        (*ev).newstate = newstate;
        (*ev).netns = netns;
        (*ev)._reserved = 0;
        let src = ptr::addr_of_mut!((*ev).saddr).cast::<u64>();
        let dst = ptr::addr_of_mut!((*ev).daddr).cast::<u64>();
        *src = saddr[0];
        *src.add(1) = saddr[1];
        *dst = daddr[0];
        *dst.add(1) = daddr[1];
        // Writes straight into the ring buffer record; on failure the kernel
        // zeroes the buffer, which decodes as an empty comm.
        generated::bpf_get_current_comm(ptr::addr_of_mut!((*ev).comm).cast::<c_void>(), 16);
    }
    entry.submit(submit_flags());
    Ok(())
}

/// Ring buffer submit flags: wake the agent only past `WAKEUP_BYTES`.
#[inline(always)]
pub(crate) fn submit_flags() -> u64 {
    let threshold = WAKEUP_BYTES.load();
    let flags = if threshold == 0 || EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    flags as u64
}

/// Transitions the kernel makes only inside the owner's own system calls
/// (connect, listen, close/shutdown): the current task is the owner.
#[inline(always)]
fn in_owner_syscall(oldstate: u8, newstate: u8) -> bool {
    use tcp_state::*;
    matches!(
        (oldstate, newstate),
        (CLOSE, SYN_SENT) | (CLOSE, LISTEN) | (ESTABLISHED, FIN_WAIT1) | (CLOSE_WAIT, LAST_ACK)
    )
}

/// Records that `skaddr` entered `newstate` at `now`. Returns how long it
/// stayed in `oldstate` (if this program saw it enter that state) and
/// whether its owner passes the owner filter (sticky once true; accepted
/// sockets inherit their listener's verdict).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn account_time(
    ctx: &TracePointContext,
    skaddr: u64,
    oldstate: u8,
    newstate: u8,
    now: u64,
    netns: u32,
    sport: u16,
    tgid: u32,
) -> (Option<u64>, bool) {
    let entry = SOCK_TIMING.get_ptr_mut(&skaddr);
    let mut selected = false;
    let elapsed = entry.and_then(|t| {
        let t = unsafe { &*t };
        if t.state == oldstate {
            selected = t.selected != 0;
            Some(now.saturating_sub(t.entered_ns))
        } else {
            bump(counter::TIMING_STALE);
            None
        }
    });
    if filter::owner_filter_on() {
        if in_owner_syscall(oldstate, newstate) && filter::current_task_matches(tgid) {
            selected = true;
        }
        if oldstate == tcp_state::LISTEN && newstate == tcp_state::SYN_RECV {
            selected = filter::listener_selected(netns, sport);
        }
        if newstate == tcp_state::LISTEN && selected && !filter::remember_listener(netns, sport) {
            bump(counter::LISTENERS_FULL);
        }
        if oldstate == tcp_state::LISTEN && newstate == tcp_state::CLOSE {
            filter::forget_listener(netns, sport);
        }
    }
    if newstate == tcp_state::CLOSE {
        // Ignore the result: the entry may legitimately be absent.
        let _ = SOCK_TIMING.remove(&skaddr);
        return (elapsed, selected);
    }
    let timing = SockTiming {
        entered_ns: now,
        state: newstate,
        selected: selected as u8,
        _pad: [0; 6],
    };
    match entry {
        Some(t) => unsafe { *t = timing },
        None => {
            if let Err(err) = SOCK_TIMING.insert(&skaddr, &timing, 0) {
                bump(counter::TIMING_UPDATE_FAILED);
                warn!(ctx, "SOCK_TIMING insert failed: {}", err);
            }
        }
    }
    (elapsed, selected)
}

/// The socket's network namespace inode number, 0 if unknown.
#[inline(always)]
pub(crate) fn netns_inum(skaddr: u64) -> u32 {
    let (off_net, off_inum) = (OFF_SKC_NET.load(), OFF_NET_INUM.load());
    if off_net == OFFSET_UNKNOWN || off_inum == OFFSET_UNKNOWN {
        return 0;
    }
    let net: u64 = match unsafe { bpf_probe_read_kernel((skaddr + off_net as u64) as *const u64) } {
        Ok(p) => p,
        Err(_) => return 0,
    };
    unsafe { bpf_probe_read_kernel((net + off_inum as u64) as *const u32) }.unwrap_or(0)
}

/// The record's local and remote addresses as two 8-byte words each, read
/// with 4- and 8-byte loads (IPv4 in the first 4 bytes).
#[inline(always)]
fn addresses(ctx: &TracePointContext, family: u16) -> ([u64; 2], [u64; 2]) {
    if family == AF_INET6 {
        (
            [rec!(ctx, saddr_v6: u64), rec!(ctx, saddr_v6: u64, + 8)],
            [rec!(ctx, daddr_v6: u64), rec!(ctx, daddr_v6: u64, + 8)],
        )
    } else {
        // AF_INET: the tracepoint only fires for inet sockets.
        (
            [rec!(ctx, saddr: u32) as u64, 0],
            [rec!(ctx, daddr: u32) as u64, 0],
        )
    }
}

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += 1 };
    }
}
