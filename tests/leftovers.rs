//! Races and leftovers (issue 12, item 7): a command that fails half-way leaves nothing that
//! blocks the next one, and commands racing each other do not stack or lose anything.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::io::Write;

use common::{Env, Mounted, Tmpfs, can_mount, path_str};

/// `tenant create` on a full disk fails, and leaves no half-made tenant: the name is not
/// listed and can be created once there is room. A tenant a killed `create` left half-made
/// (a directory without meta.json) is named as such and `tenant rm` removes it.
#[test]
fn a_tenant_create_that_fails_leaves_a_name_that_can_be_used() {
    if !can_mount("a_tenant_create_that_fails_leaves_a_name_that_can_be_used") {
        return;
    }
    let mut env = Env::new();
    let small = env.path("small");
    let _fs = Tmpfs::mount(&small, "velo-test-full", Some("4m"));
    env.store = small.join("store");
    env.snapshot_small("app/deps");

    // Fill the filesystem.
    let filler = small.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let err = env.fails(&["tenant", "create", "t1", "--image", "app/deps"]);
    assert!(err.contains("No space left"), "{err}");
    assert!(
        !env.store.join("tenants/t1").exists(),
        "no half-made tenant"
    );
    assert!(!env.ok(&["tenant", "ls"]).contains("t1"));

    fs::remove_file(&filler).unwrap();
    env.ok(&["tenant", "create", "t1", "--image", "app/deps"]);
    env.ok(&["tenant", "rm", "t1"]);

    // What a create killed before its meta.json was written leaves.
    fs::create_dir_all(env.store.join("tenants/t2/upper")).unwrap();
    let err = env.fails(&["tenant", "create", "t2", "--image", "app/deps"]);
    assert!(
        err.contains("did not finish") && err.contains("velo tenant rm t2"),
        "{err}"
    );
    env.ok(&["tenant", "rm", "t2"]);
    assert!(!env.store.join("tenants/t2").exists());
    env.ok(&["tenant", "create", "t2", "--image", "app/deps"]);
}

/// How many mounts sit at `target` (mountinfo lines naming it as their mount point).
fn mounts_at(target: &std::path::Path) -> usize {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(path_str(target)))
        .count()
}

/// Two `velo mount`s of one target at once: one mounts, the other is refused — never two
/// mounts stacked on the target (3 rounds in 30 stacked them before).
#[test]
fn parallel_mounts_of_one_target_never_stack() {
    if !can_mount("parallel_mounts_of_one_target_never_stack") {
        return;
    }
    let env = Env::new();
    env.snapshot_small("app/deps");
    let target = env.path("mnt");
    fs::create_dir_all(&target).unwrap();
    for round in 0..30 {
        let children: Vec<_> = (0..2)
            .map(|_| {
                env.velo(&["mount", "app/deps", path_str(&target)])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let _undo = Mounted::adopt(&target, &env.store);
        let mounted = outs.iter().filter(|o| o.status.success()).count();
        let stacked = mounts_at(&target);
        for _ in 1..stacked {
            // Leave nothing mounted even when the test fails.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&target)
                .status();
        }
        for o in outs.iter().filter(|o| !o.status.success()) {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("already a velo mount"), "round {round}: {err}");
        }
        assert_eq!((mounted, stacked), (1, 1), "round {round}");
        env.ok(&["umount", path_str(&target)]);
    }
}

/// A mount that fails after creating its target dir removes the dir again.
#[test]
fn a_failed_mount_removes_the_target_dir_it_created() {
    if !can_mount("a_failed_mount_removes_the_target_dir_it_created") {
        return;
    }
    let env = Env::new();
    let digest = env.snapshot_small("app/deps");
    // Damage the image: the mount refuses it after the target is made.
    let image = env.store.join("images").join(&digest);
    let mut bytes = fs::read(&image).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let tmp = image.with_extension("new");
    fs::write(&tmp, &bytes).unwrap();
    fs::rename(&tmp, &image).unwrap();
    let target = env.path("new/mnt");
    let err = env.fails(&["mount", "app/deps", path_str(&target)]);
    assert!(err.contains("velo fsck"), "{err}");
    assert!(!target.exists(), "the target dir it made is gone");
}

/// `velo ls` lists a mount while it is there, and not once it is gone — also when it went
/// behind velo's back (`umount` of the target).
#[test]
fn ls_lists_only_mounts_that_are_there() {
    if !can_mount("ls_lists_only_mounts_that_are_there") {
        return;
    }
    let env = Env::new();
    env.snapshot_small("app/deps");
    let target = env.path("mnt");
    let listed = || {
        env.json(&["ls"])["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .map(|m| m["target"].as_str().expect("target").to_owned())
            .collect::<Vec<_>>()
    };
    let m = env.mount("app/deps", &target, &[]);
    assert_eq!(listed(), vec![path_str(&target).to_owned()]);
    let out = std::process::Command::new("umount")
        .arg(&target)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::describe(&out));
    assert_eq!(
        listed(),
        Vec::<String>::new(),
        "a mount that is gone is not listed"
    );
    drop(m);
}
