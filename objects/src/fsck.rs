//! Checking the store's own files: objects against their names, refs against images, and what
//! killed writers left behind. Image contents are checked by `velo-image`, which can parse them.
//!
//! Objects are checked one fan-out directory at a time by a few worker threads, so memory stays
//! bounded however many millions of objects there are.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::FlockOperation;
use rustix::io::Errno;
use serde::Serialize;

use crate::digest::Digest;
use crate::error::{IoContext, Result};
use crate::fsutil::{self, OpenError, open_regular_beneath};
use crate::ingest::Kind;
use crate::meta::VerityMode;
use crate::store::{Area, Store};
use crate::verify::Verdict;

/// One thing fsck found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What kind of problem, e.g. `object-mismatch` (see [`Finding::is_damage`]).
    pub kind: &'static str,
    /// The path concerned.
    pub path: PathBuf,
    /// What should be there.
    pub expected: String,
    /// What is there.
    pub found: String,
}

impl Finding {
    /// Damage (non-zero exit) as opposed to reclaimable leftovers.
    pub fn is_damage(&self) -> bool {
        !matches!(
            self.kind,
            "tmp-leftover"
                | "dead-writer"
                | "stale-mount-record"
                | "profile-corrupt"
                | "profile-orphan"
        )
    }
}

/// Progress of an object check: fan-out directories done (of 256), objects and bytes checked.
pub trait FsckProgress: Sync {
    /// Called after each fan-out directory.
    fn objects(&self, _fanouts_done: usize, _objects: u64, _bytes: u64) {}
}

impl FsckProgress for () {}

/// The kind of [`Finding`] for a store entry that should be a regular file and is something
/// else (`fsck --repair` removes it).
pub const NOT_REGULAR: &str = "not-a-regular-file";

/// Adds a [`NOT_REGULAR`] finding for `path` if `st` is neither a regular file nor a directory.
fn push_special(out: &mut Vec<Finding>, path: PathBuf, st: &rustix::fs::Stat) {
    let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
    if !matches!(
        ft,
        rustix::fs::FileType::RegularFile | rustix::fs::FileType::Directory
    ) {
        out.push(Finding {
            kind: NOT_REGULAR,
            path,
            expected: "a regular file".into(),
            found: format!("{} (velo never makes one here)", fsutil::file_type_name(ft)),
        });
    }
}

fn digest_of_entry(fan: &str, name: &str) -> Option<Digest> {
    Digest::parse(&format!("{fan}{name}")).ok()
}

impl Store {
    /// Re-hashes every object (and, in a verity store, checks the kernel has verity on it).
    /// Returns the findings and the number of objects and bytes checked.
    pub fn check_objects(
        &self,
        jobs: usize,
        progress: &dyn FsckProgress,
    ) -> Result<(Vec<Finding>, u64, u64)> {
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let totals = Mutex::new((Vec::new(), 0u64, 0u64));
        let first_err = Mutex::new(None);
        let objects_path = self.area_path(Area::Objects);
        std::thread::scope(|s| {
            for _ in 0..jobs.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= 256 {
                            break;
                        }
                        match self.check_fanout(i as u8) {
                            Ok((findings, n, bytes)) => {
                                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                                t.0.extend(findings);
                                t.1 += n;
                                t.2 += bytes;
                                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                                progress.objects(d, t.1, t.2);
                            }
                            Err(e) => {
                                first_err
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get_or_insert(e);
                                break;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let (mut findings, n, bytes) = totals.into_inner().unwrap_or_else(|p| p.into_inner());
        // Anything in objects/ that is not a fan-out directory.
        for name in fsutil::list_dir(self.objects_fd()).ctx("list", &objects_path)? {
            let ok = name.to_str().is_some_and(|n| {
                n.len() == 2
                    && n.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            });
            if !ok {
                findings.push(Finding {
                    kind: "object-stray",
                    path: objects_path.join(&name),
                    expected: "a two-digit fan-out directory".into(),
                    found: "an unknown entry".into(),
                });
            }
        }
        findings.sort_by(|a, b| a.path.cmp(&b.path));
        Ok((findings, n, bytes))
    }

    fn check_fanout(&self, idx: u8) -> Result<(Vec<Finding>, u64, u64)> {
        let fan = format!("{idx:02x}");
        let dir_path = self.area_path(Area::Objects).join(&fan);
        let dir = match fsutil::open_dir_beneath(self.objects_fd(), &fan) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok((Vec::new(), 0, 0)),
            Err(e) => return Err(crate::StoreError::io("open", dir_path, e)),
        };
        let mut findings = Vec::new();
        let (mut n, mut bytes) = (0u64, 0u64);
        for name in fsutil::list_dir(dir.as_fd()).ctx("list", &dir_path)? {
            let path = dir_path.join(&name);
            let Some(digest) = name.to_str().and_then(|s| digest_of_entry(&fan, s)) else {
                findings.push(Finding {
                    kind: "object-stray",
                    path,
                    expected: "a file named by its digest".into(),
                    found: "an unknown name".into(),
                });
                continue;
            };
            n += 1;
            match self.verify(Kind::Object, &digest)? {
                Verdict::Good { size } => {
                    bytes += size;
                    if self.verity() == VerityMode::Enabled
                        && let Some(f) = self.check_kernel_verity(Kind::Object, &digest)
                    {
                        findings.push(f);
                    }
                }
                Verdict::Missing => {} // removed meanwhile (GC)
                Verdict::Mismatch { found, size } => findings.push({
                    bytes += size;
                    Finding {
                        kind: "object-mismatch",
                        path,
                        expected: digest.to_hex(),
                        found: format!("{found} ({size} bytes)"),
                    }
                }),
                Verdict::Unreadable { error } => findings.push(Finding {
                    kind: "object-unreadable",
                    path,
                    expected: digest.to_hex(),
                    found: error,
                }),
                Verdict::NotAFile { kind } => findings.push(Finding {
                    kind: "object-not-a-file",
                    path,
                    expected: "a regular file".into(),
                    found: kind.into(),
                }),
            }
        }
        Ok((findings, n, bytes))
    }

    /// In a verity store: the kernel must report verity on the file, with its name as digest.
    pub fn check_kernel_verity(&self, kind: Kind, digest: &Digest) -> Option<Finding> {
        let path = self.path_of(kind, digest);
        let label = match kind {
            Kind::Object => "object-no-verity",
            Kind::Image => "image-no-verity",
        };
        let (dir, name) = self.final_dir(kind, digest).ok()?;
        let (fd, _) = open_regular_beneath(
            dir,
            &name,
            rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .ok()?;
        match crate::kverity::measure(fd.as_fd()) {
            Ok(d) if d == *digest => None,
            Ok(d) => Some(Finding {
                kind: label,
                path,
                expected: digest.to_hex(),
                found: format!("kernel fs-verity digest {d}"),
            }),
            Err(e) => Some(Finding {
                kind: label,
                path,
                expected: format!("fs-verity enabled with digest {digest}"),
                found: format!("no fs-verity ({e})"),
            }),
        }
    }

    /// Every ref must hold a digest of an image in the store.
    pub fn check_refs(&self) -> Result<Vec<Finding>> {
        let mut out = Vec::new();
        for (name, target) in self.list_refs()? {
            let path = self.area_path(Area::Refs).join(&name);
            match target {
                Ok(d) => {
                    if matches!(
                        self.open_image(&d),
                        Err(crate::StoreError::ImageNotFound { .. })
                    ) {
                        out.push(Finding {
                            kind: "ref-dangling",
                            path,
                            expected: format!("image {d}"),
                            found: "no such image".into(),
                        });
                    }
                }
                Err(crate::StoreError::NotRegular { kind, .. }) => out.push(Finding {
                    kind: NOT_REGULAR,
                    path,
                    expected: "a regular file holding an image digest".into(),
                    found: format!("{kind} (velo never makes one here)"),
                }),
                Err(e) => out.push(Finding {
                    kind: "ref-corrupt",
                    path,
                    expected: "an image digest".into(),
                    found: e.to_string(),
                }),
            }
        }
        Ok(out)
    }

    /// What dead writers left in `tmp/` (reclaimable, not damage). Live writers' files are not
    /// listed: their markers are locked, and staging files of a live writer are unnamed.
    pub fn tmp_leftovers(&self) -> Result<Vec<Finding>> {
        let tmp = self.area_path(Area::Tmp);
        let mut out = Vec::new();
        for name in fsutil::list_dir(self.tmp_fd()).ctx("list", &tmp)? {
            let Some(s) = name.to_str() else { continue };
            let path = tmp.join(s);
            let opened = s.starts_with("writer-").then(|| {
                open_regular_beneath(
                    self.tmp_fd(),
                    s,
                    rustix::fs::OFlags::RDWR,
                    rustix::fs::Mode::empty(),
                )
            });
            if let Some(Err(OpenError::NotRegular(ft))) = opened {
                out.push(Finding {
                    kind: "tmp-leftover",
                    path,
                    expected: "nothing".into(),
                    found: format!(
                        "{} named like a writer marker (velo never makes one)",
                        fsutil::file_type_name(ft)
                    ),
                });
            } else if let Some(opened) = opened {
                let Ok((fd, _)) = opened else {
                    continue;
                };
                if rustix::fs::flock(&fd, FlockOperation::NonBlockingLockShared).is_err() {
                    continue; // a live writer holds it
                }
                out.push(Finding {
                    kind: "dead-writer",
                    path,
                    expected: "a marker held by a running writer".into(),
                    found: "nobody holds it".into(),
                });
            } else if crate::staging::in_use(self, s) || crate::refs::write_in_use(self, s) {
                continue; // a live import's staging directory, a file being written
            } else {
                out.push(Finding {
                    kind: "tmp-leftover",
                    path,
                    expected: "nothing".into(),
                    found: "a staging file of an interrupted writer".into(),
                });
            }
        }
        Ok(out)
    }

    /// Mount slots that no live mount can own: no record (a mount interrupted half-way) or a
    /// record from an earlier boot (mounts do not survive a reboot).
    pub fn stale_mount_slots(&self) -> Result<Vec<Finding>> {
        let boot = fsutil::boot_id();
        Ok(self
            .list_mount_records()?
            .into_iter()
            .filter_map(|(token, record)| {
                let why = match record {
                    Err(e) => format!("no readable record ({e})"),
                    Ok(r) if r.boot_id != boot => {
                        format!("a mount of {} from an earlier boot", r.target.display())
                    }
                    Ok(_) => return None,
                };
                Some(Finding {
                    kind: "stale-mount-record",
                    path: self.area_path(Area::Mounts).join(token),
                    expected: "a record of a live mount".into(),
                    found: why,
                })
            })
            .collect())
    }

    /// Access profiles that cannot be read as one (`profile-corrupt`) or whose image is gone
    /// (`profile-orphan`). Not damage: a profile is only a read-ahead hint, and readers ignore
    /// a bad one; `fsck --repair` removes them ([`Store::remove_profile`]).
    pub fn check_profiles(&self) -> Result<Vec<Finding>> {
        let mut out = Vec::new();
        for image in self.list_profiles()? {
            let path = self.area_path(Area::Profiles).join(image.to_hex());
            match self.read_profile(&image) {
                Err(crate::StoreError::CorruptProfile { reason, .. }) => out.push(Finding {
                    kind: "profile-corrupt",
                    path,
                    expected: "an access profile".into(),
                    found: reason,
                }),
                Err(e) => return Err(e),
                Ok(_) if !self.image_exists(&image) => out.push(Finding {
                    kind: "profile-orphan",
                    path,
                    expected: format!("the profile of image {image}"),
                    found: "its image is gone".into(),
                }),
                Ok(_) => {}
            }
        }
        Ok(out)
    }

    fn image_exists(&self, image: &Digest) -> bool {
        rustix::fs::statat(
            self.images_fd(),
            image.to_hex().as_str(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok()
    }

    /// Entries where velo keeps regular files of its own — ref history and last use, the cache,
    /// named locks, profiles, tenants' `meta.json` — that are something else (a FIFO, a socket, a
    /// symlink…): velo never makes them, and never opens them for reading (it could block
    /// forever). Refs, objects, images, mount records and `tmp/` are checked by their own
    /// checks.
    pub fn special_files(&self) -> Result<Vec<Finding>> {
        let mut out = Vec::new();
        for (area, nested) in [
            (Area::History, true),
            (Area::Usage, true),
            (Area::Cache, false),
            (Area::Locks, false),
            (Area::Profiles, false),
        ] {
            let dir = self.open_area(area)?;
            self.scan_special(dir.as_fd(), &self.area_path(area), nested, &mut out)?;
        }
        let tenants = self.open_area(Area::Tenants)?;
        let tenants_path = self.area_path(Area::Tenants);
        for name in fsutil::list_dir(tenants.as_fd()).ctx("list", &tenants_path)? {
            let Ok(dir) = fsutil::open_dir_beneath(tenants.as_fd(), &name) else {
                continue;
            };
            let path = tenants_path.join(&name).join("meta.json");
            match rustix::fs::statat(&dir, "meta.json", rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => push_special(&mut out, path, &st),
                Err(Errno::NOENT) => {}
                Err(e) => return Err(crate::StoreError::io("stat", path, e)),
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn scan_special(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        dir_path: &std::path::Path,
        nested: bool,
        out: &mut Vec<Finding>,
    ) -> Result<()> {
        for name in fsutil::list_dir(dir).ctx("list", dir_path)? {
            let path = dir_path.join(&name);
            let st = match rustix::fs::statat(dir, &name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(crate::StoreError::io("stat", path, e)),
            };
            if nested
                && rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory
            {
                let sub = fsutil::open_dir_beneath(dir, &name).ctx("open", &path)?;
                self.scan_special(sub.as_fd(), &path, nested, out)?;
            } else {
                push_special(out, path, &st);
            }
        }
        Ok(())
    }

    /// Removes the store entry at `path` (absolute, beneath the store) if it is neither a
    /// regular file nor a directory: what [`Store::special_files`] and [`Store::check_refs`]
    /// report as [`NOT_REGULAR`]. Returns whether it removed it.
    pub fn remove_not_regular(&self, path: &std::path::Path) -> Result<bool> {
        let outside = || crate::StoreError::Unexpected {
            path: path.to_owned(),
            reason: format!("is not beneath the store {}", self.root().display()),
        };
        let rel = path.strip_prefix(self.root()).map_err(|_| outside())?;
        let (Some(parent), Some(leaf)) = (rel.parent(), rel.file_name()) else {
            return Err(outside());
        };
        let dir = if parent.as_os_str().is_empty() {
            rustix::io::dup(self.root_fd()).ctx("open", self.root())?
        } else {
            fsutil::open_dir_beneath(self.root_fd(), parent).ctx("open", path)?
        };
        let st = match rustix::fs::statat(&dir, leaf, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(crate::StoreError::io("stat", path, e)),
        };
        if matches!(
            rustix::fs::FileType::from_raw_mode(st.st_mode),
            rustix::fs::FileType::RegularFile | rustix::fs::FileType::Directory
        ) {
            return Ok(false);
        }
        rustix::fs::unlinkat(&dir, leaf, rustix::fs::AtFlags::empty()).ctx("remove", path)?;
        Ok(true)
    }

    /// Removes reclaimable leftovers, but only while no writer is at work (the store lock is
    /// taken exclusively, without waiting). Returns how many were removed, or `None` if writers
    /// were active and nothing was touched.
    pub fn reclaim_tmp(&self) -> Result<Option<usize>> {
        let Some(_lock) = self.try_lock_exclusive()? else {
            return Ok(None);
        };
        // Recovery first: a crashed writer's objects must be re-checked before its marker goes.
        self.recover()?;
        let mut n = 0;
        for f in self.tmp_leftovers()? {
            if let Some(name) = f.path.file_name() {
                let _ = fsutil::remove_tree_at(self.tmp_fd(), name);
                n += 1;
            }
        }
        for f in self.stale_mount_slots()? {
            if let Some(token) = f.path.file_name().and_then(|t| t.to_str()) {
                self.remove_mount_slot(token)?;
                n += 1;
            }
        }
        Ok(Some(n))
    }
}
