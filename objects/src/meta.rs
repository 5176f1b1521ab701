//! `meta.json`: what kind of store this is and which format it has.

use serde::{Deserialize, Serialize};

/// The store format this velo writes. A store with a higher version is refused.
pub const FORMAT_VERSION: u32 = 1;
/// The `format` field of every velo store's meta.json.
pub const FORMAT_NAME: &str = "velo-store";
/// The most velo reads of a `meta.json`: a real one holds about 150 bytes.
pub const MAX_META_BYTES: u64 = 64 << 10;
/// Incompatible features this velo understands; an unknown one makes the store unusable.
pub const KNOWN_INCOMPAT: &[&str] = &[];

/// Whether the store's objects carry kernel fs-verity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerityMode {
    /// The filesystem cannot enable fs-verity: objects are checked in userspace only
    /// (`velo mount --verify`, `velo fsck`), and mounts say they are unverified.
    Unavailable,
    /// Every object and image has fs-verity enabled; mounts use `verity=require`.
    Enabled,
}

/// Contents of `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Store format version.
    pub version: u32,
    /// Features a reader must understand to use the store.
    #[serde(default)]
    pub incompat_features: Vec<String>,
    /// The store's fs-verity mode, decided when it was created.
    pub verity: VerityMode,
    /// Seconds since the epoch when the store was created.
    #[serde(default)]
    pub created: u64,
}

impl Meta {
    /// A fresh store's meta.
    pub fn new(verity: VerityMode) -> Self {
        Self {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            incompat_features: Vec::new(),
            verity,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// Incompatible features that this velo does not know.
    pub fn unknown_incompat(&self) -> Vec<String> {
        self.incompat_features
            .iter()
            .filter(|f| !KNOWN_INCOMPAT.contains(&f.as_str()))
            .cloned()
            .collect()
    }
}
