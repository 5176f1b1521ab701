//! `snapshot`: a source tree → objects + a composefs image + (optionally) a ref.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use velo_objects::{Digest, Kind, Store, validate_ref_name};

use crate::build;
use crate::cfs;
use crate::content::Content;
use crate::error::{ImageError, Result};
use crate::statcache::{Key, StatCache};

/// A file whose ctime is this close to the snapshot's start may still change within the same
/// timestamp tick without its ctime moving (coarse kernel clocks tick every 1-10 ms), so its
/// digest is not cached.
const RACY_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);

/// How to snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Point this ref at the image once it and its objects are durable.
    pub ref_name: Option<String>,
    /// Clamp every mtime to this time (seconds since the epoch, e.g. `SOURCE_DATE_EPOCH`) so
    /// that the same tree gives the same image on any machine.
    pub reproducible: Option<i64>,
    /// Worker threads for hashing and storing (default: twice the CPUs, to overlap I/O).
    pub jobs: Option<usize>,
}

/// Progress reports during a snapshot. All methods have empty defaults.
pub trait Progress: Sync {
    /// The walk has seen `entries` entries.
    fn scanned(&self, _entries: u64) {}
    /// Content storing starts: this many files and bytes to go through.
    fn storing(&self, _files: u64, _bytes: u64) {}
    /// One file's content was handled.
    fn stored(&self, _bytes: u64) {}
}

/// No progress output.
#[derive(Debug)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// What a snapshot made and how.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// The image's digest (its name in the store).
    pub digest: Digest,
    /// The ref pointed at it, if any.
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
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
    /// Objects this snapshot created.
    pub new_objects: u64,
    /// Objects it found already in the store.
    pub reused_objects: u64,
    /// Bytes of the objects it created.
    pub new_bytes: u64,
    /// Files whose digest came from the stat cache (not read at all).
    pub stat_cache_hits: u64,
    /// Size of the EROFS image.
    pub image_bytes: u64,
    /// True if the image itself was new.
    pub new_image: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Snapshots `source` into `store`. Objects and the image are made durable (one `syncfs`)
/// before the ref is written; on any error no ref is written or changed.
pub fn snapshot(
    store: &Store,
    source: &Path,
    opts: &SnapshotOptions,
    progress: &dyn Progress,
) -> Result<SnapshotReport> {
    let started = Instant::now();
    if let Some(name) = &opts.ref_name {
        validate_ref_name(name)?;
    }
    let root = check_source(store, source)?;
    let session = store.begin_write()?;
    let racy_after = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(RACY_WINDOW);
        (now.as_secs() as i64, now.subsec_nanos())
    };
    let cache = StatCache::load(store, &root);
    let built = build::build(&root, store, &cache, racy_after, opts, progress)?;

    let c = built.counts;
    let mut report = SnapshotReport {
        digest: Digest::from_bytes([0; 32]),
        ref_name: opts.ref_name.clone(),
        source: root.clone(),
        files: c.files,
        dirs: c.dirs,
        symlinks: c.symlinks,
        specials: c.specials,
        bytes: c.bytes,
        inline_files: c.inline_files,
        new_objects: 0,
        reused_objects: 0,
        new_bytes: 0,
        stat_cache_hits: 0,
        image_bytes: 0,
        new_image: false,
        seconds: 0.0,
    };
    // One content per regular inode, as the tree has them.
    for content in built.contents.values() {
        if let Content::Object {
            size, new, cached, ..
        } = content
        {
            if *new {
                report.new_objects += 1;
                report.new_bytes += size;
            } else {
                report.reused_objects += 1;
            }
            report.stat_cache_hits += u64::from(*cached);
        }
    }
    let image = cfs::write_image(built.fs)?;
    let stored = store.store_bytes(Kind::Image, &image)?;
    report.digest = stored.digest;
    report.image_bytes = stored.size;
    report.new_image = stored.new;
    let refs: Vec<(&str, Digest)> = opts
        .ref_name
        .iter()
        .map(|n| (n.as_str(), stored.digest))
        .collect();
    session.commit(&refs)?;
    drop(session);

    let entries = &built.entries;
    StatCache::save(
        store,
        &root,
        built
            .jobs
            .iter()
            .filter(|&&i| entries[i].stat.ctime < racy_after)
            .filter_map(|i| match built.contents.get(i) {
                Some(Content::Object { digest, .. }) => Some((Key::of(&entries[*i].stat), *digest)),
                _ => None,
            }),
    );
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Resolves and checks the source: an existing directory, not the store nor inside it.
fn check_source(store: &Store, source: &Path) -> Result<PathBuf> {
    let root = build::resolve_source(source)?;
    let store_root = std::fs::canonicalize(store.root())
        .map_err(|e| ImageError::io("resolve", store.root(), e))?;
    if root.starts_with(&store_root) || store_root.starts_with(&root) {
        return Err(ImageError::BadSource {
            path: source.to_owned(),
            reason: format!("overlaps the store {}", store_root.display()),
        });
    }
    Ok(root)
}
