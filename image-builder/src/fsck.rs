//! `fsck`: the whole store checked — objects against their names, images against theirs (and
//! parsed, and every object they reference present), refs, leftovers — and `--verify`: the
//! objects one image needs, re-hashed in userspace before it is mounted.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use velo_objects::{Digest, Finding, FsckProgress, Kind, Store, Verdict, VerityMode};

use crate::cfs;
use crate::error::Result;
use crate::inspect;

/// What fsck found and did.
#[derive(Debug, Clone, Serialize)]
pub struct FsckReport {
    /// No damage (reclaimable leftovers do not count).
    pub clean: bool,
    /// Damage, one entry per problem.
    pub damage: Vec<Finding>,
    /// Leftovers of interrupted work: not damage.
    pub reclaimable: Vec<Finding>,
    /// What `--repair` did (quarantined paths, removed leftovers).
    pub repaired: Vec<String>,
    /// The store's fs-verity mode.
    pub verity: VerityMode,
    /// Objects re-hashed.
    pub objects_checked: u64,
    /// Their bytes.
    pub object_bytes: u64,
    /// Images checked.
    pub images_checked: u64,
    /// Refs checked.
    pub refs_checked: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Checks the store; with `repair`, moves damaged objects and images to `quarantine/` (never
/// deleting anything) and removes leftovers when no writer is at work.
pub fn fsck(
    store: &Store,
    repair: bool,
    jobs: usize,
    progress: &dyn FsckProgress,
) -> Result<FsckReport> {
    let started = Instant::now();
    let (mut damage, objects_checked, object_bytes) = store.check_objects(jobs, progress)?;
    let images = store.list_images()?;
    let image_findings: Vec<Vec<Finding>> = images
        .par_iter()
        .map(|d| check_image(store, d))
        .collect::<Result<_>>()?;
    damage.extend(image_findings.into_iter().flatten());
    let ref_findings = store.check_refs()?;
    let refs_checked = store.list_refs()?.len() as u64;
    damage.extend(ref_findings);
    damage.extend(store.special_files()?);
    let mut reclaimable = store.tmp_leftovers()?;
    reclaimable.extend(store.stale_mount_slots()?);
    reclaimable.extend(store.check_profiles()?);

    let mut repaired = Vec::new();
    if repair {
        for f in &damage {
            if f.kind == velo_objects::NOT_REGULAR {
                if store.remove_not_regular(&f.path)? {
                    repaired.push(format!("removed {} ({})", f.path.display(), f.found));
                }
                continue;
            }
            let kind = match f.kind {
                "object-mismatch" | "object-not-a-file" | "object-no-verity"
                | "object-unreadable" => Kind::Object,
                "image-mismatch" | "image-unparsable" | "image-not-rebuilt" | "image-no-verity"
                | "image-unreadable" => Kind::Image,
                _ => continue,
            };
            let Some(digest) = digest_from_path(kind, &f.path) else {
                continue;
            };
            let to = store.quarantine(kind, &digest)?;
            repaired.push(format!("moved {} to {}", f.path.display(), to.display()));
        }
        for f in reclaimable
            .iter()
            .filter(|f| f.kind.starts_with("profile-"))
        {
            if let Some(digest) = digest_from_path(Kind::Image, &f.path) {
                store.remove_profile(&digest)?;
                repaired.push(format!("removed {} ({})", f.path.display(), f.found));
            }
        }
        if reclaimable.iter().any(|f| !f.kind.starts_with("profile-")) {
            match store.reclaim_tmp()? {
                Some(n) => repaired.push(format!("removed {n} leftovers of interrupted work")),
                None => {
                    repaired.push("kept leftovers: writers are at work; run again later".into())
                }
            }
        }
    }
    Ok(FsckReport {
        clean: damage.is_empty(),
        damage,
        reclaimable,
        repaired,
        verity: store.verity(),
        objects_checked,
        object_bytes,
        images_checked: images.len() as u64,
        refs_checked,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn digest_from_path(kind: Kind, path: &std::path::Path) -> Option<Digest> {
    let name = path.file_name()?.to_str()?;
    match kind {
        Kind::Image => Digest::parse(name).ok(),
        Kind::Object => {
            let fan = path.parent()?.file_name()?.to_str()?;
            Digest::parse(&format!("{fan}{name}")).ok()
        }
    }
}

/// The finding for an image whose bytes are not good.
fn image_finding(store: &Store, digest: &Digest, verdict: Verdict) -> Option<Finding> {
    let (kind, expected, found) = match verdict {
        Verdict::Good { .. } => return None,
        Verdict::Missing => ("image-missing", digest.to_hex(), "missing".into()),
        Verdict::Mismatch { found, size } => (
            "image-mismatch",
            digest.to_hex(),
            format!("{found} ({size} bytes)"),
        ),
        Verdict::Unreadable { error } => ("image-unreadable", digest.to_hex(), error),
        Verdict::NotAFile { kind } => ("image-mismatch", "a regular file".into(), kind.into()),
    };
    Some(Finding {
        kind,
        path: store.image_path(digest),
        expected,
        found,
    })
}

/// The check export, push and pull run on every image: it parses (in userspace) and velo's
/// own writer, given the parsed tree, writes exactly these bytes again. An image velo did not
/// write (made by `mkfs.erofs`, say), or one edited by hand even if renamed to its new digest
/// (a file's redirect pointed at another file's object: the kernel would serve the other
/// file's bytes), fails it. Returns the tree, or the finding.
fn rebuild_check(
    store: &Store,
    digest: &Digest,
    bytes: &[u8],
) -> std::result::Result<crate::FileSystem, Finding> {
    let path = store.image_path(digest);
    let (fs, rebuilt) = match cfs::rebuild(bytes, &digest.to_hex()) {
        Ok(done) => done,
        Err(e) => {
            return Err(Finding {
                kind: "image-unparsable",
                path,
                expected: "a composefs EROFS image".into(),
                found: e.to_string(),
            });
        }
    };
    if rebuilt.as_slice() != bytes {
        return Err(Finding {
            kind: "image-not-rebuilt",
            path,
            expected: format!(
                "the bytes velo's writer makes of the tree it holds ({digest}, {} bytes)",
                bytes.len()
            ),
            found: format!(
                "{} ({} bytes): it was not written by velo, or was edited (e.g. a file's \
                 redirect pointed at another object)",
                velo_objects::verity::VerityHasher::digest(&rebuilt),
                rebuilt.len()
            ),
        });
    }
    Ok(fs)
}

/// One image: its bytes match its name, it parses and rebuilds to the same bytes with velo's
/// writer ([`rebuild_check`]), and every object it references is there.
fn check_image(store: &Store, digest: &Digest) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    let bytes = match store.read_verified(Kind::Image, digest, inspect::MAX_IMAGE_BYTES)? {
        Ok(bytes) => bytes,
        // Gone since it was listed (collected meanwhile): nothing to report.
        Err(Verdict::Missing) => return Ok(out),
        Err(verdict) => {
            out.extend(image_finding(store, digest, verdict));
            return Ok(out);
        }
    };
    if store.verity() == VerityMode::Enabled
        && let Some(f) = store.check_kernel_verity(Kind::Image, digest)
    {
        out.push(f);
    }
    let fs = match rebuild_check(store, digest, &bytes) {
        Ok(fs) => fs,
        Err(finding) => {
            out.push(finding);
            return Ok(out);
        }
    };
    for (object, size) in inspect::objects(&fs) {
        if !store.has(Kind::Object, &object, size)? {
            out.push(Finding {
                kind: "image-missing-object",
                path: store.object_path(&object),
                expected: format!("object of {size} bytes, needed by image {digest}"),
                found: "missing or of another size".into(),
            });
        }
    }
    Ok(out)
}

/// What `mount --verify` checked.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Objects re-hashed.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Problems found (empty: all good).
    pub bad: Vec<Finding>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Re-hashes, in parallel, the image and every object it references, in userspace; the image
/// must also parse and rebuild to the same bytes with velo's writer, as on export and pull
/// (else it is reported, and no object is checked).
pub fn verify_image(
    store: &Store,
    digest: &Digest,
    pool: &rayon::ThreadPool,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let mut bad = Vec::new();
    let bytes = match store.read_verified(Kind::Image, digest, inspect::MAX_IMAGE_BYTES)? {
        Ok(bytes) => bytes,
        Err(verdict) => {
            bad.extend(image_finding(store, digest, verdict));
            return Ok(VerifyReport {
                objects: 0,
                bytes: 0,
                bad,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    };
    let fs = match rebuild_check(store, digest, &bytes) {
        Ok(fs) => fs,
        Err(finding) => {
            bad.push(finding);
            return Ok(VerifyReport {
                objects: 0,
                bytes: 0,
                bad,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    };
    let objects = inspect::objects(&fs);
    let results: Vec<Option<Finding>> = pool.install(|| {
        objects
            .par_iter()
            .map(|(d, size)| {
                let path = store.object_path(d);
                Ok(match store.verify(Kind::Object, d)? {
                    Verdict::Good { .. } => None,
                    Verdict::Missing => Some(Finding {
                        kind: "object-missing",
                        path,
                        expected: d.to_hex(),
                        found: "missing".into(),
                    }),
                    Verdict::Mismatch { found, size: got } => Some(Finding {
                        kind: "object-mismatch",
                        path,
                        expected: format!("{d} ({size} bytes)"),
                        found: format!("{found} ({got} bytes)"),
                    }),
                    Verdict::Unreadable { error } => Some(Finding {
                        kind: "object-unreadable",
                        path,
                        expected: d.to_hex(),
                        found: error,
                    }),
                    Verdict::NotAFile { kind } => Some(Finding {
                        kind: "object-not-a-file",
                        path,
                        expected: d.to_hex(),
                        found: kind.into(),
                    }),
                })
            })
            .collect::<Result<_>>()
    })?;
    bad.extend(results.into_iter().flatten());
    Ok(VerifyReport {
        objects: objects.len() as u64,
        bytes: objects.iter().map(|(_, s)| s).sum(),
        bad,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A worker pool for verification (default: one thread per CPU — hashing is CPU-bound).
pub fn pool(jobs: Option<usize>) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(
            jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        )
        .build()
        .map_err(|e| crate::ImageError::Format {
            what: "verification".into(),
            reason: format!("cannot start worker threads: {e}"),
        })
}
