//! fentry on `inet_twsk_kill`: the exact moment a timewait socket dies
//! (timer, RST, reuse). Loaded only where the kernel allows fentry; the
//! portable path (sock_diag polls in the agent) only sees it gone at the
//! next poll. Offsets of `struct sock_common` come from BTF (a timewait
//! socket starts with one).

use core::ptr;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::fentry,
    programs::FEntryContext,
};
use tracer_common::{counter, EventHeader, EventKind, TimewaitDeathEvent, AF_INET6};

use crate::{
    offsets::{
        netns_inum, OFF_SKC_DADDR, OFF_SKC_DPORT, OFF_SKC_FAMILY, OFF_SKC_NUM, OFF_SKC_RCV_SADDR,
        OFF_SKC_V6_DADDR, OFF_SKC_V6_RCV_SADDR,
    },
    transition::{bump, submit_flags, EVENTS},
};

enum TimewaitSkip {
    Unreadable,
    RingBufFull,
}

#[fentry(function = "inet_twsk_kill")]
pub(crate) fn timewait_kill(ctx: FEntryContext) -> u32 {
    match try_timewait_kill(&ctx) {
        Ok(()) => {}
        Err(TimewaitSkip::Unreadable) => bump(counter::TIMEWAIT_UNREADABLE),
        Err(TimewaitSkip::RingBufFull) => bump(counter::TIMEWAIT_DEATHS_LOST),
    }
    0
}

#[inline(always)]
fn read<T: Copy>(base: u64, off: u32) -> Result<T, TimewaitSkip> {
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
        .map_err(|_| TimewaitSkip::Unreadable)
}

fn try_timewait_kill(ctx: &FEntryContext) -> Result<(), TimewaitSkip> {
    let now = unsafe { bpf_ktime_get_ns() };
    let tw: u64 = ctx.arg(0);
    let family: u16 = read(tw, OFF_SKC_FAMILY.load())?;
    let sport: u16 = read(tw, OFF_SKC_NUM.load())?;
    let dport: u16 = u16::from_be(read(tw, OFF_SKC_DPORT.load())?);
    let (saddr, daddr): ([u64; 2], [u64; 2]) = if family == AF_INET6 {
        let s = OFF_SKC_V6_RCV_SADDR.load();
        let d = OFF_SKC_V6_DADDR.load();
        (
            [read(tw, s)?, read(tw, s + 8)?],
            [read(tw, d)?, read(tw, d + 8)?],
        )
    } else {
        let s: u32 = read(tw, OFF_SKC_RCV_SADDR.load())?;
        let d: u32 = read(tw, OFF_SKC_DADDR.load())?;
        ([s as u64, 0], [d as u64, 0])
    };
    let netns = netns_inum(tw);
    let mut entry = EVENTS
        .reserve::<TimewaitDeathEvent>(0)
        .ok_or(TimewaitSkip::RingBufFull)?;
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).header = EventHeader {
            ts_ns: now,
            kind: EventKind::TimewaitDeath as u32,
            len: size_of::<TimewaitDeathEvent>() as u32,
        };
        let src = ptr::addr_of_mut!((*ev).saddr).cast::<u64>();
        let dst = ptr::addr_of_mut!((*ev).daddr).cast::<u64>();
        *src = saddr[0];
        *src.add(1) = saddr[1];
        *dst = daddr[0];
        *dst.add(1) = daddr[1];
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).family = family;
        (*ev)._pad = 0;
        (*ev).netns = netns;
        (*ev)._reserved = 0;
    }
    entry.submit(submit_flags(size_of::<TimewaitDeathEvent>() as u64));
    Ok(())
}
