//! Mapping a tree an ordinary user sent to what that user may own: the root service runs
//! [`map_to_user`] on the tree [`crate::read_image`] parsed from the user's image, before
//! writing it again with [`crate::write_image`]. Pure: no I/O, no store.
//!
//! What the tree holds after `read_image` (see `exact.rs`): an overlay whiteout is a character
//! device 0:0 (the writer escapes it, the reader turns it back), and a tree's own
//! `trusted.overlay.X` xattr is named `trusted.overlay.X` again (the image stores it escaped as
//! `trusted.overlay.overlay.X`; the writer's own unescaped `trusted.overlay.*` markers are gone).
//! So every `trusted.overlay.*` name in such a tree is the tree's own, and any of them is
//! written escaped: through a mount it shows as that xattr, never as overlayfs metadata of the
//! mount itself.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cfs::{Directory, FileSystem, Inode, Leaf, LeafContent};

/// At most this many removed devices are listed by path in a [`MapReport`].
pub const MAX_LISTED_DEVICES: usize = 10;

/// The setuid and setgid bits.
const SET_ID: u32 = 0o6000;

/// What [`map_to_user`] changed. All zero / empty means the tree was left exactly as it was.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MapReport {
    /// Inodes (each hardlinked inode once) whose owner or group was changed.
    pub owners_changed: u64,
    /// Inodes whose setuid and/or setgid bit was cleared.
    pub set_id_cleared: u64,
    /// Names of character and block devices removed (each name of a hardlinked device).
    pub devices_removed: u64,
    /// The first [`MAX_LISTED_DEVICES`] of them, in path order, relative to the root.
    #[serde(serialize_with = "lossy_paths")]
    pub device_paths: Vec<PathBuf>,
    /// Xattrs dropped: name (lossy UTF-8) → on how many inodes.
    pub xattrs_dropped: BTreeMap<String, u64>,
}

impl MapReport {
    /// True if nothing was changed.
    pub fn is_unchanged(&self) -> bool {
        *self == Self::default()
    }

    /// Xattrs dropped, all names together.
    pub fn xattrs_dropped_total(&self) -> u64 {
        self.xattrs_dropped.values().sum()
    }
}

fn lossy_paths<S: serde::Serializer>(paths: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(paths.iter().map(|p| p.to_string_lossy()))
}

/// Whether an xattr of this name is kept by [`map_to_user`]: `user.*`, the POSIX ACLs
/// (`system.posix_acl_access`, `system.posix_acl_default`), and the tree's own
/// `trusted.overlay.*` xattrs (see the module docs).
pub fn xattr_kept(name: &OsStr) -> bool {
    let n = name.as_bytes();
    n.starts_with(b"user.")
        || n == b"system.posix_acl_access"
        || n == b"system.posix_acl_default"
        || n.starts_with(b"trusted.overlay.")
}

/// Whether a leaf is a device node [`map_to_user`] removes: every block device, every
/// character device but 0:0 (an overlay whiteout, which is harmless and stays).
pub fn is_removed_device(content: &LeafContent) -> bool {
    match content {
        LeafContent::BlockDevice(_) => true,
        LeafContent::CharacterDevice(rdev) => *rdev != 0,
        _ => false,
    }
}

/// Makes `fs` a tree the user `uid`:`gid` may own, in place:
///
/// * every inode (directories, files, whiteouts, …) is owned by `uid`:`gid`;
/// * setuid and setgid bits are cleared (the sticky and permission bits stay);
/// * character and block devices are removed, every name of them, except 0:0 character devices
///   (overlay whiteouts);
/// * only the xattrs [`xattr_kept`] accepts stay (`security.*`, other `trusted.*`, other
///   `system.*` are dropped).
///
/// A leaf with several names (hardlinks) stays one leaf and is changed (and counted) once.
/// A tree that already satisfies all of this is left exactly as it was, so writing it again
/// gives the same image; mapping twice is the same as mapping once.
pub fn map_to_user(fs: &mut FileSystem, uid: u32, gid: u32) -> MapReport {
    let mut report = MapReport::default();
    let FileSystem { root, leaves } = fs;
    remove_devices(root, leaves, Path::new(""), &mut report);
    // Drops the removed devices' leaves (a no-op when nothing was removed: ids stay).
    fs.compact();
    fs.for_each_stat_mut(|stat| {
        if (stat.st_uid, stat.st_gid) != (uid, gid) {
            stat.st_uid = uid;
            stat.st_gid = gid;
            report.owners_changed += 1;
        }
        if stat.st_mode & SET_ID != 0 {
            stat.st_mode &= !SET_ID;
            report.set_id_cleared += 1;
        }
        stat.xattrs.retain(|name, _| {
            let keep = xattr_kept(name);
            if !keep {
                *report
                    .xattrs_dropped
                    .entry(name.to_string_lossy().into_owned())
                    .or_default() += 1;
            }
            keep
        });
    });
    report
}

/// Removes device entries from `dir` and below, in path order (depth-first, sorted by name).
fn remove_devices(dir: &mut Directory, leaves: &[Leaf], prefix: &Path, report: &mut MapReport) {
    enum Found {
        Device,
        Subdir,
    }
    let found: Vec<(Box<OsStr>, Found)> = dir
        .sorted_entries()
        .filter_map(|(name, inode)| match inode {
            Inode::Directory(_) => Some((Box::from(name), Found::Subdir)),
            Inode::Leaf(id, _) => leaves
                .get(id.0)
                .filter(|leaf| is_removed_device(&leaf.content))
                .map(|_| (Box::from(name), Found::Device)),
        })
        .collect();
    for (name, what) in found {
        let path = prefix.join(&*name);
        match what {
            Found::Device => {
                dir.remove(&name);
                report.devices_removed += 1;
                if report.device_paths.len() < MAX_LISTED_DEVICES {
                    report.device_paths.push(path);
                }
            }
            Found::Subdir => {
                if let Some(Inode::Directory(mut sub)) = dir.pop(&name) {
                    remove_devices(&mut sub, leaves, &path, report);
                    dir.insert(&name, Inode::Directory(sub));
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "sanitize_tests.rs"]
mod tests;
