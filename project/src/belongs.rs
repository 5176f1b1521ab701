//! Which project and dir each dependency ref was made for, so `velo ls` and `velo status` name
//! a tree by what it is, not only by its key. A ref is named by its key alone
//! (`deps/<ecosystem>/<key>`), and one key may serve several projects (two npm projects with
//! the same lockfile share a tree), so each ref maps to the list of (project, dir) that
//! resolved to it. Kept where the key cache is: the store's `cache/` for root (or a user's own
//! store), the user's cache dir otherwise — the names there are the user's own ref names, as
//! velo-mountd lists them to the user.

use std::collections::BTreeMap;
use std::path::Path;

use crate::ManagedDir;
use crate::key::CacheAt;

const FILE: &str = "ref-projects-v1.json";
/// Refs remembered at most (the record starts over past it).
const MAX_REFS: usize = 4096;
/// Projects remembered per ref at most (the oldest go first).
const MAX_PER_REF: usize = 16;
/// The record is at most this large; a bigger file is not velo's and is ignored.
const MAX_BYTES: u64 = 16 << 20;

/// One project dir a ref was made for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Belongs {
    /// The project (absolute; not UTF-8 bytes shown as U+FFFD).
    pub project: String,
    /// The dir, relative to the project.
    pub dir: String,
}

/// Ref name → the project dirs it was made for.
pub type Record = BTreeMap<String, Vec<Belongs>>;

/// The record (empty if there is none or it cannot be read).
pub fn load(at: &CacheAt<'_>) -> Record {
    let data = match at {
        CacheAt::Store(store) => store.read_cache(FILE, MAX_BYTES).ok().flatten(),
        CacheAt::Dir(dir) => std::fs::read(dir.join(FILE)).ok(),
    };
    data.and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default()
}

/// Adds `dirs` (of `project`) to `record`; true if anything was new.
fn add(record: &mut Record, project: &Path, dirs: &[ManagedDir]) -> bool {
    let mut changed = false;
    for d in dirs {
        let entry = Belongs {
            project: project.to_string_lossy().into_owned(),
            dir: d.dir.clone(),
        };
        if record.get(&d.ref_name).is_some_and(|l| l.contains(&entry)) {
            continue;
        }
        if record.len() >= MAX_REFS && !record.contains_key(&d.ref_name) {
            record.clear(); // rare: start over rather than track ages
        }
        let list = record.entry(d.ref_name.clone()).or_default();
        if list.len() >= MAX_PER_REF {
            list.remove(0);
        }
        list.push(entry);
        changed = true;
    }
    changed
}

/// Records that each of `dirs` of `project` resolves to its ref (written only when something
/// is new; a failure to record only costs `velo ls` the name).
pub fn record(at: &CacheAt<'_>, project: &Path, dirs: &[ManagedDir]) {
    let mut rec = load(at);
    if !add(&mut rec, project, dirs) {
        return;
    }
    let Ok(data) = serde_json::to_vec(&rec) else {
        return;
    };
    let saved = match at {
        CacheAt::Store(store) => store.write_cache(FILE, &data).map_err(|e| e.to_string()),
        CacheAt::Dir(dir) => {
            let tmp = dir.join(format!(".{FILE}.{}", std::process::id()));
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&tmp, &data))
                .and_then(|()| std::fs::rename(&tmp, dir.join(FILE)))
                .map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    format!("{}: {e}", dir.join(FILE).display())
                })
        }
    };
    if let Err(e) = saved {
        tracing::warn!("could not record which project each ref belongs to: {e}");
    }
}

/// `list` as words: `/p (node_modules), /q (node_modules)`.
pub fn describe(list: &[Belongs]) -> String {
    list.iter()
        .map(|b| format!("{} ({})", b.project, b.dir))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(d: &str, r: &str) -> ManagedDir {
        ManagedDir {
            unit: 0,
            ecosystem: "npm".into(),
            dir: d.into(),
            path: Path::new("/p").join(d),
            key: "k".into(),
            ref_name: r.into(),
        }
    }

    #[test]
    fn each_ref_lists_every_project_dir_once() {
        let mut rec = Record::new();
        let nm = [dir("node_modules", "deps/npm/a")];
        assert!(add(&mut rec, Path::new("/p"), &nm));
        assert!(!add(&mut rec, Path::new("/p"), &nm), "recorded once");
        assert!(add(&mut rec, Path::new("/q"), &nm));
        assert_eq!(
            describe(&rec["deps/npm/a"]),
            "/p (node_modules), /q (node_modules)"
        );
        for i in 0..MAX_PER_REF + 3 {
            add(&mut rec, Path::new(&format!("/x{i}")), &nm);
        }
        assert_eq!(rec["deps/npm/a"].len(), MAX_PER_REF);
        assert_eq!(
            rec["deps/npm/a"].last().map(|b| b.project.as_str()),
            Some(format!("/x{}", MAX_PER_REF + 2).as_str())
        );
    }
}
