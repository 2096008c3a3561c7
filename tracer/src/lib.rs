//! `tracer`: every TCP state transition from the kernel, and how long each
//! connection spent in each state.
//!
//! The binary is `src/main.rs`; the library exists so the integration tests
//! and benchmarks drive the same loader, decoder and tracker.

/// The hash map of the per-event path: foldhash instead of SipHash (a
/// third of the time of a look-up by socket or 4-tuple), still seeded per
/// process, so remote peers cannot aim collisions at it.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub mod agent;
pub mod btf_offsets;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod close;
pub mod containers;
pub mod diag;
pub mod events;
pub mod features;
pub mod filters;
pub mod group;
pub mod lifecycle;
pub mod loader;
pub mod metrics;
pub mod netns;
pub mod observe;
pub mod output;
pub mod procfs;
pub mod resets;
pub mod summarize;
pub mod summary;
pub mod tracker;
