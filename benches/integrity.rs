//! Integrity figures: `cargo bench --bench integrity` (root only).
//!
//! On the synthetic `node_modules`-shaped tree of the core benchmark (same generator, same
//! seed), prints the throughput of `velo mount --verify` (the image and every object it needs,
//! re-hashed in userspace in parallel before mounting) against `sha256sum` of the same files,
//! and the time `velo fsck` takes for the whole store. Warm page cache on both sides. It
//! measures; it never fails on timing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

// Shared with the other benchmarks; not every helper is used here.
#[allow(dead_code)]
#[path = "support/stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "support/sys.rs"]
mod sys;
#[allow(dead_code)]
#[path = "support/tree.rs"]
mod tree;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use stats::{Series, bytes, human};
use sys::{cmd, run, run_json, timed};

const RUNS: usize = 5;

fn main() {
    if !sys::is_root() {
        println!("SKIPPED: needs root");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("velo-bench-integrity-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let src = work.path().join("tree");
    let store = work.path().join("store");
    let mnt = work.path().join("mnt");
    println!("load average: {}", sys::loadavg());
    let t = tree::generate(&tree::TreeSpec::node_modules(), &src);
    println!(
        "tree: {} files ({}), {} distinct object contents ({})",
        t.files,
        bytes(t.bytes),
        t.object_contents,
        bytes(t.object_bytes)
    );
    let snap = run_json(
        velo(&store)
            .args(["--json", "snapshot"])
            .arg(&src)
            .args(["--ref", "bench"]),
    );
    println!("snapshot: {}", snap["digest"].as_str().unwrap_or_default());

    // velo mount --verify: the userspace check's own figures, from its JSON.
    let mut verify = Series::new("velo mount --verify (userspace check only)");
    let mut verify_whole = Series::new("velo mount --verify (whole process)");
    let mut verified_bytes = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        let v = run_json(
            velo(&store)
                .args(["--json", "mount", "bench"])
                .arg(&mnt)
                .arg("--verify"),
        );
        verify_whole.push(started.elapsed());
        run(velo(&store).args(["-q", "umount"]).arg(&mnt));
        let check = &v["userspace_verified"];
        verified_bytes = check["bytes"].as_u64().unwrap_or(0);
        verify.push(Duration::from_secs_f64(
            check["seconds"].as_f64().unwrap_or(0.0),
        ));
    }

    // sha256sum over the same files: one process, and one per core.
    let files = format!("cd {} && find . -type f -print0", shell_quote(&src));
    let mut sha1 = Series::new("sha256sum, 1 process");
    let mut sha2 = Series::new("sha256sum, xargs -P 2");
    for _ in 0..RUNS {
        sha1.push(timed_sh(&format!(
            "{files} | xargs -0 sha256sum > /dev/null"
        )));
        sha2.push(timed_sh(&format!(
            "{files} | xargs -0 -n 500 -P 2 sha256sum > /dev/null"
        )));
    }

    let mut fsck = Series::new("velo fsck (whole store)");
    let mut fsck_objects = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        let v = run_json(velo(&store).args(["--json", "fsck"]));
        fsck.push(started.elapsed());
        fsck_objects = v["objects_checked"].as_u64().unwrap_or(0);
        assert_eq!(v["clean"], true, "the bench store must be clean: {v}");
    }

    println!();
    println!(
        "{:<46} {:>10} {:>10} {:>10} {:>12}",
        "", "median", "min", "max", "throughput"
    );
    let gbs = |b: u64, s: f64| format!("{:.2} GB/s", b as f64 / s / 1e9);
    for (series, b) in [
        (&verify, verified_bytes),
        (&verify_whole, verified_bytes),
        (&sha1, t.bytes),
        (&sha2, t.bytes),
    ] {
        println!(
            "{:<46} {:>10} {:>10} {:>10} {:>12}",
            series.label,
            human(series.median()),
            human(series.min()),
            human(series.max()),
            gbs(b, series.median())
        );
    }
    println!(
        "{:<46} {:>10} {:>10} {:>10} {:>12}",
        format!("{} ({fsck_objects} objects)", fsck.label),
        human(fsck.median()),
        human(fsck.min()),
        human(fsck.max()),
        gbs(t.object_bytes, fsck.median())
    );
    println!();
    println!(
        "--verify hashes {} at {} vs sha256sum of the tree's {} at {} (1 process) / {} (2)",
        bytes(verified_bytes),
        gbs(verified_bytes, verify.median()),
        bytes(t.bytes),
        gbs(t.bytes, sha1.median()),
        gbs(t.bytes, sha2.median())
    );
    println!(
        "ratio of throughputs, --verify / sha256sum -P 2: {:.2}",
        (verified_bytes as f64 / verify.median()) / (t.bytes as f64 / sha2.median())
    );
}

/// `velo --store STORE`.
fn velo(store: &Path) -> Command {
    cmd(
        env!("CARGO_BIN_EXE_velo"),
        ["--store".as_ref(), store.as_os_str()],
    )
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

fn timed_sh(script: &str) -> Duration {
    timed(&mut sys::sh(script)).0
}
