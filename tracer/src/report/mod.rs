//! What the user gets: records on stdout (table or JSON Lines), summaries,
//! Prometheus metrics, and the summary of a recording.
//!
//! In: transitions with their owner, finished connections with their
//! close, stuck connections ([`crate::track`]). Out: bytes on stdout, the
//! `/metrics` endpoint.
//!
//! - `format.rs`: the output format and record selection, shared by the
//!   command line and every writer;
//! - `output/`: the records; `observe.rs`: what feeds the summary and the
//!   metrics;
//! - `summary/` (aggregation in `mod.rs`, rendering in `render.rs`) and
//!   `group.rs`: `--summary`, `--group-by`; `replay/`: `tracer summarize`, a recording replayed;
//! - `metrics/`: Prometheus.

pub mod format;
pub mod group;
pub mod metrics;
pub mod observe;
pub mod output;
pub mod replay;
pub mod summary;
