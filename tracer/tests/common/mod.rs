//! Shared helpers of the integration tests: root check, a network namespace
//! per test, a collector that waits for events up to a deadline, and
//! scripted TCP conversations.
//!
//! Over 600 lines on purpose: every integration test binary includes this one module of helpers.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    sync::mpsc,
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use tracer::{
    kernel::events::{decode_record, Record, TcpState, Transition},
    kernel::filters::Filters,
    kernel::loader::{self, CounterValues, LoadOptions, Probe},
};

/// How long a test waits for events it expects.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// How long a tracer may take to attach: loading parses the kernel's BTF,
/// CPU-bound work that runs 3-9 times slower in the emulated guests, where
/// several tests start tracers at once.
pub(crate) fn attach_deadline() -> Duration {
    if in_guest() {
        DEADLINE * 3
    } else {
        DEADLINE
    }
}

/// In a QEMU guest of `cargo xtask test` (software emulation: slower, and
/// an interrupt between two programs' clock reads can take a millisecond).
pub(crate) fn in_guest() -> bool {
    std::env::var_os("TRACER_GUEST").is_some()
}

/// Integration tests load eBPF: without root they fail, loudly.
pub(crate) fn require_root() {
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
pub(crate) fn in_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
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

/// The calling thread's network namespace, if it is not the process's.
pub(crate) fn own_netns() -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino() as u32).ok();
    let (thread, process) = (ino("/proc/thread-self/ns/net")?, ino("/proc/self/ns/net")?);
    (thread != process).then_some(thread)
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
pub(crate) fn test_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Below the default ephemeral range (32768-60999): a port the test
    // filters on must never be some other connection's local port (the
    // test's own HTTP clients, a Prometheus server's scrapes).
    let base = 10_000 + (std::process::id() % 2000) as u16 * 10;
    base + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The loaded program and every transition it delivered so far.
pub(crate) struct Collector {
    pub probe: Probe,
    pub events: Vec<Transition>,
}

impl Collector {
    pub(crate) fn load(opts: LoadOptions) -> Self {
        require_root();
        let probe = loader::load(&opts).unwrap_or_else(|e| panic!("loading the program: {e}"));
        Collector {
            probe,
            events: Vec::new(),
        }
    }

    /// Only transitions on `port` (and of this thread's namespace, when it
    /// has its own), filtered in the kernel.
    pub(crate) fn on_port(port: u16) -> Self {
        Self::on_port_with(port, LoadOptions::default())
    }

    /// [`Collector::on_port`] with other load options (path, batching).
    pub(crate) fn on_port_with(port: u16, opts: LoadOptions) -> Self {
        Self::load(LoadOptions {
            filters: Filters {
                ports: vec![port],
                netns: own_netns(),
                ..Default::default()
            },
            ..opts
        })
    }

    pub(crate) fn poll(&mut self) {
        while let Some(item) = self.probe.events.next_record() {
            match decode_record(&item).unwrap_or_else(|e| panic!("undecodable record: {e}")) {
                Record::Transition(t) => self.events.push(t),
                Record::Batch(b) => self.events.extend(b.transitions()),
                // Kernels with fentry also report timewait deaths; resets
                // are checked through the binary (tests/closes.rs).
                Record::TimewaitDeath(_) | Record::Reset(_) => {}
            }
        }
    }

    /// Polls until `done(events)` holds; panics with what arrived after
    /// [`DEADLINE`].
    pub(crate) fn wait_until(&mut self, what: &str, done: impl Fn(&[Transition]) -> bool) {
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
    pub(crate) fn wait_closed(
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

    pub(crate) fn counters(&self) -> CounterValues {
        self.probe.counters.read().expect("reading counters")
    }

    /// Transitions of one socket, in order.
    pub(crate) fn of_sock(&self, sock: u64) -> Vec<&Transition> {
        self.events.iter().filter(|t| t.sock == sock).collect()
    }

    /// The socket whose transitions match `pred` (exactly one).
    pub(crate) fn sock_where(&self, what: &str, pred: impl Fn(&Transition) -> bool) -> u64 {
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

pub(crate) fn dump(events: &[Transition]) -> String {
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
pub(crate) fn sequence(events: &[&Transition]) -> Vec<(TcpState, TcpState)> {
    events.iter().map(|t| (t.old, t.new)).collect()
}

/// Who closes the connection, and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Ending {
    ClientFirst,
    ServerFirst,
    /// The client resets it (SO_LINGER 0).
    ClientReset,
}

/// A listener on `addr`, one connection from a client, `hold` with the
/// connection established, then closed as `close` says. Everything is
/// closed when it returns. Returns the client's local address.
pub(crate) fn conversation(addr: SocketAddr, hold: Duration, close: Ending) -> SocketAddr {
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

/// 127.0.0.1:`port`, prepared before a fork (the child makes system calls
/// only: the test harness is multi-threaded).
pub(crate) fn loopback_sockaddr(port: u16) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all zeroes is valid.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as u16;
    addr.sin_port = port.to_be();
    addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    addr
}

/// In a forked child: `fds` become fds 3, 4, ... and every other fd above 2
/// is closed. The fork copied every fd of the test process, including
/// sockets of tests running on other threads, which would then count the
/// child among their holders.
///
/// # Safety
/// Only in a forked child, whose other fds it closes.
pub(crate) unsafe fn keep_only_fds(fds: &[i32]) {
    // Out of the way first, so that one already at 3 or 4 is not lost.
    let mut moved = [-1i32; 8];
    for (i, &fd) in fds.iter().enumerate() {
        // SAFETY: plain system calls.
        moved[i] = unsafe { libc::fcntl(fd, libc::F_DUPFD, 1000 + i as i32) };
    }
    for (i, &fd) in moved.iter().take(fds.len()).enumerate() {
        // SAFETY: plain system call.
        unsafe { libc::dup2(fd, 3 + i as i32) };
    }
    // SAFETY: plain system call.
    unsafe { libc::syscall(libc::SYS_close_range, 3 + fds.len() as u32, u32::MAX, 0u32) };
}

/// In a forked child: a TCP socket listening on `addr` with `option`
/// (`SO_REUSEADDR`, `SO_REUSEPORT`) set; the child exits with 2 if it
/// cannot listen.
///
/// # Safety
/// Only in a forked child (it may `_exit`).
pub(crate) unsafe fn listen_or_exit(addr: &libc::sockaddr_in, option: i32, backlog: i32) -> i32 {
    let one: libc::c_int = 1;
    // SAFETY: plain system calls on valid pointers.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        libc::setsockopt(
            s,
            libc::SOL_SOCKET,
            option,
            (&one as *const i32).cast(),
            size_of::<libc::c_int>() as u32,
        );
        if libc::bind(
            s,
            (addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
            || libc::listen(s, backlog) != 0
        {
            libc::_exit(2);
        }
        s
    }
}

/// What a forked server does with the connection it accepts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ServerMode {
    /// Reads until the client's FIN, then closes (a passive close).
    CloseAfterPeer,
    /// Never closes: the socket stays in CLOSE_WAIT after the client's FIN.
    NeverClose,
}

/// The comm of forked servers.
pub(crate) const SERVER_COMM: &[u8] = b"tracer-srv\0";

/// A server in a process of its own (forked), listening on 127.0.0.1:port
/// and accepting one connection. Killed and reaped on drop.
pub(crate) struct ForkedServer {
    pub pid: u32,
    /// The accepted connection's fd in the server, once it has accepted.
    pub fd_rx: std::fs::File,
    go_tx: i32,
}

impl ForkedServer {
    /// Forks the server. The child makes raw system calls only (no
    /// allocation: the test harness is multi-threaded).
    pub(crate) fn start(port: u16, mode: ServerMode) -> ForkedServer {
        let server = Self::prepare(port, mode);
        server.go();
        server
    }

    /// Tells a [`ForkedServer::prepare`]d server to listen.
    pub(crate) fn go(&self) {
        // SAFETY: writing one byte to our pipe.
        unsafe { libc::write(self.go_tx, [1u8].as_ptr().cast(), 1) };
    }

    /// Forks the server, which waits for [`ForkedServer::go`] before it
    /// listens (so a test can use its pid first).
    pub(crate) fn prepare(port: u16, mode: ServerMode) -> ForkedServer {
        let mut go = [0i32; 2];
        // SAFETY: plain syscall.
        unsafe { assert_eq!(libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC), 0) };
        let mut pipe = [0i32; 2];
        // SAFETY: plain syscalls; after fork the child uses only
        // async-signal-safe calls on data prepared before the fork.
        unsafe {
            assert_eq!(libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC), 0);
            let addr = loopback_sockaddr(port);
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                keep_only_fds(&[go[0], pipe[1]]);
                let (go, pipe) = ([3, -1], [-1, 4]);
                // A name of its own, for the --comm filter's tests.
                libc::prctl(libc::PR_SET_NAME, SERVER_COMM.as_ptr());
                let mut b = [0u8; 1];
                libc::read(go[0], b.as_mut_ptr().cast(), 1);
                let s = listen_or_exit(&addr, libc::SO_REUSEADDR, 8);
                let c = libc::accept(s, std::ptr::null_mut(), std::ptr::null_mut());
                let fd = c as u32;
                libc::write(pipe[1], (&fd as *const u32).cast(), 4);
                let mut buf = [0u8; 64];
                if mode == ServerMode::CloseAfterPeer {
                    while libc::read(c, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
                    libc::close(c);
                    libc::close(s);
                }
                loop {
                    libc::pause();
                }
            }
            libc::close(pipe[1]);
            libc::close(go[0]);
            use std::os::fd::FromRawFd as _;
            ForkedServer {
                pid: pid as u32,
                fd_rx: std::fs::File::from_raw_fd(pipe[0]),
                go_tx: go[1],
            }
        }
    }

    /// Connects to the server, retrying until it listens (deadline).
    pub(crate) fn connect(&self, port: u16) -> TcpStream {
        let start = Instant::now();
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => return s,
                Err(e) if start.elapsed() < DEADLINE => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("the forked server never listened: {e}"),
            }
        }
    }

    /// The fd number of the accepted connection in the server.
    pub(crate) fn accepted_fd(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fd_rx
            .read_exact(&mut b)
            .expect("the server reports its fd");
        u32::from_ne_bytes(b)
    }
}

impl Drop for ForkedServer {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe {
            libc::close(self.go_tx);
            libc::kill(self.pid as i32, libc::SIGKILL);
            libc::waitpid(self.pid as i32, std::ptr::null_mut(), 0);
        }
    }
}

/// A prefork server, as nginx or Apache run: a master (comm
/// [`SERVER_COMM`]) listens on 127.0.0.1:port and forks a worker, which
/// accepts one connection, reads until the client's FIN and closes it.
/// Both hold the listener. Killed and reaped on drop.
pub(crate) struct PreforkServer {
    pub master: u32,
    pub worker: u32,
}

impl PreforkServer {
    /// Starts it and returns once the worker is ready to accept.
    pub(crate) fn start(port: u16) -> PreforkServer {
        let mut pipe = [0i32; 2];
        // SAFETY: plain syscalls; after fork the children use only
        // async-signal-safe calls on data prepared before the fork.
        unsafe {
            assert_eq!(libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC), 0);
            let addr = loopback_sockaddr(port);
            let master = libc::fork();
            assert!(master >= 0, "fork");
            if master == 0 {
                // Only the pipe's write end, as fd 3.
                keep_only_fds(&[pipe[1]]);
                libc::prctl(libc::PR_SET_NAME, SERVER_COMM.as_ptr());
                let s = listen_or_exit(&addr, libc::SO_REUSEADDR, 8);
                let worker = libc::fork();
                if worker == 0 {
                    let pid = libc::getpid() as u32;
                    libc::write(3, (&pid as *const u32).cast(), 4);
                    let c = libc::accept(s, std::ptr::null_mut(), std::ptr::null_mut());
                    let mut buf = [0u8; 64];
                    while libc::read(c, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
                    libc::close(c);
                }
                loop {
                    libc::pause();
                }
            }
            libc::close(pipe[1]);
            use std::os::fd::FromRawFd as _;
            let mut rx = std::fs::File::from_raw_fd(pipe[0]);
            let mut b = [0u8; 4];
            rx.read_exact(&mut b).expect("the worker reports its pid");
            PreforkServer {
                master: master as u32,
                worker: u32::from_ne_bytes(b),
            }
        }
    }
}

impl Drop for PreforkServer {
    fn drop(&mut self) {
        // SAFETY: our child and its child.
        unsafe {
            libc::kill(self.worker as i32, libc::SIGKILL);
            libc::kill(self.master as i32, libc::SIGKILL);
            libc::waitpid(self.master as i32, std::ptr::null_mut(), 0);
        }
    }
}

/// The running kernel's version is at least `major.minor`.
pub(crate) fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// Writes a sysctl of the calling thread's network namespace.
/// (Network sysctls answer for the namespace of the task that opens them.)
pub(crate) fn netns_sysctl(name: &str, value: &str) {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::write(&path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
}

/// The `tracer` binary under test (TRACER_BIN overrides, for the guests).
pub(crate) fn tracer() -> Command {
    let bin =
        std::env::var("TRACER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tracer").to_string());
    let mut cmd = Command::new(bin);
    cmd.env("RUST_BACKTRACE", "1");
    cmd
}

/// A running tracer whose stdout and stderr lines arrive on channels.
pub(crate) struct Running {
    pub child: Child,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
}

impl Running {
    pub(crate) fn start(args: &[&str]) -> Running {
        // Inside a test's own namespace, watch only that namespace: other
        // namespaces' traffic (other tests, benchmarks) may use the same
        // ports.
        let mut args: Vec<String> = args.iter().map(ToString::to_string).collect();
        if let Some(ns) = own_netns() {
            args.extend(["--netns".to_string(), ns.to_string()]);
        }
        let child = tracer()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tracer");
        Running::from_child(child)
    }

    /// A tracer spawned by the caller with piped stdout and stderr.
    pub(crate) fn from_child(mut child: Child) -> Running {
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for the agent to say it is attached (it logs that with -v).
    pub(crate) fn wait_attached(&self) {
        self.wait_attached_saying();
    }

    /// [`Running::wait_attached`], returning what it said before.
    pub(crate) fn wait_attached_saying(&self) -> String {
        let start = Instant::now();
        let mut said = String::new();
        while start.elapsed() < attach_deadline() {
            match self.stderr.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains("attached") => return said,
                Ok(line) => {
                    eprintln!("tracer: {line}");
                    said.push_str(&line);
                    said.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("tracer exited before attaching")
                }
            }
        }
        panic!("tracer did not attach within {:?}", attach_deadline());
    }

    /// Collects stdout lines until `done` holds for them.
    pub(crate) fn read_until(
        &self,
        got: &mut Vec<String>,
        what: &str,
        done: impl Fn(&[String]) -> bool,
    ) {
        self.read_until_within(got, what, DEADLINE, done);
    }

    /// [`Running::read_until`] with a deadline of its own.
    pub(crate) fn read_until_within(
        &self,
        got: &mut Vec<String>,
        what: &str,
        deadline: Duration,
        done: impl Fn(&[String]) -> bool,
    ) {
        let start = Instant::now();
        while !done(got) {
            if start.elapsed() >= deadline {
                self.timed_out(got, what);
            }
            if let Ok(line) = self.stdout.recv_timeout(Duration::from_millis(50)) {
                check_if_record(&line);
                got.push(line);
            }
        }
    }

    /// Fails the test with what the tracer wrote, and what it counted when
    /// stopped (its stats: whether the kernel lost or skipped a transition
    /// or the agent never wrote it), and its log.
    fn timed_out(&self, got: &[String], what: &str) -> ! {
        self.interrupt();
        let mut at_exit = Vec::new();
        let stopping = Instant::now();
        while stopping.elapsed() < Duration::from_secs(5) {
            match self.stdout.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => at_exit.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let log: Vec<String> = self.stderr.try_iter().collect();
        panic!(
            "timed out waiting for {what}; got:\n{}\nthen, stopped with SIGINT:\n{}\nits log:\n{}",
            got.join("\n"),
            at_exit.join("\n"),
            log.join("\n")
        );
    }

    pub(crate) fn interrupt(&self) {
        self.signal(libc::SIGINT);
    }

    pub(crate) fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends SIGUSR1 until the lines that follow satisfy `done`; every
    /// line read is appended to `got`. Returns the lines read since the
    /// last SIGUSR1.
    pub(crate) fn summary_until(
        &self,
        got: &mut Vec<String>,
        what: &str,
        done: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; got:\n{}",
                got.join("\n")
            );
            self.signal(libc::SIGUSR1);
            let mut summary = Vec::new();
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(2) {
                match self.stdout.recv_timeout(Duration::from_millis(50)) {
                    Ok(line) => {
                        check_if_record(&line);
                        got.push(line.clone());
                        summary.push(line);
                        if done(&summary) {
                            return summary;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => panic!("tracer exited"),
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for exit and returns (status code, rest of stdout, stderr).
    pub(crate) fn finish(mut self) -> (i32, Vec<String>, Vec<String>) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(start.elapsed() < DEADLINE, "tracer did not stop");
            thread::sleep(Duration::from_millis(10));
        };
        let out: Vec<String> = self.stdout.iter().inspect(|l| check_if_record(l)).collect();
        let err: Vec<String> = self.stderr.iter().collect();
        (status.code().expect("exited normally"), out, err)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed test must not leave a tracer attached.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A record the tracer printed, parsed and checked against the records'
/// schema (`docs/records.schema.json`): a field the schema and
/// `docs/records.md` do not describe fails the test that reads it.
pub(crate) fn json(line: &str) -> serde_json::Value {
    let v = json_document(line);
    check_schema(&v, line);
    v
}

/// A JSON document that is not one of the tracer's records (a Prometheus
/// API answer): parsed, not checked against the records' schema.
pub(crate) fn json_document(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A line of the tracer's stdout: if it is a JSON record, checked against
/// the schema whether or not the test looks at it.
pub(crate) fn check_if_record(line: &str) {
    if line.starts_with('{') {
        json(line);
    }
}

/// The schema, embedded so that the guests' test binaries carry it.
const RECORDS_SCHEMA: &str = include_str!("../../../docs/records.schema.json");

/// The schema's validators by JSON pointer, compiled once per test binary.
fn records_schema() -> &'static jsonschema::ValidatorMap {
    static SCHEMA: OnceLock<jsonschema::ValidatorMap> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let schema: serde_json::Value =
            serde_json::from_str(RECORDS_SCHEMA).expect("docs/records.schema.json is not JSON");
        jsonschema::options()
            .should_validate_formats(true)
            .build_map(&schema)
            .unwrap_or_else(|e| panic!("docs/records.schema.json is not a valid schema: {e}"))
    })
}

fn check_schema(v: &serde_json::Value, line: &str) {
    let schema = records_schema();
    if schema.get("#").is_some_and(|root| root.is_valid(v)) {
        return;
    }
    // The root's `oneOf` only says no record type matched: ask the type's
    // own definition what is wrong.
    let ty = v["type"].as_str().unwrap_or_default();
    let why: Vec<String> = match schema.get(&format!("#/$defs/{ty}")) {
        Some(d) => d
            .iter_errors(v)
            .map(|e| {
                let at = e.instance_path().to_string();
                format!("{e} at {}", if at.is_empty() { "the record" } else { &at })
            })
            .collect(),
        None => vec![format!("no record type {ty:?} in the schema")],
    };
    panic!(
        "record does not match docs/records.schema.json: {}\n{line}",
        why.join("; ")
    );
}

pub(crate) fn of_type(lines: &[String], ty: &str) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| json(l))
        .filter(|v| v["type"] == ty)
        .collect()
}

/// Makes the child see an empty tmpfs over each of `targets` (then makes
/// the directories in `mkdirs`), in a private mount namespace of its own:
/// a kernel without some of tracefs, for the child alone.
pub(crate) fn hide_with_tmpfs(cmd: &mut Command, targets: &[&str], mkdirs: &[&str]) {
    use std::{ffi::CString, os::unix::process::CommandExt as _};
    let c = |p: &str| CString::new(p).unwrap();
    let targets: Vec<CString> = targets.iter().map(|p| c(p)).collect();
    let mkdirs: Vec<CString> = mkdirs.iter().map(|p| c(p)).collect();
    let (root, tmpfs) = (c("/"), c("tmpfs"));
    // SAFETY: only async-signal-safe syscalls on pre-allocated strings.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: i32| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for t in &targets {
                check(libc::mount(
                    tmpfs.as_ptr(),
                    t.as_ptr(),
                    tmpfs.as_ptr(),
                    0,
                    std::ptr::null(),
                ))?;
            }
            for d in &mkdirs {
                check(libc::mkdir(d.as_ptr(), 0o755))?;
            }
            Ok(())
        });
    }
}

/// Waits until a socket of this thread's namespace listens on `port`.
pub(crate) fn wait_listening(port: u16) {
    let needle = format!(":{port:04X} 00000000:0000 0A");
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        let tcp = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
        if tcp.contains(&needle) {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!("nothing listens on {port}");
}
