//! # velo-project: a project's dependency dirs — `velo init`, `velo run`, `velo status`
//!
//! A project's dependency dirs, keyed by its lockfiles, built once and then mounted in
//! milliseconds. The CLI (`src/`) only parses arguments and prints; the flows live here.

pub mod child;
pub mod config;
pub mod detect;
pub mod key;
pub mod run;
pub mod user;

use std::path::{Path, PathBuf};

use velo_objects::Store;

use config::{Config, Unit};
use key::KeyCache;
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

/// Resolves every managed dir of `config` (keys computed from the project's current state).
pub fn resolve(
    store: &Store,
    project: &Path,
    config: &Config,
    user: &User,
) -> anyhow::Result<Vec<ManagedDir>> {
    let mut cache = KeyCache::load(store);
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
    cache.save(store);
    Ok(out)
}

/// The project dir: `--project` or the current directory, made absolute and canonical (keys of
/// path-sensitive ecosystems include it).
pub fn project_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => {
            std::fs::canonicalize(p).map_err(|e| anyhow::anyhow!("project {}: {e}", p.display()))
        }
        // getcwd(2) already answers with the canonical path (no symlinks, no `..`).
        None => std::env::current_dir().map_err(|e| anyhow::anyhow!("the current directory: {e}")),
    }
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
