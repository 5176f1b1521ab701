//! `/proc/self/mountinfo`, parsed — the one place velo reads it. Read as bytes and unescaped:
//! the kernel writes paths with their own bytes (not always UTF-8) and escapes space, tab,
//! newline and backslash as octal (`\040`…), so a mount point, root or layer path is compared
//! as the exact bytes of the path it names.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount ID (as `statx(STATX_MNT_ID)` reports it).
    pub id: u64,
    /// Parent mount ID.
    pub parent: u64,
    /// The filesystem's device number, `major:minor`.
    pub device: String,
    /// Root of the mount within its filesystem.
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (ro, nosuid, …).
    pub options: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (velo's are `velo:<digest>`).
    pub source: String,
    /// Per-superblock options (overlay layers, …) as mountinfo shows them: commas inside a
    /// value are escaped (`\054`), so split first, then unescape ([`MountInfo::super_option`]).
    pub super_options: Vec<u8>,
}

impl MountInfo {
    /// A per-superblock option's value, e.g. `upperdir`, with its bytes as they are.
    pub fn super_option(&self, key: &str) -> Option<OsString> {
        split_options(&self.super_options)
            .into_iter()
            .find_map(|o| {
                let o = unescape(&o);
                o.strip_prefix(key.as_bytes())
                    .and_then(|r| r.strip_prefix(b"="))
                    .map(|v| OsString::from_vec(v.to_vec()))
            })
    }

    /// True for an overlay velo mounted.
    pub fn is_velo(&self) -> bool {
        self.velo_image().is_some()
    }

    /// The image of a velo overlay (its source is `velo:<digest>`).
    pub fn velo_image(&self) -> Option<velo_objects::Digest> {
        if self.fstype != "overlay" {
            return None;
        }
        velo_objects::Digest::parse(self.source.strip_prefix(crate::SOURCE_PREFIX)?).ok()
    }
}

/// Splits mountinfo's escaped superblock options on their commas (a comma in a value is
/// `\054` there; a `\,` some kernels write is kept whole, for [`unescape`] to resolve).
fn split_options(s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = s.iter();
    while let Some(&c) = bytes.next() {
        match c {
            b'\\' => {
                cur.push(c);
                if let Some(&n) = bytes.next() {
                    cur.push(n);
                }
            }
            b',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Undoes mountinfo's octal escapes (`\040` for space, …) and a backslash before a comma;
/// anything else stays as it is.
fn unescape(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Three octal digits of at most \377 (one byte).
        let octal = b.get(i + 1..i + 4).filter(|d| {
            b[i] == b'\\' && d[0] <= b'3' && d.iter().all(|c| (b'0'..=b'7').contains(c))
        });
        if let Some(d) = octal {
            out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
            i += 4;
        } else if b[i] == b'\\' && b.get(i + 1) == Some(&b',') {
            out.push(b',');
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(&unescape(field)).into_owned()
}

/// Parses mountinfo's bytes; malformed lines are skipped.
pub fn parse(bytes: &[u8]) -> Vec<MountInfo> {
    bytes
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let sep = line.windows(3).position(|w| w == b" - ")?;
            let (pre, post) = (&line[..sep], &line[sep + 3..]);
            let pre: Vec<&[u8]> = pre.split(|&b| b == b' ').collect();
            let post: Vec<&[u8]> = post.splitn(3, |&b| b == b' ').collect();
            if pre.len() < 6 || post.len() < 3 {
                return None;
            }
            Some(MountInfo {
                id: std::str::from_utf8(pre[0]).ok()?.parse().ok()?,
                parent: std::str::from_utf8(pre[1]).ok()?.parse().ok()?,
                device: text(pre[2]),
                root: path(pre[3]),
                mount_point: path(pre[4]),
                options: text(pre[5]),
                fstype: text(post[0]),
                source: text(post[1]),
                super_options: post[2].to_vec(),
            })
        })
        .collect()
}

/// The mounts of the process whose `/proc` dir is `proc_dir` (`/proc/self`, `/proc/<pid>`).
pub fn read_at(proc_dir: &std::path::Path) -> std::io::Result<Vec<MountInfo>> {
    Ok(parse(&std::fs::read(proc_dir.join("mountinfo"))?))
}

/// This process's mounts.
pub fn read() -> std::io::Result<Vec<MountInfo>> {
    read_at(std::path::Path::new("/proc/self"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_overlay_line() {
        let text = "36 35 98:0 / /mnt/my\\040dir rw,nosuid,nodev shared:1 - overlay velo:abc ro,lowerdir+=/x,datadir+=/s/objects,upperdir=/u\\,v,metacopy=on\n\
                    bogus line\n";
        let m = parse(text.as_bytes());
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].id, 36);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/my dir"));
        assert_eq!(m[0].fstype, "overlay");
        assert!(!m[0].is_velo(), "velo:abc names no image");
        let d = "ab".repeat(32);
        let velo = parse(text.replace("velo:abc", &format!("velo:{d}")).as_bytes());
        assert_eq!(velo[0].velo_image().map(|i| i.to_hex()), Some(d));
        assert_eq!(m[0].super_option("upperdir"), Some("/u,v".into()));
        assert_eq!(m[0].super_option("metacopy"), Some("on".into()));
        assert_eq!(m[0].super_option("verity"), None);
    }

    /// The kernel's escaping in mountinfo: a path (`mangle()` in fs/proc_namespace.c) has
    /// space, tab, newline and backslash as octal; an option's value (`seq_show_option`) also
    /// its commas.
    fn mangle(p: &[u8], also: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &c in p {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\\') || also.contains(&c) {
                out.extend(format!("\\{c:03o}").bytes());
            } else {
                out.push(c);
            }
        }
        out
    }

    fn line(id: u64, mount_point: &[u8], upper: &[u8]) -> Vec<u8> {
        let mut l = format!("{id} 1 0:40 / ").into_bytes();
        l.extend(mangle(mount_point, b""));
        l.extend(b" ro,nosuid - overlay velo:ab ro,upperdir=");
        l.extend(mangle(upper, b","));
        l.extend(b",metacopy=on\n");
        l
    }

    #[test]
    fn paths_with_spaces_commas_newlines_and_non_utf8_bytes_come_back_exactly() {
        let odd: [&[u8]; 5] = [
            b"/srv/my dir",
            b"/srv/a,b\tc",
            b"/srv/line\nbreak",
            b"/srv/back\\slash\\040",
            b"/srv/\xff\xfe not utf-8",
        ];
        let mut text = b"garbage\n".to_vec();
        for (i, p) in odd.iter().enumerate() {
            text.extend(line(i as u64 + 10, p, p));
        }
        let m = parse(&text);
        assert_eq!(m.len(), odd.len());
        for (info, p) in m.iter().zip(odd) {
            let want = PathBuf::from(OsString::from_vec(p.to_vec()));
            assert_eq!(info.mount_point, want);
            assert_eq!(info.super_option("upperdir"), Some(want.into_os_string()));
            assert_eq!(info.super_option("metacopy"), Some("on".into()));
        }
    }

    proptest::proptest! {
        #[test]
        fn any_path_round_trips(p in proptest::collection::vec(1u8..=255, 1..64), id in 0u64..1_000_000) {
            let m = parse(&line(id, &p, &p));
            proptest::prop_assert_eq!(m.len(), 1);
            let want = PathBuf::from(OsString::from_vec(p.clone()));
            proptest::prop_assert_eq!(&m[0].mount_point, &want);
            proptest::prop_assert_eq!(m[0].super_option("upperdir"), Some(want.into_os_string()));
            proptest::prop_assert_eq!(m[0].id, id);
        }

        #[test]
        fn any_bytes_parse_without_panicking(b in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse(&b);
        }
    }
}
