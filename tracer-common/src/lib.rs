//! Types shared by the kernel program (`tracer-ebpf`) and the agent (`tracer`).
//!
//! Everything here is `#[repr(C)]`, has no `bool` and no implicit padding, so
//! the bytes the kernel writes are exactly the bytes the agent decodes. The
//! layout tests at the bottom (and the agent's decoder tests) pin that down.
#![no_std]

// `Pod` (every bit pattern is a valid value, no padding: the derive checks
// it at compile time) is what lets the agent read records from the ring
// buffer's bytes without `unsafe`. bytemuck is no_std and its derives are
// compile-time only, so the kernel program builds with them too.
use bytemuck::{Pod, Zeroable};

/// Record of the `sock:inet_sock_set_state` tracepoint, as described by
/// `/sys/kernel/tracing/events/sock/inet_sock_set_state/format` (stable since
/// Linux 4.16, where the tracepoint was added). The integration test
/// `tracepoint_format` compares every offset and size with the running
/// kernel's format file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct InetSockSetStateRecord {
    pub common_type: u16,
    pub common_flags: u8,
    pub common_preempt_count: u8,
    pub common_pid: i32,
    /// `const void *skaddr`: the socket's kernel address, its identity here.
    pub skaddr: u64,
    pub oldstate: i32,
    pub newstate: i32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub saddr_v6: [u8; 16],
    pub daddr_v6: [u8; 16],
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// A TCP state, numbered as in the kernel's `include/net/tcp_states.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    /// One past the highest state: the size of per-state arrays.
    pub const COUNT: usize = 13;

    pub const ALL: [TcpState; 12] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
    ];

    /// The order in which a connection passes through the states, for
    /// listing a connection's states the way people read them.
    pub const LIFE_ORDER: [TcpState; 12] = [
        TcpState::Listen,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::NewSynRecv,
        TcpState::Established,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::Closing,
        TcpState::TimeWait,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Close,
    ];

    /// The states a connection passes through, in [`TcpState::LIFE_ORDER`]:
    /// without LISTEN (listeners are not connections) and NEW_SYN_RECV
    /// (request sockets, never reported by the tracepoint).
    pub fn of_connections() -> impl Iterator<Item = TcpState> {
        TcpState::LIFE_ORDER
            .into_iter()
            .filter(|s| !matches!(s, TcpState::Listen | TcpState::NewSynRecv))
    }

    /// The kernel's number `n` as a state.
    pub fn from_kernel(n: u8) -> Option<TcpState> {
        TcpState::ALL.get(usize::from(n).checked_sub(1)?).copied()
    }

    /// The kernel's name without `TCP_`, as used in every output format.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// Index into per-state arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Transitions the kernel only makes inside the socket owner's own
    /// system calls (connect, listen, close/shutdown), so the current task
    /// is the owner: the kernel program records the task on these only,
    /// and the agent names the owner from them.
    pub fn runs_in_owner_syscall(old: TcpState, new: TcpState) -> bool {
        runs_in_owner_syscall(old as u8, new as u8)
    }
}

impl core::fmt::Display for TcpState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.pad(self.name())
    }
}

/// TCP states as the kernel numbers them ([`TcpState`]'s values), for
/// the kernel program, which reads them as bytes.
pub mod tcp_state {
    use super::TcpState;

    pub const ESTABLISHED: u8 = TcpState::Established as u8;
    pub const SYN_SENT: u8 = TcpState::SynSent as u8;
    pub const SYN_RECV: u8 = TcpState::SynRecv as u8;
    pub const FIN_WAIT1: u8 = TcpState::FinWait1 as u8;
    pub const FIN_WAIT2: u8 = TcpState::FinWait2 as u8;
    pub const TIME_WAIT: u8 = TcpState::TimeWait as u8;
    pub const CLOSE: u8 = TcpState::Close as u8;
    pub const CLOSE_WAIT: u8 = TcpState::CloseWait as u8;
    pub const LAST_ACK: u8 = TcpState::LastAck as u8;
    pub const LISTEN: u8 = TcpState::Listen as u8;
    pub const CLOSING: u8 = TcpState::Closing as u8;
    pub const NEW_SYN_RECV: u8 = TcpState::NewSynRecv as u8;
}

/// [`TcpState::runs_in_owner_syscall`] on the kernel's numbers.
#[inline(always)]
pub const fn runs_in_owner_syscall(old: u8, new: u8) -> bool {
    use tcp_state::*;
    matches!(
        (old, new),
        (CLOSE, SYN_SENT) | (CLOSE, LISTEN) | (ESTABLISHED, FIN_WAIT1) | (CLOSE_WAIT, LAST_ACK)
    )
}

/// Every ring buffer record starts with this header, so the agent can tell
/// record kinds apart and reject records it does not understand.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EventHeader {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, nanoseconds.
    pub ts_ns: u64,
    /// One of [`EventKind`] as `u32`.
    pub kind: u32,
    /// Size of the whole record in bytes, header included.
    pub len: u32,
}

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Transition = 1,
    /// A timewait socket died ([`TimewaitDeathEvent`]).
    TimewaitDeath = 2,
    /// Several transitions of one socket at once ([`BatchEvent`]).
    Batch = 3,
    /// A TCP reset sent or received by a socket ([`ResetEvent`]).
    Reset = 4,
}

/// Leading fields of the `tcp:tcp_send_reset` record
/// (`/sys/kernel/tracing/events/tcp/tcp_send_reset/format`). Only this
/// prefix is read: it is the same on every supported kernel (4.16+),
/// while the fields after `state` changed (6.10 added `reason` and moved
/// to `sockaddr` addresses). The integration test `reset_tracepoint_formats`
/// checks these offsets against the running kernel's format file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TcpSendResetRecord {
    pub common_type: u16,
    pub common_flags: u8,
    pub common_preempt_count: u8,
    pub common_pid: i32,
    pub skbaddr: u64,
    /// The socket that sends the reset; NULL when none matched the segment
    /// (a SYN to a closed port: nothing to join it to).
    pub skaddr: u64,
    pub state: i32,
    /// `reason` since 6.10 (read at the offset BTF gives:
    /// `global::OFF_RST_REASON`), `sport`/`dport` before.
    pub _kernel_specific: [u8; 4],
}

/// Leading fields of the `tcp:tcp_receive_reset` record
/// (`/sys/kernel/tracing/events/tcp/tcp_receive_reset/format`, the
/// `tcp_event_sk` class, unchanged since 4.16).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TcpReceiveResetRecord {
    pub common_type: u16,
    pub common_flags: u8,
    pub common_preempt_count: u8,
    pub common_pid: i32,
    pub skaddr: u64,
}

/// [`ResetEvent::direction`].
pub const RESET_SENT: u8 = 1;
pub const RESET_RECEIVED: u8 = 2;

/// A reset sent or received by a socket; the agent joins it to the
/// socket's connection by `skaddr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ResetEvent {
    pub header: EventHeader,
    pub skaddr: u64,
    /// [`RESET_SENT`] or [`RESET_RECEIVED`].
    pub direction: u8,
    /// The socket's TCP state when a reset was sent (0 when received: the
    /// tracepoint does not say).
    pub state: u8,
    pub _pad: [u8; 2],
    /// Why the kernel sent it (`enum sk_rst_reason`), where
    /// `tcp:tcp_send_reset` carries it (6.10+); [`RESET_REASON_NONE`] for
    /// received resets and older kernels, [`RESET_REASON_UNREADABLE`] if
    /// the record could not be read.
    pub reason: u32,
}

/// [`ResetEvent::reason`]: the tracepoint carries no reason.
pub const RESET_REASON_NONE: u32 = u32::MAX;
/// [`ResetEvent::reason`]: the reason could not be read from the record.
pub const RESET_REASON_UNREADABLE: u32 = u32::MAX - 1;

/// Names of the reset programs and their tracepoints (category `tcp`).
pub const SEND_RESET_PROGRAM: &str = "tcp_send_reset";
pub const RECEIVE_RESET_PROGRAM: &str = "tcp_receive_reset";

/// A timewait socket ending (fentry on `inet_twsk_kill`, where the kernel
/// allows fentry): its timer fired, or it was killed or reused. The
/// portable path only sees that it is gone at the next sock_diag poll.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TimewaitDeathEvent {
    pub header: EventHeader,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub _pad: u16,
    pub netns: u32,
    pub _reserved: u32,
}

/// Name of the fentry program on `inet_twsk_kill`.
pub const TIMEWAIT_PROGRAM: &str = "timewait_kill";
/// The kernel function it attaches to.
pub const TIMEWAIT_FUNCTION: &str = "inet_twsk_kill";

/// `TransitionEvent::flags`: the kernel saw the socket enter its old state,
/// so `old_state_ns` is meaningful.
pub const FLAG_OLD_STATE_KNOWN: u32 = 1 << 0;

/// `TransitionEvent::flags`: `pid`, `tid`, `uid`, `comm` and `cgroup`
/// hold the current task. The kernel records it only on the transitions
/// that run in the socket owner's own system calls (connect, listen,
/// close/shutdown): elsewhere the current task is whichever one the
/// softirq interrupted, and the fields are 0.
pub const FLAG_TASK: u32 = 1 << 1;

/// One TCP state transition, as submitted to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TransitionEvent {
    pub header: EventHeader,
    pub skaddr: u64,
    /// Nanoseconds spent in `oldstate`; valid with [`FLAG_OLD_STATE_KNOWN`].
    pub old_state_ns: u64,
    /// cgroup v2 id of the current task (`bpf_get_current_cgroup_id()`),
    /// taken only on transitions that run in the owner's own system calls,
    /// where the current task is the owner; 0 on the others.
    pub cgroup: u64,
    /// Source (local) address: IPv4 in the first 4 bytes, or IPv6.
    pub saddr: [u8; 16],
    /// Destination (remote) address, same encoding.
    pub daddr: [u8; 16],
    /// `comm` of the task that was current when the transition fired
    /// (with [`FLAG_TASK`], as the fields below).
    pub comm: [u8; 16],
    /// tgid of the current task (the user-visible pid).
    pub pid: u32,
    /// Thread id of the current task.
    pub tid: u32,
    pub uid: u32,
    pub flags: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub oldstate: u8,
    pub newstate: u8,
    /// Inode number of the socket's network namespace (as in
    /// `/proc/<pid>/ns/net`), or 0 when the kernel offsets are unknown.
    pub netns: u32,
    pub _reserved: u32,
}

/// Transitions one socket's batch holds (`--events connections|none` on
/// the BTF path). A socket's life is 5 transitions in the common cases.
pub const BATCH_STEPS: usize = 6;

/// One transition in a batch. The socket's endpoints are the batch's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BatchStep {
    /// `bpf_ktime_get_ns()` when it fired.
    pub ts_ns: u64,
    /// Time in `old`; valid with [`FLAG_OLD_STATE_KNOWN`] in `flags`.
    pub old_state_ns: u64,
    pub old: u8,
    pub new: u8,
    pub flags: u8,
    /// 0: no task recorded; `n`: the task in `BatchBody::owners[n - 1]` (only
    /// transitions that run in the owner's own system calls record one).
    pub owner: u8,
    pub _pad: u32,
}

/// The current task of a transition that runs in the owner's system call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TaskSlot {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
    /// The task's cgroup v2 id (`bpf_get_current_cgroup_id()`).
    pub cgroup: u64,
}

/// Transitions of one socket not yet delivered. The steps come last: a
/// record carries only the `nsteps` it holds ([`batch_event_len`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BatchBody {
    pub nsteps: u8,
    pub nowners: u8,
    pub _pad: [u8; 6],
    pub owners: [TaskSlot; 2],
    pub steps: [BatchStep; BATCH_STEPS],
}

/// Value of the BTF path's socket-local storage when transitions are
/// batched (`SOCK_STORE`): the timing, and the batch inside the record
/// that will carry it (sent from there, as long as its steps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockState {
    pub timing: SockTiming,
    pub event: BatchEvent,
}

/// Bytes of a [`BatchEvent`] that carries `nsteps` steps (the header's
/// `len`): the steps it does not hold are not sent.
pub const fn batch_event_len(nsteps: usize) -> usize {
    size_of::<BatchEvent>() - (BATCH_STEPS - nsteps) * size_of::<BatchStep>()
}

/// A socket's batch of transitions, delivered at its CLOSE, when a state
/// the agent watches live is entered, or when the batch is full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BatchEvent {
    pub header: EventHeader,
    pub skaddr: u64,
    /// Endpoints when the batch was sent (the latest; a connecting socket's
    /// local port is bound after its first transition).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub _pad: u16,
    pub netns: u32,
    pub _reserved: u32,
    pub batch: BatchBody,
}

/// Indices of the kernel program's per-CPU counters (`COUNTERS` map).
pub mod counter {
    /// TCP transitions the program saw (before filters).
    pub const SEEN: u32 = 0;
    /// Transitions dropped by the in-kernel filters (by design, not a loss).
    pub const FILTERED: u32 = 1;
    /// Ring buffer reservations that failed: events lost.
    pub const RINGBUF_FULL: u32 = 2;
    /// Updates of the per-socket timing map that failed (on the BTF path:
    /// socket storage that could not be created, for lack of memory; the
    /// transition is still sent, once, without its duration).
    pub const TIMING_UPDATE_FAILED: u32 = 3;
    /// A timing entry was found whose state was not the transition's old
    /// state (an earlier transition was missed, or a stale entry of a freed
    /// socket whose address was reused): the duration is reported unknown.
    pub const TIMING_STALE: u32 = 4;
    /// The owner filter's listener table was full.
    pub const LISTENERS_FULL: u32 = 5;
    /// The timewait program could not read a dying timewait socket.
    pub const TIMEWAIT_UNREADABLE: u32 = 6;
    /// Transitions added to a batch, less those sent or lost since: the
    /// sum over CPUs is what still waits in sockets' batches (each CPU's
    /// share wraps; the sum does not).
    pub const BATCH_PENDING: u32 = 7;
    /// Hits the second copy of the BTF program handled because the first
    /// was running (and so skipped by the kernel): the first copy's
    /// `recursion_misses` less these were lost.
    pub const NESTED: u32 = 8;
    /// Resets sent for a segment no socket matched (a SYN or segment to a
    /// closed port): counted, not sent to the agent.
    pub const RESET_NO_SOCKET: u32 = 9;
    /// Reset records lost to a full ring buffer ([`RINGBUF_FULL`] counts
    /// transitions only).
    pub const RESETS_LOST: u32 = 10;
    /// Timewait death records lost to a full ring buffer.
    pub const TIMEWAIT_DEATHS_LOST: u32 = 11;
    pub const COUNT: u32 = 12;
}

/// Value of the per-socket timing map (`SOCK_TIMING`), keyed by socket
/// address: when the socket entered `state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockTiming {
    pub entered_ns: u64,
    pub state: u8,
    /// Non-zero when the socket's owner passed the `--pid`/`--comm` filter.
    pub selected: u8,
    pub _pad: [u8; 6],
}

/// Key of the kernel's listener table (`LISTENERS`): an accepted socket
/// inherits the owner filter's verdict of its listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ListenerKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Names of the globals the agent sets before load (`.rodata`).
pub mod global {
    /// `u16`: 0 for both families, else `AF_INET` or `AF_INET6`.
    pub const FILTER_FAMILY: &str = "FILTER_FAMILY";
    /// `u8`: non-zero when the `PORT_FILTER` map restricts ports.
    pub const FILTER_PORTS: &str = "FILTER_PORTS";
    /// `u8`: non-zero when `LPORT_FILTER` restricts local ports.
    pub const FILTER_LPORTS: &str = "FILTER_LPORTS";
    /// `u8`: non-zero when `RPORT_FILTER` restricts remote ports.
    pub const FILTER_RPORTS: &str = "FILTER_RPORTS";
    /// `u8`: non-zero when `LADDR_FILTER` (an LPM trie) restricts local addresses.
    pub const FILTER_LADDRS: &str = "FILTER_LADDRS";
    /// `u8`: non-zero when `RADDR_FILTER` restricts remote addresses.
    pub const FILTER_RADDRS: &str = "FILTER_RADDRS";
    /// `u16`: bit per TCP state; a transition passes when its old or new
    /// state has its bit. 0: every state.
    pub const FILTER_STATES: &str = "FILTER_STATES";
    /// `u32`: network namespace inode to keep; 0: every namespace.
    pub const FILTER_NETNS: &str = "FILTER_NETNS";
    /// `u8`: non-zero when the owner filter (`FILTER_PID`, `FILTER_COMM`) is on.
    pub const FILTER_OWNER: &str = "FILTER_OWNER";
    /// `u32`: owner tgid to keep; 0: any.
    pub const FILTER_PID: &str = "FILTER_PID";
    /// `[u8; 16]`: owner comm to keep (NUL-padded); all zero: any.
    pub const FILTER_COMM: &str = "FILTER_COMM";
    /// `u32`: bit per cgroup v2 level (root = 0) at which a cgroup of
    /// `CGROUP_FILTER` sits; the owner passes when its ancestor at one of
    /// these levels is in the map. 0: any cgroup.
    pub const FILTER_CGROUP_LEVELS: &str = "FILTER_CGROUP_LEVELS";
    /// `u8`: non-zero to batch each socket's transitions (BTF path;
    /// `--events connections|none`).
    pub const BATCH: &str = "BATCH";
    /// `u16`: bit per TCP state whose entry sends the socket's batch at
    /// once (states the agent must see live).
    pub const FLUSH_STATES: &str = "FLUSH_STATES";
    /// `u64`: ring buffer fill (bytes) past which the agent is woken up;
    /// below it the agent drains on a timer. 0: every event wakes it.
    pub const WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    /// `u32`s: byte offsets in `struct sock_common` (from BTF) of
    /// `skc_family`, `skc_num`, `skc_dport`, `skc_rcv_saddr`, `skc_daddr`,
    /// `skc_v6_rcv_saddr`, `skc_v6_daddr`, for the timewait program.
    pub const OFF_SKC_FAMILY: &str = "OFF_SKC_FAMILY";
    pub const OFF_SKC_NUM: &str = "OFF_SKC_NUM";
    pub const OFF_SKC_DPORT: &str = "OFF_SKC_DPORT";
    pub const OFF_SKC_RCV_SADDR: &str = "OFF_SKC_RCV_SADDR";
    pub const OFF_SKC_DADDR: &str = "OFF_SKC_DADDR";
    pub const OFF_SKC_V6_RCV_SADDR: &str = "OFF_SKC_V6_RCV_SADDR";
    pub const OFF_SKC_V6_DADDR: &str = "OFF_SKC_V6_DADDR";
    /// `u32`s: byte offsets (from BTF) of `sock.sk_protocol` and
    /// `inet_sock.inet_sport`, for the BTF tracepoint.
    pub const OFF_SK_PROTOCOL: &str = "OFF_SK_PROTOCOL";
    pub const OFF_INET_SPORT: &str = "OFF_INET_SPORT";
    /// `u32`: byte offset of `sock_common.skc_net.net` (from BTF), or
    /// [`super::OFFSET_UNKNOWN`].
    pub const OFF_SKC_NET: &str = "OFF_SKC_NET";
    /// `u32`: byte offset of `net.ns.inum` (from BTF), or
    /// [`super::OFFSET_UNKNOWN`].
    pub const OFF_NET_INUM: &str = "OFF_NET_INUM";
    /// `u32`: byte offset of `reason` in the `tcp:tcp_send_reset` record
    /// (`struct trace_event_raw_tcp_send_reset`, from BTF; 6.10+), or
    /// [`super::OFFSET_UNKNOWN`] where the record has none.
    pub const OFF_RST_REASON: &str = "OFF_RST_REASON";
}

/// A kernel struct offset the agent could not find in BTF.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

/// Map names, shared so the agent cannot misspell them.
pub mod map {
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    /// The classic path's per-socket timing (LRU hash).
    pub const SOCK_TIMING: &str = "SOCK_TIMING";
    /// The BTF path's per-socket timing (socket-local storage).
    pub const SOCK_STORE: &str = "SOCK_STORE";
    pub const PORT_FILTER: &str = "PORT_FILTER";
    pub const LPORT_FILTER: &str = "LPORT_FILTER";
    pub const RPORT_FILTER: &str = "RPORT_FILTER";
    pub const LADDR_FILTER: &str = "LADDR_FILTER";
    pub const RADDR_FILTER: &str = "RADDR_FILTER";
    pub const LISTENERS: &str = "LISTENERS";
    /// cgroup v2 ids selected by `--cgroup`/`--container` (hash, u64 -> u8).
    pub const CGROUP_FILTER: &str = "CGROUP_FILTER";
}

/// Prefixes one `--laddr`/`--raddr` filter may list.
pub const MAX_FILTER_PREFIXES: u32 = 64;
/// Listening sockets the kernel remembers for the owner filter.
pub const MAX_LISTENERS: u32 = 4096;
/// cgroups `--cgroup`/`--container` may select (the kernel's map size).
pub const MAX_FILTER_CGROUPS: u32 = 64;
/// Deepest cgroup v2 level a filter can name (bits of
/// `FILTER_CGROUP_LEVELS`; the kernel walks at most this many ancestors).
pub const MAX_CGROUP_LEVEL: u32 = 32;

/// Name of the classic tracepoint program in the object file (the
/// fallback path).
pub const PROGRAM_NAME: &str = "inet_sock_set_state";
/// Names of the two copies of the BTF tracepoint program (the main path):
/// the second handles only the hits the first is skipped for.
pub const BTF_PROGRAM: &str = "sock_set_state";
pub const BTF_PROGRAM_NESTED: &str = "sock_set_state_nested";

/// Ports a single `--port` filter may list.
pub const MAX_FILTER_PORTS: u32 = 64;
/// Words of a port filter's bitmap (`PORT_FILTER` and its kin): one bit
/// per port.
pub const PORT_BITMAP_WORDS: u32 = 65536 / 64;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: derives bytemuck::Pod: `#[repr(C)]`, no padding, any bit
    // pattern valid (checked at compile time).
    unsafe impl aya::Pod for TransitionEvent {}
    // SAFETY: derives bytemuck::Pod: `#[repr(C)]`, no padding, any bit
    // pattern valid (checked at compile time).
    unsafe impl aya::Pod for SockTiming {}
    // SAFETY: derives bytemuck::Pod: `#[repr(C)]`, no padding, any bit
    // pattern valid (checked at compile time).
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: derives bytemuck::Pod: `#[repr(C)]`, no padding, any bit
    // pattern valid (checked at compile time).
    unsafe impl aya::Pod for TimewaitDeathEvent {}
    // SAFETY: derives bytemuck::Pod: `#[repr(C)]`, no padding, any bit
    // pattern valid (checked at compile time).
    unsafe impl aya::Pod for BatchEvent {}
    // SAFETY: derives bytemuck::Pod: `#[repr(C)]`, no padding, any bit
    // pattern valid (checked at compile time).
    unsafe impl aya::Pod for SockState {}
    // SAFETY: derives bytemuck::Pod: `#[repr(C)]`, no padding, any bit
    // pattern valid (checked at compile time).
    unsafe impl aya::Pod for ResetEvent {}
}

// No hidden padding: the sizes are the sums of the fields.
const _: () = assert!(size_of::<InetSockSetStateRecord>() == 72);
const _: () = assert!(size_of::<EventHeader>() == 16);
const _: () = assert!(size_of::<TransitionEvent>() == 16 + 8 + 8 + 8 + 48 + 16 + 8 + 8);
const _: () = assert!(align_of::<TransitionEvent>() <= 8);
const _: () = assert!(size_of::<SockTiming>() == 16);
const _: () = assert!(size_of::<ListenerKey>() == 8);
const _: () = assert!(size_of::<TimewaitDeathEvent>() == 16 + 32 + 8 + 8);
const _: () = assert!(size_of::<BatchStep>() == 24);
const _: () = assert!(size_of::<TaskSlot>() == 40);
const _: () = assert!(size_of::<BatchBody>() == 24 * BATCH_STEPS + 2 * 40 + 8);
const _: () = assert!(size_of::<SockState>() == 16 + size_of::<BatchEvent>());
// The steps end the record.
const _: () = assert!(
    core::mem::offset_of!(BatchEvent, batch) + core::mem::offset_of!(BatchBody, steps)
        == batch_event_len(0)
);
const _: () = assert!(size_of::<BatchEvent>() == 16 + 8 + 32 + 16 + size_of::<BatchBody>());
const _: () = assert!(align_of::<BatchEvent>() <= 8);
const _: () = assert!(size_of::<ResetEvent>() == 16 + 8 + 8);
const _: () = assert!(size_of::<TcpSendResetRecord>() == 8 + 8 + 8 + 4 + 4);
const _: () = assert!(core::mem::offset_of!(TcpSendResetRecord, state) == 24);
const _: () = assert!(size_of::<TcpReceiveResetRecord>() == 16);
// The kernel's numbering (include/net/tcp_states.h), and the owner rule on
// exactly the four owner system calls' transitions.
const _: () = assert!(tcp_state::ESTABLISHED == 1 && tcp_state::NEW_SYN_RECV == 12);
const _: () = assert!(TcpState::COUNT == tcp_state::NEW_SYN_RECV as usize + 1);
const _: () = assert!(
    runs_in_owner_syscall(tcp_state::CLOSE, tcp_state::SYN_SENT)
        && runs_in_owner_syscall(tcp_state::CLOSE, tcp_state::LISTEN)
        && runs_in_owner_syscall(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)
        && runs_in_owner_syscall(tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK)
        && !runs_in_owner_syscall(tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT)
        && !runs_in_owner_syscall(tcp_state::SYN_RECV, tcp_state::ESTABLISHED)
);
