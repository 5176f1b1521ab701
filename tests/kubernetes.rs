//! The Kubernetes path without a cluster: the manifests against the Kubernetes schemas
//! (offline), the init-container flow emulated with mount namespaces (tests/kubernetes/
//! emulate-pod.sh runs deploy/velo-k8s-init and deploy/velo-k8s-cleaner as the manifests do),
//! and the container image built with buildah (daemonless, from Debian's packages).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::registry::Registry;
use common::{Env, can_mount, describe, path_str};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubernetes-validate` (PyPI; schemas bundled, no network), as scripts/install-deps installs it.
fn validator() -> PathBuf {
    let candidates = [
        std::env::var_os("VELO_K8S_VALIDATE").map(PathBuf::from),
        Some(PathBuf::from("/opt/velo-tools/k8s/bin/kubernetes-validate")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "kubernetes-validate is missing: run scripts/install-deps (it installs the PyPI \
                 package into /opt/velo-tools/k8s), or set VELO_K8S_VALIDATE"
            )
        })
}

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(repo().join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let v = validator();
    let files = manifests();
    assert!(files.len() >= 2, "{files:?}");
    let out = Command::new(&v)
        .arg("--strict")
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches(" passed ").count(), files.len(), "{text}");

    // The check has teeth: a misspelt field and a wrong type fail.
    let dir = tempfile::tempdir().unwrap();
    let app = fs::read_to_string(repo().join("deploy/kubernetes/app-deployment.yaml")).unwrap();
    for (what, bad) in [
        (
            "misspelt field",
            app.replace(
                "mountPropagation: Bidirectional",
                "mountPropagaton: Bidirectional",
            ),
        ),
        ("wrong type", app.replace("replicas: 2", "replicas: two")),
    ] {
        let f = dir.path().join("bad.yaml");
        fs::write(&f, bad).unwrap();
        let out = Command::new(&v).arg("--strict").arg(&f).output().unwrap();
        assert!(!out.status.success(), "{what} passed: {}", describe(&out));
    }

    // What the README and the scripts rely on is in the manifests.
    let cleaner =
        fs::read_to_string(repo().join("deploy/kubernetes/velo-cleaner-daemonset.yaml")).unwrap();
    for want in [
        "command: [\"/usr/bin/velo-k8s-init\"]",
        "mountPropagation: Bidirectional",
        "mountPropagation: HostToContainer",
        "path: /var/lib/velo",
        "privileged: true",
        "name: VELO_SOURCE",
        "name: VELO_REF",
        "name: VELO_TARGET",
    ] {
        assert!(app.contains(want), "app-deployment.yaml lacks {want}");
    }
    for want in [
        "command: [\"/usr/bin/velo-k8s-cleaner\"]",
        "mountPath: /var/lib/kubelet\n              mountPropagation: Bidirectional",
        "path: /sys/fs/cgroup",
        "path: /var/lib/velo",
    ] {
        assert!(
            cleaner.contains(want),
            "velo-cleaner-daemonset.yaml lacks {want}"
        );
    }
}

#[test]
fn init_container_flow_without_a_cluster() {
    if !can_mount("init_container_flow_without_a_cluster") {
        return;
    }
    let reg = Registry::start();
    // CI: snapshot and push.
    let ci = Env::new();
    let src = ci.path("node_modules");
    let out = Command::new("sh")
        .arg("-ec")
        .arg(
            "mkdir -p left-pad/lib .bin && printf 'module.exports = (s, n) => s.padStart(n);\\n%.0s' \
             $(seq 1 20) > left-pad/index.js && head -c 20000 /dev/urandom > left-pad/lib/blob.bin \
             && echo '{\"name\":\"left-pad\"}' > left-pad/package.json && ln -s ../left-pad/index.js \
             .bin/left-pad && echo tiny > .package-lock.json",
        )
        .current_dir({
            fs::create_dir_all(&src).unwrap();
            &src
        })
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    ci.snapshot(&src, "deps/app");
    let source = reg.url("team/app-deps:v1");
    ci.json(&["push", "deps/app", &source, "--plain-http"]);

    // The node.
    let node = Env::new();
    let t = node.path("pod");
    fs::create_dir_all(&t).unwrap();
    let velo_dir = common::velo_bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        velo_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(repo().join("tests/kubernetes/emulate-pod.sh"))
        .env("T", &t)
        .env("SRC", &src)
        .env("DEPLOY", repo().join("deploy"))
        .env("POD_UID", "1c2d3e4f-aaaa-bbbb-cccc-0123456789ab")
        .env("VELO_SOURCE", &source)
        .env("VELO_REF", "deps/app-v1")
        .env("VELO_STORE", &node.store)
        .env("VELO_PLAIN_HTTP", "1")
        .env("PATH", path)
        .output()
        .expect("run emulate-pod.sh");
    let text = describe(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("POD EMULATION OK"), "{text}");
    // The node's store keeps the image under the ref. (The pin `velo mount` recorded names the
    // init container's mount, gone with its namespace; the node's propagated copy has another
    // mount ID, so the cleaner's umount cannot match it. GC treats pins from other namespaces
    // as alive, which keeps the image: safe, but the pin stays — see the README.)
    assert!(node.ok(&["ref", "ls"]).contains("deps/app-v1"));
    node.ok(&["fsck"]);
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn container_image_builds_with_buildah() {
    if !can_mount("container_image_builds_with_buildah") {
        return;
    }
    assert!(
        have("buildah"),
        "buildah is missing: apt-get install buildah (scripts/install-deps does)"
    );
    let dir = tempfile::Builder::new()
        .prefix("velo-buildah-")
        .tempdir()
        .unwrap();
    let root = dir.path().join("root");
    let runroot = dir.path().join("run");
    let storage = format!(
        "--root {} --runroot {} --storage-driver vfs",
        root.display(),
        runroot.display()
    );
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.args(storage.split(' ')).args(args);
        c
    };
    // Whatever happens, remove what buildah made (its vfs layers are plain directories).
    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("buildah")
                .args(self.0.iter())
                .args(["rm", "--all"])
                .output();
            let _ = Command::new("buildah")
                .args(self.0.iter())
                .args(["rmi", "--all", "--force"])
                .output();
        }
    }
    let _cleanup = Cleanup(storage.split(' ').map(str::to_owned).collect());

    let mut build = Command::new(repo().join("deploy/build-image"));
    build
        .arg("localhost/velo:test")
        .env("BUILDAH_ARGS", &storage);
    if let Some(bin) = std::env::var_os("VELO_STATIC_BIN") {
        build.env("VELO_STATIC_BIN", bin);
    }
    let out = build.output().expect("run deploy/build-image");
    assert!(out.status.success(), "{}", describe(&out));

    let out = buildah(&["inspect", "--type", "image", "localhost/velo:test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = &info["OCIv1"]["config"];
    assert_eq!(config["Entrypoint"][0], "/usr/bin/velo", "{config}");
    assert!(
        config["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "VELO_STORE=/var/lib/velo"),
        "{config}"
    );

    // The image's root holds a velo that runs with no libc, and the scripts' shell.
    let out = buildah(&["from", "localhost/velo:test"]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let ctr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let out = buildah(&["mount", &ctr]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let rootfs = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let run = |args: &[&str]| {
        Command::new("/usr/sbin/chroot")
            .arg(&rootfs)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap()
    };
    let out = run(&["/usr/bin/velo", "--version"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("velo "));
    let out = run(&[
        "/bin/sh",
        "-c",
        "velo --store /tmp/s snapshot /usr/bin --json && velo --store /tmp/s ls && \
         test -x /usr/bin/velo-k8s-init && test -x /usr/bin/velo-k8s-cleaner",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !Path::new(&rootfs).join("lib").exists(),
        "no libc in the image"
    );
    let size: u64 = common::walkdir(&rootfs)
        .iter()
        .filter_map(|p| fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    eprintln!("image root: {} MiB", size >> 20);
    assert!(size < 64 << 20, "a small image: {size} bytes");
    let _ = buildah(&["umount", &ctr]).output();
    let _ = path_str(&rootfs);
}
