//! (d) `velo run` as an ordinary user, against root's `velo run` through the same velo-mountd,
//! in the same run: the user's `velo run` gets its overlay from the service and attaches it in
//! a user+mount namespace of its own; a missing tree is installed as the user in that
//! namespace, snapshotted without a store and streamed to the service.

#![allow(unsafe_code)] // system calls for the bench harness (processes, signals, caches)

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::import::{self, Lang, Sample, Side};
use crate::mountd::{BenchUser, Mountd};
use crate::setup::{self, Env, Tree};
use crate::stats::{Series, Verdict, human, print_table, print_verdicts};
use crate::sys::{self, LoopExt4, cmd, remove_tree, run, run_json, sync_fs, timed};

/// Warm `velo run true` as the user may take at most this much longer than as root.
const USER_EXTRA_MS: f64 = 1.0;
/// Imports through the user path: unchanged from the root path, held to at most this many
/// percent more.
const USER_IMPORT_PCT: f64 = 2.0;
/// A cold build as the user (install + snapshot + import) may take at most this many times as
/// long as the install alone.
const COLD_BUILD_RATIO: f64 = 1.2;

/// The user's side of (d): the user, its environment and its projects.
pub struct AsUser<'a> {
    user: &'a BenchUser,
    velo: PathBuf,
    socket: PathBuf,
    env: Vec<(&'static str, OsString)>,
    /// Its copy of the node project; velo.toml installs with `npm ci --offline`.
    pub node: PathBuf,
    /// A plain copy of the node project (package.json, lockfile): `npm ci --offline` alone.
    pub npm_plain: PathBuf,
    /// Its Python project; velo.toml's install copies the venv's local copy.
    pub python: PathBuf,
}

impl AsUser<'_> {
    /// `program args…` as the user, in `dir`, with the user's environment.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I, dir: &Path) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let env: Vec<(&str, &OsStr)> = self.env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        self.user.command(program, args, dir, &env)
    }

    /// `velo --socket SOCKET -q ARGS…` as the user, in `dir` (no store named: through the
    /// service).
    pub fn velo_at<I, S>(&self, socket: &Path, dir: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command(
            &self.velo,
            [OsStr::new("--socket"), socket.as_os_str(), OsStr::new("-q")],
            dir,
        );
        c.args(args);
        c
    }

    /// `velo -q ARGS…` as the user through the bench's velo-mountd.
    pub fn velo<I, S>(&self, dir: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.velo_at(&self.socket, dir, args)
    }

    /// `velo run -- ARGS…` as the user through `socket`.
    pub fn velo_run_at<I, S>(&self, socket: &Path, dir: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.velo_at(socket, dir, ["run", "--"]);
        c.args(args);
        c
    }

    /// `velo run -- ARGS…` as the user through the bench's velo-mountd.
    pub fn velo_run<I, S>(&self, dir: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.velo_run_at(&self.socket, dir, args)
    }

    /// The ref and image (empty if not built) of the project's single managed dir, as the
    /// service answers the user.
    pub fn status(&self, project: &Path) -> (String, String) {
        let rows = run_json(&mut self.velo(project, ["--json", "status"]));
        let row = &rows[0];
        (
            row["ref"].as_str().unwrap_or_default().to_owned(),
            row["image"].as_str().unwrap_or_default().to_owned(),
        )
    }
}

/// Makes a command start the way the user's commands do (fork, then exec: a `pre_exec` hook
/// keeps std from using `posix_spawn`), so that root's and the user's timings differ only in
/// what velo does.
fn same_spawn(c: &mut Command) -> &mut Command {
    // SAFETY: the hook does nothing.
    unsafe { c.pre_exec(|| Ok(())) }
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn copy(from: &Path, to: &Path) {
    fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}

/// Sets up the user's side: access to what it uses, its own copy of the npm cache (kept across
/// bench runs under `as-user/` on the ext4), its projects, and its trees, built once (untimed)
/// the way the user's first `velo run` builds them.
pub fn prepare<'a>(
    env: &Env,
    user: &'a mut BenchUser,
    node: &setup::Node,
    python: &setup::Python,
) -> AsUser<'a> {
    let base = env.root.join("as-user");
    let venv = python.tree.disk_project.join(".venv");
    let interpreter = fs::canonicalize(venv.join("bin/python"))
        .unwrap_or_else(|e| panic!("resolve {}/bin/python: {e}", venv.display()));
    let mut granted = Vec::new();
    for p in [
        env.velo.clone(),
        env.probe.clone(),
        env.socket.clone(),
        base.clone(),
        venv.clone(),
        interpreter.clone(),
    ]
    .into_iter()
    .chain(["node", "npm"].iter().filter_map(|t| sys::which(t)))
    {
        granted.extend(user.grant_traversal(&p));
    }
    println!(
        "\n(d) as an ordinary user: {} (uid {}), home {}",
        user.name,
        user.uid,
        user.home.display()
    );
    if !granted.is_empty() {
        println!(
            "  the user may now pass through (an ACL entry u:{}:x for it alone, removed at the \
             end): {}",
            user.uid,
            granted
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // The npm cache, a copy of the bench's that the user may write (npm writes its index and
    // logs into it); copied once, kept with the ext4.
    let npm_cache = base.join("npm-cache");
    let from = fs::read_to_string(node.npm_peer.join(setup::MARKER)).unwrap_or_default();
    if fs::read_to_string(npm_cache.join(setup::MARKER)).ok() != Some(from.clone()) {
        println!(
            "  copying the npm cache for the user to {}",
            npm_cache.display()
        );
        remove_tree(&npm_cache);
        let tmp = base.join("npm-cache.tmp");
        remove_tree(&tmp);
        run(cmd("cp", ["-a"]).arg(env.caches.join("npm")).arg(&tmp));
        write(&tmp.join(setup::MARKER), &from);
        fs::rename(&tmp, &npm_cache).expect("rename the npm cache copy");
    }
    user.own(&npm_cache);

    let home = user.home.clone();
    let mpl = home.join(".matplotlib");
    run(cmd("cp", ["-a"])
        .arg(env.caches.join("matplotlib"))
        .arg(&mpl));

    // The projects velo runs in sit beside root's, at the same depth and with names as long
    // (node resolves modules up the path; a deeper project would look up more).
    // The node project: root's velo.toml with `npm ci --offline` as its install.
    let user_node = user.dir_of_its_own(&env.root.join("node-user"));
    for f in ["package.json", "package-lock.json"] {
        copy(&node.tree.velo_project.join(f), &user_node.join(f));
    }
    let mut config: toml::Value = toml::from_str(
        &fs::read_to_string(node.tree.velo_project.join("velo.toml")).expect("read velo.toml"),
    )
    .expect("velo.toml parses");
    let units = config
        .get_mut("deps")
        .and_then(toml::Value::as_array_mut)
        .expect("velo.toml has [[deps]]");
    assert_eq!(units.len(), 1, "one install in the node project");
    let root_install = units[0]["install"].as_str().unwrap_or_default().to_owned();
    units[0]
        .as_table_mut()
        .expect("a [[deps]] table")
        .insert("install".into(), "npm ci --offline".into());
    write(
        &user_node.join("velo.toml"),
        toml::to_string(&config).expect("serialise velo.toml"),
    );
    let npm_plain = home.join("npm-plain");
    fs::create_dir_all(&npm_plain).expect("create the user's npm project");
    for f in ["package.json", "package-lock.json"] {
        copy(&node.tree.velo_project.join(f), &npm_plain.join(f));
    }

    // The Python project: its install copies the venv's local copy (a venv works at the path
    // it is run from, as (c)'s local side shows; checked below).
    let user_py = user.dir_of_its_own(&env.root.join("py-user"));
    copy(
        &python.tree.velo_project.join("uv.lock"),
        &user_py.join("uv.lock"),
    );
    let py_install = format!("cp -a '{}/.' .venv/", venv.display());
    write(
        &user_py.join("velo.toml"),
        format!(
            "[[deps]]\necosystem = \"venv-copy\"\ndirs = [\".venv\"]\ninputs = [\"uv.lock\"]\n\
             install = \"{}\"\n",
            py_install.replace('\\', "\\\\").replace('"', "\\\"")
        ),
    );
    for dir in [&home, &user_node, &user_py] {
        user.own(dir);
    }

    let user: &BenchUser = user;
    let u = AsUser {
        user,
        velo: env.velo.clone(),
        socket: env.socket.clone(),
        env: vec![
            ("npm_config_cache", npm_cache.into_os_string()),
            ("npm_config_audit", "false".into()),
            ("npm_config_fund", "false".into()),
            ("npm_config_update_notifier", "false".into()),
            ("PYTHONDONTWRITEBYTECODE", "1".into()),
            ("MPLCONFIGDIR", mpl.into_os_string()),
        ],
        node: user_node,
        npm_plain,
        python: user_py,
    };
    println!(
        "  the user's node project: {} (install `npm ci --offline`; root's: `{root_install}`); \
         Python: {} (install `{py_install}`)",
        u.node.display(),
        u.python.display()
    );
    for (what, project) in [("node_modules", &u.node), (".venv", &u.python)] {
        let t = Instant::now();
        run(&mut u.velo_run(project, ["true"]));
        let (_, image) = u.status(project);
        println!(
            "  built the user's {what} (its first velo run: install, snapshot, import): {:.1} s, \
             image {}",
            t.elapsed().as_secs_f64(),
            &image[..image.len().min(16)]
        );
        assert!(!image.is_empty(), "the user's velo run built no image");
    }
    let out = run(&mut u.velo_run(
        &u.python,
        [".venv/bin/python", "-c", "import sys; print(sys.prefix)"],
    ));
    let prefix = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        Path::new(&prefix),
        u.python.join(".venv"),
        "the copied venv does not run as itself at the user's path"
    );
    println!("  the user's venv runs at its own path (sys.prefix {prefix})");
    u
}

/// (d)1 Warm `velo run` as the user against root's, both through the service, alternating.
pub fn place(env: &Env, u: &AsUser<'_>, tree: &Tree, runs: usize) -> Vec<Verdict> {
    println!(
        "\n(d)1 warm velo run as the user vs as root, node project, both through the same \
         velo-mountd (page cache warm)"
    );
    println!(
        "  both spawned the same way (fork, exec; the user's child drops to its uid, gid and \
         groups in between); tree in place: from spawn until the probe command starts"
    );
    let mut series = [
        Series::new("root: tree in place, command started"),
        Series::new("root: velo run true, whole round trip"),
        Series::new("user: tree in place, command started"),
        Series::new("user: velo run true, whole round trip"),
    ];
    for i in 0..runs + 3 {
        for k in 0..2 {
            let as_user = (i + k) % 2 == 1;
            let command = |args: &[&OsStr]| {
                if as_user {
                    u.velo_run(&u.node, args)
                } else {
                    let mut c = env.velo_run(&tree.velo_project, args);
                    same_spawn(&mut c);
                    c
                }
            };
            let t0 = sys::monotonic_ns();
            let out = run(&mut command(&[env.probe.as_os_str()]));
            let t1: u64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("the probe prints its start time");
            let (d, _) = timed(&mut command(&[OsStr::new("true")]));
            if i >= 3 {
                let at = if as_user { 2 } else { 0 };
                series[at].push(std::time::Duration::from_nanos(t1.saturating_sub(t0)));
                series[at + 1].push(d);
            }
        }
    }
    print_table(&series.iter().collect::<Vec<_>>());
    let started = series[2].median() - series[0].median();
    let trip = series[3].median() - series[1].median();
    println!(
        "  the user's extra time: tree in place {:+.2} ms, whole round trip {:+.2} ms",
        started * 1e3,
        trip * 1e3
    );
    let v = vec![
        Verdict::extra_ms(
            "(d) warm velo run true: as the user vs as root",
            series[3].median(),
            series[1].median(),
            USER_EXTRA_MS,
            &format!(
                "{} vs {}",
                human(series[3].median()),
                human(series[1].median())
            ),
        ),
        Verdict::extra_ms(
            "(d) tree in place: as the user vs as root",
            series[2].median(),
            series[0].median(),
            USER_EXTRA_MS,
            &format!(
                "{} vs {}",
                human(series[2].median()),
                human(series[0].median())
            ),
        ),
    ];
    print_verdicts(&v);
    v
}

/// (d)2 The imports alone (timed inside the process) through the user path against the root
/// path, warm, rotating which goes first.
#[allow(clippy::too_many_arguments)]
pub fn imports(
    env: &Env,
    ext4: &LoopExt4,
    mountd: &Mountd,
    u: &AsUser<'_>,
    tree: &Tree,
    user_project: &Path,
    lang: Lang,
    n: usize,
) -> Vec<Verdict> {
    println!(
        "\n(d)2 {}: import time (inside the process) through the user path vs the root path, \
         warm (target: unchanged)",
        lang.name()
    );
    println!(
        "  also on the tree's local copy (root's, readable by all), as root and as the user: \
         what being an ordinary user costs without velo"
    );
    let mut sides = [
        Side::new("root: velo run (lent overlay)"),
        Side::new("user: velo run (lent overlay)"),
        Side::new("root: local disk"),
        Side::new("user: local disk (root's copy)"),
    ];
    // Root against itself (alternate rounds): how far two medians of the same thing differ.
    let mut halves = [Series::new("even"), Series::new("odd")];
    let argv = lang.argv();
    for round in 0..=n {
        for k in 0..sides.len() {
            let which = (round + k) % sides.len();
            let mut c = match which {
                0 => env.velo_run(&tree.velo_project, &argv),
                1 => u.velo_run(user_project, &argv),
                2 => crate::disk_command(env, tree, lang),
                _ => u.command(&argv[0], &argv[1..], &tree.disk_project),
            };
            let before = sys::disk_reads(ext4.device_name()).0;
            let out = run(&mut c);
            let reads = sys::disk_reads(ext4.device_name()).0 - before;
            if round > 0 {
                let s = Sample::parse(&out);
                if which == 0 {
                    halves[round % 2].push_ms(s.wall_ms);
                }
                sides[which].push(s, reads);
            }
        }
    }
    import::print_sides(&sides.iter().collect::<Vec<_>>());
    let (_, user_image) = u.status(user_project);
    for (who, image) in [("root's", tree.image.as_str()), ("the user's", &user_image)] {
        match mountd.image(image) {
            Some(e) => println!(
                "  velo-mountd, {who} image so far: {} requests answered from its superblock, {} \
                 runs got an overlay back, {} overlays discarded",
                e["hits"], e["reused"], e["discarded"]
            ),
            None => println!("  velo-mountd does not hold {who} image ({image})"),
        }
    }
    let noise = (halves[0].median() / halves[1].median() - 1.0) * 100.0;
    let pct = |a: &Side, b: &Side| (a.wall.median() / b.wall.median() - 1.0) * 100.0;
    println!(
        "  user vs root: {:+.1}% through velo run, {:+.1}% on the local copy; root against \
         itself (alternate rounds): {noise:+.1}%",
        pct(&sides[1], &sides[0]),
        pct(&sides[3], &sides[2])
    );
    let v = vec![Verdict::overhead(
        &format!("(d) {} warm: imports, user path vs root path", lang.name()),
        sides[1].wall.median(),
        sides[0].wall.median(),
        USER_IMPORT_PCT,
        &format!(
            "unchanged is the target; kernel time {:+.1} ms; on the local copy, user vs \
             root: {:+.1}%; root vs root: {noise:+.1}%",
            (sides[1].sys.median() - sides[0].sys.median()) * 1e3,
            pct(&sides[3], &sides[2])
        ),
    )];
    print_verdicts(&v);
    v
}

/// (d)3 A cold build as the user (`velo run true` on a missing key) against `npm ci
/// --offline` alone as the same user, rotating which goes first: into the bench's store
/// (which already holds the tree's objects, as a shared machine's store does after anyone's
/// first install) and into an empty store (its own velo-mountd, removed after each run).
pub fn cold_build(
    env: &Env,
    u: &AsUser<'_>,
    mountd_bin: &Path,
    run_dir: &Path,
    n: usize,
) -> Vec<Verdict> {
    println!(
        "\n(d)3 node: a cold build as the user — `velo run true` on a missing key: npm ci \
         --offline in the user's namespace, snapshot without a store, import through \
         velo-mountd, then the run — vs npm ci --offline alone as the same user (its own \
         warm copy of the npm cache; the dir removed and the filesystem synced before each run)"
    );
    let (ref_name, _) = u.status(&u.node);
    let mut shared = Series::new("velo run true, cold key (the store holds the objects)");
    let mut empty = Series::new("velo run true, cold key, empty store");
    let mut npm = Series::new("npm ci --offline alone");
    let mut flush = Series::new("for reference: sync -f right after npm ci");
    let mut remove = Series::new("for reference: rm -rf of npm ci's node_modules");
    let fresh_store = env.root.join("as-user/empty-store");
    let fresh_socket = run_dir.join("velo-mountd-empty.sock");
    let fresh_log = run_dir.join("velo-mountd-empty.log");
    for round in 0..n {
        for k in 0..3 {
            match (round + k) % 3 {
                0 => {
                    run(&mut u.velo(&u.node, ["ref", "rm", &ref_name]));
                    sync_fs(&u.node);
                    let (d, _) = timed(&mut u.velo_run(&u.node, ["true"]));
                    shared.push(d);
                }
                1 => {
                    remove_tree(&fresh_store);
                    let m = Mountd::start(
                        mountd_bin,
                        &env.velo,
                        &fresh_store,
                        &fresh_socket,
                        &fresh_log,
                    );
                    sync_fs(&u.node);
                    let (d, _) = timed(&mut u.velo_run_at(&fresh_socket, &u.node, ["true"]));
                    m.stop();
                    remove_tree(&fresh_store);
                    empty.push(d);
                }
                _ => {
                    remove_tree(&u.npm_plain.join("node_modules"));
                    sync_fs(&u.npm_plain);
                    let (d, _) = timed(&mut u.command("npm", ["ci", "--offline"], &u.npm_plain));
                    npm.push(d);
                    let (d, _) = timed(cmd("sync", ["-f"]).arg(&u.npm_plain));
                    flush.push(d);
                    let (d, _) = timed(&mut u.command("rm", ["-rf", "node_modules"], &u.npm_plain));
                    remove.push(d);
                }
            }
        }
    }
    remove_tree(&u.npm_plain.join("node_modules"));
    print_table(&[&shared, &empty, &npm, &flush, &remove]);
    println!(
        "  cold build / install alone: {:.2}× ({:+.1} s) into the bench's store, {:.2}× ({:+.1} \
         s) into an empty one",
        shared.median() / npm.median(),
        shared.median() - npm.median(),
        empty.median() / npm.median(),
        empty.median() - npm.median()
    );
    println!(
        "  (velo's install writes the tree to a tmpfs, so neither the store's syncfs before \
         the ref nor a removal touches what it wrote; the reference lines time both for npm ci \
         alone's tree on this disk)"
    );
    let v = vec![
        Verdict::ratio(
            "(d) node: cold build as the user vs npm ci alone",
            shared.median(),
            npm.median(),
            COLD_BUILD_RATIO,
            &format!(
                "{} vs {}; the store already held the objects",
                human(shared.median()),
                human(npm.median())
            ),
        ),
        Verdict::ratio(
            "(d) node: the same into an empty store",
            empty.median(),
            npm.median(),
            COLD_BUILD_RATIO,
            &format!(
                "{} vs {}; every object sent and stored",
                human(empty.median()),
                human(npm.median())
            ),
        ),
    ];
    print_verdicts(&v);
    v
}
