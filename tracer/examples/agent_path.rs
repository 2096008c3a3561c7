//! The agent's per-event path alone (decoder, tracker, observers, writer),
//! fed a synthetic stream of ring buffer records in memory: no kernel, no
//! root, no other load. It prints nanoseconds of CPU per transition, with
//! a spread a few percent wide where `cargo xtask bench` (a whole machine
//! under churn) shows 10-20 %: changes to the agent's code are measured
//! here first, then confirmed by the bench.
//!
//! `cargo run --release --example agent_path -- [tracer flags]`, e.g.
//! `--events none --summary`, `--events connections`, `--output json`.
//! The flags choose what the real agent would: the output, the records,
//! whether the kernel would batch a socket's transitions and when it would
//! send them. `AGENT_PATH_ROUNDS` (default 5) rounds of
//! `AGENT_PATH_CONNECTIONS` (default 100,000) connections each, after one
//! round of warm-up.
//!
//! The stream is the bench's client-first churn on loopback, 8
//! connections in flight: a client's 5 transitions (connect, close, its
//! hand-over to a timewait socket) and its accepted peer's 5, socket
//! addresses reused as the slab allocator does (last freed, first used),
//! ephemeral ports cycling over 28,232, so each client's 4-tuple comes back
//! while its TIME_WAIT is tracked (an end by reuse). Every second of the
//! stream's time a timewait poll is answered with the clients' timewait
//! sockets, as the worker would find them, and applied in the agent's
//! slices: the TIME_WAIT entries it dates are part of the path (the
//! worker's dump itself is not). Not in it: resets, cgroup naming.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use clap::Parser as _;
use tracer::{
    agent::{flush_states, Pipeline, APPLY_SLICE},
    cli::Args,
    clock::WallClock,
    kernel::events::{encode, Comm, Family, Source, TcpState, Transition},
    report::{
        metrics::Recorder,
        observe::Observers,
        output::{Output, Sink},
        summary::Summary,
    },
    track::{
        lifecycle::{Lifecycle, TimewaitPoll, TIMEWAIT_LEN_NS},
        ports::Ports,
        resets::Resets,
        tracker::Tracker,
        worker::{NetnsDump, TimewaitDump, TimewaitSocket},
    },
};
use tracer_common::{
    batch_event_len, BatchEvent, BatchStep, EventHeader, EventKind, TaskSlot, BATCH_STEPS,
    FLAG_OLD_STATE_KNOWN,
};

const SERVER_PORT: u16 = 8080;
const NETNS: u32 = 4_026_531_840;
/// Transitions of the stream per microsecond (the bench's churn at about
/// 80,000 connections a second).
const STEP_NS: u64 = 1_250;
const IN_FLIGHT: usize = 8;
const EPHEMERAL: (u16, u16) = (32768, 60999);
/// Records handled between two ends of a drain (the ring buffer's 4 MiB
/// hold about this many).
const DRAIN_RECORDS: usize = 16_384;
/// The stream's time between two timewait polls (`--timewait-interval`).
const POLL_NS: u64 = 1_000_000_000;

fn main() {
    let args = match Args::try_parse_from(
        std::iter::once("tracer".to_string()).chain(std::env::args().skip(1)),
    ) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env("AGENT_PATH_ROUNDS", 5);
    let connections = env("AGENT_PATH_CONNECTIONS", 100_000);

    let mut pipeline = pipeline(&args);
    let mut lifecycle = Lifecycle::new().expect("NETLINK_SOCK_DIAG socket");
    let mut next_poll = 0;
    // Connections whose TIME_WAIT a poll dated.
    let mut dated = 0;
    let mut world = World::new(if args.events.transitions() {
        None
    } else {
        Some(flush_states(&args))
    });
    let mut records = Records::default();
    println!(
        "agent path: --output {:?} --events {:?}{}; {rounds} rounds of {connections} connections",
        args.output,
        args.events,
        if args.summary.summary {
            " --summary"
        } else {
            ""
        },
    );
    let mut per_transition = Vec::new();
    for round in 0..=rounds {
        let events_before = pipeline.events;
        let mut spent = Duration::ZERO;
        let mut done = 0;
        while done < connections {
            records.clear();
            while records.len() < DRAIN_RECORDS {
                done += world.step(&mut records);
            }
            let began = world.now;
            let start = thread_cpu();
            let mut worker = Duration::ZERO;
            for r in records.iter() {
                pipeline.handle(r).expect("writing to io::sink");
            }
            pipeline.drained(began).expect("writing to io::sink");
            pipeline.out.flush().expect("writing to io::sink");
            if lifecycle.applying() {
                let result = lifecycle.apply_step(&mut pipeline.tracker, APPLY_SLICE);
                dated += result.in_time_wait.len();
                pipeline
                    .timewait_polled(result)
                    .expect("writing to io::sink");
            } else if world.now >= next_poll {
                next_poll = world.now + POLL_NS;
                if let TimewaitPoll::Ask(q) = lifecycle.timewait_poll(&mut pipeline.tracker) {
                    // The worker's part: not on this path.
                    let paused = thread_cpu();
                    let dump = world.timewait_dump(q.poll, q.asked_ns);
                    worker = thread_cpu() - paused;
                    lifecycle.begin_apply(dump);
                }
            }
            spent += thread_cpu() - start - worker;
        }
        let events = pipeline.events - events_before;
        let ns = spent.as_nanos() as f64 / events as f64;
        if round == 0 {
            println!("warm-up: {events} transitions, {ns:.0} ns each");
        } else {
            println!("round {round}: {events} transitions, {ns:.0} ns each");
            per_transition.push(ns);
        }
    }
    per_transition.sort_by(f64::total_cmp);
    let median = per_transition[per_transition.len() / 2];
    let (min, max) = (per_transition[0], per_transition[per_transition.len() - 1]);
    println!(
        "agent path: {median:.0} ns per transition (median; min {min:.0}, max {max:.0}, spread {:.1} %); \
         tracker {:.1} MiB, {} untracked, {} gaps, {} timewait polls dated {} TIME_WAITs",
        (max - min) / median * 100.0,
        pipeline.tracker.memory_bytes() as f64 / (1 << 20) as f64,
        pipeline.tracker.untracked,
        pipeline.tracker.gaps,
        lifecycle.counters.polls,
        dated,
    );
}

/// The pipeline the agent builds for these flags, writing to nowhere
/// through the agent's own output thread.
fn pipeline(args: &Args) -> Pipeline<Sink> {
    let mut tracker = Tracker::new(args.max_sockets as usize);
    if args.port_pressure > 0 || args.summary.summary || args.metrics.metrics.is_some() {
        tracker.ports = Ports::new(args.port_pressure);
    }
    Pipeline {
        tracker,
        out: Output::new(
            Sink::new(io::sink(), args.output_buffer as usize).expect("output thread"),
            args.output,
            args.events,
            WallClock::now(),
        ),
        events: 0,
        unreadable: 0,
        unreadable_records: 0,
        observers: Observers::new(
            Summary::from_args(&args.summary),
            Recorder::from_args(&args.metrics, args.close_wait),
        )
        .with_tracked_stays(),
        resets: Resets::new(true),
        drain_began: None,
        deferred: Default::default(),
    }
}

/// Ring buffer records, one after the other.
#[derive(Default)]
struct Records {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Records {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn push(&mut self, record: &[u8]) {
        self.bytes.extend_from_slice(record);
        // The ring buffer's records start 8-byte aligned.
        self.bytes.resize(self.bytes.len().next_multiple_of(8), 0);
        self.ends.push(self.bytes.len());
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let r = &self.bytes[start..end];
            start = end;
            r
        })
    }
}

/// One socket as the kernel program sees it.
struct Socket {
    addr: u64,
    lport: u16,
    rport: u16,
    /// When it entered its current state, if seen.
    entered: Option<u64>,
    batch: BatchEvent,
}

impl Socket {
    fn new(addr: u64, lport: u16, rport: u16) -> Self {
        Socket {
            addr,
            lport,
            rport,
            entered: None,
            batch: BatchEvent::default(),
        }
    }
}

/// Who runs a transition: the owner in its system call, or a softirq.
#[derive(Clone, Copy)]
enum Task {
    Client,
    Server,
    None,
}

/// A connection of the churn: its client and, once it exists, the
/// accepted socket.
struct Conn {
    client: Socket,
    server: Option<Socket>,
    step: usize,
}

/// The order of a client-first close on loopback: (client side?, old,
/// new, who runs it).
const SCRIPT: [(bool, TcpState, TcpState, Task); 10] = {
    use TcpState::*;
    [
        (true, Close, SynSent, Task::Client),
        (false, Listen, SynRecv, Task::None),
        (true, SynSent, Established, Task::None),
        (false, SynRecv, Established, Task::None),
        (true, Established, FinWait1, Task::Client),
        (false, Established, CloseWait, Task::None),
        (true, FinWait1, FinWait2, Task::None),
        (false, CloseWait, LastAck, Task::Server),
        (true, FinWait2, Close, Task::None),
        (false, LastAck, Close, Task::None),
    ]
};

struct World {
    now: u64,
    /// Some(states whose entry sends a batch) when the kernel batches.
    batch: Option<u16>,
    free: Vec<u64>,
    next_addr: u64,
    next_port: u16,
    rng: u64,
    conns: Vec<Conn>,
    /// Per ephemeral port, when its client's timewait socket began (the
    /// kernel's own, until a connect() takes the port again).
    timewait: Vec<Option<u64>>,
}

impl World {
    fn new(batch: Option<u16>) -> Self {
        let mut w = World {
            now: tracer::clock::monotonic_ns(),
            batch,
            free: Vec::new(),
            next_addr: 0xffff_8880_1000_0000,
            next_port: EPHEMERAL.0,
            rng: 0x9e37_79b9_7f4a_7c15,
            conns: Vec::new(),
            timewait: vec![None; usize::from(EPHEMERAL.1 - EPHEMERAL.0) + 1],
        };
        let mut records = Records::default();
        let mut listener = Socket::new(w.alloc(), SERVER_PORT, 0);
        w.transition(
            &mut listener,
            TcpState::Close,
            TcpState::Listen,
            Task::Server,
            &mut records,
        );
        w.conns = (0..IN_FLIGHT).map(|_| w.connect()).collect();
        w
    }

    fn alloc(&mut self) -> u64 {
        self.free.pop().unwrap_or_else(|| {
            self.next_addr += 0x900;
            self.next_addr
        })
    }

    fn connect(&mut self) -> Conn {
        let port = self.next_port;
        // tcp_tw_reuse: the new connection takes the timewait socket's place.
        self.timewait[usize::from(port - EPHEMERAL.0)] = None;
        self.next_port = if port == EPHEMERAL.1 {
            EPHEMERAL.0
        } else {
            port + 1
        };
        Conn {
            client: Socket::new(self.alloc(), port, SERVER_PORT),
            server: None,
            step: 0,
        }
    }

    /// One transition of one connection in flight; 1 when that connection
    /// ended (and a new one took its place).
    fn step(&mut self, records: &mut Records) -> usize {
        // xorshift64: the same interleaving in every run.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let i = (self.rng % IN_FLIGHT as u64) as usize;
        let mut c = self.conns.swap_remove(i);
        let (client_side, old, new, task) = SCRIPT[c.step];
        if c.server.is_none() && !client_side {
            let addr = self.alloc();
            c.server = Some(Socket::new(addr, SERVER_PORT, c.client.lport));
        }
        let s = if client_side {
            &mut c.client
        } else {
            c.server.as_mut().expect("made above")
        };
        self.transition(s, old, new, task, records);
        if new == TcpState::Close {
            self.free.push(s.addr);
            if client_side {
                self.timewait[usize::from(s.lport - EPHEMERAL.0)] = Some(self.now);
            }
        }
        c.step += 1;
        if c.step == SCRIPT.len() {
            let next = self.connect();
            self.conns.push(next);
            1
        } else {
            self.conns.push(c);
            0
        }
    }

    /// What the worker's sock_diag dump would find: every client's
    /// timewait socket, in TIME_WAIT, its timer armed when it began.
    fn timewait_dump(&self, poll: u32, asked_ns: u64) -> TimewaitDump {
        let sockets = (EPHEMERAL.0..=EPHEMERAL.1)
            .zip(&self.timewait)
            .filter_map(|(port, began)| {
                Some(TimewaitSocket {
                    family: Family::Ipv4,
                    laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    lport: port,
                    raddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    rport: SERVER_PORT,
                    state: Some(TcpState::TimeWait),
                    expires_ns: (*began)? + TIMEWAIT_LEN_NS,
                })
            })
            .collect();
        TimewaitDump {
            poll,
            asked_ns,
            done_ns: self.now,
            namespaces: vec![(
                NETNS,
                NetnsDump::Dumped {
                    sockets,
                    overflowed: false,
                },
            )],
            cpu_ns: 0,
            errors: 0,
        }
    }

    fn transition(
        &mut self,
        s: &mut Socket,
        old: TcpState,
        new: TcpState,
        task: Task,
        records: &mut Records,
    ) {
        self.now += STEP_NS;
        let old_state_ns = s.entered.map(|e| self.now - e);
        s.entered = Some(self.now);
        let (pid, comm) = match task {
            Task::Client => (200, "client"),
            Task::Server => (100, "server"),
            Task::None => (0, ""),
        };
        let Some(mask) = self.batch else {
            records.push(&encode(&Transition {
                mono_ns: self.now,
                sock: s.addr,
                task: pid != 0,
                pid,
                tid: pid,
                uid: 1000 * u32::from(pid != 0),
                comm: Comm::from_name(comm),
                family: Family::Ipv4,
                laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                // A connecting socket's port is bound after it enters SYN_SENT.
                lport: if new == TcpState::SynSent { 0 } else { s.lport },
                raddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                rport: s.rport,
                old,
                new,
                old_state_ns,
                netns: NETNS,
                cgroup: 0,
                source: Source::Tracepoint,
            }));
            return;
        };
        // The kernel program's batching (tracer-ebpf's `add_to_batch`).
        let b = &mut s.batch.batch;
        if pid != 0 && usize::from(b.nowners) >= b.owners.len() {
            send_batch(s, records);
        }
        let b = &mut s.batch.batch;
        let mut step = BatchStep {
            ts_ns: self.now,
            old_state_ns: old_state_ns.unwrap_or(0),
            old: old as u8,
            new: new as u8,
            flags: if old_state_ns.is_some() {
                FLAG_OLD_STATE_KNOWN as u8
            } else {
                0
            },
            ..Default::default()
        };
        if pid != 0 {
            let slot = &mut b.owners[usize::from(b.nowners)];
            *slot = TaskSlot {
                pid,
                tid: pid,
                uid: 1000,
                comm: {
                    let mut raw = [0u8; 16];
                    raw[..comm.len()].copy_from_slice(comm.as_bytes());
                    raw
                },
                ..Default::default()
            };
            b.nowners += 1;
            step.owner = b.nowners;
        }
        b.steps[usize::from(b.nsteps)] = step;
        b.nsteps += 1;
        if new == TcpState::Close
            || mask & (1 << (new as u8)) != 0
            || usize::from(b.nsteps) == BATCH_STEPS
        {
            send_batch(s, records);
        }
    }
}

fn send_batch(s: &mut Socket, records: &mut Records) {
    let n = usize::from(s.batch.batch.nsteps);
    if n == 0 {
        return;
    }
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&Ipv4Addr::LOCALHOST.octets());
    let ev = &mut s.batch;
    ev.header = EventHeader {
        ts_ns: ev.batch.steps[0].ts_ns,
        kind: EventKind::Batch as u32,
        len: batch_event_len(n) as u32,
    };
    ev.skaddr = s.addr;
    ev.saddr = addr;
    ev.daddr = addr;
    ev.sport = s.lport;
    ev.dport = s.rport;
    ev.family = libc::AF_INET as u16;
    ev.netns = NETNS;
    records.push(&bytemuck::bytes_of(&*ev)[..batch_event_len(n)]);
    ev.batch = Default::default();
}

/// CPU time of this thread: the time another process took the CPU away
/// (the machines are shared) does not count.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
