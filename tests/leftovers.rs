//! Leftovers (issue 12, item 7): a command that fails half-way leaves nothing that blocks the
//! next one.

mod common;

use std::fs;
use std::io::Write;

use common::{Env, Tmpfs, can_mount};

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
    let src = env.path("tree");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), "a".repeat(5000)).unwrap();
    env.snapshot(&src, "app/deps");

    // Fill the filesystem.
    let filler = small.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let err = env.fails(&["tenant", "create", "t1", "--image", "app/deps"]);
    assert!(err.contains("No space left"), "{err}");
    assert!(!env.store.join("tenants/t1").exists(), "no half-made tenant");
    assert!(!env.ok(&["tenant", "ls"]).contains("t1"));

    fs::remove_file(&filler).unwrap();
    env.ok(&["tenant", "create", "t1", "--image", "app/deps"]);
    env.ok(&["tenant", "rm", "t1"]);

    // What a create killed before its meta.json was written leaves.
    fs::create_dir_all(env.store.join("tenants/t2/upper")).unwrap();
    let err = env.fails(&["tenant", "create", "t2", "--image", "app/deps"]);
    assert!(err.contains("did not finish") && err.contains("velo tenant rm t2"), "{err}");
    env.ok(&["tenant", "rm", "t2"]);
    assert!(!env.store.join("tenants/t2").exists());
    env.ok(&["tenant", "create", "t2", "--image", "app/deps"]);
}
