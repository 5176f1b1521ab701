//! The README's CI examples, run as written: every `run:` step of the GitHub Actions workflow and
//! every `before_script`/`script` line of the GitLab job, in sequence, on a fresh store, against
//! a real registry (with credentials) on 127.0.0.1 — a cold run, then a warm run on a fresh
//! "runner" that gets only the cache. The steps that are actions (`uses:`) are emulated for what
//! they do here: checkout (the project is there), cache restore/save (a directory copy),
//! docker/login-action (writes ~/.docker/config.json). The "Install velo" step is skipped: the
//! velo under test is on PATH. npm works offline, from a local tarball.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::registry::{AUTH_PASSWORD, AUTH_USER, Registry};
use common::{Env, can_mount, describe};

/// The yaml block after `<!-- ci-example: NAME -->` in the README.
fn example(name: &str) -> String {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let marker = format!("<!-- ci-example: {name} -->");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README has no {marker}"));
    let rest = &readme[at..];
    let start = rest.find("```yaml\n").expect("yaml block") + 8;
    let end = rest[start..].find("\n```").expect("end of block") + start;
    rest[start..end].to_owned()
}

#[derive(Debug)]
enum Step {
    Uses(String, BTreeMap<String, String>),
    Run(String, String),
}

/// The steps of the workflow's single job, and the job's `env:` (names only matter).
fn github_steps(yaml: &str) -> Vec<Step> {
    let lines: Vec<&str> = yaml.lines().collect();
    let steps_at = lines
        .iter()
        .position(|l| l.trim() == "steps:")
        .expect("steps:");
    let indent = |l: &str| l.len() - l.trim_start().len();
    let step_indent = indent(lines[steps_at + 1]);
    let mut steps = Vec::new();
    let mut i = steps_at + 1;
    while i < lines.len() {
        let l = lines[i];
        assert!(
            indent(l) == step_indent && l.trim_start().starts_with("- "),
            "unexpected line in steps: {l:?}"
        );
        // Collect this step's lines (until the next "- " at the step indent).
        let mut body = vec![l.trim_start()[2..].to_owned()];
        i += 1;
        while i < lines.len()
            && !(indent(lines[i]) == step_indent && lines[i].trim_start().starts_with("- "))
        {
            body.push(lines[i][step_indent + 2..].to_owned());
            i += 1;
        }
        let mut name = String::new();
        let mut uses = None;
        let mut with = BTreeMap::new();
        let mut run = None;
        let mut j = 0;
        while j < body.len() {
            let b = &body[j];
            if let Some(v) = b.strip_prefix("name: ") {
                name = v.to_owned();
            } else if let Some(v) = b.strip_prefix("uses: ") {
                uses = Some(v.to_owned());
            } else if b == "with:" {
                j += 1;
                while j < body.len() && body[j].starts_with("  ") {
                    if let Some((k, v)) = body[j].trim().split_once(": ") {
                        with.insert(k.to_owned(), v.to_owned());
                    }
                    j += 1;
                }
                continue;
            } else if b == "run: |" {
                let mut script = String::new();
                j += 1;
                while j < body.len() && (body[j].starts_with("  ") || body[j].is_empty()) {
                    script.push_str(body[j].get(2..).unwrap_or(""));
                    script.push('\n');
                    j += 1;
                }
                run = Some(script);
                continue;
            } else if let Some(v) = b.strip_prefix("run: ") {
                run = Some(format!("{v}\n"));
            }
            j += 1;
        }
        steps.push(match (uses, run) {
            (Some(u), None) => Step::Uses(u, with),
            (None, Some(r)) => Step::Run(name, r),
            other => panic!("a step is either uses: or run:, got {other:?}"),
        });
    }
    steps
}

/// `KEY: value` lines under `section:` (one level of indentation).
fn yaml_map(yaml: &str, section: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut inside = None;
    for l in yaml.lines() {
        let ind = l.len() - l.trim_start().len();
        if let Some(i) = inside {
            if ind <= i {
                break;
            }
            if let Some((k, v)) = l.trim().split_once(": ") {
                out.push((k.to_owned(), v.to_owned()));
            }
        } else if l.trim() == format!("{section}:") {
            inside = Some(ind);
        }
    }
    out
}

/// `- line` items under `section:`.
fn yaml_list(yaml: &str, section: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = None;
    for l in yaml.lines() {
        let ind = l.len() - l.trim_start().len();
        if let Some(i) = inside {
            if ind <= i {
                break;
            }
            out.push(l.trim().strip_prefix("- ").expect("a list item").to_owned());
        } else if l.trim() == format!("{section}:") {
            inside = Some(ind);
        }
    }
    out
}

/// A tiny npm project whose dependency comes from a local tarball (no network).
fn npm_project(env: &Env, dir: &Path) {
    let pkg = env.path("vr-left");
    fs::create_dir_all(pkg.join("lib")).unwrap();
    fs::write(
        pkg.join("package.json"),
        r#"{"name":"vr-left","version":"1.0.0","main":"index.js"}"#,
    )
    .unwrap();
    fs::write(
        pkg.join("index.js"),
        "module.exports = (s, n) => String(s).padStart(n);\n".repeat(20),
    )
    .unwrap();
    fs::write(
        pkg.join("lib/data.json"),
        "[1,2,3,4,5,6,7,8,9,10]\n".repeat(300),
    )
    .unwrap();
    fs::create_dir_all(dir.join("vendor")).unwrap();
    run_ok(
        npm(env, &pkg)
            .args(["pack", "--pack-destination"])
            .arg(dir.join("vendor")),
        "npm pack",
    );
    fs::write(
        dir.join("package.json"),
        r#"{"name":"ci-demo","version":"1.0.0","dependencies":{"vr-left":"file:vendor/vr-left-1.0.0.tgz"}}"#,
    )
    .unwrap();
    run_ok(npm(env, dir).args(["install", "--offline"]), "npm install");
    assert!(dir.join("package-lock.json").is_file());
    fs::remove_dir_all(dir.join("node_modules")).unwrap();
}

fn npm(env: &Env, dir: &Path) -> Command {
    let mut c = Command::new("npm");
    c.current_dir(dir)
        .env("npm_config_cache", env.path("npm-cache"))
        .env("npm_config_offline", "true")
        .env("npm_config_update_notifier", "false")
        .env("npm_config_audit", "false")
        .env("npm_config_fund", "false");
    c
}

fn run_ok(c: &mut Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what}:\n{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    fs::create_dir_all(to).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", from.display()))
            .arg(to),
        "cp -a",
    );
}

struct Runner {
    project: PathBuf,
    home: PathBuf,
    env: Vec<(String, String)>,
}

impl Runner {
    /// A fresh runner: a checkout of the project (sources only) and an empty home.
    fn new(env: &Env, name: &str, source: &Path) -> Self {
        let project = env.path(&format!("{name}/project"));
        let home = env.path(&format!("{name}/home"));
        fs::create_dir_all(&home).unwrap();
        copy_dir(source, &project);
        let velo_dir = common::velo_bin().parent().unwrap().to_owned();
        let path = format!(
            "{}:{}",
            velo_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let env = vec![
            ("PATH".into(), path),
            ("HOME".into(), home.display().to_string()),
            ("VELO_PLAIN_HTTP".into(), "1".into()),
            (
                "npm_config_cache".into(),
                env.path("npm-cache").display().to_string(),
            ),
            ("npm_config_offline".into(), "true".into()),
            ("npm_config_update_notifier".into(), "false".into()),
            ("npm_config_audit".into(), "false".into()),
            ("npm_config_fund".into(), "false".into()),
        ];
        Self { project, home, env }
    }

    fn bash(&self, script: &str, extra: &[(String, String)]) -> String {
        let mut c = Command::new("bash");
        c.arg("-eo")
            .arg("pipefail")
            .arg("-c")
            .arg(script)
            .current_dir(&self.project)
            .env_clear()
            .envs(self.env.iter().cloned())
            .envs(extra.iter().cloned());
        run_ok(&mut c, &format!("step:\n{script}"))
    }
}

/// Runs the GitHub workflow once; returns the output of each run: step.
fn run_github(
    runner: &Runner,
    reg: &Registry,
    cache: &Path,
    tag: &str,
) -> BTreeMap<String, String> {
    let yaml = example("github");
    let job_env: Vec<(String, String)> = yaml_map(&yaml, "env")
        .into_iter()
        .map(|(k, _)| {
            let v = match k.as_str() {
                "VELO_STORE" => runner.project.join(".velo-store").display().to_string(),
                "VELO_CACHE" => runner.project.join(".velo-cache").display().to_string(),
                "VELO_DEST" => reg.url(&format!("ci/app-deps:{tag}")),
                other => panic!("the test does not know what {other} is on a runner"),
            };
            (k, v)
        })
        .collect();
    let mut outputs = BTreeMap::new();
    for step in github_steps(&yaml) {
        match step {
            Step::Uses(action, with) => {
                let kind = action.split('@').next().unwrap_or_default().to_owned();
                match kind.as_str() {
                    "actions/checkout" => {}
                    "actions/cache/restore" => {
                        assert_eq!(with["path"], ".velo-cache");
                        if cache.exists() {
                            copy_dir(cache, &runner.project.join(".velo-cache"));
                        }
                    }
                    "actions/cache/save" => {
                        assert_eq!(with["path"], ".velo-cache");
                        copy_dir(&runner.project.join(".velo-cache"), cache);
                    }
                    "docker/login-action" => {
                        assert_eq!(with["registry"], "ghcr.io");
                        write_docker_config(&runner.home, &reg.host());
                    }
                    other => panic!("the test cannot emulate {other}"),
                }
            }
            Step::Run(name, _) if name == "Install velo" => {}
            Step::Run(name, script) => {
                let out = runner.bash(&script, &job_env);
                outputs.insert(name, out);
            }
        }
    }
    outputs
}

fn write_docker_config(home: &Path, host: &str) {
    let dir = home.join(".docker");
    fs::create_dir_all(&dir).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf '%s' '{AUTH_USER}:{AUTH_PASSWORD}' | base64 -w0"
        ))
        .output()
        .unwrap();
    let auth = String::from_utf8_lossy(&out.stdout).into_owned();
    fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
}

/// Runs the GitLab job once; returns its output.
fn run_gitlab(runner: &Runner, reg: &Registry, cache: &Path, sha: &str) -> String {
    let yaml = example("gitlab");
    let predefined: Vec<(String, String)> = vec![
        (
            "CI_PROJECT_DIR".into(),
            runner.project.display().to_string(),
        ),
        ("CI_REGISTRY".into(), reg.host()),
        (
            "CI_REGISTRY_IMAGE".into(),
            format!("{}/group/app", reg.host()),
        ),
        ("CI_REGISTRY_USER".into(), AUTH_USER.into()),
        ("CI_REGISTRY_PASSWORD".into(), AUTH_PASSWORD.into()),
        ("CI_COMMIT_SHA".into(), sha.into()),
    ];
    let mut vars = predefined.clone();
    // Longest names first, so $CI_REGISTRY does not eat $CI_REGISTRY_IMAGE.
    let mut by_length = predefined.clone();
    by_length.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    for (k, v) in yaml_map(&yaml, "variables") {
        let mut v = v;
        for (pk, pv) in &by_length {
            v = v.replace(&format!("${pk}"), pv);
        }
        assert!(!v.contains('$'), "unexpanded variable in {k}: {v}");
        vars.push((k, v));
    }
    if cache.exists() {
        copy_dir(cache, &runner.project.join(".velo-cache"));
    }
    let mut script = yaml_list(&yaml, "before_script");
    script.extend(yaml_list(&yaml, "script"));
    let out = runner.bash(&script.join("\n"), &vars);
    copy_dir(&runner.project.join(".velo-cache"), cache);
    out
}

/// "N new objects" from `velo snapshot`'s line.
fn new_objects(out: &str) -> u64 {
    let at = out.find(" new objects").expect("snapshot output");
    out[..at]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number before 'new objects'")
}

/// "(N sent" … from `velo push`'s line: blobs sent.
fn blobs_sent(out: &str) -> u64 {
    let at = out.find(" sent (").expect("push output");
    out[..at]
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number before 'sent'")
}

#[test]
fn readme_ci_examples_run_in_sequence_on_a_fresh_store() {
    if !can_mount("readme_ci_examples_run_in_sequence_on_a_fresh_store") {
        return;
    }
    assert!(
        Command::new("npm").arg("--version").output().is_ok(),
        "npm is needed (apt-get install npm)"
    );
    let reg = Registry::start_with_auth();
    let env = Env::new();
    let source = env.path("source");
    npm_project(&env, &source);

    // GitHub: cold run, then a fresh runner with only the cache.
    let cache = env.path("gh-cache");
    let cold = run_github(&Runner::new(&env, "gh1", &source), &reg, &cache, "one");
    let install = &cold["Install and snapshot (velo run replaces this step)"];
    assert!(new_objects(install) >= 2, "{install}");
    assert!(blobs_sent(&cold["Publish"]) >= 3, "{cold:?}");
    assert!(cache.join("deps.velo").is_file());

    let warm = run_github(&Runner::new(&env, "gh2", &source), &reg, &cache, "two");
    assert!(
        warm["Restore the store"].contains("ci/deps"),
        "the import restores the ref: {warm:?}"
    );
    let install = &warm["Install and snapshot (velo run replaces this step)"];
    assert_eq!(
        new_objects(install),
        0,
        "objects come from the cache: {install}"
    );
    // The pack of node_modules is in the registry already; only the new image and index move.
    assert!(blobs_sent(&warm["Publish"]) <= 2, "{warm:?}");

    // GitLab: the same, in one shell per job.
    let cache = env.path("gl-cache");
    let cold = run_gitlab(&Runner::new(&env, "gl1", &source), &reg, &cache, "aaa");
    assert!(new_objects(&cold) >= 2, "{cold}");
    let warm = run_gitlab(&Runner::new(&env, "gl2", &source), &reg, &cache, "bbb");
    assert_eq!(new_objects(&warm), 0, "{warm}");
    assert!(blobs_sent(&warm) <= 2, "{warm}");

    // What CI published can be pulled elsewhere.
    let other = Env::new();
    let url = reg.url("group/app/deps:bbb");
    let mut c = other.velo(&["pull", &url, "--ref", "app/deps"]);
    c.env("VELO_PLAIN_HTTP", "1");
    let home = env.path("pull-home");
    write_docker_config(&home, &reg.host());
    c.env("DOCKER_CONFIG", home.join(".docker"));
    run_ok(&mut c, "velo pull");
    other.ok(&["fsck"]);
}
