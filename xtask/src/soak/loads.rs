//! The soak's traffic, all at once, each kind on a port of its own (all
//! below the namespaces' ephemeral ranges, so the tracer's `--port`
//! filter sees exactly the soak):
//!
//! - in one long-lived network namespace (`main_namespace`, made by a
//!   thread that `unshare`s; the load threads and the `bench-hold`
//!   helpers are started from it and inherit it): client-first churn at a
//!   fixed rate (`CHURN_PORT_BASE`, a port per thread), aborts with
//!   `SO_LINGER` 0 closes (`ABORT_PORT`), a listener restarted
//!   periodically (`RESTART_PORT`: each restart closes it with a
//!   connection in its accept queue, which is reset, then a connect is
//!   refused, then it listens again), and sockets held in CLOSE_WAIT
//!   (`HOLD_PORT_BASE`), released at the end;
//! - short-lived namespaces (`namespace_cycle`), made at a fixed rate by
//!   threads of their own: a listener (`NETNS_PORT`) and a few
//!   connections (client-first, server-first, aborts: some leave a
//!   timewait socket), then the namespace lives on for a while and is
//!   left to the kernel to delete, its timewait sockets still there.
//!
//! Every thread adds what it did to the shared `Tally` as it goes, and
//! waits for its namespace to settle (no socket half-way through a
//! handshake) before it lets the namespace go, so the tally is exact when
//! the loads are over. A failure stops every load; the soak then fails
//! with the first error.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{
    conn::{self, Close},
    tally::Tally,
    Plan,
};
use crate::bench::{
    env::{settle_in, sockets_in, HALF_WAY},
    hold::{self, HeldCheck},
    load::{LoadConfig, LoadKind, Mode, PER_HELPER},
    netns::{configure_netns, enter_new_netns},
    sockets::listen,
};

/// Churn threads' ports: `CHURN_PORT_BASE + i`.
pub(super) const CHURN_PORT_BASE: u16 = 600;
pub(super) const MAX_CHURN_THREADS: usize = 8;
pub(super) const ABORT_PORT: u16 = 610;
pub(super) const RESTART_PORT: u16 = 620;
/// Held sockets' ports: a port per `bench-hold` helper.
pub(super) const HOLD_PORT_BASE: u16 = 630;
pub(super) const MAX_HOLD_HELPERS: u64 = 8;
pub(super) const NETNS_PORT: u16 = 640;
/// Short-lived namespaces alive at once, at most (more are not made).
const MAX_LIVE_NAMESPACES: u64 = 64;
/// How long a namespace may take to settle before the soak gives up.
const SETTLE_MAX: Duration = Duration::from_secs(10);
/// A pace further behind than this starts again from now (no burst to
/// catch up after the machine stalled).
const MAX_BEHIND: Duration = Duration::from_secs(1);

/// The ports of every soak load (the tracer's `--port` filter).
pub(super) fn ports(plan: &Plan) -> Vec<u16> {
    let mut v: Vec<u16> = (0..plan.threads as u16)
        .map(|i| CHURN_PORT_BASE + i)
        .collect();
    v.extend([ABORT_PORT, RESTART_PORT, NETNS_PORT]);
    v.extend(hold_ports(plan.hold));
    v
}

/// The main namespace's ports (what its settle waits for).
fn main_ports(plan: &Plan) -> Vec<u16> {
    ports(plan)
        .into_iter()
        .filter(|&p| p != NETNS_PORT)
        .collect()
}

pub(super) fn hold_ports(hold: u64) -> Vec<u16> {
    (0..hold.div_ceil(PER_HELPER))
        .map(|i| HOLD_PORT_BASE + i as u16)
        .collect()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// What every load thread shares.
#[derive(Default)]
pub(super) struct Shared {
    pub tally: Mutex<Tally>,
    pub errors: Mutex<Vec<String>>,
    /// Inodes of the namespaces the soak made.
    pub namespaces: Mutex<Vec<u64>>,
    pub live_namespaces: AtomicU64,
    /// Namespaces not made because `MAX_LIVE_NAMESPACES` were alive.
    pub namespaces_skipped: AtomicU64,
    /// Set on the first error: every load stops.
    pub stop: AtomicBool,
}

impl Shared {
    fn add(&self, f: impl FnOnce(&mut Tally)) {
        f(&mut self.tally.lock().expect("tally lock"));
    }

    pub(super) fn fail(&self, what: &str, e: impl std::fmt::Display) {
        self.errors
            .lock()
            .expect("errors lock")
            .push(format!("{what}: {e:#}"));
        self.stop.store(true, Ordering::SeqCst);
    }

    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(super) fn tally(&self) -> Tally {
        *self.tally.lock().expect("tally lock")
    }

    pub(super) fn first_error(&self) -> Option<String> {
        self.errors.lock().expect("errors lock").first().cloned()
    }
}

/// A fixed pace: `tick` sleeps until the next slot and says whether to go
/// on (false at the deadline or when the soak stops).
struct Pace {
    next: Instant,
    interval: Duration,
    deadline: Instant,
}

impl Pace {
    fn new(per_s: f64, deadline: Instant) -> Pace {
        Pace {
            next: Instant::now(),
            interval: Duration::from_secs_f64(1.0 / per_s),
            deadline,
        }
    }

    fn tick(&mut self, shared: &Shared) -> bool {
        let now = Instant::now();
        if now >= self.deadline || shared.stopped() {
            return false;
        }
        if self.next > now {
            thread::sleep((self.next - now).min(self.deadline - now));
            if Instant::now() >= self.deadline || shared.stopped() {
                return false;
            }
        } else if now - self.next > MAX_BEHIND {
            self.next = now;
        }
        self.next += self.interval;
        true
    }
}

/// Sleeps `d`, or less if the soak stops.
fn sleep_unless_stopped(d: Duration, shared: &Shared) {
    let end = Instant::now() + d;
    while !shared.stopped() {
        let now = Instant::now();
        if now >= end {
            return;
        }
        thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

/// This thread's namespace: its inode, and /proc's view of its TCP
/// sockets.
fn this_namespace() -> (u64, String) {
    let inode = fs::metadata("/proc/thread-self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    // SAFETY: gettid cannot fail.
    let tid = unsafe { libc::gettid() };
    (inode, format!("/proc/self/task/{tid}/net"))
}

fn settle(net: &str, ports: &[u16], what: &str) -> Result<Duration> {
    let (took, left) = settle_in(net, ports, HALF_WAY, SETTLE_MAX);
    if left > 0 {
        bail!("{what}: {left} sockets still half-way through a handshake after {SETTLE_MAX:?}");
    }
    Ok(took)
}

fn listen_counted(port: u16, shared: &Shared) -> Result<TcpListener> {
    let l = listen(addr(port))?;
    shared.add(|t| t.listens += 1);
    Ok(l)
}

fn close_counted(l: TcpListener, shared: &Shared) {
    drop(l);
    shared.add(|t| t.listener_closes += 1);
}

/// What the main namespace's thread says once its loads run.
pub(super) struct Started {
    pub inode: u64,
    pub hold_took: Duration,
    /// When the loads started (the time base of the samples).
    pub at: Instant,
    pub deadline: Instant,
}

/// What it says at the end.
#[derive(Debug, Default)]
pub(super) struct MainDone {
    pub held: HeldCheck,
    pub settle: Duration,
}

/// Starts the main namespace's thread; returns once its loads run (the
/// held sockets are held first).
pub(super) fn main_namespace(
    plan: &Plan,
    shared: Arc<Shared>,
) -> Result<(Started, thread::JoinHandle<Result<MainDone>>)> {
    let (tx, rx) = mpsc::channel();
    let plan = plan.clone();
    let handle = thread::Builder::new()
        .name("soak-main".into())
        .spawn(move || main_thread(&plan, &shared, tx))
        .context("spawning the main namespace's thread")?;
    match rx.recv() {
        Ok(s) => Ok((s, handle)),
        Err(_) => match handle.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(anyhow!("the main namespace's thread died")),
        },
    }
}

fn main_thread(
    plan: &Plan,
    shared: &Arc<Shared>,
    started: mpsc::Sender<Started>,
) -> Result<MainDone> {
    enter_new_netns()?;
    configure_netns(&LoadConfig {
        kind: LoadKind::Churn,
        threads: plan.threads,
        connections: 0,
        mode: Mode::ClientFirst,
        ipv6: false,
        rate: None,
        hold: plan.hold,
    })?;
    let (inode, net) = this_namespace();
    shared.namespaces.lock().expect("lock").push(inode);
    shared.add(|t| t.namespaces += 1);

    let t0 = Instant::now();
    let mut helpers = Vec::new();
    let mut left = plan.hold;
    let held = (|| -> Result<()> {
        for (i, port) in hold_ports(plan.hold).into_iter().enumerate() {
            let n = left.min(PER_HELPER);
            left -= n;
            helpers.push(hold::spawn_helper(port, n, i as u64 * PER_HELPER, false)?);
        }
        hold::wait_ready(&mut helpers)
    })();
    let release = |helpers| {
        // A held socket whose client ended with a reset (an orphaned
        // client that stayed a full FIN_WAIT2 socket, the kernel's "bad
        // case", sends one when its 60 s timer runs out) went CLOSE_WAIT
        // -> CLOSE already: only those still in CLOSE_WAIT close now.
        let still = still_close_wait(&net, plan.hold);
        let check = hold::stop_helpers(helpers);
        // Each helper's sockets and listener close when it exits.
        shared.add(|t| {
            t.held_released += still.min(check.held);
            t.held_reset += check.held.saturating_sub(still);
            t.listener_closes += check_helpers(plan.hold);
        });
        check
    };
    if let Err(e) = held {
        release(helpers);
        return Err(e.context("holding sockets in CLOSE_WAIT"));
    }
    shared.add(|t| {
        t.held += plan.hold;
        t.listens += check_helpers(plan.hold);
    });
    let hold_took = t0.elapsed();
    // The held clients' FIN_WAIT1 -> FIN_WAIT2 waits for delayed ACKs.
    thread::sleep(Duration::from_millis(300));

    let at = Instant::now();
    let deadline = at + plan.duration;
    let mut threads = Vec::new();
    let spawn = |name: String, f: Box<dyn FnOnce() -> Result<()> + Send>| {
        let sh = Arc::clone(shared);
        let what = name.clone();
        thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Err(e) = f() {
                    sh.fail(&what, e);
                }
            })
            .with_context(|| format!("spawning {name}"))
    };
    let per_thread = plan.rate / plan.threads as f64;
    let result = (|| -> Result<()> {
        for i in 0..plan.threads {
            let sh = Arc::clone(shared);
            threads.push(spawn(
                format!("soak-churn-{i}"),
                Box::new(move || churn(CHURN_PORT_BASE + i as u16, per_thread, deadline, &sh)),
            )?);
        }
        if plan.abort_rate > 0.0 {
            let sh = Arc::clone(shared);
            let rate = plan.abort_rate;
            threads.push(spawn(
                "soak-aborts".into(),
                Box::new(move || aborts(rate, deadline, &sh)),
            )?);
        }
        if plan.restart_rate > 0.0 {
            let sh = Arc::clone(shared);
            let (rate, every) = (plan.restart_rate, plan.restart_every);
            threads.push(spawn(
                "soak-restart".into(),
                Box::new(move || restarts(rate, every, deadline, &sh)),
            )?);
        }
        Ok(())
    })();
    if let Err(e) = &result {
        shared.fail("soak-main", e);
    }
    let _ = started.send(Started {
        inode,
        hold_took,
        at,
        deadline,
    });
    for t in threads {
        let _ = t.join();
    }
    let ports = main_ports(plan);
    let mut settled = settle(&net, &ports, "the main namespace after the loads");
    let check = release(helpers);
    if settled.is_ok() {
        settled = settle(
            &net,
            &ports,
            "the main namespace after releasing the held sockets",
        );
    }
    let settle = settled?;
    if check.other > 0 || check.held != plan.hold {
        bail!(
            "of {} sockets meant to be held in CLOSE_WAIT, {} were held, {} were not in CLOSE_WAIT at the end",
            plan.hold,
            check.held,
            check.other
        );
    }
    Ok(MainDone {
        held: check,
        settle,
    })
}

/// Held server sockets still in CLOSE_WAIT (`/proc/.../net/tcp` state 08
/// on a hold port) in the namespace whose /proc view is `net`.
fn still_close_wait(net: &str, hold: u64) -> u64 {
    let text = fs::read_to_string(format!("{net}/tcp")).unwrap_or_default();
    sockets_in(&text, &hold_ports(hold), &["08"])
}

/// `bench-hold` helpers for `hold` sockets (a listener each).
fn check_helpers(hold: u64) -> u64 {
    hold.div_ceil(PER_HELPER)
}

/// Client-first connections at `per_s` until the deadline.
fn churn(port: u16, per_s: f64, deadline: Instant, shared: &Shared) -> Result<()> {
    let listener = listen_counted(port, shared)?;
    let mut pace = Pace::new(per_s, deadline);
    let mut result = Ok(());
    while pace.tick(shared) {
        if let Err(e) = conn::connection(&listener, addr(port), Close::ClientFirst) {
            result = Err(e.into());
            break;
        }
        shared.add(|t| t.client_first += 1);
    }
    close_counted(listener, shared);
    result
}

/// Connections closed with `SO_LINGER` 0, by the client and the server in
/// turn.
fn aborts(per_s: f64, deadline: Instant, shared: &Shared) -> Result<()> {
    let listener = listen_counted(ABORT_PORT, shared)?;
    let mut pace = Pace::new(per_s, deadline);
    let mut result = Ok(());
    let mut i = 0u64;
    while pace.tick(shared) {
        let close = if i.is_multiple_of(2) {
            Close::ClientAbort
        } else {
            Close::ServerAbort
        };
        if let Err(e) = conn::connection(&listener, addr(ABORT_PORT), close) {
            result = Err(e.into());
            break;
        }
        shared.add(|t| t.aborts += 1);
        i += 1;
    }
    close_counted(listener, shared);
    result
}

/// Client-first connections at `per_s` to a listener that is closed and
/// opened again every `every`: each time with one connection waiting in
/// its accept queue (reset by the close), and one connect refused while
/// it is closed.
fn restarts(per_s: f64, every: Duration, deadline: Instant, shared: &Shared) -> Result<()> {
    let a = addr(RESTART_PORT);
    let mut listener = Some(listen_counted(RESTART_PORT, shared)?);
    let mut pace = Pace::new(per_s, deadline);
    let mut next_restart = Instant::now() + every;
    let result = (|| -> Result<()> {
        while pace.tick(shared) {
            let l = listener.as_ref().expect("listening between restarts");
            conn::connection(l, a, Close::ClientFirst)?;
            shared.add(|t| t.client_first += 1);
            if Instant::now() < next_restart {
                continue;
            }
            next_restart += every;
            let mut queued = std::net::TcpStream::connect(a)?;
            conn::wait_acceptable(l, Duration::from_secs(2))?;
            close_counted(listener.take().expect("listening"), shared);
            conn::expect_reset(&mut queued, "a client queued at the listener's close")?;
            drop(queued);
            shared.add(|t| t.queued_resets += 1);
            conn::refused(a)?;
            shared.add(|t| t.refused += 1);
            listener = Some(listen_counted(RESTART_PORT, shared)?);
        }
        Ok(())
    })();
    if let Some(l) = listener {
        close_counted(l, shared);
    }
    result
}

/// Makes namespaces at `plan.netns_rate` until the deadline (from this
/// thread, in the caller's namespace: each is made by a thread of its
/// own); returns when the last is let go.
pub(super) fn namespace_cycle(
    plan: &Plan,
    deadline: Instant,
    shared: Arc<Shared>,
) -> thread::JoinHandle<()> {
    let plan = plan.clone();
    thread::Builder::new()
        .name("soak-netns".into())
        .spawn(move || {
            let mut pace = Pace::new(plan.netns_rate, deadline);
            let mut lives = Vec::new();
            let mut i = 0u64;
            while pace.tick(&shared) {
                lives.retain(|h: &thread::JoinHandle<()>| !h.is_finished());
                if shared.live_namespaces.load(Ordering::SeqCst) >= MAX_LIVE_NAMESPACES {
                    shared.namespaces_skipped.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                shared.live_namespaces.fetch_add(1, Ordering::SeqCst);
                let sh = Arc::clone(&shared);
                let (conns, life) = (plan.netns_conns, plan.netns_life);
                let spawned =
                    thread::Builder::new()
                        .name(format!("soak-ns-{i}"))
                        .spawn(move || {
                            if let Err(e) = namespace_life(i, conns, life, &sh) {
                                sh.fail(&format!("namespace {i}"), e);
                            }
                            sh.live_namespaces.fetch_sub(1, Ordering::SeqCst);
                        });
                match spawned {
                    Ok(h) => lives.push(h),
                    Err(e) => {
                        shared.live_namespaces.fetch_sub(1, Ordering::SeqCst);
                        shared.fail("spawning a namespace's thread", e);
                    }
                }
                i += 1;
            }
            for h in lives {
                let _ = h.join();
            }
        })
        .expect("spawning the namespace maker")
}

/// One short-lived namespace: a listener, `conns` connections closed in
/// turn client-first, server-first, by a client abort and a server abort
/// (starting from the `i`th kind), settled; then `life` with their
/// timewait sockets in it; then the listener closes, this thread ends and
/// the kernel deletes the namespace (unless someone holds it).
fn namespace_life(i: u64, conns: u64, life: Duration, shared: &Shared) -> Result<()> {
    enter_new_netns()?;
    let (inode, net) = this_namespace();
    shared.namespaces.lock().expect("lock").push(inode);
    let listener = listen_counted(NETNS_PORT, shared)?;
    let result = (|| -> Result<()> {
        for j in 0..conns {
            let close = Close::ALL[((i + j) % 4) as usize];
            conn::connection(&listener, addr(NETNS_PORT), close)?;
            shared.add(|t| match close {
                Close::ClientFirst => t.client_first += 1,
                Close::ServerFirst => t.server_first += 1,
                Close::ClientAbort | Close::ServerAbort => t.aborts += 1,
            });
        }
        settle(&net, &[NETNS_PORT], &format!("namespace {inode}"))?;
        sleep_unless_stopped(life, shared);
        Ok(())
    })();
    close_counted(listener, shared);
    shared.add(|t| t.namespaces += 1);
    result
}
