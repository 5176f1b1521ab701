//! The key of a dependency dir: blake3 of everything the installed tree depends on — lockfile
//! and manifest bytes, the install command, the package manager's and runtime's versions, the
//! config and environment that steer it (values hashed, never stored), OS/arch/libc, and for
//! path-sensitive ecosystems the absolute project path.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use velo_objects::Store;

use super::config::Unit;
use super::user::User;

/// Version commands every key includes: the C library (native addons link it).
const ALWAYS: &[&str] = &["ldd --version"];

/// Outputs of version commands, cached in the store by the identity of the binary they run
/// (path, device, inode, size, mtime), so a warm `velo run` spawns nothing to compute keys.
#[derive(Debug, Default)]
pub struct ToolCache {
    map: BTreeMap<String, String>,
    dirty: bool,
}

const CACHE: &str = "tool-versions-v1.json";

impl ToolCache {
    /// Loads the cache (an unreadable one is empty).
    pub fn load(store: &Store) -> Self {
        let map = store
            .read_cache(CACHE)
            .ok()
            .flatten()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default();
        Self { map, dirty: false }
    }

    /// Saves it if it changed.
    pub fn save(&self, store: &Store) {
        if self.dirty
            && let Ok(data) = serde_json::to_vec(&self.map)
            && let Err(e) = store.write_cache(CACHE, &data)
        {
            tracing::warn!("could not save the tool version cache: {e}");
        }
    }

    /// The output of `command` run as `user` in `dir` (cached).
    pub fn output(&mut self, command: &str, user: &User, dir: &Path) -> String {
        let program = command.split_whitespace().next().unwrap_or_default();
        let identity = match which(program) {
            Some(path) => match std::fs::metadata(&path) {
                Ok(md) => format!(
                    "{}:{}:{}:{}:{}",
                    path.display(),
                    md.dev(),
                    md.ino(),
                    md.size(),
                    md.mtime_nsec() + md.mtime() * 1_000_000_000
                ),
                Err(_) => format!("{}:unreadable", path.display()),
            },
            None => return format!("{program}: not found"),
        };
        let cache_key = format!("{command}\0{identity}");
        if let Some(out) = self.map.get(&cache_key) {
            return out.clone();
        }
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .current_dir(dir)
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
        self.map.insert(cache_key, out.clone());
        self.dirty = true;
        out
    }
}

/// Resolves a program name through `$PATH` (names with a `/` are taken as they are).
fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
    })
}

/// Expands `~/` (the user's home) in an input path, relative to the project otherwise.
pub fn input_path(project: &Path, user: &User, input: &str) -> PathBuf {
    match input.strip_prefix("~/") {
        Some(rest) => user.home.join(rest),
        None => project.join(input),
    }
}

/// The hash state shared by all dirs of a unit.
pub fn unit_hasher(
    project: &Path,
    unit: &Unit,
    user: &User,
    tools: &mut ToolCache,
) -> anyhow::Result<blake3::Hasher> {
    let mut h = blake3::Hasher::new();
    put(&mut h, "velo-deps-key", b"v1");
    put(&mut h, "ecosystem", unit.ecosystem.as_bytes());
    put(&mut h, "install", unit.install.as_bytes());
    for (k, v) in &unit.env {
        put(&mut h, "env-set", format!("{k}={v}").as_bytes());
    }
    for input in &unit.inputs {
        let path = input_path(project, user, input);
        match put_file(&mut h, &format!("input {input}"), &path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                put(&mut h, &format!("input {input}"), b"\0absent")
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
    for command in ALWAYS
        .iter()
        .copied()
        .chain(unit.versions.iter().map(String::as_str))
    {
        let out = tools.output(command, user, project);
        put(&mut h, &format!("version {command}"), out.as_bytes());
    }
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| unit.env_prefixes.iter().any(|p| k.starts_with(p.as_str())))
        .collect();
    env.sort();
    for (k, v) in env {
        // The value may be a secret (a registry token): only its hash enters the key.
        put(
            &mut h,
            &format!("environment {k}"),
            blake3::hash(v.as_bytes()).as_bytes(),
        );
    }
    let uname = rustix::system::uname();
    put(&mut h, "os", uname.sysname().to_bytes());
    put(&mut h, "arch", uname.machine().to_bytes());
    if unit.path_sensitive {
        use std::os::unix::ffi::OsStrExt;
        put(&mut h, "project path", project.as_os_str().as_bytes());
    }
    Ok(h)
}

/// Feeds one named field into the key: name, NUL, length (u64 LE), bytes.
fn put(h: &mut blake3::Hasher, name: &str, value: &[u8]) {
    h.update(name.as_bytes());
    h.update(&[0]);
    h.update(&(value.len() as u64).to_le_bytes());
    h.update(value);
}

/// Feeds a file's bytes as a field, exactly as [`put`] would, read through one small buffer
/// (a lockfile can be megabytes, and a buffer that size is fresh memory to fault in on every
/// `velo run`). A file that changes length while read is an error (the key is then not used).
fn put_file(h: &mut blake3::Hasher, name: &str, path: &Path) -> std::io::Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    h.update(name.as_bytes());
    h.update(&[0]);
    h.update(&len.to_le_bytes());
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
    if read == len {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "it changed while being read ({len} bytes, then {read})"
        )))
    }
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
