//! Errors of distribution. Every error names what velo was doing and the URL or path.

use std::path::PathBuf;

use velo_image::ImageError;
use velo_objects::StoreError;

/// Anything that can go wrong while pushing, pulling, exporting or importing.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An image could not be read or written.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Not an OCI address velo understands.
    #[error("invalid registry address {text:?}: {reason}")]
    BadAddress {
        /// What the user typed.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry could not be reached at all.
    #[error("cannot reach the registry at {url} ({reason}){hint}")]
    Unreachable {
        /// The registry's base URL.
        url: String,
        /// The transport's answer.
        reason: String,
        /// A hint for the usual causes, starting with "; ".
        hint: String,
    },
    /// The registry answered with an error (after `attempts` tries, for a transient one).
    #[error("{url}: {op} failed{}: {reason}", after(*attempts))]
    Registry {
        /// The URL of the request (or the repository's).
        url: String,
        /// What velo was doing (for a blob: what it holds, and the address; `url` has its digest).
        op: String,
        /// The registry's or client's answer (the last one, after several attempts).
        reason: String,
        /// How many times the request was made.
        attempts: u32,
    },
    /// A setting (an environment variable) has a value velo cannot use.
    #[error("{0}")]
    BadSetting(String),
    /// What the registry (or a file) holds is not a velo snapshot velo can use.
    #[error("{url}: {reason}")]
    BadArtifact {
        /// Where it came from.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Bytes that arrived are not what the artifact says they are; nothing of them was stored.
    #[error("{what} is corrupt: {reason}; nothing from it was stored")]
    Corrupt {
        /// The object (and the blob it came in).
        what: String,
        /// What the check found.
        reason: String,
    },
    /// A pulled or imported image does not rebuild to itself with velo's writer, so velo will
    /// never hand it to the kernel.
    #[error(
        "image {digest} from {source_name} was refused: {reason} (velo only stores images its own \
         writer produces; nothing was stored under a ref)"
    )]
    ImageRefused {
        /// The image digest the artifact claims.
        digest: String,
        /// Where it came from.
        source_name: String,
        /// Why it was refused.
        reason: String,
    },
    /// A local file could not be read or written.
    #[error("{op} {}: {cause}", path.display())]
    Io {
        /// What velo was doing.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The system's answer.
        cause: std::io::Error,
    },
}

/// " after N attempts" when a request was made more than once.
fn after(attempts: u32) -> String {
    if attempts > 1 {
        format!(" after {attempts} attempts")
    } else {
        String::new()
    }
}

impl DistError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            cause: source,
        }
    }
}

/// Result of distribution operations.
pub type Result<T, E = DistError> = std::result::Result<T, E>;
