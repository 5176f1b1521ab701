//! Command-line arguments.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Velo Rift: dependency trees snapshotted into a content-addressed store and mounted in
/// milliseconds (composefs EROFS images over overlayfs).
#[derive(Debug, Parser)]
#[command(name = "velo", version, about, propagate_version = true)]
pub struct Cli {
    /// The store directory (default /var/lib/velo). An ordinary user who names no store works
    /// through velo-mountd, which owns the default one; one who names a store of their own
    /// works on it directly.
    #[arg(long, global = true, env = "VELO_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// velo-mountd's socket, for an ordinary user's commands (and root's runs, where the
    /// service serves the same store).
    #[arg(long, global = true, env = "VELO_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
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
        #[arg(long, conflicts_with = "profile")]
        dump: bool,
        /// Print the image's access profile: the files runs read first, in the order they are
        /// read ahead, with how many runs read each.
        #[arg(long)]
        profile: bool,
    },
    /// Check privileges, kernel features and the store, in plain words.
    Doctor,
    /// Detect the project's ecosystems and write velo.toml (its managed dirs, lockfiles and
    /// install commands).
    Init {
        /// The project (default: the current directory).
        #[arg(long, short = 'C')]
        project: Option<PathBuf>,
        /// Overwrite an existing velo.toml.
        #[arg(long)]
        force: bool,
    },
    /// Run a command with the project's dependency dirs mounted (root only): built once per
    /// lockfile, then mounted in milliseconds, in a private mount namespace with a
    /// copy-on-write layer; writes are dropped at exit unless --persist.
    Run {
        /// The project (default: the current directory).
        #[arg(long, short = 'C')]
        project: Option<PathBuf>,
        /// Run the install and the command as this user (NAME, UID or UID:GID); default: the
        /// sudo caller (SUDO_UID/SUDO_GID), else the current user.
        #[arg(long)]
        user: Option<String>,
        /// Keep the writes (caches, compiled files) in the store across runs.
        #[arg(long)]
        persist: bool,
        /// The command and its arguments.
        // No `allow_hyphen_values`: an option velo does not know (`--presist`) before the
        // command is an error with a suggestion, not the command; everything from the command
        // on (or after `--`) is the command's.
        #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
    },
    /// Show each managed dir: key, image, up to date or not, size, last use.
    Status {
        /// The project (default: the current directory).
        #[arg(long, short = 'C')]
        project: Option<PathBuf>,
    },
    /// Tenants: named copy-on-write layers over one image, kept in the store.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// velo-mountd, the root service that hands ordinary users their mounts: whether it runs,
    /// what it holds (root), stop it (root).
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Remove images no ref, tenant or live mount needs, then objects no image references.
    Gc {
        /// Report what would go, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also expire `deps/*` refs not used (mounted, run) for this long, e.g. 30d, 12h.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        unused_for: Option<std::time::Duration>,
        /// Keep at least this many previous images of each ref.
        #[arg(long, value_name = "N", default_value_t = 1)]
        keep_last: usize,
        /// Also keep previous images of refs replaced less than this long ago.
        #[arg(long, value_name = "DUR", default_value = "7d", value_parser = parse_duration)]
        older_than: std::time::Duration,
    },
    /// Refs: list, remove, history.
    Ref {
        #[command(subcommand)]
        command: RefCommand,
    },
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
    /// Push an image (by ref or digest) and its objects to an OCI registry, sending only the
    /// blobs it lacks.
    Push {
        /// Ref name or image digest.
        image: String,
        /// Where to: oci://HOST[:PORT]/REPO:TAG.
        destination: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Average pack size (bytes of objects per blob before compression, e.g. 4M).
        #[arg(long, value_name = "SIZE", value_parser = crate::commands::transfer::parse_size)]
        pack_size: Option<u64>,
    },
    /// Pull an image and the objects the store lacks from an OCI registry, checking every byte.
    Pull {
        /// Where from: oci://HOST[:PORT]/REPO:TAG or oci://HOST[:PORT]/REPO@sha256:…
        source: String,
        /// Point this ref at the image.
        #[arg(long = "ref", value_name = "NAME")]
        ref_name: Option<String>,
        /// Refuse any image but this one (its fs-verity digest, as `velo snapshot` printed it).
        #[arg(long, value_name = "DIGEST")]
        digest: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Write an image (by ref or digest) and all its objects to one file (`-`: stdout).
    Export {
        /// Ref name or image digest.
        image: String,
        /// The file to write.
        file: PathBuf,
    },
    /// Read a file written by `velo export` (`-`: stdin) into the store, checking every byte.
    Import {
        /// The file to read.
        file: PathBuf,
        /// Point this ref at the image (default: the ref recorded in the file).
        #[arg(long = "ref", value_name = "NAME", conflicts_with = "no_ref")]
        ref_name: Option<String>,
        /// Write no ref.
        #[arg(long)]
        no_ref: bool,
    },
}

/// Options of `velo push` and `velo pull`.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Talk plain HTTP to the registry (a local registry without TLS).
    #[arg(long, env = "VELO_PLAIN_HTTP", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub plain_http: bool,
    /// Blobs in flight at once.
    #[arg(long, short = 'j', default_value_t = 8)]
    pub jobs: usize,
}

/// `velo service …`
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Whether velo-mountd answers, for whom, which store; for root also the images it holds.
    Status,
    /// Stop velo-mountd (root only); returns once it has let everything go.
    Stop,
}

/// `velo tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant over an image (by ref or digest), optionally mounting it.
    Create {
        /// Tenant name (letters, digits, `._-`).
        name: String,
        /// The image it is built on.
        #[arg(long)]
        image: String,
        /// Mount it here right away.
        #[arg(long, value_name = "DIR")]
        mount: Option<PathBuf>,
        /// Limit its writes (e.g. 512M, 2G); enforced with project quotas where the store's
        /// filesystem has them, else reported as not enforced.
        #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
        size_limit: Option<u64>,
    },
    /// List tenants with their image, mount point and upper-dir size.
    Ls,
    /// Mount a tenant (root only); its writes persist in the store.
    Mount {
        /// Tenant name.
        name: String,
        /// Where to mount it.
        dir: PathBuf,
    },
    /// Unmount a tenant (root only).
    Umount {
        /// Tenant name.
        name: String,
    },
    /// Files the tenant added, changed or deleted relative to its image.
    Diff {
        /// Tenant name.
        name: String,
    },
    /// Drop all of a tenant's writes (it must not be mounted).
    Reset {
        /// Tenant name.
        name: String,
    },
    /// Remove a tenant and its writes (it must not be mounted).
    Rm {
        /// Tenant name.
        name: String,
    },
    /// Snapshot the tenant's merged view into a new image and ref (root only); unchanged
    /// files cost no new objects.
    Commit {
        /// Tenant name.
        name: String,
        /// The ref to point at the new image.
        #[arg(long = "ref", value_name = "NAME")]
        ref_name: String,
    },
}

/// `velo ref …`
#[derive(Debug, Subcommand)]
pub enum RefCommand {
    /// List refs with their images and last use.
    Ls,
    /// Remove a ref; `velo gc` then frees its image unless something else needs it.
    Rm {
        /// Ref name.
        name: String,
    },
    /// Publish a ref for every user (root only): users' `velo mount`/`velo run` may then use
    /// it read-only by its name. Refused for an image with set-id files or device nodes.
    Publish {
        /// Ref name (root's).
        name: String,
        /// The name users see (default: the same).
        #[arg(long = "as", value_name = "NAME")]
        public_name: Option<String>,
    },
    /// Images a ref pointed at before, newest first.
    History {
        /// Ref name.
        name: String,
    },
}

pub use velo_mount::units::{parse_bytes, parse_duration};

/// Parses `velo [GLOBALS] run [RUN OPTIONS] [--] CMD…` without building clap's command tree.
///
/// `velo run` is on the critical path of every command it wraps, and clap builds the parser
/// for every subcommand before it parses one: ~0.2 ms of a warm run here, a tenth of it. This
/// accepts only the plain spellings (each option on its own, `--opt VALUE` or `--opt=VALUE`, UTF-8)
/// and returns `None` for anything else — help, version, bundled short flags, unknown options,
/// other subcommands — which then goes to clap, so errors and help come from one place. A
/// test holds it to clap's result on every form it accepts.
pub fn parse_run_fast(argv: &[OsString]) -> Option<Cli> {
    let mut store: Option<PathBuf> = None;
    let mut socket: Option<PathBuf> = None;
    let (mut json, mut quiet, mut verbose) = (false, false, 0u8);
    let (mut project, mut user, mut persist) = (None, None, false);
    let mut args = argv.iter().skip(1);
    let mut in_run = false;
    let command: Vec<OsString> = loop {
        let arg = args.next()?.to_str()?;
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg, None),
        };
        let mut value = |inline: Option<&str>| -> Option<String> {
            match inline {
                Some(v) => Some(v.to_owned()),
                // clap takes no value that starts with '-' here: leave such a line to it.
                None => Some(args.next()?.to_str()?)
                    .filter(|v| !v.starts_with('-'))
                    .map(str::to_owned),
            }
        };
        let flag = inline.is_none();
        // clap refuses an option given twice (except -v): so does this, by declining.
        match name {
            "--store" if store.is_none() => store = Some(PathBuf::from(value(inline)?)),
            "--socket" if socket.is_none() => socket = Some(PathBuf::from(value(inline)?)),
            "--json" if flag && !json => json = true,
            "-q" | "--quiet" if flag && !quiet => quiet = true,
            "-v" | "--verbose" if flag => verbose = verbose.checked_add(1)?,
            "run" if !in_run => in_run = true,
            "--persist" if in_run && flag && !persist => persist = true,
            "--user" if in_run && user.is_none() => user = Some(value(inline)?),
            "-C" | "--project" if in_run && project.is_none() => {
                project = Some(PathBuf::from(value(inline)?))
            }
            "--" if in_run => break args.cloned().collect(),
            _ if in_run && !arg.starts_with('-') => {
                break std::iter::once(OsString::from(arg))
                    .chain(args.cloned())
                    .collect();
            }
            _ => return None,
        }
    };
    if command.is_empty() {
        return None;
    }
    let store = match store {
        Some(s) => Some(s),
        None => match std::env::var_os("VELO_STORE") {
            Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
            Some(_) => return None,
            None => None,
        },
    };
    Some(Cli {
        store,
        socket: match socket {
            Some(s) => Some(s),
            None => match std::env::var_os("VELO_SOCKET") {
                Some(v) if v.is_empty() => return None,
                v => v.map(PathBuf::from),
            },
        },
        json,
        quiet,
        verbose,
        command: Command::Run {
            project,
            user,
            persist,
            command,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<OsString> {
        std::iter::once("velo")
            .chain(s.iter().copied())
            .map(OsString::from)
            .collect()
    }

    /// Every form the fast path accepts parses exactly as clap parses it; the rest is left
    /// to clap.
    #[test]
    fn fast_run_parse_agrees_with_clap() {
        let accepted: &[&[&str]] = &[
            &["run", "true"],
            &["run", "--", "true"],
            &["run", "node", "-e", "require('x')", "--persist"],
            &["run", "--", "-weird", "--store", "x"],
            &[
                "--store",
                "/s",
                "-q",
                "run",
                "--persist",
                "--",
                "sh",
                "-c",
                "x",
            ],
            &[
                "--store=/s",
                "--json",
                "-v",
                "-v",
                "run",
                "--user",
                "1000:1000",
                "make",
            ],
            &["run", "-C", "/p", "--user=nobody", "python", "-c", "1"],
            &["-q", "run", "--store", "/t", "-v", "--json", "--", "--"],
            &["run", "--project=/p", "--", "run"],
        ];
        for a in accepted {
            let fast = parse_run_fast(&argv(a)).unwrap_or_else(|| panic!("{a:?} not taken"));
            let clap = Cli::try_parse_from(argv(a)).expect("clap parses it");
            assert_eq!(format!("{fast:?}"), format!("{clap:?}"), "{a:?}");
        }
        let refused: &[&[&str]] = &[
            &["run"],
            &["run", "--"],
            &["run", "--help"],
            &["--version"],
            &["-qv", "run", "true"],
            &["run", "--bogus", "true"],
            &["status"],
            &["run", "--persist=yes", "true"],
            &["run", "--user"],
            &["snapshot", "run"],
            &["run", "-Cx", "true"],
            &["run", "-C", "/p", "--project", "/q", "true"],
            &["-q", "run", "-q", "true"],
            &["--store", "/a", "run", "--store=/b", "true"],
            &["run", "--persist", "--persist", "true"],
            &["--store", "-q", "run", "true"],
        ];
        for a in refused {
            assert!(parse_run_fast(&argv(a)).is_none(), "{a:?} taken");
        }
    }

    /// An option `velo run` does not know, before the command, is an error that suggests the
    /// one meant — never the command itself; from the command on, hyphens are the command's.
    #[test]
    fn an_unknown_run_option_is_an_error_with_a_suggestion() {
        let err =
            Cli::try_parse_from(argv(&["run", "--presist", "--", "true"])).expect_err("refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        assert!(err.to_string().contains("--persist"), "{err}");
        let ok = Cli::try_parse_from(argv(&["run", "npm", "test", "--coverage"])).expect("ok");
        let Command::Run { command, .. } = ok.command else {
            panic!("not run")
        };
        assert_eq!(command, ["npm", "test", "--coverage"]);
        let ok = Cli::try_parse_from(argv(&["run", "--", "-weird"])).expect("ok");
        let Command::Run { command, .. } = ok.command else {
            panic!("not run")
        };
        assert_eq!(command, ["-weird"]);
    }
}
