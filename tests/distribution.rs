//! Distribution against a real registry (Debian's `docker-registry`, started on 127.0.0.1 by
//! the harness): push/pull round trips between two stores, what moves the second time,
//! corrupted and foreign artifacts, a registry that is down, interrupted transfers, credentials,
//! and export/import. Needs root (trees with every kind of entry, mounts); skips loudly without.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fixtures::{every_kind_tree, sh};
use common::registry::{AUTH_PASSWORD, AUTH_USER, Registry};
use common::{Env, can_mount, compare_trees, describe, path_str};

/// Many small files in package-like directories (enough to make many packs).
fn package_tree(dir: &Path, packages: usize, files: usize) {
    sh(
        &format!(
            r#"
            for p in $(seq 1 {packages}); do
              mkdir -p node_modules/pkg$p/lib
              for f in $(seq 1 {files}); do
                # Distinct content (random: packs cost what they hold), 1-12 KiB.
                n=$(( (p * 131 + f * 17) % 12 + 1 ))
                head -c $((n * 1024)) /dev/urandom > node_modules/pkg$p/lib/f$f.js
              done
              echo '{{"name":"pkg'$p'", "version": "1.0.0", "description": "a test package"}}' > node_modules/pkg$p/package.json
            done
            "#
        ),
        dir,
    );
}

fn push(env: &Env, reg: &Registry, image: &str, dest: &str, extra: &[&str]) -> serde_json::Value {
    let url = reg.url(dest);
    let mut args = vec!["push", image, url.as_str(), "--plain-http"];
    args.extend_from_slice(extra);
    env.json(&args)
}

fn pull(env: &Env, reg: &Registry, src: &str, extra: &[&str]) -> serde_json::Value {
    let url = reg.url(src);
    let mut args = vec!["pull", url.as_str(), "--plain-http"];
    args.extend_from_slice(extra);
    env.json(&args)
}

/// Files of a store that matter (objects, images, refs), with sizes and content hashes.
fn store_state(env: &Env) -> Vec<String> {
    env.store_listing()
        .into_iter()
        .filter(|(_, (_, mode, _))| mode & 0o170000 == 0o100000)
        .filter(|(p, _)| {
            let first = p.components().next().map(|c| c.as_os_str().to_owned());
            matches!(
                first.as_deref().and_then(|s| s.to_str()),
                Some("objects" | "images" | "refs" | "history")
            )
        })
        .map(|(p, (size, _, hash))| format!("{} {size} {hash}", p.display()))
        .collect()
}

#[test]
fn round_trip_between_two_stores_is_exact() {
    if !can_mount("round_trip_between_two_stores_is_exact") {
        return;
    }
    let reg = Registry::start();
    let a = Env::new();
    let b = Env::new();
    let src = a.path("src");
    every_kind_tree(&src, 64 << 20);
    let digest = a.snapshot(&src, "app/all");

    let p = push(&a, &reg, "app/all", "velo/all:v1", &[]);
    assert_eq!(p["image"], digest.as_str(), "{p}");
    assert!(p["blobs_sent"].as_u64().unwrap() >= 3, "{p}");
    assert_eq!(p["blobs_skipped"], 0, "{p}");
    // The artifact is what the README says.
    let m = reg.manifest("velo/all", "v1");
    assert_eq!(m["artifactType"], "application/vnd.velo.snapshot.v1");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.velo.index.v1+json"
    );
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.velo.image.v1+erofs"
    );
    assert_eq!(
        m["layers"][0]["annotations"]["dev.velo.image"],
        digest.as_str()
    );
    assert_eq!(
        m["layers"][1]["mediaType"],
        "application/vnd.velo.pack.v1+zstd"
    );
    assert_eq!(m["annotations"]["dev.velo.ref"], "app/all");

    let r = pull(&b, &reg, "velo/all:v1", &["--ref", "app/pulled"]);
    assert_eq!(r["image"], digest.as_str(), "{r}");
    assert_eq!(r["ref"], "app/pulled");
    assert_eq!(r["objects_fetched"], r["objects"], "{r}");
    assert_eq!(r["new_image"], true);
    // Byte-identical image (same digest), same dump, every object present and intact.
    assert_eq!(
        a.ok(&["inspect", "app/all", "--dump"]),
        b.ok(&["inspect", "app/pulled", "--dump"])
    );
    b.ok(&["fsck"]);
    let mnt = b.path("mnt");
    let m = b.mount("app/pulled", &mnt, &[]);
    let diffs = compare_trees(&src, &mnt);
    assert!(
        diffs.is_empty(),
        "pulled mount differs:\n{}",
        diffs.join("\n")
    );
    m.umount();

    // Pinned by the image digest and by the manifest digest.
    let c = Env::new();
    let manifest = p["manifest"].as_str().unwrap();
    let r = pull(
        &c,
        &reg,
        &format!("velo/all@{manifest}"),
        &["--digest", &digest],
    );
    assert_eq!(r["image"], digest.as_str());
    assert!(r["ref"].is_null(), "no --ref, no ref: {r}");
    let wrong = "ab".repeat(32);
    let url = reg.url("velo/all:v1");
    let err = c.fails(&[
        "pull",
        &url,
        "--plain-http",
        "--digest",
        &wrong,
        "--ref",
        "x/y",
    ]);
    assert!(err.contains(&format!("not the expected {wrong}")), "{err}");
    assert!(c.fails(&["inspect", "x/y"]).contains("no ref"));
}

#[test]
fn images_with_whiteouts_and_overlay_xattrs_rebuild_identically() {
    if !can_mount("images_with_whiteouts_and_overlay_xattrs_rebuild_identically") {
        return;
    }
    let reg = Registry::start();
    let a = Env::new();
    let b = Env::new();
    let src = a.path("src");
    // What the composefs reader alone loses: the tree's own trusted.overlay.* and
    // user.overlay.* xattrs, whiteouts in the root (also with hex names), a file with
    // trusted.overlay.whiteout.
    sh(
        r#"
        mkdir -p up/sub opq
        mknod ab c 0 0; mknod gone c 0 0; mknod up/sub/w c 0 0; mknod up/dev c 5 1
        setfattr -n trusted.overlay.opaque -v y opq
        setfattr -n user.overlay.opaque -v x up
        setfattr -n trusted.overlay.opaque -v x up/sub
        head -c 1000 /dev/urandom > f; setfattr -n trusted.overlay.whiteout -v '' f
        printf small > up/s; setfattr -n user.overlay.whiteouts -v '' up/s
        head -c 9000 /dev/urandom > up/sub/data; ln up/sub/data hl
        "#,
        &src,
    );
    let digest = a.snapshot(&src, "w/t");
    push(&a, &reg, "w/t", "velo/w:1", &[]);
    let r = pull(&b, &reg, "velo/w:1", &["--ref", "w/t"]);
    assert_eq!(r["image"], digest.as_str(), "{r}");
    let dump = b.ok(&["inspect", "w/t", "--dump"]);
    assert_eq!(a.ok(&["inspect", "w/t", "--dump"]), dump);
    for want in [
        "trusted.overlay.opaque=y",
        "user.overlay.opaque=x",
        "/ab ",
        "trusted.overlay.whiteout=",
    ] {
        assert!(dump.contains(want), "dump lacks {want}:\n{dump}");
    }
}

#[test]
fn second_push_sends_nothing_and_a_similar_image_sends_little() {
    if !can_mount("second_push_sends_nothing_and_a_similar_image_sends_little") {
        return;
    }
    let reg = Registry::start();
    let env = Env::new();
    let v1 = env.path("v1");
    package_tree(&v1, 60, 40);
    env.snapshot(&v1, "deps/v1");
    let first = push(&env, &reg, "deps/v1", "deps:v1", &["--pack-size", "256K"]);
    let blobs = first["blobs"].as_u64().unwrap();
    assert!(blobs > 20, "a tree of this size makes many packs: {first}");
    assert_eq!(first["blobs_sent"], blobs);

    let again = push(&env, &reg, "deps/v1", "deps:v1", &["--pack-size", "256K"]);
    assert_eq!(again["blobs_sent"], 0, "{again}");
    assert_eq!(again["blobs_skipped"], blobs);
    assert_eq!(again["manifest"], first["manifest"]);

    // v2: one package replaced, one added, one file changed: the packs around them change,
    // the rest are found in the registry.
    let v2 = env.path("v2");
    sh(&format!("cp -a {}/. .", path_str(&v1)), &v2);
    sh(
        "rm -r node_modules/pkg30 && echo changed >> node_modules/pkg10/lib/f3.js",
        &v2,
    );
    package_tree(&v2.join("node_modules/pkg30"), 1, 40);
    package_tree(&v2.join("node_modules/zzz-new"), 1, 30);
    env.snapshot(&v2, "deps/v2");
    let second = push(&env, &reg, "deps/v2", "deps:v2", &["--pack-size", "256K"]);
    let sent = second["bytes_sent"].as_u64().unwrap();
    let total = first["bytes_sent"].as_u64().unwrap();
    assert!(
        sent * 4 < total,
        "an image sharing most objects must upload little: sent {sent} of {total}: {second}"
    );
    assert!(second["blobs_skipped"].as_u64().unwrap() > second["blobs_sent"].as_u64().unwrap());

    // A pull of v2 into a store that has v1 downloads only what changed.
    let other = Env::new();
    pull(&other, &reg, "deps:v1", &["--ref", "deps/v1"]);
    let r = pull(&other, &reg, "deps:v2", &["--ref", "deps/v2"]);
    assert!(
        r["objects_present"].as_u64().unwrap() > 10 * r["objects_fetched"].as_u64().unwrap(),
        "{r}"
    );
    assert!(r["bytes_received"].as_u64().unwrap() * 4 < total, "{r}");
    other.ok(&["fsck"]);
}

#[test]
fn corrupted_blob_fails_naming_the_object_and_stores_nothing() {
    if !can_mount("corrupted_blob_fails_naming_the_object_and_stores_nothing") {
        return;
    }
    let reg = Registry::start();
    let a = Env::new();
    let src = a.path("src");
    sh(
        "mkdir -p lib && for i in $(seq 1 40); do head -c 3000 /dev/urandom > lib/f$i; done",
        &src,
    );
    a.snapshot(&src, "c/one");
    push(&a, &reg, "c/one", "c:1", &[]);
    let m = reg.manifest("c", "1");
    let index: serde_json::Value =
        serde_json::from_slice(&reg.blob("c", m["config"]["digest"].as_str().unwrap())).unwrap();
    let pack = &index["blobs"][0];
    let objects: Vec<String> = pack["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o[0].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        index["blobs"].as_array().unwrap().len(),
        1,
        "one pack: {index}"
    );
    // Flip one byte in the middle of the pack, in the registry's own storage.
    let file = reg.blob_file(pack["digest"].as_str().unwrap());
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&file, &bytes).unwrap();

    // The target store has other content; the failed pull must leave it as it was.
    let b = Env::new();
    let other = b.path("other");
    sh(
        "echo something-else-entirely-longer-than-64-bytes-xxxxxxxxxxxxxxxxxxxxxx > f",
        &other,
    );
    b.snapshot(&other, "keep/me");
    let before = store_state(&b);
    let url = reg.url("c:1");
    let err = b.fails(&["pull", &url, "--plain-http", "--ref", "c/one"]);
    assert!(
        objects.iter().any(|o| err.contains(&format!("object {o}"))),
        "the error must name the damaged object: {err}"
    );
    assert!(err.contains("nothing from it was stored"), "{err}");
    assert_eq!(store_state(&b), before, "a failed pull changed the store");
    assert!(b.fails(&["inspect", "c/one"]).contains("no ref"));
    b.ok(&["fsck"]);
    // JSON mode: one error document, non-zero exit.
    let out = b
        .velo(&["--json", "pull", &url, "--plain-http"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("is corrupt"), "{v}");
}

#[test]
fn foreign_and_tampered_artifacts_are_refused() {
    if !can_mount("foreign_and_tampered_artifacts_are_refused") {
        return;
    }
    let reg = Registry::start();
    let a = Env::new();
    let src = a.path("src");
    sh(
        "mkdir d && head -c 5000 /dev/urandom > d/f && echo hi > g",
        &src,
    );
    let digest = a.snapshot(&src, "t/ok");
    push(&a, &reg, "t/ok", "t:ok", &[]);
    let m = reg.manifest("t", "ok");
    let index_bytes = reg.blob("t", m["config"]["digest"].as_str().unwrap());
    let index: serde_json::Value = serde_json::from_slice(&index_bytes).unwrap();

    // An EROFS image velo's writer did not produce (mkfs.erofs of the same tree), published
    // with a consistent index and manifest: parsed in userspace, refused, never stored.
    let foreign = a.path("foreign.erofs");
    let out = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&foreign)
        .arg(&src)
        .output()
        .expect("mkfs.erofs (erofs-utils)");
    assert!(out.status.success(), "{}", describe(&out));
    let foreign = fs::read(&foreign).unwrap();
    let foreign_digest = velo_objects::verity::VerityHasher::digest(&foreign).to_hex();
    let publish = |tag: &str, image: &[u8], claimed: &str, blobs: serde_json::Value| {
        let image_blob = reg.put_blob("t", image);
        let idx = serde_json::json!({
            "format": "velo-index", "version": 1,
            "image": {"digest": claimed, "size": image.len(), "blob": image_blob},
            "blobs": blobs,
        });
        let idx = serde_json::to_vec(&idx).unwrap();
        let idx_blob = reg.put_blob("t", &idx);
        let mut layers = vec![serde_json::json!({
            "mediaType": "application/vnd.velo.image.v1+erofs", "digest": image_blob, "size": image.len()})];
        for b in blobs.as_array().unwrap() {
            layers.push(serde_json::json!({
                "mediaType": "application/vnd.velo.pack.v1+zstd", "digest": b["digest"], "size": b["size"]}));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.velo.snapshot.v1",
            "config": {"mediaType": "application/vnd.velo.index.v1+json", "digest": idx_blob, "size": idx.len()},
            "layers": layers,
        });
        reg.put_manifest("t", tag, &serde_json::to_vec(&manifest).unwrap());
    };
    publish("foreign", &foreign, &foreign_digest, serde_json::json!([]));
    let b = Env::new();
    let url = reg.url("t:foreign");
    let err = b.fails(&["pull", &url, "--plain-http", "--ref", "t/f"]);
    assert!(err.contains("was refused"), "{err}");
    assert!(err.contains(&foreign_digest), "{err}");

    // Image bytes that are not the image the index names.
    let real = fs::read(a.store.join("images").join(&digest)).unwrap();
    let mut tampered = real.clone();
    let last = tampered.len() - 100;
    tampered[last] ^= 1;
    publish("tampered", &tampered, &digest, index["blobs"].clone());
    let url = reg.url("t:tampered");
    let err = b.fails(&["pull", &url, "--plain-http", "--ref", "t/x"]);
    assert!(
        err.contains(&format!("image {digest}")) && err.contains("is corrupt"),
        "{err}"
    );

    // An index whose object list lies about an object: the object's digest is checked.
    let mut lying = index["blobs"].clone();
    let fake = "cd".repeat(32);
    let size = lying[0]["objects"][0][1].clone();
    lying[0]["objects"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!([fake, size]));
    lying[0]["objects"].as_array_mut().unwrap().swap(0, 1);
    publish("lying", &real, &digest, lying);
    let url = reg.url("t:lying");
    let err = b.fails(&["pull", &url, "--plain-http", "--ref", "t/x"]);
    assert!(err.contains("is corrupt"), "{err}");

    // Not a velo artifact at all.
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": reg.put_blob("t", b"{}"), "size": 2},
        "layers": [],
    });
    reg.put_manifest("t", "other", &serde_json::to_vec(&m).unwrap());
    let url = reg.url("t:other");
    let err = b.fails(&["pull", &url, "--plain-http"]);
    assert!(err.contains("not a velo snapshot"), "{err}");

    for r in ["t/f", "t/x"] {
        assert!(b.fails(&["inspect", r]).contains("no ref"));
    }
    let images = fs::read_dir(b.store.join("images")).unwrap().count();
    assert_eq!(images, 0, "nothing refused may be stored");
}

#[test]
fn registry_down_is_a_clear_error() {
    if !can_mount("registry_down_is_a_clear_error") {
        return;
    }
    let mut reg = Registry::start();
    let env = Env::new();
    let src = env.path("src");
    sh("head -c 5000 /dev/urandom > f", &src);
    env.snapshot(&src, "d/x");
    let url = reg.url("down:1");
    reg.stop();
    for args in [
        vec!["push", "d/x", url.as_str(), "--plain-http"],
        vec!["pull", url.as_str(), "--plain-http", "--ref", "d/y"],
    ] {
        let started = Instant::now();
        let err = env.fails(&args);
        assert!(
            err.contains(&format!(
                "cannot reach the registry at http://{}",
                reg.host()
            )),
            "{err}"
        );
        assert!(err.contains("Connection refused"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    // Plain HTTP registry spoken to with TLS: say what to do.
    let reg = Registry::start();
    let url = reg.url("down:1");
    let err = env.fails(&["push", "d/x", &url]);
    assert!(err.contains("--plain-http"), "{err}");
    // Bad addresses are refused before anything is sent.
    let err = env.fails(&["push", "d/x", "127.0.0.1:5000/r:t"]);
    assert!(err.contains("must start with oci://"), "{err}");
    let err = env.fails(&["push", "d/x", &reg.url("r")]);
    assert!(err.contains("needs a tag"), "{err}");
}

/// Runs velo with `args` in the background and kills it (by its pid) once `progressed` says
/// it got somewhere, or when it ends by itself. Returns true if it was killed mid-way.
fn interrupt(env: &Env, args: &[&str], progressed: impl Fn() -> bool) -> bool {
    let mut child = env
        .velo(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start velo");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return false;
        }
        if progressed() {
            let _ = child.kill();
            let _ = child.wait();
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "velo {args:?} neither progressed nor ended"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn interrupted_push_and_pull_resume_without_redoing_finished_blobs() {
    if !can_mount("interrupted_push_and_pull_resume_without_redoing_finished_blobs") {
        return;
    }
    let reg = Registry::start();
    let a = Env::new();
    let src = a.path("src");
    sh(
        "for p in $(seq 1 150); do mkdir -p p$p; head -c 70000 /dev/urandom > p$p/a; \
         head -c 20000 /dev/urandom > p$p/b; done",
        &src,
    );
    let digest = a.snapshot(&src, "r/big");
    let url = reg.url("r:1");
    let base = reg.blob_files().len();
    let killed = interrupt(
        &a,
        &[
            "push",
            "r/big",
            &url,
            "--plain-http",
            "-j",
            "1",
            "--pack-size",
            "64K",
        ],
        || reg.blob_files().len() >= base + 10,
    );
    let uploaded = reg.blob_files().len() - base;
    let p = push(&a, &reg, "r/big", "r:1", &["-j", "1", "--pack-size", "64K"]);
    let blobs = p["blobs"].as_u64().unwrap();
    assert!(blobs > 100, "{p}");
    if killed {
        assert!(
            p["blobs_skipped"].as_u64().unwrap() >= uploaded as u64,
            "finished blobs must not be sent again ({uploaded} were there): {p}"
        );
        assert!(p["blobs_sent"].as_u64().unwrap() < blobs, "{p}");
    } else {
        eprintln!("note: the first push finished before it could be interrupted");
    }

    let b = Env::new();
    let objects = b.store.join("objects");
    let count = || {
        common::walkdir(&objects)
            .iter()
            .filter(|p| p.is_file())
            .count()
    };
    let killed = interrupt(
        &b,
        &["pull", &url, "--plain-http", "-j", "1", "--ref", "r/big"],
        || count() >= 20,
    );
    let had = count();
    let r = pull(&b, &reg, "r:1", &["-j", "1", "--ref", "r/big"]);
    assert_eq!(r["image"], digest.as_str());
    if killed {
        assert!(r["objects_present"].as_u64().unwrap() >= had as u64, "{r}");
        assert!(r["blobs_skipped"].as_u64().unwrap() > 0, "{r}");
    }
    b.ok(&["fsck"]);
    let mnt = b.path("mnt");
    let m = b.mount("r/big", &mnt, &[]);
    assert!(compare_trees(&src, &mnt).is_empty());
    m.umount();
}

#[test]
fn credentials_come_from_the_docker_config() {
    if !can_mount("credentials_come_from_the_docker_config") {
        return;
    }
    let reg = Registry::start_with_auth();
    let env = Env::new();
    let src = env.path("src");
    sh("head -c 5000 /dev/urandom > f", &src);
    let digest = env.snapshot(&src, "a/x");
    let url = reg.url("auth:1");
    let empty = env.path("no-docker");
    fs::create_dir_all(&empty).unwrap();
    let out = env
        .velo(&["push", "a/x", &url, "--plain-http"])
        .env("DOCKER_CONFIG", &empty)
        .env("HOME", &empty)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("docker login"), "{err}");

    let docker = env.path("docker");
    fs::create_dir_all(&docker).unwrap();
    let auth = base64(format!("{AUTH_USER}:{AUTH_PASSWORD}").as_bytes());
    fs::write(
        docker.join("config.json"),
        format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, reg.host()),
    )
    .unwrap();
    for args in [
        vec!["push", "a/x", url.as_str(), "--plain-http"],
        vec!["pull", url.as_str(), "--plain-http", "--ref", "a/y"],
    ] {
        let out = env
            .velo(&args)
            .env("DOCKER_CONFIG", &docker)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
    }
    assert!(env.ok(&["ref", "ls"]).contains(&digest));
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn export_import_round_trip_and_corruption() {
    if !can_mount("export_import_round_trip_and_corruption") {
        return;
    }
    let a = Env::new();
    let src = a.path("src");
    every_kind_tree(&src, 64 << 20);
    let digest = a.snapshot(&src, "ci/deps");
    let file = a.path("deps.velo");
    let e = a.json(&["export", "ci/deps", path_str(&file)]);
    assert_eq!(e["image"], digest.as_str());
    assert_eq!(e["ref"], "ci/deps");

    // Into a fresh store: the recorded ref comes back, every byte checked.
    let b = Env::new();
    let i = b.json(&["import", path_str(&file)]);
    assert_eq!(i["image"], digest.as_str(), "{i}");
    assert_eq!(i["ref"], "ci/deps");
    assert_eq!(i["objects_new"], i["objects"]);
    b.ok(&["fsck"]);
    let mnt = b.path("mnt");
    let m = b.mount("ci/deps", &mnt, &[]);
    assert!(compare_trees(&src, &mnt).is_empty());
    m.umount();
    // Again: nothing new.
    let i = b.json(&["import", path_str(&file), "--ref", "ci/other"]);
    assert_eq!(i["objects_new"], 0);
    assert_eq!(i["ref"], "ci/other");

    // Through a pipe.
    let c = Env::new();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{v} --store {a} export ci/deps - | {v} --store {c} import - --ref piped/deps",
            v = common::velo_bin().display(),
            a = a.store.display(),
            c = c.store.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(c.ok(&["ref", "ls"]).contains(&digest));

    // One flipped byte: the import fails, names what is wrong, writes no ref.
    let mut bytes = fs::read(&file).unwrap();
    let at = bytes.len() * 2 / 3;
    bytes[at] ^= 0x20;
    let bad = a.path("bad.velo");
    fs::write(&bad, &bytes).unwrap();
    let d = Env::new();
    let err = d.fails(&["import", path_str(&bad)]);
    assert!(
        err.contains("is corrupt") || err.contains("refused"),
        "{err}"
    );
    assert!(d.fails(&["inspect", "ci/deps"]).contains("no"));
    // Not an export file at all.
    let err = d.fails(&["import", path_str(&src.join("big"))]);
    assert!(err.contains("not a velo export file"), "{err}");
}

/// An ordinary user pushes and pulls through velo-mountd: `velo push` sends their ref's image
/// and objects (which the service hands them), `velo pull` takes an artifact in, checked, into
/// their namespace — as it would be stored had they snapshotted the tree themselves (owners
/// mapped to them) — and `velo run`-style mounts of it show the same bytes. Nothing is left in
/// the user's scratch dirs.
#[test]
fn an_ordinary_user_pushes_and_pulls_through_the_service() {
    use common::mountd::{Mountd, TestUser};
    if !can_mount("an_ordinary_user_pushes_and_pulls_through_the_service") {
        return;
    }
    let reg = Registry::start();
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let user = TestUser::create("dist", env.dir.path());
    let src = env.path("tree");
    package_tree(&src, 5, 4);
    user.own(&src);
    let as_user = |args: &[&str]| {
        let out = user.velo(&mountd, env.dir.path(), args).output().unwrap();
        assert!(out.status.success(), "velo {args:?}: {}", describe(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let snap = as_user(&["--json", "snapshot", path_str(&src), "--ref", "mine/tree"]);
    let url = reg.url("velo/user:v1");
    let p = as_user(&["--json", "push", "mine/tree", url.as_str(), "--plain-http"]);
    assert_eq!(p["image"], snap["digest"], "{p}");

    // Another store pulls it as root: the same image, byte for byte.
    let other = Env::new();
    let r = pull(&other, &reg, "velo/user:v1", &["--ref", "got"]);
    assert_eq!(r["image"], snap["digest"], "{r}");

    // The user pulls it back under another name: the same image (it is already theirs).
    let r = as_user(&[
        "--json",
        "pull",
        url.as_str(),
        "--plain-http",
        "--ref",
        "again",
    ]);
    assert_eq!(r["image"], snap["digest"], "{r}");
    assert_eq!(r["ref"], "again", "{r}");
    let refs = as_user(&["--json", "ref", "ls"]);
    let names: Vec<&str> = refs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        names.contains(&"again") && names.contains(&"mine/tree"),
        "{refs}"
    );

    // Root's tree pulled by the user becomes theirs: its owners are mapped.
    let root_tree = other.path("root-tree");
    package_tree(&root_tree, 2, 2);
    other.snapshot(&root_tree, "roots");
    push(&other, &reg, "roots", "velo/roots:v1", &[]);
    let url = reg.url("velo/roots:v1");
    let r = as_user(&[
        "--json",
        "pull",
        url.as_str(),
        "--plain-http",
        "--ref",
        "theirs",
    ]);
    assert_eq!(r["ref"], "theirs", "{r}");
    let stored = env
        .store
        .join("refs/users")
        .join(user.uid.to_string())
        .join("theirs");
    assert!(stored.exists(), "the ref is in the user's namespace");
    let scratch = user.home.join(".cache/velo/transfer");
    let left: Vec<_> = fs::read_dir(&scratch)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "scratch stores left: {left:?}");
}
