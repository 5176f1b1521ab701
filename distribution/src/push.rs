//! `push`: a ref's image and objects to a registry, sending only blobs it does not have.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use velo_image::inspect;
use velo_objects::{Area, Digest, Kind, Store};

use crate::address::OciAddress;
use crate::artifact::{self, BlobEntry, ImageEntry, Index};
use crate::cache::BlobCache;
use crate::error::{DistError, Result};
use crate::pack::{self, PlannedBlob};
use crate::registry::Registry;
use crate::{Progress, joined};

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Blobs in flight at once.
    pub jobs: usize,
    /// Average pack size, bytes of objects before compression ([`pack::DEFAULT_PACK_TARGET`]).
    pub pack_target: u64,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            jobs: crate::DEFAULT_JOBS,
            pack_target: pack::DEFAULT_PACK_TARGET,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// The image pushed (its fs-verity digest).
    pub image: Digest,
    /// Where to.
    pub destination: String,
    /// The manifest's digest (`sha256:…`), to pin a pull with `…@sha256:…`.
    pub manifest: String,
    /// Distinct objects of the image.
    pub objects: u64,
    /// Their bytes.
    pub object_bytes: u64,
    /// Blobs of the artifact: the index, the image and the packs.
    pub blobs: u64,
    /// Blobs uploaded.
    pub blobs_sent: u64,
    /// Blobs the registry already had.
    pub blobs_skipped: u64,
    /// Bytes uploaded (compressed, as they travel), manifest included.
    pub bytes_sent: u64,
    /// Bytes of the blobs the registry already had.
    pub bytes_skipped: u64,
    /// Requests made again after a transient failure (a 5xx, a 429, a broken connection).
    pub retries: u64,
    /// The image's access profile, sent beside it (a layer of its own), if the store has one.
    pub profile: Option<crate::ProfileSent>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Pushes the image `image` (a ref or digest) of `store` to `dest` (which must name a tag).
pub fn push(
    store: Arc<Store>,
    image: &str,
    dest: &OciAddress,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushReport> {
    crate::runtime()?.block_on(push_async(store, image, dest, opts, progress))
}

enum Sent {
    Sent(u64),
    Skipped(u64),
}

async fn push_async(
    store: Arc<Store>,
    image: &str,
    dest: &OciAddress,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushReport> {
    let started = Instant::now();
    if dest.reference.digest().is_some() || !dest.explicit_tag {
        return Err(DistError::BadAddress {
            text: dest.to_string(),
            reason: "a push needs a tag to write, e.g. oci://HOST/REPO:TAG".into(),
        });
    }
    // Shared: a GC waits until the push has read every object it needs.
    let _lock = store.lock_shared()?;
    let digest = store.resolve(image)?;
    let ref_name = Digest::parse(image).is_err().then(|| image.to_owned());
    let image_bytes = inspect::read_image_bytes(&store, &digest)?;
    // A pull rebuilds the image and refuses it unless it comes out identical: check that now,
    // not on every machine that pulls.
    let fs = crate::ingest::check_image(&image_bytes, &digest, "the store")?;
    let objects = inspect::objects_in_path_order(&fs);
    for (d, s) in &objects {
        if !store.has(Kind::Object, d, *s)? {
            return Err(DistError::Corrupt {
                what: format!("object {}", store.object_path(d).display()),
                reason: format!(
                    "image {digest} needs it ({s} bytes) but the store does not have it; run \
                     `velo fsck`"
                ),
            });
        }
    }
    let profile = crate::profile::outgoing(&store, &digest, &objects);
    let plan = pack::plan(&objects, opts.pack_target);
    let object_bytes: u64 = objects.iter().map(|(_, s)| s).sum();
    progress.start(
        object_bytes + image_bytes.len() as u64,
        objects.len() as u64,
    );

    let registry = Registry::connect(dest).await?;
    let cache = Mutex::new(BlobCache::load(&store));
    let packs = plan.len();
    let results: Vec<(BlobEntry, Sent)> = futures_util::stream::iter(plan.into_iter().enumerate())
        .map(|(i, blob)| {
            let what = format!("pack {} of {packs}", i + 1);
            push_blob(&store, &registry, &cache, blob, what, progress)
        })
        .buffered(opts.jobs.max(1))
        .try_collect()
        .await?;

    let mut report = PushReport {
        image: digest,
        destination: dest.to_string(),
        manifest: String::new(),
        objects: objects.len() as u64,
        object_bytes,
        blobs: results.len() as u64 + 2,
        blobs_sent: 0,
        blobs_skipped: 0,
        bytes_sent: 0,
        bytes_skipped: 0,
        retries: 0,
        profile: None,
        seconds: 0.0,
    };
    let mut count = |s: &Sent| match s {
        Sent::Sent(n) => {
            report.blobs_sent += 1;
            report.bytes_sent += n;
        }
        Sent::Skipped(n) => {
            report.blobs_skipped += 1;
            report.bytes_skipped += n;
        }
    };
    for (_, s) in &results {
        count(s);
    }

    let image_blob = artifact::sha256_digest(&image_bytes);
    let image_size = image_bytes.len() as u64;
    let sent = push_small(&registry, image_bytes, &image_blob, "the image").await?;
    count(&sent);
    progress.advance(image_size, 0);

    // The profile: a blob of its own, never part of the image or the index.
    let mut profile_layer = None;
    if let Some(p) = &profile {
        let bytes = p.to_bytes();
        let blob = artifact::sha256_digest(&bytes);
        let size = bytes.len() as u64;
        let sent = push_small(&registry, bytes, &blob, "the access profile").await?;
        count(&sent);
        profile_layer = Some((blob, size));
    }

    let blobs: Vec<BlobEntry> = results.into_iter().map(|(b, _)| b).collect();
    let index = Index {
        format: artifact::INDEX_FORMAT.into(),
        version: artifact::INDEX_VERSION,
        image: ImageEntry {
            digest,
            size: image_size,
            blob: image_blob.clone(),
        },
        ref_name: ref_name.clone(),
        blobs,
    };
    let index_bytes = serde_json::to_vec(&index).map_err(|e| DistError::BadArtifact {
        url: dest.to_string(),
        reason: format!("cannot write the index: {e}"),
    })?;
    let index_blob = artifact::sha256_digest(&index_bytes);
    let index_size = index_bytes.len() as u64;
    let sent = push_small(&registry, index_bytes, &index_blob, "the index").await?;
    count(&sent);

    let manifest = manifest_json(
        &index,
        &index_blob,
        index_size,
        ref_name.as_deref(),
        profile_layer.as_ref().map(|(b, s)| (b.as_str(), *s)),
    );
    if manifest.len() > artifact::MAX_MANIFEST_BYTES {
        return Err(DistError::BadArtifact {
            url: dest.to_string(),
            reason: format!(
                "the manifest would be {} bytes, more than registries accept; push with a larger \
                 --pack-size",
                manifest.len()
            ),
        });
    }
    if let (Some(p), Some((_, size))) = (&profile, &profile_layer) {
        report.blobs += 1;
        report.profile = Some(crate::ProfileSent {
            runs: p.runs,
            files: p.entries.len() as u64,
            bytes: *size,
        });
    }
    report.bytes_sent += manifest.len() as u64;
    report.manifest = registry.push_manifest(manifest).await?;
    report.retries = registry.retries();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The manifest: the index as config, the image, then the packs, then the profile if any
/// (`profile`: its blob and size).
fn manifest_json(
    index: &Index,
    index_blob: &str,
    index_size: u64,
    ref_name: Option<&str>,
    profile: Option<(&str, u64)>,
) -> Vec<u8> {
    let mut layers = vec![serde_json::json!({
        "mediaType": artifact::IMAGE_MEDIA_TYPE,
        "digest": index.image.blob,
        "size": index.image.size,
        "annotations": { artifact::ANNOTATION_IMAGE: index.image.digest.to_hex() },
    })];
    for b in &index.blobs {
        layers.push(serde_json::json!({
            "mediaType": artifact::PACK_MEDIA_TYPE,
            "digest": b.digest,
            "size": b.size,
        }));
    }
    if let Some((blob, size)) = profile {
        layers.push(serde_json::json!({
            "mediaType": artifact::PROFILE_MEDIA_TYPE,
            "digest": blob,
            "size": size,
            "annotations": { artifact::ANNOTATION_IMAGE: index.image.digest.to_hex() },
        }));
    }
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        artifact::ANNOTATION_IMAGE.into(),
        index.image.digest.to_hex().into(),
    );
    if let Some(r) = ref_name {
        annotations.insert(artifact::ANNOTATION_REF.into(), r.into());
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": artifact::MANIFEST_MEDIA_TYPE,
        "artifactType": artifact::ARTIFACT_TYPE,
        "config": {
            "mediaType": artifact::INDEX_MEDIA_TYPE,
            "digest": index_blob,
            "size": index_size,
        },
        "layers": layers,
        "annotations": annotations,
    });
    serde_json::to_vec(&manifest).unwrap_or_default()
}

async fn push_small(registry: &Registry, data: Vec<u8>, digest: &str, what: &str) -> Result<Sent> {
    let n = data.len() as u64;
    if registry.blob_exists(digest, what).await? {
        return Ok(Sent::Skipped(n));
    }
    registry.push_bytes(data, digest, what).await?;
    Ok(Sent::Sent(n))
}

async fn push_blob(
    store: &Arc<Store>,
    registry: &Registry,
    cache: &Mutex<BlobCache>,
    blob: PlannedBlob,
    what: String,
    progress: &dyn Progress,
) -> Result<(BlobEntry, Sent)> {
    let key = blob.cache_key();
    let done = |digest: String, size: u64, sent: Sent| {
        progress.advance(blob.bytes(), blob.objects.len() as u64);
        Ok((
            BlobEntry {
                digest,
                size,
                objects: blob.objects.clone(),
            },
            sent,
        ))
    };
    let cached = cache.lock().map(|c| c.get(&key)).unwrap_or(None);
    if let Some((digest, size)) = cached
        && registry.blob_exists(&digest, &what).await?
    {
        return done(digest, size, Sent::Skipped(size));
    }
    let (file, digest, size) = {
        let store = store.clone();
        let blob = blob.clone();
        joined(
            tokio::task::spawn_blocking(move || {
                let tmp = store.area_path(Area::Tmp);
                let mut file = tempfile::tempfile_in(&tmp)
                    .map_err(|e| DistError::io("create a staging file in", tmp, e))?;
                let (digest, size) = pack::encode(&store, &blob, &mut file)?;
                Ok((file, digest, size))
            })
            .await,
        )?
    };
    if let Ok(mut c) = cache.lock() {
        c.record(&key, &digest, size);
    }
    if registry.blob_exists(&digest, &what).await? {
        return done(digest, size, Sent::Skipped(size));
    }
    registry.push_file(file, size, &digest, &what).await?;
    done(digest, size, Sent::Sent(size))
}
