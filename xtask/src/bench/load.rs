//! The loads: loopback TCP connections in a network namespace of their
//! own, counting the state transitions they must cause. Two kinds
//! (`LoadKind`): `churn`, the bench's own connections described below, and
//! `nginx`, Debian's nginx serving one request per connection to wrk
//! (`nginx.rs`, `wrk.rs`; its transitions are counted from the
//! namespace's TCP counters, `counters.rs`).
//!
//! Churn:
//! Each worker thread plays both ends of its connections on a listener of
//! its own: connect, accept, 16 bytes each way, then close in the order the
//! mode says. Doing both ends on one thread fixes the close order exactly
//! and makes the load independent of scheduler hand-offs between client
//! and server threads. Everything runs in a fresh network namespace per
//! run (no TIME_WAIT or port state carries over from one run to the next),
//! on ports below the namespace's ephemeral range, so a tracer filtered on
//! the load's ports sees exactly the load.
//!
//! This file: what comes in (`Mode`, `LoadConfig`, the port ranges) and
//! what goes out (`LoadResult`). The rest of the load lives beside it:
//! `env.rs` (the namespace thread: set-up, run, settle, teardown),
//! `workers.rs` (the load threads), `hold.rs` (the sockets held in
//! CLOSE_WAIT, `bench-hold`), `netns.rs` (the namespace's `lo`, sysctls
//! and addresses) and `sockets.rs` (connect from a given address).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{bail, Result};
use serde_json::{json, Value};

/// Which load a block of runs uses (`--load`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LoadKind {
    /// The bench's own loopback connections (both ends on each thread).
    Churn,
    /// nginx (one worker, `keepalive_timeout 0`) and wrk, one request per
    /// connection (`Connection: close`).
    Nginx,
}

impl LoadKind {
    pub(crate) const ALL: [LoadKind; 2] = [LoadKind::Churn, LoadKind::Nginx];

    pub(crate) fn name(self) -> &'static str {
        match self {
            LoadKind::Churn => "churn",
            LoadKind::Nginx => "nginx",
        }
    }

    /// `--load` values, comma lists already split: load names or `all`,
    /// in the order given, each once.
    pub(crate) fn parse_list(specs: &[String]) -> Result<Vec<LoadKind>> {
        let mut v = Vec::new();
        for spec in specs {
            let spec = spec.trim();
            let kinds: Vec<LoadKind> = if spec == "all" {
                LoadKind::ALL.to_vec()
            } else {
                match LoadKind::ALL.into_iter().find(|k| k.name() == spec) {
                    Some(k) => vec![k],
                    None => bail!(
                        "--load: unknown load {spec:?} (one of: {}, all)",
                        LoadKind::ALL.map(LoadKind::name).join(", ")
                    ),
                }
            };
            for k in kinds {
                if !v.contains(&k) {
                    v.push(k);
                }
            }
        }
        if v.is_empty() {
            bail!("--load: no load given");
        }
        Ok(v)
    }
}

/// Who closes the connection first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// The client closes, then the server (client-side TIME_WAIT).
    ClientFirst,
    /// The server closes, then the client (server-side TIME_WAIT).
    ServerFirst,
    /// The client closes; the server keeps every socket in CLOSE_WAIT
    /// while its file descriptors last (then closes the oldest).
    NeverClose,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::ClientFirst => "client-first",
            Mode::ServerFirst => "server-first",
            Mode::NeverClose => "never-close",
        }
    }

    /// `inet_sock_set_state` events one connection causes while the run
    /// lasts (both sockets; listeners excluded).
    ///
    /// client-first: client CLOSE>SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE,
    /// server LISTEN>SYN_RECV>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE: 5 + 5.
    /// server-first: the same with the roles swapped: 5 + 5.
    /// never-close: the client's 5; the server's socket stops at
    /// CLOSE_WAIT: 3 (plus CLOSE_WAIT>LAST_ACK>CLOSE for each socket the
    /// server closes to make room, counted apart). The client's FIN_WAIT1
    /// -> FIN_WAIT2 waits for the server's delayed ACK: a timer-driven
    /// transition.
    pub(crate) fn transitions_per_conn(self) -> u64 {
        match self {
            Mode::ClientFirst | Mode::ServerFirst => 10,
            Mode::NeverClose => 8,
        }
    }

    /// Sockets of one connection that reach CLOSE while the run lasts
    /// (what a tracer with one record per closed socket, tcplife, prints).
    pub(crate) fn closed_per_conn(self) -> u64 {
        match self {
            Mode::ClientFirst | Mode::ServerFirst => 2,
            Mode::NeverClose => 1,
        }
    }
}

/// Load ports: below the namespace's ephemeral range (1024-65535), so no
/// client port can be one of them.
pub(crate) const LOAD_PORT_BASE: u16 = 700;
/// Ports of the sockets held in CLOSE_WAIT (`--hold`), outside the load's.
pub(crate) const HOLD_PORT_BASE: u16 = 500;
/// nginx's port (below the ephemeral range, above the churn ports).
pub(crate) const NGINX_PORT: u16 = 800;
/// Sockets one `bench-hold` helper keeps (below RLIMIT_NOFILE's 20,000).
pub(crate) const PER_HELPER: u64 = 18_000;
/// At most this many ports can be given to the tracer's `--port` filter.
pub(crate) const MAX_FILTER_PORTS: usize = 64;
/// Descriptors left for everything but the never-close pools.
const FD_RESERVE: u64 = 1_000;

#[derive(Clone, Debug)]
pub(crate) struct LoadConfig {
    pub kind: LoadKind,
    /// Churn: load threads; nginx: wrk's threads.
    pub threads: usize,
    /// nginx: wrk's connections (each thread keeps its share open, one
    /// request per connection).
    pub connections: u32,
    pub mode: Mode,
    pub ipv6: bool,
    /// Connections per second, all threads together; None: unbounded.
    pub rate: Option<f64>,
    /// Sockets held in CLOSE_WAIT on other ports during the run.
    pub hold: u64,
}

impl LoadConfig {
    /// The server ports the load uses (the tracer's `--port` filter): one
    /// per churn worker, or nginx's.
    pub(crate) fn load_ports(&self) -> Vec<u16> {
        match self.kind {
            LoadKind::Churn => (0..self.threads)
                .map(|i| LOAD_PORT_BASE + i as u16)
                .collect(),
            LoadKind::Nginx => vec![NGINX_PORT],
        }
    }

    pub(crate) fn hold_ports(&self) -> Vec<u16> {
        (0..self.hold.div_ceil(PER_HELPER))
            .map(|i| HOLD_PORT_BASE + i as u16)
            .collect()
    }

    /// Server sockets each never-close worker keeps at most.
    pub(crate) fn pool_per_worker(&self) -> u64 {
        (nofile_limit().saturating_sub(FD_RESERVE) / self.threads.max(1) as u64).max(1)
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        if self.kind == LoadKind::Nginx {
            if (self.connections as usize) < self.threads {
                bail!("the nginx load needs at least one connection per thread (--connections >= --threads)");
            }
            if self.rate.is_some() {
                bail!("--rate applies to the churn load only (wrk cannot pace its requests)");
            }
        }
        if self.threads > MAX_FILTER_PORTS {
            bail!(
                "at most {MAX_FILTER_PORTS} threads: each has a server port of its own, and the tracer's filter takes at most {MAX_FILTER_PORTS} ports"
            );
        }
        if self.hold_ports().len() > (LOAD_PORT_BASE - HOLD_PORT_BASE) as usize {
            bail!("--hold {} needs too many ports", self.hold);
        }
        if let Some(r) = self.rate {
            if r.is_nan() || r <= 0.0 {
                bail!("--rate must be positive");
            }
        }
        Ok(())
    }

    pub(super) fn addr(&self, port: u16) -> SocketAddr {
        if self.ipv6 {
            SocketAddr::from((Ipv6Addr::LOCALHOST, port))
        } else {
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        }
    }

    /// One line for the progress and the table's footer.
    pub(crate) fn describe(&self) -> String {
        let family = if self.ipv6 { "IPv6" } else { "IPv4" };
        let hold = if self.hold > 0 {
            format!(", {} sockets held in CLOSE_WAIT", self.hold)
        } else {
            String::new()
        };
        match self.kind {
            LoadKind::Churn => format!(
                "churn: {}, {} threads, {family}, {}{hold}",
                self.mode.name(),
                self.threads,
                self.rate
                    .map_or("unbounded".to_string(), |r| format!("capped at {r:.0} conn/s")),
            ),
            LoadKind::Nginx => format!(
                "nginx: one worker on port {NGINX_PORT}, wrk {} threads x {} connections, one request per connection (Connection: close), {family}, unbounded{hold}",
                self.threads, self.connections,
            ),
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        if self.kind == LoadKind::Nginx {
            return json!({
                "kind": self.kind.name(),
                "server": "nginx, one worker, keepalive_timeout 0, access log off",
                "client": "wrk -H 'Connection: close'",
                "threads": self.threads,
                "connections": self.connections,
                "family": if self.ipv6 { "ipv6" } else { "ipv4" },
                "hold": self.hold,
                "load_ports": self.load_ports(),
                "hold_ports": self.hold_ports(),
                "rate": "wrk's Requests/sec",
                "expected_events": "5 x (ActiveOpens + PassiveOpens) - EstabResets of the namespace (counters.rs)",
            });
        }
        json!({
            "kind": self.kind.name(),
            "threads": self.threads,
            "mode": self.mode.name(),
            "family": if self.ipv6 { "ipv6" } else { "ipv4" },
            "rate": self.rate,
            "hold": self.hold,
            "load_ports": self.load_ports(),
            "hold_ports": self.hold_ports(),
            "transitions_per_connection": self.mode.transitions_per_conn(),
            "closed_sockets_per_connection": self.mode.closed_per_conn(),
            "never_close_pool_per_thread": (self.mode == Mode::NeverClose).then(|| self.pool_per_worker()),
        })
    }
}

/// What one run of the load did.
#[derive(Clone, Debug, Default)]
pub(crate) struct LoadResult {
    pub connections: u64,
    pub elapsed: Duration,
    /// The rate the client reported (nginx: wrk's Requests/sec), instead
    /// of connections over elapsed.
    pub rate: Option<f64>,
    /// What the nginx load saw: wrk's report, the TCP counters, the
    /// connections left open at the end.
    pub detail: Option<Value>,
    /// Transitions the connections must have caused (see `Mode`).
    pub expected_transitions: u64,
    /// Sockets that reached CLOSE.
    pub expected_closed: u64,
    /// I/O errors (a run with errors has no exact expected count).
    pub errors: Vec<String>,
    /// Connects that took over 200 ms (a SYN retransmission).
    pub slow_connects: u64,
    pub max_connect: Duration,
    /// Never-close: sockets the server closed to stay within its fds
    /// (each 2 more transitions: CLOSE_WAIT>LAST_ACK>CLOSE).
    pub server_closes: u64,
    /// Sockets kept by the server (never-close) at the end of the load.
    pub held: u64,
}

impl LoadResult {
    pub(crate) fn per_second(&self) -> f64 {
        if let Some(r) = self.rate {
            return r;
        }
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.connections as f64 / s
        } else {
            0.0
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "connections": self.connections,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "connections_per_s": self.per_second(),
            "expected_transitions": self.expected_transitions,
            "expected_closed_sockets": self.expected_closed,
            "errors": self.errors,
            "slow_connects": self.slow_connects,
            "max_connect_ms": self.max_connect.as_secs_f64() * 1e3,
            "server_closes": self.server_closes,
            "held_by_server": self.held,
            "nginx": self.detail,
        })
    }
}

/// This process's soft limit on open files.
pub(crate) fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threads: usize, mode: Mode, hold: u64) -> LoadConfig {
        LoadConfig {
            kind: LoadKind::Churn,
            threads,
            connections: 50,
            mode,
            ipv6: false,
            rate: None,
            hold,
        }
    }

    #[test]
    fn ports_do_not_overlap_and_fit_the_filter() {
        let c = cfg(2, Mode::ClientFirst, 100_000);
        assert_eq!(c.load_ports(), vec![700, 701]);
        assert_eq!(c.hold_ports(), vec![500, 501, 502, 503, 504, 505]);
        c.check().unwrap();
        assert!(cfg(65, Mode::NeverClose, 0).check().is_err());
        assert!(cfg(0, Mode::ClientFirst, 0).check().is_err());
        let mut n = cfg(2, Mode::ClientFirst, 0);
        n.kind = LoadKind::Nginx;
        assert_eq!(n.load_ports(), vec![NGINX_PORT]);
        n.check().unwrap();
        n.connections = 1;
        assert!(n.check().is_err());
        n.connections = 50;
        n.rate = Some(1000.0);
        assert!(n.check().is_err());
    }

    #[test]
    fn load_lists() {
        let l = |v: &[&str]| {
            LoadKind::parse_list(
                &v.iter()
                    .map(std::string::ToString::to_string)
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(l(&["churn"]).unwrap(), vec![LoadKind::Churn]);
        assert_eq!(l(&["all", "churn"]).unwrap(), LoadKind::ALL.to_vec());
        assert_eq!(
            l(&["nginx", "churn", "nginx"]).unwrap(),
            vec![LoadKind::Nginx, LoadKind::Churn]
        );
        assert!(l(&["perf"]).is_err());
        assert!(l(&[]).is_err());
        assert_eq!(
            cfg(2, Mode::ClientFirst, 0).describe(),
            "churn: client-first, 2 threads, IPv4, unbounded"
        );
    }

    #[test]
    fn expected_counts_per_mode() {
        assert_eq!(Mode::ClientFirst.transitions_per_conn(), 10);
        assert_eq!(Mode::ServerFirst.transitions_per_conn(), 10);
        assert_eq!(Mode::NeverClose.transitions_per_conn(), 8);
        assert_eq!(Mode::NeverClose.closed_per_conn(), 1);
    }
}
