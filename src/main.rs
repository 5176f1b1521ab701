//! `velo`: the Velo Rift command line. It parses arguments and prints; the libraries do the
//! work (`velo-objects` the store, `velo-image` snapshots and images, `velo-mount` mounts).

mod cli;
mod commands;
mod output;
mod progress;
mod project;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `velo run`, the hot path, skips building clap's parser for every subcommand.
    let cli = cli::parse_run_fast(&argv).unwrap_or_else(|| cli::Cli::parse_from(argv));
    init_logging(&cli);
    let json = cli.json;
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            if json {
                println!("{}", serde_json::json!({ "error": msg }));
            }
            eprintln!("velo: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cli: &cli::Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => LevelFilter::ERROR,
        (false, 0) => LevelFilter::WARN,
        (false, 1) => LevelFilter::INFO,
        (false, _) => LevelFilter::DEBUG,
    };
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time();
    // A plain level unless VELO_LOG asks for more (an EnvFilter costs a little at every start).
    match std::env::var("VELO_LOG") {
        Ok(spec) => fmt
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_new(&spec)
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.to_string())),
            )
            .init(),
        Err(_) => fmt.with_max_level(level).init(),
    }
}
