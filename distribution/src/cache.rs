//! The push cache: which registry blob (sha256 digest and size) a planned blob encodes to, so
//! that pushing an image whose packs were pushed before reads and compresses nothing: a HEAD
//! request per blob tells what the registry still has. Kept in the store's `cache/` (rebuildable
//! data): one line per blob, appended; an entry is only ever used to skip an upload of a blob
//! the registry already holds under that digest, and a lost or damaged file costs a re-encode.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsFd;

use rustix::fs::{Mode, OFlags};
use velo_objects::{Area, Store, fsutil};

/// File name under `cache/`.
const FILE: &str = "oci-blobs";
/// Past this size the file is started afresh.
const MAX_BYTES: u64 = 64 << 20;

/// Cache key → (blob digest, blob size).
#[derive(Debug, Default)]
pub struct BlobCache {
    entries: HashMap<String, (String, u64)>,
    file: Option<std::fs::File>,
}

impl BlobCache {
    /// Loads the cache of `store` (an unreadable cache is an empty one).
    pub fn load(store: &Store) -> Self {
        let Ok(dir) = store.open_area(Area::Cache) else {
            return Self::default();
        };
        // A regular file only: anything else (a FIFO) is never opened for reading or writing.
        let open = |flags| {
            fsutil::open_regular_beneath(dir.as_fd(), FILE, flags, Mode::from_raw_mode(0o600)).ok()
        };
        let mut entries = HashMap::new();
        let mut too_big = false;
        if let Some((fd, st)) = open(OFlags::RDONLY) {
            let data = fsutil::read_capped(fd.as_fd(), &st, MAX_BYTES);
            too_big = matches!(data, Err(fsutil::ReadError::TooLarge { .. }));
            if let Ok(data) = data {
                for line in String::from_utf8_lossy(&data).lines() {
                    let mut parts = line.split(' ');
                    if let (Some(k), Some(d), Some(s), None) =
                        (parts.next(), parts.next(), parts.next(), parts.next())
                        && k.len() == 64
                        && crate::artifact::is_sha256_digest(d)
                        && let Ok(s) = s.parse()
                    {
                        entries.insert(k.to_owned(), (d.to_owned(), s));
                    }
                }
            }
        }
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND;
        let file = open(if too_big {
            flags | OFlags::TRUNC
        } else {
            flags
        })
        .map(|(fd, _)| std::fs::File::from(fd));
        Self { entries, file }
    }

    /// The blob a planned blob encodes to, if known.
    pub fn get(&self, key: &str) -> Option<(String, u64)> {
        self.entries.get(key).cloned()
    }

    /// Records a blob (best effort: the cache is an optimisation).
    pub fn record(&mut self, key: &str, digest: &str, size: u64) {
        if self
            .entries
            .get(key)
            .is_some_and(|(d, s)| d == digest && *s == size)
        {
            return;
        }
        self.entries
            .insert(key.to_owned(), (digest.to_owned(), size));
        if let Some(f) = &mut self.file {
            // One write(2) per line on an O_APPEND file: concurrent pushes do not interleave.
            let _ = f.write_all(format!("{key} {digest} {size}\n").as_bytes());
        }
    }
}
