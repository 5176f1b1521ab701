//! The single-threaded child of `velo run` (forked, not re-executed: a process start is a
//! large part of a warm run): it enters a private mount namespace (copied mounts made slaves
//! first, so nothing leaks to the host), opens the store there, mounts each image over its dir
//! with a copy-on-write upper, then either execs the user's command as the invoking user, or —
//! to build a missing image — runs the install at the real path and snapshots what it produced.
//! Its mounts vanish with it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::Context;
use velo_mount::{MountRequest, Writes};
use velo_objects::{Digest, Store};

/// What the child does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The store.
    pub store: PathBuf,
    /// The project (the command's working directory).
    pub project: PathBuf,
    /// Run as (uid, gid).
    pub user: (u32, u32),
    /// Mounts to make, in order.
    pub mounts: Vec<PlannedMount>,
    /// Environment to set.
    pub env: BTreeMap<String, String>,
    /// Build: run this install, then snapshot each mount's view into its ref. Absent: exec the
    /// command given on the child's command line.
    pub build: Option<Build>,
}

/// One mount of the plan.
#[derive(Debug, Clone)]
pub struct PlannedMount {
    /// The image.
    pub image: Digest,
    /// Where.
    pub target: PathBuf,
    /// A tenant whose upper persists (`--persist`); otherwise a fresh upper, dropped at exit.
    pub tenant: Option<String>,
    /// The ref to snapshot the view into (builds only).
    pub snapshot_ref: Option<String>,
}

/// A build.
#[derive(Debug, Clone)]
pub struct Build {
    /// The install command (`sh -c`).
    pub install: String,
}

fn user(plan: &Plan) -> super::user::User {
    super::user::User {
        uid: plan.user.0,
        gid: plan.user.1,
        home: PathBuf::new(),
    }
}

/// Creates a missing mount target as the invoking user's (so the project is not left with
/// root-owned empty dirs).
fn ensure_target(target: &std::path::Path, owner: (u32, u32)) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(target).is_ok() {
        return Ok(());
    }
    std::fs::create_dir_all(target).with_context(|| format!("create {}", target.display()))?;
    rustix::fs::chown(
        target,
        Some(rustix::fs::Uid::from_raw(owner.0)),
        Some(rustix::fs::Gid::from_raw(owner.1)),
    )
    .with_context(|| format!("chown {}", target.display()))?;
    Ok(())
}

/// The child's work, in the forked process; never returns on a successful exec. Its result is
/// the process's exit status.
pub fn run(plan: &Plan, argv: &[OsString]) -> i32 {
    match run_inner(plan, argv) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("velo: error: {e:#}");
            1
        }
    }
}

fn run_inner(plan: &Plan, argv: &[OsString]) -> anyhow::Result<i32> {
    // This process is single-threaded here: the namespace is entered before any thread starts
    // and before the store is opened (overlayfs takes layers only from the caller's own
    // namespace).
    velo_mount::enter_private_namespace()?;
    let store = Store::open(&plan.store)?;
    let pid = std::process::id();
    for m in &plan.mounts {
        ensure_target(&m.target, plan.user)?;
        let req = MountRequest {
            image: m.image,
            target: m.target.clone(),
            writes: match &m.tenant {
                Some(t) => Writes::Tenant(t.clone()),
                None => Writes::CowManaged,
            },
            create_target: false,
            owner: Some(pid),
        };
        velo_mount::mount_image(&store, &req)?;
        if plan.build.is_some() {
            // The install writes into the (empty) mount as the invoking user.
            rustix::fs::chown(
                &m.target,
                Some(rustix::fs::Uid::from_raw(plan.user.0)),
                Some(rustix::fs::Gid::from_raw(plan.user.1)),
            )
            .with_context(|| format!("chown {}", m.target.display()))?;
        }
    }
    let user = user(plan);
    match &plan.build {
        None => {
            let Some((program, args)) = argv.split_first() else {
                anyhow::bail!("no command to run");
            };
            let mut cmd = std::process::Command::new(program);
            cmd.args(args)
                .current_dir(std::env::current_dir().unwrap_or_else(|_| plan.project.clone()));
            cmd.envs(&plan.env);
            user.apply(&mut cmd);
            let err = cmd.exec();
            eprintln!("velo: cannot run {}: {err}", program.to_string_lossy());
            Ok(if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            })
        }
        Some(build) => {
            let mut cmd = std::process::Command::new("sh");
            cmd.arg("-c").arg(&build.install).current_dir(&plan.project);
            cmd.envs(&plan.env);
            // The install's output goes to stderr: stdout belongs to the command velo runs next.
            if let Ok(err) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
                cmd.stdout(err);
            }
            user.apply(&mut cmd);
            let status = cmd
                .status()
                .with_context(|| format!("start the install `{}`", build.install))?;
            if !status.success() {
                eprintln!(
                    "velo: the install `{}` failed ({status}); no image was made",
                    build.install
                );
                return Ok(status.code().map_or(1, |c| c.clamp(1, 255)));
            }
            for m in &plan.mounts {
                let Some(ref_name) = &m.snapshot_ref else {
                    continue;
                };
                let opts = velo_image::SnapshotOptions {
                    ref_name: Some(ref_name.clone()),
                    ..Default::default()
                };
                let r = velo_image::snapshot(&store, &m.target, &opts, &velo_image::NoProgress)
                    .with_context(|| {
                        format!("snapshot {} after the install", m.target.display())
                    })?;
                tracing::info!(
                    "{}: {} files, {} new objects -> {ref_name}",
                    m.target.display(),
                    r.files,
                    r.new_objects
                );
            }
            Ok(0)
        }
    }
}
