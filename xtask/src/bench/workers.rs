//! The load threads: each plays both ends of its connections.
//!
//! In: the `LoadConfig`, a `Worker` (its listener and port), the start,
//! the deadline and the pace. Out: a `WorkerResult` (connections made,
//! sockets the server closed or kept, slow connects, the first error) and
//! the `Worker` back for the next run.

use std::{
    collections::VecDeque,
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use super::{
    load::{LoadConfig, Mode},
    sockets::{client_addr, connect_from, with_what},
};

const REQUEST: &[u8; 16] = b"GET / bench 0001";
const REPLY: &[u8; 16] = b"200 OK bench 001";

pub(super) struct Worker {
    pub(super) index: usize,
    pub(super) listener: TcpListener,
    pub(super) port: u16,
}

pub(super) struct WorkerResult {
    pub(super) connections: u64,
    pub(super) server_closes: u64,
    pub(super) end: Instant,
    pub(super) error: Option<String>,
    pub(super) slow_connects: u64,
    pub(super) max_connect: Duration,
    pub(super) held: VecDeque<TcpStream>,
    pub(super) worker: Option<Worker>,
}

pub(super) fn work(
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

fn expect_eof(s: &mut TcpStream, who: &str) -> io::Result<()> {
    let mut b = [0u8; 16];
    match s.read(&mut b)? {
        0 => Ok(()),
        n => Err(io::Error::other(format!(
            "{who} read {n} bytes where it expected the peer's FIN"
        ))),
    }
}
