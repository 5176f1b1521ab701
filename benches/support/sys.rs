//! Processes, timing, load, cache drops, and everything a bench mounts or attaches — each
//! behind a guard that cleans up on drop, so a panic midway leaves no mount and no loop device
//! behind.
//!
//! Shared by the benchmarks (each loads it with `#[path = "support/sys.rs"]`).

#![allow(unsafe_code)] // system calls for the bench harness (processes, signals, caches)

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True if this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `/proc/loadavg` as the kernel prints it.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// The 1-, 5- and 15-minute load averages (NaN where unreadable).
pub fn load_average() -> [f64; 3] {
    let text = loadavg();
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
    for tool in tools {
        assert!(
            which(tool).is_some(),
            "the benchmark needs `{tool}` on PATH"
        );
    }
}

/// The first `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// `program args…` with stdin closed and output captured.
pub fn cmd<I, S>(program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(program);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// `sh -c SCRIPT`.
pub fn sh(script: &str) -> Command {
    cmd("sh", ["-c", script])
}

/// `bash -eo pipefail -c SCRIPT` (a failure anywhere in a pipeline fails the script).
pub fn bash(script: &str) -> Command {
    cmd("bash", ["-eo", "pipefail", "-c", script])
}

/// Runs `c` (the whole process: spawn + wait) and returns its wall time and output; panics
/// with the output if it fails.
pub fn timed(c: &mut Command) -> (Duration, Output) {
    let start = Instant::now();
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot start {c:?}: {e}"));
    let elapsed = start.elapsed();
    check(c, &out);
    (elapsed, out)
}

/// `CLOCK_MONOTONIC` in nanoseconds (what a probe process reads too; `Instant` hides it).
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Runs `c` untimed; panics if it fails.
pub fn run(c: &mut Command) -> Output {
    timed(c).1
}

/// Runs `c` untimed and parses its standard output as JSON; panics if it fails.
pub fn run_json(c: &mut Command) -> serde_json::Value {
    let out = run(c);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{c:?} printed no JSON ({e}): {}", tail(&out.stdout)))
}

fn check(c: &Command, out: &Output) {
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\n{}{}",
        out.status,
        tail(&out.stdout),
        tail(&out.stderr)
    );
}

/// The last 40 lines of a command's output.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n") + "\n"
}

/// `sync -f PATH`: flushes the filesystem holding `path` (untimed, between runs).
pub fn sync_fs(path: &Path) {
    run(&mut cmd("sync", [OsStr::new("-f"), path.as_os_str()]));
}

/// Writes back everything, then drops the page cache, dentries and inodes (a cold start).
pub fn drop_caches() {
    run(&mut cmd("sync", [] as [&str; 0]));
    fs::write("/proc/sys/vm/drop_caches", "3\n").expect("write /proc/sys/vm/drop_caches");
}

/// Removes `path` (a tree) if it exists.
pub fn remove_tree(path: &Path) {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", path.display()),
    }
}

/// True if something is mounted exactly at `path` (per `/proc/self/mountinfo`).
pub fn is_mount_point(path: &Path) -> bool {
    let target = path.to_string_lossy();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*target))
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

/// Lines of `/proc/self/mountinfo` that mention `marker`, each as `mount: LINE`.
pub fn mounts_mentioning(marker: &str) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(marker))
        .map(|l| format!("mount: {l}"))
        .collect()
}

/// Lines of `/proc/self/mountinfo` and `losetup -a` that mention `marker` (should be none once
/// the bench is done). Loop devices (with autoclear) are released asynchronously, so this
/// retries for a couple of seconds before reporting.
pub fn leftovers(marker: &Path) -> Vec<String> {
    let marker = marker.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for _ in 0..20 {
        found = mounts_mentioning(&marker);
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

/// Reads completed on a block device so far: (requests, sectors), from `/proc/diskstats`.
pub fn disk_reads(device: &str) -> (u64, u64) {
    fs::read_to_string("/proc/diskstats")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&device))
                .then(|| Some((f.get(3)?.parse().ok()?, f.get(5)?.parse().ok()?)))?
        })
        .unwrap_or((0, 0))
}

/// A journaled ext4 filesystem in a sparse image file `DIR/ext4.img`, attached to a loop
/// device with direct I/O and mounted at `DIR/mnt`: fresh ([`LoopExt4::create`]) or kept
/// across bench runs ([`LoopExt4::open_or_create`]). Dropping it unmounts (lazily if busy) and
/// detaches the loop device; the image file stays.
pub struct LoopExt4 {
    image: PathBuf,
    mountpoint: PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl LoopExt4 {
    fn at(dir: &Path) -> Self {
        Self {
            image: dir.join("ext4.img"),
            mountpoint: dir.join("mnt"),
            device: None,
            mounted: false,
        }
    }

    /// Creates `DIR/ext4.img` (`size` bytes, sparse, with a journal and inode tables
    /// initialised up front) and mounts it at `DIR/mnt`.
    pub fn create(dir: &Path, size: u64) -> Self {
        let mut fs = Self::at(dir);
        mkfs_ext4(&fs.image, size);
        fs.attach_and_mount();
        fs
    }

    /// Mounts `DIR/ext4.img` at `DIR/mnt`, creating the image (as [`LoopExt4::create`] does)
    /// if it does not exist. Leftovers of a run that was killed (a mount, a loop device) are
    /// removed first.
    pub fn open_or_create(dir: &Path, size: u64) -> Self {
        fs::create_dir_all(dir).expect("create the bench cache dir");
        let mut fs = Self::at(dir);
        fs.clear_leftovers();
        if !fs.image.exists() {
            println!(
                "  creating {} ({} GiB sparse, journaled ext4)",
                fs.image.display(),
                size >> 30
            );
            let tmp = dir.join("ext4.img.tmp");
            mkfs_ext4(&tmp, size);
            fs::rename(&tmp, &fs.image).expect("rename the new ext4 image");
        }
        fs.attach_and_mount();
        fs
    }

    /// Attaches the image to a loop device and mounts it.
    fn attach_and_mount(&mut self) {
        // Direct I/O to the backing file: without it every block is cached twice (ext4's
        // page cache and the image file's), cold runs are not cold, and after a few rounds of
        // 300 MiB writes the reclaim slows every later run down (measured: `cp -a` 0.7 → 1.5 s,
        // mkfs.erofs 0.8 → 2.7 s by the fourth round).
        let out = run(cmd("losetup", ["--find", "--show", "--direct-io=on"]).arg(&self.image));
        self.device = Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        fs::create_dir_all(&self.mountpoint).expect("create the ext4 mountpoint");
        run(cmd("mount", [self.device()]).arg(&self.mountpoint));
        self.mounted = true;
    }

    /// Unmounts a mount left at the mountpoint and detaches loop devices left on the image.
    fn clear_leftovers(&self) {
        if is_mount_point(&self.mountpoint) {
            println!(
                "  unmounting a leftover mount at {}",
                self.mountpoint.display()
            );
            let _ = cmd("umount", [OsStr::new("-l"), self.mountpoint.as_os_str()]).output();
        }
        if !self.image.exists() {
            return;
        }
        let out = run(cmd("losetup", ["-j"]).arg(&self.image));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((dev, _)) = line.split_once(':') {
                println!("  detaching leftover loop device {dev}");
                let _ = cmd("losetup", ["-d", dev]).output();
            }
        }
    }

    /// Where the filesystem is mounted.
    pub fn root(&self) -> &Path {
        &self.mountpoint
    }

    /// The loop device.
    pub fn device(&self) -> &str {
        self.device.as_deref().unwrap_or("?")
    }

    /// The loop device's name in `/proc/diskstats` (`loop3`).
    pub fn device_name(&self) -> &str {
        self.device().trim_start_matches("/dev/")
    }

    /// True if `dumpe2fs` lists `has_journal` among the filesystem's features.
    pub fn has_journal(&self) -> bool {
        let out = run(cmd("dumpe2fs", ["-h"]).arg(self.device()));
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
            let _ = cmd("umount", [OsStr::new("-l"), self.mountpoint.as_os_str()]).output();
        }
        if let Some(dev) = self.device.take() {
            // On a still-busy device (lazy unmount) this sets autoclear instead.
            let _ = cmd("losetup", ["-d", &dev]).output();
        }
    }
}

/// `mkfs.ext4` of a new sparse `size`-byte image file at `image`, with a journal and with inode
/// tables initialised up front (no lazy-init writes in the background while timing).
fn mkfs_ext4(image: &Path, size: u64) {
    File::create(image)
        .and_then(|f| f.set_len(size))
        .expect("create the sparse ext4 image file");
    run(cmd("mkfs.ext4", ["-q", "-F", "-O", "has_journal"])
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(image));
}

/// How a mount made by the bench is undone.
#[derive(Debug, Clone)]
pub enum Unmount {
    /// `velo --store STORE -q umount TARGET` (also removes a `--cow` upper dir).
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
    /// Guards the mount just made (or about to be made) at `target`.
    pub fn new(target: &Path, how: Unmount) -> Self {
        Self {
            target: target.to_owned(),
            how,
            active: true,
        }
    }

    /// `velo --store STORE -q mount IMAGE TARGET --cow` (untimed), guarded.
    pub fn velo_cow(velo: &Path, store: &Path, image: &str, target: &Path) -> Self {
        let guard = Self::new(
            target,
            Unmount::Velo {
                velo: velo.to_owned(),
                store: store.to_owned(),
            },
        );
        run(cmd(velo, [OsStr::new("--store"), store.as_os_str()])
            .args(["-q", "mount", image])
            .arg(target)
            .arg("--cow"));
        guard
    }

    /// Unmounts, panicking on failure.
    pub fn release(mut self) {
        match &self.how {
            Unmount::Velo { velo, store } => {
                run(cmd(velo, [OsStr::new("--store"), store.as_os_str()])
                    .args(["-q", "umount"])
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
            let _ = cmd("umount", [OsStr::new("-l"), self.target.as_os_str()]).output();
        }
    }
}

/// Prints whether anything the bench mounted or attached under `marker` is left behind.
pub fn print_leftovers(marker: &Path) {
    let left = leftovers(marker);
    if left.is_empty() {
        println!(
            "\ncleanup: OK (no mounts or loop devices under {} remain)",
            marker.display()
        );
    } else {
        println!("\ncleanup: LEFTOVERS under {}:", marker.display());
        for l in left {
            println!("  {l}");
        }
    }
}
