//! The agent's event loop: drains the ring buffer, feeds the tracker and
//! the output, and stops on Ctrl-C, SIGTERM or `--duration`.

use std::{
    io::{self, BufWriter, Write},
    pin::pin,
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    time::{interval, sleep, MissedTickBehavior},
};

use crate::{
    cli::Args,
    clock::WallClock,
    events::{self, Transition},
    loader::{self, CounterValues, LoadOptions},
    metrics::{Endpoint, Recorder},
    observe::Observers,
    output::{Output, Stats},
    summary::Summary,
    tracker::{Tracker, Update},
};

/// Everything one decoded record goes through, kept apart from the loop so
/// tests and benchmarks can drive it.
pub struct Pipeline<W: Write> {
    pub tracker: Tracker,
    pub out: Output<W>,
    pub events: u64,
    pub unreadable: u64,
    /// Aggregations fed by every transition (--summary, --metrics).
    pub observers: Observers,
}

impl<W: Write> Pipeline<W> {
    pub fn handle(&mut self, bytes: &[u8]) -> io::Result<()> {
        let t = match events::decode(bytes) {
            Ok(t) => t,
            Err(e) => {
                self.unreadable += 1;
                if self.unreadable == 1 {
                    log::warn!("unreadable record ({e}); counted in the stats");
                }
                return Ok(());
            }
        };
        self.events += 1;
        self.on_transition(&t)
    }

    /// Everything a decoded transition goes through; `tracer summarize`
    /// replays recorded transitions through it too.
    pub fn on_transition(&mut self, t: &Transition) -> io::Result<()> {
        self.out.transition(t)?;
        let update = self.tracker.on_transition(t);
        self.observers.transition(t, &self.tracker, &update);
        if let Update::Closed(conn) = update {
            self.out.connection(&conn)?;
        }
        Ok(())
    }

    /// The summary so far, on the output (--summary; on SIGUSR1 and at exit).
    pub fn write_summary(&mut self, format: crate::cli::Format) -> io::Result<()> {
        if let Some(s) = &self.observers.summary {
            s.write(self.out.writer(), format)?;
            self.out.flush()?;
        }
        Ok(())
    }

    /// Reads every record the ring buffer holds now.
    pub fn drain(&mut self, ring: &mut RingBuf<MapData>) -> io::Result<()> {
        while let Some(item) = ring.next() {
            self.handle(&item)?;
        }
        Ok(())
    }

    pub fn stats(&self, kernel: CounterValues) -> Stats {
        Stats {
            events: self.events,
            lost: kernel.ringbuf_full,
            seen: kernel.seen,
            filtered: kernel.filtered,
            unreadable: self.unreadable,
            timing_map_full: kernel.timing_update_failed,
            timing_stale: kernel.timing_stale,
            untracked: self.tracker.untracked,
            gaps: self.tracker.gaps,
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    // Before "attached" is logged: a signal sent once it is must be handled.
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    // Even without --summary, so that a stray SIGUSR1 never kills it.
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    // Before loading: a busy port fails fast, with nothing to undo.
    let metrics = Recorder::from_args(&args.metrics);
    let mut endpoint = match (&metrics, args.metrics.metrics) {
        (Some(m), Some(addr)) => Endpoint::start(addr, m.registry().clone()).await?,
        _ => Endpoint::disabled(),
    };
    let opts = LoadOptions {
        family: args.family(),
        ports: args.ports.clone(),
        max_sockets: args.max_sockets,
        ringbuf_bytes: args.ringbuf_size,
    };
    let probe = loader::load(&opts)?;
    log::info!(
        "attached to sock:inet_sock_set_state; ring buffer {} KiB, {} sockets timed at most",
        args.ringbuf_size >> 10,
        args.max_sockets
    );
    if let Some(addr) = endpoint.local_addr {
        log::info!("serving Prometheus metrics at http://{addr}/metrics");
    }
    let counters = probe.counters;
    let mut pipeline = Pipeline {
        tracker: Tracker::new(args.max_sockets as usize),
        out: Output::new(
            BufWriter::with_capacity(64 << 10, io::stdout()),
            args.output,
            args.events,
            WallClock::now(),
        ),
        events: 0,
        unreadable: 0,
        observers: Observers {
            summary: Summary::from_args(&args.summary),
            metrics,
        },
    };
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
    let mut tick = interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_lost = 0;

    let result: io::Result<()> = async {
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    pipeline.drain(guard.get_inner_mut())?;
                    guard.clear_ready();
                    pipeline.out.flush()?;
                }
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
                    pipeline.observers.refresh_metrics(&pipeline.tracker, counters.read().ok());
                    let _ = scrape.send(());
                }
                _ = tick.tick() => {
                    pipeline.out.flush()?;
                    if let Ok(c) = counters.read() {
                        if c.ringbuf_full > last_lost {
                            eprintln!(
                                "tracer: warning: {} events lost (ring buffer full, {} in all); \
                                 raise --ringbuf-size or filter",
                                c.ringbuf_full - last_lost, c.ringbuf_full
                            );
                            last_lost = c.ringbuf_full;
                        }
                    }
                }
            }
        }
        // What the kernel submitted before we stopped.
        pipeline.drain(ring.get_mut())?;
        pipeline.write_summary(args.output)?;
        Ok(())
    }
    .await;

    match result {
        // A reader that went away (`tracer | head`) is a normal way to stop.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        other => other.context("writing output")?,
    }
    let kernel = counters.read().context("reading the kernel counters")?;
    let stats = pipeline.stats(kernel);
    match pipeline.out.stats(&stats) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing output"),
    }
    // Dropping the ring buffer and the probe detaches the program.
}
