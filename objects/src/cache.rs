//! `cache/`: data velo can rebuild (the stat cache). Written atomically, never trusted blindly.

use std::os::fd::AsFd;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, open_beneath};
use crate::store::{Area, Store};

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(StoreError::Unexpected {
            path: name.into(),
            reason: "invalid cache entry name".into(),
        });
    }
    Ok(())
}

impl Store {
    /// Reads a cache entry; `None` if there is none.
    pub fn read_cache(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_name(name)?;
        let dir = self.open_area(Area::Cache)?;
        let path = self.area_path(Area::Cache).join(name);
        let fd = match open_beneath(dir.as_fd(), name, OFlags::RDONLY, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(StoreError::io("open cache", path, e)),
        };
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut data)
            .ctx("read cache", &path)?;
        Ok(Some(data))
    }

    /// Replaces a cache entry atomically (no fsync: a lost cache is rebuilt).
    pub fn write_cache(&self, name: &str, data: &[u8]) -> Result<()> {
        check_name(name)?;
        let dir = self.open_area(Area::Cache)?;
        let path = self.area_path(Area::Cache).join(name);
        let tmp_name = fsutil::unique_name("cache-");
        {
            let fd = open_beneath(
                self.tmp_fd(),
                &tmp_name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY,
                Mode::from_raw_mode(0o600),
            )
            .ctx("create", self.area_path(Area::Tmp).join(&tmp_name))?;
            fsutil::pwrite_all(fd.as_fd(), data, 0).ctx("write cache", &path)?;
        }
        if let Err(e) = rustix::fs::renameat(self.tmp_fd(), tmp_name.as_str(), dir.as_fd(), name) {
            let _ = rustix::fs::unlinkat(
                self.tmp_fd(),
                tmp_name.as_str(),
                rustix::fs::AtFlags::empty(),
            );
            return Err(StoreError::io("write cache", path, e));
        }
        Ok(())
    }
}
