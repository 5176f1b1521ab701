//! The store lock: writers and mounts hold it shared (they never block each other), garbage
//! collection holds it exclusive, so GC never deletes what a writer is about to reference.

use std::os::fd::OwnedFd;

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{IoContext, Result};
use crate::fsutil::open_beneath;
use crate::store::Store;

/// A held store lock; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _fd: OwnedFd,
}

impl Store {
    fn lock_fd(&self) -> Result<OwnedFd> {
        open_beneath(
            self.root_fd(),
            "lock",
            OFlags::CREATE | OFlags::RDWR,
            Mode::from_raw_mode(0o600),
        )
        .ctx("open lock", self.root().join("lock"))
    }

    /// Takes the lock shared (blocks while a GC runs).
    pub fn lock_shared(&self) -> Result<StoreLock> {
        let fd = self.lock_fd()?;
        rustix::fs::flock(&fd, FlockOperation::LockShared)
            .ctx("lock (shared)", self.root().join("lock"))?;
        Ok(StoreLock { _fd: fd })
    }

    /// Takes the lock exclusive (blocks while writers or mounts are at work).
    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        let fd = self.lock_fd()?;
        rustix::fs::flock(&fd, FlockOperation::LockExclusive)
            .ctx("lock (exclusive)", self.root().join("lock"))?;
        Ok(StoreLock { _fd: fd })
    }

    /// Takes the lock exclusive if nobody holds it, else `None`.
    pub fn try_lock_exclusive(&self) -> Result<Option<StoreLock>> {
        let fd = self.lock_fd()?;
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(StoreLock { _fd: fd })),
            Err(Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(crate::StoreError::io(
                "lock (exclusive)",
                self.root().join("lock"),
                e,
            )),
        }
    }
}

impl Store {
    /// Takes the named lock `locks/<name>` exclusively, waiting for its holder (used so that
    /// concurrent `velo run`s needing the same dependency key build it once).
    pub fn lock_named(&self, name: &str) -> Result<StoreLock> {
        self.named_lock(name, true)
            .map(|l| l.expect("a blocking lock is always taken"))
    }

    /// Takes the named lock `locks/<name>` exclusively if nobody holds it.
    pub fn try_lock_named(&self, name: &str) -> Result<Option<StoreLock>> {
        self.named_lock(name, false)
    }

    fn named_lock(&self, name: &str, wait: bool) -> Result<Option<StoreLock>> {
        let path = self.area_path(crate::Area::Locks).join(name);
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(crate::StoreError::Unexpected {
                path,
                reason: "invalid lock name".into(),
            });
        }
        let dir = self.open_area(crate::Area::Locks)?;
        let fd = open_beneath(
            std::os::fd::AsFd::as_fd(&dir),
            name,
            OFlags::CREATE | OFlags::RDWR,
            Mode::from_raw_mode(0o600),
        )
        .ctx("open lock", &path)?;
        let op = if wait {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        match rustix::fs::flock(&fd, op) {
            Ok(()) => Ok(Some(StoreLock { _fd: fd })),
            Err(rustix::io::Errno::WOULDBLOCK) if !wait => Ok(None),
            Err(e) => Err(e).ctx("lock", &path),
        }
    }
}
