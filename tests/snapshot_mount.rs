//! The core slice end to end: snapshot real trees with the `velo` binary, mount them with real
//! kernel mounts, and compare. Needs root (skips loudly without it; CI runs as root).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::fixtures::{every_kind_tree, far_offset, sh};
use common::{Env, can_mount, compare_trees, is_mount_point, path_str};

/// The sparse file of the every-kind tree: over 4 GiB, mostly holes.
const SPARSE: u64 = 5 << 30;

#[test]
fn round_trip_keeps_everything() {
    if !can_mount("round_trip_keeps_everything") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    every_kind_tree(&src, SPARSE);
    let v = env.json(&["snapshot", path_str(&src), "--ref", "t/all"]);
    assert_eq!(v["ref"], "t/all");
    assert_eq!(v["files"], 8, "{v}"); // tiny medium(+hardlink) big(+link) bigger empty sparse badname f
    assert!(v["new_objects"].as_u64().unwrap() >= 3, "{v}");
    let mnt = env.path("mnt");
    let m = env.mount("t/all", &mnt, &[]);
    let diffs = compare_trees(&src, &mnt);
    assert!(
        diffs.is_empty(),
        "mount differs from source:\n{}",
        diffs.join("\n")
    );
    // The > 4 GiB sparse file reads its far bytes, and stays sparse in the store.
    let f = fs::File::open(mnt.join("sparse")).unwrap();
    let mut buf = [0u8; 3];
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut buf, far_offset(SPARSE)).unwrap();
    assert_eq!(&buf, b"far");
    drop(f);
    // Mounted read-only, nosuid, nodev.
    let opts = mount_options(&mnt);
    for o in ["ro", "nosuid", "nodev"] {
        assert!(opts.split(',').any(|x| x == o), "missing {o} in {opts}");
    }
    assert!(
        fs::write(mnt.join("tiny"), b"no").is_err(),
        "read-only mount accepted a write"
    );
    m.umount();
    assert!(!is_mount_point(&mnt));
}

fn mount_options(path: &Path) -> String {
    let abs = fs::canonicalize(path).unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find(|l| l.split(' ').nth(4).map(Path::new) == Some(abs.as_path()))
        .and_then(|l| l.split(' ').nth(5))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn whiteouts_are_escaped_the_composefs_way() {
    if !can_mount("whiteouts_are_escaped_the_composefs_way") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    sh("mknod wh c 0 0; echo keep > other", &src);
    env.snapshot(&src, "wh");
    // Reading the image back gives the 0:0 character device again…
    let dump = env.ok(&["inspect", "wh", "--dump"]);
    let line = dump
        .lines()
        .find(|l| l.starts_with("/wh "))
        .expect("wh in dump");
    assert!(
        line.split(' ').nth(2) == Some("20644") && line.split(' ').nth(6) == Some("0"),
        "{line}"
    );
    // …and through overlayfs it is the escaped form (a plain file marked as a whiteout), so a
    // further overlay stacked on the mount treats it as a whiteout — not a hole in this mount.
    let mnt = env.path("mnt");
    let _m = env.mount("wh", &mnt, &[]);
    let md = fs::symlink_metadata(mnt.join("wh")).unwrap();
    assert!(md.is_file() && md.len() == 0);
    assert!(
        common::xattrs(&mnt.join("wh"))
            .contains_key(std::ffi::OsStr::new("trusted.overlay.whiteout"))
    );
    assert_eq!(fs::read_to_string(mnt.join("other")).unwrap(), "keep\n");
}

#[test]
fn cow_writes_land_in_upper_and_store_is_unchanged() {
    if !can_mount("cow_writes_land_in_upper_and_store_is_unchanged") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("pkg")).unwrap();
    fs::write(src.join("pkg/index.js"), "module.exports = 1;\n".repeat(20)).unwrap();
    fs::write(src.join("pkg/gone.js"), "x".repeat(100)).unwrap();
    env.snapshot(&src, "cow");
    let before = env.store_listing();

    let (a, b) = (env.path("t1/node_modules"), env.path("t2/node_modules"));
    let ma = env.mount("cow", &a, &["--cow"]);
    let mb = env.mount("cow", &b, &["--cow"]);
    fs::write(a.join("pkg/index.js"), "changed").unwrap();
    fs::write(a.join("pkg/new.js"), "new").unwrap();
    fs::remove_file(a.join("pkg/gone.js")).unwrap();
    fs::rename(a.join("pkg"), a.join("pkg2")).unwrap();
    // B and the source see none of A's writes.
    assert_eq!(
        fs::read_to_string(b.join("pkg/index.js")).unwrap(),
        "module.exports = 1;\n".repeat(20)
    );
    assert!(
        b.join("pkg/gone.js").exists()
            && !b.join("pkg/new.js").exists()
            && !b.join("pkg2").exists()
    );
    assert!(src.join("pkg/gone.js").exists());
    let after = env.store_listing();
    let objects = |l: &std::collections::BTreeMap<std::path::PathBuf, (u64, u32, String)>| {
        l.iter()
            .filter(|(p, _)| p.starts_with("objects") || p.starts_with("images"))
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        objects(&before),
        objects(&after),
        "objects/images changed under a CoW mount"
    );

    let ua = ma.umount();
    let upper = ua["removed_upper"]
        .as_str()
        .expect("managed upper reported");
    assert!(
        !Path::new(upper).exists(),
        "managed upper dir must be removed at umount"
    );
    mb.umount();
    assert!(
        fs::read_dir(env.store.join("mounts"))
            .unwrap()
            .next()
            .is_none(),
        "mount slots left behind"
    );
}

#[test]
fn upper_dir_persists_and_is_never_mounted_twice() {
    if !can_mount("upper_dir_persists_and_is_never_mounted_twice") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), "a".repeat(100)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o751)).unwrap();
    env.snapshot(&src, "up");
    let upper = env.path("upper");
    let t1 = env.path("t1");
    let upper_s = path_str(&upper).to_owned();
    let m = env.mount("up", &t1, &["--upper", &upper_s]);
    // The merged root looks like the snapshot's root, not like a fresh directory.
    assert_eq!(fs::metadata(&t1).unwrap().mode() & 0o7777, 0o751);
    fs::write(t1.join("b"), "written").unwrap();
    assert_eq!(fs::read_to_string(upper.join("b")).unwrap(), "written");
    let err = env.fails(&[
        "mount",
        "up",
        path_str(&env.path("t2")),
        "--upper",
        &upper_s,
    ]);
    assert!(err.contains("already the upper dir"), "{err}");
    assert!(!is_mount_point(&env.path("t2")));
    m.umount();
    assert_eq!(
        fs::read_to_string(upper.join("b")).unwrap(),
        "written",
        "--upper writes persist"
    );
    let m = env.mount("up", &t1, &["--upper", &upper_s]);
    assert_eq!(fs::read_to_string(t1.join("b")).unwrap(), "written");
    m.umount();
}

#[test]
fn dedup_within_and_across_trees() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    for (dir, unique) in [(&a, "A"), (&b, "B")] {
        fs::create_dir_all(dir.join("x/y")).unwrap();
        for i in 0..20 {
            fs::write(dir.join(format!("x/shared{i}")), format!("{i}").repeat(200)).unwrap();
        }
        fs::write(dir.join("x/y/dup1"), "same content ".repeat(50)).unwrap();
        fs::write(dir.join("x/y/dup2"), "same content ".repeat(50)).unwrap();
        fs::write(dir.join("own"), unique.repeat(500)).unwrap();
    }
    let first = env.json(&["snapshot", path_str(&a), "--ref", "a"]);
    assert_eq!(first["files"], 23);
    assert_eq!(
        first["new_objects"], 22,
        "dup1/dup2 share one object: {first}"
    );
    assert_eq!(first["reused_objects"], 1, "{first}");
    let again = env.json(&["snapshot", path_str(&a), "--ref", "a2"]);
    assert_eq!(again["new_objects"], 0, "{again}");
    assert_eq!(again["digest"], first["digest"]);
    let other = env.json(&["snapshot", path_str(&b), "--ref", "b"]);
    assert_eq!(other["new_objects"], 1, "only b/own is new: {other}");
    let objects = common::walkdir(&env.store.join("objects"))
        .into_iter()
        .filter(|p| p.is_file())
        .count();
    assert_eq!(objects, 23);
}

#[test]
fn unchanged_tree_hashes_nothing_the_second_time() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("f{i}")), format!("file {i} ").repeat(30)).unwrap();
    }
    // The first runs may find files too fresh to trust their timestamps (see RACY_WINDOW);
    // by the third the tree is older than that window.
    env.json(&["snapshot", path_str(&src)]);
    env.json(&["snapshot", path_str(&src)]);
    let v = env.json(&["snapshot", path_str(&src)]);
    assert_eq!(v["stat_cache_hits"], 50, "{v}");
    // A modified file is hashed again, even with its size and mtime unchanged.
    let md = fs::metadata(src.join("f3")).unwrap();
    fs::write(
        src.join("f3"),
        "FILE 3 ".repeat(30).replacen("FILE", "file", 0),
    )
    .unwrap();
    let mtime =
        std::time::UNIX_EPOCH + std::time::Duration::new(md.mtime() as u64, md.mtime_nsec() as u32);
    fs::File::options()
        .write(true)
        .open(src.join("f3"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let v2 = env.json(&["snapshot", path_str(&src)]);
    assert_eq!(v2["stat_cache_hits"], 49, "{v2}");
    assert_ne!(v2["digest"], v["digest"]);
}

#[test]
fn same_tree_same_image_and_fsck_erofs_accepts_it() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/file"), "content ".repeat(100)).unwrap();
    fs::write(src.join("small"), "s").unwrap();
    std::os::unix::fs::symlink("sub/file", src.join("link")).unwrap();
    let d1 = env.snapshot(&src, "one");
    let other = Env::new();
    let d2 = other.snapshot(&src, "two");
    assert_eq!(
        d1, d2,
        "same tree + same options must give the same image digest"
    );
    let img1 = fs::read(env.store.join("images").join(&d1)).unwrap();
    let img2 = fs::read(other.store.join("images").join(&d2)).unwrap();
    assert_eq!(img1, img2, "images must be byte-identical");
    fsck_erofs(&env.store.join("images").join(&d1));
}

fn fsck_erofs(image: &Path) {
    let out = Command::new("fsck.erofs")
        .arg("--extract")
        .arg(image)
        .output()
        .expect("fsck.erofs (Debian erofs-utils) must be installed: apt-get install erofs-utils");
    assert!(
        out.status.success(),
        "fsck.erofs rejected {}:\n{}",
        image.display(),
        common::describe(&out)
    );
}

#[test]
fn fsck_erofs_accepts_every_kind_of_image() {
    if !can_mount("fsck_erofs_accepts_every_kind_of_image") {
        return; // the tree needs root to build (devices, owners)
    }
    let env = Env::new();
    let src = env.path("src");
    every_kind_tree(&src, SPARSE);
    let d = env.snapshot(&src, "k");
    fsck_erofs(&env.store.join("images").join(d));
}

#[test]
fn reproducible_mode_ignores_mtimes_after_the_epoch() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    for (dir, when) in [(&a, "@1700000000"), (&b, "@1750000000")] {
        fs::create_dir_all(dir.join("d")).unwrap();
        fs::write(dir.join("d/f"), "same bytes ".repeat(20)).unwrap();
        sh(&format!("touch -h -d {when} d/f d ."), dir);
    }
    let snap = |dir: &Path| {
        let out = env
            .velo(&["--json", "snapshot", "--reproducible", path_str(dir)])
            .env("SOURCE_DATE_EPOCH", "1600000000")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::describe(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["digest"].clone()
    };
    assert_eq!(snap(&a), snap(&b));
    let plain_a = env.json(&["snapshot", path_str(&a)]);
    let plain_b = env.json(&["snapshot", path_str(&b)]);
    assert_ne!(
        plain_a["digest"], plain_b["digest"],
        "without --reproducible mtimes are kept"
    );
}

#[test]
fn bad_input_gets_clear_errors_and_leaves_the_store_alone() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "x".repeat(100)).unwrap();
    env.snapshot(&src, "ok");
    let before = env.store_listing();

    let err = env.fails(&["snapshot", path_str(&env.path("missing"))]);
    assert!(
        err.contains("missing") && err.contains("no such directory"),
        "{err}"
    );
    let err = env.fails(&["snapshot", path_str(&src.join("f"))]);
    assert!(err.contains("not a directory"), "{err}");
    let err = env.fails(&["snapshot", path_str(&src), "--ref", "../escape"]);
    assert!(err.contains("invalid ref name"), "{err}");
    let err = env.fails(&["snapshot", path_str(&env.store)]);
    assert!(err.contains("overlaps the store"), "{err}");
    let missing = "ab".repeat(32);
    let err = env.fails(&["inspect", &missing]);
    assert!(
        err.contains(&missing) && err.contains("not in store"),
        "{err}"
    );
    let err = env.fails(&["inspect", "no/such/ref"]);
    assert!(err.contains("no ref \"no/such/ref\""), "{err}");
    assert_eq!(
        before,
        env.store_listing(),
        "a failed command changed the store"
    );

    // A corrupt meta.json is refused by every command, naming the file.
    let meta = env.store.join("meta.json");
    let good = fs::read(&meta).unwrap();
    fs::write(
        &meta,
        b"{\"format\": \"velo-store\", \"version\": 1, \"verity\"",
    )
    .unwrap();
    let corrupt_listing = env.store_listing();
    for args in [
        vec!["ls"],
        vec!["snapshot", path_str(&src)],
        vec!["inspect", "ok"],
    ] {
        let err = env.fails(&args);
        assert!(err.contains("meta.json is corrupt"), "{args:?}: {err}");
    }
    assert_eq!(corrupt_listing, env.store_listing());
    fs::write(&meta, &good).unwrap();
}

#[test]
fn mount_refusals() {
    if !can_mount("mount_refusals") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "x".repeat(100)).unwrap();
    env.snapshot(&src, "r");
    let before = env.store_listing();

    let real = env.path("real");
    fs::create_dir(&real).unwrap();
    let link = env.path("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = env.fails(&["mount", "r", path_str(&link)]);
    assert!(err.contains("symlink") && err.contains("link"), "{err}");
    let err = env.fails(&["mount", "r", path_str(&src.join("f"))]);
    assert!(err.contains("not a directory"), "{err}");
    let err = env.fails(&["mount", "r", path_str(&env.path("nodir")), "--no-mkdir"]);
    assert!(err.contains("does not exist"), "{err}");
    let err = env.fails(&["mount", &"cd".repeat(32), path_str(&real)]);
    assert!(err.contains("not in store"), "{err}");
    let err = env.fails(&["mount", "nope", path_str(&real)]);
    assert!(err.contains("no ref"), "{err}");
    assert_eq!(
        before,
        env.store_listing(),
        "a refused mount changed the store"
    );
    // Mounting over a velo mount is refused. (A successful mount records the ref's last use.)
    let m = env.mount("r", &real, &[]);
    let during = env.store_listing();
    let err = env.fails(&["mount", "r", path_str(&real)]);
    assert!(err.contains("already a velo mount"), "{err}");
    assert_eq!(
        during,
        env.store_listing(),
        "a refused mount changed the store"
    );
    m.umount();
    assert!(!is_mount_point(&real) && !is_mount_point(&link));
}

#[test]
fn umount_only_removes_velo_mounts() {
    if !can_mount("umount_only_removes_velo_mounts") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    env.snapshot(&src, "u");
    let dir = env.path("tmpfs");
    let _tmpfs = common::Tmpfs::mount(&dir, "velo-test", None);
    let err = env.fails(&["umount", path_str(&dir)]);
    assert!(
        err.contains("tmpfs") && err.contains("velo only unmounts what it mounted"),
        "{err}"
    );
    assert!(is_mount_point(&dir), "velo removed a mount it did not make");
    let err = env.fails(&["umount", path_str(&src)]);
    assert!(err.contains("not a mount point"), "{err}");
}

#[test]
fn without_root_mounting_is_refused_and_unreadable_files_are_named() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED without_root_…: needs root to switch to another user");
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("readable"), "r".repeat(100)).unwrap();
    fs::write(src.join("secret"), "s".repeat(100)).unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    // nobody owns the store and can traverse to the tree.
    for p in [env.dir.path(), src.as_path()] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::create_dir(&env.store).unwrap();
    rustix::fs::chown(
        &env.store,
        Some(rustix::fs::Uid::from_raw(65534)),
        Some(rustix::fs::Gid::from_raw(65534)),
    )
    .unwrap();

    let out = common::velo_as_nobody(&env.store)
        .args(["snapshot", path_str(&src), "--ref", "s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("secret") && err.contains("Permission denied"),
        "{err}"
    );
    assert!(err.contains("no ref was written"), "{err}");

    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o644)).unwrap();
    let out = common::velo_as_nobody(&env.store)
        .args(["snapshot", path_str(&src), "--ref", "s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "non-root snapshot into an own store: {}",
        common::describe(&out)
    );
    let out = common::velo_as_nobody(&env.store)
        .args(["mount", "s", path_str(&env.path("mnt"))])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
    assert!(
        !env.path("mnt").exists(),
        "a refused mount must not create its target"
    );
}

/// A file written to while velo snapshots the tree fails the snapshot, naming the file, and
/// no ref is written. Whether a given snapshot overlaps a write is up to the scheduler (on a
/// loaded machine the writer may not run while velo reads the file), so the test snapshots
/// until one overlapped — each attempt under its own ref — and checks every outcome: a
/// success is a snapshot no write disturbed (its ref is there), a failure names the file and
/// writes no ref. It fails only if no write ever overlapped in 50 attempts.
#[test]
fn a_tree_changing_during_the_snapshot_fails_clearly_and_writes_no_ref() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..200 {
        fs::write(src.join(format!("f{i}")), "x".repeat(1000)).unwrap();
    }
    // Big enough that reading it takes a while: a wide window for the writer.
    fs::write(src.join("growing.log"), "start\n".repeat(1 << 20)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), src.join("growing.log"));
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(b"another line of log output\n").unwrap();
            }
        })
    };
    let mut failed = None;
    for attempt in 0..50 {
        let name = format!("moving-{attempt}");
        let out = env
            .velo(&["snapshot", path_str(&src), "--ref", &name])
            .output()
            .unwrap();
        let has_ref = env.store.join("refs").join(&name).exists();
        if out.status.success() {
            assert!(has_ref, "a snapshot that succeeded writes its ref");
            continue;
        }
        assert!(!has_ref, "no ref after a failed snapshot");
        failed = Some(String::from_utf8_lossy(&out.stderr).into_owned());
        break;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let err = failed.expect("no snapshot in 50 overlapped a write to growing.log");
    assert!(
        err.contains("growing.log") && err.contains("changed while being snapshotted"),
        "{err}"
    );
}

#[test]
fn a_path_too_long_for_the_kernel_is_named() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    // 30 levels of 200-byte names: over PATH_MAX (4096), built fd-relative.
    let mut dir = rustix::fs::open(
        &src,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let name = "n".repeat(200);
    for _ in 0..30 {
        rustix::fs::mkdirat(&dir, name.as_str(), rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
        dir = rustix::fs::openat(
            &dir,
            name.as_str(),
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
    }
    let err = env.fails(&["snapshot", path_str(&src), "--ref", "long"]);
    assert!(err.contains(&name) && err.contains("too long"), "{err}");
    assert!(!env.store.join("refs/long").exists());
    // Clean up the deep tree from the inside (paths are too long for remove_dir_all).
    drop(dir);
    let _ = Command::new("rm").arg("-rf").arg(&src).status();
}

#[test]
fn ls_and_doctor_report_in_json() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "y".repeat(1000)).unwrap();
    let digest = env.snapshot(&src, "app/deps");
    let ls = env.json(&["ls"]);
    assert_eq!(ls["refs"][0]["name"], "app/deps");
    assert_eq!(ls["refs"][0]["digest"], digest.as_str());
    assert_eq!(ls["images"][0]["digest"], digest.as_str());
    assert_eq!(ls["images"][0]["files"], 1);
    assert_eq!(ls["images"][0]["bytes"], 1000);
    assert!(ls["images"][0]["image_bytes"].as_u64().unwrap() > 0);
    assert_eq!(ls["images"][0]["refs"][0], "app/deps");

    let out = env.velo(&["--json", "doctor"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = |name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(check("store")["status"], "ok");
    assert_eq!(check("store mode")["status"], "ok");
    let verity = check("fs-verity");
    let kernel_has_verity = velo_store_supports_verity(&env.store);
    assert_eq!(verity["status"] == "ok", kernel_has_verity, "{verity}");
    if !kernel_has_verity {
        assert!(
            verity["detail"].as_str().unwrap().contains("not supported"),
            "{verity}"
        );
    }
    if can_mount("ls_and_doctor_report_in_json (mount probe)") {
        assert_eq!(check("mount stack")["status"], "ok", "{v}");
        assert!(out.status.success(), "{}", common::describe(&out));
    }
}

fn velo_store_supports_verity(store: &Path) -> bool {
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("meta.json")).unwrap()).unwrap();
    meta["verity"] == "enabled"
}

#[test]
fn a_busy_mount_is_refused_unless_lazy() {
    if !can_mount("a_busy_mount_is_refused_unless_lazy") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "busy ".repeat(100)).unwrap();
    env.snapshot(&src, "busy");
    let mnt = env.path("mnt");
    let m = env.mount("busy", &mnt, &[]);
    let ls = env.json(&["ls"]);
    assert_eq!(
        ls["mounts"][0]["target"],
        path_str(&fs::canonicalize(&mnt).unwrap()),
        "{ls}"
    );
    assert_eq!(ls["mounts"][0]["writable"], false);
    let open = fs::File::open(mnt.join("f")).unwrap();
    let err = env.fails(&["umount", path_str(&mnt)]);
    assert!(err.contains("busy") && err.contains("--lazy"), "{err}");
    assert!(
        is_mount_point(&mnt),
        "a refused umount must leave the mount"
    );
    let v = env.json(&["umount", "--lazy", path_str(&mnt)]);
    assert_eq!(v["record_found"], true, "{v}");
    assert!(
        !is_mount_point(&mnt),
        "--lazy detaches it while a file is still open"
    );
    drop(open);
    std::mem::forget(m); // already unmounted
}
