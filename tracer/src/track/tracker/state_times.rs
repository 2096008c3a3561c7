//! A connection's time in each state it passed through: only the states
//! visited are stored, so the table holds 72 bytes per connection for
//! this rather than one counter per TCP state.

use crate::kernel::events::TcpState;

/// States kept per connection. TCP's state machine passes through at
/// most six timed states in one life (SYN_SENT, SYN_RECV, ESTABLISHED,
/// FIN_WAIT1, CLOSING or FIN_WAIT2, TIME_WAIT); eight leaves room for a
/// gap's credit. Past that, a state's time goes to the last one stored
/// ([`StateTimes::credit`] says so, and the connection counts as having a
/// gap).
pub(super) const MAX_STATES: usize = 8;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct StateTimes {
    ns: [u64; MAX_STATES],
    /// The state of each counter, in the order first credited; `None`
    /// past the last.
    states: [Option<TcpState>; MAX_STATES],
}

impl StateTimes {
    /// Adds `ns` to `state`'s time. False when `state` had no room of its
    /// own (its time went to the last state stored).
    pub(super) fn credit(&mut self, state: TcpState, ns: u64) -> bool {
        let mut last = 0;
        for (i, s) in self.states.iter_mut().enumerate() {
            match s {
                Some(s) if *s == state => {
                    self.ns[i] += ns;
                    return true;
                }
                Some(_) => last = i,
                None => {
                    *s = Some(state);
                    self.ns[i] = ns;
                    return true;
                }
            }
        }
        self.ns[last] += ns;
        false
    }

    /// Time in `state`, if the connection passed through it.
    pub(super) fn get(&self, state: TcpState) -> Option<u64> {
        self.states
            .iter()
            .position(|s| *s == Some(state))
            .map(|i| self.ns[i])
    }

    /// Time in each state passed through, in [`TcpState::LIFE_ORDER`].
    pub(super) fn iter(&self) -> impl Iterator<Item = (TcpState, u64)> + '_ {
        TcpState::LIFE_ORDER
            .into_iter()
            .filter_map(|s| self.get(s).map(|ns| (s, ns)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TcpState::*;

    #[test]
    fn times_add_up_per_state_and_list_in_life_order() {
        let mut t = StateTimes::default();
        assert!(t.credit(Established, 5));
        assert!(t.credit(SynSent, 2));
        assert!(t.credit(Established, 7));
        assert_eq!(t.get(Established), Some(12));
        assert_eq!(t.get(FinWait1), None);
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            [(SynSent, 2), (Established, 12)]
        );
    }

    #[test]
    fn a_zero_credit_still_marks_the_state_visited() {
        let mut t = StateTimes::default();
        t.credit(TimeWait, 0);
        assert_eq!(t.get(TimeWait), Some(0));
    }

    #[test]
    fn past_its_room_a_state_s_time_goes_to_the_last_one_stored() {
        let mut t = StateTimes::default();
        let states = [
            SynSent,
            SynRecv,
            Established,
            FinWait1,
            FinWait2,
            TimeWait,
            CloseWait,
            LastAck,
        ];
        for s in states {
            assert!(t.credit(s, 1));
        }
        assert!(!t.credit(Closing, 10));
        assert_eq!(t.get(Closing), None);
        assert_eq!(t.get(LastAck), Some(11));
        // Nothing is lost: the total is what was credited.
        assert_eq!(t.iter().map(|(_, ns)| ns).sum::<u64>(), 18);
    }

    #[test]
    fn it_is_a_fraction_of_a_counter_per_state() {
        assert_eq!(size_of::<StateTimes>(), 72);
    }
}
