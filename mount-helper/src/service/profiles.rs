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
    /// Profiles read (`None`: the image has none), dropped when a recording changes one.
    cache: Mutex<HashMap<Digest, Option<Arc<Profile>>>>,
    /// Images a run is being recorded over (one run at a time per image).
    recording: Mutex<HashSet<Digest>>,
    /// Images being read ahead (one read-ahead at a time per image).
    reading: Mutex<HashSet<Digest>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Profiles {
    /// Profiles of the store at `root`; read-ahead takes at most `budget` bytes per run.
    pub(crate) fn new(root: PathBuf, budget: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                root,
                budget,
                cache: Mutex::new(HashMap::new()),
                recording: Mutex::new(HashSet::new()),
                reading: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// The profile of `image`, if it has a readable one.
    pub(crate) fn get(&self, store: &Store, image: &Digest) -> Option<Arc<Profile>> {
        if let Some(p) = lock(&self.inner.cache).get(image) {
            return p.clone();
        }
        let p = match store.read_profile(image) {
            Ok(p) => p.map(Arc::new),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        };
        lock(&self.inner.cache).insert(*image, p.clone());
        p
    }

    /// Forgets what it read of `image`'s profile (one was just written for it).
    pub(crate) fn forget(&self, image: &Digest) {
        lock(&self.inner.cache).remove(image);
    }

    /// Starts reading the profile of `image` ahead on a thread (if it has one, the budget is
    /// not zero and no read-ahead of it is under way). Returns whether it has a profile.
    pub(crate) fn read_ahead(&self, store: &Store, image: &Digest) -> bool {
        let Some(profile) = self.get(store, image) else {
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
        let runs = self.get(store, image).map_or(0, |p| p.runs);
        if runs >= profile::RECORD_RUNS || !lock(&self.inner.recording).insert(*image) {
            return None;
        }
        let inner = self.inner.clone();
        let image = *image;
        let recording = Recording::start(store, RECORD_WINDOW, move |opened| {
            if let Ok(store) = Store::open(&inner.root) {
                profile::merge_recorded(&store, &image, &opened);
            }
            lock(&inner.cache).remove(&image);
            lock(&inner.recording).remove(&image);
        });
        if recording.is_none() {
            lock(&self.inner.recording).remove(&image);
        }
        recording
    }
}
