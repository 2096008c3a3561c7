//! The output format and which records are written: shared by the command
//! line (`cli`), the writers (`output`, `summary`) and `replay`, so it
//! lives below all of them.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventsMode {
    /// One record per state transition.
    Transitions,
    /// One record per connection, when it reaches CLOSE.
    Connections,
    /// One line per finished connection showing its close: who closed,
    /// the handshake with the time of each step, resets (JSON: the
    /// connection record, which carries the same `close` object).
    Closes,
    /// Both transitions and connections.
    All,
    /// Neither (only the final stats).
    None,
}

impl EventsMode {
    pub fn transitions(self) -> bool {
        matches!(self, EventsMode::Transitions | EventsMode::All)
    }
    pub fn connections(self) -> bool {
        matches!(
            self,
            EventsMode::Connections | EventsMode::Closes | EventsMode::All
        )
    }
}
