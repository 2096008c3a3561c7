//! The JSON Lines records' shapes (serde), written by `mod.rs`: field
//! names and order are the contract docs/records.md lists.

use std::{borrow::Cow, net::IpAddr};

use serde::Serialize;

use super::Stats;
use crate::{
    kernel::reset_reasons::ResetReasons,
    track::containers::CgroupJson,
    track::{
        close::{Close, FirstFin, Rst},
        procfs::Holder,
        tracker::Owner,
    },
};

/// A `Display` value written straight into the JSON string (serde's
/// `collect_str`): no `String` per field per event.
pub(super) struct Text<T>(pub(super) T);

impl<T: std::fmt::Display> Serialize for Text<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A socket address as `0x…`.
pub(super) struct Hex(pub(super) u64);

impl std::fmt::Display for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

pub(super) type Time = Text<humantime::Rfc3339Timestamp>;

/// Owner fields, `null` when the owner is unknown.
#[derive(Serialize)]
pub(super) struct OwnerJson<'a> {
    pub(super) pid: Option<u32>,
    pub(super) comm: Option<Cow<'a, str>>,
    pub(super) uid: Option<u32>,
}

pub(super) fn owner_json(o: &Option<Owner>) -> OwnerJson<'_> {
    OwnerJson {
        pid: o.as_ref().and_then(Owner::known_pid),
        comm: o.as_ref().map(|o| o.comm.as_str()),
        uid: o.as_ref().map(|o| o.uid),
    }
}

/// The reference for the hand-written writer (`line.rs`); tests only.
#[cfg(test)]
#[derive(Serialize)]
pub(super) struct TransitionJson<'a> {
    pub(super) r#type: &'static str,
    pub(super) time: Time,
    pub(super) mono_ns: u64,
    pub(super) sock: Option<Text<Hex>>,
    #[serde(flatten)]
    pub(super) owner: OwnerJson<'a>,
    #[serde(flatten)]
    pub(super) cgroup: CgroupJson,
    /// The task current when the tracepoint fired (often not the owner:
    /// softirq work runs on whatever task was interrupted).
    pub(super) task_pid: Option<u32>,
    pub(super) task_tid: Option<u32>,
    pub(super) task_comm: Option<Cow<'a, str>>,
    pub(super) family: &'static str,
    pub(super) laddr: IpAddr,
    pub(super) lport: u16,
    pub(super) raddr: IpAddr,
    pub(super) rport: u16,
    pub(super) old: &'static str,
    pub(super) new: &'static str,
    pub(super) old_state_ns: Option<u64>,
    pub(super) netns: Option<u32>,
    pub(super) source: &'static str,
    pub(super) listener_pids: Option<&'a [u32]>,
}

/// Fields every connection-level record shares.
#[derive(Serialize)]
pub(super) struct ConnFields<'a> {
    pub(super) sock: Option<Text<Hex>>,
    #[serde(flatten)]
    pub(super) owner: OwnerJson<'a>,
    #[serde(flatten)]
    pub(super) cgroup: CgroupJson,
    pub(super) family: &'static str,
    pub(super) laddr: IpAddr,
    pub(super) lport: u16,
    pub(super) raddr: IpAddr,
    pub(super) rport: u16,
    pub(super) netns: Option<u32>,
    /// When the tracer first saw it (the start-up snapshot for sockets
    /// that existed before it).
    pub(super) first_seen: Time,
    pub(super) complete: bool,
    pub(super) from_snapshot: bool,
}

/// The reference for the hand-written writer (`line.rs`); tests only.
#[cfg(test)]
#[derive(Serialize)]
pub(super) struct ConnectionJson<'a> {
    pub(super) r#type: &'static str,
    #[serde(flatten)]
    pub(super) conn: ConnFields<'a>,
    pub(super) start: Time,
    pub(super) end: Time,
    pub(super) duration_ns: u64,
    pub(super) states: StatesJson<'a>,
    /// How the timewait part of an actively closed connection ended; null
    /// for connections that did not close actively.
    pub(super) time_wait_end: Option<&'static str>,
    pub(super) close: CloseJson<'a>,
    pub(super) at_exit: bool,
    pub(super) listener_pids: Option<&'a [u32]>,
}

/// How a connection closed (see `close.rs`).
#[derive(Serialize)]
pub(super) struct CloseJson<'a> {
    pub(super) by: &'static str,
    pub(super) first_fin: Option<FirstFin>,
    pub(super) fin_to_close_ns: Option<u64>,
    pub(super) handshake: HandshakeJson<'a>,
    /// Time of each handshake step since the first, ns.
    pub(super) handshake_at_ns: HandshakeAtJson<'a>,
    pub(super) rst: Option<RstJson<'a>>,
}

impl<'a> CloseJson<'a> {
    pub(super) fn new(c: &'a Close, reasons: &'a ResetReasons) -> Self {
        CloseJson {
            by: c.by.name(),
            first_fin: c.first_fin,
            fin_to_close_ns: c.fin_to_close_ns,
            handshake: HandshakeJson(c),
            handshake_at_ns: HandshakeAtJson(c),
            rst: c.rst.as_ref().map(|rst| RstJson { rst, reasons }),
        }
    }
}

/// The `rst` object: `reasons` only where the kernel says why it sent
/// resets (6.10+).
pub(super) struct RstJson<'a> {
    pub(super) rst: &'a Rst,
    pub(super) reasons: &'a ResetReasons,
}

impl Serialize for RstJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("sent", &self.rst.sent)?;
        map.serialize_entry("received", &self.rst.received)?;
        if self.reasons.carried {
            let names: Vec<Text<_>> = self
                .rst
                .reasons
                .iter()
                .map(|(v, _)| Text(self.reasons.name(v)))
                .collect();
            map.serialize_entry("reasons", &names)?;
        }
        map.end()
    }
}

/// A connection stuck in a state (`close_wait`, or `stuck` for others).
#[derive(Serialize)]
pub(super) struct StuckJson<'a> {
    pub(super) r#type: &'static str,
    #[serde(flatten)]
    pub(super) conn: ConnFields<'a>,
    pub(super) state: &'static str,
    pub(super) since: Time,
    pub(super) age_ns: u64,
    pub(super) owners: &'a [Holder],
    /// The socket's receive and send queues when the alert was made,
    /// bytes of data (null when the socket could not be looked up).
    pub(super) rqueue: Option<u32>,
    pub(super) wqueue: Option<u32>,
    /// Listed when the tracer stopped rather than when it passed the
    /// threshold.
    pub(super) at_exit: bool,
    /// The close so far (`by`: `unfinished`).
    pub(super) close: CloseJson<'a>,
}

/// The destinations holding the most ephemeral ports (`port_summary`).
#[derive(Serialize)]
pub(super) struct PortSummaryJson {
    pub(super) r#type: &'static str,
    pub(super) destinations: Vec<PortsJson>,
}

/// One destination's ephemeral ports: the fields `port_pressure` and
/// `port_summary` share.
#[derive(Serialize)]
pub(super) struct PortsJson {
    pub(super) netns: Option<u32>,
    pub(super) laddr: IpAddr,
    pub(super) raddr: IpAddr,
    pub(super) rport: u16,
    pub(super) in_use: u32,
    pub(super) time_wait: u32,
    pub(super) range: u32,
    pub(super) ratio: f64,
}

impl PortsJson {
    pub(super) fn of(p: &crate::track::ports::Pressure) -> PortsJson {
        PortsJson {
            netns: (p.dest.netns != 0).then_some(p.dest.netns),
            laddr: p.dest.laddr,
            raddr: p.dest.raddr,
            rport: p.dest.rport,
            in_use: p.in_use,
            time_wait: p.time_wait,
            range: p.range,
            // Four decimals: a ratio, not a measurement.
            ratio: (p.ratio() * 1e4).round() / 1e4,
        }
    }
}

/// A destination's ephemeral ports (`port_pressure`).
#[derive(Serialize)]
pub(super) struct PortPressureJson {
    pub(super) r#type: &'static str,
    pub(super) time: Time,
    #[serde(flatten)]
    pub(super) ports: PortsJson,
    /// Crossed above the threshold (false: fell back below).
    pub(super) above: bool,
    /// Listed when the tracer stopped.
    pub(super) at_exit: bool,
}

/// A connection's per-state times as a JSON object, in life order.
#[cfg(test)]
pub(super) struct StatesJson<'a>(pub(super) &'a crate::track::tracker::Connection);

#[cfg(test)]
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
pub(super) struct StatsJson<'a> {
    pub(super) r#type: &'static str,
    #[serde(flatten)]
    pub(super) stats: &'a Stats,
}

/// `["ESTABLISHED>FIN_WAIT1", ...]`, written straight from the steps.
pub(super) struct HandshakeJson<'a>(pub(super) &'a Close);

impl Serialize for HandshakeJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.handshake.len()))?;
        for step in self.0.handshake.iter() {
            seq.serialize_element(&Text(format_args!(
                "{}>{}",
                step.old.name(),
                step.new.name()
            )))?;
        }
        seq.end()
    }
}

/// Each handshake step's time since the first, ns.
pub(super) struct HandshakeAtJson<'a>(pub(super) &'a Close);

impl Serialize for HandshakeAtJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.handshake.len()))?;
        for i in 0..self.0.handshake.len() {
            seq.serialize_element(&self.0.at_ns(i))?;
        }
        seq.end()
    }
}
