//! Errors of the mount helper. Each says what was refused or failed, where, and why.

use std::path::PathBuf;

use velo_objects::StoreError;

/// Anything that can go wrong while mounting or unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The caller lacks the privilege to mount.
    #[error(
        "{action} needs root (it makes kernel mounts); run it as root, e.g. with sudo. velo is never installed setuid"
    )]
    NotRoot {
        /// What was attempted, e.g. "velo mount".
        action: String,
    },
    /// A system call failed.
    #[error("{op} {}: {cause}", path.display())]
    Io {
        /// What velo was doing.
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The system's answer (shown in the message; a field named `source` would also be chained as the cause, and printed twice).
        cause: std::io::Error,
    },
    /// The target is not acceptable.
    #[error("mount target {}: {reason}", path.display())]
    BadTarget {
        /// The target path.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// The upper dir is not acceptable.
    #[error("upper dir {}: {reason}", path.display())]
    BadUpper {
        /// The upper dir.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// The kernel lacks something velo needs.
    #[error("the kernel cannot {what}: {detail}")]
    Kernel {
        /// What velo asked of it.
        what: String,
        /// The kernel's answer (errno and its log).
        detail: String,
        /// The errno, where the kernel gave one (to act on, not only to print).
        errno: Option<rustix::io::Errno>,
    },
    /// The path is not a mount velo made.
    #[error("{}: {reason}; velo only unmounts what it mounted", path.display())]
    NotVeloMount {
        /// The path given.
        path: PathBuf,
        /// What is there instead.
        reason: String,
    },
    /// The image failed a check before mounting.
    #[error("image {digest} refused: {reason}")]
    ImageRefused {
        /// The image.
        digest: String,
        /// Why.
        reason: String,
    },
    /// A store error.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl MountError {
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

/// Result of mount-helper operations.
pub type Result<T, E = MountError> = std::result::Result<T, E>;
