//! # velo-project: a project's dependency dirs — `velo init`, `velo run`, `velo status`
//!
//! A project's dependency dirs, keyed by its lockfiles, built once and then mounted in
//! milliseconds. The CLI (`src/`) only parses arguments and prints; the flows live here.

pub mod belongs;
pub mod build;
pub mod cargo_config;
pub mod child;
pub mod client;
pub mod config;
pub mod detect;
pub mod inputs;
pub mod key;
pub mod memory;
pub mod run;
pub mod seed;
pub mod tools;
pub mod user;
pub mod userns;
pub mod uv;

use std::path::{Path, PathBuf};

use config::{Config, Unit};
use key::{CacheAt, KeyCache};
use user::User;

/// One managed dir, resolved for the current state of the project.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ManagedDir {
    /// The entry of velo.toml it belongs to (index).
    #[serde(skip)]
    pub unit: usize,
    /// Ecosystem.
    pub ecosystem: String,
    /// Path relative to the project.
    pub dir: String,
    /// Absolute path.
    pub path: PathBuf,
    /// Its key now.
    pub key: String,
    /// The ref its image has (or will have).
    pub ref_name: String,
}

/// Resolves every managed dir of `config` (keys computed from the project's current state),
/// with the key cache at `cache_at`, and records which project dir each ref belongs to (see
/// [`belongs`]).
pub fn resolve(
    cache_at: &CacheAt<'_>,
    project: &Path,
    config: &Config,
    user: &User,
) -> anyhow::Result<Vec<ManagedDir>> {
    let mut cache = KeyCache::load(cache_at);
    let mut out = Vec::new();
    for (i, unit) in config.units.iter().enumerate() {
        let h = key::unit_hasher(project, unit, user, &mut cache)?;
        for dir in &unit.dirs {
            let k = key::dir_key(&h, dir);
            out.push(ManagedDir {
                unit: i,
                ecosystem: unit.ecosystem.clone(),
                dir: dir.clone(),
                path: project.join(dir),
                ref_name: key::ref_name(unit, &k),
                key: k,
            });
        }
    }
    cache.save(cache_at);
    belongs::record(cache_at, project, &out);
    Ok(out)
}

/// A build stopped by a signal (Ctrl-C, `kill`): velo exits the way it did (130 for
/// Ctrl-C), as the install alone would have.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by signal {signal}")]
pub struct Interrupted {
    /// The signal.
    pub signal: i32,
}

/// The project dir: the nearest of the current directory (canonical, as getcwd(2) answers)
/// and its parents that holds `velo.toml` — found upward, as npm, cargo, uv and git find
/// theirs (keys of path-sensitive ecosystems include it). If none holds one, the current
/// directory itself, whose error then names it. (`-C DIR` has velo start in DIR.)
pub fn project_dir() -> anyhow::Result<PathBuf> {
    Ok(find_project(&current_dir()?, false))
}

/// [`project_dir`] for `velo init`: the nearest dir that holds `velo.toml` or a lockfile velo
/// detects.
pub fn project_dir_for_init() -> anyhow::Result<PathBuf> {
    Ok(find_project(&current_dir()?, true))
}

fn current_dir() -> anyhow::Result<PathBuf> {
    std::env::current_dir().map_err(|e| anyhow::anyhow!("the current directory: {e}"))
}

/// The nearest of `start` and its parents holding `velo.toml` (or, `for_init`, a lockfile
/// [`detect::detect`] recognises); `start` if none does.
pub fn find_project(start: &Path, for_init: bool) -> PathBuf {
    start
        .ancestors()
        .find(|dir| dir.join(config::FILE).is_file() || (for_init && detect::detect(dir).is_ok()))
        .unwrap_or(start)
        .to_owned()
}

/// `env` of a unit with `{project}` expanded.
pub fn unit_env(unit: &Unit, project: &Path) -> Vec<(String, String)> {
    unit.env
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.replace("{project}", &project.to_string_lossy()),
            )
        })
        .collect()
}

/// velo's cache directory for this user (the key cache, builds under way, locks):
/// `$XDG_CACHE_HOME/velo`, else `~/.cache/velo`, else `/tmp/velo-<uid>` — created, 0700.
pub fn user_cache_dir() -> anyhow::Result<PathBuf> {
    let uid = rustix::process::getuid().as_raw();
    let home_based = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| Path::new(v).is_absolute())
        .map(|v| PathBuf::from(v).join("velo"))
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| Path::new(v).is_absolute())
                .map(|h| PathBuf::from(h).join(".cache/velo"))
        });
    let fallback = PathBuf::from(format!("/tmp/velo-{uid}"));
    let mut last = None;
    for dir in home_based.into_iter().chain([fallback]) {
        match own_dir(&dir, uid) {
            Ok(()) => return Ok(dir),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no cache directory for velo")))
}

/// Creates `dir` (0700) if missing and checks it is a directory `uid` owns.
fn own_dir(dir: &Path, uid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("create velo's cache directory {}: {e}", dir.display()))?;
    let md =
        std::fs::symlink_metadata(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    if !md.is_dir() || md.uid() != uid {
        anyhow::bail!(
            "velo's cache directory {} is not a directory of yours; remove it or set XDG_CACHE_HOME",
            dir.display()
        );
    }
    Ok(())
}
