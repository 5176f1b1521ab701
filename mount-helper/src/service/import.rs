//! Taking a tree in from a client: the image, checked and written again by velo's own writer
//! (mapped to the caller: their owner, no set-id bits, no device nodes, no security xattrs),
//! then the objects it needs, each checked against its digest as it arrives, all staged
//! until the last one is there. A refused or broken import stores nothing.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, Mutex};

use velo_objects::verity::VerityHasher;
use velo_objects::{Digest, Kind, MAX_PROFILE_BYTES, Profile, ProfileOutcome, Store, StoreError};

use super::namespace::{self, Caller};
use super::quota::{self, Ledger};
use super::{Failure, Shared};
use crate::protocol::{Conn, ErrorKind, ImportSummary, Response};

/// The largest image an ordinary user may send (root: the store's limit). ~1M files.
pub const MAX_USER_IMAGE: u64 = 256 << 20;

/// Objects of images, by image, so an import does not parse the caller's images again.
#[derive(Default)]
pub struct ObjectSets {
    sets: Vec<(Digest, Arc<HashSet<Digest>>)>,
}

/// How many images' object sets are kept.
const OBJECT_SETS: usize = 64;

impl ObjectSets {
    fn get(&mut self, store: &Store, image: &Digest) -> Option<Arc<HashSet<Digest>>> {
        if let Some(i) = self.sets.iter().position(|(d, _)| d == image) {
            let hit = self.sets.remove(i);
            let set = hit.1.clone();
            self.sets.push(hit);
            return Some(set);
        }
        let fs = velo_image::inspect::load(store, image).ok()?;
        let set: Arc<HashSet<Digest>> = Arc::new(
            velo_image::inspect::objects(&fs)
                .into_iter()
                .map(|(d, _)| d)
                .collect(),
        );
        if self.sets.len() >= OBJECT_SETS {
            self.sets.remove(0);
        }
        self.sets.push((*image, set.clone()));
        Some(set)
    }
}

/// The objects the caller may count as already sent: those of images they may read. Others
/// must be sent even if the store has them — otherwise anyone who learnt an object's digest
/// could mount its bytes, and ask the store which objects it holds.
fn visible_objects(
    shared: &Shared,
    caller: &Caller,
) -> Result<Vec<Arc<HashSet<Digest>>>, StoreError> {
    let images = namespace::readable_images(&shared.store, caller)?;
    let mut sets = shared.object_sets.lock().unwrap_or_else(|p| p.into_inner());
    Ok(images
        .iter()
        .filter_map(|d| sets.get(&shared.store, d))
        .collect())
}

/// Serves one import: `name`, `image`, `size` and `profile` come from the request; the
/// image's bytes, then the profile's, and then the objects follow on `conn`.
pub fn import(
    shared: &Shared,
    conn: &mut Conn,
    caller: &Caller,
    name: Option<String>,
    image: Digest,
    size: u64,
    profile: Option<u64>,
) -> Result<Response, Failure> {
    let limit = if caller.is_root() {
        velo_image::inspect::MAX_IMAGE_BYTES
    } else {
        MAX_USER_IMAGE
    };
    if size > limit {
        return Err(Failure::new(
            ErrorKind::BadRequest,
            format!("an image of {size} bytes is more than the {limit} accepted"),
        ));
    }
    // One import per user at a time: the quota check and the charge stay consistent.
    let user_lock = shared.user_lock(caller.uid);
    let _mine = user_lock.lock().unwrap_or_else(|p| p.into_inner());
    let _slot = shared.import_slot().ok_or_else(|| {
        Failure::new(
            ErrorKind::Busy,
            "the service is taking in as many trees as it takes at once; try again shortly",
        )
    })?;

    let started = std::time::Instant::now();
    // The image, allocated as its bytes arrive (a false size costs nothing until sent).
    let mut bytes = Vec::new();
    conn.raw(size)
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::new(ErrorKind::Corrupt, format!("the image did not arrive: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(Failure::new(
            ErrorKind::Corrupt,
            format!(
                "the stream ended after {} of the image's {size} bytes",
                bytes.len()
            ),
        ));
    }
    // The profile's bytes: kept only up to MAX_PROFILE_BYTES (more are read and thrown away,
    // keeping the stream in step); judged once the image is stored.
    let profile = profile.map(|len| receive_profile(conn, len)).transpose()?;
    let found = VerityHasher::digest(&bytes);
    if found != image {
        return Err(Failure::new(
            ErrorKind::Corrupt,
            format!("the image's bytes hash to {found}, not {image}"),
        ));
    }
    let mut fs = velo_image::read_image(&bytes, &image.to_hex()).map_err(|e| {
        Failure::new(
            ErrorKind::Corrupt,
            format!("the image does not parse as a composefs image velo reads: {e}"),
        )
    })?;
    drop(bytes);
    let mapped = if caller.is_root() {
        velo_image::MapReport::default()
    } else {
        velo_image::map_to_user(&mut fs, caller.uid, caller.gid)
    };
    let objects = velo_image::inspect::objects_in_path_order(&fs);
    let written = velo_image::write_image(fs)
        .map_err(|e| Failure::new(ErrorKind::Failed, format!("write the image again: {e}")))?;
    let stored_image = VerityHasher::digest(&written);

    // Which objects to ask for, and what the import adds to the store.
    let store = &shared.store;
    let visible = if caller.is_root() {
        Vec::new()
    } else {
        visible_objects(shared, caller).map_err(Failure::store)?
    };
    let mut need = Vec::new();
    let mut new_bytes = 0u64;
    for (d, s) in &objects {
        let present = store.has(Kind::Object, d, *s).map_err(Failure::store)?;
        if !present {
            // Sizes come from the client's image: any u64.
            new_bytes = new_bytes.saturating_add(*s);
        }
        if !(present && (caller.is_root() || visible.iter().any(|set| set.contains(d)))) {
            need.push((*d, *s));
        }
    }
    if !store
        .has(Kind::Image, &stored_image, written.len() as u64)
        .map_err(Failure::store)?
    {
        new_bytes = new_bytes.saturating_add(written.len() as u64);
    }
    let ledger = Ledger::load(store, caller);
    if !caller.is_root() {
        let held = namespace::own_images(store, caller).map_err(Failure::store)?;
        quota::check(
            shared.config.user_quota,
            ledger.usage_in(store, &held),
            new_bytes,
        )
        .map_err(|m| Failure::new(ErrorKind::Quota, m))?;
    }

    let checked = started.elapsed();
    // Ask for them, and take them in.
    let session = store.begin_write().map_err(Failure::store)?;
    let staging = store.begin_staging().map_err(Failure::store)?;
    conn.send(&Response::Need {
        count: need.len() as u64,
    })
    .map_err(Failure::io)?;
    let list: Vec<u8> = need.iter().flat_map(|(d, _)| *d.as_bytes()).collect();
    conn.send_raw(&list).map_err(Failure::io)?;
    receive_objects(conn, &staging, &need)?;
    let received = started.elapsed();
    staging.publish().map_err(Failure::store)?;
    let published = started.elapsed();
    store
        .store_bytes(Kind::Image, &written)
        .map_err(Failure::store)?;
    let stored_name = name.as_deref().map(|n| namespace::own_ref(caller, n));
    let refs: Vec<(&str, Digest)> = stored_name
        .iter()
        .map(|n| (n.as_str(), stored_image))
        .collect();
    session.commit(&refs).map_err(Failure::store)?;
    drop(session);
    let profile = match profile {
        None => ProfileOutcome::None,
        Some(received) => take_profile(shared, caller, &stored_image, &objects, received),
    };
    tracing::debug!(
        "velo-mountd: import for uid {}: {} objects, {} sent; image checked and rewritten at \
         {checked:?}, objects received {received:?}, published {published:?}, committed {:?}",
        caller.uid,
        objects.len(),
        need.len(),
        started.elapsed()
    );
    if !caller.is_root()
        && let Err(e) = ledger.charge(store, caller, stored_image, new_bytes)
    {
        tracing::warn!(
            "velo-mountd: could not record uid {}'s usage: {e}",
            caller.uid
        );
    }
    Ok(Response::Imported(ImportSummary {
        image: stored_image,
        name,
        objects: objects.len() as u64,
        objects_sent: need.len() as u64,
        new_bytes,
        owners_mapped: mapped.owners_changed,
        setid_cleared: mapped.set_id_cleared,
        devices_removed: mapped.devices_removed,
        xattrs_removed: mapped.xattrs_dropped_total(),
        profile,
    }))
}

/// Reads the `len` bytes of an access profile that follow the image: `Ok(Err(why))` when it
/// is larger than [`MAX_PROFILE_BYTES`] (its bytes are read and dropped, never kept).
fn receive_profile(conn: &mut Conn, len: u64) -> Result<Result<Vec<u8>, String>, Failure> {
    let broken = |e: std::io::Error| {
        Failure::new(
            ErrorKind::Corrupt,
            format!("the access profile did not arrive: {e}"),
        )
    };
    let short = |n: u64| {
        Failure::new(
            ErrorKind::Corrupt,
            format!("the stream ended after {n} of the access profile's {len} bytes"),
        )
    };
    if len > MAX_PROFILE_BYTES {
        let n = std::io::copy(&mut conn.raw(len), &mut std::io::sink()).map_err(broken)?;
        if n != len {
            return Err(short(n));
        }
        return Ok(Err(format!(
            "{len} bytes, more than the {MAX_PROFILE_BYTES} a profile may have"
        )));
    }
    let mut bytes = Vec::new();
    conn.raw(len).read_to_end(&mut bytes).map_err(broken)?;
    if bytes.len() as u64 != len {
        return Err(short(bytes.len() as u64));
    }
    Ok(Ok(bytes))
}

/// Takes in the access profile a client sent with `image` (stored as `image`, whose objects
/// are `objects`): hostile input, so parsed bounded and cut to the image's objects; kept only
/// if the store's own profile of the image has no more runs. A bad one is dropped with a
/// warning: the import has succeeded either way.
fn take_profile(
    shared: &Shared,
    caller: &Caller,
    image: &Digest,
    objects: &[(Digest, u64)],
    received: Result<Vec<u8>, String>,
) -> ProfileOutcome {
    let sizes: HashMap<Digest, u64> = objects.iter().copied().collect();
    let outcome = match received
        .and_then(|bytes| Profile::from_untrusted(&bytes, &sizes).map_err(|e| e.to_string()))
    {
        Ok(mut p) => {
            // A user's profile counts as one run: it cannot outweigh (or, claiming many runs,
            // keep out) what this machine records over an image other users may share.
            if !caller.is_root() {
                p.runs = p.runs.min(1);
                for e in &mut p.entries {
                    e.hits = e.hits.min(1);
                }
            }
            match shared.store.adopt_profile(image, &p) {
                Ok(o) => o,
                Err(e) => ProfileOutcome::Dropped {
                    reason: format!("it could not be stored: {e}"),
                },
            }
        }
        Err(reason) => ProfileOutcome::Dropped { reason },
    };
    match &outcome {
        ProfileOutcome::Dropped { reason } => tracing::warn!(
            "velo-mountd: the access profile uid {} sent with image {image} was dropped \
             ({reason}); the image is stored without it",
            caller.uid
        ),
        ProfileOutcome::Stored { .. } => shared.profiles.forget(image),
        _ => {}
    }
    outcome
}

/// Objects up to this size are read whole and checked by a worker while the next ones
/// arrive; larger ones are checked as they stream in. (At most [`IN_FLIGHT`] of them wait.)
const BUFFERED: u64 = 1 << 20;
/// Objects read and waiting for a worker, at most.
const IN_FLIGHT: usize = 32;
/// Threads that hash and stage objects.
const WORKERS: usize = 2;

/// Takes the objects `need` lists, in that order, from `conn` into `staging`: each checked
/// against its digest, on [`WORKERS`] threads while the next ones arrive (hashing is most of
/// an import's time). The first failure stops it.
fn receive_objects(
    conn: &mut Conn,
    staging: &velo_objects::Staging<'_>,
    need: &[(Digest, u64)],
) -> Result<(), Failure> {
    let what = |i: usize| {
        format!(
            "object {} (number {} of {} sent)",
            need[i].0,
            i + 1,
            need.len()
        )
    };
    let refused = |i: usize, e: StoreError| match e {
        StoreError::Mismatch { .. } => Failure::new(ErrorKind::Corrupt, e.to_string()),
        other => Failure::new(ErrorKind::Corrupt, format!("{}: {other}", what(i))),
    };
    let failed: Mutex<Option<Failure>> = Mutex::new(None);
    let fail = |f: Failure| {
        failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(f);
    };
    let has_failed = || failed.lock().unwrap_or_else(|p| p.into_inner()).is_some();
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(IN_FLIGHT);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        let (rx, fail, what, refused) = (&rx, &fail, &what, &refused);
        for _ in 0..WORKERS {
            scope.spawn(move || {
                loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((i, bytes)) = job else { break };
                    let (d, s) = need[i];
                    if let Err(e) = staging.add_verified(&mut bytes.as_slice(), &d, s, &what(i)) {
                        fail(refused(i, e));
                    }
                }
            });
        }
        for (i, (d, s)) in need.iter().enumerate() {
            if has_failed() {
                break;
            }
            if *s <= BUFFERED {
                let mut bytes = vec![0u8; *s as usize];
                if let Err(e) = conn.read_exact(&mut bytes) {
                    fail(Failure::new(
                        ErrorKind::Corrupt,
                        format!("{}: the stream broke off ({e})", what(i)),
                    ));
                    break;
                }
                if tx.send((i, bytes)).is_err() {
                    break;
                }
            } else if let Err(e) = staging.add_verified(&mut conn.raw(*s), d, *s, &what(i)) {
                fail(refused(i, e));
                break;
            }
        }
        drop(tx);
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// Per-user locks, created on first use.
pub type UserLocks = Mutex<Vec<(u32, Arc<Mutex<()>>)>>;
