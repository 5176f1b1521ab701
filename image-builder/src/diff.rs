//! What a copy-on-write layer changed relative to its image, read from the overlay upper dir:
//! new and modified files, whiteouts (deletions), opaque directories (contents replaced) and
//! metadata-only copy-ups.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cfs::{self, FileSystem};
use crate::error::{ImageError, Result};
use crate::scan::read_xattrs;

/// One change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Path relative to the mount root.
    pub path: PathBuf,
    /// `added`, `changed`, `metadata` (only owner/mode/times/xattrs changed) or `deleted`.
    pub kind: &'static str,
    /// Extra information (e.g. `directory contents replaced (opaque)`, `renamed from …`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

const OPAQUE: &str = "trusted.overlay.opaque";
const WHITEOUT: &str = "trusted.overlay.whiteout";
const METACOPY: &str = "trusted.overlay.metacopy";
const REDIRECT: &str = "trusted.overlay.redirect";

fn xattr(list: &[(std::ffi::OsString, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    list.iter()
        .find(|(k, _)| k.as_bytes() == name.as_bytes())
        .map(|(_, v)| v.clone())
}

/// True if `rel` exists in the image (any type).
fn in_image(fs: &FileSystem, rel: &Path) -> bool {
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return true; // the root
    };
    fs.root
        .get_directory_opt(parent.as_os_str())
        .ok()
        .flatten()
        .is_some_and(|d| d.lookup(name).is_some())
}

/// Every path under `rel` in the image (for an opaque directory: all of it is hidden).
fn image_entries_under(fs: &FileSystem, rel: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    cfs::for_each_entry(fs, |p, _| {
        if p.starts_with(rel) && p != rel {
            out.push(p.to_owned());
        }
    });
    out
}

/// The changes an upper dir holds relative to `image`, sorted by path.
pub fn diff_upper(image: &FileSystem, upper: &Path) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    walk(image, upper, Path::new(""), &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(image: &FileSystem, upper: &Path, rel: &Path, out: &mut Vec<Change>) -> Result<()> {
    let dir = upper.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| ImageError::io("read", &dir, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| ImageError::io("read", &dir, e))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = upper.join(&rel);
        let md = std::fs::symlink_metadata(&path).map_err(|e| ImageError::io("stat", &path, e))?;
        let xattrs = read_xattrs(&path)?;
        let existed = in_image(image, &rel);
        let ft = md.file_type();
        let is_whiteout =
            (ft.is_char_device() && md.rdev() == 0) || xattr(&xattrs, WHITEOUT).is_some();
        if is_whiteout {
            if existed {
                out.push(Change {
                    path: rel,
                    kind: "deleted",
                    detail: None,
                });
            }
            continue;
        }
        if ft.is_dir() {
            let opaque = xattr(&xattrs, OPAQUE).is_some_and(|v| v == b"y");
            let redirect =
                xattr(&xattrs, REDIRECT).map(|v| String::from_utf8_lossy(&v).into_owned());
            if !existed || redirect.is_some() {
                out.push(Change {
                    path: rel.clone(),
                    kind: "added",
                    detail: redirect
                        .map(|from| format!("renamed from {}", from.trim_start_matches('/'))),
                });
            } else if opaque {
                for gone in image_entries_under(image, &rel) {
                    out.push(Change {
                        path: gone,
                        kind: "deleted",
                        detail: Some(format!(
                            "directory {} contents replaced (opaque)",
                            rel.display()
                        )),
                    });
                }
            }
            walk(image, upper, &rel, out)?;
            continue;
        }
        let kind = if !existed {
            "added"
        } else if xattr(&xattrs, METACOPY).is_some() {
            "metadata"
        } else {
            "changed"
        };
        out.push(Change {
            path: rel,
            kind,
            detail: None,
        });
    }
    Ok(())
}
