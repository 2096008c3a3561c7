//! `tracer top`: a live view of TCP on this host. The agent runs as with
//! `--events none` (the kernel batches a socket's transitions; no record
//! is written) and sends a [`model::Snapshot`] a second ([`feed`]) to the
//! view's thread ([`run`]), which draws it ([`view`]) and reads the keys.

pub mod feed;
pub mod model;
pub mod run;
pub mod view;

use std::{
    io::{self, IsTerminal as _, Write as _},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Parser as _;

use crate::cli::{parse_duration, parse_ringbuf_size, Args, Select};

/// `tracer top`'s options: the tracer's filters and the few settings
/// that size or steer the agent.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub select: Select,

    /// Connections the agent follows at once (as for `tracer`).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    pub max_sockets: u32,

    /// Size of the kernel-to-agent ring buffer (as for `tracer`).
    #[arg(long, default_value = "4M", value_parser = parse_ringbuf_size)]
    pub ringbuf_size: u32,

    /// How often timewait sockets are checked (as for `tracer`).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "D")]
    pub timewait_interval: Duration,

    /// Which kernel program receives the transitions (as for `tracer`).
    #[arg(long, value_enum, default_value_t = crate::kernel::loader::Attach::Auto)]
    pub attach: crate::kernel::loader::Attach,
}

impl TopArgs {
    /// The agent's options: `--events none` (batched kernel records, no
    /// record written), with these filters and settings.
    pub fn agent_args(&self) -> Args {
        let mut args = Args::parse_from(["tracer", "--events", "none"]);
        args.select = self.select.clone();
        args.max_sockets = self.max_sockets;
        args.ringbuf_size = self.ringbuf_size;
        args.timewait_interval = self.timewait_interval;
        args.attach = self.attach;
        args
    }
}

/// Exit code of a usage error (as clap's).
const USAGE: u8 = 2;

/// Diagnostics while the view owns the terminal: kept, and printed once
/// it is given back.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            // Bounded: a flood of warnings must not grow without end.
            if v.len() < 1 << 20 {
                v.extend_from_slice(buf);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn main(top: &TopArgs) -> ExitCode {
    if !io::stdout().is_terminal() {
        eprintln!(
            "tracer: error: tracer top needs a terminal on stdout (to record or pipe, run tracer without `top`)"
        );
        return ExitCode::from(USAGE);
    }
    match crossterm::terminal::size() {
        Ok((w, h)) if w >= view::MIN_WIDTH && h >= view::MIN_HEIGHT => {}
        Ok((w, h)) => {
            eprintln!("tracer: error: {}", view::too_small(w, h));
            return ExitCode::from(USAGE);
        }
        Err(e) => {
            eprintln!("tracer: error: cannot read the terminal's size: {e}");
            return ExitCode::from(USAGE);
        }
    }
    let logs = Logs::default();
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .format_timestamp(None)
        .format_target(false)
        .target(env_logger::Target::Pipe(Box::new(logs.clone())))
        .init();
    // A panic gives the terminal back before its one line is printed.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        run::restore();
        hook(info);
    }));

    let (snapshots, from_agent) = std::sync::mpsc::sync_channel(2);
    let (quit, quit_rx) = tokio::sync::oneshot::channel();
    let view = match std::thread::Builder::new()
        .name("tracer-top".into())
        .spawn(move || run::view(from_agent, quit))
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tracer: error: cannot start the view's thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let agent = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(crate::agent::run(
            top.agent_args(),
            Some(feed::Live {
                snapshots,
                quit: quit_rx,
            }),
        )),
        Err(e) => Err(anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    // The agent has stopped and dropped its sender: the view ends too.
    let view = view.join();
    run::restore();
    if let Ok(v) = logs.0.lock() {
        let _ = io::stderr().write_all(&v);
    }
    // Its panic has been printed.
    let Ok(view) = view else {
        return ExitCode::FAILURE;
    };
    match (agent, view) {
        (Err(e), _) => {
            eprintln!("tracer: error: {e:#}");
            ExitCode::FAILURE
        }
        (Ok(()), Err(e)) => {
            eprintln!("tracer: error: the terminal: {e}");
            ExitCode::FAILURE
        }
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
    }
}
