//! Command-line arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Velo Rift: dependency trees snapshotted into a content-addressed store and mounted in
/// milliseconds (composefs EROFS images over overlayfs).
#[derive(Debug, Parser)]
#[command(name = "velo", version, about, propagate_version = true)]
pub struct Cli {
    /// The store directory.
    #[arg(long, global = true, env = "VELO_STORE", default_value = velo_objects::DEFAULT_STORE)]
    pub store: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more (repeat for more still).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Snapshot a directory tree into the store; prints the image digest and stats.
    Snapshot {
        /// The tree, e.g. ./node_modules.
        dir: PathBuf,
        /// Point this ref at the image (e.g. myapp/deps).
        #[arg(long = "ref", value_name = "NAME")]
        ref_name: Option<String>,
        /// Clamp mtimes to $SOURCE_DATE_EPOCH (0 if unset) for identical images across machines.
        #[arg(long)]
        reproducible: bool,
        /// Worker threads for hashing and storing (default: 2 × CPUs).
        #[arg(long, short = 'j')]
        jobs: Option<usize>,
    },
    /// Mount an image (by ref or digest) at TARGET (root only). Read-only unless --cow/--upper.
    Mount {
        /// Ref name or image digest.
        image: String,
        /// Where to mount it; created if missing unless --no-mkdir.
        target: PathBuf,
        /// Writable: writes go to a fresh upper dir that velo removes at umount.
        #[arg(long, conflicts_with = "upper")]
        cow: bool,
        /// Writable: writes go to DIR and persist there.
        #[arg(long, value_name = "DIR")]
        upper: Option<PathBuf>,
        /// Fail if TARGET does not exist instead of creating it.
        #[arg(long)]
        no_mkdir: bool,
        /// First re-hash in userspace the image and every object it needs (for stores without
        /// fs-verity); refuse to mount if any is bad.
        #[arg(long)]
        verify: bool,
    },
    /// Unmount a velo mount (root only).
    Umount {
        /// The mount point.
        target: PathBuf,
        /// Detach a busy mount; it goes away when its last user does.
        #[arg(long)]
        lazy: bool,
    },
    /// List refs, images and live mounts.
    Ls,
    /// Show what an image holds.
    Inspect {
        /// Ref name or image digest.
        image: String,
        /// Print every entry (composefs dumpfile format).
        #[arg(long)]
        dump: bool,
    },
    /// Check privileges, kernel features and the store, in plain words.
    Doctor,
    /// Check the whole store: objects and images against their names, references, refs.
    /// Exit 0 when there is no damage (leftovers of interrupted work are reclaimable, not damage).
    Fsck {
        /// Move damaged objects/images to quarantine/ and remove leftovers (when no writer runs).
        #[arg(long)]
        repair: bool,
        /// Hashing threads (default: one per CPU).
        #[arg(long, short = 'j')]
        jobs: Option<usize>,
    },
}
