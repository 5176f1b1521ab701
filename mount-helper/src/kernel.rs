//! Talking to the kernel's new mount API: filesystem contexts with readable error logs,
//! run-time feature probes, and mount IDs.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, StatxFlags};
use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags};

use crate::error::{MountError, Result};

/// `STATX_MNT_ID_UNIQUE` (Linux 6.8): a 64-bit mount ID that is never reused.
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;

/// A filesystem context (`fsopen`) whose kernel log is read into error messages.
pub struct FsContext {
    fd: OwnedFd,
    fstype: &'static str,
}

impl FsContext {
    /// `fsopen(fstype)`; ENODEV means the kernel has no such filesystem.
    pub fn open(fstype: &'static str) -> Result<Self> {
        match rustix::mount::fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC) {
            Ok(fd) => Ok(Self { fd, fstype }),
            Err(Errno::NODEV) => Err(MountError::Kernel {
                errno: Some(Errno::NODEV),
                what: format!("mount {fstype}"),
                detail: format!(
                    "this kernel has no {fstype} filesystem (module not loaded or not built)"
                ),
            }),
            Err(Errno::NOSYS) => Err(MountError::Kernel {
                errno: Some(Errno::NOSYS),
                what: "open a filesystem context".into(),
                detail: "fsopen(2) is missing; velo needs Linux 6.6 or newer".into(),
            }),
            Err(e) => Err(MountError::Kernel {
                errno: Some(e),
                what: format!("open a {fstype} filesystem context"),
                detail: e.to_string(),
            }),
        }
    }

    /// The context fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Drains the kernel's messages about this context.
    pub fn log(&self) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = rustix::io::read(&self.fd, &mut buf) {
            if n == 0 {
                break;
            }
            out.push(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
        }
        out.join("; ")
    }

    fn fail(&self, what: String, e: Errno) -> MountError {
        let log = self.log();
        MountError::Kernel {
            errno: Some(e),
            what,
            detail: if log.is_empty() {
                e.to_string()
            } else {
                format!("{e} ({log})")
            },
        }
    }

    /// Sets a string option; the error names the option and includes the kernel's log.
    pub fn set(&self, key: &str, value: &str) -> Result<()> {
        rustix::mount::fsconfig_set_string(&self.fd, key, value)
            .map_err(|e| self.fail(format!("set {} option {key}={value}", self.fstype), e))
    }

    /// Sets a string option, returning the raw errno (for probing).
    pub fn try_set(&self, key: &str, value: &str) -> std::result::Result<(), Errno> {
        rustix::mount::fsconfig_set_string(&self.fd, key, value)
    }

    /// Sets a flag option, returning the raw errno (for probing).
    pub fn try_flag(&self, key: &str) -> std::result::Result<(), Errno> {
        rustix::mount::fsconfig_set_flag(&self.fd, key)
    }

    /// Sets an option to an fd, returning the raw errno (for probing).
    pub fn try_set_fd(&self, key: &str, fd: BorrowedFd<'_>) -> std::result::Result<(), Errno> {
        rustix::mount::fsconfig_set_fd(&self.fd, key, fd)
    }

    /// Creates the superblock and returns a detached mount of it (never visible in the tree).
    pub fn mount(&self, attrs: MountAttrFlags) -> Result<OwnedFd> {
        rustix::mount::fsconfig_create(&self.fd)
            .map_err(|e| self.fail(format!("create the {} filesystem", self.fstype), e))?;
        rustix::mount::fsmount(&self.fd, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
            .map_err(|e| self.fail(format!("make a {} mount", self.fstype), e))
    }
}

/// `/proc/self/fd/N`: a path the kernel resolves to exactly the open file `fd`.
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Mount IDs of the mount whose root `fd` is: (mountinfo ID, unique ID if the kernel has one,
/// whether `fd` is the root of its mount).
pub fn mount_ids(fd: BorrowedFd<'_>) -> std::result::Result<(u64, Option<u64>, bool), Errno> {
    let plain = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    let is_root = plain
        .stx_attributes_mask
        .contains(rustix::fs::StatxAttributes::MOUNT_ROOT)
        && plain
            .stx_attributes
            .contains(rustix::fs::StatxAttributes::MOUNT_ROOT);
    let unique = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::from_bits_retain(STATX_MNT_ID_UNIQUE),
    )
    .ok()
    .filter(|s| s.stx_mask & STATX_MNT_ID_UNIQUE != 0)
    .map(|s| s.stx_mnt_id);
    Ok((plain.stx_mnt_id, unique, is_root))
}
