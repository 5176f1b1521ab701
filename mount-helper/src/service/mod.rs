//! `velo-mountd`: the one process of Velo Rift that runs as root for ordinary users.
//!
//! It owns the store (root, 0700; users never open a file of it) and answers requests on a
//! unix socket that every local user may open ([`crate::protocol`] describes the wire). It
//! identifies each caller by `SO_PEERCRED` and decides everything itself:
//!
//! - **import**: takes a tree a client built — its image and the objects it lacks — checking
//!   every object against its digest as it arrives, and writes the image again with velo's
//!   own writer, mapped to the caller (their owner, no set-id bits, no device nodes, no
//!   security xattrs). The ref goes into the caller's namespace. A per-user quota bounds the
//!   bytes a user's refs hold. See [`import`].
//! - **mount**: for a ref the caller may read (their own, or one root published), hands back
//!   a detached mount: read-only, or an overlay whose copy-on-write upper is in the store,
//!   fresh (lent, and lent again when it comes back untouched) or kept for the caller. The
//!   client attaches it in its own user and mount namespace. The service never attaches
//!   anything anywhere and never resolves a path a client sends. See [`overlays`].
//! - refs the caller may read, removing their own refs, and for root: status and stop.
//!
//! Each connection gets a thread; limits on connections (per user and in all), on message
//! sizes, on time between messages and on imports at once keep one client from stalling the
//! others. The only state is in the store and in memory: a killed service loses its cache,
//! and the next one removes what it left (lease dirs, pins).

mod activation;
mod conn;
mod import;
pub mod namespace;
mod overlays;
mod profiles;
mod quota;

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use velo_objects::{Store, StoreError};

pub use activation::{Listener, listen};
pub use overlays::{CAPACITY, LEASE_PREFIX, remove_orphan_leases};

use crate::error::{MountError, Result};
use crate::protocol::{Conn, ErrorKind, ProtocolError, Response};

/// The named store lock the service holds while it runs (one service per store).
pub(crate) const LOCK: &str = "image-cache";

/// How the service is run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bytes each ordinary user's refs may hold in the store (`None`: no limit).
    pub user_quota: Option<u64>,
    /// Exit after this long without a request and with nothing lent (socket activation
    /// starts it again); `None`: run until stopped.
    pub idle_exit: Option<Duration>,
    /// Connections at once, in all.
    pub max_connections: usize,
    /// Connections at once, per user (a `velo run` holds one while its command runs).
    pub max_per_user: usize,
    /// Imports at once, in all (each holds an image in memory).
    pub max_imports: usize,
    /// How long the service waits for the next message or the next bytes of one.
    pub request_timeout: Duration,
    /// Bytes of page cache one read-ahead of an image's profile may fill (0: none).
    pub prefetch_bytes: u64,
    /// One run in this many over an image whose profile is settled is recorded again (0:
    /// never).
    pub profile_refresh_every: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            user_quota: None,
            idle_exit: None,
            max_connections: 256,
            max_per_user: 32,
            max_imports: 4,
            request_timeout: Duration::from_secs(30),
            prefetch_bytes: crate::profile::DEFAULT_PREFETCH_BYTES,
            profile_refresh_every: crate::profile::DEFAULT_REFRESH_EVERY,
        }
    }
}

/// A request that failed: what to tell the client.
#[derive(Debug)]
pub(crate) struct Failure {
    kind: ErrorKind,
    message: String,
}

impl Failure {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn store(e: StoreError) -> Self {
        Self::new(ErrorKind::Failed, e.to_string())
    }

    pub(crate) fn mount(e: MountError) -> Self {
        let kind = match &e {
            MountError::BadUpper { .. } => ErrorKind::Busy,
            MountError::ImageRefused { .. } => ErrorKind::Corrupt,
            _ => ErrorKind::Failed,
        };
        Self::new(kind, e.to_string())
    }

    pub(crate) fn io(e: ProtocolError) -> Self {
        Self::new(ErrorKind::Failed, e.to_string())
    }

    fn response(&self) -> Response {
        Response::Error {
            kind: self.kind,
            message: self.message.clone(),
        }
    }
}

/// What every connection's thread shares.
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) config: Config,
    pub(crate) overlays: Mutex<overlays::Overlays>,
    pub(crate) object_sets: Mutex<import::ObjectSets>,
    user_locks: import::UserLocks,
    connections: Mutex<HashMap<u32, usize>>,
    imports: (Mutex<usize>, Condvar),
    stop: AtomicBool,
    /// The connection of a `stop` request, answered once everything is let go.
    stopped_by: Mutex<Option<Conn>>,
    last_request: Mutex<Instant>,
    /// Written to wake the accept loop (a `stop`).
    wake: UnixStream,
    /// Set while a thread reads the store's object directories ahead (after a cold start).
    prefetching: Arc<AtomicBool>,
    /// Access profiles: read ahead, recorded.
    pub(crate) profiles: profiles::Profiles,
}

impl Shared {
    /// The lock that serializes one user's imports.
    pub(crate) fn user_lock(&self, uid: u32) -> Arc<Mutex<()>> {
        let mut locks = self.user_locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, l)) = locks.iter().find(|(u, _)| *u == uid) {
            return l.clone();
        }
        let l = Arc::new(Mutex::new(()));
        locks.push((uid, l.clone()));
        l
    }

    /// A place among the imports under way, waiting up to a minute for one.
    pub(crate) fn import_slot(&self) -> Option<ImportSlot<'_>> {
        let (lock, freed) = &self.imports;
        let mut n = lock.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + Duration::from_secs(60);
        while *n >= self.config.max_imports {
            let left = deadline.checked_duration_since(Instant::now())?;
            n = freed
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *n += 1;
        Some(ImportSlot(self))
    }

    /// Starts reading `image` into the page cache, then the objects its profile names (see
    /// [`profiles`]); without a profile, when the image's first page was not cached (after a
    /// reboot or a dropped cache), the store's object directories (see
    /// [`crate::prefetch_image`], [`Store::prefetch_object_dirs`]). In threads: the client's
    /// command starts meanwhile, and its first lookups and reads find much of what they need
    /// in memory.
    pub(crate) fn prefetch(&self, image: &velo_objects::Digest) {
        let image_cached = crate::prefetch_image(&self.store, image);
        // With a profile, its objects' lookups read the directory blocks they need.
        let profiled = self.profiles.read_ahead(&self.store, image);
        if image_cached || profiled || self.prefetching.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(objects) = Store::open(self.store.root()) else {
            self.prefetching.store(false, Ordering::SeqCst);
            return;
        };
        let flag = self.prefetching.clone();
        let spawned = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                objects.prefetch_object_dirs();
                flag.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.prefetching.store(false, Ordering::SeqCst);
        }
    }

    fn lock_overlays(&self) -> std::sync::MutexGuard<'_, overlays::Overlays> {
        self.overlays.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        *self.last_request.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Asks the service to stop; `conn` is answered once it has.
    pub(crate) fn request_stop(&self, conn: Conn) {
        *self.stopped_by.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
        self.stop.store(true, Ordering::SeqCst);
        let _ = rustix::io::write(&self.wake, b"x");
    }
}

/// One import under way (see [`Shared::import_slot`]).
pub(crate) struct ImportSlot<'s>(&'s Shared);

impl Drop for ImportSlot<'_> {
    fn drop(&mut self) {
        let (lock, freed) = &self.0.imports;
        let mut n = lock.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        freed.notify_one();
    }
}

/// Serves `store` on `listener` until stopped (a root client's `stop`, or the store going
/// away), or, with [`Config::idle_exit`], until idle. Requires root (checked), a store root
/// owns, and that no other service serves the store.
pub fn serve(store: Store, listener: Listener, config: Config) -> Result<()> {
    crate::privilege::require_root("velo-mountd")?;
    let Some(_lock) = store.try_lock_named(LOCK)? else {
        return Err(MountError::Io {
            op: "serve",
            path: store.root().to_owned(),
            cause: std::io::Error::other("another velo-mountd already serves this store"),
        });
    };
    let orphans = overlays::remove_orphans_locked(&store);
    if orphans > 0 {
        tracing::info!("velo-mountd: removed {orphans} lease dirs left by an earlier service");
    }
    let (wake_rx, wake_tx) = UnixStream::pair()
        .map_err(|e| MountError::io("create a socket pair for", "velo-mountd", e))?;
    wake_rx
        .set_nonblocking(true)
        .map_err(|e| MountError::io("set up a socket pair for", "velo-mountd", e))?;
    let store_root = store.root().to_owned();
    let profiles = profiles::Profiles::new(
        store_root.clone(),
        config.prefetch_bytes,
        config.profile_refresh_every,
    );
    let shared = Arc::new(Shared {
        store,
        config,
        overlays: Mutex::new(overlays::Overlays::new()),
        object_sets: Mutex::new(import::ObjectSets::default()),
        user_locks: Mutex::new(Vec::new()),
        connections: Mutex::new(HashMap::new()),
        imports: (Mutex::new(0), Condvar::new()),
        stop: AtomicBool::new(false),
        stopped_by: Mutex::new(None),
        last_request: Mutex::new(Instant::now()),
        wake: wake_tx,
        prefetching: Arc::new(AtomicBool::new(false)),
        profiles,
    });
    tracing::info!(
        "velo-mountd: serving {} at {}",
        store_root.display(),
        listener.path().display()
    );
    let checks = Arc::new(AtomicBool::new(false));
    let mut tick = Instant::now();
    loop {
        let mut fds = [
            PollFd::new(listener.socket(), PollFlags::IN),
            PollFd::new(&wake_rx, PollFlags::IN),
        ];
        let timeout = rustix::time::Timespec {
            tv_sec: 2,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(MountError::io("wait for requests at", listener.path(), e)),
        }
        let incoming = !fds[0].revents().is_empty();
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if incoming && let Ok((stream, _)) = listener.socket().accept() {
            accept(&shared, stream);
        }
        if tick.elapsed() >= Duration::from_secs(2) {
            tick = Instant::now();
            if !store_exists(&store_root) {
                tracing::warn!("velo-mountd: the store {} is gone", store_root.display());
                break;
            }
            housekeeping(&shared, &checks);
            if let Some(idle) = shared.config.idle_exit {
                let quiet = shared
                    .last_request
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed()
                    >= idle;
                let open = shared
                    .connections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .sum::<usize>();
                if quiet && open == 0 && !shared.lock_overlays().busy() {
                    tracing::info!("velo-mountd: idle, exiting");
                    break;
                }
            }
        }
    }
    shared.lock_overlays().shut_down(&shared.store);
    drop(listener);
    let stopper = shared
        .stopped_by
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(conn) = stopper {
        let _ = conn.send(&Response::Ok);
    }
    Ok(())
}

fn store_exists(root: &Path) -> bool {
    std::fs::symlink_metadata(root).is_ok()
}

/// The stack of a connection's thread. Imports and summaries parse a client's image, and the
/// composefs reader recurses once per directory level (up to 2047): 2000 levels take ~11 MiB
/// in a debug build and ~2 MiB in a release build, and a thread that overflows its stack
/// aborts the whole service. Only the pages a thread touches are used.
const CONN_STACK: usize = 32 << 20;

/// Starts a thread for a new connection, within the limits.
fn accept(shared: &Arc<Shared>, stream: UnixStream) {
    let Ok(cred) = rustix::net::sockopt::socket_peercred(&stream) else {
        return;
    };
    let caller = namespace::Caller {
        uid: cred.uid.as_raw(),
        gid: cred.gid.as_raw(),
        pid: cred.pid.as_raw_nonzero().get() as u32,
    };
    if let Err(why) = admit(shared, caller.uid) {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        answer_failure(&Conn::new(stream), &Failure::new(ErrorKind::Busy, why));
        return;
    }
    shared.touch();
    let worker = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("conn-{}", caller.uid))
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _counted_out = Leave(&worker, caller.uid);
            conn::handle(&worker, stream, caller);
        });
    if spawned.is_err() {
        leave(shared, caller.uid);
    }
}

/// Counts a new connection of `uid`, or says which limit it would break.
fn admit(shared: &Shared, uid: u32) -> std::result::Result<(), String> {
    let mut open = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
    let total: usize = open.values().sum();
    let mine = open.get(&uid).copied().unwrap_or(0);
    if total >= shared.config.max_connections {
        return Err(format!(
            "velo-mountd serves {total} connections, its limit; try again shortly"
        ));
    }
    if mine >= shared.config.max_per_user {
        return Err(format!(
            "uid {uid} has {mine} connections open, the limit per user; try again when some \
             of your runs have finished"
        ));
    }
    *open.entry(uid).or_default() += 1;
    Ok(())
}

/// Uncounts a connection when its thread ends — also by a panic, which would otherwise keep
/// the connection counted against its user and the service's limits for good.
struct Leave<'s>(&'s Shared, u32);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        leave(self.0, self.1);
        self.0.touch();
    }
}

/// Uncounts a connection of `uid`.
fn leave(shared: &Shared, uid: u32) {
    let mut open = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = open.get_mut(&uid) {
        *n = n.saturating_sub(1);
    }
    open.retain(|_, n| *n > 0);
}

/// Periodic work: checks of retired overlays (in a thread: they read every process's fds),
/// and letting go of images unused for long.
fn housekeeping(shared: &Arc<Shared>, checking: &Arc<AtomicBool>) {
    shared.lock_overlays().expire(&shared.store);
    if checking.swap(true, Ordering::SeqCst) {
        return; // the last round is still going
    }
    let due = shared.lock_overlays().due_retired();
    if due.is_empty() {
        checking.store(false, Ordering::SeqCst);
        return;
    }
    let shared = shared.clone();
    let checking = checking.clone();
    let spawned = std::thread::Builder::new()
        .name("retired-checks".into())
        .spawn(move || {
            for o in due {
                let verdict = overlays::check(o, false);
                shared.lock_overlays().take(verdict);
            }
            checking.store(false, Ordering::SeqCst);
        });
    if spawned.is_err() {
        tracing::warn!("velo-mountd: could not start a thread to check retired overlays");
    }
}

/// Answers `conn` with a refusal, and logs it.
fn answer_failure(conn: &Conn, f: &Failure) {
    tracing::debug!("velo-mountd: refused: {}", f.message);
    let _ = conn.send(&f.response());
}
