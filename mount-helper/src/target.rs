//! Opening a mount target safely: by fd, refusing symlinks and non-directories.

use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{MountError, Result};

/// Opens `path` as an `O_PATH` fd of a directory, never following a symlink in its last
/// component. With `create`, a missing directory (and its parents) is created first.
pub fn open_target(path: &Path, create: bool) -> Result<OwnedFd> {
    let bad = |reason: &str| MountError::BadTarget {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let open = || {
        rustix::fs::open(
            path,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let fd = match open() {
        Ok(fd) => fd,
        Err(Errno::NOENT) if create => {
            // Refuse to create through a dangling symlink: create_dir_all would follow it.
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(bad("is a symlink; velo does not mount over symlinks"));
            }
            std::fs::create_dir_all(path)
                .map_err(|e| MountError::io("create target directory", path, e))?;
            open().map_err(|e| MountError::io("open target", path, e))?
        }
        Err(Errno::NOENT) => return Err(bad("does not exist (omit --no-mkdir to create it)")),
        Err(e) => return Err(MountError::io("open target", path, e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| MountError::io("stat target", path, e))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Ok(fd),
        FileType::Symlink => Err(bad("is a symlink; velo does not mount over symlinks")),
        _ => Err(bad("is not a directory")),
    }
}
