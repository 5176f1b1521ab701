//! velo-mountd for the bench's store, and a throwaway ordinary user for section (d): each
//! behind a guard that undoes it on drop (a panic included) — the service is stopped (it lets
//! go of every overlay it lent, which sit on the bench's ext4), the user's processes are
//! killed, its refs, its home and dirs and the access it was granted are removed, and the
//! user is deleted.

#![allow(unsafe_code)] // system calls for the bench harness (processes, signals, caches)

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::sys::{cmd, remove_tree, run, run_json};

/// velo and velo-mountd of one build, copied to `dir` for the whole run: `cargo bench --bench
/// run` builds only the `velo` package's binaries, and velo-mountd is in `velo-mount`, so
/// both are built here (`cargo build` of the profile `velo` was built with; nothing to do when
/// they are up to date). The copies keep a rebuild by someone else during the run from
/// swapping either binary, and the two from speaking different versions of the protocol.
pub fn binaries(velo: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let profile_dir = velo
        .parent()
        .and_then(Path::file_name)
        .and_then(OsStr::to_str)
        .unwrap_or("release")
        .to_owned();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut c = cmd(env!("CARGO"), ["build", "--quiet", "--manifest-path"]);
    c.arg(&manifest).args([
        "-p",
        "velo",
        "--bin",
        "velo",
        "-p",
        "velo-mount",
        "--bin",
        "velo-mountd",
    ]);
    match profile_dir.as_str() {
        "debug" => {}
        "release" => {
            c.arg("--release");
        }
        other => {
            c.args(["--profile", other]);
        }
    }
    let out = c.output().expect("run cargo build");
    assert!(
        out.status.success(),
        "building velo and velo-mountd failed ({c:?}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let copy = |name: &str| {
        let from = velo.with_file_name(name);
        let to = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::copy(&from, &tmp)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), tmp.display()));
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod a binary");
        fs::rename(&tmp, &to).expect("rename a binary");
        to
    };
    (copy("velo"), copy("velo-mountd"))
}

/// A velo-mountd serving the bench's store; [`Mountd::stop`] stops it (checked), and dropping
/// it stops it too (unchecked, killing it after 30 s).
pub struct Mountd {
    velo: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mountd {
    /// Starts `BIN --store STORE --socket SOCKET` (its log to `log`) and waits until it
    /// answers; `velo` is the client that talks to it. A service left at the socket by an
    /// earlier bench run that was killed is stopped first.
    pub fn start(bin: &Path, velo: &Path, store: &Path, socket: &Path, log: &Path) -> Self {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            println!(
                "  stopping a velo-mountd left at {} by an earlier run",
                socket.display()
            );
            let _ = velo_cmd(velo, socket, ["service", "stop"]).output();
        }
        let log_file = fs::File::create(log)
            .unwrap_or_else(|e| panic!("create the velo-mountd log {}: {e}", log.display()));
        let child = Command::new(bin)
            .arg("--store")
            .arg(store)
            .arg("--socket")
            .arg(socket)
            .env_remove("VELO_STORE")
            .env_remove("VELO_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut m = Self {
            velo: velo.to_owned(),
            socket: socket.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        };
        m.wait_until_up();
        m
    }

    fn wait_until_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "velo-mountd exited at start ({status}); its log:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "velo-mountd did not answer at {} within 60 s",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where its log goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// `velo --socket S --json service status` (as root: with every image it holds).
    pub fn status(&self) -> serde_json::Value {
        run_json(&mut velo_cmd(
            &self.velo,
            &self.socket,
            ["--json", "service", "status"],
        ))
    }

    /// The status entry of `image` (`hits`, `lent`, `idle`, `checking`, `retired`, `reused`,
    /// `discarded`), if the service holds it.
    pub fn image(&self, image: &str) -> Option<serde_json::Value> {
        let status = self.status();
        status["images"]
            .as_array()?
            .iter()
            .find(|e| e["image"] == image)
            .cloned()
    }

    /// Stops it (`velo service stop`, which returns once it has let everything go) and waits
    /// for it to exit; panics if it does not.
    pub fn stop(mut self) {
        let stopped = self.shut_down();
        assert!(
            stopped,
            "velo-mountd did not stop within 30 s of `velo service stop` (killed); its log: {}",
            self.log.display()
        );
    }

    /// Returns whether it exited by itself after `service stop`.
    fn shut_down(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = velo_cmd(&self.velo, &self.socket, ["service", "stop"]).output();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }
}

impl Drop for Mountd {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// `velo --socket S ARGS…` as root (no store named).
fn velo_cmd<I, S>(velo: &Path, socket: &Path, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = cmd(velo, [OsStr::new("--socket"), socket.as_os_str()]);
    c.args(args)
        .env_remove("VELO_STORE")
        .env_remove("VELO_SOCKET");
    c
}

/// The ACL a directory had before the user was granted traversal of it.
struct Granted {
    dir: PathBuf,
    /// `getfacl` output, restored with `setfacl --set-file=-`.
    acl: Vec<u8>,
}

/// An ordinary user made for the bench (`velo-bench-<pid>`), with a home of its own. Dropping
/// it kills what it left running, removes its refs from the store (as root), restores the ACLs
/// of the directories it was let through, removes its home, and deletes it.
pub struct BenchUser {
    /// Login name.
    pub name: String,
    /// Uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Home directory (on the bench's ext4).
    pub home: PathBuf,
    /// `PATH` for its commands.
    path: OsString,
    /// velo and its store, to remove the user's refs at the end.
    velo: PathBuf,
    store: PathBuf,
    granted: Vec<Granted>,
    /// Directories made for it outside its home (removed with it).
    dirs: Vec<PathBuf>,
}

impl BenchUser {
    /// Creates the user with `home` (created, its own). Refs a deleted user of the same uid
    /// left in `store` (an earlier run that was killed) are removed first.
    pub fn create(home: &Path, path: &OsStr, velo: &Path, store: &Path) -> Self {
        let name = format!("velo-bench-{}", std::process::id());
        let _ = Command::new("userdel").arg(&name).output();
        run(cmd(
            "useradd",
            ["--no-create-home", "--shell", "/bin/sh", "--home-dir"],
        )
        .arg(home)
        .arg(&name));
        let id = |flag: &str| -> u32 {
            let out = run(&mut cmd("id", [flag, &name]));
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("id prints a number")
        };
        let user = Self {
            uid: id("-u"),
            gid: id("-g"),
            name,
            home: home.to_owned(),
            path: path.to_owned(),
            velo: velo.to_owned(),
            store: store.to_owned(),
            granted: Vec::new(),
            dirs: Vec::new(),
        };
        remove_tree(home);
        fs::create_dir_all(home).expect("create the bench user's home");
        user.own(home);
        user.remove_refs();
        user
    }

    /// `program args…` as this user, in `dir`: uid, gid and groups dropped to the user's in
    /// the child before the exec (no capabilities left), a login-like environment (`HOME`,
    /// `USER`, `LOGNAME`, `PATH`) plus `env`, stdin closed and output captured.
    pub fn command<I, S>(
        &self,
        program: impl AsRef<OsStr>,
        args: I,
        dir: &Path,
        env: &[(&str, &OsStr)],
    ) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = cmd(program, args);
        c.current_dir(dir)
            .env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("PATH", &self.path);
        for (k, v) in env {
            c.env(k, v);
        }
        let (uid, gid) = (self.uid, self.gid);
        // SAFETY: only async-signal-safe system calls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                let groups = [gid];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// A fresh, empty directory at `path` (anything there before is removed) that belongs to
    /// this user and goes with it.
    pub fn dir_of_its_own(&mut self, path: &Path) -> PathBuf {
        remove_tree(path);
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        self.own(path);
        self.dirs.push(path.to_owned());
        path.to_owned()
    }

    /// Makes `path` (and everything under it) this user's.
    pub fn own(&self, path: &Path) {
        run(cmd("chown", ["-R", &format!("{}:{}", self.uid, self.gid)]).arg(path));
    }

    /// Lets this user traverse every directory above `path` (and `path` itself if it is a
    /// directory) that others may not enter: an ACL entry `u:UID:x` on each, for this user
    /// only, restored when the user is dropped. Returns the directories changed.
    pub fn grant_traversal(&mut self, path: &Path) -> Vec<PathBuf> {
        let path = fs::canonicalize(path)
            .unwrap_or_else(|e| panic!("canonicalize {}: {e}", path.display()));
        let mut dirs: Vec<PathBuf> = path.ancestors().skip(1).map(Path::to_owned).collect();
        if path.is_dir() {
            dirs.push(path.clone());
        }
        let mut changed = Vec::new();
        for dir in dirs {
            let md = fs::metadata(&dir).unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()));
            let enterable = md.permissions().mode() & 0o001 != 0
                || md.uid() == self.uid
                || (md.gid() == self.gid && md.permissions().mode() & 0o010 != 0);
            if enterable || self.granted.iter().any(|g| g.dir == dir) {
                continue;
            }
            let acl = run(cmd("getfacl", ["--absolute-names", "--"]).arg(&dir)).stdout;
            run(cmd("setfacl", ["-m", &format!("u:{}:x", self.uid), "--"]).arg(&dir));
            self.granted.push(Granted {
                dir: dir.clone(),
                acl,
            });
            changed.push(dir);
        }
        changed
    }

    /// Removes the refs of this uid from the store (`users/UID/…`), as root.
    fn remove_refs(&self) {
        let Ok(out) = cmd(&self.velo, [OsStr::new("--store"), self.store.as_os_str()])
            .args(["--json", "ref", "ls"])
            .env_remove("VELO_STORE")
            .output()
        else {
            return;
        };
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let prefix = format!("users/{}/", self.uid);
        for row in rows.as_array().into_iter().flatten() {
            if let Some(name) = row["name"].as_str()
                && name.starts_with(&prefix)
            {
                let _ = cmd(&self.velo, [OsStr::new("--store"), self.store.as_os_str()])
                    .args(["-q", "ref", "rm", name])
                    .env_remove("VELO_STORE")
                    .output();
            }
        }
    }

    /// Kills every process still running as this user (by pid, from `/proc`).
    fn kill_processes(&self) {
        for _ in 0..10 {
            let mut found = false;
            for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                if entry.metadata().is_ok_and(|m| m.uid() == self.uid) {
                    found = true;
                    // SAFETY: kill(2) on a pid; at worst it no longer exists.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if !found {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BenchUser {
    fn drop(&mut self) {
        self.kill_processes();
        self.remove_refs();
        for g in self.granted.drain(..).rev() {
            let restored = cmd("setfacl", [OsStr::new("--set-file=-"), OsStr::new("--")])
                .arg(&g.dir)
                .stdin(Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child.stdin.take().expect("piped").write_all(&g.acl)?;
                    child.wait()
                });
            if !restored.is_ok_and(|s| s.success()) {
                eprintln!(
                    "WARNING: could not restore the ACL of {} (remove the entry u:{}:x by hand)",
                    g.dir.display(),
                    self.uid
                );
            }
        }
        let _ = fs::remove_dir_all(&self.home);
        for d in &self.dirs {
            let _ = fs::remove_dir_all(d);
        }
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}
