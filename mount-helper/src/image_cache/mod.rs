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

use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendFlags};
use velo_objects::{Area, Digest, Store};

use crate::lease;
use crate::mount::GivenLayer;

mod service;
pub use service::serve;

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
