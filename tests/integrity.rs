//! Integrity on a kernel without fs-verity: `mount --verify`, `fsck`, `fsck --repair`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{Env, can_mount, path_str};

fn tree(env: &Env) -> PathBuf {
    let src = env.path("src");
    fs::create_dir_all(src.join("lib")).unwrap();
    fs::write(src.join("lib/a.js"), "a".repeat(10_000)).unwrap();
    fs::write(src.join("lib/b.js"), "b".repeat(20_000)).unwrap();
    fs::write(src.join("small"), "inline").unwrap();
    src
}

/// The object file holding `content`.
fn object_of(env: &Env, content: &[u8]) -> PathBuf {
    common::walkdir(&env.store.join("objects"))
        .into_iter()
        .find(|p| p.is_file() && fs::read(p).ok().as_deref() == Some(content))
        .expect("object with that content")
}

fn writable(p: &Path) {
    fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
}

fn flip_byte(p: &Path, at: u64) {
    writable(p);
    let mut data = fs::read(p).unwrap();
    data[at as usize] ^= 0x20;
    fs::write(p, data).unwrap();
}

fn fsck(env: &Env, args: &[&str]) -> (bool, serde_json::Value) {
    let mut a = vec!["--json", "fsck"];
    a.extend_from_slice(args);
    let out = env.velo(&a).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fsck json: {e}\n{}", common::describe(&out)));
    (out.status.success(), v)
}

fn kinds(v: &serde_json::Value, field: &str) -> Vec<(String, String)> {
    v[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_owned(),
                f["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn verify_catches_a_flipped_byte_then_fsck_repair_and_resnapshot_heal() {
    let env = Env::new();
    let src = tree(&env);
    env.snapshot(&src, "app");
    let (ok, v) = fsck(&env, &[]);
    assert!(ok && v["clean"] == true, "fresh store must be clean: {v}");
    assert_eq!(v["objects_checked"], 2);

    let bad = object_of(&env, &fs::read(src.join("lib/b.js")).unwrap());
    flip_byte(&bad, 12_345);

    if can_mount("verify_catches_a_flipped_byte (mount part)") {
        let mnt = env.path("mnt");
        let out = env
            .velo(&["mount", "app", path_str(&mnt), "--verify"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "--verify must refuse: {}",
            common::describe(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(path_str(&bad)) && err.contains("object-mismatch"),
            "{err}"
        );
        assert!(
            !common::is_mount_point(&mnt),
            "nothing may be mounted after a failed --verify"
        );
    }

    let (ok, v) = fsck(&env, &[]);
    assert!(!ok, "fsck must exit non-zero on damage");
    let damage = kinds(&v, "damage");
    assert_eq!(
        damage,
        vec![("object-mismatch".to_owned(), path_str(&bad).to_owned())],
        "{v}"
    );
    let name = format!(
        "{}{}",
        bad.parent().unwrap().file_name().unwrap().to_str().unwrap(),
        bad.file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(v["damage"][0]["expected"], name.as_str());

    let (_, v) = fsck(&env, &["--repair"]);
    assert_eq!(v["repaired"].as_array().unwrap().len(), 1, "{v}");
    assert!(!bad.exists(), "damaged object moved out of objects/");
    let quarantined: Vec<_> = fs::read_dir(env.store.join("quarantine"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(
        quarantined.len(),
        1,
        "the damaged copy is kept in quarantine/"
    );
    // Now the object is missing: the image that needs it is reported.
    let (ok, v) = fsck(&env, &[]);
    assert!(!ok);
    assert_eq!(kinds(&v, "damage")[0].0, "image-missing-object", "{v}");

    // Re-snapshotting the source restores the object.
    let again = env.json(&["snapshot", path_str(&src), "--ref", "app"]);
    assert_eq!(again["new_objects"], 1, "{again}");
    let (ok, v) = fsck(&env, &[]);
    assert!(ok, "store must be clean after re-snapshot: {v}");
    assert_eq!(
        fs::read(&bad).unwrap(),
        fs::read(src.join("lib/b.js")).unwrap()
    );

    if can_mount("verify (clean mount part)") {
        let mnt = env.path("mnt");
        let v = env.json(&["mount", "app", path_str(&mnt), "--verify"]);
        let m = common::Mounted::adopt(&mnt, &env.store);
        assert_eq!(v["verity"], "off");
        assert_eq!(v["userspace_verified"]["objects"], 2, "{v}");
        assert_eq!(
            fs::read(mnt.join("lib/b.js")).unwrap(),
            fs::read(src.join("lib/b.js")).unwrap()
        );
        m.umount();
    }
}

#[test]
fn fsck_names_each_kind_of_damage() {
    let env = Env::new();
    let src = tree(&env);
    env.snapshot(&src, "app");
    let (ok, v) = fsck(&env, &[]);
    assert!(
        ok && v["damage"].as_array().unwrap().is_empty()
            && v["reclaimable"].as_array().unwrap().is_empty()
    );

    // A truncated object, a missing object, a garbage image, a dangling ref, tmp leftovers.
    let a = object_of(&env, &fs::read(src.join("lib/a.js")).unwrap());
    let b = object_of(&env, &fs::read(src.join("lib/b.js")).unwrap());
    writable(&a);
    fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .set_len(100)
        .unwrap();
    fs::remove_file(&b).unwrap();
    let garbage_name = "ef".repeat(32);
    let garbage = env.store.join("images").join(&garbage_name);
    fs::write(&garbage, b"this is not an EROFS image").unwrap();
    // A garbage image whose name matches its bytes: it passes the digest check and must fail parsing.
    let bytes = b"still not an EROFS image, but named by its own digest".repeat(100);
    let named = env.store.join("images").join(digest_hex(&bytes));
    fs::write(&named, &bytes).unwrap();
    fs::write(
        env.store.join("refs/dangling"),
        format!("{}\n", "01".repeat(32)),
    )
    .unwrap();
    fs::write(env.store.join("tmp/obj-999-1-0"), b"half").unwrap();

    let (ok, v) = fsck(&env, &[]);
    assert!(!ok);
    let damage = kinds(&v, "damage");
    let has =
        |kind: &str, path: &Path| damage.iter().any(|(k, p)| k == kind && p == path_str(path));
    assert!(has("object-mismatch", &a), "truncated object: {damage:?}");
    assert!(
        has("image-missing-object", &b),
        "missing object: {damage:?}"
    );
    assert!(has("image-mismatch", &garbage), "garbage image: {damage:?}");
    assert!(
        has("image-unparsable", &named),
        "unparsable image: {damage:?}"
    );
    assert!(
        has("ref-dangling", &env.store.join("refs/dangling")),
        "dangling ref: {damage:?}"
    );
    assert!(
        has("image-missing-object", &a),
        "the image needs the truncated object at its full size"
    );
    assert_eq!(damage.len(), 6, "{damage:?}");
    assert_eq!(
        kinds(&v, "reclaimable"),
        vec![(
            "tmp-leftover".to_owned(),
            path_str(&env.store.join("tmp/obj-999-1-0")).to_owned()
        )]
    );
    let truncated = v["damage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path_str(&a))
        .unwrap();
    assert!(
        truncated["found"].as_str().unwrap().contains("(100 bytes)"),
        "{truncated}"
    );

    // Human output: one problem per line with kind, path, expected and found.
    let out = env.velo(&["fsck"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("object-mismatch"))
        .expect("a line per problem");
    assert!(
        line.contains(path_str(&a)) && line.contains("expected=") && line.contains("found="),
        "{line}"
    );

    // Only leftovers: exit 0; --repair removes them (no writer is running).
    let env2 = Env::new();
    env2.snapshot(&src, "x");
    fs::write(env2.store.join("tmp/obj-1-2-3"), b"left").unwrap();
    let (ok, v) = fsck(&env2, &[]);
    assert!(ok, "leftovers are not damage: {v}");
    assert_eq!(v["reclaimable"].as_array().unwrap().len(), 1);
    let (ok, _) = fsck(&env2, &["--repair"]);
    assert!(ok);
    assert!(!env2.store.join("tmp/obj-1-2-3").exists());
}

/// The fs-verity digest of `bytes`, from the `fsverity` tool (an independent implementation).
fn digest_hex(bytes: &[u8]) -> String {
    let scratch = Env::new();
    let f = scratch.path("f");
    fs::write(&f, bytes).unwrap();
    let out = std::process::Command::new("fsverity")
        .args([
            "digest",
            "--hash-alg=sha256",
            "--block-size=4096",
            "--compact",
        ])
        .arg(&f)
        .output()
        .expect("fsverity (Debian package fsverity) must be installed");
    assert!(out.status.success(), "{}", common::describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
