//! Names for a socket owner's cgroup: the kernel program records
//! `bpf_get_current_cgroup_id()`, which is the inode number of the cgroup's
//! directory in the v2 hierarchy; this module turns that number into the
//! cgroup's path and what the path says (container, pod, systemd unit).

mod mount;
mod path;

pub use mount::{cgroup2 as cgroup2_mount, Mount};
pub use path::{parse, Container, Parsed, Runtime};
