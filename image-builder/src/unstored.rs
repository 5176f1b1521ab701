//! `snapshot_unstored`: a source tree → the image a snapshot would write and the list of
//! objects it needs, with no store at all. An ordinary user's client uses it to send a tree to
//! the root service that owns the store: the service checks every object against its digest
//! and rebuilds the image before anything reaches the store.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use velo_objects::Digest;
use velo_objects::validate_ref_name;
use velo_objects::verity::VerityHasher;

use crate::build;
use crate::cfs;
use crate::error::Result;
use crate::inspect;
use crate::sink::HashOnly;
use crate::snapshot::{Progress, SnapshotOptions};
use crate::statcache::StatCache;

/// What [`snapshot_unstored`] made: the image, byte for byte as [`crate::snapshot`] would
/// store it for the same tree and options, and where to read each object it needs.
#[derive(Debug, Clone)]
pub struct UnstoredSnapshot {
    /// The composefs EROFS image.
    pub image: Vec<u8>,
    /// The image's fs-verity digest (its name in a store).
    pub digest: Digest,
    /// What the tree holds.
    pub report: UnstoredReport,
    /// Every object the image references, once each, in the order of
    /// [`inspect::objects_in_path_order`].
    pub objects: Vec<UnstoredObject>,
}

/// One object an unstored snapshot's image needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnstoredObject {
    /// Its fs-verity digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Absolute path of the first file (in path order) with this content, as it was while
    /// being snapshotted: whoever reads it later must check its digest again.
    pub path: PathBuf,
}

/// The counts of an unstored snapshot (those of [`crate::SnapshotReport`] that need no store).
#[derive(Debug, Clone, Serialize)]
pub struct UnstoredReport {
    /// The image's digest.
    pub digest: Digest,
    /// The source tree (absolute).
    pub source: PathBuf,
    /// Regular files (each hardlinked inode once).
    pub files: u64,
    /// Directories, root included.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Fifos, sockets and device nodes.
    pub specials: u64,
    /// Bytes of regular-file content.
    pub bytes: u64,
    /// Files stored inside the image (at most 64 bytes).
    pub inline_files: u64,
    /// Distinct objects the image references.
    pub objects: u64,
    /// Bytes of those objects.
    pub object_bytes: u64,
    /// Size of the EROFS image.
    pub image_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Snapshots `source` without a store: every file is read once and hashed (in parallel, large
/// files streaming), and the image is built as [`crate::snapshot`] builds it, so its bytes and
/// digest are the same for the same tree and `opts`. Nothing is written anywhere. `ref_name`,
/// if given, is only checked (whoever stores the image writes the ref); there is no stat cache.
/// A file or directory that changes while being read fails it, naming the path.
pub fn snapshot_unstored(
    source: &Path,
    opts: &SnapshotOptions,
    progress: &dyn Progress,
) -> Result<UnstoredSnapshot> {
    let started = Instant::now();
    if let Some(name) = &opts.ref_name {
        validate_ref_name(name)?;
    }
    let root = build::resolve_source(source)?;
    // No cache, and no file is recent enough to look one up.
    let no_cache = StatCache::default();
    let built = build::build(&root, &HashOnly, &no_cache, (i64::MIN, 0), opts, progress)?;
    let objects: Vec<UnstoredObject> = inspect::objects_with_paths(&built.fs)
        .into_iter()
        .map(|(digest, size, rel)| UnstoredObject {
            digest,
            size,
            path: root.join(rel),
        })
        .collect();
    let image = cfs::write_image(built.fs)?;
    let digest = VerityHasher::digest(&image);
    let c = built.counts;
    let report = UnstoredReport {
        digest,
        source: root,
        files: c.files,
        dirs: c.dirs,
        symlinks: c.symlinks,
        specials: c.specials,
        bytes: c.bytes,
        inline_files: c.inline_files,
        objects: objects.len() as u64,
        object_bytes: objects.iter().map(|o| o.size).sum(),
        image_bytes: image.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(UnstoredSnapshot {
        image,
        digest,
        report,
        objects,
    })
}
