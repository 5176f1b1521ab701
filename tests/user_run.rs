//! `velo run`, `status`, `ls`, `snapshot` and `ref` as an ordinary user, through a real
//! velo-mountd: the install runs as the user with their own HOME in their own namespaces, the
//! tree they get is theirs, one user never gets another's tree or sees their refs, and where
//! user namespaces are disabled velo says which setting to change.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mountd::{Mountd, TestUser};
use common::{Env, can_mount, describe, fixtures, path_str};

/// `velo --socket S ARGS…` as `user` in `dir`, with npm and pip kept offline (these variables
/// key the trees, so every call of a test sets the same ones).
fn velo_as(user: &TestUser, mountd: &Mountd, dir: &Path, args: &[&str]) -> Command {
    let mut c = user.velo(mountd, dir, args);
    c.env("npm_config_offline", "true")
        .env("PIP_NO_INDEX", "1")
        .env("PIP_CONFIG_FILE", "/dev/null");
    c
}

fn ok(out: Output, what: &str) -> (String, String) {
    assert!(out.status.success(), "{what} failed:\n{}", describe(&out));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs velo as `user`, expecting success: (stdout, stderr).
fn velo_ok(user: &TestUser, mountd: &Mountd, dir: &Path, args: &[&str]) -> (String, String) {
    let out = velo_as(user, mountd, dir, args).output().expect("run velo");
    ok(out, &format!("velo {args:?} as {}", user.name))
}

/// `velo --json ARGS…` as `user`, parsed.
fn velo_json(user: &TestUser, mountd: &Mountd, dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (out, _) = velo_ok(user, mountd, dir, &a);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("velo {args:?}: {e}: {out}"))
}

/// The names of the refs `velo ls --json` shows `user`.
fn ref_names(user: &TestUser, mountd: &Mountd, dir: &Path) -> Vec<String> {
    let ls = velo_json(user, mountd, dir, &["ls"]);
    ls["refs"]
        .as_array()
        .unwrap_or_else(|| panic!("no refs in {ls}"))
        .iter()
        .map(|r| r["name"].as_str().expect("a name").to_owned())
        .collect()
}

/// The npm fixture project at `env/<name>`, its velo.toml written by `velo init` as `user`,
/// with an install that also records how often it ran, as whom and with which HOME.
fn npm_project(env: &Env, mountd: &Mountd, user: &TestUser, name: &str) -> PathBuf {
    let project = env.path(name);
    fs::create_dir_all(&project).unwrap();
    fixtures::npm_project(
        env.dir.path(),
        &project,
        &env.path(&format!("{name}-npm-cache")),
    );
    user.own(&project);
    let (out, _) = velo_ok(user, mountd, &project, &["init"]);
    assert!(out.contains("npm: node_modules"), "{out}");
    let toml = fs::read_to_string(project.join("velo.toml")).unwrap();
    assert!(toml.contains("install = \"npm ci\""), "{toml}");
    fs::write(
        project.join("velo.toml"),
        toml.replace(
            "install = \"npm ci\"",
            "install = \"echo built >> installs.log && id -u > install-uid && \
             echo $HOME > install-home && npm ci --no-audit --no-fund\"",
        ),
    )
    .unwrap();
    project
}

/// A project of `user`'s whose install copies its lockfile into `deps/lib` (no package
/// manager: fast).
fn custom_project(env: &Env, user: &TestUser, name: &str) -> PathBuf {
    let project = env.path(name);
    fs::create_dir_all(&project).unwrap();
    fs::write(project.join("deps.lock"), "v1\n").unwrap();
    fs::write(
        project.join("velo.toml"),
        "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\ninputs = [\"deps.lock\"]\n\
         install = \"echo built >> installs.log && mkdir -p deps/lib && cp deps.lock deps/lib/\"\n",
    )
    .unwrap();
    user.own(&project);
    project
}

fn installs(project: &Path) -> usize {
    fs::read_to_string(project.join("installs.log"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// The entries of a dir (none if it does not exist).
fn entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The processes whose real or effective uid is `uid`: "pid comm".
fn processes_of(uid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for p in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = fs::read_to_string(p.path().join("status")) else {
            continue; // not a process, or gone meanwhile
        };
        let ids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if ids.iter().take(2).any(|&u| u == uid) {
            let comm = status.lines().next().unwrap_or_default().to_owned();
            out.push(format!("{} {comm}", p.file_name().to_string_lossy()));
        }
    }
    out
}

/// Nothing of the test's runs is left on the host: no mount under its dir in this (the host's)
/// mount namespace, no process of its users, and velo-mountd holds no overlay lent out or
/// still being checked.
fn nothing_left(env: &Env, mountd: &Mountd, users: &[&TestUser]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = mountd.status();
        let images = s["images"].as_array().unwrap();
        if images.iter().all(|i| i["lent"] == 0 && i["checking"] == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "overlays were not handed back: {s}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !info.contains(path_str(env.dir.path())),
        "a mount was left on the host:\n{info}"
    );
    // (A build's dir is removed by an `rm` velo does not wait for: it ends on its own.)
    for u in users {
        loop {
            let left = processes_of(u.uid);
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes of {} left: {left:?}",
                u.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

const SCRIPT: &str = "console.log('sum', require('vr-math').add(2, 3))";

/// An npm project as an ordinary user: the first run builds with the user's own identity
/// (uid, HOME: npm's cache and logs land in their home), the tree in the run is theirs and
/// writable, writes are gone in the next run, the second run only mounts; `status` and `ls`
/// as the user show the image; the host keeps no mount and no process of theirs.
#[test]
fn an_npm_project_as_an_ordinary_user() {
    if !can_mount("an_npm_project_as_an_ordinary_user") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let a = TestUser::create("un", env.dir.path());
    let project = npm_project(&env, &mountd, &a, "proj");

    let started = Instant::now();
    let (out, err) = velo_ok(&a, &mountd, &project, &["run", "node", "-e", SCRIPT]);
    let cold = started.elapsed();
    assert_eq!(out, "sum 5\n", "stdout is the command's alone: {err}");
    assert!(err.contains("building node_modules"), "{err}");
    assert_eq!(installs(&project), 1);
    let read = |f: &str| fs::read_to_string(project.join(f)).unwrap();
    assert_eq!(
        read("install-uid").trim(),
        a.uid.to_string(),
        "the install runs as the user"
    );
    assert_eq!(
        read("install-home").trim(),
        path_str(&a.home),
        "the install has the user's HOME"
    );
    // npm's cache and logs went to the user's home, as theirs.
    let npm_dir = a.home.join(".npm");
    let npm_files = common::walkdir(&npm_dir);
    assert!(
        npm_files
            .iter()
            .any(|p| p.starts_with(npm_dir.join("_logs"))),
        "npm wrote no logs under {}: {npm_files:?}",
        npm_dir.display()
    );
    for p in std::iter::once(&npm_dir).chain(&npm_files) {
        let md = fs::symlink_metadata(p).unwrap();
        assert_eq!(md.uid(), a.uid, "{} is not the user's", p.display());
    }

    let uid = a.uid.to_string();
    let (out, err) = velo_ok(
        &a,
        &mountd,
        &project,
        &[
            "run",
            "sh",
            "-c",
            "id -u; stat -c %u node_modules node_modules/vr-math node_modules/vr-math/index.js; \
             echo scratch > node_modules/scratch && cat node_modules/scratch",
        ],
    );
    assert_eq!(
        out,
        format!("{uid}\n{uid}\n{uid}\n{uid}\nscratch\n"),
        "the command runs as the user, on a tree of theirs they can write: {err}"
    );
    assert!(!err.contains("building"), "a second run only mounts: {err}");
    let (out, _) = velo_ok(
        &a,
        &mountd,
        &project,
        &[
            "run",
            "sh",
            "-c",
            "test ! -e node_modules/scratch && node node_modules/.bin/vr-cli",
        ],
    );
    assert_eq!(out, "vr-cli says 42\n", "the last run's write is gone");
    assert_eq!(installs(&project), 1, "built once");
    assert!(
        entries(&project.join("node_modules")).is_empty(),
        "node_modules on the host stays empty"
    );

    let status = velo_json(&a, &mountd, &project, &["status"]);
    let row = &status[0];
    assert_eq!(row["dir"], "node_modules", "{status}");
    assert_eq!(row["up_to_date"], true, "{status}");
    assert!(row["files"].as_u64().unwrap() > 0, "{status}");
    assert!(row["bytes"].as_u64().unwrap() > 0, "{status}");
    assert!(
        row["last_used"].as_u64().is_some_and(|t| t > 0),
        "a run touched the ref: {status}"
    );
    let ref_name = row["ref"].as_str().unwrap();
    assert!(ref_name.starts_with("deps/npm/"), "{status}");
    let ls = velo_json(&a, &mountd, &project, &["ls"]);
    let refs = ls["refs"].as_array().unwrap();
    assert!(
        refs.iter().any(|r| r["name"] == ref_name
            && r["image"] == row["image"]
            && r["published"] == false),
        "ls shows the user's ref: {ls}"
    );
    nothing_left(&env, &mountd, &[&a]);
    eprintln!(
        "an_npm_project_as_an_ordinary_user: cold run (install + snapshot + import + run) {:.0} ms",
        cold.as_secs_f64() * 1e3
    );
}

/// A Python venv (requirements.txt with a local wheel) as an ordinary user: the import and
/// the console script work from the mount, and what the venv bakes in is the real project
/// path.
#[test]
fn a_python_venv_as_an_ordinary_user() {
    if !can_mount("a_python_venv_as_an_ordinary_user") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let a = TestUser::create("py", env.dir.path());
    let project = env.path("py");
    fs::create_dir_all(&project).unwrap();
    let wheel = fixtures::wheel(env.dir.path());
    fs::write(
        project.join("requirements.txt"),
        format!("vrgreet @ file://{}\n", wheel.display()),
    )
    .unwrap();
    a.own(&project);
    let project = fs::canonicalize(&project).unwrap();
    let (out, _) = velo_ok(&a, &mountd, &project, &["init"]);
    assert!(out.contains("pip: .venv"), "{out}");

    let import = [
        "run",
        ".venv/bin/python",
        "-c",
        "import sys, vrgreet; print(vrgreet.something()); print(sys.prefix)",
    ];
    let venv = project.join(".venv");
    let (out, err) = velo_ok(&a, &mountd, &project, &import);
    assert!(err.contains("building .venv"), "{err}");
    assert_eq!(out, format!("vrgreet 1.2.3 says 907\n{}\n", venv.display()));
    let (out2, err) = velo_ok(&a, &mountd, &project, &import);
    assert_eq!(out2, out);
    assert!(!err.contains("building"), "{err}");
    let (out, _) = velo_ok(&a, &mountd, &project, &["run", ".venv/bin/vrgreet"]);
    assert_eq!(out, "console script: vrgreet 1.2.3 says 907\n");
    let (out, _) = velo_ok(
        &a,
        &mountd,
        &project,
        &[
            "run",
            "sh",
            "-c",
            "head -n 1 .venv/bin/vrgreet; stat -c %u .venv/bin/vrgreet .venv/pyvenv.cfg",
        ],
    );
    let mut lines = out.lines();
    let shebang = lines.next().unwrap_or_default();
    assert!(
        shebang.starts_with(&format!("#!{}/bin/python", venv.display())),
        "the console script's shebang is the real venv path: {out}"
    );
    assert_eq!(
        lines.collect::<Vec<_>>(),
        [a.uid.to_string(), a.uid.to_string()],
        "the venv is the user's"
    );
    assert!(entries(&venv).is_empty(), "the host's .venv stays empty");
    nothing_left(&env, &mountd, &[&a]);
}

/// Two users with the same project content (each their own copy): each builds a tree of
/// their own (the key includes the owner) and sees it owned by themselves; neither lists the
/// other's refs.
#[test]
fn two_users_each_get_a_tree_of_their_own() {
    if !can_mount("two_users_each_get_a_tree_of_their_own") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let a = TestUser::create("ta", env.dir.path());
    let b = TestUser::create("tb", env.dir.path());
    let pa = npm_project(&env, &mountd, &a, "pa");
    let pb = env.path("pb");
    fixtures::sh(&format!("cp -a {}/. {}", path_str(&pa), path_str(&pb)), &pb);
    b.own(&pb);
    for f in ["package.json", "package-lock.json", "velo.toml"] {
        assert_eq!(
            fs::read(pa.join(f)).unwrap(),
            fs::read(pb.join(f)).unwrap(),
            "{f}"
        );
    }
    let probe = format!("stat -c %u node_modules/vr-math/index.js && node -e \"{SCRIPT}\"");
    let run = ["run", "sh", "-c", probe.as_str()];
    let (out, err) = velo_ok(&a, &mountd, &pa, &run);
    assert_eq!(out, format!("{}\nsum 5\n", a.uid));
    assert!(err.contains("building"), "{err}");
    let (out, err) = velo_ok(&b, &mountd, &pb, &run);
    assert_eq!(out, format!("{}\nsum 5\n", b.uid), "B's tree is B's");
    assert!(
        err.contains("building"),
        "B builds its own tree, never gets A's: {err}"
    );
    let (out, err) = velo_ok(&a, &mountd, &pa, &run);
    assert_eq!(out, format!("{}\nsum 5\n", a.uid));
    assert!(!err.contains("building"), "{err}");
    assert_eq!((installs(&pa), installs(&pb)), (1, 1));

    let ref_of = |u: &TestUser, p: &Path| {
        let s = velo_json(u, &mountd, p, &["status"]);
        assert_eq!(s[0]["up_to_date"], true, "{s}");
        (
            s[0]["key"].as_str().unwrap().to_owned(),
            s[0]["ref"].as_str().unwrap().to_owned(),
        )
    };
    let (key_a, ref_a) = ref_of(&a, &pa);
    let (key_b, ref_b) = ref_of(&b, &pb);
    assert_ne!(key_a, key_b, "the same content keys differently per owner");
    assert_eq!(ref_names(&a, &mountd, &pa), std::slice::from_ref(&ref_a));
    let seen_by_b = ref_names(&b, &mountd, &pb);
    assert_eq!(seen_by_b, [ref_b], "B lists only its own refs");
    assert!(!seen_by_b.contains(&ref_a));
    nothing_left(&env, &mountd, &[&a, &b]);
}

/// `--persist` as an ordinary user: a write stays for the next `--persist` run (also right
/// after the one that wrote it), is absent from a run without `--persist`, and `status`
/// reports the persisted bytes.
#[test]
fn persist_as_an_ordinary_user_keeps_writes() {
    if !can_mount("persist_as_an_ordinary_user_keeps_writes") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let a = TestUser::create("ps", env.dir.path());
    let project = custom_project(&env, &a, "persist");
    velo_ok(&a, &mountd, &project, &["run", "true"]);
    let status = velo_json(&a, &mountd, &project, &["status"]);
    assert_eq!(
        status[0]["persisted_bytes"],
        serde_json::Value::Null,
        "{status}"
    );

    velo_ok(
        &a,
        &mountd,
        &project,
        &["run", "--persist", "sh", "-c", "echo cached > deps/cache"],
    );
    let (out, _) = velo_ok(
        &a,
        &mountd,
        &project,
        &[
            "run",
            "--persist",
            "sh",
            "-c",
            "cat deps/cache; stat -c %u deps/cache",
        ],
    );
    assert_eq!(out, format!("cached\n{}\n", a.uid));
    let (out, _) = velo_ok(
        &a,
        &mountd,
        &project,
        &["run", "sh", "-c", "test ! -e deps/cache && echo absent"],
    );
    assert_eq!(out, "absent\n", "a run without --persist does not see it");
    let (out, _) = velo_ok(
        &a,
        &mountd,
        &project,
        &["run", "--persist", "cat", "deps/cache"],
    );
    assert_eq!(out, "cached\n");
    let status = velo_json(&a, &mountd, &project, &["status"]);
    assert!(
        status[0]["persisted_bytes"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert_eq!(installs(&project), 1);
    nothing_left(&env, &mountd, &[&a]);
}

/// A build writes its tree to memory (a tmpfs, gone with the build's namespace) unless
/// `VELO_BUILD_IN=disk` says otherwise, which builds in the user's cache dir and removes it
/// after; a value velo does not know is refused by name before anything is built.
#[test]
fn a_build_runs_in_memory_unless_told_to_use_the_disk() {
    if !can_mount("a_build_runs_in_memory_unless_told_to_use_the_disk") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let a = TestUser::create("mem", env.dir.path());
    let project = custom_project(&env, &a, "mem");
    // The install records the type and device of the filesystem it writes the tree to.
    fs::write(
        project.join("velo.toml"),
        "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\ninputs = [\"deps.lock\"]\n\
         install = \"echo built >> installs.log && mkdir -p deps/lib && stat -f -c %T deps > \
         deps/lib/fs && stat -c %d deps > deps/lib/dev\"\n",
    )
    .unwrap();
    a.own(&project);
    let cache = a.home.join(".cache/velo");
    let (out, _) = velo_ok(
        &a,
        &mountd,
        &project,
        &["run", "cat", "deps/lib/fs", "deps/lib/dev"],
    );
    let cache_dev = fs::metadata(&cache).unwrap().dev();
    let (fs_type, dev) = out.trim().split_once('\n').unwrap();
    assert_eq!(fs_type, "tmpfs", "by default the tree is built in memory");
    assert_ne!(
        dev.parse::<u64>().unwrap(),
        cache_dev,
        "not in the cache dir"
    );

    fs::write(project.join("deps.lock"), "v2\n").unwrap();
    let mut refused = velo_as(&a, &mountd, &project, &["run", "true"]);
    let out = refused.env("VELO_BUILD_IN", "ram").output().unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("VELO_BUILD_IN=\"ram\""), "{err}");
    assert_eq!(installs(&project), 1, "nothing was built for a bad value");

    let mut on_disk = velo_as(&a, &mountd, &project, &["run", "cat", "deps/lib/dev"]);
    let out = on_disk.env("VELO_BUILD_IN", "disk").output().unwrap();
    let (out, _) = ok(out, "velo run with VELO_BUILD_IN=disk");
    let dev: u64 = out.trim().parse().unwrap();
    assert_eq!(
        dev,
        cache_dev,
        "VELO_BUILD_IN=disk builds on the filesystem of {}",
        cache.display()
    );
    assert_eq!(installs(&project), 2);
    nothing_left(&env, &mountd, &[&a]);
    // The disk build's dir is removed by an `rm` velo does not wait for; `nothing_left` saw
    // every process of the user end, so it is gone now.
    assert_eq!(entries(&cache.join("builds")), Vec::<PathBuf>::new());
}

/// `velo run` as `user` in `project` inside a user namespace whose `user.max_user_namespaces`
/// is 0 (root and the user mapped to themselves), so velo cannot make the namespace it needs.
fn run_without_user_namespaces(
    user: &TestUser,
    mountd: &Mountd,
    project: &Path,
    args: &[&str],
) -> Output {
    let script = format!(
        "echo ready; read go || exit 98; \
         exec sh -c 'echo 0 > /proc/sys/user/max_user_namespaces || exit 99; \
         exec setpriv --reuid={uid} --regid={gid} --clear-groups --inh-caps=-all -- \"$@\" </dev/null' sh \"$@\"",
        uid = user.uid,
        gid = user.gid
    );
    let mut c = Command::new("unshare");
    c.args(["--user", "--", "sh", "-c", &script, "sh"])
        .arg(common::velo_bin())
        .arg("--socket")
        .arg(&mountd.socket)
        .args(args)
        .current_dir(project)
        .env_clear()
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("npm_config_offline", "true")
        .env("PIP_NO_INDEX", "1")
        .env("PIP_CONFIG_FILE", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("run unshare");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    stdout.read_line(&mut ready).unwrap();
    assert_eq!(ready, "ready\n", "unshare did not start");
    // The shell is in its new user namespace now: map root and the user to themselves.
    let pid = child.id();
    for (file, id) in [("uid_map", user.uid), ("gid_map", user.gid)] {
        fs::write(
            format!("/proc/{pid}/{file}"),
            format!("0 0 1\n{id} {id} 1\n"),
        )
        .unwrap_or_else(|e| panic!("write {file} of {pid}: {e}"));
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).unwrap();
    let mut err = Vec::new();
    child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
    Output {
        status: child.wait().unwrap(),
        stdout: out,
        stderr: err,
    }
}

/// Where unprivileged user namespaces are disabled (`user.max_user_namespaces=0`), `velo run`
/// as a user fails with one sentence naming the setting and how to change it — before a
/// build (nothing built, nothing stored, no build dir left) and on a warm run (the overlays
/// it was lent go back) — and leaves nothing mounted; `velo doctor` names the setting too.
#[test]
fn without_user_namespaces_velo_run_names_the_setting() {
    if !can_mount("without_user_namespaces_velo_run_names_the_setting") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let a = TestUser::create("ns", env.dir.path());
    let project = custom_project(&env, &a, "nons");
    let said_so = |out: &Output| {
        assert!(!out.status.success(), "{}", describe(out));
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one sentence: {}", describe(out));
        assert!(
            lines[0].contains("user.max_user_namespaces")
                && lines[0].contains("sysctl -w user.max_user_namespaces="),
            "names the setting and how to change it: {err}"
        );
        assert!(out.stdout.is_empty(), "{}", describe(out));
    };

    let out = run_without_user_namespaces(&a, &mountd, &project, &["run", "true"]);
    said_so(&out);
    assert_eq!(installs(&project), 0, "no install ran");
    assert!(entries(&project.join("deps")).is_empty(), "nothing in deps");
    let builds = a.home.join(".cache/velo/builds");
    assert!(
        entries(&builds).is_empty(),
        "build dirs left: {:?}",
        entries(&builds)
    );
    assert!(
        ref_names(&a, &mountd, &project).is_empty(),
        "nothing stored"
    );
    assert!(
        mountd.status()["images"].as_array().unwrap().is_empty(),
        "nothing mounted by the service"
    );
    nothing_left(&env, &mountd, &[&a]);

    // `velo doctor` says so too, where it checks user namespaces.
    let out = run_without_user_namespaces(&a, &mountd, &project, &["--json", "doctor"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", describe(&out)));
    let checks = report["checks"].as_array().expect("checks");
    match checks
        .iter()
        .find(|c| c["name"].as_str().is_some_and(|n| n.contains("namespace")))
    {
        Some(c) => {
            assert_eq!(c["status"], "fail", "{c}");
            let detail = c["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains("user.max_user_namespaces") && detail.contains("sysctl -w"),
                "{c}"
            );
            assert!(!out.status.success(), "a failed check fails doctor");
        }
        None => eprintln!("velo doctor does not check user namespaces: {report}"),
    }

    // Warm: the tree exists, but the run cannot make its namespace to attach it in.
    velo_ok(&a, &mountd, &project, &["run", "true"]);
    let out = run_without_user_namespaces(&a, &mountd, &project, &["run", "true"]);
    said_so(&out);
    assert_eq!(installs(&project), 1);
    nothing_left(&env, &mountd, &[&a]);
}

/// `velo snapshot DIR --ref R` as an ordinary user goes through the service into their own
/// refs; `velo ref rm R` removes it; `velo status` with a `--store` that does not exist does
/// not create it.
#[test]
fn snapshot_ref_rm_and_status_as_an_ordinary_user() {
    if !can_mount("snapshot_ref_rm_and_status_as_an_ordinary_user") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let a = TestUser::create("sn", env.dir.path());
    let tree = a.home.join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("small"), "tiny\n").unwrap();
    fs::write(tree.join("sub/big"), "x".repeat(10_000)).unwrap();
    a.own(&tree);

    let snap = velo_json(
        &a,
        &mountd,
        &a.home,
        &["snapshot", path_str(&tree), "--ref", "mine/tree"],
    );
    assert_eq!(snap["ref"], "mine/tree", "{snap}");
    assert_eq!(snap["files"], 2, "{snap}");
    let digest = snap["digest"].as_str().expect("a digest").to_owned();
    let ls = velo_json(&a, &mountd, &a.home, &["ls"]);
    assert!(
        ls["refs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "mine/tree" && r["image"] == digest.as_str()),
        "{ls}"
    );
    velo_ok(&a, &mountd, &a.home, &["ref", "rm", "mine/tree"]);
    assert!(
        ref_names(&a, &mountd, &a.home).is_empty(),
        "the ref is gone"
    );
    let again = velo_as(&a, &mountd, &a.home, &["ref", "rm", "mine/tree"])
        .output()
        .unwrap();
    assert!(!again.status.success(), "{}", describe(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("mine/tree"),
        "{}",
        describe(&again)
    );

    let project = custom_project(&env, &a, "nostore");
    let store = a.home.join("no-store-here");
    let status = velo_json(
        &a,
        &mountd,
        &project,
        &["--store", path_str(&store), "status"],
    );
    assert_eq!(status[0]["up_to_date"], false, "{status}");
    assert!(!store.exists(), "velo status created {}", store.display());
    nothing_left(&env, &mountd, &[&a]);
}
