//! The load's network namespace: made and configured from the thread
//! that will use it.
//!
//! In: the `LoadConfig`. Out: the calling thread in a new network
//! namespace with `lo` up (`enter_new_netns`), its sysctls written and
//! read back, and the IPv6 client addresses on `lo` when the load keeps
//! server sockets (`configure_netns`).

use std::{fs, io, net::IpAddr};

use anyhow::{bail, Context as _, Result};

use super::{
    load::{LoadConfig, Mode},
    sockets::{client_addr, IPV6_CLIENT_ADDRS},
};

/// Moves this thread into a new network namespace with `lo` up.
pub(crate) fn enter_new_netns() -> Result<()> {
    // SAFETY: plain syscall; affects only this thread (and threads it
    // spawns later).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("unshare(CLONE_NEWNET) (needs root)");
    }
    // SAFETY: ioctl on a socket we own with a zeroed, correctly sized ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("socket for SIOCSIFFLAGS");
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let res = if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr) != 0 {
            Err(io::Error::last_os_error()).context("SIOCGIFFLAGS lo")
        } else {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr) != 0 {
                Err(io::Error::last_os_error()).context("SIOCSIFFLAGS lo up")
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        res
    }
}

/// Adds the IPv6 client addresses to `lo` (IPv4 has 127.0.0.0/8 there).
fn add_ipv6_client_addrs() -> Result<()> {
    #[repr(C)]
    struct In6Ifreq {
        addr: [u8; 16],
        prefixlen: u32,
        ifindex: libc::c_int,
    }
    // SAFETY: if_nametoindex reads a C string; ioctl gets a correctly
    // sized in6_ifreq on a socket we own.
    unsafe {
        let ifindex = libc::if_nametoindex(c"lo".as_ptr()) as libc::c_int;
        if ifindex == 0 {
            return Err(io::Error::last_os_error()).context("if_nametoindex(lo)");
        }
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("IPv6 socket");
        }
        let mut res = Ok(());
        for i in 0..IPV6_CLIENT_ADDRS {
            let IpAddr::V6(a) = client_addr(true, i) else {
                unreachable!()
            };
            let req = In6Ifreq {
                addr: a.octets(),
                prefixlen: 128,
                ifindex,
            };
            if libc::ioctl(fd, libc::SIOCSIFADDR as _, &req) != 0 {
                res = Err(io::Error::last_os_error()).with_context(|| format!("adding {a} to lo"));
                break;
            }
        }
        libc::close(fd);
        res
    }
}

/// Per-namespace sysctls (written from this thread, so they land in its
/// namespace): a wide ephemeral range above the server ports, and
/// TIME_WAIT reuse so client-first does not run out of ports.
pub(crate) fn configure_netns(cfg: &LoadConfig) -> Result<()> {
    write_sysctl("net/ipv4/ip_local_port_range", "1024 65535")?;
    write_sysctl("net/ipv4/tcp_tw_reuse", "1")?;
    if cfg.ipv6 && (cfg.mode == Mode::NeverClose || cfg.hold > 0) {
        add_ipv6_client_addrs()?;
    }
    Ok(())
}

fn write_sysctl(name: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{name}");
    fs::write(&path, value).with_context(|| format!("writing {path}"))?;
    let back = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    if norm(&back) != norm(value) {
        bail!("{path} reads {back:?} after writing {value:?}");
    }
    Ok(())
}
