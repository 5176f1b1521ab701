//! Tenants: a named, persistent copy-on-write layer over one image, kept in the store
//! (`tenants/<name>/{upper,work,meta.json}`). The mount helper mounts them; this module keeps
//! their state.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, open_dir_beneath, open_regular_beneath};
use crate::store::{Area, Store};

/// A tenant's `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// The image it was created on; it is never mounted over another.
    pub image: Digest,
    /// The ref it was created from, if any (for display).
    #[serde(default)]
    pub from_ref: Option<String>,
    /// Seconds since the epoch at creation.
    pub created: u64,
    /// The size limit asked for the upper dir, in bytes.
    #[serde(default)]
    pub size_limit: Option<u64>,
    /// How the limit is enforced: `project quota <id>`, or why it is not.
    #[serde(default)]
    pub limit_enforcement: Option<String>,
}

/// The most velo reads of a tenant's `meta.json`: a real one holds a few hundred bytes.
pub const MAX_TENANT_META_BYTES: u64 = 64 << 10;

/// Checks a tenant name: `[A-Za-z0-9._-]`, 1-64 characters, not starting with `.`.
pub fn validate_tenant_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidTenant {
            name: name.to_owned(),
            reason: "a tenant name has 1-64 letters, digits or `._-` and does not start with `.`",
        })
    }
}

/// What a tenant's upper root takes from its image's root, so the mount's root looks like
/// the snapshot's (overlayfs shows the upper root's owner, mode and times).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootAttrs {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
}

/// Open handles on a tenant's directories.
#[derive(Debug)]
pub struct TenantDirs {
    /// `tenants/<name>/`.
    pub dir: OwnedFd,
    /// Its upper dir.
    pub upper: OwnedFd,
    /// Its overlay work dir.
    pub work: OwnedFd,
    /// Absolute path of the upper dir.
    pub upper_path: PathBuf,
}

impl Store {
    /// Creates a tenant over `image` (which must exist).
    pub fn create_tenant(
        &self,
        name: &str,
        image: Digest,
        from_ref: Option<String>,
    ) -> Result<Tenant> {
        self.create_tenant_limited(name, image, from_ref, None)
    }

    /// Creates a tenant over `image` whose upper dir may hold at most `size_limit` bytes, where
    /// the store's filesystem enforces project quotas (see [`Tenant::limit_enforcement`]).
    pub fn create_tenant_limited(
        &self,
        name: &str,
        image: Digest,
        from_ref: Option<String>,
        size_limit: Option<u64>,
    ) -> Result<Tenant> {
        validate_tenant_name(name)?;
        self.open_image(&image)?;
        let tenants = self.open_area(Area::Tenants)?;
        let path = self.area_path(Area::Tenants).join(name);
        match rustix::fs::mkdirat(&tenants, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let reason = if self.is_half_made_tenant(name) {
                    format!(
                        "tenant {name:?} is left from a create that did not finish; `velo \
                         tenant rm {name}` removes it"
                    )
                } else {
                    format!("tenant {name:?} already exists")
                };
                return Err(StoreError::Unexpected { path, reason });
            }
            Err(e) => return Err(StoreError::io("create tenant", path, e)),
        }
        // Anything failing from here (a full disk) takes the half-made tenant away again, so
        // the name can be used — and is not listed — afterwards.
        let made = (|| {
            let dir = open_dir_beneath(tenants.as_fd(), name).ctx("open tenant", &path)?;
            for sub in ["upper", "work"] {
                rustix::fs::mkdirat(&dir, sub, Mode::from_raw_mode(0o755))
                    .ctx("create", path.join(sub))?;
            }
            let limit_enforcement =
                size_limit.map(|bytes| self.limit_tenant(dir.as_fd(), name, bytes));
            let tenant = Tenant {
                name: name.to_owned(),
                image,
                from_ref,
                created: fsutil::now_ns() as u64 / 1_000_000_000,
                size_limit,
                limit_enforcement,
            };
            let data = serde_json::to_vec_pretty(&tenant).map_err(|e| StoreError::Unexpected {
                path: path.join("meta.json"),
                reason: e.to_string(),
            })?;
            // meta.json last: a tenant without one is a half-made leftover.
            let (fd, _) = open_regular_beneath(
                dir.as_fd(),
                ".meta.json.tmp",
                OFlags::CREATE | OFlags::TRUNC | OFlags::WRONLY,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| StoreError::from_open("create", path.join("meta.json"), e))?;
            fsutil::pwrite_all(fd.as_fd(), &data, 0).ctx("write", path.join("meta.json"))?;
            rustix::fs::fsync(&fd).ctx("fsync", path.join("meta.json"))?;
            rustix::fs::renameat(&dir, ".meta.json.tmp", &dir, "meta.json")
                .ctx("write", path.join("meta.json"))?;
            rustix::fs::fsync(&dir).ctx("fsync", &path)?;
            Ok(tenant)
        })();
        if made.is_err() {
            let _ = fsutil::remove_tree_at(tenants.as_fd(), name.as_ref());
        }
        made
    }

    /// Puts a new tenant's upper and work dirs in a project with a block limit; returns how the
    /// limit is enforced, or why it is not.
    fn limit_tenant(&self, dir: std::os::fd::BorrowedFd<'_>, name: &str, bytes: u64) -> String {
        if let Err(why) = crate::quota::supported(dir) {
            return format!("not enforced: {why}");
        }
        // A project id derived from the store and the name; 0 is "no project".
        let h = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.root().hash(&mut h);
            name.hash(&mut h);
            (h.finish() as u32 & 0x7fff_ffff).max(1)
        };
        let result = (|| {
            for sub in ["upper", "work"] {
                let fd = open_dir_beneath(dir, sub)?;
                crate::quota::set_project(fd.as_fd(), h)?;
            }
            crate::quota::set_limit(dir, h, bytes)
        })();
        match result {
            Ok(()) => format!("project quota {h}"),
            Err(e) => format!("not enforced: setting the project quota failed ({e})"),
        }
    }

    /// A tenant's meta.
    pub fn tenant(&self, name: &str) -> Result<Tenant> {
        validate_tenant_name(name)?;
        let tenants = self.open_area(Area::Tenants)?;
        let path = self.area_path(Area::Tenants).join(name).join("meta.json");
        let Some(data) = fsutil::read_store_file(
            tenants.as_fd(),
            format!("{name}/meta.json"),
            &path,
            MAX_TENANT_META_BYTES,
        )?
        else {
            return Err(StoreError::Unexpected {
                path: self.area_path(Area::Tenants).join(name),
                reason: format!("no tenant {name:?} (see `velo tenant ls`)"),
            });
        };
        serde_json::from_slice(&data).map_err(|e| StoreError::Unexpected {
            path,
            reason: format!("unreadable tenant meta: {e}"),
        })
    }

    /// True if the tenant directory `name` has no meta.json (its creation was interrupted).
    pub(crate) fn tenant_meta_missing(&self, name: &str) -> bool {
        self.open_area(Area::Tenants).is_ok_and(|tenants| {
            matches!(
                rustix::fs::statat(
                    &tenants,
                    format!("{name}/meta.json").as_str(),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                ),
                Err(Errno::NOENT)
            )
        })
    }

    /// All tenants (or why one can't be read).
    pub fn list_tenants(&self) -> Result<Vec<(String, Result<Tenant>)>> {
        let tenants = self.open_area(Area::Tenants)?;
        let mut out: Vec<(String, Result<Tenant>)> = fsutil::list_dir(tenants.as_fd())
            .ctx("list", self.area_path(Area::Tenants))?
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .filter(|n| validate_tenant_name(n).is_ok())
            .map(|n| {
                let t = self.tenant(&n);
                (n, t)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Opens a tenant's directories.
    pub fn tenant_dirs(&self, name: &str) -> Result<TenantDirs> {
        self.tenant(name)?;
        let tenants = self.open_area(Area::Tenants)?;
        let path = self.area_path(Area::Tenants).join(name);
        let dir = open_dir_beneath(tenants.as_fd(), name).ctx("open tenant", &path)?;
        let upper = open_dir_beneath(dir.as_fd(), "upper").ctx("open", path.join("upper"))?;
        let work = open_dir_beneath(dir.as_fd(), "work").ctx("open", path.join("work"))?;
        Ok(TenantDirs {
            dir,
            upper,
            work,
            upper_path: path.join("upper"),
        })
    }

    /// Drops all of a tenant's writes (the caller makes sure it is not mounted).
    pub fn reset_tenant(&self, name: &str) -> Result<()> {
        let dirs = self.tenant_dirs(name)?;
        let path = self.area_path(Area::Tenants).join(name);
        for sub in ["upper", "work"] {
            fsutil::remove_tree_at(dirs.dir.as_fd(), sub.as_ref()).ctx("clear", path.join(sub))?;
            rustix::fs::mkdirat(&dirs.dir, sub, Mode::from_raw_mode(0o755))
                .ctx("create", path.join(sub))?;
        }
        Ok(())
    }

    /// Gives the tenant's upper root `attrs` (its image root's): after `create` and `reset`,
    /// whose fresh upper dir would otherwise show the time it was made.
    pub fn set_tenant_root(&self, name: &str, attrs: &RootAttrs) -> Result<()> {
        let dirs = self.tenant_dirs(name)?;
        let path = &dirs.upper_path;
        rustix::fs::fchown(
            &dirs.upper,
            Some(rustix::fs::Uid::from_raw(attrs.uid)),
            Some(rustix::fs::Gid::from_raw(attrs.gid)),
        )
        .ctx("chown", path)?;
        rustix::fs::fchmod(&dirs.upper, Mode::from_raw_mode(attrs.mode & 0o7777))
            .ctx("chmod", path)?;
        let mtime = rustix::fs::Timespec {
            tv_sec: attrs.mtime.0,
            tv_nsec: attrs.mtime.1.into(),
        };
        let times = rustix::fs::Timestamps {
            last_access: mtime,
            last_modification: mtime,
        };
        rustix::fs::futimens(&dirs.upper, &times).ctx("set times of", path)
    }

    /// Removes a tenant and its writes (the caller makes sure it is not mounted) — also one a
    /// killed `create` left half-made (a directory without `meta.json`, which no mount uses).
    pub fn remove_tenant(&self, name: &str) -> Result<()> {
        if let Err(e) = self.tenant(name)
            && !self.is_half_made_tenant(name)
        {
            return Err(e);
        }
        let tenants = self.open_area(Area::Tenants)?;
        fsutil::remove_tree_at(tenants.as_fd(), name.as_ref())
            .ctx("remove tenant", self.area_path(Area::Tenants).join(name))
    }

    /// True if `tenants/<name>` is a directory without `meta.json`: a `create` that did not
    /// finish.
    pub fn is_half_made_tenant(&self, name: &str) -> bool {
        validate_tenant_name(name).is_ok()
            && self.open_area(Area::Tenants).is_ok_and(|t| {
                open_dir_beneath(t.as_fd(), name).is_ok_and(|dir| {
                    rustix::fs::statat(&dir, "meta.json", rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                        .is_err_and(|e| e == Errno::NOENT)
                })
            })
    }

    /// Disk space used by a tenant's upper dir (allocated blocks of its files).
    pub fn tenant_upper_bytes(&self, name: &str) -> Result<u64> {
        let dirs = self.tenant_dirs(name)?;
        fn walk(dir: std::os::fd::BorrowedFd<'_>) -> rustix::io::Result<u64> {
            let mut total = 0;
            for name in fsutil::list_dir(dir)? {
                let st = rustix::fs::statat(
                    dir,
                    name.as_os_str(),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory
                {
                    if let Ok(sub) = open_dir_beneath(dir, &name) {
                        total += walk(sub.as_fd())?;
                    }
                } else {
                    total += st.st_blocks as u64 * 512;
                }
            }
            Ok(total)
        }
        walk(dirs.upper.as_fd()).ctx("measure", dirs.upper_path)
    }
}
