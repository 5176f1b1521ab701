//! Helpers for the access-profile tests: a profile's files, the object behind an image's file,
//! and the page cache (checked with `fincore`, which reads nothing in).

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use velo_objects::Digest;

use super::{Env, describe};

/// The files `velo inspect --profile --json` names, in order, as (first path, hits).
pub fn files(p: &Value) -> Vec<(String, u64)> {
    p["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["paths"][0].as_str().unwrap_or("").to_owned(),
                e["hits"].as_u64().expect("hits"),
            )
        })
        .collect()
}

/// The digest of the object behind `file` (`/lib/a`) of the image, from its dumpfile.
pub fn digest_of(env: &Env, image: &str, file: &str) -> Digest {
    let dump = env.ok(&["inspect", image, "--dump"]);
    let line = dump
        .lines()
        .find(|l| l.split(' ').next() == Some(file))
        .unwrap_or_else(|| panic!("{file} not in the image:\n{dump}"));
    let payload = line.split(' ').nth(8).expect("a dumpfile payload");
    Digest::parse(&payload.replace('/', "")).expect("an object digest")
}

/// The store path of the object behind `file` of the image.
pub fn object_of(env: &Env, image: &str, file: &str) -> PathBuf {
    let hex = digest_of(env, image, file).to_hex();
    env.store.join("objects").join(&hex[..2]).join(&hex[2..])
}

/// Whether any page of `path` is in the page cache (`fincore`: mincore(2), reads nothing in).
pub fn cached(path: &Path) -> bool {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("run fincore");
    assert!(out.status.success(), "fincore: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).trim() != "0"
}

/// Drops `path`'s pages from the page cache (it is written and synced: clean pages go).
pub fn evict(path: &Path) {
    let f = fs::File::open(path).expect("open");
    rustix::fs::fadvise(f.as_fd(), 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    assert!(!cached(path), "{} stayed cached", path.display());
}
