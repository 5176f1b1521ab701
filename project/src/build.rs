//! Building a missing dependency tree as an ordinary user: the install runs as the user, with
//! their own environment, in their own user and mount namespace where an empty directory of
//! theirs is mounted over each managed dir's real path (so paths baked into the tree are
//! final); then each tree is snapshotted without a store and streamed to `velo-mountd`, which
//! checks every byte, maps the tree to the user and writes the ref in their namespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::ManagedDir;
use crate::client::Client;
use crate::userns;

/// One build: the install of a unit of velo.toml and the dirs it fills.
#[derive(Debug)]
pub struct UserBuild<'a> {
    /// The service's socket.
    pub socket: &'a Path,
    /// The project (the install's working directory).
    pub project: &'a Path,
    /// The install command (`sh -c`).
    pub install: &'a str,
    /// The dirs it fills (their refs are written).
    pub dirs: Vec<&'a ManagedDir>,
    /// Environment the unit sets for the install.
    pub env: &'a BTreeMap<String, String>,
}

/// Runs the build; on success every dir's ref exists for the user.
pub fn build_as_user(b: &UserBuild<'_>) -> anyhow::Result<()> {
    let key = b.dirs.first().map_or("build", |d| d.key.as_str());
    let work = crate::user_cache_dir()?
        .join("builds")
        .join(format!("{key}-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let staging: Vec<PathBuf> = (0..b.dirs.len())
        .map(|i| work.join(i.to_string()))
        .collect();
    let result = (|| {
        for (dir, stage) in b.dirs.iter().zip(&staging) {
            std::fs::create_dir(stage).with_context(|| format!("create {}", stage.display()))?;
            std::fs::create_dir_all(&dir.path)
                .with_context(|| format!("create {}", dir.path.display()))?;
        }
        let (status, _) = crate::run::in_child(|| build_child(b, &staging))?;
        if status != 0 {
            bail!(
                "building {} failed: `{}` exited with {}; no ref was written (its output is above)",
                names(&b.dirs),
                b.install,
                crate::run::describe_status(status)
            );
        }
        Ok(())
    })();
    remove_in_background(&work);
    result
}

/// Removes `dir` in a process of its own that velo does not wait for (removing a tree of tens
/// of thousands of files takes a while, and the command is waiting to start).
fn remove_in_background(dir: &Path) {
    use std::process::Stdio;
    let spawned = std::process::Command::new("rm")
        .arg("-rf")
        .arg("--")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if spawned.is_err() {
        // No rm (a minimal container): do it here.
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!("could not remove {}: {e}", dir.display());
        }
    }
}

fn names(dirs: &[&ManagedDir]) -> String {
    dirs.iter()
        .map(|d| d.dir.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The forked child: namespace, install, snapshots, import. Returns its exit status.
fn build_child(b: &UserBuild<'_>, staging: &[PathBuf]) -> i32 {
    match build_child_inner(b, staging) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("velo: error: {e:#}");
            1
        }
    }
}

fn build_child_inner(b: &UserBuild<'_>, staging: &[PathBuf]) -> anyhow::Result<i32> {
    userns::enter()?;
    for (dir, stage) in b.dirs.iter().zip(staging) {
        userns::bind(stage, &dir.path).with_context(|| {
            format!(
                "mount an empty dir over {} for the install",
                dir.path.display()
            )
        })?;
    }
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(b.install)
        .current_dir(b.project)
        .envs(b.env);
    // The install's output goes to stderr: stdout belongs to the command velo runs next.
    if let Ok(err) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        cmd.stdout(err);
    }
    let status = cmd
        .status()
        .with_context(|| format!("start the install `{}`", b.install))?;
    if !status.success() {
        eprintln!(
            "velo: the install `{}` failed ({status}); no image was made",
            b.install
        );
        return Ok(status.code().map_or(1, |c| c.clamp(1, 255)));
    }
    let mut client = Client::connect(b.socket)?;
    for (dir, stage) in b.dirs.iter().zip(staging) {
        let snap = velo_image::snapshot_unstored(
            stage,
            &velo_image::SnapshotOptions::default(),
            &velo_image::NoProgress,
        )
        .with_context(|| format!("snapshot {} after the install", dir.path.display()))?;
        let r = client
            .import(Some(&dir.ref_name), &snap, &|_| {})
            .with_context(|| format!("store {} through velo-mountd", dir.path.display()))?;
        tracing::info!(
            "{}: {} objects ({} sent, {} new bytes) -> {} {}",
            dir.path.display(),
            r.objects,
            r.objects_sent,
            r.new_bytes,
            dir.ref_name,
            r.image
        );
    }
    client.done();
    Ok(0)
}
