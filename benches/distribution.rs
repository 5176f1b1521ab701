//! The distribution benchmark: `cargo bench --bench distribution`.
//!
//! Against a real registry (Debian's `docker-registry` on 127.0.0.1, started here as in the
//! tests), for a synthetic tree (≈ 20k files in 1000 package dirs, fixed seed) and for
//! `../shared/workloads/node` (installed once with `npm ci` into target/bench-distribution/ and
//! reused), it prints medians (min–max) of:
//!
//! * `velo push`: cold (empty registry), again (nothing to send), and of a second image in which
//!   2% of the packages changed (what the packing must keep small);
//! * `velo pull`: cold (empty store), and of the second image into a store that has the first;
//! * the baseline: `tar -c | gzip` of the same tree uploaded as one blob, and downloaded and
//!   unpacked;
//! * for the node tree, the cold push and the second image's upload at several pack sizes.
//!
//! with objects/s and MB/s (of the tree's content) and the ratios to the baseline. It measures
//! and prints; it never fails on timing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "../tests/common/registry.rs"]
#[allow(dead_code)]
mod registry;
// Shared with the other benchmarks; only a few helpers are used here.
#[allow(dead_code)]
#[path = "support/stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "support/sys.rs"]
mod sys;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use registry::Registry;
use stats::Series;
use sys::{bash, cmd, run};

const RUNS: usize = 3;

fn velo() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_velo"))
}

/// `velo --store STORE --json ARGS…`, its output parsed.
fn run_json(store: &Path, args: &[&str]) -> serde_json::Value {
    sys::run_json(
        cmd(
            velo(),
            [
                OsStr::new("--store"),
                store.as_os_str(),
                OsStr::new("--json"),
            ],
        )
        .args(args),
    )
}

/// `bash -eo pipefail -c SCRIPT`; panics if it fails.
fn sh(script: &str) {
    run(&mut bash(script));
}

/// A series as "MEDIAN s (MIN–MAX)".
fn spread(s: &Series) -> String {
    format!("{:7.3} s ({:.3}–{:.3})", s.median(), s.min(), s.max())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// A synthetic node_modules-like tree: 1000 packages, ≈ 20k files, sizes spread from 100 B to
/// 300 KB (most small), 20% of files duplicated across packages. Fixed seed.
fn synthetic_tree(dir: &Path) {
    if dir.join(".complete").exists() {
        return;
    }
    let _ = fs::remove_dir_all(dir);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut shared: Vec<Vec<u8>> = Vec::new();
    for p in 0..1000 {
        let pkg = dir.join(format!("node_modules/pkg-{p:04}"));
        fs::create_dir_all(pkg.join("lib")).unwrap();
        fs::write(
            pkg.join("package.json"),
            format!("{{\"name\":\"pkg-{p}\",\"version\":\"1.{}.0\"}}\n", p % 7),
        )
        .unwrap();
        for f in 0..19 {
            let data = if !shared.is_empty() && next() % 5 == 0 {
                shared[(next() % shared.len() as u64) as usize].clone()
            } else {
                // Mostly small, a few large: 2^(7..18) bytes, weighted to the small end.
                let exp = 7 + (next() % 12).min(next() % 12);
                let len = (1u64 << exp) + next() % (1 << exp);
                // Source-like, compressible content.
                let mut d = Vec::with_capacity(len as usize);
                while (d.len() as u64) < len {
                    d.extend_from_slice(
                        format!("export const v{} = {};\n", next() % 1000, next() % 100_000)
                            .as_bytes(),
                    );
                }
                d.truncate(len as usize);
                if shared.len() < 2000 {
                    shared.push(d.clone());
                }
                d
            };
            fs::write(pkg.join(format!("lib/m{f}.js")), data).unwrap();
        }
    }
    fs::write(dir.join(".complete"), "").unwrap();
}

/// `npm ci` of the node workload, once (reused while the lockfile is unchanged).
fn node_tree(dir: &Path) -> Option<PathBuf> {
    let workload = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/workloads/node");
    let lock = fs::read(workload.join("package-lock.json")).ok()?;
    if fs::read(dir.join("package-lock.json")).ok().as_deref() == Some(&lock[..])
        && dir.join("node_modules/.package-lock.json").exists()
    {
        return Some(dir.join("node_modules"));
    }
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    for f in ["package.json", "package-lock.json"] {
        fs::copy(workload.join(f), dir.join(f)).unwrap();
    }
    println!(
        "installing ../shared/workloads/node with npm ci (once; cached in {})",
        dir.display()
    );
    let out = Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .env("npm_config_cache", dir.join("../npm-cache"))
        .output();
    match out {
        Ok(o) if o.status.success() => Some(dir.join("node_modules")),
        Ok(o) => {
            println!(
                "SKIPPED node workload: npm ci failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
        Err(e) => {
            println!("SKIPPED node workload: npm: {e}");
            None
        }
    }
}

/// A copy of `tree` in which every 50th package directory (2%) "got a new version": each of its
/// files changed.
fn second_version(tree: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    fs::create_dir_all(to).unwrap();
    sh(&format!(
        "cp -a {}/. {}/ && cd {} && ls -d */ | awk 'NR % 50 == 0' | while read -r d; do \
         find \"$d\" -type f -size +0 -name '*.js' -exec sh -c 'echo \"// v2\" >> \"$1\"' _ {{}} \\; ; done",
        tree.display(),
        to.display(),
        to.display()
    ));
}

struct Tree {
    files: u64,
    bytes: u64,
    objects: u64,
}

fn bench_tree(name: &str, tree: &Path, work: &Path, pack_sizes: &[&str]) {
    println!("\n== {name}: {} ==", tree.display());
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).unwrap();
    let store_a = work.join("store-a");
    let snap = run_json(
        &store_a,
        &["snapshot", tree.to_str().unwrap(), "--ref", "b/v1"],
    );
    let t = Tree {
        files: snap["files"].as_u64().unwrap(),
        bytes: snap["bytes"].as_u64().unwrap(),
        objects: snap["new_objects"].as_u64().unwrap() + snap["reused_objects"].as_u64().unwrap(),
    };
    let v2 = work.join("v2");
    second_version(tree, &v2);
    let snap2 = run_json(
        &store_a,
        &["snapshot", v2.to_str().unwrap(), "--ref", "b/v2"],
    );
    println!(
        "tree: {} files, {:.1} MB of content, {} objects (image {:.1} MB); second version: {} new objects ({:.1} MB)",
        t.files,
        mb(t.bytes),
        t.objects,
        mb(snap["image_bytes"].as_u64().unwrap()),
        snap2["new_objects"],
        mb(snap2["new_bytes"].as_u64().unwrap())
    );

    // Baseline: tar | gzip as one blob.
    let mut tar = Series::new("tar|gzip");
    let mut up = Series::new("upload");
    let mut down = Series::new("download+gunzip|tar -x");
    let mut gz_bytes = 0;
    for run in 0..RUNS {
        let reg = Registry::start();
        let gz = work.join("tree.tar.gz");
        let t0 = Instant::now();
        sh(&format!(
            "tar -C {} -cf - . | gzip > {}",
            tree.display(),
            gz.display()
        ));
        tar.push(t0.elapsed());
        let data = fs::read(&gz).unwrap();
        gz_bytes = data.len() as u64;
        let t1 = Instant::now();
        let digest = reg.put_blob("base/line", &data);
        up.push(t1.elapsed());
        drop(data);
        let out = work.join(format!("untar-{run}"));
        fs::create_dir_all(&out).unwrap();
        let t2 = Instant::now();
        let body = reg.blob("base/line", &digest);
        let tmp = work.join("down.tar.gz");
        fs::write(&tmp, body).unwrap();
        sh(&format!(
            "gzip -dc {} | tar -C {} -xf -",
            tmp.display(),
            out.display()
        ));
        down.push(t2.elapsed());
        let _ = fs::remove_dir_all(&out);
    }
    let base_push = tar.median() + up.median();
    println!(
        "baseline tar|gzip: {:.1} MB compressed; tar|gzip {} + upload {} = {:.3} s; download+gunzip|tar -x {}",
        mb(gz_bytes),
        spread(&tar),
        spread(&up),
        base_push,
        spread(&down)
    );

    // velo: cold push, push again, push of the second image; cold pull, incremental pull.
    let mut cold = Series::new("velo push, cold");
    let mut again = Series::new("velo push, again");
    let mut second = Series::new("velo push, second image (2% changed)");
    let mut pull_cold = Series::new("velo pull, cold");
    let mut pull_inc = Series::new("velo pull, second image");
    let (mut r_cold, mut r_again, mut r_second, mut r_pull, mut r_inc) =
        (None, None, None, None, None);
    for run in 0..RUNS {
        let reg = Registry::start();
        let dest1 = reg.url("b/deps:v1");
        let dest2 = reg.url("b/deps:v2");
        // A fresh push cache each run, so the cold push encodes everything.
        let _ = fs::remove_file(store_a.join("cache/oci-blobs"));
        let t = Instant::now();
        let r = run_json(&store_a, &["push", "b/v1", &dest1, "--plain-http"]);
        cold.push(t.elapsed());
        r_cold = Some(r);
        let t = Instant::now();
        let r = run_json(&store_a, &["push", "b/v1", &dest1, "--plain-http"]);
        again.push(t.elapsed());
        r_again = Some(r);
        let t = Instant::now();
        let r = run_json(&store_a, &["push", "b/v2", &dest2, "--plain-http"]);
        second.push(t.elapsed());
        r_second = Some(r);
        let store_b = work.join(format!("store-b-{run}"));
        let t = Instant::now();
        let r = run_json(&store_b, &["pull", &dest1, "--plain-http", "--ref", "b/v1"]);
        pull_cold.push(t.elapsed());
        r_pull = Some(r);
        let t = Instant::now();
        let r = run_json(&store_b, &["pull", &dest2, "--plain-http", "--ref", "b/v2"]);
        pull_inc.push(t.elapsed());
        r_inc = Some(r);
        let _ = fs::remove_dir_all(&store_b);
    }
    let show = |s: &Series, r: &serde_json::Value, sent_key: &str, bytes_key: &str| {
        let secs = s.median();
        println!(
            "{:<34} {}  {:>5} blobs, {:>5} moved, {:>8.2} MB moved; {:>8.0} objects/s, {:>7.1} MB/s of content",
            s.label,
            spread(s),
            r["blobs"],
            r[sent_key],
            mb(r[bytes_key].as_u64().unwrap_or(0)),
            t.objects as f64 / secs,
            mb(t.bytes) / secs
        );
    };
    show(&cold, r_cold.as_ref().unwrap(), "blobs_sent", "bytes_sent");
    show(
        &again,
        r_again.as_ref().unwrap(),
        "blobs_sent",
        "bytes_sent",
    );
    show(
        &second,
        r_second.as_ref().unwrap(),
        "blobs_sent",
        "bytes_sent",
    );
    show(
        &pull_cold,
        r_pull.as_ref().unwrap(),
        "blobs_fetched",
        "bytes_received",
    );
    show(
        &pull_inc,
        r_inc.as_ref().unwrap(),
        "blobs_fetched",
        "bytes_received",
    );
    let sent_cold = r_cold.as_ref().unwrap()["bytes_sent"].as_u64().unwrap();
    let sent_second = r_second.as_ref().unwrap()["bytes_sent"].as_u64().unwrap();
    println!(
        "ratios: cold push / (tar|gzip + upload) = {:.2}; bytes {:.2}; cold pull / (download + unpack) = {:.2}; \
         second image sends {:.1}% of a cold push ({:.1}% of the tar.gz)",
        cold.median() / base_push,
        sent_cold as f64 / gz_bytes as f64,
        pull_cold.median() / down.median(),
        100.0 * sent_second as f64 / sent_cold as f64,
        100.0 * sent_second as f64 / gz_bytes as f64,
    );

    // Pack size: cold push and the second image's upload.
    for size in pack_sizes {
        let reg = Registry::start();
        let _ = fs::remove_file(store_a.join("cache/oci-blobs"));
        let t = Instant::now();
        let r1 = run_json(
            &store_a,
            &[
                "push",
                "b/v1",
                &reg.url("p/deps:v1"),
                "--plain-http",
                "--pack-size",
                size,
            ],
        );
        let cold = t.elapsed();
        let r2 = run_json(
            &store_a,
            &[
                "push",
                "b/v2",
                &reg.url("p/deps:v2"),
                "--plain-http",
                "--pack-size",
                size,
            ],
        );
        println!(
            "pack size {size:>4}: cold push {:6.3} s, {:>5} blobs, {:8.2} MB; second image sends {:>4} blobs, {:7.2} MB ({:.1}%)",
            cold.as_secs_f64(),
            r1["blobs"],
            mb(r1["bytes_sent"].as_u64().unwrap()),
            r2["blobs_sent"],
            mb(r2["bytes_sent"].as_u64().unwrap()),
            100.0 * r2["bytes_sent"].as_u64().unwrap() as f64
                / r1["bytes_sent"].as_u64().unwrap() as f64
        );
    }
    let _ = fs::remove_dir_all(work);
}

fn main() {
    if !Path::new(registry::REGISTRY_BIN).exists() {
        println!(
            "SKIPPED: {} is missing (apt-get install docker-registry)",
            registry::REGISTRY_BIN
        );
        return;
    }
    let started = Instant::now();
    let load = sys::loadavg();
    println!(
        "distribution benchmark: {} runs each, medians (min–max); load {}",
        RUNS,
        load.split(' ').next().unwrap_or("?")
    );
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-distribution");
    let synthetic = base.join("synthetic");
    synthetic_tree(&synthetic);
    bench_tree(
        "synthetic",
        &synthetic.join("node_modules"),
        &base.join("work"),
        &["1M", "4M"],
    );
    if let Some(node) = node_tree(&base.join("node")) {
        bench_tree(
            "node workload",
            &node,
            &base.join("work"),
            &["256K", "1M", "4M", "16M"],
        );
    }
    println!("\ntotal {:.0} s", started.elapsed().as_secs_f64());
}
