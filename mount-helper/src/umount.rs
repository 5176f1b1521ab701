//! Unmounting: only mounts velo made, identified by mount ID through an fd of the target
//! (never by re-resolving a path), and cleaning up what the mount owned in the store.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::UnmountFlags;
use serde::Serialize;
use velo_objects::{Digest, Store};

use crate::error::{MountError, Result};
use crate::kernel::{self, proc_fd_path};
use crate::mountinfo;
use crate::target::{ResolveError, resolve_dir};

/// What an unmount did.
#[derive(Debug, Clone, Serialize)]
pub struct UmountReport {
    /// Where the mount was (in JSON, a name that is not UTF-8 is shown lossily).
    #[serde(serialize_with = "lossy_path")]
    pub target: PathBuf,
    /// The image it showed.
    pub image: Option<Digest>,
    /// The velo-managed upper dir removed with it, if any.
    pub removed_upper: Option<PathBuf>,
    /// False if the store had no record of the mount (e.g. another `--store`).
    pub record_found: bool,
}

/// A path as JSON text: names that are not UTF-8 are shown with U+FFFD rather than failing the
/// whole report after the unmount was done.
fn lossy_path<S: serde::Serializer>(path: &Path, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

/// Unmounts the velo mount at `target`. With `lazy`, a busy mount is detached (MNT_DETACH) and
/// goes away when its last user does.
///
/// The target is resolved like a mount target: one component at a time from `/`, by fd,
/// following no symlink (a symlink anywhere in the path is refused, naming it); names need not
/// be UTF-8.
pub fn umount(store: &Store, target: &Path, lazy: bool) -> Result<UmountReport> {
    crate::privilege::require_root("velo umount")?;
    let resolved = resolve_dir(target, None).map_err(|e| match e {
        ResolveError::Missing(_) => MountError::NotVeloMount {
            path: target.to_owned(),
            reason: e.reason(target),
        },
        _ => MountError::BadTarget {
            path: target.to_owned(),
            reason: e.reason(target),
        },
    })?;
    let Some(parent_fd) = resolved.parent else {
        return Err(MountError::NotVeloMount {
            path: target.to_owned(),
            reason: "is the root directory".into(),
        });
    };
    // The parent stays pinned by an fd, so no rename of a path component can redirect us.
    let mut via_parent = OsString::from(proc_fd_path(parent_fd.as_fd()));
    via_parent.push("/");
    via_parent.push(&resolved.name);
    let via_parent = PathBuf::from(via_parent);
    let abs_target = resolved.path;
    // An fd on the mount would make it busy: identify it, then let the fd go.
    let (id, unique, info) = identify(target, resolved.fd)?;
    let image = info
        .source
        .strip_prefix(crate::SOURCE_PREFIX)
        .and_then(|d| Digest::parse(d).ok());
    // The unmount itself goes by name through the pinned parent, never following a symlink;
    // afterwards the mount ID checked above must be gone (a mount stacked there meanwhile
    // would show up as a mismatch).
    let flags = UnmountFlags::NOFOLLOW
        | if lazy {
            UnmountFlags::DETACH
        } else {
            UnmountFlags::empty()
        };
    match rustix::mount::unmount(&via_parent, flags) {
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
    let still = read_mountinfo()?;
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
        target: abs_target,
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

/// This namespace's mounts.
fn read_mountinfo() -> Result<Vec<mountinfo::MountInfo>> {
    mountinfo::read().map_err(|e| MountError::io("read", "/proc/self/mountinfo", e))
}

/// Finds the velo mount whose root `fd` (resolved without following a symlink) is: (mount ID,
/// unique ID, mountinfo line). Consumes the fd, so that it does not keep the mount busy.
fn identify(target: &Path, fd: OwnedFd) -> Result<(u64, Option<u64>, mountinfo::MountInfo)> {
    let (id, unique, is_root) =
        kernel::mount_ids(fd.as_fd()).map_err(|e| MountError::io("read mount id of", target, e))?;
    drop(fd);
    if !is_root {
        return Err(MountError::NotVeloMount {
            path: target.to_owned(),
            reason: "is not a mount point".into(),
        });
    }
    let mounts = read_mountinfo()?;
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
