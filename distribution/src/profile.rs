//! Access profiles travel with their image (push/pull, export/import), but never as part of
//! it: the image's digest and every check of it are the same with or without one. What
//! arrives is a hint from elsewhere, so it is parsed bounded, cut to the objects of the image
//! it came with, and dropped with a warning — never failing the transfer — when it is bad.

use std::collections::HashMap;

use velo_objects::{Digest, Profile, ProfileOutcome, Store};

/// The profile to send with `image` (whose objects are `objects`): the store's, cut to the
/// image's objects. None if the store has none, or one that names none of them; a profile
/// that cannot be read is skipped with a warning (the image goes without it).
pub(crate) fn outgoing(
    store: &Store,
    image: &Digest,
    objects: &[(Digest, u64)],
) -> Option<Profile> {
    let mut profile = match store.read_profile(image) {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("{e}; image {image} goes without its access profile");
            return None;
        }
    };
    let sizes: HashMap<Digest, u64> = objects.iter().copied().collect();
    profile.retain(|d| sizes.contains_key(d));
    (!profile.entries.is_empty()).then_some(profile)
}

/// Takes in the bytes of a profile of `image` (whose objects are `objects`) that came from
/// `source`: stored unless the store's own profile of the image has more runs; dropped with a
/// warning if it is not a profile of the image. Never fails: it says what became of it.
pub(crate) fn incoming(
    store: &Store,
    image: &Digest,
    bytes: &[u8],
    objects: &HashMap<Digest, u64>,
    source: &str,
) -> ProfileOutcome {
    match Profile::from_untrusted(bytes, objects) {
        Ok(p) => store
            .adopt_profile(image, &p)
            .unwrap_or_else(|e| dropped(image, source, format!("it could not be stored: {e}"))),
        Err(e) => dropped(image, source, e.to_string()),
    }
}

/// A profile of `image` from `source` that is not taken, and why (a warning).
pub(crate) fn dropped(image: &Digest, source: &str, reason: String) -> ProfileOutcome {
    tracing::warn!(
        "the access profile of image {image} from {source} was dropped ({reason}); the image \
         is stored without it"
    );
    ProfileOutcome::Dropped { reason }
}

/// What a push or an export sent of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProfileSent {
    /// Runs it was recorded over.
    pub runs: u32,
    /// Objects of the image it names.
    pub files: u64,
    /// Bytes of the profile as sent.
    pub bytes: u64,
}
