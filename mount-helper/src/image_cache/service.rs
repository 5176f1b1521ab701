//! The image cache's service: the process that holds the EROFS superblocks and the overlays,
//! answers requests, takes lent overlays back and has them checked.

use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use velo_objects::{Area, Digest, Store, VerityMode};

use super::{
    CAPACITY, CLIENT_TIMEOUT, Cached, IDLE_LEASES, LEASE_PREFIX, LOCK, TICK, remove_orphans_locked,
    socket_path,
};
use crate::error::{MountError, Result};
use crate::lease::{self, UpperState};

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
        let due: Vec<Place> = self
            .overlays
            .extract_if(.., |p| matches!(p, Place::Retired(_, due) if *due <= now))
            .collect();
        for place in due {
            if let Place::Retired(o, _) = place {
                self.checker.check(o, false);
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
        let mut idle: Vec<(u64, u64)> = self
            .overlays
            .iter()
            .filter_map(|p| match p {
                Place::Idle(o) if o.image == *image => Some((o.uses, o.id)),
                _ => None,
            })
            .collect();
        idle.sort_unstable_by(|a, b| b.cmp(a));
        let colder: Vec<u64> = idle.iter().skip(IDLE_LEASES).map(|&(_, id)| id).collect();
        self.remove_idle(|o| colder.contains(&o.id));
    }

    /// Removes the idle overlays `pick` selects.
    fn remove_idle(&mut self, pick: impl Fn(&Overlay) -> bool) {
        for place in self
            .overlays
            .extract_if(.., |p| matches!(p, Place::Idle(o) if pick(o)))
        {
            if let Place::Idle(o) = place {
                o.remove();
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
