//! Small fd-relative helpers: every store path is opened beneath the store's dirfd,
//! never following a symlink.

#![allow(unsafe_code)] // system calls rustix does not wrap (mmap); each block says why it is sound

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
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

/// A file type in words, for messages: "a FIFO", "a directory"…
pub fn file_type_name(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        _ => "a file of unknown type",
    }
}

/// Why a store file could not be opened as a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The system call failed (`NOENT`: there is none).
    #[error(transparent)]
    Sys(#[from] Errno),
    /// Something other than a regular file is there (never opened for reading or writing).
    #[error("is {}, not a regular file", file_type_name(*.0))]
    NotRegular(FileType),
}

/// Opens `rel` beneath `dir` (see [`open_beneath`]) as a regular file: never blocking on a FIFO
/// or a device (`O_NONBLOCK | O_NOCTTY` for the open), never following a symlink, and checked
/// by `fstat` of the fd it returns, so that what is read is what was checked. Anything but a
/// regular file is [`OpenError::NotRegular`]. `flags` add the access mode and e.g. `O_CREAT`;
/// `O_NONBLOCK` is cleared again on the returned fd.
pub fn open_regular_beneath(
    dir: BorrowedFd<'_>,
    rel: impl AsRef<OsStr>,
    flags: OFlags,
    mode: Mode,
) -> Result<(OwnedFd, Stat), OpenError> {
    let rel = rel.as_ref();
    // openat2 refuses a mode without O_CREAT.
    let mode = if flags.contains(OFlags::CREATE) {
        mode
    } else {
        Mode::empty()
    };
    let opened = open_beneath(
        dir,
        rel,
        flags | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::NOFOLLOW,
        mode,
    );
    let fd = match opened {
        Ok(fd) => fd,
        // A FIFO opened for writing with no reader, a socket, a device without a driver: say
        // what it is, from a handle that cannot read, write or block.
        Err(e @ (Errno::NXIO | Errno::OPNOTSUPP | Errno::NODEV)) => {
            return Err(
                match open_beneath(dir, rel, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty())
                    .and_then(|fd| rustix::fs::fstat(&fd))
                {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile => {
                        OpenError::NotRegular(FileType::from_raw_mode(st.st_mode))
                    }
                    _ => OpenError::Sys(e),
                },
            );
        }
        Err(e) => return Err(OpenError::Sys(e)),
    };
    let st = rustix::fs::fstat(&fd)?;
    let ft = FileType::from_raw_mode(st.st_mode);
    if ft != FileType::RegularFile {
        return Err(OpenError::NotRegular(ft));
    }
    let fl = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, fl - OFlags::NONBLOCK)?;
    Ok((fd, st))
}

/// Why a small file could not be read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The system call failed.
    #[error(transparent)]
    Sys(#[from] Errno),
    /// It holds more than the caller accepts.
    #[error("it is {size} bytes, more than the {max} accepted")]
    TooLarge {
        /// Its size (at least; it may have grown while read).
        size: u64,
        /// The most accepted.
        max: u64,
    },
}

/// Reads all of a file already `fstat`ed (`st`) if it holds at most `max` bytes. The buffer
/// grows with the bytes read, never beyond `max` + 1: a file larger than it says, or growing
/// while read, costs no more than one that is not.
pub fn read_capped(fd: BorrowedFd<'_>, st: &Stat, max: u64) -> Result<Vec<u8>, ReadError> {
    let size = st.st_size.max(0) as u64;
    if size > max {
        return Err(ReadError::TooLarge { size, max });
    }
    // One byte more than expected, to see a file that grew; never more than `max` + 1.
    let limit = max.saturating_add(1);
    let mut buf = vec![0u8; (size + 1).min(limit) as usize];
    let mut got = 0usize;
    loop {
        if got == buf.len() {
            if got as u64 > max {
                return Err(ReadError::TooLarge {
                    size: got as u64,
                    max,
                });
            }
            let more = got.max(8192).min((limit - got as u64) as usize);
            buf.resize(got + more, 0);
        }
        match rustix::io::pread(fd, &mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if got as u64 > max {
        return Err(ReadError::TooLarge {
            size: got as u64,
            max,
        });
    }
    buf.truncate(got);
    Ok(buf)
}

/// Reads a small store file whole: a regular file (see [`open_regular_beneath`]) of at most
/// `max` bytes (see [`read_capped`]), or `None` if there is none. `path` names it in errors.
pub fn read_store_file(
    dir: BorrowedFd<'_>,
    rel: impl AsRef<OsStr>,
    path: &std::path::Path,
    max: u64,
) -> crate::Result<Option<Vec<u8>>> {
    let (fd, st) = match open_regular_beneath(dir, rel, OFlags::RDONLY, Mode::empty()) {
        Ok(opened) => opened,
        Err(OpenError::Sys(Errno::NOENT)) => return Ok(None),
        Err(e) => return Err(crate::StoreError::from_open("open", path, e)),
    };
    read_capped(fd.as_fd(), &st, max)
        .map(Some)
        .map_err(|e| crate::StoreError::from_read("read", path, e))
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

/// The first bytes of a file mapped read-only into memory. Its pages are read when first
/// touched, and only the pages touched count against the process: a parser that refuses a
/// file after looking at a few blocks costs those blocks, whatever the file's size.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    /// Maps the first `len` bytes of `fd` (`PROT_READ`, `MAP_PRIVATE`).
    ///
    /// # Safety
    ///
    /// While the mapping lives, nothing may change the bytes mapped or make the file shorter than
    /// `len` (a read past its end raises `SIGBUS`): map only a file no other process can reach,
    /// like one this process staged unnamed (`O_TMPFILE`) and no longer writes.
    pub unsafe fn new(fd: BorrowedFd<'_>, len: usize) -> rustix::io::Result<Self> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(Self {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a fresh mapping (NULL hint) of an open fd; the caller keeps the file's first
        // `len` bytes as they are while it lives (see above).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
        }
        Ok(Self { ptr, len })
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is a live read-only mapping of `len` bytes, unchanged while it lives
        // (the contract of `Mapping::new`), unmapped only on drop.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping `new` made; no slice of it outlives `self`.
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (tempfile::TempDir, OwnedFd) {
        let d = tempfile::tempdir().expect("tempdir");
        let fd = rustix::fs::open(
            d.path(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open");
        (d, fd)
    }

    /// A FIFO (no writer, no reader) is refused for reading and for writing, at once; so is a
    /// directory; a regular file opens, blocking again as any file.
    #[test]
    fn only_a_regular_file_opens_and_nothing_blocks() {
        let (d, fd) = dir();
        rustix::fs::mknodat(&fd, "fifo", FileType::Fifo, Mode::from_raw_mode(0o600), 0)
            .expect("mkfifo");
        for flags in [
            OFlags::RDONLY,
            OFlags::WRONLY | OFlags::CREATE,
            OFlags::RDWR,
        ] {
            assert_eq!(
                open_regular_beneath(fd.as_fd(), "fifo", flags, Mode::from_raw_mode(0o600))
                    .map(|_| ()),
                Err(OpenError::NotRegular(FileType::Fifo)),
                "{flags:?}"
            );
        }
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        assert_eq!(
            open_regular_beneath(fd.as_fd(), "sub", OFlags::RDONLY, Mode::empty()).map(|_| ()),
            Err(OpenError::NotRegular(FileType::Directory))
        );
        std::fs::write(d.path().join("file"), b"data").expect("write");
        let (file, st) = open_regular_beneath(fd.as_fd(), "file", OFlags::RDONLY, Mode::empty())
            .expect("a regular file opens");
        assert_eq!(st.st_size, 4);
        assert!(
            !rustix::fs::fcntl_getfl(&file)
                .expect("getfl")
                .contains(OFlags::NONBLOCK)
        );
        assert_eq!(
            open_regular_beneath(fd.as_fd(), "none", OFlags::RDONLY, Mode::empty()).map(|_| ()),
            Err(OpenError::Sys(Errno::NOENT))
        );
        assert_eq!(
            file_type_name(FileType::Fifo).to_owned() + " " + file_type_name(FileType::Socket),
            "a FIFO a socket"
        );
    }

    /// More than `max` bytes is refused, whether the size says so or the file grew after it
    /// was stat'ed; at most `max` is read whole.
    #[test]
    fn reads_are_capped() {
        let (d, fd) = dir();
        std::fs::write(d.path().join("f"), b"0123456789").expect("write");
        let (file, st) =
            open_regular_beneath(fd.as_fd(), "f", OFlags::RDONLY, Mode::empty()).expect("open");
        assert_eq!(
            read_capped(file.as_fd(), &st, 10).expect("read"),
            b"0123456789"
        );
        assert_eq!(
            read_capped(file.as_fd(), &st, 9),
            Err(ReadError::TooLarge { size: 10, max: 9 })
        );
        // Stat'ed at 10 bytes, then grown to 30: refused once more than `max` arrived.
        std::fs::write(d.path().join("f"), [7u8; 30]).expect("write");
        assert!(matches!(
            read_capped(file.as_fd(), &st, 20),
            Err(ReadError::TooLarge { max: 20, .. })
        ));
        assert_eq!(read_capped(file.as_fd(), &st, 30).expect("read").len(), 30);
        let path = d.path().join("f");
        assert_eq!(
            read_store_file(fd.as_fd(), "none", &path, 10).expect("missing"),
            None
        );
        let err = read_store_file(fd.as_fd(), "f", &path, 20).expect_err("too large");
        assert!(
            err.to_string().contains("is 30 bytes, more than the 20"),
            "{err}"
        );
    }
}
