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
use crate::fsutil::{self, open_beneath};
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
            "tmp-leftover" | "dead-writer" | "stale-mount-record"
        )
    }
}

/// Progress of an object check: fan-out directories done (of 256), objects and bytes checked.
pub trait FsckProgress: Sync {
    /// Called after each fan-out directory.
    fn objects(&self, _fanouts_done: usize, _objects: u64, _bytes: u64) {}
}

impl FsckProgress for () {}

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
                Verdict::NotAFile => findings.push(Finding {
                    kind: "object-not-a-file",
                    path,
                    expected: "a regular file".into(),
                    found: "another file type".into(),
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
        let fd = open_beneath(
            dir,
            &name,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW,
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
            if s.starts_with("writer-") {
                let Ok(fd) = open_beneath(
                    self.tmp_fd(),
                    s,
                    rustix::fs::OFlags::RDWR,
                    rustix::fs::Mode::empty(),
                ) else {
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
            } else if crate::staging::in_use(self, s) {
                continue; // a live import's staging directory
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
                    Err(_) => "no readable record".to_owned(),
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
