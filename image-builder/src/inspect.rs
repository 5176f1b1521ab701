//! Reading images back: summaries for `ls`/`inspect`, the objects they need, dumps.

use std::os::fd::AsFd;
use std::path::PathBuf;

use serde::Serialize;
use velo_objects::{Digest, Store};

use crate::cfs::{self, FileSystem, LeafContent, RegularFile};
use crate::error::{ImageError, Result};

/// Largest image velo will read into memory (an image holds metadata only).
pub const MAX_IMAGE_BYTES: u64 = 1 << 30;

/// What an image holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageSummary {
    /// The image digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Size of the image file.
    pub image_bytes: u64,
    /// Regular files (inodes).
    pub files: u64,
    /// Directories (root included).
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Fifos, sockets, devices.
    pub specials: u64,
    /// Bytes of regular-file content.
    pub bytes: u64,
    /// Distinct objects referenced.
    pub objects: u64,
    /// Bytes of those distinct objects.
    pub object_bytes: u64,
}

/// Reads an image's bytes from the store.
pub fn read_image_bytes(store: &Store, digest: &Digest) -> Result<Vec<u8>> {
    let fd = store.open_image(digest)?;
    let path = store.image_path(digest);
    let st = rustix::fs::fstat(&fd).map_err(|e| ImageError::io("stat", &path, e))?;
    if st.st_size as u64 > MAX_IMAGE_BYTES {
        return Err(ImageError::Format {
            what: digest.to_hex(),
            reason: format!("{} bytes is larger than any image velo writes", st.st_size),
        });
    }
    let mut buf = vec![0u8; st.st_size as usize];
    let n = velo_objects::fsutil::pread_full(fd.as_fd(), &mut buf, 0)
        .map_err(|e| ImageError::io("read", &path, e))?;
    buf.truncate(n);
    Ok(buf)
}

/// The owner, mode and mtime of the root of image `digest` (what a tenant's upper root takes).
pub fn root_attrs(store: &Store, digest: &Digest) -> Result<velo_objects::RootAttrs> {
    let fs = load(store, digest)?;
    let st = &fs.root.stat;
    Ok(velo_objects::RootAttrs {
        uid: st.st_uid,
        gid: st.st_gid,
        mode: st.st_mode,
        mtime: (st.st_mtim_sec, st.st_mtim_nsec),
    })
}

/// Parses an image of the store.
pub fn load(store: &Store, digest: &Digest) -> Result<FileSystem> {
    let bytes = read_image_bytes(store, digest)?;
    cfs::read_image(&bytes, &digest.to_hex())
}

/// Summarises a parsed image.
pub fn summarize(fs: &FileSystem) -> ImageSummary {
    let mut s = ImageSummary {
        dirs: 1,
        ..Default::default()
    };
    let mut seen_leaf = std::collections::HashSet::new();
    let mut objects = std::collections::HashMap::new();
    cfs::for_each_entry(fs, |_, inode| match inode {
        cfs::Inode::Directory(_) => s.dirs += 1,
        cfs::Inode::Leaf(id, _) => {
            if !seen_leaf.insert(id.0) {
                return;
            }
            match &fs.leaf(*id).content {
                LeafContent::Regular(r) => {
                    s.files += 1;
                    s.bytes += r.file_size();
                    if let RegularFile::External(id, size)
                    | RegularFile::ExternalNoVerity(id, size) = r
                    {
                        objects.insert(cfs::digest_of(id), *size);
                    }
                }
                LeafContent::Symlink(_) => s.symlinks += 1,
                _ => s.specials += 1,
            }
        }
    });
    s.objects = objects.len() as u64;
    s.object_bytes = objects.values().sum();
    s
}

/// Distinct objects an image references, with their sizes.
pub fn objects(fs: &FileSystem) -> Vec<(Digest, u64)> {
    let mut out: Vec<(Digest, u64)> = fs
        .leaves
        .iter()
        .filter_map(|leaf| match &leaf.content {
            LeafContent::Regular(
                RegularFile::External(id, size) | RegularFile::ExternalNoVerity(id, size),
            ) => Some((cfs::digest_of(id), *size)),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Distinct objects an image references, with their sizes, in the order of the first path that
/// names each (depth-first, sorted by name): files of one package or directory come together.
pub fn objects_in_path_order(fs: &FileSystem) -> Vec<(Digest, u64)> {
    objects_with_paths(fs)
        .into_iter()
        .map(|(digest, size, _)| (digest, size))
        .collect()
}

/// [`objects_in_path_order`], each object with the first path naming it (relative to the
/// tree's root).
pub fn objects_with_paths(fs: &FileSystem) -> Vec<(Digest, u64, PathBuf)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    cfs::for_each_entry(fs, |path, inode| {
        if let cfs::Inode::Leaf(id, _) = inode
            && let LeafContent::Regular(
                RegularFile::External(obj, size) | RegularFile::ExternalNoVerity(obj, size),
            ) = &fs.leaf(*id).content
        {
            let digest = cfs::digest_of(obj);
            if seen.insert(digest) {
                out.push((digest, *size, path.to_owned()));
            }
        }
    });
    out
}
