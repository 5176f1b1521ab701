//! Processes, timing, cache drops, and everything the bench mounts or attaches — each behind a
//! guard that cleans up on drop, so a panic midway leaves no mount and no loop device behind.

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

/// The 1-minute load average (NaN if unreadable).
pub fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .unwrap_or(f64::NAN)
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

/// Runs `c` untimed; panics if it fails.
pub fn run(c: &mut Command) -> Output {
    timed(c).1
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

/// Lines of `/proc/self/mountinfo` and `losetup -a` that mention `marker` (should be none once
/// the bench is done). Loop devices are released asynchronously, so this retries for a couple
/// of seconds before reporting.
pub fn leftovers(marker: &Path) -> Vec<String> {
    let marker = marker.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for _ in 0..20 {
        found = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&marker))
            .map(|l| format!("mount: {l}"))
            .collect();
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

/// A journaled ext4 filesystem in a sparse image file that persists across bench runs (it
/// holds the caches, the store and the installed trees), attached to a loop device with direct
/// I/O and mounted. Dropping it unmounts (lazily if busy) and detaches the loop device; the
/// image file stays.
pub struct Ext4Image {
    image: PathBuf,
    mountpoint: PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl Ext4Image {
    /// Mounts `DIR/ext4.img` at `DIR/mnt`, creating the image (`size` bytes, sparse, with a
    /// journal and inode tables initialised up front) if it does not exist. Leftovers of a run
    /// that was killed (a mount, a loop device) are removed first.
    pub fn open_or_create(dir: &Path, size: u64) -> Self {
        fs::create_dir_all(dir).expect("create the bench cache dir");
        let mut fs = Self {
            image: dir.join("ext4.img"),
            mountpoint: dir.join("mnt"),
            device: None,
            mounted: false,
        };
        fs.clear_leftovers();
        if !fs.image.exists() {
            println!(
                "  creating {} ({} GiB sparse, journaled ext4)",
                fs.image.display(),
                size >> 30
            );
            let tmp = dir.join("ext4.img.tmp");
            File::create(&tmp)
                .and_then(|f| f.set_len(size))
                .expect("create the sparse ext4 image file");
            run(cmd("mkfs.ext4", ["-q", "-F", "-O", "has_journal"])
                .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&tmp));
            fs::rename(&tmp, &fs.image).expect("rename the new ext4 image");
        }
        // Direct I/O to the backing file: without it every block would be cached twice (the
        // ext4's page cache and the image file's), and cold runs would not be cold.
        let out = run(cmd("losetup", ["--find", "--show", "--direct-io=on"]).arg(&fs.image));
        fs.device = Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        fs::create_dir_all(&fs.mountpoint).expect("create the ext4 mountpoint");
        run(cmd("mount", [fs.device()]).arg(&fs.mountpoint));
        fs.mounted = true;
        fs
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

impl Drop for Ext4Image {
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

/// A `velo mount` the bench made; [`VeloMount::release`] unmounts it with `velo umount`
/// (which also removes its copy-on-write upper dir), and dropping an unreleased guard falls
/// back to `umount -l`.
pub struct VeloMount {
    velo: PathBuf,
    store: PathBuf,
    target: PathBuf,
    active: bool,
}

impl VeloMount {
    /// `velo --store STORE mount IMAGE TARGET --cow`.
    pub fn cow(velo: &Path, store: &Path, image: &str, target: &Path) -> Self {
        run(cmd(velo, [OsStr::new("--store"), store.as_os_str()])
            .args(["-q", "mount", image])
            .arg(target)
            .arg("--cow"));
        Self {
            velo: velo.to_owned(),
            store: store.to_owned(),
            target: target.to_owned(),
            active: true,
        }
    }

    /// Unmounts, panicking on failure.
    pub fn release(mut self) {
        run(
            cmd(&self.velo, [OsStr::new("--store"), self.store.as_os_str()])
                .args(["-q", "umount"])
                .arg(&self.target),
        );
        self.active = false;
    }
}

impl Drop for VeloMount {
    fn drop(&mut self) {
        if self.active {
            let _ = cmd("umount", [OsStr::new("-l"), self.target.as_os_str()]).output();
        }
    }
}
