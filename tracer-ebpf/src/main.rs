//! Kernel side of `tracer`: the programs on the `inet_sock_set_state`
//! tracepoint that time every TCP socket's stay in each state and stream
//! the transitions to the agent through a ring buffer.
//!
//! - `btf.rs`: the main path, a BTF tracepoint with socket-local storage
//!   (two copies, so that nested hits are not skipped);
//! - `classic.rs`: the fallback, the classic tracepoint with an LRU hash;
//! - `transition.rs`: what both do with a transition (timing, filters,
//!   the record); `filter.rs`: the in-kernel filters;
//! - `timewait.rs`: fentry on `inet_twsk_kill` where allowed;
//! - `reset.rs`: resets sent and received, joined to connections by the
//!   agent;
//! - `probes.rs`: feature probes the agent loads and unloads.
//!
//! Shape borrowed from libbpf-tools' `tcpstates.bpf.c`: filters are constants
//! set before load, per-socket state is reset when the socket reaches CLOSE.
#![no_std]
#![no_main]
#![expect(
    clippy::undocumented_unsafe_blocks,
    reason = "aya-ebpf makes every map look-up and helper call unsafe; the \
              verifier checks each access at load time, and the unsafe fns \
              that read kernel memory state their contract under # Safety"
)]

mod btf;
mod classic;
mod filter;
mod offsets;
mod probes;
mod reset;
mod timewait;
mod transition;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
