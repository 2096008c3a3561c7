//! Sockets held in CLOSE_WAIT (`--hold`) during every run, by `bench-hold`
//! helper processes.
//!
//! In: the `LoadConfig` (how many sockets, IPv4 or IPv6). The helpers are
//! started from the namespace thread (they inherit its namespace), each
//! holds up to `PER_HELPER` sockets on a port of its own and reports
//! `ready`; at teardown each checks its sockets and reports a `HeldCheck`
//! line (`held N eof E other O`), summed here. `hold_helper` is the
//! helper's side (`xtask bench-hold`).

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Child, ChildStdout, Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::{
    load::{LoadConfig, Mode, PER_HELPER},
    sockets::{client_addr, connect_from, listen},
};

/// What the held sockets looked like at teardown: each should read EOF
/// (in CLOSE_WAIT: the peer's FIN arrived, nothing else).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HeldCheck {
    pub held: u64,
    pub eof: u64,
    pub other: u64,
}

impl HeldCheck {
    pub(crate) fn add(&mut self, o: HeldCheck) {
        self.held += o.held;
        self.eof += o.eof;
        self.other += o.other;
    }

    /// Reads each socket without blocking: EOF is the only right answer.
    pub(crate) fn of<'a>(sockets: impl Iterator<Item = &'a TcpStream>) -> HeldCheck {
        let mut c = HeldCheck::default();
        for s in sockets {
            c.held += 1;
            let _ = s.set_nonblocking(true);
            let mut b = [0u8; 1];
            match (&*s).read(&mut b) {
                Ok(0) => c.eof += 1,
                _ => c.other += 1,
            }
        }
        c
    }

    /// The helper's report line: `held N eof E other O`.
    pub(crate) fn parse(line: &str) -> Option<HeldCheck> {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["held", h, "eof", e, "other", o] => Some(HeldCheck {
                held: h.parse().ok()?,
                eof: e.parse().ok()?,
                other: o.parse().ok()?,
            }),
            _ => None,
        }
    }

    pub(crate) fn line(&self) -> String {
        format!("held {} eof {} other {}", self.held, self.eof, self.other)
    }
}

/// A `bench-hold` helper process and the pipes to it.
pub(crate) struct Helper {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

/// Starts the `bench-hold` helpers (from this thread: they inherit its
/// namespace) and waits until each holds its sockets.
pub(crate) fn start_helpers(cfg: &LoadConfig, helpers: &mut Vec<Helper>) -> Result<()> {
    let mut left = cfg.hold;
    for (i, port) in cfg.hold_ports().into_iter().enumerate() {
        let n = left.min(PER_HELPER);
        left -= n;
        helpers.push(spawn_helper(port, n, i as u64 * PER_HELPER, cfg.ipv6)?);
    }
    wait_ready(helpers)
}

/// Starts one `bench-hold` helper (in this thread's namespace) that holds
/// `count` sockets on `port`, its clients from the `first_addr`th client
/// address on; `wait_ready` waits for it.
pub(crate) fn spawn_helper(port: u16, count: u64, first_addr: u64, ipv6: bool) -> Result<Helper> {
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let mut cmd = Command::new(&exe);
    cmd.args(["bench-hold", "--port", &port.to_string()])
        .args(["--count", &count.to_string()])
        .args(["--first-addr", &first_addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if ipv6 {
        cmd.arg("--ipv6");
    }
    let mut child = cmd.spawn().context("starting a bench-hold helper")?;
    let stdout = BufReader::new(child.stdout.take().expect("piped"));
    Ok(Helper { child, stdout })
}

/// Waits until each helper says it holds its sockets.
pub(crate) fn wait_ready(helpers: &mut [Helper]) -> Result<()> {
    for h in helpers.iter_mut() {
        let mut line = String::new();
        h.stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!(
                "a bench-hold helper failed to hold its sockets ({})",
                h.child
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string())
            );
        }
    }
    Ok(())
}

/// Tells the helpers to check and close their sockets; sums their checks.
pub(crate) fn stop_helpers(helpers: Vec<Helper>) -> HeldCheck {
    let mut total = HeldCheck::default();
    let mut helpers = helpers;
    for h in helpers.iter_mut() {
        drop(h.child.stdin.take());
    }
    for mut h in helpers {
        let mut line = String::new();
        let _ = h.stdout.read_line(&mut line);
        match HeldCheck::parse(&line) {
            Some(c) => total.add(c),
            None => total.other += 1,
        }
        let _ = h.child.wait();
    }
    total
}

/// `xtask bench-hold`: in the caller's namespace, open `count` connections
/// to a listener of its own on `port`, close the client ends and keep the
/// server ends (CLOSE_WAIT); print `ready`, wait for stdin to close, then
/// check the sockets, print the check and exit.
pub(crate) fn hold_helper(port: u16, count: u64, first_addr: u64, ipv6: bool) -> Result<()> {
    let cfg = LoadConfig {
        kind: super::load::LoadKind::Churn,
        threads: 1,
        connections: 1,
        mode: Mode::NeverClose,
        ipv6,
        rate: None,
        hold: 0,
    };
    let dst = cfg.addr(port);
    let listener = listen(dst)?;
    let mut held = Vec::with_capacity(count as usize);
    for i in 0..count {
        let client = connect_from(client_addr(ipv6, first_addr + i), dst)
            .with_context(|| format!("connect to {dst} after {i} held"))?;
        let (server, _) = listener.accept().context("accept")?;
        drop(client);
        held.push(server);
    }
    println!("ready");
    io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = io::stdin().read_to_end(&mut sink);
    println!("{}", HeldCheck::of(held.iter()).line());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_check_lines() {
        let c = HeldCheck {
            held: 3,
            eof: 2,
            other: 1,
        };
        assert_eq!(HeldCheck::parse(&c.line()), Some(c));
        assert_eq!(HeldCheck::parse("ready"), None);
    }
}
