//! The OCI artifact a velo snapshot is stored as, and its index.
//!
//! ```text
//! manifest  application/vnd.oci.image.manifest.v1+json
//!   artifactType  application/vnd.velo.snapshot.v1
//!   config        application/vnd.velo.index.v1+json     the index (below)
//!   layers[0]     application/vnd.velo.image.v1+erofs    the composefs EROFS image, as stored
//!   layers[1..]   application/vnd.velo.pack.v1+zstd      objects, concatenated, zstd-compressed
//!   layers[last]  application/vnd.velo.profile.v1+json   optional: the image's access profile
//!   annotations   dev.velo.image (its fs-verity digest), dev.velo.ref (the ref pushed)
//! ```
//!
//! A registry names a blob by the sha256 of its bytes; velo names objects by their fs-verity
//! digest. The index maps one to the other: for each pack blob, the objects it holds in order
//! (fs-verity digest and size; each starts where the previous ended in the decompressed
//! stream). A pull checks every object's fs-verity digest as it arrives.

use serde::{Deserialize, Serialize};
use velo_objects::Digest;

/// `artifactType` of the manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.velo.snapshot.v1";
/// Media type of the index (the manifest's config blob).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.velo.index.v1+json";
/// Media type of the EROFS image layer.
pub const IMAGE_MEDIA_TYPE: &str = "application/vnd.velo.image.v1+erofs";
/// Media type of a pack of objects.
pub const PACK_MEDIA_TYPE: &str = "application/vnd.velo.pack.v1+zstd";
/// Media type of the optional last layer: the image's access profile (the JSON text of
/// `velo_objects::Profile`), which is not part of the image and not in the index.
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.velo.profile.v1+json";
/// Media type of the manifest itself.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Annotation holding the image's fs-verity digest.
pub const ANNOTATION_IMAGE: &str = "dev.velo.image";
/// Annotation holding the name of the ref that was pushed.
pub const ANNOTATION_REF: &str = "dev.velo.ref";

/// `format` of the index.
pub const INDEX_FORMAT: &str = "velo-index";
/// Version of the index this velo writes and reads.
pub const INDEX_VERSION: u32 = 1;

/// Largest manifest velo accepts (registries refuse larger ones, ~4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Largest index velo accepts (about 4 million objects).
pub const MAX_INDEX_BYTES: u64 = 512 << 20;
/// Largest total of the objects in one pack of more than one object (velo writes at most a few
/// MiB; a single object may be of any size and is streamed).
pub const MAX_PACK_BYTES: u64 = 256 << 20;

/// The index: which objects each blob holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Index {
    /// Always [`INDEX_FORMAT`].
    pub format: String,
    /// [`INDEX_VERSION`].
    pub version: u32,
    /// The image.
    pub image: ImageEntry,
    /// The ref that was pushed, if any (informational: a pull writes the ref it is told to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    /// Blobs of objects, in the manifest's layer order (after the image).
    pub blobs: Vec<BlobEntry>,
}

/// The image layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageEntry {
    /// Its fs-verity digest (its name in the store).
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// The registry blob (`sha256:…` of its bytes).
    pub blob: String,
}

/// One blob of objects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobEntry {
    /// `sha256:…` of the blob's (compressed) bytes.
    pub digest: String,
    /// Size of the blob.
    pub size: u64,
    /// The objects it holds, in order: fs-verity digest and size.
    pub objects: Vec<(Digest, u64)>,
}

impl BlobEntry {
    /// Bytes of the objects it holds (decompressed).
    pub fn object_bytes(&self) -> u64 {
        self.objects.iter().map(|(_, s)| s).sum()
    }
}

/// `sha256:<hex>` of a buffer.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// True for a well-formed `sha256:<64 lowercase hex>`.
pub fn is_sha256_digest(text: &str) -> bool {
    text.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

impl Index {
    /// Checks what a pull relies on, before anything is downloaded.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != INDEX_FORMAT {
            return Err(format!(
                "index format is {:?}, not {INDEX_FORMAT:?}",
                self.format
            ));
        }
        if self.version != INDEX_VERSION {
            return Err(format!(
                "index version {} is not supported by this velo (it reads version {INDEX_VERSION}); \
                 use a newer velo",
                self.version
            ));
        }
        if !is_sha256_digest(&self.image.blob) {
            return Err(format!(
                "image blob digest {:?} is malformed",
                self.image.blob
            ));
        }
        for b in &self.blobs {
            if !is_sha256_digest(&b.digest) {
                return Err(format!("blob digest {:?} is malformed", b.digest));
            }
            if b.objects.is_empty() {
                return Err(format!("blob {} holds no objects", b.digest));
            }
            if b.objects.len() > 1 && b.object_bytes() > MAX_PACK_BYTES {
                return Err(format!(
                    "blob {} packs {} bytes of objects, more than velo ever packs",
                    b.digest,
                    b.object_bytes()
                ));
            }
        }
        Ok(())
    }
}
