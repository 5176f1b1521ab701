//! Errors of the image builder. Every error names the path and the operation.

use std::path::PathBuf;

use velo_objects::StoreError;

/// Anything that can go wrong while snapshotting or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A system call on a source path failed.
    #[error("{op} {}: {cause}", path.display())]
    Io {
        /// What velo was doing.
        op: &'static str,
        /// The path it was doing it on.
        path: PathBuf,
        /// The system's answer (shown in the message; a field named `source` would also be chained as the cause, and printed twice).
        cause: std::io::Error,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source is not something velo can snapshot.
    #[error("{}: {reason}", path.display())]
    BadSource {
        /// The source path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The source changed while velo read it.
    #[error("{}: changed while being snapshotted ({what}); snapshot it again when it is quiet", path.display())]
    Changed {
        /// The path that changed.
        path: PathBuf,
        /// What changed.
        what: String,
    },
    /// An image could not be written or read as composefs EROFS.
    #[error("image {what}: {reason}")]
    Format {
        /// Which image (a digest or path).
        what: String,
        /// What the composefs reader or writer said.
        reason: String,
    },
}

impl ImageError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: impl Into<std::io::Error>,
    ) -> Self {
        Self::Io {
            op,
            path: path.into(),
            cause: source.into(),
        }
    }
}

/// Result of image-builder operations.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;
