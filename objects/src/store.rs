//! Opening and creating a store: its root dirfd, `meta.json` and well-known directories.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, OpenError, open_beneath, open_dir_beneath, open_regular_beneath};
use crate::kverity;
use crate::meta::{FORMAT_NAME, FORMAT_VERSION, MAX_META_BYTES, Meta, VerityMode};

/// The store's default location.
pub const DEFAULT_STORE: &str = "/var/lib/velo";

/// Directories every store has, created with the store.
pub(crate) const DIRS: &[&str] = &[
    "objects",
    "images",
    "refs",
    "tmp",
    "mounts",
    "cache",
    "quarantine",
    "history",
    "usage",
    "tenants",
    "locks",
    "profiles",
];

/// An open store. All access goes through its root dirfd.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    root_fd: OwnedFd,
    objects_fd: OwnedFd,
    images_fd: OwnedFd,
    tmp_fd: OwnedFd,
    fanout: Box<[OnceLock<OwnedFd>]>,
    meta: Meta,
    pub(crate) reflink: crate::ingest::ReflinkState,
}

/// The store's well-known directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// `objects/`: file contents by digest (fan-out by the first two hex digits).
    Objects,
    /// `images/`: EROFS images by digest.
    Images,
    /// `refs/`: names → image digests.
    Refs,
    /// `tmp/`: staging; writer markers.
    Tmp,
    /// `mounts/`: one record (and, for `--cow`, the upper/work dirs) per live mount.
    Mounts,
    /// `cache/`: the stat cache and other rebuildable data.
    Cache,
    /// `quarantine/`: damaged objects moved aside by recovery or `fsck --repair`.
    Quarantine,
    /// `history/<ref>`: images a ref pointed at before (kept until GC's keep policy drops them).
    History,
    /// `usage/<ref>`: its mtime is the ref's last use (for LRU expiry of `deps/*` refs).
    Usage,
    /// `tenants/<name>/`: a tenant's upper and work dirs and its meta.json.
    Tenants,
    /// `locks/<name>`: flock files (e.g. one build of a dependency key at a time).
    Locks,
    /// `profiles/<image digest>`: what commands read first from an image (see
    /// [`crate::Profile`]).
    Profiles,
}

impl Area {
    /// Directory name under the store root.
    pub fn dir_name(self) -> &'static str {
        match self {
            Area::Objects => "objects",
            Area::Images => "images",
            Area::Refs => "refs",
            Area::Tmp => "tmp",
            Area::Mounts => "mounts",
            Area::Cache => "cache",
            Area::Quarantine => "quarantine",
            Area::History => "history",
            Area::Usage => "usage",
            Area::Tenants => "tenants",
            Area::Locks => "locks",
            Area::Profiles => "profiles",
        }
    }
}

impl Store {
    /// Opens an existing store; a missing one is [`StoreError::NoStore`].
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_inner(root.as_ref(), false)
    }

    /// Opens a store, creating it (mode 0700) if it does not exist yet.
    pub fn open_or_create(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_inner(root.as_ref(), true)
    }

    fn open_inner(root: &Path, create: bool) -> Result<Self> {
        let root = std::path::absolute(root).ctx("resolve store path", root)?;
        if create {
            match std::fs::symlink_metadata(&root) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(parent) = root.parent() {
                        std::fs::create_dir_all(parent).ctx("create store parent", parent)?;
                    }
                    match rustix::fs::mkdir(&root, Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(StoreError::io("create store", &root, e)),
                    }
                }
                Err(e) => return Err(StoreError::io("stat store", &root, e)),
                Ok(_) => {}
            }
        }
        let root_fd = match rustix::fs::open(
            &root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(StoreError::NoStore { path: root }),
            Err(e) => return Err(StoreError::io("open store", &root, e)),
        };
        // Canonical, so that paths velo compares with mountinfo's (upper dirs) match.
        let root = std::fs::canonicalize(&root).unwrap_or(root);
        // Checked by the fd just opened, before anything in it is read: only the user velo runs
        // as (root: only root) may be able to change the store.
        check_trusted(&root, &root, root_fd.as_fd())?;
        let meta = match read_meta(&root, root_fd.as_fd())? {
            Some(meta) => meta,
            None if create => init_store(&root, root_fd.as_fd())?,
            None => return Err(StoreError::NoStore { path: root }),
        };
        check_areas_trusted(&root, root_fd.as_fd())?;
        let open = |area: Area| {
            open_dir_beneath(root_fd.as_fd(), area.dir_name())
                .ctx("open store directory", root.join(area.dir_name()))
        };
        let objects_fd = open(Area::Objects)?;
        let images_fd = open(Area::Images)?;
        let tmp_fd = open(Area::Tmp)?;
        Ok(Self {
            fanout: (0..256).map(|_| OnceLock::new()).collect(),
            root,
            root_fd,
            objects_fd,
            images_fd,
            tmp_fd,
            meta,
            reflink: Default::default(),
        })
    }

    /// The store root, absolute.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store root's dirfd.
    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root_fd.as_fd()
    }

    /// The contents of `meta.json`.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Whether objects here carry kernel fs-verity.
    pub fn verity(&self) -> VerityMode {
        self.meta.verity
    }

    /// Reads every `objects/xx/` directory through, so that their blocks are in the page cache.
    ///
    /// After a reboot or a dropped page cache, each object a command opens first costs a
    /// synchronous read of a block of its `objects/xx/` directory (there are 256 of them, and
    /// a program's files spread over all): node importing 13 packages cold waited on ~1,000
    /// more reads than from a local tree. Reading the directories ahead, beside the starting
    /// command, takes most of that off its path. Best effort.
    pub fn prefetch_object_dirs(&self) {
        let Ok(objects) = self.open_area(Area::Objects) else {
            return;
        };
        let Ok(names) = fsutil::list_dir(objects.as_fd()) else {
            return;
        };
        for name in names {
            if let Ok(dir) = rustix::fs::openat(
                &objects,
                name.as_os_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) && let Ok(entries) = rustix::fs::Dir::read_from(&dir)
            {
                entries.for_each(drop);
            }
        }
    }

    /// The absolute path of a store area.
    pub fn area_path(&self, area: Area) -> PathBuf {
        self.root.join(area.dir_name())
    }

    /// A fresh dirfd of a store area (created if this store predates it).
    pub fn open_area(&self, area: Area) -> Result<OwnedFd> {
        match open_dir_beneath(self.root_fd(), area.dir_name()) {
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(
                    self.root_fd(),
                    area.dir_name(),
                    Mode::from_raw_mode(0o700),
                ) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => {
                        return Err(StoreError::io(
                            "create store directory",
                            self.area_path(area),
                            e,
                        ));
                    }
                }
                open_dir_beneath(self.root_fd(), area.dir_name())
            }
            other => other,
        }
        .ctx("open store directory", self.area_path(area))
    }

    pub(crate) fn objects_fd(&self) -> BorrowedFd<'_> {
        self.objects_fd.as_fd()
    }

    pub(crate) fn images_fd(&self) -> BorrowedFd<'_> {
        self.images_fd.as_fd()
    }

    pub(crate) fn tmp_fd(&self) -> BorrowedFd<'_> {
        self.tmp_fd.as_fd()
    }

    /// The dirfd of an object's fan-out directory, opened once per store handle.
    pub(crate) fn fanout_fd(&self, digest: &Digest) -> Result<BorrowedFd<'_>> {
        let idx = digest.as_bytes()[0] as usize;
        if let Some(fd) = self.fanout[idx].get() {
            return Ok(fd.as_fd());
        }
        let name = digest.fanout();
        let fd = match open_dir_beneath(self.objects_fd(), &name) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(
                    self.objects_fd(),
                    name.as_str(),
                    Mode::from_raw_mode(0o700),
                ) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => {
                        return Err(StoreError::io(
                            "create fan-out dir",
                            self.object_path(digest),
                            e,
                        ));
                    }
                }
                open_dir_beneath(self.objects_fd(), &name).ctx(
                    "open fan-out dir",
                    self.area_path(Area::Objects).join(&name),
                )?
            }
            Err(e) => {
                return Err(StoreError::io(
                    "open fan-out dir",
                    self.area_path(Area::Objects).join(&name),
                    e,
                ));
            }
        };
        Ok(self.fanout[idx].get_or_init(|| fd).as_fd())
    }

    /// The absolute path of an object (for messages and for the kernel).
    pub fn object_path(&self, digest: &Digest) -> PathBuf {
        self.area_path(Area::Objects).join(digest.object_rel_path())
    }

    /// The absolute path of an image.
    pub fn image_path(&self, digest: &Digest) -> PathBuf {
        self.area_path(Area::Images).join(digest.to_hex())
    }

    /// Opens an image read-only beneath the store; a missing one is [`StoreError::ImageNotFound`],
    /// anything but a regular file [`StoreError::NotRegular`] (never opened for reading).
    pub fn open_image(&self, digest: &Digest) -> Result<OwnedFd> {
        match open_regular_beneath(
            self.images_fd(),
            digest.to_hex(),
            OFlags::RDONLY,
            Mode::empty(),
        ) {
            Ok((fd, _)) => Ok(fd),
            Err(OpenError::Sys(Errno::NOENT)) => Err(StoreError::ImageNotFound {
                digest: digest.to_hex(),
                store: self.root.clone(),
            }),
            Err(e) => Err(StoreError::from_open(
                "open image",
                self.image_path(digest),
                e,
            )),
        }
    }

    /// Opens an object read-only beneath the store (a regular file only, as
    /// [`Store::open_image`]).
    pub fn open_object(&self, digest: &Digest) -> Result<OwnedFd> {
        open_regular_beneath(
            self.fanout_fd(digest)?,
            digest.object_file_name(),
            OFlags::RDONLY,
            Mode::empty(),
        )
        .map(|(fd, _)| fd)
        .map_err(|e| StoreError::from_open("open object", self.object_path(digest), e))
    }

    /// Digests of all images in the store.
    pub fn list_images(&self) -> Result<Vec<Digest>> {
        let names =
            fsutil::list_dir(self.images_fd()).ctx("list images", self.area_path(Area::Images))?;
        let mut out: Vec<Digest> = names
            .iter()
            .filter_map(|n| n.to_str().and_then(|s| Digest::parse(s).ok()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Size in bytes of an image file.
    pub fn image_size(&self, digest: &Digest) -> Result<u64> {
        let fd = self.open_image(digest)?;
        let st = rustix::fs::fstat(&fd).ctx("stat image", self.image_path(digest))?;
        Ok(st.st_size as u64)
    }
}

/// Why a store entry owned by `uid` with `mode` cannot be trusted by a process whose effective
/// uid is `euid`: root trusts only root's (uid 0), any other user only their own, and nobody an
/// entry that its group or others may write. `(what is wrong, who else could change it)`, or
/// `None` if it can be trusted.
pub(crate) fn untrusted(uid: u32, mode: u32, euid: u32) -> Option<(String, String)> {
    let perms = mode & 0o7777;
    let me = if euid == 0 {
        "root".to_owned()
    } else {
        format!("uid {euid} (the user velo runs as)")
    };
    if uid != euid {
        return Some((
            format!("is owned by uid {uid} (mode {perms:o}), not by {me}"),
            format!("uid {uid}"),
        ));
    }
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "its group and every other user",
            (true, false) => "every member of its group",
            _ => "every other user",
        };
        return Some((
            format!("is writable by {who} (mode {perms:o})"),
            who.to_owned(),
        ));
    }
    None
}

/// Refuses a store entry (`fd`, named `path`) that [`untrusted`] finds wanting. By `fstat` of
/// the fd the store goes on to use, never by looking the path up again.
fn check_trusted(root: &Path, path: &Path, fd: BorrowedFd<'_>) -> Result<()> {
    let st = rustix::fs::fstat(fd).ctx("stat", path)?;
    let euid = rustix::process::geteuid().as_raw();
    let Some((reason, who)) = untrusted(st.st_uid, st.st_mode, euid) else {
        return Ok(());
    };
    let fix = if euid == 0 {
        format!(
            "if you trust what it holds, `chown -R root:root {r} && chmod 700 {r}`; or use a \
             store of your own (--store DIR)",
            r = root.display()
        )
    } else {
        "use a store of your own (--store DIR, created by the first `velo snapshot`), or run \
         velo as the store's owner"
            .to_owned()
    };
    Err(StoreError::UntrustedStore {
        store: root.to_owned(),
        path: path.to_owned(),
        reason,
        who,
        fix,
    })
}

/// Checks every well-known area the store has (a missing one is created later, by this user),
/// each by the fd it was opened as.
fn check_areas_trusted(root: &Path, root_fd: BorrowedFd<'_>) -> Result<()> {
    for dir in DIRS {
        let path = root.join(dir);
        match open_dir_beneath(root_fd, dir) {
            Ok(fd) => check_trusted(root, &path, fd.as_fd())?,
            Err(Errno::NOENT) => {}
            Err(e) => return Err(StoreError::io("open store directory", path, e)),
        }
    }
    Ok(())
}

fn read_meta(root: &Path, root_fd: BorrowedFd<'_>) -> Result<Option<Meta>> {
    let path = root.join("meta.json");
    let (fd, st) = match open_regular_beneath(root_fd, "meta.json", OFlags::RDONLY, Mode::empty()) {
        Ok(opened) => opened,
        Err(OpenError::Sys(Errno::NOENT)) => return Ok(None),
        Err(OpenError::NotRegular(ft)) => {
            return Err(StoreError::NotRegular {
                path,
                kind: fsutil::file_type_name(ft),
                fix: "velo never makes anything else there: restore the store's meta.json",
            });
        }
        Err(OpenError::Sys(e)) => return Err(StoreError::io("open", &path, e)),
    };
    check_trusted(root, &path, fd.as_fd())?;
    let text = fsutil::read_capped(fd.as_fd(), &st, MAX_META_BYTES).map_err(|e| match e {
        fsutil::ReadError::TooLarge { size, max } => StoreError::TooLarge {
            path: path.clone(),
            size,
            max,
        },
        fsutil::ReadError::Sys(e) => StoreError::CorruptMeta {
            path: path.clone(),
            reason: format!("unreadable: {e}"),
        },
    })?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| StoreError::CorruptMeta {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    // Check the version before the schema, so a newer store gets "too new", not "corrupt".
    let format = value.get("format").and_then(|v| v.as_str());
    if format != Some(FORMAT_NAME) {
        return Err(StoreError::CorruptMeta {
            path,
            reason: format!("\"format\" is {format:?}, expected {FORMAT_NAME:?}"),
        });
    }
    let version = value.get("version").and_then(|v| v.as_u64());
    let Some(version) = version.and_then(|v| u32::try_from(v).ok()) else {
        return Err(StoreError::CorruptMeta {
            path,
            reason: "\"version\" is missing or not a number".into(),
        });
    };
    let meta: Meta = serde_json::from_value(value.clone()).map_err(|e| {
        if version > FORMAT_VERSION {
            StoreError::IncompatibleStore {
                path: path.clone(),
                found: version,
                features: vec![],
                supported: FORMAT_VERSION,
            }
        } else {
            StoreError::CorruptMeta {
                path: path.clone(),
                reason: e.to_string(),
            }
        }
    })?;
    let unknown = meta.unknown_incompat();
    if version > FORMAT_VERSION || !unknown.is_empty() {
        return Err(StoreError::IncompatibleStore {
            path,
            found: version,
            features: unknown,
            supported: FORMAT_VERSION,
        });
    }
    Ok(Some(meta))
}

/// Creates the store's directories and, last, its meta.json (a store exists once meta.json does).
fn init_store(root: &Path, root_fd: BorrowedFd<'_>) -> Result<Meta> {
    // The store may hold secrets (.npmrc, .env): nobody else may reach it.
    rustix::fs::fchmod(root_fd, Mode::from_raw_mode(0o700)).ctx("chmod 0700", root)?;
    for dir in DIRS {
        match rustix::fs::mkdirat(root_fd, *dir, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(StoreError::io("create store directory", root.join(dir), e)),
        }
    }
    let lock = root.join("lock");
    match open_beneath(
        root_fd,
        "lock",
        OFlags::CREATE | OFlags::RDWR,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(_) => {}
        Err(e) => return Err(StoreError::io("create", lock, e)),
    }
    let tmp_fd = open_dir_beneath(root_fd, "tmp").ctx("open", root.join("tmp"))?;
    let meta = Meta::new(probe_verity(tmp_fd.as_fd()));
    let text = serde_json::to_vec_pretty(&meta).map_err(|e| StoreError::CorruptMeta {
        path: root.join("meta.json"),
        reason: e.to_string(),
    })?;
    // Publish with link(2), which never replaces: if another process created the store at the
    // same moment, its meta.json wins and we read it back.
    let tmp_name = fsutil::unique_name("meta-");
    let path = root.join("meta.json");
    {
        let fd = open_beneath(
            tmp_fd.as_fd(),
            &tmp_name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY,
            Mode::from_raw_mode(0o644),
        )
        .ctx("create", root.join("tmp").join(&tmp_name))?;
        fsutil::pwrite_all(fd.as_fd(), &text, 0).ctx("write", &path)?;
        rustix::fs::fsync(&fd).ctx("fsync", &path)?;
    }
    let linked = rustix::fs::linkat(
        tmp_fd.as_fd(),
        tmp_name.as_str(),
        root_fd,
        "meta.json",
        rustix::fs::AtFlags::empty(),
    );
    let _ = rustix::fs::unlinkat(
        tmp_fd.as_fd(),
        tmp_name.as_str(),
        rustix::fs::AtFlags::empty(),
    );
    match linked {
        Ok(()) => {
            rustix::fs::fsync(root_fd).ctx("fsync", root)?;
            Ok(meta)
        }
        Err(Errno::EXIST) => read_meta(root, root_fd)?.ok_or(StoreError::NoStore {
            path: root.to_owned(),
        }),
        Err(e) => Err(StoreError::io("publish", path, e)),
    }
}

/// Whether fs-verity can be enabled on a file in this directory's filesystem.
pub(crate) fn probe_verity(dir: BorrowedFd<'_>) -> VerityMode {
    let name = fsutil::unique_name("verity-probe-");
    let result = (|| -> rustix::io::Result<()> {
        {
            let fd = rustix::fs::openat(
                dir,
                name.as_str(),
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            fsutil::pwrite_all(fd.as_fd(), b"velo verity probe", 0)?;
        }
        let fd = rustix::fs::openat(
            dir,
            name.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        kverity::enable(fd.as_fd())?;
        kverity::measure(fd.as_fd()).map(|_| ())
    })();
    let _ = rustix::fs::unlinkat(dir, name.as_str(), rustix::fs::AtFlags::empty());
    match result {
        Ok(()) => VerityMode::Enabled,
        Err(_) => VerityMode::Unavailable,
    }
}

/// Probes whether the filesystem holding `dir` supports fs-verity, without a store.
pub fn filesystem_supports_verity(dir: &Path) -> Result<bool> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ctx("open", dir)?;
    Ok(probe_verity(fd.as_fd()) == VerityMode::Enabled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_trusts_only_root_and_users_only_themselves() {
        assert_eq!(untrusted(0, 0o40700, 0), None);
        assert_eq!(untrusted(0, 0o40755, 0), None, "readable is not writable");
        let (reason, who) = untrusted(65534, 0o40700, 0).unwrap();
        assert!(reason.contains("owned by uid 65534") && reason.contains("not by root"));
        assert_eq!(who, "uid 65534");
        let (reason, _) = untrusted(0, 0o40770, 0).unwrap();
        assert!(
            reason.contains("writable by every member of its group"),
            "{reason}"
        );
        let (reason, _) = untrusted(0, 0o40702, 0).unwrap();
        assert!(reason.contains("every other user"), "{reason}");
        // A non-root user: their own store only.
        assert_eq!(untrusted(1000, 0o40700, 1000), None);
        assert!(
            untrusted(0, 0o40700, 1000).is_some(),
            "root's store, for a user"
        );
        assert!(untrusted(1001, 0o40700, 1000).is_some());
        assert!(untrusted(1000, 0o40720, 1000).is_some());
    }

    /// As root (skipped otherwise): a store root or area owned by another user, or writable by
    /// the group, is refused when opened, with the fix in the message.
    #[test]
    fn a_store_another_user_could_change_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED a_store_another_user_could_change_is_refused: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        drop(Store::open_or_create(&root).unwrap());
        let nobody = Some(rustix::fs::Uid::from_raw(65534));
        let chown = |p: &Path, uid| rustix::fs::chown(p, uid, None).unwrap();
        let refused = |want: &Path| match Store::open(&root) {
            Err(e @ StoreError::UntrustedStore { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&format!("{} ", want.display()))
                        && text.contains("chown -R root:root"),
                    "{text}"
                );
            }
            other => panic!("expected a refusal naming {}: {other:?}", want.display()),
        };
        chown(&root, nobody);
        refused(&root);
        chown(&root, Some(rustix::fs::Uid::ROOT));
        Store::open(&root).unwrap();
        chown(&root.join("images"), nobody);
        refused(&root.join("images"));
        chown(&root.join("images"), Some(rustix::fs::Uid::ROOT));
        rustix::fs::chmod(root.join("refs"), Mode::from_raw_mode(0o770)).unwrap();
        refused(&root.join("refs"));
        rustix::fs::chmod(root.join("refs"), Mode::from_raw_mode(0o700)).unwrap();
        chown(&root.join("meta.json"), nobody);
        refused(&root.join("meta.json"));
        chown(&root.join("meta.json"), Some(rustix::fs::Uid::ROOT));
        Store::open(&root).unwrap();
    }
}
