//! `velo init` / `velo run` / `velo status` with real package managers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::mountd::{Mountd, TestUser};
use common::{Env, can_mount, fixtures, path_str};

/// `velo run` in `project` with npm's cache and offline mode set, as root.
fn velo_in(env: &Env, project: &Path, args: &[&str]) -> Command {
    let mut c = env.velo(args);
    c.current_dir(project)
        .env("npm_config_cache", env.path("npm-cache"))
        .env("npm_config_offline", "true");
    c.env_remove("SUDO_UID").env_remove("SUDO_GID");
    c
}

fn ok(out: Output, what: &str) -> (String, String) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        common::describe(&out)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `velo status --json` with the same environment as `velo_in` (the environment is keyed).
fn status_json(env: &Env, project: &Path) -> serde_json::Value {
    let (out, _) = ok(
        velo_in(env, project, &["--json", "status"])
            .output()
            .unwrap(),
        "status",
    );
    serde_json::from_str(&out).unwrap()
}

/// The overlay dirs velo-mountd keeps in the store.
fn lease_dirs(env: &Env) -> Vec<std::ffi::OsString> {
    fs::read_dir(env.store.join("mounts"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(".lease-"))
        .collect()
}

fn npm_project(env: &Env) -> PathBuf {
    let project = env.path("proj");
    fs::create_dir_all(&project).unwrap();
    fixtures::npm_project(env.dir.path(), &project, &env.path("npm-cache"));
    project
}

/// Counts install runs: the install command appends a line to a file in the project.
fn count_installs(project: &Path) {
    let toml = fs::read_to_string(project.join("velo.toml")).unwrap();
    let toml = toml.replace(
        "install = \"npm ci\"",
        "install = \"echo built >> installs.log && npm ci --no-audit --no-fund\"",
    );
    fs::write(project.join("velo.toml"), toml).unwrap();
}

fn installs(project: &Path) -> usize {
    fs::read_to_string(project.join("installs.log"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

const SCRIPT: &str = "console.log('sum', require('vr-math').add(2, 3))";

fn no_mounts_left(env: &Env) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !info.contains(path_str(env.dir.path())),
        "a mount was left behind:\n{info}"
    );
    // (velo-mountd's pins of the images it holds are not a run's.)
    let slots: Vec<_> = fs::read_dir(env.store.join("mounts"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| {
            !fs::read(e.path().join("record.json"))
                .ok()
                .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r).ok())
                .is_some_and(|r| r["target"] == "velo-mountd")
        })
        .collect();
    assert!(slots.is_empty(), "mount slots left in the store: {slots:?}");
}

#[test]
fn npm_first_run_builds_second_only_mounts() {
    if !can_mount("npm_first_run_builds_second_only_mounts") {
        return;
    }
    let env = Env::new();
    let project = npm_project(&env);
    let (out, _) = ok(
        velo_in(&env, &project, &["init"]).output().unwrap(),
        "velo init",
    );
    assert!(out.contains("npm: node_modules"), "{out}");
    count_installs(&project);

    let (out1, err1) = ok(
        velo_in(&env, &project, &["run", "node", "-e", SCRIPT])
            .output()
            .unwrap(),
        "first run",
    );
    assert_eq!(
        out1, "sum 5\n",
        "stdout is the command's alone (install output goes to stderr)"
    );
    assert!(err1.contains("building node_modules"), "{err1}");
    let (out2, err2) = ok(
        velo_in(&env, &project, &["run", "node", "-e", SCRIPT])
            .output()
            .unwrap(),
        "second run",
    );
    assert_eq!(out2, out1);
    assert!(
        !err2.contains("building"),
        "second run must only mount: {err2}"
    );
    assert_eq!(installs(&project), 1);
    // .bin links work from the mount; the host's node_modules stays empty.
    let (out, _) = ok(
        velo_in(&env, &project, &["run", "node_modules/.bin/vr-cli"])
            .output()
            .unwrap(),
        "bin",
    );
    assert_eq!(out, "vr-cli says 42\n");
    let host: Vec<_> = fs::read_dir(project.join("node_modules"))
        .unwrap()
        .collect();
    assert!(
        host.is_empty(),
        "node_modules on the host must stay empty: {host:?}"
    );
    // Writes inside node_modules work and are dropped at exit.
    ok(
        velo_in(
            &env,
            &project,
            &[
                "run",
                "sh",
                "-c",
                "echo x > node_modules/scratch && cat node_modules/scratch",
            ],
        )
        .output()
        .unwrap(),
        "write",
    );
    ok(
        velo_in(
            &env,
            &project,
            &["run", "sh", "-c", "test ! -e node_modules/scratch"],
        )
        .output()
        .unwrap(),
        "writes dropped",
    );
    // Exit codes pass through.
    let st = velo_in(&env, &project, &["run", "sh", "-c", "exit 7"])
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(7));
    let status = status_json(&env, &project);
    assert_eq!(status[0]["dir"], "node_modules");
    assert_eq!(status[0]["up_to_date"], true, "{status}");
    assert!(status[0]["ref"].as_str().unwrap().starts_with("deps/npm/"));
    no_mounts_left(&env);
}

#[test]
fn a_changed_lockfile_builds_again_and_reverting_reuses() {
    if !can_mount("a_changed_lockfile_builds_again_and_reverting_reuses") {
        return;
    }
    let env = Env::new();
    let project = npm_project(&env);
    ok(velo_in(&env, &project, &["init"]).output().unwrap(), "init");
    count_installs(&project);
    ok(
        velo_in(&env, &project, &["run", "true"]).output().unwrap(),
        "first",
    );
    let lock = project.join("package-lock.json");
    let original = fs::read_to_string(&lock).unwrap();
    fs::write(
        &lock,
        original.replace("\"velo-run-test\"", "\"velo-run-test-renamed\""),
    )
    .unwrap();
    let status = status_json(&env, &project);
    assert_eq!(
        status[0]["up_to_date"], false,
        "a changed lockfile is stale: {status}"
    );
    ok(
        velo_in(&env, &project, &["run", "true"]).output().unwrap(),
        "changed",
    );
    assert_eq!(
        installs(&project),
        2,
        "a changed lockfile builds a new image"
    );
    fs::write(&lock, &original).unwrap();
    let (_, err) = ok(
        velo_in(&env, &project, &["run", "true"]).output().unwrap(),
        "reverted",
    );
    assert_eq!(
        installs(&project),
        2,
        "reverting reuses the first image: {err}"
    );
    let refs = env.json(&["ref", "ls"]);
    assert_eq!(refs.as_array().unwrap().len(), 2);
}

#[test]
fn four_parallel_runs_on_a_cold_key_install_once() {
    if !can_mount("four_parallel_runs_on_a_cold_key_install_once") {
        return;
    }
    let env = Env::new();
    let project = npm_project(&env);
    ok(velo_in(&env, &project, &["init"]).output().unwrap(), "init");
    count_installs(&project);
    let children: Vec<_> = (0..4)
        .map(|_| {
            velo_in(&env, &project, &["run", "node", "-e", SCRIPT])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let (out, _) = ok(c.wait_with_output().unwrap(), "parallel run");
        assert_eq!(out, "sum 5\n");
    }
    assert_eq!(
        installs(&project),
        1,
        "exactly one install for four concurrent runs"
    );
    no_mounts_left(&env);
}

#[test]
fn a_failed_install_leaves_no_ref_and_a_clean_store() {
    if !can_mount("a_failed_install_leaves_no_ref_and_a_clean_store") {
        return;
    }
    let env = Env::new();
    let project = npm_project(&env);
    ok(velo_in(&env, &project, &["init"]).output().unwrap(), "init");
    let toml = fs::read_to_string(project.join("velo.toml")).unwrap();
    fs::write(
        project.join("velo.toml"),
        toml.replace(
            "install = \"npm ci\"",
            "install = \"echo half > node_modules/half && echo broken install >&2 && exit 3\"",
        ),
    )
    .unwrap();
    let out = velo_in(&env, &project, &["run", "true"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken install"),
        "the install's output is shown: {err}"
    );
    assert!(
        err.contains("failed") && err.contains("no ref was written"),
        "{err}"
    );
    assert!(env.json(&["ref", "ls"]).as_array().unwrap().is_empty());
    assert!(
        !project.join("node_modules/half").exists(),
        "the failed install's writes stay out of the project"
    );
    let fsck = env.velo(&["fsck"]).output().unwrap();
    assert!(fsck.status.success(), "{}", common::describe(&fsck));
    no_mounts_left(&env);
}

#[test]
fn unknown_keys_in_velo_toml_are_named() {
    let env = Env::new();
    let project = env.path("p");
    fs::create_dir_all(&project).unwrap();
    fs::write(project.join("velo.toml"), "[[deps]]\necosystem = \"npm\"\ndirs = [\"node_modules\"]\ninputs = []\ninstall = \"npm ci\"\nfrobnicate = true\n").unwrap();
    let out = velo_in(&env, &project, &["status"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("frobnicate") && err.contains("velo.toml"),
        "{err}"
    );
}

/// A hand-written velo.toml whose install records who ran it.
fn custom_project(env: &Env) -> PathBuf {
    fixtures::custom_project(env.dir.path(), &env.path("custom"))
}

/// Through sudo (root, `SUDO_UID`/`SUDO_GID` set), the install and the command run as the
/// caller, with the caller's identity from passwd: HOME, USER and LOGNAME (so getpass-style
/// tools name them), and XDG dirs that sudo left pointing at root's under the caller's home.
#[test]
fn through_sudo_the_install_and_command_run_as_the_caller() {
    if !can_mount("through_sudo_the_install_and_command_run_as_the_caller") {
        return;
    }
    let env = Env::new();
    let project = custom_project(&env);
    let caller = TestUser::create("sudo", env.dir.path());
    // The install and the command each print who they are and what their environment says.
    let whoami = r#"id -u; printf '%s\n' "$HOME" "$USER" "$LOGNAME" "$XDG_CONFIG_HOME"; python3 -c 'import getpass; print(getpass.getuser())'"#;
    fs::write(
        project.join("velo.toml"),
        format!(
            "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\ninputs = [\"deps.lock\"]\n\
             install = '''mkdir -p deps/lib && cp deps.lock deps/lib/ && {{ {whoami}; }} > deps/lib/install'''\n"
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let mut c = velo_in(&env, &project, args);
        // What sudo leaves: root's identity (and here an XDG dir of root's).
        c.env("SUDO_UID", caller.uid.to_string())
            .env("SUDO_GID", caller.gid.to_string())
            .env("SUDO_USER", &caller.name)
            .env("HOME", "/root")
            .env("USER", "root")
            .env("LOGNAME", "root")
            .env("XDG_CONFIG_HOME", "/root/.config");
        c.output().unwrap()
    };
    let script = format!(
        "cat deps/lib/install; {whoami}; stat -c %u deps/lib/deps.lock; touch deps/mine && stat -c %u deps/mine"
    );
    let (out, _) = ok(run(&["run", "sh", "-c", &script]), "run as caller");
    let uid = caller.uid.to_string();
    let config = caller.home.join(".config");
    let who = [
        uid.as_str(),
        path_str(&caller.home),
        &caller.name,
        &caller.name,
        path_str(&config),
        &caller.name,
    ];
    let mut want: Vec<&str> = who.iter().chain(&who).copied().collect();
    want.extend([uid.as_str(), uid.as_str()]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        want,
        "the install's lines, the command's, then the owners of the tree and of a CoW write: \
         all the caller's (uid, HOME, USER, LOGNAME, XDG_CONFIG_HOME, getpass), none root's"
    );
    // --user overrides.
    let (out, _) = ok(
        velo_in(&env, &project, &["run", "--user", "0", "id", "-u"])
            .output()
            .unwrap(),
        "--user",
    );
    assert_eq!(out, "0\n");
}

#[test]
fn signals_reach_the_command_and_persist_keeps_writes() {
    if !can_mount("signals_reach_the_command_and_persist_keeps_writes") {
        return;
    }
    let env = Env::new();
    let project = custom_project(&env);
    let ready = env.path("ready");
    let script = format!(
        "trap 'echo got TERM; exit 3' TERM; touch {}; while :; do sleep 0.01; done",
        path_str(&ready)
    );
    let child = velo_in(&env, &project, &["run", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the command never started"
        );
        std::thread::yield_now();
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "the command's exit status after SIGTERM: {}",
        common::describe(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got TERM\n");
    no_mounts_left(&env);

    ok(
        velo_in(
            &env,
            &project,
            &["run", "--persist", "sh", "-c", "echo cached > deps/cache"],
        )
        .output()
        .unwrap(),
        "persist 1",
    );
    let (out, _) = ok(
        velo_in(&env, &project, &["run", "--persist", "cat", "deps/cache"])
            .output()
            .unwrap(),
        "persist 2",
    );
    assert_eq!(out, "cached\n");
    ok(
        velo_in(&env, &project, &["run", "sh", "-c", "test ! -e deps/cache"])
            .output()
            .unwrap(),
        "without --persist",
    );
    let status = status_json(&env, &project);
    assert!(
        status[0]["persisted_bytes"].as_u64().unwrap() > 0,
        "{status}"
    );
}

/// The discarded upper is mounted `volatile` (no sync of the store's filesystem when the run
/// ends). If velo itself is killed, the command it started runs on in the private namespace:
/// the image stays pinned until the last process there is gone, and then GC clears the pin.
#[test]
fn the_pin_lives_as_long_as_the_namespace_and_the_upper_is_volatile() {
    if !can_mount("the_pin_lives_as_long_as_the_namespace_and_the_upper_is_volatile") {
        return;
    }
    let env = Env::new();
    let project = custom_project(&env);
    let (info, _) = ok(
        velo_in(&env, &project, &["run", "cat", "/proc/self/mountinfo"])
            .output()
            .unwrap(),
        "run cat mountinfo",
    );
    let deps = fs::canonicalize(&project).unwrap().join("deps");
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(path_str(&deps)))
        .unwrap_or_else(|| panic!("no mount at {} in the run:\n{info}", deps.display()));
    assert!(
        line.contains(" overlay ") && line.contains("volatile"),
        "the run's overlay is not volatile: {line}"
    );

    let status = status_json(&env, &project);
    let image = status[0]["image"].as_str().unwrap().to_owned();
    let ref_name = status[0]["ref"].as_str().unwrap().to_owned();
    // First collect what the build left unreferenced (its empty base image).
    env.ok(&["gc", "--keep-last", "0", "--older-than", "0s"]);
    let fifo = env.path("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let pid_file = env.path("pid");
    let script = format!(
        "echo $$ > {pid}.tmp && mv {pid}.tmp {pid} && read line < {fifo} && cat deps/lib/deps.lock",
        pid = path_str(&pid_file),
        fifo = path_str(&fifo)
    );
    let mut velo = velo_in(&env, &project, &["run", "sh", "-c", &script])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let command_pid = loop {
        if let Ok(p) = fs::read_to_string(&pid_file) {
            break p.trim().parse::<i32>().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the command never started"
        );
        std::thread::yield_now();
    };
    // Whatever happens below, the command does not outlive the test.
    let _kill = common::KillOnDrop(command_pid);
    velo.kill().unwrap();
    velo.wait().unwrap();
    env.ok(&["ref", "rm", &ref_name]);
    let r = env.json(&["gc", "--keep-last", "0", "--older-than", "0s"]);
    assert_eq!(
        r["images_removed"], 0,
        "the command still runs on the image, velo's death notwithstanding: {r}"
    );
    assert_eq!(r["stale_pins_cleared"], 0, "{r}");
    assert!(env.store.join("images").join(&image).exists());

    // Let the command finish (it reads the mounted tree last), then wait until it is gone.
    fs::write(&fifo, "go\n").unwrap();
    let gone = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit(')').next().is_some_and(|r| r.starts_with(" Z"))
        })
    };
    while !gone(command_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the command did not finish"
        );
        std::thread::yield_now();
    }
    let r = env.json(&["gc", "--keep-last", "0", "--older-than", "0s"]);
    assert_eq!(
        r["images_removed"], 1,
        "nothing uses the image any more: {r}"
    );
    assert_eq!(r["stale_pins_cleared"], 1, "{r}");
    let left = lease_dirs(&env);
    assert!(left.is_empty(), "overlay dirs left: {left:?}");
    no_mounts_left(&env);
}

/// Root's runs share one EROFS superblock per image through velo-mountd when it serves the
/// same store: later runs are served from it (hits), see the same tree, and leave nothing
/// mounted; with `VELO_MOUNTD=off` runs mount the image themselves. GC keeps an image the
/// service holds, and collects it (and the overlay dirs a killed service left) once the
/// service has stopped.
#[test]
fn runs_share_the_image_through_velo_mountd() {
    if !can_mount("runs_share_the_image_through_velo_mountd") {
        return;
    }
    let env = Env::new();
    let project = custom_project(&env);
    let mountd = Mountd::start(&env);
    let cat = ["run", "cat", "deps/lib/deps.lock"];
    let run = || {
        velo_in(&env, &project, &cat)
            .env("VELO_SOCKET", &mountd.socket)
            .output()
            .unwrap()
    };
    ok(run(), "build");
    let image = status_json(&env, &project)[0]["image"].clone();
    for i in 0..3 {
        let (out, _) = ok(run(), "run");
        assert_eq!(out, "v1\n", "run {i} through the service");
    }
    let s = mountd.status();
    let cached = s["images"].as_array().unwrap();
    assert_eq!(cached.len(), 1, "{s}");
    assert_eq!(cached[0]["image"], image, "{s}");
    assert!(
        cached[0]["hits"].as_u64().unwrap() >= 2,
        "later runs reuse the superblock: {s}"
    );
    let hits = cached[0]["hits"].as_u64().unwrap();
    let (out, _) = ok(
        velo_in(&env, &project, &cat)
            .env("VELO_SOCKET", &mountd.socket)
            .env("VELO_MOUNTD", "off")
            .output()
            .unwrap(),
        "run without the service",
    );
    assert_eq!(out, "v1\n");
    assert_eq!(mountd.status()["images"][0]["hits"].as_u64(), Some(hits));
    mountd.settled();
    no_mounts_left(&env);

    let ref_name = status_json(&env, &project)[0]["ref"]
        .as_str()
        .unwrap()
        .to_owned();
    env.ok(&["ref", "rm", &ref_name]);
    // An overlay dir a killed service left behind.
    let orphan = env.store.join("mounts/.lease-orphan");
    fs::create_dir_all(orphan.join("upper")).unwrap();
    let r = env.json(&["gc", "--keep-last", "0", "--older-than", "0s"]);
    assert!(
        env.store
            .join("images")
            .join(image.as_str().unwrap())
            .exists(),
        "the service holds the image, so GC keeps it: {r}"
    );
    assert!(
        orphan.exists(),
        "lease dirs are left alone while a service runs"
    );
    mountd.stop();
    let r = env.json(&["gc", "--keep-last", "0", "--older-than", "0s"]);
    assert!(r["images_removed"].as_u64().unwrap() >= 1, "{r}");
    let left = lease_dirs(&env);
    assert!(left.is_empty(), "overlay dirs left after GC: {left:?}");
}

/// velo-mountd lends each run a whole overlay and lends it again only when it came back
/// untouched and unreachable: a run that wrote into the tree, a process left holding a
/// directory of it, or a mount namespace the command made (holding a copy of the mount) each
/// get the overlay discarded, so the next run sees the pristine image; an overlay discarded
/// while still reachable is removed once nothing reaches it.
#[test]
fn a_lent_overlay_is_lent_again_only_when_untouched_and_unreachable() {
    if !can_mount("a_lent_overlay_is_lent_again_only_when_untouched_and_unreachable") {
        return;
    }
    let env = Env::new();
    let project = custom_project(&env);
    let mountd = Mountd::start(&env);
    let wait_for =
        |what: &str, done: &dyn Fn(&serde_json::Value) -> bool| mountd.wait_for(what, done);
    // Waits until no overlay is lent or being checked; returns the image's counters.
    let settled = || mountd.settled();
    let run = |script: &str| {
        ok(
            velo_in(&env, &project, &["run", "sh", "-c", script])
                .env("VELO_SOCKET", &mountd.socket)
                .output()
                .unwrap(),
            script,
        )
        .0
    };
    let count = |i: &serde_json::Value, k: &str| i[k].as_u64().unwrap();
    // Processes left behind are killed whatever happens.
    struct Holders(Vec<PathBuf>);
    impl Drop for Holders {
        fn drop(&mut self) {
            for f in &self.0 {
                if let Ok(pid) = fs::read_to_string(f) {
                    let _ = Command::new("kill").arg(pid.trim()).output();
                }
            }
        }
    }
    let holders = Holders(vec![env.path("cwd-holder.pid"), env.path("ns-holder.pid")]);
    let lease_dirs = || lease_dirs(&env).len();
    run("true"); // builds, and makes the first overlay
    let s = settled();
    assert_eq!((count(&s, "idle"), count(&s, "reused")), (1, 0), "{s}");
    assert_eq!(run("cat deps/lib/deps.lock"), "v1\n");
    let s = settled();
    assert_eq!(
        count(&s, "reused"),
        1,
        "an untouched overlay is lent again: {s}"
    );
    assert_eq!(count(&s, "idle"), 1, "{s}");

    // A run that writes: its overlay is discarded; the next run does not see the write.
    run("echo x > deps/lib/new");
    let s = settled();
    assert_eq!(count(&s, "reused"), 2, "{s}");
    assert_eq!((count(&s, "idle"), count(&s, "discarded")), (0, 1), "{s}");
    assert_eq!(run("test ! -e deps/lib/new && echo pristine"), "pristine\n");
    let s = settled();
    assert_eq!((count(&s, "idle"), count(&s, "reused")), (1, 2), "{s}");
    // A create and delete leaves the upper empty, but changed: discarded too.
    run("touch deps/tmp && rm deps/tmp");
    let s = settled();
    assert_eq!((count(&s, "discarded"), count(&s, "reused")), (2, 3), "{s}");
    run("true");
    settled();

    // A process left holding a directory of the tree (its working directory).
    let script = format!(
        "cd deps/lib && {{ sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {}; }}",
        path_str(&holders.0[0])
    );
    run(&script);
    let s = settled();
    assert_eq!(
        count(&s, "discarded"),
        3,
        "a held overlay is discarded: {s}"
    );
    assert_eq!(
        count(&s, "retired"),
        1,
        "and kept until nothing holds it: {s}"
    );
    let reused = count(&s, "reused");
    run("true");
    let s = settled();
    assert_eq!(
        count(&s, "reused"),
        reused,
        "a held overlay is never lent: {s}"
    );
    let dirs = lease_dirs();
    let pid = fs::read_to_string(&holders.0[0]).unwrap();
    assert!(
        Command::new("kill")
            .arg(pid.trim())
            .status()
            .unwrap()
            .success()
    );
    let s = wait_for("the freed overlay was not removed", &|i| {
        i["retired"] == 0 && i["checking"] == 0
    });
    assert_eq!(lease_dirs(), dirs - 1, "its dir goes with it: {s}");

    // A mount namespace the command made holds a copy of the mount.
    // (It runs on after the command, which waits until the namespace exists.)
    let script = format!(
        "unshare -m sh -c 'echo $$ > {pid}.tmp; exec sleep 300' </dev/null >/dev/null 2>&1 & \
         while [ ! -s {pid}.tmp ]; do :; done; mv {pid}.tmp {pid}",
        pid = path_str(&holders.0[1])
    );
    run(&script);
    let s = settled();
    assert_eq!(
        count(&s, "discarded"),
        4,
        "a copied mount keeps it reachable: {s}"
    );
    assert_eq!(count(&s, "retired"), 1, "{s}");
    drop(holders);
    wait_for("the freed overlay was not removed", &|i| {
        i["retired"] == 0 && i["checking"] == 0
    });
    no_mounts_left(&env);
}

/// Runs at the same time each get an overlay of their own from velo-mountd: none sees
/// another's writes, and a later run sees none of them.
#[test]
fn parallel_runs_get_overlays_of_their_own() {
    if !can_mount("parallel_runs_get_overlays_of_their_own") {
        return;
    }
    let env = Env::new();
    let project = custom_project(&env);
    let mountd = Mountd::start(&env);
    let velo_in = |env: &Env, project: &Path, args: &[&str]| {
        let mut c = velo_in(env, project, args);
        c.env("VELO_SOCKET", &mountd.socket);
        c
    };
    ok(
        velo_in(&env, &project, &["run", "true"]).output().unwrap(),
        "build",
    );
    // Each writes its own mark, waits until all four have written, then reads its mark back.
    let marks = env.path("marks");
    fs::create_dir(&marks).unwrap();
    let script = format!(
        "echo $$ > deps/who && touch {m}/$$ && \
         while [ $(ls {m} | wc -l) -lt 4 ]; do :; done && \
         [ \"$(cat deps/who)\" = $$ ] && echo own",
        m = path_str(&marks)
    );
    let runs: Vec<_> = (0..4)
        .map(|_| {
            velo_in(&env, &project, &["run", "sh", "-c", &script])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for r in runs {
        let (out, _) = ok(r.wait_with_output().unwrap(), "parallel run");
        assert_eq!(out, "own\n", "a run saw another's write");
    }
    let (out, _) = ok(
        velo_in(
            &env,
            &project,
            &["run", "sh", "-c", "test ! -e deps/who && echo clean"],
        )
        .output()
        .unwrap(),
        "run after",
    );
    assert_eq!(out, "clean\n");
    let c = mountd.settled();
    assert!(
        c["discarded"].as_u64().unwrap() >= 4,
        "written overlays are discarded: {c}"
    );
    no_mounts_left(&env);
}

/// An ordinary user's `velo run` with no velo-mountd answering says how to start one.
#[test]
fn without_a_service_velo_run_as_a_user_says_how_to_start_one() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "SKIPPED without_a_service_velo_run_as_a_user_says_how_to_start_one: needs root to switch users"
        );
        return;
    }
    let env = Env::new();
    let project = custom_project(&env);
    let out = common::velo_as_nobody(&env.store)
        .args(["run", "true"])
        .env("VELO_SOCKET", env.path("nothing-here.sock"))
        .env("HOME", env.path("nobody-home"))
        .current_dir(&project)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("velo-mountd is not running") && err.contains("systemctl"),
        "{}",
        common::describe(&out)
    );
}

#[test]
fn python_venv_from_requirements_with_pyc_and_console_script() {
    if !can_mount("python_venv_from_requirements_with_pyc_and_console_script") {
        return;
    }
    let env = Env::new();
    let project = env.path("py");
    fs::create_dir_all(&project).unwrap();
    let wheel = fixtures::wheel(env.dir.path());
    fs::write(
        project.join("requirements.txt"),
        format!("vrgreet @ file://{}\n", wheel.display()),
    )
    .unwrap();
    let py = |args: &[&str]| {
        let mut c = velo_in(&env, &project, args);
        for v in [
            "PYTHONDONTWRITEBYTECODE",
            "PIP_FIND_LINKS",
            "PIP_INDEX_URL",
            "VIRTUAL_ENV",
        ] {
            c.env_remove(v);
        }
        c.env("PIP_NO_INDEX", "1")
            .env("PIP_CONFIG_FILE", "/dev/null");
        c.output().unwrap()
    };
    let (out, _) = ok(py(&["init"]), "init");
    assert!(out.contains("pip: .venv"), "{out}");
    let (out1, err1) = ok(
        py(&[
            "run",
            ".venv/bin/python",
            "-c",
            "import vrgreet; print(vrgreet.something())",
        ]),
        "first",
    );
    assert!(err1.contains("building .venv"), "{err1}");
    assert_eq!(out1, "vrgreet 1.2.3 says 907\n");
    let (out2, err2) = ok(
        py(&[
            "run",
            ".venv/bin/python",
            "-c",
            "import vrgreet; print(vrgreet.something())",
        ]),
        "second",
    );
    assert_eq!(out2, out1);
    assert!(!err2.contains("building"));
    // The console script's shebang is the venv's absolute path: it runs from the mount.
    let (out, _) = ok(py(&["run", ".venv/bin/vrgreet"]), "console script");
    assert_eq!(out, "console script: vrgreet 1.2.3 says 907\n");
    // The image carries the .pyc files pip compiled, valid for the kept mtimes: a persisted
    // run writes no new bytecode.
    let (status, _) = ok(py(&["--json", "status"]), "status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let dump = env.ok(&["inspect", status[0]["ref"].as_str().unwrap(), "--dump"]);
    assert!(
        dump.lines()
            .any(|l| l.contains("vrgreet/__pycache__/__init__.cpython-")),
        "no .pyc in the image"
    );
    let before = env.store_listing();
    ok(
        py(&[
            "run",
            "--persist",
            ".venv/bin/python",
            "-c",
            "import vrgreet",
        ]),
        "persisted import",
    );
    let after = env.store_listing();
    let new_pyc: Vec<_> = after
        .keys()
        .filter(|p| !before.contains_key(*p) && p.to_string_lossy().ends_with(".pyc"))
        .collect();
    assert!(new_pyc.is_empty(), "python recompiled: {new_pyc:?}");
    let objects = |l: &std::collections::BTreeMap<PathBuf, (u64, u32, String)>| {
        l.iter().filter(|(p, _)| p.starts_with("objects")).count()
    };
    assert_eq!(
        objects(&before),
        objects(&after),
        "running changed the store's objects"
    );
    no_mounts_left(&env);
}

#[test]
fn packages_from_the_real_registries_npm_and_pypi() {
    if !can_mount("packages_from_the_real_registries_npm_and_pypi") {
        return;
    }
    let env = Env::new();
    let node = env.path("node");
    fs::create_dir_all(&node).unwrap();
    fs::write(
        node.join("package.json"),
        r#"{"name":"reg","version":"1.0.0","private":true,"dependencies":{"is-number":"7.0.0"}}"#,
    )
    .unwrap();
    let lock = Command::new("npm")
        .args(["install", "--package-lock-only", "--no-audit", "--no-fund"])
        .current_dir(&node)
        .env("npm_config_cache", env.path("npm-cache"))
        .output()
        .unwrap();
    assert!(
        lock.status.success(),
        "this test needs registry.npmjs.org:\n{}",
        common::describe(&lock)
    );
    let mut c = env.velo(&["init"]);
    ok(c.current_dir(&node).output().unwrap(), "init");
    let run = |dir: &Path, args: &[&str]| {
        let mut c = env.velo(args);
        c.current_dir(dir)
            .env("npm_config_cache", env.path("npm-cache"))
            .env_remove("npm_config_offline");
        ok(c.output().unwrap(), "run")
    };
    let (out, _) = run(
        &node,
        &[
            "run",
            "node",
            "-e",
            "console.log(require('is-number')(5), require('is-number')('x'))",
        ],
    );
    assert_eq!(out, "true false\n");

    let py = env.path("py");
    fs::create_dir_all(&py).unwrap();
    fs::write(py.join("requirements.txt"), "six==1.17.0\n").unwrap();
    let pyrun = |args: &[&str]| {
        let mut c = env.velo(args);
        c.current_dir(&py);
        for v in [
            "PYTHONDONTWRITEBYTECODE",
            "PIP_FIND_LINKS",
            "PIP_NO_INDEX",
            "VIRTUAL_ENV",
        ] {
            c.env_remove(v);
        }
        c.env("PIP_CONFIG_FILE", "/dev/null");
        c.output().unwrap()
    };
    ok(pyrun(&["init"]), "init");
    let out = pyrun(&[
        "run",
        ".venv/bin/python",
        "-c",
        "import six; print(six.__version__)",
    ]);
    assert!(
        out.status.success(),
        "this test needs pypi.org:\n{}",
        common::describe(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1.17.0\n");
    no_mounts_left(&env);
}
