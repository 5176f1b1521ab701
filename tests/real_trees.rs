//! Real dependency trees, made by the real package managers, run from a mount: a node project
//! installed by `npm` (offline from local tarballs, and once from the public registry) and a
//! Python package installed by `pip` into a venv. Each tree is snapshotted, the original moved
//! away, and the image mounted at the very same path (shebangs and `.bin` links depend on it);
//! then the programs must print exactly what they printed before. Needs root (skips loudly
//! without it; CI runs as root), and node, npm and python3 (fails without them).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, can_mount, compare_trees, describe, is_mount_point};

type Listing = BTreeMap<PathBuf, (u64, u32, String)>;

/// Panics unless `tool --version` runs: these tests must not pass by silently doing nothing.
fn require_tool(tool: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{tool} --version` failed (CI has {tool}):\n{}",
            describe(&out)
        ),
        Err(e) => panic!("{tool} is required by this test (CI has it) but cannot be run: {e}"),
    }
}

/// Runs `cmd`, expecting success; returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", describe(&out));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Runs `cmd`, expecting failure; returns stderr.
fn run_fails(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd:?} should have failed:\n{}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn assert_same_tree(orig: &Path, mounted: &Path) {
    let diffs = compare_trees(orig, mounted);
    assert!(
        diffs.is_empty(),
        "mount at {} differs from the original tree {}:\n{}",
        mounted.display(),
        orig.display(),
        diffs.join("\n")
    );
}

fn assert_read_only(dir: &Path) {
    let err =
        fs::write(dir.join("velo-probe"), "x").expect_err("a read-only mount accepted a write");
    assert_eq!(
        err.kind(),
        ErrorKind::ReadOnlyFilesystem,
        "writing into {}: {err}",
        dir.display()
    );
}

// ---------------------------------------------------------------------------------------------
// node / npm

/// `npm` with its cache (and logs) in the test's temp dir and no notifier/audit/fund chatter.
fn npm(env: &Env, dir: &Path) -> Command {
    let mut c = Command::new("npm");
    c.current_dir(dir)
        .env("npm_config_cache", env.path("npm-cache"))
        .env("npm_config_update_notifier", "false")
        .env("npm_config_audit", "false")
        .env("npm_config_fund", "false")
        .env_remove("npm_config_offline")
        .env_remove("NODE_OPTIONS")
        .env_remove("NODE_PATH");
    c
}

fn node(dir: &Path, script: &str) -> Command {
    let mut c = Command::new("node");
    c.arg("-e")
        .arg(script)
        .current_dir(dir)
        .env_remove("NODE_OPTIONS")
        .env_remove("NODE_PATH");
    c
}

/// Requires all three local packages and prints what they compute, plus where node found them.
const NODE_SCRIPT: &str = r#"
const path = require("path");
const greet = require("vr-greet"), math = require("vr-math");
console.log(greet.greet("velo"));
console.log("top vr-math v" + math.version + " add=" + math.add(20, 22));
for (const m of ["vr-greet", "vr-math", "vr-cli/package.json"])
  console.log(m + " -> " + path.relative(process.cwd(), require.resolve(m)));
console.log("nested -> " + path.relative(process.cwd(),
  require.resolve("vr-math", { paths: [path.dirname(require.resolve("vr-greet"))] })));
"#;

/// Packs three tiny packages into tarballs and installs them (offline) into `project`:
/// `vr-math@1` (top level), `vr-greet` (depends on `vr-math@2`, so npm nests a second
/// `vr-math` under `vr-greet/node_modules`), `vr-cli` (a `bin`, so npm makes `.bin/vr-cli`, and
/// a `^1` dependency on `vr-math` that npm dedupes to the top-level one).
fn npm_local_project(env: &Env, project: &Path) {
    let tarballs = env.path("tarballs");
    fs::create_dir_all(&tarballs).unwrap();
    let tgz = |name: &str| format!("file:{}", tarballs.join(name).display());
    let src = env.path("pkg-src");
    let packages = [
        (
            "math1",
            r#"{"name":"vr-math","version":"1.0.0","main":"index.js"}"#.to_owned(),
            vec![("index.js", "exports.version = '1';\nexports.add = (a, b) => a + b;\n")],
        ),
        (
            "math2",
            r#"{"name":"vr-math","version":"2.0.0","main":"index.js"}"#.to_owned(),
            vec![("index.js", "exports.version = '2';\nexports.add = (a, b) => 1000 + a + b;\n")],
        ),
        (
            "greet",
            format!(
                r#"{{"name":"vr-greet","version":"1.0.0","main":"index.js","dependencies":{{"vr-math":"{}"}}}}"#,
                tgz("vr-math-2.0.0.tgz")
            ),
            vec![(
                "index.js",
                "const m = require('vr-math');\n\
                 exports.greet = (who) => `hello ${who} from vr-math v${m.version}: ${m.add(2, 3)}`;\n",
            )],
        ),
        (
            "cli",
            r#"{"name":"vr-cli","version":"1.0.0","bin":{"vr-cli":"cli.js"},"dependencies":{"vr-math":"^1.0.0"}}"#
                .to_owned(),
            vec![(
                "cli.js",
                "#!/usr/bin/env node\n\
                 const m = require('vr-math');\n\
                 const [a, b] = process.argv.slice(2).map(Number);\n\
                 console.log(`vr-cli: ${a}+${b}=${m.add(a, b)} (vr-math v${m.version}) in ${__dirname}`);\n",
            )],
        ),
    ];
    for (dir, manifest, files) in &packages {
        let d = src.join(dir);
        write(&d.join("package.json"), manifest);
        for (name, text) in files {
            write(&d.join(name), text);
        }
        run(npm(env, &d)
            .args(["pack", "--silent", "--pack-destination"])
            .arg(&tarballs));
    }
    write(
        &project.join("package.json"),
        &format!(
            r#"{{"name":"velo-real-tree","version":"1.0.0","private":true,"dependencies":{{"vr-math":"{}","vr-greet":"{}","vr-cli":"{}"}}}}"#,
            tgz("vr-math-1.0.0.tgz"),
            tgz("vr-greet-1.0.0.tgz"),
            tgz("vr-cli-1.0.0.tgz")
        ),
    );
    run(npm(env, project).args(["install", "--offline", "--no-audit", "--no-fund"]));

    // The shape npm must have produced, or the test below proves less than it claims.
    let nm = project.join("node_modules");
    for p in [
        "vr-math/index.js",
        "vr-greet/node_modules/vr-math/index.js",
        "vr-cli/cli.js",
        ".package-lock.json",
    ] {
        assert!(nm.join(p).is_file(), "npm did not create node_modules/{p}");
    }
    assert_eq!(
        fs::read_link(nm.join(".bin/vr-cli")).unwrap(),
        Path::new("../vr-cli/cli.js")
    );
    assert!(
        !nm.join("vr-cli/node_modules").exists(),
        "npm should have deduped vr-cli's vr-math"
    );
}

/// Everything the project's programs print: the script, the `.bin` entry, and npm's view.
fn node_outputs(env: &Env, project: &Path) -> String {
    let mut out = run(&mut node(project, NODE_SCRIPT));
    out += &run(Command::new(project.join("node_modules/.bin/vr-cli"))
        .args(["40", "2"])
        .current_dir(project)
        .env_remove("NODE_OPTIONS"));
    out += &run(npm(env, project).args(["ls", "--all", "--offline"]));
    out
}

#[test]
fn npm_project_from_local_tarballs_runs_from_mount() {
    if !can_mount("npm_project_from_local_tarballs_runs_from_mount") {
        return;
    }
    require_tool("node");
    require_tool("npm");
    let env = Env::new();
    let project = env.path("project");
    npm_local_project(&env, &project);
    let nm = project.join("node_modules");

    let before = node_outputs(&env, &project);
    for want in [
        "hello velo from vr-math v2: 1005",
        "top vr-math v1 add=42",
        "vr-greet -> node_modules/vr-greet/index.js",
        "vr-math -> node_modules/vr-math/index.js",
        "nested -> node_modules/vr-greet/node_modules/vr-math/index.js",
        &format!(
            "vr-cli: 40+2=42 (vr-math v1) in {}",
            nm.join("vr-cli").display()
        ),
        "vr-math@2.0.0",
        "vr-math@1.0.0 deduped",
    ] {
        assert!(
            before.contains(want),
            "missing {want:?} in the output before snapshot:\n{before}"
        );
    }

    env.snapshot(&nm, "npm/local");
    let orig = env.path("node_modules.orig");
    fs::rename(&nm, &orig).unwrap();
    let err = run_fails(&mut node(&project, NODE_SCRIPT));
    assert!(err.contains("Cannot find module 'vr-greet'"), "{err}");

    let m = env.mount("npm/local", &nm, &[]);
    assert!(is_mount_point(&nm));
    let after = node_outputs(&env, &project);
    assert_eq!(
        after, before,
        "programs print something else when run from the mount"
    );
    assert_same_tree(&orig, &nm);
    assert_read_only(&nm);

    m.umount();
    assert!(!is_mount_point(&nm));
    run_fails(&mut node(&project, NODE_SCRIPT));
}

#[test]
fn npm_registry_package_runs_from_mount() {
    if !can_mount("npm_registry_package_runs_from_mount") {
        return;
    }
    require_tool("node");
    require_tool("npm");
    let env = Env::new();
    let project = env.path("project");
    write(
        &project.join("package.json"),
        r#"{"name":"velo-registry-tree","version":"1.0.0","private":true}"#,
    );
    // A fresh cache, so this really downloads from the registry.
    let out = npm(&env, &project)
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--fetch-retries=1",
            "--fetch-timeout=60000",
            "is-number@7.0.0",
            "ms@2.1.3",
        ])
        .output()
        .expect("run npm");
    assert!(
        out.status.success(),
        "npm could not install is-number@7.0.0 and ms@2.1.3 from the public registry. This test \
         needs registry.npmjs.org (CI can reach it); check the network/proxy.\n{}",
        describe(&out)
    );
    let nm = project.join("node_modules");
    let script = r#"
const isNumber = require("is-number"), ms = require("ms");
console.log(isNumber(5), isNumber("5"), isNumber("five"), ms("2 days"), ms(90000), ms(ms("1h"), { long: true }));
console.log(require("is-number/package.json").version, require("ms/package.json").version);
"#;
    let before = run(&mut node(&project, script));
    assert_eq!(before, "true true false 172800000 2m 1 hour\n7.0.0 2.1.3\n");

    env.snapshot(&nm, "npm/registry");
    let orig = env.path("node_modules.orig");
    fs::rename(&nm, &orig).unwrap();
    run_fails(&mut node(&project, script));

    let m = env.mount("npm/registry", &nm, &[]);
    assert_eq!(run(&mut node(&project, script)), before);
    assert_same_tree(&orig, &nm);
    assert_read_only(&nm);
    m.umount();
}

// ---------------------------------------------------------------------------------------------
// Python / pip / venv

/// Python with the caller's environment neutralised, so bytecode writing is decided by the test.
fn python(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    for v in [
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONPYCACHEPREFIX",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "VIRTUAL_ENV",
    ] {
        c.env_remove(v);
    }
    c
}

const PY_SCRIPT: &str = "import sys, vrgreet\n\
print(vrgreet.something())\n\
print(vrgreet.__file__)\n\
print(sys.prefix)\n";

/// Creates a venv at `venv` (its final path) and pip-installs `vrgreet` — a wheel built here
/// from a two-module package with a console script — offline, without precompiling bytecode.
/// Returns `lib/pythonX.Y/site-packages/vrgreet`, relative to the venv.
fn make_venv(env: &Env, venv: &Path) -> PathBuf {
    let wheel = common::fixtures::wheel_with(
        env.dir.path(),
        &[
            (
                "__init__.py",
                "from ._calc import checksum\n\n\
                 def something():\n    return f\"vrgreet 1.2.3 says {checksum('velo rift')}\"\n\n\
                 def main():\n    import sys\n    print('console script:', something(), 'prefix', sys.prefix)\n",
            ),
            (
                "_calc.py",
                "def checksum(text):\n    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % 9973\n",
            ),
        ],
    );

    run(python(Path::new("python3")).args(["-m", "venv"]).arg(venv));
    run(python(&venv.join("bin/pip"))
        .args([
            "install",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-input",
        ])
        .arg(&wheel)
        .env_remove("PIP_FIND_LINKS")
        .env_remove("PIP_INDEX_URL")
        .env_remove("PIP_EXTRA_INDEX_URL")
        .env("PIP_CONFIG_FILE", "/dev/null")
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"));

    let script = fs::read_to_string(venv.join("bin/vrgreet")).expect("pip made no bin/vrgreet");
    let shebang = format!("#!{}/bin/python", venv.display());
    assert!(
        script.starts_with(&shebang),
        "unexpected console script:\n{script}"
    );
    let lib: Vec<_> = fs::read_dir(venv.join("lib"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("python"))
        .collect();
    assert_eq!(
        lib.len(),
        1,
        "expected one lib/pythonX.Y in the venv: {lib:?}"
    );
    let pkg = Path::new("lib").join(&lib[0]).join("site-packages/vrgreet");
    assert!(venv.join(&pkg).join("_calc.py").is_file());
    assert!(
        !venv.join(&pkg).join("__pycache__").exists(),
        "pip --no-compile wrote bytecode"
    );
    pkg
}

/// The parts of a store listing that no mount may change: objects, images and refs.
fn content_addressed(listing: &Listing) -> Listing {
    let keep = |p: &Path| {
        ["objects", "images", "refs"]
            .iter()
            .any(|d| p.starts_with(d))
    };
    listing
        .iter()
        .filter(|(p, _)| keep(p))
        .map(|(p, v)| (p.clone(), v.clone()))
        .collect()
}

/// What the venv prints: the import (with or without writing bytecode) and the console script.
fn venv_outputs(venv: &Path, write_bytecode: bool) -> String {
    let mut py = python(&venv.join("bin/python"));
    if !write_bytecode {
        py.env("PYTHONDONTWRITEBYTECODE", "1");
    }
    let mut out = run(py.args(["-c", PY_SCRIPT]));
    let mut script = python(&venv.join("bin/vrgreet"));
    if !write_bytecode {
        script.env("PYTHONDONTWRITEBYTECODE", "1");
    }
    out += &run(&mut script);
    out
}

fn expected_venv_output(venv: &Path, pkg: &Path) -> String {
    let prefix = venv.display();
    let init = venv.join(pkg).join("__init__.py");
    let says = "vrgreet 1.2.3 says 4527";
    format!(
        "{says}\n{}\n{prefix}\nconsole script: {says} prefix {prefix}\n",
        init.display()
    )
}

#[test]
fn python_venv_runs_from_read_only_mount() {
    if !can_mount("python_venv_runs_from_read_only_mount") {
        return;
    }
    require_tool("python3");
    let env = Env::new();
    let venv = env.path("venv");
    let pkg = make_venv(&env, &venv);
    let before = venv_outputs(&venv, false);
    assert_eq!(before, expected_venv_output(&venv, &pkg));

    env.snapshot(&venv, "py/venv");
    let orig = env.path("venv.orig");
    fs::rename(&venv, &orig).unwrap();
    assert!(!venv.join("bin/python").exists());

    let m = env.mount("py/venv", &venv, &[]);
    assert!(is_mount_point(&venv));
    assert_eq!(
        venv_outputs(&venv, false),
        before,
        "with PYTHONDONTWRITEBYTECODE=1"
    );
    // Users rarely set PYTHONDONTWRITEBYTECODE: Python must shrug off the failed .pyc write.
    assert_eq!(
        venv_outputs(&venv, true),
        before,
        "without PYTHONDONTWRITEBYTECODE"
    );
    assert!(!venv.join(&pkg).join("__pycache__").exists());
    assert_same_tree(&orig, &venv);
    assert_read_only(&venv.join(&pkg));
    m.umount();
}

#[test]
fn python_venv_runs_from_cow_mount_and_leaves_store_alone() {
    if !can_mount("python_venv_runs_from_cow_mount_and_leaves_store_alone") {
        return;
    }
    require_tool("python3");
    let env = Env::new();
    let venv = env.path("venv");
    let pkg = make_venv(&env, &venv);
    let before = venv_outputs(&venv, false);
    assert_eq!(before, expected_venv_output(&venv, &pkg));

    env.snapshot(&venv, "py/venv");
    let orig = env.path("venv.orig");
    fs::rename(&venv, &orig).unwrap();
    let store_before = env.store_listing();

    let m = env.mount("py/venv", &venv, &["--cow"]);
    assert!(is_mount_point(&venv));
    assert_same_tree(&orig, &venv);
    // Bytecode writes allowed: the import writes vrgreet/__pycache__/*.pyc into the upper.
    assert_eq!(venv_outputs(&venv, true), before);
    let cache = venv.join(&pkg).join("__pycache__");
    let pycs: Vec<_> = fs::read_dir(&cache)
        .unwrap_or_else(|e| panic!("python wrote no {}: {e}", cache.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        pycs.iter()
            .any(|n| n.starts_with("__init__.") && n.ends_with(".pyc"))
            && pycs
                .iter()
                .any(|n| n.starts_with("_calc.") && n.ends_with(".pyc")),
        "{pycs:?}"
    );
    // A second run (now loading the .pyc files) prints the same.
    assert_eq!(venv_outputs(&venv, true), before);
    assert!(!orig.join(&pkg).join("__pycache__").exists());

    // The writes are somewhere under the store's per-mount upper, not in its objects or images.
    let store_during = env.store_listing();
    assert_eq!(
        content_addressed(&store_during),
        content_addressed(&store_before),
        "CoW writes changed the store's objects/images/refs"
    );
    let pyc_rel = pkg.join("__pycache__").join(&pycs[0]);
    assert!(
        store_during.keys().any(|p| p.ends_with(&pyc_rel)),
        "no {} in any upper under the store",
        pyc_rel.display()
    );
    m.umount();
    let store_after = env.store_listing();
    assert_eq!(
        content_addressed(&store_after),
        content_addressed(&store_before),
        "the store's objects/images/refs differ after umount of a --cow mount"
    );
    assert!(
        !store_after
            .keys()
            .any(|p| p.starts_with("mounts") && p != Path::new("mounts")),
        "the --cow mount's upper dir was not removed at umount"
    );

    // The image itself is untouched: a fresh read-only mount has no bytecode, same tree.
    let m = env.mount("py/venv", &venv, &[]);
    assert!(!venv.join(&pkg).join("__pycache__").exists());
    assert_same_tree(&orig, &venv);
    assert_eq!(venv_outputs(&venv, false), before);
    m.umount();
}
