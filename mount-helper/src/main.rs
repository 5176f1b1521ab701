//! `velo-mount`: the small privileged binary. It mounts and unmounts images of a velo store
//! and nothing else; `velo` does the same through the same library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use velo_mount::{MountRequest, Writes};
use velo_objects::Store;

#[derive(Parser)]
#[command(
    name = "velo-mount",
    version,
    about = "Mount images of a velo store (root only)"
)]
struct Cli {
    /// The store.
    #[arg(long, global = true, env = "VELO_STORE", default_value = velo_objects::DEFAULT_STORE)]
    store: PathBuf,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount an image (by ref or digest) at TARGET.
    Mount {
        /// Ref name or image digest.
        image: String,
        /// Where to mount it.
        target: PathBuf,
        /// Copy-on-write into a velo-managed upper dir removed at umount.
        #[arg(long, conflicts_with = "upper")]
        cow: bool,
        /// Copy-on-write into DIR, which persists.
        #[arg(long, value_name = "DIR")]
        upper: Option<PathBuf>,
        /// Fail if TARGET does not exist instead of creating it.
        #[arg(long)]
        no_mkdir: bool,
    },
    /// Unmount a velo mount.
    Umount {
        /// The mount point.
        target: PathBuf,
        /// Detach a busy mount (it goes when its last user does).
        #[arg(long)]
        lazy: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<String> {
    velo_mount::privilege::require_root("velo-mount")?;
    let store = Store::open(&cli.store)?;
    Ok(match cli.command {
        Command::Mount {
            image,
            target,
            cow,
            upper,
            no_mkdir,
        } => {
            let writes = match (cow, upper) {
                (_, Some(dir)) => Writes::CowUpper(dir),
                (true, None) => Writes::CowManaged,
                (false, None) => Writes::ReadOnly,
            };
            let req = MountRequest {
                image: store.resolve(&image)?,
                target,
                writes,
                create_target: !no_mkdir,
                owner: None,
                prefetch: true,
            };
            let r = velo_mount::mount_image(&store, &req)?;
            if cli.json {
                serde_json::to_string(&r)?
            } else {
                format!(
                    "mounted {} at {} (verity {})",
                    r.image,
                    r.target.display(),
                    r.verity
                )
            }
        }
        Command::Umount { target, lazy } => {
            let r = velo_mount::umount(&store, &target, lazy)?;
            if cli.json {
                serde_json::to_string(&r)?
            } else {
                format!("unmounted {}", r.target.display())
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if json {
                println!("{}", serde_json::json!({ "error": msg }));
            }
            eprintln!("velo-mount: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
