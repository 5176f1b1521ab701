//! Building a missing dependency tree as an ordinary user: the install runs as the user, with
//! their own environment, in their own user and mount namespace where an empty directory is
//! mounted over each managed dir's real path (so paths baked into the tree are final); then
//! each tree is snapshotted without a store and streamed to `velo-mountd`, which checks every
//! byte, maps the tree to the user and writes the ref in their namespace.
//!
//! The empty directory is a tmpfs when there is memory for it ([`BuildIn`]): the install's
//! output is read once more and then thrown away, so writing it to a disk (and flushing it
//! there, as the store's `syncfs` would, and removing it after) is work for nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

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
    /// Variables the install does not see (see [`crate::inputs::install_env_removals`]).
    pub env_remove: &'a [String],
    /// For each dir, the ref of a tree the install starts from (see [`crate::seed`]); `None`:
    /// an empty dir.
    pub seeds: Vec<Option<String>>,
    /// A Cargo.lock to prune each dir (a Cargo home) to after the install.
    pub prune_to: Option<PathBuf>,
    /// The user's cargo config, linked into each dir (a Cargo home) before the install (see
    /// [`crate::cargo_config`]).
    pub cargo_config: Option<PathBuf>,
}

/// Where an install writes the trees it builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildIn {
    /// A new tmpfs of at most this many bytes over each dir, in the build's own namespace
    /// (gone with it).
    Memory(u64),
    /// An empty dir in the user's cache dir over each dir, removed after the build.
    Disk,
}

/// The variable that chooses [`BuildIn`]: `memory` or `disk`.
pub const BUILD_IN_VAR: &str = "VELO_BUILD_IN";

impl BuildIn {
    /// The choice `value` of [`BUILD_IN_VAR`] makes, given the memory `budget` a build may
    /// use (see [`crate::memory::build_budget`]). Unset: in memory if the budget is at least
    /// [`crate::memory::MIN_BUDGET`], else on disk.
    pub fn parse(value: Option<&str>, budget: Option<u64>) -> Result<Self, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(match budget {
                Some(b) if b >= crate::memory::MIN_BUDGET => Self::Memory(b),
                _ => Self::Disk,
            }),
            Some("memory") => Ok(Self::Memory(budget.unwrap_or(crate::memory::MIN_BUDGET))),
            Some("disk") => Ok(Self::Disk),
            Some(other) => Err(format!(
                "{BUILD_IN_VAR}={other:?} is not a place to build in: use `memory` (a tmpfs, \
                 the default when there is room) or `disk`"
            )),
        }
    }

    /// The choice for this process's environment and memory.
    pub fn choose() -> anyhow::Result<Self> {
        let value = std::env::var(BUILD_IN_VAR).ok();
        Self::parse(value.as_deref(), crate::memory::build_budget()).map_err(anyhow::Error::msg)
    }
}

/// Runs the build; on success every dir's ref exists for the user.
pub fn build_as_user(b: &UserBuild<'_>) -> anyhow::Result<()> {
    let place = BuildIn::choose()?;
    tracing::debug!("building in {place:?}");
    for dir in &b.dirs {
        std::fs::create_dir_all(&dir.path)
            .with_context(|| format!("create {}", dir.path.display()))?;
    }
    if let BuildIn::Memory(size) = place {
        let (status, _) = crate::run::in_child(|| build_child(b, &Place::Memory(size)))?;
        return check_status(b, status);
    }
    let key = b.dirs.first().map_or("build", |d| d.key.as_str());
    let work = crate::user_cache_dir()?
        .join("builds")
        .join(format!("{key}-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let staging: Vec<PathBuf> = (0..b.dirs.len())
        .map(|i| work.join(i.to_string()))
        .collect();
    let result = (|| {
        for stage in &staging {
            std::fs::create_dir(stage).with_context(|| format!("create {}", stage.display()))?;
        }
        let (status, _) = crate::run::in_child(|| build_child(b, &Place::Disk(&staging)))?;
        check_status(b, status)
    })();
    remove_in_background(&work);
    result
}

/// Where the forked child builds: [`BuildIn`] with the staging dirs made for a disk build.
enum Place<'a> {
    Memory(u64),
    Disk(&'a [PathBuf]),
}

fn check_status(b: &UserBuild<'_>, status: i32) -> anyhow::Result<()> {
    if status != 0 {
        return Err(crate::run::build_failed(&names(&b.dirs), b.install, status));
    }
    Ok(())
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

/// The empty dir an install writes into.
pub(crate) enum Empty<'a> {
    /// A new tmpfs of at most this many bytes.
    Memory(u64),
    /// This (empty) dir, bind-mounted.
    Dir(&'a Path),
}

/// Mounts `empty` over `target` (in the caller's own mount namespace) for an install; a tmpfs
/// gets `target`'s permission bits.
pub(crate) fn mount_empty(target: &Path, empty: Empty<'_>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mounted = match empty {
        Empty::Memory(size) => {
            let mode = std::fs::metadata(target)
                .with_context(|| format!("stat {}", target.display()))?
                .permissions()
                .mode();
            userns::tmpfs(target, size, mode)
        }
        Empty::Dir(dir) => userns::bind(dir, target),
    };
    mounted.with_context(|| {
        format!(
            "mount an empty dir over {} for the install",
            target.display()
        )
    })
}

/// Runs an install (`cmd`, not yet started) with its output on velo's stderr (stdout belongs
/// to the command velo runs next), and waits for it.
///
/// Poetry's is passed on line by line with one difference: velo made each of `dirs` an empty
/// dir for the install, which poetry calls "broken" before it creates the venv there ("The
/// virtual environment found in DIR seems to be broken." / "Recreating virtualenv NAME in
/// DIR"); a plain install into a fresh checkout, where the dir does not exist, says "Creating
/// virtualenv NAME in DIR" — so that is what the build says. (Poetry checks the dir before it
/// creates anything, and the install must write at the real path, where velo's empty mount
/// is.)
pub(crate) fn run_install(
    mut cmd: std::process::Command,
    ecosystem: &str,
    dirs: &[&Path],
) -> std::io::Result<std::process::ExitStatus> {
    use std::io::{BufRead, Write};
    let err = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned();
    if ecosystem != "poetry" {
        if let Ok(err) = err {
            cmd.stdout(err);
        }
        return cmd.status();
    }
    let (reader, writer) = std::io::pipe()?;
    cmd.stdout(writer.try_clone()?).stderr(writer);
    let mut child = cmd.spawn()?;
    drop(cmd); // its copies of the pipe's write end: the read below ends when the install's do
    let mut out = std::io::stderr().lock();
    for line in std::io::BufReader::new(reader).split(b'\n') {
        let Ok(line) = line else { break };
        if let Some(line) = poetry_line(line, dirs) {
            let _ = out.write_all(&line).and_then(|()| out.write_all(b"\n"));
        }
    }
    drop(out);
    child.wait()
}

/// A line of poetry's output as a plain install would have printed it (see [`run_install`]);
/// `None`: not printed.
fn poetry_line(line: Vec<u8>, dirs: &[&Path]) -> Option<Vec<u8>> {
    // Colours, where poetry was told to use them, do not hide the words.
    let mut plain = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if line[i] == 0x1b && line.get(i + 1) == Some(&b'[') {
            i += 2;
            while i < line.len() && !line[i].is_ascii_alphabetic() {
                i += 1;
            }
            i += 1;
            continue;
        }
        plain.push(line[i]);
        i += 1;
    }
    let plain = String::from_utf8_lossy(&plain);
    let plain = plain.trim_end_matches('\r');
    for dir in dirs {
        let dir = dir.display();
        if plain == format!("The virtual environment found in {dir} seems to be broken.") {
            return None;
        }
        if plain.starts_with("Recreating virtualenv ") && plain.ends_with(&format!(" in {dir}")) {
            let at = line.windows(10).position(|w| w == b"Recreating")?;
            let mut fixed = line[..at].to_vec();
            fixed.extend_from_slice(b"Creating");
            fixed.extend_from_slice(&line[at + 10..]);
            return Some(fixed);
        }
    }
    Some(line)
}

/// True if the filesystem at `path` has (almost) no blocks or inodes left.
fn nearly_full(path: &Path) -> bool {
    rustix::fs::statvfs(path).is_ok_and(|s| {
        s.f_bavail.saturating_mul(100) < s.f_blocks || s.f_favail.saturating_mul(100) < s.f_files
    })
}

fn names(dirs: &[&ManagedDir]) -> String {
    dirs.iter()
        .map(|d| d.dir.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The forked child: namespace, install, snapshots, import. Returns its exit status.
fn build_child(b: &UserBuild<'_>, place: &Place<'_>) -> i32 {
    match build_child_inner(b, place) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("velo: error: {e:#}");
            1
        }
    }
}

fn build_child_inner(b: &UserBuild<'_>, place: &Place<'_>) -> anyhow::Result<i32> {
    // A seeded dir starts as a writable overlay of its previous tree, lent by velo-mountd for
    // as long as this connection lasts (past the snapshot).
    let mut lender = None;
    let mut seeded = Vec::with_capacity(b.dirs.len());
    for (i, dir) in b.dirs.iter().enumerate() {
        let Some(r) = b.seeds.get(i).and_then(Option::as_ref) else {
            seeded.push(None);
            continue;
        };
        if lender.is_none() {
            lender = Some(Client::connect(b.socket)?);
        }
        let client = lender
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no connection"))?;
        match client.mount(r, velo_mount::protocol::Writes::Discard) {
            Ok(m) => seeded.push(Some(m)),
            Err(e) => {
                tracing::info!("{}: starting empty ({r}: {e})", dir.path.display());
                seeded.push(None);
            }
        }
    }
    userns::enter()?;
    // What each tree is snapshotted from, seen from inside this namespace.
    let mut roots: Vec<&Path> = Vec::new();
    for (i, dir) in b.dirs.iter().enumerate() {
        if let Some(m) = seeded.get_mut(i).and_then(Option::take) {
            userns::attach(std::os::fd::AsFd::as_fd(&m.fd), &dir.path)
                .with_context(|| format!("attach the previous tree at {}", dir.path.display()))?;
            roots.push(&dir.path);
            continue;
        }
        let empty = match place {
            Place::Memory(size) => {
                roots.push(&dir.path);
                Empty::Memory(*size)
            }
            Place::Disk(staging) => {
                roots.push(&staging[i]);
                Empty::Dir(&staging[i])
            }
        };
        mount_empty(&dir.path, empty)?;
    }
    if let Some(config) = &b.cargo_config {
        let me = (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        for root in &roots {
            crate::cargo_config::link(root, config, me)
                .with_context(|| format!("link {} into {}", config.display(), root.display()))?;
        }
    }
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(b.install)
        .current_dir(b.project)
        .envs(b.env);
    for k in b.env_remove {
        cmd.env_remove(k);
    }
    let ecosystem = b.dirs.first().map_or("", |d| d.ecosystem.as_str());
    let targets: Vec<&Path> = b.dirs.iter().map(|d| d.path.as_path()).collect();
    let status = run_install(cmd, ecosystem, &targets)
        .with_context(|| format!("start the install `{}`", b.install))?;
    if !status.success() {
        eprintln!(
            "velo: the install `{}` failed ({status}); no image was made",
            b.install
        );
        if let Place::Memory(size) = place {
            for dir in b.dirs.iter().filter(|d| nearly_full(&d.path)) {
                eprintln!(
                    "velo: {} was built in memory (a tmpfs of at most {} MiB), which is full: \
                     {BUILD_IN_VAR}=disk builds on disk",
                    dir.path.display(),
                    size >> 20
                );
            }
        }
        return Ok(crate::run::exit_code_of(status));
    }
    if let Some(lock) = &b.prune_to {
        for root in &roots {
            let n = crate::seed::prune_to_lockfile(root, lock)
                .with_context(|| format!("prune {} to {}", root.display(), lock.display()))?;
            tracing::info!(
                "{}: {n} crates the lockfile no longer names pruned",
                root.display()
            );
        }
    }
    let mut client = Client::connect(b.socket)?;
    for (dir, root) in b.dirs.iter().zip(roots) {
        let snap = velo_image::snapshot_unstored(
            root,
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
    if let Some(lender) = lender {
        lender.done();
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MIN_BUDGET;

    #[test]
    fn poetry_says_what_it_says_on_a_fresh_checkout() {
        let dir = Path::new("/p/.venv");
        let line = |s: &str| poetry_line(s.as_bytes().to_vec(), &[dir]);
        assert_eq!(
            line("The virtual environment found in /p/.venv seems to be broken."),
            None
        );
        assert_eq!(
            line("Recreating virtualenv app in /p/.venv"),
            Some(b"Creating virtualenv app in /p/.venv".to_vec())
        );
        assert_eq!(
            line("\x1b[39mRecreating virtualenv \x1b[36mapp\x1b[39m in /p/.venv\x1b[0m"),
            Some(b"\x1b[39mCreating virtualenv \x1b[36mapp\x1b[39m in /p/.venv\x1b[0m".to_vec())
        );
        for other in [
            "The virtual environment found in /q/.venv seems to be broken.",
            "Recreating virtualenv app in /p/.venv2",
            "  - Installing vrgreet (1.2.3)",
        ] {
            assert_eq!(line(other), Some(other.as_bytes().to_vec()), "{other}");
        }
    }

    #[test]
    fn a_build_goes_to_memory_when_there_is_room_and_as_told() {
        assert_eq!(
            BuildIn::parse(None, Some(4 * MIN_BUDGET)),
            Ok(BuildIn::Memory(4 * MIN_BUDGET))
        );
        assert_eq!(
            BuildIn::parse(None, Some(MIN_BUDGET - 1)),
            Ok(BuildIn::Disk)
        );
        assert_eq!(BuildIn::parse(Some(""), None), Ok(BuildIn::Disk));
        assert_eq!(
            BuildIn::parse(Some("disk"), Some(4 * MIN_BUDGET)),
            Ok(BuildIn::Disk)
        );
        assert_eq!(
            BuildIn::parse(Some("memory"), Some(10)),
            Ok(BuildIn::Memory(10))
        );
        let err = BuildIn::parse(Some("ram"), None).expect_err("refused");
        assert!(
            err.contains("VELO_BUILD_IN") && err.contains("\"ram\""),
            "{err}"
        );
    }
}
