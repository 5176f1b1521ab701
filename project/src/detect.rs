//! `velo init`: which ecosystems a project uses, and how each builds its dependency dirs.

use std::path::Path;

use anyhow::bail;

use super::config::Unit;

fn unit(
    ecosystem: &str,
    dirs: Vec<String>,
    inputs: &[&str],
    install: &str,
    versions: &[&str],
    env_prefixes: &[&str],
) -> Unit {
    Unit {
        ecosystem: ecosystem.into(),
        dirs,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        install: install.into(),
        versions: versions.iter().map(|s| s.to_string()).collect(),
        env_prefixes: env_prefixes.iter().map(|s| s.to_string()).collect(),
        path_sensitive: false,
        env: Default::default(),
        seed: false,
    }
}

/// The `node_modules` dirs of a JS project: the root's and each workspace package's.
fn node_dirs(project: &Path) -> Vec<String> {
    let mut dirs = vec!["node_modules".to_owned()];
    let mut patterns: Vec<String> = Vec::new();
    if let Ok(text) = std::fs::read_to_string(project.join("package.json"))
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
    {
        let ws = match &v["workspaces"] {
            serde_json::Value::Array(a) => a.clone(),
            serde_json::Value::Object(o) => o
                .get("packages")
                .and_then(|p| p.as_array())
                .cloned()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        patterns.extend(ws.iter().filter_map(|p| p.as_str().map(str::to_owned)));
    }
    // pnpm-workspace.yaml: a `packages:` list of `- 'glob'` lines.
    if let Ok(text) = std::fs::read_to_string(project.join("pnpm-workspace.yaml")) {
        let mut in_packages = false;
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with("packages:") {
                in_packages = true;
            } else if in_packages && t.starts_with('-') {
                patterns.push(
                    t.trim_start_matches('-')
                        .trim()
                        .trim_matches(['\'', '"'])
                        .to_owned(),
                );
            } else if !t.is_empty() && !line.starts_with(' ') {
                in_packages = false;
            }
        }
    }
    for pat in patterns {
        if pat.starts_with('!') {
            continue;
        }
        for pkg in expand_simple_glob(project, &pat) {
            dirs.push(format!("{pkg}/node_modules"));
        }
    }
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Expands `dir/*` and literal paths (the workspace globs projects use), relative to `root`,
/// to the directories holding a package.json.
fn expand_simple_glob(root: &Path, pat: &str) -> Vec<String> {
    let pat = pat.trim_end_matches('/');
    let mut out = Vec::new();
    if let Some(prefix) = pat.strip_suffix("/*").or_else(|| pat.strip_suffix("/**")) {
        if let Ok(rd) = std::fs::read_dir(root.join(prefix)) {
            for e in rd.flatten() {
                if e.path().join("package.json").is_file()
                    && let Some(name) = e.file_name().to_str()
                {
                    out.push(format!("{prefix}/{name}"));
                }
            }
        }
    } else if root.join(pat).join("package.json").is_file() {
        out.push(pat.to_owned());
    }
    out.sort();
    out
}

/// The root requirements files `velo init` installs when a project has several.
const CONVENTIONAL_REQUIREMENTS: [&str; 7] = [
    "requirements.txt",
    "requirements-dev.txt",
    "requirements_dev.txt",
    "requirements-test.txt",
    "requirements_test.txt",
    "requirements-tests.txt",
    "requirements_tests.txt",
];

/// The requirements files a pip project installs: `requirements*.txt` at the root (by
/// convention the project's and its dev/test ones, if it has them), else the
/// `.txt` files of a `requirements/` dir; of those, the ones no other one includes (`-r`, `-c`:
/// a `dev.txt` that includes `base.txt` installs both, and a constraints file is not a list of
/// things to install). Sorted. What they include is followed when keys are computed.
fn requirement_roots(project: &Path) -> Vec<String> {
    let list = |dir: &Path, rel: &str, name_ok: &dyn Fn(&str) -> bool| -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_file())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| name_ok(n))
                    .map(|n| format!("{rel}{n}"))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    };
    let mut found = list(project, "", &|n| {
        n.starts_with("requirements") && n.ends_with(".txt")
    });
    // Of the root's files, the test venv gets the project's and its dev/test requirements by
    // convention, not every variant (docs, lint, prod pins…); velo.toml's install says
    // otherwise where a project wants more.
    let conventional: Vec<String> = found
        .iter()
        .filter(|n| CONVENTIONAL_REQUIREMENTS.contains(&n.as_str()))
        .cloned()
        .collect();
    if !conventional.is_empty() {
        found = conventional;
    }
    if found.is_empty() {
        found = list(&project.join("requirements"), "requirements/", &|n| {
            n.ends_with(".txt")
        });
    }
    let included: std::collections::BTreeSet<std::path::PathBuf> = found
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(project.join(f)).unwrap_or_default();
            let dir = Path::new(f).parent().unwrap_or(Path::new("")).to_owned();
            crate::inputs::requirement_refs(&text)
                .into_iter()
                .filter_map(move |r| match r {
                    crate::inputs::ReqRef::Requirements(p)
                    | crate::inputs::ReqRef::Constraints(p) => Some(normalize(&dir.join(p))),
                    crate::inputs::ReqRef::Local(_) => None,
                })
        })
        .collect();
    let roots: Vec<String> = found
        .iter()
        .filter(|f| !included.contains(&normalize(Path::new(f.as_str()))))
        .cloned()
        .collect();
    // Files that only include each other (a cycle): install them all.
    if roots.is_empty() { found } else { roots }
}

/// A relative path with `.` dropped and `..` folded.
fn normalize(p: &Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Detects every ecosystem in `project` (at least one, or an error saying what was looked for).
pub fn detect(project: &Path) -> anyhow::Result<Vec<Unit>> {
    let has = |f: &str| project.join(f).is_file();
    let node_env = ["npm_config_", "NPM_CONFIG_", "NODE_ENV"];
    let node_versions = [
        "node -p process.versions.modules",
        "node -p process.platform+process.arch",
    ];
    let mut units = Vec::new();
    if has("package-lock.json") {
        let mut v = vec!["npm --version"];
        v.extend(node_versions);
        units.push(unit(
            "npm",
            node_dirs(project),
            &["package-lock.json", "package.json", ".npmrc"],
            "npm ci",
            &v,
            &node_env,
        ));
    } else if has("pnpm-lock.yaml") {
        let mut v = vec!["pnpm --version"];
        v.extend(node_versions);
        units.push(unit(
            "pnpm",
            node_dirs(project),
            &[
                "pnpm-lock.yaml",
                "package.json",
                "pnpm-workspace.yaml",
                ".npmrc",
            ],
            "pnpm install --frozen-lockfile",
            &v,
            &node_env,
        ));
    } else if has("yarn.lock") {
        let berry = has(".yarnrc.yml");
        if berry {
            let rc = std::fs::read_to_string(project.join(".yarnrc.yml")).unwrap_or_default();
            if !rc
                .lines()
                .any(|l| l.trim().replace(' ', "") == "nodeLinker:node-modules")
            {
                bail!(
                    "{}: Yarn Plug'n'Play keeps no node_modules for velo to mount; set `nodeLinker: node-modules` in .yarnrc.yml",
                    project.display()
                );
            }
        }
        let mut v = vec!["yarn --version"];
        v.extend(node_versions);
        units.push(unit(
            "yarn",
            node_dirs(project),
            &[
                "yarn.lock",
                "package.json",
                ".yarnrc",
                ".yarnrc.yml",
                ".npmrc",
            ],
            if berry {
                "yarn install --immutable"
            } else {
                "yarn install --frozen-lockfile"
            },
            &v,
            &["npm_config_", "YARN_", "NODE_ENV"],
        ));
    }
    // (`PYTHON*` variables steer the interpreter at run time; the install never sees them.)
    let py_env = ["PIP_", "UV_", "POETRY_"];
    if has("uv.lock") {
        let mut u = unit(
            "uv",
            vec![".venv".into()],
            &["uv.lock", "pyproject.toml", ".python-version", "uv.toml"],
            "uv sync --frozen --compile-bytecode",
            &["uv --version", "uv python find"],
            &py_env,
        );
        u.path_sensitive = true;
        units.push(u);
    } else if has("poetry.lock") {
        let mut u = unit(
            "poetry",
            vec![".venv".into()],
            &["poetry.lock", "pyproject.toml", "poetry.toml"],
            "poetry install --no-root --no-interaction --compile",
            &[
                "poetry --version",
                "python3 -c 'import sys; print(sys.version)'",
            ],
            &py_env,
        );
        u.path_sensitive = true;
        u.env
            .insert("POETRY_VIRTUALENVS_IN_PROJECT".into(), "true".into());
        units.push(u);
    } else {
        let reqs = requirement_roots(project);
        if !reqs.is_empty() {
            let args: Vec<String> = reqs.iter().map(|r| format!("-r {r}")).collect();
            let inputs: Vec<&str> = reqs.iter().map(String::as_str).collect();
            let install = format!(
                "python3 -m venv .venv && .venv/bin/pip install --no-input --disable-pip-version-check {}",
                args.join(" ")
            );
            let mut u = unit(
                "pip",
                vec![".venv".into()],
                &inputs,
                &install,
                &[
                    "python3 -c 'import sys; print(sys.version)'",
                    "python3 -m pip --version",
                ],
                &py_env,
            );
            u.path_sensitive = true;
            units.push(u);
        }
    }
    if has("Cargo.lock") {
        let mut u = unit(
            "cargo",
            vec![".cargo-home".into()],
            &[
                "Cargo.lock",
                "Cargo.toml",
                ".cargo/config.toml",
                "rust-toolchain.toml",
            ],
            "cargo fetch --locked",
            &["cargo --version"],
            &["CARGO_REGISTRIES_", "CARGO_NET_"],
        );
        u.env
            .insert("CARGO_HOME".into(), "{project}/.cargo-home".into());
        u.seed = true;
        units.push(u);
    }
    if units.is_empty() {
        bail!(
            "{}: no lockfile found (looked for package-lock.json, pnpm-lock.yaml, yarn.lock, uv.lock, poetry.lock, requirements*.txt, requirements/*.txt, Cargo.lock)",
            project.display()
        );
    }
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_npm_workspaces_and_pip() {
        let dir = tempfile::tempdir().expect("test fixture");
        let p = dir.path();
        std::fs::write(p.join("package-lock.json"), "{}").expect("test fixture");
        std::fs::write(
            p.join("package.json"),
            r#"{"workspaces": ["packages/*", "tools/cli"]}"#,
        )
        .expect("test fixture");
        for pkg in ["packages/a", "packages/b", "tools/cli"] {
            std::fs::create_dir_all(p.join(pkg)).expect("test fixture");
            std::fs::write(p.join(pkg).join("package.json"), "{}").expect("test fixture");
        }
        std::fs::create_dir_all(p.join("packages/not-a-package")).expect("test fixture");
        std::fs::write(p.join("requirements.txt"), "six\n").expect("test fixture");
        std::fs::write(p.join("requirements-dev.txt"), "pytest\n").expect("test fixture");
        std::fs::write(p.join("requirements-docs.txt"), "sphinx\n").expect("test fixture");
        let units = detect(p).expect("test fixture");
        assert_eq!(units[0].ecosystem, "npm");
        assert_eq!(
            units[0].dirs,
            [
                "node_modules",
                "packages/a/node_modules",
                "packages/b/node_modules",
                "tools/cli/node_modules"
            ]
        );
        assert_eq!(units[0].install, "npm ci");
        assert_eq!(units[1].ecosystem, "pip");
        assert!(units[1].path_sensitive);
        assert!(
            units[1]
                .install
                .contains("-r requirements-dev.txt -r requirements.txt"),
            "{}",
            units[1].install
        );
        assert!(
            !units[1].install.contains("docs"),
            "docs requirements stay out of the test venv: {}",
            units[1].install
        );
        // A project with only a variant velo has no convention for installs it.
        let q = tempfile::tempdir().expect("tempdir");
        std::fs::write(q.path().join("requirements-prod.txt"), "six\n").expect("fixture");
        assert!(
            detect(q.path()).expect("detected")[0]
                .install
                .contains("-r requirements-prod.txt")
        );
    }

    #[test]
    fn a_requirements_dir_is_detected_and_included_files_are_not_installed_twice() {
        let dir = tempfile::tempdir().expect("test fixture");
        let p = dir.path();
        std::fs::create_dir_all(p.join("requirements")).expect("test fixture");
        for (f, text) in [
            ("base.txt", "six\n"),
            ("dev.txt", "-r base.txt\n-c constraints.txt\npytest\n"),
            ("constraints.txt", "six==1.17.0\n"),
            ("docs.txt", "-r ./base.txt\nsphinx\n"),
        ] {
            std::fs::write(p.join("requirements").join(f), text).expect("test fixture");
        }
        let units = detect(p).expect("detected");
        assert_eq!(units[0].ecosystem, "pip");
        assert_eq!(
            units[0].inputs,
            ["requirements/dev.txt", "requirements/docs.txt"]
        );
        assert!(
            units[0]
                .install
                .ends_with("-r requirements/dev.txt -r requirements/docs.txt"),
            "{}",
            units[0].install
        );
        // Root files win over the dir.
        std::fs::write(p.join("requirements.txt"), "-r requirements/dev.txt\n").expect("fixture");
        assert_eq!(detect(p).expect("detected")[0].inputs, ["requirements.txt"]);
    }

    #[test]
    fn nothing_to_manage_is_an_error() {
        let dir = tempfile::tempdir().expect("test fixture");
        assert!(
            detect(dir.path())
                .unwrap_err()
                .to_string()
                .contains("no lockfile")
        );
    }
}
