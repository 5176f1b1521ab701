//! # velo-image: snapshots and images
//!
//! [`snapshot`] walks a directory tree, keeps everything it has (regular files, directories,
//! symlinks, hardlinks, sparse and large files, modes incl. setuid/sticky, owners, nanosecond
//! mtimes, every xattr, fifos/sockets/device nodes), stores file contents in a
//! [`velo_objects::Store`] in parallel, and writes a composefs EROFS image of the metadata with
//! the `composefs` crate. [`inspect`] reads images back.

mod cfs;
mod content;
pub mod diff;
mod error;
mod exact;
pub mod fsck;
pub mod inspect;
pub(crate) mod scan;
mod snapshot;
mod statcache;

pub use cfs::{
    FileSystem, IMAGE_FORMAT, INLINE_MAX, dumpfile, empty_image, probe_image, read_image, rebuild,
    write_image,
};
pub use error::{ImageError, Result};
pub use snapshot::{NoProgress, Progress, SnapshotOptions, SnapshotReport, snapshot};
