//! # velo-mount: the privileged part of Velo Rift
//!
//! Mounts an image of a [`velo_objects::Store`]: the composefs EROFS image as a detached,
//! file-backed, read-only mount (`directio` where the kernel has it), stacked under overlayfs
//! with the store's `objects/` as a data-only lower layer (`metacopy=on,redirect_dir=on`, the
//! fs-verity requirement always explicit), `nosuid,nodev`, read-only unless copy-on-write.
//! Built on the new mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`) so the intermediate
//! EROFS mount is never visible in the filesystem. Kernel features are probed at run time.
//!
//! It trusts nothing it is handed: the target is opened by fd and must be a real directory;
//! only images in the store under their digest are mounted; store paths are opened beneath
//! the store's dirfd; `umount` removes only mounts whose mountinfo says velo made them,
//! identified by mount ID through an fd.

mod error;
pub mod kernel;
pub mod lease;
mod loopdev;
mod mount;
pub mod mountinfo;
pub mod privilege;
pub mod profile;
pub mod protocol;
pub mod service;
mod sys;
mod target;
mod umount;
pub mod units;

pub use error::{MountError, Result};
pub use mount::{
    ImageBacking, LayerPassing, MountReport, MountRequest, ProbeReport, SOURCE_PREFIX, Writes,
    enter_private_namespace, liveness, liveness_check, mount_image, prefetch_image, probe,
    tenant_mount_point, work_dir_name,
};
pub use umount::{UmountReport, umount};
