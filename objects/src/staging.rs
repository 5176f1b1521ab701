//! Staging for objects from an untrusted source that must arrive all or nothing (a user's
//! import through `velo-mountd`): each is checked against its digest as it arrives and kept
//! in a directory of its own in `tmp/`; only when all are there does [`Staging::publish`]
//! link them into `objects/`. Dropping an unpublished staging removes it, so a refused or
//! broken import leaves nothing in the store. A killed process leaves the directory, which
//! `fsck --repair` and `velo gc` reclaim (it is locked while in use).

#![allow(unsafe_code)] // system calls rustix does not wrap; each block says why it is sound

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, open_beneath, open_dir_beneath};
use crate::ingest::Kind;
use crate::store::{Area, Store};

/// Names of staging directories in `tmp/` start with this.
pub(crate) const PREFIX: &str = "stage-";

/// The objects staged (digest, size), in order, and their digests as a set.
type Staged = (Vec<(Digest, u64)>, std::collections::HashSet<Digest>);

/// Objects held back until all of them are checked; see the module docs.
#[derive(Debug)]
pub struct Staging<'s> {
    store: &'s Store,
    name: String,
    dir: OwnedFd,
    /// What is staged, and the same digests as a set (an import has tens of thousands), for
    /// threads that stage at once.
    staged: std::sync::Mutex<Staged>,
    published: bool,
}

impl Store {
    /// Starts a staging directory in `tmp/` (locked while it lives).
    pub fn begin_staging(&self) -> Result<Staging<'_>> {
        let name = fsutil::unique_name(PREFIX);
        let path = self.area_path(Area::Tmp).join(&name);
        rustix::fs::mkdirat(self.tmp_fd(), name.as_str(), Mode::from_raw_mode(0o700))
            .ctx("create staging directory", &path)?;
        let dir = open_dir_beneath(self.tmp_fd(), &name).ctx("open", &path)?;
        rustix::fs::flock(&dir, FlockOperation::LockExclusive).ctx("lock", &path)?;
        Ok(Staging {
            store: self,
            name,
            dir,
            staged: Default::default(),
            published: false,
        })
    }
}

impl Staging<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stages the object `expected` of `size` bytes read from `src` — exactly `size` bytes are
    /// read — if they hash to it; otherwise [`StoreError::Mismatch`] and nothing is kept.
    /// `what` names the source in messages. Several threads may stage at once.
    pub fn add_verified(
        &self,
        src: &mut dyn std::io::Read,
        expected: &Digest,
        size: u64,
        what: &str,
    ) -> Result<()> {
        let file = expected.to_hex();
        let path = self.store.area_path(Area::Tmp).join(&self.name).join(&file);
        if !self.lock().1.insert(*expected) {
            return Err(StoreError::Unexpected {
                path,
                reason: format!("{what}: the object arrived twice"),
            });
        }
        let staged = self.stage_file(src, expected, size, what, &file, &path);
        let mut lock = self.lock();
        match staged {
            Ok(()) => {
                lock.0.push((*expected, size));
                Ok(())
            }
            Err(e) => {
                lock.1.remove(expected);
                Err(e)
            }
        }
    }

    fn stage_file(
        &self,
        src: &mut dyn std::io::Read,
        expected: &Digest,
        size: u64,
        what: &str,
        file: &str,
        path: &std::path::Path,
    ) -> Result<()> {
        let fd = open_beneath(
            self.dir.as_fd(),
            file,
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR,
            Mode::from_raw_mode(0o444),
        )
        .ctx("create", path)?;
        let copied = self
            .store
            .copy_verified(src, expected, size, what, fd.as_fd(), path);
        if copied.is_err() {
            let _ = rustix::fs::unlinkat(&self.dir, file, AtFlags::empty());
        } else {
            start_writeback(fd.as_fd());
        }
        copied
    }

    /// How many objects are staged.
    pub fn len(&self) -> usize {
        self.lock().0.len()
    }

    /// True if nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves every staged object into `objects/` (one already there is a dedup hit and stays
    /// staged, to be removed with the rest; a damaged entry under its name is replaced),
    /// enables fs-verity in a verity store, and removes the staging directory. Returns how many
    /// objects were new.
    pub fn publish(mut self) -> Result<u64> {
        let mut new = 0;
        let staged = std::mem::take(&mut self.lock().0);
        for (digest, size) in staged {
            let file = digest.to_hex();
            let (dir, name) = self.store.final_dir(Kind::Object, &digest)?;
            let path = self.store.object_path(&digest);
            // A rename, not a link: the staging dir then has nothing left to unlink for it
            // (an import's tens of thousands of directory operations fewer).
            match rustix::fs::renameat_with(
                &self.dir,
                file.as_str(),
                dir,
                name.as_str(),
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => new += 1,
                Err(Errno::EXIST) if self.store.has(Kind::Object, &digest, size)? => continue,
                Err(Errno::EXIST) => {
                    tracing::warn!(path = %path.display(), "replacing a damaged store entry");
                    rustix::fs::renameat(&self.dir, file.as_str(), dir, name.as_str())
                        .ctx("replace damaged entry", &path)?;
                    new += 1;
                }
                Err(e) => return Err(StoreError::io("move", path, e)),
            }
            if self.store.verity() == crate::VerityMode::Enabled {
                self.store.enable_verity(Kind::Object, &digest)?;
            }
        }
        self.published = true;
        Ok(new)
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        let _ = fsutil::remove_tree_at(self.store.tmp_fd(), self.name.as_ref());
    }
}

/// Starts writing the file's data to disk without waiting for it: the `syncfs` before the
/// import's ref is written then finds most of an import's bytes on their way already, instead
/// of all of them at once at the end (measured: an empty store taking the node workload's 226
/// MB). Best effort.
fn start_writeback(fd: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range(2) on a valid fd with a valid flag; it touches no memory.
    unsafe {
        libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// True if `name` in `tmp/` is a staging directory some process still holds.
pub(crate) fn in_use(store: &Store, name: &str) -> bool {
    name.starts_with(PREFIX)
        && open_dir_beneath(store.tmp_fd(), name)
            .is_ok_and(|fd| rustix::fs::flock(&fd, FlockOperation::NonBlockingLockShared).is_err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verity::VerityHasher;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_or_create(dir.path().join("s")).expect("store");
        (dir, store)
    }

    #[test]
    fn nothing_reaches_objects_until_publish_and_a_drop_leaves_nothing() {
        let (_d, store) = store();
        let data = vec![5u8; 10_000];
        let digest = VerityHasher::digest(&data);
        {
            let s = store.begin_staging().expect("staging");
            s.add_verified(&mut data.as_slice(), &digest, data.len() as u64, "test")
                .expect("verified");
            assert!(!store.has(Kind::Object, &digest, 10_000).expect("has"));
        }
        assert!(!store.has(Kind::Object, &digest, 10_000).expect("has"));
        assert!(
            fsutil::list_dir(store.tmp_fd()).expect("list").is_empty(),
            "the dropped staging left tmp/ empty"
        );
        let s = store.begin_staging().expect("staging");
        s.add_verified(&mut data.as_slice(), &digest, 10_000, "test")
            .expect("verified");
        assert_eq!(s.publish().expect("publish"), 1);
        assert!(store.has(Kind::Object, &digest, 10_000).expect("has"));
        assert!(fsutil::list_dir(store.tmp_fd()).expect("list").is_empty());
        // The same object again: a dedup hit, nothing new, nothing left in tmp/.
        let s = store.begin_staging().expect("staging");
        s.add_verified(&mut data.as_slice(), &digest, 10_000, "test")
            .expect("verified");
        assert_eq!(s.publish().expect("publish"), 0);
        assert!(store.has(Kind::Object, &digest, 10_000).expect("has"));
        assert!(fsutil::list_dir(store.tmp_fd()).expect("list").is_empty());
    }

    #[test]
    fn wrong_short_and_long_bytes_are_refused_and_not_kept() {
        let (_d, store) = store();
        let data = vec![7u8; 5000];
        let digest = VerityHasher::digest(&data);
        let s = store.begin_staging().expect("staging");
        let mut wrong = data.clone();
        wrong[4999] = 8;
        for (bytes, size) in [(&wrong[..], 5000), (&data[..4000], 5000), (&data[..], 4000)] {
            let err = s
                .add_verified(&mut &bytes[..], &digest, size, "test")
                .expect_err("refused");
            assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
        }
        assert!(s.is_empty());
        // The right bytes are still taken afterwards (no file was left under the name).
        s.add_verified(&mut data.as_slice(), &digest, 5000, "test")
            .expect("verified");
        assert_eq!(s.publish().expect("publish"), 1);
    }

    #[test]
    fn a_live_staging_is_in_use_and_a_dead_one_is_not() {
        let (_d, store) = store();
        let s = store.begin_staging().expect("staging");
        assert!(in_use(&store, &s.name));
        let name = s.name.clone();
        std::mem::forget(s); // as if the process had been killed (its fd stays open here)
        assert!(
            in_use(&store, &name),
            "its lock is still held by the leaked fd"
        );
        assert!(!in_use(&store, "writer-x.json"));
    }
}
