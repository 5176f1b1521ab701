//! `/proc/self/mountinfo`, parsed.

use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount ID (as `statx(STATX_MNT_ID)` reports it).
    pub id: u64,
    /// Parent mount ID.
    pub parent: u64,
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
    /// Per-superblock options (overlay layers, …).
    pub super_options: String,
}

impl MountInfo {
    /// A per-superblock option's value, e.g. `upperdir`.
    pub fn super_option(&self, key: &str) -> Option<String> {
        split_options(&self.super_options)
            .into_iter()
            .find_map(|o| {
                o.strip_prefix(key)
                    .and_then(|r| r.strip_prefix('='))
                    .map(str::to_owned)
            })
    }

    /// True for an overlay velo mounted.
    pub fn is_velo(&self) -> bool {
        self.fstype == "overlay" && self.source.starts_with(crate::SOURCE_PREFIX)
    }
}

/// Splits mount options on commas, honouring overlay's `\,` escapes.
fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Undoes mountinfo's octal escapes (`\040` for space, …).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.splitn(3, ' ').collect();
            if pre.len() < 6 || post.len() < 3 {
                return None;
            }
            Some(MountInfo {
                id: pre[0].parse().ok()?,
                parent: pre[1].parse().ok()?,
                root: unescape(pre[3]).into(),
                mount_point: unescape(pre[4]).into(),
                options: pre[5].to_owned(),
                fstype: post[0].to_owned(),
                source: unescape(post[1]),
                super_options: unescape(post[2]),
            })
        })
        .collect()
}

/// This process's mounts.
pub fn read() -> std::io::Result<Vec<MountInfo>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_overlay_line() {
        let text = "36 35 98:0 / /mnt/my\\040dir rw,nosuid,nodev shared:1 - overlay velo:abc ro,lowerdir+=/x,datadir+=/s/objects,upperdir=/u\\,v,metacopy=on\n\
                    bogus line\n";
        let m = parse(text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].id, 36);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/my dir"));
        assert_eq!(m[0].fstype, "overlay");
        assert!(m[0].is_velo() == m[0].source.starts_with("velo:"));
        assert_eq!(m[0].super_option("upperdir").as_deref(), Some("/u,v"));
        assert_eq!(m[0].super_option("metacopy").as_deref(), Some("on"));
        assert_eq!(m[0].super_option("verity"), None);
    }
}
