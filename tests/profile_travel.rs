//! Access profiles travel with their image (issue 14, "profiles travel"): `velo push` sends a
//! store's profile beside the image, `velo pull` brings it (through velo-mountd for an ordinary
//! user), so the first run on a fresh machine has its hot files read ahead; `export`/`import`
//! carry it too; and a hostile profile — too large, malformed, naming objects not in the
//! image — is dropped while the image arrives as it would without it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mountd::{Mountd, TestUser};
use common::profiles::{cached, digest_of, evict, files, object_of};
use common::registry::Registry;
use common::{Env, can_mount, describe, path_str};
use serde_json::{Value, json};
use velo_objects::{Digest, MAX_PROFILE_BYTES, Profile, Store};

const INSTALL_TOML: &str = "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\n\
    inputs = [\"deps.lock\"]\ninstall = \"mkdir -p deps/lib && for f in a b c unused; do \
    head -c 16384 /dev/urandom > deps/lib/$f; done\"\n";

/// A project of `user`'s whose install writes four 16 KiB files of distinct bytes into
/// `deps/lib/`.
fn project_of(user: &TestUser) -> PathBuf {
    let project = user.home.join("proj");
    fs::create_dir_all(&project).unwrap();
    fs::write(project.join("deps.lock"), "v1\n").unwrap();
    fs::write(project.join("velo.toml"), INSTALL_TOML).unwrap();
    user.own(&user.home);
    project
}

/// `velo ARGS…` as `user` through `mountd`, in `dir`, expecting success: stdout.
fn as_user(user: &TestUser, mountd: &Mountd, dir: &Path, args: &[&str]) -> String {
    let out = user.velo(mountd, dir, args).output().unwrap();
    assert!(
        out.status.success(),
        "velo {args:?} as {}: {}",
        user.name,
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn as_user_json(user: &TestUser, mountd: &Mountd, dir: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = as_user(user, mountd, dir, &a);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("velo {args:?}: {e}: {out}"))
}

/// `velo inspect IMAGE --profile --json` of `env`'s store, as root.
fn profile(env: &Env, image: &str) -> Value {
    env.json(&["inspect", image, "--profile"])
}

/// THE test of the issue: a profile recorded on one machine (store A, its velo-mountd, an
/// ordinary user's runs) is pushed with the image and pulled by the same user on a fresh
/// machine (store B, a fresh velo-mountd); there `inspect --profile` shows the same files and
/// runs, and the very first `velo run` has the profiled files read ahead (and not the file no
/// run read).
#[test]
fn a_pushed_profile_arrives_with_a_pull_and_the_first_run_reads_it_ahead() {
    if !can_mount("a_pushed_profile_arrives_with_a_pull_and_the_first_run_reads_it_ahead") {
        return;
    }
    let reg = Registry::start();
    let a = Env::new();
    let mountd_a = Mountd::start(&a);
    let user = TestUser::create("travel", a.dir.path());
    let project = project_of(&user);

    // Machine A: build, then a run that reads b and a; wait until it is recorded.
    as_user(&user, &mountd_a, &project, &["run", "true"]);
    let status = as_user_json(&user, &mountd_a, &project, &["status"]);
    let image = status[0]["image"].as_str().unwrap().to_owned();
    let ref_name = status[0]["ref"].as_str().unwrap().to_owned();
    as_user(
        &user,
        &mountd_a,
        &project,
        &["run", "sh", "-c", "cat deps/lib/b deps/lib/a > /dev/null"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let recorded = loop {
        let p = profile(&a, &image);
        let names: Vec<String> = files(&p).into_iter().map(|(f, _)| f).collect();
        if names.contains(&"lib/a".to_owned()) && names.contains(&"lib/b".to_owned()) {
            break p;
        }
        assert!(Instant::now() < deadline, "the run was not recorded: {p}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !files(&recorded).iter().any(|(f, _)| f == "lib/unused"),
        "{recorded}"
    );

    // The user pushes their ref (through velo-mountd A): the profile goes with it.
    let url = reg.url("velo/travel:v1");
    let pushed = as_user_json(
        &user,
        &mountd_a,
        &project,
        &["push", &ref_name, url.as_str(), "--plain-http"],
    );
    assert_eq!(pushed["image"], image.as_str(), "{pushed}");
    assert_eq!(pushed["profile"]["files"], recorded["files"], "{pushed}");
    mountd_a.stop();

    // Machine B: a fresh store and service; the same user pulls under the ref their run uses.
    let b = Env::new();
    let mountd_b = Mountd::start(&b);
    let pulled = as_user_json(
        &user,
        &mountd_b,
        &project,
        &["pull", url.as_str(), "--plain-http", "--ref", &ref_name],
    );
    assert_eq!(
        pulled["image"],
        image.as_str(),
        "same image digest: {pulled}"
    );
    assert_eq!(
        pulled["profile"]["outcome"], "stored",
        "the profile did not arrive with the pull: {pulled}"
    );
    let there = profile(&b, &image);
    // Sent by a user, it counts as one run on B (it cannot outweigh what B records).
    assert_eq!(there["runs"], 1, "{there} vs {recorded}");
    assert_eq!(files(&there), files(&recorded), "{there} vs {recorded}");
    assert_eq!(there["bytes"], recorded["bytes"]);

    // The first run on B reads nothing itself: the profiled files are read ahead as it gets
    // its mount, the unprofiled one is not.
    let [fa, fb, unused] = ["/lib/a", "/lib/b", "/lib/unused"].map(|f| object_of(&b, &image, f));
    for o in [&fa, &fb, &unused] {
        evict(o);
    }
    as_user(&user, &mountd_b, &project, &["run", "true"]);
    let status = as_user_json(&user, &mountd_b, &project, &["status"]);
    assert_eq!(
        status[0]["image"],
        image.as_str(),
        "the run used the pulled image: {status}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(cached(&fa) && cached(&fb)) {
        assert!(
            Instant::now() < deadline,
            "the pulled profile's files were not read ahead on the first run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !cached(&unused),
        "a file the profile does not name was read"
    );
    mountd_b.stop();
}

/// A tree of three 16 KiB files of distinct bytes (`a`, `b`, `unused`), snapshotted as root
/// into `env`'s store as `ci/deps`; its image.
fn small_image(env: &Env) -> String {
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for f in ["a", "b", "unused"] {
        let bytes: Vec<u8> = (0..16384u32)
            .map(|i| (i.wrapping_mul(2654435761) >> (f.len() + 7)) as u8 ^ f.as_bytes()[0])
            .collect();
        fs::write(src.join(f), bytes).unwrap();
    }
    env.snapshot(&src, "ci/deps")
}

/// Writes a profile of `image` naming `a` then `b`, recorded over `runs` runs.
fn write_profile(env: &Env, image: &str, runs: u32) -> Profile {
    let store = Store::open(&env.store).unwrap();
    let mut p = Profile::of_run(&[
        (digest_of(env, image, "/a"), 16384),
        (digest_of(env, image, "/b"), 16384),
    ]);
    p.runs = runs;
    store
        .write_profile(&Digest::parse(image).unwrap(), &p)
        .unwrap();
    p
}

/// `velo export` writes the store's profile into the file and `velo import` brings it — as
/// root into a store of its own, and as an ordinary user through velo-mountd (under the image
/// the service stores for them). A store whose own profile has more runs keeps it.
#[test]
fn export_and_import_carry_the_profile() {
    if !can_mount("export_and_import_carry_the_profile") {
        return;
    }
    let a = Env::new();
    let image = small_image(&a);
    write_profile(&a, &image, 3);
    let recorded = profile(&a, &image);
    let file = a.path("deps.velo");
    let e = a.json(&["export", "ci/deps", path_str(&file)]);
    assert_eq!(e["profile"]["files"], 2, "{e}");

    // As root, into a fresh store.
    let b = Env::new();
    let i = b.json(&["import", path_str(&file)]);
    assert_eq!(i["image"], image.as_str(), "{i}");
    assert_eq!(i["profile"]["outcome"], "stored", "{i}");
    let there = profile(&b, &image);
    assert_eq!(there["runs"], 3, "{there}");
    assert_eq!(files(&there), files(&recorded), "{there}");

    // A store whose own profile has more runs keeps it; one with fewer takes the file's.
    let local = write_profile(&b, &image, 7);
    let i = b.json(&["import", path_str(&file), "--ref", "again"]);
    assert_eq!(i["profile"]["outcome"], "kept-local", "{i}");
    assert_eq!(profile(&b, &image)["runs"], 7);
    assert_eq!(local.runs, 7);
    write_profile(&b, &image, 1);
    let i = b.json(&["import", path_str(&file), "--ref", "again"]);
    assert_eq!(i["profile"]["outcome"], "stored", "{i}");
    assert_eq!(profile(&b, &image)["runs"], 3);

    // As an ordinary user, through velo-mountd: the service stores the image mapped to them
    // (another digest) and the profile under it.
    let c = Env::new();
    let mountd = Mountd::start(&c);
    let user = TestUser::create("travel-imp", c.dir.path());
    fs::set_permissions(a.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir_all(&user.home).unwrap();
    user.own(&user.home);
    let i = as_user_json(
        &user,
        &mountd,
        &user.home,
        &["import", path_str(&file), "--ref", "mine"],
    );
    assert_eq!(i["profile"]["outcome"], "stored", "{i}");
    let stored = i["image"].as_str().unwrap();
    let there = profile(&c, stored);
    // A user's profile counts as one run.
    assert_eq!(there["runs"], 1, "{there}");
    assert_eq!(files(&there), files(&recorded), "{there}");
    mountd.stop();
}

/// Runs `zstd ARGS` on `input`; its output.
fn zstd(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("zstd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run zstd (apt-get install zstd)");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "zstd {args:?}: {}", describe(&out));
    out.stdout
}

/// The export file `file` with `trailer` as its profile, the header claiming `claim` bytes.
fn with_profile_trailer(file: &Path, claim: u64, trailer: &[u8]) -> Vec<u8> {
    let bytes = fs::read(file).unwrap();
    let (head, body) = bytes.split_at(16);
    let plain = zstd(&["-d", "-c"], body);
    let len = u64::from_le_bytes(plain[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&plain[8..8 + len]).unwrap();
    header["profile"] = json!(claim);
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&plain[8 + len..]);
    out.extend_from_slice(trailer);
    let mut file = head.to_vec();
    file.extend(zstd(&["-c", "-1"], &out));
    file
}

/// Hostile profiles: (name, bytes). `foreign` is a well-formed profile naming only an object
/// the image does not have.
fn hostile_profiles() -> Vec<(&'static str, Vec<u8>)> {
    let foreign = Profile::of_run(&[(Digest::from_bytes([0xee; 32]), 4096)]);
    vec![
        ("too-large", vec![b' '; MAX_PROFILE_BYTES as usize + 1]),
        (
            "malformed",
            br#"{"version":1,"runs":1,"files":[["../../etc/passwd",1,1]]}"#.to_vec(),
        ),
        ("foreign", foreign.to_bytes()),
    ]
}

/// A profile that names one object of the image at a false size and one foreign object.
fn mixed_profile(env: &Env, image: &str) -> Vec<u8> {
    let mut p = Profile::of_run(&[
        (Digest::from_bytes([0xee; 32]), 4096),
        (digest_of(env, image, "/b"), 1 << 40),
    ]);
    p.runs = 2;
    p.to_bytes()
}

/// What a bad profile meets in a pull, an import and velo-mountd: it is dropped (the outcome
/// says why), no profile is written, and the image arrives exactly as without it. A profile
/// naming some objects of the image and some others keeps only the image's, at the image's
/// sizes. An artifact and a file without a profile arrive as before.
#[test]
fn a_hostile_profile_is_dropped_and_the_image_still_arrives() {
    if !can_mount("a_hostile_profile_is_dropped_and_the_image_still_arrives") {
        return;
    }
    let a = Env::new();
    let image = small_image(&a);
    let image_digest = Digest::parse(&image).unwrap();
    let reg = Registry::start();

    // Pushed without a profile: no profile layer; pulled: none.
    let p = a.json(&["push", "ci/deps", &reg.url("velo/h:plain"), "--plain-http"]);
    assert!(p["profile"].is_null(), "{p}");
    let manifest = reg.manifest("velo/h", "plain");
    let layers = manifest["layers"].as_array().unwrap().clone();
    assert!(
        layers
            .iter()
            .all(|l| l["mediaType"] != "application/vnd.velo.profile.v1+json"),
        "{manifest}"
    );
    let b = Env::new();
    let r = b.json(&["pull", &reg.url("velo/h:plain"), "--plain-http"]);
    assert_eq!(r["profile"]["outcome"], "none", "{r}");

    // The same artifact with a hostile profile layer added: each pulls fine, the profile is
    // dropped.
    let mut cases = hostile_profiles();
    cases.push(("mixed", mixed_profile(&a, &image)));
    for (name, bytes) in &cases {
        let blob = reg.put_blob("velo/h", bytes);
        let mut m = manifest.clone();
        m["layers"].as_array_mut().unwrap().push(json!({
            "mediaType": "application/vnd.velo.profile.v1+json",
            "digest": blob,
            "size": bytes.len(),
        }));
        reg.put_manifest("velo/h", name, &serde_json::to_vec(&m).unwrap());
        let fresh = Env::new();
        let r = fresh.json(&[
            "pull",
            &reg.url(&format!("velo/h:{name}")),
            "--plain-http",
            "--ref",
            "got",
        ]);
        assert_eq!(r["image"], image.as_str(), "{name}: {r}");
        assert_eq!(r["ref"], "got", "{name}: {r}");
        let kept = Store::open(&fresh.store)
            .unwrap()
            .read_profile(&image_digest)
            .unwrap();
        if *name == "mixed" {
            assert_eq!(r["profile"]["outcome"], "stored", "{name}: {r}");
            let kept = kept.unwrap();
            assert_eq!(kept.entries.len(), 1, "{kept:?}");
            assert_eq!(kept.entries[0].digest, digest_of(&a, &image, "/b"));
            assert_eq!(
                kept.entries[0].size, 16384,
                "the image's size, not the claim"
            );
        } else {
            assert_eq!(r["profile"]["outcome"], "dropped", "{name}: {r}");
            assert_eq!(kept, None, "{name}: a profile was written");
        }
        fresh.ok(&["fsck"]);
    }

    // An export file with a hostile profile trailer (and one claiming more than it has).
    let file = a.path("deps.velo");
    let e = a.json(&["export", "ci/deps", path_str(&file)]);
    assert!(e["profile"].is_null(), "{e}");
    let mut trailers: Vec<(String, u64, Vec<u8>)> = hostile_profiles()
        .into_iter()
        .map(|(n, b)| (n.to_owned(), b.len() as u64, b))
        .collect();
    trailers.push(("cut-short".into(), 1000, b"{\"version\"".to_vec()));
    for (name, claim, bytes) in &trailers {
        let bad = a.path(&format!("{name}.velo"));
        fs::write(&bad, with_profile_trailer(&file, *claim, bytes)).unwrap();
        let fresh = Env::new();
        let i = fresh.json(&["import", path_str(&bad)]);
        assert_eq!(i["image"], image.as_str(), "{name}: {i}");
        assert_eq!(i["ref"], "ci/deps", "{name}: {i}");
        assert_eq!(i["profile"]["outcome"], "dropped", "{name}: {i}");
        let kept = Store::open(&fresh.store)
            .unwrap()
            .read_profile(&image_digest)
            .unwrap();
        assert_eq!(kept, None, "{name}: a profile was written");
    }

    // velo-mountd, sent each hostile profile by a client that skips velo's own checks: every
    // import succeeds, no profile is kept; a good one is.
    let c = Env::new();
    let mountd = Mountd::start(&c);
    let user = TestUser::create("travel-bad", c.dir.path());
    fs::create_dir_all(&user.home).unwrap();
    user.own(&user.home);
    let client = c.path("raw_client.py");
    fs::write(&client, include_str!("support/raw_client.py")).unwrap();
    fs::set_permissions(&client, fs::Permissions::from_mode(0o644)).unwrap();
    let payload = c.path("payload");
    fs::create_dir_all(payload.join("objects")).unwrap();
    fs::copy(a.store.join("images").join(&image), payload.join("image")).unwrap();
    for f in ["/a", "/b", "/unused"] {
        let d = digest_of(&a, &image, f);
        fs::copy(
            object_of(&a, &image, f),
            payload.join("objects").join(d.to_hex()),
        )
        .unwrap();
    }
    let mut cases = hostile_profiles();
    cases.push(("good", mixed_profile(&a, &image)));
    for (name, bytes) in &cases {
        let pfile = payload.join(format!("{name}.profile"));
        fs::write(&pfile, bytes).unwrap();
        for p in std::iter::once(payload.clone()).chain(common::walkdir(&payload)) {
            let mode = if p.is_dir() { 0o755 } else { 0o644 };
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        let python = if Path::new("/usr/bin/python3").exists() {
            PathBuf::from("/usr/bin/python3")
        } else {
            PathBuf::from("python3")
        };
        let out = user
            .command(&python, &user.home)
            .arg(&client)
            .arg("--socket")
            .arg(&mountd.socket)
            .args(["import", "--image", path_str(&payload.join("image"))])
            .args(["--objects", path_str(&payload.join("objects"))])
            .args(["--name", name, "--profile", path_str(&pfile)])
            .output()
            .unwrap();
        assert!(out.status.success(), "raw_client.py: {}", describe(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        let r: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let imported = &r["responses"][1]["imported"];
        assert!(imported.is_object(), "{name}: the import failed: {r}");
        let stored = Digest::parse(imported["image"].as_str().unwrap()).unwrap();
        let kept = Store::open(&c.store)
            .unwrap()
            .read_profile(&stored)
            .unwrap();
        if *name == "good" {
            assert_eq!(imported["profile"]["outcome"], "stored", "{r}");
            let kept = kept.unwrap();
            assert_eq!(kept.entries.len(), 1, "{kept:?}");
            assert_eq!(
                kept.entries[0].size, 16384,
                "the image's size, not the claim"
            );
        } else {
            assert_eq!(imported["profile"]["outcome"], "dropped", "{name}: {r}");
            assert_eq!(kept, None, "{name}: the service kept a profile");
        }
    }
    mountd.stop();
}
