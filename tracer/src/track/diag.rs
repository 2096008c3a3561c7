//! A minimal NETLINK_SOCK_DIAG client for TCP sockets: dumps filtered by
//! state, and exact look-ups by 4-tuple.
//!
//! Why not a crate: netlink-packet-sock-diag (0.5) drops the remaining time
//! of timewait sockets (`idiag_expires`), which is exactly what TIME_WAIT
//! accounting needs; the wire format used here is small and fixed
//! (`include/uapi/linux/inet_diag.h`), and the parser is unit-tested and
//! fuzzed (`fuzz/`, run by `cargo xtask test`).
//!
//! A netlink socket answers for the network namespace it was created in;
//! `netns.rs` creates one per namespace.
//!
//! What the exchange trusts (netlink(7)): a reply belongs to a request
//! when it comes from the kernel (sender port id 0), carries the request's
//! sequence number and is addressed to this socket's port id
//! (`nlmsg_pid`, the kernel's answer to a request from port P names P; the
//! socket is bound at creation, so its port id is known). Anything else is
//! skipped: replies of an earlier request that failed half-way are never
//! read as the next one's. A request that did not read its last reply
//! leaves the socket marked, and the next one first drains what is left (a
//! dump still running on the socket would make the kernel refuse the next
//! dump with EBUSY). A dump the kernel flags `NLM_F_DUMP_INTR` (changed
//! while it ran) is read to its end and asked again once, then fails with
//! [`DiagError::DumpInterrupted`]. Truncated datagrams (`MSG_TRUNC`) and
//! messages longer than what was received fail with
//! [`DiagError::Truncated`].

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::kernel::events::{Family, TcpState};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
/// The dump was inconsistent: the kernel's tables changed while it ran.
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const REQ_LEN: usize = 56;
const MSG_LEN: usize = 72;
const IPPROTO_TCP: u8 = 6;
/// Receive buffer: a netlink dump's datagrams are at most 32 KiB
/// (`netlink_recvmsg` caps its allocation there), a look-up's one message.
const RECV_BUF: usize = 64 << 10;
/// `idiag_timer` of a timewait socket.
pub const TIMER_TIMEWAIT: u8 = 3;

/// The failures of an exchange that are not the system's own errors. They
/// travel inside the `io::Error`s of [`Diag`]'s methods (kind
/// `InvalidData`, or `Other` for [`DiagError::DumpInterrupted`]);
/// [`DiagError::of`] tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiagError {
    /// The kernel flagged the dump `NLM_F_DUMP_INTR` (its tables changed
    /// while it ran) twice in a row: the sockets it listed may miss some
    /// or repeat others, so none are returned.
    #[error("sock_diag dump interrupted by concurrent changes, twice (NLM_F_DUMP_INTR)")]
    DumpInterrupted,
    /// A datagram larger than the receive buffer (`MSG_TRUNC`), or a
    /// message whose length runs past the bytes received.
    #[error("truncated sock_diag reply")]
    Truncated,
    /// A message whose header cannot be read as netlink's.
    #[error("malformed sock_diag reply")]
    Malformed,
}

impl DiagError {
    /// The `DiagError` an error of [`Diag`] carries, if it carries one.
    pub fn of(e: &io::Error) -> Option<DiagError> {
        e.get_ref()?.downcast_ref::<DiagError>().copied()
    }
}

impl From<DiagError> for io::Error {
    fn from(e: DiagError) -> io::Error {
        let kind = match e {
            DiagError::DumpInterrupted => io::ErrorKind::Other,
            DiagError::Truncated | DiagError::Malformed => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// One socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub family: Family,
    /// For timewait sockets, the substate (FIN_WAIT2 or TIME_WAIT).
    pub state: Option<TcpState>,
    pub timer: u8,
    /// Milliseconds until the socket's timer fires (for timewait sockets:
    /// until it dies).
    pub expires_ms: u32,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub uid: u32,
    /// Inode of the socket's file; 0 when it has none (timewait, orphans).
    pub inode: u64,
    /// `idiag_rqueue`: for a connection, the sequence space received and
    /// not yet read by the application (`rcv_nxt - copied_seq`, so the
    /// peer's FIN counts one until it is read); a listener's accept backlog.
    pub rqueue: u32,
    /// `idiag_wqueue`: for a connection, the sequence space written and not
    /// yet acknowledged (`write_seq - snd_una`).
    pub wqueue: u32,
    /// CLOCK_MONOTONIC ns when the reply holding it was read (the kernel
    /// fills a dump's replies as they are read): `expires_ms` counts from
    /// about then.
    pub read_ns: u64,
}

impl DiagSocket {
    pub fn is_timewait(&self) -> bool {
        self.timer == TIMER_TIMEWAIT && self.inode == 0
    }
}

/// A connection's socket queues, in bytes of data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queues {
    /// Received and not yet read by the application.
    pub rqueue: u32,
    /// Written by the application and not yet acknowledged by the peer.
    pub wqueue: u32,
}

impl Queues {
    /// The data in a socket's queues. `idiag_rqueue` counts the peer's FIN
    /// (one sequence number) until the application reads the end of the
    /// stream: in the states after the peer's FIN it is taken off, so a
    /// socket whose application read all the data says 0.
    pub fn of(s: &DiagSocket) -> Queues {
        use TcpState::*;
        let fin_received = matches!(s.state, Some(CloseWait | LastAck | Closing | TimeWait));
        Queues {
            rqueue: if fin_received {
                s.rqueue.saturating_sub(1)
            } else {
                s.rqueue
            },
            wqueue: s.wqueue,
        }
    }
}

/// The bit of a state in `idiag_states`.
pub fn state_bit(s: TcpState) -> u32 {
    1 << (s as u32)
}

pub const ALL_STATES: u32 = 0xfff;

pub struct Diag {
    link: Box<dyn Link>,
    /// This socket's netlink port id: the `nlmsg_pid` of the kernel's
    /// replies to it.
    port: u32,
    seq: u32,
    /// A request did not read its last reply: what is left of it is
    /// drained before the next request.
    unfinished: bool,
}

thread_local! {
    /// The receive buffer of this thread's requests: one per thread that
    /// talks sock_diag, not one per socket (a socket is kept per network
    /// namespace, and hundreds come and go on a node with pod churn).
    static SPARE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// This thread's receive buffer, for one request; given back when dropped.
struct RecvBuf(Vec<u8>);

impl RecvBuf {
    fn take() -> RecvBuf {
        let mut buf = SPARE.take();
        buf.resize(RECV_BUF, 0);
        RecvBuf(buf)
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        SPARE.set(std::mem::take(&mut self.0));
    }
}

/// How one request's replies ended.
struct Replies {
    /// A reply was flagged `NLM_F_DUMP_INTR`.
    interrupted: bool,
}

/// What becomes of each socket a dump reads: kept as something (smaller)
/// or dropped, as it is read.
pub type Keep<'a, T> = &'a mut dyn FnMut(&DiagSocket) -> Option<T>;

impl Diag {
    /// A sock_diag socket in the calling thread's network namespace.
    pub fn new() -> io::Result<Diag> {
        let socket = NetlinkSocket::new()?;
        let port = socket.port;
        Ok(Diag::with_link(Box::new(socket), port))
    }

    fn with_link(link: Box<dyn Link>, port: u32) -> Diag {
        Diag {
            link,
            port,
            seq: 0,
            unfinished: false,
        }
    }

    /// Every TCP socket of `family` whose state is in `states` (a mask of
    /// [`state_bit`]s), timewait sockets included.
    pub fn dump(&mut self, family: Family, states: u32) -> io::Result<Vec<DiagSocket>> {
        let mut out = Vec::new();
        self.dump_request(family, states, None, &mut out, &mut |s| Some(s.clone()))?;
        Ok(out)
    }

    /// Like [`Diag::dump`], but each socket goes through `keep` into `out`
    /// as its reply is read: a dump of a hundred thousand timewait sockets
    /// holds what `keep` makes of them, never the whole dump parsed. On
    /// error `out` is as it was. With `ports`, the kernel itself keeps only
    /// sockets whose (local port, remote port) is among them, with an
    /// inet_diag bytecode filter: it still walks every socket, but the
    /// others are neither copied out nor parsed. At most
    /// [`MAX_FILTER_TUPLES`].
    pub fn dump_into<T>(
        &mut self,
        family: Family,
        states: u32,
        ports: Option<&[(u16, u16)]>,
        out: &mut Vec<T>,
        keep: Keep<'_, T>,
    ) -> io::Result<()> {
        self.dump_request(family, states, ports, out, keep)
    }

    /// The socket with this exact 4-tuple, if there is one.
    pub fn lookup(
        &mut self,
        family: Family,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
    ) -> io::Result<Option<DiagSocket>> {
        let seq = self.next_seq();
        let req = request(
            family,
            ALL_STATES,
            Some((local, remote)),
            NLM_F_REQUEST,
            seq,
        );
        let mut found = None;
        let mut take = |read: &mut Vec<DiagSocket>| {
            if let Some(s) = read.pop() {
                found = Some(s);
            }
        };
        match self.exchange(&req, seq, false, &mut take) {
            Ok(_) => Ok(found),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A dump (filtered by the kernel to `ports` if given), its sockets
    /// through `keep` into `out`, asked again once if the kernel flags it
    /// interrupted. Only a whole, uninterrupted dump stays in `out`.
    fn dump_request<T>(
        &mut self,
        family: Family,
        states: u32,
        ports: Option<&[(u16, u16)]>,
        out: &mut Vec<T>,
        keep: Keep<'_, T>,
    ) -> io::Result<()> {
        let bytecode = ports.map(port_filter);
        let start = out.len();
        for _ in 0..2 {
            let seq = self.next_seq();
            let mut req = request(family, states, None, NLM_F_REQUEST | NLM_F_DUMP, seq);
            if let Some(b) = &bytecode {
                append_bytecode(&mut req, b);
            }
            let replies = self.exchange(&req, seq, true, &mut |read| {
                out.extend(read.drain(..).filter_map(|s| keep(&s)));
            });
            match replies {
                Ok(r) if !r.interrupted => return Ok(()),
                Ok(_) => log::debug!("sock_diag dump {seq} interrupted by concurrent changes"),
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
            out.truncate(start);
        }
        Err(DiagError::DumpInterrupted.into())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `req` and reads its replies: to `NLMSG_DONE` for a dump, to
    /// the first reply for a look-up. The sockets of each datagram go to
    /// `take` as it is read (it empties the Vec), so no more than one
    /// datagram's worth is parsed at once.
    fn exchange(
        &mut self,
        req: &[u8],
        seq: u32,
        dump: bool,
        take: &mut dyn FnMut(&mut Vec<DiagSocket>),
    ) -> io::Result<Replies> {
        if self.unfinished {
            self.drain()?;
        }
        self.link.send(req)?;
        self.unfinished = true;
        let want = Expect {
            seq,
            pid: self.port,
        };
        let mut replies = Replies { interrupted: false };
        let mut read = Vec::new();
        let mut buf = RecvBuf::take();
        loop {
            let got = self
                .link
                .recv(&mut buf.0, false)?
                .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
            if got.truncated {
                return Err(DiagError::Truncated.into());
            }
            if !got.from_kernel {
                continue;
            }
            read.clear();
            let bytes = buf.0.get(..got.len).ok_or(DiagError::Truncated)?;
            let parsed = parse_messages(bytes, want, &mut read);
            if let Err(e) = &parsed {
                // The kernel's own answer (an NLMSG_ERROR of this request)
                // ends it; a reply that could not be read leaves the rest.
                if DiagError::of(e).is_none() {
                    self.unfinished = false;
                }
            }
            let chunk = parsed?;
            if chunk.skipped > 0 {
                log::debug!(
                    "sock_diag: skipped {} replies of other requests",
                    chunk.skipped
                );
            }
            replies.interrupted |= chunk.interrupted;
            let now = crate::clock::monotonic_ns();
            for s in &mut read {
                s.read_ns = now;
            }
            take(&mut read);
            if chunk.done || (!dump && chunk.answered) {
                self.unfinished = false;
                return Ok(replies);
            }
        }
    }

    /// Reads and drops whatever waits on the socket (the rest of a request
    /// that failed half-way: a running dump goes on producing as it is
    /// read, to its end).
    fn drain(&mut self) -> io::Result<()> {
        let mut buf = RecvBuf::take();
        while self.link.recv(&mut buf.0, true)?.is_some() {}
        self.unfinished = false;
        Ok(())
    }
}

/// One datagram as received.
#[derive(Clone, Copy, Debug)]
struct Received {
    len: usize,
    /// It was longer than the buffer (`MSG_TRUNC`).
    truncated: bool,
    /// Its sender is the kernel (port id 0).
    from_kernel: bool,
}

/// Where requests go and replies come from: the netlink socket, or a
/// test's script.
trait Link: Send {
    fn send(&mut self, req: &[u8]) -> io::Result<()>;
    /// The next datagram; `None` only when `nonblocking` and none waits.
    fn recv(&mut self, buf: &mut [u8], nonblocking: bool) -> io::Result<Option<Received>>;
}

struct NetlinkSocket {
    fd: OwnedFd,
    port: u32,
}

impl NetlinkSocket {
    fn new() -> io::Result<NetlinkSocket> {
        // SAFETY: plain socket(2); the fd is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Bound now (port id 0: the kernel picks one), not at the first
        // send, so that the port id the replies carry is known.
        let mut addr = sockaddr_nl();
        let len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_nl of `len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut got = len;
        // SAFETY: addr is writable for `got` bytes.
        if unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut addr).cast(), &mut got) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NetlinkSocket {
            fd,
            port: addr.nl_pid,
        })
    }
}

fn sockaddr_nl() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain integers; zeroed = port 0, no groups.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr
}

impl Link for NetlinkSocket {
    fn send(&mut self, req: &[u8]) -> io::Result<()> {
        let addr = sockaddr_nl(); // port 0: the kernel
                                  // SAFETY: buffer and address valid for their lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], nonblocking: bool) -> io::Result<Option<Received>> {
        let mut from = sockaddr_nl();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; the pointers set below stay valid
        // for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut from).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_nl>() as u32;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let n = loop {
            // SAFETY: msg points to live, writable buffers of the stated
            // sizes.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, flags) };
            if n >= 0 {
                break n;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if nonblocking => return Ok(None),
                _ => return Err(err),
            }
        };
        Ok(Some(Received {
            len: n as usize,
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
            from_kernel: from.nl_pid == 0,
        }))
    }
}

fn request(
    family: Family,
    states: u32,
    tuple: Option<((IpAddr, u16), (IpAddr, u16))>,
    flags: u16,
    seq: u32,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    b.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    let af = match family {
        Family::Ipv4 => libc::AF_INET as u8,
        Family::Ipv6 => libc::AF_INET6 as u8,
    };
    b.extend_from_slice(&[af, IPPROTO_TCP, 0, 0]);
    b.extend_from_slice(&states.to_ne_bytes());
    // inet_diag_sockid
    let ((la, lp), (ra, rp)) = tuple.unwrap_or((
        (Ipv4Addr::UNSPECIFIED.into(), 0),
        (Ipv4Addr::UNSPECIFIED.into(), 0),
    ));
    b.extend_from_slice(&lp.to_be_bytes());
    b.extend_from_slice(&rp.to_be_bytes());
    b.extend_from_slice(&addr_bytes(la));
    b.extend_from_slice(&addr_bytes(ra));
    b.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if
    b.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    b
}

/// Port pairs a filtered dump carries at most. The kernel runs the filter
/// on every socket and its cost grows with the pairs: with 100k timewait
/// sockets present, a full dump took 35 ms here, a filtered one 15 ms for 1
/// pair and 31 ms for 64; past 16 pairs a plain dump is about as cheap.
pub const MAX_FILTER_TUPLES: usize = 16;

const INET_DIAG_REQ_BYTECODE: u16 = 1;
const BC_JMP: u8 = 1;
const BC_S_COND: u8 = 7;
const BC_D_COND: u8 = 8;
/// An op (4 bytes) with a `struct inet_diag_hostcond` (8 bytes, no address).
const COND_LEN: usize = 12;
const TUPLE_LEN: usize = 2 * COND_LEN + 4;

/// Bytecode accepting sockets whose (sport, dport) is one of `ports`:
/// for each pair, "S_COND sport; D_COND dport; JMP accept", where a failed
/// condition jumps to the next pair, and past the last one rejects. (The
/// kernel accepts when the walk ends exactly at the end, rejects when it
/// ends 4 bytes past it; `yes` links must step through every op.)
fn port_filter(ports: &[(u16, u16)]) -> Vec<u8> {
    let total = ports.len() * TUPLE_LEN;
    let mut bc = Vec::with_capacity(total);
    for (i, &(sport, dport)) in ports.iter().enumerate() {
        let next_tuple = (i + 1) * TUPLE_LEN; // == total for the last: then +4 rejects
        let fail_to = |at: usize| {
            let target = if next_tuple == total {
                total + 4
            } else {
                next_tuple
            };
            (target - at) as u16
        };
        for (code, port) in [(BC_S_COND, sport), (BC_D_COND, dport)] {
            let at = bc.len();
            bc.push(code);
            bc.push(COND_LEN as u8);
            bc.extend_from_slice(&fail_to(at).to_ne_bytes());
            // inet_diag_hostcond: family AF_UNSPEC, prefix 0, port
            bc.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
            bc.extend_from_slice(&i32::from(port).to_ne_bytes());
        }
        let at = bc.len();
        bc.push(BC_JMP);
        bc.push(4);
        bc.extend_from_slice(&((total - at) as u16).to_ne_bytes()); // accept
    }
    bc
}

fn append_bytecode(req: &mut Vec<u8>, bc: &[u8]) {
    let attr_len = 4 + bc.len();
    req.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    req.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    req.extend_from_slice(bc);
    while !req.len().is_multiple_of(4) {
        req.push(0);
    }
    let len = req.len() as u32;
    req[..4].copy_from_slice(&len.to_ne_bytes());
}

fn addr_bytes(a: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// What one request expects of its replies: its sequence number, and
/// this socket's port id as `nlmsg_pid` (netlink(7)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expect {
    seq: u32,
    pid: u32,
}

/// What one datagram held for the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Chunk {
    /// The request's last reply was in it (`NLMSG_DONE`, or an ACK).
    done: bool,
    /// It held at least one reply to the request.
    answered: bool,
    /// One of the request's replies was flagged `NLM_F_DUMP_INTR`.
    interrupted: bool,
    /// Messages of other requests (or to other ports) skipped.
    skipped: usize,
}

fn ne_u16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_ne_bytes([s[0], s[1]]))
}

fn ne_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// The error an `NLMSG_ERROR` or `NLMSG_DONE` carries: a negative errno
/// (`i32::MIN` has no positive counterpart: no errno, a malformed reply;
/// found by the fuzz target `sock_diag_reply`).
fn os_error(code: i32) -> io::Error {
    match code.checked_neg() {
        Some(errno) if errno > 0 => io::Error::from_raw_os_error(errno),
        _ => DiagError::Malformed.into(),
    }
}

/// Parses one datagram of netlink messages: the sockets of the replies to
/// `want` go to `out` (one per `inet_diag_msg`: at most one per 88 bytes of
/// `buf`, whatever the messages' length fields say); other messages are
/// skipped. An `NLMSG_ERROR` of the request is its error.
fn parse_messages(mut buf: &[u8], want: Expect, out: &mut Vec<DiagSocket>) -> io::Result<Chunk> {
    let mut chunk = Chunk::default();
    while !buf.is_empty() {
        let (Some(len), Some(ty), Some(flags), Some(seq), Some(pid)) = (
            ne_u32(buf, 0),
            ne_u16(buf, 4),
            ne_u16(buf, 6),
            ne_u32(buf, 8),
            ne_u32(buf, 12),
        ) else {
            return Err(DiagError::Truncated.into()); // part of a header
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN {
            return Err(DiagError::Malformed.into());
        }
        let payload = buf.get(NLMSG_HDRLEN..len).ok_or(DiagError::Truncated)?;
        // Messages are 4-byte aligned; the last one's padding may be absent.
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        if seq != want.seq || pid != want.pid {
            chunk.skipped += 1;
            continue;
        }
        chunk.answered = true;
        chunk.interrupted |= flags & NLM_F_DUMP_INTR != 0;
        match ty {
            NLMSG_DONE => {
                // The dump's own error, if it failed part-way (older
                // kernels put a length there: not negative).
                let code = ne_u32(payload, 0).map_or(0, |c| c as i32);
                if code < 0 {
                    return Err(os_error(code));
                }
                chunk.done = true;
                return Ok(chunk);
            }
            NLMSG_ERROR => {
                let code = ne_u32(payload, 0).ok_or(DiagError::Malformed)? as i32;
                if code == 0 {
                    chunk.done = true;
                    return Ok(chunk); // an ACK
                }
                return Err(os_error(code));
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(s) = parse_msg(payload) {
                    out.push(s);
                }
            }
            _ => {}
        }
    }
    Ok(chunk)
}

/// The reply parser for the fuzz targets (`fuzz/`, feature `fuzzing`):
/// not part of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Bytes of the smallest reply that holds a socket: a socket in the
    /// parser's output costs at least this much input.
    pub const MIN_SOCKET_BYTES: usize = NLMSG_HDRLEN + MSG_LEN;
    pub const NLMSG_DONE: u16 = super::NLMSG_DONE;
    pub const NLMSG_ERROR: u16 = super::NLMSG_ERROR;
    pub const SOCK_DIAG_BY_FAMILY: u16 = super::SOCK_DIAG_BY_FAMILY;
    pub const NLM_F_DUMP_INTR: u16 = super::NLM_F_DUMP_INTR;

    /// What the parser made of one datagram.
    #[derive(Clone, Copy, Debug)]
    pub struct Chunk {
        pub done: bool,
        pub answered: bool,
        pub interrupted: bool,
        pub skipped: usize,
    }

    /// One datagram parsed for the request `seq` of port `pid`.
    pub fn parse_messages(
        buf: &[u8],
        seq: u32,
        pid: u32,
        out: &mut Vec<DiagSocket>,
    ) -> io::Result<Chunk> {
        let c = super::parse_messages(buf, Expect { seq, pid }, out)?;
        Ok(Chunk {
            done: c.done,
            answered: c.answered,
            interrupted: c.interrupted,
            skipped: c.skipped,
        })
    }
}

/// Decodes one `struct inet_diag_msg`.
fn parse_msg(p: &[u8]) -> Option<DiagSocket> {
    if p.len() < MSG_LEN {
        return None;
    }
    let family = match p[0] as i32 {
        libc::AF_INET => Family::Ipv4,
        libc::AF_INET6 => Family::Ipv6,
        _ => return None,
    };
    let addr = |off: usize| -> IpAddr {
        match family {
            Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(p[off], p[off + 1], p[off + 2], p[off + 3])),
            Family::Ipv6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&p[off..off + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            }
        }
    };
    Some(DiagSocket {
        family,
        state: TcpState::from_kernel(p[1]),
        timer: p[2],
        lport: u16::from_be_bytes([p[4], p[5]]),
        rport: u16::from_be_bytes([p[6], p[7]]),
        laddr: addr(8),
        raddr: addr(24),
        expires_ms: ne_u32(p, 52)?,
        rqueue: ne_u32(p, 56)?,
        wqueue: ne_u32(p, 60)?,
        uid: ne_u32(p, 64)?,
        inode: u64::from(ne_u32(p, 68)?),
        read_ns: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// This socket's port id in the crafted replies.
    const PORT: u32 = 4242;
    const SEQ: u32 = 7;
    const WANT: Expect = Expect {
        seq: SEQ,
        pid: PORT,
    };

    /// A netlink message, padded to 4 bytes.
    fn msg(ty: u16, flags: u16, seq: u32, pid: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&pid.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    /// An `inet_diag_msg` payload for 127.0.0.1:`lport` -> 10.0.0.2:40000.
    fn socket_payload(state: u8, timer: u8, expires: u32, inode: u32, lport: u16) -> Vec<u8> {
        let mut p = vec![libc::AF_INET as u8, state, timer, 0];
        p.extend_from_slice(&lport.to_be_bytes());
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&[127, 0, 0, 1]);
        p.extend_from_slice(&[0; 12]);
        p.extend_from_slice(&[10, 0, 0, 2]);
        p.extend_from_slice(&[0; 12]);
        p.extend_from_slice(&[0; 12]); // if, cookie
                                       // idiag_rqueue 7, idiag_wqueue 9.
        for v in [expires, 7, 9, 1000, inode] {
            p.extend_from_slice(&v.to_ne_bytes());
        }
        p
    }

    fn reply_to(seq: u32, pid: u32, lport: u16) -> Vec<u8> {
        msg(
            SOCK_DIAG_BY_FAMILY,
            0x2, // NLM_F_MULTI
            seq,
            pid,
            &socket_payload(1, 0, 0, 4242, lport),
        )
    }

    fn reply_msg(state: u8, timer: u8, expires: u32, inode: u32) -> Vec<u8> {
        msg(
            SOCK_DIAG_BY_FAMILY,
            0x2,
            SEQ,
            PORT,
            &socket_payload(state, timer, expires, inode, 8080),
        )
    }

    fn done_of(seq: u32, pid: u32, flags: u16, code: i32) -> Vec<u8> {
        msg(NLMSG_DONE, 0x2 | flags, seq, pid, &code.to_ne_bytes())
    }

    fn done() -> Vec<u8> {
        done_of(SEQ, PORT, 0, 0)
    }

    fn error_of(seq: u32, pid: u32, code: i32) -> Vec<u8> {
        let mut p = code.to_ne_bytes().to_vec();
        p.extend_from_slice(&[0; 16]); // the request's header
        msg(NLMSG_ERROR, 0, seq, pid, &p)
    }

    fn lports(out: &[DiagSocket]) -> Vec<u16> {
        out.iter().map(|s| s.lport).collect()
    }

    #[test]
    fn parses_a_timewait_socket_and_the_end_of_a_dump() {
        let mut buf = reply_msg(6, TIMER_TIMEWAIT, 59_123, 0);
        buf.extend(reply_msg(1, 0, 0, 4242));
        let mut out = Vec::new();
        let chunk = parse_messages(&buf, WANT, &mut out).unwrap();
        assert!(chunk.answered && !chunk.done && !chunk.interrupted);
        buf.extend(done());
        out.clear();
        let chunk = parse_messages(&buf, WANT, &mut out).unwrap();
        assert!(chunk.done);
        assert_eq!(out.len(), 2);
        let tw = &out[0];
        assert!(tw.is_timewait());
        assert_eq!(tw.state, Some(TcpState::TimeWait));
        assert_eq!(tw.expires_ms, 59_123);
        assert_eq!((tw.laddr, tw.lport), ("127.0.0.1".parse().unwrap(), 8080));
        assert_eq!((tw.raddr, tw.rport), ("10.0.0.2".parse().unwrap(), 40000));
        assert_eq!(tw.uid, 1000);
        assert!(!out[1].is_timewait());
        assert_eq!(out[1].inode, 4242);
        assert_eq!((out[1].rqueue, out[1].wqueue), (7, 9));
        assert_eq!(
            Queues::of(&out[1]),
            Queues {
                rqueue: 7,
                wqueue: 9
            }
        );
        // In CLOSE_WAIT the unread FIN is not data.
        let close_wait = |rqueue| DiagSocket {
            state: Some(TcpState::CloseWait),
            rqueue,
            ..out[1].clone()
        };
        assert_eq!(Queues::of(&close_wait(7)).rqueue, 6);
        assert_eq!(Queues::of(&close_wait(0)).rqueue, 0);
    }

    #[test]
    fn errors_and_garbage() {
        let e =
            parse_messages(&error_of(SEQ, PORT, -libc::ENOENT), WANT, &mut Vec::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // An ACK ends the request.
        let ack = parse_messages(&error_of(SEQ, PORT, 0), WANT, &mut Vec::new()).unwrap();
        assert!(ack.done && ack.answered);
        // A dump that failed part-way says so in its NLMSG_DONE.
        let e = parse_messages(&done_of(SEQ, PORT, 0, -libc::ENOMEM), WANT, &mut Vec::new())
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
        // A length shorter than a header.
        let mut bad = reply_msg(1, 0, 0, 1);
        bad[..4].copy_from_slice(&8u32.to_ne_bytes());
        let e = parse_messages(&bad, WANT, &mut Vec::new()).unwrap_err();
        assert_eq!(DiagError::of(&e), Some(DiagError::Malformed));
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    /// Found by the fuzz target `sock_diag_reply`: negating the error code
    /// `i32::MIN` overflowed (a panic with overflow checks).
    #[test]
    fn error_codes_without_an_errno_are_malformed() {
        for reply in [
            error_of(SEQ, PORT, i32::MIN),
            done_of(SEQ, PORT, 0, i32::MIN),
            error_of(SEQ, PORT, 5), // positive: no errno either
        ] {
            let e = parse_messages(&reply, WANT, &mut Vec::new()).unwrap_err();
            assert_eq!(DiagError::of(&e), Some(DiagError::Malformed));
        }
        // The datagram of the fuzzer's crash (an NLMSG_ERROR of 119 bytes
        // whose code is i32::MIN, the rest of the input and zeros).
        let mut payload = vec![0, 0, 0, 0x80, 1, 0x94, 3];
        payload.extend([1; 13]);
        payload.push(0x0a);
        payload.resize(119, 0);
        let crash = msg(NLMSG_ERROR, 0, SEQ, PORT, &payload);
        let e = parse_messages(&crash, WANT, &mut Vec::new()).unwrap_err();
        assert_eq!(DiagError::of(&e), Some(DiagError::Malformed));
    }

    #[test]
    fn truncated_messages_are_rejected() {
        // A length beyond the bytes received.
        let mut long = reply_msg(1, 0, 0, 1);
        long[0] = 200;
        let e = parse_messages(&long, WANT, &mut Vec::new()).unwrap_err();
        assert_eq!(DiagError::of(&e), Some(DiagError::Truncated));
        // The datagram cut inside a message, or inside a header.
        let whole = [reply_msg(1, 0, 0, 1), done()].concat();
        for cut in [whole.len() - 3, 20, 10] {
            let e = parse_messages(&whole[..cut], WANT, &mut Vec::new()).unwrap_err();
            assert_eq!(
                DiagError::of(&e),
                Some(DiagError::Truncated),
                "cut at {cut}"
            );
        }
        assert_eq!(
            parse_messages(&[], WANT, &mut Vec::new()).unwrap(),
            Chunk::default()
        );
    }

    #[test]
    fn replies_of_other_requests_are_skipped() {
        // A late dump of request 6 (its DONE and an error included) before
        // request 7's replies: none of it is read as 7's.
        let buf = [
            reply_to(SEQ - 1, PORT, 1),
            error_of(SEQ - 1, PORT, -libc::EBUSY),
            done_of(SEQ - 1, PORT, 0, 0),
            reply_to(SEQ, PORT, 2),
        ]
        .concat();
        let mut out = Vec::new();
        let chunk = parse_messages(&buf, WANT, &mut out).unwrap();
        assert_eq!(lports(&out), [2]);
        assert_eq!(chunk.skipped, 3);
        assert!(chunk.answered && !chunk.done);
        // Only stale replies: nothing answered.
        out.clear();
        let chunk = parse_messages(&reply_to(SEQ + 1, PORT, 3), WANT, &mut out).unwrap();
        assert!(!chunk.answered && out.is_empty());
    }

    #[test]
    fn replies_to_other_ports_are_skipped() {
        let buf = [
            reply_to(SEQ, PORT + 1, 1),
            done_of(SEQ, 0, 0, 0),
            reply_to(SEQ, PORT, 2),
            done(),
        ]
        .concat();
        let mut out = Vec::new();
        let chunk = parse_messages(&buf, WANT, &mut out).unwrap();
        assert_eq!(lports(&out), [2]);
        assert_eq!(chunk.skipped, 2);
        assert!(chunk.done);
    }

    #[test]
    fn dump_interrupted_is_flagged() {
        let buf = [
            reply_msg(1, 0, 0, 1),
            done_of(SEQ, PORT, NLM_F_DUMP_INTR, 0),
        ]
        .concat();
        let chunk = parse_messages(&buf, WANT, &mut Vec::new()).unwrap();
        assert!(chunk.done && chunk.interrupted);
        // Another request's flag is not this one's.
        let buf = [done_of(SEQ - 1, PORT, NLM_F_DUMP_INTR, 0), done()].concat();
        assert!(
            !parse_messages(&buf, WANT, &mut Vec::new())
                .unwrap()
                .interrupted
        );
    }

    /// One datagram of a [`Script`].
    #[derive(Clone)]
    struct Datagram {
        bytes: Vec<u8>,
        truncated: bool,
        from_kernel: bool,
    }

    fn kernel(bytes: Vec<u8>) -> Datagram {
        Datagram {
            bytes,
            truncated: false,
            from_kernel: true,
        }
    }

    type Answer = Box<dyn FnMut(u32) -> Vec<Datagram> + Send>;

    /// A [`Link`] that answers each request (by its sequence number) with
    /// the datagrams its `answer` makes, after those already queued.
    struct Script {
        queue: VecDeque<Datagram>,
        answer: Answer,
        sent: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    }

    impl Link for Script {
        fn send(&mut self, req: &[u8]) -> io::Result<()> {
            let seq = ne_u32(req, 8).unwrap();
            self.sent.lock().unwrap().push(seq);
            let answer = (self.answer)(seq);
            self.queue.extend(answer);
            Ok(())
        }

        fn recv(&mut self, buf: &mut [u8], nonblocking: bool) -> io::Result<Option<Received>> {
            let Some(d) = self.queue.pop_front() else {
                return if nonblocking {
                    Ok(None)
                } else {
                    Err(io::Error::other("the script has nothing more to read"))
                };
            };
            let len = d.bytes.len().min(buf.len());
            buf[..len].copy_from_slice(&d.bytes[..len]);
            Ok(Some(Received {
                len,
                truncated: d.truncated || len < d.bytes.len(),
                from_kernel: d.from_kernel,
            }))
        }
    }

    /// A `Diag` on a script, and the sequence numbers it sent.
    fn scripted(
        queued: Vec<Datagram>,
        answer: impl FnMut(u32) -> Vec<Datagram> + Send + 'static,
    ) -> (Diag, std::sync::Arc<std::sync::Mutex<Vec<u32>>>) {
        let sent = std::sync::Arc::default();
        let script = Script {
            queue: queued.into(),
            answer: Box::new(answer),
            sent: std::sync::Arc::clone(&sent),
        };
        (Diag::with_link(Box::new(script), PORT), sent)
    }

    /// A dump's answer in two datagrams: sockets with local ports `ports`,
    /// then NLMSG_DONE (with `flags`).
    fn dump_answer(seq: u32, ports: &[u16], flags: u16) -> Vec<Datagram> {
        let socks = ports.iter().flat_map(|&p| reply_to(seq, PORT, p)).collect();
        vec![kernel(socks), kernel(done_of(seq, PORT, flags, 0))]
    }

    #[test]
    fn a_dump_reads_to_its_end_and_skips_late_replies_of_an_earlier_one() {
        // Request 1 failed half-way: its rest arrives first, DONE included.
        let stale = vec![
            kernel(reply_to(1, PORT, 1)),
            kernel([reply_to(1, PORT, 2), done_of(1, PORT, 0, 0)].concat()),
        ];
        let (mut diag, sent) = scripted(stale, |seq| dump_answer(seq, &[10, 11], 0));
        diag.seq = 1;
        let got = diag.dump(Family::Ipv4, ALL_STATES).unwrap();
        assert_eq!(lports(&got), [10, 11]);
        assert_eq!(*sent.lock().unwrap(), [2]);
        assert!(got.iter().all(|s| s.read_ns > 0));
    }

    #[test]
    fn datagrams_not_from_the_kernel_are_skipped() {
        let (mut diag, _) = scripted(vec![], |seq| {
            let mut forged = kernel([reply_to(seq, PORT, 666), done_of(seq, PORT, 0, 0)].concat());
            forged.from_kernel = false;
            let mut answer = vec![forged];
            answer.extend(dump_answer(seq, &[1], 0));
            answer
        });
        assert_eq!(lports(&diag.dump(Family::Ipv4, ALL_STATES).unwrap()), [1]);
    }

    #[test]
    fn an_interrupted_dump_is_asked_again_once() {
        let mut round = 0;
        let (mut diag, sent) = scripted(vec![], move |seq| {
            round += 1;
            let flags = if round == 1 { NLM_F_DUMP_INTR } else { 0 };
            dump_answer(seq, &[round], flags)
        });
        let got = diag.dump(Family::Ipv4, ALL_STATES).unwrap();
        assert_eq!(lports(&got), [2], "the second dump's sockets only");
        assert_eq!(*sent.lock().unwrap(), [1, 2]);
    }

    #[test]
    fn a_dump_into_keeps_what_keep_makes_of_the_last_tries_sockets() {
        let mut round = 0;
        let (mut diag, sent) = scripted(vec![], move |seq| {
            round += 1;
            let flags = if round == 1 { NLM_F_DUMP_INTR } else { 0 };
            let lports: Vec<u16> = (1..=4).map(|p| p + 10 * round).collect();
            dump_answer(seq, &lports, flags)
        });
        let mut out = vec![(0, false)];
        diag.dump_into(Family::Ipv4, ALL_STATES, None, &mut out, &mut |s| {
            (s.lport % 2 == 0).then_some((s.lport, s.read_ns > 0))
        })
        .unwrap();
        // Appended after what was there; the interrupted first try's
        // sockets dropped; the odd ports not kept; each dated as read.
        assert_eq!(out, [(0, false), (22, true), (24, true)]);
        assert_eq!(*sent.lock().unwrap(), [1, 2]);
    }

    #[test]
    fn a_dump_interrupted_twice_is_an_error_of_its_own() {
        let (mut diag, sent) = scripted(vec![], |seq| dump_answer(seq, &[1], NLM_F_DUMP_INTR));
        let mut out = vec![7u16];
        let e = diag
            .dump_into(
                Family::Ipv4,
                ALL_STATES,
                Some(&[(1, 2)]),
                &mut out,
                &mut |s| Some(s.lport),
            )
            .unwrap_err();
        assert_eq!(DiagError::of(&e), Some(DiagError::DumpInterrupted));
        assert_eq!(out, [7], "what was there, nothing of the failed dumps");
        assert_eq!(*sent.lock().unwrap(), [1, 2]);
        // Each was read to its end: the next request starts clean.
        assert!(!diag.unfinished);
        let e = io::Error::from_raw_os_error(libc::EBUSY);
        assert_eq!(DiagError::of(&e), None);
    }

    #[test]
    fn a_truncated_datagram_fails_the_request_and_its_rest_is_drained() {
        let mut round = 0;
        let (mut diag, _) = scripted(vec![], move |seq| {
            round += 1;
            let mut answer = dump_answer(seq, &[round], 0);
            if round == 1 {
                answer[0].truncated = true;
            }
            answer
        });
        let e = diag.dump(Family::Ipv4, ALL_STATES).unwrap_err();
        assert_eq!(DiagError::of(&e), Some(DiagError::Truncated));
        assert!(diag.unfinished);
        // The first dump's DONE is still queued: drained, then skipped.
        assert_eq!(lports(&diag.dump(Family::Ipv4, ALL_STATES).unwrap()), [2]);
        // A datagram longer than the buffer is truncated too.
        let (mut diag, _) = scripted(vec![], |seq| {
            vec![kernel(
                [
                    reply_to(seq, PORT, 1).repeat(RECV_BUF / 80),
                    done_of(seq, PORT, 0, 0),
                ]
                .concat(),
            )]
        });
        let e = diag.dump(Family::Ipv4, ALL_STATES).unwrap_err();
        assert_eq!(DiagError::of(&e), Some(DiagError::Truncated));
    }

    #[test]
    fn lookups_take_their_own_answer() {
        let tuple = (
            (Ipv4Addr::LOCALHOST.into(), 1),
            (Ipv4Addr::LOCALHOST.into(), 2),
        );
        let mut round = 0;
        let (mut diag, _) = scripted(vec![], move |seq| {
            round += 1;
            match round {
                // A late reply of another request before the answer.
                1 => vec![
                    kernel(reply_to(seq + 100, PORT, 9)),
                    kernel(reply_to(seq, PORT, 5)),
                ],
                2 => vec![kernel(error_of(seq, PORT, -libc::ENOENT))],
                _ => vec![kernel(error_of(seq, PORT, -libc::EPERM))],
            }
        });
        let found = diag.lookup(Family::Ipv4, tuple.0, tuple.1).unwrap();
        assert_eq!(found.map(|s| s.lport), Some(5));
        assert_eq!(diag.lookup(Family::Ipv4, tuple.0, tuple.1).unwrap(), None);
        let e = diag.lookup(Family::Ipv4, tuple.0, tuple.1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(!diag.unfinished);
    }

    /// A real sock_diag socket, if this kernel answers TCP dumps (the
    /// tcp_diag module); the tests that need one skip otherwise.
    fn real_diag() -> Option<Diag> {
        let mut d = Diag::new().ok()?;
        match d.dump(Family::Ipv4, state_bit(TcpState::Listen)) {
            Ok(_) => Some(d),
            Err(e) => {
                eprintln!("skipped: sock_diag unavailable ({e})");
                None
            }
        }
    }

    fn listeners(n: usize) -> (Vec<std::net::TcpListener>, Vec<u16>) {
        let ls: Vec<_> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports = ls.iter().map(|l| l.local_addr().unwrap().port()).collect();
        (ls, ports)
    }

    #[test]
    fn the_kernel_answers_to_the_bound_port_id() {
        let Some(mut diag) = real_diag() else { return };
        assert_ne!(diag.port, 0);
        let (_ls, ports) = listeners(3);
        let got = diag
            .dump(Family::Ipv4, state_bit(TcpState::Listen))
            .unwrap();
        for p in &ports {
            assert!(got.iter().any(|s| s.lport == *p), "listener {p} missing");
        }
        // A look-up's answer (by 4-tuple) carries the port id too.
        let local = (Ipv4Addr::LOCALHOST.into(), ports[0]);
        let remote = (Ipv4Addr::UNSPECIFIED.into(), 0);
        let found = diag.lookup(Family::Ipv4, local, remote).unwrap();
        assert_eq!(found.map(|s| s.lport), Some(ports[0]));
    }

    #[test]
    fn a_dump_abandoned_half_way_does_not_spoil_the_next_request() {
        if real_diag().is_none() {
            return;
        }
        let mut diag = Diag::new().unwrap(); // fresh: nothing read yet
        let (_ls, ports) = listeners(400);
        // Ask, read one datagram (a fresh socket's first is about a page:
        // a few dozen sockets), and leave the rest. The kernel sizes the
        // next datagrams after the largest read (here 16 KiB, about 100
        // sockets): the dump still runs when the next request comes.
        let seq = diag.next_seq();
        let req = request(
            Family::Ipv4,
            state_bit(TcpState::Listen),
            None,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
        );
        diag.link.send(&req).unwrap();
        let mut small = vec![0u8; 16 << 10];
        let first = diag.link.recv(&mut small, false).unwrap().unwrap();
        let mut out = Vec::new();
        let want = Expect {
            seq,
            pid: diag.port,
        };
        let chunk = parse_messages(&small[..first.len], want, &mut out).unwrap();
        assert!(!chunk.done, "the dump fits one datagram: add listeners");
        diag.unfinished = true;
        // The next dump gets its own answer, whole (a dump still running
        // on the socket would have made the kernel refuse it: EBUSY).
        let got = diag
            .dump(Family::Ipv4, state_bit(TcpState::Listen))
            .unwrap();
        for p in &ports {
            assert!(got.iter().any(|s| s.lport == *p), "listener {p} missing");
        }
        // And a request sent but never read: its answer is skipped.
        let stale = request(
            Family::Ipv4,
            ALL_STATES,
            None,
            NLM_F_REQUEST | NLM_F_DUMP,
            0,
        );
        diag.link.send(&stale).unwrap();
        let local = (Ipv4Addr::LOCALHOST.into(), ports[0]);
        let remote = (Ipv4Addr::UNSPECIFIED.into(), 0);
        let found = diag.lookup(Family::Ipv4, local, remote).unwrap();
        assert_eq!(found.map(|s| s.lport), Some(ports[0]));
    }

    /// Runs bytecode the way the kernel's inet_diag_bc_run does.
    fn run(bc: &[u8], sport: u16, dport: u16) -> bool {
        let mut len = bc.len() as i64;
        let mut pc = 0usize;
        while len > 0 {
            let (code, yes, no) = (
                bc[pc],
                bc[pc + 1] as i64,
                u16::from_ne_bytes([bc[pc + 2], bc[pc + 3]]) as i64,
            );
            let ok = match code {
                BC_JMP => false,
                BC_S_COND | BC_D_COND => {
                    let port =
                        i32::from_ne_bytes([bc[pc + 8], bc[pc + 9], bc[pc + 10], bc[pc + 11]]);
                    port == i32::from(if code == BC_S_COND { sport } else { dport })
                }
                _ => panic!("unknown op"),
            };
            let step = if ok { yes } else { no };
            len -= step;
            pc = (pc as i64 + step) as usize;
        }
        len == 0
    }

    #[test]
    fn port_filter_accepts_exactly_the_pairs() {
        let bc = port_filter(&[(80, 40000), (443, 40001), (8080, 5)]);
        assert_eq!(bc.len(), 3 * TUPLE_LEN);
        assert!(run(&bc, 80, 40000));
        assert!(run(&bc, 443, 40001));
        assert!(run(&bc, 8080, 5));
        assert!(!run(&bc, 80, 40001));
        assert!(!run(&bc, 443, 40000));
        assert!(!run(&bc, 1, 2));
        let one = port_filter(&[(1, 2)]);
        assert!(run(&one, 1, 2) && !run(&one, 2, 1));
    }

    #[test]
    fn request_layout() {
        let r = request(
            Family::Ipv6,
            state_bit(TcpState::TimeWait),
            None,
            NLM_F_REQUEST | NLM_F_DUMP,
            7,
        );
        assert_eq!(r.len(), 72);
        assert_eq!(r[16], libc::AF_INET6 as u8);
        assert_eq!(r[17], IPPROTO_TCP);
        assert_eq!(ne_u32(&r, 20), Some(1 << 6));
        assert_eq!(&r[64..72], &[0xff; 8]);
    }
}
