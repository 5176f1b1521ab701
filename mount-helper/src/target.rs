//! Opening mount targets and upper dirs safely: every component of the path is opened by fd,
//! one at a time from `/`, never following a symlink; missing directories are created relative
//! to their parent's fd. What was resolved is used by fd afterwards, so a later rename of a
//! component cannot redirect a mount.
//!
//! Why every component: the kernel follows a symlink anywhere but in the last component even
//! with `O_NOFOLLOW` (and in the last one too when the path ends in `/`), so a symlink an
//! ordinary user owns in a *parent* directory could steer root's mount, or its upper dir's
//! writes, into any directory (`/etc`), deterministically or as a rename race.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use velo_objects::Store;

use crate::error::{MountError, Result};

/// Mode of the directories velo creates on the way to a target or an upper dir.
const NEW_DIR_MODE: u32 = 0o755;

/// `PROC_SUPER_MAGIC` from `<linux/magic.h>`.
const PROC_SUPER_MAGIC: rustix::fs::FsWord = 0x9fa0;
/// `SYSFS_MAGIC` from `<linux/magic.h>`.
const SYSFS_MAGIC: rustix::fs::FsWord = 0x6265_6572;

/// Walks up at most this many directories when comparing identities (a path cannot be deeper:
/// PATH_MAX is 4096 bytes).
const MAX_DEPTH: usize = 4096;

/// A directory reached from `/` one component at a time without following a symlink.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// An `O_PATH` fd of the directory.
    pub fd: OwnedFd,
    /// An `O_PATH` fd of its parent (`None` for `/`).
    pub parent: Option<OwnedFd>,
    /// Its name in the parent (empty for `/`).
    pub name: OsString,
    /// Its absolute path: the path given, made absolute and with `.`/`..` applied. As no
    /// symlink was followed on the way, this is the directory's real path.
    pub path: PathBuf,
    /// True if the last component was created here.
    pub created: bool,
}

/// Why a path could not be resolved.
#[derive(Debug)]
pub(crate) enum ResolveError {
    /// This component (absolute path) is a symlink.
    Symlink(PathBuf),
    /// This component exists but is not a directory.
    NotADirectory(PathBuf),
    /// This component does not exist (and was not to be created).
    Missing(PathBuf),
    /// A system call on this component failed.
    Io(&'static str, PathBuf, Errno),
    /// A directory would have been created in a place refused by the caller's guard.
    Refused(String),
}

impl ResolveError {
    /// A reason to show after the path the user gave.
    pub(crate) fn reason(&self, given: &Path) -> String {
        match self {
            ResolveError::Symlink(at) if at == given => format!(
                "is a symlink; velo mounts over no symlink and follows none in a mount path: \
                 pass the real path (`realpath {}`)",
                given.display()
            ),
            ResolveError::Symlink(at) => format!(
                "its component {} is a symlink; velo follows no symlink in a mount path (one \
                 could steer the mount into another directory): pass the real path",
                at.display()
            ),
            ResolveError::NotADirectory(at) if at == given => "is not a directory".to_owned(),
            ResolveError::NotADirectory(at) => {
                format!("its component {} is not a directory", at.display())
            }
            ResolveError::Missing(at) if at == given => "does not exist".to_owned(),
            ResolveError::Missing(at) => {
                format!("its component {} does not exist", at.display())
            }
            ResolveError::Io(op, at, e) => format!("{op} {}: {e}", at.display()),
            ResolveError::Refused(reason) => reason.clone(),
        }
    }
}

/// The path made absolute (against the working directory), without `.` components; `..` is
/// kept, to be walked physically.
fn absolute_components(path: &Path) -> std::io::Result<Vec<Component<'_>>> {
    if path.as_os_str().is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty path",
        ));
    }
    Ok(path
        .components()
        .filter(|c| !matches!(c, Component::CurDir | Component::RootDir))
        .collect())
}

/// Opens one component beneath `dir` as `O_PATH`, never following a symlink (an fd of the
/// symlink itself comes back, and the caller refuses it by its type).
fn step(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    loop {
        match rustix::fs::openat2(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            // A concurrent rename may make the kernel ask for a retry.
            Err(Errno::AGAIN) | Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// A check of the existing directory under which a missing one is about to be created:
/// `Some(reason)` refuses the creation.
pub(crate) type CreateGuard<'a> = &'a dyn Fn(BorrowedFd<'_>) -> Option<String>;

/// Resolves `path` to a directory, one component at a time from `/` (the working directory's
/// real path first, for a relative path), never following a symlink. With `create`, missing
/// directories are made (mode 0755) relative to their parent's fd, once `guard` has accepted
/// that parent.
pub(crate) fn resolve_dir(
    path: &Path,
    create: Option<CreateGuard<'_>>,
) -> Result<Resolved, ResolveError> {
    let start = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir().map_err(|e| {
            ResolveError::Io(
                "find the working directory for",
                path.to_owned(),
                Errno::from_io_error(&e).unwrap_or(Errno::INVAL),
            )
        })?
    };
    let comps = absolute_components(path).map_err(|_| ResolveError::Missing(path.to_owned()))?;
    // A relative path is walked from `/` too, through the working directory's real path
    // (getcwd has no symlinks in it): every component is checked the same way.
    let mut all: Vec<OsString> = Vec::new();
    if !path.is_absolute() {
        all.extend(start.components().filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            _ => None,
        }));
    }
    all.extend(comps.iter().map(|c| c.as_os_str().to_owned()));

    let root = Path::new("/");
    let mut fd = step_root().map_err(|e| ResolveError::Io("open", root.to_owned(), e))?;
    let mut parent: Option<OwnedFd> = None;
    let mut name = OsString::new();
    let mut lexical: Vec<OsString> = Vec::new();
    let mut created = false;
    for comp in all {
        if comp == ".." {
            // Physically, through the fd: the parent of a directory reached without symlinks
            // is its lexical parent.
            let up = step(fd.as_fd(), OsStr::new(".."))
                .map_err(|e| ResolveError::Io("open", join(&lexical).join(".."), e))?;
            lexical.pop();
            fd = up;
            parent = if lexical.is_empty() {
                None
            } else {
                Some(
                    step(fd.as_fd(), OsStr::new(".."))
                        .map_err(|e| ResolveError::Io("open", join(&lexical).join(".."), e))?,
                )
            };
            name = lexical.last().cloned().unwrap_or_default();
            created = false;
            continue;
        }
        lexical.push(comp.clone());
        let here = join(&lexical);
        let (next, made) = match step(fd.as_fd(), &comp) {
            Ok(next) => (next, false),
            Err(Errno::NOENT) if create.is_some() => {
                if let Some(reason) = create.and_then(|guard| guard(fd.as_fd())) {
                    return Err(ResolveError::Refused(reason));
                }
                match rustix::fs::mkdirat(&fd, comp.as_os_str(), Mode::from_raw_mode(NEW_DIR_MODE))
                {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(ResolveError::Io("create directory", here, e)),
                }
                let next = step(fd.as_fd(), &comp)
                    .map_err(|e| ResolveError::Io("open", here.clone(), e))?;
                (next, true)
            }
            Err(Errno::NOENT) => return Err(ResolveError::Missing(here)),
            Err(Errno::LOOP) => return Err(ResolveError::Symlink(here)),
            Err(Errno::NOTDIR) => return Err(ResolveError::NotADirectory(here)),
            Err(e) => return Err(ResolveError::Io("open", here, e)),
        };
        let st = rustix::fs::fstat(&next).map_err(|e| ResolveError::Io("stat", here.clone(), e))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {}
            FileType::Symlink => return Err(ResolveError::Symlink(here)),
            _ => return Err(ResolveError::NotADirectory(here)),
        }
        parent = Some(std::mem::replace(&mut fd, next));
        name = comp;
        created = made;
    }
    Ok(Resolved {
        fd,
        parent,
        name,
        path: join(&lexical),
        created,
    })
}

/// Opens the directory `name` beneath `parent` (`path` names it in errors), creating it
/// (mode 0755) with `create`, never following a symlink. Returns an `O_PATH` fd.
pub(crate) fn open_child_dir(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    path: &Path,
    create: bool,
) -> Result<OwnedFd, ResolveError> {
    if create {
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(NEW_DIR_MODE)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(ResolveError::Io("create directory", path.to_owned(), e)),
        }
    }
    let fd = match step(parent, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Err(ResolveError::Missing(path.to_owned())),
        Err(Errno::LOOP) => return Err(ResolveError::Symlink(path.to_owned())),
        Err(e) => return Err(ResolveError::Io("open", path.to_owned(), e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| ResolveError::Io("stat", path.to_owned(), e))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Ok(fd),
        FileType::Symlink => Err(ResolveError::Symlink(path.to_owned())),
        _ => Err(ResolveError::NotADirectory(path.to_owned())),
    }
}

/// A readable fd of the directory an `O_PATH` fd refers to (for `fchown`, `fchmod`, and as an
/// overlay layer): `openat(fd, ".")`, which resolves nothing by name.
pub(crate) fn reopen_dir(fd: BorrowedFd<'_>) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn step_root() -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(
        "/",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn join(comps: &[OsString]) -> PathBuf {
    let mut p = PathBuf::from("/");
    for c in comps {
        p.push(c);
    }
    p
}

/// (device, inode) of an open file.
pub(crate) fn identity(fd: BorrowedFd<'_>) -> rustix::io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// True if the directory `fd` is `ancestor` or lies beneath it: walks up through `..` by fd,
/// comparing (device, inode), up to `/`.
pub(crate) fn is_within(fd: BorrowedFd<'_>, ancestor: (u64, u64)) -> rustix::io::Result<bool> {
    let mut cur = rustix::io::dup(fd)?;
    for _ in 0..MAX_DEPTH {
        let id = identity(cur.as_fd())?;
        if id == ancestor {
            return Ok(true);
        }
        let up = step(cur.as_fd(), OsStr::new(".."))?;
        if identity(up.as_fd())? == id {
            return Ok(false); // `/` (or this process's root)
        }
        cur = up;
    }
    Ok(false)
}

/// Why a directory is no place for a mount (or for new directories on the way to one):
/// on a proc or sysfs filesystem, or the store or inside it. `None` if it is acceptable.
fn forbidden_place(store_id: (u64, u64), store: &Path, dir: BorrowedFd<'_>) -> Option<String> {
    if let Ok(fs) = rustix::fs::fstatfs(dir)
        && (fs.f_type == PROC_SUPER_MAGIC || fs.f_type == SYSFS_MAGIC)
    {
        return Some(
            "is on a proc or sysfs filesystem; velo never mounts over the kernel's own filesystems"
                .into(),
        );
    }
    match identity(dir) {
        Ok(id) if id == store_id => {
            return Some(format!(
                "is the store {}; velo never mounts over its own store",
                store.display()
            ));
        }
        Ok(_) => {}
        Err(e) => return Some(format!("cannot be checked against the store ({e})")),
    }
    match is_within(dir, store_id) {
        Ok(false) => None,
        Ok(true) => Some(format!(
            "is inside the store {}; velo never mounts inside its own store",
            store.display()
        )),
        Err(e) => Some(format!("cannot be checked against the store ({e})")),
    }
}

/// Opens (creating it with `create`) the mount target `path` without following a symlink in
/// any component, and refuses places velo never mounts over: `/`, anything under `/proc` or
/// `/sys` (or on a proc or sysfs filesystem), the store itself, anything inside it, and any
/// directory holding it (compared by device and inode, walking up by fd, not by name). Nothing
/// is created in a refused place.
pub(crate) fn open_target(store: &Store, path: &Path, create: bool) -> Result<Resolved> {
    let bad = |reason: String| MountError::BadTarget {
        path: path.to_owned(),
        reason,
    };
    let root_refused = || bad("is the root directory; velo never mounts over /".into());
    // /proc and /sys by name first, before anything is opened or created there.
    let abs = std::path::absolute(path).map_err(|e| MountError::io("resolve", path, e))?;
    let mut names = abs
        .components()
        .filter(|c| matches!(c, Component::Normal(_)));
    match names.next() {
        None => return Err(root_refused()),
        Some(Component::Normal(first)) if first == "proc" || first == "sys" => {
            return Err(bad(format!(
                "is under /{}; velo never mounts over the kernel's own filesystems",
                first.to_string_lossy()
            )));
        }
        _ => {}
    }
    let store_id =
        identity(store.root_fd()).map_err(|e| MountError::io("stat", store.root(), e))?;
    let guard = |dir: BorrowedFd<'_>| {
        forbidden_place(store_id, store.root(), dir).map(|why| {
            let why = why.replace("is the store", "is inside the store");
            format!("cannot be created: the directory it would go in {why}")
        })
    };
    let resolved = resolve_dir(path, create.then_some(&guard as CreateGuard<'_>)).map_err(|e| {
        let hint = if matches!(e, ResolveError::Missing(_)) {
            " (omit --no-mkdir to create it)"
        } else {
            ""
        };
        bad(format!("{}{hint}", e.reason(path)))
    })?;
    if resolved.parent.is_none() {
        return Err(root_refused());
    }
    if let Some(why) = forbidden_place(store_id, store.root(), resolved.fd.as_fd()) {
        return Err(bad(why));
    }
    let target_id = identity(resolved.fd.as_fd()).map_err(|e| MountError::io("stat", path, e))?;
    if is_within(store.root_fd(), target_id)
        .map_err(|e| MountError::io("walk up from", store.root(), e))?
    {
        return Err(bad(format!(
            "holds the store {}; a mount here would hide it",
            store.root().display()
        )));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: Option<CreateGuard<'static>> = Some(&|_| None);

    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("velo-target-")
            .tempdir()
            .unwrap()
    }

    #[test]
    fn a_symlink_in_any_component_is_refused_and_named() {
        let dir = tempdir();
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("sub")).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // The last component, with and without a trailing slash.
        for given in [link.clone(), PathBuf::from(format!("{}/", link.display()))] {
            match resolve_dir(&given, None) {
                Err(ResolveError::Symlink(at)) => assert_eq!(at, link),
                other => panic!("{given:?}: {other:?}"),
            }
        }
        // A parent component; nothing is created behind it.
        match resolve_dir(&link.join("sub/new"), ANY) {
            Err(ResolveError::Symlink(at)) => assert_eq!(at, link),
            other => panic!("{other:?}"),
        }
        assert!(!real.join("sub/new").exists(), "created through a symlink");
        // `link/..` is not taken lexically: link is never walked.
        match resolve_dir(&link.join("..").join("real"), None) {
            Err(ResolveError::Symlink(at)) => assert_eq!(at, link),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_directories_are_created_beneath_their_parent_fd() {
        let dir = tempdir();
        let want = dir.path().join("a/b/c");
        let r = resolve_dir(&want, ANY).unwrap();
        assert!(r.created);
        assert_eq!(r.path, want);
        assert_eq!(r.name, "c");
        assert!(want.is_dir());
        let again = resolve_dir(&want, None).unwrap();
        assert!(!again.created);
        assert_eq!(
            identity(again.fd.as_fd()).unwrap(),
            identity(r.fd.as_fd()).unwrap()
        );
        // `..` and `.` are walked, and the path shown is the real one.
        let odd = dir.path().join("a/./b/../b/c/");
        assert_eq!(resolve_dir(&odd, None).unwrap().path, want);
        match resolve_dir(&dir.path().join("a/nope/x"), None) {
            Err(ResolveError::Missing(at)) => assert_eq!(at, dir.path().join("a/nope")),
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.path().join("file"), "x").unwrap();
        match resolve_dir(&dir.path().join("file/x"), ANY) {
            Err(ResolveError::NotADirectory(at)) => assert_eq!(at, dir.path().join("file")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_need_not_be_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempdir();
        let odd = dir.path().join(OsStr::from_bytes(b"caf\xe9"));
        let r = resolve_dir(&odd.join("x"), ANY).unwrap();
        assert_eq!(r.path, odd.join("x"));
        assert!(odd.join("x").is_dir());
    }

    #[test]
    fn the_root_resolves_without_a_parent() {
        let r = resolve_dir(Path::new("/"), None).unwrap();
        assert!(r.parent.is_none());
        assert_eq!(r.path, Path::new("/"));
        let r = resolve_dir(Path::new("/.."), None).unwrap();
        assert!(r.parent.is_none());
    }

    #[test]
    fn is_within_compares_identities_walking_up() {
        let dir = tempdir();
        std::fs::create_dir_all(dir.path().join("s/in/deep")).unwrap();
        std::fs::create_dir_all(dir.path().join("other")).unwrap();
        let s = resolve_dir(&dir.path().join("s"), None).unwrap();
        let deep = resolve_dir(&dir.path().join("s/in/deep"), None).unwrap();
        let other = resolve_dir(&dir.path().join("other"), None).unwrap();
        let sid = identity(s.fd.as_fd()).unwrap();
        assert!(is_within(deep.fd.as_fd(), sid).unwrap());
        assert!(is_within(s.fd.as_fd(), sid).unwrap());
        assert!(!is_within(other.fd.as_fd(), sid).unwrap());
        // Renamed after it was opened: the fd still knows where it is.
        std::fs::rename(dir.path().join("s"), dir.path().join("moved")).unwrap();
        assert!(is_within(deep.fd.as_fd(), sid).unwrap());
    }

    #[test]
    fn targets_velo_never_mounts_over_are_refused() {
        let dir = tempdir();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let refused = |p: &Path, create: bool, want: &str| match open_target(&store, p, create) {
            Err(MountError::BadTarget { reason, .. }) => {
                assert!(reason.contains(want), "{p:?}: {reason}")
            }
            other => panic!("{p:?}: {other:?}"),
        };
        refused(Path::new("/"), false, "root directory");
        refused(Path::new("/tmp/.."), false, "root directory");
        refused(Path::new("/proc/x"), true, "under /proc");
        refused(Path::new("/proc/sys/fs"), false, "under /proc");
        refused(Path::new("/sys/kernel"), false, "under /sys");
        refused(store.root(), false, "is the store");
        refused(&store.root().join("images"), false, "inside the store");
        refused(&store.root().join("new/dir"), true, "inside the store");
        refused(dir.path(), false, "holds the store");
        let ok = dir.path().join("mnt");
        assert_eq!(open_target(&store, &ok, true).unwrap().path, ok);
    }
}
