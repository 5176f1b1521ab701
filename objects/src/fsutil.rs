//! Small fd-relative helpers: every store path is opened beneath the store's dirfd,
//! never following a symlink.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Resolution flags for every store path: stay beneath the dirfd, follow no symlink.
pub const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// `openat2(dir, rel, flags, mode, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`.
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    rel: impl AsRef<OsStr>,
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    loop {
        match rustix::fs::openat2(dir, rel.as_ref(), flags | OFlags::CLOEXEC, mode, BENEATH) {
            // openat2 returns EAGAIN when a concurrent rename raced with a RESOLVE_BENEATH walk.
            Err(Errno::AGAIN) | Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Opens a directory beneath `dir` for reading (a real fd, usable with `syncfs` and `*at` calls).
pub fn open_dir_beneath(
    dir: BorrowedFd<'_>,
    rel: impl AsRef<OsStr>,
) -> rustix::io::Result<OwnedFd> {
    open_beneath(
        dir,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
        Mode::empty(),
    )
}

/// Creates every missing directory of `rel` beneath `dir` with `mode`, returning the last one.
pub fn mkdir_all_beneath(
    dir: BorrowedFd<'_>,
    rel: &str,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    let mut current = rustix::io::dup(dir)?;
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        match rustix::fs::mkdirat(&current, comp, mode) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e),
        }
        current = open_dir_beneath(current.as_fd(), comp)?;
    }
    Ok(current)
}

/// Removes `name` in `dir` and, if it is a directory, everything beneath it, never following
/// a symlink. A missing entry is not an error.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e),
    }
    let sub = match open_dir_beneath(dir, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    // Overlay work dirs hold 0000 directories; make sure we can list this one.
    let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700));
    for name in list_dir(sub.as_fd())? {
        remove_tree_at(sub.as_fd(), &name)?;
    }
    drop(sub);
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Names in a directory, without `.` and `..`, in no particular order.
pub fn list_dir(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<std::ffi::OsString>> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push(OsStr::from_bytes(name).to_owned());
    }
    Ok(out)
}

/// Writes all of `data` at `offset`.
pub fn pwrite_all(fd: BorrowedFd<'_>, mut data: &[u8], mut offset: u64) -> rustix::io::Result<()> {
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, offset) {
            Ok(0) => return Err(Errno::NOSPC),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until `buf` is full or end of file; returns the number of bytes read.
pub fn pread_full(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    mut offset: u64,
) -> rustix::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::pread(fd, &mut buf[got..], offset) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                offset += n as u64;
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), or empty if unknown.
pub fn boot_id() -> String {
    // It cannot change while this process lives: read it once.
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        })
        .clone()
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// A name unique to this process and call, for temporary files.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{}-{n}", std::process::id(), now_ns())
}

/// A stretch of a file: bytes to read, or a hole that reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` zero bytes that need not be read.
    Hole(u64),
    /// Bytes `start..end` to read.
    Data(u64, u64),
}

/// The extents of the first `size` bytes of `fd`, found with SEEK_DATA/SEEK_HOLE (one data
/// extent where the filesystem does not support them).
pub fn extents(fd: BorrowedFd<'_>, size: u64) -> rustix::io::Result<Vec<Extent>> {
    use rustix::fs::SeekFrom;
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(off) => off.min(size),
            Err(Errno::NXIO) => size,
            Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) if pos == 0 => {
                return Ok(vec![Extent::Data(0, size)]);
            }
            Err(e) => return Err(e),
        };
        if data > pos {
            out.push(Extent::Hole(data - pos));
        }
        if data >= size {
            break;
        }
        let hole = rustix::fs::seek(fd, SeekFrom::Hole(data))?.min(size);
        out.push(Extent::Data(data, hole));
        pos = hole;
    }
    Ok(out)
}
