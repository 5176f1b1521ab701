//! `export` / `import`: an image and all its objects as one stream in a file (for CI caches
//! that store files), every byte checked on import.
//!
//! ```text
//! "VELO-EXPORT\n" u32-le version (1)               uncompressed, so `head -c 12` tells what it is
//! zstd stream of:
//!   u64-le n, then n bytes of header JSON          {"image": {"digest", "size"}, "ref", "objects": [[digest, size]…], "profile": p}
//!   the image's bytes
//!   each object's bytes, in the header's order
//!   p bytes: the image's access profile            only if the header has "profile"
//! ```
//!
//! The access profile is an optional trailer, so the format keeps version 1 both ways: an
//! older velo ignores the header field it does not know and stops reading after the last
//! object; a file without a profile imports as before. A profile that is too large, does not
//! parse or names no object of the image is dropped with a warning, never failing the import.
//!
//! An import allocates as bytes arrive, never from a size the file claims: the header is parsed
//! as it streams (no string in it may be longer than a real one, no object may be listed
//! twice), the image's first block must describe an image of the size claimed, and the image
//! goes to the store's `tmp/` as it arrives, checked against its digest, and is parsed from
//! there (only the pages the parser reads are in memory).

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use velo_image::inspect;
use velo_objects::{Digest, Kind, MAX_PROFILE_BYTES, ProfileOutcome, Store, validate_ref_name};

use crate::error::{DistError, Result};
use crate::{Progress, ingest, pack};

const MAGIC: &[u8; 12] = b"VELO-EXPORT\n";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    image: HeaderImage,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    ref_name: Option<String>,
    #[serde(deserialize_with = "distinct_objects")]
    objects: Vec<(Digest, u64)>,
    /// Bytes of the access profile that follows the objects, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    profile: Option<u64>,
}

/// Longest string accepted in a header: digests have 64 characters, ref names at most 240.
const MAX_HEADER_STRING: usize = 1024;

/// The header's object list, refused at the first object listed twice: a list can only grow
/// with distinct entries, each of which costs the file bytes of its own.
fn distinct_objects<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<(Digest, u64)>, D::Error> {
    struct Distinct;
    impl<'de> serde::de::Visitor<'de> for Distinct {
        type Value = Vec<(Digest, u64)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of [digest, size] pairs, each object once")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            let mut seen = std::collections::HashSet::new();
            while let Some((digest, size)) = seq.next_element::<(Digest, u64)>()? {
                if !seen.insert(digest) {
                    return Err(serde::de::Error::custom(format!(
                        "object {digest} is listed twice"
                    )));
                }
                out.push((digest, size));
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Distinct)
}

/// Where a scan of JSON text is: inside a string or not, and how long the string is so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct JsonScan {
    in_string: bool,
    escaped: bool,
    len: usize,
}

impl JsonScan {
    /// Scans the next bytes of a JSON text; `Err` with the offset in `bytes` where a string
    /// becomes longer than `max` bytes (as written, escapes included). Pure: a text scanned in
    /// pieces gives the answer it gives whole.
    fn scan(&mut self, bytes: &[u8], max: usize) -> std::result::Result<(), usize> {
        for (i, &b) in bytes.iter().enumerate() {
            if !self.in_string {
                if b == b'"' {
                    self.in_string = true;
                    self.len = 0;
                }
                continue;
            }
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                continue;
            }
            self.len += 1;
            if self.len > max {
                return Err(i);
            }
        }
        Ok(())
    }
}

/// A reader of JSON text that fails as soon as a string in it grows longer than `max` bytes:
/// a parser keeps a string whole until it ends, so a string is what could make it allocate
/// more than a real header needs.
struct ShortStrings<R> {
    inner: R,
    scan: JsonScan,
    max: usize,
}

impl<R: Read> Read for ShortStrings<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan.scan(&buf[..n], self.max).map_err(|_| {
            std::io::Error::other(format!(
                "it holds a string longer than the {} bytes any real header has",
                self.max
            ))
        })?;
        Ok(n)
    }
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
    /// The image's access profile, written after the objects, if the store has one.
    pub profile: Option<crate::ProfileSent>,
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
    /// What became of the access profile in the file (a bad one is dropped, never failing
    /// the import).
    pub profile: ProfileOutcome,
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
    let profile = crate::profile::outgoing(store, &digest, &objects);
    let profile_bytes = profile.as_ref().map(velo_objects::Profile::to_bytes);
    let header = Header {
        image: HeaderImage {
            digest,
            size: image_bytes.len() as u64,
        },
        ref_name: ref_name.clone(),
        objects: objects.clone(),
        profile: profile_bytes.as_ref().map(|b| b.len() as u64),
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
    if let Some(bytes) = &profile_bytes {
        enc.write_all(bytes).map_err(werr)?;
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
        profile: profile.zip(profile_bytes).map(|(p, b)| crate::ProfileSent {
            runs: p.runs,
            files: p.entries.len() as u64,
            bytes: b.len() as u64,
        }),
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
        return Err(bad(format!(
            "its header claims {len} bytes, more than the {} velo reads",
            crate::artifact::MAX_INDEX_BYTES
        )));
    }
    // Parsed as it streams: what is allocated grows with what the header holds, never with
    // what its length claims (a claim of 512 MiB of whitespace costs a buffer).
    let header: Header = serde_json::from_reader(BufReader::with_capacity(
        64 << 10,
        ShortStrings {
            inner: (&mut dec).take(len),
            scan: JsonScan::default(),
            max: MAX_HEADER_STRING,
        },
    ))
    .map_err(|e| bad(format!("its header is malformed: {e}")))?;
    if let Some(r) = &header.ref_name {
        validate_ref_name(r)?;
    }
    let digest = header.image.digest;
    let size = header.image.size;
    if size > inspect::MAX_IMAGE_BYTES {
        return Err(bad(format!(
            "its image claims {size} bytes, more than the {} velo reads",
            inspect::MAX_IMAGE_BYTES
        )));
    }

    // Shared lock and a writer marker, held until the ref is written; taken before the image
    // is staged in tmp/, where GC must leave it alone.
    let session = store.begin_write()?;
    // The image's first block must describe an image of the size claimed before any more of
    // it is read; then it goes to disk as it arrives, checked against its digest, and is
    // parsed from there.
    let mut start = vec![0u8; (size as usize).min(velo_image::IMAGE_START)];
    dec.read_exact(&mut start)
        .map_err(|e| corrupt(&format!("image {digest}"), e))?;
    velo_image::check_image_start(&start, size).map_err(|reason| {
        bad(format!(
            "its image {digest} ({size} bytes claimed) is not one velo writes: {reason}"
        ))
    })?;
    let image_what = format!("image {digest} in {name}");
    let mut rest = start
        .as_slice()
        .chain((&mut dec).take(size - start.len() as u64));
    let pending = ingest::stage_image(store, &mut rest, &digest, size, &image_what)?;
    let fs = ingest::check_staged_image(&pending.map()?, &digest, &name)?;

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

    let mut report = ImportReport {
        image: digest,
        ref_name: None,
        file: name.clone(),
        objects: header.objects.len() as u64,
        objects_new: 0,
        objects_present: 0,
        bytes_read: 0,
        new_image: false,
        profile: ProfileOutcome::None,
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
    // The profile trailer: read (at most MAX_PROFILE_BYTES) before the ref is written, taken
    // in after; a bad one is dropped, the image imports all the same.
    let profile_source = format!("{name} (its profile trailer)");
    let profile: Option<std::result::Result<Vec<u8>, String>> = header.profile.map(|len| {
        if len > MAX_PROFILE_BYTES {
            return Err(format!(
                "it is {len} bytes, more than the {MAX_PROFILE_BYTES} a profile may have"
            ));
        }
        let mut bytes = Vec::new();
        match (&mut dec).take(len).read_to_end(&mut bytes) {
            Ok(n) if n as u64 == len => Ok(bytes),
            Ok(n) => Err(format!("only {n} of its {len} bytes are in the file")),
            Err(e) => Err(format!("it does not decompress: {e}")),
        }
    });
    let stored = pending.publish()?;
    report.new_image = stored.new;
    let ref_name = if no_ref {
        None
    } else {
        ref_name.map(str::to_owned).or(header.ref_name)
    };
    let refs: Vec<(&str, Digest)> = ref_name.iter().map(|n| (n.as_str(), digest)).collect();
    session.commit(&refs)?;
    drop(dec);
    report.profile = match profile {
        None => ProfileOutcome::None,
        Some(Err(reason)) => crate::profile::dropped(&digest, &profile_source, reason),
        Some(Ok(bytes)) => {
            let sizes: std::collections::HashMap<Digest, u64> =
                header.objects.iter().copied().collect();
            crate::profile::incoming(store, &digest, &bytes, &sizes, &profile_source)
        }
    };
    report.ref_name = ref_name;
    report.bytes_read = counted.n;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scan_all(text: &[u8], max: usize) -> std::result::Result<(), usize> {
        JsonScan::default().scan(text, max)
    }

    #[test]
    fn a_long_string_is_found_where_it_grows_too_long() {
        assert_eq!(scan_all(br#"{"a": "xyz"}"#, 3), Ok(()));
        assert_eq!(scan_all(br#"{"a": "xyzw"}"#, 3), Err(10));
        // Escapes count as written, and an escaped quote does not end the string.
        assert_eq!(scan_all(br#"["\"\"", "ab"]"#, 4), Ok(()));
        assert_eq!(scan_all(br#"["\"\"\"", "ab"]"#, 4), Err(6));
        // Long runs outside strings (whitespace, numbers) are not strings.
        assert_eq!(scan_all(&[b' '; 10_000], 3), Ok(()));
    }

    proptest! {
        /// Any strings of at most `max` characters, serialised by serde_json (escapes and
        /// all), pass; a scan in pieces gives the answer of a scan whole.
        #[test]
        fn real_json_passes_and_pieces_do_not_matter(
            strings in proptest::collection::vec(".{0,40}", 0..20),
            cut in any::<prop::sample::Index>(),
            max in 1usize..300,
        ) {
            let text = serde_json::to_vec(&strings).unwrap_or_default();
            let longest = strings
                .iter()
                .map(|s| serde_json::to_string(s).map_or(0, |q| q.len() - 2))
                .max()
                .unwrap_or(0);
            let whole = scan_all(&text, max);
            prop_assert_eq!(whole.is_ok(), longest <= max);
            let at = cut.index(text.len() + 1);
            let mut scan = JsonScan::default();
            let pieces = scan
                .scan(&text[..at], max)
                .and_then(|()| scan.scan(&text[at..], max).map_err(|i| i + at));
            prop_assert_eq!(pieces, whole);
        }

        /// Any bytes at all: an answer, never a panic.
        #[test]
        fn any_bytes_are_scanned(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = scan_all(&bytes, 16);
        }
    }

    #[test]
    fn an_object_listed_twice_is_refused_while_parsing() {
        let d = "ab".repeat(32);
        let once = format!(r#"{{"image":{{"digest":"{d}","size":4096}},"objects":[["{d}",1]]}}"#);
        assert!(serde_json::from_str::<Header>(&once).is_ok());
        let twice = format!(
            r#"{{"image":{{"digest":"{d}","size":4096}},"objects":[["{d}",1],["{d}",2]]}}"#
        );
        let err = serde_json::from_str::<Header>(&twice).expect_err("refused");
        assert!(err.to_string().contains("listed twice"), "{err}");
    }
}
