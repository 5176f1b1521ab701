//! The namespace side of `velo run`: entering a private mount namespace (copied mounts made
//! slaves first, so nothing leaks to the host), opening the store there and mounting each image
//! over its dir with a copy-on-write upper; and the build child, which does that with an empty
//! image, runs the install at the real path and snapshots what it produced. Mounts vanish with
//! the namespace.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use velo_mount::{MountRequest, Writes};
use velo_objects::{Digest, Store};

use super::user::User;

/// What the child does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The store.
    pub store: PathBuf,
    /// The project (the command's working directory).
    pub project: PathBuf,
    /// Run as.
    pub user: User,
    /// Mounts to make, in order.
    pub mounts: Vec<PlannedMount>,
    /// Environment to set for the command (or the install).
    pub env: BTreeMap<String, String>,
    /// Variables the install does not see (see [`crate::inputs::install_env_removals`]).
    pub env_remove: Vec<String>,
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

/// A build: run this install, then snapshot each mount's view into its ref.
#[derive(Debug, Clone)]
pub struct Build {
    /// The install command (`sh -c`).
    pub install: String,
    /// A Cargo.lock to prune each dir (a Cargo home) to after the install (see
    /// [`crate::seed`]).
    pub prune_to: Option<PathBuf>,
}

/// Creates a missing mount target as the invoking user's (so the project is not left with
/// root-owned empty dirs).
pub fn ensure_target(target: &std::path::Path, owner: (u32, u32)) -> anyhow::Result<()> {
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

/// Enters a private mount namespace (copied mounts made slaves first, so nothing leaks to the
/// host) and mounts every mount of `plan` in it, owned by this process. The caller must be
/// single-threaded: `unshare(CLONE_NEWNS)` moves only the calling thread. The store is opened
/// inside, as overlayfs takes layers only from the caller's own namespace.
pub fn enter_and_mount(plan: &Plan) -> anyhow::Result<Store> {
    velo_mount::enter_private_namespace()?;
    let store = Store::open(&plan.store)?;
    let pid = std::process::id();
    for m in &plan.mounts {
        ensure_target(&m.target, (plan.user.uid, plan.user.gid))?;
        let req = MountRequest {
            image: m.image,
            target: m.target.clone(),
            writes: match &m.tenant {
                Some(t) => Writes::Tenant(t.clone()),
                None => Writes::CowManaged,
            },
            create_target: false,
            owner: Some(pid),
            prefetch: false,
        };
        if let Err(e) = velo_mount::mount_image(&store, &req) {
            release(&store, plan);
            return Err(e.into());
        }
    }
    Ok(store)
}

/// Unmounts this process's mounts of `plan` (in its private namespace) and removes their
/// slots and discarded upper dirs from the store.
pub fn release(store: &Store, plan: &Plan) {
    for m in plan.mounts.iter().rev() {
        let _ = rustix::mount::unmount(
            &m.target,
            rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW,
        );
    }
    remove_slots_of(store, std::process::id());
}

/// Removes the mount slots (and discarded upper dirs) whose pins `pid` owns.
pub fn remove_slots_of(store: &Store, pid: u32) {
    let Ok(records) = store.list_mount_records() else {
        return;
    };
    for (token, record) in records {
        if let Ok(r) = record
            && r.owner.is_some_and(|(p, _)| p == pid)
            && let Err(e) = store.remove_mount_slot(&token)
        {
            tracing::warn!("could not remove {token}: {e}");
        }
    }
}

/// The build child's work (forked; single-threaded): mounts an empty image over each dir,
/// runs the install there at the real path as the invoking user, and snapshots the result
/// into each dir's ref. Its result is the process's exit status; its mounts vanish with it.
pub fn build(plan: &Plan, build: &Build) -> i32 {
    match build_inner(plan, build) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("velo: error: {e:#}");
            1
        }
    }
}

fn build_inner(plan: &Plan, build: &Build) -> anyhow::Result<i32> {
    let store = enter_and_mount(plan)?;
    for m in &plan.mounts {
        // The install writes into the (empty) mount as the invoking user.
        rustix::fs::chown(
            &m.target,
            Some(rustix::fs::Uid::from_raw(plan.user.uid)),
            Some(rustix::fs::Gid::from_raw(plan.user.gid)),
        )
        .with_context(|| format!("chown {}", m.target.display()))?;
    }
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(&build.install).current_dir(&plan.project);
    cmd.envs(&plan.env);
    for k in &plan.env_remove {
        cmd.env_remove(k);
    }
    // The install's output goes to stderr: stdout belongs to the command velo runs next.
    if let Ok(err) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        cmd.stdout(err);
    }
    plan.user.apply(&mut cmd);
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
    if let Some(lock) = &build.prune_to {
        for m in &plan.mounts {
            let n = crate::seed::prune_to_lockfile(&m.target, lock)
                .with_context(|| format!("prune {} to {}", m.target.display(), lock.display()))?;
            tracing::info!(
                "{}: {n} crates the lockfile no longer names pruned",
                m.target.display()
            );
        }
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
            .with_context(|| format!("snapshot {} after the install", m.target.display()))?;
        tracing::info!(
            "{}: {} files, {} new objects -> {ref_name}",
            m.target.display(),
            r.files,
            r.new_objects
        );
    }
    Ok(0)
}
