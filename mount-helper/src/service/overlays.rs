//! The mounts the service keeps: one EROFS superblock per recently used image, and the
//! overlays over it that it lends to runs.
//!
//! Every `velo run` needs a copy-on-write overlay over its image. A fresh overlay superblock
//! (and a fresh EROFS one under it) looks up and instantiates every path the command touches
//! again — measured on the node workload as +9% import time against a warm local tree with
//! both fresh, +6–7% with the EROFS superblock shared, +1–2% with a mount kept for all runs.
//! So the service keeps the EROFS superblock of each image and lends each run a whole detached
//! overlay over it, with its own upper dir (`mounts/.lease-*/`, discarded). The run gets a
//! clone of it (`open_tree(OPEN_TREE_CLONE)`), attaches that in its own namespace, and gives
//! it back when its command has exited. If the upper dir is untouched and nothing can reach
//! the overlay any more (see [`crate::lease`]), the next run over the image gets it with its
//! dentries warm — the common case, as `node app.js` writes nothing into `node_modules` — and
//! otherwise it is discarded, once nothing reaches it. A pristine overlay shows exactly the
//! image, so it may go to any caller who may read the image.
//!
//! Read-only mounts get a clone of one read-only overlay per image; persisted uppers (one per
//! user, project, dir and key: a tenant of the store) get an overlay of their own, never two
//! at once. Each cached image is pinned in the store (`mounts/`, owned by this process), so
//! `velo gc` keeps it while the service holds it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use velo_objects::{Area, Digest, MountRecord, Store};

use crate::error::{MountError, Result};
use crate::lease::{self, UpperState};
use crate::protocol::CachedImage;

/// At most this many images are kept; the least recently used (with nothing lent) goes first.
pub const CAPACITY: usize = 32;
/// At most this many overlays per image wait, idle, for the next run.
const IDLE_LEASES: usize = 2;
/// An image unused this long (and with nothing lent) is let go, so `velo gc` may collect it.
pub const IMAGE_IDLE: Duration = Duration::from_secs(600);
/// Retired overlays are checked again after this, doubling up to 32 times as long.
const RETIRED_RECHECK: Duration = Duration::from_secs(2);
/// Lease dirs in `mounts/` start with this.
pub const LEASE_PREFIX: &str = ".lease-";

/// One cached image.
struct Entry {
    image: Digest,
    erofs: OwnedFd,
    /// The read-only overlay, made at the first read-only mount.
    read_only: Option<OwnedFd>,
    /// The pin that keeps the image from GC while it is here.
    pin: Option<String>,
    used: Instant,
    hits: u64,
    reused: u64,
    discarded: u64,
    /// Overlays of it that exist (lent, idle, being checked or retired).
    overlays: usize,
}

/// What an overlay's upper dir is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upper {
    /// A fresh dir, discarded: the overlay may be lent again while pristine.
    Discard,
    /// A tenant's dir, kept: never lent again, and never mounted twice at once.
    Tenant(String),
}

/// An overlay of an image, with its upper dir in the store.
pub struct Overlay {
    id: u64,
    image: Digest,
    mount: OwnedFd,
    upper: Upper,
    /// `mounts/.lease-*` (discarded uppers only), holding `upper` and `work`.
    dir: Option<PathBuf>,
    upper_path: PathBuf,
    /// The upper dir's state when the overlay was made.
    pristine: Option<UpperState>,
    /// Device numbers its files report (learnt at its first check).
    devs: Vec<u64>,
    /// Runs it served.
    uses: u64,
    /// Checks that found it still reachable after it was retired.
    retired_checks: u32,
}

impl Overlay {
    /// The detached overlay (clone it to hand it out).
    pub fn mount(&self) -> BorrowedFd<'_> {
        self.mount.as_fd()
    }

    /// The image it shows.
    pub fn image(&self) -> Digest {
        self.image
    }

    /// True if an earlier run had it (its dentries are warm).
    pub fn reused(&self) -> bool {
        self.uses > 1
    }

    /// Lets the overlay go and removes its lease dir.
    fn remove(self) {
        drop(self.mount);
        if let Some(dir) = &self.dir
            && let Err(e) = std::fs::remove_dir_all(dir)
        {
            tracing::warn!("velo-mountd: could not remove {}: {e}", dir.display());
        }
    }
}

/// What a check found.
pub enum Verdict {
    /// Handed back untouched and unreachable: lend it again.
    Reuse(Overlay),
    /// Still reachable: keep it until it is not. (True if a run had just handed it back.)
    Retire(Overlay, bool),
    /// Let go: written to, or nothing reaches it any more. (True if a run had just handed it
    /// back.)
    Removed(Digest, Upper, bool),
}

/// Checks an overlay that came back (`handed_back`: the run said it was done) or a retired
/// one. Reads every process's fds: run it outside the lock.
pub fn check(mut overlay: Overlay, handed_back: bool) -> Verdict {
    if overlay.devs.is_empty() {
        overlay.devs = lease::overlay_devs(overlay.mount.as_fd());
    }
    let untouched = handed_back
        && overlay.upper == Upper::Discard
        && overlay.pristine.is_some()
        && lease::upper_state(&overlay.upper_path) == overlay.pristine;
    match (
        untouched,
        lease::reachable(&overlay.devs, std::process::id()),
    ) {
        (true, false) => Verdict::Reuse(overlay),
        (_, true) => Verdict::Retire(overlay, handed_back),
        (false, false) => {
            let (image, upper) = (overlay.image, overlay.upper.clone());
            overlay.remove();
            Verdict::Removed(image, upper, handed_back)
        }
    }
}

/// The cache: every mount the service holds but those lent out right now (which their
/// connections hold).
pub struct Overlays {
    images: Vec<Entry>,
    idle: Vec<Overlay>,
    retired: Vec<(Overlay, Instant)>,
    /// Tenants with an overlay out (lent or retired): never mounted twice at once.
    busy_tenants: Vec<String>,
    next_id: u64,
    /// Overlays lent per image now (for status).
    lent: Vec<(Digest, usize)>,
    /// Overlays per image handed back (or due again) and being checked now.
    checking: Vec<(Digest, usize)>,
}

impl Default for Overlays {
    fn default() -> Self {
        Self::new()
    }
}

impl Overlays {
    /// An empty cache.
    pub fn new() -> Self {
        Self {
            images: Vec::new(),
            idle: Vec::new(),
            retired: Vec::new(),
            busy_tenants: Vec::new(),
            next_id: 0,
            lent: Vec::new(),
            checking: Vec::new(),
        }
    }

    /// The index of `image`'s entry, its EROFS superblock mounted now if it is not cached.
    /// The image is checked against its name before the kernel parses it.
    fn entry(&mut self, store: &Store, image: &Digest) -> Result<usize> {
        if let Some(i) = self.images.iter().position(|e| e.image == *image) {
            self.images[i].hits += 1;
            self.images[i].used = Instant::now();
            return Ok(i);
        }
        let image_fd = store.open_image(image)?;
        crate::mount::check_image(store, image_fd.as_fd(), image)?;
        let (erofs, _) = crate::mount::erofs_mount(image_fd.as_fd(), image)?;
        if self.images.len() >= CAPACITY {
            self.evict_one(store);
        }
        let pin = pin(store, image, erofs.as_fd());
        self.images.push(Entry {
            image: *image,
            erofs,
            read_only: None,
            pin,
            used: Instant::now(),
            hits: 0,
            reused: 0,
            discarded: 0,
            overlays: 0,
        });
        Ok(self.images.len() - 1)
    }

    /// Lets go of the least recently used image that has no overlay out.
    fn evict_one(&mut self, store: &Store) {
        let idle_only = |e: &Entry, idle: &[Overlay]| {
            e.overlays == idle.iter().filter(|o| o.image == e.image).count()
        };
        if let Some(i) = (0..self.images.len())
            .filter(|&i| idle_only(&self.images[i], &self.idle))
            .min_by_key(|&i| self.images[i].used)
        {
            let gone = self.images[i].image;
            self.remove_idle(|o| o.image == gone);
            let e = self.images.swap_remove(i);
            unpin(store, e.pin);
        }
    }

    /// A clone of the read-only overlay of `image`.
    pub fn read_only(&mut self, store: &Store, image: &Digest) -> Result<OwnedFd> {
        let i = self.entry(store, image)?;
        let e = &mut self.images[i];
        if e.read_only.is_none() {
            e.read_only = Some(crate::mount::read_only_overlay(
                store,
                image,
                e.erofs.as_fd(),
            )?);
        }
        let ro = e.read_only.as_ref().map(|fd| fd.as_fd());
        match ro {
            Some(fd) => crate::mount::clone_mount(fd),
            None => Err(MountError::Kernel {
                errno: None,
                what: "make a read-only overlay".into(),
                detail: "none was made".into(),
            }),
        }
    }

    /// An overlay of `image` with a discarded upper, to lend: the idle one that served most
    /// runs (the warmest), or a new one whose upper dir's root takes the image root's owner
    /// and mode.
    pub fn lend(&mut self, store: &Store, image: &Digest) -> Result<Overlay> {
        let i = self.entry(store, image)?;
        let warmest = (0..self.idle.len())
            .filter(|&k| self.idle[k].image == *image)
            .max_by_key(|&k| self.idle[k].uses);
        let overlay = match warmest {
            Some(k) => {
                let mut o = self.idle.swap_remove(k);
                o.uses += 1;
                self.images[i].reused += 1;
                o
            }
            None => {
                self.next_id += 1;
                let dir = store.area_path(Area::Mounts).join(format!(
                    "{LEASE_PREFIX}{}-{}",
                    std::process::id(),
                    self.next_id
                ));
                let made =
                    crate::mount::lease_overlay(store, image, self.images[i].erofs.as_fd(), &dir);
                let (mount, upper_path) = match made {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(e);
                    }
                };
                self.images[i].overlays += 1;
                Overlay {
                    id: self.next_id,
                    image: *image,
                    pristine: lease::upper_state(&upper_path),
                    mount,
                    upper: Upper::Discard,
                    dir: Some(dir),
                    upper_path,
                    devs: Vec::new(),
                    uses: 1,
                    retired_checks: 0,
                }
            }
        };
        self.count_lent(image, 1);
        Ok(overlay)
    }

    /// An overlay of `image` over the tenant's upper dir (created for the image if missing,
    /// its root given the image root's owner and mode). Refused while the tenant has another
    /// overlay out.
    pub fn lend_tenant(&mut self, store: &Store, image: &Digest, tenant: &str) -> Result<Overlay> {
        if self.busy_tenants.iter().any(|t| t == tenant) {
            return Err(MountError::BadUpper {
                path: store.area_path(Area::Tenants).join(tenant),
                reason: "is in use by another run (a persisted upper is never mounted twice \
                         at once); wait for it to finish"
                    .into(),
            });
        }
        let i = self.entry(store, image)?;
        let fresh = match store.tenant(tenant) {
            Ok(t) if t.image == *image => false,
            Ok(t) => {
                return Err(MountError::BadUpper {
                    path: store.area_path(Area::Tenants).join(tenant),
                    reason: format!(
                        "was made for image {}, not {image}; it is never mounted over another",
                        t.image
                    ),
                });
            }
            Err(_) => {
                store.create_tenant(tenant, *image, None)?;
                true
            }
        };
        let dirs = store.tenant_dirs(tenant)?;
        if fresh {
            crate::mount::copy_root_metadata(
                self.images[i].erofs.as_fd(),
                dirs.upper.as_fd(),
                &dirs.upper_path,
            )?;
        }
        let mount =
            crate::mount::tenant_overlay(store, image, self.images[i].erofs.as_fd(), &dirs)?;
        self.next_id += 1;
        self.images[i].overlays += 1;
        self.busy_tenants.push(tenant.to_owned());
        self.count_lent(image, 1);
        Ok(Overlay {
            id: self.next_id,
            image: *image,
            mount,
            upper: Upper::Tenant(tenant.to_owned()),
            dir: None,
            upper_path: dirs.upper_path,
            pristine: None,
            devs: Vec::new(),
            uses: 1,
            retired_checks: 0,
        })
    }

    /// An overlay lent out was given back; its check starts.
    pub fn returned(&mut self, image: &Digest) {
        self.count_lent(image, -1);
        count(&mut self.checking, image, 1);
    }

    fn count_lent(&mut self, image: &Digest, by: isize) {
        count(&mut self.lent, image, by);
    }

    /// Takes a check's verdict.
    pub fn take(&mut self, verdict: Verdict) {
        let image = match &verdict {
            Verdict::Reuse(o) | Verdict::Retire(o, _) => o.image,
            Verdict::Removed(d, ..) => *d,
        };
        count(&mut self.checking, &image, -1);
        let entry = self.images.iter().position(|e| e.image == image);
        match verdict {
            Verdict::Reuse(o) => {
                tracing::debug!("velo-mountd: overlay {} of {image} kept", o.id);
                self.idle.push(o);
                self.trim_idle(&image);
            }
            Verdict::Retire(mut o, handed_back) => {
                if let Some(i) = entry {
                    self.images[i].discarded += u64::from(handed_back);
                }
                // Something may hold it for long (a daemon): check less and less often.
                let due = Instant::now() + RETIRED_RECHECK * (1 << o.retired_checks.min(5));
                o.retired_checks += 1;
                self.retired.push((o, due));
            }
            Verdict::Removed(_, upper, handed_back) => {
                if let Some(i) = entry {
                    self.images[i].discarded += u64::from(handed_back);
                    self.images[i].overlays = self.images[i].overlays.saturating_sub(1);
                }
                if let Upper::Tenant(t) = upper {
                    self.busy_tenants.retain(|b| *b != t);
                }
            }
        }
    }

    /// The retired overlays due for another check (taken out; give the verdicts back).
    pub fn due_retired(&mut self) -> Vec<Overlay> {
        let now = Instant::now();
        let due: Vec<Overlay> = self
            .retired
            .extract_if(.., |(_, due)| *due <= now)
            .map(|(o, _)| o)
            .collect();
        for o in &due {
            count(&mut self.checking, &o.image, 1);
        }
        due
    }

    /// Keeps at most [`IDLE_LEASES`] idle overlays of `image`: the ones that served most runs.
    fn trim_idle(&mut self, image: &Digest) {
        let mut idle: Vec<(u64, u64)> = self
            .idle
            .iter()
            .filter(|o| o.image == *image)
            .map(|o| (o.uses, o.id))
            .collect();
        idle.sort_unstable_by(|a, b| b.cmp(a));
        let colder: Vec<u64> = idle.iter().skip(IDLE_LEASES).map(|&(_, id)| id).collect();
        self.remove_idle(|o| colder.contains(&o.id));
    }

    /// Removes the idle overlays `pick` selects.
    fn remove_idle(&mut self, pick: impl Fn(&Overlay) -> bool) {
        for o in self.idle.extract_if(.., |o| pick(o)) {
            if let Some(e) = self.images.iter_mut().find(|e| e.image == o.image) {
                e.overlays = e.overlays.saturating_sub(1);
            }
            o.remove();
        }
    }

    /// Lets go of images unused for [`IMAGE_IDLE`] with nothing out (their idle overlays too).
    pub fn expire(&mut self, store: &Store) {
        let old: Vec<Digest> = self
            .images
            .iter()
            .filter(|e| e.used.elapsed() >= IMAGE_IDLE)
            .map(|e| e.image)
            .collect();
        for image in old {
            self.remove_idle(|o| o.image == image);
            if let Some(i) = self
                .images
                .iter()
                .position(|e| e.image == image && e.overlays == 0)
            {
                let e = self.images.swap_remove(i);
                unpin(store, e.pin);
            }
        }
    }

    /// True while any overlay is lent out, being checked or waits for a check.
    pub fn busy(&self) -> bool {
        !self.lent.is_empty() || !self.checking.is_empty() || !self.retired.is_empty()
    }

    /// What `status` shows.
    pub fn status(&self) -> Vec<CachedImage> {
        self.images
            .iter()
            .map(|e| CachedImage {
                image: e.image,
                hits: e.hits,
                lent: self
                    .lent
                    .iter()
                    .find(|(d, _)| *d == e.image)
                    .map_or(0, |(_, n)| *n),
                idle: self.idle.iter().filter(|o| o.image == e.image).count(),
                checking: self
                    .checking
                    .iter()
                    .find(|(d, _)| *d == e.image)
                    .map_or(0, |(_, n)| *n),
                retired: self
                    .retired
                    .iter()
                    .filter(|(o, _)| o.image == e.image)
                    .count(),
                reused: e.reused,
                discarded: e.discarded,
            })
            .collect()
    }

    /// Lets everything go but what is lent (its runs hold it) and retired (left to the next
    /// service, or `velo gc`); removes the pins.
    pub fn shut_down(&mut self, store: &Store) {
        self.remove_idle(|_| true);
        for e in self.images.drain(..) {
            unpin(store, e.pin);
        }
    }
}

/// Adds `by` to the count of `image` in `counts` (entries at zero go).
fn count(counts: &mut Vec<(Digest, usize)>, image: &Digest, by: isize) {
    match counts.iter_mut().find(|(d, _)| d == image) {
        Some((_, n)) => *n = n.saturating_add_signed(by),
        None if by > 0 => counts.push((*image, by as usize)),
        None => {}
    }
    counts.retain(|(_, n)| *n > 0);
}

/// Pins `image` for as long as this process lives (a record in `mounts/` owned by it).
fn pin(store: &Store, image: &Digest, erofs: BorrowedFd<'_>) -> Option<String> {
    let slot = store.create_mount_slot().ok()?;
    let (mnt_id, mnt_id_unique, _) = crate::kernel::mount_ids(erofs).unwrap_or((0, None, false));
    let pid = std::process::id();
    let record = MountRecord {
        image: *image,
        target: PathBuf::from("velo-mountd"),
        mnt_id_unique,
        mnt_id,
        upper: None,
        managed_upper: false,
        verity: String::new(),
        boot_id: velo_objects::fsutil::boot_id(),
        created: velo_objects::fsutil::now_ns() as u64 / 1_000_000_000,
        tenant: None,
        mnt_ns: velo_objects::current_mnt_ns(),
        mnt_ns_id: velo_objects::mnt_ns_id("/proc/self/ns/mnt".as_ref()),
        owner: velo_objects::process_start_time(pid).map(|start| (pid, start)),
    };
    match store.write_mount_record(&slot, &record) {
        Ok(()) => Some(slot.token),
        Err(e) => {
            tracing::warn!("velo-mountd: could not pin {image}: {e}");
            let _ = store.remove_mount_slot(&slot.token);
            None
        }
    }
}

fn unpin(store: &Store, pin: Option<String>) {
    if let Some(token) = pin {
        let _ = store.remove_mount_slot(&token);
    }
}

/// Removes the lease dirs in the store's `mounts/` that no mount in any mount namespace uses
/// as its upper dir (left by a service that was killed, or stopped while they were lent or
/// still reachable). Does nothing while a service runs for the store. Returns how many it
/// removed.
pub fn remove_orphan_leases(store: &Store) -> usize {
    match store.try_lock_named(super::LOCK) {
        Ok(Some(_lock)) => remove_orphans_locked(store),
        _ => 0,
    }
}

/// [`remove_orphan_leases`], the service's lock held.
pub(crate) fn remove_orphans_locked(store: &Store) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let mounts = store.area_path(Area::Mounts);
    let Ok(entries) = std::fs::read_dir(&mounts) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        if !e
            .file_name()
            .as_bytes()
            .starts_with(LEASE_PREFIX.as_bytes())
        {
            continue;
        }
        let dir = e.path();
        if lease::upper_mounted(&dir.join("upper")) {
            continue;
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}
