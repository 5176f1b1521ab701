//! Processes, timing, and everything the bench mounts or attaches — each behind a guard that
//! cleans up on drop, so a panic midway leaves no mount and no loop device behind.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True if this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The 1-, 5- and 15-minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = fs::read_to_string("/proc/loadavg").expect("read /proc/loadavg");
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse::<f64>().unwrap_or(f64::NAN));
    [(); 3].map(|()| fields.next().unwrap_or(f64::NAN))
}

/// The running kernel's release string.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Panics with a clear message if a program the bench needs is not on `PATH`.
pub fn require_tools(tools: &[&str]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        let found = std::env::split_paths(&path).any(|dir| dir.join(tool).is_file());
        assert!(found, "the benchmark needs `{tool}` on PATH");
    }
}

/// `program args…` with stdin closed and output captured.
pub fn cmd<I, S>(program: impl AsRef<std::ffi::OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(program);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `c` (the whole process: spawn + wait) and returns its wall time; panics if it fails.
pub fn timed(c: &mut Command) -> (Duration, Output) {
    let start = Instant::now();
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot start {c:?}: {e}"));
    let elapsed = start.elapsed();
    check(c, &out);
    (elapsed, out)
}

/// Runs `c` untimed; panics if it fails.
pub fn run(c: &mut Command) -> Output {
    timed(c).1
}

fn check(c: &Command, out: &Output) {
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sync -f PATH`: flushes the filesystem holding `path` (untimed, between runs).
pub fn sync_fs(path: &Path) {
    run(&mut cmd("sync", [Path::new("-f"), path]));
}

/// The mount source of the mount at `target`, from `/proc/self/mountinfo`.
pub fn mount_source(target: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let target = target.to_str()?;
    info.lines().rev().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        (pre.split(' ').nth(4)? == target).then(|| post.split(' ').nth(1).map(str::to_owned))?
    })
}

/// Lines of `/proc/self/mountinfo` and `losetup -a` that mention `marker` (should be none
/// once the bench is done). Loop devices with autoclear are released asynchronously, so
/// this retries for a couple of seconds before reporting.
pub fn leftovers(marker: &Path) -> Vec<String> {
    let marker = marker.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for _ in 0..20 {
        found = mentions("/proc/self/mountinfo", &marker);
        let losetup = cmd("losetup", ["-a"]).output().expect("run losetup -a");
        found.extend(
            String::from_utf8_lossy(&losetup.stdout)
                .lines()
                .filter(|l| l.contains(&marker))
                .map(|l| format!("loop: {l}")),
        );
        if found.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    found
}

fn mentions(file: &str, marker: &str) -> Vec<String> {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(marker))
        .map(|l| format!("mount: {l}"))
        .collect()
}

/// A journaled ext4 filesystem in a sparse image file, attached to a loop device (direct I/O)
/// and mounted.
/// Dropping it unmounts (lazily if busy) and detaches the loop device.
pub struct LoopExt4 {
    image: PathBuf,
    mountpoint: PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl LoopExt4 {
    /// Creates `DIR/ext4.img` (`size` bytes, sparse), `mkfs.ext4` with a journal and with inode
    /// tables initialised up front (no lazy-init writes in the background while timing), and
    /// mounts it at `DIR/mnt`.
    pub fn create(dir: &Path, size: u64) -> Self {
        let mut fs = Self {
            image: dir.join("ext4.img"),
            mountpoint: dir.join("mnt"),
            device: None,
            mounted: false,
        };
        File::create(&fs.image)
            .and_then(|f| f.set_len(size))
            .expect("create the sparse ext4 image file");
        run(cmd("mkfs.ext4", ["-q", "-F", "-O", "has_journal"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&fs.image));
        // Direct I/O to the backing file: without it every block is cached twice (ext4's
        // page cache and the image file's), and after a few rounds of 300 MiB writes the
        // reclaim slows every later run down (measured: `cp -a` 0.7 → 1.5 s, mkfs.erofs
        // 0.8 → 2.7 s by the fourth round).
        let out = run(cmd("losetup", ["--find", "--show", "--direct-io=on"]).arg(&fs.image));
        fs.device = Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        fs::create_dir(&fs.mountpoint).expect("create the ext4 mountpoint");
        run(cmd("mount", [fs.device()]).arg(&fs.mountpoint));
        fs.mounted = true;
        fs
    }

    /// Where the filesystem is mounted.
    pub fn root(&self) -> &Path {
        &self.mountpoint
    }

    /// The loop device.
    pub fn device(&self) -> &str {
        self.device.as_deref().unwrap_or("?")
    }

    /// True if `dumpe2fs` lists `has_journal` among the filesystem's features.
    pub fn has_journal(&self) -> bool {
        let out = run(cmd("dumpe2fs", ["-h"]).arg(&self.image));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("Filesystem features:") && l.contains("has_journal"))
    }

    /// Unmounts and detaches now, panicking on failure (the normal, checked path).
    pub fn close(mut self) {
        if self.mounted {
            run(&mut cmd("umount", [&self.mountpoint]));
            self.mounted = false;
        }
        if let Some(dev) = self.device.take() {
            run(&mut cmd("losetup", ["-d", &dev]));
        }
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        if self.mounted {
            let _ = cmd("umount", [Path::new("-l"), &self.mountpoint]).output();
        }
        if let Some(dev) = self.device.take() {
            // On a still-busy device (lazy unmount) this sets autoclear instead.
            let _ = cmd("losetup", ["-d", &dev]).output();
        }
    }
}

/// How a mount made by the bench is undone.
#[derive(Debug, Clone)]
pub enum Unmount {
    /// `velo --store STORE umount TARGET` (also removes a `--cow` upper dir).
    Velo { velo: PathBuf, store: PathBuf },
    /// `umount TARGET` (a loop device set up by `mount` is autocleared).
    Plain,
}

/// A mount at `target`; [`MountGuard::release`] unmounts it the proper way (untimed), and
/// dropping an unreleased guard falls back to `umount -l`.
pub struct MountGuard {
    target: PathBuf,
    how: Unmount,
    active: bool,
}

impl MountGuard {
    /// Guards the mount just made at `target`.
    pub fn new(target: &Path, how: Unmount) -> Self {
        Self {
            target: target.to_owned(),
            how,
            active: true,
        }
    }

    /// Unmounts, panicking on failure.
    pub fn release(mut self) {
        match &self.how {
            Unmount::Velo { velo, store } => {
                run(cmd(velo, [Path::new("--store"), store, Path::new("-q")])
                    .arg("umount")
                    .arg(&self.target));
            }
            Unmount::Plain => {
                run(&mut cmd("umount", [&self.target]));
            }
        }
        self.active = false;
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.active {
            let _ = cmd("umount", [Path::new("-l"), &self.target]).output();
        }
    }
}
