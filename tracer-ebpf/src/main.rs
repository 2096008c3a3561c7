//! Kernel side of `tracer`: one classic tracepoint program on
//! `sock:inet_sock_set_state` that times every TCP socket's stay in each
//! state and streams the transitions to the agent through a ring buffer.
//!
//! Shape borrowed from libbpf-tools' `tcpstates.bpf.c`: filters are constants
//! set before load, per-socket state lives in a bounded LRU hash and is
//! deleted when the socket reaches CLOSE.
#![no_std]
#![no_main]

mod filter;
mod probes;
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
