//! Writes records to stdout as a table or as JSON Lines.
//!
//! Output is buffered and flushed after each batch of events the agent
//! drains, not per line.

use std::{io, net::IpAddr};

use serde::Serialize;

use crate::{
    clock::WallClock,
    kernel::events::{Source, TcpState, Transition},
    kernel::reset_reasons::ResetReasons,
    report::format::{EventsMode, Format},
    track::close::Close,
    track::containers::{CgroupJson, Cgroups},
    track::diag::Queues,
    track::ports::Pressure,
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
    /// Reset and timewait death records the kernel could not deliver.
    pub lost_resets: u64,
    pub lost_timewait_deaths: u64,
    /// TCP transitions the kernel program saw (before filters).
    pub seen: u64,
    /// Transitions dropped by the in-kernel filters, by request.
    pub filtered: u64,
    /// Transitions in records the agent could not decode (a batch counts
    /// the steps it claims, when that is readable).
    pub unreadable: u64,
    /// Records the agent could not decode.
    pub unreadable_records: u64,
    /// Per-socket timing entries the kernel could not store.
    pub timing_map_full: u64,
    /// Transitions whose old-state timing was missing or stale.
    pub timing_stale: u64,
    /// Transitions of sockets the agent had no room to track.
    pub untracked: u64,
    /// Connections closed with a transition missing in between.
    pub gaps: u64,
    /// Connections that replaced another on the same namespace and
    /// 4-tuple in the agent's tables (the older one ended as reused, or
    /// was dropped if known only from the start-up snapshot).
    pub replaced: u64,
    /// Listening sockets the owner filter could not remember (table full).
    pub listeners_full: u64,
    /// Dying timewait sockets the fentry program could not read.
    pub timewait_unreadable: u64,
    /// Transitions the kernel skipped because the program was already
    /// running on that CPU (the programs' `recursion_misses`): lost.
    pub skipped: u64,
    /// Transitions still waiting in their socket's batch in the kernel at
    /// exit (connections mid-way through a handshake; see docs/records.md).
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
    /// Network namespaces the agent stopped holding (their sock_diag
    /// socket closed) once nothing else held them.
    pub namespaces_released: u64,
    /// Actively closed connections still in their timewait socket at exit
    /// (written then, with `time_wait_end` `tracing_stopped`).
    pub timewait_pending: u64,
    /// Connections still open (not closing) when the tracer stopped: no
    /// record was written for them.
    pub open_at_exit: u64,
    /// Namespaces whose ephemeral port range could not be read: no port
    /// pressure for them (`-v` says why).
    pub port_pressure_unknown_ns: u64,
    /// Connections left out of the port counts: the table of destinations
    /// was full.
    pub port_pressure_dests_full: u64,
    /// Records not written because stdout's reader fell behind by more
    /// than the output's buffer (`--output-buffer`).
    pub output_dropped: u64,
    /// What the kernel offers, as probed at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<crate::kernel::features::Capabilities>,
}

pub struct Output<W: RecordWrite> {
    out: W,
    format: Format,
    events: EventsMode,
    clock: WallClock,
    /// Wall-clock timestamps of JSON records, the second cached.
    times: line::Times,
    /// The record being written (reused: no allocation per record).
    scratch: Vec<u8>,
    header_done: bool,
    /// Names the owners' cgroups (`cgroup`, `container`, `pod`); without
    /// it those fields are null.
    cgroups: Option<Cgroups>,
    /// `-w`: a CGROUP column in tables.
    wide: bool,
    /// Names the reasons of sent resets, where the kernel gives them.
    reset_reasons: ResetReasons,
}

const CLOSES_HEADER: &str = "TIME(UTC)        PID     COMM             LADDR:LPORT                 RADDR:RPORT                 CLOSE";

const TABLE_HEADER: &str = "TIME(UTC)        PID     COMM             LADDR:LPORT                 RADDR:RPORT                 TRANSITION                   MS";

fn sock_hex(sock: u64) -> Option<Text<Hex>> {
    (sock != 0).then_some(Text(Hex(sock)))
}

fn owner_cells(o: &Option<Owner>) -> (String, String) {
    match o {
        Some(o) => (
            o.known_pid().map_or_else(|| "-".into(), |p| p.to_string()),
            o.comm.as_str().into_owned(),
        ),
        None => ("-".into(), "-".into()),
    }
}

impl<W: RecordWrite> Output<W> {
    pub fn new(out: W, format: Format, events: EventsMode, clock: WallClock) -> Self {
        Output {
            out,
            format,
            events,
            clock,
            times: line::Times::new(clock),
            scratch: Vec::with_capacity(4096),
            header_done: false,
            cgroups: None,
            wide: false,
            reset_reasons: ResetReasons::default(),
        }
    }

    /// Records name why resets were sent (`rst.reasons`), where the
    /// kernel says: `reasons.carried`.
    pub fn with_reset_reasons(mut self, reasons: ResetReasons) -> Self {
        self.reset_reasons = reasons;
        self
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
    /// The table's header line, before its first line.
    fn table_header(&mut self, header: &str) -> io::Result<()> {
        if self.header_done {
            return Ok(());
        }
        let header = self.header(header);
        writeln!(self.out, "{header}")?;
        self.header_done = true;
        Ok(())
    }

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
        self.out.write_all(b"\n")?;
        self.out.record_done();
        Ok(())
    }

    /// One JSON record: `fill` writes its fields straight into the
    /// output's buffer where it lends it, else into the reused scratch
    /// buffer, which then goes to the output whole.
    fn write_json(
        &mut self,
        fill: impl FnOnce(&mut line::Line<'_>, &mut JsonParts<'_>),
    ) -> io::Result<()> {
        let mut parts = JsonParts {
            times: &mut self.times,
            cgroups: &mut self.cgroups,
            reset_reasons: &self.reset_reasons,
        };
        if let Some(buf) = self.out.record_buffer() {
            json_line(buf, fill, &mut parts);
            return Ok(());
        }
        self.scratch.clear();
        json_line(&mut self.scratch, fill, &mut parts);
        self.out.write_all(&self.scratch)
    }

    /// Are transitions written (`--events transitions|all`)?
    pub fn writes_transitions(&self) -> bool {
        self.events.transitions()
    }

    /// A transition, with the socket's owner as the tracker knows it and
    /// the processes holding a listener on its local port.
    pub fn transition(
        &mut self,
        t: &Transition,
        owner: &Option<Owner>,
        listener_pids: Option<&[u32]>,
    ) -> io::Result<()> {
        let written = self.write_transition(t, owner, listener_pids);
        self.out.record_done();
        written
    }

    fn write_transition(
        &mut self,
        t: &Transition,
        owner: &Option<Owner>,
        listener_pids: Option<&[u32]>,
    ) -> io::Result<()> {
        if !self.events.transitions() {
            return Ok(());
        }
        let from_kernel = t.source == Source::Tracepoint;
        match self.format {
            Format::Json => self.write_json(|l, w| {
                l.plain("type", "transition");
                w.times.time(l, "time", t.mono_ns);
                l.u64("mono_ns", t.mono_ns);
                l.hex("sock", t.sock);
                owner_fields(l, owner);
                l.fields(cgroup_fields(w.cgroups, owner));
                if t.task {
                    l.u64("task_pid", t.pid.into());
                    l.u64("task_tid", t.tid.into());
                    l.comm("task_comm", &t.comm);
                } else {
                    l.null("task_pid");
                    l.null("task_tid");
                    l.null("task_comm");
                }
                l.plain("family", t.family.name());
                l.ip("laddr", t.laddr);
                l.u64("lport", t.lport.into());
                l.ip("raddr", t.raddr);
                l.u64("rport", t.rport.into());
                l.plain("old", t.old.name());
                l.plain("new", t.new.name());
                l.opt_u64("old_state_ns", t.old_state_ns);
                l.opt_u64("netns", (t.netns != 0).then_some(t.netns.into()));
                l.plain("source", t.source.name());
                pids_field(l, "listener_pids", listener_pids);
            }),
            Format::Table => {
                self.table_header(TABLE_HEADER)?;
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

    /// The record of a connection that ended (with the processes holding
    /// the listener that accepted it). Listening sockets are not
    /// connections and get none.
    pub fn connection(
        &mut self,
        c: &Connection,
        close: &Close,
        listener_pids: Option<&[u32]>,
    ) -> io::Result<()> {
        let written = self.write_connection(c, close, listener_pids);
        self.out.record_done();
        written
    }

    fn write_connection(
        &mut self,
        c: &Connection,
        close: &Close,
        listener_pids: Option<&[u32]>,
    ) -> io::Result<()> {
        if !self.events.connections() || c.listener {
            return Ok(());
        }
        let time_wait_end = c.timewait.and_then(|tw| tw.end).map(|e| e.name());
        if self.events == EventsMode::Closes && self.format == Format::Table {
            // The close line came with its `close` record; an active
            // closer's, at its entry into TIME_WAIT, comes again with the
            // TIME_WAIT's time and end.
            if !c.close_written_early {
                return Ok(());
            }
            self.table_header(CLOSES_HEADER)?;
            let lead = self.conn_lead(c);
            let line = close_summary(close, time_wait_end, &self.reset_reasons);
            return writeln!(self.out, "{lead} {line}");
        }
        match self.format {
            Format::Json => self.write_json(|l, w| {
                conn_head(l, "connection", c, w);
                w.times.time(l, "start", c.start_ns);
                w.times.time(l, "end", c.state_since_ns);
                l.u64("duration_ns", c.duration_ns());
                let mut states = l.object("states");
                for (state, ns) in c.states() {
                    states.u64(state.name(), ns);
                }
                states.end();
                l.opt_plain("time_wait_end", time_wait_end);
                close_fields(l.object("close"), close, w.reset_reasons);
                l.bool("at_exit", c.cut_at_exit);
                pids_field(l, "listener_pids", listener_pids);
            }),
            Format::Table => {
                let states: Vec<String> = c
                    .states()
                    .map(|(s, ns)| format!("{}={:.3}ms", s.name(), ns as f64 / 1e6))
                    .collect();
                let mut notes = String::new();
                // A record cut at exit is incomplete at its end, not its
                // opening (JSON's `at_exit`).
                if c.cut_at_exit {
                    notes.push_str(" (cut at exit)");
                } else if !c.complete {
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

    /// The `close` record of a connection whose close handshake is over
    /// (`--events closes|all`): an active closer's at its entry into
    /// TIME_WAIT, any other's at its end, before its connection record.
    pub fn close(
        &mut self,
        c: &Connection,
        close: &Close,
        listener_pids: Option<&[u32]>,
    ) -> io::Result<()> {
        let written = self.write_close(c, close, listener_pids);
        self.out.record_done();
        written
    }

    fn write_close(
        &mut self,
        c: &Connection,
        close: &Close,
        listener_pids: Option<&[u32]>,
    ) -> io::Result<()> {
        if !matches!(self.events, EventsMode::Closes | EventsMode::All) || c.listener {
            return Ok(());
        }
        match self.format {
            Format::Json => self.write_json(|l, w| {
                conn_head(l, "close", c, w);
                w.times.time(l, "time", c.state_since_ns);
                l.plain("state", c.state.name());
                l.bool("at_exit", c.cut_at_exit);
                close_fields(l.object("close"), close, w.reset_reasons);
                pids_field(l, "listener_pids", listener_pids);
            }),
            Format::Table => {
                self.table_header(if self.events == EventsMode::Closes {
                    CLOSES_HEADER
                } else {
                    TABLE_HEADER
                })?;
                let lead = self.conn_lead(c);
                let label = if self.events == EventsMode::All {
                    "CLOSE "
                } else {
                    ""
                };
                let end = c.timewait.and_then(|tw| tw.end).map(|e| e.name());
                let line = close_summary(close, end, &self.reset_reasons);
                writeln!(self.out, "{lead} {label}{line}")
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
        queues: Option<Queues>,
        at_exit: bool,
        close: &Close,
    ) -> io::Result<()> {
        let written = self.write_stuck(c, now_ns, owners, queues, at_exit, close);
        self.out.record_done();
        written
    }

    fn write_stuck(
        &mut self,
        c: &Connection,
        now_ns: u64,
        owners: &[Holder],
        queues: Option<Queues>,
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
                // Lent to the record, which the writer borrows with self.
                let reasons = std::mem::take(&mut self.reset_reasons);
                let rec = StuckJson {
                    r#type: kind,
                    conn: self.conn_fields(c),
                    state: c.state.name(),
                    since: self.time(c.state_since_ns),
                    age_ns: age,
                    owners,
                    rqueue: queues.map(|q| q.rqueue),
                    wqueue: queues.map(|q| q.wqueue),
                    at_exit,
                    close: CloseJson::new(close, &reasons),
                };
                let written = self.json_line(&rec);
                self.reset_reasons = reasons;
                written
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
                let mut why = if c.state == TcpState::CloseWait {
                    "the peer closed; the application has not called close()".to_string()
                } else {
                    "we closed; the peer has not sent its FIN".to_string()
                };
                // Data left unread before the FIN: the application stopped
                // reading, rather than read everything and never closed.
                if let Some(q) = queues.filter(|q| q.rqueue > 0) {
                    why.push_str(&format!("; {} bytes unread", q.rqueue));
                }
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

    /// A destination whose connections hold `--port-pressure` percent of
    /// its namespace's ephemeral ports or more (`p.above`), or fell back
    /// below; at exit, those still above. Printed whatever `--events`
    /// says: it is an alert.
    pub fn port_pressure(&mut self, p: &Pressure, at_ns: u64, at_exit: bool) -> io::Result<()> {
        let written = self.write_port_pressure(p, at_ns, at_exit);
        self.out.record_done();
        written
    }

    fn write_port_pressure(&mut self, p: &Pressure, at_ns: u64, at_exit: bool) -> io::Result<()> {
        let ratio = (p.ratio() * 1e4).round() / 1e4;
        match self.format {
            Format::Json => {
                let rec = PortPressureJson {
                    r#type: "port_pressure",
                    time: self.time(at_ns),
                    ports: PortsJson::of(p),
                    above: p.above,
                    at_exit,
                };
                self.json_line(&rec)
            }
            Format::Table => {
                let prefix = if at_exit { "STILL" } else { "!!" };
                let netns = match p.dest.netns {
                    0 => String::new(),
                    n => format!(" (netns {n})"),
                };
                let below = if p.above {
                    ""
                } else {
                    "; back below the threshold"
                };
                writeln!(
                    self.out,
                    "{prefix} PORTS {} -> {}{netns}: {} of {} ephemeral ports in use ({:.0}%), {} in TIME_WAIT{below}",
                    p.dest.laddr,
                    endpoint(p.dest.raddr, p.dest.rport),
                    p.in_use,
                    p.range,
                    ratio * 100.0,
                    p.time_wait,
                )
            }
        }
    }

    /// With `--summary`: the destinations holding the most ephemeral
    /// ports, most first.
    pub fn port_summary(&mut self, top: &[Pressure]) -> io::Result<()> {
        let written = self.write_port_summary(top);
        self.out.record_done();
        written
    }

    fn write_port_summary(&mut self, top: &[Pressure]) -> io::Result<()> {
        match self.format {
            Format::Json => {
                let destinations = top.iter().map(PortsJson::of).collect();
                self.json_line(&PortSummaryJson {
                    r#type: "port_summary",
                    destinations,
                })
            }
            Format::Table => {
                writeln!(
                    self.out,
                    "Ephemeral ports held per destination (top {} by ports in use)",
                    top.len()
                )?;
                writeln!(
                    self.out,
                    "{:<10} {:<27} {:<27} {:>7} {:>9} {:>7} {:>6}",
                    "NETNS", "LADDR", "RADDR:RPORT", "IN_USE", "TIME_WAIT", "RANGE", "RATIO"
                )?;
                for p in top {
                    let netns = match p.dest.netns {
                        0 => "-".to_string(),
                        n => n.to_string(),
                    };
                    writeln!(
                        self.out,
                        "{netns:<10} {:<27} {:<27} {:>7} {:>9} {:>7} {:>5.1}%",
                        p.dest.laddr.to_string(),
                        endpoint(p.dest.raddr, p.dest.rport),
                        p.in_use,
                        p.time_wait,
                        p.range,
                        p.ratio() * 100.0
                    )?;
                }
                writeln!(self.out)
            }
        }
    }

    /// The final record, then everything written out (waiting at most
    /// `within` for a slow reader): JSON on stdout, or for tables one line
    /// on stderr once the table is out. False if the reader did not take
    /// it all in time.
    pub fn stats(&mut self, stats: &Stats, within: std::time::Duration) -> io::Result<bool> {
        if self.format == Format::Json {
            self.json_line(&StatsJson {
                r#type: "stats",
                stats,
            })?;
        }
        let done = self.out.finish(within)?;
        if self.format == Format::Table {
            eprintln!("{}", stats_line(stats));
        }
        Ok(done)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// At exit: a full output buffer waits for a reader that makes
    /// progress (every `within`) instead of dropping records.
    pub fn wait_when_full(&mut self, within: std::time::Duration) {
        self.out.wait_when_full(within);
    }

    /// Records dropped because stdout's reader was too slow.
    pub fn dropped(&self) -> u64 {
        self.out.dropped()
    }

    /// A record written through [`Output::writer`] is complete.
    pub fn record_done(&mut self) {
        self.out.record_done();
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
        (
            s.timewait_pending,
            "waiting for their timewait socket at exit",
        ),
        (s.open_at_exit, "connections open at exit"),
        (
            s.port_pressure_unknown_ns,
            "namespaces without a readable port range",
        ),
        (
            s.port_pressure_dests_full,
            "connections left out of the port counts",
        ),
        (
            s.output_dropped,
            "records dropped (stdout's reader too slow)",
        ),
    ] {
        if n > 0 {
            line.push_str(&format!(", {n} {what}"));
        }
    }
    line
}

/// A list of pids, or null.
fn pids_field(l: &mut line::Line<'_>, k: &str, pids: Option<&[u32]>) {
    match pids {
        Some(pids) => l.array(k, pids, |out, pid| {
            line::write_u64(out, (*pid).into());
        }),
        None => l.null(k),
    }
}

/// `pid`, `comm`, `uid` of the owner, null when unknown (the pid alone
/// when only the comm is known).
fn owner_fields(l: &mut line::Line<'_>, owner: &Option<Owner>) {
    match owner {
        Some(o) => {
            l.opt_u64("pid", o.known_pid().map(u64::from));
            l.comm("comm", &o.comm);
            l.u64("uid", o.uid.into());
        }
        None => {
            l.null("pid");
            l.null("comm");
            l.null("uid");
        }
    }
}

/// The owner's `cgroup`, `container` and `pod` fields (null when unknown).
fn cgroup_fields<'a>(cgroups: &'a mut Option<Cgroups>, owner: &Option<Owner>) -> &'a str {
    match cgroups {
        Some(c) => c.json_fields(owner),
        None => crate::track::containers::NULL_CGROUP_FIELDS,
    }
}

/// Appends one JSON record, `{...}` and its newline, to `buf`.
fn json_line(
    buf: &mut Vec<u8>,
    fill: impl FnOnce(&mut line::Line<'_>, &mut JsonParts<'_>),
    parts: &mut JsonParts<'_>,
) {
    let mut text = line::Text::take(buf);
    let mut l = line::Line::new(&mut text);
    fill(&mut l, parts);
    l.end();
    text.push(b'\n');
    text.give_back(buf);
}

/// What the JSON records' fields are written with, besides the record.
struct JsonParts<'a> {
    times: &'a mut line::Times,
    cgroups: &'a mut Option<Cgroups>,
    reset_reasons: &'a ResetReasons,
}

/// A connection-level record's `type` and the fields they all share.
fn conn_head(l: &mut line::Line<'_>, ty: &str, c: &Connection, w: &mut JsonParts<'_>) {
    l.plain("type", ty);
    conn_fields(l, c, cgroup_fields(w.cgroups, &c.owner), w.times);
}

/// The fields every connection-level record shares (`ConnFields`).
fn conn_fields(l: &mut line::Line<'_>, c: &Connection, cgroup: &str, times: &mut line::Times) {
    l.hex("sock", c.sock);
    owner_fields(l, &c.owner);
    l.fields(cgroup);
    l.plain("family", c.family.name());
    l.ip("laddr", c.laddr);
    l.u64("lport", c.lport.into());
    l.ip("raddr", c.raddr);
    l.u64("rport", c.rport.into());
    l.opt_u64("netns", (c.netns != 0).then_some(c.netns.into()));
    times.time(l, "first_seen", c.first_seen_ns);
    l.bool("complete", c.complete);
    l.bool("from_snapshot", c.from_snapshot);
}

/// The `close` object (`CloseJson`).
fn close_fields(mut l: line::Line<'_>, c: &Close, reasons: &ResetReasons) {
    use crate::track::close::FirstFin;
    l.plain("by", c.by.name());
    l.opt_plain(
        "first_fin",
        c.first_fin.map(|f| match f {
            FirstFin::Local => "local",
            FirstFin::Peer => "peer",
            FirstFin::Both => "both",
        }),
    );
    l.opt_u64("fin_to_close_ns", c.fin_to_close_ns);
    l.array("handshake", c.handshake.iter(), |out, step| {
        out.push(b'"');
        out.put(step.old.name().as_bytes());
        out.push(b'>');
        out.put(step.new.name().as_bytes());
        out.push(b'"');
    });
    l.array("handshake_at_ns", 0..c.handshake.len(), |out, i| {
        line::write_u64(out, c.at_ns(i));
    });
    match c.rst {
        Some(r) => {
            let mut o = l.object("rst");
            o.u64("sent", r.sent.into());
            o.u64("received", r.received.into());
            if reasons.carried {
                o.array("reasons", r.reasons.iter(), |out, (v, _)| {
                    use std::io::Write as _;
                    // C identifiers or numbers: nothing to escape.
                    let _ = write!(out, "\"{}\"", reasons.name(v));
                });
            }
            o.end();
        }
        None => l.null("rst"),
    }
    l.end();
}

mod closes;
mod json;
mod line;
pub mod sink;

pub use sink::{RecordWrite, Sink};
#[cfg(test)]
mod tests;

pub use closes::close_summary;
use json::*;
