//! What every TCP state transition goes through, whichever program saw it
//! (the BTF tracepoint in `btf.rs`, or the classic tracepoint in
//! `classic.rs`): timing, filters, and the record to the agent.
//!
//! The two programs differ in where they read the socket from (the typed
//! `struct sock *`, or the tracepoint's record) and where they keep its
//! timing (socket-local storage, or an LRU hash): the [`Socket`] trait.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{self, bpf_get_current_cgroup_id},
    },
    macros::map,
    maps::{PerCpuArray, RingBuf},
    Global,
};

use crate::filter;
use tracer_common::{
    batch_event_len, counter, runs_in_owner_syscall, tcp_state, BatchEvent, EventHeader, EventKind,
    SockTiming, TransitionEvent, BATCH_STEPS, FLAG_OLD_STATE_KNOWN, FLAG_TASK,
};

/// Batch each socket's transitions (`--events connections|none`, where
/// nobody reads them one by one); see [`Socket::batch`].
#[unsafe(no_mangle)]
static BATCH: Global<u8> = Global::new(0);
/// Bit per state whose entry sends the batch at once.
#[unsafe(no_mangle)]
static FLUSH_STATES: Global<u16> = Global::new(0);

/// Wake the agent only once this many bytes wait in the ring buffer: a
/// wake-up per event was the dominant cost of delivery (2-3 µs each in
/// this VM, against ~0.6 µs without). The agent also drains on a timer.
/// 0: wake up on every event.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(0);

/// Sized by the agent (`--ringbuf-size`) before load.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Are transitions batched per socket (set before load)?
#[inline(always)]
pub(crate) fn batching() -> bool {
    BATCH.load() != 0
}

/// A TCP socket as one program sees it.
pub(crate) trait Socket {
    /// Kernel address: the socket's identity for the agent.
    fn addr(&self) -> u64;
    fn family(&self) -> u16;
    /// (local, remote) port, host byte order.
    fn ports(&self) -> (u16, u16);
    /// (local, remote) address as four native-endian words (IPv4 in the
    /// first).
    fn addresses(&self, family: u16) -> ([u32; 4], [u32; 4]);
    /// Namespace inode, 0 if unknown.
    fn netns(&self) -> u32;
    /// The socket's timing slot; `create` where the store can make one in
    /// place.
    fn timing(&self, create: bool) -> Option<*mut SockTiming>;
    /// Stores `t` when [`Socket::timing`] gave no slot; false if it could
    /// not.
    fn insert_timing(&self, t: &SockTiming) -> bool;
    /// The socket reached CLOSE: its timing ends.
    fn forget_timing(&self, slot: Option<*mut SockTiming>);
    /// The record holding the batch that goes with the timing `slot`,
    /// where the store keeps one (socket-local storage: it is freed with
    /// the socket, so a batch cannot outlive it unseen; an LRU entry could
    /// be evicted).
    fn batch(&self, slot: *mut SockTiming) -> Option<*mut BatchEvent>;
}

/// Why a transition produced no record. Every variant but `NotTcp` is
/// counted.
pub(crate) enum TransitionSkip {
    NotTcp,
    Filtered,
    RingBufFull,
}

/// Counts what [`on_transition`] returned.
#[inline(always)]
pub(crate) fn count(result: Result<(), TransitionSkip>) {
    match result {
        Ok(()) | Err(TransitionSkip::NotTcp) => {}
        Err(TransitionSkip::Filtered) => bump(counter::FILTERED),
        Err(TransitionSkip::RingBufFull) => bump(counter::RINGBUF_FULL),
    }
}

#[inline(always)]
pub(crate) fn on_transition<S: Socket>(
    s: &S,
    oldstate: u8,
    newstate: u8,
) -> Result<(), TransitionSkip> {
    bump(counter::SEEN);
    let now = unsafe { bpf_ktime_get_ns() };
    let (sport, dport) = s.ports();
    let mut netns = None;

    // Timing (and the owner filter's verdict) is kept for every socket,
    // filtered or not, so a duration is right even when the transition
    // that started it was filtered out.
    let (slot, old_state_ns, owner_selected) =
        account_time(s, oldstate, newstate, now, sport, &mut netns);

    let family = s.family();
    let candidate = filter::Candidate {
        family,
        sport,
        dport,
        oldstate,
        newstate,
        owner_selected,
    };
    if !filter::passes(s, &candidate, &mut netns) {
        return Err(TransitionSkip::Filtered);
    }
    let at = Endpoints {
        family,
        sport,
        dport,
        netns,
    };
    if batching() {
        if let Some(batch) = slot.and_then(|t| s.batch(t)) {
            let step = tracer_common::BatchStep {
                ts_ns: now,
                old_state_ns: old_state_ns.unwrap_or(0),
                old: oldstate,
                new: newstate,
                flags: if old_state_ns.is_some() {
                    FLAG_OLD_STATE_KNOWN as u8
                } else {
                    0
                },
                owner: 0,
                _pad: 0,
            };
            return add_to_batch(s, unsafe { &mut *batch }, step, &at);
        }
    }
    let (netns, saddr, daddr) = at.read(s);

    let mut entry = EVENTS
        .reserve::<TransitionEvent>(0)
        .ok_or(TransitionSkip::RingBufFull)?;
    let ev = entry.as_mut_ptr();
    // The task only where it is the owner: elsewhere it is whichever task
    // the softirq interrupted, and the helper calls would be waste.
    let task = runs_in_owner_syscall(oldstate, newstate);
    let mut flags = if old_state_ns.is_some() {
        FLAG_OLD_STATE_KNOWN
    } else {
        0
    };
    unsafe {
        (*ev).header = EventHeader {
            ts_ns: now,
            kind: EventKind::Transition as u32,
            len: size_of::<TransitionEvent>() as u32,
        };
        (*ev).skaddr = s.addr();
        (*ev).old_state_ns = old_state_ns.unwrap_or(0);
        if task {
            flags |= FLAG_TASK;
            let pid_tgid = bpf_get_current_pid_tgid();
            (*ev).pid = (pid_tgid >> 32) as u32;
            (*ev).tid = pid_tgid as u32;
            (*ev).uid = bpf_get_current_uid_gid() as u32;
            (*ev).cgroup = bpf_get_current_cgroup_id();
            // Straight into the record; on failure the kernel zeroes it,
            // which decodes as an empty comm.
            generated::bpf_get_current_comm(ptr::addr_of_mut!((*ev).comm).cast::<c_void>(), 16);
        } else {
            (*ev).pid = 0;
            (*ev).tid = 0;
            (*ev).uid = 0;
            (*ev).cgroup = 0;
            let comm = ptr::addr_of_mut!((*ev).comm).cast::<u64>();
            *comm = 0;
            *comm.add(1) = 0;
        }
        (*ev).flags = flags;
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).family = family;
        (*ev).oldstate = oldstate;
        (*ev).newstate = newstate;
        (*ev).netns = netns;
        (*ev)._reserved = 0;
        write_addresses(
            ptr::addr_of_mut!((*ev).saddr),
            ptr::addr_of_mut!((*ev).daddr),
            &saddr,
            &daddr,
        );
    }
    entry.submit(submit_flags(size_of::<TransitionEvent>() as u64));
    Ok(())
}

/// Writes both addresses into a record's `[u8; 16]` fields with word
/// stores (no byte copy loop, no memcpy).
///
/// # Safety
/// `src` and `dst` point into a reserved ring buffer record, 4-byte
/// aligned, valid for writes of 16 bytes.
#[inline(always)]
unsafe fn write_addresses(
    src: *mut [u8; 16],
    dst: *mut [u8; 16],
    saddr: &[u32; 4],
    daddr: &[u32; 4],
) {
    let (src, dst) = (src.cast::<u32>(), dst.cast::<u32>());
    let mut i = 0;
    while i < 4 {
        unsafe {
            *src.add(i) = saddr[i];
            *dst.add(i) = daddr[i];
        }
        i += 1;
    }
}

/// What a record names of its socket: read before the filters, the
/// namespace only if a filter needed it.
struct Endpoints {
    family: u16,
    sport: u16,
    dport: u16,
    netns: Option<u32>,
}

impl Endpoints {
    /// The namespace and both addresses, read now (for a record).
    #[inline(always)]
    fn read<S: Socket>(&self, s: &S) -> (u32, [u32; 4], [u32; 4]) {
        let netns = match self.netns {
            Some(n) => n,
            None => s.netns(),
        };
        let (saddr, daddr) = s.addresses(self.family);
        (netns, saddr, daddr)
    }
}

/// Adds `step` to the socket's batch and sends the batch when the socket
/// closes, enters a state in `FLUSH_STATES`, or the batch is full.
#[inline(always)]
fn add_to_batch<S: Socket>(
    s: &S,
    ev: &mut BatchEvent,
    mut step: tracer_common::BatchStep,
    at: &Endpoints,
) -> Result<(), TransitionSkip> {
    let task = runs_in_owner_syscall(step.old, step.new);
    if task && ev.batch.nowners as usize >= ev.batch.owners.len() {
        send_batch(s, ev, at);
    }
    let b = &mut ev.batch;
    if task {
        let i = b.nowners as usize;
        if let Some(slot) = b.owners.get_mut(i) {
            let pid_tgid = bpf_get_current_pid_tgid();
            slot.pid = (pid_tgid >> 32) as u32;
            slot.tid = pid_tgid as u32;
            slot.uid = bpf_get_current_uid_gid() as u32;
            slot.cgroup = unsafe { bpf_get_current_cgroup_id() };
            unsafe {
                generated::bpf_get_current_comm(ptr::addr_of_mut!(slot.comm).cast::<c_void>(), 16)
            };
            step.owner = i as u8 + 1;
            b.nowners += 1;
        }
    }
    let i = b.nsteps as usize;
    if let Some(slot) = b.steps.get_mut(i) {
        *slot = step;
        b.nsteps += 1;
        bump(counter::BATCH_PENDING);
    }
    let watched = FLUSH_STATES.load() & (1u16 << (step.new & 15)) != 0;
    if step.new == tcp_state::CLOSE || watched || b.nsteps as usize >= BATCH_STEPS {
        send_batch(s, ev, at);
    }
    Ok(())
}

/// Sends the socket's batch and empties it; if the ring buffer is full,
/// its transitions are counted lost. The record is completed in place (in
/// the socket's storage) and copied to the ring buffer as long as its
/// steps: two steps take 208 bytes, not the 304 of six.
#[inline(always)]
fn send_batch<S: Socket>(s: &S, ev: &mut BatchEvent, at: &Endpoints) {
    let nsteps = ev.batch.nsteps;
    if nsteps == 0 {
        return;
    }
    let n = if (nsteps as usize) < BATCH_STEPS {
        nsteps as usize
    } else {
        BATCH_STEPS
    };
    add(counter::BATCH_PENDING, u64::from(nsteps).wrapping_neg());
    let (netns, saddr, daddr) = at.read(s);
    ev.header = EventHeader {
        ts_ns: ev.batch.steps[0].ts_ns,
        kind: EventKind::Batch as u32,
        len: batch_event_len(n) as u32,
    };
    ev.skaddr = s.addr();
    ev.sport = at.sport;
    ev.dport = at.dport;
    ev.family = at.family;
    ev._pad = 0;
    ev.netns = netns;
    ev._reserved = 0;
    unsafe {
        write_addresses(
            ptr::addr_of_mut!(ev.saddr),
            ptr::addr_of_mut!(ev.daddr),
            &saddr,
            &daddr,
        );
    }
    // A constant length per step count: the verifier of older kernels
    // (6.1) loses a computed length's bounds when it is spilled.
    let sent = match n {
        1 => output_batch(ev, batch_event_len(1)),
        2 => output_batch(ev, batch_event_len(2)),
        3 => output_batch(ev, batch_event_len(3)),
        4 => output_batch(ev, batch_event_len(4)),
        5 => output_batch(ev, batch_event_len(5)),
        _ => output_batch(ev, batch_event_len(BATCH_STEPS)),
    };
    if !sent {
        add(counter::RINGBUF_FULL, u64::from(nsteps));
    }
    ev.batch.nsteps = 0;
    ev.batch.nowners = 0;
}

/// Copies the first `len` bytes of the batch record to the ring buffer.
#[inline(always)]
fn output_batch(ev: &BatchEvent, len: usize) -> bool {
    // SAFETY: `len` is at most the record's size (callers pass
    // `batch_event_len` of at most BATCH_STEPS).
    let bytes = unsafe { core::slice::from_raw_parts(ptr::from_ref(ev).cast::<u8>(), len) };
    EVENTS
        .output::<[u8]>(bytes, output_flags(len as u64))
        .is_ok()
}

/// [`submit_flags`] for a record copied in with `bpf_ringbuf_output` (not
/// counted in the unread data when the flags are chosen).
#[inline(always)]
fn output_flags(size: u64) -> u64 {
    let threshold = WAKEUP_BYTES.load();
    if threshold == 0 {
        return BPF_RB_FORCE_WAKEUP as u64;
    }
    let before = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let after = before + size + 8;
    let flags = if before < threshold && after >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    flags as u64
}

/// Ring buffer submit flags for a record of `size` bytes: wake the agent
/// only when this record takes the unread data past `WAKEUP_BYTES`. Once
/// past it the agent is awake and draining; waking it again for every
/// further record cost an inter-processor interrupt each (a third of the
/// program's time in `cargo xtask bench`). A crossing missed between two
/// CPUs is caught by the agent's periodic drain.
#[inline(always)]
pub(crate) fn submit_flags(size: u64) -> u64 {
    let threshold = WAKEUP_BYTES.load();
    if threshold == 0 {
        return BPF_RB_FORCE_WAKEUP as u64;
    }
    // Includes this record: reserved, not yet submitted.
    let unread = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let flags = if unread >= threshold && unread < threshold + size + 8 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    flags as u64
}

/// Records that the socket entered `newstate` at `now`. Returns how long
/// it stayed in `oldstate` (if this program saw it enter that state) and
/// whether its owner passes the owner filter (sticky once true; accepted
/// sockets inherit their listener's verdict).
#[inline(always)]
fn account_time<S: Socket>(
    s: &S,
    oldstate: u8,
    newstate: u8,
    now: u64,
    sport: u16,
    netns: &mut Option<u32>,
) -> (Option<*mut SockTiming>, Option<u64>, bool) {
    // Made even for a CLOSE (a socket older than the tracer closing): the
    // second BTF copy reads the state it leaves.
    let slot = s.timing(true);
    let mut selected = false;
    // An accepted socket's storage, where the store clones it from the
    // listener (socket storage), is its listener's: the owner filter's
    // verdict of that very listener (SO_REUSEPORT listeners of different
    // owners on one port keep theirs), but not its timing, nor a batch.
    let accepted = oldstate == tcp_state::LISTEN && newstate == tcp_state::SYN_RECV;
    let mut inherited = false;
    let elapsed = slot.and_then(|t| {
        let t = unsafe { &mut *t };
        if accepted {
            if t.state == tcp_state::LISTEN {
                selected = t.selected != 0;
                inherited = true;
                if let Some(b) = s.batch(t) {
                    unsafe {
                        (*b).batch.nsteps = 0;
                        (*b).batch.nowners = 0;
                    }
                }
            }
            None
        } else if t.state == oldstate {
            selected = t.selected != 0;
            // The CLOSE before connect/listen is no part of a life.
            (oldstate != tcp_state::CLOSE).then(|| now.saturating_sub(t.entered_ns))
        } else {
            // State 0: a slot just made, no timing yet.
            if t.state != 0 {
                bump(counter::TIMING_STALE);
            }
            None
        }
    });
    if filter::owner_filter_on() {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if runs_in_owner_syscall(oldstate, newstate) && filter::current_task_matches(tgid) {
            selected = true;
        }
        // The listener table, by namespace and port: for listeners whose
        // verdict no storage carries (older than the tracer, or the classic
        // path); it counts each port's selected listeners.
        let listener = (oldstate == tcp_state::LISTEN) || (newstate == tcp_state::LISTEN);
        if listener {
            let ns = *netns.get_or_insert_with(|| s.netns());
            if accepted && !inherited {
                selected = filter::listener_selected(ns, sport);
            }
            if newstate == tcp_state::LISTEN && selected && !filter::remember_listener(ns, sport) {
                bump(counter::LISTENERS_FULL);
            }
            if oldstate == tcp_state::LISTEN && newstate == tcp_state::CLOSE && selected {
                filter::forget_listener(ns, sport);
            }
        }
    }
    if newstate == tcp_state::CLOSE {
        s.forget_timing(slot);
        return (slot, elapsed, selected);
    }
    let timing = SockTiming {
        entered_ns: now,
        state: newstate,
        selected: selected as u8,
        _pad: [0; 6],
    };
    match slot {
        Some(t) => unsafe { *t = timing },
        None => {
            if !s.insert_timing(&timing) {
                bump(counter::TIMING_UPDATE_FAILED);
            }
        }
    }
    (slot, elapsed, selected)
}

#[inline(always)]
pub(crate) fn bump(index: u32) {
    add(index, 1);
}

/// Adds `n` (wrapping: per-CPU shares of `BATCH_PENDING` go below 0).
#[inline(always)]
fn add(index: u32, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot = (*slot).wrapping_add(n) };
    }
}
