//! Who installs and runs: the invoking user behind sudo (`SUDO_UID`/`SUDO_GID`), or `--user`,
//! so that dependency trees and their copy-on-write writes belong to them, not to root.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// A user to run installs and commands as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (for `~/` inputs such as `~/.npmrc`).
    pub home: PathBuf,
}

/// One `/etc/passwd` entry: (name, uid, gid, home).
fn passwd() -> Vec<(String, u32, u32, PathBuf)> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 6).then(|| {
                Some((
                    f[0].to_owned(),
                    f[2].parse().ok()?,
                    f[3].parse().ok()?,
                    PathBuf::from(f[5]),
                ))
            })?
        })
        .collect()
}

impl User {
    /// `--user NAME|UID[:GID]` if given, else the sudo caller, else this process's user.
    pub fn invoking(explicit: Option<&str>) -> anyhow::Result<Self> {
        // /etc/passwd is read only when needed (not on a plain root `velo run`).
        let entries = std::cell::OnceCell::new();
        let entries = || entries.get_or_init(passwd);
        let by_uid = |uid: u32| entries().iter().find(|e| e.1 == uid);
        if let Some(spec) = explicit {
            let (who, group) = match spec.split_once(':') {
                Some((w, g)) => (w, Some(g)),
                None => (spec, None),
            };
            let (uid, gid, home) = match who.parse::<u32>() {
                Ok(uid) => match by_uid(uid) {
                    Some(e) => (uid, e.2, e.3.clone()),
                    None => (uid, uid, PathBuf::from("/nonexistent")),
                },
                Err(_) => match entries().iter().find(|e| e.0 == who) {
                    Some(e) => (e.1, e.2, e.3.clone()),
                    None => bail!("--user {spec}: no such user in /etc/passwd"),
                },
            };
            let gid = match group {
                Some(g) => g
                    .parse()
                    .with_context(|| format!("--user {spec}: the group must be a number"))?,
                None => gid,
            };
            return Ok(Self { uid, gid, home });
        }
        if rustix::process::geteuid().is_root()
            && let (Ok(u), Ok(g)) = (std::env::var("SUDO_UID"), std::env::var("SUDO_GID"))
            && let (Ok(uid), Ok(gid)) = (u.parse::<u32>(), g.parse::<u32>())
        {
            let home = by_uid(uid)
                .map(|e| e.3.clone())
                .unwrap_or_else(|| PathBuf::from("/nonexistent"));
            return Ok(Self { uid, gid, home });
        }
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .or_else(|| by_uid(uid).map(|e| e.3.clone()))
            .unwrap_or_else(|| PathBuf::from("/"));
        Ok(Self { uid, gid, home })
    }

    /// True if this is the user this process runs as (no switch needed).
    pub fn is_current(&self) -> bool {
        self.uid == rustix::process::getuid().as_raw()
            && self.gid == rustix::process::getgid().as_raw()
    }

    /// Makes `cmd` run as this user (groups reduced to its primary group).
    pub fn apply(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        if !self.is_current() {
            cmd.uid(self.uid).gid(self.gid);
        }
    }
}
