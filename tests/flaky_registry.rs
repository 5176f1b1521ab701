//! Push and pull through a registry that fails: a proxy in front of the test registry
//! (`tests/common/flaky_proxy.rs`) fails every 10th request (a 500, a 503 with `Retry-After: 0`,
//! a 429 with `Retry-After: 1`, a connection cut mid-body, in turn), or chosen requests for
//! ever. Transient failures are retried per request (what was fetched stays fetched, a cut
//! download resumes); permanent ones are not, and every final error names the blob, the
//! address, the attempts and the last cause. Needs root (mounts); skips loudly without.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fixtures::sh;
use common::flaky_proxy::{Fault, FlakyProxy, Logged, Rule};
use common::registry::Registry;
use common::{Env, can_mount, compare_trees, describe};

/// Pushes as the issue measured them: how many in a row must complete.
const PUSHES: usize = 8;
/// Pulls in a row (each into an empty store, so each downloads everything).
const PULLS: usize = 25;

/// A tree of ~1.1 MB in 40 directories: with 64 KiB packs, about 18 blobs to move.
fn tree(dir: &Path) {
    sh(
        "for p in $(seq 1 40); do mkdir -p p$p; head -c 20000 /dev/urandom > p$p/a; \
         head -c 7000 /dev/urandom > p$p/b; echo small-$p > p$p/c; done",
        dir,
    );
}

fn push_args<'a>(image: &'a str, url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--json",
        "push",
        image,
        url,
        "--plain-http",
        "--pack-size",
        "64K",
    ];
    args.extend_from_slice(extra);
    args
}

fn json(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(out.status.success(), "{what} failed:\n{}", describe(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: bad JSON {e}"))
}

fn faults(log: &[Logged]) -> u64 {
    log.iter().filter(|l| l.fault.is_some()).count() as u64
}

/// The index of the artifact at `repo:tag` (read from the registry directly).
fn index(reg: &Registry, repo: &str, tag: &str) -> serde_json::Value {
    let m = reg.manifest(repo, tag);
    let digest = m["config"]["digest"].as_str().expect("config digest");
    serde_json::from_slice(&reg.blob(repo, digest)).expect("index JSON")
}

fn gets_of(log: &[Logged], digest: &str) -> Vec<Logged> {
    log.iter()
        .filter(|l| l.method == "GET" && l.path.ends_with(digest))
        .cloned()
        .collect()
}

#[test]
fn pulls_and_pushes_complete_through_a_registry_failing_10_percent_of_requests() {
    if !can_mount("pulls_and_pushes_complete_through_a_registry_failing_10_percent_of_requests") {
        return;
    }
    let reg = Registry::start();
    let proxy = FlakyProxy::start(reg.port());
    let a = Env::new();
    let src = a.path("src");
    tree(&src);
    let digest = a.snapshot(&src, "flaky/app");

    // PUSHES pushes (each to a new repository, so each sends everything), then PULLS pulls
    // (each into an empty store): seconds, retries, and the first and last pulled stores.
    let round = |repo: &str| {
        let started = Instant::now();
        let mut retries = 0;
        for i in 0..PUSHES {
            let url = proxy.url(&format!("{repo}{i}:v1"));
            let out = a
                .velo(&push_args("flaky/app", &url, &[]))
                .output()
                .expect("run velo");
            let p = json(&out, &format!("push {i}"));
            assert_eq!(p["image"], digest.as_str(), "{p}");
            assert_eq!(p["blobs_skipped"], 0, "a new repository has nothing: {p}");
            retries += p["retries"].as_u64().expect("retries");
        }
        let mut kept = Vec::new();
        for i in 0..PULLS {
            let b = Env::new();
            let url = proxy.url(&format!("{repo}{}:v1", i % PUSHES));
            let out = b
                .velo(&[
                    "--json",
                    "pull",
                    &url,
                    "--plain-http",
                    "--ref",
                    "flaky/pulled",
                ])
                .output()
                .expect("run velo");
            let r = json(&out, &format!("pull {i}"));
            assert_eq!(r["image"], digest.as_str(), "{r}");
            assert_eq!(r["objects_fetched"], r["objects"], "{r}");
            retries += r["retries"].as_u64().expect("retries");
            if i == 0 || i == PULLS - 1 {
                kept.push(b);
            }
        }
        (started.elapsed().as_secs_f64(), retries, kept)
    };

    // The same work through a proxy that fails nothing, for comparison.
    let (calm_seconds, calm_retries, _) = round("calm/p");
    assert_eq!(calm_retries, 0);
    let calm_requests = proxy.take_log().len();

    proxy.fail_every(Some(10));
    // Without retries the same registry defeats a push (dozens of requests, every 10th fails).
    let url = proxy.url("flaky/control:v1");
    let out = a
        .velo(&push_args("flaky/app", &url, &[]))
        .env("VELO_REGISTRY_RETRIES", "0")
        .output()
        .expect("run velo");
    assert!(
        !out.status.success(),
        "a push without retries should have failed:\n{}",
        describe(&out)
    );
    assert!(faults(&proxy.take_log()) >= 1);

    let (seconds, retries, kept) = round("flaky/p");
    let log = proxy.take_log();
    let injected = faults(&log);
    assert!(injected * 12 >= log.len() as u64, "about 10% must fail");
    assert_eq!(
        retries, injected,
        "each injected failure costs exactly one retry"
    );
    println!(
        "flaky registry (10% of requests fail): {PULLS} pulls and {PUSHES} pushes completed, \
         {retries} retries, {seconds:.1} s ({} requests, {injected} failed; the same without \
         failures: {calm_requests} requests, {calm_seconds:.1} s; without retries the first push \
         failed)",
        log.len()
    );

    // Byte for byte what was snapshotted.
    for b in &kept {
        b.ok(&["fsck"]);
        let mnt = b.path("mnt");
        let m = b.mount("flaky/pulled", &mnt, &[]);
        let diffs = compare_trees(&src, &mnt);
        assert!(
            diffs.is_empty(),
            "pulled tree differs:\n{}",
            diffs.join("\n")
        );
        m.umount();
    }

    // And a pull without retries fails too.
    let b = Env::new();
    let url = proxy.url("flaky/p0:v1");
    let out = b
        .velo(&["pull", &url, "--plain-http", "--ref", "flaky/x"])
        .env("VELO_REGISTRY_RETRIES", "0")
        .output()
        .expect("run velo");
    assert!(
        !out.status.success(),
        "a pull without retries should have failed"
    );
}

#[test]
fn a_failed_blob_is_retried_alone_and_a_cut_download_resumes() {
    if !can_mount("a_failed_blob_is_retried_alone_and_a_cut_download_resumes") {
        return;
    }
    let reg = Registry::start();
    let proxy = FlakyProxy::start(reg.port());
    let a = Env::new();
    let src = a.path("src");
    tree(&src);
    let digest = a.snapshot(&src, "r/app");
    let url = proxy.url("r:1");
    json(
        &a.velo(&push_args("r/app", &url, &[])).output().unwrap(),
        "push",
    );
    let idx = index(&reg, "r", "1");
    let packs: Vec<String> = idx["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["digest"].as_str().unwrap().to_owned())
        .collect();
    assert!(packs.len() >= 3, "{idx}");
    let image_blob = idx["image"]["blob"].as_str().unwrap().to_owned();
    // A 503 for the first pack, a connection cut mid-body for the second, once each.
    for (pack, fault) in [
        (&packs[0], Fault::Status(503, None)),
        (&packs[1], Fault::Cut),
    ] {
        proxy.add_rule(Rule {
            method: "GET",
            path_contains: pack.clone(),
            fault,
            times: Some(1),
        });
    }
    proxy.take_log();
    let b = Env::new();
    let out = b
        .velo(&["--json", "pull", &url, "--plain-http", "--ref", "r/app"])
        .output()
        .unwrap();
    let r = json(&out, "pull");
    assert_eq!(r["image"], digest.as_str());
    assert_eq!(r["retries"], 2, "{r}");
    let log = proxy.take_log();
    // Manifest, index and image once each: the failures of later blobs did not fetch them again.
    let manifests = log
        .iter()
        .filter(|l| l.path.contains("/manifests/"))
        .count();
    assert_eq!(manifests, 1, "{log:#?}");
    let config = idx_digest(&reg);
    assert_eq!(gets_of(&log, &config).len(), 1, "{log:#?}");
    assert_eq!(gets_of(&log, &image_blob).len(), 1, "{log:#?}");
    // Each failed pack twice; the cut one resumed where it stopped.
    assert_eq!(gets_of(&log, &packs[0]).len(), 2, "{log:#?}");
    let cut = gets_of(&log, &packs[1]);
    assert_eq!(cut.len(), 2, "{log:#?}");
    let resumed = cut[1].range.as_deref().unwrap_or("");
    assert!(
        resumed.starts_with("bytes=") && !resumed.starts_with("bytes=0-"),
        "the second GET must resume with a Range: {cut:#?}"
    );
    for p in &packs[2..] {
        assert_eq!(gets_of(&log, p).len(), 1, "{p}: {log:#?}");
    }
    b.ok(&["fsck"]);
    let mnt = b.path("mnt");
    let m = b.mount("r/app", &mnt, &[]);
    assert!(compare_trees(&src, &mnt).is_empty());
    m.umount();
}

fn idx_digest(reg: &Registry) -> String {
    reg.manifest("r", "1")["config"]["digest"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn permanent_errors_are_not_retried_and_name_the_blob() {
    if !can_mount("permanent_errors_are_not_retried_and_name_the_blob") {
        return;
    }
    let reg = Registry::start();
    let proxy = FlakyProxy::start(reg.port());
    let a = Env::new();
    let src = a.path("src");
    tree(&src);
    a.snapshot(&src, "p/app");
    let url = proxy.url("perm:1");
    json(
        &a.velo(&push_args("p/app", &url, &[])).output().unwrap(),
        "push",
    );
    let idx = index(&reg, "perm", "1");
    let blobs = idx["blobs"].as_array().unwrap();
    let pack = blobs[0]["digest"].as_str().unwrap().to_owned();
    let pack_name = format!("pack 1 of {}", blobs.len());
    let b = Env::new();
    let pull = |retry_delay_ms: &str| {
        let started = Instant::now();
        let out = b
            .velo(&["pull", &url, "--plain-http", "--ref", "p/app", "-j", "1"])
            .env("VELO_REGISTRY_RETRY_DELAY_MS", retry_delay_ms)
            .output()
            .unwrap();
        assert!(!out.status.success(), "the pull should fail");
        assert!(started.elapsed() < Duration::from_secs(60));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        println!("{}", err.trim_end());
        err
    };
    let no_ref = |b: &Env| {
        assert!(b.fails(&["inspect", "p/app"]).contains("no ref"));
        b.ok(&["fsck"]);
    };

    // A 404: once, and the error says which blob of which artifact.
    proxy.add_rule(Rule {
        method: "GET",
        path_contains: pack.clone(),
        fault: Fault::Status(404, None),
        times: None,
    });
    proxy.take_log();
    let err = pull("1");
    assert_eq!(gets_of(&proxy.take_log(), &pack).len(), 1, "not retried");
    for part in [
        pack.as_str(),
        pack_name.as_str(),
        url.as_str(),
        "HTTP 404",
        "BLOB_UNKNOWN",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    assert!(!err.contains("attempts"), "{err}");
    no_ref(&b);

    // Bytes that do not match their digest: once, naming the damaged object and its blob.
    proxy.clear_rules();
    proxy.add_rule(Rule {
        method: "GET",
        path_contains: pack.clone(),
        fault: Fault::Flip,
        times: None,
    });
    let err = pull("1");
    assert_eq!(gets_of(&proxy.take_log(), &pack).len(), 1, "not retried");
    assert!(err.contains("is corrupt") && err.contains(&pack), "{err}");
    no_ref(&b);

    // A manifest whose bytes do not match its digest: a damaged or hostile registry, not a
    // missing login — no advice to `docker login` (issue 12, item 10).
    proxy.clear_rules();
    proxy.add_rule(Rule {
        method: "GET",
        path_contains: "/manifests/".into(),
        fault: Fault::Flip,
        times: None,
    });
    let err = pull("1");
    assert!(!err.contains("docker login"), "{err}");
    no_ref(&b);

    // A 503 for ever: 5 attempts (the default), then the error says so, and the last cause.
    proxy.clear_rules();
    proxy.add_rule(Rule {
        method: "GET",
        path_contains: pack.clone(),
        fault: Fault::Status(503, None),
        times: None,
    });
    let err = pull("1");
    assert_eq!(gets_of(&proxy.take_log(), &pack).len(), 5, "{err}");
    for part in [
        pack.as_str(),
        pack_name.as_str(),
        url.as_str(),
        "after 5 attempts",
        "HTTP 503",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    no_ref(&b);

    // A push refused (403 on starting an upload): once, naming the blob.
    proxy.clear_rules();
    proxy.add_rule(Rule {
        method: "POST",
        path_contains: "/blobs/uploads/".into(),
        fault: Fault::Status(403, None),
        times: None,
    });
    let dest = proxy.url("perm2:1");
    let out = a
        .velo(&[
            "push",
            "p/app",
            &dest,
            "--plain-http",
            "--pack-size",
            "64K",
            "-j",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{}", err.trim_end());
    let log = proxy.take_log();
    assert_eq!(
        log.iter().filter(|l| l.method == "POST").count(),
        1,
        "{log:#?}"
    );
    assert!(
        err.contains("/blobs/sha256:")
            && err.contains("upload blob (pack 1 of")
            && err.contains(&pack_name)
            && err.contains(&dest)
            && err.contains("HTTP 403"),
        "{err}"
    );
}
