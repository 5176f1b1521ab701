//! What velo says when something goes wrong (issue 12, item 10): a reader that went away ends
//! it quietly, an OS error is named once, a refusal in a user namespace is not blamed on the
//! kernel's age, a bad tenant name is called one, and `tenant create`/`reset` leave a mount
//! whose root matches the snapshot's.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use common::{Env, Mounted, can_mount, describe};

/// `velo ls` whose stdout is a pipe nobody reads any more (`velo ls | head -0`): every write
/// fails with EPIPE, and velo ends quietly with success instead of panicking.
#[test]
fn a_reader_that_went_away_ends_velo_quietly() {
    let env = Env::new();
    env.snapshot_small("app/deps");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader); // before velo starts: its first write cannot succeed
    let out = env
        .velo(&["ls"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run velo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(err.is_empty(), "nothing on stderr: {err}");
}

/// An I/O error's OS cause appears once in the message, not once per level of the chain.
#[test]
fn an_os_error_is_named_once() {
    let env = Env::new();
    let file = env.path("a-file");
    fs::write(&file, "not a store").unwrap();
    let out = Command::new(common::velo_bin())
        .arg("--store")
        .arg(&file)
        .arg("ls")
        .env_remove("VELO_STORE")
        .output()
        .expect("run velo");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("os error 20").count(), 1, "{err}");
    assert!(
        err.contains(common::path_str(&file)),
        "names the path: {err}"
    );
}

/// A bad tenant name is called a bad tenant name.
#[test]
fn a_bad_tenant_name_is_called_one() {
    let env = Env::new();
    env.snapshot_small("app/deps");
    let err = env.fails(&["tenant", "create", ".hidden", "--image", "app/deps"]);
    assert!(err.contains("invalid tenant name \".hidden\""), "{err}");
    assert!(!err.contains("ref name"), "{err}");
}

/// `velo mount` in a user namespace of its own is refused for want of privilege — and says
/// so, instead of blaming the kernel's version.
#[test]
fn a_mount_refused_in_a_user_namespace_names_privilege_not_the_kernel() {
    if !can_mount("a_mount_refused_in_a_user_namespace_names_privilege_not_the_kernel") {
        return;
    }
    let env = Env::new();
    env.snapshot_small("app/deps");
    let target = env.path("mnt");
    fs::create_dir_all(&target).unwrap();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--"])
        .arg(common::velo_bin())
        .arg("--store")
        .arg(&env.store)
        .args(["mount", "app/deps"])
        .arg(&target)
        .env_remove("VELO_STORE")
        .output()
        .expect("run unshare (util-linux)");
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("6.12"), "not the kernel's age: {err}");
    assert!(
        err.contains("only root in the host's user namespace"),
        "{err}"
    );
}

/// A tenant's mount shows the image root's mode and mtime — right after `tenant create`, and
/// after `tenant reset` dropped its writes — not the time its upper dir was made.
#[test]
fn a_tenant_root_matches_the_snapshot_after_create_and_reset() {
    if !can_mount("a_tenant_root_matches_the_snapshot_after_create_and_reset") {
        return;
    }
    let env = Env::new();
    let src = env.path("tree");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), "a").unwrap();
    fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    let old = rustix::fs::Timespec {
        tv_sec: 1_577_836_800, // 2020-01-01
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        &src,
        &rustix::fs::Timestamps {
            last_access: old,
            last_modification: old,
        },
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    env.snapshot(&src, "app/deps");
    env.ok(&["tenant", "create", "t1", "--image", "app/deps"]);
    let target = env.path("mnt");
    let root = |what: &str| {
        fs::create_dir_all(&target).unwrap();
        env.ok(&["tenant", "mount", "t1", common::path_str(&target)]);
        let m = Mounted::adopt(&target, &env.store);
        let st = fs::metadata(&target).unwrap();
        let seen = (st.mode() & 0o7777, st.mtime());
        fs::write(target.join("written"), "x").unwrap();
        m.umount();
        assert_eq!(seen, (0o750, old.tv_sec), "{what}");
    };
    root("after create");
    env.ok(&["tenant", "reset", "t1"]);
    root("after reset");
}
