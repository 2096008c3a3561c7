//! Writes records to stdout as a table or as JSON Lines.
//!
//! Output is buffered and flushed after each batch of events the agent
//! drains, not per line.

use std::{
    io::{self, Write},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    clock::WallClock,
    kernel::events::{Source, TcpState, Transition},
    report::format::{EventsMode, Format},
    track::close::Close,
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

mod closes;
mod json;
#[cfg(test)]
mod tests;

pub use closes::close_summary;
use json::*;
