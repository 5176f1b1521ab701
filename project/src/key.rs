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

/// What a warm `velo run` need not recompute, cached in the store: the outputs of version
/// commands by the identity of the binary they run (path, device, inode, size, mtime), so
/// nothing is spawned to compute keys; and each input file's blake3 by its stat (device,
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

const CACHE: &str = "key-cache-v2.json";

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
/// Input digests kept at most (the least recently recorded go first).
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
        if let Some(out) = self.data.tools.get(&cache_key) {
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
        self.data.tools.insert(cache_key, out.clone());
        self.dirty = true;
        out
    }
}

fn nanos(secs: i64, nsec: i64) -> u64 {
    (secs as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(nsec as u64)
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
    cache: &mut KeyCache,
) -> anyhow::Result<blake3::Hasher> {
    let mut h = blake3::Hasher::new();
    put(&mut h, "velo-deps-key", b"v3");
    // v3: the owner of the installed tree keys it, so no user is ever handed a tree another
    // user installed (it would be theirs, and not writable by this one).
    put(
        &mut h,
        "owner",
        format!("{}:{}", user.uid, user.gid).as_bytes(),
    );
    put(&mut h, "ecosystem", unit.ecosystem.as_bytes());
    put(&mut h, "install", unit.install.as_bytes());
    for (k, v) in &unit.env {
        put(&mut h, "env-set", format!("{k}={v}").as_bytes());
    }
    for input in &unit.inputs {
        let path = input_path(project, user, input);
        // v2: an input enters as the blake3 of its bytes (cached by stat), not the bytes.
        match cache.input_digest(&path) {
            Ok(digest) => put(&mut h, &format!("input {input}"), digest.as_bytes()),
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
        let out = cache.output(command, user, project);
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
