//! Write sessions and crash recovery: durability with one `syncfs` instead of an fsync per
//! object, and no crash or power loss leaving anything that trusts an object whose bytes do
//! not match its name.
//!
//! A writer (a snapshot) first creates `tmp/writer-<id>.json` — fsynced, recording the boot
//! and the start time — and holds an flock on it. Objects are then written with no fsync.
//! Before any ref is written, [`WriteSession::commit`] runs `syncfs` on the store, so a ref
//! only ever names data that is on disk; then the marker goes.
//!
//! A marker that nobody holds belongs to a writer that died. If it died in this boot, the
//! page cache kept everything it wrote: an object is only linked under its name once fully
//! written, so nothing is wrong. If the machine went down since (another boot id), objects
//! linked after the marker's start time may have lost data; recovery re-hashes exactly those
//! and moves the bad ones to `quarantine/`, so neither a later dedup hit nor a stat-cache hit
//! trusts them.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, OpenError, open_beneath, open_regular_beneath};
use crate::ingest::Kind;
use crate::lock::StoreLock;
use crate::store::{Area, Store};
use crate::verify::Verdict;

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    pid: u32,
    boot_id: String,
    started_ns: i128,
}

/// An open write session; see the module docs.
#[derive(Debug)]
pub struct WriteSession<'s> {
    store: &'s Store,
    marker: String,
    _marker_fd: OwnedFd,
    _lock: StoreLock,
}

/// What [`Store::recover`] did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Recovery {
    /// Markers of writers that died in this boot (nothing to check).
    pub killed_writers: usize,
    /// Markers of writers interrupted by a shutdown or crash.
    pub crashed_writers: usize,
    /// Files re-hashed because they were written after an interrupted writer started.
    pub rechecked: usize,
    /// Files that did not match their names, moved to `quarantine/`.
    pub quarantined: Vec<PathBuf>,
}

/// The most velo reads of a writer marker: a real one holds about 100 bytes.
const MAX_MARKER_BYTES: u64 = 4 << 10;

/// Seconds of slack when comparing file ctimes with a marker's start time.
const CLOCK_SLACK_NS: i128 = 2_000_000_000;

impl Store {
    /// Starts a write session: recovers after dead writers, takes the store lock shared and
    /// leaves a durable marker.
    pub fn begin_write(&self) -> Result<WriteSession<'_>> {
        let lock = self.lock_shared()?;
        self.recover()?;
        let marker = format!("{}.json", fsutil::unique_name("writer-"));
        let path = self.area_path(Area::Tmp).join(&marker);
        let fd = open_beneath(
            self.tmp_fd(),
            &marker,
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR,
            Mode::from_raw_mode(0o600),
        )
        .ctx("create writer marker", &path)?;
        rustix::fs::flock(&fd, FlockOperation::LockExclusive).ctx("lock writer marker", &path)?;
        let body = Marker {
            pid: std::process::id(),
            boot_id: fsutil::boot_id(),
            started_ns: fsutil::now_ns(),
        };
        let data = serde_json::to_vec(&body).map_err(|e| StoreError::Unexpected {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fsutil::pwrite_all(fd.as_fd(), &data, 0).ctx("write writer marker", &path)?;
        rustix::fs::fsync(&fd).ctx("fsync writer marker", &path)?;
        rustix::fs::fsync(self.tmp_fd()).ctx("fsync", self.area_path(Area::Tmp))?;
        Ok(WriteSession {
            store: self,
            marker,
            _marker_fd: fd,
            _lock: lock,
        })
    }

    /// Handles markers of dead writers (see the module docs). Live writers are left alone.
    pub fn recover(&self) -> Result<Recovery> {
        let mut report = Recovery::default();
        let tmp_path = self.area_path(Area::Tmp);
        let names = fsutil::list_dir(self.tmp_fd()).ctx("list", &tmp_path)?;
        let this_boot = fsutil::boot_id();
        let mut recheck_since: Option<i128> = None;
        let mut dead = Vec::new();
        for name in names {
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with("writer-") && name.ends_with(".json")) {
                continue;
            }
            let path = tmp_path.join(name);
            let (fd, st) =
                match open_regular_beneath(self.tmp_fd(), name, OFlags::RDWR, Mode::empty()) {
                    Ok(opened) => opened,
                    Err(OpenError::Sys(Errno::NOENT)) => continue,
                    // Not a marker velo wrote (it writes regular files): a leftover that
                    // `fsck --repair` and `velo gc` remove, never read here.
                    Err(OpenError::NotRegular(_)) => continue,
                    Err(e) => return Err(StoreError::from_open("open writer marker", path, e)),
                };
            match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => continue, // a live writer
                Err(e) => return Err(StoreError::io("lock writer marker", path, e)),
            }
            let marker: Option<Marker> = fsutil::read_capped(fd.as_fd(), &st, MAX_MARKER_BYTES)
                .ok()
                .and_then(|data| serde_json::from_slice(&data).ok());
            match marker {
                Some(m) if !this_boot.is_empty() && m.boot_id == this_boot => {
                    report.killed_writers += 1
                }
                other => {
                    report.crashed_writers += 1;
                    // An unreadable marker was torn by the crash: use its own timestamp.
                    let since = match other {
                        Some(m) => m.started_ns,
                        None => rustix::fs::statat(
                            self.tmp_fd(),
                            name,
                            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                        )
                        .map(|st| st.st_mtime as i128 * 1_000_000_000)
                        .unwrap_or(0),
                    };
                    recheck_since = Some(recheck_since.map_or(since, |s: i128| s.min(since)));
                }
            }
            dead.push(name.to_owned());
        }
        if let Some(since) = recheck_since {
            self.recheck_written_since(since - CLOCK_SLACK_NS, &mut report)?;
            // Quarantine moves must be durable before the markers that caused them go.
            rustix::fs::syncfs(self.root_fd()).ctx("syncfs", self.root())?;
        }
        for name in dead {
            let _ =
                rustix::fs::unlinkat(self.tmp_fd(), name.as_str(), rustix::fs::AtFlags::empty());
        }
        Ok(report)
    }

    fn recheck_written_since(&self, since_ns: i128, report: &mut Recovery) -> Result<()> {
        let recent = |dir: std::os::fd::BorrowedFd<'_>, name: &str| -> bool {
            rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| {
                    (st.st_ctime as i128) * 1_000_000_000 + st.st_ctime_nsec as i128 >= since_ns
                })
                .unwrap_or(false)
        };
        let mut suspects: Vec<(Kind, Digest)> = Vec::new();
        let objects = self.area_path(Area::Objects);
        for fan in fsutil::list_dir(self.objects_fd()).ctx("list", &objects)? {
            let Some(fan) = fan.to_str() else { continue };
            let Ok(dir) = fsutil::open_dir_beneath(self.objects_fd(), fan) else {
                continue;
            };
            for name in fsutil::list_dir(dir.as_fd()).ctx("list", objects.join(fan))? {
                let Some(name) = name.to_str() else { continue };
                if let Ok(d) = Digest::parse(&format!("{fan}{name}"))
                    && recent(dir.as_fd(), name)
                {
                    suspects.push((Kind::Object, d));
                }
            }
        }
        for d in self.list_images()? {
            if recent(self.images_fd(), &d.to_hex()) {
                suspects.push((Kind::Image, d));
            }
        }
        for (kind, digest) in suspects {
            report.rechecked += 1;
            match self.verify(kind, &digest)? {
                Verdict::Good { .. } | Verdict::Missing => {}
                Verdict::Mismatch { .. }
                | Verdict::NotAFile { .. }
                | Verdict::Unreadable { .. } => {
                    report.quarantined.push(self.quarantine(kind, &digest)?);
                }
            }
        }
        Ok(())
    }

    /// Moves a damaged object or image to `quarantine/` (never deleting it) and returns where.
    pub fn quarantine(&self, kind: Kind, digest: &Digest) -> Result<PathBuf> {
        let q = self.open_area(Area::Quarantine)?;
        let qname = format!(
            "{}-{}-{}",
            match kind {
                Kind::Object => "object",
                Kind::Image => "image",
            },
            digest,
            fsutil::now_ns()
        );
        let from = self.path_of(kind, digest);
        let (dir, name) = self.final_dir(kind, digest)?;
        rustix::fs::renameat(dir, name.as_str(), &q, qname.as_str()).ctx("quarantine", &from)?;
        tracing::warn!(from = %from.display(), "moved a damaged file to quarantine");
        Ok(self.area_path(Area::Quarantine).join(qname))
    }
}

impl WriteSession<'_> {
    /// Makes everything written so far durable with one `syncfs`, then points each ref at its
    /// image (each ref write is itself atomic and durable).
    pub fn commit(&self, refs: &[(&str, Digest)]) -> Result<()> {
        for (name, _) in refs {
            crate::refs::validate_ref_name(name)?;
        }
        rustix::fs::syncfs(self.store.root_fd()).ctx("syncfs", self.store.root())?;
        for (name, digest) in refs {
            self.store.write_ref(name, digest)?;
        }
        Ok(())
    }
}

impl Drop for WriteSession<'_> {
    fn drop(&mut self) {
        // This process is alive, so nothing it wrote can be lost: the marker can go whether
        // or not the session committed.
        let _ = rustix::fs::unlinkat(
            self.store.tmp_fd(),
            self.marker.as_str(),
            rustix::fs::AtFlags::empty(),
        );
    }
}
