//! `velo`: the Velo Rift command line. It parses arguments and prints; the libraries do the
//! work (`velo-objects` the store, `velo-image` snapshots and images, `velo-mount` mounts).

mod cli;
mod commands;
mod output;
mod progress;
mod project;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
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
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VELO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}
