//! `velo`: the Velo Rift command line. It parses arguments and prints; the libraries do the
//! work (`velo-objects` the store, `velo-image` snapshots and images, `velo-mount` mounts).

/// `print!` through [`output::stdout`] (a reader that went away ends velo quietly).
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::stdout(format_args!($($arg)*)) };
}

/// `println!` through [`output::stdout`].
macro_rules! outln {
    ($($arg:tt)*) => { $crate::output::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

mod cli;
mod commands;
mod logging;
mod output;
mod progress;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `velo run`, the hot path, skips building clap's parser for every subcommand.
    let cli = cli::parse_run_fast(&argv).unwrap_or_else(|| cli::Cli::parse_from(argv));
    logging::init(cli.quiet, cli.verbose);
    let json = cli.json;
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(i) = e.downcast_ref::<velo_project::Interrupted>() {
                eprintln!("velo: {e}");
                // Exit the way the build did: killed by the same signal (a shell shows 130
                // for Ctrl-C), so scripts and CI see an interruption, not a failure.
                return velo_project::run::exit_like(-i.signal).unwrap_or(ExitCode::FAILURE);
            }
            let msg = format!("{e:#}");
            if json {
                outln!("{}", serde_json::json!({ "error": msg }));
            }
            eprintln!("velo: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
