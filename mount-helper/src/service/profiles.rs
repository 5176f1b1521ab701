//! The service's side of access profiles (see [`crate::profile`]): it records the first
//! [`RECORD_RUNS`](crate::profile::RECORD_RUNS) runs over each image and reads an image's
//! profile ahead whenever it lends a mount of it — both on threads of their own, so that
//! neither delays the answer nor the command.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use velo_objects::{Digest, Profile, Store};

use crate::profile::{self, PREFETCH_THREADS, RECORD_WINDOW, Recording};

/// Profiles in memory and what is under way.
#[derive(Clone)]
pub(crate) struct Profiles {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    budget: u64,
    /// Profiles read, with the stamp of the file they were read from (see
    /// [`Store::profile_stamp`]: a profile written by anyone else — a root `velo pull` — is
    /// seen at the next lend).
    cache: Mutex<HashMap<Digest, Cached>>,
    /// Images a run is being recorded over (one run at a time per image).
    recording: Mutex<HashSet<Digest>>,
    /// Images being read ahead (one read-ahead at a time per image).
    reading: Mutex<HashSet<Digest>>,
    /// Held while a recorded run is merged into a profile (read, merge, replace).
    merging: Mutex<()>,
    /// Runs over each image since the service started, and one in how many of those over a
    /// settled profile is recorded to refresh it (0: never).
    lends: Mutex<HashMap<Digest, u64>>,
    refresh_every: u64,
}

/// Runs recorded at once (over different images).
const MAX_RECORDINGS: usize = 4;

type Stamp = Option<(u64, i64, i64, u64)>;
/// A profile in memory (`None`: the image has none) and the stamp it was read at.
type Cached = (Stamp, Option<Arc<Profile>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Profiles {
    /// Profiles of the store at `root`; read-ahead takes at most `budget` bytes per run.
    pub(crate) fn new(root: PathBuf, budget: u64, refresh_every: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                root,
                budget,
                cache: Mutex::new(HashMap::new()),
                recording: Mutex::new(HashSet::new()),
                reading: Mutex::new(HashSet::new()),
                merging: Mutex::new(()),
                lends: Mutex::new(HashMap::new()),
                refresh_every,
            }),
        }
    }

    /// The profile of `image`, if it has a readable one.
    pub(crate) fn get(&self, store: &Store, image: &Digest) -> Option<Arc<Profile>> {
        let stamp = store.profile_stamp(image);
        if let Some((s, p)) = lock(&self.inner.cache).get(image)
            && *s == stamp
        {
            return p.clone();
        }
        let p = match store.read_profile(image) {
            Ok(p) => p.map(Arc::new),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        };
        lock(&self.inner.cache).insert(*image, (stamp, p.clone()));
        p
    }

    /// Forgets what it read of `image`'s profile (one was just written for it).
    pub(crate) fn forget(&self, image: &Digest) {
        lock(&self.inner.cache).remove(image);
    }

    /// Starts reading the profile of `image` ahead on a thread (if it has one, the budget is
    /// not zero and no read-ahead of it is under way). Returns whether it has a profile that
    /// names any object.
    pub(crate) fn read_ahead(&self, store: &Store, image: &Digest) -> bool {
        let Some(profile) = self.get(store, image).filter(|p| !p.entries.is_empty()) else {
            return false;
        };
        if self.inner.budget == 0 || !lock(&self.inner.reading).insert(*image) {
            return true;
        }
        let inner = self.inner.clone();
        let image = *image;
        let spawned = std::thread::Builder::new()
            .name("read-ahead".into())
            .spawn(move || {
                if let Ok(store) = Store::open(&inner.root) {
                    let report =
                        profile::prefetch(&store, &profile, inner.budget, PREFETCH_THREADS);
                    tracing::debug!("read ahead for {image}: {report:?}");
                }
                lock(&inner.reading).remove(&image);
            });
        if spawned.is_err() {
            lock(&self.inner.reading).remove(&image);
        }
        true
    }

    /// Starts recording a run over `image` if its profile wants more runs and none is being
    /// recorded; the recording ends when the returned value is dropped (the run gave its mount
    /// back) or after [`RECORD_WINDOW`].
    pub(crate) fn record(&self, store: &Store, image: &Digest) -> Option<Recording> {
        let n = {
            let mut lends = lock(&self.inner.lends);
            let n = lends.entry(*image).or_insert(0);
            *n += 1;
            *n
        };
        let refresh = self.inner.refresh_every > 0 && n % self.inner.refresh_every == 0;
        let wanted = refresh || profile::wants_recording_of(self.get(store, image).as_deref());
        {
            let mut recording = lock(&self.inner.recording);
            // Each recording adds an event to every object open while it lasts: a few at once.
            if !wanted || recording.len() >= MAX_RECORDINGS || !recording.insert(*image) {
                return None;
            }
        }
        let inner = self.inner.clone();
        let image = *image;
        let recording = Recording::start(store, RECORD_WINDOW, move |opened| {
            // The next run may be recorded from now on; merges take turns.
            lock(&inner.recording).remove(&image);
            let _merging = lock(&inner.merging);
            if let Ok(store) = Store::open(&inner.root) {
                let runs = profile::merge_recorded(&store, &image, &opened);
                tracing::info!(
                    "recorded a run over {image}: it opened {} objects; the profile has {runs:?} runs",
                    opened.len()
                );
            }
            lock(&inner.cache).remove(&image);
        });
        if recording.is_none() {
            lock(&self.inner.recording).remove(&image);
        }
        recording
    }
}
