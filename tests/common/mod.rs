//! Shared helpers for integration tests: the real binaries, temp stores, mounts that are
//! always cleaned up, and a tree comparison that checks everything a snapshot must keep.
#![allow(dead_code)]

pub mod fixtures;

pub mod registry;

pub mod flaky_proxy;

pub mod mountd;

pub mod profiles;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `velo` binary under test.
pub fn velo_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_velo"))
}

/// True if this process may mount. Otherwise prints a loud SKIPPED line — or, when
/// `VELO_REQUIRE_MOUNT_TESTS=1` (CI sets it), fails the test.
pub fn can_mount(test: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    let have = root
        && std::fs::read_to_string("/proc/filesystems")
            .is_ok_and(|t| t.contains("erofs") && t.contains("overlay"));
    if !have {
        let why = if root {
            "the kernel lacks erofs or overlay"
        } else {
            "not running as root"
        };
        if std::env::var("VELO_REQUIRE_MOUNT_TESTS").as_deref() == Ok("1") {
            panic!("{test}: cannot run ({why}) but VELO_REQUIRE_MOUNT_TESTS=1");
        }
        eprintln!("SKIPPED {test}: needs root and erofs+overlay ({why})");
    }
    have
}

/// A temporary directory holding a store (and whatever else a test needs).
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("velo-test-")
            .tempdir()
            .expect("tempdir");
        let store = dir.path().join("store");
        Self { dir, store }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `velo --store STORE ARGS…`
    pub fn velo(&self, args: &[&str]) -> Command {
        let mut c = Command::new(velo_bin());
        c.arg("--store").arg(&self.store).args(args);
        c.env_remove("VELO_STORE");
        c
    }

    /// Runs velo, expecting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.velo(args).output().expect("run velo");
        assert!(
            out.status.success(),
            "velo {args:?} failed:\n{}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs velo with --json, expecting success; returns the parsed output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("velo {args:?}: bad JSON {e}: {out}"))
    }

    /// Runs velo, expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.velo(args).output().expect("run velo");
        assert!(
            !out.status.success(),
            "velo {args:?} should have failed:\n{}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `velo snapshot DIR --ref REF --json`, returning the image digest.
    pub fn snapshot(&self, dir: &Path, ref_name: &str) -> String {
        let v = self.json(&["snapshot", path_str(dir), "--ref", ref_name]);
        v["digest"].as_str().expect("digest").to_owned()
    }

    /// Snapshots a small tree (one file big enough to be an object) as `ref_name`; its digest.
    #[allow(dead_code)] // not every test crate uses it
    pub fn snapshot_small(&self, ref_name: &str) -> String {
        let src = self.path("tree");
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::write(src.join("a"), "a".repeat(5000)).expect("write");
        self.snapshot(&src, ref_name)
    }

    /// Mounts and returns a guard that unmounts on drop, even if the test fails.
    pub fn mount(&self, image: &str, target: &Path, extra: &[&str]) -> Mounted {
        let mut args = vec!["mount", image, path_str(target)];
        args.extend_from_slice(extra);
        let out = self.velo(&args).output().expect("run velo");
        let guard = Mounted {
            target: target.to_owned(),
            store: self.store.clone(),
        };
        assert!(
            out.status.success(),
            "velo {args:?} failed:\n{}",
            describe(&out)
        );
        guard
    }

    /// A snapshot of the store's files: relative path → (size, mode, content hash).
    pub fn store_listing(&self) -> BTreeMap<PathBuf, (u64, u32, String)> {
        listing(&self.store)
    }
}

/// Relative path → (size, mode, blake-ish content hash) of every file under `root`.
pub fn listing(root: &Path) -> BTreeMap<PathBuf, (u64, u32, String)> {
    let mut out = BTreeMap::new();
    for e in walkdir(root) {
        let md = std::fs::symlink_metadata(&e).expect("lstat");
        let rel = e.strip_prefix(root).unwrap_or(&e).to_owned();
        let hash = if md.is_file() {
            let data = std::fs::read(&e).unwrap_or_default();
            format!("{:x}", fxhash(&data))
        } else {
            String::new()
        };
        out.insert(rel, (md.len(), md.mode(), hash));
    }
    out
}

fn fxhash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A mount made by a test; unmounted (lazily if busy) on drop.
pub struct Mounted {
    pub target: PathBuf,
    store: PathBuf,
}

impl Mounted {
    /// Takes responsibility for a mount made some other way.
    pub fn adopt(target: &Path, store: &Path) -> Self {
        Self {
            target: target.to_owned(),
            store: store.to_owned(),
        }
    }

    /// Unmounts now, asserting success.
    pub fn umount(self) -> serde_json::Value {
        let out = Command::new(velo_bin())
            .arg("--store")
            .arg(&self.store)
            .args(["--json", "umount"])
            .arg(&self.target)
            .output()
            .expect("run velo");
        assert!(out.status.success(), "umount failed:\n{}", describe(&out));
        std::mem::forget(self);
        serde_json::from_slice(&out.stdout).expect("umount json")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new(velo_bin())
            .arg("--store")
            .arg(&self.store)
            .args(["umount", "--lazy"])
            .arg(&self.target)
            .output();
        if is_mount_point(&self.target) {
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
        }
    }
}

/// `setpriv … velo --store STORE`: velo as the unprivileged user `nobody`, no capabilities.
pub fn velo_as_nobody(store: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(velo_bin())
    .arg("--store")
    .arg(store);
    c
}

/// A process the test started outside `std::process::Child` (by its pid): SIGKILLed on drop,
/// so it never outlives the test, even when the test fails.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// A tmpfs the test mounted (`size` like `2m`, or none); unmounted on drop, even on failure.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Creates `dir` and mounts a tmpfs named `source` on it.
    pub fn mount(dir: &Path, source: &str, size: Option<&str>) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut c = Command::new("mount");
        c.args(["-t", "tmpfs"]);
        if let Some(size) = size {
            c.arg("-o").arg(format!("size={size}"));
        }
        let out = c.arg(source).arg(dir).output().expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}:\n{}",
            dir.display(),
            describe(&out)
        );
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `sh -c SCRIPT sh …` in a mount namespace of its own (`unshare`; add the script's arguments):
/// whatever it mounts vanishes with it, and never shows in the host's mountinfo.
#[allow(dead_code)] // not every test crate uses it
pub fn sh_in_private_ns(script: &str) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .env_remove("VELO_STORE");
    c
}

/// True if `path` is a mount point (per mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(abs) = std::fs::canonicalize(path) else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|t| {
        t.lines().any(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|mp| Path::new(&unescape(mp)) == abs)
        })
    })
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every path under `root` (not following symlinks), sorted, root excluded.
pub fn walkdir(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// All xattrs of a path (not following symlinks).
pub fn xattrs(path: &Path) -> BTreeMap<OsString, Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = BTreeMap::new();
    let size = rustix::fs::llistxattr_query(path).unwrap_or(0);
    if size == 0 {
        return out;
    }
    let mut names = vec![0u8; size];
    let n = rustix::fs::llistxattr(path, &mut names[..]).expect("listxattr");
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::ffi::OsStr::from_bytes(name);
        let len = rustix::fs::lgetxattr_query(path, name).expect("getxattr size");
        let mut v = vec![0u8; len];
        let got = rustix::fs::lgetxattr(path, name, &mut v[..]).expect("getxattr");
        v.truncate(got);
        out.insert(name.to_owned(), v);
    }
    out
}

/// Compares two trees: names, types, bytes, modes, owners, mtimes (ns), symlink targets, device
/// numbers, xattrs and hardlink identity. Returns the differences found (empty = identical).
pub fn compare_trees(a: &Path, b: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    let la: Vec<PathBuf> = walkdir(a)
        .into_iter()
        .map(|p| p.strip_prefix(a).unwrap_or(&p).to_owned())
        .collect();
    let lb: Vec<PathBuf> = walkdir(b)
        .into_iter()
        .map(|p| p.strip_prefix(b).unwrap_or(&p).to_owned())
        .collect();
    if la != lb {
        diffs.push(format!("entries differ:\n  {la:?}\n  {lb:?}"));
        return diffs;
    }
    // Hardlink identity: names sharing an inode in `a` must share one in `b`, and only those.
    let mut groups_a: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut groups_b: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for rel in std::iter::once(PathBuf::new()).chain(la.iter().cloned()) {
        let pa = a.join(&rel);
        let pb = b.join(&rel);
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa).expect("lstat a"),
            std::fs::symlink_metadata(&pb).expect("lstat b"),
        );
        let what = |f: &str| format!("{}: {f} differs", rel.display());
        if ma.mode() != mb.mode() {
            diffs.push(format!(
                "{} ({:o} vs {:o})",
                what("mode"),
                ma.mode(),
                mb.mode()
            ));
        }
        if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            diffs.push(what("owner"));
        }
        if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec())
            && !rel.as_os_str().is_empty()
        {
            diffs.push(format!(
                "{} ({}.{} vs {}.{})",
                what("mtime"),
                ma.mtime(),
                ma.mtime_nsec(),
                mb.mtime(),
                mb.mtime_nsec()
            ));
        }
        if xattrs(&pa) != xattrs(&pb) {
            diffs.push(format!(
                "{} ({:?} vs {:?})",
                what("xattrs"),
                xattrs(&pa),
                xattrs(&pb)
            ));
        }
        let ft = ma.file_type();
        if ft.is_file() {
            if ma.len() != mb.len() {
                diffs.push(what("size"));
            } else if ma.len() < (64 << 20) && std::fs::read(&pa).ok() != std::fs::read(&pb).ok() {
                diffs.push(what("content"));
            }
            groups_a
                .entry((ma.dev(), ma.ino()))
                .or_default()
                .push(rel.clone());
            groups_b
                .entry((mb.dev(), mb.ino()))
                .or_default()
                .push(rel.clone());
        } else if ft.is_symlink() {
            if std::fs::read_link(&pa).ok() != std::fs::read_link(&pb).ok() {
                diffs.push(what("symlink target"));
            }
        } else if (ft.is_char_device() || ft.is_block_device()) && ma.rdev() != mb.rdev() {
            diffs.push(what("device number"));
        }
    }
    let norm = |g: BTreeMap<(u64, u64), Vec<PathBuf>>| {
        let mut v: Vec<Vec<PathBuf>> = g.into_values().filter(|v| v.len() > 1).collect();
        v.sort();
        v
    };
    let (ha, hb) = (norm(groups_a), norm(groups_b));
    if ha != hb {
        diffs.push(format!("hardlink groups differ: {ha:?} vs {hb:?}"));
    }
    diffs
}
