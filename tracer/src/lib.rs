//! `tracer`: every TCP state transition from the kernel, and how long each
//! connection spent in each state.
//!
//! The binary is `src/main.rs`; the library exists so the integration tests
//! and benchmarks drive the same loader, decoder and tracker.
//!
//! One transition's path: [`kernel`] loads the eBPF program and decodes
//! what it sends through the ring buffer; [`track`] accounts it to its
//! connection (states, owner, close, timewait socket, resets); [`report`]
//! writes the records and feeds the summary and the metrics; [`agent`]
//! runs the loop that drives them, [`cli`] turns the flags into options.

/// The hash map of the per-event path: foldhash instead of SipHash (a
/// third of the time of a look-up by socket or 4-tuple), still seeded per
/// process, so remote peers cannot aim collisions at it.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

// The path of one event, in order: the kernel's records are decoded in
// `kernel`, accounted per connection in `track`, and written, summed and
// exported in `report`; `agent` runs the loop, `cli` parses the flags.
pub mod agent;
pub mod cli;
pub mod clock;
pub mod kernel;
pub mod manual;
pub mod report;
pub mod top;
pub mod track;
