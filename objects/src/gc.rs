//! Garbage collection: images no root needs go, then objects no remaining image references.
//!
//! Roots are refs, the ref history GC's keep policy retains, tenants' images, pins (mount
//! records) whose mount is alive or cannot be seen from here, and every velo overlay mounted
//! in any mount namespace, pinned or not. Pins whose owner is gone are
//! cleared. GC holds the store lock exclusively, so nothing a running snapshot has written or
//! deduplicated against (it holds the lock shared until its ref is written), and nothing a mount
//! in progress is about to pin, can be deleted under it.
//!
//! A root that cannot be read (a ref, a ref's history or a tenant's meta.json that is damaged,
//! or not a regular file at all) could name any image: GC then removes no image and no object,
//! and says which one to look at. It also removes what killed writers left in `tmp/`.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsFd;
use std::time::Duration;

use serde::Serialize;

use crate::digest::Digest;
use crate::error::{IoContext, Result};
use crate::fsutil;
use crate::mounts::{Liveness, MountRecord};
use crate::store::{Area, Store};

/// What GC may remove.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Only report.
    pub dry_run: bool,
    /// Expire `deps/*` refs (root's, and every user's `users/<uid>/deps/*`) not used
    /// (mounted, run) or written for this long.
    pub unused_for: Option<Duration>,
    /// Keep at least this many previous images of every ref.
    pub keep_last: usize,
    /// Also keep previous images replaced less than this long ago.
    pub older_than: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            unused_for: None,
            keep_last: 1,
            older_than: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What the caller knows that the store does not: what an image references (EROFS parsing) and
/// whether a mount is alive (mountinfo).
pub struct GcHooks<'a> {
    /// The objects an image references, or why they can't be read.
    pub objects_of: &'a (dyn Fn(&Digest) -> std::result::Result<Vec<Digest>, String> + Sync),
    /// Whether a pinned mount still exists.
    pub liveness: &'a dyn Fn(&MountRecord) -> Liveness,
    /// The images of every velo mount in any mount namespace, pinned or not; `None` if they
    /// cannot be listed (then GC removes no image at all).
    pub mounted_images: &'a dyn Fn() -> Option<HashSet<Digest>>,
}

/// What GC did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Only reported, nothing removed.
    pub dry_run: bool,
    /// `deps/*` refs expired as unused.
    pub refs_expired: Vec<String>,
    /// Ref history entries dropped by the keep policy.
    pub history_dropped: usize,
    /// Pins of mounts that are gone, cleared.
    pub stale_pins_cleared: usize,
    /// Images kept because something needs them.
    pub images_kept: usize,
    /// Images removed.
    pub images_removed: usize,
    /// Their bytes.
    pub image_bytes_freed: u64,
    /// Objects kept.
    pub objects_kept: u64,
    /// Objects removed.
    pub objects_removed: u64,
    /// Their bytes.
    pub object_bytes_freed: u64,
    /// Why objects were not swept, if they were not (an image needed could not be read).
    pub objects_skipped: Option<String>,
    /// Leftovers of killed writers removed from `tmp/` (staging files and directories no live
    /// process holds).
    pub tmp_leftovers_removed: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl Store {
    /// Collects garbage; see the module docs.
    pub fn gc(&self, opts: &GcOptions, hooks: &GcHooks<'_>) -> Result<GcReport> {
        let started = std::time::Instant::now();
        let _lock = self.lock_exclusive()?;
        let now = (fsutil::now_ns() / 1_000_000_000) as u64;
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..Default::default()
        };

        // 1. Expire unused deps/* refs (they are caches keyed by lockfiles: rebuildable).
        let mut refs: BTreeMap<String, Digest> = BTreeMap::new();
        // Roots that could not be read: then no image can be known to be unneeded.
        let mut unreadable: Vec<String> = Vec::new();
        for (name, target) in self.list_refs()? {
            let digest = match target {
                Ok(digest) => digest,
                Err(crate::StoreError::RefNotFound { .. }) => continue, // removed meanwhile
                Err(e) => {
                    unreadable.push(format!("ref {name}: {e}"));
                    continue;
                }
            };
            if let Some(max) = opts.unused_for
                && is_deps_ref(&name)
                && now.saturating_sub(self.ref_last_used(&name)?) > max.as_secs()
            {
                if !opts.dry_run {
                    self.remove_ref(&name)?;
                    self.set_ref_history(&name, &[])?;
                }
                report.refs_expired.push(name);
                continue;
            }
            refs.insert(name, digest);
        }

        // 2. Roots.
        let mut roots: HashSet<Digest> = refs.values().copied().collect();
        for name in self.refs_with_history()? {
            if report.refs_expired.contains(&name) {
                continue;
            }
            let history = match self.ref_history(&name) {
                Ok(history) => history,
                Err(e) => {
                    unreadable.push(format!("the history of ref {name}: {e}"));
                    continue;
                }
            };
            let n = history.len();
            let keep: Vec<(u64, Digest)> = history
                .into_iter()
                .enumerate()
                .filter(|(i, (t, _))| {
                    n - i <= opts.keep_last || now.saturating_sub(*t) < opts.older_than.as_secs()
                })
                .map(|(_, e)| e)
                .collect();
            report.history_dropped += n - keep.len();
            if keep.len() != n && !opts.dry_run {
                self.set_ref_history(&name, &keep)?;
            }
            roots.extend(keep.iter().map(|(_, d)| *d));
        }
        for (name, tenant) in self.list_tenants()? {
            match tenant {
                Ok(t) => {
                    roots.insert(t.image);
                }
                // A tenant whose creation was interrupted has no meta.json, and no image yet.
                Err(_) if self.tenant_meta_missing(&name) => {}
                Err(e) => unreadable.push(format!("tenant {name}: {e}")),
            }
        }
        for (token, record) in self.list_mount_records()? {
            match record {
                Ok(r) if (hooks.liveness)(&r) != Liveness::Gone => {
                    roots.insert(r.image);
                }
                Ok(_) => {
                    report.stale_pins_cleared += 1;
                    if !opts.dry_run {
                        self.remove_mount_slot(&token)?;
                    }
                }
                // A slot without a readable record is a mount interrupted half-way (its
                // process is gone: it held the lock we now hold exclusively).
                Err(_) => {
                    report.stale_pins_cleared += 1;
                    if !opts.dry_run {
                        self.remove_mount_slot(&token)?;
                    }
                }
            }
        }

        // Every mount of this store's images, wherever it is and whoever made it.
        let mounted = (hooks.mounted_images)();
        match &mounted {
            Some(images) => roots.extend(images.iter().copied()),
            None => {
                report.objects_skipped =
                    Some("the mounts of other namespaces could not be listed (/proc)".into());
            }
        }
        if !unreadable.is_empty() {
            report.objects_skipped = Some(format!(
                "{} cannot be read, so any image may be needed; no image or object was \
                 removed. Run `velo fsck` (`--repair` removes what velo never made)",
                unreadable.join("; ")
            ));
        }
        let keep_all = mounted.is_none() || !unreadable.is_empty();

        // 3. Images.
        let mut kept_images = Vec::new();
        for image in self.list_images()? {
            if roots.contains(&image) || keep_all {
                kept_images.push(image);
                continue;
            }
            report.images_removed += 1;
            report.image_bytes_freed += self.image_size(&image).unwrap_or(0);
            if !opts.dry_run {
                let _ = self.remove_cache(&format!("{}{image}", crate::IMAGE_CHECK_PREFIX));
                self.remove_profile(&image)?;
                match rustix::fs::unlinkat(
                    self.images_fd(),
                    image.to_hex().as_str(),
                    rustix::fs::AtFlags::empty(),
                ) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => {
                        return Err(crate::StoreError::io(
                            "remove image",
                            self.image_path(&image),
                            e,
                        ));
                    }
                }
            }
        }
        report.images_kept = kept_images.len();
        // Profiles whose image is gone (removed before this velo removed profiles with them),
        // and profiles a killed writer left half-written.
        if !opts.dry_run {
            self.remove_stale_profile_tmps(std::time::Duration::from_secs(3600))?;
            let kept: HashSet<&Digest> = kept_images.iter().collect();
            for image in self.list_profiles()? {
                if !kept.contains(&image) {
                    self.remove_profile(&image)?;
                }
            }
        }

        // 4. Mark the objects kept images reference; an unreadable one stops the sweep.
        let mut marked: HashSet<Digest> = HashSet::new();
        // (Not when the sweep is off already: then nothing needs to be known.)
        if report.objects_skipped.is_none() {
            for image in &kept_images {
                match (hooks.objects_of)(image) {
                    Ok(objects) => marked.extend(objects),
                    Err(e) => {
                        report.objects_skipped = Some(format!(
                            "image {image} is needed but unreadable ({e}); run `velo fsck`"
                        ));
                        break;
                    }
                }
            }
        }

        // 5. Sweep objects, one fan-out directory at a time.
        if report.objects_skipped.is_none() {
            let objects = self.area_path(Area::Objects);
            for idx in 0..=255u8 {
                let fan = format!("{idx:02x}");
                let Ok(dir) = fsutil::open_dir_beneath(self.objects_fd(), &fan) else {
                    continue;
                };
                for name in fsutil::list_dir(dir.as_fd()).ctx("list", objects.join(&fan))? {
                    let Some(digest) = name
                        .to_str()
                        .and_then(|n| Digest::parse(&format!("{fan}{n}")).ok())
                    else {
                        continue; // not ours to judge: fsck reports strays
                    };
                    if marked.contains(&digest) {
                        report.objects_kept += 1;
                        continue;
                    }
                    let size = rustix::fs::statat(
                        &dir,
                        name.as_os_str(),
                        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map(|st| st.st_size as u64)
                    .unwrap_or(0);
                    report.objects_removed += 1;
                    report.object_bytes_freed += size;
                    if !opts.dry_run {
                        match rustix::fs::unlinkat(
                            &dir,
                            name.as_os_str(),
                            rustix::fs::AtFlags::empty(),
                        ) {
                            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                            Err(e) => {
                                return Err(crate::StoreError::io(
                                    "remove object",
                                    objects.join(&fan).join(&name),
                                    e,
                                ));
                            }
                        }
                    }
                }
            }
        }
        // 6. What killed writers left in tmp/ (live ones hold the store lock, which GC holds
        // exclusively, or flock what they write). Markers of dead writers are left to crash
        // recovery, which checks what they wrote first.
        for f in self.tmp_leftovers()? {
            if f.kind != "tmp-leftover" {
                continue;
            }
            let Some(name) = f.path.file_name() else {
                continue;
            };
            if !opts.dry_run {
                fsutil::remove_tree_at(self.tmp_fd(), name).ctx("remove", &f.path)?;
            }
            report.tmp_leftovers_removed += 1;
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// A ref `velo run` keys by lockfile: root's `deps/…` or a user's `users/<uid>/deps/…`.
fn is_deps_ref(name: &str) -> bool {
    name.starts_with("deps/")
        || name.strip_prefix("users/").is_some_and(|rest| {
            rest.split_once('/').is_some_and(|(uid, tail)| {
                uid.bytes().all(|b| b.is_ascii_digit()) && tail.starts_with("deps/")
            })
        })
}

#[cfg(test)]
mod deps_ref_tests {
    #[test]
    fn deps_refs_of_root_and_users() {
        assert!(super::is_deps_ref("deps/npm/abc"));
        assert!(super::is_deps_ref("users/1000/deps/npm/abc"));
        assert!(!super::is_deps_ref("users/1000/myapp"));
        assert!(!super::is_deps_ref("users/x/deps/npm"));
        assert!(!super::is_deps_ref("myapp/deps"));
    }
}
