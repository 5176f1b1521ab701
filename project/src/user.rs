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
    /// Login name, where passwd has one.
    pub name: Option<String>,
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
            let (uid, gid, home, name) = match who.parse::<u32>() {
                Ok(uid) => match by_uid(uid) {
                    Some(e) => (uid, e.2, e.3.clone(), Some(e.0.clone())),
                    None => (uid, uid, PathBuf::from("/nonexistent"), None),
                },
                Err(_) => match entries().iter().find(|e| e.0 == who) {
                    Some(e) => (e.1, e.2, e.3.clone(), Some(e.0.clone())),
                    None => bail!("--user {spec}: no such user in /etc/passwd"),
                },
            };
            let gid = match group {
                Some(g) => g
                    .parse()
                    .with_context(|| format!("--user {spec}: the group must be a number"))?,
                None => gid,
            };
            return Ok(Self {
                uid,
                gid,
                home,
                name,
            });
        }
        if rustix::process::geteuid().is_root()
            && let (Ok(u), Ok(g)) = (std::env::var("SUDO_UID"), std::env::var("SUDO_GID"))
            && let (Ok(uid), Ok(gid)) = (u.parse::<u32>(), g.parse::<u32>())
        {
            let entry = by_uid(uid);
            let home = entry
                .map(|e| e.3.clone())
                .unwrap_or_else(|| PathBuf::from("/nonexistent"));
            let name = entry.map(|e| e.0.clone());
            return Ok(Self {
                uid,
                gid,
                home,
                name,
            });
        }
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .or_else(|| by_uid(uid).map(|e| e.3.clone()))
            .unwrap_or_else(|| PathBuf::from("/"));
        Ok(Self {
            uid,
            gid,
            home,
            name: None,
        })
    }

    /// True if this is the user this process runs as (no switch needed).
    pub fn is_current(&self) -> bool {
        self.uid == rustix::process::getuid().as_raw()
            && self.gid == rustix::process::getgid().as_raw()
    }

    /// Makes `cmd` run as this user (groups reduced to its primary group), with the
    /// environment that says who they are (see [`User::identity_env`]).
    pub fn apply(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        if !self.is_current() {
            cmd.uid(self.uid).gid(self.gid);
            for (k, v) in self.identity_env(&std::env::vars_os().collect::<Vec<_>>()) {
                match v {
                    Some(v) => cmd.env(k, v),
                    None => cmd.env_remove(k),
                };
            }
        }
    }

    /// The environment of a process switched to this user, given the current environment
    /// (`sudo` keeps root's): `HOME`, `USER` and `LOGNAME` from passwd, the XDG base dirs
    /// under their home (or their `/run/user/UID` for the runtime dir, if it exists), and
    /// root's `MAIL`/`XAUTHORITY` gone. Without this, npm writes to `/root/.npm` and fails,
    /// pytest writes to `/tmp/pytest-of-root`. `None` removes a variable.
    pub fn identity_env(
        &self,
        current: &[(std::ffi::OsString, std::ffi::OsString)],
    ) -> Vec<(String, Option<std::ffi::OsString>)> {
        use std::ffi::OsString;
        let home = self.home.as_os_str().to_owned();
        let under_home = |rel: &str| Some(self.home.join(rel).into_os_string());
        let mut env = vec![("HOME".to_owned(), Some(home))];
        let name = self.name.clone().map(OsString::from);
        env.push(("USER".into(), name.clone()));
        env.push(("LOGNAME".into(), name));
        for (var, rel) in [
            ("XDG_CONFIG_HOME", ".config"),
            ("XDG_CACHE_HOME", ".cache"),
            ("XDG_DATA_HOME", ".local/share"),
            ("XDG_STATE_HOME", ".local/state"),
        ] {
            // Only where set (to root's): unset, every tool already defaults under $HOME.
            if current.iter().any(|(k, _)| k == var) {
                env.push((var.into(), under_home(rel)));
            }
        }
        let runtime = PathBuf::from(format!("/run/user/{}", self.uid));
        env.push((
            "XDG_RUNTIME_DIR".into(),
            runtime.is_dir().then(|| runtime.into_os_string()),
        ));
        for var in ["MAIL", "XAUTHORITY"] {
            env.push((var.into(), None));
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through sudo, the install and the command get the target user's identity, not root's:
    /// npm's cache, pytest's temp dir and XDG paths all follow `HOME`/`USER`.
    #[test]
    fn a_switched_user_gets_their_own_home_name_and_xdg_dirs() {
        let u = User {
            uid: 4242,
            gid: 4242,
            home: PathBuf::from("/home/ann"),
            name: Some("ann".into()),
        };
        let current = vec![
            ("HOME".into(), "/root".into()),
            ("USER".into(), "root".into()),
            ("XDG_CONFIG_HOME".into(), "/root/.config".into()),
            ("MAIL".into(), "/var/mail/root".into()),
        ];
        let env: std::collections::HashMap<_, _> = u.identity_env(&current).into_iter().collect();
        assert_eq!(env["HOME"], Some("/home/ann".into()));
        assert_eq!(env["USER"], Some("ann".into()));
        assert_eq!(env["LOGNAME"], Some("ann".into()));
        assert_eq!(env["XDG_CONFIG_HOME"], Some("/home/ann/.config".into()));
        assert!(!env.contains_key("XDG_CACHE_HOME"), "unset stays unset");
        assert_eq!(env["XDG_RUNTIME_DIR"], None, "no /run/user/4242 here");
        assert_eq!(env["MAIL"], None);
    }
}
