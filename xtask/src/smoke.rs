//! A short real trace with a given tracer binary: one loopback connection
//! in a network namespace of its own, traced with `--duration 2s`, and the
//! transitions it must print. `dist.rs` runs the release binary from its
//! tarball this way on the host (the guests' init does the same with
//! busybox's nc, `vm.rs`).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

/// The transitions of a connection whose client closes first, each
/// printed once (the listener's own `CLOSE -> LISTEN` comes before the
/// tracer starts).
pub(crate) const CONNECTION: &[&str] = &[
    "CLOSE -> SYN_SENT",
    "SYN_SENT -> ESTABLISHED",
    "LISTEN -> SYN_RECV",
    "SYN_RECV -> ESTABLISHED",
    "ESTABLISHED -> FIN_WAIT1",
    "ESTABLISHED -> CLOSE_WAIT",
    "FIN_WAIT1 -> FIN_WAIT2",
    "CLOSE_WAIT -> LAST_ACK",
    "LAST_ACK -> CLOSE",
    "FIN_WAIT2 -> CLOSE",
];

const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `bin` as root in a new network namespace while a client connects
/// to a local server, sends a line and closes first; checks what it printed.
pub(crate) fn trace_loopback(bin: &Path) -> Result<()> {
    let bin = bin.to_path_buf();
    thread::spawn(move || in_own_netns(&bin))
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn in_own_netns(bin: &PathBuf) -> Result<()> {
    // SAFETY: plain syscall; affects only this thread (and what it spawns).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!(
            "unshare(CLONE_NEWNET): {} (the check runs as root)",
            std::io::Error::last_os_error()
        );
    }
    loopback_up()?;
    let netns = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let mut child = Command::new(bin)
        .args(["--port", &port.to_string(), "--netns", &netns.to_string()])
        .args(["--duration", "2s", "--events", "all", "-v"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut stdout = child.stdout.take().expect("piped");
    let out = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    let mut err = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let attached = line.contains("attached");
                err.push(line);
                if attached {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                bail!("the tracer exited before attaching: {}", err.join("\n"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if started.elapsed() > ATTACH_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the tracer did not attach within {ATTACH_TIMEOUT:?}: {}",
                err.join("\n")
            );
        }
    }

    let server = thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut conn, _) = listener.accept()?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got)?;
        // Closes after the client: CLOSE_WAIT, LAST_ACK.
        Ok(got)
    });
    let mut client = TcpStream::connect(("127.0.0.1", port))?;
    client.write_all(b"hello\n")?;
    drop(client);
    let got = server.join().expect("server thread")?;
    ensure!(got == b"hello\n", "the server received {got:?}");

    let status = child.wait()?;
    let out = out.join().expect("stdout thread");
    err.extend(rx.try_iter());
    ensure!(
        status.success(),
        "the tracer exited with {status}; stderr:\n{}",
        err.join("\n")
    );
    let missing = missing_transitions(&out, port);
    ensure!(
        missing.is_empty(),
        "the tracer did not print {missing:?}; it printed:\n{out}\nstderr:\n{}",
        err.join("\n")
    );
    let stats = err.last().map(String::as_str).unwrap_or_default();
    ensure!(
        stats.starts_with("tracer: ") && stats.contains(" events, 0 lost"),
        "no summary line on stderr (tracer: N events, 0 lost, ...): {stats:?}"
    );
    Ok(())
}

/// Which of [`CONNECTION`]'s transitions no line of `out` about `port`
/// shows.
fn missing_transitions(out: &str, port: u16) -> Vec<&'static str> {
    let port = format!(":{port} ");
    CONNECTION
        .iter()
        .copied()
        .filter(|t| {
            !out.lines()
                .any(|l| l.contains(&port) && l.contains(&format!(" {t} ")))
        })
        .collect()
}

fn loopback_up() -> Result<()> {
    // SAFETY: ioctls on a socket we own with a zeroed, correctly sized ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr) == 0 && {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr) == 0
        };
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        ensure!(ok, "bringing lo up: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_are_matched_by_port_and_name() {
        let line = |t: &str| {
            format!("11:21:11.383431  1  python3  127.0.0.1:38388  127.0.0.1:8080  {t}   0.026\n")
        };
        let all: String = CONNECTION.iter().map(|t| line(t)).collect();
        assert!(missing_transitions(&all, 8080).is_empty());
        assert_eq!(missing_transitions(&all, 8081).len(), CONNECTION.len());
        let some: String = CONNECTION[1..].iter().map(|t| line(t)).collect();
        assert_eq!(missing_transitions(&some, 8080), ["CLOSE -> SYN_SENT"]);
    }
}
