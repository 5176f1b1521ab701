//! Walking a source tree: every entry's metadata, xattrs and symlink target.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use crate::error::{ImageError, Result};

/// The kind of a source entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symlink and its target.
    Symlink(OsString),
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device (including 0:0 overlay whiteouts).
    CharDevice,
    /// A block device.
    BlockDevice,
}

/// The parts of `lstat` a snapshot keeps or checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatInfo {
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Status-change time (seconds, nanoseconds).
    pub ctime: (i64, u32),
    /// Device of the source filesystem.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Link count.
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// Device number, for device nodes.
    pub rdev: u64,
}

impl StatInfo {
    fn from_metadata(md: &std::fs::Metadata) -> Self {
        Self {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec() as u32),
            ctime: (md.ctime(), md.ctime_nsec() as u32),
            dev: md.dev(),
            ino: md.ino(),
            nlink: md.nlink(),
            size: md.size(),
            rdev: md.rdev(),
        }
    }

    /// From an `fstat` of an open file.
    pub fn from_rustix(st: &rustix::fs::Stat) -> Self {
        Self {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime, st.st_ctime_nsec as u32),
            dev: st.st_dev,
            ino: st.st_ino,
            nlink: st.st_nlink,
            size: st.st_size as u64,
            rdev: st.st_rdev,
        }
    }

    /// Describes how `now` differs from `self` in content-relevant fields, if it does.
    pub fn content_change(&self, now: &StatInfo) -> Option<String> {
        if (self.dev, self.ino) != (now.dev, now.ino) {
            Some("it was replaced by another file".into())
        } else if self.size != now.size {
            Some(format!("size {} became {}", self.size, now.size))
        } else if self.mtime != now.mtime || self.ctime != now.ctime {
            Some("it was modified".into())
        } else {
            None
        }
    }
}

/// One entry of the source tree.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path relative to the source root (empty for the root).
    pub rel: PathBuf,
    /// What it is.
    pub kind: EntryKind,
    /// Its metadata.
    pub stat: StatInfo,
    /// All its extended attributes, by name.
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Reads every extended attribute of `path` without following a symlink.
pub fn read_xattrs(path: &Path) -> Result<Vec<(OsString, Vec<u8>)>> {
    let io = |op, e: Errno| ImageError::io(op, path, e);
    let names = loop {
        let size = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(io("list xattrs of", e)),
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                break buf;
            }
            Err(Errno::RANGE) => continue, // grew meanwhile
            Err(e) => return Err(io("list xattrs of", e)),
        }
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::ffi::OsStr::from_bytes(name);
        let value = loop {
            let size = match rustix::fs::lgetxattr_query(path, name) {
                Ok(n) => n,
                Err(Errno::NODATA) => break None, // removed meanwhile
                Err(e) => return Err(io("read xattr of", e)),
            };
            let mut buf = vec![0u8; size];
            match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
                Ok(n) => {
                    buf.truncate(n);
                    break Some(buf);
                }
                Err(Errno::RANGE) => continue,
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(io("read xattr of", e)),
            }
        };
        if let Some(value) = value {
            out.push((name.to_owned(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Walks `root` (not following symlinks, sorted by name) and returns every entry, the root
/// first. `progress` is called with the number of entries seen so far.
pub fn scan(root: &Path, progress: &dyn Fn(u64)) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .follow_root_links(true)
        .sort_by_file_name();
    for item in walker {
        let item = item.map_err(|e| {
            let path = e.path().unwrap_or(root).to_owned();
            match e.into_io_error() {
                Some(io) => ImageError::io("read", path, io),
                None => ImageError::BadSource {
                    path,
                    reason: "filesystem loop".into(),
                },
            }
        })?;
        let path = item.path();
        let rel = path.strip_prefix(root).unwrap_or(path).to_owned();
        if !rel.as_os_str().is_empty() && !rel.iter().all(crate::cfs::name_ok) {
            return Err(ImageError::BadSource {
                path: path.to_owned(),
                reason: "a name longer than 255 bytes cannot be stored".into(),
            });
        }
        let md = if item.depth() == 0 {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        }
        .map_err(|e| ImageError::io("stat", path, e))?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_file() {
            EntryKind::File
        } else if ft.is_symlink() {
            let target =
                std::fs::read_link(path).map_err(|e| ImageError::io("read symlink", path, e))?;
            if target.as_os_str().len() > 4095 {
                return Err(ImageError::BadSource {
                    path: path.to_owned(),
                    reason: "symlink target longer than 4095 bytes".into(),
                });
            }
            EntryKind::Symlink(target.into_os_string())
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else if ft.is_socket() {
            EntryKind::Socket
        } else if ft.is_char_device() {
            EntryKind::CharDevice
        } else if ft.is_block_device() {
            EntryKind::BlockDevice
        } else {
            return Err(ImageError::BadSource {
                path: path.to_owned(),
                reason: "unknown file type".into(),
            });
        };
        let xattrs = read_xattrs(path).map_err(|e| match e {
            ImageError::Io { cause: source, .. }
                if source.raw_os_error() == Some(Errno::NAMETOOLONG.raw_os_error()) =>
            {
                ImageError::BadSource {
                    path: path.to_owned(),
                    reason: "path too long for the kernel (over 4096 bytes)".into(),
                }
            }
            other => other,
        })?;
        out.push(Entry {
            rel,
            kind,
            stat: StatInfo::from_metadata(&md),
            xattrs,
        });
        if out.len() % 1024 == 0 {
            progress(out.len() as u64);
        }
    }
    progress(out.len() as u64);
    Ok(out)
}

/// Checks that no directory changed (an entry added, removed or renamed) since the scan.
pub fn check_dirs_unchanged(root: &Path, entries: &[Entry]) -> Result<()> {
    for e in entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        let path = root.join(&e.rel);
        let md = std::fs::metadata(&path).map_err(|err| ImageError::Changed {
            path: path.clone(),
            what: format!("it can no longer be read: {err}"),
        })?;
        let now = StatInfo::from_metadata(&md);
        if (now.dev, now.ino, now.mtime, now.ctime)
            != (e.stat.dev, e.stat.ino, e.stat.mtime, e.stat.ctime)
        {
            return Err(ImageError::Changed {
                path,
                what: "entries were added, removed or renamed in it".into(),
            });
        }
    }
    Ok(())
}
