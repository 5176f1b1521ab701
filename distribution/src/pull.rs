//! `pull`: an image and the objects the store lacks, from a registry, every byte checked.

use std::collections::{HashMap, HashSet};
use std::io::BufReader;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use velo_image::inspect;
use velo_objects::{
    Area, Digest, Kind, MAX_PROFILE_BYTES, ProfileOutcome, Store, validate_ref_name,
};

use crate::address::OciAddress;
use crate::artifact::{self, BlobEntry, Index};
use crate::error::{DistError, Result};
use crate::ingest;
use crate::registry::{Downloaded, Registry};
use crate::{Progress, joined, pack};

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Blobs in flight at once.
    pub jobs: usize,
    /// Point this ref at the image once it and its objects are durable.
    pub ref_name: Option<String>,
    /// Refuse anything but this image (its fs-verity digest), before downloading it.
    pub expect: Option<Digest>,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            jobs: crate::DEFAULT_JOBS,
            ref_name: None,
            expect: None,
        }
    }
}

/// What a pull did.
#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    /// The image (its fs-verity digest).
    pub image: Digest,
    /// Where from.
    pub source: String,
    /// The manifest's digest.
    pub manifest: String,
    /// The ref written, if any.
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    /// The ref the pusher had (informational).
    pub pushed_ref: Option<String>,
    /// Distinct objects the image needs.
    pub objects: u64,
    /// Their bytes.
    pub object_bytes: u64,
    /// Objects stored by this pull.
    pub objects_fetched: u64,
    /// Objects the store already had.
    pub objects_present: u64,
    /// Blobs of the artifact (index, image, packs).
    pub blobs: u64,
    /// Blobs downloaded.
    pub blobs_fetched: u64,
    /// Blobs not needed (everything in them was already stored).
    pub blobs_skipped: u64,
    /// Bytes downloaded (compressed, as they travel), manifest and index included.
    pub bytes_received: u64,
    /// True if the image itself was new to the store.
    pub new_image: bool,
    /// Requests made again after a transient failure (a 5xx, a 429, a broken connection).
    pub retries: u64,
    /// What became of the access profile that came with the image (a bad one is dropped,
    /// never failing the pull).
    pub profile: ProfileOutcome,
    /// Wall-clock seconds.
    pub seconds: f64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
}

/// Pulls the snapshot at `src` into `store`.
pub fn pull(
    store: Arc<Store>,
    src: &OciAddress,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullReport> {
    crate::runtime()?.block_on(pull_async(store, src, opts, progress))
}

async fn pull_async(
    store: Arc<Store>,
    src: &OciAddress,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullReport> {
    let started = Instant::now();
    if let Some(r) = &opts.ref_name {
        validate_ref_name(r)?;
    }
    let url = src.to_string();
    let bad = |reason: String| DistError::BadArtifact {
        url: src.manifest_url(),
        reason,
    };
    let registry = Registry::connect(src).await?;
    let (manifest_bytes, manifest_digest) = registry.pull_manifest().await?;
    if manifest_bytes.len() > artifact::MAX_MANIFEST_BYTES {
        return Err(bad(format!(
            "the manifest is {} bytes, too large",
            manifest_bytes.len()
        )));
    }
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| bad(format!("the manifest is not an OCI image manifest: {e}")))?;
    if manifest.artifact_type.as_deref() != Some(artifact::ARTIFACT_TYPE)
        || manifest.config.media_type != artifact::INDEX_MEDIA_TYPE
    {
        return Err(bad(format!(
            "not a velo snapshot (artifactType {:?}, config media type {:?}; velo pushes {:?})",
            manifest.artifact_type.as_deref().unwrap_or("none"),
            manifest.config.media_type,
            artifact::ARTIFACT_TYPE
        )));
    }
    if manifest.schema_version != 2
        || manifest
            .media_type
            .as_deref()
            .is_some_and(|m| m != artifact::MANIFEST_MEDIA_TYPE)
    {
        return Err(bad("unsupported manifest schema or media type".into()));
    }
    let index_bytes = registry
        .pull_bytes(
            &manifest.config.digest,
            manifest.config.size,
            artifact::MAX_INDEX_BYTES,
            "index",
        )
        .await?;
    let index: Index = serde_json::from_slice(&index_bytes)
        .map_err(|e| bad(format!("the index is malformed: {e}")))?;
    index.validate().map_err(bad)?;
    let profile_layer = check_layers(&manifest, &index).map_err(bad)?;
    let digest = index.image.digest;
    if let Some(want) = opts.expect
        && want != digest
    {
        return Err(bad(format!(
            "it holds image {digest}, not the expected {want}; nothing was downloaded"
        )));
    }
    let mut report = PullReport {
        image: digest,
        source: url.clone(),
        manifest: manifest_digest,
        ref_name: opts.ref_name.clone(),
        pushed_ref: index.ref_name.clone(),
        objects: 0,
        object_bytes: 0,
        objects_fetched: 0,
        objects_present: 0,
        blobs: index.blobs.len() as u64 + 2 + u64::from(profile_layer.is_some()),
        blobs_fetched: 1,
        blobs_skipped: 0,
        bytes_received: (manifest_bytes.len() + index_bytes.len()) as u64,
        new_image: false,
        retries: 0,
        profile: ProfileOutcome::None,
        seconds: 0.0,
    };

    // Shared lock and a writer marker, held until the ref is written.
    let session = store.begin_write()?;
    let (fs, new_image) = if store.has(Kind::Image, &digest, index.image.size)? {
        report.blobs_skipped += 1;
        (inspect::load(&store, &digest)?, None)
    } else {
        if index.image.size > inspect::MAX_IMAGE_BYTES {
            return Err(bad(format!(
                "the image is {} bytes, too large",
                index.image.size
            )));
        }
        let bytes = registry
            .pull_bytes(
                &index.image.blob,
                index.image.size,
                inspect::MAX_IMAGE_BYTES,
                "image",
            )
            .await?;
        report.blobs_fetched += 1;
        report.bytes_received += bytes.len() as u64;
        let fs = ingest::check_image(&bytes, &digest, &url)?;
        (fs, Some(bytes))
    };

    // Every object the image needs must be in the index, at the size the image says.
    let needed = inspect::objects(&fs);
    let mut location: HashMap<Digest, (usize, u64)> = HashMap::new();
    for (bi, b) in index.blobs.iter().enumerate() {
        for (d, s) in &b.objects {
            location.entry(*d).or_insert((bi, *s));
        }
    }
    let mut missing = HashSet::new();
    let mut wanted_blobs = Vec::new();
    let mut seen_blobs = HashSet::new();
    for (d, s) in &needed {
        match location.get(d) {
            None => {
                return Err(bad(format!(
                    "the index lists no blob holding object {d}, which the image needs"
                )));
            }
            Some((_, size)) if size != s => {
                return Err(bad(format!(
                    "the index says object {d} has {size} bytes, the image says {s}"
                )));
            }
            Some((bi, _)) => {
                report.objects += 1;
                report.object_bytes += s;
                if store.has(Kind::Object, d, *s)? {
                    report.objects_present += 1;
                } else {
                    missing.insert(*d);
                    if seen_blobs.insert(*bi) {
                        wanted_blobs.push(*bi);
                    }
                }
            }
        }
    }
    report.blobs_skipped += (index.blobs.len() - wanted_blobs.len()) as u64;
    progress.start(
        wanted_blobs.iter().map(|&bi| index.blobs[bi].size).sum(),
        missing.len() as u64,
    );
    let missing = Arc::new(missing);
    let packs = index.blobs.len();
    let fetched: Vec<(u64, u64)> = futures_util::stream::iter(wanted_blobs)
        .map(|bi| {
            let blob = &index.blobs[bi];
            fetch_blob(&store, &registry, blob, (bi, packs), &missing, progress)
        })
        .buffer_unordered(opts.jobs.max(1))
        .try_collect()
        .await?;
    for (bytes, objects) in fetched {
        report.blobs_fetched += 1;
        report.bytes_received += bytes;
        report.objects_fetched += objects;
    }

    if let Some(bytes) = new_image {
        let stored = store.store_verified(
            Kind::Image,
            &mut bytes.as_slice(),
            &digest,
            bytes.len() as u64,
            &format!("image {digest} from {url}"),
        )?;
        report.new_image = stored.new;
    }
    let refs: Vec<(&str, Digest)> = opts.ref_name.iter().map(|n| (n.as_str(), digest)).collect();
    session.commit(&refs)?;

    // The profile, once the image is stored: whatever becomes of it, the pull succeeded.
    if let Some(layer) = profile_layer {
        let source = format!("{url} (blob {})", layer.digest);
        report.profile = if !artifact::is_sha256_digest(&layer.digest) {
            crate::profile::dropped(
                &digest,
                url.as_str(),
                format!("its layer's digest {:?} is malformed", layer.digest),
            )
        } else if layer.size > MAX_PROFILE_BYTES {
            crate::profile::dropped(
                &digest,
                &source,
                format!(
                    "its layer is {} bytes, more than the {MAX_PROFILE_BYTES} a profile may have",
                    layer.size
                ),
            )
        } else {
            match registry
                .pull_bytes(
                    &layer.digest,
                    layer.size,
                    MAX_PROFILE_BYTES,
                    "access profile",
                )
                .await
            {
                Ok(bytes) => {
                    report.blobs_fetched += 1;
                    report.bytes_received += bytes.len() as u64;
                    let sizes: HashMap<Digest, u64> = needed.iter().copied().collect();
                    crate::profile::incoming(&store, &digest, &bytes, &sizes, &source)
                }
                Err(e) => crate::profile::dropped(&digest, &source, e.to_string()),
            }
        };
    }
    report.retries = registry.retries();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The manifest's layers must be the index's image and blobs, in order, and optionally an
/// access profile last (returned).
fn check_layers<'m>(
    manifest: &'m Manifest,
    index: &Index,
) -> Result<Option<&'m Descriptor>, String> {
    let Some((image, rest)) = manifest.layers.split_first() else {
        return Err("the manifest has no image layer".into());
    };
    let (packs, profile) = match rest.split_last() {
        Some((last, packs)) if last.media_type == artifact::PROFILE_MEDIA_TYPE => {
            (packs, Some(last))
        }
        _ => (rest, None),
    };
    if image.media_type != artifact::IMAGE_MEDIA_TYPE
        || image.digest != index.image.blob
        || image.size != index.image.size
    {
        return Err("the manifest's first layer is not the image the index names".into());
    }
    if packs.len() != index.blobs.len() {
        return Err(format!(
            "the manifest has {} pack layers, the index {}",
            packs.len(),
            index.blobs.len()
        ));
    }
    for (layer, blob) in packs.iter().zip(&index.blobs) {
        if layer.media_type != artifact::PACK_MEDIA_TYPE
            || layer.digest != blob.digest
            || layer.size != blob.size
        {
            return Err(format!(
                "layer {} ({}) differs from the index's blob {}",
                layer.digest, layer.media_type, blob.digest
            ));
        }
    }
    Ok(profile)
}

/// Downloads one blob into a staging file, then stores the objects of it that are missing.
/// If the blob's bytes are not what the manifest says, nothing of it is stored: its objects
/// are checked one by one to name the damaged one. `position` is the blob's place among the
/// artifact's packs (and their number). Returns (bytes downloaded, objects stored).
async fn fetch_blob(
    store: &Arc<Store>,
    registry: &Registry,
    blob: &BlobEntry,
    (position, packs): (usize, usize),
    missing: &Arc<HashSet<Digest>>,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let tmp = store.area_path(Area::Tmp);
    let mut file = tempfile::tempfile_in(&tmp)
        .map_err(|e| DistError::io("create a staging file in", &tmp, e))?;
    let what = format!("pack {} of {packs}", position + 1);
    let outcome = registry
        .pull_to_file(
            &blob.digest,
            blob.size,
            &mut file,
            &|n| progress.advance(n, 0),
            &what,
        )
        .await?;
    let size = blob.size;
    let store = store.clone();
    let blob = blob.clone();
    let missing = missing.clone();
    let url = registry.address().blob_url(&blob.digest);
    let stored = joined(
        tokio::task::spawn_blocking(move || {
            unpack(&store, &blob, position, file, outcome, &missing, &url)
        })
        .await,
    )?;
    progress.advance(0, stored);
    Ok((size, stored))
}

fn unpack(
    store: &Store,
    blob: &BlobEntry,
    position: usize,
    file: std::fs::File,
    outcome: Downloaded,
    missing: &HashSet<Digest>,
    url: &str,
) -> Result<u64> {
    let what = |i: usize, d: &Digest| {
        format!(
            "object {d} (number {} of {} in blob {}, pack {} of the artifact, {url})",
            i + 1,
            blob.objects.len(),
            blob.digest,
            position + 1
        )
    };
    let mut src = pack::decoder(BufReader::with_capacity(1 << 20, file), blob.object_bytes())?;
    if let Downloaded::Mismatch(found) = outcome {
        // Name the damaged object; store nothing.
        for (i, (d, s)) in blob.objects.iter().enumerate() {
            if let Some(reason) = ingest::diagnose(&mut src, d, *s) {
                return Err(DistError::Corrupt {
                    what: what(i, d),
                    reason: format!(
                        "{reason} (the blob's bytes hash to {found}, not {})",
                        blob.digest
                    ),
                });
            }
        }
        return Err(DistError::Corrupt {
            what: format!("blob {} ({url})", blob.digest),
            reason: format!("its bytes hash to {found} (the objects in it are intact)"),
        });
    }
    let mut stored = 0;
    for (i, (d, s)) in blob.objects.iter().enumerate() {
        if missing.contains(d) && !store.has(Kind::Object, d, *s)? {
            if ingest::store_object(store, &mut src, d, *s, &what(i, d))? {
                stored += 1;
            }
        } else {
            ingest::skip(&mut src, *s, &what(i, d))?;
        }
    }
    Ok(stored)
}
