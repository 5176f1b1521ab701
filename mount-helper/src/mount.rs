//! Mounting an image of the store: the EROFS image as a detached file-backed mount, stacked
//! under overlayfs with the store's objects as a data-only lower layer, attached at the target.

#![allow(unsafe_code)] // system calls rustix does not wrap; each block says why it is sound

use std::ffi::OsStr;
use std::num::NonZeroU64;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, Timestamps};
use rustix::io::Errno;
use rustix::mount::MountAttrFlags;
use serde::Serialize;
use velo_objects::{Area, Digest, MountRecord, MountSlot, Store, VerityMode};

use crate::error::{MountError, Result};
use crate::kernel::{FsContext, proc_fd_path};
use crate::mountinfo;
use crate::sys::{Kernel, MountSys};
use crate::target::open_target;

/// Every mount velo makes has the source `velo:<image digest>`.
pub const SOURCE_PREFIX: &str = "velo:";

/// What happens to writes under the mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writes {
    /// Read-only.
    ReadOnly,
    /// Copy-on-write into a fresh upper dir that velo keeps in the store and removes at umount.
    CowManaged,
    /// Copy-on-write into this directory, which persists after umount.
    CowUpper(PathBuf),
    /// Copy-on-write into a tenant's upper dir in the store (the tenant's own image only, and
    /// never twice at once).
    Tenant(String),
}

/// A mount to make.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// The image (already resolved from a ref; it must be in the store).
    pub image: Digest,
    /// Where to mount it.
    pub target: PathBuf,
    /// Read-only or copy-on-write.
    pub writes: Writes,
    /// Create the target directory if it is missing.
    pub create_target: bool,
    /// For mounts in a private namespace: the process whose life the pin follows.
    pub owner: Option<u32>,
    /// Start reading the image into the page cache before mounting it (see [`prefetch_image`]).
    /// `velo run` leaves this off and prefetches once the command has started instead, off the
    /// critical path.
    pub prefetch: bool,
}

/// How the layers reached overlayfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerPassing {
    /// As file descriptors (Linux 6.13+): nothing is ever visible in the filesystem.
    Fds,
    /// As `/proc/self/fd/N` paths to the same detached mounts and directories (Linux 6.15+).
    Paths,
    /// The image mount attached for a moment inside the store, as older kernels (6.12)
    /// require of overlay layers; other layers as `/proc/self/fd/N` paths.
    AttachedPaths,
}

/// What a mount did.
#[derive(Debug, Clone, Serialize)]
pub struct MountReport {
    /// The image mounted.
    pub image: Digest,
    /// Where.
    pub target: PathBuf,
    /// True for copy-on-write mounts.
    pub writable: bool,
    /// The upper dir of a writable mount.
    pub upper: Option<PathBuf>,
    /// True if velo manages (and umount removes) the upper dir.
    pub managed_upper: bool,
    /// "require": the kernel checks every object's fs-verity digest on open; "off": it does not
    /// (this store's filesystem has no fs-verity), so reads are not verified by the kernel.
    pub verity: &'static str,
    /// How the EROFS image is read (direct I/O avoids a second copy in the page cache).
    pub image_backing: ImageBacking,
    /// How the layers were passed to overlayfs.
    pub layers: LayerPassing,
    /// The mount's ID in mountinfo.
    pub mnt_id: u64,
    /// The kernel's never-reused mount ID, where available.
    pub mnt_id_unique: Option<u64>,
}

/// Mounts an image. Requires root (checked). On any error nothing stays mounted and no slot
/// or managed upper dir is left in the store.
pub fn mount_image(store: &Store, req: &MountRequest) -> Result<MountReport> {
    crate::privilege::require_root("velo mount")?;
    mount_image_via(&Kernel, store, req)
}

/// [`mount_image`] through `sys` (the kernel, or a test's fake).
fn mount_image_via(sys: &dyn MountSys, store: &Store, req: &MountRequest) -> Result<MountReport> {
    let _lock = store.lock_shared()?;
    // One mount of this store at a time resolves its target and attaches there: two at once
    // could each find the target free (each fd opened before the other's attach) and stack
    // two mounts on it.
    let _attaching = lock_mounts(store)?;
    // Resolved by fd without following any symlink; used by fd from here on (its path, the
    // real one, only names it in the record and in messages).
    let resolved = open_target(store, &req.target, req.create_target)?;
    let result = mount_at(sys, store, req, resolved.fd.as_fd(), &resolved.path);
    if result.is_err() && resolved.created {
        // The target dir this mount created goes with it (it is empty: nothing was attached).
        if let Some(parent) = &resolved.parent {
            let _ = rustix::fs::unlinkat(
                parent,
                resolved.name.as_os_str(),
                rustix::fs::AtFlags::REMOVEDIR,
            );
        }
    }
    result
}

/// Holds the store's `mounts/` exclusively (a lock on the directory) until the fd is dropped.
fn lock_mounts(store: &Store) -> Result<OwnedFd> {
    let dir = store.open_area(Area::Mounts)?;
    rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| MountError::io("lock", store.area_path(Area::Mounts), e))?;
    Ok(dir)
}

/// [`mount_image`] at the resolved `target_fd` (real path `target`). The mount's record (the
/// pin that keeps its image and objects from GC) is written before the mount is attached, so
/// no moment exists when the mount is live and unpinned; a failure at any step removes the
/// slot (record, managed upper dir) again, and a mount not yet attached goes with its fd.
fn mount_at(
    sys: &dyn MountSys,
    store: &Store,
    req: &MountRequest,
    target_fd: BorrowedFd<'_>,
    target: &Path,
) -> Result<MountReport> {
    let target = target.to_owned();
    refuse_if_velo_mount(sys, target_fd, &target)?;

    let image_fd = store.open_image(&req.image)?;
    let verity = store.verity();
    // The kernel parses only bytes that are the image named: checked through this very fd.
    check_image(store, image_fd.as_fd(), &req.image)?;
    let objects_fd = store.open_area(Area::Objects)?;

    let _tenant_lock = match &req.writes {
        Writes::Tenant(name) => Some(check_tenant(store, name, &req.image)?),
        _ => None,
    };
    let slot = store.create_mount_slot()?;
    let result = (|| {
        if req.prefetch {
            prefetch_fd(image_fd.as_fd());
        }
        let (erofs, backing) = erofs_mount_via(sys, image_fd.as_fd(), &req.image)?;
        let upper = prepare_upper(store, &slot, &req.writes, &target, erofs.as_fd())?;
        let layers = Layers {
            meta: erofs.as_fd(),
            data: objects_fd.as_fd(),
            upper: upper
                .as_ref()
                .map(|u| (u.upper_fd.as_fd(), u.work_fd.as_fd())),
            discard_upper: upper.as_ref().is_some_and(|u| u.managed),
        };
        let (ovl, passing) =
            overlay_mount(sys, &req.image, &layers, verity, &slot.path.join("image"))?;
        let upper = upper.as_ref().map(|u| (u.path.clone(), u.managed));
        let report = record_mount(
            sys,
            store,
            &slot,
            req,
            &target,
            ovl.as_fd(),
            upper,
            verity,
            (backing, passing),
        )?;
        sys.attach(ovl.as_fd(), target_fd)
            .map_err(|e| MountError::io("attach mount at", &target, e))?;
        Ok(report)
    })();
    if result.is_err() {
        let _ = store.remove_mount_slot(&slot.token);
    }
    result
}

/// Writes the record of the detached mount `ovl`, about to be attached at `target`, into its
/// slot (the pin that keeps its image from GC).
#[allow(clippy::too_many_arguments)]
fn record_mount(
    sys: &dyn MountSys,
    store: &Store,
    slot: &MountSlot,
    req: &MountRequest,
    target: &Path,
    ovl: BorrowedFd<'_>,
    upper: Option<(PathBuf, bool)>,
    verity: VerityMode,
    (image_backing, layers): (ImageBacking, LayerPassing),
) -> Result<MountReport> {
    let (mnt_id, mnt_id_unique, _) = sys
        .mount_ids(ovl)
        .map_err(|e| MountError::io("read mount id of", target, e))?;
    let report = MountReport {
        image: req.image,
        target: target.to_owned(),
        writable: upper.is_some(),
        managed_upper: upper.as_ref().is_some_and(|u| u.1),
        upper: upper.map(|u| u.0),
        verity: verity_option(verity),
        image_backing,
        layers,
        mnt_id,
        mnt_id_unique,
    };
    let record = MountRecord {
        image: req.image,
        target: target.to_owned(),
        mnt_id_unique,
        mnt_id,
        upper: report.upper.clone(),
        managed_upper: report.managed_upper,
        verity: report.verity.to_owned(),
        boot_id: velo_objects::fsutil::boot_id(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        tenant: match &req.writes {
            Writes::Tenant(name) => Some(name.clone()),
            _ => None,
        },
        mnt_ns: velo_objects::current_mnt_ns(),
        mnt_ns_id: velo_objects::mnt_ns_id("/proc/self/ns/mnt".as_ref()),
        owner: req
            .owner
            .and_then(|pid| velo_objects::process_start_time(pid).map(|start| (pid, start))),
    };
    store.write_mount_record(slot, &record)?;
    Ok(report)
}

/// A detached overlay of `image` over its detached EROFS mount `erofs`, with a fresh upper and
/// work dir in `dir` (created here, inside the store; the caller removes it with the overlay),
/// its upper discarded (`volatile`). velo-mountd lends these out. Returns the overlay and
/// its upper dir.
pub(crate) fn lease_overlay(
    store: &Store,
    image: &Digest,
    erofs: BorrowedFd<'_>,
    dir: &Path,
) -> Result<(OwnedFd, PathBuf)> {
    let mk = |path: &Path, mode: u32| -> Result<OwnedFd> {
        rustix::fs::mkdir(path, Mode::from_raw_mode(mode))
            .map_err(|e| MountError::io("create", path, e))?;
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| MountError::io("open", path, e))
    };
    let _dir = mk(dir, 0o700)?;
    let upper_path = dir.join("upper");
    let upper = mk(&upper_path, 0o755)?;
    let work = mk(&dir.join("work"), 0o755)?;
    copy_root_metadata(erofs, upper.as_fd(), &upper_path)?;
    let objects = store.open_area(Area::Objects)?;
    let layers = Layers {
        meta: erofs,
        data: objects.as_fd(),
        upper: Some((upper.as_fd(), work.as_fd())),
        discard_upper: true,
    };
    let ovl = Kernel.overlay(image, &layers, store.verity(), LayerPassing::Fds)?;
    Ok((ovl, upper_path))
}

fn verity_option(mode: VerityMode) -> &'static str {
    match mode {
        VerityMode::Enabled => "require",
        VerityMode::Unavailable => "off",
    }
}

fn refuse_if_velo_mount(
    sys: &dyn MountSys,
    target_fd: BorrowedFd<'_>,
    target: &Path,
) -> Result<()> {
    let Ok((id, _, true)) = sys.mount_ids(target_fd) else {
        return Ok(());
    };
    let mounts =
        mountinfo::read().map_err(|e| MountError::io("read", "/proc/self/mountinfo", e))?;
    if mounts.iter().any(|m| m.id == id && m.is_velo()) {
        return Err(MountError::BadTarget {
            path: target.to_owned(),
            reason: "is already a velo mount; `velo umount` it first".into(),
        });
    }
    Ok(())
}

/// Checks, before the kernel's EROFS parser sees it, that the image file open as `fd` (the very
/// fd that is then mounted) is the image `digest` names. In a verity store the kernel measures
/// it ([`check_image_verity`]); elsewhere its fs-verity digest is computed here, in userspace,
/// and compared with its name. A file that is not the image it is named after (a copy of
/// another image under a false name, a foreign image, a damaged one) is refused with an error
/// naming it and pointing at `velo fsck`. It must also start with the composefs header, so an
/// EROFS image another tool made (`mkfs.erofs`) is refused even under its own digest; the full
/// check that an image is velo's (parse and rebuild with velo's writer, to the same bytes) is
/// `velo fsck`'s and `velo mount --verify`'s, as the mount helper does not link the writer.
///
/// The userspace hash runs once per file: a positive result is cached in the store's `cache/`
/// keyed by the file's identity (device, inode, size, mtime and ctime in ns; any write,
/// rename, link or chmod changes the ctime). The cache is only a shortcut for files root owns,
/// mode 0444, in a store root owns and alone can write (only root could have changed them
/// without changing their identity); any other file is hashed every time.
pub(crate) fn check_image(store: &Store, fd: BorrowedFd<'_>, digest: &Digest) -> Result<()> {
    check_image_with(store, fd, digest, &mut hash_image)
}

/// The first bytes of every composefs image (`COMPOSEFS_MAGIC`, 0xd078629a little-endian).
const COMPOSEFS_MAGIC: [u8; 4] = 0xd078_629a_u32.to_le_bytes();

/// The identity of a file the image check cache is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: i64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    fn of(st: &rustix::fs::Stat) -> Self {
        let ns = |sec: i64, nsec: i64| i128::from(sec) * 1_000_000_000 + i128::from(nsec);
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec as i64),
        }
    }

    /// The cache entry recording that the file with this identity is the image `digest`.
    fn entry(&self, digest: &Digest) -> String {
        format!(
            "velo-image-check v1 {digest} {} {} {} {} {}\n",
            self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns
        )
    }
}

/// The `cache/` entry of an image's check.
fn check_cache_name(digest: &Digest) -> String {
    format!("{}{digest}", velo_objects::IMAGE_CHECK_PREFIX)
}

/// Whether a positive check of this file may be cached: root runs velo, owns the file (mode
/// 0444) and owns the store, which nobody else can write.
fn check_cacheable(store: &Store, st: &rustix::fs::Stat) -> bool {
    let root_only = |uid: u32, mode: u32| uid == 0 && mode & 0o022 == 0;
    rustix::process::geteuid().is_root()
        && st.st_uid == 0
        && st.st_mode & 0o7777 == 0o444
        && rustix::fs::fstat(store.root_fd()).is_ok_and(|s| root_only(s.st_uid, s.st_mode))
}

/// The fs-verity digest of everything in the file `fd` of `size` bytes.
fn hash_image(fd: BorrowedFd<'_>, size: u64) -> std::result::Result<Digest, Errno> {
    let mut hasher = velo_objects::verity::VerityHasher::new();
    let mut buf = vec![0u8; size.clamp(1, 1 << 20) as usize];
    let mut pos = 0u64;
    loop {
        match velo_objects::fsutil::pread_full(fd, &mut buf, pos)? {
            0 => return Ok(hasher.finalize()),
            n => {
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
        }
    }
}

/// [`check_image`] with the hash function given (tests count its calls).
fn check_image_with(
    store: &Store,
    fd: BorrowedFd<'_>,
    digest: &Digest,
    hash: &mut dyn FnMut(BorrowedFd<'_>, u64) -> std::result::Result<Digest, Errno>,
) -> Result<()> {
    let path = store.image_path(digest);
    let refused = |what: String| MountError::ImageRefused {
        digest: digest.to_hex(),
        reason: format!(
            "{} {what}; velo never hands the kernel an image that is not the one named. Run \
             `velo fsck` (`velo fsck --repair` moves it to quarantine/)",
            path.display()
        ),
    };
    // Every image velo writes starts with the composefs header; an EROFS image made by another
    // tool (`mkfs.erofs`) does not, whatever its name.
    let composefs_header = || {
        let mut magic = [0u8; 4];
        match velo_objects::fsutil::pread_full(fd, &mut magic, 0) {
            Ok(4) if magic == COMPOSEFS_MAGIC => Ok(()),
            Ok(_) => Err(refused(
                "has no composefs header: it is not an image velo wrote (e.g. one from mkfs.erofs)"
                    .into(),
            )),
            Err(e) => Err(refused(format!("cannot be read ({e})"))),
        }
    };
    if store.verity() == VerityMode::Enabled {
        check_image_verity(store, fd, digest)?;
        return composefs_header();
    }
    let st = rustix::fs::fstat(fd).map_err(|e| MountError::io("stat image", &path, e))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(refused("is not a regular file".into()));
    }
    let id = FileIdentity::of(&st);
    let cacheable = check_cacheable(store, &st);
    let name = check_cache_name(digest);
    if cacheable
        && let Ok(Some(entry)) = store.read_cache(&name, 4 << 10)
        && entry == id.entry(digest).as_bytes()
    {
        return Ok(());
    }
    let found = hash(fd, u64::try_from(st.st_size).unwrap_or(0)).map_err(|e| {
        refused(format!(
            "cannot be read ({e}), so it cannot be checked against its name"
        ))
    })?;
    if found != *digest {
        return Err(refused(format!(
            "holds bytes whose fs-verity digest is {found}: it is not the image it is named \
             after (another image under a false name, a foreign or a damaged file)"
        )));
    }
    composefs_header()?;
    // The bytes hashed are the bytes the kernel gets only if the file did not change meanwhile.
    let after = rustix::fs::fstat(fd).map_err(|e| MountError::io("stat image", &path, e))?;
    if FileIdentity::of(&after) != id {
        return Err(refused("changed while it was being checked".into()));
    }
    if cacheable {
        // Best effort: a lost entry only costs one more hash.
        let _ = store.write_cache(&name, id.entry(digest).as_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod check_image_tests {
    use super::*;
    use std::cell::Cell;

    /// `bytes` behind a composefs header (the check reads the header and the digest, not the
    /// rest of the format).
    fn image_bytes(fill: u8) -> Vec<u8> {
        let mut bytes = COMPOSEFS_MAGIC.to_vec();
        bytes.resize(50_000, fill);
        bytes
    }

    /// A store with one image.
    fn store_with_image(fill: u8) -> (tempfile::TempDir, Store, Digest) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let digest = store
            .store_bytes(velo_objects::Kind::Image, &image_bytes(fill))
            .unwrap()
            .digest;
        (dir, store, digest)
    }

    /// Runs the check, counting how often the image is hashed.
    fn check(store: &Store, digest: &Digest, hashed: &Cell<u32>) -> Result<()> {
        let fd = store.open_image(digest)?;
        check_image_with(store, fd.as_fd(), digest, &mut |fd, size| {
            hashed.set(hashed.get() + 1);
            hash_image(fd, size)
        })
    }

    #[test]
    fn an_unchanged_image_is_hashed_once_and_a_changed_one_again() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED an_unchanged_image_is_hashed_once…: the cache needs root's files");
            return;
        }
        let (_dir, store, digest) = store_with_image(3);
        if store.verity() == VerityMode::Enabled {
            eprintln!("SKIPPED an_unchanged_image_is_hashed_once…: the kernel checks here");
            return;
        }
        let hashed = Cell::new(0);
        check(&store, &digest, &hashed).unwrap();
        check(&store, &digest, &hashed).unwrap();
        check(&store, &digest, &hashed).unwrap();
        assert_eq!(hashed.get(), 1, "an unchanged image was hashed again");
        // Any change of identity (here a chmod to the same mode: a new ctime) means a new hash.
        let path = store.image_path(&digest);
        rustix::fs::chmod(&path, Mode::from_raw_mode(0o444)).unwrap();
        check(&store, &digest, &hashed).unwrap();
        assert_eq!(
            hashed.get(),
            2,
            "a changed identity was trusted from the cache"
        );
        check(&store, &digest, &hashed).unwrap();
        assert_eq!(hashed.get(), 2);
        // Not root's, or not 0444: never cached.
        rustix::fs::chown(&path, Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
        check(&store, &digest, &hashed).unwrap();
        check(&store, &digest, &hashed).unwrap();
        assert_eq!(
            hashed.get(),
            4,
            "a file another user owns was trusted from the cache"
        );
        rustix::fs::chown(&path, Some(rustix::fs::Uid::ROOT), None).unwrap();
        rustix::fs::chmod(&path, Mode::from_raw_mode(0o644)).unwrap();
        check(&store, &digest, &hashed).unwrap();
        check(&store, &digest, &hashed).unwrap();
        assert_eq!(
            hashed.get(),
            6,
            "a writable file was trusted from the cache"
        );
    }

    #[test]
    fn an_image_under_a_false_name_is_refused_even_after_a_cached_check() {
        let (_dir, store, good) = store_with_image(1);
        if store.verity() == VerityMode::Enabled {
            eprintln!("SKIPPED an_image_under_a_false_name…: the kernel checks here");
            return;
        }
        let other = store
            .store_bytes(velo_objects::Kind::Image, &image_bytes(2))
            .unwrap()
            .digest;
        let hashed = Cell::new(0);
        check(&store, &good, &hashed).unwrap();
        // Replace the good image's file with the other image's bytes (a new file: the name is
        // the same, the identity is not), as root would keep it: 0444.
        let path = store.image_path(&good);
        let tmp = path.with_extension("tmp");
        std::fs::copy(store.image_path(&other), &tmp).unwrap();
        rustix::fs::chmod(&tmp, Mode::from_raw_mode(0o444)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let err = check(&store, &good, &hashed).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains(&other.to_hex())
                && err.contains("velo fsck"),
            "{err}"
        );
        // A copy under a name that is no image's digest at all.
        let fake = Digest::parse(&"ab".repeat(32)).unwrap();
        std::fs::copy(store.image_path(&other), store.image_path(&fake)).unwrap();
        let err = check(&store, &fake, &hashed).unwrap_err().to_string();
        assert!(err.contains("not the image it is named after"), "{err}");
        // Under its own digest but without the composefs header: not velo's.
        let foreign = store
            .store_bytes(velo_objects::Kind::Image, &[7u8; 10_000])
            .unwrap()
            .digest;
        let err = check(&store, &foreign, &hashed).unwrap_err().to_string();
        assert!(err.contains("no composefs header"), "{err}");
    }
}

/// In a verity store the image is checked against its name before the kernel parses it: its
/// fs-verity digest must be its name, and every block must read (fs-verity fails the read of a
/// block tampered with on disk; once read, the verified pages stay cached for the mount).
pub(crate) fn check_image_verity(store: &Store, fd: BorrowedFd<'_>, digest: &Digest) -> Result<()> {
    match velo_objects::kverity::measure(fd) {
        Ok(measured) if measured == *digest => {
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = 0u64;
            loop {
                match velo_objects::fsutil::pread_full(fd, &mut buf, pos) {
                    Ok(0) => return Ok(()),
                    Ok(n) => pos += n as u64,
                    Err(e) => {
                        return Err(MountError::ImageRefused {
                            digest: digest.to_hex(),
                            reason: format!(
                                "reading {} fails at byte {pos} ({e}): its data no longer matches its fs-verity digest (tampered with on disk)",
                                store.image_path(digest).display()
                            ),
                        });
                    }
                }
            }
        }
        Ok(measured) => Err(MountError::ImageRefused {
            digest: digest.to_hex(),
            reason: format!(
                "its fs-verity digest is {measured}: {} was replaced or tampered with",
                store.image_path(digest).display()
            ),
        }),
        Err(e) => Err(MountError::ImageRefused {
            digest: digest.to_hex(),
            reason: format!(
                "the store requires fs-verity but {} has none ({e})",
                store.image_path(digest).display()
            ),
        }),
    }
}

/// How the EROFS image is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageBacking {
    /// File-backed with direct I/O: the image is not cached a second time.
    FileDirectIo,
    /// File-backed, through the page cache (the store's filesystem has no direct I/O).
    File,
    /// Through an autoclear loop device (the store's filesystem, e.g. tmpfs, cannot back EROFS).
    Loop,
}

/// A detached, read-only EROFS mount of the image: file-backed with `directio` where the
/// kernel and the store's filesystem support it, file-backed without it otherwise, and through
/// a loop device only where the kernel cannot mount the file itself.
pub(crate) fn erofs_mount(
    image: BorrowedFd<'_>,
    digest: &Digest,
) -> Result<(OwnedFd, ImageBacking)> {
    erofs_mount_via(&Kernel, image, digest)
}

/// [`erofs_mount`] through `sys`.
fn erofs_mount_via(
    sys: &dyn MountSys,
    image: BorrowedFd<'_>,
    digest: &Digest,
) -> Result<(OwnedFd, ImageBacking)> {
    let source = proc_fd_path(image);
    let direct_err = match sys.erofs(&source, digest, true) {
        Ok(fd) => return Ok((fd, ImageBacking::FileDirectIo)),
        Err(e) => e,
    };
    let file_err = match sys.erofs(&source, digest, false) {
        Ok(fd) => return Ok((fd, ImageBacking::File)),
        Err(e) => e,
    };
    tracing::debug!("EROFS mount with directio failed: {direct_err}; without: {file_err}");
    if !matches!(
        &file_err,
        MountError::Kernel {
            errno: Some(Errno::NOTBLK),
            ..
        }
    ) {
        return Err(file_err);
    }
    let (dev, path) = sys.loop_device(image).map_err(|e| MountError::Kernel {
        errno: Some(e),
        what: format!(
            "set up a loop device for image {digest} (its filesystem cannot back EROFS directly)"
        ),
        detail: e.to_string(),
    })?;
    let fd = sys.erofs(&path, digest, false)?;
    drop(dev); // the mount holds the device now; autoclear frees it with the mount
    Ok((fd, ImageBacking::Loop))
}

/// Reads of the image ahead of the first lookup are issued in requests of this size: one
/// `POSIX_FADV_WILLNEED` is capped by the kernel at the device's largest request (2.5 MiB on
/// the development machine's loop device), so a single call over the whole file would only
/// read its head.
const PREFETCH_CHUNK: u64 = 2 << 20;

/// Images larger than this (~280k files) are prefetched only up to it: the prefetch is for the
/// metadata a run is likely to touch, not for filling the page cache with a huge tree's.
const PREFETCH_MAX: u64 = 64 << 20;

/// Starts reading the image into the page cache, without waiting for it. Returns whether its
/// start was in the page cache already: false is the cheap sign of a cold start after a
/// reboot or a dropped cache.
///
/// EROFS reads inodes, directory entries and xattrs (in composefs images: everything but
/// file data) through the image file's page cache — `directio` applies only to data blocks —
/// and a cold lookup costs one small synchronous read per metadata block. Reading the image
/// sequentially ahead of the command turns those into a few large reads. Measured with a cold
/// page cache (`benches/run.rs`), `velo run node` requiring 13 packages from a 40k-file tree:
/// 3,563 reads and +22.5% import time against the same tree on ext4 without this, 3,086 reads
/// and +13.3% with it; Python importing numpy, pandas, scipy…: +9.1% → +3.9%. With the image
/// already cached (the usual case) it costs a page-cache walk, ~40 µs for a 9 MiB image (no
/// difference measurable in `velo run true`). Best effort: a failure only loses the prefetch.
pub fn prefetch_image(store: &Store, image: &Digest) -> bool {
    let Ok(fd) = store.open_image(image) else {
        return true;
    };
    let cached = is_cached(fd.as_fd());
    prefetch_fd(fd.as_fd());
    cached
}

/// Whether the file's first page is in the page cache (a read that would wait for the disk is
/// refused: `RWF_NOWAIT`).
pub(crate) fn is_cached(fd: BorrowedFd<'_>) -> bool {
    let mut byte = [0u8; 1];
    rustix::io::preadv2(
        fd,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        0,
        rustix::io::ReadWriteFlags::NOWAIT,
    )
    .is_ok()
}

fn prefetch_fd(image: BorrowedFd<'_>) {
    let Ok(st) = rustix::fs::fstat(image) else {
        return;
    };
    let len = u64::try_from(st.st_size).unwrap_or(0).min(PREFETCH_MAX);
    let mut offset = 0;
    while offset < len {
        let advice = rustix::fs::Advice::WillNeed;
        if rustix::fs::fadvise(image, offset, NonZeroU64::new(PREFETCH_CHUNK), advice).is_err() {
            return;
        }
        offset += PREFETCH_CHUNK;
    }
}

/// The EROFS mount [`Kernel`] makes for [`MountSys::erofs`].
pub(crate) fn erofs_mount_with(source: &str, digest: &Digest, directio: bool) -> Result<OwnedFd> {
    let ctx = FsContext::open("erofs")?;
    ctx.set("source", source)?;
    let _ = ctx.try_flag("ro");
    if directio {
        ctx.try_flag("directio").map_err(|e| MountError::Kernel {
            errno: Some(e),
            what: "use direct I/O for EROFS".into(),
            detail: e.to_string(),
        })?;
    }
    let attrs = MountAttrFlags::MOUNT_ATTR_RDONLY
        | MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV;
    ctx.mount(attrs).map_err(|e| match e {
        MountError::Kernel { detail, errno, .. } => MountError::Kernel {
            errno,
            what: format!("mount image {digest}{}", erofs_hint(errno)),
            detail,
        },
        other => other,
    })
}

/// What an EROFS mount's `errno` most likely means, as a parenthesis (or nothing).
fn erofs_hint(errno: Option<rustix::io::Errno>) -> &'static str {
    use rustix::io::Errno;
    match errno {
        // Not allowed here (a user namespace, or no CAP_SYS_ADMIN): an age of the kernel
        // would be the wrong thing to blame.
        Some(Errno::PERM | Errno::ACCESS) => {
            " (only root in the host's user namespace may mount an image; as an ordinary user \
             `velo run` asks velo-mountd for its mounts)"
        }
        // A kernel that takes only block devices as EROFS sources.
        Some(Errno::NOTBLK | Errno::INVAL) => " (file-backed EROFS needs Linux 6.12+)",
        Some(Errno::IO) => " (the image cannot be read)",
        _ => "",
    }
}

/// The layers of an overlay.
pub(crate) struct Layers<'a> {
    /// The image's EROFS mount (metadata).
    pub meta: BorrowedFd<'a>,
    /// The store's objects (data-only lower).
    pub data: BorrowedFd<'a>,
    /// Upper and work dirs, for a writable overlay.
    pub upper: Option<(BorrowedFd<'a>, BorrowedFd<'a>)>,
    /// The upper is thrown away at umount: mount it `volatile`. Otherwise overlayfs syncs the
    /// whole upper filesystem (the store's) when the mount goes away — measured here at ~0.9 ms
    /// per `velo run`, and far more on a host with writes pending.
    pub discard_upper: bool,
}

/// The overlay mount, detached. Layers go in as fds where the kernel takes them (6.13+), else
/// as `/proc/self/fd` paths to the detached mounts (6.15+ accepts detached layers); which one
/// works is found at run time, so one binary serves old and new kernels. Older kernels (6.12)
/// only take layers mounted in the caller's namespace: there the image is attached for the
/// moment the overlay is created at `attach_dir`, a directory only root can reach (inside the
/// 0700 store), and detached again right after.
fn overlay_mount(
    sys: &dyn MountSys,
    digest: &Digest,
    layers: &Layers<'_>,
    verity: VerityMode,
    attach_dir: &Path,
) -> Result<(OwnedFd, LayerPassing)> {
    let fd_err = match sys.overlay(digest, layers, verity, LayerPassing::Fds) {
        Ok(fd) => return Ok((fd, LayerPassing::Fds)),
        Err(e) => e,
    };
    let path_err = match sys.overlay(digest, layers, verity, LayerPassing::Paths) {
        Ok(fd) => return Ok((fd, LayerPassing::Paths)),
        Err(e) => e,
    };
    tracing::debug!("overlay with fds failed: {fd_err}; with detached paths: {path_err}");
    let attached = AttachedImage::attach(sys, layers.meta, attach_dir)?;
    let attached_layers = Layers {
        meta: attached.fd.as_fd(),
        data: layers.data,
        upper: layers.upper,
        discard_upper: layers.discard_upper,
    };
    let fd = sys.overlay(
        digest,
        &attached_layers,
        verity,
        LayerPassing::AttachedPaths,
    )?;
    Ok((fd, LayerPassing::AttachedPaths))
}

/// The image's EROFS mount attached at a private directory for the moment an old kernel needs
/// it; detached (and the directory removed) on drop, on success and failure alike.
struct AttachedImage<'s> {
    sys: &'s dyn MountSys,
    dir: PathBuf,
    fd: OwnedFd,
}

impl<'s> AttachedImage<'s> {
    fn attach(sys: &'s dyn MountSys, mnt: BorrowedFd<'_>, dir: &Path) -> Result<Self> {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(MountError::io("create", dir, e)),
        }
        let dir_fd = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| MountError::io("open", dir, e))?;
        sys.attach(mnt, dir_fd.as_fd())
            .map_err(|e| MountError::io("attach the image for an older kernel at", dir, e))?;
        // From here on, drop detaches it. Reopen the path to get the mounted root.
        let mut guard = Self {
            sys,
            dir: dir.to_owned(),
            fd: dir_fd,
        };
        guard.fd = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| MountError::io("open", dir, e))?;
        Ok(guard)
    }
}

impl Drop for AttachedImage<'_> {
    fn drop(&mut self) {
        self.sys.detach_at(&self.dir);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The overlay mount [`Kernel`] makes for [`MountSys::overlay`].
pub(crate) fn overlay_with(
    digest: &Digest,
    layers: &Layers<'_>,
    verity: VerityMode,
    how: LayerPassing,
) -> Result<OwnedFd> {
    let ctx = FsContext::open("overlay")?;
    ctx.set("source", &format!("{SOURCE_PREFIX}{digest}"))?;
    ctx.set("metacopy", "on")?;
    ctx.set("redirect_dir", "on")?;
    ctx.set("verity", verity_option(verity))?;
    if layers.upper.is_some() && layers.discard_upper {
        ctx.try_flag("volatile").map_err(|e| MountError::Kernel {
            errno: Some(e),
            what: "set overlay option volatile".into(),
            detail: format!("{e} ({})", ctx.log()),
        })?;
    }
    let fail = |what: &str, e: Errno| MountError::Kernel {
        errno: Some(e),
        what: format!("pass the {what} to overlayfs"),
        detail: format!("{e} ({})", ctx.log()),
    };
    match how {
        LayerPassing::Fds => {
            ctx.try_set_fd("lowerdir+", layers.meta)
                .map_err(|e| fail("image layer", e))?;
            ctx.try_set_fd("datadir+", layers.data)
                .map_err(|e| fail("object store", e))?;
            if let Some((upper, work)) = layers.upper {
                ctx.try_set_fd("upperdir", upper)
                    .map_err(|e| fail("upper dir", e))?;
                ctx.try_set_fd("workdir", work)
                    .map_err(|e| fail("work dir", e))?;
            }
        }
        LayerPassing::Paths | LayerPassing::AttachedPaths => {
            let lower = format!(
                "{}::{}",
                proc_fd_path(layers.meta),
                proc_fd_path(layers.data)
            );
            ctx.try_set("lowerdir", &lower)
                .map_err(|e| fail("layers (data-only lowers need Linux 6.5+)", e))?;
            if let Some((upper, work)) = layers.upper {
                ctx.try_set("upperdir", &proc_fd_path(upper))
                    .map_err(|e| fail("upper dir", e))?;
                ctx.try_set("workdir", &proc_fd_path(work))
                    .map_err(|e| fail("work dir", e))?;
            }
        }
    }
    let mut attrs = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
    if layers.upper.is_none() {
        attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    ctx.mount(attrs)
}

struct Upper {
    path: PathBuf,
    upper_fd: OwnedFd,
    work_fd: OwnedFd,
    managed: bool,
}

fn prepare_upper(
    store: &Store,
    slot: &MountSlot,
    writes: &Writes,
    target: &Path,
    image_root: BorrowedFd<'_>,
) -> Result<Option<Upper>> {
    match writes {
        Writes::ReadOnly => Ok(None),
        Writes::CowManaged => {
            let mk = |name: &str| -> Result<OwnedFd> {
                let path = slot.path.join(name);
                rustix::fs::mkdirat(&slot.dir, name, Mode::from_raw_mode(0o755))
                    .map_err(|e| MountError::io("create", &path, e))?;
                velo_objects::fsutil::open_dir_beneath(slot.dir.as_fd(), name)
                    .map_err(|e| MountError::io("open", &path, e))
            };
            let upper_fd = mk("upper")?;
            let work_fd = mk("work")?;
            copy_root_metadata(image_root, upper_fd.as_fd(), &slot.path.join("upper"))?;
            Ok(Some(Upper {
                path: slot.path.join("upper"),
                upper_fd,
                work_fd,
                managed: true,
            }))
        }
        Writes::CowUpper(dir) => user_upper(store, dir, target, image_root).map(Some),
        Writes::Tenant(name) => {
            let dirs = store.tenant_dirs(name)?;
            Ok(Some(Upper {
                path: dirs.upper_path,
                upper_fd: dirs.upper,
                work_fd: dirs.work,
                managed: false,
            }))
        }
    }
}

/// Refuses a tenant mount over another image than the tenant's, or while the tenant is mounted
/// anywhere (overlayfs itself only warns about a reused upper dir, then misbehaves). Returns
/// the tenant lock, to hold until the new mount's record is written.
fn check_tenant(store: &Store, name: &str, image: &Digest) -> Result<OwnedFd> {
    let tenant = store.tenant(name)?;
    if tenant.image != *image {
        return Err(MountError::BadUpper {
            path: store.area_path(Area::Tenants).join(name),
            reason: format!(
                "tenant {name:?} was created on image {}; it is never mounted over another image ({image})",
                tenant.image
            ),
        });
    }
    let dirs = store.tenant_dirs(name)?;
    rustix::fs::flock(&dirs.dir, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| MountError::io("lock tenant", &dirs.upper_path, e))?;
    if let Some(at) = tenant_mount_point(store, name)? {
        return Err(MountError::BadUpper {
            path: dirs.upper_path.clone(),
            reason: format!(
                "tenant {name:?} is already mounted at {}; one tenant is never mounted twice at once",
                at.display()
            ),
        });
    }
    Ok(dirs.dir)
}

/// Where a tenant is mounted, if it is (here, or pinned by a live mount elsewhere).
pub fn tenant_mount_point(store: &Store, name: &str) -> Result<Option<PathBuf>> {
    let dirs = store.tenant_dirs(name)?;
    let mounts =
        mountinfo::read().map_err(|e| MountError::io("read", "/proc/self/mountinfo", e))?;
    if let Some(m) = mounts.iter().find(|m| {
        m.fstype == "overlay"
            && m.super_option("upperdir")
                .is_some_and(|u| Path::new(&u) == dirs.upper_path)
    }) {
        return Ok(Some(m.mount_point.clone()));
    }
    Ok(store
        .list_mount_records()?
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .find(|r| {
            r.tenant.as_deref() == Some(name)
                && liveness_in(r, || Some(&mounts)) != velo_objects::Liveness::Gone
        })
        .map(|r| r.target))
}

/// Moves this thread (and the threads it starts later) into a private mount namespace, where
/// mounts vanish with the process. Copied mounts are made slaves (recursively) first, so that
/// nothing mounted here propagates to the host, while the host's later mounts still appear.
pub fn enter_private_namespace() -> Result<()> {
    // SAFETY: only CLONE_NEWNS is unshared; the unsafety of unshare(2) concerns CLONE_FILES
    // (file descriptor tables), which this does not touch.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }.map_err(
        |e| MountError::Kernel {
            errno: Some(e),
            what: "create a private mount namespace".into(),
            detail: e.to_string(),
        },
    )?;
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::REC
            | rustix::mount::MountPropagationFlags::DOWNSTREAM,
    )
    .map_err(|e| MountError::io("make mounts slaves in the new namespace", "/", e))
}

/// Whether the mount a record describes still exists (see [`velo_objects::Liveness`]).
pub fn liveness(record: &MountRecord) -> velo_objects::Liveness {
    liveness_check()(record)
}

/// [`liveness`] for many records (`velo ls`, GC): this namespace's mount table is read once,
/// when a record first needs it, not once per record.
pub fn liveness_check() -> impl Fn(&MountRecord) -> velo_objects::Liveness {
    let table = std::cell::OnceCell::new();
    move |record| {
        liveness_in(record, || {
            table.get_or_init(|| mountinfo::read().ok()).as_deref()
        })
    }
}

fn liveness_in<'t>(
    record: &MountRecord,
    mounts: impl FnOnce() -> Option<&'t [mountinfo::MountInfo]>,
) -> velo_objects::Liveness {
    use velo_objects::Liveness;
    if record.boot_id != velo_objects::fsutil::boot_id() {
        return Liveness::Gone;
    }
    if let Some((pid, start)) = record.owner {
        // The owner may be gone while processes it started still use the mount in its
        // namespace (a daemon the command left behind, or the command after its supervisor
        // was killed): the namespace, not the owner, decides.
        let alive = velo_objects::process_start_time(pid) == Some(start)
            || record
                .mnt_ns
                .is_some_and(|ns| velo_objects::mnt_ns_populated(ns, record.mnt_ns_id));
        return if alive {
            Liveness::Alive
        } else {
            Liveness::Gone
        };
    }
    if record.mnt_ns.is_some() && record.mnt_ns != velo_objects::current_mnt_ns() {
        return Liveness::Unknown;
    }
    let source = format!("{SOURCE_PREFIX}{}", record.image);
    match mounts() {
        Some(mounts)
            if mounts.iter().any(|m| {
                m.id == record.mnt_id && m.mount_point == record.target && m.source == source
            }) =>
        {
            Liveness::Alive
        }
        Some(_) => Liveness::Gone,
        None => Liveness::Unknown,
    }
}

/// A user-chosen upper dir, resolved like a mount target: every component by fd from `/`,
/// no symlink followed, missing directories created beneath their parent's fd (never inside
/// the store or the target). It may not overlap the store or the target (compared by device
/// and inode, walking up by fd). The overlay work dir goes beside it (same filesystem), named
/// `.<name>.velo-work`, created and opened beneath the upper dir's parent fd; from then on
/// both are used by fd only.
fn user_upper(
    store: &Store,
    dir: &Path,
    target: &Path,
    image_root: BorrowedFd<'_>,
) -> Result<Upper> {
    use crate::target::{identity, is_within, open_child_dir, reopen_dir, resolve_dir};
    let bad = |reason: String| MountError::BadUpper {
        path: dir.to_owned(),
        reason,
    };
    let store_root = store.root();
    let store_id = identity(store.root_fd()).map_err(|e| MountError::io("stat", store_root, e))?;
    // The target was resolved moments ago the same way (no symlink): this finds the same
    // directory, for the overlap checks.
    let target_dir = resolve_dir(target, None).map_err(|e| MountError::BadTarget {
        path: target.to_owned(),
        reason: e.reason(target),
    })?;
    let target_id =
        identity(target_dir.fd.as_fd()).map_err(|e| MountError::io("stat", target, e))?;
    let overlaps_store = format!("overlaps the store {}", store_root.display());
    let overlaps_target = format!("overlaps the mount target {}", target.display());
    let guard = |parent: BorrowedFd<'_>| match (
        is_within(parent, store_id),
        is_within(parent, target_id),
    ) {
        (Ok(false), Ok(false)) => None,
        (Ok(true), _) => Some(overlaps_store.clone()),
        (_, Ok(true)) => Some(overlaps_target.clone()),
        (Err(e), _) | (_, Err(e)) => Some(format!("cannot be checked ({e})")),
    };
    let resolved = resolve_dir(dir, Some(&guard)).map_err(|e| bad(e.reason(dir)))?;
    let upper = resolved.fd.as_fd();
    let upper_id = identity(upper).map_err(|e| MountError::io("stat", dir, e))?;
    let walk = |r: rustix::io::Result<bool>| r.map_err(|e| MountError::io("walk up from", dir, e));
    if walk(is_within(upper, store_id))? || walk(is_within(store.root_fd(), upper_id))? {
        return Err(bad(overlaps_store));
    }
    if walk(is_within(upper, target_id))? || walk(is_within(target_dir.fd.as_fd(), upper_id))? {
        return Err(bad(overlaps_target));
    }
    drop(target_dir);
    let path = resolved.path.clone();
    let mounts =
        mountinfo::read().map_err(|e| MountError::io("read", "/proc/self/mountinfo", e))?;
    if let Some(m) = mounts.iter().find(|m| {
        m.fstype == "overlay"
            && m.super_option("upperdir")
                .is_some_and(|u| Path::new(&u) == path)
    }) {
        return Err(bad(format!(
            "is already the upper dir of the mount at {}; one upper dir is never mounted twice",
            m.mount_point.display()
        )));
    }
    let (Some(parent), Some(parent_path)) = (resolved.parent.as_ref(), path.parent()) else {
        return Err(bad("cannot be the root directory".into()));
    };
    let work_name = work_dir_name(&resolved.name);
    let work_path = parent_path.join(&work_name);
    let work = open_child_dir(parent.as_fd(), &work_name, &work_path, true).map_err(|e| {
        MountError::BadUpper {
            path: work_path.clone(),
            reason: format!("(its overlay work dir) {}", e.reason(&work_path)),
        }
    })?;
    let upper_fd = reopen_dir(upper).map_err(|e| MountError::io("open", &path, e))?;
    let work_fd = reopen_dir(work.as_fd()).map_err(|e| MountError::io("open", &work_path, e))?;
    if resolved.created {
        copy_root_metadata(image_root, upper_fd.as_fd(), &path)?;
    }
    Ok(Upper {
        path,
        upper_fd,
        work_fd,
        managed: false,
    })
}

/// The overlay work dir velo uses for a user-chosen upper dir named `name`.
pub fn work_dir_name(name: &OsStr) -> std::ffi::OsString {
    let mut w = std::ffi::OsString::from(".");
    w.push(name);
    w.push(".velo-work");
    w
}

/// The merged root directory takes its metadata from the upper dir: give a fresh upper dir
/// the image root's mode, owner and mtime so the mount's root looks like the snapshot's.
pub(crate) fn copy_root_metadata(
    image_root: BorrowedFd<'_>,
    upper: BorrowedFd<'_>,
    path: &Path,
) -> Result<()> {
    let st = rustix::fs::fstat(image_root)
        .map_err(|e| MountError::io("stat image root for", path, e))?;
    rustix::fs::fchown(
        upper,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
    )
    .map_err(|e| MountError::io("chown", path, e))?;
    rustix::fs::fchmod(upper, Mode::from_raw_mode(st.st_mode & 0o7777))
        .map_err(|e| MountError::io("chmod", path, e))?;
    let ts = Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    rustix::fs::futimens(upper, &ts).map_err(|e| MountError::io("set times of", path, e))?;
    Ok(())
}

/// A detached, read-only overlay of `image` over its detached EROFS mount `erofs` (no upper):
/// what a read-only mount of the service hands out, cloned per caller.
pub(crate) fn read_only_overlay(
    store: &Store,
    image: &Digest,
    erofs: BorrowedFd<'_>,
) -> Result<OwnedFd> {
    let objects = store.open_area(Area::Objects)?;
    let layers = Layers {
        meta: erofs,
        data: objects.as_fd(),
        upper: None,
        discard_upper: false,
    };
    Kernel.overlay(image, &layers, store.verity(), LayerPassing::Fds)
}

/// A detached overlay of `image` over `erofs` whose writes go to the tenant's upper dir
/// (kept across mounts). The caller makes sure the tenant is not mounted elsewhere.
pub(crate) fn tenant_overlay(
    store: &Store,
    image: &Digest,
    erofs: BorrowedFd<'_>,
    tenant: &velo_objects::TenantDirs,
) -> Result<OwnedFd> {
    let objects = store.open_area(Area::Objects)?;
    let layers = Layers {
        meta: erofs,
        data: objects.as_fd(),
        upper: Some((tenant.upper.as_fd(), tenant.work.as_fd())),
        discard_upper: false,
    };
    Kernel.overlay(image, &layers, store.verity(), LayerPassing::Fds)
}

/// A detached copy of the detached mount `mount` (`open_tree(OPEN_TREE_CLONE)`): it shares
/// the superblock, and whoever gets it may attach it while the original stays here.
pub(crate) fn clone_mount(mount: BorrowedFd<'_>) -> Result<OwnedFd> {
    rustix::mount::open_tree(
        mount,
        "",
        rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
            | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC
            | rustix::mount::OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| MountError::Kernel {
        errno: Some(e),
        what: "clone a detached mount".into(),
        detail: e.to_string(),
    })
}

/// What [`probe`] found the kernel can do.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// How the image was read.
    pub image_backing: ImageBacking,
    /// How overlayfs took the layers.
    pub layers: LayerPassing,
}

/// Builds (and drops) the whole mount stack for `image` over `data` without attaching it
/// anywhere: proves file-backed EROFS and overlayfs with a data-only lower work here.
pub fn probe(
    image: BorrowedFd<'_>,
    data: BorrowedFd<'_>,
    digest: &Digest,
    attach_dir: &Path,
) -> Result<ProbeReport> {
    crate::privilege::require_root("the mount probe")?;
    let (erofs, image_backing) = erofs_mount(image, digest)?;
    let layers = Layers {
        meta: erofs.as_fd(),
        data,
        upper: None,
        discard_upper: false,
    };
    let (_ovl, layers) = overlay_mount(
        &Kernel,
        digest,
        &layers,
        VerityMode::Unavailable,
        attach_dir,
    )?;
    Ok(ProbeReport {
        image_backing,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cold-start sign: an image whose pages were dropped reads as not cached, and as
    /// cached once read.
    #[test]
    fn is_cached_tells_a_dropped_image_from_a_read_one() {
        let dir = tempfile::tempdir().unwrap();
        let fs = rustix::fs::statfs(dir.path()).unwrap();
        if fs.f_type == TMPFS_MAGIC {
            eprintln!(
                "SKIPPED is_cached test: {} is tmpfs (pages cannot be dropped)",
                dir.path().display()
            );
            return;
        }
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let image = store
            .store_bytes(velo_objects::Kind::Image, &vec![7u8; 64 << 10])
            .unwrap()
            .digest;
        let fd = store.open_image(&image).unwrap();
        rustix::fs::fsync(&fd).unwrap();
        rustix::fs::fadvise(&fd, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(!is_cached(fd.as_fd()), "dropped, yet cached");
        let mut buf = vec![0u8; 4096];
        rustix::io::pread(&fd, &mut buf, 0).unwrap();
        assert!(is_cached(fd.as_fd()), "read, yet not cached");
    }

    /// `TMPFS_MAGIC` from `<linux/magic.h>`.
    const TMPFS_MAGIC: rustix::fs::FsWord = 0x0102_1994;

    /// The kernel, played by a fake that logs each call and fails the steps a test names. A
    /// mount it "makes" is an fd of an empty directory (the test's own, so copying the image
    /// root's owner onto an upper dir works without root).
    struct Fake {
        log: std::cell::RefCell<Vec<String>>,
        store: PathBuf,
        root: PathBuf,
        fail: Vec<&'static str>,
        erofs_errno: Errno,
    }

    impl Fake {
        fn new(env: &Setup, fail: &[&'static str]) -> Self {
            Self {
                log: Default::default(),
                store: env.store.root().to_owned(),
                root: env.dir.path().join("fake-root"),
                fail: fail.to_vec(),
                erofs_errno: Errno::INVAL,
            }
        }

        fn fd(&self) -> OwnedFd {
            std::fs::create_dir_all(&self.root).unwrap();
            rustix::fs::open(
                &self.root,
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .unwrap()
        }

        fn step(&self, name: &'static str) -> std::result::Result<(), Errno> {
            self.log.borrow_mut().push(name.to_owned());
            if self.fail.contains(&name) {
                Err(Errno::INVAL)
            } else {
                Ok(())
            }
        }

        fn log(&self) -> Vec<String> {
            self.log.borrow().clone()
        }

        /// Records of mounts in the store right now.
        fn pins(&self) -> usize {
            Store::open(&self.store)
                .unwrap()
                .list_mount_records()
                .unwrap()
                .iter()
                .filter(|(_, r)| r.is_ok())
                .count()
        }
    }

    fn kernel_err(errno: Errno) -> MountError {
        MountError::Kernel {
            errno: Some(errno),
            what: "fake".into(),
            detail: errno.to_string(),
        }
    }

    impl MountSys for Fake {
        fn erofs(&self, source: &str, _: &Digest, directio: bool) -> Result<OwnedFd> {
            let name = match (source.starts_with("/dev/loop"), directio) {
                (true, _) => "erofs loop",
                (false, true) => "erofs directio",
                (false, false) => "erofs file",
            };
            self.step(name).map_err(|_| kernel_err(self.erofs_errno))?;
            Ok(self.fd())
        }

        fn loop_device(&self, _: BorrowedFd<'_>) -> std::result::Result<(OwnedFd, String), Errno> {
            self.step("loop device")?;
            Ok((self.fd(), "/dev/loop-fake".into()))
        }

        fn overlay(
            &self,
            _: &Digest,
            _: &Layers<'_>,
            _: VerityMode,
            how: LayerPassing,
        ) -> Result<OwnedFd> {
            let name = match how {
                LayerPassing::Fds => "overlay fds",
                LayerPassing::Paths => "overlay paths",
                LayerPassing::AttachedPaths => "overlay attached paths",
            };
            self.step(name).map_err(kernel_err)?;
            Ok(self.fd())
        }

        fn attach(&self, _: BorrowedFd<'_>, _: BorrowedFd<'_>) -> rustix::io::Result<()> {
            let pinned = self.pins() > 0;
            self.step(if pinned {
                "attach (pinned)"
            } else {
                "attach (not pinned)"
            })
        }

        fn detach_at(&self, _: &Path) {
            self.log.borrow_mut().push("detach".into());
        }

        fn mount_ids(
            &self,
            _: BorrowedFd<'_>,
        ) -> std::result::Result<(u64, Option<u64>, bool), Errno> {
            Ok((7, Some(1 << 40), false))
        }
    }

    /// A store holding one real image (`image`), in a temporary directory.
    struct Setup {
        dir: tempfile::TempDir,
        store: Store,
        image: Digest,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("lib")).unwrap();
        std::fs::write(src.join("lib/a.js"), "a".repeat(5000)).unwrap();
        let store = Store::open_or_create(dir.path().join("store")).unwrap();
        let image = velo_image::snapshot(
            &store,
            &src,
            &velo_image::SnapshotOptions::default(),
            &velo_image::NoProgress,
        )
        .unwrap()
        .digest;
        Setup { dir, store, image }
    }

    fn request(env: &Setup, writes: Writes) -> MountRequest {
        MountRequest {
            image: env.image,
            target: env.dir.path().join("new/mnt"),
            writes,
            create_target: true,
            owner: None,
            prefetch: false,
        }
    }

    /// What is in the store's `mounts/` (slots, records, managed upper dirs).
    fn slots(env: &Setup) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(env.store.root().join("mounts"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !n.as_encoded_bytes().starts_with(b"."))
            .collect()
    }

    /// A mount is pinned (its record written) before it is attached, and the report says how
    /// the kernel took it.
    #[test]
    fn a_mount_is_pinned_before_it_is_attached() {
        let env = setup();
        let fake = Fake::new(&env, &[]);
        let r = mount_image_via(&fake, &env.store, &request(&env, Writes::CowManaged)).unwrap();
        assert_eq!(
            fake.log(),
            ["erofs directio", "overlay fds", "attach (pinned)"]
        );
        assert_eq!(r.image_backing, ImageBacking::FileDirectIo);
        assert_eq!(r.layers, LayerPassing::Fds);
        assert!(r.managed_upper);
        let records = env.store.list_mount_records().unwrap();
        assert_eq!(records.len(), 1);
        let record = records[0].1.as_ref().unwrap();
        assert_eq!(
            record.mnt_id_unique,
            Some(1 << 40),
            "the detached mount's ID"
        );
        assert_eq!(record.target, env.dir.path().join("new/mnt"));
    }

    /// A failure at any step leaves nothing: no slot, record or managed upper dir in the
    /// store, and the target dir the mount created is gone.
    #[test]
    fn a_failure_at_any_step_leaves_nothing_behind() {
        let cases: [(&[&'static str], Errno); 4] = [
            (&["erofs directio", "erofs file"], Errno::INVAL),
            (
                &["erofs directio", "erofs file", "loop device"],
                Errno::NOTBLK,
            ),
            (
                &["overlay fds", "overlay paths", "overlay attached paths"],
                Errno::INVAL,
            ),
            (&["attach (pinned)"], Errno::INVAL),
        ];
        for (fail, errno) in cases {
            let env = setup();
            let mut fake = Fake::new(&env, fail);
            fake.erofs_errno = errno;
            let err = mount_image_via(&fake, &env.store, &request(&env, Writes::CowManaged))
                .expect_err("fails");
            assert!(!err.to_string().is_empty());
            let log = fake.log();
            let failed = fail.last().copied().unwrap_or_default();
            assert!(
                log.iter().any(|l| l == failed),
                "{failed} was tried: {log:?}"
            );
            assert_eq!(
                slots(&env),
                Vec::<std::ffi::OsString>::new(),
                "{fail:?}: {log:?}"
            );
            assert!(
                !env.dir.path().join("new/mnt").exists(),
                "{fail:?}: the target dir it made is gone"
            );
        }
    }

    /// EROFS: with directio if the kernel takes it, else without, else (a filesystem that
    /// cannot back EROFS: ENOTBLK) through a loop device; any other refusal is the error.
    #[test]
    fn erofs_falls_back_from_directio_to_file_to_a_loop_device() {
        let env = setup();
        let image = env.store.open_image(&env.image).unwrap();
        let fake = Fake::new(&env, &["erofs directio"]);
        let (_, how) = erofs_mount_via(&fake, image.as_fd(), &env.image).unwrap();
        assert_eq!(how, ImageBacking::File);

        let mut fake = Fake::new(&env, &["erofs directio", "erofs file"]);
        fake.erofs_errno = Errno::NOTBLK;
        let (_, how) = erofs_mount_via(&fake, image.as_fd(), &env.image).unwrap();
        assert_eq!(how, ImageBacking::Loop);
        assert_eq!(
            fake.log(),
            ["erofs directio", "erofs file", "loop device", "erofs loop"]
        );

        let mut fake = Fake::new(&env, &["erofs directio", "erofs file"]);
        fake.erofs_errno = Errno::PERM;
        assert!(erofs_mount_via(&fake, image.as_fd(), &env.image).is_err());
        assert_eq!(
            fake.log(),
            ["erofs directio", "erofs file"],
            "no loop device"
        );
    }

    /// Overlay: layers as fds (6.13+), else as paths of detached mounts (6.15+ takes those),
    /// else the image attached for the moment in a private dir, and detached again.
    #[test]
    fn overlay_falls_back_from_fds_to_paths_to_an_attached_image() {
        let env = setup();
        let dir = env.dir.path().join("attach");
        let (meta, data) = (env.dir.path().join("m"), env.dir.path().join("d"));
        for d in [&meta, &data] {
            std::fs::create_dir_all(d).unwrap();
        }
        let open = |p: &Path| {
            rustix::fs::open(p, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap()
        };
        let (meta, data) = (open(&meta), open(&data));
        let layers = Layers {
            meta: meta.as_fd(),
            data: data.as_fd(),
            upper: None,
            discard_upper: false,
        };
        let fake = Fake::new(&env, &["overlay fds"]);
        let (_, how) =
            overlay_mount(&fake, &env.image, &layers, VerityMode::Unavailable, &dir).unwrap();
        assert_eq!(how, LayerPassing::Paths);

        let fake = Fake::new(&env, &["overlay fds", "overlay paths"]);
        let (_, how) =
            overlay_mount(&fake, &env.image, &layers, VerityMode::Unavailable, &dir).unwrap();
        assert_eq!(how, LayerPassing::AttachedPaths);
        assert_eq!(
            fake.log(),
            [
                "overlay fds",
                "overlay paths",
                "attach (not pinned)",
                "overlay attached paths",
                "detach"
            ]
        );
        assert!(!dir.exists(), "the private dir is removed again");
    }
}
