//! What every snapshot does, whatever keeps its objects: walk the source, hand each regular
//! inode's content to a sink in parallel, check that nothing changed meanwhile, and build the
//! composefs tree (hardlinks as one leaf).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::cfs::{self, FileSystem, LeafContent, RegularFile};
use crate::content::{self, Content};
use crate::error::{ImageError, Result};
use crate::scan::{self, Entry, EntryKind};
use crate::sink::ObjectSink;
use crate::snapshot::{Progress, SnapshotOptions};
use crate::statcache::StatCache;

/// Counts of what a tree holds, each hardlinked inode once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TreeCounts {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub specials: u64,
    pub bytes: u64,
    pub inline_files: u64,
}

/// A walked source tree, its contents handled and its composefs tree built.
pub(crate) struct Built {
    /// Every entry of the walk, the root first.
    pub entries: Vec<Entry>,
    /// The index of each regular inode's first entry, in walk order.
    pub jobs: Vec<usize>,
    /// Each regular inode's content, by the index of its first entry.
    pub contents: HashMap<usize, Content>,
    /// The tree, ready for [`cfs::write_image`].
    pub fs: FileSystem,
    /// What it holds.
    pub counts: TreeCounts,
}

/// Resolves `source` to a canonical path and checks that it is an existing directory.
pub(crate) fn resolve_source(source: &Path) -> Result<PathBuf> {
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
    Ok(root)
}

/// Walks `root` (canonical), hands every regular inode's content to `sink` on `opts.jobs`
/// threads (`cache` and `racy_after` as in [`content::ingest`]), fails if a file or directory
/// changed meanwhile, and builds the tree.
pub(crate) fn build(
    root: &Path,
    sink: &dyn ObjectSink,
    cache: &StatCache,
    racy_after: (i64, u32),
    opts: &SnapshotOptions,
    progress: &dyn Progress,
) -> Result<Built> {
    let entries = scan::scan(root, &|n| progress.scanned(n))?;

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
    let contents = ingest_all(
        root, &entries, &jobs, sink, cache, racy_after, opts, progress,
    )?;
    scan::check_dirs_unchanged(root, &entries)?;
    let (fs, counts) = build_tree(&entries, &first_of_inode, &contents, opts)?;
    Ok(Built {
        entries,
        jobs,
        contents,
        fs,
        counts,
    })
}

/// Runs the content jobs in parallel; the first real error wins (the others are cancelled).
#[allow(clippy::too_many_arguments)]
fn ingest_all(
    root: &Path,
    entries: &[Entry],
    jobs: &[usize],
    sink: &dyn ObjectSink,
    cache: &StatCache,
    racy_after: (i64, u32),
    opts: &SnapshotOptions,
    progress: &dyn Progress,
) -> Result<HashMap<usize, Content>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(
            opts.jobs
                .unwrap_or_else(|| 2 * std::thread::available_parallelism().map_or(2, |n| n.get())),
        )
        .build()
        .map_err(|e| ImageError::BadSource {
            path: root.to_owned(),
            reason: format!("cannot start worker threads: {e}"),
        })?;
    let failed = AtomicBool::new(false);
    // None: cancelled after another job failed.
    let results: Vec<Option<Result<Content>>> = pool.install(|| {
        jobs.par_iter()
            .map(|&i| {
                if failed.load(Ordering::Relaxed) {
                    return None;
                }
                let r = content::ingest(sink, root, &entries[i], cache, racy_after);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                progress.stored(entries[i].stat.size);
                Some(r)
            })
            .collect()
    });
    let mut contents = HashMap::with_capacity(jobs.len());
    let mut first_error = None;
    for (&i, r) in jobs.iter().zip(results) {
        match r {
            Some(Ok(c)) => {
                contents.insert(i, c);
            }
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {}
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(contents),
    }
}

fn build_tree(
    entries: &[Entry],
    first_of_inode: &HashMap<(u64, u64), usize>,
    contents: &HashMap<usize, Content>,
    opts: &SnapshotOptions,
) -> Result<(FileSystem, TreeCounts)> {
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
    let mut counts = TreeCounts {
        dirs: 1,
        ..TreeCounts::default()
    };
    let mut leaf_of_inode = HashMap::new();
    for (i, e) in entries_iter {
        let inode = match &e.kind {
            EntryKind::Dir => {
                counts.dirs += 1;
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
                            counts.files += 1;
                            LeafContent::Regular(match c {
                                Content::Inline(data) => {
                                    counts.inline_files += 1;
                                    counts.bytes += data.len() as u64;
                                    RegularFile::Inline(data.clone().into_boxed_slice())
                                }
                                Content::Object { digest, size, .. } => {
                                    counts.bytes += size;
                                    RegularFile::External(cfs::object_id(digest), *size)
                                }
                            })
                        }
                        EntryKind::Symlink(target) => {
                            counts.symlinks += 1;
                            LeafContent::Symlink(target.clone().into_boxed_os_str())
                        }
                        EntryKind::Fifo => {
                            counts.specials += 1;
                            LeafContent::Fifo
                        }
                        EntryKind::Socket => {
                            counts.specials += 1;
                            LeafContent::Socket
                        }
                        EntryKind::CharDevice => {
                            counts.specials += 1;
                            LeafContent::CharacterDevice(e.stat.rdev)
                        }
                        EntryKind::BlockDevice => {
                            counts.specials += 1;
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
    Ok((fs, counts))
}
