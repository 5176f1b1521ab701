//! The namespace side of `velo run`: entering a private mount namespace (copied mounts made
//! slaves first, so nothing leaks to the host), opening the store there and mounting each image
//! over its dir with a copy-on-write upper; and the build child, which mounts an empty dir (or,
//! for a seeded entry, the tree last built) over each dir, runs the install at the real path and
//! snapshots what it produced. Mounts vanish with the namespace.

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
}

/// A build: run this install over an empty dir at each target, then snapshot each into its
/// ref.
#[derive(Debug, Clone)]
pub struct Build {
    /// The ecosystem of the entry (how its install's output is passed on:
    /// [`crate::build::run_install`]).
    pub ecosystem: String,
    /// The install command (`sh -c`).
    pub install: String,
    /// Each dir the install fills.
    pub dirs: Vec<BuildDir>,
    /// Where the install writes, in a dir that starts empty: a tmpfs, or an empty dir on disk.
    pub place: crate::build::BuildIn,
    /// A Cargo.lock to prune each dir (a Cargo home) to after the install (see
    /// [`crate::seed`]).
    pub prune_to: Option<PathBuf>,
    /// The user's cargo config, linked into each dir (a Cargo home) before the install (see
    /// [`crate::cargo_config`]).
    pub cargo_config: Option<PathBuf>,
}

/// One dir a build fills.
#[derive(Debug, Clone)]
pub struct BuildDir {
    /// Its real path.
    pub target: PathBuf,
    /// The ref its snapshot is written to.
    pub ref_name: String,
    /// The image it starts from (a seeded entry: the tree last built for it, under a
    /// copy-on-write overlay); `None`: it starts empty.
    pub seed: Option<Digest>,
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

/// The build child's work (forked; single-threaded): in a private mount namespace, mounts an
/// empty dir over each dir (a tmpfs, or one on disk: [`crate::build::BuildIn`]), runs the
/// install there at the real path as the invoking user, and snapshots the result into each
/// dir's ref. Its result is the process's exit status; its mounts vanish with it.
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
    velo_mount::enter_private_namespace()?;
    let store = Store::open(&plan.store)?;
    // Disk builds write under the store's tmp/ (root's, on the store's filesystem); the dirs
    // go with this process.
    let mut on_disk = Vec::new();
    let pid = std::process::id();
    for dir in &build.dirs {
        let target = &dir.target;
        ensure_target(target, (plan.user.uid, plan.user.gid))?;
        let mounted = match (dir.seed, build.place) {
            (Some(image), _) => {
                let req = MountRequest {
                    image,
                    target: target.clone(),
                    writes: Writes::CowManaged,
                    create_target: false,
                    owner: Some(pid),
                    prefetch: false,
                };
                velo_mount::mount_image(&store, &req)
                    .map(drop)
                    .with_context(|| format!("mount the previous tree over {}", target.display()))
            }
            (None, crate::build::BuildIn::Memory(size)) => {
                crate::build::mount_empty(target, crate::build::Empty::Memory(size))
            }
            (None, crate::build::BuildIn::Disk) => {
                let empty = tempfile::Builder::new()
                    .prefix("build-")
                    .tempdir_in(store.area_path(velo_objects::Area::Tmp))
                    .context("create a build dir in the store")?;
                let mounted =
                    crate::build::mount_empty(target, crate::build::Empty::Dir(empty.path()));
                on_disk.push(empty);
                mounted
            }
        };
        mounted?;
        // The install writes into it as the invoking user.
        rustix::fs::chown(
            target,
            Some(rustix::fs::Uid::from_raw(plan.user.uid)),
            Some(rustix::fs::Gid::from_raw(plan.user.gid)),
        )
        .with_context(|| format!("chown {}", target.display()))?;
    }
    if let Some(config) = &build.cargo_config {
        for dir in &build.dirs {
            crate::cargo_config::link(&dir.target, config, (plan.user.uid, plan.user.gid))
                .with_context(|| {
                    format!("link {} into {}", config.display(), dir.target.display())
                })?;
        }
    }
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(&build.install).current_dir(&plan.project);
    cmd.envs(&plan.env);
    for k in &plan.env_remove {
        cmd.env_remove(k);
    }
    plan.user.apply(&mut cmd);
    let targets: Vec<&std::path::Path> = build.dirs.iter().map(|d| d.target.as_path()).collect();
    let status = crate::build::run_install(cmd, &build.ecosystem, &targets)
        .with_context(|| format!("start the install `{}`", build.install))?;
    if !status.success() {
        eprintln!(
            "velo: the install `{}` failed ({status}); no image was made",
            build.install
        );
        return Ok(crate::run::exit_code_of(status));
    }
    if let Some(lock) = &build.prune_to {
        for dir in &build.dirs {
            let n = crate::seed::prune_to_lockfile(&dir.target, lock)
                .with_context(|| format!("prune {} to {}", dir.target.display(), lock.display()))?;
            tracing::info!(
                "{}: {n} crates the lockfile no longer names pruned",
                dir.target.display()
            );
        }
    }
    for BuildDir {
        target, ref_name, ..
    } in &build.dirs
    {
        let opts = velo_image::SnapshotOptions {
            ref_name: Some(ref_name.clone()),
            ..Default::default()
        };
        let r = velo_image::snapshot(&store, target, &opts, &velo_image::NoProgress)
            .with_context(|| format!("snapshot {} after the install", target.display()))?;
        tracing::info!(
            "{}: {} files, {} new objects -> {ref_name}",
            target.display(),
            r.files,
            r.new_objects
        );
    }
    Ok(0)
}
