//! Resets: `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`, so that a
//! connection's record can say whether a RST ended it and who sent it.
//! Each reset of a socket becomes one small record that the agent joins to
//! the socket's connection by address; resets are rare, so the classic
//! tracepoints' cost does not matter here, and their records carry the
//! socket address on every kernel (a BTF tracepoint's `sk` would need no
//! more). A reset sent for a segment no socket matched (a SYN to a closed
//! port) has nothing to join to: it is only counted.

use core::{mem::offset_of, ptr};

use aya_ebpf::{
    helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext, EbpfContext as _,
};
use tracer_common::{
    counter, EventHeader, EventKind, ResetEvent, TcpReceiveResetRecord, TcpSendResetRecord,
    RESET_RECEIVED, RESET_SENT,
};

use crate::transition::{bump, submit_flags, EVENTS};

enum Skip {
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
    report(send_reset(skaddr, state as u8, RESET_SENT));
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub(crate) fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let skaddr: u64 = unsafe { field(&ctx, offset_of!(TcpReceiveResetRecord, skaddr)) };
    report(send_reset(skaddr, 0, RESET_RECEIVED));
    0
}

#[inline(always)]
fn report(result: Result<(), Skip>) {
    match result {
        Ok(()) => {}
        Err(Skip::NoSocket) => bump(counter::RESET_NO_SOCKET),
        Err(Skip::RingBufFull) => bump(counter::RESETS_LOST),
    }
}

#[inline(always)]
fn send_reset(skaddr: u64, state: u8, direction: u8) -> Result<(), Skip> {
    if skaddr == 0 {
        return Err(Skip::NoSocket);
    }
    let mut entry = EVENTS.reserve::<ResetEvent>(0).ok_or(Skip::RingBufFull)?;
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
        (*ev)._pad = [0; 6];
    }
    entry.submit(submit_flags(size_of::<ResetEvent>() as u64));
    Ok(())
}
