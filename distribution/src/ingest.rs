//! Taking in what came from elsewhere: images are checked against their digest and rebuilt
//! with velo's writer; objects are stored only if their fs-verity digest matches.

use std::io::Read;

use velo_image::FileSystem;
use velo_objects::verity::VerityHasher;
use velo_objects::{Digest, Kind, Store, StoreError};

use crate::error::{DistError, Result};

/// Checks image bytes that claim to be `digest`: their fs-verity digest, then that they parse
/// (in userspace) and rebuild with velo's writer to the very same bytes. Returns the parsed
/// tree. `source` names where they came from.
pub fn check_image(bytes: &[u8], digest: &Digest, source: &str) -> Result<FileSystem> {
    let found = VerityHasher::digest(bytes);
    if found != *digest {
        return Err(DistError::Corrupt {
            what: format!("image {digest} from {source}"),
            reason: format!("its bytes hash to {found}"),
        });
    }
    check_staged_image(bytes, digest, source)
}

/// [`check_image`] for bytes already checked against their digest (staged with
/// [`stage_image`]): they parse and rebuild to the very same bytes. Reads only what the parser
/// reaches (and all of the bytes only to compare a rebuild of their very length).
pub fn check_staged_image(bytes: &[u8], digest: &Digest, source: &str) -> Result<FileSystem> {
    let refused = |reason: String| DistError::ImageRefused {
        digest: digest.to_hex(),
        source_name: source.to_owned(),
        reason,
    };
    let (fs, rebuilt) = velo_image::rebuild(bytes, &digest.to_hex()).map_err(|e| {
        refused(format!(
            "it does not parse as a composefs image velo reads: {e}"
        ))
    })?;
    if rebuilt.as_slice() != bytes {
        return Err(refused(format!(
            "parsed and written again by velo's writer it becomes {} ({} bytes instead of {}): it \
             was not written by velo, or by a velo whose image writer differs from this one's",
            VerityHasher::digest(&rebuilt),
            rebuilt.len(),
            bytes.len()
        )));
    }
    Ok(fs)
}

/// Stages an image of `size` bytes read from `src` in the store's `tmp/` if its fs-verity
/// digest is `digest` (see [`Store::stage_verified`]): its bytes go to disk as they arrive.
/// `what` names it in messages.
pub fn stage_image<'s>(
    store: &'s Store,
    src: &mut dyn Read,
    digest: &Digest,
    size: u64,
    what: &str,
) -> Result<velo_objects::Pending<'s>> {
    store
        .stage_verified(Kind::Image, src, digest, size, what)
        .map_err(|e| refused_bytes(e, what, digest, size))
}

/// What a [`StoreError`] of a check of bytes that arrived means for them.
fn refused_bytes(e: StoreError, what: &str, digest: &Digest, size: u64) -> DistError {
    match e {
        StoreError::Mismatch {
            found, found_size, ..
        } => DistError::Corrupt {
            what: what.to_owned(),
            reason: match found {
                Some(f) => format!("its bytes hash to {f}, not {digest}"),
                None => format!("only {found_size} of its {size} bytes arrived"),
            },
        },
        // A read error here is the stream (a decompressor) failing at these bytes.
        StoreError::Io {
            op: "read",
            cause: source,
            ..
        } => DistError::Corrupt {
            what: what.to_owned(),
            reason: format!("its bytes do not decompress: {source}"),
        },
        e => e.into(),
    }
}

/// Stores one object of `size` bytes read from `src` if its fs-verity digest is `digest`;
/// `what` names it (object and blob) in messages. Reads exactly `size` bytes.
pub fn store_object(
    store: &Store,
    src: &mut dyn Read,
    digest: &Digest,
    size: u64,
    what: &str,
) -> Result<bool> {
    let mut limited = src.take(size);
    store
        .store_verified(Kind::Object, &mut limited, digest, size, what)
        .map(|stored| stored.new)
        .map_err(|e| refused_bytes(e, what, digest, size))
}

/// Reads and discards exactly `size` bytes.
pub fn skip(src: &mut dyn Read, size: u64, what: &str) -> Result<()> {
    let n = std::io::copy(&mut src.take(size), &mut std::io::sink()).map_err(|e| {
        DistError::Corrupt {
            what: what.to_owned(),
            reason: format!("its bytes do not decompress: {e}"),
        }
    })?;
    if n < size {
        return Err(DistError::Corrupt {
            what: what.to_owned(),
            reason: format!("only {n} of its {size} bytes arrived"),
        });
    }
    Ok(())
}

/// Hashes exactly `size` bytes of `src` without storing them: `Ok(None)` if they are `digest`,
/// else what is wrong.
pub fn diagnose(src: &mut dyn Read, digest: &Digest, size: u64) -> Option<String> {
    let mut h = VerityHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        match src.read(&mut buf[..want]) {
            Ok(0) => return Some(format!("only {} of its {size} bytes arrived", size - left)),
            Ok(n) => {
                h.update(&buf[..n]);
                left -= n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Some(format!("its bytes do not decompress: {e}")),
        }
    }
    let found = h.finalize();
    (found != *digest).then(|| format!("its bytes hash to {found}, not {digest}"))
}
