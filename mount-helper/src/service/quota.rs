//! Per-user quota on the bytes a user's imports add to the store.
//!
//! Each import is charged the bytes it adds (objects and the image that were not in the
//! store before), recorded against its image in the user's ledger (`cache/quota-<uid>.json`).
//! A user's usage is the sum of the charges of the images their own refs hold now (current
//! or in history) and of those still in the store: removing a ref gives its charge back once
//! `velo gc` has removed the image (so importing and removing over and over cannot grow the
//! store between collections), and what another user already stored costs nothing. An import that would take the usage over the limit is refused before
//! any of its objects is received.

use std::collections::{BTreeMap, HashSet};

use velo_objects::{Digest, Store};

use super::namespace::Caller;

/// A user's ledger: bytes charged per image.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    /// Charges, by image.
    pub charges: BTreeMap<Digest, u64>,
}

/// The most read of a ledger: about 80 bytes an image, for some 200,000 images.
const MAX_LEDGER_BYTES: u64 = 16 << 20;

fn entry_name(caller: &Caller) -> String {
    format!("quota-{}.json", caller.uid)
}

impl Ledger {
    /// The caller's ledger (empty if none or unreadable).
    pub fn load(store: &Store, caller: &Caller) -> Self {
        store
            .read_cache(&entry_name(caller), MAX_LEDGER_BYTES)
            .ok()
            .flatten()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }

    /// Records `bytes` against `image`, forgetting charges of images that are gone from the
    /// store, and saves the ledger.
    pub fn charge(
        mut self,
        store: &Store,
        caller: &Caller,
        image: Digest,
        bytes: u64,
    ) -> velo_objects::Result<()> {
        self.charges.retain(|d, _| in_store(store, d));
        *self.charges.entry(image).or_default() += bytes;
        let data = serde_json::to_vec(&self).unwrap_or_default();
        store.write_cache(&entry_name(caller), &data)
    }

    /// The bytes charged to the images in `held`, or still in the store (`exists`).
    pub fn usage(&self, held: &HashSet<Digest>, exists: impl Fn(&Digest) -> bool) -> u64 {
        self.charges
            .iter()
            .filter(|(d, _)| held.contains(d) || exists(d))
            .map(|(_, b)| *b)
            .fold(0u64, u64::saturating_add)
    }

    /// [`Ledger::usage`] against the store.
    pub fn usage_in(&self, store: &Store, held: &HashSet<Digest>) -> u64 {
        self.usage(held, |d| in_store(store, d))
    }
}

/// Whether the image is (still) in the store.
fn in_store(store: &Store, image: &Digest) -> bool {
    store.open_image(image).is_ok()
}

/// Whether adding `adding` bytes to `used` stays within `limit`; the refusal says how much.
pub fn check(limit: Option<u64>, used: u64, adding: u64) -> Result<(), String> {
    match limit {
        Some(limit) if used.saturating_add(adding) > limit => Err(format!(
            "this import adds {adding} bytes to the store, and your refs already hold {used} of \
             your quota of {limit} bytes; remove refs you no longer need (`velo ref rm NAME`), \
             or ask the administrator for more (velo-mountd --user-quota)"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_images_held_or_not_yet_collected() {
        let (a, b) = (Digest::from_bytes([1; 32]), Digest::from_bytes([2; 32]));
        let ledger = Ledger {
            charges: [(a, 100), (b, 50)].into_iter().collect(),
        };
        let gone = |_: &Digest| false;
        assert_eq!(ledger.usage(&[a, b].into_iter().collect(), gone), 150);
        assert_eq!(ledger.usage(&[b].into_iter().collect(), gone), 50);
        // An image no ref holds any more still counts until GC has removed it.
        assert_eq!(ledger.usage(&[b].into_iter().collect(), |d| *d == a), 150);
    }

    #[test]
    fn the_limit_is_inclusive_and_none_means_unlimited() {
        assert!(check(Some(100), 60, 40).is_ok());
        assert!(check(Some(100), 60, 41).is_err());
        assert!(check(None, u64::MAX, u64::MAX).is_ok());
        assert!(check(Some(10), u64::MAX, 1).is_err(), "no overflow");
    }
}
