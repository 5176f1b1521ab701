//! `velo` behaves like the tools it wraps (issue 13): the project is found upward from a
//! subdirectory, as npm, cargo, uv and git find theirs; `-C DIR` works as `git -C`/`make -C`
//! (velo starts in DIR; the command runs there); an option `velo run` does not know is an
//! error with a suggestion, never the command.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{Env, can_mount, describe, fixtures, path_str};

fn velo_in(env: &Env, dir: &Path, args: &[&str]) -> Command {
    let mut c = env.velo(args);
    c.current_dir(dir)
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID");
    c
}

fn ok(env: &Env, dir: &Path, args: &[&str]) -> String {
    let out = velo_in(env, dir, args).output().unwrap();
    assert!(out.status.success(), "velo {args:?}:\n{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// From a subdirectory, `run` and `status` find the project's velo.toml above, and the
/// command runs in the subdirectory; `-C sub` from elsewhere does the same.
#[test]
fn a_project_is_found_upward_and_minus_c_is_where_velo_starts() {
    if !can_mount("a_project_is_found_upward_and_minus_c_is_where_velo_starts") {
        return;
    }
    let env = Env::new();
    let project = fixtures::custom_project(env.dir.path(), &env.path("proj"));
    let sub = project.join("src/deep");
    fs::create_dir_all(&sub).unwrap();

    let out = ok(
        &env,
        &sub,
        &["run", "sh", "-c", "pwd; cat ../../deps/lib/deps.lock"],
    );
    assert_eq!(out, format!("{}\nv1\n", path_str(&sub)));
    let status = ok(&env, &sub, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status[0]["up_to_date"], true, "{status}");

    let out = ok(
        &env,
        env.dir.path(),
        &["run", "-C", "proj/src/deep", "--", "pwd"],
    );
    assert_eq!(out.trim(), path_str(&sub), "the command runs in -C's dir");

    // No velo.toml anywhere up: the error names where velo looked and what to do.
    let elsewhere = env.path("elsewhere/sub");
    fs::create_dir_all(&elsewhere).unwrap();
    let out = velo_in(&env, &elsewhere, &["run", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("or any dir above it") && err.contains("velo init"),
        "{err}"
    );
}

/// `velo init` in a subdirectory of a project writes velo.toml at the project's root (the
/// nearest dir above with a lockfile).
#[test]
fn init_from_a_subdirectory_writes_velo_toml_at_the_root() {
    let env = Env::new();
    let project = env.path("app");
    fs::create_dir_all(project.join("lib/util")).unwrap();
    fs::write(project.join("requirements.txt"), "").unwrap();
    let out = velo_in(&env, &project.join("lib/util"), &["init"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(project.join("velo.toml").is_file());
    assert!(!project.join("lib/util/velo.toml").exists());
}

/// `velo run --presist -- x`: refused with the option meant, and nothing is run.
#[test]
fn an_unknown_run_option_is_refused_with_a_suggestion() {
    let env = Env::new();
    let marker = env.path("ran");
    let out = velo_in(
        &env,
        env.dir.path(),
        &["run", "--presist", "--", "touch", path_str(&marker)],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'--presist'") && err.contains("'--persist'"),
        "{err}"
    );
    assert!(!marker.exists(), "nothing ran");
}

/// A first build as root writes its tree to a tmpfs in its own namespace and leaves exactly
/// the image its ref names: no unreferenced image (an empty one was stored for every build
/// before), nothing in the store's tmp/.
#[test]
fn a_first_build_leaves_only_the_image_its_ref_names() {
    if !can_mount("a_first_build_leaves_only_the_image_its_ref_names") {
        return;
    }
    let env = Env::new();
    let project = fixtures::custom_project(env.dir.path(), &env.path("proj"));
    fs::write(
        project.join("velo.toml"),
        "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\ninputs = [\"deps.lock\"]\n\
         install = \"mkdir -p deps/lib && stat -f -c %T deps > deps/lib/fs\"\n",
    )
    .unwrap();
    let out = ok(&env, &project, &["run", "cat", "deps/lib/fs"]);
    assert_eq!(out.trim(), "tmpfs");
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&env, &project, &["--json", "ls"])).unwrap();
    let images = ls["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{ls}");
    assert_eq!(images[0]["refs"].as_array().map(Vec::len), Some(1), "{ls}");
    let tmp: Vec<_> = fs::read_dir(env.store.join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}

/// Waits (up to a generous deadline, for a loaded machine) until `path` exists.
fn wait_for(path: &Path, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never happened"
        );
        std::thread::yield_now();
    }
}

fn signal_group(pgid: u32, sig: rustix::process::Signal) {
    rustix::process::kill_process_group(rustix::process::Pid::from_raw(pgid as i32).unwrap(), sig)
        .unwrap();
}

/// Not in a terminal's foreground (CI, `timeout`, a process manager), `velo run`'s command
/// leads a process group of its own: a signal sent to velo's group (as `timeout` sends it)
/// reaches the command through velo — once, as without velo — not also directly.
#[test]
fn outside_a_terminal_the_command_has_a_group_of_its_own_and_gets_signals_once() {
    if !can_mount("outside_a_terminal_the_command_has_a_group_of_its_own_and_gets_signals_once") {
        return;
    }
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    let project = fixtures::custom_project(env.dir.path(), &env.path("proj"));
    let ready = env.path("ready");
    let script = format!(
        "trap 'echo got TERM; exit 3' TERM; cut -d' ' -f5 /proc/self/stat > {r}.pgrp; \
         mv {r}.pgrp {r}; while :; do sleep 0.01; done",
        r = path_str(&ready)
    );
    let velo = velo_in(&env, &project, &["run", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0) // velo leads its group, as `timeout` makes itself do
        .spawn()
        .unwrap();
    let guard = common::KillOnDrop(velo.id() as i32);
    wait_for(&ready, "the command's start");
    let command_group: u32 = fs::read_to_string(&ready).unwrap().trim().parse().unwrap();
    assert_ne!(
        command_group,
        velo.id(),
        "the command is not in velo's group"
    );
    signal_group(velo.id(), rustix::process::Signal::TERM);
    let out = velo.wait_with_output().unwrap();
    std::mem::forget(guard); // reaped: its pid may be another process's now
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got TERM\n");
}

/// A build interrupted like Ctrl-C does (SIGINT to velo's process group) ends velo the same
/// way — killed by SIGINT (130 in a shell), not "failed" with status 1 — and writes no ref.
#[test]
fn an_interrupted_build_ends_velo_by_the_same_signal() {
    if !can_mount("an_interrupted_build_ends_velo_by_the_same_signal") {
        return;
    }
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let env = Env::new();
    let project = fixtures::custom_project(env.dir.path(), &env.path("proj"));
    let ready = env.path("ready");
    fs::write(
        project.join("velo.toml"),
        format!(
            "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\ninputs = [\"deps.lock\"]\n\
             install = \"touch {}; sleep 60\"\n",
            path_str(&ready)
        ),
    )
    .unwrap();
    let velo = velo_in(&env, &project, &["run", "true"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let guard = common::KillOnDrop(velo.id() as i32);
    wait_for(&ready, "the install's start");
    signal_group(velo.id(), rustix::process::Signal::INT);
    let out = velo.wait_with_output().unwrap();
    std::mem::forget(guard); // reaped: its pid may be another process's now
    assert_eq!(out.status.signal(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted") && err.contains("no ref was written"),
        "{err}"
    );
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&env, &project, &["--json", "ls"])).unwrap();
    assert_eq!(ls["refs"].as_array().map(Vec::len), Some(0), "{ls}");
}

/// A run that needs a key another run is building says it waits for it, then for how long,
/// and does not build it again.
#[test]
fn a_run_waiting_for_another_runs_build_says_so() {
    if !can_mount("a_run_waiting_for_another_runs_build_says_so") {
        return;
    }
    use std::io::BufRead;
    let env = Env::new();
    let project = fixtures::custom_project(env.dir.path(), &env.path("proj"));
    let (ready, go) = (env.path("ready"), env.path("go"));
    fs::write(
        project.join("velo.toml"),
        format!(
            "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\ninputs = [\"deps.lock\"]\n\
             install = \"echo built >> {log}; touch {ready}; while [ ! -e {go} ]; do sleep 0.01; \
             done; mkdir -p deps/lib\"\n",
            log = path_str(&env.path("installs")),
            ready = path_str(&ready),
            go = path_str(&go),
        ),
    )
    .unwrap();
    let first = velo_in(&env, &project, &["run", "true"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first_guard = common::KillOnDrop(first.id() as i32);
    wait_for(&ready, "the first run's install");
    let mut second = velo_in(&env, &project, &["run", "true"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let second_guard = common::KillOnDrop(second.id() as i32);
    // The second run holds no lock while the first builds: it must say it waits.
    let mut stderr = std::io::BufReader::new(second.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(
        line.contains("another velo run is building deps; waiting for it"),
        "{line}"
    );
    fs::write(&go, "").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let second_status = second.wait().unwrap();
    std::mem::forget(second_guard); // reaped: its pid may be another process's now
    let first_status = first.wait_with_output().unwrap().status;
    std::mem::forget(first_guard);
    assert!(second_status.success(), "{rest}");
    assert!(first_status.success());
    assert!(
        rest.contains("waited") && rest.contains("for the other build of deps"),
        "{rest}"
    );
    assert_eq!(
        fs::read_to_string(env.path("installs")).unwrap(),
        "built\n",
        "built once"
    );
}

/// `velo -v run` says what velo does: the project, each dir's key and what it is made of,
/// the ref, the image mounted and how long mounting took (plain text, no colour codes when
/// stderr is not a terminal).
#[test]
fn verbose_run_shows_the_key_the_image_and_the_mount_time() {
    if !can_mount("verbose_run_shows_the_key_the_image_and_the_mount_time") {
        return;
    }
    let env = Env::new();
    let project = fixtures::custom_project(env.dir.path(), &env.path("proj"));
    ok(&env, &project, &["run", "true"]);
    let out = velo_in(&env, &project, &["-v", "run", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        &format!("project {}", path_str(&project)),
        "deps (custom): key ",
        "from the files [\"deps.lock\"]",
        "ref deps/custom/",
        "deps: image ",
        "mounted 1 dirs in ",
    ] {
        assert!(err.contains(want), "{want:?} in:\n{err}");
    }
    assert!(!err.contains('\u{1b}'), "no colour codes: {err:?}");
}

/// `velo status` (and `ls`) naming a store that does not exist say so and create nothing.
#[test]
fn status_on_a_store_that_does_not_exist_creates_none() {
    let mut env = Env::new();
    env.store = env.path("no-store-here");
    let project = fixtures::custom_project(env.dir.path(), &env.path("proj"));
    let out = velo_in(&env, &project, &["status"]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("deps"), "{text}");
    let out = velo_in(&env, &project, &["ls"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no velo store"),
        "{}",
        describe(&out)
    );
    assert!(!env.store.exists(), "no store was created");
}

/// The user's `~/.cargo/config.toml` stays in force inside `velo run` (velo points
/// `CARGO_HOME` at the project's tree): an alias there works in a project outside the home.
#[test]
fn the_users_cargo_config_is_in_force_in_velo_run() {
    if !can_mount("the_users_cargo_config_is_in_force_in_velo_run") {
        return;
    }
    let Ok(cargo) = Command::new("cargo").arg("--version").output() else {
        eprintln!("SKIPPED the_users_cargo_config_is_in_force_in_velo_run: no cargo");
        return;
    };
    assert!(cargo.status.success());
    let env = Env::new();
    // rustup's proxies find their toolchains in the real home.
    let rustup = std::env::var_os("RUSTUP_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".rustup")))
        .unwrap();
    let home = env.path("home");
    fs::create_dir_all(home.join(".cargo")).unwrap();
    fs::write(
        home.join(".cargo/config.toml"),
        "[alias]\nvelo-hello = \"version\"\n",
    )
    .unwrap();
    let project = env.path("proj"); // not under the home
    fs::create_dir_all(project.join("src")).unwrap();
    fs::write(
        project.join("Cargo.toml"),
        "[package]\nname = \"proj\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    fs::write(project.join("src/main.rs"), "fn main() {}\n").unwrap();
    let with_env = |c: &mut Command| {
        c.env("HOME", &home)
            .env("RUSTUP_HOME", &rustup)
            .env_remove("CARGO_HOME");
    };
    let mut lock = Command::new("cargo");
    lock.args(["generate-lockfile", "--offline"])
        .current_dir(&project)
        .env("CARGO_HOME", env.path("lock-home"))
        .env("RUSTUP_HOME", &rustup)
        .env("HOME", &home);
    let out = lock.output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let mut init = velo_in(&env, &project, &["init"]);
    with_env(&mut init);
    let out = init.output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let mut run = velo_in(&env, &project, &["run", "--", "cargo", "velo-hello"]);
    with_env(&mut run);
    let out = run.output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("cargo "),
        "{}",
        describe(&out)
    );
}

/// `velo ls` and `velo status` name a dependency tree by the project and dir it was made for,
/// not only by its key — as root (the store's own listing) and as an ordinary user (through
/// velo-mountd) — in text and in `--json` alike. Two projects sharing a key (the same
/// lockfile) are both named.
#[test]
fn ls_and_status_name_the_project_and_dir_of_each_deps_ref() {
    use common::mountd::{Mountd, TestUser};
    if !can_mount("ls_and_status_name_the_project_and_dir_of_each_deps_ref") {
        return;
    }
    let env = Env::new();
    let project = fixtures::custom_project(env.dir.path(), &env.path("proj"));
    let other = fixtures::custom_project(env.dir.path(), &env.path("other"));
    ok(&env, &project, &["run", "true"]);
    ok(&env, &other, &["run", "true"]);
    let want = serde_json::json!([
        {"project": path_str(&project), "dir": "deps"},
        {"project": path_str(&other), "dir": "deps"},
    ]);

    let ls: serde_json::Value =
        serde_json::from_str(&ok(&env, &project, &["--json", "ls"])).unwrap();
    let refs = ls["refs"].as_array().unwrap();
    assert_eq!(refs.len(), 1, "{ls}");
    assert_eq!(refs[0]["belongs_to"], want, "{ls}");
    let text = ok(&env, &project, &["ls"]);
    assert!(
        text.contains(&format!(
            "<- {} (deps), {} (deps)",
            path_str(&project),
            path_str(&other)
        )),
        "{text}"
    );

    let status: serde_json::Value =
        serde_json::from_str(&ok(&env, &project, &["--json", "status"])).unwrap();
    assert_eq!(status[0]["project"], path_str(&project), "{status}");
    assert_eq!(status[0]["dir"], "deps", "{status}");
    let text = ok(&env, &project, &["status"]);
    assert!(
        text.starts_with(&format!("project {}\ndeps ", path_str(&project))),
        "{text}"
    );

    // An ordinary user, through velo-mountd: their own refs, named the same way.
    let mountd = Mountd::start(&env);
    let user = TestUser::create("names", env.dir.path());
    let theirs = fixtures::custom_project(env.dir.path(), &env.path("theirs"));
    user.own(&theirs);
    let run = |args: &[&str]| {
        let out = user.velo(&mountd, &theirs, args).output().unwrap();
        assert!(out.status.success(), "velo {args:?}:\n{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["run", "true"]);
    let ls: serde_json::Value = serde_json::from_str(&run(&["--json", "ls"])).unwrap();
    let refs = ls["refs"].as_array().unwrap();
    assert_eq!(refs.len(), 1, "{ls}");
    assert_eq!(
        refs[0]["belongs_to"],
        serde_json::json!([{"project": path_str(&theirs), "dir": "deps"}]),
        "{ls}"
    );
    assert!(
        refs[0]["name"].as_str().unwrap().starts_with("deps/"),
        "{ls}"
    );
    let text = run(&["ls"]);
    assert!(
        text.contains(&format!("<- {} (deps)", path_str(&theirs))),
        "{text}"
    );
    let status: serde_json::Value = serde_json::from_str(&run(&["--json", "status"])).unwrap();
    assert_eq!(status[0]["project"], path_str(&theirs), "{status}");
}
