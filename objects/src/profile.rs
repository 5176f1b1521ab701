//! Access profiles: which of an image's objects commands read as they start, in first-read
//! order, so that the next run (on this machine or, pushed with the image, on another) can have
//! them read ahead before it asks.
//!
//! A profile lives beside its image, in `profiles/<image digest>`, and is never part of the
//! image: it does not change the image's digest, and nothing trusts it for correctness — a
//! wrong profile only reads the wrong files ahead. It is bounded ([`MAX_ENTRIES`],
//! [`MAX_PROFILE_BYTES`]) and only ever names objects of its image (whoever writes one
//! filters it against the image first).
//!
//! The text form is JSON: `{"version":1,"runs":N,"files":[["<digest>",size,hits],…]}` in
//! read-ahead order. Parsing ([`Profile::parse`]) is a pure function of the bytes.

use std::collections::HashMap;
use std::os::fd::AsFd;

use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, OpenError, open_regular_beneath};
use crate::store::{Area, Store};

/// A profile names at most this many objects (the first ones a command reads).
pub const MAX_ENTRIES: usize = 65_536;
/// A profile file is at most this large (65,536 entries take ~5.5 MB).
pub const MAX_PROFILE_BYTES: u64 = 8 << 20;
/// Profiles being written are staged under this prefix in `profiles/`.
const PROFILE_TMP_PREFIX: &str = ".tmp-";
/// The format version written and read.
pub const PROFILE_VERSION: u32 = 1;

/// One object a profile names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileEntry {
    /// The object.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// In how many of the recorded runs it was read.
    pub hits: u32,
}

/// The objects of one image that commands read first, in the order to read them ahead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// How many runs were recorded into it.
    pub runs: u32,
    /// The objects, in read-ahead order, each once.
    pub entries: Vec<ProfileEntry>,
}

/// What became of a profile that came with an image (pull, import, an import through
/// velo-mountd). A profile is only ever a hint: whatever became of it, the image is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum ProfileOutcome {
    /// None came with the image.
    None,
    /// It is now the image's profile.
    Stored {
        /// Runs it was recorded over.
        runs: u32,
        /// Objects it names (of the image).
        files: u64,
    },
    /// The store's own profile of the image, recorded over more runs, was kept.
    KeptLocal {
        /// Runs the store's profile was recorded over.
        runs: u32,
        /// Objects it names.
        files: u64,
    },
    /// It was refused (too large, malformed, naming no object of the image, or it could
    /// not be read or stored); the image was stored all the same.
    Dropped {
        /// Why.
        reason: String,
    },
}

/// Why a profile's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// Larger than [`MAX_PROFILE_BYTES`].
    #[error("{size} bytes, more than the {MAX_PROFILE_BYTES} a profile may have")]
    TooLarge {
        /// Its size.
        size: u64,
    },
    /// Not a profile: bad JSON, wrong fields, a bad digest, an object twice, too many entries.
    #[error("{0}")]
    Malformed(String),
    /// Written by a newer velo.
    #[error("format version {0}; this velo reads version {PROFILE_VERSION}")]
    Version(u32),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    version: u32,
    runs: u32,
    files: Vec<(String, u64, u32)>,
}

impl Profile {
    /// A profile of one run: the objects it read, in first-read order (repeats are dropped).
    pub fn of_run(reads: &[(Digest, u64)]) -> Self {
        let mut p = Profile::default();
        p.merge_run(reads);
        p
    }

    /// Adds one run's reads (first-read order). Each object's place becomes the mean of its
    /// relative places (0 = first, 1 = last) over the runs that read it, so the order follows
    /// what most runs do; objects no run read twice sink below those every run reads only
    /// when the profile must be cut to [`MAX_ENTRIES`].
    pub fn merge_run(&mut self, reads: &[(Digest, u64)]) {
        let mut seen = std::collections::HashSet::new();
        let run: Vec<(Digest, u64)> = reads
            .iter()
            .copied()
            .filter(|(d, _)| seen.insert(*d))
            .collect();
        if run.is_empty() {
            return;
        }
        // (mean relative place, hits, size) per object.
        let mut places: HashMap<Digest, (f64, u32, u64)> = HashMap::new();
        let old = self.entries.len();
        for (i, e) in self.entries.iter().enumerate() {
            places.insert(e.digest, (relative(i, old), e.hits, e.size));
        }
        let new = run.len();
        for (i, (digest, size)) in run.iter().enumerate() {
            let at = relative(i, new);
            places
                .entry(*digest)
                .and_modify(|(mean, hits, s)| {
                    *mean = (*mean * f64::from(*hits) + at) / f64::from(*hits + 1);
                    *hits += 1;
                    *s = *size;
                })
                .or_insert((at, 1, *size));
        }
        let mut all: Vec<(Digest, (f64, u32, u64))> = places.into_iter().collect();
        if all.len() > MAX_ENTRIES {
            // Keep the objects most runs read, earliest first.
            all.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(a.1.0.total_cmp(&b.1.0)));
            all.truncate(MAX_ENTRIES);
        }
        all.sort_by(|a, b| a.1.0.total_cmp(&b.1.0).then(a.0.cmp(&b.0)));
        self.entries = all
            .into_iter()
            .map(|(digest, (_, hits, size))| ProfileEntry { digest, size, hits })
            .collect();
        self.runs = self.runs.saturating_add(1);
    }

    /// Adds a run recorded to refresh a settled profile: objects it read count once more (at
    /// most `cap` times) and take its order into account; objects it did not read count once
    /// less, and go when no run counts them any more — so what a project's code stopped
    /// importing ages out over `cap` refreshes, and what it imports now comes in. A run that
    /// read nothing changes nothing.
    pub fn refresh_run(&mut self, reads: &[(Digest, u64)], cap: u32) {
        if reads.is_empty() {
            return;
        }
        let read: std::collections::HashSet<Digest> = reads.iter().map(|(d, _)| *d).collect();
        self.merge_run(reads);
        for e in &mut self.entries {
            if !read.contains(&e.digest) {
                e.hits = e.hits.saturating_sub(1);
            }
            e.hits = e.hits.min(cap.max(1));
        }
        self.entries.retain(|e| e.hits > 0);
    }

    /// Keeps only the objects `keep` accepts (those of the profile's image), in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&Digest) -> bool) {
        self.entries.retain(|e| keep(&e.digest));
    }

    /// A profile that came from elsewhere (a registry, an export file, a client): parsed
    /// ([`Profile::parse`], so bounded), then cut to the objects of its image (`objects`:
    /// digest → size, from the image itself), each with the image's size for it. A profile
    /// that names none of them is refused: it would read nothing ahead.
    pub fn from_untrusted(
        bytes: &[u8],
        objects: &HashMap<Digest, u64>,
    ) -> std::result::Result<Self, ProfileError> {
        let mut p = Profile::parse(bytes)?;
        let named = p.entries.len();
        p.retain(|d| objects.contains_key(d));
        if p.entries.is_empty() {
            return Err(ProfileError::Malformed(format!(
                "none of the {named} objects it names is an object of the image"
            )));
        }
        for e in &mut p.entries {
            if let Some(size) = objects.get(&e.digest) {
                e.size = *size;
            }
        }
        Ok(p)
    }

    /// The bytes of the objects it names.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// What reading all of them ahead takes in the page cache: each size rounded up to 4 KiB
    /// pages.
    pub fn cached_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.size.div_ceil(4096) * 4096)
            .sum()
    }

    /// Parses a profile's bytes (pure; bounded by [`MAX_PROFILE_BYTES`] and [`MAX_ENTRIES`]).
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, ProfileError> {
        if bytes.len() as u64 > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooLarge {
                size: bytes.len() as u64,
            });
        }
        let wire: Wire =
            serde_json::from_slice(bytes).map_err(|e| ProfileError::Malformed(e.to_string()))?;
        if wire.version != PROFILE_VERSION {
            return Err(ProfileError::Version(wire.version));
        }
        if wire.files.len() > MAX_ENTRIES {
            return Err(ProfileError::Malformed(format!(
                "{} files, more than the {MAX_ENTRIES} a profile may name",
                wire.files.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut entries = Vec::with_capacity(wire.files.len());
        for (hex, size, hits) in wire.files {
            let digest = Digest::parse(&hex).map_err(|e| ProfileError::Malformed(e.to_string()))?;
            if !seen.insert(digest) {
                return Err(ProfileError::Malformed(format!(
                    "object {hex} is named twice"
                )));
            }
            entries.push(ProfileEntry { digest, size, hits });
        }
        Ok(Profile {
            runs: wire.runs,
            entries,
        })
    }

    /// The text form [`Profile::parse`] reads.
    pub fn to_bytes(&self) -> Vec<u8> {
        let wire = Wire {
            version: PROFILE_VERSION,
            runs: self.runs,
            files: self
                .entries
                .iter()
                .map(|e| (e.digest.to_hex(), e.size, e.hits))
                .collect(),
        };
        // Serializing strings and integers cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }
}

/// `i`'s place among `n`, from 0 (first) to 1 (last).
fn relative(i: usize, n: usize) -> f64 {
    if n <= 1 {
        0.0
    } else {
        i as f64 / (n - 1) as f64
    }
}

impl Store {
    /// The profile of `image`, if it has one. A profile that cannot be parsed is an error
    /// naming its path ([`StoreError::CorruptProfile`]); callers that only read ahead treat
    /// that as no profile.
    pub fn read_profile(&self, image: &Digest) -> Result<Option<Profile>> {
        let dir = self.open_area(Area::Profiles)?;
        let name = image.to_hex();
        let path = self.area_path(Area::Profiles).join(&name);
        let (fd, st) = match open_regular_beneath(dir.as_fd(), &name, OFlags::RDONLY, Mode::empty())
        {
            Ok(opened) => opened,
            Err(OpenError::Sys(rustix::io::Errno::NOENT)) => return Ok(None),
            Err(e) => return Err(StoreError::from_open("open", &path, e)),
        };
        let bytes = fsutil::read_capped(fd.as_fd(), &st, MAX_PROFILE_BYTES)
            .map_err(|e| StoreError::from_read("read", &path, e))?;
        Profile::parse(&bytes)
            .map(Some)
            .map_err(|e| StoreError::CorruptProfile {
                path,
                reason: e.to_string(),
            })
    }

    /// What identifies the current version of `image`'s profile file (inode, change time,
    /// size), for callers that keep profiles in memory; `None` if it has none.
    pub fn profile_stamp(&self, image: &Digest) -> Option<(u64, i64, i64, u64)> {
        let dir = self.open_area(Area::Profiles).ok()?;
        let st = rustix::fs::statat(
            dir.as_fd(),
            image.to_hex().as_str(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .ok()?;
        Some((
            st.st_ino,
            st.st_ctime,
            st.st_ctime_nsec as i64,
            st.st_size as u64,
        ))
    }

    /// Replaces the profile of `image` (atomically; not synced: a profile lost in a crash
    /// is only a slower start).
    ///
    /// Staged beside it (`profiles/.tmp-*`), not in `tmp/`: a profile is written in the
    /// background (after a recorded run) and must not show up among the staging files of the
    /// store's writers. What a killed writer leaves there, GC removes.
    pub fn write_profile(&self, image: &Digest, profile: &Profile) -> Result<()> {
        let dir = self.open_area(Area::Profiles)?;
        let name = image.to_hex();
        let path = self.area_path(Area::Profiles).join(&name);
        let tmp = fsutil::unique_name(PROFILE_TMP_PREFIX);
        let tmp_path = self.area_path(Area::Profiles).join(&tmp);
        let written = fsutil::open_beneath(
            dir.as_fd(),
            &tmp,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY,
            Mode::from_raw_mode(0o600),
        )
        .ctx("create", &tmp_path)
        .and_then(|fd| {
            fsutil::pwrite_all(fd.as_fd(), &profile.to_bytes(), 0).ctx("write", &tmp_path)
        })
        .and_then(|()| {
            rustix::fs::renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), name.as_str())
                .ctx("replace", &path)
        });
        if written.is_err() {
            let _ = rustix::fs::unlinkat(dir.as_fd(), tmp.as_str(), rustix::fs::AtFlags::empty());
        }
        written
    }

    /// Removes what killed writers of profiles left (`profiles/.tmp-*` older than `age`).
    pub(crate) fn remove_stale_profile_tmps(&self, age: std::time::Duration) -> Result<()> {
        let dir = self.open_area(Area::Profiles)?;
        let names = fsutil::list_dir(dir.as_fd()).ctx("list", self.area_path(Area::Profiles))?;
        let now = std::time::SystemTime::now();
        for name in names {
            let Some(n) = name.to_str() else { continue };
            if !n.starts_with(PROFILE_TMP_PREFIX) {
                continue;
            }
            let Ok(st) = rustix::fs::statat(dir.as_fd(), n, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            let modified =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(st.st_mtime.max(0) as u64);
            if now.duration_since(modified).is_ok_and(|d| d > age) {
                let _ = rustix::fs::unlinkat(dir.as_fd(), n, rustix::fs::AtFlags::empty());
            }
        }
        Ok(())
    }

    /// Takes in a profile of `image` that came from elsewhere (checked with
    /// [`Profile::from_untrusted`]): a profile the store already has for the image that was
    /// recorded over more runs is kept, otherwise `profile` replaces it.
    pub fn adopt_profile(&self, image: &Digest, profile: &Profile) -> Result<ProfileOutcome> {
        // A local profile that cannot be read is no better than none.
        if let Ok(Some(local)) = self.read_profile(image)
            && local.runs > profile.runs
        {
            return Ok(ProfileOutcome::KeptLocal {
                runs: local.runs,
                files: local.entries.len() as u64,
            });
        }
        self.write_profile(image, profile)?;
        Ok(ProfileOutcome::Stored {
            runs: profile.runs,
            files: profile.entries.len() as u64,
        })
    }

    /// Removes the profile of `image`, if any.
    pub fn remove_profile(&self, image: &Digest) -> Result<()> {
        let dir = self.open_area(Area::Profiles)?;
        let name = image.to_hex();
        match rustix::fs::unlinkat(dir.as_fd(), name.as_str(), rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e).ctx("remove", self.area_path(Area::Profiles).join(&name)),
        }
    }

    /// The images that have a profile (names that are not digests are skipped).
    pub fn list_profiles(&self) -> Result<Vec<Digest>> {
        let dir = self.open_area(Area::Profiles)?;
        let names = fsutil::list_dir(dir.as_fd()).ctx("list", self.area_path(Area::Profiles))?;
        Ok(names
            .iter()
            .filter_map(|n| n.to_str().and_then(|s| Digest::parse(s).ok()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn d(n: u8) -> Digest {
        Digest::from_bytes([n; 32])
    }

    #[test]
    fn one_run_keeps_first_read_order_without_repeats() {
        let p = Profile::of_run(&[(d(3), 10), (d(1), 20), (d(3), 10), (d(2), 5)]);
        let order: Vec<Digest> = p.entries.iter().map(|e| e.digest).collect();
        assert_eq!(order, vec![d(3), d(1), d(2)]);
        assert_eq!(p.runs, 1);
        assert_eq!(p.bytes(), 35);
        assert_eq!(p.cached_bytes(), 3 * 4096);
    }

    #[test]
    fn merged_runs_follow_what_most_runs_do_and_count_hits() {
        let mut p = Profile::of_run(&[(d(1), 1), (d(2), 1), (d(3), 1)]);
        p.merge_run(&[(d(1), 1), (d(2), 1), (d(3), 1)]);
        // A third run reads 3 first: it moves up, but not above 1 which all runs read first.
        p.merge_run(&[(d(3), 1), (d(1), 1), (d(4), 1)]);
        let order: Vec<Digest> = p.entries.iter().map(|e| e.digest).collect();
        assert_eq!(order, vec![d(1), d(2), d(3), d(4)]);
        assert_eq!(p.runs, 3);
        let hits: Vec<u32> = p.entries.iter().map(|e| e.hits).collect();
        assert_eq!(hits, vec![3, 2, 3, 1]);
    }

    #[test]
    fn refreshes_bring_in_what_runs_read_now_and_age_out_what_they_stopped_reading() {
        let mut p = Profile::of_run(&[(d(1), 1), (d(2), 1)]);
        p.merge_run(&[(d(1), 1), (d(2), 1)]);
        p.merge_run(&[(d(1), 1), (d(2), 1)]);
        // The code changed: it reads 1 and 3 now, no longer 2.
        p.refresh_run(&[(d(1), 1), (d(3), 1)], 3);
        let has = |p: &Profile, n: u8| p.entries.iter().any(|e| e.digest == d(n));
        assert!(has(&p, 1) && has(&p, 2) && has(&p, 3));
        p.refresh_run(&[(d(1), 1), (d(3), 1)], 3);
        p.refresh_run(&[(d(1), 1), (d(3), 1)], 3);
        assert!(!has(&p, 2), "2 should have aged out: {p:?}");
        assert!(has(&p, 1) && has(&p, 3));
        assert!(p.entries.iter().all(|e| e.hits <= 3));
        // A run that read nothing (velo run true) changes nothing.
        let before = p.clone();
        p.refresh_run(&[], 3);
        assert_eq!(p, before);
    }

    #[test]
    fn a_profile_over_the_cap_keeps_what_most_runs_read() {
        let first: Vec<(Digest, u64)> = (0..MAX_ENTRIES as u32)
            .map(|i| {
                let mut b = [0u8; 32];
                b[..4].copy_from_slice(&i.to_be_bytes());
                (Digest::from_bytes(b), 1)
            })
            .collect();
        let mut p = Profile::of_run(&first);
        // The second run reads the first object and one new one: the new one (1 hit) goes in
        // place of an object read once, never in place of the one read twice.
        p.merge_run(&[(first[0].0, 1), (d(0xff), 1)]);
        assert_eq!(p.entries.len(), MAX_ENTRIES);
        assert!(
            p.entries
                .iter()
                .any(|e| e.digest == first[0].0 && e.hits == 2)
        );
    }

    #[test]
    fn hostile_bytes_are_refused_by_name() {
        let too_big = vec![b' '; MAX_PROFILE_BYTES as usize + 1];
        assert!(matches!(
            Profile::parse(&too_big),
            Err(ProfileError::TooLarge { .. })
        ));
        let twice = format!(
            r#"{{"version":1,"runs":1,"files":[["{0}",1,1],["{0}",1,1]]}}"#,
            d(1).to_hex()
        );
        assert!(
            Profile::parse(twice.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("named twice")
        );
        let newer = r#"{"version":2,"runs":1,"files":[]}"#;
        assert_eq!(
            Profile::parse(newer.as_bytes()),
            Err(ProfileError::Version(2))
        );
        let bad = r#"{"version":1,"runs":1,"files":[["../../etc/passwd",1,1]]}"#;
        assert!(matches!(
            Profile::parse(bad.as_bytes()),
            Err(ProfileError::Malformed(_))
        ));
        let extra = r#"{"version":1,"runs":1,"files":[],"exec":"rm -rf /"}"#;
        assert!(Profile::parse(extra.as_bytes()).is_err());
    }

    #[test]
    fn the_store_keeps_one_profile_per_image_apart_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("s")).unwrap();
        let image = d(7);
        assert_eq!(store.read_profile(&image).unwrap(), None);
        let p = Profile::of_run(&[(d(1), 100), (d(2), 5000)]);
        store.write_profile(&image, &p).unwrap();
        assert_eq!(store.read_profile(&image).unwrap(), Some(p));
        assert_eq!(store.list_profiles().unwrap(), vec![image]);
        std::fs::write(store.area_path(Area::Profiles).join(image.to_hex()), b"{").unwrap();
        let err = store.read_profile(&image).unwrap_err().to_string();
        assert!(err.contains(&image.to_hex()), "{err}");
        store.remove_profile(&image).unwrap();
        assert_eq!(store.read_profile(&image).unwrap(), None);
        store.remove_profile(&image).unwrap();
        // Nothing is staged in tmp/, and nothing is left beside the profiles.
        store
            .write_profile(&image, &Profile::of_run(&[(d(3), 1)]))
            .unwrap();
        let names = |area: Area| -> Vec<String> {
            std::fs::read_dir(store.area_path(area))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(Area::Profiles), vec![image.to_hex()]);
        assert!(names(Area::Tmp).iter().all(|n| !n.starts_with("write-")));
        // A writer killed mid-way left a staged profile: GC's sweep removes it once stale.
        std::fs::write(store.area_path(Area::Profiles).join(".tmp-1-2-3"), b"{").unwrap();
        store
            .remove_stale_profile_tmps(std::time::Duration::from_secs(3600))
            .unwrap();
        assert_eq!(names(Area::Profiles).len(), 2);
        store
            .remove_stale_profile_tmps(std::time::Duration::ZERO)
            .unwrap();
        assert_eq!(names(Area::Profiles), vec![image.to_hex()]);
    }

    #[test]
    fn an_untrusted_profile_keeps_only_the_images_objects_at_their_sizes() {
        let image: HashMap<Digest, u64> = [(d(1), 100), (d(2), 200)].into();
        let claimed = Profile::of_run(&[(d(9), 1 << 40), (d(2), 1 << 40), (d(1), 5)]);
        let p = Profile::from_untrusted(&claimed.to_bytes(), &image).unwrap();
        let kept: Vec<(Digest, u64)> = p.entries.iter().map(|e| (e.digest, e.size)).collect();
        assert_eq!(kept, vec![(d(2), 200), (d(1), 100)]);
        let foreign = Profile::of_run(&[(d(9), 1)]);
        let err = Profile::from_untrusted(&foreign.to_bytes(), &image).unwrap_err();
        assert!(err.to_string().contains("none of the 1 objects"), "{err}");
        assert!(Profile::from_untrusted(b"{", &image).is_err());
    }

    #[test]
    fn adopting_keeps_a_local_profile_of_more_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("s")).unwrap();
        let image = d(7);
        let mut local = Profile::of_run(&[(d(1), 1)]);
        local.merge_run(&[(d(2), 1)]);
        let pulled = Profile::of_run(&[(d(3), 1)]);
        // None yet: the pulled one is stored.
        assert_eq!(
            store.adopt_profile(&image, &pulled).unwrap(),
            ProfileOutcome::Stored { runs: 1, files: 1 }
        );
        store.write_profile(&image, &local).unwrap();
        assert_eq!(
            store.adopt_profile(&image, &pulled).unwrap(),
            ProfileOutcome::KeptLocal { runs: 2, files: 2 }
        );
        assert_eq!(store.read_profile(&image).unwrap(), Some(local.clone()));
        // As many runs or more: the pulled one replaces it.
        let mut more = pulled.clone();
        more.merge_run(&[(d(4), 1)]);
        assert!(matches!(
            store.adopt_profile(&image, &more).unwrap(),
            ProfileOutcome::Stored { runs: 2, .. }
        ));
        assert_eq!(store.read_profile(&image).unwrap(), Some(more));
    }

    #[test]
    fn fsck_names_corrupt_and_orphan_profiles_as_leftovers_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("s")).unwrap();
        let image = store
            .store_bytes(crate::Kind::Image, b"not really an image")
            .unwrap()
            .digest;
        store
            .write_profile(&image, &Profile::of_run(&[(d(1), 1)]))
            .unwrap();
        assert_eq!(store.check_profiles().unwrap(), vec![]);
        store
            .write_profile(&d(9), &Profile::of_run(&[(d(1), 1)]))
            .unwrap();
        std::fs::write(store.area_path(Area::Profiles).join(image.to_hex()), b"[").unwrap();
        let found = store.check_profiles().unwrap();
        let kinds: Vec<(&str, String)> = found
            .iter()
            .map(|f| {
                (
                    f.kind,
                    f.path.file_name().unwrap().to_string_lossy().into_owned(),
                )
            })
            .collect();
        assert!(
            kinds.contains(&("profile-corrupt", image.to_hex())),
            "{found:?}"
        );
        assert!(
            kinds.contains(&("profile-orphan", d(9).to_hex())),
            "{found:?}"
        );
        assert!(found.iter().all(|f| !f.is_damage()));
    }

    proptest! {
        #[test]
        fn any_profile_round_trips(
            files in proptest::collection::btree_map(any::<[u8; 32]>(), (any::<u64>(), any::<u32>()), 0..50),
            runs in any::<u32>(),
        ) {
            let p = Profile {
                runs,
                entries: files
                    .into_iter()
                    .map(|(b, (size, hits))| ProfileEntry { digest: Digest::from_bytes(b), size, hits })
                    .collect(),
            };
            prop_assert_eq!(Profile::parse(&p.to_bytes()).unwrap(), p);
        }

        #[test]
        fn parsing_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Profile::parse(&bytes);
        }

        #[test]
        fn merging_keeps_every_object_once_and_within_the_cap(
            runs in proptest::collection::vec(proptest::collection::vec((0u8..40, 0u64..10_000), 0..30), 1..6)
        ) {
            let mut p = Profile::default();
            for run in &runs {
                let reads: Vec<(Digest, u64)> = run.iter().map(|(n, s)| (d(*n), *s)).collect();
                p.merge_run(&reads);
            }
            let distinct: std::collections::HashSet<u8> = runs.iter().flatten().map(|(n, _)| *n).collect();
            prop_assert_eq!(p.entries.len(), distinct.len());
            let hits: u32 = p.entries.iter().map(|e| e.hits).sum();
            let expected: usize = runs.iter().map(|r| r.iter().map(|(n, _)| *n).collect::<std::collections::HashSet<_>>().len()).sum();
            prop_assert_eq!(hits as usize, expected);
        }
    }
}
