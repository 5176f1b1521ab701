//! The client of `velo-mountd`: what an ordinary user's `velo` (and root's, where a service
//! serves its store) asks of the service. It never opens a file of the store.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use velo_image::UnstoredSnapshot;
use velo_mount::protocol::{
    self, Conn, ErrorKind, ImportSummary, ProtocolError, RefEntry, Request, Response, Writes,
};
use velo_objects::Digest;

/// What went wrong talking to the service.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers at the socket.
    #[error(
        "velo-mountd is not running at {} ({reason}); start it with `sudo systemctl enable --now velo-mountd.socket` (units in deploy/systemd/), or run `sudo velo-mountd --socket {}` — or point velo at another socket with --socket / VELO_SOCKET",
        socket.display(),
        socket.display()
    )]
    NoService {
        /// The socket tried.
        socket: PathBuf,
        /// Why the connection failed.
        reason: String,
    },
    /// The service refused the request.
    #[error("velo-mountd: {message}")]
    Refused {
        /// What kind of refusal.
        kind: ErrorKind,
        /// Its words.
        message: String,
    },
    /// The conversation broke.
    #[error("talking to velo-mountd at {}: {cause}", socket.display())]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What broke (in the message; not chained, or it would be printed twice).
        cause: ProtocolError,
    },
    /// The service answered something this client did not expect.
    #[error("velo-mountd answered {got} to {request}")]
    Unexpected {
        /// What was asked.
        request: &'static str,
        /// What came back.
        got: String,
    },
    /// A file of the tree could not be read while sending it.
    #[error("read {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (in the message; not chained, or it would be printed twice).
        cause: std::io::Error,
    },
}

/// The socket to use: `explicit` (`--socket`), else `$VELO_SOCKET`, else the default.
pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_owned)
        .or_else(|| {
            std::env::var_os("VELO_SOCKET")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(protocol::DEFAULT_SOCKET))
}

/// What the service said about itself and the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    /// The caller's uid as the service sees it.
    pub uid: u32,
    /// The store the service owns.
    pub store: PathBuf,
    /// "require" or "off".
    pub verity: String,
    /// The caller's quota, if any.
    pub quota: Option<u64>,
    /// What the caller's refs hold now (if asked: [`Client::connect_with_usage`]).
    pub used: Option<u64>,
    /// The service takes and sends access profiles with imports and exports.
    pub profiles: bool,
}

/// A mount the service handed out.
#[derive(Debug)]
pub struct Mounted {
    /// The detached mount, to attach in the caller's namespace.
    pub fd: OwnedFd,
    /// The image.
    pub image: Digest,
    /// True if an earlier run had this overlay.
    pub reused: bool,
}

/// What [`Client::resolve`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The image, if the ref exists for the caller.
    pub image: Option<Digest>,
    /// Files and bytes of the image, if asked.
    pub files: Option<u64>,
    /// See `files`.
    pub bytes: Option<u64>,
    /// Bytes of the persisted upper, if asked and it exists.
    pub persisted_bytes: Option<u64>,
    /// When the caller's ref was last used (seconds since the epoch).
    pub last_used: Option<u64>,
}

/// A conversation with the service.
#[derive(Debug)]
pub struct Client {
    conn: Conn,
    socket: PathBuf,
    hello: Hello,
}

/// How long the client waits for an answer (an import's answers may take longer: the
/// service hashes and stores while reading).
const TIMEOUT: Duration = Duration::from_secs(120);

impl Client {
    /// Connects and says hello.
    pub fn connect(socket: &Path) -> Result<Self, ClientError> {
        Self::connect_inner(socket, false)
    }

    /// [`Client::connect`], and asks what the caller's refs hold against their quota.
    pub fn connect_with_usage(socket: &Path) -> Result<Self, ClientError> {
        Self::connect_inner(socket, true)
    }

    fn connect_inner(socket: &Path, usage: bool) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|e| ClientError::NoService {
            socket: socket.to_owned(),
            reason: e.to_string(),
        })?;
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let _ = stream.set_write_timeout(Some(TIMEOUT));
        let mut client = Self {
            conn: Conn::receiving_fds(stream),
            socket: socket.to_owned(),
            hello: Hello {
                uid: 0,
                store: PathBuf::new(),
                verity: String::new(),
                quota: None,
                used: None,
                profiles: false,
            },
        };
        match client.ask(&Request::Hello {
            version: protocol::VERSION,
            usage,
        })? {
            Response::Hello {
                uid,
                store,
                verity,
                quota,
                used,
                profiles,
                ..
            } => {
                client.hello = Hello {
                    uid,
                    store: PathBuf::from(store),
                    verity,
                    quota,
                    used,
                    profiles,
                };
                Ok(client)
            }
            other => Err(unexpected("hello", other)),
        }
    }

    /// What the service said at hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn proto(&self, source: ProtocolError) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            cause: source,
        }
    }

    /// Sends `req` and reads one answer; an error answer becomes [`ClientError::Refused`].
    fn ask(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.conn.send(req).map_err(|e| self.proto(e))?;
        self.answer()
    }

    fn answer(&mut self) -> Result<Response, ClientError> {
        match self.conn.read_response().map_err(|e| self.proto(e))? {
            Response::Error { kind, message } => Err(ClientError::Refused { kind, message }),
            r => Ok(r),
        }
    }

    /// The image `name` stands for (the caller's own ref, else a published one).
    pub fn resolve(
        &mut self,
        name: &str,
        summary: bool,
        persist: Option<&str>,
    ) -> Result<Resolved, ClientError> {
        match self.ask(&Request::Resolve {
            name: name.to_owned(),
            summary,
            persist: persist.map(str::to_owned),
        })? {
            Response::Resolved {
                image,
                files,
                bytes,
                persisted_bytes,
                last_used,
                ..
            } => Ok(Resolved {
                image,
                files,
                bytes,
                persisted_bytes,
                last_used,
            }),
            other => Err(unexpected("resolve", other)),
        }
    }

    /// Sends a tree: its image, then the objects the service asks for (read again from
    /// their files). `sent` is told the bytes of each object as it goes.
    pub fn import(
        &mut self,
        name: Option<&str>,
        snapshot: &UnstoredSnapshot,
        sent: &dyn Fn(u64),
    ) -> Result<ImportSummary, ClientError> {
        self.import_parts(
            name,
            &snapshot.digest,
            &snapshot.image,
            &snapshot.objects,
            None,
            sent,
        )
    }

    /// [`Client::import`] of an image (`digest`, `image` its bytes) whose objects are in the
    /// files `objects` names, with the bytes of its access profile (sent only to a service
    /// that takes them).
    pub fn import_parts(
        &mut self,
        name: Option<&str>,
        digest: &Digest,
        image: &[u8],
        objects: &[velo_image::UnstoredObject],
        profile: Option<&[u8]>,
        sent: &dyn Fn(u64),
    ) -> Result<ImportSummary, ClientError> {
        let profile = profile.filter(|_| self.hello.profiles);
        self.conn
            .send(&Request::Import {
                name: name.map(str::to_owned),
                image: *digest,
                size: image.len() as u64,
                profile: profile.map(|p| p.len() as u64),
            })
            .map_err(|e| self.proto(e))?;
        let sent_bytes = self
            .conn
            .send_raw(image)
            .and_then(|()| self.conn.send_raw(profile.unwrap_or_default()));
        if let Err(e) = sent_bytes {
            // The service may have refused the request and closed while the image was on its
            // way: its reason is the better error.
            return Err(match self.answer() {
                Err(refused @ ClientError::Refused { .. }) => refused,
                _ => self.proto(e),
            });
        }
        let count = match self.answer()? {
            Response::Need { count } => count,
            other => return Err(unexpected("import", other)),
        };
        if count > objects.len() as u64 {
            return Err(ClientError::Unexpected {
                request: "import",
                got: format!("a need for {count} objects of {}", objects.len()),
            });
        }
        let mut digests = vec![0u8; count as usize * 32];
        self.conn
            .read_exact(&mut digests)
            .map_err(|e| self.proto(e))?;
        let by_digest: std::collections::HashMap<&Digest, &velo_image::UnstoredObject> =
            objects.iter().map(|o| (&o.digest, o)).collect();
        let mut buf = vec![0u8; 1 << 20];
        for chunk in digests.chunks_exact(32) {
            let mut d = [0u8; 32];
            d.copy_from_slice(chunk);
            let digest = Digest::from_bytes(d);
            let Some(object) = by_digest.get(&digest) else {
                return Err(ClientError::Unexpected {
                    request: "import",
                    got: format!("a need for object {digest}, which the tree does not have"),
                });
            };
            self.send_file(&object.path, object.size, &mut buf)?;
            sent(object.size);
        }
        match self.answer()? {
            Response::Imported(summary) => Ok(summary),
            other => Err(unexpected("import", other)),
        }
    }

    /// Sends exactly `size` bytes of the file at `path` (a file that shrank is padded so the
    /// stream stays in step; the service then refuses the object as not matching).
    fn send_file(&self, path: &Path, size: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        use std::io::Read;
        let read_err = |cause| ClientError::Read {
            path: path.to_owned(),
            cause,
        };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match file.read(&mut buf[..want]) {
                Ok(0) => {
                    buf[..want].fill(0);
                    want
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err(e)),
            };
            self.conn.send_raw(&buf[..n]).map_err(|e| self.proto(e))?;
            left -= n as u64;
        }
        Ok(())
    }

    /// A detached mount of `name`'s image; the connection must stay open while it is used,
    /// and [`Client::done`] says when it no longer is.
    pub fn mount(&mut self, name: &str, writes: Writes) -> Result<Mounted, ClientError> {
        match self.ask(&Request::Mount {
            name: name.to_owned(),
            writes,
        })? {
            Response::Mounted { image, reused, .. } => {
                let fd = self.conn.take_fd().ok_or_else(|| ClientError::Unexpected {
                    request: "mount",
                    got: "an answer without a mount".into(),
                })?;
                Ok(Mounted { fd, image, reused })
            }
            other => Err(unexpected("mount", other)),
        }
    }

    /// Says the mounts of this connection are no longer attached anywhere, and closes it.
    pub fn done(self) {
        let _ = self.conn.send(&Request::Done);
    }

    /// [`Client::done`], then waits until the service has taken the mounts back (it closes
    /// the connection once it has): a persisted upper is then free for the next run.
    pub fn done_and_wait(mut self) {
        if self.conn.send(&Request::Done).is_ok() {
            while self.conn.read_message().is_ok() {}
        }
    }

    /// The refs the caller may read.
    pub fn refs(&mut self) -> Result<Vec<RefEntry>, ClientError> {
        match self.ask(&Request::Refs)? {
            Response::Refs { refs } => Ok(refs),
            other => Err(unexpected("refs", other)),
        }
    }

    /// Copies the image `name` names and all its objects into `store` (a store of the
    /// caller's own), checking every byte against its digest as it arrives, and its access
    /// profile if the service sends one (one that does not parse is left out). Returns the
    /// image.
    pub fn export_into(
        &mut self,
        name: &str,
        store: &velo_objects::Store,
        progress: &dyn Fn(u64),
    ) -> Result<Digest, ClientError> {
        let (image, size, count, profile) = match self.ask(&Request::Export {
            name: name.to_owned(),
            profile: self.hello.profiles,
        })? {
            Response::Exporting {
                image,
                size,
                objects,
                profile,
            } => (image, size, objects, profile),
            other => return Err(unexpected("export", other)),
        };
        let stored = |e: velo_objects::StoreError| ClientError::Unexpected {
            request: "export",
            got: e.to_string(),
        };
        store
            .store_verified(
                velo_objects::Kind::Image,
                &mut self.conn.raw(size),
                &image,
                size,
                &format!("image {image} from velo-mountd"),
            )
            .map_err(stored)?;
        if profile > 0 {
            use std::io::Read;
            // Read whole (the stream stays in step), kept only if it is a profile.
            let mut bytes = Vec::new();
            self.conn
                .raw(profile)
                .take(velo_objects::MAX_PROFILE_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| self.proto(ProtocolError::Io(e.to_string())))?;
            std::io::copy(
                &mut self.conn.raw(profile - bytes.len() as u64),
                &mut std::io::sink(),
            )
            .map_err(|e| self.proto(ProtocolError::Io(e.to_string())))?;
            if let Ok(p) = velo_objects::Profile::parse(&bytes) {
                store.write_profile(&image, &p).map_err(stored)?;
            }
        }
        let session = store.begin_write().map_err(stored)?;
        for i in 0..count {
            let mut head = [0u8; 40];
            self.conn.read_exact(&mut head).map_err(|e| self.proto(e))?;
            let mut d = [0u8; 32];
            d.copy_from_slice(&head[..32]);
            let digest = Digest::from_bytes(d);
            let mut sz = [0u8; 8];
            sz.copy_from_slice(&head[32..]);
            let size = u64::from_le_bytes(sz);
            let what = format!("object {digest} ({} of {count}) from velo-mountd", i + 1);
            store
                .store_verified(
                    velo_objects::Kind::Object,
                    &mut self.conn.raw(size),
                    &digest,
                    size,
                    &what,
                )
                .map_err(stored)?;
            progress(size);
        }
        session.commit(&[]).map_err(stored)?;
        Ok(image)
    }

    /// Removes one of the caller's refs.
    pub fn remove_ref(&mut self, name: &str) -> Result<(), ClientError> {
        match self.ask(&Request::RemoveRef {
            name: name.to_owned(),
        })? {
            Response::Ok => Ok(()),
            other => Err(unexpected("remove-ref", other)),
        }
    }

    /// What the service holds (root only).
    pub fn status(&mut self) -> Result<Vec<protocol::CachedImage>, ClientError> {
        match self.ask(&Request::Status)? {
            Response::Status { images } => Ok(images),
            other => Err(unexpected("status", other)),
        }
    }

    /// Stops the service (root only); returns once it has let everything go.
    pub fn stop(mut self) -> Result<(), ClientError> {
        match self.ask(&Request::Stop)? {
            Response::Ok => Ok(()),
            other => Err(unexpected("stop", other)),
        }
    }
}

fn unexpected(request: &'static str, got: Response) -> ClientError {
    let got = serde_json::to_string(&got).unwrap_or_else(|_| "something".into());
    ClientError::Unexpected { request, got }
}
