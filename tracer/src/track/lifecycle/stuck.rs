//! Stuck connections: which ones to report, and the list at exit.

use std::time::Duration;

use super::Lifecycle;
use crate::{
    clock::monotonic_ns,
    kernel::events::TcpState,
    track::tracker::{Connection, Tracker},
};

impl Lifecycle {
    /// Connections in `state` for at least `threshold` and not reported
    /// yet (marked reported now): the worker is to find their holders.
    pub fn due_stuck(
        &mut self,
        tracker: &mut Tracker,
        state: TcpState,
        threshold: Duration,
    ) -> Vec<Connection> {
        let now = monotonic_ns();
        let limit = threshold.as_nanos() as u64;
        let mut due = Vec::new();
        for (_, c) in tracker.in_state_mut(state) {
            if !c.stuck_reported && now.saturating_sub(c.state_since_ns) >= limit {
                c.stuck_reported = true;
                due.push(*c);
            }
        }
        due
    }

    /// Every connection in `state` now (for the list printed at exit).
    pub fn still_in(tracker: &mut Tracker, state: TcpState) -> Vec<Connection> {
        tracker.in_state_mut(state).map(|(_, c)| *c).collect()
    }
}
