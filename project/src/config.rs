//! `velo.toml`: the managed dependency dirs of a project, what keys them and what builds them.
//! `velo init` writes it; users may edit it; unknown keys are an error that names them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The file name, at the project root.
pub const FILE: &str = "velo.toml";

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// One entry per install: the dirs it produces and what keys them.
    #[serde(default, rename = "deps")]
    pub units: Vec<Unit>,
}

/// Dependency dirs built together by one install command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    /// `npm`, `pnpm`, `yarn`, `uv`, `poetry`, `pip` or `cargo` (part of the ref name).
    pub ecosystem: String,
    /// The dirs the install fills, relative to the project (e.g. `node_modules`, `.venv`).
    pub dirs: Vec<String>,
    /// Files whose bytes key the dirs: lockfiles, manifests, package-manager config. Relative
    /// to the project; `~/` means the invoking user's home. A missing file keys as "absent".
    pub inputs: Vec<String>,
    /// The shell command that builds the dirs, run at the project root as the invoking user.
    pub install: String,
    /// Commands whose output keys the dirs: the package manager's and the runtime's versions
    /// (e.g. `npm --version`, the node ABI). Cached by the binary's identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<String>,
    /// Environment variables with these prefixes key the dirs (their values are hashed, never
    /// stored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_prefixes: Vec<String>,
    /// Whether the absolute project path keys the dirs (Python venvs bake it into scripts).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub path_sensitive: bool,
    /// Environment set for the install and for `velo run`'s command; `{project}` expands to
    /// the project path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Whether the install starts from the tree last built for the same dir of this project
    /// (cargo's: a changed Cargo.lock downloads only the new crates; what it no longer names is
    /// pruned after the install). See [`crate::seed`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seed: bool,
}

impl Config {
    /// Reads and checks `velo.toml` in `project`.
    pub fn load(project: &Path) -> anyhow::Result<Self> {
        let path = project.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "no {FILE} in {} or any dir above it: run `velo init` in the project's root \
                     (where its lockfile is)",
                    project.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let config: Config = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim()))?;
        config
            .check()
            .with_context(|| format!("{}", path.display()))?;
        Ok(config)
    }

    /// Writes `velo.toml` (with a header explaining it).
    pub fn save(&self, project: &Path) -> anyhow::Result<PathBuf> {
        let path = project.join(FILE);
        let body = toml::to_string_pretty(self).context("serialise velo.toml")?;
        let text = format!(
            "# velo.toml: the dependency dirs `velo run` mounts, what keys them, and what builds them.\n\
             # Written by `velo init`; edit freely (unknown keys are an error).\n\n{body}"
        );
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// Semantic checks serde cannot do.
    pub fn check(&self) -> anyhow::Result<()> {
        let mut seen = std::collections::HashSet::new();
        for u in &self.units {
            if u.ecosystem.is_empty()
                || !u
                    .ecosystem
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                bail!(
                    "ecosystem {:?}: use lowercase letters, digits and `-`",
                    u.ecosystem
                );
            }
            if u.dirs.is_empty() {
                bail!("the {} entry lists no dirs", u.ecosystem);
            }
            if u.install.trim().is_empty() {
                bail!("the {} entry has an empty install command", u.ecosystem);
            }
            for d in &u.dirs {
                let p = Path::new(d);
                if d.is_empty()
                    || p.is_absolute()
                    || p.components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    bail!(
                        "dir {d:?}: a managed dir is a plain path inside the project (no `..`, not absolute)"
                    );
                }
                if !seen.insert(d.clone()) {
                    bail!("dir {d:?} is listed twice");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let text = "[[deps]]\necosystem = \"npm\"\ndirs = [\"node_modules\"]\ninputs = []\ninstall = \"npm ci\"\ncolour = \"blue\"\n";
        let err = toml::from_str::<Config>(text).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
        let err = toml::from_str::<Config>("[settings]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("settings"), "{err}");
    }

    #[test]
    fn dirs_stay_inside_the_project() {
        for bad in ["../x", "/abs", "a/../b", ""] {
            let c = Config {
                units: vec![Unit {
                    ecosystem: "npm".into(),
                    dirs: vec![bad.into()],
                    inputs: vec![],
                    install: "true".into(),
                    versions: vec![],
                    env_prefixes: vec![],
                    path_sensitive: false,
                    env: Default::default(),
                    seed: false,
                }],
            };
            assert!(c.check().is_err(), "{bad:?} accepted");
        }
    }
}
