//! The nginx load's expected events, from the kernel's TCP counters of its
//! network namespace (not from wrk's request count).
//!
//! In: `/proc/thread-self/net/snmp` and `netstat` read from the
//! namespace's thread before wrk starts and after every socket it opened
//! has closed (`TcpCounters`), and `/proc/thread-self/net/tcp{,6}` while
//! wrk holds its last connections (`Tail`). Out: the transitions and the
//! closed sockets the run caused (`nginx_expected`), or why they cannot be
//! known exactly.
//!
//! # The transitions of one connection
//!
//! wrk asks with `Connection: close` and nginx has `keepalive_timeout 0`:
//! nginx writes the response and closes at once, so nginx closes first:
//!
//! - nginx's socket: LISTEN>SYN_RECV>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE
//!   (FIN_WAIT2>CLOSE when wrk's FIN comes, or on the ACK of nginx's FIN
//!   once nginx has let go of it: the kernel goes on in a timewait socket,
//!   which no tracepoint sees);
//! - wrk's socket: CLOSE>SYN_SENT>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE.
//!
//! When wrk reads the response and closes before nginx's FIN has arrived,
//! the roles swap (wrk FIN_WAIT1>FIN_WAIT2>CLOSE, nginx
//! CLOSE_WAIT>LAST_ACK>CLOSE); when both FINs cross, each side goes
//! FIN_WAIT1>CLOSING>CLOSE. Always 5 per socket, 10 per connection. (On
//! 6.18, counted per side with bpftrace over 47,084 connections: nginx
//! first in 43,109, wrk first in 3,839, crossing FINs in 136.)
//!
//! # Counting them
//!
//! Every socket is opened once and counted once: ActiveOpens (wrk's
//! connects, at CLOSE>SYN_SENT) and PassiveOpens (nginx's sockets, made at
//! LISTEN>SYN_RECV). Read after every socket has reached CLOSE (the bench
//! waits for it), 5 x (ActiveOpens + PassiveOpens) is the count, less the
//! transitions of the sockets that took a shortcut to CLOSE.
//!
//! The load takes one shortcut, at its end. wrk stops with up to
//! `--connections` connections open; they are counted (they are in
//! ActiveOpens and PassiveOpens, not in wrk's requests). The bench's wrk
//! script holds them open after wrk's report until they have settled, and
//! the bench looks at them (`Tail`): some are idle (connected, no request
//! sent yet; wrk's exit closes them normally, 10 transitions), the others
//! hold nginx's response unread in CLOSE_WAIT (nginx has closed). Closing
//! a socket with unread data resets it: CLOSE_WAIT>CLOSE instead of
//! CLOSE_WAIT>LAST_ACK>CLOSE, one transition fewer, counted in EstabResets
//! (and TCPAbortOnClose); nginx's side of it is a timewait socket by then,
//! which the reset kills without a transition. So:
//!
//! ```text
//! expected = 5 x (ActiveOpens + PassiveOpens) - EstabResets
//! closed sockets (tcplife's lines) = ActiveOpens + PassiveOpens
//! ```
//!
//! It holds when no other shortcut was taken, which the counters show,
//! and which `nginx_expected` checks (else the run fails: its count would
//! not be exact): ActiveOpens = PassiveOpens (every connect got its server
//! socket); no AttemptFails (no handshake aborted, SYN_SENT>CLOSE); no
//! TCPAbortOnData (no data reaching a closed socket, which resets it, e.g.
//! FIN_WAIT1>CLOSE); EstabResets = TCPAbortOnClose (no reset received in
//! ESTABLISHED or CLOSE_WAIT); and the held sockets with unread data all
//! in CLOSE_WAIT (ESTABLISHED>CLOSE would be two fewer), as many as the
//! aborts.

use std::{collections::BTreeMap, fs};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

/// The namespace's `Tcp:` and `TcpExt:` counters (`Tcp:ActiveOpens`, …).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct TcpCounters(pub BTreeMap<String, i64>);

impl TcpCounters {
    /// The calling thread's namespace.
    pub(super) fn read_here() -> Result<TcpCounters> {
        let mut text = String::new();
        for f in ["snmp", "netstat"] {
            let path = format!("/proc/thread-self/net/{f}");
            text += &fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        }
        Ok(TcpCounters::parse(&text))
    }

    /// `/proc/net/snmp` and `/proc/net/netstat` text: pairs of lines, a
    /// header (`Tcp: RtoAlgorithm RtoMin …`) and its values (`Tcp: 1 200
    /// …`). Only the `Tcp` and `TcpExt` groups are kept.
    pub(super) fn parse(text: &str) -> TcpCounters {
        let mut map = BTreeMap::new();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [head, values] = pair else { continue };
            let mut h = head.split_whitespace();
            let mut v = values.split_whitespace();
            let (Some(group), Some(group2)) = (h.next(), v.next()) else {
                continue;
            };
            if group != group2 || !matches!(group, "Tcp:" | "TcpExt:") {
                continue;
            }
            for (k, x) in h.zip(v) {
                if let Ok(x) = x.parse::<i64>() {
                    map.insert(format!("{group}{k}"), x);
                }
            }
        }
        TcpCounters(map)
    }

    fn get(&self, key: &str) -> i64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    /// What happened between `self` (before) and `after`.
    pub(super) fn delta(&self, after: &TcpCounters) -> TcpDelta {
        let d = |k: &str| (after.get(k) - self.get(k)).max(0) as u64;
        TcpDelta {
            active_opens: d("Tcp:ActiveOpens"),
            passive_opens: d("Tcp:PassiveOpens"),
            attempt_fails: d("Tcp:AttemptFails"),
            estab_resets: d("Tcp:EstabResets"),
            out_rsts: d("Tcp:OutRsts"),
            abort_on_close: d("TcpExt:TCPAbortOnClose"),
            abort_on_data: d("TcpExt:TCPAbortOnData"),
            listen_drops: d("TcpExt:ListenDrops"),
        }
    }
}

/// The counters the arithmetic needs, over one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct TcpDelta {
    pub active_opens: u64,
    pub passive_opens: u64,
    pub attempt_fails: u64,
    pub estab_resets: u64,
    /// Resets sent (information only).
    pub out_rsts: u64,
    pub abort_on_close: u64,
    pub abort_on_data: u64,
    /// SYNs dropped by a full listen queue (information only: the client
    /// retries; a connect that never got through shows as ActiveOpens >
    /// PassiveOpens).
    pub listen_drops: u64,
}

impl TcpDelta {
    pub(super) fn to_json(self) -> Value {
        json!({
            "ActiveOpens": self.active_opens,
            "PassiveOpens": self.passive_opens,
            "AttemptFails": self.attempt_fails,
            "EstabResets": self.estab_resets,
            "OutRsts": self.out_rsts,
            "TCPAbortOnClose": self.abort_on_close,
            "TCPAbortOnData": self.abort_on_data,
            "ListenDrops": self.listen_drops,
        })
    }
}

/// wrk's sockets still open once its run is over (held by its script),
/// from `/proc/net/tcp{,6}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Tail {
    /// Client sockets (remote port = the server's) in ESTABLISHED or
    /// CLOSE_WAIT.
    pub open: u64,
    /// Of those, in CLOSE_WAIT with data unread (nginx's response).
    pub unread_close_wait: u64,
    /// Of those, in ESTABLISHED with data unread.
    pub unread_established: u64,
}

impl Tail {
    /// From `/proc/net/tcp` or `tcp6` text (fields: sl, local, remote,
    /// st, tx_queue:rx_queue, …); adds up over calls.
    pub(super) fn add(&mut self, text: &str, server_port: u16) {
        let port = |addr: &str| {
            addr.rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().take(5).collect();
            let [_, local, remote, st, queues] = f[..] else {
                continue;
            };
            if port(remote) != Some(server_port) || port(local) == Some(server_port) {
                continue;
            }
            let rx = queues
                .split_once(':')
                .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                .unwrap_or(0);
            match st {
                "01" => {
                    self.open += 1;
                    self.unread_established += u64::from(rx > 0);
                }
                "08" => {
                    self.open += 1;
                    self.unread_close_wait += u64::from(rx > 0);
                }
                _ => {}
            }
        }
    }

    pub(super) fn to_json(self) -> Value {
        json!({
            "open": self.open,
            "unread_close_wait": self.unread_close_wait,
            "unread_established": self.unread_established,
        })
    }
}

/// Transitions and closed sockets of one nginx run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Expected {
    pub transitions: u64,
    pub closed: u64,
}

/// The module's arithmetic: `5 x (ActiveOpens + PassiveOpens) -
/// EstabResets`, or why the counters say it is not exact.
pub(super) fn nginx_expected(d: &TcpDelta, tail: &Tail) -> Result<Expected, String> {
    let mut why = Vec::new();
    if d.active_opens != d.passive_opens {
        why.push(format!(
            "ActiveOpens {} != PassiveOpens {}",
            d.active_opens, d.passive_opens
        ));
    }
    if d.attempt_fails > 0 {
        why.push(format!(
            "{} handshakes failed (AttemptFails)",
            d.attempt_fails
        ));
    }
    if d.abort_on_data > 0 {
        why.push(format!(
            "{} sockets reset by data after close (TCPAbortOnData)",
            d.abort_on_data
        ));
    }
    if d.estab_resets != d.abort_on_close {
        why.push(format!(
            "EstabResets {} != TCPAbortOnClose {} (resets received)",
            d.estab_resets, d.abort_on_close
        ));
    }
    if tail.unread_established > 0 {
        why.push(format!(
            "{} of wrk's last sockets were ESTABLISHED with data unread",
            tail.unread_established
        ));
    }
    if tail.unread_close_wait != d.abort_on_close {
        why.push(format!(
            "{} of wrk's last sockets held unread data, but {} were aborted on close",
            tail.unread_close_wait, d.abort_on_close
        ));
    }
    if !why.is_empty() {
        return Err(format!(
            "the namespace's TCP counters do not fit the nginx load's arithmetic ({}): its expected events are unknown",
            why.join("; ")
        ));
    }
    let sockets = d.active_opens + d.passive_opens;
    Ok(Expected {
        transitions: 5 * sockets - d.estab_resets,
        closed: sockets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "Ip: Forwarding DefaultTTL InReceives\n\
Ip: 1 64 301704\n\
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n\
Tcp: 1 200 120000 -1 29352 29352 0 25 0 293444 293444 0 0 25 0\n\
Udp: InDatagrams NoPorts\n\
Udp: 0 0\n\
TcpExt: SyncookiesSent TW TCPAbortOnData TCPAbortOnClose ListenDrops\n\
TcpExt: 0 29380 0 25 0\n";

    #[test]
    fn parses_snmp_and_netstat() {
        let c = TcpCounters::parse(SNMP);
        assert_eq!(c.get("Tcp:ActiveOpens"), 29352);
        assert_eq!(c.get("Tcp:MaxConn"), -1);
        assert_eq!(c.get("TcpExt:TCPAbortOnClose"), 25);
        assert_eq!(c.get("Ip:InReceives"), 0);
        assert_eq!(c.get("Udp:NoPorts"), 0);
        let d = TcpCounters::default().delta(&c);
        assert_eq!(
            (
                d.active_opens,
                d.passive_opens,
                d.estab_resets,
                d.abort_on_close
            ),
            (29352, 29352, 25, 25)
        );
    }

    /// A run as measured on 6.18 (bpftrace counted 293,495 transitions on
    /// the port): 29,352 connections, 25 left with a response unread.
    #[test]
    fn expected_events_of_a_measured_run() {
        let d = TcpDelta {
            active_opens: 29352,
            passive_opens: 29352,
            estab_resets: 25,
            abort_on_close: 25,
            out_rsts: 25,
            ..Default::default()
        };
        let tail = Tail {
            open: 50,
            unread_close_wait: 25,
            unread_established: 0,
        };
        assert_eq!(
            nginx_expected(&d, &tail),
            Ok(Expected {
                transitions: 293_495,
                closed: 58_704
            })
        );
        // No connection left with data: 10 per connection.
        let clean = TcpDelta {
            estab_resets: 0,
            abort_on_close: 0,
            ..d
        };
        assert_eq!(
            nginx_expected(&clean, &Tail::default())
                .unwrap()
                .transitions,
            293_520
        );
    }

    #[test]
    fn other_shortcuts_make_it_inexact() {
        let d = TcpDelta {
            active_opens: 100,
            passive_opens: 100,
            ..Default::default()
        };
        let t = Tail::default();
        for bad in [
            TcpDelta {
                passive_opens: 99,
                ..d
            },
            TcpDelta {
                attempt_fails: 1,
                ..d
            },
            TcpDelta {
                abort_on_data: 1,
                ..d
            },
            // A reset received, not an abort on close.
            TcpDelta {
                estab_resets: 1,
                ..d
            },
        ] {
            assert!(nginx_expected(&bad, &t).is_err(), "{bad:?}");
        }
        let aborted = TcpDelta {
            estab_resets: 1,
            abort_on_close: 1,
            ..d
        };
        // The abort must be one of the held sockets, in CLOSE_WAIT.
        assert!(nginx_expected(&aborted, &t).is_err());
        let est = Tail {
            open: 1,
            unread_established: 1,
            unread_close_wait: 0,
        };
        assert!(nginx_expected(&aborted, &est).is_err());
        let cw = Tail {
            open: 1,
            unread_close_wait: 1,
            unread_established: 0,
        };
        assert_eq!(nginx_expected(&aborted, &cw).unwrap().transitions, 999);
    }

    #[test]
    fn tail_of_proc_net_tcp() {
        // Server port 800 = 0x0320.
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:0320 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n\
   1: 0100007F:9C40 0100007F:0320 08 00000000:00000105 00:00000000 00000000     0        0 2\n\
   2: 0100007F:0320 0100007F:9C40 05 00000000:00000000 00:00000000 00000000     0        0 0\n\
   3: 0100007F:9C41 0100007F:0320 01 00000000:00000000 00:00000000 00000000     0        0 3\n\
   4: 0100007F:0320 0100007F:9C41 01 00000000:00000000 00:00000000 00000000     0        0 4\n\
   5: 0100007F:9C42 0100007F:0320 01 00000000:00000010 00:00000000 00000000     0        0 5\n\
   6: 0100007F:9C43 0100007F:02BC 08 00000000:00000105 00:00000000 00000000     0        0 6\n";
        let mut t = Tail::default();
        t.add(text, 800);
        assert_eq!(
            t,
            Tail {
                open: 3,
                unread_close_wait: 1,
                unread_established: 1
            }
        );
    }
}
