//! Socket helpers of the load and the hold helpers.
//!
//! In: addresses. Out: a listener (`listen`), a connection from a given
//! source address (`connect_from`), the `i`th client address of the
//! connections whose server socket is kept (`client_addr`), and I/O errors
//! that say what failed (`with_what`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::FromRawFd as _,
};

use anyhow::{Context as _, Result};

/// Client addresses for connections whose server socket is kept.
const IPV4_CLIENT_ADDRS: u64 = 65_536;
pub(crate) const IPV6_CLIENT_ADDRS: u64 = 1_024;

pub(crate) fn with_what(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The `i`th client address of connections whose server socket is kept.
pub(crate) fn client_addr(ipv6: bool, i: u64) -> IpAddr {
    if ipv6 {
        let n = (i % IPV6_CLIENT_ADDRS) as u16 + 1;
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, n))
    } else {
        let n = (i % IPV4_CLIENT_ADDRS) as u32;
        IpAddr::V4(Ipv4Addr::from(0x7f01_0000 | n))
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage; the casts below write
    // within it (sockaddr_in/in6 are smaller).
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in);
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6);
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
}

/// connect() from a given source address; the port is picked at connect
/// time (IP_BIND_ADDRESS_NO_PORT), as for an unbound socket.
pub(crate) fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let family = if dst.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket calls on an fd we own; it is closed on error and
    // otherwise handed to TcpStream.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let (ss, len) = sockaddr(SocketAddr::new(src, 0));
        if libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(with_what(
                io::Error::last_os_error(),
                &format!("bind {src}"),
            ));
        }
        let (ss, len) = sockaddr(dst);
        if libc::connect(fd, &ss as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

pub(crate) fn listen(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_cycle_within_their_prefix() {
        assert_eq!(client_addr(false, 0).to_string(), "127.1.0.0");
        assert_eq!(client_addr(false, 258).to_string(), "127.1.1.2");
        assert_eq!(client_addr(false, 65_536), client_addr(false, 0));
        assert_eq!(client_addr(true, 0).to_string(), "fd00:b::1");
        assert_eq!(client_addr(true, 1_023).to_string(), "fd00:b::400");
        assert_eq!(client_addr(true, 1_024), client_addr(true, 0));
    }
}
