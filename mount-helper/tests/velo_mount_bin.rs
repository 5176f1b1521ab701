//! The standalone privileged binary `velo-mount`: mounts and unmounts images of a store.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;

use velo_image::{NoProgress, SnapshotOptions, snapshot};
use velo_objects::Store;

fn velo_mount(store: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_velo-mount"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run velo-mount")
}

fn mounted(path: &Path) -> bool {
    let abs = std::fs::canonicalize(path).unwrap_or_default();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4).map(Path::new) == Some(abs.as_path()))
}

struct Cleanup<'a>(&'a Path);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if mounted(self.0) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
}

#[test]
fn mounts_and_unmounts_as_root_only() {
    let root = rustix::process::geteuid().is_root();
    if !root {
        if std::env::var("VELO_REQUIRE_MOUNT_TESTS").as_deref() == Ok("1") {
            panic!("needs root but VELO_REQUIRE_MOUNT_TESTS=1");
        }
        eprintln!("SKIPPED mounts_and_unmounts_as_root_only: not running as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/file"), "velo-mount ".repeat(20)).unwrap();
    let store_path = dir.path().join("store");
    let store = Store::open_or_create(&store_path).unwrap();
    let opts = SnapshotOptions {
        ref_name: Some("bin/test".into()),
        ..Default::default()
    };
    snapshot(&store, &src, &opts, &NoProgress).unwrap();

    let target = dir.path().join("mnt");
    let _cleanup = Cleanup(&target);
    let out = velo_mount(
        &store_path,
        &["--json", "mount", "bin/test", target.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verity"], "off");
    assert!(mounted(&target));
    assert_eq!(
        std::fs::read_to_string(target.join("d/file")).unwrap(),
        "velo-mount ".repeat(20)
    );

    // Unprivileged: refused with a message that says why.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_velo-mount"))
        .arg("--store")
        .arg(&store_path)
        .args(["umount", target.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
    assert!(mounted(&target));

    let out = velo_mount(&store_path, &["umount", target.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!mounted(&target));
}
