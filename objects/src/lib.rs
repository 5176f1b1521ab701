//! # velo-objects: Velo Rift's content-addressed store
//!
//! A store is a directory (default [`DEFAULT_STORE`]):
//!
//! ```text
//! meta.json          format version, fs-verity mode
//! objects/ab/cdef…   file contents, 0444, named by their fs-verity sha256 digest
//! images/<digest>    composefs EROFS images, named the same way
//! refs/<name…>       names → image digests
//! mounts/<token>/    a record (and for `--cow` the upper/work dirs) per live mount
//! cache/             rebuildable data (the stat cache)
//! quarantine/        damaged files moved aside, never deleted
//! tmp/               staging and writer markers
//! profiles/<digest>  what commands read first from an image (read-ahead hints)
//! lock               shared by writers and mounts, exclusive for GC
//! ```
//!
//! The root is 0700: snapshots may hold secrets. Every path is opened beneath the store's
//! dirfd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`. This crate knows nothing of
//! EROFS; it has no dependency on the `composefs` crate so the mount helper can use it.

mod cache;
pub use cache::IMAGE_CHECK_PREFIX;
mod digest;
mod error;
mod fsck;
pub mod fsutil;
mod gc;
mod ingest;
pub mod kverity;
mod lock;
mod meta;
mod mounts;
mod profile;
mod quota;
mod refs;
mod serde_path;
mod session;
mod staging;
mod store;
mod tenants;
mod verify;
pub mod verity;

pub use digest::Digest;
pub use error::{Result, StoreError};
pub use fsck::{Finding, FsckProgress, NOT_REGULAR};
pub use gc::{GcHooks, GcOptions, GcReport};
pub use ingest::{Kind, Pending, Stored};
pub use lock::StoreLock;
pub use meta::{FORMAT_VERSION, Meta, VerityMode};
pub use mounts::{
    Liveness, MountRecord, MountSlot, current_mnt_ns, mnt_ns_id, mnt_ns_populated,
    process_start_time,
};
pub use profile::{
    MAX_ENTRIES as MAX_PROFILE_ENTRIES, MAX_PROFILE_BYTES, Profile, ProfileEntry, ProfileError,
    ProfileOutcome,
};
pub use refs::{MAX_REF_LEN, validate_ref_name};
pub use session::{Recovery, WriteSession};
pub use staging::Staging;
pub use store::{Area, DEFAULT_STORE, Store, filesystem_supports_verity};
pub use tenants::{RootAttrs, Tenant, TenantDirs, validate_tenant_name};
pub use verify::Verdict;
