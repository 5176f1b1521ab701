//! Restores what the `composefs` 0.9.4 reader drops, so that reading an image velo wrote and
//! writing the tree again gives the same bytes.
//!
//! The reader reverses the V1 writer's transformations by name alone, and that loses data:
//!
//! * it strips `trusted.overlay.overlay.{opaque,whiteout,whiteouts}` as writer-internal markers,
//!   but the writer also produces exactly these names when it escapes a tree's own
//!   `trusted.overlay.{opaque,whiteout,whiteouts}` (a directory copied out of an overlay upper
//!   dir has `trusted.overlay.opaque=y`);
//! * it strips `user.overlay.{opaque,whiteout,whiteouts}`, which the writer adds as markers but
//!   which are also ordinary xattrs of a tree (an unprivileged overlay's upper dir has them);
//! * it skips every whiteout named `00`…`ff` in the root directory as one of the writer's 256
//!   stubs, also a tree's own whiteout there (which the writer escaped, unlike its stubs).
//!
//! * it takes every regular file with a `trusted.overlay.overlay.whiteout` xattr for an escaped
//!   whiteout, also a file of the tree's own that had `trusted.overlay.whiteout`.
//!
//! The image itself says which markers the writer added: a directory gets its four markers only
//! if it has an escaped whiteout child, and an escaped whiteout (an empty regular file) gets its
//! two. So the raw xattrs of every inode are read again here and only those markers removed,
//! one instance each, before `trusted.overlay.overlay.X` is unescaped to `trusted.overlay.X`;
//! root-level entries the reader skipped that are not the writer's stubs are put back, and
//! files it mistook for whiteouts get their content back. What remains ambiguous (an empty file
//! carrying both whiteout xattrs with empty values, next to a real whiteout) comes out as a
//! whiteout, and a rebuild of such an image then differs from it: callers that need an exact
//! rebuild compare digests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use composefs::erofs::format;
use composefs::erofs::reader::{DirectoryBlock, Image, InodeHeader, InodeOps, InodeType, XAttr};
use composefs::fsverity::{FsVerityHashValue, Sha256HashValue};
use composefs::generic_tree::LeafId;
use zerocopy::FromBytes;

use crate::cfs::{FileSystem, Inode, LeafContent, RegularFile};

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

/// Deepest directory nesting followed (the composefs reader has the same kind of bound).
const MAX_DEPTH: usize = 4096;

type Xattrs = BTreeMap<Box<OsStr>, Box<[u8]>>;

/// Markers the V1 writer adds to a directory with an escaped whiteout child (name, value).
const DIR_MARKERS: [(&[u8], &[u8]); 4] = [
    (format::XATTR_OVERLAY_WHITEOUTS, b""),
    (format::XATTR_USERXATTR_WHITEOUTS, b""),
    (format::XATTR_OVERLAY_OPAQUE, b"x"),
    (format::XATTR_USERXATTR_OPAQUE, b"x"),
];
/// Markers the V1 writer adds to an escaped whiteout.
const WHITEOUT_MARKERS: [(&[u8], &[u8]); 2] = [
    (format::XATTR_OVERLAY_WHITEOUT, b""),
    (format::XATTR_USERXATTR_WHITEOUT, b""),
];

/// What to change in the tree the composefs reader produced.
#[derive(Default)]
struct Fixes {
    dirs: Vec<(PathBuf, Xattrs)>,
    /// Leaves' xattrs, and their content where the reader got it wrong.
    leaves: Vec<(PathBuf, Xattrs, Option<LeafContent>)>,
    /// Root-level entries the reader skipped: name, stat fields, xattrs, content.
    root_entries: Vec<(OsString, RawStat, Xattrs, LeafContent)>,
}

#[derive(Clone, Copy)]
struct RawStat {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
}

/// Corrects `fs`, just read from `image` by the composefs reader (which validated its
/// structure), as described in the module docs.
pub(crate) fn restore(image: &[u8], fs: &mut FileSystem) -> anyhow::Result<()> {
    let img = Image::open(image)?.restrict_to_composefs()?;
    let root_nid = img.sb.root_nid.get() as u64;
    let mut fixes = Fixes::default();
    let mut seen_leaves = HashSet::new();
    walk(
        &img,
        root_nid,
        Path::new(""),
        0,
        &mut fixes,
        &mut seen_leaves,
    )?;

    for (path, xattrs) in fixes.dirs {
        let dir = if path.as_os_str().is_empty() {
            &mut fs.root
        } else {
            fs.root.get_directory_mut(path.as_os_str())?
        };
        dir.stat.xattrs = xattrs;
    }
    for (path, xattrs, content) in fixes.leaves {
        let id = leaf_id_at(fs, &path)?;
        let leaf = fs.leaf_mut(id);
        leaf.stat.xattrs = xattrs;
        if let Some(content) = content {
            leaf.content = content;
        }
    }
    for (name, raw, xattrs, content) in fixes.root_entries {
        if fs.root.lookup(&name).is_some() {
            anyhow::bail!("root entry {name:?} appears twice");
        }
        let stat = composefs::tree::Stat {
            st_mode: raw.mode & 0o7777,
            st_uid: raw.uid,
            st_gid: raw.gid,
            st_mtim_sec: raw.mtime.0,
            st_mtim_nsec: raw.mtime.1,
            xattrs,
        };
        let id = fs.push_leaf(stat, content);
        fs.root.insert(&name, Inode::leaf(id));
    }
    Ok(())
}

fn leaf_id_at(fs: &FileSystem, path: &Path) -> anyhow::Result<LeafId> {
    let (dir, name) = fs.root.split(path.as_os_str())?;
    Ok(dir.leaf_id(name)?)
}

fn walk(
    img: &Image<'_>,
    nid: u64,
    path: &Path,
    depth: usize,
    fixes: &mut Fixes,
    seen_leaves: &mut HashSet<u64>,
) -> anyhow::Result<()> {
    if depth > MAX_DEPTH {
        anyhow::bail!("directories nested deeper than {MAX_DEPTH}");
    }
    let is_root = depth == 0;
    let inode = img.inode(nid)?;
    let dir_raw = raw_xattrs(img, &inode)?;
    // The writer marks a directory when it escapes a whiteout in it; without the markers no
    // child is an escaped whiteout, whatever xattrs it carries.
    let marked = DIR_MARKERS.iter().all(|m| contains(&dir_raw, m));
    let mut has_escaped_whiteout = false;
    for (name, child_nid) in dir_entries(img, &inode)? {
        if name == b"." || name == b".." {
            continue;
        }
        let child = img.inode(child_nid)?;
        let child_path = path.join(OsStr::from_bytes(&name));
        let file_type = child.mode().0.get() as u32 & S_IFMT;
        if file_type == S_IFDIR {
            walk(img, child_nid, &child_path, depth + 1, fixes, seen_leaves)?;
            continue;
        }
        let raw = raw_xattrs(img, &child)?;
        // What the composefs reader took for an escaped whiteout (and so turned into a
        // character device 0:0, or skipped in the root).
        let reader_whiteout =
            file_type == S_IFREG && raw.iter().any(|(n, _)| n == format::XATTR_OVERLAY_WHITEOUT);
        // What the writer really escaped: an empty regular file with both its markers, in a
        // marked directory.
        let escaped_whiteout = reader_whiteout
            && marked
            && child.size() == 0
            && WHITEOUT_MARKERS.iter().all(|m| contains(&raw, m));
        has_escaped_whiteout |= escaped_whiteout;
        let markers: &[(&[u8], &[u8])] = if escaped_whiteout {
            &WHITEOUT_MARKERS
        } else {
            &[]
        };
        let xattrs = user_xattrs(raw.clone(), markers)?;
        let hex_name = name.len() == 2 && name.iter().all(|b| b.is_ascii_hexdigit());
        if is_root && hex_name && reader_whiteout {
            // The reader skipped it as one of the writer's stubs, but stubs are never escaped:
            // it is the tree's own entry.
            let content = if escaped_whiteout {
                LeafContent::CharacterDevice(0)
            } else {
                regular_content(img, &child, &raw)?
            };
            fixes.root_entries.push((
                OsString::from_vec(name.clone()),
                raw_stat(img, &child),
                xattrs,
                content,
            ));
            continue;
        }
        if is_root && hex_name && child.is_whiteout() {
            continue; // one of the writer's stubs, which the reader rightly skipped
        }
        if seen_leaves.insert(child_nid) {
            let content = if reader_whiteout && !escaped_whiteout {
                Some(regular_content(img, &child, &raw)?)
            } else {
                None
            };
            fixes.leaves.push((child_path, xattrs, content));
        }
    }
    let markers: &[(&[u8], &[u8])] = if has_escaped_whiteout {
        &DIR_MARKERS
    } else {
        &[]
    };
    fixes
        .dirs
        .push((path.to_owned(), user_xattrs(dir_raw, markers)?));
    Ok(())
}

fn contains(raw: &[(Vec<u8>, Vec<u8>)], (name, value): &(&[u8], &[u8])) -> bool {
    raw.iter()
        .any(|(n, v)| n.as_slice() == *name && v.as_slice() == *value)
}

/// The content of a regular file the reader mistook for a whiteout: the object its metacopy
/// xattr names, or its inline data.
fn regular_content(
    img: &Image<'_>,
    inode: &InodeType<'_>,
    raw: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<LeafContent> {
    if let Some((_, v)) = raw
        .iter()
        .find(|(n, _)| n.as_slice() == format::XATTR_OVERLAY_METACOPY)
    {
        // struct ovl_metacopy: version 0, length 36, flags 0, digest algorithm 1 (sha256).
        if v.len() == 36 && v[0] == 0 && v[1] == 36 && v[3] == 1 {
            let id = Sha256HashValue::from_hex(hex_of(&v[4..]))
                .map_err(|e| anyhow::anyhow!("bad metacopy digest: {e:?}"))?;
            return Ok(LeafContent::Regular(RegularFile::External(
                id,
                inode.size(),
            )));
        }
        anyhow::bail!("malformed trusted.overlay.metacopy xattr");
    }
    let size = usize::try_from(inode.size())?;
    if size > crate::cfs::INLINE_MAX as usize {
        anyhow::bail!("inline file of {size} bytes");
    }
    let mut data = Vec::with_capacity(size);
    for blkid in img.inode_blocks(inode)? {
        data.extend_from_slice(img.block(blkid)?);
    }
    if let Some(inline) = inode.inline() {
        data.extend_from_slice(inline);
    }
    if data.len() < size {
        anyhow::bail!("inline file shorter than its size");
    }
    data.truncate(size);
    Ok(LeafContent::Regular(RegularFile::Inline(data.into())))
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The entries of a directory inode: (name, nid), inline block first, then data blocks.
fn dir_entries(img: &Image<'_>, inode: &InodeType<'_>) -> anyhow::Result<Vec<(Vec<u8>, u64)>> {
    let mut out = Vec::new();
    if let Some(inline) = inode.inline()
        && !inline.is_empty()
    {
        let block = DirectoryBlock::ref_from_bytes(inline)
            .map_err(|_| anyhow::anyhow!("malformed inline directory block"))?;
        for entry in block.entries()? {
            let entry = entry?;
            out.push((entry.name.to_vec(), entry.nid()));
        }
    }
    for blkid in img.inode_blocks(inode)? {
        let block = img.directory_block(blkid)?;
        for entry in block.entries()? {
            let entry = entry?;
            out.push((entry.name.to_vec(), entry.nid()));
        }
    }
    Ok(out)
}

fn raw_stat(img: &Image<'_>, inode: &InodeType<'_>) -> RawStat {
    match inode {
        InodeType::Compact(i) => RawStat {
            mode: i.header.mode.0.get() as u32,
            uid: i.header.uid.get() as u32,
            gid: i.header.gid.get() as u32,
            mtime: (img.sb.build_time.get() as i64, img.sb.build_time_nsec.get()),
        },
        InodeType::Extended(i) => RawStat {
            mode: i.header.mode.0.get() as u32,
            uid: i.header.uid.get(),
            gid: i.header.gid.get(),
            mtime: (i.header.mtime.get() as i64, i.header.mtime_nsec.get()),
        },
    }
}

/// Every xattr of an inode as stored (shared ones first, as the reader takes them).
fn raw_xattrs(img: &Image<'_>, inode: &InodeType<'_>) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let Some(section) = inode.xattrs()? else {
        return Ok(out);
    };
    let full = |x: &XAttr| -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let prefix = format::XATTR_PREFIXES
            .get(x.header.name_index as usize)
            .ok_or_else(|| anyhow::anyhow!("xattr name index {} unknown", x.header.name_index))?;
        Ok(([*prefix, x.suffix()?].concat(), x.value()?.to_vec()))
    };
    for id in section.shared()? {
        out.push(full(img.shared_xattr(id.get())?)?);
    }
    for x in section.local()? {
        out.push(full(x?)?);
    }
    Ok(out)
}

/// The tree's own xattrs of an inode: the writer's `markers` removed (one instance each), its
/// metacopy/redirect (and on the root its `trusted.overlay.opaque`) dropped, and escaped
/// `trusted.overlay.overlay.X` names unescaped.
fn user_xattrs(
    mut raw: Vec<(Vec<u8>, Vec<u8>)>,
    markers: &[(&[u8], &[u8])],
) -> anyhow::Result<Xattrs> {
    for (name, value) in markers {
        if let Some(pos) = raw
            .iter()
            .position(|(n, v)| n.as_slice() == *name && v.as_slice() == *value)
        {
            raw.remove(pos);
        }
    }
    let mut out = Xattrs::new();
    let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
    for (name, value) in raw {
        let name = if let Some(rest) = name.strip_prefix(format::XATTR_OVERLAY_ESCAPED_PREFIX) {
            [format::XATTR_OVERLAY_PREFIX, rest].concat()
        } else if name.starts_with(format::XATTR_OVERLAY_PREFIX) {
            // Unescaped trusted.overlay.* names are the writer's own: metacopy and redirect of
            // external files, opaque on the root. Anything else is not from velo's writer and
            // makes the rebuild differ, which callers check.
            continue;
        } else {
            name
        };
        *counts.entry(name.clone()).or_default() += 1;
        out.insert(
            Box::from(OsStr::from_bytes(&name)),
            value.into_boxed_slice(),
        );
    }
    if let Some((name, _)) = counts.iter().find(|(_, n)| **n > 1) {
        anyhow::bail!(
            "xattr {:?} appears twice on one inode",
            String::from_utf8_lossy(name)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::path::Path;

    use crate::cfs::{
        self, Directory, FileSystem, Inode, LeafContent, RegularFile, object_id, write_image,
    };

    fn x(pairs: &[(&str, &[u8])]) -> Vec<(OsString, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), v.to_vec()))
            .collect()
    }

    fn dir(fs: &mut FileSystem, path: &str, mode: u32, xattrs: Vec<(OsString, Vec<u8>)>) {
        let st = cfs::stat(mode, 0, 0, (1_700_000_000, 5), xattrs);
        cfs::insert(
            fs,
            Path::new(path),
            Inode::Directory(Box::new(Directory::new(st))),
        )
        .expect("test fixture");
    }

    fn leaf(
        fs: &mut FileSystem,
        path: &str,
        content: LeafContent,
        xattrs: Vec<(OsString, Vec<u8>)>,
    ) -> composefs::generic_tree::LeafId {
        let st = cfs::stat(0o644, 7, 8, (1_600_000_000, 123_456_789), xattrs);
        let id = fs.push_leaf(st, content);
        cfs::insert(fs, Path::new(path), Inode::leaf(id)).expect("test fixture");
        id
    }

    fn external(n: u8, size: u64) -> LeafContent {
        let digest = velo_objects::verity::VerityHasher::digest(&[n; 100]);
        LeafContent::Regular(RegularFile::External(object_id(&digest), size))
    }

    /// write → read → write gives the same bytes, and the tree read back dumps like the original.
    fn assert_round_trip(fs: FileSystem) {
        let want_dump = cfs::dumpfile(&fs).expect("test fixture");
        let image = write_image(fs).expect("test fixture");
        let (back, rebuilt) = cfs::rebuild(&image, "test").expect("test fixture");
        assert_eq!(
            cfs::dumpfile(&back).expect("test fixture"),
            want_dump,
            "tree read back differs"
        );
        assert!(rebuilt == image, "rebuilt image differs");
    }

    #[test]
    fn overlay_xattrs_of_the_tree_survive() {
        let mut fs = FileSystem::new(cfs::stat(
            0o755,
            0,
            0,
            (1_700_000_000, 0),
            x(&[("security.selinux", b"system_u:object_r:x:s0")]),
        ));
        dir(
            &mut fs,
            "opaque",
            0o755,
            x(&[
                ("trusted.overlay.opaque", b"y"),
                ("user.overlay.opaque", b"y"),
            ]),
        );
        leaf(
            &mut fs,
            "opaque/f",
            external(1, 5000),
            x(&[
                ("trusted.overlay.redirect", b"/elsewhere"),
                ("trusted.overlay.whiteouts", b""),
                ("user.overlay.whiteout", b""),
                ("trusted.overlay.overlay.opaque", b"nested"),
            ]),
        );
        assert_round_trip(fs);
    }

    #[test]
    fn whiteouts_in_root_and_subdirs_survive() {
        let mut fs = FileSystem::new(cfs::stat(0o755, 0, 0, (1_700_000_000, 0), vec![]));
        dir(&mut fs, "d", 0o755, x(&[("trusted.overlay.opaque", b"x")]));
        leaf(&mut fs, "d/gone", LeafContent::CharacterDevice(0), vec![]);
        leaf(
            &mut fs,
            "d/dev",
            LeafContent::CharacterDevice(0x103),
            vec![],
        );
        // A directory with a whiteout whose own xattrs equal the writer's markers.
        dir(
            &mut fs,
            "e",
            0o700,
            x(&[
                ("user.overlay.opaque", b"x"),
                ("user.overlay.whiteouts", b""),
            ]),
        );
        leaf(
            &mut fs,
            "e/w",
            LeafContent::CharacterDevice(0),
            x(&[("user.k", b"v")]),
        );
        // Root-level whiteouts: hex-named (like the writer's stubs, but not stub-like), other.
        leaf(&mut fs, "ab", LeafContent::CharacterDevice(0), vec![]);
        leaf(&mut fs, "zz", LeafContent::CharacterDevice(0), vec![]);
        leaf(
            &mut fs,
            "cd",
            LeafContent::Regular(RegularFile::Inline(b"hi".to_vec().into())),
            vec![],
        );
        assert_round_trip(fs);
    }

    #[test]
    fn stub_like_root_whiteout_round_trips() {
        let mut fs = FileSystem::new(cfs::stat(0o755, 0, 0, (1_700_000_000, 0), vec![]));
        let st = cfs::stat(0o644, 0, 0, (1_700_000_000, 0), vec![]);
        let id = fs.push_leaf(st, LeafContent::CharacterDevice(0));
        cfs::insert(&mut fs, Path::new("0f"), Inode::leaf(id)).expect("test fixture");
        let image = write_image(fs).expect("test fixture");
        let (_, rebuilt) = cfs::rebuild(&image, "test").expect("test fixture");
        assert!(rebuilt == image);
    }

    #[test]
    fn every_kind_of_entry_round_trips() {
        let mut fs = FileSystem::new(cfs::stat(
            0o1777,
            1,
            2,
            (1_600_000_000, 123_456_789),
            x(&[("user.root", b"r")]),
        ));
        dir(&mut fs, "a", 0o2755, vec![]);
        dir(&mut fs, "a/b", 0o755, vec![]);
        dir(&mut fs, "a/b/c", 0o755, vec![]);
        let shared = leaf(&mut fs, "a/b/c/deep", external(2, 70_000), vec![]);
        // Hardlinks: the canonical name is deeper than another.
        cfs::insert(&mut fs, Path::new("z-link"), Inode::leaf(shared)).expect("test fixture");
        cfs::insert(&mut fs, Path::new("a/link2"), Inode::leaf(shared)).expect("test fixture");
        leaf(&mut fs, "sparse", external(3, 5 << 30), vec![]);
        leaf(
            &mut fs,
            "inline",
            LeafContent::Regular(RegularFile::Inline(vec![7u8; 64].into())),
            x(&[
                ("system.posix_acl_access", &[2, 0, 0, 0, 1, 0, 7, 0]),
                ("security.capability", b"\x01\x00\x00\x02"),
            ]),
        );
        leaf(
            &mut fs,
            "empty",
            LeafContent::Regular(RegularFile::Inline(Vec::new().into())),
            vec![],
        );
        leaf(
            &mut fs,
            "sym",
            LeafContent::Symlink(OsString::from("a/b/c/deep").into_boxed_os_str()),
            vec![],
        );
        leaf(&mut fs, "fifo", LeafContent::Fifo, vec![]);
        leaf(&mut fs, "sock", LeafContent::Socket, vec![]);
        leaf(&mut fs, "bdev", LeafContent::BlockDevice(0x700), vec![]);
        leaf(
            &mut fs,
            "a/\u{1}odd name",
            external(4, 4097),
            x(&[("user.same", b"v")]),
        );
        leaf(
            &mut fs,
            "a/b/other",
            external(4, 4097),
            x(&[("user.same", b"v")]),
        );
        assert_round_trip(fs);
    }

    /// Random trees mixing every feature above (a fixed seed: the same cases every run).
    #[test]
    fn random_trees_round_trip() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let xattr_pool: [(&str, &[u8]); 9] = [
            ("trusted.overlay.opaque", b"y"),
            ("trusted.overlay.opaque", b"x"),
            ("trusted.overlay.whiteout", b""),
            ("trusted.overlay.whiteouts", b""),
            ("user.overlay.opaque", b"x"),
            ("user.overlay.whiteout", b""),
            ("user.overlay.whiteouts", b""),
            ("user.a", b"1"),
            ("trusted.overlay.overlay.whiteout", b""),
        ];
        for case in 0..150 {
            let pick = |next: &mut dyn FnMut(u64) -> u64| {
                let mut v: Vec<(&str, &[u8])> = Vec::new();
                for _ in 0..next(3) {
                    let (k, val) = xattr_pool[next(xattr_pool.len() as u64) as usize];
                    if !v.iter().any(|(k2, _)| *k2 == k) {
                        v.push((k, val));
                    }
                }
                x(&v)
            };
            let root_x = pick(&mut next);
            let mut fs = FileSystem::new(cfs::stat(0o755, 0, 0, (1_700_000_000, 0), root_x));
            let mut dirs = vec![String::new()];
            let mut leaves = Vec::new();
            for i in 0..(5 + next(40)) {
                let parent = dirs[next(dirs.len() as u64) as usize].clone();
                let name = if parent.is_empty() && next(4) == 0 {
                    format!("{:02x}", next(256))
                } else {
                    format!("n{i}")
                };
                let path = if parent.is_empty() {
                    name
                } else {
                    format!("{parent}/{name}")
                };
                let (d, _) = fs
                    .root
                    .split(Path::new(&path).as_os_str())
                    .expect("test fixture");
                if d.lookup(Path::new(&path).file_name().expect("test fixture"))
                    .is_some()
                {
                    continue;
                }
                let xs = pick(&mut next);
                match next(8) {
                    0 | 1 => {
                        dir(&mut fs, &path, 0o755, xs);
                        dirs.push(path);
                    }
                    2 | 3 => leaves.push(leaf(&mut fs, &path, LeafContent::CharacterDevice(0), xs)),
                    4 if !leaves.is_empty() => {
                        let id = leaves[next(leaves.len() as u64) as usize];
                        // The composefs reader refuses hardlinked whiteouts (and takes a file
                        // with trusted.overlay.whiteout for one): such images cannot be pulled.
                        let leaf = fs.leaf(id);
                        let whiteout_like =
                            matches!(leaf.content, LeafContent::CharacterDevice(0))
                                || leaf.stat.xattrs.keys().any(|k| {
                                    &**k == std::ffi::OsStr::new("trusted.overlay.whiteout")
                                });
                        if !whiteout_like {
                            cfs::insert(&mut fs, Path::new(&path), Inode::leaf(id))
                                .expect("test fixture");
                        }
                    }
                    5 => leaves.push(leaf(
                        &mut fs,
                        &path,
                        LeafContent::Regular(RegularFile::Inline(vec![1; 3].into())),
                        xs,
                    )),
                    _ => leaves.push(leaf(
                        &mut fs,
                        &path,
                        external(next(4) as u8, 100 + next(9)),
                        xs,
                    )),
                }
            }
            let want = cfs::dumpfile(&fs).expect("test fixture");
            let image = write_image(fs).expect("test fixture");
            let (back, rebuilt) = cfs::rebuild(&image, "test").expect("test fixture");
            assert_eq!(
                cfs::dumpfile(&back).expect("test fixture"),
                want,
                "case {case}"
            );
            assert!(rebuilt == image, "case {case}: rebuilt image differs");
        }
    }
}
