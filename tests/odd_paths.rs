//! Paths mountinfo escapes (issue 12, item 9): a mount target whose name is not UTF-8 or has
//! a space, and a store whose path has a space and a comma, are mounted, listed, kept alive
//! and unmounted like any other (mountinfo is parsed once, as bytes, unescaped).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;

use common::{Env, can_mount, describe};

/// `velo mount` at a target whose name is not UTF-8 (and has a space) works, `ls` lists it
/// and `umount` takes it away — in a mount namespace of its own, so the odd name never shows
/// in the host's mountinfo, and the mount vanishes with the namespace whatever happens.
#[test]
fn a_target_whose_name_is_not_utf8_is_mounted_listed_and_unmounted() {
    if !can_mount("a_target_whose_name_is_not_utf8_is_mounted_listed_and_unmounted") {
        return;
    }
    let env = Env::new();
    let src = env.path("tree");
    fs::create_dir_all(src.join("lib")).unwrap();
    fs::write(src.join("lib/a.js"), "a".repeat(5000)).unwrap();
    env.snapshot(&src, "r");
    let odd = env.dir.path().join(OsStr::from_bytes(b"caf\xe9 mnt"));
    let script = r#"set -e
"$1" --store "$2" mount r "$3" >/dev/null
cat "$3/lib/a.js" | wc -c
"$1" --store "$2" --json ls
"$1" --store "$2" umount "$3" >/dev/null
if mountpoint -q "$3"; then echo "still mounted" >&2; exit 1; fi"#;
    let out = common::sh_in_private_ns(script)
        .arg(common::velo_bin())
        .arg(&env.store)
        .arg(&odd)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let (count, ls) = text.split_once('\n').unwrap();
    assert_eq!(count.trim(), "5000");
    let ls: serde_json::Value = serde_json::from_str(ls.trim()).unwrap();
    let mounts = ls["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "{ls}");
    assert!(
        mounts[0]["target"].as_str().unwrap().ends_with(" mnt"),
        "{ls}"
    );
}

/// A store whose path has a space and a comma (escaped in mountinfo, the comma inside
/// overlay's own options): a copy-on-write mount of it stays usable through a `gc`, its upper
/// dir is found by its exact path, and it unmounts cleanly.
#[test]
fn a_store_path_with_a_space_and_a_comma_works_end_to_end() {
    if !can_mount("a_store_path_with_a_space_and_a_comma_works_end_to_end") {
        return;
    }
    let mut env = Env::new();
    env.store = env.path("my store, v1");
    let src = env.path("tree");
    fs::create_dir_all(src.join("lib")).unwrap();
    fs::write(src.join("lib/a.js"), "a".repeat(5000)).unwrap();
    env.snapshot(&src, "r");
    let target = env.path("mnt, here");
    let m = env.mount("r", &target, &["--cow"]);
    fs::write(target.join("lib/new.js"), "written").unwrap();
    env.ok(&["gc"]);
    assert_eq!(
        fs::read_to_string(target.join("lib/new.js")).unwrap(),
        "written"
    );
    assert_eq!(fs::read(target.join("lib/a.js")).unwrap().len(), 5000);
    let ls = env.json(&["ls"]);
    assert_eq!(ls["mounts"].as_array().map(Vec::len), Some(1), "{ls}");
    m.umount();
    assert!(!common::is_mount_point(&target));
}
