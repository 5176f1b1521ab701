//! velo-mountd for a test's store, and ordinary users for a test's clients: both go away at the
//! end of the test, even when it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{Env, describe, velo_bin};

/// The `velo-mountd` binary under test.
pub fn mountd_bin() -> PathBuf {
    velo_bin().with_file_name("velo-mountd")
}

/// A velo-mountd serving a test's store; stopped (and waited for) on drop.
pub struct Mountd {
    /// Its socket.
    pub socket: PathBuf,
    child: Option<Child>,
}

impl Mountd {
    /// Starts velo-mountd for `env`'s store with a socket in `env`'s dir (which is made
    /// traversable for other users), and waits until it answers.
    pub fn start(env: &Env) -> Self {
        Self::start_with(env, &[])
    }

    /// [`Mountd::start`] with extra arguments.
    pub fn start_with(env: &Env, args: &[&str]) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = env.path("run");
        std::fs::create_dir_all(&dir).expect("mkdir");
        for d in [env.dir.path(), dir.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let socket = dir.join("velo.sock");
        let child = Command::new(mountd_bin())
            .arg("--store")
            .arg(&env.store)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env_remove("VELO_STORE")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env("VELO_LOG", "warn")
            .spawn()
            .expect("start velo-mountd");
        let mut m = Self {
            socket,
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
                panic!("velo-mountd exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "velo-mountd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `velo --socket S ARGS…` (as root).
    pub fn velo(&self, args: &[&str]) -> Command {
        let mut c = Command::new(velo_bin());
        c.arg("--socket").arg(&self.socket).args(args);
        c.env_remove("VELO_STORE").env_remove("VELO_SOCKET");
        c
    }

    /// `velo service status --json` (as root).
    pub fn status(&self) -> serde_json::Value {
        let out = self
            .velo(&["--json", "service", "status"])
            .output()
            .expect("run velo");
        assert!(out.status.success(), "service status: {}", describe(&out));
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Waits (at most 30 s) until `done` holds of the status's first image; returns it.
    pub fn wait_for(
        &self,
        what: &str,
        done: &dyn Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status();
            if done(&s["images"][0]) {
                return s["images"][0].clone();
            }
            assert!(Instant::now() < deadline, "{what}: {s}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until nothing is lent or being checked; returns the first image's counters.
    pub fn settled(&self) -> serde_json::Value {
        self.wait_for("overlays were not handed back", &|i| {
            i["lent"] == 0 && i["checking"] == 0
        })
    }

    /// Stops it and waits for it to exit.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self.velo(&["service", "stop"]).output();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
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

/// useradd/userdel lock /etc/passwd and fail rather than wait: this test binary's users are
/// made and removed one at a time.
static PASSWD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// An ordinary user made for a test (with a home dir of its own); removed on drop.
pub struct TestUser {
    /// Login name.
    pub name: String,
    /// Uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

impl TestUser {
    /// Creates a user `velo-<tag>-<pid>` whose home is `base/<tag>-home`.
    pub fn create(tag: &str, base: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let name = format!("velo-{tag}-{}", std::process::id());
        let home = base.join(format!("{tag}-home"));
        let _turn = PASSWD.lock().unwrap_or_else(|p| p.into_inner());
        let _ = Command::new("userdel").arg(&name).output();
        let out = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", "--home-dir"])
            .arg(&home)
            .arg(&name)
            .output()
            .expect("run useradd");
        assert!(out.status.success(), "useradd {name}: {}", describe(&out));
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .arg(flag)
                .arg(&name)
                .output()
                .expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("an id")
        };
        let (uid, gid) = (id("-u"), id("-g"));
        std::fs::create_dir_all(&home).expect("mkdir home");
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).expect("chown home");
        debug_assert_eq!(std::fs::metadata(&home).map(|m| m.uid()).ok(), Some(uid));
        Self {
            name,
            uid,
            gid,
            home,
        }
    }

    /// A command run as this user (no capabilities, a login-like environment: HOME, USER,
    /// LOGNAME, PATH), in `dir`.
    pub fn command(&self, program: &Path, dir: &Path) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .args(["--init-groups", "--inh-caps=-all", "--"])
            .arg(program)
            .current_dir(dir)
            .env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            );
        c
    }

    /// `velo --socket S ARGS…` as this user, in `dir`.
    pub fn velo(&self, mountd: &Mountd, dir: &Path, args: &[&str]) -> Command {
        let mut c = self.command(&velo_bin(), dir);
        c.arg("--socket").arg(&mountd.socket).args(args);
        c
    }

    /// Makes `path` (and everything under it) this user's.
    pub fn own(&self, path: &Path) {
        let out = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", self.uid, self.gid))
            .arg(path)
            .output()
            .expect("chown");
        assert!(out.status.success(), "chown: {}", describe(&out));
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Processes it left (a test that failed half-way) go first, or userdel refuses.
        let _ = Command::new("pkill")
            .args(["-KILL", "-U"])
            .arg(self.uid.to_string())
            .output();
        let _turn = PASSWD.lock().unwrap_or_else(|p| p.into_inner());
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}
