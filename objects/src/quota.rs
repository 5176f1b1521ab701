//! Per-tenant size limits with project quotas, where the store's filesystem has them (ext4 with
//! `-O quota,project` mounted `prjquota`, XFS with `prjquota`). Elsewhere velo says plainly that
//! a limit is not enforced.
//!
//! A tenant's upper and work dirs get one project id with the inherit flag (both, or overlay's
//! copy-up rename from work to upper would cross projects and fail), and the project gets a
//! block hard limit.

#![allow(unsafe_code)] // system calls rustix does not wrap; each block says why it is sound

use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::io::Errno;
use rustix::ioctl::{Getter, Opcode, Setter, ioctl, opcode};

/// `struct fsxattr` from `<linux/fs.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// `struct if_dqinfo` from `<linux/quota.h>`.
#[repr(C)]
#[derive(Default)]
struct DqInfo {
    bgrace: u64,
    igrace: u64,
    flags: u32,
    valid: u32,
}

const FS_IOC_FSGETXATTR: Opcode = opcode::read::<FsXattr>(b'X', 31);
const FS_IOC_FSSETXATTR: Opcode = opcode::write::<FsXattr>(b'X', 32);
const FS_XFLAG_PROJINHERIT: u32 = 0x200;
const PRJQUOTA: i32 = 2;

fn quotactl_fd(
    fd: BorrowedFd<'_>,
    cmd: i32,
    id: u32,
    addr: *mut libc::c_void,
) -> Result<(), Errno> {
    // SAFETY: quotactl_fd(2) with an open fd, a command and a pointer to the structure that
    // command reads or writes (the callers pass one of the matching size).
    let r = unsafe {
        libc::syscall(
            libc::SYS_quotactl_fd,
            fd.as_raw_fd(),
            libc::QCMD(cmd, PRJQUOTA),
            id,
            addr,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ))
    }
}

/// Whether the filesystem of `fd` enforces project quotas; `Err` says why not.
pub fn supported(fd: BorrowedFd<'_>) -> Result<(), String> {
    let mut info = DqInfo::default();
    match quotactl_fd(fd, libc::Q_GETINFO, 0, (&mut info as *mut DqInfo).cast()) {
        Ok(()) => Ok(()),
        Err(Errno::NOSYS) => Err("the kernel has no quotactl_fd (Linux 5.14+)".into()),
        Err(Errno::SRCH) => Err("project quotas are not enabled on the store's filesystem (ext4: mkfs -O quota,project, mount -o prjquota)".into()),
        Err(e) => Err(format!("the store's filesystem has no project quotas ({e})")),
    }
}

/// Puts a directory in project `id`, inherited by everything created in it.
pub fn set_project(dir: BorrowedFd<'_>, id: u32) -> Result<(), Errno> {
    // SAFETY: FS_IOC_FSGETXATTR writes one `struct fsxattr`, which `FsXattr` mirrors.
    let mut attr: FsXattr = unsafe { ioctl(dir, Getter::<FS_IOC_FSGETXATTR, FsXattr>::new()) }?;
    attr.projid = id;
    attr.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: FS_IOC_FSSETXATTR reads one `struct fsxattr`.
    unsafe { ioctl(dir, Setter::<FS_IOC_FSSETXATTR, FsXattr>::new(attr)) }
}

/// Sets project `id`'s block hard limit to `bytes` (rounded up to KiB).
pub fn set_limit(fd: BorrowedFd<'_>, id: u32, bytes: u64) -> Result<(), Errno> {
    let mut q = libc::dqblk {
        dqb_bhardlimit: bytes.div_ceil(1024),
        dqb_bsoftlimit: 0,
        dqb_curspace: 0,
        dqb_ihardlimit: 0,
        dqb_isoftlimit: 0,
        dqb_curinodes: 0,
        dqb_btime: 0,
        dqb_itime: 0,
        dqb_valid: libc::QIF_BLIMITS,
    };
    quotactl_fd(
        fd,
        libc::Q_SETQUOTA,
        id,
        (&mut q as *mut libc::dqblk).cast(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<super::FsXattr>(), 28);
        assert_eq!(std::mem::size_of::<super::DqInfo>(), 24);
        assert_eq!(std::mem::size_of::<libc::dqblk>(), 72);
    }
}
