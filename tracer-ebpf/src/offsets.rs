//! Kernel struct offsets, found by the agent in the kernel's BTF and set
//! as constants before load (Rust eBPF has no CO-RE relocations). The
//! verifier treats `.rodata` values as constants, so `sk + OFF_X` is a
//! fixed-offset access it can check against the BTF type.

use aya_ebpf::{helpers::bpf_probe_read_kernel, Global};
use tracer_common::OFFSET_UNKNOWN;

/// `sock_common.skc_net.net` and `net.ns.inum`.
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_NET: Global<u32> = Global::new(OFFSET_UNKNOWN);
#[unsafe(no_mangle)]
pub(crate) static OFF_NET_INUM: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// `struct sock_common` members (also valid in `struct sock`, which starts
/// with one, and in timewait sockets).
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_FAMILY: Global<u32> = Global::new(OFFSET_UNKNOWN);
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_NUM: Global<u32> = Global::new(OFFSET_UNKNOWN);
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_DPORT: Global<u32> = Global::new(OFFSET_UNKNOWN);
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_RCV_SADDR: Global<u32> = Global::new(OFFSET_UNKNOWN);
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_DADDR: Global<u32> = Global::new(OFFSET_UNKNOWN);
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_V6_RCV_SADDR: Global<u32> = Global::new(OFFSET_UNKNOWN);
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_V6_DADDR: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// `struct sock.sk_protocol` (a `u16` since 5.6) and `struct
/// inet_sock.inet_sport` (the local port the tracepoint reports; `skc_num`
/// is already 0 on `-> CLOSE`).
#[unsafe(no_mangle)]
pub(crate) static OFF_SK_PROTOCOL: Global<u32> = Global::new(OFFSET_UNKNOWN);
#[unsafe(no_mangle)]
pub(crate) static OFF_INET_SPORT: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// `reason` in the `tcp:tcp_send_reset` record (`struct
/// trace_event_raw_tcp_send_reset`, 6.10+).
#[unsafe(no_mangle)]
pub(crate) static OFF_RST_REASON: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// The namespace inode of the socket (or timewait socket) at `addr`, read
/// with `bpf_probe_read_kernel` (for programs whose pointer is untyped);
/// 0 if unknown.
#[inline(always)]
pub(crate) fn netns_inum(addr: u64) -> u32 {
    let (off_net, off_inum) = (OFF_SKC_NET.load(), OFF_NET_INUM.load());
    if off_net == OFFSET_UNKNOWN || off_inum == OFFSET_UNKNOWN {
        return 0;
    }
    let net: u64 = match unsafe { bpf_probe_read_kernel((addr + off_net as u64) as *const u64) } {
        Ok(p) => p,
        Err(_) => return 0,
    };
    unsafe { bpf_probe_read_kernel((net + off_inum as u64) as *const u32) }.unwrap_or(0)
}
