//! The `velo run` benchmark: `cargo bench --bench run` (root only; the first run installs and
//! caches everything and takes several minutes, later runs about ten).
//!
//! Workloads: `../shared/workloads/node` (a real ~1,300-package lockfile) and
//! `../shared/workloads/python` (numpy, pandas, scipy, jupyterlab, pyarrow, …; locked with uv
//! into a uv project). Everything — pnpm and uv, the npm cache, the pnpm store, the uv cache,
//! the velo store, the installed trees — is cached under `target/bench-cache/`, the data on a
//! journaled ext4 image (`target/bench-cache/run/ext4.img`) that is mounted for the run.
//!
//! It prints medians (with min/max and run counts) of:
//!
//! * (a) getting the tree in place: `velo run true` with the image built, against
//!   `npm ci --offline` (warm cache), `pnpm install --offline --frozen-lockfile` (warm store)
//!   and `cp -al` for node, and `uv sync --frozen` (warm cache) for Python, with the ratio to
//!   the fastest peer held to the 100× target;
//! * (b) tree in place + first import done: `velo run node -e "require(…)"` and
//!   `velo run .venv/bin/python -c "import …"` against the same on the tree on local disk;
//! * (c) the imports alone (timed inside the process) on the mount against local disk, warm
//!   (many runs) and cold (`sync; echo 3 > /proc/sys/vm/drop_caches` before every run, both
//!   sides), held to the 5% target — through `velo run` (the overlay velo-mountd lends,
//!   lent again to the next run when it comes back untouched, as users get it; the figures
//!   print how many runs got one back) and through one `velo mount`
//!   kept for all runs (the steady state);
//! * (d) as an ordinary user (a throwaway one, `velo-bench-<pid>`), against root through the
//!   same velo-mountd: warm `velo run true` (at most 1 ms more), the imports of (c) warm
//!   (unchanged), and a cold build of the node tree as the user (install + snapshot + import)
//!   against `npm ci --offline` alone (at most 1.2×).
//!
//! Root's `velo run` goes through one velo-mountd the bench starts for its store
//! (`VELO_SOCKET`), as it would on a machine that runs the service; the service is stopped
//! before the ext4 is unmounted.
//!
//! * (e) access profiles: a cold `velo run` of the imports whose image has a profile (the files
//!   it reads first, read ahead by velo-mountd) against native cold (at most 0.8×), the same
//!   with no profile yet (recorded), with none (as before profiles) and with another command's
//!   profile (not measurably slower), warm (within 3%), the read-ahead's memory (at most the
//!   profile's bytes + 10%), and `velo run true` against `unshare -m true` (at most 2×).
//!
//! `VELO_BENCH_ONLY=d` (any of `abcde`) runs only those sections. It measures and prints; it
//! never fails on timing. Every mount and loop device it makes, the
//! service and the user are behind guards that undo them on drop, and the end checks that no
//! mount or loop device is left.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "run/as_user.rs"]
mod as_user;
#[path = "run/import.rs"]
mod import;
#[path = "run/mountd.rs"]
mod mountd;
#[path = "run/profiles.rs"]
mod profiles;
#[path = "run/setup.rs"]
mod setup;
// Shared with the other benchmarks; not every helper is used here.
#[allow(dead_code)]
#[path = "support/stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "support/sys.rs"]
mod sys;

use std::path::{Path, PathBuf};
use std::time::Instant;

use import::{Lang, Sample, Side};
use mountd::{BenchUser, Mountd};
use setup::{Env, Tree};
use stats::{Series, Verdict, human, print_table, print_verdicts};
use sys::{LoopExt4, MountGuard, cmd, drop_caches, remove_tree, run, sync_fs, timed};

/// Size of the sparse ext4 image (it holds caches, store and trees: ~10 GiB used).
const EXT4_BYTES: u64 = 40 << 30;
/// `velo run` must get the tree in place this many times faster than the fastest peer.
const SPEEDUP_TARGET: f64 = 100.0;
/// Imports on the mount may take at most this many percent longer than on local disk.
const IMPORT_TARGET_PCT: f64 = 5.0;
/// Above this 1-minute load the figures are suspect.
const LOAD_WARN: f64 = 0.5;

/// How many timed runs each measurement gets (after its untimed warm-up runs).
struct Runs {
    velo_true: usize,
    npm: usize,
    pnpm: usize,
    cp: usize,
    uv: usize,
    first_import: [usize; 2],
    warm: [usize; 2],
    cold: [usize; 2],
    user_cold: usize,
}

impl Runs {
    /// The defaults, or a third of them (at least 3) with `VELO_BENCH_QUICK=1`.
    fn get() -> Self {
        let quick = std::env::var_os("VELO_BENCH_QUICK").is_some_and(|v| v != "0");
        let n = |full: usize| if quick { (full / 3).max(3) } else { full };
        Self {
            velo_true: n(31),
            npm: n(3),
            pnpm: n(5),
            cp: n(5),
            uv: n(9),
            first_import: [n(11), n(7)],
            warm: [n(21), n(11)],
            cold: [n(7), n(5)],
            user_cold: n(5),
        }
    }

    /// Index of `lang` in the per-language arrays.
    fn of(lang: Lang) -> usize {
        match lang {
            Lang::Node => 0,
            Lang::Python => 1,
        }
    }
}

fn main() {
    if !sys::is_root() {
        println!("SKIPPED: the run benchmark needs root (velo run mounts)");
        return;
    }
    let started = Instant::now();
    print_machine();
    sys::require_tools(&[
        "node",
        "npm",
        "python3",
        "mkfs.ext4",
        "losetup",
        "dumpe2fs",
        "cp",
        "sync",
        "cc",
        "useradd",
        "userdel",
        "getfacl",
        "setfacl",
    ]);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = manifest.join("target/bench-cache");
    let workloads = std::env::var_os("VELO_BENCH_WORKLOADS")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../shared/workloads"));
    println!(
        "\nsetup (cached under {}; the first run downloads and installs everything, which takes several minutes) …",
        cache.display()
    );
    let ext4 = LoopExt4::open_or_create(&cache.join("run"), EXT4_BYTES);
    println!(
        "  store, caches and trees on journaled ext4 (has_journal: {}) at {} ({}, direct I/O)",
        ext4.has_journal(),
        ext4.root().display(),
        ext4.device()
    );
    let run_dir = cache.join("run");
    let (velo, mountd_bin) =
        mountd::binaries(Path::new(env!("CARGO_BIN_EXE_velo")), &run_dir.join("bin"));
    let env = Env::new(
        &velo,
        &cache,
        ext4.root(),
        &run_dir.join("velo-mountd.sock"),
    );
    // Declared after the ext4, so dropped (stopped) before it on every path.
    let mountd = Mountd::start(
        &mountd_bin,
        &env.velo,
        &env.store,
        &env.socket,
        &run_dir.join("velo-mountd.log"),
    );
    println!(
        "  velo and velo-mountd: this build's, copied to {} for the run",
        run_dir.join("bin").display()
    );
    println!(
        "  velo-mountd serves the store at {} (log: {}); root's velo run goes through it",
        mountd.socket().display(),
        mountd.log().display()
    );
    let node = setup::node(&env, &workloads.join("node"));
    let python = setup::python(&env, &workloads.join("python"));
    print_trees(&env, &node.tree, &python.tree);

    let runs = Runs::get();
    // `VELO_BENCH_ONLY=abc` or `=d`: the sections to run (default: all).
    let only = std::env::var("VELO_BENCH_ONLY").unwrap_or_else(|_| "abcde".into());
    let mut verdicts = Vec::new();
    if only.contains('a') {
        verdicts.extend(place(&env, &node, &python, &runs));
    }
    if only.contains('b') {
        verdicts.extend(first_import(&env, &node.tree, Lang::Node, &runs));
        verdicts.extend(first_import(&env, &python.tree, Lang::Python, &runs));
    }
    if only.contains('c') {
        verdicts.extend(import_times(
            &env,
            &ext4,
            &mountd,
            &node.tree,
            Lang::Node,
            &runs,
        ));
        verdicts.extend(import_times(
            &env,
            &ext4,
            &mountd,
            &python.tree,
            Lang::Python,
            &runs,
        ));
    }
    if only.contains('d') {
        verdicts.extend(as_an_ordinary_user(
            &env,
            &ext4,
            &mountd,
            &mountd_bin,
            &run_dir,
            &node,
            &python,
            &runs,
        ));
    }

    if only.contains('e') {
        for (tree, lang) in [(&node.tree, Lang::Node), (&python.tree, Lang::Python)] {
            let i = Runs::of(lang);
            verdicts.extend(profiles::cold_start(
                &env,
                &ext4,
                &mountd,
                tree,
                lang,
                runs.cold[i],
                runs.warm[i],
            ));
        }
        // After (e) node: the image's profile is settled, as it is after a project's first runs.
        verdicts.extend(profiles::run_true(&env, &node.tree, runs.velo_true));
    }

    println!("\nsummary");
    print_verdicts(&verdicts);
    println!("\n  load average at the end: {}", sys::loadavg());
    let marker = run_dir;
    // The service holds images and lent overlays on the ext4: it lets them go first.
    mountd.stop();
    ext4.close();
    sys::print_leftovers(&marker);
    println!(
        "  total bench time: {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// (d) As an ordinary user, against root, through the same velo-mountd.
#[allow(clippy::too_many_arguments)]
fn as_an_ordinary_user(
    env: &Env,
    ext4: &LoopExt4,
    mountd: &Mountd,
    mountd_bin: &Path,
    run_dir: &Path,
    node: &setup::Node,
    python: &setup::Python,
    runs: &Runs,
) -> Vec<Verdict> {
    // Dropped at the end of this function, also on a panic: its processes, refs, home and the
    // access it was granted go with it.
    let mut user = BenchUser::create(
        &env.root.join("as-user/home"),
        env.path(),
        &env.velo,
        &env.store,
    );
    let u = as_user::prepare(env, &mut user, node, python);
    let mut verdicts = as_user::place(env, &u, &node.tree, runs.velo_true);
    for (tree, project, lang) in [
        (&node.tree, &u.node, Lang::Node),
        (&python.tree, &u.python, Lang::Python),
    ] {
        verdicts.extend(as_user::imports(
            env,
            ext4,
            mountd,
            &u,
            tree,
            project,
            lang,
            runs.warm[Runs::of(lang)],
        ));
    }
    verdicts.extend(as_user::cold_build(
        env,
        &u,
        mountd_bin,
        run_dir,
        runs.user_cold,
    ));
    verdicts
}

fn print_machine() {
    let [load, _, _] = sys::load_average();
    println!("velo run benchmark");
    println!(
        "  kernel {}, {} CPUs; load average {}{}",
        sys::kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        sys::loadavg(),
        if load > LOAD_WARN {
            format!(
                "  — WARNING: above {LOAD_WARN}, other work competes for the CPUs and the figures are noisy"
            )
        } else {
            String::new()
        }
    );
}

fn print_trees(env: &Env, node: &Tree, python: &Tree) {
    for (what, t) in [("node", node), ("python", python)] {
        println!(
            "  {what} tree: {} files, {:.1} MiB of content, image {} ({})",
            t.files,
            t.bytes as f64 / (1 << 20) as f64,
            &t.image[..16],
            t.velo_project.join(t.dir).display()
        );
    }
    println!("  python: {}", env.python.display());
}

/// (a) Getting the tree in place.
fn place(env: &Env, node: &setup::Node, python: &setup::Python, runs: &Runs) -> Vec<Verdict> {
    println!("\n(a) getting the tree in place (whole processes, spawn + wait; page cache warm)");
    println!(
        "  velo: from spawning `velo run` until the command starts with the tree mounted (a probe \
         that reads the clock as its first instruction); peers: from spawn until they exit"
    );
    let (velo_node, trip_node) = velo_place(env, &node.tree, runs.velo_true);
    let npm = reinstall(
        "npm ci --offline (warm cache)",
        &node.npm_peer.join("node_modules"),
        runs.npm,
        || env.command("npm", ["ci", "--offline"]),
        &node.npm_peer,
    );
    let pnpm = reinstall(
        "pnpm install --offline --frozen-lockfile (warm store)",
        &node.pnpm_peer.join("node_modules"),
        runs.pnpm,
        || env.command(&env.pnpm, ["install", "--offline", "--frozen-lockfile"]),
        &node.pnpm_peer,
    );
    let cp_node = copy_links(env, &node.tree, runs.cp);
    let start = velo_start(env, runs.velo_true);
    println!("  node ({}):", node.tree.dir);
    print_table(&[&velo_node, &trip_node, &npm, &pnpm, &cp_node, &start]);

    let (velo_py, trip_py) = velo_place(env, &python.tree, runs.velo_true);
    let uv = reinstall(
        "uv sync --frozen --offline (warm cache)",
        &python.uv_peer.join(".venv"),
        runs.uv,
        || env.command(&env.uv, ["sync", "--frozen", "--offline", "--quiet"]),
        &python.uv_peer,
    );
    let cp_py = copy_links(env, &python.tree, runs.cp);
    println!("  python ({}):", python.tree.dir);
    print_table(&[&velo_py, &trip_py, &uv, &cp_py]);

    let fastest = [&npm, &pnpm, &cp_node]
        .into_iter()
        .min_by(|a, b| a.median().total_cmp(&b.median()))
        .expect("three peers");
    let v = vec![
        Verdict::speedup(
            "(a) node: velo run, tree in place, vs the fastest peer",
            velo_node.median(),
            fastest.median(),
            SPEEDUP_TARGET,
            &format!(
                "fastest: {}; whole `velo run true` round trip: {:.0}×",
                fastest.label,
                fastest.median() / trip_node.median()
            ),
        ),
        Verdict::speedup(
            "(a) python: velo run, tree in place, vs uv sync",
            velo_py.median(),
            uv.median(),
            SPEEDUP_TARGET,
            &format!(
                "whole `velo run true` round trip: {:.0}×; cp -al of the venv: {}",
                uv.median() / trip_py.median(),
                human(cp_py.median())
            ),
        ),
    ];
    print_verdicts(&v);
    v
}

/// `velo run PROBE` in the tree's project (image built, page cache warm), alternating with
/// `velo run true`: 3 untimed rounds, then `runs` timed ones. Returns (spawn until the probe
/// started, whole `velo run true` round trip).
fn velo_place(env: &Env, tree: &Tree, runs: usize) -> (Series, Series) {
    let mut started = Series::new(format!(
        "velo run: tree in place, command started ({})",
        tree.dir
    ));
    let mut trip = Series::new(format!("velo run true, whole round trip ({})", tree.dir));
    for i in 0..runs + 3 {
        let t0 = sys::monotonic_ns();
        let out = run(&mut env.velo_run(&tree.velo_project, [&env.probe]));
        let t1: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the probe prints its start time");
        let (d, _) = timed(&mut env.velo_run(&tree.velo_project, ["true"]));
        if i >= 3 {
            started.push(std::time::Duration::from_nanos(t1.saturating_sub(t0)));
            trip.push(d);
        }
    }
    (started, trip)
}

/// `velo --version`: one start of the velo binary, for reference (`velo run` starts it twice,
/// then the command).
fn velo_start(env: &Env, runs: usize) -> Series {
    let mut s = Series::new("for reference: velo --version (one process start)");
    for i in 0..runs + 3 {
        let (d, _) = timed(&mut env.command(&env.velo, ["--version"]));
        if i >= 3 {
            s.push(d);
        }
    }
    s
}

/// A peer install into `dir` (removed before every run, untimed, then `sync -f`): one
/// untimed warm-up run, then `runs` timed ones.
fn reinstall(
    label: &str,
    dir: &Path,
    runs: usize,
    command: impl Fn() -> std::process::Command,
    cwd: &Path,
) -> Series {
    let mut s = Series::new(label);
    for i in 0..=runs {
        remove_tree(dir);
        sync_fs(cwd);
        let (d, _) = timed(command().current_dir(cwd));
        if i > 0 {
            s.push(d);
        }
    }
    s
}

/// `cp -al` of the tree's local copy to a fresh path (removed after each run, untimed).
fn copy_links(env: &Env, tree: &Tree, runs: usize) -> Series {
    let src = tree.disk_project.join(tree.dir);
    let dst = env.root.join("cp-al");
    let mut s = Series::new(format!("cp -al ({}, hardlinks)", tree.dir));
    for i in 0..=runs {
        remove_tree(&dst);
        sync_fs(&env.root);
        let (d, _) = timed(cmd("cp", ["-al"]).arg(&src).arg(&dst));
        if i > 0 {
            s.push(d);
        }
    }
    remove_tree(&dst);
    s
}

/// (b) Tree in place + first import done: `velo run CMD` against `CMD` on the local copy,
/// whole processes, warm, alternating which goes first.
fn first_import(env: &Env, tree: &Tree, lang: Lang, runs: &Runs) -> Vec<Verdict> {
    println!(
        "\n(b) {}: tree in place + first import done (whole process, warm): {}",
        lang.name(),
        lang.modules()
    );
    let mut velo = Series::new(format!("velo run {} …", lang.name()));
    let mut disk = Series::new(format!("{} … on the tree on local disk", lang.name()));
    let n = runs.first_import[Runs::of(lang)];
    for i in 0..=n {
        let mut once = |velo_side: bool| {
            let d = if velo_side {
                timed(&mut env.velo_run(&tree.velo_project, lang.argv())).0
            } else {
                timed(&mut disk_command(env, tree, lang)).0
            };
            if i > 0 {
                (if velo_side { &mut velo } else { &mut disk }).push(d);
            }
        };
        once(i % 2 == 0);
        once(i % 2 == 1);
    }
    print_table(&[&velo, &disk]);
    let v = vec![Verdict::info_overhead(
        &format!(
            "(b) {}: velo run + imports vs imports on local disk",
            lang.name()
        ),
        velo.median(),
        disk.median(),
        &format!("{:+.1} ms", (velo.median() - disk.median()) * 1e3),
    )];
    print_verdicts(&v);
    v
}

/// The import program on the tree's local copy.
fn disk_command(env: &Env, tree: &Tree, lang: Lang) -> std::process::Command {
    let argv = lang.argv();
    let mut c = env.command(&argv[0], &argv[1..]);
    c.current_dir(&tree.disk_project);
    c
}

/// Where one side of (c) runs the imports.
#[derive(Clone, Copy)]
enum Place {
    /// On the tree's copy on local disk.
    Disk,
    /// Through `velo run` (the overlay velo-mountd lends).
    VeloRun,
    /// On a `velo mount` kept for all runs.
    Mounted,
}

/// (c) The imports alone, on the mount against local disk, warm and cold.
fn import_times(
    env: &Env,
    ext4: &LoopExt4,
    mountd: &Mountd,
    tree: &Tree,
    lang: Lang,
    runs: &Runs,
) -> Vec<Verdict> {
    println!(
        "\n(c) {}: import time (inside the process) on the mount vs local disk",
        lang.name()
    );
    println!(
        "  velo run attaches the overlay velo-mountd lends it (lent again to the next run \
         when a run hands it back untouched); velo mount is mounted once before the runs (the \
         steady state)"
    );
    let mount = MountGuard::velo_cow(
        &env.velo,
        &env.store,
        &tree.image,
        &tree.mounted_project.join(tree.dir),
    );
    let i = Runs::of(lang);
    let mut verdicts = Vec::new();
    for cold in [false, true] {
        let n = if cold { runs.cold[i] } else { runs.warm[i] };
        let sides = compare_imports(env, ext4, tree, lang, n, cold);
        let temp = if cold { "cold" } else { "warm" };
        println!(
            "  {}:",
            if cold {
                "cold (sync; echo 3 > /proc/sys/vm/drop_caches before every run)"
            } else {
                "warm (page cache, dentries and inodes of the local tree warm)"
            }
        );
        import::print_sides(&[&sides[0], &sides[1], &sides[2]]);
        for (side, how) in [
            (&sides[1], "velo run (lent overlay)"),
            (&sides[2], "velo mount (mounted once)"),
        ] {
            verdicts.push(Verdict::overhead(
                &format!("(c) {} {temp}: {how}", lang.name()),
                side.wall.median(),
                sides[0].wall.median(),
                IMPORT_TARGET_PCT,
                &format!(
                    "kernel time {:+.1} ms",
                    (side.sys.median() - sides[0].sys.median()) * 1e3
                ),
            ));
        }
        print_verdicts(&verdicts[verdicts.len() - 2..]);
    }
    print_lending(mountd, tree);
    mount.release();
    verdicts
}

/// What velo-mountd did with the overlays of the tree's image: how many runs got one an
/// earlier run had handed back untouched.
fn print_lending(mountd: &Mountd, tree: &Tree) {
    let Some(entry) = mountd.image(&tree.image) else {
        println!(
            "  (velo-mountd does not hold the image: {})",
            mountd.status()
        );
        return;
    };
    println!(
        "  velo-mountd, this image so far: {} requests answered from its superblock, \
         {} runs got an overlay back from an earlier run, {} overlays discarded \
         (now: {} lent, {} idle, {} being checked, {} retired)",
        entry["hits"],
        entry["reused"],
        entry["discarded"],
        entry["lent"],
        entry["idle"],
        entry["checking"],
        entry["retired"]
    );
}

/// Runs the imports `n` times on each of the three places (plus one untimed warm-up each when
/// warm), rotating which goes first; `cold` drops the caches before every run.
fn compare_imports(
    env: &Env,
    ext4: &LoopExt4,
    tree: &Tree,
    lang: Lang,
    n: usize,
    cold: bool,
) -> [Side; 3] {
    let places = [Place::Disk, Place::VeloRun, Place::Mounted];
    let mut sides = [
        Side::new("local disk"),
        Side::new("velo run (lent overlay)"),
        Side::new("velo mount (mounted once)"),
    ];
    let warmup = usize::from(!cold);
    for round in 0..n + warmup {
        for k in 0..places.len() {
            let which = (round + k) % places.len();
            let mut c = import_command(env, tree, lang, places[which]);
            if cold {
                drop_caches();
            }
            let before = sys::disk_reads(ext4.device_name()).0;
            let out = run(&mut c);
            let reads = sys::disk_reads(ext4.device_name()).0 - before;
            if round >= warmup {
                sides[which].push(Sample::parse(&out), reads);
            }
        }
    }
    sides
}

fn import_command(env: &Env, tree: &Tree, lang: Lang, place: Place) -> std::process::Command {
    match place {
        Place::Disk => disk_command(env, tree, lang),
        Place::VeloRun => env.velo_run(&tree.velo_project, lang.argv()),
        Place::Mounted => {
            let argv = lang.argv();
            let mut c = env.command(&argv[0], &argv[1..]);
            c.current_dir(&tree.mounted_project);
            c
        }
    }
}
