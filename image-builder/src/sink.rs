//! Where a snapshot's file contents go: into a [`Store`], or nowhere ([`HashOnly`]: only their
//! fs-verity digests are computed, exactly as the store would name them). Both name an object
//! by the digest of the bytes actually read, so a snapshot into a store and one that stores
//! nothing give the same image for the same tree.

use std::os::fd::BorrowedFd;
use std::path::Path;

use velo_objects::fsutil::{self, Extent};
use velo_objects::verity::VerityHasher;
use velo_objects::{Digest, Kind, Store, StoreError, Stored};

use crate::error::{ImageError, Result};

/// Streaming reads use buffers of this size (as the store's own copies do).
const CHUNK: usize = 1 << 20;

/// Takes regular files' contents during a snapshot, from many threads at once.
pub(crate) trait ObjectSink: Sync {
    /// Whether the sink already holds the object `digest` of `size` bytes (a stat cache hit is
    /// only used if it does).
    fn has(&self, digest: &Digest, size: u64) -> Result<bool>;
    /// Takes a buffer's bytes as an object.
    fn store_bytes(&self, data: &[u8]) -> Result<Stored>;
    /// Takes an open file's bytes as an object, read once, streaming (bounded memory); `path`
    /// is for messages. A source that visibly changed meanwhile is [`ImageError::Changed`]; the
    /// caller compares the file's stat before and after for the rest.
    fn store_file(&self, fd: BorrowedFd<'_>, path: &Path) -> Result<Stored>;
}

impl ObjectSink for Store {
    fn has(&self, digest: &Digest, size: u64) -> Result<bool> {
        Ok(Store::has(self, Kind::Object, digest, size)?)
    }

    fn store_bytes(&self, data: &[u8]) -> Result<Stored> {
        Ok(Store::store_bytes(self, Kind::Object, data)?)
    }

    fn store_file(&self, fd: BorrowedFd<'_>, path: &Path) -> Result<Stored> {
        Store::store_file(self, Kind::Object, fd, path).map_err(|e| match e {
            StoreError::SourceChanged { path, what } => ImageError::Changed { path, what },
            other => other.into(),
        })
    }
}

/// A sink that keeps nothing: it computes each object's fs-verity digest and size, and
/// reports every object as not new (nothing was created).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HashOnly;

impl ObjectSink for HashOnly {
    fn has(&self, _digest: &Digest, _size: u64) -> Result<bool> {
        Ok(false)
    }

    fn store_bytes(&self, data: &[u8]) -> Result<Stored> {
        Ok(Stored {
            digest: VerityHasher::digest(data),
            size: data.len() as u64,
            new: false,
        })
    }

    fn store_file(&self, fd: BorrowedFd<'_>, path: &Path) -> Result<Stored> {
        let hasher = hash_file(fd, path)?;
        Ok(Stored {
            size: hasher.len(),
            digest: hasher.finalize(),
            new: false,
        })
    }
}

/// Hashes an open file in chunks of [`CHUNK`]: a sparse file by its data extents (holes are
/// hashed as zeros without being read), any other to end of file.
pub(crate) fn hash_file(fd: BorrowedFd<'_>, path: &Path) -> Result<VerityHasher> {
    let st = rustix::fs::fstat(fd).map_err(|e| ImageError::io("stat", path, e))?;
    let size = st.st_size as u64;
    let sparse = (st.st_blocks as u64) * 512 < size;
    let mut hasher = VerityHasher::new();
    let mut buf = vec![0u8; CHUNK];
    if !sparse {
        hash_range(fd, path, &mut hasher, &mut buf, 0, None)?;
        return Ok(hasher);
    }
    let extents = fsutil::extents(fd, size).map_err(|e| ImageError::io("find data in", path, e))?;
    for extent in extents {
        match extent {
            Extent::Hole(len) => hasher.update_zeros(len),
            Extent::Data(start, end) => {
                if hash_range(fd, path, &mut hasher, &mut buf, start, Some(end))? < end {
                    return Err(ImageError::Changed {
                        path: path.to_owned(),
                        what: "it became shorter while being read".into(),
                    });
                }
            }
        }
    }
    Ok(hasher)
}

/// Feeds `start..end` (or `start..` end of file) of `fd` to `hasher`; returns where it stopped.
fn hash_range(
    fd: BorrowedFd<'_>,
    path: &Path,
    hasher: &mut VerityHasher,
    buf: &mut [u8],
    start: u64,
    end: Option<u64>,
) -> Result<u64> {
    let mut pos = start;
    loop {
        let want = match end {
            Some(end) if pos >= end => break,
            Some(end) => usize::try_from(end - pos).map_or(buf.len(), |n| n.min(buf.len())),
            None => buf.len(),
        };
        let n = fsutil::pread_full(fd, &mut buf[..want], pos)
            .map_err(|e| ImageError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    }

    /// The hash-only sink names every file as the store does: dense, empty, sparse (a hole at
    /// the start, data in the middle, a hole at the end) and several chunks long.
    #[test]
    fn hash_only_names_files_as_the_store_does() {
        let dir = tempfile::tempdir().expect("test fixture");
        let store = Store::open_or_create(dir.path().join("store")).expect("test fixture");
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("small", pattern(100, 1)),
            ("blocks", pattern(3 * 4096 + 17, 2)),
            ("chunks", pattern(3 * CHUNK + 4095, 3)),
        ];
        let mut sparse = vec![0u8; 9 << 20];
        sparse[(4 << 20)..(4 << 20) + 10_000].copy_from_slice(&pattern(10_000, 4));
        cases.push(("sparse", sparse));
        for (name, data) in &cases {
            let path = dir.path().join(name);
            if *name == "sparse" {
                // Only the data is written: the rest stays holes.
                let f = std::fs::File::create(&path).expect("test fixture");
                f.set_len(data.len() as u64).expect("test fixture");
                let at = 4u64 << 20;
                fsutil::pwrite_all(f.as_fd(), &data[at as usize..at as usize + 10_000], at)
                    .expect("test fixture");
                let st = rustix::fs::fstat(&f).expect("test fixture");
                assert!(
                    (st.st_blocks as u64) * 512 < data.len() as u64,
                    "sparse fixture"
                );
            } else {
                std::fs::write(&path, data).expect("test fixture");
            }
            let f = std::fs::File::open(&path).expect("test fixture");
            let ours = HashOnly.store_file(f.as_fd(), &path).expect("hash");
            let theirs = ObjectSink::store_file(&store, f.as_fd(), &path).expect("store");
            assert_eq!(ours.digest, theirs.digest, "{name}");
            assert_eq!(ours.size, data.len() as u64, "{name}");
            assert_eq!(ours.digest, VerityHasher::digest(data), "{name}");
            assert_eq!(
                HashOnly.store_bytes(data).expect("hash").digest,
                ours.digest
            );
            assert!(!HashOnly.has(&ours.digest, ours.size).expect("has"));
        }
    }
}
