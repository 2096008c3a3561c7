//! The load's network namespace, on a thread of its own (`Env`).
//!
//! In: a `LoadConfig`. `Env::setup` makes the namespace (`netns.rs`), the
//! workers' listeners and the held sockets (`hold.rs`); `Env::run` starts
//! the load threads (`workers.rs`) from that thread, so they inherit its
//! namespace, and sums what they did into a `LoadResult`; `Env::settle`
//! waits for the load's last transitions; `Env::teardown` checks the held
//! sockets (`HeldCheck`) and closes everything.

use std::{
    collections::VecDeque,
    fs,
    net::TcpStream,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use super::{
    hold::{start_helpers, stop_helpers, HeldCheck, Helper},
    load::{LoadConfig, LoadResult},
    netns::{configure_netns, enter_new_netns},
    sockets::listen,
    workers::{work, Worker},
};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
