//! How a connection closed: who sent the first FIN, the close handshake's
//! path with the time of each step, and the resets sent and received.
//!
//! In: a connection's close steps ([`ClosePath`], kept by the tracker as
//! transitions and derived timewait steps arrive) and its reset counts
//! (joined by the agent from `tcp:tcp_send_reset`/`tcp_receive_reset`).
//! Out: a [`Close`] for the connection record, the `--events closes`
//! line, the summary and the metrics.
//!
//! Classes (`by`), decided in this order:
//! 1. `refused`: `SYN_SENT -> CLOSE` after a reset was received.
//! 2. `reset_received`: the peer's reset ended it (whatever came before).
//! 3. `reset_sent`: this side sent a reset (an abort: `SO_LINGER` 0,
//!    `close()` with unread data, a kernel abort), and received none.
//! 4. `local`, `peer`, `both`: a FIN handshake that finished: this side
//!    sent the first FIN (FIN_WAIT1), the peer did (CLOSE_WAIT), or both
//!    at once (CLOSING: a simultaneous close).
//! 5. `timeout`: `SYN_SENT -> CLOSE` without a reset (no answer; also a
//!    connect the application gave up on).
//! 6. `abort`: it ended from another state without a finished FIN
//!    handshake and without a reset seen (`ESTABLISHED -> CLOSE` on a
//!    retransmission or keepalive timeout, `SYN_RECV -> CLOSE`, …).
//! 7. `unknown`: nothing of its end was seen, or resets cannot be traced
//!    and the end could have been one (`SYN_SENT -> CLOSE`, or any abort).

use serde::Serialize;

use crate::kernel::events::TcpState;

/// Close steps kept per connection. A close is 2-4 steps; the rest is
/// dropped (and `truncated` set) rather than grown.
pub const MAX_CLOSE_STEPS: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseStep {
    pub old: TcpState,
    pub new: TcpState,
    /// CLOCK_MONOTONIC ns.
    pub at_ns: u64,
}

/// Distinct reset reasons kept per connection: a socket sends a reset or
/// two before it is gone, so more are counted, not named.
pub const MAX_RST_REASONS: usize = 3;

/// The reasons of the resets a connection sent (`enum sk_rst_reason`
/// values), distinct, first seen first, each with its count. Inline and
/// bounded: part of every connection the tracker holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RstReasons {
    values: [u32; MAX_RST_REASONS],
    counts: [u16; MAX_RST_REASONS],
    n: u8,
    /// Resets whose reason did not fit (past [`MAX_RST_REASONS`] others).
    pub unnamed: u16,
}

impl RstReasons {
    /// Counts `n` resets sent for `reason`.
    pub fn add(&mut self, reason: u32, n: u16) {
        let len = usize::from(self.n);
        if let Some(i) = self.values[..len].iter().position(|&v| v == reason) {
            self.counts[i] = self.counts[i].saturating_add(n);
        } else if len < MAX_RST_REASONS {
            self.values[len] = reason;
            self.counts[len] = n;
            self.n += 1;
        } else {
            self.unnamed = self.unnamed.saturating_add(n);
        }
    }

    /// Adds another connection's (a reset that waited for its socket).
    pub fn merge(&mut self, other: &RstReasons) {
        for (reason, n) in other.iter() {
            self.add(reason, n);
        }
        self.unnamed = self.unnamed.saturating_add(other.unnamed);
    }

    /// (reason, resets) pairs, first seen first.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u16)> + '_ {
        let n = usize::from(self.n);
        self.values[..n]
            .iter()
            .copied()
            .zip(self.counts[..n].iter().copied())
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0 && self.unnamed == 0
    }
}

/// A connection's close steps and resets, as they arrive. Packed (times
/// apart from states): it is part of every connection the tracker holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClosePath {
    at_ns: [u64; MAX_CLOSE_STEPS],
    states: [(TcpState, TcpState); MAX_CLOSE_STEPS],
    n: u8,
    pub truncated: bool,
    pub rst_sent: u32,
    pub rst_received: u32,
    /// Why the resets were sent, where the kernel says (6.10+).
    pub rst_reasons: RstReasons,
}

impl Default for ClosePath {
    fn default() -> Self {
        ClosePath {
            at_ns: [0; MAX_CLOSE_STEPS],
            states: [(TcpState::Close, TcpState::Close); MAX_CLOSE_STEPS],
            n: 0,
            truncated: false,
            rst_sent: 0,
            rst_received: 0,
            rst_reasons: RstReasons::default(),
        }
    }
}

/// CloseSteps that belong to the close: everything after ESTABLISHED, and the
/// end of a connection that never got there.
pub fn is_close_step(old: TcpState, new: TcpState) -> bool {
    use TcpState::*;
    match old {
        Established | FinWait1 | FinWait2 | Closing | TimeWait | CloseWait | LastAck => true,
        SynSent | SynRecv => matches!(new, Close | FinWait1 | CloseWait),
        _ => false,
    }
}

impl ClosePath {
    /// Records a step if it belongs to the close.
    pub fn push(&mut self, old: TcpState, new: TcpState, at_ns: u64) {
        if !is_close_step(old, new) {
            return;
        }
        let i = usize::from(self.n);
        if i < MAX_CLOSE_STEPS {
            self.at_ns[i] = at_ns;
            self.states[i] = (old, new);
            self.n += 1;
        } else {
            self.truncated = true;
        }
    }

    /// Drops the last step (the kernel's hand-over to a timewait socket:
    /// the connection goes on).
    pub fn pop(&mut self) -> Option<CloseStep> {
        let last = self.last()?;
        self.n -= 1;
        Some(last)
    }

    fn step(&self, i: usize) -> CloseStep {
        let (old, new) = self.states[i];
        CloseStep {
            old,
            new,
            at_ns: self.at_ns[i],
        }
    }

    pub fn steps(&self) -> impl Iterator<Item = CloseStep> + '_ {
        (0..usize::from(self.n)).map(|i| self.step(i))
    }

    pub fn last(&self) -> Option<CloseStep> {
        let n = usize::from(self.n);
        (n > 0).then(|| self.step(n - 1))
    }

    fn any(&self, f: impl Fn(&CloseStep) -> bool) -> bool {
        self.steps().any(|s| f(&s))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseBy {
    Local,
    Peer,
    Both,
    ResetReceived,
    ResetSent,
    Abort,
    Refused,
    Timeout,
    Unknown,
    /// Not ended yet: only in `close_wait`/`stuck` records (never counted).
    Unfinished,
}

impl CloseBy {
    pub const ALL: [CloseBy; 9] = [
        CloseBy::Local,
        CloseBy::Peer,
        CloseBy::Both,
        CloseBy::ResetReceived,
        CloseBy::ResetSent,
        CloseBy::Abort,
        CloseBy::Refused,
        CloseBy::Timeout,
        CloseBy::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CloseBy::Local => "local",
            CloseBy::Peer => "peer",
            CloseBy::Both => "both",
            CloseBy::ResetReceived => "reset_received",
            CloseBy::ResetSent => "reset_sent",
            CloseBy::Abort => "abort",
            CloseBy::Refused => "refused",
            CloseBy::Timeout => "timeout",
            CloseBy::Unknown => "unknown",
            CloseBy::Unfinished => "unfinished",
        }
    }

    pub fn from_name(name: &str) -> Option<CloseBy> {
        CloseBy::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// Who sent the first FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FirstFin {
    Local,
    Peer,
    Both,
}

/// Resets of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rst {
    pub sent: u32,
    pub received: u32,
    /// Why the sent ones were sent (empty where the kernel does not say).
    pub reasons: RstReasons,
}

/// Up to [`MAX_CLOSE_STEPS`] steps, inline (a close is classified per
/// connection: no allocation for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseSteps {
    items: [CloseStep; MAX_CLOSE_STEPS],
    n: u8,
}

impl std::ops::Deref for CloseSteps {
    type Target = [CloseStep];
    fn deref(&self) -> &[CloseStep] {
        &self.items[..usize::from(self.n)]
    }
}

impl FromIterator<CloseStep> for CloseSteps {
    fn from_iter<I: IntoIterator<Item = CloseStep>>(iter: I) -> Self {
        let filler = CloseStep {
            old: TcpState::Close,
            new: TcpState::Close,
            at_ns: 0,
        };
        let mut s = CloseSteps {
            items: [filler; MAX_CLOSE_STEPS],
            n: 0,
        };
        for (slot, step) in s.items.iter_mut().zip(iter) {
            *slot = step;
            s.n += 1;
        }
        s
    }
}

/// How one connection closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub by: CloseBy,
    pub first_fin: Option<FirstFin>,
    /// From the first FIN to the end of the handshake: entry into
    /// TIME_WAIT on the side that closed first, CLOSE otherwise.
    pub fin_to_close_ns: Option<u64>,
    /// The close steps, in order, with their times since the first.
    pub handshake: CloseSteps,
    /// None when the kernel's reset tracepoints are not attached.
    pub rst: Option<Rst>,
}

impl Close {
    /// Time of step `i` since the first step.
    pub fn at_ns(&self, i: usize) -> u64 {
        match (self.handshake.first(), self.handshake.get(i)) {
            (Some(first), Some(s)) => s.at_ns.saturating_sub(first.at_ns),
            _ => 0,
        }
    }
}

fn first_fin(path: &ClosePath) -> Option<(FirstFin, u64)> {
    use TcpState::*;
    let both = path.any(|s| s.new == Closing || s.old == Closing);
    let first = path.steps().find_map(|s| {
        let side = |st: TcpState| match st {
            FinWait1 | FinWait2 | Closing => Some(FirstFin::Local),
            CloseWait | LastAck => Some(FirstFin::Peer),
            _ => None,
        };
        // The step into the state is the FIN; a path that starts inside
        // the close (a socket older than the tracer) has no time for it.
        if let Some(side) =
            side(s.new).filter(|_| !matches!(s.old, FinWait1 | FinWait2 | CloseWait))
        {
            return Some((side, Some(s.at_ns)));
        }
        side(s.old).map(|side| (side, None))
    })?;
    let side = if both { FirstFin::Both } else { first.0 };
    Some((side, first.1.unwrap_or(u64::MAX)))
}

/// Classifies a connection's close (see the module doc). `resets_known`:
/// the reset tracepoints are attached, so zero resets means none.
pub fn classify(path: &ClosePath, resets_known: bool) -> Close {
    use TcpState::*;
    let fin = first_fin(path);
    let last = path.last();
    let refused_or_timeout = last.is_some_and(|s| s.old == SynSent && s.new == Close);
    let entered_time_wait = path.steps().find(|s| s.new == TimeWait);
    let finished = entered_time_wait.is_some()
        || last.is_some_and(|s| s.new == Close && matches!(s.old, LastAck | FinWait2));
    let by = if resets_known && refused_or_timeout && path.rst_received > 0 {
        CloseBy::Refused
    } else if resets_known && path.rst_received > 0 {
        CloseBy::ResetReceived
    } else if resets_known && path.rst_sent > 0 {
        CloseBy::ResetSent
    } else if let (Some((side, _)), true) = (fin, finished) {
        match side {
            FirstFin::Local => CloseBy::Local,
            FirstFin::Peer => CloseBy::Peer,
            FirstFin::Both => CloseBy::Both,
        }
    } else if last.is_none() || !resets_known {
        CloseBy::Unknown
    } else if refused_or_timeout {
        CloseBy::Timeout
    } else {
        CloseBy::Abort
    };
    let fin_to_close_ns = fin.and_then(|(_, at)| {
        if at == u64::MAX {
            return None;
        }
        let end = match entered_time_wait {
            Some(tw) => tw.at_ns,
            None => last.filter(|s| s.new == Close)?.at_ns,
        };
        Some(end.saturating_sub(at))
    });
    crate::track::close::Close {
        by,
        first_fin: fin.map(|(side, _)| side),
        fin_to_close_ns,
        handshake: path.steps().collect(),
        rst: resets_known.then_some(Rst {
            sent: path.rst_sent,
            received: path.rst_received,
            reasons: path.rst_reasons,
        }),
    }
}

/// The close of a connection that has not ended (a stuck connection):
/// its steps so far, who sent the first FIN, `by` = `unfinished`.
pub fn so_far(path: &ClosePath, resets_known: bool) -> Close {
    let mut c = classify(path, resets_known);
    c.by = CloseBy::Unfinished;
    c.fin_to_close_ns = None;
    c
}

/// The close of a connection the tracer stopped watching before its end:
/// classified from what was seen; an end not seen is `unfinished`, not
/// an abort.
pub fn cut_short(path: &ClosePath, resets_known: bool) -> Close {
    let mut c = classify(path, resets_known);
    if matches!(c.by, CloseBy::Abort | CloseBy::Unknown | CloseBy::Timeout) {
        c.by = CloseBy::Unfinished;
        c.fin_to_close_ns = None;
    }
    c
}

/// Where a finished connection can still get a reset joined: the kernel
/// sends an abort's RST just after the `-> CLOSE` (`tcp_disconnect`,
/// `close()` with unread data), so such records wait this long (and for
/// the next drain of the ring buffer) before they are written.
pub const RESET_GRACE_NS: u64 = 20_000_000;

#[cfg(test)]
mod tests {
    use super::*;
    use TcpState::*;

    const MS: u64 = 1_000_000;

    fn path(steps: &[(TcpState, TcpState, u64)]) -> ClosePath {
        let mut p = ClosePath::default();
        for &(o, n, ms) in steps {
            p.push(o, n, ms * MS);
        }
        p
    }

    fn names(c: &super::Close) -> Vec<String> {
        c.handshake
            .iter()
            .map(|s| format!("{}>{}", s.old, s.new))
            .collect()
    }

    #[test]
    fn client_first_ends_at_time_wait_entry() {
        let p = path(&[
            (Close, SynSent, 0),
            (SynSent, Established, 1),
            (Established, FinWait1, 100),
            (FinWait1, FinWait2, 140),
            (FinWait2, TimeWait, 150),
            (TimeWait, Close, 60_150),
        ]);
        let c = classify(&p, true);
        assert_eq!(c.by, CloseBy::Local);
        assert_eq!(c.first_fin, Some(FirstFin::Local));
        assert_eq!(c.fin_to_close_ns, Some(50 * MS));
        assert_eq!(
            names(&c),
            [
                "ESTABLISHED>FIN_WAIT1",
                "FIN_WAIT1>FIN_WAIT2",
                "FIN_WAIT2>TIME_WAIT",
                "TIME_WAIT>CLOSE"
            ]
        );
        assert_eq!(c.at_ns(3), 60_050 * MS);
        assert_eq!(c.rst, Some(Rst::default()));
    }

    #[test]
    fn server_side_of_a_client_close_is_peer() {
        let p = path(&[
            (Listen, SynRecv, 0),
            (SynRecv, Established, 1),
            (Established, CloseWait, 100),
            (CloseWait, LastAck, 150),
            (LastAck, Close, 151),
        ]);
        let c = classify(&p, true);
        assert_eq!((c.by, c.first_fin), (CloseBy::Peer, Some(FirstFin::Peer)));
        assert_eq!(c.fin_to_close_ns, Some(51 * MS));
        assert_eq!(c.handshake.len(), 3);
    }

    #[test]
    fn simultaneous_close_is_both() {
        let p = path(&[
            (Established, FinWait1, 10),
            (FinWait1, Closing, 11),
            (Closing, TimeWait, 12),
            (TimeWait, Close, 60_012),
        ]);
        let c = classify(&p, true);
        assert_eq!((c.by, c.first_fin), (CloseBy::Both, Some(FirstFin::Both)));
        assert_eq!(c.fin_to_close_ns, Some(2 * MS));
    }

    #[test]
    fn reset_reasons_are_distinct_and_bounded() {
        let mut r = RstReasons::default();
        assert!(r.is_empty());
        r.add(12, 1);
        r.add(8, 1);
        r.add(12, 2);
        assert_eq!(r.iter().collect::<Vec<_>>(), [(12, 3), (8, 1)]);
        let mut more = RstReasons::default();
        for v in [1, 2, 3] {
            more.add(v, 1);
        }
        r.merge(&more);
        // Room for one more distinct reason: the others are only counted.
        assert_eq!(r.iter().collect::<Vec<_>>(), [(12, 3), (8, 1), (1, 1)]);
        assert_eq!(r.unnamed, 2);
        r.add(7, u16::MAX);
        assert_eq!(r.unnamed, u16::MAX);
    }

    #[test]
    fn resets_name_the_end() {
        let mut p = path(&[(SynSent, Established, 1), (Established, Close, 5)]);
        assert_eq!(classify(&p, true).by, CloseBy::Abort);
        assert_eq!(classify(&p, false).by, CloseBy::Unknown);
        assert_eq!(classify(&p, false).rst, None);
        p.rst_sent = 1;
        p.rst_reasons.add(12, 1);
        let c = classify(&p, true);
        assert_eq!((c.by, c.fin_to_close_ns), (CloseBy::ResetSent, None));
        assert_eq!(
            c.rst,
            Some(Rst {
                sent: 1,
                received: 0,
                reasons: p.rst_reasons,
            })
        );
        assert_eq!(c.rst.unwrap().reasons.iter().collect::<Vec<_>>(), [(12, 1)]);
        p.rst_received = 1;
        assert_eq!(classify(&p, true).by, CloseBy::ResetReceived);
    }

    #[test]
    fn reset_after_a_fin_keeps_who_closed_first() {
        let mut p = path(&[(Established, FinWait1, 10), (FinWait1, FinWait2, 11)]);
        p.push(FinWait2, Close, 20 * MS);
        p.rst_received = 1;
        let c = classify(&p, true);
        assert_eq!(
            (c.by, c.first_fin),
            (CloseBy::ResetReceived, Some(FirstFin::Local))
        );
        assert_eq!(c.fin_to_close_ns, Some(10 * MS));
    }

    #[test]
    fn failed_connects() {
        let mut p = path(&[(Close, SynSent, 0), (SynSent, Close, 3)]);
        assert_eq!(classify(&p, true).by, CloseBy::Timeout);
        assert_eq!(classify(&p, true).handshake.len(), 1);
        p.rst_received = 1;
        assert_eq!(classify(&p, true).by, CloseBy::Refused);
        assert_eq!(classify(&p, false).by, CloseBy::Unknown);
    }

    #[test]
    fn a_close_first_seen_half_way_has_a_side_but_no_fin_time() {
        // From the start-up snapshot: already in CLOSE_WAIT.
        let p = path(&[(CloseWait, LastAck, 500), (LastAck, Close, 501)]);
        let c = classify(&p, true);
        assert_eq!(
            (c.by, c.first_fin, c.fin_to_close_ns),
            (CloseBy::Peer, Some(FirstFin::Peer), None)
        );
        assert_eq!(classify(&ClosePath::default(), true).by, CloseBy::Unknown);
    }

    #[test]
    fn a_half_close_so_far() {
        let p = path(&[(Established, FinWait1, 10), (FinWait1, FinWait2, 11)]);
        let c = so_far(&p, true);
        assert_eq!(
            (c.by, c.first_fin, c.fin_to_close_ns),
            (CloseBy::Unfinished, Some(FirstFin::Local), None)
        );
        assert_eq!(names(&c), ["ESTABLISHED>FIN_WAIT1", "FIN_WAIT1>FIN_WAIT2"]);
        assert!(!CloseBy::ALL.contains(&CloseBy::Unfinished));
    }

    #[test]
    fn path_is_bounded_and_pop_undoes_a_hand_over() {
        let mut p = ClosePath::default();
        for i in 0..10 {
            p.push(Established, FinWait1, i);
        }
        assert_eq!(p.steps().count(), MAX_CLOSE_STEPS);
        assert!(p.truncated);
        let mut p = path(&[(FinWait1, FinWait2, 1), (FinWait2, Close, 2)]);
        assert_eq!(p.pop().map(|s| s.new), Some(Close));
        assert_eq!(p.last().map(|s| s.new), Some(FinWait2));
        // Opening steps are not part of the close.
        let p = path(&[
            (Close, SynSent, 0),
            (SynSent, Established, 1),
            (Close, Listen, 2),
        ]);
        assert_eq!(p.steps().count(), 0);
    }

    #[test]
    fn names_round_trip() {
        for b in CloseBy::ALL {
            assert_eq!(CloseBy::from_name(b.name()), Some(b));
            assert_eq!(serde_json::to_value(b).unwrap(), b.name());
        }
    }
}
