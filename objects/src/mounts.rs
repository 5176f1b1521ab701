//! `mounts/<token>/`: one record per mount velo made (and, for a velo-managed `--cow`, its
//! upper and work dirs). Records let `umount` clean up what the mount owned, and are the
//! persistent pins that keep an image alive while it is mounted.

#![allow(unsafe_code)] // system calls rustix does not wrap; each block says why it is sound

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, open_dir_beneath, open_regular_beneath};
use crate::store::{Area, Store};

/// What velo remembers about a mount it made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    /// The mounted image.
    pub image: Digest,
    /// Where it was mounted.
    #[serde(with = "crate::serde_path")]
    pub target: PathBuf,
    /// The kernel's unique (64-bit, never reused) mount ID, if the kernel reports one.
    pub mnt_id_unique: Option<u64>,
    /// The mount ID as `/proc/self/mountinfo` shows it.
    pub mnt_id: u64,
    /// The overlay upper dir, for writable mounts.
    #[serde(with = "crate::serde_path::option")]
    pub upper: Option<PathBuf>,
    /// True if velo created the upper dir (in this slot) and removes it at umount.
    pub managed_upper: bool,
    /// "require" if the kernel checks fs-verity on every object, "off" if not.
    pub verity: String,
    /// Boot in which the mount was made (a record from another boot is stale).
    pub boot_id: String,
    /// Seconds since the epoch at mount time.
    pub created: u64,
    /// The tenant whose upper dir this mount uses, if any.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Inode number of the mount namespace the mount was made in (`/proc/self/ns/mnt`).
    #[serde(default)]
    pub mnt_ns: Option<u64>,
    /// That namespace's 64-bit ID, never reused (Linux 6.8+; `None` before): inode numbers of
    /// namespaces are reused as soon as one is freed.
    #[serde(default)]
    pub mnt_ns_id: Option<u64>,
    /// For mounts inside a private namespace (`velo run`): the process that owns it, as
    /// (pid, start time in clock ticks since boot); the pin lives as long as that process, or
    /// as long as any process is left in the namespace (`mnt_ns`), whichever is longer.
    #[serde(default)]
    pub owner: Option<(u32, u64)>,
}

/// Whether the mount a record describes still exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Liveness {
    /// It does.
    Alive,
    /// It is gone: the record is stale.
    Gone,
    /// It cannot be seen from here (another mount namespace): assumed alive.
    Unknown,
}

/// This process's mount namespace inode.
pub fn current_mnt_ns() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/mnt")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// The never-reused ID of the mount namespace an nsfs file (`/proc/PID/ns/mnt`) refers to
/// (`NS_GET_MNTNS_ID`, Linux 6.8+).
pub fn mnt_ns_id(ns_file: &std::path::Path) -> Option<u64> {
    /// `_IOR(0xb7, 0x5, __u64)` from `<linux/nsfs.h>`.
    const NS_GET_MNTNS_ID: libc::c_ulong = 0x8008_b705;
    let file = std::fs::File::open(ns_file).ok()?;
    let mut id: u64 = 0;
    // SAFETY: the ioctl writes one u64 into `id`, which outlives the call; the fd is open.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            NS_GET_MNTNS_ID as _,
            &mut id as *mut u64,
        )
    };
    (rc == 0).then_some(id)
}

/// Whether any process is in the mount namespace with inode `ns` (and, where known, the
/// never-reused `id`: a freed namespace's inode number goes to the next new one at once) —
/// the namespace, and the mounts in it, exist exactly as long as one does.
pub fn mnt_ns_populated(ns: u64, id: Option<u64>) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true; // cannot tell: assume it is
    };
    procs.flatten().any(|p| {
        let ns_file = p.path().join("ns/mnt");
        p.file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            && std::fs::metadata(&ns_file)
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ns)
            && id.is_none_or(|id| mnt_ns_id(&ns_file) == Some(id))
    })
}

/// A process's start time (clock ticks since boot), to tell it from a later one with its pid.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past its last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// A fresh `mounts/<token>/` directory, for one mount.
#[derive(Debug)]
pub struct MountSlot {
    /// Its name under `mounts/`.
    pub token: String,
    /// Its dirfd.
    pub dir: OwnedFd,
    /// Its absolute path.
    pub path: PathBuf,
}

const RECORD: &str = "record.json";

/// The most velo reads of a mount record: a real one holds well under 2 KiB (two paths).
pub const MAX_RECORD_BYTES: u64 = 64 << 10;

impl Store {
    /// Creates an empty slot for a new mount.
    pub fn create_mount_slot(&self) -> Result<MountSlot> {
        let mounts = self.open_area(Area::Mounts)?;
        let token = fsutil::unique_name("m-");
        let path = self.area_path(Area::Mounts).join(&token);
        rustix::fs::mkdirat(&mounts, token.as_str(), Mode::from_raw_mode(0o700))
            .ctx("create mount slot", &path)?;
        let dir = open_dir_beneath(mounts.as_fd(), &token).ctx("open mount slot", &path)?;
        Ok(MountSlot { token, dir, path })
    }

    /// Writes (replaces) a slot's record.
    pub fn write_mount_record(&self, slot: &MountSlot, record: &MountRecord) -> Result<()> {
        let path = slot.path.join(RECORD);
        let data = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Unexpected {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let tmp = ".record.tmp";
        {
            let (fd, _) = open_regular_beneath(
                slot.dir.as_fd(),
                tmp,
                OFlags::CREATE | OFlags::TRUNC | OFlags::WRONLY,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| StoreError::from_open("create", &path, e))?;
            fsutil::pwrite_all(fd.as_fd(), &data, 0).ctx("write", &path)?;
        }
        rustix::fs::renameat(&slot.dir, tmp, &slot.dir, RECORD).ctx("write", &path)?;
        Ok(())
    }

    /// All slots with their records (or why a record can't be read: a slot whose mount failed
    /// half-way has none).
    pub fn list_mount_records(&self) -> Result<Vec<(String, Result<MountRecord>)>> {
        let mounts = self.open_area(Area::Mounts)?;
        let mut out = Vec::new();
        for name in fsutil::list_dir(mounts.as_fd()).ctx("list", self.area_path(Area::Mounts))? {
            let Some(token) = name.to_str() else { continue };
            if token.starts_with('.') {
                continue;
            }
            let path = self.area_path(Area::Mounts).join(token).join(RECORD);
            let record = (|| {
                let data = fsutil::read_store_file(
                    mounts.as_fd(),
                    format!("{token}/{RECORD}"),
                    &path,
                    MAX_RECORD_BYTES,
                )?
                .ok_or_else(|| StoreError::io("open", &path, Errno::NOENT))?;
                serde_json::from_slice::<MountRecord>(&data).map_err(|e| StoreError::Unexpected {
                    path: path.clone(),
                    reason: format!("unreadable mount record: {e}"),
                })
            })();
            out.push((token.to_owned(), record));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes a slot and everything in it (a managed upper dir included).
    pub fn remove_mount_slot(&self, token: &str) -> Result<()> {
        if token.is_empty() || token.contains('/') || token.starts_with('.') {
            return Err(StoreError::Unexpected {
                path: token.into(),
                reason: "invalid mount slot name".into(),
            });
        }
        let mounts = self.open_area(Area::Mounts)?;
        match fsutil::remove_tree_at(mounts.as_fd(), token.as_ref()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(StoreError::io(
                "remove mount slot",
                self.area_path(Area::Mounts).join(token),
                e,
            )),
        }
    }
}
