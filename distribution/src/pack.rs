//! Packing objects into registry blobs.
//!
//! A registry costs a few milliseconds per blob and refuses manifests with more than ~28k
//! layers, while a `node_modules` has tens of thousands of objects: small objects must share
//! blobs. But a pack whose membership shifts whenever one object changes would make every
//! image upload everything again. So packs are cut **content-defined, in path order**:
//!
//! * objects are taken in the order of the first path naming them in the image (depth-first,
//!   sorted), so the files of one package or directory sit together;
//! * after each object, a pack ends if it holds at least `target / 4` bytes and the object's
//!   digest, read as a number, falls below a threshold proportional to the object's size (so
//!   a pack ends on average every `target` bytes, whatever the object sizes), or if it reached
//!   `2 × target`;
//! * an object of at least `target` bytes is a blob of its own.
//!
//! Whether a pack ends after an object depends only on that object and on how full the pack
//! is, so two images that share a directory tree cut it into the same packs (an inserted or
//! changed package disturbs the packs around it, and the cut points line up again soon after):
//! a second image that shares most objects uploads little. The registry's own dedup by blob
//! digest does the rest. The README has the measurements behind the default target (1 MiB).

use std::io::{Read, Write};
use std::os::fd::AsFd;

use velo_objects::{Digest, Store};

use crate::error::{DistError, Result};

/// Default average pack size (bytes of objects, before compression).
pub const DEFAULT_PACK_TARGET: u64 = 1 << 20;
/// Smallest pack target accepted.
pub const MIN_PACK_TARGET: u64 = 64 << 10;
/// zstd level for packs and export streams.
pub const ZSTD_LEVEL: i32 = 3;

/// A blob to be: the objects it holds, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBlob {
    /// Objects (fs-verity digest, size).
    pub objects: Vec<(Digest, u64)>,
}

impl PlannedBlob {
    /// Bytes of its objects.
    pub fn bytes(&self) -> u64 {
        self.objects.iter().map(|(_, s)| s).sum()
    }

    /// A key naming exactly this content and encoding, for the push cache.
    pub fn cache_key(&self) -> String {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(format!("velo-pack v1 zstd-{ZSTD_LEVEL}\n").as_bytes());
        for (d, s) in &self.objects {
            h.update(d.as_bytes());
            h.update(s.to_le_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// Cuts `objects` (in path order, each once) into blobs, as described in the module docs.
pub fn plan(objects: &[(Digest, u64)], target: u64) -> Vec<PlannedBlob> {
    let target = target.max(MIN_PACK_TARGET);
    let min = target / 4;
    let max = target * 2;
    // After `min`, the expected distance to the next cut is target - min bytes.
    let spread = (target - min) as u128;
    let mut out = Vec::new();
    let mut current: Vec<(Digest, u64)> = Vec::new();
    let mut bytes = 0u64;
    for &(digest, size) in objects {
        if size >= target {
            out.push(PlannedBlob {
                objects: vec![(digest, size)],
            });
            continue;
        }
        current.push((digest, size));
        bytes += size;
        let mut h = [0u8; 8];
        h.copy_from_slice(&digest.as_bytes()[..8]);
        let h = u64::from_be_bytes(h) as u128;
        let cut = bytes >= max || (bytes >= min && h * spread < (size as u128) << 64);
        if cut {
            out.push(PlannedBlob {
                objects: std::mem::take(&mut current),
            });
            bytes = 0;
        }
    }
    if !current.is_empty() {
        out.push(PlannedBlob { objects: current });
    }
    out
}

/// A `Write` that hashes (sha256) and counts what goes through to a file.
struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a blob's objects from the store, zstd-compressed, into `out`; returns the blob's
/// `sha256:…` digest and size.
pub fn encode(store: &Store, blob: &PlannedBlob, out: &mut std::fs::File) -> Result<(String, u64)> {
    use sha2::Digest as _;
    let tmp = "pack staging file";
    let w = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, &mut *out),
        hasher: sha2::Sha256::new(),
        len: 0,
    };
    let mut enc =
        zstd::stream::Encoder::new(w, ZSTD_LEVEL).map_err(|e| DistError::io("compress", tmp, e))?;
    enc.include_checksum(true)
        .map_err(|e| DistError::io("compress", tmp, e))?;
    enc.set_pledged_src_size(Some(blob.bytes()))
        .map_err(|e| DistError::io("compress", tmp, e))?;
    let mut buf = vec![0u8; 1 << 20];
    for (digest, size) in &blob.objects {
        let path = store.object_path(digest);
        let fd = store.open_object(digest)?;
        let mut file = std::fs::File::from(fd);
        let st =
            rustix::fs::fstat(file.as_fd()).map_err(|e| DistError::io("stat", &path, e.into()))?;
        if st.st_size as u64 != *size {
            return Err(DistError::Corrupt {
                what: format!("object {} in the store", path.display()),
                reason: format!(
                    "it has {} bytes, the image says {size}; run `velo fsck`",
                    st.st_size
                ),
            });
        }
        let mut left = *size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = file
                .read(&mut buf[..want])
                .map_err(|e| DistError::io("read", &path, e))?;
            if n == 0 {
                return Err(DistError::Corrupt {
                    what: format!("object {}", path.display()),
                    reason: "it became shorter while being read".into(),
                });
            }
            enc.write_all(&buf[..n])
                .map_err(|e| DistError::io("write", tmp, e))?;
            left -= n as u64;
        }
    }
    let mut w = enc
        .finish()
        .map_err(|e| DistError::io("compress", tmp, e))?;
    w.flush().map_err(|e| DistError::io("write", tmp, e))?;
    let digest = format!("sha256:{}", hex::encode(w.hasher.finalize()));
    Ok((digest, w.len))
}

/// A reader of the objects in a blob: the zstd stream decoded, never more than `limit` bytes.
pub fn decoder<'r>(src: impl Read + 'r, limit: u64) -> Result<impl Read + 'r> {
    let dec =
        zstd::stream::Decoder::new(src).map_err(|e| DistError::io("decompress", "blob", e))?;
    Ok(dec.take(limit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use velo_objects::verity::VerityHasher;

    fn objs(n: usize, seed: u32, size: impl Fn(usize) -> u64) -> Vec<(Digest, u64)> {
        (0..n)
            .map(|i| {
                let d = VerityHasher::digest(format!("{seed}-{i}").as_bytes());
                (d, size(i))
            })
            .collect()
    }

    #[test]
    fn packs_average_the_target_and_keep_big_objects_alone() {
        let target = 1 << 20;
        let o = objs(20_000, 1, |i| 500 + (i as u64 * 7919) % 20_000);
        let blobs = plan(&o, target);
        let total: u64 = o.iter().map(|(_, s)| s).sum();
        let avg = total / blobs.len() as u64;
        assert!(avg > target / 2 && avg < target * 2, "average pack {avg}");
        assert!(blobs.iter().all(|b| b.bytes() <= 2 * target + 20_000));
        let mut with_big = o.clone();
        with_big.insert(100, (VerityHasher::digest(b"big"), 5 << 20));
        let b2 = plan(&with_big, target);
        assert!(
            b2.iter()
                .any(|b| b.objects.len() == 1 && b.bytes() == 5 << 20)
        );
        // A big object in the middle does not disturb the packs around it.
        assert_eq!(b2.len(), blobs.len() + 1);
    }

    #[test]
    fn a_change_in_one_place_disturbs_few_packs() {
        let target = 256 << 10;
        let o = objs(30_000, 2, |i| 300 + (i as u64 * 104_729) % 9_000);
        let a = plan(&o, target);
        // Replace 50 consecutive objects (one package) in the middle with 60 new ones.
        let mut changed = o.clone();
        changed.splice(15_000..15_050, objs(60, 3, |_| 4000));
        let b = plan(&changed, target);
        let keys: std::collections::HashSet<String> = a.iter().map(|p| p.cache_key()).collect();
        let new = b.iter().filter(|p| !keys.contains(&p.cache_key())).count();
        assert!(new <= 4, "{new} of {} packs changed", b.len());
    }
}
