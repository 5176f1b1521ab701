//! Tests of the object store on a real filesystem (no root needed).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use velo_objects::{Digest, Kind, Store, StoreError, Verdict, verity::VerityHasher};

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path().join("store")).unwrap();
    (dir, store)
}

#[test]
fn creates_layout_with_private_root() {
    let (_dir, store) = new_store();
    let root = store.root();
    let mode = fs::metadata(root).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "store root must be private");
    for d in [
        "objects",
        "images",
        "refs",
        "tmp",
        "mounts",
        "cache",
        "quarantine",
    ] {
        assert!(root.join(d).is_dir(), "{d} missing");
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["format"], "velo-store");
    assert_eq!(meta["version"], 1);
    // Reopening reads the same store.
    Store::open(root).unwrap();
}

#[test]
fn open_missing_store_is_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(dir.path().join("nope")).unwrap_err();
    assert!(matches!(err, StoreError::NoStore { .. }), "{err}");
    assert!(err.to_string().contains("nope"));
}

#[test]
fn refuses_newer_and_corrupt_meta() {
    let (_dir, store) = new_store();
    let root = store.root().to_owned();
    drop(store);
    let meta_path = root.join("meta.json");
    let good = fs::read_to_string(&meta_path).unwrap();

    fs::write(&meta_path, good.replace("\"version\": 1", "\"version\": 7")).unwrap();
    let err = Store::open(&root).unwrap_err();
    assert!(
        matches!(err, StoreError::IncompatibleStore { found: 7, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("version 7"), "{err}");

    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["incompat_features"] = serde_json::json!(["time-travel"]);
    fs::write(&meta_path, v.to_string()).unwrap();
    let err = Store::open(&root).unwrap_err();
    assert!(err.to_string().contains("time-travel"), "{err}");

    fs::write(&meta_path, "{ not json").unwrap();
    let err = Store::open(&root).unwrap_err();
    assert!(matches!(err, StoreError::CorruptMeta { .. }), "{err}");
    assert!(err.to_string().contains("meta.json"), "{err}");
}

#[test]
fn store_bytes_dedups_and_names_by_content() {
    let (_dir, store) = new_store();
    let data = vec![7u8; 10_000];
    let a = store.store_bytes(Kind::Object, &data).unwrap();
    assert!(a.new);
    assert_eq!(a.digest, VerityHasher::digest(&data));
    let b = store.store_bytes(Kind::Object, &data).unwrap();
    assert!(!b.new, "second store of the same bytes must be a dedup hit");
    let path = store.object_path(&a.digest);
    assert_eq!(fs::read(&path).unwrap(), data);
    let md = fs::metadata(&path).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o444);
    assert_eq!(md.nlink(), 1);
    // Nothing left in tmp/.
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn damaged_object_with_wrong_size_is_replaced() {
    let (_dir, store) = new_store();
    let data = b"some object content that is longer than sixty-four bytes, really it is".repeat(3);
    let s = store.store_bytes(Kind::Object, &data).unwrap();
    let path = store.object_path(&s.digest);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, b"trunc").unwrap();
    let again = store.store_bytes(Kind::Object, &data).unwrap();
    assert!(again.new, "a wrong-size object is not a dedup hit");
    assert_eq!(fs::read(&path).unwrap(), data);
}

#[test]
fn store_file_keeps_holes_and_hashes_bytes_stored() {
    let (dir, store) = new_store();
    let src = dir.path().join("sparse");
    {
        let f = fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 20 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    }
    let expected = VerityHasher::digest(&fs::read(&src).unwrap());
    let f = fs::File::open(&src).unwrap();
    let s = store.store_file(Kind::Object, f.as_fd(), &src).unwrap();
    assert_eq!(s.digest, expected);
    assert_eq!(s.size, 64 << 20);
    let md = fs::metadata(store.object_path(&s.digest)).unwrap();
    assert_eq!(md.len(), 64 << 20);
    assert!(
        md.blocks() * 512 < 1 << 20,
        "object should stay sparse, has {} blocks",
        md.blocks()
    );
    assert_eq!(
        store.verify(Kind::Object, &s.digest).unwrap(),
        Verdict::Good { size: 64 << 20 }
    );
    // Same content again: dedup.
    let f = fs::File::open(&src).unwrap();
    assert!(!store.store_file(Kind::Object, f.as_fd(), &src).unwrap().new);
}

#[test]
fn concurrent_writers_of_one_object_are_safe() {
    let (_dir, store) = new_store();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| store.store_bytes(Kind::Object, &data).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let digest = results[0].digest;
    assert!(results.iter().all(|r| r.digest == digest));
    assert!(results.iter().filter(|r| r.new).count() >= 1);
    assert_eq!(fs::read(store.object_path(&digest)).unwrap(), data);
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn refs_round_trip_and_validate() {
    let (_dir, store) = new_store();
    let img = store.store_bytes(Kind::Image, b"pretend image").unwrap();
    store.write_ref("myapp/deps", &img.digest).unwrap();
    assert_eq!(store.read_ref("myapp/deps").unwrap(), img.digest);
    assert_eq!(store.resolve("myapp/deps").unwrap(), img.digest);
    assert_eq!(store.resolve(&img.digest.to_hex()).unwrap(), img.digest);
    let refs = store.list_refs().unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].0, "myapp/deps");
    assert!(matches!(
        store.read_ref("nope"),
        Err(StoreError::RefNotFound { .. })
    ));
    assert!(matches!(
        store.write_ref("../evil", &img.digest),
        Err(StoreError::InvalidRef { .. })
    ));
    let missing = Digest::from_bytes([0xab; 32]);
    assert!(matches!(
        store.resolve(&missing.to_hex()),
        Err(StoreError::ImageNotFound { .. })
    ));
    assert!(matches!(
        store.resolve(&missing.to_hex().to_uppercase()),
        Err(StoreError::InvalidDigest { .. })
    ));
    store.remove_ref("myapp/deps").unwrap();
    assert!(store.list_refs().unwrap().is_empty());
}

#[test]
fn ref_through_symlink_is_refused() {
    let (dir, store) = new_store();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, store.root().join("refs/evil")).unwrap();
    let img = store.store_bytes(Kind::Image, b"x").unwrap();
    assert!(store.write_ref("evil/name", &img.digest).is_err());
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside the store"
    );
}

fn write_marker(store: &Store, boot_id: &str, started_ns: i128) {
    let body = serde_json::json!({"pid": 1, "boot_id": boot_id, "started_ns": started_ns});
    fs::write(store.root().join("tmp/writer-test.json"), body.to_string()).unwrap();
}

fn corrupt(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut data = fs::read(path).unwrap();
    data[0] ^= 0xff;
    fs::write(path, data).unwrap();
}

#[test]
fn recovery_after_crash_quarantines_objects_written_since_marker() {
    let (_dir, store) = new_store();
    let good = store.store_bytes(Kind::Object, &[1u8; 5000]).unwrap();
    let bad = store.store_bytes(Kind::Object, &[2u8; 5000]).unwrap();
    corrupt(&store.object_path(&bad.digest));
    // A marker from another boot: the machine went down while a writer was active.
    write_marker(&store, "some-other-boot", 0);
    let report = store.recover().unwrap();
    assert_eq!(report.crashed_writers, 1);
    assert!(report.rechecked >= 2);
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    assert!(!store.object_path(&bad.digest).exists());
    assert!(report.quarantined[0].exists(), "quarantined copy is kept");
    assert!(store.object_path(&good.digest).exists());
    assert!(!store.root().join("tmp/writer-test.json").exists());
    // A later store of the same bytes writes a fresh, good object.
    assert!(store.store_bytes(Kind::Object, &[2u8; 5000]).unwrap().new);
}

#[test]
fn recovery_after_kill_in_same_boot_trusts_objects() {
    let (_dir, store) = new_store();
    let obj = store.store_bytes(Kind::Object, &[3u8; 5000]).unwrap();
    corrupt(&store.object_path(&obj.digest));
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    write_marker(&store, boot.trim(), 0);
    let report = store.recover().unwrap();
    assert_eq!(report.killed_writers, 1);
    assert_eq!(
        report.rechecked, 0,
        "a killed writer lost nothing: no re-hash"
    );
    assert!(store.object_path(&obj.digest).exists());
}

#[test]
fn live_writer_marker_is_left_alone() {
    let (_dir, store) = new_store();
    let session = store.begin_write().unwrap();
    let other = Store::open(store.root()).unwrap();
    let report = other.recover().unwrap();
    assert_eq!(report.killed_writers + report.crashed_writers, 0);
    let img = store.store_bytes(Kind::Image, b"img").unwrap();
    session.commit(&[("a/b", img.digest)]).unwrap();
    drop(session);
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
    assert_eq!(store.read_ref("a/b").unwrap(), img.digest);
}

/// Writers of one ref at once lose nothing: every value but the last is in its history,
/// once (the read, append and replace of each write happen under a lock).
#[test]
fn concurrent_writes_to_one_ref_keep_its_whole_history() {
    let (_d, store) = new_store();
    let threads = 4;
    let each = 25;
    std::thread::scope(|s| {
        for t in 0..threads {
            let store = &store;
            s.spawn(move || {
                for i in 0..each {
                    let d = Digest::from_bytes([(t * each + i) as u8 + 1; 32]);
                    store.write_ref("app/deps", &d).expect("write ref");
                }
            });
        }
    });
    let current = store.read_ref("app/deps").expect("read");
    let history = store.ref_history("app/deps").expect("history");
    assert_eq!(history.len(), threads * each - 1, "{history:?}");
    let mut seen: Vec<Digest> = history.iter().map(|(_, d)| *d).collect();
    seen.push(current);
    seen.sort_by_key(|d| d.to_hex());
    seen.dedup();
    assert_eq!(seen.len(), threads * each, "each value once");
}
