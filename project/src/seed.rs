//! Builds that start from the previous tree: an entry of velo.toml with `seed = true` (cargo's)
//! installs on top of the tree last built for the same dir of the same project, so a changed
//! lockfile downloads only what is new. For cargo, what the new Cargo.lock no longer names is
//! then pruned from the Cargo home's registry cache and sources, so the tree holds what a fresh
//! `cargo fetch` would have fetched (plus index entries, which are small).
//!
//! Which tree was built last is recorded per project and dir in velo's cache (the store's for
//! root, the user's own otherwise).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::key::CacheAt;

const FILE: &str = "last-built-v1.json";
/// Projects × dirs remembered at most (the map starts over past it).
const MAX: usize = 4096;

/// The record's key for `dir` of `project` built for `owner` (a tree another user owns is no
/// start for this one's).
fn slot(owner: (u32, u32), project: &Path, dir: &str) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h = blake3::Hasher::new();
    h.update(format!("{}:{}\0", owner.0, owner.1).as_bytes());
    h.update(project.as_os_str().as_bytes());
    h.update(b"\0");
    h.update(dir.as_bytes());
    h.finalize().to_hex()[..32].to_owned()
}

/// The record is at most this large (a line per project and dir; far more than any machine
/// has): a bigger file is not velo's and is ignored.
const MAX_BYTES: u64 = 16 << 20;

fn load(at: &CacheAt<'_>) -> BTreeMap<String, String> {
    let data = match at {
        CacheAt::Store(store) => store.read_cache(FILE, MAX_BYTES).ok().flatten(),
        CacheAt::Dir(dir) => std::fs::read(dir.join(FILE)).ok(),
    };
    data.and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default()
}

/// The ref of the tree last built for `owner` for `dir` of `project`, if one was recorded.
pub fn last_built(
    at: &CacheAt<'_>,
    owner: (u32, u32),
    project: &Path,
    dir: &str,
) -> Option<String> {
    load(at).remove(&slot(owner, project, dir))
}

/// Records `ref_name` as the tree last built for `owner` for `dir` of `project` (a failure to
/// record only costs the next build its head start).
pub fn record_built(
    at: &CacheAt<'_>,
    owner: (u32, u32),
    project: &Path,
    dir: &str,
    ref_name: &str,
) {
    let mut map = load(at);
    if map.len() >= MAX {
        map.clear();
    }
    map.insert(slot(owner, project, dir), ref_name.to_owned());
    let Ok(data) = serde_json::to_vec(&map) else {
        return;
    };
    let saved = match at {
        CacheAt::Store(store) => store.write_cache(FILE, &data).map_err(|e| e.to_string()),
        CacheAt::Dir(dir) => {
            let tmp = dir.join(format!(".{FILE}.{}", std::process::id()));
            std::fs::write(&tmp, &data)
                .and_then(|()| std::fs::rename(&tmp, dir.join(FILE)))
                .map_err(|e| e.to_string())
        }
    };
    if let Err(e) = saved {
        tracing::warn!("could not record the tree last built: {e}");
    }
}

/// The `name-version` of every package of a Cargo.lock that comes from a registry (the names
/// of their `.crate` files and source dirs in a Cargo home). Pure; unparsable text names none.
pub fn cargo_lock_crates(text: &str) -> BTreeSet<String> {
    let Ok(lock) = text.parse::<toml::Table>() else {
        return BTreeSet::new();
    };
    lock.get("package")
        .and_then(|p| p.as_array())
        .map(|packages| {
            packages
                .iter()
                .filter_map(|p| {
                    let source = p.get("source")?.as_str()?;
                    if !(source.starts_with("registry+") || source.starts_with("sparse+")) {
                        return None;
                    }
                    Some(format!(
                        "{}-{}",
                        p.get("name")?.as_str()?,
                        p.get("version")?.as_str()?
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Removes from the Cargo home `home` the downloaded crates (`registry/cache/*/NAME-VER.crate`)
/// and unpacked sources (`registry/src/*/NAME-VER`) that `keep` does not name. Returns how
/// many entries went.
pub fn prune_cargo_home(home: &Path, keep: &BTreeSet<String>) -> std::io::Result<usize> {
    let mut removed = 0;
    for (sub, suffix) in [("registry/cache", ".crate"), ("registry/src", "")] {
        let Ok(registries) = std::fs::read_dir(home.join(sub)) else {
            continue;
        };
        for registry in registries.flatten() {
            let Ok(entries) = std::fs::read_dir(registry.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                let Some(stem) = name.strip_suffix(suffix) else {
                    continue;
                };
                if keep.contains(stem) {
                    continue;
                }
                let path = e.path();
                if e.file_type()?.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Prunes the Cargo home `home` to what the lockfile at `lock` names (see
/// [`prune_cargo_home`]); an unreadable lockfile prunes nothing.
pub fn prune_to_lockfile(home: &Path, lock: &Path) -> std::io::Result<usize> {
    let text = std::fs::read_to_string(lock)?;
    let keep = cargo_lock_crates(&text);
    if keep.is_empty() {
        return Ok(0); // nothing parsed: better keep everything than empty the cache
    }
    prune_cargo_home(home, &keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cargo_home_is_pruned_to_what_the_lockfile_names() {
        let lock = "version = 4\n\n[[package]]\nname = \"app\"\nversion = \"0.1.0\"\n\n\
                    [[package]]\nname = \"one\"\nversion = \"1.0.0\"\n\
                    source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\n\
                    [[package]]\nname = \"two\"\nversion = \"2.0.0\"\n\
                    source = \"sparse+http://127.0.0.1:1/index/\"\n\n\
                    [[package]]\nname = \"g\"\nversion = \"0.1.0\"\nsource = \"git+https://x/g#abc\"\n";
        let keep = cargo_lock_crates(lock);
        assert_eq!(
            keep.iter().map(String::as_str).collect::<Vec<_>>(),
            ["one-1.0.0", "two-2.0.0"]
        );
        assert!(cargo_lock_crates("not toml [").is_empty());

        let home = tempfile::tempdir().expect("tempdir");
        let h = home.path();
        for f in [
            "registry/cache/r-1/one-1.0.0.crate",
            "registry/cache/r-1/old-0.9.0.crate",
            "registry/src/r-1/one-1.0.0/lib.rs",
            "registry/src/r-1/old-0.9.0/lib.rs",
            "registry/index/r-1/.cache/ol/d/old",
        ] {
            std::fs::create_dir_all(h.join(f).parent().expect("parent")).expect("mkdir");
            std::fs::write(h.join(f), "x").expect("write");
        }
        assert_eq!(prune_cargo_home(h, &keep).expect("pruned"), 2);
        assert!(h.join("registry/cache/r-1/one-1.0.0.crate").exists());
        assert!(h.join("registry/src/r-1/one-1.0.0/lib.rs").exists());
        assert!(!h.join("registry/cache/r-1/old-0.9.0.crate").exists());
        assert!(!h.join("registry/src/r-1/old-0.9.0").exists());
        assert!(h.join("registry/index/r-1/.cache/ol/d/old").exists());
    }

    #[test]
    fn the_last_build_is_remembered_per_project_and_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = CacheAt::Dir(dir.path().to_owned());
        let p = Path::new("/p");
        let me = (1000, 1000);
        assert_eq!(last_built(&at, me, p, ".cargo-home"), None);
        record_built(&at, me, p, ".cargo-home", "deps/cargo/a");
        record_built(&at, me, Path::new("/q"), ".cargo-home", "deps/cargo/b");
        assert_eq!(
            last_built(&at, me, p, ".cargo-home").as_deref(),
            Some("deps/cargo/a")
        );
        assert_eq!(last_built(&at, me, p, "other"), None);
        assert_eq!(last_built(&at, (1001, 1001), p, ".cargo-home"), None);
    }
}
