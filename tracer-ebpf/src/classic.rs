//! The fallback path: the classic `sock:inet_sock_set_state` tracepoint,
//! for kernels without BTF (or without tracing socket storage, before
//! 5.11). Its record is the tracepoint's format; per-socket timing lives in
//! a bounded LRU hash keyed by socket address, deleted at CLOSE.
//!
//! It costs more than the BTF path: the kernel builds the perf record
//! first, and all classic tracepoint programs of a CPU share one recursion
//! guard, so a transition in softirq on top of one in task context is
//! skipped (counted, from the program's `recursion_misses`).

use core::{mem::offset_of, ptr};

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
    EbpfContext as _,
};
use aya_log_ebpf::warn;

use crate::{
    offsets,
    transition::{count, on_transition, Socket, TransitionSkip},
};
use tracer_common::{BatchEvent, InetSockSetStateRecord, SockTiming, AF_INET6, IPPROTO_TCP};

/// When each socket entered its current state. Sized by the agent
/// (`--max-sockets`); LRU so that sockets freed without a CLOSE transition
/// cannot fill it up for good.
#[map]
static SOCK_TIMING: LruHashMap<u64, SockTiming> = LruHashMap::with_max_entries(65536, 0);

/// Direct, aligned scalar load of a field of the tracepoint record. (A
/// generic copy of an array field makes LLVM emit a `memmove` on the context
/// pointer, which the verifier refuses.)
///
/// # Safety
/// `offset` is the offset of a `T` field of this tracepoint's record (its
/// `#[repr(C)]` struct, from the format file), so the load stays inside
/// the context the verifier bounds.
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

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub(crate) fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    count(try_inet_sock_set_state(&ctx));
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), TransitionSkip> {
    if rec!(ctx, protocol: u16) != IPPROTO_TCP {
        return Err(TransitionSkip::NotTcp);
    }
    let record = TracepointRecord {
        ctx,
        skaddr: rec!(ctx, skaddr: u64),
    };
    on_transition(
        &record,
        rec!(ctx, oldstate: i32) as u8,
        rec!(ctx, newstate: i32) as u8,
    )
}

struct TracepointRecord<'a> {
    ctx: &'a TracePointContext,
    skaddr: u64,
}

impl Socket for TracepointRecord<'_> {
    #[inline(always)]
    fn addr(&self) -> u64 {
        self.skaddr
    }

    #[inline(always)]
    fn family(&self) -> u16 {
        rec!(self.ctx, family: u16)
    }

    #[inline(always)]
    fn ports(&self) -> (u16, u16) {
        (rec!(self.ctx, sport: u16), rec!(self.ctx, dport: u16))
    }

    #[inline(always)]
    fn addresses(&self, family: u16) -> ([u32; 4], [u32; 4]) {
        let c = self.ctx;
        if family == AF_INET6 {
            (
                [
                    rec!(c, saddr_v6: u32),
                    rec!(c, saddr_v6: u32, + 4),
                    rec!(c, saddr_v6: u32, + 8),
                    rec!(c, saddr_v6: u32, + 12),
                ],
                [
                    rec!(c, daddr_v6: u32),
                    rec!(c, daddr_v6: u32, + 4),
                    rec!(c, daddr_v6: u32, + 8),
                    rec!(c, daddr_v6: u32, + 12),
                ],
            )
        } else {
            // AF_INET: the tracepoint only fires for inet sockets.
            (
                [rec!(c, saddr: u32), 0, 0, 0],
                [rec!(c, daddr: u32), 0, 0, 0],
            )
        }
    }

    #[inline(always)]
    fn netns(&self) -> u32 {
        offsets::netns_inum(self.skaddr)
    }

    #[inline(always)]
    fn timing(&self, _create: bool) -> Option<*mut SockTiming> {
        SOCK_TIMING.get_ptr_mut(self.skaddr)
    }

    #[inline(always)]
    fn insert_timing(&self, t: &SockTiming) -> bool {
        match SOCK_TIMING.insert(self.skaddr, t, 0) {
            Ok(()) => true,
            Err(err) => {
                warn!(self.ctx, "SOCK_TIMING insert failed: {}", err);
                false
            }
        }
    }

    #[inline(always)]
    fn batch(&self, _slot: *mut SockTiming) -> Option<*mut BatchEvent> {
        None
    }

    #[inline(always)]
    fn forget_timing(&self, _slot: Option<*mut SockTiming>) {
        // The entry may legitimately be absent.
        let _ = SOCK_TIMING.remove(self.skaddr);
    }
}
