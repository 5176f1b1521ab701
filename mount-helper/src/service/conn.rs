//! One connection: reads requests one at a time and answers each; the mounts it lent are
//! taken back when the client says it is done, or when the connection closes (a killed
//! client never says so).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use velo_objects::StoreError;

use super::namespace::{self, Caller};
use super::overlays::{self, Overlay};
use super::{Failure, Shared, answer_failure, import};
use crate::protocol::{self, Conn, ErrorKind, ProtocolError, Request, Response, Writes};

/// Serves one connection until it closes, a request is malformed, or the client is done.
pub fn handle(shared: &Shared, stream: UnixStream, caller: Caller) {
    let timeout = Some(shared.config.request_timeout);
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    let mut conn = Conn::new(stream);
    let mut lent: Vec<Overlay> = Vec::new();
    // Recordings of what the runs over the lent mounts read; they end with the connection.
    let mut recordings = Vec::new();
    let mut done = false;
    let mut said_hello = false;
    loop {
        let req = match conn.read_request() {
            Ok(r) => r,
            Err(ProtocolError::Closed { .. } | ProtocolError::Io(_)) => break,
            Err(e @ (ProtocolError::Malformed(_) | ProtocolError::TooLong)) => {
                answer_failure(&conn, &Failure::new(ErrorKind::BadRequest, e.to_string()));
                break;
            }
        };
        if !said_hello && !matches!(req, Request::Hello { .. }) {
            answer_failure(
                &conn,
                &Failure::new(ErrorKind::BadRequest, "a conversation starts with hello"),
            );
            break;
        }
        let answer = match req {
            Request::Hello { version, usage } if version == protocol::VERSION => {
                said_hello = true;
                Ok(hello(shared, &caller, usage))
            }
            Request::Hello { version, .. } => Err(Failure::new(
                ErrorKind::BadRequest,
                format!(
                    "this velo speaks protocol {version}, velo-mountd speaks {}: use the \
                     velo that came with the service",
                    protocol::VERSION
                ),
            )),
            Request::Resolve {
                name,
                summary,
                persist,
            } => resolve(shared, &caller, &name, summary, persist.as_deref()),
            Request::Import {
                name,
                image,
                size,
                profile,
            } => import::import(shared, &mut conn, &caller, name, image, size, profile),
            Request::Mount { name, writes } => match mount(shared, &caller, &name, &writes) {
                Ok((fd, response, overlay)) => {
                    lent.extend(overlay);
                    // Marks are in place before the client has the mount.
                    if let Response::Mounted { image, .. } = &response {
                        recordings.extend(shared.profiles.record(&shared.store, image));
                    }
                    // A run holds the connection while its command runs: no timeout now.
                    let _ = conn.stream().set_read_timeout(None);
                    if conn.send_with_fd(&response, fd.as_fd()).is_err() {
                        break;
                    }
                    continue;
                }
                Err(f) => Err(f),
            },
            Request::Done => {
                done = true;
                break;
            }
            Request::Refs => namespace::list(&shared.store, &caller)
                .map(|refs| Response::Refs { refs })
                .map_err(Failure::store),
            Request::RemoveRef { name } => remove_ref(shared, &caller, &name),
            Request::Export { name, profile } => {
                match export(shared, &conn, &caller, &name, profile) {
                    Ok(()) => continue,
                    Err(f) => Err(f),
                }
            }
            Request::Status if caller.is_root() => Ok(Response::Status {
                images: shared.lock_overlays().status(),
            }),
            Request::Stop if caller.is_root() => {
                give_back(shared, lent, done);
                shared.request_stop(conn);
                return;
            }
            Request::Status | Request::Stop => Err(Failure::new(
                ErrorKind::Denied,
                "only root may ask velo-mountd for its status or stop it",
            )),
        };
        let sent = match answer {
            Ok(r) => conn.send(&r),
            Err(f) => {
                answer_failure(&conn, &f);
                Ok(())
            }
        };
        if sent.is_err() {
            break;
        }
    }
    drop(recordings);
    give_back(shared, lent, done);
}

/// Takes back the overlays a connection had: each is checked (off the lock) and reused,
/// retired or removed.
fn give_back(shared: &Shared, lent: Vec<Overlay>, done: bool) {
    for o in lent {
        shared.lock_overlays().returned(&o.image());
        let verdict = overlays::check(o, done);
        shared.lock_overlays().take(verdict);
    }
}

fn hello(shared: &Shared, caller: &Caller, usage: bool) -> Response {
    let used = (usage && !caller.is_root()).then(|| {
        namespace::own_images(&shared.store, caller)
            .map(|held| {
                super::quota::Ledger::load(&shared.store, caller).usage_in(&shared.store, &held)
            })
            .unwrap_or(0)
    });
    Response::Hello {
        version: protocol::VERSION,
        uid: caller.uid,
        gid: caller.gid,
        store: shared.store.root().display().to_string(),
        verity: match shared.store.verity() {
            velo_objects::VerityMode::Enabled => "require".into(),
            velo_objects::VerityMode::Unavailable => "off".into(),
        },
        quota: if caller.is_root() {
            None
        } else {
            shared.config.user_quota
        },
        used,
        profiles: true,
    }
}

/// The tenant that keeps a caller's persisted upper `id`.
fn tenant_name(caller: &Caller, id: &str) -> String {
    format!("u{}-{id}", caller.uid)
}

fn resolve(
    shared: &Shared,
    caller: &Caller,
    name: &str,
    summary: bool,
    persist: Option<&str>,
) -> Result<Response, Failure> {
    let store = &shared.store;
    let found = namespace::resolve(store, caller, name).map_err(Failure::store)?;
    let (files, bytes) = match (&found, summary) {
        (Some((image, _)), true) => match velo_image::inspect::load(store, image) {
            Ok(fs) => {
                let s = velo_image::inspect::summarize(&fs);
                (Some(s.files), Some(s.bytes))
            }
            Err(_) => (None, None),
        },
        _ => (None, None),
    };
    let persisted_bytes = persist.and_then(|id| {
        let t = tenant_name(caller, id);
        store
            .tenant(&t)
            .ok()
            .and_then(|_| store.tenant_upper_bytes(&t).ok())
    });
    let last_used = found
        .filter(|f| !f.1)
        .and_then(|_| store.ref_last_used(&namespace::own_ref(caller, name)).ok());
    Ok(Response::Resolved {
        image: found.map(|f| f.0),
        published: found.is_some_and(|f| f.1),
        last_used,
        files,
        bytes,
        persisted_bytes,
    })
}

/// Streams the image `name` names and all its objects (see [`Request::Export`]), and its
/// access profile if `with_profile` (cut to the image's objects; none if it cannot be read).
/// The image is read checked against its name; each object is sent as the store holds it
/// (the client checks every byte it gets, as it would from a registry).
fn export(
    shared: &Shared,
    conn: &Conn,
    caller: &Caller,
    name: &str,
    with_profile: bool,
) -> Result<(), Failure> {
    let store = &shared.store;
    let Some((image, _)) = namespace::resolve(store, caller, name).map_err(Failure::store)? else {
        return Err(Failure::new(
            ErrorKind::NotFound,
            format!("no ref {name:?} that you may read"),
        ));
    };
    let bytes = velo_image::inspect::read_image_bytes(store, &image)
        .map_err(|e| Failure::new(ErrorKind::Corrupt, e.to_string()))?;
    let fs = velo_image::read_image(&bytes, &image.to_hex())
        .map_err(|e| Failure::new(ErrorKind::Corrupt, e.to_string()))?;
    let objects = velo_image::inspect::objects_in_path_order(&fs);
    let profile = with_profile
        .then(|| shared.profiles.get(store, &image))
        .flatten()
        .and_then(|p| {
            let mut p = (*p).clone();
            let of_image: std::collections::HashSet<&velo_objects::Digest> =
                objects.iter().map(|(d, _)| d).collect();
            p.retain(|d| of_image.contains(d));
            (!p.entries.is_empty()).then(|| p.to_bytes())
        })
        .unwrap_or_default();
    conn.send(&Response::Exporting {
        image,
        size: bytes.len() as u64,
        objects: objects.len() as u64,
        profile: profile.len() as u64,
    })
    .map_err(Failure::io)?;
    // From here on the client reads raw bytes: a failure can only cut the stream short.
    if let Err(why) = send_export(store, conn, &bytes, &profile, &objects) {
        tracing::warn!(
            "velo-mountd: export of {image} to uid {} cut short: {why}",
            caller.uid
        );
        let _ = conn.stream().shutdown(std::net::Shutdown::Both);
    }
    Ok(())
}

fn send_export(
    store: &velo_objects::Store,
    conn: &Conn,
    image: &[u8],
    profile: &[u8],
    objects: &[(velo_objects::Digest, u64)],
) -> Result<(), String> {
    conn.send_raw(image).map_err(|e| e.to_string())?;
    conn.send_raw(profile).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    for (d, size) in objects {
        let mut head = [0u8; 40];
        head[..32].copy_from_slice(d.as_bytes());
        head[32..].copy_from_slice(&size.to_le_bytes());
        conn.send_raw(&head).map_err(|e| e.to_string())?;
        let fd = store.open_object(d).map_err(|e| e.to_string())?;
        let mut pos = 0u64;
        while pos < *size {
            let want = (*size - pos).min(buf.len() as u64) as usize;
            let n = velo_objects::fsutil::pread_full(fd.as_fd(), &mut buf[..want], pos)
                .map_err(|e| format!("read object {d}: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "object {d} is shorter than its image says; run `velo fsck`"
                ));
            }
            conn.send_raw(&buf[..n]).map_err(|e| e.to_string())?;
            pos += n as u64;
        }
    }
    Ok(())
}

fn remove_ref(shared: &Shared, caller: &Caller, name: &str) -> Result<Response, Failure> {
    match shared.store.remove_ref(&namespace::own_ref(caller, name)) {
        Ok(()) => Ok(Response::Ok),
        Err(StoreError::RefNotFound { .. }) => Err(Failure::new(
            ErrorKind::NotFound,
            format!("you have no ref {name:?}"),
        )),
        Err(e) => Err(Failure::store(e)),
    }
}

/// A detached mount for the caller, its answer, and the overlay the connection now holds
/// (none for a read-only mount: those are clones of one kept per image).
fn mount(
    shared: &Shared,
    caller: &Caller,
    name: &str,
    writes: &Writes,
) -> Result<(std::os::fd::OwnedFd, Response, Option<Overlay>), Failure> {
    let store = &shared.store;
    let Some((image, published)) =
        namespace::resolve(store, caller, name).map_err(Failure::store)?
    else {
        return Err(Failure::new(
            ErrorKind::NotFound,
            format!("no ref {name:?} that you may read"),
        ));
    };
    if !published {
        // For `velo gc --unused-for` (best effort: a failure only ages the ref).
        let _ = store.touch_ref_used(&namespace::own_ref(caller, name));
    }
    let verity = match store.verity() {
        velo_objects::VerityMode::Enabled => "require",
        velo_objects::VerityMode::Unavailable => "off",
    }
    .to_owned();
    shared.prefetch(&image);
    let mut cache = shared.lock_overlays();
    let (overlay, persisted) = match writes {
        Writes::ReadOnly => {
            let fd = cache.read_only(store, &image).map_err(Failure::mount)?;
            let response = Response::Mounted {
                image,
                writable: false,
                verity,
                persisted: false,
                reused: false,
            };
            return Ok((fd, response, None));
        }
        Writes::Discard => (cache.lend(store, &image).map_err(Failure::mount)?, false),
        Writes::Persist(id) => (
            cache
                .lend_tenant(store, &image, &tenant_name(caller, id))
                .map_err(Failure::mount)?,
            true,
        ),
    };
    drop(cache);
    let fd = match crate::mount::clone_mount(overlay.mount()) {
        Ok(fd) => fd,
        Err(e) => {
            give_back(shared, vec![overlay], false);
            return Err(Failure::mount(e));
        }
    };
    let response = Response::Mounted {
        image,
        writable: true,
        verity,
        persisted,
        reused: overlay.reused(),
    };
    Ok((fd, response, Some(overlay)))
}
