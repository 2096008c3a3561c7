//! Shared helpers of the integration tests: root check, a network namespace
//! per test, a collector that waits for events up to a deadline, and
//! scripted TCP conversations.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicU16, Ordering},
    thread,
    time::{Duration, Instant},
};

use tracer::{
    events::{decode, TcpState, Transition},
    loader::{self, CounterValues, LoadOptions, Probe},
};

/// How long a test waits for events it expects.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Integration tests load eBPF: without root they fail, loudly.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests load eBPF programs and need root: run `cargo xtask test` as root"
    );
}

/// Runs `f` on a thread of its own inside a new network namespace with `lo`
/// up, so the test's traffic is its own. Threads `f` spawns inherit the
/// namespace.
pub fn in_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    require_root();
    thread::spawn(move || {
        // SAFETY: plain syscall; affects only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        loopback_up();
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn loopback_up() {
    // SAFETY: ioctl on a socket we own with a zeroed, correctly sized ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        assert_eq!(
            libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr),
            0,
            "SIOCGIFFLAGS"
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr),
            0,
            "SIOCSIFFLAGS"
        );
        libc::close(fd);
    }
}

/// A port for one test: distinct across the tests of one run and unlikely
/// to be used by anything else on the machine.
pub fn test_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 2000) as u16 * 10;
    base + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The loaded program and every transition it delivered so far.
pub struct Collector {
    pub probe: Probe,
    pub events: Vec<Transition>,
}

impl Collector {
    pub fn load(opts: LoadOptions) -> Self {
        require_root();
        let probe = loader::load(&opts).unwrap_or_else(|e| panic!("loading the program: {e}"));
        Collector {
            probe,
            events: Vec::new(),
        }
    }

    /// Only transitions on `port`, filtered in the kernel.
    pub fn on_port(port: u16) -> Self {
        Self::load(LoadOptions {
            ports: vec![port],
            ..Default::default()
        })
    }

    pub fn poll(&mut self) {
        while let Some(item) = self.probe.events.next() {
            self.events
                .push(decode(&item).unwrap_or_else(|e| panic!("undecodable record: {e}")));
        }
    }

    /// Polls until `done(events)` holds; panics with what arrived after
    /// [`DEADLINE`].
    pub fn wait_until(&mut self, what: &str, done: impl Fn(&[Transition]) -> bool) {
        let start = Instant::now();
        loop {
            self.poll();
            if done(&self.events) {
                return;
            }
            if start.elapsed() > DEADLINE {
                panic!("timed out waiting for {what}; got:\n{}", dump(&self.events));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until every socket in `socks` reached CLOSE.
    pub fn wait_closed(
        &mut self,
        what: &str,
        matches: impl Fn(&Transition) -> bool,
        sockets: usize,
    ) {
        self.wait_until(what, |evs| {
            evs.iter()
                .filter(|t| matches(t) && t.new == TcpState::Close)
                .count()
                >= sockets
        });
    }

    pub fn counters(&self) -> CounterValues {
        self.probe.counters.read().expect("reading counters")
    }

    /// Transitions of one socket, in order.
    pub fn of_sock(&self, sock: u64) -> Vec<&Transition> {
        self.events.iter().filter(|t| t.sock == sock).collect()
    }

    /// The socket whose transitions match `pred` (exactly one).
    pub fn sock_where(&self, what: &str, pred: impl Fn(&Transition) -> bool) -> u64 {
        let mut socks: Vec<u64> = self
            .events
            .iter()
            .filter(|t| pred(t))
            .map(|t| t.sock)
            .collect();
        socks.dedup();
        assert_eq!(
            socks.len(),
            1,
            "expected one {what} socket; events:\n{}",
            dump(&self.events)
        );
        socks[0]
    }
}

pub fn dump(events: &[Transition]) -> String {
    events
        .iter()
        .map(|t| {
            format!(
                "  {:#x} {}:{} -> {}:{} {} -> {} {:?} pid={}",
                t.sock, t.laddr, t.lport, t.raddr, t.rport, t.old, t.new, t.old_state_ns, t.pid
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The (old, new) pairs of a socket's transitions.
pub fn sequence(events: &[&Transition]) -> Vec<(TcpState, TcpState)> {
    events.iter().map(|t| (t.old, t.new)).collect()
}

/// Who closes the connection, and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ending {
    ClientFirst,
    ServerFirst,
    /// The client resets it (SO_LINGER 0).
    ClientReset,
}

/// A listener on `addr`, one connection from a client, `hold` with the
/// connection established, then closed as `close` says. Everything is
/// closed when it returns. Returns the client's local address.
pub fn conversation(addr: SocketAddr, hold: Duration, close: Ending) -> SocketAddr {
    let listener = TcpListener::bind(addr).expect("bind");
    let client = TcpStream::connect(addr).expect("connect");
    let client_addr = client.local_addr().expect("local_addr");
    let (mut server, _) = listener.accept().expect("accept");
    // A byte each way, as a real exchange would.
    (&client).write_all(b"?").unwrap();
    let mut buf = [0u8; 1];
    server.read_exact(&mut buf).unwrap();
    server.write_all(b"!").unwrap();
    (&client).read_exact(&mut buf).unwrap();
    thread::sleep(hold);
    match close {
        Ending::ClientFirst => {
            drop(client);
            // Wait for the client's FIN before closing: a passive close.
            assert_eq!(server.read(&mut buf).unwrap(), 0);
            drop(server);
        }
        Ending::ServerFirst => {
            drop(server);
            let mut c = client;
            assert_eq!(c.read(&mut buf).unwrap(), 0);
            drop(c);
        }
        Ending::ClientReset => {
            socket2::SockRef::from(&client)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(client);
            let mut b = [0u8; 1];
            // The server sees the reset as an error (or EOF on some kernels).
            let _ = server.read(&mut b);
            drop(server);
        }
    }
    drop(listener);
    client_addr
}
