//! `velo-mountd`: the root service that owns a velo store and hands ordinary users the
//! mounts of their trees (see `velo_mount::service`). Runs in the foreground; systemd starts
//! it through `deploy/systemd/velo-mountd.socket` (socket activation), or run it by hand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use velo_mount::service;
use velo_mount::units::{parse_bytes, parse_duration};
use velo_objects::Store;

#[derive(Parser)]
#[command(
    name = "velo-mountd",
    version,
    about = "The root service that owns a velo store and hands ordinary users their mounts"
)]
struct Cli {
    /// The store the service owns (created, root 0700, if missing).
    #[arg(long, env = "VELO_STORE", default_value = velo_objects::DEFAULT_STORE)]
    store: PathBuf,
    /// Where to listen (ignored when systemd passes the socket).
    #[arg(long, env = "VELO_SOCKET", default_value = velo_mount::protocol::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Bytes each ordinary user's refs may hold in the store, e.g. 20G (default: no limit).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    user_quota: Option<u64>,
    /// Exit after this long without requests and with nothing lent, e.g. 10m (default: with
    /// socket activation 10m, otherwise never).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    idle_exit: Option<std::time::Duration>,
    /// Connections at once per user.
    #[arg(long, default_value_t = 32)]
    max_per_user: usize,
    /// Bytes of page cache reading an image's access profile ahead may fill per run, e.g.
    /// 512M; 0 turns read-ahead off.
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes, default_value = "1G")]
    prefetch_bytes: u64,
    /// Record one run in this many over an image whose access profile is settled, so that the
    /// profile follows what the project's code reads now; 0: never.
    #[arg(long, value_name = "N", default_value_t = velo_mount::profile::DEFAULT_REFRESH_EVERY)]
    profile_refresh_every: u64,
    /// Log more (repeat for more still).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VELO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("velo-mountd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    velo_mount::privilege::require_root("velo-mountd")?;
    let listener = service::listen(&cli.socket)?;
    let store = Store::open_or_create(&cli.store)?;
    let idle_exit = cli.idle_exit.or(listener
        .activated()
        .then(|| std::time::Duration::from_secs(600)));
    let config = service::Config {
        user_quota: cli.user_quota,
        idle_exit,
        max_per_user: cli.max_per_user,
        prefetch_bytes: cli.prefetch_bytes,
        profile_refresh_every: cli.profile_refresh_every,
        ..Default::default()
    };
    service::serve(store, listener, config)?;
    Ok(())
}
