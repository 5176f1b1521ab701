//! One module per command family; each parses nothing and prints its result.

mod doctor;
mod fsck;
mod gc;
mod ls;
mod mount;
mod project;
mod service;
mod snapshot;
mod tenant;
pub mod transfer;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

/// Runs the command the user asked for.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut ctx = Ctx {
        store_named: cli.store.is_some(),
        store: cli
            .store
            .unwrap_or_else(|| std::path::PathBuf::from(velo_objects::DEFAULT_STORE)),
        socket: cli.socket,
        json: cli.json,
        quiet: cli.quiet,
    };
    // `-C DIR` works as git's and make's: velo starts in DIR (the project is found upward from
    // there, and `run`'s command runs there). Paths given on the command line keep meaning
    // what they meant where velo was started.
    if let Command::Init {
        project: Some(dir), ..
    }
    | Command::Run {
        project: Some(dir), ..
    }
    | Command::Status { project: Some(dir) } = &cli.command
    {
        ctx.store = std::path::absolute(&ctx.store)?;
        ctx.socket = ctx.socket.map(std::path::absolute).transpose()?;
        std::env::set_current_dir(dir).map_err(|e| anyhow::anyhow!("-C {}: {e}", dir.display()))?;
    }
    match cli.command {
        Command::Snapshot {
            dir,
            ref_name,
            reproducible,
            jobs,
        } => snapshot::snapshot(&ctx, &dir, ref_name, reproducible, jobs),
        Command::Mount {
            image,
            target,
            cow,
            upper,
            no_mkdir,
            verify,
        } => mount::mount(&ctx, &image, &target, cow, upper, no_mkdir, verify),
        Command::Umount { target, lazy } => mount::umount(&ctx, &target, lazy),
        Command::Ls => ls::ls(&ctx),
        Command::Inspect {
            image,
            dump,
            profile,
        } => {
            if profile {
                ls::inspect_profile(&ctx, &image)
            } else {
                ls::inspect(&ctx, &image, dump)
            }
        }
        Command::Doctor => doctor::doctor(&ctx),
        Command::Fsck { repair, jobs } => fsck::fsck(&ctx, repair, jobs),
        Command::Tenant { command } => tenant::tenant(&ctx, command),
        Command::Service { command } => service::service(&ctx, command),
        // (-C was entered above.)
        Command::Init { force, .. } => project::init(&ctx, force),
        Command::Run {
            user,
            persist,
            command,
            ..
        } => project::run(&ctx, user, persist, command),
        Command::Status { .. } => project::status(&ctx),
        Command::Gc {
            dry_run,
            unused_for,
            keep_last,
            older_than,
        } => gc::gc(
            &ctx,
            velo_objects::GcOptions {
                dry_run,
                unused_for,
                keep_last,
                older_than,
            },
        ),
        Command::Ref { command } => gc::refs(&ctx, command),
        Command::Push {
            image,
            destination,
            registry,
            pack_size,
        } => transfer::push(&ctx, &image, &destination, &registry, pack_size),
        Command::Pull {
            source,
            ref_name,
            digest,
            registry,
        } => transfer::pull(&ctx, &source, ref_name, digest, &registry),
        Command::Export { image, file } => transfer::export(&ctx, &image, &file),
        Command::Import {
            file,
            ref_name,
            no_ref,
        } => transfer::import(&ctx, &file, ref_name, no_ref),
    }
}

/// What every command gets.
pub struct Ctx {
    /// The store path.
    pub store: std::path::PathBuf,
    /// True if the user named the store (`--store`, `VELO_STORE`).
    pub store_named: bool,
    /// `--socket`: velo-mountd's socket, if given.
    pub socket: Option<std::path::PathBuf>,
    /// JSON output.
    pub json: bool,
    /// Only errors.
    pub quiet: bool,
}

impl Ctx {
    /// True when velo works through velo-mountd (an ordinary user who named no store of their
    /// own) rather than on the store itself.
    pub fn through_service(&self) -> bool {
        !self.store_named && !rustix::process::geteuid().is_root()
    }

    /// A connection to velo-mountd.
    pub fn client(&self) -> anyhow::Result<velo_project::client::Client> {
        let socket = velo_project::client::socket_path(self.socket.as_deref());
        Ok(velo_project::client::Client::connect(&socket)?)
    }

    /// Prints a human line unless quiet or JSON.
    pub fn say(&self, line: impl AsRef<str>) {
        if !self.quiet && !self.json {
            outln!("{}", line.as_ref());
        }
    }
}
