//! Command-line interface. The flags, record types and field names are a
//! contract with users' scripts: extend, never rename.

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::report::format::{EventsMode, Format};

#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    about = "Trace TCP state transitions and time every connection in every state",
    long_about = "Trace TCP state transitions from the kernel's sock:inet_sock_set_state \
                  tracepoint and record how long each connection spends in each TCP state.\n\n\
                  Data goes to stdout, diagnostics to stderr. Needs root (or CAP_BPF and CAP_PERFMON).",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,

    /// Which records to print.
    #[arg(long, value_enum, default_value_t = EventsMode::Transitions)]
    pub events: EventsMode,

    /// Stop after this long (e.g. 10s, 5m, 250ms).
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    #[command(flatten)]
    pub select: Select,

    /// Tables: add a CGROUP column (the owner's container, else its
    /// cgroup path).
    #[arg(short, long)]
    pub wide: bool,

    /// How often timewait sockets are checked (sock_diag dumps, only while
    /// actively closed connections wait for theirs to end).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "D")]
    pub timewait_interval: Duration,

    /// Report connections that stay in CLOSE_WAIT longer than D (the peer
    /// closed, the local application never called close()); 0 disables.
    #[arg(long, default_value = "30s", value_parser = parse_duration_or_zero, value_name = "D")]
    pub close_wait: Duration,

    /// Report connections that stay in FIN_WAIT2 longer than D (we closed,
    /// the peer never sent its FIN); 0 (the default) disables.
    #[arg(long, default_value = "0", value_parser = parse_duration_or_zero, value_name = "D")]
    pub fin_wait2: Duration,

    /// Report a destination (namespace, local address, remote address and
    /// port) whose connections hold PCT percent of the ephemeral port
    /// range or more (`port_pressure` records, `!! PORTS` lines), again
    /// when it falls back below, and those still above at exit; 0
    /// disables.
    #[arg(long, default_value_t = 50, value_parser = parse_percent, value_name = "PCT")]
    pub port_pressure: u8,

    /// Connections the agent follows at once (more are counted as
    /// `untracked`): about 450 bytes of agent memory each. On the classic
    /// tracepoint path it also sizes the kernel's timing table (about 80
    /// bytes a socket); on the BTF path the kernel keeps each socket's
    /// timing with the socket itself (docs/performance.md, Memory).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    pub max_sockets: u32,

    /// Size of the kernel-to-agent ring buffer in bytes: a power of two,
    /// at least 4096 (suffixes K and M accepted).
    #[arg(long, default_value = "4M", value_parser = parse_ringbuf_size)]
    pub ringbuf_size: u32,

    /// Records that may wait for a slow reader of stdout, in bytes
    /// (suffixes K and M); past it, records are dropped and counted
    /// (`output_dropped`), and tracing goes on.
    #[arg(long, default_value = "16M", value_parser = parse_output_buffer, value_name = "BYTES")]
    pub output_buffer: u32,

    /// Ring buffer fill (bytes) that wakes the agent; below it the agent
    /// drains every 50 ms. Fewer wake-ups cost the traced applications
    /// less. Default: an eighth of --ringbuf-size; 0 wakes it per event.
    #[arg(long, value_name = "BYTES")]
    pub wakeup_bytes: Option<u64>,

    /// Which kernel program receives the transitions: `tp-btf` (the BTF
    /// tracepoint with socket-local storage: cheapest, no skipped runs),
    /// `tracepoint` (the classic tracepoint with an LRU hash of
    /// --max-sockets), or `auto`: tp-btf where the kernel allows it (BTF,
    /// 5.11+), else tracepoint. `-v` says which runs.
    #[arg(long, value_enum, default_value_t = crate::kernel::loader::Attach::Auto)]
    pub attach: crate::kernel::loader::Attach,

    /// More diagnostics on stderr (repeat for debug output).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(flatten)]
    pub summary: crate::report::summary::SummaryArgs,

    #[command(flatten)]
    pub metrics: crate::report::metrics::MetricsArgs,
}

/// Which connections to follow: the filters set in the kernel (shared by
/// the bare command and `tracer top`).
#[derive(Debug, Clone, clap::Args)]
pub struct Select {
    /// Only connections with this local or remote port (repeatable).
    #[arg(short, long = "port", value_name = "PORT", value_parser = parse_port)]
    pub ports: Vec<u16>,

    /// Only IPv4.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Only IPv6.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Only connections with this local port (repeatable).
    #[arg(long = "lport", value_name = "PORT", value_parser = parse_port)]
    pub lports: Vec<u16>,

    /// Only connections with this remote port (repeatable).
    #[arg(long = "rport", value_name = "PORT", value_parser = parse_port)]
    pub rports: Vec<u16>,

    /// Only connections whose local address is in this prefix (CIDR or an
    /// address; IPv4 or IPv6; repeatable).
    #[arg(long = "laddr", value_name = "CIDR", value_parser = crate::kernel::filters::parse_cidr)]
    pub laddrs: Vec<ipnet::IpNet>,

    /// Only connections whose remote address is in this prefix (repeatable).
    #[arg(long = "raddr", value_name = "CIDR", value_parser = crate::kernel::filters::parse_cidr)]
    pub raddrs: Vec<ipnet::IpNet>,

    /// Only transitions into or out of this state (e.g. CLOSE_WAIT;
    /// repeatable). Timing stays right: the kernel times every state.
    #[arg(long = "state", value_name = "STATE", value_parser = crate::kernel::filters::parse_state)]
    pub states: Vec<crate::kernel::events::TcpState>,

    /// Only sockets of this network namespace: a path (/proc/PID/ns/net,
    /// /run/netns/NAME) or its inode number.
    #[arg(long, value_name = "PATH|INODE", value_parser = crate::kernel::filters::parse_netns)]
    pub netns: Option<u32>,

    /// Only sockets owned by this process (the one that connects, listens,
    /// accepts or closes them).
    #[arg(long, value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,

    /// Only sockets owned by a process with this name (as in
    /// /proc/PID/comm, at most 15 bytes).
    #[arg(long, value_name = "NAME", value_parser = crate::kernel::filters::parse_comm)]
    pub comm: Option<String>,

    /// Only sockets owned by a process in this cgroup v2 directory or
    /// below it (e.g. /sys/fs/cgroup/system.slice/nginx.service; repeatable).
    #[arg(long = "cgroup", value_name = "PATH", value_parser = crate::track::containers::parse_cgroup)]
    pub cgroups: Vec<crate::track::containers::Selected>,

    /// Only sockets owned by a process of this container (its id, or a
    /// prefix of it as `docker ps` shows; found in the cgroup v2
    /// hierarchy; repeatable).
    #[arg(long = "container", value_name = "ID", value_parser = crate::track::containers::parse_container)]
    pub containers: Vec<crate::track::containers::Selected>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the summary (as --summary) of a recording made with
    /// `--output json`; needs no privileges.
    Summarize(crate::report::replay::SummarizeArgs),
    /// Print a shell completion script to stdout, e.g.
    /// `tracer completions bash > /etc/bash_completion.d/tracer`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `tracer man | man -l -`.
    #[command(hide = true)]
    Man,
    /// A live view of TCP on this host: connections by state, closes,
    /// CLOSE_WAIT holders, TIME_WAIT by destination (q quits, s sorts,
    /// / filters, p pauses); needs a terminal.
    Top(Box<crate::top::TopArgs>),
}

impl Args {
    /// The filters to set in the kernel.
    pub fn filters(&self) -> crate::kernel::filters::Filters {
        self.select.filters()
    }

    /// Address family to keep: `None` for both.
    pub fn family(&self) -> Option<crate::kernel::events::Family> {
        self.select.family()
    }
}

impl Select {
    /// The filters to set in the kernel.
    pub fn filters(&self) -> crate::kernel::filters::Filters {
        crate::kernel::filters::Filters {
            family: self.family(),
            ports: self.ports.clone(),
            lports: self.lports.clone(),
            rports: self.rports.clone(),
            laddrs: self.laddrs.clone(),
            raddrs: self.raddrs.clone(),
            states: self.states.clone(),
            netns: self.netns,
            pid: self.pid,
            comm: self.comm.clone(),
            cgroups: self
                .cgroups
                .iter()
                .chain(&self.containers)
                .cloned()
                .collect(),
            under_cgroups: Default::default(),
        }
    }

    /// Address family to keep: `None` for both.
    pub fn family(&self) -> Option<crate::kernel::events::Family> {
        use crate::kernel::events::Family;
        match (self.ipv4, self.ipv6) {
            (true, _) => Some(Family::Ipv4),
            (_, true) => Some(Family::Ipv6),
            _ => None,
        }
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 10s, 5m, 250ms)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 5m, 0 to disable)"))
}

fn parse_percent(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(n) if n <= 100 => Ok(n),
        _ => Err(format!("`{s}` is not a percentage (0-100, 0 disables)")),
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a port number"))?;
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("port {n} is out of range (1-65535)")),
    }
}

fn parse_output_buffer(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s)?;
    if !(64 << 10..=1 << 30).contains(&bytes) {
        return Err(format!("{bytes} bytes: must be from 64K to 1024M"));
    }
    Ok(bytes as u32)
}

/// `4M`, `256K`, `65536`: bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1u64 << 10),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1u64 << 20),
            None => (s, 1),
        },
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 4M, 262144)"))?;
    Ok(n.saturating_mul(mult))
}

pub(crate) fn parse_ringbuf_size(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s)?;
    if bytes < 4096 || !bytes.is_power_of_two() || bytes > (1 << 30) {
        return Err(format!(
            "{bytes} bytes: must be a power of two from 4K to 1024M"
        ));
    }
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("tracer").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.output, Format::Table);
        assert_eq!(a.events, EventsMode::Transitions);
        assert_eq!(a.duration, None);
        assert!(a.select.ports.is_empty());
        assert_eq!(a.family(), None);
        assert_eq!(a.ringbuf_size, 4 << 20);
        assert_eq!(a.close_wait, Duration::from_secs(30));
        assert_eq!(a.fin_wait2, Duration::ZERO);
        assert_eq!(a.timewait_interval, Duration::from_secs(1));
    }

    #[test]
    fn lifecycle_flags() {
        let a = parse(&[
            "--close-wait",
            "0",
            "--fin-wait2",
            "2m",
            "--timewait-interval",
            "250ms",
        ])
        .unwrap();
        assert_eq!(a.close_wait, Duration::ZERO);
        assert_eq!(a.fin_wait2, Duration::from_secs(120));
        assert_eq!(a.timewait_interval, Duration::from_millis(250));
        assert!(parse(&["--close-wait", "soon"]).is_err());
        assert!(parse(&["--timewait-interval", "0"]).is_err());
    }

    #[test]
    fn full_command_line() {
        let a = parse(&[
            "--output",
            "json",
            "--events",
            "all",
            "--duration",
            "250ms",
            "--port",
            "80",
            "-p",
            "443",
            "-6",
        ])
        .unwrap();
        assert_eq!(a.output, Format::Json);
        assert!(a.events.transitions() && a.events.connections());
        assert_eq!(a.duration, Some(Duration::from_millis(250)));
        assert_eq!(a.select.ports, vec![80, 443]);
        assert_eq!(a.family(), Some(crate::kernel::events::Family::Ipv6));
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse(&["-d", "10s"]).unwrap().duration,
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse(&["-d", "5m"]).unwrap().duration,
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            parse(&["-d", "abc"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            parse(&["-d", "0s"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn port_out_of_range_is_a_usage_error() {
        let err = parse(&["--port", "65536"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(err.to_string().contains("out of range"), "{err}");
        assert!(parse(&["--port", "0"]).is_err());
        assert!(parse(&["--port", "http"]).is_err());
    }

    #[test]
    fn kernel_filters_parse_and_reject_bad_values() {
        let a = parse(&[
            "--lport",
            "80",
            "--rport",
            "5432",
            "--laddr",
            "10.0.0.0/8",
            "--raddr",
            "2001:db8::/32",
            "--state",
            "close_wait",
            "--netns",
            "/proc/self/ns/net",
            "--pid",
            "42",
            "--comm",
            "nginx",
        ])
        .unwrap();
        let f = a.filters();
        assert_eq!((f.lports, f.rports), (vec![80], vec![5432]));
        assert_eq!(f.laddrs[0].to_string(), "10.0.0.0/8");
        assert_eq!(f.states, vec![crate::kernel::events::TcpState::CloseWait]);
        assert!(f.netns.is_some());
        assert_eq!((f.pid, f.comm.as_deref()), (Some(42), Some("nginx")));
        for bad in [
            &["--lport", "70000"][..],
            &["--raddr", "10.0.0.0/40"],
            &["--state", "OPEN"],
            &["--netns", "/nonexistent"],
            &["--pid", "0"],
            &["--comm", "much-too-long-a-name"],
            &["--cgroup", "/no/such"],
            &["--cgroup", "/proc"],
            &["--container", "not-hex"],
        ] {
            assert_eq!(
                parse(bad).unwrap_err().kind(),
                ErrorKind::ValueValidation,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ipv4_and_ipv6_conflict() {
        assert_eq!(
            parse(&["-4", "-6"]).unwrap_err().kind(),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn output_buffer_sizes() {
        assert_eq!(parse(&[]).unwrap().output_buffer, 16 << 20);
        assert_eq!(
            parse(&["--output-buffer", "256K"]).unwrap().output_buffer,
            256 << 10
        );
        for bad in ["1K", "2048M", "lots"] {
            assert_eq!(
                parse(&["--output-buffer", bad]).unwrap_err().kind(),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_enum_values_and_unknown_flags() {
        assert_eq!(
            parse(&["--output", "xml"]).unwrap_err().kind(),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            parse(&["--events", "some"]).unwrap_err().kind(),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            parse(&["--bogus"]).unwrap_err().kind(),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn ringbuf_sizes() {
        assert_eq!(
            parse(&["--ringbuf-size", "256K"]).unwrap().ringbuf_size,
            256 << 10
        );
        assert_eq!(
            parse(&["--ringbuf-size", "8192"]).unwrap().ringbuf_size,
            8192
        );
        assert!(parse(&["--ringbuf-size", "1000"]).is_err());
        assert!(parse(&["--ringbuf-size", "2048"]).is_err());
    }
}
