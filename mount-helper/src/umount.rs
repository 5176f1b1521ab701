//! Unmounting: only mounts velo made, identified by mount ID through an fd of the target
//! (never by re-resolving a path), and cleaning up what the mount owned in the store.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::UnmountFlags;
use serde::Serialize;
use velo_objects::{Digest, Store};

use crate::error::{MountError, Result};
use crate::kernel::{self, proc_fd_path};
use crate::mountinfo;

/// What an unmount did.
#[derive(Debug, Clone, Serialize)]
pub struct UmountReport {
    /// Where the mount was.
    pub target: PathBuf,
    /// The image it showed.
    pub image: Option<Digest>,
    /// The velo-managed upper dir removed with it, if any.
    pub removed_upper: Option<PathBuf>,
    /// False if the store had no record of the mount (e.g. another `--store`).
    pub record_found: bool,
}

/// Unmounts the velo mount at `target`. With `lazy`, a busy mount is detached (MNT_DETACH) and
/// goes away when its last user does.
pub fn umount(store: &Store, target: &Path, lazy: bool) -> Result<UmountReport> {
    crate::privilege::require_root("velo umount")?;
    let (parent, name) = split_target(target)?;
    // The parent stays pinned by an fd, so no rename of a path component can redirect us.
    let parent_fd = rustix::fs::open(
        &parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| MountError::io("open", &parent, e))?;
    let via_parent = format!(
        "{}/{}",
        proc_fd_path(parent_fd.as_fd()),
        name.to_string_lossy()
    );
    let (id, unique, info) = identify(target, &via_parent)?;
    let image = info
        .source
        .strip_prefix(crate::SOURCE_PREFIX)
        .and_then(|d| Digest::parse(d).ok());
    // An fd on the mount would make it busy, so the unmount itself goes by name through the
    // pinned parent, never following a symlink; afterwards the mount ID checked above must be
    // gone (a mount stacked there meanwhile would show up as a mismatch).
    let flags = UnmountFlags::NOFOLLOW
        | if lazy {
            UnmountFlags::DETACH
        } else {
            UnmountFlags::empty()
        };
    match rustix::mount::unmount(via_parent.as_str(), flags) {
        Ok(()) => {}
        Err(Errno::BUSY) => {
            return Err(MountError::BadTarget {
                path: target.to_owned(),
                reason: "is busy (a process has a file or its cwd there); stop it, or use --lazy"
                    .into(),
            });
        }
        Err(e) => return Err(MountError::io("unmount", target, e)),
    }
    let still = mountinfo::read().map_err(|e| MountError::io("read", "/proc/self/mountinfo", e))?;
    if still
        .iter()
        .any(|m| m.id == id && m.mount_point == info.mount_point)
    {
        return Err(MountError::NotVeloMount {
            path: target.to_owned(),
            reason: "another mount was stacked on it while unmounting; check `findmnt`".into(),
        });
    }

    let mut report = UmountReport {
        target: std::path::absolute(target).unwrap_or_else(|_| target.to_owned()),
        image,
        removed_upper: None,
        record_found: false,
    };
    let _lock = store.lock_shared()?;
    for (token, record) in store.list_mount_records()? {
        let Ok(record) = record else { continue };
        let same = match (record.mnt_id_unique, unique) {
            (Some(a), Some(b)) => a == b,
            _ => record.mnt_id == id && record.boot_id == velo_objects::fsutil::boot_id(),
        };
        if same {
            if record.managed_upper {
                report.removed_upper = record.upper.clone();
            }
            store.remove_mount_slot(&token)?;
            report.record_found = true;
        }
    }
    Ok(report)
}

fn split_target(target: &Path) -> Result<(PathBuf, std::ffi::OsString)> {
    let abs = std::path::absolute(target).map_err(|e| MountError::io("resolve", target, e))?;
    match (abs.parent(), abs.file_name()) {
        (Some(p), Some(n)) => Ok((p.to_owned(), n.to_owned())),
        _ => Err(MountError::NotVeloMount {
            path: target.to_owned(),
            reason: "is the root directory".into(),
        }),
    }
}

/// Opens the target without following a symlink and finds its velo mount: (mount ID, unique
/// ID, mountinfo line).
fn identify(target: &Path, via_parent: &str) -> Result<(u64, Option<u64>, mountinfo::MountInfo)> {
    let fd = match rustix::fs::open(
        via_parent,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => {
            return Err(MountError::NotVeloMount {
                path: target.to_owned(),
                reason: "does not exist".into(),
            });
        }
        Err(e) => return Err(MountError::io("open", target, e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| MountError::io("stat", target, e))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink {
        return Err(MountError::NotVeloMount {
            path: target.to_owned(),
            reason: "is a symlink".into(),
        });
    }
    let (id, unique, is_root) =
        kernel::mount_ids(fd.as_fd()).map_err(|e| MountError::io("read mount id of", target, e))?;
    if !is_root {
        return Err(MountError::NotVeloMount {
            path: target.to_owned(),
            reason: "is not a mount point".into(),
        });
    }
    let mounts =
        mountinfo::read().map_err(|e| MountError::io("read", "/proc/self/mountinfo", e))?;
    let Some(info) = mounts.into_iter().find(|m| m.id == id) else {
        return Err(MountError::NotVeloMount {
            path: target.to_owned(),
            reason: "its mount is not in this namespace's mountinfo".into(),
        });
    };
    if !info.is_velo() {
        return Err(MountError::NotVeloMount {
            path: target.to_owned(),
            reason: format!("is a {} mount of {:?}", info.fstype, info.source),
        });
    }
    Ok((id, unique, info))
}
