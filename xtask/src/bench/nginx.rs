//! The nginx load's server: Debian's nginx, one worker, started by the
//! bench inside the run's network namespace.
//!
//! In: the `LoadConfig` (IPv4 or IPv6). `Nginx::start`, called from the
//! namespace's thread (so nginx inherits the namespace), writes a config
//! of its own, a small page and wrk's script into a fresh temporary
//! directory (pid file, error log and nginx's temporary paths are inside
//! it too), starts `nginx -p DIR -c DIR/nginx.conf` in the foreground and
//! returns once it listens on `NGINX_PORT`. `Nginx::stop` ends it (its
//! process group) and removes the directory. The server: `keepalive_timeout
//! 0` (one request per connection, nginx closes first), no access log,
//! a static page of `PAGE_BYTES`.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    env::sockets_in,
    load::{LoadConfig, NGINX_PORT},
    subject::find_binary,
};

/// Size of the page nginx serves.
pub(super) const PAGE_BYTES: usize = 612;
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The line the wrk script prints once wrk's report is out, before it
/// waits for its stdin to close.
pub(super) const WRK_DONE: &str = "xtask-bench: wrk done";

/// nginx's configuration for the bench, with everything it writes in
/// `dir`.
pub(super) fn config(dir: &Path, port: u16, ipv6: bool) -> String {
    let d = dir.display();
    let listen = if ipv6 {
        format!("[::1]:{port} ipv6only=on")
    } else {
        format!("127.0.0.1:{port}")
    };
    format!(
        "# Written by cargo xtask bench (xtask/src/bench/nginx.rs).
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_timeout 0;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {listen} backlog=4096;
        root {d}/www;
        location / {{
        }}
    }}
}}
"
    )
}

/// wrk's script: after wrk's report (it calls `done` last), say so and
/// keep wrk, and so its open connections, alive until stdin closes.
pub(super) fn wrk_script() -> String {
    format!(
        "-- Written by cargo xtask bench (xtask/src/bench/nginx.rs): hold the
-- connections open after the report until the bench closes stdin.
done = function(summary, latency, requests)
  io.write(\"{WRK_DONE}\\n\")
  io.flush()
  io.read(\"*a\")
end
"
    )
}

fn page() -> String {
    let head = "<!DOCTYPE html>\n<html><head><title>tracer bench</title></head><body>\n<p>";
    let tail = "</p>\n</body></html>\n";
    let fill = PAGE_BYTES - head.len() - tail.len();
    format!("{head}{}{tail}", "x".repeat(fill))
}

/// A running nginx and its directory.
pub(super) struct Nginx {
    child: Option<Child>,
    pub dir: PathBuf,
    /// `http://127.0.0.1:800/` or `http://[::1]:800/`.
    pub url: String,
    pub port: u16,
}

impl Nginx {
    /// Starts nginx in the calling thread's network namespace and waits
    /// until it listens.
    pub(super) fn start(cfg: &LoadConfig) -> Result<Nginx> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let bin = find_binary("nginx").context(
            "nginx is not installed (Debian package nginx; cargo xtask bench installs it)",
        )?;
        let dir = std::env::temp_dir().join(format!(
            "tracer-bench-nginx-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("www"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let port = NGINX_PORT;
        fs::write(dir.join("nginx.conf"), config(&dir, port, cfg.ipv6))?;
        fs::write(dir.join("www/index.html"), page())?;
        fs::write(dir.join("wrk.lua"), wrk_script())?;
        let stderr = fs::File::create(dir.join("stderr"))?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // A group of its own: its worker goes with it at the stop.
            .process_group(0)
            .spawn()
            .context("starting nginx")?;
        let url = if cfg.ipv6 {
            format!("http://[::1]:{port}/")
        } else {
            format!("http://127.0.0.1:{port}/")
        };
        let mut n = Nginx {
            child: Some(child),
            dir,
            url,
            port,
        };
        let t0 = Instant::now();
        loop {
            let listening: u64 = ["tcp", "tcp6"]
                .iter()
                .map(|f| {
                    fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                        .map(|t| sockets_in(&t, &[port], &["0A"]))
                        .unwrap_or(0)
                })
                .sum();
            if listening > 0 {
                return Ok(n);
            }
            let exited = n.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                let log = n.log_tail();
                n.stop();
                bail!("nginx exited ({status}) before it listened: {log}");
            }
            if t0.elapsed() > LISTEN_TIMEOUT {
                let log = n.log_tail();
                n.stop();
                bail!("nginx did not listen on port {port} within {LISTEN_TIMEOUT:?}: {log}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The script for wrk (in the directory).
    pub(super) fn wrk_script_path(&self) -> PathBuf {
        self.dir.join("wrk.lua")
    }

    /// The last lines nginx wrote (error log and stderr).
    pub(super) fn log_tail(&self) -> String {
        let mut lines = Vec::new();
        for f in ["error.log", "stderr"] {
            let text = fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            lines.extend(text.lines().map(str::to_string));
        }
        let n = lines.len();
        match lines[n.saturating_sub(3)..].join(" | ") {
            s if s.is_empty() => "(nothing in its logs)".into(),
            s => s,
        }
    }

    /// Fast shutdown (SIGTERM to its group: the master waits for its
    /// worker), SIGKILL to the group after STOP_TIMEOUT; removes its
    /// directory.
    pub(super) fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as i32;
            // SAFETY: plain syscalls on the process group we made.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let t0 = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if t0.elapsed() > STOP_TIMEOUT => {
                        // SAFETY: as above.
                        unsafe { libc::kill(-pgid, libc::SIGKILL) };
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_everything_in_its_directory() {
        let c = config(Path::new("/tmp/x"), 800, false);
        assert!(c.contains("listen 127.0.0.1:800 backlog=4096;"));
        assert!(c.contains("keepalive_timeout 0;"));
        assert!(c.contains("access_log off;"));
        assert!(c.contains("worker_processes 1;"));
        assert!(c.contains("daemon off;"));
        for l in c
            .lines()
            .filter(|l| l.contains("path ") || l.contains("pid "))
        {
            assert!(l.contains(" /tmp/x/"), "{l}");
        }
        assert!(config(Path::new("/d"), 800, true).contains("listen [::1]:800 ipv6only=on"));
    }

    #[test]
    fn page_and_script() {
        assert_eq!(page().len(), PAGE_BYTES);
        let s = wrk_script();
        assert!(s.contains(&format!("io.write(\"{WRK_DONE}\\n\")")));
        assert!(s.contains("io.read(\"*a\")"));
    }
}
