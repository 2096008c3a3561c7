//! The agent's event loop: drains the ring buffer, feeds the tracker and
//! the output, and stops on Ctrl-C, SIGTERM or `--duration`.

use std::{io, pin::pin, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    time::{interval, sleep, MissedTickBehavior},
};

use crate::{
    cli::Args,
    clock::{monotonic_ns, WallClock},
    kernel::events::{self, Record, TcpState, TimewaitDeath, Transition},
    kernel::loader::{self, CounterValues, LoadOptions},
    kernel::ring::Ring,
    report::group::NamedOwner,
    report::metrics::{Endpoint, Recorder},
    report::observe::Observers,
    report::output::{Output, RecordWrite, Sink, Stats},
    report::summary::Summary,
    track::cgroup::Resolver,
    track::close::classify,
    track::containers::Cgroups,
    track::diag::Queues,
    track::lifecycle::{Lifecycle, PollResult, TimewaitPoll, EXPIRY_TOLERANCE_NS},
    track::ports::Ports,
    track::resets::Resets,
    track::tracker::{Connection, Derived, Owner, SlotId, Tracker, TupleKey, PREFETCH_RUN},
    track::worker::{Done, Job, Worker},
};

/// Everything one decoded record goes through, kept apart from the loop so
/// tests and benchmarks can drive it.
pub struct Pipeline<W: RecordWrite> {
    pub tracker: Tracker,
    pub out: Output<W>,
    pub events: u64,
    /// Transitions in records that could not be decoded, and the records.
    pub unreadable: u64,
    pub unreadable_records: u64,
    /// Aggregations fed by every transition (--summary, --metrics).
    pub observers: Observers,
    /// Resets joined to connections; closed connections wait there for
    /// an abort's reset (see `resets.rs`).
    pub resets: Resets,
    /// When the first slice of a drain not finished yet began.
    pub drain_began: Option<u64>,
    /// Records waiting for their owner's cgroup to be named.
    pub deferred: std::collections::VecDeque<Deferred>,
}

/// A record that waits for its owner's cgroup to be named (see
/// [`Pipeline::write_deferred`]).
pub enum Deferred {
    /// A transition, its owner, and a derived one's stay before the
    /// hand-over (see [`Derived`]).
    Emit(Transition, Option<Owner>, Option<u64>),
    /// An ended connection, in its slot until written.
    Connection(SlotId),
    /// A stuck connection's alert: the connection, its holders, its
    /// socket's queues, when it was due, at exit.
    Stuck(Box<StuckAlert>),
}

/// What a deferred stuck alert carries (see [`Deferred::Stuck`]).
pub type StuckAlert = (
    Connection,
    Vec<crate::track::procfs::Holder>,
    Option<Queues>,
    u64,
    bool,
);

impl<W: RecordWrite> Pipeline<W> {
    pub fn handle(&mut self, bytes: &[u8]) -> io::Result<()> {
        match events::decode_record(bytes) {
            Ok(Record::Transition(t)) => self.transition(&t),
            Ok(Record::Batch(b)) => {
                for t in b.transitions() {
                    self.transition(&t)?;
                }
                Ok(())
            }
            Ok(Record::TimewaitDeath(d)) => self.timewait_died(&d),
            Ok(Record::Reset(r)) => {
                self.resets.reset(&r, &mut self.tracker);
                Ok(())
            }
            Err(e) => {
                self.unreadable_records += 1;
                self.unreadable += events::transitions_claimed(bytes);
                if self.unreadable_records == 1 {
                    log::warn!("unreadable record ({e}); counted in the stats");
                }
                Ok(())
            }
        }
    }

    /// One transition from the kernel, alone or from a batch.
    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.events += 1;
        let outcome = self.tracker.on_transition(t);
        if let Some(d) = &outcome.derived {
            self.emit_derived(d)?;
        }
        self.emit(t, &outcome.owner)?;
        if let Some(id) = outcome.handshake_done {
            self.handshake_done(id)?;
        }
        if let Some(id) = outcome.handed_over {
            self.resets.handed_over(id, t.sock, t.mono_ns);
        }
        for &id in &outcome.closed {
            self.close(id)?;
        }
        self.port_pressure(t.mono_ns)
    }

    /// The destinations whose ephemeral ports crossed the threshold since
    /// the last call (see `ports.rs`).
    pub fn port_pressure(&mut self, at_ns: u64) -> io::Result<()> {
        if self.tracker.ports.crossed.is_empty() {
            return Ok(());
        }
        // Taken and given back: the list keeps its capacity.
        let mut crossed = std::mem::take(&mut self.tracker.ports.crossed);
        let mut written = Ok(());
        for p in &crossed {
            written = written.and(self.out.port_pressure(p, at_ns, false));
        }
        crossed.clear();
        self.tracker.ports.crossed = crossed;
        written
    }

    /// At exit: the destinations still above the threshold.
    pub fn port_pressure_at_exit(&mut self, at_ns: u64) -> io::Result<()> {
        let mut above: Vec<_> = self.tracker.ports.pressures().filter(|p| p.above).collect();
        above.sort_by_key(|p| std::cmp::Reverse(p.in_use));
        for p in &above {
            self.out.port_pressure(p, at_ns, true)?;
        }
        Ok(())
    }

    /// An active closer entered TIME_WAIT: its close handshake is over, and
    /// its `close` record is written now (its connection record comes at
    /// the end of its TIME_WAIT).
    pub fn handshake_done(&mut self, id: SlotId) -> io::Result<()> {
        let (written, owner) = {
            let c = self.tracker.conn(id);
            (c.close_written, c.owner)
        };
        if written || !self.deferred.is_empty() || !self.named(&owner) {
            // Written at its end instead (with its connection record).
            return Ok(());
        }
        let close = classify(&self.tracker.conn(id).close, self.resets.enabled);
        let conn = self.tracker.conn_mut(id);
        conn.close_written = true;
        conn.close_written_early = true;
        let conn = self.tracker.conn(id);
        let pids = accepted_by(&self.tracker, conn);
        self.out.close(conn, &close, pids)
    }

    /// A transition to the output and to the observers (summary, metrics),
    /// with the owner the output names; `tracer summarize` feeds the
    /// observers the same pairs read back from a recording.
    pub fn emit(&mut self, t: &Transition, owner: &Option<Owner>) -> io::Result<()> {
        self.emit_with(t, owner, None)
    }

    /// A transition the tracker derived (see [`Derived`]).
    pub fn emit_derived(&mut self, d: &Derived) -> io::Result<()> {
        self.emit_with(&d.t, &d.owner, d.stay_before_ns)
    }

    fn emit_with(
        &mut self,
        t: &Transition,
        owner: &Option<Owner>,
        stay_before_ns: Option<u64>,
    ) -> io::Result<()> {
        if !self.deferred.is_empty() || !self.named(owner) {
            self.deferred
                .push_back(Deferred::Emit(*t, *owner, stay_before_ns));
            return Ok(());
        }
        self.emit_now(t, owner, stay_before_ns)
    }

    fn emit_now(
        &mut self,
        t: &Transition,
        owner: &Option<Owner>,
        stay_before_ns: Option<u64>,
    ) -> io::Result<()> {
        let named = match self.out.cgroups() {
            // The owner's container, for group keys and metric labels.
            Some(c) if c.keys() => c.enrich(owner),
            _ => owner.map(NamedOwner::from),
        };
        self.observers.transition(t, &named, stay_before_ns);
        let pids = if self.out.writes_transitions() {
            self.tracker.listener_pids(t.netns, t.lport)
        } else {
            None
        };
        self.out.transition(t, owner, pids)
    }

    /// A connection that ended (its slot): its record is written now, or
    /// once no reset of its own can still arrive.
    pub fn close(&mut self, id: SlotId) -> io::Result<()> {
        if self.resets.closed(id, &mut self.tracker) {
            self.write_connection(id)?;
        }
        Ok(())
    }

    /// A connection's record, with how it closed, to the output and the
    /// observers; then its slot is freed.
    pub fn write_connection(&mut self, id: SlotId) -> io::Result<()> {
        let owner = self.tracker.conn(id).owner;
        if !self.deferred.is_empty() || !self.named(&owner) {
            self.deferred.push_back(Deferred::Connection(id));
            return Ok(());
        }
        self.write_connection_now(id)
    }

    fn write_connection_now(&mut self, id: SlotId) -> io::Result<()> {
        let conn = self.tracker.conn(id);
        let close = if conn.cut_at_exit {
            crate::track::close::cut_short(&conn.close, self.resets.enabled)
        } else {
            classify(&conn.close, self.resets.enabled)
        };
        let pids = accepted_by(&self.tracker, conn);
        if !conn.close_written {
            self.out.close(conn, &close, pids)?;
        }
        // A record cut at exit is output, not counted: its last stay and
        // its close class end where the tracer stopped, not the connection.
        match self.out.cgroups() {
            _ if conn.cut_at_exit => {}
            Some(c) if c.keys() => {
                let named = c.enrich(&conn.owner);
                self.observers.connection(conn, named.as_ref(), &close);
            }
            _ => {
                let named = conn.owner.map(NamedOwner::from);
                self.observers.connection(conn, named.as_ref(), &close);
            }
        }
        let written = self.out.connection(conn, &close, pids);
        self.tracker.release(id);
        written
    }

    /// Writes the held records whose reset grace is over.
    fn release_held(&mut self, drain_start_ns: u64) -> io::Result<()> {
        // Held since their close, their slots are cold by now: a run of
        // them prefetched together, then written.
        loop {
            for id in self.resets.due(drain_start_ns).take(PREFETCH_RUN) {
                self.tracker.prefetch(id);
            }
            for _ in 0..PREFETCH_RUN {
                let Some(id) = self.resets.pop_due(drain_start_ns) else {
                    self.resets.expire_pending(drain_start_ns);
                    return Ok(());
                };
                self.write_connection(id)?;
            }
        }
    }

    /// At exit: every held record.
    pub fn release_all(&mut self) -> io::Result<()> {
        while let Some(id) = self.resets.pop_any() {
            self.write_connection(id)?;
        }
        Ok(())
    }

    /// A timewait socket died (fentry): ends its connection if tracked.
    fn timewait_died(&mut self, d: &TimewaitDeath) -> io::Result<()> {
        let key = TupleKey {
            netns: d.netns,
            family: d.family,
            laddr: d.laddr,
            lport: d.lport,
            raddr: d.raddr,
            rport: d.rport,
        };
        let outcome = self
            .tracker
            .timewait_died(&key, d.mono_ns, EXPIRY_TOLERANCE_NS);
        if let Some(d) = &outcome.derived {
            self.emit_derived(d)?;
        }
        for &id in &outcome.closed {
            self.close(id)?;
        }
        self.port_pressure(d.mono_ns)
    }

    /// A timewait poll's answer (see `lifecycle/timewait.rs`): the transitions it
    /// derived and the connections it ended.
    pub fn timewait_polled(&mut self, result: PollResult) -> io::Result<()> {
        for d in &result.derived {
            self.emit_derived(d)?;
        }
        for &id in &result.in_time_wait {
            self.handshake_done(id)?;
        }
        for id in result.closed {
            self.close(id)?;
        }
        self.port_pressure(monotonic_ns())
    }

    /// A stuck connection's alert, with its close so far.
    pub fn stuck(
        &mut self,
        conn: &Connection,
        holders: &[crate::track::procfs::Holder],
        queues: Option<Queues>,
        at_exit: bool,
    ) -> io::Result<()> {
        let now = monotonic_ns();
        if !self.deferred.is_empty() || !self.named(&conn.owner) {
            let alert = Box::new((*conn, holders.to_vec(), queues, now, at_exit));
            self.deferred.push_back(Deferred::Stuck(alert));
            return Ok(());
        }
        self.stuck_now(conn, holders, queues, now, at_exit)
    }

    fn stuck_now(
        &mut self,
        conn: &Connection,
        holders: &[crate::track::procfs::Holder],
        queues: Option<Queues>,
        now_ns: u64,
        at_exit: bool,
    ) -> io::Result<()> {
        let close = crate::track::close::so_far(&conn.close, self.resets.enabled);
        self.out
            .stuck(conn, now_ns, holders, queues, at_exit, &close)
    }

    /// Is the cgroup of `owner` named, or known not to be? If not, its
    /// naming is under way: records of it wait (in order, with every
    /// record after them) in `deferred`.
    fn named(&mut self, owner: &Option<Owner>) -> bool {
        self.out.cgroups().is_none_or(|c| c.ready(owner))
    }

    /// Writes the records that waited for their owner's cgroup to be
    /// named, in order, as far as the names are there (or have waited
    /// long enough: they are then written without).
    pub fn write_deferred(&mut self) -> io::Result<()> {
        while let Some(front) = self.deferred.front() {
            let owner = match front {
                Deferred::Emit(_, o, _) => *o,
                Deferred::Connection(id) => self.tracker.conn(*id).owner,
                Deferred::Stuck(a) => a.0.owner,
            };
            if !self.named(&owner) {
                break;
            }
            match self.deferred.pop_front() {
                Some(Deferred::Emit(t, o, before)) => self.emit_now(&t, &o, before)?,
                Some(Deferred::Connection(id)) => self.write_connection_now(id)?,
                Some(Deferred::Stuck(a)) => {
                    let (conn, holders, queues, now, at_exit) = *a;
                    self.stuck_now(&conn, &holders, queues, now, at_exit)?;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// The summary so far, on the output (--summary; on SIGUSR1 and at exit).
    pub fn write_summary(&mut self, format: crate::report::format::Format) -> io::Result<()> {
        if let Some(s) = &self.observers.summary {
            s.write(self.out.writer(), format)?;
            self.out.record_done();
            // The live agent's only: a recording has no port counts.
            let top = self.tracker.ports.top(s.top());
            if !top.is_empty() {
                self.out.port_summary(&top)?;
            }
            self.out.flush()?;
        }
        Ok(())
    }

    /// Handles the records the ring buffer holds, for at most
    /// [`DRAIN_SLICE`] (the loop then looks at signals, timers and the
    /// worker's answers before it goes on). Once a drain has emptied the
    /// ring buffer, the held records whose resets would have been in it
    /// are written. True when it emptied it.
    pub fn drain(&mut self, ring: &mut Ring) -> io::Result<bool> {
        let start = monotonic_ns();
        // Every record submitted before the first slice of this drain
        // began has been read once one of its slices empties the buffer.
        let began = *self.drain_began.get_or_insert(start);
        let deadline = start + DRAIN_SLICE.as_nanos() as u64;
        let mut n = 0u32;
        loop {
            let Some(item) = ring.next_record() else {
                self.drained(began)?;
                return Ok(true);
            };
            self.handle(&item)?;
            drop(item);
            n += 1;
            if n.is_multiple_of(256) && monotonic_ns() >= deadline {
                self.write_deferred()?;
                return Ok(false);
            }
        }
    }

    /// The ring buffer is empty: every record submitted before `began_ns`
    /// (when the drain's first slice began) has been handled, so the held
    /// records whose resets would have been among them are written.
    pub fn drained(&mut self, began_ns: u64) -> io::Result<()> {
        self.drain_began = None;
        self.release_held(began_ns)?;
        self.write_deferred()
    }

    pub fn stats(&self, kernel: CounterValues) -> Stats {
        Stats {
            events: self.events,
            lost: kernel.ringbuf_full,
            lost_resets: kernel.resets_lost,
            lost_timewait_deaths: kernel.timewait_deaths_lost,
            seen: kernel.seen,
            filtered: kernel.filtered,
            unreadable: self.unreadable,
            unreadable_records: self.unreadable_records,
            timing_map_full: kernel.timing_update_failed,
            timing_stale: kernel.timing_stale,
            listeners_full: kernel.listeners_full,
            timewait_unreadable: kernel.timewait_unreadable,
            resets_no_socket: kernel.resets_no_socket,
            resets_unmatched: self.resets.unmatched,
            skipped: kernel.skipped,
            pending: kernel.batch_pending,
            untracked: self.tracker.untracked,
            gaps: self.tracker.gaps,
            replaced: self.tracker.replaced,
            port_pressure_unknown_ns: self.tracker.ports.unknown_ns,
            port_pressure_dests_full: self.tracker.ports.dests_full,
            ..Default::default()
        }
    }
}

/// States whose entry the agent must see at once when the kernel batches
/// transitions: LISTEN (accepted sockets inherit their listener's owner),
/// ESTABLISHED (a new connection on a timewait socket's 4-tuple ends it;
/// live connection gauges), and the states watched for stuck connections.
/// The other transitions of a socket (the open and close handshakes) reach
/// the agent with the next of these, or at CLOSE.
pub fn flush_states(args: &Args) -> u16 {
    let bit = |s: TcpState| 1u16 << (s as u8);
    let mut mask = bit(TcpState::Listen) | bit(TcpState::Established);
    if !args.close_wait.is_zero() {
        mask |= bit(TcpState::CloseWait);
    }
    if !args.fin_wait2.is_zero() {
        mask |= bit(TcpState::FinWait2);
    }
    mask
}

/// Do summaries or metrics group by the owner's cgroup or container?
fn wants_container_keys(args: &Args) -> bool {
    use crate::{report::group::GroupBy, report::metrics::MetricsLabel};
    matches!(
        args.summary.group_by,
        Some(GroupBy::Cgroup | GroupBy::Container)
    ) || args.metrics.metrics_label == Some(MetricsLabel::Container)
}

/// Share of one CPU the timewait polls may take (the worker's dump and
/// the answer's application): under heavy connection churn a poll walks
/// tens of thousands of timewait sockets (about 40 ms of CPU for 64,000
/// here).
const TIMEWAIT_POLL_BUDGET: u32 = 50; // 1/50 = 2%

/// The wait before the next timewait poll: `--timewait-interval`, longer
/// when the last poll took more than the budget. TIME_WAIT entries and
/// expiries keep their precision (they come from the kernel's timer, not
/// from when the poll ran); only early deaths (RST) are dated later.
fn timewait_interval(configured: Duration, last_poll: Duration) -> Duration {
    configured.max(last_poll * TIMEWAIT_POLL_BUDGET)
}

/// The longest the drain loop works before it looks at signals, timers
/// and the worker's answers.
pub const DRAIN_SLICE: Duration = Duration::from_millis(20);
/// Sockets of a timewait poll's answer applied between two drains: a few
/// milliseconds of records. A whole answer (tens of thousands of
/// connections entering or leaving TIME_WAIT at full churn) would hold
/// the drain up long enough for the ring buffer to fill.
pub const APPLY_SLICE: usize = 2048;

/// How long the agent waits at exit for a last timewait poll.
const EXIT_POLL_WAIT: Duration = Duration::from_millis(300);

/// How long the agent waits at exit for the worker's list of stuck
/// connections' holders.
const EXIT_HOLDERS_WAIT: Duration = Duration::from_millis(500);

/// How long the agent waits at exit for stdout's reader to take the last
/// records, from the last one it took.
const EXIT_OUTPUT_WAIT: Duration = Duration::from_secs(1);

/// How often the agent drains the ring buffer without being woken.
/// How long an accepted connection with its listener's owner must last
/// before /proc is searched for the process that accepted it (shorter
/// ones are usually named by their own close first).
const ACCEPTED_LOOKUP_AFTER: Duration = Duration::from_secs(1);

/// Accepted connections looked up at most per second: each is a sock_diag
/// look-up, and the /proc scan is shared.
const MAX_ACCEPTED_LOOKUPS: usize = 1024;

pub const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Runs the agent until Ctrl-C, SIGTERM or `--duration`; with `live`
/// (`tracer top`), also until the view quits, feeding it a snapshot a
/// second.
pub async fn run(args: Args, live: Option<crate::top::feed::Live>) -> anyhow::Result<()> {
    // Before "attached" is logged: a signal sent once it is must be handled.
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    // Even without --summary, so that a stray SIGUSR1 never kills it.
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    // Before loading: a busy port fails fast, with nothing to undo.
    let metrics = Recorder::from_args(&args.metrics, args.close_wait);
    let mut endpoint = match (&metrics, args.metrics.metrics) {
        (Some(m), Some(addr)) => Endpoint::start(addr, m.registry().clone()).await?,
        _ => Endpoint::disabled(),
    };
    let opts = LoadOptions {
        filters: args.filters(),
        wakeup_bytes: args
            .wakeup_bytes
            .unwrap_or(u64::from(args.ringbuf_size) / 8),
        max_sockets: args.max_sockets,
        ringbuf_bytes: args.ringbuf_size,
        attach: args.attach,
        batch: !args.events.transitions(),
        flush_states: flush_states(&args),
    };
    let probe = loader::load(&opts)?;
    let mut capabilities = probe.capabilities;
    let mut metrics = metrics;
    if let (Some(m), true) = (&mut metrics, capabilities.resets) {
        m.enable_resets(probe.reset_reasons.clone());
    }
    let netns_known = probe.offsets.netns_known();
    let mut counters = probe.counters;
    let programs = probe.programs;
    let cgroups = Cgroups::new(Resolver::new(), wants_container_keys(&args));
    match cgroups.why() {
        Some(why) => log::info!("cgroups: {why}; records carry null cgroup, container and pod"),
        None => log::debug!("cgroups: naming owners' cgroups from the v2 hierarchy"),
    }
    let mut pipeline = Pipeline {
        tracker: Tracker::new(args.max_sockets as usize),
        out: Output::new(
            // `tracer top` owns the terminal: records go nowhere (the
            // view shows what they would say).
            if live.is_some() {
                Sink::new(io::sink(), args.output_buffer as usize)
            } else {
                Sink::new(io::stdout(), args.output_buffer as usize)
            }
            .context("starting the output thread")?,
            args.output,
            args.events,
            WallClock::now(),
        )
        .with_cgroups(cgroups, args.wide)
        .with_reset_reasons(probe.reset_reasons),
        events: 0,
        unreadable: 0,
        unreadable_records: 0,
        observers: Observers::new(Summary::from_args(&args.summary), metrics).with_tracked_stays(),
        resets: Resets::new(probe.capabilities.resets),
        drain_began: None,
        deferred: std::collections::VecDeque::with_capacity(1024),
    };
    // After attaching, so no socket falls between the snapshot and the events.
    let mut lifecycle = Lifecycle::new().context("opening NETLINK_SOCK_DIAG")?;
    capabilities.sock_diag = lifecycle.available;
    lifecycle.fentry = capabilities.timewait_fentry;
    log::info!("{}", capabilities.describe());
    if args.port_pressure > 0 || args.summary.summary || args.metrics.metrics.is_some() {
        pipeline.tracker.ports = Ports::new(args.port_pressure);
    }
    let snapshot = lifecycle.snapshot(&mut pipeline.tracker, netns_known, &opts.filters);
    for (inum, range) in lifecycle.port_ranges(netns_known) {
        pipeline.tracker.set_port_range(inum, range);
    }
    pipeline.port_pressure(monotonic_ns())?;
    log::info!(
        "snapshot: {} TCP sockets existed before the tracer",
        snapshot.sockets
    );
    // The blocking work (dumps, look-ups, /proc scans) from here on runs on
    // the worker thread, with the namespaces the snapshot opened.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let (namespaces, overflows) = lifecycle
        .take_namespaces()
        .context("the namespaces were opened once")?;
    let worker =
        Worker::start(namespaces, overflows, done_tx).context("starting the worker thread")?;
    // Owners' cgroups are named on a thread of their own too; records wait
    // for their owner's name (at most NAMING_WAIT_NS) in `deferred`.
    let (named_tx, mut named_rx) = tokio::sync::mpsc::unbounded_channel();
    if let Some(c) = pipeline.out.cgroups() {
        c.start(named_tx)
            .context("starting the cgroup naming thread")?;
    }
    // Before "attached": `--pid`/`--comm` select the accepted sockets of a
    // server already running from its first connection after start.
    let mut listeners = probe.listeners;
    let mut listeners_unseeded = 0;
    for &(netns, port) in &snapshot.selected_listeners {
        if !listeners.select(netns, port) {
            listeners_unseeded += 1;
        }
    }
    // Loading parsed the kernel's BTF (tens of MB of short-lived heap):
    // give it back to the system, so the idle agent stays small.
    // SAFETY: malloc_trim only releases free memory. glibc only: musl (the
    // QEMU guests' static build) has no malloc_trim.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
    if let Some(addr) = endpoint.local_addr {
        log::info!("serving Prometheus metrics at http://{addr}/metrics");
    }
    // Tests and scripts wait for this line: everything is in place.
    log::info!(
        "attached to {}; ring buffer {} KiB, {} sockets timed at most",
        capabilities.transitions.attached_to(),
        args.ringbuf_size >> 10,
        args.max_sockets
    );
    let thresholds: Vec<(TcpState, Duration)> = [
        (TcpState::CloseWait, args.close_wait),
        (TcpState::FinWait2, args.fin_wait2),
    ]
    .into_iter()
    .filter(|(_, d)| !d.is_zero())
    .collect();
    // SAFETY: the AsyncFd owns the ring buffer, hence its fd, for as long as
    // it is registered.
    let mut ring = unsafe { AsyncFd::register_with_interest(probe.events, Interest::READABLE) }
        .context("registering the ring buffer with tokio")?;
    let mut logger = match probe.logger {
        // SAFETY: as above, the AsyncFd owns the logger's ring buffer.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .context("eBPF logger")?,
        ),
        None => None,
    };

    let mut deadline = pin!(async {
        match args.duration {
            Some(d) => sleep(d).await,
            None => std::future::pending().await,
        }
    });
    let mut namespaces_released = 0u64;
    let mut open_at_exit = 0u64;
    let mut timewait_at_exit = 0u64;
    let mut tick = interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_lost = 0;
    let mut last_dropped = 0;
    // Below the wake-up threshold the kernel does not wake us: drain often
    // enough that live output stays live.
    let mut drain_tick = interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut timewait_due = pin!(sleep(args.timewait_interval));
    // What the poll being applied has cost so far.
    let mut poll_cost = Duration::ZERO;
    let (mut snapshots, mut quit) = match live {
        Some(l) => (Some(l.snapshots), Some(l.quit)),
        None => (None, None),
    };
    if snapshots.is_some() {
        pipeline.observers.live = Some(Default::default());
    }
    let mut holders = crate::top::feed::Holders::default();
    // A look-up of accepted connections' owners is on its way.
    let mut accepted_asked = false;

    let result: io::Result<()> = async {
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    // Not emptied: readiness stays, the loop comes back.
                    if pipeline.drain(guard.get_inner_mut())? {
                        guard.clear_ready();
                    }
                    pipeline.out.flush()?;
                }
                // A poll's answer, applied in slices between drains.
                () = std::future::ready(()), if lifecycle.applying() => {
                    let started = std::time::Instant::now();
                    let result = lifecycle.apply_step(&mut pipeline.tracker, APPLY_SLICE);
                    pipeline.timewait_polled(result)?;
                    let spent = started.elapsed();
                    lifecycle.counters.poll_ns += spent.as_nanos() as u64;
                    poll_cost += spent;
                    if !lifecycle.applying() {
                        // The poll's cost: the worker's dump and the
                        // answer's application here.
                        let next = timewait_interval(args.timewait_interval, poll_cost);
                        timewait_due.as_mut().reset(tokio::time::Instant::now() + next);
                    }
                    // This branch is always ready: the drain comes from
                    // here, not from the ring's readiness, and the runtime
                    // gets its turn (signals, timers) before the next slice.
                    pipeline.drain(ring.get_mut())?;
                    pipeline.out.flush()?;
                    tokio::task::yield_now().await;
                }
                named = named_rx.recv() => {
                    if let (Some((id, resolved)), Some(c)) = (named, pipeline.out.cgroups()) {
                        c.answer(id, resolved);
                    }
                    pipeline.write_deferred()?;
                    pipeline.out.flush()?;
                }
                done = done_rx.recv() => match done {
                    Some(Done::Timewait(dump)) => {
                        // First what the kernel sent before the answer
                        // came: a new connection on a dumped-out 4-tuple
                        // must be seen as its reuse, not its early end.
                        pipeline.drain(ring.get_mut())?;
                        // Applied a slice at a time (the branch on
                        // `lifecycle.applying()`).
                        poll_cost = Duration::from_nanos(dump.cpu_ns);
                        lifecycle.begin_apply(dump);
                    }
                    Some(Done::Released(n)) => namespaces_released += n,
                    Some(Done::PortRanges(ranges)) => {
                        for (inum, range) in ranges {
                            pipeline.tracker.set_port_range(inum, range);
                        }
                        pipeline.port_pressure(monotonic_ns())?;
                        pipeline.out.flush()?;
                    }
                    Some(Done::Holders { found, errors, .. }) => {
                        lifecycle.counters.errors += errors;
                        for (conn, holders, queues) in &found {
                            pipeline.stuck(conn, holders, *queues, false)?;
                        }
                        pipeline.out.flush()?;
                    }
                    Some(Done::LiveHolders { found, errors }) => {
                        lifecycle.counters.errors += errors;
                        holders.found(found);
                    }
                    Some(Done::Accepted { found, errors }) => {
                        lifecycle.counters.errors += errors;
                        accepted_asked = false;
                        for (id, conn, owner) in &found {
                            if pipeline.tracker.set_accepted_owner(*id, conn, *owner) {
                                log::debug!(
                                    "accepted {}:{} <- {}:{}: owner {} ({})",
                                    conn.laddr, conn.lport, conn.raddr, conn.rport,
                                    owner.known_pid().map_or_else(|| "-".into(), |p| p.to_string()),
                                    owner.comm.as_str()
                                );
                            }
                        }
                    }
                    None => {}
                },
                _ = async { quit.as_mut().expect("guarded").await }, if quit.is_some() => break,
                guard = async { logger.as_mut().expect("guarded").readable_mut().await }, if logger.is_some() => {
                    let mut guard = guard?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sigusr1.recv() => {
                    if pipeline.observers.summary.is_some() {
                        pipeline.drain(ring.get_mut())?;
                        // Connections that ended just now wait for a
                        // reset (at most RESET_GRACE_NS): the summary
                        // counts them, as the one at exit does.
                        if let Some(at) = pipeline.resets.last_release_ns() {
                            sleep(Duration::from_nanos(at.saturating_sub(monotonic_ns()))).await;
                            pipeline.drain(ring.get_mut())?;
                        }
                        pipeline.out.flush()?;
                        pipeline.write_summary(args.output)?;
                    } else {
                        eprintln!("tracer: SIGUSR1: no summary to print (start tracer with --summary)");
                    }
                }
                _ = &mut deadline => break,
                scrape = endpoint.scrape_requested() => {
                    // Count what the kernel has submitted, then the gauges.
                    pipeline.drain(ring.get_mut())?;
                    pipeline.observers.refresh_metrics(&mut pipeline.tracker, counters.lost().ok());
                    let _ = scrape.send(());
                }
                _ = drain_tick.tick() => {
                    pipeline.drain(ring.get_mut())?;
                    pipeline.write_deferred()?;
                    pipeline.out.flush()?;
                }
                _ = &mut timewait_due => {
                    // Until the answer sets the next one.
                    timewait_due.as_mut().reset(tokio::time::Instant::now() + args.timewait_interval);
                    match lifecycle.timewait_poll(&mut pipeline.tracker) {
                        TimewaitPoll::Nothing => {}
                        TimewaitPoll::Resolved(result) => {
                            pipeline.timewait_polled(result)?;
                            pipeline.out.flush()?;
                        }
                        TimewaitPoll::Ask(query) => {
                            if !worker.send(Job::Timewait(query)) {
                                lifecycle.polling = false;
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = monotonic_ns();
                    pipeline.tracker.expire_old_timewait(now);
                    pipeline.port_pressure(now)?;
                    // Namespaces met since: their ephemeral port ranges.
                    if !pipeline.tracker.ports.wanted.is_empty() {
                        let wanted = std::mem::take(&mut pipeline.tracker.ports.wanted);
                        if let Err(Job::PortRanges(wanted)) = worker.try_send(Job::PortRanges(wanted)) {
                            pipeline.tracker.ports.wanted = wanted;
                        }
                    }
                    if let Some(to_view) = &snapshots {
                        // Fresh numbers: what the kernel has submitted.
                        pipeline.drain(ring.get_mut())?;
                        pipeline.out.flush()?;
                        let (snapshot, ask) = crate::top::feed::snapshot(
                            &mut pipeline, &mut holders, counters.read().ok(), monotonic_ns());
                        if !ask.is_empty() && worker.send(Job::LiveHolders(ask)) {
                            holders.asking = true;
                        }
                        // The view takes one a second; a snapshot it has
                        // not taken yet is as good as this one.
                        let _ = to_view.try_send(snapshot);
                    }
                    if !accepted_asked {
                        let due = pipeline.tracker.due_accepted(
                            now.saturating_sub(ACCEPTED_LOOKUP_AFTER.as_nanos() as u64),
                            MAX_ACCEPTED_LOOKUPS,
                        );
                        // Not asked (worker busy): they keep their
                        // listener's owner until their close names one.
                        accepted_asked = !due.is_empty() && worker.send(Job::Accepted(due));
                    }
                    let due: Vec<Connection> = thresholds
                        .iter()
                        .flat_map(|&(state, t)| lifecycle.due_stuck(&mut pipeline.tracker, state, t))
                        .collect();
                    if !due.is_empty() && !worker.send(Job::Holders { conns: due.clone(), at_exit: false }) {
                        log::debug!("worker busy: stuck connections reported without their holders");
                        for conn in &due {
                            pipeline.stuck(conn, &[], None, false)?;
                        }
                        pipeline.out.flush()?;
                    }
                    let dropped = pipeline.out.dropped();
                    // `tracer top` shows its losses on its status line.
                    if snapshots.is_some() {
                        continue;
                    }
                    if dropped > last_dropped {
                        eprintln!(
                            "tracer: warning: {} records dropped (stdout's reader more than --output-buffer behind, {} in all)",
                            dropped - last_dropped, dropped
                        );
                        last_dropped = dropped;
                    }
                    if let Ok(lost) = counters.lost() {
                        if lost > last_lost {
                            eprintln!(
                                "tracer: warning: {} events lost (ring buffer full, {} in all); \
                                 raise --ringbuf-size or filter",
                                lost - last_lost, lost
                            );
                            last_lost = lost;
                        }
                    }
                }
            }
        }
        // `tracer top`'s view ends now, and gives the terminal back while
        // the agent winds down.
        snapshots.take();
        // No event after this: what the kernel submitted is finite. The
        // skipped runs are read before the programs go.
        counters.freeze();
        drop(programs);
        // Nothing is lost by waiting for stdout's reader from now on: the
        // records written at exit, the summary and the stats record wait
        // for it rather than being dropped, while it takes them.
        pipeline.out.wait_when_full(EXIT_OUTPUT_WAIT);
        while !pipeline.drain(ring.get_mut())? {}
        pipeline.release_all()?;
        // The rest of a poll's answer, if one was being applied (an
        // unbounded step applies all of it).
        if lifecycle.applying() {
            let result = lifecycle.apply_step(&mut pipeline.tracker, usize::MAX);
            pipeline.timewait_polled(result)?;
        }
        // A last timewait poll, so that an active closer whose peer's FIN
        // came since the last one has its TIME_WAIT dated (and its close
        // handshake seen over) before it is written.
        if lifecycle.available && pipeline.tracker.has_timewait() {
            let asked = lifecycle.polling
                || match lifecycle.timewait_poll(&mut pipeline.tracker) {
                    TimewaitPoll::Ask(q) => worker.send(Job::Timewait(q)),
                    _ => false,
                };
            if asked {
                let wait = tokio::time::timeout(EXIT_POLL_WAIT, async {
                    loop {
                        match done_rx.recv().await {
                            Some(Done::Timewait(d)) => return Some(d),
                            Some(_) => continue,
                            None => return None,
                        }
                    }
                });
                if let Ok(Some(dump)) = wait.await {
                    let result = lifecycle.apply_timewait(&mut pipeline.tracker, dump);
                    pipeline.timewait_polled(result)?;
                }
            }
        }
        // The connections still stuck, with their ages and holders.
        let stuck: Vec<Connection> = thresholds
            .iter()
            .flat_map(|&(state, _)| Lifecycle::still_in(&mut pipeline.tracker, state))
            .collect();
        if !stuck.is_empty() {
            let found = if worker.send(Job::Holders { conns: stuck.clone(), at_exit: true }) {
                let wait = tokio::time::timeout(EXIT_HOLDERS_WAIT, async {
                    loop {
                        match done_rx.recv().await {
                            Some(Done::Holders { found, at_exit: true, .. }) => return Some(found),
                            Some(_) => continue,
                            None => return None,
                        }
                    }
                });
                wait.await.ok().flatten()
            } else {
                None
            };
            let found = found.unwrap_or_else(|| {
                log::warn!("the holders of stuck connections could not be listed in time");
                stuck.into_iter().map(|c| (c, Vec::new(), None)).collect()
            });
            for (conn, holders, queues) in &found {
                pipeline.stuck(conn, holders, *queues, true)?;
            }
        }
        // Every connection whose close has begun, as far as it got (an
        // active closer waiting out its TIME_WAIT: `tracing_stopped`); the
        // ones still open are counted.
        pipeline.port_pressure_at_exit(monotonic_ns())?;
        pipeline.tracker.ports.freeze();
        timewait_at_exit = pipeline.tracker.timewait_pending() as u64;
        let (cut, open) = pipeline.tracker.cut_at_exit(monotonic_ns());
        open_at_exit = open;
        for id in cut {
            pipeline.write_connection(id)?;
        }
        // Records still waiting for a cgroup's name: the answers, or the
        // end of their wait.
        let waited = tokio::time::Instant::now();
        while !pipeline.deferred.is_empty() {
            pipeline.write_deferred()?;
            if pipeline.deferred.is_empty() {
                break;
            }
            let left = Duration::from_nanos(crate::track::containers::NAMING_WAIT_NS)
                .saturating_sub(waited.elapsed());
            match tokio::time::timeout(left.max(Duration::from_millis(1)), named_rx.recv()).await {
                Ok(Some((id, resolved))) => {
                    if let Some(c) = pipeline.out.cgroups() {
                        c.answer(id, resolved);
                    }
                }
                _ => {
                    if waited.elapsed() > Duration::from_nanos(crate::track::containers::NAMING_WAIT_NS) {
                        sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        pipeline.write_summary(args.output)?;
        Ok(())
    }
    .await;

    match result {
        // A reader that went away (`tracer | head`) is a normal way to stop.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        other => other.context("writing output")?,
    }
    // The tracker keeps its slots and indexes at their peak size.
    log::info!(
        "tracker: {:.1} MiB in connection slots and indexes at its peak",
        pipeline.tracker.memory_bytes() as f64 / f64::from(1 << 20)
    );
    let kernel = counters.read().context("reading the kernel counters")?;
    let mut stats = pipeline.stats(kernel);
    stats.listeners_full += listeners_unseeded;
    stats.kernel = Some(capabilities);
    stats.timewait_polls = lifecycle.counters.polls;
    stats.timewait_poll_ns = lifecycle.counters.poll_ns;
    stats.diag_errors = lifecycle.counters.errors;
    stats.namespaces_released = namespaces_released;
    stats.open_at_exit = open_at_exit;
    stats.timewait_pending = timewait_at_exit;
    stats.cgroups_unresolved = pipeline.out.cgroups().map_or(0, |c| c.unresolved);
    stats.output_dropped = pipeline.out.dropped();
    if stats.output_dropped > 0 {
        eprintln!(
            "tracer: warning: {} records dropped: stdout's reader fell behind by more than --output-buffer ({} KiB)",
            stats.output_dropped,
            args.output_buffer >> 10
        );
    }
    match pipeline.out.stats(&stats, EXIT_OUTPUT_WAIT) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Ok(false) => {
            eprintln!(
                "tracer: warning: stdout's reader took nothing for {:?}; the last records and the stats record were not written",
                EXIT_OUTPUT_WAIT
            );
            Ok(())
        }
        other => other.map(|_| ()).context("writing output"),
    }
    // Dropping the ring buffer and the probe detaches the program.
}

/// The processes holding the listener that accepted `c` (none for a
/// connection no listener accepted).
fn accepted_by<'a>(tracker: &'a Tracker, c: &Connection) -> Option<&'a [u32]> {
    c.accepted
        .then(|| tracker.listener_pids(c.netns, c.lport))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records of an owner whose cgroup is being named wait for the name,
    /// and every record after them waits too: the output keeps its order.
    #[test]
    fn records_wait_for_their_owners_cgroup_name_in_order() {
        use crate::{
            kernel::events::tests::sample, report::format::EventsMode, report::format::Format,
            track::cgroup::Resolver,
        };
        use std::os::unix::fs::MetadataExt as _;
        let root = std::env::temp_dir().join(format!("tracer-deferred-{}", std::process::id()));
        let dir = root.join("system.slice/app.service");
        std::fs::create_dir_all(&dir).unwrap();
        let id = std::fs::metadata(&dir).unwrap().ino();
        let mut cgroups = Cgroups::new(Resolver::at(&root, &root.join("no-pods")), false);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        cgroups.start(tx).unwrap();
        let mut p = Pipeline {
            tracker: Tracker::new(16),
            out: Output::new(
                Vec::new(),
                Format::Json,
                EventsMode::Transitions,
                WallClock::with_offset_ns(0),
            )
            .with_cgroups(cgroups, false),
            events: 0,
            unreadable: 0,
            unreadable_records: 0,
            observers: Observers::new(None, None),
            resets: Resets::new(false),
            drain_began: None,
            deferred: Default::default(),
        };
        let named = Some(Owner {
            pid: 1,
            cgroup: id,
            ..Default::default()
        });
        let first = Transition {
            mono_ns: 1,
            ..sample()
        };
        let second = Transition {
            mono_ns: 2,
            ..sample()
        };
        p.emit(&first, &named).unwrap();
        p.emit(&second, &None).unwrap();
        p.write_deferred().unwrap();
        assert!(p.out.writer().is_empty(), "both wait for the name");
        let (got, resolved) = rx.blocking_recv().unwrap();
        assert_eq!(got, id);
        p.out.cgroups().unwrap().answer(got, resolved);
        p.write_deferred().unwrap();
        let text = String::from_utf8(p.out.writer().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["cgroup"], "/system.slice/app.service");
        assert_eq!(
            (lines[0]["mono_ns"].as_u64(), lines[1]["mono_ns"].as_u64()),
            (Some(1), Some(2))
        );
        // Later records of the named cgroup are written at once.
        p.emit(&first, &named).unwrap();
        assert!(p.deferred.is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn timewait_polls_stretch_to_stay_within_their_budget() {
        let second = Duration::from_secs(1);
        assert_eq!(timewait_interval(second, Duration::from_millis(2)), second);
        assert_eq!(
            timewait_interval(second, Duration::from_millis(60)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn flush_states_follow_the_stuck_alerts() {
        use clap::Parser as _;
        let bit = |s: TcpState| 1u16 << (s as u8);
        let base = bit(TcpState::Listen) | bit(TcpState::Established);
        let args = Args::parse_from(["tracer"]);
        assert_eq!(flush_states(&args), base | bit(TcpState::CloseWait));
        let args = Args::parse_from(["tracer", "--close-wait", "0", "--fin-wait2", "5s"]);
        assert_eq!(flush_states(&args), base | bit(TcpState::FinWait2));
    }
}
