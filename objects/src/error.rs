//! Errors of the object store. Every error names the path and the operation.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;
use crate::fsutil::{OpenError, ReadError};

/// Anything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call on a store path or a source file failed.
    #[error("{op} {}: {cause}", path.display())]
    Io {
        /// What velo was doing, e.g. "open object".
        op: &'static str,
        /// The path it was doing it on.
        path: PathBuf,
        /// The system's answer (shown in the message; a field named `source` would also be chained as the cause, and printed twice).
        cause: io::Error,
    },
    /// No store exists at the given path.
    #[error("no velo store at {} (it is created by the first `velo snapshot`)", path.display())]
    NoStore {
        /// The store root.
        path: PathBuf,
    },
    /// A profile (`profiles/<image>`) cannot be read as one.
    #[error("profile {}: {reason} (remove it: it is only a read-ahead hint)", path.display())]
    CorruptProfile {
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `meta.json` is unreadable as a store description.
    #[error("store {}: meta.json is corrupt: {reason} (refusing to use this store)", path.display())]
    CorruptMeta {
        /// Path of meta.json.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The store was written by a newer, incompatible velo.
    #[error(
        "store {}: format version {found} (features {features:?}) is not supported by this velo \
         (it supports version {supported}); use a newer velo or another store",
        path.display()
    )]
    IncompatibleStore {
        /// Path of meta.json.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// Incompatible features this velo does not know.
        features: Vec<String>,
        /// The version this velo writes.
        supported: u32,
    },
    /// A string that should be a digest is not one.
    #[error("invalid digest {text:?}: {reason}")]
    InvalidDigest {
        /// The text given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A ref name is not acceptable.
    #[error("invalid ref name {name:?}: {reason}")]
    InvalidRef {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A tenant name velo does not accept.
    #[error("invalid tenant name {name:?}: {reason}")]
    InvalidTenant {
        /// The name given.
        name: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A ref does not exist.
    #[error("no ref {name:?} in store {}", store.display())]
    RefNotFound {
        /// The ref name.
        name: String,
        /// The store root.
        store: PathBuf,
    },
    /// A ref file exists but does not hold a digest.
    #[error("ref {name:?} ({}) is corrupt: {reason}", path.display())]
    CorruptRef {
        /// The ref name.
        name: String,
        /// The ref file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No image with that digest in the store.
    #[error("image {digest} is not in store {}", store.display())]
    ImageNotFound {
        /// The digest asked for.
        digest: String,
        /// The store root.
        store: PathBuf,
    },
    /// A source changed while velo copied it.
    #[error("{}: changed while being read ({what}); snapshot it again when it is quiet", path.display())]
    SourceChanged {
        /// The source path.
        path: PathBuf,
        /// What changed.
        what: String,
    },
    /// Bytes offered as a given object or image are not it (see [`crate::Store::store_verified`]).
    #[error(
        "{what}: expected {expected} ({size} bytes) but got {}; nothing was stored",
        match found {
            Some(d) => format!("bytes that hash to {d}"),
            None if *found_size < *size => format!("only {found_size} bytes"),
            None => "more bytes than that".to_owned(),
        }
    )]
    Mismatch {
        /// Where the bytes came from.
        what: String,
        /// The digest they should have.
        expected: Digest,
        /// The size they should have.
        size: u64,
        /// The digest they had, if they had the right size.
        found: Option<Digest>,
        /// How many bytes came.
        found_size: u64,
    },
    /// The store, or one of its areas, is owned by another user than the one velo runs as (root
    /// trusts only root's stores), or is writable by group or others: whoever can write it
    /// could swap its images and refs under this process.
    #[error(
        "store {}: {} {reason}, so {who} could swap its images and refs; refusing to use it. \
         Fix: {fix}",
        store.display(),
        path.display()
    )]
    UntrustedStore {
        /// The store root.
        store: PathBuf,
        /// The store root or the area found wanting.
        path: PathBuf,
        /// What is wrong with it, e.g. "is owned by uid 1000 (mode 700), not by root".
        reason: String,
        /// Who else could change it.
        who: String,
        /// How to fix it.
        fix: String,
    },
    /// A store entry that velo reads as a regular file is something else (a FIFO, a socket, a
    /// device…): velo never made it, and never opens it for reading, which could block forever.
    #[error("{} is {kind}, not a regular file; {fix}", path.display())]
    NotRegular {
        /// The store path.
        path: PathBuf,
        /// What it is, e.g. "a FIFO".
        kind: &'static str,
        /// What to do about it.
        fix: &'static str,
    },
    /// A store file is larger than any velo writes there; it is not read.
    #[error(
        "{} is {size} bytes, more than the {max} any velo writes there; refusing to read it \
         (remove it, or restore it from a backup)",
        path.display()
    )]
    TooLarge {
        /// The store path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The most velo reads there.
        max: u64,
    },
    /// A store entry has the wrong type or permissions.
    #[error("{}: {reason}", path.display())]
    Unexpected {
        /// The store path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl StoreError {
    /// Builds an [`StoreError::Io`] error.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            op,
            path: path.into(),
            cause: source.into(),
        }
    }
}

/// What to do about a store entry that is not a regular file (most can be removed by fsck).
pub(crate) const FIX_REPAIR: &str = "remove it or run `velo fsck --repair`";

impl StoreError {
    /// The error for `path`, which [`crate::fsutil::open_regular_beneath`] or
    /// [`crate::fsutil::read_capped`] refused; `op` names what velo was doing for other errors.
    pub(crate) fn from_open(op: &'static str, path: impl Into<PathBuf>, e: OpenError) -> Self {
        match e {
            OpenError::Sys(e) => Self::io(op, path, e),
            OpenError::NotRegular(ft) => Self::NotRegular {
                path: path.into(),
                kind: crate::fsutil::file_type_name(ft),
                fix: FIX_REPAIR,
            },
        }
    }

    /// The error for a read [`crate::fsutil::read_capped`] refused.
    pub(crate) fn from_read(op: &'static str, path: impl Into<PathBuf>, e: ReadError) -> Self {
        match e {
            ReadError::Sys(e) => Self::io(op, path, e),
            ReadError::TooLarge { size, max } => Self::TooLarge {
                path: path.into(),
                size,
                max,
            },
        }
    }
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Adds the operation and path to a bare I/O result.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T, E: Into<io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| StoreError::io(op, path, e))
    }
}
