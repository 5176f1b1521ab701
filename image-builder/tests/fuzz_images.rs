//! Mutated images fed to every code path that reads an image (parse, summarize, dump, verify,
//! fsck): a clear error or a result, never a panic or a hang. A proptest harness with a fixed
//! budget (`VELO_FUZZ_CASES`, default 300) and seed, so CI runs it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use velo_image::{NoProgress, SnapshotOptions, fsck, inspect, snapshot};
use velo_objects::{Kind, Store};

/// A store with one real image of a tree that has every inode type velo writes by default.
fn seed_image() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("a/b/c")).unwrap();
    std::fs::write(src.join("inline"), "small").unwrap();
    std::fs::write(src.join("a/big"), "x".repeat(10_000)).unwrap();
    std::fs::write(src.join("a/b/c/deep"), "y".repeat(5_000)).unwrap();
    std::fs::hard_link(src.join("a/big"), src.join("hard")).unwrap();
    std::os::unix::fs::symlink("a/big", src.join("link")).unwrap();
    for i in 0..40 {
        std::fs::write(
            src.join(format!("a/f{i:02}")),
            format!("{i}").repeat(100 + i),
        )
        .unwrap();
    }
    let store = Store::open_or_create(dir.path().join("store")).unwrap();
    let r = snapshot(&store, &src, &SnapshotOptions::default(), &NoProgress).unwrap();
    let bytes = inspect::read_image_bytes(&store, &r.digest).unwrap();
    (dir, bytes)
}

/// Every reader, on one (possibly malformed) image. Errors are fine; panics are not.
fn read_everything(store_dir: &std::path::Path, bytes: Vec<u8>) {
    if let Ok(fs) = velo_image::read_image(&bytes, "fuzz") {
        let _ = inspect::summarize(&fs);
        let _ = inspect::objects(&fs);
        let _ = velo_image::dumpfile(&fs);
    }
    let store = Store::open(store_dir).unwrap();
    let stored = store.store_bytes(Kind::Image, &bytes).unwrap();
    let _ = inspect::load(&store, &stored.digest);
    let pool = fsck::pool(Some(1)).unwrap();
    let _ = fsck::verify_image(&store, &stored.digest, &pool);
    let _ = fsck::fsck(&store, false, 1, &());
}

/// Runs `f` on another thread and fails if it takes longer than a hang would.
fn with_deadline(f: impl FnOnce() + Send + 'static) -> Result<(), TestCaseError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r.is_ok());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(true) => Ok(()),
        Ok(false) => Err(TestCaseError::fail(
            "a reader panicked on a malformed image",
        )),
        Err(_) => Err(TestCaseError::fail("a reader hung on a malformed image")),
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Set { at: usize, value: u8 },
    Truncate { len: usize },
    Extend { len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        3 => (any::<usize>(), prop_oneof![Just(0u8), Just(0xff), Just(0x7f), Just(0x80), any::<u8>()])
            .prop_map(|(at, value)| Mutation::Set { at, value }),
        1 => any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        1 => (1usize..8192).prop_map(|len| Mutation::Extend { len }),
    ]
}

fn apply(mut bytes: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let n = bytes.len().max(1);
        match *m {
            // Most of an image is padding: aim half the flips at the first 4 KiB, where the
            // superblock, inodes and xattrs are.
            Mutation::Flip { at, xor } => {
                let at = if at % 2 == 0 {
                    at % n.min(4096)
                } else {
                    at % n
                };
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= xor;
                }
            }
            Mutation::Set { at, value } => {
                let at = at % n.min(4096);
                if let Some(b) = bytes.get_mut(at) {
                    *b = value;
                }
            }
            Mutation::Truncate { len } => bytes.truncate(len % n),
            Mutation::Extend { len } => bytes.extend(std::iter::repeat_n(0xa5, len)),
        }
    }
    bytes
}

#[test]
fn mutated_images_never_panic_or_hang() {
    let (dir, seed) = seed_image();
    let store_dir = dir.path().join("store");
    let cases = std::env::var("VELO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    runner
        .run(&proptest::collection::vec(mutation(), 1..12), |muts| {
            let bytes = apply(seed.clone(), &muts);
            let store_dir = store_dir.clone();
            with_deadline(move || read_everything(&store_dir, bytes))
        })
        .unwrap();
}
