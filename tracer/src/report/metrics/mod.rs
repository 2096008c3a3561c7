//! Prometheus export (`--metrics ADDR`): the text exposition format
//! (0.0.4) at `http://ADDR/metrics`, served by hyper while the tracer runs.
//!
//! Every metric has bounded cardinality: labels are TCP states, address
//! families and, opt-in (`--metrics-label`), one of lport/rport/comm with
//! at most `--metrics-label-max` distinct values (later ones are `other`).
//!
//! - Counters and the histogram are updated per transition by
//!   [`Recorder::transition`]: atomic adds on series created once, so no
//!   allocation per event.
//! - Gauges (sockets per state, CLOSE_WAIT stuck) and the lost-events
//!   counter are computed from the tracker and the kernel counters when a
//!   scrape arrives: the HTTP side asks the event loop through
//!   [`Endpoint::scrape_requested`] and waits for [`Recorder::refresh`].

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::ValueEnum;
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, Semaphore},
};

use crate::{
    kernel::events::{Family, TcpState, Transition},
    kernel::reset_reasons::ResetReasons,
    report::group::{BoundedKeys, GroupBy, NamedOwner, Slot},
    report::summary::stay,
    track::close::{CloseBy, Rst},
    track::tracker::Tracker,
};

/// Prefix of every metric name.
pub const PREFIX: &str = "tracer_tcp";

/// A connection in CLOSE_WAIT for longer than `--close-wait` counts in
/// `tracer_tcp_close_wait_stuck` (its application has not closed its
/// end); this long when `--close-wait 0` turns the alerts off.
pub const CLOSE_WAIT_STUCK_AFTER: Duration = Duration::from_secs(30);

/// Buckets of `tracer_tcp_state_duration_seconds`: 1-2-5 steps from 10 µs
/// to 500 s, then 10 min.
pub const DURATION_BUCKETS: [f64; 25] = [
    10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 0.1, 0.2,
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 600.0,
];

const FAMILIES: usize = 2;
const PER_SLOT: usize = TcpState::COUNT * TcpState::COUNT * FAMILIES;

/// Destinations with ephemeral-port series when `--metrics-label-max`
/// is not given (its default).
const DEFAULT_PORTS_MAX: usize = 20;

/// Scrapes served at once; more connections wait in the listen queue.
const MAX_CONNECTIONS: usize = 32;
/// How long a scrape waits for the event loop's refresh.
const REFRESH_WAIT: Duration = Duration::from_secs(2);

/// `--metrics`, `--metrics-label`, `--metrics-label-max`.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics while tracing. ADDR
    /// is PORT (on 127.0.0.1), IP:PORT or [IPv6]:PORT; use 0.0.0.0:PORT to
    /// be scraped from other hosts.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen_addr)]
    pub metrics: Option<SocketAddr>,

    /// Add this label to the transition and duration metrics (opt-in:
    /// multiplies their series by up to --metrics-label-max).
    #[arg(long, value_enum, value_name = "FIELD", requires = "metrics")]
    pub metrics_label: Option<MetricsLabel>,

    /// With --metrics-label: distinct values kept (first seen first);
    /// later values are labelled "other". Also the destinations with
    /// ephemeral-port series (the top N by ports in use).
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=1000), requires = "metrics")]
    pub metrics_label_max: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricsLabel {
    /// Local port.
    Lport,
    /// Remote port.
    Rport,
    /// Owner's command name.
    Comm,
    /// Owner's container (`docker:0123456789ab`; `none` outside one).
    Container,
}

impl MetricsLabel {
    fn group_by(self) -> GroupBy {
        match self {
            MetricsLabel::Lport => GroupBy::Lport,
            MetricsLabel::Rport => GroupBy::Rport,
            MetricsLabel::Comm => GroupBy::Comm,
            MetricsLabel::Container => GroupBy::Container,
        }
    }
}

/// `9975` (loopback), `127.0.0.1:9975`, `0.0.0.0:9975`, `[::1]:9975`.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("`{s}` is not an address to listen on (examples: 9975, 127.0.0.1:9975, [::1]:9975)")
    })
}

struct Label {
    by: GroupBy,
    keys: BoundedKeys,
    /// Label value per slot; the last slot is "other".
    values: Vec<String>,
}

/// The metrics and the per-event handles into them.
pub struct Recorder {
    registry: Registry,
    transitions: IntCounterVec,
    durations: HistogramVec,
    connections: IntGaugeVec,
    close_wait_stuck: IntGauge,
    events_lost: IntCounter,
    /// `resets_total`, once the reset tracepoints are attached.
    resets: Option<IntCounterVec>,
    /// Names the `reason` label where sent resets carry one.
    reset_reasons: ResetReasons,
    /// `closes_total` per class, in `CloseBy::ALL` order.
    close_cells: Vec<IntCounter>,
    label: Option<Label>,
    /// Series created so far: [slot][old][new][family] and [slot][state].
    transition_cells: Vec<Option<IntCounter>>,
    duration_cells: Vec<Option<Histogram>>,
    /// States with a `connections` series.
    gauge_states: [bool; TcpState::COUNT],
    close_wait_stuck_ns: u64,
    /// Ephemeral ports per destination: series for the top
    /// `ports_max` destinations only (see `track/ports.rs`).
    ports_in_use: IntGaugeVec,
    ports_time_wait: IntGaugeVec,
    ports_max: usize,
}

/// The `reason` of received resets: the peer's reasons are not known.
const NO_REASON: &str = "none";

fn name(n: &str) -> String {
    format!("{PREFIX}_{n}")
}

impl Recorder {
    /// `close_wait`: the `--close-wait` threshold (0: the default).
    pub fn from_args(a: &MetricsArgs, close_wait: Duration) -> Option<Self> {
        a.metrics.map(|_| {
            let mut r = Recorder::new(
                a.metrics_label
                    .map(|l| (l.group_by(), a.metrics_label_max as usize)),
            );
            r.ports_max = a.metrics_label_max as usize;
            if !close_wait.is_zero() {
                r.close_wait_stuck_ns = close_wait.as_nanos() as u64;
            }
            r
        })
    }

    /// `label`: the opt-in label and its cap on distinct values.
    pub fn new(label: Option<(GroupBy, usize)>) -> Self {
        let mut labels = vec!["old", "new", "family"];
        if let Some((by, _)) = label {
            labels.push(by.name());
        }
        let transitions = IntCounterVec::new(
            Opts::new(
                name("transitions_total"),
                "TCP state transitions the tracer saw (after its filters), by old state, new state and address family.",
            ),
            &labels,
        )
        .expect("valid metric");
        let mut dlabels = vec!["state"];
        if let Some((by, _)) = label {
            dlabels.push(by.name());
        }
        let durations = HistogramVec::new(
            HistogramOpts::new(
                name("state_duration_seconds"),
                "Time sockets spent in a TCP state, observed when they leave it (stays the kernel timed).",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &dlabels,
        )
        .expect("valid metric");
        let connections = IntGaugeVec::new(
            Opts::new(
                name("connections"),
                "Connections the tracer follows, by current TCP state (listening sockets are not connections).",
            ),
            &["state"],
        )
        .expect("valid metric");
        let close_wait_stuck = IntGauge::new(
            name("close_wait_stuck"),
            "Connections in CLOSE_WAIT for longer than --close-wait (default 30 s): the peer closed, the application has not.",
        )
        .expect("valid metric");
        let events_lost = IntCounter::new(
            name("events_lost_total"),
            "Transitions the kernel could not deliver to the tracer (ring buffer full).",
        )
        .expect("valid metric");
        let closes = IntCounterVec::new(
            Opts::new(
                name("closes_total"),
                "Connections that ended, by how they closed: local, peer or both (who sent the first FIN of a finished handshake), reset_received, reset_sent, abort, refused, timeout, unknown.",
            ),
            &["by"],
        )
        .expect("valid metric");
        let dest_labels = ["netns", "laddr", "raddr", "rport"];
        let ports_in_use = IntGaugeVec::new(
            Opts::new(
                name("ephemeral_ports_in_use"),
                "Local ports of the namespace's ephemeral range held by connections toward a destination (netns, local address, remote address and port), in any state; the top --metrics-label-max destinations.",
            ),
            &dest_labels,
        )
        .expect("valid metric");
        let ports_time_wait = IntGaugeVec::new(
            Opts::new(
                name("ephemeral_ports_time_wait"),
                "Of tracer_tcp_ephemeral_ports_in_use, the ports held by timewait sockets.",
            ),
            &dest_labels,
        )
        .expect("valid metric");
        let close_cells = CloseBy::ALL
            .iter()
            .map(|b| closes.with_label_values(&[b.name()]))
            .collect();
        let registry = Registry::new();
        for c in [
            Box::new(closes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(transitions.clone()),
            Box::new(durations.clone()),
            Box::new(connections.clone()),
            Box::new(close_wait_stuck.clone()),
            Box::new(events_lost.clone()),
            Box::new(ports_in_use.clone()),
            Box::new(ports_time_wait.clone()),
        ] {
            registry.register(c).expect("distinct metric names");
        }
        let slots = label.map_or(1, |(_, cap)| cap + 1);
        let mut gauge_states = [false; TcpState::COUNT];
        // Series that always exist (0 when empty): the states connections
        // stay in; others appear once a connection is seen in them.
        for s in TcpState::of_connections().filter(|&s| s != TcpState::Close) {
            connections.with_label_values(&[s.name()]).set(0);
            gauge_states[s.index()] = true;
        }
        Recorder {
            registry,
            transitions,
            durations,
            connections,
            close_wait_stuck,
            events_lost,
            resets: None,
            reset_reasons: ResetReasons::default(),
            close_cells,
            label: label.map(|(by, cap)| Label {
                by,
                keys: BoundedKeys::new(cap),
                values: (0..=cap)
                    .map(|i| {
                        if i == cap {
                            "other".into()
                        } else {
                            String::new()
                        }
                    })
                    .collect(),
            }),
            transition_cells: vec![None; slots * PER_SLOT],
            duration_cells: vec![None; slots * TcpState::COUNT],
            gauge_states,
            close_wait_stuck_ns: CLOSE_WAIT_STUCK_AFTER.as_nanos() as u64,
            ports_in_use,
            ports_time_wait,
            ports_max: DEFAULT_PORTS_MAX,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The kernel's reset tracepoints are attached: export the reset
    /// counters from the start (at 0), with a `reason` label where sent
    /// resets carry one (`reasons.carried`: 6.10+).
    pub fn enable_resets(&mut self, reasons: ResetReasons) {
        let mut labels = vec!["direction"];
        if reasons.carried {
            labels.push("reason");
        }
        let resets = IntCounterVec::new(
            Opts::new(
                name("resets_total"),
                "TCP resets of the connections that ended, by direction (sent, received) and, where the kernel gives it (6.10+), the reason of a sent one (the kernel's enum sk_rst_reason without its SK_RST_REASON_ prefix; other: a value the kernel's BTF does not name; none: received); absent when the kernel's reset tracepoints are not attached.",
            ),
            &labels,
        )
        .expect("valid metric");
        self.registry
            .register(Box::new(resets.clone()))
            .expect("distinct metric names");
        if reasons.carried {
            resets.with_label_values(&["received", NO_REASON]);
        } else {
            for d in ["sent", "received"] {
                resets.with_label_values(&[d]);
            }
        }
        self.resets = Some(resets);
        self.reset_reasons = reasons;
    }

    /// A connection ended as `by`, with its resets where known.
    pub fn closed(&mut self, by: CloseBy, rst: Option<Rst>) {
        if let Some(i) = CloseBy::ALL.iter().position(|&b| b == by) {
            self.close_cells[i].inc();
        }
        let (Some(r), Some(resets)) = (rst, &self.resets) else {
            return;
        };
        if !self.reset_reasons.carried {
            if r.sent > 0 {
                resets
                    .with_label_values(&["sent"])
                    .inc_by(u64::from(r.sent));
            }
            if r.received > 0 {
                resets
                    .with_label_values(&["received"])
                    .inc_by(u64::from(r.received));
            }
            return;
        }
        let mut named = 0u64;
        for (reason, n) in r.reasons.iter() {
            let label = self.reset_reasons.label(reason);
            resets
                .with_label_values(&["sent", label])
                .inc_by(u64::from(n));
            named += u64::from(n);
        }
        // Reasons past the connection's few, or counts past u16.
        let rest = u64::from(r.sent).saturating_sub(named);
        if rest > 0 {
            resets.with_label_values(&["sent", "other"]).inc_by(rest);
        }
        if r.received > 0 {
            resets
                .with_label_values(&["received", NO_REASON])
                .inc_by(u64::from(r.received));
        }
    }

    /// Counts transition `t` and observes the stay it ended; `owner` is its
    /// socket's, as the output names it.
    pub fn transition(&mut self, t: &Transition, owner: Option<&NamedOwner>) {
        let slot = self.slot(t.lport, t.rport, t.raddr, owner);
        let fam = match t.family {
            Family::Ipv4 => 0,
            Family::Ipv6 => 1,
        };
        let i =
            slot * PER_SLOT + (t.old.index() * TcpState::COUNT + t.new.index()) * FAMILIES + fam;
        let label = self.label.as_ref().map(|l| l.values[slot].as_str());
        self.transition_cells[i]
            .get_or_insert_with(|| {
                let mut v = vec![t.old.name(), t.new.name(), t.family.name()];
                v.extend(label);
                self.transitions.with_label_values(&v)
            })
            .inc();
        if let Some((state, ns)) = stay(t) {
            self.observe(slot, state, ns);
        }
    }

    /// A stay that no transition ended (see `observe.rs`).
    pub fn stay(
        &mut self,
        state: TcpState,
        ns: u64,
        lport: u16,
        rport: u16,
        owner: Option<&NamedOwner>,
    ) {
        let unspecified = IpAddr::from([0u8; 4]);
        let slot = self.slot(lport, rport, unspecified, owner);
        self.observe(slot, state, ns);
    }

    fn observe(&mut self, slot: usize, state: TcpState, ns: u64) {
        let label = self.label.as_ref().map(|l| l.values[slot].as_str());
        self.duration_cells[slot * TcpState::COUNT + state.index()]
            .get_or_insert_with(|| {
                let mut v = vec![state.name()];
                v.extend(label);
                self.durations.with_label_values(&v)
            })
            .observe(ns as f64 / 1e9);
    }

    /// The series slot of the opt-in label's value (0 without one).
    fn slot(&mut self, lport: u16, rport: u16, raddr: IpAddr, owner: Option<&NamedOwner>) -> usize {
        match &mut self.label {
            None => 0,
            Some(l) => {
                let key = l.by.key_of(lport, rport, raddr, owner);
                match l.keys.slot(key) {
                    Slot::Known(i) => i,
                    Slot::New(i) => {
                        l.values[i] = key.to_string();
                        i
                    }
                    Slot::Other => l.keys.cap(),
                }
            }
        }
    }

    /// Brings the gauges and the lost-events counter up to date:
    /// connections per state from the tracker (those still in their
    /// timewait included), CLOSE_WAIT stuck as of `now_ns`
    /// (CLOCK_MONOTONIC), `lost` from the kernel's counter.
    pub fn refresh(&mut self, tracker: &mut Tracker, lost: Option<u64>, now_ns: u64) {
        let per_state = tracker.count_by_state();
        let stuck_ns = self.close_wait_stuck_ns;
        let stuck = tracker
            .in_state_mut(TcpState::CloseWait)
            .filter(|(_, c)| now_ns.saturating_sub(c.state_since_ns) > stuck_ns)
            .count() as i64;
        for s in TcpState::ALL {
            let i = s.index();
            if s == TcpState::Close || (per_state[i] == 0 && !self.gauge_states[i]) {
                continue;
            }
            self.gauge_states[i] = true;
            self.connections
                .with_label_values(&[s.name()])
                .set(per_state[i] as i64);
        }
        self.close_wait_stuck.set(stuck);
        // The series of the top destinations now, no others: the
        // cardinality stays bounded.
        self.ports_in_use.reset();
        self.ports_time_wait.reset();
        for p in tracker.ports.top(self.ports_max) {
            let netns = p.dest.netns.to_string();
            let laddr = p.dest.laddr.to_string();
            let raddr = p.dest.raddr.to_string();
            let rport = p.dest.rport.to_string();
            let labels = [netns.as_str(), &laddr, &raddr, &rport];
            self.ports_in_use
                .with_label_values(&labels)
                .set(p.in_use.into());
            self.ports_time_wait
                .with_label_values(&labels)
                .set(p.time_wait.into());
        }
        if let Some(lost) = lost {
            let now = self.events_lost.get();
            if lost > now {
                self.events_lost.inc_by(lost - now);
            }
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

fn encode(registry: &Registry) -> String {
    let mut buf = Vec::with_capacity(16 << 10);
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("encoding to memory cannot fail");
    String::from_utf8(buf).expect("the text format is UTF-8")
}

/// A scrape waiting for the event loop: answer once the gauges are fresh.
pub type ScrapeRequest = oneshot::Sender<()>;

/// The HTTP side as the event loop sees it.
pub struct Endpoint {
    requests: Option<mpsc::Receiver<ScrapeRequest>>,
    pub local_addr: Option<SocketAddr>,
}

impl Endpoint {
    /// No `--metrics`: never asks for anything.
    pub fn disabled() -> Self {
        Endpoint {
            requests: None,
            local_addr: None,
        }
    }

    /// Listens on `addr` and serves `registry` at `/metrics` from a task of
    /// the current runtime, until the runtime stops.
    pub async fn start(addr: SocketAddr, registry: Registry) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for --metrics"))?;
        let local_addr = listener.local_addr().ok();
        let (tx, rx) = mpsc::channel(MAX_CONNECTIONS);
        tokio::spawn(accept_loop(listener, registry, tx));
        Ok(Endpoint {
            requests: Some(rx),
            local_addr,
        })
    }

    /// The next scrape that wants fresh gauges; pending for ever when
    /// disabled.
    pub async fn scrape_requested(&mut self) -> ScrapeRequest {
        match &mut self.requests {
            Some(rx) => match rx.recv().await {
                Some(r) => r,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

async fn accept_loop(listener: TcpListener, registry: Registry, tx: mpsc::Sender<ScrapeRequest>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, retry.
                log::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                let tx = tx.clone();
                async move { Ok::<_, Infallible>(respond(req, &registry, &tx).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                log::debug!("metrics endpoint: {e}");
            }
            drop(permit);
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    registry: &Registry,
    tx: &mpsc::Sender<ScrapeRequest>,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("valid response")
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let (done, refreshed) = oneshot::channel();
            // If the event loop is gone or slow, serve what there is.
            if tx.send(done).await.is_ok() {
                let _ = tokio::time::timeout(REFRESH_WAIT, refreshed).await;
            }
            Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .body(Full::new(Bytes::from(encode(registry))))
                .expect("valid response")
        }
        (&Method::GET | &Method::HEAD, "/") => text(
            StatusCode::OK,
            "tracer: Prometheus metrics are at /metrics\n",
        ),
        (_, "/metrics" | "/") => text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        ),
    }
}

#[cfg(test)]
mod tests;
