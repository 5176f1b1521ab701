//! `export` / `import`: an image and all its objects as one stream in a file (for CI caches
//! that store files), every byte checked on import.
//!
//! ```text
//! "VELO-EXPORT\n" u32-le version (1)               uncompressed, so `head -c 12` tells what it is
//! zstd stream of:
//!   u64-le n, then n bytes of header JSON          {"image": {"digest", "size"}, "ref", "objects": [[digest, size]…]}
//!   the image's bytes
//!   each object's bytes, in the header's order
//! ```

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use velo_image::inspect;
use velo_objects::{Digest, Kind, Store, validate_ref_name};

use crate::error::{DistError, Result};
use crate::{Progress, ingest, pack};

const MAGIC: &[u8; 12] = b"VELO-EXPORT\n";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    image: HeaderImage,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    ref_name: Option<String>,
    objects: Vec<(Digest, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct HeaderImage {
    digest: Digest,
    size: u64,
}

/// What an export did.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The image exported.
    pub image: Digest,
    /// The ref recorded in the file, if it was exported by ref.
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    /// The file (`-` for standard output).
    pub file: String,
    /// Objects written.
    pub objects: u64,
    /// Their bytes.
    pub object_bytes: u64,
    /// Bytes of the file.
    pub bytes_written: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The image imported.
    pub image: Digest,
    /// The ref written, if any.
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    /// The file (`-` for standard input).
    pub file: String,
    /// Objects in the file.
    pub objects: u64,
    /// Objects stored by this import.
    pub objects_new: u64,
    /// Objects the store already had.
    pub objects_present: u64,
    /// Bytes of the file read.
    pub bytes_read: u64,
    /// True if the image itself was new to the store.
    pub new_image: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Writes the image `image` (ref or digest) and all its objects to `file` (`-`: standard
/// output). A file is written beside its final name and renamed into place when complete.
pub fn export(
    store: &Store,
    image: &str,
    file: &Path,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let started = Instant::now();
    let _lock = store.lock_shared()?;
    let digest = store.resolve(image)?;
    let ref_name = Digest::parse(image).is_err().then(|| image.to_owned());
    let image_bytes = inspect::read_image_bytes(store, &digest)?;
    let fs = ingest::check_image(&image_bytes, &digest, "the store")?;
    let objects = inspect::objects_in_path_order(&fs);
    let object_bytes: u64 = objects.iter().map(|(_, s)| s).sum();
    progress.start(object_bytes, objects.len() as u64);
    let header = Header {
        image: HeaderImage {
            digest,
            size: image_bytes.len() as u64,
        },
        ref_name: ref_name.clone(),
        objects: objects.clone(),
    };
    let to_stdout = file.as_os_str() == "-";
    let (out, tmp): (Box<dyn Write>, Option<tempfile::NamedTempFile>) = if to_stdout {
        (Box::new(std::io::stdout().lock()), None)
    } else {
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".velo-export-")
            .tempfile_in(dir)
            .map_err(|e| DistError::io("create a file in", dir, e))?;
        let f = tmp
            .as_file()
            .try_clone()
            .map_err(|e| DistError::io("open", tmp.path(), e))?;
        (Box::new(f), Some(tmp))
    };
    let werr = |e: std::io::Error| DistError::io("write", file, e);
    let mut counted = Counting {
        inner: BufWriter::with_capacity(1 << 20, out),
        n: 0,
    };
    counted.write_all(MAGIC).map_err(werr)?;
    counted.write_all(&VERSION.to_le_bytes()).map_err(werr)?;
    let mut enc = zstd::stream::Encoder::new(&mut counted, pack::ZSTD_LEVEL).map_err(werr)?;
    enc.include_checksum(true).map_err(werr)?;
    let header_bytes = serde_json::to_vec(&header).map_err(|e| werr(std::io::Error::other(e)))?;
    enc.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(werr)?;
    enc.write_all(&header_bytes).map_err(werr)?;
    enc.write_all(&image_bytes).map_err(werr)?;
    let mut buf = vec![0u8; 1 << 20];
    for (d, size) in &objects {
        let path = store.object_path(d);
        let mut f = std::fs::File::from(store.open_object(d)?);
        let mut left = *size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f
                .read(&mut buf[..want])
                .map_err(|e| DistError::io("read", &path, e))?;
            if n == 0 {
                return Err(DistError::Corrupt {
                    what: format!("object {}", path.display()),
                    reason: format!(
                        "it is shorter than the {size} bytes the image says; run `velo fsck`"
                    ),
                });
            }
            enc.write_all(&buf[..n]).map_err(werr)?;
            left -= n as u64;
        }
        progress.advance(*size, 1);
    }
    enc.finish().map_err(werr)?;
    counted.flush().map_err(werr)?;
    let bytes_written = counted.n;
    drop(counted);
    if let Some(tmp) = tmp {
        tmp.as_file()
            .sync_all()
            .map_err(|e| DistError::io("fsync", tmp.path(), e))?;
        tmp.persist(file)
            .map_err(|e| DistError::io("rename into place", file, e.error))?;
    }
    Ok(ExportReport {
        image: digest,
        ref_name,
        file: file.display().to_string(),
        objects: objects.len() as u64,
        object_bytes,
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Reads a file written by [`export`] (`-`: standard input) into `store`, checking the image
/// (digest and rebuild) and every object. Points `ref_name` — or, without it, the ref recorded
/// in the file — at the image, unless `no_ref`.
pub fn import(
    store: &Store,
    file: &Path,
    ref_name: Option<&str>,
    no_ref: bool,
    progress: &dyn Progress,
) -> Result<ImportReport> {
    let started = Instant::now();
    if let Some(r) = ref_name {
        validate_ref_name(r)?;
    }
    let name = file.display().to_string();
    let bad = |reason: String| DistError::BadArtifact {
        url: name.clone(),
        reason,
    };
    let input: Box<dyn Read> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(file).map_err(|e| DistError::io("open", file, e))?)
    };
    let mut counted = Counting {
        inner: BufReader::with_capacity(1 << 20, input),
        n: 0,
    };
    let mut magic = [0u8; 16];
    counted
        .read_exact(&mut magic)
        .map_err(|e| bad(format!("not a velo export file (too short: {e})")))?;
    if &magic[..12] != MAGIC {
        return Err(bad(
            "not a velo export file (it does not start with VELO-EXPORT)".into(),
        ));
    }
    let version = u32::from_le_bytes([magic[12], magic[13], magic[14], magic[15]]);
    if version != VERSION {
        return Err(bad(format!(
            "export format version {version} is not supported by this velo (it reads {VERSION})"
        )));
    }
    let corrupt = |what: &str, e: std::io::Error| DistError::Corrupt {
        what: format!("{what} in {name}"),
        reason: e.to_string(),
    };
    let mut dec = zstd::stream::Decoder::new(&mut counted).map_err(|e| corrupt("the stream", e))?;
    let mut len = [0u8; 8];
    dec.read_exact(&mut len)
        .map_err(|e| corrupt("the header", e))?;
    let len = u64::from_le_bytes(len);
    if len > crate::artifact::MAX_INDEX_BYTES {
        return Err(bad(format!("its header claims {len} bytes")));
    }
    let mut header_bytes = vec![0u8; len as usize];
    dec.read_exact(&mut header_bytes)
        .map_err(|e| corrupt("the header", e))?;
    let header: Header = serde_json::from_slice(&header_bytes)
        .map_err(|e| bad(format!("its header is malformed: {e}")))?;
    if let Some(r) = &header.ref_name {
        validate_ref_name(r)?;
    }
    let digest = header.image.digest;
    if header.image.size > inspect::MAX_IMAGE_BYTES {
        return Err(bad(format!("its image claims {} bytes", header.image.size)));
    }
    let mut image_bytes = vec![0u8; header.image.size as usize];
    dec.read_exact(&mut image_bytes)
        .map_err(|e| corrupt(&format!("image {digest}"), e))?;
    let fs = ingest::check_image(&image_bytes, &digest, &name)?;

    // The file must list exactly the objects the image needs, each once.
    let mut needed: std::collections::HashMap<Digest, u64> =
        inspect::objects(&fs).into_iter().collect();
    if header.objects.len() != needed.len() {
        return Err(bad(format!(
            "it lists {} objects, the image needs {}",
            header.objects.len(),
            needed.len()
        )));
    }
    for (d, s) in &header.objects {
        match needed.remove(d) {
            Some(size) if size == *s => {}
            Some(size) => {
                return Err(bad(format!(
                    "it says object {d} has {s} bytes, the image says {size}"
                )));
            }
            None => {
                return Err(bad(format!(
                    "it lists object {d} twice, or one the image does not need"
                )));
            }
        }
    }
    let object_bytes: u64 = header.objects.iter().map(|(_, s)| s).sum();
    progress.start(object_bytes, header.objects.len() as u64);

    let session = store.begin_write()?;
    let mut report = ImportReport {
        image: digest,
        ref_name: None,
        file: name.clone(),
        objects: header.objects.len() as u64,
        objects_new: 0,
        objects_present: 0,
        bytes_read: 0,
        new_image: false,
        seconds: 0.0,
    };
    for (i, (d, s)) in header.objects.iter().enumerate() {
        let what = format!(
            "object {d} (number {} of {} in {name})",
            i + 1,
            header.objects.len()
        );
        if store.has(Kind::Object, d, *s)? {
            ingest::skip(&mut dec, *s, &what)?;
            report.objects_present += 1;
        } else if ingest::store_object(store, &mut dec, d, *s, &what)? {
            report.objects_new += 1;
        } else {
            report.objects_present += 1;
        }
        progress.advance(*s, 1);
    }
    let stored = store.store_verified(
        Kind::Image,
        &mut image_bytes.as_slice(),
        &digest,
        image_bytes.len() as u64,
        &format!("image {digest} from {name}"),
    )?;
    report.new_image = stored.new;
    let ref_name = if no_ref {
        None
    } else {
        ref_name.map(str::to_owned).or(header.ref_name)
    };
    let refs: Vec<(&str, Digest)> = ref_name.iter().map(|n| (n.as_str(), digest)).collect();
    session.commit(&refs)?;
    drop(dec);
    report.ref_name = ref_name;
    report.bytes_read = counted.n;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
