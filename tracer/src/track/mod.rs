//! Connection accounting: what each transition does to its connection.
//!
//! In: decoded transitions, batches, resets and timewait deaths
//! ([`crate::kernel::events`]), and what the kernel's other interfaces say
//! about sockets (sock_diag dumps, `/proc`, cgroupfs). Out: connections
//! with their time in each state, owner, close and end, ready for
//! [`crate::report`].
//!
//! - `tracker/`: the connection table (`mod.rs`) and the connection itself
//!   (`connection.rs`);
//! - `close.rs`: who closed and how; `resets.rs`: resets joined to
//!   connections;
//! - `lifecycle/`: timewait sockets (`timewait.rs`), stuck connections
//!   (`stuck.rs`), the start-up snapshot (`snapshot.rs`); `worker.rs`: the thread that does their blocking work, with
//!   `diag.rs` (NETLINK_SOCK_DIAG), `netns.rs` and `procfs.rs` below it;
//! - `ports.rs`: ephemeral ports held per destination;
//! - `containers.rs` and `cgroup/`: owners' cgroups, containers and pods.

pub mod cgroup;
pub mod close;
pub mod containers;
pub mod diag;
pub mod lifecycle;
pub mod netns;
pub mod ports;
pub mod procfs;
pub mod resets;
pub mod tracker;
pub mod worker;
