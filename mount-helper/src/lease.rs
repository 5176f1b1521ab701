//! When a lent overlay may be lent again: its upper dir untouched, and nothing left that could
//! still reach it.
//!
//! velo-mountd lends each `velo run` a whole overlay (see [`crate::service`]); the
//! next run over the same image gets it back with its dentries and inodes warm, instead of a
//! fresh overlay superblock that looks every path up again. That is only sound when the next
//! run sees exactly the pristine image, and nothing from the last run can change what it
//! sees. So a lease is reused only when all of these hold (anything else discards it):
//!
//! - the run said it was done, after its command exited and its mount was detached (a run
//!   that was killed never says so);
//! - the upper dir is as it was made: no entries, root mode, owner and ctime unchanged (a
//!   create-and-delete or a `chmod` of the root changes the ctime);
//! - no mount of the overlay is left in any mount namespace (the command may have made new
//!   namespaces, e.g. a sandbox, holding copies of it) — mountinfo of every namespace, matched
//!   by the overlay's device number;
//! - no process (other than the cache itself, which holds the original) has a file, directory,
//!   working directory or root on it — every process's fds, matched by the overlay's device
//!   numbers (overlayfs reports non-directories with per-layer device numbers of its own).
//!
//! Not seen: a file descriptor in flight in a unix socket at the moment of the check.

use std::collections::HashSet;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};

use crate::mountinfo::MountInfo;

/// How many entries of the overlay are stat'ed to learn its device numbers.
const DEV_PROBE_ENTRIES: usize = 256;

/// The device numbers files of the overlay `root` report: the overlay's own (directories) and
/// the per-layer ones of the non-directories found near its root.
pub(crate) fn overlay_devs(root: BorrowedFd<'_>) -> Vec<u64> {
    let mut devs = Vec::new();
    let Ok(st) = rustix::fs::fstat(root) else {
        return devs;
    };
    devs.push(st.st_dev);
    let mut queue = vec![root.try_clone_to_owned()];
    let mut seen = 0;
    while let Some(Ok(dir_fd)) = queue.pop() {
        let Ok(dir) = rustix::fs::Dir::read_from(&dir_fd) else {
            continue;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            seen += 1;
            if seen > DEV_PROBE_ENTRIES {
                return devs;
            }
            let Ok(st) = rustix::fs::statat(&dir_fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            if !devs.contains(&st.st_dev) {
                devs.push(st.st_dev);
            }
            if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
                queue.push(
                    rustix::fs::openat(
                        &dir_fd,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(std::io::Error::from),
                );
            }
        }
    }
    devs
}

/// The upper dir's state, to tell later whether a run touched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpperState {
    ctime: (i64, u64),
    mode: u32,
    owner: (u32, u32),
    empty: bool,
}

/// The upper dir's state now; `None` if it cannot be read.
pub(crate) fn upper_state(upper: &Path) -> Option<UpperState> {
    let fd = rustix::fs::open(
        upper,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    let mut dir = rustix::fs::Dir::read_from(&fd).ok()?;
    let mut empty = true;
    while let Some(entry) = dir.read() {
        let entry = entry.ok()?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            empty = false;
            break;
        }
    }
    Some(UpperState {
        ctime: (st.st_ctime, st.st_ctime_nsec as u64),
        mode: st.st_mode,
        owner: (st.st_uid, st.st_gid),
        empty,
    })
}

/// Whether any process but `except` can still reach a filesystem whose files report one of
/// `devs`: a mount of it in any mount namespace, or an open file, working directory or root
/// on it. Errors count as reachable, except for processes that exited meanwhile.
pub(crate) fn reachable(devs: &[u64], except: u32) -> bool {
    let Some(&sb_dev) = devs.first() else {
        return true;
    };
    let Some(procs) = processes() else {
        return true;
    };
    let mount = format!(
        "{}:{}",
        rustix::fs::major(sb_dev),
        rustix::fs::minor(sb_dev)
    );
    let mut namespaces = Namespaces::default();
    for (pid, dir) in procs {
        if pid == except {
            continue;
        }
        if namespaces.mountinfo_has(&dir, |m| m.device == mount) {
            return true;
        }
        for link in ["cwd", "root"] {
            if dev_of(&dir.join(link)).is_some_and(|d| devs.contains(&d)) {
                return true;
            }
        }
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue; // exited meanwhile (or a kernel thread)
        };
        if fds
            .flatten()
            .any(|fd| dev_of(&fd.path()).is_some_and(|d| devs.contains(&d)))
        {
            return true;
        }
    }
    false
}

/// Whether any mount in any mount namespace has `upper` as its upper dir.
pub(crate) fn upper_mounted(upper: &Path) -> bool {
    let Some(procs) = processes() else {
        return true;
    };
    let mut namespaces = Namespaces::default();
    procs.into_iter().any(|(_, dir)| {
        namespaces.mountinfo_has(&dir, |m| {
            m.super_option("upperdir").as_deref() == Some(upper.as_os_str())
        })
    })
}

/// The images of every velo overlay mounted in any mount namespace (source `velo:<digest>`):
/// roots for GC whoever made the mount, whether or not a pin records it (a run killed between
/// attaching and pinning, a service stopped while a run's command still uses its overlay).
/// `None` if `/proc` cannot be read.
pub fn mounted_images() -> Option<HashSet<velo_objects::Digest>> {
    let mut images = HashSet::new();
    let mut seen = Namespaces::default();
    for (_, dir) in processes()? {
        // Collect as a side effect of the per-namespace scan (each table read once).
        seen.mountinfo_has(&dir, |m| {
            images.extend(m.velo_image());
            false
        });
    }
    Some(images)
}

/// Every process's pid and `/proc/PID` dir; `None` if `/proc` cannot be read.
fn processes() -> Option<Vec<(u32, PathBuf)>> {
    let procs = std::fs::read_dir("/proc").ok()?;
    Some(
        procs
            .flatten()
            .filter_map(|p| {
                let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
                Some((pid, p.path()))
            })
            .collect(),
    )
}

/// The mount namespaces met so far, so that each one's mount table is read once.
#[derive(Default)]
struct Namespaces(HashSet<u64>);

impl Namespaces {
    /// Whether the process at `dir` is the first met in its mount namespace and a mount in
    /// its mountinfo satisfies `pred`.
    fn mountinfo_has(&mut self, dir: &Path, mut pred: impl FnMut(&MountInfo) -> bool) -> bool {
        std::fs::metadata(dir.join("ns/mnt"))
            .is_ok_and(|ns| self.0.insert(std::os::unix::fs::MetadataExt::ino(&ns)))
            && crate::mountinfo::read_at(dir).is_ok_and(|mounts| mounts.iter().any(&mut pred))
    }
}

/// The device number of what a `/proc` magic link points at, from cached attributes only (a
/// hung network or FUSE filesystem must not hang the check).
fn dev_of(link: &Path) -> Option<u64> {
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        link,
        AtFlags::STATX_DONT_SYNC,
        StatxFlags::TYPE,
    )
    .ok()?;
    Some(rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn velo_sources_are_read_from_mountinfo_lines() {
        let d = "aa".repeat(32);
        let image = |line: &str| {
            let m = crate::mountinfo::parse(line.as_bytes());
            m.first().and_then(MountInfo::velo_image)
        };
        let line = format!(
            "90 30 0:50 / /p/node_modules rw,nosuid,nodev - overlay velo:{d} ro,lowerdir+=x"
        );
        assert_eq!(image(&line).map(|x| x.to_hex()), Some(d.clone()));
        let erofs = format!("91 30 0:51 / /x ro - erofs velo:{d} ro");
        assert_eq!(image(&erofs), None, "only overlays");
        assert_eq!(image("92 30 0:52 / /y rw - overlay overlay rw"), None);
        assert_eq!(image("garbage"), None);
    }

    #[test]
    fn upper_state_sees_entries_and_root_changes() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper)?;
        let before = upper_state(&upper).ok_or(std::io::ErrorKind::NotFound)?;
        assert!(before.empty);
        assert_eq!(
            upper_state(&upper).as_ref(),
            Some(&before),
            "stable when untouched"
        );
        std::fs::write(upper.join("x"), b"")?;
        let written = upper_state(&upper).ok_or(std::io::ErrorKind::NotFound)?;
        assert!(!written.empty);
        std::fs::remove_file(upper.join("x"))?;
        let after = upper_state(&upper).ok_or(std::io::ErrorKind::NotFound)?;
        assert!(after.empty);
        assert_ne!(
            after, before,
            "a create and delete changes the root's ctime"
        );
        Ok(())
    }

    /// An overlay whose upper dir's path has a space, a comma, a tab and a non-UTF-8 byte (all
    /// escaped in mountinfo, the comma by overlay itself) is found by that exact path, and not
    /// by a prefix of it — orphan cleanup must never take a live upper dir for a free one.
    #[test]
    fn an_upper_dir_with_odd_bytes_in_its_path_is_seen_mounted() -> std::io::Result<()> {
        use rustix::mount::{
            FsMountFlags, FsOpenFlags, MountAttrFlags, fsconfig_create, fsconfig_set_string,
            fsmount, fsopen,
        };
        use std::os::unix::ffi::OsStrExt;
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED an_upper_dir_with_odd_bytes…: mounting an overlay needs root");
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        let odd = dir
            .path()
            .join(std::ffi::OsStr::from_bytes(b"my store, v1\t\xff"));
        for sub in ["lower", "upper", "work"] {
            std::fs::create_dir_all(odd.join(sub))?;
        }
        let upper = odd.join("upper");
        assert!(!upper_mounted(&upper));
        let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
        for (key, sub) in [
            ("lowerdir+", "lower"),
            ("upperdir", "upper"),
            ("workdir", "work"),
        ] {
            fsconfig_set_string(&fs, key, odd.join(sub).as_os_str())?;
        }
        fsconfig_create(&fs)?;
        let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?;
        let target = dir.path().join("mnt");
        std::fs::create_dir(&target)?;
        rustix::mount::move_mount(
            &mnt,
            "",
            rustix::fs::CWD,
            &target,
            rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )?;
        let seen = upper_mounted(&upper);
        let prefix = upper_mounted(&dir.path().join("my store"));
        let by_point = crate::mountinfo::read()?.iter().any(|m| {
            m.mount_point == target
                && m.super_option("upperdir").as_deref() == Some(upper.as_os_str())
        });
        rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH)?;
        assert!(seen, "the live upper dir is seen mounted");
        assert!(!prefix, "a prefix of its path is not");
        assert!(
            by_point,
            "its mount point and upper dir come back byte for byte"
        );
        Ok(())
    }

    #[test]
    fn a_held_directory_is_reachable() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let held = std::fs::File::open(dir.path())?;
        let dev = rustix::fs::fstat(&held)?.st_dev;
        // This process holds it: reachable unless this process is the exception.
        assert!(reachable(&[dev], 0));
        // A device number nothing uses.
        let unused = rustix::fs::makedev(0, 0xfffff);
        assert!(!reachable(&[unused], 0));
        drop(held);
        Ok(())
    }
}
