//! The load generator: loopback TCP connections in a network namespace of
//! their own, counting the state transitions they must cause.
//!
//! Each worker thread plays both ends of its connections on a listener of
//! its own: connect, accept, 16 bytes each way, then close in the order the
//! mode says. Doing both ends on one thread fixes the close order exactly
//! and makes the load independent of scheduler hand-offs between client
//! and server threads. Everything runs in a fresh network namespace per
//! run (no TIME_WAIT or port state carries over from one run to the next),
//! on ports below the namespace's ephemeral range, so a tracer filtered on
//! the load's ports sees exactly the load.

use std::{
    collections::VecDeque,
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::FromRawFd as _,
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

/// Who closes the connection first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The client closes, then the server (client-side TIME_WAIT).
    ClientFirst,
    /// The server closes, then the client (server-side TIME_WAIT).
    ServerFirst,
    /// The client closes; the server keeps every socket in CLOSE_WAIT
    /// while its file descriptors last (then closes the oldest).
    NeverClose,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::ClientFirst => "client-first",
            Mode::ServerFirst => "server-first",
            Mode::NeverClose => "never-close",
        }
    }

    /// `inet_sock_set_state` events one connection causes while the run
    /// lasts (both sockets; listeners excluded).
    ///
    /// client-first: client CLOSE>SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE,
    /// server LISTEN>SYN_RECV>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE: 5 + 5.
    /// server-first: the same with the roles swapped: 5 + 5.
    /// never-close: the client's 5; the server's socket stops at
    /// CLOSE_WAIT: 3 (plus CLOSE_WAIT>LAST_ACK>CLOSE for each socket the
    /// server closes to make room, counted apart). The client's FIN_WAIT1
    /// -> FIN_WAIT2 waits for the server's delayed ACK: a timer-driven
    /// transition.
    pub fn transitions_per_conn(self) -> u64 {
        match self {
            Mode::ClientFirst | Mode::ServerFirst => 10,
            Mode::NeverClose => 8,
        }
    }

    /// Sockets of one connection that reach CLOSE while the run lasts
    /// (what a tracer with one record per closed socket, tcplife, prints).
    pub fn closed_per_conn(self) -> u64 {
        match self {
            Mode::ClientFirst | Mode::ServerFirst => 2,
            Mode::NeverClose => 1,
        }
    }
}

/// Load ports: below the namespace's ephemeral range (1024-65535), so no
/// client port can be one of them.
pub const LOAD_PORT_BASE: u16 = 700;
/// Ports of the sockets held in CLOSE_WAIT (`--hold`), outside the load's.
pub const HOLD_PORT_BASE: u16 = 500;
/// Sockets one `bench-hold` helper keeps (below RLIMIT_NOFILE's 20,000).
pub const PER_HELPER: u64 = 18_000;
/// At most this many ports can be given to the tracer's `--port` filter.
pub const MAX_FILTER_PORTS: usize = 64;
/// Client addresses for connections whose server socket is kept.
const IPV4_CLIENT_ADDRS: u64 = 65_536;
const IPV6_CLIENT_ADDRS: u64 = 1_024;
/// Descriptors left for everything but the never-close pools.
const FD_RESERVE: u64 = 1_000;

const REQUEST: &[u8; 16] = b"GET / bench 0001";
const REPLY: &[u8; 16] = b"200 OK bench 001";

#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub threads: usize,
    pub mode: Mode,
    pub ipv6: bool,
    /// Connections per second, all threads together; None: unbounded.
    pub rate: Option<f64>,
    /// Sockets held in CLOSE_WAIT on other ports during the run.
    pub hold: u64,
}

impl LoadConfig {
    /// The server ports the load uses (the tracer's `--port` filter), one
    /// per worker.
    pub fn load_ports(&self) -> Vec<u16> {
        (0..self.threads)
            .map(|i| LOAD_PORT_BASE + i as u16)
            .collect()
    }

    pub fn hold_ports(&self) -> Vec<u16> {
        (0..self.hold.div_ceil(PER_HELPER))
            .map(|i| HOLD_PORT_BASE + i as u16)
            .collect()
    }

    /// Server sockets each never-close worker keeps at most.
    pub fn pool_per_worker(&self) -> u64 {
        (nofile_limit().saturating_sub(FD_RESERVE) / self.threads.max(1) as u64).max(1)
    }

    pub fn check(&self) -> Result<()> {
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        if self.threads > MAX_FILTER_PORTS {
            bail!(
                "at most {MAX_FILTER_PORTS} threads: each has a server port of its own, and the tracer's filter takes at most {MAX_FILTER_PORTS} ports"
            );
        }
        if self.hold_ports().len() > (LOAD_PORT_BASE - HOLD_PORT_BASE) as usize {
            bail!("--hold {} needs too many ports", self.hold);
        }
        if let Some(r) = self.rate {
            if r.is_nan() || r <= 0.0 {
                bail!("--rate must be positive");
            }
        }
        Ok(())
    }

    fn addr(&self, port: u16) -> SocketAddr {
        if self.ipv6 {
            SocketAddr::from((Ipv6Addr::LOCALHOST, port))
        } else {
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "threads": self.threads,
            "mode": self.mode.name(),
            "family": if self.ipv6 { "ipv6" } else { "ipv4" },
            "rate": self.rate,
            "hold": self.hold,
            "load_ports": self.load_ports(),
            "hold_ports": self.hold_ports(),
            "transitions_per_connection": self.mode.transitions_per_conn(),
            "closed_sockets_per_connection": self.mode.closed_per_conn(),
            "never_close_pool_per_thread": (self.mode == Mode::NeverClose).then(|| self.pool_per_worker()),
        })
    }
}

/// What one run of the load did.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    pub connections: u64,
    pub elapsed: Duration,
    /// Transitions the connections must have caused (see `Mode`).
    pub expected_transitions: u64,
    /// Sockets that reached CLOSE.
    pub expected_closed: u64,
    /// I/O errors (a run with errors has no exact expected count).
    pub errors: Vec<String>,
    /// Connects that took over 200 ms (a SYN retransmission).
    pub slow_connects: u64,
    pub max_connect: Duration,
    /// Never-close: sockets the server closed to stay within its fds
    /// (each 2 more transitions: CLOSE_WAIT>LAST_ACK>CLOSE).
    pub server_closes: u64,
    /// Sockets kept by the server (never-close) at the end of the load.
    pub held: u64,
}

impl LoadResult {
    pub fn per_second(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.connections as f64 / s
        } else {
            0.0
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "connections": self.connections,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "connections_per_s": self.per_second(),
            "expected_transitions": self.expected_transitions,
            "expected_closed_sockets": self.expected_closed,
            "errors": self.errors,
            "slow_connects": self.slow_connects,
            "max_connect_ms": self.max_connect.as_secs_f64() * 1e3,
            "server_closes": self.server_closes,
            "held_by_server": self.held,
        })
    }
}

/// What the held sockets looked like at teardown: each should read EOF
/// (in CLOSE_WAIT: the peer's FIN arrived, nothing else).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldCheck {
    pub held: u64,
    pub eof: u64,
    pub other: u64,
}

impl HeldCheck {
    fn add(&mut self, o: HeldCheck) {
        self.held += o.held;
        self.eof += o.eof;
        self.other += o.other;
    }

    /// Reads each socket without blocking: EOF is the only right answer.
    fn of<'a>(sockets: impl Iterator<Item = &'a TcpStream>) -> HeldCheck {
        let mut c = HeldCheck::default();
        for s in sockets {
            c.held += 1;
            let _ = s.set_nonblocking(true);
            let mut b = [0u8; 1];
            match (&*s).read(&mut b) {
                Ok(0) => c.eof += 1,
                _ => c.other += 1,
            }
        }
        c
    }

    /// The helper's report line: `held N eof E other O`.
    pub fn parse(line: &str) -> Option<HeldCheck> {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["held", h, "eof", e, "other", o] => Some(HeldCheck {
                held: h.parse().ok()?,
                eof: e.parse().ok()?,
                other: o.parse().ok()?,
            }),
            _ => None,
        }
    }

    pub fn line(&self) -> String {
        format!("held {} eof {} other {}", self.held, self.eof, self.other)
    }
}

enum Cmd {
    Run(Duration),
    Teardown,
}

enum Reply {
    Ready(Result<Ready>),
    Done(LoadResult),
    TornDown(HeldCheck),
}

#[derive(Debug)]
pub struct Ready {
    pub netns_inode: u64,
    pub hold_took: Duration,
    /// The namespace thread's id: /proc/self/task/TID/net/ shows its
    /// namespace.
    pub tid: i32,
}

/// A network namespace with the load's listeners (and held sockets), on a
/// thread of its own; the load threads and hold helpers are started from
/// it and inherit it.
pub struct Env {
    cmd: mpsc::Sender<Cmd>,
    reply: mpsc::Receiver<Reply>,
    thread: Option<thread::JoinHandle<()>>,
    pub ready: Ready,
}

impl Env {
    /// Creates the namespace, the listeners and the held sockets; returns
    /// when the load can start.
    pub fn setup(cfg: &LoadConfig) -> Result<Env> {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        let cfg = cfg.clone();
        let thread = thread::Builder::new()
            .name("bench-netns".into())
            .spawn(move || coordinator(cfg, cmd_rx, reply_tx))
            .context("spawning the load's namespace thread")?;
        let ready = match reply_rx.recv() {
            Ok(Reply::Ready(r)) => r,
            _ => Err(anyhow!("the load's namespace thread died")),
        };
        let mut env = Env {
            cmd: cmd_tx,
            reply: reply_rx,
            thread: Some(thread),
            ready: Ready {
                netns_inode: 0,
                hold_took: Duration::ZERO,
                tid: 0,
            },
        };
        match ready {
            Ok(r) => {
                env.ready = r;
                Ok(env)
            }
            Err(e) => {
                env.teardown();
                Err(e)
            }
        }
    }

    /// Runs the load for `d` and returns what it did.
    pub fn run(&mut self, d: Duration) -> Result<LoadResult> {
        self.cmd
            .send(Cmd::Run(d))
            .map_err(|_| anyhow!("the load's namespace thread died"))?;
        match self.reply.recv() {
            Ok(Reply::Done(r)) => Ok(r),
            _ => Err(anyhow!("the load's namespace thread died")),
        }
    }

    /// Waits (at most `max`) until no socket of the load is in a state it
    /// leaves by itself (SYN_SENT, SYN_RECV, FIN_WAIT1, CLOSING, LAST_ACK):
    /// every transition the load caused has then happened. Never-close
    /// clients wait in FIN_WAIT1 for the server's delayed ACK, sometimes
    /// for longer than 300 ms. Returns how long it waited and how many
    /// sockets were still on their way.
    pub fn settle(&self, ports: &[u16], max: Duration) -> (Duration, u64) {
        let t0 = Instant::now();
        loop {
            let pending: u64 = ["tcp", "tcp6"]
                .iter()
                .map(|f| {
                    let path = format!("/proc/self/task/{}/net/{f}", self.ready.tid);
                    fs::read_to_string(path)
                        .map(|t| pending_sockets(&t, ports))
                        .unwrap_or(0)
                })
                .sum();
            if pending == 0 || t0.elapsed() >= max {
                return (t0.elapsed(), pending);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes every socket (held ones after checking them) and leaves the
    /// namespace to the kernel to free.
    pub fn teardown(&mut self) -> HeldCheck {
        let _ = self.cmd.send(Cmd::Teardown);
        let check = loop {
            match self.reply.recv() {
                Ok(Reply::TornDown(c)) => break c,
                Ok(_) => continue,
                Err(_) => break HeldCheck::default(),
            }
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        check
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.teardown();
        }
    }
}

struct Worker {
    index: usize,
    listener: TcpListener,
    port: u16,
}

struct WorkerResult {
    connections: u64,
    server_closes: u64,
    end: Instant,
    error: Option<String>,
    slow_connects: u64,
    max_connect: Duration,
    held: VecDeque<TcpStream>,
    worker: Option<Worker>,
}

/// A `bench-hold` helper process and the pipes to it.
struct Helper {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

fn coordinator(cfg: LoadConfig, cmds: mpsc::Receiver<Cmd>, reply: mpsc::Sender<Reply>) {
    let mut workers: Vec<Worker> = Vec::new();
    let mut helpers: Vec<Helper> = Vec::new();
    let ready = (|| -> Result<Ready> {
        enter_new_netns()?;
        configure_netns(&cfg)?;
        let netns_inode = fs::metadata("/proc/thread-self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap_or(0);
        for (index, port) in cfg.load_ports().into_iter().enumerate() {
            workers.push(Worker {
                index,
                listener: listen(cfg.addr(port))?,
                port,
            });
        }
        let start = Instant::now();
        if cfg.hold > 0 {
            start_helpers(&cfg, &mut helpers)?;
            // The clients' FIN_WAIT1 -> FIN_WAIT2 waits for delayed ACKs:
            // let them land before anyone starts tracing.
            thread::sleep(Duration::from_millis(300));
        }
        Ok(Ready {
            netns_inode,
            hold_took: start.elapsed(),
            // SAFETY: gettid cannot fail.
            tid: unsafe { libc::gettid() },
        })
    })();
    let ok = ready.is_ok();
    if reply.send(Reply::Ready(ready)).is_err() || !ok {
        let _ = cmds.recv();
        let check = stop_helpers(helpers);
        let _ = reply.send(Reply::TornDown(check));
        return;
    }
    let mut pools: Vec<VecDeque<TcpStream>> = Vec::new();
    while let Ok(cmd) = cmds.recv() {
        match cmd {
            Cmd::Run(d) => {
                let start = Instant::now();
                let deadline = start + d;
                let per_worker_interval = cfg
                    .rate
                    .map(|r| Duration::from_secs_f64(cfg.threads as f64 / r));
                let handles: Vec<_> = workers
                    .drain(..)
                    .map(|w| {
                        let cfg = cfg.clone();
                        thread::Builder::new()
                            .name(format!("bench-load-{}", w.index))
                            .spawn(move || work(&cfg, w, start, deadline, per_worker_interval))
                    })
                    .collect();
                let mut result = LoadResult::default();
                let mut end = start;
                for h in handles {
                    let r = match h {
                        Ok(h) => h.join().map_err(|_| "a load thread panicked".to_string()),
                        Err(e) => Err(format!("spawning a load thread: {e}")),
                    };
                    match r {
                        Ok(r) => {
                            result.connections += r.connections;
                            result.server_closes += r.server_closes;
                            result.slow_connects += r.slow_connects;
                            result.max_connect = result.max_connect.max(r.max_connect);
                            result.errors.extend(r.error);
                            end = end.max(r.end);
                            result.held += r.held.len() as u64;
                            pools.push(r.held);
                            workers.extend(r.worker);
                        }
                        Err(e) => result.errors.push(e),
                    }
                }
                result.elapsed = end - start;
                result.expected_transitions =
                    result.connections * cfg.mode.transitions_per_conn() + result.server_closes * 2;
                result.expected_closed =
                    result.connections * cfg.mode.closed_per_conn() + result.server_closes;
                let _ = reply.send(Reply::Done(result));
            }
            Cmd::Teardown => break,
        }
    }
    let mut check = HeldCheck::of(pools.iter().flatten());
    drop(pools);
    drop(workers);
    check.add(stop_helpers(helpers));
    let _ = reply.send(Reply::TornDown(check));
}

fn work(
    cfg: &LoadConfig,
    w: Worker,
    start: Instant,
    deadline: Instant,
    interval: Option<Duration>,
) -> WorkerResult {
    let mut r = WorkerResult {
        connections: 0,
        server_closes: 0,
        end: start,
        error: None,
        slow_connects: 0,
        max_connect: Duration::ZERO,
        held: VecDeque::new(),
        worker: None,
    };
    let mut next = start;
    let addr = cfg.addr(w.port);
    let pool = cfg.pool_per_worker();
    // Never-close clients: addresses of their own per worker.
    let first_addr = w.index as u64 * 7919;
    let mut buf = [0u8; 16];
    let outcome = (|| -> io::Result<()> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            if let Some(iv) = interval {
                if next > now {
                    thread::sleep(next - now);
                }
                next += iv;
            }
            let t0 = Instant::now();
            let mut client = match cfg.mode {
                Mode::NeverClose => {
                    let src = client_addr(cfg.ipv6, first_addr + r.connections);
                    connect_from(src, addr)
                }
                _ => TcpStream::connect(addr),
            }
            .map_err(|e| with_what(e, &format!("connect to {addr}")))?;
            let took = t0.elapsed();
            if took > Duration::from_millis(200) {
                r.slow_connects += 1;
            }
            r.max_connect = r.max_connect.max(took);
            let (mut server, _) = w.listener.accept().map_err(|e| with_what(e, "accept"))?;
            client.write_all(REQUEST)?;
            server.read_exact(&mut buf)?;
            server.write_all(REPLY)?;
            client.read_exact(&mut buf)?;
            match cfg.mode {
                Mode::ClientFirst => {
                    drop(client);
                    expect_eof(&mut server, "server")?;
                    drop(server);
                }
                Mode::ServerFirst => {
                    drop(server);
                    expect_eof(&mut client, "client")?;
                    drop(client);
                }
                Mode::NeverClose => {
                    drop(client);
                    if r.held.len() as u64 >= pool {
                        drop(r.held.pop_front());
                        r.server_closes += 1;
                    }
                    r.held.push_back(server);
                }
            }
            r.connections += 1;
        }
    })();
    r.end = Instant::now();
    if let Err(e) = outcome {
        r.error = Some(format!("after {} connections: {e}", r.connections));
    }
    r.worker = Some(w);
    r
}

fn with_what(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn expect_eof(s: &mut TcpStream, who: &str) -> io::Result<()> {
    let mut b = [0u8; 16];
    match s.read(&mut b)? {
        0 => Ok(()),
        n => Err(io::Error::other(format!(
            "{who} read {n} bytes where it expected the peer's FIN"
        ))),
    }
}

/// Sockets of `/proc/net/tcp{,6}` text on one of `ports` (local or
/// remote) in a state they leave without the application: SYN_SENT (02),
/// SYN_RECV (03), FIN_WAIT1 (04), LAST_ACK (09), CLOSING (0B).
pub fn pending_sockets(text: &str, ports: &[u16]) -> u64 {
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().take(4).collect();
            if f.len() < 4 {
                return false;
            }
            let ours = [f[1], f[2]]
                .iter()
                .any(|a| port(a).is_some_and(|p| ports.contains(&p)));
            ours && matches!(f[3], "02" | "03" | "04" | "09" | "0B")
        })
        .count() as u64
}

/// The `i`th client address of connections whose server socket is kept.
pub fn client_addr(ipv6: bool, i: u64) -> IpAddr {
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
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6);
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
}

/// connect() from a given source address; the port is picked at connect
/// time (IP_BIND_ADDRESS_NO_PORT), as for an unbound socket.
pub fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
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
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
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

/// Starts the `bench-hold` helpers (from this thread: they inherit its
/// namespace) and waits until each holds its sockets.
fn start_helpers(cfg: &LoadConfig, helpers: &mut Vec<Helper>) -> Result<()> {
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let mut left = cfg.hold;
    for (i, port) in cfg.hold_ports().into_iter().enumerate() {
        let n = left.min(PER_HELPER);
        left -= n;
        let mut cmd = Command::new(&exe);
        cmd.args(["bench-hold", "--port", &port.to_string()])
            .args(["--count", &n.to_string()])
            .args(["--first-addr", &(i as u64 * PER_HELPER).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if cfg.ipv6 {
            cmd.arg("--ipv6");
        }
        let mut child = cmd.spawn().context("starting a bench-hold helper")?;
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        helpers.push(Helper { child, stdout });
    }
    for h in helpers.iter_mut() {
        let mut line = String::new();
        h.stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!(
                "a bench-hold helper failed to hold its sockets ({})",
                h.child
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string())
            );
        }
    }
    Ok(())
}

/// Tells the helpers to check and close their sockets; sums their checks.
fn stop_helpers(helpers: Vec<Helper>) -> HeldCheck {
    let mut total = HeldCheck::default();
    let mut helpers = helpers;
    for h in helpers.iter_mut() {
        drop(h.child.stdin.take());
    }
    for mut h in helpers {
        let mut line = String::new();
        let _ = h.stdout.read_line(&mut line);
        match HeldCheck::parse(&line) {
            Some(c) => total.add(c),
            None => total.other += 1,
        }
        let _ = h.child.wait();
    }
    total
}

/// `xtask bench-hold`: in the caller's namespace, open `count` connections
/// to a listener of its own on `port`, close the client ends and keep the
/// server ends (CLOSE_WAIT); print `ready`, wait for stdin to close, then
/// check the sockets, print the check and exit.
pub fn hold_helper(port: u16, count: u64, first_addr: u64, ipv6: bool) -> Result<()> {
    let cfg = LoadConfig {
        threads: 1,
        mode: Mode::NeverClose,
        ipv6,
        rate: None,
        hold: 0,
    };
    let dst = cfg.addr(port);
    let listener = listen(dst)?;
    let mut held = Vec::with_capacity(count as usize);
    for i in 0..count {
        let client = connect_from(client_addr(ipv6, first_addr + i), dst)
            .with_context(|| format!("connect to {dst} after {i} held"))?;
        let (server, _) = listener.accept().context("accept")?;
        drop(client);
        held.push(server);
    }
    println!("ready");
    io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = io::stdin().read_to_end(&mut sink);
    println!("{}", HeldCheck::of(held.iter()).line());
    Ok(())
}

fn listen(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))
}

/// Moves this thread into a new network namespace with `lo` up.
fn enter_new_netns() -> Result<()> {
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
fn configure_netns(cfg: &LoadConfig) -> Result<()> {
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

/// This process's soft limit on open files.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threads: usize, mode: Mode, hold: u64) -> LoadConfig {
        LoadConfig {
            threads,
            mode,
            ipv6: false,
            rate: None,
            hold,
        }
    }

    #[test]
    fn ports_do_not_overlap_and_fit_the_filter() {
        let c = cfg(2, Mode::ClientFirst, 100_000);
        assert_eq!(c.load_ports(), vec![700, 701]);
        assert_eq!(c.hold_ports(), vec![500, 501, 502, 503, 504, 505]);
        c.check().unwrap();
        assert!(cfg(65, Mode::NeverClose, 0).check().is_err());
        assert!(cfg(0, Mode::ClientFirst, 0).check().is_err());
    }

    #[test]
    fn expected_counts_per_mode() {
        assert_eq!(Mode::ClientFirst.transitions_per_conn(), 10);
        assert_eq!(Mode::ServerFirst.transitions_per_conn(), 10);
        assert_eq!(Mode::NeverClose.transitions_per_conn(), 8);
        assert_eq!(Mode::NeverClose.closed_per_conn(), 1);
    }

    #[test]
    fn client_addresses_cycle_within_their_prefix() {
        assert_eq!(client_addr(false, 0).to_string(), "127.1.0.0");
        assert_eq!(client_addr(false, 258).to_string(), "127.1.1.2");
        assert_eq!(client_addr(false, 65_536), client_addr(false, 0));
        assert_eq!(client_addr(true, 0).to_string(), "fd00:b::1");
        assert_eq!(client_addr(true, 1_023).to_string(), "fd00:b::400");
        assert_eq!(client_addr(true, 1_024), client_addr(true, 0));
    }

    #[test]
    fn pending_sockets_in_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:02BC 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: 0000017F:9C40 0100007F:02BC 04 00000000:00000000 00:00000000 00000000     0        0 0 1\n\
   2: 0100007F:02BC 0000017F:9C40 08 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   3: 0100007F:02BD 0000017F:9C41 09 00000000:00000000 00:00000000 00000000     0        0 3 1\n\
   4: 0100007F:01F4 0000017F:9C42 04 00000000:00000000 00:00000000 00000000     0        0 4 1\n";
        // 0x2BC = 700, 0x2BD = 701; 0x1F4 = 500 is a hold port.
        assert_eq!(pending_sockets(text, &[700, 701]), 2);
        assert_eq!(pending_sockets(text, &[700]), 1);
        let v6 = "  sl  local_address remote_address st\n\
   0: 00000000000000000000000001000000:02BC 000000000000000000000000B0000DFD:A000 03 x\n";
        assert_eq!(pending_sockets(v6, &[700]), 1);
    }

    #[test]
    fn helper_check_lines() {
        let c = HeldCheck {
            held: 3,
            eof: 2,
            other: 1,
        };
        assert_eq!(HeldCheck::parse(&c.line()), Some(c));
        assert_eq!(HeldCheck::parse("ready"), None);
    }
}
