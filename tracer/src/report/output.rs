//! Writes records to stdout as a table or as JSON Lines.
//!
//! Output is buffered and flushed after each batch of events the agent
//! drains, not per line.

use std::{
    borrow::Cow,
    io::{self, Write},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    clock::WallClock,
    kernel::events::{Source, TcpState, Transition},
    report::format::{EventsMode, Format},
    track::close::{Close, FirstFin, Rst},
    track::containers::{CgroupJson, Cgroups},
    track::procfs::Holder,
    track::tracker::{Connection, Owner},
};

/// Counters reported when the agent stops.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Transitions delivered to the agent and decoded.
    pub events: u64,
    /// Transitions the kernel could not deliver (ring buffer full).
    pub lost: u64,
    /// TCP transitions the kernel program saw (before filters).
    pub seen: u64,
    /// Transitions dropped by the in-kernel filters, by request.
    pub filtered: u64,
    /// Records the agent could not decode.
    pub unreadable: u64,
    /// Per-socket timing entries the kernel could not store.
    pub timing_map_full: u64,
    /// Transitions whose old-state timing was missing or stale.
    pub timing_stale: u64,
    /// Transitions of sockets the agent had no room to track.
    pub untracked: u64,
    /// Connections closed with a transition missing in between.
    pub gaps: u64,
    /// Listening sockets the owner filter could not remember (table full).
    pub listeners_full: u64,
    /// Dying timewait sockets the fentry program could not read.
    pub timewait_unreadable: u64,
    /// Transitions the kernel skipped because the program was already
    /// running on that CPU (the programs' `recursion_misses`): lost.
    pub skipped: u64,
    /// Transitions still waiting in their socket's batch in the kernel at
    /// exit (connections mid-way through a handshake; see the README).
    pub pending: u64,
    /// Resets sent for segments no socket matched (e.g. a SYN to a closed
    /// port): counted in the kernel, joined to nothing.
    pub resets_no_socket: u64,
    /// Resets of sockets never joined to a reported connection (filtered
    /// out, untracked, or never closed while the tracer ran).
    pub resets_unmatched: u64,
    /// Records whose owner's cgroup id could not be named (`cgroup`
    /// null): the cgroup and its process were gone before the agent
    /// named them.
    pub cgroups_unresolved: u64,
    /// Timewait dumps (NETLINK_SOCK_DIAG) made, and their total cost.
    pub timewait_polls: u64,
    pub timewait_poll_ns: u64,
    /// Timewait dumps or look-ups that failed.
    pub diag_errors: u64,
    /// Actively closed connections still in their timewait socket at exit
    /// (no connection record was printed for them).
    pub timewait_pending: u64,
    /// What the kernel offers, as probed at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<crate::kernel::features::Capabilities>,
}

pub struct Output<W: Write> {
    out: W,
    format: Format,
    events: EventsMode,
    clock: WallClock,
    header_done: bool,
    /// Names the owners' cgroups (`cgroup`, `container`, `pod`); without
    /// it those fields are null.
    cgroups: Option<Cgroups>,
    /// `-w`: a CGROUP column in tables.
    wide: bool,
}

/// A `Display` value written straight into the JSON string (serde's
/// `collect_str`): no `String` per field per event.
struct Text<T>(T);

impl<T: std::fmt::Display> Serialize for Text<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A socket address as `0x…`.
struct Hex(u64);

impl std::fmt::Display for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

type Time = Text<humantime::Rfc3339Timestamp>;

/// Owner fields, `null` when the owner is unknown.
#[derive(Serialize)]
struct OwnerJson<'a> {
    pid: Option<u32>,
    comm: Option<Cow<'a, str>>,
    uid: Option<u32>,
}

fn owner_json(o: &Option<Owner>) -> OwnerJson<'_> {
    OwnerJson {
        pid: o.as_ref().map(|o| o.pid),
        comm: o.as_ref().map(|o| o.comm.as_str()),
        uid: o.as_ref().map(|o| o.uid),
    }
}

#[derive(Serialize)]
struct TransitionJson<'a> {
    r#type: &'static str,
    time: Time,
    mono_ns: u64,
    sock: Option<Text<Hex>>,
    #[serde(flatten)]
    owner: OwnerJson<'a>,
    #[serde(flatten)]
    cgroup: CgroupJson,
    /// The task current when the tracepoint fired (often not the owner:
    /// softirq work runs on whatever task was interrupted).
    task_pid: Option<u32>,
    task_tid: Option<u32>,
    task_comm: Option<Cow<'a, str>>,
    family: &'static str,
    laddr: IpAddr,
    lport: u16,
    raddr: IpAddr,
    rport: u16,
    old: &'static str,
    new: &'static str,
    old_state_ns: Option<u64>,
    netns: Option<u32>,
    source: &'static str,
}

/// Fields every connection-level record shares.
#[derive(Serialize)]
struct ConnFields<'a> {
    sock: Option<Text<Hex>>,
    #[serde(flatten)]
    owner: OwnerJson<'a>,
    #[serde(flatten)]
    cgroup: CgroupJson,
    family: &'static str,
    laddr: IpAddr,
    lport: u16,
    raddr: IpAddr,
    rport: u16,
    netns: Option<u32>,
    /// When the tracer first saw it (the start-up snapshot for sockets
    /// that existed before it).
    first_seen: Time,
    complete: bool,
    from_snapshot: bool,
}

#[derive(Serialize)]
struct ConnectionJson<'a> {
    r#type: &'static str,
    #[serde(flatten)]
    conn: ConnFields<'a>,
    start: Time,
    end: Time,
    duration_ns: u64,
    states: StatesJson<'a>,
    /// How the timewait part of an actively closed connection ended; null
    /// for connections that did not close actively.
    time_wait_end: Option<&'static str>,
    close: CloseJson<'a>,
}

/// How a connection closed (see `close.rs`).
#[derive(Serialize)]
struct CloseJson<'a> {
    by: &'static str,
    first_fin: Option<FirstFin>,
    fin_to_close_ns: Option<u64>,
    handshake: Vec<String>,
    /// Time of each handshake step since the first, ns.
    handshake_at_ns: Vec<u64>,
    rst: Option<&'a Rst>,
}

impl<'a> CloseJson<'a> {
    fn new(c: &'a Close) -> Self {
        CloseJson {
            by: c.by.name(),
            first_fin: c.first_fin,
            fin_to_close_ns: c.fin_to_close_ns,
            handshake: c
                .handshake
                .iter()
                .map(|s| format!("{}>{}", s.old.name(), s.new.name()))
                .collect(),
            handshake_at_ns: (0..c.handshake.len()).map(|i| c.at_ns(i)).collect(),
            rst: c.rst.as_ref(),
        }
    }
}

/// The close handshake for people: `local FIN  FIN_WAIT1 40.0µs > FIN_WAIT2
/// 4.40ms > TIME_WAIT 60.0s (expired)`: who closed, then each state the
/// close went through with the time spent in it.
pub fn close_summary(c: &Close, time_wait_end: Option<&str>) -> String {
    use crate::{kernel::events::TcpState, report::summary::duration, track::close::CloseBy};
    let mut s = match c.by {
        CloseBy::Local | CloseBy::Peer | CloseBy::Both => format!("{} FIN ", c.by.name()),
        other => format!("{} ", other.name()),
    };
    let steps = &c.handshake;
    let clean = matches!(c.by, CloseBy::Local | CloseBy::Peer | CloseBy::Both);
    if let (false, Some(first)) = (clean, steps.first()) {
        s.push(' ');
        s.push_str(first.old.name());
        s.push_str(" >");
    }
    for (i, step) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        // A clean close's final CLOSE is implied.
        if last && clean && step.new == TcpState::Close {
            break;
        }
        s.push(' ');
        s.push_str(step.new.name());
        if let Some(next) = steps.get(i + 1) {
            s.push(' ');
            s.push_str(&duration(next.at_ns.saturating_sub(step.at_ns)));
        }
        if step.new == TcpState::TimeWait {
            if let Some(end) = time_wait_end {
                s.push_str(&format!(" ({end})"));
            }
        }
        if !last {
            s.push_str(" >");
        }
    }
    if s.ends_with(" >") {
        s.truncate(s.len() - 2);
    }
    if let Some(r) = c.rst {
        if r.sent > 0 {
            s.push_str(&format!("  RST sent{}", count_suffix(r.sent)));
        }
        if r.received > 0 {
            s.push_str(&format!("  RST received{}", count_suffix(r.received)));
        }
    }
    s
}

fn count_suffix(n: u32) -> String {
    if n > 1 {
        format!(" x{n}")
    } else {
        String::new()
    }
}

/// A connection stuck in a state (`close_wait`, or `stuck` for others).
#[derive(Serialize)]
struct StuckJson<'a> {
    r#type: &'static str,
    #[serde(flatten)]
    conn: ConnFields<'a>,
    state: &'static str,
    since: Time,
    age_ns: u64,
    owners: &'a [Holder],
    /// Listed when the tracer stopped rather than when it passed the
    /// threshold.
    at_exit: bool,
    /// The close so far (`by`: `unfinished`).
    close: CloseJson<'a>,
}

/// A connection's per-state times as a JSON object, in life order.
struct StatesJson<'a>(&'a Connection);

impl Serialize for StatesJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (state, ns) in self.0.states() {
            map.serialize_entry(state.name(), &ns)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct StatsJson<'a> {
    r#type: &'static str,
    #[serde(flatten)]
    stats: &'a Stats,
}

const CLOSES_HEADER: &str = "TIME(UTC)        PID     COMM             LADDR:LPORT                 RADDR:RPORT                 CLOSE";

const TABLE_HEADER: &str = "TIME(UTC)        PID     COMM             LADDR:LPORT                 RADDR:RPORT                 TRANSITION                   MS";

fn sock_hex(sock: u64) -> Option<Text<Hex>> {
    (sock != 0).then_some(Text(Hex(sock)))
}

fn owner_cells(o: &Option<Owner>) -> (String, String) {
    match o {
        Some(o) => (o.pid.to_string(), o.comm.as_str().into_owned()),
        None => ("-".into(), "-".into()),
    }
}

impl<W: Write> Output<W> {
    pub fn new(out: W, format: Format, events: EventsMode, clock: WallClock) -> Self {
        Output {
            out,
            format,
            events,
            clock,
            header_done: false,
            cgroups: None,
            wide: false,
        }
    }

    /// Names owners' cgroups with `cgroups`; `wide` adds the table column.
    pub fn with_cgroups(mut self, cgroups: Cgroups, wide: bool) -> Self {
        self.cgroups = Some(cgroups);
        self.wide = wide;
        self
    }

    pub fn cgroups(&mut self) -> Option<&mut Cgroups> {
        self.cgroups.as_mut()
    }

    fn cgroup_json(&mut self, owner: &Option<Owner>) -> CgroupJson {
        self.cgroups
            .as_mut()
            .map_or_else(CgroupJson::default, |c| c.json(owner))
    }

    /// PID and COMM cells; with `-w` the COMM cell carries the CGROUP
    /// column after it.
    fn owner_cells(&mut self, o: &Option<Owner>) -> (String, String) {
        let (pid, comm) = owner_cells(o);
        if !self.wide {
            return (pid, comm);
        }
        let cell = self
            .cgroups
            .as_mut()
            .map_or_else(|| "-".into(), |c| c.cell(o));
        (pid, format!("{comm:<16} {cell:<24}"))
    }

    /// A table header, with the CGROUP column under `-w`.
    fn header(&self, header: &str) -> String {
        if self.wide {
            header.replacen(
                "COMM             ",
                "COMM             CGROUP                   ",
                1,
            )
        } else {
            header.to_string()
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    /// The underlying writer, for records written elsewhere (summaries).
    pub fn writer(&mut self) -> &mut W {
        &mut self.out
    }

    fn conn_fields<'a>(&mut self, c: &'a Connection) -> ConnFields<'a> {
        ConnFields {
            sock: sock_hex(c.sock),
            owner: owner_json(&c.owner),
            cgroup: self.cgroup_json(&c.owner),
            family: c.family.name(),
            laddr: c.laddr,
            lport: c.lport,
            raddr: c.raddr,
            rport: c.rport,
            netns: (c.netns != 0).then_some(c.netns),
            first_seen: self.time(c.first_seen_ns),
            complete: c.complete,
            from_snapshot: c.from_snapshot,
        }
    }

    fn json_line(&mut self, rec: &impl Serialize) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, rec)?;
        self.out.write_all(b"\n")
    }

    /// A transition, with the socket's owner as the tracker knows it.
    pub fn transition(&mut self, t: &Transition, owner: &Option<Owner>) -> io::Result<()> {
        if !self.events.transitions() {
            return Ok(());
        }
        let from_kernel = t.source == Source::Tracepoint;
        match self.format {
            Format::Json => {
                let rec = TransitionJson {
                    r#type: "transition",
                    time: self.time(t.mono_ns),
                    mono_ns: t.mono_ns,
                    sock: sock_hex(t.sock),
                    owner: owner_json(owner),
                    cgroup: self.cgroup_json(owner),
                    task_pid: from_kernel.then_some(t.pid),
                    task_tid: from_kernel.then_some(t.tid),
                    task_comm: from_kernel.then(|| t.comm.as_str()),
                    family: t.family.name(),
                    laddr: t.laddr,
                    lport: t.lport,
                    raddr: t.raddr,
                    rport: t.rport,
                    old: t.old.name(),
                    new: t.new.name(),
                    old_state_ns: t.old_state_ns,
                    netns: (t.netns != 0).then_some(t.netns),
                    source: t.source.name(),
                };
                self.json_line(&rec)
            }
            Format::Table => {
                if !self.header_done {
                    let header = self.header(TABLE_HEADER);
                    writeln!(self.out, "{header}")?;
                    self.header_done = true;
                }
                let ms = match t.old_state_ns {
                    Some(ns) => format!("{:.3}", ns as f64 / 1e6),
                    None => "-".to_string(),
                };
                let how = if from_kernel {
                    String::new()
                } else {
                    format!("  ({})", t.source.name())
                };
                let lead = self.lead(t.mono_ns, owner, (t.laddr, t.lport), (t.raddr, t.rport));
                writeln!(
                    self.out,
                    "{lead} {:<28} {ms:>8}{how}",
                    format!("{} -> {}", t.old, t.new)
                )
            }
        }
    }

    /// The record of a connection that ended. Listening sockets are not
    /// connections and get none.
    pub fn connection(&mut self, c: &Connection, close: &Close) -> io::Result<()> {
        if !self.events.connections() || c.listener {
            return Ok(());
        }
        let time_wait_end = c.timewait.and_then(|tw| tw.end).map(|e| e.name());
        if self.events == EventsMode::Closes && self.format == Format::Table {
            if !self.header_done {
                let header = self.header(CLOSES_HEADER);
                writeln!(self.out, "{header}")?;
                self.header_done = true;
            }
            let lead = self.conn_lead(c);
            return writeln!(self.out, "{lead} {}", close_summary(close, time_wait_end));
        }
        match self.format {
            Format::Json => {
                let rec = ConnectionJson {
                    r#type: "connection",
                    conn: self.conn_fields(c),
                    start: self.time(c.start_ns),
                    end: self.time(c.state_since_ns),
                    duration_ns: c.duration_ns(),
                    states: StatesJson(c),
                    time_wait_end,
                    close: CloseJson::new(close),
                };
                self.json_line(&rec)
            }
            Format::Table => {
                let states: Vec<String> = c
                    .states()
                    .map(|(s, ns)| format!("{}={:.3}ms", s.name(), ns as f64 / 1e6))
                    .collect();
                let mut notes = String::new();
                if !c.complete {
                    notes.push_str(" (opening not seen)");
                }
                if let Some(end) = time_wait_end {
                    notes.push_str(&format!(" time_wait_end={end}"));
                }
                let lead = self.conn_lead(c);
                writeln!(
                    self.out,
                    "{lead} CONNECTION {:.3}ms {}{}",
                    c.duration_ns() as f64 / 1e6,
                    states.join(" "),
                    notes
                )
            }
        }
    }

    /// A connection that stayed in its state longer than the threshold
    /// (`close_wait` records for CLOSE_WAIT, `stuck` for other states).
    /// Printed whatever `--events` says: it is an alert.
    pub fn stuck(
        &mut self,
        c: &Connection,
        now_ns: u64,
        owners: &[Holder],
        at_exit: bool,
        close: &Close,
    ) -> io::Result<()> {
        let age = now_ns.saturating_sub(c.state_since_ns);
        let kind = if c.state == TcpState::CloseWait {
            "close_wait"
        } else {
            "stuck"
        };
        match self.format {
            Format::Json => {
                let rec = StuckJson {
                    r#type: kind,
                    conn: self.conn_fields(c),
                    state: c.state.name(),
                    since: self.time(c.state_since_ns),
                    age_ns: age,
                    owners,
                    at_exit,
                    close: CloseJson::new(close),
                };
                self.json_line(&rec)
            }
            Format::Table => {
                let holders = if owners.is_empty() {
                    "held by no process (orphaned, or the owner is gone)".to_string()
                } else {
                    let list: Vec<String> = owners
                        .iter()
                        .map(|h| format!("pid {} ({}) fd {}", h.pid, h.comm, h.fd))
                        .collect();
                    format!("held by {}", list.join(", "))
                };
                let counted = if c.from_snapshot {
                    " since the tracer started"
                } else {
                    ""
                };
                let prefix = if at_exit { "STILL" } else { "!!" };
                let why = if c.state == TcpState::CloseWait {
                    "the peer closed; the application has not called close()"
                } else {
                    "we closed; the peer has not sent its FIN"
                };
                writeln!(
                    self.out,
                    "{prefix} {} for {:.1}s{}: {} -> {} {} ({why})",
                    c.state,
                    age as f64 / 1e9,
                    counted,
                    endpoint(c.laddr, c.lport),
                    endpoint(c.raddr, c.rport),
                    holders
                )
            }
        }
    }

    /// The final record: JSON on stdout, or one line on stderr for tables.
    pub fn stats(&mut self, stats: &Stats) -> io::Result<()> {
        match self.format {
            Format::Json => {
                self.json_line(&StatsJson {
                    r#type: "stats",
                    stats,
                })?;
                self.out.flush()
            }
            Format::Table => {
                self.out.flush()?;
                eprintln!("{}", stats_line(stats));
                Ok(())
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn time(&self, mono_ns: u64) -> Time {
        Text(self.clock.rfc3339_display(mono_ns))
    }

    /// The first columns of a table line: time, owner, both endpoints.
    fn lead(
        &mut self,
        at_ns: u64,
        owner: &Option<Owner>,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
    ) -> String {
        let (pid, comm) = self.owner_cells(owner);
        format!(
            "{:<16} {:<7} {:<16} {:<27} {:<27}",
            self.time_of_day(at_ns),
            pid,
            comm,
            endpoint(local.0, local.1),
            endpoint(remote.0, remote.1)
        )
    }

    /// [`Output::lead`] of a connection at its end.
    fn conn_lead(&mut self, c: &Connection) -> String {
        self.lead(
            c.state_since_ns,
            &c.owner,
            (c.laddr, c.lport),
            (c.raddr, c.rport),
        )
    }

    fn time_of_day(&self, mono_ns: u64) -> String {
        // "2026-11-23T20:15:01.123456789Z" -> "20:15:01.123456"
        let full = self.clock.rfc3339(mono_ns);
        full.get(11..26).unwrap_or(&full).to_string()
    }
}

/// `addr:port`, IPv6 in brackets.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

pub fn stats_line(s: &Stats) -> String {
    let mut line = format!(
        "tracer: {} events, {} lost, {} filtered in kernel, {} unreadable",
        s.events, s.lost, s.filtered, s.unreadable
    );
    for (n, what) in [
        (s.skipped, "skipped (program already running on the CPU)"),
        (s.pending, "pending in the kernel at exit"),
        (s.timing_map_full, "timing map full"),
        (s.listeners_full, "listener table full"),
        (s.timewait_unreadable, "unreadable timewait sockets"),
        (s.untracked, "untracked (tracker full)"),
        (s.gaps, "connections with gaps"),
        (s.diag_errors, "sock_diag errors"),
        (s.timewait_pending, "still in TIME_WAIT at exit"),
    ] {
        if n > 0 {
            line.push_str(&format!(", {n} {what}"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::events::{
        tests::{comm, sample},
        Family, TcpState,
    };
    use crate::track::tracker::Tracker;

    fn out(format: Format, events: EventsMode) -> Output<Vec<u8>> {
        // Monotonic 0 is 2026-11-23T00:00:00Z.
        Output::new(
            Vec::new(),
            format,
            events,
            WallClock::with_offset_ns(1_795_392_000_000_000_000),
        )
    }

    fn text(o: Output<Vec<u8>>) -> String {
        String::from_utf8(o.into_inner()).unwrap()
    }

    fn owner() -> Option<Owner> {
        Some(Owner {
            pid: 42,
            comm: comm("curl"),
            uid: 1000,
            ..Default::default()
        })
    }

    #[test]
    fn transition_json_has_the_contract_fields() {
        let mut o = out(Format::Json, EventsMode::Transitions);
        o.transition(&sample(), &owner()).unwrap();
        let s = text(o);
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["type"], "transition");
        assert_eq!(v["time"], "2026-11-23T00:00:01.000000123Z");
        assert_eq!(v["mono_ns"], 1_000_000_123u64);
        assert_eq!(v["sock"], "0xffff888012345678");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["uid"], 1000);
        assert_eq!(v["task_pid"], 42);
        assert_eq!(v["task_tid"], 43);
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["laddr"], "127.0.0.1");
        assert_eq!(v["lport"], 43210);
        assert_eq!(v["raddr"], "10.1.2.3");
        assert_eq!(v["rport"], 80);
        assert_eq!(v["old"], "SYN_SENT");
        assert_eq!(v["new"], "ESTABLISHED");
        assert_eq!(v["old_state_ns"], 1234);
        assert_eq!(v["netns"], 4026531840u64);
        assert_eq!(v["source"], "tracepoint");
    }

    #[test]
    fn unknown_owner_and_duration_are_null_and_derived_has_no_task() {
        let mut o = out(Format::Json, EventsMode::All);
        let t = Transition {
            old_state_ns: None,
            source: Source::SockDiag,
            ..sample()
        };
        o.transition(&t, &None).unwrap();
        let v: serde_json::Value = serde_json::from_str(text(o).trim_end()).unwrap();
        assert!(v["old_state_ns"].is_null());
        assert!(v["pid"].is_null() && v["comm"].is_null());
        assert!(v["task_pid"].is_null() && v["task_comm"].is_null());
        assert_eq!(v["source"], "sock_diag");
    }

    #[test]
    fn table_has_header_and_brackets_ipv6() {
        let mut o = out(Format::Table, EventsMode::Transitions);
        let t = Transition {
            family: Family::Ipv6,
            laddr: "::1".parse().unwrap(),
            raddr: "2001:db8::1".parse().unwrap(),
            ..sample()
        };
        o.transition(&t, &owner()).unwrap();
        o.transition(
            &Transition {
                old_state_ns: None,
                ..t
            },
            &None,
        )
        .unwrap();
        let s = text(o);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TIME(UTC)"));
        assert!(
            lines[1].starts_with("00:00:01.000000  42      curl"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("[::1]:43210"));
        assert!(lines[1].contains("[2001:db8::1]:80"));
        assert!(lines[1].contains("SYN_SENT -> ESTABLISHED"));
        assert!(lines[1].ends_with("0.001"), "{}", lines[1]);
        assert!(
            lines[2].starts_with("00:00:01.000000  -       -"),
            "{}",
            lines[2]
        );
        assert!(lines[2].ends_with(" -"));
    }

    fn close_of(c: &Connection) -> Close {
        crate::track::close::classify(&c.close, true)
    }

    fn closed() -> Connection {
        let mut tr = Tracker::new(4);
        let t = |ms: u64, old, new, known: Option<u64>| Transition {
            mono_ns: ms * 1_000_000,
            old,
            new,
            old_state_ns: known.map(|k| k * 1_000_000),
            ..sample()
        };
        tr.on_transition(&t(1000, TcpState::Close, TcpState::SynSent, None));
        tr.on_transition(&t(1001, TcpState::SynSent, TcpState::Established, Some(1)));
        tr.on_transition(&t(1201, TcpState::Established, TcpState::Close, Some(200)))
            .closed
            .pop()
            .unwrap()
    }

    #[test]
    fn connection_json() {
        let mut o = out(Format::Json, EventsMode::Connections);
        o.transition(&sample(), &owner()).unwrap(); // not printed in this mode
        o.connection(&closed(), &close_of(&closed())).unwrap();
        let s = text(o);
        assert_eq!(s.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["type"], "connection");
        assert_eq!(v["start"], "2026-11-23T00:00:01.000000000Z");
        assert_eq!(v["duration_ns"], 201_000_000u64);
        assert_eq!(v["states"]["SYN_SENT"], 1_000_000u64);
        assert_eq!(v["states"]["ESTABLISHED"], 200_000_000u64);
        assert_eq!(v["states"].as_object().unwrap().len(), 2);
        assert_eq!(v["complete"], true);
        assert_eq!(v["pid"], 42, "connect() ran in the owner");
        assert!(v["time_wait_end"].is_null());
        for k in [
            "sock", "pid", "comm", "family", "laddr", "lport", "raddr", "rport",
        ] {
            assert!(!v[k].is_null(), "{k}");
        }
    }

    #[test]
    fn connection_table_line() {
        let mut o = out(Format::Table, EventsMode::Connections);
        o.connection(&closed(), &close_of(&closed())).unwrap();
        let s = text(o);
        assert!(
            s.contains("CONNECTION 201.000ms SYN_SENT=1.000ms ESTABLISHED=200.000ms"),
            "{s}"
        );
    }

    #[test]
    fn json_states_are_in_life_order_and_listeners_get_no_record() {
        let mut o = out(Format::Json, EventsMode::Connections);
        o.connection(&closed(), &close_of(&closed())).unwrap();
        let mut listener = closed();
        listener.listener = true;
        o.connection(&listener, &close_of(&listener)).unwrap();
        let s = text(o);
        assert_eq!(s.lines().count(), 1);
        assert!(
            s.contains(r#""states":{"SYN_SENT":1000000,"ESTABLISHED":200000000}"#),
            "{s}"
        );
    }

    #[test]
    fn close_wait_alert_names_the_holders() {
        let mut c = closed();
        c.state = TcpState::CloseWait;
        c.state_since_ns = 1_000_000_000;
        let holders = [Holder {
            pid: 7,
            comm: "server".into(),
            fd: 5,
        }];
        let mut o = out(Format::Json, EventsMode::None);
        o.stuck(&c, 31_000_000_000, &holders, false, &close_of(&c))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(text(o).trim_end()).unwrap();
        assert_eq!(v["type"], "close_wait");
        assert_eq!(v["age_ns"], 30_000_000_000u64);
        assert_eq!(v["since"], "2026-11-23T00:00:01.000000000Z");
        assert_eq!(v["owners"][0]["pid"], 7);
        assert_eq!(v["owners"][0]["fd"], 5);
        assert_eq!(v["owners"][0]["comm"], "server");
        assert_eq!(v["at_exit"], false);
        let mut o = out(Format::Table, EventsMode::None);
        o.stuck(&c, 31_000_000_000, &holders, true, &close_of(&c))
            .unwrap();
        let s = text(o);
        assert!(s.starts_with("STILL CLOSE_WAIT for 30.0s"), "{s}");
        assert!(s.contains("pid 7 (server) fd 5"), "{s}");
    }

    #[test]
    fn stats_json_and_line() {
        let stats = Stats {
            events: 10,
            lost: 2,
            ..Default::default()
        };
        let mut o = out(Format::Json, EventsMode::None);
        o.stats(&stats).unwrap();
        let v: serde_json::Value = serde_json::from_str(text(o).trim_end()).unwrap();
        assert_eq!(v["type"], "stats");
        assert_eq!(v["events"], 10);
        assert_eq!(v["lost"], 2);
        assert_eq!(
            stats_line(&stats),
            "tracer: 10 events, 2 lost, 0 filtered in kernel, 0 unreadable"
        );
    }
}
