//! Resets: `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`, so that a
//! connection's record can say whether a RST ended it and who sent it.
//! Each reset of a socket becomes one small record that the agent joins to
//! the socket's connection by address; resets are rare, so the classic
//! tracepoints' cost does not matter here, and their records carry the
//! socket address on every kernel (a BTF tracepoint's `sk` would need no
//! more). A reset sent for a segment no socket matched (a SYN to a closed
//! port) has nothing to join to: it is only counted. Where the send
//! record has the kernel's reason (6.10+; its offset from BTF), it comes
//! along.

use core::{mem::offset_of, ptr};

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext as _,
};
use tracer_common::{
    counter, EventHeader, EventKind, ResetEvent, TcpReceiveResetRecord, TcpSendResetRecord,
    OFFSET_UNKNOWN, RESET_REASON_NONE, RESET_REASON_UNREADABLE, RESET_RECEIVED, RESET_SENT,
};

use crate::{
    offsets::OFF_RST_REASON,
    transition::{bump, submit_flags, EVENTS},
};

enum ResetSkip {
    NoSocket,
    RingBufFull,
}

/// An aligned scalar load from the tracepoint record.
///
/// # Safety
/// `offset` is the offset of a `T` field of this tracepoint's record (its
/// `#[repr(C)]` struct, from the format file), so the load stays inside
/// the context the verifier bounds.
#[inline(always)]
unsafe fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub(crate) fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let skaddr: u64 = unsafe { field(&ctx, offset_of!(TcpSendResetRecord, skaddr)) };
    let state: i32 = unsafe { field(&ctx, offset_of!(TcpSendResetRecord, state)) };
    report(send_reset(skaddr, state as u8, RESET_SENT, reason(&ctx)));
    0
}

/// The record's `enum sk_rst_reason`, where it has one (the offset comes
/// from BTF). Read with a helper: the verifier refuses a context access
/// through a pointer moved by a variable, even one it knows.
#[inline(always)]
fn reason(ctx: &TracePointContext) -> u32 {
    let off = OFF_RST_REASON.load();
    if off == OFFSET_UNKNOWN {
        return RESET_REASON_NONE;
    }
    let at = (ctx.as_ptr() as u64 + u64::from(off)) as *const u32;
    unsafe { bpf_probe_read_kernel(at) }.unwrap_or(RESET_REASON_UNREADABLE)
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub(crate) fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let skaddr: u64 = unsafe { field(&ctx, offset_of!(TcpReceiveResetRecord, skaddr)) };
    report(send_reset(skaddr, 0, RESET_RECEIVED, RESET_REASON_NONE));
    0
}

#[inline(always)]
fn report(result: Result<(), ResetSkip>) {
    match result {
        Ok(()) => {}
        Err(ResetSkip::NoSocket) => bump(counter::RESET_NO_SOCKET),
        Err(ResetSkip::RingBufFull) => bump(counter::RESETS_LOST),
    }
}

#[inline(always)]
fn send_reset(skaddr: u64, state: u8, direction: u8, reason: u32) -> Result<(), ResetSkip> {
    if skaddr == 0 {
        return Err(ResetSkip::NoSocket);
    }
    let mut entry = EVENTS
        .reserve::<ResetEvent>(0)
        .ok_or(ResetSkip::RingBufFull)?;
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).header = EventHeader {
            ts_ns: bpf_ktime_get_ns(),
            kind: EventKind::Reset as u32,
            len: size_of::<ResetEvent>() as u32,
        };
        (*ev).skaddr = skaddr;
        (*ev).direction = direction;
        (*ev).state = state;
        (*ev)._pad = [0; 2];
        (*ev).reason = reason;
    }
    entry.submit(submit_flags(size_of::<ResetEvent>() as u64));
    Ok(())
}
