//! `snapshot`: a source tree → objects + a composefs image + (optionally) a ref.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use velo_objects::{Digest, Kind, Store, validate_ref_name};

use crate::cfs::{self, FileSystem, LeafContent, RegularFile};
use crate::content::{self, Content};
use crate::error::{ImageError, Result};
use crate::scan::{self, Entry, EntryKind};
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
    let entries = scan::scan(&root, &|n| progress.scanned(n))?;
    let cache = StatCache::load(store, &root);

    // One content job per inode: hardlinks share it.
    let mut first_of_inode: HashMap<(u64, u64), usize> = HashMap::new();
    let mut jobs = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind == EntryKind::File {
            first_of_inode
                .entry((e.stat.dev, e.stat.ino))
                .or_insert_with(|| {
                    jobs.push(i);
                    i
                });
        }
    }
    progress.storing(
        jobs.len() as u64,
        jobs.iter().map(|&i| entries[i].stat.size).sum(),
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(
            opts.jobs
                .unwrap_or_else(|| 2 * std::thread::available_parallelism().map_or(2, |n| n.get())),
        )
        .build()
        .map_err(|e| ImageError::BadSource {
            path: root.clone(),
            reason: format!("cannot start worker threads: {e}"),
        })?;
    let failed = std::sync::atomic::AtomicBool::new(false);
    let contents: Vec<Result<Content>> = pool.install(|| {
        jobs.par_iter()
            .map(|&i| {
                if failed.load(Ordering::Relaxed) {
                    return Err(ImageError::BadSource {
                        path: root.clone(),
                        reason: "cancelled".into(),
                    });
                }
                let r = content::ingest(store, &root, &entries[i], &cache, racy_after);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                progress.stored(entries[i].stat.size);
                r
            })
            .collect()
    });
    let mut by_entry: HashMap<usize, Content> = HashMap::with_capacity(jobs.len());
    let mut first_error = None;
    for (&i, c) in jobs.iter().zip(contents) {
        match c {
            Ok(c) => {
                by_entry.insert(i, c);
            }
            Err(ImageError::BadSource { reason, .. }) if reason == "cancelled" => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    scan::check_dirs_unchanged(&root, &entries)?;

    let mut report = SnapshotReport {
        digest: Digest::from_bytes([0; 32]),
        ref_name: opts.ref_name.clone(),
        source: root.clone(),
        files: 0,
        dirs: 0,
        symlinks: 0,
        specials: 0,
        bytes: 0,
        inline_files: 0,
        new_objects: 0,
        reused_objects: 0,
        new_bytes: 0,
        stat_cache_hits: 0,
        image_bytes: 0,
        new_image: false,
        seconds: 0.0,
    };
    let fs = build_tree(&entries, &first_of_inode, &by_entry, opts, &mut report)?;
    let image = cfs::write_image(fs)?;
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

    StatCache::save(
        store,
        &root,
        jobs.iter()
            .filter(|i| entries[**i].stat.ctime < racy_after)
            .filter_map(|i| match by_entry.get(i) {
                Some(Content::Object { digest, .. }) => Some((Key::of(&entries[*i].stat), *digest)),
                _ => None,
            }),
    );
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Resolves and checks the source: an existing directory, not the store nor inside it.
fn check_source(store: &Store, source: &Path) -> Result<PathBuf> {
    let root = std::fs::canonicalize(source).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::BadSource {
            path: source.to_owned(),
            reason: "no such directory".into(),
        },
        _ => ImageError::io("resolve", source, e),
    })?;
    let md = std::fs::metadata(&root).map_err(|e| ImageError::io("stat", &root, e))?;
    if !md.is_dir() {
        return Err(ImageError::BadSource {
            path: source.to_owned(),
            reason: "not a directory (velo snapshots directory trees)".into(),
        });
    }
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

fn build_tree(
    entries: &[Entry],
    first_of_inode: &HashMap<(u64, u64), usize>,
    contents: &HashMap<usize, Content>,
    opts: &SnapshotOptions,
    report: &mut SnapshotReport,
) -> Result<FileSystem> {
    let mtime = |m: (i64, u32)| match opts.reproducible {
        Some(epoch) if m.0 >= epoch => (epoch, 0),
        _ => m,
    };
    let stat_of = |e: &Entry| {
        cfs::stat(
            e.stat.mode,
            e.stat.uid,
            e.stat.gid,
            mtime(e.stat.mtime),
            e.xattrs.clone(),
        )
    };
    let mut entries_iter = entries.iter().enumerate();
    let Some((_, root)) = entries_iter.next() else {
        return Err(ImageError::BadSource {
            path: PathBuf::new(),
            reason: "empty walk".into(),
        });
    };
    let mut fs = FileSystem::new(stat_of(root));
    report.dirs = 1;
    let mut leaf_of_inode = HashMap::new();
    for (i, e) in entries_iter {
        let inode = match &e.kind {
            EntryKind::Dir => {
                report.dirs += 1;
                cfs::Inode::Directory(Box::new(cfs::Directory::new(stat_of(e))))
            }
            kind => {
                let key = (e.stat.dev, e.stat.ino);
                if let Some(&leaf) = leaf_of_inode.get(&key) {
                    cfs::Inode::leaf(leaf) // another name of an inode already placed: a hardlink
                } else {
                    let content = match kind {
                        EntryKind::File => {
                            let job = first_of_inode.get(&key).copied().unwrap_or(i);
                            let c = contents.get(&job).ok_or_else(|| ImageError::BadSource {
                                path: e.rel.clone(),
                                reason: "content missing (internal error)".into(),
                            })?;
                            report.files += 1;
                            LeafContent::Regular(match c {
                                Content::Inline(data) => {
                                    report.inline_files += 1;
                                    report.bytes += data.len() as u64;
                                    RegularFile::Inline(data.clone().into_boxed_slice())
                                }
                                Content::Object {
                                    digest,
                                    size,
                                    new,
                                    cached,
                                } => {
                                    report.bytes += size;
                                    if *new {
                                        report.new_objects += 1;
                                        report.new_bytes += size;
                                    } else {
                                        report.reused_objects += 1;
                                    }
                                    report.stat_cache_hits += u64::from(*cached);
                                    RegularFile::External(cfs::object_id(digest), *size)
                                }
                            })
                        }
                        EntryKind::Symlink(target) => {
                            report.symlinks += 1;
                            LeafContent::Symlink(target.clone().into_boxed_os_str())
                        }
                        EntryKind::Fifo => {
                            report.specials += 1;
                            LeafContent::Fifo
                        }
                        EntryKind::Socket => {
                            report.specials += 1;
                            LeafContent::Socket
                        }
                        EntryKind::CharDevice => {
                            report.specials += 1;
                            LeafContent::CharacterDevice(e.stat.rdev)
                        }
                        EntryKind::BlockDevice => {
                            report.specials += 1;
                            LeafContent::BlockDevice(e.stat.rdev)
                        }
                        EntryKind::Dir => unreachable!("handled above"),
                    };
                    let leaf = fs.push_leaf(stat_of(e), content);
                    leaf_of_inode.insert(key, leaf);
                    cfs::Inode::leaf(leaf)
                }
            }
        };
        cfs::insert(&mut fs, &e.rel, inode)?;
    }
    Ok(fs)
}
