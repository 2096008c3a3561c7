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
    cli::{EventsMode, Format},
    clock::WallClock,
    events::Transition,
    tracker::Connection,
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
    /// What the kernel offers, as probed at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<crate::features::Capabilities>,
}

pub struct Output<W: Write> {
    out: W,
    format: Format,
    events: EventsMode,
    clock: WallClock,
    header_done: bool,
}

#[derive(Serialize)]
struct TransitionJson<'a> {
    r#type: &'static str,
    time: String,
    mono_ns: u64,
    sock: String,
    pid: u32,
    tid: u32,
    uid: u32,
    comm: Cow<'a, str>,
    family: &'static str,
    laddr: String,
    lport: u16,
    raddr: String,
    rport: u16,
    old: &'static str,
    new: &'static str,
    old_state_ns: Option<u64>,
    netns: Option<u32>,
}

#[derive(Serialize)]
struct ConnectionJson<'a> {
    r#type: &'static str,
    sock: String,
    pid: u32,
    comm: Cow<'a, str>,
    family: &'static str,
    laddr: String,
    lport: u16,
    raddr: String,
    rport: u16,
    start: String,
    first_seen: String,
    end: String,
    duration_ns: u64,
    states: StatesJson<'a>,
    complete: bool,
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

const TABLE_HEADER: &str = "TIME(UTC)        PID     COMM             LADDR:LPORT                 RADDR:RPORT                 TRANSITION                   MS";

impl<W: Write> Output<W> {
    pub fn new(out: W, format: Format, events: EventsMode, clock: WallClock) -> Self {
        Output {
            out,
            format,
            events,
            clock,
            header_done: false,
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    pub fn transition(&mut self, t: &Transition) -> io::Result<()> {
        if !self.events.transitions() {
            return Ok(());
        }
        match self.format {
            Format::Json => {
                let rec = TransitionJson {
                    r#type: "transition",
                    time: self.clock.rfc3339(t.mono_ns),
                    mono_ns: t.mono_ns,
                    sock: format!("{:#x}", t.sock),
                    pid: t.pid,
                    tid: t.tid,
                    uid: t.uid,
                    comm: t.comm.as_str(),
                    family: t.family.name(),
                    laddr: t.laddr.to_string(),
                    lport: t.lport,
                    raddr: t.raddr.to_string(),
                    rport: t.rport,
                    old: t.old.name(),
                    new: t.new.name(),
                    old_state_ns: t.old_state_ns,
                    netns: (t.netns != 0).then_some(t.netns),
                };
                serde_json::to_writer(&mut self.out, &rec)?;
                self.out.write_all(b"\n")
            }
            Format::Table => {
                if !self.header_done {
                    writeln!(self.out, "{TABLE_HEADER}")?;
                    self.header_done = true;
                }
                let ms = match t.old_state_ns {
                    Some(ns) => format!("{:.3}", ns as f64 / 1e6),
                    None => "-".to_string(),
                };
                writeln!(
                    self.out,
                    "{:<16} {:<7} {:<16} {:<27} {:<27} {:<28} {:>8}",
                    self.time_of_day(t.mono_ns),
                    t.pid,
                    t.comm.as_str(),
                    endpoint(t.laddr, t.lport),
                    endpoint(t.raddr, t.rport),
                    format!("{} -> {}", t.old, t.new),
                    ms
                )
            }
        }
    }

    /// The record of a connection that reached CLOSE. Listening sockets
    /// are not connections and get none.
    pub fn connection(&mut self, c: &Connection) -> io::Result<()> {
        if !self.events.connections() || c.listener {
            return Ok(());
        }
        match self.format {
            Format::Json => {
                let rec = ConnectionJson {
                    r#type: "connection",
                    sock: format!("{:#x}", c.sock),
                    pid: c.pid,
                    comm: c.comm.as_str(),
                    family: c.family.name(),
                    laddr: c.laddr.to_string(),
                    lport: c.lport,
                    raddr: c.raddr.to_string(),
                    rport: c.rport,
                    start: self.clock.rfc3339(c.start_ns),
                    first_seen: self.clock.rfc3339(c.first_seen_ns),
                    end: self.clock.rfc3339(c.state_since_ns),
                    duration_ns: c.duration_ns(),
                    states: StatesJson(c),
                    complete: c.complete,
                };
                serde_json::to_writer(&mut self.out, &rec)?;
                self.out.write_all(b"\n")
            }
            Format::Table => {
                let states: Vec<String> = c
                    .states()
                    .map(|(s, ns)| format!("{}={:.3}ms", s.name(), ns as f64 / 1e6))
                    .collect();
                writeln!(
                    self.out,
                    "{:<16} {:<7} {:<16} {:<27} {:<27} CONNECTION {:.3}ms{} {}",
                    self.time_of_day(c.state_since_ns),
                    c.pid,
                    c.comm.as_str(),
                    endpoint(c.laddr, c.lport),
                    endpoint(c.raddr, c.rport),
                    c.duration_ns() as f64 / 1e6,
                    if c.complete {
                        ""
                    } else {
                        " (opening not seen)"
                    },
                    states.join(" ")
                )
            }
        }
    }

    /// The final record: JSON on stdout, or one line on stderr for tables.
    pub fn stats(&mut self, stats: &Stats) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(
                    &mut self.out,
                    &StatsJson {
                        r#type: "stats",
                        stats,
                    },
                )?;
                self.out.write_all(b"\n")?;
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
        (s.timing_map_full, "timing map full"),
        (s.untracked, "untracked (tracker full)"),
        (s.gaps, "connections with gaps"),
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
    use crate::events::{tests::sample, Family, TcpState};
    use crate::tracker::{Tracker, Update};

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

    #[test]
    fn transition_json_has_the_contract_fields() {
        let mut o = out(Format::Json, EventsMode::Transitions);
        o.transition(&sample()).unwrap();
        let s = text(o);
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["type"], "transition");
        assert_eq!(v["time"], "2026-11-23T00:00:01.000000123Z");
        assert_eq!(v["mono_ns"], 1_000_000_123u64);
        assert_eq!(v["sock"], "0xffff888012345678");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["laddr"], "127.0.0.1");
        assert_eq!(v["lport"], 43210);
        assert_eq!(v["raddr"], "10.1.2.3");
        assert_eq!(v["rport"], 80);
        assert_eq!(v["old"], "SYN_SENT");
        assert_eq!(v["new"], "ESTABLISHED");
        assert_eq!(v["old_state_ns"], 1234);
    }

    #[test]
    fn unknown_duration_is_null() {
        let mut o = out(Format::Json, EventsMode::All);
        o.transition(&Transition {
            old_state_ns: None,
            ..sample()
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(text(o).trim_end()).unwrap();
        assert!(v["old_state_ns"].is_null());
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
        o.transition(&t).unwrap();
        o.transition(&Transition {
            old_state_ns: None,
            ..t
        })
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
        assert!(lines[2].ends_with(" -"));
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
        match tr.on_transition(&t(1201, TcpState::Established, TcpState::Close, Some(200))) {
            Update::Closed(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connection_json() {
        let mut o = out(Format::Json, EventsMode::Connections);
        o.transition(&sample()).unwrap(); // not printed in this mode
        o.connection(&closed()).unwrap();
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
        for k in [
            "sock", "pid", "comm", "family", "laddr", "lport", "raddr", "rport",
        ] {
            assert!(!v[k].is_null(), "{k}");
        }
    }

    #[test]
    fn connection_table_line() {
        let mut o = out(Format::Table, EventsMode::Connections);
        o.connection(&closed()).unwrap();
        let s = text(o);
        assert!(
            s.contains("CONNECTION 201.000ms SYN_SENT=1.000ms ESTABLISHED=200.000ms"),
            "{s}"
        );
    }

    #[test]
    fn json_states_are_in_life_order_and_listeners_get_no_record() {
        let mut o = out(Format::Json, EventsMode::Connections);
        o.connection(&closed()).unwrap();
        let mut listener = closed();
        listener.listener = true;
        o.connection(&listener).unwrap();
        let s = text(o);
        assert_eq!(s.lines().count(), 1);
        assert!(
            s.contains(r#""states":{"SYN_SENT":1000000,"ESTABLISHED":200000000}"#),
            "{s}"
        );
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
