//! Access profiles: velo-mountd records which of an image's files a run reads first, merges
//! runs, and reads a profiled image's files ahead when it lends the next mount of it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::mountd::Mountd;
use common::profiles::{cached, evict, files, object_of};
use common::{Env, can_mount, describe};

/// A project whose install writes four 16 KiB files of distinct bytes into `deps/lib/`.
fn project(env: &Env) -> PathBuf {
    let project = common::fixtures::custom_project(env.dir.path(), &env.path("proj"));
    fs::write(
        project.join("velo.toml"),
        "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\ninputs = [\"deps.lock\"]\n\
         install = \"mkdir -p deps/lib && for f in a b c unused; do head -c 16384 /dev/urandom \
         > deps/lib/$f; done\"\n",
    )
    .unwrap();
    project
}

fn velo(env: &Env, mountd: &Mountd, project: &Path, args: &[&str]) -> Command {
    let mut c = mountd.velo(&["--store", env.store.to_str().unwrap()]);
    c.args(args)
        .current_dir(project)
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID");
    c
}

fn run(env: &Env, mountd: &Mountd, project: &Path, script: &str) {
    let out = velo(env, mountd, project, &["run", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "velo run {script}: {}",
        describe(&out)
    );
}

/// The image of the project's (one) deps dir, from `velo status`.
fn image_of(env: &Env, mountd: &Mountd, project: &Path) -> String {
    let out = velo(env, mountd, project, &["--json", "status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "status: {}", describe(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status[0]["image"].as_str().unwrap().to_owned()
}

fn profile(env: &Env, mountd: &Mountd, project: &Path, image: &str) -> serde_json::Value {
    let out = velo(
        env,
        mountd,
        project,
        &["--json", "inspect", image, "--profile"],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "inspect --profile: {}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits (the recording ends once the run has given its mount back; at most 60 s) until the
/// profile has `runs` runs.
fn profile_with_runs(
    env: &Env,
    mountd: &Mountd,
    project: &Path,
    image: &str,
    runs: u64,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = profile(env, mountd, project, image);
        if p["runs"] == runs {
            return p;
        }
        assert!(Instant::now() < deadline, "no profile of {runs} runs: {p}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn runs_are_recorded_in_first_read_order_and_merged() {
    if !can_mount("runs_are_recorded_in_first_read_order_and_merged") {
        return;
    }
    let env = Env::new();
    let project = project(&env);
    let mountd = Mountd::start(&env);
    // The first run builds (no mount is lent for a build's own install).
    run(&env, &mountd, &project, "true");
    let image = image_of(&env, &mountd, &project);
    let before = profile(&env, &mountd, &project, &image);
    let first = before["runs"].as_u64().unwrap();

    run(
        &env,
        &mountd,
        &project,
        "cat deps/lib/c deps/lib/a > /dev/null",
    );
    let p = profile_with_runs(&env, &mountd, &project, &image, first + 1);
    let order: Vec<String> = files(&p).into_iter().map(|(f, _)| f).collect();
    if first == 0 {
        assert_eq!(order, ["lib/c", "lib/a"], "{p}");
    }
    assert!(!order.contains(&"lib/unused".to_owned()), "{p}");

    // Another run reads b, then c: c was read by both runs, b by one.
    run(
        &env,
        &mountd,
        &project,
        "cat deps/lib/b deps/lib/c > /dev/null",
    );
    let p = profile_with_runs(&env, &mountd, &project, &image, first + 2);
    let got = files(&p);
    assert!(got.contains(&("lib/b".to_owned(), 1)), "{p}");
    assert!(got.iter().any(|(f, h)| f == "lib/c" && *h >= 2), "{p}");
    assert!(!got.iter().any(|(f, _)| f == "lib/unused"), "{p}");
    assert_eq!(p["files"], got.len());
    assert_eq!(p["bytes"], 16384 * got.len() as u64);
    mountd.stop();
}

#[test]
fn a_profiled_image_has_its_hot_files_read_ahead_when_it_is_lent() {
    if !can_mount("a_profiled_image_has_its_hot_files_read_ahead_when_it_is_lent") {
        return;
    }
    let env = Env::new();
    let project = project(&env);
    let mountd = Mountd::start(&env);
    run(&env, &mountd, &project, "true");
    let image = image_of(&env, &mountd, &project);
    let runs = profile(&env, &mountd, &project, &image)["runs"]
        .as_u64()
        .unwrap();
    run(
        &env,
        &mountd,
        &project,
        "cat deps/lib/a deps/lib/b > /dev/null",
    );
    profile_with_runs(&env, &mountd, &project, &image, runs + 1);

    let [a, b, unused] = ["/lib/a", "/lib/b", "/lib/unused"].map(|f| object_of(&env, &image, f));
    for o in [&a, &b, &unused] {
        evict(o);
    }
    // A run that reads nothing: the service reads the profile's files ahead as it lends the
    // mount, not the others.
    run(&env, &mountd, &project, "true");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(cached(&a) && cached(&b)) {
        assert!(
            Instant::now() < deadline,
            "the profiled files were not read ahead"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !cached(&unused),
        "a file the profile does not name was read"
    );
    mountd.stop();
}

/// Root without velo-mountd records its runs itself (the profile is written before velo
/// exits), reads a profile ahead as its command starts, and `velo mount` reads it ahead before
/// it returns (an init container's app then starts warm).
#[test]
fn root_without_the_service_records_and_reads_ahead_and_so_does_velo_mount() {
    if !can_mount("root_without_the_service_records_and_reads_ahead_and_so_does_velo_mount") {
        return;
    }
    let env = Env::new();
    let project = project(&env);
    let direct = |args: &[&str]| {
        let mut c = env.velo(args);
        c.current_dir(&project)
            .env("VELO_MOUNTD", "off")
            .env_remove("SUDO_UID")
            .env_remove("SUDO_GID");
        let out = c.output().unwrap();
        assert!(out.status.success(), "velo {args:?}: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The first run builds, then runs the command over the new image: recorded.
    direct(&["run", "sh", "-c", "cat deps/lib/b > /dev/null"]);
    let status: serde_json::Value = serde_json::from_str(&direct(&["--json", "status"])).unwrap();
    let image = status[0]["image"].as_str().unwrap().to_owned();
    let p: serde_json::Value =
        serde_json::from_str(&direct(&["--json", "inspect", &image, "--profile"])).unwrap();
    assert_eq!(p["runs"], 1, "{p}");
    assert_eq!(files(&p), [("lib/b".to_owned(), 1)], "{p}");

    let [b, unused] = ["/lib/b", "/lib/unused"].map(|f| object_of(&env, &image, f));
    evict(&b);
    evict(&unused);
    direct(&["run", "true"]);
    assert!(cached(&b), "velo run did not read the profiled file ahead");
    assert!(
        !cached(&unused),
        "a file the profile does not name was read"
    );

    evict(&b);
    let target = env.path("mnt");
    let out = direct(&["mount", &image, target.to_str().unwrap()]);
    let mounted = common::Mounted::adopt(&target, &env.store);
    assert!(out.contains("read ahead 1 files"), "{out}");
    assert!(
        cached(&b),
        "velo mount did not read the profiled file ahead"
    );
    assert!(
        !cached(&unused),
        "a file the profile does not name was read"
    );
    mounted.umount();
}

/// A profile that cannot be read, or whose image is gone, is a leftover to fsck (not damage:
/// it is only a hint), and `fsck --repair` removes it.
#[test]
fn fsck_reports_and_repairs_bad_profiles() {
    let env = Env::new();
    let image = env.snapshot_small("t");
    let profiles = env.store.join("profiles");
    fs::create_dir_all(&profiles).unwrap();
    fs::write(profiles.join(&image), b"{\"version\":1").unwrap();
    let orphan = "ab".repeat(32);
    fs::write(
        profiles.join(&orphan),
        br#"{"version":1,"runs":1,"files":[]}"#,
    )
    .unwrap();
    let r = env.json(&["fsck"]);
    assert_eq!(r["clean"], true, "{r}");
    let kinds: Vec<&str> = r["reclaimable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"profile-corrupt"), "{r}");
    assert!(kinds.contains(&"profile-orphan"), "{r}");
    let r = env.json(&["fsck", "--repair"]);
    assert_eq!(r["repaired"].as_array().unwrap().len(), 2, "{r}");
    assert!(!profiles.join(&image).exists());
    assert!(!profiles.join(&orphan).exists());
    let r = env.json(&["fsck"]);
    assert_eq!(r["reclaimable"].as_array().unwrap().len(), 0, "{r}");
}

/// A settled profile follows the code: velo-mountd records one run in N again
/// (`--profile-refresh-every`), and what the runs stopped reading ages out while what they
/// read now comes in.
#[test]
fn a_settled_profile_follows_what_the_command_reads_now() {
    if !can_mount("a_settled_profile_follows_what_the_command_reads_now") {
        return;
    }
    let env = Env::new();
    let project = project(&env);
    let mountd = Mountd::start_with(&env, &["--profile-refresh-every", "2"]);
    run(&env, &mountd, &project, "true");
    let image = image_of(&env, &mountd, &project);
    // Settle it on a command that reads lib/a: each run is recorded until it has 3.
    let mut runs = profile(&env, &mountd, &project, &image)["runs"]
        .as_u64()
        .unwrap();
    while runs < 3 {
        run(&env, &mountd, &project, "cat deps/lib/a > /dev/null");
        runs = profile_with_runs(&env, &mountd, &project, &image, runs + 1)["runs"]
            .as_u64()
            .unwrap();
    }
    // The code changes: it reads lib/c now. One run in every two is recorded.
    for _ in 0..3 {
        run(&env, &mountd, &project, "cat deps/lib/c > /dev/null");
        run(&env, &mountd, &project, "cat deps/lib/c > /dev/null");
        runs = profile_with_runs(&env, &mountd, &project, &image, runs + 1)["runs"]
            .as_u64()
            .unwrap();
    }
    let p = profile(&env, &mountd, &project, &image);
    let order: Vec<String> = files(&p).into_iter().map(|(f, _)| f).collect();
    assert_eq!(order, ["lib/c"], "lib/a should have aged out: {p}");
    mountd.stop();
}
