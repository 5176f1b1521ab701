//! Access profiles, the privileged half: recording which objects a run reads as it starts, and
//! reading a profile's objects ahead for the next run (see [`velo_objects::Profile`]).
//!
//! **Recording** watches the store's 256 `objects/xx/` directories with fanotify (`FAN_OPEN`
//! on their children: an inode mark per directory, so it sees the opens overlayfs makes of its
//! data-only lower layer whichever mount they go through). Events queue in the kernel and a
//! thread reads them, so the run is never waited on; opens by this process (its own read-ahead)
//! are left out. It stops when the run gives its mount back or after [`RECORD_WINDOW`], then
//! keeps only objects of the image and merges them into the image's profile. Only
//! [`RECORD_RUNS`] runs are recorded per image: after that the profile is settled.
//!
//! **Read-ahead** opens the profile's objects in its order with [`PREFETCH_THREADS`] threads
//! and asks the kernel to read each in (`fadvise(WILLNEED)`: the reads are queued, not waited
//! for), within a budget of bytes in the page cache. A profile whose objects are already cached
//! costs a few opens and nothing more.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use rustix::event::{EventfdFlags, PollFd, PollFlags};
use velo_objects::{Digest, MAX_PROFILE_ENTRIES, Profile, Store};

/// A run is recorded for at most this long: its start, not all of it.
pub const RECORD_WINDOW: Duration = Duration::from_secs(20);
/// An image's profile takes this many runs; later runs are recorded only to refresh it (see
/// [`DEFAULT_REFRESH_EVERY`]).
pub const RECORD_RUNS: u32 = 3;
/// velo-mountd records one run in this many over an image whose profile is settled, so that the
/// profile follows what a project's code reads now ([`Profile::refresh_run`]).
pub const DEFAULT_REFRESH_EVERY: u64 = 50;
/// Runs that read none of the image's objects (`velo run true`) are recorded up to this many
/// times, so that a profile is not settled empty by a few of them.
pub const RECORD_RUNS_EMPTY: u32 = 10;
/// The stack of a recording's thread: `done` parses the image (to keep only its objects), and
/// the composefs reader recurses once per directory level (a deep tree takes ~11 MiB in a debug
/// build); a thread that overflows its stack aborts the whole process (velo-mountd). Only the
/// pages a thread touches are used.
const RECORD_STACK: usize = 32 << 20;
/// Read-ahead threads: opening an object waits on a directory and an inode block, so several
/// at once keep the disk's queue full.
pub const PREFETCH_THREADS: usize = 16;
/// The default read-ahead budget, in bytes of page cache.
pub const DEFAULT_PREFETCH_BYTES: u64 = 1 << 30;
/// Bytes asked for per `fadvise(WILLNEED)`: the kernel reads at most its read-ahead window
/// (`read_ahead_kb`, or the device's largest request) per call.
const READ_AHEAD_CHUNK: u64 = 1 << 20;
/// How many of a profile's objects are checked for being cached before reading it ahead.
const CACHED_PROBES: usize = 4;

/// The object an opened store path names: `…/xx/<62 hex digits>` (pure).
pub fn object_of_path(path: &[u8]) -> Option<Digest> {
    let mut parts = path.rsplit(|b| *b == b'/');
    let name = parts.next()?;
    let fanout = parts.next()?;
    if fanout.len() != 2 || name.len() != 62 {
        return None;
    }
    let mut hex = Vec::with_capacity(64);
    hex.extend_from_slice(fanout);
    hex.extend_from_slice(name);
    Digest::parse(std::str::from_utf8(&hex).ok()?).ok()
}

/// A recording in progress; dropping it ends it ([`Recording::finish`] also waits for what
/// it hands on to be done).
pub struct Recording {
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recording {
    /// Starts recording the objects of `store` opened by other processes, in first-open order;
    /// `done` gets them (at most [`MAX_PROFILE_ENTRIES`]) on a thread of its own when the
    /// recording stops or its window ends. `None` if fanotify is unavailable (not root).
    pub fn start(
        store: &Store,
        window: Duration,
        done: impl FnOnce(Vec<Digest>) + Send + 'static,
    ) -> Option<Self> {
        let group = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_NOATIME,
        )
        .map_err(|e| tracing::debug!("no recording: fanotify_init: {e}"))
        .ok()?;
        let objects = store.open_area(velo_objects::Area::Objects).ok()?;
        let names = velo_objects::fsutil::list_dir(objects.as_fd()).ok()?;
        for name in names {
            if name.len() != 2 {
                continue;
            }
            if let Err(e) = group.mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_ONLYDIR,
                MaskFlags::FAN_OPEN | MaskFlags::FAN_EVENT_ON_CHILD,
                objects.as_fd(),
                Some(name.as_os_str()),
            ) {
                tracing::debug!("no recording: fanotify_mark {name:?}: {e}");
                return None;
            }
        }
        let stop = rustix::event::eventfd(0, EventfdFlags::CLOEXEC).ok()?;
        let stopped = stop.try_clone().ok()?;
        let thread = std::thread::Builder::new()
            .name("record".into())
            .stack_size(RECORD_STACK)
            .spawn(move || done(read_opens(&group, &stopped, window)))
            .ok()?;
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the recording and waits until `done` has returned (for a process about to exit).
    pub fn finish(mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
    }
}

/// Reads open events until `stop` is signalled or `window` has passed.
fn read_opens(group: &Fanotify, stop: &OwnedFd, window: Duration) -> Vec<Digest> {
    let me = std::process::id() as i32;
    let end = Instant::now() + window;
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || order.len() >= MAX_PROFILE_ENTRIES {
            break;
        }
        let mut fds = [
            PollFd::new(group, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        let timeout = rustix::event::Timespec::try_from(left).ok();
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => break,
        }
        let stopping = !fds[1].revents().is_empty();
        // Drain what is queued (also when stopping: those opens happened before the stop).
        loop {
            let events = match group.read_events() {
                Ok(events) if !events.is_empty() => events,
                _ => break,
            };
            for event in events {
                if event.pid() == me {
                    continue;
                }
                let Some(fd) = event.fd() else {
                    tracing::debug!("recording: the event queue overflowed");
                    continue;
                };
                let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
                if let Ok(path) = std::fs::read_link(&link)
                    && let Some(digest) =
                        object_of_path(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
                    && seen.insert(digest)
                {
                    order.push(digest);
                }
            }
        }
        if stopping {
            break;
        }
    }
    order.truncate(MAX_PROFILE_ENTRIES);
    order
}

/// Merges one recorded run into the profile of `image`: only objects of the image are kept
/// (with their sizes from it). A run that read none of them counts as a run (a command that
/// reads nothing from its tree should not be recorded forever) up to [`RECORD_RUNS_EMPTY`].
/// Returns the profile's runs now. Best effort: a failure loses the run's profile, nothing
/// else.
pub fn merge_recorded(store: &Store, image: &Digest, opened: &[Digest]) -> Option<u32> {
    let fs = match velo_image::inspect::load(store, image) {
        Ok(fs) => fs,
        Err(e) => {
            tracing::debug!("profile of {image}: {e}");
            return None;
        }
    };
    let sizes: HashMap<Digest, u64> = velo_image::inspect::objects(&fs).into_iter().collect();
    let reads: Vec<(Digest, u64)> = opened
        .iter()
        .filter_map(|d| sizes.get(d).map(|s| (*d, *s)))
        .collect();
    let mut profile = store.read_profile(image).ok().flatten().unwrap_or_default();
    if !wants_recording_of(Some(&profile)) {
        // A settled profile, recorded again to follow what the command reads now.
        profile.refresh_run(&reads, RECORD_RUNS);
    } else if reads.is_empty() {
        profile.runs = profile.runs.saturating_add(1);
    } else {
        profile.merge_run(&reads);
    }
    match store.write_profile(image, &profile) {
        Ok(()) => Some(profile.runs),
        Err(e) => {
            tracing::warn!("profile of {image}: {e}");
            None
        }
    }
}

/// Whether a run over `image` should be recorded, given its profile (if any): one with fewer
/// than [`RECORD_RUNS`] runs, or one that names nothing yet and has fewer than
/// [`RECORD_RUNS_EMPTY`].
pub fn wants_recording_of(profile: Option<&Profile>) -> bool {
    match profile {
        None => true,
        Some(p) if p.entries.is_empty() => p.runs < RECORD_RUNS_EMPTY,
        Some(p) => p.runs < RECORD_RUNS,
    }
}

/// What a read-ahead did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchReport {
    /// Objects the profile names.
    pub profiled: usize,
    /// Objects asked to be read in.
    pub files: usize,
    /// Their bytes in the page cache (4 KiB pages).
    pub bytes: u64,
    /// True if the profile's objects were cached already (nothing was read ahead).
    pub cached: bool,
    /// True if the budget cut the read-ahead short.
    pub capped: bool,
}

/// Reads the objects of `image`'s profile ahead, in profile order, with `threads` threads,
/// up to `budget` bytes of page cache. Returns when every read is queued (not done). No
/// profile, an unreadable one or a zero budget: nothing happens.
pub fn prefetch_profile(
    store: &Store,
    image: &Digest,
    budget: u64,
    threads: usize,
) -> PrefetchReport {
    let Ok(Some(profile)) = store.read_profile(image) else {
        return PrefetchReport::default();
    };
    prefetch(store, &profile, budget, threads)
}

/// [`prefetch_profile`] of a profile in hand.
pub fn prefetch(store: &Store, profile: &Profile, budget: u64, threads: usize) -> PrefetchReport {
    let mut report = PrefetchReport {
        profiled: profile.entries.len(),
        ..Default::default()
    };
    if budget == 0 || profile.entries.is_empty() {
        return report;
    }
    if profile_cached(store, profile) {
        report.cached = true;
        return report;
    }
    read_ahead(store, profile, budget, threads)
}

/// Asks for every object of `profile` in order, within `budget` (the part of [`prefetch`]
/// after its check for a cached profile).
fn read_ahead(store: &Store, profile: &Profile, budget: u64, threads: usize) -> PrefetchReport {
    let mut report = PrefetchReport {
        profiled: profile.entries.len(),
        ..Default::default()
    };
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let files = AtomicUsize::new(0);
    let capped = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(entry) = profile.entries.get(i) else {
                        return;
                    };
                    let cost = entry.size.div_ceil(4096) * 4096;
                    let fits = bytes
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                            (b + cost <= budget).then_some(b + cost)
                        })
                        .is_ok();
                    if !fits {
                        capped.store(true, Ordering::Relaxed);
                        return;
                    }
                    let Ok(fd) = store.open_object(&entry.digest) else {
                        continue;
                    };
                    // One WILLNEED reads at most the device's read-ahead window (a few
                    // MiB): ask chunk by chunk.
                    let mut offset = 0;
                    while offset < entry.size {
                        let advice = rustix::fs::Advice::WillNeed;
                        let chunk = std::num::NonZeroU64::new(READ_AHEAD_CHUNK);
                        if rustix::fs::fadvise(&fd, offset, chunk, advice).is_err() {
                            break;
                        }
                        offset += READ_AHEAD_CHUNK;
                    }
                    files.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    report.files = files.into_inner();
    report.capped = capped.into_inner();
    report.bytes = bytes.into_inner();
    report
}

/// Whether a few of the profile's objects, spread over it, are all in the page cache.
fn profile_cached(store: &Store, profile: &Profile) -> bool {
    let n = profile.entries.len();
    let step = (n / CACHED_PROBES).max(1);
    profile
        .entries
        .iter()
        .step_by(step)
        .take(CACHED_PROBES)
        .filter(|e| e.size > 0)
        .all(|e| {
            store
                .open_object(&e.digest)
                .is_ok_and(|fd| crate::mount::is_cached(fd.as_fd()))
        })
}

/// The read-ahead budget: `VELO_PREFETCH_BYTES` (bytes; 0 turns read-ahead off), else
/// [`DEFAULT_PREFETCH_BYTES`]. A value that is not a number is an error naming it.
pub fn budget_from_env() -> Result<u64, String> {
    match std::env::var("VELO_PREFETCH_BYTES") {
        Err(_) => Ok(DEFAULT_PREFETCH_BYTES),
        Ok(v) => v.trim().parse::<u64>().map_err(|_| {
            format!("VELO_PREFETCH_BYTES={v:?}: not a number of bytes (0 turns read-ahead off)")
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn object_paths_name_their_digest_and_nothing_else_does() {
        let d = Digest::from_bytes([0xab; 32]);
        let hex = d.to_hex();
        let path = format!("/{}/{}", &hex[..2], &hex[2..]);
        assert_eq!(object_of_path(path.as_bytes()), Some(d));
        let full = format!("/var/lib/velo/objects/{}/{}", &hex[..2], &hex[2..]);
        assert_eq!(object_of_path(full.as_bytes()), Some(d));
        assert_eq!(object_of_path(b"/etc/passwd"), None);
        assert_eq!(object_of_path(hex.as_bytes()), None);
        let upper = format!("/{}/{}", &hex[..2].to_uppercase(), &hex[2..]);
        assert_eq!(object_of_path(upper.as_bytes()), None);
        let tmp = format!("/tmp/write-{}", &hex[2..]);
        assert_eq!(object_of_path(tmp.as_bytes()), None);
    }

    fn store_with_objects(n: usize) -> (tempfile::TempDir, Store, Profile) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path().join("s")).unwrap();
        let reads: Vec<(Digest, u64)> = (0..n)
            .map(|i| {
                let data = vec![i as u8; 5000];
                let d = store
                    .store_bytes(velo_objects::Kind::Object, &data)
                    .unwrap()
                    .digest;
                (d, 5000)
            })
            .collect();
        (dir, store, Profile::of_run(&reads))
    }

    #[test]
    fn read_ahead_stops_at_its_budget_in_profile_order() {
        let (_dir, store, profile) = store_with_objects(6);
        // Each 5,000-byte object takes two pages: a budget of 5 pages fits two of them.
        let r = read_ahead(&store, &profile, 5 * 4096, 1);
        assert_eq!(
            (r.profiled, r.files, r.bytes, r.capped),
            (6, 2, 4 * 4096, true)
        );
        let r = prefetch(&store, &profile, 0, 4);
        assert_eq!((r.files, r.bytes), (0, 0));
        let r = read_ahead(&store, &profile, u64::MAX, 4);
        assert_eq!((r.files, r.bytes, r.capped), (6, 6 * 2 * 4096, false));
    }

    #[test]
    fn a_missing_object_is_skipped_not_fatal() {
        let (_dir, store, mut profile) = store_with_objects(2);
        profile.entries.insert(
            0,
            velo_objects::ProfileEntry {
                digest: Digest::from_bytes([9; 32]),
                size: 10,
                hits: 1,
            },
        );
        let r = read_ahead(&store, &profile, u64::MAX, 2);
        assert_eq!((r.profiled, r.files), (3, 2));
    }

    #[test]
    fn profiles_are_recorded_until_settled() {
        assert!(wants_recording_of(None));
        let one = Profile::of_run(&[(Digest::from_bytes([1; 32]), 1)]);
        assert!(wants_recording_of(Some(&one)));
        let settled = Profile {
            runs: RECORD_RUNS,
            ..one.clone()
        };
        assert!(!wants_recording_of(Some(&settled)));
        // Runs that read nothing: recorded longer, then settled too.
        let empty = Profile {
            runs: RECORD_RUNS,
            entries: Vec::new(),
        };
        assert!(wants_recording_of(Some(&empty)));
        let empty_settled = Profile {
            runs: RECORD_RUNS_EMPTY,
            entries: Vec::new(),
        };
        assert!(!wants_recording_of(Some(&empty_settled)));
    }

    proptest! {
        #[test]
        fn any_digest_round_trips_through_its_path(b in any::<[u8; 32]>(), prefix in "[a-z/]{0,20}") {
            let d = Digest::from_bytes(b);
            let path = format!("{prefix}/{}", d.object_rel_path());
            prop_assert_eq!(object_of_path(path.as_bytes()), Some(d));
        }

        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = object_of_path(&bytes);
        }
    }
}
