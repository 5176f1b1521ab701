//! The mount system calls under velo's mount logic, behind one trait: [`Kernel`] makes them;
//! the unit tests put a recording fake in its place, so the order of the steps (the pin is
//! written before the mount is attached), the fallbacks between kernel versions and the
//! cleanup after a failure at each step are checked without root.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::io::Errno;
use velo_objects::{Digest, VerityMode};

use crate::error::Result;
use crate::mount::{LayerPassing, Layers};

/// The system calls a mount is made of.
pub(crate) trait MountSys {
    /// A detached, read-only EROFS mount of the image at `source` (a `/proc/self/fd` path or
    /// a loop device), with `directio` or not.
    fn erofs(&self, source: &str, digest: &Digest, directio: bool) -> Result<OwnedFd>;
    /// An autoclear loop device over `image`: (its fd, its path).
    fn loop_device(&self, image: BorrowedFd<'_>) -> std::result::Result<(OwnedFd, String), Errno>;
    /// A detached overlay of `layers`, passed to the kernel `how`.
    fn overlay(
        &self,
        digest: &Digest,
        layers: &Layers<'_>,
        verity: VerityMode,
        how: LayerPassing,
    ) -> Result<OwnedFd>;
    /// Attaches the detached mount `mount` at the directory `at`.
    fn attach(&self, mount: BorrowedFd<'_>, at: BorrowedFd<'_>) -> rustix::io::Result<()>;
    /// Detaches whatever is mounted at `dir` (lazily).
    fn detach_at(&self, dir: &Path);
    /// The mount IDs of the mount `fd` is on: (ID, unique ID if the kernel has them, whether
    /// `fd` is that mount's root).
    fn mount_ids(&self, fd: BorrowedFd<'_>)
    -> std::result::Result<(u64, Option<u64>, bool), Errno>;
}

/// The running kernel.
pub(crate) struct Kernel;

impl MountSys for Kernel {
    fn erofs(&self, source: &str, digest: &Digest, directio: bool) -> Result<OwnedFd> {
        crate::mount::erofs_mount_with(source, digest, directio)
    }

    fn loop_device(&self, image: BorrowedFd<'_>) -> std::result::Result<(OwnedFd, String), Errno> {
        crate::loopdev::attach(image)
    }

    fn overlay(
        &self,
        digest: &Digest,
        layers: &Layers<'_>,
        verity: VerityMode,
        how: LayerPassing,
    ) -> Result<OwnedFd> {
        crate::mount::overlay_with(digest, layers, verity, how)
    }

    fn attach(&self, mount: BorrowedFd<'_>, at: BorrowedFd<'_>) -> rustix::io::Result<()> {
        use rustix::mount::MoveMountFlags;
        rustix::mount::move_mount(
            mount,
            "",
            at,
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
    }

    fn detach_at(&self, dir: &Path) {
        let _ = rustix::mount::unmount(
            dir,
            rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW,
        );
    }

    fn mount_ids(
        &self,
        fd: BorrowedFd<'_>,
    ) -> std::result::Result<(u64, Option<u64>, bool), Errno> {
        crate::kernel::mount_ids(fd)
    }
}
