//! `snapshot_unstored` gives the image `snapshot` stores, byte for byte, and says where each
//! object's bytes are; and a user's own tree passes `map_to_user` unchanged.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timestamps, XattrFlags};
use velo_image::{
    ImageError, NoProgress, Progress, SnapshotOptions, inspect, map_to_user, read_image, snapshot,
    snapshot_unstored, write_image,
};
use velo_objects::verity::VerityHasher;
use velo_objects::{Kind, Store};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", path.display()));
}

fn mtime(path: &Path, sec: i64, nsec: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    let ts = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(CWD, path, &ts, AtFlags::SYMLINK_NOFOLLOW).expect("utimensat");
}

fn mknod(path: &Path, kind: FileType, major: u32, minor: u32) {
    rustix::fs::mknodat(
        CWD,
        path,
        kind,
        Mode::from_raw_mode(0o644),
        rustix::fs::makedev(major, minor),
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A POSIX ACL xattr value: owner rwx, user 1000 r-x, group r-x, mask r-x, other r-x.
fn acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 7u16, u32::MAX),
        (0x02, 5, 1000),
        (0x04, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 5, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Every kind of entry a snapshot keeps (as tests/common/fixtures.rs's `every_kind_tree`, made
/// without setfattr/setfacl): inline, empty, dense, large (> the 16 MiB buffered limit, so it
/// streams), sparse, hardlinked and duplicate files, set-id/sticky bits, nanosecond mtimes,
/// `user.*` and ACL xattrs, symlinks, a fifo and a socket, a non-UTF-8 name; as root also
/// owners, `trusted.*`/`security.*`/the tree's own `trusted.overlay.*` xattrs, device nodes
/// and whiteouts.
fn every_kind_tree(src: &Path) {
    fs::create_dir_all(src.join("d/empty")).unwrap();
    fs::create_dir_all(src.join("deep/a/b/c")).unwrap();
    fs::create_dir_all(src.join("ovl")).unwrap();
    fs::create_dir_all(src.join("a")).unwrap();
    fs::create_dir_all(src.join("b")).unwrap();
    fs::write(src.join("tiny"), "tiny").unwrap();
    fs::write(src.join("empty"), "").unwrap();
    fs::write(src.join("inline64"), [7u8; 64]).unwrap();
    fs::write(src.join("just-over"), [8u8; 65]).unwrap();
    fs::write(src.join("medium"), pattern(5000, 1)).unwrap();
    fs::write(src.join("big"), pattern(300_000, 2)).unwrap();
    fs::write(src.join("large"), pattern((16 << 20) + 12_345, 3)).unwrap();
    fs::write(src.join("a/dup"), pattern(1000, 4)).unwrap();
    fs::write(src.join("b/dup"), pattern(1000, 4)).unwrap();
    fs::write(src.join("deep/a/b/c/f"), "x\n").unwrap();
    // Sparse: data at the start, in the middle and near the end of 64 MiB.
    {
        let f = fs::File::create(src.join("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        for (at, seed) in [(0u64, 5u32), (20 << 20, 6), ((64 << 20) - 5000, 7)] {
            velo_objects::fsutil::pwrite_all(
                std::os::fd::AsFd::as_fd(&f),
                &pattern(3000, seed),
                at,
            )
            .unwrap();
        }
    }
    // Hardlinks: the first name in path order is the link for "zz-target".
    fs::hard_link(src.join("medium"), src.join("hardlink")).unwrap();
    fs::write(src.join("zz-target"), pattern(777, 8)).unwrap();
    fs::hard_link(src.join("zz-target"), src.join("aa-link")).unwrap();
    fs::hard_link(src.join("big"), src.join("deep/a/b/c/biglink")).unwrap();
    std::os::unix::fs::symlink("tiny", src.join("rel")).unwrap();
    std::os::unix::fs::symlink("/abs/dangling", src.join("dang")).unwrap();
    std::os::unix::fs::symlink("deep/a", src.join("dirlink")).unwrap();
    rustix::fs::mknodat(
        CWD,
        src.join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    fs::write(src.join(OsStr::from_bytes(b"bad\xffname")), "").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (p, mode) in [
        ("medium", 0o4755),
        ("d", 0o2755),
        ("d/empty", 0o1777),
        ("big", 0o640),
    ] {
        fs::set_permissions(src.join(p), fs::Permissions::from_mode(mode)).unwrap();
    }
    xattr(&src.join("medium"), "user.k", b"v");
    xattr(&src.join("ovl"), "user.overlay.opaque", b"y");
    xattr(&src.join("big"), "user.overlay.whiteout", b"");
    xattr(&src.join("medium"), "system.posix_acl_access", &acl());
    xattr(&src.join("d"), "system.posix_acl_default", &acl());
    if is_root() {
        std::os::unix::fs::lchown(src.join("tiny"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(src.join("rel"), Some(4321), Some(8765)).unwrap();
        xattr(&src.join("medium"), "trusted.t", b"tv");
        xattr(&src.join("medium"), "security.s", b"sv");
        xattr(&src.join("d"), "trusted.overlay.opaque", b"y");
        xattr(&src.join("ovl"), "trusted.overlay.opaque", b"x");
        xattr(&src.join("big"), "trusted.overlay.redirect", b"/elsewhere");
        mknod(&src.join("cdev"), FileType::CharacterDevice, 1, 3);
        mknod(&src.join("bdev"), FileType::BlockDevice, 7, 0);
        mknod(&src.join("ovl/whiteout"), FileType::CharacterDevice, 0, 0);
        mknod(&src.join("root-whiteout"), FileType::CharacterDevice, 0, 0);
    }
    mtime(&src.join("tiny"), 1_234_567_890, 123_456_789);
    mtime(&src.join("deep/a/b"), 1_000_000_000, 500_000_000);
}

#[test]
fn unstored_image_is_the_stored_one_and_names_where_each_object_is() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    every_kind_tree(&src);
    let store = Store::open_or_create(dir.path().join("store")).unwrap();
    for opts in [
        SnapshotOptions::default(),
        SnapshotOptions {
            reproducible: Some(1_100_000_000),
            jobs: Some(3),
            ..Default::default()
        },
    ] {
        let stored = snapshot(&store, &src, &opts, &NoProgress).unwrap();
        let unstored = snapshot_unstored(&src, &opts, &NoProgress).unwrap();
        let image = inspect::read_image_bytes(&store, &stored.digest).unwrap();
        assert!(unstored.image == image, "the images differ ({opts:?})");
        assert_eq!(unstored.digest, stored.digest);
        assert_eq!(VerityHasher::digest(&unstored.image), unstored.digest);

        let r = &unstored.report;
        assert_eq!(r.digest, stored.digest);
        assert_eq!(r.source, stored.source);
        assert_eq!(
            (
                r.files,
                r.dirs,
                r.symlinks,
                r.specials,
                r.bytes,
                r.inline_files
            ),
            (
                stored.files,
                stored.dirs,
                stored.symlinks,
                stored.specials,
                stored.bytes,
                stored.inline_files
            )
        );
        assert_eq!(r.image_bytes, stored.image_bytes);
        // fifo and socket; as root also two devices and two whiteouts.
        assert_eq!(r.specials, if is_root() { 6 } else { 2 });
        assert_eq!(r.files, 13); // inodes: hardlinks once, duplicates twice

        // The objects are the image's, once each, in the order the image gives.
        let fs = read_image(&unstored.image, "test").unwrap();
        let want = inspect::objects_in_path_order(&fs);
        let got: Vec<_> = unstored
            .objects
            .iter()
            .map(|o| (o.digest, o.size))
            .collect();
        assert_eq!(got, want);
        assert_eq!(r.objects, want.len() as u64);
        assert_eq!(r.object_bytes, want.iter().map(|(_, s)| s).sum::<u64>());
        // Each path is absolute, the first with its content, and holds bytes of its digest.
        for o in &unstored.objects {
            assert!(
                o.path.is_absolute() && o.path.starts_with(&r.source),
                "{o:?}"
            );
            let mut hasher = VerityHasher::new();
            std::io::copy(&mut fs::File::open(&o.path).unwrap(), &mut hasher).unwrap();
            assert_eq!(hasher.len(), o.size, "{}", o.path.display());
            assert_eq!(hasher.finalize(), o.digest, "{}", o.path.display());
            assert!(store.has(Kind::Object, &o.digest, o.size).unwrap());
        }
        let rel: Vec<_> = unstored
            .objects
            .iter()
            .map(|o| o.path.strip_prefix(&r.source).unwrap().to_owned())
            .collect();
        assert!(rel.contains(&"a/dup".into()) && !rel.contains(&"b/dup".into()));
        assert!(rel.contains(&"aa-link".into()) && !rel.contains(&"zz-target".into()));
        assert!(rel.contains(&"large".into()) && rel.contains(&"sparse".into()));
        assert!(!rel.contains(&"tiny".into()), "inline files are no objects");
    }
}

/// Appends to a file, or adds one to a directory, between the walk and the reading of contents.
struct ChangeAfterWalk<'a>(&'a Path, bool);

impl Progress for ChangeAfterWalk<'_> {
    fn storing(&self, _files: u64, _bytes: u64) {
        if self.1 {
            let mut f = fs::OpenOptions::new().append(true).open(self.0).unwrap();
            f.write_all(b"more").unwrap();
        } else {
            fs::write(self.0, "new").unwrap();
        }
    }
}

#[test]
fn unstored_fails_naming_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/log"), "x".repeat(1000)).unwrap();
    fs::write(src.join("other"), "y".repeat(1000)).unwrap();

    let err = snapshot_unstored(
        &src,
        &SnapshotOptions::default(),
        &ChangeAfterWalk(&src.join("sub/log"), true),
    )
    .unwrap_err();
    match &err {
        ImageError::Changed { path, .. } => assert!(path.ends_with("sub/log"), "{err}"),
        other => panic!("not a change: {other}"),
    }
    assert!(err.to_string().contains("changed while being snapshotted"));

    let err = snapshot_unstored(
        &src,
        &SnapshotOptions::default(),
        &ChangeAfterWalk(&src.join("sub/added"), false),
    )
    .unwrap_err();
    match &err {
        ImageError::Changed { path, .. } => assert!(path.ends_with("sub"), "{err}"),
        other => panic!("not a change: {other}"),
    }
}

#[test]
fn unstored_refuses_what_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("file"), "x").unwrap();
    for p in ["file", "missing"] {
        let err = snapshot_unstored(
            &dir.path().join(p),
            &SnapshotOptions::default(),
            &NoProgress,
        )
        .unwrap_err();
        assert!(matches!(err, ImageError::BadSource { .. }), "{p}: {err}");
    }
    let bad_ref = SnapshotOptions {
        ref_name: Some("../escape".into()),
        ..Default::default()
    };
    assert!(snapshot_unstored(dir.path(), &bad_ref, &NoProgress).is_err());
}

/// What an ordinary user's client sends passes the service's mapping unchanged: the rebuilt
/// image is byte-identical, so the tree keeps its digest.
#[test]
fn a_users_tree_round_trips_through_map_to_user() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("pkg/lib")).unwrap();
    fs::write(src.join("pkg/index.js"), "module.exports = 42;\n").unwrap();
    fs::write(src.join("pkg/lib/big.bin"), pattern(100_000, 9)).unwrap();
    fs::hard_link(src.join("pkg/lib/big.bin"), src.join("pkg/same.bin")).unwrap();
    std::os::unix::fs::symlink("pkg/index.js", src.join("main")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(src.join("pkg/lib"), fs::Permissions::from_mode(0o1777)).unwrap();
    xattr(&src.join("pkg/index.js"), "user.origin", b"npm");
    xattr(&src.join("pkg/index.js"), "system.posix_acl_access", &acl());
    xattr(&src.join("pkg"), "user.overlay.opaque", b"y");
    let (uid, gid) = if is_root() {
        mknod(&src.join("pkg/gone"), FileType::CharacterDevice, 0, 0);
        mknod(&src.join("gone"), FileType::CharacterDevice, 0, 0);
        for e in walkdir::WalkDir::new(&src) {
            std::os::unix::fs::lchown(e.unwrap().path(), Some(1000), Some(1000)).unwrap();
        }
        (1000, 1000)
    } else {
        let id = rustix::process::geteuid().as_raw();
        (id, rustix::process::getegid().as_raw())
    };
    let sent = snapshot_unstored(&src, &SnapshotOptions::default(), &NoProgress).unwrap();
    let mut fs = read_image(&sent.image, "from the user").unwrap();
    let report = map_to_user(&mut fs, uid, gid);
    assert!(report.is_unchanged(), "{report:?}");
    let rebuilt = write_image(fs).unwrap();
    assert!(rebuilt == sent.image, "the rebuilt image differs");
}
