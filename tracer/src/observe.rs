//! What every transition feeds besides the output: the summary
//! (`--summary`) and the Prometheus metrics (`--metrics`). The live agent
//! and `tracer summarize` both call [`Observers::transition`] through
//! [`crate::agent::Pipeline`], so they aggregate the same data the same way.

use crate::{
    clock,
    events::Transition,
    group::owner,
    loader::CounterValues,
    metrics::Recorder,
    summary::Summary,
    tracker::{Tracker, Update},
};

#[derive(Default)]
pub struct Observers {
    pub summary: Option<Summary>,
    pub metrics: Option<Recorder>,
}

impl Observers {
    /// After the tracker applied `t` (`update` is what it did).
    pub fn transition(&mut self, t: &Transition, tracker: &Tracker, update: &Update) {
        if let Some(m) = &mut self.metrics {
            m.transition(t, || owner(t, tracker, update));
        }
        if let Some(s) = &mut self.summary {
            s.transition(t, || owner(t, tracker, update));
        }
    }

    /// Before a scrape: the gauges from the tracker, lost events from the
    /// kernel's counters.
    pub fn refresh_metrics(&mut self, tracker: &Tracker, kernel: Option<CounterValues>) {
        if let Some(m) = &mut self.metrics {
            m.refresh(
                tracker,
                kernel.map(|k| k.ringbuf_full),
                clock::monotonic_ns(),
            );
        }
    }
}
