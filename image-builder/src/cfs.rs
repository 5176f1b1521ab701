//! The one place velo touches the `composefs` crate (pinned to an exact version in the
//! workspace manifest): image bytes, and so image digests, depend on its writer.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;

use composefs::erofs::format::FormatVersion;
use composefs::fsverity::{FsVerityHashValue, Sha256HashValue};
use composefs::tree;
use velo_objects::Digest;

use crate::error::{ImageError, Result};

/// The composefs image format velo writes, passed explicitly so that a crate upgrade cannot
/// silently change it: V1 is what C `mkcomposefs --min-version=1` writes.
pub const IMAGE_FORMAT: FormatVersion = FormatVersion::V1;

/// Files of at most this many bytes are stored inside the image, not as objects.
pub const INLINE_MAX: u64 = composefs::INLINE_CONTENT_MAX_V0 as u64;

/// A composefs tree whose regular files name velo objects.
pub type FileSystem = tree::FileSystem<Sha256HashValue>;
/// Metadata of one inode.
pub type Stat = tree::Stat;
/// A non-directory inode's content.
pub type LeafContent = tree::LeafContent<Sha256HashValue>;
/// A non-directory inode: its metadata and content.
pub type Leaf = tree::Leaf<Sha256HashValue>;
/// A regular file's content.
pub type RegularFile = tree::RegularFile<Sha256HashValue>;
/// An inode: directory, or a leaf by index.
pub type Inode = tree::Inode<Sha256HashValue>;
/// A directory of the tree.
pub type Directory = tree::Directory<Sha256HashValue>;

/// Converts a velo digest to composefs's object id.
pub fn object_id(digest: &Digest) -> Sha256HashValue {
    Sha256HashValue::from_hex(digest.to_hex()).expect("a Digest is always 64 hex digits") // ok: invariant of Digest
}

/// Converts composefs's object id to a velo digest.
pub fn digest_of(id: &Sha256HashValue) -> Digest {
    Digest::parse(&id.to_hex()).expect("composefs object ids are 32-byte sha256 values") // ok: invariant of Sha256HashValue
}

/// Serialises a tree as a composefs EROFS image.
pub fn write_image(fs: FileSystem) -> Result<Vec<u8>> {
    let validated =
        composefs::erofs::writer::ValidatedFileSystem::new(fs).map_err(|e| ImageError::Format {
            what: "being built".into(),
            reason: format!("{e:#}"),
        })?;
    Ok(composefs::erofs::writer::mkfs_erofs_versioned(&validated, IMAGE_FORMAT).into_vec())
}

/// Parses an image back into a tree (untrusted input: every malformation is an error).
///
/// The tree is the one the image was written from: writing it again with [`write_image`] gives
/// the same bytes for every image velo writes (see `exact.rs` for what the composefs reader
/// alone would lose). Callers that must be sure, like a pull of an image from elsewhere, compare
/// the digests ([`rebuild`]).
pub fn read_image(bytes: &[u8], what: &str) -> Result<FileSystem> {
    let format_error = |e: anyhow::Error| ImageError::Format {
        what: what.to_owned(),
        reason: format!("{e:#}"),
    };
    let mut fs = composefs::erofs::reader::erofs_to_filesystem::<Sha256HashValue>(bytes)
        .map_err(format_error)?;
    crate::exact::restore(bytes, &mut fs).map_err(format_error)?;
    Ok(fs)
}

/// Parses an untrusted image in userspace and writes it again with velo's own (deterministic)
/// writer. Returns the parsed tree and the rebuilt bytes; the caller compares the rebuilt
/// bytes' digest with the one it expects, so that only images velo's writer produces ever
/// reach the kernel.
pub fn rebuild(bytes: &[u8], what: &str) -> Result<(FileSystem, Vec<u8>)> {
    let fs = read_image(bytes, what)?;
    let rebuilt = write_image(fs.clone())?;
    Ok((fs, rebuilt))
}

/// How many bytes of an image's start [`check_image_start`] reads: the first block, which holds
/// the composefs header (at 0) and the EROFS superblock (at 1024).
pub const IMAGE_START: usize = 4096;

/// Checks the start of an image said to be `size` bytes — its first
/// `min(size, IMAGE_START)` bytes — before the rest is read: the composefs header, the EROFS
/// superblock, and that the superblock describes an image of exactly `size` bytes, as that of
/// every image velo's writer makes does (whole 4 KiB blocks, counted in the superblock). A
/// claim of a size the image does not have is refused after one block, not after the bytes
/// claimed. Says what is wrong.
pub fn check_image_start(start: &[u8], size: u64) -> std::result::Result<(), String> {
    use composefs::erofs::format::{COMPOSEFS_MAGIC, MAGIC_V1, VERSION};
    const BLOCK: u64 = 4096;
    const SB: usize = 1024;
    if size < BLOCK || !size.is_multiple_of(BLOCK) {
        return Err(format!(
            "{size} bytes is not a whole number of {BLOCK}-byte blocks, as every image velo writes is"
        ));
    }
    if start.len() < IMAGE_START {
        return Err(format!(
            "only {} bytes of its first block arrived",
            start.len()
        ));
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([start[at], start[at + 1], start[at + 2], start[at + 3]]);
    if u32_at(0) != COMPOSEFS_MAGIC.get() {
        return Err(format!(
            "it does not start with the composefs magic number (found {:#010x})",
            u32_at(0)
        ));
    }
    if u32_at(4) != VERSION.get() {
        return Err(format!(
            "its composefs header names EROFS format version {}, not {}",
            u32_at(4),
            VERSION.get()
        ));
    }
    if u32_at(12) > 2 {
        return Err(format!("unknown composefs version {}", u32_at(12)));
    }
    if u32_at(SB) != MAGIC_V1.get() {
        return Err(format!(
            "no EROFS superblock at byte {SB} (found {:#010x})",
            u32_at(SB)
        ));
    }
    if start[SB + 12] != 12 {
        return Err(format!(
            "its superblock has {}-bit blocks, not 12-bit (4 KiB) ones",
            start[SB + 12]
        ));
    }
    let described = u64::from(u32_at(SB + 36)) * BLOCK;
    if described != size {
        return Err(format!(
            "its superblock describes an image of {described} bytes, not the {size} claimed"
        ));
    }
    Ok(())
}

/// The composefs dumpfile text of a tree (one line per entry).
pub fn dumpfile(fs: &FileSystem) -> Result<String> {
    let mut out = Vec::new();
    composefs::dumpfile::write_dumpfile(&mut out, fs).map_err(|e| ImageError::Format {
        what: "dump".into(),
        reason: format!("{e:#}"),
    })?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Builds a [`Stat`].
pub fn stat(
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    xattrs: Vec<(OsString, Vec<u8>)>,
) -> Stat {
    Stat {
        st_mode: mode & 0o7777,
        st_uid: uid,
        st_gid: gid,
        st_mtim_sec: mtime.0,
        st_mtim_nsec: mtime.1,
        xattrs: xattrs
            .into_iter()
            .map(|(k, v)| (k.into_boxed_os_str(), v.into_boxed_slice()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Inserts `inode` at `rel` (relative, parents already present).
pub fn insert(fs: &mut FileSystem, rel: &Path, inode: Inode) -> Result<()> {
    let bad = |e: tree::ImageError| ImageError::BadSource {
        path: rel.to_owned(),
        reason: format!("cannot place in image: {e}"),
    };
    let (dir, name) = fs.root.split_mut(rel.as_os_str()).map_err(bad)?;
    dir.insert(name, inode);
    Ok(())
}

/// Walks every entry of a tree depth-first, sorted by name, with its path (root excluded).
pub fn for_each_entry(fs: &FileSystem, mut f: impl FnMut(&Path, &Inode)) {
    fn walk(dir: &Directory, prefix: &Path, f: &mut dyn FnMut(&Path, &Inode)) {
        for (name, inode) in dir.sorted_entries() {
            let path = prefix.join(name);
            f(&path, inode);
            if let tree::Inode::Directory(sub) = inode {
                walk(sub, &path, f);
            }
        }
    }
    walk(&fs.root, Path::new(""), &mut f);
}

/// True for a name that the image format stores as is (any byte but `/` and NUL).
pub fn name_ok(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    !name.is_empty() && name.len() <= 255 && !name.as_bytes().iter().any(|&b| b == b'/' || b == 0)
}

/// A tiny image (a root dir with one object-backed file) for probing what the kernel can mount.
pub fn probe_image() -> Result<Vec<u8>> {
    let root = stat(0o755, 0, 0, (0, 0), Vec::new());
    let mut fs = FileSystem::new(root.clone());
    let object = velo_objects::verity::VerityHasher::digest(&[0u8; 100]);
    let leaf = fs.push_leaf(
        root,
        LeafContent::Regular(RegularFile::External(object_id(&object), 100)),
    );
    insert(&mut fs, Path::new("probe"), Inode::leaf(leaf))?;
    write_image(fs)
}

/// The image of an empty directory (mode 0755, owned by root, mtime 0): the starting point of
/// a dependency dir being built.
pub fn empty_image() -> Result<Vec<u8>> {
    write_image(FileSystem::new(stat(0o755, 0, 0, (0, 0), Vec::new())))
}
