//! Crash and concurrency safety: `velo snapshot`, `velo gc` and `velo tenant commit` killed with
//! SIGKILL at random moments (seeded), concurrent snapshots beside a GC loop, and a full disk.
//! Afterwards the store must pass fsck and every ref must mount and read byte-exact.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Env, can_mount, compare_trees, path_str};

/// A small deterministic PRNG (xorshift), so a failing trial can be replayed from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A tree big enough that snapshotting it takes a while: many small files and a few large ones.
fn make_tree(dir: &Path, variant: u64) {
    for pkg in 0..40 {
        let p = dir.join(format!("pkg{pkg:02}"));
        fs::create_dir_all(&p).unwrap();
        for f in 0..25 {
            fs::write(
                p.join(format!("f{f}.js")),
                format!("// {pkg}/{f}\n").repeat(40 + f),
            )
            .unwrap();
        }
    }
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(dir.join("big.bin"), &big).unwrap();
    fs::write(
        dir.join("variant.txt"),
        format!("variant {variant}\n").repeat(10),
    )
    .unwrap();
}

fn fsck_clean(env: &Env, context: &str) {
    let out = env.velo(&["fsck"]).output().unwrap();
    assert!(
        out.status.success(),
        "{context}: fsck found damage:\n{}",
        common::describe(&out)
    );
}

/// Every ref in `expected` mounts and matches its source tree exactly.
fn refs_read_exact(env: &Env, expected: &BTreeMap<String, PathBuf>, context: &str) {
    for (name, src) in expected {
        let mnt = env.path(&format!("check-{}", name.replace('/', "_")));
        let m = env.mount(name, &mnt, &[]);
        let diffs = compare_trees(src, &mnt);
        assert!(
            diffs.is_empty(),
            "{context}: ref {name} differs from its source:\n{}",
            diffs.join("\n")
        );
        m.umount();
    }
}

fn spawn(env: &Env, args: &[&str]) -> Child {
    env.velo(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn velo")
}

/// Waits up to `delay`, then SIGKILLs the child if it is still running. Returns true if it
/// finished (successfully) on its own.
fn kill_after(mut child: Child, delay: Duration) -> bool {
    let deadline = Instant::now() + delay;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::yield_now();
    }
}

fn timed(env: &Env, args: &[&str]) -> Duration {
    let t = Instant::now();
    env.ok(args);
    t.elapsed()
}

#[test]
fn kill_9_at_random_moments_never_damages_the_store() {
    if !can_mount("kill_9_at_random_moments_never_damages_the_store") {
        return;
    }
    let trials: u64 = std::env::var("VELO_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let mut rng = Rng(0x5eed_0001);
    let env = Env::new();
    // Trees A and B alternate as the source of the snapshots being killed.
    let srcs = [env.path("a"), env.path("b")];
    make_tree(&srcs[0], 0);
    make_tree(&srcs[1], 1);
    // ref -> the tree it must show.
    let mut expected: BTreeMap<String, PathBuf> = BTreeMap::new();
    let stable_truth = env.path("truth-stable");
    Command::new("cp")
        .args(["-a", path_str(&srcs[0]), path_str(&stable_truth)])
        .status()
        .unwrap();
    env.snapshot(&srcs[0], "stable");
    expected.insert("stable".into(), stable_truth);

    // A tenant with writes; an uninterrupted commit of it is the truth for interrupted ones.
    env.ok(&["tenant", "create", "t", "--image", "stable"]);
    let tmnt = env.path("tmount");
    env.ok(&["tenant", "mount", "t", path_str(&tmnt)]);
    fs::write(tmnt.join("pkg00/tenant-write.js"), "written by the tenant").unwrap();
    fs::remove_file(tmnt.join("pkg01/f3.js")).unwrap();
    let baseline = env.json(&["tenant", "commit", "t", "--ref", "baseline"])["digest"].clone();
    {
        let bm = env.path("baseline-view");
        let m = env.mount("baseline", &bm, &[]);
        let diffs = compare_trees(&tmnt, &bm);
        assert!(
            diffs.is_empty(),
            "a commit must capture the tenant's view:\n{}",
            diffs.join("\n")
        );
        m.umount();
    }
    env.ok(&["tenant", "umount", "t"]);

    let snap_time = timed(&env, &["snapshot", path_str(&srcs[1]), "--ref", "probe"]);
    env.ok(&["ref", "rm", "probe"]);
    let gc_time = timed(&env, &["gc", "--dry-run"]);
    let commit_time = timed(&env, &["tenant", "commit", "t", "--ref", "probe2"]);
    env.ok(&["ref", "rm", "probe2"]);
    // Kill anywhere from the start to a little after a normal run would have finished.
    let mut delay =
        |d: Duration| Duration::from_micros(rng.below(d.as_micros() as u64 * 12 / 10 + 1));

    let started = Instant::now();
    let mut killed = 0u64;
    for trial in 0..trials {
        let op = trial % 3;
        let ctx = format!("trial {trial} (op {op}, seed 0x5eed0001)");
        match op {
            0 => {
                let which = (trial / 3 % 2) as usize;
                let name = format!("snap/r{}", trial % 4);
                // A fresh variant makes new objects every time: real work to interrupt.
                fs::write(
                    srcs[which].join("variant.txt"),
                    format!("trial {trial}\n").repeat(200),
                )
                .unwrap();
                let ref_file = env.store.join("refs").join(&name);
                let before = fs::read_to_string(&ref_file).ok();
                let child = spawn(&env, &["snapshot", path_str(&srcs[which]), "--ref", &name]);
                let finished = kill_after(child, delay(snap_time));
                killed += u64::from(!finished);
                let after = fs::read_to_string(&ref_file).ok();
                // A run killed after its ref was written (but before it exited) has committed
                // too: either way the ref now names this exact tree, or still the previous one.
                if finished || after != before {
                    assert_ne!(
                        after, before,
                        "{ctx}: a completed snapshot of a changed tree must move its ref"
                    );
                    let truth = env.path(&format!("truth-{}", name.replace('/', "_")));
                    let _ = fs::remove_dir_all(&truth);
                    Command::new("cp")
                        .args(["-a", path_str(&srcs[which]), path_str(&truth)])
                        .status()
                        .unwrap();
                    expected.insert(name, truth);
                }
            }
            1 => {
                // Garbage to collect: a snapshot whose ref is removed.
                fs::write(
                    srcs[0].join("garbage.txt"),
                    format!("garbage {trial}\n").repeat(300),
                )
                .unwrap();
                env.ok(&["snapshot", path_str(&srcs[0]), "--ref", "garbage"]);
                env.ok(&["ref", "rm", "garbage"]);
                fs::remove_file(srcs[0].join("garbage.txt")).unwrap();
                let child = spawn(&env, &["gc", "--keep-last", "0", "--older-than", "0s"]);
                killed += u64::from(!kill_after(child, delay(gc_time)));
            }
            _ => {
                let child = spawn(&env, &["tenant", "commit", "t", "--ref", "committed"]);
                killed += u64::from(!kill_after(child, delay(commit_time)));
                if env.store.join("refs/committed").exists() {
                    let got = fs::read_to_string(env.store.join("refs/committed")).unwrap();
                    assert_eq!(
                        got.trim(),
                        baseline.as_str().unwrap(),
                        "{ctx}: a commit of the same view must give the same image"
                    );
                }
            }
        }
        fsck_clean(&env, &ctx);
        if trial % 10 == 9 || trial + 1 == trials {
            refs_read_exact(&env, &expected, &ctx);
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "crash trials took too long"
        );
    }
    eprintln!("{killed} of {trials} runs were killed mid-way, the rest completed");
    assert!(
        killed >= trials / 5,
        "too few runs were interrupted ({killed}/{trials}) to test anything"
    );
    assert!(
        killed < trials,
        "no run completed: the completed-ref checks never ran"
    );
    // Killed processes leave no mount behind (a commit's private namespace died with it).
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(path_str(env.dir.path())),
        "a mount under the test dir survived:\n{mounts}"
    );
    let tenant = env.json(&["tenant", "ls"]);
    assert!(
        tenant[0]["mounted_at"].is_null(),
        "the tenant looks mounted after killed commits: {tenant}"
    );
}

#[test]
fn concurrent_snapshots_beside_a_gc_loop_lose_nothing() {
    let env = Env::new();
    let shared = env.path("shared");
    make_tree(&shared, 99);
    let mut srcs = Vec::new();
    for i in 0..8 {
        let src = env.path(&format!("src{i}"));
        Command::new("cp")
            .args(["-a", path_str(&shared), path_str(&src)])
            .status()
            .unwrap();
        fs::write(src.join("own.txt"), format!("tree {i}\n").repeat(500)).unwrap();
        srcs.push(src);
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let gc_runs = std::sync::atomic::AtomicU32::new(0);
    env.ok(&["snapshot", path_str(&srcs[0]), "--ref", "first"]);
    let env = &env;
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                env.ok(&["gc", "--keep-last", "0", "--older-than", "0s"]);
                gc_runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let workers: Vec<_> = srcs
            .iter()
            .enumerate()
            .map(|(i, src)| {
                s.spawn(move || {
                    for round in 0..3 {
                        fs::write(src.join("round.txt"), format!("{i}/{round}\n").repeat(100))
                            .unwrap();
                        env.ok(&["snapshot", path_str(src), "--ref", &format!("c/{i}")]);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        gc.join().unwrap();
    });
    assert!(gc_runs.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    env.ok(&["gc", "--keep-last", "0", "--older-than", "0s"]);
    fsck_clean(env, "after concurrent snapshots and GC");
    if can_mount("concurrent_snapshots_beside_a_gc_loop_lose_nothing (mount check)") {
        let expected = srcs
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("c/{i}"), s.clone()))
            .collect();
        refs_read_exact(env, &expected, "concurrent");
    }
}

#[test]
fn a_full_disk_fails_clearly_and_leaves_a_consistent_store() {
    if !can_mount("a_full_disk_fails_clearly_and_leaves_a_consistent_store") {
        return; // needs root to mount a small tmpfs
    }
    let env = Env::new();
    let small = env.path("small");
    let _tmpfs = common::Tmpfs::mount(&small, "velo-full", Some("2m"));
    let store = small.join("store");
    let velo = |args: &[&str]| {
        Command::new(common::velo_bin())
            .arg("--store")
            .arg(&store)
            .args(args)
            .output()
            .unwrap()
    };
    let tiny = env.path("tiny");
    fs::create_dir(&tiny).unwrap();
    fs::write(tiny.join("f"), "fits ".repeat(100)).unwrap();
    assert!(
        velo(&["snapshot", path_str(&tiny), "--ref", "tiny"])
            .status
            .success()
    );

    let big = env.path("big");
    make_tree(&big, 5); // ~3.5 MB: does not fit
    let out = velo(&["snapshot", path_str(&big), "--ref", "big"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No space left on device") && err.contains(path_str(&big)),
        "{err}"
    );
    assert!(
        !store.join("refs/big").exists(),
        "no ref after a failed snapshot"
    );
    let fsck = velo(&["fsck"]);
    assert!(
        fsck.status.success(),
        "store damaged by a full disk:\n{}",
        common::describe(&fsck)
    );
    // Staging files were unnamed (O_TMPFILE): nothing half-written is left visible.
    assert_eq!(fs::read_dir(store.join("tmp")).unwrap().count(), 0);
    // The store still works: once GC has removed what the failed snapshot stored (a mount
    // needs room for its pin and its image check), the small ref mounts and reads.
    let gc = velo(&["gc"]);
    assert!(gc.status.success(), "{}", common::describe(&gc));
    let mnt = env.path("mnt");
    let out = velo(&["mount", "tiny", path_str(&mnt)]);
    assert!(out.status.success(), "{}", common::describe(&out));
    let _m = common::Mounted::adopt(&mnt, &store);
    assert_eq!(
        fs::read_to_string(mnt.join("f")).unwrap(),
        "fits ".repeat(100)
    );
}
