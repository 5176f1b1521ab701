//! The core benchmark: `cargo bench --bench core` (root only).
//!
//! Builds a synthetic tree shaped like a big `node_modules` (≈ 40k files in 1500 package dirs,
//! lognormal sizes, 30% duplicate files; fixed seed, so the same tree every run) on a fresh
//! journaled ext4 loop filesystem, then prints medians (with min/max) of:
//!
//! * `velo snapshot`, cold (fresh store each run, including velo's own `syncfs`) and an
//!   unchanged re-run into the same store (the stat cache should hash nothing);
//! * `cp -a` (alone, and followed by `sync -f` timed together), `cp -al`, `mkfs.erofs`;
//! * `velo mount` read-only and `--cow`, against a bare `mount -t erofs -o ro IMAGE DIR` of
//!   velo's own image of the same tree — all as whole processes (spawn + wait);
//!
//! and the ratios the project targets (with PASS/MISS), plus the dedup ratio. It measures and
//! prints; it never fails on timing.
//!
//! Hygiene: the machine's load is printed (with a warning above 0.5); every write goes to a
//! fresh path on a journaled ext4 image (an ext4 without a journal avoids reusing recently
//! freed inodes, so delete-and-recreate benchmarks there slow down run after run); the page
//! cache stays warm (no cache drops) and an untimed `sync -f` separates the runs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

// Shared with the other benchmarks; not every helper is used here.
#[allow(dead_code)]
#[path = "support/stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "support/sys.rs"]
mod sys;
#[path = "support/tree.rs"]
mod tree;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use stats::{Ratio, Series, bytes, human};
use sys::{MountGuard, Unmount, cmd, timed};
use tree::{TreeSpec, TreeStats};

/// Runs of the heavy write operations (snapshot, cp, mkfs.erofs).
const HEAVY_RUNS: usize = 5;
/// Runs of `cp -al`.
const LINK_RUNS: usize = 5;
/// Timed runs of each mount command, after [`MOUNT_WARMUP`] untimed ones.
const MOUNT_RUNS: usize = 25;
const MOUNT_WARMUP: usize = 3;
/// Size of the sparse ext4 image the writes go to.
const EXT4_BYTES: u64 = 8 << 30;
/// `velo mount` may take at most this many times a bare `mount -t erofs`.
const MOUNT_TARGET: f64 = 3.0;
/// A cold snapshot may take at most this many times `cp -a` + `sync`.
const SNAPSHOT_TARGET: f64 = 1.0;
/// Above this 1-minute load the figures are suspect.
const LOAD_WARN: f64 = 0.5;
/// The ref every snapshot writes.
const REF: &str = "bench/node_modules";

fn main() {
    if !sys::is_root() {
        println!("SKIPPED: needs root");
        return;
    }
    let started = Instant::now();
    sys::require_tools(&[
        "mkfs.ext4",
        "dumpe2fs",
        "losetup",
        "mount",
        "umount",
        "mkfs.erofs",
        "cp",
        "sync",
        "true",
    ]);
    print_machine();
    let work = tempfile::Builder::new()
        .prefix("velo-bench-")
        .tempdir_in("/var/tmp")
        .expect("create a temp dir under /var/tmp");
    let marker = work.path().to_owned();
    let ext4 = sys::LoopExt4::create(work.path(), EXT4_BYTES);
    print_hygiene(&ext4);

    let bench = Bench::new(ext4.root());
    let tree = bench.make_tree();
    let writes = bench.write_phase();
    let mounts = bench.mount_phase(&writes.store, &writes.cold_info[0].digest);
    let store = StoreUsage::of(&writes.store);
    report(&tree, &writes, &mounts, &store);

    ext4.close();
    drop(work);
    print_cleanup(&marker);
    println!(
        "\ntotal bench time: {}",
        human(started.elapsed().as_secs_f64())
    );
}

/// Load, kernel, CPUs — printed first so a busy machine is obvious.
fn print_machine() {
    let [l1, l5, l15] = sys::load_average();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("velo core benchmark");
    println!(
        "  machine: Linux {}, {cpus} CPUs, load average {l1:.2} {l5:.2} {l15:.2} (1/5/15 min)",
        sys::kernel_release()
    );
    if l1 > LOAD_WARN {
        println!(
            "  WARNING: 1-minute load {l1:.2} > {LOAD_WARN}: something else is running; \
             figures will be noisy"
        );
    }
}

/// Where the writes go and how runs are kept comparable.
fn print_hygiene(ext4: &sys::LoopExt4) {
    println!(
        "  writes: journaled ext4 (has_journal: {}) on {} ({} sparse image, direct-I/O loop), \
         mounted at {}",
        if ext4.has_journal() { "yes" } else { "NO" },
        ext4.device(),
        bytes(EXT4_BYTES),
        ext4.root().display()
    );
    println!("  every write run uses a fresh path; an untimed `sync -f` separates runs");
    println!("  cache: warm (no drop_caches); each timing is a whole process (spawn + wait)");
}

/// Paths and binaries every phase uses.
struct Bench {
    velo: PathBuf,
    root: PathBuf,
    tree: PathBuf,
}

/// What `velo snapshot --json` reported (the fields the bench prints).
#[derive(Debug, Clone)]
struct SnapInfo {
    digest: String,
    files: u64,
    bytes: u64,
    inline_files: u64,
    new_objects: u64,
    reused_objects: u64,
    stat_cache_hits: u64,
    image_bytes: u64,
}

impl SnapInfo {
    fn parse(out: &Output) -> Self {
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("velo snapshot --json prints JSON");
        let n = |k: &str| {
            v[k].as_u64()
                .unwrap_or_else(|| panic!("velo snapshot --json lacks a number `{k}`: {v}"))
        };
        Self {
            digest: v["digest"]
                .as_str()
                .expect("velo snapshot --json has a digest")
                .to_owned(),
            files: n("files"),
            bytes: n("bytes"),
            inline_files: n("inline_files"),
            new_objects: n("new_objects"),
            reused_objects: n("reused_objects"),
            stat_cache_hits: n("stat_cache_hits"),
            image_bytes: n("image_bytes"),
        }
    }
}

/// Timings and reports of the write phase.
struct WriteResults {
    cold: Series,
    rerun: Series,
    cp: Series,
    cp_sync: Series,
    cp_link: Series,
    mkfs: Series,
    cold_info: Vec<SnapInfo>,
    rerun_info: Vec<SnapInfo>,
    /// The store of the first cold run (mounted in the mount phase).
    store: PathBuf,
}

/// Timings of the mount phase.
struct MountResults {
    erofs: Series,
    ro: Series,
    cow: Series,
    spawn: Series,
    /// What `mount -t erofs` mounted from (a loop device or the file itself).
    erofs_source: String,
}

impl Bench {
    fn new(root: &Path) -> Self {
        Self {
            velo: PathBuf::from(env!("CARGO_BIN_EXE_velo")),
            root: root.to_owned(),
            tree: root.join("src/node_modules"),
        }
    }

    /// A path under `kind/` that no run has used (the parent is created, untimed).
    fn fresh(&self, kind: &str, run: usize) -> PathBuf {
        let dir = self.root.join(kind);
        fs::create_dir_all(&dir).expect("create a bench directory on the ext4 image");
        dir.join(run.to_string())
    }

    /// `velo --store STORE`.
    fn velo(&self, store: &Path) -> Command {
        let mut c = cmd(&self.velo, ["--store".as_ref(), store.as_os_str()]);
        c.env_remove("VELO_STORE");
        c
    }

    /// Generates the tree (untimed for the figures, but its time is printed) and flushes it.
    fn make_tree(&self) -> TreeStats {
        let spec = TreeSpec::node_modules();
        fs::create_dir_all(self.root.join("src")).expect("create the source dir");
        let start = Instant::now();
        let t = tree::generate(&spec, &self.tree);
        sys::sync_fs(&self.tree);
        println!(
            "\ntree: {} files ({}), {} package dirs, {} dirs, {} symlinks, {} duplicate files \
             ({:.1}%); seed {:#x}; generated in {}",
            t.files,
            bytes(t.bytes),
            t.packages,
            t.dirs,
            t.symlinks,
            t.duplicate_files,
            100.0 * t.duplicate_files as f64 / t.files as f64,
            spec.seed,
            human(start.elapsed().as_secs_f64())
        );
        t
    }

    /// Snapshots (cold, re-run), `cp -a` (+ sync), `mkfs.erofs`, then `cp -al`; interleaved
    /// per round so that every operation sees the same conditions.
    fn write_phase(&self) -> WriteResults {
        let mut w = WriteResults {
            cold: Series::new("velo snapshot, cold (fresh store, incl. syncfs)"),
            rerun: Series::new("velo snapshot, unchanged re-run (same store)"),
            cp: Series::new("cp -a"),
            cp_sync: Series::new("cp -a + sync -f"),
            cp_link: Series::new("cp -al"),
            mkfs: Series::new("mkfs.erofs IMG TREE (full image, no sync)"),
            cold_info: Vec::new(),
            rerun_info: Vec::new(),
            store: PathBuf::new(),
        };
        println!(
            "\nwrite phase: {HEAVY_RUNS} rounds of snapshot/cp/mkfs.erofs, {LINK_RUNS} of cp -al …"
        );
        for run in 0..HEAVY_RUNS {
            let store = self.fresh("stores", run);
            let (d, info) = self.snapshot(&store);
            w.cold.push(d);
            w.cold_info.push(info);
            let (d, info) = self.snapshot(&store);
            w.rerun.push(d);
            w.rerun_info.push(info);
            if run == 0 {
                w.store = store;
            }
            let (copy, flush) = self.copy(&self.fresh("cp-a", run));
            w.cp.push(copy);
            w.cp_sync.push(copy + flush);
            w.mkfs.push(self.mkfs_erofs(&self.fresh("erofs", run)));
        }
        for run in 0..LINK_RUNS {
            let dst = self.fresh("cp-al", run);
            w.cp_link
                .push(timed(cmd("cp", ["-al".as_ref(), self.tree.as_os_str()]).arg(&dst)).0);
            sys::sync_fs(&self.root);
        }
        w
    }

    /// One `velo snapshot --json TREE --ref REF` into `store`.
    fn snapshot(&self, store: &Path) -> (Duration, SnapInfo) {
        let (d, out) = timed(
            self.velo(store)
                .args(["--json", "snapshot"])
                .arg(&self.tree)
                .args(["--ref", REF]),
        );
        sys::sync_fs(&self.root);
        (d, SnapInfo::parse(&out))
    }

    /// `cp -a TREE DST`, then `sync -f DST`: both timings.
    fn copy(&self, dst: &Path) -> (Duration, Duration) {
        let (copy, _) = timed(cmd("cp", ["-a".as_ref(), self.tree.as_os_str()]).arg(dst));
        let (flush, _) = timed(&mut cmd("sync", ["-f".as_ref(), dst.as_os_str()]));
        (copy, flush)
    }

    /// `mkfs.erofs --quiet IMG TREE`, then an untimed sync.
    fn mkfs_erofs(&self, image: &Path) -> Duration {
        let (d, _) =
            timed(cmd("mkfs.erofs", ["--quiet".as_ref(), image.as_os_str()]).arg(&self.tree));
        sys::sync_fs(&self.root);
        d
    }

    /// Bare `mount -t erofs` of velo's image, `velo mount` ro and `--cow`, and `true`
    /// (the process start-up floor), interleaved; each mount is undone untimed.
    fn mount_phase(&self, store: &Path, digest: &str) -> MountResults {
        let image = store.join("images").join(digest);
        let target = |name: &str| {
            let t = self.root.join("targets").join(name);
            fs::create_dir_all(&t).expect("create a mount target");
            t
        };
        let (t_erofs, t_ro, t_cow) = (target("erofs"), target("ro"), target("cow"));
        let velo_umount = Unmount::Velo {
            velo: self.velo.clone(),
            store: store.to_owned(),
        };
        let mut m = MountResults {
            erofs: Series::new("mount -t erofs -o ro IMAGE DIR (bare, velo's image)"),
            ro: Series::new("velo mount (read-only)"),
            cow: Series::new("velo mount --cow"),
            spawn: Series::new("true (process start-up floor)"),
            erofs_source: String::new(),
        };
        println!("mount phase: {MOUNT_WARMUP} warm-up + {MOUNT_RUNS} timed runs of each mount …");
        for run in 0..MOUNT_WARMUP + MOUNT_RUNS {
            let mut bare = cmd("mount", ["-t", "erofs", "-o", "ro"]);
            bare.arg(&image).arg(&t_erofs);
            let (d_erofs, source) = mount_once(&mut bare, &t_erofs, Unmount::Plain);
            let mut ro = self.velo(store);
            ro.args(["mount", REF]).arg(&t_ro);
            let (d_ro, _) = mount_once(&mut ro, &t_ro, velo_umount.clone());
            let mut cow = self.velo(store);
            cow.args(["mount", "--cow", REF]).arg(&t_cow);
            let (d_cow, _) = mount_once(&mut cow, &t_cow, velo_umount.clone());
            let (d_true, _) = timed(&mut cmd("true", [] as [&str; 0]));
            if run >= MOUNT_WARMUP {
                m.erofs.push(d_erofs);
                m.ro.push(d_ro);
                m.cow.push(d_cow);
                m.spawn.push(d_true);
            } else {
                m.erofs_source = source.unwrap_or_else(|| "?".to_owned());
            }
        }
        m
    }
}

/// Runs a mount command (timed), then unmounts (untimed). The guard exists before the mount
/// so that a failure halfway still unmounts. Returns the time and the mount's source.
fn mount_once(c: &mut Command, target: &Path, how: Unmount) -> (Duration, Option<String>) {
    let guard = MountGuard::new(target, how);
    let (d, _) = timed(c);
    let source = sys::mount_source(target);
    guard.release();
    (d, source)
}

/// Objects in a store: how many, and their bytes.
struct StoreUsage {
    objects: u64,
    bytes: u64,
}

impl StoreUsage {
    fn of(store: &Path) -> Self {
        let mut u = Self {
            objects: 0,
            bytes: 0,
        };
        u.add_dir(&store.join("objects"));
        u
    }

    fn add_dir(&mut self, dir: &Path) {
        let entries =
            fs::read_dir(dir).unwrap_or_else(|e| panic!("read store dir {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.expect("read a store dir entry");
            let meta = entry.metadata().expect("stat a store entry");
            if meta.is_dir() {
                self.add_dir(&entry.path());
            } else if meta.is_file() {
                self.objects += 1;
                self.bytes += meta.len();
            }
        }
    }
}

/// Prints the snapshot details, the table and the ratios.
fn report(tree: &TreeStats, w: &WriteResults, m: &MountResults, store: &StoreUsage) {
    print_snapshot_details(w);
    println!("\nmedians (warm cache; whole processes):");
    stats::print_table(&[
        &w.cold, &w.rerun, &w.cp, &w.cp_sync, &w.cp_link, &w.mkfs, &m.erofs, &m.ro, &m.cow,
        &m.spawn,
    ]);
    let how = if m.erofs_source.starts_with("/dev/loop") {
        "a loop device mount(8) set up over the image file (autoclear)"
    } else {
        "the image file itself (file-backed EROFS)"
    };
    println!(
        "  bare `mount -t erofs` mounted from {}: {how}",
        m.erofs_source
    );
    println!("\nratios of medians:");
    stats::print_ratios(&ratios(w, m));
    print_dedup(tree, w, store);
}

fn print_snapshot_details(w: &WriteResults) {
    let cold = &w.cold_info[0];
    let rerun = &w.rerun_info[0];
    let same = w
        .cold_info
        .iter()
        .chain(&w.rerun_info)
        .all(|i| i.digest == cold.digest);
    println!("\nimage digest: {}", cold.digest);
    println!(
        "  every snapshot gave this digest: {}; image size {}",
        if same { "yes" } else { "NO" },
        bytes(cold.image_bytes)
    );
    println!(
        "  cold: {} files, {} new objects, {} reused, {} inline; re-run: {} of {} files from the \
         stat cache, {} new objects",
        cold.files,
        cold.new_objects,
        cold.reused_objects,
        cold.inline_files,
        rerun.stat_cache_hits,
        rerun.files,
        rerun.new_objects
    );
}

fn ratios(w: &WriteResults, m: &MountResults) -> Vec<Ratio> {
    let (ro, cow) = (m.ro.median(), m.cow.median());
    vec![
        Ratio::target(
            "velo mount ro / mount -t erofs",
            ro,
            m.erofs.median(),
            MOUNT_TARGET,
        ),
        Ratio::target(
            "velo mount --cow / mount -t erofs",
            cow,
            m.erofs.median(),
            MOUNT_TARGET,
        ),
        Ratio::target(
            "velo snapshot cold (incl. syncfs) / (cp -a + sync)",
            w.cold.median(),
            w.cp_sync.median(),
            SNAPSHOT_TARGET,
        ),
        Ratio::info(
            "velo snapshot unchanged re-run / cold",
            w.rerun.median(),
            w.cold.median(),
            "lower is better",
        ),
        Ratio::info(
            "velo snapshot cold / mkfs.erofs",
            w.cold.median(),
            w.mkfs.median(),
            "reference",
        ),
        Ratio::info(
            "cp -a / velo mount ro",
            w.cp.median(),
            ro,
            "× faster in place",
        ),
        Ratio::info(
            "cp -a / velo mount --cow",
            w.cp.median(),
            cow,
            "× faster in place",
        ),
        Ratio::info(
            "cp -al / velo mount ro",
            w.cp_link.median(),
            ro,
            "× faster in place",
        ),
        Ratio::info(
            "cp -al / velo mount --cow",
            w.cp_link.median(),
            cow,
            "× faster in place",
        ),
    ]
}

fn print_dedup(tree: &TreeStats, w: &WriteResults, store: &StoreUsage) {
    let cold = &w.cold_info[0];
    println!(
        "\ndedup: {} logical in {} files → {} in {} objects (+ {} files inline in the image)",
        bytes(cold.bytes),
        cold.files,
        bytes(store.bytes),
        store.objects,
        cold.inline_files
    );
    println!(
        "  ratio {:.3}× by bytes (logical / stored object bytes), {:.3} files per object; \
         the generator made {} distinct non-inline contents ({})",
        cold.bytes as f64 / store.bytes as f64,
        cold.files as f64 / store.objects as f64,
        tree.object_contents,
        bytes(tree.object_bytes)
    );
}

/// Checks that nothing the bench mounted or attached is left, and prints the final load.
fn print_cleanup(marker: &Path) {
    sys::print_leftovers(marker);
    let [l1, l5, l15] = sys::load_average();
    println!("load average at the end: {l1:.2} {l5:.2} {l15:.2}");
}
