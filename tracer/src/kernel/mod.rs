//! The kernel side, as the agent sees it: loading the eBPF program with its
//! filters and attaching it, what the kernel offers, and decoding the
//! records it sends.
//!
//! In: the embedded object (built by `build.rs`), the filters from the
//! command line, the kernel's BTF. Out: a [`loader::Probe`] (ring buffer,
//! counters, listener table) and, per ring buffer record, an
//! [`events::Record`].

pub mod btf_offsets;
pub mod events;
pub mod features;
pub mod filters;
pub mod loader;
pub mod reset_reasons;
pub mod ring;
