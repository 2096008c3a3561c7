//! The parts of a connection's life the tracepoint does not show:
//!
//! - **TIME_WAIT.** After an active close the kernel continues the
//!   connection in a timewait socket that no tracepoint sees. While such
//!   connections are pending, one NETLINK_SOCK_DIAG dump of the FIN_WAIT2 and
//!   TIME_WAIT sockets per namespace and family runs every
//!   `--timewait-interval`, and each pending connection is joined to its
//!   timewait socket by namespace and 4-tuple. sock_diag rather than an
//!   `iter/tcp` iterator: it needs no BTF offsets (so it works on every
//!   kernel with the tracepoint), its remaining-time field dates the
//!   TIME_WAIT entry to the millisecond, and a dump of 131k timewait sockets
//!   took about 0.1 s here. Nothing is dumped while nothing is pending.
//! - **Owners and stuck connections.** Connections that stay in CLOSE_WAIT
//!   (or, with `--fin-wait2`, FIN_WAIT2) longer than a threshold are
//!   reported once with every process and fd holding the socket, found
//!   through the socket's inode (sock_diag) in /proc.
//! - **Sockets older than the tracer**, from a sock_diag snapshot of every
//!   namespace at start.
//!
//! The dumps, look-ups and `/proc` scans run on the worker thread
//! (`worker.rs`); this file decides what to ask it, from the connection
//! table, and what its answers do to the table. A poll's answer judges only
//! the connections that were waiting when it was asked.
//!
//! This module holds the state they share (`Lifecycle`); the snapshot is in
//! `snapshot.rs`, the timewait polls in `timewait.rs`, the stuck alerts'
//! choices in `stuck.rs`.

mod snapshot;
mod stuck;
mod timewait;

use std::collections::HashMap;

use crate::{
    kernel::events::{Family, TcpState},
    track::diag::state_bit,
    track::netns::Namespaces,
};

pub use snapshot::Snapshot;
pub use timewait::{PollResult, TimewaitPoll};

/// TCP_TIMEWAIT_LEN: a timewait socket in TIME_WAIT lives 60 s (fixed in
/// the kernel) unless reused or killed.
pub const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;
/// Timer precision: jiffies (4 ms at HZ=250) and idiag_expires' whole ms.
pub const EXPIRY_TOLERANCE_NS: u64 = 10_000_000;

#[derive(Default, Debug)]
pub struct Counters {
    pub polls: u64,
    /// What the polls cost: the worker's CPU time and the time their
    /// answers took to apply.
    pub poll_ns: u64,
    pub errors: u64,
}

pub struct Lifecycle {
    /// The namespaces opened at start, until the worker takes them.
    ns: Option<Namespaces>,
    /// Per namespace: TCPTimeWaitOverflow at start, for the worker.
    overflows: HashMap<u32, u64>,
    /// Timewait deaths arrive from the fentry program (exact times).
    pub fentry: bool,
    /// The kernel answers sock_diag requests for TCP (`tcp_diag`).
    pub available: bool,
    /// A timewait poll was asked and its answer is not all applied yet.
    pub polling: bool,
    /// The answer being applied, a slice at a time.
    applying: Option<timewait::Applying>,
    pub counters: Counters,
}

impl Lifecycle {
    pub fn new() -> std::io::Result<Self> {
        let mut ns = Namespaces::new()?;
        let own = ns.own();
        let available = match ns
            .diag(own, &[])
            .map(|d| d.dump(Family::Ipv4, state_bit(TcpState::Listen)))
        {
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                log::warn!(
                    "sock_diag for TCP is unavailable ({e}; is the tcp_diag module loaded?): no TIME_WAIT \
                     accounting, no CLOSE_WAIT holders, no snapshot of older sockets"
                );
                false
            }
            None => false,
        };
        Ok(Lifecycle {
            ns: Some(ns),
            overflows: HashMap::new(),
            fentry: false,
            available,
            polling: false,
            applying: None,
            counters: Counters::default(),
        })
    }

    /// A lifecycle without namespaces (the decisions only), for tests.
    #[cfg(test)]
    pub fn detached() -> Self {
        Lifecycle {
            ns: None,
            overflows: HashMap::new(),
            fentry: false,
            available: true,
            polling: false,
            applying: None,
            counters: Counters::default(),
        }
    }

    /// The namespaces opened so far and their overflow counters at start,
    /// for the worker thread (once).
    pub fn take_namespaces(&mut self) -> Option<(Namespaces, HashMap<u32, u64>)> {
        let ns = self.ns.take()?;
        Some((ns, std::mem::take(&mut self.overflows)))
    }
}
