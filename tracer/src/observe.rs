//! What every transition feeds besides the output: the summary
//! (`--summary`). The live agent and `tracer summarize` both call
//! [`Observers::transition`] through [`crate::agent::Pipeline`], so they
//! aggregate the same data the same way.

use crate::{
    events::Transition,
    group::owner,
    summary::Summary,
    tracker::{Tracker, Update},
};

#[derive(Default)]
pub struct Observers {
    pub summary: Option<Summary>,
}

impl Observers {
    /// After the tracker applied `t` (`update` is what it did).
    pub fn transition(&mut self, t: &Transition, tracker: &Tracker, update: &Update) {
        if let Some(s) = &mut self.summary {
            s.transition(t, || owner(t, tracker, update));
        }
    }
}
