//! Getting every regular file's content into a sink (the store, or a hash-only sink), in
//! parallel: small files inline, unchanged files from the stat cache, the rest read once and
//! named by digest.

use std::os::fd::AsFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use velo_objects::Digest;

use crate::cfs::INLINE_MAX;
use crate::error::{ImageError, Result};
use crate::scan::{Entry, StatInfo};
use crate::sink::ObjectSink;
use crate::statcache::{Key, StatCache};

/// Files up to this size are read into memory and looked up before anything is written, so a
/// dedup hit writes nothing; larger ones stream (through the store's `tmp/`).
const BUFFERED_MAX: u64 = 16 << 20;

/// What a regular file became.
#[derive(Debug, Clone)]
pub enum Content {
    /// Stored inside the image.
    Inline(Vec<u8>),
    /// An object (in the store, or only named).
    Object {
        /// Its digest.
        digest: Digest,
        /// Its size.
        size: u64,
        /// True if this snapshot created the object (never for a hash-only sink).
        new: bool,
        /// True if the stat cache supplied the digest (nothing was read).
        cached: bool,
    },
}

/// Hands one regular file's content to `sink`. A file that changes while it is read (or
/// since the walk saw it) is [`ImageError::Changed`], naming it.
pub fn ingest(
    sink: &dyn ObjectSink,
    root: &Path,
    entry: &Entry,
    cache: &StatCache,
    racy_after: (i64, u32),
) -> Result<Content> {
    let path = root.join(&entry.rel);
    let st = &entry.stat;
    if st.size > INLINE_MAX
        && st.ctime < racy_after
        && let Some(digest) = cache.get(&Key::of(st))
        && sink.has(&digest, st.size)?
    {
        return Ok(Content::Object {
            digest,
            size: st.size,
            new: false,
            cached: true,
        });
    }
    let fd = open_source(&path)?;
    let before = fstat(&fd, &path)?;
    if let Some(what) = st.content_change(&before) {
        return Err(ImageError::Changed { path, what });
    }
    let content = if before.size <= BUFFERED_MAX {
        let data = read_all(&fd, &path, before.size)?;
        if data.len() as u64 <= INLINE_MAX {
            Content::Inline(data)
        } else {
            let s = sink.store_bytes(&data)?;
            Content::Object {
                digest: s.digest,
                size: s.size,
                new: s.new,
                cached: false,
            }
        }
    } else {
        let s = sink.store_file(fd.as_fd(), &path)?;
        Content::Object {
            digest: s.digest,
            size: s.size,
            new: s.new,
            cached: false,
        }
    };
    let after = fstat(&fd, &path)?;
    if let Some(what) = before.content_change(&after) {
        return Err(ImageError::Changed { path, what });
    }
    let got = match &content {
        Content::Inline(d) => d.len() as u64,
        Content::Object { size, .. } => *size,
    };
    if got != after.size {
        return Err(ImageError::Changed {
            path,
            what: format!("read {got} bytes of {}", after.size),
        });
    }
    Ok(content)
}

fn open_source(path: &Path) -> Result<std::os::fd::OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    match rustix::fs::open(path, flags | OFlags::NOATIME, Mode::empty()) {
        Ok(fd) => Ok(fd),
        // O_NOATIME is only allowed on one's own files (or with CAP_FOWNER).
        Err(Errno::PERM) => rustix::fs::open(path, flags, Mode::empty())
            .map_err(|e| ImageError::io("open", path, e)),
        Err(e) => Err(ImageError::io("open", path, e)),
    }
}

fn fstat(fd: &std::os::fd::OwnedFd, path: &Path) -> Result<StatInfo> {
    rustix::fs::fstat(fd)
        .map(|st| StatInfo::from_rustix(&st))
        .map_err(|e| ImageError::io("stat", path, e))
}

/// Reads to end of file (one byte more than expected would show growth).
fn read_all(fd: &std::os::fd::OwnedFd, path: &Path, expected: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; expected as usize + 1];
    let n = velo_objects::fsutil::pread_full(fd.as_fd(), &mut buf, 0)
        .map_err(|e| ImageError::io("read", path, e))?;
    buf.truncate(n);
    Ok(buf)
}
