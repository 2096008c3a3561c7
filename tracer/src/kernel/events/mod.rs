//! Decoding of the kernel program's ring buffer records.
//!
//! Records are read by value, unaligned, into tracer-common's plain-old-data
//! types (`bytemuck::Pod`, derived: no `unsafe` here), so the decoder never
//! trusts the alignment or the length of what the ring buffer hands over: a
//! short or unknown record is an error the caller counts, never a panic.
//! Decoding allocates nothing (the fuzz target `decode_record` checks it).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use std::mem::offset_of;

use bytemuck::{Pod, Zeroable};
use thiserror::Error;
use tracer_common::{
    batch_event_len, BatchEvent, BatchStep, EventHeader, EventKind, ResetEvent, TaskSlot,
    TimewaitDeathEvent, TransitionEvent, AF_INET, AF_INET6, BATCH_STEPS, FLAG_OLD_STATE_KNOWN,
    FLAG_TASK, RESET_REASON_NONE, RESET_RECEIVED, RESET_SENT,
};

/// Defined with the kernel program's numbering in tracer-common.
pub use tracer_common::TcpState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
    pub fn af(self) -> u16 {
        match self {
            Family::Ipv4 => AF_INET,
            Family::Ipv6 => AF_INET6,
        }
    }
}

/// A task's `comm`: up to 16 bytes, NUL-padded, kept inline (no allocation
/// per event).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm([u8; 16]);

impl Comm {
    pub fn new(raw: [u8; 16]) -> Self {
        Comm(raw)
    }
    /// From a name (e.g. /proc/<pid>/comm), truncated to 15 bytes as the
    /// kernel does.
    pub fn from_name(name: &str) -> Self {
        let mut raw = [0u8; 16];
        let n = name.len().min(15);
        raw[..n].copy_from_slice(&name.as_bytes()[..n]);
        Comm(raw)
    }

    /// The name's bytes, up to its NUL (as the kernel wrote them: not
    /// always UTF-8).
    pub fn bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        &self.0[..end]
    }

    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let name = self.bytes();
        // Nearly every name is valid UTF-8: `from_utf8` checks it faster
        // than the lossy conversion walks it.
        match std::str::from_utf8(name) {
            Ok(name) => std::borrow::Cow::Borrowed(name),
            Err(_) => String::from_utf8_lossy(name),
        }
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// How a transition record was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Source {
    /// Reported by the kernel's `inet_sock_set_state` tracepoint.
    #[default]
    Tracepoint,
    /// Derived from a NETLINK_SOCK_DIAG dump of timewait sockets.
    SockDiag,
    /// Derived from a new connection on the same 4-tuple, which ends the
    /// old connection's timewait socket.
    Reuse,
    /// The fentry program on `inet_twsk_kill`: the exact death of a
    /// timewait socket.
    Fentry,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Tracepoint => "tracepoint",
            Source::SockDiag => "sock_diag",
            Source::Reuse => "reuse",
            Source::Fentry => "fentry",
        }
    }
}

/// One decoded TCP state transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds when it fired.
    pub mono_ns: u64,
    /// Kernel address of the socket: its identity while it lives.
    pub sock: u64,
    /// The current task's fields below hold it: the kernel records the
    /// task only on transitions that run in the owner's own system calls.
    pub task: bool,
    /// Current task when the transition fired (not always the owner).
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: Comm,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub old: TcpState,
    pub new: TcpState,
    /// Time spent in `old`, if the kernel saw the socket enter it.
    pub old_state_ns: Option<u64>,
    /// Inode number of the socket's network namespace; 0 if unknown.
    pub netns: u32,
    /// cgroup v2 id of the current task, on transitions that run in the
    /// owner's own system calls (the kernel takes it only there); else 0.
    pub cgroup: u64,
    pub source: Source,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    ShortHeader(usize),
    #[error("record of kind {kind} has {got} bytes, expected {want}")]
    BadLength { kind: u32, got: usize, want: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown TCP state {0}")]
    BadState(u8),
    #[error("unknown address family {0}")]
    BadFamily(u16),
    #[error("batch with bad step or task count {0}")]
    BadSteps(u8),
    #[error("reset record with unknown direction {0}")]
    BadDirection(u8),
}

/// Who sent a reset, from the socket's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetDirection {
    Sent,
    Received,
}

/// A reset sent or received by a socket (`tcp:tcp_send_reset`,
/// `tcp:tcp_receive_reset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub mono_ns: u64,
    pub sock: u64,
    pub direction: ResetDirection,
    /// The socket's state when it sent the reset (None when received).
    pub state: Option<TcpState>,
    /// Why the kernel sent it (`enum sk_rst_reason`, named by
    /// [`crate::kernel::reset_reasons::ResetReasons`]); None when received,
    /// or where the kernel's tracepoint carries no reason (before 6.10).
    pub reason: Option<u32>,
}

/// A timewait socket's death, seen by the fentry program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitDeath {
    pub mono_ns: u64,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub netns: u32,
}

/// Any ring buffer record. A batch is a view of the record's bytes,
/// decoded step by step as it is read: no copy of the batch, no large
/// value moved per record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Transition(Transition),
    TimewaitDeath(TimewaitDeath),
    /// Transitions of one socket, in order.
    Batch(BatchView<'a>),
    Reset(Reset),
}

/// A validated [`BatchEvent`] in the ring buffer (as long as its steps:
/// [`batch_event_len`]): up to [`BATCH_STEPS`] transitions of one socket
/// with the batch's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchView<'a> {
    bytes: &'a [u8],
    mono_ns: u64,
    sock: u64,
    family: Family,
    laddr: IpAddr,
    lport: u16,
    raddr: IpAddr,
    rport: u16,
    netns: u32,
    steps: usize,
}

const STEPS_AT: usize = offset_of!(BatchEvent, batch) + offset_of!(tracer_common::BatchBody, steps);
const OWNERS_AT: usize =
    offset_of!(BatchEvent, batch) + offset_of!(tracer_common::BatchBody, owners);

impl<'a> BatchView<'a> {
    fn step(&self, i: usize) -> Option<BatchStep> {
        read_at(self.bytes, STEPS_AT + i * size_of::<BatchStep>())
    }

    fn task(&self, k: u8) -> Option<TaskSlot> {
        let i = usize::from(k.checked_sub(1)?);
        (i < tracer_common::BatchBody::default().owners.len())
            .then(|| read_at(self.bytes, OWNERS_AT + i * size_of::<TaskSlot>()))
            .flatten()
    }

    /// When the batch's first transition fired.
    pub fn mono_ns(&self) -> u64 {
        self.mono_ns
    }

    pub fn len(&self) -> usize {
        self.steps
    }

    pub fn is_empty(&self) -> bool {
        self.steps == 0
    }

    /// Each step as the transition the kernel would have sent alone, with
    /// the batch's endpoints. Steps that ran in the owner's system call
    /// carry the task that was current; the others carry none (pid 0),
    /// which nothing reads in the modes that batch.
    pub fn transitions(&self) -> impl Iterator<Item = Transition> + '_ {
        (0..self.steps).filter_map(move |i| {
            let step = self.step(i)?;
            let task = self.task(step.owner);
            Some(Transition {
                mono_ns: step.ts_ns,
                sock: self.sock,
                task: task.is_some(),
                pid: task.map_or(0, |t| t.pid),
                tid: task.map_or(0, |t| t.tid),
                uid: task.map_or(0, |t| t.uid),
                comm: Comm(task.map_or([0; 16], |t| t.comm)),
                family: self.family,
                laddr: self.laddr,
                lport: self.lport,
                raddr: self.raddr,
                rport: self.rport,
                old: TcpState::from_kernel(step.old)?,
                new: TcpState::from_kernel(step.new)?,
                old_state_ns: (u32::from(step.flags) & FLAG_OLD_STATE_KNOWN != 0)
                    .then_some(step.old_state_ns),
                netns: self.netns,
                cgroup: task.map_or(0, |t| t.cgroup),
                source: Source::Tracepoint,
            })
        })
    }
}

/// The transitions a record that could not be decoded carried: a batch's
/// step count where it is readable and plausible, else 1 for a record of a
/// transition kind, 0 for resets and timewait deaths.
pub fn transitions_claimed(bytes: &[u8]) -> u64 {
    let Some(header) = read::<EventHeader>(bytes) else {
        return 1;
    };
    if header.kind == EventKind::Reset as u32 || header.kind == EventKind::TimewaitDeath as u32 {
        return 0;
    }
    if header.kind == EventKind::Batch as u32 {
        let at = offset_of!(BatchEvent, batch) + offset_of!(tracer_common::BatchBody, nsteps);
        if let Some([n, _]) = read_at::<[u8; 2]>(bytes, at) {
            if (1..=BATCH_STEPS).contains(&usize::from(n)) {
                return u64::from(n);
            }
        }
    }
    1
}

/// Decodes one ring buffer record of any kind.
pub fn decode_record(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
    let header: EventHeader = read(bytes).ok_or(DecodeError::ShortHeader(bytes.len()))?;
    if header.kind == EventKind::Batch as u32 {
        return decode_batch(bytes).map(Record::Batch);
    }
    if header.kind == EventKind::Reset as u32 {
        return decode_reset(bytes).map(Record::Reset);
    }
    if header.kind != EventKind::TimewaitDeath as u32 {
        return decode(bytes).map(Record::Transition);
    }
    let want = size_of::<TimewaitDeathEvent>();
    check_len(bytes, &header, want)?;
    let ev: TimewaitDeathEvent = read(bytes).ok_or(DecodeError::ShortHeader(bytes.len()))?;
    let family = family_of(ev.family)?;
    Ok(Record::TimewaitDeath(TimewaitDeath {
        mono_ns: ev.header.ts_ns,
        family,
        laddr: addr(family, ev.saddr),
        lport: ev.sport,
        raddr: addr(family, ev.daddr),
        rport: ev.dport,
        netns: ev.netns,
    }))
}

pub fn decode_reset(bytes: &[u8]) -> Result<Reset, DecodeError> {
    let header: EventHeader = read(bytes).ok_or(DecodeError::ShortHeader(bytes.len()))?;
    check_len(bytes, &header, size_of::<ResetEvent>())?;
    let ev: ResetEvent = read(bytes).ok_or(DecodeError::ShortHeader(bytes.len()))?;
    let direction = match ev.direction {
        RESET_SENT => ResetDirection::Sent,
        RESET_RECEIVED => ResetDirection::Received,
        d => return Err(DecodeError::BadDirection(d)),
    };
    Ok(Reset {
        mono_ns: ev.header.ts_ns,
        sock: ev.skaddr,
        direction,
        state: TcpState::from_kernel(ev.state),
        reason: (ev.reason != RESET_REASON_NONE).then_some(ev.reason),
    })
}

/// Checks a batch record (its length, family, step count, every step's
/// states and task index) and returns a view of it.
pub fn decode_batch(bytes: &[u8]) -> Result<BatchView<'_>, DecodeError> {
    let header: EventHeader = read(bytes).ok_or(DecodeError::ShortHeader(bytes.len()))?;
    // Up to the steps, whose count says how long the record is.
    let fixed = batch_event_len(0);
    if bytes.len() < fixed {
        return Err(DecodeError::BadLength {
            kind: header.kind,
            got: bytes.len(),
            want: fixed,
        });
    }
    let short = || DecodeError::ShortHeader(bytes.len());
    let prefix: BatchPrefix = read(bytes).ok_or_else(short)?;
    let family = family_of(prefix.family)?;
    let counts: [u8; 2] = read_at(
        bytes,
        offset_of!(BatchEvent, batch) + offset_of!(tracer_common::BatchBody, nsteps),
    )
    .ok_or_else(short)?;
    let n = usize::from(counts[0]);
    if n == 0 || n > BATCH_STEPS {
        return Err(DecodeError::BadSteps(counts[0]));
    }
    check_len(bytes, &header, batch_event_len(n))?;
    let view = BatchView {
        bytes,
        mono_ns: prefix.header.ts_ns,
        sock: prefix.skaddr,
        family,
        laddr: addr(family, prefix.saddr),
        lport: prefix.sport,
        raddr: addr(family, prefix.daddr),
        rport: prefix.dport,
        netns: prefix.netns,
        steps: n,
    };
    for i in 0..n {
        let step = view.step(i).ok_or_else(short)?;
        for st in [step.old, step.new] {
            TcpState::from_kernel(st).ok_or(DecodeError::BadState(st))?;
        }
        if step.owner != 0 && view.task(step.owner).is_none() {
            return Err(DecodeError::BadSteps(step.owner));
        }
    }
    Ok(view)
}

/// The fields of a [`BatchEvent`] before its batch (the same layout; the
/// decoder reads them without copying the batch).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct BatchPrefix {
    header: EventHeader,
    skaddr: u64,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    family: u16,
    _pad: u16,
    netns: u32,
    _reserved: u32,
}

const _: () = assert!(size_of::<BatchPrefix>() == offset_of!(BatchEvent, batch));
const _: () = assert!(offset_of!(BatchPrefix, netns) == offset_of!(BatchEvent, netns));

/// Decodes one transition record.
pub fn decode(bytes: &[u8]) -> Result<Transition, DecodeError> {
    let header: EventHeader = read(bytes).ok_or(DecodeError::ShortHeader(bytes.len()))?;
    if header.kind != EventKind::Transition as u32 {
        return Err(DecodeError::UnknownKind(header.kind));
    }
    let want = size_of::<TransitionEvent>();
    check_len(bytes, &header, want)?;
    let ev: TransitionEvent = read(bytes).ok_or(DecodeError::ShortHeader(bytes.len()))?;
    let family = family_of(ev.family)?;
    let state = |n| TcpState::from_kernel(n).ok_or(DecodeError::BadState(n));
    Ok(Transition {
        mono_ns: ev.header.ts_ns,
        sock: ev.skaddr,
        task: ev.flags & FLAG_TASK != 0,
        pid: ev.pid,
        tid: ev.tid,
        uid: ev.uid,
        comm: Comm(ev.comm),
        family,
        laddr: addr(family, ev.saddr),
        lport: ev.sport,
        raddr: addr(family, ev.daddr),
        rport: ev.dport,
        old: state(ev.oldstate)?,
        new: state(ev.newstate)?,
        old_state_ns: (ev.flags & FLAG_OLD_STATE_KNOWN != 0).then_some(ev.old_state_ns),
        netns: ev.netns,
        cgroup: ev.cgroup,
        source: Source::Tracepoint,
    })
}

/// The record is exactly `want` bytes, and says so in its header.
fn check_len(bytes: &[u8], header: &EventHeader, want: usize) -> Result<(), DecodeError> {
    if bytes.len() < want || header.len as usize != want {
        return Err(DecodeError::BadLength {
            kind: header.kind,
            got: bytes.len(),
            want,
        });
    }
    Ok(())
}

fn family_of(af: u16) -> Result<Family, DecodeError> {
    match af {
        AF_INET => Ok(Family::Ipv4),
        AF_INET6 => Ok(Family::Ipv6),
        other => Err(DecodeError::BadFamily(other)),
    }
}

fn addr(family: Family, raw: [u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(raw)),
    }
}

/// Reads a `T` from the front of `bytes`, if it is long enough.
fn read<T: Pod>(bytes: &[u8]) -> Option<T> {
    read_at(bytes, 0)
}

/// Reads a `T` at byte `at` of `bytes`, if it lies within. `Pod`: any
/// bytes are a valid `T`; the read is unaligned (the ring buffer's records
/// are 8-byte aligned, a test's slices need not be).
fn read_at<T: Pod>(bytes: &[u8], at: usize) -> Option<T> {
    let b = bytes.get(at..at.checked_add(size_of::<T>())?)?;
    bytemuck::try_pod_read_unaligned(b).ok()
}

/// Encodes a transition the way the kernel program does. Used by tests and
/// by the benchmarks' decoder measurements.
pub fn encode(t: &Transition) -> Vec<u8> {
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    for (dst, a) in [(&mut saddr, t.laddr), (&mut daddr, t.raddr)] {
        match a {
            IpAddr::V4(v4) => dst[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => *dst = v6.octets(),
        }
    }
    let ev = TransitionEvent {
        header: EventHeader {
            ts_ns: t.mono_ns,
            kind: EventKind::Transition as u32,
            len: size_of::<TransitionEvent>() as u32,
        },
        skaddr: t.sock,
        old_state_ns: t.old_state_ns.unwrap_or(0),
        cgroup: t.cgroup,
        saddr,
        daddr,
        comm: t.comm.0,
        pid: t.pid,
        tid: t.tid,
        uid: t.uid,
        flags: if t.old_state_ns.is_some() {
            FLAG_OLD_STATE_KNOWN
        } else {
            0
        } | if t.task { FLAG_TASK } else { 0 },
        sport: t.lport,
        dport: t.rport,
        family: t.family.af(),
        oldstate: t.old as u8,
        newstate: t.new as u8,
        netns: t.netns,
        _reserved: 0,
    };
    bytemuck::bytes_of(&ev).to_vec()
}

#[cfg(test)]
pub(crate) mod tests;
