//! The image cache: a small root-only service, one per store, that keeps an EROFS superblock
//! for each recently used image, and lends out whole overlays of it to `velo run`.
//!
//! Every `velo run` needs a copy-on-write overlay over its image. A fresh overlay superblock
//! (and a fresh EROFS one under it) looks up and instantiates every path the command touches
//! again — measured on the node workload as +9% import time against a warm local tree with
//! both fresh, +6–7% with the EROFS superblock shared, +1–2% with a mount kept for all runs.
//! So the service keeps the EROFS superblock of each image, and lends each run a whole
//! detached overlay over it with its own upper dir (`mounts/.lease-*/`, discarded); the run
//! attaches a clone of it in its private namespace. When the run is done, the overlay comes
//! back; if its upper dir is untouched and nothing can reach it any more (see
//! [`crate::lease`]), the next run over the image gets it with its dentries warm — the common
//! case, as `node app.js` writes nothing into `node_modules` — and otherwise it is discarded.
//! Nothing of it is attached outside the runs' own namespaces, so nothing shows in the host's
//! mount table.
//!
//! Protocol, over the unix socket `mounts/.image-cache.sock` inside the 0700 store (and only
//! for peers with uid 0): one request line — `get DIGEST` (the EROFS layer), `lease DIGEST`
//! (an overlay), `status` or `stop`. The reply starts with `+` (with the EROFS mount's fd
//! attached for `get`, and for `lease` when no overlay could be made; a JSON list for
//! `status`), `L` followed by the lease's upper dir and a newline (with the overlay's fd), or
//! `-` followed by the reason. A lease's connection stays open while the run uses it; the run
//! writes `done` once its command has exited and its mount is detached. A connection that
//! closes without `done` (the run was killed) retires the lease: its upper dir is removed once
//! nothing reaches it. The service exits after [`IDLE`] without requests and with nothing
//! lent, when its store disappears, or on `stop` (`velo gc` stops it so that collected images
//! are let go). Everything here is best effort for the client: without the service, `velo
//! run` mounts the image itself.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use velo_objects::{Area, Digest, Store, VerityMode};

use crate::error::{MountError, Result};
use crate::lease::{self, UpperState};
use crate::mount::GivenLayer;

/// The service exits after this long without a request (and with nothing lent).
pub const IDLE: Duration = Duration::from_secs(600);
/// At most this many images are kept; the least recently used goes first.
pub const CAPACITY: usize = 32;
/// At most this many overlays per image wait, idle, for the next run.
const IDLE_LEASES: usize = 2;
/// How often the service checks that its store still exists and retired leases are free.
const TICK: Duration = Duration::from_secs(2);
/// A client waits at most this long for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// `stop` waits at most this long for the service to shut down and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const SOCKET: &str = ".image-cache.sock";
const LOCK: &str = "image-cache";
/// Lease dirs in `mounts/` start with this.
const LEASE_PREFIX: &str = ".lease-";

/// The socket's path.
pub fn socket_path(store: &Store) -> PathBuf {
    store.area_path(Area::Mounts).join(SOCKET)
}

/// Why the image cache gave no layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No service runs for this store.
    NoService,
    /// It runs, but did not hand out a layer (the reason is logged at debug level).
    Refused,
}

/// What to ask the image cache for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The image's EROFS layer, to build an overlay over.
    Layer,
    /// A whole overlay with a discarded upper (for one copy-on-write mount).
    Lease,
}

/// A request sent to the image cache, its answer not read yet: the service works on it while
/// the caller gets on with something else.
#[derive(Debug)]
pub struct Pending {
    stream: UnixStream,
    image: Digest,
    /// The store's `mounts/`, where every lease dir must be.
    mounts: PathBuf,
}

/// What the image cache handed out.
#[derive(Debug)]
pub struct Granted {
    /// The layer, for [`crate::mount_image_over`].
    pub layer: GivenLayer,
    /// For a lent overlay: the lease, to hand back once the run is over.
    pub lease: Option<Lease>,
}

/// A lent overlay, held by the run that uses it. [`Lease::done`] hands it back; dropping it
/// without that (or the run being killed) retires it.
#[derive(Debug)]
pub struct Lease {
    stream: UnixStream,
    dir: PathBuf,
}

impl Lease {
    /// Hands the overlay back: call once the command has exited and the run's mount of it is
    /// detached. If the service has gone meanwhile, removes the lease's dir itself.
    pub fn done(self) {
        let sent = rustix::net::send(&self.stream, b"done\n", SendFlags::NOSIGNAL);
        if !matches!(sent, Ok(5)) {
            tracing::debug!("image cache gone; removing {}", self.dir.display());
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Asks the store's image cache for a layer of `image`; [`Pending::receive`] takes the
/// answer. On a miss the caller mounts the image itself.
pub fn request(store: &Store, image: &Digest, want: Want) -> std::result::Result<Pending, Miss> {
    let mut stream = connect(store).ok_or(Miss::NoService)?;
    let verb = match want {
        Want::Layer => "get",
        Want::Lease => "lease",
    };
    stream
        .write_all(format!("{verb} {image}\n").as_bytes())
        .map_err(|_| Miss::Refused)?;
    Ok(Pending {
        stream,
        image: *image,
        mounts: store.area_path(Area::Mounts),
    })
}

impl Pending {
    /// The layer, or why there is none.
    pub fn receive(mut self) -> std::result::Result<Granted, Miss> {
        let (reply, fd) = answer(&mut self.stream).ok_or(Miss::Refused)?;
        let refused = |why: &str| {
            tracing::debug!("image cache: nothing for {}: {why}", self.image);
            Miss::Refused
        };
        match (reply.first(), fd) {
            (Some(b'+'), Some(fd)) => Ok(Granted {
                layer: GivenLayer::Erofs(fd),
                lease: None,
            }),
            (Some(b'L'), Some(fd)) => {
                let upper = PathBuf::from(std::ffi::OsStr::from_bytes(&reply[1..]));
                // The run may remove this dir (if the service is gone when it is done): it must
                // be a lease dir of this store.
                let dir = upper
                    .parent()
                    .filter(|d| {
                        d.parent().is_some_and(|p| same_dir(p, &self.mounts))
                            && d.file_name()
                                .is_some_and(|n| n.as_bytes().starts_with(LEASE_PREFIX.as_bytes()))
                            && upper.file_name() == Some("upper".as_ref())
                    })
                    .ok_or_else(|| refused(&format!("bad lease path {}", upper.display())))?;
                Ok(Granted {
                    lease: Some(Lease {
                        dir: dir.to_owned(),
                        stream: self.stream,
                    }),
                    layer: GivenLayer::Overlay { mount: fd, upper },
                })
            }
            _ => Err(refused(&String::from_utf8_lossy(&reply))),
        }
    }
}

/// Whether the two paths name the same directory (however spelt).
fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.is_dir() && (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Reads one reply: its text up to a newline or the end (without the newline), and the fd
/// that came with it.
fn answer(stream: &mut UnixStream) -> Option<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = [0u8; 4096];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        &*stream,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .ok()?;
    let fd = control.drain().find_map(|m| match m {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    let mut reply = buf[..msg.bytes].to_vec();
    if reply.first() == Some(&b'-') {
        let _ = stream.read_to_end(&mut reply);
    }
    if let Some(end) = reply.iter().position(|&b| b == b'\n') {
        reply.truncate(end);
    }
    Some((reply, fd))
}

/// One image the cache holds, as `velo image-cache status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cached {
    /// The image.
    pub image: Digest,
    /// How many requests it answered from the superblock it already had.
    pub hits: u64,
    /// Overlays of it lent out now.
    #[serde(default)]
    pub lent: usize,
    /// Overlays of it waiting for the next run.
    #[serde(default)]
    pub idle: usize,
    /// Handed-back overlays of it being checked now.
    #[serde(default)]
    pub checking: usize,
    /// Overlays of it discarded while something still reaches them (removed once nothing
    /// does).
    #[serde(default)]
    pub retired: usize,
    /// How many runs got an overlay that an earlier run had handed back untouched.
    #[serde(default)]
    pub reused: u64,
    /// How many handed-back overlays were discarded (written to, or still reachable).
    #[serde(default)]
    pub discarded: u64,
}

/// The images the store's image cache holds; `None` if no cache runs.
pub fn status(store: &Store) -> Option<Vec<Cached>> {
    let mut stream = connect(store)?;
    stream.write_all(b"status\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    serde_json::from_str(reply.strip_prefix('+')?).ok()
}

/// Stops the store's image cache, if one runs, and waits until it has exited (so that it
/// holds nothing of the store's filesystem any more). Returns whether one ran.
pub fn stop(store: &Store) -> bool {
    let Some(mut stream) = connect(store) else {
        return false;
    };
    let process = rustix::net::sockopt::socket_peercred(&stream)
        .ok()
        .and_then(|c| {
            rustix::process::pidfd_open(c.pid, rustix::process::PidfdFlags::empty()).ok()
        });
    // It answers once it has let everything go, which may take a few checks' time.
    let _ = stream.set_read_timeout(Some(STOP_TIMEOUT));
    let mut reply = [0u8; 1];
    let stopped = stream.write_all(b"stop\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && reply[0] == b'+';
    if stopped && let Some(pidfd) = process {
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        let timeout = rustix::time::Timespec {
            tv_sec: STOP_TIMEOUT.as_secs() as i64,
            tv_nsec: 0,
        };
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
    }
    stopped
}

fn connect(store: &Store) -> Option<UnixStream> {
    let stream = UnixStream::connect(socket_path(store)).ok()?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).ok()?;
    Some(stream)
}

/// Removes the lease dirs in the store's `mounts/` that no mount in any mount namespace uses
/// as its upper dir (left by an image cache that was killed, or stopped while they were lent
/// or still reachable). Does nothing while an image cache runs for the store. Returns how many
/// it removed.
pub fn remove_orphan_leases(store: &Store) -> usize {
    match store.try_lock_named(LOCK) {
        Ok(Some(_lock)) => remove_orphans_locked(store),
        _ => 0,
    }
}

/// [`remove_orphan_leases`], the image-cache lock held.
fn remove_orphans_locked(store: &Store) -> usize {
    let mounts = store.area_path(Area::Mounts);
    let Ok(entries) = std::fs::read_dir(&mounts) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        if !e
            .file_name()
            .as_bytes()
            .starts_with(LEASE_PREFIX.as_bytes())
        {
            continue;
        }
        let dir = e.path();
        if lease::upper_mounted(&dir.join("upper")) {
            continue;
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// One cached image.
struct Entry {
    image: Digest,
    mount: OwnedFd,
    used: Instant,
    hits: u64,
    reused: u64,
    discarded: u64,
}

/// An overlay of an image, with its upper dir in the store.
struct Overlay {
    id: u64,
    image: Digest,
    mount: OwnedFd,
    /// `mounts/.lease-*`, holding `upper` and `work`.
    dir: PathBuf,
    upper: PathBuf,
    /// The upper dir's state when the overlay was made.
    pristine: Option<UpperState>,
    /// Device numbers its files report (learnt at its first check).
    devs: Vec<u64>,
    /// Runs it served.
    uses: u64,
    /// Checks that found it still reachable after it was retired.
    retired_checks: u32,
}

impl Overlay {
    /// Lets the overlay go and removes its dirs.
    fn remove(self) {
        drop(self.mount);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("image cache: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Where an overlay is.
enum Place {
    /// Waiting for the next run.
    Idle(Overlay),
    /// In use by a run, which says `done` on this connection.
    Lent(Overlay, UnixStream),
    /// Discarded while something may still reach it: its dir goes once nothing does. Checked
    /// again from the given time on.
    Retired(Overlay, Instant),
}

/// What a check thread found, with the overlay it took.
enum Verdict {
    /// Handed back untouched and unreachable: lend it again.
    Reuse(Overlay),
    /// Still reachable: keep it until it is not. (True if a run had just handed it back.)
    Retire(Overlay, bool),
    /// Removed: it had been written to, or nothing reaches it any more. (True if a run had
    /// just handed it back.)
    Removed(Digest, bool),
}

/// Checks of handed-back and retired overlays, off the service's thread (a check reads every
/// process's fds; requests keep being answered meanwhile).
struct Checker {
    tx: mpsc::Sender<Verdict>,
    rx: mpsc::Receiver<Verdict>,
    /// Written to when a verdict is sent, to wake the poll.
    wake_tx: std::sync::Arc<UnixStream>,
    wake_rx: UnixStream,
    /// The image of each check under way.
    running: Vec<Digest>,
}

impl Checker {
    fn new() -> Result<Self> {
        let (wake_rx, wake_tx) = UnixStream::pair()
            .map_err(|e| MountError::io("create a socket pair for", "the image cache", e))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(|e| MountError::io("set up a socket pair for", "the image cache", e))?;
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            tx,
            rx,
            wake_tx: std::sync::Arc::new(wake_tx),
            wake_rx,
            running: Vec::new(),
        })
    }

    /// Checks `overlay` in a thread: `handed_back` after a run said `done` (may be reused),
    /// otherwise a retired one (removed once unreachable).
    fn check(&mut self, mut overlay: Overlay, handed_back: bool) {
        let tx = self.tx.clone();
        let wake = self.wake_tx.clone();
        let me = std::process::id();
        self.running.push(overlay.image);
        std::thread::spawn(move || {
            if overlay.devs.is_empty() {
                overlay.devs = lease::overlay_devs(overlay.mount.as_fd());
            }
            let untouched = handed_back
                && overlay.pristine.is_some()
                && lease::upper_state(&overlay.upper) == overlay.pristine;
            let verdict = match (untouched, lease::reachable(&overlay.devs, me)) {
                (true, false) => Verdict::Reuse(overlay),
                (_, true) => Verdict::Retire(overlay, handed_back),
                (false, false) => {
                    let image = overlay.image;
                    overlay.remove();
                    Verdict::Removed(image, handed_back)
                }
            };
            let _ = tx.send(verdict);
            let _ = rustix::io::write(&*wake, b"x");
        });
    }
}

/// The service's state.
struct Service<'s> {
    store: &'s Store,
    images: Vec<Entry>,
    overlays: Vec<Place>,
    checker: Checker,
    next_id: u64,
    /// Set when the kernel refused to make an overlay here (before Linux 6.13 layers cannot
    /// be passed as fds): `lease` requests get the EROFS layer from then on.
    no_leases: bool,
}

/// Serves the store's image cache until it is idle for `idle`, its store goes, or it is
/// stopped. Returns at once if another service holds the store's image-cache lock. Requires
/// root (checked).
pub fn serve(store: &Store, idle: Duration) -> Result<()> {
    crate::privilege::require_root("the image cache")?;
    let Some(_lock) = store.try_lock_named(LOCK)? else {
        return Ok(()); // another one serves this store
    };
    let orphans = remove_orphans_locked(store);
    if orphans > 0 {
        tracing::info!("image cache: removed {orphans} lease dirs left by an earlier one");
    }
    let path = socket_path(store);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| MountError::io("listen at", &path, e))?;
    let mut service = Service {
        store,
        images: Vec::new(),
        overlays: Vec::new(),
        checker: Checker::new()?,
        next_id: 0,
        no_leases: false,
    };
    let mut last = Instant::now();
    let mut tick = Instant::now();
    let mut stopped_by = None;
    loop {
        // Poll the socket, the checker's wake pipe and every lent overlay's connection.
        let mut fds = vec![
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(&service.checker.wake_rx, PollFlags::IN),
        ];
        let mut lent = Vec::new();
        for place in &service.overlays {
            if let Place::Lent(overlay, stream) = place {
                fds.push(PollFd::new(stream, PollFlags::IN));
                lent.push(overlay.id);
            }
        }
        let timeout = rustix::time::Timespec {
            tv_sec: TICK.as_secs() as i64,
            tv_nsec: 0,
        };
        let ready = match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => 0,
            Err(e) => return Err(MountError::io("wait for requests at", &path, e)),
        };
        let revents: Vec<PollFlags> = fds.iter().map(|f| f.revents()).collect();
        drop(fds);
        if ready > 0 {
            // Connections of lent overlays: `done`, or closed without it.
            for (k, id) in lent.into_iter().enumerate() {
                if !revents[2 + k].is_empty() {
                    service.hand_back(id);
                }
            }
            if !revents[1].is_empty() {
                service.take_verdicts();
            }
            if !revents[0].is_empty()
                && let Ok((stream, _)) = listener.accept()
            {
                last = Instant::now();
                if let Some(stop) = service.handle(stream) {
                    stopped_by = Some(stop);
                    break;
                }
            }
        }
        if tick.elapsed() >= TICK {
            tick = Instant::now();
            if std::fs::symlink_metadata(store.root()).is_err() {
                break;
            }
            service.check_retired();
            let busy = !service.checker.running.is_empty()
                || service
                    .overlays
                    .iter()
                    .any(|p| matches!(p, Place::Lent(..)));
            if last.elapsed() >= idle && !busy {
                break;
            }
        }
    }
    service.shut_down();
    let _ = std::fs::remove_file(&path);
    // Answered only now that every mount the service held is let go: whoever stopped it may
    // unmount the store's filesystem next.
    if let Some(mut stream) = stopped_by {
        let _ = stream.write_all(b"+");
    }
    Ok(())
}

impl Service<'_> {
    /// Answers one request; returns the connection of a `stop` request, to answer once the
    /// service has shut down.
    fn handle(&mut self, mut stream: UnixStream) -> Option<UnixStream> {
        let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        let refuse = |stream: &mut UnixStream, why: &str| {
            let _ = stream.write_all(format!("-{why}").as_bytes());
        };
        if !rustix::net::sockopt::socket_peercred(&stream).is_ok_and(|c| c.uid.is_root()) {
            refuse(&mut stream, "only root may use the image cache");
            return None;
        }
        // A request is one short line, sent in one write: read until its newline.
        let mut buf = [0u8; 128];
        let mut len = 0;
        while len < buf.len() && !buf[..len].contains(&b'\n') {
            match stream.read(&mut buf[len..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
        }
        let line = String::from_utf8_lossy(&buf[..len]);
        let line = line.trim_end_matches('\n');
        if line == "stop" {
            return Some(stream);
        }
        if line == "status" {
            let json = serde_json::to_string(&self.status()).unwrap_or_else(|_| "[]".into());
            let _ = stream.write_all(format!("+{json}").as_bytes());
            return None;
        }
        let Some((verb, image)) = line
            .split_once(' ')
            .and_then(|(v, d)| Some((v, Digest::parse(d).ok()?)))
            .filter(|(v, _)| matches!(*v, "get" | "lease"))
        else {
            refuse(&mut stream, &format!("bad request {line:?}"));
            return None;
        };
        let erofs = match self.erofs(&image) {
            Ok(i) => i,
            Err(e) => {
                refuse(&mut stream, &e.to_string());
                return None;
            }
        };
        if verb == "lease" && !self.no_leases {
            match self.lend(&image, erofs) {
                Ok(overlay) => {
                    let reply = [b"L", overlay.upper.as_os_str().as_bytes(), b"\n"].concat();
                    if send_fd(&stream, &reply, overlay.mount.as_fd()) {
                        self.overlays.push(Place::Lent(overlay, stream));
                    } else {
                        self.overlays.push(Place::Idle(overlay));
                    }
                    return None;
                }
                Err(e) => {
                    tracing::debug!("image cache: no overlay of {image}: {e}");
                    self.no_leases |= matches!(e, MountError::Kernel { .. });
                }
            }
        }
        let _ = send_fd(&stream, b"+", self.images[erofs].mount.as_fd());
        None
    }

    /// The index of `image`'s entry, its EROFS superblock mounted now if it is not cached.
    fn erofs(&mut self, image: &Digest) -> Result<usize> {
        let i = match self.images.iter().position(|e| e.image == *image) {
            Some(i) => {
                self.images[i].hits += 1;
                i
            }
            None => {
                let store = self.store;
                let image_fd = store.open_image(image)?;
                if store.verity() == VerityMode::Enabled {
                    crate::mount::check_image_verity(store, image_fd.as_fd(), image)?;
                }
                let (mount, _) = crate::mount::erofs_mount(image_fd.as_fd(), image)?;
                if self.images.len() >= CAPACITY
                    && let Some(oldest) =
                        (0..self.images.len()).min_by_key(|&i| self.images[i].used)
                {
                    let gone = self.images.swap_remove(oldest).image;
                    // Its idle overlays go with it (lent ones hold the superblock themselves).
                    self.remove_idle(|o| o.image == gone);
                }
                self.images.push(Entry {
                    image: *image,
                    mount,
                    used: Instant::now(),
                    hits: 0,
                    reused: 0,
                    discarded: 0,
                });
                self.images.len() - 1
            }
        };
        self.images[i].used = Instant::now();
        Ok(i)
    }

    /// An overlay of `image` to lend: the idle one that served most runs (the warmest), or a
    /// new one over the cached EROFS mount `erofs`.
    fn lend(&mut self, image: &Digest, erofs: usize) -> Result<Overlay> {
        let warmest = (0..self.overlays.len())
            .filter(|&i| matches!(&self.overlays[i], Place::Idle(o) if o.image == *image))
            .max_by_key(|&i| match &self.overlays[i] {
                Place::Idle(o) => o.uses,
                _ => 0,
            });
        if let Some(i) = warmest
            && let Place::Idle(mut overlay) = self.overlays.swap_remove(i)
        {
            overlay.uses += 1;
            self.images[erofs].reused += 1;
            return Ok(overlay);
        }
        self.next_id += 1;
        let dir = self.store.area_path(Area::Mounts).join(format!(
            "{LEASE_PREFIX}{}-{}",
            std::process::id(),
            self.next_id
        ));
        let made =
            crate::mount::lease_overlay(self.store, image, self.images[erofs].mount.as_fd(), &dir);
        let (mount, upper) = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Overlay {
            id: self.next_id,
            image: *image,
            pristine: lease::upper_state(&upper),
            mount,
            dir,
            upper,
            devs: Vec::new(),
            uses: 1,
            retired_checks: 0,
        })
    }

    /// A lent overlay's connection became readable: `done` (check it for reuse) or closed
    /// without it (the run was killed: retire it).
    fn hand_back(&mut self, id: u64) {
        let Some(i) = self
            .overlays
            .iter()
            .position(|p| matches!(p, Place::Lent(o, _) if o.id == id))
        else {
            return;
        };
        let Place::Lent(overlay, mut stream) = self.overlays.swap_remove(i) else {
            return;
        };
        let mut buf = [0u8; 16];
        let done = matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"done"));
        tracing::debug!(
            "image cache: overlay {} of {} handed back ({})",
            overlay.id,
            overlay.image,
            if done { "done" } else { "connection lost" }
        );
        self.checker.check(overlay, done);
    }

    /// Starts a check of every retired overlay that is due (removed once nothing reaches it).
    fn check_retired(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.overlays.len() {
            if matches!(self.overlays[i], Place::Retired(_, due) if due <= now) {
                if let Place::Retired(o, _) = self.overlays.swap_remove(i) {
                    self.checker.check(o, false);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Takes the checks' verdicts.
    fn take_verdicts(&mut self) {
        let mut byte = [0u8; 64];
        let _ = rustix::io::read(&self.checker.wake_rx, &mut byte);
        while let Ok(verdict) = self.checker.rx.try_recv() {
            let (image, discarded) = match &verdict {
                Verdict::Reuse(o) => (o.image, false),
                Verdict::Retire(o, handed_back) => (o.image, *handed_back),
                Verdict::Removed(image, handed_back) => (*image, *handed_back),
            };
            if let Some(k) = self.checker.running.iter().position(|i| *i == image) {
                self.checker.running.swap_remove(k);
            }
            let entry = self.images.iter_mut().find(|e| e.image == image);
            match verdict {
                Verdict::Reuse(o) => {
                    tracing::debug!("image cache: overlay {} of {image} kept", o.id);
                    if entry.is_some() {
                        self.overlays.push(Place::Idle(o));
                        self.trim_idle(&image);
                    } else {
                        o.remove(); // its image left the cache meanwhile
                    }
                }
                Verdict::Retire(mut o, _) => {
                    if let Some(e) = entry {
                        e.discarded += u64::from(discarded);
                    }
                    // Something may hold it for long (a daemon): check less and less often,
                    // from every tick up to every 32.
                    let due = Instant::now() + TICK * (1 << o.retired_checks.min(5));
                    o.retired_checks += 1;
                    self.overlays.push(Place::Retired(o, due));
                }
                Verdict::Removed(..) => {
                    if let Some(e) = entry {
                        e.discarded += u64::from(discarded);
                    }
                }
            }
        }
    }

    /// Keeps at most [`IDLE_LEASES`] idle overlays of `image`: the ones that served most runs.
    fn trim_idle(&mut self, image: &Digest) {
        loop {
            let idle: Vec<usize> = (0..self.overlays.len())
                .filter(|&i| matches!(&self.overlays[i], Place::Idle(o) if o.image == *image))
                .collect();
            if idle.len() <= IDLE_LEASES {
                return;
            }
            let Some(&coldest) = idle.iter().min_by_key(|&&i| match &self.overlays[i] {
                Place::Idle(o) => o.uses,
                _ => 0,
            }) else {
                return;
            };
            if let Place::Idle(o) = self.overlays.swap_remove(coldest) {
                o.remove();
            }
        }
    }

    /// Removes the idle overlays `pick` selects.
    fn remove_idle(&mut self, pick: impl Fn(&Overlay) -> bool) {
        let mut i = 0;
        while i < self.overlays.len() {
            if matches!(&self.overlays[i], Place::Idle(o) if pick(o)) {
                if let Place::Idle(o) = self.overlays.swap_remove(i) {
                    o.remove();
                }
            } else {
                i += 1;
            }
        }
    }

    fn status(&self) -> Vec<Cached> {
        self.images
            .iter()
            .map(|e| {
                let count = |f: fn(&Place) -> Option<&Overlay>| {
                    self.overlays
                        .iter()
                        .filter_map(f)
                        .filter(|o| o.image == e.image)
                        .count()
                };
                Cached {
                    image: e.image,
                    hits: e.hits,
                    lent: count(|p| match p {
                        Place::Lent(o, _) => Some(o),
                        _ => None,
                    }),
                    idle: count(|p| match p {
                        Place::Idle(o) => Some(o),
                        _ => None,
                    }),
                    checking: self
                        .checker
                        .running
                        .iter()
                        .filter(|i| **i == e.image)
                        .count(),
                    retired: count(|p| match p {
                        Place::Retired(o, _) => Some(o),
                        _ => None,
                    }),
                    reused: e.reused,
                    discarded: e.discarded,
                }
            })
            .collect()
    }

    /// Lets everything go: idle overlays are removed (after the checks under way finish);
    /// lent ones stay with their runs, which remove their dirs when they find the service
    /// gone; retired ones are left to the next service (or `velo gc`).
    fn shut_down(mut self) {
        for _ in 0..self.checker.running.len() {
            match self.checker.rx.recv_timeout(CLIENT_TIMEOUT) {
                Ok(Verdict::Reuse(o)) => o.remove(),
                Ok(Verdict::Retire(..) | Verdict::Removed(..)) => {}
                Err(_) => break,
            }
        }
        self.remove_idle(|_| true);
    }
}

/// Sends `reply` with `fd` attached; false if it could not be sent.
fn send_fd(stream: &UnixStream, reply: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let fds = [fd];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    match rustix::net::sendmsg(
        stream,
        &[IoSlice::new(reply)],
        &mut control,
        SendFlags::NOSIGNAL,
    ) {
        Ok(n) => n == reply.len(),
        Err(e) => {
            tracing::debug!("image cache: reply: {e}");
            false
        }
    }
}
