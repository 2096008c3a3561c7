//! What the soak's traffic did, and the `inet_sock_set_state` transitions
//! that must follow (both ends of every connection; listeners included:
//! every one the soak opens is opened and closed while the tracer runs).
//!
//! Per kind, on loopback (each settled before the soak stops the tracer):
//! - client-first: the client's CLOSE, SYN_SENT, ESTABLISHED, FIN_WAIT1,
//!   FIN_WAIT2, CLOSE, the server's LISTEN, SYN_RECV, ESTABLISHED,
//!   CLOSE_WAIT, LAST_ACK, CLOSE: 5 + 5 transitions (the client's timewait
//!   socket is no tracepoint's);
//! - server-first: the same with the roles swapped: 10;
//! - abort (`SO_LINGER` 0 close by either end): the opening 2 + 2, the
//!   aborting end ESTABLISHED>CLOSE, the other end's ESTABLISHED>CLOSE on
//!   the reset: 6;
//! - queued reset (a connection waiting in the accept queue of a listener
//!   that closes): the child LISTEN>SYN_RECV>ESTABLISHED>CLOSE, the client
//!   CLOSE>SYN_SENT>ESTABLISHED, then ESTABLISHED>CLOSE on the reset: 6;
//! - refused (a connect to the closed port): CLOSE>SYN_SENT>CLOSE: 2;
//! - a listener: CLOSE>LISTEN when it listens, LISTEN>CLOSE when it
//!   closes: 1 each;
//! - held in CLOSE_WAIT (`bench-hold`): the client closes at once and the
//!   server end stays: 5 + 3; released, CLOSE_WAIT>LAST_ACK>CLOSE: 2;
//!   or, before that, reset by its client: CLOSE_WAIT>CLOSE, 1. (An
//!   orphaned client whose FIN's ACK came while it was still locked in
//!   close() stays a full FIN_WAIT2 socket on a 60 s timer instead of
//!   handing over to a timewait socket; when that runs out it sends a
//!   reset, `tcp_keepalive_timer`. Seen once in 10,000 held sockets; the
//!   soak counts the held sockets still in CLOSE_WAIT when it releases
//!   them.)

use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Tally {
    pub client_first: u64,
    pub server_first: u64,
    pub aborts: u64,
    pub queued_resets: u64,
    pub refused: u64,
    /// listen() calls.
    pub listens: u64,
    /// Listeners closed.
    pub listener_closes: u64,
    /// Connections whose server end was held in CLOSE_WAIT.
    pub held: u64,
    /// Held server ends closed since (from CLOSE_WAIT).
    pub held_released: u64,
    /// Held server ends reset by their client before the release.
    pub held_reset: u64,
    /// Network namespaces made and left to the kernel to delete (no
    /// transitions of their own).
    pub namespaces: u64,
}

pub(super) const CLIENT_FIRST: u64 = 10;
pub(super) const SERVER_FIRST: u64 = 10;
pub(super) const ABORT: u64 = 6;
pub(super) const QUEUED_RESET: u64 = 6;
pub(super) const REFUSED: u64 = 2;
pub(super) const HELD: u64 = 8;
pub(super) const HELD_RELEASED: u64 = 2;
pub(super) const HELD_RESET: u64 = 1;

impl Tally {
    /// The transitions the traffic so far must have caused.
    pub(super) fn transitions(&self) -> u64 {
        self.client_first * CLIENT_FIRST
            + self.server_first * SERVER_FIRST
            + self.aborts * ABORT
            + self.queued_resets * QUEUED_RESET
            + self.refused * REFUSED
            + self.listens
            + self.listener_closes
            + self.held * HELD
            + self.held_released * HELD_RELEASED
            + self.held_reset * HELD_RESET
    }

    /// Connections made (every kind).
    pub(super) fn connections(&self) -> u64 {
        self.client_first
            + self.server_first
            + self.aborts
            + self.queued_resets
            + self.refused
            + self.held
    }

    #[cfg(test)]
    pub(super) fn add(&mut self, o: &Tally) {
        self.client_first += o.client_first;
        self.server_first += o.server_first;
        self.aborts += o.aborts;
        self.queued_resets += o.queued_resets;
        self.refused += o.refused;
        self.listens += o.listens;
        self.listener_closes += o.listener_closes;
        self.held += o.held;
        self.held_released += o.held_released;
        self.held_reset += o.held_reset;
        self.namespaces += o.namespaces;
    }

    pub(super) fn to_json(self) -> Value {
        json!({
            "client_first": self.client_first,
            "server_first": self.server_first,
            "aborts": self.aborts,
            "queued_resets": self.queued_resets,
            "refused": self.refused,
            "listens": self.listens,
            "listener_closes": self.listener_closes,
            "held": self.held,
            "held_released": self.held_released,
            "held_reset": self.held_reset,
            "namespaces": self.namespaces,
            "expected_transitions": self.transitions(),
        })
    }
}

/// The tracer's own account of the transitions: delivered + lost +
/// skipped + pending (from its final stats record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Accounted {
    pub delivered: u64,
    pub lost: u64,
    pub skipped: u64,
    pub pending: u64,
}

impl Accounted {
    /// From the `stats` record; None without `events`.
    pub(super) fn of(stats: &Value) -> Option<Accounted> {
        let n = |k: &str| stats.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some(Accounted {
            delivered: stats.get("events")?.as_u64()?,
            lost: n("lost"),
            skipped: n("skipped"),
            pending: n("pending"),
        })
    }

    pub(super) fn total(&self) -> u64 {
        self.delivered + self.lost + self.skipped + self.pending
    }

    /// None when it matches `expected`; otherwise the reason, one line.
    pub(super) fn mismatch(&self, expected: u64) -> Option<String> {
        let total = self.total();
        if total == expected {
            return None;
        }
        let diff = total as i64 - expected as i64;
        let why = if diff > 0 {
            "more than the soak caused: other TCP traffic on the soak's ports (the --port filter does not tell namespaces apart)?"
        } else {
            "transitions neither delivered nor counted as lost, skipped or pending"
        };
        Some(format!(
            "transition count mismatch: delivered {} + lost {} + skipped {} + pending {} = {total}, expected {expected} ({diff:+}: {why})",
            self.delivered, self.lost, self.skipped, self.pending
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_per_kind() {
        let one = |f: fn(&mut Tally)| {
            let mut t = Tally::default();
            f(&mut t);
            t.transitions()
        };
        assert_eq!(one(|t| t.client_first = 1), 10);
        assert_eq!(one(|t| t.server_first = 1), 10);
        assert_eq!(one(|t| t.aborts = 1), 6);
        assert_eq!(one(|t| t.queued_resets = 1), 6);
        assert_eq!(one(|t| t.refused = 1), 2);
        assert_eq!(one(|t| t.listens = 1), 1);
        assert_eq!(one(|t| t.listener_closes = 1), 1);
        assert_eq!(one(|t| t.held = 1), 8);
        assert_eq!(one(|t| t.held_released = 1), 2);
        assert_eq!(one(|t| t.held_reset = 1), 1);
        assert_eq!(one(|t| t.namespaces = 1), 0);
    }

    #[test]
    fn a_soak_adds_up() {
        // 2 churn threads (2,000 connections), a listener restarted 3
        // times (a queued reset and a refused connect each), 4 aborts,
        // 2 namespaces of 3 connections (client-first, server-first,
        // abort) and a listener each, 10 held sockets, 9 released and 1 reset by its client before.
        let churn = Tally {
            client_first: 2_000,
            listens: 2,
            listener_closes: 2,
            ..Default::default()
        };
        let restart = Tally {
            client_first: 50,
            queued_resets: 3,
            refused: 3,
            listens: 4,
            listener_closes: 4,
            ..Default::default()
        };
        let aborts = Tally {
            aborts: 4,
            listens: 1,
            listener_closes: 1,
            ..Default::default()
        };
        let ns = Tally {
            client_first: 1,
            server_first: 1,
            aborts: 1,
            listens: 1,
            listener_closes: 1,
            namespaces: 1,
            ..Default::default()
        };
        let hold = Tally {
            held: 10,
            held_released: 9,
            held_reset: 1,
            listens: 1,
            listener_closes: 1,
            ..Default::default()
        };
        let mut all = Tally::default();
        for t in [churn, restart, aborts, ns, ns, hold] {
            all.add(&t);
        }
        assert_eq!(all.namespaces, 2);
        assert_eq!(all.connections(), 2_000 + 56 + 4 + 6 + 10);
        assert_eq!(
            all.transitions(),
            20_004 + (500 + 18 + 6 + 8) + (24 + 2) + 2 * (26 + 2) + (80 + 18 + 1 + 2)
        );
    }

    #[test]
    fn the_tracers_account() {
        let stats = json!({"type":"stats","events":95,"lost":3,"skipped":1,"pending":1});
        let a = Accounted::of(&stats).unwrap();
        assert_eq!(a.total(), 100);
        assert_eq!(a.mismatch(100), None);
        let short = a.mismatch(104).unwrap();
        assert!(short.starts_with("transition count mismatch: delivered 95 + lost 3 + skipped 1 + pending 1 = 100, expected 104 (-4: "), "{short}");
        assert!(a
            .mismatch(98)
            .unwrap()
            .contains("(+2: more than the soak caused"));
        // Older tracers print no skipped/pending: zero.
        assert_eq!(Accounted::of(&json!({"events": 7})).unwrap().total(), 7);
        assert_eq!(Accounted::of(&json!({"lost": 7})), None);
    }
}
