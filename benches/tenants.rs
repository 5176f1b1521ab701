//! Page-cache sharing: `cargo bench --bench tenants` (root only).
//!
//! Eight tenants on one image each read the same large files; the page cache should then hold
//! one copy of them, because every tenant's reads go to the same object files in the store.
//! Against that, eight `cp -a` copies of the tree, each read once, hold eight. Prints the growth
//! of the page cache (`Cached:` in /proc/meminfo) and the pages of the object files that are
//! resident (mincore), starting from dropped caches each time. It measures; it never fails.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

// Shared with the other benchmarks; only a few helpers are used here.
#[allow(dead_code)]
#[path = "support/sys.rs"]
mod sys;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sys::{cmd, drop_caches, run};

const TENANTS: usize = 8;
const FILES: usize = 8;
const FILE_MIB: usize = 48;

fn main() {
    if !sys::is_root() {
        println!("SKIPPED: needs root");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("velo-bench-tenants-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let velo = env!("CARGO_BIN_EXE_velo");
    let store = work.path().join("store");
    let src = work.path().join("src");
    make_tree(&src);
    let tree_bytes = ((FILES * FILE_MIB) as u64) << 20;
    println!(
        "page-cache sharing: {TENANTS} readers of a {FILES} × {FILE_MIB} MiB tree ({})",
        mib(tree_bytes)
    );
    println!("load average: {}", sys::loadavg());
    run(velo_cmd(&store)
        .args(["-q", "snapshot"])
        .arg(&src)
        .args(["--ref", "shared"]));

    // velo: eight tenants over one image.
    let mut mounts = Vec::new();
    for t in 0..TENANTS {
        let name = format!("t{t}");
        let dir = work.path().join(format!("mnt-{t}"));
        run(velo_cmd(&store)
            .args([
                "-q", "tenant", "create", &name, "--image", "shared", "--mount",
            ])
            .arg(&dir));
        mounts.push(Guard {
            velo: velo.into(),
            store: store.clone(),
            tenant: name,
        });
        let _ = &dir;
    }
    let readers: Vec<PathBuf> = (0..TENANTS)
        .map(|t| work.path().join(format!("mnt-{t}")))
        .collect();
    let velo_growth = measure(&readers);
    let resident = resident_object_bytes(&store.join("objects"));
    drop(mounts);

    // cp -a: eight copies.
    let copies: Vec<PathBuf> = (0..TENANTS)
        .map(|t| work.path().join(format!("copy-{t}")))
        .collect();
    for c in &copies {
        run(cmd("cp", ["-a"]).arg(&src).arg(c));
    }
    let cp_growth = measure(&copies);

    println!();
    println!("{:<44} {:>12} {:>10}", "", "page cache", "copies");
    println!(
        "{:<44} {:>12} {:>10.2}",
        format!("velo: {TENANTS} tenants on one image, all read"),
        mib(velo_growth),
        velo_growth as f64 / tree_bytes as f64
    );
    println!(
        "{:<44} {:>12} {:>10.2}",
        "  of which object pages resident (mincore)",
        mib(resident),
        resident as f64 / tree_bytes as f64
    );
    println!(
        "{:<44} {:>12} {:>10.2}",
        format!("cp -a: {TENANTS} copies, all read"),
        mib(cp_growth),
        cp_growth as f64 / tree_bytes as f64
    );
    println!();
    println!(
        "velo holds {:.1}× less page cache than {TENANTS} copies",
        cp_growth as f64 / velo_growth.max(1) as f64
    );
    drop(work);
    let left = sys::mounts_mentioning("velo-bench-tenants-").len();
    println!("cleanup: {left} mounts left (expected 0)");
}

/// Page-cache growth while every dir in `dirs` is read completely, from dropped caches.
fn measure(dirs: &[PathBuf]) -> u64 {
    drop_caches();
    let before = cached();
    for d in dirs {
        read_all(d);
    }
    cached().saturating_sub(before)
}

fn make_tree(src: &Path) {
    fs::create_dir_all(src.join("lib")).expect("mkdir");
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for f in 0..FILES {
        let data: Vec<u8> = (0..FILE_MIB << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::write(src.join("lib").join(format!("big{f}.bin")), data).expect("write");
    }
}

fn read_all(dir: &Path) {
    let mut buf = vec![0u8; 1 << 20];
    for f in 0..FILES {
        let mut file = fs::File::open(dir.join("lib").join(format!("big{f}.bin"))).expect("open");
        while file.read(&mut buf).expect("read") > 0 {}
    }
}

/// `Cached:` of /proc/meminfo, in bytes.
fn cached() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cached:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of the store's object files resident in the page cache (mincore).
fn resident_object_bytes(objects: &Path) -> u64 {
    let mut total = 0;
    for fan in fs::read_dir(objects).expect("objects").flatten() {
        for obj in fs::read_dir(fan.path()).expect("fanout").flatten() {
            total += resident(&obj.path());
        }
    }
    total
}

fn resident(path: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        _ => 0,
    }
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
}

/// `velo --store STORE`.
fn velo_cmd(store: &Path) -> Command {
    cmd(
        env!("CARGO_BIN_EXE_velo"),
        ["--store".as_ref(), store.as_os_str()],
    )
}

/// Unmounts a tenant on drop (also on panic).
struct Guard {
    velo: PathBuf,
    store: PathBuf,
    tenant: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new(&self.velo)
            .arg("--store")
            .arg(&self.store)
            .args(["-q", "tenant", "umount", &self.tenant])
            .status();
    }
}
