//! # velo-distribution: snapshots beyond one machine
//!
//! * [`push`] / [`pull`]: a ref's image and its objects to and from an OCI registry, stored as
//!   an OCI artifact ([`artifact`] describes the layout and media types); objects are packed
//!   into blobs content-defined in path order ([`pack`]) so that images sharing most objects
//!   share most blobs; only missing blobs move, in parallel, and an interrupted transfer
//!   resumes where it stopped. Each request is retried on its own when it fails transiently
//!   ([`retry`]), so a flaky registry costs retries of single requests, not whole transfers.
//! * [`export`] / [`import`]: the same as one stream in a file, for CI caches.
//! * Both carry the image's access profile (read-ahead hints) beside it, never in it: a layer
//!   of its own in the artifact, a trailer in the stream. One that arrives is parsed bounded
//!   and cut to the image's objects; a bad one is dropped with a warning, never failing the
//!   transfer.
//!
//! Nothing from elsewhere is trusted: every object's fs-verity digest is checked as it arrives
//! (a wrong byte is an error and is never stored), and an image is parsed in userspace and
//! rebuilt with velo's own writer, which must give back the same digest, before it is stored
//! (so the kernel only ever parses images velo's writer produced).

pub mod address;
pub mod artifact;
mod cache;
mod error;
mod ingest;
pub mod pack;
mod profile;
mod pull;
mod push;
pub mod registry;
pub mod retry;
mod stream;

pub use address::OciAddress;
pub use error::{DistError, Result};
pub use profile::ProfileSent;
pub use pull::{PullOptions, PullReport, pull};
pub use push::{PushOptions, PushReport, push};
pub use retry::RetryPolicy;
pub use stream::{ExportReport, ImportReport, export, import};

/// Progress of a transfer. All methods have empty defaults.
pub trait Progress: Send + Sync {
    /// A transfer of this many bytes (as they travel) and objects starts.
    fn start(&self, _bytes: u64, _objects: u64) {}
    /// Bytes moved and objects handled since the last call.
    fn advance(&self, _bytes: u64, _objects: u64) {}
}

/// No progress output.
#[derive(Debug)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Default number of blobs in flight at once.
pub const DEFAULT_JOBS: usize = 8;

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| DistError::io("start the I/O runtime", "", e))
}

pub(crate) fn joined<T>(r: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
    r.unwrap_or_else(|e| {
        Err(DistError::io(
            "run a worker",
            "",
            std::io::Error::other(e.to_string()),
        ))
    })
}
