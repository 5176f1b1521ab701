//! # velo-image: snapshots and images
//!
//! [`snapshot`] walks a directory tree, keeps everything it has (regular files, directories,
//! symlinks, hardlinks, sparse and large files, modes incl. setuid/sticky, owners, nanosecond
//! mtimes, every xattr, fifos/sockets/device nodes), stores file contents in a
//! [`velo_objects::Store`] in parallel, and writes a composefs EROFS image of the metadata with
//! the `composefs` crate. [`inspect`] reads images back.
//!
//! For users who cannot write the store: [`snapshot_unstored`] builds the same image without a
//! store (it only hashes the files and says where each object's bytes are), and the service that
//! owns the store runs [`map_to_user`] on the tree of an image such a user sends.

mod build;
mod cfs;
mod content;
pub mod diff;
mod error;
mod exact;
pub mod fsck;
pub mod inspect;
mod sanitize;
pub(crate) mod scan;
mod sink;
mod snapshot;
mod statcache;
mod unstored;

pub use cfs::{
    FileSystem, IMAGE_FORMAT, IMAGE_START, INLINE_MAX, Leaf, check_image_start, dumpfile,
    empty_image, probe_image, read_image, rebuild, write_image,
};
pub use error::{ImageError, Result};
pub use sanitize::{MAX_LISTED_DEVICES, MapReport, is_removed_device, map_to_user, xattr_kept};
pub use snapshot::{NoProgress, Progress, SnapshotOptions, SnapshotReport, snapshot};
pub use unstored::{UnstoredObject, UnstoredReport, UnstoredSnapshot, snapshot_unstored};
