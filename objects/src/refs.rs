//! Refs: names for image digests (`refs/<name…>`), written atomically and durably.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, OpenError, open_beneath, open_dir_beneath, open_regular_beneath};
use crate::store::{Area, Store};

/// Longest accepted ref name.
pub const MAX_REF_LEN: usize = 240;

/// The most velo reads of a ref's history: one line (about 80 bytes) per change, and GC's keep
/// policy drops old ones, so a real one holds a few KiB.
pub const MAX_HISTORY_BYTES: u64 = 8 << 20;

/// Names of the files [`Store::replace_file`] stages in `tmp/` start with this.
pub(crate) const WRITE_PREFIX: &str = "write-";

/// Checks a ref name: components of `[A-Za-z0-9._+@-]` separated by single `/`, none empty or
/// starting with `.` (so no `.`/`..`, no hidden or temporary names), no leading `/`, and not
/// itself a digest (names and digests are accepted in the same places).
pub fn validate_ref_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(StoreError::InvalidRef {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("a ref name is not empty");
    }
    if name.len() > MAX_REF_LEN {
        return bad("a ref name has at most 240 characters");
    }
    if name.starts_with('/') {
        return bad("a ref name is relative, not an absolute path");
    }
    for comp in name.split('/') {
        if comp.is_empty() {
            return bad("a ref name has no empty component (no `//`, no trailing `/`)");
        }
        if comp == ".." || comp == "." {
            return bad("a ref name has no `.` or `..` component");
        }
        if comp.starts_with('.') {
            return bad("no component of a ref name starts with `.`");
        }
        if !comp
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'@'))
        {
            return bad("a ref name has only letters, digits, `/` and `._+@-`");
        }
    }
    if Digest::parse(name).is_ok() {
        return bad("a ref name must not look like an image digest");
    }
    Ok(())
}

impl Store {
    /// The digest a ref points at.
    pub fn read_ref(&self, name: &str) -> Result<Digest> {
        validate_ref_name(name)?;
        let path = self.area_path(Area::Refs).join(name);
        let refs = self.open_area(Area::Refs)?;
        let fd = match open_regular_beneath(refs.as_fd(), name, OFlags::RDONLY, Mode::empty()) {
            Ok((fd, _)) => fd,
            // A directory is where refs below the name live (`deps` of `deps/npm/…`).
            Err(OpenError::Sys(Errno::NOENT | Errno::NOTDIR))
            | Err(OpenError::NotRegular(rustix::fs::FileType::Directory)) => {
                return Err(StoreError::RefNotFound {
                    name: name.to_owned(),
                    store: self.root().to_owned(),
                });
            }
            Err(e) => return Err(StoreError::from_open("open ref", path, e)),
        };
        let mut buf = [0u8; 128];
        let n = fsutil::pread_full(fd.as_fd(), &mut buf, 0).ctx("read ref", &path)?;
        let corrupt = |reason: String| StoreError::CorruptRef {
            name: name.to_owned(),
            path: path.clone(),
            reason,
        };
        let text = std::str::from_utf8(&buf[..n]).map_err(|_| corrupt("not text".into()))?;
        Digest::parse(text.trim_end_matches('\n')).map_err(|e| corrupt(e.to_string()))
    }

    /// Resolves what a user typed: a digest of an image in the store, or a ref name.
    /// Either way the image must exist.
    pub fn resolve(&self, name_or_digest: &str) -> Result<Digest> {
        let digest = match Digest::parse(name_or_digest) {
            Ok(d) => d,
            Err(_)
                if name_or_digest.len() == 64
                    && name_or_digest.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                return Err(StoreError::InvalidDigest {
                    text: name_or_digest.to_owned(),
                    reason: "a digest has only lowercase hex digits 0-9 a-f",
                });
            }
            Err(_) => self.read_ref(name_or_digest)?,
        };
        self.open_image(&digest)?;
        Ok(digest)
    }

    /// The directory a slash-separated name lives in, within `area` (created if missing), the
    /// name's last component, and its absolute path (for messages).
    fn named_file<'n>(&self, area: Area, name: &'n str) -> Result<(OwnedFd, &'n str, PathBuf)> {
        let path = self.area_path(area).join(name);
        let (parent_rel, leaf) = name.rsplit_once('/').unwrap_or(("", name));
        let dir = self.open_area(area)?;
        let parent = fsutil::mkdir_all_beneath(dir.as_fd(), parent_rel, Mode::from_raw_mode(0o700))
            .ctx("create directory for", &path)?;
        Ok((parent, leaf, path))
    }

    /// Replaces `parent/leaf` with `data` atomically (staged in `tmp/`, then renamed), durably
    /// (fsync of the file and the directory) if asked.
    ///
    /// The staged file is written unnamed where the filesystem allows it (`O_TMPFILE`) and
    /// given its `tmp/write-*` name only once written, and it is flocked from before it has a
    /// name until it is renamed: a failure on any path removes it, and what a killed process
    /// leaves is never held, so `velo gc` and `fsck --repair` remove it (see
    /// [`write_in_use`]).
    pub(crate) fn replace_file(
        &self,
        parent: BorrowedFd<'_>,
        leaf: &str,
        data: &[u8],
        durable: bool,
        path: &Path,
    ) -> Result<()> {
        let tmp_name = fsutil::unique_name(WRITE_PREFIX);
        let tmp = self.tmp_fd();
        let tmp_path = self.area_path(Area::Tmp).join(&tmp_name);
        let write = |fd: BorrowedFd<'_>| -> Result<()> {
            rustix::fs::flock(fd, rustix::fs::FlockOperation::LockExclusive)
                .ctx("lock", &tmp_path)?;
            fsutil::pwrite_all(fd, data, 0).ctx("write", path)?;
            if durable {
                rustix::fs::fsync(fd).ctx("fsync", path)?;
            }
            Ok(())
        };
        let mut named = Named {
            dir: tmp,
            name: &tmp_name,
            armed: false,
        };
        let _fd = match rustix::fs::openat(
            tmp,
            ".",
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => {
                write(fd.as_fd())?;
                crate::ingest::link_tmpfile(fd.as_fd(), tmp, &tmp_name).ctx("create", &tmp_path)?;
                named.armed = true;
                fd
            }
            Err(Errno::OPNOTSUPP) | Err(Errno::ISDIR) | Err(Errno::INVAL) => {
                let fd = open_beneath(
                    tmp,
                    &tmp_name,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY,
                    Mode::from_raw_mode(0o600),
                )
                .ctx("create", &tmp_path)?;
                named.armed = true;
                write(fd.as_fd())?;
                fd
            }
            Err(e) => return Err(StoreError::io("create", &tmp_path, e)),
        };
        rustix::fs::renameat(tmp, tmp_name.as_str(), parent, leaf).ctx("replace", path)?;
        named.armed = false;
        if durable {
            rustix::fs::fsync(parent).ctx("fsync directory of", path)?;
        }
        Ok(())
    }

    /// All valid ref names under `area` (nested directories), sorted.
    fn names_in(&self, area: Area) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), self.open_area(area)?)];
        while let Some((prefix, dir)) = stack.pop() {
            for name in
                fsutil::list_dir(dir.as_fd()).ctx("list", self.area_path(area).join(&prefix))?
            {
                let Some(name) = name.to_str() else { continue };
                let full = if prefix.is_empty() {
                    name.to_owned()
                } else {
                    format!("{prefix}/{name}")
                };
                if validate_ref_name(&full).is_err() {
                    continue;
                }
                match open_dir_beneath(dir.as_fd(), name) {
                    Ok(sub) => stack.push((full, sub)),
                    Err(Errno::NOTDIR) => out.push(full),
                    Err(e) => {
                        return Err(StoreError::io(
                            "open directory",
                            self.area_path(area).join(&full),
                            e,
                        ));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Points `name` at `digest`, atomically (a reader sees the old or the new value) and
    /// durably (fsync of the file and its directory). Callers that just wrote the image and
    /// its objects go through [`crate::WriteSession::commit`], which syncs those first.
    pub fn write_ref(&self, name: &str, digest: &Digest) -> Result<()> {
        validate_ref_name(name)?;
        // Read, append to the history, replace: one writer at a time, or two writers of one
        // ref would both record the same old value and lose the one between.
        let _refs = self.lock_refs()?;
        let (parent, leaf, path) = self.named_file(Area::Refs, name)?;
        match self.read_ref(name) {
            Ok(old) if old != *digest => self.append_history(name, &old)?,
            _ => {}
        }
        self.replace_file(
            parent.as_fd(),
            leaf,
            format!("{digest}\n").as_bytes(),
            true,
            &path,
        )
    }

    /// Removes a ref (deliberately: unlike an overwrite, this records no history). Its image
    /// stays until garbage collection finds nothing else needs it.
    pub fn remove_ref(&self, name: &str) -> Result<()> {
        validate_ref_name(name)?;
        let refs = self.lock_refs()?;
        let path = self.area_path(Area::Refs).join(name);
        let (parent_rel, leaf) = name.rsplit_once('/').unwrap_or(("", name));
        let parent = if parent_rel.is_empty() {
            refs
        } else {
            match open_dir_beneath(refs.as_fd(), parent_rel) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    return Err(StoreError::RefNotFound {
                        name: name.to_owned(),
                        store: self.root().to_owned(),
                    });
                }
                Err(e) => return Err(StoreError::io("open ref directory", path, e)),
            }
        };
        match rustix::fs::unlinkat(&parent, leaf, rustix::fs::AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(StoreError::RefNotFound {
                name: name.to_owned(),
                store: self.root().to_owned(),
            }),
            Err(e) => Err(StoreError::io("remove ref", path, e)),
        }
    }

    /// Holds `refs/` exclusively (a lock on the directory) until the fd is dropped.
    fn lock_refs(&self) -> Result<OwnedFd> {
        let refs = self.open_area(Area::Refs)?;
        rustix::fs::flock(&refs, rustix::fs::FlockOperation::LockExclusive)
            .ctx("lock", self.area_path(Area::Refs))?;
        Ok(refs)
    }

    /// Records that `name` pointed at `old` until now (`history/<name>`, one line per change).
    fn append_history(&self, name: &str, old: &Digest) -> Result<()> {
        let (parent, leaf, path) = self.named_file(Area::History, name)?;
        let (fd, _) = open_regular_beneath(
            parent.as_fd(),
            leaf,
            OFlags::CREATE | OFlags::WRONLY | OFlags::APPEND,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| StoreError::from_open("open ref history", &path, e))?;
        let line = format!("{} {old}\n", fsutil::now_ns() / 1_000_000_000);
        rustix::io::write(&fd, line.as_bytes()).ctx("append ref history", &path)?;
        rustix::fs::fsync(&fd).ctx("fsync ref history", &path)?;
        Ok(())
    }

    /// A ref's earlier images, oldest first, with the time (seconds) each stopped being current.
    pub fn ref_history(&self, name: &str) -> Result<Vec<(u64, Digest)>> {
        validate_ref_name(name)?;
        let dir = self.open_area(Area::History)?;
        let path = self.area_path(Area::History).join(name);
        let (fd, st) = match open_regular_beneath(dir.as_fd(), name, OFlags::RDONLY, Mode::empty())
        {
            Ok(opened) => opened,
            Err(OpenError::Sys(Errno::NOENT | Errno::NOTDIR)) => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::from_open("open ref history", path, e)),
        };
        let data = fsutil::read_capped(fd.as_fd(), &st, MAX_HISTORY_BYTES)
            .map_err(|e| StoreError::from_read("read ref history", &path, e))?;
        Ok(String::from_utf8_lossy(&data)
            .lines()
            .filter_map(|l| {
                let (t, d) = l.split_once(' ')?;
                Some((t.parse().ok()?, Digest::parse(d).ok()?))
            })
            .collect())
    }

    /// Replaces a ref's history (used by GC to drop expired entries); empty removes it.
    pub fn set_ref_history(&self, name: &str, entries: &[(u64, Digest)]) -> Result<()> {
        validate_ref_name(name)?;
        let (parent, leaf, path) = self.named_file(Area::History, name)?;
        if entries.is_empty() {
            return match rustix::fs::unlinkat(&parent, leaf, rustix::fs::AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(StoreError::io("remove ref history", path, e)),
            };
        }
        let text: String = entries.iter().map(|(t, d)| format!("{t} {d}\n")).collect();
        self.replace_file(parent.as_fd(), leaf, text.as_bytes(), false, &path)
    }

    /// Names of all refs with a history.
    pub fn refs_with_history(&self) -> Result<Vec<String>> {
        self.names_in(Area::History)
    }

    /// Records that a ref was used now (a mount or run of it), for LRU expiry.
    pub fn touch_ref_used(&self, name: &str) -> Result<()> {
        validate_ref_name(name)?;
        let (parent, leaf, path) = self.named_file(Area::Usage, name)?;
        let (fd, _) = open_regular_beneath(
            parent.as_fd(),
            leaf,
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| StoreError::from_open("open", &path, e))?;
        let now = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
        };
        rustix::fs::futimens(&fd, &now).ctx("touch", &path)?;
        Ok(())
    }

    /// When a ref was last used (mounted, run), or else written, in seconds since the epoch.
    pub fn ref_last_used(&self, name: &str) -> Result<u64> {
        validate_ref_name(name)?;
        let stat = |area: Area| {
            let dir = self.open_area(area).ok()?;
            let fd = open_beneath(
                dir.as_fd(),
                name,
                OFlags::PATH | OFlags::NOFOLLOW,
                Mode::empty(),
            )
            .ok()?;
            rustix::fs::fstat(&fd).ok()
        };
        let used = stat(Area::Usage).map(|st| st.st_mtime as u64);
        let written = stat(Area::Refs).map(|st| st.st_mtime as u64);
        Ok(used.max(written).unwrap_or(0))
    }

    /// All refs, sorted by name, with what they point at (or why they can't be read).
    pub fn list_refs(&self) -> Result<Vec<(String, Result<Digest>)>> {
        Ok(self
            .names_in(Area::Refs)?
            .into_iter()
            .map(|name| {
                let target = self.read_ref(&name);
                (name, target)
            })
            .collect())
    }
}

/// A name in a directory, removed on drop while `armed`.
struct Named<'a> {
    dir: BorrowedFd<'a>,
    name: &'a str,
    armed: bool,
}

impl Drop for Named<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = rustix::fs::unlinkat(self.dir, self.name, rustix::fs::AtFlags::empty());
        }
    }
}

/// True if `name` in `tmp/` is a file [`Store::replace_file`] is writing: one a live process
/// holds flocked. Anything else under that prefix (a killed writer's file, or not a regular
/// file at all) is a leftover.
pub(crate) fn write_in_use(store: &Store, name: &str) -> bool {
    name.starts_with(WRITE_PREFIX)
        && open_regular_beneath(store.tmp_fd(), name, OFlags::RDONLY, Mode::empty()).is_ok_and(
            |(fd, _)| {
                rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockShared).is_err()
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names() {
        for good in ["myapp/deps", "deps/npm/0a1b", "a", "v1.2.3", "x_y-z+w@1"] {
            validate_ref_name(good).expect("test fixture");
        }
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "..",
            "a/../b",
            "./a",
            ".hidden",
            "a/.b",
            "sp ace",
            "back\\slash",
            "new\nline",
            &"ab".repeat(32),
            &"x".repeat(241),
        ] {
            assert!(validate_ref_name(bad).is_err(), "{bad:?} must be refused");
        }
    }
}

#[cfg(test)]
mod write_tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_or_create(dir.path().join("s")).expect("store");
        (dir, store)
    }

    fn tmp_names(store: &Store) -> Vec<std::ffi::OsString> {
        fsutil::list_dir(store.tmp_fd()).expect("list")
    }

    /// A write that fails at its last step (the rename: a directory is in the way) leaves
    /// nothing in `tmp/`.
    #[test]
    fn a_failed_write_leaves_no_staging_file() {
        let (_d, store) = store();
        std::fs::create_dir_all(store.area_path(Area::Refs).join("x/y")).expect("mkdir");
        let digest = Digest::from_bytes([1; 32]);
        assert!(store.write_ref("x", &digest).is_err());
        assert_eq!(tmp_names(&store), Vec::<std::ffi::OsString>::new());
        store.write_ref("z", &digest).expect("write");
        assert_eq!(store.read_ref("z").expect("read"), digest);
        assert!(tmp_names(&store).is_empty());
    }

    /// A `write-*` file is in use only while a process holds it flocked.
    #[test]
    fn a_write_file_is_in_use_while_held() {
        let (_d, store) = store();
        let path = store.area_path(Area::Tmp).join("write-1-2-3");
        std::fs::write(&path, b"x").expect("write");
        assert!(!write_in_use(&store, "write-1-2-3"));
        let held = std::fs::File::open(&path).expect("open");
        rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).expect("flock");
        assert!(write_in_use(&store, "write-1-2-3"));
        assert!(!write_in_use(&store, "obj-1-2-3"));
        drop(held);
        assert!(!write_in_use(&store, "write-1-2-3"));
    }

    /// A ref's history larger than any velo writes is refused, naming it, not read.
    #[test]
    fn a_huge_history_is_refused() {
        let (_d, store) = store();
        let path = store.area_path(Area::History).join("r");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(MAX_HISTORY_BYTES + 1).expect("grow");
        let err = store.ref_history("r").expect_err("refused");
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
