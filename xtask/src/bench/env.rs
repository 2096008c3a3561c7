//! The load's network namespace, on a thread of its own (`Env`).
//!
//! In: a `LoadConfig`. `Env::setup` makes the namespace (`netns.rs`), the
//! churn workers' listeners or the nginx server (`nginx.rs`), and the held
//! sockets (`hold.rs`); `Env::run` starts the load from that thread, so it
//! inherits the namespace: the churn threads (`workers.rs`), whose counts
//! it sums into a `LoadResult`, or wrk (`wrk.rs`, which counts from the
//! namespace's TCP counters and settles by itself); `Env::settle` waits
//! for the load's last transitions; `Env::teardown` checks the held
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
    load::{LoadConfig, LoadKind, LoadResult},
    netns::{configure_netns, enter_new_netns},
    nginx::Nginx,
    sockets::listen,
    workers::{work, Worker},
    wrk,
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
pub(crate) struct Ready {
    pub netns_inode: u64,
    pub hold_took: Duration,
    /// The namespace thread's id: /proc/self/task/TID/net/ shows its
    /// namespace.
    pub tid: i32,
}

/// A network namespace with the load's listeners (and held sockets), on a
/// thread of its own; the load threads and hold helpers are started from
/// it and inherit it.
pub(crate) struct Env {
    cmd: mpsc::Sender<Cmd>,
    reply: mpsc::Receiver<Reply>,
    thread: Option<thread::JoinHandle<()>>,
    pub ready: Ready,
}

impl Env {
    /// Creates the namespace, the listeners and the held sockets; returns
    /// when the load can start.
    pub(crate) fn setup(cfg: &LoadConfig) -> Result<Env> {
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
    pub(crate) fn run(&mut self, d: Duration) -> Result<LoadResult> {
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
    pub(crate) fn settle(&self, ports: &[u16], max: Duration) -> (Duration, u64) {
        let net = format!("/proc/self/task/{}/net", self.ready.tid);
        settle_in(&net, ports, HALF_WAY, max)
    }

    /// Closes every socket (held ones after checking them) and leaves the
    /// namespace to the kernel to free.
    pub(crate) fn teardown(&mut self) -> HeldCheck {
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
    let mut server: Option<Nginx> = None;
    let mut helpers: Vec<Helper> = Vec::new();
    let ready = (|| -> Result<Ready> {
        enter_new_netns()?;
        configure_netns(&cfg)?;
        let netns_inode = fs::metadata("/proc/thread-self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap_or(0);
        match cfg.kind {
            LoadKind::Churn => {
                for (index, port) in cfg.load_ports().into_iter().enumerate() {
                    workers.push(Worker {
                        index,
                        listener: listen(cfg.addr(port))?,
                        port,
                    });
                }
            }
            LoadKind::Nginx => server = Some(Nginx::start(&cfg)?),
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
        if let Some(s) = server.take() {
            s.stop();
        }
        let check = stop_helpers(helpers);
        let _ = reply.send(Reply::TornDown(check));
        return;
    }
    let mut pools: Vec<VecDeque<TcpStream>> = Vec::new();
    while let Ok(cmd) = cmds.recv() {
        match cmd {
            Cmd::Run(d) => {
                let result = match &server {
                    Some(nginx) => wrk::run(&cfg, nginx, d),
                    None => run_churn(&cfg, &mut workers, &mut pools, d),
                };
                let _ = reply.send(Reply::Done(result));
            }
            Cmd::Teardown => break,
        }
    }
    let mut check = HeldCheck::of(pools.iter().flatten());
    drop(pools);
    drop(workers);
    if let Some(s) = server.take() {
        s.stop();
    }
    check.add(stop_helpers(helpers));
    let _ = reply.send(Reply::TornDown(check));
}

/// One run of the churn load: the workers' threads until `d` is over,
/// summed; the workers come back for the next run, never-close pools are
/// kept until the teardown.
fn run_churn(
    cfg: &LoadConfig,
    workers: &mut Vec<Worker>,
    pools: &mut Vec<VecDeque<TcpStream>>,
    d: Duration,
) -> LoadResult {
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
    result.expected_closed = result.connections * cfg.mode.closed_per_conn() + result.server_closes;
    result
}

/// States (`/proc/net/tcp` codes) a socket leaves without the
/// application: SYN_SENT (02), SYN_RECV (03), FIN_WAIT1 (04), LAST_ACK
/// (09), CLOSING (0B). (FIN_WAIT2, 05, is left out: the kernel's timewait
/// sockets show that substate too.)
pub(crate) const HALF_WAY: &[&str] = &["02", "03", "04", "09", "0B"];

/// Waits (at most `max`) until no socket of `ports` is in one of `states`
/// in the namespace whose `/proc/.../net` directory is `net`; how long it
/// waited and how many were left.
pub(crate) fn settle_in(
    net: &str,
    ports: &[u16],
    states: &[&str],
    max: Duration,
) -> (Duration, u64) {
    let t0 = Instant::now();
    loop {
        let left: u64 = ["tcp", "tcp6"]
            .iter()
            .map(|f| {
                fs::read_to_string(format!("{net}/{f}"))
                    .map(|t| sockets_in(&t, ports, states))
                    .unwrap_or(0)
            })
            .sum();
        if left == 0 || t0.elapsed() >= max {
            return (t0.elapsed(), left);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sockets of `/proc/net/tcp{,6}` text on one of `ports` (local or
/// remote) in one of `states` (hex codes as printed there).
pub(crate) fn sockets_in(text: &str, ports: &[u16], states: &[&str]) -> u64 {
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
            ours && states.contains(&f[3])
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
        assert_eq!(sockets_in(text, &[700, 701], HALF_WAY), 2);
        assert_eq!(sockets_in(text, &[700], HALF_WAY), 1);
        let v6 = "  sl  local_address remote_address st\n\
   0: 00000000000000000000000001000000:02BC 000000000000000000000000B0000DFD:A000 03 x\n";
        assert_eq!(sockets_in(v6, &[700], HALF_WAY), 1);
        assert_eq!(sockets_in(text, &[700], &["08", "0A"]), 2);
    }
}
