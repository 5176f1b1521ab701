//! Re-hashing stored files in userspace: the check that stands in for kernel fs-verity where
//! the filesystem has none (`mount --verify`, `fsck`, crash recovery).

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use crate::digest::Digest;
use crate::error::{IoContext, Result};
use crate::ingest::Kind;
use crate::store::Store;
use crate::verity::VerityHasher;

/// What re-hashing a stored file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its bytes hash to its name.
    Good {
        /// Its size in bytes.
        size: u64,
    },
    /// It is not there.
    Missing,
    /// It is there but its bytes hash to something else.
    Mismatch {
        /// The digest of the bytes found.
        found: Digest,
        /// Their size.
        size: u64,
    },
    /// It is not a regular file (a symlink, a directory, a FIFO…; never opened for reading).
    NotAFile {
        /// What it is, e.g. "a FIFO".
        kind: &'static str,
    },
    /// Reading it fails (in a store with fs-verity, EIO means its data no longer matches the
    /// Merkle tree the kernel keeps: it was tampered with on disk).
    Unreadable {
        /// The error.
        error: String,
    },
}

/// A stored file opened for checking, or why it cannot be.
enum Opened {
    File(OwnedFd, rustix::fs::Stat, PathBuf),
    Not(Verdict),
}

/// How a failed read reads in a report (EIO from a verity file means tampering).
fn unreadable(source: &std::io::Error) -> Verdict {
    let error = if source.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) {
        format!("{source} (with fs-verity: data does not match its Merkle tree)")
    } else {
        source.to_string()
    };
    Verdict::Unreadable { error }
}

impl Store {
    fn open_checked(&self, kind: Kind, digest: &Digest) -> Result<Opened> {
        let path: PathBuf = self.path_of(kind, digest);
        let (dir, name) = self.final_dir(kind, digest)?;
        use crate::fsutil::OpenError;
        use rustix::io::Errno;
        match crate::fsutil::open_regular_beneath(
            dir,
            &name,
            rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        ) {
            Ok((fd, st)) => Ok(Opened::File(fd, st, path)),
            Err(OpenError::Sys(Errno::NOENT)) => Ok(Opened::Not(Verdict::Missing)),
            Err(OpenError::Sys(Errno::LOOP)) => {
                Ok(Opened::Not(Verdict::NotAFile { kind: "a symlink" }))
            }
            Err(OpenError::NotRegular(ft)) => Ok(Opened::Not(Verdict::NotAFile {
                kind: crate::fsutil::file_type_name(ft),
            })),
            Err(e) => Err(crate::StoreError::from_open("open", path, e)),
        }
    }

    /// Re-hashes an object or image and compares with its name.
    pub fn verify(&self, kind: Kind, digest: &Digest) -> Result<Verdict> {
        let (fd, st, path) = match self.open_checked(kind, digest)? {
            Opened::File(fd, st, path) => (fd, st, path),
            Opened::Not(verdict) => return Ok(verdict),
        };
        let hasher = match hash_stat(fd.as_fd(), &path, &st) {
            Ok(h) => h,
            Err(crate::StoreError::Io { cause: source, .. }) => return Ok(unreadable(&source)),
            Err(e) => return Err(e),
        };
        let size = hasher.len();
        let found = hasher.finalize();
        Ok(if found == *digest {
            Verdict::Good { size }
        } else {
            Verdict::Mismatch { found, size }
        })
    }

    /// Reads a whole stored file (at most `max` bytes) and checks it against its name in the
    /// same pass: the bytes when they are good, else the verdict. For images, which are
    /// checked and then parsed: one read instead of two.
    pub fn read_verified(
        &self,
        kind: Kind,
        digest: &Digest,
        max: u64,
    ) -> Result<std::result::Result<Vec<u8>, Verdict>> {
        let (fd, st, path) = match self.open_checked(kind, digest)? {
            Opened::File(fd, st, path) => (fd, st, path),
            Opened::Not(verdict) => return Ok(Err(verdict)),
        };
        let size = st.st_size as u64;
        if size > max {
            return Err(crate::StoreError::Unexpected {
                path,
                reason: format!("{size} bytes is larger than any velo writes here ({max})"),
            });
        }
        let mut buf = vec![0u8; size as usize];
        let n = match crate::fsutil::pread_full(fd.as_fd(), &mut buf, 0) {
            Ok(n) => n,
            Err(e) => return Ok(Err(unreadable(&e.into()))),
        };
        buf.truncate(n);
        let found = VerityHasher::digest(&buf);
        Ok(if found == *digest {
            Ok(buf)
        } else {
            Err(Verdict::Mismatch {
                found,
                size: buf.len() as u64,
            })
        })
    }
}

/// fs-verity digest of everything in a file already `fstat`ed, skipping holes without reading
/// them. Small files (most objects) cost one read: the buffer
/// is sized to the file, and only files with holes are walked extent by extent.
fn hash_stat(
    fd: std::os::fd::BorrowedFd<'_>,
    path: &std::path::Path,
    st: &rustix::fs::Stat,
) -> Result<VerityHasher> {
    use crate::fsutil::Extent;
    let size = st.st_size as u64;
    let sparse = (st.st_blocks as u64) * 512 < size;
    let extents = if sparse {
        crate::fsutil::extents(fd, size).ctx("find data in", path)?
    } else {
        vec![Extent::Data(0, size)]
    };
    let mut hasher = VerityHasher::new();
    let mut buf = vec![0u8; size.clamp(1, 1 << 20) as usize];
    for extent in extents {
        match extent {
            Extent::Hole(len) => hasher.update_zeros(len),
            Extent::Data(mut pos, end) => {
                while pos < end {
                    let want = ((end - pos) as usize).min(buf.len());
                    let n =
                        crate::fsutil::pread_full(fd, &mut buf[..want], pos).ctx("read", path)?;
                    if n == 0 {
                        return Ok(hasher); // shorter than stat said: the digest will not match
                    }
                    hasher.update(&buf[..n]);
                    pos += n as u64;
                }
            }
        }
    }
    Ok(hasher)
}
