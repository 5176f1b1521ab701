//! `cache/`: data velo can rebuild (the stat cache). Written atomically, never trusted blindly.

use std::os::fd::AsFd;

use rustix::io::Errno;

use crate::error::{Result, StoreError};
use crate::fsutil;
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

/// Cache entries named after an image start with this, then its digest: the record that the
/// image file was checked against its name (`velo-mount`); GC removes them with the image.
pub const IMAGE_CHECK_PREFIX: &str = "image-checked-";

impl Store {
    /// Removes a cache entry (none is fine).
    pub fn remove_cache(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let dir = self.open_area(Area::Cache)?;
        match rustix::fs::unlinkat(&dir, name, rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(StoreError::io(
                "remove cache",
                self.area_path(Area::Cache).join(name),
                e,
            )),
        }
    }

    /// Reads a cache entry of at most `max` bytes (the caller knows what its entries hold);
    /// `None` if there is none. Anything but a regular file is [`StoreError::NotRegular`], a
    /// larger one [`StoreError::TooLarge`], neither of them read.
    pub fn read_cache(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        check_name(name)?;
        let dir = self.open_area(Area::Cache)?;
        let path = self.area_path(Area::Cache).join(name);
        fsutil::read_store_file(dir.as_fd(), name, &path, max)
    }

    /// Replaces a cache entry atomically (no fsync: a lost cache is rebuilt).
    pub fn write_cache(&self, name: &str, data: &[u8]) -> Result<()> {
        check_name(name)?;
        let dir = self.open_area(Area::Cache)?;
        let path = self.area_path(Area::Cache).join(name);
        self.replace_file(dir.as_fd(), name, data, false, &path)
    }
}
