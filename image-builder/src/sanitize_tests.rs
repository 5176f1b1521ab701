//! Tests of [`super::map_to_user`]: each rule, hardlinks, idempotence, a conforming tree left
//! byte-identical, the representation after `read_image`, and random trees.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;
use crate::cfs::{self, FileSystem, Inode, LeafContent, RegularFile, object_id, write_image};

const UID: u32 = 1000;
const GID: u32 = 1001;

fn x(pairs: &[(&str, &[u8])]) -> Vec<(OsString, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (OsString::from(k), v.to_vec()))
        .collect()
}

fn new_fs(mode: u32, owner: (u32, u32), xattrs: Vec<(OsString, Vec<u8>)>) -> FileSystem {
    FileSystem::new(cfs::stat(
        mode,
        owner.0,
        owner.1,
        (1_700_000_000, 0),
        xattrs,
    ))
}

fn dir(fs: &mut FileSystem, path: &str, mode: u32, owner: (u32, u32), xattrs: &[(&str, &[u8])]) {
    let st = cfs::stat(mode, owner.0, owner.1, (1_700_000_000, 5), x(xattrs));
    cfs::insert(
        fs,
        Path::new(path),
        Inode::Directory(Box::new(cfs::Directory::new(st))),
    )
    .expect("test fixture");
}

fn leaf(
    fs: &mut FileSystem,
    path: &str,
    content: LeafContent,
    mode: u32,
    owner: (u32, u32),
    xattrs: &[(&str, &[u8])],
) -> composefs::generic_tree::LeafId {
    let st = cfs::stat(mode, owner.0, owner.1, (1_600_000_000, 7), x(xattrs));
    let id = fs.push_leaf(st, content);
    link(fs, path, id);
    id
}

fn link(fs: &mut FileSystem, path: &str, id: composefs::generic_tree::LeafId) {
    cfs::insert(fs, Path::new(path), Inode::leaf(id)).expect("test fixture");
}

fn file(n: u8) -> LeafContent {
    let digest = velo_objects::verity::VerityHasher::digest(&[n; 100]);
    LeafContent::Regular(RegularFile::External(object_id(&digest), 100))
}

fn inline(data: &[u8]) -> LeafContent {
    LeafContent::Regular(RegularFile::Inline(data.to_vec().into()))
}

/// Every stat of the tree with its path ("" for the root), each leaf under its first name.
fn stats(fs: &FileSystem) -> BTreeMap<PathBuf, cfs::Stat> {
    let mut out = BTreeMap::from([(PathBuf::new(), fs.root.stat.clone())]);
    cfs::for_each_entry(fs, |path, inode| {
        out.insert(path.to_owned(), inode.stat(&fs.leaves).clone());
    });
    out
}

fn dump(fs: &FileSystem) -> String {
    cfs::dumpfile(fs).expect("dump")
}

#[test]
fn every_owner_becomes_the_users() {
    let mut fs = new_fs(0o755, (0, 0), vec![]);
    dir(&mut fs, "d", 0o755, (UID, 0), &[]);
    leaf(&mut fs, "d/f", file(1), 0o644, (0, GID), &[]);
    leaf(&mut fs, "mine", file(2), 0o644, (UID, GID), &[]);
    leaf(
        &mut fs,
        "link",
        LeafContent::Symlink(OsStr::new("mine").into()),
        0o777,
        (5, 6),
        &[],
    );
    leaf(
        &mut fs,
        "wh",
        LeafContent::CharacterDevice(0),
        0o644,
        (7, 7),
        &[],
    );
    let report = map_to_user(&mut fs, UID, GID);
    assert_eq!(report.owners_changed, 5, "{report:?}"); // all but "mine"
    for (path, st) in stats(&fs) {
        assert_eq!((st.st_uid, st.st_gid), (UID, GID), "{}", path.display());
    }
    assert_eq!(
        MapReport {
            owners_changed: 0,
            ..report
        },
        MapReport::default()
    );
}

#[test]
fn set_id_bits_are_cleared_and_sticky_and_permissions_kept() {
    let mut fs = new_fs(0o3775, (UID, GID), vec![]);
    let modes = [
        ("suid", 0o4755, 0o755),
        ("sgid", 0o2711, 0o711),
        ("both", 0o6750, 0o750),
        ("all", 0o7777, 0o1777),
        ("plain", 0o640, 0o640),
        ("sticky", 0o1700, 0o1700),
    ];
    for (i, (name, mode, _)) in modes.iter().enumerate() {
        leaf(&mut fs, name, file(i as u8), *mode, (UID, GID), &[]);
    }
    dir(&mut fs, "sgid-dir", 0o2775, (UID, GID), &[]);
    let report = map_to_user(&mut fs, UID, GID);
    assert_eq!(report.set_id_cleared, 6, "{report:?}"); // root, 4 files, the dir
    assert_eq!(report.owners_changed, 0);
    let st = stats(&fs);
    assert_eq!(st[Path::new("")].st_mode, 0o1775);
    assert_eq!(st[Path::new("sgid-dir")].st_mode, 0o775);
    for (name, _, want) in modes {
        assert_eq!(st[Path::new(name)].st_mode, want, "{name}");
    }
}

#[test]
fn devices_are_removed_but_whiteouts_stay() {
    let mut fs = new_fs(0o755, (UID, GID), vec![]);
    dir(&mut fs, "a", 0o755, (UID, GID), &[]);
    dir(&mut fs, "a/sub", 0o755, (UID, GID), &[]);
    let null = leaf(
        &mut fs,
        "a/null",
        LeafContent::CharacterDevice(0x103),
        0o666,
        (0, 0),
        &[],
    );
    link(&mut fs, "z-null-too", null); // a hardlinked device: every name goes
    leaf(
        &mut fs,
        "a/sub/loop0",
        LeafContent::BlockDevice(0x700),
        0o660,
        (0, 6),
        &[],
    );
    leaf(
        &mut fs,
        "a/sub/gone",
        LeafContent::CharacterDevice(0),
        0o644,
        (0, 0),
        &[],
    );
    leaf(
        &mut fs,
        "gone",
        LeafContent::CharacterDevice(0),
        0o600,
        (UID, GID),
        &[],
    );
    leaf(&mut fs, "b", file(1), 0o644, (UID, GID), &[]);
    let report = map_to_user(&mut fs, UID, GID);
    assert_eq!(report.devices_removed, 3, "{report:?}");
    assert_eq!(
        report.device_paths,
        ["a/null", "a/sub/loop0", "z-null-too"].map(PathBuf::from)
    );
    // Only the whiteout in a/sub was someone else's: the removed devices are not counted.
    assert_eq!(report.owners_changed, 1);
    fs.fsck().expect("no orphaned leaves");
    assert_eq!(fs.leaves.len(), 3);
    let names: Vec<_> = stats(&fs).into_keys().collect();
    assert_eq!(
        names,
        ["", "a", "a/sub", "a/sub/gone", "b", "gone"].map(PathBuf::from)
    );
    assert!(fs.leaves.iter().all(
        |l| !is_removed_device(&l.content) && !matches!(l.content, LeafContent::BlockDevice(_))
    ));
    write_image(fs).expect("writes");
}

#[test]
fn many_devices_are_counted_and_a_few_listed() {
    let mut fs = new_fs(0o755, (UID, GID), vec![]);
    for i in 0..25 {
        leaf(
            &mut fs,
            &format!("tty{i:02}"),
            LeafContent::CharacterDevice(0x400 + i),
            0o620,
            (UID, GID),
            &[],
        );
    }
    let report = map_to_user(&mut fs, UID, GID);
    assert_eq!(report.devices_removed, 25);
    assert_eq!(report.device_paths.len(), MAX_LISTED_DEVICES);
    assert_eq!(report.device_paths[0], PathBuf::from("tty00"));
    assert!(fs.leaves.is_empty() && fs.root.entries().next().is_none());
}

#[test]
fn only_user_acl_and_the_trees_overlay_xattrs_stay() {
    let acl: &[u8] = &[2, 0, 0, 0, 1, 0, 7, 0, 255, 255, 255, 255];
    let all: &[(&str, &[u8])] = &[
        ("user.k", b"v"),
        ("user.overlay.opaque", b"y"),
        ("system.posix_acl_access", acl),
        ("system.posix_acl_default", acl),
        ("trusted.overlay.opaque", b"y"),
        ("trusted.overlay.redirect", b"/elsewhere"),
        ("trusted.overlay.overlay.whiteout", b""),
        ("security.capability", b"\x01\x00\x00\x02"),
        ("security.selinux", b"system_u:object_r:bin_t:s0"),
        ("trusted.t", b"tv"),
        ("trusted.overlayx", b"not overlay's"),
        ("system.nfs4_acl", b"?"),
    ];
    let mut fs = new_fs(0o755, (UID, GID), x(all));
    leaf(&mut fs, "f", file(1), 0o755, (UID, GID), all);
    let report = map_to_user(&mut fs, UID, GID);
    let kept = |fs: &FileSystem, path: &str| -> Vec<String> {
        stats(fs)[Path::new(path)]
            .xattrs
            .keys()
            .map(|k| k.to_string_lossy().into_owned())
            .collect()
    };
    let want = [
        "system.posix_acl_access",
        "system.posix_acl_default",
        "trusted.overlay.opaque",
        "trusted.overlay.overlay.whiteout",
        "trusted.overlay.redirect",
        "user.k",
        "user.overlay.opaque",
    ];
    assert_eq!(kept(&fs, ""), want);
    assert_eq!(kept(&fs, "f"), want);
    let dropped: Vec<_> = report
        .xattrs_dropped
        .iter()
        .map(|(k, n)| (k.as_str(), *n))
        .collect();
    assert_eq!(
        dropped,
        [
            ("security.capability", 2),
            ("security.selinux", 2),
            ("system.nfs4_acl", 2),
            ("trusted.overlayx", 2),
            ("trusted.t", 2),
        ]
    );
    assert_eq!(report.xattrs_dropped_total(), 10);
    // Values are kept as they were.
    assert_eq!(
        &*stats(&fs)[Path::new("f")].xattrs[OsStr::new("trusted.overlay.redirect")],
        b"/elsewhere"
    );
}

#[test]
fn a_hardlinked_leaf_is_changed_once_and_stays_shared() {
    let mut fs = new_fs(0o755, (UID, GID), vec![]);
    dir(&mut fs, "d", 0o755, (UID, GID), &[]);
    let id = leaf(
        &mut fs,
        "d/a",
        file(1),
        0o4755,
        (0, 0),
        &[("security.capability", b"c")],
    );
    link(&mut fs, "b", id);
    link(&mut fs, "d/c", id);
    let report = map_to_user(&mut fs, UID, GID);
    assert_eq!(
        (
            report.owners_changed,
            report.set_id_cleared,
            report.xattrs_dropped_total()
        ),
        (1, 1, 1)
    );
    assert_eq!(fs.leaves.len(), 1);
    assert_eq!(fs.nlinks(), vec![3]);
    let image = write_image(fs).expect("writes");
    let back = crate::read_image(&image, "test").expect("reads");
    assert_eq!(back.leaves.len(), 1, "still one inode");
}

/// A mixed tree: something for every rule, hardlinks, whiteouts, overlay xattrs.
fn messy_tree() -> FileSystem {
    let mut fs = new_fs(
        0o2755,
        (0, 0),
        x(&[("security.selinux", b"l"), ("user.r", b"1")]),
    );
    dir(
        &mut fs,
        "d",
        0o1777,
        (3, 3),
        &[("trusted.overlay.opaque", b"y")],
    );
    let id = leaf(
        &mut fs,
        "d/run",
        file(1),
        0o6755,
        (0, 0),
        &[("security.capability", b"c")],
    );
    link(&mut fs, "run-too", id);
    leaf(
        &mut fs,
        "d/gone",
        LeafContent::CharacterDevice(0),
        0o644,
        (0, 0),
        &[],
    );
    leaf(
        &mut fs,
        "dev",
        LeafContent::BlockDevice(0x801),
        0o600,
        (0, 0),
        &[],
    );
    leaf(
        &mut fs,
        "small",
        inline(b"hello"),
        0o644,
        (9, 9),
        &[("user.overlay.whiteout", b"")],
    );
    leaf(
        &mut fs,
        "fifo",
        LeafContent::Fifo,
        0o4600,
        (UID, GID),
        &[("trusted.x", b"1")],
    );
    fs
}

#[test]
fn mapping_twice_is_mapping_once() {
    let mut fs = messy_tree();
    let first = map_to_user(&mut fs, UID, GID);
    assert!(!first.is_unchanged());
    let once = dump(&fs);
    let second = map_to_user(&mut fs, UID, GID);
    assert!(second.is_unchanged(), "{second:?}");
    assert_eq!(dump(&fs), once);
}

#[test]
fn a_conforming_tree_is_left_alone_and_rebuilds_byte_identical() {
    let mut fs = messy_tree();
    map_to_user(&mut fs, UID, GID);
    let image = write_image(fs).expect("writes");
    // What the service does with what a user sent.
    let mut back = crate::read_image(&image, "from a user").expect("reads");
    let before = dump(&back);
    let report = map_to_user(&mut back, UID, GID);
    assert!(report.is_unchanged(), "{report:?}");
    assert_eq!(dump(&back), before);
    assert!(
        write_image(back).expect("writes") == image,
        "the rebuilt image differs"
    );
}

/// How a tree's own overlay xattrs and whiteouts look after `read_image`: the whiteout is a
/// 0:0 character device again, and every `trusted.overlay.*` name is the tree's own, unescaped
/// (the image has `trusted.overlay.overlay.*`, and the writer's own markers are gone).
#[test]
fn after_read_image_whiteouts_and_the_trees_overlay_xattrs_are_kept() {
    let mut fs = new_fs(0o755, (UID, GID), vec![]);
    dir(
        &mut fs,
        "upper",
        0o755,
        (UID, GID),
        &[
            ("trusted.overlay.opaque", b"y"),
            ("user.overlay.opaque", b"y"),
        ],
    );
    leaf(
        &mut fs,
        "upper/deleted",
        LeafContent::CharacterDevice(0),
        0o644,
        (UID, GID),
        &[],
    );
    leaf(
        &mut fs,
        "upper/moved",
        file(3),
        0o644,
        (UID, GID),
        &[
            ("trusted.overlay.redirect", b"/old"),
            ("trusted.overlay.overlay.opaque", b"nested"),
        ],
    );
    // A file showing an escaped whiteout as a mount presents it.
    leaf(
        &mut fs,
        "upper/shown",
        inline(b""),
        0o644,
        (UID, GID),
        &[("trusted.overlay.whiteout", b"")],
    );
    let image = write_image(fs).expect("writes");
    let mut back = crate::read_image(&image, "test").expect("reads");
    let st = stats(&back);
    let names = |p: &str| -> Vec<String> {
        st[Path::new(p)]
            .xattrs
            .keys()
            .map(|k| k.to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(""),
        Vec::<String>::new(),
        "the writer's root marker is gone"
    );
    assert_eq!(
        names("upper"),
        ["trusted.overlay.opaque", "user.overlay.opaque"]
    );
    assert_eq!(
        names("upper/deleted"),
        Vec::<String>::new(),
        "the writer's markers are gone"
    );
    assert_eq!(
        names("upper/moved"),
        ["trusted.overlay.overlay.opaque", "trusted.overlay.redirect"]
    );
    assert_eq!(names("upper/shown"), ["trusted.overlay.whiteout"]);
    let whiteout = match back
        .root
        .get_directory(OsStr::new("upper"))
        .and_then(|d| d.leaf_id(OsStr::new("deleted")))
    {
        Ok(id) => id,
        Err(e) => panic!("{e}"),
    };
    assert!(matches!(
        back.leaf(whiteout).content,
        LeafContent::CharacterDevice(0)
    ));
    assert!(map_to_user(&mut back, UID, GID).is_unchanged());
    assert!(write_image(back).expect("writes") == image);
}

/// A root-level whiteout named like one of the writer's 256 stubs (`00`…`ff`), with mode 0644,
/// no xattrs, and the root's owner and mtime, is indistinguishable from the stub in the image:
/// the image is the same with or without it, and reading it back has no such entry. Mapping
/// owners can make a whiteout stub-like; the image stays stable (and the entry, a whiteout in
/// the lowest layer, is invisible through a mount either way).
#[test]
fn a_stub_like_root_whiteout_is_the_writers_stub() {
    let mut fs = new_fs(0o755, (UID, GID), vec![]);
    let st = cfs::stat(0o644, 0, 0, (1_700_000_000, 0), vec![]);
    let id = fs.push_leaf(st, LeafContent::CharacterDevice(0));
    link(&mut fs, "0f", id);
    map_to_user(&mut fs, UID, GID);
    let image = write_image(fs).expect("writes");
    let back = crate::read_image(&image, "test").expect("reads");
    assert!(back.root.lookup(OsStr::new("0f")).is_none());
    assert!(write_image(new_fs(0o755, (UID, GID), vec![])).expect("writes") == image);
}

// ---- random trees ----

/// Paths of the device nodes `map_to_user` removes, in path order.
fn device_names(fs: &FileSystem) -> Vec<PathBuf> {
    let mut out = Vec::new();
    cfs::for_each_entry(fs, |path, inode| {
        if let Inode::Leaf(id, _) = inode
            && is_removed_device(&fs.leaf(*id).content)
        {
            out.push(path.to_owned());
        }
    });
    out
}

const XATTR_POOL: &[(&str, &[u8])] = &[
    ("user.a", b"1"),
    ("user.b", b""),
    ("user.overlay.opaque", b"y"),
    (
        "system.posix_acl_access",
        &[2, 0, 0, 0, 1, 0, 7, 0, 255, 255, 255, 255],
    ),
    (
        "system.posix_acl_default",
        &[2, 0, 0, 0, 1, 0, 5, 0, 255, 255, 255, 255],
    ),
    ("trusted.overlay.opaque", b"y"),
    ("trusted.overlay.redirect", b"/r"),
    ("trusted.overlay.overlay.x", b"n"),
    ("security.capability", b"\x01\x00\x00\x02"),
    ("security.selinux", b"system_u:object_r:x:s0"),
    ("security.ima", b"i"),
    ("trusted.t", b"t"),
    ("system.nfs4_acl", b"?"),
    ("user.overlay.whiteout", b""),
    ("user.overlay.whiteouts", b""),
    ("trusted.overlay.whiteout", b""),
    ("trusted.overlay.whiteouts", b""),
    ("user.overlay.opaque", b"x"),
    ("trusted.overlay.opaque", b"x"),
];

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    Inline(u8),
    External(u8),
    Symlink,
    Fifo,
    Socket,
    Char(u64),
    Block(u64),
    /// Another name of an earlier leaf (by index, modulo how many there are).
    Hardlink(usize),
}

#[derive(Debug, Clone)]
struct Node {
    parent: usize,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: Vec<usize>,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Dir),
        2 => (1u8..=64).prop_map(Kind::Inline),
        2 => any::<u8>().prop_map(Kind::External),
        1 => Just(Kind::Symlink),
        1 => Just(Kind::Fifo),
        1 => Just(Kind::Socket),
        2 => prop_oneof![Just(0u64), Just(0x103), any::<u64>()].prop_map(Kind::Char),
        1 => prop_oneof![Just(0u64), Just(0x700), any::<u64>()].prop_map(Kind::Block),
        2 => any::<usize>().prop_map(Kind::Hardlink),
    ]
}

fn owner() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(UID), Just(GID), Just(65534), any::<u32>()]
}

fn node() -> impl Strategy<Value = Node> {
    (
        any::<usize>(),
        kind(),
        0u32..=0o7777,
        owner(),
        owner(),
        proptest::collection::vec(0..XATTR_POOL.len(), 0..4),
    )
        .prop_map(|(parent, kind, mode, uid, gid, xattrs)| Node {
            parent,
            kind,
            mode,
            uid,
            gid,
            xattrs,
        })
}

/// Builds a tree from random nodes, avoiding what no image can hold unambiguously (see
/// `exact.rs`): root entries are never named like the writer's stubs (see
/// `a_stub_like_root_whiteout_is_the_writers_stub`), whiteouts and files carrying
/// `trusted.overlay.whiteout` are never hardlinked (the writer, resp. the reader, refuses
/// that), and regular files are never empty (an empty file with both whiteout xattrs next to
/// a whiteout reads back as a whiteout).
fn random_tree(root: &Node, nodes: &[Node]) -> FileSystem {
    let pick = |idx: &[usize]| -> Vec<(OsString, Vec<u8>)> {
        let mut v: Vec<(OsString, Vec<u8>)> = Vec::new();
        for &i in idx {
            let (k, val) = XATTR_POOL[i];
            if !v.iter().any(|(k2, _)| k2 == k) {
                v.push((k.into(), val.to_vec()));
            }
        }
        v
    };
    let mut fs = FileSystem::new(cfs::stat(
        root.mode,
        root.uid,
        root.gid,
        (1_700_000_000, 0),
        pick(&root.xattrs),
    ));
    let mut dirs = vec![String::new()];
    let mut leaves = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let parent = &dirs[n.parent % dirs.len()];
        let path = if parent.is_empty() {
            format!("n{i}")
        } else {
            format!("{parent}/n{i}")
        };
        let st = cfs::stat(
            n.mode,
            n.uid,
            n.gid,
            (1_600_000_000, i as u32),
            pick(&n.xattrs),
        );
        let content = match n.kind {
            Kind::Dir => {
                cfs::insert(
                    &mut fs,
                    Path::new(&path),
                    Inode::Directory(Box::new(cfs::Directory::new(st))),
                )
                .expect("test fixture");
                dirs.push(path);
                continue;
            }
            Kind::Hardlink(k) => {
                let linkable: Vec<_> = leaves
                    .iter()
                    .copied()
                    .filter(|&id| {
                        let leaf = fs.leaf(id);
                        !matches!(leaf.content, LeafContent::CharacterDevice(0))
                            && !leaf
                                .stat
                                .xattrs
                                .contains_key(OsStr::new("trusted.overlay.whiteout"))
                    })
                    .collect();
                if let Some(&id) = linkable.get(k % linkable.len().max(1)) {
                    link(&mut fs, &path, id);
                }
                continue;
            }
            Kind::Inline(len) => inline(&vec![len; len as usize]),
            Kind::External(seed) => file(seed),
            Kind::Symlink => LeafContent::Symlink(OsStr::new("n0").into()),
            Kind::Fifo => LeafContent::Fifo,
            Kind::Socket => LeafContent::Socket,
            Kind::Char(rdev) => LeafContent::CharacterDevice(rdev),
            Kind::Block(rdev) => LeafContent::BlockDevice(rdev),
        };
        let id = fs.push_leaf(st, content);
        link(&mut fs, &path, id);
        leaves.push(id);
    }
    fs
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_are_mapped_to_the_user(
        root in node(),
        nodes in proptest::collection::vec(node(), 0..40),
        uid in owner(),
        gid in owner(),
    ) {
        let mut fs = random_tree(&root, &nodes);
        let before = stats(&fs);
        let devices = device_names(&fs);
        // What the counts must be: every inode that stays, each once.
        let mut staying = vec![fs.root.stat.clone()];
        cfs::for_each_entry(&fs, |_, inode| {
            if let Inode::Directory(d) = inode {
                staying.push(d.stat.clone());
            }
        });
        staying.extend(
            fs.leaves.iter().filter(|l| !is_removed_device(&l.content)).map(|l| l.stat.clone()),
        );
        let report = map_to_user(&mut fs, uid, gid);
        fs.fsck().map_err(|e| TestCaseError::fail(format!("{e}")))?;

        // The rules hold.
        for leaf in &fs.leaves {
            prop_assert!(!is_removed_device(&leaf.content));
        }
        let after = stats(&fs);
        for (path, st) in &after {
            prop_assert_eq!((st.st_uid, st.st_gid), (uid, gid));
            prop_assert_eq!(st.st_mode & 0o6000, 0);
            prop_assert!(st.xattrs.keys().all(|k| xattr_kept(k)), "{:?}", st.xattrs);
            // Nothing else changed: mode bits, kept xattrs and their values, mtimes.
            let was = &before[path];
            prop_assert_eq!(st.st_mode, was.st_mode & !0o6000);
            let kept: Vec<_> = was.xattrs.iter().filter(|(k, _)| xattr_kept(k)).collect();
            prop_assert_eq!(st.xattrs.iter().collect::<Vec<_>>(), kept);
            prop_assert_eq!((st.st_mtim_sec, st.st_mtim_nsec), (was.st_mtim_sec, was.st_mtim_nsec));
        }
        prop_assert_eq!(
            report.owners_changed,
            staying.iter().filter(|st| (st.st_uid, st.st_gid) != (uid, gid)).count() as u64
        );
        prop_assert_eq!(
            report.set_id_cleared,
            staying.iter().filter(|st| st.st_mode & 0o6000 != 0).count() as u64
        );
        prop_assert_eq!(
            report.xattrs_dropped_total(),
            staying
                .iter()
                .map(|st| st.xattrs.keys().filter(|k| !xattr_kept(k)).count() as u64)
                .sum::<u64>()
        );
        // Exactly the devices' names went.
        let gone: Vec<_> = before.keys().filter(|p| !after.contains_key(*p)).cloned().collect();
        prop_assert_eq!(&gone, &devices);
        prop_assert_eq!(report.devices_removed, gone.len() as u64);
        let listed = gone.len().min(MAX_LISTED_DEVICES);
        prop_assert_eq!(&report.device_paths[..], &gone[..listed]);

        // It writes, and reads back as the same tree; mapping again changes nothing.
        let want = dump(&fs);
        let image = write_image(fs.clone()).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let mut back = crate::read_image(&image, "test").map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(dump(&back), want);
        prop_assert!(map_to_user(&mut back, uid, gid).is_unchanged());
        let rebuilt = write_image(back).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert!(rebuilt == image, "the rebuilt image differs");
        prop_assert!(map_to_user(&mut fs, uid, gid).is_unchanged());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every image velo's writer makes passes the check of its start at its own size, and at
    /// no other size: an export cannot claim more (or less) than the image is.
    #[test]
    fn the_start_of_every_image_velo_writes_describes_its_size(
        root in node(),
        nodes in proptest::collection::vec(node(), 0..40),
        other in any::<u64>(),
    ) {
        let mut fs = random_tree(&root, &nodes);
        // Device numbers beyond 32 bits do not fit EROFS; mapped trees have no devices.
        map_to_user(&mut fs, UID, GID);
        let image = write_image(fs).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let size = image.len() as u64;
        let start = &image[..cfs::IMAGE_START.min(image.len())];
        prop_assert_eq!(cfs::check_image_start(start, size), Ok(()));
        if other != size {
            prop_assert!(cfs::check_image_start(start, other).is_err());
        }
        prop_assert!(cfs::check_image_start(start, size + 4096).is_err());
    }

    /// Any bytes at any claimed size: an answer, never a panic.
    #[test]
    fn the_start_check_takes_any_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..5000),
        size in any::<u64>(),
    ) {
        let _ = cfs::check_image_start(&bytes, size);
    }
}
