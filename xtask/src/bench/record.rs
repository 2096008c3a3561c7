//! What one run recorded (`RunRecord`): its load, round and subject, what the
//! load did, the held sockets' check, settling, how idle the CPUs were,
//! what the subject measured, or the error.
//!
//! In: filled in by `runs.rs`. Out: the run's rate, the events it should
//! have caused, and its JSON for the results file.

use std::time::Duration;

use serde_json::{json, Value};

use super::{
    hold::HeldCheck,
    load::{LoadKind, LoadResult},
    subject::{Measured, Subject},
};

pub(super) struct RunRecord {
    /// The block of rounds it belongs to.
    pub(super) load_kind: LoadKind,
    pub(super) round: u32,
    pub(super) subject: Subject,
    pub(super) load: Option<LoadResult>,
    pub(super) held_check: Option<HeldCheck>,
    /// How long the load's last transitions took to happen after it
    /// stopped, and sockets still half-way when the subject was stopped.
    pub(super) settled: Option<(Duration, u64)>,
    /// Idle share of the CPUs just before the run, and how long the bench
    /// waited for it.
    pub(super) idle_before: Option<(f64, Duration)>,
    /// (namespace inode, time to set up the held sockets)
    pub(super) env: Option<(u64, Duration)>,
    pub(super) measured: Option<Measured>,
    pub(super) error: Option<String>,
}

impl RunRecord {
    pub(super) fn ok(&self) -> bool {
        self.error.is_none()
    }

    pub(super) fn rate(&self) -> Option<f64> {
        self.ok()
            .then(|| self.load.as_ref().map(LoadResult::per_second))
            .flatten()
    }

    pub(super) fn expected(&self) -> Option<u64> {
        let l = self.load.as_ref()?;
        Some(if self.subject == Subject::Tcplife {
            l.expected_closed
        } else {
            l.expected_transitions
        })
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "load_kind": self.load_kind.name(),
            "round": self.round,
            "subject": self.subject.name(),
            "ok": self.ok(),
            "error": self.error,
            "load": self.load.as_ref().map(LoadResult::to_json),
            "held_sockets_at_teardown": self.held_check.map(|h| json!({
                "held": h.held, "eof": h.eof, "other": h.other,
            })),
            "settle_s": self.settled.map(|s| s.0.as_secs_f64()),
            "sockets_pending_at_stop": self.settled.map(|s| s.1),
            "cpu_idle_before": self.idle_before.map(|i| i.0),
            "waited_for_quiet_s": self.idle_before.map(|i| i.1.as_secs_f64()),
            "netns_inode": self.env.map(|e| e.0),
            "hold_setup_s": self.env.map(|e| e.1.as_secs_f64()),
            "expected_events": self.expected(),
            "subject_measured": self.measured.as_ref().map(Measured::to_json),
        })
    }
}
