//! Feature probes: minimal programs the agent only *loads* (never attaches)
//! to learn whether the kernel accepts that program type, then unloads.

use aya_ebpf::{
    macros::{btf_tracepoint, fentry},
    programs::{BtfTracePointContext, FEntryContext},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn probe_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[fentry(function = "tcp_set_state")]
pub(crate) fn probe_fentry(_ctx: FEntryContext) -> u32 {
    0
}

/// `iter/tcp`: aya-ebpf has no macro for iterators; the section name is
/// what makes it one.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub(crate) fn probe_iter_tcp(_ctx: *mut core::ffi::c_void) -> i32 {
    0
}
