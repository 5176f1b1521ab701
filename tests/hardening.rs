//! Hardening (issue 12, items 1–3): no path, store or image an attacker controls steers a root
//! process. Mount targets, upper dirs and `umount` follow no symlink in any component; places
//! velo never mounts over are refused; a store another user could change is refused; an image
//! that is not the one named never reaches the kernel, and `fsck`/`mount --verify` run the
//! same rebuild check as export and pull.
//!
//! Every mount a test makes is undone by a guard, even on failure; mounts at places that must
//! be refused are tried in a private mount namespace (`unshare`), so that even a velo that
//! wrongly accepted them could not change the host's mount table.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, Mounted, can_mount, describe, is_mount_point, path_str};

/// A small tree with two files big enough to be objects, and its snapshot under `ref_name`.
fn snapshot_tree(env: &Env, name: &str, ref_name: &str) -> (PathBuf, String) {
    let src = env.path(name);
    fs::create_dir_all(src.join("lib")).unwrap();
    fs::write(src.join("lib/a.js"), format!("{name}a").repeat(2_000)).unwrap();
    fs::write(src.join("lib/b.js"), format!("{name}b").repeat(4_000)).unwrap();
    let digest = env.snapshot(&src, ref_name);
    (src, digest)
}

/// `velo --store STORE ARGS…` in a private mount namespace of its own (`unshare`): whatever it
/// mounts vanishes with it.
fn velo_in_private_ns(env: &Env, args: &[&OsStr]) -> std::process::Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(common::velo_bin())
        .arg("--store")
        .arg(&env.store)
        .args(args)
        .env_remove("VELO_STORE")
        .output()
        .expect("run unshare (util-linux)")
}

/// Runs `velo ARGS` expecting failure; returns stderr, asserting it names `want`.
fn refused(env: &Env, args: &[&str], want: &[&str]) -> String {
    let err = env.fails(args);
    for w in want {
        assert!(err.contains(w), "velo {args:?}: expected {w:?} in:\n{err}");
    }
    err
}

fn chown(path: &Path, uid: u32) {
    rustix::fs::chown(
        path,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(uid)),
    )
    .unwrap();
}

fn lchown(path: &Path, uid: u32) {
    rustix::fs::chownat(
        rustix::fs::CWD,
        path,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(uid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

// ---- 1. Symlinks in mount paths ---------------------------------------------------------------

#[test]
fn a_target_naming_a_symlink_with_a_trailing_slash_is_refused() {
    if !can_mount("a_target_naming_a_symlink_with_a_trailing_slash_is_refused") {
        return;
    }
    let env = Env::new();
    snapshot_tree(&env, "src", "r");
    let victim = env.path("victim");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("precious"), "keep").unwrap();
    let _undo = Mounted::adopt(&victim, &env.store);
    let link = env.path("link-to-victim");
    std::os::unix::fs::symlink(&victim, &link).unwrap();

    // The trailing slash makes the kernel follow the last component even with O_NOFOLLOW.
    let with_slash = format!("{}/", path_str(&link));
    refused(
        &env,
        &["mount", "r", &with_slash],
        &["symlink", path_str(&link)],
    );
    assert!(!is_mount_point(&victim), "mounted through the symlink");
    assert_eq!(fs::read_to_string(victim.join("precious")).unwrap(), "keep");
}

#[test]
fn a_symlink_another_user_owns_in_a_parent_component_is_refused() {
    if !can_mount("a_symlink_another_user_owns_in_a_parent_component_is_refused") {
        return;
    }
    let env = Env::new();
    snapshot_tree(&env, "src", "r");
    let victim = env.path("victim");
    fs::create_dir(&victim).unwrap();
    let _undo = Mounted::adopt(&victim.join("mnt"), &env.store);
    // An ordinary user's directory, holding a symlink of theirs to where root must not mount.
    let home = env.path("home");
    fs::create_dir(&home).unwrap();
    chown(&home, 65534);
    let link = home.join("project");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    lchown(&link, 65534);

    let target = link.join("mnt");
    let err = refused(
        &env,
        &["mount", "r", path_str(&target)],
        &["symlink", path_str(&link), "real path"],
    );
    assert!(err.contains("component"), "{err}");
    assert!(
        !victim.join("mnt").exists(),
        "the target was created through the symlink"
    );
    assert!(!is_mount_point(&victim.join("mnt")));
    // Also with --no-mkdir and an existing directory behind the link.
    fs::create_dir(victim.join("mnt")).unwrap();
    refused(
        &env,
        &["mount", "r", path_str(&target), "--no-mkdir"],
        &["symlink", path_str(&link)],
    );
    assert!(
        !is_mount_point(&victim.join("mnt")),
        "mounted through the symlink"
    );
}

#[test]
fn an_upper_dir_through_a_symlink_is_refused_and_nothing_is_written_behind_it() {
    if !can_mount("an_upper_dir_through_a_symlink_is_refused_and_nothing_is_written_behind_it") {
        return;
    }
    let env = Env::new();
    snapshot_tree(&env, "src", "r");
    let victim = env.path("victim");
    fs::create_dir(&victim).unwrap();
    let link = env.path("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let target = env.path("t");
    let _undo = Mounted::adopt(&target, &env.store);

    for upper in [link.join("up"), link.clone()] {
        refused(
            &env,
            &["mount", "r", path_str(&target), "--upper", path_str(&upper)],
            &["upper dir", "symlink", path_str(&link)],
        );
        assert!(!is_mount_point(&target));
        let behind: Vec<_> = fs::read_dir(&victim).unwrap().flatten().collect();
        assert!(
            behind.is_empty(),
            "written through the symlink: {:?}",
            behind.iter().map(|e| e.path()).collect::<Vec<_>>()
        );
    }
    // The real path works, and its work dir is beside it.
    let upper = env.path("up");
    let m = env.mount("r", &target, &["--upper", path_str(&upper)]);
    fs::write(target.join("new"), "w").unwrap();
    assert_eq!(fs::read_to_string(upper.join("new")).unwrap(), "w");
    assert!(env.path(".up.velo-work").is_dir());
    m.umount();
}

#[test]
fn umount_through_a_symlinked_path_is_refused() {
    if !can_mount("umount_through_a_symlinked_path_is_refused") {
        return;
    }
    let env = Env::new();
    snapshot_tree(&env, "src", "r");
    let real = env.path("real");
    let target = real.join("mnt");
    let m = env.mount("r", &target, &[]);
    let alias = env.path("alias");
    std::os::unix::fs::symlink(&real, &alias).unwrap();
    refused(
        &env,
        &["umount", path_str(&alias.join("mnt"))],
        &["symlink", path_str(&alias)],
    );
    assert!(is_mount_point(&target), "unmounted through the symlink");
    let v = m.umount();
    assert_eq!(v["target"], path_str(&target));
    assert_eq!(v["record_found"], true, "{v}");
}

#[test]
fn umount_works_on_a_target_whose_name_is_not_utf8() {
    if !can_mount("umount_works_on_a_target_whose_name_is_not_utf8") {
        return;
    }
    let env = Env::new();
    snapshot_tree(&env, "src", "r");
    let dir = env.path("a");
    let odd = env.dir.path().join(OsStr::from_bytes(b"caf\xe9"));
    // In a namespace of its own: a mount point that is not UTF-8 must not appear in the host's
    // mountinfo, which other programs read. The mount vanishes with the namespace whatever
    // happens. Mounted at a UTF-8 path, then its parent renamed (the record keeps the mount's
    // ID), then unmounted by the new name.
    let script = r#"set -e
"$1" --store "$2" mount r "$3/mnt" >/dev/null
mv "$3" "$4"
"$1" --store "$2" --json umount "$4/mnt"
if mountpoint -q "$4/mnt"; then echo "still mounted" >&2; exit 1; fi"#;
    let out = common::sh_in_private_ns(script)
        .arg(common::velo_bin())
        .arg(&env.store)
        .arg(&dir)
        .arg(&odd)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["record_found"], true, "{v}");
    assert!(
        !env.store
            .join("mounts")
            .read_dir()
            .unwrap()
            .flatten()
            .any(|e| { !e.file_name().as_bytes().starts_with(b".") }),
        "the mount's record was left in the store"
    );
}

#[test]
fn targets_velo_never_mounts_over_are_refused() {
    if !can_mount("targets_velo_never_mounts_over_are_refused") {
        return;
    }
    let env = Env::new();
    snapshot_tree(&env, "src", "r");
    let store = env.store.clone();
    let cases: Vec<(PathBuf, &str)> = vec![
        (PathBuf::from("/"), "root directory"),
        (PathBuf::from("/tmp/.."), "root directory"),
        (PathBuf::from("/proc/x"), "under /proc"),
        (PathBuf::from("/proc/sys/fs"), "under /proc"),
        (PathBuf::from("/sys/x"), "under /sys"),
        (PathBuf::from("/sys/kernel"), "under /sys"),
        (store.clone(), "is the store"),
        (store.join("images"), "inside the store"),
        (store.join("new/dir"), "inside the store"),
        (env.dir.path().to_owned(), "holds the store"),
    ];
    for (target, want) in cases {
        let out = velo_in_private_ns(
            &env,
            &[OsStr::new("mount"), OsStr::new("r"), target.as_os_str()],
        );
        assert!(
            !out.status.success(),
            "mounting over {} was accepted:\n{}",
            target.display(),
            describe(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want),
            "{}: expected {want:?} in {err}",
            target.display()
        );
    }
    assert!(
        !store.join("new").exists(),
        "a directory was created inside the store"
    );
    assert!(!Path::new("/proc/x").exists() && !Path::new("/sys/x").exists());
    // Through a path that reaches the store by another name (a bind mount), by identity.
    let other = env.path("other");
    fs::create_dir(&other).unwrap();
    let script = r#"set -e
mount --bind "$3" "$4"
exec "$1" --store "$2" mount r "$4/images""#;
    let out = common::sh_in_private_ns(script)
        .arg(common::velo_bin())
        .arg(&store)
        .arg(&store)
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("inside the store"),
        "{}",
        describe(&out)
    );
}

// ---- 2. A store another user could change -----------------------------------------------------

#[test]
fn a_store_another_user_owns_or_may_write_is_refused_as_root() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED a_store_another_user_owns_or_may_write_is_refused_as_root: needs root");
        return;
    }
    let env = Env::new();
    snapshot_tree(&env, "src", "r");
    let store = path_str(&env.store).to_owned();

    chown(&env.store, 65534);
    let err = refused(
        &env,
        &["ls"],
        &[
            "owned by uid 65534",
            "not by root",
            "refusing",
            &format!("chown -R root:root {store} && chmod 700 {store}"),
            "a store of your own",
        ],
    );
    assert!(err.contains("swap its images and refs"), "{err}");
    if can_mount("a_store_another_user_owns… (mount part)") {
        let mnt = env.path("mnt");
        let _undo = Mounted::adopt(&mnt, &env.store);
        refused(
            &env,
            &["mount", "r", path_str(&mnt)],
            &["owned by uid 65534"],
        );
        assert!(!is_mount_point(&mnt) && !mnt.exists());
    }
    // doctor names it as a problem, not "[ok] store mode 0700".
    let out = env.velo(&["--json", "doctor"]).output().unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = v["checks"].as_array().unwrap();
    let owner = checks.iter().find(|c| c["name"] == "store owner").unwrap();
    assert_eq!(owner["status"], "fail", "{v}");
    assert!(
        owner["detail"].as_str().unwrap().contains("uid 65534"),
        "{v}"
    );
    assert!(
        !checks
            .iter()
            .any(|c| c["name"] == "store mode" && c["status"] == "ok"),
        "{v}"
    );
    let text = env.velo(&["doctor"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(!text.contains("[ok  ] store mode"), "{text}");
    chown(&env.store, 0);
    env.ok(&["ls"]);

    // Its areas too: one another user owns, one its group may write.
    chown(&env.store.join("images"), 65534);
    refused(
        &env,
        &["ls"],
        &[&format!("{store}/images is owned by uid 65534"), "chown -R"],
    );
    chown(&env.store.join("images"), 0);
    fs::set_permissions(env.store.join("refs"), fs::Permissions::from_mode(0o770)).unwrap();
    refused(
        &env,
        &["ls"],
        &[&format!(
            "{store}/refs is writable by every member of its group"
        )],
    );
    fs::set_permissions(env.store.join("refs"), fs::Permissions::from_mode(0o700)).unwrap();
    let v = env.json(&["doctor"]);
    let owner = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "store owner")
        .cloned()
        .unwrap();
    assert_eq!(owner["status"], "ok", "{v}");
}

#[test]
fn a_user_keeps_using_a_store_of_their_own() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED a_user_keeps_using_a_store_of_their_own: needs root to switch users");
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "f".repeat(1000)).unwrap();
    for p in [env.dir.path(), src.as_path()] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::create_dir(&env.store).unwrap();
    chown(&env.store, 65534);
    let run = |args: &[&str]| {
        common::velo_as_nobody(&env.store)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["snapshot", path_str(&src), "--ref", "mine"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = run(&["ls"]);
    assert!(out.status.success(), "{}", describe(&out));
    // …but root does not use it.
    refused(&env, &["ls"], &["owned by uid 65534"]);
}

// ---- 3. Images checked before the kernel parses them ----------------------------------------

/// Replaces the file `path` with `bytes` (a new file, mode 0444, as root keeps images).
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    fs::write(&tmp, bytes).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// The fs-verity digest of `bytes` (velo's hasher; `objects` tests check it against the
/// `fsverity` tool).
fn digest_of(bytes: &[u8]) -> String {
    velo_objects::verity::VerityHasher::digest(bytes).to_hex()
}

fn set_ref(env: &Env, name: &str, digest: &str) {
    fs::write(env.store.join("refs").join(name), format!("{digest}\n")).unwrap();
}

fn fsck_json(env: &Env) -> (bool, serde_json::Value) {
    let out = env.velo(&["--json", "fsck"]).output().unwrap();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fsck json: {e}\n{}", describe(&out)));
    (out.status.success(), v)
}

/// The kinds of damage fsck reported at `path`.
fn damage_at(v: &serde_json::Value, path: &Path) -> Vec<String> {
    v["damage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["path"] == path_str(path))
        .map(|f| f["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn an_image_under_a_false_name_is_refused_at_mount() {
    if !can_mount("an_image_under_a_false_name_is_refused_at_mount") {
        return;
    }
    let env = Env::new();
    let (_, a) = snapshot_tree(&env, "one", "a");
    let (_, b) = snapshot_tree(&env, "two", "b");
    let mnt = env.path("mnt");
    // Mounted once, so that a positive check of the genuine file is cached.
    env.mount("a", &mnt, &[]).umount();
    let a_path = env.store.join("images").join(&a);
    let b_bytes = fs::read(env.store.join("images").join(&b)).unwrap();

    // The other image's bytes under a's name (a new file, root's, 0444).
    replace_file(&a_path, &b_bytes);
    let _undo = Mounted::adopt(&mnt, &env.store);
    let err = refused(
        &env,
        &["mount", "a", path_str(&mnt)],
        &[
            path_str(&a_path),
            &b,
            "velo fsck",
            "not the image it is named after",
        ],
    );
    assert!(err.contains(&a), "{err}");
    assert!(!is_mount_point(&mnt), "mounted an image under a false name");

    // A copy under a name that is no image's digest, with a ref to it.
    let fake = "ab".repeat(32);
    let fake_path = env.store.join("images").join(&fake);
    replace_file(&fake_path, &b_bytes);
    set_ref(&env, "fake", &fake);
    refused(
        &env,
        &["mount", "fake", path_str(&mnt)],
        &[path_str(&fake_path), "velo fsck"],
    );
    assert!(!is_mount_point(&mnt));
    // The genuine image still mounts.
    let m = env.mount("b", &mnt, &[]);
    assert!(mnt.join("lib/a.js").is_file());
    m.umount();
}

/// An EROFS image made by `mkfs.erofs` (not by velo): a directory, small files, a symlink.
fn foreign_image(env: &Env) -> Vec<u8> {
    let src = env.path("foreign-src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/small"), "tiny").unwrap();
    fs::write(src.join("empty"), "").unwrap();
    std::os::unix::fs::symlink("d/small", src.join("link")).unwrap();
    let image = env.path("foreign.erofs");
    let out = Command::new("mkfs.erofs")
        .arg("-T0")
        .arg(&image)
        .arg(&src)
        .output()
        .expect("mkfs.erofs (Debian package erofs-utils) must be installed");
    assert!(out.status.success(), "{}", describe(&out));
    fs::read(&image).unwrap()
}

#[test]
fn a_foreign_mkfs_erofs_image_under_its_own_digest_is_refused_everywhere() {
    let env = Env::new();
    snapshot_tree(&env, "src", "r");
    let bytes = foreign_image(&env);
    let digest = digest_of(&bytes);
    let path = env.store.join("images").join(&digest);
    replace_file(&path, &bytes);
    set_ref(&env, "foreign", &digest);

    // Its digest is right; velo's reader refuses it (no composefs header), as does the rebuild.
    let (ok, v) = fsck_json(&env);
    assert!(!ok, "fsck must exit non-zero: {v}");
    assert_eq!(damage_at(&v, &path), ["image-unparsable"], "{v}");
    if can_mount("a_foreign_mkfs_erofs_image… (mount part)") {
        let mnt = env.path("mnt");
        let _undo = Mounted::adopt(&mnt, &env.store);
        // --verify lists it as a finding and points at fsck.
        refused(
            &env,
            &["mount", "foreign", path_str(&mnt), "--verify"],
            &["image-unparsable", path_str(&path), "velo fsck"],
        );
        assert!(!is_mount_point(&mnt), "--verify mounted a foreign image");
        // Without --verify: the digest check passes, the composefs header check refuses it.
        refused(
            &env,
            &["mount", "foreign", path_str(&mnt)],
            &[path_str(&path), "no composefs header", "velo fsck"],
        );
        assert!(
            !is_mount_point(&mnt),
            "mounted an EROFS image velo did not write"
        );
    }
}

#[test]
fn an_image_mutant_that_still_parses_is_damage_and_refused_by_verify() {
    let env = Env::new();
    let (src, digest) = snapshot_tree(&env, "src", "r");
    // One bit flipped in the composefs header's unused bytes: every reader still takes it,
    // but velo's writer never wrote it. Renamed to its own digest.
    let mut bytes = fs::read(env.store.join("images").join(&digest)).unwrap();
    bytes[20] ^= 1;
    let mutant = digest_of(&bytes);
    let path = env.store.join("images").join(&mutant);
    replace_file(&path, &bytes);
    set_ref(&env, "mutant", &mutant);

    let (ok, v) = fsck_json(&env);
    assert!(!ok, "fsck must find the mutant: {v}");
    assert_eq!(damage_at(&v, &path), ["image-not-rebuilt"], "{v}");
    assert_eq!(v["damage"].as_array().unwrap().len(), 1, "{v}");
    if can_mount("an_image_mutant… (mount part)") {
        let mnt = env.path("mnt");
        {
            let _undo = Mounted::adopt(&mnt, &env.store);
            refused(
                &env,
                &["mount", "mutant", path_str(&mnt), "--verify"],
                &["image-not-rebuilt", path_str(&path), "velo fsck"],
            );
            assert!(!is_mount_point(&mnt), "--verify mounted a mutant");
        }
        // A plain mount checks the digest and header only (both right here); the tree is the
        // genuine one's.
        let m = env.mount("mutant", &mnt, &[]);
        assert_eq!(
            fs::read(mnt.join("lib/a.js")).unwrap(),
            fs::read(src.join("lib/a.js")).unwrap()
        );
        m.umount();
    }
}

#[test]
fn a_hand_edited_redirect_is_damage_for_fsck_and_refused_by_verify() {
    let env = Env::new();
    let (src, digest) = snapshot_tree(&env, "src", "r");
    let (ok, v) = fsck_json(&env);
    assert!(ok, "a fresh store must be clean: {v}");
    let object = |file: &str| digest_of(&fs::read(src.join(file)).unwrap());
    let (a, b) = (object("lib/a.js"), object("lib/b.js"));
    // Point a.js's redirect at b.js's object: "/xx/yyyy…" in the image.
    let redirect = |d: &str| format!("/{}/{}", &d[..2], &d[2..]);
    let mut bytes = fs::read(env.store.join("images").join(&digest)).unwrap();
    let (from, to) = (redirect(&a), redirect(&b));
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("the image holds a.js's redirect");
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    // Renamed to its new digest, with a ref: the digest check passes.
    let edited = digest_of(&bytes);
    let path = env.store.join("images").join(&edited);
    replace_file(&path, &bytes);
    set_ref(&env, "edited", &edited);

    let (ok, v) = fsck_json(&env);
    assert!(!ok, "fsck must find the edited image: {v}");
    assert_eq!(damage_at(&v, &path), ["image-not-rebuilt"], "{v}");
    let text = env.velo(&["fsck"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("image-not-rebuilt") && l.contains(path_str(&path))),
        "{text}"
    );
    if can_mount("a_hand_edited_redirect… (mount part)") {
        let mnt = env.path("mnt");
        let _undo = Mounted::adopt(&mnt, &env.store);
        refused(
            &env,
            &["mount", "edited", path_str(&mnt), "--verify"],
            &["image-not-rebuilt", path_str(&path), "velo fsck"],
        );
        assert!(!is_mount_point(&mnt), "--verify mounted an edited image");
        // The genuine one passes --verify.
        let m = env.mount("r", &mnt, &["--verify"]);
        assert_eq!(
            fs::read(mnt.join("lib/a.js")).unwrap(),
            fs::read(src.join("lib/a.js")).unwrap()
        );
        m.umount();
    }
}

/// The record that an image was checked against its name goes with the image: GC removes it
/// (it would otherwise outlive every image ever mounted).
#[test]
fn gc_removes_the_check_record_of_a_removed_image() {
    if !can_mount("gc_removes_the_check_record_of_a_removed_image") {
        return;
    }
    let env = Env::new();
    let (_, a) = snapshot_tree(&env, "one", "a");
    let mnt = env.path("mnt");
    env.mount("a", &mnt, &[]).umount();
    let record = env.store.join("cache").join(format!("image-checked-{a}"));
    assert!(record.exists(), "a mount records its check");
    env.ok(&["ref", "rm", "a"]);
    let r = env.json(&["gc"]);
    assert_eq!(r["images_removed"], 1, "{r}");
    assert!(!record.exists(), "the check record outlived its image");
}
