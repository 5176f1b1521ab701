//! `cache/`: data velo can rebuild (the stat cache). Written atomically, never trusted blindly.

use std::os::fd::AsFd;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::open_beneath;
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
        self.replace_file(dir.as_fd(), name, data, false, &path)
    }
}
