//! The stat cache: (dev, ino, size, mtime, ctime) → digest for the files of one source tree, so
//! re-snapshotting an unchanged tree hashes nothing. Kept in the store's `cache/`, one file per
//! source root, in a small binary format with a checksum; anything unreadable is ignored.

use std::collections::HashMap;
use std::path::Path;

use velo_objects::{Digest, Store};

use crate::scan::StatInfo;

const MAGIC: &[u8; 8] = b"VELOSC01";
const RECORD: usize = 8 * 3 + 12 * 2 + 32;
/// The most read of a stat cache: 80 bytes a file, so room for the ~13 million files of the
/// largest image velo reads ([`crate::inspect::MAX_IMAGE_BYTES`]).
const MAX_BYTES: u64 = 1 << 30;

/// The identity of a file's content as far as the filesystem tells: if all of it is unchanged
/// the bytes are unchanged (as git's index assumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, u32),
    ctime: (i64, u32),
}

impl Key {
    /// The key of a file with this metadata.
    pub fn of(st: &StatInfo) -> Self {
        Self {
            dev: st.dev,
            ino: st.ino,
            size: st.size,
            mtime: st.mtime,
            ctime: st.ctime,
        }
    }
}

/// A loaded stat cache.
#[derive(Debug, Default)]
pub struct StatCache {
    map: HashMap<Key, Digest>,
}

/// The cache entry name for a source root.
fn entry_name(root: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    format!(
        "stat-{}",
        &blake3::hash(root.as_os_str().as_bytes()).to_hex()[..32]
    )
}

impl StatCache {
    /// Loads the cache of `root` (canonical path), or an empty one.
    pub fn load(store: &Store, root: &Path) -> Self {
        let data = match store.read_cache(&entry_name(root), MAX_BYTES) {
            Ok(Some(d)) => d,
            _ => return Self::default(),
        };
        Self::decode(&data).unwrap_or_else(|| {
            tracing::warn!("ignoring an unreadable stat cache for {}", root.display());
            Self::default()
        })
    }

    fn decode(data: &[u8]) -> Option<Self> {
        let body = data.strip_prefix(MAGIC)?;
        let (records, sum) = body.split_at_checked(body.len().checked_sub(32)?)?;
        if blake3::hash(records).as_bytes() != sum || records.len() % RECORD != 0 {
            return None;
        }
        let mut map = HashMap::with_capacity(records.len() / RECORD);
        for r in records.chunks_exact(RECORD) {
            let u64_at = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().unwrap_or_default());
            let u32_at = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().unwrap_or_default());
            let key = Key {
                dev: u64_at(0),
                ino: u64_at(8),
                size: u64_at(16),
                mtime: (u64_at(24) as i64, u32_at(32)),
                ctime: (u64_at(36) as i64, u32_at(44)),
            };
            let digest: [u8; 32] = r[48..80].try_into().ok()?;
            map.insert(key, Digest::from_bytes(digest));
        }
        Some(Self { map })
    }

    /// The digest recorded for a file with this metadata.
    pub fn get(&self, key: &Key) -> Option<Digest> {
        self.map.get(key).copied()
    }

    /// Replaces the cache of `root` with `entries` (best effort: a cache write failure only
    /// costs hashing next time).
    pub fn save(store: &Store, root: &Path, entries: impl Iterator<Item = (Key, Digest)>) {
        let mut out = Vec::from(&MAGIC[..]);
        let mut records = Vec::new();
        for (k, d) in entries {
            records.extend_from_slice(&k.dev.to_le_bytes());
            records.extend_from_slice(&k.ino.to_le_bytes());
            records.extend_from_slice(&k.size.to_le_bytes());
            records.extend_from_slice(&(k.mtime.0 as u64).to_le_bytes());
            records.extend_from_slice(&k.mtime.1.to_le_bytes());
            records.extend_from_slice(&(k.ctime.0 as u64).to_le_bytes());
            records.extend_from_slice(&k.ctime.1.to_le_bytes());
            records.extend_from_slice(d.as_bytes());
        }
        out.extend_from_slice(&records);
        out.extend_from_slice(blake3::hash(&records).as_bytes());
        if let Err(e) = store.write_cache(&entry_name(root), &out) {
            tracing::warn!("could not save the stat cache: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reject_damage() {
        let dir = tempfile::tempdir().expect("test fixture");
        let store = Store::open_or_create(dir.path().join("s")).expect("test fixture");
        let key = Key {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (4, 5),
            ctime: (-6, 7),
        };
        let d = Digest::from_bytes([9; 32]);
        StatCache::save(&store, Path::new("/src"), [(key, d)].into_iter());
        let c = StatCache::load(&store, Path::new("/src"));
        assert_eq!(c.get(&key), Some(d));
        assert_eq!(StatCache::load(&store, Path::new("/other")).get(&key), None);
        // A flipped bit makes the whole cache unusable, never a wrong digest.
        let name = entry_name(Path::new("/src"));
        let mut raw = store
            .read_cache(&name, MAX_BYTES)
            .expect("test fixture")
            .expect("test fixture");
        raw[20] ^= 1;
        store.write_cache(&name, &raw).expect("test fixture");
        assert_eq!(StatCache::load(&store, Path::new("/src")).get(&key), None);
    }
}
