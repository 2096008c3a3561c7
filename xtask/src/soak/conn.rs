//! One loopback connection, both ends on the calling thread, closed the
//! way `Close` says; and the pieces of a listener restart (a connection
//! left in the accept queue, a refused connect).
//!
//! Each call returns only when every transition of its connection has
//! happened on the side it can observe: the peer's FIN read as EOF, the
//! peer's reset read as ECONNRESET. (The last ACKs of a FIN handshake
//! may still be on their way: the soak waits for the namespace to settle
//! before it stops the tracer.)

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use crate::bench::sockets::with_what;

const REQUEST: &[u8; 16] = b"GET / soak  0001";
const REPLY: &[u8; 16] = b"200 OK soak  001";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Close {
    /// The client closes, then the server: the client's timewait socket.
    ClientFirst,
    /// The server closes, then the client: the server's timewait socket.
    ServerFirst,
    /// The client closes with `SO_LINGER` 0: a reset, no timewait.
    ClientAbort,
    /// The server closes with `SO_LINGER` 0.
    ServerAbort,
}

impl Close {
    pub(super) const ALL: [Close; 4] = [
        Close::ClientFirst,
        Close::ServerFirst,
        Close::ClientAbort,
        Close::ServerAbort,
    ];
}

/// Connects to `addr`, accepts on `listener` (it must be the only
/// connection coming), 16 bytes each way, then closes as `close` says.
pub(super) fn connection(listener: &TcpListener, addr: SocketAddr, close: Close) -> io::Result<()> {
    let mut client =
        TcpStream::connect(addr).map_err(|e| with_what(e, &format!("connect to {addr}")))?;
    let (mut server, _) = listener.accept().map_err(|e| with_what(e, "accept"))?;
    let mut buf = [0u8; 16];
    client.write_all(REQUEST)?;
    server.read_exact(&mut buf)?;
    server.write_all(REPLY)?;
    client.read_exact(&mut buf)?;
    match close {
        Close::ClientFirst => {
            drop(client);
            expect_eof(&mut server, "server")?;
        }
        Close::ServerFirst => {
            drop(server);
            expect_eof(&mut client, "client")?;
        }
        Close::ClientAbort => {
            abort(client)?;
            expect_reset(&mut server, "server")?;
        }
        Close::ServerAbort => {
            abort(server)?;
            expect_reset(&mut client, "client")?;
        }
    }
    Ok(())
}

/// Closes with `SO_LINGER` {on, 0 s}: the kernel sends a reset and
/// moves the socket straight to CLOSE.
pub(super) fn abort(s: TcpStream) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own with a correctly sized linger.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(with_what(io::Error::last_os_error(), "SO_LINGER"));
    }
    drop(s);
    Ok(())
}

pub(super) fn expect_eof(s: &mut TcpStream, who: &str) -> io::Result<()> {
    let mut b = [0u8; 16];
    match s.read(&mut b)? {
        0 => Ok(()),
        n => Err(io::Error::other(format!(
            "{who} read {n} bytes where it expected the peer's FIN"
        ))),
    }
}

/// Reads until the peer's reset: ECONNRESET (a FIN or data is wrong).
pub(super) fn expect_reset(s: &mut TcpStream, who: &str) -> io::Result<()> {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(with_what(e, &format!("{who} waiting for the peer's reset"))),
        Ok(n) => Err(io::Error::other(format!(
            "{who} read {n} bytes where it expected the peer's reset"
        ))),
    }
}

/// Waits (at most `max`) until `listener` has a connection to accept.
pub(super) fn wait_acceptable(listener: &TcpListener, max: Duration) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, max.as_millis() as libc::c_int) };
    match r {
        1 => Ok(()),
        0 => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no connection in the accept queue after {max:?}"),
        )),
        _ => Err(with_what(
            io::Error::last_os_error(),
            "poll on the listener",
        )),
    }
}

/// A connect to `addr` that must be refused (nobody listens there).
pub(super) fn refused(addr: SocketAddr) -> io::Result<()> {
    match TcpStream::connect(addr) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(with_what(e, &format!("connect to the closed {addr}"))),
        Ok(_) => Err(io::Error::other(format!(
            "a connect to {addr} succeeded while its listener was closed"
        ))),
    }
}
