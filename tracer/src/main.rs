use std::process::ExitCode;

use clap::Parser as _;
use tracer::{
    agent,
    cli::{Args, Command},
    manual,
    report::replay,
};

fn main() -> ExitCode {
    // Users get one line, never a backtrace, whatever RUST_BACKTRACE says.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("tracer: internal error: {info}");
    }));
    let args = Args::parse();
    // The view owns the terminal: it sets up its own diagnostics.
    if let Some(Command::Top(t)) = &args.command {
        return tracer::top::main(t);
    }
    let level = match args.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp(None)
        .format_target(false)
        .init();

    let offline = match &args.command {
        Some(Command::Summarize(s)) => Some(replay::run(s)),
        Some(Command::Completions { shell }) => {
            manual::write_completions(*shell, &mut std::io::stdout().lock());
            Some(Ok(()))
        }
        Some(Command::Man) => {
            Some(manual::write_man(&mut std::io::stdout().lock()).map_err(anyhow::Error::from))
        }
        // Handled above, before the logger.
        Some(Command::Top(_)) | None => None,
    };
    if let Some(result) = offline {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tracer: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tracer: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(args, None)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
