//! The key of a dependency dir: blake3 of everything the installed tree depends on, and of
//! nothing else — lockfile and manifest bytes, the install command, the package manager's and
//! runtime's versions (asked of the real binary, not of a version manager's shim), the config
//! files that steer it wherever the tool looks for them and the files requirements include
//! (see [`crate::inputs`]), the environment variables that change what it writes (values
//! hashed, never stored), OS/arch/libc, and for path-sensitive ecosystems the absolute project
//! path. [`gather`] does the I/O; [`KeyInputs::hasher`] is the pure part.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::ffi::OsString;

use anyhow::Context;
use velo_objects::Store;

use super::config::Unit;
use super::inputs::{self, Env};
use super::tools;
use super::user::User;

/// Version commands every key includes: the C library (native addons link it).
const ALWAYS: &[&str] = &["ldd --version"];

/// What a warm `velo run` need not recompute, cached in the store: the outputs of version
/// commands by the identity of the binary they really run (path, device, inode, size, mtime)
/// and the version managers' selection state, and which binary a shim stands for, so nothing
/// is spawned to compute keys; and each input file's blake3 by its stat (device,
/// inode, size, mtime, ctime), so an unchanged lockfile is not read again.
#[derive(Debug)]
pub struct KeyCache {
    data: CacheData,
    dirty: bool,
    racy_ns: u64,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct CacheData {
    tools: BTreeMap<String, String>,
    inputs: BTreeMap<PathBuf, InputDigest>,
}

/// An input file's digest and the stat it was taken under.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct InputDigest {
    stat: [u64; 5],
    blake3: String,
}

const CACHE: &str = "key-cache-v3.json";

/// Where the key cache lives: in the store (root, which owns it), or in the user's own cache
/// directory (an ordinary user, who never opens the store).
#[derive(Debug)]
pub enum CacheAt<'a> {
    /// The store's `cache/`.
    Store(&'a Store),
    /// A directory of the user's (see [`crate::user_cache_dir`]).
    Dir(PathBuf),
}

/// Writes `data` to `path` through a temporary file beside it, renamed into place.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), String> {
    let dir = path.parent().ok_or("no parent directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    std::fs::write(&tmp, data).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("rename into {}: {e}", path.display())
    })
}
/// Input digests (and tool answers) kept at most.
const MAX_INPUTS: usize = 4096;
/// The most read of the cache: [`MAX_INPUTS`] entries of a path, a digest and a stat each.
const MAX_CACHE_BYTES: u64 = 16 << 20;
/// A file whose ctime is this close to now may still change within the same timestamp tick:
/// its digest is not cached (as git treats "racily clean" index entries).
const RACY_NS: u64 = 2_000_000_000;

impl KeyCache {
    /// Loads the cache (an unreadable one is empty).
    pub fn load(at: &CacheAt<'_>) -> Self {
        let data = match at {
            CacheAt::Store(store) => store.read_cache(CACHE, MAX_CACHE_BYTES).ok().flatten(),
            CacheAt::Dir(dir) => std::fs::read(dir.join(CACHE)).ok(),
        }
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default();
        Self {
            data,
            dirty: false,
            racy_ns: RACY_NS,
        }
    }

    /// Saves it if it changed.
    pub fn save(&self, at: &CacheAt<'_>) {
        if !self.dirty {
            return;
        }
        let Ok(data) = serde_json::to_vec(&self.data) else {
            return;
        };
        let saved = match at {
            CacheAt::Store(store) => store.write_cache(CACHE, &data).map_err(|e| e.to_string()),
            CacheAt::Dir(dir) => write_atomically(&dir.join(CACHE), &data),
        };
        if let Err(e) = saved {
            tracing::warn!("could not save the key cache: {e}");
        }
    }

    /// blake3 of the file at `path`, from the cache if its stat is the one recorded.
    /// `NotFound` if there is no such file.
    pub fn input_digest(&mut self, path: &Path) -> std::io::Result<blake3::Hash> {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let md = file.metadata()?;
        let stat = [
            md.dev(),
            md.ino(),
            md.size(),
            nanos(md.mtime(), md.mtime_nsec()),
            nanos(md.ctime(), md.ctime_nsec()),
        ];
        if let Some(hit) = self.data.inputs.get(path)
            && hit.stat == stat
            && let Ok(h) = blake3::Hash::from_hex(&hit.blake3)
        {
            return Ok(h);
        }
        let mut h = blake3::Hasher::new();
        let mut buf = [0u8; 16 << 10];
        let mut read = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                    read += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let digest = h.finalize();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let settled = file.metadata().is_ok_and(|again| {
            again.ctime() == md.ctime() && again.ctime_nsec() == md.ctime_nsec()
        });
        if read == md.size() && settled && stat[4].saturating_add(self.racy_ns) < now {
            if self.data.inputs.len() >= MAX_INPUTS {
                self.data.inputs.clear(); // rare: start over rather than track ages
            }
            self.data.inputs.insert(
                path.to_owned(),
                InputDigest {
                    stat,
                    blake3: digest.to_hex().to_string(),
                },
            );
            self.dirty = true;
        }
        Ok(digest)
    }

    /// The identity of the binary at `path`: canonical path, device, inode, size, mtime.
    fn identity(path: &Path) -> String {
        match std::fs::metadata(path) {
            Ok(md) => format!(
                "{}:{}:{}:{}:{}",
                path.display(),
                md.dev(),
                md.ino(),
                md.size(),
                nanos(md.mtime(), md.mtime_nsec())
            ),
            Err(_) => format!("{}:unreadable", path.display()),
        }
    }

    /// The binary `program` really runs in `env`: found through `PATH`, symlinks followed,
    /// and a version manager's shim asked which binary it stands for now (the answer cached by
    /// the shim's identity and the selection `state`). `None` if there is no such program.
    pub fn real_binary(
        &mut self,
        program: &str,
        user: &User,
        dir: &Path,
        env: &Env,
        state: &blake3::Hash,
    ) -> Option<PathBuf> {
        let found = tools::which(program, env)?;
        let canonical = std::fs::canonicalize(&found).unwrap_or(found);
        let Some(manager) = tools::shim_of(program, &canonical, &tools::head(&canonical)) else {
            return Some(canonical);
        };
        let cache_key = format!(
            "real\0{program}\0{}\0{}",
            Self::identity(&canonical),
            state.to_hex()
        );
        if let Some(hit) = self.data.tools.get(&cache_key) {
            return Some(PathBuf::from(hit));
        }
        let argv = manager.which_command(program);
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(dir)
            .env_clear()
            .envs(env)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        user.apply(&mut cmd);
        let real = cmd
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.lines()
                    .next()
                    .map(str::trim)
                    .filter(|l| l.starts_with('/'))
                    .map(PathBuf::from)
            })
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p));
        // Where the manager does not say (not installed, no version selected), the shim
        // itself: the version command's output then keys whatever it runs. Cached either way,
        // so a warm run asks nothing.
        let real = real.unwrap_or(canonical);
        self.remember(cache_key, real.display().to_string());
        Some(real)
    }

    /// Caches a tool answer (past [`MAX_INPUTS`] answers the cache starts over).
    fn remember(&mut self, key: String, value: String) {
        if self.data.tools.len() >= MAX_INPUTS {
            self.data.tools.clear(); // rare: start over rather than track ages
        }
        self.data.tools.insert(key, value);
        self.dirty = true;
    }

    /// The output of `command` run as `user` in `dir` with `env`, cached by the identity of
    /// the binary it really runs (see [`KeyCache::real_binary`]) and the selection `state`.
    pub fn output(
        &mut self,
        command: &str,
        user: &User,
        dir: &Path,
        env: &Env,
        state: &blake3::Hash,
    ) -> String {
        let program = command.split_whitespace().next().unwrap_or_default();
        let Some(real) = self.real_binary(program, user, dir, env, state) else {
            return format!("{program}: not found");
        };
        let cache_key = format!(
            "out\0{command}\0{}\0{}",
            Self::identity(&real),
            state.to_hex()
        );
        if let Some(out) = self.data.tools.get(&cache_key) {
            return out.clone();
        }
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .current_dir(dir)
            .env_clear()
            .envs(env)
            .stdin(std::process::Stdio::null());
        user.apply(&mut cmd);
        // Everything the command says keys: stdout, stderr (some tools print versions there,
        // `ldd --version` on musl) and the exit status.
        let out = match cmd.output() {
            Ok(o) => format!(
                "{}\n{}\n{:?}",
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim(),
                o.status.code()
            ),
            Err(e) => format!("failed to run: {e}"),
        };
        self.remember(cache_key, out.clone());
        out
    }

    /// The digest of a file the key reads beyond velo.toml's inputs: `None` if absent; an
    /// unreadable one keys as the kind of error (the install, run as the same user, cannot
    /// read it either).
    fn derived_digest(&mut self, path: &Path) -> FileDigest {
        match self.input_digest(path) {
            Ok(d) => FileDigest::Bytes(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileDigest::Absent,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => FileDigest::Absent,
            Err(e) => FileDigest::Unreadable(format!("{:?}", e.kind())),
        }
    }
}

fn nanos(secs: i64, nsec: i64) -> u64 {
    (secs as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(nsec as u64)
}

/// Expands `~/` (the user's home) in an input path, relative to the project otherwise.
pub fn input_path(project: &Path, user: &User, input: &str) -> PathBuf {
    match input.strip_prefix("~/") {
        Some(rest) => user.home.join(rest),
        None => project.join(input),
    }
}

/// What a file contributes to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileDigest {
    /// Its bytes' blake3.
    Bytes(blake3::Hash),
    /// There is no such file.
    Absent,
    /// It exists but cannot be read (the error's kind).
    Unreadable(String),
}

/// Everything a unit's key is made of, gathered by [`gather`]; [`KeyInputs::hasher`] turns it
/// into the key without any I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInputs {
    /// The uid and gid that own the installed tree.
    pub owner: (u32, u32),
    /// The ecosystem.
    pub ecosystem: String,
    /// The install command.
    pub install: String,
    /// velo.toml's `env` of the unit.
    pub env_set: Vec<(String, String)>,
    /// Files, each under a label (velo.toml's input as written, or a role such as "npm user
    /// config"), in a fixed order.
    pub files: Vec<(String, FileDigest)>,
    /// Version commands and their output.
    pub versions: Vec<(String, String)>,
    /// The environment entries that key (see [`inputs::keyed_env`]); values enter hashed.
    pub env: Vec<(String, OsString)>,
    /// The kernel's name and machine.
    pub os: (Vec<u8>, Vec<u8>),
    /// The project path, for path-sensitive ecosystems.
    pub project_path: Option<PathBuf>,
}

impl KeyInputs {
    /// The hash state shared by all dirs of the unit (see [`dir_key`]).
    pub fn hasher(&self) -> blake3::Hasher {
        use std::os::unix::ffi::OsStrExt;
        let mut h = blake3::Hasher::new();
        // v4: only what changes the installed bytes keys (runtime-only variables do not;
        // NODE_ENV as production-or-not), and the tools' config files outside the project,
        // the files requirements include, and the binary behind a version manager's shim do.
        put(&mut h, "velo-deps-key", b"v4");
        // The owner of the installed tree keys it, so no user is ever handed a tree another
        // user installed (it would be theirs, and not writable by this one).
        put(
            &mut h,
            "owner",
            format!("{}:{}", self.owner.0, self.owner.1).as_bytes(),
        );
        put(&mut h, "ecosystem", self.ecosystem.as_bytes());
        put(&mut h, "install", self.install.as_bytes());
        for (k, v) in &self.env_set {
            put(&mut h, "env-set", format!("{k}={v}").as_bytes());
        }
        for (label, digest) in &self.files {
            let name = format!("input {label}");
            match digest {
                FileDigest::Bytes(d) => put(&mut h, &name, d.as_bytes()),
                FileDigest::Absent => put(&mut h, &name, b"\0absent"),
                FileDigest::Unreadable(why) => {
                    put(&mut h, &name, format!("\0unreadable {why}").as_bytes())
                }
            }
        }
        for (command, out) in &self.versions {
            put(&mut h, &format!("version {command}"), out.as_bytes());
        }
        for (k, v) in &self.env {
            // The value may be a secret (a registry token): only its hash enters the key.
            put(
                &mut h,
                &format!("environment {k}"),
                blake3::hash(v.as_bytes()).as_bytes(),
            );
        }
        put(&mut h, "os", &self.os.0);
        put(&mut h, "arch", &self.os.1);
        if let Some(p) = &self.project_path {
            put(&mut h, "project path", p.as_os_str().as_bytes());
        }
        h
    }
}

/// The environment `unit`'s install runs with, as `user`: this process's, switched to the
/// user (see [`User::identity_env`]), with the unit's `env` set, less
/// [`inputs::install_env_removals`]. Also the names removed (the build removes them too).
pub fn install_env(project: &Path, unit: &Unit, user: &User) -> (Env, Vec<String>) {
    let ambient: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let mut env: Env = ambient
        .iter()
        .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v.clone())))
        .collect();
    if !user.is_current() {
        for (k, v) in user.identity_env(&ambient) {
            match v {
                Some(v) => env.insert(k, v),
                None => env.remove(&k),
            };
        }
    }
    for (k, v) in crate::unit_env(unit, project) {
        env.insert(k, v.into());
    }
    let removed = inputs::install_env_removals(&unit.ecosystem, &env);
    for k in &removed {
        env.remove(k);
    }
    (env, removed)
}

/// Reads a text file for the key's rules (`None` if absent or unreadable).
fn read_text(path: &Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|d| String::from_utf8_lossy(&d).into_owned())
}

/// Gathers everything `unit`'s key is made of, from the project, the machine and the
/// environment its install runs with.
pub fn gather(
    project: &Path,
    unit: &Unit,
    user: &User,
    cache: &mut KeyCache,
) -> anyhow::Result<KeyInputs> {
    let (env, _) = install_env(project, unit, user);
    let state = tools::selection_state(
        &env,
        &tools::selection_files(project, &user.home, &env),
        &mut |p| tools::read_small(p),
    );
    let mut files = Vec::new();
    for input in &unit.inputs {
        let path = input_path(project, user, input);
        // An input enters as the blake3 of its bytes (cached by stat), not the bytes.
        match cache.input_digest(&path) {
            Ok(digest) => files.push((input.clone(), FileDigest::Bytes(digest))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                files.push((input.clone(), FileDigest::Absent))
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "read {} (an input of the {} key)",
                        path.display(),
                        unit.ecosystem
                    )
                });
            }
        }
    }
    // The tools' config files outside the project.
    let managed: Vec<PathBuf> = unit.dirs.iter().map(|d| project.join(d)).collect();
    let (node, npm_dir) = if inputs::is_node(&unit.ecosystem) {
        let node = cache.real_binary("node", user, project, &env, &state);
        let npm = cache.real_binary("npm", user, project, &env, &state);
        // npm's bin/npm-cli.js: its package dir is two levels up.
        let npm_dir = npm.and_then(|p| Some(p.parent()?.parent()?.to_owned()));
        (node, npm_dir)
    } else {
        (None, None)
    };
    let place = inputs::Where {
        env: &env,
        home: &user.home,
        project,
        managed: &managed,
        node: node.as_deref(),
        npm_dir: npm_dir.as_deref(),
    };
    let mut derived = inputs::config_files(&unit.ecosystem, &place, &mut |p| read_text(p));
    if unit.ecosystem == "pip" {
        let roots: Vec<String> = unit
            .inputs
            .iter()
            .filter(|i| i.ends_with(".txt") || i.ends_with(".in"))
            .cloned()
            .collect();
        derived.extend(inputs::follow_requirements(project, &roots, &mut |p| {
            read_text(p)
        }));
    }
    if unit.ecosystem == "uv" {
        // uv reinstalls the project when these change (its default cache keys, with
        // pyproject.toml, an input); velo tells uv they did not when their contents key the
        // tree (see `crate::uv`).
        for name in ["setup.py", "setup.cfg"] {
            derived.push(inputs::ConfigFile {
                role: format!("uv project {name}"),
                path: project.join(name),
            });
        }
    }
    for f in derived {
        let digest = cache.derived_digest(&f.path);
        files.push((f.role, digest));
    }
    let mut versions = Vec::new();
    for command in ALWAYS
        .iter()
        .copied()
        .chain(unit.versions.iter().map(String::as_str))
    {
        let out = cache.output(command, user, project, &env, &state);
        versions.push((command.to_owned(), out));
    }
    let uname = rustix::system::uname();
    Ok(KeyInputs {
        owner: (user.uid, user.gid),
        ecosystem: unit.ecosystem.clone(),
        install: unit.install.clone(),
        env_set: unit
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        files,
        versions,
        env: inputs::keyed_env(&unit.ecosystem, &unit.env_prefixes, &env),
        os: (
            uname.sysname().to_bytes().to_vec(),
            uname.machine().to_bytes().to_vec(),
        ),
        project_path: unit.path_sensitive.then(|| project.to_owned()),
    })
}

/// The hash state shared by all dirs of a unit.
pub fn unit_hasher(
    project: &Path,
    unit: &Unit,
    user: &User,
    cache: &mut KeyCache,
) -> anyhow::Result<blake3::Hasher> {
    Ok(gather(project, unit, user, cache)?.hasher())
}

/// Feeds one named field into the key: name, NUL, length (u64 LE), bytes.
fn put(h: &mut blake3::Hasher, name: &str, value: &[u8]) {
    h.update(name.as_bytes());
    h.update(&[0]);
    h.update(&(value.len() as u64).to_le_bytes());
    h.update(value);
}

/// The key of one dir: 32 hex digits.
pub fn dir_key(unit_hasher: &blake3::Hasher, dir: &str) -> String {
    let mut h = unit_hasher.clone();
    h.update(b"dir\0");
    h.update(dir.as_bytes());
    h.finalize().to_hex()[..32].to_owned()
}

/// The ref a dir's image lives under.
pub fn ref_name(unit: &Unit, key: &str) -> String {
    format!("deps/{}/{key}", unit.ecosystem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(racy_ns: u64) -> KeyCache {
        KeyCache {
            data: CacheData::default(),
            dirty: false,
            racy_ns,
        }
    }

    fn inputs() -> KeyInputs {
        KeyInputs {
            owner: (1000, 1000),
            ecosystem: "npm".into(),
            install: "npm ci".into(),
            env_set: vec![("A".into(), "1".into())],
            files: vec![
                (
                    "package-lock.json".into(),
                    FileDigest::Bytes(blake3::hash(b"{}")),
                ),
                ("npm user config".into(), FileDigest::Absent),
            ],
            versions: vec![("node --version".into(), "v20".into())],
            env: vec![("npm_config_omit".into(), "dev".into())],
            os: (b"Linux".to_vec(), b"x86_64".to_vec()),
            project_path: None,
        }
    }

    fn key(k: &KeyInputs) -> String {
        dir_key(&k.hasher(), "node_modules")
    }

    proptest::proptest! {
        /// The key is a function of its inputs: equal inputs, equal keys; a change to any one
        /// of them (a file's bytes or presence, a version, a variable's value, the owner, the
        /// project path) changes the key.
        #[test]
        fn every_input_changes_the_key(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            version in "[ -~]{0,20}",
            value in "[ -~]{0,20}",
            uid in 0u32..5000,
            field in 0usize..7,
        ) {
            let base = inputs();
            proptest::prop_assert_eq!(key(&base), key(&inputs()));
            let mut changed = base.clone();
            match field {
                0 => changed.files[0].1 = FileDigest::Bytes(blake3::hash(&bytes)),
                1 => changed.files[1].1 = FileDigest::Bytes(blake3::hash(&bytes)),
                2 => changed.versions[0].1 = version,
                3 => changed.env[0].1 = value.into(),
                4 => changed.owner.0 = uid,
                5 => changed.project_path = Some(PathBuf::from(format!("/p/{value}"))),
                _ => changed.files[0].1 = FileDigest::Unreadable(value),
            }
            proptest::prop_assert_eq!(changed == base, key(&changed) == key(&base));
        }
    }

    /// A pyenv-style shim (one script for every version) is resolved to the binary it runs
    /// now: switching the version behind it gives that version's output, not the cached one
    /// of the shim; switching back is answered from the cache without running anything.
    #[test]
    fn a_shim_is_resolved_to_its_real_binary_before_its_output_is_cached() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pyenv");
        let script = |path: &Path, text: &str| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let pyenv = root.join("libexec/pyenv");
        script(
            &pyenv,
            &format!(
                "#!/bin/sh\nif [ \"$1\" = which ]; then echo {}/versions/$PYENV_VERSION/bin/$2; exit 0; fi\n\
                 shift; p=$1; shift; exec {}/versions/$PYENV_VERSION/bin/$p \"$@\"\n",
                root.display(),
                root.display()
            ),
        );
        script(
            &root.join("shims/python3"),
            &format!(
                "#!/bin/sh\nprogram=python3\nexec \"{}\" exec \"$program\" \"$@\"\n",
                pyenv.display()
            ),
        );
        for v in ["3.11.7", "3.12.1"] {
            script(
                &root.join(format!("versions/{v}/bin/python3")),
                &format!("#!/bin/sh\necho Python {v}\n"),
            );
        }
        let user = User::invoking(None).unwrap();
        let mut c = cache(0);
        let ask = |c: &mut KeyCache, version: &str| {
            let env: Env = [
                ("PATH", format!("{}/shims:/usr/bin:/bin", root.display())),
                ("PYENV_VERSION", version.to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
            let state = tools::selection_state(&env, &[], &mut |_| None);
            c.output("python3 --version", &user, dir.path(), &env, &state)
        };
        assert!(ask(&mut c, "3.11.7").starts_with("Python 3.11.7\n"));
        assert!(ask(&mut c, "3.12.1").starts_with("Python 3.12.1\n"));
        // Back to the first: answered from the cache (nothing new recorded, nothing run).
        c.dirty = false;
        assert!(ask(&mut c, "3.11.7").starts_with("Python 3.11.7\n"));
        assert!(!c.dirty, "the shim or the version was asked again");
    }

    #[test]
    fn input_digests_are_cached_by_stat_and_never_while_racy() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("uv.lock");
        std::fs::write(&lock, "a = 1\n").unwrap();

        // Just written: its ctime is within the racy window, so nothing is cached.
        let mut fresh = cache(RACY_NS);
        assert_eq!(fresh.input_digest(&lock).unwrap(), blake3::hash(b"a = 1\n"));
        assert!(fresh.data.inputs.is_empty() && !fresh.dirty);

        // Settled (no window): cached, and a hit is served from the cache without reading.
        let mut c = cache(0);
        assert_eq!(c.input_digest(&lock).unwrap(), blake3::hash(b"a = 1\n"));
        assert!(c.dirty);
        let fake = blake3::hash(b"from the cache");
        c.data.inputs.get_mut(&lock).unwrap().blake3 = fake.to_hex().to_string();
        assert_eq!(c.input_digest(&lock).unwrap(), fake);

        // Changed (another size, so whatever the timestamp granularity): read again.
        std::fs::write(&lock, "a = 22\n").unwrap();
        assert_eq!(c.input_digest(&lock).unwrap(), blake3::hash(b"a = 22\n"));
        assert_eq!(
            c.input_digest(&dir.path().join("absent"))
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::NotFound
        );
    }
}
