//! Everything the measurements need, built once and cached under `target/bench-cache/`:
//! pnpm and uv (from the npm registry and PyPI), a uv project generated from the Python
//! workload's requirements, a pnpm lockfile imported from the npm one, warm npm/pnpm/uv caches,
//! velo's images of both trees, and byte-identical copies of them on local disk.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::sys::{cmd, remove_tree, run};

/// pnpm, from the npm registry.
const PNPM_VERSION: &str = "9.15.9";
/// uv, from PyPI.
const UV_VERSION: &str = "0.13.9";
/// The interpreters the Python workload's pins resolve for (pandas 3 needs ≥ 3.11, soupsieve
/// 4.1 ≥ 3.11.5); also the uv project's `requires-python`.
const PYTHON_RANGE: &str = ">=3.11.5,<3.12";
/// The file in a directory that records what it was built from.
pub const MARKER: &str = ".velo-bench-built-from";

/// Paths and the environment every command of the bench runs with.
pub struct Env {
    /// velo, built by cargo for this bench.
    pub velo: PathBuf,
    /// The root of the journaled ext4 filesystem everything below lives on.
    pub root: PathBuf,
    /// The velo store.
    pub store: PathBuf,
    /// npm cache, pnpm store, uv cache, matplotlib's font cache.
    pub caches: PathBuf,
    /// The pnpm binary.
    pub pnpm: PathBuf,
    /// The uv binary.
    pub uv: PathBuf,
    /// The Python interpreter of the venvs.
    pub python: PathBuf,
    /// A program that prints the time it started (`CLOCK_MONOTONIC`, ns) and exits, with no C
    /// library start-up of its own: `velo run PROBE` shows when velo handed over to a command.
    pub probe: PathBuf,
    /// velo-mountd's socket: root's `velo run` goes through the service there (it serves
    /// `store`), and so does the ordinary user's.
    pub socket: PathBuf,
    /// `PATH` with the bench's pnpm and uv first.
    path: OsString,
}

impl Env {
    /// Installs the tools (once) and fixes the paths. `root` is the mounted ext4; `socket` is
    /// where the bench's velo-mountd listens.
    pub fn new(velo: &Path, cache: &Path, root: &Path, socket: &Path) -> Self {
        let tools = cache.join("tools");
        let pnpm = ensure_pnpm(&tools);
        let uv = ensure_uv(&tools);
        let mut dirs = vec![
            uv.parent().expect("uv is in a bin dir").to_owned(),
            pnpm.parent().expect("pnpm is in a bin dir").to_owned(),
        ];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let path = std::env::join_paths(dirs).expect("join PATH");
        let caches = root.join("caches");
        fs::create_dir_all(caches.join("matplotlib")).expect("create the cache dirs");
        let python = find_python(&uv);
        let probe = build_probe(&tools);
        Self {
            velo: velo.to_owned(),
            root: root.to_owned(),
            store: root.join("store"),
            caches,
            pnpm,
            uv,
            python,
            probe,
            socket: socket.to_owned(),
            path,
        }
    }

    /// `PATH` of the bench's commands (pnpm and uv first).
    pub fn path(&self) -> &OsStr {
        &self.path
    }

    /// `program args…` with the bench's environment: tool caches on the ext4, no bytecode
    /// writes (both sides read the same `.pyc` files), no sudo caller (everything runs as
    /// root), no velo store, socket or service switch from the caller's environment, and the
    /// same values on every run so that velo's keys stay stable.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = cmd(program, args);
        c.env("PATH", &self.path)
            .env("npm_config_cache", self.caches.join("npm"))
            .env("npm_config_audit", "false")
            .env("npm_config_fund", "false")
            .env("npm_config_update_notifier", "false")
            .env("UV_CACHE_DIR", self.caches.join("uv"))
            .env("UV_PYTHON", &self.python)
            .env("UV_PYTHON_DOWNLOADS", "never")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("MPLCONFIGDIR", self.caches.join("matplotlib"))
            .env_remove("SUDO_UID")
            .env_remove("SUDO_GID")
            .env_remove("VELO_STORE")
            .env_remove("VELO_SOCKET")
            .env_remove("VELO_MOUNTD");
        c
    }

    /// `velo --store STORE -q ARGS…` in `project`, with `VELO_SOCKET` naming the bench's
    /// velo-mountd (which serves that store, so `velo run` gets its overlays from it).
    pub fn velo<I, S>(&self, project: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command(&self.velo, [OsStr::new("--store"), self.store.as_os_str()]);
        c.arg("-q")
            .args(args)
            .current_dir(project)
            .env("VELO_SOCKET", &self.socket);
        c
    }

    /// `velo run -- ARGS…` in `project`.
    pub fn velo_run<I, S>(&self, project: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.velo(project, ["run", "--"]);
        c.args(args);
        c
    }
}

/// One tree: velo's project (its dir is mounted by `velo run`), a byte-identical copy of the
/// tree on local disk, and an empty project whose dir the bench mounts once with `velo mount`.
pub struct Tree {
    /// The managed dir's name (`node_modules`, `.venv`).
    pub dir: &'static str,
    /// The project `velo run` runs in.
    pub velo_project: PathBuf,
    /// The same tree copied to local disk (same ext4), in a sibling project.
    pub disk_project: PathBuf,
    /// A project whose dir is mounted once, for the steady-state figures.
    pub mounted_project: PathBuf,
    /// The image velo built.
    pub image: String,
    /// Files in the tree.
    pub files: u64,
    /// Bytes of file content in the tree.
    pub bytes: u64,
}

/// The node workload plus its peers' project dirs.
pub struct Node {
    /// The trees.
    pub tree: Tree,
    /// Where `npm ci --offline` runs.
    pub npm_peer: PathBuf,
    /// Where `pnpm install --offline --frozen-lockfile` runs.
    pub pnpm_peer: PathBuf,
}

/// The Python workload plus its peer's project dir.
pub struct Python {
    /// The trees.
    pub tree: Tree,
    /// Where `uv sync --frozen` runs.
    pub uv_peer: PathBuf,
}

/// Installs pnpm into `tools/pnpm` (once) and returns its binary.
fn ensure_pnpm(tools: &Path) -> PathBuf {
    let prefix = tools.join("pnpm");
    let bin = prefix.join("node_modules/.bin/pnpm");
    if !bin.exists() {
        println!("  installing pnpm {PNPM_VERSION} into {}", prefix.display());
        run(
            cmd("npm", ["install", "--no-audit", "--no-fund", "--prefix"])
                .arg(&prefix)
                .arg(format!("pnpm@{PNPM_VERSION}")),
        );
    }
    bin
}

/// The start probe's source: raw system calls, no C library, so that nothing but the exec
/// itself stands between velo handing over and the clock being read.
const PROBE_C: &str = r#"
#include <sys/syscall.h>
#include <time.h>
static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
void _start(void) {
    struct timespec t;
    sys3(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&t, 0);
    unsigned long long ns = (unsigned long long)t.tv_sec * 1000000000ULL + t.tv_nsec;
    char d[24], buf[32];
    int k = 0, n = 0;
    do { d[k++] = '0' + ns % 10; ns /= 10; } while (ns);
    while (k) buf[n++] = d[--k];
    buf[n++] = '\n';
    sys3(SYS_write, 1, (long)buf, n);
    sys3(SYS_exit_group, 0, 0, 0);
    for (;;) {}
}
"#;

/// Builds the start probe (x86-64 Linux) with the C compiler, once.
fn build_probe(tools: &Path) -> PathBuf {
    let bin = tools.join("start-probe");
    let src = tools.join("start-probe.c");
    if fs::read_to_string(&src).is_ok_and(|s| s == PROBE_C) && bin.exists() {
        return bin;
    }
    fs::create_dir_all(tools).expect("create the tools dir");
    fs::write(&src, PROBE_C).expect("write the probe source");
    let out = cmd(
        "cc",
        ["-O2", "-static", "-nostdlib", "-fno-stack-protector", "-o"],
    )
    .arg(&bin)
    .arg(&src)
    .output()
    .expect("run cc");
    assert!(
        out.status.success(),
        "building the start probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Installs uv into `tools/uv` (once) and returns its binary.
fn ensure_uv(tools: &Path) -> PathBuf {
    let target = tools.join("uv");
    let bin = target.join("bin/uv");
    if !bin.exists() {
        println!("  installing uv {UV_VERSION} into {}", target.display());
        run(cmd(
            "python3",
            [
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ],
        )
        .arg("--target")
        .arg(&target)
        .arg(format!("uv=={UV_VERSION}")));
    }
    bin
}

/// `$VELO_BENCH_PYTHON`, else the interpreter uv finds for [`PYTHON_RANGE`] (never
/// downloaded).
fn find_python(uv: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("VELO_BENCH_PYTHON") {
        return PathBuf::from(p);
    }
    let out = cmd(uv, ["python", "find", PYTHON_RANGE])
        .env("UV_PYTHON_DOWNLOADS", "never")
        .output()
        .expect("run uv python find");
    assert!(
        out.status.success(),
        "no Python {PYTHON_RANGE} found (set VELO_BENCH_PYTHON): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A short hash of some inputs (to tell whether a cached result is still valid).
fn fingerprint(parts: &[&[u8]]) -> String {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().to_hex()[..32].to_owned()
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Writes `bytes` to `path` unless it already holds exactly them (so mtimes, and with them
/// velo's keys and npm's caches, stay put).
fn install_file(path: &Path, bytes: &[u8]) {
    if fs::read(path).ok().as_deref() != Some(bytes) {
        fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// True if `dir`'s marker says it was built from `fp`.
fn built_from(dir: &Path, fp: &str) -> bool {
    fs::read_to_string(dir.join(MARKER)).is_ok_and(|m| m == fp)
}

fn mark(dir: &Path, fp: &str) {
    fs::write(dir.join(MARKER), fp).expect("write a bench marker");
}

fn mkdir(path: &Path) -> PathBuf {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    path.to_owned()
}

/// Sets up the node workload: velo's image of the tree, its copy on disk, the npm and pnpm
/// peers with warm caches.
pub fn node(env: &Env, workload: &Path) -> Node {
    let package = read(&workload.join("package.json"));
    let lock = read(&workload.join("package-lock.json"));
    let project = |name: &str| {
        let dir = mkdir(&env.root.join(name));
        install_file(&dir.join("package.json"), &package);
        install_file(&dir.join("package-lock.json"), &lock);
        dir
    };
    let velo_project = project("node-velo");
    let npm_peer = project("npm-peer");
    let tree = build_tree(env, velo_project, "node_modules", "node");
    let fp = fingerprint(&[&package, &lock]);
    if !built_from(&npm_peer, &fp) {
        println!("  warming the npm cache (npm ci, online)");
        remove_tree(&npm_peer.join("node_modules"));
        run(env.command("npm", ["ci"]).current_dir(&npm_peer));
        mark(&npm_peer, &fp);
    }
    let pnpm_peer = pnpm_peer(env, &package, &lock, &fp);
    Node {
        tree,
        npm_peer,
        pnpm_peer,
    }
}

/// The pnpm project: the lockfile imported from npm's (once), and the store warmed by one
/// online install.
fn pnpm_peer(env: &Env, package: &[u8], lock: &[u8], fp: &str) -> PathBuf {
    let import = mkdir(&env.root.join("pnpm-import"));
    if !built_from(&import, fp) {
        println!("  importing package-lock.json into pnpm-lock.yaml (pnpm import)");
        install_file(&import.join("package.json"), package);
        install_file(&import.join("package-lock.json"), lock);
        run(env.command(&env.pnpm, ["import"]).current_dir(&import));
        mark(&import, fp);
    }
    let peer = mkdir(&env.root.join("pnpm-peer"));
    install_file(&peer.join("package.json"), package);
    install_file(
        &peer.join("pnpm-lock.yaml"),
        &read(&import.join("pnpm-lock.yaml")),
    );
    let npmrc = format!(
        "store-dir={}\n",
        env.caches.join("pnpm-store").to_string_lossy()
    );
    install_file(&peer.join(".npmrc"), npmrc.as_bytes());
    if !built_from(&peer, fp) {
        println!("  warming the pnpm store (pnpm install, online)");
        remove_tree(&peer.join("node_modules"));
        run(env
            .command(&env.pnpm, ["install", "--frozen-lockfile"])
            .current_dir(&peer));
        mark(&peer, fp);
    }
    peer
}

/// Sets up the Python workload: a uv project generated from `requirements.txt` (once),
/// velo's image of its venv, the venv's copy on disk, and the uv peer (its cache is the one
/// velo's build filled).
pub fn python(env: &Env, workload: &Path) -> Python {
    let requirements = read(&workload.join("requirements.txt"));
    let (pyproject, lock) = uv_project(env, &requirements);
    let project = |name: &str| {
        let dir = mkdir(&env.root.join(name));
        install_file(&dir.join("pyproject.toml"), &pyproject);
        install_file(&dir.join("uv.lock"), &lock);
        dir
    };
    let velo_project = project("py-velo");
    let uv_peer = project("uv-peer");
    let tree = build_tree(env, velo_project, ".venv", "py");
    Python { tree, uv_peer }
}

/// `pyproject.toml` and `uv.lock` for the requirements: `uv add -r requirements.txt` in a
/// bare project (network: PyPI), cached until the requirements or the interpreter change.
fn uv_project(env: &Env, requirements: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let dir = mkdir(&env.root.join("uv-project"));
    let fp = fingerprint(&[requirements, env.python.as_os_str().as_encoded_bytes()]);
    if !built_from(&dir, &fp) {
        println!("  locking the Python workload with uv (uv add -r requirements.txt)");
        let pyproject = format!(
            "[project]\nname = \"velo-bench-python\"\nversion = \"0.0.0\"\n\
             requires-python = \"{PYTHON_RANGE}\"\ndependencies = []\n"
        );
        fs::write(dir.join("pyproject.toml"), pyproject).expect("write pyproject.toml");
        fs::write(dir.join("requirements.txt"), requirements).expect("write requirements.txt");
        let _ = fs::remove_file(dir.join("uv.lock"));
        run(env
            .command(&env.uv, ["add", "--no-sync", "-r", "requirements.txt"])
            .current_dir(&dir));
        mark(&dir, &fp);
    }
    (
        read(&dir.join("pyproject.toml")),
        read(&dir.join("uv.lock")),
    )
}

/// `velo init` (once), builds the image if missing (the first `velo run`), and copies the
/// tree to a sibling project on local disk (once per image).
fn build_tree(env: &Env, velo_project: PathBuf, dir: &'static str, prefix: &str) -> Tree {
    if !velo_project.join("velo.toml").exists() {
        run(&mut env.velo(&velo_project, ["init"]));
    }
    let mut status = velo_status(env, &velo_project);
    if !status.up_to_date {
        println!(
            "  building velo's image of {} (the install runs once; this takes a while)",
            velo_project.join(dir).display()
        );
        run(&mut env.velo_run(&velo_project, ["true"]));
        status = velo_status(env, &velo_project);
        assert!(status.up_to_date, "velo run built no image");
    }
    let disk_project = mkdir(&env.root.join(format!("{prefix}-disk")));
    if !built_from(&disk_project, &status.image) {
        println!(
            "  copying the tree to local disk: {}",
            disk_project.join(dir).display()
        );
        remove_tree(&disk_project.join(dir));
        let tmp = disk_project.join(format!("{dir}.tmp"));
        remove_tree(&tmp);
        run(env
            .velo_run(
                &velo_project,
                [OsStr::new("cp"), OsStr::new("-a"), OsStr::new(dir)],
            )
            .arg(&tmp));
        fs::rename(&tmp, disk_project.join(dir)).expect("rename the copied tree");
        copy_project_files(&velo_project, &disk_project);
        mark(&disk_project, &status.image);
    }
    let mounted_project = mkdir(&env.root.join(format!("{prefix}-pmnt")));
    copy_project_files(&velo_project, &mounted_project);
    Tree {
        dir,
        velo_project,
        disk_project,
        mounted_project,
        image: status.image,
        files: status.files,
        bytes: status.bytes,
    }
}

/// Copies the project's regular top-level files (manifests, lockfiles) to `to`.
fn copy_project_files(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).expect("list the project").flatten() {
        let name = entry.file_name();
        if entry.file_type().is_ok_and(|t| t.is_file()) && name != OsStr::new(MARKER) {
            install_file(&to.join(&name), &read(&entry.path()));
        }
    }
}

/// What `velo status --json` says about a project's (single) managed dir.
struct Status {
    up_to_date: bool,
    image: String,
    files: u64,
    bytes: u64,
}

fn velo_status(env: &Env, project: &Path) -> Status {
    let out = run(&mut env.velo(project, ["--json", "status"]));
    let rows: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("velo status --json prints JSON");
    let row = &rows[0];
    Status {
        up_to_date: row["up_to_date"].as_bool().unwrap_or(false),
        image: row["image"].as_str().unwrap_or_default().to_owned(),
        files: row["files"].as_u64().unwrap_or(0),
        bytes: row["bytes"].as_u64().unwrap_or(0),
    }
}
