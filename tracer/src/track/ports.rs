//! Ephemeral-port pressure: per destination (namespace, local address,
//! remote address, remote port), how many local ports of the namespace's
//! ephemeral range its sockets hold, and how many of those are timewait
//! sockets. Linux picks a connecting socket's local port per destination,
//! so a client that churns connections to one backend runs out of ports
//! (`connect()` fails with EADDRNOTAVAIL) when that destination alone
//! holds the whole range.
//!
//! Rules (also in the README and docs/records.md):
//! - A connection holds a port toward its destination if its local port is
//!   in the namespace's `ip_local_port_range` and not in
//!   `ip_local_reserved_ports`, and it is neither a listener nor accepted
//!   by one (an accepted socket shares its listener's port). It holds it
//!   from the first transition that shows the port (`SYN_SENT ->
//!   ESTABLISHED` after a plain `connect()`, which picks the port after
//!   `CLOSE -> SYN_SENT`) until its end, timewait socket included;
//!   `time_wait` counts those held by a timewait socket (TIME_WAIT, or the
//!   FIN_WAIT2 of an orphaned close).
//! - Only the connections the tracer follows count (filters apply), those
//!   of the start-up snapshot included; the snapshot's timewait sockets
//!   count until their expiry as the dump gave it, or a new connection on
//!   their 4-tuple.
//! - A namespace's range is read once, when the tracer first opens it;
//!   until then (or if it cannot be read) its destinations have no
//!   pressure.
//! - A destination is above when `in_use` reaches `--port-pressure` percent
//!   of the range, and below again when it falls under that by 5 % of the
//!   range (at least one port): a count that wavers at the threshold
//!   reports once.
//! - At exit the counts stay those of when tracing stopped: the
//!   connections written then still hold their ports.
//!
//! The counts change with the connections' phases (`tracker/mod.rs` calls
//! [`Ports::hold`]); a change costs one look-up of the destination, and
//! entries are made only for new destinations (at most [`MAX_DESTS`]).

use std::{
    hash::{Hash, Hasher},
    net::IpAddr,
};

use crate::{
    track::tracker::{hash_addr, TupleKey},
    FastMap,
};

/// Destinations counted at once; connections toward more are not counted
/// (`port_pressure_dests_full` in the stats).
pub const MAX_DESTS: usize = 16384;

/// What a connection holds of its namespace's ephemeral range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hold {
    #[default]
    Nothing,
    /// A port, in any state but a timewait socket's.
    Port,
    /// A port, in a timewait socket.
    TimeWait,
}

/// A destination, as Linux chooses local ports for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dest {
    pub netns: u32,
    pub laddr: IpAddr,
    pub raddr: IpAddr,
    pub rport: u16,
}

/// In words, as [`TupleKey`]'s hash: looked up at each change of what a
/// client connection holds.
impl Hash for Dest {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(u64::from(self.netns) << 16 | u64::from(self.rport));
        hash_addr(h, &self.laddr);
        hash_addr(h, &self.raddr);
    }
}

impl Dest {
    pub fn of(key: &TupleKey) -> Dest {
        Dest {
            netns: key.netns,
            laddr: key.laddr,
            raddr: key.raddr,
            rport: key.rport,
        }
    }
}

/// A namespace's ephemeral range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
    /// `ip_local_reserved_ports` within the range, as sorted inclusive
    /// intervals.
    pub reserved: Vec<(u16, u16)>,
}

impl PortRange {
    /// From the two sysctl files' contents.
    pub fn parse(range: &str, reserved: &str) -> Result<PortRange, String> {
        let mut it = range.split_whitespace().map(str::parse::<u16>);
        let (Some(Ok(low)), Some(Ok(high)), None) = (it.next(), it.next(), it.next()) else {
            return Err(format!("ip_local_port_range `{}` unreadable", range.trim()));
        };
        if low > high {
            return Err(format!("ip_local_port_range {low} {high} is empty"));
        }
        let mut list = Vec::new();
        for part in reserved.trim().split(',').filter(|p| !p.is_empty()) {
            let bad = || format!("ip_local_reserved_ports `{}` unreadable", reserved.trim());
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.parse::<u16>(), b.parse::<u16>()),
                None => (part.parse::<u16>(), part.parse::<u16>()),
            };
            let (Ok(a), Ok(b)) = (a, b) else {
                return Err(bad());
            };
            if a.max(low) <= b.min(high) {
                list.push((a.max(low), b.min(high)));
            }
        }
        list.sort_unstable();
        Ok(PortRange {
            low,
            high,
            reserved: list,
        })
    }

    /// Ports the range offers.
    pub fn size(&self) -> u32 {
        let reserved: u32 = self
            .reserved
            .iter()
            .map(|&(a, b)| u32::from(b - a) + 1)
            .sum();
        (u32::from(self.high - self.low) + 1).saturating_sub(reserved)
    }

    pub fn offers(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
            && !self.reserved.iter().any(|&(a, b)| (a..=b).contains(&port))
    }
}

/// What is known of a namespace's range.
enum NsRange {
    /// Asked for (or about to be).
    Asked,
    /// It could not be read (said once, counted).
    Unknown,
    Known(Range),
}

/// A namespace's range and its thresholds in ports.
struct Range {
    range: PortRange,
    size: u32,
    /// `in_use` at which a destination is above, and under which it is
    /// below again.
    above_at: u32,
    below_at: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub in_use: u32,
    pub time_wait: u32,
    above: bool,
}

/// A destination's counts, as a record reports them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pressure {
    pub dest: Dest,
    pub in_use: u32,
    pub time_wait: u32,
    pub range: u32,
    /// Crossed above the threshold (false: fell back below).
    pub above: bool,
}

impl Pressure {
    /// `in_use` over the range.
    pub fn ratio(&self) -> f64 {
        f64::from(self.in_use) / f64::from(self.range.max(1))
    }
}

pub struct Ports {
    /// Counting at all (off: `--port-pressure 0` and no summary or
    /// metrics).
    enabled: bool,
    /// The tracer stopped: the counts stay as they were (the connections
    /// written at exit still hold their ports).
    frozen: bool,
    /// Threshold in percent; 0: counts kept (summary, metrics), no
    /// crossings.
    pct: u8,
    ranges: FastMap<u32, NsRange>,
    dests: FastMap<Dest, Counts>,
    /// Crossings since the caller last took them (capacity kept).
    pub crossed: Vec<Pressure>,
    /// Namespaces met whose range is not asked for yet (and a task in
    /// each, to open it by).
    pub wanted: Vec<(u32, Option<(u32, u32)>)>,
    /// Namespaces whose range could not be read.
    pub unknown_ns: u64,
    /// Connections not counted: [`MAX_DESTS`] destinations were counted.
    pub dests_full: u64,
}

impl Ports {
    pub fn new(pct: u8) -> Self {
        Ports {
            enabled: true,
            frozen: false,
            pct,
            ranges: FastMap::default(),
            dests: FastMap::default(),
            crossed: Vec::with_capacity(16),
            wanted: Vec::new(),
            unknown_ns: 0,
            dests_full: 0,
        }
    }

    /// Counts nothing.
    pub fn disabled() -> Self {
        Ports {
            enabled: false,
            ..Ports::new(0)
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Keeps the counts as they are from now on (at exit).
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Namespace `netns`'s range, read (`Ok`) or not (`Err`, why).
    /// Returns true if it is new: the caller counts its connections.
    pub fn set_range(&mut self, netns: u32, range: Result<PortRange, String>) -> bool {
        if matches!(
            self.ranges.get(&netns),
            Some(NsRange::Known(_) | NsRange::Unknown)
        ) {
            return false;
        }
        match range {
            Ok(range) => {
                let size = range.size();
                let above_at = (size * u32::from(self.pct)).div_ceil(100).max(1);
                let below_at = above_at.saturating_sub((size / 20).max(1)).max(1);
                self.ranges.insert(
                    netns,
                    NsRange::Known(Range {
                        range,
                        size,
                        above_at,
                        below_at,
                    }),
                );
                true
            }
            Err(why) => {
                self.unknown_ns += 1;
                log::info!("netns {netns}: no port pressure: {why}");
                self.ranges.insert(netns, NsRange::Unknown);
                false
            }
        }
    }

    /// Does `lport` of a connection in `netns` hold a port of its range?
    /// A namespace met for the first time is queued in `wanted` (with
    /// `hint`, a task in it).
    pub fn counts(&mut self, netns: u32, lport: u16, hint: Option<(u32, u32)>) -> bool {
        match self.ranges.get(&netns) {
            Some(NsRange::Known(r)) => r.range.offers(lport),
            Some(_) => false,
            None => {
                self.ranges.insert(netns, NsRange::Asked);
                self.wanted.push((netns, hint));
                false
            }
        }
    }

    /// A connection toward `dest` went from holding `from` to `to`.
    /// Returns what it holds now (`Nothing` when its destination could
    /// not be counted).
    pub fn hold(&mut self, dest: Dest, from: Hold, to: Hold) -> Hold {
        if from == to || self.frozen {
            return to;
        }
        let full = self.dests.len() >= MAX_DESTS;
        let counts = match self.dests.get_mut(&dest) {
            Some(c) => c,
            None if from != Hold::Nothing => return Hold::Nothing,
            None if full => {
                self.dests_full += 1;
                return Hold::Nothing;
            }
            None => self.dests.entry(dest).or_default(),
        };
        match from {
            Hold::Nothing => {}
            Hold::Port => counts.in_use -= 1,
            Hold::TimeWait => {
                counts.in_use -= 1;
                counts.time_wait -= 1;
            }
        }
        match to {
            Hold::Nothing => {}
            Hold::Port => counts.in_use += 1,
            Hold::TimeWait => {
                counts.in_use += 1;
                counts.time_wait += 1;
            }
        }
        let c = *counts;
        if c.in_use == 0 {
            self.dests.remove(&dest);
        }
        if self.pct == 0 {
            return to;
        }
        let Some(NsRange::Known(r)) = self.ranges.get(&dest.netns) else {
            return to;
        };
        let crossed = if !c.above && c.in_use >= r.above_at {
            Some(true)
        } else if c.above && c.in_use < r.below_at {
            Some(false)
        } else {
            None
        };
        if let Some(above) = crossed {
            if let Some(counts) = self.dests.get_mut(&dest) {
                counts.above = above;
            }
            self.crossed.push(Pressure {
                dest,
                in_use: c.in_use,
                time_wait: c.time_wait,
                range: r.size,
                above,
            });
        }
        to
    }

    /// Every destination with its counts, for summaries and at exit.
    pub fn pressures(&self) -> impl Iterator<Item = Pressure> + '_ {
        self.dests.iter().filter_map(|(dest, c)| {
            let Some(NsRange::Known(r)) = self.ranges.get(&dest.netns) else {
                return None;
            };
            Some(Pressure {
                dest: *dest,
                in_use: c.in_use,
                time_wait: c.time_wait,
                range: r.size,
                above: c.above,
            })
        })
    }

    /// Bytes its tables hold (for the tracker's total).
    pub fn memory_bytes(&self) -> usize {
        self.dests.capacity() * (size_of::<(Dest, Counts)>() + 1)
            + self.ranges.capacity() * (size_of::<(u32, NsRange)>() + 1)
    }

    /// The `n` destinations with the most ports in use, most first.
    pub fn top(&self, n: usize) -> Vec<Pressure> {
        let mut all: Vec<Pressure> = self.pressures().collect();
        all.sort_by(|a, b| b.in_use.cmp(&a.in_use).then(b.time_wait.cmp(&a.time_wait)));
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest() -> Dest {
        Dest {
            netns: 7,
            laddr: "127.0.0.1".parse().unwrap(),
            raddr: "127.0.0.1".parse().unwrap(),
            rport: 80,
        }
    }

    #[test]
    fn a_range_less_its_reserved_ports() {
        let r = PortRange::parse("40000\t40199\n", "8080,40010-40019,40199-41000\n").unwrap();
        assert_eq!(r.reserved, vec![(40010, 40019), (40199, 40199)]);
        assert_eq!(r.size(), 200 - 11);
        assert!(r.offers(40000) && !r.offers(40015) && !r.offers(40199) && !r.offers(80));
        assert_eq!(PortRange::parse("32768 60999", "").unwrap().size(), 28232);
        assert!(PortRange::parse("x", "").is_err());
        assert!(PortRange::parse("2 1", "").is_err());
        assert!(PortRange::parse("1 2", "a-b").is_err());
    }

    #[test]
    fn crossings_above_and_back_below_with_hysteresis() {
        let mut p = Ports::new(50);
        assert!(!p.counts(7, 40000, None), "unknown until read");
        assert_eq!(p.wanted, vec![(7, None)]);
        assert!(p.set_range(7, PortRange::parse("40000 40199", "")));
        assert!(p.counts(7, 40000, None));
        for i in 0..100 {
            assert!(p.crossed.is_empty(), "not before 100 ({i})");
            p.hold(dest(), Hold::Nothing, Hold::Port);
        }
        assert_eq!(p.crossed.len(), 1);
        let c = p.crossed.pop().unwrap();
        assert_eq!(
            (c.in_use, c.time_wait, c.range, c.above),
            (100, 0, 200, true)
        );
        assert_eq!(c.ratio(), 0.5);
        // Into TIME_WAIT: in use all the same.
        p.hold(dest(), Hold::Port, Hold::TimeWait);
        // Down to 91: still above (below under 90).
        for _ in 0..9 {
            p.hold(dest(), Hold::Port, Hold::Nothing);
        }
        p.hold(dest(), Hold::Nothing, Hold::Port);
        assert!(p.crossed.is_empty());
        assert_eq!(p.top(1)[0].in_use, 92);
        for _ in 0..3 {
            p.hold(dest(), Hold::Port, Hold::Nothing);
        }
        let c = p.crossed.pop().unwrap();
        assert_eq!((c.in_use, c.time_wait, c.above), (89, 1, false));
    }

    #[test]
    fn destinations_are_bounded_and_unreadable_namespaces_counted() {
        let mut p = Ports::new(0);
        assert!(!p.set_range(3, Err("no".into())));
        assert!(!p.set_range(3, Err("no".into())));
        assert_eq!(p.unknown_ns, 1, "once per namespace");
        assert!(!p.counts(3, 40000, None));
        for i in 0..MAX_DESTS + 1 {
            let d = Dest {
                rport: i as u16,
                ..dest()
            };
            p.hold(d, Hold::Nothing, Hold::Port);
        }
        assert_eq!(p.dests_full, 1);
        // Releasing an uncounted one changes nothing.
        let d = Dest {
            rport: MAX_DESTS as u16,
            ..dest()
        };
        assert_eq!(p.hold(d, Hold::Port, Hold::Nothing), Hold::Nothing);
        assert!(p.crossed.is_empty(), "0 disables crossings");
    }
}
