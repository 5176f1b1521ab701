//! What keys a tree beyond the files velo.toml lists, by ecosystem — pure functions of the
//! environment the install runs with and of file contents handed in, so they are tested without
//! touching the machine:
//!
//! - [`keyed_env`]: the environment variables that change the installed bytes (a runtime-only
//!   variable such as `PYTHONHASHSEED` or `npm_config_loglevel` does not key; `NODE_ENV` keys
//!   only as "production or not", which is what decides whether devDependencies are installed);
//! - [`install_env_removals`]: what the install is not shown, so that what does not key cannot
//!   change the tree either (`PYTHON*` for Python installs; `NODE_ENV` other than `production`);
//! - [`config_files`]: the package manager's config files outside the project, in its
//!   documented search order (their contents key the tree; an absent file keys as absent);
//! - [`requirement_refs`] / [`follow_requirements`]: what pip requirement files pull in: `-r`
//!   and `-c` files, and the project metadata of local paths (`-e .`, `./lib`, `file:` URLs).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// An environment: variable name → value (names that are not UTF-8 are left out: no package
/// manager reads them).
pub type Env = BTreeMap<String, OsString>;

/// True for the ecosystems whose install is npm, pnpm or yarn.
pub fn is_node(ecosystem: &str) -> bool {
    matches!(ecosystem, "npm" | "pnpm" | "yarn")
}

/// True for the ecosystems whose install builds a Python venv.
pub fn is_python(ecosystem: &str) -> bool {
    matches!(ecosystem, "pip" | "uv" | "poetry")
}

/// npm/pnpm/yarn settings (as npm spells them: lowercase, `-`) that only steer output, network
/// behaviour or where caches and config live, never the installed bytes. Where config lives
/// keys through [`config_files`] (the contents of the file named), not through the name.
const NPM_RUNTIME: &[&str] = &[
    "loglevel",
    "silent",
    "quiet",
    "verbose",
    "progress",
    "color",
    "unicode",
    "timing",
    "logs-dir",
    "logs-max",
    "fund",
    "audit",
    "update-notifier",
    "cache",
    "prefer-offline",
    "prefer-online",
    "offline",
    "fetch-retries",
    "fetch-retry-factor",
    "fetch-retry-mintimeout",
    "fetch-retry-maxtimeout",
    "fetch-timeout",
    "maxsockets",
    "yes",
    "usage",
    "json",
    "parseable",
    "heading",
    "foreground-scripts",
    "user-agent",
    "userconfig",
    "globalconfig",
    "prefix",
];

/// yarn's `YARN_*` settings (lowercase, `-`) that never change the installed bytes.
const YARN_RUNTIME: &[&str] = &[
    "enable-progress-bars",
    "enable-telemetry",
    "enable-colors",
    "enable-hyperlinks",
    "enable-message-names",
    "enable-inline-builds",
    "enable-timers",
    "cache-folder",
    "global-folder",
    "silent",
    "network-timeout",
    "http-timeout",
    "http-retry",
];

/// pip's `PIP_*` settings that never change the installed bytes (`config-file` keys through
/// the contents of the files pip reads, see [`config_files`]).
const PIP_RUNTIME: &[&str] = &[
    "no-input",
    "disable-pip-version-check",
    "progress-bar",
    "verbose",
    "quiet",
    "no-color",
    "log",
    "log-file",
    "cache-dir",
    "no-cache-dir",
    "timeout",
    "default-timeout",
    "retries",
    "root-user-action",
    "require-virtualenv",
    "no-python-version-warning",
    "config-file",
];

/// uv's `UV_*` settings that never change the installed bytes.
const UV_RUNTIME: &[&str] = &[
    "no-progress",
    "cache-dir",
    "no-cache",
    "concurrent-downloads",
    "concurrent-builds",
    "concurrent-installs",
    "http-timeout",
    "request-timeout",
    "http-retries",
    "config-file",
    "no-config",
    "offline",
];

/// Poetry's `POETRY_*` settings that never change the installed bytes.
const POETRY_RUNTIME: &[&str] = &[
    "cache-dir",
    "no-interaction",
    "installer-max-workers",
    "requests-timeout",
    "config-dir",
];

/// `name` without `prefix` (ASCII case-insensitive), lowercased, `_` as `-`: the spelling of
/// a setting given as an environment variable, as the tools read it.
fn setting(name: &str, prefix: &str) -> Option<String> {
    let head = name.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    Some(name[prefix.len()..].to_ascii_lowercase().replace('_', "-"))
}

/// True if the variable `name` never changes what `ecosystem`'s install writes (it steers the
/// program at run time, the output or the network only). Only the known ecosystems have
/// such rules; a custom entry's variables key exactly as its `env_prefixes` say.
pub fn runtime_only(ecosystem: &str, name: &str) -> bool {
    let listed = |prefix: &str, list: &[&str]| {
        setting(name, prefix).is_some_and(|s| list.contains(&s.as_str()))
    };
    if is_node(ecosystem) {
        return listed("npm_config_", NPM_RUNTIME) || listed("YARN_", YARN_RUNTIME);
    }
    if is_python(ecosystem) {
        // The install never sees these (see `install_env_removals`).
        return name.starts_with("PYTHON")
            || listed("PIP_", PIP_RUNTIME)
            || listed("UV_", UV_RUNTIME)
            || listed("POETRY_", POETRY_RUNTIME);
    }
    if ecosystem == "cargo" {
        return name == "CARGO_NET_RETRY";
    }
    false
}

/// Whether `NODE_ENV` makes npm, pnpm and yarn leave devDependencies out.
fn node_production(env: &Env) -> bool {
    env.get("NODE_ENV")
        .is_some_and(|v| v.as_bytes() == b"production")
}

/// The environment entries that key `ecosystem`'s tree: each variable with one of `prefixes`
/// that is not [`runtime_only`], as (name, value); for npm, pnpm and yarn `NODE_ENV` enters
/// only as whether it is `production` (any other value, or none, installs the same tree).
/// Sorted by name.
pub fn keyed_env(ecosystem: &str, prefixes: &[String], env: &Env) -> Vec<(String, OsString)> {
    let mut out: Vec<(String, OsString)> = env
        .iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p.as_str())))
        .filter(|(k, _)| !runtime_only(ecosystem, k))
        .filter(|(k, _)| !(is_node(ecosystem) && k.as_str() == "NODE_ENV"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if is_node(ecosystem) && node_production(env) {
        out.push(("NODE_ENV is production".into(), "true".into()));
    }
    out.sort();
    out
}

/// The variables of `env` that `ecosystem`'s install is not shown, so that nothing
/// [`keyed_env`] leaves out can change the tree: a Python install runs without any `PYTHON*`
/// variable, and a node install sees `NODE_ENV` only if it is `production`.
pub fn install_env_removals(ecosystem: &str, env: &Env) -> Vec<String> {
    let mut out = Vec::new();
    if is_python(ecosystem) {
        out.extend(env.keys().filter(|k| k.starts_with("PYTHON")).cloned());
    }
    if is_node(ecosystem) && env.contains_key("NODE_ENV") && !node_production(env) {
        out.push("NODE_ENV".into());
    }
    out
}

/// A file outside velo.toml's inputs whose contents key a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// What it is to the tool (enters the key with the contents; the path does not, so the
    /// same settings in another place key the same).
    pub role: String,
    /// Where the tool looks for it.
    pub path: PathBuf,
}

/// What [`config_files`] works from, beyond the environment.
#[derive(Debug, Clone)]
pub struct Where<'a> {
    /// The environment the install runs with.
    pub env: &'a Env,
    /// The home directory of the user the install runs as.
    pub home: &'a Path,
    /// The project (absolute).
    pub project: &'a Path,
    /// The managed dirs (absolute): empty when the install starts, so no config in them counts.
    pub managed: &'a [PathBuf],
    /// The real node binary the install runs (npm's default prefix is two levels up).
    pub node: Option<&'a Path>,
    /// npm's own package directory (holding its builtin `npmrc`).
    pub npm_dir: Option<&'a Path>,
}

impl Where<'_> {
    fn var(&self, name: &str) -> Option<&OsStr> {
        self.env
            .get(name)
            .map(OsString::as_os_str)
            .filter(|v| !v.is_empty())
    }

    /// An absolute path from a variable (a relative one is ignored, as the XDG spec says).
    fn abs_var(&self, name: &str) -> Option<PathBuf> {
        self.var(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    }

    /// `$XDG_CONFIG_HOME`, else `~/.config`.
    fn config_home(&self) -> PathBuf {
        self.abs_var("XDG_CONFIG_HOME")
            .unwrap_or_else(|| self.home.join(".config"))
    }

    /// The dirs of `$XDG_CONFIG_DIRS`, else `/etc/xdg`.
    fn config_dirs(&self) -> Vec<PathBuf> {
        let dirs: Vec<PathBuf> = self
            .var("XDG_CONFIG_DIRS")
            .map(|v| {
                std::env::split_paths(v)
                    .filter(|p| p.is_absolute())
                    .collect()
            })
            .unwrap_or_default();
        if dirs.is_empty() {
            vec![PathBuf::from("/etc/xdg")]
        } else {
            dirs
        }
    }

    /// An npm setting from the environment (`npm_config_NAME`, any case, `_` or `-`).
    fn npm_env(&self, name: &str) -> Option<&OsStr> {
        self.env
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .find(|(k, _)| setting(k, "npm_config_").as_deref() == Some(name))
            .map(|(_, v)| v.as_os_str())
    }

    /// The project and each of its parents, nearest first.
    fn ancestors(&self) -> impl Iterator<Item = &Path> {
        self.project.ancestors()
    }
}

/// Expands a leading `~/` to `home`, and resolves a relative path against `base`.
fn expand(value: &str, home: &Path, base: &Path) -> PathBuf {
    match value.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => base.join(value),
    }
}

/// A setting of an npmrc (ini: `key = value`, `;`/`#` comments, quotes around the value).
fn npmrc_setting(text: &str, key: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with([';', '#', '[']) {
            continue;
        }
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            let v = v.trim().trim_matches('"').trim_matches('\'');
            if !v.is_empty() {
                found = Some(v.to_owned());
            }
        }
    }
    found
}

/// npm's config files in the order npm reads them: its builtin `npmrc`, the user config
/// (`npm_config_userconfig`, else a `userconfig` set in the builtin or project file, else
/// `~/.npmrc`), and the global config (`npm_config_globalconfig`, else a `globalconfig` set in
/// an earlier file, else `PREFIX/etc/npmrc`, where the prefix is `npm_config_prefix`, a `prefix`
/// set in an earlier file, `$PREFIX`, or two levels above the node binary). The project's
/// `.npmrc` is one of velo.toml's inputs.
fn npm_files(w: &Where<'_>, read: &mut dyn FnMut(&Path) -> Option<String>) -> Vec<ConfigFile> {
    let mut out = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    if let Some(dir) = w.npm_dir {
        let path = dir.join("npmrc");
        texts.extend(read(&path));
        out.push(ConfigFile {
            role: "npm builtin config".into(),
            path,
        });
    }
    texts.extend(read(&w.project.join(".npmrc")));
    let from_files = |texts: &[String], key: &str| -> Option<String> {
        texts.iter().rev().find_map(|t| npmrc_setting(t, key))
    };
    let user = match w.npm_env("userconfig") {
        Some(v) => expand(&v.to_string_lossy(), w.home, w.project),
        None => match from_files(&texts, "userconfig") {
            Some(v) => expand(&v, w.home, w.project),
            None => w.home.join(".npmrc"),
        },
    };
    texts.extend(read(&user));
    out.push(ConfigFile {
        role: "npm user config".into(),
        path: user,
    });
    let global = match w.npm_env("globalconfig") {
        Some(v) => Some(expand(&v.to_string_lossy(), w.home, w.project)),
        None => match from_files(&texts, "globalconfig") {
            Some(v) => Some(expand(&v, w.home, w.project)),
            None => {
                let prefix = match w.npm_env("prefix") {
                    Some(v) => Some(expand(&v.to_string_lossy(), w.home, w.project)),
                    None => match from_files(&texts, "prefix") {
                        Some(v) => Some(expand(&v, w.home, w.project)),
                        None => w.abs_var("PREFIX").or_else(|| {
                            let p = w.node?.parent()?.parent()?.to_owned();
                            Some(match w.abs_var("DESTDIR") {
                                Some(d) => d.join(p.strip_prefix("/").unwrap_or(&p)),
                                None => p,
                            })
                        }),
                    },
                };
                prefix.map(|p| p.join("etc/npmrc"))
            }
        },
    };
    if let Some(path) = global {
        out.push(ConfigFile {
            role: "npm global config".into(),
            path,
        });
    }
    out
}

/// The config files outside the project (and outside its managed dirs) that `ecosystem`'s
/// install reads, in each tool's documented search order; `read` gives a file's text (for the
/// settings that move other files: npm's `userconfig`, `globalconfig`, `prefix`). Files the
/// project holds are velo.toml's inputs. Paths are unique; none is inside a managed dir.
pub fn config_files(
    ecosystem: &str,
    w: &Where<'_>,
    read: &mut dyn FnMut(&Path) -> Option<String>,
) -> Vec<ConfigFile> {
    let file = |role: &str, path: PathBuf| ConfigFile {
        role: role.into(),
        path,
    };
    let mut out: Vec<ConfigFile> = Vec::new();
    let parents = || w.ancestors().skip(1);
    match ecosystem {
        "npm" => out.extend(npm_files(w, read)),
        "pnpm" => {
            // pnpm reads the npmrc files as npm does, and its own global rc.
            out.extend(npm_files(w, read));
            out.push(file("pnpm global rc", w.config_home().join("pnpm/rc")));
        }
        "yarn" => {
            // Classic reads `.yarnrc` and `.npmrc` from the project up to `/` and in the home;
            // Berry reads `.yarnrc.yml` from the project up to `/` and in the home.
            for dir in parents() {
                for name in [".yarnrc", ".yarnrc.yml", ".npmrc"] {
                    out.push(file(&format!("yarn parent {name}"), dir.join(name)));
                }
            }
            out.push(file("yarn user .yarnrc", w.home.join(".yarnrc")));
            out.push(file("yarn user .yarnrc.yml", w.home.join(".yarnrc.yml")));
            out.extend(npm_files(w, read));
        }
        "pip" => {
            // pip: PIP_CONFIG_FILE=/dev/null reads nothing; else the global files (each
            // $XDG_CONFIG_DIRS/pip/pip.conf, /etc/pip.conf), the user files (unless
            // PIP_CONFIG_FILE names an existing file; read() tells), then PIP_CONFIG_FILE.
            let env_file = w.abs_var("PIP_CONFIG_FILE");
            if env_file.as_deref() == Some(Path::new("/dev/null")) {
                return Vec::new();
            }
            for dir in w.config_dirs() {
                out.push(file("pip global config", dir.join("pip/pip.conf")));
            }
            out.push(file("pip global config", PathBuf::from("/etc/pip.conf")));
            let env_file_exists = env_file.as_deref().is_some_and(|p| read(p).is_some());
            if !env_file_exists {
                out.push(file(
                    "pip user config (legacy)",
                    w.home.join(".pip/pip.conf"),
                ));
                out.push(file(
                    "pip user config",
                    w.config_home().join("pip/pip.conf"),
                ));
            }
            if let Some(p) = env_file {
                out.push(file("pip PIP_CONFIG_FILE", p));
            }
        }
        "uv" => {
            // uv: UV_CONFIG_FILE alone if set; none with UV_NO_CONFIG; else the project's
            // (an input), the user's ($XDG_CONFIG_HOME/uv/uv.toml) and the system's
            // (each $XDG_CONFIG_DIRS/uv/uv.toml, /etc/uv/uv.toml).
            if let Some(p) = w.abs_var("UV_CONFIG_FILE") {
                out.push(file("uv UV_CONFIG_FILE", p));
            } else if w.var("UV_NO_CONFIG").is_none() {
                out.push(file("uv user config", w.config_home().join("uv/uv.toml")));
                for dir in w.config_dirs() {
                    out.push(file("uv system config", dir.join("uv/uv.toml")));
                }
                out.push(file("uv system config", PathBuf::from("/etc/uv/uv.toml")));
            }
        }
        "poetry" => {
            let dir = w
                .abs_var("POETRY_CONFIG_DIR")
                .unwrap_or_else(|| w.config_home().join("pypoetry"));
            out.push(file("poetry user config", dir.join("config.toml")));
        }
        "cargo" => {
            // cargo: `.cargo/config.toml` (and the older `.cargo/config`) in the project's
            // parents, then $CARGO_HOME's (default ~/.cargo).
            for dir in parents() {
                out.push(file("cargo parent config", dir.join(".cargo/config.toml")));
                out.push(file("cargo parent config", dir.join(".cargo/config")));
            }
            out.push(file(
                "cargo project config (old name)",
                w.project.join(".cargo/config"),
            ));
            let home = w
                .abs_var("CARGO_HOME")
                .unwrap_or_else(|| w.home.join(".cargo"));
            out.push(file("cargo home config", home.join("config.toml")));
            out.push(file("cargo home config", home.join("config")));
            // The user's own, which velo links into the Cargo home it manages (see
            // `cargo_config`): read by the install and the command wherever the project is.
            out.push(file("cargo user config", w.home.join(".cargo/config.toml")));
            out.push(file("cargo user config", w.home.join(".cargo/config")));
        }
        _ => {}
    }
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|f| !w.managed.iter().any(|m| f.path.starts_with(m)) && seen.insert(f.path.clone()));
    out
}

/// What one line of a pip requirements file refers to on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReqRef {
    /// `-r FILE`: another requirements file (relative to the one naming it).
    Requirements(String),
    /// `-c FILE`: a constraints file (relative to the one naming it).
    Constraints(String),
    /// A local project or archive (`-e .`, `./lib`, `file:` URLs, `name @ file://…`):
    /// relative to the install's working directory.
    Local(String),
}

/// The local path of a requirement, if it names one: `./x`, `../x`, `/x`, `.`, `file:` URLs;
/// extras (`[dev]`) and `#egg=` fragments dropped.
fn local_path(spec: &str) -> Option<String> {
    let spec = spec.trim();
    let url = |s: &str| {
        s.strip_prefix("file://localhost")
            .or_else(|| s.strip_prefix("file://"))
            .or_else(|| s.strip_prefix("file:"))
            .map(str::to_owned)
    };
    let path = if let Some(p) = url(spec) {
        p
    } else if spec == "."
        || spec == ".."
        || spec.starts_with("./")
        || spec.starts_with("../")
        || spec.starts_with('/')
    {
        spec.to_owned()
    } else if let Some((_, target)) = spec.split_once(" @ ").or_else(|| spec.split_once('@')) {
        url(target.trim())?
    } else {
        return None;
    };
    let path = path.split(['#', ';']).next().unwrap_or_default().trim();
    let path = match path.find('[') {
        Some(i) if path.ends_with(']') => &path[..i],
        _ => path,
    };
    (!path.is_empty()).then(|| path.to_owned())
}

/// The references of a pip requirements file: `-r`/`--requirement`, `-c`/`--constraint` and
/// local paths (`-e`/`--editable` ones too). Comments and `\` line continuations as pip reads
/// them.
pub fn requirement_refs(text: &str) -> Vec<ReqRef> {
    let mut out = Vec::new();
    let mut joined = String::new();
    let mut lines = Vec::new();
    for raw in text.lines() {
        if let Some(cont) = raw.strip_suffix('\\') {
            joined.push_str(cont);
            continue;
        }
        joined.push_str(raw);
        lines.push(std::mem::take(&mut joined));
    }
    lines.push(joined);
    for line in lines {
        // A comment starts at `#` at the start or after whitespace.
        let mut end = line.len();
        let bytes = line.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
                end = i;
                break;
            }
        }
        let line = line[..end].trim();
        if line.is_empty() {
            continue;
        }
        let option = |short: &str, long: &str| -> Option<String> {
            let rest = if let Some(r) = line.strip_prefix(long) {
                r.strip_prefix('=').unwrap_or(r)
            } else {
                line.strip_prefix(short)?
            };
            let rest = rest.trim();
            (!rest.is_empty()).then(|| rest.to_owned())
        };
        if let Some(f) = option("-r", "--requirement") {
            out.push(ReqRef::Requirements(f));
        } else if let Some(f) = option("-c", "--constraint") {
            out.push(ReqRef::Constraints(f));
        } else if let Some(spec) = option("-e", "--editable") {
            out.extend(local_path(&spec).map(ReqRef::Local));
        } else if !line.starts_with('-') {
            out.extend(local_path(line).map(ReqRef::Local));
        }
    }
    out
}

/// `base.join(rel)` with `.` and `..` folded (without looking at the filesystem).
fn join_clean(base: &Path, rel: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Archives pip installs from a file (their bytes key); anything else local is a project dir
/// (its metadata files key).
const ARCHIVES: &[&str] = &[
    ".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar",
];

/// Files a local project's installed metadata comes from (name, dependencies, entry points).
pub const PROJECT_METADATA: &[&str] = &["pyproject.toml", "setup.py", "setup.cfg"];

/// Every file the requirements files `roots` (paths relative to `project`) pull in, beyond
/// themselves: requirements and constraints files they include (followed, each once), the
/// archives they install from, and the metadata files ([`PROJECT_METADATA`]) of the local
/// projects they install. `read` gives a file's text (`None`: absent). Roles name the file
/// relative to the project where it is inside it.
pub fn follow_requirements(
    project: &Path,
    roots: &[String],
    read: &mut dyn FnMut(&Path) -> Option<String>,
) -> Vec<ConfigFile> {
    let name = |p: &Path| match p.strip_prefix(project) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => p.display().to_string(),
    };
    let mut seen: std::collections::BTreeSet<PathBuf> =
        roots.iter().map(|r| join_clean(project, r)).collect();
    let mut queue: Vec<PathBuf> = seen.iter().cloned().collect();
    let mut out = Vec::new();
    while let Some(file) = queue.pop() {
        let Some(text) = read(&file) else { continue };
        let dir = file.parent().unwrap_or(project).to_owned();
        for r in requirement_refs(&text) {
            match r {
                ReqRef::Requirements(f) | ReqRef::Constraints(f) => {
                    let path = join_clean(&dir, &f);
                    if seen.insert(path.clone()) {
                        out.push(ConfigFile {
                            role: format!("requirements include {}", name(&path)),
                            path: path.clone(),
                        });
                        queue.push(path);
                    }
                }
                ReqRef::Local(p) => {
                    let path = join_clean(project, &p);
                    let lower = p.to_ascii_lowercase();
                    let files: Vec<PathBuf> = if ARCHIVES.iter().any(|a| lower.ends_with(a)) {
                        vec![path]
                    } else {
                        PROJECT_METADATA.iter().map(|m| path.join(m)).collect()
                    };
                    for f in files {
                        if seen.insert(f.clone()) {
                            out.push(ConfigFile {
                                role: format!("local requirement {}", name(&f)),
                                path: f,
                            });
                        }
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect()
    }

    fn prefixes(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn runtime_only_variables_do_not_key_and_install_relevant_ones_do() {
        let py = prefixes(&["PIP_", "UV_", "POETRY_", "PYTHON"]);
        let base = keyed_env("pip", &py, &env(&[("PIP_INDEX_URL", "https://a/")]));
        let noisy = env(&[
            ("PIP_INDEX_URL", "https://a/"),
            ("PYTHONPATH", "/x"),
            ("PYTHONHASHSEED", "1234"),
            ("PYTHONDONTWRITEBYTECODE", "1"),
            ("PYTHONWARNINGS", "ignore"),
            ("PIP_PROGRESS_BAR", "off"),
            ("PIP_NO_INPUT", "1"),
            ("PIP_CONFIG_FILE", "/dev/null"),
        ]);
        assert_eq!(keyed_env("pip", &py, &noisy), base);
        assert_ne!(
            keyed_env("pip", &py, &env(&[("PIP_INDEX_URL", "https://b/")])),
            base
        );
        let node = prefixes(&["npm_config_", "NPM_CONFIG_", "NODE_ENV"]);
        let none = keyed_env("npm", &node, &Env::new());
        for quiet in [
            env(&[("NODE_ENV", "test")]),
            env(&[("NODE_ENV", "development")]),
            env(&[("npm_config_loglevel", "silly")]),
            env(&[
                ("NPM_CONFIG_LOGLEVEL", "warn"),
                ("npm_config_fund", "false"),
            ]),
            env(&[("npm_config_update_notifier", "false")]),
        ] {
            assert_eq!(keyed_env("npm", &node, &quiet), none, "{quiet:?}");
        }
        assert_ne!(
            keyed_env("npm", &node, &env(&[("NODE_ENV", "production")])),
            none
        );
        assert_ne!(
            keyed_env("npm", &node, &env(&[("npm_config_omit", "dev")])),
            none
        );
        // A custom entry keys what its prefixes say.
        let custom = keyed_env("custom", &py, &env(&[("PYTHONHASHSEED", "1")]));
        assert_eq!(custom.len(), 1);
    }

    #[test]
    fn the_install_does_not_see_what_does_not_key() {
        let e = env(&[
            ("PYTHONPATH", "/x"),
            ("PIP_INDEX_URL", "u"),
            ("NODE_ENV", "test"),
        ]);
        assert_eq!(install_env_removals("uv", &e), ["PYTHONPATH"]);
        assert_eq!(install_env_removals("pnpm", &e), ["NODE_ENV"]);
        assert!(install_env_removals("npm", &env(&[("NODE_ENV", "production")])).is_empty());
        assert!(install_env_removals("custom", &e).is_empty());
    }

    proptest! {
        /// Whatever the value of a runtime-only variable, the key's environment entries are
        /// the same; and NODE_ENV keys only as production-or-not.
        #[test]
        fn runtime_values_never_reach_the_key(
            seed in "[0-9a-z/:]{0,12}",
            node_env in "[a-z]{0,12}",
            other in "[A-Za-z0-9_]{1,12}",
        ) {
            let py = prefixes(&["PIP_", "PYTHON"]);
            let with = env(&[
                ("PYTHONHASHSEED", &seed),
                (&format!("PYTHON{other}"), &seed),
                ("PIP_PROGRESS_BAR", &seed),
            ]);
            prop_assert_eq!(keyed_env("pip", &py, &with), keyed_env("pip", &py, &Env::new()));
            let node = prefixes(&["npm_config_", "NODE_ENV"]);
            let a = keyed_env("npm", &node, &env(&[("NODE_ENV", &node_env)]));
            let b = keyed_env("npm", &node, &Env::new());
            prop_assert_eq!(a == b, node_env != "production");
        }

        /// Every install-relevant variable's value keys: two values differ in the key.
        #[test]
        fn install_settings_always_key(a in "[a-z0-9:/.]{0,10}", b in "[a-z0-9:/.]{0,10}") {
            let p = prefixes(&["UV_"]);
            let ka = keyed_env("uv", &p, &env(&[("UV_INDEX_URL", &a)]));
            let kb = keyed_env("uv", &p, &env(&[("UV_INDEX_URL", &b)]));
            prop_assert_eq!(ka == kb, a == b);
        }

        /// The parser never panics, and a `-r` line is always followed.
        #[test]
        fn requirement_parsing_is_total(text in "[ -~\n\\\\#]{0,200}", f in "[a-z]{1,8}\\.txt") {
            let _ = requirement_refs(&text);
            // (A blank line ends a `\` continuation the text may leave open.)
            let with = format!("{text}\n\n-r {f}\n");
            prop_assert!(requirement_refs(&with).contains(&ReqRef::Requirements(f)));
        }
    }

    #[test]
    fn requirement_files_are_parsed_as_pip_reads_them() {
        let text = "# top\n-r base.txt\n--requirement=more/dev.txt\n-c constraints.txt \
                    # pins\nsix==1.0 # not a path\n-e .\n-e ./libs/a[extra]\n./libs/b\n\
                    vr @ file:///w/vr-1.0-py3-none-any.whl\n--index-url https://x/\n\
                    -e git+https://example.org/x.git#egg=x\nfile:../c#egg=c\n-r \\\n  cont.txt\n";
        assert_eq!(
            requirement_refs(text),
            vec![
                ReqRef::Requirements("base.txt".into()),
                ReqRef::Requirements("more/dev.txt".into()),
                ReqRef::Constraints("constraints.txt".into()),
                ReqRef::Local(".".into()),
                ReqRef::Local("./libs/a".into()),
                ReqRef::Local("./libs/b".into()),
                ReqRef::Local("/w/vr-1.0-py3-none-any.whl".into()),
                ReqRef::Local("../c".into()),
                ReqRef::Requirements("cont.txt".into()),
            ]
        );
    }

    #[test]
    fn includes_are_followed_once_relative_to_their_file() {
        let files: BTreeMap<PathBuf, &str> = [
            ("/p/requirements.txt", "-r requirements/dev.txt\n-e .\n"),
            ("/p/requirements/dev.txt", "-r base.txt\n-c ../c.txt\n"),
            (
                "/p/requirements/base.txt",
                "-r dev.txt\n./dist/x-1.0.tar.gz\n",
            ),
        ]
        .into_iter()
        .map(|(p, t)| (PathBuf::from(p), t))
        .collect();
        let mut read = |p: &Path| files.get(p).map(|t| t.to_string());
        let got: Vec<PathBuf> =
            follow_requirements(Path::new("/p"), &["requirements.txt".into()], &mut read)
                .into_iter()
                .map(|f| f.path)
                .collect();
        let want: Vec<PathBuf> = [
            "/p/c.txt",
            "/p/dist/x-1.0.tar.gz",
            "/p/pyproject.toml",
            "/p/requirements/base.txt",
            "/p/requirements/dev.txt",
            "/p/setup.cfg",
            "/p/setup.py",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(got, want);
    }

    fn paths(files: &[ConfigFile]) -> Vec<String> {
        files.iter().map(|f| f.path.display().to_string()).collect()
    }

    #[test]
    fn config_files_follow_each_tools_search_order() {
        let home = Path::new("/home/u");
        let project = Path::new("/home/u/src/p");
        let managed = [project.join(".cargo-home")];
        let e = env(&[]);
        let w = Where {
            env: &e,
            home,
            project,
            managed: &managed,
            node: Some(Path::new("/opt/node/bin/node")),
            npm_dir: Some(Path::new("/opt/node/lib/node_modules/npm")),
        };
        let mut none = |_: &Path| None;
        assert_eq!(
            paths(&config_files("npm", &w, &mut none)),
            [
                "/opt/node/lib/node_modules/npm/npmrc",
                "/home/u/.npmrc",
                "/opt/node/etc/npmrc"
            ]
        );
        assert!(
            paths(&config_files("pnpm", &w, &mut none))
                .contains(&"/home/u/.config/pnpm/rc".to_string())
        );
        let yarn = paths(&config_files("yarn", &w, &mut none));
        for want in [
            "/home/u/.yarnrc",
            "/home/u/.yarnrc.yml",
            "/.yarnrc.yml",
            "/home/u/src/.yarnrc",
        ] {
            assert!(yarn.contains(&want.to_string()), "{want} not in {yarn:?}");
        }
        assert_eq!(
            paths(&config_files("pip", &w, &mut none)),
            [
                "/etc/xdg/pip/pip.conf",
                "/etc/pip.conf",
                "/home/u/.pip/pip.conf",
                "/home/u/.config/pip/pip.conf"
            ]
        );
        assert_eq!(
            paths(&config_files("uv", &w, &mut none)),
            [
                "/home/u/.config/uv/uv.toml",
                "/etc/xdg/uv/uv.toml",
                "/etc/uv/uv.toml"
            ]
        );
        let cargo = paths(&config_files("cargo", &w, &mut none));
        assert!(cargo.contains(&"/home/u/.cargo/config.toml".to_string()));
        assert!(cargo.contains(&"/.cargo/config.toml".to_string()));

        // Moved by the environment, and by settings in earlier files.
        let e = env(&[
            ("XDG_CONFIG_HOME", "/cfg"),
            ("XDG_CONFIG_DIRS", "/sys1:/sys2"),
            ("PIP_CONFIG_FILE", "/x/pip.ini"),
            ("NPM_CONFIG_USERCONFIG", "/x/npmrc"),
            ("CARGO_HOME", "/home/u/src/p/.cargo-home"),
        ]);
        let w = Where { env: &e, ..w };
        let mut read =
            |p: &Path| (p == Path::new("/x/npmrc")).then(|| "prefix = /pfx\n".to_string());
        assert_eq!(
            paths(&config_files("npm", &w, &mut read)),
            [
                "/opt/node/lib/node_modules/npm/npmrc",
                "/x/npmrc",
                "/pfx/etc/npmrc"
            ]
        );
        assert_eq!(
            paths(&config_files("pip", &w, &mut read)),
            [
                "/sys1/pip/pip.conf",
                "/sys2/pip/pip.conf",
                "/etc/pip.conf",
                "/home/u/.pip/pip.conf",
                "/cfg/pip/pip.conf",
                "/x/pip.ini"
            ]
        );
        assert!(paths(&config_files("pnpm", &w, &mut read)).contains(&"/cfg/pnpm/rc".to_string()));
        // CARGO_HOME inside a managed dir is empty when the install starts: not an input.
        assert!(
            !paths(&config_files("cargo", &w, &mut read))
                .iter()
                .any(|p| p.contains(".cargo-home"))
        );
        let e = env(&[
            ("PIP_CONFIG_FILE", "/dev/null"),
            ("UV_CONFIG_FILE", "/u.toml"),
        ]);
        let w = Where { env: &e, ..w };
        assert!(config_files("pip", &w, &mut none).is_empty());
        assert_eq!(paths(&config_files("uv", &w, &mut none)), ["/u.toml"]);
    }
}
