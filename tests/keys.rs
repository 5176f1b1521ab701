//! What keys a dependency tree, with real package managers on local fixtures (offline): each
//! change that alters the installed tree builds a new one (`velo status` says stale first), and
//! each change that does not reuses the tree. Installs are counted by a line the install
//! appends to `installs.log`. Every run has a clean environment of its own (a temp HOME, no
//! variable of the machine's but PATH), so nothing of the host keys a tree here.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Env, can_mount, describe, fixtures};

/// Where scripts/install-deps puts the package managers the machine may lack.
const TOOL_DIRS: &[&str] = &[
    "/opt/velo-tools/node/node_modules/.bin",
    "/opt/velo-tools/uv/bin",
];

/// The directory holding `tool`: in PATH, or one of [`TOOL_DIRS`]. Prints a SKIPPED line if
/// there is none.
fn tool_dir(test: &str, tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(TOOL_DIRS.iter().map(PathBuf::from))
        .find(|d| d.join(tool).is_file());
    if found.is_none() {
        eprintln!("SKIPPED {test}: `{tool}` is not installed (scripts/install-deps installs it)");
    }
    found
}

/// A project in a temp dir with a home of its own.
struct Case {
    env: Env,
    project: PathBuf,
    home: PathBuf,
    /// PATH for every run.
    path: String,
    /// Variables every run of this case sets.
    base: Vec<(String, String)>,
}

impl Case {
    fn new() -> Self {
        let env = Env::new();
        let project = env.path("home/proj");
        let home = env.path("home");
        fs::create_dir_all(&project).unwrap();
        Case {
            project,
            home,
            path: std::env::var("PATH").unwrap_or_default(),
            base: Vec::new(),
            env,
        }
    }

    fn with_tool_dir(&mut self, dir: &Path) {
        self.path = format!("{}:{}", dir.display(), self.path);
    }

    fn set(&mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) {
        self.base
            .push((k.into(), v.as_ref().to_string_lossy().into_owned()));
    }

    /// `velo ARGS…` in the project with only PATH, HOME, the case's variables and `vars`.
    fn velo(&self, vars: &[(&str, &str)], args: &[&str]) -> Command {
        let mut c = self.env.velo(args);
        c.current_dir(&self.project)
            .env_clear()
            .env("PATH", &self.path)
            .env("HOME", &self.home)
            .env("VELO_MOUNTD", "off");
        for (k, v) in &self.base {
            c.env(k, v);
        }
        for (k, v) in vars {
            c.env(k, v);
        }
        c
    }

    fn ok(&self, vars: &[(&str, &str)], args: &[&str]) -> String {
        let out: Output = self.velo(vars, args).output().unwrap();
        assert!(
            out.status.success(),
            "velo {args:?} with {vars:?} failed:\n{}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sh -c SCRIPT` under velo; its stdout.
    fn sh(&self, vars: &[(&str, &str)], script: &str) -> String {
        self.ok(vars, &["run", "sh", "-c", script])
    }

    /// Whether `velo status` says every dir is up to date.
    fn up_to_date(&self, vars: &[(&str, &str)]) -> bool {
        let out = self.ok(vars, &["--json", "status"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .all(|d| d["up_to_date"] == true)
    }

    /// `velo init`, then the install made to log each run first (`log` is what it appends).
    fn init(&self, vars: &[(&str, &str)], log: &str) {
        self.ok(vars, &["init"]);
        let toml = fs::read_to_string(self.project.join("velo.toml")).unwrap();
        assert!(toml.contains("install = \""), "{toml}");
        let toml = toml.replacen(
            "install = \"",
            &format!("install = \"echo {log} >> installs.log && "),
            1,
        );
        fs::write(self.project.join("velo.toml"), toml).unwrap();
    }

    fn installs(&self) -> Vec<String> {
        fs::read_to_string(self.project.join("installs.log"))
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn write(&self, rel: &str, text: &str) {
        let p = if let Some(h) = rel.strip_prefix("~/") {
            self.home.join(h)
        } else {
            self.project.join(rel)
        };
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// Asserts that with `vars` the tree is stale, then that a run builds it (once).
    fn rebuilds(&self, vars: &[(&str, &str)], what: &str) {
        let before = self.installs().len();
        assert!(
            !self.up_to_date(vars),
            "{what}: velo status says up to date"
        );
        self.ok(vars, &["run", "true"]);
        assert_eq!(self.installs().len(), before + 1, "{what}: no new build");
    }

    /// Asserts that with `vars` the tree is up to date and a run builds nothing.
    fn reuses(&self, vars: &[(&str, &str)], what: &str) {
        let before = self.installs().len();
        assert!(self.up_to_date(vars), "{what}: velo status says stale");
        self.ok(vars, &["run", "true"]);
        assert_eq!(self.installs().len(), before, "{what}: built again");
    }
}

/// An npm project depending on `vr-math` (with a bin) and, for development only, `vr-dev`;
/// its lockfile made offline.
fn npm_case() -> Case {
    let mut case = Case::new();
    let cache = case.env.path("npm-cache");
    let dir = case.env.dir.path();
    let math = fixtures::npm_tarball(
        dir,
        &cache,
        "vr-math",
        "1.0.0",
        r#""bin":{"vr-math":"cli.js"}"#,
        &[
            ("index.js", "exports.add = (a, b) => a + b;\n"),
            ("cli.js", "#!/usr/bin/env node\nconsole.log(42)\n"),
        ],
    );
    let dev = fixtures::npm_tarball(dir, &cache, "vr-dev", "1.0.0", "", &[("index.js", "")]);
    case.write(
        "package.json",
        &format!(
            r#"{{"name":"p","version":"1.0.0","private":true,"dependencies":{{"vr-math":"file:{}"}},"devDependencies":{{"vr-dev":"file:{}"}}}}"#,
            math.display(),
            dev.display()
        ),
    );
    let out = fixtures::npm(&case.project, &cache)
        .args(["install", "--package-lock-only", "--no-audit", "--no-fund"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    case.set("npm_config_cache", &cache);
    case.set("npm_config_offline", "true");
    case
}

/// npm: variables that only steer npm's output or the program at run time (`NODE_ENV=test`,
/// `npm_config_loglevel`, …) reuse the tree; `NODE_ENV=production`, which leaves
/// devDependencies out, builds a tree without them, and any other NODE_ENV is the first tree.
#[test]
fn npm_runtime_variables_reuse_the_tree_and_production_drops_dev_dependencies() {
    if !can_mount("npm_runtime_variables_reuse_the_tree_and_production_drops_dev_dependencies") {
        return;
    }
    let case = npm_case();
    case.init(&[], "built");
    assert_eq!(case.sh(&[], "ls node_modules"), "vr-dev\nvr-math\n");
    let runtime = [
        ("NODE_ENV", "test"),
        ("npm_config_loglevel", "warn"),
        ("NPM_CONFIG_FUND", "false"),
        ("npm_config_update_notifier", "false"),
    ];
    case.reuses(&runtime, "NODE_ENV=test and npm's output settings");
    assert_eq!(
        case.sh(&runtime, "echo $NODE_ENV"),
        "test\n",
        "the command still sees NODE_ENV"
    );
    let prod = [("NODE_ENV", "production")];
    case.rebuilds(&prod, "NODE_ENV=production");
    assert_eq!(case.sh(&prod, "ls node_modules"), "vr-math\n");
    case.reuses(&[("NODE_ENV", "development")], "NODE_ENV=development");
    assert_eq!(
        case.sh(&[("NODE_ENV", "development")], "ls node_modules"),
        "vr-dev\nvr-math\n"
    );
}

/// A pip project installing the vrgreet wheel by `file:` URL, offline, no pip config.
fn pip_case() -> Case {
    let mut case = Case::new();
    let wheel = fixtures::wheel(case.env.dir.path());
    case.write(
        "requirements.txt",
        &format!("vrgreet @ file://{}\n", wheel.display()),
    );
    case.set("PIP_NO_INDEX", "1");
    case.set("PIP_CONFIG_FILE", "/dev/null");
    case
}

/// pip: PYTHONPATH, PYTHONHASHSEED (a new seed each CI run), PYTHONDONTWRITEBYTECODE and
/// PYTHONWARNINGS do not key the venv — the install does not even see them — while the
/// command still gets them.
#[test]
fn python_runtime_variables_reuse_the_venv() {
    if !can_mount("python_runtime_variables_reuse_the_venv") {
        return;
    }
    let case = pip_case();
    let first = [
        ("PYTHONHASHSEED", "1"),
        ("PYTHONPATH", "/nonexistent"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("PYTHONWARNINGS", "ignore"),
    ];
    case.init(
        &first,
        "built:${PYTHONHASHSEED:-unset}:${PYTHONPATH:-unset}",
    );
    case.ok(&first, &["run", "true"]);
    assert_eq!(
        case.installs(),
        ["built:unset:unset"],
        "the install saw PYTHON*"
    );
    case.reuses(
        &[("PYTHONHASHSEED", "2"), ("PYTHONPATH", "/elsewhere")],
        "other seed",
    );
    case.reuses(&[], "no PYTHON* at all");
    let out = case.ok(
        &[("PYTHONHASHSEED", "77")],
        &[
            "run",
            ".venv/bin/python",
            "-c",
            "import os, vrgreet; print(os.environ['PYTHONHASHSEED'], vrgreet.something())",
        ],
    );
    assert_eq!(out, "77 vrgreet 1.2.3 says 907\n");
}

/// A pip project of wheels found in a local dir (`PIP_FIND_LINKS`): `vrgreet` 1.2.3 and
/// 1.2.4, `vrextra`, `vrdep`.
fn pip_links_case() -> Case {
    let mut case = Case::new();
    let links = case.env.path("wheels");
    for (name, version) in [
        ("vrgreet", "1.2.3"),
        ("vrgreet", "1.2.4"),
        ("vrextra", "1.0"),
        ("vrdep", "1.0"),
    ] {
        fixtures::wheel_named(
            &links,
            name,
            version,
            &[("__init__.py", &format!("VERSION = '{version}'\n"))],
        );
    }
    case.set("PIP_NO_INDEX", "1");
    case.set("PIP_CONFIG_FILE", "/dev/null");
    case.set("PIP_FIND_LINKS", &links);
    case
}

const VERSION_OF: &str = "import vrgreet; print(vrgreet.VERSION)";

/// pip: the files requirements.txt pulls in key the venv — a `-r` include, a `-c` constraints
/// file, and the pyproject.toml of `-e .` (a dependency added there is installed, not a
/// ModuleNotFoundError).
#[test]
fn pip_includes_constraints_and_the_editable_projects_metadata_key_the_venv() {
    if !can_mount("pip_includes_constraints_and_the_editable_projects_metadata_key_the_venv") {
        return;
    }
    let case = pip_links_case();
    case.write(
        "requirements.txt",
        "-r more/other.txt\n-c constraints.txt\n-e .\n",
    );
    case.write("more/other.txt", "vrgreet\n");
    case.write("constraints.txt", "vrgreet==1.2.3\n");
    case.write("tiny_backend.py", fixtures::TINY_BACKEND);
    case.write("vrproj/__init__.py", "NAME = 'vrproj'\n");
    let pyproject = |deps: &str| {
        format!(
            "[build-system]\nrequires = []\nbuild-backend = \"tiny_backend\"\nbackend-path = [\".\"]\n\n\
             [project]\nname = \"vrproj\"\nversion = \"0.1\"\ndependencies = [{deps}]\n"
        )
    };
    case.write("pyproject.toml", &pyproject(""));
    case.init(&[], "built");
    let py = |code: &str| case.ok(&[], &["run", ".venv/bin/python", "-c", code]);
    assert_eq!(py(&format!("import vrproj; {VERSION_OF}")), "1.2.3\n");

    case.write("constraints.txt", "vrgreet==1.2.4\n");
    case.rebuilds(&[], "a changed constraints file");
    assert_eq!(py(VERSION_OF), "1.2.4\n");

    case.write("more/other.txt", "vrgreet\nvrextra\n");
    case.rebuilds(&[], "a changed -r include");
    assert_eq!(py("import vrextra; print(vrextra.VERSION)"), "1.0\n");

    case.write("pyproject.toml", &pyproject("\"vrdep\""));
    case.rebuilds(
        &[],
        "a dependency added to the editable project's pyproject.toml",
    );
    assert_eq!(py("import vrdep; print(vrdep.VERSION)"), "1.0\n");

    // Its source is not an input: the editable install points at it.
    case.write("vrproj/__init__.py", "NAME = 'changed'\n");
    case.reuses(&[], "an edited module of the editable project");
    assert_eq!(py("import vrproj; print(vrproj.NAME)"), "changed\n");
}

/// pip: a `requirements/` dir (no requirements.txt at the root) is detected, and a file the
/// installed one includes keys the venv.
#[test]
fn a_requirements_dir_is_detected_and_its_includes_key_the_venv() {
    if !can_mount("a_requirements_dir_is_detected_and_its_includes_key_the_venv") {
        return;
    }
    let case = pip_links_case();
    case.write("requirements/base.txt", "vrgreet==1.2.3\n");
    case.write("requirements/dev.txt", "-r base.txt\nvrextra\n");
    case.init(&[], "built");
    let toml = fs::read_to_string(case.project.join("velo.toml")).unwrap();
    assert!(toml.contains("-r requirements/dev.txt\""), "{toml}");
    let code = format!("import vrextra; {VERSION_OF}");
    assert_eq!(
        case.ok(&[], &["run", ".venv/bin/python", "-c", &code]),
        "1.2.3\n"
    );
    case.write("requirements/base.txt", "vrgreet==1.2.4\n");
    case.rebuilds(&[], "a changed requirements/base.txt");
    assert_eq!(
        case.ok(&[], &["run", ".venv/bin/python", "-c", &code]),
        "1.2.4\n"
    );
}

/// npm: the user config (`~/.npmrc`) and the global one (`$PREFIX/etc/npmrc`) key the tree —
/// `bin-links=false` in either builds a tree without `node_modules/.bin`.
#[test]
fn npm_user_and_global_config_key_the_tree() {
    if !can_mount("npm_user_and_global_config_key_the_tree") {
        return;
    }
    let mut case = npm_case();
    let prefix = case.env.path("prefix");
    case.set("PREFIX", &prefix);
    case.init(&[], "built");
    let bins = |case: &Case| case.sh(&[], "ls node_modules/.bin 2>/dev/null || echo none");
    assert_eq!(bins(&case), "vr-math\n");
    case.write("~/.npmrc", "bin-links=false\n");
    case.rebuilds(&[], "bin-links=false in ~/.npmrc");
    assert_eq!(bins(&case), "none\n");
    fs::remove_file(case.home.join(".npmrc")).unwrap();
    case.reuses(&[], "~/.npmrc gone again");
    fs::create_dir_all(prefix.join("etc")).unwrap();
    fs::write(prefix.join("etc/npmrc"), "bin-links=false\n").unwrap();
    case.rebuilds(&[], "bin-links=false in $PREFIX/etc/npmrc");
    assert_eq!(bins(&case), "none\n");
}

/// pip: the user's config (`$XDG_CONFIG_HOME/pip/pip.conf`, here `~/.config`) and the
/// system's (`$XDG_CONFIG_DIRS/pip/pip.conf`) key the venv — `compile = false` in either
/// builds a venv without bytecode.
#[test]
fn pip_user_and_system_config_key_the_venv() {
    if !can_mount("pip_user_and_system_config_key_the_venv") {
        return;
    }
    let mut case = pip_case();
    case.base.retain(|(k, _)| k != "PIP_CONFIG_FILE");
    let xdg = case.env.path("xdg");
    case.set("XDG_CONFIG_DIRS", &xdg);
    case.init(&[], "built");
    let pyc = |case: &Case| case.sh(&[], "ls .venv/lib/*/site-packages/vrgreet/");
    assert!(pyc(&case).contains("__pycache__"), "{}", pyc(&case));
    let no_compile = "[install]\ncompile = false\n";
    case.write("~/.config/pip/pip.conf", no_compile);
    case.rebuilds(&[], "compile = false in the user's pip.conf");
    assert_eq!(pyc(&case), "__init__.py\n");
    fs::remove_file(case.home.join(".config/pip/pip.conf")).unwrap();
    case.reuses(&[], "the user's pip.conf gone again");
    fs::create_dir_all(xdg.join("pip")).unwrap();
    fs::write(xdg.join("pip/pip.conf"), no_compile).unwrap();
    case.rebuilds(&[], "compile = false in the system's pip.conf");
    assert_eq!(pyc(&case), "__init__.py\n");
}

/// The npm fixture's package.json (vr-math only, by `file:` tarball) for another package
/// manager, which makes the lockfile itself; `cache` is npm's cache (for packing).
fn node_case(tool: &Path) -> Case {
    let mut case = Case::new();
    case.with_tool_dir(tool);
    let cache = case.env.path("npm-cache");
    let math = fixtures::npm_tarball(
        case.env.dir.path(),
        &cache,
        "vr-math",
        "1.0.0",
        r#""bin":{"vr-math":"cli.js"}"#,
        &[
            ("index.js", "exports.add = (a, b) => a + b;\n"),
            ("cli.js", "#!/usr/bin/env node\nconsole.log(42)\n"),
        ],
    );
    case.write(
        "package.json",
        &format!(
            r#"{{"name":"p","version":"1.0.0","private":true,"dependencies":{{"vr-math":"file:{}"}}}}"#,
            math.display()
        ),
    );
    case
}

/// Runs `program ARGS…` in the case's project with its environment (PATH, HOME, variables).
fn in_project(case: &Case, program: &str, args: &[&str]) {
    let mut c = Command::new(program);
    c.args(args)
        .current_dir(&case.project)
        .env_clear()
        .env("PATH", &case.path)
        .env("HOME", &case.home);
    for (k, v) in &case.base {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}:\n{}",
        describe(&out)
    );
}

/// pnpm: its global rc (`$XDG_CONFIG_HOME/pnpm/rc`, here `~/.config/pnpm/rc`) keys the tree —
/// `node-linker=hoisted` there builds a tree without pnpm's symlinks.
#[test]
fn pnpm_global_rc_keys_the_tree() {
    let test = "pnpm_global_rc_keys_the_tree";
    if !can_mount(test) {
        return;
    }
    let Some(tool) = tool_dir(test, "pnpm") else {
        return;
    };
    let mut case = node_case(&tool);
    case.set("npm_config_store_dir", case.env.path("pnpm-store"));
    in_project(&case, "pnpm", &["install", "--lockfile-only", "--offline"]);
    case.init(&[], "built");
    let linked = |case: &Case| {
        case.sh(
            &[],
            "test -L node_modules/vr-math && echo symlink || echo dir",
        )
    };
    assert_eq!(linked(&case), "symlink\n");
    case.write("~/.config/pnpm/rc", "node-linker=hoisted\n");
    case.rebuilds(&[], "node-linker=hoisted in pnpm's global rc");
    assert_eq!(linked(&case), "dir\n");
    fs::remove_file(case.home.join(".config/pnpm/rc")).unwrap();
    case.reuses(&[], "pnpm's global rc gone again");
}

/// yarn (classic): a `.yarnrc` in a parent of the project keys the tree —
/// `--install.no-bin-links true` there builds a tree without `node_modules/.bin`.
#[test]
fn a_yarnrc_above_the_project_keys_the_tree() {
    let test = "a_yarnrc_above_the_project_keys_the_tree";
    if !can_mount(test) {
        return;
    }
    let Some(tool) = tool_dir(test, "yarn") else {
        return;
    };
    let mut case = node_case(&tool);
    case.set("YARN_CACHE_FOLDER", case.env.path("yarn-cache"));
    in_project(&case, "yarn", &["install", "--offline", "--no-bin-links"]);
    fs::remove_dir_all(case.project.join("node_modules")).unwrap();
    case.init(&[], "built");
    let bins = |case: &Case| case.sh(&[], "ls node_modules/.bin 2>/dev/null || echo none");
    assert_eq!(bins(&case), "vr-math\n");
    let above = case.env.dir.path().join(".yarnrc");
    fs::write(&above, "--install.no-bin-links true\n").unwrap();
    case.rebuilds(&[], "--install.no-bin-links in a .yarnrc above the project");
    assert_eq!(bins(&case), "none\n");
    fs::remove_file(&above).unwrap();
    case.write("~/.yarnrc", "--install.no-bin-links true\n");
    case.rebuilds(&[], "--install.no-bin-links in ~/.yarnrc");
    assert_eq!(bins(&case), "none\n");
}

/// uv: the user's config (`~/.config/uv/uv.toml`), the system's (`$XDG_CONFIG_DIRS/uv/uv.toml`)
/// and `UV_CONFIG_FILE`'s key the venv — `link-mode = "symlink"` builds a venv of symlinks.
#[test]
fn uv_user_and_system_config_key_the_venv() {
    let test = "uv_user_and_system_config_key_the_venv";
    if !can_mount(test) {
        return;
    }
    let Some(tool) = tool_dir(test, "uv") else {
        return;
    };
    let mut case = Case::new();
    case.with_tool_dir(&tool);
    let wheel = fixtures::wheel(case.env.dir.path());
    let xdg = case.env.path("xdg");
    case.set("XDG_CONFIG_DIRS", &xdg);
    case.set("UV_PYTHON_DOWNLOADS", "never");
    case.set("UV_OFFLINE", "1");
    case.write(
        "pyproject.toml",
        &format!(
            "[project]\nname = \"u\"\nversion = \"0.1\"\nrequires-python = \">=3.8\"\n\
             dependencies = [\"vrgreet\"]\n[tool.uv]\npackage = false\n\
             [tool.uv.sources]\nvrgreet = {{ path = \"{}\" }}\n",
            wheel.display()
        ),
    );
    in_project(&case, "uv", &["lock"]);
    case.init(&[], "built");
    let linked = |case: &Case| {
        case.sh(
            &[],
            "test -L .venv/lib/python3*/site-packages/vrgreet/__init__.py && echo symlink || echo file",
        )
    };
    assert_eq!(linked(&case), "file\n");
    let symlinks = "link-mode = \"symlink\"\n";
    case.write("~/.config/uv/uv.toml", symlinks);
    case.rebuilds(&[], "link-mode in the user's uv.toml");
    assert_eq!(linked(&case), "symlink\n");
    fs::remove_file(case.home.join(".config/uv/uv.toml")).unwrap();
    case.reuses(&[], "the user's uv.toml gone again");
    fs::create_dir_all(xdg.join("uv")).unwrap();
    fs::write(xdg.join("uv/uv.toml"), symlinks).unwrap();
    case.rebuilds(&[], "link-mode in the system's uv.toml");
    assert_eq!(linked(&case), "symlink\n");
    fs::remove_file(xdg.join("uv/uv.toml")).unwrap();
    let file = case.env.path("uv-config.toml");
    fs::write(&file, "link-mode = \"copy\"\n").unwrap();
    let vars = [("UV_CONFIG_FILE", file.to_str().unwrap())];
    case.rebuilds(&vars, "UV_CONFIG_FILE");
    fs::write(&file, symlinks).unwrap();
    case.rebuilds(&vars, "a changed UV_CONFIG_FILE");
    assert_eq!(
        case.sh(
            &vars,
            "test -L .venv/lib/python3*/site-packages/vrgreet/__init__.py && echo symlink"
        ),
        "symlink\n"
    );
}

/// A local cargo registry at `dir` holding the crate `vrc` 0.1.0 (packaged offline).
fn cargo_registry(dir: &Path, cargo_home: &Path) {
    let src = dir.join("vrc-src");
    fs::create_dir_all(src.join("src")).unwrap();
    fs::write(
        src.join("Cargo.toml"),
        "[package]\nname = \"vrc\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
         description = \"test\"\nlicense = \"MIT\"\n",
    )
    .unwrap();
    fs::write(src.join("src/lib.rs"), "pub fn one() -> u32 { 1 }\n").unwrap();
    let out = Command::new("cargo")
        .args([
            "package",
            "--no-verify",
            "--allow-dirty",
            "--offline",
            "--quiet",
        ])
        .current_dir(&src)
        .env("CARGO_HOME", cargo_home)
        .env("CARGO_TARGET_DIR", src.join("target"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let krate = fs::read(src.join("target/package/vrc-0.1.0.crate")).unwrap();
    let reg = dir.join("registry");
    fs::create_dir_all(reg.join("index/3/v")).unwrap();
    fs::write(reg.join("vrc-0.1.0.crate"), &krate).unwrap();
    let sum = {
        let out = Command::new("sha256sum")
            .arg(reg.join("vrc-0.1.0.crate"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    fs::write(
        reg.join("index/3/v/vrc"),
        format!(
            "{{\"name\":\"vrc\",\"vers\":\"0.1.0\",\"deps\":[],\"cksum\":\"{sum}\",\
             \"features\":{{}},\"yanked\":false}}\n"
        ),
    )
    .unwrap();
}

/// cargo: `~/.cargo/config.toml` keys the Cargo home when cargo reads it (the project is
/// under the home: it is a parent's config) — here it names the registry the crates come
/// from, and another registry's crates unpack elsewhere.
#[test]
fn a_cargo_config_above_the_project_keys_the_cargo_home() {
    let test = "a_cargo_config_above_the_project_keys_the_cargo_home";
    if !can_mount(test) {
        return;
    }
    let Some(_) = tool_dir(test, "cargo") else {
        return;
    };
    let mut case = Case::new();
    // rustup's proxies find their toolchains in the real home.
    let rustup = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")))
        .unwrap();
    case.set("RUSTUP_HOME", &rustup);
    let dir = case.env.path("cargo");
    cargo_registry(&dir, &case.env.path("cargo-home-for-packaging"));
    let copy = case.env.path("cargo/registry2");
    fs::create_dir_all(&copy).unwrap();
    let out = Command::new("cp")
        .arg("-a")
        .arg(dir.join("registry/."))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let config = |reg: &Path| {
        format!(
            "[source.crates-io]\nreplace-with = \"vr\"\n[source.vr]\nlocal-registry = \"{}\"\n",
            reg.display()
        )
    };
    case.write("~/.cargo/config.toml", &config(&dir.join("registry")));
    case.write(
        "Cargo.toml",
        "[package]\nname = \"proj\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
         [dependencies]\nvrc = \"0.1\"\n",
    );
    case.write("src/main.rs", "fn main() {}\n");
    let home = case.env.path("lock-cargo-home");
    let mut lock = Command::new("cargo");
    lock.args(["generate-lockfile", "--offline"])
        .current_dir(&case.project)
        .env("CARGO_HOME", &home)
        .env("RUSTUP_HOME", &rustup);
    let out = lock.output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    case.init(&[], "built");
    let unpacked = |case: &Case| case.sh(&[], "ls .cargo-home/registry/src");
    let first = unpacked(&case);
    case.write("~/.cargo/config.toml", &config(&copy));
    case.rebuilds(&[], "another registry in ~/.cargo/config.toml");
    assert_ne!(unpacked(&case), first);
    case.write("~/.cargo/config.toml", &config(&dir.join("registry")));
    case.reuses(&[], "the first registry again");
}

/// pyenv: the Python behind the `python3` shim keys the venv. Switching the project's
/// `.python-version` builds a venv of the other Python (not a stale one of the first), going
/// back reuses the first, and `PYENV_VERSION` picking the second reuses the second's venv.
#[test]
fn the_python_behind_a_pyenv_shim_keys_the_venv() {
    let test = "the_python_behind_a_pyenv_shim_keys_the_venv";
    if !can_mount(test) {
        return;
    }
    let pyenv = Command::new("pyenv").arg("root").output();
    let Ok(root) = pyenv.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()) else {
        eprintln!("SKIPPED {test}: pyenv is not installed");
        return;
    };
    // Two installed Pythons of different minor versions.
    let mut picked: Vec<(String, String)> = Vec::new();
    let versions = fs::read_dir(Path::new(&root).join("versions"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_else(|_| Vec::<String>::new());
    let mut versions = versions;
    versions.sort();
    for v in versions {
        let mut parts = v.split('.');
        let (Some("3"), Some(minor)) = (parts.next(), parts.next()) else {
            continue;
        };
        if minor.parse::<u32>().is_ok_and(|m| m >= 9) && !picked.iter().any(|(_, m)| m == minor) {
            picked.push((v.clone(), minor.to_owned()));
        }
    }
    if picked.len() < 2 {
        eprintln!("SKIPPED {test}: pyenv has fewer than two Pythons 3.9+ ({picked:?})");
        return;
    }
    let (a, b) = (&picked[0], &picked[1]);
    let mut case = pip_case();
    case.path = format!("{root}/shims:{}", case.path);
    case.write(".python-version", &format!("{}\n", a.0));
    case.init(&[], "built");
    let minor = |case: &Case, vars: &[(&str, &str)]| {
        case.ok(
            vars,
            &[
                "run",
                ".venv/bin/python",
                "-c",
                "import sys, vrgreet; print(sys.version_info[1])",
            ],
        )
    };
    assert_eq!(minor(&case, &[]), format!("{}\n", a.1));
    case.write(".python-version", &format!("{}\n", b.0));
    case.rebuilds(&[], "another Python in .python-version");
    assert_eq!(minor(&case, &[]), format!("{}\n", b.1));
    case.write(".python-version", &format!("{}\n", a.0));
    case.reuses(&[], "the first Python again");
    assert_eq!(minor(&case, &[]), format!("{}\n", a.1));
    let vars = [("PYENV_VERSION", b.0.as_str())];
    case.reuses(&vars, "PYENV_VERSION naming the second Python");
    assert_eq!(minor(&case, &vars), format!("{}\n", b.1));
}

/// A sparse cargo registry served over HTTP on 127.0.0.1 by a small Python server that logs
/// each path it serves; stopped (by its pid) on drop.
struct SparseRegistry {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

const SERVE: &str = r#"
import http.server, sys
root, portfile, log = sys.argv[1], sys.argv[2], sys.argv[3]
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
    def log_message(self, fmt, *args):
        with open(log, "a") as f:
            f.write(self.path + "\n")
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
open(portfile + ".tmp", "w").write(str(s.server_address[1]))
import os; os.rename(portfile + ".tmp", portfile)
s.serve_forever()
"#;

impl SparseRegistry {
    fn start(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("index")).unwrap();
        let portfile = dir.join("port");
        let child = Command::new("python3")
            .args(["-c", SERVE])
            .arg(dir)
            .arg(&portfile)
            .arg(dir.join("log"))
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let port = loop {
            if let Ok(p) = fs::read_to_string(&portfile) {
                break p.trim().parse().unwrap();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the registry did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        fs::write(
            dir.join("index/config.json"),
            format!("{{\"dl\":\"http://127.0.0.1:{port}/dl/{{crate}}-{{version}}.crate\"}}"),
        )
        .unwrap();
        SparseRegistry {
            child,
            dir: dir.to_owned(),
            port,
        }
    }

    /// Packages a crate `name` 0.1.0 (4+ letters) into the registry.
    fn publish(&self, name: &str, cargo_home: &Path) {
        let src = self.dir.join("src").join(name);
        fs::create_dir_all(src.join("src")).unwrap();
        fs::write(
            src.join("Cargo.toml"),
            format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
                 description = \"test\"\nlicense = \"MIT\"\n"
            ),
        )
        .unwrap();
        fs::write(src.join("src/lib.rs"), "pub fn one() -> u32 { 1 }\n").unwrap();
        let out = Command::new("cargo")
            .args([
                "package",
                "--no-verify",
                "--allow-dirty",
                "--offline",
                "--quiet",
            ])
            .current_dir(&src)
            .env("CARGO_HOME", cargo_home)
            .env("CARGO_TARGET_DIR", src.join("target"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        let file = format!("{name}-0.1.0.crate");
        fs::create_dir_all(self.dir.join("dl")).unwrap();
        fs::copy(
            src.join("target/package").join(&file),
            self.dir.join("dl").join(&file),
        )
        .unwrap();
        let out = Command::new("sha256sum")
            .arg(self.dir.join("dl").join(&file))
            .output()
            .unwrap();
        let sum = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        let entry = self
            .dir
            .join("index")
            .join(&name[..2])
            .join(&name[2..4])
            .join(name);
        fs::create_dir_all(entry.parent().unwrap()).unwrap();
        fs::write(
            entry,
            format!(
                "{{\"name\":\"{name}\",\"vers\":\"0.1.0\",\"deps\":[],\"cksum\":\"{sum}\",\
                 \"features\":{{}},\"yanked\":false}}\n"
            ),
        )
        .unwrap();
    }

    /// The crates downloaded so far (their file names, in order).
    fn downloads(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("/dl/"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for SparseRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// cargo: a changed Cargo.lock builds a new Cargo home starting from the project's previous
/// one, so only the crate added downloads; a crate dropped from the lockfile is pruned from
/// the new tree.
#[test]
fn a_changed_cargo_lock_downloads_only_the_new_crates() {
    let test = "a_changed_cargo_lock_downloads_only_the_new_crates";
    if !can_mount(test) {
        return;
    }
    let Some(_) = tool_dir(test, "cargo") else {
        return;
    };
    let mut case = Case::new();
    let rustup = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")))
        .unwrap();
    case.set("RUSTUP_HOME", &rustup);
    let reg = SparseRegistry::start(&case.env.path("registry"));
    let packaging = case.env.path("cargo-home-for-packaging");
    reg.publish("vrone", &packaging);
    reg.publish("vrtwo", &packaging);
    case.write(
        ".cargo/config.toml",
        &format!(
            "[source.crates-io]\nreplace-with = \"vr\"\n[source.vr]\n\
             registry = \"sparse+http://127.0.0.1:{}/index/\"\n",
            reg.port
        ),
    );
    case.write("src/main.rs", "fn main() {}\n");
    let lock_home = case.env.path("lock-cargo-home");
    let deps = |case: &Case, deps: &str| {
        case.write(
            "Cargo.toml",
            &format!(
                "[package]\nname = \"proj\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
                 [dependencies]\n{deps}"
            ),
        );
        let out = Command::new("cargo")
            .args(["generate-lockfile"])
            .current_dir(&case.project)
            .env("CARGO_HOME", &lock_home)
            .env("RUSTUP_HOME", &rustup)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
    };
    deps(&case, "vrone = \"0.1\"\n");
    case.init(&[], "built");
    let crates = |case: &Case| case.sh(&[], "ls .cargo-home/registry/cache/*/");
    assert_eq!(crates(&case), "vrone-0.1.0.crate\n");
    assert_eq!(reg.downloads(), ["vrone-0.1.0.crate"]);

    deps(&case, "vrone = \"0.1\"\nvrtwo = \"0.1\"\n");
    case.rebuilds(&[], "a crate added to Cargo.lock");
    assert_eq!(
        reg.downloads(),
        ["vrone-0.1.0.crate", "vrtwo-0.1.0.crate"],
        "only the new crate downloads"
    );
    assert_eq!(crates(&case), "vrone-0.1.0.crate\nvrtwo-0.1.0.crate\n");

    deps(&case, "vrtwo = \"0.1\"\n");
    case.rebuilds(&[], "a crate dropped from Cargo.lock");
    assert_eq!(reg.downloads().len(), 2, "nothing downloads");
    assert_eq!(
        crates(&case),
        "vrtwo-0.1.0.crate\n",
        "the dropped crate is pruned"
    );
}

/// A seeded entry (`seed = true`, which `velo init` writes for cargo) starts its install from
/// the tree last built for the same dir of the project — as root, and as an ordinary user
/// through velo-mountd (which lends the previous tree as a writable overlay).
#[test]
fn a_seeded_entry_starts_from_the_previous_tree_as_root_and_as_a_user() {
    use common::mountd::{Mountd, TestUser};
    use std::os::unix::fs::PermissionsExt;
    if !can_mount("a_seeded_entry_starts_from_the_previous_tree_as_root_and_as_a_user") {
        return;
    }
    let toml = "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\ninputs = [\"deps.lock\"]\n\
                install = \"echo built >> installs.log && cat deps.lock >> deps/history\"\n\
                seed = true\n";
    // As root.
    let case = Case::new();
    case.write("velo.toml", toml);
    case.write("deps.lock", "v1\n");
    assert_eq!(case.sh(&[], "cat deps/history"), "v1\n");
    case.write("deps.lock", "v2\n");
    case.rebuilds(&[], "a changed deps.lock");
    assert_eq!(case.sh(&[], "cat deps/history"), "v1\nv2\n");

    // As an ordinary user.
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mountd = Mountd::start(&env);
    let user = TestUser::create("seed", env.dir.path());
    let project = env.path("proj");
    fs::create_dir_all(&project).unwrap();
    fs::write(project.join("velo.toml"), toml).unwrap();
    fs::write(project.join("deps.lock"), "v1\n").unwrap();
    user.own(&project);
    let history = || {
        let out = user
            .velo(&mountd, &project, &["run", "cat", "deps/history"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(history(), "v1\n");
    fs::write(project.join("deps.lock"), "v2\n").unwrap();
    assert_eq!(history(), "v1\nv2\n");
    let log = fs::read_to_string(project.join("installs.log")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
}

/// A dir holding only `tool` (a symlink to `target`), for PATH: a tool installed in a venv of
/// its own comes without that venv's `python3` shadowing the machine's. `None` (and a SKIPPED
/// line) if `target` is not installed.
fn lone_tool(test: &str, env: &Env, tool: &str, target: &str) -> Option<PathBuf> {
    if !Path::new(target).is_file() {
        eprintln!("SKIPPED {test}: {target} is not installed (scripts/install-deps installs it)");
        return None;
    }
    let dir = env.path(&format!("tool-{tool}"));
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(target, dir.join(tool)).unwrap();
    Some(dir)
}

/// `velo ARGS…` in the case's project: its stdout and stderr, failing the test if it fails.
fn outputs(case: &Case, vars: &[(&str, &str)], args: &[&str]) -> (String, String) {
    let out = case.velo(vars, args).output().unwrap();
    assert!(
        out.status.success(),
        "velo {args:?} with {vars:?} failed:\n{}",
        describe(&out)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A uv project that is itself a package (the in-tree tiny backend, so it builds offline),
/// depending on nothing; locked. uv installs it into the venv as an editable.
fn uv_package_case(test: &str) -> Option<Case> {
    let tool = tool_dir(test, "uv")?;
    let mut case = Case::new();
    case.with_tool_dir(&tool);
    case.set("UV_PYTHON_DOWNLOADS", "never");
    case.set("UV_OFFLINE", "1");
    case.write("tiny_backend.py", fixtures::TINY_BACKEND);
    case.write("vrproj/__init__.py", "NAME = 'vrproj'\n");
    case.write(
        "pyproject.toml",
        "[build-system]\nrequires = []\nbuild-backend = \"tiny_backend\"\nbackend-path = [\".\"]\n\n\
         [project]\nname = \"vrproj\"\nversion = \"0.1\"\nrequires-python = \">=3.11\"\n\
         dependencies = []\n",
    );
    in_project(&case, "uv", &["lock"]);
    Some(case)
}

/// uv: `uv run` through velo after a content-neutral touch of pyproject.toml (its ctime
/// changes, as on a fresh clone) does not reinstall the project — not once, and not on every
/// run (a reinstall lands in the run's upper, dropped at exit) — while the tree is reused.
#[test]
fn uv_run_after_a_touch_of_pyproject_does_not_reinstall_the_project() {
    let test = "uv_run_after_a_touch_of_pyproject_does_not_reinstall_the_project";
    if !can_mount(test) {
        return;
    }
    let Some(case) = uv_package_case(test) else {
        return;
    };
    case.init(&[], "built");
    let uv_run = [
        "run",
        "uv",
        "run",
        "python",
        "-c",
        "import vrproj; print(vrproj.NAME)",
    ];
    let (out, _) = outputs(&case, &[], &uv_run);
    assert_eq!(out, "vrproj\n");
    let pyproject = case.project.join("pyproject.toml");
    let text = fs::read(&pyproject).unwrap();
    fs::write(&pyproject, &text).unwrap(); // the same bytes: a new ctime and mtime
    for run in ["first", "second"] {
        let (out, err) = outputs(&case, &[], &uv_run);
        assert_eq!(out, "vrproj\n", "{run} run");
        for said in ["Installed", "Uninstalled", "Building", "Built"] {
            assert!(
                !err.contains(said),
                "{run} run after a touch of pyproject.toml: uv reinstalled the project:\n{err}"
            );
        }
    }
    assert_eq!(case.installs().len(), 1, "the tree is reused");
    // A change uv must see still reaches it: a new version is installed by `uv run` (into
    // the run's upper: the tree is keyed by pyproject.toml and rebuilt by the next run).
    fs::write(
        &pyproject,
        String::from_utf8_lossy(&text).replace("version = \"0.1\"", "version = \"0.2\""),
    )
    .unwrap();
    in_project(&case, "uv", &["lock"]);
    case.rebuilds(&[], "a new version in pyproject.toml");
}

/// uv, as an ordinary user through velo-mountd (the run's overlay is one the service lends):
/// after a content-neutral touch of pyproject.toml, `uv run` through velo does not reinstall
/// the project, twice in a row.
#[test]
fn uv_run_as_a_user_after_a_touch_of_pyproject_does_not_reinstall_the_project() {
    use common::mountd::{Mountd, TestUser};
    use std::os::unix::fs::PermissionsExt;
    let test = "uv_run_as_a_user_after_a_touch_of_pyproject_does_not_reinstall_the_project";
    if !can_mount(test) {
        return;
    }
    let Some(uv) = tool_dir(test, "uv") else {
        return;
    };
    // The user may not read root's Pythons (pyenv's live under /root): the system's.
    let python = Path::new("/usr/bin/python3");
    if !python.is_file() {
        eprintln!("SKIPPED {test}: no /usr/bin/python3 for the user");
        return;
    }
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let tool = lone_tool(test, &env, "uv", uv.join("uv").to_str().unwrap()).unwrap();
    let mountd = Mountd::start(&env);
    let user = TestUser::create("uvrec", env.dir.path());
    let project = env.path("proj");
    for (rel, text) in [
        ("tiny_backend.py", fixtures::TINY_BACKEND),
        ("vrproj/__init__.py", "NAME = 'vrproj'\n"),
        (
            "pyproject.toml",
            "[build-system]\nrequires = []\nbuild-backend = \"tiny_backend\"\n\
             backend-path = [\".\"]\n\n[project]\nname = \"vrproj\"\nversion = \"0.1\"\n\
             requires-python = \">=3.11\"\ndependencies = []\n",
        ),
    ] {
        fs::create_dir_all(project.join(rel).parent().unwrap()).unwrap();
        fs::write(project.join(rel), text).unwrap();
    }
    let path = format!("{}:/usr/bin:/bin", tool.display());
    let vars = [
        ("PATH", path.as_str()),
        ("UV_PYTHON", "/usr/bin/python3"),
        ("UV_PYTHON_DOWNLOADS", "never"),
        ("UV_OFFLINE", "1"),
    ];
    let out = Command::new("uv")
        .arg("lock")
        .current_dir(&project)
        .env_clear()
        .envs(vars)
        .env("UV_CACHE_DIR", env.path("uv-cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "uv lock: {}", describe(&out));
    user.own(&project);
    let velo = |args: &[&str]| {
        let out = user
            .velo(&mountd, &project, args)
            .envs(vars)
            .output()
            .unwrap();
        assert!(out.status.success(), "velo {args:?}:\n{}", describe(&out));
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    velo(&["init"]);
    let uv_run = [
        "run",
        "uv",
        "run",
        "python",
        "-c",
        "import vrproj; print(vrproj.NAME)",
    ];
    assert_eq!(velo(&uv_run).0, "vrproj\n");
    let pyproject = project.join("pyproject.toml");
    fs::write(&pyproject, fs::read(&pyproject).unwrap()).unwrap(); // same bytes, new ctime
    for run in ["first", "second"] {
        let (out, err) = velo(&uv_run);
        assert_eq!(out, "vrproj\n", "{run} run");
        for said in ["Installed", "Uninstalled", "Building", "Built"] {
            assert!(
                !err.contains(said),
                "{run} run after a touch of pyproject.toml: uv reinstalled the project:\n{err}"
            );
        }
    }
}

/// uv: a build through velo installs into a tmpfs, another filesystem than uv's cache, and
/// says nothing a plain install would not — no "Failed to hardlink files" — unless the user
/// chose hardlinks themselves (`UV_LINK_MODE=hardlink`), which velo leaves in force.
#[test]
fn a_uv_build_warns_about_hardlinks_only_if_the_user_chose_them() {
    let test = "a_uv_build_warns_about_hardlinks_only_if_the_user_chose_them";
    if !can_mount(test) {
        return;
    }
    let Some(tool) = tool_dir(test, "uv") else {
        return;
    };
    let mut case = Case::new();
    case.with_tool_dir(&tool);
    let wheel = fixtures::wheel(case.env.dir.path());
    case.set("UV_PYTHON_DOWNLOADS", "never");
    case.set("UV_OFFLINE", "1");
    case.write(
        "pyproject.toml",
        &format!(
            "[project]\nname = \"u\"\nversion = \"0.1\"\nrequires-python = \">=3.8\"\n\
             dependencies = [\"vrgreet\"]\n[tool.uv]\npackage = false\n\
             [tool.uv.sources]\nvrgreet = {{ path = \"{}\" }}\n",
            wheel.display()
        ),
    );
    in_project(&case, "uv", &["lock"]);
    case.init(&[], "built");
    let (_, err) = outputs(&case, &[], &["run", "true"]);
    assert_eq!(case.installs().len(), 1, "built");
    assert!(err.contains("vrgreet"), "the install's own output: {err}");
    assert!(
        !err.contains("Failed to hardlink"),
        "uv's hardlink warning on a build through velo:\n{err}"
    );
    let vars = [("UV_LINK_MODE", "hardlink")];
    let (_, err) = outputs(&case, &vars, &["run", "true"]);
    assert_eq!(case.installs().len(), 2, "UV_LINK_MODE keys the tree");
    assert!(
        err.contains("Failed to hardlink"),
        "the user's UV_LINK_MODE=hardlink was not left in force:\n{err}"
    );
}

/// Poetry: a cold build through velo says nothing a plain `poetry install` into a fresh
/// checkout would not (velo's empty mount point is no "broken" venv), and poetry's user
/// config (`~/.config/pypoetry/config.toml`) keys the venv — `virtualenvs.options.no-pip`
/// there builds a venv without pip; without it, the first venv again.
#[test]
fn a_poetry_build_says_what_a_plain_install_says_and_its_user_config_keys_the_venv() {
    let test = "a_poetry_build_says_what_a_plain_install_says_and_its_user_config_keys_the_venv";
    if !can_mount(test) {
        return;
    }
    let mut case = Case::new();
    let Some(tool) = lone_tool(
        test,
        &case.env,
        "poetry",
        "/opt/velo-tools/poetry/bin/poetry",
    ) else {
        return;
    };
    case.with_tool_dir(&tool);
    let wheel = fixtures::wheel(case.env.dir.path());
    case.write(
        "pyproject.toml",
        &format!(
            "[tool.poetry]\npackage-mode = false\n\n[tool.poetry.dependencies]\n\
             python = \">=3.8\"\nvrgreet = {{ path = \"{}\" }}\n",
            wheel.display()
        ),
    );
    in_project(&case, "poetry", &["lock", "--no-interaction"]);
    // (`poetry lock` makes a venv to resolve with: a fresh checkout has none.)
    let _ = fs::remove_dir_all(case.project.join(".venv"));
    case.init(&[], "built");
    let (_, err) = outputs(&case, &[], &["run", "true"]);
    assert_eq!(case.installs().len(), 1, "built");
    assert!(err.contains("Installing vrgreet"), "poetry's output: {err}");
    for not_said in ["seems to be broken", "Recreating"] {
        assert!(
            !err.contains(not_said),
            "a cold build through velo says {not_said:?}, a plain install does not:\n{err}"
        );
    }
    assert!(
        err.contains(&format!(
            "Creating virtualenv non-package-mode in {}",
            case.project.join(".venv").display()
        )),
        "{err}"
    );
    let pip = |case: &Case| {
        case.sh(
            &[],
            "test -d .venv/lib/python3*/site-packages/pip && echo pip || echo none",
        )
    };
    assert_eq!(pip(&case), "pip\n");
    case.write(
        "~/.config/pypoetry/config.toml",
        "[virtualenvs.options]\nno-pip = true\n",
    );
    case.rebuilds(&[], "virtualenvs.options.no-pip in poetry's user config");
    assert_eq!(pip(&case), "none\n");
    fs::remove_file(case.home.join(".config/pypoetry/config.toml")).unwrap();
    case.reuses(&[], "poetry's user config gone again");
    assert_eq!(pip(&case), "pip\n");
}

/// Yarn Berry (`.yarnrc.yml`, `nodeLinker: node-modules`): the user's `~/.yarnrc.yml` keys
/// the tree — `enableScripts: true` there builds a tree where the dependency's postinstall
/// ran; without it, the first tree again.
#[test]
fn yarn_berrys_user_rc_keys_the_tree() {
    let test = "yarn_berrys_user_rc_keys_the_tree";
    if !can_mount(test) {
        return;
    }
    let mut case = Case::new();
    let Some(tool) = lone_tool(
        test,
        &case.env,
        "yarn",
        "/opt/velo-tools/yarn-berry/node_modules/@yarnpkg/cli-dist/bin/yarn.js",
    ) else {
        return;
    };
    case.with_tool_dir(&tool);
    case.set("YARN_ENABLE_TELEMETRY", "0");
    let math = fixtures::npm_tarball(
        case.env.dir.path(),
        &case.env.path("npm-cache"),
        "vr-math",
        "1.0.0",
        r#""scripts":{"postinstall":"node -e \"require('fs').writeFileSync('built.txt','')\""}"#,
        &[("index.js", "exports.add = (a, b) => a + b;\n")],
    );
    case.write(
        "package.json",
        &format!(
            r#"{{"name":"p","version":"1.0.0","private":true,"dependencies":{{"vr-math":"file:{}"}}}}"#,
            math.display()
        ),
    );
    case.write(".yarnrc.yml", "nodeLinker: node-modules\n");
    in_project(&case, "yarn", &["install"]);
    fs::remove_dir_all(case.project.join("node_modules")).unwrap();
    case.init(&[], "built");
    let toml = fs::read_to_string(case.project.join("velo.toml")).unwrap();
    assert!(toml.contains("yarn install --immutable"), "{toml}");
    let ran = |case: &Case| {
        case.sh(
            &[],
            "test -f node_modules/vr-math/built.txt && echo ran || echo not",
        )
    };
    assert_eq!(ran(&case), "not\n");
    case.write("~/.yarnrc.yml", "enableScripts: true\n");
    case.rebuilds(&[], "enableScripts: true in ~/.yarnrc.yml");
    assert_eq!(ran(&case), "ran\n");
    fs::remove_file(case.home.join(".yarnrc.yml")).unwrap();
    case.reuses(&[], "~/.yarnrc.yml gone again");
    assert_eq!(ran(&case), "not\n");
}
