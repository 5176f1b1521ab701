//! Tenants (copy-on-write layers kept in the store) and garbage collection.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::Path;

use common::{Env, can_mount, path_str};

fn base_tree(env: &Env) -> std::path::PathBuf {
    let src = env.path("src");
    fs::create_dir_all(src.join("lib")).unwrap();
    fs::create_dir_all(src.join("conf")).unwrap();
    for i in 0..4 {
        fs::write(
            src.join(format!("lib/m{i}.js")),
            format!("module {i};\n").repeat(50),
        )
        .unwrap();
    }
    fs::write(src.join("conf/a.json"), "{\"a\": 1}".repeat(20)).unwrap();
    fs::write(src.join("conf/b.json"), "{\"b\": 2}".repeat(20)).unwrap();
    src
}

fn tenant_umount(env: &Env, name: &str) {
    env.ok(&["tenant", "umount", name]);
}

/// Unmounts a tenant at the end of a test, even on failure.
struct TenantGuard<'a>(&'a Env, &'a str);
impl Drop for TenantGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.velo(&["tenant", "umount", self.1]).output();
    }
}

#[test]
fn tenants_are_isolated_and_never_mounted_twice() {
    if !can_mount("tenants_are_isolated_and_never_mounted_twice") {
        return;
    }
    let env = Env::new();
    let src = base_tree(&env);
    env.snapshot(&src, "base");
    let (ma, mb) = (env.path("a"), env.path("b"));
    env.ok(&[
        "tenant",
        "create",
        "a",
        "--image",
        "base",
        "--mount",
        path_str(&ma),
    ]);
    let _ga = TenantGuard(&env, "a");
    env.ok(&["tenant", "create", "b", "--image", "base"]);
    env.ok(&["tenant", "mount", "b", path_str(&mb)]);
    let _gb = TenantGuard(&env, "b");

    fs::write(ma.join("lib/new.js"), "new").unwrap();
    fs::write(ma.join("lib/m0.js"), "rewritten").unwrap();
    fs::remove_file(ma.join("lib/m1.js")).unwrap();
    fs::rename(ma.join("conf"), ma.join("settings")).unwrap();
    // B and the image see none of it.
    assert!(!mb.join("lib/new.js").exists());
    assert_eq!(
        fs::read_to_string(mb.join("lib/m0.js")).unwrap(),
        "module 0;\n".repeat(50)
    );
    assert!(
        mb.join("lib/m1.js").exists()
            && mb.join("conf/a.json").exists()
            && !mb.join("settings").exists()
    );
    let ro = env.path("ro");
    let m = env.mount("base", &ro, &[]);
    assert!(
        common::compare_trees(&src, &ro).is_empty(),
        "the image changed"
    );
    drop(m);

    // Never twice at once.
    let err = env.fails(&["tenant", "mount", "a", path_str(&env.path("again"))]);
    assert!(
        err.contains("already mounted") && err.contains(path_str(&ma)),
        "{err}"
    );
    assert!(!common::is_mount_point(&env.path("again")));
    // Reset and rm refuse while mounted.
    assert!(env.fails(&["tenant", "reset", "a"]).contains("mounted"));
    assert!(env.fails(&["tenant", "rm", "a"]).contains("mounted"));

    // Writes persist across umount/mount; reset drops them.
    tenant_umount(&env, "a");
    env.ok(&["tenant", "mount", "a", path_str(&ma)]);
    assert_eq!(fs::read_to_string(ma.join("lib/new.js")).unwrap(), "new");
    tenant_umount(&env, "a");
    env.ok(&["tenant", "reset", "a"]);
    env.ok(&["tenant", "mount", "a", path_str(&ma)]);
    assert!(!ma.join("lib/new.js").exists() && ma.join("lib/m1.js").exists());
    let ls = env.json(&["tenant", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 2);
    assert_eq!(ls[0]["name"], "a");
    assert_eq!(ls[0]["mounted_at"], path_str(&ma));
    tenant_umount(&env, "a");
    env.ok(&["tenant", "rm", "a"]);
    assert!(!env.store.join("tenants/a").exists());
    assert!(
        env.fails(&["tenant", "mount", "a", path_str(&ma)])
            .contains("no tenant")
    );
}

#[test]
fn tenant_diff_and_commit() {
    if !can_mount("tenant_diff_and_commit") {
        return;
    }
    let env = Env::new();
    let src = base_tree(&env);
    env.snapshot(&src, "base");
    let m = env.path("m");
    env.ok(&[
        "tenant",
        "create",
        "t",
        "--image",
        "base",
        "--mount",
        path_str(&m),
    ]);
    let _g = TenantGuard(&env, "t");
    fs::write(m.join("lib/added.js"), "added ".repeat(30)).unwrap();
    fs::write(m.join("lib/m0.js"), "changed ".repeat(30)).unwrap();
    fs::remove_file(m.join("lib/m1.js")).unwrap();
    std::process::Command::new("chmod")
        .args(["600", path_str(&m.join("lib/m2.js"))])
        .status()
        .unwrap();
    fs::remove_dir_all(m.join("conf")).unwrap();
    fs::create_dir(m.join("conf")).unwrap();
    fs::write(m.join("conf/c.json"), "{}").unwrap();

    let diff = env.json(&["tenant", "diff", "t"]);
    let got: Vec<(String, String)> = diff
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_owned(),
                c["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("conf/a.json", "deleted"),
        ("conf/b.json", "deleted"),
        ("conf/c.json", "added"),
        ("lib/added.js", "added"),
        ("lib/m0.js", "changed"),
        ("lib/m1.js", "deleted"),
        ("lib/m2.js", "metadata"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(p, k)| (p.to_string(), k.to_string()))
        .collect();
    assert_eq!(got, want, "{diff}");

    // Commit while mounted, then unmounted: only the changed/added files cost new objects.
    let c1 = env.json(&["tenant", "commit", "t", "--ref", "t/v1"]);
    assert_eq!(c1["new_objects"], 2, "{c1}");
    tenant_umount(&env, "t");
    let c2 = env.json(&["tenant", "commit", "t", "--ref", "t/v2"]);
    assert_eq!(c2["digest"], c1["digest"], "same merged view, same image");
    assert_eq!(c2["new_objects"], 0);
    assert!(!common::is_mount_point(&m));
    assert!(
        fs::read_dir(env.store.join("mounts"))
            .unwrap()
            .next()
            .is_none(),
        "commit left a pin"
    );
    let view = env.path("view");
    let mv = env.mount("t/v1", &view, &[]);
    assert_eq!(
        fs::read_to_string(view.join("lib/m0.js")).unwrap(),
        "changed ".repeat(30)
    );
    assert!(
        !view.join("lib/m1.js").exists()
            && view.join("conf/c.json").exists()
            && !view.join("conf/a.json").exists()
    );
    mv.umount();
}

fn count_files(dir: &Path) -> usize {
    common::walkdir(dir)
        .into_iter()
        .filter(|p| p.is_file())
        .count()
}

#[test]
fn gc_keeps_what_is_needed_and_frees_the_rest() {
    let env = Env::new();
    let src = base_tree(&env);
    env.snapshot(&src, "keep");
    fs::write(src.join("lib/only-in-v1.js"), "v1 ".repeat(100)).unwrap();
    let v1 = env.snapshot(&src, "app");
    fs::remove_file(src.join("lib/only-in-v1.js")).unwrap();
    fs::write(src.join("lib/only-in-v2.js"), "v2 ".repeat(100)).unwrap();
    let v2 = env.snapshot(&src, "app"); // v1 moves to app's history
    fs::write(src.join("lib/garbage.js"), "g ".repeat(100)).unwrap();
    let g = env.snapshot(&src, "tmp/garbage");
    env.ok(&["ref", "rm", "tmp/garbage"]);
    assert_eq!(
        env.json(&["ref", "history", "app"])[0]["digest"],
        v1.as_str()
    );

    // Dry run removes nothing.
    let before = env.store_listing();
    let dry = env.json(&["gc", "--dry-run", "--keep-last", "0", "--older-than", "0s"]);
    assert_eq!(dry["images_removed"], 2, "{dry}");
    assert_eq!(before, env.store_listing());

    // Default policy keeps the last previous image of each ref: only `garbage`'s image goes.
    let r = env.json(&["gc"]);
    assert_eq!(r["images_removed"], 1, "{r}");
    assert!(!env.store.join("images").join(&g).exists());
    assert!(env.store.join("images").join(&v1).exists());
    assert_eq!(r["objects_removed"], 1, "only garbage.js's object: {r}");
    assert!(r["object_bytes_freed"].as_u64().unwrap() >= 200);

    // A stricter policy drops history too.
    let r = env.json(&["gc", "--keep-last", "0", "--older-than", "0s"]);
    assert_eq!(r["images_removed"], 1, "{r}");
    assert_eq!(r["history_dropped"], 1);
    assert!(!env.store.join("images").join(&v1).exists());
    assert!(env.store.join("images").join(&v2).exists());
    let (ok, fsck) = {
        let out = env.velo(&["--json", "fsck"]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(ok, "gc left a damaged store: {fsck}");
    assert_eq!(
        count_files(&env.store.join("objects")),
        7,
        "6 base files + only-in-v2"
    );
}

#[test]
fn gc_expires_unused_deps_refs_only() {
    let env = Env::new();
    let src = base_tree(&env);
    env.snapshot(&src, "deps/npm/abc");
    env.snapshot(&src, "myapp/deps");
    // Backdate both refs' last use by 40 days.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86_400);
    for r in ["deps/npm/abc", "myapp/deps"] {
        fs::File::options()
            .write(true)
            .open(env.store.join("refs").join(r))
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let r = env.json(&["gc", "--unused-for", "30d"]);
    assert_eq!(
        r["refs_expired"],
        serde_json::json!(["deps/npm/abc"]),
        "{r}"
    );
    assert!(!env.store.join("refs/deps/npm/abc").exists());
    assert!(
        env.store.join("refs/myapp/deps").exists(),
        "only deps/* refs expire"
    );
    assert_eq!(
        r["images_removed"], 0,
        "myapp/deps still needs the same image"
    );
}

#[test]
fn gc_keeps_images_of_tenants_and_live_mounts_and_clears_stale_pins() {
    if !can_mount("gc_keeps_images_of_tenants_and_live_mounts_and_clears_stale_pins") {
        return;
    }
    let env = Env::new();
    let src = base_tree(&env);
    let mounted = env.snapshot(&src, "mounted");
    fs::write(src.join("x"), "tenant image ".repeat(20)).unwrap();
    let tenant_img = env.snapshot(&src, "for-tenant");
    env.ok(&["tenant", "create", "t", "--image", "for-tenant"]);
    let mnt = env.path("mnt");
    let m = env.mount("mounted", &mnt, &[]);
    env.ok(&["ref", "rm", "mounted"]);
    env.ok(&["ref", "rm", "for-tenant"]);
    // A pin left by a mount from an earlier boot.
    let stale = env.store.join("mounts/m-stale");
    fs::create_dir(&stale).unwrap();
    let record = serde_json::json!({
        "image": mounted, "target": "/gone", "mnt_id_unique": null, "mnt_id": 1, "upper": null,
        "managed_upper": false, "verity": "off", "boot_id": "another-boot", "created": 0
    });
    fs::write(stale.join("record.json"), record.to_string()).unwrap();

    let r = env.json(&["gc", "--keep-last", "0", "--older-than", "0s"]);
    assert_eq!(
        r["images_removed"], 0,
        "a mounted image and a tenant's image are roots: {r}"
    );
    assert_eq!(r["stale_pins_cleared"], 1);
    assert!(!stale.exists());
    assert!(env.store.join("images").join(&tenant_img).exists());
    assert_eq!(
        fs::read_to_string(mnt.join("lib/m3.js")).unwrap(),
        "module 3;\n".repeat(50)
    );
    m.umount();
    let r = env.json(&["gc", "--keep-last", "0", "--older-than", "0s"]);
    assert_eq!(
        r["images_removed"], 1,
        "unmounted, unreferenced: collected: {r}"
    );
    assert!(env.store.join("images").join(&tenant_img).exists());
}

#[test]
fn a_size_limit_is_enforced_or_said_not_to_be() {
    let env = Env::new();
    let src = base_tree(&env);
    env.snapshot(&src, "base");
    let t = env.json(&[
        "tenant",
        "create",
        "limited",
        "--image",
        "base",
        "--size-limit",
        "1M",
    ]);
    assert_eq!(t["size_limit"], 1 << 20);
    let how = t["limit_enforcement"]
        .as_str()
        .expect("the tenant says how its limit is enforced");
    // This machine's kernel has no CONFIG_QUOTA; where project quotas work, the answer names
    // the project instead.
    assert!(
        how.starts_with("project quota ") || how.starts_with("not enforced: "),
        "{how}"
    );
    let out = env.ok(&[
        "tenant",
        "create",
        "limited2",
        "--image",
        "base",
        "--size-limit",
        "2G",
    ]);
    assert!(out.contains("size limit 2.0 GiB: "), "{out}");
    assert!(
        env.fails(&[
            "tenant",
            "create",
            "x",
            "--image",
            "base",
            "--size-limit",
            "lots"
        ])
        .contains("not a size")
    );
}
