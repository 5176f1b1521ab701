//! Putting bytes into the store: hashed while staged in `tmp/`, linked under the digest of
//! the bytes actually written, never rewriting an object that exists, safe against concurrent
//! writers of the same object, and with no fsync per object (see [`crate::session`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, Extent, open_beneath};
use crate::kverity;
use crate::meta::VerityMode;
use crate::store::{Area, Store};
use crate::verity::VerityHasher;

/// Streaming copies use buffers of this size.
const COPY_CHUNK: usize = 1 << 20;

/// What a store operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The digest of the stored bytes: the object's (or image's) name.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// True if this call created it; false if it was already there (dedup).
    pub new: bool,
}

/// Bytes from an untrusted source, checked against their digest as they arrived and held in
/// `tmp/` (unnamed where the filesystem allows it), not yet under their name; see
/// [`Store::stage_verified`]. Dropping it leaves nothing behind.
pub struct Pending<'s> {
    staged: Staged<'s>,
    kind: Kind,
    digest: Digest,
    size: u64,
}

impl std::fmt::Debug for Pending<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("kind", &self.kind)
            .field("digest", &self.digest)
            .field("size", &self.size)
            .finish()
    }
}

impl Pending<'_> {
    /// Its bytes, mapped read-only: only the pages read count against the process, so
    /// checking a large file that is refused early costs little memory.
    pub fn map(&self) -> Result<fsutil::Mapping> {
        let path = self.staged.store.path_of(self.kind, &self.digest);
        let len = usize::try_from(self.size).map_err(|_| StoreError::TooLarge {
            path: path.clone(),
            size: self.size,
            max: usize::MAX as u64,
        })?;
        // SAFETY: the staged file is this process's own, written completely by
        // `stage_verified` and never written again; unnamed (or, where the filesystem has no
        // O_TMPFILE, in the store's private tmp/ while this process holds the store lock), so
        // no other process changes or truncates it while it is mapped.
        #[allow(unsafe_code)]
        let mapped = unsafe { fsutil::Mapping::new(self.staged.fd.as_fd(), len) };
        mapped.ctx("map", path)
    }

    /// Puts it under its digest, as [`Store::store_verified`] would have (one already there
    /// is a dedup hit, a damaged entry under the name is replaced).
    pub fn publish(self) -> Result<Stored> {
        let store = self.staged.store;
        if store.has(self.kind, &self.digest, self.size)? {
            return Ok(Stored {
                digest: self.digest,
                size: self.size,
                new: false,
            });
        }
        store.publish(self.kind, self.staged, self.digest, self.size)
    }
}

/// Which kind of immutable, digest-named file to write. Both go through one code path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// File contents, under `objects/xx/…`.
    Object,
    /// An EROFS image, under `images/<digest>`.
    Image,
}

/// Whether `FICLONE` works from sources to this store (probed on first use).
#[derive(Debug, Default)]
pub(crate) struct ReflinkState(AtomicU8);

const REFLINK_UNKNOWN: u8 = 0;
const REFLINK_YES: u8 = 1;
const REFLINK_NO: u8 = 2;

/// A file being staged in `tmp/`: unnamed (`O_TMPFILE`) where the filesystem allows it, so a
/// killed writer leaves nothing behind; otherwise a named file removed on drop.
struct Staged<'s> {
    fd: OwnedFd,
    name: Option<String>,
    store: &'s Store,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            let _ = rustix::fs::unlinkat(self.store.tmp_fd(), name.as_str(), AtFlags::empty());
        }
    }
}

impl Store {
    fn stage(&self) -> Result<Staged<'_>> {
        let mode = Mode::from_raw_mode(0o444);
        match rustix::fs::openat(
            self.tmp_fd(),
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            mode,
        ) {
            Ok(fd) => Ok(Staged {
                fd,
                name: None,
                store: self,
            }),
            Err(Errno::OPNOTSUPP) | Err(Errno::ISDIR) | Err(Errno::INVAL) => {
                let name = fsutil::unique_name("obj-");
                let fd = open_beneath(
                    self.tmp_fd(),
                    &name,
                    OFlags::CREATE | OFlags::EXCL | OFlags::RDWR,
                    mode,
                )
                .ctx("create staging file", self.area_path(Area::Tmp).join(&name))?;
                Ok(Staged {
                    fd,
                    name: Some(name),
                    store: self,
                })
            }
            Err(e) => Err(StoreError::io(
                "create staging file",
                self.area_path(Area::Tmp),
                e,
            )),
        }
    }

    pub(crate) fn final_dir(
        &self,
        kind: Kind,
        digest: &Digest,
    ) -> Result<(BorrowedFd<'_>, String)> {
        Ok(match kind {
            Kind::Object => (self.fanout_fd(digest)?, digest.object_file_name()),
            Kind::Image => (self.images_fd(), digest.to_hex()),
        })
    }

    /// Path of an object or image, for messages.
    pub fn path_of(&self, kind: Kind, digest: &Digest) -> std::path::PathBuf {
        match kind {
            Kind::Object => self.object_path(digest),
            Kind::Image => self.image_path(digest),
        }
    }

    /// Whether `digest` exists as a regular file of `size` bytes.
    ///
    /// An entry of another size or type is damage (e.g. a crash lost its data) and is reported
    /// as absent so that the caller's fresh copy replaces it.
    pub fn has(&self, kind: Kind, digest: &Digest, size: u64) -> Result<bool> {
        let (dir, name) = self.final_dir(kind, digest)?;
        match rustix::fs::statat(dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                && st.st_size as u64 == size),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(StoreError::io("stat", self.path_of(kind, digest), e)),
        }
    }

    /// Stores a buffer (small files and images). Checks for the object first, so a dedup hit
    /// writes nothing.
    pub fn store_bytes(&self, kind: Kind, data: &[u8]) -> Result<Stored> {
        let digest = VerityHasher::digest(data);
        let size = data.len() as u64;
        if self.has(kind, &digest, size)? {
            return Ok(Stored {
                digest,
                size,
                new: false,
            });
        }
        let staged = self.stage()?;
        fsutil::pwrite_all(staged.fd.as_fd(), data, 0).ctx("write", self.path_of(kind, &digest))?;
        self.publish(kind, staged, digest, size)
    }

    /// Stores the contents of an open file, read once: copied into `tmp/` while hashed (holes
    /// of sparse files stay holes), then linked under the digest of what was written. `path`
    /// is for messages. The caller compares the source's stat before and after to detect a
    /// source that changed meanwhile; whatever happens, the object's name matches its bytes.
    pub fn store_file(&self, kind: Kind, src: BorrowedFd<'_>, path: &Path) -> Result<Stored> {
        let st = rustix::fs::fstat(src).ctx("stat", path)?;
        let staged = self.stage()?;
        let hasher = if self.try_reflink(staged.fd.as_fd(), src) {
            // The clone is an atomic snapshot of the source: hash what the store now holds.
            copy_hashing(staged.fd.as_fd(), None, path, st.st_size as u64)?
        } else {
            let sparse = (st.st_blocks as u64) * 512 < st.st_size as u64;
            copy_hashing(
                src,
                Some(staged.fd.as_fd()),
                path,
                if sparse { st.st_size as u64 } else { 0 },
            )?
        };
        let size = hasher.len();
        let digest = hasher.finalize();
        let stored_size = rustix::fs::fstat(&staged.fd)
            .ctx("stat staging file", self.area_path(Area::Tmp))?
            .st_size as u64;
        if stored_size != size {
            return Err(StoreError::SourceChanged {
                path: path.to_owned(),
                what: format!("copied {stored_size} bytes but hashed {size}"),
            });
        }
        if self.has(kind, &digest, size)? {
            return Ok(Stored {
                digest,
                size,
                new: false,
            });
        }
        self.publish(kind, staged, digest, size)
    }

    /// Stores bytes read from an untrusted source (a registry, an import stream) only if they
    /// are exactly the object or image `expected` of `size` bytes: they are staged while hashed,
    /// and anything else — a wrong byte, too few or too many bytes — is
    /// [`StoreError::Mismatch`] and leaves nothing behind. Aligned 4 KiB blocks of zeros are
    /// left as holes. `what` names the source in messages. The caller checks [`Store::has`]
    /// first to skip objects the store already holds.
    pub fn store_verified(
        &self,
        kind: Kind,
        src: &mut dyn std::io::Read,
        expected: &Digest,
        size: u64,
        what: &str,
    ) -> Result<Stored> {
        self.stage_verified(kind, src, expected, size, what)?
            .publish()
    }

    /// Stages bytes read from an untrusted source, checked as [`Store::store_verified`] checks
    /// them (exactly `size` bytes that hash to `expected`, or [`StoreError::Mismatch`] and
    /// nothing kept), without putting them under their name: the caller checks them further
    /// first ([`Pending::map`]), then [`Pending::publish`]es them. The bytes go to disk as they
    /// arrive, never to memory, whatever `size` says. Take the store lock shared (a write
    /// session) first, so that GC leaves the staged file alone.
    pub fn stage_verified(
        &self,
        kind: Kind,
        src: &mut dyn std::io::Read,
        expected: &Digest,
        size: u64,
        what: &str,
    ) -> Result<Pending<'_>> {
        let path = self.path_of(kind, expected);
        let staged = self.stage()?;
        self.copy_verified(src, expected, size, what, staged.fd.as_fd(), &path)?;
        Ok(Pending {
            staged,
            kind,
            digest: *expected,
            size,
        })
    }

    /// Copies exactly `size` bytes from `src` into `dst` while hashing them; anything but the
    /// bytes of `expected` — a wrong byte, too few or too many — is [`StoreError::Mismatch`].
    /// Aligned 4 KiB blocks of zeros are left as holes. `path` names the destination in
    /// messages, `what` the source.
    pub(crate) fn copy_verified(
        &self,
        src: &mut dyn std::io::Read,
        expected: &Digest,
        size: u64,
        what: &str,
        dst: BorrowedFd<'_>,
        path: &std::path::Path,
    ) -> Result<()> {
        let mut hasher = VerityHasher::new();
        // Sized to the object: most are a few KiB, and zeroing a whole chunk for each of tens
        // of thousands cost more than hashing them (7 s of an 8 s import of 29k objects).
        let mut buf = vec![0u8; (size as usize).clamp(1, COPY_CHUNK)];
        let mut pos = 0u64;
        let mismatch = |found: Option<Digest>, got: u64| StoreError::Mismatch {
            what: what.to_owned(),
            expected: *expected,
            size,
            found,
            found_size: got,
        };
        loop {
            // Never read past the expected size: a source with more is wrong, but must not make
            // velo write more than it was told to expect.
            let want = (size - pos).min(buf.len() as u64) as usize;
            if want == 0 {
                let mut probe = [0u8; 1];
                match read_some(src, &mut probe, what)? {
                    0 => break,
                    _ => return Err(mismatch(None, size + 1)),
                }
            }
            let n = read_some(src, &mut buf[..want], what)?;
            if n == 0 {
                return Err(mismatch(None, pos));
            }
            let chunk = &buf[..n];
            hasher.update(chunk);
            for (i, block) in chunk.chunks(crate::verity::BLOCK_SIZE).enumerate() {
                let at = pos + (i * crate::verity::BLOCK_SIZE) as u64;
                let aligned = at.is_multiple_of(crate::verity::BLOCK_SIZE as u64)
                    && block.len() == crate::verity::BLOCK_SIZE;
                if !(aligned && block.iter().all(|&b| b == 0)) {
                    fsutil::pwrite_all(dst, block, at).ctx("write", path)?;
                }
            }
            pos += n as u64;
        }
        rustix::fs::ftruncate(dst, size).ctx("write", path)?;
        let found = hasher.finalize();
        if found != *expected {
            return Err(mismatch(Some(found), size));
        }
        Ok(())
    }

    fn try_reflink(&self, dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> bool {
        if self.reflink.0.load(Ordering::Relaxed) == REFLINK_NO {
            return false;
        }
        match rustix::fs::ioctl_ficlone(dst, src) {
            Ok(()) => {
                self.reflink.0.store(REFLINK_YES, Ordering::Relaxed);
                true
            }
            Err(_) => {
                // Not supported here, or across filesystems: remember only a definite "no" for
                // the common case of a store with no reflink support at all.
                if self.reflink.0.load(Ordering::Relaxed) == REFLINK_UNKNOWN {
                    self.reflink.0.store(REFLINK_NO, Ordering::Relaxed);
                }
                false
            }
        }
    }

    /// Links a fully written staging file under its digest. Losing a race to another writer of
    /// the same object is a dedup hit; a damaged entry under that name is replaced.
    fn publish(&self, kind: Kind, staged: Staged<'_>, digest: Digest, size: u64) -> Result<Stored> {
        let (dir, name) = self.final_dir(kind, &digest)?;
        let path = self.path_of(kind, &digest);
        let linked = match &staged.name {
            None => link_tmpfile(staged.fd.as_fd(), dir, &name),
            Some(tmp) => rustix::fs::linkat(
                self.tmp_fd(),
                tmp.as_str(),
                dir,
                name.as_str(),
                AtFlags::empty(),
            ),
        };
        match linked {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                if self.has(kind, &digest, size)? {
                    return Ok(Stored {
                        digest,
                        size,
                        new: false,
                    });
                }
                tracing::warn!(path = %path.display(), "replacing a damaged store entry");
                let tmp_name = fsutil::unique_name("replace-");
                match &staged.name {
                    None => link_tmpfile(staged.fd.as_fd(), self.tmp_fd(), &tmp_name),
                    Some(tmp) => rustix::fs::linkat(
                        self.tmp_fd(),
                        tmp.as_str(),
                        self.tmp_fd(),
                        tmp_name.as_str(),
                        AtFlags::empty(),
                    ),
                }
                .ctx("stage replacement", &path)?;
                rustix::fs::renameat(self.tmp_fd(), tmp_name.as_str(), dir, name.as_str())
                    .ctx("replace damaged entry", &path)?;
            }
            Err(e) => return Err(StoreError::io("link", path, e)),
        }
        drop(staged);
        if self.verity() == VerityMode::Enabled {
            self.enable_verity(kind, &digest)?;
        }
        Ok(Stored {
            digest,
            size,
            new: true,
        })
    }

    /// Enables fs-verity on a stored file and checks the kernel's digest equals its name.
    pub fn enable_verity(&self, kind: Kind, digest: &Digest) -> Result<()> {
        let (dir, name) = self.final_dir(kind, digest)?;
        let path = self.path_of(kind, digest);
        let (fd, _) = fsutil::open_regular_beneath(dir, &name, OFlags::RDONLY, Mode::empty())
            .map_err(|e| StoreError::from_open("open for fs-verity", &path, e))?;
        let mut tries = 0;
        loop {
            match kverity::enable(fd.as_fd()) {
                Ok(()) | Err(Errno::EXIST) => break,
                // Another process still has it open for writing (a racing writer's staging fd).
                Err(Errno::TXTBSY) if tries < 100 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(e) => return Err(StoreError::io("enable fs-verity", path, e)),
            }
        }
        let measured = kverity::measure(fd.as_fd()).ctx("measure fs-verity", &path)?;
        if measured != *digest {
            return Err(StoreError::Unexpected {
                path,
                reason: format!("kernel fs-verity digest {measured} differs from its name"),
            });
        }
        Ok(())
    }
}

fn read_some(src: &mut dyn std::io::Read, buf: &mut [u8], what: &str) -> Result<usize> {
    loop {
        match src.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::io("read", what, e)),
        }
    }
}

/// Gives the unnamed (`O_TMPFILE`) file `fd` the name `name` in `dir`.
pub(crate) fn link_tmpfile(
    fd: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &str,
) -> rustix::io::Result<()> {
    match rustix::fs::linkat(fd, "", dir, name, AtFlags::EMPTY_PATH) {
        // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH on older kernels; /proc works for anyone.
        Err(Errno::NOENT) | Err(Errno::PERM) => {
            use std::os::fd::AsRawFd;
            let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            rustix::fs::linkat(
                rustix::fs::CWD,
                proc_path.as_str(),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        other => other,
    }
}

/// Hashes `src` and, with `dst`, copies it there. With `sparse_size` > 0 the source is walked
/// by SEEK_DATA/SEEK_HOLE up to that size and holes stay holes; otherwise it is read to EOF.
fn copy_hashing(
    src: BorrowedFd<'_>,
    dst: Option<BorrowedFd<'_>>,
    path: &Path,
    sparse_size: u64,
) -> Result<VerityHasher> {
    let mut hasher = VerityHasher::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut copy_range = |hasher: &mut VerityHasher, start: u64, end: Option<u64>| -> Result<u64> {
        let mut pos = start;
        loop {
            let want = match end {
                Some(end) if pos >= end => break,
                Some(end) => ((end - pos) as usize).min(buf.len()),
                None => buf.len(),
            };
            let n = fsutil::pread_full(src, &mut buf[..want], pos).ctx("read", path)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if let Some(dst) = dst {
                fsutil::pwrite_all(dst, &buf[..n], pos).ctx("write object for", path)?;
            }
            pos += n as u64;
        }
        Ok(pos)
    };
    if sparse_size == 0 {
        copy_range(&mut hasher, 0, None)?;
        return Ok(hasher);
    }
    let mut pos = 0u64;
    for extent in fsutil::extents(src, sparse_size).ctx("find data in", path)? {
        match extent {
            Extent::Hole(len) => {
                hasher.update_zeros(len);
                pos += len;
            }
            Extent::Data(start, end) => {
                if copy_range(&mut hasher, start, Some(end))? < end {
                    // The caller's stat comparison names the change.
                    return Err(StoreError::SourceChanged {
                        path: path.to_owned(),
                        what: "it became shorter while being read".into(),
                    });
                }
                pos = end;
            }
        }
    }
    if let Some(dst) = dst {
        rustix::fs::ftruncate(dst, pos).ctx("extend sparse object for", path)?;
    }
    Ok(hasher)
}
