//! What velo does for uv beyond running its install:
//!
//! - [`build_env`]: a build installs into a tmpfs (or a dir on another filesystem than uv's
//!   cache), where uv's default hardlinks fail and it warns "Failed to hardlink files; falling
//!   back to full copy" on every build. Unless the user chose a link mode somewhere uv reads
//!   one, the build runs with `UV_LINK_MODE=copy` — what uv falls back to anyway, so the tree
//!   is the same bytes and the key does not change.
//! - [`cache_record_venvs`] / [`agree_cache_records`]: uv decides whether the project installed
//!   in the venv is up to date by its cache record (`uv_cache.json` in its dist-info: the
//!   newest ctime of the files of uv's `cache-keys`, by default `pyproject.toml`, `setup.py`,
//!   `setup.cfg`, and the creation time of `src/`). A content-neutral touch, or a fresh
//!   clone, changes those times; `uv run` then reinstalls the project into the run's
//!   copy-on-write upper, which is dropped at exit — so it reinstalls on every run. When the
//!   key covers those files' contents (so the image was built from the very same bytes), velo
//!   writes the record uv would write now into the run's overlay before the command starts.
//!   A project with its own `cache-keys` is left alone.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use velo_objects::fsutil;

use crate::config::{Config, Unit};
use crate::inputs::{self, Env};
use crate::user::User;
use crate::{ManagedDir, unit_env};

/// The uv setting that chooses how packages are linked from the cache into the venv.
const LINK_MODE: &str = "link-mode";

/// True if `text` (TOML) sets `link-mode` at its top level or under `[pip]` (`uv.toml`), or
/// under `[tool.uv]` / `[tool.uv.pip]` (`pyproject.toml`, `pyproject`). A file that does not
/// parse counts as setting it if it names it at all (uv would refuse it anyway; velo does not
/// guess).
fn sets_link_mode(text: &str, pyproject: bool) -> bool {
    let Ok(doc) = toml::from_str::<toml::Table>(text) else {
        return text.contains(LINK_MODE);
    };
    let table = if pyproject {
        match doc
            .get("tool")
            .and_then(|t| t.get("uv"))
            .and_then(toml::Value::as_table)
        {
            Some(t) => t,
            None => return false,
        }
    } else {
        &doc
    };
    table.contains_key(LINK_MODE)
        || table
            .get("pip")
            .and_then(toml::Value::as_table)
            .is_some_and(|p| p.contains_key(LINK_MODE))
}

/// Whether the user chose uv's link mode anywhere uv reads it: `UV_LINK_MODE`, the project's
/// `uv.toml` or `pyproject.toml` (`[tool.uv]`), the user's and system's `uv.toml` or
/// `UV_CONFIG_FILE` (see [`inputs::config_files`]). `read` gives a file's text.
pub fn link_mode_configured(
    env: &Env,
    home: &Path,
    project: &Path,
    managed: &[PathBuf],
    read: &mut dyn FnMut(&Path) -> Option<String>,
) -> bool {
    if env.get("UV_LINK_MODE").is_some_and(|v| !v.is_empty()) {
        return true;
    }
    let place = inputs::Where {
        env,
        home,
        project,
        managed,
        node: None,
        npm_dir: None,
    };
    let mut files: Vec<(PathBuf, bool)> = inputs::config_files("uv", &place, read)
        .into_iter()
        .map(|f| (f.path, false))
        .collect();
    if env.get("UV_NO_CONFIG").is_none_or(|v| v.is_empty()) {
        files.push((project.join("uv.toml"), false));
        files.push((project.join("pyproject.toml"), true));
    }
    files
        .iter()
        .any(|(path, pyproject)| read(path).is_some_and(|t| sets_link_mode(&t, *pyproject)))
}

/// The variables `unit`'s install is run with: velo.toml's `env` for it, and for uv
/// `UV_LINK_MODE=copy` where the user chose no link mode (see the module's docs).
pub fn build_env(unit: &Unit, project: &Path, user: &User) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = unit_env(unit, project).into_iter().collect();
    if unit.ecosystem == "uv" {
        let (install_env, _) = crate::key::install_env(project, unit, user);
        let managed: Vec<PathBuf> = unit.dirs.iter().map(|d| project.join(d)).collect();
        let configured =
            link_mode_configured(&install_env, &user.home, project, &managed, &mut |p| {
                std::fs::read_to_string(p).ok()
            });
        if !configured {
            env.insert("UV_LINK_MODE".into(), "copy".into());
        }
    }
    env
}

/// The files uv's default `cache-keys` time, in the project.
const DEFAULT_CACHE_KEY_FILES: [&str; 3] = ["pyproject.toml", "setup.py", "setup.cfg"];
/// The directory uv's default `cache-keys` record the creation time of.
const DEFAULT_CACHE_KEY_DIR: &str = "src";

/// True if the project's `pyproject.toml` sets its own `[tool.uv] cache-keys` (then velo
/// leaves uv's records alone: it cannot know what they cover).
fn own_cache_keys(doc: &toml::Table) -> bool {
    doc.get("tool")
        .and_then(|t| t.get("uv"))
        .and_then(toml::Value::as_table)
        .is_some_and(|t| t.contains_key("cache-keys"))
}

/// How the dist-info dirs of the project named in `[project] name` start: the name
/// normalized as wheels spell it (lowercase, each run of `-`, `_`, `.` one `_`), then `-`.
fn dist_info_prefix(doc: &toml::Table) -> Option<String> {
    let name = doc.get("project")?.get("name")?.as_str()?;
    let mut out = String::with_capacity(name.len() + 1);
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('_') {
                out.push('_');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out.push('-');
    Some(out)
}

/// The uv cache records velo makes agree in a run: see [`cache_record_venvs`].
#[derive(Debug, Default)]
pub struct CacheRecords {
    /// The venvs.
    venvs: Vec<PathBuf>,
    /// How the project's dist-info dir is named (`None`: any dist-info installed from the
    /// project dir, as its `direct_url.json` says; only read when the name is not known).
    prefix: Option<String>,
}

/// The venvs of `dirs` whose uv cache records velo may make agree with the project's files
/// (see the module's docs): the dirs of uv entries whose key covers every file of uv's
/// default cache keys (`pyproject.toml` is an input; `setup.py` and `setup.cfg` key every uv
/// tree), in projects that do not set their own `cache-keys`.
pub fn cache_record_venvs(project: &Path, config: &Config, dirs: &[ManagedDir]) -> CacheRecords {
    let covered = |u: &Unit| u.ecosystem == "uv" && u.inputs.iter().any(|i| i == "pyproject.toml");
    if !config.units.iter().any(covered) {
        return CacheRecords::default();
    }
    let doc = match std::fs::read_to_string(project.join("pyproject.toml"))
        .ok()
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
    {
        Some(doc) if !own_cache_keys(&doc) => doc,
        _ => return CacheRecords::default(),
    };
    CacheRecords {
        venvs: dirs
            .iter()
            .filter(|d| config.units.get(d.unit).is_some_and(covered))
            .map(|d| d.path.clone())
            .collect(),
        prefix: dist_info_prefix(&doc),
    }
}

/// A `SystemTime` as serde writes it (and uv reads it): seconds and nanoseconds since the
/// epoch.
fn time_value(t: std::time::SystemTime) -> serde_json::Value {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    serde_json::json!({ "secs_since_epoch": d.as_secs(), "nanos_since_epoch": d.subsec_nanos() })
}

/// The newest ctime of the default cache-key files that exist in `project`, as uv computes
/// its record's `timestamp` (JSON `null` if there is none).
fn current_timestamp(project: &Path) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt;
    let newest = DEFAULT_CACHE_KEY_FILES
        .iter()
        .filter_map(|f| std::fs::metadata(project.join(f)).ok())
        .filter(std::fs::Metadata::is_file)
        .map(|md| {
            std::time::UNIX_EPOCH
                + std::time::Duration::new(
                    u64::try_from(md.ctime()).unwrap_or(0),
                    u32::try_from(md.ctime_nsec()).unwrap_or(0),
                )
        })
        .max();
    newest.map_or(serde_json::Value::Null, time_value)
}

/// uv's record of the `src` dir now: its creation time (else its inode), `null` if absent.
/// `None` if it cannot be told (then the record is left as it is).
fn current_src(project: &Path) -> Option<serde_json::Value> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(project.join(DEFAULT_CACHE_KEY_DIR)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(serde_json::Value::Null),
        Err(_) => None,
        Ok(md) if !md.is_dir() => None,
        Ok(md) => Some(match md.created() {
            Ok(t) => time_value(t),
            Err(_) => serde_json::Value::from(md.ino()),
        }),
    }
}

/// The record uv would write now for the project, given the one in the image: the timestamp
/// of the files as they are now, and `src`'s entry where it existed then and now alike (or
/// was absent then and now). `None` if the record is not one of uv's default cache keys (a
/// commit, tags or variables in it) or nothing differs.
pub fn agreed_record(recorded: &serde_json::Value, project: &Path) -> Option<serde_json::Value> {
    let obj = recorded.as_object()?;
    let empty = |k: &str| match obj.get(k) {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Object(m)) => m.is_empty(),
        Some(_) => false,
    };
    if !(empty("commit") && empty("tags") && empty("env")) {
        return None;
    }
    let mut agreed = obj.clone();
    agreed.insert("timestamp".into(), current_timestamp(project));
    if let Some(serde_json::Value::Object(dirs)) = agreed.get_mut("directories") {
        if dirs.keys().any(|k| k != DEFAULT_CACHE_KEY_DIR) {
            return None;
        }
        let now = current_src(project);
        let same_existence = match (dirs.get(DEFAULT_CACHE_KEY_DIR), &now) {
            (Some(then), Some(now)) => then.is_null() == now.is_null(),
            _ => false,
        };
        if let (true, Some(now)) = (same_existence, now) {
            dirs.insert(DEFAULT_CACHE_KEY_DIR.into(), now);
        }
    }
    let agreed = serde_json::Value::Object(agreed);
    (agreed != *recorded).then_some(agreed)
}

/// Opens `rel` beneath `dir`, following no symlink and never leaving `dir` (the tree is the
/// user's; root may be the one writing).
/// The directory `rel` beneath `dir`, symlinks refused.
fn open_dir(dir: BorrowedFd<'_>, rel: &str) -> Option<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
    fsutil::open_beneath(dir, rel, flags, Mode::empty()).ok()
}

/// The names in the directory `fd` that are UTF-8.
fn names(fd: &OwnedFd) -> Vec<String> {
    fsutil::list_dir(fd.as_fd())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| n.into_string().ok())
        .collect()
}

/// The text of the small regular file `rel` beneath `dir` (at most 64 KiB; a FIFO or device
/// there is refused without blocking: the tree comes from the user's image, and root may be
/// the one reading).
fn read_small(dir: BorrowedFd<'_>, rel: &str) -> Option<String> {
    let (fd, st) = fsutil::open_regular_beneath(dir, rel, OFlags::RDONLY, Mode::empty()).ok()?;
    String::from_utf8(fsutil::read_capped(fd.as_fd(), &st, 64 << 10).ok()?).ok()
}

/// `%XX` escapes of a URL's path decoded.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Whether a dist-info's `direct_url.json` says it was installed from the directory `project`.
fn installed_from(direct_url: &str, project: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(v) = serde_json::from_str::<serde_json::Value>(direct_url) else {
        return false;
    };
    let Some(path) = v["url"]
        .as_str()
        .and_then(|u| u.strip_prefix("file://"))
        .and_then(percent_decode)
    else {
        return false;
    };
    let path = path.strip_suffix(b"/").unwrap_or(&path);
    path == project.as_os_str().as_bytes()
}

/// In the run's namespace, with the venvs mounted (their upper writable, dropped at exit),
/// before the command starts: makes the uv cache record of the project installed in each
/// venv of `records` agree with the project's files now (see the module's docs). Never fails the run:
/// a record it cannot fix is left to uv, which reinstalls as it would.
pub fn agree_cache_records(project: &Path, records: &CacheRecords) {
    for venv in &records.venvs {
        if let Err(e) = agree_in(project, venv, records.prefix.as_deref()) {
            tracing::info!("{}: uv's cache record left as it is ({e})", venv.display());
        }
    }
}

fn agree_in(project: &Path, venv: &Path, prefix: Option<&str>) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let root = rustix::fs::open(
        venv,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("open {}", venv.display()))?;
    let Some(lib) = open_dir(root.as_fd(), "lib") else {
        return Ok(()); // not a venv (yet)
    };
    for python in names(&lib).into_iter().filter(|n| n.starts_with("python")) {
        let rel = format!("lib/{python}/site-packages");
        let Some(site) = open_dir(root.as_fd(), &rel) else {
            continue;
        };
        // (Only the project's own dist-info is read where its name is known: a warm run
        // reads no other package's files.)
        for info in names(&site)
            .into_iter()
            .filter(|n| n.ends_with(".dist-info") && prefix.is_none_or(|p| n.starts_with(p)))
        {
            let Some(url) = read_small(site.as_fd(), &format!("{info}/direct_url.json")) else {
                continue;
            };
            if !installed_from(&url, project) {
                continue;
            }
            let rel = format!("{info}/uv_cache.json");
            let Some(text) = read_small(site.as_fd(), &rel) else {
                continue;
            };
            let path = venv.join(format!("lib/{python}/site-packages/{rel}"));
            let recorded: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let Some(agreed) = agreed_record(&recorded, project) else {
                continue;
            };
            let (fd, _) = fsutil::open_regular_beneath(
                site.as_fd(),
                &rel,
                OFlags::WRONLY | OFlags::TRUNC,
                Mode::empty(),
            )
            .with_context(|| format!("open {} for writing", path.display()))?;
            let mut file = std::fs::File::from(fd);
            file.write_all(agreed.to_string().as_bytes())
                .with_context(|| format!("write {}", path.display()))?;
            tracing::info!(
                "{}: uv's cache record made to agree with the project's files (their contents \
                 key the tree)",
                path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The venv comes from the user's image and root may be the one reading it: a FIFO where
    /// uv's record belongs is refused, not opened (which would block the run forever).
    #[test]
    fn a_fifo_for_uvs_record_is_refused_without_blocking() {
        #![allow(clippy::unwrap_used)]
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("proj");
        std::fs::create_dir_all(&project).unwrap();
        let info = dir
            .path()
            .join("venv/lib/python3.11/site-packages/vrproj-0.1.dist-info");
        std::fs::create_dir_all(&info).unwrap();
        let url = format!(
            r#"{{"url":"file://{}","dir_info":{{"editable":true}}}}"#,
            project.display()
        );
        std::fs::write(info.join("direct_url.json"), url).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            info.join("uv_cache.json"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let venv = dir.path().join("venv");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(agree_in(&project, &venv, Some("vrproj")).is_ok());
        });
        let done = rx.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(done, Ok(true), "agreeing uv's record blocked on a FIFO");
    }

    #[test]
    fn a_link_mode_set_anywhere_uv_reads_one_is_the_users_choice() {
        assert!(sets_link_mode("link-mode = \"symlink\"\n", false));
        assert!(sets_link_mode("[pip]\nlink-mode = \"copy\"\n", false));
        assert!(!sets_link_mode("compile-bytecode = true\n", false));
        assert!(sets_link_mode(
            "[tool.uv]\nlink-mode = \"hardlink\"\n",
            true
        ));
        assert!(!sets_link_mode(
            "link-mode = 1\n[project]\nname = \"x\"\n",
            true
        ));
        assert!(
            sets_link_mode("link-mode = [", false),
            "unparsable: not guessed"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        let project = home.join("p");
        let mut files: BTreeMap<PathBuf, String> = BTreeMap::new();
        let check = |env: &Env, files: &BTreeMap<PathBuf, String>| {
            link_mode_configured(env, &home, &project, &[], &mut |p| files.get(p).cloned())
        };
        let none = Env::new();
        assert!(!check(&none, &files));
        let with = |k: &str, v: &str| -> Env { [(k.to_owned(), v.into())].into() };
        assert!(check(&with("UV_LINK_MODE", "hardlink"), &files));
        assert!(!check(&with("UV_LINK_MODE", ""), &files));
        files.insert(
            home.join(".config/uv/uv.toml"),
            "link-mode = \"clone\"\n".into(),
        );
        assert!(check(&none, &files));
        assert!(!check(&with("UV_NO_CONFIG", "1"), &files));
        files.clear();
        files.insert(
            project.join("pyproject.toml"),
            "[tool.uv]\nlink-mode = \"copy\"\n".into(),
        );
        assert!(check(&none, &files));
        files.clear();
        files.insert(project.join("uv.toml"), "link-mode = \"copy\"\n".into());
        assert!(check(&none, &files));
    }

    #[test]
    fn a_record_agrees_with_the_files_now_only_for_default_cache_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::write(p.join("pyproject.toml"), "[project]\n").expect("write");
        let now = current_timestamp(p);
        assert!(now["secs_since_epoch"].as_u64().is_some(), "{now}");
        let old = serde_json::json!({
            "timestamp": {"secs_since_epoch": 1, "nanos_since_epoch": 2},
            "commit": null, "tags": null, "env": {}, "directories": {"src": null}
        });
        let agreed = agreed_record(&old, p).expect("differs");
        assert_eq!(agreed["timestamp"], now);
        assert_eq!(agreed["directories"]["src"], serde_json::Value::Null);
        assert_eq!(agreed_record(&agreed, p), None, "nothing left to change");
        // src/ made since: uv's layout check stands (the record keeps `null`).
        std::fs::create_dir(p.join("src")).expect("mkdir");
        let agreed = agreed_record(&old, p).expect("differs");
        assert_eq!(agreed["directories"]["src"], serde_json::Value::Null);
        // Present then and now: today's.
        let mut then = old.clone();
        then["directories"]["src"] = serde_json::json!(12345);
        let agreed = agreed_record(&then, p).expect("differs");
        assert_ne!(agreed["directories"]["src"], serde_json::json!(12345));
        assert!(!agreed["directories"]["src"].is_null());
        // A record of other cache keys is left alone.
        for (k, v) in [
            ("commit", serde_json::json!("abc")),
            ("env", serde_json::json!({"X": "1"})),
        ] {
            let mut other = old.clone();
            other[k] = v;
            assert_eq!(agreed_record(&other, p), None, "{k}");
        }
        let doc = |t: &str| toml::from_str::<toml::Table>(t).expect("toml");
        assert!(own_cache_keys(&doc("[tool.uv]\ncache-keys = [\"x\"]\n")));
        assert!(!own_cache_keys(&doc("[tool.uv]\npackage = true\n")));
        assert_eq!(
            dist_info_prefix(&doc("[project]\nname = \"My.Cool--Pkg\"\n")).as_deref(),
            Some("my_cool_pkg-")
        );
        assert_eq!(dist_info_prefix(&doc("[tool.poetry]\n")), None);
    }

    #[test]
    fn a_direct_url_names_the_project_it_was_installed_from() {
        let p = Path::new("/home/u/my proj");
        assert!(installed_from(
            r#"{"url":"file:///home/u/my%20proj","dir_info":{"editable":true}}"#,
            p
        ));
        assert!(installed_from(r#"{"url":"file:///home/u/my%20proj/"}"#, p));
        assert!(!installed_from(r#"{"url":"file:///home/u/other"}"#, p));
        assert!(!installed_from(r#"{"url":"https://x/"}"#, p));
        assert!(!installed_from("not json", p));
    }
}
