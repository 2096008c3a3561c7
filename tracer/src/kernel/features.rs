//! What the running kernel offers, probed rather than inferred from its
//! version: each optional mechanism is tried for real (a probe program is
//! loaded, then unloaded) so the agent can say what it uses and degrade
//! with a note where something is missing.

use std::path::Path;

use aya::{
    programs::{BtfTracePoint, FEntry, Iter},
    Btf, Ebpf,
};
use serde::Serialize;

/// Kernel capabilities, as reported in the stats record (`kernel`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// `/sys/kernel/btf/vmlinux` present and parsed (5.4+ with BTF).
    pub btf: bool,
    /// BPF ring buffer maps (5.8+); required.
    pub ringbuf: bool,
    /// BTF-typed tracepoints (`tp_btf`, 5.5+).
    pub tp_btf: bool,
    /// `iter/tcp` BPF iterators (5.9+).
    pub iter_tcp: bool,
    /// The kprobe PMU (`CONFIG_KPROBE_EVENTS`).
    pub kprobe: bool,
    /// fentry/fexit programs (5.5+, x86; refused where ftrace is locked).
    pub fentry: bool,
    /// The fentry program on `inet_twsk_kill` is attached: timewait
    /// sockets' deaths are timed exactly (else at the next sock_diag poll).
    pub timewait_fentry: bool,
    /// NETLINK_SOCK_DIAG for TCP (`inet_diag` + `tcp_diag`, built in or
    /// loaded): timewait sockets, socket inodes, the start-up snapshot.
    pub sock_diag: bool,
    /// `tcp:tcp_send_reset` and `tcp:tcp_receive_reset` are attached:
    /// connection records count the resets of each connection.
    pub resets: bool,
    /// `tcp:tcp_send_reset` carries the kernel's reason (6.10+), named
    /// from BTF: records list the reasons of the resets sent.
    pub reset_reasons: bool,
    /// Which program receives the transitions.
    pub transitions: TransitionPath,
}

/// The program that receives the transitions, and where it keeps each
/// socket's timing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionPath {
    /// `tp_btf/inet_sock_set_state` (two copies), socket-local storage.
    #[default]
    TpBtf,
    /// `sock:inet_sock_set_state`, an LRU hash of `--max-sockets`.
    Tracepoint,
}

impl TransitionPath {
    /// The tracepoint as attached (for the "attached" line).
    pub fn attached_to(self) -> &'static str {
        match self {
            TransitionPath::TpBtf => "tp_btf/inet_sock_set_state",
            TransitionPath::Tracepoint => "sock:inet_sock_set_state",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            TransitionPath::TpBtf => {
                "tp_btf/inet_sock_set_state (BTF tracepoint, 2 copies), timing in socket storage"
            }
            TransitionPath::Tracepoint => {
                "tracepoint sock:inet_sock_set_state (classic fallback), timing in an LRU hash"
            }
        }
    }
}

impl Capabilities {
    /// One line for `-v`: what is used for what, and what is missing.
    pub fn describe(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        format!(
            "kernel: transitions via {}, delivered by ring buffer; \
             TIME_WAIT and socket owners via sock_diag={}, timewait deaths via {}, \
             resets via tcp:tcp_send_reset/tcp_receive_reset={} (reasons={}); btf={} tp_btf={} iter/tcp={} kprobe={} fentry={}",
            self.transitions.describe(),
            yes(self.sock_diag),
            if self.timewait_fentry {
                "fentry on inet_twsk_kill"
            } else {
                "sock_diag polls"
            },
            yes(self.resets),
            yes(self.reset_reasons),
            yes(self.btf),
            yes(self.tp_btf),
            yes(self.iter_tcp),
            yes(self.kprobe),
            yes(self.fentry)
        )
    }
}

/// Kernel BTF, if the kernel exposes it.
pub fn kernel_btf() -> Option<Btf> {
    Btf::from_sys_fs().ok()
}

pub fn ringbuf_supported() -> bool {
    aya::sys::is_map_supported(aya::maps::MapType::RingBuf).unwrap_or(false)
}

/// Probes with the probe programs of the loaded object `ebpf`.
pub fn probe(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Capabilities {
    let mut caps = Capabilities {
        btf: btf.is_some(),
        ringbuf: true, // the object's ring buffer map was created
        kprobe: Path::new("/sys/bus/event_source/devices/kprobe").exists(),
        ..Default::default()
    };
    let Some(btf) = btf else {
        return caps; // every other probe needs BTF
    };
    caps.tp_btf =
        try_load::<BtfTracePoint>(ebpf, "probe_tp_btf", |p| p.load("inet_sock_set_state", btf));
    caps.fentry = try_load::<FEntry>(ebpf, "probe_fentry", |p| p.load("tcp_set_state", btf));
    caps.iter_tcp = try_load::<Iter>(ebpf, "probe_iter_tcp", |p| p.load("tcp", btf));
    caps
}

fn try_load<P>(
    ebpf: &mut Ebpf,
    name: &str,
    load: impl FnOnce(&mut P) -> Result<(), aya::programs::ProgramError>,
) -> bool
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    let Some(program) = ebpf.program_mut(name) else {
        log::debug!("probe program {name} missing from the object");
        return false;
    };
    let Ok(program) = <&mut P>::try_from(program) else {
        return false;
    };
    match load(program) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("probe {name}: {e}");
            false
        }
    }
}

/// Unloads the probe programs (they were only loaded to test the kernel).
pub fn unload_probes(ebpf: &mut Ebpf) {
    for name in ["probe_tp_btf", "probe_fentry", "probe_iter_tcp"] {
        if let Some(p) = ebpf.program_mut(name) {
            let _ = match p {
                aya::programs::Program::BtfTracePoint(p) => p.unload(),
                aya::programs::Program::FEntry(p) => p.unload(),
                aya::programs::Program::Iter(p) => p.unload(),
                _ => Ok(()),
            };
        }
    }
}
